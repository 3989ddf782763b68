"""The Ray Data engine against a real local Ray instance with 2 workers: same results as the local engine, and
a worker process killed with SIGKILL mid-run is replaced without losing an image."""

import os
import signal

import numpy as np
import pytest
from PIL import Image

from pinsface.cache import EmbeddingCache, content_hash
from pinsface.embeddings import Embedder, embedding_key, ensure_embeddings
from pinsface.prepare import prepare
from pinsface.settings import Settings
from tests.conftest import copy_identities

ray = pytest.importorskip("ray", reason="the ray extra is part of make install: pip install -e '.[test,ray]'")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPUs for the module (the engine reuses it and leaves it running)."""
    ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """Real faces of three people, a photo without a face, a file that is not an image, and a duplicate."""
    root = tmp_path_factory.mktemp("ray") / "dataset"
    copy_identities(root, ["pins_Adriana Lima", "pins_Bill Gates", "pins_Chris Evans"], 5)
    Image.fromarray(np.tile(np.linspace(0, 255, 224, dtype=np.uint8), (224, 1))).convert("RGB").save(
        root / "pins_Bill Gates" / "blank.jpg"
    )
    (root / "pins_Bill Gates" / "broken.jpg").write_bytes(b"not a jpeg at all")
    first = sorted((root / "pins_Chris Evans").glob("*.jpg"))[0]
    (root / "pins_Chris Evans" / "copy.jpg").write_bytes(first.read_bytes())
    return root


def test_ray_engine_gives_the_local_engines_faces_and_embeddings(local_ray, sample, tmp_path, detector, backbone):
    settings = Settings()
    local = prepare(sample, tmp_path / "local", settings.faces, progress=False, detector=detector)
    distributed = prepare(
        sample, tmp_path / "ray", settings.faces, progress=False, engine="ray", embed=settings, workers=2
    )
    assert distributed.summary["engine"] == "ray" and distributed.summary["ray"]["workers"] == 2
    assert distributed.status == local.status
    assert {"ok", "no_face", "not_an_image"} <= set(local.status)
    assert distributed.hashes == local.hashes
    hashes = [h for h in local.hashes if h]
    a = local.cache.load(hashes, crops=("aligned",))
    b = distributed.cache.load(hashes, crops=("aligned",))
    ra, rb = a.rows(hashes), b.rows(hashes)
    for column in ("status", "n_faces", "chosen", "fallback"):
        assert np.array_equal(a.columns[column][ra], b.columns[column][rb]), column
    for row_a, row_b in zip(ra, rb):
        da, db = a.detections(row_a), b.detections(row_b)
        np.testing.assert_allclose(da["boxes"], db["boxes"], atol=1e-3)
        np.testing.assert_allclose(da["landmarks"], db["landmarks"], atol=1e-3)
    np.testing.assert_array_equal(a.columns["aligned"][ra], b.columns["aligned"][rb])
    # The workers' embeddings went into the cache the run reads: ensure_embeddings finds them all there.
    embedder = Embedder(backbone, settings.embed_batch_size, settings.embed_precision)
    local_emb, local_flip = ensure_embeddings(
        hashes,
        local.cache,
        EmbeddingCache(tmp_path / "local", settings.faces.version(), embedding_key(settings)),
        embedder,
        progress=False,
    )
    ray_cache = EmbeddingCache(tmp_path / "ray", settings.faces.version(), embedding_key(settings))
    index, _, _ = ray_cache.load(hashes)
    assert set(hashes) <= set(index)
    ray_emb, ray_flip = ensure_embeddings(hashes, distributed.cache, ray_cache, None, progress=False)
    assert np.abs(ray_emb - local_emb).max() < 1e-3 and np.abs(ray_flip - local_flip).max() < 1e-3
    # A second prepare finds everything cached but the broken file, which both engines try again.
    again = prepare(sample, tmp_path / "ray", settings.faces, progress=False, engine="ray", embed=settings)
    assert again.summary["processed"] == 1 and again.summary["ray"]["images"] == 1 and again.status == local.status


def test_a_killed_worker_is_replaced_and_no_image_is_lost(local_ray, tmp_path, pins_dir):
    from pinsface.ray_engine import RayTarget, process

    files = [
        p
        for folder in ("pins_Anne Hathaway", "pins_Brie Larson", "pins_Alex Lawther")
        for p in sorted((pins_dir / folder).glob("*.jpg"))[:12]
    ]
    hashes = [content_hash(p.read_bytes()) for p in files]
    seen, pids, killed = [], set(), []

    def on_batch(batch):
        seen.extend(int(i) for i in batch["index"])
        pids.update(int(p) for p in batch["pid"])
        if not killed:
            victim = int(batch["pid"][0])
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    chunks = [list(range(lo, min(lo + 2, len(files)))) for lo in range(0, len(files), 2)]
    report = process(
        chunks, [str(p) for p in files], hashes, Settings().faces, target=RayTarget(workers=2), on_batch=on_batch
    )
    assert report["workers"] == 2 and killed
    status = f"/proc/{killed[0]}/status"
    assert not os.path.exists(status) or "\tZ" in open(status).read()  # gone, or a zombie awaiting its parent
    # Every image came back, once each batch is counted: a retried batch may be delivered only once.
    assert sorted(set(seen)) == list(range(len(files)))
    assert len(pids - set(killed)) >= 1


def test_cli_prepare_with_the_ray_engine(local_ray, sample, tmp_path, capsys):
    import json

    from pinsface.cli import main

    assert main(["prepare", str(sample), "--cache", str(tmp_path), "--engine", "ray", "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["engine"] == "ray" and summary["ray"]["workers"] == 2
    assert summary["faces_found"] + summary["no_face"] == summary["images"] - 1 and summary["skipped"] == {
        "not_an_image": 1
    }
    settings = Settings()
    index, _, _ = EmbeddingCache(tmp_path, settings.faces.version(), embedding_key(settings)).load()
    assert len(index) == summary["images"] - 2  # every distinct readable image (one file is a duplicate)


def test_open_set_evaluation_prepares_the_strangers_on_ray(local_ray, small_run, tmp_path, capsys, monkeypatch):
    import pinsface.ray_engine
    from pinsface.cli import main

    calls = []
    real = pinsface.ray_engine.prepare_on_ray

    def counted(paths, *args, **kwargs):  # the real engine, counting the images it is given
        calls.append(len(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(pinsface.ray_engine, "prepare_on_ray", counted)
    strangers = copy_identities(tmp_path / "strangers", ["pins_Henry Cavil", "pins_Zoe Saldana"], 3)
    run_dir, _ = small_run
    argv = ["evaluate", str(run_dir), "--unknown", str(strangers), "--out", str(tmp_path / "report")]
    assert main([*argv, "--engine", "ray", "--no-progress"]) == 0
    assert calls == [6]  # the run's own test faces were cached; the six strangers' photos went to Ray
    out = capsys.readouterr().out
    assert "open set:" in out and "of 6 strangers rejected" in out


def test_ray_engine_runs_the_second_pass_like_the_local_engine(local_ray, pins_dir, tmp_path, detector):
    from pinsface.testing.photos import build_groups

    others = sorted(d.name for d in pins_dir.iterdir())[10:30]
    truth = build_groups(pins_dir, tmp_path / "data", ["pins_Bill Gates"], others, references=6, groups=4, seed=3)
    settings = Settings()
    local = prepare(tmp_path / "data", tmp_path / "local", settings.faces, progress=False, detector=detector)
    distributed = prepare(
        tmp_path / "data", tmp_path / "ray", settings.faces, progress=False, engine="ray", embed=settings, workers=2
    )
    assert local.summary["subject_pass"] and distributed.summary["subject_pass"] == local.summary["subject_pass"]
    assert distributed.status == local.status
    groups = [h for h, item in zip(local.hashes, local.dataset.items) if item.rel in truth]
    a = local.cache.load(groups, crops=("aligned",))
    b = distributed.cache.load(groups, crops=("aligned",))
    assert np.array_equal(a.columns["chosen"][a.rows(groups)], b.columns["chosen"][b.rows(groups)])
    np.testing.assert_array_equal(a.columns["aligned"][a.rows(groups)], b.columns["aligned"][b.rows(groups)])
    # The held photos' embeddings were not written by the workers (their choice could change): they are made
    # from the chosen crops, like every other.
    ray_cache = EmbeddingCache(tmp_path / "ray", settings.faces.version(), embedding_key(settings))
    index, _, _ = ray_cache.load(groups)
    assert not set(groups) & set(index)

import json
import os
import shutil
import time

import numpy as np
import pytest

from pinsface.cache import FaceCache
from pinsface.cli import main
from pinsface.prepare import prepare
from pinsface.settings import FaceSettings
from pinsface.testing.badinput import BAD, ODD, SOURCE, make_bad_corpus
from tests.conftest import copy_identities

IDS = ["pins_Adriana Lima", "pins_Bill Gates", "pins_Chris Evans"]


class CountingDetector:
    """Wraps the real detector, counting images and optionally dying after some batches (a killed run)."""

    def __init__(self, detector, die_after_batches=None):
        self.detector = detector
        self.settings = detector.settings
        self.images = 0
        self.batches = 0
        self.die_after = die_after_batches

    def detect(self, images, min_face_sizes=None, thresholds=None, coarse_sizes=None):
        if self.die_after is not None and self.batches >= self.die_after:
            raise KeyboardInterrupt("simulated kill")
        self.batches += 1
        self.images += len(images)
        return self.detector.detect(images, min_face_sizes, thresholds, coarse_sizes)


@pytest.fixture()
def data(tmp_path):
    return copy_identities(tmp_path / "data", IDS, 12)


def test_prepare_records_faces_and_second_run_reads_only_the_cache(data, tmp_path, detector):
    counting = CountingDetector(detector)
    first = prepare(data, tmp_path / "cache", progress=False, detector=counting)
    s = first.summary
    assert (s["identities"], s["images"], s["processed"], s["from_cache"]) == (3, 36, 36, 0)
    assert s["faces_found"] + s["no_face"] == 36 and s["faces_found"] >= 34
    assert counting.images == 36

    faces = first.faces()
    assert faces.columns["aligned"].shape[1:] == (150, 150, 3)
    assert faces.columns["box"].shape[1:] == (100, 100)
    row = faces.index[first.hashes[0]]
    assert len(faces.detections(row)["boxes"]) == faces.columns["n_faces"][row]

    again = CountingDetector(detector)
    second = prepare(data, tmp_path / "cache", progress=False, detector=again)
    assert again.images == 0
    assert second.summary["from_cache"] == 36 and second.summary["processed"] == 0
    assert second.status == first.status


def test_adding_images_processes_just_those(data, tmp_path, detector):
    prepare(data, tmp_path / "cache", progress=False, detector=detector)
    copy_identities(data, IDS[:2], 5, start=12)
    counting = CountingDetector(detector)
    result = prepare(data, tmp_path / "cache", progress=False, detector=counting)
    assert counting.images == 10
    assert result.summary["processed"] == 10 and result.summary["from_cache"] == 36


def test_killed_run_resumes_without_redoing_finished_chunks(data, tmp_path, detector, monkeypatch):
    import pinsface.prepare as prep

    monkeypatch.setattr(prep, "CHUNK_IMAGES", 8)
    with pytest.raises(KeyboardInterrupt):
        prepare(
            data,
            tmp_path / "cache",
            batch_size=4,
            progress=False,
            detector=CountingDetector(detector, die_after_batches=5),
        )
    # Batches 1-4 filled two chunks of 8; the fifth chunk was being written when the run died.
    cache = FaceCache(tmp_path / "cache", FaceSettings().version())
    assert len(cache.known()) == 16
    assert not list(cache.store.folder.glob(".*.tmp"))
    counting = CountingDetector(detector)
    result = prepare(data, tmp_path / "cache", batch_size=4, progress=False, detector=counting)
    assert counting.images == 36 - 16
    assert result.summary["from_cache"] == 16


def test_corrupt_or_torn_cache_chunks_are_reported_and_recomputed(data, tmp_path, detector):
    prepare(data, tmp_path / "cache", progress=False, detector=detector)
    cache = FaceCache(tmp_path / "cache", FaceSettings().version())
    chunk = cache.store.chunk_paths()[0]
    chunk.write_bytes(chunk.read_bytes()[:1000])  # torn
    old_tmp = cache.store.folder / ".chunk-half-written.arrays.lz4.1.tmp"
    old_tmp.write_bytes(b"partial")
    os.utime(old_tmp, (time.time() - 7200, time.time() - 7200))  # left by a writer that died long ago
    young_tmp = cache.store.folder / ".chunk-being-written.arrays.lz4.2.tmp"
    young_tmp.write_bytes(b"partial")  # may belong to a live writer: left alone
    counting = CountingDetector(detector)
    result = prepare(data, tmp_path / "cache", progress=False, detector=counting)
    assert result.summary["cache_corrupt_chunks"] == [chunk.name]
    assert counting.images == 36
    assert result.summary["faces_found"] + result.summary["no_face"] == 36
    assert not old_tmp.exists() and young_tmp.exists()

    garbage = cache.store.chunk_paths()[0]
    garbage.write_bytes(b"\x00not a chunk file at all")
    result = prepare(data, tmp_path / "cache", progress=False, detector=CountingDetector(detector))
    assert result.summary["cache_corrupt_chunks"] == [garbage.name]


def test_a_settings_change_invalidates_only_its_own_cache(data, tmp_path, detector):
    prepare(data, tmp_path / "cache", progress=False, detector=detector)
    other = FaceSettings(template_scale=1.02)
    assert other.version() != FaceSettings().version()
    from pinsface.faces import FaceDetector

    counting = CountingDetector(FaceDetector(other))
    prepare(data, tmp_path / "cache", other, progress=False, detector=counting)
    assert counting.images == 36
    again = CountingDetector(detector)
    prepare(data, tmp_path / "cache", progress=False, detector=again)
    assert again.images == 0


def test_bad_files_are_skipped_by_name_and_never_stop_the_run(tmp_path, pins_dir, detector):
    data = copy_identities(tmp_path / "data", IDS[:1], 4)
    source = pins_dir.joinpath(*SOURCE)
    make_bad_corpus(data / "pins_Bill Gates", source)
    (data / "pins_Bill Gates" / "readme.txt").write_text("ignored: not an image extension")
    result = prepare(data, tmp_path / "cache", progress=False, detector=detector)
    s = result.summary
    skipped = {f["path"].split("/")[-1]: f["reason"] for f in s["skipped_files"]}
    assert skipped == BAD
    assert s["skipped"] == {reason: list(BAD.values()).count(reason) for reason in set(BAD.values())}
    assert s["ignored_files"] == {"not_image_extension": 1}
    # Every readable odd file (gray, RGBA, palette, 16-bit, CMYK, EXIF-rotated) is processed like any photo.
    assert s["faces_found"] + s["no_face"] == s["images"] - len(BAD) == 4 + 6
    status = {it.rel.split("/")[-1]: st for it, st in zip(result.dataset.items, result.status)}
    odd = {name: status[name] for name in ODD}
    assert odd == {name: "ok" for name in ODD}


def test_cli_prepare_json_summary(data, tmp_path, capsys):
    code = main(["prepare", str(data), "--cache", str(tmp_path / "cache"), "--json", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    for key in (
        "identities",
        "images",
        "faces_found",
        "no_face",
        "skipped",
        "skipped_files",
        "multi_face",
        "seconds",
        "images_per_second",
        "from_cache",
    ):
        assert key in summary
    assert summary["images"] == 36 and summary["identities"] == 3


def test_cli_reports_missing_data_clearly(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing"), "--cache", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "Kaggle" in err


def test_paths_with_spaces_and_non_ascii(tmp_path, detector):
    data = copy_identities(
        tmp_path / "dätä sét", ["pins_Bill Gates"], 3, rename={"pins_Bill Gates": "pins_Zoë Ünïcode"}
    )
    shutil.copy(next((data / "pins_Zoë Ünïcode").iterdir()), data / "pins_Zoë Ünïcode" / "fïlé wïth spaces.jpg")
    result = prepare(data, tmp_path / "cache", progress=False, detector=detector)
    assert result.dataset.identities == ["Zoë Ünïcode"]
    assert result.summary["faces_found"] == 4
    assert np.all(np.array(result.status) == "ok")


def test_faces_are_embedded_in_the_background_as_prepare_writes_them(data, tmp_path, detector, backbone):
    from pinsface.cache import EmbeddingCache
    from pinsface.embeddings import BackgroundEmbedder, Embedder

    embedder = Embedder(backbone, 16, "float32")
    store = EmbeddingCache(tmp_path / "cache", "test", "background")
    background = BackgroundEmbedder(embedder, store)
    result = prepare(data, tmp_path / "cache", detector=detector, progress=False, on_records=background)
    background.close()
    hashes = [h for h in result.hashes if h]
    assert background.error is None and background.faces == len(hashes)
    index, emb, flips = store.load(hashes)
    faces = result.cache.load(hashes, crops=("aligned",))
    direct, direct_flips = embedder.both_views(faces.columns["aligned"][faces.rows(hashes)])
    rows = [index[h] for h in hashes]
    np.testing.assert_allclose(emb[rows], direct, atol=1e-4)
    np.testing.assert_allclose(flips[rows], direct_flips, atol=1e-4)


def test_a_failing_background_embedder_says_why_and_lets_prepare_finish(data, tmp_path, detector, backbone):
    from pinsface.cache import EmbeddingCache
    from pinsface.embeddings import BackgroundEmbedder, Embedder

    store = EmbeddingCache(tmp_path / "cache", "test", "background")
    background = BackgroundEmbedder(Embedder(backbone, 16, "float32"), store)
    background([{"hash": "0" * 32, "aligned": np.zeros((7, 7, 3), np.uint8)}])  # no chip the backbone takes
    result = prepare(data, tmp_path / "cache", detector=detector, progress=False, on_records=background)
    background.close()
    assert background.error is not None and background.faces == 0
    assert all(result.hashes)  # prepare itself lost nothing; the embeddings are simply made later

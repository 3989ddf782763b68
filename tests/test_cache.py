"""The face/embedding cache: statuses survive any chunk order, and nothing in a cache folder can run code."""

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pinsface.cache import FaceCache
from pinsface.prepare import prepare
from pinsface.settings import FaceSettings
from tests.conftest import copy_identities
from tests.processes import finish, start


def blank_image(path: Path) -> Path:
    Image.fromarray(np.tile(np.linspace(0, 255, 224, dtype=np.uint8), (224, 1))).convert("RGB").save(path)
    return path


def test_statuses_survive_when_the_first_chunk_has_no_no_face_image(tmp_path, detector, monkeypatch):
    """Regression: the status column was sized by the first chunk read, so 'no_face' became 'no'."""
    import pinsface.prepare as prep

    data = copy_identities(tmp_path / "data", ["pins_Bill Gates", "pins_Chris Evans"], 4)
    blank_image(data / "pins_Chris Evans" / "zz_blank.jpg")  # sorts last: it lands in the last chunk
    monkeypatch.setattr(prep, "CHUNK_IMAGES", 3)
    cold = prepare(data, tmp_path / "cache", batch_size=3, progress=False, detector=detector)
    assert cold.summary["no_face"] == 1
    # Make the chunks holding only 'ok' images sort first, whatever uuids the writer chose.
    cache = FaceCache(tmp_path / "cache", FaceSettings().version())
    blank = cold.hashes[-1]
    for path in cache.store.chunk_paths():
        first = "z" if blank in cache.store.hashes(path) else "0"
        path.rename(path.with_name("chunk-" + first + path.name[len("chunk-") + 1 :]))
    warm = prepare(data, tmp_path / "cache", batch_size=3, progress=False, detector=detector)
    assert warm.summary["processed"] == 0
    assert warm.status == cold.status
    assert warm.summary["no_face"] == 1 and "no" not in warm.status


class _RunsCode:
    """Unpickling this creates a marker file: what a hostile cache chunk would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["chunk-{u}-n3.arrays.lz4", "chunk-{u}-n3.joblib.lz4"])
def test_a_chunk_crafted_to_run_code_is_never_unpickled(tmp_path, detector, name):
    import joblib
    import lz4.frame

    data = copy_identities(tmp_path / "data", ["pins_Bill Gates"], 3)
    marker = tmp_path / "code_ran"
    folder = FaceCache(tmp_path / "cache", FaceSettings().version()).store.folder
    folder.mkdir(parents=True)
    hostile = folder / name.format(u="0" * 32)
    if name.endswith(".joblib.lz4"):  # the old format, exactly as joblib would read it
        joblib.dump({"format": 2, "n": 3, "hash": _RunsCode(str(marker))}, hostile, compress=("lz4", 3))
    else:  # a pickle dressed in the new format's name and compression
        hostile.write_bytes(lz4.frame.compress(pickle.dumps({"hash": _RunsCode(str(marker))})))
    result = prepare(data, tmp_path / "cache", progress=False, detector=detector)
    assert not marker.exists()
    assert result.summary["processed"] == 3 and result.summary["faces_found"] == 3
    unusable = result.summary["cache_corrupt_chunks"] + result.summary["cache_outdated_chunks"]
    assert unusable == [hostile.name] and not hostile.exists()


def test_old_cache_chunks_are_recomputed_with_one_line_saying_why(tmp_path, detector, caplog):
    import joblib

    data = copy_identities(tmp_path / "data", ["pins_Bill Gates"], 2)
    folder = FaceCache(tmp_path / "cache", FaceSettings().version()).store.folder
    folder.mkdir(parents=True)
    for i in range(3):
        joblib.dump({"format": 2, "n": 0, "hash": np.zeros(0, "<U32")}, folder / f"chunk-{i:032d}-n0.joblib.lz4")
    with caplog.at_level("WARNING"):
        result = prepare(data, tmp_path / "cache", progress=False, detector=detector)
    lines = [r.getMessage() for r in caplog.records if "pickle" in r.getMessage()]
    assert len(lines) == 1 and "3 chunk(s)" in lines[0] and "recomputed" in lines[0]
    assert result.summary["processed"] == 2 and len(result.summary["cache_outdated_chunks"]) == 3


def test_chunks_hold_plain_arrays_and_reject_damage(tmp_path):
    from pinsface.cache import ChunkError, ChunkStore, decode_chunk, encode_chunk

    store = ChunkStore(tmp_path / "store")
    path = store.write(
        {"hash": np.array(["a" * 32, "b" * 32], "S32"), "x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    )
    chunk = store.read(path)
    assert chunk["x"].tolist() == [[0, 1, 2], [3, 4, 5]] and store.hashes(path) == ["a" * 32, "b" * 32]
    # The same rows again (another process got there first): nothing new is written.
    assert store.write({"hash": np.array(["a" * 32], "S32"), "x": np.zeros((1, 3), np.float32)}) is None
    with pytest.raises(ChunkError):
        encode_chunk({"hash": np.array(["a" * 32], "S32"), "obj": np.array([object()], dtype=object)})
    # A header that declares more than a chunk may hold is refused before anything that size is read.
    import json as json_module
    import struct

    import lz4.frame

    from pinsface.cache import MAGIC

    header = json_module.dumps(
        {
            "format": 3,
            "n": 1,
            "columns": [
                {"name": "hash", "dtype": "|S32", "shape": [1]},
                {"name": "x", "dtype": "<f8", "shape": [1, 10**12]},
            ],
        }
    )
    huge = tmp_path / "store" / f"chunk-{'1' * 32}-n1.arrays.lz4"
    huge.write_bytes(
        lz4.frame.compress(MAGIC + struct.pack("<I", len(header)) + header.encode() + b"a" * 32 + b"\0" * 64)
    )
    assert store.read(huge, {"hash", "x"}) is None and not huge.exists()
    raw = path.read_bytes()
    for damaged in (
        raw[: len(raw) // 2],
        raw[:40] + bytes([raw[40] ^ 0xFF]) + raw[41:],
        b"\x04\x22\x4d\x18" + b"\xff" * 40,
        b"",
    ):
        with pytest.raises(ChunkError):
            decode_chunk(damaged)


def test_two_preparers_on_one_cache_both_finish_and_keep_each_image_once(tmp_path):
    data = copy_identities(tmp_path / "data", ["pins_Bill Gates", "pins_Chris Evans", "pins_Adriana Lima"], 8)
    cache = tmp_path / "cache"
    env = {**os.environ, "PINSFACE_CACHE": str(cache)}
    cmd = [
        str(Path(sys.executable).parent / "pinsface"),
        "prepare",
        str(data),
        "--no-progress",
        "--json",
        "--batch-size",
        "4",
    ]
    procs = [start(cmd, env=env) for _ in range(2)]
    outs = [finish(p, timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    store = FaceCache(cache, FaceSettings().version()).store
    hashes = [h for path in store.chunk_paths() for h in store.hashes(path)]
    assert len(hashes) == len(set(hashes)) == 24
    import json

    summaries = [json.loads(o[0]) for o in outs]
    assert all(s["faces_found"] + s["no_face"] == 24 for s in summaries)


def test_each_status_is_stored_as_its_index_in_the_one_list(tmp_path):
    from pinsface import cache, faces

    assert cache.STATUSES is faces.STATUSES
    assert faces.STATUSES[:2] == ("ok", "no_face")  # codes already on disk keep their meaning
    store = FaceCache(tmp_path / "cache", FaceSettings().version())
    records = [
        {
            "hash": f"{i:032x}",
            "status": status,
            "n_faces": 0,
            "chosen": -1,
            "image_shape": np.array([8, 8, 3]),
            "fallback": False,
            "boxes": np.zeros((0, 4), np.float32),
            "scores": np.zeros(0, np.float32),
            "landmarks": np.zeros((0, 5, 2), np.float32),
            "aligned": np.zeros((4, 4, 3), np.uint8),
            "box": np.zeros((4, 4, 3), np.uint8),
        }
        for i, status in enumerate(faces.STATUSES)
    ]
    store.write(records)
    [path] = store.store.chunk_paths()
    stored = cache.read_chunk_columns(path, {"hash", "status"})
    codes = dict(zip(stored["hash"].astype(str), stored["status"].tolist(), strict=True))
    assert [codes[r["hash"]] for r in records] == list(range(len(faces.STATUSES)))
    table = store.load()
    assert [str(table.columns["status"][table.index[r["hash"]]]) for r in records] == list(faces.STATUSES)

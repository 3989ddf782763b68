"""Atomic saves and the tidying of temporary files, shared by the run folder and the face cache."""

import os
import time

import pytest

from pinsface import files


def test_atomic_write_saves_bytes_text_or_a_writer_and_flushes_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    files.atomic_write(tmp_path / "a.bin", b"\x00\x01")
    files.atomic_write(tmp_path / "b.json", '{"é": 1}')
    files.atomic_write(tmp_path / "c.npz", lambda tmp: tmp.write_bytes(b"npz"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.json").read_text(encoding="utf-8") == '{"é": 1}'
    assert (tmp_path / "c.npz").read_bytes() == b"npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json", "c.npz"]
    # Each save flushes its temporary file, then the folder that holds the rename.
    assert synced.count(str(tmp_path)) == 3 and len(synced) == 6


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "labels.json"
    files.atomic_write(path, "old")

    def failing(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, failing)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["labels.json"]


def test_only_stale_temporaries_matching_the_pattern_are_removed(tmp_path):
    old = time.time() - files.STALE_TEMP_SECONDS - 60
    for name in (".chunk-a.arrays.1.tmp.lz4", ".chunk-b.arrays.lz4.2.tmp", ".model.3.tmp.keras"):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (old, old))
    (tmp_path / ".chunk-young.arrays.4.tmp.lz4").write_bytes(b"x")
    (tmp_path / "chunk-c-n1.arrays.lz4").write_bytes(b"x")
    os.utime(tmp_path / "chunk-c-n1.arrays.lz4", (old, old))
    files.remove_stale_temporaries(tmp_path, ".chunk-*.tmp*")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".chunk-young.arrays.4.tmp.lz4",
        ".model.3.tmp.keras",
        "chunk-c-n1.arrays.lz4",
    ]

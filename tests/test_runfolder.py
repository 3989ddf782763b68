"""The run folder under stress: saves killed part-way, two writers at once, and folders edited by hand."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pinsface.predict import Recognizer
from pinsface.runfolder import Run, RunError
from tests.processes import finish, start

PINSFACE = str(Path(sys.executable).parent / "pinsface")
NEWCOMERS = {"Ben Affleck": "pins_Ben Affleck", "Avril Lavigne": "pins_Avril Lavigne"}


@pytest.fixture()
def run_copy(small_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(small_run[0], copy)
    return copy


def photos(pins_dir, name, n=6, start=0) -> list[str]:
    return [str(p) for p in sorted((pins_dir / NEWCOMERS[name]).glob("*.jpg"))[start : start + n]]


def assert_consistent(run_dir: Path, before: list[str]) -> list[str]:
    """The folder loads, and holds either the labels it had or those plus the newcomer, never a mix."""
    recognizer = Recognizer.load(run_dir)
    labels = recognizer.labels
    assert labels == before or labels == before + ["Ben Affleck"], labels
    assert recognizer.head.n_classes == len(labels) == len(recognizer.gallery.labels)
    assert int(recognizer.gallery.owner.max()) == len(labels) - 1
    return labels


# Runs `pinsface enroll` in this process, SIGKILLing itself at one point of the save.
KILLER = r"""
import os, signal, sys
import pinsface.runfolder as run

point = sys.argv[1]
real = run.atomic_write
written = []

def killing(path, write):
    if point == "inside-delta-write" and path.name.startswith("gallery-delta"):
        def then_die(tmp):
            write(tmp)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, then_die)
    real(path, write)
    written.append(path.name)
    if point == f"after-{len(written)}-files":
        os.kill(os.getpid(), signal.SIGKILL)

run.atomic_write = killing
from pinsface.cli import main
sys.exit(main(["enroll", *sys.argv[2:]]))
"""


def test_a_save_killed_at_any_point_leaves_the_old_state_or_the_new_one(run_copy, pins_dir, tmp_path):
    before = Recognizer.load(run_copy).labels
    # An enrolment writes the labels, the head's columns, the gallery's change (not the model or the whole
    # gallery), then the manifest that makes them current.
    points = {
        "after-1-files": False,
        "after-2-files": False,
        "inside-delta-write": False,
        "after-3-files": False,
        "after-4-files": True,
    }
    folders = {}
    for point in points:
        folders[point] = tmp_path / point
        shutil.copytree(run_copy, folders[point])
    procs = {
        point: start(
            [
                sys.executable,
                "-c",
                KILLER,
                point,
                str(folders[point]),
                "--name",
                "Ben Affleck",
                *photos(pins_dir, "Ben Affleck"),
            ]
        )
        for point in points
    }
    for point, proc in procs.items():
        _, err = finish(proc, timeout=600)
        assert proc.returncode == -9, f"{point}: exit {proc.returncode}: {err[-2000:]}"
        labels = assert_consistent(folders[point], before)
        assert ("Ben Affleck" in labels) == points[point], point
    # A folder whose save died after the manifest still holds the previous generation's files for readers;
    # the next save removes what is no longer needed.
    recognizer = Recognizer.load(folders["after-4-files"])
    recognizer.forget("Ben Affleck")
    assert Recognizer.load(folders["after-4-files"]).labels == before
    assert not (folders["after-4-files"] / "labels.json").exists()  # the first generation's, no longer needed
    assert (folders["after-4-files"] / "model.keras").exists()  # still the current model


def test_two_enrolments_at_once_keep_both_people(run_copy, pins_dir):
    before = Recognizer.load(run_copy).labels
    procs = {
        name: start([PINSFACE, "enroll", str(run_copy), "--name", name, *photos(pins_dir, name)]) for name in NEWCOMERS
    }
    errors = {name: finish(proc, timeout=600)[1] for name, proc in procs.items()}
    outcome = {name: (proc.returncode, errors[name]) for name, proc in procs.items()}
    refused = [name for name, (code, err) in outcome.items() if code != 0]
    for name in refused:
        assert "run folder is busy (pid" in outcome[name][1], outcome[name][1]
    assert len(refused) < 2
    recognizer = Recognizer.load(run_copy)
    assert set(recognizer.labels) == set(before) | (set(NEWCOMERS) - set(refused))
    assert recognizer.generation == 1 + len(NEWCOMERS) - len(refused)
    # Each newcomer's other photos are named as that newcomer: no faces were filed under the wrong name.
    for name in set(NEWCOMERS) - set(refused):
        results = recognizer.identify_many(photos(pins_dir, name, n=6, start=30))
        named = [r.faces[0].best_match == name for r in results if r.faces]
        assert len(named) >= 5 and np.mean(named) >= 0.8, (name, named)


def test_a_second_writer_waits_then_says_the_folder_is_busy(run_copy, pins_dir):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pinsface.runfolder import Run\n"
            "with Run(sys.argv[1]).lock():\n    print('locked', flush=True); time.sleep(60)",
            str(run_copy),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        env = {**os.environ, "PINSFACE_LOCK_TIMEOUT": "2"}
        t = time.monotonic()
        done = subprocess.run(
            [PINSFACE, "forget", str(run_copy), "--name", "Bill Gates"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 1 and f"run folder is busy (pid {holder.pid})" in done.stderr
        assert time.monotonic() - t < 120
    finally:
        holder.kill()
        holder.wait()
    assert "Bill Gates" in Recognizer.load(run_copy).labels


def test_hand_edited_or_damaged_folders_give_one_clear_error(run_copy, capsys):
    from pinsface.cli import main

    run = Run(run_copy)
    manifest = json.loads((run_copy / "manifest.json").read_text())
    labels = json.loads((run_copy / "labels.json").read_text())
    original = {name: (run_copy / name).read_bytes() for name in ("manifest.json", "labels.json", "model.keras")}

    def expect(pattern: str):
        with pytest.raises(RunError, match=pattern):
            Recognizer.load(run_copy)
        assert main(["predict", str(run_copy), str(run_copy / "missing.jpg"), "--no-progress"]) == 1
        assert re.search(pattern, capsys.readouterr().err)
        for name, data in original.items():
            (run_copy / name).write_bytes(data)

    (run_copy / "labels.json").write_text(json.dumps(labels + ["Someone Else"]))
    expect(rf"model has {len(labels)} outputs but labels.json has {len(labels) + 1} names")

    (run_copy / "manifest.json").write_text(json.dumps({**manifest, "labels": len(labels) + 1}))
    expect(rf"manifest.json says {len(labels) + 1} names but labels.json has {len(labels)}")

    data = original["model.keras"]
    (run_copy / "model.keras").write_bytes(data[: len(data) // 2])
    expect(r"model.keras is damaged")

    (run_copy / "labels.json").unlink()
    expect(r"labels.json is missing")

    (run_copy / "manifest.json").write_text("{not json")
    expect(r"manifest.json is damaged")
    assert Recognizer.load(run_copy).labels == labels and run.generation() == 1


def test_runs_without_a_manifest_still_load_and_newer_versions_are_named(run_copy):
    from pinsface import __version__

    (run_copy / "manifest.json").unlink()
    config = json.loads((run_copy / "config.json").read_text())
    assert config["pinsface_version"] == __version__
    del config["pinsface_version"]  # as written by pinsface 0.1
    (run_copy / "config.json").write_text(json.dumps(config))
    recognizer = Recognizer.load(run_copy)
    assert recognizer.generation == 0 and Run(run_copy).written_by() == "0.1.0"
    (run_copy / "config.json").write_text(json.dumps({**config, "pinsface_version": "99.0.0"}))
    with pytest.raises(RunError, match="written by pinsface 99.0.0, newer than this pinsface"):
        Recognizer.load(run_copy)


def test_training_does_not_change_the_callers_settings(small_dataset, tmp_path, detector):
    from pinsface.pipeline import train
    from pinsface.prepare import prepare
    from pinsface.settings import Settings

    settings = Settings(epochs=2, test_fraction=0.25, val_fraction=0.25)
    before = settings.to_dict()
    prepared = prepare(small_dataset, tmp_path / "cache", settings.faces, progress=False, detector=detector)
    result = train(out_dir=tmp_path / "run", settings=settings, progress=False, prepared=prepared)
    assert settings.to_dict() == before
    assert result["settings"].embedding_key and Run(tmp_path / "run").settings().data_dir == str(small_dataset)


def test_a_large_gallerys_index_is_saved_checked_and_reused(run_copy, pins_dir, monkeypatch, caplog):
    """Above FLAT_LIMIT faces (lowered here to the small run's size) the FAISS index is saved with the state,
    with its sha256 in the manifest; a load reuses it, and a damaged or missing one is rebuilt, not fatal."""
    from pinsface import face_index
    from pinsface.face_index import face_vectors

    monkeypatch.setattr(face_index, "FLAT_LIMIT", 0)
    manifest = json.loads((run_copy / "manifest.json").read_text())
    del manifest["index"], manifest["files"]["index"]  # as written before indexes were saved
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    run = Run(run_copy)
    state = run.load_state()  # it still loads, and builds its index
    assert state.gallery.face_index.kind == "ivf"
    assert state.gallery.face_index.source is None
    queries = face_vectors(state.gallery.val_embeddings, state.gallery.val_embeddings)
    expected = state.gallery.face_index.nearest_identities(queries, 3)

    run.save_state(state.labels, state.model, state.gallery, model_changed=False)
    manifest = run.manifest()
    index_file = run_copy / manifest["files"]["index"]
    assert manifest["index"]["bytes"] == index_file.stat().st_size and len(manifest["index"]["sha256"]) == 64
    loaded = run.load_state(model=False).gallery
    assert loaded.face_index.source == str(index_file)  # read, not rebuilt
    for a, b in zip(loaded.face_index.nearest_identities(queries, 3), expected):
        assert np.array_equal(a, b)

    # Enrolment adds to the loaded index in place; the next save writes the grown index.
    recognizer = Recognizer.load(run_copy, mode="gallery")
    index = recognizer.gallery.face_index
    recognizer.enroll("Ben Affleck", photos(pins_dir, "Ben Affleck", 6))
    assert recognizer.gallery.face_index is index and index.source == str(index_file)
    newer = run.manifest()  # the enrolment saved its change alone: the saved index stays, and grows on load
    assert newer["index"] == manifest["index"] and newer["deltas"]
    assert run.load_state(model=False).gallery.face_index.n == recognizer.gallery.size
    others = recognizer.identify_many(photos(pins_dir, "Ben Affleck", 4, start=20))
    assert sum(r.faces[0].identity == "Ben Affleck" for r in others if r.faces) >= 3

    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: FAISS would read it without complaint
    index_file.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="pinsface.runfolder"):
        tampered = run.load_state(model=False).gallery
    assert [r.message for r in caplog.records if "sha256 differs" in r.message and "rebuilt" in r.message]
    assert tampered._face_index is None and tampered.face_index.source is None  # rebuilt from the faces
    assert tampered.face_index.n == recognizer.gallery.size

    caplog.clear()
    index_file.unlink()
    with caplog.at_level("WARNING", logger="pinsface.runfolder"):
        assert run.load_state(model=False).gallery.face_index.source is None
    assert [r.message for r in caplog.records if "is missing" in r.message]

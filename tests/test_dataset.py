from collections import Counter

import pytest

from pinsface.dataset import (
    DataNotFoundError,
    Split,
    default_data_dir,
    identity_from_folder,
    identity_key,
    scan_dataset,
    split_dataset,
)
from tests.conftest import copy_identities


def test_identity_names_strip_pins_prefix_and_keep_everything_else():
    assert identity_from_folder("pins_Adriana Lima") == "Adriana Lima"
    assert identity_from_folder("pins_alycia dabnem carey") == "alycia dabnem carey"
    assert identity_from_folder("Brïe Lårson") == "Brïe Lårson"
    assert identity_key("pins_Amber Heard"[5:]) == identity_key("amber  heard")


def test_scan_counts_ignored_files_and_reports_empty_folders(tmp_path, pins_dir):
    root = copy_identities(tmp_path / "data", ["pins_Adriana Lima", "pins_Bill Gates"], 3)
    (root / "pins_Adriana Lima" / ".DS_Store").write_bytes(b"junk")
    (root / "pins_Adriana Lima" / "notes.txt").write_text("not a photo")
    (root / "pins_Empty Person").mkdir()
    (root / ".hidden_folder").mkdir()
    ds = scan_dataset(root)
    assert ds.identities == ["Adriana Lima", "Bill Gates"]
    assert len(ds.items) == 6
    assert ds.ignored == Counter({"hidden": 1, "not_image_extension": 1})
    assert ds.empty_folders == ["pins_Empty Person"]


def test_scan_reads_lowercase_and_mixed_originals(originals_dir):
    ds = scan_dataset(originals_dir)
    assert len(ds.items) == 50
    assert "alycia dabnem carey" in ds.identities and "amber heard" in ds.identities
    assert set(ds.counts().values()) == {5}


def test_missing_dataset_error_points_at_folder_and_kaggle(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError) as err:
        scan_dataset(tmp_path / "nope")
    assert "hereisburak/pins-face-recognition" in str(err.value)
    monkeypatch.delenv("PINSFACE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    import pinsface.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "__file__", str(tmp_path / "a" / "b" / "c.py"))
    with pytest.raises(DataNotFoundError) as err:
        default_data_dir()
    message = str(err.value)
    assert "PINSFACE_DATA" in message and "pinsface download" in message and "kaggle" in message.lower()


def test_pinsface_data_env_wins(tmp_path, monkeypatch):
    root = copy_identities(tmp_path / "d", ["pins_Bill Gates"], 1)
    monkeypatch.setenv("PINSFACE_DATA", str(root))
    assert default_data_dir() == root


def test_split_is_deterministic_stratified_and_stable_when_images_are_added(pins_dir, tmp_path):
    ds = scan_dataset(pins_dir)
    a = split_dataset(ds, seed=7)
    b = split_dataset(ds, seed=7)
    assert a.assignment == b.assignment
    assert split_dataset(ds, seed=8).assignment != a.assignment

    # Stratified: every identity gets close to 15% test and 80/20 train/val of the rest.
    for identity, n in ds.counts().items():
        rels = [it.rel for it in ds.items if it.identity == identity]
        shares = Counter(a.assignment[r] for r in rels)
        assert all(shares[s] > 0 for s in ("train", "val", "test")), identity
        assert abs(shares["test"] / n - 0.15) < 0.10, identity
        assert abs(shares["val"] / n - 0.17) < 0.10, identity
    overall = Counter(a.assignment.values())
    assert abs(overall["test"] / len(ds.items) - 0.15) < 0.01
    assert abs(overall["val"] / len(ds.items) - 0.85 * 0.2) < 0.01

    # Adding images never moves an existing one.
    small = copy_identities(tmp_path / "grow", ["pins_Adriana Lima", "pins_Bill Gates"], 20)
    before = split_dataset(scan_dataset(small), seed=3).assignment
    copy_identities(small, ["pins_Adriana Lima", "pins_Bill Gates"], 15, start=20)
    after = split_dataset(scan_dataset(small), seed=3).assignment
    assert len(after) == 70
    assert all(after[rel] == split for rel, split in before.items())


def test_split_round_trips_through_json(tmp_path, pins_dir):
    ds = scan_dataset(copy_identities(tmp_path / "d", ["pins_Bill Gates"], 10))
    split = split_dataset(ds, seed=1)
    split.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json").assignment == split.assignment


def test_download_without_kagglehub_or_credentials_says_what_is_missing(monkeypatch, tmp_path, capsys):
    import builtins
    import sys

    from pinsface.cli import main

    real_import = builtins.__import__

    def no_kagglehub(name, *args, **kwargs):
        if name == "kagglehub":
            raise ImportError("No module named 'kagglehub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "kagglehub", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_kagglehub)
    assert main(["download"]) == 1
    err = capsys.readouterr().err
    assert "pip install kagglehub" in err and "hereisburak/pins-face-recognition" in err

    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setitem(sys.modules, "kagglehub", type(sys)("kagglehub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    assert main(["download"]) == 1
    assert "no Kaggle credentials" in capsys.readouterr().err

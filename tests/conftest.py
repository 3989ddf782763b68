"""Shared fixtures: real Pins images from ../shared, copied into small temporary datasets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pinsface.testing.shared import pins_dir, shared_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = shared_dir()
PINS = pins_dir()
ORIGINALS = SHARED / "data" / "pins-originals"
REFERENCE = SHARED / "reference" / "dlib_face_chips.npz"


def _require(path: Path) -> Path:
    """``path`` under the shared data. Where it is missing (a user's sdist), the test is skipped with one line
    saying why; in CI, which always has it, a missing copy is a broken set-up and fails."""
    if not path.exists():
        message = f"test data missing: {path} (set PINSFACE_SHARED to the shared/ folder)"
        if os.environ.get("CI"):
            raise FileNotFoundError(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def pins_dir() -> Path:
    return _require(PINS)


@pytest.fixture(scope="session")
def originals_dir() -> Path:
    return _require(ORIGINALS)


@pytest.fixture(scope="session")
def reference_chips():
    import numpy as np

    return np.load(_require(REFERENCE))


def copy_identities(
    dest: Path, identities: list[str], per_identity: int, start: int = 0, rename: dict[str, str] | None = None
) -> Path:
    """Copy ``per_identity`` images of each Pins identity into ``dest/<folder>/``."""
    for folder in identities:
        files = sorted((_require(PINS) / folder).glob("*.jpg"))[start : start + per_identity]
        target = dest / (rename or {}).get(folder, folder)
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, target / f.name)
    return dest


SMALL_IDENTITIES = [
    "pins_Adriana Lima",
    "pins_Alex Lawther",
    "pins_Bill Gates",
    "pins_Brie Larson",
    "pins_Chris Evans",
    "pins_Anne Hathaway",
]


@pytest.fixture(scope="session")
def detector():
    from pinsface.faces import FaceDetector

    return FaceDetector()


@pytest.fixture(scope="session")
def backbone():
    from pinsface.backbones import get_backbone

    return get_backbone()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """Six real identities, 24 images each; one folder renamed to a non-ASCII name with spaces."""
    root = tmp_path_factory.mktemp("small") / "dataset"
    return copy_identities(root, SMALL_IDENTITIES, 24, rename={"pins_Brie Larson": "pins_Brïe Lårson é"})


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, small_dataset, detector):
    """A trained embedding run on the small dataset (few epochs), shared by the train/evaluate tests."""
    from pinsface.pipeline import train
    from pinsface.prepare import prepare
    from pinsface.settings import Settings

    base = tmp_path_factory.mktemp("run")
    settings = Settings(epochs=25, augment_views=1, test_fraction=0.25, val_fraction=0.25)
    prepared = prepare(small_dataset, base / "cache", settings.faces, progress=False, detector=detector)
    result = train(out_dir=base / "run", settings=settings, progress=False, prepared=prepared)
    return base / "run", result

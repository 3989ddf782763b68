"""Where the shared data is, for the tests and the benches: ``$PINSFACE_SHARED``, else ``shared`` beside the
checkout (the project's layout: ``../shared`` from the repository)."""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[3]  # src/pinsface/testing/shared.py -> the repository


def shared_dir() -> Path:
    return Path(os.environ.get("PINSFACE_SHARED", CHECKOUT.parent / "shared"))


def pins_dir() -> Path:
    """The 105 Pins identities' folder."""
    return shared_dir() / "data" / "pins" / "105_classes_pins_dataset"

"""Import TensorFlow without its C++ start-up notices on the user's terminal."""

from __future__ import annotations

import os
import sys


def import_tensorflow_quietly() -> None:
    """TensorFlow's C++ start-up notices ignore TF_CPP_MIN_LOG_LEVEL, so stderr is muted while it loads.
    A Python-level import error still surfaces: it is raised after stderr is restored.
    Set PINSFACE_TF_LOGS=1 to see the notices."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or os.environ.get("PINSFACE_TF_LOGS"):
        return
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr: nothing to protect
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)

"""Import TensorFlow quickly and without its C++ start-up notices on the user's terminal."""

from __future__ import annotations

import os
import sys

# Keras imports these at start-up when they are installed, only for its scikit-learn wrappers and its
# image-gallery helpers, which pinsface never uses. They cost about a second of every start, a third of
# Recognizer.load, so they stay hidden while TensorFlow loads and import normally afterwards.
OPTIONAL_KERAS_IMPORTS = ("sklearn", "matplotlib.pyplot")


def import_tensorflow_quietly() -> None:
    """TensorFlow's C++ start-up notices ignore TF_CPP_MIN_LOG_LEVEL, so stderr is muted while it loads.
    A Python-level import error still surfaces: it is raised after stderr is restored.
    Set PINSFACE_TF_LOGS=1 to see the notices."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    hidden = [name for name in OPTIONAL_KERAS_IMPORTS if name not in sys.modules]
    try:
        for name in hidden:
            sys.modules[name] = None  # `import name` now raises ImportError
        if os.environ.get("PINSFACE_TF_LOGS"):
            import tensorflow  # noqa: F401  (imported for its side effect: loaded once, quietly)
        else:
            _import_with_stderr_muted()
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _import_with_stderr_muted() -> None:
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr: nothing to protect
        saved = None
    try:
        if saved is not None:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
        import tensorflow  # noqa: F401  (imported for its side effect: loaded once, quietly)
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)

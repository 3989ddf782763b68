"""pinsface: offline face identification on folder-per-person photo collections."""

__version__ = "0.2.0"

from pinsface._tf import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

import pinsface.layers  # noqa: F401,E402  (registers the custom Keras layers for safe model loading)


def __getattr__(name: str):
    # Lazy, so `import pinsface` stays light until the recogniser is wanted.
    if name in ("Recognizer", "Face", "ImageResult"):
        from pinsface import predict

        return getattr(predict, name)
    raise AttributeError(name)

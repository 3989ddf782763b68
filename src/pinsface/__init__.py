"""pinsface: offline face identification, from one photo to a whole library.

A small public API (see docs/python-api.md)::

    import pinsface

    faces = pinsface.describe("group.jpg")          # every face, with box, landmarks and 128-d descriptor
    result = pinsface.verify("a.jpg", "b.jpg")      # same person?  result.same, result.distance
    recognizer = pinsface.Recognizer.load("runs/latest")   # a trained run: name faces or say "unknown"

``import pinsface`` is light: TensorFlow loads only when a model is first needed.
"""

__version__ = "0.3.0"

__all__ = [
    "BadImage",
    "BusyError",
    "DataNotFoundError",
    "DetectedFace",
    "ImageResult",
    "Face",
    "NoFaceError",
    "PinsfaceError",
    "Recognizer",
    "RunFolderError",
    "Settings",
    "SettingsError",
    "Verification",
    "describe",
    "detect",
    "distance",
    "load_image",
    "verify",
    "__version__",
]

# Where each public name lives; imported on first use so that ``import pinsface`` stays light.
_HOMES = {
    "BadImage": "pinsface.errors",
    "BusyError": "pinsface.errors",
    "DataNotFoundError": "pinsface.errors",
    "NoFaceError": "pinsface.errors",
    "PinsfaceError": "pinsface.errors",
    "RunFolderError": "pinsface.errors",
    "SettingsError": "pinsface.errors",
    "Settings": "pinsface.settings",
    "DetectedFace": "pinsface.api",
    "Verification": "pinsface.api",
    "describe": "pinsface.api",
    "detect": "pinsface.api",
    "distance": "pinsface.api",
    "load_image": "pinsface.api",
    "verify": "pinsface.api",
    "Recognizer": "pinsface.predict",
    "Face": "pinsface.predict",
    "ImageResult": "pinsface.predict",
}


def __getattr__(name: str):
    import importlib

    try:
        home = _HOMES[name]
    except KeyError:
        raise AttributeError(f"module 'pinsface' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

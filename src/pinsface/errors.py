"""Every error pinsface raises on purpose derives from ``PinsfaceError``, so a caller can catch them all at once.

Each also keeps the built-in type it replaced (``ValueError``, ``FileNotFoundError``, ...), so code written for
the built-in types still catches it.
"""

from __future__ import annotations


class PinsfaceError(Exception):
    """The base of every pinsface error."""


class SettingsError(PinsfaceError, ValueError):
    """Settings or command-line options that are not valid (an unknown key, a value out of range)."""


class BadImage(PinsfaceError):
    """An input that cannot be used as an image, with a machine-readable ``reason`` (``pinsface.images.REASONS``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class NoFaceError(PinsfaceError, ValueError):
    """An image in which no face was found, where one was needed (``pinsface.verify``)."""


class RunFolderError(PinsfaceError, ValueError):
    """A run folder that cannot be loaded as it is, with what is wrong and what to do."""


class BusyError(PinsfaceError, RuntimeError):
    """Another process holds the lock on a run folder or a cache."""


class DataNotFoundError(PinsfaceError, FileNotFoundError):
    """A dataset folder, or an input the user named, that does not exist."""

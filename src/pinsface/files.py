"""Saving files so that a crash leaves the old file or the new one, never a torn one, and tidying what a writer
that died left behind."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

# A temporary file older than this belongs to a writer that died (no save takes anywhere near this long).
STALE_TEMP_SECONDS = 3600.0


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[Path], None]) -> None:
    """Save ``content`` (bytes, UTF-8 text, or a function that writes a file at the path it is given) at ``path``:
    written to a temporary file beside it (same suffix, e.g. ``.keras``), flushed to disk, renamed over ``path``,
    and the folder flushed so the rename itself survives a power cut."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        elif isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            content(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(folder: Path, pattern: str) -> None:
    """Remove the files in ``folder`` matching ``pattern`` older than ``STALE_TEMP_SECONDS``. Only old ones: a
    young one may belong to a live writer, perhaps of an older pinsface that does not take the lock."""
    now = time.time()
    for tmp in Path(folder).glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()

"""The people named in a library as a folder-per-person dataset, so ``pinsface train --db`` trains from them
through the same pipeline as from folders: each named face is written as a crop around it (like the Pins
photos), in a folder named after its person."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pinsface.library_sheet import face_crop

# Of the face's size on each side: the crop frames the face as the Pins photos do, so it is the subject.
EXPORT_MARGIN = 0.4


def export_named_faces(faces: list[dict], folder) -> dict[str, int]:
    """Write each named face of ``faces`` (``LibraryDB.face_list``) to ``folder/<person>/face-<id>.jpg``; faces
    written per person. Crops already there are kept (the export is repeatable)."""
    from PIL import Image

    from pinsface.dataset import check_identity_name

    folder = Path(folder)
    counts: dict[str, int] = {}
    for f in faces:
        if not f["person"]:
            continue
        target = folder / check_identity_name(f["person"]) / f"face-{f['id']}.jpg"
        if not target.exists():
            crop = face_crop(f["source"], f["box"], EXPORT_MARGIN)
            if crop is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".jpg.tmp")
            with os.fdopen(fd, "wb") as fh:
                Image.fromarray(crop).save(fh, "JPEG", quality=95)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        counts[f["person"]] = counts.get(f["person"], 0) + 1
    return counts

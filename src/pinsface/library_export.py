"""The people named in a library, taken into a run: as a folder-per-person dataset, so ``pinsface train --db``
trains from them through the same pipeline as from folders (each named face is written as a crop around it, like
the Pins photos, in a folder named after its person); or enrolled into a run when a cluster is named
(``pinsface name --run`` and the server's People view)."""

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


def face_chips(faces: list[dict], face_settings, limit: int | None = None) -> tuple[list, list[str], list[dict]]:
    """The aligned chips of ``faces`` (``LibraryDB.face_list``; the ``limit`` with the best detector scores),
    each cut again from its photo: (chips, their content hashes, ``{"source", "reason"}`` of photos that could
    no longer be read)."""
    import hashlib

    import numpy as np

    from pinsface.face_records import crops_again
    from pinsface.faces import Detection
    from pinsface.images import BadImage

    if limit is not None:
        faces = sorted(faces, key=lambda f: -f["score"])[:limit]
    chips, skipped = [], []
    for f in faces:
        face = Detection(np.asarray(f["box"], np.float32), f["score"], np.asarray(f["landmarks"], np.float32))
        try:
            chips.append(crops_again([face], [0], f["source"], face_settings)[0][0])
        except BadImage as exc:
            skipped.append({"source": f["source"], "reason": exc.reason})
    # A face enrolled before (the same chip) is left out by its content hash, as a photo enrolled twice is.
    return chips, [hashlib.sha256(chip.tobytes()).hexdigest() for chip in chips], skipped


def enrol_chips(recognizer, name: str, chips: list, hashes: list[str]) -> dict:
    """Enrol ``chips`` (``face_chips``) under ``name`` into the ``recognizer``'s run, those enrolled before
    left out: the enrolment's summary with ``faces_used`` and ``already_enrolled``."""
    import numpy as np

    if not chips:
        raise ValueError(f"no face of {name!r} could be read again to enrol")
    known = recognizer.gallery.photo_hashes
    fresh, seen = [], set(known)
    for k, h in enumerate(hashes):
        if h not in seen:
            fresh.append(k)
            seen.add(h)
    if not fresh:
        return {"identity": name, "faces_used": 0, "already_enrolled": len(chips)}
    emb, emb_flip = recognizer.embed(np.stack([chips[k] for k in fresh]))
    summary = recognizer.enroll_faces(name, emb, emb_flip, [hashes[k] for k in fresh])
    return {**summary, "faces_used": len(fresh), "already_enrolled": len(chips) - len(fresh)}

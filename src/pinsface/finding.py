"""Photos -> the faces in them, ready to embed: decode at bounded scale, detect, retry a tight crop inside a border,
map back to full resolution, and cut each face's aligned chip.

The one path from a photo to its faces for naming (``pinsface.predict``) and for the public API
(``pinsface.api``); ``prepare`` finds faces with the same ``locate_faces``. Large photos are decoded at reduced
scale, and again finer only where a face is too small in that view for a good chip
(``pinsface.faces.refine_view``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from pinsface.faces import (
    Detection,
    align_face,
    detect_each,
    min_subject_size,
    refine_view,
    retry_tight_crops,
    to_full_face,
)
from pinsface.images import BadImage, Decoded, load_scaled
from pinsface.settings import DECODE_MIN_SIDE, FaceSettings

# Photos are decoded for naming at a scale whose shorter side is at least this (JPEG DCT scaling).
PHOTO_DECODE_MIN_SIDE = DECODE_MIN_SIDE
# Faces are named down to this fraction of a photo's shorter side (and FaceSettings.min_face_size pixels).
# MTCNN's time grows with the square of the smallest face's share of the photo (docs/benchmarks.md).
PHOTO_MIN_FACE_FRACTION = 0.025


@dataclass
class FoundFaces:
    """What one source gave: its faces (full-resolution pixels) and their aligned chips, or an ``error``."""

    source: str  # the source's name for display: its path, or <bytes> / <ndarray>
    faces: list[Detection] = field(default_factory=list)
    chips: list[np.ndarray] = field(default_factory=list)
    full_size: tuple[int, int] = (0, 0)  # (height, width) of the photo as stored, orientation applied
    error: str | None = None  # a BadImage reason, or detector_error
    note: str | None = None


def display_name(source) -> str:
    if not isinstance(source, (str, os.PathLike)):
        return f"<{type(source).__name__}>"
    return os.fsencode(source).decode("utf-8", "backslashreplace")  # a name that is not UTF-8 is shown escaped


def decode_photo(source, settings: FaceSettings) -> Decoded:
    """A photo decoded at bounded scale (``PHOTO_DECODE_MIN_SIDE``). Raises ``BadImage``."""
    return load_scaled(source, settings.max_pixels, PHOTO_DECODE_MIN_SIDE)


def min_face_px(view: Decoded, settings: FaceSettings) -> float:
    """The smallest face looked for in ``view``, in its own pixels."""
    return max(settings.min_face_size, PHOTO_MIN_FACE_FRACTION * min(view.full_size)) * min(view.scale)


def locate_faces(
    detector,
    views: list[Decoded],
    min_sizes: list[float],
    settings: FaceSettings,
    *,
    subject_sizes: list[float] | None = None,
    coarse_sizes: list[float] | None = None,
) -> list[list[Detection] | Exception]:
    """The one way pinsface finds faces in decoded photos, for naming (``find_faces``) and for ``prepare``
    (``face_records.image_records``): detect down to ``min_sizes`` (view pixels; coarse to fine where
    ``coarse_sizes`` is given), retry a tight crop inside a border where no face of ``subject_sizes`` was found,
    and map the faces back to the photo's full-resolution pixels. An entry is the detector's exception where
    that image alone failed."""
    pixels = [view.pixels for view in views]
    found = detect_each(detector, pixels, min_sizes, coarse_sizes) if views else []
    retry_sizes = min_sizes if subject_sizes is None else subject_sizes
    found = retry_tight_crops(detector, pixels, found, retry_sizes, settings, [view.full_size for view in views])
    return [
        faces if isinstance(faces, Exception) else [to_full_face(face, view) for face in faces]
        for faces, view in zip(found, views)
    ]


def find_faces(detector, sources: list, settings: FaceSettings) -> list[FoundFaces]:
    """Every face in each source (path, bytes or array), detected in one batch. A bad file or a detector failure
    is reported in its entry and never stops the others. Only the chips are kept, not the decoded photos."""
    found = [FoundFaces(display_name(source)) for source in sources]
    views: dict[int, Decoded] = {}
    for i, source in enumerate(sources):
        try:
            views[i] = decode_photo(source, settings)
        except BadImage as exc:
            found[i].error = exc.reason
    order = list(views)
    detected = locate_faces(
        detector,
        [views[i] for i in order],
        [min_face_px(views[i], settings) for i in order],
        settings,
        subject_sizes=[min_subject_size(views[i].full_size, settings) * min(views[i].scale) for i in order],
    )
    for i, faces in zip(order, detected):
        entry, view = found[i], views[i]
        entry.full_size = tuple(view.full_size)
        if isinstance(faces, Exception):  # this image alone failed in the detector: report it, go on
            entry.error, entry.note = "detector_error", f"{type(faces).__name__}: {faces}"
            continue
        entry.faces = faces
        entry.chips = chips(fine_enough(sources[i], view, entry.faces, settings), entry.faces, settings)
    return found


def chips(view: Decoded, faces: list[Detection], settings: FaceSettings) -> list[np.ndarray]:
    """The aligned chip of each face (given in full-resolution pixels) in ``view``."""
    return [align_face(view.pixels, view.from_full(face.landmarks), settings) for face in faces]


def fine_enough(source, view: Decoded, faces: list[Detection], settings: FaceSettings) -> Decoded:
    """``view``, or ``source`` decoded again finer where a face is too small in it for a good chip."""
    try:
        return refine_view(source, view, faces, settings)
    except BadImage:  # the file changed under us: use what was decoded
        return view

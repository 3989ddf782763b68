"""What enrolling or forgetting someone changes, as pure functions of a gallery copy and the head's arrays.

Enrolment adds the faces to the gallery and, in head mode, imprints the person's head column from them
(``pinsface.head``): nothing is trained and the calibrated thresholds stay as they are, so one person's
acceptance never moves because someone else came or went. ``pinsface refit`` retrains the head on demand.
Each function returns the new head, the ``GalleryChange`` to save and a summary.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from pinsface.gallery import Gallery, GalleryChange

# The naming threshold is set for a false-accept rate of several percent: at it, look-alikes of different
# people match. The warning asks for faces well within it, as the same person's photos are.
LOOKS_LIKE_FRACTION = 0.85


def photo_hash(image) -> str:
    """The sha256 of a photo's content: encoded bytes, a file's bytes, or a decoded array with its shape."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.sha256(image).hexdigest()
    if isinstance(image, np.ndarray):
        digest = hashlib.sha256(repr((image.shape, str(image.dtype))).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
        return digest.hexdigest()
    with open(os.fspath(image), "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _trained_faces(gallery: Gallery) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings and mirror embeddings, their identities) of the trained identities' enrolled faces."""
    trained = [gallery.find(name) for name in gallery.trained_labels]
    mine = np.isin(gallery.owner, [k for k in trained if k >= 0])
    owner = gallery.owner[mine].astype(np.int64)
    return np.concatenate([gallery.embeddings[mine], gallery.flips[mine]]), np.concatenate([owner, owner])


def enrol_change(gallery: Gallery, head, name: str, emb, emb_flip, hashes: list[str], *, imprint: bool = True):
    """Add faces under ``name`` to ``gallery`` (a copy, changed in place): (head, change, summary). A person
    enrolled after training gets their column imprinted from all their faces; a trained person keeps the
    column training gave them (their new faces still count in the distance check)."""
    change = GalleryChange("add", name, np.asarray(emb, np.float32), np.asarray(emb_flip, np.float32), list(hashes))
    before = len(gallery.labels)
    index = gallery.apply(change)
    summary = {"identity": gallery.labels[index], "new_identity": index == before}
    trained = gallery.labels[index] in gallery.trained_labels
    if not imprint or head is None or (trained and index < head.n_classes):
        return head, change, summary
    if not head.imprintable:
        raise ValueError("this run's head has no cosine logits and cannot be imprinted: enrol in gallery mode")
    if head.centre is None:
        head = head.with_reference(*_trained_faces(gallery))
    faces, flips = gallery.identity_faces(index)
    return head.imprint(index, np.concatenate([faces, flips])), change, summary


def forget_change(gallery: Gallery, head, name: str):
    """Remove ``name`` from ``gallery`` (a copy) and its column from the head: (head, change, summary)."""
    index = gallery.find(name)
    if index < 0:
        raise ValueError(f"{name!r} is not known to this run")
    removed = gallery.labels[index]
    change = GalleryChange("remove", removed)
    gallery.apply(change)
    return (head.without(index) if head is not None else None), change, {"identity": removed}


def looks_like(gallery: Gallery, name: str, emb: np.ndarray, emb_flip: np.ndarray) -> list[dict]:
    """Warnings for photos enrolled under a new name that most of them match one known person within the
    calibrated distance: perhaps the same person under another name."""
    if gallery.find(name) >= 0 or not len(emb) or not gallery.labels:
        return []
    d = gallery.distances(emb, emb_flip)
    nearest = np.argmin(d, 1)
    best = int(np.bincount(nearest).argmax())
    close = (nearest == best) & (d[:, best] <= LOOKS_LIKE_FRACTION * gallery.threshold_distance)
    if close.sum() * 2 <= len(emb):
        return []
    distance = round(float(np.median(d[close, best])), 4)
    who = gallery.labels[best]
    return [
        {
            "code": "looks_like_known",
            "identity": who,
            "distance": distance,
            "message": f"{int(close.sum())} of the {len(emb)} faces match {who}, who is already known "
            f"(distance {distance}): is this the same person?",
        }
    ]

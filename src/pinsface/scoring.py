"""How faces are scored against a run: by the head (with the gallery's distance check), or by the gallery alone.

Gallery mode has no head: a face is named as the identity with the smallest k-nearest-faces distance (see
``pinsface.gallery``), when that distance is within the calibrated ``threshold_distance``. It is meant for
galleries with more identities than a softmax head suits, where enrolment must not refit anything: the
FAISS index grows in place (``pinsface.face_index``). ``auto`` picks gallery mode above
``GALLERY_MODE_ABOVE`` identities.
"""

from __future__ import annotations

import numpy as np

MODES = ("auto", "head", "gallery")
# Identities above which "auto" means gallery mode. On the shared data (105 identities) the head names more
# test faces than the gallery (README, bench/openset.py), while refitting it on enrolment costs time in
# proportion to the enrolled faces: at this size a refit would already take minutes.
GALLERY_MODE_ABOVE = 1000


def resolve_mode(mode: str, n_identities: int) -> str:
    """``head`` or ``gallery``: ``mode`` itself, or for ``auto`` the one that suits ``n_identities``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "auto":
        return "gallery" if n_identities > GALLERY_MODE_ABOVE else "head"
    return mode


def nearest_identities(gallery, emb: np.ndarray, emb_flip: np.ndarray, top: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Gallery mode: (identities, distances), each (faces, top), by k-nearest-faces distance, nearest first."""
    from pinsface.gallery import face_vectors

    if len(emb) == 0:
        return np.zeros((0, top), np.int64), np.zeros((0, top), np.float32)
    return gallery.face_index.nearest_identities(face_vectors(emb, emb_flip), top)


def gallery_scores(gallery, emb: np.ndarray, emb_flip: np.ndarray, top: int = 5) -> np.ndarray:
    """Gallery mode as a (faces, identities) score matrix where larger is better, for the metrics written for
    class probabilities: minus the distance for each face's ``top`` nearest identities, -inf elsewhere."""
    ids, dists = nearest_identities(gallery, emb, emb_flip, top)
    scores = np.full((len(emb), len(gallery.labels)), -np.inf, np.float32)
    rows = np.repeat(np.arange(len(emb)), ids.shape[1])
    found = ids.ravel() >= 0
    scores[rows[found], ids.ravel()[found]] = -dists.ravel()[found]
    return scores


def calibrate_distance(gallery, target_far: float | None = None) -> float:
    """Gallery mode's only threshold: the distance that accepts ``target_far`` of the leave-one-out impostors."""
    if target_far is not None:
        gallery.target_far = target_far
    _, impostor = gallery.leave_one_out()
    impostor = impostor[np.isfinite(impostor)]
    gallery.threshold_distance = float(np.quantile(impostor, gallery.target_far, method="lower")) if len(
        impostor) else 10.0
    return gallery.threshold_distance

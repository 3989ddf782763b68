"""Scoring, in one place for training, evaluation, prediction and the server: the head's probabilities for
faces (averaged with their mirror images), top-k, and the rule that names a face or calls it unknown.

Faces are scored against a run in one of two modes: by the head (with the gallery's distance check), or by the
gallery alone. Gallery mode has no head: a face is named as the identity with the smallest k-nearest-faces
distance (see ``pinsface.gallery``), when that distance is within the calibrated ``threshold_distance``. It is
meant for galleries with more identities than a softmax head suits, where enrolment must not refit anything:
the FAISS index grows in place (``pinsface.face_index``). ``auto`` picks gallery mode above
``GALLERY_MODE_ABOVE`` identities."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pinsface.embeddings import ensure_embeddings, run_embedder, run_embedding_cache
from pinsface.prepare import Prepared, usable_status
from pinsface.settings import MODES, Settings

# Identities above which "auto" means gallery mode. On the shared data (105 identities) the head names more
# test faces than the gallery (docs/benchmarks.md, bench/openset.py), while refitting it on enrolment costs time in
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
    from pinsface.face_index import face_vectors

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
    gallery.threshold_distance = (
        float(np.quantile(impostor, gallery.target_far, method="lower")) if len(impostor) else 10.0
    )
    return gallery.threshold_distance


def run_head(head, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``head`` on a few or many embeddings. A direct call, because ``Model.predict`` costs tens of
    milliseconds per call whatever the input, which is most of the work for one photo's faces."""
    if len(x) == 0:
        return np.zeros((0, head.output_shape[-1]), np.float32)
    if not hasattr(head, "get_layer"):  # a pinsface.head.ArrayHead: plain arrays, no TensorFlow
        return np.concatenate([head(x[lo : lo + chunk]) for lo in range(0, len(x), chunk)])
    import keras

    return np.concatenate(
        [keras.ops.convert_to_numpy(head(x[lo : lo + chunk], training=False)) for lo in range(0, len(x), chunk)]
    )


def head_probabilities(head, emb: np.ndarray, emb_flip: np.ndarray | None = None) -> np.ndarray:
    """The head's probabilities for each face, averaged with its mirror image's when that is given."""
    probs = run_head(head, emb)
    return probs if emb_flip is None else (probs + run_head(head, emb_flip)) / 2


def checked_probabilities(head, emb: np.ndarray, emb_flip: np.ndarray, probs: np.ndarray, trained: np.ndarray):
    """The probabilities the threshold is checked on: for a trained identity, the head's probability among the
    trained identities alone (``head`` an ``ArrayHead``), as it was when the threshold was calibrated, so
    enrolling or forgetting someone else never moves a trained person's acceptance; enrolled identities keep
    ``probs``, the head's probabilities over everyone."""
    if trained.all() or not trained.any():
        return probs
    out = probs.copy()
    out[:, trained] = head_probabilities(head.columns(trained), emb, emb_flip)
    return out


def identity_scores(probs: np.ndarray, dists: np.ndarray, knn_weight: float, knn_tau: float) -> np.ndarray:
    """The head's probabilities blended with the nearest faces' evidence, (faces, identities), rows summing to 1:
    a softmax of ``(1 - w) log p - w d / tau``, where ``d`` is the k-nearest-faces distance. The head and the
    distances err on different faces, so the blend names more faces than either (weights chosen on validation
    at training time, see ``choose_blend``). With ``knn_weight`` 0 it is the head alone."""
    if not knn_weight:
        return probs
    z = (1 - knn_weight) * np.log(np.maximum(probs, 1e-9)) - knn_weight * np.where(
        np.isfinite(dists), dists, 1e3
    ) / knn_tau
    z = np.exp(z - z.max(1, keepdims=True))
    return (z / z.sum(1, keepdims=True)).astype(np.float32)


BLEND_WEIGHTS = (0.0, 0.25, 0.5, 0.75)
BLEND_TAUS = (0.02, 0.04, 0.08)


def choose_blend(probs: np.ndarray, dists: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(weight, tau, validation top-1) of the blend that names the most validation faces; the head alone wins
    ties. ``dists`` must come from a gallery without the validation faces themselves."""
    best = (-1.0, 0.0, BLEND_TAUS[0])
    for w in BLEND_WEIGHTS:
        for tau in BLEND_TAUS[:1] if w == 0 else BLEND_TAUS:
            accuracy = float(np.mean(np.argmax(identity_scores(probs, dists, w, tau), 1) == y)) if len(y) else 0.0
            if accuracy > best[0] + 1e-9:
                best = (accuracy, w, tau)
    return best[1], best[2], best[0]


def topk_correct(probs: np.ndarray, usable: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    top = np.argsort(-probs, axis=1)[:, :k]
    return usable & (top == y[:, None]).any(axis=1)


def accepted(probability: np.ndarray, distance: np.ndarray, min_probability: float, max_distance: float) -> np.ndarray:
    """Whether a face is named as its best identity: probable enough and close enough to its enrolled faces."""
    return (np.asarray(probability) >= min_probability) & (np.asarray(distance) <= max_distance)


@dataclass
class Match:
    """The outcome for one face: the best identity (named or not) and the runners-up, best first."""

    best: int
    probability: float | None  # None in gallery mode, which has no head
    distance: float
    accepted: bool
    alternatives: list[tuple[int, float | None, float]]  # (identity, probability, distance)


def match_faces(
    probs: np.ndarray,
    dists: np.ndarray,
    min_probability: float | np.ndarray,
    max_distance: float,
    top_k: int = 3,
    scores: np.ndarray | None = None,
) -> list[Match]:
    """Per face (rows of ``probs`` and ``dists``, faces x identities): its best identity and whether it is named.
    Identities are ranked by ``scores`` (``identity_scores``; default the head's probabilities); the thresholds
    apply to the head's probability and the distance of the identity ranked first. ``min_probability``: one
    for all, or one per identity (``Gallery.probability_thresholds``)."""
    per_identity = np.broadcast_to(np.asarray(min_probability, np.float32), (probs.shape[1],))
    out = []
    for p, d, q in zip(probs, dists, probs if scores is None else scores):
        order = np.argsort(-q)[: max(top_k, 1)]
        best = int(order[0])
        out.append(
            Match(
                best,
                float(p[best]),
                float(d[best]),
                bool(accepted(p[best], d[best], per_identity[best], max_distance)),
                [(int(k), float(p[k]), float(d[k])) for k in order[:top_k]],
            )
        )
    return out


def keep_trained_answers(
    matches: list[Match],
    checked: np.ndarray,
    dists: np.ndarray,
    min_probability: float | np.ndarray,
    max_distance: float,
    trained: np.ndarray,
    *,
    top_k: int = 3,
    blend: tuple[float, float] = (0.0, 1.0),
) -> list[Match]:
    """``matches`` (from ``match_faces`` over everyone), with the answer the trained identities alone give a
    face that ranks someone enrolled since training first, unless that person is named and either the trained
    answer is not, or the face is nearer to the enrolled person's photos in the gallery. Imprinted columns are
    not calibrated against the trained ones: without this a column that ranks first on a trained person's
    photo turns it into "unknown", or into the new person. So enrolling someone changes a face's answer only
    to them, and takes a face from a trained person only on the gallery's evidence.
    ``checked``: ``checked_probabilities``; ``blend``: the gallery's (knn_weight, knn_tau)."""
    rows = [k for k, m in enumerate(matches) if not trained[m.best]]
    if not rows or not trained.any():
        return matches
    cols = np.flatnonzero(trained)
    p, d = checked[np.ix_(rows, cols)], dists[np.ix_(rows, cols)]
    per_identity = np.broadcast_to(np.asarray(min_probability, np.float32), (len(trained),))[cols]
    out = list(matches)
    for k, alone in zip(rows, match_faces(p, d, per_identity, max_distance, top_k, identity_scores(p, d, *blend))):
        if matches[k].accepted and (not alone.accepted or matches[k].distance < alone.distance):
            continue
        others = [a for a in matches[k].alternatives if a[0] != cols[alone.best]]
        first = (int(cols[alone.best]), alone.probability, alone.distance)
        out[k] = Match(first[0], alone.probability, alone.distance, alone.accepted, [first, *others][:top_k])
    return out


def match_nearest(ids: np.ndarray, dists: np.ndarray, max_distance: float, top_k: int = 3) -> list[Match]:
    """Gallery mode: per face (rows of ``nearest_identities``), its nearest identity, named when close enough."""
    out = []
    for order, d in zip(ids, dists):
        found = order >= 0
        order, d = order[found], d[found]
        out.append(
            Match(
                int(order[0]),
                None,
                float(d[0]),
                bool(d[0] <= max_distance),
                [(int(k), None, float(v)) for k, v in zip(order[:top_k], d[:top_k])],
            )
        )
    return out


def score_images(
    model,
    settings: Settings,
    prepared: Prepared,
    items: np.ndarray,
    *,
    progress: bool = False,
    gallery=None,
    mode: str = "head",
    head=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities for dataset positions ``items`` and a mask of those that had a face to score.

    For the embedding model this runs the saved head on cached backbone embeddings (computing any that are
    missing), which is what the whole saved network computes from the aligned crop, at a fraction of the cost.
    ``head``: the run's head as it stands (``RunState.head``, people enrolled since training included); default
    the model's. With a ``gallery``, the head's probabilities are blended with its nearest faces as the gallery says
    (``identity_scores``), or in gallery ``mode`` replaced by gallery mode's scores (``gallery_scores``).
    """
    ok = usable_status(settings)
    usable = np.array([prepared.status[i] in ok for i in items], dtype=bool)
    head = head if head is not None else model.get_layer("head") if settings.model == "embedding" else None
    n_classes = (
        len(gallery.labels)
        if gallery is not None and mode == "gallery"
        else (model if head is None else head).output_shape[-1]
    )
    probs = np.zeros((len(items), n_classes), dtype=np.float32)
    hashes = [prepared.hashes[i] for i in items[usable]]
    if not hashes:
        return probs, usable
    if settings.model == "embedding":
        emb, emb_flip = ensure_embeddings(
            hashes,
            prepared.cache,
            run_embedding_cache(settings, prepared.cache.root),
            run_embedder(settings, model.get_layer(settings.backbone)),
            progress=progress,
        )
        if mode == "gallery":
            probs[usable] = gallery_scores(gallery, emb, emb_flip)
        else:
            p = head_probabilities(head, emb, emb_flip if settings.test_time_flip else None)
            if gallery is not None and gallery.knn_weight:
                p = identity_scores(p, gallery.distances(emb, emb_flip), gallery.knn_weight, gallery.knn_tau)
            probs[usable] = p
    else:
        faces = prepared.cache.load(hashes, crops=("box",))
        probs[usable] = model.predict(faces.columns["box"][faces.rows(hashes)][..., None], batch_size=512, verbose=0)
    return probs, usable

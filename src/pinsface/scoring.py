"""Scoring, in one place for training, evaluation, prediction and the server: the head's probabilities for
faces (averaged with their mirror images), top-k, and the rule that names a face or calls it unknown."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pinsface.embeddings import ensure_embeddings, run_embedder, run_embedding_cache
from pinsface.prepare import Prepared, usable_status
from pinsface.settings import Settings


def run_head(head, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``head`` on a few or many embeddings. A direct call, because ``Model.predict`` costs tens of
    milliseconds per call whatever the input, which is most of the work for one photo's faces."""
    import keras

    if len(x) == 0:
        return np.zeros((0, head.output_shape[-1]), np.float32)
    return np.concatenate([keras.ops.convert_to_numpy(head(x[lo:lo + chunk], training=False))
                           for lo in range(0, len(x), chunk)])


def head_probabilities(head, emb: np.ndarray, emb_flip: np.ndarray | None = None) -> np.ndarray:
    """The head's probabilities for each face, averaged with its mirror image's when that is given."""
    probs = run_head(head, emb)
    return probs if emb_flip is None else (probs + run_head(head, emb_flip)) / 2


def topk_correct(probs: np.ndarray, usable: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    top = np.argsort(-probs, axis=1)[:, :k]
    return usable & (top == y[:, None]).any(axis=1)


def accepted(probability: np.ndarray, distance: np.ndarray, min_probability: float,
             max_distance: float) -> np.ndarray:
    """Whether a face is named as its best identity: probable enough and close enough to its enrolled faces."""
    return (np.asarray(probability) >= min_probability) & (np.asarray(distance) <= max_distance)


@dataclass
class Match:
    """The outcome for one face: the best identity (named or not) and the runners-up, best first."""

    best: int
    probability: float
    distance: float
    accepted: bool
    alternatives: list[tuple[int, float, float]]  # (identity, probability, distance)


def match_faces(probs: np.ndarray, dists: np.ndarray, min_probability: float, max_distance: float,
                top_k: int = 3) -> list[Match]:
    """Per face (rows of ``probs`` and ``dists``, faces x identities): its best identity and whether it is named."""
    out = []
    for p, d in zip(probs, dists):
        order = np.argsort(-p)[:max(top_k, 1)]
        best = int(order[0])
        out.append(Match(best, float(p[best]), float(d[best]),
                         bool(accepted(p[best], d[best], min_probability, max_distance)),
                         [(int(k), float(p[k]), float(d[k])) for k in order[:top_k]]))
    return out


def score_images(model, settings: Settings, prepared: Prepared, items: np.ndarray,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities for dataset positions ``items`` and a mask of those that had a face to score.

    For the embedding model this runs the saved head on cached backbone embeddings (computing any that are
    missing), which is what the whole saved network computes from the aligned crop, at a fraction of the cost.
    """
    ok = usable_status(settings)
    usable = np.array([prepared.status[i] in ok for i in items], dtype=bool)
    probs = np.zeros((len(items), model.output_shape[-1]), dtype=np.float32)
    hashes = [prepared.hashes[i] for i in items[usable]]
    if not hashes:
        return probs, usable
    if settings.model == "embedding":
        emb, emb_flip = ensure_embeddings(hashes, prepared.cache, run_embedding_cache(settings, prepared.cache.root),
                                          run_embedder(settings, model.get_layer(settings.backbone)),
                                          progress=progress)
        probs[usable] = head_probabilities(model.get_layer("head"), emb,
                                           emb_flip if settings.test_time_flip else None)
    else:
        faces = prepared.cache.load(hashes, crops=("box",))
        probs[usable] = model.predict(faces.columns["box"][faces.rows(hashes)][..., None], batch_size=512,
                                      verbose=0)
    return probs, usable

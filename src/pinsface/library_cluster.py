"""Group unnamed faces into clusters of one person each, and keep the groups as new faces arrive.

The method (chosen by measurement: bench/cluster.py, docs/library.md) is mean-pair (average) linkage on a neighbour
graph: each face's nearest faces come from a FAISS index (``pinsface.face_index.FaceIndex``: exact up to a
limit, an inverted file above it), the edges shorter than ``EDGE_DISTANCE`` are taken shortest first, and an
edge joins its two groups only when the mean squared distance over every pair of faces across them (exact, from
each group's sum and sum of squares) is within ``CENTROID_DISTANCE`` squared, a little less for small groups.
Unlike single linkage (connected components, Chinese whispers) one close pair of strangers cannot chain two
people together: the groups have to be close as a whole.

Incremental (``cluster_library``): faces already in a cluster stay there, a new face joins the cluster whose
centre is nearest when within ``CENTROID_DISTANCE``, the rest are clustered among themselves into new clusters.
Named clusters keep their name; faces a person named, moved or unassigned are never moved.
"""

from __future__ import annotations

import numpy as np

from pinsface.face_index import FaceIndex
from pinsface.library_db import LibraryDB

# On the stored descriptors' scale; chosen with bench/cluster.py (docs/library.md).
NEIGHBOURS = 10
EDGE_DISTANCE = 0.7
# Two groups join when the root mean square distance over all pairs across them is within this, less
# SMALL_GROUPS / sqrt(pairs): a single pair of faces must be closer than two groups, whose mean is steadier.
CENTROID_DISTANCE = 0.6
SMALL_GROUPS = 0.1


def neighbour_graph(x: np.ndarray, k: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids) of each face's ``k`` nearest other faces (id -1 where there are fewer)."""
    index = FaceIndex(x, np.zeros(len(x), np.int64), 1, 1)
    dist, ids = index.search(x, min(k + 1, len(x)))
    own = ids == np.arange(len(x))[:, None]
    # Drop each face itself (wherever ties put it) and keep k others.
    dist = np.where(own, np.inf, dist)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, 1), np.where(
        np.isfinite(np.take_along_axis(dist, order, 1)), np.take_along_axis(ids, order, 1), -1
    )


def _edges(dist: np.ndarray, ids: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph's distinct edges shorter than ``limit``, shortest first: (a, b, distance)."""
    a = np.repeat(np.arange(len(ids)), ids.shape[1])
    b, d = ids.ravel(), dist.ravel()
    keep = (b >= 0) & (d < limit)
    a, b, d = a[keep], b[keep], d[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = lo.astype(np.int64) * len(ids) + hi
    key, first = np.unique(key, return_index=True)
    order = np.argsort(d[first], kind="stable")
    return lo[first][order], hi[first][order], d[first][order]


def mean_pair_linkage(
    x: np.ndarray,
    edge: float = EDGE_DISTANCE,
    centroid: float = CENTROID_DISTANCE,
    k: int = NEIGHBOURS,
    graph: tuple[np.ndarray, np.ndarray] | None = None,
    small: float = SMALL_GROUPS,
) -> np.ndarray:
    """Cluster labels 0..m-1 for the faces ``x`` (n, 128): see the module's docstring."""
    n = len(x)
    if n == 0:
        return np.zeros(0, np.int64)
    dist, ids = graph if graph is not None else neighbour_graph(x, k)
    a, b, _ = _edges(dist, ids, edge)
    parent = np.arange(n)
    sums = np.array(x, dtype=np.float64)
    squares = np.einsum("nd,nd->n", sums, sums)
    counts = np.ones(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(a.tolist(), b.tolist()):
        ri, rj = root(i), root(j)
        if ri == rj:
            continue
        # The mean squared distance over every pair across the two groups, from their sums alone.
        mean_sq = (
            squares[ri] / counts[ri] + squares[rj] / counts[rj] - 2 * (sums[ri] @ sums[rj]) / (counts[ri] * counts[rj])
        )
        bound = centroid - small / np.sqrt(counts[ri] * counts[rj])
        if mean_sq <= bound * bound:
            if counts[ri] < counts[rj]:
                ri, rj = rj, ri
            parent[rj] = ri
            sums[ri] += sums[rj]
            squares[ri] += squares[rj]
            counts[ri] += counts[rj]
    roots = np.array([root(i) for i in range(n)])
    return np.unique(roots, return_inverse=True)[1]


def join_existing(x: np.ndarray, sums: np.ndarray, squares: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """For each new face, the existing cluster (row of ``sums``, ``squares``: its faces' sum and sum of squared
    norms, ``counts``: its faces) it would join by ``mean_pair_linkage``'s rule, nearest first, else -1."""
    if not len(counts) or not len(x):
        return np.full(len(x), -1, np.int64)
    centres = (sums / counts[:, None]).astype(np.float32)
    _, ids = FaceIndex(centres, np.zeros(len(centres), np.int64), 1, 1).search(x, min(5, len(centres)))
    safe = np.maximum(ids, 0)
    norms = np.einsum("nd,nd->n", x, x)[:, None]
    mean_sq = norms + squares[safe] / counts[safe] - 2 * np.einsum("nd,nkd->nk", x, sums[safe]) / counts[safe]
    bound = CENTROID_DISTANCE - SMALL_GROUPS / np.sqrt(counts[safe])
    mean_sq = np.where((ids >= 0) & (mean_sq <= bound * bound), mean_sq, np.inf)
    best = np.argmin(mean_sq, axis=1)
    return np.where(np.isfinite(mean_sq[np.arange(len(x)), best]), ids[np.arange(len(x)), best], -1)


def cluster_library(db: LibraryDB) -> dict:
    """Cluster the library's unnamed faces incrementally (see the module's docstring); a summary."""
    state = db.cluster_state()
    face_ids, cluster_ids = state["face_ids"], state["cluster_ids"]
    x = db.descriptors(face_ids.tolist())
    clustered = cluster_ids >= 0
    new = np.flatnonzero(~clustered & state["movable"])
    existing, row = np.unique(cluster_ids[clustered], return_inverse=True)
    sums = np.zeros((len(existing), x.shape[1]), np.float64)
    np.add.at(sums, row, x[clustered])
    squares = np.bincount(row, np.einsum("nd,nd->n", x[clustered], x[clustered]), len(existing))
    joined = join_existing(x[new], sums, squares, np.bincount(row, minlength=len(existing)).astype(np.float64))
    moves = [(int(face_ids[f]), int(existing[c])) for f, c in zip(new, joined) if c >= 0]
    rest = new[joined < 0]
    labels = mean_pair_linkage(x[rest]) if len(rest) else np.zeros(0, np.int64)
    groups = [rest[labels == g] for g in range(int(labels.max()) + 1 if len(labels) else 0)]
    created = db.store_clusters(moves, [[int(face_ids[f]) for f in g] for g in groups])
    return {
        "faces": int(len(face_ids)),
        "new_faces": int(len(new)),
        "joined_existing": len(moves),
        "new_clusters": created,
        "clusters": int(db.cluster_count()),
    }

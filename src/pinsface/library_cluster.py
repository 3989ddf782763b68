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

from array import array
from math import sqrt

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
# Faces searched at a time: the index's answer for them (with its re-ranking candidates) is held at once. A multiple
# of the 4,096 queries FAISS's exact search takes together, so that each distance comes out as in one search of all.
SEARCH_BLOCK = 12 * 4096
# The share of the inverted file's lists each face's neighbour search reads, half the gallery's: the graph's
# edges come from both ends, and the search is most of the time at a million faces (bench/cluster.py --db-scale,
# docs/library.md).
GRAPH_PROBE_SHARE = 1 / 16
EDGE_BLOCK = 100_000  # edges turned into Python ints at a time
JOIN_BLOCK = 10_000  # new faces matched to existing clusters at a time (each gathers its 5 nearest clusters' sums)


def neighbour_graph(x: np.ndarray, k: int = NEIGHBOURS, block: int = SEARCH_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(distances float32, ids int32) of each face's ``k`` nearest other faces (id -1 where there are fewer),
    searched ``block`` faces at a time (a multiple of 4,096: see ``SEARCH_BLOCK``), which gives the graph of one
    search of all."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    index = FaceIndex(x, np.zeros(n, np.int64), 1, 1)
    index.probe(GRAPH_PROBE_SHARE)
    want = min(k + 1, n)
    width = min(k, want)
    dist = np.empty((n, width), np.float32)
    ids = np.empty((n, width), np.int32)
    for lo, hi in _blocks(n, block):
        d, i = index.search(x[lo:hi], want)
        # Drop each face itself (wherever ties put it) and keep k others.
        d = np.where(i == np.arange(lo, hi)[:, None], np.inf, d)
        order = np.argsort(d, axis=1, kind="stable")[:, :width]
        dist[lo:hi] = np.take_along_axis(d, order, 1)
        ids[lo:hi] = np.where(np.isfinite(dist[lo:hi]), np.take_along_axis(i, order, 1), -1)
    return dist, ids


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    """[lo, hi) of the blocks of ``n`` faces searched together: a small rest joins the block before it (FAISS
    computes a few queries directly, not in the tiles of a larger search)."""
    starts = list(range(0, n, block))
    if len(starts) > 1 and n - starts[-1] < block // 2:
        starts.pop()
    return list(zip(starts, starts[1:] + [n]))


def _edges(dist: np.ndarray, ids: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph's distinct edges shorter than ``limit``, shortest first: (a, b, distance), a < b, int32 ids."""
    n = len(ids)
    keep = (ids >= 0) & (dist < limit)
    a = np.repeat(np.arange(n, dtype=np.int32), keep.sum(1))
    b, d = ids[keep], dist[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    del a, b, keep
    # Each edge once (found from either end: the first found keeps its distance), then shortest first.
    _, first = np.unique(lo.astype(np.int64) * n + hi, return_index=True)
    lo, hi, d = lo[first], hi[first], d[first]
    order = np.argsort(d, kind="stable")
    return lo[order], hi[order], d[order]


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
    sums = np.array(x, dtype=np.float64)
    # Union-find and each group's count and sum of squared norms in flat arrays read per edge from Python:
    # scalar access to these is several times faster than to numpy's.
    parent = array("q", range(n))
    squares = array("d", np.einsum("nd,nd->n", sums, sums).tobytes())
    counts = array("d", [1.0]) * n
    groups = parent, sums, squares, counts
    for lo in range(0, len(a), EDGE_BLOCK):
        _link(a[lo : lo + EDGE_BLOCK].tolist(), b[lo : lo + EDGE_BLOCK].tolist(), groups, centroid, small)
    roots = np.frombuffer(parent, dtype=np.int64).copy()
    while True:
        up = roots[roots]
        if np.array_equal(up, roots):
            break
        roots = up
    return np.unique(roots, return_inverse=True)[1]


def _link(a: list[int], b: list[int], groups: tuple, centroid: float, small: float) -> None:
    """Take the edges (a[e], b[e]) in turn: join their two groups when close enough as a whole. ``groups``:
    (parent, sums, squares, counts) of the union-find, updated in place."""
    parent, sums, squares, counts = groups
    for i, j in zip(a, b):
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        while parent[j] != j:
            parent[j] = j = parent[parent[j]]
        if i == j:
            continue
        ci, cj = counts[i], counts[j]
        # The mean squared distance over every pair across the two groups, from their sums alone.
        mean_sq = squares[i] / ci + squares[j] / cj - 2 * (sums[i] @ sums[j]) / (ci * cj)
        bound = centroid - small / sqrt(ci * cj)
        if mean_sq <= bound * bound:
            if ci < cj:
                i, j = j, i
            parent[j] = i
            sums[i] += sums[j]
            squares[i] += squares[j]
            counts[i] = ci + cj


def join_existing(
    x: np.ndarray, sums: np.ndarray, squares: np.ndarray, counts: np.ndarray, block: int = JOIN_BLOCK
) -> np.ndarray:
    """For each new face, the existing cluster (row of ``sums``, ``squares``: its faces' sum and sum of squared
    norms, ``counts``: its faces) it would join by ``mean_pair_linkage``'s rule, nearest first, else -1."""
    out = np.full(len(x), -1, np.int64)
    if not len(counts) or not len(x):
        return out
    centres = (sums / counts[:, None]).astype(np.float32)
    index = FaceIndex(centres, np.zeros(len(centres), np.int64), 1, 1)
    for lo in range(0, len(x), block):
        part = np.asarray(x[lo : lo + block], dtype=np.float32)
        _, ids = index.search(part, min(5, len(centres)))
        safe = np.maximum(ids, 0)
        norms = np.einsum("nd,nd->n", part, part)[:, None]
        mean_sq = norms + squares[safe] / counts[safe] - 2 * np.einsum("nd,nkd->nk", part, sums[safe]) / counts[safe]
        bound = CENTROID_DISTANCE - SMALL_GROUPS / np.sqrt(counts[safe])
        mean_sq = np.where((ids >= 0) & (mean_sq <= bound * bound), mean_sq, np.inf)
        best = np.argmin(mean_sq, axis=1)
        rows = np.arange(len(part))
        out[lo : lo + block] = np.where(np.isfinite(mean_sq[rows, best]), ids[rows, best], -1)
    return out


def cluster_library(db: LibraryDB) -> dict:
    """Cluster the library's unnamed faces incrementally (see the module's docstring); a summary."""
    state = db.cluster_state()
    face_ids, cluster_ids = state["face_ids"], state["cluster_ids"]
    x, found = db.descriptors_in_chunks(face_ids)
    clustered = (cluster_ids >= 0) & found
    new = np.flatnonzero((cluster_ids < 0) & state["movable"] & found)
    existing, row = np.unique(cluster_ids[clustered], return_inverse=True)
    members = x[clustered]
    # Per column: bincount is several times faster than np.add.at over a million faces.
    sums = np.stack([np.bincount(row, members[:, d], len(existing)) for d in range(x.shape[1])], axis=1)
    squares = np.bincount(row, np.einsum("nd,nd->n", members, members), len(existing))
    del members
    joined = join_existing(x[new], sums, squares, np.bincount(row, minlength=len(existing)).astype(np.float64))
    del sums
    took = joined >= 0
    moves = list(zip(face_ids[new[took]].tolist(), existing[joined[took]].tolist()))
    rest = new[~took]
    # Only the faces clustered anew are held through the linkage (all of them, uncopied, on a first run).
    part = x if len(rest) == len(x) else x[rest]
    del x
    labels = mean_pair_linkage(part) if len(rest) else np.zeros(0, np.int64)
    del part
    order = np.argsort(labels, kind="stable")
    groups = np.split(face_ids[rest[order]], np.flatnonzero(np.diff(labels[order])) + 1) if len(rest) else []
    created = db.store_clusters(moves, [g.tolist() for g in groups])
    return {
        "faces": int(len(face_ids)),
        "new_faces": int(len(new)),
        "joined_existing": len(moves),
        "new_clusters": created,
        "clusters": int(db.cluster_count()),
    }

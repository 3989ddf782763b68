"""Group unnamed faces into clusters of one person each, and keep the groups as new faces arrive.

The method (chosen by measurement: bench/cluster.py, docs/library.md) is mean-pair (average) linkage on a neighbour
graph, then refinement. Each face's nearest faces come from a FAISS index (``pinsface.face_index.FaceIndex``:
exact up to a limit, an inverted file above it), the edges shorter than ``EDGE_DISTANCE`` are taken shortest
first, and an edge joins its two groups only when the mean squared distance over every pair of faces across them
(exact, from each group's sum and sum of squares) is within a bound squared: ``CENTROID_DISTANCE``, a little less
for small groups; and when their mean faces are close (``CENTRE_NOISE``, ``CENTRE_GAP``); both scaled by how
crowded the groups' surroundings are (``spacing``). Unlike single linkage (connected components, Chinese
whispers) one close pair of strangers cannot chain two people together: the groups have to be close as a whole.
``refine`` then lets each face move to a neighbouring group that fits it better than its own (by the same rule,
or by its neighbours' vote). Two faces of one photo are two people: no group ever holds both.

Incremental (``cluster_library``): faces already in a cluster stay there, a new face joins the nearest cluster
that the linkage's rule accepts, the rest are clustered among themselves (linkage, then refinement) into new
clusters. A face's spacing is measured once, among all the library's faces when it first comes, and stored with
it (``faces.reach``), so a later run searches only the new faces' neighbours. A new face never joins a cluster
holding a face of its photo. Named clusters keep their name; faces a person named, moved or unassigned are never
moved.
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
CENTROID_DISTANCE = 0.62
SMALL_GROUPS = 0.19
# And the squared distance between the two groups' mean faces must be within CENTRE_NOISE * (1/size + 1/size) +
# CENTRE_GAP (spacing applied as above): for large groups the mean pair distance hides a small gap between two
# tight people, while the means' distance shows it, less and less blurred by the faces' own spread as groups grow.
CENTRE_NOISE = 0.3
CENTRE_GAP = 0.05
# The bound is multiplied by the groups' mean spacing to this power: where faces crowd, strangers are close too.
DENSITY = 0.5
SPACING_RANGE = (0.25, 4.0)  # spacings clipped to this (duplicated faces have none; a lone face is far from all)
# Faces searched at a time: the index's answer for them (with its re-ranking candidates) is held at once. A multiple
# of the 4,096 queries FAISS's exact search takes together, so that each distance comes out as in one search of all.
SEARCH_BLOCK = 12 * 4096
# The share of the inverted file's lists each face's neighbour search reads, half the gallery's: the graph's
# edges come from both ends, and the search is most of the time at a million faces (bench/cluster.py --db-scale,
# docs/library.md).
GRAPH_PROBE_SHARE = 1 / 16
EDGE_BLOCK = 100_000  # edges turned into Python ints at a time
JOIN_BLOCK = 10_000  # faces matched to clusters at a time (each gathers its candidate clusters' sums)
# refine also moves a face to a group that holds this share of its graph neighbours, within this root mean square
# distance, where the linkage's rule would not: a person's faces are each other's neighbours, a stranger's seldom.
VOTE_SHARE = 0.7
VOTE_DISTANCE = 0.64
REFINE_ROUNDS = 5  # rounds of moving faces to better groups after the linkage, at most (it stops once none moves)


def neighbour_graph(
    x: np.ndarray, k: int = NEIGHBOURS, block: int = SEARCH_BLOCK, of: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(distances float32, ids int32) of each face's ``k`` nearest other faces (id -1 where there are fewer),
    searched ``block`` faces at a time (a multiple of 4,096: see ``SEARCH_BLOCK``), which gives the graph of one
    search of all. ``of``: only these faces' rows (positions in ``x``), searched among all of ``x``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    rows = np.arange(n) if of is None else np.asarray(of, np.int64)
    index = FaceIndex(x, np.zeros(n, np.int64), 1, 1)
    index.probe(GRAPH_PROBE_SHARE)
    want = min(k + 1, n)
    width = min(k, want)
    dist = np.empty((len(rows), width), np.float32)
    ids = np.empty((len(rows), width), np.int32)
    for lo, hi in _blocks(len(rows), block):
        d, i = index.search(x[rows[lo:hi]], want)
        # Drop each face itself (wherever ties put it) and keep k others.
        d = np.where(i == rows[lo:hi, None], np.inf, d)
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


def reach(dist: np.ndarray) -> np.ndarray:
    """Each face's distance to the farthest of its graph neighbours (its ``NEIGHBOURS``-th nearest face); NaN for
    a face without neighbours."""
    far = np.where(np.isfinite(dist), dist, -1.0).max(axis=1, initial=-1.0).astype(np.float64)
    return np.where(far >= 0, far, np.nan)


def spacing(reaches: np.ndarray) -> np.ndarray:
    """Each face's ``reach`` over the median of them, clipped to ``SPACING_RANGE``: below 1 where faces crowd,
    above 1 where they are sparse. A face without neighbours (reach NaN) gets 1."""
    far = np.asarray(reaches, np.float64)
    has = np.isfinite(far)
    median = float(np.median(far[has])) if has.any() else 1.0
    return np.where(has, np.clip(np.nan_to_num(far) / max(median, 1e-12), *SPACING_RANGE), 1.0)


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
    k: int = NEIGHBOURS,
    *,
    graph: tuple[np.ndarray, np.ndarray] | None = None,
    spaced: np.ndarray | None = None,
    photos: np.ndarray | None = None,
    rule: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Cluster labels 0..m-1 for the faces ``x`` (n, 128): see the module's docstring. ``spaced``: each face's
    ``spacing`` (from ``graph`` when not given). ``photos``: each face's photo; two faces of one photo are two
    people, so no group ever holds both. ``rule``: (CENTROID_DISTANCE, SMALL_GROUPS, CENTRE_NOISE, CENTRE_GAP),
    these constants by default."""
    n = len(x)
    if n == 0:
        return np.zeros(0, np.int64)
    dist, ids = graph if graph is not None else neighbour_graph(x, k)
    a, b, _ = _edges(dist, ids, edge)
    spaced = spacing(reach(dist)) if spaced is None else spaced
    del dist, ids
    sums = np.array(x, dtype=np.float64)
    # Union-find and each group's count and sum of squared norms in flat arrays read per edge from Python:
    # scalar access to these is several times faster than to numpy's.
    parent = array("q", range(n))
    squares = array("d", np.einsum("nd,nd->n", sums, sums).tobytes())
    counts = array("d", [1.0]) * n
    spaces = array("d", np.asarray(spaced, np.float64).tobytes())
    # Per group: the squared norm of its sum (a face's own squared norm to start with).
    groups = parent, sums, squares, counts, spaces, _shared(photos), array("d", squares)
    rule = rule or (CENTROID_DISTANCE, SMALL_GROUPS, CENTRE_NOISE, CENTRE_GAP)
    for lo in range(0, len(a), EDGE_BLOCK):
        _link(a[lo : lo + EDGE_BLOCK].tolist(), b[lo : lo + EDGE_BLOCK].tolist(), groups, rule)
    roots = np.frombuffer(parent, dtype=np.int64).copy()
    while True:
        up = roots[roots]
        if np.array_equal(up, roots):
            break
        roots = up
    return np.unique(roots, return_inverse=True)[1]


def cluster_faces(
    x: np.ndarray,
    spaced: np.ndarray | None = None,
    photos: np.ndarray | None = None,
    graph: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Cluster labels for the faces ``x``: ``mean_pair_linkage``, then ``refine``. ``spaced``: each face's
    ``spacing`` (from the graph when not given); ``photos``: each face's photo; ``graph``: ``neighbour_graph(x)``
    where already made."""
    graph = graph if graph is not None else neighbour_graph(x)
    spaced = spacing(reach(graph[0])) if spaced is None else spaced
    labels = mean_pair_linkage(x, graph=graph, spaced=spaced, photos=photos)
    return refine(x, labels, graph, spaced, photos)


def _shared(photos: np.ndarray | None) -> dict[int, set[int]]:
    """For the faces whose photo holds another of the faces: face -> {its photo}, the photos of each group that
    ``_link`` keeps apart (a group of faces from one-face photos needs no set)."""
    if photos is None or not len(photos):
        return {}
    photos = np.asarray(photos, np.int64)
    _, where, count = np.unique(photos, return_inverse=True, return_counts=True)
    faces = np.flatnonzero(count[where] > 1)
    return {int(f): {int(p)} for f, p in zip(faces, photos[faces])}


def _merge_photos(shared: dict[int, set[int]], i: int, j: int) -> bool:
    """False where groups ``i`` and ``j`` hold faces of one photo; else their photo sets become ``i``'s (the
    smaller set is added to the larger) and True."""
    mine, theirs = shared.get(i), shared[j]
    if mine is not None and not mine.isdisjoint(theirs):
        return False
    del shared[j]
    if mine is None:
        shared[i] = theirs
    elif len(mine) >= len(theirs):
        mine |= theirs
    else:
        theirs |= mine
        shared[i] = theirs
    return True


def _link(a: list[int], b: list[int], groups: tuple, rule: tuple[float, float, float, float]) -> None:
    """Take the edges (a[e], b[e]) in turn: join their two groups when close enough as a whole and no photo has a
    face in both. ``groups``: (parent, sums, squares, counts, spacings summed, photos shared: see ``_shared``,
    squared norms of the sums) of the union-find, updated in place; ``rule``: (CENTROID_DISTANCE, SMALL_GROUPS,
    CENTRE_NOISE, CENTRE_GAP)."""
    parent, sums, squares, counts, spaces, shared, norms = groups
    centroid, small, noise, gap = rule
    for i, j in zip(a, b):
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        while parent[j] != j:
            parent[j] = j = parent[parent[j]]
        if i == j:
            continue
        ci, cj = counts[i], counts[j]
        dot = sums[i] @ sums[j]
        # The mean squared distance over every pair across the two groups, from their sums alone.
        mean_sq = squares[i] / ci + squares[j] / cj - 2 * dot / (ci * cj)
        spread = ((spaces[i] + spaces[j]) / (ci + cj)) ** DENSITY
        bound = (centroid - small / sqrt(ci * cj)) * spread
        if mean_sq > bound * bound:
            continue
        apart = norms[i] / (ci * ci) + norms[j] / (cj * cj) - 2 * dot / (ci * cj)
        if apart > (noise * (1 / ci + 1 / cj) + gap) * spread * spread:
            continue
        if ci < cj:
            i, j = j, i
        if j in shared and not _merge_photos(shared, i, j):
            continue
        parent[j] = i
        sums[i] += sums[j]
        squares[i] += squares[j]
        spaces[i] += spaces[j]
        norms[i] += norms[j] + 2 * dot
        counts[i] = ci + cj


def _fits(x: np.ndarray, spaced: np.ndarray, clusters: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(mean squared distance, whether ``mean_pair_linkage``'s rule would join them) from each face ``x[i]`` to
    each of its candidate groups. ``spaced``: each face's ``spacing``; ``clusters``: (sums (n, k, d), squares,
    counts, spaces (n, k)), per candidate group its faces' sum, sum of squared norms, number (at least one) and
    sum of spacings."""
    sums, squares, counts, spaces = clusters
    norms = np.einsum("nd,nd->n", x, x)[:, None]
    dots = np.einsum("nd,nkd->nk", x, sums)
    mean_sq = norms + squares / counts - 2 * dots / counts
    spread = ((spaces + spaced[:, None]) / (counts + 1)) ** DENSITY
    bound = (CENTROID_DISTANCE - SMALL_GROUPS / np.sqrt(counts)) * spread
    apart = norms - 2 * dots / counts + np.einsum("nkd,nkd->nk", sums, sums) / (counts * counts)
    near = apart <= (CENTRE_NOISE * (1 + 1 / counts) + CENTRE_GAP) * spread * spread
    return mean_sq, (mean_sq <= bound * bound) & near


def join_existing(x: np.ndarray, spaced: np.ndarray, clusters: tuple, block: int = JOIN_BLOCK) -> np.ndarray:
    """For each new face (``spaced``: its ``spacing``), the existing cluster it would join by
    ``mean_pair_linkage``'s rule, nearest first, else -1. ``clusters``: (sums, squares, counts, spaces), per
    cluster its faces' sum, sum of squared norms, number and sum of spacings."""
    sums, squares, counts, spaces = clusters
    out = np.full(len(x), -1, np.int64)
    if not len(counts) or not len(x):
        return out
    centres = (sums / counts[:, None]).astype(np.float32)
    index = FaceIndex(centres, np.zeros(len(centres), np.int64), 1, 1)
    for lo in range(0, len(x), block):
        part = np.asarray(x[lo : lo + block], dtype=np.float64)
        _, ids = index.search(part.astype(np.float32), min(5, len(centres)))
        safe = np.maximum(ids, 0)
        mean_sq, joins = _fits(part, spaced[lo : lo + block], (sums[safe], squares[safe], counts[safe], spaces[safe]))
        fit = np.where((ids >= 0) & joins, mean_sq, np.inf)
        best = np.argmin(fit, axis=1)
        rows = np.arange(len(part))
        out[lo : lo + block] = np.where(np.isfinite(fit[rows, best]), ids[rows, best], -1)
    return out


def refine(
    x: np.ndarray,
    labels: np.ndarray,
    graph: tuple[np.ndarray, np.ndarray],
    spaced: np.ndarray,
    photos: np.ndarray | None = None,
    rounds: int = REFINE_ROUNDS,
) -> np.ndarray:
    """``mean_pair_linkage``'s ``labels`` after each face may move to a better group: one its graph neighbours
    are in, of two faces or more, whose faces are nearer to it on average than its own group's others, and that
    either the linkage's rule would join it to or that holds ``VOTE_SHARE`` of its graph neighbours within
    ``VOTE_DISTANCE`` (root mean square); the nearest such. Faces move together, ``rounds`` times at most or
    until none moves; a move that would put two faces of one photo in a group is not made. The linkage joins
    whole groups and never takes a face out again: a face left alone, or put early with a neighbour's small
    group, stays so without this."""
    labels = np.unique(labels, return_inverse=True)[1]
    norms = np.einsum("nd,nd->n", x, x, dtype=np.float64)
    for _ in range(rounds):
        groups = _group_sums(x, labels, int(labels.max(initial=-1)) + 1, norms, spaced)
        moved = labels.copy()
        for lo, hi in _blocks(len(x), JOIN_BLOCK):
            faces = (np.asarray(x[lo:hi], np.float64), norms[lo:hi], spaced[lo:hi], labels[lo:hi])
            moved[lo:hi] = _better_groups(faces, labels, graph[1][lo:hi], groups)
        del groups
        if photos is not None:
            _keep_photo_mates_apart(moved, labels, np.asarray(photos, np.int64))
        if np.array_equal(moved, labels):
            break
        labels = np.unique(moved, return_inverse=True)[1]
    return labels


def _group_sums(x: np.ndarray, labels: np.ndarray, m: int, norms: np.ndarray, spaced: np.ndarray) -> tuple:
    """(sums, squares, counts, spaces) of groups 0..m-1: per group, the sum of its faces ``x`` (by ``labels``),
    of their squared ``norms``, their number and the sum of their ``spacing``s. Per column: bincount is several
    times faster than np.add.at over a million faces."""
    return (
        np.stack([np.bincount(labels, x[:, d], m) for d in range(x.shape[1])], axis=1),
        np.bincount(labels, norms, m),
        np.bincount(labels, minlength=m).astype(np.float64),
        np.bincount(labels, spaced, m),
    )


def _better_groups(faces: tuple, labels: np.ndarray, near: np.ndarray, groups: tuple) -> np.ndarray:
    """``refine``'s choice for some faces: each one's new group, or its own. ``faces``: their (descriptors,
    squared norms, ``spacing``s, groups); ``near``: their graph neighbours; ``groups``: (sums, squares, counts,
    spaces) per group."""
    x, norms, spaced, own = faces
    sums, squares, counts, spaces = groups
    cand = np.where(near >= 0, labels[np.maximum(near, 0)], own[:, None])
    size = counts[cand]
    mean_sq, joins = _fits(x, spaced, (sums[cand], squares[cand], np.maximum(size, 1), spaces[cand]))
    share = (cand[:, :, None] == cand[:, None, :]).sum(axis=2) / near.shape[1]
    voted = (share >= VOTE_SHARE) & (mean_sq <= VOTE_DISTANCE**2)
    fit = np.where(joins | voted, mean_sq, np.inf)
    # Its own group's other faces: their mean squared distance to it (inf for a face alone).
    others = counts[own] - 1
    dots = np.einsum("nd,nd->n", x, sums[own]) - norms
    stay = np.where(others > 0, norms + (squares[own] - norms - 2 * dots) / np.maximum(others, 1), np.inf)
    fit = np.where((cand != own[:, None]) & (size >= 2) & (fit < stay[:, None]), fit, np.inf)
    best = np.argmin(fit, axis=1)
    rows = np.arange(len(x))
    return np.where(np.isfinite(fit[rows, best]), cand[rows, best], own)


def _keep_photo_mates_apart(moved: np.ndarray, before: np.ndarray, photos: np.ndarray) -> None:
    """Undo (in ``moved``) the moves that put a face in a group with a face of its photo: every face of such a
    pair that moved goes back to its group ``before``, until no pair is left (``before`` has none)."""
    while True:
        key = moved * (int(photos.max(initial=0)) + 1) + photos
        _, where, count = np.unique(key, return_inverse=True, return_counts=True)
        clash = (count[where] > 1) & (moved != before)
        if not clash.any():
            return
        moved[clash] = before[clash]


def _part_photo_mates(joined: np.ndarray, photos: np.ndarray, member_rows: np.ndarray, member_photos) -> None:
    """Undo (set to -1) the joins of new faces to a cluster that already holds a face of their photo, or that an
    earlier new face of their photo joined: two faces of one photo are two people."""
    wanted = np.flatnonzero(joined >= 0)
    if not len(wanted):
        return
    mates = np.isin(member_photos, photos[wanted])
    taken = set(zip(member_rows[mates].tolist(), member_photos[mates].tolist()))
    for k in wanted.tolist():
        key = (int(joined[k]), int(photos[k]))
        if key in taken:
            joined[k] = -1
        else:
            taken.add(key)


def cluster_library(db: LibraryDB) -> dict:
    """Cluster the library's unnamed faces incrementally (see the module's docstring); a summary."""
    state = db.cluster_state()
    face_ids, cluster_ids = state["face_ids"], state["cluster_ids"]
    x, found = db.descriptors_in_chunks(face_ids)
    # Spacing among all the library's faces: each face's reach is measured once, among the faces there when it
    # first came (a first run: the library's graph, kept for the linkage), and stored.
    pool = np.flatnonzero(found)
    reaches = state["reach"]
    unmeasured = pool[np.isnan(reaches[pool])]
    faces = x if len(pool) == len(x) else x[pool]  # no copy of a million descriptors where all are found
    graph = neighbour_graph(faces) if len(unmeasured) == len(pool) else None
    if len(unmeasured):
        at = np.searchsorted(pool, unmeasured)
        reaches[unmeasured] = reach(graph[0] if graph is not None else neighbour_graph(faces, of=at)[0])
    del faces
    spaced = np.ones(len(x))
    spaced[pool] = spacing(reaches[pool])
    clustered = (cluster_ids >= 0) & found
    new = np.flatnonzero((cluster_ids < 0) & state["movable"] & found)
    existing, row = np.unique(cluster_ids[clustered], return_inverse=True)
    members = x[clustered]
    clusters = _group_sums(members, row, len(existing), np.einsum("nd,nd->n", members, members), spaced[clustered])
    del members
    joined = join_existing(x[new], spaced[new], clusters)
    del clusters
    _part_photo_mates(joined, state["photo_ids"][new], row, state["photo_ids"][clustered])
    took = joined >= 0
    moves = list(zip(face_ids[new[took]].tolist(), existing[joined[took]].tolist()))
    rest = new[~took]
    # Only the faces clustered anew are held through the linkage; on a first run (every face new and none
    # joined) all of them, uncopied, with the library's graph.
    first = len(rest) == len(x)
    part, graph = (x, graph) if first else (x[rest], None)
    del x
    labels = cluster_faces(part, spaced[rest], state["photo_ids"][rest], graph) if len(rest) else np.zeros(0, np.int64)
    del part, graph
    order = np.argsort(labels, kind="stable")
    groups = np.split(face_ids[rest[order]], np.flatnonzero(np.diff(labels[order])) + 1) if len(rest) else []
    measured = [(float(r), int(f)) for r, f in zip(reaches[unmeasured], face_ids[unmeasured]) if np.isfinite(r)]
    created = db.store_clusters(moves, [g.tolist() for g in groups], measured)
    return {
        "faces": int(len(face_ids)),
        "new_faces": int(len(new)),
        "joined_existing": len(moves),
        "new_clusters": created,
        "clusters": int(db.cluster_count()),
        "stale_left": db.stale_faces(),
    }

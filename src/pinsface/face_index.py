"""Nearest-face search for the gallery on a FAISS index, and the k-nearest-faces distances built on it.

``pinsface.gallery`` scores a face against an identity by the mean distance to that identity's ``kk`` nearest
faces (``knn_distances``; ``kk`` is ``neighbours_scored``: ``knn``, or fewer for an identity with few faces).
Computing that for every identity means comparing the face with every gallery face. Here a FAISS index
returns the face's ``k`` nearest gallery faces instead, and only the identities among them are scored:

- an identity with at least ``kk`` faces among the neighbours is scored from them, exactly (with exact search);
- an identity with fewer is scored exactly against all its own faces (a few dozen comparisons);
- an identity with no face among the neighbours is farther than the farthest neighbour, which bounds it. A face
  whose answer the bound cannot settle is searched again with more neighbours, then against every face.

Up to ``FLAT_LIMIT`` faces the index is exact (``IndexFlatL2``). Above it, an inverted file of 4-bit product
codes (``IndexIVFPQFastScan``) proposes candidates, and their exact distances (from the float descriptors kept
here) pick the nearest: the distances returned are exact, the candidates approximate, with a recall against
exact search measured by bench/gallery_scale.py. Faces are added in place (enrolment): the inverted file keeps
the lists and codebooks it was trained with and files each new face under its nearest list.

An index can be written to a file and read back (``write``, ``FaceIndex(..., saved=data)``); the run folder
decides when (``pinsface.runfolder``). FAISS's reader is C++ and trusts its input: callers hand it only bytes whose
checksum they recorded when writing them.
"""

from __future__ import annotations

import numpy as np

KNN = 5


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def face_vectors(emb: np.ndarray, emb_flip: np.ndarray) -> np.ndarray:
    """One descriptor per face: its embedding averaged with its mirror image's."""
    return (emb + emb_flip) / 2


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a @ b.T  # built in place: these matrices are the gallery's largest temporaries
    d *= -2
    d += (a * a).sum(1)[:, None]
    d += (b * b).sum(1)[None, :]
    np.maximum(d, 0, out=d)
    return np.sqrt(d, out=d)


def neighbours_scored(faces, k: int):
    """How many nearest faces an identity with ``faces`` gallery faces (an int, or an array of counts) is scored
    on: ``k``, or one per 10 faces for an identity with fewer than 10k, at least one."""
    return np.minimum(k, np.maximum(1, np.asarray(faces) // 10))


def knn_distances(d: np.ndarray, owner: np.ndarray, n_identities: int, k: int = KNN) -> np.ndarray:
    """(queries, identities): the mean of each identity's smallest entries in the rows of ``d`` (query x gallery
    face): its ``neighbours_scored`` nearest faces.
    Infinite entries (excluded faces) are skipped.

    The fewer faces an identity has, the farther its k-th nearest lies. For someone enrolled from 10 photos,
    the nearest face named 95% of their other photos at the calibrated distance (bench/openset.py), and the
    mean of the 5 nearest only 89%."""
    out = np.full((d.shape[0], n_identities), np.inf, dtype=np.float32)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(n_identities + 1))
    d = d[:, order]  # each identity's faces side by side: one copy, then slices
    for c in range(n_identities):
        lo, hi = bounds[c], bounds[c + 1]
        if hi == lo:
            continue
        kk = int(neighbours_scored(hi - lo, k))
        nearest = np.partition(d[:, lo:hi], kk - 1, axis=1)[:, :kk]
        finite = np.isfinite(nearest)
        count = finite.sum(1)
        total = np.where(finite, nearest, 0).sum(1)
        out[:, c] = np.where(count > 0, total / np.maximum(count, 1), np.inf)
    return out


# Faces up to which the index is exact. Exact search costs CPU in proportion to the gallery (bench/gallery_scale.py,
# figures in docs/benchmarks.md): up to about twice this size it still answers batches at the target rate on 2
# cores; an inverted file above it. Only the inverted file is worth saving with a run: a flat index is built by
# copying the faces.
FLAT_LIMIT = 50_000
# Inverted lists: about 4 sqrt(n), a power of two, with at least IVF_MIN_PER_LIST faces each to train on.
IVF_MIN_PER_LIST = 39
IVF_TRAIN_PER_LIST = 32  # k-means sees at most this many faces per list: training cost stays bounded
IVF_TRAIN_ITERATIONS = 10
IVF_PQ_BLOCKS = 64  # product-code sub-vectors (2 dimensions each, 4 bits): 32 bytes a face
# The share of the lists searched per query, and the candidates re-ranked exactly per neighbour asked for:
# recall against exact search and CPU per query both grow with them (bench/gallery_scale.py, docs/benchmarks.md).
IVF_PROBE_SHARE = 1 / 8
IVF_PROBE_MIN = 8
RERANK = 16
RERANK_MIN = 64
NEIGHBOURS = 32  # nearest faces fetched per query on the first pass
MAX_NEIGHBOURS = 512  # then up to this many, before comparing with every face
# Gallery faces above which leave-one-out calibration uses the index rather than all pairs (see bench/gallery_scale.py).
ALL_PAIRS_LIMIT = 20_000
# Impostor trials at most: above this, leave-one-out scores a fixed random sample of the faces against the other
# identities (the threshold is a quantile of these; 10^5 trials pin a 7% quantile to about +-0.1%).
IMPOSTOR_TRIALS = 100_000


def knn_counts(owner: np.ndarray, n_identities: int, knn: int) -> np.ndarray:
    """How many nearest faces each identity is scored on (see ``neighbours_scored``)."""
    return neighbours_scored(np.bincount(owner, minlength=n_identities), knn).astype(np.int64)


def ivf_lists(n: int) -> int:
    """Inverted lists for a gallery of ``n`` faces."""
    lists = 2 ** int(np.round(np.log2(max(4 * np.sqrt(n), 1))))
    while lists > 1 and lists * IVF_MIN_PER_LIST > n:
        lists //= 2
    return lists


def ivf_probe(lists: int, share: float = IVF_PROBE_SHARE) -> int:
    """Lists searched per query: a share of them, but never fewer than ``IVF_PROBE_MIN`` (all, in a small index)."""
    return max(min(lists, IVF_PROBE_MIN), round(lists * share))


def _sq_to_distance(d: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(d, 0)).astype(np.float32)


class FaceIndex:
    """The gallery's face descriptors (float32, one row per face) with their owners, searchable by FAISS."""

    def __init__(
        self,
        vectors: np.ndarray,
        owner: np.ndarray,
        n_identities: int,
        knn: int,
        *,
        flat_limit: int | None = None,
        threads: int | None = None,
        saved: bytes | None = None,
        source: str | None = None,
    ):
        """``saved``: the bytes of a file ``write`` made from this index's first rows (in this order), read from
        ``source``; the rows past them are added to it. Raises ``ValueError`` when it does not hold those faces."""
        import faiss

        if threads is not None:
            faiss.omp_set_num_threads(threads)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.dim = vectors.shape[1]
        self.knn = knn
        self.n_identities = n_identities
        self._vectors = np.zeros((0, self.dim), np.float32)
        self._owner = np.zeros(0, np.int64)
        self.n = 0
        self._groups = None
        self.validation = (len(vectors), 0)  # (first, count) of the validation faces among the ids
        self.source = source if saved is not None else None  # the file the index was read from, if any
        if saved is not None:
            self.index = self._read(saved, vectors)
            self.kind = "ivf"
        else:
            self.kind = "flat" if len(vectors) <= (FLAT_LIMIT if flat_limit is None else flat_limit) else "ivf"
            self.index = self._new_index(self.kind, vectors)
        self.add(vectors, owner, n_identities, indexed=self.index.ntotal)

    @staticmethod
    def _new_index(kind: str, vectors: np.ndarray):
        import faiss

        dim = vectors.shape[1]
        if kind == "flat":
            return faiss.IndexFlatL2(dim)
        lists = ivf_lists(len(vectors))
        index = faiss.IndexIVFPQFastScan(faiss.IndexFlatL2(dim), dim, lists, IVF_PQ_BLOCKS, 4)
        index.cp.niter = IVF_TRAIN_ITERATIONS
        index.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST  # FAISS samples the training faces (seeded)
        index.train(vectors)
        index.nprobe = ivf_probe(lists)
        return index

    def write(self, path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    def _read(self, data: bytes, vectors: np.ndarray):
        """The saved index, checked to hold ``vectors``' first rows: a sample of them is filed under the lists
        they are nearest to. ``vectors`` may continue past its last row (faces enrolled since)."""
        import faiss

        # From bytes the caller has checked, not from the path: the file could change after the check.
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if (
            not isinstance(index, faiss.IndexIVFPQFastScan)
            or index.d != self.dim
            or not 0 < index.ntotal <= len(vectors)
        ):
            raise ValueError(
                f"a {type(index).__name__} of {index.ntotal} {index.d}-d faces, not an inverted file of at most "
                f"{len(vectors)} {self.dim}-d faces"
            )
        rows = np.random.default_rng(0).choice(index.ntotal, min(16, index.ntotal), replace=False)
        lists = index.quantizer.assign(vectors[rows], 1)[:, 0]
        for row, at in zip(rows, lists):
            ids = faiss.rev_swig_ptr(index.invlists.get_ids(int(at)), index.invlists.list_size(int(at)))
            if row not in ids:
                raise ValueError("it does not hold the gallery's faces")
        index.nprobe = ivf_probe(index.nlist)
        return index

    def probe(self, share: float) -> None:
        """From now on search this share of an inverted file's lists per query (``ivf_probe``); an exact index stays
        exact."""
        if self.kind == "ivf":
            self.index.nprobe = ivf_probe(self.index.nlist, share)

    @property
    def vectors(self) -> np.ndarray:
        return self._vectors[: self.n]

    @property
    def owner(self) -> np.ndarray:
        return self._owner[: self.n]

    def add(self, vectors: np.ndarray, owner: np.ndarray, n_identities: int, indexed: int = 0) -> None:
        """Append faces (new rows get the next ids) in place: FAISS adds them to the index as it stands, all but
        the first ``indexed`` (a saved index holds them already)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        m = len(vectors)
        self.n_identities = max(n_identities, self.n_identities)
        if self.n + m > len(self._vectors):
            # A quarter more room than needed: enrolment rarely copies the whole gallery.
            capacity = self.n + m + (self.n + m) // 4 + 16
            grown = np.zeros((capacity, self.dim), np.float32)
            grown[: self.n] = self.vectors
            owners = np.zeros(capacity, np.int64)
            owners[: self.n] = self.owner
            self._vectors, self._owner = grown, owners
        self._vectors[self.n : self.n + m] = vectors
        self._owner[self.n : self.n + m] = owner
        self.n += m
        if m > indexed:
            self.index.add(vectors[indexed:])
        self._groups = None

    def _grouped(self):
        """(face ids sorted by owner, each identity's [lo, hi) bounds in it, faces each identity is scored on)"""
        if self._groups is None:
            owner = self.owner
            order = np.argsort(owner, kind="stable")
            bounds = np.searchsorted(owner[order], np.arange(self.n_identities + 1))
            self._groups = order, bounds, knn_counts(owner, self.n_identities, self.knn)
        return self._groups

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, face ids) of each query's ``k`` nearest faces, nearest first; id -1 where there are none."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, max(self.n, 1))
        if self.kind == "flat":
            d, ids = self.index.search(queries, k)
            return _sq_to_distance(d), ids
        _, candidates = self.index.search(queries, min(max(RERANK * k, RERANK_MIN), self.n))
        return self._rerank(queries, candidates, k)

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest of each query's candidates by exact distance (candidates -1 are none)."""
        n, c = candidates.shape
        d_out = np.full((n, k), np.inf, np.float32)
        ids_out = np.full((n, k), -1, np.int64)
        chunk = max(1, 2**24 // (c * self.dim * 4))  # at most 16 MB of gathered descriptors at a time
        for lo in range(0, n, chunk):
            cand = candidates[lo : lo + chunk]
            diff = self._vectors[np.maximum(cand, 0)] - queries[lo : lo + chunk, None, :]
            d = np.einsum("ncd,ncd->nc", diff, diff)
            d[cand < 0] = np.inf
            best = np.argsort(d, axis=1, kind="stable")[:, :k]
            top = np.take_along_axis(d, best, 1)
            ids = np.where(np.isfinite(top), np.take_along_axis(cand, best, 1), -1)
            d_out[lo : lo + chunk, : best.shape[1]] = _sq_to_distance(top)
            ids_out[lo : lo + chunk, : best.shape[1]] = ids
        return d_out, ids_out

    def exact_pairs(self, queries: np.ndarray, rows: np.ndarray, identities: np.ndarray) -> np.ndarray:
        """The k-nearest-faces distance of ``queries[rows[j]]`` to identity ``identities[j]``, against all the
        identity's faces (inf for an identity with none)."""
        order, bounds, kk_of = self._grouped()
        out = np.full(len(rows), np.inf, np.float32)
        by_identity = np.argsort(identities, kind="stable")
        ids_sorted = identities[by_identity]
        cuts = np.flatnonzero(np.r_[True, ids_sorted[1:] != ids_sorted[:-1], True])
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            c = int(ids_sorted[lo])
            f_lo, f_hi = bounds[c], bounds[c + 1]
            if f_hi == f_lo:
                continue
            pairs = by_identity[lo:hi]
            d = pairwise_distances(queries[rows[pairs]], self.vectors[order[f_lo:f_hi]])
            kk = int(kk_of[c])
            out[pairs] = np.partition(d, kk - 1, axis=1)[:, :kk].mean(1)
        return out

    def _candidates(self, queries, dist, ids, exclude_owner=None, exclude_id=None):
        """Score the identities among each query's neighbours: (row, identity, distance) triples, and each
        row's bound (the farthest neighbour's distance: identities not among the neighbours are farther)."""
        n, k = ids.shape
        valid = ids >= 0
        owner = np.where(valid, self.owner[np.maximum(ids, 0)], -1)
        complete = valid.all(1) & (k < self.n)
        bound = np.where(complete, dist[:, -1], np.inf).astype(np.float32)
        if exclude_id is not None:
            valid &= ids != exclude_id[:, None]
        if exclude_owner is not None:
            valid &= owner != exclude_owner[:, None]
        rows = np.broadcast_to(np.arange(n)[:, None], (n, k))[valid]
        who, d = owner[valid], dist[valid]
        # Rows come out in order and each row's neighbours nearest first; a stable sort by (row, identity)
        # keeps each identity's faces nearest first.
        key = rows.astype(np.int64) * self.n_identities + who
        order = np.argsort(key, kind="stable")
        key, rows, who, d = key[order], rows[order], who[order], d[order]
        if len(key) == 0:
            return rows, who, d, bound
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        group = np.cumsum(np.r_[True, key[1:] != key[:-1]]) - 1
        rank = np.arange(len(key)) - starts[group]
        kk_of = self._grouped()[2]
        kk = kk_of[who]
        take = rank < kk
        sums = np.bincount(group[take], weights=d[take], minlength=len(starts))
        counts = np.bincount(group[take], minlength=len(starts))
        g_rows, g_who = rows[starts], who[starts]
        g_kk = kk_of[g_who]
        g_d = (sums / g_kk).astype(np.float32)
        partial = counts < g_kk
        if partial.any():
            g_d[partial] = self.exact_pairs(queries, g_rows[partial], g_who[partial])
        return g_rows, g_who, g_d, bound

    def _exhaustive(self, queries: np.ndarray, exclude_owner=None, exclude_id=None) -> np.ndarray:
        """(queries, identities) k-nearest-faces distances against every face: the numpy path, for the few faces
        the neighbours cannot settle."""
        d = pairwise_distances(np.asarray(queries, np.float32), self.vectors)
        if exclude_id is not None:
            d[np.arange(len(d)), exclude_id] = np.inf
        out = knn_distances(d, self.owner, self.n_identities, self.knn)
        if exclude_owner is not None:
            out[np.arange(len(out)), exclude_owner] = np.inf
        return out

    def nearest_identities(
        self,
        queries: np.ndarray,
        top: int = 1,
        exclude_owner: np.ndarray | None = None,
        exclude_id: np.ndarray | None = None,
        neighbours: int = NEIGHBOURS,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(identities, distances), each (queries, top): the identities with the smallest k-nearest-faces
        distance, nearest first (-1 and inf where there are fewer). ``exclude_id`` leaves out one face per
        query (itself), ``exclude_owner`` one identity per query."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        out_ids = np.full((n, top), -1, np.int64)
        out_d = np.full((n, top), np.inf, np.float32)
        todo = np.arange(n)
        k = neighbours
        while len(todo):
            q = queries[todo]
            ex_o = exclude_owner[todo] if exclude_owner is not None else None
            ex_i = exclude_id[todo] if exclude_id is not None else None
            if k > MAX_NEIGHBOURS:
                full = self._exhaustive(q, ex_o, ex_i)
                best = np.argsort(full, axis=1, kind="stable")[:, :top]
                out_ids[todo, : best.shape[1]] = best
                out_d[todo, : best.shape[1]] = np.take_along_axis(full, best, 1)
                out_ids[todo] = np.where(np.isfinite(out_d[todo]), out_ids[todo], -1)
                break
            dist, ids = self.search(q, k + (1 if exclude_id is not None else 0))
            rows, who, d, bound = self._candidates(q, dist, ids, ex_o, ex_i)
            order = np.lexsort((who, d, rows))
            rows, who, d = rows[order], who[order], d[order]
            starts = np.searchsorted(rows, np.arange(len(todo)))
            rank = np.arange(len(rows)) - starts[rows]
            keep = rank < top
            ids_t = np.full((len(todo), top), -1, np.int64)
            d_t = np.full((len(todo), top), np.inf, np.float32)
            ids_t[rows[keep], rank[keep]] = who[keep]
            d_t[rows[keep], rank[keep]] = d[keep]
            # Settled when the top-th identity is no farther than the farthest neighbour.
            settled = d_t[:, -1] <= bound
            out_ids[todo[settled]], out_d[todo[settled]] = ids_t[settled], d_t[settled]
            todo = todo[~settled]
            k *= 4
        return out_ids, out_d

    def leave_one_out(self, trials: int = IMPOSTOR_TRIALS) -> tuple[np.ndarray, np.ndarray]:
        """(genuine, impostor) distance of every face with itself left out: to its own identity (exactly, from
        the identity's own faces) and to the nearest other identity (from the index's nearest faces). Above
        ``trials`` faces, impostor distances are those of a fixed random sample of ``trials`` faces; the other
        entries are NaN."""
        order, bounds, kk_of = self._grouped()
        vectors, owner = self.vectors, self.owner
        genuine = np.full(self.n, np.inf, np.float32)
        for c in range(self.n_identities):
            lo, hi = bounds[c], bounds[c + 1]
            if hi - lo < 2:
                continue
            faces = order[lo:hi]
            d = pairwise_distances(vectors[faces], vectors[faces])
            np.fill_diagonal(d, np.inf)
            kk = int(kk_of[c])
            nearest = np.partition(d, kk - 1, axis=1)[:, :kk]
            finite = np.isfinite(nearest)
            genuine[faces] = np.where(
                finite.any(1), np.where(finite, nearest, 0).sum(1) / np.maximum(finite.sum(1), 1), np.inf
            )
        impostor = np.full(self.n, np.nan, np.float32)
        counts = np.diff(bounds)
        chunk = 8192
        faces = order
        if self.n > trials:
            chosen = np.zeros(self.n, bool)
            chosen[np.random.default_rng(0).choice(self.n, trials, replace=False)] = True
            faces = order[chosen[order]]
        for lo in range(0, len(faces), chunk):
            rows = faces[lo : lo + chunk]  # identity by identity: the own faces to skip are alike in number
            # Past its own identity's faces, a face's neighbours are the other identities.
            k = min(MAX_NEIGHBOURS, NEIGHBOURS + int(counts[owner[rows]].max()))
            _, d = self.nearest_identities(vectors[rows], 1, exclude_owner=owner[rows], exclude_id=rows, neighbours=k)
            impostor[rows] = d[:, 0]
        return genuine, impostor

"""Clustering methods for `pinsface cluster`, on the same descriptors: one table per library.

    nice -n 10 python bench/cluster.py [--data PINS] [--tail 3000] [--scale 100000 1000000]

Descriptors: the 128-d embeddings pinsface caches for the shared Pins photos (the face `prepare` chose in each,
from the cache: nothing is recomputed), as `pinsface index` stores them. The truth is each
photo's folder, hidden from the methods.

- "test split": the run split's test photos as one unlabelled library.
- "long tail": the test split plus --tail synthetic people with 1-3 faces each, drawn with bench/gallery_scale.py's
  generator fitted to the run split's train photos (``fit_generator``: the median distances and the lower tail of
  distances between strangers' faces; bench/cluster_generator.py compares them with real people).

Per method: BCubed precision, recall and F1, pairwise F1, clusters found, wall and CPU seconds. Chinese whispers
needs dlib (the `peers` extra: dlib-bin); without it that row is skipped with a message. Average linkage holds
all pairwise distances and is skipped above 20,000 faces. With --scale, pinsface's method alone on synthetic
libraries of those sizes (10 faces a person): wall and CPU seconds of the neighbour graph and of the linkage, and
the process's peak RSS (the descriptors and everything before them included).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def bcubed(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """BCubed precision and recall: per face, the share of its cluster in its person, and of its person in its
    cluster, averaged over faces."""
    _, t = np.unique(truth, return_inverse=True)
    _, c = np.unique(labels, return_inverse=True)
    pair = c.astype(np.int64) * (t.max() + 1) + t
    _, pair_idx, pair_n = np.unique(pair, return_inverse=True, return_counts=True)
    joint = pair_n[pair_idx]
    return float(np.mean(joint / np.bincount(c)[c])), float(np.mean(joint / np.bincount(t)[t]))


def pairwise_f1(labels: np.ndarray, truth: np.ndarray) -> float:
    """F1 over pairs of faces: a pair is predicted together when in one cluster, truly together in one person."""
    _, t = np.unique(truth, return_inverse=True)
    _, c = np.unique(labels, return_inverse=True)
    _, joint = np.unique(c.astype(np.int64) * (t.max() + 1) + t, return_counts=True)

    def pairs(n: np.ndarray) -> float:
        return float(np.sum(n * (n - 1) / 2))

    both, predicted, true = pairs(joint), pairs(np.bincount(c)), pairs(np.bincount(t))
    return 2 * both / (predicted + true) if predicted + true else 1.0


def with_singletons(labels: np.ndarray) -> np.ndarray:
    """Noise (-1) as one cluster per face, as the library shows unclustered faces."""
    labels = np.array(labels, dtype=np.int64)
    noise = labels < 0
    labels[noise] = labels.max(initial=-1) + 1 + np.arange(noise.sum())
    return labels


def chinese_whispers(x: np.ndarray) -> np.ndarray | str:
    try:
        import dlib
    except ImportError:
        return "skipped: dlib is not installed (pip install 'pinsface[peers]')"
    vectors = [dlib.vector(v.astype(float).tolist()) for v in x]
    return np.array(dlib.chinese_whispers_clustering(vectors, 0.5))


def dbscan(x: np.ndarray) -> np.ndarray:
    from sklearn.cluster import DBSCAN

    return with_singletons(DBSCAN(eps=0.5, min_samples=3).fit_predict(x))


def hdbscan(x: np.ndarray) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    return with_singletons(HDBSCAN(min_cluster_size=2).fit_predict(x))


def average_linkage(x: np.ndarray) -> np.ndarray | str:
    if len(x) > 20_000:
        return "skipped: holds every pairwise distance (over 20,000 faces)"
    from sklearn.cluster import AgglomerativeClustering

    model = AgglomerativeClustering(n_clusters=None, distance_threshold=0.6, linkage="average")
    return model.fit_predict(x)


def pinsface_method(x: np.ndarray) -> np.ndarray:
    from pinsface.library_cluster import mean_pair_linkage

    return mean_pair_linkage(x)


def pinsface_unspaced(x: np.ndarray) -> np.ndarray:
    """pinsface's method as it was before 2026-12-06: no spacing, bound 0.6 less 0.1 / sqrt(pairs)."""
    from pinsface.library_cluster import mean_pair_linkage

    return mean_pair_linkage(x, centroid=0.6, small=0.1, spaced=np.ones(len(x)))


METHODS = {
    "Chinese whispers 0.5 (dlib)": chinese_whispers,
    "DBSCAN eps 0.5, min 3": dbscan,
    "HDBSCAN min cluster 2": hdbscan,
    "average linkage 0.6": average_linkage,
    "mean-pair linkage 0.6 / 0.1, no spacing (pinsface before)": pinsface_unspaced,
    "pinsface (mean-pair linkage, kNN graph)": pinsface_method,
}


def table(name: str, x: np.ndarray, truth: np.ndarray, methods=METHODS) -> None:
    print(f"\n{name}: {len(x):,} faces of {len(np.unique(truth)):,} people")
    print("| method | BCubed P | BCubed R | BCubed F1 | pairwise F1 | clusters | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, fn in methods.items():
        t, c = time.perf_counter(), time.process_time()
        out = fn(x)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if isinstance(out, str):
            print(f"| {label} | {out} | | | | | | |")
            continue
        p, r = bcubed(out, truth)
        f1 = 2 * p * r / (p + r)
        n = len(np.unique(out))
        pf1 = pairwise_f1(out, truth)
        print(f"| {label} | {p:.4f} | {r:.4f} | {f1:.4f} | {pf1:.4f} | {n:,} | {wall:.2f} | {cpu:.2f} |")
        sys.stdout.flush()


def test_split(data, part: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Cached descriptors and folder labels of the run split's test photos (or its ``part``: train, val)."""
    from pinsface.cache import default_cache_dir
    from pinsface.dataset import default_data_dir, scan_dataset, split_dataset
    from pinsface.embeddings import run_embedding_cache
    from pinsface.prepare import prepare
    from pinsface.settings import Settings

    settings = Settings()
    dataset = scan_dataset(data or default_data_dir())
    prepared = prepare(dataset=dataset, cache_dir=default_cache_dir(), settings=settings.faces, progress=False)
    split = split_dataset(dataset, settings.seed, settings.test_fraction, settings.val_fraction)
    index, emb, _ = run_embedding_cache(settings, default_cache_dir()).load()
    rows, owner = [], []
    for i, item in enumerate(dataset.items):
        h = prepared.hashes[i]
        if split.assignment[item.rel] == part and h in index and prepared.status[i] != "ambiguous":
            rows.append(index[h])
            owner.append(dataset.identities.index(item.identity))
    if not rows:
        sys.exit(f"no cached embeddings for the {part} split: run `pinsface run` (or prepare and train) first")
    return emb[np.array(rows)].astype(np.float32), np.array(owner)


TAIL = 0.001  # the quantile of the distances between strangers' faces that the synthetic people match
SIGMAS = np.arange(0.0, 0.301, 0.025)  # the generator's log-normal spreads tried


def synthetic(
    x: np.ndarray, owner: np.ndarray, people: int, per: int, rng, vary: bool, *, fit: dict | None = None
) -> tuple:
    """Synthetic people around the real descriptors ``x`` (bench/gallery_scale.py's generator on their directions,
    fitted to them by ``fit_generator``; each person's faces then given lengths around one drawn from the real
    people's): ``per`` faces each, or with ``vary`` 1 to ``per``. ``fit``: ``fit_generator``'s for ``x``, if made."""
    import gallery_scale as gs

    fit = fit or fit_generator(x, owner, np.random.default_rng(0))  # one generator for every draw from these faces
    _, vectors, who = gs.synthesise(people, fit["mean"], fit["s_b"], fit["s_w"], rng, per, sigma=fit["sigma"])
    if vary:
        keep = np.tile(np.arange(per), people) < np.repeat(rng.integers(1, per + 1, people), per)
        vectors, who = vectors[keep], who[keep]
    return vectors * lengths(fit, who, rng)[:, None], who


def lengths(fit: dict, who: np.ndarray, rng) -> np.ndarray:
    """Descriptor lengths for synthetic faces of people ``who``: a real person's mean length each, plus a real
    face's deviation from its person's (lengths vary less within a person than between people)."""
    return (rng.choice(fit["person_norm"], who.max() + 1)[who] + rng.choice(fit["norm_dev"], len(who))).astype(
        np.float32
    )


def fit_generator(x: np.ndarray, owner: np.ndarray, rng, draws: int = 3) -> dict:
    """The generator's shape (gallery_scale.SHAPE, set here), mean, lengths, and spread: the medians of the
    between-centroid and within distances as fitted by gallery_scale.fit_spread, and its log-normal sigma from
    ``SIGMAS``: the one whose synthetic people (as many as the real ones) have the real ``TAIL`` quantile of
    distances between strangers' faces. The medians alone leave that tail free, and it decides whether
    clustering joins strangers (docs/library.md)."""
    import gallery_scale as gs

    norms = np.linalg.norm(x, axis=1)
    _, person = np.unique(owner, return_inverse=True)
    person_norm = np.bincount(person, norms) / np.bincount(person)
    units = gs.unit(x)
    gs.SHAPE[:] = gs.shape_of(units, owner)
    fit = {"mean": units.mean(0), "person_norm": person_norm, "norm_dev": norms - person_norm[person]}
    target, real = gs.stranger_tail(x, owner, rng, TAIL), gs.stats(units, owner, rng)
    n, per = len(person_norm), max(2, len(x) // len(person_norm))
    best = np.inf
    for sigma in SIGMAS:
        s_b, s_w = gs.fit_spread(fit["mean"], real, rng, sigma)
        got = []
        for _ in range(draws):
            _, v, who = gs.synthesise(n, fit["mean"], s_b, s_w, rng, per, sigma=sigma)
            got.append(gs.stranger_tail(v * lengths(fit, who, rng)[:, None], who, rng, TAIL))
        if abs(np.mean(got) - target) < best:
            best = abs(np.mean(got) - target)
            fit.update(sigma=float(sigma), s_b=s_b, s_w=s_w, tail=float(np.mean(got)))
    print(
        f"generator fitted on {len(x):,} faces of {n} people: log-normal sigma {fit['sigma']:.3f}, "
        f"strangers' {TAIL:.1%} distance quantile {target:.4f} real, {fit['tail']:.4f} synthetic"
    )
    return fit


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="the Pins folder (default: as pinsface finds it)")
    parser.add_argument("--tail", type=int, default=3000, help="synthetic people with 1-3 faces in the long tail")
    parser.add_argument("--scale", type=int, nargs="*", default=[], help="faces in synthetic libraries to time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other processes share these CPUs)")
    x, owner = test_split(args.data)
    table("test split as one library", x, owner)
    tail, tail_owner = synthetic(*test_split(args.data, "train"), args.tail, 3, rng, vary=True)
    table(
        f"long tail (test split + {args.tail:,} synthetic people with 1-3 faces)",
        np.concatenate([x, tail]),
        np.concatenate([owner, tail_owner + owner.max() + 1]),
    )
    for n in args.scale:
        scale_run(x, owner, n, rng)


def scale_run(x: np.ndarray, owner: np.ndarray, n: int, rng) -> None:
    """pinsface's method on ``n`` synthetic faces (10 a person): the neighbour graph and the linkage timed apart."""
    from pinsface.library_cluster import mean_pair_linkage, neighbour_graph

    big, who = synthetic(x, owner, n // 10, 10, rng, vary=False)
    before = rss_gb()
    t, c = time.perf_counter(), time.process_time()
    graph = neighbour_graph(big)
    g_wall, g_cpu = time.perf_counter() - t, time.process_time() - c
    labels = mean_pair_linkage(big, graph=graph)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    p, r = bcubed(labels, who)
    print(
        f"\n{n:,} synthetic faces ({n // 10:,} people): pinsface's method {wall:.1f} s wall, {cpu:.1f} CPU s "
        f"(neighbour graph {g_wall:.1f} s, {g_cpu:.1f} CPU s; linkage {wall - g_wall:.1f} s, {cpu - g_cpu:.1f} CPU s), "
        f"BCubed P {p:.4f} R {r:.4f}; peak RSS {rss_gb():.2f} GB (the faces and all before them: {before:.2f} GB); "
        f"load average now {os.getloadavg()[0]:.1f}",
        flush=True,
    )


if __name__ == "__main__":
    main()

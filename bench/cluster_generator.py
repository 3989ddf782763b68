"""Are bench/cluster.py's synthetic people as far apart as real ones? Real and synthetic people side by side.

    nice -n 5 python bench/cluster_generator.py [--data PINS] [--draws 40]

Both generators are fitted on the run split's train photos and compared with its validation and test photos:
"old" is bench/gallery_scale.py's generator as bench/cluster.py used it before 2026-12-06 (medians fitted, its
log-normal spread 0.2, each face given a real face's length at random); "new" is bench/cluster.py's
``fit_generator`` (the spread that matches the real lower tail of distances between strangers, lengths around a
real person's). Like with like: 105 people of 22 faces each (about the real splits' size), per set: each person's
nearest other person's centroid, each face's nearest stranger's face, the distances between two faces of one
person (percentiles), the share of pairs of strangers' faces closer than 0.5 / 0.55 / 0.6 (per 10,000); then,
over --draws libraries of 105 people with 1 to 3 faces each, real and synthetic, BCubed precision, recall and F1
of clustering methods and the pairs of strangers' faces they put together (Chinese whispers needs dlib, as in
bench/cluster.py; skipped without it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster as bench  # noqa: E402
import gallery_scale as gs  # noqa: E402

PEOPLE, FACES = 105, 22


def old_generator(x: np.ndarray, owner: np.ndarray, people: int, per: int, rng) -> tuple[np.ndarray, np.ndarray]:
    units = gs.unit(x)
    gs.SHAPE[:] = gs.shape_of(units, owner)
    s_b, s_w = gs.fit_spread(units.mean(0), gs.stats(units, owner, rng), rng, 0.2)
    _, vectors, who = gs.synthesise(people, units.mean(0), s_b, s_w, rng, per, sigma=0.2)
    return vectors * rng.choice(np.linalg.norm(x, axis=1), len(vectors)).astype(np.float32)[:, None], who


FITTED: dict = {}


def new_generator(x: np.ndarray, owner: np.ndarray, people: int, per: int, rng) -> tuple[np.ndarray, np.ndarray]:
    if not FITTED:
        FITTED.update(bench.fit_generator(x, owner, np.random.default_rng(0)))
    return bench.synthetic(x, owner, people, per, rng, vary=False, fit=FITTED)


def per_person(x: np.ndarray, owner: np.ndarray, per: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per`` faces of each person, drawn at random (1 to ``per`` when ``per`` is negative)."""
    keep = []
    for person in np.unique(owner):
        faces = np.flatnonzero(owner == person)
        n = rng.integers(1, -per + 1) if per < 0 else per
        keep.extend(rng.choice(faces, min(n, len(faces)), replace=False))
    return x[keep], owner[keep]


def describe(x: np.ndarray, owner: np.ndarray) -> str:
    _, person = np.unique(owner, return_inverse=True)
    centres = np.stack([x[person == p].mean(0) for p in range(person.max() + 1)])
    between = np.linalg.norm(centres[:, None] - centres[None], axis=2)
    np.fill_diagonal(between, np.inf)
    sq = np.einsum("nd,nd->n", x, x)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0))
    same = person[:, None] == person[None]
    upper = np.triu(np.ones_like(same), 1)
    strangers, within = d[upper & ~same], d[upper & same]

    def q(v, ps):
        return " / ".join(f"{np.percentile(v, p):.3f}" for p in ps)

    close = " / ".join(f"{np.mean(strangers < t) * 1e4:.2f}" for t in (0.5, 0.55, 0.6))
    return (
        f"| {q(between.min(1), (1, 5, 50))} | {q(np.where(same, np.inf, d).min(1), (1, 5, 50))} "
        f"| {q(within, (50, 95, 99))} | {close} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="the Pins folder (default: as pinsface finds it)")
    parser.add_argument("--draws", type=int, default=40, help="libraries of 1-3 faces a person per set")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    train = bench.test_split(args.data, "train")
    sets = {part: bench.test_split(args.data, part) for part in ("val", "test")}
    print(f"\n{PEOPLE} people, {FACES} faces each (real: up to {FACES}, drawn at random)")
    print("| set | nearest person's centroid p1 / p5 / p50 | nearest stranger's face p1 / p5 / p50 ", end="")
    print("| one person's two faces p50 / p95 / p99 | strangers' faces < 0.5 / 0.55 / 0.6 per 10^4 |")
    print("|---|---|---|---|---|")
    for part, (x, owner) in sets.items():
        print(f"| real {part} " + describe(*per_person(x, owner, FACES, rng)))
    for name, generate in (("old", old_generator), ("new", new_generator)):
        for seed in range(2):
            print(f"| {name} generator, draw {seed} " + describe(*generate(*train, PEOPLE, FACES, rng)), flush=True)
    print(
        f"\nLibraries of {PEOPLE} people with 1-3 faces each, mean over {args.draws}: BCubed P / R / F1, and the pairs"
    )
    print("of strangers' faces clustered together per library")
    methods = {k: f for k, f in METHODS.items() if not isinstance(f(np.eye(2, 128, dtype=np.float32)), str)}
    print("| people | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    libraries = {f"real {part}": [per_person(*sets[part], -3, rng) for _ in range(args.draws)] for part in sets}
    for name, generate in (("old", old_generator), ("new", new_generator)):
        libraries[f"{name} generator"] = [sparse(*generate(*train, PEOPLE, 3, rng), rng) for _ in range(args.draws)]
    for name, drawn in libraries.items():
        cells = []
        for method in methods.values():
            got = np.array([scores(method(x), owner) for x, owner in drawn]).mean(0)
            cells.append(" / ".join(f"{v:.4f}" for v in got[:3]) + f"; {got[3]:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def sparse(x: np.ndarray, owner: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """1 to 3 of each synthetic person's 3 faces."""
    keep = np.tile(np.arange(3), PEOPLE) < np.repeat(rng.integers(1, 4, PEOPLE), 3)
    return x[keep], owner[keep]


def scores(labels: np.ndarray, owner: np.ndarray) -> tuple[float, float, float, float]:
    p, r = bench.bcubed(labels, owner)
    together = labels[:, None] == labels[None]
    return p, r, 2 * p * r / (p + r), float(np.sum(np.triu(together & (owner[:, None] != owner[None]), 1)))


METHODS = {
    "pinsface linkage alone": bench.pinsface_linkage_only,
    "pinsface (linkage, refine)": bench.pinsface_method,
    "Chinese whispers 0.5": bench.chinese_whispers,
}

if __name__ == "__main__":
    main()

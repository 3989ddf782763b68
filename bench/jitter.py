"""Test-time jitter: does averaging the embeddings of jittered copies of each aligned chip help, and at what cost?

On the shared split (the one `pinsface run` uses), with the run's cached aligned crops and backbone:
a logistic regression (C chosen on validation) is fitted on the train faces and scores every test image
(unreadable ones count wrong; no-face ones are scored from their fallback crop, as the run does).
A face's embedding is the mean of V views, each with its mirror image (2V backbone passes), L2-normalised:
view 1 is the chip itself (V = 1 is what pinsface does today), views 2.. are random affine copies of it
(shift up to --shift px, scale 1 +- --scale, rotation +- --rotation degrees about the chip centre;
cv2.warpAffine, reflected borders), drawn per face and view from the seed, so the views of V = 4 are those of
V = 2 plus two more. Printed per V: test top-1 with views averaged on the test side only and on both sides,
and the embedding cost in faces/s (warping included).

    PINSFACE_CACHE=/tmp/x python bench/jitter.py [--data DIR] [--views 1 2 4 8] [--seeds 0] [--test-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402  (the set-up above must come first)

CHUNK = 1024


def jitter(crops: np.ndarray, rng: np.random.Generator, shift: float, scale: float, rotation: float) -> np.ndarray:
    """One random affine copy of each crop (shift/scale/rotation about the centre), reflected at the borders."""
    import cv2

    n, h, w = crops.shape[:3]
    dx, dy = rng.uniform(-shift, shift, (2, n))
    zoom = rng.uniform(1 - scale, 1 + scale, n)
    angle = rng.uniform(-rotation, rotation, n)
    out = np.empty_like(crops)
    for i in range(n):
        m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), float(angle[i]), float(zoom[i]))
        m[:, 2] += (dx[i], dy[i])
        out[i] = cv2.warpAffine(crops[i], m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return out


def view_embeddings(crops: np.ndarray, embedder, n_views: int, seed: int, args) -> tuple[list[np.ndarray], list]:
    """Sum of face + mirror embeddings for views 2..n_views (jittered), and the seconds each view took."""
    sums, seconds = [], []
    for view in range(1, n_views):
        rng = np.random.default_rng([seed, view])
        start = time.perf_counter()
        total = np.zeros((len(crops), 128), np.float32)
        for lo in range(0, len(crops), CHUNK):
            warped = jitter(crops[lo : lo + CHUNK], rng, args.shift, args.scale, args.rotation)
            face, mirror = embedder.both_views(warped)
            total[lo : lo + CHUNK] = face + mirror
        seconds.append(time.perf_counter() - start)
        sums.append(total)
    return sums, seconds


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--cache", default=None, help="default: $PINSFACE_CACHE or ~/.cache/pinsface")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="jitter seeds (the split stays the run's)")
    parser.add_argument("--test-only", action="store_true", help="skip jittering the train faces (the slow part)")
    parser.add_argument("--limit-per-identity", type=int, metavar="N", help="first N images of each identity")
    parser.add_argument("--shift", type=float, default=3.0, help="largest shift, pixels of the 150-px chip")
    parser.add_argument("--scale", type=float, default=0.04)
    parser.add_argument("--rotation", type=float, default=4.0, help="degrees")
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression

    from pinsface.backbones import get_backbone
    from pinsface.cache import default_cache_dir
    from pinsface.dataset import default_data_dir, scan_dataset, split_dataset
    from pinsface.embeddings import ensure_embeddings, run_embedder, run_embedding_cache
    from pinsface.prepare import prepare
    from pinsface.settings import Settings

    settings = Settings()
    dataset = None
    if args.limit_per_identity:
        dataset = scan_dataset(args.data or default_data_dir())
        taken: dict[str, int] = {}
        kept = []
        for item in dataset.items:
            taken[item.identity] = taken.get(item.identity, 0) + 1
            if taken[item.identity] <= args.limit_per_identity:
                kept.append(item)
        dataset.items = kept
    t0 = time.perf_counter()
    prepared = prepare(
        args.data, args.cache, settings.faces, batch_size=settings.detect_batch_size, progress=False, dataset=dataset
    )
    dataset = prepared.dataset
    print(
        f"prepare: {time.perf_counter() - t0:.0f} s ({prepared.summary['from_cache']} of "
        f"{len(dataset.items)} images from the cache)",
        flush=True,
    )
    split = split_dataset(dataset, settings.seed, settings.test_fraction, settings.val_fraction)
    label_of = {name: i for i, name in enumerate(dataset.identities)}
    parts = {}
    for name in ("train", "val", "test"):
        idx = [i for i, it in enumerate(dataset.items) if split.assignment[it.rel] == name]
        usable = [i for i in idx if prepared.hashes[i] is not None]
        parts[name] = {
            "n": len(idx),
            "hashes": [prepared.hashes[i] for i in usable],
            "y": np.array([label_of[dataset.items[i].identity] for i in usable]),
        }
    n_test = parts["test"]["n"]
    print(
        f"{len(dataset.items)} images; train {len(parts['train']['hashes'])}, validation "
        f"{len(parts['val']['hashes'])}, test {n_test} ({n_test - len(parts['test']['hashes'])} unreadable, "
        "counted wrong)",
        flush=True,
    )

    backbone = get_backbone(settings.backbone)
    embedder = run_embedder(settings, backbone)
    store = run_embedding_cache(settings, args.cache or default_cache_dir())
    base = {}
    for name, part in parts.items():
        face, mirror = ensure_embeddings(part["hashes"], prepared.cache, store, embedder, progress=False)
        base[name] = face + mirror
    print(f"embeddings ({embedder.precision}) of the chip and its mirror: from the run's cache or computed", flush=True)

    def fit(x_train, c):
        return LogisticRegression(C=c, max_iter=3000).fit(unit(x_train), parts["train"]["y"])

    val_scores = {
        c: float(np.mean(fit(base["train"], c).predict(unit(base["val"])) == parts["val"]["y"]))
        for c in (1, 3, 10, 30, 100)
    }
    c_best = max(val_scores, key=val_scores.get)
    print(
        "logistic regression, validation top-1 by C: "
        + ", ".join(f"{c}: {v:.4f}" for c, v in val_scores.items())
        + f" -> C={c_best}",
        flush=True,
    )

    def test_top1(model, x_test):
        return float(np.sum(model.predict(unit(x_test)) == parts["test"]["y"])) / n_test

    crops = prepared.cache.load(
        list(dict.fromkeys(parts["test"]["hashes"] + parts["train"]["hashes"])), crops=("aligned",)
    )
    test_crops = crops.columns["aligned"][crops.rows(parts["test"]["hashes"])]
    train_crops = crops.columns["aligned"][crops.rows(parts["train"]["hashes"])]
    embedder.both_views(test_crops[: embedder.batch_size])  # trace before timing

    # Cost of V = 1, measured like the jittered views (no warp).
    rates_one = []
    for _ in range(3):
        start = time.perf_counter()
        for lo in range(0, len(test_crops), CHUNK):
            embedder.both_views(test_crops[lo : lo + CHUNK])
        rates_one.append(len(test_crops) / (time.perf_counter() - start))
    seconds_one = len(test_crops) / statistics.median(rates_one)

    base_model = fit(base["train"], c_best)
    max_views = max(args.views)
    rows = []
    for seed in args.seeds:
        test_sums, test_seconds = view_embeddings(test_crops, embedder, max_views, seed, args)
        train_sums = None
        if not args.test_only:
            train_sums, _ = view_embeddings(train_crops, embedder, max_views, seed, args)
        for v in sorted(args.views):
            x_test = base["test"] + sum(test_sums[: v - 1], np.zeros_like(base["test"]))
            seconds = seconds_one + sum(test_seconds[: v - 1])
            row = {
                "seed": seed,
                "views": v,
                "test_side": test_top1(base_model, x_test),
                "faces_per_s": len(test_crops) / seconds,
            }
            if train_sums is not None:
                x_train = base["train"] + sum(train_sums[: v - 1], np.zeros_like(base["train"]))
                row["both_sides"] = test_top1(fit(x_train, c_best), x_test)
            rows.append(row)
            both = f"{row['both_sides']:.4f}" if "both_sides" in row else "-"
            print(
                f"seed {seed}  views {v}  test top-1: test side {row['test_side']:.4f}, both sides {both}; "
                f"{row['faces_per_s']:.0f} faces/s",
                flush=True,
            )

    print()
    print(
        f"test top-1 over {n_test} test images (LR C={c_best} on {len(parts['train']['hashes'])} train faces; "
        f"jitter shift {args.shift} px, scale +-{args.scale}, rotation +-{args.rotation} deg; "
        f"seeds {' '.join(map(str, args.seeds))}):"
    )
    print(
        f"{'views':>5s} {'passes/face':>11s} {'test side (mean)':>17s} {'both sides (mean)':>18s} "
        f"{'faces/s (median)':>17s}"
    )
    for v in sorted(args.views):
        mine = [r for r in rows if r["views"] == v]
        both = [r["both_sides"] for r in mine if "both_sides" in r]
        print(
            f"{v:5d} {2 * v:11d} {np.mean([r['test_side'] for r in mine]):17.4f} "
            f"{(f'{np.mean(both):.4f}' if both else '-'):>18s} "
            f"{statistics.median(r['faces_per_s'] for r in mine):17.0f}"
        )


if __name__ == "__main__":
    main()

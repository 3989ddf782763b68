"""Face verification on Labeled Faces in the Wild's standard protocol (View 2: 10 folds of 300 matched and 300
mismatched pairs), through pinsface's public API, and dlib's own pipeline on the same pairs.

For any copy of LFW in its usual layout (DIR/<Name>/<Name>_NNNN.jpg) and its pairs.txt (first line: folds and
matched pairs per fold; then per fold the matched lines "name n1 n2" and the mismatched "name1 n1 name2 n2").
Each image is described once per pipeline; a pair's score is the Euclidean distance between the two photos'
main faces (``is_subject``, else the largest face), and it is called "same" at or below a threshold. For each
fold the threshold is the one with the highest accuracy on the other folds; printed: the mean and sample
standard deviation of the 10 fold accuracies, and the single threshold with the highest accuracy on all pairs.

pinsface: ``pinsface.describe(path, mirror=False)`` (plain descriptors) and ``pinsface.describe(path)``
(mirror-averaged, the default). Where it finds no face, the image's pairs are called "different" (so a
matched pair counts wrong).

dlib (with the ``peers`` extra: dlib-bin and face-recognition-models): HOG detector upsampled once, the largest
face, the 5-point landmark model, ``get_face_chip(size=150, padding=0.25)`` and ``face_recognition_model_v1``:
plain, mirror-averaged (the chip's descriptor averaged with its mirror image's) and, with ``--jitters N``,
``compute_face_descriptor(chip, N)``. Where HOG finds no face, a centred box of half the image's size is used
(LFW's photos are framed around the face), and counted.

    pip install -e '.[peers]'
    python bench/lfw.py --lfw DIR --pairs pairs.txt [--jitters 10] [--no-dlib] [--limit-folds K]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402  (the set-up above must come first)


@dataclass
class Pairs:
    a: list[Path]  # first image of each pair
    b: list[Path]
    same: np.ndarray  # bool per pair
    fold: np.ndarray  # fold number per pair

    def images(self) -> list[Path]:
        return sorted(set(self.a) | set(self.b))


def _image(lfw: Path, name: str, number: str, where: str) -> Path:
    if not number.isdigit():
        raise ValueError(f"{where}: image number {number!r} is not a whole number")
    return lfw / name / f"{name}_{int(number):04d}.jpg"


def read_pairs(lfw: Path, path: Path, limit_folds: int | None = None) -> Pairs:
    """LFW's pairs.txt; raises ValueError naming the line where it is malformed."""
    lines = [line.split() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or len(lines[0]) != 2 or not all(v.isdigit() for v in lines[0]):
        raise ValueError(f"{path}: the first line must be '<folds> <pairs per fold>'")
    folds, per_fold = (int(v) for v in lines[0])
    if len(lines) - 1 != 2 * folds * per_fold:
        raise ValueError(f"{path}: {len(lines) - 1} pair lines, not {2 * folds * per_fold} ({folds} x 2 x {per_fold})")
    a, b, same, fold = [], [], [], []
    for i, fields in enumerate(lines[1:]):
        where = f"{path} line {i + 2}"
        matched = (i % (2 * per_fold)) < per_fold
        if matched and len(fields) == 3:
            a.append(_image(lfw, fields[0], fields[1], where))
            b.append(_image(lfw, fields[0], fields[2], where))
        elif not matched and len(fields) == 4:
            a.append(_image(lfw, fields[0], fields[1], where))
            b.append(_image(lfw, fields[2], fields[3], where))
        else:
            kind = "matched 'name n1 n2'" if matched else "mismatched 'name1 n1 name2 n2'"
            raise ValueError(f"{where}: expected a {kind} pair, got {' '.join(fields)!r}")
        same.append(matched)
        fold.append(i // (2 * per_fold))
    keep = [f < (limit_folds or folds) for f in fold]
    out = Pairs([p for p, k in zip(a, keep) if k], [p for p, k in zip(b, keep) if k], np.array(same), np.array(fold))
    out.same, out.fold = out.same[keep], out.fold[keep]
    return out


def best_threshold(d: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The threshold (same at or below it) with the highest accuracy on these pairs, and that accuracy. Among
    equally good thresholds, the middle of the widest gap between distances."""
    order = np.argsort(d, kind="stable")
    ds, ss = d[order], same[order]
    # Threshold just at ds[k-1] (k pairs called same): correct = matched among the first k + mismatched after.
    correct = np.concatenate([[0], np.cumsum(ss)]) + np.concatenate([np.cumsum((~ss)[::-1])[::-1], [0]])
    cuts = np.flatnonzero(correct == correct.max())
    lows = np.concatenate([[0.0], ds])[cuts]
    highs = np.concatenate([ds, [ds[-1] + 1.0 if np.isfinite(ds[-1]) else 10.0]])[cuts]
    highs = np.where(np.isfinite(highs), highs, lows + 1.0)
    k = int(np.argmax(np.where(np.isfinite(lows), highs - lows, -1.0)))
    return float((lows[k] + highs[k]) / 2), float(correct.max() / len(d))


def ten_fold(d: np.ndarray, same: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each fold's accuracy at the threshold chosen on the other folds, and those thresholds."""
    accs, limits = [], []
    for k in np.unique(fold):
        test = fold == k
        limit, _ = best_threshold(d[~test], same[~test])
        accs.append(float(np.mean((d[test] <= limit) == same[test])))
        limits.append(limit)
    return np.array(accs), np.array(limits)


def pair_distances(pairs: Pairs, vectors: dict[Path, np.ndarray | None]) -> np.ndarray:
    """Distances per pair; infinite (called different) where either image has no descriptor."""
    d = np.full(len(pairs.a), np.inf)
    for i, (a, b) in enumerate(zip(pairs.a, pairs.b)):
        va, vb = vectors.get(a), vectors.get(b)
        if va is not None and vb is not None:
            d[i] = float(np.linalg.norm(va.astype(np.float64) - vb.astype(np.float64)))
    return d


def main_face(faces):
    """The photo's subject, else its largest face (as ``pinsface.verify`` chooses), or None."""
    if not faces:
        return None
    return next((f for f in faces if f.is_subject), None) or max(faces, key=lambda f: min(f.box[2], f.box[3]))


def progress(label: str, done: int, total: int, start: float) -> None:
    if done % 500 == 0 or done == total:
        rate = done / max(time.perf_counter() - start, 1e-9)
        print(f"  {label}: {done}/{total} images, {rate:.1f} img/s", file=sys.stderr, flush=True)


def pinsface_vectors(images: list[Path], mirror: bool) -> tuple[dict, int, float]:
    """Each image's main-face descriptor through the public API (None where no face), the no-face count and
    the seconds taken."""
    import pinsface

    out, missing, start = {}, 0, time.perf_counter()
    for i, path in enumerate(images, 1):
        try:
            face = main_face(pinsface.describe(path, mirror=mirror))
        except pinsface.PinsfaceError as exc:
            print(f"  {path}: {exc}", file=sys.stderr)
            face = None
        out[path] = None if face is None else face.descriptor
        missing += face is None
        progress(f"pinsface{' mirror' if mirror else ''}", i, len(images), start)
    return out, missing, time.perf_counter() - start


def dlib_models():
    """dlib's HOG detector, 5-point landmarks and descriptor network, or None without the ``peers`` extra."""
    if not all(importlib.util.find_spec(m) for m in ("dlib", "face_recognition_models")):
        return None
    from peers import load_peer_models

    return load_peer_models()


def dlib_chip(models, path: Path) -> tuple[np.ndarray | None, bool]:
    """dlib's aligned 150-px chip of the largest HOG face (a centred box where none), and whether HOG found one."""
    import dlib
    from PIL import Image

    detector, landmarks, _ = models
    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        print(f"  {path}: {exc}", file=sys.stderr)
        return None, False
    boxes = detector(image, 1)
    h, w = image.shape[:2]
    box = max(boxes, key=lambda b: b.area()) if len(boxes) else dlib.rectangle(w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    return dlib.get_face_chip(image, landmarks(image, box), size=150, padding=0.25), bool(len(boxes))


def dlib_vectors(models, images: list[Path], jitters: int) -> tuple[dict[str, dict], int, float]:
    """dlib's descriptors per image: plain, mirror-averaged and (jitters > 0) jittered; the HOG-miss count."""
    net = models[2]
    out = {"plain": {}, "mirror": {}} | ({f"jitter{jitters}": {}} if jitters else {})
    missed, start = 0, time.perf_counter()
    for i, path in enumerate(images, 1):
        chip, found = dlib_chip(models, path)
        missed += not found
        if chip is None:
            for table in out.values():
                table[path] = None
            continue
        plain, flipped = (
            np.asarray(v) for v in net.compute_face_descriptor([chip, np.ascontiguousarray(chip[:, ::-1])])
        )
        out["plain"][path], out["mirror"][path] = plain, (plain + flipped) / 2
        if jitters:
            out[f"jitter{jitters}"][path] = np.asarray(net.compute_face_descriptor(chip, jitters))
        progress("dlib", i, len(images), start)
    return out, missed, time.perf_counter() - start


def scored(pairs: Pairs, vectors: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """The fold accuracies and thresholds, and the columns every row prints: mean ± sample std accuracy, and the
    single best threshold with its accuracy on all pairs."""
    d = pair_distances(pairs, vectors)
    accs, limits = ten_fold(d, pairs.same, pairs.fold)
    limit, acc_all = best_threshold(d, pairs.same)
    text = f"{100 * accs.mean():6.2f} ± {100 * accs.std(ddof=1):4.2f}   {limit:6.4f} ({100 * acc_all:6.2f})"
    return accs, limits, text


def result_row(label: str, pairs: Pairs, vectors: dict, note: str) -> str:
    _, limits, text = scored(pairs, vectors)
    return f"{label:34s} {text}   {np.median(limits):6.4f} [{limits.min():.4f}, {limits.max():.4f}]   {note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lfw", required=True, help="LFW folder: DIR/<Name>/<Name>_NNNN.jpg")
    parser.add_argument("--pairs", required=True, help="LFW's pairs.txt (View 2)")
    parser.add_argument("--jitters", type=int, default=0, help="also dlib's compute_face_descriptor(chip, N)")
    parser.add_argument("--no-dlib", action="store_true", help="pinsface only")
    parser.add_argument("--limit-folds", type=int, metavar="K", help="the first K folds only (a quick look)")
    args = parser.parse_args()
    from pinsface.api import VERIFY_THRESHOLD

    lfw = Path(args.lfw)
    try:
        pairs = read_pairs(lfw, Path(args.pairs), args.limit_folds)
    except (OSError, ValueError) as exc:
        sys.exit(f"cannot read the pairs: {exc}")
    images = pairs.images()
    absent = [p for p in images if not p.is_file()]
    if absent:
        sys.exit(f"{len(absent)} of the {len(images)} images in the pairs are not under {lfw}, e.g. {absent[0]}")
    models = None if args.no_dlib else dlib_models()
    n_folds = len(np.unique(pairs.fold))
    print(f"{len(pairs.a)} pairs in {n_folds} folds, {len(images)} images, from {lfw}", flush=True)

    rows = []
    for mirror in (False, True):
        vectors, missing, seconds = pinsface_vectors(images, mirror)
        how = "pairs called different" if missing else "-"
        label = f"pinsface {'mirror-averaged' if mirror else 'plain'}"
        rows.append(result_row(label, pairs, vectors, f"{missing} no face ({how}); {seconds:.0f} s"))
    default_vectors = vectors  # describe's default (mirror-averaged): what pinsface.verify compares
    if models is None:
        rows.append("dlib's own pipeline: not run (" + ("--no-dlib" if args.no_dlib else "no 'peers' extra") + ")")
    else:
        tables, missed, seconds = dlib_vectors(models, images, args.jitters)
        for name, vectors in tables.items():
            how = f"{missed} HOG misses (centred box)" if missed else "0 HOG misses"
            label = {"plain": "dlib plain", "mirror": "dlib mirror-averaged"}.get(
                name, f"dlib num_jitters={args.jitters}"
            )
            rows.append(result_row(label, pairs, vectors, f"{how}; {seconds:.0f} s for all dlib rows"))
    print()
    print(f"{'':34s} {'accuracy %':>14s}   {'best threshold (acc %)':>22s}   {'fold thresholds: median [range]':>31s}")
    for row in rows:
        print(row)
    print(f"accuracy: mean ± sample std over the {n_folds} folds, each at the threshold best on the other folds")
    at_default = np.mean((pair_distances(pairs, default_vectors) <= VERIFY_THRESHOLD) == pairs.same)
    print(
        f"pinsface.verify's default threshold (VERIFY_THRESHOLD {VERIFY_THRESHOLD}) on all pairs, mirror-averaged "
        f"descriptors: accuracy {100 * at_default:.2f}"
    )


if __name__ == "__main__":
    main()

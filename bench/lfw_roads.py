"""Roads to higher verification accuracy, on bench/lfw.py's pairs and protocol: each changes one thing in how
pinsface's descriptor of a photo's main face is made, and is scored with the same 10 folds.

Every image is detected once with the public API (``pinsface.detect``: MTCNN's box and 5 landmarks of the main
face) and decoded once (``pinsface.load_image``); the chips are then cut and embedded here (the embedding
network and precision of ``pinsface.describe``), so the rows differ only in:
- mirror: the chip's own descriptor, or averaged with its mirror image's (``describe``'s default);
- jitter: averaged over V views, each with its mirror image: the chip and V-1 random affine copies of it
  (bench/jitter.py's shift/scale/rotation), as dlib's ``num_jitters`` averages jittered copies;
- template: FaceSettings.template_scale / template_shift (the chip's framing) other than the default;
- landmarks: the chip cut by dlib's ``get_face_chip(size=150, padding=0.25)`` from dlib's 5-point landmarks,
  found in MTCNN's box, or in dlib's HOG box (MTCNN's where HOG finds none), instead of MTCNN's landmarks;
- precision: the network in float32 rather than the default precision.
Where MTCNN finds no face the image's pairs are called different, as in bench/lfw.py.

    python bench/lfw_roads.py --lfw DIR --pairs pairs.txt [--views 2 4] [--no-dlib] [--limit-folds K]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from jitter import jitter
from lfw import dlib_models, main_face, progress, read_pairs, scored

TEMPLATES = {f"template_scale={v:g}": {"template_scale": v} for v in (0.95, 1.05, 1.1, 1.15)}
TEMPLATES |= {f"template_shift=(0, {dy:+g})": {"template_shift": (0.0, dy)} for dy in (-3.0, 3.0)}


def detect_all(images: list[Path]) -> tuple[dict, dict]:
    """Each image's pixels and its main face (None where no face), through the public API."""
    import pinsface

    pixels, faces, start = {}, {}, time.perf_counter()
    for i, path in enumerate(images, 1):
        pixels[path] = pinsface.load_image(path)
        faces[path] = main_face(pinsface.detect(pixels[path]))
        progress("detect", i, len(images), start)
    print(f"  detected {len(images)} images in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return pixels, faces


def mtcnn_chips(pixels: dict, faces: dict, settings) -> dict:
    from pinsface.faces import align_face

    return {
        p: align_face(pixels[p], np.asarray(f.landmarks, np.float32), settings)
        for p, f in faces.items()
        if f is not None
    }


def dlib_chips(models, pixels: dict, faces: dict, use_hog: bool) -> dict:
    """dlib's chip from its 5-point landmarks in MTCNN's box, or in the largest HOG box where there is one."""
    import dlib

    detector, landmarks, _ = models
    out = {}
    for p, face in faces.items():
        if face is None:
            continue
        x, y, w, h = face.box
        box = dlib.rectangle(int(round(x)), int(round(y)), int(round(x + w)), int(round(y + h)))
        if use_hog:
            boxes = detector(pixels[p], 1)
            box = max(boxes, key=lambda b: b.area()) if len(boxes) else box
        out[p] = dlib.get_face_chip(pixels[p], landmarks(pixels[p], box), size=150, padding=0.25)
    return out


def embed(embedder, chips: dict, views: int = 1, seed: int = 0) -> tuple[dict, dict]:
    """Plain descriptors (view 1 alone, no mirror) and the mean over ``views`` views and their mirrors."""
    keys = list(chips)
    crops = np.stack([chips[k] for k in keys])
    face, flipped = embedder.both_views(crops)
    total = face + flipped
    for view in range(1, views):
        a, b = embedder.both_views(jitter(crops, np.random.default_rng([seed, view]), 3.0, 0.04, 4.0))
        total += a + b
    return dict(zip(keys, face)), dict(zip(keys, total / (2 * views)))


def row(label: str, pairs, vectors: dict, seconds: float, reference: list) -> str:
    """One result line; the first row scored becomes the ``reference`` that later rows are compared with, fold
    by fold (mean change in accuracy, and the folds it raised / lowered)."""
    accs, limits, text = scored(pairs, vectors)
    if not reference:
        reference.append(accs)
    change = accs - reference[0]
    return (
        f"{label:48s} {text}   {np.median(limits):6.4f}"
        f"   {100 * change.mean():+5.2f} ({(change > 0).sum()}/{(change < 0).sum()})   {seconds:4.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lfw", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--views", type=int, nargs="*", default=[2, 4], help="jittered view counts to try")
    parser.add_argument("--no-dlib", action="store_true", help="skip the dlib-landmark rows")
    parser.add_argument("--limit-folds", type=int, metavar="K")
    args = parser.parse_args()

    from pinsface.backbones import get_backbone
    from pinsface.embeddings import Embedder, run_embedder
    from pinsface.settings import FaceSettings, Settings

    try:
        pairs = read_pairs(Path(args.lfw), Path(args.pairs), args.limit_folds)
    except (OSError, ValueError) as exc:
        sys.exit(f"cannot read the pairs: {exc}")
    images = pairs.images()
    print(f"{len(pairs.a)} pairs in {len(np.unique(pairs.fold))} folds, {len(images)} images", flush=True)
    pixels, faces = detect_all(images)
    settings = Settings()
    backbone = get_backbone(settings.backbone)
    embedder = run_embedder(settings, backbone)
    rows, reference = [], []

    def timed(label_plain, label_mirror, chips, views=1, net=embedder):
        start = time.perf_counter()
        plain, mirrored = embed(net, chips, views)
        seconds = time.perf_counter() - start
        rows.append(row(label_mirror, pairs, mirrored, seconds, reference))
        if label_plain:
            rows.append(row(label_plain, pairs, plain, seconds, reference))
        print(rows[-1 if label_plain is None else -2], file=sys.stderr, flush=True)

    default_chips = mtcnn_chips(pixels, faces, FaceSettings())
    timed("default chip, plain", "default chip, mirror-averaged (describe)", default_chips)
    for views in args.views:
        timed(None, f"default chip, {views} jittered views + mirrors", default_chips, views)
    for label, change in TEMPLATES.items():
        chips = mtcnn_chips(pixels, faces, dataclasses.replace(FaceSettings(), **change))
        timed(f"{label}, plain", f"{label}, mirror-averaged", chips)
    models = None if args.no_dlib else dlib_models()
    if models is not None:
        for use_hog, where in ((False, "MTCNN box"), (True, "HOG box")):
            chips = dlib_chips(models, pixels, faces, use_hog)
            timed(f"dlib 5-point chip ({where}), plain", f"dlib 5-point chip ({where}), mirror-averaged", chips)
    if embedder.precision != "float32":
        timed(None, "default chip, mirror-averaged, float32", default_chips, net=Embedder(backbone, 64, "float32"))

    print()
    print(
        f"{'':48s} {'accuracy %':>14s}   {'best threshold (acc %)':>22s}   {'fold median':>11s}"
        f"   {'vs describe (+/- folds)':>23s}   embed"
    )
    print("\n".join(rows))
    missing = sum(f is None for f in faces.values())
    print(f"{missing} of {len(images)} images without an MTCNN face: their pairs called different")
    print(f"network precision (default): {embedder.precision}; accuracy: mean ± sample std over the folds;")
    print("vs describe: the mean change in fold accuracy from the first row, and the folds it raised/lowered")


if __name__ == "__main__":
    main()

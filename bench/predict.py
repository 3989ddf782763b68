"""Speed of naming faces: `Recognizer.load` cold start, then batched `identify_many` photos/s and faces/s on
the shared 224-px Pins images and on 1024-px group composites (medians of repeats).

    python bench/predict.py --run RUN_DIR [--images 256] [--repeats 3] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pinsface.testing.shared import pins_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402  (the set-up above must come first)

PINS = pins_dir()
LOAD = (
    "import sys, time; t = time.perf_counter(); from pinsface.predict import Recognizer; "
    "Recognizer.load(sys.argv[1]); print(time.perf_counter() - t)"
)


def composites(files: list[Path], folder: Path, n: int = 8, size: int = 1024) -> list[str]:
    """1024x1024 photos, each a 3x3 collage of Pins portraits with a few cells left empty."""
    import cv2

    from pinsface.images import load_image

    rng = np.random.default_rng(0)
    paths = []
    cell = size // 3
    for k in range(n):
        canvas = np.full((size, size, 3), 90, np.uint8)
        for slot in rng.choice(9, size=rng.integers(4, 7), replace=False):
            image = load_image(files[int(rng.integers(len(files)))])
            r, c = divmod(int(slot), 3)
            canvas[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = cv2.resize(image, (cell, cell))
        path = folder / f"composite_{k}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    return paths


def measure(recognizer, paths, repeats, batch_size):
    recognizer.identify_many(paths[:batch_size], batch_size=batch_size)  # warm up the graphs
    rates, face_rates = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results = recognizer.identify_many(paths, batch_size=batch_size)
        seconds = time.perf_counter() - start
        rates.append(len(paths) / seconds)
        face_rates.append(sum(len(r.faces) for r in results) / seconds)
    return statistics.median(rates), statistics.median(face_rates), sum(len(r.faces) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/latest")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    loads = [
        float(
            subprocess.run([sys.executable, "-c", LOAD, args.run], capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        for _ in range(args.repeats)
    ]
    print(f"Recognizer.load cold start (fresh process, median of {args.repeats}): {statistics.median(loads):.2f} s")

    from pinsface.predict import Recognizer

    recognizer = Recognizer.load(args.run)
    files = sorted(PINS.rglob("*.jpg"))[:: max(1, len(list(PINS.rglob("*.jpg"))) // args.images)][: args.images]
    photos, faces, n_faces = measure(recognizer, [str(f) for f in files], args.repeats, args.batch_size)
    print(
        f"224-px Pins photos: {photos:.1f} photos/s, {faces:.1f} faces/s ({len(files)} photos, {n_faces} faces, "
        f"batch {args.batch_size}, median of {args.repeats})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        big = composites(files, Path(tmp))
        photos, faces, n_faces = measure(recognizer, big, args.repeats, 8)
    print(
        f"1024-px composites: {photos:.2f} photos/s, {faces:.1f} faces/s ({len(big)} photos, {n_faces} faces, "
        f"median of {args.repeats})"
    )


if __name__ == "__main__":
    main()

"""Does an image's detection depend on its batch? Shared Pins crops detected in batches of 64 (as `prepare`
detects them, each image with its own smallest and coarse face size) and one by one; and the CPU time of the
batched detection (median of 3).

    python bench/detector_batches.py [--every 20] [--images 512]

Prints how many images got other faces in the batch than alone (landmarks differing at all, and by more than
0.5 px or in the number of faces). Run it on two checkouts (PYTHONPATH=that checkout's src) to compare them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from pinsface.testing.shared import pins_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
PINS = pins_dir()

import numpy as np  # noqa: E402  (the set-up above must come first)


def landmarks(faces) -> np.ndarray:
    return np.array([f.landmarks for f in faces], dtype=np.float64).reshape(-1, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=20, help="every Nth image of the sorted Pins files")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    from pinsface.faces import FaceDetector, min_subject_size
    from pinsface.images import load_image
    from pinsface.settings import FaceSettings

    files = sorted(PINS.rglob("*.jpg"))[:: args.every][: args.images]
    images = [load_image(f) for f in files]
    settings = FaceSettings()
    detector = FaceDetector(settings)
    sizes = [min_subject_size(im.shape, settings) for im in images]
    detector.detect(images[:1], sizes[:1], coarse_sizes=sizes[:1])  # traces the graphs
    spent = []
    for _ in range(3):
        start = time.process_time()
        batched = []
        for k in range(0, len(images), args.batch):
            part = slice(k, k + args.batch)
            batched += detector.detect(images[part], sizes[part], coarse_sizes=sizes[part])
        spent.append(time.process_time() - start)
    alone = [detector.detect([im], [m], coarse_sizes=[m])[0] for im, m in zip(images, sizes)]
    differ = large = 0
    for a, b in zip(batched, alone):
        if len(a) != len(b):
            differ, large = differ + 1, large + 1
        elif len(a) and np.abs(landmarks(a) - landmarks(b)).max() > 0:
            differ += 1
            large += int(np.abs(landmarks(a) - landmarks(b)).max() > 0.5)
    print(f"python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}")
    print(
        f"{len(images)} Pins crops in batches of {args.batch} vs one by one: {differ} with other landmarks, "
        f"{large} by more than 0.5 px or another number of faces; batched detection "
        f"{1000 * statistics.median(spent) / len(images):.2f} ms of CPU per image (median of 3)"
    )


if __name__ == "__main__":
    main()

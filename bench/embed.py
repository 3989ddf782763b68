"""Backbone throughput: aligned faces embedded per second at a given batch size (median of repeats).

    python bench/embed.py [--batch-size 32] [--repeats 5] [--batches 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()

    from pinsface.backbones import get_backbone
    from pinsface.embeddings import Embedder

    t0 = time.perf_counter()
    backbone = get_backbone()
    build = time.perf_counter() - t0
    embedder = Embedder(backbone, args.batch_size)
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (args.batch_size * args.batches, 150, 150, 3), dtype=np.uint8)
    embedder(faces[: args.batch_size])  # trace and warm up
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        embedder(faces)
        rates.append(len(faces) / (time.perf_counter() - start))
    print(f"backbone build + weights: {build:.2f} s")
    print(f"batch {args.batch_size}: median {statistics.median(rates):.0f} faces/s "
          f"(min {min(rates):.0f}, max {max(rates):.0f}, {args.repeats} repeats of {len(faces)} faces)")


if __name__ == "__main__":
    main()

"""Backbone throughput: aligned faces embedded per second at a given batch size (median of repeats), in
float32 and, where the CPU has it, bfloat16 (what pinsface uses there).

    python bench/embed.py [--batch-size 32] [--repeats 5] [--batches 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402  (the set-up above must come first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()

    from pinsface.backbones import get_backbone
    from pinsface.embeddings import Embedder, cpu_has_bf16

    t0 = time.perf_counter()
    backbone = get_backbone()
    build = time.perf_counter() - t0
    print(f"backbone build + weights: {build:.2f} s")
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (args.batch_size * args.batches, 150, 150, 3), dtype=np.uint8)
    precisions = ["float32"] + (["bfloat16"] if cpu_has_bf16() else [])
    for precision in precisions:
        embedder = Embedder(backbone, args.batch_size, precision)
        embedder(faces[: args.batch_size])  # trace and warm up
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            embedder(faces)
            rates.append(len(faces) / (time.perf_counter() - start))
        print(
            f"{precision}, batch {args.batch_size}: median {statistics.median(rates):.0f} faces/s "
            f"(min {min(rates):.0f}, max {max(rates):.0f}, {args.repeats} repeats of {len(faces)} faces)"
        )
    if len(precisions) == 1:
        print("bfloat16: not measured, this CPU has no native bf16 (pinsface embeds in float32 here)")


if __name__ == "__main__":
    main()

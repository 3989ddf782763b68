"""Train both models on the shared Pins data and print test top-1, top-5, macro-F1 and stage timings.

    python bench/accuracy.py [--data DIR] [--out runs/bench] [--models embedding pixels-mlp]

Uses the normal cache (so a second run measures warm timings); pass --cache to choose it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--models", nargs="+", default=["embedding", "pixels-mlp"])
    args = parser.parse_args()

    from pinsface.pipeline import run
    from pinsface.settings import Settings

    rows = []
    for model in args.models:
        start = time.perf_counter()
        metrics = run(args.data, Path(args.out) / model, Settings(model=model), cache_dir=args.cache, progress=False)
        total = time.perf_counter() - start
        history = json.loads((Path(args.out) / model / "history.json").read_text())
        rows.append((model, metrics, history["timings_seconds"], total))
    for model, m, timings, total in rows:
        print(
            f"{model:12s} top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
            f"({m['n_images']} test images, {m['n_no_face']} no face)  run {total:.0f} s"
        )
        print(f"{'':12s} train stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        print(f"{'':12s} evaluate: " + ", ".join(f"{k} {v:.1f} s" for k, v in m["seconds"].items()))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

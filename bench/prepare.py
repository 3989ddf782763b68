"""Cold and warm `prepare` throughput and peak memory on N shared Pins images (default: all of them).

    python bench/prepare.py [--limit N] [--repeats 3]

Cold: a fresh cache, every image detected and cropped. Warm: the same folder again, everything read from the
cache, then every cached crop loaded into memory. Each phase runs in its own process so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from pinsface.testing.shared import pins_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PHASE = r"""
import json, resource, sys, time
from pinsface.dataset import scan_dataset
from pinsface.prepare import prepare
data, cache, limit, phase = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
dataset = scan_dataset(data)
if limit:
    dataset.items = dataset.items[:limit]
t = time.perf_counter()
result = prepare(data, cache, progress=False, dataset=dataset)
seconds = time.perf_counter() - t
out = {"images": len(dataset.items), "seconds": seconds, "from_cache": result.summary["from_cache"],
       "faces_found": result.summary["faces_found"], "no_face": result.summary["no_face"]}
if phase == "warm":
    t = time.perf_counter()
    table = result.faces()
    out["crops_seconds"] = time.perf_counter() - t
    out["crops_loaded"] = len(table.index)
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def phase(data: str, cache: str, limit: int, name: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PHASE, data, cache, str(limit), name], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        default=str(pins_dir()),
    )
    parser.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    parser.add_argument("--repeats", type=int, default=3, help="warm repeats (the median is reported)")
    args = parser.parse_args()

    cache = tempfile.mkdtemp(prefix="pinsface-bench-")
    try:
        cold = phase(args.data, cache, args.limit, "cold")
        warm = [phase(args.data, cache, args.limit, "warm") for _ in range(args.repeats)]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    n = cold["images"]
    print(f"images: {n} ({cold['faces_found']} faces found, {cold['no_face']} without a face)")
    print(
        f"cold prepare: {cold['seconds']:.1f} s = {n / cold['seconds']:.1f} images/s, "
        f"peak RSS {cold['peak_rss_mb']:.0f} MB"
    )
    ws = statistics.median(w["seconds"] for w in warm)
    cs = statistics.median(w["crops_seconds"] for w in warm)
    print(f"warm prepare (all cached, median of {len(warm)}): {ws:.2f} s = {n / ws:.0f} images/s")
    print(
        f"warm load of all cached crops (median of {len(warm)}): {cs:.2f} s = "
        f"{warm[0]['crops_loaded'] / cs:.0f} images/s, peak RSS {max(w['peak_rss_mb'] for w in warm):.0f} MB"
    )


if __name__ == "__main__":
    main()

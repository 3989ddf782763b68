"""`pinsface index` photos/s on the shared 224-px Pins photos.

    nice -n 10 python bench/index.py [--photos 1000] [--db postgresql://...]

Copies --photos Pins photos (spread over the identities) into a temporary library, then times: a cold index
(fresh face cache and database: detection, alignment, embedding, storing), a second index (nothing changed),
and an index into a new database with the face cache warm (no detection). Prints photos/s for each, CPU
seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> None:
    from pinsface.dataset import default_data_dir, scan_dataset
    from pinsface.library_index import index_library
    from pinsface.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--db", help="a database URL (default: a SQLite file in the temporary folder)")
    args = parser.parse_args()
    dataset = scan_dataset(default_data_dir())
    step = max(1, len(dataset.items) // args.photos)
    items = dataset.items[::step][: args.photos]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "library"
        for it in items:
            (root / it.identity).mkdir(parents=True, exist_ok=True)
            shutil.copy(dataset.path(it), root / it.identity / Path(it.rel).name)
        settings = Settings(cache_dir=str(Path(tmp) / "cache"))
        db = args.db or str(Path(tmp) / "library.db")
        print(f"{len(items)} photos, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        for label, target in (("cold (fresh cache and DB)", db), ("again (nothing changed)", db)):
            s, wall, cpu = timed(lambda target=target: index_library(root, target, settings=settings))
            print(
                f"{label}: {len(items) / wall:.1f} photos/s, {wall:.1f} s wall, {cpu:.1f} CPU s, "
                f"{s['faces_added']} faces added",
                flush=True,
            )
        if not args.db:
            s, wall, cpu = timed(lambda: index_library(root, str(Path(tmp) / "warm.db"), settings=settings))
            print(
                f"new DB, warm face cache: {len(items) / wall:.1f} photos/s, {wall:.1f} s wall, {cpu:.1f} CPU s, "
                f"{s['faces_added']} faces added"
            )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()

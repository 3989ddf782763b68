"""The Ray engine's throughput on this machine, and what it means for 10 million images on a cluster.

    nice -n 10 python bench/scale.py [--images 384] [--chunk 32]

Measures, on a sample of the shared Pins images (fresh caches each time, so every image is processed):
- the local engine (prepare, then the embeddings), for reference;
- the Ray engine on a local instance with 1 worker and with 2 workers (decode, detect, align, crop, embed), as
  total wall time and as steady-state images/s (from the first finished chunk to the last, actor start-up left out);
- the driver's time per image: listing the folder and hashing the files (every image, over the whole shared data)
  and writing the results into the caches;
- the bytes per image written to the caches and read from the data folder.
Then projects the time for 10 million images on N machines of K cores, and names the first bottleneck.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pinsface.testing.shared import pins_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402  (the set-up above must come first)

PINS = pins_dir()
TARGET = 10_000_000


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def sample_dataset(dest: Path, n: int) -> list[Path]:
    folders = sorted(p for p in PINS.iterdir() if p.is_dir())
    per = max(1, n // len(folders) + 1)
    files = [f for folder in folders for f in sorted(folder.glob("*.jpg"))[:per]][:n]
    for f in files:
        target = dest / f.parent.name
        target.mkdir(parents=True, exist_ok=True)
        os.symlink(f, target / f.name)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=32, help="images per Ray row (the local engine uses 512)")
    parser.add_argument(
        "--fs-mb-per-s",
        type=float,
        default=500.0,
        help="assumed bandwidth of the shared file system holding data and cache (MB/s)",
    )
    args = parser.parse_args()

    import ray

    from pinsface.cache import FaceCache, content_hash
    from pinsface.dataset import scan_dataset
    from pinsface.embeddings import ensure_embeddings, run_embedder, run_embedding_cache
    from pinsface.images import read_bytes
    from pinsface.prepare import prepare
    from pinsface.ray_engine import RayTarget, prepare_on_ray
    from pinsface.settings import Settings

    settings = Settings()
    tmp = Path(tempfile.mkdtemp(prefix="pinsface-scale-"))
    data = tmp / "data"
    files = sample_dataset(data, args.images)
    mean_file = float(np.mean([f.stat().st_size for f in files]))
    print(f"sample: {len(files)} images from {PINS} (mean file {mean_file / 1024:.1f} KiB), {os.cpu_count()} CPUs")

    # Driver: listing and hashing every image of the shared data, as prepare does before any work is sent out.
    t, c = time.perf_counter(), time.process_time()
    full = scan_dataset(PINS)
    listing, listing_cpu = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda it: content_hash(read_bytes(full.path(it))), full.items))
    hashing, hashing_cpu = time.perf_counter() - t, time.process_time() - c
    n_full = len(full.items)
    print(
        f"driver: listing {n_full:,} images {listing:.2f} s ({1e6 * listing_cpu / n_full:.0f} CPU us/image), "
        f"hashing {hashing:.2f} s ({1e6 * hashing_cpu / n_full:.0f} CPU us/image)"
    )

    # Local engine, for reference: faces, then embeddings.
    from pinsface.backbones import get_backbone

    cache = tmp / "cache-local"
    t = time.perf_counter()
    local = prepare(data, cache, settings.faces, progress=False)
    faces_s = time.perf_counter() - t
    hashes = [h for h in local.hashes if h]
    t = time.perf_counter()
    ensure_embeddings(
        hashes,
        local.cache,
        run_embedding_cache(settings, cache),
        run_embedder(settings, get_backbone(settings.backbone)),
        progress=False,
    )
    embed_s = time.perf_counter() - t
    local_rate = len(files) / (faces_s + embed_s)
    print(f"local engine: {faces_s:.1f} s faces + {embed_s:.1f} s embeddings = {local_rate:.2f} images/s")
    cache_bytes = folder_bytes(cache) / len(files)

    dataset = scan_dataset(data)
    paths = [str(dataset.path(it)) for it in dataset.items]
    digests = [content_hash(read_bytes(p)) for p in paths]
    rates, cpu_rate = {}, {}
    for workers in (1, 2):
        ray.init(
            address="local",
            num_cpus=workers,
            object_store_memory=512 * 2**20,
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            cache = tmp / f"cache-ray-{workers}"
            arrivals = []
            face_cache = FaceCache(cache, settings.faces.version())

            class Timed:  # records when each chunk's results reach the driver
                def write(self, records, arrivals=arrivals, face_cache=face_cache):
                    arrivals.append((time.perf_counter(), len(records)))
                    face_cache.write(records)

                root = face_cache.root

            t = time.perf_counter()
            report = prepare_on_ray(
                paths,
                digests,
                Timed(),
                settings.faces,
                embed=settings,
                target=RayTarget(workers=workers),
                chunk_images=args.chunk,
            )
            wall = time.perf_counter() - t
        finally:
            ray.shutdown()
        first_t, first_n = arrivals[0]
        steady = (sum(n for _, n in arrivals[1:]) / (arrivals[-1][0] - first_t)) if len(arrivals) > 2 else float("nan")
        rates[workers] = steady
        cpu_rate[workers] = len(paths) / report["worker_cpu_seconds"]
        # CPU time of the driver's thread: on this shared machine wall time mostly measures waiting for a core.
        write_us = 1e6 * report["driver_write_cpu_seconds"] / len(paths)
        print(
            f"ray engine, {workers} worker(s): {wall:.1f} s wall for {len(paths)} images "
            f"({len(paths) / wall:.2f} images/s with start-up; first chunk after {first_t - t:.1f} s), "
            f"steady state {steady:.2f} images/s; {cpu_rate[workers]:.2f} images per worker CPU second; "
            f"driver cache writes {write_us:.0f} CPU us/image "
            f"({1e6 * report['driver_write_seconds'] / len(paths):.0f} us/image wall)"
        )
    efficiency = rates[2] / (2 * rates[1])
    # Projected per core from the workers' CPU time (the machine is shared: wall rates undercount a core).
    per_core = cpu_rate[2]
    driver_us = 1e6 * (listing_cpu + hashing_cpu) / n_full + write_us
    print(
        f"per worker core (CPU time): {per_core:.2f} images/s; wall: 1 worker {rates[1]:.2f}, 2 workers "
        f"{rates[2]:.2f} images/s on this shared 2-core machine ({100 * efficiency:.0f}% of twice one)"
    )
    print(
        f"driver: {driver_us:.0f} CPU us/image in all -> at most {1e6 / driver_us:,.0f} images/s from one driver core"
    )
    print(
        f"bytes per image: {cache_bytes / 1024:.1f} KiB written to the caches, {mean_file / 1024:.1f} KiB read "
        f"(twice: the driver hashes it, a worker decodes it)"
    )

    # Projection: workers scale with cores (one worker per core, each at its measured CPU rate: workers share
    # nothing but the driver and the file system), against the driver and the shared file system (reads twice,
    # plus cache writes).
    fs_rate = args.fs_mb_per_s * 2**20 / (2 * mean_file + cache_bytes)
    driver_rate = 1e6 / driver_us
    print(
        f"\nprojection for {TARGET:,} images (assumed shared file system: {args.fs_mb_per_s:.0f} MB/s -> "
        f"{fs_rate:,.0f} images/s; driver {driver_rate:,.0f} images/s):"
    )
    print(f"{'machines':>8s} {'cores':>5s} {'workers img/s':>13s} {'cluster img/s':>13s} {'hours':>7s}  bottleneck")
    for machines, cores in ((1, 2), (1, 16), (4, 16), (16, 16), (16, 64), (64, 64)):
        worker_rate = machines * cores * per_core
        rate = min(worker_rate, driver_rate, fs_rate)
        limit = {worker_rate: "workers", driver_rate: "driver", fs_rate: "file system"}[rate]
        print(f"{machines:>8d} {cores:>5d} {worker_rate:>13,.0f} {rate:>13,.0f} {TARGET / rate / 3600:>7.1f}  {limit}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

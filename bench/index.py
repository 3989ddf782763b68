"""`pinsface index` speed: 224-px Pins photos, 12-MP photos, and new photos added to a large library.

    nice -n 10 python bench/index.py [--photos 1000] [--db postgresql://...]
    nice -n 10 python bench/index.py --megapixels 12 [--photos 100] [--repeats 3] [--stages]
    nice -n 10 python bench/index.py --into-library 100000 [--photos 1000] [--repeats 1] [--server postgresql://...]

Default: copies --photos Pins photos (spread over the identities) into a temporary library, then times a cold
index (fresh face cache and database: detection, alignment, embedding, storing), a second index (nothing
changed), and an index into a new database with the face cache warm (no detection).

--megapixels M: --photos photos of M megapixels (4:3), each with 2-4 Pins faces of different people at
--face-range of the shorter side (pinsface.testing.photos.group_photo); each repeat indexes them cold (fresh
face cache and database). Prints photos/s (wall), CPU s, faces found against faces pasted. With --stages, prints
instead where one thread's CPU time goes in finding their faces (bench/photos.py's stages, every face) and in
embedding them.

--into-library N: a library database of N faces (synthetic descriptors around the real ones, as
bench/cluster.py draws them; --faces-per-photo faces to a photo, each photo a small file in the library folder
so that index looks at it as at any unchanged photo), clustered once with `pinsface cluster`. Then --photos new
224-px Pins photos are added to the folder and indexed cold into it, and clustered again (incrementally); the
same photos indexed cold into an empty database are their own detection time. The target: the difference is at
most 10 s for 1,000 photos. --server runs it on PostgreSQL (a database per step on that server, dropped at the
end) instead of SQLite. --profile prints where the time of the first timed index went (cProfile).

Every figure is printed with the load average: other processes share these CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import itertools
import os
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library_fill import build_library_db, db_size, drop_created, fresh_db  # noqa: E402

_names = itertools.count()
PER = 10  # faces of a person: in the new photos and the large library (bench/gallery_scale.py's FACES_PER_IDENTITY)


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def load() -> str:
    return "load " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def peak_rss() -> str:
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB"


def pins_items(count: int, per_identity: int | None = None):
    """``count`` Pins photos spread over the identities, or ``per_identity`` photos of each of the first
    ``count / per_identity`` identities."""
    from pinsface.dataset import default_data_dir, scan_dataset

    dataset = scan_dataset(default_data_dir())
    if per_identity is None:
        step = max(1, len(dataset.items) // count)
        return dataset, dataset.items[::step][:count]
    by_identity: dict[str, list] = {}
    for it in dataset.items:
        by_identity.setdefault(it.identity, []).append(it)
    items = [it for group in by_identity.values() for it in group[:: max(1, len(group) // per_identity)][:per_identity]]
    return dataset, items[:count]


def copy_pins(root: Path, count: int, per_identity: int | None = None) -> None:
    dataset, items = pins_items(count, per_identity)
    for it in items:
        (root / it.identity).mkdir(parents=True, exist_ok=True)
        shutil.copy(dataset.path(it), root / it.identity / Path(it.rel).name)


def index_cold(root: Path, url: str, tmp: Path, profile: bool = False) -> tuple[dict, float, float]:
    """One index of ``root`` into ``url`` with a fresh face cache: (summary, wall s, CPU s)."""
    from pinsface.library_index import index_library
    from pinsface.settings import Settings

    settings = Settings(cache_dir=str(tmp / f"cache_{next(_names)}"))

    def run() -> dict:
        return index_library(root, url, settings=settings)

    if not profile:
        return timed(run)
    profiler = cProfile.Profile()
    out = timed(lambda: profiler.runcall(run))
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    return out


def warm_up(folder: Path, tmp: Path, photos: int = 8) -> None:
    """Index a few of these photos once, untimed, so the first timed index does not pay for loading the models
    and tracing their graphs."""
    few = tmp / f"warm_up_{next(_names)}"
    for k, path in enumerate(sorted(folder.rglob("*.jpg"))[:photos]):
        few.mkdir(exist_ok=True)
        shutil.copy(path, few / f"{k}.jpg")
    index_cold(few, str(tmp / f"warm_up_{next(_names)}.db"), tmp)
    shutil.rmtree(few)


def median_line(label: str, photos: int, runs: list[tuple[dict, float, float]]) -> float:
    walls, cpus = [r[1] for r in runs], [r[2] for r in runs]
    wall = statistics.median(walls)
    print(
        f"{label}: {photos / wall:.1f} photos/s, median {wall:.1f} s wall of {[round(w, 1) for w in walls]}, "
        f"{statistics.median(cpus):.1f} CPU s, {runs[-1][0]['faces_added']} faces added, {load()}",
        flush=True,
    )
    return wall


def small_photos(args, tmp: Path) -> None:
    """224-px Pins photos: cold, nothing changed, and a new database with the face cache warm."""
    from pinsface.library_index import index_library
    from pinsface.settings import Settings

    root = tmp / "library"
    copy_pins(root, args.photos)
    n = sum(1 for _ in root.rglob("*.jpg"))
    settings = Settings(cache_dir=str(tmp / "cache"))
    db = args.db or str(tmp / "library.db")
    print(f"{n} photos (224 px), {os.cpu_count()} CPUs, {load()}")
    for label, target in (("cold (fresh cache and DB)", db), ("again (nothing changed)", db), ("warm", None)):
        if target is None and args.db:
            break
        target = target or str(tmp / "warm.db")
        s, wall, cpu = timed(lambda target=target: index_library(root, target, settings=settings))
        label = label if label != "warm" else "new DB, warm face cache"
        print(
            f"{label}: {n / wall:.1f} photos/s, {wall:.1f} s wall, {cpu:.1f} CPU s, {s['faces_added']} faces "
            f"added, {load()}",
            flush=True,
        )


def build_large_photos(root: Path, count: int, megapixels: float, face_range, seed: int = 0) -> dict:
    """``count`` JPEGs of ``megapixels`` (4:3) with 2-4 Pins faces each; path -> the faces pasted."""
    from pinsface.testing.photos import group_photo

    dataset, items = pins_items(2000)
    by_identity: dict[str, list[Path]] = {}
    for it in items:
        by_identity.setdefault(it.identity, []).append(dataset.path(it))
    people = sorted(by_identity)
    size = photo_size(megapixels)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    pasted = {}
    for i in range(count):
        who = rng.choice(people, int(rng.integers(2, 5)), replace=False)
        sources = [(by_identity[p][int(rng.integers(0, len(by_identity[p])))], p) for p in who]
        data, placed = group_photo(sources, seed=seed + i, size=size, fractions=face_range)
        (root / f"photo_{i:05d}.jpg").write_bytes(data)
        pasted[str((root / f"photo_{i:05d}.jpg").resolve())] = placed
    return pasted


def large_photos(args, tmp: Path) -> None:
    root = tmp / "library"
    pasted, wall, _ = timed(lambda: build_large_photos(root, args.photos, args.megapixels, args.face_range))
    mb = sum(p.stat().st_size for p in root.iterdir()) / 2**20
    print(
        f"{args.photos} photos of {args.megapixels:g} MP ({mb / args.photos:.1f} MB JPEG each), "
        f"{sum(map(len, pasted.values()))} faces "
        f"pasted at {args.face_range[0]:g}-{args.face_range[1]:g} of the shorter side, built in {wall:.0f} s; "
        f"{os.cpu_count()} CPUs, {load()}",
        flush=True,
    )
    if args.stages:
        stages(sorted(root.glob("*.jpg")))
        return
    warm_up(root, tmp)
    runs = []
    for r in range(args.repeats):
        url = fresh_db(tmp, args.server)
        runs.append(index_cold(root, url, tmp, profile=args.profile and r == 0))
        print(f"  run: {runs[-1][1]:.1f} s wall, {runs[-1][2]:.1f} CPU s, {load()}", flush=True)
    median_line(f"cold index, {args.megapixels:g} MP", args.photos, runs)
    found_pasted(url, pasted, min(photo_size(args.megapixels)))
    print(f"skipped {runs[-1][0]['skipped']}")


def stages(files: list[Path]) -> None:
    """CPU time per photo in each stage of finding every face of ``files`` and embedding them, one thread."""
    from dataclasses import replace

    from photos import print_stages

    from pinsface.backbones import get_backbone
    from pinsface.embeddings import run_embedder
    from pinsface.settings import Settings

    settings = Settings()
    made = print_stages(files, replace(settings.faces, every_face=True))
    chips = np.stack([chip for record in made for chip in record["chips"]])
    embed = run_embedder(settings, get_backbone(settings.backbone))
    embed(chips[:8])
    _, _, cpu = timed(lambda: embed(chips))
    print(f"  embedding ({len(chips)} faces): {1000 * cpu / len(files):.1f} ms")


def photo_size(megapixels: float) -> tuple[int, int]:
    width = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    return width, width * 3 // 4


def found_pasted(url: str, pasted: dict, short: int) -> None:
    """Faces stored against faces pasted, by the pasted face's size (a fraction of the shorter side)."""
    from pinsface.library_db import LibraryDB
    from pinsface.testing.photos import chosen_is

    with LibraryDB.open(url) as db:
        boxes: dict[str, list] = {}
        for face in db.face_list():
            boxes.setdefault(face["source"], []).append(np.array(face["box"]))
    found, total, extra = Counter(), Counter(), 0
    for path, placed in pasted.items():
        for p in placed:
            # the pasted square is 1.25 times the face (pinsface.testing.photos)
            bucket = f"{int(100 * (p.rect[2] - p.rect[0]) / 1.25 / short)}%"
            total[bucket] += 1
            found[bucket] += any(chosen_is(box, p) for box in boxes.get(path, []))
        extra += sum(not any(chosen_is(box, p) for p in placed) for box in boxes.get(path, []))
    by_size = ", ".join(f"{k} {found[k]}/{total[k]}" for k in sorted(total, key=lambda k: int(k[:-1])))
    print(f"faces found {sum(found.values())} of {sum(total.values())} pasted (by size: {by_size}); {extra} other")


def real_descriptors(url: str) -> tuple[np.ndarray, np.ndarray]:
    """The descriptors an index stored, with each face's folder (the Pins identity) as its owner."""
    from pinsface.library_db import LibraryDB

    with LibraryDB.open(url) as db:
        faces = db.face_list()
        x = db.descriptors([f["id"] for f in faces])
    folders = np.array([Path(f["source"]).parent.name for f in faces])
    # bench/gallery_scale.py's statistics take the same number of faces from every identity
    keep = np.concatenate([np.flatnonzero(folders == name)[:PER] for name in sorted(set(folders))])
    keep = keep[[np.sum(folders == folders[k]) >= PER for k in keep]]
    return x[keep], np.unique(folders[keep], return_inverse=True)[1]


def cluster_timed(url: str) -> tuple[dict, float, float]:
    from pinsface.library_cluster import cluster_library
    from pinsface.library_db import LibraryDB

    def run():
        with LibraryDB.open(url) as db:
            return cluster_library(db)

    return timed(run)


def into_library(args, tmp: Path) -> None:
    """--photos new photos into an empty database and into one of --into-library faces, then clustered."""
    from cluster import synthetic

    root = tmp / "library"
    new = root / "new"
    copy_pins(new, args.photos, per_identity=PER)
    n = sum(1 for _ in new.rglob("*.jpg"))
    where = "PostgreSQL" if args.server else "SQLite"
    print(f"{n} new photos (224 px) on {where}, {os.cpu_count()} CPUs, {load()}", flush=True)
    warm_up(new, tmp)
    first = fresh_db(tmp, args.server)
    empty = [index_cold(new, first, tmp)]
    print(f"  into an empty DB: {empty[0][1]:.1f} s wall, {empty[0][2]:.1f} CPU s, {load()}", flush=True)

    rng = np.random.default_rng(0)
    x, owner = real_descriptors(first)
    faces, _ = synthetic(x, owner, -(-args.into_library // PER), PER, rng, vary=False)
    faces = rng.permutation(faces[: args.into_library])  # the faces that share a photo: different people
    big = fresh_db(tmp, args.server)
    _, wall, cpu = timed(lambda: build_library_db(big, root / "old", faces, args.faces_per_photo, rng))
    print(
        f"built a library of {len(faces):,} faces ({-(-len(faces) // args.faces_per_photo):,} photos) from "
        f"{len(x)} real descriptors in {wall:.0f} s; {db_size(big)}, {load()}",
        flush=True,
    )
    s, wall, cpu = cluster_timed(big)
    print(f"first cluster: {wall:.1f} s wall, {cpu:.1f} CPU s, {s}, {load()}", flush=True)
    if args.server is None:
        with contextlib.closing(__import__("sqlite3").connect(big)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    into, incremental = [], []
    for r in range(args.repeats):
        if r:
            empty.append(index_cold(new, fresh_db(tmp, args.server), tmp))
            print(f"  into an empty DB: {empty[-1][1]:.1f} s wall, {empty[-1][2]:.1f} CPU s, {load()}", flush=True)
        target = fresh_db(tmp, args.server, template=big)
        into.append(index_cold(root, target, tmp, profile=args.profile and r == 0))
        print(f"  into the large DB: {into[-1][1]:.1f} s wall, {into[-1][2]:.1f} CPU s, {load()}", flush=True)
        incremental.append(cluster_timed(target))
        print(f"  cluster again: {incremental[-1][1]:.1f} s wall, {incremental[-1][0]}, {load()}", flush=True)
    a = median_line("into an empty DB", n, empty)
    b = median_line(f"into the {len(faces):,}-face DB", n, into)
    c = statistics.median(r[1] for r in incremental)
    cpu = statistics.median(r[2] for r in into) - statistics.median(r[2] for r in empty)
    print(f"difference (target <= 10 s for 1,000 photos): {b - a:.1f} s wall, {cpu:.1f} CPU s")
    print(f"incremental cluster: median {c:.1f} s wall; DB size {db_size(target)}; {load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, help="photos to index (default 1000; 100 with --megapixels)")
    parser.add_argument("--db", help="a database URL (default: a SQLite file in the temporary folder)")
    parser.add_argument("--megapixels", type=float, help="build photos of this size instead of copying Pins photos")
    parser.add_argument("--face-range", type=float, nargs=2, default=(0.04, 0.10), metavar=("LOW", "HIGH"))
    parser.add_argument("--into-library", type=int, help="faces in the library the new photos are added to")
    parser.add_argument("--faces-per-photo", type=int, default=2)
    parser.add_argument("--server", help="PostgreSQL server URL without a database (default: SQLite)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile the first timed index")
    parser.add_argument("--stages", action="store_true", help="with --megapixels: CPU time per stage, one thread")
    args = parser.parse_args()
    args.photos = args.photos or (100 if args.megapixels else 1000)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.megapixels:
                large_photos(args, Path(tmp))
            elif args.into_library:
                into_library(args, Path(tmp))
            else:
                small_photos(args, Path(tmp))
        finally:
            drop_created(args.server)
    print(peak_rss())


if __name__ == "__main__":
    main()

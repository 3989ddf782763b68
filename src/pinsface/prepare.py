"""Dataset -> faces -> cache: detect and crop every image once, and say what happened to each."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pinsface.cache import FaceCache, content_hash
from pinsface.dataset import Dataset, scan_dataset
from pinsface.faces import FaceDetector, align_face, box_crop, choose_face, fallback_landmarks, landmarks_box
from pinsface.images import BadImage, decode_image, read_bytes
from pinsface.settings import FaceSettings

log = logging.getLogger(__name__)

CHUNK_IMAGES = 512


@dataclass
class Prepared:
    """The dataset with each image's content hash and outcome: 'ok', 'no_face' or a skip reason."""

    dataset: Dataset
    hashes: list[str | None]
    status: list[str]
    cache: FaceCache
    summary: dict = field(default_factory=dict)

    def faces(self, crops: tuple[str, ...] = FaceCache.CROPS):
        """The cached face records of every usable image."""
        return self.cache.load([h for h in self.hashes if h], crops=crops)


def face_record(image: np.ndarray, faces, settings: FaceSettings, digest: str) -> dict:
    """What the cache keeps for one image: every detection, the chosen face and its two crops."""
    chosen = choose_face(faces, image.shape)
    if chosen >= 0:
        landmarks, box, fallback = faces[chosen].landmarks, faces[chosen].box, False
    else:
        landmarks = fallback_landmarks(image.shape, settings)
        box, fallback = landmarks_box(landmarks), True
    return {
        "hash": digest,
        "status": "ok" if chosen >= 0 else "no_face",
        "n_faces": len(faces),
        "chosen": chosen,
        "boxes": np.array([f.box for f in faces], dtype=np.float32).reshape(-1, 4),
        "scores": np.array([f.confidence for f in faces], dtype=np.float32),
        "landmarks": np.array([f.landmarks for f in faces], dtype=np.float32).reshape(-1, 5, 2),
        "image_shape": np.array(image.shape[:2], dtype=np.int32),
        "fallback": fallback,
        "aligned": align_face(image, landmarks, settings),
        "box": box_crop(image, box, settings.box_size),
    }


def _hash_file(path: Path) -> tuple[str | None, str | None]:
    """(content hash, None) or (None, skip reason) for one file; never raises."""
    try:
        return content_hash(read_bytes(path)), None
    except BadImage as exc:
        return None, exc.reason


def prepare(data_dir=None, cache_dir=None, settings: FaceSettings | None = None, batch_size: int = 64,
            progress: bool = True, detector: FaceDetector | None = None, dataset: Dataset | None = None,
            engine: str = "local", address: str | None = None, embed=None, workers: int | None = None) -> Prepared:
    """Detect and crop every image of ``data_dir`` that the cache does not have yet.

    ``engine="ray"`` does that work on a Ray cluster (``address``, else a local instance with ``workers`` CPUs),
    and embeds the faces too with the backbone of ``embed`` (a ``Settings``), see ``pinsface.ray_engine``."""
    from tqdm import tqdm

    from pinsface.cache import default_cache_dir
    from pinsface.dataset import default_data_dir

    start = time.perf_counter()
    settings = settings or FaceSettings()
    dataset = dataset or scan_dataset(data_dir if data_dir else default_data_dir())
    cache = FaceCache(cache_dir or default_cache_dir(), settings.version())
    known = cache.known()
    n = len(dataset.items)
    hashes: list[str | None] = [None] * n
    status: list[str] = [""] * n
    skipped_files: list[dict] = []
    todo: list[int] = []
    pool = ThreadPoolExecutor(4)
    for i, (digest, reason) in enumerate(pool.map(lambda it: _hash_file(dataset.path(it)), dataset.items)):
        if reason:
            status[i] = reason
            skipped_files.append({"path": dataset.items[i].rel, "reason": reason})
            continue
        hashes[i] = digest
        if digest not in known:
            todo.append(i)
    from_cache = n - len(todo) - len(skipped_files)
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be local or ray, not {engine!r}")
    ray_report = None
    if engine == "ray" and todo:
        from pinsface.ray_engine import prepare_on_ray

        ray_report = prepare_on_ray([os.path.abspath(dataset.path(dataset.items[i])) for i in todo],
                                    [hashes[i] for i in todo],
                                    cache, settings, embed, address, workers, detect_batch_size=batch_size)
        for j, (reason, detail) in ray_report.pop("errors").items():
            i = todo[j]
            status[i], hashes[i] = reason, None
            skipped_files.append({"path": dataset.items[i].rel, "reason": reason, "detail": detail})
    local = todo if engine == "local" else []

    bar = tqdm(total=len(local), desc="faces", unit="img", disable=not progress, leave=False)
    detector = detector if (detector or not local) else FaceDetector(settings)
    scheduled: set[str] = set()

    def decode(i: int):
        try:
            return decode_image(read_bytes(dataset.path(dataset.items[i])), settings.max_pixels), None
        except BadImage as exc:
            return None, exc

    for lo in range(0, len(local), CHUNK_IMAGES):
        chunk = local[lo:lo + CHUNK_IMAGES]
        records = []
        decoded = list(pool.map(decode, chunk))
        usable = []
        for i, (image, error) in zip(chunk, decoded):
            if error is not None:
                status[i] = error.reason
                hashes[i] = None
                skipped_files.append({"path": dataset.items[i].rel, "reason": error.reason, "detail": error.detail})
                bar.update(1)
            elif hashes[i] not in scheduled:
                scheduled.add(hashes[i])
                usable.append((i, image))
            else:
                bar.update(1)
        for b in range(0, len(usable), batch_size):
            batch = usable[b:b + batch_size]
            images = [image for _, image in batch]
            min_sizes = [settings.min_face_fraction * min(im.shape[:2]) for im in images]
            for (i, image), faces in zip(batch, detector.detect(images, min_sizes)):
                records.append(face_record(image, faces, settings, hashes[i]))
            bar.update(len(batch))
        cache.write(records)
    bar.close()
    pool.shutdown()

    table = cache.load([h for h in hashes if h], crops=())
    n_faces = Counter()
    for i, digest in enumerate(hashes):
        if digest is None:
            continue
        row = table.index.get(digest)
        if row is None:  # written by this run but its chunk vanished: say so rather than guess
            status[i] = "unreadable"
            continue
        status[i] = str(table.columns["status"][row])
        n_faces[i] = int(table.columns["n_faces"][row])
    seconds = time.perf_counter() - start
    skipped = Counter(f["reason"] for f in skipped_files)
    summary = {
        "data_dir": str(dataset.root),
        "identities": len(dataset.identities),
        "images": n,
        "faces_found": sum(1 for s in status if s == "ok"),
        "no_face": sum(1 for s in status if s == "no_face"),
        "skipped": dict(skipped),
        "skipped_files": skipped_files,
        "multi_face": sum(1 for c in n_faces.values() if c > 1),
        "ignored_files": dict(dataset.ignored),
        "empty_folders": dataset.empty_folders,
        "cache_corrupt_chunks": list(cache.corrupt),
        "seconds": round(seconds, 3),
        "images_per_second": round(n / seconds, 1) if seconds > 0 else None,
        "from_cache": from_cache,
        "processed": len(todo),
        "engine": engine,
    }
    if ray_report is not None:
        summary["ray"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in ray_report.items()}
    return Prepared(dataset, hashes, status, cache, summary)


def format_summary(summary: dict) -> str:
    lines = [
        f"identities      {summary['identities']}",
        f"images          {summary['images']}",
        f"faces found     {summary['faces_found']}",
        f"no face         {summary['no_face']}",
        f"multi-face      {summary['multi_face']}",
        f"skipped         {sum(summary['skipped'].values())}"
        + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(summary['skipped'].items())) + ")"
           if summary["skipped"] else ""),
        f"from cache      {summary['from_cache']}",
        f"time            {summary['seconds']:.1f} s ({summary['images_per_second']} images/s)",
    ]
    if summary["ignored_files"]:
        lines.append("ignored files   " + ", ".join(f"{k}: {v}" for k, v in summary["ignored_files"].items()))
    if summary["empty_folders"]:
        lines.append("empty folders   " + ", ".join(summary["empty_folders"]))
    if summary["cache_corrupt_chunks"]:
        lines.append(f"corrupt cache   {len(summary['cache_corrupt_chunks'])} chunk(s) dropped and recomputed")
    for f in summary["skipped_files"][:20]:
        lines.append(f"  skipped {f['path']}: {f['reason']}")
    if len(summary["skipped_files"]) > 20:
        lines.append(f"  ... and {len(summary['skipped_files']) - 20} more (see --json)")
    return "\n".join(lines)

"""Dataset -> faces -> cache: detect and crop every image once, and say what happened to each."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from pinsface.ahead import ahead
from pinsface.cache import FaceCache, content_hash
from pinsface.dataset import Dataset, scan_dataset
from pinsface.face_records import decoded_batches, image_records, with_candidates
from pinsface.faces import FACE_STATUSES, STATUSES, FaceDetector
from pinsface.images import BadImage, read_bytes
from pinsface.settings import FaceSettings

log = logging.getLogger(__name__)

# Images per cache chunk: written together, and detected in batches within it.
CHUNK_IMAGES = 512
# Detector batches worked on at once (see prepare).
DETECT_THREADS = 2
# Threads that read image files (to hash them, or to decode them for the detector).
READ_THREADS = 4


@dataclass
class Prepared:
    """The dataset with each image's content hash and outcome: one of ``faces.STATUSES`` or a skip reason
    (``images.REASONS``)."""

    dataset: Dataset
    hashes: list[str | None]
    status: list[str]
    cache: FaceCache
    summary: dict = field(default_factory=dict)

    def faces(self, crops: tuple[str, ...] = FaceCache.CROPS):
        """The cached face records of every usable image."""
        return self.cache.load([h for h in self.hashes if h], crops=crops)


def usable_status(settings) -> set[str]:
    """The statuses whose images have a face crop to learn from and score: found faces, and with the no-face
    fallback on (``Settings.no_face_fallback``), the mean-landmark crops of images where none was found."""
    from pinsface.faces import FACE_STATUSES

    return {*FACE_STATUSES, "no_face"} if settings.no_face_fallback else set(FACE_STATUSES)


def hash_file(path: Path) -> tuple[str | None, str | None]:
    """(content hash, None) or (None, skip reason) for one file; never raises."""
    try:
        return content_hash(read_bytes(path)), None
    except BadImage as exc:
        return None, exc.reason


def _item_hash(dataset: Dataset, item) -> tuple[str | None, str | None]:
    return hash_file(dataset.path(item)) if item.digest is None else (item.digest, None)


# Descriptor distance (dlib's scale: under 0.6 is the same person) within which a candidate face counts as the
# person's, and the lead it needs over the next candidate, for the second pass to decide a photo.
SUBJECT_DISTANCE = 0.6
SUBJECT_DISTANCE_MARGIN = 0.08
SUBJECT_REFERENCES = 32


def second_pass(
    held: dict, dataset: Dataset, hashes: list, status: list, cache: FaceCache, settings: FaceSettings, *, embedder=None
) -> dict:
    """Choose the subject of held multi-face photos by their faces' distance to the person's single-face photos.

    Done per identity with at least ``subject_pass_min_photos`` held photos and 3 single-face references; other
    held photos keep the rule's choice. Returns counts of what changed."""
    by_identity: dict[str, list[str]] = {}
    for digest, (i, _) in held.items():
        by_identity.setdefault(dataset.items[i].identity, []).append(digest)
    counts = Counter()
    todo = {}
    for identity, digests in by_identity.items():
        if len(digests) < settings.subject_pass_min_photos:
            continue
        refs = [
            hashes[i]
            for i, it in enumerate(dataset.items)
            if it.identity == identity and status[i] in ("ok", "small_face") and hashes[i]
        ]
        if len(refs) >= 3:
            todo[identity] = (digests, refs[:SUBJECT_REFERENCES])
    if not todo:
        return dict(counts)
    if embedder is None:
        from pinsface.backbones import get_backbone
        from pinsface.embeddings import Embedder

        embedder = Embedder(get_backbone())
    table = cache.load(sorted({h for _, refs in todo.values() for h in refs}), crops=("aligned",))
    for digests, refs in todo.values():
        refs = [h for h in refs if h in table]
        if len(refs) < 3:
            continue
        ref_emb = embedder(table.columns["aligned"][table.rows(refs)])
        for digest in digests:
            _, record = held[digest]
            keys = list(record["candidates"])
            emb = embedder(np.stack([record["candidates"][k][0] for k in keys]))
            dist = np.linalg.norm(emb[:, None, :] - ref_emb[None, :, :], axis=2)
            near = np.sort(dist, axis=1)[:, : min(5, len(refs))].mean(axis=1)
            order = np.argsort(near)
            best = int(order[0])
            lead = near[order[1]] - near[best] if len(order) > 1 else np.inf
            if near[best] <= SUBJECT_DISTANCE and lead >= SUBJECT_DISTANCE_MARGIN:
                chosen = keys[best]
                counts["changed" if chosen != record["chosen"] else "confirmed"] += 1
                if record["status"] == "ambiguous":
                    counts["resolved"] += 1
                record["chosen"], record["status"] = chosen, "subject"
                record["aligned"], record["box"] = record["candidates"][chosen]
            else:
                counts["undecided"] += 1
    return dict(counts)


@dataclass
class _ImageOutcomes:
    """Where prepare stands with each image of ``dataset``: its content hash (None once skipped) and status, the
    files skipped, the images the cache does not have yet (``todo``), how many it had (``from_cache``), and the
    number of faces found in each image (``n_faces``, once read back from the cache)."""

    dataset: Dataset
    hashes: list[str | None]
    status: list[str]
    skipped_files: list[dict]
    todo: list[int]
    from_cache: int
    n_faces: Counter = field(default_factory=Counter)

    def skip(self, i: int, reason: str, detail) -> None:
        """Image ``i`` gives no face: record why, in its status and in ``skipped_files``."""
        self.status[i], self.hashes[i] = reason, None
        self.skipped_files.append({"path": self.dataset.items[i].rel, "reason": reason, "detail": detail})


def _hash_images(dataset: Dataset, known, pool: ThreadPoolExecutor) -> _ImageOutcomes:
    """Hash every file of ``dataset``: unreadable ones are skipped, the others not in ``known`` are to do."""
    n = len(dataset.items)
    hashes: list[str | None] = [None] * n
    status: list[str] = [""] * n
    skipped_files: list[dict] = []
    todo: list[int] = []
    # Files are hashed a few hundred per task: one task per file cost more in futures than the hashing itself.
    parts = [dataset.items[lo : lo + 256] for lo in range(0, n, 256)]
    hashed = pool.map(lambda part: [_item_hash(dataset, it) for it in part], parts)
    for i, (digest, reason) in enumerate(result for part in hashed for result in part):
        if reason:
            status[i] = reason
            skipped_files.append({"path": dataset.items[i].rel, "reason": reason})
            continue
        hashes[i] = digest
        if digest not in known:
            todo.append(i)
    from_cache = n - len(todo) - len(skipped_files)
    return _ImageOutcomes(dataset, hashes, status, skipped_files, todo, from_cache)


def _detect_on_ray(
    outcomes: _ImageOutcomes,
    cache: FaceCache,
    settings: FaceSettings,
    *,
    embed,
    address,
    workers,
    chunk_images,
    batch_size,
) -> tuple[dict, dict[str, tuple[int, dict]]]:
    """Detect (and embed) the images still to do on a Ray cluster (``pinsface.ray_engine``). Returns its report and
    the photos with several faces, held for the second pass."""
    from pinsface.ray_engine import RayTarget, prepare_on_ray

    dataset, hashes, todo = outcomes.dataset, outcomes.hashes, outcomes.todo
    ray_report = prepare_on_ray(
        [os.path.abspath(dataset.path(dataset.items[i])) for i in todo],
        [hashes[i] for i in todo],
        cache,
        settings,
        embed=embed,
        target=RayTarget(address, workers),
        chunk_images=chunk_images,
        detect_batch_size=batch_size,
    )
    for j, (reason, detail) in ray_report.pop("errors").items():
        outcomes.skip(todo[j], reason, detail)
    # Photos with several faces: their candidates' crops are cut again here (the workers send back the faces, not
    # the crops), and the second pass chooses among them as for the local engine.
    held: dict[str, tuple[int, dict]] = {}
    position = {hashes[i]: i for i in todo if hashes[i]}
    for digest, record in ray_report.pop("held").items():
        i = position[digest]
        try:
            held[digest] = (i, with_candidates(record, dataset.path(dataset.items[i]), settings))
        except BadImage:  # changed since the worker read it: keep the subject rule's choice
            cache.write([record])
    return ray_report, held


def _detect_locally(
    outcomes: _ImageOutcomes,
    cache: FaceCache,
    settings: FaceSettings,
    *,
    detector: FaceDetector | None,
    batch_size: int,
    chunk_images: int,
    progress: bool,
    on_records,
) -> dict[str, tuple[int, dict]]:
    """Detect and crop the images still to do here, a chunk at a time, each chunk written to the cache (and passed
    to ``on_records``). Returns the photos with several faces, held for the second pass."""
    from tqdm import tqdm

    dataset, hashes, local = outcomes.dataset, outcomes.hashes, outcomes.todo
    held: dict[str, tuple[int, dict]] = {}
    bar = tqdm(total=len(local), desc="faces", unit="img", disable=not progress, leave=False)
    detector = detector if (detector or not local) else FaceDetector(settings)
    scheduled: set[str] = set()
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for lo in range(0, len(local), chunk_images):
            chunk = []
            for i in local[lo : lo + chunk_images]:
                if hashes[i] in scheduled:
                    bar.update(1)
                else:
                    scheduled.add(hashes[i])
                    chunk.append(i)
            records = []
            batches = decoded_batches(pool, [(i, dataset.path(dataset.items[i])) for i in chunk], batch_size, settings)
            # DETECT_THREADS batches are detected at once: while one is in numpy and OpenCV (holding the GIL, on one
            # core), another is in MTCNN's networks, and both cores stay busy. ``held`` is filled from each thread.
            work = partial(image_records, detector, hashes=hashes, settings=settings, held=held)
            for batch, (made, errors) in ahead(batches, work, DETECT_THREADS):
                records.extend(made)
                for i, error in errors:
                    outcomes.skip(i, error.reason, error.detail)
                bar.update(len(batch))
            cache.write(records)
            if on_records is not None:
                on_records(records)
    bar.close()
    return held


def _choose_held_subjects(
    outcomes: _ImageOutcomes, held: dict[str, tuple[int, dict]], cache: FaceCache, settings: FaceSettings
) -> dict:
    """Run the second pass over the held multi-face photos and write their records; returns its counts."""
    hashes, status = outcomes.hashes, outcomes.status
    table = cache.load([h for h in hashes if h], crops=())
    for i, record in held.values():
        status[i] = record["status"]
    for i, digest in enumerate(hashes):
        row = table.index.get(digest) if digest else None
        if row is not None:
            status[i] = str(table.columns["status"][row])
    subject_pass = second_pass(held, outcomes.dataset, hashes, status, cache, settings)
    cache.write([{k: v for k, v in record.items() if k != "candidates"} for _, record in held.values()])
    return subject_pass


def _read_outcomes(outcomes: _ImageOutcomes, cache: FaceCache) -> None:
    """Read each image's status and number of faces back from the cache."""
    table = cache.load([h for h in outcomes.hashes if h], crops=())
    for i, digest in enumerate(outcomes.hashes):
        if digest is None:
            continue
        row = table.index.get(digest)
        if row is None:  # written by this run but its chunk vanished: say so rather than guess
            outcomes.status[i] = "unreadable"
            continue
        outcomes.status[i] = str(table.columns["status"][row])
        outcomes.n_faces[i] = int(table.columns["n_faces"][row])


def _summary(
    outcomes: _ImageOutcomes,
    cache: FaceCache,
    subject_pass: dict,
    *,
    seconds: float,
    engine: str,
    ray_report: dict | None,
) -> dict:
    """What prepare did, as ``pinsface prepare`` prints it (``format_summary``) and runs keep it."""
    dataset, n = outcomes.dataset, len(outcomes.dataset.items)
    skipped = Counter(f["reason"] for f in outcomes.skipped_files)
    counts = Counter(s for s in outcomes.status if s in STATUSES)
    summary = {
        "data_dir": str(dataset.root),
        "identities": len(dataset.identities),
        "images": n,
        "faces_found": sum(counts[s] for s in FACE_STATUSES),
        "no_face": counts["no_face"] + counts["no_face_photo"],
        "outcomes": {s: counts[s] for s in STATUSES},
        "ambiguous": counts["ambiguous"],
        "subject_pass": subject_pass,
        "skipped": dict(skipped),
        "skipped_files": outcomes.skipped_files,
        "multi_face": sum(1 for c in outcomes.n_faces.values() if c > 1),
        "ignored_files": dict(dataset.ignored),
        "empty_folders": dataset.empty_folders,
        "cache_corrupt_chunks": list(cache.corrupt),
        "cache_outdated_chunks": list(cache.outdated),
        "seconds": round(seconds, 3),
        "images_per_second": round(n / seconds, 1) if seconds > 0 else None,
        "from_cache": outcomes.from_cache,
        "processed": len(outcomes.todo),
        "engine": engine,
    }
    if ray_report is not None:
        summary["ray"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in ray_report.items()}
    return summary


def prepare(  # noqa: PLR0913  (a public entry point: its options mirror pinsface prepare's flags)
    data_dir=None,
    cache_dir=None,
    settings: FaceSettings | None = None,
    *,
    batch_size: int = 64,
    progress: bool = True,
    detector: FaceDetector | None = None,
    dataset: Dataset | None = None,
    engine: str = "local",
    address: str | None = None,
    embed=None,
    workers: int | None = None,
    on_records=None,
    chunk_images: int | None = None,
) -> Prepared:
    """Detect and crop every image of ``data_dir`` that the cache does not have yet. ``on_records``, if given,
    is called with each chunk (``chunk_images``, default ``CHUNK_IMAGES``) of new face records once it is in
    the cache (the local engine's).

    ``engine="ray"`` does that work on a Ray cluster (``address``, else a local instance with ``workers`` CPUs),
    and embeds the faces too with the backbone of ``embed`` (a ``Settings``), see ``pinsface.ray_engine``."""
    from pinsface.cache import default_cache_dir
    from pinsface.dataset import default_data_dir

    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be local or ray, not {engine!r}")
    start = time.perf_counter()
    sizes = {"batch_size": batch_size, "chunk_images": chunk_images or CHUNK_IMAGES}
    settings = settings or FaceSettings()
    dataset = dataset or scan_dataset(data_dir if data_dir else default_data_dir())
    cache = FaceCache(cache_dir or default_cache_dir(), settings.version())
    with ThreadPoolExecutor(READ_THREADS) as pool:
        outcomes = _hash_images(dataset, cache.known(), pool)
    ray_report, held = None, {}
    if engine == "ray" and outcomes.todo:
        ray_report, held = _detect_on_ray(
            outcomes, cache, settings, embed=embed, address=address, workers=workers, **sizes
        )
    elif engine == "local":
        held = _detect_locally(
            outcomes, cache, settings, detector=detector, progress=progress, on_records=on_records, **sizes
        )
    subject_pass = _choose_held_subjects(outcomes, held, cache, settings) if held else {}
    _read_outcomes(outcomes, cache)
    seconds = time.perf_counter() - start
    summary = _summary(outcomes, cache, subject_pass, seconds=seconds, engine=engine, ray_report=ray_report)
    return Prepared(dataset, outcomes.hashes, outcomes.status, cache, summary)


def prepare_for_run(
    settings,
    data_dir=None,
    *,
    dataset: Dataset | None = None,
    progress: bool = True,
    engine: str = "local",
    address: str | None = None,
    on_records=None,
) -> Prepared:
    """``prepare`` as a run's ``Settings`` say: its data folder (unless given), cache, face settings, detector
    batch size and, for the Ray engine, the backbone that embeds the faces."""
    return prepare(
        data_dir if data_dir is not None else settings.data_dir,
        settings.cache_dir,
        settings.faces,
        batch_size=settings.detect_batch_size,
        progress=progress,
        dataset=dataset,
        engine=engine,
        address=address,
        embed=settings if settings.model == "embedding" else None,
        on_records=on_records,
    )


def format_summary(summary: dict) -> str:
    lines = [
        f"identities      {summary['identities']}",
        f"images          {summary['images']}",
        f"faces found     {summary['faces_found']}",
        f"no face         {summary['no_face']}"
        + (
            f" ({summary['outcomes']['no_face_photo']} photos, not crop-like: left out)"
            if summary["outcomes"]["no_face_photo"]
            else ""
        ),
        f"multi-face      {summary['multi_face']}",
        f"small face      {summary['outcomes']['small_face']}  (one face, under a fifth of the short side)",
        f"subject chosen  {summary['outcomes']['subject']}  (several faces, one clearly the subject)",
        f"ambiguous       {summary['ambiguous']}  (several faces, none clearly the subject: left out)",
        f"skipped         {sum(summary['skipped'].values())}"
        + (
            " (" + ", ".join(f"{k}: {v}" for k, v in sorted(summary["skipped"].items())) + ")"
            if summary["skipped"]
            else ""
        ),
        f"from cache      {summary['from_cache']}",
        f"time            {summary['seconds']:.1f} s ({summary['images_per_second']} images/s)",
    ]
    if summary["subject_pass"]:
        lines.append("second pass     " + ", ".join(f"{k}: {v}" for k, v in sorted(summary["subject_pass"].items())))
    if summary["ignored_files"]:
        lines.append("ignored files   " + ", ".join(f"{k}: {v}" for k, v in summary["ignored_files"].items()))
    if summary["empty_folders"]:
        lines.append("empty folders   " + ", ".join(summary["empty_folders"]))
    if summary.get("cache_outdated_chunks"):
        lines.append(
            f"outdated cache  {len(summary['cache_outdated_chunks'])} chunk(s) in the old pickle format recomputed"
        )
    if summary["cache_corrupt_chunks"]:
        lines.append(f"corrupt cache   {len(summary['cache_corrupt_chunks'])} chunk(s) dropped and recomputed")
    for f in summary["skipped_files"][:20]:
        lines.append(f"  skipped {f['path']}: {f['reason']}")
    if len(summary["skipped_files"]) > 20:
        lines.append(f"  ... and {len(summary['skipped_files']) - 20} more (see --json)")
    return "\n".join(lines)

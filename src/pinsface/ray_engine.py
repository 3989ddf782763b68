"""The per-image work of ``prepare`` on a Ray cluster (Ray Data), for archives one machine cannot get through.

The driver lists and hashes the files and skips those already cached, exactly as the local engine does. The
rest go to a Ray Data pipeline: a dataset of (file path, content hash) rows, then ``map_batches`` with
``FaceWorker``, a callable class run by a pool of actors. Each actor loads MTCNN and the backbone once and runs
TensorFlow on one thread; it decodes, detects, chooses the face, aligns, crops and embeds (the face and its
mirror image). The driver writes what comes back into the same ``FaceCache`` and ``EmbeddingCache`` the local
engine uses, so everything after prepare is unchanged.

Ray restarts an actor whose process dies and retries its batch, so a lost worker costs time, not images.
Workers read the files by path: on a cluster the data folder must be on a file system every node mounts.
This module is imported only for ``engine="ray"``; Ray is the optional extra ``pinsface[ray]``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from pinsface.settings import FaceSettings

log = logging.getLogger(__name__)

# Per-face columns travel as float32 bytes (a face count varies per image), read back with np.frombuffer.
RAGGED = {"boxes": (4,), "scores": (), "landmarks": (5, 2)}


def _one_thread() -> None:
    """One TensorFlow (and BLAS) thread per worker: Ray gives each worker one CPU."""
    for name in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "TF_NUM_INTRAOP_THREADS",
        "TF_NUM_INTEROP_THREADS",
    ):
        os.environ[name] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pinsface._tf import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already started in this process: it keeps its pools
        pass


class FaceWorker:
    """A Ray Data callable class: a batch of {"path", "hash"} rows -> face records and embeddings."""

    def __init__(
        self, face_settings: dict, backbone: str | None, precision: str, embed_batch_size: int, detect_batch_size: int
    ):
        _one_thread()
        from pinsface.faces import FaceDetector

        self.settings = FaceSettings.from_dict(face_settings)
        self.detector = FaceDetector(self.settings)
        self.detect_batch_size = detect_batch_size
        self.embedder = None
        if backbone:
            from pinsface.backbones import get_backbone
            from pinsface.embeddings import Embedder

            self.embedder = Embedder(get_backbone(backbone), embed_batch_size, precision)
        self.pid = os.getpid()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each row is one chunk of the local engine's (``pinsface.prepare.CHUNK_IMAGES`` files), decoded and
        detected in the local engine's batches (an image's faces do not depend on its batch: see
        ``pinsface.faces.FaceDetector``). Returns one row per image."""
        parts = []
        for paths, hashes, index in zip(batch["paths"], batch["hashes"], batch["index"]):
            start = time.process_time()
            part = self._chunk([str(p) for p in paths], [str(h) for h in hashes], np.asarray(index, np.int64))
            # The worker's CPU seconds per image: what a dedicated core would take, however busy the machine.
            part["cpu_seconds"] = np.full(len(paths), (time.process_time() - start) / max(len(paths), 1))
            parts.append(part)
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def _chunk(self, paths: list[str], hashes: list[str], index: np.ndarray) -> dict[str, np.ndarray]:
        """The local engine's own per-batch work (``pinsface.prepare``), so both give the same faces. A photo
        with several faces comes back marked ``held``, with the subject rule's choice and no embedding: the
        second pass, which compares its faces with the rest of the person's folder, runs on the driver once
        every image is in (``pinsface.prepare``)."""
        from concurrent.futures import ThreadPoolExecutor

        from pinsface.face_records import decoded_batches, face_record, image_records

        s = self.settings
        records: dict[int, dict] = {}
        errors = [("", "")] * len(paths)
        held: dict[str, tuple[int, dict]] = {}
        by_hash = {h: i for i, h in enumerate(hashes)}
        with ThreadPoolExecutor(1) as pool:
            for batch in decoded_batches(pool, list(enumerate(paths)), self.detect_batch_size, s):
                made, failed = image_records(self.detector, batch, hashes, s, held)
                for record in made:
                    records[by_hash[record["hash"]]] = record
                for i, error in failed:
                    errors[i] = (error.reason, error.detail)
        for i, record in held.values():
            records[i] = {k: v for k, v in record.items() if k != "candidates"}
        n = len(paths)
        dim = self.embedder.backbone.output_shape[-1] if self.embedder else 0
        emb = np.zeros((n, dim), np.float32)
        emb_flip = np.zeros((n, dim), np.float32)
        held_rows = {i for i, _ in held.values()}
        if self.embedder is not None and len(records) > len(held_rows):
            rows = sorted(set(records) - held_rows)
            emb[rows], emb_flip[rows] = self.embedder.both_views(np.stack([records[i]["aligned"] for i in rows]))
        blank = face_record(np.zeros((s.aligned_size, s.aligned_size, 3), np.uint8), [], s, "")
        out = {
            "index": index,
            "hash": np.array(hashes),
            "error": np.array([e[0] for e in errors]),
            "detail": np.array([e[1] for e in errors]),
            "pid": np.full(n, self.pid, np.int64),
            "held": np.array([i in held_rows for i in range(n)], bool),
            "embedding": emb,
            "embedding_flip": emb_flip,
        }
        full = [records.get(i, blank) for i in range(n)]
        for key in ("status", "n_faces", "chosen", "image_shape", "fallback", "aligned", "box"):
            out[key] = np.stack([np.asarray(r[key]) for r in full])
        for key in RAGGED:
            out[key] = np.array([np.asarray(r[key], np.float32).tobytes() for r in full], dtype=object)
        return out


def records_from(batch: dict[str, np.ndarray]) -> list[dict]:
    """The face records (as ``pinsface.prepare.face_record`` makes them) of a batch's readable images."""
    records = []
    for j in range(len(batch["hash"])):
        if batch["error"][j]:
            continue
        record = {"hash": str(batch["hash"][j]), "status": str(batch["status"][j])}
        for key in ("n_faces", "chosen", "image_shape", "fallback", "aligned", "box"):
            record[key] = batch[key][j]
        for key, shape in RAGGED.items():
            record[key] = np.frombuffer(batch[key][j], np.float32).reshape(-1, *shape).copy()
        record["n_faces"] = int(record["n_faces"])
        record["chosen"] = int(record["chosen"])
        record["fallback"] = bool(record["fallback"])
        records.append(record)
    return records


@dataclass(frozen=True)
class RayTarget:
    """Where the work runs: the Ray cluster at ``address`` (None: a local instance of our own) with ``workers``
    actors in the pool (None: every CPU of the cluster; a local instance gets that many CPUs)."""

    address: str | None = None
    workers: int | None = None


class RayCluster:
    """Connects to ``address`` (``ray start --head`` elsewhere, ``ray://...``), or starts a local instance with
    ``num_cpus`` CPUs (default: all of this machine's). Shuts down only what it started."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, object_store_bytes: int = 512 * 2**20):
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError("the ray engine needs Ray: pip install 'pinsface[ray]'") from exc
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            env = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}}
            if address:
                ray.init(address=address, runtime_env=env, log_to_driver=False)
            else:
                # "local": a fresh instance of our own, never another process's cluster on this machine.
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    object_store_memory=object_store_bytes,
                    include_dashboard=False,
                    runtime_env=env,
                    log_to_driver=False,
                )

    def workers(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def process(
    chunks: list[list[int]],
    paths: list[str],
    hashes: list[str],
    settings: FaceSettings,
    *,
    embed=None,
    target: RayTarget = RayTarget(),
    on_batch=None,
    detect_batch_size: int = 64,
) -> dict:
    """Run ``FaceWorker`` over ``paths`` on Ray, one row per chunk (``chunks``: lists of positions in ``paths``),
    and hand each finished batch (numpy columns, one row per image; ``index``: the position) to ``on_batch``.

    ``embed``: a ``Settings`` whose backbone and precision embed the faces too (None: faces only).
    ``target``: the cluster and its number of workers. Returns timing figures."""
    import ray.data

    from pinsface.embeddings import resolve_precision

    cluster = RayCluster(target.address, num_cpus=target.workers)
    start = time.perf_counter()
    try:
        n_workers = target.workers or cluster.workers()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        rows = [
            {"index": list(chunk), "paths": [paths[j] for j in chunk], "hashes": [hashes[j] for j in chunk]}
            for chunk in chunks
            if chunk
        ]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        ds = ds.map_batches(
            FaceWorker,
            batch_size=1,
            batch_format="numpy",
            num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=n_workers),
            fn_constructor_kwargs={
                "face_settings": asdict(settings),
                "backbone": embed.backbone if embed is not None else None,
                "precision": resolve_precision(embed.embed_precision) if embed is not None else "float32",
                "embed_batch_size": embed.embed_batch_size if embed is not None else 64,
                "detect_batch_size": detect_batch_size,
            },
        )
        driver, driver_cpu = 0.0, 0.0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            t, c = time.perf_counter(), time.thread_time()
            if on_batch is not None:
                on_batch(batch)
            driver += time.perf_counter() - t
            driver_cpu += time.thread_time() - c
        return {
            "workers": n_workers,
            "seconds": time.perf_counter() - start,
            "driver_write_seconds": driver,
            "driver_write_cpu_seconds": driver_cpu,
        }
    finally:
        cluster.close()


def prepare_on_ray(
    paths: list[str],
    hashes: list[str],
    cache,
    settings: FaceSettings,
    *,
    embed=None,
    target: RayTarget = RayTarget(),
    chunk_images: int,
    detect_batch_size: int = 64,
) -> dict:
    """``prepare``'s per-image work for ``paths`` (with their content hashes, in the local engine's order) on Ray,
    written into ``cache`` (and the embedding cache matching ``embed``). ``chunk_images``: the local engine's
    chunk size (``pinsface.prepare.CHUNK_IMAGES``), whose chunks set MTCNN's batches and so its exact boxes.
    Photos with several faces are not written: they come back as ``held`` ({hash: record}), for the second pass.
    Returns {"errors": {position: (reason, detail)}, "held", "seconds", ...}."""
    from dataclasses import replace

    from pinsface.embeddings import run_embedding_cache

    # The local engine's chunks, each without the files identical to one met before (processed once).
    first: set[str] = set()
    chunks = []
    for lo in range(0, len(paths), chunk_images):
        chunk = []
        for j in range(lo, min(lo + chunk_images, len(paths))):
            if hashes[j] not in first:
                first.add(hashes[j])
                chunk.append(j)
        chunks.append(chunk)
    embed = replace(embed, embedding_key="") if embed is not None else None
    emb_cache = run_embedding_cache(embed, cache.root) if embed is not None else None
    errors: dict[str, tuple[str, str]] = {}
    seen: set[int] = set()
    worker_cpu = []
    held: dict[str, dict] = {}

    def write(batch):
        worker_cpu.append(float(batch["cpu_seconds"].sum()))
        for k, j in enumerate(batch["index"]):
            seen.add(int(j))
            if batch["error"][k]:
                errors[str(batch["hash"][k])] = (str(batch["error"][k]), str(batch["detail"][k]))
        marked = {str(h) for h in batch["hash"][batch["held"]]}
        records = []
        for record in records_from(batch):
            if record["hash"] in marked:
                held[record["hash"]] = record
            else:
                records.append(record)
        cache.write(records)
        if emb_cache is not None and records:
            ok = np.flatnonzero((batch["error"] == "") & ~batch["held"])
            emb_cache.write([str(h) for h in batch["hash"][ok]], batch["embedding"][ok], batch["embedding_flip"][ok])

    report = process(
        chunks, paths, hashes, settings, embed=embed, target=target, on_batch=write, detect_batch_size=detect_batch_size
    )
    expected = sum(len(c) for c in chunks)
    if len(seen) != expected:  # Ray gave up on some rows: say so instead of leaving them out silently
        raise RuntimeError(f"the ray engine returned {len(seen)} of {expected} images")
    report["errors"] = {j: errors[h] for j, h in enumerate(hashes) if h in errors}
    report["held"] = held
    report["images"] = expected
    report["worker_cpu_seconds"] = sum(worker_cpu)
    return report

"""Aligned crops -> backbone embeddings, computed once per image and kept in the cache."""

from __future__ import annotations

import numpy as np

from pinsface.cache import EmbeddingCache, FaceCache
from pinsface.settings import PRECISIONS

CHUNK = 1024


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slowly."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """``auto`` becomes ``bfloat16`` where the CPU has it, else ``float32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"embedding precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bfloat16" if cpu_has_bf16() else "float32"
    return precision


def with_compute_dtype(model, policy: str):
    """A copy of a functional Keras model computing in ``policy`` (e.g. ``mixed_bfloat16``: bf16 maths,
    float32 weights), sharing nothing with the original."""
    import keras

    def clone(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


class Embedder:
    """Runs a backbone over uint8 face crops in fixed-size batches with a compiled graph."""

    def __init__(self, backbone, batch_size: int = 64, precision: str = "float32"):
        self.backbone = backbone
        self.batch_size = batch_size
        self.precision = resolve_precision(precision)
        self._fn = None  # built on first use: callers whose embeddings are all cached never pay for it

    def _compiled(self):
        if self._fn is None:
            import tensorflow as tf

            # bfloat16 on these CPUs: 1.5x the faces/s of float32, and the descriptors stay within the
            # fidelity bounds against dlib's (tests/test_backbone.py).
            net = self.backbone
            if self.precision == "bfloat16":
                net = with_compute_dtype(self.backbone, "mixed_bfloat16")
            self._fn = tf.function(lambda x: tf.cast(net(x, training=False), tf.float32), reduce_retracing=True)
        return self._fn

    def __call__(self, crops: np.ndarray, flip: bool = False) -> np.ndarray:
        out = np.zeros((len(crops), *self.backbone.output_shape[1:]), dtype=np.float32)
        for lo in range(0, len(crops), self.batch_size):
            batch = crops[lo : lo + self.batch_size].astype(np.float32)
            if flip:
                batch = batch[:, :, ::-1]
            n = len(batch)
            # Pad to a power of two (at least 8): a few traced graphs serve every size, and one face does
            # not pay for a whole batch.
            size = min(self.batch_size, max(8, 1 << (n - 1).bit_length()))
            if n < size:
                batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), np.float32)])
            out[lo : lo + n] = self._compiled()(batch).numpy()[:n]
        return out

    def both_views(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of the crops and of their mirror images, computed in shared batches."""
        out = self(np.concatenate([crops, crops[:, :, ::-1]]))
        return out[: len(crops)], out[len(crops) :]


def embedding_key(settings) -> str:
    """Names what produced a run's embeddings: the backbone weights (or a fine-tuned copy) and the precision."""
    key = settings.embedding_key or settings.backbone
    return key + "-bf16" if resolve_precision(settings.embed_precision) == "bfloat16" else key


def run_embedding_cache(settings, cache_root) -> EmbeddingCache:
    """The embedding store that matches a run's face settings, backbone weights and precision."""
    return EmbeddingCache(cache_root, settings.faces.version(), embedding_key(settings))


def run_embedder(settings, backbone) -> Embedder:
    return Embedder(backbone, settings.embed_batch_size, settings.embed_precision)


def ensure_embeddings(
    hashes: list[str], faces: FaceCache, cache: EmbeddingCache, embedder: Embedder, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of each hash's aligned crop and of its mirror image. Only the missing ones are computed:
    their crops are read from ``faces`` and run through ``embedder``."""
    from tqdm import tqdm

    unique = list(dict.fromkeys(hashes))
    index, emb, emb_flip = cache.load(unique)
    missing = [h for h in unique if h not in index]
    if missing:
        table = faces.load(missing, crops=("aligned",))
        bar = tqdm(total=len(missing), desc="embeddings", unit="face", disable=not progress, leave=False)
        for lo in range(0, len(missing), CHUNK):
            part = missing[lo : lo + CHUNK]
            crops = table.columns["aligned"][table.rows(part)]
            cache.write(part, *embedder.both_views(crops))
            bar.update(len(part))
        bar.close()
        index, emb, emb_flip = cache.load(unique)
    rows = np.array([index[h] for h in hashes], dtype=np.int64)
    return emb[rows], emb_flip[rows]


class BackgroundEmbedder:
    """Embeds faces in a thread as ``prepare`` writes them, so the backbone works while the detector does.

    Called with each chunk of new face records (``prepare``'s ``on_records``), it queues their aligned crops;
    a thread embeds them into ``cache``. The queue holds at most ``max_pending`` chunks, so memory stays
    bounded: when the backbone falls behind, prepare waits. What it has not embedded when closed (or could not:
    the error is kept and logged) is left to ``ensure_embeddings``, which computes whatever is missing."""

    def __init__(self, embedder: Embedder, cache: EmbeddingCache, max_pending: int = 2):
        import queue
        import threading

        self.embedder, self.cache = embedder, cache
        self.error: Exception | None = None
        self.faces = 0
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._work, name="pinsface-embed", daemon=True)
        self._thread.start()

    def __call__(self, records: list[dict]) -> None:
        records = [r for r in records if r.get("aligned") is not None]
        if records and self.error is None:
            self._queue.put(([r["hash"] for r in records], np.stack([r["aligned"] for r in records])))

    def _work(self) -> None:
        import logging

        while (item := self._queue.get()) is not None:
            if self.error is not None:
                continue
            hashes, crops = item
            try:
                self.cache.write(hashes, *self.embedder.both_views(crops))
                self.faces += len(hashes)
            except Exception as exc:  # noqa: BLE001  (the embeddings are made again later; say why, go on)
                self.error = exc
                logging.getLogger(__name__).warning("background embedding stopped: %s: %s", type(exc).__name__, exc)

    def close(self) -> None:
        """Wait for the queued faces to be embedded."""
        self._queue.put(None)
        self._thread.join()

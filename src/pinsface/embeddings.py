"""Aligned crops -> backbone embeddings, computed once per image and kept in the cache."""

from __future__ import annotations

import numpy as np

from pinsface.cache import EmbeddingCache, FaceCache

CHUNK = 1024


class Embedder:
    """Runs a backbone over uint8 face crops in fixed-size batches with a compiled graph."""

    def __init__(self, backbone, batch_size: int = 64):
        import tensorflow as tf

        self.backbone = backbone
        self.batch_size = batch_size
        self._fn = tf.function(lambda x: backbone(x, training=False), reduce_retracing=True)

    def __call__(self, crops: np.ndarray, flip: bool = False) -> np.ndarray:
        out = np.zeros((len(crops), *self.backbone.output_shape[1:]), dtype=np.float32)
        for lo in range(0, len(crops), self.batch_size):
            batch = crops[lo:lo + self.batch_size].astype(np.float32)
            if flip:
                batch = batch[:, :, ::-1]
            n = len(batch)
            if n < self.batch_size:  # pad so every call reuses one traced graph
                batch = np.concatenate([batch, np.zeros((self.batch_size - n, *batch.shape[1:]), np.float32)])
            out[lo:lo + n] = self._fn(batch).numpy()[:n]
        return out


def ensure_embeddings(hashes: list[str], faces: FaceCache, cache: EmbeddingCache, backbone,
                      batch_size: int = 64, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of each hash's aligned crop and of its mirror image. Only the missing ones are computed:
    their crops are read from ``faces`` and run through ``backbone`` (a Keras model or an ``Embedder``)."""
    from tqdm import tqdm

    unique = list(dict.fromkeys(hashes))
    index, emb, emb_flip = cache.load(unique)
    missing = [h for h in unique if h not in index]
    if missing:
        embedder = backbone if isinstance(backbone, Embedder) else Embedder(backbone, batch_size)
        table = faces.load(missing, crops=("aligned",))
        bar = tqdm(total=len(missing), desc="embeddings", unit="face", disable=not progress, leave=False)
        for lo in range(0, len(missing), CHUNK):
            part = missing[lo:lo + CHUNK]
            crops = table.columns["aligned"][table.rows(part)]
            cache.write(part, embedder(crops), embedder(crops, flip=True))
            bar.update(len(part))
        bar.close()
        index, emb, emb_flip = cache.load(unique)
    rows = np.array([index[h] for h in hashes], dtype=np.int64)
    return emb[rows], emb_flip[rows]

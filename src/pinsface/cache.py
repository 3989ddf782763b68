"""On-disk caches (joblib + lz4) of face records and embeddings, keyed by image content hash.

Each store is a folder named after the settings that produced its contents, holding chunk files written
atomically (temporary file, then rename). A run that is killed loses at most the chunk it was writing,
a chunk that fails to load is reported, deleted and recomputed, and changing a setting selects a new
folder without touching the others.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np

log = logging.getLogger(__name__)

FORMAT = 2
COMPRESS = ("lz4", 3)
# Columns with one row per detected face rather than per image, grouped by the ``n_faces`` column.
PER_FACE = ("boxes", "scores", "landmarks")


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def default_cache_dir() -> Path:
    env = os.environ.get("PINSFACE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pinsface"


@dataclass
class ChunkStore:
    """A folder of ``chunk-*.joblib.lz4`` files, each a dict of numpy columns with a ``hash`` column."""

    folder: Path
    corrupt: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.folder = Path(self.folder)

    def chunk_paths(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("chunk-*.joblib.lz4"))

    def write(self, columns: dict[str, np.ndarray]) -> Path | None:
        n = len(columns["hash"])
        if n == 0:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        # The row count in the name lets readers size their output before loading anything.
        name = f"chunk-{uuid.uuid4().hex}-n{n}.joblib.lz4"
        tmp = self.folder / f".{name}.tmp"
        joblib.dump({"format": FORMAT, "n": n, **columns}, tmp, compress=COMPRESS)
        os.replace(tmp, self.folder / name)
        return self.folder / name

    def _load(self, path: Path) -> dict | None:
        try:
            chunk = joblib.load(path)
            if not isinstance(chunk, dict) or chunk.get("format") != FORMAT or len(chunk["hash"]) != chunk["n"]:
                raise ValueError("unexpected chunk layout")
            return chunk
        except Exception as exc:  # any damage: report, drop, recompute
            log.warning("cache chunk %s is corrupt (%s); it will be recomputed", path.name, exc)
            self.corrupt.append(path.name)
            path.unlink(missing_ok=True)
            return None

    def chunks(self, keep: set[str] | None = None, wanted: set[str] | None = None) -> Iterator[dict]:
        """Every readable chunk, in order (optionally only the rows whose hash is in ``wanted``)."""
        for stale in self.folder.glob(".chunk-*.tmp") if self.folder.is_dir() else []:
            stale.unlink(missing_ok=True)
        with ThreadPoolExecutor(2) as pool:  # lz4 releases the GIL: two loads overlap
            for chunk in pool.map(self._load, self.chunk_paths()):
                if chunk is None:
                    continue
                if keep is not None:
                    chunk = {k: v for k, v in chunk.items() if k in keep or k in ("hash", "n", "format")}
                if wanted is not None:
                    rows = np.array([str(h) in wanted for h in chunk["hash"]], dtype=bool)
                    if not rows.any():
                        continue
                    if not rows.all():
                        chunk = _take(chunk, rows)
                yield chunk

    def capacity(self) -> int:
        total = 0
        for path in self.chunk_paths():
            try:
                total += int(path.name.rsplit("-n", 1)[1].split(".")[0])
            except (IndexError, ValueError):
                return -1
        return total

    def table(self, columns: list[str], keep: set[str] | None = None,
              wanted: set[str] | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
        """The chunks joined into one table. Per-image columns are filled into arrays sized up front, so peak
        memory is the result plus a chunk or two rather than twice the result."""
        capacity = self.capacity()
        hashes: list[str] = []
        out: dict[str, np.ndarray] = {}
        pieces: dict[str, list[np.ndarray]] = {c: [] for c in columns}
        for chunk in self.chunks(keep, wanted):
            lo = len(hashes)
            hashes.extend(str(h) for h in chunk["hash"])
            for c in columns:
                value = chunk[c]
                if c in PER_FACE or capacity < 0:
                    pieces[c].append(value)
                    continue
                if c not in out:
                    out[c] = np.empty((capacity, *value.shape[1:]), dtype=value.dtype)
                elif value.dtype.kind == "U" and value.dtype.itemsize > out[c].dtype.itemsize:
                    out[c] = out[c].astype(value.dtype)  # a longer string (a status) than the first chunk's
                out[c][lo:lo + len(value)] = value
        for c in columns:
            if c in out:
                out[c] = out[c][:len(hashes)]
            elif pieces[c]:
                out[c] = np.concatenate(pieces[c])
            else:
                out[c] = np.zeros((0,))
        return hashes, out


def _take(chunk: dict, rows: np.ndarray) -> dict:
    """The chunk restricted to some image rows (and the per-face rows of those images)."""
    idx = np.flatnonzero(rows)
    out = {"format": chunk["format"], "n": len(idx)}
    face_rows = None
    if "n_faces" in chunk:
        offsets = np.concatenate([[0], np.cumsum(chunk["n_faces"])])
        face_rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx] or [np.zeros(0, int)])
    for key, value in chunk.items():
        if key not in ("format", "n"):
            out[key] = value[face_rows] if key in PER_FACE else value[idx]
    return out


class FaceCache:
    """Face records (detections, chosen face, aligned and box crops) per image content hash.

    Every column is one numpy array (ragged per-face data is stored flat, ``n_faces`` rows per image),
    which keeps loading at memory speed.
    """

    META = ("status", "n_faces", "chosen", "image_shape", "fallback", "boxes", "scores", "landmarks")
    PER_FACE = PER_FACE
    CROPS = ("aligned", "box")

    def __init__(self, cache_dir: str | os.PathLike, face_version: str):
        self.root = Path(cache_dir)
        self.store = ChunkStore(self.root / f"faces-{face_version}")

    @property
    def corrupt(self) -> list[str]:
        return self.store.corrupt

    def known(self) -> set[str]:
        return {str(h) for chunk in self.store.chunks(keep=set()) for h in chunk["hash"]}

    def load(self, hashes: list[str] | None = None, crops: tuple[str, ...] = CROPS) -> "FaceTable":
        columns = [*self.META, *crops]
        order, table = self.store.table(columns, set(columns), set(hashes) if hashes is not None else None)
        counts = np.asarray(table["n_faces"], dtype=np.int64) if order else np.zeros(0, np.int64)
        table["face_offset"] = np.concatenate([[0], np.cumsum(counts)])
        return FaceTable({str(h): i for i, h in enumerate(order)}, table)

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        columns: dict[str, object] = {"hash": np.array([r["hash"] for r in records])}
        for key in self.META:
            values = [r[key] for r in records]
            columns[key] = np.concatenate(values) if key in self.PER_FACE else np.asarray(values)
        for key in self.CROPS:
            columns[key] = np.stack([r[key] for r in records])
        self.store.write(columns)


@dataclass
class FaceTable:
    index: dict[str, int]
    columns: dict[str, np.ndarray]

    def __contains__(self, h: str) -> bool:
        return h in self.index

    def rows(self, hashes: list[str]) -> np.ndarray:
        return np.array([self.index[h] for h in hashes], dtype=np.int64)

    def detections(self, row: int) -> dict[str, np.ndarray]:
        """Every face found in one image: boxes (k, 4), scores (k,), landmarks (k, 5, 2)."""
        lo, hi = self.columns["face_offset"][row], self.columns["face_offset"][row + 1]
        return {c: self.columns[c][lo:hi] for c in FaceCache.PER_FACE}


class EmbeddingCache:
    """Backbone embeddings of each aligned face and of its mirror image, per content hash."""

    def __init__(self, cache_dir: str | os.PathLike, face_version: str, backbone: str):
        self.store = ChunkStore(Path(cache_dir) / f"embeddings-{backbone}-{face_version}")

    def load(self, hashes: list[str] | None = None) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
        order, table = self.store.table(["embedding", "embedding_flip"],
                                        wanted=set(hashes) if hashes is not None else None)
        if not order:
            return {}, np.zeros((0, 128), np.float32), np.zeros((0, 128), np.float32)
        return {h: i for i, h in enumerate(order)}, table["embedding"], table["embedding_flip"]

    def write(self, hashes: list[str], embeddings: np.ndarray, flipped: np.ndarray) -> None:
        self.store.write({"hash": np.array(hashes), "embedding": embeddings.astype(np.float32),
                          "embedding_flip": flipped.astype(np.float32)})

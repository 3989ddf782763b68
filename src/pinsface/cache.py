"""On-disk caches of face records and embeddings, keyed by image content hash.

Each store is a folder named after the settings that produced its contents, holding chunk files. A chunk is
one lz4 frame holding a small JSON header and raw numpy arrays of plain numeric or fixed-width byte types:
reading one never unpickles anything, so a cache folder from someone else cannot run code. Chunks are written
atomically (temporary file, then rename) under a lock on the store, which also drops rows another process wrote
meanwhile, so two processes filling one cache keep each image once. A chunk that fails to load is reported,
deleted and recomputed, and changing a setting selects a new folder without touching the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import lz4.frame
import numpy as np

from pinsface.faces import STATUSES  # stored as each status's index there
from pinsface.files import atomic_write, remove_stale_temporaries

log = logging.getLogger(__name__)

FORMAT = 3
MAGIC = b"PINSFACE-CHUNK\x00\x03"
SUFFIX = ".arrays.lz4"
OLD_SUFFIX = ".joblib.lz4"  # formats 1-2: pickled by joblib, never loaded again
# A chunk holds at most this many bytes once decompressed, and its header this many: nothing read is unbounded.
MAX_CHUNK_BYTES = 4 << 30
MAX_HEADER_BYTES = 1 << 20
HASH_DTYPE = np.dtype("S32")
# Columns with one row per detected face rather than per image, grouped by the ``n_faces`` column.
PER_FACE = ("boxes", "scores", "landmarks")
LOCK_TIMEOUT_SECONDS = 600.0


class ChunkError(ValueError):
    """A chunk file that is not a valid chunk of this format."""


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def default_cache_dir() -> Path:
    env = os.environ.get("PINSFACE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pinsface"


def _checked_dtype(text: str) -> np.dtype:
    dtype = np.dtype(text)
    if not ((dtype.kind in "biuf" and dtype.itemsize <= 8) or (dtype.kind == "S" and dtype.itemsize <= 64)):
        raise ChunkError(f"column type {text!r} is not allowed in a chunk")
    return dtype


def encode_chunk(columns: dict[str, np.ndarray]) -> bytes:
    """Columns (``hash`` first) -> one lz4-compressed chunk."""
    names = ["hash", *(k for k in columns if k != "hash")]
    arrays = [np.ascontiguousarray(columns[k]) for k in names]
    for a in arrays:
        _checked_dtype(a.dtype.str)
    header = json.dumps(
        {
            "format": FORMAT,
            "n": len(arrays[0]),
            "columns": [{"name": k, "dtype": a.dtype.str, "shape": list(a.shape)} for k, a in zip(names, arrays)],
        }
    ).encode()
    payload = b"".join([MAGIC, struct.pack("<I", len(header)), header, *(a.tobytes() for a in arrays)])
    return lz4.frame.compress(payload, store_size=True, content_checksum=True, block_checksum=True)


def _parse_header(data: bytes) -> tuple[dict, int]:
    """(header, offset of the first array) from the start of a decompressed chunk."""
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise ChunkError("not a pinsface chunk")
    (size,) = struct.unpack_from("<I", data, len(MAGIC))
    if size > MAX_HEADER_BYTES:
        raise ChunkError("header too large")
    start = len(MAGIC) + 4
    if len(data) < start + size:
        raise ChunkError("header cut short")
    header = json.loads(data[start : start + size])
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("n"), int):
        raise ChunkError("unexpected header")
    return header, start + size


def _columns(header: dict) -> Iterator[tuple[str, np.dtype, tuple[int, ...], int]]:
    """(name, dtype, shape, bytes) per column, checked against the header's row count."""
    columns = header.get("columns")
    if not isinstance(columns, list) or not columns or columns[0].get("name") != "hash":
        raise ChunkError("unexpected column list")
    for c in columns:
        name, dtype = str(c["name"]), _checked_dtype(str(c["dtype"]))
        shape = tuple(int(v) for v in c["shape"])
        if any(v < 0 for v in shape) or not shape:
            raise ChunkError(f"bad shape for {name}")
        if name not in PER_FACE and shape[0] != header["n"]:
            raise ChunkError(f"column {name} has {shape[0]} rows, not {header['n']}")
        yield name, dtype, shape, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def decode_chunk(data: bytes) -> dict[str, np.ndarray]:
    """One compressed chunk -> its columns (read-only views into one buffer). Raises ``ChunkError``."""
    try:
        info = lz4.frame.get_frame_info(data)
        size = int(info.get("content_size") or 0)
        if not 0 < size <= MAX_CHUNK_BYTES:
            raise ChunkError("missing or oversized content size")
        raw = lz4.frame.decompress(data)
    except RuntimeError as exc:
        raise ChunkError(f"lz4: {exc}") from exc
    if len(raw) != size:
        raise ChunkError("content size mismatch")
    header, offset = _parse_header(raw)
    out = {"n": header["n"]}
    for name, dtype, shape, nbytes in _columns(header):
        if offset + nbytes > len(raw):
            raise ChunkError(f"column {name} cut short")
        out[name] = np.frombuffer(raw, dtype, int(np.prod(shape)), offset).reshape(shape)
        offset += nbytes
    if offset != len(raw):
        raise ChunkError("trailing bytes")
    return out


def read_chunk_columns(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """Some columns of a chunk, decompressing only the start of the file, up to the last column wanted.
    The ``hash`` column comes first and the crops last, so the hashes and the per-image records read cheaply.
    Each lz4 block carries its own checksum, so a damaged part that is read is still caught."""
    with open(path, "rb") as fh:
        decompressor = lz4.frame.LZ4FrameDecompressor()
        head = decompressor.decompress(fh.read(1 << 16), max_length=len(MAGIC) + 4 + MAX_HEADER_BYTES)
        header, start = _parse_header(head)
        layout, end = {}, start
        for name, dtype, shape, nbytes in _columns(header):
            layout[name] = (dtype, shape, end)
            end += nbytes
            if names <= layout.keys():
                break
        if end > MAX_CHUNK_BYTES:
            raise ChunkError("columns larger than a chunk may be")
        pieces, size = [head], len(head)
        while size < end and not decompressor.eof:
            block = fh.read(1 << 20)
            if not block and decompressor.needs_input:
                break
            piece = decompressor.decompress(block, max_length=end - size)
            pieces.append(piece)
            size += len(piece)
    if size < end:
        raise ChunkError("chunk cut short")
    data = b"".join(pieces)
    out = {"n": header["n"]}
    for name in names & layout.keys():
        dtype, shape, offset = layout[name]
        out[name] = np.frombuffer(data, dtype, int(np.prod(shape)), offset).reshape(shape)
    return out


def read_chunk_hashes(path: Path) -> list[str]:
    return [h.decode("ascii") for h in read_chunk_columns(path, {"hash"})["hash"]]


@dataclass
class ChunkStore:
    """A folder of ``chunk-<uuid>-n<rows>.arrays.lz4`` files, each a table of numpy columns with a ``hash``."""

    folder: Path
    corrupt: list[str] = field(default_factory=list)
    outdated: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.folder = Path(self.folder)
        self._hashes: dict[str, list[str]] = {}  # chunk name -> its hashes, for chunks already looked at

    def chunk_paths(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        old = sorted(self.folder.glob(f"chunk-*{OLD_SUFFIX}"))
        if old:
            log.warning(
                "cache %s: %d chunk(s) of an older pinsface are stored with pickle, which can run code "
                "when read; they are not loaded, and their images will be recomputed",
                self.folder,
                len(old),
            )
            for path in old:
                self.outdated.append(path.name)
                path.unlink(missing_ok=True)
        return sorted(self.folder.glob(f"chunk-*{SUFFIX}"))

    def _drop(self, path: Path, exc: Exception) -> None:
        log.warning("cache chunk %s is unusable (%s); it will be recomputed", path.name, exc)
        self.corrupt.append(path.name)
        path.unlink(missing_ok=True)

    def read(self, path: Path, columns: set[str] | None = None) -> dict | None:
        """A chunk's columns (all, or those named), or None (reported and deleted) if the file is not a valid
        chunk."""
        try:
            if path.stat().st_size > MAX_CHUNK_BYTES:
                raise ChunkError("file too large")
            chunk = decode_chunk(path.read_bytes()) if columns is None else read_chunk_columns(path, columns)
            if "status" in chunk and chunk["status"].size and int(chunk["status"].max()) >= len(STATUSES):
                raise ChunkError("unknown status code (written by a newer pinsface?)")
            return chunk
        except FileNotFoundError:
            return None  # removed by another process since it was listed
        except (ChunkError, ValueError, KeyError, TypeError, OSError) as exc:
            self._drop(path, exc)
            return None

    def hashes(self, path: Path) -> list[str]:
        if path.name not in self._hashes:
            try:
                self._hashes[path.name] = read_chunk_hashes(path)
            except FileNotFoundError:
                return []
            except (ChunkError, ValueError, KeyError, TypeError, OSError, RuntimeError) as exc:
                self._drop(path, exc)
                return []
        return self._hashes[path.name]

    def known(self) -> set[str]:
        return {h for path in self.chunk_paths() for h in self.hashes(path)}

    def write(self, columns: dict[str, np.ndarray]) -> Path | None:
        """Write the rows whose hash no chunk holds yet, as one new chunk. Safe beside other writers."""
        from filelock import FileLock

        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(self.folder / ".write.lock", timeout=LOCK_TIMEOUT_SECONDS):
            remove_stale_temporaries(self.folder, ".chunk-*.tmp*")
            present = self.known()
            hashes = [h.decode("ascii") if isinstance(h, bytes) else str(h) for h in columns["hash"]]
            fresh = np.array([h not in present for h in hashes], dtype=bool)
            if not fresh.all():
                columns = _take(columns, fresh)
                hashes = [h for h, keep in zip(hashes, fresh) if keep]
            n = len(hashes)
            if n == 0:
                return None
            columns = {**columns, "hash": np.array(hashes, dtype=HASH_DTYPE)}
            # The row count in the name lets readers size their output before loading anything.
            name = f"chunk-{uuid.uuid4().hex}-n{n}{SUFFIX}"
            atomic_write(self.folder / name, encode_chunk(columns))
            self._hashes[name] = hashes
            return self.folder / name

    def paths_holding(self, wanted: set[str] | None) -> list[Path]:
        """The chunks that hold any of ``wanted`` (every chunk for None), found from their hash columns alone."""
        paths = self.chunk_paths()
        return paths if wanted is None else [p for p in paths if not wanted.isdisjoint(self.hashes(p))]

    def chunks(
        self, keep: set[str] | None = None, wanted: set[str] | None = None, paths: list[Path] | None = None
    ) -> Iterator[dict]:
        """Every readable chunk, in order (optionally only the rows whose hash is in ``wanted``)."""
        paths = self.paths_holding(wanted) if paths is None else paths
        with ThreadPoolExecutor(2) as pool:  # lz4 releases the GIL: two loads overlap
            # At most two chunks read ahead: pool.map would read every chunk into memory as fast as it can.
            columns = None if keep is None else {*keep, "hash", "n_faces"}
            pending = [pool.submit(self.read, p, columns) for p in paths[:2]]
            for i in range(len(paths)):
                chunk = pending.pop(0).result()
                if i + 2 < len(paths):
                    pending.append(pool.submit(self.read, paths[i + 2], columns))
                if chunk is None:
                    continue
                if wanted is not None:
                    rows = np.array([h.decode("ascii") in wanted for h in chunk["hash"]], dtype=bool)
                    if not rows.any():
                        continue
                    if not rows.all():
                        chunk = _take(chunk, rows)
                yield chunk

    def capacity(self, paths: list[Path] | None = None) -> int:
        total = 0
        for path in self.chunk_paths() if paths is None else paths:
            try:
                total += int(path.name.rsplit("-n", 1)[1].split(".")[0])
            except (IndexError, ValueError):
                return -1
        return total

    def table(
        self, columns: list[str], keep: set[str] | None = None, wanted: set[str] | None = None
    ) -> tuple[list[str], dict[str, np.ndarray]]:
        """The chunks joined into one table, each hash once. Per-image columns are filled into arrays sized up
        front, so peak memory is the result plus a chunk or two rather than twice the result."""
        paths = self.paths_holding(wanted)
        capacity = self.capacity(paths)
        if capacity >= 0 and wanted is not None:
            capacity = min(capacity, len(wanted))
        hashes: list[str] = []
        seen: set[str] = set()
        out: dict[str, np.ndarray] = {}
        pieces: dict[str, list[np.ndarray]] = {c: [] for c in columns}
        for chunk in self.chunks(keep, wanted, paths):
            names = [h.decode("ascii") for h in chunk["hash"]]
            fresh = np.array([h not in seen for h in names], dtype=bool)
            if not fresh.all():  # the same image in two chunks (written by an older pinsface): keep the first
                chunk = _take(chunk, fresh)
                names = [h for h, f in zip(names, fresh) if f]
            seen.update(names)
            lo = len(hashes)
            hashes.extend(names)
            for c in columns:
                value = chunk[c]
                if c in PER_FACE or capacity < 0:
                    pieces[c].append(np.array(value))  # a copy: a view would keep the whole chunk's buffer alive
                    continue
                if c not in out:
                    out[c] = np.empty((capacity, *value.shape[1:]), dtype=value.dtype)
                elif value.dtype != out[c].dtype:  # never cut a value to the first chunk's type
                    out[c] = out[c].astype(np.result_type(out[c], value))
                out[c][lo : lo + len(value)] = value
        for c in columns:
            if c in out:
                out[c] = out[c][: len(hashes)]
            elif pieces[c]:
                out[c] = np.concatenate(pieces[c])
            else:
                out[c] = np.zeros((0,))
        return hashes, out


def _take(chunk: dict, rows: np.ndarray) -> dict:
    """The chunk restricted to some image rows (and the per-face rows of those images)."""
    idx = np.flatnonzero(rows)
    out = {"n": len(idx)}
    face_rows = None
    if "n_faces" in chunk:
        offsets = np.concatenate([[0], np.cumsum(chunk["n_faces"])])
        face_rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx] or [np.zeros(0, int)])
    for key, value in chunk.items():
        if key != "n":
            out[key] = value[face_rows] if key in PER_FACE else np.asarray(value)[idx]
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

    @property
    def outdated(self) -> list[str]:
        return self.store.outdated

    def known(self) -> set[str]:
        return self.store.known()

    def load(self, hashes: list[str] | None = None, crops: tuple[str, ...] = CROPS) -> FaceTable:
        columns = [*self.META, *crops]
        order, table = self.store.table(columns, set(columns), set(hashes) if hashes is not None else None)
        counts = np.asarray(table["n_faces"], dtype=np.int64) if order else np.zeros(0, np.int64)
        table["face_offset"] = np.concatenate([[0], np.cumsum(counts)])
        codes = np.asarray(table["status"], dtype=np.int64) if order else np.zeros(0, np.int64)
        table["status"] = np.array(STATUSES)[codes]
        return FaceTable({h: i for i, h in enumerate(order)}, table)

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        columns: dict[str, np.ndarray] = {
            "hash": np.array([r["hash"] for r in records], dtype=HASH_DTYPE),
            "status": np.array([STATUSES.index(r["status"]) for r in records], dtype=np.uint8),
        }
        for key in self.META:
            if key == "status":
                continue
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
        order, table = self.store.table(
            ["embedding", "embedding_flip"], wanted=set(hashes) if hashes is not None else None
        )
        if not order:
            return {}, np.zeros((0, 128), np.float32), np.zeros((0, 128), np.float32)
        return {h: i for i, h in enumerate(order)}, table["embedding"], table["embedding_flip"]

    def write(self, hashes: list[str], embeddings: np.ndarray, flipped: np.ndarray) -> None:
        self.store.write(
            {
                "hash": np.array(hashes, dtype=HASH_DTYPE),
                "embedding": embeddings.astype(np.float32),
                "embedding_flip": flipped.astype(np.float32),
            }
        )

"""``pinsface index``: every face of every photo under a folder, into the library database, incrementally.

Detection, alignment and the face cache are ``prepare``'s (with ``FaceSettings.every_face``), and so are the
bounded decoding, the bad-file reasons and the Ray engine. A photo is read again only when its size or time
changed, and its faces are found again only when its content (hash) did; photos that left the folder are
marked gone. Each photo is stored with its faces in one transaction, so an index that is killed loses at most
the photos it had not stored, and a second one on the same database stores each face once.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from pinsface.dataset import Dataset, ImageItem
from pinsface.face_index import face_vectors
from pinsface.face_records import crops_again, record_faces
from pinsface.images import BadImage
from pinsface.library_db import FaceRow, LibraryDB
from pinsface.predict import expand_inputs
from pinsface.prepare import hash_file, prepare
from pinsface.settings import Settings

# Photos whose faces are cut again from cached detections (see _from_cache) per embedding batch.
CACHED_BATCH = 64
# Photos detected, embedded and stored together: an index that is stopped loses at most the chunk in hand.
INDEX_CHUNK = 128


def descriptor_kind(settings: Settings) -> str:
    """How descriptors are made with ``settings``, as one string (``LibraryDB.use_descriptors``): the network
    that embeds the chips (``embedding_key``), how the chips are cut, and the mirror image averaged in."""
    from pinsface.embeddings import embedding_key

    faces = settings.faces
    chip = {"size": faces.aligned_size, "template": faces.template, "scale": faces.template_scale}
    chip["shift"] = faces.template_shift
    return json.dumps({"network": embedding_key(settings), "chip": chip, "mirror": True}, sort_keys=True)


class _Describer:
    """Descriptors of face chips, as ``pinsface.describe`` gives them (each chip's embedding averaged with its
    mirror image's: ``face_vectors``): the run's backbone and its Recognizer's names with ``run``, else the
    default backbone. ``made_by``: the settings the chips are cut and embedded with (the run's, with a run: its
    head was trained on chips cut its way)."""

    def __init__(self, settings: Settings, run_dir=None):
        self.recognizer = self.embedder = None
        if run_dir is not None:
            from pinsface.predict import Recognizer

            self.recognizer = Recognizer.load(run_dir)
            self.made_by = self.recognizer.settings
        else:
            from pinsface.backbones import get_backbone
            from pinsface.embeddings import run_embedder

            self.embedder = run_embedder(settings, get_backbone(settings.backbone))
            self.made_by = settings

    def __call__(self, chips: np.ndarray) -> tuple[np.ndarray, list[dict] | None]:
        if not len(chips):
            return np.zeros((0, 128), np.float32), [] if self.recognizer else None
        if self.recognizer is None:
            return face_vectors(*self.embedder.both_views(chips)), None
        emb, emb_flip = self.recognizer.embed(chips)
        return face_vectors(emb, emb_flip), self.recognizer.name_embeddings(emb, emb_flip, top_k=1)


def _face_rows(record: dict, descriptors: np.ndarray) -> list[FaceRow]:
    return [
        FaceRow(record["hash"], k, tuple(float(v) for v in face.box), face.confidence, face.landmarks, descriptors[k])
        for k, face in enumerate(record_faces(record))
    ]


class _Store:
    """Writes photos and their faces as their descriptors are made; counts what it did."""

    def __init__(self, db: LibraryDB, describe: _Describer, new: dict[str, list[tuple[str, int, float]]]):
        self.db, self.describe, self.new = db, describe, new
        self.done: set[str] = set()
        self.counts = Counter()

    def records(self, records: list[dict]) -> None:
        """Face records with the chips of every face (``prepare``'s ``on_records``)."""
        records = [r for r in records if r["hash"] in self.new and r["hash"] not in self.done]
        self.store_described(records, [c for r in records for c in r["chips"]], [len(r["chips"]) for r in records])

    def store_described(self, records: list[dict], chips: list[np.ndarray], counts: list[int]) -> None:
        """Embed (and name) the chips of these photos in one batch, then store each photo with its ``counts``
        faces."""
        descriptors, named = self.describe(np.stack(chips) if chips else np.zeros((0, 150, 150, 3), np.uint8))
        at = 0
        for record, k in zip(records, counts):
            self.photo(record, descriptors[at : at + k], named[at : at + k] if named is not None else None)
            at += k

    def photo(self, record: dict, descriptors: np.ndarray, named: list[dict] | None) -> None:
        shape = tuple(int(v) for v in record["image_shape"])
        for path, size, mtime in self.new[record["hash"]]:
            added = self.db.store_photo(path, record["hash"], size, mtime, shape, _face_rows(record, descriptors))
            self.counts["faces_added"] += len(added)
            if named is not None and added:
                self.counts["named"] += self.db.assign_named(added, named)
        self.done.add(record["hash"])

    def bad(self, path: str, size: int, mtime: float, reason: str) -> None:
        self.db.store_photo(path, "", size, mtime, None, [], reason=reason)
        self.counts["skipped:" + reason] += 1


def _from_cache(store: _Store, prepared, paths: dict[str, Path], settings) -> None:
    """Photos whose detections were already in the face cache (found by an earlier, interrupted index, another
    library, or the Ray engine's workers): their chips are cut again from the file and embedded here."""
    todo = [h for h in dict.fromkeys(h for h in prepared.hashes if h) if h not in store.done]
    for lo in range(0, len(todo), CACHED_BATCH):
        part = todo[lo : lo + CACHED_BATCH]
        table = prepared.cache.load(part, crops=())
        records, chips = [], []
        for digest in part:
            row = table.index.get(digest)
            if row is None:
                continue
            record = {"hash": digest, "image_shape": table.columns["image_shape"][row], **table.detections(row)}
            faces = record_faces(record)
            try:
                cut = crops_again(faces, list(range(len(faces))), paths[digest], settings)
            except BadImage as exc:  # changed or gone since it was hashed: the next index sees it again
                store.counts["skipped:" + exc.reason] += 1
                continue
            records.append(record)
            chips.extend(cut[k][0] for k in range(len(faces)))
        store.store_described(records, chips, [len(record["boxes"]) for record in records])


def _changes(db: LibraryDB, root: Path, files: list[str], store: _Store) -> list[tuple[str, int, float]]:
    """What changed since the last index: marks photos that left the folder gone, takes back unchanged content,
    records unreadable files, and returns the files that need their faces found (path, size, mtime)."""
    known = db.photos()
    present = set(files)
    prefix = str(root) + os.sep
    gone = [v[0] for p, v in known.items() if p.startswith(prefix) and p not in present and not v[4]]
    db.mark_gone(gone)
    store.counts["gone"] = len(gone)
    todo = []
    stale = db.stale_photos()
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            continue  # gone since the folder was listed: the next index marks it
        old = known.get(path)
        if old and old[2] == st.st_size and old[3] == st.st_mtime and not old[4]:
            digest = old[1]
        else:
            digest, reason = hash_file(Path(path))
            if reason:
                store.bad(path, st.st_size, st.st_mtime, reason)
                continue
            if old and old[1] == digest:
                db.touch_photo(old[0], st.st_size, st.st_mtime)
        # Unchanged content is left alone, unless its faces hold stale descriptors (schema 6): described again.
        if old and old[1] == digest and old[0] not in stale:
            store.counts["unchanged"] += 1
        else:
            store.new.setdefault(digest, []).append((path, st.st_size, st.st_mtime))
            todo.append(path)
    return todo


def index_library(  # noqa: PLR0913  (a public entry point: its options mirror pinsface index's flags)
    library,
    db_url,
    run_dir=None,
    *,
    engine: str = "local",
    settings: Settings | None = None,
    cache_dir=None,
    progress: bool = False,
    detector=None,
    address: str | None = None,
    workers: int | None = None,
    chunk: int = INDEX_CHUNK,
) -> dict:
    """Index every face under ``library`` into the database at ``db_url``; a summary of what changed."""
    start = time.perf_counter()
    settings = settings or Settings()
    root = Path(library).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {library}")
    files = [os.path.abspath(p) for p in expand_inputs([str(root)])]
    with LibraryDB.open(db_url) as db:  # opened first: a database that cannot be used fails before the network loads
        describer = _Describer(settings, run_dir)
        face_settings = replace(describer.made_by.faces, every_face=True)
        # Descriptors made otherwise (another run, network or chip framing) are made again: one library, one kind.
        stale = db.use_descriptors(descriptor_kind(describer.made_by))
        store = _Store(db, describer, {})
        todo = _changes(db, root, files, store)
        first = {digest: Path(places[0][0]) for digest, places in store.new.items()}
        summary = {}
        if first:
            items = [
                ImageItem(os.path.relpath(p, root).replace(os.sep, "/"), "library", digest)
                for digest, p in first.items()
            ]
            dataset = Dataset(root, items, ["library"])
            prepared = prepare(
                cache_dir=cache_dir or settings.cache_dir or None,
                settings=face_settings,
                batch_size=settings.detect_batch_size,
                progress=progress,
                detector=detector,
                dataset=dataset,
                engine=engine,
                address=address,
                workers=workers,
                on_records=store.records,
                chunk_images=chunk,
            )
            _from_cache(store, prepared, first, face_settings)
            for digest, found, status in zip(first, prepared.hashes, prepared.status):
                if found is None:  # unreadable once decoded: recorded with its reason, read again when it changes
                    for path, size, mtime in store.new[digest]:
                        store.bad(path, size, mtime, status)
            summary = prepared.summary
        faces = db.face_total()
    seconds = time.perf_counter() - start
    return {
        "library": str(root),
        "photos": len(files),
        "read": len(todo),
        "unchanged": store.counts["unchanged"],
        "gone": store.counts["gone"],
        "faces_added": store.counts["faces_added"],
        "made_stale": stale,
        "named": store.counts["named"],
        "skipped": {k.split(":", 1)[1]: v for k, v in store.counts.items() if k.startswith("skipped:")},
        "faces_in_library": faces,
        "engine": engine,
        "from_face_cache": summary.get("from_cache", 0),
        "seconds": round(seconds, 3),
        "photos_per_second": round(len(todo) / seconds, 1) if todo and seconds > 0 else None,
    }

"""Library databases for the benches (bench/index.py --into-library, bench/cluster.py --db-scale): a new database on
SQLite or a PostgreSQL server, filled with given descriptors through pinsface.library_db as `index` stores them."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
from pathlib import Path

import numpy as np

_names = itertools.count()
_created: list[str] = []  # databases made on a server, dropped by drop_created
ROWS_AT_ONCE = 50_000  # face rows (with their 512-byte descriptors) built and inserted at a time


def fresh_db(tmp: Path, server: str | None, template: str | None = None) -> str:
    """A new, empty library database (or a copy of ``template``): a SQLite file, or a database on ``server``."""
    name = f"bench_{os.getpid()}_{next(_names)}"
    if server is None:
        path = tmp / f"{name}.db"
        if template:
            shutil.copy(template, path)
            path.chmod(0o600)
        return str(path)
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template.rsplit('/', 1)[1]}" if template else ""))
    _created.append(name)
    return f"{server}/{name}"


def drop_created(server: str | None) -> None:
    if server and _created:
        import psycopg

        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            for name in _created:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def db_size(url: str) -> str:
    from pinsface.library_db import LibraryDB, is_postgres

    if is_postgres(url):
        with LibraryDB.open(url) as db:
            size = int(db.rows("SELECT pg_database_size(current_database())")[0][0])
    else:
        size = sum(os.path.getsize(url + s) for s in ("", "-wal") if os.path.exists(url + s))
    return f"{size / 2**20:.0f} MiB"


def build_library_db(url: str, root: Path, faces: np.ndarray, per_photo: int, rng, files: bool = True) -> None:
    """Add these descriptors to a library, ``per_photo`` faces to a photo, with rows as index stores them (photo,
    then faces with boxes, landmarks and scores): the faces get ascending ids in this order. ``files``: a small
    file per photo under ``root`` (so that index finds each photo unchanged); without, only the paths are stored."""
    from pinsface.library_db import LibraryDB

    with LibraryDB.open(url) as db:
        start = int(db.rows("SELECT COUNT(*) FROM photos")[0][0])
    for lo in range(0, len(faces), ROWS_AT_ONCE * per_photo):
        part = faces[lo : lo + ROWS_AT_ONCE * per_photo]
        photos = _photo_rows(root, start + lo // per_photo, -(-len(part) // per_photo), files)
        _insert(url, photos, part, per_photo, rng)


def _photo_rows(root: Path, first: int, count: int, files: bool) -> list[tuple]:
    photos = []
    for p in range(first, first + count):
        path = root / f"{p // 1000:04d}" / f"photo_{p:07d}.jpg"
        data = f"not decoded: unchanged since it was indexed {p}".encode()
        size, mtime = len(data), 0.0
        if files:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            st = path.stat()
            size, mtime = st.st_size, st.st_mtime
        photos.append((str(path), hashlib.sha256(data).hexdigest(), size, mtime, 3000, 4000, None))
    return photos


def _insert(url: str, photos: list[tuple], faces: np.ndarray, per_photo: int, rng) -> None:
    from pinsface.library_db import LibraryDB, _blob

    with LibraryDB.open(url) as db, db.transaction():
        last = int(db.rows("SELECT COALESCE(MAX(id), 0) FROM photos")[0][0])
        db.executemany(
            "INSERT INTO photos (path, hash, size, mtime, width, height, reason) VALUES (?, ?, ?, ?, ?, ?, ?)", photos
        )
        ids = dict(db.rows("SELECT path, id FROM photos WHERE id > ?", (last,)))
        rows = []
        for k, x in enumerate(faces):
            path, digest = photos[k // per_photo][:2]
            x1, y1 = (float(v) for v in rng.uniform(0, 3000, 2))
            side = float(rng.uniform(90, 300))
            landmarks = np.array([[x1, y1]]) + rng.uniform(0, side, (5, 2))
            box = (x1, y1, x1 + side, y1 + side)
            rows.append((ids[path], digest, k % per_photo, *box, 0.99, _blob(landmarks), _blob(x)))
        db.executemany(
            "INSERT INTO faces (photo_id, photo_hash, idx, x1, y1, x2, y2, score, landmarks, descriptor)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

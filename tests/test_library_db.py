"""The library database on SQLite and on a real PostgreSQL server: schema, migrations, photos and faces."""

from __future__ import annotations

import dataclasses
import os
import stat

import numpy as np
import pytest

from pinsface.library_db import MIGRATIONS, SCHEMA_VERSION, TYPES, FaceRow, LibraryDB, LibraryDBError
from tests import postgres

# The fixtures: a real PostgreSQL server for the session, and a fresh database per test on SQLite and on it.
postgres_server, library_url = postgres.postgres_server, postgres.library_url


def face(digest: str, idx: int, seed: int = 0) -> FaceRow:
    rng = np.random.default_rng(seed + idx)
    return FaceRow(
        digest, idx, (1.0 + idx, 2.0, 30.0, 40.0), 0.99, rng.random((5, 2)), rng.random(128).astype(np.float32)
    )


def test_new_database_gets_the_current_schema(library_url):
    with LibraryDB.open(library_url) as db:
        assert db.version() == SCHEMA_VERSION
        assert db.face_total() == 0
    with LibraryDB.open(library_url) as db:  # opening again changes nothing
        assert db.version() == SCHEMA_VERSION


def test_sqlite_file_is_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "lib.db"
    with LibraryDB.open(path) as db:
        db.store_photo("a.jpg", "h" * 32, 10, 1.0, (5, 5), [face("h" * 32, 0)])
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(os.stat(p).st_mode) & 0o077 == 0, p


def test_a_folder_is_refused_as_a_database_and_nothing_is_created(tmp_path):
    for given in (f"{tmp_path / 'photos'}/", tmp_path):
        with pytest.raises(LibraryDBError, match="folder"):
            LibraryDB.open(given)
    assert not (tmp_path / "photos").exists()


def test_old_schema_is_migrated(library_url):
    with LibraryDB.open(library_url) as db:
        # Take the database back to version 1 by hand: drop what later steps made.
        with db.transaction():
            for name in ("faces_photo", "assignments_cluster", "assignments_person", "people_by_key"):
                db.execute(f"DROP INDEX {name}")
            db.execute("ALTER TABLE people DROP COLUMN name_key")
            db.execute("ALTER TABLE faces DROP COLUMN reach")
            db.execute("ALTER TABLE faces DROP COLUMN stale")
            db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        db.store_photo("a.jpg", "a" * 32, 10, 1.0, (5, 5), [face("a" * 32, k) for k in range(3)])
        with db.transaction():  # version 1 matched names exactly: three people, two of them one person
            for k, name in enumerate(["Ada Lovelace", "ada_lovelace", "Bob"]):
                db.execute("INSERT INTO people (name) VALUES (?)", (name,))
                db.execute(
                    "INSERT INTO assignments (face_id, person_id, source) SELECT f.id, p.id, 'name' FROM faces f,"
                    " people p WHERE f.idx = ? AND p.name = ?",
                    (k, name),
                )
        assert db.version() == 1
    with LibraryDB.open(library_url) as db:
        assert db.version() == SCHEMA_VERSION == MIGRATIONS[-1][0] == 6
        assert db.face_total() == 3
        # Their descriptors are plain embeddings (before version 5): clustering leaves them for index to redo.
        assert [r[0] for r in db.rows("SELECT stale FROM faces")] == [1, 1, 1]
        assert len(db.cluster_state()["face_ids"]) == 0 and db.stale_photos() == {1}
        assert [r[0] for r in db.rows("SELECT name FROM people ORDER BY id")] == ["Ada Lovelace", "Bob"]
        assert len(db.faces_of("ADA LOVELACE")) == 2 and len(db.faces_of("bob")) == 1
        assert db.person_id("Ada  lovelace", create=False) == db.person_id("Ada Lovelace")
        with pytest.raises(Exception):  # noqa: B017  (the migration made it already: a second one fails)
            with db.transaction():
                db.execute("CREATE INDEX faces_photo ON faces (photo_id)")


def test_descriptors_made_another_way_are_marked_stale_once(library_url):
    """A library says how its descriptors were made (meta "descriptors"). Asked to use another kind, every live
    face with a descriptor is marked stale (gone faces and erased descriptors aside), once; asked again for the
    same kind, nothing changes; a library from schema 5, which does not say, is marked on its first use."""
    with LibraryDB.open(library_url) as db:
        db.store_photo("a.jpg", "a" * 32, 10, 1.0, (5, 5), [face("a" * 32, k) for k in range(4)])
        db.store_photo("b.jpg", "b" * 32, 10, 1.0, (5, 5), [face("b" * 32, 0)])
        with db.transaction():
            db.execute("UPDATE faces SET descriptor = NULL WHERE idx = 1 AND photo_hash = ?", ("a" * 32,))
        db.mark_gone([db.photos()["b.jpg"][0]])
        assert db.use_descriptors('{"chip": 1}') == 3  # no kind recorded yet: as a library of schema 5
        assert db.stale_faces() == 3 and db.stale_photos() == {db.photos()["a.jpg"][0]}
        assert db.rows("SELECT value FROM meta WHERE key = 'descriptors'") == [('{"chip": 1}',)]
        assert db.use_descriptors('{"chip": 1}') == 0 and db.stale_faces() == 3
        with db.transaction():
            db.execute("UPDATE faces SET stale = 0")
        assert db.use_descriptors('{"chip": 1}') == 0 and db.stale_faces() == 0
        assert db.use_descriptors('{"chip": 2}') == 3 and db.stale_faces() == 3
        assert len(db.cluster_state()["face_ids"]) == 0
        assert db.rows("SELECT value FROM meta WHERE key = 'descriptors'") == [('{"chip": 2}',)]


def test_stale_descriptors_are_replaced_when_the_photo_is_stored_again(library_url):
    """A face stored with a stale descriptor (a plain one of schema 4, say) gets the new one when its photo is
    stored again: same face, assignments kept, reach to be measured again; an erased descriptor (a forgotten
    person's) stays erased, a face found again elsewhere in the photo is not taken for it, and a face already
    described as now is left as it is."""
    with LibraryDB.open(library_url) as db:
        db.store_photo("a.jpg", "a" * 32, 10, 1.0, (5, 5), [face("a" * 32, k) for k in range(4)])
        ids = [r[0] for r in db.rows("SELECT id FROM faces ORDER BY idx")]
        db.store_clusters([], [ids], [(0.5, ids[0])])
        with db.transaction():
            db.execute("UPDATE faces SET stale = 1 WHERE idx <> 2")
            db.execute("UPDATE faces SET descriptor = NULL WHERE idx = 1")
        assert db.stale_photos() == {1} and len(db.cluster_state()["face_ids"]) == 1 and db.stale_faces() == 2
        again = [face("a" * 32, k, seed=7) for k in range(4)]
        again[3] = dataclasses.replace(again[3], box=(100.0, 100.0, 130.0, 140.0))  # another face than the one stored
        assert db.store_photo("a.jpg", "a" * 32, 10, 1.0, (5, 5), again) == []  # no face added
        assert [r[0] for r in db.rows("SELECT id FROM faces ORDER BY idx")] == ids
        rows = db.rows("SELECT stale, reach FROM faces ORDER BY idx")
        assert rows == [(0, None), (1, None), (0, None), (1, None)]
        got = db.descriptors(ids)
        assert np.array_equal(got[0], again[0].descriptor) and not got[1].any()
        assert np.array_equal(got[2], face("a" * 32, 2).descriptor)
        assert np.array_equal(got[3], face("a" * 32, 3).descriptor)
        assert db.stale_photos() == {1} and len(db.cluster_state()["face_ids"]) == 2 and db.stale_faces() == 1
        assert {f["cluster"] for f in db.face_list()} == {db.face_list()[0]["cluster"]}


def test_a_name_that_cannot_be_an_identity_is_refused(library_url):
    """Names come into the library by the one rule for identity names (dataset.name_problem), whichever way:
    nothing is stored for a refused one."""
    with LibraryDB.open(library_url) as db:
        db.store_photo("a.jpg", "a" * 32, 10, 1.0, (5, 5), [face("a" * 32, 0)])
        db.store_clusters([], [[1]])
        for bad, why in (
            ("", "empty"),
            ("a/b", "slash"),
            ("..", "dots"),
            ("Ada\x1b[31m", "control"),
            ("x" * 300, "longer"),
        ):
            with pytest.raises(ValueError, match=why):
                db.name_cluster(1, bad)
            if bad:  # split off without a name: no name, not an empty one
                with pytest.raises(ValueError, match=why):
                    db.split_face(1, bad)
        assert db.rows("SELECT COUNT(*) FROM people") == [(0,)]
        assert db.person_id("Ada Lovelace") == db.person_id("ada_lovelace", create=False)


def test_newer_schema_is_refused_with_a_message(library_url):
    with LibraryDB.open(library_url) as db, db.transaction():
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(LibraryDBError, match="newer pinsface"):
        LibraryDB.open(library_url)


def test_store_photo_is_idempotent_and_a_changed_photo_retires_its_faces(library_url):
    a, b = "a" * 32, "b" * 32
    with LibraryDB.open(library_url) as db:
        added = db.store_photo("x/p.jpg", a, 100, 1.0, (50, 60), [face(a, 0), face(a, 1)])
        assert len(added) == 2
        assert db.store_photo("x/p.jpg", a, 100, 1.0, (50, 60), [face(a, 0), face(a, 1)]) == []
        assert db.face_total() == 2
        stored = db.descriptors(added)
        assert np.array_equal(stored[1], face(a, 1).descriptor)
        # The file changed: the new content's face is live, the old two are kept but gone.
        assert len(db.store_photo("x/p.jpg", b, 120, 2.0, (50, 60), [face(b, 0, seed=5)])) == 1
        assert db.face_total() == 1
        assert db.face_total(live_only=False) == 3
        assert [f["box"] for f in db.face_list()] == [[1.0, 2.0, 30.0, 40.0]]
        (pid, digest, size, _, gone) = db.photos()["x/p.jpg"]
        assert (digest, size, gone) == (b, 120, False)
        db.mark_gone([pid])
        assert db.face_total() == 0 and db.photos()["x/p.jpg"][4] is True
        db.touch_photo(pid, 121, 3.0)  # back, same content: its faces are live again
        assert db.face_total() == 1


def test_types_cover_every_placeholder():
    for _, steps in MIGRATIONS:
        for step in steps:
            for kind in TYPES:
                assert callable(step) or step.format(**TYPES[kind])

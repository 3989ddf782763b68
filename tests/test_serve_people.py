"""The People view of ``pinsface serve RUN --db DB``: a small unlabelled library of real Pins photos (three
people, two composite photos with two faces each) is indexed and clustered, then named, merged, moved and
searched in a real Chromium against the real server, with the database checked after each step. Over HTTP:
DELETE erases a person's descriptors from the library (SQLite and PostgreSQL), and bad input is refused."""

from __future__ import annotations

import io
import sqlite3
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image

from pinsface.library_db import LibraryDB
from pinsface.library_sheet import groups
from pinsface.testing.photos import group_photo, pins_faces
from tests import postgres
from tests.conftest import copy_identities
from tests.serving import API_KEY, ThreadServer, copy_run
from tests.test_serve_browser import browser  # noqa: F401  (the module's Chromium)

postgres_server, library_url = postgres.postgres_server, postgres.library_url
PEOPLE = ["pins_Emma Watson", "pins_Henry Cavil", "pins_Dwayne Johnson"]
KEY = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def photo_library(tmp_path_factory, pins_dir) -> Path:
    """Five Pins photos of each of three people (none of them known to the small run), and two composites
    with two of them side by side."""
    root = tmp_path_factory.mktemp("people") / "photos"
    copy_identities(root, PEOPLE, 5)
    (root / "groups").mkdir()
    for k, (a, b) in enumerate([(0, 1), (1, 2)]):
        sources = [(pins_faces(pins_dir, PEOPLE[i])[20 + k], PEOPLE[i]) for i in (a, b)]
        data, _ = group_photo(sources, seed=k, size=(1200, 800))
        (root / "groups" / f"group{k}.jpg").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def face_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("people-cache")


def build_library(photos: Path, url, cache: Path, detector) -> None:
    """``pinsface index`` and ``pinsface cluster`` through the Python API."""
    from pinsface.library_cluster import cluster_library
    from pinsface.library_index import index_library
    from pinsface.settings import Settings

    summary = index_library(photos, url, settings=Settings(cache_dir=str(cache)), detector=detector)
    assert summary["faces_in_library"] >= 17, summary
    with LibraryDB.open(url) as db:
        cluster_library(db)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory, photo_library, face_cache, detector) -> Path:
    path = tmp_path_factory.mktemp("people-db") / "library.db"
    build_library(photo_library, path, face_cache, detector)
    return path


def copy_db(template: Path, dest: Path) -> Path:
    with sqlite3.connect(template) as src, sqlite3.connect(dest) as dst:
        src.backup(dst)
    dest.chmod(0o600)
    return dest


def folder_of(source: str) -> str:
    return Path(source).parent.name


def clusters_by_person(url) -> dict[str, Counter]:
    """Pins folder -> Counter of the clusters holding its single-person photos' faces."""
    with LibraryDB.open(url) as db:
        faces = db.face_list()
    out: dict[str, Counter] = {}
    for f in faces:
        if folder_of(f["source"]) in PEOPLE:
            out.setdefault(folder_of(f["source"]), Counter())[f["cluster"]] += 1
    return out


def images_loaded(page, selector: str, timeout: float = 60) -> None:
    """Wait until every image under ``selector`` has loaded (polled with evaluate: the page's CSP forbids the
    eval that wait_for_function needs)."""
    script = f"[...document.querySelectorAll({selector!r})].every(i => i.complete && i.naturalWidth > 0)"
    deadline = time.monotonic() + timeout
    while not page.evaluate(script):
        assert time.monotonic() < deadline, f"images under {selector} did not load"
        time.sleep(0.1)


def test_people_view_in_the_browser(small_run, template_db, browser, tmp_path):  # noqa: F811  (the imported browser fixture)
    from playwright.sync_api import expect

    from pinsface.serve import create_app

    db_path = copy_db(template_db, tmp_path / "library.db")
    run = copy_run(small_run[0], tmp_path / "run")
    shots = tmp_path / "screens"
    shots.mkdir()
    with LibraryDB.open(db_path) as db:
        live = db.face_list()
    groups_before = groups(live)
    emma = clusters_by_person(db_path)["pins_Emma Watson"].most_common(1)[0][0]
    with ThreadServer(create_app(run, api_key=API_KEY, db=db_path)) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)

        # 1. The library's clusters, each with its faces' thumbnails cut on the server.
        page.goto(server.url)
        page.locator("#key-input").fill(API_KEY)
        page.locator("#key-input").press("Enter")
        expect(page.locator("#library")).to_be_visible()
        cards = page.locator("#library-groups > li")
        expect(cards).to_have_count(len(groups_before))
        expect(page.locator("#library-summary")).to_contain_text(f"{len(live)} faces")
        thumbs = page.locator("#library-groups .thumb img")
        expect(thumbs).to_have_count(len(live))
        images_loaded(page, "#library-groups .thumb img")
        page.locator("#library").scroll_into_view_if_needed()
        page.screenshot(path=shots / "1-clusters.png", full_page=True)

        # 2. Name Emma Watson's cluster: stored, and her faces are enrolled into the served run.
        page.get_by_label(f"Name for cluster {emma}", exact=True).fill("Emma Watson")
        page.locator(f'li[data-cluster="{emma}"]').get_by_role("button", name="Name", exact=True).click()
        expect(page.locator("#status")).to_contain_text("Named cluster", timeout=120_000)
        expect(page.locator("#status")).to_contain_text("enrolled into the run")
        expect(page.locator("#people-count")).to_have_text("7 of 7 people")
        expect(page.locator('#library-groups > li[data-kind="person"] h3')).to_contain_text("Emma Watson")
        with LibraryDB.open(db_path) as db:
            named = db.faces_of("Emma Watson")
            assert sorted(named) == sorted(f["id"] for f in live if f["cluster"] == emma)
        people = httpx.get(f"{server.url}/v1/identities", headers=KEY).json()["identities"]
        assert "Emma Watson" in [p["name"] for p in people]
        page.screenshot(path=shots / "2-named.png", full_page=True)

        # 3. Move one of Henry's faces out to a new cluster of its own.
        henry = clusters_by_person(db_path)["pins_Henry Cavil"].most_common(1)[0][0]
        henry_faces = [f["id"] for f in live if f["cluster"] == henry]
        moved = henry_faces[-1]
        expect(page.locator("#face-actions")).to_be_hidden()
        page.get_by_role("button", name=f"Face {moved} (Cluster {henry})").click()
        expect(page.locator("#face-actions")).to_be_visible()
        expect(page.locator("#face-selected")).to_have_text(f"Face {moved}:")
        page.screenshot(path=shots / "3-selected.png", full_page=True)
        page.get_by_role("button", name="Move to a new cluster").click()
        expect(page.locator("#status")).to_contain_text(f"Moved face {moved} to a new cluster")
        with LibraryDB.open(db_path) as db:
            new_cluster = db.face_list([moved])[0]["cluster"]
            assert new_cluster not in (None, henry)
            assert [f["id"] for f in db.face_list() if f["cluster"] == new_cluster] == [moved]
        expect(page.locator(f'li[data-cluster="{new_cluster}"] .thumb')).to_have_count(1)
        expect(page.locator("#face-actions")).to_be_hidden()

        # 4. Merge that cluster back into Henry's.
        page.get_by_label(f"Merge cluster {new_cluster} into").select_option(str(henry))
        page.locator(f'li[data-cluster="{new_cluster}"]').get_by_role("button", name="Merge").click()
        expect(page.locator("#status")).to_contain_text(f"Merged cluster {new_cluster} into cluster {henry}")
        expect(page.locator(f'li[data-cluster="{new_cluster}"]')).to_have_count(0)
        with LibraryDB.open(db_path) as db:
            assert sorted(f["id"] for f in db.face_list() if f["cluster"] == henry) == sorted(henry_faces)

        # 5. Move a face to a named person, and unassign another.
        dwayne = clusters_by_person(db_path)["pins_Dwayne Johnson"].most_common(1)[0][0]
        dwayne_face = next(f["id"] for f in live if f["cluster"] == dwayne)
        page.get_by_role("button", name=f"Face {dwayne_face} (Cluster {dwayne})").click()
        page.get_by_label("Move to person").fill("Dwayne Johnson")
        page.get_by_role("button", name="Move", exact=True).click()
        expect(page.locator("#status")).to_contain_text(f"Moved face {dwayne_face} to Dwayne Johnson")
        gone = henry_faces[0]
        page.get_by_role("button", name=f"Face {gone} (Cluster {henry})").click()
        page.get_by_role("button", name="Unassign").click()
        expect(page.locator("#status")).to_contain_text(f"Face {gone} is in no cluster now")
        with LibraryDB.open(db_path) as db:
            assert db.faces_of("Dwayne Johnson") == [dwayne_face]
            face = db.face_list([gone])[0]
            assert face["cluster"] is None and face["person"] is None and face["how"] == "unassigned"
        expect(page.locator('#library-groups > li[data-kind="unclustered"] .thumb')).to_have_count(1)
        page.screenshot(path=shots / "5-moved.png", full_page=True)

        # 6. Search Emma Watson's photos: every one, with the boxes of her faces drawn on it.
        with LibraryDB.open(db_path) as db:
            expected = db.find_photos(["Emma Watson"])
        assert expected
        page.get_by_label("Find the photos of").fill("Emma Watson")
        page.get_by_role("button", name="Find photos").click()
        expect(page.locator("#find-count")).to_have_text(f"{len(expected)} photo(s) of Emma Watson")
        expect(page.locator("#find-results figure")).to_have_count(len(expected))
        expect(page.locator("#find-results .libbox")).to_have_count(sum(len(p["faces"]) for p in expected))
        shown = page.locator("#find-results figcaption").all_inner_texts()
        assert shown == [p["source"] for p in expected]
        images_loaded(page, "#find-results img")
        page.locator("#find-results").scroll_into_view_if_needed()
        page.screenshot(path=shots / "6-found.png", full_page=True)

        # 7. Forget Emma Watson from the run's list: she leaves the library too, and its view shows it.
        page.get_by_role("button", name="Forget Emma Watson").click()
        expect(page.locator("#confirm-text")).to_contain_text("photo library")
        page.get_by_role("button", name="Forget", exact=True).click()
        expect(page.locator("#status")).to_contain_text("Forgot Emma Watson", timeout=120_000)
        person_cards = page.locator('#library-groups > li[data-kind="person"]')
        expect(person_cards.filter(has_text="Emma Watson")).to_have_count(0)
        expect(person_cards.filter(has_text="Dwayne Johnson")).to_have_count(1)
        expect(page.locator("#find-count")).to_have_text("0 photo(s) of Emma Watson")  # the search shown again
        expect(page.locator("#find-results figure")).to_have_count(0)
        page.screenshot(path=shots / "7-forgotten.png", full_page=True)
        with LibraryDB.open(db_path) as db:
            assert db.faces_of("Emma Watson") == [] and not db.descriptors(named).any()

        # A phone-width screen: the People view fits.
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(server.url)
        phone.locator("#key-input").fill(API_KEY)
        phone.locator("#key-input").press("Enter")
        expect(phone.locator("#library-groups > li").first).to_be_visible()
        images_loaded(phone, "#library-groups .thumb img")
        phone.locator("#library").scroll_into_view_if_needed()
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390
        phone.screenshot(path=shots / "8-phone.png")
        assert [e for e in errors if "401" not in e] == [] and sum("401" in e for e in errors) <= 2, errors
    print(f"screenshots: {shots}")


def test_delete_erases_the_person_from_the_library(
    small_run, library_url, photo_library, face_cache, detector, tmp_path
):
    from pinsface.serve import create_app

    build_library(photo_library, library_url, face_cache, detector)
    by_person = clusters_by_person(library_url)
    emma = by_person["pins_Emma Watson"].most_common(1)[0][0]
    henry = by_person["pins_Henry Cavil"].most_common(1)[0][0]
    with LibraryDB.open(library_url) as db:
        db.name_cluster(henry, "Henry Cavill")  # named in the library only, never enrolled
    run = copy_run(small_run[0], tmp_path / "run")
    with ThreadServer(create_app(run, api_key=API_KEY, db=library_url)) as server:
        named = httpx.post(
            f"{server.url}/v1/library/clusters/{emma}/name", json={"name": "Emma Watson"}, headers=KEY, timeout=300
        )
        assert named.status_code == 200, named.text
        assert named.json()["enrolled"]["faces_used"] == named.json()["faces"] > 0
        with LibraryDB.open(library_url) as db:
            emma_faces = db.faces_of("Emma Watson")
            together = db.find_photos(["Emma Watson", "Henry Cavill"])
        assert emma_faces
        found = httpx.get(
            f"{server.url}/v1/library/photos", params={"name": "Emma Watson", "with": "Henry Cavill"}, headers=KEY
        ).json()
        assert found["count"] == len(together) and [p["source"] for p in found["photos"]] == [
            p["source"] for p in together
        ]
        assert all({f["person"] for f in p["faces"]} == {"Emma Watson", "Henry Cavill"} for p in found["photos"])

        r = httpx.delete(f"{server.url}/v1/identities/Emma Watson", headers=KEY, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["library_faces_erased"] == len(emma_faces)
        names = [p["name"] for p in httpx.get(f"{server.url}/v1/identities", headers=KEY).json()["identities"]]
        assert "Emma Watson" not in names
        with LibraryDB.open(library_url) as db:
            assert db.faces_of("Emma Watson") == [] and db.person_id("Emma Watson", create=False) is None
            assert not db.descriptors(emma_faces).any()
            assert {f["how"] for f in db.face_list(emma_faces)} == {"unassigned"}

        # Known to the library only: erased there, the run untouched.
        r = httpx.delete(f"{server.url}/v1/identities/Henry Cavill", headers=KEY, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["in_run"] is False and r.json()["library_faces_erased"] > 0
        with LibraryDB.open(library_url) as db:
            assert db.faces_of("Henry Cavill") == []
        r = httpx.delete(f"{server.url}/v1/identities/Nobody Here", headers=KEY)
        assert r.status_code == 404 and r.json()["code"] == "unknown_identity"


def test_bad_input_is_refused(small_run, template_db, tmp_path):
    from pinsface.serve import create_app

    db_path = copy_db(template_db, tmp_path / "library.db")
    with LibraryDB.open(db_path) as db:
        face = db.face_list()[0]
        before = db.face_list()
    cluster = face["cluster"]
    with ThreadServer(create_app(small_run[0], api_key=API_KEY, db=db_path)) as server:
        lib = f"{server.url}/v1/library"

        def check(method, path, status, code, **kw):
            r = httpx.request(method, lib + path, **{"headers": KEY, **kw})
            assert r.status_code == status, (path, r.text)
            assert r.json()["code"] == code and r.json()["message"], r.json()

        check("GET", "/people", 401, "missing_api_key", headers={})
        check("POST", f"/clusters/{cluster}/name", 401, "missing_api_key", headers={}, json={"name": "Ann"})
        check("POST", f"/faces/{face['id']}/unassign", 403, "invalid_api_key", headers={"X-API-Key": "wrong" * 4})
        check("GET", f"/faces/{face['id']}/thumbnail", 401, "missing_api_key", headers={})
        check("POST", "/clusters/999999/name", 404, "unknown_cluster", json={"name": "Ann"})
        check("POST", f"/clusters/{cluster}/merge", 404, "unknown_cluster", json={"other": 999999})
        check("POST", f"/clusters/{cluster}/merge", 422, "same_cluster", json={"other": cluster})
        check("POST", "/faces/999999/move", 404, "unknown_face", json={})
        check("POST", "/faces/999999/unassign", 404, "unknown_face")
        check("GET", "/faces/999999/thumbnail", 404, "unknown_face")
        check("GET", "/photos/999999/thumbnail", 404, "unknown_photo")
        check("GET", "/faces/abc/thumbnail", 422, "validation_error")
        check("GET", "/faces/..%2F..%2Fetc%2Fpasswd/thumbnail", 404, "not_found")
        check("GET", "/faces/-1/thumbnail", 422, "validation_error")
        check("POST", f"/clusters/{cluster}/name", 422, "validation_error", json={"name": "Ann", "path": "/etc"})
        check("POST", f"/clusters/{cluster}/name", 422, "validation_error", json={"name": 5})
        check("POST", f"/clusters/{cluster}/merge", 422, "validation_error", json={"other": "x"})
        for bad in ("", "   ", "a/b", "..", "x" * 101, "tab\there"):
            check("POST", f"/clusters/{cluster}/name", 422, "invalid_name", json={"name": bad})
            check("POST", f"/faces/{face['id']}/move", 422, "invalid_name", json={"name": bad})
        check("GET", "/photos", 422, "invalid_name", params={"name": "a/b"})
        check("GET", "/photos", 422, "validation_error")
        check("GET", "/photos", 422, "validation_error", params=[("name", "Ann")] + [("with", "Bob")] * 9)
        check("GET", "/photos", 422, "validation_error", params={"name": "x" * 1001})
        check("GET", "/people", 422, "validation_error", params={"limit": 10_000})

        assert httpx.get(f"{server.url}/v1/health", headers=KEY).json()["library"] is True
        r = httpx.get(f"{lib}/faces/{face['id']}/thumbnail", headers=KEY)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
        assert Image.open(io.BytesIO(r.content)).size == (96, 96)
        r = httpx.get(f"{lib}/people", headers=KEY, params={"per_group": 1})
        assert r.status_code == 200 and all(len(g["face_ids"]) <= 1 for g in r.json()["groups"])
    with LibraryDB.open(db_path) as db:
        assert db.face_list() == before, "a refused request changed the library"

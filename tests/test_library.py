"""The photo library end to end on SQLite and a real PostgreSQL server: index real Pins photos (every face),
cluster, name, find, the contact sheet; and index's reliability under SIGKILL, two processes and deletions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pinsface import library_cluster
from pinsface.library_cluster import cluster_library, mean_pair_linkage
from pinsface.library_db import LibraryDB
from tests import postgres
from tests.conftest import copy_identities
from tests.processes import finish, start

postgres_server, library_url = postgres.postgres_server, postgres.library_url
PEOPLE = ["pins_Bill Gates", "pins_Brie Larson", "pins_Chris Evans"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def library(tmp_path_factory, pins_dir) -> Path:
    """Real Pins photos of three people in nested folders, one group photo of two of them, and a bad file."""
    root = tmp_path_factory.mktemp("lib") / "photos"
    copy_identities(root / "2019" / "trip", PEOPLE, 6)
    faces = [sorted((pins_dir / p).glob("*.jpg"))[10] for p in PEOPLE[:2]]
    group = Image.new("RGB", (900, 500), (120, 130, 140))
    for k, f in enumerate(faces):
        group.paste(Image.open(f).convert("RGB").resize((300, 370)), (60 + 480 * k, 60))
    group.save(root / "group.jpg", quality=92)
    (root / "notes.jpg").write_bytes(b"not a photo")
    return root


def pinsface(*args, env=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return start([sys.executable, "-m", "pinsface.cli", *map(str, args)], env=env)


def run(*args, **kw) -> str:
    proc = pinsface(*args, **kw)
    out, err = finish(proc, timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def faces_of(url: str) -> Counter:
    """(photo, face position, rounded box) of every live face, counted: each must be there once."""
    with LibraryDB.open(url) as db:
        return Counter((Path(f["source"]).name, tuple(round(v) for v in f["box"])) for f in db.face_list())


def test_index_cluster_name_find(library, library_url, tmp_path, pins_dir):
    cache = tmp_path / "cache"
    summary = json.loads(run("index", library, "--db", library_url, "--cache", cache, "--json").splitlines()[-1])
    assert summary["photos"] == 20 and summary["skipped"] == {"not_an_image": 1}
    faces = faces_of(library_url)
    assert set(faces.values()) == {1}
    group = [k for k in faces if k[0] == "group.jpg"]
    assert len(group) == 2, "every face of the group photo, not only a subject"
    assert sum(faces.values()) >= 19
    again = json.loads(run("index", library, "--db", library_url, "--cache", cache, "--json").splitlines()[-1])
    assert again["read"] == 0 and again["faces_added"] == 0 and again["unchanged"] == 20

    lines = [json.loads(x) for x in run("cluster", "--db", library_url, "--json").splitlines()]
    assert {tuple(sorted(x)) for x in lines} == {("box", "cluster", "person", "source")}
    by_folder = {}
    for x in lines:
        person = Path(x["source"]).parent.name
        if person.startswith("pins_"):
            by_folder.setdefault(x["cluster"], Counter())[person] += 1
    mixed = [c for c, people in by_folder.items() if len(people) > 1]
    assert not mixed, f"clusters holding two people: {by_folder}"
    bill = Counter(x["cluster"] for x in lines if "Bill Gates" in x["source"] and "group" not in x["source"])
    biggest, _ = bill.most_common(1)[0]
    others = [c for c in bill if c != biggest]
    run("name", biggest, "Bill Gates", "--db", library_url, *(["--merge", *others] if others else []))
    found = run("find", "Bill Gates", "--db", library_url, "--json").splitlines()
    sources = {json.loads(x)["source"] for x in found}
    assert {Path(s).name for s in sources} >= {p.name for p in (library / "2019/trip/pins_Bill Gates").iterdir()}

    # A new photo joins the named cluster without re-clustering, and the name stays.
    extra = sorted((pins_dir / "pins_Bill Gates").glob("*.jpg"))
    shutil.copy(extra[40], library / "2019" / "new_bill.jpg")
    try:
        run("index", library, "--db", library_url, "--cache", cache)
        report = run("cluster", "--db", library_url)
        assert "1 new" in report
        lines = [json.loads(x) for x in run("cluster", "--db", library_url, "--json").splitlines()]
        new = [x for x in lines if x["source"].endswith("new_bill.jpg")]
        assert new[0]["person"] == "Bill Gates" and new[0]["cluster"] == biggest
    finally:
        (library / "2019" / "new_bill.jpg").unlink()

    sheet = tmp_path / "people.html"
    run("people", "--db", library_url, "--html", sheet)
    text = sheet.read_text()
    assert "Bill Gates" in text and text.count("data:image/jpeg;base64,") >= 19 and "http" not in text


def test_split_unassign_merge_and_forget(library_url):
    with LibraryDB.open(library_url) as db:
        rng = np.random.default_rng(0)
        from pinsface.library_db import FaceRow

        for k in range(6):
            d = f"{k:032d}"
            centre = np.eye(128, dtype=np.float32)[k // 3]
            db.store_photo(
                f"/p/{k}.jpg",
                d,
                1,
                1.0,
                (10, 10),
                [
                    FaceRow(
                        d, 0, (0, 0, 5, 5), 0.9, rng.random((5, 2)), centre + 0.01 * rng.random(128).astype(np.float32)
                    )
                ],
            )
        assert cluster_library(db)["new_clusters"] == 2
        faces = db.face_list()
        a, b = faces[0]["cluster"], faces[3]["cluster"]
        db.name_cluster(a, "Ann")
        db.merge_clusters(a, b)
        assert {f["person"] for f in db.face_list()} == {"Ann"}
        db.split_face(faces[5]["id"], "Bob")
        db.unassign(faces[4]["id"])
        cluster_library(db)  # leaves a person's choices alone
        people = [f["person"] for f in db.face_list()]
        assert people == ["Ann", "Ann", "Ann", "Ann", None, "Bob"]
        assert db.forget_person("Ann") == 4
        assert db.descriptors([f["id"] for f in faces[:4]]).any() is np.False_
        cluster_library(db)
        assert [f["person"] for f in db.face_list()] == [None, None, None, None, None, "Bob"]


def test_mean_pair_linkage_keeps_strangers_apart():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 128)).astype(np.float32)
    centres *= 1.5 / np.linalg.norm(centres, axis=1, keepdims=True)
    owner = np.repeat(np.arange(40), 5)
    x = centres[owner] + 0.02 * rng.standard_normal((200, 128)).astype(np.float32)
    labels = mean_pair_linkage(x)
    assert len(np.unique(labels)) == 40
    assert all(len(np.unique(owner[labels == c])) == 1 for c in np.unique(labels))


def _people(n_people: int, per: int, seed: int) -> np.ndarray:
    """Faces of ``n_people`` people, ``per`` each: strangers about 0.9 apart, one person's faces about 0.4 (the
    closer half of a real person's pairs: bench/cluster.py), so that the graph has edges both within and across
    people."""
    rng = np.random.default_rng(seed)
    centres = 0.056 * rng.standard_normal((n_people, 128)).astype(np.float32)
    return np.repeat(centres, per, axis=0) + 0.025 * rng.standard_normal((n_people * per, 128)).astype(np.float32)


def _plain_mean_pair_linkage(x: np.ndarray, graph) -> np.ndarray:
    """The rule of mean_pair_linkage written plainly (numpy scalars, one union-find), to check the fast one."""
    a, b, _ = library_cluster._edges(*graph, library_cluster.EDGE_DISTANCE)
    spaces = library_cluster.spacing(library_cluster.reach(graph[0]))
    parent, counts = np.arange(len(x)), np.ones(len(x))
    sums = x.astype(np.float64)
    squares = np.einsum("nd,nd->n", sums, sums)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(a.tolist(), b.tolist()):
        ri, rj = root(i), root(j)
        if ri == rj:
            continue
        n = counts[ri] * counts[rj]
        mean_sq = squares[ri] / counts[ri] + squares[rj] / counts[rj] - 2 * (sums[ri] @ sums[rj]) / n
        bound = library_cluster.CENTROID_DISTANCE - library_cluster.SMALL_GROUPS / np.sqrt(n)
        spread = ((spaces[ri] + spaces[rj]) / (counts[ri] + counts[rj])) ** library_cluster.DENSITY
        apart = np.sum((sums[ri] / counts[ri] - sums[rj] / counts[rj]) ** 2)
        cap = library_cluster.CENTRE_NOISE * (1 / counts[ri] + 1 / counts[rj]) + library_cluster.CENTRE_GAP
        if mean_sq <= (bound * spread) ** 2 and apart <= cap * spread**2:
            ri, rj = (ri, rj) if counts[ri] >= counts[rj] else (rj, ri)
            parent[rj], counts[ri] = ri, counts[ri] + counts[rj]
            sums[ri] += sums[rj]
            spaces[ri] += spaces[rj]
            squares[ri] += squares[rj]
    return np.unique([root(i) for i in range(len(x))], return_inverse=True)[1]


def _face_rule(x, spaced, sums, squares, counts, spaces) -> np.ndarray:
    """Whether mean_pair_linkage's rule joins each face (rows) to each group (columns), written plainly."""
    mean_sq = np.einsum("nd,nd->n", x, x)[:, None] + squares / counts - 2 * x @ sums.T / counts
    bound = library_cluster.CENTROID_DISTANCE - library_cluster.SMALL_GROUPS / np.sqrt(counts)
    spread = ((spaces + spaced[:, None]) / (counts + 1)) ** library_cluster.DENSITY
    apart = ((x[:, None, :] - (sums / counts[:, None])[None]) ** 2).sum(-1)
    cap = library_cluster.CENTRE_NOISE * (1 + 1 / counts) + library_cluster.CENTRE_GAP
    return (mean_sq <= (bound * spread) ** 2) & (apart <= cap * spread**2)


def test_refine_moves_a_face_to_the_group_that_fits_it_best():
    """One round of refine, against its rule written plainly over every face: a face moves to the group of two
    faces or more, among its graph neighbours', that the linkage's rule accepts and whose faces are nearer to it
    on average than its own group's others, the nearest such; on real linkage labels with some faces put wrong,
    the wrongly put ones go back to their people, and a move into a group that holds a face of the same photo is
    not made."""
    x = _people(60, 6, seed=8).astype(np.float64)
    owner = np.arange(len(x)) // 6
    graph = library_cluster.neighbour_graph(x)
    spaced = library_cluster.spacing(library_cluster.reach(graph[0]))
    labels = mean_pair_linkage(x, graph=graph, spaced=spaced)
    assert np.array_equal(labels, np.unique(owner, return_inverse=True)[1])
    assert np.array_equal(labels, library_cluster.refine(x, labels, graph, spaced))  # a fixed point
    wrong = labels.copy()
    stray = np.arange(0, len(x), 12)  # each person's first face, every other person: into the next person's group
    wrong[stray] = labels[stray + 6]
    moved = library_cluster.refine(x, wrong, graph, spaced, rounds=1)
    counts = np.bincount(wrong).astype(np.float64)
    sums = np.stack([x[wrong == c].sum(0) for c in range(len(counts))])
    squares = np.bincount(wrong, np.einsum("nd,nd->n", x, x))
    spaces = np.bincount(wrong, spaced)
    expected = wrong.copy()
    for i in range(len(x)):
        own, size = wrong[i], counts[wrong[i]] - 1
        others = np.flatnonzero((wrong == own) & (np.arange(len(x)) != i))
        stay = np.mean(((x[others] - x[i]) ** 2).sum(1)) if size else np.inf
        options = []
        for c in {wrong[j] for j in graph[1][i] if j >= 0} - {own}:
            if counts[c] < 2:
                continue
            mean_sq = np.mean(((x[wrong == c] - x[i]) ** 2).sum(1))
            fits = _face_rule(
                x[i : i + 1],
                spaced[i : i + 1],
                sums[c : c + 1],
                squares[c : c + 1],
                counts[c : c + 1],
                spaces[c : c + 1],
            )[0, 0]
            if fits and mean_sq < stay:
                options.append((mean_sq, c))
        if options:
            expected[i] = min(options)[1]
    assert np.array_equal(np.unique(expected, return_inverse=True)[1], moved)
    assert all(len(set(owner[moved == c])) == 1 for c in np.unique(moved)), "every stray face went home"
    # With photos: each stray face shares its photo with a face of its own group, so it cannot go back there.
    photos = np.arange(len(x))
    photos[stray] = photos[stray + 1]
    kept = library_cluster.refine(x, wrong, graph, spaced, photos, rounds=1)
    for k in stray:
        assert kept[k] != kept[k + 1]


def test_joining_existing_clusters_follows_the_linkage_rule():
    """A new face joins the existing cluster that mean_pair_linkage's rule (spacing included) accepts, the nearest
    of those, as the rule written plainly over every cluster says."""
    x = _people(200, 6, seed=4).astype(np.float64)
    spaced = library_cluster.spacing(library_cluster.reach(library_cluster.neighbour_graph(x)[0]))
    held = np.arange(5, len(x), 6)
    rest = np.setdiff1d(np.arange(len(x)), held)
    labels = mean_pair_linkage(x[rest], spaced=spaced[rest])
    counts = np.bincount(labels).astype(np.float64)
    sums = np.stack([x[rest][labels == c].sum(0) for c in range(len(counts))])
    squares = np.bincount(labels, np.einsum("nd,nd->n", x[rest], x[rest]))
    spaces = np.bincount(labels, spaced[rest])
    joined = library_cluster.join_existing(x[held], spaced[held], (sums, squares, counts, spaces))
    sq = np.einsum("nd,nd->n", x[held], x[held])[:, None]
    mean_sq = sq + squares / counts - 2 * x[held] @ sums.T / counts
    plain = np.where(_face_rule(x[held], spaced[held], sums, squares, counts, spaces), mean_sq, np.inf)
    expected = np.where(np.isfinite(plain.min(1)), plain.argmin(1), -1)
    assert np.array_equal(joined, expected)
    owner = np.arange(len(x)) // 6
    own = [np.bincount(owner[rest][labels == c]).argmax() if c >= 0 else -1 for c in joined]
    assert np.mean(np.array(own) == owner[held]) > 0.9


@pytest.mark.parametrize("flat_limit", [None, 1000], ids=["exact", "inverted-file"])
def test_neighbour_graph_in_blocks_equals_one_search(flat_limit, monkeypatch):
    """Searching the faces in blocks gives the graph of one search over all of them, with the exact index and
    with the inverted file (used above face_index.FLAT_LIMIT faces, here lowered to reach it), and the fast
    linkage gives the plain rule's clusters on it."""
    from pinsface import face_index

    if flat_limit is not None:
        monkeypatch.setattr(face_index, "FLAT_LIMIT", flat_limit)
    x = _people(1000, 9, seed=2)
    assert library_cluster._blocks(len(x), 4096) == [(0, 4096), (4096, 9000)]
    one = library_cluster.neighbour_graph(x, block=len(x))
    blocks = library_cluster.neighbour_graph(x, block=4096)
    assert one[0].dtype == np.float32 and one[1].dtype == np.int32 and one[1].shape == (9000, 10)
    assert np.array_equal(one[0], blocks[0]) and np.array_equal(one[1], blocks[1])
    edges = library_cluster._edges(*one, library_cluster.EDGE_DISTANCE)
    assert len(edges[0]) > len(x) and np.all(edges[0] < edges[1]) and np.all(np.diff(edges[2]) >= 0)
    labels = library_cluster.mean_pair_linkage(x, graph=blocks)
    assert 100 < len(np.unique(labels)) < len(x)  # faces were joined, and not all of them
    assert np.array_equal(labels, _plain_mean_pair_linkage(x, one))


def test_descriptors_read_in_chunks(library_url):
    """The chunked read gives each live face's descriptor, in the order asked, and tells the faces it did not
    find (a forgotten person's, whose descriptors are erased)."""
    from pinsface.library_db import FaceRow

    x = _people(5, 3, seed=3)
    with LibraryDB.open(library_url) as db:
        for k in range(5):
            faces = [FaceRow(f"{k:032d}", i, (0, 0, 5, 5), 0.9, np.zeros((5, 2)), x[3 * k + i]) for i in range(3)]
            db.store_photo(f"/p/{k}.jpg", f"{k:032d}", 1, 1.0, (10, 10), faces)
        ids = db.cluster_state()["face_ids"]
        out, found = db.descriptors_in_chunks(ids, chunk=4)
        assert found.all() and np.array_equal(out, x) and np.array_equal(out, db.descriptors(ids.tolist()))
        cluster_library(db)
        db.name_cluster(db.face_list([int(ids[0])])[0]["cluster"], "Ann")
        db.forget_person("Ann")
        out, found = db.descriptors_in_chunks(ids, chunk=4)
        assert 0 < (~found).sum() < len(ids) and not out[~found].any()
        assert np.array_equal(out[found], x[found])
        assert cluster_library(db)["faces"] == found.sum()


def test_a_faces_reach_is_measured_once_and_stored(library_url, monkeypatch):
    """A first run measures every face's reach on the library's graph and stores it; a later run searches the
    neighbours of the new faces alone, among all the faces, and leaves the stored reaches as they were."""
    from pinsface.library_db import FaceRow

    x = _people(12, 6, seed=5)
    first, later = np.arange(len(x)) % 6 != 5, np.arange(len(x)) % 6 == 5

    def store(db, rows):
        for k in rows:
            face = FaceRow(f"{k:032d}", 0, (0, 0, 5, 5), 0.9, np.zeros((5, 2)), x[k])
            db.store_photo(f"/p/{k}.jpg", f"{k:032d}", 1, 1.0, (10, 10), [face])

    searched = []
    graph = library_cluster.neighbour_graph
    monkeypatch.setattr(
        library_cluster,
        "neighbour_graph",
        lambda faces, *a, of=None, **kw: (
            searched.append((len(faces), None if of is None else len(of))) or graph(faces, *a, of=of, **kw)
        ),
    )
    with LibraryDB.open(library_url) as db:
        store(db, np.flatnonzero(first))
        cluster_library(db)
        assert searched == [(first.sum(), None)]
        stored = db.cluster_state()["reach"]
        assert np.allclose(stored, library_cluster.reach(graph(x[first])[0]))
        searched.clear()
        store(db, np.flatnonzero(later))
        cluster_library(db)
        assert searched[0] == (len(x), later.sum())  # the new faces' neighbours, among all
        reaches = db.cluster_state()["reach"]  # in face id order: the first ones, then the later ones
        assert np.array_equal(reaches[: first.sum()], stored)
        order = np.concatenate([np.flatnonzero(first), np.flatnonzero(later)])
        everyone = library_cluster.reach(graph(x[order])[0])
        assert np.allclose(reaches[first.sum() :], everyone[first.sum() :])


def test_two_faces_of_one_photo_never_share_a_cluster(library_url):
    """Two faces of one photo are two people: however alike, the linkage keeps them apart, and a later run does
    not put a new face into a cluster that holds a face of its photo (nor two new faces of one photo into one)."""
    from pinsface.library_db import FaceRow

    x = _people(6, 8, seed=6)
    twin = x[0] + 0.001  # as alike as two faces get, but in person 0's first photo
    photos = np.arange(len(x))
    labels = mean_pair_linkage(np.vstack([x, twin]), photos=np.append(photos, 0))
    assert labels[-1] != labels[0] and labels[1] in (labels[0], labels[-1])  # apart; one of them with person 0
    assert mean_pair_linkage(np.vstack([x, twin]))[-1] == labels[0]  # without photos they would have joined

    def face(digest, idx, vector):
        return FaceRow(digest, idx, (0, 0, 5, 5), 0.9, np.zeros((5, 2)), vector)

    with LibraryDB.open(library_url) as db:
        for k in range(len(x)):
            db.store_photo(f"/p/{k}.jpg", f"{k:032d}", 1, 1.0, (10, 10), [face(f"{k:032d}", 0, x[k])])
        cluster_library(db)
        first = {f["id"]: f["cluster"] for f in db.face_list()}
        # Photo 0 again, changed: person 0's face and a near twin; and a new photo with two twins of person 1.
        a, b = "a" * 32, "b" * 32
        db.store_photo("/p/0.jpg", a, 2, 2.0, (10, 10), [face(a, 0, x[0]), face(a, 1, twin)])
        db.store_photo("/p/new.jpg", b, 1, 1.0, (10, 10), [face(b, 0, x[8] + 0.001), face(b, 1, x[8])])
        cluster_library(db)
        faces = db.face_list()
        for path in ("/p/0.jpg", "/p/new.jpg"):
            clusters = [f["cluster"] for f in faces if f["source"] == path]
            assert len(clusters) == 2 and clusters[0] != clusters[1], (path, clusters)
        assert {f["cluster"] for f in faces if f["source"] == "/p/new.jpg"} & set(first.values())


def test_index_describes_chips_as_describe_does(reference_chips):
    """The descriptor index stores for a chip is pinsface.describe's for it: the embedding averaged with the
    mirror image's (not the plain embedding, as before schema 5)."""
    from pinsface import api
    from pinsface.face_index import face_vectors
    from pinsface.library_index import _Describer
    from pinsface.settings import Settings

    chips = reference_chips["chips"][:8]
    stored, named = _Describer(Settings())(chips)
    embedder = api._MODELS.embedder()
    assert named is None and np.allclose(stored, face_vectors(*embedder.both_views(chips)), atol=1e-6)
    assert np.linalg.norm(stored - embedder(chips), axis=1).min() > 0.01


def test_index_stores_what_describe_gives_and_describes_stale_faces_again(library, library_url, tmp_path):
    """Each stored descriptor is pinsface.describe's (averaged with the mirror image's). A library from before
    schema 5 holds plain ones: the next index reads those photos again and replaces them in place (same faces,
    same clusters), and clustering leaves them alone until then. So does an index whose descriptors are made
    otherwise (another chip framing, as another run's): every face is described its way, and back again."""
    from pinsface import describe, distance
    from pinsface.library_index import index_library
    from pinsface.settings import Settings

    cache = tmp_path / "cache"
    run("index", library, "--db", library_url, "--cache", cache)
    run("cluster", "--db", library_url)
    with LibraryDB.open(library_url) as db:
        faces = db.face_list()
        ids = [f["id"] for f in faces]
        stored = db.descriptors(ids)
        clusters = [f["cluster"] for f in faces]
        alone = Counter(f["source"] for f in faces)
        # describe looks for faces down to finding.min_face_px in one photo, index down to prepare's smallest
        # face in batches: other pyramids, so the chips differ a little. Still, what index stores is nearer
        # describe's than the plain embedding.
        singles = [k for k, f in enumerate(faces) if alone[f["source"]] == 1][:6]
        near = [distance(describe(faces[k]["source"])[0], stored[k]) for k in singles]
        plain = [distance(describe(faces[k]["source"], mirror=False)[0], stored[k]) for k in singles]
        assert np.median(near) < np.median(plain) - 0.03, (near, plain)
        with db.transaction():  # as schema 4 left them: plain, and the reach measured on those
            db.execute("UPDATE faces SET stale = 1, descriptor = ?, reach = 0.5", (np.ones(128, np.float32).tobytes(),))
        assert len(db.cluster_state()["face_ids"]) == 0
    proc = pinsface("cluster", "--db", library_url)
    out, err = finish(proc, timeout=600)
    assert proc.returncode == 0 and f"{len(ids)} faces were left out" in err and "pinsface index" in err
    again = json.loads(run("index", library, "--db", library_url, "--cache", cache, "--json").splitlines()[-1])
    assert again["read"] == len(alone) and again["faces_added"] == 0 and again["made_stale"] == 0
    with LibraryDB.open(library_url) as db:
        faces = db.face_list()
        assert [f["id"] for f in faces] == ids and [f["cluster"] for f in faces] == clusters
        assert np.allclose(db.descriptors(ids), stored, atol=0.02)
        assert db.rows("SELECT DISTINCT stale, reach FROM faces") == [(0, None)]
    last = json.loads(run("index", library, "--db", library_url, "--cache", cache, "--json").splitlines()[-1])
    assert last["read"] == 0 and last["unchanged"] == 20 and last["made_stale"] == 0

    # Chips framed as dlib frames them (template_scale 1): every face is described again, in place.
    framed = Settings(cache_dir=str(cache))
    framed = replace(framed, faces=replace(framed.faces, template_scale=1.0))
    other = index_library(library, library_url, settings=framed)
    assert other["made_stale"] == len(ids) and other["read"] == len(alone) and other["faces_added"] == 0
    with LibraryDB.open(library_url) as db:
        assert [f["id"] for f in db.face_list()] == ids and db.stale_faces() == 0
        moved = np.linalg.norm(db.descriptors(ids) - stored, axis=1)
        assert moved.min() > 0.01 and moved.max() < 0.4, moved
    back = json.loads(run("index", library, "--db", library_url, "--cache", cache, "--json").splitlines()[-1])
    assert back["made_stale"] == len(ids) and back["read"] == len(alone)
    with LibraryDB.open(library_url) as db:
        assert np.allclose(db.descriptors(ids), stored, atol=1e-3)
        assert [f["cluster"] for f in db.face_list()] == clusters


def _wait_for_faces(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        with LibraryDB.open(url) as db:
            if db.face_total() > 0:
                return
        time.sleep(0.05)


def test_sigkill_then_rerun_gives_the_faces_of_one_run(library, library_url, tmp_path, postgres_server):
    reference = postgres.new_database(postgres_server) if library_url.startswith("postgresql") else tmp_path / "ref.db"
    # Small chunks, so the kill lands between two stored ones; the reference detects in the same batches
    # (MTCNN pads a batch's images to one size, which moves a box by a pixel or two).
    run("index", library, "--db", reference, "--cache", tmp_path / "ref-cache", "--chunk", 2)
    proc = pinsface("index", library, "--db", library_url, "--cache", tmp_path / "cache", "--chunk", 2)
    _wait_for_faces(library_url, proc)
    proc.send_signal(signal.SIGKILL)
    finish(proc, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run("index", library, "--db", library_url, "--cache", tmp_path / "cache", "--chunk", 2)
    assert faces_of(library_url) == faces_of(reference)


def test_two_index_processes_store_each_face_once(library, library_url, tmp_path):
    procs = [pinsface("index", library, "--db", library_url, "--cache", tmp_path / f"cache{k}") for k in range(2)]
    for p in procs:
        _, err = finish(p, timeout=600)
        assert p.returncode == 0, err[-2000:]
    faces = faces_of(library_url)
    assert set(faces.values()) == {1} and sum(faces.values()) >= 19


def test_deleted_photo_faces_are_marked_gone(library, library_url, tmp_path):
    copy = tmp_path / "photos"
    shutil.copytree(library, copy)
    run("index", copy, "--db", library_url, "--cache", tmp_path / "cache")
    before = faces_of(library_url)
    victim = next((copy / "2019/trip/pins_Brie Larson").iterdir())
    victim.unlink()
    out = json.loads(run("index", copy, "--db", library_url, "--cache", tmp_path / "cache", "--json").splitlines()[-1])
    assert out["gone"] == 1
    after = faces_of(library_url)
    assert sum(before.values()) - sum(after.values()) == 1
    assert victim.name not in {k[0] for k in after}
    with LibraryDB.open(library_url) as db:
        gone = [f for f in db.face_list(live_only=False) if f["gone"]]
        assert [Path(f["source"]).name for f in gone] == [victim.name]


def test_train_from_named_people_then_enrol_and_forget(library, library_url, tmp_path):
    cache = tmp_path / "cache"
    run("index", library, "--db", library_url, "--cache", cache)
    lines = [json.loads(x) for x in run("cluster", "--db", library_url, "--json").splitlines()]
    for folder, name in (("pins_Bill Gates", "Bill"), ("pins_Brie Larson", "Brie")):
        clusters = Counter(x["cluster"] for x in lines if f"/{folder}/" in x["source"])
        top, *rest = [c for c, _ in clusters.most_common()]
        run("name", top, name, "--db", library_url, *(["--merge", *rest] if rest else []))
    out = tmp_path / "run"
    text = run("train", "--db", library_url, "--out", out, "--cache", cache, "--epochs", 3, "--no-progress")
    assert "2 named people" in text
    assert json.loads((out / "labels.json").read_text()) == ["Bill", "Brie"]
    evans = Counter(x["cluster"] for x in lines if "/pins_Chris Evans/" in x["source"]).most_common(1)[0][0]
    assert "enrolled 'Chris'" in run("name", evans, "Chris", "--db", library_url, "--run", out)
    from pinsface.predict import Recognizer

    assert "Chris" in Recognizer.load(out).labels
    assert "descriptor(s) erased" in run("forget", "--db", library_url, "--name", "Chris")
    with LibraryDB.open(library_url) as db:
        assert db.faces_of("Chris") == [] and db.person_id("Chris", create=False) is None

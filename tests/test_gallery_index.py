"""The FAISS gallery (pinsface.face_index) against the numpy path, and gallery-only identification."""

import json
import shutil

import numpy as np
import pytest

from pinsface.cli import main
from pinsface.evaluate import evaluate
from pinsface.face_index import FaceIndex, face_vectors
from pinsface.gallery import Gallery
from pinsface.predict import Recognizer
from pinsface.scoring import GALLERY_MODE_ABOVE, gallery_scores, nearest_identities, resolve_mode

STRANGERS = ["pins_Ben Affleck", "pins_Avril Lavigne", "pins_Andy Samberg", "pins_Alvaro Morte"]


@pytest.fixture(scope="module")
def gallery(small_run):
    return Gallery.load(small_run[0] / "gallery.npz")


@pytest.fixture(scope="module")
def queries(gallery):
    """Real descriptors that are not gallery faces: each validation face's unflipped embedding alone."""
    return gallery.val_embeddings, gallery.val_embeddings


def unseen(pins_dir, folder, n, start=60):
    return sorted((pins_dir / folder).glob("*.jpg"))[start : start + n]


def test_flat_index_gives_the_numpy_distances_on_a_real_gallery(gallery, queries):
    assert gallery.face_index.kind == "flat"
    full = gallery.distances(*queries)  # the numpy path: every face against every gallery face
    ids, d = nearest_identities(gallery, *queries, top=3)
    expected = np.argsort(full, 1, kind="stable")[:, :3]
    assert np.array_equal(ids, expected)
    np.testing.assert_allclose(d, np.take_along_axis(full, expected, 1), atol=1e-5)
    scores = gallery_scores(gallery, *queries, top=3)
    assert np.array_equal(np.argmax(scores, 1), expected[:, 0])


def test_indexed_leave_one_out_matches_all_pairs_on_a_real_gallery(gallery):
    genuine, impostor = gallery.leave_one_out()  # small gallery: all pairs
    g2, i2 = gallery.leave_one_out_indexed()
    np.testing.assert_allclose(g2, genuine, atol=1e-5)
    np.testing.assert_allclose(i2, impostor, atol=1e-5)


def test_inverted_file_agrees_with_exact_search(gallery, queries):
    vectors, owner = gallery.index
    ivf = FaceIndex(vectors, owner, len(gallery.labels), gallery.knn, flat_limit=0)
    assert ivf.kind == "ivf"
    q = face_vectors(*queries)
    ids, d = ivf.nearest_identities(q, 1)
    exact_ids, exact_d = gallery.face_index.nearest_identities(q, 1)
    assert np.mean(ids[:, 0] == exact_ids[:, 0]) >= 0.99
    same = ids[:, 0] == exact_ids[:, 0]
    np.testing.assert_allclose(d[same], exact_d[same], atol=1e-5)  # candidates re-ranked by exact distance
    _, faces = ivf.search(q, 5)
    _, exact_faces = gallery.face_index.search(q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(faces, exact_faces)])
    assert recall >= 0.95


def test_enrolment_appends_in_place_and_copies_stay_apart(gallery):
    """Enrolment writes into room left after the face arrays; a copy that is not the latest copies first."""
    base = gallery.copy()
    base.changed()  # no FAISS index shared with the module's gallery
    first = base.copy()
    first.add_faces("Newcomer", gallery.val_embeddings[:3], gallery.val_flips[:3])
    again = first.copy()
    again.add_faces("newcomer", gallery.val_embeddings[3:5], gallery.val_flips[3:5])  # the same person
    assert np.shares_memory(again.embeddings, first.embeddings) and len(again.labels) == len(first.labels)
    other = base.copy()  # an older state changed differently
    other.add_faces("Someone Else", gallery.val_embeddings[5:6], gallery.val_flips[5:6])
    assert not np.shares_memory(other.embeddings, first.embeddings)
    np.testing.assert_array_equal(first.embeddings[-3:], gallery.val_embeddings[:3])
    np.testing.assert_array_equal(again.flips[-2:], gallery.val_flips[3:5])
    assert len(base.embeddings) == len(gallery.embeddings) and base.find("Newcomer") == -1
    assert again.find("NEWCOMER") == len(gallery.labels) and list(again.owner[-5:]) == [len(gallery.labels)] * 5


def test_enrolment_grows_the_index_in_place(gallery, queries):
    copy = Gallery(
        list(gallery.labels),
        gallery.embeddings.copy(),
        gallery.flips.copy(),
        gallery.owner.copy(),
        gallery.val_embeddings,
        gallery.val_flips,
        gallery.val_owner,
        knn=gallery.knn,
    )
    index = copy.face_index
    before = index.index.ntotal
    new = gallery.val_embeddings[gallery.val_owner == 0][:8] + 0.0
    assert copy.add_faces("Newcomer", new, new) == (len(copy.labels) - 1, True)
    assert copy.face_index is index and index.index.ntotal == before + len(new)
    ids, d = nearest_identities(copy, new, new, 1)
    assert (ids[:, 0] == len(copy.labels) - 1).all() and np.allclose(d, 0, atol=1e-3)
    # Leave-one-out still returns the gallery's order (training faces, then validation) with the index appended to.
    fresh = Gallery(
        list(copy.labels),
        copy.embeddings,
        copy.flips,
        copy.owner,
        copy.val_embeddings,
        copy.val_flips,
        copy.val_owner,
        knn=copy.knn,
    )
    for a, b in zip(copy.leave_one_out_indexed(), fresh.leave_one_out()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_auto_mode_picks_the_gallery_for_large_galleries():
    assert resolve_mode("auto", GALLERY_MODE_ABOVE) == "head"
    assert resolve_mode("auto", GALLERY_MODE_ABOVE + 1) == "gallery"
    assert resolve_mode("head", 10**6) == "head" and resolve_mode("gallery", 3) == "gallery"
    with pytest.raises(ValueError, match="mode must be"):
        resolve_mode("softmax", 3)


@pytest.fixture(scope="module")
def gallery_recognizer(small_run, tmp_path_factory):
    copy = tmp_path_factory.mktemp("gallery-mode") / "run"
    shutil.copytree(small_run[0], copy)
    return Recognizer.load(copy, mode="gallery")


def test_gallery_mode_names_known_people_and_rejects_strangers(gallery_recognizer, pins_dir):
    rec = gallery_recognizer
    assert rec.mode == "gallery"
    known = [(p, "Adriana Lima") for p in unseen(pins_dir, "pins_Adriana Lima", 6)]
    known += [(p, "Bill Gates") for p in unseen(pins_dir, "pins_Bill Gates", 6)]
    results = rec.identify_many([str(p) for p, _ in known])
    named = [r.faces[0].identity == who for r, (_, who) in zip(results, known) if r.faces]
    assert len(named) >= 11 and np.mean(named) >= 0.9
    face = results[0].faces[0]
    assert face.probability is None and face.distance <= rec.gallery.threshold_distance
    assert [a["distance"] for a in face.alternatives] == sorted(a["distance"] for a in face.alternatives)
    # Without the head's probability check, only the distance tells strangers apart: on six identities the
    # calibrated distance is lenient (README), so the test checks the rule and the ordering, not a rate.
    strangers = [str(p) for folder in STRANGERS for p in unseen(pins_dir, folder, 5)]
    faces = [f for r in rec.identify_many(strangers) for f in r.faces]
    t = rec.gallery.threshold_distance
    assert len(faces) >= 18 and all((f.identity is not None) == (f.distance <= t) for f in faces)
    known_d = [r.faces[0].distance for r in results if r.faces]
    assert np.median(known_d) < np.median([f.distance for f in faces]) - 0.1
    strict = [f for r in rec.identify_many(strangers, threshold=np.median(known_d) + 0.05) for f in r.faces]
    assert np.mean([f.identity is None for f in strict]) >= 0.8


def test_gallery_mode_enrols_without_refitting_the_head(gallery_recognizer, pins_dir, capsys):
    rec = gallery_recognizer
    model, index = rec.model, rec.gallery.face_index
    photos = unseen(pins_dir, "pins_Ben Affleck", 10, start=0)
    summary = rec.enroll("Ben Affleck", [str(p) for p in photos])
    assert summary["new_identity"] and rec.model is model and rec.gallery.face_index is index
    assert model.output_shape[-1] == len(rec.labels) - 1  # the head was not touched
    others = rec.identify_many([str(p) for p in unseen(pins_dir, "pins_Ben Affleck", 12, start=20)])
    assert np.mean([r.faces[0].identity == "Ben Affleck" for r in others if r.faces]) >= 0.8
    rec.save()
    with pytest.raises(ValueError, match="enrolled in gallery mode"):
        Recognizer.load(rec.run_dir, mode="head")
    assert (
        main(
            [
                "predict",
                str(rec.run_dir),
                str(photos[0].parent / photos[0].name),
                "--json",
                "--no-progress",
                "--mode",
                "gallery",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["faces"][0]["identity"] == "Ben Affleck" and record["faces"][0]["probability"] is None
    rec.forget("Ben Affleck")  # someone the head never knew
    assert "Ben Affleck" not in rec.labels


def test_evaluate_in_gallery_mode(small_run, tmp_path):
    run_dir, result = small_run
    metrics = evaluate(
        run_dir, out=tmp_path / "report", prepared=result["prepared"], progress=False, figures=False, mode="gallery"
    )
    assert metrics["mode"] == "gallery" and metrics["top1"] >= 0.85 and metrics["top5"] >= metrics["top1"]


def test_report_samples_carry_the_distance_in_gallery_mode(small_run):
    """The sample plots label gallery-mode faces with their distance, not minus it as a 'confidence'."""
    from dataclasses import replace

    from pinsface.dataset import identity_key
    from pinsface.evaluate import Evaluation, sample_faces
    from pinsface.runfolder import Run
    from pinsface.scoring import score_images

    run_dir, result = small_run
    run = Run(run_dir)
    settings, state, split, prepared = run.settings(), run.load_state(), run.split(), result["prepared"]
    test = set(split.files("test"))
    items = np.array([i for i, it in enumerate(prepared.dataset.items) if it.rel in test], dtype=np.int64)
    labels = state.labels
    label_of = {identity_key(name): i for i, name in enumerate(labels)}
    y = np.array([label_of[identity_key(prepared.dataset.items[i].identity)] for i in items])
    probs, usable = score_images(state.model, settings, prepared, items, gallery=state.gallery, mode="gallery")
    scored = Evaluation(
        run, settings, state.model, state.gallery, labels, split, prepared, items, y, probs, usable, prepared
    )
    correct, incorrect = sample_faces(scored, mode="gallery")
    shown = [s for s in correct + incorrect if s["pred"] is not None]
    assert shown and all(s["confidence"] is None and 0 < s["distance"] < 2 for s in shown)
    nearest = -probs.max(1)[usable]  # each face's distance to the identity it is named as
    assert all(np.isclose(s["distance"], nearest, atol=1e-6).any() for s in shown)
    head_probs, _ = score_images(state.model, settings, prepared, items, gallery=state.gallery, mode="head")
    head_correct, _ = sample_faces(replace(scored, probs=head_probs))
    assert all(0 <= s["confidence"] <= 1 and "distance" not in s for s in head_correct)


def test_exact_scores_and_the_index_take_the_same_number_of_neighbours():
    from pinsface.face_index import knn_counts, knn_distances, neighbours_scored

    sizes = [1, 9, 10, 25, 49, 50, 51, 300]
    owner = np.repeat(np.arange(len(sizes)), sizes)
    # Distances 1, 2, 3... within each identity: the mean of the kk nearest is (kk + 1) / 2.
    d = np.concatenate([np.arange(1, n + 1, dtype=np.float32) for n in sizes])[None, :]
    taken = knn_distances(d, owner, len(sizes), k=5)[0] * 2 - 1
    expected = [1, 1, 1, 2, 4, 5, 5, 5]
    assert taken.tolist() == expected
    assert knn_counts(owner, len(sizes), 5).tolist() == expected
    assert [int(neighbours_scored(n, 5)) for n in sizes] == expected

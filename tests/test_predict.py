import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pinsface.cli import main
from pinsface.face_index import knn_distances
from pinsface.gallery import Gallery, calibrate_thresholds
from pinsface.images import load_image
from pinsface.predict import Recognizer, expand_inputs
from pinsface.testing.badinput import BAD, SOURCE, make_bad_corpus

STRANGERS = ["pins_Ben Affleck", "pins_Avril Lavigne", "pins_Andy Samberg", "pins_Alvaro Morte"]


@pytest.fixture(scope="module")
def recognizer(small_run, tmp_path_factory):
    run_dir, _ = small_run
    copy = tmp_path_factory.mktemp("rec") / "run"
    shutil.copytree(run_dir, copy)  # enrol/forget tests change the run
    return Recognizer.load(copy)


def unseen(pins_dir, folder, n, start=60):
    return sorted((pins_dir / folder).glob("*.jpg"))[start : start + n]


def test_known_people_are_named_and_strangers_are_not(recognizer, pins_dir):
    known = [(p, "Adriana Lima") for p in unseen(pins_dir, "pins_Adriana Lima", 6)]
    known += [(p, "Bill Gates") for p in unseen(pins_dir, "pins_Bill Gates", 6)]
    results = recognizer.identify_many([str(p) for p, _ in known])
    named = [r.faces[0].identity == who for r, (_, who) in zip(results, known) if r.faces]
    assert len(named) >= 11 and np.mean(named) >= 0.9
    strangers = [str(p) for folder in STRANGERS for p in unseen(pins_dir, folder, 5)]
    faces = [f for r in recognizer.identify_many(strangers) for f in r.faces]
    rejected = np.mean([f.identity is None for f in faces])
    assert rejected >= 0.8, f"only {rejected:.0%} of strangers rejected"
    f = faces[0]
    assert len(f.box) == 4 and len(f.landmarks) == 5 and 0 <= f.probability <= 1 and f.distance >= 0
    assert len(f.alternatives) == 3 and f.alternatives[0]["identity"] == f.best_match


def test_every_face_in_a_group_photo(recognizer, pins_dir):
    left = load_image(unseen(pins_dir, "pins_Adriana Lima", 1)[0])
    right = load_image(unseen(pins_dir, "pins_Bill Gates", 1)[0])
    group = np.concatenate([left, np.zeros_like(left), right], axis=1)
    faces = sorted(recognizer.identify(group), key=lambda f: f.box[0])
    assert [f.identity for f in faces] == ["Adriana Lima", "Bill Gates"]


def test_no_face_and_bad_files_do_not_stop_a_batch(recognizer, pins_dir, tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (200, 1))).save(blank)
    bad = make_bad_corpus(tmp_path / "bad", pins_dir.joinpath(*SOURCE))
    sources = [str(blank)] + [str(bad / name) for name in sorted(BAD)] + [str(pins_dir.joinpath(*SOURCE))]
    results = recognizer.identify_many(sources, batch_size=3)
    assert len(results) == len(sources)
    assert results[0].faces == [] and results[0].note == "no face found" and results[0].error is None
    assert [r.error for r in results[1:-1]] == [BAD[name] for name in sorted(BAD)]
    assert results[-1].faces and results[-1].faces[0].identity == "Bill Gates"
    assert recognizer.identify(np.asarray(Image.open(blank).convert("RGB"))) == []


def test_identify_and_enroll_decode_phone_photos_at_reduced_scale(recognizer, pins_dir, tmp_path, monkeypatch):
    from pinsface.testing.photos import chosen_is, phone_photo, record_decodes

    data, pasted = phone_photo(unseen(pins_dir, "pins_Adriana Lima", 1)[0], "Adriana Lima", seed=5, size=(4000, 3000))
    path = tmp_path / "phone.jpg"
    path.write_bytes(data)
    decoded = record_decodes(monkeypatch)
    faces = recognizer.identify(str(path))
    assert [f.identity for f in faces] == ["Adriana Lima"]
    assert chosen_is(np.array(faces[0].box), pasted)  # in full-resolution pixels
    _, _, used, skipped, _ = recognizer.faces_for_enrolment([str(path), data])
    assert used == 2 and skipped == []
    assert decoded and all(h * w <= 2000 * 1500 for h, w in decoded)  # never the 12 megapixels


def test_enroll_a_new_person_then_forget(recognizer, pins_dir):
    photos = unseen(pins_dir, "pins_Ben Affleck", 10, start=0)
    others = unseen(pins_dir, "pins_Ben Affleck", 15, start=20)
    bill = [str(p) for p in unseen(pins_dir, "pins_Bill Gates", 6)]

    def names(files):
        return [[f.identity for f in r.faces] for r in recognizer.identify_many(files)]

    before, bill_before = names([str(p) for p in others]), names(bill)
    assert "Ben Affleck" not in sum(before, [])
    summary = recognizer.enroll("Ben Affleck", [str(p) for p in photos])
    assert summary["new_identity"] and summary["identities"] == 7 and summary["faces_used"] >= 9
    after = [faces[0] for faces in names([str(p) for p in others]) if faces]
    assert np.mean([who == "Ben Affleck" for who in after]) >= 0.8
    # Enrolling someone changes no answer for a trained person's photos, which are nearer to their own.
    assert names(bill) == bill_before
    recognizer.save()
    reloaded = Recognizer.load(recognizer.run_dir)
    assert "Ben Affleck" in reloaded.labels and reloaded.head.output_shape == (None, 7)
    reloaded.forget("ben affleck")
    assert "Ben Affleck" not in reloaded.labels and reloaded.head.output_shape == (None, 6)
    with pytest.raises(ValueError, match="not known"):
        reloaded.forget("Nobody Atall")


def test_an_enrolled_person_takes_a_face_only_when_named_and_nearer_than_a_named_trained_answer():
    from pinsface.scoring import keep_trained_answers, match_faces

    trained = np.array([True, True, False])  # two trained identities, one enrolled since
    checked = np.array([[0.5, 0.1, 0.9], [0.8, 0.1, 0.9], [0.8, 0.1, 0.9], [0.8, 0.1, 0.9], [0.2, 0.7, 0.1]])
    dists = np.array([[0.3, 0.9, 0.4], [0.3, 0.9, 0.7], [0.3, 0.9, 0.4], [0.5, 0.9, 0.4], [0.9, 0.3, 0.2]])
    p_min = np.array([0.6, 0.6, 0.0], np.float32)
    matches = keep_trained_answers(match_faces(checked, dists, p_min, 0.6), checked, dists, p_min, 0.6, trained)
    # The enrolled person ranks first in rows 0-3. 0: named, and the trained answer would be unknown: named.
    # 1: too far to be named: the trained answer, not "unknown". 2: named, but trained 0 is named and nearer:
    # trained 0. 3: named and nearer than trained 0: the enrolled person. 4: a trained identity ranked first
    # is never second-guessed.
    assert [(m.best, m.accepted) for m in matches] == [(2, True), (0, True), (0, True), (2, True), (1, True)]
    assert [a[0] for a in matches[1].alternatives] == [0, 2, 1]


def test_calibration_meets_the_target_false_accept_rate():
    rng = np.random.default_rng(0)
    n, k = 400, 5
    owner = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), owner] += 4
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    genuine = rng.uniform(0.0, 0.45, n)
    impostor = rng.uniform(0.4, 1.0, 3 * n)
    for far in (0.01, 0.05):
        t_p, t_d, report = calibrate_thresholds(probs, owner, genuine, impostor, far)
        assert report["impostor_accept_rate"] <= far
        assert np.mean(impostor <= t_d) <= far and np.mean(impostor <= t_d + 0.01) > far / 2
        assert report["genuine_named_rate"] > 0.8
        correct = np.argmax(probs, 1) == owner
        assert np.mean(probs[correct].max(1) >= t_p) >= 0.995


def test_knn_distances_average_each_identitys_nearest_faces():
    rng = np.random.default_rng(1)
    owner = np.array([0] * 30 + [1] * 12 + [2])
    d = rng.uniform(0.5, 1.0, (2, len(owner)))
    d[0, :3] = [0.1, 0.2, 0.3]  # identity 0 (30 faces): its 3 nearest count
    d[1, 30:32] = [np.inf, 0.2]  # identity 1 (12 faces): the nearest only; the excluded face is skipped
    d[1, 42] = np.inf  # identity 2's only face is excluded
    k = knn_distances(d, owner, 4, k=5)
    assert k[0, 0] == pytest.approx(0.2) and k[1, 1] == pytest.approx(0.2)
    assert np.isinf(k[1, 2]) and np.isinf(k[:, 3]).all()  # no usable face, no face at all
    assert k[1, 0] == pytest.approx(np.sort(d[1, :30])[:3].mean())


def test_leave_one_out_scores_each_face_without_itself(small_run):
    gallery = Gallery.load(small_run[0] / "gallery.npz")
    genuine, impostor = gallery.leave_one_out(chunk=50)
    vectors, owner = gallery.index
    assert len(genuine) == len(vectors) and np.all(genuine > 0) and np.all(impostor > genuine.min())
    i = 7
    d = np.linalg.norm(vectors - vectors[i], axis=1)
    d[i] = np.inf

    def nearest(c):
        among = d[owner == c]
        return np.sort(among)[: min(gallery.knn, max(1, len(among) // 10))].mean()

    mine = nearest(owner[i])
    others = min(nearest(c) for c in set(owner.tolist()) - {owner[i]})
    assert genuine[i] == pytest.approx(mine, rel=1e-4) and impostor[i] == pytest.approx(others, rel=1e-4)
    # Real faces: most are closer to their own identity than to anyone else.
    assert np.mean(genuine < impostor) > 0.9


def test_cli_predict_json_and_annotate(recognizer, pins_dir, tmp_path, capsys):
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for p in unseen(pins_dir, "pins_Bill Gates", 2):
        shutil.copy(p, folder / p.name)
    (folder / "notes.txt").write_text("not a photo")
    assert len(expand_inputs([str(tmp_path / "photos")])) == 2
    code = main(
        [
            "predict",
            str(recognizer.run_dir),
            str(tmp_path / "photos"),
            str(tmp_path / "photos/**/*.jpg"),
            "--json",
            "--annotate",
            str(tmp_path / "ann"),
            "--no-progress",
            "--top-k",
            "2",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and all(len(r["faces"][0]["alternatives"]) == 2 for r in lines)
    written = sorted((tmp_path / "ann").glob("*.jpg"))
    assert len(written) >= 2 and Image.open(written[0]).size == (224, 224)
    assert main(["predict", str(recognizer.run_dir), str(tmp_path / "photos"), "--no-progress"]) == 0
    assert "Bill Gates" in capsys.readouterr().out


def test_a_gallery_from_before_nearest_face_distances_is_recalibrated_on_load(small_run, tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(small_run[0], run_dir)
    path = run_dir / "gallery.npz"
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    del meta["knn"]  # the session-1 format: centroid-distance thresholds
    meta.update(threshold_distance=9.0, threshold_probability=0.0)
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)
    assert Gallery.load(path).stale
    recognizer = Recognizer.load(run_dir)
    assert not recognizer.gallery.stale and recognizer.gallery.threshold_distance < 1.0
    assert recognizer.gallery.calibration["target_far"] == recognizer.settings.target_far


def test_the_blend_of_head_and_nearest_faces_is_chosen_on_validation():
    from pinsface.scoring import choose_blend, identity_scores

    rng = np.random.default_rng(3)
    n, k = 300, 6
    y = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k), n)
    probs[np.arange(n), y] += np.where(rng.random(n) < 0.8, 1.0, 0.0)  # the head is right on 80%
    probs /= probs.sum(1, keepdims=True)
    dists = rng.uniform(0.5, 0.8, (n, k))
    dists[np.arange(n), y] = np.where(rng.random(n) < 0.8, 0.3, 0.7)  # the faces, on another 80%
    assert np.array_equal(identity_scores(probs, dists, 0.0, 0.04), probs)
    blended = identity_scores(probs, dists, 0.5, 0.04)
    np.testing.assert_allclose(blended.sum(1), 1, atol=1e-5)
    weight, tau, accuracy = choose_blend(probs, dists, y)
    head_alone = np.mean(np.argmax(probs, 1) == y)
    assert weight > 0 and accuracy > head_alone + 0.05
    # Where the distances say nothing, the head alone wins.
    assert choose_blend(probs, np.full((n, k), 0.6), y)[0] == 0.0


def test_a_trained_run_stores_its_blend_and_names_with_it(small_run):
    from pinsface.runfolder import Run

    gallery = Run(small_run[0]).load_state().gallery
    assert gallery.knn_weight in (0.0, 0.25, 0.5, 0.75) and gallery.knn_tau > 0


@pytest.mark.parametrize("depth", [1, 2])
def test_the_next_batches_are_worked_on_while_this_one_is_handled(depth):
    import threading

    from pinsface.ahead import ahead

    started = {i: threading.Event() for i in range(6)}
    release = threading.Event()

    def work(i):
        started[i].set()
        if i > 0:  # the later items' work overlaps: they all wait for one signal
            assert release.wait(5)
        if i == 3:
            raise ValueError("bad batch")
        return i * 10

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for item, result in ahead(range(6), work, depth):
            # The next `depth` items' work has begun before this one is handled (and before it is asked for).
            assert all(started[item + k].wait(5) for k in range(1, depth + 1))
            assert not started[item + depth + 1].is_set()  # and no more than that
            release.set()
            got.append((item, result))
    assert got == [(0, 0), (1, 10), (2, 20)]  # in order; the failure surfaces where its item is reached


def test_predict_exits_1_when_every_input_failed_and_with_strict_when_any_did(recognizer, pins_dir, tmp_path, capsys):
    good = sorted((pins_dir / "pins_Bill Gates").glob("*.jpg"))[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    run = str(recognizer.run_dir)
    assert main(["predict", run, str(good), str(bad), "--json", "--no-progress"]) == 0
    assert main(["predict", run, str(good), str(bad), "--json", "--strict", "--no-progress"]) == 1
    assert main(["predict", run, str(bad), "--json", "--no-progress"]) == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["error"] is not None for r in records] == [False, True, False, True, True]

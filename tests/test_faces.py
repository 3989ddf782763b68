import numpy as np
import pytest

from pinsface.faces import (
    Detection,
    align_face,
    box_crop,
    choose_face,
    face_template,
    fallback_landmarks,
    similarity_transform,
)
from pinsface.images import load_image
from pinsface.settings import FaceSettings


@pytest.fixture(scope="module")
def originals(originals_dir):
    paths = sorted(originals_dir.rglob("*.jpg"))
    return paths, [load_image(p) for p in paths]


def test_faces_found_in_originals_of_every_size(detector, originals):
    paths, images = originals
    assert len({im.shape for im in images}) > 10  # really varied sizes and aspect ratios
    faces = detector.detect(images)
    found = sum(1 for f in faces if f)
    assert found >= 47, f"only {found} of {len(images)} originals had a face"
    for fs in faces:
        for face in fs:
            assert 0.0 <= face.confidence <= 1.0
            assert face.landmarks.shape == (5, 2)
            x1, y1, x2, y2 = face.box
            assert x1 < x2 and y1 < y2
            # Landmarks are in image left/right order: left eye left of right eye, left mouth left of right.
            assert face.landmarks[0, 0] < face.landmarks[1, 0]
            assert face.landmarks[3, 0] < face.landmarks[4, 0]


def test_minimum_face_size_above_default_still_detects(detector, pins_dir):
    image = load_image(sorted((pins_dir / "pins_Bill Gates").glob("*.jpg"))[0])
    # mtcnn 1.0.0 alone returns nothing here (its pyramid goes below PNet's window); ours is fixed.
    assert detector.detect([image], [60])[0]


def test_alignment_puts_the_eyes_on_the_template(detector, originals):
    _, images = originals
    settings = FaceSettings()
    template = face_template(settings)
    errors = []
    for image, faces in zip(images, detector.detect(images)):
        if not faces:
            continue
        face = faces[choose_face(faces, image.shape)]
        matrix = similarity_transform(face.landmarks, template)
        moved = np.c_[face.landmarks, np.ones(5)] @ matrix.T
        # In pixels of a chip framed as dlib frames it: a tighter template spreads the same error wider.
        errors.append(np.linalg.norm(moved[:2] - template[:2], axis=1) / settings.template_scale)
        chip = align_face(image, face.landmarks, settings)
        assert chip.shape == (150, 150, 3) and chip.dtype == np.uint8
    errors = np.concatenate(errors)
    assert np.median(errors) < 3.0 and errors.max() < 8.0


def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + shift
    matrix = similarity_transform(src, dst)
    assert np.allclose(matrix[:, :2], rot, atol=1e-9) and np.allclose(matrix[:, 2], shift, atol=1e-9)


def test_choose_face_prefers_the_large_central_face():
    def face(x, y, size, conf=0.99):
        return Detection(np.array([x, y, x + size, y + size], np.float32), conf, np.zeros((5, 2), np.float32))

    faces = [face(0, 0, 60), face(70, 70, 80), face(200, 10, 30, conf=1.0)]
    assert choose_face(faces, (224, 224, 3)) == 1
    assert choose_face([], (224, 224, 3)) == -1
    # A confident big face wins over a central but tiny one.
    assert choose_face([face(100, 100, 20), face(10, 10, 120)], (224, 224, 3)) == 1


def test_box_crop_is_gray_100_and_pads_outside_the_image():
    image = np.full((50, 60, 3), 200, np.uint8)
    crop = box_crop(image, np.array([-20, -20, 40, 40]), 100)
    assert crop.shape == (100, 100) and crop.dtype == np.uint8
    assert crop[0, 0] == 0 and crop[-1, -1] == 200


def test_fallback_landmarks_scale_with_the_image():
    lm = fallback_landmarks((224, 224, 3))
    assert lm.shape == (5, 2) and lm[0, 0] < lm[1, 0] < 224 and lm[3, 1] > lm[0, 1]


# A face cut by the frame (brow and chin past the edges): MTCNN finds nothing in it as it is.
TIGHT_CROP = "pins_Hugh Jackman/Hugh Jackman119_1289.jpg"


def test_a_face_cut_by_the_frame_is_found_inside_a_border(detector, backbone, pins_dir):
    from pinsface.embeddings import Embedder
    from pinsface.faces import min_subject_size, retry_tight_crops

    image = load_image(pins_dir / TIGHT_CROP)
    settings = FaceSettings()
    wanted = [min_subject_size(image.shape, settings)]
    assert detector.detect([image], wanted) == [[]]
    faces = retry_tight_crops(detector, [image], [[]], wanted, settings)[0]
    assert len(faces) == 1
    face = faces[0]
    h, w = image.shape[:2]
    assert (face.landmarks[:, 0] > 0).all() and (face.landmarks[:, 0] < w).all()  # in the image's coordinates
    assert face.box[1] < 0 or face.box[3] > h  # the face runs past the frame

    # The chip it gives is the person's face: nearer his other photos than the mean-landmark fallback's chip.
    others = [load_image(p) for p in sorted((pins_dir / "pins_Hugh Jackman").glob("*.jpg"))[:8]]
    chips = [
        align_face(im, f[choose_face(f, im.shape)].landmarks, settings)
        for im, f in zip(others, detector.detect(others))
        if f
    ]
    embed = Embedder(backbone, 16, "float32")
    reference = embed(np.stack(chips)).mean(0)
    found = embed(align_face(image, face.landmarks, settings)[None])[0]
    blind = embed(align_face(image, fallback_landmarks(image.shape, settings), settings)[None])[0]
    assert np.linalg.norm(found - reference) < np.linalg.norm(blind - reference) - 0.05


def test_every_entry_point_finds_a_tight_crop_the_same_way(detector, pins_dir):
    """prepare's records, naming (identify, identify_many, enrolment and the server all call find_faces) and the
    public API find the face cut by the frame: they share ``finding.locate_faces``. (Naming looks for every face
    down to a smaller size than prepare's subject, and MTCNN's pyramid then differs: here naming finds the face
    without the border, prepare with it, and the box and landmarks move by a few pixels, never the face.)"""
    import pinsface
    from pinsface.face_records import decode_file, image_records
    from pinsface.finding import find_faces

    settings = FaceSettings()
    path = pins_dir / TIGHT_CROP
    records, errors = image_records(detector, [(0, decode_file(path, settings))], ["h"], settings, {})
    assert errors == [] and records[0]["n_faces"] == 1 and records[0]["chosen"] == 0
    (named,) = find_faces(detector, [str(path)], settings)
    (public,) = pinsface.detect(str(path))
    assert len(named.faces) == 1 and public.is_subject
    x, y, w, h = public.box
    boxes = [records[0]["boxes"][0], named.faces[0].box, np.array([x, y, x + w, y + h])]
    size = boxes[0][2] - boxes[0][0]
    for box in boxes[1:]:
        assert np.abs(box - boxes[0]).max() < 0.05 * size
    assert np.abs(named.faces[0].landmarks - records[0]["landmarks"][0]).max() < 0.05 * size


def test_only_crop_shaped_images_are_scanned_again(detector, pins_dir):
    from pinsface.faces import retry_tight_crops

    image = load_image(pins_dir / TIGHT_CROP)
    settings = FaceSettings()
    # The same pixels as a reduced-scale view of a 12-megapixel photo: "no face" there is not a crop's edge.
    assert retry_tight_crops(detector, [image], [[]], [40.0], settings, [(3000, 4000)]) == [[]]
    assert retry_tight_crops(detector, [image], [[]], [40.0], FaceSettings(tight_crop_border=0)) == [[]]
    failed = RuntimeError("detector failed")
    assert retry_tight_crops(detector, [image], [failed], [40.0], settings) == [failed]


def _as_720(image):
    """An original shrunk to at most 720 px on its long side: what FaceDetector scans as mtcnn does."""
    import cv2

    f = 720 / max(image.shape[:2])
    return cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA) if f < 1 else image


def _nearest(rows, box):
    return rows[np.argmin(np.abs(rows[:, 1:5] - box).sum(1))]


def test_detections_equal_mtcnns_own(detector, pins_dir, originals):
    """pinsface's networks and box arithmetic give mtcnn's own faces, image by image, where both count the
    pyramid alike (mtcnn 1.0.0 miscounts it for some sizes: see faces.scale_pyramid)."""
    from mtcnn import MTCNN
    from mtcnn.utils.images import build_scale_pyramid

    from pinsface.faces import PYRAMID_FACTOR, scale_pyramid

    folders = sorted(p for p in pins_dir.iterdir() if p.is_dir())[::7]
    images = [load_image(sorted(f.glob("*.jpg"))[3]) for f in folders] + [_as_720(im) for im in originals[1]]
    reference = MTCNN()
    compared = faces_compared = 0
    for image in images:
        h, w = image.shape[:2]
        ours, theirs = scale_pyramid(w, h, 20, PYRAMID_FACTOR), build_scale_pyramid(w, h, 20, PYRAMID_FACTOR)
        if len(ours) != len(theirs) or not np.allclose(ours, theirs):
            continue
        expected = np.asarray(reference.detect_faces(image, box_format="xyxy", output_type="numpy", min_face_size=20))
        found = detector.detect([image])[0]
        assert len(found) == len(expected)
        for face in found:
            row = _nearest(expected, face.box)
            # Within float rounding: the same networks and steps, R-net and O-net run on calls of another size.
            assert np.abs(face.box - row[1:5]).max() < 1e-3
            assert np.abs(face.landmarks - np.stack([row[6:11], row[11:16]], axis=1)).max() < 1e-3
            assert abs(face.confidence - row[5]) < 1e-5
        compared += 1
        faces_compared += len(found)
    assert compared >= 0.9 * len(images) and faces_compared >= 60


def test_networks_are_mtcnns(detector):
    """The three Keras models give the outputs of mtcnn's own, to the last bit, on the same inputs."""
    from mtcnn import MTCNN

    rng = np.random.default_rng(0)
    for ours, stage, shape in zip(
        (detector._pnet, detector._rnet, detector._onet),
        MTCNN().stages,
        [(2, 57, 83, 3), (9, 24, 24, 3), (9, 48, 48, 3)],
    ):
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        for a, b in zip(ours(x), stage.model(x)):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def _companion_images(pins_dir, originals):
    """Shared images of many sizes: Pins crops (one with its face cut by the frame), originals, two of one
    shape, and an enlarged original that goes through the large-photo path."""
    import cv2

    paths, images = originals
    folders = sorted(p for p in pins_dir.iterdir() if p.is_dir())
    pins = [load_image(sorted(f.glob("*.jpg"))[5]) for f in folders[:40:8]] + [load_image(pins_dir / TIGHT_CROP)]
    shapes = [im.shape for im in images]
    twins = [im for im in images if shapes.count(im.shape) > 1][:2]
    others = [images[k] for k in np.argsort([im.size for im in images])[-3:]]
    big = cv2.resize(others[-1], None, fx=2.5, fy=2.5, interpolation=cv2.INTER_CUBIC)
    return pins + twins + others + [big]


def test_an_images_faces_do_not_depend_on_its_batch(detector, pins_dir, originals):
    """Each image with its own smallest and coarse face sizes (as prepare gives them), detected alone, all in one
    batch, and in batches with other companions, among them same-shape images scanned for other sizes: the same
    faces, to the last bit."""
    from pinsface.faces import detect_each, min_subject_size

    settings = FaceSettings()
    images = _companion_images(pins_dir, originals)
    sizes = [min_subject_size(im.shape, settings) for im in images]
    coarse = [max(m, 0.05 * min(im.shape[:2])) for m, im in zip(sizes, images)]
    n = len(images)

    def run(order, extra=()):
        batch = [images[i] for i in order] + [im for im, _, _ in extra]
        found = detect_each(
            detector,
            batch,
            [sizes[i] for i in order] + [m for _, m, _ in extra],
            [coarse[i] for i in order] + [c for *_, c in extra],
        )
        return dict(zip(order, found))

    alone = {i: run([i])[i] for i in range(n)}
    assert sum(1 for faces in alone.values() if faces) >= n - 2
    # Same-shape companions scanned for other sizes (the Pins crops again, for all faces from 20 px).
    strangers = [(im, 20.0, 20.0) for im in images[:3]]
    rng = np.random.default_rng(1)
    batches = [run(list(range(n))), run(list(range(n))[::-1], strangers)]
    order = list(rng.permutation(n))
    batches += [run([int(i) for i in order[k : k + 3]], strangers[k % 3 :]) for k in range(0, n, 3)]
    for batch in batches:
        for i, faces in batch.items():
            assert len(faces) == len(alone[i])
            for a, b in zip(faces, alone[i]):
                assert np.array_equal(a.box, b.box) and np.array_equal(a.landmarks, b.landmarks)
                assert a.confidence == b.confidence


def test_prepares_chips_do_not_depend_on_the_batch(detector, pins_dir, tmp_path):
    """prepare's records (boxes, landmarks, aligned chips) of shared images alone and among others."""
    from pinsface.face_records import decode_file, image_records

    settings = FaceSettings()
    folders = sorted(p for p in pins_dir.iterdir() if p.is_dir())
    paths = [sorted(f.glob("*.jpg"))[k] for f in folders[1:30:6] for k in (0, 9)] + [pins_dir / TIGHT_CROP]
    decoded = [(i, decode_file(p, settings)) for i, p in enumerate(paths)]
    hashes = [str(i) for i in range(len(paths))]

    def records(batch):
        made, errors = image_records(detector, batch, hashes, settings, {})
        assert not errors
        return {r["hash"]: r for r in made}

    alone = {}
    for item in decoded:
        alone.update(records([item]))
    together = records(decoded)
    pairs = {}
    for k in range(0, len(decoded), 2):
        pairs.update(records(decoded[k : k + 2][::-1]))
    for found in (together, pairs):
        assert found.keys() == alone.keys()
        for h, record in found.items():
            for column in ("boxes", "landmarks", "scores", "aligned", "box", "chosen"):
                assert np.array_equal(record[column], alone[h][column]), (paths[int(h)].name, column)


def test_the_face_cache_key_follows_the_detectors_revision(monkeypatch):
    import pinsface.settings as settings_module

    before = FaceSettings().version()
    monkeypatch.setattr(settings_module, "DETECTOR_REVISION", settings_module.DETECTOR_REVISION + 1)
    assert FaceSettings().version() != before


def test_weight_files_other_than_mtcnns_own_are_never_unpickled(tmp_path, monkeypatch):
    import shutil

    import pinsface.detector_nets as nets

    for name in ("pnet", "rnet", "onet"):
        shutil.copy(nets.weights_folder() / f"{name}.lz4", tmp_path / f"{name}.lz4")
    monkeypatch.setattr(nets, "weights_folder", lambda: tmp_path)
    assert nets.build_network("pnet").count_params() > 0
    # A pickle that would run code if loaded: refused by its checksum before anything is read from it.
    (tmp_path / "pnet.lz4").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "ran").encode() + b"'\ntR.")
    with pytest.raises(nets.DetectorWeightsError, match="SHA-256"):
        nets.build_network("pnet")
    assert not (tmp_path / "ran").exists()
    (tmp_path / "rnet.lz4").unlink()
    with pytest.raises(nets.DetectorWeightsError, match="not found"):
        nets.build_network("rnet")

import numpy as np
import pytest

from pinsface.faces import (
    Face,
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
        errors.append(np.linalg.norm(moved[:2] - template[:2], axis=1))
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
        return Face(np.array([x, y, x + size, y + size], np.float32), conf, np.zeros((5, 2), np.float32))

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


def test_only_crop_shaped_images_are_scanned_again(detector, pins_dir):
    from pinsface.faces import retry_tight_crops

    image = load_image(pins_dir / TIGHT_CROP)
    settings = FaceSettings()
    # The same pixels as a reduced-scale view of a 12-megapixel photo: "no face" there is not a crop's edge.
    assert retry_tight_crops(detector, [image], [[]], [40.0], settings, [(3000, 4000)]) == [[]]
    assert retry_tight_crops(detector, [image], [[]], [40.0], FaceSettings(tight_crop_border=0)) == [[]]
    failed = RuntimeError("detector failed")
    assert retry_tight_crops(detector, [image], [failed], [40.0], settings) == [failed]

"""Find faces with MTCNN, pick the subject's face, and cut the two crops the models use."""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from pinsface.settings import FaceSettings


@dataclass
class Face:
    box: np.ndarray  # (4,) x1, y1, x2, y2 in image pixels
    confidence: float
    landmarks: np.ndarray  # (5, 2): left eye, right eye, nose, left mouth, right mouth

    @property
    def size(self) -> float:
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def _fixed_scale_pyramid(width, height, min_face_size, scale_factor, min_size=12):
    # mtcnn 1.0.0 counts pyramid levels as if min_face_size were 12, so any larger minimum makes its
    # last levels smaller than PNet's 12-px window and the whole batch fails. Count them correctly.
    m = min_size / min_face_size
    levels = int(np.floor(np.log(min_size / (min(width, height) * m)) / np.log(scale_factor))) + 1
    return m * scale_factor ** np.arange(max(levels, 1))


class FaceDetector:
    """Batched MTCNN. ``detect`` takes RGB uint8 images and returns every face in each."""

    def __init__(self, settings: FaceSettings | None = None):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import mtcnn.stages.stage_pnet as stage_pnet
        from mtcnn import MTCNN

        stage_pnet.build_scale_pyramid = _fixed_scale_pyramid
        self.settings = settings or FaceSettings()
        self._mtcnn = MTCNN(device="CPU:0")

    def detect(self, images: list[np.ndarray], min_face_sizes: list[float] | None = None) -> list[list[Face]]:
        """Faces per image. Same-shape images go through MTCNN together; big ones are scanned downscaled."""
        s = self.settings
        results: list[list[Face]] = [[] for _ in images]
        groups: dict[tuple, list[int]] = {}
        scaled: list[np.ndarray] = []
        factors: list[float] = []
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            factor = min(1.0, s.detect_max_side / max(h, w))
            small = image if factor == 1.0 else cv2.resize(image, (round(w * factor), round(h * factor)),
                                                           interpolation=cv2.INTER_AREA)
            scaled.append(small)
            factors.append(factor)
            groups.setdefault(small.shape, []).append(i)
        for indices in groups.values():
            wanted = [
                max(s.min_face_size, (min_face_sizes[i] if min_face_sizes else 0)) * factors[i] for i in indices
            ]
            min_face = max(12.0, min(wanted))
            rows = self._mtcnn.detect_faces(
                [scaled[i] for i in indices], output_type="numpy", box_format="xyxy", min_face_size=min_face,
                threshold_pnet=s.thresholds[0], threshold_rnet=s.thresholds[1], threshold_onet=s.thresholds[2],
            )
            for row in np.asarray(rows).reshape(-1, 16):
                i = indices[int(row[0])]
                f = factors[i]
                landmarks = np.stack([row[6:11], row[11:16]], axis=1) / f
                face = Face(row[1:5].astype(np.float32) / f, float(row[5]), landmarks.astype(np.float32))
                if min_face_sizes is None or face.size >= min_face_sizes[i]:
                    results[i].append(face)
        for faces in results:
            faces.sort(key=lambda face: -face.confidence)
        return results


def choose_face(faces: list[Face], image_shape: tuple[int, ...]) -> int:
    """The subject of a portrait: among confident faces at least half the largest one's size, the most central."""
    if not faces:
        return -1
    h, w = image_shape[:2]
    largest = max(face.size for face in faces)
    best_conf = max(face.confidence for face in faces)
    candidates = [
        i for i, face in enumerate(faces)
        if face.size >= 0.5 * largest and face.confidence >= min(0.9, best_conf)
    ]

    def off_centre(i: int) -> float:
        box = faces[i].box
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return ((cx - w / 2) / w) ** 2 + ((cy - h / 2) / h) ** 2

    return min(candidates, key=off_centre)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation mapping ``src`` onto ``dst`` (Umeyama), as 2x3."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / src_c.var(0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def face_template(settings: FaceSettings) -> np.ndarray:
    template = np.asarray(settings.template, dtype=np.float64) * (settings.aligned_size / 150.0)
    centre = settings.aligned_size / 2.0
    return (template - centre) * settings.template_scale + centre + np.asarray(settings.template_shift)


def align_face(image: np.ndarray, landmarks: np.ndarray, settings: FaceSettings | None = None) -> np.ndarray:
    """The aligned RGB face chip (dlib's get_face_chip framing at the default settings)."""
    settings = settings or FaceSettings()
    matrix = similarity_transform(landmarks, face_template(settings))
    size = settings.aligned_size
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def box_crop(image: np.ndarray, box: np.ndarray, size: int = 100) -> np.ndarray:
    """The brief's input: the detector box cut out (zero-padded past the edges), grayscale, size x size."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    crop = np.zeros((y2 - y1, x2 - x1, 3), dtype=np.uint8)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        crop[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = image[sy1:sy2, sx1:sx2]
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)


def fallback_landmarks(image_shape: tuple[int, ...], settings: FaceSettings | None = None) -> np.ndarray:
    """Where a portrait's landmarks usually are, for aligning an image in which no face was detected."""
    settings = settings or FaceSettings()
    h, w = image_shape[:2]
    return np.asarray(settings.fallback_landmarks, dtype=np.float32) * np.array([w, h], dtype=np.float32)


def landmarks_box(landmarks: np.ndarray) -> np.ndarray:
    """A face box implied by 5 landmarks (for crops of fallback-aligned images)."""
    centre = landmarks.mean(0)
    eye_mouth = np.linalg.norm((landmarks[3] + landmarks[4]) / 2 - (landmarks[0] + landmarks[1]) / 2)
    half = 1.1 * eye_mouth
    return np.array([centre[0] - half, centre[1] - 1.2 * half, centre[0] + half, centre[1] + 0.9 * half],
                    dtype=np.float32)

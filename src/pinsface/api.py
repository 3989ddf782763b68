"""The public API for working with faces directly, no training needed: load, detect, describe, compare.

    >>> import pinsface
    >>> faces = pinsface.describe("group.jpg")
    >>> [f.box for f in faces]                      # (x, y, width, height) in the photo's pixels
    >>> pinsface.verify("a.jpg", "b.jpg").same

Every function takes a path, the encoded bytes of a photo, or an RGB ``uint8`` array. Photos are decoded at
bounded scale with their EXIF orientation applied, as everywhere in pinsface. The detector and the embedding
network are built on first use and shared by later calls (and threads) in the process.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from pinsface.errors import BadImage, NoFaceError
from pinsface.face_index import face_vectors
from pinsface.finding import FoundFaces, decode_photo, find_faces
from pinsface.settings import FaceSettings, Settings

ImageLike = str | os.PathLike | bytes | np.ndarray

# verify's default: the largest descriptor distance still called the same person. Chosen as the single threshold
# with the highest verification accuracy on LFW-protocol pairs from the shared data's test split, and checked
# against the thresholds chosen fold by fold (bench/lfw_pins.py, bench/lfw.py; docs/verification.md).
VERIFY_THRESHOLD = 0.625


@dataclass(frozen=True)
class DetectedFace:
    """One face in a photo. ``box`` is (x, y, width, height) and ``landmarks`` the 5 points (left eye, right
    eye, nose, left and right mouth corner, as seen in the image), in the photo's own pixels with its EXIF
    orientation applied. ``is_subject``: the photo's main face, as a portrait's subject is chosen.
    ``descriptor``: the 128-d descriptor (``describe`` only), averaged with its mirror image's."""

    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float
    is_subject: bool
    descriptor: np.ndarray | None = None

    def to_dict(self) -> dict:
        """JSON-ready: box, landmarks, score, subject, and descriptor where there is one."""
        out = {
            "box": [round(v, 2) for v in self.box],
            "landmarks": [[round(x, 2), round(y, 2)] for x, y in self.landmarks],
            "score": round(self.score, 4),
            "subject": self.is_subject,
        }
        if self.descriptor is not None:
            out["descriptor"] = [round(float(v), 6) for v in self.descriptor]
        return out


@dataclass(frozen=True)
class Verification:
    """``verify``'s answer: whether the two faces are the ``same`` person, at what ``distance`` (lower is more
    alike), judged against ``threshold``."""

    same: bool
    distance: float
    threshold: float

    def to_dict(self) -> dict:
        return {"same": self.same, "distance": round(self.distance, 4), "threshold": self.threshold}


class _Models:
    """The detector and the embedder, built once per process on first use."""

    def __init__(self):
        self._lock = threading.Lock()
        self._detector = None
        self._embedder = None

    def detector(self):
        with self._lock:
            if self._detector is None:
                from pinsface.faces import FaceDetector

                self._detector = FaceDetector(FaceSettings())
            return self._detector

    def embedder(self):
        with self._lock:
            if self._embedder is None:
                from pinsface.backbones import get_backbone
                from pinsface.embeddings import run_embedder

                settings = Settings()
                self._embedder = run_embedder(settings, get_backbone(settings.backbone))
            return self._embedder


_MODELS = _Models()


def load_image(image: ImageLike) -> np.ndarray:
    """A photo as an (H, W, 3) RGB ``uint8`` array, EXIF orientation applied. Very large photos come back at
    a reduced scale (shorter side about 1000 px). Raises ``BadImage`` with a ``reason``.

    >>> pinsface.load_image("photo.jpg").shape
    (1000, 1333, 3)
    """
    return decode_photo(image, FaceSettings()).pixels


def _found(image: ImageLike) -> FoundFaces:
    (found,) = find_faces(_MODELS.detector(), [image], FaceSettings())
    if found.error is not None:
        raise BadImage(found.error, found.note or "")
    return found


def _faces(found: FoundFaces, descriptors: np.ndarray | None) -> list[DetectedFace]:
    from pinsface.faces import FACE_STATUSES, choose_subject

    subject, status = choose_subject(found.faces, found.full_size, FaceSettings())
    out = []
    for i, face in enumerate(found.faces):
        x1, y1, x2, y2 = (float(v) for v in face.box)
        out.append(
            DetectedFace(
                box=(x1, y1, x2 - x1, y2 - y1),
                landmarks=tuple((float(x), float(y)) for x, y in face.landmarks),
                score=float(face.confidence),
                is_subject=i == subject and status in FACE_STATUSES,
                descriptor=None if descriptors is None else descriptors[i],
            )
        )
    return out


def described_faces(found: FoundFaces, embedder, settings: FaceSettings, *, mirror: bool = True) -> list[DetectedFace]:
    """``found``'s faces with their descriptors from ``embedder`` (one shared batch for the crops and mirrors;
    ``mirror=False``: the crops' own embeddings, not averaged with their mirror images')."""
    if not found.faces:
        return []
    chips = np.stack(found.chips)
    if not mirror:
        return _faces(found, embedder(chips))
    emb, emb_flip = embedder.both_views(chips)
    return _faces(found, face_vectors(emb, emb_flip))


def detect(image: ImageLike) -> list[DetectedFace]:
    """Every face in a photo, with box, landmarks, detector score and ``is_subject``; no descriptors (fast:
    the embedding network is not loaded). Raises ``BadImage``.

    >>> [f.box for f in pinsface.detect("group.jpg")]
    [(412.3, 180.9, 96.1, 121.4), ...]
    """
    return _faces(_found(image), None)


def describe(image: ImageLike, *, mirror: bool = True) -> list[DetectedFace]:
    """Every face in a photo with its 128-d ``descriptor``: dlib's face-embedding network (rebuilt in Keras),
    averaged with the mirror image's (``mirror=False``: the face's own, as dlib gives it). Two photos of one
    person are usually within ``VERIFY_THRESHOLD`` of each other. Raises ``BadImage``; a photo with no face
    gives ``[]``.

    >>> face = pinsface.describe("portrait.jpg")[0]
    >>> face.descriptor.shape
    (128,)
    """
    return described_faces(_found(image), _MODELS.embedder(), FaceSettings(), mirror=mirror)


def distance(a: np.ndarray | DetectedFace, b: np.ndarray | DetectedFace) -> float:
    """The Euclidean distance between two descriptors (or two described faces); lower is more alike."""
    va, vb = (np.asarray(x.descriptor if isinstance(x, DetectedFace) else x, dtype=np.float64) for x in (a, b))
    if va.shape != vb.shape or va.ndim != 1:
        raise ValueError(f"descriptors must be two vectors of one length, not shapes {va.shape} and {vb.shape}")
    return float(np.linalg.norm(va - vb))


def _subject_descriptor(image: ImageLike, which: str) -> np.ndarray:
    faces = describe(image)
    if not faces:
        raise NoFaceError(f"no face found in the {which} image")
    chosen = next((f for f in faces if f.is_subject), None)
    if chosen is None:  # several faces, none clearly the subject: the largest
        chosen = max(faces, key=lambda f: min(f.box[2], f.box[3]))
    return chosen.descriptor


def verify(image_a: ImageLike, image_b: ImageLike, threshold: float | None = None) -> Verification:
    """Whether the main face of each photo is the same person. ``threshold`` defaults to ``VERIFY_THRESHOLD``.
    Raises ``NoFaceError`` when a photo has no face, ``BadImage`` when it cannot be read.

    >>> pinsface.verify("a.jpg", "b.jpg")
    Verification(same=True, distance=0.3812, threshold=0.625)
    """
    limit = VERIFY_THRESHOLD if threshold is None else float(threshold)
    d = distance(_subject_descriptor(image_a, "first"), _subject_descriptor(image_b, "second"))
    return Verification(same=d <= limit, distance=d, threshold=limit)

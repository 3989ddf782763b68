"""The one settings object that travels with a run and is saved in it (``config.json``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

# Where dlib's get_face_chip(size=150, padding=0.25) puts the 5 landmarks MTCNN gives:
# left eye, right eye, nose tip, left mouth corner, right mouth corner (image left/right).
FACE_TEMPLATE_150 = ((47.12, 44.94), (100.30, 45.30), (74.45, 77.99), (47.83, 99.54), (99.48, 99.31))
# Median landmark positions (x / width, y / height) of the faces MTCNN found in the shared Pins images,
# used to align images where it found none: Pins photos are framed around one centred face.
PINS_MEDIAN_LANDMARKS = ((0.3322, 0.4177), (0.6118, 0.4124), (0.4700, 0.5800), (0.3535, 0.7124), (0.5992, 0.7074))


@dataclass(frozen=True)
class FaceSettings:
    """Everything that changes what the faces stage produces; its hash keys the face cache."""

    min_face_size: int = 20
    # For dataset preparation: ignore faces smaller than this fraction of a photo's shorter side, or of a
    # crop-shaped image's (small, square or portrait, like the Pins photos: see faces.is_crop_shaped).
    min_face_fraction: float = 0.03
    crop_min_face_fraction: float = 0.2
    # Second pass in a person's folder: when it holds at least this many photos with several faces, the face
    # nearest (in embedding space) to the person's other faces is chosen in each; 0 turns it off.
    subject_pass_min_photos: int = 3
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8)
    # A crop-shaped image with no face found is scanned again inside a black border this fraction of its long
    # side, at these thresholds (see faces.retry_tight_crops); 0 turns it off.
    tight_crop_border: float = 0.25
    tight_crop_thresholds: tuple[float, float, float] = (0.5, 0.6, 0.7)
    detect_max_side: int = 1024
    template: tuple[tuple[float, float], ...] = FACE_TEMPLATE_150
    template_scale: float = 1.0
    template_shift: tuple[float, float] = (0.0, 0.0)
    fallback_landmarks: tuple[tuple[float, float], ...] = PINS_MEDIAN_LANDMARKS
    aligned_size: int = 150
    box_size: int = 100
    max_pixels: int = 50_000_000
    # A photo library (``pinsface index``): keep every face, scan every photo down to the smallest face, and cut
    # each face's chip, rather than choose one subject per photo. Left out of the version when off, so turning
    # it on selects a cache of its own and leaves the existing ones where they are.
    every_face: bool = False

    def version(self) -> str:
        values = asdict(self)
        if not values["every_face"]:
            del values["every_face"]
        text = json.dumps(values, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    @classmethod
    def from_dict(cls, data: dict) -> FaceSettings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("thresholds", "template_shift"):
            if key in values:
                values[key] = tuple(values[key])
        for key in ("template", "fallback_landmarks"):
            if key in values:
                values[key] = tuple(tuple(p) for p in values[key])
        return cls(**values)


@dataclass
class Settings:
    """A run's settings: data, split, model and training choices."""

    data_dir: str = ""
    cache_dir: str = ""
    seed: int = 1337
    test_fraction: float = 0.15
    val_fraction: float = 0.20
    faces: FaceSettings = field(default_factory=FaceSettings)
    # Align images where MTCNN found no face with the dataset's mean landmark positions.
    no_face_fallback: bool = True
    model: str = "embedding"
    backbone: str = "dlib-resnet-v1"
    # The embedding head's epochs at most (early stopping usually ends it sooner): each epoch sees every
    # training face once, as the embedding of the crop or of its mirror image, drawn at random (README,
    # `pinsface train`).
    epochs: int = 60
    batch_size: int = 256
    learning_rate: float = 1e-3
    hidden_units: tuple[int, ...] = (512, 256, 128)
    # Chosen on validation top-1 among 0.1, 0.2, 0.3 and 0.5 (README).
    dropout: float = 0.1
    weight_decay: float = 1e-4
    # Gaussian noise on the (unit-norm x sqrt(dim)) embedding while training the head: cheap augmentation.
    input_noise: float = 0.0
    monitor: str = "val_loss"
    label_smoothing: float = 0.1
    cosine_scale: float = 16.0
    class_weights: bool = False
    # Mixup of embedding pairs while training the embedding head: Beta(alpha, alpha) mixing weights, 0 is off.
    # Chosen on validation top-1 over several seeds against 0.4 and none (README).
    mixup: float = 1.0
    # Extra random flip/zoom/rotation views per training face pushed through the backbone (embedding model).
    # Off: on the shared data they gained nothing over the cached mirror images, at the cost of a backbone pass
    # per view (README).
    augment_views: int = 0
    augment_flip: bool = True
    augment_zoom: float = 0.1
    augment_rotation: float = 0.04
    early_stopping_patience: int = 8
    # Smallest change of the monitored value that counts as progress, for early stopping and the plateau
    # schedule.
    min_delta: float = 1e-3
    lr_patience: int = 3
    # "plateau" (ReduceLROnPlateau) or "cosine" (a half cosine over the epochs). Cosine over fewer epochs was
    # as accurate on the shared data and faster, but its fixed length left the head of a small folder short of
    # training, and enrolment builds on that head (README).
    lr_schedule: str = "plateau"
    fine_tune: bool = False
    fine_tune_from: str = "conv256_1"
    fine_tune_epochs: int = 6
    fine_tune_learning_rate: float = 3e-5
    # Names the backbone weights that produced cached embeddings: the backbone, or a fine-tuned copy of it.
    embedding_key: str = ""
    test_time_flip: bool = True
    # Target false-accept rate of the calibrated "unknown" threshold, as simulated on the gallery's own faces
    # (see pinsface.gallery). Chosen with bench/openset.py, known people against strangers (README); the
    # simulation overstates the real stranger accept rate.
    target_far: float = 0.07
    embed_batch_size: int = 64
    # Precision of the backbone when embedding: auto is bfloat16 where the CPU has it (AVX512-BF16 or AMX),
    # else float32. The saved model itself stays float32.
    embed_precision: str = "auto"
    detect_batch_size: int = 64
    # "train+val": once early stopping on the validation split has chosen the epoch count, the saved head is
    # trained again on the training and validation faces together, for that many epochs at the same learning
    # rates. The test split is never trained on, so the report's test figures describe the saved model. Off by
    # default: it named more known test faces but fewer photos of people enrolled later (README).
    final_fit: str = "none"
    # Rank identities by the head's probabilities blended with the gallery's nearest-faces distances, with the
    # blend's weight chosen on validation (pinsface.scoring.identity_scores); off: the head alone.
    knn_blend: bool = True
    # How faces are named: "head" (the head, checked by the gallery's distance), "gallery" (the gallery's
    # nearest identities alone, no head), or "auto" (gallery above pinsface.scoring.GALLERY_MODE_ABOVE identities).
    mode: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "faces" in values:
            values["faces"] = FaceSettings.from_dict(values["faces"])
        if "hidden_units" in values:
            values["hidden_units"] = tuple(values["hidden_units"])
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> Settings:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

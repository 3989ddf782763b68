"""The one settings object that travels with a run and is saved in it (``config.json``)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pinsface.errors import SettingsError

# The lists of choices each live here alone; the modules that act on a choice import its list from here.
MODELS = ("embedding", "pixels-mlp")
BACKBONES = ("dlib-resnet-v1",)
MODES = ("auto", "head", "gallery")
PRECISIONS = ("auto", "float32", "bfloat16")
LR_SCHEDULES = ("plateau", "cosine")
FINAL_FITS = ("none", "train+val")
MONITORS = ("val_loss", "val_accuracy")
# A run's config.json also records the pinsface version that wrote it (see pinsface.runfolder): not a setting.
VERSION_KEY = "pinsface_version"

# Caps on decoding, each named here alone. A photo with more pixels than this, read from its header, is refused
# undecoded (FaceSettings.max_pixels and pinsface.images' default); the server's cap per uploaded photo is lower.
MAX_PIXELS = 50_000_000
SERVE_MAX_PIXELS = 40_000_000
# Large JPEGs are decoded at a (DCT) scale whose shorter side is at least this, or in full: enough for
# detection and, in 12-megapixel photos, for chips of faces down to a few percent of the frame.
DECODE_MIN_SIDE = 1000

# The detector's revision, part of the face cache key (FaceSettings.version): raised whenever pinsface.faces'
# FaceDetector gives other faces for the same images and settings, so that no cache of the old faces is reused.
# 2: its own networks, and each image's faces independent of its batch companions.
DETECTOR_REVISION = 2

# Where dlib's get_face_chip(size=150, padding=0.25) puts the 5 landmarks MTCNN gives:
# left eye, right eye, nose tip, left mouth corner, right mouth corner (image left/right).
FACE_TEMPLATE_150 = ((47.12, 44.94), (100.30, 45.30), (74.45, 77.99), (47.83, 99.54), (99.48, 99.31))
# Median landmark positions (x / width, y / height) of the faces MTCNN found in the shared Pins images,
# used to align images where it found none: Pins photos are framed around one centred face.
PINS_MEDIAN_LANDMARKS = ((0.3322, 0.4177), (0.6118, 0.4124), (0.4700, 0.5800), (0.3535, 0.7124), (0.5992, 0.7074))


def _check(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise SettingsError(f"{name} must be {rule}, not {value!r}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _in_range(obj, name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    value = getattr(obj, name)
    ok = (
        _number(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    rule = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _check(ok, name, value, rule)


def _whole(obj, name: str, low: int) -> None:
    value = getattr(obj, name)
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= low, name, value, f"a whole number >= {low}"
    )


def _choice(obj, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    _check(value in choices, name, value, "one of " + ", ".join(choices))


def _from_dict(cls, data: dict, what: str) -> dict:
    if not isinstance(data, dict):
        raise SettingsError(f"{what} must be a JSON object, not {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"unknown {what} key(s): {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}")
    return dict(data)


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
    # The template's spread about its centre: above 1 the face fills more of the chip. dlib's own framing (1)
    # separates people less well on MTCNN's landmarks than a slightly tighter chip (bench/framing.py,
    # docs/library.md): the middle of the range where it is best.
    template_scale: float = 1.075
    template_shift: tuple[float, float] = (0.0, 0.0)
    fallback_landmarks: tuple[tuple[float, float], ...] = PINS_MEDIAN_LANDMARKS
    aligned_size: int = 150
    box_size: int = 100
    max_pixels: int = MAX_PIXELS
    # A photo library (``pinsface index``): keep every face, scan every photo down to the smallest face, and cut
    # each face's chip, rather than choose one subject per photo. Left out of the version when off, so turning
    # it on selects a cache of its own and leaves the existing ones where they are.
    every_face: bool = False

    def __post_init__(self):
        _whole(self, "min_face_size", 1)
        _in_range(self, "min_face_fraction", 0, 1, low_open=True, high_open=True)
        _in_range(self, "crop_min_face_fraction", 0, 1, low_open=True, high_open=True)
        _whole(self, "subject_pass_min_photos", 0)
        for name in ("thresholds", "tight_crop_thresholds"):
            value = getattr(self, name)
            ok = len(value) == 3 and all(_number(t) and 0 < t <= 1 for t in value)
            _check(ok, name, value, "three numbers in (0, 1]")
        _in_range(self, "tight_crop_border", 0, 1)
        _whole(self, "detect_max_side", 64)
        for name in ("template", "fallback_landmarks"):
            value = getattr(self, name)
            _check(
                len(value) == 5 and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in value),
                name,
                value,
                "five (x, y) points",
            )
        _in_range(self, "template_scale", 0, 4, low_open=True)
        _whole(self, "aligned_size", 16)
        _whole(self, "box_size", 8)
        _whole(self, "max_pixels", 1)

    def version(self) -> str:
        values = asdict(self)
        if not values["every_face"]:
            del values["every_face"]
        values["detector_revision"] = DETECTOR_REVISION
        text = json.dumps(values, sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    @classmethod
    def from_dict(cls, data: dict) -> FaceSettings:
        """Settings from their saved form; unknown keys and invalid values raise ``SettingsError``."""
        values = _from_dict(cls, data, "face settings")
        for key in ("thresholds", "template_shift"):
            if key in values:
                values[key] = tuple(values[key])
        for key in ("template", "fallback_landmarks"):
            if key in values:
                values[key] = tuple(tuple(p) for p in values[key])
        try:
            return cls(**values)
        except TypeError as exc:  # a list where a number belongs, say
            raise SettingsError(f"face settings: {exc}") from exc


@dataclass(frozen=True)
class Settings:
    """A run's settings: data, split, model and training choices. Checked when built (``SettingsError``) and
    never changed afterwards: ``dataclasses.replace`` makes a changed copy."""

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
    # training face once, as the embedding of the crop or of its mirror image, drawn at random (docs/benchmarks.md,
    # `pinsface train`).
    epochs: int = 60
    batch_size: int = 256
    learning_rate: float = 1e-3
    hidden_units: tuple[int, ...] = (512, 256, 128)
    # Chosen on validation top-1 among 0.1, 0.2, 0.3 and 0.5 (docs/benchmarks.md).
    dropout: float = 0.1
    weight_decay: float = 1e-4
    # Gaussian noise on the (unit-norm x sqrt(dim)) embedding while training the head: cheap augmentation.
    input_noise: float = 0.0
    monitor: str = "val_loss"
    label_smoothing: float = 0.1
    cosine_scale: float = 16.0
    class_weights: bool = False
    # Mixup of embedding pairs while training the embedding head: Beta(alpha, alpha) mixing weights, 0 is off.
    # Chosen on validation top-1 over several seeds against 0.4 and none (docs/benchmarks.md).
    mixup: float = 1.0
    # Extra random flip/zoom/rotation views per training face pushed through the backbone (embedding model).
    # Off: on the shared data they gained nothing over the cached mirror images, at the cost of a backbone pass
    # per view (docs/benchmarks.md).
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
    # training, and enrolment builds on that head (docs/benchmarks.md).
    lr_schedule: str = "plateau"
    fine_tune: bool = False
    fine_tune_from: str = "conv256_1"
    fine_tune_epochs: int = 6
    fine_tune_learning_rate: float = 3e-5
    # Names the backbone weights that produced cached embeddings: the backbone, or a fine-tuned copy of it.
    embedding_key: str = ""
    test_time_flip: bool = True
    # Target false-accept rate of the calibrated "unknown" threshold, as simulated on the gallery's own faces
    # (see pinsface.gallery). Chosen with bench/openset.py, known people against strangers (docs/benchmarks.md); the
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
    # default: it named more known test faces but fewer photos of people enrolled later (docs/benchmarks.md).
    final_fit: str = "none"
    # Rank identities by the head's probabilities blended with the gallery's nearest-faces distances, with the
    # blend's weight chosen on validation (pinsface.scoring.identity_scores); off: the head alone.
    knn_blend: bool = True
    # How faces are named: "head" (the head, checked by the gallery's distance), "gallery" (the gallery's
    # nearest identities alone, no head), or "auto" (gallery above pinsface.scoring.GALLERY_MODE_ABOVE identities).
    mode: str = "auto"

    def __post_init__(self):
        _check(isinstance(self.faces, FaceSettings), "faces", self.faces, "a FaceSettings")
        _whole(self, "seed", 0)
        _in_range(self, "test_fraction", 0, 1, low_open=True, high_open=True)
        _in_range(self, "val_fraction", 0, 1, low_open=True, high_open=True)
        total = self.test_fraction + self.val_fraction
        _check(total < 1, "test_fraction + val_fraction", total, "under 1 (some images must be left to train on)")
        _choice(self, "model", MODELS)
        _choice(self, "backbone", BACKBONES)
        for name in ("epochs", "batch_size", "early_stopping_patience", "lr_patience", "embed_batch_size"):
            _whole(self, name, 1)
        _whole(self, "detect_batch_size", 1)
        for name in ("augment_views", "fine_tune_epochs"):
            _whole(self, name, 0)
        for name in ("learning_rate", "fine_tune_learning_rate", "cosine_scale"):
            _in_range(self, name, 0, 1e6, low_open=True)
        units = self.hidden_units
        ok = len(units) >= 1 and all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in units)
        _check(ok, "hidden_units", units, "one or more positive whole numbers")
        for name in ("dropout", "label_smoothing", "augment_zoom"):
            _in_range(self, name, 0, 1, high_open=True)
        for name in ("weight_decay", "input_noise", "mixup", "augment_rotation", "min_delta"):
            _in_range(self, name, 0, 1e6)
        _in_range(self, "target_far", 0, 1, low_open=True, high_open=True)
        _choice(self, "monitor", MONITORS)
        _choice(self, "lr_schedule", LR_SCHEDULES)
        _choice(self, "embed_precision", PRECISIONS)
        _choice(self, "final_fit", FINAL_FITS)
        _choice(self, "mode", MODES)
        if self.model == "embedding" and self.mixup and self.class_weights:
            raise SettingsError("mixup and class weights do not combine: set mixup=0 to use class weights")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        """Settings from their saved form (a run's ``config.json``); unknown keys and invalid values raise
        ``SettingsError``."""
        values = _from_dict(cls, {k: v for k, v in data.items() if k != VERSION_KEY}, "settings")
        if "faces" in values:
            values["faces"] = FaceSettings.from_dict(values["faces"])
        if "hidden_units" in values:
            values["hidden_units"] = tuple(values["hidden_units"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise SettingsError(f"settings: {exc}") from exc

    @classmethod
    def load(cls, path: Path) -> Settings:
        """Settings saved by ``save``: a run's ``config.json``, or a file a user wrote in that form."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SettingsError(f"cannot read settings from {path}: {exc}") from exc
        return cls.from_dict(data)

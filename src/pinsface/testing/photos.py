"""User-like photos made from the shared Pins faces: phone-size photos with one person, and group composites.

Each Pins image (a tight crop around one face) is pasted, resized, onto a large textured canvas; MTCNN's face box
is about 0.8 of the pasted square, so a face of ``face`` pixels is pasted as a square of ``1.25 * face``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


@dataclass
class Pasted:
    identity: str  # Pins folder name
    rect: tuple[int, int, int, int]  # x1, y1, x2, y2 of the pasted square


_BACKGROUNDS: dict[tuple[int, int, int], Image.Image] = {}


def background(width: int, height: int, seed: int) -> Image.Image:
    """A soft, textured room-like background (a copy of one of four), cheap to make at any size."""
    key = (width, height, seed % 4)
    if key not in _BACKGROUNDS:
        _BACKGROUNDS[key] = _make_background(width, height, seed % 4)
    return _BACKGROUNDS[key].copy()


def _make_background(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 220, (max(2, height // 100), max(2, width // 100), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    return image.filter(ImageFilter.GaussianBlur(2))


def pins_faces(pins_dir: Path, identity: str) -> list[Path]:
    return sorted((pins_dir / identity).glob("*.jpg"))


def paste(canvas: Image.Image, source: Path, face: int, centre: tuple[int, int], identity: str) -> Pasted:
    side = max(8, int(1.25 * face))
    face_image = Image.open(source).convert("RGB").resize((side, side), Image.BICUBIC)
    x1 = int(np.clip(centre[0] - side // 2, 0, canvas.width - side))
    y1 = int(np.clip(centre[1] - side // 2, 0, canvas.height - side))
    canvas.paste(face_image, (x1, y1))
    return Pasted(identity, (x1, y1, x1 + side, y1 + side))


def jpeg(image: Image.Image, quality: int = 88) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def phone_photo(
    source: Path, identity: str, seed: int, size=(4000, 3000), face_fraction: float = 0.1
) -> tuple[bytes, Pasted]:
    """A phone-size JPEG with one Pins face of ``face_fraction`` of the shorter side, off centre at random."""
    rng = np.random.default_rng(seed)
    canvas = background(*size, seed)
    face = int(face_fraction * min(size))
    centre = (int(rng.uniform(0.3, 0.7) * size[0]), int(rng.uniform(0.3, 0.6) * size[1]))
    pasted = paste(canvas, source, face, centre, identity)
    return jpeg(canvas), pasted


def group_photo(
    sources: list[tuple[Path, str]], seed: int, size=(2000, 1500), fractions=(0.09, 0.2)
) -> tuple[bytes, list[Pasted]]:
    """A JPEG with 2-4 Pins faces of different people at sizes spread over ``fractions`` of the shorter side,
    side by side without overlap. The first source is the folder's person; the sizes are shuffled so it is not
    always the largest."""
    rng = np.random.default_rng(seed)
    canvas = background(*size, seed)
    n = len(sources)
    slot = size[0] // n
    fractions = rng.permutation(np.linspace(*fractions, n))
    order = rng.permutation(n)
    placed = []
    for k, (source, identity) in enumerate(sources):
        face = int(min(fractions[k] * min(size), 0.45 * slot))
        cx = int(slot * order[k] + slot / 2)
        cy = int(rng.uniform(0.35, 0.65) * size[1])
        placed.append(paste(canvas, source, face, (cx, cy), identity))
    return jpeg(canvas), placed


def chosen_is(box: np.ndarray, pasted: Pasted) -> bool:
    """Whether a detected face box lies on the pasted square (its centre inside it)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x1, y1, x2, y2 = pasted.rect
    return x1 <= cx <= x2 and y1 <= cy <= y2


def build_groups(
    pins_dir: Path, root: Path, subjects: list[str], others: list[str], *, references: int, groups: int, seed: int = 0
) -> dict[str, list[Pasted]]:
    """A dataset under ``root``: per subject, ``references`` plain Pins photos of them and ``groups`` composites
    with 1-3 other people. Returns file name -> what was pasted (the subject first)."""
    rng = np.random.default_rng(seed)
    truth: dict[str, list[Pasted]] = {}
    for s, subject in enumerate(subjects):
        folder = root / subject
        folder.mkdir(parents=True, exist_ok=True)
        faces = pins_faces(pins_dir, subject)
        for path in faces[:references]:
            (folder / path.name).write_bytes(path.read_bytes())
        for g in range(groups):
            n_others = int(rng.integers(1, 4))
            picked = rng.choice([o for o in others if o != subject], n_others, replace=False)
            sources = [(faces[references + g], subject)]
            sources += [(pins_faces(pins_dir, o)[int(rng.integers(0, 40))], o) for o in picked]
            data, placed = group_photo(sources, seed=1000 * s + g)
            name = f"group_{g:02d}.jpg"
            (folder / name).write_bytes(data)
            truth[f"{subject}/{name}"] = placed
    return truth


def enlarged_original(path: Path, enlarge: bool) -> bytes:
    """A shared original as JPEG bytes; with ``enlarge``, 4x larger on a canvas of at least 4000x3000, like a
    12-megapixel photo."""
    source = Image.open(path).convert("RGB")
    if enlarge:
        big = source.resize((source.width * 4, source.height * 4), Image.BICUBIC)
        canvas = Image.new("RGB", (max(4000, big.width + 100), max(3000, big.height + 100)), (90, 100, 110))
        canvas.paste(big, (50, 50))
        source = canvas
    return jpeg(source, quality=92)


def reduced_and_full_chips(data: bytes, detector, settings) -> list[np.ndarray] | None:
    """Three chips of the first face in ``data``: as prepare cuts it (reduced-scale decoding, its own
    landmarks), from that same view with the full-size decoding's landmarks, and from the full-size decoding
    alone. None where either decoding finds no face."""
    from pinsface.faces import align_face, crop_scale_ok, face_crops, min_subject_size, refine_view, to_full_face
    from pinsface.images import decode_scaled, load_image
    from pinsface.settings import DECODE_MIN_SIDE

    view = decode_scaled(data, settings.max_pixels, DECODE_MIN_SIDE)
    full = load_image(data)
    found = detector.detect([view.pixels], [min_subject_size(view.full_size, settings) * min(view.scale)])[0]
    reference = detector.detect([full], [min_subject_size(full.shape, settings)])[0]
    if not found or not reference:
        return None
    face, ref = to_full_face(found[0], view), reference[0]
    if not crop_scale_ok(view, [face.size]):
        view = refine_view(data, view, [face, ref], settings)
    return [
        face_crops(view, face.landmarks, face.box, settings)[0],
        face_crops(view, ref.landmarks, ref.box, settings)[0],
        align_face(full, ref.landmarks, settings),
    ]


def record_decodes(monkeypatch) -> list[tuple[int, int]]:
    """The (height, width) of every image ``images.decode_scaled`` decodes from now on, in order."""
    import pinsface.images as images

    decoded: list[tuple[int, int]] = []
    real = images.decode_scaled

    def recording(*args, **kwargs):
        view = real(*args, **kwargs)
        decoded.append(view.pixels.shape[:2])
        return view

    monkeypatch.setattr(images, "decode_scaled", recording)
    return decoded

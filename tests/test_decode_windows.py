"""Decoding only the windows round small faces (images.decode_windows, faces.refine_view): the same pixels, and so
the same chips, as a whole decode at that scale."""

import io

import numpy as np
import pytest
from PIL import Image

from pinsface.faces import Detection, face_crops, face_window, refine_view
from pinsface.images import decode_scaled, decode_windows, load_scaled
from pinsface.settings import FaceSettings


def photo(orientation: int = 1, size=(1200, 900), progressive: bool = False, fmt: str = "JPEG") -> bytes:
    """A textured photo (smooth noise, so every block and colour edge counts) with an EXIF orientation."""
    rng = np.random.default_rng(orientation)
    small = (rng.random((size[1] // 32, size[0] // 32, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(small).resize(size, Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=90, exif=exif.tobytes(), progressive=progressive)
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()


def whole(data: bytes, reduction: int):
    short = min(Image.open(io.BytesIO(data)).size)
    return load_scaled(data, min_side=short // reduction if reduction > 1 else None)


def covered(shape, windows, reduction: int) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    for x1, y1, x2, y2 in windows:
        x1, y1 = max(0, int(x1) // reduction), max(0, int(y1) // reduction)
        mask[y1 : int(y2) // reduction + 1, x1 : int(x2) // reduction + 1] = True
    return mask


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("reduction", [1, 2])
def test_windows_have_the_whole_decodes_pixels_in_any_orientation(orientation, reduction):
    data = photo(orientation)
    reference = whole(data, reduction)
    h, w = reference.full_size
    # One window inside, one at the bottom-right corner, one across the top edge (full-resolution, upright).
    windows = [(0.3 * w, 0.4 * h, 0.45 * w, 0.55 * h), (w - 90, h - 70, w - 1, h - 1), (0.6 * w, -20, 0.7 * w, 50)]
    view = decode_windows(data, windows, reduction)
    assert view is not None and view.full_size == reference.full_size
    assert view.pixels.shape == reference.pixels.shape
    inside = covered(view.pixels.shape, windows, reduction)
    assert np.array_equal(view.pixels[inside], reference.pixels[inside])
    far = ~covered(view.pixels.shape, [(x1 - 40, y1 - 40, x2 + 40, y2 + 40) for x1, y1, x2, y2 in windows], reduction)
    assert not view.pixels[far].any()  # never decoded


def test_a_progressive_jpeg_is_decoded_in_one_window_round_faces_near_each_other():
    data = photo(progressive=True)
    reference = whole(data, 1)
    windows = [(100, 100, 200, 200), (300, 150, 400, 250)]
    view = decode_windows(data, windows, 1)
    # Each window would read the whole file again: one window round both is decoded instead.
    assert np.array_equal(view.pixels[100:250, 100:400], reference.pixels[100:250, 100:400])
    assert not view.pixels[400:].any()


@pytest.mark.parametrize("noisy", [False, True])
def test_windows_in_a_heavy_file_are_decoded_as_one(noisy):
    """Two windows near the bottom, at the two sides: each reads the entropy-coded data down to it. In a small
    file that is cheap and they are decoded apart; in a heavy one (noise: about a byte a pixel) one window round
    both costs less."""
    rng = np.random.default_rng(0)
    if noisy:
        pixels = (rng.random((900, 1200, 3)) * 255).astype(np.uint8)
    else:
        pixels = np.broadcast_to(np.linspace(0, 255, 1200, dtype=np.uint8)[None, :, None], (900, 1200, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "JPEG", quality=95)
    view = decode_windows(buffer.getvalue(), [(0, 500, 150, 880), (1050, 500, 1199, 880)])
    between = view.pixels[600:800, 400:800]
    assert between.any() == noisy


def test_what_only_a_whole_decode_can_read_gives_none():
    box = [(100, 100, 200, 200)]
    assert decode_windows(photo(fmt="PNG"), box) is None
    assert decode_windows(photo()[:-2], box) is None  # no end marker: Pillow reports what is missing
    assert decode_windows(photo(), box, reduction=3) is None


def test_refined_chips_are_the_whole_decodes_chips():
    """Faces near the edge, tilted and small: their chips and box crops cut from the windows are those of the
    whole decode."""
    settings = FaceSettings()
    data = photo(6, size=(2400, 1800))
    view = decode_scaled(data, min_side=400)  # the detector's view, at a quarter scale
    reference = whole(data, 1)
    h, w = reference.full_size

    def face(cx, cy, side, angle):
        template = np.array([[-0.2, -0.1], [0.2, -0.1], [0, 0.08], [-0.15, 0.25], [0.15, 0.25]]) * side
        turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        landmarks = (template @ turn.T + [cx, cy]).astype(np.float32)
        box = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float32)
        return Detection(box, 0.99, landmarks)

    faces = [face(0.5 * w, 0.5 * h, 90, 0.0), face(30, 40, 120, 0.4), face(w - 50, h - 60, 150, -0.6)]
    refined = refine_view(data, view, faces, settings)
    assert refined.pixels.shape == reference.pixels.shape
    for f in faces:
        x1, y1, x2, y2 = face_window(f, settings)
        assert x1 < f.landmarks[:, 0].min() and x2 > f.landmarks[:, 0].max()
        got, want = (
            face_crops(refined, f.landmarks, f.box, settings),
            face_crops(reference, f.landmarks, f.box, settings),
        )
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])

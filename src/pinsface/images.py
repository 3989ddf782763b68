"""Read any image a user may bring into an RGB uint8 array, or fail with a named reason."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False

# The reasons a file is skipped; each one is reported by name.
REASONS = ("unreadable", "empty_file", "not_an_image", "truncated", "too_large")


class BadImage(Exception):
    """An input that cannot be used, with a machine-readable ``reason`` (one of ``REASONS``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def read_bytes(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BadImage("unreadable", str(exc)) from exc


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB with EXIF orientation applied."""
    if not data:
        raise BadImage("empty_file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage("too_large", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise BadImage("not_an_image", "not a recognised image format") from exc
        except OSError as exc:
            raise BadImage("unreadable", str(exc)) from exc
        width, height = image.size
        if width * height > max_pixels:
            raise BadImage("too_large", f"{width}x{height} pixels is over the cap of {max_pixels}")
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage("too_large", str(exc)) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            reason = "truncated" if "truncat" in str(exc).lower() or "broken data" in str(exc).lower() else "unreadable"
            raise BadImage(reason, str(exc)) from exc
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block must not cost the image
        pass
    return to_rgb(image)


def to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "P") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def load_image(source: str | os.PathLike | bytes | np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A path, encoded bytes or an array -> (H, W, 3) uint8 RGB. Raises ``BadImage``."""
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise BadImage("not_an_image", f"array of shape {source.shape}")
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(array[:, :, :3])
    data = source if isinstance(source, (bytes, bytearray)) else read_bytes(source)
    return decode_image(bytes(data), max_pixels)

"""Read any image a user may bring into an RGB uint8 array, or fail with a named reason.

Nothing is read without bounds: only regular files (never FIFOs or devices, even behind a link), at most
``DEFAULT_MAX_BYTES`` of them, decoded only by the Pillow plugins of the formats pinsface accepts, and only when
the header's pixel count is under the cap. Large photos can be decoded at a reduced scale, which is how photos
of any size are read in bounded memory: JPEGs by libjpeg's DCT scaling, PNG, WebP, TIFF and GIF by libvips, a
strip at a time, uncompressed BMP and binary PPM a band of rows at a time. The rest (RLE BMP, plain-text or 16-bit
PPM, CMYK, what libvips cannot read as Pillow does) is decoded whole, within the cap.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import stat
import warnings
from dataclasses import dataclass
from struct import error as struct_error  # Pillow raises it for some malformed headers

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pinsface.errors import BadImage
from pinsface.settings import MAX_PIXELS

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
# No face of the smallest size pinsface looks for fits in a thinner image.
MIN_SIDE = 20
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The only Pillow plugins ever asked to read a file: the formats of dataset.IMAGE_EXTENSIONS. Anything else
# (EPS/PostScript, which Pillow hands to Ghostscript, and the rarer plugins) is "not_an_image", whatever its name.
FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF", "PPM")

# The reasons a file is skipped; each one is reported by name.
REASONS = (
    "unreadable",
    "empty_file",
    "not_an_image",
    "truncated",
    "too_large",
    "too_small",
    "not_a_file",
    "bad_name",
    "detector_error",
)


def read_bytes(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; FIFOs, devices and sockets are never opened."""
    try:
        info = os.stat(path)  # follows links: a link to /dev/zero is judged by what it points at
    except (OSError, ValueError) as exc:
        raise BadImage("unreadable", str(exc)) from exc
    if not stat.S_ISREG(info.st_mode):
        raise BadImage("not_a_file", f"{os.fsdecode(path)!r} is not a regular file")
    if info.st_size > max_bytes:
        raise BadImage("too_large", f"{info.st_size} bytes is over the cap of {max_bytes}")
    try:
        # O_NONBLOCK: if the name was swapped for a FIFO since the check, opening it must not hang.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadImage("unreadable", str(exc)) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadImage("not_a_file", f"{os.fsdecode(path)!r} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise BadImage("unreadable", str(exc)) from exc
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise BadImage("too_large", f"over the cap of {max_bytes} bytes")
    return data


@dataclass
class Decoded:
    """An image decoded at some scale: ``pixels`` (h, w, 3) and the ``full_size`` (height, width) it has at full
    resolution (both with EXIF orientation applied)."""

    pixels: np.ndarray
    full_size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) factors from full-resolution pixel coordinates to ``pixels`` coordinates."""
        return self.pixels.shape[1] / self.full_size[1], self.pixels.shape[0] / self.full_size[0]

    def to_full(self, points: np.ndarray) -> np.ndarray:
        """Points (..., 2) in ``pixels`` coordinates -> full-resolution coordinates (pixel centres kept)."""
        sx, sy = self.scale
        return ((np.asarray(points, np.float64) + 0.5) / np.array([sx, sy]) - 0.5).astype(np.float32)

    def from_full(self, points: np.ndarray) -> np.ndarray:
        sx, sy = self.scale
        return ((np.asarray(points, np.float64) + 0.5) * np.array([sx, sy]) - 0.5).astype(np.float32)


def read_header(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Identify ``data`` as one of ``FORMATS`` and check its pixel count against ``max_pixels`` from the header
    only: a decompression bomb is refused here, undecoded."""
    if not data:
        raise BadImage("empty_file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage("too_large", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise BadImage("not_an_image", f"not a {', '.join(FORMATS)} image") from exc
        except (OSError, SyntaxError, ValueError, TypeError, struct_error, EOFError) as exc:
            raise BadImage("unreadable", str(exc)) from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise BadImage("too_large", f"{width}x{height} pixels is over the cap of {max_pixels}")
    return image


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Identify ``data`` and check its header (format, pixel count, shape) without decoding the pixels."""
    image = read_header(data, max_pixels)
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise BadImage("too_small", f"{width}x{height} pixels: no face fits")
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block must not cost the image
        return 1


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, min_side: int | None = None) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB with EXIF orientation applied (see ``decode_scaled`` for ``min_side``)."""
    return decode_scaled(data, max_pixels, min_side).pixels


def decode_scaled(data: bytes, max_pixels: int = MAX_PIXELS, min_side: int | None = None) -> Decoded:
    """Decode ``data``; with ``min_side``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    its shorter side at least ``min_side`` pixels, at a fraction of the time and memory of a full decode."""
    image = open_image(data, max_pixels)
    width, height = image.size
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if min_side and min(width, height) >= 2 * min_side:
                reduced = _decode_at_scale(data, image, min_side)
                if reduced is not None:
                    return _oriented(*reduced, (height, width))
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage("too_large", str(exc)) from exc
        except (OSError, SyntaxError, ValueError, TypeError, struct_error, EOFError, MemoryError) as exc:
            text = str(exc).lower()
            reason = "truncated" if "truncat" in text or "broken data" in text else "unreadable"
            raise BadImage(reason, str(exc)) from exc
    full = (height, width)
    orientation = _orientation(image)
    if orientation in (5, 6, 7, 8):
        full = (width, height)
    if orientation != 1:  # exif_transpose returns a copy even when there is nothing to turn
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a malformed EXIF block must not cost the image
            pass
    try:
        pixels = to_rgb(image)
    except (OSError, ValueError, TypeError) as exc:
        raise BadImage("unreadable", str(exc)) from exc
    if pixels.shape[:2] != full and pixels.shape[:2] == full[::-1]:  # orientation tag ignored after all
        full = full[::-1]
    return Decoded(pixels, full)


def _decode_at_scale(data: bytes, image: Image.Image, min_side: int) -> tuple[np.ndarray, int] | None:
    """(pixels, EXIF orientation) of ``image`` decoded at reduced scale, its shorter side still at least
    ``min_side``: JPEG by libjpeg's DCT scaling, the other formats libvips reads by streaming shrink. None where it
    is decoded whole instead."""
    width, height = image.size
    if image.format in ("JPEG", "MPO"):
        f = min_side / min(width, height)
        image.draft(None, (max(1, int(width * f)), max(1, int(height * f))))
        pixels = _decode_reduced(data, image, width)
        return None if pixels is None else (pixels, _orientation(image))
    shrink = reduction_for(min(width, height), min_side)  # the scales JPEG has, so that every format looks alike
    if image.format in _VIPS_LOADERS:
        return _decode_shrunk(data, image.format, (width, height), shrink)
    if image.format in ("BMP", "PPM"):
        pixels = _decode_raw_bands(data, image, shrink)
        return None if pixels is None else (pixels, 1)
    return None


# The libvips loader of each format it reads; each is called by name, so libvips never guesses a format
# (Pillow has identified the data as one of FORMATS first). BMP and PPM, which libvips does not read, are
# decoded whole, as are files libvips refuses.
_VIPS_LOADERS = {"PNG": "pngload_source", "WEBP": "webpload_source", "TIFF": "tiffload_source", "GIF": "gifload_source"}


def _decode_shrunk(data: bytes, fmt: str, size: tuple[int, int], shrink: int) -> tuple[np.ndarray, int] | None:
    """(pixels, EXIF orientation) of a PNG, WebP, TIFF or GIF decoded at 1/``shrink`` scale (means of ``shrink``
    x ``shrink`` blocks, as libjpeg's DCT scaling gives) by libvips, which decodes it a strip at a time: memory
    follows the reduced image, not the full one. Alpha is laid on white and 16-bit samples scaled to 8 bits, as
    ``to_rgb`` does. The orientation is libvips' reading of the EXIF block (Pillow decodes a whole PNG to find it).
    None where libvips cannot read it the way Pillow sees it (pinsface then decodes it whole, within the pixel
    cap)."""
    vips = _pyvips()
    if vips is None:
        return None
    try:
        source = vips.Source.new_from_memory(data)  # read in place: the bytes are not copied
        load = getattr(vips.Image, _VIPS_LOADERS[fmt])
        if fmt == "WEBP":  # libwebp decodes at the reduced scale itself
            image = load(source, scale=1 / shrink, fail_on="truncated")
            full = (round(image.width * shrink), round(image.height * shrink))
        else:
            image = load(source, access="sequential", fail_on="truncated")
            full = (image.width, image.height)
        if abs(full[0] - size[0]) > shrink or abs(full[1] - size[1]) > shrink or image.bands > 4:
            return None
        # CMYK too is decoded whole: Pillow's conversion to RGB differs from libvips' (a colour profile).
        if image.format not in ("uchar", "ushort") or image.interpretation == "cmyk":
            return None
        if fmt != "WEBP":
            image = image.shrink(shrink, shrink)
        image = image.colourspace("srgb")
        if image.hasalpha():
            image = image.flatten(background=[255, 255, 255])
        image = image.cast("uchar")
        orientation = image.get("orientation") if image.get_typeof("orientation") else 1
        pixels = np.frombuffer(image.write_to_memory(), np.uint8).reshape(image.height, image.width, image.bands)
    except vips.Error:
        return None
    rgb = np.ascontiguousarray(pixels[:, :, :3]) if pixels.shape[2] >= 3 else np.repeat(pixels, 3, axis=2)
    return rgb, int(orientation)


# Bits a pixel of the packed rows of a PPM/PGM/PBM (whose raw tile gives no row stride), by raw mode.
_PACKED_BITS = {"RGB": 24, "L": 8, "1;I": 1}
BAND_PIXELS = 1 << 20  # pixels decoded at a time by _decode_raw_bands


def _decode_raw_bands(data: bytes, image: Image.Image, shrink: int) -> np.ndarray | None:
    """An uncompressed BMP or binary PPM/PGM/PBM (one raw tile, 8-bit RGB, grey, palette or 1-bit pixels)
    decoded a band of rows at a time by Pillow's raw decoder, each band averaged down by ``shrink`` as it comes:
    memory follows the reduced image. None for the others (RLE BMP, plain-text or 16-bit PPM: decoded whole)."""
    width, height = image.size
    if len(image.tile) != 1 or image.mode not in ("RGB", "L", "P", "1"):
        return None
    codec, extents, offset, args = tuple(image.tile[0])[:4]  # a plain tuple before Pillow 11
    args = args if isinstance(args, tuple) else (args, 0, 1)
    rawmode, stride, order = (*args, 0, 1)[:3]
    stride = stride or -(-width * _PACKED_BITS.get(rawmode, 0) // 8)
    if codec != "raw" or tuple(extents) != (0, 0, width, height) or not stride or order not in (1, -1):
        return None
    if len(data) < offset + stride * height:  # truncated: Pillow's whole decode names it
        return None
    import cv2

    rows = shrink * max(1, BAND_PIXELS // (width * shrink))
    out_height, out_width = height // shrink, width // shrink
    bands = []
    for top in range(0, out_height * shrink, rows):
        bottom = min(top + rows, out_height * shrink)
        first = top if order == 1 else height - bottom  # the band's first row as stored (BMP: bottom-up)
        start = offset + first * stride
        stored = memoryview(data)[start : start + (bottom - top) * stride]  # a view: the bytes are not copied
        band = Image.frombuffer(image.mode, (width, bottom - top), stored, "raw", rawmode, stride, order)
        if image.mode == "P":
            band.putpalette(image.palette.palette, image.palette.rawmode or image.palette.mode)
        rgb = to_rgb(band)[:, : out_width * shrink]
        # An area resize by a whole factor is the mean of each shrink x shrink block.
        bands.append(cv2.resize(rgb, (out_width, (bottom - top) // shrink), interpolation=cv2.INTER_AREA))
    return np.ascontiguousarray(np.concatenate(bands)) if bands else None


@functools.cache
def _pyvips():
    try:
        import pyvips
    except (ImportError, OSError) as exc:  # a broken install: decode whole, within the pixel cap, and say so once
        logging.getLogger(__name__).warning("libvips is unavailable (%s): large PNG/WebP/TIFF/GIF decode whole", exc)
        return None
    pyvips.cache_set_max(0)  # never keep a decoded image (or its bytes) after the call
    return pyvips


# OpenCV's flags for libjpeg's 1/2, 1/4 and 1/8 scale decoding, straight to RGB, orientation left to us.
_CV2_REDUCED = {2: "IMREAD_REDUCED_GRAYSCALE_2", 4: "IMREAD_REDUCED_GRAYSCALE_4", 8: "IMREAD_REDUCED_GRAYSCALE_8"}


def _libjpeg_can_decode(data: bytes, image: Image.Image) -> bool:
    """Whether a JPEG may be decoded by libjpeg outside Pillow (OpenCV, TensorFlow) and give Pillow's pixels: RGB
    or grey (not CMYK), and the stream ends with its end marker (libjpeg fills a truncated one with grey where
    Pillow reports it)."""
    return image.mode in ("RGB", "L") and data.endswith(b"\xff\xd9")


def _decode_reduced(data: bytes, image: Image.Image, width: int) -> np.ndarray | None:
    """A JPEG at the reduced scale ``image.draft`` chose, decoded by OpenCV's libjpeg into an array at once
    (Pillow's array conversion copies a photo's pixels twice more, costing as much as the decoding); the same
    pixels. None where Pillow decodes it instead: a full-scale decode, CMYK, or a stream without its end marker
    (OpenCV fills a truncated JPEG with grey where Pillow reports it)."""
    import cv2

    reduction = round(width / image.size[0])
    if reduction not in _CV2_REDUCED or not _libjpeg_can_decode(data, image):
        return None
    flags = getattr(cv2, _CV2_REDUCED[reduction]) | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None
    if pixels is None or pixels.shape != (image.size[1], image.size[0], 3):
        return None
    return pixels


# Pillow's exif_transpose, on an array: orientation tag -> (transpose, flip rows, flip columns).
_ORIENT = {
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, False, True),
    7: (True, True, True),
    8: (True, True, False),
}


def _oriented(pixels: np.ndarray, orientation: int, stored: tuple[int, int]) -> Decoded:
    transpose, flip_rows, flip_cols = _ORIENT.get(orientation, (False, False, False))
    if transpose:
        pixels = pixels.transpose(1, 0, 2)
    if flip_rows:
        pixels = pixels[::-1]
    if flip_cols:
        pixels = pixels[:, ::-1]
    full = stored[::-1] if transpose else stored
    return Decoded(np.ascontiguousarray(pixels), full)


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
    if image.mode != "RGB":  # convert() copies even an RGB image: a large photo's pixels once more
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def load_image(source: str | os.PathLike | bytes | np.ndarray, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A path, encoded bytes or an array -> (H, W, 3) uint8 RGB. Raises ``BadImage``."""
    return load_scaled(source, max_pixels).pixels


def load_scaled(
    source: str | os.PathLike | bytes | np.ndarray, max_pixels: int = MAX_PIXELS, min_side: int | None = None
) -> Decoded:
    """Like ``load_image``, possibly at a reduced scale (``decode_scaled``). Raises ``BadImage``."""
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise BadImage("not_an_image", f"array of shape {source.shape}")
        if min(array.shape[:2]) < MIN_SIDE:
            raise BadImage("too_small", f"array of shape {source.shape}: no face fits")
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        array = np.ascontiguousarray(array[:, :, :3])
        return Decoded(array, array.shape[:2])
    data = source if isinstance(source, (bytes, bytearray)) else read_bytes(source)
    return decode_scaled(bytes(data), max_pixels, min_side)


def reduction_for(face_size: float, target: float) -> int:
    """The largest JPEG reduction (1, 2, 4 or 8) that keeps a face of ``face_size`` full-resolution pixels at
    least ``target`` pixels."""
    for d in (8, 4, 2):
        if face_size / d >= target:
            return d
    return 1


# Decoding a JPEG is reading its entropy-coded data, done for every row down to a window's bottom, and turning
# blocks into pixels, done inside the window only. The first grows with the file's bytes, the second with its
# pixels; they cost about the same at this many bytes a pixel. The guide to whether separate windows or one window
# round them all costs less (``decode_windows``).
ENTROPY_BYTES_PER_PIXEL = 0.25
# Decoded pixels kept round each window: at a window's last row and column libjpeg smooths colour differently
# from a whole decode (it does not read past the window).
WINDOW_MARGIN = 8


def decode_windows(data: bytes, windows, reduction: int = 1, max_pixels: int = MAX_PIXELS) -> Decoded | None:
    """A JPEG decoded at 1/``reduction`` scale (1, 2, 4 or 8) only inside ``windows`` (x1, y1, x2, y2 in
    full-resolution pixels, orientation applied), each with ``WINDOW_MARGIN``: a ``Decoded`` of the whole photo
    whose pixels there are those of a whole decode at that scale, and black elsewhere. libjpeg-turbo skips the
    other rows' pixels and crops the columns (TensorFlow's ``decode_and_crop_jpeg``), so a few faces cost a
    fraction of a whole decode. None where only a whole decode will do: not a baseline or progressive RGB or
    grey JPEG with its end marker, or the windows' decoding failed. Raises ``BadImage`` for a bad header."""
    image = open_image(data, max_pixels)
    if image.format not in ("JPEG", "MPO") or reduction not in (1, 2, 4, 8) or not _libjpeg_can_decode(data, image):
        return None
    width, height = image.size
    orientation = _orientation(image)
    transpose, flip_rows, flip_cols = _ORIENT.get(orientation, (False, False, False))
    stored = (-(-height // reduction), -(-width // reduction))  # libjpeg's scaled size
    shape = stored[::-1] if transpose else stored
    rects = []
    for x1, y1, x2, y2 in windows:
        # In the scaled, oriented pixels; then where they lie in the file as stored.
        xa = max(0, int(np.floor(x1 / reduction)) - WINDOW_MARGIN)
        ya = max(0, int(np.floor(y1 / reduction)) - WINDOW_MARGIN)
        xb = min(shape[1], int(np.ceil((x2 + 1) / reduction)) + WINDOW_MARGIN)
        yb = min(shape[0], int(np.ceil((y2 + 1) / reduction)) + WINDOW_MARGIN)
        if xb > xa and yb > ya:
            rects.append((xa, ya, xb, yb))
    stored_rects = [_stored_rect(r, shape, transpose, flip_rows, flip_cols) for r in rects]
    progressive = bool(image.info.get("progressive") or image.info.get("progression"))
    share = len(data) / (width * height) / (len(data) / (width * height) + ENTROPY_BYTES_PER_PIXEL)
    if len(rects) > 1 and _windows_cost(stored_rects, stored, share, progressive) > _windows_cost(
        [_around(stored_rects)], stored, share, progressive
    ):
        rects = [_around(rects)]
        stored_rects = [_stored_rect(r, shape, transpose, flip_rows, flip_cols) for r in rects]
    pixels = np.zeros((*shape, 3), np.uint8)  # calloc'd: the pages no window touches are never written
    for (xa, ya, xb, yb), (sx1, sy1, sx2, sy2) in zip(rects, stored_rects):
        part = _decode_crop(data, (sx1, sy1, sx2, sy2), reduction)
        if part is None:
            return None
        pixels[ya:yb, xa:xb] = _oriented(part, orientation, part.shape[:2]).pixels
    full = (width, height) if transpose else (height, width)
    return Decoded(pixels, full)


def _stored_rect(rect, shape, transpose: bool, flip_rows: bool, flip_cols: bool) -> tuple[int, int, int, int]:
    """Where a rectangle (x1, y1, x2, y2, end exclusive) of the oriented image of ``shape`` lies in the image as
    stored: ``_oriented``'s steps undone, last first."""
    x1, y1, x2, y2 = rect
    if flip_cols:
        x1, x2 = shape[1] - x2, shape[1] - x1
    if flip_rows:
        y1, y2 = shape[0] - y2, shape[0] - y1
    return (y1, x1, y2, x2) if transpose else (x1, y1, x2, y2)


def _around(rects) -> tuple[int, int, int, int]:
    return (min(r[0] for r in rects), min(r[1] for r in rects), max(r[2] for r in rects), max(r[3] for r in rects))


def _windows_cost(rects, stored: tuple[int, int], share: float, progressive: bool) -> float:
    """Rough cost of decoding these stored rectangles one by one, in whole decodes, where reading the entropy-coded
    data is ``share`` of a whole decode: a progressive JPEG's is read whole for each."""
    height, width = stored
    return sum(
        share * (1.0 if progressive else y2 / height) + (1 - share) * (x2 - x1) * (y2 - y1) / (width * height)
        for x1, y1, x2, y2 in rects
    )


def _decode_crop(data: bytes, rect, reduction: int) -> np.ndarray | None:
    """The stored pixels (x1, y1, x2, y2, end exclusive, at 1/``reduction`` scale) of a JPEG, decoded with
    libjpeg's accurate integer DCT and smooth colour upsampling, as Pillow and OpenCV decode it; None on failure."""
    from pinsface._tf import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf

    x1, y1, x2, y2 = rect
    try:
        part = tf.io.decode_and_crop_jpeg(
            data, [y1, x1, y2 - y1, x2 - x1], channels=3, ratio=reduction, dct_method="INTEGER_ACCURATE"
        ).numpy()
    except (tf.errors.OpError, ValueError):
        return None
    return part if part.shape == (y2 - y1, x2 - x1, 3) else None

"""A corpus of awkward image files, made from a real Pins photo: every kind of bad input pinsface handles."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# The real photo the corpus is made from (its gray version is one MTCNN finds reliably).
SOURCE = ("pins_Bill Gates", "Bill Gates104_500.jpg")
# file name -> reason it must be skipped with
BAD = {
    "zero_bytes.jpg": "empty_file",
    "not_an_image.jpg": "not_an_image",
    "truncated.jpg": "truncated",
    "bomb.png": "too_large",
    "dangling_link.jpg": "unreadable",
}
# file name -> (height, width) the readable oddities decode to
ODD = {
    "gray.png": None,
    "rgba.png": None,
    "palette.png": None,
    "sixteen_bit.png": None,
    "cmyk.jpg": None,
    "exif_rotated.jpg": "rotated",
}


def _png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG that claims a huge canvas (its pixel data is a few compressed zero rows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def make_bad_corpus(folder: Path, source: Path) -> Path:
    """Write every bad and odd file into ``folder``, derived from the real photo ``source``."""
    folder.mkdir(parents=True, exist_ok=True)
    good = Image.open(source).convert("RGB")
    data = source.read_bytes()
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "not_an_image.jpg").write_text("this is a text file with a .jpg name\n")
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "bomb.png").write_bytes(_png_bomb())
    (folder / "dangling_link.jpg").symlink_to(folder / "does_not_exist.jpg")

    good.convert("L").save(folder / "gray.png")
    rgba = good.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "rgba.png")
    good.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    gray16 = np.asarray(good.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray16).save(folder / "sixteen_bit.png")
    good.convert("CMYK").save(folder / "cmyk.jpg", quality=95)

    # Stored sideways with an EXIF tag that says "rotate 90 degrees clockwise to view".
    sideways = good.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    sideways.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    (folder / "exif_rotated.jpg").write_bytes(buffer.getvalue())
    return folder

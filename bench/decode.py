"""Decoding a 40-megapixel photo of each format at reduced scale (what pinsface does) against whole (Pillow).

    python bench/decode.py [--megapixels 39] [--min-side 1000]

Each decode runs in a fresh process, which reports its peak RSS growth (VmHWM) and CPU time for the decode
alone; the photo is a blocky random picture, encoded once per format (PNG, lossy and lossless WebP, deflate
TIFF, GIF, palette and 1-bit BMP, PGM). Prints one table row per format.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pinsface.testing.decoding import decode_in_fresh_process

FORMATS = [
    ("PNG", "RGB", {}),
    ("WEBP lossy", "RGB", {"quality": 80}),
    ("WEBP lossless", "RGB", {"lossless": True}),
    ("TIFF deflate", "RGB", {"compression": "tiff_deflate"}),
    ("GIF", "P", {}),
    ("BMP 8-bit palette", "P", {}),
    ("BMP 1-bit", "1", {}),
    ("PGM", "L", {}),
]


def encoded(pixels: np.ndarray, fmt: str, mode: str, options: dict) -> bytes:
    image = Image.fromarray(pixels)
    image = image.quantize(64) if mode == "P" else image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt.split()[0].replace("PGM", "PPM"), **options)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=39)
    parser.add_argument("--min-side", type=int, default=1000)
    args = parser.parse_args()
    height = int((args.megapixels * 1e6 * 3 / 4) ** 0.5) // 100 * 100
    width = height * 4 // 3
    blocks = np.random.default_rng(0).integers(0, 255, (height // 100, width // 100, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((100, 100, 1), np.uint8))
    print(
        f"{width}x{height} ({width * height / 1e6:.1f} MP), min side {args.min_side}; "
        f"load average {os.getloadavg()[0]:.1f}; peak RSS growth and CPU of the decode alone, in a fresh process"
    )
    print("| format | file | reduced to | peak growth, reduced | CPU s | peak growth, whole | CPU s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, mode, options in FORMATS:
            path = Path(tmp) / "photo"
            path.write_bytes(encoded(pixels, fmt, mode, options))
            row = []
            for how in ("reduced", "whole"):
                cost = decode_in_fresh_process(path, how, args.min_side)
                row.append(("{}x{}".format(*cost.size), cost.peak_growth / 2**20, cost.cpu_seconds))
            (size, r_mb, r_cpu), (_, w_mb, w_cpu) = row
            print(
                f"| {fmt} | {path.stat().st_size / 2**20:.1f} MB | {size} | {r_mb:.0f} MB | {r_cpu:.2f} | "
                f"{w_mb:.0f} MB | {w_cpu:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

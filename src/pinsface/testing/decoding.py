"""One photo decoded in a fresh process, for the memory tests and bench/decode.py: its peak RSS growth and CPU
time for the decode alone, at reduced scale (as pinsface decodes photos) or whole (Pillow alone)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) through exec.
_CHILD = """
import sys, time
from pinsface import images
def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
data = open(sys.argv[1], "rb").read()
images._pyvips()
import cv2  # loaded before the measure, as the JPEG path loads it too
if sys.argv[2] == "whole":
    images._decode_shrunk = images._decode_raw_bands = lambda *args: None
before, cpu = peak(), time.process_time()
view = images.decode_scaled(data, min_side=int(sys.argv[3]))
print(view.pixels.shape[1], view.pixels.shape[0], peak() - before, time.process_time() - cpu)
"""


@dataclass
class DecodeCost:
    size: tuple[int, int]  # (width, height) decoded
    peak_growth: int  # bytes
    cpu_seconds: float


def decode_in_fresh_process(path, how: str, min_side: int, timeout: float = 300) -> DecodeCost:
    """``how``: "reduced" or "whole". Raises ``RuntimeError`` with the child's error output if it fails."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), how, str(min_side)], capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    width, height, grown, cpu = out.stdout.split()
    return DecodeCost((int(width), int(height)), int(grown), float(cpu))

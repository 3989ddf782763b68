"""Stage timings: wall-clock seconds, and how much of the machine's cores each stage kept busy."""

from __future__ import annotations

import os
import time


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class StageClock:
    """``mark()`` at a stage's start, ``record(name, mark)`` at its end. ``seconds`` holds each stage's wall time,
    ``cpu_share`` the process's CPU time over that wall time and all the cores (1.0: every core busy)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_share: dict[str, float] = {}

    @staticmethod
    def mark() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def record(self, name: str, mark: tuple[float, float]) -> float:
        wall, cpu = time.perf_counter() - mark[0], time.process_time() - mark[1]
        self.seconds[name] = round(wall, 2)
        self.cpu_share[name] = round(cpu / (wall * cores()), 2) if wall > 0 else 0.0
        return wall

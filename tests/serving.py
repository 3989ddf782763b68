"""Helpers for the server tests: a real uvicorn on 127.0.0.1 (in a thread or a process) and photo uploads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from pinsface.testing.servers import free_port, wait_healthy  # noqa: F401  (the tests import them from here)

API_KEY = "test-key-0123456789abcdef"


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a run folder: enrol/forget change it."""
    shutil.copytree(run_dir, dest)
    return dest


class ThreadServer:
    """``create_app(...)`` served by a real uvicorn on 127.0.0.1 in a thread, for the length of a ``with``."""

    def __init__(self, app, port: int | None = None, guarded: bool = False):
        """``guarded``: with the connection caps and header timeout of ``pinsface serve`` (serve/limits.py)."""
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        extra = {}
        if guarded:
            from pinsface.serve.limits import guarded_protocol

            state = app.state.pinsface
            extra["http"] = guarded_protocol(state.counts, state.settings.header_timeout_s)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", **extra)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 180
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def start_process(run_dir: Path, port: int, *args: str, log: Path) -> subprocess.Popen:
    """``pinsface serve`` in its own process (so it can be killed for real)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pinsface.cli", "serve", str(run_dir), "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def uploads(paths, field: str = "files") -> list:
    """httpx multipart ``files=`` for photo paths (or (name, bytes) pairs)."""
    out = []
    for p in paths:
        if isinstance(p, tuple):
            name, data = p
        else:
            name, data = Path(p).name, Path(p).read_bytes()
        out.append((field, (name, data, "application/octet-stream")))
    return out

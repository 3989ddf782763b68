"""Child processes whose output goes to temporary files, never to pipes: a pipe nobody reads while the test
waits (for the child, for another child holding a lock, for a database row) blocks the child once it is full,
and a run with more warnings on stderr (older library versions, say) would hang."""

from __future__ import annotations

import subprocess
import tempfile


def start(cmd: list[str], **kw) -> subprocess.Popen:
    """``cmd`` started with its stdout and stderr in temporary files (read them with ``finish``)."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, **kw)
    proc.output_files = (out, err)
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """(stdout, stderr) of a process from ``start``, once it has exited (within ``timeout`` seconds)."""
    proc.wait(timeout)
    texts = []
    for f in proc.output_files:
        f.seek(0)
        texts.append(f.read().decode(errors="replace"))
        f.close()
    return texts[0], texts[1]

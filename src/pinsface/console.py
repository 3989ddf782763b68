"""What the command line shows on the user's terminal, decided in one place."""

from __future__ import annotations

import sys


def show_progress(no_progress: bool = False) -> bool:
    """Progress bars only on a terminal, and never with ``--no-progress``: a log file or a pipe gets none."""
    return not no_progress and sys.stderr.isatty()

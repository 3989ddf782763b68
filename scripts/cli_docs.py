"""Write docs/cli.md from the command's own --help texts (`make docs`); tests/test_docs.py fails when it drifts.

python scripts/cli_docs.py            # rewrite docs/cli.md
python scripts/cli_docs.py --check    # exit 1 when docs/cli.md differs from what --help says
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = "100"  # argparse wraps help to the terminal's width: a fixed one keeps the file the same everywhere

HEADER = """# The `pinsface` command

Generated from `pinsface --help` by `scripts/cli_docs.py`; do not edit by hand (`make docs` rewrites it).

Exit codes: 0 done, 1 an error at run time, 2 a usage error, 130 interrupted (Ctrl-C). `-v` (log more) is
accepted anywhere on the line. Commands that print results take `--json`.
"""


def render() -> str:
    os.environ["COLUMNS"] = WIDTH
    from pinsface.cli import build_parser

    parser = build_parser()
    parts = [HEADER, "## pinsface\n", "```\n" + parser.format_help() + "```\n"]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        parts.append(f"## pinsface {name}\n")
        parts.append("```\n" + command.format_help() + "```\n")
    return "\n".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is out of date: run python scripts/cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

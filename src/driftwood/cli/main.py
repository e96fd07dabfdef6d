"""Entry point: ``driftwood <command> ...``.

Errors Driftwood raises on purpose print as one readable line (no traceback) and exit 1;
``DRIFTWOOD_DEBUG=1`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from driftwood import __version__
from driftwood.errors import DriftwoodError

# Subcommand modules; each has register(subparsers) that sets `func` on its parser.
COMMANDS = ["build", "demo", "generate", "run", "resume", "snapshot", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="driftwood", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"driftwood {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"driftwood.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"driftwood.cli.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DriftwoodError as exc:
        if os.environ.get("DRIFTWOOD_DEBUG"):
            raise
        print(f"driftwood: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("driftwood: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

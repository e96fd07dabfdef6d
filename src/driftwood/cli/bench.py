"""``driftwood bench NAME``: run a benchmark; each prints a table and writes JSON."""

from __future__ import annotations

import argparse
import importlib

# name -> module exposing add_arguments(parser) and run(args) -> int
BENCHES = {
    "zerocopy": "driftwood.bench.zerocopy",
    "decode": "driftwood.bench.decode",
    "boundary": "driftwood.bench.boundary",
    "snapshot": "driftwood.bench.snapshot",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON)")
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module_name in BENCHES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        b = benches.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(b)
        b.set_defaults(func=module.run)

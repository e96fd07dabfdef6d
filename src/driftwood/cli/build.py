"""``driftwood build x.c -o x.wasm``: compile a C guest with the bundled Zig toolchain."""

from __future__ import annotations

import argparse
import time

from driftwood import toolchain


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="compile a C guest to wasm32-wasi (cached)")
    p.add_argument("source", help="C source file, or the name of a bundled guest (gemm, chat, ...)")
    p.add_argument("-o", "--output", help="output .wasm (default: next to the source)")
    p.add_argument("-I", dest="include", action="append", default=[], help="extra include folder")
    p.add_argument("--no-cache", action="store_true", help="rebuild even if cached")
    p.add_argument("--flag", dest="flags", action="append", default=[], help="extra compiler flag (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    source = Path(args.source)
    if not source.exists() and not source.suffix:
        source = toolchain.example(args.source)
    output = Path(args.output) if args.output else Path(source.stem + ".wasm")
    start = time.perf_counter()
    out = toolchain.build(source, output, flags=args.flags, include_dirs=args.include, use_cache=not args.no_cache)
    print(f"built {out} ({out.stat().st_size} bytes) in {time.perf_counter() - start:.1f} s")
    return 0

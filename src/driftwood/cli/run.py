"""``driftwood run guest.wasm [args...]``: run a guest as a sandboxed actor.

The guest's stdio passes through and its exit code is the command's. It gets no files unless
a directory is mapped (``--dir HOST::GUEST``), no network, no host environment unless passed
with ``--env``. Models it may open: ``default`` (``--model``, SmolLM2 unless named) and each
``--nn-preload NAME:GGML:AUTO:PATH``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from driftwood.errors import DriftwoodError, GuestTrap

if TYPE_CHECKING:
    from driftwood.runtime import ActorSpec
    from driftwood.runtime.module import GuestModule


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a guest (.wasm, a .c source, or a bundled guest's name)",
                       description=__doc__.splitlines()[0] if __doc__ else None)
    add_actor_arguments(p)
    p.add_argument("guest", help="guest.wasm, guest.c (built first), or a bundled guest (chat, gemm, ...)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the guest")
    p.set_defaults(func=run)


def add_actor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="the model guests open as 'default' (name or GGUF path)")
    p.add_argument("--nn-preload", action="append", default=[], metavar="NAME:GGML:AUTO:PATH",
                   help="a named model for wasi-nn guests (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", help="compute dtype: float32, bfloat16, float16")
    p.add_argument("--fuel", type=int, help="wasm fuel units the guest may burn")
    p.add_argument("--timeout", type=float, help="wall-clock seconds the guest may run")
    p.add_argument("--max-memory", type=int, default=1024, metavar="MiB", help="linear memory cap (default 1024)")
    p.add_argument("--dir", action="append", default=[], metavar="HOST::GUEST", help="map a host directory")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set a guest variable")
    p.add_argument("--backtrace", action="store_true", help="print the wasm backtrace when the guest traps")
    p.add_argument("--snapshot-dir", metavar="DIR", help="snapshot the actor here when it asks, and on exit")
    p.add_argument("--snapshot-key", metavar="FILE", help="sign (and check) snapshots with this HMAC key")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def guest_path(name: str) -> Path:
    """A .wasm path as given; a .c source or a bundled guest name is built first."""
    from driftwood import toolchain

    path = Path(name)
    if path.suffix == ".c":
        return toolchain.build(path)
    if path.exists() or path.suffix:
        return path
    return toolchain.build_example(name)


def actor_spec(args: argparse.Namespace, guest_args: list[str], module: GuestModule | None = None) -> ActorSpec:
    """The actor the options describe; ``module``, when given, instead of ``args.guest``."""
    from driftwood.runtime import ActorSpec
    from driftwood.runtime.actor import Limits, MiB, WasiOptions
    from driftwood.runtime.models import ModelPool, Preload
    from driftwood.runtime.module import GuestModule

    device = resolve_device(args.device)
    pool = ModelPool(device, args.dtype, progress=True)
    pool.add("default", args.model)
    for text in args.nn_preload:
        pool.add_preload(Preload.parse(text))
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DriftwoodError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    dirs = []
    for item in args.dir:
        host, sep, guest = item.partition("::")
        if not sep or not host or not guest:
            raise DriftwoodError(f"--dir {item!r}: expected HOST::GUEST")
        dirs.append((host, guest))
    if module is None:
        module = GuestModule.load(guest_path(args.guest), fuel=args.fuel is not None)
    limits = Limits(max_memory=args.max_memory * MiB, fuel=args.fuel, timeout=args.timeout)
    wasi = WasiOptions(args=guest_args, env=env, stdin="inherit", dirs=dirs)
    return ActorSpec(module=module, pool=pool, device=device, limits=limits, wasi=wasi)


def run(args: argparse.Namespace) -> int:
    from driftwood.runtime import spawn

    guest_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    spec = actor_spec(args, guest_args)
    try:
        if args.snapshot_dir:
            from driftwood.snapshot.actor import run_with_snapshots

            return run_with_snapshots(spec, args.snapshot_dir, key_file=args.snapshot_key)
        with spawn(spec) as actor:
            return actor.run()
    except GuestTrap as trap:
        print(f"driftwood: error: {trap}", file=sys.stderr)
        if args.backtrace and trap.backtrace:
            print("wasm backtrace:\n" + trap.backtrace, file=sys.stderr)
        return 1

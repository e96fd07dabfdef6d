"""``driftwood demo gemm``: a C guest's matrices multiplied by the accelerator in place."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a bundled demonstration")
    demos = p.add_subparsers(dest="demo", required=True, metavar="DEMO")
    g = demos.add_parser("gemm", help="zero-copy GEMM: the accelerator works in the guest's memory")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--size", type=int, default=128, help="matrix size n (n×n, default 128)")
    g.add_argument("--seed", type=int, default=None, help="input seed (default: random)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g.set_defaults(func=run_gemm)


def gemm(device: str, size: int = 128, seed: int | None = None, echo: bool = True) -> dict[str, Any]:
    """Build and run the GEMM guest; returns what it reported and the pointer identity."""
    from driftwood.runtime.abi.native import NativeABI
    from driftwood.runtime.actor import Actor, WasiOptions
    from driftwood.runtime.module import GuestModule
    from driftwood.toolchain import build_example

    seed = secrets.randbits(32) if seed is None else seed
    wasm = build_example("gemm")
    module = GuestModule.load(wasm)
    lines: list[str] = []

    def stdout(data: bytes) -> None:
        text = data.decode(errors="replace")
        lines.append(text)
        if echo:
            sys.stdout.write(text)
            sys.stdout.flush()

    with Actor(module, device=device, wasi=WasiOptions(args=[str(seed), str(size)], stdout=stdout),
               host_modules=[NativeABI]) as actor:
        exit_code = actor.run()
        native = actor.hosts[0]
        assert isinstance(native, NativeABI)
        record = native.last_gemm
        assert actor.arena is not None
        identity = actor.backend.identity(actor.arena)
        committed = actor.arena.committed
    report = "".join(lines)
    errors = total = None
    for line in report.splitlines():
        if line.startswith("gemm ") and " errors of " in line:
            head, _, tail = line.partition(" errors of ")
            errors, total = int(head.rsplit(maxsplit=1)[-1]), int(tail.split()[0])
    return {
        "device": device,
        "size": size,
        "seed": seed,
        "module_sha256": module.digest,
        "exit_code": exit_code,
        "errors": errors,
        "elements": total,
        "arena_committed_bytes": committed,
        "operands_zero_copy": bool(record and record.zero_copy),
        "operand_addresses": None if record is None else {
            "guest": [hex(a) for a in record.guest_addresses],
            "device": [hex(a) for a in record.device_addresses],
        },
        "pointer_identity": identity.as_dict(),
    }


def run_gemm(args: argparse.Namespace) -> int:
    result = gemm(args.device, args.size, args.seed, echo=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
        return result["exit_code"]
    ident = result["pointer_identity"]
    ops = result["operand_addresses"]
    print(f"device            {result['device']}")
    print(f"guest memory      {ident['guest_base']} ({result['arena_committed_bytes'] / 2**20:.1f} MiB committed arena)")
    print(f"accelerator sees  {ident['accelerator_address']}")
    if ops:
        print(f"GEMM operands     guest {', '.join(ops['guest'])}")
        print(f"                  device {', '.join(ops['device'])}")
    same = ident["identical"] and result["operands_zero_copy"]
    print(f"pointer identity  {'true' if same else 'FALSE'} (same address, and writes on each side seen on the other)")
    if result["errors"] is None:
        print("result            the guest reported no result")
        return result["exit_code"] or 1
    print(f"result            {result['errors']} errors of {result['elements']}")
    return result["exit_code"]

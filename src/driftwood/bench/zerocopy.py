"""Zero-copy vs copy: memory cost and GEMM time of handing guest memory to the accelerator.

For a 16 MiB region of a real guest's linear memory (a Wasmtime store whose memory is an
arena), two ways to give its bytes to the accelerator:

- **copy**: what Wasmtime users do without Driftwood — ``Memory.read`` copies the bytes out
  of guest memory, and ``torch.frombuffer(...).to(device)`` makes the accelerator tensor (on
  CUDA a second copy, into device memory); results go back with ``Memory.write``.
- **zero-copy**: ``Backend.tensor`` views the arena itself (on CUDA: pages registered as
  mapped host memory), and the kernel writes its result into guest memory.

Each memory measurement runs in a fresh interpreter that first warms up (imports, CUDA
context, both paths once at full size, then the allocator's cache handed back), so library
loading stays out of the deltas and no allocator cache from an earlier trial hides a copy.
The deltas are taken when the accelerator holds its tensor (the hand-off), and again after a
kernel has read every byte (a reduction, whose scratch space on CUDA is the same for both
paths and no part of either).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from driftwood.errors import DriftwoodError

REGION = 16 << 20  # bytes
OFFSET = 64 << 10  # where the region starts in guest memory
MiB = float(1 << 20)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--size", type=int, default=128, help="GEMM size n for the timing (default 128)")
    p.add_argument("--iters", type=int, default=200, help="timed GEMMs per path (default 200)")
    p.add_argument("--json", dest="json_path", help="where to write the JSON result")
    p.add_argument("--child", choices=["copy", "zerocopy"], help=argparse.SUPPRESS)


# -- measuring one path in a fresh process ----------------------------------------------------


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _device_used(device: str) -> tuple[int, int, int]:
    """Device bytes in use: as the driver reports, reserved by torch, allocated by torch."""
    import torch

    if not device.startswith("cuda"):
        return 0, 0, 0
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free, torch.cuda.memory_reserved(), torch.cuda.memory_allocated()


def _region_actor(device: str, size: int) -> Any:
    import wasmtime

    from driftwood.runtime.actor import Actor, WasiOptions
    from driftwood.runtime.module import GuestModule

    pages = (OFFSET + size + 65535) // 65536
    wat = f'(module (memory (export "memory") {pages}))'
    module = GuestModule.load(wasmtime.wat2wasm(wat), name="region.wasm")
    return Actor(module, device=device, wasi=WasiOptions(stdout=None, stderr=None))


def _warm_up(device: str) -> None:
    """Run both paths once at full size, then hand cached device memory back to the driver.

    On CUDA the first kernel of a kind loads its module (device memory) and a large
    reduction allocates scratch space; neither belongs to either path's cost.
    """
    import torch

    from driftwood.memory.backends import get_backend

    actor = _region_actor(device, REGION)
    assert actor.arena is not None
    view = get_backend(device).tensor(actor.arena, OFFSET, (REGION // 4,), torch.float32)
    view.sum(dtype=torch.float64).item()
    copied = torch.frombuffer(actor.exports["memory"].read(actor.store, OFFSET, OFFSET + REGION), dtype=torch.float32)
    copied.to(device).sum(dtype=torch.float64).item()
    del view, copied
    actor.close()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure_child(path: str, device: str) -> dict[str, Any]:
    import ctypes

    import numpy as np
    import torch

    # Pin glibc's mmap threshold (setting it disables its dynamic growth), so every large
    # allocation is a fresh mapping: a copy can't hide in memory a warm-up freed.
    ctypes.CDLL(None).mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    _warm_up(device)
    actor = _region_actor(device, REGION)
    arena = actor.arena
    count = REGION // 4
    data = arena.numpy(OFFSET, count, np.float32)
    data[:] = np.random.default_rng().standard_normal(count, dtype=np.float32)
    expected = float(data.astype(np.float64).sum())
    gc.collect()
    rss0, (dev0, reserved0, alloc0) = _rss(), _device_used(device)
    t0 = time.perf_counter()
    if path == "copy":
        memory = actor.exports["memory"]
        host = memory.read(actor.store, OFFSET, OFFSET + REGION)  # bytearray: copy 1
        tensor = torch.frombuffer(host, dtype=torch.float32).to(device)  # device copy on CUDA
    else:
        tensor = actor.backend.tensor(arena, OFFSET, (count,), torch.float32)
    seconds = time.perf_counter() - t0
    # the hand-off's cost: what exists now that the accelerator holds a tensor of the bytes
    rss1, (dev1, reserved1, alloc1) = _rss(), _device_used(device)
    total = float(tensor.sum(dtype=torch.float64).item())  # the accelerator reads every byte
    # and after a kernel read them all (on CUDA the reduction's own scratch shows here)
    rss2, (dev2, _, _) = _rss(), _device_used(device)
    result = {
        "path": path,
        "rss_delta_bytes": rss1 - rss0,
        "device_delta_bytes": dev1 - dev0,
        "torch_reserved_delta_bytes": reserved1 - reserved0,
        "torch_allocated_delta_bytes": alloc1 - alloc0,
        "rss_delta_after_read_bytes": rss2 - rss0,
        "device_delta_after_read_bytes": dev2 - dev0,
        "tensor_address": tensor.data_ptr(),
        "guest_address": arena.base + OFFSET,
        "checksum_ok": abs(total - expected) <= 1e-6 * max(1.0, abs(expected)) + 1e-3,
        "handoff_ms": seconds * 1e3,
    }
    del tensor
    actor.close()
    return result


def _run_child(path: str, device: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "driftwood.bench.zerocopy", "--device", device, "--child", path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DriftwoodError(f"zerocopy child ({path}) failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- GEMM timing --------------------------------------------------------------------------


def time_gemm(device: str, n: int, iters: int) -> dict[str, dict[str, float]]:
    """Median time per n×n GEMM on guest memory, by each path (synchronized, warmed up)."""
    import numpy as np
    import torch

    actor = _region_actor(device, 3 * n * n * 4)
    mem = actor.memory
    memory = actor.exports["memory"]
    store = actor.store
    nbytes = n * n * 4
    a, b, c = OFFSET, OFFSET + nbytes, OFFSET + 2 * nbytes
    rng = np.random.default_rng()
    for ptr in (a, b):
        actor.arena.numpy(ptr, n * n, np.float32)[:] = rng.standard_normal(n * n, dtype=np.float32)
    ref = actor.arena.numpy(a, n * n, np.float32).reshape(n, n).astype(np.float64) @ \
        actor.arena.numpy(b, n * n, np.float32).reshape(n, n).astype(np.float64)
    backend = actor.backend
    dev = backend.device

    def copy_path() -> None:
        ta = torch.frombuffer(memory.read(store, a, a + nbytes), dtype=torch.float32).view(n, n).to(dev)
        tb = torch.frombuffer(memory.read(store, b, b + nbytes), dtype=torch.float32).view(n, n).to(dev)
        tc = ta @ tb
        memory.write(store, tc.cpu().numpy().tobytes(), c)

    def zero_copy_path() -> None:
        ta = mem.tensor(a, (n, n), torch.float32, device=True)
        tb = mem.tensor(b, (n, n), torch.float32, device=True)
        tc = mem.tensor(c, (n, n), torch.float32, device=True)
        torch.matmul(ta, tb, out=tc)
        backend.synchronize()

    out: dict[str, dict[str, float]] = {}
    for name, fn in (("copy", copy_path), ("zero-copy", zero_copy_path)):
        actor.arena.numpy(c, n * n, np.float32)[:] = np.nan  # poison: every element must be written
        for _ in range(max(10, iters // 10)):
            fn()
        got = actor.arena.numpy(c, n * n, np.float32).reshape(n, n).astype(np.float64)
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - t0)
        out[name] = {"median_us": statistics.median(samples) / 1e3, "rel_error_vs_f64": rel}
    actor.close()
    return out


# -- the command --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.child:
        print(json.dumps(measure_child(args.child, args.device)))
        return 0

    from driftwood.bench.report import default_path, environment, format_table, progress, write_json
    from driftwood.cli.demo import gemm

    env = environment(args.device)
    progress(f"zerocopy: {env['device_name']}: measuring the copy path in a fresh process ...")
    copy = _run_child("copy", args.device)
    progress("zerocopy: measuring the zero-copy path in a fresh process ...")
    zero = _run_child("zerocopy", args.device)
    progress(f"zerocopy: timing {args.size}x{args.size} GEMMs on both paths ...")
    timing = time_gemm(args.device, args.size, args.iters)
    progress("zerocopy: running the GEMM guest ...")
    demo = gemm(args.device, 128, echo=False)

    rows = []
    for name, child in (("copy", copy), ("zero-copy", zero)):
        rows.append({
            "path": name,
            "rss_delta_mib": child["rss_delta_bytes"] / MiB,
            "device_delta_mib": child["device_delta_bytes"] / MiB,
            "torch_alloc_delta_mib": child["torch_allocated_delta_bytes"] / MiB,
            "rss_delta_after_read_mib": child["rss_delta_after_read_bytes"] / MiB,
            "device_delta_after_read_mib": child["device_delta_after_read_bytes"] / MiB,
            "handoff_ms": child["handoff_ms"],
            "same_address": child["tensor_address"] == child["guest_address"],
            "checksum_ok": child["checksum_ok"],
            "gemm_us": timing[name]["median_us"],
            "gemm_rel_err": timing[name]["rel_error_vs_f64"],
        })
    result = {
        "benchmark": "zerocopy",
        "environment": env,
        "region_bytes": REGION,
        "gemm_size": args.size,
        "gemm_iters": args.iters,
        "paths": rows,
        "pointer_identity": demo["pointer_identity"],
        "gemm_guest": {k: demo[k] for k in ("errors", "elements", "exit_code", "operands_zero_copy", "seed")},
    }
    print(f"zero-copy benchmark — {env['device_name']}, {REGION >> 20} MiB region, {args.size}x{args.size} GEMM")
    print(format_table(rows, [
        ("path", "path"), ("rss_delta_mib", "RSS Δ MiB"), ("device_delta_mib", "device Δ MiB"),
        ("device_delta_after_read_mib", "device Δ after a read"),
        ("handoff_ms", "hand-off ms"), ("same_address", "same address"), ("checksum_ok", "checksum"),
        ("gemm_us", f"GEMM {args.size} µs"), ("gemm_rel_err", "GEMM rel err"),
    ]))
    ident = demo["pointer_identity"]
    print(f"pointer identity: {str(ident['identical']).lower()} (guest {ident['guest_base']}, "
          f"accelerator {ident['accelerator_address']}); GEMM guest: {demo['errors']} errors of {demo['elements']}")
    path = write_json(result, args.json_path or default_path("zerocopy", args.device, env))
    print(f"wrote {path}")
    ok = demo["errors"] == 0 and ident["identical"] and all(r["checksum_ok"] for r in rows)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m driftwood.bench.zerocopy")
    add_arguments(p)
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())

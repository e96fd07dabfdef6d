"""Shared fixtures. GPU tests skip cleanly where torch sees no CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def wat_module(text: str, name: str = "test.wasm", *, fuel: bool = False):
    """A real guest compiled by Wasmtime from the text format."""
    import wasmtime

    from driftwood.runtime.module import GuestModule

    return GuestModule.load(wasmtime.wat2wasm(text), name=name, fuel=fuel)


def quiet():
    """WASI options for a guest whose output we don't need."""
    from driftwood.runtime.actor import WasiOptions

    return WasiOptions(stdout=None, stderr=None)


def vm_size() -> int:
    """This process's virtual size in bytes (reservations count, resident or not)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


def forwarder(module: str, signatures: dict[str, int], pages: int) -> str:
    """A WAT guest that exports one function per import of ``module`` and forwards its raw
    i32 arguments, so a test can call host functions from a real guest with any values."""
    imports, exports = [], []
    for name, n in signatures.items():
        params = f"(param {' '.join(['i32'] * n)})" if n else ""
        args = " ".join(f"(local.get {i})" for i in range(n))
        imports.append(f'(import "{module}" "{name}" (func ${name} {params} (result i32)))')
        exports.append(f'(func (export "{name}") {params} (result i32) (call ${name} {args}))')
    memory = f'(memory (export "memory") {pages} {pages})'
    return "(module\n" + "\n".join([*imports, memory, *exports]) + ")"


def noisy_call(driver, size: int, seed: int, layout, name: str, args) -> tuple[int, np.ndarray]:
    """Fill the guest's first ``size`` bytes with seeded noise, write ``layout`` ((offset,
    bytes) pairs) over it, call ``name(*args)`` through ``driver``; returns the result and the
    offsets of the bytes the call changed."""
    whole = driver.actor.arena.numpy(0, size)
    whole[:] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    for offset, data in layout:
        driver.mem.write(offset, data)
    before = whole.copy()
    rc = driver(name, *args)
    return rc, np.flatnonzero(whole != before)


def stray_writes(changed, ranges, size: int):
    """The changed offsets outside every (offset, length) range (u32 offsets wrap)."""
    allowed = np.zeros(size, dtype=bool)
    for offset, length in ranges:
        allowed[offset % 2**32 : offset % 2**32 + length] = True
    return changed[~allowed[changed]]

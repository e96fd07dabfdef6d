"""Native CPU kernels: the decode step's products with weights kept in 4-bit or 8-bit blocks.

``gemv.cpp`` (read its header for the math and the code layouts) is a torch C++ extension,
compiled on first use with the machine's C++ compiler and cached under the driftwood cache
(:func:`driftwood.paths.cache_root`), keyed by the source, the torch installation and the flags. It
registers ``torch.ops.driftwood.gemv``, which ``torch.compile`` calls like any aten op.

It needs an x86-64 CPU with AVX-512 VNNI (the instruction that makes it fast). Where that, or a
compiler, is missing, :func:`available` is False and the weights fall back to torch's own
int4/int8 weight-only kernels (:mod:`driftwood.model.weights`). ``DRIFTWOOD_NATIVE=0`` turns
the kernels off.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from driftwood.model.gguf import Blocks
from driftwood.native import build, cpu_flags

SOURCE = Path(__file__).with_name("gemv.cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-fopenmp")


_ENABLED = contextvars.ContextVar("driftwood_native_cpu", default=True)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Models loaded inside use torch's kernels instead (benchmarks compare the two)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """Whether weights loaded now should use the kernels: available and not :func:`disabled`."""
    return _ENABLED.get() and available()


@functools.cache
def available() -> bool:
    """Build or load the kernels once per process; False where they cannot run here."""
    if os.environ.get("DRIFTWOOD_NATIVE", "1") == "0":
        return False
    if platform.machine() not in ("x86_64", "AMD64") or not set(CPU_FLAGS) <= cpu_flags():
        return False
    if build("driftwood_cpu", [SOURCE], cflags=CFLAGS, ldflags=["-fopenmp"], python_module=False,
             what="the CPU kernels", seconds=20) is None:
        return False  # no compiler, no ninja, no cache dir: torch's kernels instead
    _register_fake()
    return bool(torch.ops.driftwood.available())


def _register_fake() -> None:
    @torch.library.register_fake("driftwood::gemv")
    def _(x, codes, scale, offset, bits, N):
        return x.new_empty(x.shape[0], N)


@dataclass(frozen=True)
class Packed:
    """An (N, K) matrix in the kernel's layout (``gemv.cpp``): ``w = scale * u + offset`` per
    block of 32 columns, rows in groups of 16."""

    codes: torch.Tensor  # (R, K / 32 * 8 * bits) uint8, R = ceil(N / 16)
    scale: torch.Tensor  # (R, K / 32, 16) float32
    offset: torch.Tensor  # (R, K / 32, 16) float32
    bits: int
    out_features: int


def can_pack(blocks: Blocks) -> bool:
    return blocks.group == 32 and blocks.q.dtype in (torch.uint8, torch.int8)


def pack(blocks: Blocks) -> Packed:
    """Codes and scales from :func:`driftwood.model.gguf.unpack` (4-bit codes 0..15 as uint8, or
    8-bit codes as int8) in the layout ``gemv.cpp`` reads."""
    q, scale = blocks.q, blocks.scale.to(torch.float32)
    offset = blocks.offset.to(torch.float32) if blocks.offset is not None else torch.zeros_like(scale)
    N, K = q.shape
    G, R = K // 32, -(-N // 16)
    if q.dtype == torch.int8:  # 8-bit: u = q + 128, w = scale * (u - 128) (+ offset)
        bits, u, offset = 8, (q.to(torch.int16) + 128).to(torch.uint8), offset - 128.0 * scale
    else:
        bits, u = 4, q
    pad = R * 16 - N  # zero rows: zero codes, scales and offsets
    u = torch.nn.functional.pad(u, (0, 0, 0, pad))
    scale, offset = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (scale, offset))
    chunks = u.view(R, 16, G, 8, 4).permute(0, 2, 3, 1, 4)  # (R, G, chunk, row, byte)
    if bits == 4:  # chunk c in the low nibbles, chunk c + 4 in the high ones
        chunks = chunks[:, :, :4] | (chunks[:, :, 4:] << 4)
    lanes = [t.view(R, 16, G).transpose(1, 2).contiguous() for t in (scale, offset)]
    return Packed(chunks.reshape(R, -1).contiguous(), lanes[0], lanes[1], bits, N)


def gemv(x: torch.Tensor, w: Packed) -> torch.Tensor:
    """(M, K) activations times the packed (N, K) matrix -> (M, N), in x's dtype."""
    return torch.ops.driftwood.gemv(x, w.codes, w.scale, w.offset, w.bits, w.out_features)

"""Native chunk I/O for restoring sessions (``chunks.cpp``).

Reading a 4,096-token snapshot of SmolLM2 is 94 MB of ``preadv`` and xxh3: in Python that is
~2,900 GIL-holding hash calls after as many reads on one core. Here every chunk file of a
restore is read, hashed and placed in one call, on torch's intra-op threads, and payloads
already in memory are copied the same way; restores into a GPU cache (or another dtype) read
whole files into staging buffers with :func:`read_files`. The functions below check every
address range against the tensors before calling in; the caller still compares headers,
digests and token ids with the manifest before the session adopts the bytes.

Compiled on first use like the CPU kernels (:mod:`driftwood.native`); where that fails, or
with ``DRIFTWOOD_NATIVE=0``, :func:`module` is None and restores take the Python path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch

from driftwood.native import build, cpu_flags

SOURCE = Path(__file__).with_name("chunks.cpp")


@functools.cache
def module() -> ModuleType | None:
    if os.environ.get("DRIFTWOOD_NATIVE", "1") == "0":
        return None
    # -fopenmp: at::parallel_for runs on torch's own OpenMP threads (one runtime: the same
    # libgomp); the widest vectors this CPU has for xxh3 (AVX-512: hashing 94 MB costs 1.5 ms
    # on top of the reads instead of 2.7 ms with SSE2's)
    flags = cpu_flags()
    simd = ("-mavx512f", "-mavx2") if "avx512f" in flags else ("-mavx2",) if "avx2" in flags else ()
    built = build("driftwood_snapshot", [SOURCE], cflags=("-O3", *simd, "-fopenmp"), ldflags=("-fopenmp",),
                  what="the snapshot reader", seconds=15)
    return built if isinstance(built, ModuleType) else None


@dataclass(frozen=True)
class Span:
    """A chunk's token positions: ``[start, start + count)``."""

    start: int
    count: int


@dataclass(frozen=True)
class FileChunk(Span):
    fd: int  # an open chunk file, read from offset 0
    header_bytes: int


@dataclass(frozen=True)
class ChunkRead:
    """What :func:`read_chunks` found in one file (unchecked: compare it with the manifest)."""

    header: bytes
    digest: str  # xxh3-128, hex, as python-xxhash's hexdigest
    ids: np.ndarray  # int32 token ids
    error: int  # 0; -1: the file ended early; else an errno


class _Cache(NamedTuple):
    """The cache's geometry in chunks.cpp's argument order (``Cache`` there), in bytes."""

    k: int  # address of k at (layer 0, the row, head 0, position 0)
    v: int
    layers: int
    heads: int
    layer_stride: int
    head_stride: int
    row_bytes: int


def _cache_args(k: torch.Tensor, v: torch.Tensor, row: int, spans: Sequence[Span]) -> _Cache:
    """The geometry of a (n_layers, batch, n_kv_heads, capacity, head_dim) CPU cache at batch
    row ``row``, checked to hold every span."""
    if not (k.device.type == v.device.type == "cpu" and k.dim() == 5 and k.shape == v.shape
            and k.stride() == v.stride() and k.dtype == v.dtype):
        raise ValueError("k and v must be CPU caches of one (layers, batch, heads, capacity, dim) shape")
    L, B, H, capacity, D = k.shape
    if k.stride(4) != 1 or k.stride(3) != D:
        raise ValueError("the cache's (capacity, dim) rows must be contiguous")
    if not 0 <= row < B:
        raise ValueError(f"row {row} of a batch of {B}")
    for s in spans:
        if s.start < 0 or s.count < 0 or s.start + s.count > capacity:
            raise ValueError(f"positions [{s.start}, {s.start + s.count}) outside a cache of {capacity}")
    es = k.element_size()
    return _Cache(k.data_ptr() + row * k.stride(1) * es, v.data_ptr() + row * v.stride(1) * es, L, H,
                  k.stride(0) * es, k.stride(2) * es, D * es)


def _built() -> ModuleType:
    mod = module()
    if mod is None:
        raise RuntimeError("the native snapshot reader is not available")
    return mod


def read_chunks(files: Sequence[FileChunk], k: torch.Tensor, v: torch.Tensor, row: int = 0) -> list[ChunkRead]:
    """Read whole chunk files (header | k planes | v planes | int32 ids) into the cache, each
    hashed with xxh3-128 as it is read."""
    mod = _built()
    cache = _cache_args(k, v, row, files)
    headers = [np.empty(f.header_bytes, np.uint8) for f in files]
    ids = [np.empty(f.count, np.int32) for f in files]
    digests, errors = mod.read_chunks(
        [f.fd for f in files], [h.ctypes.data for h in headers], [f.header_bytes for f in files],
        [f.start for f in files], [f.count for f in files], [i.ctypes.data for i in ids], *cache)
    return [ChunkRead(h.tobytes(), d.hex(), i, e) for h, d, i, e in zip(headers, digests, ids, errors, strict=True)]


def read_files(files: Sequence[tuple[int, torch.Tensor]]) -> list[tuple[str, int]]:
    """Read whole files (fd, from offset 0) into host buffers (contiguous uint8 CPU tensors,
    each filled from its start to its end), each hashed with xxh3-128 as it is read. Returns
    (digest as hex, 0 / -1 when the file ended early / errno) per file."""
    mod = _built()
    for _, buf in files:
        if buf.device.type != "cpu" or buf.dtype != torch.uint8 or not buf.is_contiguous():
            raise ValueError("a destination must be a contiguous uint8 CPU tensor")
    digests, errors = mod.read_files([fd for fd, _ in files], [b.data_ptr() for _, b in files],
                                     [b.numel() for _, b in files])
    return [(d.hex(), e) for d, e in zip(digests, errors, strict=True)]


def copy_chunks(payloads: Sequence[tuple[torch.Tensor, Span]], k: torch.Tensor, v: torch.Tensor,
                row: int = 0) -> None:
    """Copy chunk payloads (k planes | v planes, as in a chunk file, uint8 CPU tensors) into
    the cache at their spans."""
    mod = _built()
    cache = _cache_args(k, v, row, [s for _, s in payloads])
    for p, s in payloads:
        need = 2 * cache.layers * cache.heads * s.count * cache.row_bytes
        if p.device.type != "cpu" or p.dtype != torch.uint8 or not p.is_contiguous() or p.numel() < need:
            raise ValueError("a payload must be a contiguous uint8 CPU tensor holding both sides of its chunk")
    mod.copy_chunks([p.data_ptr() for p, _ in payloads], [s.start for _, s in payloads],
                    [s.count for _, s in payloads], *cache)

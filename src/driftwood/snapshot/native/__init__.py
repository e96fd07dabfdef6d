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

import ctypes
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

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
    error: int  # 0; -1: the file ended early; MAP_FAULT: SIGBUS reading it mapped; else an errno


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


def wake() -> None:
    """Wake torch's intra-op threads (they spin a while after running) ahead of a read."""
    _built().wake()


MAP_FAULT = -3  # chunks.cpp's kFault: SIGBUS reading the mapped file (cut short meanwhile, or an I/O error)


def read_chunks(files: Sequence[FileChunk], k: torch.Tensor, v: torch.Tensor, row: int = 0, *,
                map_files: bool = True) -> list[ChunkRead]:
    """Read whole chunk files (header | k planes | v planes | int32 ids) into the cache, each
    hashed with xxh3-128 as it is read: mapped, each page copied once from the page cache into
    a buffer in L1, hashed there and streamed into the cache (``map_files``, falling back per
    file where mapping fails), or with preadv into the planes and hashed there. A status of :data:`MAP_FAULT`: reading the
    mapped file raised SIGBUS (cut short while it was read, or an I/O error), caught."""
    mod = _built()
    cache = _cache_args(k, v, row, files)
    headers = [np.empty(f.header_bytes, np.uint8) for f in files]
    ids = [np.empty(f.count, np.int32) for f in files]
    digests, errors = mod.read_chunks(
        [f.fd for f in files], [h.ctypes.data for h in headers], [f.header_bytes for f in files],
        [f.start for f in files], [f.count for f in files], [i.ctypes.data for i in ids], *cache, map_files)
    return [ChunkRead(h.tobytes(), d.hex(), i, e) for h, d, i, e in zip(headers, digests, ids, errors, strict=True)]


def read_files(files: Sequence[tuple[int, torch.Tensor]]) -> list[tuple[str, int]]:
    """Read whole files (fd, from offset 0) into host buffers (contiguous uint8 CPU tensors,
    each filled from its start to its end), each hashed with xxh3-128 as it is read. Returns
    (digest as hex, 0 / -1 when the file ended early / errno) per file."""
    mod = _built()
    return _results(mod.read_files(*_file_args(files)))


def _file_args(files: Sequence[tuple[int, torch.Tensor]]) -> tuple[list[int], list[int], list[int]]:
    """fds, destination addresses and sizes of whole-file reads, each destination checked."""
    for _, buf in files:
        if buf.device.type != "cpu" or buf.dtype != torch.uint8 or not buf.is_contiguous():
            raise ValueError("a destination must be a contiguous uint8 CPU tensor")
    return [fd for fd, _ in files], [b.data_ptr() for _, b in files], [b.numel() for _, b in files]


def _results(got: tuple[list[bytes], list[int]]) -> list[tuple[str, int]]:
    digests, errors = got
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


CUDA_ERROR = -1000  # chunks.cpp's kCudaError: a status of CUDA_ERROR - r is the driver's error r


@dataclass(frozen=True)
class Driver:
    """What :func:`read_files_to_gpu` queues its copies with, as addresses: the CUDA driver's
    ``cuCtxSetCurrent`` and ``cuMemcpyHtoDAsync_v2`` (or functions of those signatures), the
    context the reading threads make current, and the stream the copies go on."""

    set_context: int
    copy: int
    context: int
    stream: int


@functools.cache
def _libcuda() -> ctypes.CDLL | None:
    if torch.version.hip is not None:  # ROCm builds name their devices "cuda" too
        return None
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def cuda_driver(device: torch.device) -> Driver | None:
    """The driver's entry points, ``device``'s primary context (the one torch's runtime calls
    use) and torch's current stream on ``device``; None where there is no CUDA driver to call
    (then copy with torch after reading)."""
    lib = _libcuda()
    if lib is None:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    handle, ctx = ctypes.c_int(), ctypes.c_void_p()
    if lib.cuDeviceGet(ctypes.byref(handle), index) or lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), handle):
        raise RuntimeError(f"no CUDA context for device {index}")
    lib.cuDevicePrimaryCtxRelease(handle)  # torch's runtime holds it too: it stays alive

    def address(fn: Any) -> int:
        return ctypes.cast(fn, ctypes.c_void_p).value or 0

    return Driver(address(lib.cuCtxSetCurrent), address(lib.cuMemcpyHtoDAsync_v2), ctx.value or 0,
                  torch.cuda.current_stream(device).cuda_stream)


class Payload(NamedTuple):
    """File bytes ``[begin, end)`` that go to ``dst`` (contiguous uint8, ``end - begin`` bytes;
    device memory for the real driver)."""

    dst: torch.Tensor
    begin: int
    end: int


def read_files_to_gpu(files: Sequence[tuple[int, torch.Tensor]], payloads: Sequence[Payload], driver: Driver,
                      step: int) -> list[tuple[str, int]]:
    """:func:`read_files`, and each file's payload queued for its ``dst`` by the thread that
    reads the file: a copy as soon as ``step`` bytes of it are in the host buffer (the rest
    after the file's last piece), before they are hashed. When the call returns every copy is
    queued on ``driver.stream``, none is known to be done, and the host buffers must stay
    untouched until the stream has passed them. A status below -1 is :data:`CUDA_ERROR` minus
    the driver's error. The host buffers must be pinned for the copies to be asynchronous."""
    mod = _built()
    if len(payloads) != len(files):
        raise ValueError("one payload a file")
    args = _file_args(files)
    for (_, buf), p in zip(files, payloads, strict=True):
        if not 0 <= p.begin <= p.end <= buf.numel():
            raise ValueError(f"payload [{p.begin}, {p.end}) outside its {buf.numel()}-byte file")
        if p.dst.dtype != torch.uint8 or not p.dst.is_contiguous() or p.dst.numel() != p.end - p.begin:
            raise ValueError("a payload's destination must be contiguous uint8 of its length")
        if p.dst.device.type == "cuda" and not buf.is_pinned():
            raise ValueError("copies to the GPU read from pinned host buffers")
    if step < 1:
        raise ValueError("step must be at least one byte")
    return _results(mod.read_files_to_gpu(
        *args, [p.dst.data_ptr() for p in payloads], [p.begin for p in payloads], [p.end for p in payloads],
        driver.set_context, driver.copy, driver.context, driver.stream, step))

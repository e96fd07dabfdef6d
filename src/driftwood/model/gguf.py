"""GGUF files: metadata and tensors, memory-mapped. Knows nothing about models.

Parsing is the `gguf` package's (``gguf.GGUFReader``); this module turns its fields into plain
Python values and its tensors into :class:`GGUFTensor` views over the mapped file. Quantized
blocks are unpacked in torch (:func:`unpack`), so the same unpacking serves dequantization and
the quantized-weight kernels; ``gguf.quants.dequantize`` is the reference the tests compare with.

Tensor shapes here are torch order, ``(rows, cols)``: the reverse of GGUF's ``ne`` order. A
linear weight is ``(out_features, in_features)`` and its quant blocks run along ``cols``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from driftwood.errors import ModelError, UnsupportedModel

Q = GGMLQuantizationType
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K})
FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
_TORCH_FLOAT = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


@dataclass(frozen=True)
class Blocks:
    """A quantized tensor unpacked: ``w = q * scale + offset`` per group of ``group`` columns.

    q: (rows, cols) integer codes in element order; scale, offset: (rows, cols // group)
    float32 (offset None means 0).
    """

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    group: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.q.shape
        q = self.q.view(rows, cols // self.group, self.group).to(torch.float32)
        w = q * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.view(rows, cols).to(dtype)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as the file stores it; ``raw`` is a view over the mapped file (no copy)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def bytes_tensor(self) -> torch.Tensor:
        """The stored bytes as a uint8 torch tensor, ``(rows, bytes_per_row)``, sharing the map."""
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return torch.from_numpy(self.raw.reshape(-1).view(np.uint8)).view(rows, -1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor as floats of ``dtype`` (float types of the same dtype share the map)."""
        return dequantize_bytes(self.bytes_tensor(), self.qtype, self.shape[-1], dtype).view(self.shape)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian halves -> (...) float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., n) packed bytes -> (..., 2n): the n low nibbles, then the n high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def unpack(t: GGUFTensor) -> Blocks:
    """Unpack a quantized tensor's blocks into codes and scales (ggml-quants.c layouts)."""
    if t.qtype not in SUPPORTED_TYPES or t.qtype in FLOAT_TYPES:
        raise UnsupportedModel(f"cannot unpack {t.name}: type {t.qtype.name}")
    return unpack_bytes(t.bytes_tensor(), t.qtype, t.shape[-1])


def dequantize_bytes(
    raw: torch.Tensor, qtype: GGMLQuantizationType, cols: int, dtype: torch.dtype
) -> torch.Tensor:
    """(rows, bytes_per_row) uint8 rows of ``qtype`` -> (rows, cols) floats, on any device."""
    if qtype in FLOAT_TYPES:
        return raw.contiguous().view(_TORCH_FLOAT[qtype]).view(raw.shape[0], cols).to(dtype)
    return unpack_bytes(raw, qtype, cols).dequantize(dtype)


def unpack_bytes(raw: torch.Tensor, qtype: GGMLQuantizationType, cols: int) -> Blocks:
    """Unpack ``raw`` (rows, bytes_per_row) uint8 blocks of ``qtype``, on any device."""
    block, size = GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    b = raw.reshape(rows, cols // block, size)  # (rows, blocks, bytes per block)
    if qtype == Q.Q8_0:  # d:f16, q:int8[32]
        q = b[..., 2:].contiguous().view(torch.int8)
        return Blocks(q.reshape(rows, cols), _f16(b[..., 0:2]), None, 32)
    if qtype == Q.Q4_0:  # d:f16, qs[16]; w = d * (q - 8)
        d = _f16(b[..., 0:2])
        return Blocks(_nibbles(b[..., 2:]).reshape(rows, cols), d, -8.0 * d, 32)
    if qtype == Q.Q4_1:  # d:f16, m:f16, qs[16]; w = d * q + m
        q = _nibbles(b[..., 4:]).reshape(rows, cols)
        return Blocks(q, _f16(b[..., 0:2]), _f16(b[..., 2:4]), 32)
    if qtype == Q.Q4_K:  # d, dmin: f16; scales[12] (6-bit sc, m x 8); qs[128]
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        s = b[..., 4:16].reshape(rows, -1, 3, 4)
        sd, sm, smd = s[..., 0, :], s[..., 1, :], s[..., 2, :]
        sc = torch.cat([sd & 0x3F, (smd & 0x0F) | ((sd >> 2) & 0x30)], dim=-1).to(torch.float32)
        mn = torch.cat([sm & 0x3F, (smd >> 4) | ((sm >> 2) & 0x30)], dim=-1).to(torch.float32)
        q = _nibbles(b[..., 16:].reshape(rows, -1, 4, 32))  # 4 chunks of 64 elements
        scale = (d[..., None] * sc).reshape(rows, -1)
        offset = -(dmin[..., None] * mn).reshape(rows, -1)
        return Blocks(q.reshape(rows, cols), scale, offset, 32)
    if qtype == Q.Q6_K:  # ql[128], qh[64], scales:int8[16], d:f16; 16 groups of 16
        ql = b[..., :128].reshape(rows, -1, 2, 64)
        qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32)
        lo = torch.cat([ql & 0x0F, ql >> 4], dim=-1).reshape(rows, -1, 2, 4, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=raw.device).view(4, 1)
        hi = (qh >> shifts) & 0x03
        q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(rows, cols)
        sc = b[..., 192:208].contiguous().view(torch.int8).to(torch.float32)
        scale = (_f16(b[..., 208:210])[..., None] * sc).reshape(rows, -1)
        return Blocks(q, scale, None, 16)
    raise UnsupportedModel(f"cannot unpack type {qtype.name}")


class _Reader(GGUFReader):
    """``GGUFReader`` indexing a plain ndarray view of its map: ``numpy.memmap`` slicing does
    per-slice bookkeeping that makes a 50k-token vocabulary take seconds to read (3.5x here)."""

    _plain: np.ndarray | None = None

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        if self._plain is None:
            self._plain = self.data.view(np.ndarray)
        count, dt = int(count), np.dtype(dtype)
        arr = self._plain[offset : offset + dt.itemsize * count].view(dt)[:count]
        return arr.view(arr.dtype.newbyteorder(override_order or self.byte_order))


class GGUFFile:
    """An open GGUF file: ``metadata`` (plain Python values) and ``tensors`` (by name).

    The file is memory-mapped copy-on-write, so tensor views are writable without ever
    touching the file and without a second copy in RAM. ``close()`` drops this object's
    references; the mapping itself goes away once no tensor view is left.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            reader = _Reader(self.path, "c")
        except FileNotFoundError:
            raise ModelError(f"model file not found: {self.path}") from None
        except (ValueError, OSError, KeyError) as exc:  # the reader's errors for a bad file
            raise ModelError(f"{self.path} is not a readable GGUF file: {exc}") from exc
        self.metadata: dict[str, Any] = {k: f.contents() for k, f in reader.fields.items()}
        self.tensors: dict[str, GGUFTensor] = {}
        for rt in reader.tensors:
            shape = tuple(int(n) for n in reversed(rt.shape.tolist()))
            self.tensors[rt.name] = GGUFTensor(rt.name, rt.tensor_type, shape, rt.data)
        bad = sorted({t.qtype.name for t in self.tensors.values() if t.qtype not in SUPPORTED_TYPES})
        if bad:
            names = [t.name for t in self.tensors.values() if t.qtype.name in bad][:3]
            raise UnsupportedModel(
                f"{self.path}: unsupported tensor type {', '.join(bad)} (in {', '.join(names)}); "
                f"supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))}"
            )

    def close(self) -> None:
        self.tensors = {}

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_gguf(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """Read a GGUF file's metadata and (memory-mapped) tensors."""
    f = GGUFFile(path)
    return f.metadata, f.tensors


"""How weights live in memory: dense in the compute dtype, or kept quantized.

Formats (``weights=`` of :func:`driftwood.model.load_model`):

- ``dense``: every matrix dequantized to the compute dtype (exact up to that dtype).
- ``quant``: in bfloat16 on CPUs with AVX-512 VNNI, 4-bit blocks (Q4_0, Q4_1, Q4_K) and Q8_0
  stay as their codes and float32 block scales and run through the native kernel of
  :mod:`driftwood.model.cpu` (activations quantized to int8 per block of 32, as llama.cpp
  does). Otherwise (float32 compute, other CPUs) 4-bit blocks run through torch's int4
  weight-only kernel (same codes, group 32; scales rounded to the compute dtype). Other
  matrices are requantized to int8 per output channel for torch's int8 weight-only kernel
  (lossy). On CUDA ``quant`` keeps Q4_0 and Q8_0 matrices as their blocks
  (:class:`BlockLinear`, read directly by the Triton kernels of :mod:`driftwood.model.cuda`);
  other types are dense.
- ``hybrid``: ``quant`` for a few tokens at a time (decode), plus a float32 copy of each layer
  matrix for prompt chunks of ``DENSE_MIN_TOKENS`` or more, where float32 GEMM beats the int4
  kernel (which reuses nothing across rows). The output head stays ``quant`` only: it runs on
  one position per step. CPU only.

Token embeddings always stay as the file stores them; looked-up rows are dequantized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from driftwood.model import cpu
from driftwood.model.gguf import Blocks, GGUFTensor, Q, dequantize_bytes, unpack

FORMATS = ("dense", "quant", "hybrid")
DENSE_MIN_TOKENS = 32  # measured crossover of int4 (bf16) vs float32 GEMM on 2 AVX512 cores
INT4_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K})


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Int4Linear(nn.Module):
    """4-bit codes, group 32, ``w = (q - 8) * scale + zero`` (torch's int4 CPU kernel)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        # (K / 32, N, 2): per group and output channel, (scale, zero)
        sz = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()
        self.register_buffer("scales_zeros", sz.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features), self.packed, 32, self.scales_zeros
        )
        return y.view(*x.shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """int8 codes with one scale per output channel (torch's int8 weight-only kernel)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.to(torch.float32)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scale)
        return y.view(*shape[:-1], self.weight.shape[0])


class PackedLinear(nn.Module):
    """Codes in blocks of 32 with float32 scales and offsets, multiplied by the native CPU
    kernel (:func:`driftwood.model.cpu.gemv`; layout in :class:`driftwood.model.cpu.Packed`)."""

    def __init__(self, packed: cpu.Packed) -> None:
        super().__init__()
        self.bits = packed.bits
        self.register_buffer("codes", packed.codes)
        self.register_buffer("scale", packed.scale)
        self.register_buffer("offset", packed.offset)
        self.out_features, self.in_features = packed.out_features, packed.scale.shape[1] * 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.driftwood.gemv(x.reshape(-1, self.in_features), self.codes, self.scale,
                                     self.offset, self.bits, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)


class ConcatLinear(nn.Module):
    """Several linear layers on the same input, outputs concatenated."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class HybridLinear(nn.Module):
    """A quantized matrix for few rows, its float32 copy for many."""

    def __init__(self, quant: nn.Module, dense: torch.Tensor) -> None:
        super().__init__()
        self.quant = quant
        self.dense = nn.Parameter(dense, requires_grad=False)  # (N, K) float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] >= DENSE_MIN_TOKENS:
            return F.linear(x.float(), self.dense).to(x.dtype)
        return self.quant(x)


class BlockLinear(nn.Module):
    """A Q4_0 or Q8_0 matrix kept as its blocks: ``codes`` (int32 words) and fp16 ``scales``
    (N, K / 32), ``w = scale * (q - 8)`` (Q4_0) or ``scale * q`` (Q8_0).

    The file's codes are repacked at load time (same bytes, columns permuted within each
    32-column group) so that the GEMV kernels load whole int32 words and the activations for one
    nibble or byte position of consecutive words are consecutive:

    - Q4_0: (N, K / 8) int32; group g is words ``4 g .. 4 g + 3``; nibble p (bits ``4p .. 4p + 3``)
      of word ``4 g + w`` holds column ``32 g + 4 p + w``.
    - Q8_0: (N, K / 4) int32; group g is words ``8 g .. 8 g + 7``; byte b of word ``8 g + i``
      holds column ``32 g + 8 b + i``.

    A few rows at a time run through the Triton kernels (see
    :class:`driftwood.model.cuda.decoder.TritonOps`); here, and for prompt chunks, the matrix is
    dequantized for one product.
    """

    GEMV_MAX_ROWS = 64

    def __init__(self, parts: Sequence[GGUFTensor], device: torch.device) -> None:
        super().__init__()
        qtype = parts[0].qtype
        self.fmt = qtype.name.lower()
        self.in_features = parts[0].shape[-1]
        raw = torch.cat([p.bytes_tensor() for p in parts])  # (N, K / 32 * block bytes)
        b = raw.view(raw.shape[0], self.in_features // 32, -1)
        self.out_features = raw.shape[0]
        codes = b[..., 2:]  # (N, G, 16) Q4_0 nibble pairs, (N, G, 32) Q8_0 bytes
        if qtype == Q.Q4_0:
            q = torch.cat([codes & 0x0F, codes >> 4], dim=-1)  # (N, G, 32) codes 0..15, by column
            packed = self.pack_q4_0(q)
        else:
            packed = self.pack_q8_0(codes.contiguous().view(torch.int8))
        self.register_buffer("codes", packed.to(device))
        self.register_buffer("scales", b[..., :2].contiguous().view(torch.float16).squeeze(-1).to(device))

    @staticmethod
    def pack_q4_0(q: torch.Tensor) -> torch.Tensor:
        """(N, G, 32) uint8 codes 0..15 by column -> (N, G * 4) int32 words (the layout above)."""
        N, G, _ = q.shape
        q = q.reshape(N, G, 8, 4).transpose(2, 3)  # (N, G, word w, nibble p): column 4 p + w
        byte = q[..., 0::2] | (q[..., 1::2] << 4)  # (N, G, 4, 4): nibbles 2b, 2b + 1 in byte b
        return byte.to(torch.uint8).contiguous().view(torch.int32).reshape(N, G * 4)

    @staticmethod
    def pack_q8_0(q: torch.Tensor) -> torch.Tensor:
        """(N, G, 32) int8 codes by column -> (N, G * 8) int32 words (the layout above)."""
        N, G, _ = q.shape
        return q.reshape(N, G, 4, 8).transpose(2, 3).contiguous().view(torch.int32).reshape(N, G * 8)

    def unpack(self) -> torch.Tensor:
        """The codes by column: (N, G, 32), Q4_0 as 0..15 (uint8), Q8_0 as int8."""
        N, G = self.scales.shape
        byte = self.codes.view(torch.uint8).reshape(N, G, -1, 4)  # (N, G, words, 4 bytes)
        if self.fmt == "q4_0":
            q = torch.stack([byte & 0x0F, byte >> 4], dim=-1).reshape(N, G, 4, 8)  # (w, p)
            return q.transpose(2, 3).reshape(N, G, 32)
        return byte.view(torch.int8).transpose(2, 3).reshape(N, G, 32)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """(N, K) in ``dtype``, computed in float32."""
        N = self.scales.shape[0]
        q = self.unpack().to(torch.float32)
        if self.fmt == "q4_0":
            q = q - 8.0
        return (q * self.scales[..., None].float()).view(N, -1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.is_cuda and x.dtype == torch.bfloat16 and rows <= self.GEMV_MAX_ROWS:
            from driftwood.model.cuda import kernels

            fmt = kernels.Q4_0 if self.fmt == "q4_0" else kernels.Q8_0
            y = kernels.gemv(x.reshape(rows, -1), fmt, self.codes, self.scales)
            return y.view(*x.shape[:-1], self.out_features)
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and has_triton():
            from driftwood.model.cuda import kernels  # the Triton dequantizer, not torch ops

            fmt = kernels.Q4_0 if self.fmt == "q4_0" else kernels.Q8_0
            w = torch.empty(self.out_features, self.in_features, dtype=x.dtype, device=x.device)
            return F.linear(x, kernels.dequantize(fmt, self.codes, self.scales, w))
        return F.linear(x, self.dequantize(x.dtype))


def has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


BLOCK_TYPES = frozenset({Q.Q4_0, Q.Q8_0})


def linear(
    parts: Sequence[GGUFTensor], fmt: str, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """One linear layer whose output is the parts' outputs concatenated (fused QKV, gate|up)."""
    if fmt in ("quant", "hybrid") and device.type == "cuda":
        if parts[0].qtype in BLOCK_TYPES and all(p.qtype == parts[0].qtype for p in parts):
            return BlockLinear(parts, device)
        fmt = "dense"
    if fmt == "hybrid" and device.type == "cpu":
        dense = torch.cat([p.dequantize(torch.float32) for p in parts])
        return HybridLinear(linear(parts, "quant", dtype, device), dense)
    if fmt in ("quant", "hybrid") and device.type == "cpu":
        packed = _packed(parts) if dtype == torch.bfloat16 else None  # float32: exact codes
        if packed is not None:
            return PackedLinear(packed)
        int4 = [p.qtype in INT4_TYPES for p in parts]
        if all(int4):
            whole = _unpack_all(parts)
            assert whole.offset is not None
            return Int4Linear(whole.q, whole.scale, whole.offset + 8 * whole.scale, dtype)
        if any(int4):  # e.g. Q4_K_M's Q6_K attn_v beside Q4_K attn_q, attn_k
            return ConcatLinear([linear([p], "quant", dtype, device) for p in parts])
        return Int8Linear(torch.cat([p.dequantize() for p in parts]), dtype)
    if len(parts) == 1:
        return DenseLinear(parts[0].dequantize(dtype).to(device))
    return DenseLinear(torch.cat([p.dequantize(dtype) for p in parts]).to(device))


def _packed(parts: Sequence[GGUFTensor]) -> cpu.Packed | None:
    """The parts in the native kernel's layout, or None (another type, a mix, no kernel)."""
    kinds = {"int4" if p.qtype in INT4_TYPES else p.qtype for p in parts}
    if len(kinds) != 1 or kinds.pop() not in ("int4", Q.Q8_0) or not cpu.enabled():
        return None
    whole = _unpack_all(parts)
    return cpu.pack(whole) if cpu.can_pack(whole) else None


def _unpack_all(parts: Sequence[GGUFTensor]) -> Blocks:
    """The parts' blocks (one group size) unpacked and stacked by rows; a part without offsets
    gets zeros where another has them."""
    blocks = [unpack(p) for p in parts]
    offsets = [b.offset for b in blocks]
    offset = None if all(o is None for o in offsets) else torch.cat(
        [o if o is not None else torch.zeros_like(b.scale) for o, b in zip(offsets, blocks, strict=True)])
    return Blocks(torch.cat([b.q for b in blocks]), torch.cat([b.scale for b in blocks]), offset,
                  blocks[0].group)


class Embedding(nn.Module):
    """Token embeddings in the file's own format; ``forward`` dequantizes the rows it needs."""

    def __init__(self, table: GGUFTensor, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.qtype = table.qtype
        self.dim = table.shape[-1]
        self.dtype = dtype
        self.register_buffer("raw", table.bytes_tensor().to(device))  # (vocab, bytes_per_row) uint8

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.raw[tokens.reshape(-1)]
        x = dequantize_bytes(rows, self.qtype, self.dim, torch.float32).to(self.dtype)
        return x.view(*tokens.shape, self.dim)

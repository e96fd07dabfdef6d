"""How weights live in memory: dense in the compute dtype, or kept quantized.

Formats (``weights=`` of :func:`driftwood.model.load_model`):

- ``dense``: every matrix dequantized to the compute dtype (exact up to that dtype).
- ``quant``: 4-bit blocks (Q4_0, Q4_1, Q4_K) stay 4-bit and run through torch's int4
  weight-only kernel (same codes, group 32; scales rounded to the compute dtype); other matrices
  are requantized to int8 per output channel for torch's int8 weight-only kernel (lossy). CPU
  only; elsewhere ``quant`` falls back to ``dense``.

Token embeddings always stay as the file stores them; looked-up rows are dequantized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from driftwood.model.gguf import GGUFTensor, Q, dequantize_bytes, unpack

FORMATS = ("dense", "quant")
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


def linear(
    parts: Sequence[GGUFTensor], fmt: str, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """One linear layer whose output is the parts' outputs concatenated (fused QKV, gate|up)."""
    if fmt == "quant" and device.type == "cpu":
        if all(p.qtype in INT4_TYPES for p in parts):
            blocks = [unpack(p) for p in parts]
            if all(b.group == 32 for b in blocks):
                q = torch.cat([b.q for b in blocks])
                scale = torch.cat([b.scale for b in blocks])
                offset = torch.cat([b.offset for b in blocks if b.offset is not None])
                return Int4Linear(q, scale, offset + 8 * scale, dtype)
        return Int8Linear(torch.cat([p.dequantize() for p in parts]), dtype)
    if len(parts) == 1:
        return DenseLinear(parts[0].dequantize(dtype).to(device))
    return DenseLinear(torch.cat([p.dequantize(dtype) for p in parts]).to(device))


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

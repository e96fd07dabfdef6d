"""Llama-family decoder in torch: Attention -> MLP -> Block -> Transformer.

Weights stay in GGUF's layout: Q and K rows are in llama.cpp's order, so RoPE rotates
adjacent pairs ``(2i, 2i + 1)``. The forward takes per-sequence positions ``pos`` (B, T) and
writes keys and values through a :class:`~driftwood.model.cache.KVCache`; cache policy, sampling
and generation live elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from driftwood.errors import ModelError
from driftwood.model.cache import KVCache
from driftwood.model.config import LlamaConfig
from driftwood.model.gguf import GGUFTensor
from driftwood.model.weights import Embedding, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, scaled in the input dtype (as Hugging Face does)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) float32, with linear and llama3-style scaling."""
    d = config.head_dim
    inv = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    if config.rope_freq_factors is not None:
        inv = inv / torch.tensor(config.rope_freq_factors, dtype=torch.float32)
    return inv / config.rope_scale


def rope_angles(pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin (B, T, 1, head_dim) for positions (B, T): each pair's angle twice, sin signed
    (-sin, +sin), so that the rotation is ``x * cos + swap_pairs(x) * sin``."""
    angles = pos[..., None].float() * inv_freq  # (B, T, D/2)
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = angles.sin()
    sin = torch.stack([-sin, sin], dim=-1).flatten(-2)
    return cos[:, :, None].to(dtype), sin[:, :, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(2i, 2i + 1)`` of x (B, T, heads, D) by the tables of
    :func:`rope_angles`: ``(a, b) -> (a cos - b sin, b cos + a sin)``."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b, a) pairs
    return x * cos + swapped * sin


def attention_mask(pos: torch.Tensor, end: int) -> torch.Tensor:
    """(B, 1, T, end) bool: query at position p sees keys at positions <= p."""
    keys = torch.arange(end, device=pos.device)
    return keys[None, None, None, :] <= pos[:, None, :, None]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, wqkv: nn.Module, wo: nn.Module, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.qk_dim = config.q_dim + config.kv_dim
        self.wqkv, self.wo, self.layer = wqkv, wo, layer

    def forward(self, x, cos, sin, pos, cache: KVCache, end: int, mask, causal: bool):
        B, T, _ = x.shape
        qkv = self.wqkv(x)  # (B, T, q_dim + 2 kv_dim)
        # RoPE on queries and keys at once: (B, T, H + Hkv, D)
        qk = apply_rope(qkv[..., : self.qk_dim].view(B, T, -1, self.head_dim), cos, sin)
        q = qk[:, :, : self.n_heads].transpose(1, 2)  # (B, H, T, D)
        k = qk[:, :, self.n_heads :].transpose(1, 2)  # (B, Hkv, T, D)
        v = qkv[..., self.qk_dim :].view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return self.wo(cache.attend(self.layer, q, k, v, pos, end, mask, causal))


class MLP(nn.Module):
    def __init__(self, w13: nn.Module, w2: nn.Module, ffn_dim: int) -> None:
        super().__init__()
        self.w13, self.w2, self.ffn_dim = w13, w2, ffn_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.ffn_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, attn: Attention, mlp: MLP, attn_norm, ffn_norm, eps: float) -> None:
        super().__init__()
        self.attn, self.mlp, self.eps = attn, mlp, eps
        self.attn_norm = nn.Parameter(attn_norm, requires_grad=False)
        self.ffn_norm = nn.Parameter(ffn_norm, requires_grad=False)

    def forward(self, x, cos, sin, pos, cache, end, mask, causal):
        x = x + self.attn(rms_norm(x, self.attn_norm, self.eps), cos, sin, pos, cache, end, mask, causal)
        return x + self.mlp(rms_norm(x, self.ffn_norm, self.eps))


class Transformer(nn.Module):
    def __init__(self, config: LlamaConfig, embed: Embedding, layers: list[Block], norm, output):
        super().__init__()
        self.config = config
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.norm = nn.Parameter(norm, requires_grad=False)
        self.output = output
        self.register_buffer("inv_freq", rope_frequencies(config).to(norm.device), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        cache: KVCache,
        end: int,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in the compute dtype, or (B, 1, vocab) if ``last_only``."""
        x = self.hidden(tokens, pos, cache, end)
        return self.output(x[:, -1:] if last_only else x)

    def hidden(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache, end: int) -> torch.Tensor:
        """Final-normed hidden states (B, T, dim), the input of the output projection.

        tokens, pos: (B, T), positions increasing along T; end: one past the largest position.
        Writes the tokens' keys and values into ``cache``.
        """
        B, T = tokens.shape
        x = self.embed(tokens)  # (B, T, dim)
        cos, sin = rope_angles(pos, self.inv_freq, x.dtype)
        causal = B == 1 and end == T  # a fresh single sequence: positions 0..T-1
        mask = None if causal or (B == 1 and T == 1) else attention_mask(pos, end)
        for layer in self.layers:
            x = layer(x, cos, sin, pos, cache, end, mask, causal and T > 1)
        return rms_norm(x, self.norm, self.config.norm_eps)

    @classmethod
    def from_gguf(
        cls,
        config: LlamaConfig,
        tensors: Mapping[str, GGUFTensor],
        *,
        dtype: torch.dtype,
        device: torch.device,
        weights: str = "dense",
        progress: Callable[[int], None] | None = None,
    ) -> Transformer:
        """Build from GGUF tensors; ``progress(n)`` is called as layers finish."""

        def get(name: str) -> GGUFTensor:
            t = tensors.get(name)
            if t is None:
                raise ModelError(f"GGUF file lacks tensor {name}")
            return t

        def vector(name: str) -> torch.Tensor:
            return get(name).dequantize(dtype).to(device)

        layers = []
        for i in range(config.n_layers):
            p = f"blk.{i}."
            wqkv = linear([get(p + "attn_q.weight"), get(p + "attn_k.weight"), get(p + "attn_v.weight")],
                          weights, dtype, device)
            attn = Attention(config, wqkv, linear([get(p + "attn_output.weight")], weights, dtype, device), i)
            w13 = linear([get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")], weights, dtype, device)
            mlp = MLP(w13, linear([get(p + "ffn_down.weight")], weights, dtype, device), config.ffn_dim)
            layers.append(Block(attn, mlp, vector(p + "attn_norm.weight"), vector(p + "ffn_norm.weight"),
                                config.norm_eps))
            if progress is not None:
                progress(1)
        embd = get("token_embd.weight")
        head = embd if config.tied_embeddings else get("output.weight")
        head_format = "quant" if weights == "hybrid" else weights  # one row per step
        model = cls(config, Embedding(embd, dtype, device), layers, vector("output_norm.weight"),
                    linear([head], head_format, dtype, device))
        if progress is not None:
            progress(1)
        return model.eval()

"""Attention kernels as pure functions: scaled dot-product attention with grouped KV heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """q (B, H, T, D) over keys, values (B, Hkv, S, D) -> (B, T, H * D).

    mask: (B, 1, T, S) bool or None; causal: positions 0..T-1 against keys 0..T-1.
    """
    B, H, T, D = q.shape
    if T == 1 and mask is None:
        # one query per sequence sees every key: fold the query heads that share a KV head
        # into the query-length axis, so no key is repeated
        qf = q.reshape(B, keys.shape[1], -1, D)  # (B, Hkv, n_rep, D)
        return F.scaled_dot_product_attention(qf, keys, values).reshape(B, 1, H * D)
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                       enable_gqa=True)
    return y.transpose(1, 2).reshape(B, T, H * D)


def attend_new(
    q: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """One new token per sequence attending to its past and to itself, without the new key and
    value having been stored: q (B, H, 1, D); past_k, past_v (B, Hkv, P, D); k, v (B, Hkv, 1, D)
    -> (B, 1, H * D), computed in float32.

    Written as broadcast products and sums, not matmuls, for the compiled decode step: inductor
    fuses them into one pass over the past keys and values, where small bfloat16 batched
    matmuls cost ~100 us each on the CPU. (Eagerly this materializes (n_rep, P, D) products.)
    """
    B, H, _, D = q.shape
    qf = q.reshape(B, k.shape[1], -1, 1, D).float()  # (B, Hkv, n_rep, 1, D)
    scores = torch.cat([(qf * past_k[:, :, None].float()).sum(-1),  # (B, Hkv, n_rep, P)
                        (qf * k[:, :, None].float()).sum(-1)], dim=-1) * D**-0.5
    p = scores.softmax(-1)  # (B, Hkv, n_rep, P + 1)
    y = (p[..., :-1, None] * past_v[:, :, None].float()).sum(-2) + p[..., -1:] * v.float()
    return y.reshape(B, 1, H * D).to(q.dtype)

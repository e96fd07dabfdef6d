"""The KV cache: preallocated keys and values for every layer of a batch of sequences.

Layout (what snapshots store; see docs/kv-cache.md)::

    k, v: (n_layers, batch, n_kv_heads, capacity, head_dim), the model's compute dtype,
          contiguous, on the model's device.

Entry ``k[l, b, h, t, :]`` is layer ``l``'s key of KV head ``h`` for the token at position
``t`` of sequence ``b``, stored after RoPE. Keys keep GGUF's head-dimension order: llama.cpp's
interleaved rotation, pairs ``(2i, 2i + 1)`` rotated by frequency ``i``. Positions
``[0, offset)`` are valid; the rest is unspecified.

Slicing a token range ``[t0, t1)`` across all layers is one view, ``k[:, b, :, t0:t1]``
(``n_layers * n_kv_heads`` contiguous runs of ``(t1 - t0) * head_dim`` elements).

Layers write through per-layer views (``layers_k[l] is k[l]``): a compiled decode step then
updates its inputs in place, where writes into slices of the one 5-d input would make it copy
the whole cache every step.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for ``batch`` sequences of up to ``capacity`` tokens."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers_k = list(self.k.unbind(0))  # (B, H, S, D) views, one per layer
        self.layers_v = list(self.v.unbind(0))
        self.offset = 0  # positions [0, offset) hold keys and values

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys and values and return the layer's ``[0, end)`` window.

        k, v: (B, n_kv_heads, T, head_dim) after RoPE; pos: (B, T) their positions; end: one
        past the last position any row attends to. With one sequence the positions must be
        ``end - T .. end - 1`` (a slice write); with more, rows may differ (an indexed write).
        Returns keys and values (B, n_kv_heads, end, head_dim), views into the cache. Sets
        ``offset`` to ``end``.
        """
        if end > self.capacity:
            raise IndexError(f"KV cache holds {self.capacity} positions, {end} needed")
        kc, vc = self.layers_k[layer], self.layers_v[layer]
        if k.shape[0] == 1:
            kc[:, :, end - k.shape[2] : end] = k
            vc[:, :, end - v.shape[2] : end] = v
        else:
            rows = torch.arange(k.shape[0], device=pos.device)[:, None]  # (B, 1)
            kc[rows, :, pos] = k.transpose(1, 2)  # index (B, T) -> values (B, T, H, D)
            vc[rows, :, pos] = v.transpose(1, 2)
        self.offset = end
        return kc[:, :, :end], vc[:, :, :end]

    def reset(self) -> None:
        self.offset = 0

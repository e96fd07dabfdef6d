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

Model code calls :meth:`KVCache.attend` (store, then attend over the window). A compiled
decode step instead sees a :class:`StagedKV`: it only reads the cache and hands back the new
keys and values, which the caller then stores in one write per tensor, because writes into
slices of an input tensor make a compiled graph copy the whole cache on every step.
"""

from __future__ import annotations

import torch

from driftwood.model.attention import attend, attend_new


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
        self.offset = 0  # positions [0, offset) hold keys and values

    @classmethod
    def wrap(cls, k: torch.Tensor, v: torch.Tensor, offset: int = 0) -> KVCache:
        """A cache over existing tensors of the layout above (views share their storage)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.offset = k, v, offset
        return cache

    def rows(self, start: int, stop: int) -> KVCache:
        """Sequences ``[start, stop)`` as a cache of their own, sharing this one's storage."""
        return KVCache.wrap(self.k[:, start:stop], self.v[:, start:stop])

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
        kc, vc = self.k[layer], self.v[layer]
        if k.shape[0] == 1:
            kc[:, :, end - k.shape[2] : end] = k
            vc[:, :, end - v.shape[2] : end] = v
        else:
            rows = torch.arange(k.shape[0], device=pos.device)[:, None]  # (B, 1)
            kc[rows, :, pos] = k.transpose(1, 2)  # index (B, T) -> values (B, T, H, D)
            vc[rows, :, pos] = v.transpose(1, 2)
        self.offset = end
        return kc[:, :, :end], vc[:, :, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               pos: torch.Tensor, end: int, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Store k, v (see :meth:`update`) and attend q (B, H, T, D) over ``[0, end)``."""
        keys, values = self.update(layer, k, v, pos, end)
        return attend(q, keys, values, mask, causal)

    def reset(self) -> None:
        self.offset = 0


class StagedKV:
    """A KV cache as a compiled one-token step sees it: reads ``k``, ``v`` (the 5-d cache
    tensors), never writes them, and collects each layer's new key and value in ``new_k``,
    ``new_v`` for the caller to store (:meth:`store`) after the step."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               pos: torch.Tensor, end: int, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """One token per sequence at position end - 1 (mask None)."""
        self.new_k.append(k)
        self.new_v.append(v)
        return attend_new(q, self.k[layer, :, :, : end - 1], self.v[layer, :, :, : end - 1], k, v)

    @staticmethod
    def store(cache: KVCache, new_k: torch.Tensor, new_v: torch.Tensor, end: int) -> None:
        """Write stacked new keys and values (n_layers, B, Hkv, 1, D) at position end - 1."""
        cache.k[:, :, :, end - 1 : end] = new_k
        cache.v[:, :, :, end - 1 : end] = new_v
        cache.offset = end

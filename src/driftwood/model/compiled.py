"""The one-token decode step under ``torch.compile``.

At batch 1 the decode step is ~400 tiny ops, so eager torch spends much of its time in Python
and dispatch. Compiled, the pointwise and normalization work becomes a few fused C++ kernels
around the matmul and attention calls.

The compiled step is a pure function: it reads the KV cache through a
:class:`~driftwood.model.cache.StagedKV` and returns the new keys and values, which are then
stored with one write per tensor. (Writes into slices of an input inside the graph make
inductor copy the whole cache every step; per-layer views as inputs cost ~1 ms of aliasing
checks per call.) It is traced with a symbolic sequence length, so one compilation serves every
position and cache capacity; inductor's on-disk cache makes later processes start faster.
Prefill stays eager: it is matmul-bound already.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from driftwood.model.cache import KVCache, StagedKV

if TYPE_CHECKING:
    from driftwood.model.engine import Model
    from driftwood.model.llama import Transformer

log = logging.getLogger(__name__)

# inductor options per device; chosen by measurement (docs/perf-notes-cpu.md)
OPTIONS: dict[str, dict[str, Any]] = {"cpu": {"cpp_wrapper": True}, "cuda": {}}


def _step(transformer: Transformer, tokens: torch.Tensor, pos: torch.Tensor, k: torch.Tensor,
          v: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    staged = StagedKV(k, v)
    x = transformer.hidden(tokens, pos, staged, end)
    return x, torch.stack(staged.new_k), torch.stack(staged.new_v)


def compile_decode(model: Model) -> None:
    """Swap ``model.decode_fn`` for a compiled single-sequence, single-token step. Compilation
    happens on the first decode; if it fails (no C++ compiler, an unsupported op), the model
    goes back to the eager step with a warning."""
    compiled = torch.compile(_step, dynamic=True, fullgraph=True,
                             options=OPTIONS.get(model.device.type, {}))
    transformer = model.transformer
    traced = False

    def step(tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache, end: int) -> torch.Tensor:
        nonlocal traced
        if tokens.shape != (1, 1):
            return transformer.hidden(tokens, pos, cache, end)
        x = None
        if traced:
            # Once a graph exists, evaluate only the guards that tell graphs apart (not the
            # model's parameters): calls differ in the symbolic length and capacity. Where a
            # new input needs a new graph (a size that happened to equal another), the stance
            # refuses and the call below compiles it.
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    x, new_k, new_v = compiled(transformer, tokens, pos, cache.k, cache.v, end)
            except RuntimeError as exc:
                if "skip_guard_eval_unsafe" not in str(exc):
                    raise
        if x is None:
            try:
                x, new_k, new_v = compiled(transformer, tokens, pos, cache.k, cache.v, end)
            except Exception as exc:  # inductor and its C++ toolchain raise many kinds
                log.warning("torch.compile of the decode step failed, running eagerly: %s", exc)
                model.decode_fn, model.compiled = transformer.hidden, False
                return transformer.hidden(tokens, pos, cache, end)
            traced = True
        StagedKV.store(cache, new_k, new_v, end)
        return x

    model.decode_fn = step
    model.compiled = True

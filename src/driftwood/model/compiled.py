"""The one-token decode step under ``torch.compile``.

At batch 1 the decode step is ~400 tiny ops, so eager torch spends most of its time in Python
and dispatch. Compiling the step turns the pointwise and normalization work into a few fused
C++ kernels around the matmul and attention calls. The compiled step is the same
``Transformer.hidden`` traced with symbolic sequence length, so one compilation serves every
position and every cache capacity; inductor's on-disk cache makes later processes start fast.
Prefill stays eager (it is matmul-bound already).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from driftwood.model.engine import Model

# inductor options per device; chosen by measurement (docs/perf-notes-cpu.md)
OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"cpp_wrapper": True},
    "cuda": {},
}


def compile_decode(model: Model) -> None:
    """Swap ``model.decode_fn`` for a compiled version of the same step."""
    options = dict(OPTIONS.get(model.device.type, {}))
    extra = os.environ.get("DRIFTWOOD_INDUCTOR_OPTIONS")  # experiments: "k=v,k=v"
    if extra:
        for item in extra.split(","):
            key, _, value = item.partition("=")
            options[key.strip()] = {"1": True, "0": False}.get(value.strip(), value.strip())
    compiled = torch.compile(model.transformer.hidden, dynamic=True, fullgraph=True, options=options)
    ready = False

    def step(tokens: torch.Tensor, pos: torch.Tensor, cache: Any, end: int) -> torch.Tensor:
        # After the first call compiled the one graph, skip guard evaluation: inputs only ever
        # differ in the symbolic length and capacity, and evaluating the guards (the model's
        # parameters, 2 * n_layers aliased cache views) costs more than the rest of the call.
        nonlocal ready
        if not ready:
            out = compiled(tokens, pos, cache, end)
            ready = True
            return out
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return compiled(tokens, pos, cache, end)

    model.decode_fn = step
    model.compiled = True

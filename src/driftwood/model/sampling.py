"""Sampling: small composable functions over a (vocab,) float32 logits vector.

Order, as llama.cpp's default chain: penalties (repetition, then frequency and presence, over
the last ``repeat_last_n`` tokens) -> temperature -> top-k -> top-p -> min-p -> draw.
Temperature 0 is greedy (argmax after the penalties). Draws use a seeded ``torch.Generator`` on
the CPU whose state round-trips exactly through bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # how many recent tokens the penalties look at
    frequency_penalty: float = 0.0  # subtracted once per occurrence; 0.0: off
    presence_penalty: float = 0.0  # subtracted once from every token that occurred; 0.0: off

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"invalid sampling parameters {self}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling parameters {self}")
        if not 0 <= self.min_p <= 1 or self.repetition_penalty <= 0 or self.repeat_last_n < 0:
            raise ValueError(f"invalid sampling parameters {self}")
        if not (math.isfinite(self.frequency_penalty) and math.isfinite(self.presence_penalty)):
            raise ValueError(f"invalid sampling parameters {self}")


def repetition_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) logits of tokens seen in ``history`` by ``penalty``."""
    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
    seen = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return out


def frequency_presence_penalty(logits: torch.Tensor, history: Sequence[int], frequency: float,
                               presence: float) -> torch.Tensor:
    """Subtract ``count * frequency + presence`` from the logit of each token that occurs
    ``count > 0`` times in ``history`` (llama.cpp's penalties sampler, OpenAI's definition)."""
    if (frequency == 0.0 and presence == 0.0) or not history:
        return logits
    ids, counts = torch.tensor(list(history), dtype=torch.long).unique(return_counts=True)
    out = logits.clone()
    out[ids.to(logits.device)] -= (counts.to(logits.dtype) * frequency + presence).to(logits.device)
    return out


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value kept too); the rest become -inf."""
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p``."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, stable=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already >= p
    drop[0] = False
    return logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``p`` times the most likely token's."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < p * probs.max(), float("-inf"))


def new_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from the OS when None."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
    return g


def generator_state(g: torch.Generator) -> bytes:
    return bytes(g.get_state().numpy().tobytes())


def set_generator_state(g: torch.Generator, state: bytes) -> None:
    g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    history: Sequence[int] = (),
) -> int:
    """Choose the next token from (vocab,) logits."""
    x = logits.detach().to("cpu", torch.float32)
    if bool(torch.isnan(x).any()):  # never drawn (a guest may write anything into logits it owns)
        x = x.masked_fill(torch.isnan(x), float("-inf"))
    recent = history[-params.repeat_last_n :] if params.repeat_last_n else ()
    x = repetition_penalty(x, recent, params.repetition_penalty)
    x = frequency_presence_penalty(x, recent, params.frequency_penalty, params.presence_penalty)
    if params.temperature == 0.0:
        return int(torch.argmax(x))
    x = _scaled(x, params.temperature)
    x = min_p(top_p(top_k(x, params.top_k), params.top_p), params.min_p)
    return int(torch.multinomial(x.softmax(-1), 1, generator=generator))


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``x / temperature``; where that overflows (a huge logit over a tiny temperature) or the
    temperature is 0 in float32 (below ~1.4e-45), the same shifted so that its largest value is
    exactly 0 (the filters after it and softmax do not change under a shift; the others may go
    to -inf, where their probability is 0 anyway). +inf logits (a guest may write any float
    into logits it owns) take all the mass, shared equally: softmax's limit."""
    top = x.max()  # NaN is gone: sample() made it -inf
    if bool(torch.isposinf(top)):
        return torch.zeros_like(x).masked_fill(x != top, float("-inf"))
    if not bool(torch.isfinite(top)):
        raise ValueError("every logit is -inf or NaN: nothing to sample")
    y = x / temperature
    if bool(torch.isfinite(y.max())):
        return y  # every ordinary case: unchanged, bit for bit, from before these guards
    return torch.where(x == top, 0.0, (x - top) / temperature)

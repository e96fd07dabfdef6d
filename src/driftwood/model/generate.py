"""Generation as a stack of generators: token ids -> text with stats -> a blocking call.

The CLI, the runtime's host ABIs and the benchmarks all consume these. A generated token is
fed to the session only when another token is asked for, so after generation stops the
session holds the prompt and every output token but the last.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field

from driftwood.model.engine import Session
from driftwood.model.sampling import SamplingParams


@dataclass
class GenerationStats:
    """Timings of one generation, filled in as it runs (seconds)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0  # the prompt's forward passes
    first_token_s: float = 0.0  # from the start until the first token was chosen
    decode_s: float = 0.0  # one-token forward passes and sampling after the first token

    def as_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = asdict(self)
        d["prefill_tokens_per_s"] = self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        steps = self.generated_tokens - 1
        d["decode_ms_per_token"] = 1e3 * self.decode_s / steps if steps > 0 else 0.0
        return d


def generate_tokens(
    session: Session,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop_ids: Collection[int] = (),
    *,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Layer 1: append ``prompt_ids`` to the session and yield up to ``max_tokens`` new ids.

    Stops after yielding a token in ``stop_ids``, or when the session is full.
    """
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    start = time.perf_counter()
    logits = session.prefill(prompt_ids)
    stats.prefill_s = time.perf_counter() - start
    token = -1
    for i in range(max_tokens):
        t0 = time.perf_counter()
        if i > 0:
            logits = session.decode(token)
        token = session.sample(logits, params)
        if i > 0:
            stats.decode_s += time.perf_counter() - t0
        else:
            stats.first_token_s = time.perf_counter() - start
        stats.generated_tokens += 1
        yield token
        if token in stop_ids or session.position >= session.capacity:
            return


@dataclass(frozen=True)
class Chunk:
    """Layer 2's unit: new text (possibly ""), the token behind it, and on the last chunk
    the finish reason ("stop", "length" or "context"). The last chunk flushes held-back text;
    its token is the stop token when one ended generation, else None."""

    text: str
    token: int | None
    finish_reason: str | None
    stats: GenerationStats


def generate(
    session: Session,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop_ids: Collection[int] | None = None,
    *,
    skip_special: bool = True,
) -> Iterator[Chunk]:
    """Layer 2: text pieces as tokens arrive. ``stop_ids`` default to the tokenizer's
    end-of-generation tokens; a stop token ends generation and contributes no text."""
    tokenizer = session.model.tokenizer
    stops = tokenizer.stop_ids if stop_ids is None else frozenset(stop_ids)
    stats = GenerationStats()
    detok = tokenizer.detokenizer(skip_special=skip_special)
    reason, stop = "length", None
    for token in generate_tokens(session, prompt_ids, params, max_tokens, stops, stats=stats):
        if token in stops:
            reason, stop = "stop", token
            break
        if session.position >= session.capacity:
            reason = "context"
        yield Chunk(detok.add(token), token, None, stats)
    yield Chunk(detok.flush(), stop, reason, stats)


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str
    stats: GenerationStats = field(repr=False)

    def as_dict(self) -> dict[str, object]:
        return {
            "prompt_ids": self.prompt_ids,
            "output_ids": self.output_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "timings": self.stats.as_dict(),
        }


def complete(
    session: Session,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop_ids: Collection[int] | None = None,
) -> Completion:
    """Layer 3: run generation to the end and return everything at once. ``output_ids``
    include the stop token when one ended generation."""
    output: list[int] = []
    parts: list[str] = []
    last: Chunk | None = None
    for last in generate(session, prompt_ids, params, max_tokens, stop_ids):
        parts.append(last.text)
        if last.token is not None:
            output.append(last.token)
    assert last is not None and last.finish_reason is not None
    return Completion(list(prompt_ids), output, "".join(parts), last.finish_reason, last.stats)

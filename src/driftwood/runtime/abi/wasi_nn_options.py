"""Metadata JSON of WasmEdge's GGML backend: which keys exist, where they apply, their types.

WasmEdge reads metadata from ``load``'s builder 1, from ``load_by_name_with_config`` and from
``set_input`` index 1. Some keys belong to the graph (shared by all its contexts, e.g. the
sampling settings and ``ctx-size``), others to one execution context (``n-predict``,
``reverse-prompt``, ``stream-stdout``); a new context starts from a copy of its graph's
context keys. Absent keys leave settings unchanged; unknown keys are ignored.

Typing follows WasmEdge's simdjson reads: a boolean key takes only ``true``/``false``, an
integer key only a JSON integer that fits int64 (``1.0`` is refused), a float key any JSON
number, a string key only a string. A document that does not parse is ``invalid-encoding``;
a key of the wrong type is ``invalid-argument``. Unlike WasmEdge (which applies keys one by
one and stops at the first bad one), a refused document changes nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from driftwood.runtime.hostcall import GuestFault

# wasi-nn errno values (WasmEdge's numbering; the GGML backend adds 100..103).
SUCCESS = 0
INVALID_ARGUMENT = 1
INVALID_ENCODING = 2
MISSING_MEMORY = 3
BUSY = 4
RUNTIME_ERROR = 5
UNSUPPORTED_OPERATION = 6
TOO_LARGE = 7
NOT_FOUND = 8
END_OF_SEQUENCE = 100
CONTEXT_FULL = 101
PROMPT_TOO_LONG = 102
MODEL_NOT_FOUND = 103

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: draw a fresh seed
MAX_METADATA_BYTES = 1 << 20
INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass
class GraphOptions:
    """Settings of one graph, shared by its contexts (llama.cpp's defaults)."""

    ctx_size: int = 0  # 0: the engine's default (min(trained context, 4096))
    batch_size: int = 2048  # prefill chunk bound
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # -1: the whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = RANDOM_SEED
    ignore_eos: bool = False


@dataclass
class ContextOptions:
    """Settings of one execution context; a new context copies its graph's."""

    stream_stdout: bool = False
    n_predict: int = -1  # negative: until end-of-generation or a full context
    reverse_prompt: str = ""
    keep_kv_cache: bool = False  # Driftwood's opt-in: reuse the KV cache across computes


GRAPH, CONTEXT, IGNORED = "graph", "context", "ignored"


@dataclass(frozen=True)
class Key:
    kind: str  # bool | int | float | str
    scope: str  # graph | context | ignored
    field: str | None = None
    convert: Callable[[Any], Any] | None = None  # may raise GuestFault (range checks)


def _non_negative(x: float) -> float:
    return max(0.0, float(x))  # WasmEdge clamps these with std::max(0.0, x)


def _ctx_size(n: int) -> int:
    if n < 0:
        raise GuestFault(INVALID_ARGUMENT, f"ctx-size must not be negative, got {n}")
    return n


def _batch_size(n: int) -> int:
    if n < 1:
        raise GuestFault(INVALID_ARGUMENT, f"batch-size must be positive, got {n}")
    return n


def _unsupported_when(active: Callable[[Any], bool], what: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if active(value):
            raise GuestFault(UNSUPPORTED_OPERATION, f"{what} is not supported by this host")
        return value

    return check


KEYS: dict[str, Key] = {
    # per context
    "stream-stdout": Key("bool", CONTEXT, "stream_stdout"),
    "n-predict": Key("int", CONTEXT, "n_predict"),
    "reverse-prompt": Key("str", CONTEXT, "reverse_prompt"),
    "keep-kv-cache": Key("bool", CONTEXT, "keep_kv_cache"),
    # per graph
    "ctx-size": Key("int", GRAPH, "ctx_size", _ctx_size),
    "batch-size": Key("int", GRAPH, "batch_size", _batch_size),
    "temp": Key("float", GRAPH, "temp", _non_negative),
    "top-k": Key("int", GRAPH, "top_k"),
    "top-p": Key("float", GRAPH, "top_p", _non_negative),
    "min-p": Key("float", GRAPH, "min_p"),
    "repeat-penalty": Key("float", GRAPH, "repeat_penalty", _non_negative),
    "last-n-penalty": Key("int", GRAPH, "repeat_last_n"),
    "presence-penalty": Key("float", GRAPH, "presence_penalty", _non_negative),
    "frequency-penalty": Key("float", GRAPH, "frequency_penalty", _non_negative),
    "seed": Key("int", GRAPH, "seed", lambda n: n & 0xFFFFFFFF),  # static_cast<uint32_t>
    "ignore-eos": Key("bool", GRAPH, "ignore_eos"),
    # asking for what this host does not do
    "embedding": Key("bool", IGNORED, convert=_unsupported_when(bool, "embedding")),
    "grammar": Key("str", IGNORED, convert=_unsupported_when(bool, "grammar")),
    "json-schema": Key("str", IGNORED, convert=_unsupported_when(bool, "json-schema")),
    "image": Key("str", IGNORED, convert=_unsupported_when(bool, "image input")),
    "tts": Key("bool", IGNORED, convert=_unsupported_when(bool, "text-to-speech")),
    # accepted and type-checked, without effect here (logging, placement, threads, ...)
    **{k: Key("bool", IGNORED) for k in (
        "enable-log", "enable-debug-log", "use-mmap", "use-mlock", "warmup", "no-kv-offload",
        "cont-batching", "ctx-shift", "no-perf", "no-perf-sampling", "timing-per-token",
        "always-regenerate-image-embd",
    )},
    **{k: Key("int", IGNORED) for k in (
        "n-gpu-layers", "main-gpu", "threads", "threads-batch", "ubatch-size", "n-keep",
        "n-parallel", "n-probs", "min-keep", "mirostat", "numa", "embd-normalize",
    )},
    **{k: Key("float", IGNORED) for k in (
        "typ-p", "xtc-probability", "xtc-threshold", "dynatemp-range", "dynatemp-exponent",
        "mirostat-eta", "rope-freq-base", "rope-freq-scale",
    )},
    **{k: Key("str", IGNORED) for k in (
        "mmproj", "model-alias", "split-mode", "tensor-split", "flash-attn", "load-mode",
        "model-vocoder", "tts-output-file", "tts-speaker-file",
    )},
}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} out of range")
    return value


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        obj.setdefault(k, v)  # simdjson's at_key finds the first of duplicate keys
    return obj


def parse_document(raw: bytes) -> Any:
    """Parse metadata bytes as strict JSON (no NaN/Infinity, UTF-8 only) or raise 2."""
    if len(raw) > MAX_METADATA_BYTES:
        raise GuestFault(TOO_LARGE, f"metadata of {len(raw)} bytes exceeds {MAX_METADATA_BYTES}")
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_first_wins)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise GuestFault(INVALID_ENCODING, f"metadata is not JSON: {exc}") from None


def _typed(name: str, key: Key, value: Any) -> Any:
    kind = key.kind
    ok = (
        (kind == "bool" and type(value) is bool)
        or (kind == "int" and type(value) is int and INT64[0] <= value <= INT64[1])
        or (kind == "float" and type(value) in (int, float))
        or (kind == "str" and type(value) is str)
    )
    if not ok:
        raise GuestFault(INVALID_ARGUMENT, f"metadata key {name!r} needs a {kind}, got {json.dumps(value)[:40]}")
    if kind == "float":
        value = float(value)
    return key.convert(value) if key.convert else value


@dataclass(frozen=True)
class Update:
    """The validated changes of one metadata document."""

    graph: dict[str, Any]
    context: dict[str, Any]

    def apply_graph(self, options: GraphOptions) -> GraphOptions:
        return replace(options, **self.graph)

    def apply_context(self, options: ContextOptions) -> ContextOptions:
        return replace(options, **self.context)


def parse_metadata(raw: bytes) -> Update:
    """Validate a metadata document; raises GuestFault (2 unparsable, 1 wrong type, 6 a feature
    this host lacks, 7 too large) and otherwise returns the changes it asks for."""
    doc = parse_document(raw)
    graph: dict[str, Any] = {}
    context: dict[str, Any] = {}
    if isinstance(doc, dict):  # a non-object document has no keys (WasmEdge's at_key fails)
        for name, value in doc.items():
            key = KEYS.get(name)
            if key is None:
                continue
            value = _typed(name, key, value)
            if key.scope == GRAPH:
                graph[key.field] = value  # type: ignore[index]
            elif key.scope == CONTEXT:
                context[key.field] = value  # type: ignore[index]
    return Update(graph, context)


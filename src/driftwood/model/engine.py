"""Models and sessions: the engine's public objects.

A :class:`Model` is the loaded weights, tokenizer and config; a :class:`Session` is one
sequence on it (its tokens, KV cache and sampler RNG) and lives until closed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import xxhash
from tqdm import tqdm

from driftwood.errors import ContextFull, ModelError, SnapshotError
from driftwood.model.cache import KVCache
from driftwood.model.config import LlamaConfig
from driftwood.model.gguf import GGUFFile
from driftwood.model.llama import Transformer
from driftwood.model.registry import resolve
from driftwood.model.sampling import (
    SamplingParams,
    generator_state,
    new_generator,
    sample,
    set_generator_state,
)
from driftwood.model.tokenizer import Tokenizer
from driftwood.model.weights import FORMATS, DenseLinear, has_triton

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# tokens per prefill forward: bounds activation and mask memory (the GPU has room for more)
PREFILL_CHUNK = {"cpu": 512, "cuda": 4096}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("CUDA was asked for but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"unsupported device {device!r} (cpu or cuda)")
    return dev


def fast_cpu() -> bool:
    """Whether this CPU runs the quantized bfloat16 path well (AVX-512, as measured)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        if device.type == "cpu" and not fast_cpu():
            return torch.float32
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelError(f"unsupported compute dtype {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"unsupported compute dtype {dtype!r} (one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def file_identity(gguf: GGUFFile, config: LlamaConfig) -> str:
    """xxh3-128 over the architecture config, the tokenizer metadata and every tensor's
    name, type, shape and bytes (read through the map; ~10 ms per 100 MB)."""
    h = xxhash.xxh3_128()
    h.update(repr(sorted(config.as_dict().items())).encode())
    for key in sorted(k for k in gguf.metadata if k.startswith("tokenizer.")):
        h.update(f"{key}={gguf.metadata[key]!r}\n".encode())
    for name in sorted(gguf.tensors):
        t = gguf.tensors[name]
        h.update(f"{name}:{t.qtype.name}:{t.shape}\n".encode())
        h.update(memoryview(t.raw.reshape(-1)))
    return h.hexdigest()


class Model:
    """A loaded model. Attributes: ``config``, ``tokenizer``, ``device``, ``dtype``,
    ``weights`` (the weight format), ``path`` and ``identity`` (hex digest of the file's
    weights, tokenizer and architecture config)."""

    def __init__(
        self,
        transformer: Transformer,
        tokenizer: Tokenizer,
        *,
        identity: str,
        path: Path,
        device: torch.device,
        dtype: torch.dtype,
        weights: str,
    ) -> None:
        self.transformer = transformer
        self.config: LlamaConfig = transformer.config
        self.tokenizer = tokenizer
        self.identity = identity
        self.path = path
        self.device = device
        self.dtype = dtype
        self.weights = weights
        self.decode_fn = transformer.hidden  # replaced by a compiled step when asked for
        self.compiled = False
        self.graphs = False  # one-token steps through driftwood.model.cuda's graphs
        self.graph_capture = True  # False: the same fused step, launched eagerly (for checks)
        self.graph_write_values = True  # one row's inputs by stream memory writes (False: copied)
        self.decode_ops = None  # the step's operations (None: driftwood.model.cuda's default)

    @property
    def default_capacity(self) -> int:
        return min(self.config.context_length, 4096)

    def new_session(self, capacity: int | None = None, seed: int | None = None) -> Session:
        """A fresh sequence with room for ``capacity`` tokens (default: min(context, 4096))."""
        return Session(self, capacity or self.default_capacity, seed)

    def new_batch(self, batch: int, capacity: int | None = None) -> Batch:
        """``batch`` sequences that decode together, each at its own position (see :class:`Batch`)."""
        return Batch(self, batch, capacity or self.default_capacity)

    def decoder(self, cache: KVCache):
        """The CUDA-graph step over ``cache`` (:class:`driftwood.model.cuda.decoder.GraphDecoder`)."""
        from driftwood.model.cuda.decoder import GraphDecoder

        return GraphDecoder(self.transformer, cache, graphs=self.graph_capture, ops=self.decode_ops,
                            write_values=self.graph_write_values)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layers, batch, c.n_kv_heads, capacity, c.head_dim,
                       dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return (f"Model({self.path.name}, {self.config.n_layers} layers, {self.device}, "
                f"{str(self.dtype).removeprefix('torch.')}, weights={self.weights})")


def prefill_rows(model: Model, cache: KVCache, ids: Sequence[int], start: int) -> torch.Tensor:
    """Run ``ids`` at positions ``start..`` through one sequence's cache (batch 1) in chunks;
    the last position's logits, (vocab,) float32."""
    t = model.transformer
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    chunk_len = PREFILL_CHUNK.get(model.device.type, 512)
    x = None
    for i in range(0, len(ids), chunk_len):
        chunk = tokens[:, i : i + chunk_len]
        p = start + i
        pos = torch.arange(p, p + chunk.shape[1], device=chunk.device)[None]
        x = t.hidden(chunk, pos, cache, p + chunk.shape[1])
    assert x is not None
    return t.output(x[0, -1]).float()


def check_append(held: int, ids: Sequence[int], capacity: int, vocab: int, *, prefix: str = "",
                 owner: str = "the") -> None:
    """Refuse appending ``ids`` to a sequence holding ``held`` tokens: past ``capacity``
    (ContextFull), or ids outside the vocabulary (ValueError)."""
    if held + len(ids) > capacity:
        raise ContextFull(f"{prefix}{held} + {len(ids)} tokens exceed {owner} capacity of {capacity}")
    if any(not 0 <= i < vocab for i in ids):
        raise ValueError(f"token id out of range [0, {vocab})")


class Session:
    """One sequence: ``tokens`` (its history), ``position`` (== len(tokens)), ``capacity``,
    a KV cache and a seeded sampler RNG."""

    def __init__(self, model: Model, capacity: int, seed: int | None) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.model = model
        self.capacity = capacity
        self.tokens: list[int] = []
        self.cache: KVCache | None = model.new_cache(1, capacity)
        self.generator = new_generator(seed)
        self._decoder = None  # the graph step over this cache, made at the first decode

    @property
    def position(self) -> int:
        return len(self.tokens)

    def _cache(self) -> KVCache:
        if self.cache is None:
            raise ModelError("session is closed")
        return self.cache

    def _check(self, ids: Sequence[int]) -> torch.Tensor:
        self._validate(ids)
        return torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)

    def _validate(self, ids: Sequence[int]) -> None:
        check_append(self.position, ids, self.capacity, self.model.config.vocab_size, owner="the session's")

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Append ``ids``; return the logits after the last one, (vocab,) float32."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        cache = self._cache()
        self._check(ids)
        logits = prefill_rows(self.model, cache, ids, self.position)
        self.tokens.extend(ids)
        return logits

    @torch.inference_mode()
    def decode(self, token: int, *, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Append one token; return the next logits, (vocab,) float32.

        With ``logits_out`` (float32 (vocab,) on the model's device, any storage), the output
        projection writes into it and it is returned: directly when the head is a float32
        matrix, else through one conversion from the compute dtype.
        """
        cache = self._cache()
        if self.model.graphs:
            self._validate([token])
            if self._decoder is None:
                self._decoder = self.model.decoder(cache)
            logits = self._decoder([token], [self.position])[0]  # the graph's output buffer
            cache.offset = self.position + 1
            self.tokens.append(token)
            return logits.clone() if logits_out is None else logits_out.copy_(logits)
        tokens = self._check([token])
        pos = torch.tensor([[self.position]], device=self.model.device)
        x = self.model.decode_fn(tokens, pos, cache, self.position + 1)[0, 0]  # (dim,)
        self.tokens.append(token)
        head = self.model.transformer.output
        if logits_out is None:
            return head(x).float()
        if isinstance(head, DenseLinear) and head.weight.dtype == torch.float32:
            torch.mm(x[None], head.weight.t(), out=logits_out[None])
        else:
            logits_out.copy_(head(x))
        return logits_out

    def sample(self, logits: torch.Tensor, params: SamplingParams) -> int:
        """Draw the next token with this session's RNG; the penalty sees ``tokens``."""
        return sample(logits, params, self.generator, self.tokens)

    def rng_state(self) -> bytes:
        return generator_state(self.generator)

    def set_rng_state(self, state: bytes) -> None:
        set_generator_state(self.generator, state)

    def kv_state(self, start: int = 0, end: int | None = None) -> dict[str, torch.Tensor]:
        """Keys and values of tokens ``[start, end)``: ``{"k": ..., "v": ...}``, each
        (n_layers, n_kv_heads, end - start, head_dim) in the compute dtype, on the model's
        device. They are views into the live cache (see docs/kv-cache.md): copy them before
        the session is reset, truncated below ``end``, restored or closed."""
        cache = self._cache()
        end = self.position if end is None else end
        if not 0 <= start <= end <= self.position:
            raise IndexError(f"token range [{start}, {end}) outside [0, {self.position})")
        return {"k": cache.k[:, 0, :, start:end], "v": cache.v[:, 0, :, start:end]}

    def load_kv_state(
        self, tokens: list[int], tensors: dict[str, torch.Tensor], rng_state: bytes | None = None
    ) -> None:
        """Replace this session's contents with ``tokens`` and their cached keys and values
        (as :meth:`kv_state` returns them, from any device, in the model's dtype); optionally
        the RNG state too. The restored session continues exactly as the original would."""
        cache = self._cache()
        c = self.model.config
        shape = (c.n_layers, c.n_kv_heads, len(tokens), c.head_dim)
        for name in ("k", "v"):
            t = tensors.get(name)
            if t is None or tuple(t.shape) != shape or t.dtype != self.model.dtype:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise SnapshotError(f"KV state {name!r} is {got}, expected {shape} {self.model.dtype}")
        if len(tokens) > self.capacity:
            raise SnapshotError(f"{len(tokens)} tokens exceed the session's capacity {self.capacity}")
        cache.k[:, 0, :, : len(tokens)].copy_(tensors["k"])
        cache.v[:, 0, :, : len(tokens)].copy_(tensors["v"])
        cache.offset = len(tokens)
        self.tokens = list(tokens)
        if rng_state is not None:
            self.set_rng_state(rng_state)

    def adopt_kv(self, tokens: list[int], rng_state: bytes | None = None) -> None:
        """Like :meth:`load_kv_state` when the keys and values of ``tokens`` were already
        written into this session's cache in place (a snapshot restore reading straight into
        ``cache.k[l]`` / ``cache.v[l]``): no second copy. The caller vouches for the bytes."""
        cache = self._cache()
        if len(tokens) > self.capacity:
            raise SnapshotError(f"{len(tokens)} tokens exceed the session's capacity {self.capacity}")
        cache.offset = len(tokens)
        self.tokens = list(tokens)
        if rng_state is not None:
            self.set_rng_state(rng_state)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens (their keys and values stay cached); forget the rest."""
        if not 0 <= n <= self.position:
            raise IndexError(f"cannot truncate {self.position} tokens to {n}")
        self._cache().offset = n
        self.tokens = self.tokens[:n]

    def reset(self) -> None:
        """Forget every token (the cache memory is kept)."""
        self._cache().reset()
        self.tokens = []

    def close(self) -> None:
        """Free the cache; the session cannot be used afterwards."""
        self.cache = None
        self._decoder = None
        self.tokens = []

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Batch:
    """``batch`` sequences in one KV cache that decode together, each at its own position:
    the basis for serving many actors at once. ``tokens[b]`` is row b's history.

    ``prefill(row, ids)`` appends a prompt to one row; ``decode(tokens)`` appends one token to
    every row (``tokens[b]`` to row b) in one step and returns the next logits of every row,
    (batch, vocab) float32. On CUDA the step is a CUDA graph per batch-size bucket.
    """

    def __init__(self, model: Model, batch: int, capacity: int) -> None:
        if batch <= 0 or capacity <= 0:
            raise ValueError("batch and capacity must be positive")
        self.model, self.batch, self.capacity = model, batch, capacity
        rows = batch
        if model.graphs:
            from driftwood.model.cuda.decoder import bucket

            rows = bucket(batch)  # padding rows for the captured bucket sizes
        self.cache = model.new_cache(rows, capacity)
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self._decoder = model.decoder(self.cache) if model.graphs else None

    @property
    def positions(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def _check(self, row: int, ids: Sequence[int]) -> None:
        check_append(len(self.tokens[row]), ids, self.capacity, self.model.config.vocab_size,
                     prefix=f"row {row}: ")

    @torch.inference_mode()
    def prefill(self, row: int, ids: Sequence[int]) -> torch.Tensor:
        """Append ``ids`` to row ``row``; the logits after the last one, (vocab,) float32."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        self._check(row, ids)
        logits = prefill_rows(self.model, self.cache.rows(row, row + 1), ids, len(self.tokens[row]))
        self.tokens[row].extend(ids)
        return logits

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append ``tokens[b]`` to every row b; the next logits, (batch, vocab) float32."""
        if len(tokens) != self.batch:
            raise ValueError(f"decode takes one token per row ({self.batch}), got {len(tokens)}")
        for b, tok in enumerate(tokens):
            self._check(b, [tok])
        positions = self.positions
        if self._decoder is not None:
            logits = self._decoder(tokens, positions).clone()
        else:
            dev = self.model.device
            ids = torch.tensor(list(tokens), device=dev)[:, None]  # (B, 1)
            pos = torch.tensor(positions, device=dev)[:, None]
            t = self.model.transformer
            x = t.hidden(ids, pos, self.cache.rows(0, self.batch), max(positions) + 1)
            logits = t.output(x[:, 0]).float()
        for b, tok in enumerate(tokens):
            self.tokens[b].append(tok)
        return logits

    def reset(self, row: int | None = None) -> None:
        """Forget row ``row``'s tokens (every row's if None); the cache memory is kept."""
        for b in range(self.batch) if row is None else [row]:
            self.tokens[b] = []


def load_model(
    spec: str,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    weights: str = "auto",
    compile: bool | None = False,
    graphs: bool | None = None,
) -> Model:
    """Load a model: ``spec`` is a name (``smollm2``) or a GGUF path.

    device: ``auto`` (cuda if available), ``cpu`` or ``cuda``. dtype: compute dtype (default
    bfloat16; float32 on CPUs without AVX-512). weights: ``dense``, ``quant``, ``hybrid`` or
    ``auto`` (hybrid for bfloat16 on the CPU, else dense; see :mod:`driftwood.model.weights`).
    compile: compile the one-token decode step (:mod:`driftwood.model.compiled`); worth it for
    long runs, as compiling costs tens of seconds even with a warm cache. graphs: decode
    through fused Triton kernels replayed as CUDA graphs (:mod:`driftwood.model.cuda`); default
    on for bfloat16 on CUDA when Triton is importable, and weights ``auto`` then means ``quant``
    (Q4_0 and Q8_0 matrices stay quantized on the GPU).
    """
    path = resolve(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if graphs is None:
        graphs = dev.type == "cuda" and dt == torch.bfloat16 and has_triton()
    if graphs and dev.type != "cuda":
        raise ModelError("graphs=True needs a CUDA device")
    if weights == "auto":  # the fastest measured (docs/perf-notes-cpu.md, docs/gpu.md)
        if dev.type == "cpu":
            weights = "hybrid" if dt == torch.bfloat16 else "dense"
        else:
            weights = "quant" if graphs else "dense"
    if weights not in FORMATS:
        raise ModelError(f"unknown weight format {weights!r} (one of {', '.join(FORMATS)})")
    with GGUFFile(path) as gguf:
        config = LlamaConfig.from_gguf(gguf.metadata, gguf.tensors)
        tokenizer = Tokenizer.from_gguf(gguf.metadata)
        identity = file_identity(gguf, config)
        with tqdm(total=config.n_layers + 1, desc=f"loading {path.name}", unit="layer",
                  file=sys.stderr, disable=None if progress else True, leave=False) as bar:
            transformer = Transformer.from_gguf(
                config, gguf.tensors, dtype=dt, device=dev, weights=weights, progress=bar.update
            )
    model = Model(transformer, tokenizer, identity=identity, path=path, device=dev, dtype=dt,
                  weights=weights)
    model.graphs = bool(graphs)
    if compile:
        from driftwood.model.compiled import compile_decode

        compile_decode(model)
    return model

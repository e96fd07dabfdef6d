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
from driftwood.model.weights import FORMATS, DenseLinear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREFILL_CHUNK = 512  # tokens per prefill forward: bounds activation and mask memory


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("CUDA was asked for but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"unsupported device {device!r} (cpu or cuda)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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

    @property
    def default_capacity(self) -> int:
        return min(self.config.context_length, 4096)

    def new_session(self, capacity: int | None = None, seed: int | None = None) -> Session:
        """A fresh sequence with room for ``capacity`` tokens (default: min(context, 4096))."""
        return Session(self, capacity or self.default_capacity, seed)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layers, batch, c.n_kv_heads, capacity, c.head_dim,
                       dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return (f"Model({self.path.name}, {self.config.n_layers} layers, {self.device}, "
                f"{str(self.dtype).removeprefix('torch.')}, weights={self.weights})")


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

    @property
    def position(self) -> int:
        return len(self.tokens)

    def _cache(self) -> KVCache:
        if self.cache is None:
            raise ModelError("session is closed")
        return self.cache

    def _check(self, ids: Sequence[int]) -> torch.Tensor:
        if self.position + len(ids) > self.capacity:
            raise ContextFull(f"{self.position} + {len(ids)} tokens exceed the session's "
                              f"capacity of {self.capacity}")
        vocab = self.model.config.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"token id out of range [0, {vocab})")
        return torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Append ``ids``; return the logits after the last one, (vocab,) float32."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        cache, tokens = self._cache(), self._check(ids)
        t = self.model.transformer
        x = None
        for i in range(0, len(ids), PREFILL_CHUNK):
            chunk = tokens[:, i : i + PREFILL_CHUNK]
            start = self.position
            pos = torch.arange(start, start + chunk.shape[1], device=chunk.device)[None]
            x = t.hidden(chunk, pos, cache, start + chunk.shape[1])
            self.tokens.extend(ids[i : i + PREFILL_CHUNK])
        assert x is not None
        return t.output(x[0, -1]).float()

    @torch.inference_mode()
    def decode(self, token: int, *, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Append one token; return the next logits, (vocab,) float32.

        With ``logits_out`` (float32 (vocab,) on the model's device, any storage), the output
        projection writes into it and it is returned: directly when the head is a float32
        matrix, else through one conversion from the compute dtype.
        """
        cache, tokens = self._cache(), self._check([token])
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
        self.tokens = []

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_model(
    spec: str,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    weights: str = "auto",
    compile: bool = False,
) -> Model:
    """Load a model: ``spec`` is a name (``smollm2``) or a GGUF path.

    device: ``auto`` (cuda if available), ``cpu`` or ``cuda``. dtype: compute dtype (default
    float32 on the CPU, bfloat16 on CUDA). weights: ``dense``, ``quant`` or ``auto`` (see
    :mod:`driftwood.model.weights`). compile: compile the one-token decode step.
    """
    path = resolve(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if weights == "auto":
        weights = "dense"
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
    if compile:
        from driftwood.model.compiled import compile_decode

        compile_decode(model)
    return model

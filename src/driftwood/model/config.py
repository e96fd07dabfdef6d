"""Model configuration: a frozen dataclass built straight from GGUF metadata."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from driftwood.errors import ModelError, UnsupportedModel

ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder. Field names follow the GGUF keys loosely.

    ``rope_freq_factors`` holds the per-frequency divisors of llama3-style RoPE scaling (the
    file's ``rope_freqs.weight``, ``head_dim // 2`` values), or None.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    context_length: int
    norm_eps: float
    rope_theta: float
    rope_scale: float = 1.0  # linear position scaling ("rope.scaling.type" = linear)
    rope_freq_factors: tuple[float, ...] | None = None
    tied_embeddings: bool = True
    arch: str = "llama"

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"{self.n_heads} heads do not split into {self.n_kv_heads} KV groups")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ModelError(
                f"rope_freqs has {len(self.rope_freq_factors)} values, expected {self.head_dim // 2}"
            )

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], tensors: Mapping[str, Any]) -> LlamaConfig:
        """Build from a GGUF's metadata; ``tensors`` (name -> GGUFTensor) settles tied
        embeddings, the vocabulary size and llama3 RoPE factors."""
        arch = metadata.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedModel(
                f"unsupported model architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})"
            )

        def get(key: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelError(f"GGUF metadata lacks {arch}.{key}")
            return value

        if metadata.get(f"{arch}.expert_count", 0):
            raise UnsupportedModel(f"mixture-of-experts {arch} models are not supported")
        dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(metadata.get(f"{arch}.attention.key_length", dim // n_heads))
        if int(metadata.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
            raise UnsupportedModel("attention with value_length != key_length is not supported")
        if int(metadata.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
            raise UnsupportedModel("partial rotary embeddings are not supported")
        scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
        rope_scale = 1.0
        if scaling == "linear":
            rope_scale = float(get("rope.scaling.factor"))
        elif scaling not in ("none", ""):
            raise UnsupportedModel(f"RoPE scaling {scaling!r} is not supported")

        embd = tensors.get("token_embd.weight")
        if embd is None:
            raise ModelError("GGUF file has no token_embd.weight")
        vocab_size = int(metadata.get(f"{arch}.vocab_size", embd.shape[0]))
        freqs = tensors.get("rope_freqs.weight")
        factors = None
        if freqs is not None:
            factors = tuple(float(x) for x in freqs.dequantize().flatten().tolist())
            if all(math.isclose(f, 1.0) for f in factors):
                factors = None
        return cls(
            vocab_size=vocab_size,
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(metadata.get(f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ffn_dim=int(get("feed_forward_length")),
            context_length=int(get("context_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scale=rope_scale,
            rope_freq_factors=factors,
            tied_embeddings="output.weight" not in tensors,
            arch=arch,
        )

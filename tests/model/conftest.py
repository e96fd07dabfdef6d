"""Fixtures for the engine's tests: tiny random GGUFs (built once per session) and the real
default model with its transformers reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from driftwood.model.config import LlamaConfig
from driftwood.model.synthetic import PRESETS, llama3_rope_factors, write_synthetic

TINY = PRESETS["tiny"]
# Llama 3 traits: llama3 RoPE scaling, an untied head, 4:1 GQA, head_dim != dim / n_heads.
TINY_LLAMA3 = dataclasses.replace(TINY, n_heads=8, n_kv_heads=2, head_dim=64, context_length=1024,
                                  rope_theta=500000.0, tied_embeddings=False,
                                  rope_freq_factors=llama3_rope_factors(64, 500000.0))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """tiny_gguf(dtype="f32", config=TINY, pre="llama-bpe") -> path, written once per session."""
    made: dict[tuple, Path] = {}

    def make(dtype: str = "f32", config: LlamaConfig = TINY, pre: str = "llama-bpe") -> Path:
        key = (dtype, config, pre)
        if key not in made:
            path = tmp_path_factory.mktemp("gguf") / f"tiny-{dtype}-{pre}.gguf"
            made[key] = Path(write_synthetic(path, config, dtype, seed=0, pre=pre))
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from driftwood.model.registry import resolve

    return resolve("smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from driftwood.model import load_model

    return load_model(str(smollm2_path), device="cpu", dtype="float32", weights="dense", progress=False)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own GGUF loader on the same file (float32, dequantized)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent),
                                                      gguf_file=smollm2_path.name)

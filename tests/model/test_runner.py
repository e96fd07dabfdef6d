"""One shared runner over tiny random-config GGUFs: every storage type, compute dtype and weight
format is checked against transformers' Llama on the same (dequantized) weights, with and
without the KV cache, and batched against single sequences."""

from __future__ import annotations

import pytest
import torch

from driftwood.model import load_model
from driftwood.model.reference import hf_model
from tests.model.conftest import TINY, TINY_LLAMA3

PROMPTS = ["The quick brown fox jumps over the lazy dog. It's 2024!",
           "def main(argv):\n    return 42"]

# (file dtype, config, compute dtype, weight format, tolerance: max |err| / max |logit|).
# float32 cases measure ~1e-6 against transformers and up to ~1e-5 between the cached and
# uncached paths (different reduction orders); the bound for float32 is 1e-3.
CASES = [
    ("f32", TINY, "float32", "dense", 1e-4),
    ("f32", TINY_LLAMA3, "float32", "dense", 1e-4),  # llama3 RoPE scaling, 4:1 GQA, untied head
    ("f16", TINY, "float32", "dense", 1e-4),
    ("bf16", TINY, "float32", "dense", 1e-4),
    ("q8_0", TINY, "float32", "dense", 1e-4),
    ("q4_0", TINY, "float32", "dense", 1e-4),
    ("q4_1", TINY, "float32", "dense", 1e-4),
    ("q4_k", TINY, "float32", "dense", 1e-4),
    ("q6_k", TINY, "float32", "dense", 1e-4),
    ("q4_k_m", TINY_LLAMA3, "float32", "dense", 1e-4),
    ("q4_0", TINY, "float32", "quant", 1e-4),  # int4 kernel, same codes, float32 scales
    ("q4_k", TINY, "float32", "quant", 1e-4),
    # reduced precision: worst measured over seeds 0-2 in comments; the argmax must also agree
    # at >= 85% of positions (measured >= 89%)
    ("f32", TINY, "bfloat16", "dense", 3e-2),  # 1.4e-2
    ("f32", TINY, "float16", "dense", 6e-3),  # 3e-3
    ("q4_1", TINY, "bfloat16", "quant", 4e-2),  # int4, bf16 scales, int8 head: 1.9e-2
    ("q4_k_m", TINY_LLAMA3, "bfloat16", "quant", 1e-1),  # Q6_K parts requantized to int8: 4.9e-2
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def references(tiny_gguf):
    cache = {}

    def get(dtype, config):
        key = (dtype, config)
        if key not in cache:
            cache[key] = hf_model(tiny_gguf(dtype, config))
        return cache[key]

    return get


@pytest.mark.parametrize(("file_dtype", "config", "dtype", "weights", "tol"), CASES,
                         ids=[f"{c[0]}-{'llama3' if c[1] is TINY_LLAMA3 else 'tiny'}-{c[2]}-{c[3]}" for c in CASES])
def test_runner(tiny_gguf, references, file_dtype, config, dtype, weights, tol):
    model = load_model(str(tiny_gguf(file_dtype, config)), device="cpu", dtype=dtype,
                       weights=weights, progress=False)
    ref = references(file_dtype, config)
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    t = model.transformer

    # 1. no cache: one forward over the whole prompt, every position, against transformers
    with torch.no_grad():
        want = [ref(torch.tensor([ids])).logits[0] for ids in prompts]
    full = []
    for ids in prompts:
        cache = model.new_cache(1, 64)
        with torch.inference_mode():
            got = t(torch.tensor([ids]), torch.arange(len(ids))[None], cache, len(ids))[0]
        assert rel_err(got, want[len(full)]) < tol
        top1 = (got.float().argmax(-1) == want[len(full)].argmax(-1)).float().mean()
        assert top1 >= (1.0 if dtype == "float32" else 0.85)
        full.append(got.float())

    # 2. with the cache: a prefill, then one token at a time, matches the full forward
    for ids, f in zip(prompts, full, strict=True):
        s = model.new_session(capacity=64)
        k = len(ids) // 3
        assert rel_err(s.prefill(ids[:k]), f[k - 1]) < tol
        for i in range(k, len(ids)):
            assert rel_err(s.decode(ids[i]), f[i]) < tol
        assert s.position == len(ids)

    # 3. a batch of two sequences of different lengths, then a decode step at different
    # positions (B, T) in one forward, matches the sequences run alone
    a, b = prompts
    n = max(len(a), len(b))
    pad = [(ids + ids[:1] * n)[:n] for ids in (a, b)]
    cache = model.new_cache(2, 64)
    with torch.inference_mode():
        out = t(torch.tensor(pad), torch.arange(n)[None].repeat(2, 1), cache, n)
        assert rel_err(out[0, len(a) - 1], full[0][-1]) < tol
        assert rel_err(out[1, len(b) - 1], full[1][-1]) < tol
        nxt = [int(full[0][-1].argmax()), int(full[1][-1].argmax())]
        step = t(torch.tensor(nxt)[:, None], torch.tensor([[len(a)], [len(b)]]), cache, n + 1)
    for row, ids in enumerate(prompts):
        s = model.new_session(capacity=64)
        s.prefill(ids)
        assert rel_err(step[row, 0], s.decode(nxt[row])) < tol


def test_llama3_rope_matches_transformers_scaling():
    """rope_freqs written as convert_hf_to_gguf.py does reproduce transformers' llama3 RoPE."""
    import transformers

    from driftwood.model.llama import rope_frequencies
    from driftwood.model.synthetic import PRESETS

    c = PRESETS["llama3.2-1b"]
    hf = transformers.LlamaConfig(hidden_size=c.dim, num_attention_heads=c.n_heads, head_dim=c.head_dim,
                                  rope_theta=c.rope_theta, max_position_embeddings=c.context_length,
                                  rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192})
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf)
    torch.testing.assert_close(rope_frequencies(c), rotary.inv_freq.float(), rtol=1e-6, atol=0)

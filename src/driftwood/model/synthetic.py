"""Write GGUF files with random weights, for tests and for checks at real model shapes.

Weights are drawn in Hugging Face's layout and converted as llama.cpp's convert_hf_to_gguf.py
does (Q and K rows permuted for interleaved RoPE; llama3 RoPE scaling as ``rope_freqs``). The
tokenizer is a small byte-level BPE trained with the ``tokenizers`` package on a built-in text,
padded with unused entries to the model's vocabulary size.

    python -m driftwood.model.synthetic --preset llama3.2-1b --dtype bf16 -o x.gguf
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Sequence

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from driftwood.model.config import LlamaConfig
from driftwood.model.gguf import Q
from driftwood.model.tokenizer import PRE_TOKENIZERS

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
USER_DEFINED = ["<think>", "</think>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. ", "Pack my box with five dozen liquor jugs! ",
    "def main(argv):\n    return sum(int(x) ** 2 for x in argv)  # squares\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 365 2024 3.14159 1,000,000. ",
    "Unicode: héllo wörld, naïve café, Ωmega ≈ π, 日本語のテキスト, 🤗🚀👍🏽. ",
    "    indented\n\tand tabbed\r\n  whitespace   runs   ", "it's we'll they've I'm you'd ",
]

TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0,
         "q4_1": Q.Q4_1, "q4_k": Q.Q4_K, "q6_k": Q.Q6_K, "q4_k_m": Q.Q4_K}


def llama3_rope_factors(head_dim: int, theta: float, factor: float = 32.0, low: float = 1.0,
                        high: float = 4.0, original_context: int = 8192) -> tuple[float, ...]:
    """``rope_freqs`` values for llama3-style scaling, as convert_hf_to_gguf.py computes them."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original_context / high:
            out.append(1.0)
        elif wavelen > original_context / low:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(float(np.float32(f)) for f in out)


PRESETS = {
    "tiny": LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
                        ffn_dim=512, context_length=512, norm_eps=1e-5, rope_theta=10000.0),
    "llama3.2-1b": LlamaConfig(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
        ffn_dim=8192, context_length=131072, norm_eps=1e-5, rope_theta=500000.0,
        rope_freq_factors=llama3_rope_factors(64, 500000.0), tied_embeddings=True),
}


def train_tokenizer(size: int, pre: str) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE of at most ``size`` entries."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = PRE_TOKENIZERS[pre][0]()
    n_learned = max(0, min(size - len(SPECIALS) - len(USER_DEFINED), 256 + 2000))
    trainer = trainers.BpeTrainer(vocab_size=n_learned, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    learned = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = learned + SPECIALS + USER_DEFINED
    types = [1] * len(learned) + [3] * len(SPECIALS) + [4] * len(USER_DEFINED)
    if len(tokens) > size:
        raise ValueError(f"vocabulary of {size} is too small for a byte-level tokenizer")
    tokens += [f"<|unused_{i}|>" for i in range(size - len(tokens))]
    types += [5] * (size - len(types))
    return tokens, types, merges


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face row order -> llama.cpp's (pairs (i, i + D/2) become (2i, 2i + 1))."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp row order -> Hugging Face's (inverse of :func:`permute_qk`)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_blocks(rows: int, cols: int, qtype: Q, std: float, rng: np.random.Generator) -> np.ndarray:
    """Random but well-formed Q4_K / Q6_K blocks (gguf-py has no quantizer for them)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # w = d*sc*q - dmin*m, q in [0,16), sc and m in [0,64)
        d = np.full(n, std / 150, np.float16)
        raw[:, 0:2] = d.view(np.uint8).reshape(n, 2)
        raw[:, 2:4] = (d * np.float16(7.5)).view(np.uint8).reshape(n, 2)
    else:  # Q6_K: w = d*sc*(q-32), sc int8
        raw[:, 192:208] = rng.integers(-64, 65, size=(n, 16), dtype=np.int8).view(np.uint8)
        raw[:, 208:210] = np.full(n, std / 700, np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, cols // block * size)


def write_synthetic(path: str | os.PathLike[str], config: LlamaConfig, dtype: str = "f32", *,
                    seed: int = 0, pre: str = "llama-bpe") -> str:
    """Write a llama GGUF of ``config``'s shape with random weights stored as ``dtype``."""
    if dtype not in TYPES:
        raise ValueError(f"dtype must be one of {', '.join(TYPES)}")
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_name("driftwood-synthetic")
    w.add_context_length(config.context_length)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)

    tokens, types, merges = train_tokenizer(config.vocab_size, pre)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|eot_id|>"))
    w.add_add_bos_token(PRE_TOKENIZERS[pre][2])
    w.add_chat_template(LLAMA3_CHAT_TEMPLATE)

    def randn(*shape: int, std: float) -> np.ndarray:
        return (torch.randn(*shape, generator=g) * std).numpy()

    def add(name: str, arr: np.ndarray, qtype: Q) -> None:
        if arr.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)

    def matrix(name: str, rows: int, cols: int, std: float, heads: int = 0) -> None:
        qtype = TYPES[dtype]
        if dtype == "q4_k_m" and name.endswith(("attn_v.weight", "ffn_down.weight")):
            qtype = Q.Q6_K
        if qtype in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(name, _random_blocks(rows, cols, qtype, std, rng), raw_dtype=qtype)
            return
        arr = randn(rows, cols, std=std)
        add(name, permute_qk(arr, heads) if heads else arr, qtype)

    # Small embeddings keep the input token from dominating the residual stream, and a large
    # final norm spreads the logits, so greedy continuations vary and are far from ties.
    c = config
    embd_std = 0.05
    matrix("token_embd.weight", c.vocab_size, c.dim, std=embd_std)
    if c.rope_freq_factors is not None:
        add("rope_freqs.weight", np.array(c.rope_freq_factors, np.float32), Q.F32)
    head_std = embd_std if c.tied_embeddings else c.dim**-0.5
    add("output_norm.weight", (1 + randn(c.dim, std=0.1)) * 8 / (head_std * c.dim**0.5), Q.F32)
    if not c.tied_embeddings:
        matrix("output.weight", c.vocab_size, c.dim, std=head_std)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", 1 + randn(c.dim, std=0.1), Q.F32)
        add(p + "ffn_norm.weight", 1 + randn(c.dim, std=0.1), Q.F32)
        matrix(p + "attn_q.weight", c.q_dim, c.dim, c.dim**-0.5, heads=c.n_heads)
        matrix(p + "attn_k.weight", c.kv_dim, c.dim, c.dim**-0.5, heads=c.n_kv_heads)
        matrix(p + "attn_v.weight", c.kv_dim, c.dim, c.dim**-0.5)
        matrix(p + "attn_output.weight", c.dim, c.q_dim, c.q_dim**-0.5)
        matrix(p + "ffn_gate.weight", c.ffn_dim, c.dim, c.dim**-0.5)
        matrix(p + "ffn_up.weight", c.ffn_dim, c.dim, c.dim**-0.5)
        matrix(p + "ffn_down.weight", c.dim, c.ffn_dim, c.ffn_dim**-0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m driftwood.model.synthetic", description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--dtype", choices=sorted(TYPES), default="f32")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--pre", choices=sorted(PRE_TOKENIZERS), default="llama-bpe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    config = PRESETS[args.preset]
    if args.layers is not None:
        config = dataclasses.replace(config, n_layers=args.layers)
    write_synthetic(args.output, config, args.dtype, seed=args.seed, pre=args.pre)
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

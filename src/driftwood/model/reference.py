"""Reference implementation for checks: transformers' ``LlamaForCausalLM`` on a GGUF's weights.

Independent of the engine's own loading: tensors are dequantized with
``gguf.quants.dequantize`` (numpy), Q and K rows are put back in Hugging Face's order, and
``rope_freqs`` (llama3 scaling) divides the model's inverse frequencies, as llama.cpp does.
``transformers`` is imported here only, lazily; it is a test and benchmark dependency.
"""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np
import torch

from driftwood.model.config import LlamaConfig
from driftwood.model.gguf import GGUFFile
from driftwood.model.synthetic import unpermute_qk


def hf_state_dict(path: str | os.PathLike[str]) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """The GGUF's config and its weights as float32 tensors under Hugging Face names."""
    with GGUFFile(path) as f:
        config = LlamaConfig.from_gguf(f.metadata, f.tensors)
    reader = gguf.GGUFReader(os.fspath(path))
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(n) for n in reversed(t.shape.tolist())))
        if t.name.startswith("blk."):
            _, i, kind, _ = t.name.split(".")
            if kind == "attn_q":
                w = unpermute_qk(w, config.n_heads)
            elif kind == "attn_k":
                w = unpermute_qk(w, config.n_kv_heads)
            state[f"model.layers.{i}.{per_layer[kind]}.weight"] = torch.from_numpy(w.copy())
        elif t.name in names:
            state[names[t.name]] = torch.from_numpy(w.copy())
    if config.tied_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return config, state


def hf_model(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> Any:
    """``transformers.LlamaForCausalLM`` holding the GGUF's (dequantized) weights."""
    import transformers

    config, state = hf_state_dict(path)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.context_length, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tied_embeddings,
        attention_bias=False, mlp_bias=False,
    )
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    rotary = model.model.rotary_emb
    inv = rotary.inv_freq.to(torch.float32)
    if config.rope_freq_factors is not None:
        inv = inv / torch.tensor(config.rope_freq_factors, dtype=torch.float32)
    rotary.inv_freq = (inv / config.rope_scale).to(rotary.inv_freq.device)
    return model.to(device=device, dtype=dtype).eval()

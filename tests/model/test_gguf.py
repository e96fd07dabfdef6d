"""The GGUF loader: every supported tensor type unpacks exactly as gguf-py's reference
dequantizer does, files are memory-mapped, and unsupported inputs fail with one clear error."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from driftwood.errors import ModelError, UnsupportedModel
from driftwood.model import load_model
from driftwood.model.gguf import SUPPORTED_TYPES, GGUFFile, load_gguf
from driftwood.model.synthetic import TYPES

QUANT_DTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "q4_k_m"]


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
def test_dequantize_matches_reference(tiny_gguf, dtype):
    """Every tensor, dequantized by the engine in torch, equals gguf.quants.dequantize (compared
    in float64, exactly)."""
    path = tiny_gguf(dtype)
    reader = gguf.GGUFReader(path)
    metadata, tensors = load_gguf(path)
    seen = set()
    for t in reader.tensors:
        ref = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)
        ours = tensors[t.name].dequantize(torch.float32).double().numpy()
        assert ours.shape == tuple(reversed(t.shape.tolist()))
        np.testing.assert_array_equal(ours.reshape(ref.shape), ref, err_msg=t.name)
        seen.add(t.tensor_type)
    assert TYPES[dtype] in seen
    assert metadata["general.architecture"] == "llama"


def test_supported_types_are_the_issue_list():
    assert {t.name for t in SUPPORTED_TYPES} == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}


def test_tensors_view_the_mapped_file(tiny_gguf):
    """Float tensors in their stored dtype come back as views of the map, not copies."""
    with GGUFFile(tiny_gguf("f32")) as f:
        t = f.tensors["blk.0.attn_q.weight"]
        w = t.dequantize(torch.float32)
        assert np.shares_memory(w.numpy(), t.raw)


def _write(path, arch="llama", tensor_type=gguf.GGMLQuantizationType.F32):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    data = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    if tensor_type == gguf.GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", data)
    else:
        w.add_tensor("token_embd.weight", gguf.quants.quantize(data, tensor_type), raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_tensor_type_is_named(tmp_path):
    path = _write(tmp_path / "q5.gguf", tensor_type=gguf.GGMLQuantizationType.Q5_0)
    with pytest.raises(UnsupportedModel, match=r"unsupported tensor type Q5_0 \(in token_embd.weight\)"):
        load_model(str(path), device="cpu", progress=False)


def test_unsupported_architecture_is_named(tmp_path):
    path = _write(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(UnsupportedModel, match="unsupported model architecture 'gpt2'"):
        load_model(str(path), device="cpu", progress=False)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        load_model(str(path), device="cpu", progress=False)

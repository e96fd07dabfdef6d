"""Batched decode (sequences of different lengths stepping together) and the fused decode step
of driftwood.model.cuda, on the CPU against single-sequence decode; the Triton kernels under
Triton's interpreter when Triton is installed; graphs against the eager step on CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from driftwood.model import load_model
from driftwood.model.cuda.decoder import DecodeStep, GraphDecoder, TorchOps, TritonOps, bucket
from driftwood.model.gguf import GGUFFile, Q, dequantize_bytes
from driftwood.model.weights import BlockLinear
from tests.model.conftest import TINY_LLAMA3

PROMPTS = [[5, 17, 99, 3], [42], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 200, 201]]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return load_model(str(tiny_gguf("q4_0", TINY_LLAMA3)), device="cpu", dtype="float32", progress=False)


def single(model, prompt, steps):
    """Logits after the prompt and after each of ``steps`` greedy tokens, one sequence."""
    s = model.new_session(capacity=64)
    out = [s.prefill(prompt)]
    for _ in range(steps):
        out.append(s.decode(int(out[-1].argmax())))
    return torch.stack(out)


def test_batch_decode_matches_single_sequences(model):
    batch = model.new_batch(len(PROMPTS), capacity=64)
    logits = [[batch.prefill(b, p)] for b, p in enumerate(PROMPTS)]
    assert batch.positions == [len(p) for p in PROMPTS]
    for _ in range(4):
        step = batch.decode([int(row[-1].argmax()) for row in logits])
        assert step.shape == (len(PROMPTS), model.config.vocab_size)
        for b in range(len(PROMPTS)):
            logits[b].append(step[b])
    for b, p in enumerate(PROMPTS):
        torch.testing.assert_close(torch.stack(logits[b]), single(model, p, 4), rtol=1e-4, atol=1e-4)
    batch.reset(1)
    assert batch.positions[1] == 0
    with pytest.raises(ValueError):
        batch.decode([1])


def test_fused_step_matches_eager(model):
    """The step GraphDecoder captures, run with torch ops: per-row positions, padding rows."""
    cache = model.new_cache(bucket(3), 64)
    eager = model.new_batch(3, capacity=64)
    for b, p in enumerate(PROMPTS):
        eager.prefill(b, p)
    cache.k[:, :3].copy_(eager.cache.k)
    cache.v[:, :3].copy_(eager.cache.v)
    dec = GraphDecoder(model.transformer, cache, graphs=False, ops=TorchOps())
    pos = eager.positions
    fused = dec([1, 2, 3], pos)
    want = eager.decode([1, 2, 3])
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.k[:, :3], eager.cache.k, rtol=1e-5, atol=1e-5)
    assert isinstance(dec.step, DecodeStep)


@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
def test_block_linear_keeps_the_file_blocks(tiny_gguf, dtype):
    with GGUFFile(tiny_gguf(dtype, TINY_LLAMA3)) as f:
        parts = [f.tensors["blk.0.attn_q.weight"], f.tensors["blk.0.attn_k.weight"]]
        lin = BlockLinear(parts, torch.device("cpu"))
        want = torch.cat([dequantize_bytes(p.bytes_tensor(), p.qtype, p.shape[-1], torch.float32)
                          for p in parts])
        assert parts[0].qtype == {"q4_0": Q.Q4_0, "q8_0": Q.Q8_0}[dtype]
    assert lin.codes.dtype == torch.int32  # repacked words: the file's bytes, columns permuted
    assert lin.codes.numel() == want.numel() // (8 if dtype == "q4_0" else 4)
    torch.testing.assert_close(lin.dequantize(torch.float32), want, rtol=0, atol=0)
    x = torch.randn(3, want.shape[1])
    torch.testing.assert_close(lin(x), x @ want.t(), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA, test_kernels_on_cuda runs them")
def test_kernels_under_the_interpreter():
    """Each Triton kernel against its torch counterpart on tiny shapes (TRITON_INTERPRET=1)."""
    import os
    import subprocess
    import sys

    code = "from tests.model.kernel_check import main; main()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


@needs_cuda
@needs_triton
def test_kernels_on_cuda():
    from tests.model.kernel_check import main

    main("cuda")


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", ["q4_0", "q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 6, 12, 20, 40])  # one row, 4, 8, 16, 32 and 64 rows' configurations
def test_graphs_match_the_eager_fused_step(tiny_gguf, dtype, rows):
    m = load_model(str(tiny_gguf(dtype, TINY_LLAMA3)), device="cuda", dtype="bfloat16", progress=False)
    assert m.graphs and m.weights == "quant"
    batch = m.new_batch(rows, capacity=128)
    for b in range(rows):
        batch.prefill(b, PROMPTS[b % 3][: 1 + b % 5])
    tokens = [1 + b for b in range(rows)]
    pos = list(batch.positions)
    eager = GraphDecoder(m.transformer, batch.cache, graphs=False)
    saved = batch.cache.k.clone(), batch.cache.v.clone()
    want = eager(tokens, pos).clone()
    batch.cache.k.copy_(saved[0])
    batch.cache.v.copy_(saved[1])
    got = batch.decode(tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and against the torch ops in float32 on the same (dequantized) weights
    ref = GraphDecoder(m.transformer, batch.cache, graphs=False, ops=TorchOps())
    batch.cache.k.copy_(saved[0])
    batch.cache.v.copy_(saved[1])
    r = ref(tokens, pos)
    assert float((got - r).norm() / r.norm()) < 5e-2


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", ["bf16", "q4_0"])
def test_pdl_graph_matches_the_plain_eager_step(tiny_gguf, dtype):
    """Programmatic dependent launch in a graph: the same bits as the step without it."""
    m = load_model(str(tiny_gguf(dtype, TINY_LLAMA3)), device="cuda", dtype="bfloat16", progress=False)
    batch = m.new_batch(1, capacity=128)
    batch.prefill(0, PROMPTS[0])
    tokens, pos = [7], list(batch.positions)
    saved = batch.cache.k.clone(), batch.cache.v.clone()
    want = GraphDecoder(m.transformer, batch.cache, graphs=False, ops=TritonOps(pdl=False))(tokens, pos).clone()
    for _ in range(3):  # captured, then replayed
        batch.cache.k.copy_(saved[0])
        batch.cache.v.copy_(saved[1])
        got = GraphDecoder(m.transformer, batch.cache, ops=TritonOps(pdl=True))(tokens, pos)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cuda
@needs_triton
def test_adaptive_attention_matches_every_split_then_the_combine(tiny_gguf):
    """Attention that runs only the splits holding keys (one writes the output, more are
    combined by the last to finish): the same bits as every split then the combine kernel for
    rows in one split and at a split's edge (two), replayed (the counters reset); a row over
    three splits sums them in another order (kernel_check), so its logits are only close."""
    m = load_model(str(tiny_gguf("q4_0", TINY_LLAMA3)), device="cuda", dtype="bfloat16", progress=False)
    from driftwood.model.cuda.kernels import attention_splits

    cap = 600
    assert attention_splits(cap) == (4, 192)
    batch = m.new_batch(4, capacity=cap)
    g = torch.Generator().manual_seed(3)
    vocab = m.config.vocab_size
    for b, n in enumerate([3, 191, 192, 450]):  # decode at positions 3, 191 (1 split), 192 (2), 450 (3)
        batch.prefill(b, torch.randint(0, vocab, (n,), generator=g).tolist())
    tokens, pos = [1, 2, 3, 4], list(batch.positions)
    saved = batch.cache.k.clone(), batch.cache.v.clone()
    runs = {}
    for adaptive in (False, True):
        dec = GraphDecoder(m.transformer, batch.cache, ops=TritonOps(adaptive_attention=adaptive))
        for _ in range(3):  # captured, then replayed
            batch.cache.k.copy_(saved[0])
            batch.cache.v.copy_(saved[1])
            runs.setdefault(adaptive, []).append(dec(tokens, pos).clone())
        assert not dec.step.counters.any()
    for got in runs[True]:
        torch.testing.assert_close(got[:3], runs[False][0][:3], rtol=0, atol=0)
        assert float((got[3] - runs[False][0][3]).norm() / runs[False][0][3].norm()) < 1e-2


@needs_cuda
@needs_triton
def test_one_row_inputs_by_stream_writes_match_the_copied_inputs(tiny_gguf):
    """A session's one-row steps with the token and position written by cuStreamWriteValue64:
    the same logits as with them copied from a host tensor, token after token, queued without
    synchronizing (each write ordered after the step before it)."""
    m = load_model(str(tiny_gguf("q4_0", TINY_LLAMA3)), device="cuda", dtype="bfloat16", progress=False)
    runs = []
    for write in (True, False):
        m.graph_write_values = write
        s = m.new_session(capacity=64)
        s.prefill(PROMPTS[2])
        runs.append([s.decode(t) for t in (3, 1, 4, 1, 5, 9, 2, 6)])  # no synchronization between
        assert (s._decoder.write_value is not None) == write  # available on the CUDA devices we run
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(runs[0][0], runs[0][1])  # each step saw its own token

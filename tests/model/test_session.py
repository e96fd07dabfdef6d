"""Sessions and the generation stack on a tiny random model: KV state export and exact
restore, RNG state, truncation, chunked prefill, logits written into caller memory, limits."""

from __future__ import annotations

import pytest
import torch

from driftwood.errors import ContextFull, ModelError, SnapshotError
from driftwood.model import SamplingParams, load_model
from driftwood.model.generate import complete, generate, generate_tokens
from tests.model.conftest import TINY_LLAMA3


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return load_model(str(tiny_gguf("q4_k_m", TINY_LLAMA3)), device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def ids(model):
    return model.tokenizer.encode("Unicode: héllo wörld, naïve café. The quick brown fox jumps.")


def test_kv_state_round_trip_is_exact(model, ids):
    a = model.new_session(capacity=128, seed=3)
    a.prefill(ids)
    a.decode(5)
    state = {k: v.clone() for k, v in a.kv_state().items()}
    c = model.config
    assert state["k"].shape == (c.n_layers, c.n_kv_heads, len(ids) + 1, c.head_dim)
    # chunks by token range concatenate to the whole
    chunks = [a.kv_state(t0, min(t0 + 7, a.position)) for t0 in range(0, a.position, 7)]
    torch.testing.assert_close(torch.cat([ch["k"] for ch in chunks], dim=2), state["k"], rtol=0, atol=0)
    rng = a.rng_state()

    b = model.new_session(capacity=128, seed=99)
    b.load_kv_state(list(a.tokens), state, rng)
    assert b.tokens == a.tokens and b.position == a.position and b.rng_state() == rng
    params = SamplingParams(temperature=0.9, top_k=40)
    la, lb = a.decode(17), b.decode(17)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert [a.sample(la, params) for _ in range(10)] == [b.sample(lb, params) for _ in range(10)]


def test_load_kv_state_rejects_a_mismatch(model, ids):
    s = model.new_session(capacity=32)
    s.prefill(ids[:4])
    state = s.kv_state()
    with pytest.raises(SnapshotError, match="expected"):
        s.load_kv_state(ids[:5], state)
    with pytest.raises(SnapshotError):
        model.new_session(capacity=2).load_kv_state(ids[:4], state)


def test_truncate_then_continue_equals_fresh(model, ids):
    s = model.new_session(capacity=64)
    s.prefill(ids)
    s.truncate(5)
    assert s.tokens == ids[:5]
    got = s.prefill(ids[5:9])
    fresh = model.new_session(capacity=64)
    torch.testing.assert_close(got, fresh.prefill(ids[:9]), rtol=1e-5, atol=1e-4)


def test_prefill_in_pieces_and_chunks(model):
    long = (model.tokenizer.encode("The quick brown fox jumps over the lazy dog. ") * 60)[:700]
    one = model.new_session(capacity=800)
    whole = one.prefill(long)  # crosses PREFILL_CHUNK
    two = model.new_session(capacity=800)
    two.prefill(long[:300])
    torch.testing.assert_close(two.prefill(long[300:]), whole, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(one.kv_state()["v"], two.kv_state()["v"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_writes_logits_into_caller_memory(tiny_gguf, dtype):
    model = load_model(str(tiny_gguf("f32")), device="cpu", dtype=dtype, progress=False)
    s = model.new_session(capacity=16)
    s.prefill([1, 2, 3])
    backing = torch.full((model.config.vocab_size + 8,), float("nan"))
    out = backing[4:-4]  # a view into someone else's buffer
    ptr = out.data_ptr()
    got = s.decode(7, logits_out=out)
    assert got is out and out.data_ptr() == ptr and torch.isfinite(out).all()
    ref = model.new_session(capacity=16)
    ref.prefill([1, 2, 3])
    torch.testing.assert_close(out, ref.decode(7), rtol=0, atol=0)
    assert torch.isnan(backing[:4]).all() and torch.isnan(backing[-4:]).all()


def test_limits_and_close(model, ids):
    s = model.new_session(capacity=8)
    with pytest.raises(ContextFull):
        s.prefill(ids[:9])
    with pytest.raises(ValueError):
        s.prefill([model.config.vocab_size])
    s.prefill(ids[:8])
    with pytest.raises(ContextFull):
        s.decode(1)
    s.close()
    with pytest.raises(ModelError, match="closed"):
        s.prefill([1])


def test_generation_stack(model, ids):
    greedy = SamplingParams()
    s = model.new_session(capacity=64)
    logits = s.prefill(ids)
    manual = []
    for _ in range(12):
        manual.append(int(logits.argmax()))
        logits = s.decode(manual[-1])

    out = complete(model.new_session(capacity=64), ids, greedy, 12, stop_ids=())
    assert out.output_ids == manual and out.finish_reason == "length"
    assert out.text == model.tokenizer.decode(manual, skip_special=True)
    assert out.stats.generated_tokens == 12 and out.stats.prompt_tokens == len(ids)

    # a stop token ends generation, is reported, and contributes no text
    stop = manual[5]
    first = manual.index(stop)
    out = complete(model.new_session(capacity=64), ids, greedy, 12, stop_ids={stop})
    assert out.output_ids == manual[: first + 1] and out.finish_reason == "stop"
    assert out.text == model.tokenizer.decode(manual[:first], skip_special=True)

    # a full session ends generation with "context"
    chunks = list(generate(model.new_session(capacity=len(ids) + 3), ids, greedy, 12, stop_ids=()))
    assert chunks[-1].finish_reason == "context"
    assert [c.token for c in chunks[:-1]] == manual[:4]

    # the token layer leaves the last token unfed
    s = model.new_session(capacity=64)
    assert list(generate_tokens(s, ids, greedy, 3)) == manual[:3]
    assert s.tokens == ids + manual[:2]


def test_identity(tiny_gguf, model):
    again = load_model(str(model.path), device="cpu", dtype="bfloat16", progress=False)
    assert again.identity == model.identity and len(model.identity) == 32
    other = load_model(str(tiny_gguf("q4_0")), device="cpu", progress=False)
    assert other.identity != model.identity

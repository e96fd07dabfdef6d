"""wasi_ephemeral_nn as WasmEdge's GGML backend speaks it, from real guests.

The C guest (guests/wasinn_chat.c) runs through an Actor against the real default model;
a WAT guest that forwards raw i32 arguments to every import drives the interleaving and the
fuzzing, so every call crosses the real Wasmtime boundary.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from driftwood import toolchain
from driftwood.errors import LimitExceeded
from driftwood.model import SamplingParams
from driftwood.model.generate import complete
from driftwood.model.registry import resolve
from driftwood.model.synthetic import PRESETS, write_synthetic
from driftwood.runtime.abi import wasi_nn_options as opts
from driftwood.runtime.abi.wasi_nn import WasiNN
from driftwood.runtime.actor import Actor, Limits, WasiOptions
from driftwood.runtime.hostcall import GuestFault
from driftwood.runtime.models import ModelPool
from driftwood.runtime.module import GuestModule
from tests.conftest import forwarder, noisy_call, quiet, stray_writes, wat_module

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
LONGER = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
EOG = "<|im_end|>"
TINY_PROMPT = "The quick brown fox"  # few tokens for the synthetic model's tokenizer
ERRNOS = {0, 1, 2, 3, 4, 5, 6, 7, 8, 100, 101, 102, 103}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_synthetic(models / "tiny.gguf", dataclasses.replace(PRESETS["tiny"], context_length=4096))
    pool = ModelPool("cpu")
    pool.add("default", "smollm2")
    pool.add("tiny", str(models / "tiny.gguf"))
    pool.add("gone", str(models / "missing.gguf"))
    pool.get("tiny")
    return pool


@pytest.fixture(scope="module")
def model(pool):
    """The real default model (loaded once, outside any timed call)."""
    return pool.get("default")


@pytest.fixture(scope="module")
def tiny(pool):
    return pool.get("tiny")


@pytest.fixture(scope="module")
def chat():
    return GuestModule.load(toolchain.build_example("wasinn_chat"))


@dataclass
class Run:
    code: int
    out: bytes
    err: str
    work: list[tuple[int, int]]  # (cached, prefilled) of each context the guest left open

    @property
    def meta(self) -> list[dict]:
        return [json.loads(line[6:]) for line in self.err.splitlines() if line.startswith("meta: ")]


def run_chat(chat, pool, *args: str, limits: Limits | None = None) -> Run:
    """Run wasinn_chat with ``args``."""
    out, err = bytearray(), bytearray()
    wasi = WasiOptions(args=args, stdout=out.extend, stderr=err.extend)
    with Actor(chat, limits=limits, wasi=wasi, host_modules=[WasiNN.factory(pool)]) as actor:
        code = actor.run()
        work = [(ctx.cached, ctx.prefilled) for _, ctx in actor.hosts[0].contexts.items()]
    return Run(code, bytes(out), err.decode(), work)


def meta(**keys) -> str:
    return json.dumps({"temp": 0, "ctx-size": 512, **keys})


def engine_greedy(model, prompt: str, n: int, ctx: int = 512, stop_ids=None, **penalties):
    """The engine alone: the prompt's tokens, the greedy output tokens, their text."""
    ids = model.tokenizer.encode(prompt)
    with model.new_session(capacity=ctx) as session:
        done = complete(session, ids, SamplingParams(temperature=0.0, **penalties), n, stop_ids)
    return ids, done.output_ids, model.tokenizer.decode(done.output_ids, skip_special=False)


# -- (a) the C guest against the real model ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("prompt", [PROMPT, LONGER])
def test_compute_and_stream_match_the_engine(chat, pool, model, prompt):
    ids, out_ids, text = engine_greedy(model, prompt, 24)
    run = run_chat(chat, pool, "--meta", meta(**{"n-predict": 24}), "--print-meta", prompt)
    assert run.code == 0, run.err
    assert run.out == text.encode()
    assert run.meta == [{"input_tokens": len(ids), "output_tokens": len(out_ids),
                         "llama_build_number": 0, "llama_commit": "driftwood"}]

    stream = run_chat(chat, pool, "--meta", meta(), "--stream", "--max-tokens", "24", "--print-meta", prompt)
    assert stream.code == 0, stream.err
    # the streaming loop stops at end-of-sequence without printing that token's text
    ended = out_ids[-1] in model.tokenizer.stop_ids
    assert stream.out == (text.removesuffix(EOG) if ended else text).encode()
    assert stream.meta[0]["output_tokens"] == len(out_ids)


@pytest.mark.slow
def test_frequency_and_presence_penalties_reach_the_sampler(chat, pool, model):
    """WasmEdge's presence-penalty and frequency-penalty keys change what greedy decoding picks,
    exactly as the engine's sampler with the same settings does."""
    _, plain, _ = engine_greedy(model, LONGER, 24)
    _, ids, text = engine_greedy(model, LONGER, 24, frequency_penalty=0.5, presence_penalty=2.0)
    assert ids != plain
    run = run_chat(chat, pool, "--meta", meta(**{"n-predict": 24, "frequency-penalty": 0.5,
                                                 "presence-penalty": 2.0}), LONGER)
    assert run.code == 0, run.err
    assert run.out == text.encode()


@pytest.mark.slow
def test_selftest_edge_cases_from_the_guest(chat, pool, model):
    _, _, text = engine_greedy(model, PROMPT, 24)
    run = run_chat(chat, pool, "--meta", meta(**{"n-predict": 24}), "--selftest", PROMPT)
    assert run.code == 0 and "selftest: ok" in run.err, run.err
    assert f"needed: {len(text.encode())}\n" in run.err  # too small -> 7 with this size
    assert run.out == text.encode()


# -- (b) WasmEdge's fresh computes vs the opt-in KV cache ---------------------------------------


@pytest.mark.slow
def test_keep_kv_cache_prefills_only_the_new_suffix(chat, pool, model):
    tok = model.tokenizer
    ids1, out1, answer = engine_greedy(model, PROMPT, 16)
    turn2 = PROMPT + answer.removesuffix(EOG) + EOG + "\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n"
    ids2, out2, answer2 = engine_greedy(model, turn2, 16)

    fresh = run_chat(chat, pool, "--meta", meta(**{"n-predict": 16}), "--print-meta", PROMPT, turn2)
    kept = run_chat(chat, pool, "--meta", meta(**{"n-predict": 16, "keep-kv-cache": True}),
                    "--print-meta", PROMPT, turn2)
    assert fresh.code == kept.code == 0
    assert fresh.out.split(b"\x1e") == kept.out.split(b"\x1e") == [answer.encode(), answer2.encode()]

    # WasmEdge's default: the second compute evaluated the whole conversation again
    assert fresh.work == [(0, len(ids2))]
    assert "cached_tokens" not in fresh.meta[1]

    first, second = kept.meta
    assert (first["cached_tokens"], first["prefill_tokens"]) == (0, len(ids1))
    assert first["position"] == len(ids1) + len(out1) - 1  # the last token is never evaluated
    assert second["cached_tokens"] >= len(ids1)  # the whole first prompt, and most of the answer
    assert second["cached_tokens"] + second["prefill_tokens"] == len(ids2)
    assert second["prefill_tokens"] <= len(ids2) - len(ids1) - len(out1) + 4
    assert second["position"] == len(ids2) + len(out2) - 1
    assert tok.decode(ids2[: second["cached_tokens"]]).startswith(PROMPT)


@pytest.mark.slow
def test_keep_kv_cache_resets_when_the_prompt_changes(chat, pool, model):
    _, _, text = engine_greedy(model, LONGER, 8)
    kept = run_chat(chat, pool, "--meta", meta(**{"n-predict": 8, "keep-kv-cache": True}),
                    "--print-meta", PROMPT, LONGER)
    assert kept.code == 0 and kept.out.split(b"\x1e")[1] == text.encode()
    shared = len(model.tokenizer.encode("<|im_start|>user\n"))
    assert kept.meta[1]["cached_tokens"] == shared  # only the common template prefix


# -- a WAT guest that forwards raw arguments to every import ------------------------------------

SIGNATURES = {
    "load": 5, "load_by_name": 3, "load_by_name_with_config": 5, "init_execution_context": 2,
    "set_input": 3, "compute": 1, "compute_single": 1, "fini_single": 1, "get_output": 5,
    "get_output_single": 5, "unload": 1, "finalize_execution_context": 1,
}
PAGES = 4
MEM = PAGES * 65536


FORWARDER = forwarder("wasi_ephemeral_nn", SIGNATURES, PAGES)

# where the driver lays out arguments in the forwarder's memory
OUT_U32 = 0x100  # a u32 out-parameter
TENSOR_AT = 0x200  # a 20-byte tensor
DIMS_AT = 0x300
DATA_AT = 0x1000  # prompt, metadata, names
OUT_AT = 0x10000  # output buffers
OUT_MAX = MEM - OUT_AT


class Driver:
    """Calls through the forwarding guest, laying the arguments out in its memory."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor
        self.mem = actor.memory

    def __call__(self, name: str, *args: int) -> int:
        return self.actor.call(name, *(a if a < 2**31 else a - 2**32 for a in args))

    def out_u32(self) -> int:
        return self.mem.read_u32(OUT_U32)

    def load_by_name(self, name: str) -> int:
        self.mem.write(DATA_AT, name.encode())
        assert self("load_by_name", DATA_AT, len(name.encode()), OUT_U32) == 0
        return self.out_u32()

    def context(self, graph: int) -> int:
        assert self("init_execution_context", graph, OUT_U32) == 0
        return self.out_u32()

    def set_input(self, ctx: int, index: int, data: bytes, kind: int = 3) -> int:
        self.mem.write(DIMS_AT, struct.pack("<I", len(data)))
        self.mem.write(TENSOR_AT, struct.pack("<5I", DIMS_AT, 1, kind, DATA_AT, len(data)))
        self.mem.write(DATA_AT, data)
        return self("set_input", ctx, index, TENSOR_AT)

    def output(self, ctx: int, index: int = 0, single: bool = False) -> bytes:
        rc = self("get_output_single" if single else "get_output", ctx, index, OUT_AT, OUT_MAX, OUT_U32)
        assert rc == 0
        return self.mem.read(OUT_AT, self.out_u32())

    def stream(self, ctx: int) -> tuple[int, bytes]:
        rc = self("compute_single", ctx)
        return rc, self.output(ctx, single=True) if rc == 0 else b""


@pytest.fixture
def driver(pool):
    with Actor(wat_module(FORWARDER, "wasi-nn-forwarder.wasm"), wasi=quiet(),
               host_modules=[WasiNN.factory(pool, max_model_bytes=1 << 16)]) as actor:
        yield Driver(actor)


# -- (c) two contexts of one graph do not disturb each other --------------------------------------


def test_two_contexts_of_one_graph_interleave_cleanly(driver):
    graph = driver.load_by_name("tiny")
    prompts = [PROMPT.encode(), LONGER.encode()]
    steps = 12

    def stream(ctx: int, n: int = steps) -> bytes:
        pieces = b""
        for _ in range(n):
            rc, piece = driver.stream(ctx)
            pieces += piece
            if rc:
                break
        return pieces

    def setup(ctx: int, prompt: bytes) -> None:
        assert driver.set_input(ctx, 1, b'{"temp": 0, "ctx-size": 256, "n-predict": %d}' % steps) == 0
        assert driver.set_input(ctx, 0, prompt) == 0

    def alone(prompt: bytes) -> tuple[bytes, bytes]:
        """(streamed, computed) output of a context of its own."""
        ctx = driver.context(graph)
        setup(ctx, prompt)
        streamed = stream(ctx)
        assert driver.set_input(ctx, 0, prompt) == 0 and driver("compute", ctx) == 0
        computed = driver.output(ctx)
        assert driver("finalize_execution_context", ctx) == 0
        return streamed, computed

    (stream_a, compute_a), (stream_b, compute_b) = (alone(p) for p in prompts)
    a, b = driver.context(graph), driver.context(graph)
    for ctx, prompt in zip((a, b), prompts, strict=True):
        setup(ctx, prompt)
    streamed = {a: b"", b: b""}
    live = {a: True, b: True}
    for _ in range(steps):
        for ctx in (a, b):
            if live[ctx]:
                rc, piece = driver.stream(ctx)
                streamed[ctx] += piece
                live[ctx] = rc == 0
    assert [streamed[a], streamed[b]] == [stream_a, stream_b]

    # a whole compute on b between two of a's streaming steps leaves both intact
    for ctx, prompt in zip((a, b), prompts, strict=True):
        assert driver.set_input(ctx, 0, prompt) == 0
    rc, first = driver.stream(a)
    assert rc == 0 and driver("compute", b) == 0
    assert first + stream(a, steps - 1) == stream_a
    assert driver.output(b) == compute_b
    assert driver.set_input(a, 0, prompts[0]) == 0 and driver("compute", a) == 0
    assert driver.output(a) == compute_a


def test_graph_keys_are_shared_context_keys_are_not(pool):
    streamed = bytearray()
    with Actor(wat_module(FORWARDER, "wasi-nn-scopes.wasm"), wasi=WasiOptions(stdout=streamed.extend, stderr=None),
               host_modules=[WasiNN.factory(pool)]) as actor:
        d = Driver(actor)
        graph = d.load_by_name("tiny")
        a, b = d.context(graph), d.context(graph)
        # graph keys (temp, ctx-size) reach b too; context keys (n-predict, stream-stdout) do not
        assert d.set_input(a, 1, b'{"temp": 0, "ctx-size": 64, "n-predict": 3, "stream-stdout": true}') == 0
        for ctx in (a, b):
            assert d.set_input(ctx, 0, TINY_PROMPT.encode()) == 0
        assert d("compute", a) == 0
        assert bytes(streamed) == d.output(a) and streamed
        del streamed[:]
        assert d("compute", b) in (0, opts.CONTEXT_FULL)
        assert streamed == b""
        meta_a, meta_b = json.loads(d.output(a, 1)), json.loads(d.output(b, 1))
        assert meta_a["output_tokens"] == 3 < meta_b["output_tokens"]
        assert d.output(b).startswith(d.output(a))  # both greedy: one prompt, one graph
        # a context made after a graph-level change still starts from the graph's defaults
        c = d.context(graph)
        assert actor.hosts[0].contexts.get(c).options.n_predict == -1


def test_kv_memory_is_bounded_per_actor(pool, tiny):
    c = tiny.config
    per_token = c.n_layers * 2 * c.n_kv_heads * c.head_dim * tiny.dtype.itemsize  # (k, v)
    with Actor(wat_module(FORWARDER, "wasi-nn-kv.wasm"), wasi=quiet(),
               host_modules=[WasiNN.factory(pool, max_kv_bytes=2 * 64 * per_token)]) as actor:
        d = Driver(actor)
        graph = d.load_by_name("tiny")
        ctxs = [d.context(graph) for _ in range(3)]
        for ctx in ctxs:
            assert d.set_input(ctx, 1, b'{"temp": 0, "ctx-size": 64, "n-predict": 1}') == 0
            assert d.set_input(ctx, 0, TINY_PROMPT.encode()) == 0
        assert [d("compute", ctx) for ctx in ctxs] == [0, 0, opts.TOO_LARGE]
        assert d("finalize_execution_context", ctxs[0]) == 0
        assert d("compute", ctxs[2]) == 0
        for _ in range(20):  # contexts beyond the limit of 16
            rc = d("init_execution_context", graph, OUT_U32)
        assert rc == opts.BUSY


# -- (d) every function, hostile arguments, from the forwarding guest ---------------------------------

hostile_ptr = st.sampled_from([MEM - 4, MEM - 1, MEM, MEM + 4096, 2**31 - 1, 2**32 - 4, 2**32 - 1])
hostile_len = st.sampled_from([MEM, MEM + 1, 2**31, 2**32 - 1])
TINY = b"<the tiny model's path>"  # replaced when the call is made, like "graph" and "ctx"


def mostly(valid, *others):
    """Usually ``valid`` (a value or a strategy), sometimes one of ``others``."""
    valid = valid if isinstance(valid, st.SearchStrategy) else st.just(valid)
    return st.one_of(valid, valid, valid, *others)


def handles(live: str):
    """The live graph or context (resolved when the call is made), or any u32."""
    return mostly(live, st.integers(0, 40), st.integers(0, 2**32 - 1))


def ptr(valid: int | None = None, size: int = 4):
    """``valid``, or any in-range aligned pointer to ``size`` bytes, or a hostile one."""
    anywhere = st.integers(0, (MEM - size) // 4).map(lambda i: 4 * i)
    return mostly(anywhere if valid is None else valid, anywhere, hostile_ptr)


def length(valid):
    return mostly(valid, hostile_len)


metadata_docs = st.one_of(
    st.just(b'{"n-predict": 2}'),
    st.fixed_dictionaries({}, optional={
        "n-predict": st.one_of(st.integers(-3, 4), st.text(max_size=3), st.floats(allow_nan=False)),
        "temp": st.one_of(st.floats(-1, 2), st.booleans(), st.integers(0, 2)),
        "ctx-size": st.one_of(st.integers(-5, 10**9), st.none()),
        "top-k": st.integers(-(2**63), 2**64),
        "grammar": st.sampled_from(["", "root ::= x"]),
        "reverse-prompt": st.text(max_size=4),
        "keep-kv-cache": st.one_of(st.booleans(), st.integers(0, 1)),
        "seed": st.integers(-(2**63), 2**63 - 1),
    }).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"{", b"[1, 2]", b"nul", b'{"temp": NaN}', b'{"temp": 1e999}', b"\xff{}"]),
)


@st.composite
def calls(draw):
    """One call: the function, its arguments (mostly valid, hostile values swapped in), and
    the bytes to lay out in memory first."""
    name = draw(st.sampled_from(sorted(SIGNATURES)))
    data = draw(st.one_of(st.just(TINY_PROMPT.encode()), metadata_docs, st.binary(max_size=64)))
    layout: list[tuple[int, bytes]] = [(DATA_AT, data)]
    data_len = draw(length(len(data)))
    if name == "load":
        model = draw(st.sampled_from([b"preload:" + TINY, b"preload:/etc/passwd", b"preload:missing.gguf",
                                      b"GGUF\x03\x00\x00\x00", data]))
        layout.append((DATA_AT + 0x800, model))
        layout.append((TENSOR_AT, struct.pack("<4I", DATA_AT + 0x800, len(model), DATA_AT, data_len)))
        args = (draw(ptr(TENSOR_AT)), draw(mostly(st.integers(1, 2), st.just(0), st.just(17), st.just(2**31))),
                draw(mostly(6, st.sampled_from([0, 5, 7, 2**32 - 1]))), draw(mostly(st.integers(0, 3), st.just(4))),
                draw(ptr()))
    elif name in ("load_by_name", "load_by_name_with_config"):
        model = draw(st.sampled_from([b"tiny", b"default", b"gone", b"nope", b"\xff\xfe"]))
        layout.append((DATA_AT + 0x800, model))
        config = (draw(ptr(DATA_AT)), data_len) if name.endswith("config") else ()
        args = (draw(ptr(DATA_AT + 0x800)), draw(length(len(model))), *config, draw(ptr()))
    elif name == "init_execution_context":
        args = (draw(handles("graph")), draw(ptr()))
    elif name == "set_input":
        layout.append((DIMS_AT, struct.pack("<I", len(data))))
        layout.append((TENSOR_AT, struct.pack(
            "<5I", draw(ptr(DIMS_AT)), draw(mostly(1, st.just(0), st.just(2**30))),
            draw(mostly(3, st.sampled_from([0, 1, 2, 4, 5, 9]))), draw(ptr(DATA_AT)), data_len)))
        args = (draw(handles("ctx")), draw(mostly(st.sampled_from([0, 1]), st.just(2), st.just(2**32 - 1))),
                draw(ptr(TENSOR_AT, 20)))
    elif name in ("get_output", "get_output_single"):
        args = (draw(handles("ctx")), draw(mostly(st.sampled_from([0, 1]), st.just(2))), draw(ptr(OUT_AT)),
                draw(length(st.one_of(st.integers(0, 16), st.integers(0, OUT_MAX)))), draw(ptr(OUT_U32)))
    elif name in ("unload",):
        args = (draw(handles("graph")),)
    else:
        args = (draw(handles("ctx")),)
    return name, args, layout


def _writes(name: str, args: tuple[int, ...], rc: int) -> list[tuple[int, int]]:
    """The (offset, size) ranges a call may write: its out-parameters, and the output buffer."""
    if rc == opts.TOO_LARGE and name.startswith("get_output"):
        return [(args[4], 4)]
    if rc != 0:
        return []
    if name.startswith("load") or name == "init_execution_context":
        return [(args[-1], 4)]
    if name.startswith("get_output"):
        return [(args[2], args[3]), (args[4], 4)]
    return []


@pytest.fixture(scope="module")
def fuzz_actor(pool):
    with Actor(wat_module(FORWARDER, "wasi-nn-fuzz.wasm"), wasi=quiet(),
               host_modules=[WasiNN.factory(pool, max_model_bytes=1 << 16)]) as actor:
        yield Driver(actor)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=calls(), seed=st.integers(0, 2**32 - 1), computed=st.booleans())
def test_every_function_survives_hostile_arguments(fuzz_actor, call, seed, computed, caplog):
    d = fuzz_actor
    host: WasiNN = d.actor.hosts[0]
    # a live graph with a context holding a prompt, maybe a finished generation
    for handle, _ in host.contexts.items():
        assert d("finalize_execution_context", handle) == 0
    graph = d.load_by_name("tiny")
    ctx = d.context(graph)
    assert d.set_input(ctx, 1, b'{"temp": 0, "ctx-size": 48, "n-predict": 2, "ignore-eos": false}') == 0
    assert d.set_input(ctx, 0, TINY_PROMPT.encode()) == 0
    if computed:
        assert d("compute", ctx) == 0
    name, args, layout = call
    args = tuple({"graph": graph, "ctx": ctx}.get(a, a) for a in args)
    tiny = str(host.pool.spec("tiny")).encode()
    layout = [(offset, data.replace(TINY, tiny)) for offset, data in layout]
    if name == "load" and layout[1][1].endswith(tiny):  # the builder table holds its length
        layout[2] = (TENSOR_AT, struct.pack("<2I", DATA_AT + 0x800, len(layout[1][1])) + layout[2][1][8:])
    rc, changed = noisy_call(d, MEM, seed, layout, name, args)

    event(f"{name} -> {rc}")
    assert rc in ERRNOS and rc != opts.RUNTIME_ERROR, rc
    assert "failed" not in caplog.text
    assert not stray_writes(changed, _writes(name, args, rc), MEM).size, f"{name}{args} -> {rc} wrote outside its outputs"
    if rc != 0 and not (rc == opts.TOO_LARGE and name.startswith("get_output")):
        assert changed.size == 0  # a refused call touches nothing


def test_out_of_range_pointers_are_invalid_arguments(driver):
    graph = driver.load_by_name("tiny")
    ctx = driver.context(graph)
    for bad in (MEM - 3, MEM, 2**32 - 1):
        assert driver("load_by_name", DATA_AT, 7, bad) == 1
        assert driver("load_by_name", bad, 7, OUT_U32) == 1
        assert driver("init_execution_context", graph, bad) == 1
        assert driver("set_input", ctx, 0, bad) == 1
        assert driver("get_output", ctx, 0, bad, 16, OUT_U32) == 1
        assert driver("get_output", ctx, 0, OUT_AT, 16, bad) == 1
        assert driver("get_output_single", ctx, 0, OUT_AT, 16, bad) == 1
        assert driver("load", bad, 1, 6, 0, OUT_U32) == 1
    assert driver("get_output", ctx, 0, OUT_AT, 2**32 - 1, OUT_U32) == 1


# -- loading from builders ---------------------------------------------------------------------------


@pytest.mark.slow  # preloads the real default model by its path
def test_load_builders(driver, pool):
    mem = driver.mem

    def load(builder0: bytes, meta: bytes | None = None, encoding: int = 6, target: int = 0) -> int:
        parts = [builder0] + ([meta] if meta is not None else [])
        table, at = b"", DATA_AT
        for part in parts:
            mem.write(at, part)
            table += struct.pack("<2I", at, len(part))
            at += len(part) + 16
        mem.write(TENSOR_AT, table)
        return driver("load", TENSOR_AT, len(parts), encoding, target, OUT_U32)

    host: WasiNN = driver.actor.hosts[0]
    assert host._preload_name(str(resolve("smollm2"))) == "default"  # registered by its name
    path = pool.spec("tiny")
    assert load(b"preload:" + path.encode(), b'{"ctx-size": 64}') == 0
    graph = driver.out_u32()
    assert host.graphs.get(graph).options.ctx_size == 64
    assert load(b"preload:/etc/passwd") == opts.MODEL_NOT_FOUND  # only what the host registered
    assert load(b"preload:" + path.encode(), b"{oops") == opts.INVALID_ENCODING
    assert load(b"preload:" + path.encode(), encoding=0) == opts.INVALID_ARGUMENT  # OpenVINO
    assert load(b"preload:" + path.encode(), encoding=9) == opts.INVALID_ENCODING
    assert load(b"preload:" + path.encode(), target=7) == opts.INVALID_ARGUMENT
    assert load(b"GGUF" + bytes(60)) == opts.INVALID_ARGUMENT  # bytes that do not load
    assert load(bytes(1 << 16 | 1)) == opts.TOO_LARGE  # over this host's max_model_bytes
    assert host._scratch is None or not any(host._scratch.iterdir())  # failed loads leave no files


def test_load_raw_gguf_bytes(pool):
    """Builder 0 holding the GGUF file itself: the graph behaves as the preloaded file does."""
    blob = pool.get("tiny").path.read_bytes()
    pages = (DATA_AT + len(blob)) // 65536 + 2
    with Actor(wat_module(forwarder("wasi_ephemeral_nn", SIGNATURES, pages), "wasi-nn-big.wasm"), wasi=quiet(),
               host_modules=[WasiNN.factory(pool)]) as actor:
        d = Driver(actor)
        d.mem.write(DATA_AT, blob)
        d.mem.write(TENSOR_AT, struct.pack("<2I", DATA_AT, len(blob)))
        assert d("load", TENSOR_AT, 1, 6, 3, OUT_U32) == 0  # GGML, AUTO
        raw = d.out_u32()
        scratch = actor.hosts[0].graphs.get(raw).scratch
        assert scratch.is_file() and scratch.stat().st_mode & 0o077 == 0
        texts = []
        for graph in (raw, d.load_by_name("tiny")):
            ctx = d.context(graph)
            assert d.set_input(ctx, 1, b'{"temp": 0, "n-predict": 8, "ctx-size": 64}') == 0
            assert d.set_input(ctx, 0, TINY_PROMPT.encode()) == 0
            assert d("compute", ctx) == 0
            texts.append(d.output(ctx))
        assert texts[0] == texts[1] and texts[0]
        assert d("unload", raw) == 0
        assert scratch.is_file()  # its context still drains
        assert d("finalize_execution_context", 0) == 0
        assert not scratch.exists()


# -- metadata documents ---------------------------------------------------------------------------------


@given(doc=st.one_of(metadata_docs, st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                                  lambda c: st.lists(c) | st.dictionaries(st.text(), c))
                     .map(lambda v: json.dumps(v).encode())))
def test_metadata_parsing_only_raises_wasi_nn_errors(doc):
    try:
        update = opts.parse_metadata(doc)
    except GuestFault as fault:
        assert fault.code in (opts.INVALID_ARGUMENT, opts.INVALID_ENCODING, opts.UNSUPPORTED_OPERATION)
        return
    graph = update.apply_graph(opts.GraphOptions())
    context = update.apply_context(opts.ContextOptions())
    assert graph.ctx_size >= 0 and graph.batch_size >= 1 and 0 <= graph.seed < 2**32
    assert isinstance(context.keep_kv_cache, bool) and isinstance(context.n_predict, int)


@pytest.mark.parametrize("doc, code", [
    (b'{"n-predict": 1.0}', 1), (b'{"n-predict": true}', 1), (b'{"temp": "hot"}', 1),
    (b'{"ctx-size": -1}', 1), (b'{"n-gpu-layers": "all"}', 1), (b'{"top-k": 9223372036854775808}', 1),
    (b'{"grammar": "root ::= x"}', 6), (b'{"embedding": true}', 6),
    (b'{"temp": NaN}', 2), (b'{"a": 1,}', 2), (b"\xff", 2),
])
def test_metadata_errors(doc, code):
    with pytest.raises(GuestFault) as info:
        opts.parse_metadata(doc)
    assert info.value.code == code


def test_metadata_values_and_scopes():
    update = opts.parse_metadata(b'{"temp": -1, "top-p": 2, "seed": -1, "n-predict": 5, "reverse-prompt": "User:",'
                                 b' "n-gpu-layers": 99, "unknown": [1], "temp": 3}')
    graph, context = update.apply_graph(opts.GraphOptions()), update.apply_context(opts.ContextOptions())
    assert (graph.temp, graph.top_p, graph.seed) == (0.0, 2.0, 0xFFFFFFFF)  # first duplicate wins
    assert (context.n_predict, context.reverse_prompt) == (5, "User:")
    assert opts.parse_metadata(b"[1, 2]") == opts.Update({}, {})


# -- (e) errors through the C guest ------------------------------------------------------------------


@pytest.mark.parametrize("args, code", [
    (["--model", "nope"], opts.NOT_FOUND),
    (["--model", "gone"], opts.MODEL_NOT_FOUND),
    (["--meta", '{"temp": 0, "n-predict"'], opts.INVALID_ENCODING),
    (["--meta", '{"n-predict": "ten"}'], opts.INVALID_ARGUMENT),
    (["--config", '{"ctx-size": 1.5}'], opts.INVALID_ARGUMENT),
    (["--meta", '{"ctx-size": 4}'], opts.PROMPT_TOO_LONG),  # no room: ctx-size - 4 = 0
    (["--meta", '{"grammar": "root ::= \\"x\\""}'], opts.UNSUPPORTED_OPERATION),
])
def test_guest_sees_errors(chat, pool, args, code):
    run = run_chat(chat, pool, "--model", "tiny", *args, PROMPT)
    assert run.code == code, run.err
    assert run.out == b""


def test_context_full_keeps_the_partial_output(chat, pool, tiny):
    model = tiny
    n_prompt = len(model.tokenizer.encode(TINY_PROMPT))
    ctx = n_prompt + 12
    run = run_chat(chat, pool, "--model", "tiny", "--meta", meta(**{"ctx-size": ctx, "ignore-eos": True}),
                   "--print-meta", TINY_PROMPT)
    assert run.code == opts.CONTEXT_FULL, run.err
    # tokens are sampled while the cache has room to evaluate the previous one
    assert run.meta[0]["output_tokens"] == ctx - n_prompt + 1
    _, out_ids, _ = engine_greedy(model, TINY_PROMPT, ctx - n_prompt + 1, ctx=ctx, stop_ids=())
    assert run.out == model.tokenizer.decode(out_ids, skip_special=False).encode()
    assert run.out


# -- (f) deadlines stop inference at a token boundary -------------------------------------------------


@pytest.mark.parametrize("name, prompt", [
    ("tiny", TINY_PROMPT),
    pytest.param("default", "hello " * 4000, marks=pytest.mark.slow),
], ids=["decode", "prefill"])
def test_deadline_stops_a_long_compute(chat, pool, name, prompt):
    """Unbounded generation, or a 4000-token prompt for the real model (~8 s of prefill on two
    cores), stops at the next token or prefill chunk after the deadline: long before the work
    is done. (The time bound is loose: these machines are shared.)"""
    model = pool.get(name)  # loading is not what is timed
    limit = 0.5
    wasi = WasiOptions(args=["--model", name, "--meta", meta(**{"ctx-size": 4096, "ignore-eos": True,
                                                                  "n-predict": -1}), prompt], stdout=None, stderr=None)
    with Actor(chat, limits=Limits(timeout=limit), wasi=wasi, host_modules=[WasiNN.factory(pool)]) as actor:
        start = time.monotonic()
        with pytest.raises(LimitExceeded, match="time limit"):
            actor.run()
        elapsed = time.monotonic() - start
        (ctx,) = [c for _, c in actor.hosts[0].contexts.items()]
        n_prompt = len(model.tokenizer.encode(prompt))
        if len(prompt) > 1000:
            assert ctx.session.position < n_prompt  # stopped between prefill chunks
        else:
            assert ctx.session.position < 4096 // 2  # stopped long before the context was full
    assert elapsed < limit + 5.0

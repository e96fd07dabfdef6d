"""The native ABI (import module ``driftwood``) from real guests.

A WAT guest that forwards raw i32 arguments to every import lets the tests call each host
function with any values through the real Wasmtime boundary: hostile pointers, lengths,
handles and sizes (property-based), isolation between actors, logits written in place into
guest memory, and deadlines inside long inference calls. The C chat agent answers a question
with the real default model.
"""

from __future__ import annotations

import dataclasses
import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from driftwood import toolchain
from driftwood.errors import LimitExceeded
from driftwood.model.synthetic import PRESETS, write_synthetic
from driftwood.runtime import ActorSpec, spawn
from driftwood.runtime.abi.native import PREFILL_CHUNK, NativeABI, SessionLimits
from driftwood.runtime.actor import Actor, Limits, WasiOptions
from driftwood.runtime.models import ModelPool
from driftwood.runtime.module import GuestModule
from tests.conftest import forwarder, noisy_call, quiet, requires_cuda, stray_writes, wat_module

SIGNATURES = {
    "gemm_f32": 6, "session_open": 4, "session_close": 1, "session_info": 2, "session_reset": 1,
    "session_truncate": 2, "tokenize": 6, "detokenize": 5, "token_text": 4, "is_end": 2,
    "chat_template": 6, "append": 5, "sample": 2, "generate": 2, "snapshot": 0, "resumed": 0,
    "session_save": 3, "session_load": 2,
}
PAGES = 4
MEM = PAGES * 65536
FORWARDER = forwarder("driftwood", SIGNATURES, PAGES)
# every code the header names
CODES = {-1, -2, -3, -4, -5, -6, -7, -8, -9}
EINVAL, EBADF, ENOMODEL, ECONTEXT, ELIMIT, EMODEL = -1, -4, -5, -6, -7, -8

# where the driver lays out arguments in the forwarder's memory
NAME_AT = 0x100
INFO_AT = 0x200  # dw_session_info_t, 24 bytes
PARAMS_AT = 0x300  # dw_sampling_t, 24 bytes
IDS_AT = 0x1000  # token ids in, up to 1024
TEXT_AT = 0x2000  # text in
OUT_AT = 0x4000  # text and ids out, 16 KiB
LOGITS_AT = 0x8000  # float32 logits (tiny vocabulary: 2 KiB)
GEMM_AT = 0x10000  # a, b, c for small GEMMs
LONG_AT = 0x20000  # a long prompt, up to 16,384 ids
SAMPLING = struct.Struct("<fifffi")
TINY = dataclasses.replace(PRESETS["tiny"], context_length=4096)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    path = write_synthetic(tmp_path_factory.mktemp("models") / "tiny.gguf", TINY, "f32", seed=3)
    pool = ModelPool("cpu")
    pool.add("tiny", str(path))
    pool.add("gone", str(tmp_path_factory.mktemp("none") / "missing.gguf"))
    pool.get("tiny")
    return pool


@pytest.fixture(scope="module")
def tiny(pool):
    return pool.get("tiny")


class Driver:
    """Calls through the forwarding guest, laying the arguments out in its memory."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor
        self.mem = actor.memory

    @property
    def host(self) -> NativeABI:
        return self.actor.hosts[0]

    def __call__(self, name: str, *args: int) -> int:
        return self.actor.call(name, *(a if a < 2**31 else a - 2**32 for a in args))

    def open(self, name: str = "tiny", capacity: int = 512, seed: int = 0) -> int:
        self.mem.write(NAME_AT, name.encode())
        handle = self("session_open", NAME_AT, len(name.encode()), capacity, seed)
        assert handle > 0, handle
        return handle

    def append(self, handle: int, ids: list[int], logits: bool = True) -> int:
        self.mem.write(IDS_AT, struct.pack(f"<{len(ids)}i", *ids))
        return self("append", handle, IDS_AT, len(ids), LOGITS_AT if logits else 0,
                    TINY.vocab_size if logits else 0)

    def logits(self) -> np.ndarray:
        return self.actor.arena.numpy(LOGITS_AT, 4 * TINY.vocab_size).view(np.float32).copy()

    def info(self, handle: int) -> tuple[int, ...]:
        assert self("session_info", handle, INFO_AT) == 0
        return struct.unpack("<6i", self.mem.read(INFO_AT, 24))

    def generate(self, handle: int, temperature: float = 0.0) -> int:
        self.mem.write(PARAMS_AT, SAMPLING.pack(temperature, 0, 1.0, 0.0, 1.0, 0))
        return self("generate", handle, PARAMS_AT)


def forwarding_actor(pool, **kwargs) -> Actor:
    spec = ActorSpec(wat_module(FORWARDER, "native-forwarder.wasm"), pool, wasi=quiet(), **kwargs)
    return spawn(spec)


@pytest.fixture
def driver(pool):
    with forwarding_actor(pool) as actor:
        yield Driver(actor)


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return [(i * 7919 + seed * 104729 + 13) % TINY.vocab_size for i in range(n)]


# -- inference through the ABI equals the engine ---------------------------------------------


def test_greedy_generation_matches_the_engine(driver, tiny):
    ids = prompt_ids(20)
    with tiny.new_session(capacity=512) as session:
        logits = session.prefill(ids)
        expected_logits = logits.clone()
        expected = []
        for _ in range(8):
            token = int(torch.argmax(logits))
            expected.append(token)
            logits = session.decode(token)

    handle = driver.open()
    assert driver.append(handle, ids) == len(ids)
    np.testing.assert_allclose(driver.logits(), expected_logits.numpy(), rtol=1e-5, atol=1e-5)
    got = [driver.generate(handle) for _ in range(8)]
    assert got == expected
    position, capacity, vocab, context, _bos, _eos = driver.info(handle)
    assert (position, capacity, vocab, context) == (len(ids) + 8, 512, TINY.vocab_size, TINY.context_length)


def test_logits_are_written_in_place_into_guest_memory(driver):
    """One-token append: the output head's matmul writes into the guest's bytes (no staging
    tensor), and the host's sampler then reads the guest's buffer, so a guest may edit it."""
    handle = driver.open()
    driver.append(handle, prompt_ids(5))
    assert driver.append(handle, [7]) == 6
    entry = driver.host.sessions.get(handle)
    assert entry.logits.data_ptr() == driver.actor.arena.base + LOGITS_AT
    # the guest bans every token but one by editing its logits; the host samples from them
    logits = driver.actor.arena.numpy(LOGITS_AT, 4 * TINY.vocab_size).view(np.float32)
    logits[:] = -np.inf
    logits[123] = 0.0
    driver.mem.write(PARAMS_AT, SAMPLING.pack(0.8, 0, 1.0, 0.0, 1.0, 0))
    assert driver("sample", handle, PARAMS_AT) == 123


def test_sessions_truncate_and_reset(driver, tiny):
    ids = prompt_ids(12)
    handle = driver.open()
    driver.append(handle, ids)
    first = driver.generate(handle)
    assert driver("session_truncate", handle, 5) == 5
    assert driver("session_truncate", handle, 6) == EINVAL  # cannot grow
    assert driver("sample", handle, PARAMS_AT) == EINVAL  # no logits after a truncation
    assert driver.append(handle, ids[5:]) == len(ids)
    assert driver.generate(handle) == first  # the same prefix gives the same continuation
    assert driver("session_reset", handle) == 0 and driver.info(handle)[0] == 0
    assert driver("session_close", handle) == 0
    assert driver("session_close", handle) == EBADF
    assert driver("session_info", handle, INFO_AT) == EBADF  # closed handles are never reused
    assert driver.open() != handle


def test_text_round_trip(driver, tiny):
    handle = driver.open()
    text = "The quick brown fox"
    driver.mem.write(TEXT_AT, text.encode())
    n = driver("tokenize", handle, TEXT_AT, len(text), 0, IDS_AT, 1024)
    ids = list(struct.unpack(f"<{n}i", driver.mem.read(IDS_AT, 4 * n)))
    assert ids == tiny.tokenizer.encode(text, add_bos=False)
    assert driver("tokenize", handle, TEXT_AT, len(text), 0, IDS_AT, 0) == n  # too small: the size
    m = driver("detokenize", handle, IDS_AT, n, OUT_AT, 4096)
    assert driver.mem.read(OUT_AT, m).decode() == text
    streamed = b""
    for token in ids:
        streamed += driver.mem.read(OUT_AT, driver("token_text", handle, token, OUT_AT, 4096))
    streamed += driver.mem.read(OUT_AT, driver("token_text", handle, -1, OUT_AT, 4096))
    assert streamed.decode() == text
    assert driver("is_end", handle, tiny.tokenizer.eos_id) == 1
    assert driver("is_end", handle, ids[0]) == 0


# -- isolation, limits, deadlines -------------------------------------------------------------


def test_one_actor_cannot_name_another_actors_sessions(pool):
    with forwarding_actor(pool) as a, forwarding_actor(pool) as b:
        da, db = Driver(a), Driver(b)
        handle = da.open()
        da.append(handle, prompt_ids(9))
        assert db("session_info", handle, INFO_AT) == EBADF
        assert db.append(handle, [1]) == EBADF
        assert db("session_close", handle) == EBADF
        own = db.open()
        assert db.info(own)[0] == 0 and da.info(handle)[0] == 9  # same number, separate tables
        assert a.arena.base != b.arena.base


def test_session_limits(pool):
    limits = SessionLimits(max_sessions=2, max_tokens=1000)
    with spawn(ActorSpec(wat_module(FORWARDER), pool, wasi=quiet(), sessions=limits)) as actor:
        d = Driver(actor)
        first = d.open(capacity=400)
        d.mem.write(NAME_AT, b"tiny")
        assert d("session_open", NAME_AT, 4, 700, 0) == ELIMIT  # 1100 tokens in all
        d.open(capacity=600)
        assert d("session_open", NAME_AT, 4, 1, 0) == ELIMIT  # a third session
        assert d("session_close", first) == 0
        assert d("session_open", NAME_AT, 4, TINY.context_length + 1, 0) == EINVAL  # past the model's context
        d.mem.write(NAME_AT, b"nope")
        assert d("session_open", NAME_AT, 4, 8, 0) == ENOMODEL
        d.mem.write(NAME_AT, b"gone")  # named, but its file is missing
        assert d("session_open", NAME_AT, 4, 8, 0) == EMODEL
        assert d.open(capacity=400) > 0  # refusals left the actor as it was


def test_context_full(driver):
    handle = driver.open(capacity=16)
    assert driver.append(handle, prompt_ids(16)) == 16
    assert driver.append(handle, [1]) == ECONTEXT
    assert driver.generate(handle) == ECONTEXT


def test_a_long_prefill_stops_at_its_deadline(pool, tiny):
    """The deadline is checked between prefill chunks (256 tokens) and after every token:
    a call already in the engine stops at the next boundary, not at the end of the call."""
    with tiny.new_session(capacity=PREFILL_CHUNK) as session:  # what one chunk costs here
        chunk_s = sorted(_timed(lambda: (session.reset(), session.prefill(prompt_ids(PREFILL_CHUNK))))
                         for _ in range(3))[1]
    n = 4096
    with forwarding_actor(pool, limits=Limits(timeout=3 * chunk_s)) as actor:
        d = Driver(actor)
        handle = d.open(capacity=n)
        d.mem.write(LONG_AT, struct.pack(f"<{n}i", *prompt_ids(n)))
        with pytest.raises(LimitExceeded, match="time limit"):
            d("append", handle, LONG_AT, n, 0, 0)  # 16 chunks: several times the limit
        # it stopped between chunks, with work left undone
        position = d.host.sessions.get(handle).session.position
        assert 0 <= position < n and position % PREFILL_CHUNK == 0
        assert d.info(handle)[0] == position  # the actor lives on; its next call has a fresh deadline


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- every function, hostile arguments ------------------------------------------------------------


def mostly(valid, *others):
    valid = valid if isinstance(valid, st.SearchStrategy) else st.just(valid)
    return st.one_of(valid, valid, valid, *others)


hostile_ptr = st.sampled_from([0, 1, 2, 3, MEM - 4, MEM - 1, MEM, MEM + 4, 2**31 - 1, 2**31, 2**32 - 4, 2**32 - 1])
hostile_len = st.sampled_from([0, 1, 3, 2**16, MEM, 2**31, 2**32 - 1])
handles = mostly(st.just("live"), st.sampled_from([0, -1, 2**31 - 1, 99, "closed"]))


def ptr(valid: int, size: int = 4):
    anywhere = st.integers(0, (MEM - size) // 4).map(lambda i: 4 * i)
    return mostly(valid, anywhere, hostile_ptr, st.integers(0, 2**32 - 1))


def length(valid):
    return mostly(valid, hostile_len, st.integers(0, 2**32 - 1))


ids_data = st.lists(st.one_of(st.integers(0, TINY.vocab_size - 1), st.integers(-(2**31), 2**31 - 1)),
                    min_size=0, max_size=40)
texts = st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=40),
                  st.sampled_from([b'[{"role": "user", "content": "hi"}]', b"[]", b'{"a": 1}', b"[1,2]", b"\xff"]))
sampling = st.tuples(st.one_of(st.floats(-1, 3), st.sampled_from([float("nan"), float("inf")])),
                     st.integers(-5, 100), st.floats(-1, 2), st.floats(-1, 2), st.floats(-1, 3), st.integers(-5, 64))


@st.composite
def calls(draw):
    """One call: the function, its arguments (mostly valid, hostile values swapped in), and
    the bytes to lay out in memory first."""
    name = draw(st.sampled_from(sorted(SIGNATURES)))
    ids = draw(ids_data)
    text = draw(texts)
    layout = [(IDS_AT, struct.pack(f"<{len(ids)}i", *ids)), (TEXT_AT, text)]
    handle = draw(handles)
    if name == "gemm_f32":
        m, n, k = (draw(mostly(st.integers(1, 8), st.integers(-2, 2**31 - 1))) for _ in range(3))
        args = (draw(ptr(GEMM_AT)), draw(ptr(GEMM_AT + 0x1000)), draw(ptr(GEMM_AT + 0x2000)), m, n, k)
    elif name == "session_open":
        model = draw(st.sampled_from([b"tiny", b"gone", b"nope", b"\xff\xfe", b""]))
        layout.append((NAME_AT, model))
        args = (draw(ptr(NAME_AT)), draw(length(len(model))),
                draw(mostly(st.integers(0, 600), st.integers(0, 2**32 - 1))), draw(st.integers(0, 2**32 - 1)))
    elif name in ("session_close", "session_reset"):
        args = (handle,)
    elif name == "session_info":
        args = (handle, draw(ptr(INFO_AT, 24)))
    elif name == "session_truncate":
        args = (handle, draw(mostly(st.integers(0, 12), st.integers(0, 2**32 - 1))))
    elif name == "tokenize":
        args = (handle, draw(ptr(TEXT_AT)), draw(length(len(text))), draw(mostly(st.integers(0, 3), st.integers(0, 2**32 - 1))),
                draw(ptr(OUT_AT)), draw(length(st.integers(0, 64))))
    elif name == "detokenize":
        args = (handle, draw(ptr(IDS_AT)), draw(length(len(ids))), draw(ptr(OUT_AT)), draw(length(st.integers(0, 256))))
    elif name == "token_text":
        args = (handle, draw(mostly(st.integers(-1, TINY.vocab_size - 1), st.integers(-(2**31), 2**31 - 1))),
                draw(ptr(OUT_AT)), draw(length(st.integers(0, 16))))
    elif name == "is_end":
        args = (handle, draw(mostly(st.integers(0, TINY.vocab_size - 1), st.integers(-(2**31), 2**31 - 1))))
    elif name == "chat_template":
        args = (handle, draw(ptr(TEXT_AT)), draw(length(len(text))), draw(st.integers(-1, 2)), draw(ptr(OUT_AT)),
                draw(length(st.integers(0, 4096))))
    elif name == "append":
        args = (handle, draw(ptr(IDS_AT)), draw(length(len(ids))),
                draw(mostly(st.sampled_from([0, LOGITS_AT]), st.just(LOGITS_AT + 2))),
                draw(mostly(TINY.vocab_size, st.integers(0, 2**32 - 1))))
    elif name in ("sample", "generate"):
        layout.append((PARAMS_AT, SAMPLING.pack(*draw(sampling))))
        args = (handle, draw(ptr(PARAMS_AT, 24)))
    elif name in ("snapshot", "resumed"):
        args = ()
    elif name == "session_save":
        args = (handle, draw(ptr(TEXT_AT)), draw(length(len(text))))
    else:  # session_load
        args = (draw(ptr(TEXT_AT)), draw(length(len(text))))
    return name, args, layout


def _writes(name: str, args: tuple[int, ...], rc: int) -> list[tuple[int, int]]:
    """The (offset, size) ranges a successful call may write."""
    if rc < 0:
        return []
    return {
        "gemm_f32": lambda: [(args[2], 4 * args[3] * args[4])],
        "session_info": lambda: [(args[1], 24)],
        "tokenize": lambda: [(args[4], 4 * args[5])],
        "detokenize": lambda: [(args[3], args[4])],
        "token_text": lambda: [(args[2], args[3])],
        "chat_template": lambda: [(args[4], args[5])],
        "append": lambda: [(args[3], 4 * args[4])] if args[3] else [],
    }.get(name, list)()


@pytest.fixture(scope="module")
def fuzz_actor(pool):
    with forwarding_actor(pool) as actor:
        yield Driver(actor)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=calls(), seed=st.integers(0, 2**32 - 1), logits=st.booleans())
def test_every_function_survives_hostile_arguments(fuzz_actor, call, seed, logits, caplog):
    d = fuzz_actor
    for handle, _ in list(d.host.sessions.items()):
        assert d("session_close", handle) == 0
    live = d.open(capacity=64)
    closed = d.open(capacity=8)
    assert d("session_close", closed) == 0
    d.append(live, prompt_ids(6), logits=logits)
    name, args, layout = call
    args = tuple({"live": live, "closed": closed}.get(a, a) for a in args)
    rc, changed = noisy_call(d, MEM, seed, layout, name, args)

    event(f"{name} -> {rc if rc < 0 else 'ok'}")
    assert rc >= 0 or rc in CODES, rc
    assert "failed" not in caplog.text and "Traceback" not in caplog.text
    assert not stray_writes(changed, _writes(name, args, rc), MEM).size, f"{name}{args} -> {rc} wrote outside its outputs"


# -- the chat agent with the real default model -----------------------------------------------


@pytest.mark.slow
def test_chat_agent_answers_a_question(tmp_path):
    pool = ModelPool("cpu")
    pool.add("default", "smollm2")
    question = tmp_path / "question.txt"
    question.write_text("What is the capital of France?\n")
    out = bytearray()
    wasi = WasiOptions(args=["--max-tokens", "32"], stdin=str(question),
                       stdout=out.extend, stderr=None)
    module = GuestModule.load(toolchain.build_example("chat"))
    with spawn(ActorSpec(module, pool, wasi=wasi)) as actor:
        assert actor.run() == 0
    assert "Paris" in out.decode()


# -- CUDA: the GPU writes the logits into the guest's mapped memory ---------------------------


@requires_cuda
def test_cuda_logits_land_in_guest_memory(tmp_path):
    path = write_synthetic(tmp_path / "tiny.gguf", TINY, "f32", seed=3)
    cpu, gpu = ModelPool("cpu", "float32"), ModelPool("cuda", "float32")
    for p in (cpu, gpu):
        p.add("tiny", str(path))
    ids = prompt_ids(10)
    results = []
    for pool, device in ((cpu, "cpu"), (gpu, "cuda")):
        with spawn(ActorSpec(wat_module(FORWARDER), pool, device=device, wasi=quiet())) as actor:
            d = Driver(actor)
            handle = d.open()
            d.append(handle, ids)
            assert d.append(handle, [5]) == len(ids) + 1
            entry = d.host.sessions.get(handle)
            assert entry.logits.device.type == device
            assert entry.logits.data_ptr() == actor.arena.base + LOGITS_AT  # same bytes, in place
            results.append(d.logits())
            tokens = [d.generate(handle) for _ in range(8)]
            results.append(tokens)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-3, atol=1e-3)
    assert results[3] == results[1]

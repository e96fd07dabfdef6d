"""Whole-actor snapshots with real guests: the chat guest resumed in a new process continues
exactly as the uninterrupted run does; memory is sparse and compressed; globals, handles,
logits in guest memory and guest-side session snapshots survive; the CLI surfaces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driftwood import toolchain
from driftwood.errors import SnapshotError
from driftwood.runtime import ActorSpec, spawn
from driftwood.runtime.hostcall import GuestFault
from driftwood.runtime.models import ModelPool
from driftwood.snapshot import session as snapshot_session
from driftwood.snapshot.actor import (
    ActorSnapshots,
    native_abi,
    restore_actor,
    run_actor,
    snapshot_actor,
)
from driftwood.snapshot.store import DirectoryStore, check_name
from driftwood.snapshot.verify import verify
from driftwood.snapshot.wasm import start_guard
from tests.conftest import quiet, wat_module
from tests.snapshot.conftest import chat_spec, run_chat

ROOT = Path(__file__).resolve().parent.parent.parent
PROBE = ROOT / "tests" / "guests" / "snapshot_probe.c"


def cli(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # one intra-op thread: on a shared 2-core machine, two OpenMP threads make decode ~10x slower
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "driftwood.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.slow
def test_chat_resumed_in_a_new_process_replies_as_the_uninterrupted_run(tmp_path):
    """SmolLM2, greedy: snapshot mid-conversation, resume in another process, ask on."""
    turns = ["Hello! Who are you?", "What is the capital of France?", "And of Italy?"]
    common = ["--device", "cpu"]
    guest = ["chat", "--", "--max-tokens", "24"]
    straight = cli("run", *common, *guest, stdin="\n".join(turns) + "\n")
    assert straight.returncode == 0, straight.stderr
    snaps = tmp_path / "snaps"
    first = cli("run", *common, "--snapshot-dir", str(snaps), *guest, stdin=f"{turns[0]}\n/snapshot\n")
    assert first.returncode == 0 and "snapshot taken" in first.stderr, first.stderr
    resumed = cli("resume", *common, str(snaps / "chat"), stdin="\n".join(turns[1:]) + "\n")
    assert resumed.returncode == 0, resumed.stderr
    assert first.stdout + resumed.stdout == straight.stdout
    assert len(straight.stdout.splitlines()) == 3 and "Paris" in straight.stdout
    check = cli("snapshot", "verify", str(snaps))
    assert check.returncode == 0 and check.stdout.startswith("chat: ok"), check.stdout + check.stderr


def test_chat_round_trip_in_process(tiny_path, chat_wasm, store):
    turns = ["hello there", "tell me more", "and then?"]
    straight = run_chat(chat_wasm, tiny_path, turns)
    first = run_chat(chat_wasm, tiny_path, [turns[0], "/snapshot"], store)
    resumed = run_chat(chat_wasm, tiny_path, turns[1:], store, resume=True)
    assert first + resumed == straight
    # the resumed run's exit snapshot went back to the same name; resume it once more
    again = run_chat(chat_wasm, tiny_path, ["one more"], store, resume=True)
    assert again.count("\n") == 1


def test_memory_is_sparse_and_compressed(tiny_path, chat_wasm, store):
    run_chat(chat_wasm, tiny_path, ["hello", "/snapshot"], store)
    memory = store.manifest("chat").actor.memory
    assert memory.size >= 1 << 20 and memory.size % 65536 == 0
    assert memory.stored_pages * 4096 < memory.size // 4  # zero pages are skipped
    assert memory.obj.size < memory.stored_pages * 4096  # and the rest compressed


def test_wasi_libc_start_guard_is_found(chat_wasm, tiny_path, store):
    guard = start_guard(chat_wasm.read_bytes())
    assert guard is not None
    run_chat(chat_wasm, tiny_path, ["hello"], store)
    actor = restore_actor(chat_spec(chat_wasm, tiny_path), store, "chat")
    with actor:  # cleared on restore, so that _start runs again
        assert bytes(actor.arena.numpy()[guard : guard + 4]) == b"\0\0\0\0"
    assert start_guard(wat_module(GLOBALS_GUEST).wasm) is None


def test_guest_sessions_handles_and_logits_in_guest_memory(tiny_path, tmp_path):
    """Handles survive (a closed one is not reused), logits the host wrote into guest memory are
    restored as a view of it, and dw_session_save / dw_session_load work across the resume."""
    wasm = toolchain.build(PROBE)
    store = DirectoryStore(tmp_path / "store", create=True)
    straight = run_probe(wasm, tiny_path, store, "straight")
    assert run_probe(wasm, tiny_path, store, "setup") == ""
    rec = store.manifest("snapshot_probe").sessions
    assert [s.handle for s in rec] == [2] and rec[0].logits is None and rec[0].logits_offset
    resumed = run_probe(wasm, tiny_path, store, resume=True)
    assert resumed == straight
    lines = resumed.splitlines()
    assert lines[0] == "handles 1 2 3"
    assert lines[1].split()[1:] == lines[2].split()[1:]  # B continued == "greet" loaded afresh
    assert lines[3:] == ["bad name -1", "no such -9"]
    assert "snapshot_probe/sessions/greet" in store.names()


def run_probe(wasm: Path, model_path: Path, store: DirectoryStore, *args: str, resume: bool = False) -> str:
    from driftwood.runtime.actor import WasiOptions
    from driftwood.runtime.module import GuestModule
    from driftwood.snapshot.actor import resume as resume_actor

    out: list[bytes] = []
    pool = ModelPool("cpu", "float32")
    pool.add("default", str(model_path))
    spec = ActorSpec(module=GuestModule.load(wasm), pool=pool, wasi=WasiOptions(args=args, stdout=out.append))
    if resume:
        assert resume_actor(spec, store, "snapshot_probe") == 0
    else:
        with spawn(spec) as actor:
            assert run_actor(actor, store, "snapshot_probe" if "setup" in args else "other", None) == 0
    return b"".join(out).decode()


GLOBALS_GUEST = """
(module
  (memory (export "memory") 2)
  (data (i32.const 100) "initial data")
  (global (export "counter") (mut i32) (i32.const 7))
  (global (export "big") (mut i64) (i64.const -5))
  (global (export "ratio") (mut f64) (f64.const 0.25))
  (global (export "fixed") i32 (i32.const 1))
  (func (export "_start")))
"""


def test_memory_and_mutable_globals_round_trip(store):
    import wasmtime

    spec = ActorSpec(module=wat_module(GLOBALS_GUEST, "globals.wasm"), pool=ModelPool("cpu"), wasi=quiet())
    with spawn(spec) as actor:
        mem = actor.arena.numpy()
        mem[100:112] = 0  # the data segment's bytes, zeroed: must come back zero, not initial
        mem[70000:70005] = list(b"hello")
        actor.exports["memory"].grow(actor.store, 3)
        actor.arena.numpy()[4 * 65536 + 1] = 9
        actor.exports["counter"].set_value(actor.store, wasmtime.Val.i32(-123456))
        actor.exports["big"].set_value(actor.store, wasmtime.Val.i64(1 << 40))
        actor.exports["ratio"].set_value(actor.store, wasmtime.Val.f64(-3.5e-300))
        snapshot = bytes(actor.arena.numpy())
        snapshot_actor(actor, store, "g")
    rec = store.manifest("g").actor
    assert [g[0] for g in rec.globals] == ["counter", "big", "ratio"]  # mutable ones only
    with restore_actor(spec, store, "g") as actor:
        assert bytes(actor.arena.numpy()) == snapshot
        assert actor.exports["counter"].value(actor.store) == -123456
        assert actor.exports["big"].value(actor.store) == 1 << 40
        assert actor.exports["ratio"].value(actor.store) == -3.5e-300
        assert native_abi(actor).resumed


def test_wasi_nn_state_is_refused(store):
    spec = ActorSpec(module=wat_module(GLOBALS_GUEST, "globals.wasm"), pool=ModelPool("cpu"), wasi=quiet())
    with spawn(spec) as actor:
        actor.hosts.append(SimpleNamespace(module="wasi_ephemeral_nn", graphs=[1], contexts=[]))
        with pytest.raises(SnapshotError, match="wasi-nn"):
            snapshot_actor(actor, store, "x")


def test_truncating_through_the_abi_drops_reusable_chunks(tiny_path, chat_wasm, store):
    run_chat(chat_wasm, tiny_path, ["hello"], store)
    with restore_actor(chat_spec(chat_wasm, tiny_path), store, "chat") as actor:
        native = native_abi(actor)
        ActorSnapshots(actor, store, "chat", None)
        entry = native.entry(1)
        memo = snapshot_session._saved[entry.session][store.uri]
        assert memo.chunks and memo.chunks[-1].start + memo.chunks[-1].count == entry.session.position
        native.session_truncate(1, 3)
        assert all(c.start + c.count <= 3 for c in memo.chunks) and memo.tokens == entry.session.tokens[:3]


@settings(max_examples=200, deadline=None)
@given(name=st.binary(min_size=0, max_size=80))
def test_guest_snapshot_names(name):
    """Whatever bytes a guest passes as a name: a valid store name, or an error code."""
    native = _probe_native()
    native.mem.write(1024, name)
    try:
        got = native._snapshot_name(1024, len(name))
    except GuestFault as fault:
        assert fault.code in (-1,)  # DW_EINVAL
        return
    check_name(f"chat/sessions/{got}")
    assert got.encode() == name


_NATIVE: list = []


def _probe_native():
    if not _NATIVE:
        spec = ActorSpec(module=wat_module(GLOBALS_GUEST, "globals.wasm"), pool=ModelPool("cpu"), wasi=quiet())
        actor = spawn(spec)
        native = native_abi(actor)
        native.session_snapshots = object()  # as if wired
        _NATIVE.extend([actor, native])
    return _NATIVE[1]


def test_cli_snapshot_commands(tiny_path, chat_wasm, tmp_path):
    store = DirectoryStore(tmp_path / "snaps", create=True)
    run_chat(chat_wasm, tiny_path, ["hello", "/snapshot"], store)
    run_chat(chat_wasm, tiny_path, ["hi"], store, name="other")
    ls = cli("snapshot", "ls", str(store.root))
    assert ls.returncode == 0 and "chat" in ls.stdout and "other" in ls.stdout and "actor" in ls.stdout
    inspect = cli("snapshot", "inspect", str(store.root / "chat"))
    assert inspect.returncode == 0 and '"kind": "actor"' in inspect.stdout and "tiny.gguf" in inspect.stdout
    ok = cli("snapshot", "verify", str(store.root))
    assert ok.returncode == 0 and ok.stdout.count(": ok") == 2
    ambiguous = cli("snapshot", "inspect", str(store.root))
    assert ambiguous.returncode == 1 and "holds 2 snapshots" in ambiguous.stderr
    chunk = next((store.root / "chunks").iterdir())
    raw = bytearray(chunk.read_bytes())
    raw[-5] ^= 0x40
    chunk.write_bytes(raw)
    bad = cli("snapshot", "verify", str(store.root))
    assert bad.returncode == 1 and "FAILED" in bad.stdout and "checksum mismatch" in bad.stdout
    keyfile = tmp_path / "key"
    keyfile.write_bytes(os.urandom(32))
    refused = cli("resume", "--device", "cpu", "--snapshot-key", str(keyfile), str(store.root / "other"))
    assert refused.returncode == 1 and refused.stderr.strip() == "driftwood: error: snapshot is not signed, and a key was given: refusing it"
    rm = cli("snapshot", "rm", str(store.root / "chat"), str(store.root / "other"))
    assert rm.returncode == 0 and "freed" in rm.stdout
    assert store.names() == [] and list((store.root / "chunks").iterdir()) == []
    missing = cli("snapshot", "inspect", str(store.root / "chat"))
    assert missing.returncode == 1 and "no snapshot 'chat'" in missing.stderr


def test_verify_counts_every_object(tiny_path, chat_wasm, store):
    run_chat(chat_wasm, tiny_path, ["hello"], store)
    report = verify(store, "chat")
    manifest = store.manifest("chat")
    assert report.objects == len(manifest.objects()) and report.bytes == sum(o.size for o in manifest.objects())


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_start_guard_never_fails_on_odd_modules(chat_wasm, data):
    """Any bytes, or the chat module with bytes flipped: an address or None, never an error."""
    wasm = bytearray(chat_wasm.read_bytes())
    if data.draw(st.booleans()):
        wasm = bytearray(data.draw(st.binary(max_size=200)))
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            wasm[data.draw(st.integers(0, len(wasm) - 1))] ^= data.draw(st.integers(1, 255))
    guard = start_guard(bytes(wasm))
    assert guard is None or guard >= 0

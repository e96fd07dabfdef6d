"""Actors: isolation, limits and clear errors, with real guests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from driftwood import toolchain
from driftwood.errors import GuestError, GuestTrap, LimitExceeded
from driftwood.runtime.actor import Actor, Limits, WasiOptions
from driftwood.runtime.module import GuestModule
from tests.conftest import quiet, wat_module

PROBE_SRC = Path(__file__).parent.parent / "guests" / "wasi_probe.c"
MiB = 1 << 20


@pytest.fixture(scope="module")
def probe_wasm() -> Path:
    return toolchain.build(PROBE_SRC)


def run_probe(wasm: Path, *args: str, fuel: int | None = None, **wasi) -> tuple[int, str]:
    out: list[bytes] = []
    wasi.setdefault("stdout", out.append)
    wasi.setdefault("stderr", None)
    module = GuestModule.load(wasm, fuel=fuel is not None)
    with Actor(module, limits=Limits(fuel=fuel), wasi=WasiOptions(args=args, **wasi)) as actor:
        code = actor.run()
    return code, b"".join(out).decode()


def test_exit_codes_pass_through(probe_wasm):
    assert run_probe(probe_wasm, "exit", "0")[0] == 0
    assert run_probe(probe_wasm, "exit", "42")[0] == 42


def test_no_files_without_a_mapped_directory(probe_wasm, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    assert run_probe(probe_wasm, "read", str(secret)) == (3, "denied\n")
    assert run_probe(probe_wasm, "read", "/etc/passwd") == (3, "denied\n")


def test_mapped_directory(probe_wasm, tmp_path):
    (tmp_path / "note.txt").write_text("hello from the host\n")
    assert run_probe(probe_wasm, "read", "/data/note.txt", dirs=[(str(tmp_path), "/data")]) == (0, "hello from the host\n")
    assert run_probe(probe_wasm, "write", "/data/out.txt", "written", dirs=[(str(tmp_path), "/data")])[0] == 0
    assert (tmp_path / "out.txt").read_text() == "written"
    # only what is mapped: the parent stays out of reach
    assert run_probe(probe_wasm, "read", "/data/../secret", dirs=[(str(tmp_path), "/data")])[1] == "denied\n"


def test_environment_is_not_inherited(probe_wasm, monkeypatch):
    monkeypatch.setenv("HOST_SECRET", "leak")
    code, out = run_probe(probe_wasm, "env", env={"GREETING": "hi"})
    assert code == 0 and out.splitlines() == ["GREETING=hi"]


def test_trap_is_a_clear_error_with_backtrace(probe_wasm):
    with pytest.raises(GuestTrap) as info:
        run_probe(probe_wasm, "trap")
    message = str(info.value)
    assert "trapped: out of bounds memory access" in message and "0xfffffff0" in message
    assert "\n" not in message
    assert "wasm function" in info.value.backtrace and "offset 0x" in info.value.backtrace


def test_infinite_loop_stops_within_its_time_limit():
    module = wat_module('(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))')
    with Actor(module, limits=Limits(timeout=0.3), wasi=quiet()) as actor:
        start = time.monotonic()
        with pytest.raises(LimitExceeded, match=r"time limit of 0\.3 s"):
            actor.run()
        assert time.monotonic() - start < 1.5
        # the actor survives its timeout and can be called again
        with pytest.raises(LimitExceeded):
            actor.run()


def test_c_guest_spinning_stops_within_its_time_limit(probe_wasm):
    module = GuestModule.load(probe_wasm)
    with Actor(module, limits=Limits(timeout=0.5), wasi=WasiOptions(args=["spin"], stdout=None)) as actor:
        start = time.monotonic()
        with pytest.raises(LimitExceeded):
            actor.run()
        assert time.monotonic() - start < 2.0


def test_fuel_limit(probe_wasm):
    with pytest.raises(LimitExceeded, match="ran out of fuel"):
        run_probe(probe_wasm, "spin", fuel=5_000_000)
    assert run_probe(probe_wasm, "exit", "7", fuel=5_000_000)[0] == 7  # enough for a short run


def test_memory_growth_past_the_cap_fails_inside_the_guest(probe_wasm):
    module = GuestModule.load(probe_wasm)
    for cap in (64, 96):
        out: list[bytes] = []
        with Actor(module, limits=Limits(max_memory=cap * MiB), wasi=WasiOptions(args=["grow"], stdout=out.append)) as actor:
            assert actor.run() == 0  # malloc returned NULL: memory.grow said -1, nothing trapped
            assert int(b"".join(out)) >= 1  # it got some memory, then malloc failed cleanly
            assert (cap - 4) * MiB <= actor.arena.committed <= cap * MiB  # grown right up to the cap


def test_actors_have_separate_memories(probe_wasm):
    module = GuestModule.load(probe_wasm)
    a = Actor(module, wasi=quiet())
    b = Actor(module, wasi=quiet())
    try:
        assert a.arena is not b.arena
        a.arena.numpy(0, 1024)[:] = 0xAA
        assert not (b.arena.numpy(0, 1024) == 0xAA).all()
        assert abs(a.arena.base - b.arena.base) >= a.arena.reserved  # disjoint reservations
    finally:
        a.close()
        b.close()


def test_bad_module_bytes():
    with pytest.raises(GuestError, match="not a WebAssembly module"):
        GuestModule.load(b"hello world", name="text.wasm")
    with pytest.raises(GuestError, match="not a valid WebAssembly module"):
        GuestModule.load(b"\0asm\x01\0\0\0\x01\x05garbage", name="broken.wasm")
    with pytest.raises(GuestError, match="cannot read guest module"):
        GuestModule.load("/nonexistent.wasm")


def test_missing_import_is_named():
    module = wat_module('(module (import "env" "launch_missiles" (func)) (memory (export "memory") 1))', "needy.wasm")
    with pytest.raises(GuestError, match=r"needs an import the host does not provide: .*env::launch_missiles"):
        Actor(module, wasi=quiet())


def test_cli_run_stdio_exit_code_and_trap(probe_wasm, tmp_path):
    cli = [sys.executable, "-m", "driftwood.cli.main", "run", "--device", "cpu"]
    proc = subprocess.run([*cli, str(probe_wasm), "echo"], input="shout\n", capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (0, "SHOUT\n")
    proc = subprocess.run([*cli, str(probe_wasm), "exit", "9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9
    proc = subprocess.run([*cli, str(probe_wasm), "trap"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "trapped" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([*cli, "--backtrace", str(probe_wasm), "trap"], capture_output=True, text=True, timeout=120)
    assert "wasm backtrace:" in proc.stderr and "wasm function" in proc.stderr
    proc = subprocess.run([*cli, "--timeout", "0.5", str(probe_wasm), "spin"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "time limit" in proc.stderr
    env = {**os.environ, "HOST_ONLY": "x"}
    proc = subprocess.run([*cli, "--env", "A=1", str(probe_wasm), "env"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.stdout.split() == ["A=1"]

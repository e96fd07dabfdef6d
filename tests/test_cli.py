"""CLI behaviour: errors are one readable line, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "driftwood.cli.main", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build", "/nonexistent/guest.c"], "no such guest source"),
        (["build", "no-such-example"], "no bundled guest named 'no-such-example'"),
        (["demo", "gemm", "--device", "tpu"], "unknown accelerator backend 'tpu'"),
    ],
)
def test_errors_are_one_line(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("driftwood: error: ") and message in lines[0]
    assert "Traceback" not in proc.stderr


def test_build_reports_compiler_errors(tmp_path):
    src = tmp_path / "bad.c"
    src.write_text("int main(void) { return undeclared_thing; }\n")
    proc = run_cli("build", str(src), "-o", str(tmp_path / "bad.wasm"))
    assert proc.returncode == 1
    assert "compiling" in proc.stderr and "undeclared_thing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFTWOOD_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "hello.c"
    src.write_text('#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n')
    from driftwood import toolchain

    out1 = toolchain.build(src, tmp_path / "a.wasm")
    cached = list((tmp_path / "cache" / "guests").glob("hello-*.wasm"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    out2 = toolchain.build(src, tmp_path / "b.wasm")
    assert cached[0].stat().st_mtime_ns == stamp  # not rebuilt
    assert out1.read_bytes() == out2.read_bytes()
    src.write_text('#include <stdio.h>\nint main(void) { puts("changed"); return 0; }\n')
    toolchain.build(src, tmp_path / "c.wasm")
    assert len(list((tmp_path / "cache" / "guests").glob("hello-*.wasm"))) == 2

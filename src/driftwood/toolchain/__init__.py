"""Building C guests to wasm32-wasi with the Zig toolchain from the ``ziglang`` package.

``build(source, output)`` compiles with ``python -m ziglang cc --target=wasm32-wasi``, adding
the guest SDK's include folder and any flags the source names on a ``driftwood-build-flags:``
line (e.g. ``-mexec-model=reactor`` for a guest the host calls into). Results are cached by a digest of the compiler version, the
flags, the source and every header it may include, so a rebuild is a file copy. No system
clang is needed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from driftwood.errors import BuildError
from driftwood.paths import cache_root

GUESTS_DIR = Path(__file__).resolve().parent.parent / "guests"
SDK_INCLUDE = GUESTS_DIR / "include"
DEFAULT_FLAGS = ("--target=wasm32-wasi", "-O2", "-s", "-Wall", "-Werror=implicit-function-declaration")


def cache_dir() -> Path:
    return cache_root() / "guests"


@functools.cache
def zig_version() -> str:
    """The Zig version, remembered in the cache so a machine without Zig can use its guests."""
    record = cache_dir() / "zig-version"
    try:
        out = subprocess.run([sys.executable, "-m", "ziglang", "version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        if record.is_file():  # a prebuilt cache (e.g. carried to a GPU machine) still works
            return record.read_text().strip()
        raise BuildError("the Zig toolchain is missing: pip install ziglang") from exc
    version = out.stdout.strip()
    if not record.is_file() or record.read_text().strip() != version:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(version + "\n")
    return version


def source_flags(source: Path) -> list[str]:
    """Flags a source asks for itself, on a line ``driftwood-build-flags: ...`` near its top."""
    with open(source, errors="replace") as f:
        head = [next(f, "") for _ in range(40)]
    for line in head:
        _, marker, rest = line.partition("driftwood-build-flags:")
        if marker:
            return rest.replace("*/", "").split()
    return []


def _digest(source: Path, flags: Sequence[str], include_dirs: Sequence[Path]) -> str:
    h = hashlib.sha256()
    h.update(zig_version().encode())
    h.update("\0".join(flags).encode())
    h.update(source.read_bytes())
    for d in [source.parent, *include_dirs]:
        for header in sorted(d.glob("*.h")):
            h.update(header.name.encode())
            h.update(header.read_bytes())
    return h.hexdigest()


def build(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    flags: Sequence[str] = (),
    include_dirs: Sequence[str | os.PathLike[str]] = (),
    use_cache: bool = True,
) -> Path:
    """Compile ``source`` (C) to a wasm32-wasi module; returns the output path."""
    src = Path(source)
    if not src.is_file():
        raise BuildError(f"no such guest source: {src}")
    includes = [SDK_INCLUDE, *(Path(d) for d in include_dirs)]
    all_flags = [*DEFAULT_FLAGS, *source_flags(src), *flags]
    key = _digest(src, all_flags, includes)
    cached = cache_dir() / f"{src.stem}-{key[:20]}.wasm"
    out = Path(output) if output is not None else cached
    if use_cache and cached.is_file():
        if out != cached:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, out)
        return out
    cached.parent.mkdir(parents=True, exist_ok=True)
    if sys.stderr.isatty():  # the first build on a machine takes a while: say so
        print(f"driftwood: compiling {src.name} to wasm32-wasi with Zig (the first build on a machine "
              "also compiles WASI libc: about a minute and a half) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        tmp_out = Path(tmp) / "guest.wasm"
        cmd = [sys.executable, "-m", "ziglang", "cc", *all_flags]
        for d in includes:
            cmd += ["-I", str(d)]
        cmd += [str(src), "-o", str(tmp_out), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()
            raise BuildError(f"compiling {src} failed:\n{detail}")
        os.replace(tmp_out, cached)  # atomic: a concurrent build never sees half a file
    if out != cached:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, out)
    return out


def example(name: str) -> Path:
    """The source of a guest shipped with Driftwood (``gemm``, ``chat``, ...)."""
    path = GUESTS_DIR / f"{name}.c"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in GUESTS_DIR.glob("*.c")))
        raise BuildError(f"no bundled guest named {name!r}; bundled: {known}")
    return path


def build_example(name: str) -> Path:
    """Build (or fetch from the cache) a bundled guest."""
    return build(example(name))

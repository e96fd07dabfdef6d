"""Building driftwood's C++ extensions: compiled on first use with the machine's C++ compiler
(``torch.utils.cpp_extension`` + ninja) and cached under :func:`driftwood.paths.cache_root`,
one build per source, flags and torch installation. Callers fall back to pure-Python or torch
code where :func:`build` returns None (no compiler, no ninja, an unwritable cache)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from driftwood.paths import cache_root

log = logging.getLogger(__name__)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(
    prefix: str,
    sources: Sequence[Path],
    *,
    cflags: Sequence[str] = (),
    ldflags: Sequence[str] = (),
    python_module: bool = True,
    what: str,
    seconds: int,
) -> ModuleType | bool | None:
    """Compile (or load the cached build of) ``sources`` as the extension ``prefix_<key>``.

    Returns the module (``python_module``), True (a library registering torch ops), or None
    after logging why it could not be built. ``what``/``seconds``: the message shown on a
    terminal before a first build ("compiling <what> (once per machine, about <seconds> s)")."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the ninja package's binary, when its venv is not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    # every file in the sources' folders (headers included), the torch installation and the
    # flags: environments sharing the cache must not rebuild each other's (their include paths
    # differ, so ninja would see a new command every time)
    key = hashlib.sha256(b"\0".join([torch.__version__.encode(), torch.__file__.encode(),
                                      " ".join([*cflags, *ldflags]).encode()]))
    for folder in sorted({s.parent for s in sources}):
        for f in sorted(folder.iterdir()):
            if f.suffix in (".cpp", ".h"):
                key.update(f.name.encode() + b"\0" + f.read_bytes())
    name = f"{prefix}_{key.hexdigest()[:16]}"
    directory = cache_root() / "native" / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not any(directory.glob("*.so")) and sys.stderr.isatty():
            print(f"driftwood: compiling {what} (once per machine, about {seconds} s) ...",
                  file=sys.stderr, flush=True)
        module = cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=list(cflags),
                                    extra_ldflags=list(ldflags), build_directory=str(directory),
                                    is_python_module=python_module, verbose=False)
    except Exception as exc:
        log.warning("could not build %s: %s", what, exc)
        return None
    return module if python_module else True

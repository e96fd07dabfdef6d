"""Fixtures for snapshot tests: tiny random-weight GGUFs (the real model only where it matters),
a fresh directory store per test, and continuing a session token by token."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import xxhash

from driftwood.model import SamplingParams, load_model
from driftwood.model.synthetic import PRESETS, write_synthetic
from driftwood.snapshot.store import DirectoryStore

# 2 layers, 2 KV heads of 64: 2 KiB of keys and values per token; room for 16 chunks
TINY = dataclasses.replace(PRESETS["tiny"], context_length=4096)
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    return Path(write_synthetic(tmp_path_factory.mktemp("gguf") / "tiny.gguf", TINY, "f32", seed=1))


@pytest.fixture(scope="session")
def other_path(tmp_path_factory) -> Path:
    """Same shape, other weights: a different model."""
    return Path(write_synthetic(tmp_path_factory.mktemp("gguf") / "other.gguf", TINY, "f32", seed=2))


@pytest.fixture(scope="session")
def tiny(tiny_path):
    return load_model(str(tiny_path), device="cpu", dtype="float32", progress=False)


@pytest.fixture
def store(tmp_path) -> DirectoryStore:
    return DirectoryStore(tmp_path / "store", create=True)


def reader(kind: str) -> contextlib.AbstractContextManager[object]:
    """Restores read chunks with the native reader where it is built ("native"), or in Python."""
    from driftwood.snapshot import native

    return mock.patch.object(native, "module", lambda: None) if kind == "python" else contextlib.nullcontext()


def prompt(n: int, seed: int = 0) -> list[int]:
    """n token ids of the tiny vocabulary, deterministic."""
    return [(i * 7919 + seed * 104729 + 13) % TINY.vocab_size for i in range(n)]


def continue_(session: Any, logits: Any, params: SamplingParams, n: int) -> list[int]:
    out = []
    for _ in range(n):
        token = session.sample(logits, params)
        out.append(token)
        logits = session.decode(token)
    return out


def files(store: DirectoryStore) -> list[Path]:
    """Every file of the store a snapshot consists of (manifests and objects)."""
    return sorted(p for d in ("snapshots", "chunks", "blobs") for p in (store.root / d).rglob("*") if p.is_file())


def rewrite_header(store: DirectoryStore, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a manifest's header and fix its checksum: what a liar (not corruption) does."""
    from driftwood.snapshot.format import canonical

    path = store.root / "snapshots" / f"{name}.json"
    envelope = json.loads(path.read_bytes())
    change(envelope["header"])
    envelope["checksum"] = {"xxh3-128": xxhash.xxh3_128_hexdigest(canonical(envelope["header"]))}
    path.write_bytes(canonical(envelope) + b"\n")


@pytest.fixture(scope="session")
def chat_wasm() -> Path:
    from driftwood import toolchain

    return toolchain.build_example("chat")


_pools: dict[str, Any] = {}


def chat_spec(wasm: Path, model_path: Path | str, stdin: Path | None = None, out: list[bytes] | None = None,
              args: tuple[str, ...] = ()):
    """The chat guest as an actor on ``model_path`` (a pool shared by every test, so each model
    loads once), reading ``stdin``, writing into ``out``."""
    from driftwood.runtime import ActorSpec
    from driftwood.runtime.actor import WasiOptions
    from driftwood.runtime.models import ModelPool
    from driftwood.runtime.module import GuestModule

    pool = _pools.get(str(model_path))
    if pool is None:
        pool = _pools[str(model_path)] = ModelPool("cpu", "float32")
        pool.add("default", str(model_path))
    wasi = WasiOptions(args=list(args), stdin=None if stdin is None else str(stdin),
                       stdout=None if out is None else out.append, stderr=None)
    return ActorSpec(module=GuestModule.load(wasm), pool=pool, wasi=wasi)


def run_chat(wasm: Path, model_path: Path | str, lines: list[str], store: Any = None, *, resume: bool = False,
             key: bytes | None = None, name: str = "chat", args: tuple[str, ...] = ("--max-tokens", "8")) -> str:
    """Run (or resume) the chat guest in this process; with ``store``, snapshots go there."""
    import tempfile

    from driftwood.runtime import spawn
    from driftwood.snapshot.actor import resume as resume_actor
    from driftwood.snapshot.actor import run_actor

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(line + "\n" for line in lines))
    out: list[bytes] = []
    spec = chat_spec(wasm, model_path, Path(f.name), out, args)
    try:
        if resume:
            resume_actor(spec, store, name, key=key)
        elif store is None:
            with spawn(spec) as actor:
                actor.run()
        else:
            with spawn(spec) as actor:
                run_actor(actor, store, name, key, args)
    finally:
        Path(f.name).unlink()
    return b"".join(out).decode()

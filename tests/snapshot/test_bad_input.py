"""Bad snapshots are refused with a clear error before anything reaches a session: a flipped
byte anywhere, truncated or missing files, another model or module, an unknown version, a
header that lies, an unsigned or foreign snapshot when a key is required."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driftwood.errors import SnapshotError
from driftwood.model import load_model
from driftwood.snapshot.actor import restore_actor
from driftwood.snapshot.session import load_session, restore_session, save_session
from driftwood.snapshot.store import DirectoryStore, MemoryStore
from driftwood.snapshot.verify import verify
from tests.snapshot.conftest import chat_spec, files, prompt, reader, rewrite_header, run_chat

KEY = b"tenant-a-secret-key-0123456789"


@pytest.fixture(scope="module")
def corpus(tiny, tiny_path, chat_wasm, tmp_path_factory) -> DirectoryStore:
    """A store holding a session snapshot "s" and an actor snapshot "chat" (memory, module)."""
    store = DirectoryStore(tmp_path_factory.mktemp("corpus") / "store", create=True)
    s = tiny.new_session(capacity=1024, seed=0)
    save_session(store, "s", s, logits=s.prefill(prompt(300)))
    run_chat(chat_wasm, tiny_path, ["hello", "/snapshot"], store)
    return store


def snapshots_using(store: DirectoryStore, path: Path) -> list[str]:
    rel = path.relative_to(store.root).as_posix()
    out = []
    for name in ("s", "chat"):
        manifest_file = f"snapshots/{name}.json"
        keys = {o.key for o in store.manifest(name).objects()} if rel != manifest_file else set()
        if rel == manifest_file or rel in keys:
            out.append(name)
    return out


@pytest.fixture(scope="module")
def tiny_bf16(tiny_path):
    """The same model computing in bfloat16: restoring its float32 snapshots converts (the path
    CUDA restores take: staging, a device buffer, then the cache)."""
    return load_model(str(tiny_path), device="cpu", dtype="bfloat16", progress=False)


def restore(store: DirectoryStore, name: str, tiny, tiny_path, chat_wasm, key: bytes | None = None) -> None:
    if name == "s":
        restore_session(store, name, tiny, key=key).session.close()
    else:
        restore_actor(chat_spec(chat_wasm, tiny_path), store, name, key=key).close()


def refused(store, name, tiny, tiny_path, chat_wasm, match: str | None = None, key: bytes | None = None) -> None:
    with pytest.raises(SnapshotError, match=match):
        restore(store, name, tiny, tiny_path, chat_wasm, key)
    with pytest.raises(SnapshotError, match=match):
        verify(store, name, key)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_flipped_byte_anywhere_is_refused(corpus, tiny, tiny_bf16, tiny_path, chat_wasm, data):
    path = data.draw(st.sampled_from(files(corpus)), label="file")
    size = path.stat().st_size
    offset = data.draw(st.integers(0, size - 1), label="offset")
    flip = data.draw(st.integers(1, 255), label="xor")
    kind = data.draw(st.sampled_from(["native", "python"]), label="reader")
    model = data.draw(st.sampled_from([tiny, tiny_bf16]), label="restored into")  # bf16: converting
    raw = bytearray(path.read_bytes())
    names = snapshots_using(corpus, path)
    raw[offset] ^= flip
    path.write_bytes(raw)
    try:
        for name in names:
            with reader(kind):
                refused(corpus, name, model, tiny_path, chat_wasm)
    finally:
        raw[offset] ^= flip
        path.write_bytes(raw)


@pytest.mark.parametrize("kind", ["native", "python"])
@pytest.mark.parametrize("cut", ["empty", "half", "one byte short"])
def test_truncated_files_are_refused(corpus, tiny, tiny_bf16, tiny_path, chat_wasm, cut, kind):
    for path in files(corpus):
        raw = path.read_bytes()
        keep = {"empty": 0, "half": len(raw) // 2, "one byte short": len(raw) - 1}[cut]
        path.write_bytes(raw[:keep])
        try:
            for name in snapshots_using(corpus, path):
                with reader(kind):
                    refused(corpus, name, tiny, tiny_path, chat_wasm)
                    if name == "s":  # the converting path reads the files whole
                        refused(corpus, name, tiny_bf16, tiny_path, chat_wasm)
        finally:
            path.write_bytes(raw)


def test_missing_objects_are_refused(corpus, tiny, tiny_path, chat_wasm, tmp_path):
    for path in files(corpus):
        if path.parent.name == "snapshots":
            continue
        hidden = tmp_path / path.name
        shutil.move(path, hidden)
        try:
            for name in snapshots_using(corpus, path):
                refused(corpus, name, tiny, tiny_path, chat_wasm, "missing")
        finally:
            shutil.move(hidden, path)


def test_another_model_is_refused(tiny, other_path, store):
    s = tiny.new_session(capacity=512, seed=0)
    save_session(store, "s", s, logits=s.prefill(prompt(40)))
    other = load_model(str(other_path), device="cpu", progress=False)
    with pytest.raises(SnapshotError, match="never restores into another model"):
        restore_session(store, "s", other)


def test_another_module_or_model_is_refused_for_actors(corpus, tiny_path, other_path, chat_wasm, tmp_path):
    from driftwood import toolchain
    from driftwood.runtime.module import GuestModule

    probe = toolchain.build(Path(__file__).parent.parent / "guests" / "wasi_probe.c")
    spec = chat_spec(chat_wasm, tiny_path)
    spec.module = GuestModule.load(probe)
    with pytest.raises(SnapshotError, match="is of module chat"):
        restore_actor(spec, corpus, "chat")
    with pytest.raises(SnapshotError, match="never restores into another model"):
        restore_actor(chat_spec(chat_wasm, other_path), corpus, "chat")


@pytest.mark.parametrize(("version", "message"), [(2, "newer than this Driftwood"), ("1", "unknown snapshot format version"),
                                                  (0, "unknown snapshot format version")])
def test_unknown_versions_are_refused(tiny, store, version, message):
    s = tiny.new_session(capacity=512, seed=0)
    save_session(store, "s", s, logits=s.prefill(prompt(40)))
    rewrite_header(store, "s", lambda h: h.update(version=version))
    with pytest.raises(SnapshotError, match=message):
        restore_session(store, "s", tiny)


def _session(h):
    return h["sessions"][0]


LIES = {
    "position": (lambda h: _session(h).update(position=_session(h)["position"] + 1), "position"),
    "chunk bytes": (lambda h: _session(h)["chunks"][0].update(bytes=_session(h)["chunks"][0]["bytes"] + 8), "claims"),
    "chunk tokens": (lambda h: _session(h)["chunks"][0].update(tokens=255), "holds 255 tokens"),
    "chunk start": (lambda h: _session(h)["chunks"][1].update(start=200), "starts at 200"),
    "a token id": (lambda h: _session(h)["tokens"].__setitem__(3, 4), "does not match its address"),
    "a token out of range": (lambda h: _session(h)["tokens"].__setitem__(3, 10**6), "tokens must be"),
    "capacity below position": (lambda h: _session(h).update(capacity=100), "position"),
    "capacity past the context": (lambda h: _session(h).update(capacity=10**7), "capacity"),
    "logits size": (lambda h: _session(h)["logits"].update(bytes=12), "not a logits file"),
    "kv dtype": (lambda h: _session(h)["kv"].update(dtype="int8"), "unknown KV dtype"),
    "kv layout": (lambda h: _session(h)["kv"].update(n_layers=3), "claims|layout"),
    "a path out of the store": (lambda h: _session(h)["chunks"][0].update(key="../../../etc/passwd"), "bad object key"),
    "an unknown field": (lambda h: _session(h).update(extra=1), "unknown fields"),
    "rng": (lambda h: _session(h).update(rng="%%%"), "rng is not base64"),
    "rng size": (lambda h: _session(h).update(rng="AAAA"), "RNG state"),
    "sampler": (lambda h: _session(h).update(sampler={"temperature": -1.0}), "sampler"),
    "kind": (lambda h: h.update(kind="process"), "unknown snapshot kind"),
    "chunks missing": (lambda h: _session(h)["chunks"].pop(), "cover"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_headers_that_lie_are_refused_before_any_data_is_read(tiny, store, monkeypatch, lie):
    change, message = LIES[lie]
    s = tiny.new_session(capacity=1024, seed=0)
    save_session(store, "s", s, logits=s.prefill(prompt(300)))
    rewrite_header(store, "s", change)
    opened = []
    real_reader = store.reader
    monkeypatch.setattr(store, "reader", lambda key: opened.append(key) or real_reader(key))
    target = tiny.new_session(capacity=1024, seed=0)
    with pytest.raises(SnapshotError, match=message):
        manifest = store.manifest("s")
        load_session(store, manifest.sessions[0], tiny, into=target)
    assert opened == []  # refused before any object was opened
    assert target.position == 0 and target.tokens == []


def test_actor_headers_that_lie_are_refused(corpus, tiny, tiny_path, chat_wasm, tmp_path):
    lies = {
        "memory size": (lambda h: h["actor"]["memory"].update(bytes=h["actor"]["memory"]["bytes"] + 4096), "wasm pages"),
        "memory pages": (lambda h: h["actor"]["memory"]["pages"].append([10**6, 1]), "past the"),
        "overlapping pages": (lambda h: h["actor"]["memory"]["pages"].insert(1, [0, 1]), "ascending"),
        "module": (lambda h: h["actor"]["module"].update(sha256="0" * 64), "not named by the module"),
        "handles": (lambda h: h["actor"].update(next_handle=1), "next_handle"),
        "global type": (lambda h: h["actor"]["globals"].append({"name": "g", "type": "v128", "value": 0}), "type"),
    }
    for lie, (change, message) in lies.items():
        store = DirectoryStore(tmp_path / lie.replace(" ", "-"), create=True)
        for d in ("snapshots", "chunks", "blobs"):
            shutil.copytree(corpus.root / d, store.root / d, dirs_exist_ok=True)
        rewrite_header(store, "chat", change)
        refused(store, "chat", tiny, tiny_path, chat_wasm, message)


def test_a_key_refuses_unsigned_and_foreign_snapshots(tiny, tiny_path, chat_wasm, store):
    run_chat(chat_wasm, tiny_path, ["hi"], store, name="unsigned")
    run_chat(chat_wasm, tiny_path, ["hi"], store, name="foreign", key=b"tenant-b-secret-key-987654321")
    run_chat(chat_wasm, tiny_path, ["hi"], store, name="mine", key=KEY)
    refused(store, "unsigned", tiny, tiny_path, chat_wasm, "not signed", key=KEY)
    refused(store, "foreign", tiny, tiny_path, chat_wasm, "different key", key=KEY)
    restore_actor(chat_spec(chat_wasm, tiny_path), store, "mine", key=KEY).close()
    assert verify(store, "mine", KEY).manifest.signed
    # a signed header edited by someone without the key
    rewrite_header(store, "mine", lambda h: h["actor"].update(args=["--max-tokens", "999"]))
    refused(store, "mine", tiny, tiny_path, chat_wasm, "altered", key=KEY)


@pytest.mark.parametrize("where", ["header length", "header", "token id"])
def test_altered_bytes_in_a_memory_store_are_refused(tiny, tiny_bf16, where):
    """A memory store vouches for its bytes (they are not hashed again), but a chunk whose header
    length, header or token ids no longer match the manifest is still refused, on the direct path
    and on the converting one (which finds each payload through the header length)."""
    store = MemoryStore()
    s = tiny.new_session(capacity=1024, seed=0)
    save_session(store, "s", s, logits=s.prefill(prompt(300)))
    chunk = store.manifest("s").sessions[0].chunks[1]
    data = store.objects[chunk.obj.key]
    n = 8 + int.from_bytes(bytes(data[:8].numpy()), "little")
    at = {"header length": 0, "header": n - 3, "token id": data.numel() - 2}[where]
    data[at] ^= 0x21
    for model in (tiny, tiny_bf16):
        with pytest.raises(SnapshotError, match=r"header|other tokens"):
            restore_session(store, "s", model)

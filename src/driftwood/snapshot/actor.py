"""Whole-actor snapshots: the module, linear memory, exported mutable globals, and sessions.

These are cooperative checkpoints. A snapshot is taken when the guest asks (``dw_snapshot()``,
while it waits in that call) or after it exits; it records the guest's memory, its exported
mutable globals, which module it is (sha256 of the bytes, stored in the store too) and every
session it holds through the native ABI (tokens, KV cache, logits, RNG; its handle).

Restoring builds a new instance from the same module bytes, writes the memory and globals back,
reopens the sessions under the same handles, sets ``dw_resumed()`` to 1 and runs ``_start``
again. **The wasm call stack is not captured**: the guest starts over at ``main`` and finds its
state in its restored memory (chat.c keeps its conversation in one static struct and skips
its initialisation when it is already set up). Everything in memory comes back, libc's state
included, with two consequences the host and the guest handle:

- wasi-libc's ``_start`` traps when it runs twice in one instance (a ``started`` flag in
  memory); the host finds that flag in the module's code (:func:`start_guard`) and clears it.
- stdio buffers come back as they were: a guest reading stdin keeps it unbuffered (nothing
  read ahead is captured) and calls ``clearerr(stdin)`` on resume (an exit snapshot saw EOF).

Not captured: the call stack, WASI file descriptors the guest opened itself (preopens come
back from the command line), wasi-nn graphs and contexts (a snapshot is refused while any is
open), and a streaming detokenizer's held-back bytes (chat.c flushes after every reply).
"""

from __future__ import annotations

import re
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from driftwood import __version__
from driftwood.errors import DriftwoodError, SnapshotError
from driftwood.snapshot.format import (
    GLOBAL_TYPES,
    PAGE_SIZE,
    WASM_PAGE,
    ActorRecord,
    Digester,
    Manifest,
    MemoryRecord,
    Obj,
    encode_manifest,
    now,
)
from driftwood.snapshot.session import (
    SaveReport,
    _remember,
    check_model,
    forget,
    load_session,
    read_object,
    write_session,
)
from driftwood.snapshot.sign import read_key
from driftwood.snapshot.store import DirectoryStore, Store, Transaction, check_name
from driftwood.snapshot.wasm import start_guard

if TYPE_CHECKING:
    from driftwood.runtime import ActorSpec
    from driftwood.runtime.abi.native import NativeABI
    from driftwood.runtime.actor import Actor


# -- taking a snapshot ----------------------------------------------------------------------

def native_abi(actor: Actor) -> NativeABI:
    from driftwood.runtime.abi.native import NativeABI

    for host in actor.hosts:
        if isinstance(host, NativeABI):
            return host
    raise SnapshotError("the actor has no native ABI module: nothing to snapshot its sessions with")


def snapshot_actor(actor: Actor, store: Store, name: str, *, key: bytes | None = None,
                   args: Sequence[str] = ()) -> SaveReport:
    """Snapshot ``actor`` (not running, or waiting in a host call) into ``store`` as ``name``."""
    t0 = time.perf_counter()
    check_name(name)
    native = native_abi(actor)
    _refuse_uncaptured(actor)
    signed = key is not None
    module = actor.module
    entries = list(native.sessions.items())
    with store.transaction() as txn:
        digest = Digester(sha256=signed)
        digest.update(module.wasm)
        module_obj = digest.ref(f"blobs/{module.digest}.wasm")
        txn.put(module_obj.key, [module.wasm])
        memory = _write_memory(txn, actor, signed) if actor.arena is not None else None
        sessions = []
        for handle, entry in entries:
            sessions.append(write_session(
                txn, store, entry.session, logits=entry.logits, logits_offset=_guest_offset(actor, entry.logits),
                signed=signed, model_name=entry.name, model_spec=native.pool.spec(entry.name), handle=handle))
        record = ActorRecord(module.name, module_obj, memory, _read_globals(actor), native.sessions.next_handle,
                             tuple(args))
        manifest = Manifest("actor", name, now(), tuple(sessions), record, __version__, signed)
        txn.commit(name, encode_manifest(manifest, key))
    for (_, entry), rec in zip(entries, sessions, strict=True):
        _remember(entry.session, store, rec)
    return SaveReport(name, manifest, txn.bytes_written, txn.objects_written, txn.objects_reused,
                      time.perf_counter() - t0)


def _refuse_uncaptured(actor: Actor) -> None:
    for host in actor.hosts:
        busy = len(getattr(host, "graphs", ())) or len(getattr(host, "contexts", ()))
        if getattr(host, "module", "") == "wasi_ephemeral_nn" and busy:
            raise SnapshotError("wasi-nn graphs and contexts are not captured by snapshots: "
                                    "close them first, or keep sessions through the native ABI")


def _write_memory(txn: Transaction, actor: Actor, signed: bool) -> MemoryRecord:
    import zstandard

    arena = actor.arena
    assert arena is not None
    size = arena.committed
    mem = arena.numpy()  # (size,) uint8, aliasing the guest's memory
    nonzero = mem.view(np.uint64).reshape(-1, PAGE_SIZE // 8).any(axis=1)
    runs = _runs_of(nonzero)
    raw = Digester()
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    pieces = []
    for first, count in runs:
        page = mem[first * PAGE_SIZE : (first + count) * PAGE_SIZE]
        raw.update(page)
        pieces.append(compressor.compress(page))
    pieces.append(compressor.flush())
    blob = b"".join(pieces)
    digest = Digester(sha256=signed)
    digest.update(blob)
    obj = digest.ref(f"blobs/{digest.xxh3.hexdigest()}.zst")
    txn.put(obj.key, [blob])
    return MemoryRecord(size, tuple(runs), obj, raw.xxh3.hexdigest())


def _runs_of(flags: np.ndarray) -> list[tuple[int, int]]:
    """[(first, count)] of the True runs in a bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags.astype(np.int8), [0]))))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _read_globals(actor: Actor) -> tuple[tuple[str, str, int], ...]:
    import wasmtime

    out = []
    for name, ext in actor.exports.items():
        if not isinstance(ext, wasmtime.Global):
            continue
        gtype = ext.type(actor.store)
        if not gtype.mutable:
            continue  # part of the module
        kind = str(gtype.content)
        if kind not in GLOBAL_TYPES:
            raise SnapshotError(f"exported global {name!r} has type {kind}, which snapshots do not capture")
        out.append((name, kind, _to_bits(kind, ext.value(actor.store))))
    return tuple(out)


def _to_bits(kind: str, value: Any) -> int:
    if kind == "f32":
        return struct.unpack("<I", struct.pack("<f", value))[0]
    if kind == "f64":
        return struct.unpack("<Q", struct.pack("<d", value))[0]
    return int(value)


def _from_bits(kind: str, bits: int) -> Any:
    import wasmtime

    if kind == "f32":
        return wasmtime.Val.f32(struct.unpack("<f", struct.pack("<I", bits % (1 << 32)))[0])
    if kind == "f64":
        return wasmtime.Val.f64(struct.unpack("<d", struct.pack("<Q", bits % (1 << 64)))[0])
    if kind == "i32":
        return wasmtime.Val.i32(bits - (1 << 32) if bits >= 1 << 31 else bits)
    return wasmtime.Val.i64(bits - (1 << 64) if bits >= 1 << 63 else bits)


def _guest_offset(actor: Actor, logits: torch.Tensor | None) -> int | None:
    """Where ``logits`` lie in the guest's memory, if they are a view of it (the guest passed
    a logits buffer to dw_append): restored as a view again, not stored."""
    arena = actor.arena
    if logits is None or arena is None:
        return None
    offset = logits.data_ptr() - arena.base
    return offset if offset >= 0 and offset + 4 * logits.numel() <= arena.committed else None


# -- restoring ------------------------------------------------------------------------------

def restore_actor(spec: ActorSpec, store: Store, name: str, *, key: bytes | None = None,
                  manifest: Manifest | None = None) -> Actor:
    """A new actor from ``spec`` holding actor snapshot ``name``: memory, globals, sessions
    (under their handles), ``dw_resumed() == 1``. The module and every session's model must be
    the snapshot's own; everything is checked before the new actor's sessions are filled."""
    from driftwood.runtime import spawn
    from driftwood.runtime.abi.native import SessionLimits
    from driftwood.runtime.actor import Limits

    manifest = manifest or store.manifest(name, key)
    if manifest.kind != "actor" or manifest.actor is None:
        raise SnapshotError(f"{name} is a session snapshot, not an actor snapshot")
    rec = manifest.actor
    if spec.module.digest != rec.module_sha256:
        raise SnapshotError(f"snapshot {name} is of module {rec.module_name} (sha256 {rec.module_sha256[:16]}), "
                            f"not {spec.module.name} ({spec.module.digest[:16]}): refusing to restore it")
    signed = key is not None
    _check_sizes(store, manifest)
    if module_bytes(store, manifest, key) != spec.module.wasm:  # the stored copy is checked too
        raise SnapshotError(f"snapshot {name}: its stored module differs from the module given")
    models = []
    for s in manifest.sessions:
        model_name = s.model.name or "default"
        if model_name not in spec.pool:
            raise SnapshotError(f"the snapshot's session {s.handle} uses model {model_name!r}, "
                                f"which this actor cannot open (models: {', '.join(spec.pool.names())})")
        model = spec.pool.get(model_name)
        check_model(s, model, where=f"session {s.handle} of snapshot {name}")
        models.append((model_name, model))
    limits = spec.sessions or SessionLimits()
    if len(manifest.sessions) > limits.max_sessions or sum(s.capacity for s in manifest.sessions) > limits.max_tokens:
        raise SnapshotError(f"the snapshot's {len(manifest.sessions)} sessions exceed this actor's session limits")
    memory = None
    if rec.memory is not None:
        if rec.memory.size > (spec.limits or Limits()).max_memory:
            raise SnapshotError(f"the snapshot's {rec.memory.size}-byte memory exceeds this actor's memory limit")
        memory = _read_memory(store, rec.memory, signed)

    actor = spawn(spec)
    try:
        native = native_abi(actor)
        _restore_memory(actor, rec.memory, memory)
        _restore_globals(actor, rec.globals)
        for s, (model_name, model) in zip(manifest.sessions, models, strict=True):
            session, logits = load_session(store, s, model, signed=signed)
            if s.logits_offset is not None:
                try:
                    logits = native.mem.tensor(s.logits_offset, model.config.vocab_size, torch.float32, device=True)
                except DriftwoodError as exc:
                    session.close()
                    raise SnapshotError(f"session {s.handle}: its logits lie outside the restored memory") from exc
            native.adopt(s.handle, model_name, model, session, logits)
        native.sessions.skip_to(rec.next_handle)
        native.resumed = True
    except BaseException:
        actor.close()
        raise
    return actor


def _check_sizes(store: Store, manifest: Manifest) -> None:
    """Every object is there with its size: a truncated or missing one is refused up front."""
    for obj in manifest.objects():
        size = store.size(obj.key)
        if size is None:
            raise SnapshotError(f"snapshot object {obj.key} is missing")
        if size != obj.size:
            raise SnapshotError(f"snapshot object {obj.key} has {size} bytes, the manifest says {obj.size} (truncated?)")


def _read_memory(store: Store, rec: MemoryRecord, signed: bool) -> bytes:
    """The stored pages, decompressed and checked (never more than the manifest announced)."""
    import zstandard

    blob = read_object(store, rec.obj, signed)
    want = rec.stored_pages * PAGE_SIZE
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(blob)
        data = reader.read(want + 1) if want else b""
        while len(data) < want + 1:
            more = reader.read(want + 1 - len(data))
            if not more:
                break
            data += more
    except zstandard.ZstdError as exc:
        raise SnapshotError(f"memory object {rec.obj.key} does not decompress: {exc}") from None
    if len(data) != want:
        raise SnapshotError(f"memory object {rec.obj.key} holds {len(data)} bytes, the manifest says {want}")
    digest = Digester()
    digest.update(data)
    if digest.xxh3.hexdigest() != rec.raw_xxh3:
        raise SnapshotError(f"memory object {rec.obj.key}: checksum of the pages does not match")
    return data


def _restore_memory(actor: Actor, rec: MemoryRecord | None, data: bytes | None) -> None:
    import wasmtime

    memory = actor.exports.get("memory")
    if rec is None or data is None:
        if isinstance(memory, wasmtime.Memory):
            raise SnapshotError("the snapshot holds no linear memory, but the module exports one")
        return
    if not isinstance(memory, wasmtime.Memory) or actor.arena is None:
        raise SnapshotError("the snapshot holds linear memory, but the module exports none")
    pages = memory.size(actor.store)
    want = rec.size // WASM_PAGE
    if want < pages:
        raise SnapshotError(f"the snapshot's memory ({want} pages) is smaller than a fresh instance's ({pages})")
    if want > pages:
        try:
            memory.grow(actor.store, want - pages)
        except wasmtime.WasmtimeError as exc:
            raise SnapshotError(f"cannot grow the guest's memory to {rec.size} bytes: {exc}") from None
    dst = actor.arena.numpy()
    if dst.size != rec.size:
        raise SnapshotError(f"the restored memory has {dst.size} bytes, the snapshot {rec.size}")
    dst[:] = 0
    src = np.frombuffer(data, dtype=np.uint8)
    at = 0
    for first, count in rec.runs:
        n = count * PAGE_SIZE
        dst[first * PAGE_SIZE : first * PAGE_SIZE + n] = src[at : at + n]
        at += n
    guard = start_guard(actor.module.wasm)
    if guard is not None and guard + 4 <= rec.size:
        dst[guard : guard + 4] = 0  # wasi-libc's "_start ran" flag: let _start run again


def _restore_globals(actor: Actor, saved: Sequence[tuple[str, str, int]]) -> None:
    import wasmtime

    for name, kind, bits in saved:
        ext = actor.exports.get(name)
        if not isinstance(ext, wasmtime.Global) or str(ext.type(actor.store).content) != kind:
            raise SnapshotError(f"the module has no exported {kind} global {name!r}")
        ext.set_value(actor.store, _from_bits(kind, bits))


# -- running with snapshots -----------------------------------------------------------------

class ActorSnapshots:
    """The snapshot wiring of one running actor: where it saves (store, name, key), as the
    native ABI's ``snapshot_hook`` (``dw_snapshot()``) and ``session_snapshots``
    (``dw_session_save`` / ``dw_session_load``, stored as ``NAME/sessions/SESSION``)."""

    def __init__(self, actor: Actor, store: Store, name: str, key: bytes | None, args: Sequence[str] = ()) -> None:
        self.store, self.name, self.key, self.args = store, check_name(name), key, tuple(args)
        self.taken = 0
        native = native_abi(actor)
        native.snapshot_hook = self
        native.session_snapshots = self

    def __call__(self, actor: Actor) -> SaveReport:
        report = snapshot_actor(actor, self.store, self.name, key=self.key, args=self.args)
        self.taken += 1
        return report

    def session_name(self, name: str) -> str:
        return check_name(f"{self.name}/sessions/{name}")

    def save(self, abi: NativeABI, handle: int, entry: Any, name: str) -> None:
        from driftwood.snapshot.session import commit_session

        commit_session(self.store, self.session_name(name), entry.session, logits=entry.logits, key=self.key,
                       model_name=entry.name, model_spec=abi.pool.spec(entry.name))

    def load(self, abi: NativeABI, name: str) -> int:
        from driftwood.runtime.abi.native import DW_ELIMIT
        from driftwood.runtime.hostcall import GuestFault

        full = self.session_name(name)
        manifest = self.store.manifest(full, self.key)
        if manifest.kind != "session":
            raise SnapshotError(f"{full} is not a session snapshot")
        rec = manifest.sessions[0]
        model_name = rec.model.name or "default"
        if model_name not in abi.pool:
            raise SnapshotError(f"session snapshot {name} uses model {model_name!r}, which this actor cannot open")
        model = abi.pool.get(model_name)
        check_model(rec, model, where=f"session snapshot {name}")
        if abi.open_tokens() + rec.capacity > abi.limits.max_tokens:
            raise GuestFault(DW_ELIMIT, f"sessions may hold at most {abi.limits.max_tokens} tokens in all")
        session, logits = load_session(self.store, rec, model, signed=self.key is not None)
        return abi.adopt(None, model_name, model, session, logits)

    def rewound(self, session: Any, position: int) -> None:
        forget(session, position)


def default_name(module_name: str) -> str:
    """A snapshot name for a module file: its stem, without the build cache's digest."""
    stem = re.sub(r"-[0-9a-f]{20}$", "", Path(module_name).stem)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip("._-")
    return stem[:64] or "actor"


def run_actor(actor: Actor, store: Store, name: str, key: bytes | None, args: Sequence[str] = ()) -> int:
    """Run ``actor``'s ``_start`` with snapshots wired; snapshot it after it exits and collect
    the objects no snapshot names any more. Returns the guest's exit code (a trap propagates,
    and the last snapshot stays as it was)."""
    snapshots = ActorSnapshots(actor, store, name, key, args)
    code = actor.run()
    report = snapshots(actor)
    collected = store.gc()  # what earlier saves replaced (under the store's lock: no writer races it)
    where = store.root / "snapshots" if isinstance(store, DirectoryStore) else store.uri
    print(f"driftwood: snapshot {name} saved in {where} ({report.bytes_written:,} bytes written, "
          f"{collected.freed:,} freed)", file=sys.stderr)
    return code


def run_with_snapshots(spec: ActorSpec, snapshot_dir: str, *, key_file: str | None = None,
                       name: str | None = None) -> int:
    """``driftwood run --snapshot-dir DIR``: run the guest, snapshotting it when it asks
    (``dw_snapshot()``) and after it exits. Returns the guest's exit code."""
    from driftwood.runtime import spawn

    store = DirectoryStore(snapshot_dir, create=True)
    key = read_key(key_file)
    args = tuple(spec.wasi.args) if spec.wasi is not None else ()
    with spawn(spec) as actor:
        return run_actor(actor, store, check_name(name or default_name(spec.module.name)), key, args)


def resume(spec: ActorSpec, store: Store, name: str, *, key: bytes | None = None,
           manifest: Manifest | None = None, save_to: Store | None = None) -> int:
    """``driftwood resume``: restore actor snapshot ``name`` and run ``_start`` again; later
    snapshots go to ``save_to`` (default: the same store, same name)."""
    args = tuple(spec.wasi.args) if spec.wasi is not None else ()
    with restore_actor(spec, store, name, key=key, manifest=manifest) as actor:
        return run_actor(actor, save_to or store, name, key, args)


def module_bytes(store: Store, manifest: Manifest, key: bytes | None = None) -> bytes:
    """The snapshot's module, read from the store and checked against its sha256."""
    import hashlib

    assert manifest.actor is not None
    obj: Obj = manifest.actor.module
    wasm = read_object(store, obj, key is not None)
    if hashlib.sha256(wasm).hexdigest() != manifest.actor.module_sha256:
        raise SnapshotError(f"module object {obj.key} does not hash to its name")
    return wasm

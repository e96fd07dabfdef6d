"""Session snapshots: the KV cache in content-addressed chunks, plus tokens, logits and RNG.

A session's tokens ``[0, position)`` are cut into chunks of ``CHUNK_TOKENS`` (the last one may
be shorter). Each chunk is one safetensors file holding ``k``, ``v`` (n_layers, n_kv_heads,
tokens, head_dim) and ``tokens``; its address chains over the prefix::

    address_i = xxh3_128(address_{i-1} ‖ token ids of chunk i ‖ xxh3_128 of the chunk file)

so equal prefixes with equal bytes share chunks in a store, and a chunk's address names its
whole prefix. Saving again after the session grew writes only the chunks that changed: the
saver remembers, per session and store, which chunks hold this session's bytes, and reuses
them while the session's tokens still begin with theirs. Restoring reads every chunk straight
into a new session's cache (on the CPU with one kernel copy, verifying as it goes) and makes
the session live only after every check passed.

The next-token logits are stored with the session (a session does not keep them), so a
restored session continues exactly: greedy decoding gives the same tokens, and seeded
sampling (its RNG state is stored too) the same sequence, on the same device and dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from driftwood import __version__
from driftwood.errors import SnapshotError
from driftwood.snapshot import native
from driftwood.snapshot.format import (
    CHUNK_TOKENS,
    KV_DTYPES,
    Chunk,
    ChunkHeaders,
    Digester,
    KVLayout,
    Manifest,
    ModelRef,
    Obj,
    SessionRecord,
    chunk_address,
    chunk_header,
    chunk_root,
    encode_manifest,
    int32_bytes,
    logits_header,
    now,
)
from driftwood.snapshot.store import Reader, Store, Transaction

if TYPE_CHECKING:
    from driftwood.model import Model, SamplingParams, Session

READ_GROUP = 256 << 10  # bytes read per preadv on restore: hashed while still in cache
STAGE_BYTES = 512 << 20  # at most this much of chunk files per staging buffer (CUDA, converting)
WAKE_THREADS = True  # native.wake() before a restore from files (measured: bench:restore-profile)
STREAM_STEP = 4 << 20  # CUDA restores from files: payload bytes a host-to-device copy, queued as they are read


@dataclass
class SaveReport:
    name: str
    manifest: Manifest
    bytes_written: int  # objects and manifest
    objects_written: int
    objects_reused: int
    seconds: float


@dataclass
class Restored:
    session: Session
    logits: torch.Tensor | None  # (vocab,) float32 on the model's device
    sampler: SamplingParams | None


# -- what each session last saved (in this process) ----------------------------------------

@dataclass
class _Saved:
    tokens: list[int]
    chunks: list[Chunk]


_saved: weakref.WeakKeyDictionary[Session, dict[str, _Saved]] = weakref.WeakKeyDictionary()


def forget(session: Session, position: int = 0) -> None:
    """Tell the saver that ``session``'s keys and values from ``position`` on were (or will be)
    recomputed. Needed only after truncating a session below what it saved and appending the
    same tokens again: the next save then stores the recomputed bytes instead of reusing the
    earlier chunks (which hold the same tokens, computed before)."""
    for memo in _saved.get(session, {}).values():
        memo.chunks = [c for c in memo.chunks if c.start + c.count <= position]
        memo.tokens = memo.tokens[:position]


def _remember(session: Session, store: Store, rec: SessionRecord) -> None:
    _saved.setdefault(session, {})[store.uri] = _Saved(list(rec.tokens), list(rec.chunks))


# -- saving -------------------------------------------------------------------------------

def kv_layout(model: Model) -> KVLayout:
    c = model.config
    return KVLayout(dtype_name(model.dtype), c.n_layers, c.n_kv_heads, c.head_dim, CHUNK_TOKENS)


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in KV_DTYPES:
        raise SnapshotError(f"KV dtype {name} cannot be snapshotted (known: {', '.join(KV_DTYPES)})")
    return name


def model_ref(model: Model, name: str | None = None, spec: str | None = None) -> ModelRef:
    c = model.config
    return ModelRef(model.identity, c.arch, model.path.name, c.vocab_size, c.context_length, name, spec)


def write_session(
    txn: Transaction,
    store: Store,
    session: Session,
    *,
    logits: torch.Tensor | None = None,
    logits_offset: int | None = None,
    sampler: SamplingParams | None = None,
    signed: bool = False,
    model_name: str | None = None,
    model_spec: str | None = None,
    handle: int | None = None,
) -> SessionRecord:
    """Put ``session``'s new chunks (and its logits) into transaction ``txn``; return its record."""
    model = session.model
    kv = kv_layout(model)
    identity = model.identity
    tokens = list(session.tokens)
    position = len(tokens)
    chunks = _reusable(session, store, txn, tokens, signed)
    parent = chunks[-1].address if chunks else chunk_root(identity, kv)
    start = chunks[-1].start + chunks[-1].count if chunks else 0
    staging: torch.Tensor | None = None
    arrays = [byte_arrays(side) for side in cache_layers(session)] if model.device.type == "cpu" else []
    while start < position:
        count = min(kv.chunk_tokens, position - start)
        header = chunk_header(identity, kv, parent, start, count)
        ids = int32_bytes(tokens[start : start + count])
        if model.device.type == "cpu":  # straight from the cache: no copy
            payload = planes(arrays[0], start, start + count) + planes(arrays[1], start, start + count)
        else:
            state = session.kv_state(start, start + count)  # (L, H, T, D) on the device
            nbytes = count * kv.token_bytes
            if staging is None:
                staging = torch.empty(kv.chunk_tokens * kv.token_bytes, dtype=torch.uint8, pin_memory=True)
            half = nbytes // 2
            for i, name in enumerate(("k", "v")):
                dst = staging[i * half : (i + 1) * half].view(state[name].dtype).view(state[name].shape)
                dst.copy_(state[name])  # device -> pinned host, synchronous
            payload = [staging[:nbytes].numpy()]
        digest = Digester(sha256=signed)
        for part in (header, *payload, ids):
            digest.update(part)
        address = chunk_address(parent, tokens[start : start + count], digest.xxh3.hexdigest())
        obj = digest.ref(f"chunks/{address}.safetensors")
        txn.put(obj.key, [header, *payload, ids])
        chunks.append(Chunk(obj, start, count))
        parent, start = address, start + count

    logits_obj = None
    if logits is not None and logits_offset is None:
        values = logits.detach().to("cpu", torch.float32).contiguous()
        if values.shape != (model.config.vocab_size,):
            raise SnapshotError(f"logits of shape {tuple(values.shape)}, expected ({model.config.vocab_size},)")
        head = logits_header(model.config.vocab_size)
        digest = Digester(sha256=signed)
        digest.update(head)
        digest.update(values.numpy())
        logits_obj = digest.ref(f"blobs/{digest.xxh3.hexdigest()}.safetensors")
        txn.put(logits_obj.key, [head, values.numpy()])
    params = None if sampler is None else dataclasses.asdict(sampler)
    return SessionRecord(model_ref(model, model_name, model_spec), kv, session.capacity, tuple(tokens),
                         tuple(chunks), logits_obj, logits_offset, session.rng_state(), params, handle)


def _reusable(session: Session, store: Store, txn: Transaction, tokens: list[int], signed: bool) -> list[Chunk]:
    """The leading chunks of the last save of ``session`` to ``store`` that still hold its
    bytes: their tokens are unchanged and the store still has them."""
    memo = _saved.get(session, {}).get(store.uri)
    if memo is None:
        return []
    out: list[Chunk] = []
    for c in memo.chunks:
        end = c.start + c.count
        full = c.count == min(CHUNK_TOKENS, len(tokens) - c.start)
        if end > len(tokens) or not full or tokens[c.start : end] != memo.tokens[c.start : end]:
            break
        if signed and c.obj.sha256 is None:
            break  # saved unsigned: write it again with a sha256 (same address, same file)
        if not txn.has(c.obj.key):
            break
        txn.objects_reused += 1
        out.append(c)
    return out


def cache_layers(session: Session) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The session's cache as per-layer (batch, n_kv_heads, capacity, head_dim) tensors, keys
    and values (model/cache.py's layout; also accepts one (n_layers, ...) tensor)."""
    cache = session.cache
    if cache is None:
        raise SnapshotError("the session is closed")
    return _per_layer(cache.k), _per_layer(cache.v)


def _per_layer(t: Any) -> list[torch.Tensor]:
    return list(t) if isinstance(t, list | tuple) else list(t.unbind(0))


def byte_arrays(layers: list[torch.Tensor]) -> list[np.ndarray]:
    """Each CPU layer as a (1, H, capacity, D * itemsize) uint8 array aliasing the cache."""
    return [layer.view(torch.uint8).numpy() for layer in layers]


def planes(arrays: list[np.ndarray], t0: int, t1: int) -> list[np.ndarray]:
    """Positions [t0, t1) of every (layer, KV head), in the chunk file's order: ``n_layers *
    n_kv_heads`` contiguous (t1 - t0, head_dim * itemsize) byte planes of the cache."""
    return [a[0, h, t0:t1] for a in arrays for h in range(a.shape[1])]


def save_session(
    store: Store,
    name: str,
    session: Session,
    *,
    logits: torch.Tensor | None = None,
    sampler: SamplingParams | None = None,
    key: bytes | None = None,
) -> SaveReport:
    """Snapshot ``session`` into ``store`` as ``name`` (replacing an older snapshot of that name
    atomically). ``logits``: the next-token logits the session's last step returned (store
    them to continue exactly); ``sampler``: parameters to keep with it; ``key``: sign it."""
    return commit_session(store, name, session, logits=logits, sampler=sampler, key=key)


def commit_session(store: Store, name: str, session: Session, *, key: bytes | None = None,
                   **record: Any) -> SaveReport:
    """:func:`save_session` with the record's other fields (model name and spec) settable."""
    t0 = time.perf_counter()
    with store.transaction() as txn:
        rec = write_session(txn, store, session, signed=key is not None, **record)
        manifest = Manifest("session", name, now(), (rec,), None, __version__, key is not None)
        txn.commit(name, encode_manifest(manifest, key))
    _remember(session, store, rec)
    return SaveReport(name, manifest, txn.bytes_written, txn.objects_written, txn.objects_reused,
                      time.perf_counter() - t0)


# -- restoring ----------------------------------------------------------------------------

def check_model(rec: SessionRecord, model: Model, where: str = "snapshot") -> None:
    """Refuse a session record that was not made with ``model``."""
    if rec.model.identity != model.identity:
        raise SnapshotError(
            f"{where} is of model {rec.model.file} ({rec.model.identity[:16]}), not {model.path.name} "
            f"({model.identity[:16]}): a snapshot never restores into another model")
    c = model.config
    if (rec.kv.n_layers, rec.kv.n_kv_heads, rec.kv.head_dim) != (c.n_layers, c.n_kv_heads, c.head_dim):
        raise SnapshotError(f"{where}: KV layout {rec.kv} does not fit the model")
    if rec.model.vocab_size != c.vocab_size or rec.capacity > c.context_length:
        raise SnapshotError(f"{where}: vocabulary or capacity does not fit the model")


def load_session(
    store: Store,
    rec: SessionRecord,
    model: Model,
    *,
    signed: bool = False,
    into: Session | None = None,
) -> tuple[Session, torch.Tensor | None]:
    """A new session on ``model`` holding ``rec`` (or ``into``, an empty session, filled), and
    the stored logits. Raises SnapshotError, leaving no session behind, on any mismatch."""
    check_model(rec, model)
    session = into if into is not None else model.new_session(capacity=rec.capacity, seed=0)
    try:
        if session.position != 0 or session.capacity < rec.position:
            raise SnapshotError("restoring needs an empty session with room for the snapshot")
        if len(rec.rng) != len(session.rng_state()):
            raise SnapshotError(f"RNG state of {len(rec.rng)} bytes, this torch keeps {len(session.rng_state())}")
        sampler = _sampler(rec)  # noqa: F841 (validated here, before any bulk read)
        loader = _ChunkLoader(store, rec, session, signed)
        parents = [chunk_root(rec.model.identity, rec.kv)] + [c.address for c in rec.chunks[:-1]]
        loader.load_all(rec.chunks, parents)
        logits = _load_logits(store, rec, model, signed) if rec.logits is not None else None
        loader.finish(session, list(rec.tokens), rec.rng)
    except BaseException:
        if into is None:
            session.close()
        raise
    _remember(session, store, rec)
    return session, logits


def restore_session(store: Store, name: str, model: Model, *, key: bytes | None = None) -> Restored:
    """Restore snapshot ``name`` into a new session on ``model`` (with ``key``: only if signed
    with it). Returns the session, its next-token logits and its sampling parameters."""
    manifest = store.manifest(name, key)
    if manifest.kind != "session":
        raise SnapshotError(f"{name} is an actor snapshot; restore it with restore_actor or `driftwood resume`")
    rec = manifest.sessions[0]
    session, logits = load_session(store, rec, model, signed=key is not None)
    return Restored(session, logits, _sampler(rec))


def _sampler(rec: SessionRecord) -> SamplingParams | None:
    if rec.sampler is None:
        return None
    from driftwood.model import SamplingParams

    try:
        return SamplingParams(**rec.sampler)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"sampler parameters are invalid: {exc}") from None


def check_object(obj: Obj, parts: Sequence[Any], signed: bool) -> None:
    """Refuse ``parts`` (an object's bytes, in order) unless they match ``obj``'s digests."""
    digest = Digester(sha256=signed)
    for p in parts:
        digest.update(p)
    got = digest.ref(obj.key)
    if got.size != obj.size:
        raise SnapshotError(f"{obj.key}: {got.size} bytes, the manifest says {obj.size} (truncated?)")
    if got.xxh3 != obj.xxh3 or (signed and got.sha256 != obj.sha256):
        raise SnapshotError(f"{obj.key}: checksum mismatch: the object is corrupted or was altered")


def _check_size(obj: Obj, r: Reader, where: str | None = None) -> None:
    if r.size != obj.size:
        raise SnapshotError(f"{where or obj.key}: {r.size} bytes, the manifest says {obj.size} "
                            "(truncated or replaced)")


def read_object(store: Store, obj: Obj, signed: bool) -> bytes:
    """The bytes of ``obj``, checked (the store's own word is enough for a verified store)."""
    with store.reader(obj.key) as r:
        _check_size(obj, r)
        data = r.read(0, r.size)
    if not store.verified:
        check_object(obj, [data], signed)
    return data


def _load_logits(store: Store, rec: SessionRecord, model: Model, signed: bool) -> torch.Tensor:
    assert rec.logits is not None
    head = logits_header(model.config.vocab_size)
    with store.reader(rec.logits.key) as r:
        view = r.view() if store.verified and r.size == rec.logits.size else None
        if view is not None:  # in memory and vouched for: read in place, copied once below
            got, values = bytes(view[: len(head)].numpy()), view[len(head) :].view(torch.float32)
    if view is None:  # read once, straight into the tensor
        values = torch.empty(model.config.vocab_size, dtype=torch.float32)
        with store.reader(rec.logits.key) as r:
            _check_size(rec.logits, r)
            if r.size != len(head) + values.nbytes:
                raise SnapshotError(f"{rec.logits.key}: not the logits file the manifest describes")
            got = r.read(0, len(head))
            r.readinto(len(head), [values.numpy()])
        if not store.verified:
            check_object(rec.logits, [got, values.numpy()], signed)
    if got != head:
        raise SnapshotError(f"{rec.logits.key}: not the logits file the manifest describes")
    return values.to(model.device, copy=view is not None, non_blocking=values.is_pinned())


class _ChunkLoader:
    """Reads chunks into a session's cache.

    On the CPU with the cache's own dtype (``direct``): straight into the cache, and the
    session adopts the bytes in place. With the native reader (:mod:`driftwood.snapshot.native`)
    every chunk in one call on torch's threads: a directory store's files mapped, each page
    copied once from the page cache into a buffer in L1, hashed there and streamed into the
    cache (preadv where a file cannot be mapped), a memory store's payloads copied with
    streaming stores. Without
    it, here, a chunk at a time: preadv into the planes, hashing each group of planes while it
    is in cache, or one copy per side. (Python threads do not help: python-xxhash holds the
    GIL.) Signed restores take this path too (sha256 beside xxh3).

    Otherwise (CUDA, or another dtype) through :meth:`_place`: straight from a (pinned) memory
    store, every copy issued before the checks, or from staging buffers (pinned on CUDA, two in
    turn so that reading the next files overlaps the copies of the last): a directory store's
    files read whole by the native reader, a group of files per call, each payload copied to
    the GPU as it arrives (:func:`native.read_files_to_gpu`), else a chunk at a time here.
    Either way the session's cache is written before the last check, but the session only
    holds the tokens (:meth:`finish`) once every check passed.
    """

    def __init__(self, store: Store, rec: SessionRecord, session: Session, signed: bool) -> None:
        self.store, self.rec, self.signed = store, rec, signed
        self.dtype = getattr(torch, rec.kv.dtype)
        self.verify = not store.verified
        self.session = session
        if session.cache is None:
            raise SnapshotError("the session is closed")
        first = session.cache.k[0] if isinstance(session.cache.k, list | tuple) else session.cache.k
        self.device = first.device
        self.cuda = self.device.type == "cuda"
        self.direct = not self.cuda and first.dtype == self.dtype
        self.raw: torch.Tensor | None = None  # CUDA: every chunk's payload as copied, on the device
        self.placed: list[tuple[int, int]] = []  # the token ranges in raw not yet in the cache
        self.staging: list[torch.Tensor] = []
        self.events: list[Any] = []  # per staging buffer: when the copies that read it are done
        self.turn = 0

    def load_all(self, chunks: Sequence[Chunk], parents: Sequence[str]) -> None:
        """Read, check and place every chunk (``parents``: the previous chunk's addresses). A
        verified store's payloads in memory: all placed in one native call (``direct``), or each
        copied to the device while the host checks (:meth:`_place_views`). A directory store's
        files through the native reader where it is built: every file in one call (``direct``)
        or whole files into staging a group at a time. Otherwise, and for signed restores from
        files (their sha256 is hashlib's), one chunk at a time here."""
        headers_of = ChunkHeaders(self.rec.model.identity, self.rec.kv)

        def header(chunk: Chunk, parent: str) -> bytes:
            return headers_of(parent, chunk.start, chunk.count)

        def headers() -> list[bytes]:
            return [header(c, p) for c, p in zip(chunks, parents, strict=True)]

        if WAKE_THREADS and self.verify and not self.signed and native.module() is not None:
            native.wake()  # the reader's threads, while the files are opened and the headers built
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(self.store.reader(c.obj.key)) for c in chunks]
            for chunk, r in zip(chunks, readers, strict=True):
                _check_size(chunk.obj, r, self._where(chunk))
            views = [] if self.verify else [r.view() for r in readers]
            in_memory = not self.verify and all(v is not None for v in views)
            built = native.module() is not None
            if in_memory and not self.direct:
                return self._place_views(chunks, parents, views, header)
            if in_memory and built:
                return self._copy_native(chunks, headers(), views)
            if self.verify and not self.signed and built and all(r.fileno() is not None for r in readers):
                if not self.direct:
                    return self._stage_native(chunks, parents, readers, header)
                return self._read_native(chunks, headers(), readers)
        for chunk, parent in zip(chunks, parents, strict=True):  # each header when it is needed:
            self.load(chunk, header(chunk, parent))  # the first copy starts sooner

    def _read_native(self, chunks: Sequence[Chunk], headers: list[bytes], readers: list[Reader]) -> None:
        files = [native.FileChunk(c.start, c.count, r.fileno(), len(h))  # type: ignore[arg-type]
                 for c, h, r in zip(chunks, headers, readers, strict=True)]
        k, v = self.session.cache.k, self.session.cache.v
        for chunk, header, got in zip(chunks, headers, native.read_chunks(files, k, v), strict=True):
            where = self._where(chunk)
            self._check_read(where, got.error)
            self._check_header(where, got.header, header)
            self._check_digest(chunk, got.digest)
            self._check_ids(chunk, got.ids)

    def _stage_native(self, chunks: Sequence[Chunk], parents: Sequence[str], readers: list[Reader],
                      header: Any) -> None:
        """Whole files into staging, a group of files per native call (one file per thread, as
        many as there are threads, at most STAGE_BYTES), each file checked, then its payload
        placed. On CUDA each reading thread queues its file's payload for the device as it
        arrives (:func:`native.read_files_to_gpu`), and the payloads are placed once checked."""
        per_group = max(2, torch.get_num_threads())
        groups: list[list[int]] = [[]]
        size = 0
        for i, chunk in enumerate(chunks):
            if groups[-1] and (size + chunk.obj.size > STAGE_BYTES or len(groups[-1]) == per_group):
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += chunk.obj.size
        need = max(sum(chunks[i].obj.size for i in g) for g in groups)
        tb = self.rec.kv.token_bytes
        driver = native.cuda_driver(self.device) if self.cuda else None
        for group in groups:
            buf = self._staging(need)
            spans, at = [], 0
            for i in group:
                spans.append((at, chunks[i].obj.size))
                at += chunks[i].obj.size
            files = [(readers[i].fileno(), buf[o : o + n]) for i, (o, n) in zip(group, spans, strict=True)]
            expected = [header(chunks[i], parents[i]) for i in group]
            try:
                if driver is not None:  # each payload queued for the device by its reader as it arrives
                    payloads = [self._payload(chunks[i], len(h), n)
                                for i, (_, n), h in zip(group, spans, expected, strict=True)]
                    got = native.read_files_to_gpu(files, payloads, driver, STREAM_STEP)  # type: ignore[arg-type]
                else:
                    got = native.read_files(files)  # type: ignore[arg-type]
                for i, (o, n), h, (digest, error) in zip(group, spans, expected, got, strict=True):
                    chunk, where = chunks[i], self._where(chunks[i])
                    self._check_read(where, error)
                    self._check_digest(chunk, digest)
                    payload = chunk.count * tb
                    self._check_header(where, bytes(buf[o : o + len(h)].numpy()), h)
                    self._check_ids(chunk, buf[o + len(h) + payload : o + n].numpy().view("<i4"))
                    if driver is not None:  # already on its way
                        self.placed.append((chunk.start, chunk.start + chunk.count))
                    else:
                        self._place(buf[o + len(h) : o + len(h) + payload], chunk.start, chunk.start + chunk.count)
            except BaseException:
                if self.cuda:  # the copies queued from the staging buffer end before it is let go
                    torch.cuda.current_stream(self.device).synchronize()
                raise
            self._staged()

    def _payload(self, chunk: Chunk, header_bytes: int, file_bytes: int) -> native.Payload:
        """Where a chunk file's payload goes in :attr:`raw`: after the header the manifest
        implies (a file that differs fails its checks; one too short for it copies nothing)."""
        end = header_bytes + chunk.count * self.rec.kv.token_bytes
        if end > file_bytes:
            return native.Payload(self._raw(chunk.start, 0), 0, 0)
        return native.Payload(self._raw(chunk.start, chunk.count), header_bytes, end)

    def _place_views(self, chunks: Sequence[Chunk], parents: Sequence[str], views: list[torch.Tensor],
                     header: Any) -> None:
        """A verified store's chunks in (pinned) memory, into another device or dtype: every
        payload's copy issued first (found through the file's own header length, which must
        account for the file's size exactly), the placing queued behind them, then each header
        and token list compared with the manifest while the copies run."""
        tb = self.rec.kv.token_bytes
        starts = []
        for chunk, view in zip(chunks, views, strict=True):
            n = 8 + int.from_bytes(bytes(view[:8].numpy()), "little") if view.numel() >= 8 else 0
            payload = chunk.count * tb
            if n < 8 or n + payload + 4 * chunk.count != view.numel():
                raise SnapshotError(f"{self._where(chunk)}: its header's length does not fit the file "
                                    "(corrupted or altered)")
            self._place(view[n : n + payload], chunk.start, chunk.start + chunk.count)
            starts.append(n)
        if self.placed:
            self._scatter_raw()
        for chunk, parent, view, n in zip(chunks, parents, views, starts, strict=True):
            self._check_header(self._where(chunk), bytes(view[:n].numpy()), header(chunk, parent))
            self._check_ids(chunk, view[n + chunk.count * tb :].numpy().view("<i4"))

    def _copy_native(self, chunks: Sequence[Chunk], headers: list[bytes], views: list[Any]) -> None:
        payloads = []
        for chunk, header, view in zip(chunks, headers, views, strict=True):
            where, n = self._where(chunk), len(header)
            self._check_header(where, bytes(view[:n].numpy()), header)
            self._check_ids(chunk, view[view.numel() - 4 * chunk.count :].numpy().view("<i4"))
            payloads.append((view[n:], native.Span(chunk.start, chunk.count)))
        native.copy_chunks(payloads, self.session.cache.k, self.session.cache.v)

    @staticmethod
    def _where(chunk: Chunk) -> str:
        return f"chunk at token {chunk.start} ({chunk.obj.key})"

    @staticmethod
    def _check_read(where: str, error: int) -> None:
        if error <= native.CUDA_ERROR:
            raise SnapshotError(f"{where}: CUDA driver error {native.CUDA_ERROR - error} copying it to the device")
        if error == native.MAP_FAULT:
            raise SnapshotError(f"{where}: reading the file failed midway (cut short by another process, "
                                "or an I/O error)")
        if error:
            raise SnapshotError(f"{where}: the file ended early (truncated?)" if error < 0
                                else f"{where}: {os.strerror(error)}")

    def _check_digest(self, chunk: Chunk, xxh3: str, sha256: str | None = None) -> None:
        """The file's digests against the manifest's (sha256 only when signed: the native
        readers, which hash xxh3 alone, serve unsigned restores only)."""
        if xxh3 != chunk.obj.xxh3 or (self.signed and sha256 != chunk.obj.sha256):
            raise SnapshotError(f"{self._where(chunk)}: checksum mismatch: corrupted or altered")

    @staticmethod
    def _check_header(where: str, got: bytes, header: bytes) -> None:
        if got != header:
            raise SnapshotError(f"{where}: its header is not the one the manifest describes "
                                "(corrupted or altered)")

    @functools.cached_property
    def expected(self) -> bytes:
        """The manifest's token ids as int32 LE, as chunk files hold them (built on first use:
        after the first copy has started)."""
        return int32_bytes(self.rec.tokens)

    def _check_ids(self, chunk: Chunk, ids: np.ndarray) -> None:
        if ids.astype("<i4", copy=False).tobytes() != self.expected[4 * chunk.start : 4 * (chunk.start + chunk.count)]:
            raise SnapshotError(f"{self._where(chunk)} holds other tokens than the manifest")

    def load(self, chunk: Chunk, header: bytes) -> None:
        """Read, check and place one chunk (``header``: the one the manifest implies)."""
        kv = self.rec.kv
        t0, t1 = chunk.start, chunk.start + chunk.count
        payload = chunk.count * kv.token_bytes
        where = self._where(chunk)
        with self.store.reader(chunk.obj.key) as r:
            _check_size(chunk.obj, r, self._where(chunk))
            head = r.read(0, len(header))
            self._check_header(where, head, header)
            digest = Digester(sha256=self.signed) if self.verify else None
            if digest is not None:
                digest.update(head)
            ids = bytearray(4 * chunk.count)
            view = r.view()
            if self.direct and view is None:
                offset = len(header)
                arrays = [byte_arrays(side) for side in cache_layers(self.session)]
                for group in _groups(planes(arrays[0], t0, t1) + planes(arrays[1], t0, t1), READ_GROUP):
                    r.readinto(offset, group)
                    for g in group:
                        offset += g.nbytes
                        if digest is not None:
                            digest.update(g)
            else:
                staged = view is None
                if staged:
                    host = self._staging(kv.chunk_tokens * kv.token_bytes)[:payload]
                    r.readinto(len(header), [host.numpy()])
                else:
                    host = view[len(header) : len(header) + payload]
                if digest is not None:
                    digest.update(host.numpy())
                if self.direct:
                    self._scatter(host, t0, t1)
                else:
                    self._place(host, t0, t1)
                if staged:
                    self._staged()
            r.readinto(len(header) + payload, [ids])
            if digest is not None:
                digest.update(ids)
                got = digest.ref(chunk.obj.key)
                self._check_digest(chunk, got.xxh3, got.sha256)
        self._check_ids(chunk, np.frombuffer(ids, dtype="<i4"))

    def _staging(self, size: int) -> torch.Tensor:
        """The next of two staging buffers (pinned on CUDA), once the copies that read it last
        are done: ``size`` bytes."""
        if len(self.staging) < 2:
            self.staging.append(torch.empty(0, dtype=torch.uint8))
            self.events.append(None)
        i = self.turn = (self.turn + 1) % len(self.staging)
        if self.events[i] is not None:
            self.events[i].synchronize()
        if self.staging[i].numel() < size:
            self.staging[i] = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
        return self.staging[i][:size]

    def _staged(self) -> None:
        """The copies from the current staging buffer are all issued."""
        if self.cuda:
            self.events[self.turn] = torch.cuda.current_stream(self.device).record_event()

    def _sides(self, host: torch.Tensor, t0: int, t1: int) -> list[torch.Tensor]:
        """Host bytes of a chunk's payload -> its k and v, each (L, H, T, D) in the chunk's dtype."""
        L, H, D = self.rec.kv.n_layers, self.rec.kv.n_kv_heads, self.rec.kv.head_dim
        half = host.numel() // 2
        return [host[i * half : (i + 1) * half].view(self.dtype).view(L, H, t1 - t0, D) for i in range(2)]

    def _place(self, host: torch.Tensor, t0: int, t1: int) -> None:
        """A chunk's payload bytes (k then v, each (L, H, T, D)) -> the cache, converting the
        dtype (the paths other than ``direct``). On CUDA one contiguous copy into a device buffer
        (the copy engine at full speed: torch would stage a copy into the strided cache the same
        way), placed later by :meth:`_scatter_raw`, so that the copies of all chunks run back to
        back while the host checks and reads the next ones."""
        if not self.cuda:
            self._scatter(host, t0, t1)
            return
        self._raw(t0, t1 - t0).copy_(host, non_blocking=True)
        self.placed.append((t0, t1))

    def _raw(self, start: int, count: int) -> torch.Tensor:
        """The device bytes of tokens [start, start + count) in :attr:`raw` (made on first use)."""
        tb = self.rec.kv.token_bytes
        if self.raw is None:
            self.raw = torch.empty(self.rec.position * tb, dtype=torch.uint8, device=self.device)
        return self.raw[start * tb : (start + count) * tb]

    def _scatter(self, src: torch.Tensor, t0: int, t1: int) -> None:
        """Payload bytes on the cache's device -> positions [t0, t1) of the cache."""
        cache = self.session.cache
        for side, whole in zip(self._sides(src, t0, t1), (cache.k, cache.v), strict=True):
            if isinstance(whole, torch.Tensor):
                whole[:, 0, :, t0:t1].copy_(side)
                continue
            for layer, dst in enumerate(_per_layer(whole)):
                dst[0, :, t0:t1].copy_(side[layer])

    def _scatter_raw(self) -> None:
        """The device buffer's chunks not yet placed -> the cache: a leading run of full chunks
        in one copy per side (a (chunks, side, L, H, T, D) view permuted into the cache), the
        rest one by one."""
        assert self.raw is not None
        kv, cache = self.rec.kv, self.session.cache
        ct, tb = kv.chunk_tokens, kv.token_bytes
        n = 0
        while n < len(self.placed) and self.placed[n] == (n * ct, (n + 1) * ct):
            n += 1
        if n > 1 and isinstance(cache.k, torch.Tensor):
            L, H, D = kv.n_layers, kv.n_kv_heads, kv.head_dim
            src = self.raw[: n * ct * tb].view(self.dtype).view(n, 2, L, H, ct, D)
            for s, whole in enumerate((cache.k, cache.v)):
                whole[:, 0, :, : n * ct].view(L, H, n, ct, D).copy_(src[:, s].permute(1, 2, 0, 3, 4))
        else:
            n = 0
        for t0, t1 in self.placed[n:]:
            self._scatter(self.raw[t0 * tb : t1 * tb], t0, t1)
        self.placed.clear()

    def finish(self, session: Session, tokens: list[int], rng: bytes) -> None:
        """Make the session hold the tokens: every chunk was read and checked."""
        if self.placed:
            self._scatter_raw()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        session.adopt_kv(tokens, rng)


def _groups(views: list[np.ndarray], size: int) -> list[list[np.ndarray]]:
    out: list[list[np.ndarray]] = [[]]
    n = 0
    for v in views:
        if n >= size:
            out.append([])
            n = 0
        out[-1].append(v)
        n += v.nbytes
    return out

"""The snapshot format: manifests (a checksummed JSON header), KV chunk files (safetensors),
digests and validation. docs/snapshot-format.md is the specification; this module is its code.

Everything here is pure: bytes in, validated records out. A manifest is checked completely
(canonical encoding, format and version, header checksum, signature when a key is given,
schema, every size and chunk address recomputed) before any caller reads object data, so a
bad snapshot is refused before anything touches a session.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from driftwood.errors import SnapshotError

FORMAT = "driftwood.snapshot"
VERSION = 1
CHUNK_TOKENS = 256  # tokens per KV chunk (the last chunk of a session may be shorter)
PAGE_SIZE = 4096  # granularity at which all-zero pages of linear memory are skipped
WASM_PAGE = 65536
MAX_MANIFEST_BYTES = 64 << 20
KINDS = ("session", "actor")

# torch dtype name -> (safetensors dtype, bytes per element)
KV_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
LAYOUT = "layer,kv_head,token,dim"  # chunk tensors k, v: (n_layers, n_kv_heads, tokens, head_dim)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}){0,3}")
KEY_RE = re.compile(r"(chunks/[0-9a-f]{32}\.safetensors|blobs/[0-9a-f]{32}\.(safetensors|zst)|blobs/[0-9a-f]{64}\.wasm)")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


# -- digests ------------------------------------------------------------------------------

class Digester:
    """The digests of one object, fed in file order: xxh3-128 always, sha256 for signing."""

    def __init__(self, sha256: bool = False) -> None:
        self.xxh3 = xxhash.xxh3_128()
        self.sha = hashlib.sha256() if sha256 else None
        self.size = 0

    def update(self, data: Any) -> None:
        self.xxh3.update(data)
        if self.sha is not None:
            self.sha.update(data)
        self.size += memoryview(data).nbytes

    def ref(self, key: str) -> Obj:
        return Obj(key, self.size, self.xxh3.hexdigest(), self.sha.hexdigest() if self.sha else None)


def chunk_root(identity: str, kv: KVLayout) -> str:
    """The address every session's chunk chain starts from: model, KV dtype and layout."""
    text = f"driftwood.kv-chunk/1\n{identity}\n{kv.dtype}\n{LAYOUT}\n{kv.n_layers},{kv.n_kv_heads},{kv.head_dim}\n{kv.chunk_tokens}\n"
    return xxhash.xxh3_128_hexdigest(text.encode())


def chunk_address(parent: str, tokens: Sequence[int], digest: str) -> str:
    """xxh3-128(parent address ‖ token ids as int32 LE ‖ the chunk file's xxh3-128)."""
    h = xxhash.xxh3_128(bytes.fromhex(parent))
    h.update(int32_bytes(tokens))
    h.update(bytes.fromhex(digest))
    return h.hexdigest()


def int32_bytes(values: Sequence[int]) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


# -- safetensors --------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors name: F32, BF16, F16, I32
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "U8": 1}[self.dtype]
        for d in self.shape:
            n *= d
        return n


def safetensors_header(tensors: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file whose data holds ``tensors``
    back to back in the given order. Deterministic: a reader recomputes and compares it."""
    return _framed(_header_json(tensors, metadata))


def _header_json(tensors: Sequence[TensorSpec], metadata: Mapping[str, str]) -> str:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    return json.dumps(header, sort_keys=True, separators=(",", ":"))


def _framed(text: str) -> bytes:
    data = text.encode()
    data += b" " * (-len(data) % 8)  # data starts 8-byte aligned
    return len(data).to_bytes(8, "little") + data


def chunk_tensors(kv: KVLayout, count: int) -> list[TensorSpec]:
    st = KV_DTYPES[kv.dtype][0]
    shape = (kv.n_layers, kv.n_kv_heads, count, kv.head_dim)
    return [TensorSpec("k", st, shape), TensorSpec("v", st, shape), TensorSpec("tokens", "I32", (count,))]


def chunk_header(identity: str, kv: KVLayout, parent: str, start: int, count: int) -> bytes:
    return safetensors_header(chunk_tensors(kv, count), _chunk_metadata(identity, kv, parent, str(start)))


def chunk_size(identity: str, kv: KVLayout, parent: str, start: int, count: int) -> int:
    return ChunkHeaders(identity, kv).size(parent, start, count)


def _chunk_metadata(identity: str, kv: KVLayout, parent: str, start: str) -> dict[str, str]:
    return {"format": "driftwood.kv-chunk", "version": str(VERSION), "model": identity,
            "dtype": kv.dtype, "layout": LAYOUT, "parent": parent, "start": start}


class ChunkHeaders:
    """:func:`chunk_header` for the chunks of one model and KV layout: one JSON text per chunk
    length, the parent address and start put in as plain text (a restore builds a header a
    chunk: a few us each instead of ~16). The same bytes as :func:`chunk_header` (compared in
    tests/snapshot/test_format.py); a parent that is not an address takes that path."""

    _PARENT, _START = "<parent>", "<start>"

    def __init__(self, identity: str, kv: KVLayout) -> None:
        self.identity, self.kv = identity, kv
        self._texts: dict[int, tuple[str, str, str] | None] = {}

    def __call__(self, parent: str, start: int, count: int) -> bytes:
        parts = self._texts[count] if count in self._texts else self._template(count)
        if parts is None or not _HEX32.fullmatch(parent) or start < 0:
            return chunk_header(self.identity, self.kv, parent, start, count)
        return _framed(f"{parts[0]}{parent}{parts[1]}{start}{parts[2]}")

    def size(self, parent: str, start: int, count: int) -> int:
        """The chunk file's bytes: header, k and v planes, int32 token ids."""
        return len(self(parent, start, count)) + count * (self.kv.token_bytes + 4)

    def _template(self, count: int) -> tuple[str, str, str] | None:
        """The header's JSON cut around the parent's and the start's values (None when the
        placeholders do not each occur once, as they would in an identity made to hold them)."""
        text = _header_json(chunk_tensors(self.kv, count),
                            _chunk_metadata(self.identity, self.kv, self._PARENT, self._START))
        head, *rest = text.split(f'"{self._PARENT}"')
        parts = None
        if len(rest) == 1 and len(pieces := rest[0].split(f'"{self._START}"')) == 2:
            parts = (head + '"', '"' + pieces[0] + '"', '"' + pieces[1])
        self._texts[count] = parts
        return parts


def logits_tensors(vocab: int) -> list[TensorSpec]:
    return [TensorSpec("logits", "F32", (vocab,))]


def logits_header(vocab: int) -> bytes:
    return safetensors_header(logits_tensors(vocab), {"format": "driftwood.logits", "version": str(VERSION)})


# -- records ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Obj:
    """A stored object: its key in the store, size in bytes and digests."""

    key: str
    size: int
    xxh3: str
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": self.key, "bytes": self.size, "xxh3": self.xxh3}
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        return d

    @classmethod
    def from_json(cls, d: Any, where: str, signed: bool) -> Obj:
        d = _dict(d, where, {"key", "bytes", "xxh3"}, {"sha256"})
        key = _str(d, "key", where)
        if not KEY_RE.fullmatch(key):
            raise SnapshotError(f"{where}: bad object key {key[:80]!r}")
        sha = d.get("sha256")
        if sha is not None and not (isinstance(sha, str) and _HEX64.fullmatch(sha)):
            raise SnapshotError(f"{where}: sha256 is not 64 hex digits")
        if signed and sha is None:
            raise SnapshotError(f"{where}: a signed snapshot lists a sha256 for every object")
        xxh3 = _str(d, "xxh3", where)
        if not _HEX32.fullmatch(xxh3):
            raise SnapshotError(f"{where}: xxh3 is not 32 hex digits")
        return cls(key, _int(d, "bytes", where, 0, 1 << 40), xxh3, sha)


@dataclass(frozen=True)
class KVLayout:
    dtype: str
    n_layers: int
    n_kv_heads: int
    head_dim: int
    chunk_tokens: int = CHUNK_TOKENS

    @property
    def itemsize(self) -> int:
        return KV_DTYPES[self.dtype][1]

    @property
    def token_bytes(self) -> int:
        """Bytes of keys and values per token, all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "layout": LAYOUT, "n_layers": self.n_layers,
                "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "chunk_tokens": self.chunk_tokens}

    @classmethod
    def from_json(cls, d: Any, where: str) -> KVLayout:
        d = _dict(d, where, {"dtype", "layout", "n_layers", "n_kv_heads", "head_dim", "chunk_tokens"})
        dtype = _str(d, "dtype", where)
        if dtype not in KV_DTYPES:
            raise SnapshotError(f"{where}: unknown KV dtype {dtype[:40]!r} (known: {', '.join(KV_DTYPES)})")
        if d["layout"] != LAYOUT:
            raise SnapshotError(f"{where}: unknown KV layout {str(d['layout'])[:60]!r} (this version reads {LAYOUT!r})")
        return cls(dtype, _int(d, "n_layers", where, 1, 4096), _int(d, "n_kv_heads", where, 1, 4096),
                   _int(d, "head_dim", where, 1, 65536), _int(d, "chunk_tokens", where, 1, 1 << 20))


@dataclass(frozen=True)
class ModelRef:
    """Which model a session belongs to: ``identity`` decides; the rest is for people."""

    identity: str
    arch: str
    file: str
    vocab_size: int
    context_length: int
    name: str | None = None  # the model's name in the actor's pool ("default", a preload name)
    spec: str | None = None  # what the pool loaded it from (a registry name or a path)

    def to_json(self) -> dict[str, Any]:
        return {"identity": self.identity, "arch": self.arch, "file": self.file, "vocab_size": self.vocab_size,
                "context_length": self.context_length, "name": self.name, "spec": self.spec}

    @classmethod
    def from_json(cls, d: Any, where: str) -> ModelRef:
        d = _dict(d, where, {"identity", "arch", "file", "vocab_size", "context_length", "name", "spec"})
        identity = _str(d, "identity", where)
        if not re.fullmatch(r"[0-9a-f]{16,128}", identity):
            raise SnapshotError(f"{where}: model identity is not a hex digest")
        return cls(identity, _str(d, "arch", where), _str(d, "file", where),
                   _int(d, "vocab_size", where, 1, 1 << 24), _int(d, "context_length", where, 1, 1 << 24),
                   _opt_str(d, "name", where), _opt_str(d, "spec", where))


@dataclass(frozen=True)
class Chunk:
    obj: Obj
    start: int
    count: int

    @property
    def address(self) -> str:
        return self.obj.key.split("/")[1].split(".")[0]

    def to_json(self) -> dict[str, Any]:
        return {**self.obj.to_json(), "start": self.start, "tokens": self.count}


@dataclass(frozen=True)
class SessionRecord:
    """One session: its model, KV layout, tokens, chunk list and sampler state."""

    model: ModelRef
    kv: KVLayout
    capacity: int
    tokens: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    logits: Obj | None  # the next-token logits, stored (float32 safetensors)
    logits_offset: int | None  # ... or where they live in the actor's restored memory
    rng: bytes
    sampler: dict[str, Any] | None
    handle: int | None = None  # the guest's handle (actor snapshots)

    @property
    def position(self) -> int:
        return len(self.tokens)

    def objects(self) -> list[Obj]:
        return [c.obj for c in self.chunks] + ([self.logits] if self.logits else [])

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model.to_json(),
            "kv": self.kv.to_json(),
            "capacity": self.capacity,
            "position": self.position,
            "tokens": list(self.tokens),
            "chunks": [c.to_json() for c in self.chunks],
            "logits": None if self.logits is None else self.logits.to_json(),
            "logits_offset": self.logits_offset,
            "rng": base64.b64encode(self.rng).decode(),
            "sampler": self.sampler,
            "handle": self.handle,
        }

    @classmethod
    def from_json(cls, d: Any, where: str, signed: bool) -> SessionRecord:
        d = _dict(d, where, {"model", "kv", "capacity", "position", "tokens", "chunks", "logits",
                             "logits_offset", "rng", "sampler", "handle"})
        model = ModelRef.from_json(d["model"], f"{where}.model")
        kv = KVLayout.from_json(d["kv"], f"{where}.kv")
        capacity = _int(d, "capacity", where, 1, model.context_length)
        tokens = d["tokens"]
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < model.vocab_size for t in tokens):
            raise SnapshotError(f"{where}: tokens must be a list of ids in [0, {model.vocab_size})")
        position = _int(d, "position", where, 0, capacity)
        if position != len(tokens):
            raise SnapshotError(f"{where}: position {position} but {len(tokens)} token ids")
        if not isinstance(d["chunks"], list):
            raise SnapshotError(f"{where}: chunks must be a list")
        chunks, parent, start = [], chunk_root(model.identity, kv), 0
        headers = ChunkHeaders(model.identity, kv)
        for i, c in enumerate(d["chunks"]):
            cw = f"{where}.chunks[{i}]"
            c = _dict(c, cw, {"key", "bytes", "xxh3", "start", "tokens"}, {"sha256"})
            obj = Obj.from_json({k: v for k, v in c.items() if k not in ("start", "tokens")}, cw, signed)
            if _int(c, "start", cw, 0, 1 << 40) != start:
                raise SnapshotError(f"{cw}: starts at {c['start']}, expected {start}")
            count = _int(c, "tokens", cw, 1, kv.chunk_tokens)
            if count != min(kv.chunk_tokens, position - start):
                raise SnapshotError(f"{cw}: holds {count} tokens, the layout puts "
                                    f"{min(kv.chunk_tokens, max(position - start, 0))} there")
            expected = headers.size(parent, start, count)
            if obj.size != expected:
                raise SnapshotError(f"{cw}: claims {obj.size} bytes, the layout makes it {expected}")
            address = chunk_address(parent, tokens[start : start + count], obj.xxh3)
            if not obj.key.startswith("chunks/") or obj.key != f"chunks/{address}.safetensors":
                raise SnapshotError(f"{cw}: key {obj.key} does not match its address {address}")
            chunks.append(Chunk(obj, start, count))
            parent, start = address, start + count
        if start != position:
            raise SnapshotError(f"{where}: chunks cover {start} of {position} tokens")
        logits = None
        if d["logits"] is not None:
            logits = Obj.from_json(d["logits"], f"{where}.logits", signed)
            size = len(logits_header(model.vocab_size)) + 4 * model.vocab_size
            if not logits.key.startswith("blobs/") or not logits.key.endswith(".safetensors") or logits.size != size:
                raise SnapshotError(f"{where}.logits: {logits.key} of {logits.size} bytes is not a "
                                    f"logits file ({size} bytes)")
        offset = d["logits_offset"]
        if offset is not None and (type(offset) is not int or offset < 0 or offset % 4):
            raise SnapshotError(f"{where}: logits_offset must be a 4-aligned non-negative integer")
        if logits is not None and offset is not None:
            raise SnapshotError(f"{where}: logits are both stored and in guest memory")
        try:
            rng = base64.b64decode(_str(d, "rng", where), validate=True)
        except ValueError:
            raise SnapshotError(f"{where}: rng is not base64") from None
        sampler = d["sampler"]
        if sampler is not None and not isinstance(sampler, dict):
            raise SnapshotError(f"{where}: sampler must be an object or null")
        handle = d["handle"]
        if handle is not None and (type(handle) is not int or not 0 < handle < 1 << 31):
            raise SnapshotError(f"{where}: handle must be a positive int32")
        return cls(model, kv, capacity, tuple(tokens), tuple(chunks), logits, offset, rng, sampler, handle)


@dataclass(frozen=True)
class MemoryRecord:
    """Linear memory: ``size`` bytes, of which the pages in ``runs`` ([first, count] in
    PAGE_SIZE units) are stored, zstd-compressed, in ``obj``; every other page is zero."""

    size: int
    runs: tuple[tuple[int, int], ...]
    obj: Obj
    raw_xxh3: str  # over the stored pages, decompressed, in order

    @property
    def stored_pages(self) -> int:
        return sum(n for _, n in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.size, "page_size": PAGE_SIZE, "pages": [list(r) for r in self.runs],
                "object": self.obj.to_json(), "raw_xxh3": self.raw_xxh3}

    @classmethod
    def from_json(cls, d: Any, where: str, signed: bool) -> MemoryRecord:
        d = _dict(d, where, {"bytes", "page_size", "pages", "object", "raw_xxh3"})
        size = _int(d, "bytes", where, 0, 1 << 32)
        if size % WASM_PAGE:
            raise SnapshotError(f"{where}: {size} bytes is not a whole number of wasm pages")
        if d["page_size"] != PAGE_SIZE:
            raise SnapshotError(f"{where}: page_size {d['page_size']!r}, this version reads {PAGE_SIZE}")
        runs, end = [], 0
        if not isinstance(d["pages"], list):
            raise SnapshotError(f"{where}: pages must be a list of [first, count] runs")
        for r in d["pages"]:
            if not (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)) or r[0] < end or r[1] < 1:
                raise SnapshotError(f"{where}: page runs must be ascending, disjoint [first, count] pairs")
            end = r[0] + r[1]
            runs.append((r[0], r[1]))
        if end * PAGE_SIZE > size:
            raise SnapshotError(f"{where}: page runs reach byte {end * PAGE_SIZE}, past the {size}-byte memory")
        obj = Obj.from_json(d["object"], f"{where}.object", signed)
        if not obj.key.endswith(".zst"):
            raise SnapshotError(f"{where}.object: {obj.key} is not a zstd object")
        raw = _str(d, "raw_xxh3", where)
        if not _HEX32.fullmatch(raw):
            raise SnapshotError(f"{where}: raw_xxh3 is not 32 hex digits")
        return cls(size, tuple(runs), obj, raw)


GLOBAL_TYPES = ("i32", "i64", "f32", "f64")


@dataclass(frozen=True)
class ActorRecord:
    """The guest: module, linear memory, exported mutable globals, and the ABI's handle state."""

    module_name: str
    module: Obj  # the module's bytes; key blobs/<sha256>.wasm
    memory: MemoryRecord | None
    globals: tuple[tuple[str, str, int], ...]  # (export name, type, value; floats as bit patterns)
    next_handle: int
    args: tuple[str, ...]

    @property
    def module_sha256(self) -> str:
        return self.module.key.split("/")[1].split(".")[0]

    def objects(self) -> list[Obj]:
        return [self.module] + ([self.memory.obj] if self.memory else [])

    def to_json(self) -> dict[str, Any]:
        return {
            "module": {"name": self.module_name, "sha256": self.module_sha256, "object": self.module.to_json()},
            "memory": None if self.memory is None else self.memory.to_json(),
            "globals": [{"name": n, "type": t, "value": v} for n, t, v in self.globals],
            "next_handle": self.next_handle,
            "args": list(self.args),
        }

    @classmethod
    def from_json(cls, d: Any, where: str, signed: bool) -> ActorRecord:
        d = _dict(d, where, {"module", "memory", "globals", "next_handle", "args"})
        m = _dict(d["module"], f"{where}.module", {"name", "sha256", "object"})
        module = Obj.from_json(m["object"], f"{where}.module.object", signed)
        if module.key != f"blobs/{m['sha256']}.wasm":
            raise SnapshotError(f"{where}.module: object {module.key} is not named by the module's sha256")
        memory = None if d["memory"] is None else MemoryRecord.from_json(d["memory"], f"{where}.memory", signed)
        globals_ = []
        if not isinstance(d["globals"], list):
            raise SnapshotError(f"{where}: globals must be a list")
        for i, g in enumerate(d["globals"]):
            gw = f"{where}.globals[{i}]"
            g = _dict(g, gw, {"name", "type", "value"})
            kind = g["type"]
            if kind not in GLOBAL_TYPES:
                raise SnapshotError(f"{gw}: type must be one of {', '.join(GLOBAL_TYPES)}")
            bits = 32 if kind in ("i32", "f32") else 64
            value = _int(g, "value", gw, -(1 << (bits - 1)), (1 << bits) - 1)
            globals_.append((_str(g, "name", gw), kind, value))
        args = d["args"]
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise SnapshotError(f"{where}: args must be a list of strings")
        return cls(_str(m, "name", f"{where}.module"), module, memory, tuple(globals_),
                   _int(d, "next_handle", where, 1, 1 << 31), tuple(args))


@dataclass(frozen=True)
class Manifest:
    """A validated snapshot header."""

    kind: str
    name: str
    created: str
    sessions: tuple[SessionRecord, ...]
    actor: ActorRecord | None = None
    driftwood: str = ""
    signed: bool = False  # carries sha256 digests and an HMAC signature

    def objects(self) -> list[Obj]:
        objs = [o for s in self.sessions for o in s.objects()]
        return objs + (self.actor.objects() if self.actor else [])

    def to_header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "name": self.name,
            "created": self.created,
            "driftwood": self.driftwood,
            "digests": ["xxh3-128", "sha256"] if self.signed else ["xxh3-128"],
            "sessions": [s.to_json() for s in self.sessions],
            "actor": None if self.actor is None else self.actor.to_json(),
        }

    @classmethod
    def from_header(cls, h: Any) -> Manifest:
        h = _dict(h, "header", {"format", "version", "kind", "name", "created", "driftwood", "digests",
                                "sessions", "actor"})
        digests = h["digests"]
        if digests not in (["xxh3-128"], ["xxh3-128", "sha256"]):
            raise SnapshotError(f"header: unknown digests {str(digests)[:60]}")
        signed = digests == ["xxh3-128", "sha256"]
        kind = h["kind"]
        if kind not in KINDS:
            raise SnapshotError(f"header: unknown snapshot kind {str(kind)[:40]!r}")
        name = _str(h, "name", "header")
        if not NAME_RE.fullmatch(name):
            raise SnapshotError(f"header: bad snapshot name {name[:80]!r}")
        if not isinstance(h["sessions"], list):
            raise SnapshotError("header: sessions must be a list")
        sessions = tuple(SessionRecord.from_json(s, f"sessions[{i}]", signed) for i, s in enumerate(h["sessions"]))
        actor = None
        if kind == "session":
            if len(sessions) != 1 or h["actor"] is not None:
                raise SnapshotError("header: a session snapshot holds exactly one session and no actor")
        else:
            actor = ActorRecord.from_json(h["actor"], "actor", signed)
            handles = [s.handle for s in sessions]
            if None in handles or len(set(handles)) != len(handles):
                raise SnapshotError("header: actor sessions need distinct handles")
            if any(h_ >= actor.next_handle for h_ in handles):  # type: ignore[operator]
                raise SnapshotError("header: a session handle is not below next_handle")
        return cls(kind, name, _str(h, "created", "header"), sessions, actor,
                   _str(h, "driftwood", "header"), signed)


def now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- manifest files -----------------------------------------------------------------------

def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def encode_manifest(manifest: Manifest, key: bytes | None = None) -> bytes:
    """The manifest file: one line of canonical JSON, ``{"checksum", "header", "signature"}``."""
    from driftwood.snapshot.sign import sign

    header = manifest.to_header()
    body = canonical(header)
    if manifest.signed != (key is not None):
        raise SnapshotError("a signed manifest needs a key and sha256 digests (and only then)")
    envelope = {"checksum": {"xxh3-128": xxhash.xxh3_128_hexdigest(body)}, "header": header,
                "signature": sign(body, key) if key is not None else None}
    return canonical(envelope) + b"\n"


def decode_manifest(raw: bytes, key: bytes | None = None) -> Manifest:
    """Parse and check a manifest file; with ``key``, refuse unless it carries a valid
    signature made with that key."""
    from driftwood.snapshot.sign import verify

    if len(raw) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"manifest of {len(raw)} bytes is larger than {MAX_MANIFEST_BYTES}")
    try:
        envelope = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SnapshotError(f"manifest is not JSON ({exc.__class__.__name__}): truncated or corrupted") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("header"), dict):
        raise SnapshotError("manifest has no header object")
    header = envelope["header"]
    if header.get("format") != FORMAT:
        raise SnapshotError(f"not a Driftwood snapshot (format {str(header.get('format'))[:40]!r})")
    version = header.get("version")
    if version != VERSION:
        if type(version) is int and version > VERSION:
            raise SnapshotError(f"snapshot format version {version} is newer than this Driftwood reads ({VERSION})")
        raise SnapshotError(f"unknown snapshot format version {str(version)[:20]!r} (this Driftwood reads {VERSION})")
    try:
        if canonical(envelope) + b"\n" != raw:
            raise SnapshotError("manifest bytes are not in canonical form: edited or corrupted")
    except ValueError:  # NaN or infinity
        raise SnapshotError("manifest holds a non-finite number") from None
    if set(envelope) != {"checksum", "header", "signature"}:
        raise SnapshotError("manifest has unexpected top-level fields")
    body = canonical(header)
    checksum = envelope["checksum"]
    if not isinstance(checksum, dict) or checksum.get("xxh3-128") != xxhash.xxh3_128_hexdigest(body):
        raise SnapshotError("manifest checksum mismatch: the header was altered or corrupted")
    signature = envelope["signature"]
    if key is not None:
        verify(body, signature, key)
    manifest = Manifest.from_header(header)
    if (signature is not None) != manifest.signed:
        raise SnapshotError("manifest signature and digest list disagree")
    return manifest


# -- schema helpers -----------------------------------------------------------------------

def _dict(d: Any, where: str, required: set[str], optional: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    if not isinstance(d, dict):
        raise SnapshotError(f"{where}: expected an object")
    missing = required - d.keys()
    if missing:
        raise SnapshotError(f"{where}: missing {', '.join(sorted(missing))}")
    extra = d.keys() - required - optional
    if extra:
        raise SnapshotError(f"{where}: unknown fields {', '.join(sorted(extra))[:80]}")
    return d


def _int(d: Mapping[str, Any], key: str, where: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise SnapshotError(f"{where}: {key} must be an integer in [{lo}, {hi}], not {str(v)[:40]}")
    return v


def _str(d: Mapping[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise SnapshotError(f"{where}: {key} must be a string")
    return v


def _opt_str(d: Mapping[str, Any], key: str, where: str) -> str | None:
    return None if d.get(key) is None else _str(d, key, where)

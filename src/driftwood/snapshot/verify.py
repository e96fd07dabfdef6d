"""Checking a stored snapshot end to end without restoring it (no model, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from driftwood.errors import SnapshotError
from driftwood.snapshot.format import (
    Digester,
    Manifest,
    SessionRecord,
    chunk_header,
    chunk_root,
    int32_bytes,
)
from driftwood.snapshot.store import Store

PIECE = 4 << 20


@dataclass
class VerifyReport:
    name: str
    manifest: Manifest
    objects: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def verify(store: Store, name: str, key: bytes | None = None) -> VerifyReport:
    """Check snapshot ``name``: its manifest (and signature, with ``key``), then every object's
    size, digests and contents. Raises SnapshotError at the first problem."""
    from driftwood.snapshot.actor import _read_memory, module_bytes
    from driftwood.snapshot.session import read_object

    manifest = store.manifest(name, key)
    signed = key is not None
    report = VerifyReport(name, manifest)
    for rec in manifest.sessions:
        _verify_chunks(store, rec, signed, report)
        if rec.logits is not None:
            read_object(store, rec.logits, signed)
            _count(report, rec.logits.size)
    if manifest.actor is not None:
        module_bytes(store, manifest, key)
        _count(report, manifest.actor.module.size)
        if manifest.actor.memory is not None:
            _read_memory(store, manifest.actor.memory, signed)
            _count(report, manifest.actor.memory.obj.size)
    return report


def _count(report: VerifyReport, size: int) -> None:
    report.objects += 1
    report.bytes += size


def _verify_chunks(store: Store, rec: SessionRecord, signed: bool, report: VerifyReport) -> None:
    parent = chunk_root(rec.model.identity, rec.kv)
    for chunk in rec.chunks:
        where = f"chunk at token {chunk.start} ({chunk.obj.key})"
        header = chunk_header(rec.model.identity, rec.kv, parent, chunk.start, chunk.count)
        digest = Digester(sha256=signed)
        with store.reader(chunk.obj.key) as r:
            if r.size != chunk.obj.size:
                raise SnapshotError(f"{where}: {r.size} bytes, the manifest says {chunk.obj.size} (truncated?)")
            if r.read(0, len(header)) != header:
                raise SnapshotError(f"{where}: its header is not the one the manifest describes")
            for offset in range(0, r.size, PIECE):
                digest.update(r.read(offset, min(PIECE, r.size - offset)))
            ids = r.read(r.size - 4 * chunk.count, 4 * chunk.count)
        got = digest.ref(chunk.obj.key)
        if got.xxh3 != chunk.obj.xxh3 or (signed and got.sha256 != chunk.obj.sha256):
            raise SnapshotError(f"{where}: checksum mismatch: corrupted or altered")
        if ids != int32_bytes(rec.tokens[chunk.start : chunk.start + chunk.count]):
            raise SnapshotError(f"{where}: holds other tokens than the manifest")
        parent = chunk.address
        _count(report, chunk.obj.size)


def summary(manifest: Manifest) -> dict[str, object]:
    """What ``driftwood snapshot inspect`` shows: the header without the bulky lists."""
    sessions = []
    for s in manifest.sessions:
        sessions.append({
            "handle": s.handle,
            "model": f"{s.model.name or '-'}: {s.model.file} ({s.model.identity[:16]})",
            "kv": f"{s.kv.dtype}, {s.kv.n_layers} layers x {s.kv.n_kv_heads} KV heads x {s.kv.head_dim}",
            "position": s.position,
            "capacity": s.capacity,
            "chunks": len(s.chunks),
            "kv_bytes": sum(c.obj.size for c in s.chunks),
            "logits": "stored" if s.logits else ("in guest memory" if s.logits_offset is not None else "none"),
            "sampler": s.sampler,
        })
    out: dict[str, object] = {"name": manifest.name, "kind": manifest.kind, "created": manifest.created,
                              "driftwood": manifest.driftwood, "signed": manifest.signed, "sessions": sessions}
    a = manifest.actor
    if a is not None:
        out["actor"] = {
            "module": f"{a.module_name} (sha256 {a.module_sha256[:16]}, {a.module.size:,} bytes)",
            "memory": None if a.memory is None else
            f"{a.memory.size:,} bytes, {a.memory.stored_pages * 4096:,} non-zero, {a.memory.obj.size:,} stored",
            "globals": [f"{n}: {t}" for n, t, _ in a.globals],
            "next_handle": a.next_handle,
            "args": list(a.args),
        }
    out["bytes"] = sum(o.size for o in manifest.objects())
    return out

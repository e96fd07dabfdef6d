"""Where snapshots live: immutable objects by key, and named manifests replaced atomically.

:class:`Store` is the small interface (an object store can implement it: objects are
write-once, a manifest is one atomic put); :class:`DirectoryStore` keeps a local directory::

    DIR/driftwood-store.json      marks the directory as a store (format, version)
    DIR/snapshots/NAME.json       one manifest per snapshot name (NAME may hold "/")
    DIR/chunks/ADDRESS.safetensors KV chunks, content-addressed, shared between snapshots
    DIR/blobs/DIGEST.EXT          logits (.safetensors), linear memory (.zst), modules (.wasm)
    DIR/tmp/                      files being written; never read
    DIR/lock                      flock: writers share it, garbage collection takes it alone

A save writes its new objects into tmp/, fsyncs them, links them into place (never replacing
an existing object), fsyncs the directories, and only then replaces the manifest (temp file,
fsync, rename, fsync). A writer killed at any point leaves the previous manifest and every
object it names intact; what it left behind is invisible and removed by :meth:`Store.gc`.

:class:`MemoryStore` keeps everything in this process's memory (pinned when CUDA is about):
the host-memory tier that restores onto a GPU read from.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driftwood.errors import SnapshotError
from driftwood.snapshot.format import KEY_RE, NAME_RE, Manifest, decode_manifest

if TYPE_CHECKING:
    import torch

Buffer = Any  # anything exposing the buffer protocol
IOV_MAX = 1024
STORE_MARKER = "driftwood-store.json"
STORE_FORMAT = {"format": "driftwood.snapshot-store", "version": 1}


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise SnapshotError(f"bad snapshot name {name[:80]!r}: letters, digits, '._-', up to 4 '/'-separated parts")
    return name


def check_key(key: str) -> str:
    if not KEY_RE.fullmatch(key):
        raise SnapshotError(f"bad object key {key[:80]!r}")
    return key


@dataclass
class GcReport:
    removed: int = 0
    freed: int = 0
    kept: int = 0


class Reader(ABC):
    """Random access to one object."""

    size: int

    @abstractmethod
    def readinto(self, offset: int, buffers: Sequence[Buffer]) -> None:
        """Fill ``buffers`` in order with the bytes from ``offset`` (all of them, or raise)."""

    def view(self) -> torch.Tensor | None:
        """The object's bytes as a uint8 tensor, without a copy, where the store holds them
        in memory (None otherwise)."""
        return None

    def fileno(self) -> int | None:
        """An open file descriptor of the object's bytes (from offset 0), where the store
        keeps it in a file (None otherwise)."""
        return None

    def read(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self.readinto(offset, [buf])
        return bytes(buf)

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transaction(ABC):
    """One save: objects put, then one manifest committed. Nothing is visible before commit."""

    def __init__(self) -> None:
        self.bytes_written = 0
        self.objects_written = 0
        self.objects_reused = 0

    @abstractmethod
    def put(self, key: str, parts: Sequence[Buffer]) -> bool:
        """Store ``parts`` (concatenated) under ``key`` unless it exists; True if written."""

    @abstractmethod
    def has(self, key: str) -> bool:
        """True if ``key`` is stored (or put in this transaction)."""

    @abstractmethod
    def commit(self, name: str, manifest: bytes) -> None:
        """Make every put durable, then replace manifest ``name`` atomically."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what was put (nothing of it is visible)."""

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


class Store(ABC):
    """Snapshot storage: write-once objects by key, and named manifests."""

    uri: str
    verified = False  # True when the store vouches for its objects' bytes (no re-hash on restore)

    @abstractmethod
    def transaction(self) -> Transaction: ...

    @abstractmethod
    def reader(self, key: str) -> Reader: ...

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size, or None when it is absent."""

    @abstractmethod
    def get_manifest(self, name: str) -> bytes: ...

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove manifest ``name`` (its objects stay until :meth:`gc`)."""

    @abstractmethod
    def object_keys(self) -> list[tuple[str, int]]:
        """Every stored object with its size."""

    @abstractmethod
    def remove_object(self, key: str) -> None: ...

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold off every writer (garbage collection runs under it)."""
        return contextlib.nullcontext()

    def read(self, key: str) -> bytes:
        with self.reader(key) as r:
            return r.read(0, r.size)

    def manifest(self, name: str, key: bytes | None = None) -> Manifest:
        """The validated manifest of snapshot ``name`` (with ``key``: signed by it)."""
        return decode_manifest(self.get_manifest(name), key)

    def gc(self) -> GcReport:
        """Remove objects no manifest names."""
        with self.exclusive():
            return self._collect()

    def _collect(self) -> GcReport:
        report = GcReport()
        live: set[str] = set()
        for name in self.names():
            try:
                live.update(o.key for o in self.manifest(name).objects())
            except SnapshotError:
                # an unreadable manifest keeps everything: never lose data to a bad file
                return GcReport(kept=len(self.object_keys()))
        for key, size in self.object_keys():
            if key in live:
                report.kept += 1
            else:
                self.remove_object(key)
                report.removed += 1
                report.freed += size
        return report


# -- a local directory --------------------------------------------------------------------

class DirectoryStore(Store):
    """A store in a local directory (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root)
        self.uri = f"dir:{self.root.resolve()}"
        marker = self.root / STORE_MARKER
        if not marker.is_file():
            if not create:
                what = "does not exist" if not self.root.exists() else "is not a snapshot store"
                raise SnapshotError(f"{self.root} {what} (no {STORE_MARKER})")
            if self.root.exists() and not self.root.is_dir():
                raise SnapshotError(f"{self.root} is not a directory")
            if self.root.is_dir() and any(p.name != STORE_MARKER for p in self.root.iterdir()):
                raise SnapshotError(f"{self.root} is a non-empty directory that is not a snapshot store")
            for d in ("snapshots", "chunks", "blobs", "tmp"):
                (self.root / d).mkdir(parents=True, exist_ok=True)
            _atomic_write(marker, json.dumps(STORE_FORMAT).encode() + b"\n", self.root / "tmp")
        else:
            try:
                info = json.loads(marker.read_text())
            except (OSError, ValueError) as exc:
                raise SnapshotError(f"{marker} is unreadable: {exc}") from None
            if info.get("format") != STORE_FORMAT["format"] or info.get("version") != STORE_FORMAT["version"]:
                raise SnapshotError(f"{self.root}: unknown store format {info!r}")
        self._lock_path = self.root / "lock"

    # -- reading

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def reader(self, key: str) -> Reader:
        try:
            return _FileReader(self.path(key))
        except FileNotFoundError:
            raise SnapshotError(f"snapshot object {key} is missing from {self.root}") from None

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return None

    def _manifest_path(self, name: str) -> Path:
        return self.root / "snapshots" / f"{check_name(name)}.json"

    def get_manifest(self, name: str) -> bytes:
        try:
            with open(self._manifest_path(name), "rb") as f:
                return f.read(64 << 20 | 1)
        except FileNotFoundError:
            known = ", ".join(self.names()) or "none"
            raise SnapshotError(f"no snapshot {name!r} in {self.root} (snapshots: {known})") from None

    def names(self) -> list[str]:
        base = self.root / "snapshots"
        return sorted(str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.json"))

    def object_keys(self) -> list[tuple[str, int]]:
        out = []
        for d in ("chunks", "blobs"):
            for p in (self.root / d).iterdir():
                key = f"{d}/{p.name}"
                if KEY_RE.fullmatch(key):
                    out.append((key, p.stat().st_size))
        return out

    # -- writing

    def transaction(self) -> Transaction:
        return _DirTransaction(self)

    def delete(self, name: str) -> None:
        path = self._manifest_path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise SnapshotError(f"no snapshot {name!r} in {self.root}") from None
        _fsync_dir(path.parent)
        base = self.root / "snapshots"
        parent = path.parent
        while parent != base:  # drop directories that only held this name
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def remove_object(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return self._locked(fcntl.LOCK_EX)

    def gc(self) -> GcReport:
        """Remove objects no manifest names, and files abandoned in tmp/ by killed writers."""
        with self.exclusive():
            report = self._collect()
            for p in (self.root / "tmp").iterdir():  # no writer holds the lock: all abandoned
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return report

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.root)!r})"


class _FileReader(Reader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def fileno(self) -> int | None:
        return self.fd

    def readinto(self, offset: int, buffers: Sequence[Buffer]) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        want = sum(v.nbytes for v in views)
        if offset + want > self.size:
            raise SnapshotError(f"{self.path.name}: reading bytes [{offset}, {offset + want}) of a {self.size}-byte file")
        i = 0
        while i < len(views):
            batch = views[i : i + IOV_MAX]
            got = os.preadv(self.fd, batch, offset)
            offset += got
            # a short read (rare): finish the first unfilled buffer and go on from the next
            for v in batch:
                if got >= v.nbytes:
                    got -= v.nbytes
                    i += 1
                    continue
                if got:
                    self._fill(v[got:], offset)
                    offset += v.nbytes - got
                    i += 1
                break

    def _fill(self, view: memoryview, offset: int) -> None:
        while view.nbytes:
            n = os.preadv(self.fd, [view], offset)
            if n == 0:
                raise SnapshotError(f"{self.path.name}: file ended early (truncated?)")
            view, offset = view[n:], offset + n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _DirTransaction(Transaction):
    def __init__(self, store: DirectoryStore) -> None:
        super().__init__()
        self.store = store
        self.tmp = store.root / "tmp"
        self.pending: dict[str, Path] = {}  # key -> temporary file
        self._lock = store._locked(fcntl.LOCK_SH)
        self._lock.__enter__()
        self._open = True

    def has(self, key: str) -> bool:
        return key in self.pending or self.store.size(key) is not None

    def put(self, key: str, parts: Sequence[Buffer]) -> bool:
        final = self.store.path(key)
        if key in self.pending or final.exists():
            self.objects_reused += 1
            return False
        tmp = self.tmp / f"{final.name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            written = _writev_all(fd, parts)
        finally:
            os.close(fd)
        self.pending[key] = tmp
        self.bytes_written += written
        self.objects_written += 1
        return True

    def commit(self, name: str, manifest: bytes) -> None:
        path = self.store._manifest_path(name)
        try:
            tmps = list(self.pending.values())
            if tmps:  # make the data durable before any name points at it
                with ThreadPoolExecutor(min(8, len(tmps))) as pool:
                    list(pool.map(_fsync_path, tmps))
                dirs = set()
                for key, tmp in self.pending.items():
                    final = self.store.path(key)
                    with contextlib.suppress(FileExistsError):  # a concurrent writer stored it
                        os.link(tmp, final)
                    os.unlink(tmp)
                    dirs.add(final.parent)
                for d in dirs:
                    _fsync_dir(d)
                self.pending.clear()
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, manifest, self.tmp)
            self.bytes_written += len(manifest)
        finally:
            self.abort()

    def abort(self) -> None:
        for tmp in self.pending.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.pending.clear()
        if self._open:
            self._open = False
            self._lock.__exit__(None, None, None)


def _writev_all(fd: int, parts: Sequence[Buffer]) -> int:
    views = [memoryview(p).cast("B") for p in parts]
    views = [v for v in views if v.nbytes]
    total = 0
    while views:
        n = os.writev(fd, views[:IOV_MAX])
        total += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    return total


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory."""
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _writev_all(fd, [data])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# -- this process's memory ----------------------------------------------------------------

class MemoryStore(Store):
    """Objects and manifests in memory, as uint8 tensors (pinned with ``pinned=True``, so
    that a CUDA restore copies them straight to the device).

    The store vouches for its bytes: they were hashed when saved here, or checked when
    :meth:`load` copied them in, so restores from it skip re-hashing.
    """

    verified = True

    def __init__(self, *, pinned: bool = False) -> None:
        self.uri = f"memory:{id(self):x}"
        self.pinned = pinned
        self.objects: dict[str, torch.Tensor] = {}
        self.manifests: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _tensor(self, data: Sequence[Buffer]) -> torch.Tensor:
        import torch

        views = [memoryview(p).cast("B") for p in data]
        out = torch.empty(sum(v.nbytes for v in views), dtype=torch.uint8, pin_memory=self.pinned)
        flat = out.numpy()
        at = 0
        for v in views:
            flat[at : at + v.nbytes] = v
            at += v.nbytes
        return out

    def transaction(self) -> Transaction:
        return _MemoryTransaction(self)

    def reader(self, key: str) -> Reader:
        t = self.objects.get(check_key(key))
        if t is None:
            raise SnapshotError(f"snapshot object {key} is missing from the memory store")
        return _TensorReader(t)

    def size(self, key: str) -> int | None:
        t = self.objects.get(key)
        return None if t is None else t.numel()

    def get_manifest(self, name: str) -> bytes:
        try:
            return self.manifests[check_name(name)]
        except KeyError:
            raise SnapshotError(f"no snapshot {name!r} in the memory store") from None

    def names(self) -> list[str]:
        return sorted(self.manifests)

    def delete(self, name: str) -> None:
        if self.manifests.pop(name, None) is None:
            raise SnapshotError(f"no snapshot {name!r} in the memory store")

    def object_keys(self) -> list[tuple[str, int]]:
        return [(k, t.numel()) for k, t in self.objects.items()]

    def remove_object(self, key: str) -> None:
        self.objects.pop(key, None)

    def load(self, source: Store, name: str, key: bytes | None = None) -> Manifest:
        """Copy snapshot ``name`` from ``source`` into memory, checking every object."""
        from driftwood.snapshot.session import check_object

        raw = source.get_manifest(name)
        manifest = decode_manifest(raw, key)
        with self._lock:
            for obj in manifest.objects():
                if obj.key in self.objects:
                    continue
                with source.reader(obj.key) as r:
                    if r.size != obj.size:
                        raise SnapshotError(f"{obj.key}: {r.size} bytes, the manifest says {obj.size} (truncated?)")
                    t = self._tensor([r.read(0, r.size)])
                check_object(obj, [t.numpy()], signed=key is not None)
                self.objects[obj.key] = t
            self.manifests[name] = raw
        return manifest


class _MemoryTransaction(Transaction):
    def __init__(self, store: MemoryStore) -> None:
        super().__init__()
        self.store = store
        self.pending: dict[str, torch.Tensor] = {}

    def has(self, key: str) -> bool:
        return key in self.pending or key in self.store.objects

    def put(self, key: str, parts: Sequence[Buffer]) -> bool:
        check_key(key)
        if self.has(key):
            self.objects_reused += 1
            return False
        t = self.store._tensor(parts)
        self.pending[key] = t
        self.bytes_written += t.numel()
        self.objects_written += 1
        return True

    def commit(self, name: str, manifest: bytes) -> None:
        with self.store._lock:
            for key, t in self.pending.items():
                self.store.objects.setdefault(key, t)
            self.store.manifests[check_name(name)] = bytes(manifest)
        self.bytes_written += len(manifest)
        self.pending.clear()

    def abort(self) -> None:
        self.pending.clear()


class _TensorReader(Reader):
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.size = t.numel()

    def readinto(self, offset: int, buffers: Sequence[Buffer]) -> None:
        import numpy as np

        src = self.t.numpy()
        for b in buffers:
            dst = b.reshape(-1) if isinstance(b, np.ndarray) else np.frombuffer(b, dtype=np.uint8)
            if offset + dst.size > self.size:
                raise SnapshotError(f"reading past the end of a {self.size}-byte object")
            np.copyto(dst, src[offset : offset + dst.size])  # releases the GIL
            offset += dst.size

    def view(self) -> torch.Tensor:
        return self.t

    def close(self) -> None:
        pass


def open_store(path: str | os.PathLike[str], *, create: bool = False) -> DirectoryStore:
    return DirectoryStore(path, create=create)


def parse_ref(ref: str) -> tuple[DirectoryStore, str | None]:
    """``DIR`` (a store) or ``DIR/NAME`` (a snapshot in it; NAME may hold '/'):
    the store and the name (None when only a store was named)."""
    path = Path(ref)
    if (path / STORE_MARKER).is_file():
        return DirectoryStore(path), None
    if path.suffix == ".json" and "snapshots" in path.parts:  # DIR/snapshots/NAME.json
        parts = path.parts
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        root = Path(*parts[:i]) if i else Path(".")
        if (root / STORE_MARKER).is_file():
            return DirectoryStore(root), "/".join(parts[i + 1 :])[: -len(".json")]
    for depth in range(1, 5):  # DIR/NAME with up to four name parts
        parts = path.parts
        if len(parts) <= depth:
            break
        root = Path(*parts[:-depth]) if len(parts) > depth else Path(".")
        if (root / STORE_MARKER).is_file():
            return DirectoryStore(root), "/".join(parts[-depth:])
    raise SnapshotError(f"{ref}: neither a snapshot store nor a snapshot in one (DIR or DIR/NAME)")

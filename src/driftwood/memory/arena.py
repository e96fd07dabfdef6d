"""The arena: one page-aligned anonymous mapping that never moves.

Layout, addresses growing to the right::

    base              base + committed        base + reserved       base + reserved + guard
    | committed (RW)  | reserved (PROT_NONE)  | guard (PROT_NONE)   |

This is the contract Wasmtime asks of a custom linear memory: the base never changes, growth
commits more of the reservation in place (``mprotect``), and the guard stays inaccessible so
an out-of-bounds wasm access faults and Wasmtime turns the fault into a trap.

Accelerators see the same bytes: ``numpy()`` and ``tensor()`` alias the mapping, and
backends (:mod:`driftwood.memory.backends`) register it with a device. Every view keeps the
mapping alive: the pages are unmapped only when the owner has closed the arena *and* the last
view is gone, so a stale view can never point at unmapped memory.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from driftwood.errors import ArenaError

if TYPE_CHECKING:
    import torch

PAGE_SIZE = mmap.PAGESIZE
WASM_PAGE = 64 * 1024
#: Base alignment of every arena: at least max(OS page, 16 KiB); a wasm page keeps both happy.
ALIGNMENT = max(PAGE_SIZE, 16 * 1024, WASM_PAGE)

_PROT_NONE = 0
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def _os_error(call: str) -> ArenaError:
    code = ctypes.get_errno()
    return ArenaError(f"{call} failed: {os.strerror(code)} (errno {errno.errorcode.get(code, code)})")


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class _Mapping:
    """Owns the raw pages. Unmapped when the last reference (arena or view) goes away."""

    live: int = 0  # mappings not yet unmapped, process-wide (leak checks read this)
    _count_lock = threading.Lock()

    def __init__(self, size: int) -> None:
        # Over-reserve by ALIGNMENT, then trim head and tail so the base is aligned.
        span = size + ALIGNMENT
        raw = _libc.mmap(None, span, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if raw is None or raw == _MAP_FAILED:
            raise _os_error(f"mmap of {span} bytes")
        base = round_up(raw, ALIGNMENT)
        head, tail = base - raw, span - (base - raw) - size
        if head and _libc.munmap(raw, head) != 0:
            raise _os_error("munmap (head trim)")
        if tail and _libc.munmap(base + size, tail) != 0:
            raise _os_error("munmap (tail trim)")
        self.base = base
        self.size = size
        with _Mapping._count_lock:
            _Mapping.live += 1
        self._finalizer = weakref.finalize(self, _Mapping._unmap, base, size)

    @staticmethod
    def _unmap(base: int, size: int) -> None:
        _libc.munmap(base, size)
        with _Mapping._count_lock:
            _Mapping.live -= 1


class Arena:
    """A reserved, page-aligned region whose first ``committed`` bytes are readable and writable.

    ``reserve`` bytes of address space are taken up front (never more than ``limit`` may be
    committed), followed by ``guard`` inaccessible bytes. Nothing is resident until touched.
    """

    def __init__(self, reserve: int, *, commit: int = 0, guard: int = 0, limit: int | None = None) -> None:
        if reserve <= 0:
            raise ArenaError(f"reservation must be positive, got {reserve}")
        self.reserved = round_up(reserve, ALIGNMENT)
        self.guard = round_up(guard, PAGE_SIZE)
        self.limit = self.reserved if limit is None else min(limit, self.reserved)
        self._mapping: _Mapping | None = _Mapping(self.reserved + self.guard)
        self.base = self._mapping.base
        self.committed = 0
        self._bytes_tensor: torch.Tensor | None = None
        self._lock = threading.RLock()
        self._listeners: list[ArenaListener] = []
        if commit:
            self.grow(commit)

    # -- life cycle ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._mapping is None

    def grow(self, new_size: int) -> None:
        """Commit bytes up to ``new_size`` in place. The base address never changes."""
        with self._lock:
            mapping = self._require_open()
            if new_size < self.committed:
                raise ArenaError(f"an arena never shrinks ({new_size} < {self.committed} bytes)")
            if new_size > self.limit:
                raise ArenaError(f"growing to {new_size} bytes exceeds the arena limit of {self.limit} bytes")
            if new_size == self.committed:
                return
            old = self.committed
            start = round_up(old, PAGE_SIZE)
            end = round_up(new_size, PAGE_SIZE)
            if end > start and _libc.mprotect(mapping.base + start, end - start, _PROT_RW) != 0:
                raise _os_error(f"mprotect committing {end - start} bytes")
            self.committed = new_size
            for listener in list(self._listeners):
                listener.arena_grown(self, old, new_size)

    def close(self) -> None:
        """Release the arena. Pages are unmapped once no view of them remains."""
        with self._lock:
            if self._mapping is None:
                return
            for listener in reversed(self._listeners):
                listener.arena_closing(self)
            self._listeners.clear()
            self._bytes_tensor = None
            self._mapping = None  # views still hold the mapping; the last one unmaps it

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_listener(self, listener: ArenaListener) -> None:
        """Follow grow and close (device registrations do: they re-register on grow)."""
        with self._lock:
            self._require_open()
            self._listeners.append(listener)

    def remove_listener(self, listener: ArenaListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _require_open(self) -> _Mapping:
        if self._mapping is None:
            raise ArenaError("the arena is closed")
        return self._mapping

    # -- views -----------------------------------------------------------------------------

    def check_range(self, offset: int, length: int) -> None:
        """Raise unless [offset, offset + length) lies inside the committed bytes."""
        if offset < 0 or length < 0 or offset + length > self.committed:
            raise ArenaError(
                f"range [{offset}, {offset}+{length}) is outside the {self.committed} committed bytes"
            )

    def buffer(self, offset: int = 0, length: int | None = None) -> ctypes.Array[ctypes.c_uint8]:
        """A ctypes byte array over committed bytes; it keeps the pages mapped while alive."""
        with self._lock:
            mapping = self._require_open()
            if length is None:
                length = self.committed - offset
            self.check_range(offset, length)
            view = (ctypes.c_uint8 * length).from_address(mapping.base + offset)
            view._driftwood_mapping = mapping  # type: ignore[attr-defined]
            return view

    def numpy(self, offset: int = 0, count: int | None = None, dtype: Any = np.uint8) -> np.ndarray:
        """A numpy array aliasing the arena (no copy)."""
        dt = np.dtype(dtype)
        length = None if count is None else count * dt.itemsize
        buf = self.buffer(offset, length)
        return np.frombuffer(buf, dtype=dt)

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU torch tensor aliasing the arena (no copy). ``offset`` must suit ``dtype``'s alignment."""
        count = 1
        for n in shape:
            count *= n
        nbytes = count * dtype.itemsize
        self.check_range(offset, nbytes)
        if offset % dtype.itemsize:
            raise ArenaError(f"offset {offset} is not aligned for {dtype}")
        return self._bytes()[offset : offset + nbytes].view(dtype).view(shape)

    def _bytes(self) -> torch.Tensor:
        """One uint8 tensor over every committed byte; views are slices of it (cheap)."""
        with self._lock:
            cached = self._bytes_tensor
            if cached is None or cached.numel() != self.committed:
                import torch

                if self.committed == 0:
                    return torch.empty(0, dtype=torch.uint8)
                cached = self._bytes_tensor = torch.frombuffer(self.buffer(0, self.committed), dtype=torch.uint8)
            return cached

    def resident_bytes(self) -> int:
        """Bytes of the committed range resident in RAM right now (mincore)."""
        with self._lock:
            mapping = self._require_open()
            pages = round_up(self.committed, PAGE_SIZE) // PAGE_SIZE
            if pages == 0:
                return 0
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(mapping.base, pages * PAGE_SIZE, vec) != 0:
                raise _os_error("mincore")
            return sum(b & 1 for b in vec) * PAGE_SIZE

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"committed={self.committed}"
        return f"Arena(base={self.base:#x}, {state}, reserved={self.reserved}, guard={self.guard})"


class ArenaListener:
    """Something that follows an arena's growth and release (e.g. a device registration)."""

    def arena_grown(self, arena: Arena, old_size: int, new_size: int) -> None:  # pragma: no cover
        pass

    def arena_closing(self, arena: Arena) -> None:  # pragma: no cover
        pass


def live_mappings() -> int:
    """How many arena mappings are still mapped in this process."""
    return _Mapping.live


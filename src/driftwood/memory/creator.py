"""Wasmtime's host memory creator, handing out arenas.

Installed on a ``wasmtime.Config`` (``wasmtime_config_host_memory_creator_set`` through the
package's ctypes bindings), it makes every linear memory of every store on that engine an
:class:`~driftwood.memory.arena.Arena` the host knows: Wasmtime calls ``new_memory`` at
instantiation, ``grow_memory`` on ``memory.grow``, and the finalizer when the store that owns
the memory is dropped, which closes the arena.

Per-instantiation settings (the actor's memory limit, listeners such as a CUDA registration)
are passed through :meth:`ArenaMemoryCreator.instantiating`, a context manager around the
``Instance``/``Linker.instantiate`` call on the same thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import wasmtime
from wasmtime import _ffi as ffi

from driftwood.errors import ArenaError
from driftwood.memory.arena import Arena, ArenaListener

log = logging.getLogger(__name__)

#: Default ceiling on one linear memory when the instantiation names none (wasm32's 4 GiB).
DEFAULT_LIMIT = 4 << 30

_FinalizerT = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@dataclass
class InstantiationSettings:
    """What the creator applies to memories made during one instantiation."""

    limit: int = DEFAULT_LIMIT
    listeners: list[Callable[[Arena], ArenaListener]] = field(default_factory=list)
    created: list[Arena] = field(default_factory=list)


def _error(message: str) -> int:
    """A ``wasmtime_error_t*`` as an integer, for returning from a callback."""
    ptr = ffi.wasmtime_error_new(message.encode())
    return ctypes.cast(ptr, ctypes.c_void_p).value or 0


class ArenaMemoryCreator:
    """Makes every linear memory of an engine an arena. Keep it alive as long as the engine."""

    def __init__(self) -> None:
        self._arenas: dict[int, Arena] = {}
        self._by_base: dict[int, Arena] = {}
        self._keys = itertools.count(1)
        self._lock = threading.Lock()
        self._local = threading.local()
        # ctypes callback objects: Wasmtime holds raw function pointers to these.
        self._cb_new = ffi.wasmtime_new_memory_callback_t(self._new_memory)
        self._cb_get = ffi.wasmtime_memory_get_callback_t(self._get_memory)
        self._cb_grow = ffi.wasmtime_memory_grow_callback_t(self._grow_memory)
        self._cb_free = _FinalizerT(self._free_memory)
        self._cb_creator_free = _FinalizerT(lambda _env: None)
        self._struct = ffi.wasmtime_memory_creator_t(None, self._cb_new, self._cb_creator_free)

    def install(self, config: wasmtime.Config) -> None:
        """Make ``config``'s engine create its linear memories here (call before ``Engine``)."""
        ffi.wasmtime_config_host_memory_creator_set(config.ptr(), ctypes.byref(self._struct))

    @contextlib.contextmanager
    def instantiating(self, settings: InstantiationSettings) -> Iterator[InstantiationSettings]:
        """Apply ``settings`` to the memories created on this thread inside the block."""
        previous = getattr(self._local, "settings", None)
        self._local.settings = settings
        try:
            yield settings
        finally:
            self._local.settings = previous

    def arena_at(self, base: int) -> Arena:
        """The arena whose base address is ``base`` (e.g. a wasm memory's ``data_ptr``)."""
        with self._lock:
            arena = self._by_base.get(base)
        if arena is None:
            raise ArenaError(f"no live arena at {base:#x}: the memory was not made by this creator")
        return arena

    def live_arenas(self) -> int:
        with self._lock:
            return len(self._arenas)

    # -- callbacks (run inside Wasmtime; must never raise) ---------------------------------

    def _new_memory(self, _env, ty, minimum, maximum, reserved, guard, ret) -> int:  # type: ignore[no-untyped-def]
        try:
            settings: InstantiationSettings = getattr(self._local, "settings", None) or InstantiationSettings()
            declared = ctypes.c_uint64()
            has_max = ffi.wasmtime_memorytype_maximum(ty, ctypes.byref(declared))
            page = ffi.wasmtime_memorytype_page_size(ty)
            limit = settings.limit
            if minimum > limit:
                return _error(
                    f"the module's memory needs at least {minimum / 2**20:.1f} MiB at start, "
                    f"above the memory limit of {limit / 2**20:.1f} MiB"
                )
            if has_max and declared.value * page > limit:
                return _error(
                    f"the module's memory declares a maximum of {declared.value * page / 2**20:.1f} MiB, "
                    f"beyond the arena's limit of {limit / 2**20:.1f} MiB"
                )
            # A non-zero reservation is a promise Wasmtime compiles against (bounds checks
            # elided up to reserved + guard): honour it exactly, even past the limit.
            reserve = max(reserved, min(maximum, limit), minimum, 1)
            arena = Arena(reserve, commit=minimum, guard=guard, limit=min(maximum, limit))
            for make in settings.listeners:
                arena.add_listener(make(arena))
            key = next(self._keys)
            with self._lock:
                self._arenas[key] = arena
                self._by_base[arena.base] = arena
            settings.created.append(arena)
            out = ret[0]
            out.env = key
            out.get_memory = self._cb_get
            out.grow_memory = self._cb_grow
            out.finalizer = self._cb_free
            return 0
        except Exception as exc:  # a failed allocation becomes a Wasmtime error, never a crash
            log.debug("new_memory failed", exc_info=True)
            return _error(f"driftwood arena: {exc}")

    def _get_memory(self, env, size_out, max_out) -> int:  # type: ignore[no-untyped-def]
        arena = self._arenas[env]
        size_out[0] = arena.committed
        max_out[0] = arena.limit
        return arena.base

    def _grow_memory(self, env, new_size) -> int:  # type: ignore[no-untyped-def]
        try:
            self._arenas[env].grow(new_size)
            return 0
        except Exception as exc:
            return _error(f"driftwood arena: {exc}")

    def _free_memory(self, env) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            arena = self._arenas.pop(env, None)
            if arena is not None:
                self._by_base.pop(arena.base, None)
        if arena is not None:
            try:
                arena.close()
            except Exception:
                log.exception("closing arena %#x failed", arena.base)


#: The process-wide creator: its callbacks must outlive every engine that uses them.
CREATOR = ArenaMemoryCreator()

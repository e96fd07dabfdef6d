"""Host functions over guest memory.

Every guest pointer is untrusted. :class:`GuestMemory` turns a guest ``(ptr, len)`` into a
typed view of the arena only after checking that the whole range lies inside the committed
bytes; anything else raises :class:`GuestFault`, which the host-function wrapper turns into an
error code the guest sees. Nothing out of range is ever read or written, and no Python
exception escapes into Wasmtime from a host function.

Declaring a host function::

    @export("gemm_f32", "ptr ptr ptr i32 i32 i32")
    def gemm_f32(self, a, b, c, m, n, k) -> int: ...

Parameter kinds: ``i32`` (signed), ``u32`` (unsigned), ``ptr`` (a u32 guest address),
``i64``; ``buf:DTYPE`` takes two wasm parameters (ptr, element count) and hands the method a
bounds-checked 1-D tensor of that dtype over guest memory (e.g. ``buf:f32``, ``buf:u8``).
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import wasmtime
from wasmtime import _ffi as ffi

from driftwood.errors import ArenaError, DriftwoodError

if TYPE_CHECKING:
    from driftwood.memory.arena import Arena
    from driftwood.memory.backends import Backend

log = logging.getLogger(__name__)

U32 = 1 << 32

DTYPES: dict[str, torch.dtype] = {
    "u8": torch.uint8, "i8": torch.int8, "i16": torch.int16, "i32": torch.int32, "i64": torch.int64,
    "f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64,
}


class GuestFault(DriftwoodError):
    """A guest argument was invalid; ``code`` is what the guest gets back."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# Codes of the native ABI (guests/include/driftwood.h names them the same way).
DW_OK = 0
DW_EINVAL = -1  # an argument is invalid (size, enum, flag, utf-8)
DW_EFAULT = -2  # a pointer range lies outside the guest's memory, or overflows
DW_EALIGN = -3  # a pointer is not aligned for its element type
DW_EINTERNAL = -99  # the host failed; the guest may retry or give up


class GuestMemory:
    """Bounds-checked, zero-copy access to one guest's linear memory."""

    def __init__(self, arena: Arena, backend: Backend) -> None:
        self.arena = arena
        self.backend = backend

    @property
    def size(self) -> int:
        return self.arena.committed

    def check(self, ptr: int, nbytes: int, align: int = 1) -> int:
        """Validate a guest range; returns the offset. ``ptr`` may arrive as a signed i32."""
        ptr %= U32
        if nbytes < 0:
            raise GuestFault(DW_EINVAL, f"negative length {nbytes}")
        end = ptr + nbytes  # Python ints: no wrap-around, an overflowing range is just too big
        if end > self.arena.committed:
            raise GuestFault(
                DW_EFAULT,
                f"guest range [{ptr:#x}, {end:#x}) is outside its {self.arena.committed} bytes of memory",
            )
        if align > 1 and ptr % align:
            raise GuestFault(DW_EALIGN, f"guest pointer {ptr:#x} is not {align}-byte aligned")
        return ptr

    def tensor(self, ptr: int, shape: tuple[int, ...] | int, dtype: torch.dtype, *, device: bool = False) -> torch.Tensor:
        """A tensor over guest bytes: on the CPU, or on the backend's device with ``device=True``."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(n < 0 for n in shape):
            raise GuestFault(DW_EINVAL, f"negative dimension in {shape}")
        itemsize = dtype.itemsize
        count = 1
        for n in shape:
            count *= n
        offset = self.check(ptr, count * itemsize, itemsize)
        try:
            if device:
                return self.backend.tensor(self.arena, offset, shape, dtype)
            return self.arena.tensor(offset, shape, dtype)
        except ArenaError as exc:  # raced with nothing in practice; keep the guarantee anyway
            raise GuestFault(DW_EFAULT, str(exc)) from exc

    def read(self, ptr: int, nbytes: int) -> bytes:
        offset = self.check(ptr, nbytes)
        return bytes(self.arena.buffer(offset, nbytes)) if nbytes else b""

    def write(self, ptr: int, data: bytes | bytearray | memoryview) -> None:
        offset = self.check(ptr, len(data))
        if data:
            self.arena.buffer(offset, len(data))[:] = data

    def read_str(self, ptr: int, nbytes: int) -> str:
        try:
            return self.read(ptr, nbytes).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GuestFault(DW_EINVAL, f"guest string is not valid UTF-8: {exc.reason}") from exc

    def read_u32(self, ptr: int) -> int:
        return struct.unpack("<I", self.read(ptr, 4))[0]

    def write_u32(self, ptr: int, value: int) -> None:
        self.write(ptr, struct.pack("<I", value % U32))

    def read_u32s(self, ptr: int, count: int) -> list[int]:
        if count < 0:
            raise GuestFault(DW_EINVAL, f"negative count {count}")
        return list(struct.unpack(f"<{count}I", self.read(ptr, 4 * count)))


# -- declaring host functions ---------------------------------------------------------------

_WASM_PARAMS = {"i32": 1, "u32": 1, "ptr": 1, "i64": 1}


@dataclass(frozen=True)
class HostFunction:
    name: str
    params: tuple[str, ...]
    result: str | None
    method: Callable[..., Any]

    def functype(self) -> wasmtime.FuncType:
        wasm_params: list[wasmtime.ValType] = []
        for kind in self.params:
            if kind.startswith("buf:"):
                wasm_params += [wasmtime.ValType.i32(), wasmtime.ValType.i32()]
            else:
                wasm_params.append(wasmtime.ValType.i64() if kind == "i64" else wasmtime.ValType.i32())
        results = [] if self.result is None else [wasmtime.ValType.i64() if self.result == "i64" else wasmtime.ValType.i32()]
        return wasmtime.FuncType(wasm_params, results)


def export(name: str, params: str = "", result: str | None = "i32") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a method of a :class:`HostModule` as the host function ``name``."""
    kinds = tuple(params.split())
    for kind in kinds:
        if kind not in _WASM_PARAMS and not (kind.startswith("buf:") and kind[4:] in DTYPES):
            raise ValueError(f"unknown parameter kind {kind!r} for host function {name}")

    def mark(method: Callable[..., Any]) -> Callable[..., Any]:
        method.__driftwood_export__ = (name, kinds, result)  # type: ignore[attr-defined]
        return method

    return mark


class HostModule:
    """A set of host functions under one import module name, bound to one guest's memory.

    Subclasses mark methods with :func:`export`. A method returns an ``int`` for the guest,
    or raises :class:`GuestFault` (its code is returned instead). Any other exception is a
    host bug: it is logged and the guest gets ``internal_error``. Exceptions listed in
    ``propagate`` (e.g. a deadline) instead trap the guest, and :meth:`Actor.call` re-raises
    them.
    """

    module: str = ""
    internal_error: int = DW_EINTERNAL
    propagate: tuple[type[BaseException], ...] = ()

    def __init__(self) -> None:
        self.memory: GuestMemory | None = None
        self._callbacks: list[Any] = []

    def bind(self, memory: GuestMemory) -> None:
        self.memory = memory

    @property
    def mem(self) -> GuestMemory:
        if self.memory is None:
            raise GuestFault(self.internal_error, "host function called before the guest's memory exists")
        return self.memory

    def functions(self) -> Iterator[HostFunction]:
        for attr in dir(type(self)):
            spec = getattr(getattr(type(self), attr), "__driftwood_export__", None)
            if spec:
                name, kinds, result = spec
                yield HostFunction(name, kinds, result, getattr(self, attr))

    def define(self, linker: wasmtime.Linker) -> None:
        """Define every exported function of this module in ``linker``.

        Functions go in through ``wasmtime_linker_define_func_unchecked``: the callback reads
        raw wasm values straight from Wasmtime's argument array, about 1 µs a call instead of
        the ~13 µs of the package's generic trampoline (this is the boundary's per-call cost).
        """
        module = self.module.encode()
        for fn in self.functions():
            callback = ffi.wasmtime_func_unchecked_callback_t(self._raw(fn))
            self._callbacks.append(callback)  # Wasmtime holds a raw pointer to it
            name = fn.name.encode()
            functype = fn.functype()  # keep it alive across the call: Wasmtime reads it
            error = ffi.wasmtime_linker_define_func_unchecked(
                linker.ptr(), module, len(module), name, len(name), functype.ptr(),
                callback, None, _NO_FINALIZER,
            )
            if error:
                raise wasmtime.WasmtimeError._from_ptr(error)

    def fault_code(self, fault: GuestFault) -> int:
        """The value returned to the guest for a fault (ABIs with other conventions override)."""
        return fault.code

    def _raw(self, fn: HostFunction) -> Callable[..., int]:
        kinds = fn.params
        method = fn.method
        readers = []  # how to turn raw slot i into the method's argument
        slot = 0
        for kind in kinds:
            readers.append((kind, slot))
            slot += 2 if kind.startswith("buf:") else 1
        has_result = fn.result is not None
        wide_result = fn.result == "i64"

        def call(_env: int, _caller: Any, raw: Any, _n: int) -> int:
            try:
                try:
                    args: list[Any] = []
                    for kind, i in readers:
                        if kind == "i32":
                            args.append(raw[i].i32)
                        elif kind == "i64":
                            args.append(raw[i].i64)
                        elif kind.startswith("buf:"):
                            args.append(self.mem.tensor(raw[i].i32 % U32, raw[i + 1].i32, DTYPES[kind[4:]]))
                        else:  # u32, ptr
                            args.append(raw[i].i32 % U32)
                    value = method(*args)
                    result = 0 if value is None else int(value)
                except GuestFault as fault:
                    result = self.fault_code(fault)
                except self.propagate:
                    raise
                except Exception:
                    log.exception("host function %s.%s failed", self.module, fn.name)
                    result = self.internal_error
                if has_result:
                    if wide_result:
                        raw[0].i64 = result
                    else:
                        raw[0].i32 = result
                return 0
            except BaseException as exc:  # trap the guest; Actor.call re-raises exc
                _pending.exception = exc
                message = f"host function {self.module}.{fn.name} raised {type(exc).__name__}".encode()
                trap = ffi.wasmtime_trap_new(message, len(message))
                return ctypes.cast(trap, ctypes.c_void_p).value or 0

        return call


_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _env: None)
_pending = threading.local()  # an exception a host function raised, for Actor.call


def take_pending_exception() -> BaseException | None:
    """The exception that made a host function trap the guest on this thread, if any."""
    exc = getattr(_pending, "exception", None)
    _pending.exception = None
    return exc

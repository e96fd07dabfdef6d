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

import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import wasmtime

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
    ``propagate`` (e.g. a deadline) instead trap the guest.
    """

    module: str = ""
    internal_error: int = DW_EINTERNAL
    propagate: tuple[type[BaseException], ...] = ()

    def __init__(self) -> None:
        self.memory: GuestMemory | None = None

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
        """Define every exported function of this module in ``linker``."""
        for fn in self.functions():
            linker.define_func(self.module, fn.name, fn.functype(), self._wrap(fn))

    def fault_code(self, fault: GuestFault) -> int:
        """The value returned to the guest for a fault (ABIs with other conventions override)."""
        return fault.code

    def _wrap(self, fn: HostFunction) -> Callable[..., Any]:
        kinds = fn.params
        method = fn.method
        has_bufs = any(k.startswith("buf:") for k in kinds)

        def call(*raw: int) -> int:
            try:
                args: list[Any] = []
                if has_bufs or "u32" in kinds or "ptr" in kinds:
                    i = 0
                    for kind in kinds:
                        if kind.startswith("buf:"):
                            ptr, count = raw[i] % U32, raw[i + 1]
                            args.append(self.mem.tensor(ptr, count, DTYPES[kind[4:]]))
                            i += 2
                        else:
                            args.append(raw[i] % U32 if kind in ("u32", "ptr") else raw[i])
                            i += 1
                else:
                    args = list(raw)
                result = method(*args)
                return 0 if result is None else int(result)
            except GuestFault as fault:
                return self.fault_code(fault)
            except self.propagate:
                raise
            except Exception:
                log.exception("host function %s.%s failed", self.module, fn.name)
                return self.internal_error

        call.__name__ = f"{self.module}.{fn.name}"
        return call

"""The CUDA backend: arena pages registered as mapped host memory, read and written in place.

``cudaHostRegister(..., cudaHostRegisterMapped)`` pins the committed range and maps it into
the device's address space; under unified virtual addressing the device pointer equals the
host pointer, which :meth:`CudaBackend.address` checks. Torch tensors over those bytes come
from ``__cuda_array_interface__``: kernels read and write the guest's memory over the bus,
with no device allocation and no copy.

The registration follows the arena: on growth it is dropped and made again over the new
committed length (the base never moves, so existing views stay valid); it is dropped when the
arena is closed and the last device view of it is gone, always before the pages are unmapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import weakref
from typing import Any

import torch

from driftwood.errors import BackendError
from driftwood.memory.arena import Arena, ArenaListener
from driftwood.memory.backends import Backend

cudaHostRegisterPortable = 0x01
cudaHostRegisterMapped = 0x02
cudaDevAttrUnifiedAddressing = 41
cudaErrorHostMemoryNotRegistered = 713


class _CudaRuntime:
    """The few CUDA runtime calls torch does not expose, through the libcudart torch loaded."""

    def __init__(self) -> None:
        torch.cuda.init()
        self.lib = ctypes.CDLL(self._find())
        lib = self.lib
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cudaHostGetDevicePointer.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_uint]
        lib.cudaDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
        lib.cudaGetLastError.argtypes = []
        for name in ("cudaHostRegister", "cudaHostUnregister", "cudaHostGetDevicePointer",
                     "cudaDeviceGetAttribute", "cudaGetLastError"):
            getattr(lib, name).restype = ctypes.c_int

    @staticmethod
    def _find() -> str:
        # Prefer the exact library torch already has mapped, so we share its context.
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(maxsplit=1)[-1]
                if "libcudart" in path and path.startswith("/"):
                    return path
        found = ctypes.util.find_library("cudart")
        if not found:
            raise BackendError("libcudart not found: is this a CUDA build of torch?")
        return found

    def check(self, code: int, what: str) -> None:
        if code != 0:
            self.lib.cudaGetLastError()  # clear the sticky-free error so later calls start clean
            message = self.lib.cudaGetErrorString(code).decode()
            raise BackendError(f"{what} failed: {message} (cudaError {code})")

    def register(self, ptr: int, size: int) -> None:
        self.check(self.lib.cudaHostRegister(ptr, size, cudaHostRegisterMapped | cudaHostRegisterPortable),
                   f"cudaHostRegister({ptr:#x}, {size})")

    def unregister(self, ptr: int) -> None:
        code = self.lib.cudaHostUnregister(ptr)
        if code == cudaErrorHostMemoryNotRegistered:
            self.lib.cudaGetLastError()
            return
        self.check(code, f"cudaHostUnregister({ptr:#x})")

    def device_pointer(self, ptr: int) -> int:
        out = ctypes.c_void_p()
        self.check(self.lib.cudaHostGetDevicePointer(ctypes.byref(out), ptr, 0),
                   f"cudaHostGetDevicePointer({ptr:#x})")
        return out.value or 0

    def unified_addressing(self, device: int) -> bool:
        out = ctypes.c_int()
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(out), cudaDevAttrUnifiedAddressing, device),
                   "cudaDeviceGetAttribute(unified addressing)")
        return bool(out.value)


class _Registration(ArenaListener):
    """The arena's committed range, registered with CUDA. Views keep it (and the pages) alive."""

    def __init__(self, runtime: _CudaRuntime, arena: Arena) -> None:
        self.runtime = runtime
        self.base = arena.base
        self._pages = arena.buffer(0, 0)  # keeps the mapping alive until after unregistering
        self._state = {"size": 0}
        self._bytes: torch.Tensor | None = None  # holds a reference to self: dropped on close
        self._lock = threading.RLock()
        self._register(arena.committed)
        weakref.finalize(self, _Registration._release, runtime, self.base, self._state)

    def _register(self, size: int) -> None:
        if size:
            self.runtime.register(self.base, size)
        self._state["size"] = size

    @staticmethod
    def _release(runtime: _CudaRuntime, base: int, state: dict[str, int]) -> None:
        if state["size"]:
            torch.cuda.synchronize()
            runtime.unregister(base)
            state["size"] = 0

    @property
    def size(self) -> int:
        return self._state["size"]

    def device_bytes(self, device: torch.device) -> torch.Tensor:
        """A uint8 device tensor over every registered byte; views are slices of it."""
        with self._lock:
            cached = self._bytes
            if cached is None or cached.numel() != self.size:
                address = self.runtime.device_pointer(self.base)
                cached = self._bytes = torch.as_tensor(_DeviceView(self, address, (self.size,), "|u1"), device=device)
            return cached

    def arena_grown(self, arena: Arena, old_size: int, new_size: int) -> None:
        with self._lock:
            _Registration._release(self.runtime, self.base, self._state)
            self._register(new_size)
            self._bytes = None

    def arena_closing(self, arena: Arena) -> None:
        # Unregistering waits for the last device view: its finalizer runs _release.
        with self._lock:
            self._bytes = None
        _attached.pop(self.base, None)


class _DeviceView:
    """Exposes arena bytes through ``__cuda_array_interface__``; torch keeps it alive per tensor."""

    def __init__(self, registration: _Registration, address: int, shape: tuple[int, ...], typestr: str) -> None:
        self.registration = registration
        self.__cuda_array_interface__: dict[str, Any] = {
            "shape": shape,
            "typestr": typestr,
            "data": (address, False),
            "strides": None,
            "version": 3,
            "stream": None,  # synchronous with respect to the host: no stream to wait on
        }


_attached: dict[int, _Registration] = {}


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, name: str = "cuda") -> None:
        if not torch.cuda.is_available():
            raise BackendError("CUDA is not available (no GPU, or a CPU build of torch)")
        self._device = torch.device(name)
        self.index = self._device.index if self._device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(self.index):
            self.runtime = _CudaRuntime()
            self.unified = self.runtime.unified_addressing(self.index)

    @property
    def device(self) -> torch.device:
        return self._device

    def _registration(self, arena: Arena) -> _Registration:
        reg = _attached.get(arena.base)
        if reg is None:
            reg = _Registration(self.runtime, arena)
            arena.add_listener(reg)
            _attached[arena.base] = reg
        return reg

    def attach(self, arena: Arena) -> None:
        self._registration(arena)

    def registered_bytes(self, arena: Arena) -> int:
        reg = _attached.get(arena.base)
        return reg.size if reg else 0

    def tensor(self, arena: Arena, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = 1
        for n in shape:
            count *= n
        nbytes = count * dtype.itemsize
        arena.check_range(offset, nbytes)
        if offset % dtype.itemsize:
            raise BackendError(f"offset {offset} is not aligned for {dtype}")
        reg = self._registration(arena)
        return reg.device_bytes(self._device)[offset : offset + nbytes].view(dtype).view(shape)

    def address(self, arena: Arena, offset: int = 0) -> int:
        arena.check_range(offset, 0)
        self._registration(arena)
        return self.runtime.device_pointer(arena.base) + offset

    def synchronize(self) -> None:
        torch.cuda.synchronize(self._device)

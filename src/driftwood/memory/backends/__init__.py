"""Accelerator backends: how a device reads and writes arena bytes in place.

A backend makes an :class:`~driftwood.memory.arena.Arena` visible to one accelerator without a
copy. ``attach`` prepares the arena once (the CUDA backend registers it as mapped host memory
and follows its growth); ``tensor`` returns a framework tensor on the device over arena bytes.
Callers only use this interface, so a new accelerator (Metal through
``makeBuffer(bytesNoCopy:)``) is one new module registered in ``_BACKENDS``.
"""

from __future__ import annotations

import importlib
import secrets
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from driftwood.errors import BackendError

if TYPE_CHECKING:
    import torch

    from driftwood.memory.arena import Arena

# name -> "module:Class", imported on first use so `import driftwood` stays light.
_BACKENDS = {
    "cpu": "driftwood.memory.backends.cpu:CpuBackend",
    "cuda": "driftwood.memory.backends.cuda:CudaBackend",
}


@dataclass(frozen=True)
class PointerIdentity:
    """Whether the guest and the accelerator address the very same bytes."""

    backend: str
    guest_base: int
    accelerator_address: int
    same_address: bool
    same_bytes: bool  # a write on each side was read back on the other

    @property
    def identical(self) -> bool:
        return self.same_address and self.same_bytes

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["guest_base"] = hex(self.guest_base)
        d["accelerator_address"] = hex(self.accelerator_address)
        d["identical"] = self.identical
        return d


class Backend(ABC):
    """One accelerator's zero-copy view of arenas."""

    name: str

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def attach(self, arena: Arena) -> None:
        """Make ``arena`` accessible to the device, following its growth. Idempotent."""

    @abstractmethod
    def tensor(self, arena: Arena, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A device tensor over ``arena`` bytes at ``offset`` (no copy). The range must be committed."""

    @abstractmethod
    def address(self, arena: Arena, offset: int = 0) -> int:
        """The device's address of arena byte ``offset``."""

    def synchronize(self) -> None:  # noqa: B027 - host-synchronous backends need nothing
        """Wait for device work touching arenas to finish."""

    def identity(self, arena: Arena, offset: int = 0) -> PointerIdentity:
        """Compare addresses, then write through each side and read on the other.

        The four bytes at ``offset`` are restored afterwards; call it while the guest is not
        running.
        """
        import torch

        self.attach(arena)
        host = arena.numpy(offset, 1, "<u4")
        dev = self.tensor(arena, offset, (1,), torch.int32)
        saved = int(host[0])
        a, b = (secrets.randbits(31) for _ in range(2))
        dev.fill_(a)
        self.synchronize()
        seen_by_host = int(host[0])
        host[0] = b
        seen_by_device = int(dev.item())
        host[0] = saved
        accel = self.address(arena, offset)
        return PointerIdentity(
            backend=self.name,
            guest_base=arena.base + offset,
            accelerator_address=accel,
            same_address=accel == arena.base + offset,
            same_bytes=seen_by_host == a and seen_by_device == b,
        )


_instances: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend for ``name`` (``cpu``, ``cuda``); raises BackendError if unavailable."""
    kind = name.split(":", 1)[0]
    if kind not in _BACKENDS:
        raise BackendError(f"unknown accelerator backend {name!r}; known: {', '.join(_BACKENDS)}")
    if name not in _instances:
        module, cls = _BACKENDS[kind].split(":")
        _instances[name] = getattr(importlib.import_module(module), cls)(name)
    return _instances[name]


def available_backends() -> list[str]:
    names = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            names.append("cuda")
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return names

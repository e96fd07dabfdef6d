"""The CPU backend: numpy and torch views straight over arena bytes."""

from __future__ import annotations

import torch

from driftwood.memory.arena import Arena
from driftwood.memory.backends import Backend


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, name: str = "cpu") -> None:
        self._device = torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self._device

    def attach(self, arena: Arena) -> None:
        pass  # host memory is the CPU's own

    def tensor(self, arena: Arena, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return arena.tensor(offset, shape, dtype)

    def address(self, arena: Arena, offset: int = 0) -> int:
        arena.check_range(offset, 0)
        return arena.base + offset

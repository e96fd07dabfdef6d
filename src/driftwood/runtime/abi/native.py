"""The native host ABI, import module ``driftwood`` (guests/include/driftwood.h).

Tensors are guest memory: the accelerator reads and writes the guest's bytes in place
through the actor's backend (numpy/torch views on the CPU, mapped pinned memory on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from driftwood.runtime.hostcall import DW_EINVAL, GuestFault, HostModule, export

if TYPE_CHECKING:
    from driftwood.runtime.actor import Actor

MAX_GEMM_DIM = 8192


@dataclass(frozen=True)
class GemmRecord:
    """Addresses of the last GEMM: where the guest's buffers are, and what the device used."""

    guest_addresses: tuple[int, int, int]  # host virtual addresses of a, b, c in the arena
    device_addresses: tuple[int, int, int]  # data_ptr() of the tensors the kernel ran on
    shape: tuple[int, int, int]

    @property
    def zero_copy(self) -> bool:
        return self.guest_addresses == self.device_addresses


def _overlaps(p: int, n: int, q: int, m: int) -> bool:
    return p < q + m and q < p + n


class NativeABI(HostModule):
    module = "driftwood"

    def __init__(self, actor: Actor) -> None:
        super().__init__()
        self.actor = actor
        self.last_gemm: GemmRecord | None = None

    @export("gemm_f32", "ptr ptr ptr i32 i32 i32")
    def gemm_f32(self, a: int, b: int, c: int, m: int, n: int, k: int) -> int:
        if not all(1 <= d <= MAX_GEMM_DIM for d in (m, n, k)):
            raise GuestFault(DW_EINVAL, f"gemm dimensions {m}x{n}x{k} outside [1, {MAX_GEMM_DIM}]")
        mem = self.mem
        ta = mem.tensor(a, (m, k), torch.float32, device=True)
        tb = mem.tensor(b, (k, n), torch.float32, device=True)
        tc = mem.tensor(c, (m, n), torch.float32, device=True)
        if _overlaps(c, 4 * m * n, a, 4 * m * k) or _overlaps(c, 4 * m * n, b, 4 * k * n):
            raise GuestFault(DW_EINVAL, "gemm output overlaps an input")
        torch.matmul(ta, tb, out=tc)
        mem.backend.synchronize()
        base = mem.arena.base
        self.last_gemm = GemmRecord(
            guest_addresses=(base + a, base + b, base + c),
            device_addresses=(ta.data_ptr(), tb.data_ptr(), tc.data_ptr()),
            shape=(m, n, k),
        )
        return 0

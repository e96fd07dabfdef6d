"""The CUDA backend: arena pages registered as mapped host memory (skipped without a GPU)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from driftwood.errors import BackendError
from driftwood.memory.arena import Arena, live_mappings
from tests.conftest import requires_cuda

pytestmark = requires_cuda


@pytest.fixture(scope="module")
def cuda():
    from driftwood.memory.backends import get_backend

    return get_backend("cuda")


def test_device_pointer_is_host_pointer_under_uva(cuda):
    assert cuda.unified
    with Arena(1 << 24, commit=1 << 20) as arena:
        ident = cuda.identity(arena)
        assert ident.same_address and ident.same_bytes
        assert cuda.address(arena, 4096) == arena.base + 4096


def test_device_tensor_aliases_the_arena_both_ways(cuda):
    with Arena(1 << 24, commit=1 << 20) as arena:
        host = arena.numpy(0, 4096, np.float32)
        host[:] = np.random.default_rng().standard_normal(4096, dtype=np.float32)
        dev = cuda.tensor(arena, 0, (64, 64), torch.float32)
        assert dev.is_cuda and dev.data_ptr() == arena.base
        assert torch.equal(dev.cpu().flatten(), torch.from_numpy(host.copy()))
        dev.mul_(3)  # a kernel writes guest memory in place
        torch.cuda.synchronize()
        assert np.allclose(host, dev.cpu().flatten().numpy())
        for dtype in (torch.bfloat16, torch.float16, torch.int32, torch.uint8):
            assert cuda.tensor(arena, 64, (8,), dtype).dtype == dtype


def test_growth_re_registers(cuda):
    with Arena(1 << 24, commit=1 << 16) as arena:
        cuda.attach(arena)
        assert cuda.registered_bytes(arena) == 1 << 16
        arena.grow(1 << 22)
        assert cuda.registered_bytes(arena) == 1 << 22
        tail = cuda.tensor(arena, (1 << 22) - 4096, (1024,), torch.float32)
        tail.fill_(2.5)
        torch.cuda.synchronize()
        assert (arena.numpy((1 << 22) - 4096, 1024, np.float32) == 2.5).all()


def test_release_unregisters_after_the_last_view(cuda):
    gc.collect()
    before = live_mappings()
    arena = Arena(1 << 22, commit=1 << 20)
    view = cuda.tensor(arena, 0, (16,), torch.float32)
    base = arena.base
    arena.close()
    view.fill_(1.0)  # still registered and mapped: the view holds both
    torch.cuda.synchronize()
    assert cuda.runtime.device_pointer(base) == base
    del view
    gc.collect()
    assert live_mappings() == before
    with pytest.raises(BackendError):
        cuda.runtime.device_pointer(base)  # no longer registered


def test_many_actors_leave_nothing_registered(cuda):
    from driftwood.runtime.actor import Actor
    from tests.conftest import quiet, wat_module

    module = wat_module('(module (memory (export "memory") 16))')
    gc.collect()
    before = live_mappings()
    free_before = torch.cuda.mem_get_info()[0]
    for _ in range(50):
        with Actor(module, device="cuda", wasi=quiet()) as actor:
            actor.memory.tensor(0, (256,), torch.float32, device=True).fill_(1)
    gc.collect()
    assert live_mappings() == before
    assert abs(torch.cuda.mem_get_info()[0] - free_before) < 8 << 20

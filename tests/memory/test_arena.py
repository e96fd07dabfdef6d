"""The arena's life cycle: reserve, commit, grow in place, guard, release, no leaks."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from driftwood.errors import ArenaError
from driftwood.memory.arena import ALIGNMENT, PAGE_SIZE, Arena, live_mappings
from tests.conftest import vm_size


def test_alignment_and_layout():
    assert max(PAGE_SIZE, 16 * 1024) <= ALIGNMENT
    with Arena(1 << 20, commit=4096, guard=1 << 16) as arena:
        assert arena.base % ALIGNMENT == 0
        assert arena.committed == 4096
        assert arena.reserved >= 1 << 20
        assert arena.guard == 1 << 16


def test_reserved_memory_is_not_resident_until_touched():
    with Arena(64 << 20, commit=32 << 20) as arena:
        assert arena.resident_bytes() == 0
        arena.numpy(0, 1 << 20)[:] = 7  # touch 1 MiB
        assert 1 << 20 <= arena.resident_bytes() <= (1 << 20) + 2 * PAGE_SIZE


def test_grow_in_place_keeps_base_and_data():
    with Arena(8 << 20, commit=65536) as arena:
        base = arena.base
        arena.numpy(0, 65536)[:] = np.arange(65536) % 251
        arena.grow(4 << 20)
        assert arena.base == base
        assert arena.committed == 4 << 20
        assert np.array_equal(arena.numpy(0, 65536), np.arange(65536) % 251)
        assert not arena.numpy(65536).any()  # fresh pages are zero
        arena.numpy(arena.committed - 1, 1)[:] = 1  # the whole new range is writable


def test_grow_errors():
    with Arena(1 << 20, commit=65536, limit=256 << 10) as arena:
        with pytest.raises(ArenaError, match="exceeds the arena limit"):
            arena.grow(512 << 10)
        with pytest.raises(ArenaError, match="never shrinks"):
            arena.grow(4096)
        assert arena.committed == 65536  # failed growth changed nothing
    with pytest.raises(ArenaError, match="closed"):
        arena.grow(1 << 17)


def test_views_are_bounds_checked():
    with Arena(1 << 20, commit=4096) as arena:
        with pytest.raises(ArenaError):
            arena.numpy(4095, 2)
        with pytest.raises(ArenaError):
            arena.tensor(4096, (1,), torch.uint8)
        with pytest.raises(ArenaError):
            arena.buffer(-1, 1)
        with pytest.raises(ArenaError, match="aligned"):
            arena.tensor(2, (1,), torch.float32)


def test_numpy_and_torch_views_alias_the_arena():
    with Arena(1 << 20, commit=1 << 16) as arena:
        a = arena.numpy(0, 256, np.float32)
        t = arena.tensor(0, (16, 16), torch.float32)
        assert a.ctypes.data == t.data_ptr() == arena.base
        rng = np.random.default_rng()
        a[:] = rng.standard_normal(256, dtype=np.float32)
        assert torch.equal(t.flatten(), torch.from_numpy(a))
        t.mul_(2)
        assert np.array_equal(a, t.flatten().numpy())


def test_views_keep_pages_mapped_after_close():
    gc.collect()  # earlier tests' garbage must not count
    before = live_mappings()
    arena = Arena(1 << 20, commit=4096)
    view = arena.numpy(0, 4096)
    view[:] = 3
    arena.close()
    assert arena.closed
    assert live_mappings() == before + 1  # the view still holds the pages
    assert view.sum() == 3 * 4096  # and reading them is safe
    del view
    gc.collect()
    assert live_mappings() == before


def test_no_leak_over_many_arenas():
    gc.collect()
    before = live_mappings()
    vm_before = vm_size()
    for _ in range(300):
        with Arena(64 << 20, commit=1 << 20, guard=1 << 20) as arena:
            arena.numpy(0, 4096)[:] = 1
    gc.collect()
    assert live_mappings() == before
    assert vm_size() - vm_before < 16 << 20  # 300 × 65 MiB reservations all returned


@pytest.mark.parametrize("where", ["reserved", "guard"])
def test_uncommitted_and_guard_pages_fault(where):
    # A real fault kills the process, so touch the page in a child and expect SIGSEGV.
    code = textwrap.dedent(f"""
        import ctypes
        from driftwood.memory.arena import Arena
        arena = Arena(1 << 20, commit=65536, guard=65536)
        addr = arena.base + (65536 if "{where}" == "reserved" else arena.reserved)
        ctypes.c_uint8.from_address(addr).value = 1
        print("no fault")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode < 0, proc.stdout + proc.stderr  # killed by a signal
    assert "no fault" not in proc.stdout


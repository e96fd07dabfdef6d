"""Wasmtime's memory creator: every guest linear memory is an arena the host knows."""

from __future__ import annotations

import ctypes
import gc

import numpy as np
import pytest

from driftwood.errors import GuestError
from driftwood.memory.arena import live_mappings
from driftwood.memory.creator import CREATOR
from driftwood.runtime.actor import Actor, Limits
from tests.conftest import quiet, vm_size, wat_module

GROWER = """
(module
  (memory (export "memory") 2)
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
  (func (export "size") (result i32) (memory.size))
  (func (export "load") (param i32) (result i32) (i32.load (local.get 0)))
  (func (export "store") (param i32 i32) (i32.store (local.get 0) (local.get 1))))
"""


@pytest.fixture(scope="module")
def grower():
    return wat_module(GROWER, "grower.wasm")


def test_guest_memory_is_the_arena(grower):
    with Actor(grower, wasi=quiet()) as actor:
        memory = actor.exports["memory"]
        data_ptr = ctypes.addressof(memory.data_ptr(actor.store).contents)
        assert actor.arena is not None
        assert data_ptr == actor.arena.base
        assert CREATOR.arena_at(data_ptr) is actor.arena
        assert memory.data_len(actor.store) == actor.arena.committed == 2 * 65536


def test_guest_growth_commits_in_place(grower):
    with Actor(grower, wasi=quiet()) as actor:
        arena = actor.arena
        base = arena.base
        actor.call("store", 65532, 0x12345678)
        assert actor.call("grow", 3) == 2  # old size in pages
        assert actor.call("size") == 5
        assert arena.base == base and arena.committed == 5 * 65536
        memory = actor.exports["memory"]
        assert ctypes.addressof(memory.data_ptr(actor.store).contents) == base
        assert actor.call("load", 65532) == 0x12345678
        actor.call("store", 5 * 65536 - 4, 7)  # the new pages are usable by the guest
        assert arena.numpy(5 * 65536 - 4, 1, np.int32)[0] == 7


def test_growth_past_the_cap_fails_inside_the_guest(grower):
    with Actor(grower, limits=Limits(max_memory=4 * 65536), wasi=quiet()) as actor:
        assert actor.call("grow", 3) == -1  # memory.grow returns -1, nothing traps
        assert actor.call("size") == 2
        assert actor.call("grow", 2) == 2  # up to the cap is fine
        assert actor.call("grow", 1) == -1


def test_aliasing_both_ways(grower):
    with Actor(grower, wasi=quiet()) as actor:
        view = actor.arena.numpy(0, 1024, np.int32)
        rng = np.random.default_rng()
        values = rng.integers(-(2**31), 2**31, size=1024, dtype=np.int64).astype(np.int32)
        view[:] = values  # numpy writes, the guest reads
        for i in rng.choice(1024, 32, replace=False):
            assert actor.call("load", int(i) * 4) == values[i]
        for i in rng.choice(1024, 32, replace=False):  # the guest writes, numpy reads
            actor.call("store", int(i) * 4, int(i) * 3 + 1)
            assert view[i] == int(i) * 3 + 1


def test_declared_maximum_beyond_limit_is_refused():
    module = wat_module('(module (memory (export "memory") 1 100))', "bigmax.wasm")
    with pytest.raises(GuestError, match=r"declares a maximum of 6\.2 MiB, beyond the arena's limit of 1\.0 MiB"):
        Actor(module, limits=Limits(max_memory=1 << 20), wasi=quiet())
    with Actor(module, limits=Limits(max_memory=100 * 65536), wasi=quiet()) as actor:
        assert actor.arena.limit == 100 * 65536


def test_initial_size_beyond_limit_is_refused():
    module = wat_module('(module (memory (export "memory") 64))', "bigmin.wasm")
    with pytest.raises(GuestError, match="memory"):
        Actor(module, limits=Limits(max_memory=1 << 20), wasi=quiet())
    # and the host keeps working afterwards
    with Actor(module, wasi=quiet()) as actor:
        assert actor.arena.committed == 64 * 65536


def test_stores_release_their_arenas(grower):
    gc.collect()
    mappings, arenas = live_mappings(), CREATOR.live_arenas()
    vm_before = vm_size()
    for i in range(200):
        actor = Actor(grower, wasi=quiet())
        actor.call("grow", 1 + i % 3)
        actor.arena.numpy(0, 65536)[:] = 1
        actor.close()
    gc.collect()
    assert CREATOR.live_arenas() == arenas
    assert live_mappings() == mappings
    assert vm_size() - vm_before < 64 << 20  # each store reserved 4 GiB + guard: all returned


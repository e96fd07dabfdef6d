"""Host functions over guest memory: every guest pointer is checked, from a real guest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from driftwood.memory.arena import Arena
from driftwood.memory.backends import get_backend
from driftwood.runtime.abi.native import NativeABI
from driftwood.runtime.actor import Actor
from driftwood.runtime.hostcall import (
    DW_EALIGN,
    DW_EFAULT,
    DW_EINVAL,
    GuestFault,
    GuestMemory,
    HostModule,
    export,
)
from tests.conftest import quiet, wat_module

PAGES = 4
MEM = PAGES * 65536
I32 = st.integers(-(2**31), 2**31 - 1)
U32 = st.integers(0, 2**32 - 1)

GEMM_GUEST = f"""
(module
  (import "driftwood" "gemm_f32" (func $gemm (param i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") {PAGES} {PAGES})
  (func (export "gemm") (param i32 i32 i32 i32 i32 i32) (result i32)
    (call $gemm (local.get 0) (local.get 1) (local.get 2) (local.get 3) (local.get 4) (local.get 5))))
"""


@pytest.fixture(scope="module")
def gemm_actor():
    with Actor(wat_module(GEMM_GUEST, "gemm-probe.wasm"), wasi=quiet(), host_modules=[NativeABI]) as actor:
        yield actor


# -- GuestMemory.check against a reference predicate -------------------------------------------


@given(ptr=st.one_of(I32, U32), length=st.integers(-5, 2**33), align=st.sampled_from([1, 2, 4, 8]))
def test_check_matches_reference(ptr, length, align):
    with Arena(MEM, commit=MEM) as arena:
        mem = GuestMemory(arena, get_backend("cpu"))
        p = ptr % 2**32
        if length < 0:
            expected = DW_EINVAL
        elif p + length > MEM:
            expected = DW_EFAULT
        elif p % align:
            expected = DW_EALIGN
        else:
            expected = 0
        try:
            assert mem.check(ptr, length, align) == p
            got = 0
        except GuestFault as fault:
            got = fault.code
        assert got == expected


def test_wrapping_ranges_are_refused():
    with Arena(MEM, commit=MEM) as arena:
        mem = GuestMemory(arena, get_backend("cpu"))
        for ptr, length in [(2**32 - 4, 8), (-4, 8), (MEM - 4, 2**32 - 4), (1, 2**32 - 1)]:
            with pytest.raises(GuestFault) as info:
                mem.check(ptr, length)
            assert info.value.code == DW_EFAULT


# -- gemm_f32 from a real guest, with hostile arguments ----------------------------------------

hostile = st.one_of(st.integers(0, MEM), I32, st.sampled_from([MEM - 4, MEM, 2**31 - 1, -1, -(2**31)]))
dims = st.integers(1, 32)
bad_dims = st.one_of(st.integers(-(2**31), 0), st.integers(8193, 2**31 - 1))


@st.composite
def gemm_args(draw):
    """In-range operands, then (usually) one or more replaced by a hostile value."""
    m, n, k = draw(dims), draw(dims), draw(dims)
    ptrs = [4 * draw(st.integers(0, (MEM - 4 * size) // 4)) for size in (m * k, k * n, m * n)]
    for i in draw(st.sets(st.sampled_from([0, 1, 2]))):
        ptrs[i] = draw(hostile)
    return (*ptrs, m, n, k)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=gemm_args(), seed=st.integers(0, 2**32 - 1))
def test_gemm_host_function_never_escapes(gemm_actor, args, seed):
    a, b, c, m, n, k = args
    arena = gemm_actor.arena
    whole = arena.numpy(0, MEM)
    whole[:] = np.random.default_rng(seed).integers(0, 256, MEM, dtype=np.uint8)
    before = whole.copy()
    rc = gemm_actor.call("gemm", a, b, c, m, n, k)
    ua, ub, uc = (x % 2**32 for x in (a, b, c))
    valid_dims = all(1 <= d <= 8192 for d in (m, n, k))
    in_range = valid_dims and all(p + 4 * size <= MEM and p % 4 == 0 for p, size in
                                  ((ua, m * k), (ub, k * n), (uc, m * n)))
    overlap = in_range and ((uc < ua + 4 * m * k and ua < uc + 4 * m * n) or (uc < ub + 4 * k * n and ub < uc + 4 * m * n))
    event("valid" if in_range and not overlap else f"refused ({rc})")
    if in_range and not overlap:
        assert rc == 0
        changed = np.flatnonzero(whole != before)
        assert changed.size == 0 or (changed.min() >= uc and changed.max() < uc + 4 * m * n)
    else:
        assert rc in (DW_EINVAL, DW_EFAULT, DW_EALIGN)
        assert np.array_equal(whole, before)  # a refused call touches nothing


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.one_of(dims, bad_dims), n=st.one_of(dims, bad_dims), k=bad_dims, order=st.permutations([0, 1, 2]))
def test_gemm_refuses_bad_dimensions(gemm_actor, m, n, k, order):
    m, n, k = ([m, n, k][i] for i in order)
    whole = gemm_actor.arena.numpy(0, MEM)
    before = whole.copy()
    assert gemm_actor.call("gemm", 0, 8192, 16384, m, n, k) == DW_EINVAL
    assert np.array_equal(whole, before)


def test_gemm_matches_float64_reference_on_fresh_inputs(gemm_actor):
    rng = np.random.default_rng()
    arena = gemm_actor.arena
    for _ in range(20):
        m, n, k = (int(x) for x in rng.integers(1, 64, 3))
        a, b = 0, 4 * m * k
        c = b + 4 * k * n
        A = rng.standard_normal((m, k), dtype=np.float32)
        B = rng.standard_normal((k, n), dtype=np.float32)
        arena.numpy(a, m * k, np.float32)[:] = A.ravel()
        arena.numpy(b, k * n, np.float32)[:] = B.ravel()
        arena.numpy(c, m * n, np.float32)[:] = np.nan  # poison: every element must be written
        assert gemm_actor.call("gemm", a, b, c, m, n, k) == 0
        got = arena.numpy(c, m * n, np.float32).reshape(m, n).astype(np.float64)
        ref = A.astype(np.float64) @ B.astype(np.float64)
        assert np.isfinite(got).all()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
    record = gemm_actor.hosts[0].last_gemm
    assert record.zero_copy and record.shape == (m, n, k)


# -- the declarative helper: buf:DTYPE parameters hand the host a checked view -------------------


class Probe(HostModule):
    module = "probe"

    def __init__(self, actor):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    @export("sum_i32", "buf:i32")
    def sum_i32(self, values: torch.Tensor) -> int:
        self.seen.append(values)
        return int(values.sum()) % 2**31

    @export("fill_u8", "buf:u8 u32")
    def fill_u8(self, out: torch.Tensor, value: int) -> int:
        out.fill_(value % 256)
        return out.numel()

    @export("boom", "")
    def boom(self) -> int:
        raise ValueError("a host bug")


PROBE_GUEST = """
(module
  (import "probe" "sum_i32" (func $sum (param i32 i32) (result i32)))
  (import "probe" "fill_u8" (func $fill (param i32 i32 i32) (result i32)))
  (import "probe" "boom" (func $boom (result i32)))
  (memory (export "memory") 1 1)
  (func (export "sum") (param i32 i32) (result i32) (call $sum (local.get 0) (local.get 1)))
  (func (export "fill") (param i32 i32 i32) (result i32) (call $fill (local.get 0) (local.get 1) (local.get 2)))
  (func (export "boom") (result i32) (call $boom)))
"""


@pytest.fixture(scope="module")
def probe_actor():
    with Actor(wat_module(PROBE_GUEST, "probe.wasm"), wasi=quiet(), host_modules=[Probe]) as actor:
        yield actor


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ptr=st.one_of(st.integers(0, 65536), I32), count=st.one_of(st.integers(0, 16384), I32))
def test_buffer_parameters_are_checked(probe_actor, ptr, count):
    view = probe_actor.arena.numpy(0, 16384, np.int32)
    view[:] = np.arange(16384, dtype=np.int32)
    rc = probe_actor.call("sum", ptr, count)
    p = ptr % 2**32
    if count < 0:
        assert rc == DW_EINVAL
    elif p + 4 * count > 65536:
        assert rc == DW_EFAULT
    elif p % 4:
        assert rc == DW_EALIGN
    else:
        start = p // 4
        assert rc == int(np.arange(start, start + count, dtype=np.int64).sum()) % 2**31
        seen = probe_actor.hosts[0].seen[-1]
        assert seen.numel() == 0 or seen.data_ptr() == probe_actor.arena.base + p  # a view, not a copy


def test_buffer_writes_land_in_guest_memory(probe_actor):
    assert probe_actor.call("fill", 100, 10, 0xAB) == 10
    mem = probe_actor.arena.numpy(0, 65536)
    assert (mem[100:110] == 0xAB).all()


def test_host_bugs_become_error_codes(probe_actor, caplog):
    assert probe_actor.call("boom") == -99
    assert "a host bug" in caplog.text

"""A decoder layer as one persistent kernel, for one row of x on dense weights (docs/gpu.md).

At batch 1 each product of the step is a short kernel (3-27 us) whose start and end cost a
few microseconds each: the launch, the first weights' DRAM latency, the last programs' tail.
:func:`layer` runs the whole layer in one launch of a grid that fits on the GPU at once: its
programs take the QKV product (RMSNorm first, RoPE and the cache write after), attention (the
splits combined by the last split of each KV head), the output product with the residual, the
gate|up product (RMSNorm first) and the down product (SiLU · up on load, the residual after),
with a grid-wide barrier between phases. Before waiting at a barrier each program loads its
first weights of the next phase, so that their latency overlaps the barrier.

The barrier is one int64 counter that only grows: a program arriving at it adds 1 and waits
until the counter reaches the next multiple of the grid size (every program of a barrier
arrives before any can pass, so all see the same multiple). Every program of the grid must be
resident at once: the grid is the number of multiprocessors times the blocks each can hold
(from the compiled kernel's registers and shared memory), launched cooperatively where Triton
can (the driver then refuses a grid that would not fit instead of hanging).

Under Triton's interpreter (tests) programs run one after another, so a barrier would never
open: each phase is then launched on its own (``PHASES``), which runs the same code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from driftwood.model.cuda.kernels import (
    INTERPRET,
    _attn_split,
    _counters,
    _inv_rms,
    _load_x1,
    _row_epilogue,
    attention_splits,
)

QKV, ATTENTION, OUT, GATE_UP, DOWN = 1, 2, 4, 8, 16
ALL_PHASES = QKV | ATTENTION | OUT | GATE_UP | DOWN


def _cooperative_supported() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        return "launch_cooperative_grid" in CUDAOptions.__dataclass_fields__ and not INTERPRET
    except Exception:  # no NVIDIA backend
        return False


COOPERATIVE = _cooperative_supported()
# (rows a tile of qkv, o, gate_up, down; columns a chunk; num_warps; programs a multiprocessor[;
# registers a thread at most])
CONFIG = (4, 4, 4, 4, 2048, 8, 2)


@triton.jit
def _grid_sync(bar_ptr, SYNC: tl.constexpr):
    """Wait until every program of the grid has arrived here (SYNC), their writes visible."""
    if SYNC:
        n = tl.num_programs(0)
        tl.debug_barrier()  # the whole program's stores before the release
        old = tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
        target = (old // n + 1) * n
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


@triton.jit
def _chunk(w_ptr, c, pid, N, K, BN: tl.constexpr, BK: tl.constexpr):
    """This program's chunk c of W (N, K): tile pid + (c // chunks a row) * grid of BN rows,
    columns (c % chunks a row) * BK + [0, BK); rows past N (past the program's last tile) read 0."""
    kch = K // BK
    rn = (pid + (c // kch) * tl.num_programs(0)) * BN + tl.arange(0, BN)
    rk = (c % kch) * BK + tl.arange(0, BK)
    return tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn < N)[:, None], other=0)


@triton.jit
def _rows(w_ptr, w0, x_ptr, nw_ptr, r, res_ptr, out_ptr, N, K, pid, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr,
          sc_h, sc_t, GLU: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr, ROPE: tl.constexpr,
          H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[n] = x' . W[n] (+ res[n]) for this program's tiles of BN rows (pid, pid + grid, ...),
    chunk by chunk with the next chunk loaded during the current one; w0 is the first chunk."""
    kch = K // BK
    total = tl.cdiv(tl.cdiv(N, BN) - pid, tl.num_programs(0)) * kch
    rk = tl.arange(0, BK)
    w_next = w0
    acc = tl.zeros((BN, BK), tl.float32)
    for c in range(0, total):
        w = w_next.to(tl.float32)
        w_next = _chunk(w_ptr, c + 1, pid, N, K, BN, BK)
        x = _load_x1(x_ptr, (c % kch) * BK + rk, K, GLU, NORM, nw_ptr, r, rk < BK)
        acc += w * x[None, :]
        if c % kch == kch - 1:
            rn = (pid + (c // kch) * tl.num_programs(0)) * BN + tl.arange(0, BN)
            _row_epilogue(tl.sum(acc, axis=1), rn, rn < N, 0, res_ptr, 0, out_ptr, 0, pos_ptr, inv_ptr, q_ptr,
                          k_ptr, v_ptr, 0, sc_h, sc_t, HAS_RES, ROPE, H, HKV, D, BN)
            acc = tl.zeros((BN, BK), tl.float32)


@triton.jit
def _layer_kernel(x_ptr, an_ptr, wqkv_ptr, wo_ptr, fn_ptr, w13_ptr, w2_ptr, eps, pos_ptr, inv_ptr, q_ptr, k_ptr,
                  v_ptr, sc_h, sc_t, scale, o_ptr, ml_ptr, cnt_ptr, a_ptr, gu_ptr, bar_ptr, DIM, FFN,
                  H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr,
                  SPLIT: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BN_QKV: tl.constexpr,
                  BN_O: tl.constexpr, BN_GU: tl.constexpr, BN_DOWN: tl.constexpr, BK: tl.constexpr,
                  BK_NORM: tl.constexpr, F32: tl.constexpr, PHASES: tl.constexpr, SYNC: tl.constexpr):
    """One decoder layer for one sequence (x (DIM,) updated in place), the phases in PHASES."""
    pid = tl.program_id(0)
    NQKV = (H + 2 * HKV) * D
    if PHASES & 1:  # qkv = RMSNorm(x) @ Wqkv.T -> RoPE; queries to q, keys and values into the caches
        w0 = _chunk(wqkv_ptr, 0, pid, NQKV, DIM, BN_QKV, BK)
        r = _inv_rms(x_ptr, DIM, eps, BK_NORM)
        _rows(wqkv_ptr, w0, x_ptr, an_ptr, r, x_ptr, q_ptr, NQKV, DIM, pid, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr,
              sc_h, sc_t, False, True, False, True, H, HKV, D, BN_QKV, BK)
    _grid_sync(bar_ptr, SYNC)
    if PHASES & 2:  # attention, (split, KV head) items spread over the programs; a = the combined output
        for item in range(pid, HKV * NSPLIT, tl.num_programs(0)):
            _attn_split(0, item % HKV, item // HKV, q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, ml_ptr, cnt_ptr, a_ptr,
                        0, sc_h, sc_t, scale, H, REP, REP_P, D, SPLIT, NSPLIT, BLOCK_T, F32, True)
    if PHASES & 4:
        w0 = _chunk(wo_ptr, 0, pid, DIM, H * D, BN_O, BK)
    _grid_sync(bar_ptr, SYNC)
    if PHASES & 4:  # x += a @ Wo.T
        _rows(wo_ptr, w0, a_ptr, an_ptr, 1.0, x_ptr, x_ptr, DIM, H * D, pid, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr,
              sc_h, sc_t, False, False, True, False, H, HKV, D, BN_O, BK)
    if PHASES & 8:
        w0 = _chunk(w13_ptr, 0, pid, 2 * FFN, DIM, BN_GU, BK)
    _grid_sync(bar_ptr, SYNC)
    if PHASES & 8:  # gu = RMSNorm(x) @ W13.T
        r = _inv_rms(x_ptr, DIM, eps, BK_NORM)
        _rows(w13_ptr, w0, x_ptr, fn_ptr, r, x_ptr, gu_ptr, 2 * FFN, DIM, pid, pos_ptr, inv_ptr, q_ptr, k_ptr,
              v_ptr, sc_h, sc_t, False, True, False, False, H, HKV, D, BN_GU, BK)
    if PHASES & 16:
        w0 = _chunk(w2_ptr, 0, pid, DIM, FFN, BN_DOWN, BK)
    _grid_sync(bar_ptr, SYNC)
    if PHASES & 16:  # x += (silu(gate) * up) @ W2.T
        _rows(w2_ptr, w0, gu_ptr, fn_ptr, 1.0, x_ptr, x_ptr, DIM, FFN, pid, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr,
              sc_h, sc_t, True, False, True, False, H, HKV, D, BN_DOWN, BK)


def supports(dim: int, ffn: int, q_dim: int, head_dim: int, config: tuple = CONFIG) -> bool:
    """Whether :func:`layer` takes these shapes: one chunk width (a power of two) dividing every
    product's rows, tiles of QKV rows that pair RoPE's rows within a head."""
    bn_qkv, _, _, _, bk = config[:5]
    return all(k % bk == 0 for k in (dim, ffn, q_dim)) and bn_qkv % 2 == 0 and head_dim % bn_qkv == 0


_BARRIERS: dict[torch.device, torch.Tensor] = {}
_GRIDS: dict[tuple, int] = {}


def _barrier(device: torch.device) -> torch.Tensor:
    """The grid barrier's counter (int64, only ever incremented, by whole grids)."""
    if device not in _BARRIERS:
        _BARRIERS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return _BARRIERS[device]


def _resident(compiled, device: torch.device) -> int:
    """How many programs of the compiled kernel one multiprocessor holds at once."""
    getattr(compiled, "_init_handles", lambda: None)()  # loads the binary: n_regs
    props = torch.cuda.get_device_properties(device)
    warps = compiled.metadata.num_warps
    regs_per_warp = -(-max(1, compiled.n_regs) * 32 // 256) * 256  # allocated 256 registers at a time
    by_regs = props.regs_per_multiprocessor // (regs_per_warp * warps)
    by_threads = props.max_threads_per_multi_processor // (32 * warps)
    shared = compiled.metadata.shared + 1024  # and the 1 KB the driver keeps a block
    by_shared = props.shared_memory_per_multiprocessor // shared
    return max(0, min(by_regs, by_threads, by_shared, 32))


def layer(x: torch.Tensor, attn_norm: torch.Tensor, wqkv: torch.Tensor, wo: torch.Tensor, ffn_norm: torch.Tensor,
          w13: torch.Tensor, w2: torch.Tensor, eps: float, pos: torch.Tensor, inv_freq: torch.Tensor,
          k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int, *,
          config: tuple = CONFIG, programs: int | None = None, phases: int = ALL_PHASES) -> torch.Tensor:
    """One decoder layer for one sequence: x (1, dim) is updated in place (and returned);
    ``k_cache``, ``v_cache`` (1, n_kv_heads, capacity, head_dim) get the key and value at
    ``pos[0]``. Weights as :class:`~driftwood.model.weights.DenseLinear` holds them (N, K), the
    dtype of x. ``programs``: the grid (default: as many as fit on the GPU at once); ``phases``:
    a subset of the phases (timing), the barriers kept."""
    dim, ffn = x.shape[1], w2.shape[1]
    H, HKV, D = n_heads, n_kv_heads, head_dim
    bn_qkv, bn_o, bn_gu, bn_down, bk, warps, per_sm = config[:7]
    assert x.shape[0] == 1 and x.is_contiguous() and supports(dim, ffn, H * D, D, config)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and k_cache.dtype == x.dtype
    cap = k_cache.shape[2]
    nsplit, split = attention_splits(cap)
    dev = x.device
    q = torch.empty(H, D, dtype=x.dtype, device=dev)
    o = torch.empty(H * nsplit, D, dtype=torch.float32, device=dev)
    ml = torch.empty(H * nsplit, 2, dtype=torch.float32, device=dev)
    a = torch.empty(1, H * D, dtype=x.dtype, device=dev)
    gu = torch.empty(1, 2 * ffn, dtype=x.dtype, device=dev)
    cnt = _counters(dev, HKV)
    args = (x, attn_norm, wqkv, wo, ffn_norm, w13, w2, eps, pos, inv_freq, q, k_cache, v_cache, k_cache.stride(1),
            k_cache.stride(2), D**-0.5, o, ml, cnt, a, gu, _barrier(dev), dim, ffn)
    kw = dict(H=H, HKV=HKV, D=D, REP=H // HKV, REP_P=max(16, triton.next_power_of_2(H // HKV)), SPLIT=split,
              NSPLIT=nsplit, BLOCK_T=64, BN_QKV=bn_qkv, BN_O=bn_o, BN_GU=bn_gu, BN_DOWN=bn_down, BK=bk,
              BK_NORM=min(1024, triton.next_power_of_2(dim)), F32=INTERPRET, num_warps=warps)
    if INTERPRET:  # no grid-wide barrier: the phases one launch each
        for phase in (QKV, ATTENTION, OUT, GATE_UP, DOWN):
            if phases & phase:
                _layer_kernel[(programs or 3,)](*args, **kw, PHASES=phase, SYNC=False)
        return x
    if COOPERATIVE:
        kw["launch_cooperative_grid"] = True
    if len(config) > 7:  # registers a thread at most (more programs a multiprocessor)
        kw["maxnreg"] = config[7]
    key = (dev, dim, ffn, H, HKV, D, nsplit, config)
    if key not in _GRIDS:
        compiled = _layer_kernel.warmup(*args, **kw, PHASES=ALL_PHASES, SYNC=True, grid=(1,))
        fit = _resident(compiled, dev)
        if fit < 1:
            raise RuntimeError("the persistent layer kernel does not fit on a multiprocessor")
        _GRIDS[key] = torch.cuda.get_device_properties(dev).multi_processor_count * min(per_sm, fit)
    grid = programs or _GRIDS[key]
    _layer_kernel[(grid,)](*args, **kw, PHASES=phases, SYNC=True)
    return x

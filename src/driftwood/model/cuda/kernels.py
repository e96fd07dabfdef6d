"""Triton kernels for the one-token decode step (see docs/gpu.md).

- :func:`gemv`: ``out = x @ W.T (+ residual)`` for a few rows of x, reading W as it is stored:
  dense (the compute dtype), Q8_0 (int8 codes) or Q4_0 (packed nibbles), with the fp16 scale of
  each 32-column group beside them. Optionally x is a gate|up pair and the kernel applies
  ``silu(gate) * up`` while loading it (the MLP's down projection), and adds a residual.
- :func:`rms_norm`: one row per program.
- :func:`rope_store`: RoPE on each row's queries and keys at its own position, the keys and
  values written into the KV cache at that position, the rotated queries returned.
- :func:`attention`: one query per sequence over its first ``pos + 1`` cached keys
  (split along the sequence, flash-decoding style, then combined).

Every kernel reads positions from device memory, so a CUDA graph captured once serves every
step. Weight layouts (:class:`~driftwood.model.cuda.quant.QuantWeight`): Q8_0 ``codes`` (N, K)
int8; Q4_0 ``codes`` (N, K / 2) uint8 where byte ``16 g + j`` of a row holds column ``32 g + j``
in its low nibble and ``32 g + j + 16`` in its high nibble (ggml's block order without the
scales); ``scales`` (N, K / 32) fp16.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DENSE, Q8_0, Q4_0 = 0, 1, 2
# Triton's CPU interpreter (TRITON_INTERPRET=1, for tests) multiplies bfloat16 dots wrongly
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """a @ b with bfloat16 operands (float32 under the interpreter), float32 result."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _nibble_f32(q):
    """A code 0..15 to ``q - 8`` in float32 without an int-to-float conversion (a quarter-rate
    instruction): the code as the low mantissa bits of 2**23, minus 2**23 + 8."""
    return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _int8_f32(q):
    """An int8 code to float32 by the same trick, shifted by 128 into 0..255."""
    return ((q.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _load_x(x_ptr, rm, mask_m, k, stride_xm, K, GLU: tl.constexpr):
    """x[rm, k] as float32 (BLOCK_M, len(k)); with GLU, silu(x[:, k]) * x[:, K + k]."""
    ptr = x_ptr + rm[:, None] * stride_xm + k[None, :]
    g = tl.load(ptr, mask=mask_m[:, None], other=0.0).to(tl.float32)
    if GLU:
        u = tl.load(ptr + K, mask=mask_m[:, None], other=0.0).to(tl.float32)
        g = g * tl.sigmoid(g) * u
    return g


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, res_ptr, out_ptr, M, N, K, stride_xm, stride_rm, stride_om,
                 FMT: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr, USE_DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    HALF: tl.constexpr = BLOCK_K // 2
    if FMT == 2:
        ri = tl.arange(0, HALF)  # byte within the k-block
        klo = (ri // 16) * 32 + (ri % 16)  # the column its low nibble holds
    else:
        rk = tl.arange(0, BLOCK_K)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif FMT == 2:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, HALF), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if FMT == 2:
            b = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + ri)[None, :], mask=mask_n[:, None],
                        other=0)
            s = tl.load(s_ptr + rn[:, None] * (K // 32) + (k0 // 32 + ri // 16)[None, :],
                        mask=mask_n[:, None], other=0.0).to(tl.float32)
            w_lo = _nibble_f32(b & 15) * s  # (BLOCK_N, HALF): (q - 8) * scale
            w_hi = _nibble_f32(b >> 4) * s
            x_lo = _load_x(x_ptr, rm, mask_m, k0 + klo, stride_xm, K, GLU)  # (BLOCK_M, HALF)
            x_hi = _load_x(x_ptr, rm, mask_m, k0 + klo + 16, stride_xm, K, GLU)
            if USE_DOT:
                acc += _dot(x_lo, tl.trans(w_lo), F32)
                acc += _dot(x_hi, tl.trans(w_hi), F32)
            else:
                acc3 += x_lo[:, None, :] * w_lo[None, :, :] + x_hi[:, None, :] * w_hi[None, :, :]
        else:
            w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=mask_n[:, None], other=0)
            if FMT == 1:
                s = tl.load(s_ptr + rn[:, None] * (K // 32) + ((k0 + rk) // 32)[None, :],
                            mask=mask_n[:, None], other=0.0).to(tl.float32)
                w = _int8_f32(w) * s
            else:
                w = w.to(tl.float32)
            x = _load_x(x_ptr, rm, mask_m, k0 + rk, stride_xm, K, GLU)  # (BLOCK_M, BLOCK_K)
            if USE_DOT:
                acc += _dot(x, tl.trans(w), F32)
            else:
                acc3 += x[:, None, :] * w[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# (format, rows <= m) -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, use_dot); see docs/gpu.md
# (the best of scripts/gpu_engine_check.py --sweep on the H100, 2026-11-22, over the 1B shapes)
CONFIGS: dict[tuple[int, int], tuple[int, int, int, int, bool]] = {
    (DENSE, 1): (1, 4, 1024, 4, False),
    (Q8_0, 1): (1, 2, 1024, 4, False),
    (Q4_0, 1): (1, 2, 1024, 4, False),
    (DENSE, 8): (16, 64, 256, 4, True),
    (Q8_0, 8): (8, 4, 256, 4, False),
    (Q4_0, 8): (8, 4, 256, 4, False),
    (DENSE, 64): (16, 64, 256, 4, True),
    (Q8_0, 64): (64, 64, 128, 4, True),
    (Q4_0, 64): (64, 64, 128, 4, True),
}


def pick_config(fmt: int, m: int) -> tuple[int, int, int, int, bool]:
    for rows in (1, 8, 64):
        if m <= rows:
            return CONFIGS[(fmt, rows)]
    return CONFIGS[(fmt, 64)]


def gemv(x: torch.Tensor, fmt: int, codes: torch.Tensor, scales: torch.Tensor | None, *,
         residual: torch.Tensor | None = None, glu: bool = False, out: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None,
         config: tuple[int, int, int, int, bool] | None = None) -> torch.Tensor:
    """x (M, K) (or (M, 2K) with ``glu``) -> (M, N) = x' @ W.T (+ residual (M, N)).

    ``out`` may be ``residual`` itself (each element is read, then written, by one program).
    """
    M = x.shape[0]
    N = codes.shape[0]
    K = x.shape[1] // 2 if glu else x.shape[1]
    assert x.stride(1) == 1 and codes.is_contiguous()
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    bm, bn, bk, warps, use_dot = config or pick_config(fmt, M)
    bk = min(bk, K)
    assert K % bk == 0 and bk % 32 == 0, (K, bk)
    res = residual if residual is not None else out
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
    _gemv_kernel[grid](x, codes, scales if scales is not None else codes, res, out, M, N, K,
                       x.stride(0), res.stride(0), out.stride(0), FMT=fmt, GLU=glu,
                       HAS_RES=residual is not None, USE_DOT=use_dot, BLOCK_M=bm, BLOCK_N=bn,
                       BLOCK_K=bk, F32=INTERPRET, num_warps=warps)
    return out


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    mask = r < D
    x = tl.load(x_ptr + row * D + r, mask=mask, other=0.0).to(tl.float32)
    h = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + r, mask=mask, other=0.0)
    # as the eager path: normalized in float32, rounded to the dtype, then scaled
    y = w.to(tl.float32) * h.to(w.dtype).to(tl.float32)
    tl.store(out_ptr + row * D + r, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, D) contiguous -> (M, D)."""
    out = torch.empty_like(x) if out is None else out
    D = x.shape[-1]
    _rms_norm_kernel[(x.shape[0],)](x, weight, out, D, eps, BLOCK=triton.next_power_of_2(D),
                                     num_warps=4 if D <= 4096 else 8)
    return out


@triton.jit
def _rope_store_kernel(qkv_ptr, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr, stride_qkv, sc_b, sc_h, sc_t,
                       H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)  # query heads, then KV heads
    i = tl.arange(0, D // 2)
    p = tl.load(pos_ptr + b)
    angle = p.to(tl.float32) * tl.load(inv_ptr + i)
    cos, sin = tl.cos(angle), tl.sin(angle)
    src = qkv_ptr + b * stride_qkv + h * D
    even = tl.load(src + 2 * i).to(tl.float32)
    odd = tl.load(src + 2 * i + 1).to(tl.float32)
    re = even * cos - odd * sin  # pairs (2i, 2i + 1) rotated by frequency i
    ro = odd * cos + even * sin
    if h < H:
        dst = q_ptr + (b * H + h) * D
        tl.store(dst + 2 * i, re.to(q_ptr.dtype.element_ty))
        tl.store(dst + 2 * i + 1, ro.to(q_ptr.dtype.element_ty))
    else:
        j = h - H
        off = b * sc_b + j * sc_h + p * sc_t
        tl.store(k_ptr + off + 2 * i, re.to(k_ptr.dtype.element_ty))
        tl.store(k_ptr + off + 2 * i + 1, ro.to(k_ptr.dtype.element_ty))
        d = tl.arange(0, D)
        v = tl.load(qkv_ptr + b * stride_qkv + (H + HKV + j) * D + d)
        tl.store(v_ptr + off + d, v)


def rope_store(qkv: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int,
               q_out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv (B, (H + 2 Hkv) D), pos (B,) -> rotated q (B, H, D); rotated k and v stored at
    ``k_cache[b, :, pos[b]]`` / ``v_cache[...]`` (k_cache, v_cache: one layer, (Bc, Hkv, cap, D))."""
    B = qkv.shape[0]
    if q_out is None:
        q_out = torch.empty(B, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    _rope_store_kernel[(B, n_heads + n_kv_heads)](
        qkv, pos, inv_freq, q_out, k_cache, v_cache, qkv.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), H=n_heads, HKV=n_kv_heads, D=head_dim, num_warps=1)
    return q_out


@triton.jit
def _attn_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, ml_ptr, sc_b, sc_h, sc_t, scale,
                       H: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr,
                       SPLIT: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_T: tl.constexpr,
                       F32: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)  # KV head
    s = tl.program_id(2)  # split of the sequence
    length = tl.load(pos_ptr + b) + 1
    start = s * SPLIT
    end = tl.minimum(start + SPLIT, length)
    rr = tl.arange(0, REP_P)
    rd = tl.arange(0, D)
    heads = g * REP + rr
    mask_r = rr < REP
    q = tl.load(q_ptr + (b * H + heads)[:, None] * D + rd[None, :], mask=mask_r[:, None], other=0.0)
    m = tl.full((REP_P,), float("-inf"), tl.float32)
    denom = tl.zeros((REP_P,), tl.float32)
    acc = tl.zeros((REP_P, D), tl.float32)
    base = b * sc_b + g * sc_h
    for t0 in range(start, end, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        mt = rt < end
        off = base + rt[:, None] * sc_t + rd[None, :]
        k = tl.load(k_ptr + off, mask=mt[:, None], other=0.0)
        v = tl.load(v_ptr + off, mask=mt[:, None], other=0.0)
        sc = _dot(q, tl.trans(k), F32) * scale  # (REP_P, BLOCK_T)
        sc = tl.where(mt[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32)
        m = m_new
    row = (b * H + heads) * NSPLIT + s
    tl.store(o_ptr + row[:, None] * D + rd[None, :], acc, mask=mask_r[:, None])
    tl.store(ml_ptr + row * 2, m, mask=mask_r)
    tl.store(ml_ptr + row * 2 + 1, denom, mask=mask_r)


@triton.jit
def _attn_combine_kernel(o_ptr, ml_ptr, out_ptr, D: tl.constexpr, NSPLIT: tl.constexpr):
    row = tl.program_id(0)  # b * H + h
    rs = tl.arange(0, NSPLIT)
    rd = tl.arange(0, D)
    m = tl.load(ml_ptr + (row * NSPLIT + rs) * 2)
    denom = tl.load(ml_ptr + (row * NSPLIT + rs) * 2 + 1)
    w = tl.exp(m - tl.max(m, axis=0))  # empty splits: exp(-inf) = 0
    o = tl.load(o_ptr + (row * NSPLIT + rs)[:, None] * D + rd[None, :])
    y = tl.sum(o * w[:, None], axis=0) / tl.sum(denom * w, axis=0)
    tl.store(out_ptr + row * D + rd, y.to(out_ptr.dtype.element_ty))


def attention_splits(capacity: int) -> tuple[int, int]:
    """(number of splits, tokens per split) for a cache of ``capacity`` positions."""
    n = min(64, triton.next_power_of_2(max(1, triton.cdiv(capacity, 256))))
    return n, triton.cdiv(triton.cdiv(capacity, n), 64) * 64


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, D) at positions pos (B,) over ``k_cache[b, :, :pos[b] + 1]`` (one layer,
    (Bc, Hkv, cap, D)) -> (B, H * D)."""
    B, H, D = q.shape
    Hkv, cap = k_cache.shape[1], k_cache.shape[2]
    rep = H // Hkv
    nsplit, split = attention_splits(cap)
    o = torch.empty(B * H * nsplit, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * H * nsplit, 2, dtype=torch.float32, device=q.device)
    _attn_split_kernel[(B, Hkv, nsplit)](
        q, k_cache, v_cache, pos, o, ml, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        D**-0.5, H=H, REP=rep, REP_P=max(16, triton.next_power_of_2(rep)), D=D, SPLIT=split,
        NSPLIT=nsplit, BLOCK_T=64, F32=INTERPRET, num_warps=4)
    if out is None:
        out = torch.empty(B, H * D, dtype=q.dtype, device=q.device)
    _attn_combine_kernel[(B * H,)](o, ml, out, D=D, NSPLIT=nsplit, num_warps=1)
    return out

"""Triton kernels for the one-token decode step (see docs/gpu.md).

- :func:`gemv`: ``out = x @ W.T (+ residual)`` for a few rows of x, reading W as it is stored:
  dense (the compute dtype), Q8_0 or Q4_0 (int32 words of codes, see
  :class:`~driftwood.model.weights.BlockLinear`), with the fp16 scale of each 32-column group
  beside them. Optionally x is a gate|up pair and the kernel applies ``silu(gate) * up`` while
  loading it (the MLP's down projection), and adds a residual. Quantized weights take, per
  row count and matrix shape (:data:`CONFIGS`): ``_qgemv_t_kernel`` (one row of x a program,
  FMA only), ``_qgemv_i8_kernel`` (one row a program, x quantized to int8 inside, ``dp4a``),
  ``_qgemm_i8_kernel`` (x quantized by :func:`quantize_x`, int8 tensor-core dots on the
  stored codes) or dequantize-then-cuBLAS. (The tile kernels ``dot``, ``dotg``, ``dotj`` and
  the 2-D ``gemv`` that earlier passes measured, slower than these everywhere, are in the git
  history: docs/gpu.md.)
- :func:`rms_norm`: one row per program; :func:`silu_mul`: ``silu(gate) * up`` where the down
  product is dequantize-then-cuBLAS (which cannot apply it while loading).
- :func:`rope_store`: RoPE on each row's queries and keys at its own position, the keys and
  values written into the KV cache at that position, the rotated queries returned.
- :func:`attention`: one query per sequence over its first ``pos + 1`` cached keys
  (split along the sequence, flash-decoding style, then combined).

Every kernel reads positions from device memory, so a CUDA graph captured once serves every
step.

Dequantizing without an int-to-float conversion: a code put into the mantissa of a float32
whose exponent is set (one shift and one ``(w & mask) | magic``, a single LOP3) reads as
``bias + q`` with bias a power of two (128 or 2048 for Q4_0 nibbles, 32768 for Q8_0 bytes,
whose sign bit is flipped first). The kernels multiply ``bias + q`` by x directly and subtract
``(bias + 8) * x`` (Q4_0) or ``(bias + 128) * x`` (Q8_0), summed over the word's positions and
independent of the row, once per word; the group's scale is applied once per word.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # grid dependency control (Triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None

from driftwood.model.cuda.policy import (  # noqa: F401 (the policy, re-exported where it was)
    CONFIGS,
    CONFIGS_BEFORE_MMA,
    CONFIGS_BEFORE_SPLITS,
    DENSE,
    MAX_ROWS,
    Q4_0,
    Q8_0,
    fuses_norm,
    fuses_rope,
    pick_config,
    shape_class,
)

# Triton's CPU interpreter (TRITON_INTERPRET=1, for tests) multiplies bfloat16 dots wrongly
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _pdl_supported() -> bool:
    """Triton can launch with PDL and the GPU has griddepcontrol (compute capability 9.0+)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        from driftwood.model.cuda.nvrtc import pdl_supported

        return ("launch_pdl" in CUDAOptions.__dataclass_fields__ and gdc_wait is not None and not INTERPRET
                and torch.cuda.is_available() and pdl_supported(torch.cuda.current_device()))
    except Exception:  # no NVIDIA backend
        return False


PDL_SUPPORTED = _pdl_supported()


def _launch(pdl: bool) -> dict:
    """Launch options for programmatic dependent launch (Hopper): the kernel may start before the
    previous one ends; every kernel launched so calls ``gdc_wait`` before it reads anything the
    previous kernels wrote and before it writes."""
    return {"launch_pdl": True} if pdl and PDL_SUPPORTED else {}


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """Let the next kernel launch (its programs start as ours leave the SMs)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """Wait for the previous kernel (and so every earlier one) to finish, its writes visible."""
    if PDL:
        gdc_wait()


@triton.jit
def _rope_store_epilogue(y, rn, mask_n, m, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr, sc_b, sc_h, sc_t,
                         H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The QKV product's rows rn (BLOCK_N even, the block starting at an even row) of sequence m
    as :func:`rope_store` treats them: rounded to the cache dtype, the query and key pairs
    (2i, 2i + 1) rotated at position pos[m], queries to q (m, H, D), keys and values into the
    caches at pos[m]."""
    dt = q_ptr.dtype.element_ty
    p = tl.load(pos_ptr + m)
    y = y.to(dt).to(tl.float32)
    e, o = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
    rp = tl.reshape(rn, (BLOCK_N // 2, 2))
    ne, _ = tl.split(rp)  # the pair's even row
    i = (ne % D) // 2
    angle = p.to(tl.float32) * tl.load(inv_ptr + i)
    cos, sin = tl.cos(angle), tl.sin(angle)
    rot = ne < (H + HKV) * D  # queries and keys; values stay as they are
    re = tl.where(rot, e * cos - o * sin, e)
    ro = tl.where(rot, o * cos + e * sin, o)
    y = tl.reshape(tl.join(re, ro), (BLOCK_N,))
    head = rn // D
    d = rn % D
    kv = tl.where(head >= H + HKV, head - H - HKV, head - H)
    off = m * sc_b + kv * sc_h + p * sc_t + d
    ptr = tl.where(head < H, q_ptr + m * (H * D) + rn, tl.where(head < H + HKV, k_ptr + off, v_ptr + off))
    tl.store(ptr, y.to(dt), mask=mask_n)


@triton.jit
def _row_epilogue(y, rn, mask_n, m, res_ptr, stride_rm, out_ptr, stride_om, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr,
                  sc_b, sc_h, sc_t, HAS_RES: tl.constexpr, ROPE: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr,
                  D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A one-row product's outputs rn (float32 y) of row m: the residual added, then stored, or
    with ROPE put where :func:`rope_store` puts them (:func:`_rope_store_epilogue`)."""
    if HAS_RES:
        y += tl.load(res_ptr + m * stride_rm + rn, mask=mask_n, other=0.0).to(tl.float32)
    if ROPE:
        _rope_store_epilogue(y, rn, mask_n, m, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr, sc_b, sc_h, sc_t,
                             H, HKV, D, BLOCK_N)
    else:
        tl.store(out_ptr + m * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """a @ b with bfloat16 operands (float32 under the interpreter), float32 result."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _silu_gate(g, u):
    """silu(g) * u in float32: every GLU of the step (the products' loaders, :func:`silu_mul`)."""
    return g * tl.sigmoid(g) * u


@triton.jit
def _load_x(x_ptr, rm, mask_m, k, stride_xm, K, GLU: tl.constexpr):
    """x[rm, k] as float32 (BLOCK_M, len(k)); with GLU, silu(x[:, k]) * x[:, K + k]."""
    ptr = x_ptr + rm[:, None] * stride_xm + k[None, :]
    g = tl.load(ptr, mask=mask_m[:, None], other=0.0).to(tl.float32)
    if GLU:
        u = tl.load(ptr + K, mask=mask_m[:, None], other=0.0).to(tl.float32)
        g = _silu_gate(g, u)
    return g


@triton.jit
def _load_x1(x_ptr, k, K, GLU: tl.constexpr, NORM: tl.constexpr, nw_ptr, r, mask):
    """x[k] of one row as float32; with GLU, silu(x[k]) * x[K + k]; with NORM, RMSNorm's
    output ``nw[k] * x[k] * r`` rounded as :func:`rms_norm` rounds it. 0 where not mask."""
    g = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)
    if GLU:
        u = tl.load(x_ptr + K + k, mask=mask, other=0.0).to(tl.float32)
        g = _silu_gate(g, u)
    if NORM:
        dt = x_ptr.dtype.element_ty
        nw = tl.load(nw_ptr + k, mask=mask, other=0.0).to(tl.float32)
        g = (nw * (g * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    return g


@triton.jit
def _inv_rms(x_ptr, K, eps, BLOCK: tl.constexpr):
    """1 / sqrt(mean(x[:K]^2) + eps) of one row."""
    ss = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        ss += v * v
    return tl.rsqrt(tl.sum(ss, axis=0) / K + eps)


@triton.jit
def _slot(w, P: tl.constexpr, FMT: tl.constexpr, ma, mb, ca, cb):
    """Position P of each int32 word as float32 ``bias + code`` (see the module doc; Q8_0 words
    already have their sign bits flipped). The masks and magic exponents come in as run-time
    values (``ma, mb, ca, cb``: :data:`SLOT_CONSTANTS`) so that ``(t & m) | c`` stays one LOP3
    (with both as immediates ptxas emits two: a LOP3 takes one immediate)."""
    if FMT == 2:  # nibble P (bits 4P..4P+3) to bits 16..19 (mb, cb: bias 128) or 12..15 (ma, ca: 2048)
        if P == 0:
            t = (w << 16) & mb | cb
        elif P == 1:
            t = (w << 8) & ma | ca
        elif P == 2:
            t = (w << 8) & mb | cb
        elif P == 3:
            t = w & ma | ca
        elif P == 4:
            t = w & mb | cb
        elif P == 5:
            t = (w >> 8) & ma | ca
        elif P == 6:
            t = (w >> 8) & mb | cb
        else:
            t = (w >> 12) & mb | cb
    else:  # byte P to bits 8..15 (ma, ca: bias 32768)
        if P == 0:
            t = (w << 8) & ma | ca
        elif P == 1:
            t = w & ma | ca
        elif P == 2:
            t = (w >> 8) & ma | ca
        else:
            t = (w >> 16) & ma | ca
    return t.to(tl.float32, bitcast=True)


@triton.jit
def _slot_offset(P: tl.constexpr, FMT: tl.constexpr):
    """What _slot's value exceeds the signed code by: bias + 8 (Q4_0), bias + 128 (Q8_0)."""
    if FMT == 2:
        if P == 1 or P == 3 or P == 5:
            return 2056.0
        return 136.0
    return 32896.0


@triton.jit
def _joined_positions(w, s, FMT: tl.constexpr, ma, mb, ca, cb):
    """Every code position of the int32 words ``w`` dequantized (as :func:`_slot` reads them,
    times the scales ``s``, broadcast against ``w``) and joined into new trailing dimensions:
    ``[..., i, j, l]`` = position 4i + 2j + l (Q4_0), ``[..., i, j]`` = position 2i + j (Q8_0),
    so that flattening them gives the positions in order."""
    d0 = (_slot(w, 0, FMT, ma, mb, ca, cb) - _slot_offset(0, FMT)) * s
    d1 = (_slot(w, 1, FMT, ma, mb, ca, cb) - _slot_offset(1, FMT)) * s
    d2 = (_slot(w, 2, FMT, ma, mb, ca, cb) - _slot_offset(2, FMT)) * s
    d3 = (_slot(w, 3, FMT, ma, mb, ca, cb) - _slot_offset(3, FMT)) * s
    if FMT == 2:
        d4 = (_slot(w, 4, FMT, ma, mb, ca, cb) - _slot_offset(4, FMT)) * s
        d5 = (_slot(w, 5, FMT, ma, mb, ca, cb) - _slot_offset(5, FMT)) * s
        d6 = (_slot(w, 6, FMT, ma, mb, ca, cb) - _slot_offset(6, FMT)) * s
        d7 = (_slot(w, 7, FMT, ma, mb, ca, cb) - _slot_offset(7, FMT)) * s
        t = tl.join(tl.join(tl.join(d0, d4), tl.join(d2, d6)), tl.join(tl.join(d1, d5), tl.join(d3, d7)))
    else:  # one return: Triton type-checks every return, the skipped branch's too
        t = tl.join(tl.join(d0, d2), tl.join(d1, d3))
    return t


@triton.jit
def _qgemv_t_kernel(x_ptr, w_ptr, s_ptr, res_ptr, out_ptr, nw_ptr, eps, ma, mb, ca, cb, N, K: tl.constexpr, stride_xm,
                    stride_rm, stride_om, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr, sc_b, sc_h, sc_t,
                    FMT: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr,
                    NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROPE: tl.constexpr,
                    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    """As _qgemv_kernel, with the whole row in one block (BLOCK_K = next power of two >= K) and
    the tile laid out (words, rows): with num_warps chosen so that the warps span the words
    exactly, each thread holds the same words of all BLOCK_N rows, and the activations, their
    conversion and the offset sums are computed once for BLOCK_N rows."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    NS: tl.constexpr = 8 if FMT == 2 else 4
    WG: tl.constexpr = 32 // NS
    BW: tl.constexpr = BLOCK_K // NS
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    rn = tl.where(mask_n, rn, 0)
    KW = K // NS
    ri = tl.arange(0, BW)
    mask_w = (ri < KW) if BLOCK_K != K else (ri < BW)  # all true when K == BLOCK_K (folded)
    cbase = (ri // WG) * 32 + ri % WG
    xrow = x_ptr + m * stride_xm
    _pdl_start(PDL)
    # the weights first: with PDL their loads overlap the previous kernel's tail
    w = tl.load(w_ptr + rn[None, :] * KW + ri[:, None], mask=mask_w[:, None], other=0)  # (BW, BLOCK_N)
    s = tl.load(s_ptr + rn[None, :] * (K // 32) + (ri // WG)[:, None], mask=mask_w[:, None],
                other=0.0).to(tl.float32)
    _pdl_wait(PDL)
    r = _inv_rms(xrow, K, eps, BLOCK_K) if NORM else 1.0
    if FMT == 1:
        w = w ^ -0x7F7F7F80
    part = tl.zeros((BW, BLOCK_N), dtype=tl.float32)
    corr = tl.zeros((BW,), dtype=tl.float32)
    for p in tl.static_range(NS):
        xp = _load_x1(xrow, cbase + p * WG, K, GLU, NORM, nw_ptr, r, mask_w)  # (BW,)
        part += _slot(w, p, FMT, ma, mb, ca, cb) * xp[:, None]
        corr += xp * _slot_offset(p, FMT)
    y = tl.sum(s * (part - corr[:, None]), axis=0)  # (BLOCK_N,)
    _row_epilogue(y, rn, mask_n, m, res_ptr, stride_rm, out_ptr, stride_om, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr,
                  sc_b, sc_h, sc_t, HAS_RES, ROPE, H, HKV, D, BLOCK_N)


# --- int8 activations: dp4a for one row, tensor-core int8 dots for more ---
#
# x is quantized per 32-column group to int8 (scale d = max|x| / 127, round to nearest) and the
# group's products summed in int32 against the weights' codes; the group's float sum is then
# d_w * d * isum, with Q4_0's unsigned nibbles made signed first (q - 8: the int8 dots) or their
# offset subtracted after, isum - 8 * sum(q) (dp4a). The same arithmetic as llama.cpp's Q8_1
# activations (its MMVQ and MMQ kernels).


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _dp4a(a, b, c, SIGNED_A: tl.constexpr, EMULATE: tl.constexpr):
    """c + the sum of the products of the four bytes of a (signed or not) and b (signed)."""
    if EMULATE:  # Triton's CPU interpreter has no inline assembly
        for i in tl.static_range(4):
            bi = (b << (24 - 8 * i)) >> 24
            ai = ((a << (24 - 8 * i)) >> 24) if SIGNED_A else ((a >> (8 * i)) & 0xFF)
            c += ai * bi
        return c
    if SIGNED_A:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _quantize_groups(v, DIMS: tl.constexpr):
    """(groups, 32) or (groups, positions, words) float32 -> (int32 codes in -127..127, the group
    scales (groups,)): each group by its largest magnitude, rounded to nearest even (the
    1.5 * 2^23 addend, no float-to-int conversion)."""
    if DIMS == 3:
        a = tl.max(tl.max(tl.abs(v), axis=2), axis=1)
        t = v * tl.where(a > 0, 127.0 / a, 0.0)[:, None, None]
    else:
        a = tl.max(tl.abs(v), axis=1)
        t = v * tl.where(a > 0, 127.0 / a, 0.0)[:, None]
    q = (t + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    return q, a / 127.0


@triton.jit
def _qgemv_i8_kernel(x_ptr, w_ptr, s_ptr, res_ptr, out_ptr, nw_ptr, eps, N, K: tl.constexpr, stride_xm,
                     stride_rm, stride_om, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr, sc_b, sc_h, sc_t,
                     FMT: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, ROPE: tl.constexpr, H: tl.constexpr,
                     HKV: tl.constexpr, D: tl.constexpr, EMULATE: tl.constexpr):
    """One row of x against BLOCK_N rows of a Q4_0 / Q8_0 matrix, the whole row in one block as
    in _qgemv_t_kernel, with x quantized to int8 per group inside the program and each word's
    codes multiplied by four activations at a time (dp4a): per 32 weights of a row ~20 integer
    instructions (Q4_0) where _qgemv_t_kernel needs ~130."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    NS: tl.constexpr = 8 if FMT == 2 else 4  # codes per word
    WG: tl.constexpr = 32 // NS  # words per group
    KG: tl.constexpr = K // 32
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    rn = tl.where(mask_n, rn, 0)
    gi = tl.arange(0, BLOCK_G)
    ji = tl.arange(0, WG)
    pi = tl.arange(0, NS)
    mask_g = gi < KG
    word = gi[:, None] * WG + ji[None, :]  # (BLOCK_G, WG)
    w = tl.load(w_ptr + rn[None, None, :] * (K // NS) + word[:, :, None], mask=mask_g[:, None, None], other=0)
    s = tl.load(s_ptr + rn[None, :] * KG + gi[:, None], mask=mask_g[:, None], other=0.0).to(tl.float32)
    xrow = x_ptr + m * stride_xm
    r = _inv_rms(xrow, K, eps, BLOCK_G * 32) if NORM else 1.0
    # the row by (group, code position, word): column 32 g + p WG + j, as the words hold them
    col = gi[:, None, None] * 32 + pi[None, :, None] * WG + ji[None, None, :]
    xq, d = _quantize_groups(_load_x1(xrow, col, K, GLU, NORM, nw_ptr, r, mask_g[:, None, None]), 3)
    if FMT == 2:  # nibbles 2b and 2b + 1 of a word are byte b's low and high halves
        lo = (pi % 2 == 0)[None, :, None]
        qb = (xq & 0xFF) << ((pi // 2) * 8)[None, :, None]
        xa = tl.reduce(tl.where(lo, qb, 0), 1, _bit_or)  # (BLOCK_G, WG): x of the low nibbles
        xb = tl.reduce(tl.where(lo, 0, qb), 1, _bit_or)
        acc = _dp4a(w & 0x0F0F0F0F, tl.broadcast_to(xa[:, :, None], w.shape), tl.zeros_like(w), False, EMULATE)
        acc = _dp4a((w >> 4) & 0x0F0F0F0F, tl.broadcast_to(xb[:, :, None], w.shape), acc, False, EMULATE)
        isum = tl.sum(acc, axis=1) - (8 * tl.sum(tl.sum(xq, axis=2), axis=1))[:, None]  # (BLOCK_G, BLOCK_N)
    else:
        xa = tl.reduce((xq & 0xFF) << (pi * 8)[None, :, None], 1, _bit_or)
        acc = _dp4a(w, tl.broadcast_to(xa[:, :, None], w.shape), tl.zeros_like(w), True, EMULATE)
        isum = tl.sum(acc, axis=1)
    y = tl.sum(isum.to(tl.float32) * (s * d[:, None]), axis=0)  # (BLOCK_N,)
    _row_epilogue(y, rn, mask_n, m, res_ptr, stride_rm, out_ptr, stride_om, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr,
                  sc_b, sc_h, sc_t, HAS_RES, ROPE, H, HKV, D, BLOCK_N)


@triton.jit
def _group_columns(FMT: tl.constexpr):
    """The column of a group that each of its 32 int8 activations pairs with in the int8 dots:
    Q8_0, the code in byte i of the group's words (byte b of word w: column 8 b + w); Q4_0, the low
    (even i) or high (odd i) nibble of byte i // 2 (byte b of word w: nibbles 2b and 2b + 1,
    columns 8 b + w and 8 b + 4 + w)."""
    i = tl.arange(0, 32)
    if FMT == 2:
        j = i // 2
        return 8 * (j % 4) + j // 4 + 4 * (i % 2)
    return 8 * (i % 4) + i // 4


@triton.jit
def _quantize_x_kernel(x_ptr, nw_ptr, xq_ptr, xd_ptr, K, stride_xm, eps, FMT: tl.constexpr, GLU: tl.constexpr,
                       NORM: tl.constexpr, BLOCK_G: tl.constexpr):
    """One row of x (with GLU silu(gate) * up, with NORM through RMSNorm) to int8 per 32-column
    group in the order of :func:`_group_columns`, and the group scales (float32)."""
    m = tl.program_id(0)
    gi = tl.arange(0, BLOCK_G)
    KG = K // 32
    mask = gi < KG
    xrow = x_ptr + m * stride_xm
    r = _inv_rms(xrow, K, eps, BLOCK_G * 32) if NORM else 1.0
    col = gi[:, None] * 32 + _group_columns(FMT)[None, :]
    xq, d = _quantize_groups(_load_x1(xrow, col, K, GLU, NORM, nw_ptr, r, mask[:, None]), 2)
    i = tl.arange(0, 32)
    tl.store(xq_ptr + m * K + gi[:, None] * 32 + i[None, :], xq.to(tl.int8), mask=mask[:, None])
    tl.store(xd_ptr + m * KG + gi, d, mask=mask)


@triton.jit
def _i2f(c):
    """int32 (|c| < 2^22) to float32 without the quarter-rate conversion: an add, a bitcast, a subtract."""
    return (c + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _dot_i8(a, b, EMULATE: tl.constexpr):
    """a (M, K) @ b (N, K).T of int8 in int32 (float32 under the interpreter, exact at these sizes)."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32))).to(tl.int32)
    return tl.dot(a, tl.trans(b), out_dtype=tl.int32)


@triton.jit
def _qgemm_i8_kernel(xq_ptr, xd_ptr, w_ptr, s_ptr, res_ptr, out_ptr, M, N, K, stride_rm, stride_om,
                     FMT: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    """BLOCK_M rows of int8 x (:func:`_quantize_x_kernel`) against BLOCK_N rows of a Q4_0 / Q8_0
    matrix read as stored, one int8 tensor-core dot (K = 32) per group, each group's int32 sums
    scaled by x's and the weights' group scales into a float32 accumulator. Q8_0's codes are
    int8 already; a Q4_0 group's 16 bytes are split into low and high nibbles, each made signed
    (q - 8), and joined into one (BLOCK_N, 32) tile (int8 dots need K >= 32). With SPLIT > 1 the
    groups are split among SPLIT programs (program_id 2), each writing float32 partial sums to
    out (SPLIT, M, N) for :func:`_split_sum_kernel`."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rml = tl.where(rm < M, rm, 0)
    rnl = tl.where(rn < N, rn, 0)
    KG = K // 32
    i = tl.arange(0, 32)
    if FMT == 2:
        b_off = rnl[:, None] * (K // 2) + tl.arange(0, 16)[None, :]
    else:
        b_off = rnl[:, None] * K + i[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    per = tl.cdiv(KG, SPLIT)
    for g in range(pid_s * per, tl.minimum(KG, pid_s * per + per)):
        if FMT == 2:
            t = tl.load(w_ptr + b_off + g * 16)  # (BLOCK_N, 16) uint8
            b = tl.reshape(tl.join((t & 0xF).to(tl.int8) - 8, (t >> 4).to(tl.int8) - 8), (BLOCK_N, 32))
        else:
            b = tl.load(w_ptr + b_off + g * 32)  # (BLOCK_N, 32) int8
        c = _i2f(_dot_i8(tl.load(xq_ptr + rml[:, None] * K + g * 32 + i[None, :]), b, EMULATE))
        dx = tl.load(xd_ptr + rml * KG + g)
        sw = tl.load(s_ptr + rnl * KG + g).to(tl.float32)
        acc += (dx[:, None] * sw[None, :]) * c
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT > 1:
        tl.store(out_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :], acc, mask=mask)
    else:
        if HAS_RES:
            acc += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_sum_kernel(ws_ptr, res_ptr, out_ptr, M, N, stride_rm, stride_om, SPLIT: tl.constexpr,
                      HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """out = the SPLIT float32 partial sums (SPLIT, M, N) added (+ residual), one row a program."""
    m = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + s * M * N + m * N + n, mask=mask, other=0.0)
    if HAS_RES:
        acc += tl.load(res_ptr + m * stride_rm + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_x(x: torch.Tensor, fmt: int, *, glu: bool = False,
               norm: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) (or (M, 2K) with ``glu``; through RMSNorm with ``norm``) -> (int8 (M, K) in the
    order of :func:`_group_columns`, the group scales (M, K / 32) float32)."""
    M = x.shape[0]
    K = x.shape[1] // 2 if glu else x.shape[1]
    assert x.stride(1) == 1 and K % 32 == 0
    xq = torch.empty(M, K, dtype=torch.int8, device=x.device)
    xd = torch.empty(M, K // 32, dtype=torch.float32, device=x.device)
    nw, eps = norm if norm is not None else (x, 0.0)
    bg = triton.next_power_of_2(K // 32)
    _quantize_x_kernel[(M,)](x, nw, xq, xd, K, x.stride(0), eps, FMT=fmt, GLU=glu, NORM=norm is not None,
                             BLOCK_G=bg, num_warps=max(1, min(8, bg // 8)))
    return xq, xd


def _gemm_i8(x, fmt, codes, scales, residual, glu, norm, out, cfg):
    """x' @ W.T (+ residual) through :func:`quantize_x` and ``_qgemm_i8_kernel`` (configuration
    ("i8", BLOCK_M, BLOCK_N, num_warps, num_stages (0: Triton's default)[, split])); split > 1
    adds :func:`_split_sum_kernel`."""
    _, bm, bn, warps, stages, *rest = cfg
    split = rest[0] if rest else 1
    M, N = x.shape[0], codes.shape[0]
    K = scales.shape[1] * 32
    xq, xd = quantize_x(x, fmt, glu=glu, norm=norm)
    w8 = codes.view(torch.uint8 if fmt == Q4_0 else torch.int8)
    res = residual if residual is not None else out
    dst = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    _qgemm_i8_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm), split)](
        xq, xd, w8, scales, res, dst, M, N, K, res.stride(0), out.stride(0), FMT=fmt,
        HAS_RES=residual is not None, BLOCK_M=bm, BLOCK_N=bn, SPLIT=split, EMULATE=INTERPRET, num_warps=warps,
        **({"num_stages": stages} if stages else {}))
    if split > 1:
        _split_sum_kernel[(M, triton.cdiv(N, 1024))](dst, res, out, M, N, res.stride(0), out.stride(0), SPLIT=split,
                                                    HAS_RES=residual is not None, BLOCK=1024, num_warps=4)
    return out


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, res_ptr, out_ptr, nw_ptr, eps, M, N, K, stride_xm, stride_rm,
                 stride_om, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr, sc_b, sc_h, sc_t,
                 GLU: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
                 USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, F32: tl.constexpr, ROPE: tl.constexpr,
                 H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    """Dense weights (the compute dtype); NORM (one row of x a program): RMSNorm first; ROPE
    (one row of x a program): the QKV product's epilogue of :func:`rope_store`. The first
    k-block of weights is loaded ahead (before the PDL wait), each next one during the current."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    rk = tl.arange(0, BLOCK_K)
    _pdl_start(PDL)
    w_next = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=mask_n[:, None], other=0)
    _pdl_wait(PDL)
    r = _inv_rms(x_ptr + pid_m * stride_xm, K, eps, BLOCK_K) if NORM else 1.0
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = w_next.to(tl.float32)
        w_next = tl.load(w_ptr + rn[:, None] * K + (k0 + BLOCK_K + rk)[None, :],
                         mask=mask_n[:, None] & (k0 + BLOCK_K + rk < K)[None, :], other=0)
        if NORM:  # BLOCK_M == 1
            x = _load_x1(x_ptr + pid_m * stride_xm, k0 + rk, K, GLU, NORM, nw_ptr, r, rk < BLOCK_K)[None, :]
        else:
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
    if ROPE:  # BLOCK_M == 1
        _rope_store_epilogue(tl.reshape(acc, (BLOCK_N,)), rn, mask_n, pid_m, pos_ptr, inv_ptr, q_ptr, k_ptr,
                             v_ptr, sc_b, sc_h, sc_t, H, HKV, D, BLOCK_N)
    else:
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# (ma, mb, ca, cb) of _slot per format: masks and magic exponents (2048.0, 128.0; 32768.0)
SLOT_CONSTANTS = {Q4_0: (0xF000, 0xF0000, 0x45000000, 0x43000000), Q8_0: (0xFF00, 0, 0x47000000, 0)}


def gemv(x: torch.Tensor, fmt: int, codes: torch.Tensor, scales: torch.Tensor | None, *,
         residual: torch.Tensor | None = None, glu: bool = False, out: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, config: tuple | None = None,
         norm: tuple[torch.Tensor, float] | None = None, rope: tuple | None = None,
         pdl: bool = False) -> torch.Tensor:
    """x (M, K) (or (M, 2K) with ``glu``) -> (M, N) = x' @ W.T (+ residual (M, N)).

    ``out`` may be ``residual`` itself (each element is read, then written, by one program).
    ``norm`` (weight (K,), eps): x' = rms_norm(x) computed inside (only where :func:`fuses_norm`).
    ``rope`` (pos, inv_freq, k_cache, v_cache, n_heads, n_kv_heads, head_dim): W is the QKV
    matrix and the product goes where :func:`rope_store` puts it (only where :func:`fuses_rope`);
    returns the rotated queries (M, H, D). ``pdl``: programmatic dependent launch (gemvT and the
    dense one-row kernel).
    """
    M = x.shape[0]
    N = codes.shape[0]
    K = x.shape[1] // 2 if glu else x.shape[1]
    assert x.stride(1) == 1 and codes.is_contiguous()
    cfg = config or pick_config(fmt, M, N, K)
    if cfg[0] == "mm":
        assert norm is None and rope is None and fmt != DENSE
        return _dequant_mm(x, fmt, codes, scales, residual, glu, out, out_dtype, cfg[1])
    if rope is not None:
        pos, inv_freq, kc, vc, H, HKV, D = rope
        assert fuses_rope(fmt, M, N, K, cfg, D) and N == (H + 2 * HKV) * D and residual is None
        assert kc.stride() == vc.stride() and kc.stride(3) == 1 and kc.dtype == x.dtype
        out = torch.empty(M, H, D, dtype=x.dtype, device=x.device)  # the rotated queries
        rope_args = (pos, inv_freq, out, kc, vc, kc.stride(0), kc.stride(1), kc.stride(2))
        rope_kw = dict(ROPE=True, H=H, HKV=HKV, D=D)
    else:
        rope_kw = dict(ROPE=False, H=1, HKV=1, D=2)
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    if rope is None:
        rope_args = (x, x, out, out, out, 0, 0, 0)
    res = residual if residual is not None else out
    common = dict(GLU=glu, HAS_RES=residual is not None, NORM=norm is not None)
    nw, eps = norm if norm is not None else (x, 0.0)
    assert norm is None or (not glu and fuses_norm(fmt, M, config=cfg)), "norm fuses into one-row programs"
    if fmt == DENSE:
        bm, bn, bk, warps, use_dot = cfg
        bk = min(bk, K)
        assert K % bk == 0, (K, bk)
        grid = (triton.cdiv(N, bn), triton.cdiv(M, bm))
        _gemv_kernel[grid](x, codes, res, out, nw, eps, M, N, K, x.stride(0), res.stride(0), out.stride(0),
                           *rope_args, USE_DOT=use_dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, F32=INTERPRET,
                           num_warps=warps, PDL=pdl and PDL_SUPPORTED, **common, **rope_kw, **_launch(pdl))
        return out
    assert codes.dtype == torch.int32 and codes.shape[1] * (8 if fmt == Q4_0 else 4) == K, (codes.shape, K)
    kind = cfg[0]
    if kind == "mma":
        from driftwood.model.cuda import mma

        if mma.supports(x, fmt, codes, glu):
            return mma.gemm(x, fmt, codes, scales, config=(cfg[1], cfg[2], *cfg[4:]), residual=residual, glu=glu,
                            norm=norm, out=out, pdl=cfg[3] if len(cfg) > 3 else True)
        if norm is not None:  # no NVRTC here, or a shape it does not take: dequantize + cuBLAS
            x = rms_norm(x, *norm)
        return _dequant_mm(x, fmt, codes, scales, residual, glu, out, out_dtype, 0)
    if kind == "i8":
        _gemm_i8(x, fmt, codes, scales, residual, glu, norm, out, cfg)
    elif kind == "dp4a":
        _, bn, wpt = cfg
        bg = triton.next_power_of_2(K // 32)
        warps = max(1, min(16, bg * 32 // (8 if fmt == Q4_0 else 4) // (32 * wpt)))
        _qgemv_i8_kernel[(triton.cdiv(N, bn), M)](
            x, codes, scales, res, out, nw, eps, N, K, x.stride(0), res.stride(0), out.stride(0), *rope_args,
            FMT=fmt, BLOCK_N=bn, BLOCK_G=bg, EMULATE=INTERPRET, num_warps=warps, **common, **rope_kw)
    elif kind == "gemvT":
        _, bn, wpt = cfg
        bk = triton.next_power_of_2(K)
        warps = max(1, min(16, bk // (8 if fmt == Q4_0 else 4) // (32 * wpt)))
        _qgemv_t_kernel[(triton.cdiv(N, bn), M)](
            x, codes, scales, res, out, nw, eps, *SLOT_CONSTANTS[fmt], N, K, x.stride(0), res.stride(0), out.stride(0),
            *rope_args, FMT=fmt, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, PDL=pdl and PDL_SUPPORTED, **common,
            **rope_kw, **_launch(pdl))
    else:
        raise ValueError(f"unknown kernel configuration {cfg}")
    return out


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, ma, mb, ca, cb, FMT: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_G: tl.constexpr):
    """Rows of a Q4_0 / Q8_0 matrix to the output dtype, (N, K) row-major, a 32-column group at
    a time: the group's words in one vector load (4 or 8 int32), each code position of them
    dequantized as :func:`_slot` reads it, the positions joined and permuted into column order
    (column p * WG + w of a group is position p of its word w) so that the group's 32 values are
    one contiguous run of a row."""
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    NS: tl.constexpr = 8 if FMT == 2 else 4  # codes per word
    WG: tl.constexpr = 32 // NS  # words per group
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rr = tl.where(rr < N, rr, 0)  # rows past N read row 0, never stored
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    wi = tl.arange(0, WG)
    w = tl.load(w_ptr + rr[:, None, None] * (K // NS) + (g * WG)[None, :, None] + wi[None, None, :])
    s = tl.load(s_ptr + rr[:, None] * (K // 32) + g[None, :]).to(tl.float32)[:, :, None]
    if FMT == 1:
        w = w ^ -0x7F7F7F80
    t = tl.reshape(_joined_positions(w, s, FMT, ma, mb, ca, cb), (BLOCK_R, BLOCK_G, WG, NS))
    t = tl.reshape(tl.permute(t, (0, 1, 3, 2)), (BLOCK_R, BLOCK_G * 32))
    cols = pid_g * (BLOCK_G * 32) + tl.arange(0, BLOCK_G * 32)
    mask = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R) < N)[:, None]
    tl.store(out_ptr + rr[:, None] * K + cols[None, :], t.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(fmt: int, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
               config: tuple | None = None) -> torch.Tensor:
    """A Q4_0 / Q8_0 matrix (codes, scales as :class:`~driftwood.model.weights.BlockLinear`
    holds them) into ``out`` (N, K) contiguous, any float dtype (``config``: :data:`DEQUANT`'s form)."""
    N, K = out.shape
    assert out.is_contiguous() and codes.shape[0] == N and K % 32 == 0
    br, bk, warps = config or DEQUANT
    bk = min(bk, K & -K)  # the largest power of two dividing K, at most the config's
    _dequant_kernel[(triton.cdiv(N, br), K // bk)](codes, scales, out, N, K, *SLOT_CONSTANTS[fmt], FMT=fmt,
                                                  BLOCK_R=br, BLOCK_G=bk // 32, num_warps=warps)
    return out


# the dequantizer's (rows, columns, num_warps) per program: the best of scripts/gpu/dequant_sweep.py
# on the H100 over the 1B shapes (2026-11-22: 2.3-2.8 TB/s, 87 us a layer + head/16 for Q4_0 against
# 194 for the previous kernel, which gathered each element's word and stored column by column)
DEQUANT = (8, 512, 4)


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A bfloat16 buffer reused by every dequantize-then-cuBLAS product on the device (the
    products run in stream order; CUDA graphs capture it at the size their warm-up left)."""
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[device] = torch.empty(numel, dtype=torch.bfloat16, device=device)
    return buf


def _dequant_mm(x, fmt, codes, scales, residual, glu, out, out_dtype, chunk_mb):
    """x' @ W.T (+ residual) with W dequantized to bfloat16 in chunks of rows (``chunk_mb`` MB
    each, 0: the whole matrix) into a reused scratch buffer, each chunk then through cuBLAS;
    chunks small enough stay in L2 between the two."""
    K = scales.shape[1] * 32
    N = codes.shape[0]
    M = x.shape[0]
    if glu:
        x = silu_mul(x)
    rows = N if chunk_mb == 0 else max(16, min(N, int(chunk_mb * (1 << 20)) // (2 * K)))
    buf = _scratch(rows * K, x.device)
    direct = out is None or out.dtype == x.dtype
    y = out if direct and out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        w = dequantize(fmt, codes[n0:n1], scales[n0:n1], buf[: (n1 - n0) * K].view(n1 - n0, K))
        if residual is not None:
            if residual.data_ptr() != y.data_ptr():
                y[:, n0:n1].copy_(residual[:, n0:n1])
            y[:, n0:n1].addmm_(x, w.t())
        else:
            torch.mm(x, w.t(), out=y[:, n0:n1])
    if out is None:
        return y if out_dtype is None or out_dtype == y.dtype else y.to(out_dtype)
    if not direct:
        out.copy_(y)
    return out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, K, stride_xm, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = k < K
    g = tl.load(x_ptr + row * stride_xm + k, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_xm + K + k, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * K + k, _silu_gate(g, u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """gate|up (M, 2K) -> silu(gate) * up (M, K) in one kernel, computed in float32 as the
    products' GLU loaders compute it (torch's ``silu(g) * u`` takes two kernels and rounds twice)."""
    M, K = x.shape[0], x.shape[1] // 2
    assert x.stride(1) == 1
    out = torch.empty(M, K, dtype=x.dtype, device=x.device)
    _silu_mul_kernel[(M, triton.cdiv(K, 1024))](x, out, K, x.stride(0), BLOCK=1024, num_warps=4)
    return out


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    mask = r < D
    _pdl_start(PDL)
    _pdl_wait(PDL)
    x = tl.load(x_ptr + row * D + r, mask=mask, other=0.0).to(tl.float32)
    h = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + r, mask=mask, other=0.0)
    # as the eager path: normalized in float32, rounded to the dtype, then scaled
    y = w.to(tl.float32) * h.to(w.dtype).to(tl.float32)
    tl.store(out_ptr + row * D + r, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None,
             pdl: bool = False) -> torch.Tensor:
    """x (M, D) contiguous -> (M, D)."""
    out = torch.empty_like(x) if out is None else out
    D = x.shape[-1]
    _rms_norm_kernel[(x.shape[0],)](x, weight, out, D, eps, BLOCK=triton.next_power_of_2(D),
                                     num_warps=4 if D <= 4096 else 8, PDL=pdl and PDL_SUPPORTED, **_launch(pdl))
    return out


@triton.jit
def _rope_store_kernel(qkv_ptr, pos_ptr, inv_ptr, q_ptr, k_ptr, v_ptr, stride_qkv, sc_b, sc_h, sc_t,
                       H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)  # query heads, then KV heads
    _pdl_start(PDL)
    _pdl_wait(PDL)
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
               q_out: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """qkv (B, (H + 2 Hkv) D), pos (B,) -> rotated q (B, H, D); rotated k and v stored at
    ``k_cache[b, :, pos[b]]`` / ``v_cache[...]`` (k_cache, v_cache: one layer, (Bc, Hkv, cap, D))."""
    B = qkv.shape[0]
    if q_out is None:
        q_out = torch.empty(B, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    _rope_store_kernel[(B, n_heads + n_kv_heads)](
        qkv, pos, inv_freq, q_out, k_cache, v_cache, qkv.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), H=n_heads, HKV=n_kv_heads, D=head_dim, num_warps=1,
        PDL=pdl and PDL_SUPPORTED, **_launch(pdl))
    return q_out


@triton.jit
def _attn_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, ml_ptr, cnt_ptr, out_ptr, sc_b, sc_h, sc_t, scale,
                       H: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr,
                       SPLIT: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_T: tl.constexpr,
                       F32: tl.constexpr, PDL: tl.constexpr, COMBINE: tl.constexpr, ADAPT: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)  # KV head
    s = tl.program_id(2)  # split of the sequence
    _pdl_start(PDL)
    _pdl_wait(PDL)
    length = tl.load(pos_ptr + b) + 1
    # ADAPT: only the splits that hold keys run (the rest return); one split writes the output
    # itself, more are combined by the last of them to finish
    n_run = tl.cdiv(length, SPLIT) if ADAPT else NSPLIT
    if s < n_run:
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
        if ADAPT:
            if n_run == 1:  # the combine of one split, the same operations: acc / denom
                y = acc / denom[:, None]
                tl.store(out_ptr + (b * H + heads)[:, None] * D + rd[None, :], y.to(out_ptr.dtype.element_ty),
                         mask=mask_r[:, None])
            else:
                _partials(o_ptr, ml_ptr, cnt_ptr, out_ptr, acc, m, denom, b, g, s, heads, mask_r, rd, n_run,
                          H, REP, D, NSPLIT, True)
        else:
            _partials(o_ptr, ml_ptr, cnt_ptr, out_ptr, acc, m, denom, b, g, s, heads, mask_r, rd, n_run,
                      H, REP, D, NSPLIT, COMBINE)


@triton.jit
def _partials(o_ptr, ml_ptr, cnt_ptr, out_ptr, acc, m, denom, b, g, s, heads, mask_r, rd, n_run,
              H: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr, COMBINE: tl.constexpr):
    """Split s's partial output, maximum and denominator stored for a combine; ``COMBINE``: the
    last of the ``n_run`` splits of this (row, KV head) to finish combines its REP query heads
    (the counter's acq_rel atomic orders the other programs' stores before these loads) and
    resets the counter for the next call."""
    row = (b * H + heads) * NSPLIT + s
    tl.store(o_ptr + row[:, None] * D + rd[None, :], acc, mask=mask_r[:, None])
    tl.store(ml_ptr + row * 2, m, mask=mask_r)
    tl.store(ml_ptr + row * 2 + 1, denom, mask=mask_r)
    if COMBINE:
        done = tl.atomic_add(cnt_ptr + b * (H // REP) + g, 1, sem="acq_rel")
        if done == n_run - 1:
            rs = tl.arange(0, NSPLIT)
            for r in tl.static_range(REP):
                _combine_row(o_ptr, ml_ptr, out_ptr, b * H + g * REP + r, rs, rd, D, NSPLIT, n_run)
            tl.atomic_xchg(cnt_ptr + b * (H // REP) + g, 0, sem="relaxed")


@triton.jit
def _combine_row(o_ptr, ml_ptr, out_ptr, row, rs, rd, D: tl.constexpr, NSPLIT: tl.constexpr, n):
    """Row ``row``'s output from its first ``n`` splits' partials (the later ones read as empty)."""
    ok = rs < n
    m = tl.load(ml_ptr + (row * NSPLIT + rs) * 2, mask=ok, other=float("-inf"))
    denom = tl.load(ml_ptr + (row * NSPLIT + rs) * 2 + 1, mask=ok, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))  # empty splits: exp(-inf) = 0
    o = tl.load(o_ptr + (row * NSPLIT + rs)[:, None] * D + rd[None, :], mask=ok[:, None], other=0.0)
    y = tl.sum(o * w[:, None], axis=0) / tl.sum(denom * w, axis=0)
    tl.store(out_ptr + row * D + rd, y.to(out_ptr.dtype.element_ty))


@triton.jit
def _attn_combine_kernel(o_ptr, ml_ptr, out_ptr, D: tl.constexpr, NSPLIT: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)  # b * H + h
    _pdl_start(PDL)
    _pdl_wait(PDL)
    _combine_row(o_ptr, ml_ptr, out_ptr, row, tl.arange(0, NSPLIT), tl.arange(0, D), D, NSPLIT, NSPLIT)


def attention_splits(capacity: int) -> tuple[int, int]:
    """(number of splits, tokens per split) for a cache of ``capacity`` positions."""
    n = min(64, triton.next_power_of_2(max(1, triton.cdiv(capacity, 256))))
    return n, triton.cdiv(triton.cdiv(capacity, n), 64) * 64


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters that the fused attention leaves zeroed after each call."""
    key = (device, n)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return _COUNTERS[key]


# the split kernel's (keys a block, num_warps) for up to 16 rows and for more, from
# scripts/gpu/attention_sweep.py on the H100 (2026-11-22, 16 layers in a graph): at 64 rows
# (16, 1) takes 7.5 us a layer against 7.9 at 40 positions and 66 against 83 at 1,000; at one row
# (64, 4) is within 0.7 us of the best at 30 positions and the best at 1,000 and 4,100
ATTENTION_FEW, ATTENTION_MANY = (64, 4), (16, 1)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
              out: torch.Tensor | None = None, pdl: bool = False, combine: bool = False,
              config: tuple[int, int] | None = None, adaptive: bool = False,
              counters: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, D) at positions pos (B,) over ``k_cache[b, :, :pos[b] + 1]`` (one layer,
    (Bc, Hkv, cap, D)) -> (B, H * D), split along the sequence into :func:`attention_splits`.

    By default a second kernel combines the splits. ``combine``: the last split program of each
    KV head combines them instead (measured slower on the H100, docs/gpu.md's fourth pass).
    ``adaptive``: only the splits that hold keys run; where a row's keys fit one split (contexts
    up to the split's length: 192 positions in a 4,160-position cache) it writes the output
    itself, else the last of them combines; one kernel, the output bit-identical to the default.
    ``counters``: ``B * Hkv`` int32 zeros, left zeroed, for ``combine`` and ``adaptive`` (by
    default one tensor per device and size; calls that may run at once on different streams
    need their own). ``config``: (keys a block, num_warps), by default :data:`ATTENTION_FEW` up to
    16 rows, else :data:`ATTENTION_MANY`."""
    B, H, D = q.shape
    Hkv, cap = k_cache.shape[1], k_cache.shape[2]
    rep = H // Hkv
    nsplit, split = attention_splits(cap)
    block_t, warps = config or (ATTENTION_FEW if B <= 16 else ATTENTION_MANY)
    o = torch.empty(B * H * nsplit, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * H * nsplit, 2, dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty(B, H * D, dtype=q.dtype, device=q.device)
    if combine or adaptive:
        cnt = _counters(q.device, B * Hkv) if counters is None else counters
        assert cnt.dtype == torch.int32 and cnt.numel() >= B * Hkv
    else:
        cnt = ml
    _attn_split_kernel[(B, Hkv, nsplit)](
        q, k_cache, v_cache, pos, o, ml, cnt, out, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        D**-0.5, H=H, REP=rep, REP_P=max(16, triton.next_power_of_2(rep)), D=D, SPLIT=split,
        NSPLIT=nsplit, BLOCK_T=block_t, F32=INTERPRET, num_warps=warps, PDL=pdl and PDL_SUPPORTED,
        COMBINE=combine and not adaptive, ADAPT=adaptive, **_launch(pdl))
    if not (combine or adaptive):
        _attn_combine_kernel[(B * H,)](o, ml, out, D=D, NSPLIT=nsplit, num_warps=1, PDL=pdl and PDL_SUPPORTED,
                                       **_launch(pdl))
    return out

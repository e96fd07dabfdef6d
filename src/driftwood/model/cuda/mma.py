"""Q4_0 / Q8_0 products of a few rows to 64 on the int8 tensor cores through ``mma.sync``, in
CUDA C++ compiled at run time (:mod:`driftwood.model.cuda.nvrtc`'s compiler and launcher).

Two kernels a product. ``quantize_frag`` turns x (through RMSNorm, or ``silu(gate) * up``) into
int8 per 32-column group, as llama.cpp's Q8_1 activations and the Triton ``i8`` kernels do, and
writes it in the order of ``mma.m16n8k32``'s A fragments: for each 16-row tile and group, 512
bytes, lane L's 16 at ``16 L``, so that one 16-byte load gives a lane its whole fragment. The
group's columns are permuted to the order BlockLinear's words hold the codes (Q4_0: column
``4 p + w`` in nibble p of word w; Q8_0: ``8 b + w`` in byte b), so that lane ``4 g + t`` of the
product finds its B fragment (row g, ``k = 4 t .. 4 t + 3`` and ``16 + 4 t ..``) in exactly one
word of a weight row (Q4_0: word t, low nibbles then high; Q8_0: words 2 t and 2 t + 1):

    Q4_0: k = 4 t + i  <-> column t + 8 i      k = 16 + 4 t + i <-> column t + 4 + 8 i
    Q8_0: k = 4 t + i  <-> column 2 t + 8 i    k = 16 + 4 t + i <-> column 2 t + 1 + 8 i

``qgemm_mma``: a block of WN warps takes WN * NT * 8 weight rows and MT of x's 16-row tiles
(all of them, or fewer: the blocks that share weight rows then run side by side and L2 serves the
repeats). x's fragments and scales for 8 groups at a time are copied into shared memory
(``cp.async``, the next 8 groups' while the current ones are used) and read by every warp;
each warp's weight words and scales for 8 groups come straight from global memory into
registers, the next 8 groups' requested before the current ones are used. A Q4_0 word becomes
the two B registers with an AND-OR, a subtract and an XOR each (``q - 8`` as signed bytes,
without a borrow between bytes); Q8_0's codes are the registers. One ``mma`` a (16-row tile,
8 weight rows, group), started from the bit pattern of 1.5 * 2^23 so that its int32 sum reads
as the float 1.5 * 2^23 + sum (exact: a group's sum is below 2^22 in magnitude) and costs a
subtract to convert; it is scaled by x's and the weights' group scales into float32.
Epilogue: the residual added, bfloat16/float16 or float32 out.
"""

from __future__ import annotations

import ctypes

import torch

from driftwood.model.cuda import nvrtc

SOURCE = nvrtc.COMMON + r"""
struct __align__(8) U2 { u32 x, y; };

// MODE bits: 1 RMSNorm of x, 2 x is a gate|up pair (silu(gate) * up), 4 residual added, 16 float32 out.

// One row m of the MT * 16 rows a block (T threads): x's groups to int8 by their largest magnitude
// (rounded to nearest even), written in fragment order (see the module's docstring); rows >= M are zeros.
// Scale of row 16 mt + 8 h + g, group grp: xs[(grp * 8 + g) * 2 MT + 2 mt + h].
template <int FMT, int DT, int MODE, int MT, int PDL>
__global__ void __launch_bounds__(128) quantize_frag(const u16* __restrict__ x, int ldx, const u16* __restrict__ nw,
    double eps, int M, int K, signed char* __restrict__ xq, float* __restrict__ xs) {
  constexpr bool NORM = MODE & 1, GLU = MODE & 2;
  __shared__ float red[4];
  if constexpr (PDL != 0) pdl_start();
  const int m = blockIdx.x, G = K / 32;
  const int mt = m >> 4, gl = m & 7, rh = (m >> 3) & 1;
  const bool live = m < M;
  const u16* row = x + (size_t)(live ? m : 0) * ldx;
  float r = 1.f;
  if (NORM) {
    float ss = 0.f;
    for (int c = threadIdx.x * 8; c < K; c += 128 * 8) {
      float f[8];
      unpack8<DT>(*reinterpret_cast<const V4*>(row + c), f);
#pragma unroll
      for (int e = 0; e < 8; ++e) ss += f[e] * f[e];
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    r = rsqrtf((red[0] + red[1] + red[2] + red[3]) / K + (float)eps);
  }
  for (int grp = threadIdx.x; grp < G; grp += 128) {
    float v[32];
#pragma unroll
    for (int c = 0; c < 32; c += 8) {
      unpack8<DT>(*reinterpret_cast<const V4*>(row + grp * 32 + c), v + c);
      if (GLU) {
        float u[8];
        unpack8<DT>(*reinterpret_cast<const V4*>(row + K + grp * 32 + c), u);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[c + e] = v[c + e] * (1.f / (1.f + expf(-v[c + e]))) * u[e];
      }
      if (NORM) {
        float g[8];
        unpack8<DT>(*reinterpret_cast<const V4*>(nw + grp * 32 + c), g);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[c + e] = to_f<DT>(from_f<DT>(g[e] * to_f<DT>(from_f<DT>(v[c + e] * r))));
      }
    }
    float amax = 0.f;
#pragma unroll
    for (int c = 0; c < 32; ++c) amax = fmaxf(amax, fabsf(v[c]));
    if (!live) amax = 0.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    u32 word[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // (t, half) at 2 t + half: the lane 4 gl + t's register half
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int i = c >> 3, rem = c & 7;
      const int t = FMT == 2 ? (rem & 3) : (rem >> 1), half = FMT == 2 ? (rem >> 2) : (rem & 1);
      const u32 q = (u32)__float2int_rn(v[c] * inv) & 0xffu;
      word[2 * t + half] |= q << (8 * i);
    }
    signed char* rec = xq + ((size_t)mt * G + grp) * 512;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
#pragma unroll
      for (int half = 0; half < 2; ++half)
        *reinterpret_cast<u32*>(rec + (gl * 4 + t) * 16 + (rh + 2 * half) * 4) = word[2 * t + half];
    }
    xs[((size_t)grp * 8 + gl) * (2 * MT) + 2 * mt + rh] = amax / 127.f;
  }
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const u32 s = (u32)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(s), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

__device__ __forceinline__ void mma_biased(int* d, V4 a, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%10, %10, %10, %10};"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(a.a), "r"(a.b), "r"(a.c), "r"(a.d), "r"(b0), "r"(b1), "r"(0x4B400000));
}
__device__ __forceinline__ u32 signed_nibbles(u32 w) {  // four 4-bit codes q (one a byte) to the bytes q - 8
  return (((w & 0x0F0F0F0Fu) | 0x80808080u) - 0x08080808u) ^ 0x80808080u;
}

// Weight words of 8 groups for one n-tile row: Q4_0 one word a group (word t), Q8_0 two (2 t, 2 t + 1)
template <int FMT> struct Words { u32 w[8][FMT == 2 ? 1 : 2]; };

template <int FMT, int NT>
__device__ __forceinline__ void load_words(Words<FMT>* wb, V4 (*sb)[2], const u32* const* wp,
    const u16* const (*sp)[2], int g0) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int gg = 0; gg < 8; ++gg) {
      if (FMT == 2) wb[j].w[gg][0] = __ldg(wp[j] + (g0 + gg) * 4);
      else {
        const U2 u = *reinterpret_cast<const U2*>(wp[j] + (g0 + gg) * 8);
        wb[j].w[gg][0] = u.x; wb[j].w[gg][1] = u.y;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) sb[j][h] = *reinterpret_cast<const V4*>(sp[j][h] + g0);
  }
}

// Columns n, n + 1 of row m: y0, y1 (+ the residual's) written to out (MODE bits 4 residual, 16 float32 out).
template <int DT, int MODE>
__device__ __forceinline__ void store_pair(float y0, float y1, const u16* res, void* out, int m, int n, int ldr,
                                           int ldo) {
  if (MODE & 4) {
    const u32 r = *reinterpret_cast<const u32*>(res + (size_t)m * ldr + n);
    y0 += to_f<DT>((u16)(r & 0xffffu));
    y1 += to_f<DT>((u16)(r >> 16));
  }
  if (MODE & 16) {
    *reinterpret_cast<float2*>(reinterpret_cast<float*>(out) + (size_t)m * ldo + n) = make_float2(y0, y1);
  } else {
    *reinterpret_cast<u32*>(reinterpret_cast<u16*>(out) + (size_t)m * ldo + n) =
        (u32)from_f<DT>(y0) | ((u32)from_f<DT>(y1) << 16);
  }
}

// MT of x's MTT 16-row tiles (quantize_frag) against WN * NT * 8 rows of Q4_0 (FMT 2) / Q8_0 (FMT 1) codes a
// block (block b: tiles MT * (b % (MTT / MT)) ..., rows from b / (MTT / MT)); G groups (a multiple of 16), the
// rows' codes G * 4 (Q4_0) or G * 8 (Q8_0) words each. Blocks that share rows run side by side (L2 serves the
// repeats). KS > 1: the groups split into KS equal runs (each a multiple of 16), the grid KS times as many
// blocks, run ks's float32 sums written at out + ks * M * ldo for split_sum (MODE then 16, float32 out).
template <int FMT, int DT, int MT, int NT, int WN, int MODE, int PDL>
__global__ void __launch_bounds__(WN * 32) qgemm_mma(const V4* __restrict__ xq, const float* __restrict__ xs,
    const u32* __restrict__ codes, const u16* __restrict__ scales, const u16* res, void* out, int M, int N, int G,
    int ldr, int ldo, int MTT, int KS) {
  constexpr int WPG = FMT == 2 ? 4 : 8;        // words a group a row
  constexpr int AV = 8 * MT * 32;              // x's fragments of 8 groups, 16-byte units
  constexpr int SV = 8 * 8 * 2 * 4 / 4;        // x's scales of 8 groups (up to 4 tiles), 16-byte units
  __shared__ V4 sa[2][AV + SV];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tid = lane & 3;
  const int blocks = gridDim.x / KS, ks = blockIdx.x / blocks, bx = blockIdx.x % blocks;
  const int g_begin = ks * (G / KS), g_end = g_begin + G / KS;
  if (KS > 1) out = reinterpret_cast<float*>(out) + (size_t)ks * M * ldo;
  const int MB = MTT / MT, mb = bx % MB, sv = 32 * MTT;
  const int nb = (bx / MB * WN + warp) * NT * 8;
  const u32* wp[NT];
  const u16* sp[NT][2];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int r = nb + 8 * j + gid, c = nb + 8 * j + 2 * tid;
    wp[j] = codes + (size_t)(r < N ? r : N - 1) * G * WPG + (FMT == 2 ? tid : 2 * tid);
    sp[j][0] = scales + (size_t)(c < N ? c : N - 1) * G;
    sp[j][1] = scales + (size_t)(c + 1 < N ? c + 1 : N - 1) * G;
  }
  Words<FMT> wa[NT], wb[NT];
  V4 sca[NT][2], scb[NT][2];
  load_words<FMT, NT>(wa, sca, wp, sp, g_begin);  // the weights need nothing from the previous kernel
  if constexpr (PDL != 0) pdl_start();

  auto stage = [&](int buf, int g0) {  // x's fragments and scales of groups g0 .. g0 + 7 into sa[buf]
    for (int i = threadIdx.x; i < AV + sv; i += WN * 32) {
      const V4* src;
      if (i < AV) {
        const int mt = i / 256, rem = i % 256;
        src = xq + ((size_t)(mb * MT + mt) * G + g0) * 32 + rem;
      } else {
        src = reinterpret_cast<const V4*>(xs + (size_t)g0 * 16 * MTT) + (i - AV);
      }
      cp_async16(&sa[buf][i], src);
    }
    cp_commit();
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

  auto compute = [&](int buf, const Words<FMT>* w, V4 (*sc)[2]) {
    const float* sxs = reinterpret_cast<const float*>(&sa[buf][AV]);
#pragma unroll
    for (int gg = 0; gg < 8; ++gg) {
      V4 a[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) a[mt] = sa[buf][(mt * 8 + gg) * 32 + lane];
      float sx[2 * MT];
#pragma unroll
      for (int e = 0; e < 2 * MT; ++e) sx[e] = sxs[(gg * 8 + gid) * 2 * MTT + 2 * mb * MT + e];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        u32 b0, b1;
        if (FMT == 2) { b0 = signed_nibbles(w[j].w[gg][0]); b1 = signed_nibbles(w[j].w[gg][0] >> 4); }
        else { b0 = w[j].w[gg][0]; b1 = w[j].w[gg][1]; }
        const u32 s0w = (&sc[j][0].a)[gg >> 1], s1w = (&sc[j][1].a)[gg >> 1];
        const float s0 = h2f((u16)(gg & 1 ? s0w >> 16 : s0w & 0xffffu));
        const float s1 = h2f((u16)(gg & 1 ? s1w >> 16 : s1w & 0xffffu));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          int d[4];
          mma_biased(d, a[mt], b0, b1);
          const float x0 = sx[2 * mt], x1 = sx[2 * mt + 1];
          acc[mt][j][0] += (__int_as_float(d[0]) - 12582912.f) * (x0 * s0);
          acc[mt][j][1] += (__int_as_float(d[1]) - 12582912.f) * (x0 * s1);
          acc[mt][j][2] += (__int_as_float(d[2]) - 12582912.f) * (x1 * s0);
          acc[mt][j][3] += (__int_as_float(d[3]) - 12582912.f) * (x1 * s1);
        }
      }
    }
  };

  stage(0, g_begin);
  for (int g0 = g_begin; g0 < g_end; g0 += 16) {  // two 8-group chunks an iteration: buffers a, then b
    stage(1, g0 + 8);
    load_words<FMT, NT>(wb, scb, wp, sp, g0 + 8);
    cp_wait<1>();
    __syncthreads();
    compute(0, wa, sca);
    __syncthreads();  // everyone is done with sa[0]
    const bool more = g0 + 16 < g_end;
    if (more) {
      stage(0, g0 + 16);
      load_words<FMT, NT>(wa, sca, wp, sp, g0 + 16);
      cp_wait<1>();
    } else {
      cp_wait<0>();
    }
    __syncthreads();
    compute(1, wb, scb);
    __syncthreads();
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int n = nb + 8 * j + 2 * tid;
      if (n >= N) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = (mb * MT + mt) * 16 + gid + 8 * h;
        if (m < M) store_pair<DT, MODE>(acc[mt][j][2 * h], acc[mt][j][2 * h + 1], res, out, m, n, ldr, ldo);
      }
    }
  }
}

// out (M, N) = the KS float32 runs of qgemm_mma (KS, M, N) summed in order (+ the residual), two columns a thread.
template <int DT, int MODE, int PDL>
__global__ void __launch_bounds__(256) split_sum(const float* __restrict__ ws, int KS, const u16* res, void* out,
    int M, int N, int ldr, int ldo) {
  if constexpr (PDL != 0) pdl_start();
  const int i = blockIdx.x * 256 + threadIdx.x, half = N / 2, m = i / half, n = 2 * (i % half);
  if (m >= M) return;
  float y0 = 0.f, y1 = 0.f;
  for (int s = 0; s < KS; ++s) {
    const float2 v = *reinterpret_cast<const float2*>(ws + ((size_t)s * M + m) * N + n);
    y0 += v.x;
    y1 += v.y;
  }
  store_pair<DT, MODE>(y0, y1, res, out, m, n, ldr, ldo);
}
"""

NORM, GLU, RES, OUT_F32 = nvrtc.NORM, nvrtc.GLU, nvrtc.RES, nvrtc.OUT_F32
Q8_0, Q4_0 = nvrtc.Q8_0, nvrtc.Q4_0
MAX_ROWS = 64  # four 16-row tiles: x's fragments of 8 groups double-buffered in 36 KB of shared memory
WORDS = {Q4_0: 8, Q8_0: 4}  # codes an int32 word


def supports(x: torch.Tensor, fmt: int, codes: torch.Tensor, glu: bool = False) -> bool:
    """Whether :func:`gemm` runs this product: 1-64 rows of bfloat16/float16 x with unit column
    stride and 16-byte aligned rows, Q4_0/Q8_0 codes (int32) with K a multiple of 512 (16 groups)
    and N of 8, and the kernels compile here."""
    if fmt not in WORDS or codes.dtype != torch.int32 or not codes.is_contiguous():
        return False
    k = codes.shape[1] * WORDS[fmt]
    return (x.is_cuda and x.dtype in nvrtc.DTYPES and 1 <= x.shape[0] <= MAX_ROWS and k % 512 == 0
            and codes.shape[0] % 8 == 0 and x.shape[1] == (2 * k if glu else k) and x.stride(1) == 1
            and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0 and nvrtc.available(x.device.index or 0))


def tiles(rows: int, tiles_a_block: int = 4) -> tuple[int, int]:
    """(16-row tiles of x, tiles a block): at most ``tiles_a_block``, dividing the first."""
    mtt = -(-rows // 16)
    mt = min(tiles_a_block, mtt)
    while mtt % mt:
        mt -= 1
    return mtt, mt


def plan(rows: int, k: int, config: tuple[int, ...]) -> tuple[int, int, int, int, int]:
    """(WN, NT, 16-row tiles of x, tiles a block, KS) that :func:`gemm` launches for ``rows`` rows
    of x, K = k and ``config`` (KS lowered until each split takes a multiple of 16 groups)."""
    wn, nt, *rest = config
    mtt, mt = tiles(rows, rest[0] if rest else 4)
    ksplit = rest[1] if len(rest) > 1 else 1
    while (k // 32) % (16 * ksplit):  # k // 32 is one: K % 512 == 0
        ksplit -= 1
    return wn, nt, mtt, mt, ksplit


def kernel_names(fmt: int, dt: int, rows: int, mode: int, wn: int, nt: int, pdl: bool,
                 tiles_a_block: int = 4, ksplit: int = 1) -> tuple[str, ...]:
    """(the quantizer, the product[, the split sum]) for ``rows`` rows of x (``mode``: NORM / GLU
    for the first, RES / OUT_F32 for the last; ``ksplit`` > 1: the product writes float32 runs)."""
    mtt, mt = tiles(rows, tiles_a_block)
    out_mode = mode & (RES | OUT_F32)
    names = (f"quantize_frag<{fmt}, {dt}, {mode & (NORM | GLU)}, {mtt}, {int(pdl)}>",
             f"qgemm_mma<{fmt}, {dt}, {mt}, {nt}, {wn}, {out_mode if ksplit == 1 else OUT_F32}, {int(pdl)}>")
    return names if ksplit == 1 else (*names, f"split_sum<{dt}, {out_mode}, {int(pdl)}>")


def gemm(x: torch.Tensor, fmt: int, codes: torch.Tensor, scales: torch.Tensor, *, config: tuple[int, ...],
         residual: torch.Tensor | None = None, glu: bool = False, norm: tuple[torch.Tensor, float] | None = None,
         out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, pdl: bool = True) -> torch.Tensor:
    """x (M, K) (or (M, 2K) with ``glu``; through RMSNorm with ``norm``) -> (M, N) = x' @ W.T
    (+ residual (M, N)), x' rounded to int8 per group; where :func:`supports`. ``config``: (WN
    warps a block, NT 8-row tiles a warp[, 16-row tiles of x a block, default all[, KS: the groups
    split among KS times as many blocks (fewer where they do not divide into runs of 16), their
    float32 sums added by a third kernel]]). ``out`` may be
    ``residual`` itself. ``pdl``: the
    kernels launched with programmatic dependent launch (the product's first weights requested
    while the quantizer runs)."""
    M, N = x.shape[0], codes.shape[0]
    K = codes.shape[1] * WORDS[fmt]
    G = K // 32
    wn, nt, mtt, mt, ksplit = plan(M, K, config)
    dev = x.device.index or 0
    pdl = pdl and nvrtc.pdl_supported(dev)
    assert scales.dtype == torch.float16 and scales.shape == (N, G) and scales.is_contiguous()
    mode = (NORM if norm is not None else 0) | (GLU if glu else 0) | (RES if residual is not None else 0)
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    if out.dtype == torch.float32:
        mode |= OUT_F32
    else:
        assert out.dtype == x.dtype
    assert out.stride(1) == 1 and out.stride(0) % 2 == 0 and out.shape == (M, N)
    if residual is not None:
        assert residual.dtype == x.dtype and residual.stride(1) == 1 and residual.stride(0) % 2 == 0
    xq = torch.empty(mtt * 16 * K, dtype=torch.int8, device=x.device)
    xs = torch.empty(G * 16 * mtt, dtype=torch.float32, device=x.device)
    qname, gname, *sname = kernel_names(fmt, nvrtc.DTYPES[x.dtype], M, mode, wn, nt, pdl, mt, ksplit)
    nw, eps = norm if norm is not None else (x, 0.0)
    p, i32 = nvrtc.pointer, ctypes.c_int
    nvrtc.launch(nvrtc.kernel(dev, qname, 0, SOURCE), mtt * 16, 128, 0,
                 [p(x), i32(x.stride(0)), p(nw), ctypes.c_double(eps), i32(M), i32(K), p(xq), p(xs)], pdl)
    res = residual if residual is not None else out
    rows = wn * nt * 8
    dst = out if ksplit == 1 else torch.empty(ksplit, M, N, dtype=torch.float32, device=x.device)
    nvrtc.launch(nvrtc.kernel(dev, gname, 0, SOURCE), -(-N // rows) * (mtt // mt) * ksplit, wn * 32, 0,
                 [p(xq), p(xs), p(codes), p(scales), p(res), p(dst), i32(M), i32(N), i32(G), i32(res.stride(0)),
                  i32(dst.stride(-2)), i32(mtt), i32(ksplit)], pdl)
    if ksplit > 1:
        nvrtc.launch(nvrtc.kernel(dev, sname[0], 0, SOURCE), -(-(M * N // 2) // 256), 256, 0,
                     [p(dst), i32(ksplit), p(res), p(out), i32(M), i32(N), i32(res.stride(0)), i32(out.stride(0))], pdl)
    return out

"""Hand-written CUDA kernels, compiled at run time with NVRTC (the library that ships with
torch's CUDA wheels, so no toolkit is needed) and launched through the driver on torch's
current stream, which lets CUDA graphs capture them like any other kernel.

:func:`gemv_row`: one row of x against a dense bfloat16/float16 matrix or Q4_0/Q8_0 codes in
:class:`~driftwood.model.weights.BlockLinear`'s layout, ``out = x' @ W.T``, with what the decode
step fuses into the product: RMSNorm of x (``norm``), ``silu(gate) * up`` of a gate|up pair
(``glu``), a residual, or RoPE and the KV-cache write of the QKV product (``rope``), the same
functions and roundings as :func:`~driftwood.model.cuda.kernels.gemv` (x stays float32: no int8
activations). Each block stages x once in shared memory (normalised, in float32, in the order
the lanes read it: conflict-free 16-byte reads) while its first weights are already on the way;
dense rows stream 16 bytes a lane a load with the next 4 KB piece of a warp in flight, quantized
rows are requested whole (or, with a configuration's fourth element 1, blocks loop over tiles
of rows with the next tile in flight). Launched with programmatic dependent launch, a product's
first weights are requested before it waits for the previous kernel.

:func:`pick` holds the measured policy: per-shape configurations from
scripts/gpu/cuda_gemv_sweep.py, and the quantized products the Triton kernels run faster (Q8_0;
a Q4_0 vocabulary head without a configuration) left to them (docs/gpu.md, twelfth and
fourteenth passes).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# Types and conversions every CUDA C++ source here starts with (mma.SOURCE too)
COMMON = r"""
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
struct __align__(16) V4 { u32 a, b, c, d; };

__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
template <int DT> __device__ __forceinline__ float to_f(u16 h) {  // DT 0: bfloat16, 1: float16
  return DT == 0 ? __uint_as_float(((u32)h) << 16) : h2f(h);
}
template <int DT> __device__ __forceinline__ u16 from_f(float f) {
  u16 h;
  if (DT == 0) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
template <int DT> __device__ __forceinline__ void unpack(u32 w, float& lo, float& hi) {
  if (DT == 0) { lo = __uint_as_float(w << 16); hi = __uint_as_float(w & 0xffff0000u); }
  else { lo = h2f((u16)(w & 0xffffu)); hi = h2f((u16)(w >> 16)); }
}
template <int DT> __device__ __forceinline__ void unpack8(V4 v, float* f) {
  unpack<DT>(v.a, f[0], f[1]); unpack<DT>(v.b, f[2], f[3]);
  unpack<DT>(v.c, f[4], f[5]); unpack<DT>(v.d, f[6], f[7]);
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ void pdl_start() {  // PDL: let the next kernel launch, then wait for the previous one
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
}
"""

SOURCE = COMMON + r"""
struct __align__(16) F4 { float x, y, z, w; };

__device__ __forceinline__ V4 ldw(const V4* p) {  // streamed once: no L1, 256-byte L2 prefetch
  V4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.a), "=r"(v.b), "=r"(v.c), "=r"(v.d) : "l"(p));
  return v;
}
// x element k lies at xs[xs_index(k)]: lane l's 8 elements of 16-byte step s (k = s * 256 + l * 8 + e)
// as two float4 at (s * 2 + e / 4) * 128 + l * 4, so that a warp's float4 reads are contiguous
__device__ __forceinline__ int xs_index(int k) {
  return (((k >> 8) * 2 + ((k >> 2) & 1)) * 32 + ((k >> 3) & 31)) * 4 + (k & 3);
}

// MODE bits: 1 RMSNorm of x, 2 x is a gate|up pair (silu(gate) * up), 4 residual added,
// 8 RoPE and the KV-cache write (the QKV product), 16 float32 output.

// x (KD values; with GLU silu(gate) * up of 2 KD; with NORM as RMSNorm rounds it) into shared
// memory as float32, value k at xs[index(k)]; T threads, red: a float a warp
template <int DT, int KD, int T, int MODE, class Index>
__device__ __forceinline__ void stage_x(const u16* x, const u16* nw, double eps, float* xs, float* red, Index index) {
  constexpr bool NORM = MODE & 1, GLU = MODE & 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float ss = 0.f;
  for (int t = threadIdx.x; t < KD / 8; t += T) {
    float f[8];
    unpack8<DT>(*reinterpret_cast<const V4*>(x + t * 8), f);
    if (GLU) {
      float u[8];
      unpack8<DT>(*reinterpret_cast<const V4*>(x + KD + t * 8), u);
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = f[e] * (1.f / (1.f + expf(-f[e]))) * u[e];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) { ss += f[e] * f[e]; xs[index(t * 8 + e)] = f[e]; }
  }
  if (NORM) {
    ss = warp_sum(ss);
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    float tot = 0.f;
#pragma unroll
    for (int i = 0; i < T / 32; ++i) tot += red[i];
    const float r = rsqrtf(tot / KD + (float)eps);
    for (int t = threadIdx.x; t < KD / 8; t += T) {
      float g[8];
      unpack8<DT>(*reinterpret_cast<const V4*>(nw + t * 8), g);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int k = index(t * 8 + e);
        xs[k] = to_f<DT>(from_f<DT>(g[e] * to_f<DT>(from_f<DT>(xs[k] * r))));
      }
    }
  }
  __syncthreads();
}

// A warp group's rows done: lane j < RPW of each warp holds its slice of row row0 + j in y. The
// slices summed (KSPLIT > 1: through red, RPW floats a warp), then the epilogue of MODE.
template <int DT, int RPW, int KSPLIT, int MODE>
__device__ __forceinline__ void finish_rows(float y, int row0, int N, float* red, const u16* res, void* out,
    const i64* pos, const float* inv_freq, u16* q, u16* kc, u16* vc, int sc_h, int sc_t, int H, int HKV, int D) {
  constexpr bool RES = MODE & 4, ROPE = MODE & 8, OUT_F32 = MODE & 16;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (KSPLIT > 1) {  // the first warp of each group sums its group's slices
    __syncthreads();  // red's earlier use (the norm) is over
    if (lane < RPW) red[warp * RPW + lane] = y;
    __syncthreads();
    if (warp % KSPLIT) return;
#pragma unroll
    for (int j = 1; j < KSPLIT; ++j) y += lane < RPW ? red[(warp + j) * RPW + lane] : 0.f;
  }
  const int r = row0 + lane;
  if (ROPE) {
    y = to_f<DT>(from_f<DT>(y));
    const float other = __shfl_xor_sync(0xffffffffu, y, 1);  // the pair's other row
    if (lane < RPW && r < N) {
      const i64 p = pos[0];
      const int ne = r & ~1;
      if (ne < (H + HKV) * D) {  // queries and keys rotate, values do not
        float sn, cs;
        sincosf((float)p * inv_freq[(ne % D) / 2], &sn, &cs);
        y = (r & 1) ? y * cs + other * sn : y * cs - other * sn;
      }
      const int head = r / D, d = r % D;
      const u16 h = from_f<DT>(y);
      if (head < H) q[r] = h;
      else if (head < H + HKV) kc[(i64)(head - H) * sc_h + p * sc_t + d] = h;
      else vc[(i64)(head - H - HKV) * sc_h + p * sc_t + d] = h;
    }
  } else if (lane < RPW && r < N) {
    if (RES) y += to_f<DT>(res[r]);
    if (OUT_F32) reinterpret_cast<float*>(out)[r] = y;
    else reinterpret_cast<u16*>(out)[r] = from_f<DT>(y);
  }
}

#define GEMV_PARAMS                                                                                       \
    const u16* x, const void* __restrict__ weights, const u16* __restrict__ scales, const u16* __restrict__ nw, \
    const u16* res, void* out, int N, double eps, const i64* __restrict__ pos, const float* __restrict__ inv_freq, \
    u16* q, u16* kc, u16* vc, int sc_h, int sc_t, int H, int HKV, int D
#define FINISH_ARGS res, out, pos, inv_freq, q, kc, vc, sc_h, sc_t, H, HKV, D

// Dense weights (the compute dtype). A block: WARPS / KSPLIT groups of KSPLIT warps; a group
// takes RPW consecutive rows, each of its warps a 1 / KSPLIT slice of their columns. PDL
// (Hopper): the first weights are requested before the wait on the previous kernel, which may
// still be running (programmatic dependent launch).
template <int DT, int KD, int WARPS, int RPW, int KSPLIT, int MODE, int PDL>
__global__ void __launch_bounds__(WARPS * 32, 512 / (WARPS * 32)) gemv_row(GEMV_PARAMS) {  // <= 128 registers
  constexpr int NV = KD / 256 / KSPLIT;     // 16-byte loads a lane makes of a row (its warp's slice)
  // of them in one piece: the largest divisor of NV up to 8 (K = 3072: 6, 2304: 3, 18944: 2)
  constexpr int PV = NV % 8 == 0 ? 8 : NV % 7 == 0 ? 7 : NV % 6 == 0 ? 6 : NV % 5 == 0 ? 5
                   : NV % 4 == 0 ? 4 : NV % 3 == 0 ? 3 : NV % 2 == 0 ? 2 : 1;
  constexpr int PIECES = NV / PV;           // pieces a row
  constexpr int P = RPW * PIECES;           // pieces a warp
  static_assert(KD % (256 * KSPLIT) == 0 && NV % PV == 0 && WARPS % KSPLIT == 0, "K: a multiple of 256 a slice");
  extern __shared__ F4 xs4[];               // x as the lanes read it (xs_index), KD floats
  __shared__ float red[WARPS * (RPW > 1 ? RPW : 1)];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, slice = warp % KSPLIT;
  const int row0 = (blockIdx.x * (WARPS / KSPLIT) + warp / KSPLIT) * RPW;
  const V4* wv = reinterpret_cast<const V4*>(weights) + slice * NV * 32 + lane;
  V4 b0[PV], b1[PV];

#define LOAD_PIECE(b, i)                                                                  \
  {                                                                                       \
    const int r_ = row0 + (i) / PIECES;                                                   \
    const V4* p_ = wv + (size_t)(r_ < N ? r_ : 0) * (KD / 8) + ((i) % PIECES) * PV * 32;  \
    _Pragma("unroll") for (int v_ = 0; v_ < PV; ++v_) {                                   \
      if (r_ < N) b[v_] = ldw(p_ + v_ * 32); else b[v_] = V4{0, 0, 0, 0};                 \
    }                                                                                     \
  }

  // the first two pieces are on their way while the previous kernel ends and x is staged
  LOAD_PIECE(b0, 0);
  if (P > 1) LOAD_PIECE(b1, 1);
  if constexpr (PDL != 0) pdl_start();  // griddepcontrol: sm_90 and later only
  stage_x<DT, KD, WARPS * 32, MODE>(x, nw, eps, reinterpret_cast<float*>(xs4), red, [](int k) { return xs_index(k); });

  float y = 0.f, acc = 0.f;  // lane j < RPW ends with row row0 + j (its slice's part)
  const F4* xw = xs4 + slice * NV * 2 * 32 + lane;

#define DOT_PIECE(b, i)                                                                   \
  {                                                                                       \
    _Pragma("unroll") for (int v_ = 0; v_ < PV; ++v_) {                                   \
      const int s_ = ((i) % PIECES) * PV + v_;                                            \
      const F4 xa = xw[(s_ * 2) * 32], xb = xw[(s_ * 2 + 1) * 32];                        \
      float f_[8];                                                                        \
      unpack8<DT>(b[v_], f_);                                                             \
      acc += f_[0] * xa.x + f_[1] * xa.y + f_[2] * xa.z + f_[3] * xa.w                    \
           + f_[4] * xb.x + f_[5] * xb.y + f_[6] * xb.z + f_[7] * xb.w;                   \
    }                                                                                     \
    if (((i) + 1) % PIECES == 0) {  /* the row is done */                                 \
      const float s_ = warp_sum(acc);                                                     \
      if (lane == (i) / PIECES) y = s_;                                                   \
      acc = 0.f;                                                                          \
    }                                                                                     \
  }

  // two pieces in flight a warp; short rows unrolled whole (the loads hoisted), long ones not
  // (all of a 16 KB row's loads hoisted would spill)
#pragma unroll(P <= 8 ? (P + 1) / 2 : 1)
  for (int i = 0; i < P; i += 2) {
    DOT_PIECE(b0, i);
    if (i + 2 < P) LOAD_PIECE(b0, i + 2);
    if (i + 1 < P) {
      DOT_PIECE(b1, i + 1);
      if (i + 3 < P) LOAD_PIECE(b1, i + 3);
    }
  }
  finish_rows<DT, RPW, KSPLIT, MODE>(y, row0, N, red, FINISH_ARGS);
}

// A warp group's RPW rows of a quantized matrix from row0 on (its slice of the columns): lane l's
// 16-byte loads of groups l, l + 32, ... and their scales, zeros for rows past N.
template <int FMT, int G, int GS, int RPW, int NG, int U>
__device__ __forceinline__ void load_rows(V4 (&b)[RPW][NG][U], u16 (&sc)[RPW][NG], const V4* wv, const u16* scales,
                                          int row0, int N, int slice, int lane) {
#pragma unroll
  for (int j = 0; j < RPW; ++j) {
#pragma unroll
    for (int n = 0; n < NG; ++n) {
      const int gi = n * 32 + lane, g = slice * GS + gi;
      const bool ok = row0 + j < N && (GS % 32 == 0 || gi < GS);
      const size_t at = (size_t)(ok ? row0 + j : 0) * G + (ok ? g : 0);
#pragma unroll
      for (int u = 0; u < U; ++u) b[j][n][u] = ok ? ldw(wv + at * U + u) : V4{0, 0, 0, 0};
      sc[j][n] = ok ? scales[at] : (u16)0;
    }
  }
}

// The rows of load_rows against x staged by qgemv_row: lane j < RPW returns its slice of row row0 + j.
template <int FMT, int G, int GS, int RPW, int NG, int U>
__device__ __forceinline__ float dot_rows(const V4 (&b)[RPW][NG][U], const u16 (&sc)[RPW][NG], const F4* xs4,
                                          const float* xoff, int slice, int lane) {
  const u32 ma = FMT == 2 ? 0xF000u : 0xFF00u, mb = 0xF0000u, ca = FMT == 2 ? 0x45000000u : 0x47000000u,
            cb = 0x43000000u;
  float y = 0.f;
#pragma unroll
  for (int j = 0; j < RPW; ++j) {
    float acc = 0.f;
#pragma unroll
    for (int n = 0; n < NG; ++n) {
      const int gi = n * 32 + lane, g = slice * GS + (gi < GS ? gi : 0);
      float d = 0.f;
      if (FMT == 2) {
        const u32 wd[4] = {b[j][n][0].a, b[j][n][0].b, b[j][n][0].c, b[j][n][0].d};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const u32 t = wd[w];
          const F4 lo = xs4[(2 * w) * G + g], hi = xs4[(2 * w + 1) * G + g];
          d += __uint_as_float(((t << 16) & mb) | cb) * lo.x + __uint_as_float(((t << 8) & ma) | ca) * lo.y
             + __uint_as_float(((t << 8) & mb) | cb) * lo.z + __uint_as_float((t & ma) | ca) * lo.w
             + __uint_as_float((t & mb) | cb) * hi.x + __uint_as_float(((t >> 8) & ma) | ca) * hi.y
             + __uint_as_float(((t >> 8) & mb) | cb) * hi.z + __uint_as_float(((t >> 12) & mb) | cb) * hi.w;
        }
      } else {
        const u32 wd[8] = {b[j][n][0].a, b[j][n][0].b, b[j][n][0].c, b[j][n][0].d,
                           b[j][n][U - 1].a, b[j][n][U - 1].b, b[j][n][U - 1].c, b[j][n][U - 1].d};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const u32 t = wd[i] ^ 0x80808080u;  // signed bytes to q + 128
          const F4 v = xs4[i * G + g];
          d += __uint_as_float(((t << 8) & ma) | ca) * v.x + __uint_as_float((t & ma) | ca) * v.y
             + __uint_as_float(((t >> 8) & ma) | ca) * v.z + __uint_as_float(((t >> 16) & ma) | ca) * v.w;
        }
      }
      acc += h2f(sc[j][n]) * (d - xoff[g]);
    }
    const float s = warp_sum(acc);
    if (lane == j) y = s;
  }
  return y;
}

// Q4_0 (FMT 2) and Q8_0 (FMT 1) weights as BlockLinear keeps them: a 32-column group is 16 (Q4_0)
// or 32 bytes of int32 words and one fp16 scale. Lane l of a warp takes groups l, l + 32, ... of
// its slice of each of its RPW rows, all requested at once (before the PDL wait). x is staged as
// eight float4 a group, chunk c of group g at xs4[c * G + g] (the lanes' reads contiguous): Q4_0
// word w's nibbles 0-3 in chunk 2w, 4-7 in 2w + 1; Q8_0 word i's bytes in chunk i. A code reads
// as float "bias + code" (a shift and one AND-OR, no conversion), the biases taken off once per
// group through xoff[g] = sum of x times each column's bias (+ 8 or + 128 for the codes' offset).
// LOOP (KSPLIT 1): a block takes tiles blockIdx.x, + gridDim.x, ... of its WARPS * RPW rows (the
// grid as many blocks as are resident at once), x staged once, the next tile's weights in flight
// while one is multiplied (two sets of registers).
template <int FMT, int DT, int KD, int WARPS, int RPW, int KSPLIT, int MODE, int PDL, int LOOP = 0>
__global__ void __launch_bounds__(WARPS * 32, 512 / (WARPS * 32)) qgemv_row(GEMV_PARAMS) {
  constexpr int G = KD / 32, GS = G / KSPLIT;   // groups a row, a slice
  constexpr int NG = (GS + 31) / 32;            // groups a lane a row
  constexpr int U = FMT == 2 ? 1 : 2;           // 16-byte loads a group
  static_assert(G % KSPLIT == 0 && WARPS % KSPLIT == 0 && (LOOP ? 2 : 1) * RPW * NG * U <= 8, "too much a lane");
  static_assert(!LOOP || KSPLIT == 1, "a looping block's warps each take whole rows");
  extern __shared__ F4 xs4[];                   // 8 G float4, then xoff: G floats
  float* xoff = reinterpret_cast<float*>(xs4 + 8 * G);
  __shared__ float red[WARPS * (RPW > 1 ? RPW : 1)];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, slice = warp % KSPLIT;
  const int rows = (WARPS / KSPLIT) * RPW, tiles = (N + rows - 1) / rows;
  const int first = (warp / KSPLIT) * RPW;      // the warp group's first row in a tile
  const V4* wv = reinterpret_cast<const V4*>(weights);
  V4 b[RPW][NG][U], b2[RPW][NG][U];
  u16 sc[RPW][NG], sc2[RPW][NG];
  int t = blockIdx.x;
  load_rows<FMT, G, GS, RPW, NG, U>(b, sc, wv, scales, t * rows + first, N, slice, lane);
  if (LOOP) load_rows<FMT, G, GS, RPW, NG, U>(b2, sc2, wv, scales, (t + gridDim.x) * rows + first, N, slice, lane);
  if constexpr (PDL != 0) pdl_start();  // griddepcontrol: sm_90 and later only
  stage_x<DT, KD, WARPS * 32, MODE>(x, nw, eps, reinterpret_cast<float*>(xs4), red, [](int k) {
    const int g = k >> 5, c = k & 31;
    const int chunk = FMT == 2 ? ((c & 3) * 2 + (c >> 4)) : (c & 7);  // Q4_0: column 4p + w; Q8_0: 8b + i
    const int e = FMT == 2 ? ((c >> 2) & 3) : (c >> 3);
    return (chunk * G + g) * 4 + e;
  });
  for (int g = threadIdx.x; g < G; g += WARPS * 32) {
    float o = 0.f;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const F4 v = xs4[c * G + g];
      if (FMT == 1) o += 32896.f * (v.x + v.y + v.z + v.w);  // every byte reads 32768 + (q + 128)
      else {  // chunk 2w: nibbles 0-3, 2w + 1: nibbles 4-7; odd nibbles 1, 3, 5 read 2048 + q, the rest 128 + q
        const bool hi = c & 1;
        o += hi ? 136.f * v.x + 2056.f * v.y + 136.f * v.z + 136.f * v.w
                : 136.f * v.x + 2056.f * v.y + 136.f * v.z + 2056.f * v.w;
      }
    }
    xoff[g] = o;
  }
  __syncthreads();

  if constexpr (!LOOP) {
    const float y = dot_rows<FMT, G, GS, RPW, NG, U>(b, sc, xs4, xoff, slice, lane);
    finish_rows<DT, RPW, KSPLIT, MODE>(y, t * rows + first, N, red, FINISH_ARGS);
  } else {
    for (;; t += 2 * gridDim.x) {  // two tiles a turn, so that each set of registers stays put
      float y = dot_rows<FMT, G, GS, RPW, NG, U>(b, sc, xs4, xoff, slice, lane);
      load_rows<FMT, G, GS, RPW, NG, U>(b, sc, wv, scales, (t + 2 * gridDim.x) * rows + first, N, slice, lane);
      finish_rows<DT, RPW, KSPLIT, MODE>(y, t * rows + first, N, red, FINISH_ARGS);
      if (t + gridDim.x >= tiles) break;
      y = dot_rows<FMT, G, GS, RPW, NG, U>(b2, sc2, xs4, xoff, slice, lane);
      load_rows<FMT, G, GS, RPW, NG, U>(b2, sc2, wv, scales, (t + 3 * gridDim.x) * rows + first, N, slice, lane);
      finish_rows<DT, RPW, KSPLIT, MODE>(y, (t + gridDim.x) * rows + first, N, red, FINISH_ARGS);
      if (t + 2 * gridDim.x >= tiles) break;
    }
  }
}

// Rows tokens[b] of a GGUF token-embedding table (raw bytes, row_bytes a row) in the compute dtype DT, one
// block a row: FMT 2 Q4_0 (18-byte blocks: fp16 d, then 16 bytes holding column j in the low nibble of
// byte j and j + 16 in the high one; d * (q - 8)), 1 Q8_0 (34-byte blocks: fp16 d, 32 int8; d * q), 3 F32,
// 4 F16, 5 BF16; the value computed in float32 as gguf.dequantize_bytes does, then rounded once. The next
// kernel may launch at once (it waits for this one with griddepcontrol.wait).
template <int FMT, int DT>
__global__ void embed_rows(const unsigned char* __restrict__ table, i64 row_bytes, const i64* __restrict__ tokens,
                           u16* __restrict__ out, int dim) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const unsigned char* row = table + tokens[blockIdx.x] * row_bytes;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float v;
    if (FMT == 2 || FMT == 1) {
      const unsigned char* p = row + (c >> 5) * (FMT == 2 ? 18 : 34);
      const float d = h2f((u16)(p[0] | (p[1] << 8)));
      const int j = c & 31;
      const int q = FMT == 2 ? ((j < 16 ? p[2 + j] & 15 : p[2 + j - 16] >> 4) - 8) : (int)(signed char)p[2 + j];
      v = (float)q * d;
    } else if (FMT == 3) {
      v = reinterpret_cast<const float*>(row)[c];
    } else {
      v = to_f<FMT == 4 ? 1 : 0>(reinterpret_cast<const u16*>(row)[c]);
    }
    out[(i64)blockIdx.x * dim + c] = from_f<DT>(v);
  }
}
"""

NORM, GLU, RES, ROPE, OUT_F32 = 1, 2, 4, 8, 16
DENSE, Q8_0, Q4_0 = 0, 1, 2  # as driftwood.model.cuda.kernels numbers them
DTYPES = {torch.bfloat16: 0, torch.float16: 1}
# (format, K, N) -> (warps a block, rows a warp group, warps a row): the fastest with PDL on the H100 in
# scripts/gpu/cuda_gemv_sweep.py (2026-11-22; docs/gpu.md, twelfth pass) for the Llama-3.2-1B shapes;
# otherwise by (format, K), else the default
CONFIGS: dict[tuple[int, int, int], tuple[int, int, int]] = {
    (DENSE, 2048, 3072): (8, 4, 2),  # qkv 6.0 us
    (DENSE, 2048, 2048): (8, 2, 1),  # o 4.0 us
    (DENSE, 2048, 16384): (8, 2, 2),  # gate_up 25.2 us
    (DENSE, 8192, 2048): (16, 1, 1),  # down 14.7 us
    (DENSE, 2048, 128256): (8, 2, 2),  # head 172.6 us
    (Q4_0, 2048, 3072): (8, 2, 1),  # qkv 4.6 us (Triton 6.7)
    (Q4_0, 2048, 2048): (16, 1, 1),  # o 2.6 (3.6)
    (Q4_0, 2048, 16384): (8, 2, 1, 1),  # gate_up 10.4 (blocks looping over tiles; 11.4 before, Triton 12.1)
    (Q4_0, 8192, 2048): (16, 1, 1),  # down 8.3 (10.0)
    (Q4_0, 2048, 128256): (16, 1, 1, 1),  # head 63.0 (looping; Triton 64.9)
}
# before the looping blocks (fourteenth pass, 2026-11-23: scripts/gpu/cuda_gemv_sweep.py --formats q4_0),
# for comparison (TritonOps(cuda_loop=False))
CONFIGS_BEFORE_LOOP = {**{k: v for k, v in CONFIGS.items() if len(v) == 3}, (Q4_0, 2048, 16384): (8, 4, 1)}
BY_K = {(DENSE, 8192): (16, 1, 1)}
DEFAULT_CONFIG = (8, 2, 1)
# Quantized products the Triton kernels run faster unless configured above: Q4_0's vocabulary head
# (77 us against 68 without looping blocks: rows >= VOCAB_ROWS, as policy.shape_class calls a matrix
# "vocab"), and every Q8_0 product: alone with PDL
# its qkv and o were faster (5.6 against 6.3 us, 3.6 against 5.4), gate_up and the head even and down
# slower (13.9 against 10.1), but in the step, where the kernel before qkv and o does not let them
# start early, Q8_0 decode took 0.870 ms/token against 0.823 (experiment-decode-cuda-2026-11-22-cuda-quant.json)
VOCAB_ROWS = 32768


def lane_loads(fmt: int, k: int, rpw: int, ksplit: int) -> int:
    """16-byte weight loads a lane holds at once in the quantized kernel (at most 8: more spill)."""
    groups = k // 32 // ksplit
    return rpw * -(-groups // 32) * (2 if fmt == Q8_0 else 1)


def pick(fmt: int, k: int, n: int, rope: bool = False, loop: bool = True) -> tuple[int, ...] | None:
    """The launch configuration for an (n, k) matrix (``rope``: the QKV product with RoPE), None
    where the Triton kernel should run it (``loop=False``: :data:`CONFIGS_BEFORE_LOOP`)."""
    cfg = (CONFIGS if loop else CONFIGS_BEFORE_LOOP).get((fmt, k, n)) or BY_K.get((fmt, k))
    if cfg is None:
        if fmt == Q8_0 or (fmt == Q4_0 and n >= VOCAB_ROWS):
            return None
        cfg = default_config(fmt, k)
    return fit(fmt, k, cfg, rope) if cfg else None


def default_config(fmt: int, k: int) -> tuple[int, int, int] | None:
    """:data:`DEFAULT_CONFIG` fitted to K = k (:func:`fit`), with one row a group where a lane's
    quantized loads would not fit two."""
    warps, rpw, ksplit = DEFAULT_CONFIG
    if fmt != DENSE and lane_loads(fmt, k, rpw, ksplit) > 8:
        rpw = 1
    return fit(fmt, k, (warps, rpw, ksplit))


def fit(fmt: int, k: int, cfg: tuple[int, ...], rope: bool = False) -> tuple[int, ...] | None:
    """``cfg`` made valid for K = k, or None: RoPE pairs rows within a warp (an even number of
    rows a group), the quantized kernel holds at most 8 loads a lane, 4 with RoPE (more warps a
    row where needed), and K divides among a row's warps (256 columns a slice). A fourth element
    1 (quantized only, one warp a row, twice the loads a lane): blocks that loop over tiles."""
    if len(cfg) > 3 and cfg[3]:
        warps, rpw, ksplit = cfg[:3]
        ok = fmt != DENSE and ksplit == 1 and not rope and 2 * lane_loads(fmt, k, rpw, 1) <= 8 and k % 256 == 0
        return (warps, rpw, 1, 1) if ok else None
    warps, rpw, ksplit = cfg[:3]
    if rope and rpw % 2:
        rpw += 1
    most = 4 if rope else 8  # the RoPE epilogue's registers: 8 loads a lane spilled at K = 8192
    while (fmt != DENSE and lane_loads(fmt, k, rpw, ksplit) > most and warps % (2 * ksplit) == 0
           and k % (512 * ksplit) == 0):
        ksplit *= 2
    ok = warps % ksplit == 0 and k % (256 * ksplit) == 0 and (fmt == DENSE or lane_loads(fmt, k, rpw, ksplit) <= 8)
    return (warps, rpw, ksplit) if ok else None


class CompileError(RuntimeError):
    """NVRTC refused the source, or is not there."""


def _nvrtc() -> Any:
    from torch.cuda._utils import _get_gpu_rtc_library

    return _get_gpu_rtc_library()


def compile_cubin(source: str, names: list[str], arch: str, lib: Any = None,
                  options: tuple[str, ...] = ()) -> tuple[bytes, dict[str, str], str]:
    """``source`` compiled for ``arch`` (e.g. "90") -> (CUBIN, {name expression: lowered name},
    the compiler's log). ``lib``: libnvrtc (default torch's); ``options``: more NVRTC options."""
    lib = lib or _nvrtc()
    prog = ctypes.c_void_p()

    def check(rc: int, what: str) -> None:
        if rc != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise CompileError(f"NVRTC {what} failed: {lib.nvrtcGetErrorString(rc).decode()}")

    def program_log() -> str:
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        return buf.value.decode(errors="replace")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"driftwood.cu", 0, None, None), "create")
    try:
        for n in names:
            check(lib.nvrtcAddNameExpression(prog, n.encode()), "name expression")
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17", b"-default-device",
                *(o.encode() for o in options)]
        if lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) != 0:
            raise CompileError(f"NVRTC compile failed:\n{program_log()}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "CUBIN size")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "CUBIN")
        lowered = {}
        for n in names:
            out = ctypes.c_char_p()
            check(lib.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(out)), "lowered name")
            lowered[n] = out.value.decode()
        return cubin.raw, lowered, program_log()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def kernel_name(fmt: int, dt: int, k: int, warps: int, rpw: int, ksplit: int, mode: int, pdl: bool,
                loop: int = 0) -> str:
    head = "gemv_row<" if fmt == DENSE else f"qgemv_row<{fmt}, "
    return f"{head}{dt}, {k}, {warps}, {rpw}, {ksplit}, {mode}, {int(pdl)}{', 1' if loop else ''}>"


def kernel(device_index: int, name: str, shared: int = 0, source: str | None = None) -> Any:
    """The compiled kernel ``name`` of ``source`` (default :data:`SOURCE`) on that device, allowed
    ``shared`` bytes of dynamic shared memory (each instantiation compiled once)."""
    return _kernel(device_index, name, shared, source or SOURCE)


@functools.cache
def _kernel(device_index: int, name: str, shared: int, source: str) -> Any:
    from torch.cuda._utils import _cuda_load_module

    major, minor = torch.cuda.get_device_capability(device_index)
    with torch.cuda.device(device_index):
        cubin, lowered, _ = compile_cubin(source, [name], f"{major}{minor}")
        fn = _cuda_load_module(cubin, [lowered[name]])[lowered[name]]
        fn.set_shared_memory_config(shared)
        return fn


@functools.cache
def available(device_index: int = 0) -> bool:
    """Whether the kernels compile and load here (NVRTC present, a CUDA device, the driver's
    cuLaunchKernelEx, torch's helpers where this module expects them); logged once if not."""
    if not torch.cuda.is_available() or torch.version.hip:
        return False
    try:
        from torch.cuda._utils import _check_cuda, _get_gpu_runtime_library  # noqa: F401 (launch's)

        if not hasattr(_get_gpu_runtime_library(), "cuLaunchKernelEx"):
            raise RuntimeError("the CUDA driver has no cuLaunchKernelEx")
        kernel(device_index, kernel_name(DENSE, 0, 256, 1, 1, 1, 0, False))
        return True
    except Exception as exc:  # no NVRTC, an old driver, another torch: the Triton kernels serve
        log.warning("CUDA C++ kernels unavailable (%s); the Triton kernels run instead", exc)
        return False


def in_features(fmt: int, weight: torch.Tensor) -> int:
    """K of a dense matrix, or of BlockLinear codes (int32 words: 8 Q4_0 or 4 Q8_0 codes each)."""
    return weight.shape[1] * {DENSE: 1, Q8_0: 4, Q4_0: 8}[fmt]


def supports(x: torch.Tensor, weight: torch.Tensor, glu: bool = False, fmt: int = DENSE, rope: bool = False,
             loop: bool = True) -> bool:
    """Whether :func:`gemv_row` runs this product: one row of bfloat16/float16 x; dense weights
    of x's dtype, or Q4_0/Q8_0 codes (int32); K a multiple of 256; 16-byte aligned rows; a
    configuration by :func:`pick` (``loop`` as there)."""
    k = in_features(fmt, weight)
    wdtype = x.dtype if fmt == DENSE else torch.int32
    return (x.is_cuda and x.shape[0] == 1 and x.dtype in DTYPES and weight.dtype == wdtype
            and k % 256 == 0 and x.shape[1] == (2 * k if glu else k) and x.stride(1) == 1
            and weight.is_contiguous() and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and pick(fmt, k, weight.shape[0], rope, loop) is not None and available(x.device.index or 0))


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def launch(fn: Any, grid: int, block: int, shared: int, args: list[ctypes._SimpleCData], pdl: bool) -> None:
    """``fn`` on torch's current stream (captured into a CUDA graph like any kernel); ``pdl``: it
    may start before the previous kernel ends (the kernel waits with griddepcontrol.wait)."""
    from torch.cuda._utils import _check_cuda, _get_gpu_runtime_library

    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    cfg = _LaunchConfig((grid, 1, 1), (block, 1, 1), shared, torch.cuda.current_stream().cuda_stream,
                        ctypes.pointer(attr) if pdl else None, 1 if pdl else 0)
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
    _check_cuda(_get_gpu_runtime_library().cuLaunchKernelEx(ctypes.byref(cfg), fn.func, params, None))


def pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


_ptr = pointer


def gemv_row(x: torch.Tensor, weight: torch.Tensor, *, fmt: int = DENSE, scales: torch.Tensor | None = None,
             residual: torch.Tensor | None = None, glu: bool = False,
             out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
             norm: tuple[torch.Tensor, float] | None = None, rope: tuple | None = None,
             config: tuple[int, ...] | None = None, pdl: bool = False) -> torch.Tensor:
    """x (1, K) (or (1, 2K) with ``glu``) -> (1, N) = x' @ W.T (+ residual), as
    :func:`~driftwood.model.cuda.kernels.gemv` defines it for one row (where :func:`supports`):
    W dense, or Q4_0/Q8_0 ``fmt`` codes with their ``scales`` (BlockLinear's layout).
    ``pdl``: launched to overlap the previous kernel's end (Hopper and later)."""
    n, k = weight.shape[0], in_features(fmt, weight)
    cfg = fit(fmt, k, config, rope is not None) if config else pick(fmt, k, n, rope is not None)
    assert cfg is not None, "the Triton kernel runs this product (nvrtc.supports)"
    warps, rpw, ksplit = cfg[:3]
    loop = len(cfg) > 3 and cfg[3]
    pdl = pdl and pdl_supported(x.device.index or 0)
    mode = (NORM if norm is not None else 0) | (GLU if glu else 0) | (RES if residual is not None else 0)
    i32 = ctypes.c_int
    if rope is not None:
        pos, inv_freq, kc, vc, heads, kv_heads, head_dim = rope
        assert residual is None and n == (heads + 2 * kv_heads) * head_dim and rpw % 2 == 0
        assert kc.stride() == vc.stride() and kc.stride(-1) == 1 and kc.dtype == x.dtype and kc.shape[0] == 1
        assert pos.dtype == torch.int64 and inv_freq.dtype == torch.float32
        mode |= ROPE
        out = torch.empty(1, heads, head_dim, dtype=x.dtype, device=x.device)  # the rotated queries
        tail = [_ptr(pos), _ptr(inv_freq), _ptr(out), _ptr(kc), _ptr(vc), i32(kc.stride(1)), i32(kc.stride(2)),
                i32(heads), i32(kv_heads), i32(head_dim)]
    else:
        if out is None:
            out = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
        if out.dtype == torch.float32:
            mode |= OUT_F32
        else:
            assert out.dtype == x.dtype
        tail = [_ptr(x)] * 5 + [i32(0)] * 5
    nw, eps = norm if norm is not None else (x, 0.0)
    assert fmt == DENSE or (scales is not None and scales.dtype == torch.float16 and scales.is_contiguous())
    shared = k * 4 + (0 if fmt == DENSE else k // 32 * 4)  # x as float32 (+ a float a group)
    index = x.device.index or 0
    fn = kernel(index, kernel_name(fmt, DTYPES[x.dtype], k, warps, rpw, ksplit, mode, pdl, loop), shared)
    rows = warps // ksplit * rpw
    tiles = (n + rows - 1) // rows
    args = [_ptr(x), _ptr(weight), _ptr(scales if scales is not None else x), _ptr(nw),
            _ptr(residual if residual is not None else x), _ptr(out), i32(n), ctypes.c_double(eps), *tail]
    # a looping kernel: as many blocks as are resident at once (its launch bounds: 512 threads an SM)
    grid = min(tiles, _multiprocessors(index) * (512 // (warps * 32))) if loop else tiles
    launch(fn, grid, warps * 32, shared, args, pdl)
    return out


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def pdl_supported(device_index: int = 0) -> bool:
    """Programmatic dependent launch: compute capability 9.0 and later."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


EMBED_FORMATS = {"Q4_0": 2, "Q8_0": 1, "F32": 3, "F16": 4, "BF16": 5}  # GGML type name -> embed_rows' FMT


def embed_supports(qtype_name: str, dim: int, tokens: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`embed` gathers rows of this table: Q4_0, Q8_0 or float rows, a CUDA device
    where the kernels compile, the compute dtype bfloat16 or float16."""
    return (qtype_name in EMBED_FORMATS and tokens.is_cuda and dtype in DTYPES and dim % 32 == 0
            and tokens.dtype == torch.int64 and available(tokens.device.index or 0))


def embed(table: torch.Tensor, qtype_name: str, dim: int, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``tokens`` (B,) of the raw GGUF table (vocab, bytes a row) uint8 -> (B, dim) ``dtype``,
    one kernel (where :func:`embed_supports`): the values ``dequantize_bytes`` gives."""
    assert table.dtype == torch.uint8 and table.is_contiguous() and tokens.is_contiguous()
    out = torch.empty(tokens.shape[0], dim, dtype=dtype, device=tokens.device)
    name = f"embed_rows<{EMBED_FORMATS[qtype_name]}, {DTYPES[dtype]}>"
    fn = kernel(tokens.device.index or 0, name)
    launch(fn, tokens.shape[0], 256, 0, [pointer(table), ctypes.c_longlong(table.shape[1]), pointer(tokens),
                                         pointer(out), ctypes.c_int(dim)], False)
    return out

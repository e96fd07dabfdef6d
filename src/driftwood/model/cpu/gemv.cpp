// Few-row products with weights kept as 4-bit or 8-bit codes in blocks of 32 columns, on CPUs
// with AVX-512 VNNI: the decode step's matrix products.
//
// At batch 1 the decode step reads every weight once per token, so the kernel should run at
// memory speed. torch's int4/int8 weight-only CPU kernels are compute-bound there (bfloat16
// activations); this one does what llama.cpp's repacked kernels do: the activation rows are
// quantized to int8 in blocks of 32 (one float scale per block), and the weights are
// multiplied with them in integers, 16 weight rows at a time, one row per 32-bit lane:
// VPDPBUSD multiplies 4 unsigned weight codes by 4 signed activation codes (broadcast to every
// lane) and adds them to the lane, so 8 of them make one block's dot product for 16 rows, to
// which the block's float scales are applied. No horizontal sums, no shuffles of scales.
//
// Every format is stored the same way:
//
//   w[n, k] = scale[n, g] * u[n, k] + offset[n, g],  g = k / 32,  u unsigned 4- or 8-bit codes
//
// so that  y[m, n] = sum_g scale[n, g] * dx[m, g] * sum_k u[n, k] xq[m, k]
//                  + sum_g offset[n, g] * dx[m, g] * sum_k xq[m, k]          (k in block g)
//
// Q4_0 (w = d (q - 8)): u = q, offset = -8 d. Q4_1 (w = d q + m): u = q, offset = m. Q4_K's
// sub-blocks the same way. Q8_0 (w = d q): u = q + 128, offset = -128 d.
//
// Layout (prepared by driftwood.model.cpu.pack): rows in groups of 16 (the last padded with
// zero rows); for row group r and block g, 8 chunks of 4 columns, chunk c = columns
// 32 g + 4 c .. 32 g + 4 c + 3, as 64 bytes: byte 4 i + b is row 16 r + i, column 32 g + 4 c + b.
//   q8: codes (R, G * 512): the 8 chunks in order.
//   q4: codes (R, G * 256): 4 times 64 bytes, chunk c in the low nibbles and chunk c + 4 in
//       the high nibbles.
//   scale, offset: (R, G, 16) float32, lane i = row 16 r + i.
//
//   gemv(x (M, K) float32|bfloat16, codes, scale, offset, bits 4|8, N) -> (M, N), x's dtype
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define DW_VNNI 1
#else
#define DW_VNNI 0
#endif

namespace {

constexpr int64_t GROUP = 32;
constexpr int64_t LANES = 16;  // weight rows per row group
constexpr int MTILE = 4;       // activation rows per pass over a row group
constexpr int64_t PREFETCH = 4;  // blocks ahead

// Activation rows quantized in blocks of 32: xq (M, K) int8, dx (M, G) the blocks' scales,
// xs (M, G) = dx times the sum of the block's codes. Scratch is per thread, reused.
struct Activations {
  int64_t M, K, G;
  const int8_t* xq;
  const float *dx, *xs;
};

template <typename T>
Activations quantize(const T* x, int64_t M, int64_t K) {
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> f;
  const int64_t G = K / GROUP;
  xq.resize(M * K);
  f.resize(M * G * 2);
  float *dx = f.data(), *xs = f.data() + M * G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const T* b = x + m * K + g * GROUP;
      float v[GROUP];
      float amax = 0.f;
      for (int j = 0; j < GROUP; ++j) {
        v[j] = static_cast<float>(b[j]);
        amax = std::fmax(amax, std::fabs(v[j]));
      }
      const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int sum = 0;
      int8_t* q = xq.data() + m * K + g * GROUP;
      for (int j = 0; j < GROUP; ++j) {
        q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
        sum += q[j];
      }
      dx[m * G + g] = d;
      xs[m * G + g] = d * static_cast<float>(sum);
    }
  return Activations{M, K, G, xq.data(), dx, xs};
}

#if DW_VNNI
// The 8 chunks of block g of a row group as unsigned codes.
template <int BITS>
inline void chunks(const uint8_t* block, __m512i u[8]) {
  if constexpr (BITS == 4) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m512i b = _mm512_loadu_si512(block + c * 64);
      u[c] = _mm512_and_si512(b, mask);
      u[c + 4] = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask);
    }
  } else {
    for (int c = 0; c < 8; ++c) u[c] = _mm512_loadu_si512(block + c * 64);
  }
}

// Rows m0 .. m0 + MT - 1 of y, for row groups [rbegin, rend).
template <int BITS, int MT, typename T>
void tile(const Activations& a, const uint8_t* codes, const float* scale, const float* offset,
          T* y, int64_t m0, int64_t N, int64_t rbegin, int64_t rend) {
  const int64_t K = a.K, G = a.G, gbytes = BITS == 4 ? 256 : 512;
  for (int64_t r = rbegin; r < rend; ++r) {
    const uint8_t* rc = codes + r * G * gbytes;
    const float* rs = scale + r * G * LANES;
    const float* ro = offset + r * G * LANES;
    __m512 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      {  // a few blocks ahead (the stream runs on into the next row group): measured 1.5-2x
         // faster on matrices of a few hundred KB, where the hardware prefetcher has no time
        const uint8_t* ahead = rc + (g + PREFETCH) * gbytes;
        for (int64_t l = 0; l < gbytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + l), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(rs + (g + PREFETCH) * LANES), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(ro + (g + PREFETCH) * LANES), _MM_HINT_T0);
      }
      __m512i u[8];
      chunks<BITS>(rc + g * gbytes, u);
      const __m512 sv = _mm512_loadu_ps(rs + g * LANES), ov = _mm512_loadu_ps(ro + g * LANES);
      for (int i = 0; i < MT; ++i) {
        const int64_t m = m0 + i;
        const int32_t* xw = reinterpret_cast<const int32_t*>(a.xq + m * K + g * GROUP);
        __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();  // two chains
        for (int c = 0; c < 8; c += 2) {
          d0 = _mm512_dpbusd_epi32(d0, u[c], _mm512_set1_epi32(xw[c]));
          d1 = _mm512_dpbusd_epi32(d1, u[c + 1], _mm512_set1_epi32(xw[c + 1]));
        }
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1));
        acc[i] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sv, _mm512_set1_ps(a.dx[m * G + g])), acc[i]);
        acc[i] = _mm512_fmadd_ps(ov, _mm512_set1_ps(a.xs[m * G + g]), acc[i]);
      }
    }
    const int64_t n0 = r * LANES, valid = N - n0 < LANES ? N - n0 : LANES;
    for (int i = 0; i < MT; ++i) {
      T* out = y + (m0 + i) * N + n0;
      if constexpr (std::is_same_v<T, float>) {
        _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << valid) - 1), acc[i]);
      } else {
        alignas(64) float lanes[LANES];
        _mm512_store_ps(lanes, acc[i]);
        for (int64_t j = 0; j < valid; ++j) out[j] = static_cast<T>(lanes[j]);
      }
    }
  }
}

template <int BITS, typename T>
void rows(const Activations& a, const uint8_t* codes, const float* scale, const float* offset,
          T* y, int64_t N, int64_t rbegin, int64_t rend) {
  int64_t m0 = 0;
  for (; m0 + MTILE <= a.M; m0 += MTILE) tile<BITS, MTILE, T>(a, codes, scale, offset, y, m0, N, rbegin, rend);
  switch (a.M - m0) {
    case 3: tile<BITS, 3, T>(a, codes, scale, offset, y, m0, N, rbegin, rend); break;
    case 2: tile<BITS, 2, T>(a, codes, scale, offset, y, m0, N, rbegin, rend); break;
    case 1: tile<BITS, 1, T>(a, codes, scale, offset, y, m0, N, rbegin, rend); break;
    default: break;
  }
}
#endif

at::Tensor gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                const at::Tensor& offset, int64_t bits, int64_t N) {
  TORCH_CHECK(DW_VNNI, "driftwood::gemv was built without AVX-512 VNNI");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu() && scale.device().is_cpu() &&
              offset.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % GROUP == 0, "x must be (M, K) with K a multiple of 32");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), G = K / GROUP, R = (N + LANES - 1) / LANES;
  TORCH_CHECK(N > 0 && codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kByte &&
              codes.size(0) == R && codes.size(1) == G * (bits == 4 ? 256 : 512),
              "codes must be (ceil(N / 16), K / 32 * 8 * bits) uint8");
  for (const at::Tensor* t : {&scale, &offset})
    TORCH_CHECK(t->dim() == 3 && t->is_contiguous() && t->scalar_type() == at::kFloat &&
                t->size(0) == R && t->size(1) == G && t->size(2) == LANES,
                "scale and offset must be (ceil(N / 16), K / 32, 16) float32");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, xc.options());
#if DW_VNNI
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float *s = scale.data_ptr<float>(), *o = offset.data_ptr<float>();
  auto run = [&](auto* xp, auto* yp) {
    const Activations a = quantize(xp, M, K);
    at::parallel_for(0, R, 4, [&](int64_t begin, int64_t end) {
      if (bits == 4) rows<4>(a, c, s, o, yp, N, begin, end);
      else rows<8>(a, c, s, o, yp, N, begin, end);
    });
  };
  if (xc.scalar_type() == at::kFloat) run(xc.data_ptr<float>(), y.data_ptr<float>());
  else run(xc.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
#endif
  return y;
}

bool available() { return DW_VNNI; }

}  // namespace

TORCH_LIBRARY(driftwood, m) {
  m.def("gemv(Tensor x, Tensor codes, Tensor scale, Tensor offset, int bits, int N) -> Tensor");
  m.def("available() -> bool");
}

TORCH_LIBRARY_IMPL(driftwood, CPU, m) { m.impl("gemv", gemv); }

TORCH_LIBRARY_IMPL(driftwood, CompositeExplicitAutograd, m) { m.impl("available", available); }

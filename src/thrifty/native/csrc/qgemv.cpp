// thrifty::qgemv: y = x W^T (+ bias) for few-token steps (decode) with 4- or 8-bit weights, on AVX2 + FMA + F16C.
//
//   w[n, k] = scale[n, g] * q[n, k] + min[n, g]       g = k / group (group: a multiple of 32; K % 64 == 0)
//
// The activations are quantized to int8 per 32 values (one float scale each, as llama.cpp's Q8_0 does) and
// multiplied with maddubs: 32 products per instruction. The min term needs the group sums of x only:
// sum_k (s q + m) x = s * sum_k q x + m * sum_k x.
//
// Weight layouts (what thrifty/quant/native.py packs):
//   4 bits: uint8 [N, K/2]; per 64 values of a row, byte j holds q[j] (low nibble) and q[j + 32] (high), so one
//           256-bit load and two masks unpack two 32-value chunks.
//   8 bits: int8 [N, K], q in -128..127 (|q| < 128 for maddubs' sign trick, which every quantizer here keeps).
// scales, mins: float16 [N, K / group]; mins may be absent (symmetric formats).
//
// Two inner loops over the same int8 x (see tile and tile_vnni): AVX2 maddubs + madd (every CPU the kernels build
// on), and AVX512-VNNI vpdpbusd, 64 products per instruction, where the CPU has it. The integer dots of both are
// exact; they differ only in the order the float chunk products are summed.
#include "vec.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

namespace thrifty {
namespace int8dot {
bool has_vnni();  // attention.cpp: AVX512F / BW / VL / VNNI
}

namespace {

constexpr int64_t kChunk = 32;  // values per activation scale

// x [M, K] float -> int8 values, a scale per 32 values, and the sum of the quantized x per weight group.
struct QuantizedX {
  std::vector<int8_t> q;
  std::vector<float> d;     // [M, K/32]
  std::vector<float> gsum;  // [M, K/group]
};

template <typename T>
QuantizedX quantize_x(const T* x, int64_t m, int64_t k, int64_t group) {
  QuantizedX out;
  const int64_t nc = k / kChunk, ng = k / group;
  out.q.resize(m * k);
  out.d.resize(m * nc);
  out.gsum.assign(m * ng, 0.f);
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t c = 0; c < nc; ++c) {
      const T* xc = x + t * k + c * kChunk;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = load8(xc + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[i]));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, amax);
      float a = 0.f;
      for (int i = 0; i < 8; ++i) a = std::max(a, lanes[i]);
      const float d = a / 127.f;
      const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
      out.d[t * nc + c] = d;
      __m256i i32[4];
      for (int i = 0; i < 4; ++i)
        i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT));
      // the group sums of the quantized x, so the kernel computes W x' exactly for the x' it multiplies: the
      // rounding error then meets the (centred) weights, not the offset-carrying levels q * scale
      const __m256i isum = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
      out.gsum[t * ng + (c * kChunk) / group] += d * hsum(_mm256_cvtepi32_ps(isum));
      // pack 4 x 8 int32 -> 32 int8 in order (packs work per 128-bit lane, the permute restores the order)
      __m256i i16a = _mm256_packs_epi32(i32[0], i32[1]);
      __m256i i16b = _mm256_packs_epi32(i32[2], i32[3]);
      __m256i i8 = _mm256_packs_epi16(i16a, i16b);
      i8 = _mm256_permutevar8x32_epi32(i8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + t * k + c * kChunk), i8);
    }
  }
  return out;
}

inline __m256 dot_u8(__m256i w, __m256i x) {  // w 0..255 unsigned, x signed: 8 float partial sums
  const __m256i p16 = _mm256_maddubs_epi16(w, x);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

inline __m256 dot_s8(__m256i w, __m256i x) {  // both signed: |w| * (x * sign(w))
  return dot_u8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

inline float half(const uint16_t* p) { return _cvtsh_ss(*p); }

struct Problem {
  const uint8_t* w;
  const uint16_t* scales;
  const uint16_t* mins;  // may be null
  const QuantizedX* x;
  void* y;               // [M, N] float32 or bf16
  bool y_bf16;
  const float* bias;     // [N] or null
  int64_t m, n, k, group;

  void put(int64_t t, int64_t row, float v) const {
    if (bias) v += bias[row];
    if (y_bf16) static_cast<at::BFloat16*>(y)[t * n + row] = static_cast<at::BFloat16>(v);
    else static_cast<float*>(y)[t * n + row] = v;
  }
};

constexpr int64_t kMaxChunks = 1024;  // K <= 32768
constexpr int64_t kPrefetch = 3072;  // bytes ahead in a row's weights (2048: 13.3 ms, 3072: 12.5, 4096: 13.2)

// sum_g min[g] * (sum of x over group g)
inline float min_term(const uint16_t* mins, const float* gsum, int64_t ng) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= ng; g += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g))),
                          _mm256_loadu_ps(gsum + g), acc);
  float sum = hsum(acc);
  for (; g < ng; ++g) sum += _cvtsh_ss(mins[g]) * gsum[g];
  return sum;
}

// Per (row, token) of a tile, the product of the weight scale and the activation scale of every 32-value chunk.
// out: R * M rows of `stride` floats.
template <int M, int R>
void chunk_scales(const Problem& p, int64_t n0, int64_t t0, float* out, int64_t stride) {
  const int64_t ng = p.k / p.group, nc = p.k / kChunk, per = p.group / kChunk;
  alignas(32) float s[kMaxChunks];
  for (int r = 0; r < R; ++r) {
    const uint16_t* sr = p.scales + (n0 + r) * ng;
    if (per == 1) {
      int64_t c = 0;
      for (; c + 8 <= nc; c += 8)
        _mm256_store_ps(s + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sr + c))));
      for (; c < nc; ++c) s[c] = _cvtsh_ss(sr[c]);
    } else {
      for (int64_t g = 0; g < ng; ++g) {
        const float v = _cvtsh_ss(sr[g]);
        for (int64_t j = 0; j < per; ++j) s[g * per + j] = v;
      }
    }
    for (int t = 0; t < M; ++t) {
      const float* xd = p.x->d.data() + (t0 + t) * nc;
      float* o = out + (r * M + t) * stride;
      int64_t c = 0;
      for (; c + 8 <= nc; c += 8)
        _mm256_store_ps(o + c, _mm256_mul_ps(_mm256_load_ps(s + c), _mm256_loadu_ps(xd + c)));
      for (; c < nc; ++c) o[c] = s[c] * xd[c];
    }
  }
}

// R rows x M tokens of y; R * M accumulators stay in registers.
template <int BITS, int M, int R>
void tile(const Problem& p, int64_t n0, int64_t t0) {
  const int64_t k = p.k, ng = k / p.group, nc = k / kChunk, row_bytes = BITS == 4 ? k / 2 : k;
  alignas(32) float sxd[R * M][kMaxChunks];
  chunk_scales<M, R>(p, n0, t0, &sxd[0][0], kMaxChunks);
  __m256 acc[R][M];
  float macc[R][M];
  const int8_t* xq[M];
  for (int t = 0; t < M; ++t) xq[t] = p.x->q.data() + (t0 + t) * k;
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < M; ++t) {
      acc[r][t] = _mm256_setzero_ps();
      macc[r][t] = p.mins ? min_term(p.mins + (n0 + r) * ng, p.x->gsum.data() + (t0 + t) * ng, ng) : 0.f;
    }
  for (int64_t c = 0; c < nc; c += 2) {  // two 32-value chunks a step
    __m256i xa[M], xb[M];
    for (int t = 0; t < M; ++t) {
      xa[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[t] + c * kChunk));
      xb[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[t] + (c + 1) * kChunk));
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = p.w + (n0 + r) * row_bytes;
      // software prefetch ~3 KB ahead in the weight stream: 17.4 -> 12.5 ms for the 0.5B's weights (2 Zen 3 cores)
      _mm_prefetch(reinterpret_cast<const char*>(wr + (BITS == 4 ? c * 16 : c * kChunk) + kPrefetch), _MM_HINT_T0);
      __m256i wa, wb;
      if constexpr (BITS == 4) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 16));
        const __m256i low = _mm256_set1_epi8(0x0F);
        wa = _mm256_and_si256(packed, low);
        wb = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
      } else {
        wa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * kChunk));
        wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + (c + 1) * kChunk));
      }
      for (int t = 0; t < M; ++t) {
        const float* sc = sxd[r * M + t];
        const __m256 da = BITS == 4 ? dot_u8(wa, xa[t]) : dot_s8(wa, xa[t]);
        const __m256 db = BITS == 4 ? dot_u8(wb, xb[t]) : dot_s8(wb, xb[t]);
        acc[r][t] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + c), da, acc[r][t]);
        acc[r][t] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + c + 1), db, acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < M; ++t) p.put(t0 + t, n0 + r, hsum(acc[r][t]) + macc[r][t]);
}

// All tokens for rows [lo, hi): tokens in tiles of up to 4, rows in tiles of 4 / 2 / 1.
template <int BITS>
void rows_tile(const Problem& p, int64_t lo, int64_t hi) {
  int64_t t0 = 0;
  for (; t0 + 4 <= p.m; t0 += 4)
    for (int64_t n = lo; n < hi; ++n) tile<BITS, 4, 1>(p, n, t0);
  const int64_t rest = p.m - t0;
  int64_t n = lo;
  if (rest == 1) {
    for (; n + 4 <= hi; n += 4) tile<BITS, 1, 4>(p, n, t0);
    for (; n < hi; ++n) tile<BITS, 1, 1>(p, n, t0);
  } else if (rest == 2) {
    for (; n + 2 <= hi; n += 2) tile<BITS, 2, 2>(p, n, t0);
    for (; n < hi; ++n) tile<BITS, 2, 1>(p, n, t0);
  } else if (rest == 3) {
    for (; n < hi; ++n) tile<BITS, 3, 1>(p, n, t0);
  }
}

constexpr int64_t kBlockBytes = 64 * 1024;  // weights per row block: they stay in L2 while every token tile reads them

// Rows in blocks of ~64 KB of weights, all token tiles over one block before the next: with many tokens the
// weights are read from memory once instead of once per 4-token tile (M=16, 9728x896: 2.97 -> 1.4 ms).
template <int BITS>
void rows(const Problem& p, int64_t lo, int64_t hi) {
  const int64_t row_bytes = BITS == 4 ? p.k / 2 : p.k;
  const int64_t block = p.m <= 4 ? hi - lo : std::max<int64_t>(4, (kBlockBytes / row_bytes) & ~int64_t{3});
  for (int64_t a = lo; a < hi; a += block) rows_tile<BITS>(p, a, std::min(hi, a + block));
}

// ---- AVX512-VNNI path -----------------------------------------------------------------------------------
// One zmm covers 64 values (two 32-value chunks) of a row, dwords interleaved: dword 2j holds values 4j..4j+3 of
// chunk c, dword 2j+1 those of chunk c+1. vpdpbusd then leaves chunk c's partial sums in the even lanes and chunk
// c+1's in the odd ones, so one 8-byte broadcast of the two chunks' scales (s_c, s_c+1, s_c, ...) scales them:
// per 64 values and (row, token) a dpbusd, a cvt and an fma, against 10 instructions on AVX2. x is laid out the
// same way once per call. int8 weights become u8 by flipping the sign bit (w + 128); the accumulator then starts
// at -128 * (the x dword's sum) per lane, so the dot stays exact.
#ifndef THRIFTY_VNNI
#define THRIFTY_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#endif

// x for the VNNI tiles, step-major (a step = 64 values) so that a tile's tokens sit at constant offsets from one
// pointer: the 8-token tiles otherwise run out of general registers for their 24 row pointers and spill.
// 64-byte aligned storage: a zmm load that straddles two cache lines costs two (malloc aligns to 16).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};

struct VnniX {
  int64_t mpad;              // M rounded up to 8 (padding tokens are zero)
  std::vector<int8_t, Aligned64<int8_t>> q;      // [K/64, mpad, 64]: x's int8 values, dwords interleaved
  std::vector<int32_t, Aligned64<int32_t>> corr; // [K/64, mpad, 16]: -128 * each dword's sum (int8 weights only)
  std::vector<float, Aligned64<float>> d;  // [K/64, mpad, 2]: the scales of the step's two chunks
  std::vector<float> gsum_t; // [K/group, mpad]: QuantizedX::gsum transposed, so 8 tokens' sums are one load
};

THRIFTY_VNNI VnniX interleave_x(const QuantizedX& qx, int64_t m, int64_t k, int64_t group, bool corr) {
  VnniX out;
  const int64_t ng = k / group, nc = k / kChunk, steps = k / 64;
  const int64_t mp = out.mpad = (m + 7) & ~int64_t{7};
  out.q.assign(steps * mp * 64, 0);
  out.d.assign(steps * mp * 2, 0.f);
  out.gsum_t.assign(ng * mp, 0.f);
  if (corr) out.corr.assign(steps * mp * 16, 0);
  const __m512i idx = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  const __m512i u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t g = 0; g < ng; ++g) out.gsum_t[g * mp + t] = qx.gsum[t * ng + g];
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t at = s * mp + t;
      const __m512i v = _mm512_permutexvar_epi32(idx, _mm512_loadu_si512(qx.q.data() + t * k + s * 64));
      _mm512_storeu_si512(out.q.data() + at * 64, v);
      out.d[at * 2] = qx.d[t * nc + 2 * s];
      out.d[at * 2 + 1] = qx.d[t * nc + 2 * s + 1];
      if (corr)
        _mm512_storeu_si512(out.corr.data() + at * 16,
                            _mm512_sub_epi32(_mm512_setzero_si512(),
                                             _mm512_dpbusd_epi32(_mm512_setzero_si512(), u128, v)));
    }
  }
  return out;
}

struct VnniProblem {
  const Problem* p;
  const VnniX* x;
};

THRIFTY_VNNI inline __mmask16 first(int64_t n) {  // lanes 0 .. min(n, 16) - 1
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// n float16 values as float32 into out (rounded up to 16, the tail zero).
THRIFTY_VNNI inline void halves(const uint16_t* src, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16)
    _mm512_store_ps(out + i, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n - i), src + i)));
}

// The min terms of one row for tokens t0 .. t0 + 7 (lane t): sum_g min[g] * gsum[t][g], 4 chains; mf: the
// row's mins as float32.
THRIFTY_VNNI inline __m256 min_terms(const float* mf, const VnniX& x, int64_t t0, int64_t ng) {
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const float* gs = x.gsum_t.data() + t0;
  int64_t g = 0;
  for (; g + 4 <= ng; g += 4)
    for (int j = 0; j < 4; ++j)
      a[j] = _mm256_fmadd_ps(_mm256_set1_ps(mf[g + j]), _mm256_loadu_ps(gs + (g + j) * x.mpad), a[j]);
  for (; g < ng; ++g) a[0] = _mm256_fmadd_ps(_mm256_set1_ps(mf[g]), _mm256_loadu_ps(gs + g * x.mpad), a[0]);
  return _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
}

// Per group of R rows, computed once for all tokens before the token tiles run over the group:
//   sxd [K/64, R, mpad, 2]: (w_scale * x_scale) of the step's two chunks; mt [R, mpad]: the min terms.
template <int R>
THRIFTY_VNNI void group_prep(const VnniProblem& vp, int64_t n0, float* sxd, float* mt) {
  const Problem& p = *vp.p;
  const VnniX& x = *vp.x;
  const int64_t ng = p.k / p.group, nc = p.k / kChunk, per = p.group / kChunk, steps = p.k / 64, mp = x.mpad;
  alignas(64) float s[kMaxChunks + 16];
  for (int r = 0; r < R; ++r) {
    const uint16_t* sr = p.scales + (n0 + r) * ng;
    if (per == 1) {
      halves(sr, nc, s);
    } else {
      for (int64_t g = 0; g < ng; ++g) {
        const float v = _cvtsh_ss(sr[g]);
        for (int64_t j = 0; j < per; ++j) s[g * per + j] = v;
      }
    }
    for (int64_t st = 0; st < steps; ++st) {
      double two;
      std::memcpy(&two, s + 2 * st, sizeof two);
      const __m512 ws = _mm512_castpd_ps(_mm512_set1_pd(two));
      const float* xd = x.d.data() + st * mp * 2;
      float* o = sxd + (st * R + r) * mp * 2;
      for (int64_t t = 0; t < mp; t += 8) _mm512_store_ps(o + 2 * t, _mm512_mul_ps(ws, _mm512_load_ps(xd + 2 * t)));
    }
    float* mr = mt + r * mp;
    if (!p.mins) {
      std::fill(mr, mr + mp, 0.f);
      continue;
    }
    halves(p.mins + (n0 + r) * ng, ng, s);
    for (int64_t t = 0; t < mp; t += 8) _mm256_store_ps(mr + t, min_terms(s, x, t, ng));
  }
}

// R rows x M tokens of y, as tile but 64 values a step on vpdpbusd; sxd, mt: the group's (group_prep).
template <int BITS, int M, int R>
THRIFTY_VNNI void tile_vnni(const VnniProblem& vp, int64_t n0, int64_t t0, const float* sxd, const float* mt) {
  const Problem& p = *vp.p;
  const int64_t k = p.k, steps = k / 64, row_bytes = BITS == 4 ? k / 2 : k, mp = vp.x->mpad;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < M; ++t) acc[r][t] = _mm512_setzero_ps();
  const __m512i pair = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i inter = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  const __m512i low = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* xq = vp.x->q.data() + t0 * 64;
  const int32_t* xc = BITS == 8 ? vp.x->corr.data() + t0 * 16 : nullptr;
  const float* sc = sxd + t0 * 2;
  const uint8_t* w0 = p.w + n0 * row_bytes;
  for (int64_t st = 0; st < steps; ++st, xq += mp * 64, xc += BITS == 8 ? mp * 16 : 0, sc += R * mp * 2) {
    __m512i w[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w0 + r * row_bytes + st * (BITS == 4 ? 32 : 64);
      _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetch), _MM_HINT_T0);
      if constexpr (BITS == 4) {  // byte j: q[j] low nibble (chunk 2 st), q[j + 32] high (chunk 2 st + 1)
        const __m512i packed = _mm512_permutexvar_epi32(
            pair, _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr))));
        w[r] = _mm512_and_si512(_mm512_srlv_epi32(packed, shift), low);
      } else {
        w[r] = _mm512_xor_si512(_mm512_permutexvar_epi32(inter, _mm512_loadu_si512(wr)), flip);
      }
    }
    for (int t = 0; t < M; ++t) {
      const __m512i xv = _mm512_load_si512(xq + t * 64);
      const __m512i start = BITS == 4 ? _mm512_setzero_si512() : _mm512_load_si512(xc + t * 16);
      for (int r = 0; r < R; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(start, w[r], xv);
        double two;  // the scales of chunks 2 st and 2 st + 1, side by side
        std::memcpy(&two, sc + (r * mp + t) * 2, sizeof two);
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_castpd_ps(_mm512_set1_pd(two)), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < M; ++t) p.put(t0 + t, n0 + r, _mm512_reduce_add_ps(acc[r][t]) + mt[r * mp + t0 + t]);
}

#ifndef THRIFTY_VNNI_M
#define THRIFTY_VNNI_M 4
#define THRIFTY_VNNI_R 4
#endif
constexpr int kVnniTokens = THRIFTY_VNNI_M;  // a tile: kVnniTokens x kVnniRows accumulators in zmm registers
constexpr int kVnniRows = THRIFTY_VNNI_R;

// Every token of rows n0 .. n0 + R - 1: tiles of kVnniTokens, then the rest in one tile. The group's weights stay
// in L1 across the token tiles.
template <int BITS, int R>
THRIFTY_VNNI void group_vnni(const VnniProblem& vp, int64_t n0, float* sxd, float* mt) {
  group_prep<R>(vp, n0, sxd, mt);
  const int64_t m = vp.p->m;
  int64_t t0 = 0;
  for (; t0 + kVnniTokens <= m; t0 += kVnniTokens) tile_vnni<BITS, kVnniTokens, R>(vp, n0, t0, sxd, mt);
  switch (m - t0) {
    case 1: tile_vnni<BITS, 1, R>(vp, n0, t0, sxd, mt); break;
    case 2: tile_vnni<BITS, 2, R>(vp, n0, t0, sxd, mt); break;
    case 3: tile_vnni<BITS, 3, R>(vp, n0, t0, sxd, mt); break;
    case 4: if constexpr (kVnniTokens > 4) tile_vnni<BITS, 4, R>(vp, n0, t0, sxd, mt); break;
    case 5: if constexpr (kVnniTokens > 5) tile_vnni<BITS, 5, R>(vp, n0, t0, sxd, mt); break;
    case 6: if constexpr (kVnniTokens > 6) tile_vnni<BITS, 6, R>(vp, n0, t0, sxd, mt); break;
    case 7: if constexpr (kVnniTokens > 7) tile_vnni<BITS, 7, R>(vp, n0, t0, sxd, mt); break;
    default: break;
  }
}

// Rows [lo, hi) in groups of kVnniRows (then single rows).
template <int BITS>
THRIFTY_VNNI void rows_vnni(const VnniProblem& vp, int64_t lo, int64_t hi) {
  const int64_t mp = vp.x->mpad;
  std::vector<float, Aligned64<float>> sxd(vp.p->k / 32 * kVnniRows * mp), mt(kVnniRows * mp);
  int64_t n = lo;
  for (; n + kVnniRows <= hi; n += kVnniRows) group_vnni<BITS, kVnniRows>(vp, n, sxd.data(), mt.data());
  for (; n < hi; ++n) group_vnni<BITS, 1>(vp, n, sxd.data(), mt.data());
}

// Which inner loop: path -1 auto (VNNI where the CPU has it), 1 AVX2, 2 VNNI (an error where the CPU lacks it).
bool use_vnni(int64_t path) {
  TORCH_CHECK(path == -1 || path == 1 || path == 2, "qgemv: path is -1 (auto), 1 (avx2) or 2 (vnni)");
  if (path == 1) return false;
  TORCH_CHECK(path == -1 || int8dot::has_vnni(), "qgemv: the VNNI path needs AVX512F / BW / VL / VNNI");
  return int8dot::has_vnni();
}

at::Tensor qgemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                 const std::optional<at::Tensor>& mins, const std::optional<at::Tensor>& bias, int64_t bits,
                 int64_t group, int64_t path) {
  const bool vnni = use_vnni(path);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "qgemv: x must be a contiguous [M, K] float32 or bf16 tensor");
  TORCH_CHECK(bits == 4 || bits == 8, "qgemv: bits must be 4 or 8");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(k % 64 == 0 && group % kChunk == 0 && k % group == 0 && k / kChunk <= kMaxChunks,
              "qgemv: K must be a multiple of 64 up to 32768, the group a multiple of 32 dividing K");
  TORCH_CHECK(w.is_contiguous() && w.element_size() == 1 && w.size(1) == (bits == 4 ? k / 2 : k),
              "qgemv: packed weight of the wrong shape");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.size(0) == n &&
                  scales.size(1) == k / group, "qgemv: scales must be float16 [N, K / group]");
  if (mins) TORCH_CHECK(mins->sizes() == scales.sizes() && mins->scalar_type() == at::kHalf && mins->is_contiguous(),
                        "qgemv: mins must match scales");
  at::Tensor bias_f;
  if (bias) {
    TORCH_CHECK(bias->numel() == n, "qgemv: bias must have N values");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({m, n}, x.options());
  const QuantizedX qx = x.scalar_type() == at::kFloat ? quantize_x(x.data_ptr<float>(), m, k, group)
                                                      : quantize_x(x.data_ptr<at::BFloat16>(), m, k, group);
  const Problem p{static_cast<const uint8_t*>(w.data_ptr()),
                  reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                  mins ? reinterpret_cast<const uint16_t*>(mins->data_ptr<at::Half>()) : nullptr,
                  &qx, y.data_ptr(), x.scalar_type() == at::kBFloat16,
                  bias ? bias_f.data_ptr<float>() : nullptr, m, n, k, group};
  // split rows in multiples of 4 so each thread keeps the 4-row tiles
  if (vnni) {
    const VnniX vx = interleave_x(qx, m, k, group, bits == 8);
    const VnniProblem vp{&p, &vx};
    at::parallel_for(0, (n + 3) / 4, 16, [&](int64_t lo, int64_t hi) {
      const int64_t a = lo * 4, b = std::min(n, hi * 4);
      if (bits == 4) rows_vnni<4>(vp, a, b); else rows_vnni<8>(vp, a, b);
    });
    return y;
  }
  at::parallel_for(0, (n + 3) / 4, 16, [&](int64_t lo, int64_t hi) {
    const int64_t a = lo * 4, b = std::min(n, hi * 4);
    if (bits == 4) rows<4>(p, a, b); else rows<8>(p, a, b);
  });
  return y;
}

// Rows [lo, hi) of the dense weight, w = scale * q + min per group, into dst (row stride k).
void dequant_rows(const uint8_t* src, const uint16_t* sc, const uint16_t* mn, int bits, int64_t k, int64_t group,
                  int64_t lo, int64_t hi, float* dst) {
  alignas(32) float vals[64];
  const int64_t ng = k / group, row_bytes = bits == 4 ? k / 2 : k;
  for (int64_t r = lo; r < hi; ++r) {
    const uint8_t* wr = src + r * row_bytes;
    float* o = dst + (r - lo) * k;
    for (int64_t c = 0; c < k; c += 64) {  // 64 values: one int4 block, or two int8 chunks
      if (bits == 4) {
        for (int j = 0; j < 32; ++j) {
          vals[j] = static_cast<float>(wr[c / 2 + j] & 15);
          vals[j + 32] = static_cast<float>(wr[c / 2 + j] >> 4);
        }
      } else {
        for (int j = 0; j < 64; ++j) vals[j] = static_cast<float>(static_cast<int8_t>(wr[c + j]));
      }
      for (int h = 0; h < 2; ++h) {  // each 32-value half lies in one group
        const int64_t g = (c + 32 * h) / group;
        const __m256 s = _mm256_set1_ps(half(sc + r * ng + g));
        const __m256 m = _mm256_set1_ps(mn ? half(mn + r * ng + g) : 0.f);
        for (int j = 0; j < 32; j += 8)
          _mm256_storeu_ps(o + c + 32 * h + j, _mm256_fmadd_ps(_mm256_load_ps(vals + 32 * h + j), s, m));
      }
    }
  }
}

struct Packed {
  const uint8_t* w;
  const uint16_t* scales;
  const uint16_t* mins;
  int64_t n, k;
};

Packed check_packed(const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& mins,
                    int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 4 || bits == 8, "thrifty: bits must be 4 or 8");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.element_size() == 1 && scales.scalar_type() == at::kHalf &&
                  scales.is_contiguous(), "thrifty: packed uint8 / int8 weights and float16 scales");
  const int64_t n = w.size(0), k = bits == 4 ? w.size(1) * 2 : w.size(1);
  TORCH_CHECK(k % 64 == 0 && group % kChunk == 0 && k % group == 0 && scales.size(0) == n &&
                  scales.size(1) == k / group, "thrifty: packed weight and scales do not fit");
  if (mins) TORCH_CHECK(mins->sizes() == scales.sizes() && mins->scalar_type() == at::kHalf && mins->is_contiguous(),
                        "thrifty: mins must match scales");
  return {static_cast<const uint8_t*>(w.data_ptr()), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
          mins ? reinterpret_cast<const uint16_t*>(mins->data_ptr<at::Half>()) : nullptr, n, k};
}

// The dense float32 [N, K] weight.
at::Tensor qdequant(const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& mins,
                    int64_t bits, int64_t group) {
  const Packed p = check_packed(w, scales, mins, bits, group);
  at::Tensor out = at::empty({p.n, p.k}, w.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, p.n, 16, [&](int64_t lo, int64_t hi) {
    dequant_rows(p.w, p.scales, p.mins, bits, p.k, group, lo, hi, dst + lo * p.k);
  });
  return out;
}

}  // namespace
}  // namespace thrifty

TORCH_LIBRARY_FRAGMENT(thrifty, lib) {
  lib.def("qgemv(Tensor x, Tensor w, Tensor scales, Tensor? mins, Tensor? bias, int bits, int group, int path=-1) "
          "-> Tensor");
  lib.def("qdequant(Tensor w, Tensor scales, Tensor? mins, int bits, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(thrifty, CPU, lib) {
  lib.impl("qgemv", TORCH_FN(thrifty::qgemv));
  lib.impl("qdequant", TORCH_FN(thrifty::qdequant));
}

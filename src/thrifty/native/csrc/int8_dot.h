// Decode attention over an int8 KV cache with an integer dot product for K (included by attention.cpp).
//
// Why: with 7 query heads per KV head (Qwen2.5 0.5B) the float kernel converts each int8 K code to float32 once
// and then spends 7 FMAs on it, so an int8 cache reads half the bytes of bf16 but does the same multiply-adds,
// and at 8k context the multiply-adds bound the step. Here the G query heads of a task are quantized to two int8
// terms (after the softmax scale and K's channel divisor are folded in): hi = round(q / s), s = absmax / 127, and
// the residual lo = round((q - hi s) / u), u = s / 127 (|lo| <= 64), so q ~ u (127 hi + lo) with ~14 bits where
// one int8 term kept 8 (one term cost Gemma 3's decode perplexity +1.5 % against a float query's +1.1 % over the
// same int8 cache; the 0.5B did not notice). q . k is an exact int32 dot of codes:
//   score[h][t] = float(127 sum_c hi[h][c] kcode[t][c] + sum_c lo[h][c] kcode[t][c]) * u[h] * kscale[t]
// AVX512-VNNI's vpdpbusd does 64 u8 x s8 multiply-adds per instruction (4x an fp32 FMA's 16): K codes become u8
// by flipping their sign bit (k + 128), and 128 * (127 sum hi + sum lo) is subtracted once per head. 16 cached rows
// are transposed so that a vector holds 4 channels of 16 tokens; each K load then serves all G heads through one
// broadcast q dword per head. V stays float32: the softmax weights times the row's scale (folded once per token)
// multiply V codes widened in registers, the G heads' accumulators held in registers (32 channels at a time).
//
// The portable path (AVX2, every CPU the kernels build on) computes the same integer dots and the same float
// operations in the same order, so both paths return bitwise the same output: CI without VNNI gets the
// numbers this machine gets. Error against attention in float over the dequantized cache: only the query's
// quantization, |score error| <= 0.5 * u[h] * kscale[t] * sum_c |kcode[t][c]|
// (tests compare the output with float attention over the same codes, and the two paths bit for bit).
#pragma once

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

namespace thrifty {
namespace int8dot {

constexpr int kGroup = 16;   // query heads per KV head, as attention.cpp's kMaxGroup
constexpr int kDim = 256;    // head dim, as attention.cpp's kMaxDim

constexpr int32_t kHi = 127;   // q ~ unit * (kHi * hi + lo)

// The G query heads of one task as two int8 terms with a unit per head.
struct QueryCodes {
  alignas(64) int8_t code[kGroup][kDim];   // hi
  alignas(64) int8_t low[kGroup][kDim];    // lo, the residual in units of s / 127
  float scale[kGroup];                     // the unit u = absmax / 127^2
  int32_t sum[kGroup];                     // kHi * sum(hi) + sum(lo): the u8 offset's correction
};

// qf [g][kDim] float32 (softmax scale and K's divisor folded in) -> hi = round(q / s), s = absmax / 127, and
// lo = round((q - hi s) / (s / 127)).
inline void quantize_query(const float (*qf)[kDim], int64_t g, int64_t d, QueryCodes& out) {
  for (int64_t h = 0; h < g; ++h) {
    float amax = 0.0f;
    for (int64_t j = 0; j < d; ++j) amax = std::max(amax, std::fabs(qf[h][j]));
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    const float u = s / 127.0f;
    int32_t sum = 0;
    for (int64_t j = 0; j < d; ++j) {
      const float hi = std::nearbyint(std::clamp(qf[h][j] / s, -127.0f, 127.0f));
      const float lo = std::nearbyint(std::clamp((qf[h][j] - hi * s) / u, -127.0f, 127.0f));
      out.code[h][j] = static_cast<int8_t>(hi);
      out.low[h][j] = static_cast<int8_t>(lo);
      sum += kHi * static_cast<int32_t>(hi) + static_cast<int32_t>(lo);
    }
    out.scale[h] = u;
    out.sum[h] = sum;
  }
}

inline int64_t slot_of(const int64_t* table, int64_t bs, int64_t pos) { return table[pos / bs] * bs + pos % bs; }

// ---- portable path (AVX2) ------------------------------------------------------------------------------
inline int32_t dot_codes(const int8_t* a, const int8_t* b, int64_t d) {
  __m256i acc = _mm256_setzero_si256();
  for (int64_t j = 0; j < d; j += 16) {
    const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + j)));
    const __m256i y = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x, y));
  }
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// sc[h * n + i] = q_h . k_(start + i) for the n rows from start.
inline void scores_portable(const int8_t* kc, const at::BFloat16* ks, const int64_t* table, int64_t bs, int64_t start,
                            int64_t n, int64_t d, int64_t g, const QueryCodes& qc, float* sc) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = slot_of(table, bs, start + i);
    const float kscale = static_cast<float>(ks[slot]);
    for (int64_t h = 0; h < g; ++h) {
      const int32_t dot = kHi * dot_codes(kc + slot * d, qc.code[h], d) + dot_codes(kc + slot * d, qc.low[h], d);
      sc[h * n + i] = static_cast<float>(dot) * qc.scale[h] * kscale;
    }
  }
}

// of[h][c] = sum_i w[h * n + i] * vcode_(start + i)[c], accumulated in token order.
inline void weighted_v_portable(const int8_t* vc, const int64_t* table, int64_t bs, int64_t start, int64_t n,
                                int64_t d, int64_t g, const float* w, float (*of)[kDim]) {
  for (int64_t h = 0; h < g; ++h)
    for (int64_t j = 0; j < d; j += 8) _mm256_storeu_ps(of[h] + j, _mm256_setzero_ps());
  for (int64_t i = 0; i < n; ++i) {
    const int8_t* v = vc + slot_of(table, bs, start + i) * d;
    for (int64_t j = 0; j < d; j += 8) {
      const __m256 vv = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v + j))));
      for (int64_t h = 0; h < g; ++h)
        _mm256_storeu_ps(of[h] + j, _mm256_fmadd_ps(_mm256_set1_ps(w[h * n + i]), vv, _mm256_loadu_ps(of[h] + j)));
    }
  }
}

// ---- AVX512-VNNI path -----------------------------------------------------------------------------------
#define THRIFTY_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

bool has_vnni();   // attention.cpp: the running CPU has AVX512F / BW / VL / VNNI

// r[t] = 64 bytes of row t (16 dwords of 4 channels) -> r[j] = dword j of rows 0..15, row t in lane t.
THRIFTY_VNNI inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int p = 0; p < 8; ++p) {
    t[2 * p] = _mm512_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
    t[2 * p + 1] = _mm512_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
  }
  // u[4q + k], 128-bit lane L: dword 4L + k of rows 4q .. 4q + 3
  for (int q = 0; q < 4; ++q) {
    u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    // lanes: dword k | 8+k of rows 0-3, then of rows 4-7 (0x88); dword 4+k | 12+k likewise (0xDD)
    t[k] = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88);
    t[4 + k] = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xDD);
    t[8 + k] = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xDD);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0xDD);
    r[4 + k] = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0xDD);
  }
}

template <int G>
THRIFTY_VNNI void scores_vnni(const int8_t* kc, const at::BFloat16* ks, const int64_t* table, int64_t bs,
                              int64_t start, int64_t n, int64_t d, const QueryCodes& qc, float* sc) {
  alignas(64) static const int8_t zero_row[kDim] = {};
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const int m = static_cast<int>(std::min<int64_t>(16, n - i0));
    const int8_t* rows[16];
    alignas(64) float kscale[16];
    for (int t = 0; t < 16; ++t) {
      if (t < m) {
        const int64_t slot = slot_of(table, bs, start + i0 + t);
        rows[t] = kc + slot * d;
        kscale[t] = static_cast<float>(ks[slot]);
      } else {
        rows[t] = zero_row;
        kscale[t] = 0.0f;
      }
    }
    __m512i acc[G], acc_lo[G];
    for (int h = 0; h < G; ++h) acc[h] = acc_lo[h] = _mm512_setzero_si512();
    for (int64_t c0 = 0; c0 < d; c0 += 64) {
      __m512i r[16];
      for (int t = 0; t < 16; ++t) r[t] = _mm512_loadu_si512(rows[t] + c0);
      transpose16(r);
      for (int j = 0; j < 16; ++j) {
        const __m512i k = _mm512_xor_si512(r[j], flip);   // k + 128 as u8
        for (int h = 0; h < G; ++h) {
          int32_t qd, ld;
          std::memcpy(&qd, qc.code[h] + c0 + 4 * j, 4);
          std::memcpy(&ld, qc.low[h] + c0 + 4 * j, 4);
          acc[h] = _mm512_dpbusd_epi32(acc[h], k, _mm512_set1_epi32(qd));
          acc_lo[h] = _mm512_dpbusd_epi32(acc_lo[h], k, _mm512_set1_epi32(ld));
        }
      }
    }
    const __m512 kv = _mm512_load_ps(kscale);
    const __mmask16 keep = static_cast<__mmask16>((1u << m) - 1u);
    for (int h = 0; h < G; ++h) {
      // kHi * acc + acc_lo stays below 2^31: acc <= 255 * 127 * 256 for the head dim's 256 at most
      const __m512i both = _mm512_add_epi32(_mm512_mullo_epi32(acc[h], _mm512_set1_epi32(kHi)), acc_lo[h]);
      const __m512i dot = _mm512_sub_epi32(both, _mm512_set1_epi32(128 * qc.sum[h]));
      const __m512 s = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(qc.scale[h])), kv);
      _mm512_mask_storeu_ps(sc + h * n + i0, keep, s);
    }
  }
}

template <int G>
THRIFTY_VNNI void weighted_v_vnni(const int8_t* vc, const int64_t* table, int64_t bs, int64_t start, int64_t n,
                                  int64_t d, const float* w, float (*of)[kDim]) {
  for (int64_t c0 = 0; c0 < d; c0 += 32) {
    __m512 acc[G][2];
    for (int h = 0; h < G; ++h) acc[h][0] = acc[h][1] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      const int8_t* v = vc + slot_of(table, bs, start + i) * d + c0;
      const __m512 v0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v))));
      const __m512 v1 =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 16))));
      for (int h = 0; h < G; ++h) {
        const __m512 wh = _mm512_set1_ps(w[h * n + i]);
        acc[h][0] = _mm512_fmadd_ps(wh, v0, acc[h][0]);
        acc[h][1] = _mm512_fmadd_ps(wh, v1, acc[h][1]);
      }
    }
    for (int h = 0; h < G; ++h) {
      _mm512_storeu_ps(of[h] + c0, acc[h][0]);
      _mm512_storeu_ps(of[h] + c0 + 16, acc[h][1]);
    }
  }
}

using ScoresFn = void (*)(const int8_t*, const at::BFloat16*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                         const QueryCodes&, float*);
using WeightedVFn = void (*)(const int8_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, const float*,
                             float (*)[kDim]);

// The VNNI kernels for G query heads per KV head (G a compile-time constant keeps the accumulators in registers).
template <int... Gs>
inline ScoresFn scores_vnni_for(int64_t g, std::integer_sequence<int, Gs...>) {
  ScoresFn fn = nullptr;
  ((g == Gs + 1 ? (fn = &scores_vnni<Gs + 1>, 0) : 0), ...);
  return fn;
}

template <int... Gs>
inline WeightedVFn weighted_v_vnni_for(int64_t g, std::integer_sequence<int, Gs...>) {
  WeightedVFn fn = nullptr;
  ((g == Gs + 1 ? (fn = &weighted_v_vnni<Gs + 1>, 0) : 0), ...);
  return fn;
}

}  // namespace int8dot
}  // namespace thrifty

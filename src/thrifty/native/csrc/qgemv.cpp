// thrifty::qgemv: y = x W^T (+ bias) for few-token steps (decode) with 4- or 8-bit weights, on AVX2 + FMA + F16C,
// and AVX512-VNNI where the CPU has it.
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
// on), and AVX512-VNNI vpdpbusd, 64 products per instruction, where the CPU has it (functions compiled with a
// target attribute, picked at run time). The integer dots of both are exact; they differ only in the order the
// float chunk products are summed, so y agrees to float32 rounding (about 1e-7 of max |y|).
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
// and into L2 ~32 KB ahead: a one-token step of a model larger than the L3 streams its weights from DRAM, where the
// near prefetch alone left compute and memory taking turns (1.5B's int4 linears, 2 Zen 4 cores: 18.3-18.7 -> 26.3-29.7 GB/s;
// 16-48 KB all within noise of each other)
constexpr int64_t kPrefetchL2 = 32768;

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
      _mm_prefetch(reinterpret_cast<const char*>(wr + (BITS == 4 ? c * 16 : c * kChunk) + kPrefetchL2), _MM_HINT_T1);
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
// The same int8 x, multiplied with vpdpbusd (u8 x s8, 64 products an instruction) over 256-value blocks (the layout
// at VnniX). int4 weights are u8 already; int8 weights become u8 by flipping the sign bit (w + 128), and the int32
// accumulator starts at -128 * (the sum of the x bytes it meets), so every chunk's dot is exact as on AVX2. Rows go
// in groups of 2 (4 for one token) whose weights stay in L1 while 8-token tiles pass over them.
#ifndef THRIFTY_VNNI
#define THRIFTY_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#endif

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

// x for the VNNI tiles. A block is 256 values, 8 chunks; its 4 vectors j = 0..3 hold, in qword c, bytes 8j..8j+7 of
// chunk c. vpdpbusd into one int32 accumulator over the 4 vectors then leaves chunk c's sum in lanes 2c, 2c+1, so
// a block costs 4 dpbusd, one cvt, one multiply (weight scales x x scales, both spread to 16 lanes) and one fma a
// (row, token), against 4 x (maddubs, madd, cvt, broadcast, fma) x 2 on AVX2. K's last block may be partial: x is
// zero there and the weights are read with masks. Step-major, so a tile's tokens sit at constant offsets.
struct VnniX {
  int64_t mpad;                                   // M rounded up to 8 (padding tokens are zero)
  std::vector<int8_t, Aligned64<int8_t>> q;       // [blocks, mpad, 4, 64]
  std::vector<int32_t, Aligned64<int32_t>> corr;  // [blocks, mpad, 16]: -128 * the lane sums of q (int8 weights)
  std::vector<float, Aligned64<float>> d;         // [blocks, mpad, 16]: chunk c's x scale in lanes 2c, 2c + 1
  std::vector<float, Aligned64<float>> gsum;      // [M, ngpad]: QuantizedX::gsum, each token's padded with zeros
  int64_t ngpad;                                  // K/group rounded up to 16
};

constexpr int64_t kBlock = 256;

THRIFTY_VNNI VnniX interleave_x(const QuantizedX& qx, int64_t m, int64_t k, int64_t group, bool corr) {
  VnniX out;
  const int64_t ng = k / group, nc = k / kChunk, nb = (k + kBlock - 1) / kBlock;
  const int64_t mp = out.mpad = (m + 7) & ~int64_t{7};
  out.q.assign(nb * mp * 256, 0);
  out.d.assign(nb * mp * 16, 0.f);
  out.ngpad = (ng + 15) & ~int64_t{15};
  out.gsum.assign(m * out.ngpad, 0.f);
  if (corr) out.corr.assign(nb * mp * 16, 0);
  const __m512i u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t t = 0; t < m; ++t) {
    std::copy(qx.gsum.begin() + t * ng, qx.gsum.begin() + (t + 1) * ng, out.gsum.begin() + t * out.ngpad);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t at = b * mp + t;
      int8_t* o = out.q.data() + at * 256;
      for (int64_t c = 0; c < 8 && 8 * b + c < nc; ++c) {
        const int8_t* src = qx.q.data() + t * k + (8 * b + c) * kChunk;
        for (int j = 0; j < 4; ++j) std::memcpy(o + j * 64 + c * 8, src + 8 * j, 8);
        out.d[at * 16 + 2 * c] = out.d[at * 16 + 2 * c + 1] = qx.d[t * nc + 8 * b + c];
      }
      if (corr) {
        __m512i s = _mm512_setzero_si512();
        for (int j = 0; j < 4; ++j) s = _mm512_dpbusd_epi32(s, u128, _mm512_load_si512(o + j * 64));
        _mm512_store_si512(out.corr.data() + at * 16, _mm512_sub_epi32(_mm512_setzero_si512(), s));
      }
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

// Per group of R rows, once for all its token tiles: ws [blocks, R, 16]: chunk c's weight scale in lanes 2c, 2c + 1
// (zero past K); mf [R, ngpad]: the mins as float32 (zero past K / group).
template <int R>
THRIFTY_VNNI void group_prep(const VnniProblem& vp, int64_t n0, float* ws, float* mf) {
  const Problem& p = *vp.p;
  const VnniX& x = *vp.x;
  const int64_t ng = p.k / p.group, nc = p.k / kChunk, per = p.group / kChunk;
  const int64_t nb = (p.k + kBlock - 1) / kBlock;
  alignas(64) float s[kMaxChunks + 16];
  const __m512i dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  for (int r = 0; r < R; ++r) {
    const uint16_t* sr = p.scales + (n0 + r) * ng;
    if (per == 1) {
      halves(sr, nc, s);
    } else {
      for (int64_t g = 0; g < ng; ++g) {
        const float v = _cvtsh_ss(sr[g]);
        for (int64_t j = 0; j < per; ++j) s[g * per + j] = v;
      }
      std::fill(s + nc, s + 8 * nb, 0.f);
    }
    for (int64_t b = 0; b < nb; ++b)
      _mm512_store_ps(ws + (b * R + r) * 16,
                      _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_load_ps(s + 8 * b))));
    if (p.mins) halves(p.mins + (n0 + r) * ng, ng, mf + r * x.ngpad);
  }
}

THRIFTY_VNNI inline __m512i load_part(const uint8_t* p, int64_t n) {  // n bytes (<= 0: none), the rest zero
  if (n >= 64) return _mm512_loadu_si512(p);
  if (n <= 0) return _mm512_setzero_si512();
  return _mm512_maskz_loadu_epi8((~0ull) >> (64 - n), p);
}

// A row's 256-value block as the 4 u8 vectors of the layout above; `valid`: its bytes inside the row.
template <int BITS>
THRIFTY_VNNI inline void weight_block(const uint8_t* wr, int64_t valid, __m512i z[4]) {
  if constexpr (BITS == 4) {  // 128 bytes: 32 per pair of chunks, byte i: chunk 2p value i (low), 2p + 1 (high)
    const __m512i a = load_part(wr, valid), b = load_part(wr + 64, valid - 64);
    const __m512i shift = _mm512_setr_epi64(0, 4, 0, 4, 0, 4, 0, 4), low = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {
      const __m512i idx = _mm512_setr_epi64(j, j, 4 + j, 4 + j, 8 + j, 8 + j, 12 + j, 12 + j);
      z[j] = _mm512_and_si512(_mm512_srlv_epi64(_mm512_permutex2var_epi64(a, idx, b), shift), low);
    }
  } else {  // 256 bytes, chunk c = bytes 32c..32c+31; as u8 by flipping the sign bit (w + 128)
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512i w[4];
    for (int i = 0; i < 4; ++i) w[i] = _mm512_xor_si512(load_part(wr + 64 * i, valid - 64 * i), flip);
    for (int j = 0; j < 4; ++j) {
      const __m512i idx = _mm512_setr_epi64(j, 4 + j, 8 + j, 12 + j, 0, 0, 0, 0);
      const __m512i lo = _mm512_permutex2var_epi64(w[0], idx, w[1]), hi = _mm512_permutex2var_epi64(w[2], idx, w[3]);
      z[j] = _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1);
    }
  }
}

// R rows x M tokens of y, 256 values a step on vpdpbusd; ws, mf: the group's (group_prep). Each (row, token) runs
// the same operations in the same order whatever M and the tile, so a row's y is the same bits alone and in a batch.
template <int BITS, int M, int R>
THRIFTY_VNNI void tile_vnni(const VnniProblem& vp, int64_t n0, int64_t t0, const float* ws, const float* mf) {
  const Problem& p = *vp.p;
  const VnniX& x = *vp.x;
  const int64_t k = p.k, nb = (k + kBlock - 1) / kBlock, row_bytes = BITS == 4 ? k / 2 : k, mp = x.mpad;
  constexpr int64_t kBlockBytes = BITS == 4 ? kBlock / 2 : kBlock;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < M; ++t) acc[r][t] = _mm512_setzero_ps();
  const uint8_t* w0 = p.w + n0 * row_bytes;
  for (int64_t b = 0; b < nb; ++b) {
    __m512i z[R][4];
    __m512 wsc[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w0 + r * row_bytes + b * kBlockBytes;
      for (int64_t l = 0; l < kBlockBytes; l += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetch + l), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchL2 + l), _MM_HINT_T1);
      }
      weight_block<BITS>(wr, row_bytes - b * kBlockBytes, z[r]);
      wsc[r] = _mm512_load_ps(ws + (b * R + r) * 16);
    }
    const int8_t* xb = x.q.data() + (b * mp + t0) * 256;
    const float* xd = x.d.data() + (b * mp + t0) * 16;
    const int32_t* xc = BITS == 8 ? x.corr.data() + (b * mp + t0) * 16 : nullptr;
    for (int t = 0; t < M; ++t) {
      __m512i xv[4];
      for (int j = 0; j < 4; ++j) xv[j] = _mm512_load_si512(xb + t * 256 + j * 64);
      const __m512 xs = _mm512_load_ps(xd + t * 16);
      const __m512i start = BITS == 4 ? _mm512_setzero_si512() : _mm512_load_si512(xc + t * 16);
      for (int r = 0; r < R; ++r) {
        __m512i dot = start;
        for (int j = 0; j < 4; ++j) dot = _mm512_dpbusd_epi32(dot, z[r][j], xv[j]);
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wsc[r], xs), acc[r][t]);
      }
    }
  }
  if (p.mins)  // the min term, sum_g min[g] * gsum[t][g], into the same 16 lanes before they are summed
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < M; ++t)
        for (int64_t g = 0; g < x.ngpad; g += 16)
          acc[r][t] = _mm512_fmadd_ps(_mm512_load_ps(mf + r * x.ngpad + g),
                                      _mm512_load_ps(x.gsum.data() + (t0 + t) * x.ngpad + g), acc[r][t]);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < M; ++t) p.put(t0 + t, n0 + r, _mm512_reduce_add_ps(acc[r][t]));
}

// A tile: kVnniTokens x kVnniRows float accumulators, 4 weight vectors a row and 4 x vectors in zmm registers.
// Measured (0.5B shapes and Gemma's head, Zen 4, 2 threads, M = 32): 8 x 2 best or within noise of the best
// against 4 x 2 and 6 x 2 (6 x 2 ahead on 4864->896 only); 8 x 1 15-30 % slower.
constexpr int kVnniTokens = 8;
constexpr int kVnniRows = 2;

// Every token of rows n0 .. n0 + R - 1: tiles of kVnniTokens, then the rest in one tile. The group's weights stay
// in L1 across the token tiles.
template <int BITS, int R>
THRIFTY_VNNI void group_vnni(const VnniProblem& vp, int64_t n0, float* ws, float* mf) {
  group_prep<R>(vp, n0, ws, mf);
  const int64_t m = vp.p->m;
  int64_t t0 = 0;
  for (; t0 + kVnniTokens <= m; t0 += kVnniTokens) tile_vnni<BITS, kVnniTokens, R>(vp, n0, t0, ws, mf);
  switch (m - t0) {
    case 1: tile_vnni<BITS, 1, R>(vp, n0, t0, ws, mf); break;
    case 2: tile_vnni<BITS, 2, R>(vp, n0, t0, ws, mf); break;
    case 3: tile_vnni<BITS, 3, R>(vp, n0, t0, ws, mf); break;
    case 4: if constexpr (kVnniTokens > 4) tile_vnni<BITS, 4, R>(vp, n0, t0, ws, mf); break;
    case 5: if constexpr (kVnniTokens > 5) tile_vnni<BITS, 5, R>(vp, n0, t0, ws, mf); break;
    case 6: if constexpr (kVnniTokens > 6) tile_vnni<BITS, 6, R>(vp, n0, t0, ws, mf); break;
    case 7: if constexpr (kVnniTokens > 7) tile_vnni<BITS, 7, R>(vp, n0, t0, ws, mf); break;
    default: break;
  }
}

// Rows [lo, hi) in groups of kVnniRows (then single rows).
template <int BITS>
THRIFTY_VNNI void rows_vnni(const VnniProblem& vp, int64_t lo, int64_t hi) {
  const int64_t nb = (vp.p->k + kBlock - 1) / kBlock;
  std::vector<float, Aligned64<float>> ws(nb * 4 * 16), mf(4 * vp.x->ngpad);
  int64_t n = lo;
  if (vp.p->m == 1)  // one token: 4 rows a tile, 4 weight streams in flight (as the AVX2 loop does)
    for (; n + 4 <= hi; n += 4) group_vnni<BITS, 4>(vp, n, ws.data(), mf.data());
  for (; n + kVnniRows <= hi; n += kVnniRows) group_vnni<BITS, kVnniRows>(vp, n, ws.data(), mf.data());
  for (; n < hi; ++n) group_vnni<BITS, 1>(vp, n, ws.data(), mf.data());
}

// Which inner loop: path -1 auto (VNNI where the CPU has it), 1 AVX2, 2 VNNI (an error where the CPU lacks it).
// Never chosen by M: a sequence's logits must be the same bits alone and in a batch, and the two loops sum the
// chunk products in different orders.
bool use_vnni(int64_t path) {
  TORCH_CHECK(path == -1 || path == 1 || path == 2, "qgemv: path is -1 (auto), 1 (avx2) or 2 (vnni)");
  if (path == 1) return false;
  TORCH_CHECK(path == -1 || int8dot::has_vnni(), "qgemv: the VNNI path needs AVX512F / BW / VL / VNNI");
  return int8dot::has_vnni();
}

at::Tensor qgemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                 const std::optional<at::Tensor>& mins, const std::optional<at::Tensor>& bias, int64_t bits,
                 int64_t group, int64_t path) {
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
  const bool vnni = use_vnni(path);
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

// Rows [lo, hi) of the dense weight, w = scale * q + min per group, into dst (row stride k): float32, or bf16
// rounded to nearest even (the same bits as the float32 weight cast to bf16, without writing it first).
template <typename T>
void dequant_rows(const uint8_t* src, const uint16_t* sc, const uint16_t* mn, int bits, int64_t k, int64_t group,
                  int64_t lo, int64_t hi, T* dst) {
  alignas(32) float vals[64];
  const int64_t ng = k / group, row_bytes = bits == 4 ? k / 2 : k;
  for (int64_t r = lo; r < hi; ++r) {
    const uint8_t* wr = src + r * row_bytes;
    T* o = dst + (r - lo) * k;
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
          store8(o + c + 32 * h + j, _mm256_fmadd_ps(_mm256_load_ps(vals + 32 * h + j), s, m));
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

// The dense [N, K] weight, float32 or (bf16 true) bf16: a bf16 prefill GEMM reads it without a float32 copy.
at::Tensor qdequant(const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& mins,
                    int64_t bits, int64_t group, bool bf16) {
  const Packed p = check_packed(w, scales, mins, bits, group);
  at::Tensor out = at::empty({p.n, p.k}, w.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  at::parallel_for(0, p.n, 16, [&](int64_t lo, int64_t hi) {
    if (bf16)
      dequant_rows(p.w, p.scales, p.mins, bits, p.k, group, lo, hi, out.data_ptr<at::BFloat16>() + lo * p.k);
    else
      dequant_rows(p.w, p.scales, p.mins, bits, p.k, group, lo, hi, out.data_ptr<float>() + lo * p.k);
  });
  return out;
}

}  // namespace
}  // namespace thrifty

TORCH_LIBRARY_FRAGMENT(thrifty, lib) {
  lib.def("qgemv(Tensor x, Tensor w, Tensor scales, Tensor? mins, Tensor? bias, int bits, int group, int path=-1) "
          "-> Tensor");
  lib.def("qdequant(Tensor w, Tensor scales, Tensor? mins, int bits, int group, bool bf16=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(thrifty, CPU, lib) {
  lib.impl("qgemv", TORCH_FN(thrifty::qgemv));
  lib.impl("qdequant", TORCH_FN(thrifty::qdequant));
}

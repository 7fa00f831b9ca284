// Paged attention for decode steps, and the KV-cache write, on the CPU. Reference: ops/attention.py.
//
//   decode_attention(q [B, H, D], k_cache, v_cache [Hkv, blocks, block_size, D], block_tables [B, nb],
//                    context_lens [B], scale, window, k_scale?, v_scale? [Hkv, blocks, block_size] bf16,
//                    k_channel? [Hkv, D] float32) -> [B, H, D]
//   kv_write_(k_cache, v_cache, k [T, Hkv, D], v [T, Hkv, D], slots [T], k_scale?, v_scale?, k_channel?,
//             k_shift?)   K stored as (k - k_shift) / k_channel (ops/kv_quant.py)
//
// One task per (sequence, KV head): its G = H / Hkv query heads read each cached K and V row once, straight
// from the blocks (no gather copy, no padding to the longest context). Scores, softmax and the weighted sum
// of V run in float32; K / V are float32 or bfloat16, or int8 / fp8 codes with a bfloat16 scale per row
// (ops/kv_quant.py): a row's codes widen to float32 in registers and its scale multiplies the row's score (K)
// or its probability (V), so a quantized context is never dequantized into memory.
#include "vec.h"
#include "int8_dot.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace thrifty {
namespace int8dot {
bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return yes;
}
}  // namespace int8dot

namespace {

constexpr int kMaxGroup = 16;   // query heads per KV head
constexpr int kMaxDim = 256;    // head dim

// 8 codes of a quantized row as float32, before the row's scale (times code_factor<T>(): see e4m3).
inline __m256 load_code8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline __m128i load_bytes8(const void* p) {
  return _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

inline __m256 load_code8(const at::Float8_e5m2* p) {  // e5m2 is the top byte of a float16
  return _mm256_cvtph_ps(_mm_slli_epi16(load_bytes8(p), 8));
}

// e4m3 (bias 7) placed in a float16's exponent and mantissa (bias 15) reads as value / 2^8, subnormals
// included (F16C converts those exactly); code_factor puts the 2^8 back through the row's scale.
inline __m256 load_code8(const at::Float8_e4m3fn* p) {
  const __m128i b = load_bytes8(p);
  const __m128i sign = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8);
  const __m128i rest = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7);
  return _mm256_cvtph_ps(_mm_or_si128(sign, rest));
}

template <typename T> constexpr float code_factor() { return 1.0f; }
template <> constexpr float code_factor<at::Float8_e4m3fn>() { return 256.0f; }

inline __m256 load_row8(const float* p) { return load8(p); }
inline __m256 load_row8(const at::BFloat16* p) { return load8(p); }
template <typename T> inline __m256 load_row8(const T* p) { return load_code8(p); }

// A row's scale: 1 for float caches (no scales), else its bfloat16 scale times the code factor.
template <typename KV>
inline float row_scale(const at::BFloat16* scales, int64_t slot) {
  return scales == nullptr ? 1.0f : to_float(scales[slot]) * code_factor<KV>();
}

// Each of the g rows of n scores becomes its softmax, in place.
inline void softmax_rows(float* sc, int64_t g, int64_t n) {
  for (int64_t h = 0; h < g; ++h) {
    float* s = sc + h * n;
    __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + i));
    float m = hmax(vmax);
    for (; i < n; ++i) m = std::max(m, s[i]);
    const __m256 mv = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
      _mm256_storeu_ps(s + i, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (; i < n; ++i) {
      alignas(32) float tmp[8] = {s[i] - m, 0, 0, 0, 0, 0, 0, 0};
      _mm256_store_ps(tmp, exp8(_mm256_load_ps(tmp)));
      s[i] = tmp[0];
      sum += tmp[0];
    }
    const float inv = 1.0f / sum;
    for (i = 0; i < n; ++i) s[i] *= inv;
  }
}

// q_h * scale (times K's channel divisor: q . k = (q * c) . (k / c)) as float32 rows.
template <typename Q>
inline void prepare_query(const Q* q, int64_t g, int64_t d, const float* kch, float scale, float (*qf)[kMaxDim]) {
  for (int64_t h = 0; h < g; ++h)
    for (int64_t j = 0; j < d; j += 8) {
      __m256 x = _mm256_mul_ps(load8(q + h * d + j), _mm256_set1_ps(scale));
      if (kch != nullptr) x = _mm256_mul_ps(x, _mm256_loadu_ps(kch + j));
      store8(qf[h] + j, x);
    }
}

template <typename Q, typename KV>
void one_head(const Q* q, int64_t g, int64_t d, const KV* kc, const KV* vc, const at::BFloat16* ks,
              const at::BFloat16* vs, const float* kch, const int64_t* table, int64_t bs, int64_t start, int64_t ctx,
              float scale, Q* out, int64_t out_head_stride, std::vector<float>& scores) {
  alignas(32) float qf[kMaxGroup][kMaxDim];
  prepare_query(q, g, d, kch, scale, qf);
  const int64_t n = ctx - start;
  scores.resize(static_cast<size_t>(g * n));
  float* sc = scores.data();
  // 1. scores[h][i] = q_h . k_i
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = start + i;
    const int64_t slot = table[pos / bs] * bs + pos % bs;
    const KV* k = kc + slot * d;
    __m256 acc[kMaxGroup];
    for (int64_t h = 0; h < g; ++h) acc[h] = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += 8) {
      const __m256 kv = load_row8(k + j);
      for (int64_t h = 0; h < g; ++h) acc[h] = _mm256_fmadd_ps(_mm256_load_ps(qf[h] + j), kv, acc[h]);
    }
    const float kscale = row_scale<KV>(ks, slot);
    for (int64_t h = 0; h < g; ++h) sc[h * n + i] = hsum(acc[h]) * kscale;
  }
  // 2. softmax per head
  softmax_rows(sc, g, n);
  // 3. out_h = sum_i p[h][i] v_i
  alignas(32) float of[kMaxGroup][kMaxDim];
  for (int64_t h = 0; h < g; ++h)
    for (int64_t j = 0; j < d; j += 8) _mm256_store_ps(of[h] + j, _mm256_setzero_ps());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = start + i;
    const int64_t slot = table[pos / bs] * bs + pos % bs;
    const KV* v = vc + slot * d;
    const float vscale = row_scale<KV>(vs, slot);
    for (int64_t j = 0; j < d; j += 8) {
      const __m256 vv = load_row8(v + j);
      for (int64_t h = 0; h < g; ++h)
        _mm256_store_ps(of[h] + j,
                        _mm256_fmadd_ps(_mm256_set1_ps(sc[h * n + i] * vscale), vv, _mm256_load_ps(of[h] + j)));
    }
  }
  for (int64_t h = 0; h < g; ++h)
    for (int64_t j = 0; j < d; j += 8) store8(out + h * out_head_stride + j, _mm256_load_ps(of[h] + j));
}

// one_head for an int8 cache through the integer dot of K (int8_dot.h); vnni picks the AVX512-VNNI kernels,
// else the portable ones: the same output bit for bit.
template <typename Q>
void one_head_int8(const Q* q, int64_t g, int64_t d, const int8_t* kc, const int8_t* vc, const at::BFloat16* ks,
                   const at::BFloat16* vs, const float* kch, const int64_t* table, int64_t bs, int64_t start,
                   int64_t ctx, float scale, Q* out, int64_t out_head_stride, std::vector<float>& scores, bool vnni) {
  alignas(64) float qf[kMaxGroup][kMaxDim];
  prepare_query(q, g, d, kch, scale, qf);
  alignas(64) int8dot::QueryCodes qc;
  int8dot::quantize_query(qf, g, d, qc);
  const int64_t n = ctx - start;
  scores.resize(static_cast<size_t>(g * n));
  float* sc = scores.data();
  const auto seq = std::make_integer_sequence<int, kMaxGroup>();
  if (vnni)
    int8dot::scores_vnni_for(g, seq)(kc, ks, table, bs, start, n, d, qc, sc);
  else
    int8dot::scores_portable(kc, ks, table, bs, start, n, d, g, qc, sc);
  softmax_rows(sc, g, n);
  for (int64_t i = 0; i < n; ++i) {   // V's row scale folded into the weights once per token
    const float vscale = to_float(vs[int8dot::slot_of(table, bs, start + i)]);
    for (int64_t h = 0; h < g; ++h) sc[h * n + i] *= vscale;
  }
  alignas(64) float of[kMaxGroup][kMaxDim];
  if (vnni)
    int8dot::weighted_v_vnni_for(g, seq)(vc, table, bs, start, n, d, sc, of);
  else
    int8dot::weighted_v_portable(vc, table, bs, start, n, d, g, sc, of);
  for (int64_t h = 0; h < g; ++h)
    for (int64_t j = 0; j < d; j += 8) store8(out + h * out_head_stride + j, _mm256_load_ps(of[h] + j));
}

// AT_DISPATCH over the KV cache's storage types: THRIFTY_DISPATCH's two float types plus the quantized codes.
#define THRIFTY_KV_DISPATCH(TYPE, NAME, ...)                                          \
  [&] {                                                                               \
    switch (TYPE) {                                                                   \
      case at::kChar: {                                                               \
        using scalar_t = int8_t;                                                      \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case at::kFloat8_e4m3fn: {                                                      \
        using scalar_t = at::Float8_e4m3fn;                                           \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      case at::kFloat8_e5m2: {                                                        \
        using scalar_t = at::Float8_e5m2;                                             \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      default:                                                                        \
        return THRIFTY_DISPATCH(TYPE, NAME, __VA_ARGS__);                             \
    }                                                                                 \
  }()

bool is_quantized(at::ScalarType t) {
  return t == at::kChar || t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2;
}

// The scales of a quantized cache ([Hkv, blocks, block_size] bfloat16), or nullptr for a float cache.
at::BFloat16* scales_of(const at::Tensor& cache, const std::optional<at::Tensor>& scales, const char* what) {
  if (!is_quantized(cache.scalar_type())) return nullptr;
  TORCH_CHECK(scales.has_value() && scales->scalar_type() == at::kBFloat16 && scales->is_contiguous() &&
                  scales->dim() == 3 && scales->size(0) == cache.size(0) && scales->size(1) == cache.size(1) &&
                  scales->size(2) == cache.size(2),
              what, ": an int8 / fp8 cache needs bfloat16 scales [Hkv, blocks, block_size]");
  return scales->data_ptr<at::BFloat16>();
}

// K's per-channel divisor ([Hkv, D] float32) of a quantized cache, or nullptr.
const float* channel_of(const at::Tensor& cache, const std::optional<at::Tensor>& channel, const char* what) {
  if (!channel.has_value() || !is_quantized(cache.scalar_type())) return nullptr;
  TORCH_CHECK(channel->scalar_type() == at::kFloat && channel->is_contiguous() && channel->dim() == 2 &&
                  channel->size(0) == cache.size(0) && channel->size(1) == cache.size(3),
              what, ": k_channel / k_shift must be float32 [Hkv, D]");
  return channel->data_ptr<float>();
}

// Which kernel reads an int8 cache. int8_dot: -1 auto (the VNNI integer dot where the CPU has it, else the float
// kernel: with the query's two int8 terms the portable dot is slower than the float kernel, 4.32 vs 4.03 ms a
// layer call at 8k context on Zen 4; it stays as the VNNI path's bitwise twin for CPUs and CI without VNNI),
// 0 the float kernel, 1 the portable integer dot, 2 the VNNI integer dot (refused on a CPU without it).
enum class Int8Path { kFloat, kPortable, kVnni };

Int8Path int8_path(at::ScalarType kv, int64_t d, int64_t int8_dot) {
  TORCH_CHECK(int8_dot >= -1 && int8_dot <= 2, "thrifty decode_attention: int8_dot is -1, 0, 1 or 2");
  if (kv != at::kChar || int8_dot == 0) return Int8Path::kFloat;
  if (int8_dot == 1) {
    TORCH_CHECK(d % 16 == 0, "thrifty decode_attention: the integer dot needs a head dim multiple of 16");
    return Int8Path::kPortable;
  }
  const bool vnni_ok = int8dot::has_vnni() && d % 64 == 0;
  TORCH_CHECK(int8_dot != 2 || vnni_ok, "thrifty decode_attention: the VNNI integer dot needs AVX512-VNNI and a "
                                        "head dim multiple of 64");
  return vnni_ok ? Int8Path::kVnni : Int8Path::kFloat;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            int64_t window, const std::optional<at::Tensor>& k_scale,
                            const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& k_channel,
                            int64_t int8_dot) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "thrifty decode_attention: q must be contiguous [B, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous() && v_cache.scalar_type() == k_cache.scalar_type(),
              "thrifty decode_attention: caches must be contiguous [Hkv, blocks, block_size, D]");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), hkv = k_cache.size(0);
  const int64_t nblocks = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && d % 8 == 0 && d <= kMaxDim && h % hkv == 0 && h / hkv <= kMaxGroup,
              "thrifty decode_attention: head dim a multiple of 8 up to 256, up to 16 query heads per KV head");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.size(0) == b &&
                  block_tables.is_contiguous() && context_lens.scalar_type() == at::kLong &&
                  context_lens.numel() == b && context_lens.is_contiguous(),
              "thrifty decode_attention: int64 block_tables [B, nb] and context_lens [B]");
  const at::BFloat16* ks = scales_of(k_cache, k_scale, "thrifty decode_attention");
  const at::BFloat16* vs = scales_of(v_cache, v_scale, "thrifty decode_attention");
  const float* kch = channel_of(k_cache, k_channel, "thrifty decode_attention");
  const int64_t nb = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < b; ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= nb * bs, "thrifty decode_attention: a context longer than its blocks");
    for (int64_t j = 0; j < (lens[s] + bs - 1) / bs; ++j)
      TORCH_CHECK(tables[s * nb + j] >= 0 && tables[s * nb + j] < nblocks, "thrifty decode_attention: bad block id");
  }
  at::Tensor out = at::empty_like(q);
  const int64_t g = h / hkv;
  const Int8Path path = int8_path(k_cache.scalar_type(), d, int8_dot);
  THRIFTY_DISPATCH(q.scalar_type(), "decode_attention_q", [&] {
    using Q = scalar_t;
    THRIFTY_KV_DISPATCH(k_cache.scalar_type(), "decode_attention_kv", [&] {
      using KV = scalar_t;
      const KV* kc = k_cache.data_ptr<KV>();
      const KV* vc = v_cache.data_ptr<KV>();
      const Q* qp = q.data_ptr<Q>();
      Q* op = out.data_ptr<Q>();
      at::parallel_for(0, b * hkv, 1, [&](int64_t lo, int64_t hi) {
        std::vector<float> scores;
        for (int64_t task = lo; task < hi; ++task) {
          const int64_t s = task / hkv, kh = task % hkv, ctx = lens[s];
          const int64_t start = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
          const int64_t head_rows = kh * nblocks * bs;
          if constexpr (std::is_same_v<KV, int8_t>) {
            if (path != Int8Path::kFloat) {
              one_head_int8<Q>(qp + (s * h + kh * g) * d, g, d, reinterpret_cast<const int8_t*>(kc) + head_rows * d,
                               reinterpret_cast<const int8_t*>(vc) + head_rows * d,
                               ks + head_rows, vs + head_rows, kch ? kch + kh * d : nullptr, tables + s * nb, bs,
                               start, ctx, static_cast<float>(scale), op + (s * h + kh * g) * d, d, scores,
                               path == Int8Path::kVnni);
              continue;
            }
          }
          one_head<Q, KV>(qp + (s * h + kh * g) * d, g, d, kc + head_rows * d, vc + head_rows * d,
                          ks ? ks + head_rows : nullptr, vs ? vs + head_rows : nullptr, kch ? kch + kh * d : nullptr,
                          tables + s * nb, bs, start, ctx, static_cast<float>(scale), op + (s * h + kh * g) * d, d,
                          scores);
        }
      });
    });
  });
  return out;
}

// One row quantized as ops/kv_quant.py quantize() does it: s = max(absmax / qmax, 2^-100) rounded up to
// bfloat16, codes round(x / s) (int8, nearest even) or x / s cast to fp8 (c10's round-to-nearest-even),
// clamped to +-qmax.
template <typename C>
void quantize_row(const float* x, int64_t d, C* codes, at::BFloat16* scale) {
  constexpr float qmax = std::is_same_v<C, int8_t> ? 127.0f
                         : std::is_same_v<C, at::Float8_e4m3fn> ? 448.0f : 57344.0f;
  float amax = 0.0f;
  for (int64_t j = 0; j < d; ++j) amax = std::max(amax, std::fabs(x[j]));
  uint32_t bits;
  const float raw = std::max(amax / qmax, 7.888609052210118e-31f);   // 2^-100
  std::memcpy(&bits, &raw, 4);
  bits = (bits + 0xFFFFu) & ~0xFFFFu;
  scale->x = static_cast<uint16_t>(bits >> 16);
  float s;
  std::memcpy(&s, &bits, 4);
  for (int64_t j = 0; j < d; ++j) {
    const float y = std::clamp(x[j] / s, -qmax, qmax);
    if constexpr (std::is_same_v<C, int8_t>)
      codes[j] = static_cast<int8_t>(std::nearbyint(y));
    else
      codes[j] = C(y);
  }
}

// One [D] row into the cache: copied (float / bf16 caches) or quantized with its scale (int8 / fp8).
template <typename S>
inline void write_row(const S* from, int64_t d, float* to, at::BFloat16*, const float*, const float*) {
  for (int64_t j = 0; j < d; j += 8) store8(to + j, load8(from + j));
}

template <typename S>
inline void write_row(const S* from, int64_t d, at::BFloat16* to, at::BFloat16*, const float*, const float*) {
  for (int64_t j = 0; j < d; j += 8) store8(to + j, load8(from + j));
}

template <typename S, typename C>
inline void write_row(const S* from, int64_t d, C* to, at::BFloat16* scale, const float* channel,
                      const float* shift) {
  alignas(32) float row[kMaxDim];
  for (int64_t j = 0; j < d; j += 8) store8(row + j, load8(from + j));
  if (shift != nullptr)
    for (int64_t j = 0; j < d; ++j) row[j] -= shift[j];
  if (channel != nullptr)
    for (int64_t j = 0; j < d; ++j) row[j] /= channel[j];
  quantize_row(row, d, to, scale);
}

void kv_write_(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slots, const std::optional<at::Tensor>& k_scale,
               const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& k_channel,
               const std::optional<at::Tensor>& k_shift) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "thrifty kv_write_: caches must be contiguous and alike");
  const int64_t hkv = k_cache.size(0), nslots = k_cache.size(1) * k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(d % 8 == 0 && d <= kMaxDim && k.dim() == 3 && k.size(1) == hkv && k.size(2) == d && k.stride(2) == 1 &&
                  v.sizes() == k.sizes() && v.stride(2) == 1 && k.scalar_type() == v.scalar_type(),
              "thrifty kv_write_: k, v must be [T, Hkv, D] with contiguous rows");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == k.size(0) && slots.is_contiguous(),
              "thrifty kv_write_: int64 slots [T]");
  at::BFloat16* scales[2] = {scales_of(k_cache, k_scale, "thrifty kv_write_"),
                             scales_of(v_cache, v_scale, "thrifty kv_write_")};
  const float* channels[2] = {channel_of(k_cache, k_channel, "thrifty kv_write_"), nullptr};
  const float* shifts[2] = {channel_of(k_cache, k_shift, "thrifty kv_write_"), nullptr};
  const int64_t t = k.size(0);
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i)
    TORCH_CHECK(sl[i] >= 0 && sl[i] < nslots, "thrifty kv_write_: slot out of range");
  THRIFTY_DISPATCH(k.scalar_type(), "kv_write_src", [&] {
    using S = scalar_t;
    THRIFTY_KV_DISPATCH(k_cache.scalar_type(), "kv_write_dst", [&] {
      using C = scalar_t;
      const at::Tensor* srcs[2] = {&k, &v};
      at::Tensor* dsts[2] = {&k_cache, &v_cache};
      for (int which = 0; which < 2; ++which) {
        const S* sp = srcs[which]->data_ptr<S>();
        C* cp = dsts[which]->data_ptr<C>();
        for (int64_t i = 0; i < t; ++i)
          for (int64_t hh = 0; hh < hkv; ++hh) {
            const S* from = sp + i * srcs[which]->stride(0) + hh * srcs[which]->stride(1);
            at::BFloat16* scale = scales[which] ? scales[which] + hh * nslots + sl[i] : nullptr;
            const float* channel = channels[which] ? channels[which] + hh * d : nullptr;
            const float* shift = shifts[which] ? shifts[which] + hh * d : nullptr;
            write_row(from, d, cp + (hh * nslots + sl[i]) * d, scale, channel, shift);
          }
      }
    });
  });
}

}  // namespace
}  // namespace thrifty

TORCH_LIBRARY_FRAGMENT(thrifty, lib) {
  lib.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
          "float scale, int window, Tensor? k_scale=None, Tensor? v_scale=None, Tensor? k_channel=None, "
          "int int8_dot=-1) -> Tensor");
  lib.def("kv_write_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots, "
          "Tensor(c!)? k_scale=None, Tensor(d!)? v_scale=None, Tensor? k_channel=None, Tensor? k_shift=None) -> ()");
}

TORCH_LIBRARY_IMPL(thrifty, CPU, lib) {
  lib.impl("decode_attention", TORCH_FN(thrifty::decode_attention));
  lib.impl("kv_write_", TORCH_FN(thrifty::kv_write_));
}

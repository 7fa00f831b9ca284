// Paged attention for decode steps, and the KV-cache write, on the CPU. Reference: engine/attention.py.
//
//   decode_attention(q [B, H, D], k_cache, v_cache [Hkv, blocks, block_size, D], block_tables [B, nb],
//                    context_lens [B], scale, window) -> [B, H, D]
//   kv_write_(k_cache, v_cache, k [T, Hkv, D], v [T, Hkv, D], slots [T])
//
// One task per (sequence, KV head): its G = H / Hkv query heads read each cached K and V row once, straight
// from the blocks (no gather copy, no padding to the longest context). Scores, softmax and the weighted sum
// of V run in float32; K / V are float32 or bfloat16.
#include "vec.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace thrifty {
namespace {

constexpr int kMaxGroup = 16;   // query heads per KV head
constexpr int kMaxDim = 256;    // head dim

template <typename Q, typename KV>
void one_head(const Q* q, int64_t g, int64_t d, const KV* kc, const KV* vc, const int64_t* table, int64_t bs,
              int64_t start, int64_t ctx, float scale, Q* out, int64_t out_head_stride, std::vector<float>& scores) {
  alignas(32) float qf[kMaxGroup][kMaxDim];
  for (int64_t h = 0; h < g; ++h)
    for (int64_t j = 0; j < d; j += 8) store8(qf[h] + j, _mm256_mul_ps(load8(q + h * d + j), _mm256_set1_ps(scale)));
  const int64_t n = ctx - start;
  scores.resize(static_cast<size_t>(g * n));
  float* sc = scores.data();
  // 1. scores[h][i] = q_h . k_i
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = start + i;
    const KV* k = kc + (table[pos / bs] * bs + pos % bs) * d;
    __m256 acc[kMaxGroup];
    for (int64_t h = 0; h < g; ++h) acc[h] = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += 8) {
      const __m256 kv = load8(k + j);
      for (int64_t h = 0; h < g; ++h) acc[h] = _mm256_fmadd_ps(_mm256_load_ps(qf[h] + j), kv, acc[h]);
    }
    for (int64_t h = 0; h < g; ++h) sc[h * n + i] = hsum(acc[h]);
  }
  // 2. softmax per head
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
  // 3. out_h = sum_i p[h][i] v_i
  alignas(32) float of[kMaxGroup][kMaxDim];
  for (int64_t h = 0; h < g; ++h)
    for (int64_t j = 0; j < d; j += 8) _mm256_store_ps(of[h] + j, _mm256_setzero_ps());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = start + i;
    const KV* v = vc + (table[pos / bs] * bs + pos % bs) * d;
    for (int64_t j = 0; j < d; j += 8) {
      const __m256 vv = load8(v + j);
      for (int64_t h = 0; h < g; ++h)
        _mm256_store_ps(of[h] + j, _mm256_fmadd_ps(_mm256_set1_ps(sc[h * n + i]), vv, _mm256_load_ps(of[h] + j)));
    }
  }
  for (int64_t h = 0; h < g; ++h)
    for (int64_t j = 0; j < d; j += 8) store8(out + h * out_head_stride + j, _mm256_load_ps(of[h] + j));
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            int64_t window) {
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
  THRIFTY_DISPATCH(q.scalar_type(), "decode_attention_q", [&] {
    using Q = scalar_t;
    THRIFTY_DISPATCH(k_cache.scalar_type(), "decode_attention_kv", [&] {
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
          const int64_t head_off = kh * nblocks * bs * d;
          one_head<Q, KV>(qp + (s * h + kh * g) * d, g, d, kc + head_off, vc + head_off, tables + s * nb, bs, start,
                          ctx, static_cast<float>(scale), op + (s * h + kh * g) * d, d, scores);
        }
      });
    });
  });
  return out;
}

void kv_write_(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slots) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes(), "thrifty kv_write_: caches must be contiguous and alike");
  const int64_t hkv = k_cache.size(0), nslots = k_cache.size(1) * k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(d % 8 == 0 && k.dim() == 3 && k.size(1) == hkv && k.size(2) == d && k.stride(2) == 1 && v.sizes() == k.sizes() &&
                  v.stride(2) == 1 && k.scalar_type() == v.scalar_type(),
              "thrifty kv_write_: k, v must be [T, Hkv, D] with contiguous rows");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == k.size(0) && slots.is_contiguous(),
              "thrifty kv_write_: int64 slots [T]");
  const int64_t t = k.size(0);
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i)
    TORCH_CHECK(sl[i] >= 0 && sl[i] < nslots, "thrifty kv_write_: slot out of range");
  THRIFTY_DISPATCH(k.scalar_type(), "kv_write_src", [&] {
    using S = scalar_t;
    THRIFTY_DISPATCH(k_cache.scalar_type(), "kv_write_dst", [&] {
      using C = scalar_t;
      for (const auto& [src, dst] : {std::pair{&k, &k_cache}, std::pair{&v, &v_cache}}) {
        const S* sp = src->data_ptr<S>();
        C* cp = dst->data_ptr<C>();
        for (int64_t i = 0; i < t; ++i)
          for (int64_t hh = 0; hh < hkv; ++hh) {
            const S* row = sp + i * src->stride(0) + hh * src->stride(1);
            C* to = cp + (hh * nslots + sl[i]) * d;
            for (int64_t j = 0; j < d; j += 8) store8(to + j, load8(row + j));
          }
      }
    });
  });
}

}  // namespace
}  // namespace thrifty

TORCH_LIBRARY_FRAGMENT(thrifty, lib) {
  lib.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
          "float scale, int window) -> Tensor");
  lib.def("kv_write_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(thrifty, CPU, lib) {
  lib.impl("decode_attention", TORCH_FN(thrifty::decode_attention));
  lib.impl("kv_write_", TORCH_FN(thrifty::kv_write_));
}

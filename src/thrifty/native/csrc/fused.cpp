// Fused elementwise ops of a decoder layer, float32 math on float32 or bfloat16 tensors. Each replaces 4-10
// small torch ops whose per-call overhead dominates a decode step on a CPU. References: models/layers.py.
//
//   rms_norm(x, w, eps, offset)              x / rms(x) * (w + offset)
//   add_rms_norm_(h, residual, w, eps, offset)   residual += h (rounded to its dtype), then rms_norm(residual)
//   rope_(q, k, cos, sin)                    neox rotary on [T, heads, D] views, in place
//   act_mul(gate_up, gelu)                   silu(gate) * up, or gelu_tanh(gate) * up (gate | up halves)
#include "vec.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace thrifty {
namespace {

template <typename T, typename W>
void norm_row(const T* x, T* out, const W* w, float offset, int64_t d, float eps) {
  __m256 ss = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 v = load8(x + i);
    ss = _mm256_fmadd_ps(v, v, ss);
  }
  float sum = hsum(ss);
  for (; i < d; ++i) sum += to_float(x[i]) * to_float(x[i]);
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(d) + eps);
  const __m256 vinv = _mm256_set1_ps(inv), voff = _mm256_set1_ps(offset);
  for (i = 0; i + 8 <= d; i += 8)
    store8(out + i, _mm256_mul_ps(_mm256_mul_ps(load8(x + i), vinv), _mm256_add_ps(load8(w + i), voff)));
  for (; i < d; ++i) out[i] = static_cast<T>(to_float(x[i]) * inv * (to_float(w[i]) + offset));
}

// Row r of out = the norm of x's row r; with `add`, x's row is first increased by add's row in place (stored
// rounded, as torch's add, before the norm reads it: bit for bit `rms_norm(x + add)`, x holding the sum).
at::Tensor norm_rows(const char* name, at::Tensor x, const at::Tensor* add, const at::Tensor& w, double eps,
                     double offset) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), name, ": x must be a contiguous [T, D] tensor");
  TORCH_CHECK(add == nullptr || (add->is_contiguous() && add->sizes() == x.sizes() &&
                                 add->scalar_type() == x.scalar_type()),
              name, ": h and residual must be contiguous [T, D] tensors of one dtype");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(), name, ": weight of the wrong size");
  at::Tensor out = at::empty_like(x);
  const int64_t t = x.size(0), d = x.size(1);
  THRIFTY_DISPATCH(x.scalar_type(), "thrifty rms_norm", [&] {
    using T = scalar_t;
    THRIFTY_DISPATCH(w.scalar_type(), "thrifty rms_norm weight", [&] {
      T* xp = x.data_ptr<T>();
      const T* ap = add == nullptr ? nullptr : add->data_ptr<T>();
      T* op = out.data_ptr<T>();
      const scalar_t* wp = w.data_ptr<scalar_t>();
      at::parallel_for(0, t, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          T* row = xp + r * d;
          if (ap != nullptr) {
            const T* a = ap + r * d;
            int64_t i = 0;
            for (; i + 8 <= d; i += 8) store8(row + i, _mm256_add_ps(load8(row + i), load8(a + i)));
            for (; i < d; ++i) row[i] = static_cast<T>(to_float(row[i]) + to_float(a[i]));
          }
          norm_row(row, op + r * d, wp, static_cast<float>(offset), d, static_cast<float>(eps));
        }
      });
    });
  });
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, double offset) {
  return norm_rows("thrifty rms_norm", x, nullptr, w, eps, offset);
}

// A decoder layer's residual add and the next norm in one pass over the row.
at::Tensor add_rms_norm_(const at::Tensor& h, at::Tensor residual, const at::Tensor& w, double eps, double offset) {
  return norm_rows("thrifty add_rms_norm_", residual, &h, w, eps, offset);
}

// x [T, H, D] with any row (token) and head strides, last dim contiguous; cos / sin [T, D] float-like.
template <typename T, typename C>
void rope_rows(T* x, int64_t t, int64_t h, int64_t d, int64_t st, int64_t sh, const C* cos, const C* sin) {
  const int64_t half = d / 2;
  at::parallel_for(0, t * h, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t tok = i / h, head = i % h;
      T* v = x + tok * st + head * sh;
      const C* c = cos + tok * d;
      const C* s = sin + tok * d;
      int64_t j = 0;
      for (; j + 8 <= half; j += 8) {
        const __m256 a = load8(v + j), b = load8(v + half + j);
        store8(v + j, _mm256_fmsub_ps(a, load8(c + j), _mm256_mul_ps(b, load8(s + j))));
        store8(v + half + j, _mm256_fmadd_ps(b, load8(c + half + j), _mm256_mul_ps(a, load8(s + half + j))));
      }
      for (; j < half; ++j) {
        const float a = to_float(v[j]), b = to_float(v[half + j]);
        v[j] = static_cast<T>(a * to_float(c[j]) - b * to_float(s[j]));
        v[half + j] = static_cast<T>(b * to_float(c[half + j]) + a * to_float(s[half + j]));
      }
    }
  });
}

void rope_one(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "thrifty rope_: x must be [T, H, D], D even");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == x.size(0) * x.size(2) && sin.numel() == cos.numel(),
              "thrifty rope_: cos / sin must be contiguous [T, D] in x's dtype");
  THRIFTY_DISPATCH(x.scalar_type(), "rope_", [&] {
    rope_rows<scalar_t, scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1),
                                  cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>());
  });
}

void rope_(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin) {
  rope_one(q, cos, sin);
  rope_one(k, cos, sin);
}

inline __m256 silu8(__m256 g) {  // g / (1 + exp(-g)), exp of a non-positive argument only
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 e = exp8(_mm256_min_ps(g, _mm256_sub_ps(zero, g)));       // exp(-|g|)
  const __m256 pos = _mm256_cmp_ps(g, zero, _CMP_GE_OQ);
  const __m256 sig = _mm256_blendv_ps(_mm256_div_ps(e, _mm256_add_ps(one, e)), _mm256_div_ps(one, _mm256_add_ps(one, e)), pos);
  return _mm256_mul_ps(g, sig);
}

inline float gelu_tanh(float g) {
  return 0.5f * g * (1.0f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

at::Tensor act_mul(const at::Tensor& gu, bool gelu) {
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.size(1) % 2 == 0, "thrifty act_mul: [T, 2I] contiguous");
  TORCH_CHECK(gu.scalar_type() == at::kFloat || gu.scalar_type() == at::kBFloat16, "thrifty act_mul: float32 or bf16");
  const int64_t t = gu.size(0), n = gu.size(1) / 2;
  at::Tensor out = at::empty({t, n}, gu.options());
  THRIFTY_DISPATCH(gu.scalar_type(), "act_mul", [&] {
    const scalar_t* in = gu.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, t * n, 4096, [&](int64_t lo, int64_t hi) {
      int64_t i = lo;
      while (i < hi) {  // stay inside one row so gate and up line up
        const int64_t row = i / n, col = i % n, end = std::min(hi, (row + 1) * n);
        const scalar_t* g = in + row * 2 * n;
        const scalar_t* u = g + n;
        scalar_t* orow = o + row * n;
        int64_t c = col;
        if (!gelu)
          for (; c + 8 <= end - row * n; c += 8) store8(orow + c, _mm256_mul_ps(silu8(load8(g + c)), load8(u + c)));
        for (; c < end - row * n; ++c) {
          const float gv = to_float(g[c]);
          const float a = gelu ? gelu_tanh(gv) : gv / (1.0f + std::exp(-gv));
          orow[c] = static_cast<scalar_t>(a * to_float(u[c]));
        }
        i = end;
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace thrifty

TORCH_LIBRARY_FRAGMENT(thrifty, lib) {
  lib.def("rms_norm(Tensor x, Tensor w, float eps, float offset) -> Tensor");
  lib.def("add_rms_norm_(Tensor h, Tensor(a!) residual, Tensor w, float eps, float offset) -> Tensor");
  lib.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  lib.def("act_mul(Tensor gate_up, bool gelu) -> Tensor");
}

TORCH_LIBRARY_IMPL(thrifty, CPU, lib) {
  lib.impl("rms_norm", TORCH_FN(thrifty::rms_norm));
  lib.impl("add_rms_norm_", TORCH_FN(thrifty::add_rms_norm_));
  lib.impl("rope_", TORCH_FN(thrifty::rope_));
  lib.impl("act_mul", TORCH_FN(thrifty::act_mul));
}

// The small per-layer ops of a Llama decode step in one call each: RMSNorm (with the residual
// add folded in), rotate-half RoPE in place, SiLU(gate) * up, and the write of the new tokens'
// K and V into a float32 paged cache. At batch 1 each of these is a
// few hundred floats, so torch's composite versions (5-8 ATen calls each) cost more in dispatch
// than in arithmetic; here each is one loop. Float32 only; the summation order of RMSNorm's mean
// differs from torch's, nothing else does. Built into the same extension as quant_linear.cpp.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstring>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kLanes = Vec::size();

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous(), name,
              " must be a contiguous (T, hidden) float32 tensor");
}

// out = x / sqrt(mean(x^2) + eps) * weight, one row.
void norm_row(const float* x, const float* weight, float eps, int64_t h, float* out) {
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= h; i += kLanes) {
    const Vec v = Vec::loadu(x + i);
    acc = at::vec::fmadd(v, v, acc);
  }
  float lanes[kLanes];
  acc.store(lanes);
  float sum = 0.0f;
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  for (; i < h; ++i) sum += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(sum / float(h) + eps);
  i = 0;
  for (; i + kLanes <= h; i += kLanes) {
    (Vec::loadu(x + i) * Vec(inv) * Vec::loadu(weight + i)).store(out + i);
  }
  for (; i < h; ++i) out[i] = x[i] * inv * weight[i];
}

}  // namespace

// RMSNorm of x (T, hidden). With a residual: residual += x first (in place), then the norm of
// the sum, as a pre-norm layer needs it. Returns (T, hidden).
at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                    const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == x.size(1), "weight");
  const int64_t t = x.size(0), h = x.size(1);
  float* res = nullptr;
  if (residual.has_value()) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must be shaped like x");
    res = residual->data_ptr<float>();
  }
  at::Tensor out = at::empty_like(x);  // (T, hidden)
  const float* xs = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, t, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xs + r * h;
      if (res) {
        float* sum = res + r * h;
        for (int64_t i = 0; i < h; ++i) sum[i] += row[i];
        row = sum;
      }
      norm_row(row, w, float(eps), h, o + r * h);
    }
  });
  return out;
}

// Rotate-half RoPE in place on the first `num_heads` heads of x (T, heads_total, head_dim):
// x1, x2 = halves; x <- [x1 cos - x2 sin, x2 cos + x1 sin] with row positions[t] of
// cos_sin (P, head_dim) = [cos | sin].
void rope_(at::Tensor x, int64_t num_heads, const at::Tensor& cos_sin,
           const at::Tensor& positions) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.is_contiguous(), "x");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions");
  const int64_t t = x.size(0), heads = x.size(1), hd = x.size(2), half = hd / 2;
  TORCH_CHECK(num_heads <= heads && cos_sin.size(1) == hd && cos_sin.is_contiguous(), "cos_sin");
  float* xs = x.data_ptr<float>();
  const float* table = cos_sin.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  at::parallel_for(0, t, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      TORCH_CHECK(pos[r] >= 0 && pos[r] < cos_sin.size(0), "position out of range");
      const float* cos = table + pos[r] * hd;
      const float* sin = cos + half;
      for (int64_t head = 0; head < num_heads; ++head) {
        float* x1 = xs + (r * heads + head) * hd;
        float* x2 = x1 + half;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * cos[i] - b * sin[i];
          x2[i] = b * cos[i] + a * sin[i];
        }
      }
    }
  });
}

// silu(gate) * up of gate_up (T, 2 * I) = [gate | up]. Returns (T, I).
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t t = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({t, inter}, gate_up.options());  // (T, I)
  const float* g = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, t, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = g + r * 2 * inter;
      const float* up = gate + inter;
      float* dst = o + r * inter;
      int64_t i = 0;
      for (; i + kLanes <= inter; i += kLanes) {
        const Vec x = Vec::loadu(gate + i);
        (x / (Vec(1.0f) + x.neg().exp_u20()) * Vec::loadu(up + i)).store(dst + i);
      }
      for (; i < inter; ++i) dst[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

// The new tokens' K and V, (T, kv_heads, head_dim) each (a token's heads contiguous, tokens at
// any stride: views into the fused qkv output), copied to slots[t] of the float32 caches
// (num_blocks, block_size, kv_heads, head_dim), flattened to (num_slots, kv_heads * head_dim).
// One call for both, where index_copy_ costs two dispatches of ~5 us each per layer.
void kv_write_(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slots) {
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.dim() == 4 &&
                  k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == at::kFloat && v_cache.is_contiguous(),
              "kv_write_: caches must be contiguous float32 (blocks, block_size, heads, dim)");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous(),
              "kv_write_: slots must be a contiguous (T,) int64 tensor");
  const int64_t t = slots.size(0), row = k_cache.size(2) * k_cache.size(3);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  for (const at::Tensor* x : {&k, &v}) {
    TORCH_CHECK(x->scalar_type() == at::kFloat && x->dim() == 3 && x->size(0) == t &&
                    x->size(1) * x->size(2) == row && x->stride(2) == 1 &&
                    x->stride(1) == x->size(2),
                "kv_write_: k and v must be float32 (T, kv_heads, head_dim), heads contiguous");
  }
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] < num_slots, "kv_write_: slot ", slot[i], " out of range");
  }
  const size_t bytes = size_t(row) * sizeof(float);
  const float* ks = k.data_ptr<float>();
  const float* vs = v.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t i = 0; i < t; ++i) {
    std::memcpy(kc + slot[i] * row, ks + i * k.stride(0), bytes);
    std::memcpy(vc + slot[i] * row, vs + i * v.stride(0), bytes);
  }
}

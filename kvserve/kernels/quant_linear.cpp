// Linear layers over GGUF weights as stored: y = x @ W^T (+ bias), W read in its block format.
//
// W is (N, K) logically and (N, row_bytes) in memory: each output row is its K values in
// ggml blocks, exactly the bytes of the GGUF tensor (types by their ggml ids, below). A block
// is dequantized to float32 (the values the `gguf` package's dequantize gives) and used at once;
// all arithmetic is float32. Activations are never quantized.
//
//   small M (decode rows): each thread takes a range of output rows. Up to kRows rows of x,
//     the block-32 formats are decoded in registers and multiplied in at once; otherwise each
//     weight row is dequantized into an L1-resident buffer and dotted with every row of x,
//     kRows rows at a time. The weight bytes are read once per step.
//   large M (prefill chunks): a tile of output rows is dequantized into a float32 buffer that
//     fits in L2 (1 MB) and handed to torch's GEMM (MKL / oneDNN), which reuses it across all M rows.
//
// The instruction set comes from the build flags (kvserve/kernels/quant.py builds AVX-512,
// AVX2 and portable variants): the block decoders are in quant_blocks.h, the FMA loops use
// ATen's Vectorized<float>.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "quant_blocks.h"

namespace {

using namespace kvserve_quant;

constexpr int kRows = 4;  // rows of x dotted against one weight row at a time

struct Weight {
  const uint8_t* data;
  int64_t rows, k, row_bytes, num_blocks;
  Layout layout;
  RowFn row;
};

Weight weight_of(const at::Tensor& w, int64_t type, int64_t k) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "quant_linear: weight must be a contiguous (N, row_bytes) uint8 tensor");
  const Layout layout = layout_of(type);
  TORCH_CHECK(k % layout.values == 0, "quant_linear: K=", k, " is not a multiple of the block");
  const int64_t num_blocks = k / layout.values;
  TORCH_CHECK(w.size(1) == num_blocks * layout.bytes, "quant_linear: row of ", w.size(1),
              " bytes, expected ", num_blocks * layout.bytes, " for K=", k);
  return {w.data_ptr<uint8_t>(), w.size(0), k, w.size(1), num_blocks, layout, row_fn(type)};
}

inline float lane_sum(const Vec& v) {
  float lanes[kLanes];
  v.store(lanes);
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += lanes[i];
  return sum;
}

// sums[r] = dot(w, x[r]) for R rows of x (row stride ldx), K a multiple of kLanes.
template <int R>
inline void dot_rows(const float* w, const float* x, int64_t ldx, int64_t k, float* sums) {
  Vec acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = Vec(0.0f);
  int64_t i = 0;
  for (; i + 2 * kLanes <= k; i += 2 * kLanes) {
    const Vec w0 = Vec::loadu(w + i), w1 = Vec::loadu(w + i + kLanes);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = at::vec::fmadd(w0, Vec::loadu(x + r * ldx + i), acc[r][0]);
      acc[r][1] = at::vec::fmadd(w1, Vec::loadu(x + r * ldx + i + kLanes), acc[r][1]);
    }
  }
  for (; i < k; i += kLanes) {
    const Vec w0 = Vec::loadu(w + i);
    for (int r = 0; r < R; ++r) acc[r][0] = at::vec::fmadd(w0, Vec::loadu(x + r * ldx + i), acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    sums[r] = lane_sum(acc[r][0] + acc[r][1]);
  }
}

#if defined(KVSERVE_FUSED_BLOCKS)
// sums[r] = dot(W row, x[r]) for R rows of x, each block decoded once into registers: decode
// at batch 1 streams the weight bytes, and skipping the store and reload through a buffer keeps
// the CPU ahead of memory.
template <class Decode, int R>
void fused_rows(const Weight& w, const uint8_t* row, const float* x, float* sums) {
  Vec acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = Vec(0.0f);
  Vec v[kPerBlock];
  for (int64_t i = 0; i < w.num_blocks; ++i) {
    Decode::block(row + i * w.layout.bytes, v);
    const float* xb = x + i * 32;
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < kPerBlock; ++j) {
        acc[r][j % 2] = at::vec::fmadd(v[j], Vec::loadu(xb + r * w.k + j * kLanes), acc[r][j % 2]);
      }
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = lane_sum(acc[r][0] + acc[r][1]);
}

using FusedFn = void (*)(const Weight&, const uint8_t*, const float*, float*);

template <class Decode>
FusedFn fused_for(int rows) {
  switch (rows) {
    case 1: return fused_rows<Decode, 1>;
    case 2: return fused_rows<Decode, 2>;
    case 3: return fused_rows<Decode, 3>;
    default: return fused_rows<Decode, 4>;
  }
}

// The fused kernel for `rows` (1 to kRows) rows of x, or null where the format has none.
FusedFn fused_fn(int64_t type, int rows) {
  switch (type) {
    case Q4_0: return fused_for<DecodeQ4_0>(rows);
    case Q4_1: return fused_for<DecodeQ4_1>(rows);
    case Q8_0: return fused_for<DecodeQ8_0>(rows);
    default: return nullptr;
  }
}
#else
using FusedFn = void (*)(const Weight&, const uint8_t*, const float*, float*);
FusedFn fused_fn(int64_t, int) { return nullptr; }
#endif

void dot_buffer(const float* w, const float* x, int rows, int64_t k, float* sums) {
  switch (rows) {
    case 1: return dot_rows<1>(w, x, k, k, sums);
    case 2: return dot_rows<2>(w, x, k, k, sums);
    case 3: return dot_rows<3>(w, x, k, k, sums);
    default: return dot_rows<4>(w, x, k, k, sums);
  }
}

// out[m, n] = dot(W[n], x[m]) + bias[n] for all m, n: the decode path. Up to kRows rows of x,
// a format with a fused kernel decodes each block in registers once; otherwise each weight row
// is dequantized once into an L1 buffer and every row of x is dotted with it, kRows at a time.
void gemv(const Weight& w, int64_t type, const float* x, int64_t m, const float* bias,
          float* out) {
  const FusedFn fused = m >= 1 && m <= kRows ? fused_fn(type, int(m)) : nullptr;
  at::parallel_for(0, w.rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(fused ? 0 : w.k);
    float sums[kRows];
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = w.data + n * w.row_bytes;
      const float b = bias ? bias[n] : 0.0f;
      if (fused) {
        fused(w, row, x, sums);
        for (int64_t i = 0; i < m; ++i) out[i * w.rows + n] = sums[i] + b;
        continue;
      }
      w.row(row, w.num_blocks, w.layout, buf.data());
      for (int64_t r = 0; r < m; r += kRows) {
        const int rows = int(std::min<int64_t>(kRows, m - r));
        dot_buffer(buf.data(), x + r * w.k, rows, w.k, sums);
        for (int i = 0; i < rows; ++i) out[(r + i) * w.rows + n] = sums[i] + b;
      }
    }
  });
}

// Rows [begin, begin + count) of W into tile (count, K) float32.
void dequantize_into(const Weight& w, int64_t begin, int64_t count, float* tile) {
  at::parallel_for(0, count, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      w.row(w.data + (begin + n) * w.row_bytes, w.num_blocks, w.layout, tile + n * w.k);
    }
  });
}

// The prefill path: 1 MB float32 tiles of W (an L2's worth) through torch's GEMM.
void tiled_gemm(const Weight& w, const at::Tensor& x, at::Tensor& out) {
  const int64_t tile_rows = std::max<int64_t>(16, (1024 * 1024) / (w.k * 4));
  at::Tensor tile = at::empty({tile_rows, w.k}, x.options());  // (tile_rows, K)
  for (int64_t n0 = 0; n0 < w.rows; n0 += tile_rows) {
    const int64_t count = std::min(tile_rows, w.rows - n0);
    dequantize_into(w, n0, count, tile.data_ptr<float>());
    at::Tensor part = out.narrow(1, n0, count);  // (M, count), row stride N
    at::mm_out(part, x, tile.narrow(0, 0, count).t());
  }
}

}  // namespace

// x (M, K) float32 contiguous; w (N, row_bytes) uint8; bias (N,) float32 or None.
// M <= gemv_max_rows runs the decode path, larger M the tiled GEMM. Returns (M, N) float32.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& w, int64_t type,
                        const c10::optional<at::Tensor>& bias, int64_t gemv_max_rows) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "quant_linear: x must be a contiguous (M, K) float32 tensor");
  const Weight weight = weight_of(w, type, x.size(1));
  at::Tensor out = at::empty({x.size(0), weight.rows}, x.options());  // (M, N)
  if (x.size(0) == 0) return out;  // a step that samples no row
  if (x.size(0) <= gemv_max_rows) {
    const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    gemv(weight, type, x.data_ptr<float>(), x.size(0), b, out.data_ptr<float>());
    return out;
  }
  tiled_gemm(weight, x, out);
  if (bias.has_value()) out.add_(*bias);
  return out;
}

// All of W as float32 (N, K).
at::Tensor dequantize(const at::Tensor& w, int64_t type, int64_t k) {
  const Weight weight = weight_of(w, type, k);
  at::Tensor out = at::empty({weight.rows, k}, at::kFloat);  // (N, K)
  dequantize_into(weight, 0, weight.rows, out.data_ptr<float>());
  return out;
}

// Rows `ids` of W as float32 (len(ids), K): an embedding lookup.
at::Tensor dequantize_rows(const at::Tensor& w, int64_t type, int64_t k, const at::Tensor& ids) {
  const Weight weight = weight_of(w, type, k);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "ids must be (n,) int64");
  at::Tensor idx = ids.contiguous();
  const int64_t* id = idx.data_ptr<int64_t>();
  at::Tensor out = at::empty({idx.size(0), k}, at::kFloat);  // (n, K)
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < idx.size(0); ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < weight.rows, "index ", id[i], " out of range");
    weight.row(weight.data + id[i] * weight.row_bytes, weight.num_blocks, weight.layout, o + i * k);
  }
  return out;
}

// layer_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                    const at::Tensor& weight, double eps);
void rope_(at::Tensor x, int64_t num_heads, const at::Tensor& cos_sin, const at::Tensor& positions);
at::Tensor silu_mul(const at::Tensor& gate_up);
void kv_write_(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slots);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of x, after residual += x when a residual is given");
  m.def("rope_", &rope_, "rotate-half RoPE in place on the first num_heads heads");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate | up]");
  m.def("kv_write_", &kv_write_, "new tokens' K and V into a float32 paged cache at slots");
  m.def("quant_linear", &quant_linear, "x @ dequantize(W)^T + bias, W in a ggml block format");
  m.def("dequantize", &dequantize, "W (N, row_bytes) in a ggml block format -> (N, K) float32");
  m.def("dequantize_rows", &dequantize_rows, "rows ids of W -> (len(ids), K) float32");
}

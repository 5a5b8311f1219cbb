// Linear layers over GGUF weights as stored: y = x @ W^T (+ bias), W read in its block format.
//
// W is (N, K) logically and (N, row_bytes) in memory: each output row is its K values in
// ggml blocks, exactly the bytes of the GGUF tensor (types by their ggml ids, below). A block
// is dequantized to float32 (the values the `gguf` package's dequantize gives) and used at once;
// all arithmetic is float32. Activations are never quantized.
//
//   up to kRows rows of x (batch-1 decode): each thread takes a range of output rows; the
//     block-32 formats are decoded in registers and multiplied in at once, so the weight bytes
//     stream from memory once per step.
//   more rows, up to gemv_max_rows (kernels/quant.py sets it per build), and the formats with
//     no fused decoder: each panel of 4 weight rows is dequantized into an L1-resident buffer
//     and dotted with the rows of x in register blocks. Blocks of 256 rows of x pass over the
//     panels one after another, so x stays in L2 (the weights are dequantized once per block).
//   above gemv_max_rows: a tile of output rows is dequantized into a float32 buffer that fits
//     in L2 (1 MB) and handed to torch's GEMM (MKL / oneDNN), which reuses it across all rows.
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

constexpr int kRows = 4;  // the most rows of x the fused kernels take at once

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

// The lanes of v summed as a tree (halves, then halves of those): 4 dependent adds on AVX-512
// where a lane-by-lane sum chains 16, which ended every output row of the decode loop.
inline float lane_sum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#else
  float lanes[kLanes];
  v.store(lanes);
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += lanes[i];
  return sum;
#endif
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

// A panel of kPanel weight rows is dequantized into L1 and dotted with the rows of x in
// register blocks of (rows of x) x (rows of W): each loaded vector feeds several FMAs, where
// one weight row at a time leaves the loop bound by loads. AVX-512's 32 registers hold a 4 x 4
// block of accumulators; AVX2's 16 hold 2 x 4.
constexpr int kPanel = 4;
constexpr int64_t kMBlock = 256;  // rows of x per pass over the panels (1.5 MB at K = 1536)
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kBlockX = 4;
#else
constexpr int kBlockX = 2;
#endif

// out[r * ldo + c] = dot(w[c], x[r]) for R rows of x (stride ldx) and C rows of w (stride k),
// K a multiple of kLanes.
template <int R, int C>
void dot_block(const float* w, const float* x, int64_t ldx, int64_t k, float* out, int64_t ldo) {
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec(0.0f);
  for (int64_t i = 0; i < k; i += kLanes) {
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = Vec::loadu(w + c * k + i);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x + r * ldx + i);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(wv[c], xv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * ldo + c] = lane_sum(acc[r][c]);
}

using DotBlockFn = void (*)(const float*, const float*, int64_t, int64_t, float*, int64_t);

template <int R>
DotBlockFn dot_block_for(int cols) {
  switch (cols) {
    case 1: return dot_block<R, 1>;
    case 2: return dot_block<R, 2>;
    case 3: return dot_block<R, 3>;
    default: return dot_block<R, kPanel>;
  }
}

// The register block for `rows` (1 to kBlockX) rows of x and `cols` (1 to kPanel) of W.
DotBlockFn dot_block_fn(int rows, int cols) {
  switch (rows) {
    case 1: return dot_block_for<1>(cols);
#if defined(CPU_CAPABILITY_AVX512)
    case 2: return dot_block_for<2>(cols);
    case 3: return dot_block_for<3>(cols);
    default: return dot_block_for<4>(cols);
#else
    default: return dot_block_for<2>(cols);
#endif
  }
}

// out[m, n] = dot(W[n], x[m]) + bias[n] for all m, n: the decode and panel paths. Up to kRows
// rows of x, a format with a fused kernel decodes each block in registers once; otherwise each
// panel of kPanel weight rows is dequantized once into an L1 buffer (per 256-row block of x)
// and every row of x is dotted with it in register blocks (dot_block).
void gemv(const Weight& w, int64_t type, const float* x, int64_t m, const float* bias,
          float* out) {
  const FusedFn fused = m >= 1 && m <= kRows ? fused_fn(type, int(m)) : nullptr;
  if (fused) {
    at::parallel_for(0, w.rows, 16, [&](int64_t begin, int64_t end) {
      float sums[kRows];
      for (int64_t n = begin; n < end; ++n) {
        fused(w, w.data + n * w.row_bytes, x, sums);
        const float b = bias ? bias[n] : 0.0f;
        for (int64_t i = 0; i < m; ++i) out[i * w.rows + n] = sums[i] + b;
      }
    });
    return;
  }
  const int64_t num_panels = (w.rows + kPanel - 1) / kPanel;
  for (int64_t m0 = 0; m0 < m; m0 += kMBlock) {  // x rows that stay in L2 across the panels
    const int64_t m1 = std::min(m, m0 + kMBlock);
    at::parallel_for(0, num_panels, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(kPanel * w.k);  // (kPanel, K)
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * kPanel;
        const int cols = int(std::min<int64_t>(kPanel, w.rows - n0));
        for (int c = 0; c < cols; ++c) {
          w.row(w.data + (n0 + c) * w.row_bytes, w.num_blocks, w.layout, buf.data() + c * w.k);
        }
        for (int64_t r = m0; r < m1; r += kBlockX) {
          const int rows = int(std::min<int64_t>(kBlockX, m1 - r));
          dot_block_fn(rows, cols)(buf.data(), x + r * w.k, w.k, w.k, out + r * w.rows + n0,
                                   w.rows);
        }
        if (bias) {
          for (int64_t r = m0; r < m1; ++r)
            for (int c = 0; c < cols; ++c) out[r * w.rows + n0 + c] += bias[n0 + c];
        }
      }
    });
  }
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
// M <= gemv_max_rows runs the decode or panel path, larger M the tiled GEMM.
// Returns (M, N) float32.
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

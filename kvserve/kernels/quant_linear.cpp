// Linear layers over GGUF weights as stored: y = x @ W^T (+ bias), W read in its block format.
//
// W is (N, K) logically and (N, row_bytes) in memory: each output row is its K values in
// ggml blocks, exactly the bytes of the GGUF tensor (types by their ggml ids, below). A block
// is dequantized to float32 (the values the `gguf` package's dequantize gives) and used at once;
// all arithmetic is float32. Activations are never quantized.
//
//   small M (decode rows): each thread takes a range of output rows; per row it dequantizes
//     the K values into an L1-resident buffer and dots them with every row of x, kRows rows
//     at a time. The weight bytes are read once per step, however many rows the step has.
//   large M (prefill chunks): a tile of output rows is dequantized into a float32 buffer that
//     fits in L2 and handed to torch's GEMM (MKL / oneDNN), which reuses it across all M rows.
//
// The instruction set comes from the build flags (kvserve/kernels/quant.py builds AVX-512,
// AVX2 and portable variants): the FMA loops use ATen's Vectorized<float>, and the dequantize
// loops are written so that the compiler vectorizes them for the target.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kLanes = Vec::size();
constexpr int kRows = 4;  // rows of x dotted against one dequantized weight row at a time

// ggml type ids (gguf.GGMLQuantizationType) of the formats read as stored.
enum Type : int64_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q6_K = 14,
                      BF16 = 30 };

struct Layout {
  int64_t values;  // per block
  int64_t bytes;   // per block
};

Layout layout_of(int64_t type) {
  switch (type) {
    case F32: return {32, 128};
    case F16: return {32, 64};
    case BF16: return {32, 64};
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q8_0: return {32, 34};
    case Q4_K: return {256, 144};
    case Q6_K: return {256, 210};
    default: TORCH_CHECK(false, "quant_linear: unsupported ggml type ", type);
  }
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

// ---- one block to float32: out[0 .. values) --------------------------------------------------

// Q4_0: d (f16), 16 bytes of nibbles; low nibbles are values 0-15, high 16-31: d * (q - 8).
inline void block_q4_0(const uint8_t* __restrict b, float* __restrict out) {
  const float d = half_at(b);
  const uint8_t* qs = b + 2;
  for (int i = 0; i < 16; ++i) {
    out[i] = d * float(int(qs[i] & 0x0F) - 8);
    out[i + 16] = d * float(int(qs[i] >> 4) - 8);
  }
}

// Q4_1: d, m (f16), 16 bytes of nibbles (as Q4_0): d * q + m.
inline void block_q4_1(const uint8_t* __restrict b, float* __restrict out) {
  const float d = half_at(b), m = half_at(b + 2);
  const uint8_t* qs = b + 4;
  for (int i = 0; i < 16; ++i) {
    out[i] = d * float(qs[i] & 0x0F) + m;
    out[i + 16] = d * float(qs[i] >> 4) + m;
  }
}

// Q8_0: d (f16), 32 int8: d * q.
inline void block_q8_0(const uint8_t* __restrict b, float* __restrict out) {
  const float d = half_at(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < 32; ++i) out[i] = float(qs[i]) * d;
}

// Q4_K: d, dmin (f16), 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks of 32, 128 bytes
// of nibbles: 32 bytes per pair of sub-blocks, low nibbles the first, high the second.
// Value: (d * scale) * q - dmin * min.
inline void block_q4_k(const uint8_t* __restrict b, float* __restrict out) {
  const float d = half_at(b), dmin = half_at(b + 2);
  const uint8_t* s = b + 4;
  const uint8_t* qs = b + 16;
  for (int j = 0; j < 8; ++j) {
    const int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    const int mn = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    const float scale = d * float(sc), offset = dmin * float(mn);
    const uint8_t* q = qs + (j / 2) * 32;
    const int shift = (j % 2) * 4;
    float* o = out + j * 32;
    for (int i = 0; i < 32; ++i) o[i] = scale * float((q[i] >> shift) & 0x0F) - offset;
  }
}

// Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales (one per 16
// values), d (f16). Value: (d * scale) * (q - 32), q = low | high << 4.
inline void block_q6_k(const uint8_t* __restrict b, float* __restrict out) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_at(b + 208);
  for (int c = 0; c < 8; ++c) {  // chunks of 32: half h, nibble s, 32-byte part t
    const int h = c / 4, s = (c / 2) % 2, t = c % 2;
    const uint8_t* low = ql + h * 64 + t * 32;
    const uint8_t* high = qh + h * 32;
    const int low_shift = 4 * s, high_shift = 2 * (c % 4);
    const float scale0 = d * float(scales[2 * c]), scale1 = d * float(scales[2 * c + 1]);
    float* o = out + c * 32;
    for (int i = 0; i < 32; ++i) {
      const int q = ((low[i] >> low_shift) & 0x0F) | (((high[i] >> high_shift) & 0x03) << 4);
      o[i] = (i < 16 ? scale0 : scale1) * float(q - 32);
    }
  }
}

inline void block_f16(const uint8_t* __restrict b, float* __restrict out) {
  const c10::Half* v = reinterpret_cast<const c10::Half*>(b);
  for (int i = 0; i < 32; ++i) out[i] = float(v[i]);
}

inline void block_bf16(const uint8_t* __restrict b, float* __restrict out) {
  const c10::BFloat16* v = reinterpret_cast<const c10::BFloat16*>(b);
  for (int i = 0; i < 32; ++i) out[i] = float(v[i]);
}

// One weight row (K values) to float32.
template <void (*Block)(const uint8_t*, float*)>
void row_of(const uint8_t* row, int64_t num_blocks, Layout layout, float* out) {
  for (int64_t i = 0; i < num_blocks; ++i) Block(row + i * layout.bytes, out + i * layout.values);
}

using RowFn = void (*)(const uint8_t*, int64_t, Layout, float*);

void row_f32(const uint8_t* row, int64_t num_blocks, Layout layout, float* out) {
  std::memcpy(out, row, num_blocks * layout.bytes);
}

RowFn row_fn(int64_t type) {
  switch (type) {
    case F32: return row_f32;
    case F16: return row_of<block_f16>;
    case BF16: return row_of<block_bf16>;
    case Q4_0: return row_of<block_q4_0>;
    case Q4_1: return row_of<block_q4_1>;
    case Q8_0: return row_of<block_q8_0>;
    case Q4_K: return row_of<block_q4_k>;
    case Q6_K: return row_of<block_q6_k>;
    default: TORCH_CHECK(false, "quant_linear: unsupported ggml type ", type);
  }
}

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

// ---- fused decode rows: a 32-value block straight into registers ----------------------------
//
// For the block-32 formats on AVX-512 / AVX2, a block is widened in registers and multiplied
// into the accumulators at once (no store and reload through a buffer): decode at batch 1
// streams the weight bytes, and this keeps the CPU ahead of memory.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define KVSERVE_FUSED_BLOCKS 1
constexpr int kPerBlock = 32 / kLanes;  // vectors per 32-value block: 2 or 4

// The two f16 at p as floats [p0, p1] broadcast: (d, m).
inline void two_halves(const uint8_t* p, Vec& a, Vec& b) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m128 both = _mm_cvtph_ps(_mm_cvtsi32_si128(int(bits)));
#if defined(CPU_CAPABILITY_AVX512)
  a = _mm512_broadcastss_ps(both);
  b = _mm512_broadcastss_ps(_mm_movehdup_ps(both));
#else
  a = _mm256_broadcastss_ps(both);
  b = _mm256_broadcastss_ps(_mm_movehdup_ps(both));
#endif
}

// 16 nibbles-or-bytes as uint8 in `q`: the 32 values (low nibbles then high) as float, no scale.
inline void nibbles(__m128i q, Vec* out) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
#if defined(CPU_CAPABILITY_AVX512)
  out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
  out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
#else
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
#endif
}

struct DecodeQ4_0 {
  static void block(const uint8_t* b, Vec* w) {
    const Vec d = Vec(half_at(b)), eight = Vec(8.0f);
    nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)), w);
    for (int j = 0; j < kPerBlock; ++j) w[j] = (w[j] - eight) * d;
  }
};

struct DecodeQ4_1 {
  static void block(const uint8_t* b, Vec* w) {
    Vec d, m;
    two_halves(b, d, m);
    nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4)), w);
    for (int j = 0; j < kPerBlock; ++j) w[j] = at::vec::fmadd(w[j], d, m);
  }
};

struct DecodeQ8_0 {
  static void block(const uint8_t* b, Vec* w) {
    const Vec d = Vec(half_at(b));
    for (int j = 0; j < kPerBlock; ++j) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + j * kLanes));
#if defined(CPU_CAPABILITY_AVX512)
      w[j] = Vec(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))) * d;
#else
      w[j] = Vec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))) * d;
#endif
    }
  }
};

// sums[r] = dot(W row, x[r]) for R rows of x, each block decoded once into registers.
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

// out[m, n] = dot(W[n], x[m]) + bias[n] for all m, n: the decode path. Formats with a fused
// kernel decode each block in registers once per kRows rows of x; the others dequantize the
// weight row once into an L1 buffer and dot every row of x with it.
void gemv(const Weight& w, int64_t type, const float* x, int64_t m, const float* bias,
          float* out) {
  FusedFn fused[kRows + 1] = {nullptr};
  for (int r = 1; r <= kRows; ++r) fused[r] = fused_fn(type, r);
  at::parallel_for(0, w.rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(fused[1] ? 0 : w.k);
    float sums[kRows];
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = w.data + n * w.row_bytes;
      const float b = bias ? bias[n] : 0.0f;
      if (!fused[1]) w.row(row, w.num_blocks, w.layout, buf.data());
      for (int64_t r = 0; r < m; r += kRows) {
        const int rows = int(std::min<int64_t>(kRows, m - r));
        if (fused[rows]) {
          fused[rows](w, row, x + r * w.k, sums);
        } else {
          dot_buffer(buf.data(), x + r * w.k, rows, w.k, sums);
        }
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

// The prefill path: L2-sized float32 tiles of W through torch's GEMM.
void tiled_gemm(const Weight& w, const at::Tensor& x, at::Tensor& out) {
  const int64_t tile_rows = std::max<int64_t>(16, (256 * 1024) / (w.k * 4));
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_linear", &quant_linear, "x @ dequantize(W)^T + bias, W in a ggml block format");
  m.def("dequantize", &dequantize, "W (N, row_bytes) in a ggml block format -> (N, K) float32");
  m.def("dequantize_rows", &dequantize_rows, "rows ids of W -> (len(ids), K) float32");
}

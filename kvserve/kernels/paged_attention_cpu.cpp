// Paged decode attention on the CPU: one query token per seq, K and V read in place from the
// block cache (no gathered copy), vectorized with ATen's Vectorized<float>.
//
// Cache layout (DESIGN.md §3): K and V of shape (num_blocks, block_size, kv_heads, head_dim),
// so one block of one layer is a contiguous (block_size, kv_heads * head_dim) tile.
//
// A work item is one seq, all its heads. Two passes over its blocks:
//   1. scores: each KV head's query heads (the GQA group) dot every key row of the head;
//      the dots of up to 16 keys are summed across lanes together (`lane_sums`), which costs
//      a third of summing each on its own;
//   2. softmax per query head, then the probability-weighted sum of V, accumulated in
//      registers per KV head and block.
// K and V are each read once; an item's scores fit in L1/L2. Items are handed out from an
// atomic counter to torch's intra-op threads: seqs differ in length, and a static split
// would leave one thread idle.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kLanes = Vec::size();

// out[i] = the sum of the lanes of dots[i], for i < kLanes.
inline void lane_sums(const Vec* dots, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: a0+a2 b0+b2 a1+a3 b1+b3
    const __m512 a = dots[2 * i], b = dots[2 * i + 1];
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sum of 4 consecutive dots
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Fold the four 128-bit lanes: 0x88 takes lanes (0, 2) of each operand, 0xDD (1, 3).
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88),
                                      _mm512_shuffle_f32x4(low, high, 0xDD)));
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 pairs[4], quads[2];
  for (int i = 0; i < 4; ++i) {
    const __m256 a = dots[2 * i], b = dots[2 * i + 1];
    pairs[i] = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 2; ++i) {
    const __m256d a = _mm256_castps_pd(pairs[2 * i]), b = _mm256_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
                             _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
  }
  // quads[0] holds dots 0-3 in each 128-bit half, quads[1] dots 4-7: add the halves.
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(quads[0], quads[1], 0x20),
                                      _mm256_permute2f128_ps(quads[0], quads[1], 0x31)));
#else
  for (int i = 0; i < kLanes; ++i) {
    out[i] = at::vec::vec_reduce_all<float>(std::plus<Vec>(), dots[i]);
  }
#endif
}

struct Shape {
  int64_t block_size, kv_heads;
};

// One seq: out (kv_heads * kGroup, head_dim) = softmax(q K^T * scale) V over the keys
// [start, seq_len). kVecs = head_dim / kLanes and kGroup (query heads per KV head) are
// constants, so the per-head loops unroll into registers.
// Ask for the next block's tile while this one is computed: blocks lie anywhere in the
// pool, so the hardware prefetchers cannot guess where the next one starts.
inline void prefetch_tile(const float* tile, int64_t num_floats) {
  for (int64_t i = 0; i < num_floats; i += 64 / sizeof(float)) __builtin_prefetch(tile + i);
}

struct Scratch {
  std::vector<float> scores;  // (num_heads, row_len)
  std::vector<Vec> dots;      // (kv_heads, group, kLanes) dots not yet summed
  std::vector<Vec> acc;       // (kv_heads, group, kVecs) weighted sums of V
  std::vector<float> inv_sum;  // (num_heads,)
};

// One seq: out (kv_heads * kGroup, head_dim) = softmax(q K^T * scale) V over the keys
// [start, seq_len). kVecs = head_dim / kLanes and kGroup (query heads per KV head) are
// constants, so the per-head loops unroll into registers.
template <int kVecs, int kGroup>
void attend_seq(const float* q, const float* k_cache, const float* v_cache,
                const int64_t* blocks, int64_t seq_len, int64_t start, const Shape& s,
                float scale, float* out, Scratch& scratch) {
  constexpr int64_t kDim = kVecs * kLanes;
  const int64_t row_stride = s.kv_heads * kDim;  // floats between consecutive tokens
  const int64_t tile = s.block_size * row_stride;  // floats of one block
  const int64_t num_keys = seq_len - start;
  const int64_t num_heads = s.kv_heads * kGroup;
  // Rows padded to whole vectors: lane_sums stores kLanes scores at a time.
  const int64_t row_len = (num_keys + kLanes - 1) / kLanes * kLanes;
  scratch.scores.resize(num_heads * row_len);
  scratch.dots.resize(num_heads * kLanes);
  scratch.acc.assign(num_heads * kVecs, Vec(0.0f));
  scratch.inv_sum.resize(num_heads);
  float* scores = scratch.scores.data();
  Vec* dots = scratch.dots.data();
  const int64_t first_block = start / s.block_size;
  const int64_t last_block = (seq_len - 1) / s.block_size;

  // Pass 1: scores[head][key], K read block by block.
  int filled = 0;         // dots of each head not yet summed
  int64_t key_index = 0;  // the key of each head's first unsummed dot, counted from start
  prefetch_tile(k_cache + blocks[first_block] * tile, tile);
  for (int64_t b = first_block; b <= last_block; ++b) {
    const float* next_tile = k_cache + blocks[b < last_block ? b + 1 : b] * tile;
    const int64_t lo = std::max<int64_t>(start - b * s.block_size, 0);
    const int64_t hi = std::min<int64_t>(seq_len - b * s.block_size, s.block_size);
    int next_filled = filled;
    int64_t next_key_index = key_index;
    for (int64_t kv_head = 0; kv_head < s.kv_heads; ++kv_head) {
      Vec query[kGroup][kVecs];
      for (int g = 0; g < kGroup; ++g) {
        for (int j = 0; j < kVecs; ++j) {
          query[g][j] = Vec::loadu(q + (kv_head * kGroup + g) * kDim + j * kLanes) * Vec(scale);
        }
      }
      Vec* head_dots = dots + kv_head * kGroup * kLanes;  // (kGroup, kLanes)
      const float* key = k_cache + (blocks[b] * s.block_size + lo) * row_stride + kv_head * kDim;
      int i = filled;
      int64_t index = key_index;
      for (int64_t t = lo; t < hi; ++t, key += row_stride) {
        if (kv_head == 0) prefetch_tile(next_tile + t * row_stride, row_stride);
        Vec k[kVecs];
        for (int j = 0; j < kVecs; ++j) k[j] = Vec::loadu(key + j * kLanes);
        for (int g = 0; g < kGroup; ++g) {
          Vec dot = query[g][0] * k[0];
          for (int j = 1; j < kVecs; ++j) dot = at::vec::fmadd(query[g][j], k[j], dot);
          head_dots[g * kLanes + i] = dot;
        }
        if (++i == kLanes) {
          for (int g = 0; g < kGroup; ++g) {
            lane_sums(head_dots + g * kLanes, scores + (kv_head * kGroup + g) * row_len + index);
          }
          index += kLanes;
          i = 0;
        }
      }
      next_filled = i;
      next_key_index = index;
    }
    filled = next_filled;
    key_index = next_key_index;
  }
  if (filled > 0) {
    for (int64_t head = 0; head < num_heads; ++head) {
      for (int i = filled; i < kLanes; ++i) dots[head * kLanes + i] = Vec(0.0f);
      lane_sums(dots + head * kLanes, scores + head * row_len + key_index);
    }
  }

  // Softmax of each head's row, in place: probabilities, and 1 / their sum.
  for (int64_t head = 0; head < num_heads; ++head) {
    float* row = scores + head * row_len;
    const float max_score = at::vec::reduce_all<float>(
        [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, row, num_keys);
    const Vec max_vec(max_score);
    Vec sum_vec(0.0f);
    int64_t t = 0;
    for (; t + kLanes <= num_keys; t += kLanes) {
      const Vec p = (Vec::loadu(row + t) - max_vec).exp_u20();
      p.store(row + t);
      sum_vec = sum_vec + p;
    }
    float sum = at::vec::vec_reduce_all<float>(std::plus<Vec>(), sum_vec);
    for (; t < num_keys; ++t) {
      row[t] = std::exp(row[t] - max_score);
      sum += row[t];
    }
    scratch.inv_sum[head] = 1.0f / sum;
  }

  // Pass 2: out[head] = sum over keys of p[head][key] * V[key], V read block by block.
  key_index = 0;
  prefetch_tile(v_cache + blocks[first_block] * tile, tile);
  for (int64_t b = first_block; b <= last_block; ++b) {
    const float* next_tile = v_cache + blocks[b < last_block ? b + 1 : b] * tile;
    const int64_t lo = std::max<int64_t>(start - b * s.block_size, 0);
    const int64_t hi = std::min<int64_t>(seq_len - b * s.block_size, s.block_size);
    for (int64_t kv_head = 0; kv_head < s.kv_heads; ++kv_head) {
      Vec* head_acc = scratch.acc.data() + kv_head * kGroup * kVecs;  // (kGroup, kVecs)
      Vec acc[kGroup][kVecs];
      for (int g = 0; g < kGroup; ++g) {
        for (int j = 0; j < kVecs; ++j) acc[g][j] = head_acc[g * kVecs + j];
      }
      const float* probs = scores + kv_head * kGroup * row_len + key_index;
      const float* value =
          v_cache + (blocks[b] * s.block_size + lo) * row_stride + kv_head * kDim;
      for (int64_t t = 0; t < hi - lo; ++t, value += row_stride) {
        if (kv_head == 0) prefetch_tile(next_tile + (lo + t) * row_stride, row_stride);
        Vec v[kVecs];
        for (int j = 0; j < kVecs; ++j) v[j] = Vec::loadu(value + j * kLanes);
        for (int g = 0; g < kGroup; ++g) {
          const Vec p(probs[g * row_len + t]);
          for (int j = 0; j < kVecs; ++j) acc[g][j] = at::vec::fmadd(p, v[j], acc[g][j]);
        }
      }
      for (int g = 0; g < kGroup; ++g) {
        for (int j = 0; j < kVecs; ++j) head_acc[g * kVecs + j] = acc[g][j];
      }
    }
    key_index += hi - lo;
  }
  for (int64_t head = 0; head < num_heads; ++head) {
    const Vec inv(scratch.inv_sum[head]);
    for (int j = 0; j < kVecs; ++j) {
      (scratch.acc[head * kVecs + j] * inv).store(out + head * kDim + j * kLanes);
    }
  }
}

template <int kVecs, int kGroup>
void attend_all(const torch::Tensor& q, const torch::Tensor& k_cache,
                const torch::Tensor& v_cache, const torch::Tensor& block_table,
                const std::vector<int64_t>& seq_lens, int64_t window, double scale,
                torch::Tensor& out) {
  const int64_t num_seqs = q.size(0);
  const int64_t seq_stride = q.size(1) * q.size(2);
  const Shape shape{k_cache.size(1), k_cache.size(2)};
  const int64_t width = block_table.size(1);
  const float* q_ptr = q.data_ptr<float>();
  const float* k_ptr = k_cache.data_ptr<float>();
  const float* v_ptr = v_cache.data_ptr<float>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  std::atomic<int64_t> next{0};
  const int64_t num_threads = std::min<int64_t>(at::get_num_threads(), num_seqs);
  at::parallel_for(0, num_threads, 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t seq = next++; seq < num_seqs; seq = next++) {
      const int64_t seq_len = seq_lens[seq];
      const int64_t start = window > 0 ? std::max<int64_t>(seq_len - window, 0) : 0;
      attend_seq<kVecs, kGroup>(q_ptr + seq * seq_stride, k_ptr, v_ptr, table + seq * width,
                                seq_len, start, shape, static_cast<float>(scale),
                                out_ptr + seq * seq_stride, scratch);
    }
  });
}

template <int kVecs>
void dispatch_group(int64_t group, const torch::Tensor& q, const torch::Tensor& k_cache,
                    const torch::Tensor& v_cache, const torch::Tensor& block_table,
                    const std::vector<int64_t>& seq_lens, int64_t window, double scale,
                    torch::Tensor& out) {
#define KVSERVE_GROUP(G)                                                                  \
  case G:                                                                                 \
    attend_all<kVecs, G>(q, k_cache, v_cache, block_table, seq_lens, window, scale, out); \
    return;
  switch (group) {
    KVSERVE_GROUP(1)
    KVSERVE_GROUP(2)
    KVSERVE_GROUP(3)
    KVSERVE_GROUP(4)
    KVSERVE_GROUP(5)
    KVSERVE_GROUP(6)
    KVSERVE_GROUP(7)
    KVSERVE_GROUP(8)
    default: TORCH_CHECK(false, "paged_decode_attention: 1 to 8 query heads per KV head");
  }
#undef KVSERVE_GROUP
}

}  // namespace

// Whether `paged_decode_attention` takes this head shape.
bool supports(int64_t num_heads, int64_t kv_heads, int64_t head_dim) {
  if (kv_heads <= 0 || num_heads % kv_heads != 0 || num_heads / kv_heads > 8) return false;
  const int64_t vecs = head_dim / kLanes;
  return head_dim % kLanes == 0 && (vecs == 1 || vecs == 2 || vecs == 4 || vecs == 8 || vecs == 16);
}

// q: (num_seqs, num_heads, head_dim) float32; k_cache, v_cache: (num_blocks, block_size,
// kv_heads, head_dim) float32; block_table: (num_seqs, width) int64; seq_lens: each seq's
// context including this token; window: sliding window in tokens, 0 for none.
// Returns (num_seqs, num_heads, head_dim).
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache,
                                     const torch::Tensor& block_table,
                                     const std::vector<int64_t>& seq_lens, int64_t window,
                                     double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode_attention: q (n, heads, dim), caches (blocks, bs, kv_heads, dim)");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k_cache.scalar_type() == torch::kFloat &&
                  v_cache.scalar_type() == torch::kFloat,
              "paged_decode_attention: float32 q and caches only");
  TORCH_CHECK(block_table.scalar_type() == torch::kLong && block_table.dim() == 2,
              "paged_decode_attention: block_table (n, width) int64");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  block_table.is_contiguous(),
              "paged_decode_attention: contiguous tensors only");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && supports(q.size(1), k_cache.size(2), q.size(2)),
              "paged_decode_attention: unsupported head shape");
  TORCH_CHECK(static_cast<int64_t>(seq_lens.size()) == q.size(0) &&
                  block_table.size(0) == q.size(0) && q.size(0) > 0,
              "paged_decode_attention: one seq_len and block-table row per query");
  const int64_t block_size = k_cache.size(1), width = block_table.size(1);
  const int64_t num_blocks = k_cache.size(0);
  const int64_t* table = block_table.data_ptr<int64_t>();
  for (size_t i = 0; i < seq_lens.size(); ++i) {
    const int64_t len = seq_lens[i];
    TORCH_CHECK(len > 0 && (len + block_size - 1) / block_size <= width,
                "paged_decode_attention: seq_len outside the block table");
    for (int64_t b = 0; b * block_size < len; ++b) {
      const int64_t id = table[i * width + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "paged_decode_attention: block id out of range");
    }
  }
  auto out = torch::empty_like(q);
  const int64_t group = q.size(1) / k_cache.size(2);
  switch (q.size(2) / kLanes) {
    case 1: dispatch_group<1>(group, q, k_cache, v_cache, block_table, seq_lens, window, scale, out); break;
    case 2: dispatch_group<2>(group, q, k_cache, v_cache, block_table, seq_lens, window, scale, out); break;
    case 4: dispatch_group<4>(group, q, k_cache, v_cache, block_table, seq_lens, window, scale, out); break;
    case 8: dispatch_group<8>(group, q, k_cache, v_cache, block_table, seq_lens, window, scale, out); break;
    default: dispatch_group<16>(group, q, k_cache, v_cache, block_table, seq_lens, window, scale, out);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supports", &supports, "whether paged_decode_attention takes this head shape");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over the paged KV cache (float32, CPU)");
}

// Paged decode attention on the CPU: one query token per seq, K and V read in place from the
// block cache (no gathered copy), vectorized with ATen's Vectorized<float>.
//
// Cache layout (DESIGN.md §3): K and V of shape (num_blocks, block_size, kv_heads, head_dim),
// so one block of one layer is a contiguous (block_size, kv_heads * head_dim) tile. The
// stored type is chosen at build time (KVSERVE_CACHE_*; kvserve/kernels/__init__.py builds
// one module per type): float32, float16 or bfloat16 values, or int8 values times one float32
// scale per (token, KV head) in k_scale / v_scale (kvserve/kv/quant.py). Values are widened
// to float32 as they are loaded; all arithmetic is float32.
//
// A work item is one seq, all its heads. Two passes over its blocks:
//   1. scores: each KV head's query heads (the GQA group) dot every key row of the head;
//      the dots of kLanes keys (16 on AVX-512, 8 on AVX2) are summed across lanes together
//      (`lane_sums`), a third of the shuffles of summing each on its own;
//   2. softmax per query head, then the probability-weighted sum of V, accumulated in
//      registers per KV head and block.
// K and V are each read once; an item's scores fit in L1/L2. While a block is computed, the
// next one's rows are prefetched: blocks lie anywhere in the pool, so the hardware
// prefetchers cannot guess where the next one starts. Items are handed out from an atomic
// counter to torch's intra-op threads: seqs differ in length, and a static split would
// leave one thread idle.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kLanes = Vec::size();

#if defined(KVSERVE_CACHE_FLOAT16)
using CacheT = at::Half;
constexpr auto kCacheType = torch::kHalf;
#elif defined(KVSERVE_CACHE_BFLOAT16)
using CacheT = at::BFloat16;
constexpr auto kCacheType = torch::kBFloat16;
#elif defined(KVSERVE_CACHE_INT8)
using CacheT = int8_t;
constexpr auto kCacheType = torch::kChar;
#else
using CacheT = float;
constexpr auto kCacheType = torch::kFloat;
#endif
constexpr bool kScaled = std::is_same_v<CacheT, int8_t>;  // values times a per-row scale

// kLanes stored values from p, widened to float32.
inline Vec load(const CacheT* p) {
  if constexpr (std::is_same_v<CacheT, float>) {
    return Vec::loadu(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<CacheT, int8_t>) {
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
    } else if constexpr (std::is_same_v<CacheT, at::Half>) {
      return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
    } else {  // bfloat16: the high half of a float32
      const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<CacheT, int8_t>) {
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
    } else if constexpr (std::is_same_v<CacheT, at::Half>) {
      return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
    } else {
      const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
#else
    float wide[kLanes];
    for (int i = 0; i < kLanes; ++i) wide[i] = static_cast<float>(p[i]);
    return Vec::loadu(wide);
#endif
  }
}

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

inline void prefetch_row(const CacheT* row, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t i = 0; i < count * int64_t(sizeof(CacheT)); i += 64) __builtin_prefetch(bytes + i);
}

struct Cache {
  const CacheT* k;
  const CacheT* v;
  const float* k_scale;  // (num_blocks, block_size, kv_heads); null unless kScaled
  const float* v_scale;
  int64_t block_size, kv_heads;
};

struct Scratch {
  std::vector<float> scores;   // (num_heads, row_len)
  std::vector<Vec> dots;       // (kv_heads, group, kLanes) dots not yet summed
  std::vector<Vec> acc;        // (kv_heads, group, kVecs) weighted sums of V
  std::vector<float> inv_sum;  // (num_heads,)
};

// One seq's KV heads [h0, h1): out (heads of those, head_dim) = softmax(q K^T * scale) V over
// the keys [start, seq_len). kVecs = head_dim / kLanes and kGroup (query heads per KV head)
// are constants, so the per-head loops unroll into registers.
template <int kVecs, int kGroup>
void attend_seq(const float* q, const Cache& c, const int64_t* blocks, int64_t seq_len,
                int64_t start, int64_t h0, int64_t h1, float scale, float* out,
                Scratch& scratch) {
  constexpr int64_t kDim = kVecs * kLanes;
  const int64_t row_stride = c.kv_heads * kDim;  // values between consecutive tokens
  const int64_t num_keys = seq_len - start;
  const int64_t num_heads = c.kv_heads * kGroup;
  // Rows padded to whole vectors: lane_sums stores kLanes scores at a time.
  const int64_t row_len = (num_keys + kLanes - 1) / kLanes * kLanes;
  scratch.scores.resize(num_heads * row_len);
  scratch.dots.resize(num_heads * kLanes);
  scratch.acc.assign(num_heads * kVecs, Vec(0.0f));
  scratch.inv_sum.resize(num_heads);
  float* scores = scratch.scores.data();
  Vec* dots = scratch.dots.data();
  const int64_t first_block = start / c.block_size;
  const int64_t last_block = (seq_len - 1) / c.block_size;

  // Pass 1: scores[head][key], K read block by block.
  int filled = 0;         // dots of each head not yet summed
  int64_t key_index = 0;  // the key of each head's first unsummed dot, counted from start
  for (int64_t b = first_block; b <= last_block; ++b) {
    const int64_t next = blocks[b < last_block ? b + 1 : b] * c.block_size;  // first slot
    const int64_t lo = std::max<int64_t>(start - b * c.block_size, 0);
    const int64_t hi = std::min<int64_t>(seq_len - b * c.block_size, c.block_size);
    const int64_t slot = blocks[b] * c.block_size;
    int next_filled = filled;
    int64_t next_key_index = key_index;
    for (int64_t kv_head = h0; kv_head < h1; ++kv_head) {
      Vec query[kGroup][kVecs];
      for (int g = 0; g < kGroup; ++g) {
        for (int j = 0; j < kVecs; ++j) {
          query[g][j] = Vec::loadu(q + (kv_head * kGroup + g) * kDim + j * kLanes) * Vec(scale);
        }
      }
      Vec* head_dots = dots + kv_head * kGroup * kLanes;  // (kGroup, kLanes)
      int i = filled;
      int64_t index = key_index;
      for (int64_t t = lo; t < hi; ++t) {
        if (kv_head == h0) prefetch_row(c.k + (next + t) * row_stride, row_stride);
        const CacheT* key = c.k + (slot + t) * row_stride + kv_head * kDim;
        Vec k[kVecs];
        for (int j = 0; j < kVecs; ++j) k[j] = load(key + j * kLanes);
        const Vec row_scale(kScaled ? c.k_scale[(slot + t) * c.kv_heads + kv_head] : 1.0f);
        for (int g = 0; g < kGroup; ++g) {
          Vec dot = query[g][0] * k[0];
          for (int j = 1; j < kVecs; ++j) dot = at::vec::fmadd(query[g][j], k[j], dot);
          head_dots[g * kLanes + i] = kScaled ? dot * row_scale : dot;
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
    for (int64_t head = h0 * kGroup; head < h1 * kGroup; ++head) {
      for (int i = filled; i < kLanes; ++i) dots[head * kLanes + i] = Vec(0.0f);
      lane_sums(dots + head * kLanes, scores + head * row_len + key_index);
    }
  }

  // Softmax of each head's row, in place: probabilities, and 1 / their sum.
  for (int64_t head = h0 * kGroup; head < h1 * kGroup; ++head) {
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
  for (int64_t b = first_block; b <= last_block; ++b) {
    const int64_t next = blocks[b < last_block ? b + 1 : b] * c.block_size;
    const int64_t lo = std::max<int64_t>(start - b * c.block_size, 0);
    const int64_t hi = std::min<int64_t>(seq_len - b * c.block_size, c.block_size);
    const int64_t slot = blocks[b] * c.block_size;
    for (int64_t kv_head = h0; kv_head < h1; ++kv_head) {
      Vec* head_acc = scratch.acc.data() + kv_head * kGroup * kVecs;  // (kGroup, kVecs)
      Vec acc[kGroup][kVecs];
      for (int g = 0; g < kGroup; ++g) {
        for (int j = 0; j < kVecs; ++j) acc[g][j] = head_acc[g * kVecs + j];
      }
      const float* probs = scores + kv_head * kGroup * row_len + key_index;  // key lo
      for (int64_t t = lo; t < hi; ++t) {
        if (kv_head == h0) prefetch_row(c.v + (next + t) * row_stride, row_stride);
        const CacheT* value = c.v + (slot + t) * row_stride + kv_head * kDim;
        Vec v[kVecs];
        for (int j = 0; j < kVecs; ++j) v[j] = load(value + j * kLanes);
        const float row_scale = kScaled ? c.v_scale[(slot + t) * c.kv_heads + kv_head] : 1.0f;
        for (int g = 0; g < kGroup; ++g) {
          const Vec p(probs[g * row_len + t - lo] * row_scale);
          for (int j = 0; j < kVecs; ++j) acc[g][j] = at::vec::fmadd(p, v[j], acc[g][j]);
        }
      }
      for (int g = 0; g < kGroup; ++g) {
        for (int j = 0; j < kVecs; ++j) head_acc[g * kVecs + j] = acc[g][j];
      }
    }
    key_index += hi - lo;
  }
  for (int64_t head = h0 * kGroup; head < h1 * kGroup; ++head) {
    const Vec inv(scratch.inv_sum[head]);
    for (int j = 0; j < kVecs; ++j) {
      (scratch.acc[head * kVecs + j] * inv).store(out + head * kDim + j * kLanes);
    }
  }
}

struct Batch {
  const float* q;  // (num_seqs, num_heads, head_dim)
  const int64_t* table;
  int64_t table_width;
  const std::vector<int64_t>* seq_lens;
  int64_t window;
  float scale;
  float* out;
};

// A work item is a whole seq, or with fewer seqs than twice the threads one KV head of one
// (each thread then reads a third of every row of a 3-KV-head model, but no thread idles).
template <int kVecs, int kGroup>
void attend_all(const Cache& cache, const Batch& batch) {
  const int64_t num_seqs = static_cast<int64_t>(batch.seq_lens->size());
  const int64_t seq_stride = cache.kv_heads * kGroup * kVecs * kLanes;
  const int64_t threads = at::get_num_threads();
  const int64_t parts = num_seqs >= 2 * threads ? 1 : cache.kv_heads;  // items per seq
  const int64_t heads_per_part = cache.kv_heads / parts;
  const int64_t num_items = num_seqs * parts;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, num_items), 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t item = next++; item < num_items; item = next++) {
      const int64_t seq = item / parts, h0 = (item % parts) * heads_per_part;
      const int64_t seq_len = (*batch.seq_lens)[seq];
      const int64_t start = batch.window > 0 ? std::max<int64_t>(seq_len - batch.window, 0) : 0;
      attend_seq<kVecs, kGroup>(batch.q + seq * seq_stride, cache,
                                batch.table + seq * batch.table_width, seq_len, start, h0,
                                h0 + heads_per_part, batch.scale, batch.out + seq * seq_stride,
                                scratch);
    }
  });
}

template <int kVecs>
void dispatch_group(int64_t group, const Cache& cache, const Batch& batch) {
  switch (group) {
    case 1: return attend_all<kVecs, 1>(cache, batch);
    case 2: return attend_all<kVecs, 2>(cache, batch);
    case 3: return attend_all<kVecs, 3>(cache, batch);
    case 4: return attend_all<kVecs, 4>(cache, batch);
    case 5: return attend_all<kVecs, 5>(cache, batch);
    case 6: return attend_all<kVecs, 6>(cache, batch);
    case 7: return attend_all<kVecs, 7>(cache, batch);
    case 8: return attend_all<kVecs, 8>(cache, batch);
    default: TORCH_CHECK(false, "paged_decode_attention: 1 to 8 query heads per KV head");
  }
}

void check_scale(const torch::Tensor& scale, const torch::Tensor& cache, const char* name) {
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() &&
                  scale.dim() == 3 && scale.size(0) == cache.size(0) &&
                  scale.size(1) == cache.size(1) && scale.size(2) == cache.size(2),
              "paged_decode_attention: ", name,
              " must be float32 (num_blocks, block_size, kv_heads), contiguous");
}

}  // namespace

// Whether `paged_decode_attention` takes this head shape.
bool supports(int64_t num_heads, int64_t kv_heads, int64_t head_dim) {
  if (kv_heads <= 0 || num_heads % kv_heads != 0 || num_heads / kv_heads > 8) return false;
  const int64_t vecs = head_dim / kLanes;
  return head_dim % kLanes == 0 &&
         (vecs == 1 || vecs == 2 || vecs == 4 || vecs == 8 || vecs == 16);
}

// q: (num_seqs, num_heads, head_dim) float32; k_cache, v_cache: (num_blocks, block_size,
// kv_heads, head_dim) of this build's type; k_scale, v_scale: (num_blocks, block_size,
// kv_heads) float32 for int8, else None; block_table: (num_seqs, width) int64; seq_lens: each
// seq's context including this token; window: sliding window in tokens, 0 for none.
// Returns (num_seqs, num_heads, head_dim) float32.
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache,
                                     const c10::optional<torch::Tensor>& k_scale,
                                     const c10::optional<torch::Tensor>& v_scale,
                                     const torch::Tensor& block_table,
                                     const std::vector<int64_t>& seq_lens, int64_t window,
                                     double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode_attention: q (n, heads, dim), caches (blocks, bs, kv_heads, dim)");
  TORCH_CHECK(q.scalar_type() == torch::kFloat, "paged_decode_attention: float32 q only");
  TORCH_CHECK(k_cache.scalar_type() == kCacheType && v_cache.scalar_type() == kCacheType,
              "paged_decode_attention: this build reads ", c10::toString(kCacheType),
              " caches, got ", k_cache.scalar_type());
  TORCH_CHECK(k_scale.has_value() == kScaled && v_scale.has_value() == kScaled,
              "paged_decode_attention: scales go with int8 caches, and only with them");
  if constexpr (kScaled) {
    check_scale(*k_scale, k_cache, "k_scale");
    check_scale(*v_scale, v_cache, "v_scale");
  }
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
  const Cache cache{
      reinterpret_cast<const CacheT*>(k_cache.data_ptr()),
      reinterpret_cast<const CacheT*>(v_cache.data_ptr()),
      kScaled ? k_scale->data_ptr<float>() : nullptr,
      kScaled ? v_scale->data_ptr<float>() : nullptr,
      block_size,
      k_cache.size(2)};
  const Batch batch{q.data_ptr<float>(), table,   width, &seq_lens,
                    window,              static_cast<float>(scale), out.data_ptr<float>()};
  const int64_t group = q.size(1) / k_cache.size(2);
  switch (q.size(2) / kLanes) {
    case 1: dispatch_group<1>(group, cache, batch); break;
    case 2: dispatch_group<2>(group, cache, batch); break;
    case 4: dispatch_group<4>(group, cache, batch); break;
    case 8: dispatch_group<8>(group, cache, batch); break;
    default: dispatch_group<16>(group, cache, batch);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supports", &supports, "whether paged_decode_attention takes this head shape");
  // The GIL is released while the kernel runs (its arguments are converted before): the
  // server's HTTP thread keeps running during a step, as it does in torch's own ops.
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over the paged KV cache (CPU)",
        py::call_guard<py::gil_scoped_release>());
}

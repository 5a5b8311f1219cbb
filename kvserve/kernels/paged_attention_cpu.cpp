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
// A work item is one key range (chunk) of one seq, all its heads or one KV head. Two passes
// over its blocks:
//   1. scores: each KV head's query heads (the GQA group) dot every key row of the head;
//      the dots of kLanes keys (16 on AVX-512, 8 on AVX2) are summed across lanes together
//      (`lane_sums`), a third of the shuffles of summing each on its own;
//   2. softmax per query head, then the probability-weighted sum of V, accumulated in
//      registers per KV head and block.
// K and V are each read once; an item's scores fit in L1/L2. While a block is computed, the
// next one's rows are prefetched: blocks lie anywhere in the pool, so the hardware
// prefetchers cannot guess where the next one starts. The chunks of a long seq are merged
// at the end (attend_all).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "paged_attention_seq.h"

namespace {

using namespace kvserve_attention;

struct Batch {
  const float* q;  // (num_seqs, num_heads, head_dim)
  const int64_t* table;
  int64_t table_width;
  const std::vector<int64_t>* seq_lens;
  int64_t window;
  float scale;
  float* out;
};

// A seq's keys are attended in chunks of kChunk positions (aligned to multiples of kChunk),
// each chunk its own work item, and the chunks' outputs merged by their softmax statistics:
// one long seq then spreads over every thread (batch-1 decode of a 3-KV-head model on 2
// threads otherwise leaves one thread idle a third of the time). The chunks depend on the seq
// alone, so its output is the same in any batch and at any thread count.
constexpr int64_t kChunk = 128;

// Where each seq's work lies: keys [start, seq_len) in chunks [first_chunk, + num_chunks),
// work items [item_begin, item_begin + parts * num_chunks), and, with more than one chunk,
// per-chunk outputs and statistics from index partial_begin.
struct SeqWork {
  int64_t start, seq_len, first_chunk, num_chunks, item_begin, partial_begin;
};

// out[seq] = the chunks' outputs weighted by each one's share of the softmax denominator:
// chunk c with largest score m_c and sum s_c (of exp(score - m_c)) weighs s_c exp(m_c - m).
void merge_chunks(const std::vector<SeqWork>& work, const float* partial, const float* stats,
                  int64_t num_heads, int64_t head_dim, float* out) {
  const int64_t seq_stride = num_heads * head_dim;
  at::parallel_for(0, static_cast<int64_t>(work.size()), 8, [&](int64_t begin, int64_t end) {
    std::vector<float> weight;
    for (int64_t seq = begin; seq < end; ++seq) {
      const SeqWork& w = work[seq];
      if (w.num_chunks == 1) continue;  // written in place
      weight.resize(w.num_chunks);
      for (int64_t head = 0; head < num_heads; ++head) {
        const float* st = stats + (w.partial_begin * num_heads + head) * 2;  // chunk c: +c*2H
        float largest = -INFINITY, total = 0.0f;
        for (int64_t c = 0; c < w.num_chunks; ++c) largest = std::max(largest, st[c * 2 * num_heads]);
        for (int64_t c = 0; c < w.num_chunks; ++c) {
          const float* chunk = st + c * 2 * num_heads;
          weight[c] = chunk[1] * std::exp(chunk[0] - largest);
          total += weight[c];
        }
        float* o = out + seq * seq_stride + head * head_dim;
        for (int64_t j = 0; j < head_dim; j += kLanes) {
          Vec acc(0.0f);
          for (int64_t c = 0; c < w.num_chunks; ++c) {
            const float* p = partial + (w.partial_begin + c) * seq_stride + head * head_dim;
            acc = at::vec::fmadd(Vec(weight[c] / total), Vec::loadu(p + j), acc);
          }
          acc.store(o + j);
        }
      }
    }
  });
}

// Work items are (seq, part, chunk): a part is the whole seq's heads, or with fewer seqs than
// twice the threads one KV head (each thread then reads a third of every row of a 3-KV-head
// model, but no thread idles). Items are handed out from an atomic counter: seqs differ in
// length, and a static split would leave threads idle.
template <int kVecs, int kGroup>
void attend_all(const Cache& cache, const Batch& batch) {
  const int64_t num_seqs = static_cast<int64_t>(batch.seq_lens->size());
  const int64_t num_heads = cache.kv_heads * kGroup, head_dim = kVecs * kLanes;
  const int64_t seq_stride = num_heads * head_dim;
  const int64_t threads = at::get_num_threads();
  const int64_t parts = num_seqs >= 2 * threads ? 1 : cache.kv_heads;  // per seq and chunk
  const int64_t heads_per_part = cache.kv_heads / parts;
  std::vector<SeqWork> work(num_seqs);
  std::vector<int64_t> item_begin(num_seqs + 1, 0);  // for the item -> seq search
  int64_t num_partials = 0;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t seq_len = (*batch.seq_lens)[seq];
    const int64_t start = batch.window > 0 ? std::max<int64_t>(seq_len - batch.window, 0) : 0;
    const int64_t first = start / kChunk, count = (seq_len - 1) / kChunk - first + 1;
    work[seq] = {start, seq_len, first, count, item_begin[seq], num_partials};
    item_begin[seq + 1] = item_begin[seq] + parts * count;
    if (count > 1) num_partials += count;
  }
  std::vector<float> partial(num_partials * seq_stride);  // (partials, num_heads, head_dim)
  std::vector<float> stats(num_partials * num_heads * 2);  // (partials, num_heads, 2)
  const int64_t num_items = item_begin[num_seqs];
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, num_items), 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t item = next++; item < num_items; item = next++) {
      const int64_t seq =
          std::upper_bound(item_begin.begin(), item_begin.end(), item) - item_begin.begin() - 1;
      const SeqWork& w = work[seq];
      const int64_t part = (item - w.item_begin) / w.num_chunks;
      const int64_t chunk = (item - w.item_begin) % w.num_chunks;
      const int64_t h0 = part * heads_per_part, c = w.first_chunk + chunk;
      const int64_t lo = std::max(w.start, c * kChunk), hi = std::min(w.seq_len, (c + 1) * kChunk);
      const bool alone = w.num_chunks == 1;
      float* out = alone ? batch.out + seq * seq_stride
                         : partial.data() + (w.partial_begin + chunk) * seq_stride;
      float* st = alone ? nullptr : stats.data() + (w.partial_begin + chunk) * num_heads * 2;
      attend_seq<kVecs, kGroup>(batch.q + seq * seq_stride, cache,
                                batch.table + seq * batch.table_width, hi, lo, h0,
                                h0 + heads_per_part, batch.scale, out, st, scratch);
    }
  });
  if (num_partials > 0) {
    merge_chunks(work, partial.data(), stats.data(), num_heads, head_dim, batch.out);
  }
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

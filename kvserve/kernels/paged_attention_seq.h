// Paged decode attention of one seq's keys in one key range: two passes over its blocks
// (scores, then the probability-weighted sum of V). Included by paged_attention_cpu.cpp only.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "paged_attention_vec.h"

namespace kvserve_attention {

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
// are constants, so the per-head loops unroll into registers. With `stats`, each head's
// largest score and its sum of exp(score - largest) go to stats[2 * head], stats[2 * head + 1]:
// what merging this key range's output with other ranges' needs.
template <int kVecs, int kGroup>
void attend_seq(const float* q, const Cache& c, const int64_t* blocks, int64_t seq_len,
                int64_t start, int64_t h0, int64_t h1, float scale, float* out, float* stats,
                Scratch& scratch) {
  constexpr int64_t kDim = kVecs * kLanes;
  const int64_t row_stride = c.kv_heads * kDim;  // values between consecutive tokens
  const int64_t span = (h1 - h0) * kDim;  // values of a token this call reads (prefetched)
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
        if (kv_head == h0) prefetch_row(c.k + (next + t) * row_stride + h0 * kDim, span);
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
    if (stats) {
      stats[2 * head] = max_score;
      stats[2 * head + 1] = sum;
    }
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
        if (kv_head == h0) prefetch_row(c.v + (next + t) * row_stride + h0 * kDim, span);
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

}  // namespace kvserve_attention

// GGUF block formats decoded to float32: the scalar decoders (every build), the vector
// decoders of the block-32 formats (AVX-512 / AVX2 builds), and one row at a time. Included by
// quant_linear.cpp only.
#pragma once

#include <torch/extension.h>

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

namespace kvserve_quant {

using Vec = at::vec::Vectorized<float>;
constexpr int kLanes = Vec::size();

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

// ---- block-32 formats in registers (AVX-512 / AVX2) -----------------------------------------
//
// Decode::block(b, w) widens one 32-value block into kPerBlock vectors: the same values as the
// scalar decoders above (every product is exact in float32, so FMA or not gives one result).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define KVSERVE_FUSED_BLOCKS 1
constexpr int kPerBlock = 32 / kLanes;  // vectors per 32-value block: 2 or 4

// The f16 at p as a float, by the F16C instruction.
inline float half_f16c(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

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

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512: a 4-bit block's 16 possible values fit one register, so the block decodes as a
// table lookup: the 16 values computed once (one FP operation), then each nibble becomes its
// value by one permute (vpermps reads only the low 4 bits of each index, so neither half needs
// masking). Converting and scaling each of the two vectors instead takes four FP operations,
// and the FP pipes bound the batch-1 loop. Same values: table[i] is computed exactly as
// the per-value formula computes value i.
inline void nibble_lookup(const uint8_t* qs, __m512 table, Vec* w) {
  const __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  w[0] = _mm512_permutexvar_ps(lo, table);                         // low nibbles: values 0-15
  w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(lo, 4), table);  // high: values 16-31
}

inline __m512 iota16() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

struct DecodeQ4_0 {
  static void block(const uint8_t* b, Vec* w) {
    const __m512 d = _mm512_set1_ps(half_f16c(b));
    nibble_lookup(b + 2, _mm512_mul_ps(_mm512_sub_ps(iota16(), _mm512_set1_ps(8.0f)), d), w);
  }
};

struct DecodeQ4_1 {
  static void block(const uint8_t* b, Vec* w) {
    Vec d, m;
    two_halves(b, d, m);
    nibble_lookup(b + 4, _mm512_fmadd_ps(iota16(), d, m), w);
  }
};
#else
struct DecodeQ4_0 {
  static void block(const uint8_t* b, Vec* w) {
    const Vec d = Vec(half_f16c(b)), eight = Vec(8.0f);
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
#endif

struct DecodeQ8_0 {
  static void block(const uint8_t* b, Vec* w) {
    const Vec d = Vec(half_f16c(b));
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
#endif

// One weight row (K values) to float32.
template <void (*Block)(const uint8_t*, float*)>
void row_of(const uint8_t* row, int64_t num_blocks, Layout layout, float* out) {
  for (int64_t i = 0; i < num_blocks; ++i) Block(row + i * layout.bytes, out + i * layout.values);
}

using RowFn = void (*)(const uint8_t*, int64_t, Layout, float*);

void row_f32(const uint8_t* row, int64_t num_blocks, Layout layout, float* out) {
  std::memcpy(out, row, num_blocks * layout.bytes);
}

#if defined(KVSERVE_FUSED_BLOCKS)
// One row of a block-32 format through its vector decoder.
template <class Decode>
void row_vec(const uint8_t* row, int64_t num_blocks, Layout layout, float* out) {
  Vec w[kPerBlock];
  for (int64_t i = 0; i < num_blocks; ++i) {
    Decode::block(row + i * layout.bytes, w);
    for (int j = 0; j < kPerBlock; ++j) w[j].store(out + i * 32 + j * kLanes);
  }
}
#define KVSERVE_ROW(decoder, scalar) row_vec<decoder>
#else
#define KVSERVE_ROW(decoder, scalar) row_of<scalar>
#endif

RowFn row_fn(int64_t type) {
  switch (type) {
    case F32: return row_f32;
    case F16: return row_of<block_f16>;
    case BF16: return row_of<block_bf16>;
    case Q4_0: return KVSERVE_ROW(DecodeQ4_0, block_q4_0);
    case Q4_1: return KVSERVE_ROW(DecodeQ4_1, block_q4_1);
    case Q8_0: return KVSERVE_ROW(DecodeQ8_0, block_q8_0);
    case Q4_K: return row_of<block_q4_k>;
    case Q6_K: return row_of<block_q6_k>;
    default: TORCH_CHECK(false, "quant_linear: unsupported ggml type ", type);
  }
}

}  // namespace kvserve_quant

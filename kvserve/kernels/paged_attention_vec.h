// Paged decode attention, vector helpers: the stored cache type of this build, loads that
// widen it to float32, sums of 16 (AVX-512) or 8 (AVX2) dot products across lanes at once,
// prefetch. Included by paged_attention_cpu.cpp only (one build per cache type and ISA).
#pragma once

#include <torch/extension.h>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace kvserve_attention {

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

}  // namespace kvserve_attention

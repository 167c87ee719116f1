// What the bfloat16 CPU kernels share: the target attribute that lets a function use AVX512-BF16
// in a library compiled for any x86-64 CPU, the CPU probe their operators check before running it,
// and the moves between bfloat16 and float32 vectors.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <string>

#define PACAVIT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace pacavit {

// ATEN_CPU_CAPABILITY=avx2 (or default) keeps ATen's own kernels below AVX-512; it keeps these off as
// well, so that a CPU without AVX512-BF16 can be emulated, and the refusals tested, on any host
inline bool limited_below_avx512() {
  const char* limit = std::getenv("ATEN_CPU_CAPABILITY");
  if (limit == nullptr) return false;
  std::string value(limit);
  std::transform(value.begin(), value.end(), value.begin(), [](unsigned char c) { return std::tolower(c); });
  return value == "default" || value == "avx2";
}

inline bool cpu_has_avx512_bf16() {
  if (limited_below_avx512()) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// A 512-bit load holds 32 bfloat16 channels.  Widening them in place to float32 (a bfloat16 is the top
// half of a float32: exact) gives the even channels and the odd channels as two vectors; the kernels
// compute in that split order, with weights rearranged to match (split_channel_pairs), and interleave
// the channels again as they round the results to bfloat16.
constexpr int kChannelBlock = 32;

PACAVIT_AVX512_BF16 inline __m512 even_channels(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }

PACAVIT_AVX512_BF16 inline __m512 odd_channels(__m512i v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// 32 bfloat16 channels (rounded to nearest even) from their even and odd float32 halves
PACAVIT_AVX512_BF16 inline __m512i join_channels(__m512 even, __m512 odd) {
  // after the packing, word i < 16 is channel 2i and word 16 + i is channel 2i + 1
  alignas(64) static constexpr uint16_t kOrder[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
  return _mm512_permutexvar_epi16(_mm512_load_si512(kOrder), packed);
}

// values[c * inner + i] (C x inner floats, C a multiple of 32) in the split order: block, inner, even 16, odd 16
template <typename Out>
void split_channel_pairs(const float* values, int64_t C, int64_t inner, Out* out) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < inner; ++i) {
      const int64_t block = c / kChannelBlock, lane = c % kChannelBlock;
      out[(block * inner + i) * kChannelBlock + (lane % 2) * 16 + lane / 2] = values[c * inner + i];
    }
}

}  // namespace pacavit

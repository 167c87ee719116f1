// What the project's CPU kernels share: the target attributes that let a function use AVX-512
// (AVX512-BF16) or AVX2 in a library compiled for any x86-64 CPU, the CPU probes their operators check
// before running it, the GELU and its derivative on float32 vectors, and the moves between bfloat16 and
// float32 vectors.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <string>

#define PACAVIT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define PACAVIT_AVX512 __attribute__((target("avx512f")))
#define PACAVIT_AVX2 __attribute__((target("avx2,fma")))

namespace pacavit {

// ATEN_CPU_CAPABILITY=avx2 (or default) keeps ATen's own kernels below AVX-512; it keeps these off as
// well, so that a CPU without AVX512-BF16 can be emulated, and the refusals tested, on any host
inline std::string aten_capability_limit() {
  const char* limit = std::getenv("ATEN_CPU_CAPABILITY");
  std::string value(limit == nullptr ? "" : limit);
  std::transform(value.begin(), value.end(), value.begin(), [](unsigned char c) { return std::tolower(c); });
  return value;
}

inline bool limited_below_avx512() {
  const std::string limit = aten_capability_limit();
  return limit == "default" || limit == "avx2";
}

// The instruction set of the float32 kernels on this CPU: AVX-512 where it has AVX512F, else AVX2 with FMA,
// else none (they refuse); ATEN_CPU_CAPABILITY=avx2 chooses AVX2 and =default none, as for ATen's kernels
enum class Float32Isa { kNone, kAvx2, kAvx512 };

inline Float32Isa float32_isa() {
  __builtin_cpu_init();
  const bool avx2 = aten_capability_limit() != "default" && __builtin_cpu_supports("avx2") &&
                    __builtin_cpu_supports("fma");
  if (avx2 && !limited_below_avx512() && __builtin_cpu_supports("avx512f")) return Float32Isa::kAvx512;
  return avx2 ? Float32Isa::kAvx2 : Float32Isa::kNone;
}

inline std::string float32_instruction_set() {
  switch (float32_isa()) {
    case Float32Isa::kAvx512: return "avx512";
    case Float32Isa::kAvx2: return "avx2";
    default: return "";
  }
}

inline bool cpu_has_avx512_bf16() {
  if (limited_below_avx512()) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// Phi(x) - 1/2 = x P(x^2) / Q(x^2) for |x| <= 5.75 (x clamped there), fitted to the normal CDF by
// tools/fit_gelu.py (max error 4.6e-8, 2.2e-7 evaluated in float32).  Beyond, Phi is 1 (or 0) to
// float32's precision.  P's and Q's coefficients, highest power first:
constexpr float kCdfNumerator[] = {1.0350219e-10f, -2.2561190e-08f, 3.7782211e-06f, 2.1836060e-04f,
                                   4.8158630e-03f, 4.0508166e-02f,  3.9894199e-01f};
constexpr float kCdfDenominator[] = {7.8417594e-05f, 2.1083667e-03f, 3.1780001e-02f, 2.6820099e-01f, 1.f};
constexpr float kGeluLimit = 5.75f;
// e^r's Taylor series to r^7, highest power first
constexpr float kExpTaylor[] = {1.f / 5040.f, 1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f};
constexpr float kLog2e = 1.44269504f, kLn2High = 0.693145752f, kLn2Low = 1.42860677e-6f;  // ln 2 in two parts

PACAVIT_AVX512 inline __m512 centred_normal_cdf(__m512 xc) {
  const __m512 u = _mm512_mul_ps(xc, xc);
  __m512 p = _mm512_set1_ps(kCdfNumerator[0]), q = _mm512_set1_ps(kCdfDenominator[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(kCdfNumerator[i]));
#pragma GCC unroll 8
  for (int i = 1; i < 5; ++i) q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(kCdfDenominator[i]));
  __m512 r = _mm512_rcp14_ps(q);  // Q >= 1; one Newton step takes 14 bits to 28
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(_mm512_mul_ps(xc, p), r);
}

PACAVIT_AVX512 inline __m512 clamp_to_gelu_limit(__m512 x) {
  return _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-kGeluLimit)), _mm512_set1_ps(kGeluLimit));
}

// the exact GELU, x Phi(x); below -5.75 the result is 0 (exactly: |x Phi(x)| < 3e-8 there, where the
// fit's error times |x| would grow with x)
PACAVIT_AVX512 inline __m512 gelu(__m512 x) {
  const __m512 centred = centred_normal_cdf(clamp_to_gelu_limit(x));
  const __m512 y = _mm512_fmadd_ps(x, centred, _mm512_mul_ps(x, _mm512_set1_ps(0.5f)));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-kGeluLimit), _CMP_GE_OQ), y);
}

// e^x for -87 < x <= 0: 2^n e^r with |r| <= ln(2) / 2 and e^r from its Taylor series to r^7 (relative
// error below 1e-7 before float32's rounding)
PACAVIT_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);  // exact to float32
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  __m512 p = _mm512_set1_ps(kExpTaylor[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpTaylor[i]));
  return _mm512_scalef_ps(p, n);
}

// d/dx x Phi(x) = Phi(x) + x phi(x), with phi the normal density; 0 below -5.75 (where the GELU is),
// and Phi's fit clamped at 5.75 above
PACAVIT_AVX512 inline __m512 gelu_derivative(__m512 x) {
  const __m512 xc = clamp_to_gelu_limit(x);
  const __m512 density = _mm512_mul_ps(exp_nonpositive(_mm512_mul_ps(_mm512_mul_ps(xc, xc), _mm512_set1_ps(-0.5f))),
                                       _mm512_set1_ps(0.398942280f));  // 1 / sqrt(2 pi)
  const __m512 d = _mm512_fmadd_ps(xc, density, _mm512_add_ps(centred_normal_cdf(xc), _mm512_set1_ps(0.5f)));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-kGeluLimit), _CMP_GE_OQ), d);
}

// The same four on 8 floats for CPUs with AVX2 and FMA only (AMD Zen 3, older Intel): the same fits,
// with a division for AVX-512's reciprocal and the power of two built from its exponent bits
PACAVIT_AVX2 inline __m256 centred_normal_cdf(__m256 xc) {
  const __m256 u = _mm256_mul_ps(xc, xc);
  __m256 p = _mm256_set1_ps(kCdfNumerator[0]), q = _mm256_set1_ps(kCdfDenominator[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(kCdfNumerator[i]));
#pragma GCC unroll 8
  for (int i = 1; i < 5; ++i) q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(kCdfDenominator[i]));
  return _mm256_div_ps(_mm256_mul_ps(xc, p), q);
}

PACAVIT_AVX2 inline __m256 clamp_to_gelu_limit(__m256 x) {
  return _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-kGeluLimit)), _mm256_set1_ps(kGeluLimit));
}

PACAVIT_AVX2 inline __m256 gelu(__m256 x) {
  const __m256 centred = centred_normal_cdf(clamp_to_gelu_limit(x));
  const __m256 y = _mm256_fmadd_ps(x, centred, _mm256_mul_ps(x, _mm256_set1_ps(0.5f)));
  return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-kGeluLimit), _CMP_GE_OQ), y);
}

PACAVIT_AVX2 inline __m256 exp_nonpositive(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  __m256 p = _mm256_set1_ps(kExpTaylor[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[i]));
  // 2^n: n >= -126 for x > -87, a normal float32 whose exponent field is n + 127
  const __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_to_n));
}

PACAVIT_AVX2 inline __m256 gelu_derivative(__m256 x) {
  const __m256 xc = clamp_to_gelu_limit(x);
  const __m256 density = _mm256_mul_ps(exp_nonpositive(_mm256_mul_ps(_mm256_mul_ps(xc, xc), _mm256_set1_ps(-0.5f))),
                                       _mm256_set1_ps(0.398942280f));
  const __m256 d = _mm256_fmadd_ps(xc, density, _mm256_add_ps(centred_normal_cdf(xc), _mm256_set1_ps(0.5f)));
  return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-kGeluLimit), _CMP_GE_OQ), d);
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

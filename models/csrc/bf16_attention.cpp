// Patch-to-cluster attention in bfloat16 for CPUs with AVX512-BF16, as one pass per block of queries:
// softmax(q k^T * scale) v, for q (B, heads, N, D) and k, v (B, heads, M, D).
//
// PyTorch runs it as two batched matmuls around a softmax: bfloat16 scores written out and read back
// three times, and head views of q copied to be contiguous.  Here each thread takes blocks of queries
// of one head, keeps their scores in float32 in the L1 cache, and writes the output rows straight into
// a (B, N, heads, D) buffer, which the block's output projection reads without a copy.  Both products
// use VDPBF16PS (pairs of bfloat16 products summed into float32); the keys and values of a head are
// first packed into the pair-interleaved layout that instruction reads.
//
// The file is compiled for any x86-64 CPU: only the functions marked PACAVIT_AVX512_BF16 use the
// instructions, and the operator refuses to run them on a CPU that lacks them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

namespace {

constexpr int kLanes = 16;        // float32 lanes of a 512-bit register
constexpr int kRows = 4;          // queries per register tile
constexpr int kKeyVectors = 4;    // 16-key vectors per score tile: kRows x 4 accumulators
constexpr int kValueVectors = 4;  // 16-channel vectors per output tile
constexpr int64_t kQueryBlock = 64;  // queries per parallel task

int round_up(int64_t n, int to) { return static_cast<int>((n + to - 1) / to * to); }

uint32_t load_pair(const uint16_t* p) {
  uint32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return pair;
}

// 2^t as 2^n * 2^f with n = round(t), |f| <= 1/2: a degree-5 polynomial in f (relative error
// ~2e-6, far below the bfloat16 rounding of the probabilities); t below -150 gives 0
PACAVIT_AVX512_BF16 inline __m512 exp2_ps(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-151.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3333558e-3f);  // (ln 2)^k / k!, k = 5 .. 0
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// A head's keys and values in VDPBF16PS's layout: keys[p][m] holds channels 2p, 2p+1 of key m;
// values[j][c] holds channel c of keys 2j, 2j+1.  Padding keys and channels are zero.
struct PackedHead {
  std::vector<uint32_t> keys, values;
};

void pack_head(const uint16_t* k, int64_t k_row, const uint16_t* v, int64_t v_row, int64_t M, int64_t D,
               int key_pad, int channel_pad, PackedHead& packed) {
  packed.keys.assign(static_cast<size_t>(D / 2) * key_pad, 0u);
  packed.values.assign(static_cast<size_t>(key_pad / 2) * channel_pad, 0u);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t p = 0; p < D / 2; ++p) packed.keys[p * key_pad + m] = load_pair(k + m * k_row + 2 * p);
  auto* values = reinterpret_cast<uint16_t*>(packed.values.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < D; ++c) values[((m / 2) * channel_pad + c) * 2 + m % 2] = v[m * v_row + c];
}

// scores[r][m] for R query rows and KV key vectors from key vector `first`
template <int R, int KV>
PACAVIT_AVX512_BF16 inline void score_tile(const uint16_t* const* queries, const uint32_t* keys, int pairs,
                                           int key_pad, int first, float* scores) {
  __m512 acc[R][KV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < KV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int p = 0; p < pairs; ++p) {
    __m512bh key[KV];
    for (int j = 0; j < KV; ++j)
      key[j] = (__m512bh)_mm512_loadu_si512(keys + static_cast<size_t>(p) * key_pad + (first + j) * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512bh query = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(queries[r] + 2 * p)));
      for (int j = 0; j < KV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], query, key[j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < KV; ++j) _mm512_storeu_ps(scores + r * key_pad + (first + j) * kLanes, acc[r][j]);
}

template <int R>
PACAVIT_AVX512_BF16 void score_rows(const uint16_t* const* queries, const uint32_t* keys, int pairs, int key_pad,
                                    float* scores) {
  const int vectors = key_pad / kLanes;
  int j = 0;
  for (; j + kKeyVectors <= vectors; j += kKeyVectors)
    score_tile<R, kKeyVectors>(queries, keys, pairs, key_pad, j, scores);
  switch (vectors - j) {
    case 3: score_tile<R, 3>(queries, keys, pairs, key_pad, j, scores); break;
    case 2: score_tile<R, 2>(queries, keys, pairs, key_pad, j, scores); break;
    case 1: score_tile<R, 1>(queries, keys, pairs, key_pad, j, scores); break;
    default: break;
  }
}

// each row's softmax over its M scores (times scale), as bfloat16 pairs of keys; padding keys get 0.
// exp(scale (s - max)) is computed as 2^(s log2(e) scale - max log2(e) scale): one FMA per vector.
PACAVIT_AVX512_BF16 void softmax_rows(int R, float* scores, int64_t M, int key_pad, float scale, uint32_t* probs) {
  const int vectors = key_pad / kLanes;
  const __mmask16 last = static_cast<__mmask16>((1u << (M - (vectors - 1) * kLanes)) - 1);
  const float log2_scale = scale * 1.44269504088896341f;
  for (int r = 0; r < R; ++r) {
    float* s = scores + r * key_pad;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < vectors - 1; ++j) top = _mm512_max_ps(top, _mm512_loadu_ps(s + j * kLanes));
    top = _mm512_mask_max_ps(top, last, top, _mm512_loadu_ps(s + (vectors - 1) * kLanes));
    const __m512 multiplier = _mm512_set1_ps(log2_scale);
    const __m512 offset = _mm512_set1_ps(-_mm512_reduce_max_ps(top) * log2_scale);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < vectors; ++j) {
      __m512 e = exp2_ps(_mm512_fmadd_ps(_mm512_loadu_ps(s + j * kLanes), multiplier, offset));
      if (j == vectors - 1) e = _mm512_maskz_mov_ps(last, e);
      _mm512_storeu_ps(s + j * kLanes, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    auto* row = reinterpret_cast<__m256i*>(probs + r * (key_pad / 2));
    for (int j = 0; j < vectors; ++j)
      _mm256_storeu_si256(row + j,
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(s + j * kLanes), inverse)));
  }
}

// out[r][c] = sum over keys of probs[r][m] values[m][c], for CV 16-channel vectors from vector `first`
template <int R, int CV>
PACAVIT_AVX512_BF16 inline void output_tile(const uint32_t* probs, int key_pairs, const uint32_t* values,
                                            int channel_pad, int first, int64_t D, at::BFloat16* const* out) {
  __m512 acc[R][CV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int j = 0; j < key_pairs; ++j) {
    __m512bh value[CV];
    for (int c = 0; c < CV; ++c)
      value[c] = (__m512bh)_mm512_loadu_si512(values + static_cast<size_t>(j) * channel_pad + (first + c) * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512bh prob = (__m512bh)_mm512_set1_epi32(static_cast<int>(probs[r * key_pairs + j]));
      for (int c = 0; c < CV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], prob, value[c]);
    }
  }
  for (int c = 0; c < CV; ++c) {
    const int64_t channel = (first + c) * kLanes;
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(kLanes, D - channel)) - 1);
    for (int r = 0; r < R; ++r)
      _mm256_mask_storeu_epi16(out[r] + channel, mask, (__m256i)_mm512_cvtneps_pbh(acc[r][c]));
  }
}

template <int R>
PACAVIT_AVX512_BF16 void output_rows(const uint32_t* probs, int key_pairs, const uint32_t* values, int channel_pad,
                                     int64_t D, at::BFloat16* const* out) {
  const int vectors = channel_pad / kLanes;
  int c = 0;
  for (; c + kValueVectors <= vectors; c += kValueVectors)
    output_tile<R, kValueVectors>(probs, key_pairs, values, channel_pad, c, D, out);
  switch (vectors - c) {
    case 3: output_tile<R, 3>(probs, key_pairs, values, channel_pad, c, D, out); break;
    case 2: output_tile<R, 2>(probs, key_pairs, values, channel_pad, c, D, out); break;
    case 1: output_tile<R, 1>(probs, key_pairs, values, channel_pad, c, D, out); break;
    default: break;
  }
}

template <int R>
PACAVIT_AVX512_BF16 void attend_rows(const uint16_t* const* queries, const PackedHead& head, int pairs, int64_t M,
                                     int key_pad, int channel_pad, int64_t D, float scale, float* scores,
                                     uint32_t* probs, at::BFloat16* const* out) {
  score_rows<R>(queries, head.keys.data(), pairs, key_pad, scores);
  softmax_rows(R, scores, M, key_pad, scale, probs);
  output_rows<R>(probs, key_pad / 2, head.values.data(), channel_pad, D, out);
}

PACAVIT_AVX512_BF16 void attend_avx512_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2);
  const int key_pad = round_up(M, kLanes), channel_pad = round_up(D, kLanes), pairs = static_cast<int>(D / 2);
  const auto* qd = reinterpret_cast<const uint16_t*>(q.const_data_ptr<at::BFloat16>());
  const auto* kd = reinterpret_cast<const uint16_t*>(k.const_data_ptr<at::BFloat16>());
  const auto* vd = reinterpret_cast<const uint16_t*>(v.const_data_ptr<at::BFloat16>());
  auto* od = out.mutable_data_ptr<at::BFloat16>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides(), os = out.strides();

  std::vector<PackedHead> heads(B * H);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      pack_head(kd + b * ks[0] + h * ks[1], ks[2], vd + b * vs[0] + h * vs[1], vs[2], M, D, key_pad, channel_pad,
                heads[bh]);
    }
  });

  const int64_t blocks = (N + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(kRows) * key_pad);
    std::vector<uint32_t> probs(static_cast<size_t>(kRows) * key_pad / 2);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, b = bh / H, h = bh % H;
      const int64_t block_end = std::min(N, (task % blocks + 1) * kQueryBlock);
      for (int64_t n = (task % blocks) * kQueryBlock; n < block_end; n += kRows) {
        const int R = static_cast<int>(std::min<int64_t>(kRows, block_end - n));
        const uint16_t* queries[kRows];
        at::BFloat16* rows[kRows];
        for (int r = 0; r < R; ++r) {
          queries[r] = qd + b * qs[0] + h * qs[1] + (n + r) * qs[2];
          rows[r] = od + b * os[0] + h * os[1] + (n + r) * os[2];
        }
        const auto run = [&](auto rows_constant) {
          attend_rows<decltype(rows_constant)::value>(queries, heads[bh], pairs, M, key_pad, channel_pad, D, scale,
                                                      scores.data(), probs.data(), rows);
        };
        switch (R) {
          case 4: run(std::integral_constant<int, 4>()); break;
          case 3: run(std::integral_constant<int, 3>()); break;
          case 2: run(std::integral_constant<int, 2>()); break;
          default: run(std::integral_constant<int, 1>()); break;
        }
      }
    }
  });
}

at::Tensor attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->dim() == 4,
                "pacavit::attention_bf16 takes 4-d bfloat16 CPU tensors (batch, heads, tokens, channels)");
    TORCH_CHECK(t->stride(3) == 1, "pacavit::attention_bf16 needs each token's channels contiguous");
  }
  TORCH_CHECK(q.size(3) % 2 == 0, "pacavit::attention_bf16 needs an even number of channels per head");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "pacavit::attention_bf16: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not match");
  TORCH_CHECK(k.size(2) > 0, "pacavit::attention_bf16 needs at least one key");
  TORCH_CHECK(pacavit::cpu_has_avx512_bf16(), "pacavit::attention_bf16 needs a CPU with AVX512-BF16 (this one ",
              "has none, or ATEN_CPU_CAPABILITY limits it to AVX2)");
  // (B, N, heads, D) memory, so that the caller's transpose back to tokens is free
  auto out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
  if (q.numel() > 0) attend_avx512_bf16(q, k, v, static_cast<float>(scale), out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pacavit, CPU, m) { m.impl("attention_bf16", &attention_bf16); }

// Depthwise convolution in bfloat16 for CPUs with AVX512-BF16: act(conv(x) + bias [+ x]) in one pass,
// for a channels_last (B, C, H, W) input, a K x K kernel (K = 3, 5, 7) with stride 1 and "same" zero
// padding, optionally its identity shortcut and a GELU.
//
// oneDNN's kernel spends much of its time on the GELU's erf.  Here each thread takes output rows.  For
// 32 channels at a time it computes a tile of T adjacent output pixels: per kernel row, the row's
// weights stay in registers and each input pixel of the tile's window is read and widened once, then
// added into every output of the tile it reaches.  Sums, shortcut and GELU are float32; the GELU's normal CDF comes
// from a rational function (error 2.2e-7, no exp, no division: one reciprocal and a Newton step).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu_kernels.h"

namespace {

using pacavit::even_channels;
using pacavit::gelu;
using pacavit::join_channels;
using pacavit::kChannelBlock;
using pacavit::odd_channels;

template <bool Gelu>
PACAVIT_AVX512_BF16 inline void store(uint16_t* out, __m512 even, __m512 odd) {
  if (Gelu) {
    even = gelu(even);
    odd = gelu(odd);
  }
  _mm512_storeu_si512(out, join_channels(even, odd));
}

// T adjacent output pixels whose K x K windows lie inside the image's columns; `in` points at the input
// pixel under the first output's top-left tap, `weights` at the block's [kh][kw][even | odd] floats
template <int K, int T, bool Gelu>
PACAVIT_AVX512_BF16 inline void output_tile(const uint16_t* in, int64_t row_stride, int64_t C, int kh0, int kh1,
                                            const float* weights, __m512 bias_even, __m512 bias_odd, uint16_t* out) {
  __m512 even[T], odd[T];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    even[t] = bias_even;
    odd[t] = bias_odd;
  }
  for (int kh = kh0; kh < kh1; ++kh) {
    const uint16_t* row = in + kh * row_stride;
    __m512 w_even[K], w_odd[K];
#pragma GCC unroll 16
    for (int kw = 0; kw < K; ++kw) {
      w_even[kw] = _mm512_loadu_ps(weights + (kh * K + kw) * kChannelBlock);
      w_odd[kw] = _mm512_loadu_ps(weights + (kh * K + kw) * kChannelBlock + 16);
    }
#pragma GCC unroll 32
    for (int j = 0; j < T + K - 1; ++j) {  // input column j reaches outputs j - K + 1 .. j
      const __m512i v = _mm512_loadu_si512(row + j * C);
      const __m512 x_even = even_channels(v), x_odd = odd_channels(v);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        if (j - t >= 0 && j - t < K) {
          even[t] = _mm512_fmadd_ps(x_even, w_even[j - t], even[t]);
          odd[t] = _mm512_fmadd_ps(x_odd, w_odd[j - t], odd[t]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) store<Gelu>(out + t * C, even[t], odd[t]);
}

// one output pixel whose window reaches over the left or right border: taps kw0 .. kw1 - 1 only
template <int K, bool Gelu>
PACAVIT_AVX512_BF16 void border_pixel(const uint16_t* in, int64_t row_stride, int64_t C, int kh0, int kh1, int kw0,
                                      int kw1, const float* weights, __m512 bias_even, __m512 bias_odd, uint16_t* out) {
  __m512 even = bias_even, odd = bias_odd;
  for (int kh = kh0; kh < kh1; ++kh)
    for (int kw = kw0; kw < kw1; ++kw) {
      const __m512i v = _mm512_loadu_si512(in + kh * row_stride + kw * C);
      even = _mm512_fmadd_ps(even_channels(v), _mm512_loadu_ps(weights + (kh * K + kw) * kChannelBlock), even);
      odd = _mm512_fmadd_ps(odd_channels(v), _mm512_loadu_ps(weights + (kh * K + kw) * kChannelBlock + 16), odd);
    }
  store<Gelu>(out, even, odd);
}

template <int K, bool Gelu>
PACAVIT_AVX512_BF16 void output_row(const uint16_t* x, int64_t b, int64_t h, int64_t H, int64_t W, int64_t C,
                                    const float* weights, const float* bias, uint16_t* y) {
  constexpr int P = K / 2;
  constexpr int T = K == 3 ? 8 : 4;  // as many outputs as leave registers for a kernel row's weights
  const int kh0 = static_cast<int>(std::max<int64_t>(0, P - h));
  const int kh1 = static_cast<int>(std::min<int64_t>(K, H + P - h));
  const int64_t row_stride = W * C;
  for (int64_t c = 0; c < C; c += kChannelBlock) {
    const float* block_weights = weights + c * K * K;
    const __m512 bias_even = _mm512_loadu_ps(bias + c), bias_odd = _mm512_loadu_ps(bias + c + 16);
    // the input pixel under output column 0's top-left tap (row h - P, column -P: outside for the borders)
    const uint16_t* in = x + ((b * H + h - P) * W - P) * C + c;
    uint16_t* out = y + (b * H + h) * W * C + c;
    const auto border = [&](int64_t col) {
      border_pixel<K, Gelu>(in + col * C, row_stride, C, kh0, kh1, static_cast<int>(std::max<int64_t>(0, P - col)),
                            static_cast<int>(std::min<int64_t>(K, W + P - col)), block_weights, bias_even, bias_odd,
                            out + col * C);
    };
    int64_t col = 0;
    for (; col < std::min<int64_t>(P, W); ++col) border(col);
    for (; col + T <= W - P; col += T)
      output_tile<K, T, Gelu>(in + col * C, row_stride, C, kh0, kh1, block_weights, bias_even, bias_odd, out + col * C);
    for (; col < W - P; ++col)
      output_tile<K, 1, Gelu>(in + col * C, row_stride, C, kh0, kh1, block_weights, bias_even, bias_odd, out + col * C);
    for (; col < W; ++col) border(col);
  }
}

template <int K, bool Gelu>
void convolve(const uint16_t* x, int64_t B, int64_t H, int64_t W, int64_t C, const float* weights, const float* bias,
              uint16_t* y) {
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) output_row<K, Gelu>(x, bh / H, bh % H, H, W, C, weights, bias, y);
  });
}

template <int K>
void convolve(bool gelu, const uint16_t* x, int64_t B, int64_t H, int64_t W, int64_t C, const float* weights,
              const float* bias, uint16_t* y) {
  if (gelu)
    convolve<K, true>(x, B, H, W, C, weights, bias, y);
  else
    convolve<K, false>(x, B, H, W, C, weights, bias, y);
}

at::Tensor depthwise_conv_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               bool residual, bool gelu) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 4,
              "pacavit::depthwise_conv_bf16 takes a 4-d bfloat16 CPU tensor (batch, channels, height, width)");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "pacavit::depthwise_conv_bf16 needs a channels_last input (each pixel's channels contiguous)");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = weight.dim() == 4 ? weight.size(3) : 0;
  TORCH_CHECK(C % kChannelBlock == 0, "pacavit::depthwise_conv_bf16 needs a multiple of 32 channels, got ", C);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == K &&
                  (K == 3 || K == 5 || K == 7) && weight.is_floating_point(),
              "pacavit::depthwise_conv_bf16 takes a (", C, ", 1, K, K) float weight with K = 3, 5 or 7, got ",
              weight.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == C && bias->is_floating_point()),
              "pacavit::depthwise_conv_bf16 takes a bias of ", C, " floats");
  TORCH_CHECK(pacavit::cpu_has_avx512_bf16(), "pacavit::depthwise_conv_bf16 needs a CPU with AVX512-BF16 (this one ",
              "has none, or ATEN_CPU_CAPABILITY limits it to AVX2)");

  // the weights in float32 (the shortcut as 1 added at the centre tap, exactly), in the kernel's order
  at::Tensor taps = weight.to(at::kFloat).reshape({C, K * K}).clone();
  if (residual) taps.select(1, K * K / 2).add_(1.f);
  std::vector<float> weights(C * K * K), biases(C, 0.f);
  pacavit::split_channel_pairs(taps.const_data_ptr<float>(), C, K * K, weights.data());
  if (bias.has_value())
    pacavit::split_channel_pairs(bias->to(at::kFloat).contiguous().const_data_ptr<float>(), C, 1, biases.data());

  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  const auto* in = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  auto* out = reinterpret_cast<uint16_t*>(y.mutable_data_ptr<at::BFloat16>());
  switch (K) {
    case 3: convolve<3>(gelu, in, B, H, W, C, weights.data(), biases.data(), out); break;
    case 5: convolve<5>(gelu, in, B, H, W, C, weights.data(), biases.data(), out); break;
    default: convolve<7>(gelu, in, B, H, W, C, weights.data(), biases.data(), out); break;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pacavit, CPU, m) { m.impl("depthwise_conv_bf16", &depthwise_conv_bf16); }

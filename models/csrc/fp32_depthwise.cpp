// Depthwise convolution in float32 for training on CPUs with AVX-512: act(conv(x) + bias [+ x]) and its
// gradients, for a channels_last (B, C, H, W) input, a K x K kernel (K = 3, 5, 7) with stride 1 and "same"
// zero padding, optionally its identity shortcut and the exact GELU.
//
// PyTorch runs the conv, the shortcut's add and the GELU as separate passes over the (large) activation,
// forward and backward, and keeps the GELU's input for the backward.  Here the forward is one pass (x in, y
// out) and keeps nothing but x; the backward is one pass too (dy and x in, dx out): it recomputes the GELU's
// input s from x row by row, forms g = dy * GELU'(s) with the weight and bias gradients, and keeps g's last
// K rows in the cache, from which dx (the conv of g with the kernel turned by 180 degrees) is computed.  16
// channels make one vector; each thread takes rows of pixels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu_kernels.h"

namespace {

constexpr int kLanes = 16;

struct Window {  // the taps of a K x K window that fall inside the image, per pixel
  int kh0, kh1, kw0, kw1;
};

inline Window window(int K, int64_t h, int64_t w, int64_t H, int64_t W) {
  const int64_t P = K / 2;
  return {static_cast<int>(std::max<int64_t>(0, P - h)), static_cast<int>(std::min<int64_t>(K, H + P - h)),
          static_cast<int>(std::max<int64_t>(0, P - w)), static_cast<int>(std::min<int64_t>(K, W + P - w))};
}

// the K rows under a window centred on row h: row[kh] is row h - P + kh (not read where outside the image)
template <int K>
struct Rows {
  const float* row[K];
};

template <int K>
inline Rows<K> image_rows(const float* image, int64_t h, int64_t row_floats) {
  Rows<K> rows;
  for (int kh = 0; kh < K; ++kh) rows.row[kh] = image + (h - K / 2 + kh) * row_floats;
  return rows;
}

// sum + the sum over the window's taps of weight * input, for channels c .. c + 15 of pixel (h, w);
// `weights` is [C / 16][K * K][16] floats
template <int K>
PACAVIT_AVX512 inline __m512 convolve_at(const Rows<K>& rows, int64_t h, int64_t w, int64_t H, int64_t W, int64_t C,
                                         int64_t c, const float* weights, __m512 sum) {
  constexpr int P = K / 2;
  const float* block_weights = weights + c * K * K;
  const int64_t column = (w - P) * C + c;  // the window's left column within a row
  if (h >= P && h < H - P && w >= P && w < W - P) {  // the interior: a loop the compiler unrolls
#pragma GCC unroll 49
    for (int tap = 0; tap < K * K; ++tap)
      sum = _mm512_fmadd_ps(_mm512_loadu_ps(rows.row[tap / K] + column + (tap % K) * C),
                            _mm512_loadu_ps(block_weights + tap * kLanes), sum);
    return sum;
  }
  const Window win = window(K, h, w, H, W);
  for (int kh = win.kh0; kh < win.kh1; ++kh)
    for (int kw = win.kw0; kw < win.kw1; ++kw)
      sum = _mm512_fmadd_ps(_mm512_loadu_ps(rows.row[kh] + column + kw * C),
                            _mm512_loadu_ps(block_weights + (kh * K + kw) * kLanes), sum);
  return sum;
}

// one output row: act(conv + bias) over the rows `rows`
template <int K, bool Gelu>
PACAVIT_AVX512 void output_row(const Rows<K>& rows, int64_t h, int64_t H, int64_t W, int64_t C, const float* weights,
                               const float* bias, float* out) {
  for (int64_t w = 0; w < W; ++w)
    for (int64_t c = 0; c < C; c += kLanes) {
      const __m512 s = convolve_at<K>(rows, h, w, H, W, C, c, weights, _mm512_loadu_ps(bias + c));
      _mm512_storeu_ps(out + w * C + c, Gelu ? pacavit::gelu(s) : s);
    }
}

template <int K, bool Gelu>
void forward(const float* x, int64_t B, int64_t H, int64_t W, int64_t C, const float* weights, const float* bias,
             float* y) {
  const int64_t row_floats = W * C;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      output_row<K, Gelu>(image_rows<K>(x + b * H * row_floats, h, row_floats), h, H, W, C, weights, bias,
                          y + bh * row_floats);
    }
  });
}

// g = dy * act'(s) for row h (s recomputed from x) into `g`; with `accumulate`, the row's share of the weight
// gradient (g times the input under each tap) and of the bias gradient (g) is added into `weight_grad`
// ([C / 16][K * K][16]) and `bias_grad`
template <int K, bool Gelu>
PACAVIT_AVX512 void gradient_row(const float* dy, const float* x_image, int64_t h, int64_t H, int64_t W, int64_t C,
                                 const float* weights, const float* bias, float* g, bool accumulate,
                                 float* weight_grad, float* bias_grad) {
  constexpr int P = K / 2;
  const Rows<K> rows = image_rows<K>(x_image, h, W * C);
  for (int64_t c = 0; c < C; c += kLanes) {
    float* block_grad = weight_grad + c * K * K;
    __m512 bias_sum = _mm512_setzero_ps();
    for (int64_t w = 0; w < W; ++w) {
      __m512 gs = _mm512_loadu_ps(dy + w * C + c);
      if (Gelu)
        gs = _mm512_mul_ps(gs, pacavit::gelu_derivative(
                                   convolve_at<K>(rows, h, w, H, W, C, c, weights, _mm512_loadu_ps(bias + c))));
      _mm512_storeu_ps(g + w * C + c, gs);
      if (!accumulate) continue;
      bias_sum = _mm512_add_ps(bias_sum, gs);
      const Window win = window(K, h, w, H, W);
      for (int kh = win.kh0; kh < win.kh1; ++kh)
        for (int kw = win.kw0; kw < win.kw1; ++kw) {
          float* tap_grad = block_grad + (kh * K + kw) * kLanes;
          _mm512_storeu_ps(tap_grad, _mm512_fmadd_ps(gs, _mm512_loadu_ps(rows.row[kh] + (w - P + kw) * C + c),
                                                     _mm512_loadu_ps(tap_grad)));
        }
    }
    if (accumulate) _mm512_storeu_ps(bias_grad + c, _mm512_add_ps(bias_sum, _mm512_loadu_ps(bias_grad + c)));
  }
}

// The backward in one sweep down each image: g's rows go into a ring of K rows that stays in the cache, and
// dx's row h (the conv of g with the turned kernel) is written as soon as g's row h + P is there.
template <int K, bool Gelu>
void backward(const float* dy, const float* x, int64_t B, int64_t H, int64_t W, int64_t C, const float* weights,
              const float* bias, const float* turned_weights, float* dx, float* weight_grad, float* bias_grad) {
  constexpr int P = K / 2;
  const int64_t row_floats = W * C, sums = C * (K * K + 1);
  const int threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * sums, 0.f), no_bias(C, 0.f);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    float* own = partial.data() + static_cast<size_t>(at::get_thread_num()) * sums;  // this thread's sums
    std::vector<float> ring(K * row_floats);
    const auto ring_rows = [&](int64_t h) {
      Rows<K> rows;
      for (int kh = 0; kh < K; ++kh) rows.row[kh] = ring.data() + ((h - P + kh + K) % K) * row_floats;
      return rows;
    };
    for (int64_t start = begin; start < end;) {  // the chunk's rows of one image at a time
      const int64_t b = start / H, h_begin = start % H, h_end = std::min(H, h_begin + end - start);
      const float *x_image = x + b * H * row_floats, *dy_image = dy + b * H * row_floats;
      float* dx_image = dx + b * H * row_floats;
      const auto emit = [&](int64_t h) {
        output_row<K, false>(ring_rows(h), h, H, W, C, turned_weights, no_bias.data(), dx_image + h * row_floats);
      };
      // g's rows P above and below the chunk are recomputed here (and their sums left to their own chunk)
      const int64_t lo = std::max<int64_t>(0, h_begin - P), hi = std::min(H, h_end + P);
      for (int64_t r = lo; r < hi; ++r) {
        gradient_row<K, Gelu>(dy_image + r * row_floats, x_image, r, H, W, C, weights, bias,
                              ring.data() + (r % K) * row_floats, r >= h_begin && r < h_end, own, own + C * K * K);
        if (r - P >= h_begin) emit(r - P);
      }
      for (int64_t h = std::max(h_begin, hi - P); h < h_end; ++h) emit(h);  // the image's last rows
      start += h_end - h_begin;
    }
  });
  for (int t = 0; t < threads; ++t)
    for (int64_t i = 0; i < sums; ++i) {
      const float value = partial[static_cast<size_t>(t) * sums + i];
      if (i < C * K * K)
        weight_grad[i] += value;
      else
        bias_grad[i - C * K * K] += value;
    }
}

// weights[c][kh][kw] (+ 1 at the centre tap for the shortcut) as the kernel reads them: [C / 16][K * K][16],
// optionally turned by 180 degrees
std::vector<float> arrange(const at::Tensor& weight, bool residual, bool turned) {
  const int64_t C = weight.size(0), K = weight.size(3);
  at::Tensor taps = weight.detach().to(at::kFloat).reshape({C, K * K}).clone();
  if (residual) taps.select(1, K * K / 2).add_(1.f);
  if (turned) taps = taps.flip(1).contiguous();
  const float* values = taps.const_data_ptr<float>();
  std::vector<float> out(C * K * K);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t tap = 0; tap < K * K; ++tap)
      out[((c / kLanes) * K * K + tap) * kLanes + c % kLanes] = values[c * K * K + tap];
  return out;
}

std::vector<float> bias_values(const std::optional<at::Tensor>& bias, int64_t C) {
  if (!bias.has_value()) return std::vector<float>(C, 0.f);
  at::Tensor values = bias->detach().to(at::kFloat).contiguous();
  return std::vector<float>(values.const_data_ptr<float>(), values.const_data_ptr<float>() + C);
}

int64_t check(const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              op, " takes a 4-d float32 CPU tensor (batch, channels, height, width)");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              op, " needs a channels_last input (each pixel's channels contiguous)");
  const int64_t C = x.size(1), K = weight.dim() == 4 ? weight.size(3) : 0;
  TORCH_CHECK(C % kLanes == 0, op, " needs a multiple of 16 channels, got ", C);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == K &&
                  (K == 3 || K == 5 || K == 7) && weight.scalar_type() == at::kFloat,
              op, " takes a (", C, ", 1, K, K) float32 weight with K = 3, 5 or 7, got ", weight.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == C && bias->scalar_type() == at::kFloat),
              op, " takes a bias of ", C, " float32 values");
  TORCH_CHECK(pacavit::cpu_has_avx512f(), op, " needs a CPU with AVX-512 (this one has none, or ATEN_CPU_CAPABILITY ",
              "limits it to AVX2)");
  return K;
}

template <int K>
void run_forward(bool gelu, const float* x, int64_t B, int64_t H, int64_t W, int64_t C, const float* weights,
             const float* bias, float* y) {
  if (gelu)
    forward<K, true>(x, B, H, W, C, weights, bias, y);
  else
    forward<K, false>(x, B, H, W, C, weights, bias, y);
}

at::Tensor depthwise_conv_fp32(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               bool residual, bool gelu) {
  const int64_t K = check("pacavit::depthwise_conv_fp32", x, weight, bias);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const std::vector<float> weights = arrange(weight, residual, false), biases = bias_values(bias, C);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  const float* in = x.const_data_ptr<float>();
  float* out = y.mutable_data_ptr<float>();
  switch (K) {
    case 3: run_forward<3>(gelu, in, B, H, W, C, weights.data(), biases.data(), out); break;
    case 5: run_forward<5>(gelu, in, B, H, W, C, weights.data(), biases.data(), out); break;
    default: run_forward<7>(gelu, in, B, H, W, C, weights.data(), biases.data(), out); break;
  }
  return y;
}

template <int K>
void run_backward(bool gelu, const float* dy, const float* x, int64_t B, int64_t H, int64_t W, int64_t C,
                  const float* weights, const float* bias, const float* turned, float* dx, float* weight_grad,
                  float* bias_grad) {
  if (gelu)
    backward<K, true>(dy, x, B, H, W, C, weights, bias, turned, dx, weight_grad, bias_grad);
  else
    backward<K, false>(dy, x, B, H, W, C, weights, bias, turned, dx, weight_grad, bias_grad);
}

// (dx, dweight, dbias) of y = act(conv(x) + bias [+ x]) given dy
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv_fp32_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    bool residual, bool gelu) {
  const int64_t K = check("pacavit::depthwise_conv_fp32_backward", x, weight, bias);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == at::kFloat,
              "pacavit::depthwise_conv_fp32_backward takes a float32 gradient of the input's shape");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const at::Tensor dy = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  const std::vector<float> weights = arrange(weight, residual, false), turned = arrange(weight, residual, true);
  const std::vector<float> biases = bias_values(bias, C);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  std::vector<float> weight_grad(C * K * K, 0.f), bias_grad(C, 0.f);
  if (x.numel() > 0) {
    const float *in = x.const_data_ptr<float>(), *d = dy.const_data_ptr<float>();
    float* dxp = dx.mutable_data_ptr<float>();
    switch (K) {
      case 3: run_backward<3>(gelu, d, in, B, H, W, C, weights.data(), biases.data(), turned.data(), dxp,
                          weight_grad.data(), bias_grad.data()); break;
      case 5: run_backward<5>(gelu, d, in, B, H, W, C, weights.data(), biases.data(), turned.data(), dxp,
                          weight_grad.data(), bias_grad.data()); break;
      default: run_backward<7>(gelu, d, in, B, H, W, C, weights.data(), biases.data(), turned.data(), dxp,
                           weight_grad.data(), bias_grad.data()); break;
    }
  }
  // back from the kernel's order to (C, 1, K, K)
  at::Tensor dweight = at::empty({C, 1, K, K}, x.options().memory_format(at::MemoryFormat::Contiguous));
  float* dw = dweight.mutable_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t tap = 0; tap < K * K; ++tap)
      dw[c * K * K + tap] = weight_grad[((c / kLanes) * K * K + tap) * kLanes + c % kLanes];
  at::Tensor dbias = at::from_blob(bias_grad.data(), {C}, x.options()).clone();
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pacavit, CPU, m) {
  m.impl("depthwise_conv_fp32", &depthwise_conv_fp32);
  m.impl("depthwise_conv_fp32_backward", &depthwise_conv_fp32_backward);
}

// Depthwise convolution in float32 for training on CPUs with AVX-512 or AVX2: act(conv(x) + bias [+ x]) and its
// gradients, for a channels_last (B, C, H, W) input, a K x K kernel (K = 3, 5, 7) with stride 1 and "same"
// zero padding, optionally its identity shortcut and the exact GELU.
//
// PyTorch runs the conv, the shortcut's add and the GELU as separate passes over the (large) activation,
// forward and backward, and keeps the GELU's input for the backward.  Here the forward is one pass (x in, y
// out) and keeps nothing but x; the backward is one pass too (dy and x in, dx out): it recomputes the GELU's
// input s from x row by row, forms g = dy * GELU'(s) with the weight and bias gradients, and keeps g's last
// K rows in the cache, from which dx (the conv of g with the kernel turned by 180 degrees) is computed.  16
// channels make one vector; each thread takes rows of pixels.  The loops (fp32_depthwise_loops.inc) are
// compiled once with AVX-512 and once with AVX2 + FMA, and the operators choose at run time
// (pacavit::float32_isa).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "cpu_kernels.h"

namespace {

constexpr int kLanes = 16;  // channels per vector

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

namespace avx512 {
#define PACAVIT_TARGET PACAVIT_AVX512
using Vec = __m512;
PACAVIT_TARGET inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
PACAVIT_TARGET inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
PACAVIT_TARGET inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
PACAVIT_TARGET inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
PACAVIT_TARGET inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
PACAVIT_TARGET inline Vec zero() { return _mm512_setzero_ps(); }
PACAVIT_TARGET inline Vec gelu(Vec s) { return pacavit::gelu(s); }
PACAVIT_TARGET inline Vec gelu_derivative(Vec s) { return pacavit::gelu_derivative(s); }
#include "fp32_depthwise_loops.inc"
#undef PACAVIT_TARGET
}  // namespace avx512

namespace avx2 {
#define PACAVIT_TARGET PACAVIT_AVX2
struct Vec {
  __m256 low, high;  // channels c .. c + 7, c + 8 .. c + 15
};
PACAVIT_TARGET inline Vec load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
PACAVIT_TARGET inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v.low), _mm256_storeu_ps(p + 8, v.high); }
PACAVIT_TARGET inline Vec fmadd(Vec a, Vec b, Vec c) {
  return {_mm256_fmadd_ps(a.low, b.low, c.low), _mm256_fmadd_ps(a.high, b.high, c.high)};
}
PACAVIT_TARGET inline Vec add(Vec a, Vec b) { return {_mm256_add_ps(a.low, b.low), _mm256_add_ps(a.high, b.high)}; }
PACAVIT_TARGET inline Vec mul(Vec a, Vec b) { return {_mm256_mul_ps(a.low, b.low), _mm256_mul_ps(a.high, b.high)}; }
PACAVIT_TARGET inline Vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
PACAVIT_TARGET inline Vec gelu(Vec s) { return {pacavit::gelu(s.low), pacavit::gelu(s.high)}; }
PACAVIT_TARGET inline Vec gelu_derivative(Vec s) {
  return {pacavit::gelu_derivative(s.low), pacavit::gelu_derivative(s.high)};
}
#include "fp32_depthwise_loops.inc"
#undef PACAVIT_TARGET
}  // namespace avx2

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

// the kernel size, after checking the inputs and that this CPU runs the kernel
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
  TORCH_CHECK(pacavit::float32_isa() != pacavit::Float32Isa::kNone, op, " needs a CPU with AVX-512 or AVX2 and FMA ",
              "(this one has neither, or ATEN_CPU_CAPABILITY=default keeps it below)");
  return K;
}

using ForwardLoops = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*, float*);
using BackwardLoops = void (*)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, const float*,
                               const float*, const float*, float*, float*, float*);

// forward<K, Gelu> and backward<K, Gelu> in this CPU's instruction set
template <int K, bool Gelu>
std::pair<ForwardLoops, BackwardLoops> loops_for() {
  if (pacavit::float32_isa() == pacavit::Float32Isa::kAvx512)
    return {&avx512::forward<K, Gelu>, &avx512::backward<K, Gelu>};
  return {&avx2::forward<K, Gelu>, &avx2::backward<K, Gelu>};
}

std::pair<ForwardLoops, BackwardLoops> loops(int64_t K, bool gelu) {
  if (K == 3) return gelu ? loops_for<3, true>() : loops_for<3, false>();
  if (K == 5) return gelu ? loops_for<5, true>() : loops_for<5, false>();
  return gelu ? loops_for<7, true>() : loops_for<7, false>();
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
  loops(K, gelu).first(in, B, H, W, C, weights.data(), biases.data(), out);
  return y;
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
    loops(K, gelu).second(d, in, B, H, W, C, weights.data(), biases.data(), turned.data(), dxp, weight_grad.data(),
                          bias_grad.data());
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

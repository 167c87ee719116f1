// The operators of the project's bfloat16 CPU kernels, torch.ops.pacavit.*; each kernel file registers
// its CPU implementation.  Every kernel refuses (a RuntimeError) on a CPU without AVX512-BF16.
#include <torch/library.h>

#include "bf16_cpu.h"

TORCH_LIBRARY(pacavit, m) {
  m.def("cpu_has_avx512_bf16() -> bool", &pacavit::cpu_has_avx512_bf16);
  // softmax(q k^T * scale) v per head: bf16_attention.cpp
  m.def("attention_bf16(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  // act(conv(x) + bias [+ x]) for a depthwise K x K conv: bf16_depthwise.cpp
  m.def("depthwise_conv_bf16(Tensor x, Tensor weight, Tensor? bias, bool residual, bool gelu) -> Tensor");
  // LayerNorm over the last dimension: bf16_layer_norm.cpp
  m.def("layer_norm_bf16(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor");
}

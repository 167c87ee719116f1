// The operators of the project's CPU kernels, torch.ops.pacavit.*; each kernel file registers its CPU
// implementation.  Every bfloat16 kernel refuses (a RuntimeError) on a CPU without AVX512-BF16, every
// float32 one on a CPU with neither AVX-512 nor AVX2 and FMA.
#include <torch/library.h>

#include "cpu_kernels.h"

TORCH_LIBRARY(pacavit, m) {
  m.def("cpu_has_avx512_bf16() -> bool", &pacavit::cpu_has_avx512_bf16);
  // "avx512", "avx2" or "" (none): the instruction set the float32 kernels run with here
  m.def("float32_instruction_set() -> str", &pacavit::float32_instruction_set);
  // softmax(q k^T * scale) v per head: bf16_attention.cpp
  m.def("attention_bf16(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  // act(conv(x) + bias [+ x]) for a depthwise K x K conv: bf16_depthwise.cpp
  m.def("depthwise_conv_bf16(Tensor x, Tensor weight, Tensor? bias, bool residual, bool gelu) -> Tensor");
  // the same in float32 with its gradients, for training: fp32_depthwise.cpp
  m.def("depthwise_conv_fp32(Tensor x, Tensor weight, Tensor? bias, bool residual, bool gelu) -> Tensor");
  m.def("depthwise_conv_fp32_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, bool residual, "
        "bool gelu) -> (Tensor, Tensor, Tensor)");
  // LayerNorm over the last dimension: bf16_layer_norm.cpp
  m.def("layer_norm_bf16(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor");
}

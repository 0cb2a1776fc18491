// Shapes and argument checks of the grouped expert ops (contracts: docs/architecture.md):
//   expert_mlp(x[T,H], w_gate_up[E,2I,H], w_down[E,H,I], coeff[T,R,E], activation) -> out[R,T,H]
//   grouped_gemm(x[T,K], w[E,N,K], expert_offsets int32[E+1]) -> [T,N]
#pragma once

#include <cstdint>

namespace jakiro {

// Most routing heads (R) expert_mlp accepts. The CUDA kernels keep one fp32
// accumulator per head and token in registers; Jakiro itself uses R = 2.
constexpr int64_t kMaxRoutingHeads = 8;

}  // namespace jakiro

#ifndef __CUDACC_RTC__
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace jakiro {

// The gate's activation of expert_mlp's gated MLP: silu (SwiGLU: Llama, Qwen, Mistral, Phi-3)
// or the tanh-approximated GELU (GeGLU: Gemma's gelu_pytorch_tanh).
enum class ExpertActivation { kSilu, kGeluTanh };

// Parses expert_mlp's activation argument ("silu" or "gelu_tanh"); anything else is a
// ValueError naming the accepted values.
ExpertActivation check_expert_activation(c10::string_view activation, const char* op);

struct ExpertMlpShape {
  int64_t tokens, hidden, intermediate, experts, heads;  // T, H, I, E, R
};

// Validates ranks, sizes, dtypes and devices (no data access) and returns the sizes.
// x, w_gate_up and w_down share one floating dtype; coeff is float32 or that dtype.
ExpertMlpShape check_expert_mlp_args(const at::Tensor& x, const at::Tensor& w_gate_up,
                                     const at::Tensor& w_down, const at::Tensor& coeff,
                                     const char* op);

struct GroupedGemmShape {
  int64_t rows, k, n, experts;  // T, K, N, E
};

// Validates ranks, sizes, dtypes and devices of grouped_gemm (no data access).
GroupedGemmShape check_grouped_gemm_args(const at::Tensor& x, const at::Tensor& w,
                                         const at::Tensor& expert_offsets, const char* op);

// Reads expert_offsets (a CPU tensor) and raises a ValueError naming the first
// entry that breaks 0 = offsets[0] <= offsets[1] <= ... <= offsets[E] = rows.
void check_expert_offsets_values(const at::Tensor& offsets_cpu, int64_t rows, const char* op);

}  // namespace jakiro
#endif

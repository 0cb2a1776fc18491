// The CUDA registration of rms_norm (contract: jakiro.ops.rms_norm): the CPU
// kernel's arithmetic (csrc/cpu/rms_norm.cpp) as ATen ops, statistics in fp32.
// On a GPU the CPU's per-op dispatch cost, which the CPU kernel saves, does not
// dominate. Built with the CUDA kernels (JAKIRO_WITH_CUDA).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "jakiro/rms_norm.h"

namespace jakiro {
namespace {

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args(x, weight, eps);
  const at::Tensor x32 = x.to(at::kFloat);
  const at::Tensor normed = x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * normed.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("rms_norm", &rms_norm_cuda); }

}  // namespace jakiro

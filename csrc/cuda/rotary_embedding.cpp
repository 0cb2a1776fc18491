// The CUDA registration of rotary_embedding (contract: jakiro.ops.rotary_embedding):
// Hugging Face's tensor ops, x * cos + rotate_half(x) * sin. On a GPU the CPU's
// per-op dispatch cost, which the CPU kernel (csrc/cpu/rotary_embedding.cpp)
// saves, does not dominate. Built with the CUDA kernels (JAKIRO_WITH_CUDA).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "jakiro/rotary_embedding.h"

namespace jakiro {
namespace {

at::Tensor rotate_aten(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(3) / 2;
  const at::Tensor rotated = at::cat({-x.narrow(3, half, half), x.narrow(3, 0, half)}, 3);
  return (x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).contiguous();
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& cos, const at::Tensor& sin) {
  check_rotary_embedding_args(q, k, cos, sin);
  return {rotate_aten(q, cos, sin), rotate_aten(k, cos, sin)};
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("rotary_embedding", &rotary_embedding_cuda); }

}  // namespace jakiro

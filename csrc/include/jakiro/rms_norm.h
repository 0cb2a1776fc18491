// Argument checks of the rms_norm op (contract: jakiro.ops.rms_norm), shared by
// its CPU kernel (csrc/cpu/rms_norm.cpp) and its CUDA registration
// (csrc/cuda/rms_norm.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace jakiro {

// Checks x [..., H] (float32, bfloat16 or float16), weight [H] of x's dtype and
// device, and eps (finite, >= 0); no data access.
void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace jakiro

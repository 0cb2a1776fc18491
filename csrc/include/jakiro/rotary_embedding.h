// Argument checks of the rotary_embedding op (contract: jakiro.ops.rotary_embedding),
// shared by its CPU kernel (csrc/cpu/rotary_embedding.cpp) and its CUDA
// registration (csrc/cuda/rotary_embedding.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace jakiro {

// Checks q [B, Hq, T, D], k [B, Hkv, T, D], cos and sin [B, T, D]: one dtype
// (float32, bfloat16 or float16), one device, D even; no data access.
void check_rotary_embedding_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                 const at::Tensor& sin);

}  // namespace jakiro

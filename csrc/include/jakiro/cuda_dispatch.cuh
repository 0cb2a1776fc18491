// Maps a floating at::ScalarType to the CUDA type the kernels are written in.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "jakiro/checks.h"

namespace jakiro {

// Calls f(T{}) with T = float, __half or __nv_bfloat16; any other dtype is a ValueError.
template <typename F>
void dispatch_cuda_float(at::ScalarType type, const char* op, const char* name, F&& f) {
  switch (type) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    case at::kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      JAKIRO_CHECK(false, op, name, " must be float16, bfloat16 or float32 on CUDA, got ", type);
  }
}

}  // namespace jakiro

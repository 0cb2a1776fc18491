// Which CUDA implementation expert_mlp and grouped_gemm use, from the
// environment variable JAKIRO_EXPERT_MLP_KERNEL (read on every call, so tests
// and benchmarks can switch it at run time):
//   v1 (default, or unset): the first kernels (SIMT weight streaming, WMMA tile
//        kernel);
//   auto:   tensor-core weight streaming (mma_stream_kernel) for few rows per
//        expert, cuBLAS for many (opt-in);
//   cublas: the cuBLAS paths at every size (tests use it to cover them).
#pragma once

#include <cstdlib>
#include <cstring>

#include "jakiro/checks.h"

namespace jakiro {

enum class GroupedKernel { kAuto, kV1, kCublas };

inline GroupedKernel grouped_kernel_choice(const char* op) {
  const char* v = std::getenv("JAKIRO_EXPERT_MLP_KERNEL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "v1") == 0) return GroupedKernel::kV1;
  if (std::strcmp(v, "auto") == 0) return GroupedKernel::kAuto;
  if (std::strcmp(v, "cublas") == 0) return GroupedKernel::kCublas;
  JAKIRO_CHECK(false, op, "environment variable JAKIRO_EXPERT_MLP_KERNEL must be auto, v1 or cublas, got '", v,
               "'");
  return GroupedKernel::kAuto;
}

}  // namespace jakiro

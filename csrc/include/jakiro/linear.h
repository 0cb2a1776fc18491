// The CPU linear kernel's problem description, shared by the op (csrc/cpu/linear.cpp)
// and the per-instruction-set copies of its micro-kernel (csrc/cpu/linear_<isa>.cpp).
#pragma once

#include <cstdint>

namespace jakiro {

// y[M, N] = x[M, K] W[N, K]^T (+ bias[N]); unit stride along K, y contiguous.
// Every tensor is float32, or every one bfloat16 (then bf16 = true); sums are fp32.
struct LinearProblem {
  const void* x;
  const void* w;
  const void* bias;  // nullptr: no bias
  void* y;
  int64_t M, N, K;
  int64_t ldx, ldw;  // row strides of x and W, in elements
  bool bf16;
};

// Computes the output columns [n_begin, n_end) for every row. Defined only where
// the instruction set can be compiled (x86-64 with GCC); see linear_kernels_built().
void linear_columns_avx512(const LinearProblem& p, int64_t n_begin, int64_t n_end);
void linear_columns_avx2(const LinearProblem& p, int64_t n_begin, int64_t n_end);

}  // namespace jakiro

// The CPU linear kernel's problem description, shared by the op (csrc/cpu/linear.cpp)
// and the per-instruction-set copies of its micro-kernel (csrc/cpu/linear_<isa>.cpp).
#pragma once

#include <cstdint>

namespace jakiro {

// y[M, N] = x[M, K] W[N, K]^T (+ bias[N]); unit stride along K, y contiguous.
// x, bias and y share one dtype, float32 or bfloat16; W is float32 or bfloat16
// (bfloat16 x with float32 W is not supported). Sums are fp32.
struct LinearProblem {
  const void* x;
  const void* w;
  const void* bias;  // nullptr: no bias
  void* y;
  int64_t M, N, K;
  int64_t ldx, ldw;  // row strides of x and W, in elements
  bool x_bf16, w_bf16;
};

// Runs p on the kernel JAKIRO_LINEAR_KERNEL and this CPU select (in parallel over
// N); returns false, doing nothing, where at::linear is to be used instead
// (JAKIRO_LINEAR_KERNEL=aten, no kernel for this CPU, more rows than it wins at under auto).
// op names the caller in error messages.
bool run_linear_kernel(const LinearProblem& p, const char* op);

// The micro-kernel per instruction set, on output columns [n_begin, n_end).
// Defined only where the instruction set can be compiled (x86-64 with GCC).
void linear_columns_avx512(const LinearProblem& p, int64_t n_begin, int64_t n_end);
void linear_columns_avx2(const LinearProblem& p, int64_t n_begin, int64_t n_end);

}  // namespace jakiro

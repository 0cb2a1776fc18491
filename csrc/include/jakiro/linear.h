// The CPU linear kernel's problem description, shared by the op (csrc/cpu/linear.cpp)
// and the per-instruction-set copies of its micro-kernel (csrc/cpu/linear_<isa>.cpp).
#pragma once

#include <cstdint>

// The micro-kernels are built where GCC can compile them per instruction set.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define JAKIRO_LINEAR_X86_KERNELS 1
#else
#define JAKIRO_LINEAR_X86_KERNELS 0
#endif

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

// Whether the kernel takes a product of `rows` rows (w_bf16: bfloat16 weights), as
// JAKIRO_LINEAR_KERNEL and this CPU decide; otherwise at::linear is the caller's
// path (JAKIRO_LINEAR_KERNEL=aten, no kernel for this CPU, more rows than the kernel
// wins at under auto). `op` names the caller in error messages.
bool linear_kernel_applies(int64_t rows, bool w_bf16, const char* op);

// Runs p on the kernel, in parallel over N. Only where linear_kernel_applies.
void run_linear_kernel(const LinearProblem& p, const char* op);

// The micro-kernel per instruction set, on output columns [n_begin, n_end).
// Defined where JAKIRO_LINEAR_X86_KERNELS.
void linear_columns_avx512(const LinearProblem& p, int64_t n_begin, int64_t n_end);
void linear_columns_avx2(const LinearProblem& p, int64_t n_begin, int64_t n_end);

}  // namespace jakiro

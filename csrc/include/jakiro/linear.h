// The CPU linear kernel: its entry for the ops (linear, expert_mlp, grouped_gemm) and
// its problem description, shared with the per-instruction-set copies of the
// micro-kernel (csrc/cpu/linear_<isa>.cpp, which include no torch header).
#pragma once

#include <cstdint>

namespace at {
class Tensor;
}

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

// out[M, N] = x[M, K] w[N, K]^T (+ bias[N]) on the kernel, in parallel over N. x, bias
// and out float32 with w float32 or bfloat16, or all bfloat16; `bias` may be undefined;
// `out` is allocated when undefined, else contiguous [M, N]. Returns false, touching
// nothing, where the caller's own path (at::linear, at::mm) is to run: other dtypes, no
// rows, JAKIRO_LINEAR_KERNEL=aten, no kernel for this CPU, more rows than the kernel wins
// at under auto. `op` names the caller in error messages.
bool linear_on_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, at::Tensor& out,
                      const char* op);

// The micro-kernel per instruction set, on output columns [n_begin, n_end).
// Defined where JAKIRO_LINEAR_X86_KERNELS.
void linear_columns_avx512(const LinearProblem& p, int64_t n_begin, int64_t n_end);
void linear_columns_avx512bf16(const LinearProblem& p, int64_t n_begin, int64_t n_end);  // bfloat16 x and W only
void linear_columns_avx2(const LinearProblem& p, int64_t n_begin, int64_t n_end);

// The AMX copy (bfloat16 x and W, K a multiple of 32): x repacked once per call
// (amx_packed_x_elems values) by amx_pack_x, then output columns [n_begin, n_end),
// n_begin a multiple of 16. (Whether it can run: amx_usable, jakiro/cpu_isa.h.)
int64_t amx_packed_x_elems(const LinearProblem& p);
void amx_pack_x(const LinearProblem& p, uint16_t* packed);
void linear_columns_amx(const LinearProblem& p, const uint16_t* packed, int64_t n_begin, int64_t n_end);

}  // namespace jakiro

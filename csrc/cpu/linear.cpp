// The linear op, y = x W^T + b: a CPU kernel for the few rows of decoding and
// tree verification, at::linear everywhere else (contract: jakiro.ops.linear).
//
// Why the CPU kernel exists: with 1 to a few dozen rows a model's weights
// stream from DRAM once per forward pass, and the multiply is cheap next to
// that stream. The GEMM library reached 12 GB/s of weights on a one-token
// SmolLM2 pass on a 2-core AVX-512 machine, and a 16-token tree cost 1.8x that.
// The micro-kernel (csrc/cpu/linear_kernel.h) reads every weight row once, in
// nn.Linear's own [N, K] layout (float32 or bfloat16), for all rows of x, and
// prefetches ahead so the stream overlaps the multiplies.
//
// JAKIRO_LINEAR_KERNEL (read on every call, so tests can switch it) picks the
// CPU path: auto (default: the best instruction set this CPU has, at::linear
// above kMaxRows rows), amx (AMX tiles for bfloat16 x and W with K a multiple of
// 32, csrc/cpu/linear_amx.cpp; the avx512bf16 path for the rest), avx512bf16
// (bfloat16 dot products for bfloat16 x and W, the avx512 copy for the rest),
// avx512, avx2, or aten (always at::linear).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "jakiro/checks.h"
#include "jakiro/cpu_isa.h"
#include "jakiro/linear.h"
#include "linear_kernel.h"

namespace jakiro {
namespace {

constexpr const char* kOp = "linear";
// Rows of x above which at::linear is as fast (measured on a 2-core AVX-512 EPYC
// with SmolLM2's shapes, benchmarks/bench_linear.py): float32 weights streamed
// from memory still 1.2x at 128 rows, 1.0x at 256; with AVX512_BF16 dot
// products bfloat16 stays ahead to 64. Bfloat16 keeps the kernel to 64 rows on
// every CPU, so that every verify pass the commands pick (at most 60 tree nodes)
// is batch-invariant and greedy decoding exact in bfloat16 too; where the CPU
// lacks those dot products the widening copy costs instructions (on the EPYC,
// forced: 1.3x oneDNN's native bf16 dot products at 32 rows, 1.7x at 64).
constexpr int64_t kMaxRows = 128;
constexpr int64_t kMaxRowsBf16 = 64;
constexpr int64_t kColumnsPerTask = linear_kernel::kWeightRows;
constexpr int64_t kMinWeightFloatsPerTask = 1 << 15;  // smaller chunks are not worth a thread
constexpr int64_t kAmxChunk = 32;            // K values per AMX tile product
constexpr int64_t kAmxColumnsPerTask = 16;   // weight rows per AMX tile

CpuIsaChoice cpu_choice(const char* op) {
  return choose_cpu_isa("JAKIRO_LINEAR_KERNEL", "aten", JAKIRO_LINEAR_X86_KERNELS, op, /*bf16_copy=*/true);
}

void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  JAKIRO_CHECK(x.dim() >= 1, kOp, "x must have shape [..., K], got a 0-dimensional tensor");
  check_dim(weight, kOp, "weight", 2, "[N, K]");
  JAKIRO_CHECK(x.size(-1) == weight.size(1), kOp, "x's last dimension (", x.size(-1),
               ") must equal weight's K (weight is ", weight.sizes(), ")");
  JAKIRO_CHECK(at::isFloatingType(x.scalar_type()), kOp, "x must be a floating-point tensor, got ",
               x.scalar_type());
  JAKIRO_CHECK(weight.scalar_type() == x.scalar_type(), kOp, "weight must have x's dtype ", x.scalar_type(),
               ", got ", weight.scalar_type());
  check_same_device(x, "x", weight, "weight", kOp);
  if (bias.has_value()) {
    check_dim(*bias, kOp, "bias", 1, "[N]");
    JAKIRO_CHECK(bias->size(0) == weight.size(0), kOp, "bias must have weight's N = ", weight.size(0),
                 " entries, got ", bias->size(0));
    JAKIRO_CHECK(bias->scalar_type() == x.scalar_type(), kOp, "bias must have x's dtype ", x.scalar_type(),
                 ", got ", bias->scalar_type());
    check_same_device(x, "x", *bias, "bias", kOp);
  }
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_linear_args(x, weight, bias);
  return at::linear(x, weight, bias);
}

bool kernel_applies(int64_t rows, bool w_bf16, const char* op) {
  const CpuIsaChoice choice = cpu_choice(op);
  const int64_t max_rows = w_bf16 ? kMaxRowsBf16 : kMaxRows;
  return choice.isa != CpuIsa::kFallback && (choice.forced || rows <= max_rows);
}

void run_kernel(const LinearProblem& p, const char* op) {
  const CpuIsaChoice choice = cpu_choice(op);
#if JAKIRO_LINEAR_X86_KERNELS
  // The AMX copy takes bfloat16 x and W with K in whole chunks of 32 (the choice
  // depends on the weight and the dtype only, never on the rows, so each output
  // keeps its one order of sums); the rest go to the AVX-512 copies as without AMX.
  if (choice.isa == CpuIsa::kAmx && p.x_bf16 && p.K % kAmxChunk == 0) {
    std::vector<uint16_t> packed(amx_packed_x_elems(p));
    amx_pack_x(p, packed.data());
    const int64_t tasks = (p.N + kAmxColumnsPerTask - 1) / kAmxColumnsPerTask;
    const int64_t grain = std::max<int64_t>(1, kMinWeightFloatsPerTask / (kAmxColumnsPerTask * p.K));
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      linear_columns_amx(p, packed.data(), begin * kAmxColumnsPerTask, std::min(p.N, end * kAmxColumnsPerTask));
    });
    return;
  }
#endif
  const int64_t tasks = (p.N + kColumnsPerTask - 1) / kColumnsPerTask;
  const int64_t grain = std::max<int64_t>(1, kMinWeightFloatsPerTask / (kColumnsPerTask * std::max<int64_t>(p.K, 1)));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const int64_t n_begin = begin * kColumnsPerTask, n_end = std::min(p.N, end * kColumnsPerTask);
#if JAKIRO_LINEAR_X86_KERNELS
    if ((choice.isa == CpuIsa::kAvx512Bf16 || choice.isa == CpuIsa::kAmx) && p.x_bf16) {
      linear_columns_avx512bf16(p, n_begin, n_end);
    } else if (choice.isa == CpuIsa::kAvx512 || choice.isa == CpuIsa::kAvx512Bf16 || choice.isa == CpuIsa::kAmx) {
      linear_columns_avx512(p, n_begin, n_end);
    } else {
      linear_columns_avx2(p, n_begin, n_end);
    }
#endif
  });
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_linear_args(x, weight, bias);
  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = K == 0 ? 0 : x.numel() / K;
  at::Tensor out;
  if (!linear_on_kernel(x.reshape({M, K}), weight, bias.value_or(at::Tensor()), out, kOp)) {
    return at::linear(x, weight, bias);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.view(shape);
}

}  // namespace

#if !JAKIRO_LINEAR_X86_KERNELS
bool amx_usable() { return false; }
#endif

bool linear_on_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, at::Tensor& out,
                      const char* op) {
  const bool w_bf16 = w.scalar_type() == at::kBFloat16, x_bf16 = x.scalar_type() == at::kBFloat16;
  const bool dtypes = x_bf16 ? w_bf16 : x.scalar_type() == at::kFloat && (w_bf16 || w.scalar_type() == at::kFloat);
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  if (!dtypes || M == 0 || K == 0 || !kernel_applies(M, w_bf16, op)) return false;
  // Unit stride along K is all the kernel needs; rows of x and W may be strided.
  const at::Tensor xk = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor wk = w.stride(1) == 1 ? w : w.contiguous();
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  if (!out.defined()) out = at::empty({M, N}, x.options());
  run_kernel({xk.const_data_ptr(), wk.const_data_ptr(), b.defined() ? b.const_data_ptr() : nullptr,
              out.mutable_data_ptr(), M, N, K, xk.stride(0), wk.stride(0), x_bf16, w_bf16}, op);
  return true;
}

TORCH_LIBRARY_IMPL(jakiro, CPU, m) { m.impl("linear", &linear_cpu); }
#if JAKIRO_WITH_CUDA
// On a GPU the few-row products are cuBLAS's (weight-bandwidth bound already).
TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("linear", &linear_cuda); }
#endif

}  // namespace jakiro

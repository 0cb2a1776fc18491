// CPU kernel of grouped_gemm: one matrix product per expert on its contiguous
// block of rows, written straight into the output (empty experts cost nothing).
// A block of few rows runs on the linear kernel (each weight row read once for
// all of them), a larger one on at::mm.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "jakiro/linear.h"
#include "jakiro/moe.h"

namespace jakiro {
namespace {

at::Tensor grouped_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets,
                            bool validate) {
  constexpr const char* op = "grouped_gemm";
  const GroupedGemmShape s = check_grouped_gemm_args(x, w, expert_offsets, op);
  // Always validated on the CPU: reading E + 1 integers is free here, and the slices depend on them.
  (void)validate;
  const at::Tensor offsets = expert_offsets.contiguous();
  check_expert_offsets_values(offsets, s.rows, op);

  const int32_t* off = offsets.const_data_ptr<int32_t>();
  at::Tensor out = at::empty({s.rows, s.n}, x.options());
  for (int64_t e = 0; e < s.experts; ++e) {
    const int64_t begin = off[e], count = off[e + 1] - off[e];
    if (count == 0) continue;
    at::Tensor rows_out = out.narrow(0, begin, count);
    const at::Tensor rows = x.narrow(0, begin, count), weight = w.select(0, e);
    if (!linear_on_kernel(rows, weight, at::Tensor(), rows_out, op)) {
      at::mm_out(rows_out, rows, weight.t());  // accumulates reduced-precision inputs in fp32
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CPU, m) { m.impl("grouped_gemm", &grouped_gemm_cpu); }

}  // namespace jakiro

// CUDA kernel of grouped_gemm: the shared grouped kernels (include/jakiro/
// grouped_kernels.cuh) with a plain store. Few rows stream each expert's weights
// once; many rows use the tensor-core tile kernel. The offsets stay on the
// device (clamped there); only validate=True reads them back.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "jakiro/checks.h"
#include "jakiro/cuda_dispatch.cuh"
#include "jakiro/grouped_kernels.cuh"
#include "jakiro/moe.h"

namespace jakiro {
namespace {

// Up to this many rows the weight-streaming kernel wins: its weight reads dominate.
constexpr int64_t kStreamMaxRows = 64;

at::Tensor grouped_gemm_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& offsets_in,
                             bool validate) {
  constexpr const char* op = "grouped_gemm";
  const GroupedGemmShape s = check_grouped_gemm_args(x_in, w_in, offsets_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), offsets = offsets_in.contiguous();
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  if (validate && !capturing) check_expert_offsets_values(offsets.cpu(), s.rows, op);

  at::Tensor out = at::empty({s.rows, s.n}, x.options());
  if (s.rows == 0 || s.n == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_cuda_float(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    grouped::GroupedParams<T> p{};
    p.src = reinterpret_cast<const T*>(x.const_data_ptr());
    p.w = reinterpret_cast<const T*>(w.const_data_ptr());
    p.seg_begin = offsets.const_data_ptr<int32_t>();
    p.seg_end = p.seg_begin + 1;
    p.positions = s.rows;
    p.w_rows = s.n;
    p.experts = static_cast<int32_t>(s.experts);
    p.n = static_cast<int32_t>(s.n);
    p.k = static_cast<int32_t>(s.k);
    p.out = reinterpret_cast<T*>(out.mutable_data_ptr());
    const bool vec = grouped::can_vectorize<T>(s.k, {p.src, p.w});
    if (s.rows <= kStreamMaxRows) {
      grouped::launch_stream<T, grouped::Epilogue::kStore>(p, vec, stream);
    } else {
      const int64_t max_tiles = (s.rows + grouped::kTileM - 1) / grouped::kTileM + s.experts;
      grouped::launch_tile<T, false>(p, vec, max_tiles, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("grouped_gemm", &grouped_gemm_cuda); }

}  // namespace jakiro

// CUDA kernel of grouped_gemm: the shared grouped kernels (include/jakiro/
// grouped_kernels.cuh, grouped_mma_stream.cuh) with a plain store.
// JAKIRO_EXPERT_MLP_KERNEL (grouped_kernel_choice.h) picks the implementation:
//   auto:   rows <= 64: mma_stream_kernel (fp16/bf16, sm_80+; else
//           stream_kernel) reads each expert's weights once; 64 < rows <= 512:
//           the WMMA tile kernel; rows > 512 (training, prefill): one cuBLAS mm
//           per expert. That path READS THE OFFSETS BACK TO THE HOST (one sync,
//           acceptable at that size, cheap next to the products); under CUDA
//           graph capture it falls back to the tile kernel.
//   v1:     stream_kernel for rows <= 64, the tile kernel above.
//   cublas: the cuBLAS path at every size (outside graph capture).
// Apart from the cuBLAS path the offsets stay on the device (clamped there);
// validate=True reads them back.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "jakiro/checks.h"
#include "jakiro/cuda_dispatch.cuh"
#include "jakiro/grouped_kernel_choice.h"
#include "jakiro/grouped_kernels.cuh"
#include "jakiro/grouped_mma_stream.cuh"
#include "jakiro/moe.h"

#include <algorithm>

namespace jakiro {
namespace {

// Up to this many rows the weight-streaming kernel wins: its weight reads dominate.
constexpr int64_t kStreamMaxRows = 64;
// Above this many rows (never in draft decode) auto reads the offsets back for cuBLAS.
constexpr int64_t kCublasMinRows = 513;

// One at::mm per expert over its rows [begin, end), clamped exactly like the
// kernels' segment(); rows outside every segment are left unwritten like theirs.
void grouped_gemm_cublas(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets, at::Tensor& out) {
  const at::Tensor host = offsets.to(at::kCPU);  // the one host read (see the top)
  const int32_t* off = host.const_data_ptr<int32_t>();
  const int64_t rows = x.size(0);
  for (int64_t e = 0; e < w.size(0); ++e) {
    const int64_t begin = std::min(std::max<int64_t>(off[e], 0), rows);
    const int64_t end = std::min(std::max<int64_t>(off[e + 1], begin), rows);
    if (end == begin) continue;
    at::Tensor dst = out.narrow(0, begin, end - begin);
    at::mm_out(dst, x.narrow(0, begin, end - begin), w[e].t());
  }
}

at::Tensor grouped_gemm_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& offsets_in,
                             bool validate) {
  constexpr const char* op = "grouped_gemm";
  const GroupedGemmShape s = check_grouped_gemm_args(x_in, w_in, offsets_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), offsets = offsets_in.contiguous();
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  const GroupedKernel kernel = grouped_kernel_choice(op);
  if (validate && !capturing) check_expert_offsets_values(offsets.cpu(), s.rows, op);

  at::Tensor out = at::empty({s.rows, s.n}, x.options());
  if (s.rows == 0 || s.n == 0) return out;
  if (!capturing && (kernel == GroupedKernel::kCublas || (kernel == GroupedKernel::kAuto && s.rows >= kCublasMinRows))) {
    grouped_gemm_cublas(x, w, offsets, out);
    return out;
  }
  const int device_major = at::cuda::getCurrentDeviceProperties()->major;
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
    if (s.rows <= kStreamMaxRows && kernel != GroupedKernel::kV1 &&
        grouped::mma_stream_supported<T>(vec, s.experts, device_major)) {
      grouped::launch_mma_stream<T, grouped::Epilogue::kStore>(p, s.rows, stream);
    } else if (s.rows <= kStreamMaxRows) {
      grouped::launch_stream<T, grouped::Epilogue::kStore>(p, vec, s.rows, stream);
    } else {
      const int64_t max_tiles = (s.rows + grouped::kTileM - 1) / grouped::kTileM + s.experts;
      grouped::launch_tile<T, grouped::Epilogue::kStore>(p, vec, max_tiles, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("grouped_gemm", &grouped_gemm_cuda); }

}  // namespace jakiro

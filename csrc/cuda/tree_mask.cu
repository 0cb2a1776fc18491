// CUDA kernel of build_tree_mask. One thread per (node i, mask word w): it
// walks i's ancestor chain (parents staged in shared memory) and sets the bits
// that fall in word w, so every output word is written exactly once, with
// coalesced stores. Thread w == 0 walks to the root and also writes the depth.
// The walk follows only legal parents, so any input is memory-safe; illegal
// ones raise a flag that the host reads when validating.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "jakiro/checks.h"
#include "jakiro/tree.h"

namespace jakiro {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

__global__ void build_tree_mask_kernel(const int32_t* __restrict__ parents,
                                       uint32_t* __restrict__ mask, int32_t* __restrict__ depth,
                                       int32_t* __restrict__ error, int64_t batch, int32_t n,
                                       int32_t words) {
  extern __shared__ int32_t s_parents[];
  const int64_t cell = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t cells = static_cast<int64_t>(n) * words;
  // This block's nodes are < last_node; their ancestors are smaller still.
  const int64_t last_node = std::min<int64_t>(
      n, (static_cast<int64_t>(blockIdx.x) * kThreads + kThreads - 1) / words + 1);

  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int32_t* row_parents = parents + b * n;
    for (int64_t j = threadIdx.x; j < last_node; j += kThreads) s_parents[j] = row_parents[j];
    __syncthreads();
    if (cell < cells) {
      const int32_t i = static_cast<int32_t>(cell / words);
      const int32_t w = static_cast<int32_t>(cell % words);
      const int32_t lo = w * 32;
      uint32_t bits = 0;
      int32_t steps = 0;
      int32_t j = i;
      while (true) {
        if (j >= lo && j < lo + 32) bits |= 1u << (j - lo);
        const int32_t p = s_parents[j];
        // Past word w's range only the depth (w == 0) still needs the walk.
        if (j == 0 || !is_valid_parent(j, p) || (w != 0 && p < lo)) break;
        j = p;
        ++steps;
      }
      mask[(b * n + i) * words + w] = bits;
      if (w == 0) {
        depth[b * n + i] = steps;
        if (error != nullptr && !is_valid_parent(i, s_parents[i])) atomicOr(error, 1);
      }
    }
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor> build_tree_mask_cuda(const at::Tensor& parents_in, bool validate) {
  constexpr const char* op = "build_tree_mask";
  check_parents_shape(parents_in, op);
  const c10::cuda::CUDAGuard guard(parents_in.device());
  const at::Tensor parents = parents_in.contiguous();
  const int64_t batch = parents.size(0);
  const int64_t n = parents.size(1), words = tree_mask_words(n);
  at::Tensor mask = at::empty({batch, n, words}, parents.options());
  at::Tensor depth = at::empty({batch, n}, parents.options());
  if (batch == 0) return {mask, depth};
  // Reading the flag synchronises; impossible (and skipped) under graph capture.
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  const bool check = validate && !capturing;
  at::Tensor error = check ? at::zeros({1}, parents.options()) : at::Tensor();

  const dim3 grid(static_cast<unsigned>((n * words + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min<int64_t>(batch, kMaxGridY)));
  const size_t smem = n * sizeof(int32_t);
  build_tree_mask_kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      parents.const_data_ptr<int32_t>(),
      reinterpret_cast<uint32_t*>(mask.mutable_data_ptr<int32_t>()),
      depth.mutable_data_ptr<int32_t>(), check ? error.mutable_data_ptr<int32_t>() : nullptr, batch,
      static_cast<int32_t>(n), static_cast<int32_t>(words));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (check && error.item<int32_t>() != 0) {
    check_parents_values(parents.cpu(), op);  // raises with the exact position
    TORCH_CHECK(false, op, ": the CUDA kernel flagged an illegal parent that the CPU check did not find");
  }
  return {mask, depth};
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("build_tree_mask", &build_tree_mask_cuda); }

}  // namespace jakiro

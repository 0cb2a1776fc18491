// CUDA kernels of verify_greedy (contract: docs/architecture.md), one launch either way (see
// verify_kernel_choice.h for which runs):
//  - walk: one block per batch row walks the tree, computing the argmax of only
//    the rows it visits (vectorised loads, warp-shuffle reductions);
//  - parallel: one block per (row, node) computes that node's argmax into a
//    scratch array; the last block of a row to finish walks the row with them.
// Illegal parents or token ids are flagged, never dereferenced out of bounds:
// the walk only compares them, and node indices only grow.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "jakiro/verify_checks.h"
#include "jakiro/verify_kernel_choice.h"
#include "jakiro/block_ops.cuh"

namespace jakiro {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kMaxGridX = 2147483647;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    verify_greedy_walk_kernel(const T* __restrict__ logits, const int64_t* __restrict__ tokens,
                         const int32_t* __restrict__ parents, int64_t n, int64_t vocab,
                         int32_t* __restrict__ accept_len, int32_t* __restrict__ path,
                         int64_t* __restrict__ next_token, int32_t* __restrict__ error) {
  __shared__ BlockScratch scratch;
  const int64_t b = blockIdx.x;
  const int32_t* par = parents + b * n;
  const int64_t* tok = tokens + b * n;
  int32_t* path_b = path + b * n;
  block_check_tree(par, tok, n, vocab, error);
  int64_t len = 0;
  const int64_t bonus = block_greedy_walk(logits + b * n * vocab, par, tok, n, vocab, path_b, len, scratch);
  block_finish_path(path_b, n, len);
  if (threadIdx.x == 0) {
    accept_len[b] = static_cast<int32_t>(len);
    next_token[b] = bonus;
  }
}

// Block (b * n + node) computes the argmax of row (b, node) into argmax[b, node];
// the last of row b's n blocks to finish walks row b (arrivals[b] counts them).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    verify_greedy_parallel_kernel(const T* __restrict__ logits, const int64_t* __restrict__ tokens,
                                  const int32_t* __restrict__ parents, int64_t n, int64_t vocab,
                                  int64_t* argmax, int32_t* arrivals, int32_t* __restrict__ accept_len,
                                  int32_t* __restrict__ path, int64_t* __restrict__ next_token,
                                  int32_t* __restrict__ error) {
  __shared__ BlockScratch scratch;
  __shared__ int32_t is_last;
  const int64_t b = blockIdx.x / n, node = blockIdx.x % n;
  const int64_t node_argmax = block_row_argmax(logits + (b * n + node) * vocab, vocab, scratch);
  if (threadIdx.x == 0) argmax[b * n + node] = node_argmax;
  if (!block_arrive_last(arrivals + b, n, &is_last)) return;  // uniform over the block

  const int32_t* par = parents + b * n;
  const int64_t* tok = tokens + b * n;
  int32_t* path_b = path + b * n;
  const long long* argmax_b = reinterpret_cast<const long long*>(argmax + b * n);
  block_check_tree(par, tok, n, vocab, error);
  int64_t len = 0;
  const int64_t bonus = block_greedy_walk(
      [&](int64_t i) { return static_cast<int64_t>(__ldcg(argmax_b + i)); }, par, tok, n, path_b, len, scratch);
  block_finish_path(path_b, n, len);
  if (threadIdx.x == 0) {
    accept_len[b] = static_cast<int32_t>(len);
    next_token[b] = bonus;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy_cuda(const at::Tensor& tokens_in,
                                                                  const at::Tensor& parents_in,
                                                                  const at::Tensor& logits_in,
                                                                  bool validate) {
  constexpr const char* op = "verify_greedy";
  check_tree_and_logits(tokens_in, parents_in, logits_in, op);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), parents = parents_in.contiguous(),
                   logits = logits_in.contiguous();
  const int64_t batch = parents.size(0), n = parents.size(1), vocab = logits.size(2);
  at::Tensor accept_len = at::empty({batch}, parents.options());
  at::Tensor path = at::empty({batch, n}, parents.options());
  at::Tensor next_token = at::empty({batch}, tokens.options());
  if (batch == 0) return {accept_len, path, next_token};
  JAKIRO_CHECK(batch <= kMaxGridX, op, "batch size ", batch, " is too large");
  const int64_t sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const VerifyKernel route = choose_verify_kernel(batch, n, sm_count, kGreedyParallelBlocksPerSm, op);
  // flags[0]: the error flags; flags[1 + b]: the parallel path's arrival count of row b.
  at::Tensor flags = at::zeros({route == VerifyKernel::kParallel ? 1 + batch : 1}, parents.options());
  int32_t* error = flags.mutable_data_ptr<int32_t>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    if (route == VerifyKernel::kParallel) {
      at::Tensor argmax = at::empty({batch, n}, tokens.options());
      verify_greedy_parallel_kernel<scalar_t><<<static_cast<unsigned>(batch * n), kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), tokens.const_data_ptr<int64_t>(),
          parents.const_data_ptr<int32_t>(), n, vocab, argmax.mutable_data_ptr<int64_t>(), error + 1,
          accept_len.mutable_data_ptr<int32_t>(), path.mutable_data_ptr<int32_t>(),
          next_token.mutable_data_ptr<int64_t>(), error);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      verify_greedy_walk_kernel<scalar_t><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), tokens.const_data_ptr<int64_t>(),
          parents.const_data_ptr<int32_t>(), n, vocab, accept_len.mutable_data_ptr<int32_t>(),
          path.mutable_data_ptr<int32_t>(), next_token.mutable_data_ptr<int64_t>(), error);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  if (validate && !capturing && flags[0].item<int32_t>() != 0) {
    check_parents_values(parents.cpu(), op);
    check_token_values(tokens.cpu(), vocab, op);
    TORCH_CHECK(false, op, ": the CUDA kernel flagged an input error that the CPU checks did not find");
  }
  return {accept_len, path, next_token};
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("verify_greedy", &verify_greedy_cuda); }

}  // namespace jakiro

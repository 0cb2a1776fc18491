// Which CUDA kernel of the verify ops (verify_greedy, verify_sampling) runs a
// call (host code):
//  - walk:     one block per batch row walks its tree and computes the row
//              statistics (argmax, or max / thresholds / Z) of the nodes it
//              visits, one after the other. Reads only the visited rows, but at
//              small B most of the GPU is idle.
//  - parallel: one block per (row, node) computes that node's statistics, all
//              at once; the last block of a row to finish walks it (same launch).
//              Reads all N rows of logits, so at large B it does more work.
// Both make bit-identical decisions (same functions, same reduction layout).
#pragma once

#include <cstdint>
#include <cstring>

#include "jakiro/checks.h"
#include "jakiro/kernel_env.h"

namespace jakiro {

enum class VerifyKernel { kWalk, kParallel };

// The parallel kernel wins while its B * N node blocks take fewer waves of the
// GPU than a walk takes node-times (accept length + 1, often 3-6, one after the
// other). Limits in node blocks per SM:
//  - greedy: the argmax is memory-bound and several blocks fit on an SM; at 8
//    per SM the parallel kernel reads about as much as a wide walk takes;
//  - sampling: a node's statistics are compute-bound (~7 passes with exp and an
//    IEEE division per element) and a 512-thread block needs ~110 registers per
//    thread, so one block fits on an SM: 4 per SM is 4 waves, below a typical walk.
// Estimates from the H100 timings of the walk; benchmarks/bench_verify.py times
// both kernels side by side on CUDA to tune them.
constexpr int64_t kGreedyParallelBlocksPerSm = 8;
constexpr int64_t kSamplingParallelBlocksPerSm = 4;

// The kernel for a call of B = batch rows of n nodes with at most
// blocks_per_sm * sm_count node blocks for the parallel kernel.
// JAKIRO_VERIFY_KERNEL=walk or =parallel forces one (tests, benchmarks), auto
// (or unset) picks by size, any other value raises a ValueError; the deprecated
// alias JAKIRO_ACCEPT_PATH applies where JAKIRO_VERIFY_KERNEL is unset.
// B * N above the grid limit always walks.
inline VerifyKernel choose_verify_kernel(int64_t batch, int64_t n, int64_t sm_count, int64_t blocks_per_sm,
                                         const char* op) {
  const KernelEnv env = read_kernel_env("JAKIRO_VERIFY_KERNEL", "JAKIRO_ACCEPT_PATH");
  const bool walk = env.value != nullptr && std::strcmp(env.value, "walk") == 0;
  const bool parallel = env.value != nullptr && std::strcmp(env.value, "parallel") == 0;
  const bool any = env.value == nullptr || std::strcmp(env.value, "auto") == 0;
  JAKIRO_CHECK(any || walk || parallel, op, "environment variable ", env.name, " must be auto, walk or parallel, got '",
               env.value, "'");
  const int64_t blocks = batch * n;  // batch, n <= 2^31 each, so no overflow
  if (blocks > 2147483647) return VerifyKernel::kWalk;  // grid.x limit
  if (walk) return VerifyKernel::kWalk;
  if (parallel) return VerifyKernel::kParallel;
  return blocks <= blocks_per_sm * sm_count ? VerifyKernel::kParallel : VerifyKernel::kWalk;
}

}  // namespace jakiro

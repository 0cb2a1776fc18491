// Which CUDA kernel of the acceptance ops runs a call (torch-free host code).
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
#include <cstdlib>
#include <cstring>

namespace jakiro {

enum class AcceptPath { kWalk, kParallel };

// The parallel path wins while its B * N node blocks take fewer waves of the
// GPU than a walk takes node-times (accept length + 1, often 3-6, one after the
// other). Limits in node blocks per SM:
//  - greedy: the argmax is memory-bound and several blocks fit on an SM; at 8
//    per SM the parallel path reads about as much as a wide walk takes;
//  - sampling: a node's statistics are compute-bound (~7 passes with exp and an
//    IEEE division per element) and a 512-thread block needs ~110 registers per
//    thread, so one block fits on an SM: 4 per SM is 4 waves, below a typical walk.
// Estimates from the H100 timings of the walk; benchmarks/bench_verify.py times
// both paths side by side on CUDA to tune them.
constexpr int64_t kGreedyParallelBlocksPerSm = 8;
constexpr int64_t kSamplingParallelBlocksPerSm = 4;

// The path for a call of B = batch rows of n nodes with at most
// blocks_per_sm * sm_count node blocks for the parallel path;
// JAKIRO_ACCEPT_PATH=walk or =parallel forces one (tests, benchmarks), any
// other value or none picks by size.
inline AcceptPath choose_accept_path(int64_t batch, int64_t n, int64_t sm_count, int64_t blocks_per_sm) {
  const int64_t blocks = batch * n;  // batch, n <= 2^31 each, so no overflow
  if (blocks > 2147483647) return AcceptPath::kWalk;  // grid.x limit
  if (const char* forced = std::getenv("JAKIRO_ACCEPT_PATH")) {
    if (std::strcmp(forced, "walk") == 0) return AcceptPath::kWalk;
    if (std::strcmp(forced, "parallel") == 0) return AcceptPath::kParallel;
  }
  return blocks <= blocks_per_sm * sm_count ? AcceptPath::kParallel : AcceptPath::kWalk;
}

}  // namespace jakiro

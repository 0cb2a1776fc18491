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

// The parallel path wins while its B * N node blocks fit in a few waves of the
// GPU: a walk visits several nodes (accept length + 1) one after the other, so
// it costs about that many node-times. 8 blocks per SM (two waves of four
// 512-thread blocks) is where the two meet for a typical accept length of 3-4.
constexpr int64_t kParallelBlocksPerSm = 8;

// The path for a call; JAKIRO_ACCEPT_PATH=walk or =parallel forces one (tests,
// benchmarks), any other value or none picks by size as above.
inline AcceptPath choose_accept_path(int64_t batch, int64_t n, int64_t sm_count) {
  const int64_t blocks = batch * n;  // batch, n <= 2^31 each, so no overflow
  if (blocks > 2147483647) return AcceptPath::kWalk;  // grid.x limit
  if (const char* forced = std::getenv("JAKIRO_ACCEPT_PATH")) {
    if (std::strcmp(forced, "walk") == 0) return AcceptPath::kWalk;
    if (std::strcmp(forced, "parallel") == 0) return AcceptPath::kParallel;
  }
  return blocks <= kParallelBlocksPerSm * sm_count ? AcceptPath::kParallel : AcceptPath::kWalk;
}

}  // namespace jakiro

// The draft-tree format shared by every op (docs/architecture.md, "Tree format").
//
// parents int32 [B, N]: node 0 is the root with parents[b, 0] == -1; every
// other node i has 0 <= parents[b, i] < i (topological order). The ancestor
// mask packs N bits per row into W = ceil(N / 32) int32 words: bit j % 32 of
// word j / 32 in row i is set iff node j is i or an ancestor of i.
#pragma once

#include <cstdint>

#include "jakiro/macros.h"

namespace jakiro {

// Largest tree an op accepts. Keeps one batch row's parents (16 KiB) inside a
// CUDA block's shared memory.
constexpr int64_t kMaxTreeNodes = 4096;

JAKIRO_HOST_DEVICE int64_t tree_mask_words(int64_t num_nodes) { return (num_nodes + 31) / 32; }

// Whether `parent` is a legal parent for node i.
JAKIRO_HOST_DEVICE bool is_valid_parent(int64_t i, int32_t parent) {
  return i == 0 ? parent == -1 : (parent >= 0 && parent < i);
}

}  // namespace jakiro

#ifndef __CUDACC_RTC__
#include <ATen/core/Tensor.h>

namespace jakiro {

// Checks dtype, rank and size of a parents tensor (no data access).
void check_parents_shape(const at::Tensor& parents, const char* op);

// Reads every parent (the tensor must be on the CPU) and raises a ValueError
// naming the first illegal one.
void check_parents_values(const at::Tensor& parents_cpu, const char* op);

}  // namespace jakiro
#endif

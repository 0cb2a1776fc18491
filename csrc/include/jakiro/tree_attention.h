// Shared pieces of the tree_attention op (docs/architecture.md, tree_attention): which keys a
// query row sees, as torch-free helpers that the CPU and CUDA kernels share,
// and the argument checks.
//
// Row b holds kv_len = cache_seqlens[b] valid keys; its last tree_len keys are
// the tree, the keys before them the committed prefix (always visible). With a
// tree mask, query i sees tree key t iff bit t of mask row i is set. Without
// one, query i sees the keys < kv_len - Nq + i + 1 (bottom-right causal).
#pragma once

#include <cstdint>

#include "jakiro/macros.h"

namespace jakiro {

// Which keys one query row sees: every key below `dense_end`, none at or past
// `visible_end`, and in between (the tree) the keys whose mask bit is set.
struct QueryKeyRange {
  int64_t dense_end;
  int64_t visible_end;
};

// `kv_len` is clamped into [0, S] and the tree start into [0, kv_len] so that
// even invalid lengths (when a CUDA caller skips validation) never make a
// kernel read outside the cache or the mask.
JAKIRO_HOST_DEVICE int64_t clamped_kv_len(int32_t seqlen, int64_t cache_size) {
  return seqlen < 0 ? 0 : (seqlen > cache_size ? cache_size : seqlen);
}

JAKIRO_HOST_DEVICE QueryKeyRange query_key_range(int64_t kv_len, int64_t tree_len, bool has_mask,
                                                 int64_t num_queries, int64_t query) {
  if (has_mask) {
    const int64_t tree_start = kv_len > tree_len ? kv_len - tree_len : 0;
    return {tree_start, kv_len};
  }
  int64_t end = kv_len - num_queries + query + 1;
  end = end < 0 ? 0 : end;
  return {end, end};
}

// Whether the query whose packed mask row is `mask_row` sees key `key`, given
// its range. Only called for keys in [dense_end, visible_end).
JAKIRO_HOST_DEVICE bool tree_key_visible(const uint32_t* mask_row, int64_t tree_start, int64_t key) {
  const int64_t t = key - tree_start;
  return (mask_row[t >> 5] >> (t & 31)) & 1u;
}

// Head sizes the kernels are built for.
JAKIRO_HOST_DEVICE bool is_supported_head_dim(int64_t head_dim) {
  return head_dim == 64 || head_dim == 128;
}

}  // namespace jakiro

#ifndef __CUDACC_RTC__
#include <ATen/core/Tensor.h>

#include <optional>

namespace jakiro {

// Checks dtypes, devices, ranks, sizes and strides (no data access).
void check_tree_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                               const std::optional<at::Tensor>& tree_mask, int64_t tree_len,
                               double scale);

// Reads cache_seqlens (a CPU tensor) and raises a ValueError naming the first
// row whose length is outside [tree_len, S].
void check_tree_attention_seqlens(const at::Tensor& cache_seqlens_cpu, int64_t cache_size,
                                  int64_t tree_len);

}  // namespace jakiro
#endif

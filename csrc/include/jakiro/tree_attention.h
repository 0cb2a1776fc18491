// Shared pieces of the tree_attention op (docs/architecture.md, tree_attention): which keys a
// query row sees, as torch-free helpers that the CPU and CUDA kernels share,
// and the argument checks.
//
// Row b holds kv_len = cache_seqlens[b] valid keys; its last tree_len keys are
// the tree, the keys before them the committed prefix (always visible). With a
// tree mask, query i sees tree key t iff bit t of mask row i is set. Without
// one, query i sees the keys < kv_len - Nq + i + 1 (bottom-right causal).
//
// A sliding window of W positions keeps the keys whose distance to the query
// is below W. The keys a query sees form a chain (its prefix, then its
// ancestors in the tree), so the kept ones are always the last W of that chain,
// which is a single cut in cache order: every kernel only needs the first kept
// key, QueryKeyRange::begin.
#pragma once

#include <cstdint>

#include "jakiro/macros.h"

namespace jakiro {

// Which keys one query row sees: none below `begin` (the sliding window), every
// key in [begin, dense_end), none at or past `visible_end`, and in between (the
// tree) the keys whose mask bit is set.
struct QueryKeyRange {
  int64_t dense_end;
  int64_t visible_end;
  int64_t begin = 0;
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

JAKIRO_HOST_DEVICE int popcount32(uint32_t word) {
#if defined(__CUDA_ARCH__)
  return __popc(word);
#else
  return __builtin_popcount(word);
#endif
}

// Low `count` bits of a word (count in [0, 32]).
JAKIRO_HOST_DEVICE uint32_t low_bits(uint32_t word, int64_t count) {
  return count >= 32 ? word : word & ((1u << count) - 1u);
}

// Sets the range's window cut. A query at position p keeps the keys at
// distance p - position < window. Causal: p = visible_end - 1 and positions are
// the slots. Tree: the n visible tree keys follow the prefix, so p = tree_start
// + n - 1 and a visible tree key's distance is the number of visible tree keys
// after it; with n > window the cut is the tree key of rank n - window (the
// prefix goes), else it is in the prefix at tree_start + n - window. Only the
// mask's first tree_len bits count; window 0 is no window.
JAKIRO_HOST_DEVICE void apply_window(QueryKeyRange& range, const uint32_t* mask_row, int64_t tree_len,
                                     int64_t window) {
  if (window <= 0) return;
  if (mask_row == nullptr) {
    const int64_t cut = range.visible_end - window;
    range.begin = cut > 0 ? cut : 0;
    return;
  }
  const int64_t tree_start = range.dense_end;
  int64_t seen = 0;
  for (int64_t w = 0; w * 32 < tree_len; ++w) seen += popcount32(low_bits(mask_row[w], tree_len - w * 32));
  int64_t rank = seen - window;  // visible tree keys before the first kept one
  if (rank <= 0) {
    range.begin = tree_start + rank > 0 ? tree_start + rank : 0;
    return;
  }
  for (int64_t w = 0;; ++w) {  // the set bit of that rank exists: rank < seen
    uint32_t word = low_bits(mask_row[w], tree_len - w * 32);
    const int bits = popcount32(word);
    if (rank >= bits) {
      rank -= bits;
      continue;
    }
    for (; rank > 0; --rank) word &= word - 1u;  // drop the lowest set bits
    int bit = 0;
    while (!((word >> bit) & 1u)) ++bit;
    range.begin = tree_start + w * 32 + bit;
    return;
  }
}

// Head sizes the kernels take, on both devices: every multiple of 8 up to 256
// (csrc/cpu/tree_attention.cpp, csrc/cuda/tree_attention.cu say which sizes
// have kernels of their own).
constexpr int64_t kMaxHeadDim = 256;
JAKIRO_HOST_DEVICE bool head_dim_supported(int64_t head_dim) {
  return head_dim >= 8 && head_dim <= kMaxHeadDim && head_dim % 8 == 0;
}

}  // namespace jakiro

#ifndef __CUDACC_RTC__
#include <ATen/core/Tensor.h>

#include <optional>

namespace jakiro {

// Checks dtypes, devices, ranks, sizes, strides and scalars (no data access).
void check_tree_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                               const std::optional<at::Tensor>& tree_mask, int64_t tree_len,
                               double scale, int64_t window, double softcap);

// Reads cache_seqlens (a CPU tensor) and raises a ValueError naming the first
// row whose length is outside [tree_len, S].
void check_tree_attention_seqlens(const at::Tensor& cache_seqlens_cpu, int64_t cache_size,
                                  int64_t tree_len);

}  // namespace jakiro
#endif

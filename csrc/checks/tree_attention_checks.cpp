// Argument checks of tree_attention (include/jakiro/tree_attention.h), shared
// by its CPU and CUDA kernels.
#include "jakiro/tree_attention.h"

#include <cmath>

#include "jakiro/checks.h"

namespace jakiro {
namespace {
constexpr const char* kOp = "tree_attention";
}

void check_tree_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                               const std::optional<at::Tensor>& tree_mask, int64_t tree_len,
                               double scale, int64_t window, double softcap) {
  check_dim(q, kOp, "q", 4, "[B, Hq, Nq, D]");
  check_dim(k_cache, kOp, "k_cache", 4, "[B, Hkv, S, D]");
  check_dim(v_cache, kOp, "v_cache", 4, "[B, Hkv, S, D]");
  check_dim(cache_seqlens, kOp, "cache_seqlens", 1, "[B]");
  const auto dtype = q.scalar_type();
  JAKIRO_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, kOp,
               "q must be Half, BFloat16 or Float, got ", dtype);
  check_dtype(k_cache, kOp, "k_cache", dtype);
  check_dtype(v_cache, kOp, "v_cache", dtype);
  check_dtype(cache_seqlens, kOp, "cache_seqlens", at::kInt);
  check_same_device(q, "q", k_cache, "k_cache", kOp);
  check_same_device(q, "q", v_cache, "v_cache", kOp);
  check_same_device(q, "q", cache_seqlens, "cache_seqlens", kOp);

  const int64_t batch = q.size(0), hq = q.size(1), nq = q.size(2), d = q.size(3);
  const int64_t hkv = k_cache.size(1), s = k_cache.size(2);
  JAKIRO_CHECK(head_dim_supported(d), kOp, "head_dim (last dimension of q) must be a multiple of 8 from 8 to ",
               kMaxHeadDim, q.is_cuda() ? " on CUDA" : " on the CPU", ", got ", d);
  JAKIRO_CHECK(k_cache.size(0) == batch && k_cache.size(3) == d, kOp, "k_cache must have shape [B=", batch,
               ", Hkv, S, D=", d, "], got ", k_cache.sizes());
  JAKIRO_CHECK(v_cache.sizes() == k_cache.sizes(), kOp, "v_cache must have the shape of k_cache ",
               k_cache.sizes(), ", got ", v_cache.sizes());
  JAKIRO_CHECK(hkv >= 1, kOp, "k_cache must have at least one head, got Hkv = ", hkv);
  JAKIRO_CHECK(hq % hkv == 0, kOp, "the number of query heads Hq = ", hq,
               " must be a multiple of the number of KV heads Hkv = ", hkv, " (GQA)");
  JAKIRO_CHECK(cache_seqlens.size(0) == batch, kOp, "cache_seqlens must have shape [B=", batch, "], got ",
               cache_seqlens.sizes());
  JAKIRO_CHECK(k_cache.stride(3) == 1 || d == 1, kOp, "k_cache must be contiguous in its last dimension, got strides ",
               k_cache.strides());
  JAKIRO_CHECK(v_cache.stride(3) == 1 || d == 1, kOp, "v_cache must be contiguous in its last dimension, got strides ",
               v_cache.strides());
  JAKIRO_CHECK(tree_len >= 0 && tree_len <= s, kOp, "tree_len must be in [0, S = ", s, "], got ", tree_len);
  JAKIRO_CHECK(std::isfinite(scale), kOp, "scale must be finite, got ", scale);
  JAKIRO_CHECK(window >= 0, kOp, "window must be >= 0 (0: no sliding window), got ", window);
  JAKIRO_CHECK(std::isfinite(softcap) && softcap >= 0, kOp, "softcap must be finite and >= 0 (0: no soft-cap), got ",
               softcap);

  if (tree_mask.has_value()) {
    const at::Tensor& mask = *tree_mask;
    check_dim(mask, kOp, "tree_mask", 3, "[B, Nq, W]");
    check_dtype(mask, kOp, "tree_mask", at::kInt);
    check_same_device(q, "q", mask, "tree_mask", kOp);
    JAKIRO_CHECK(mask.size(0) == batch && mask.size(1) == nq, kOp, "tree_mask must have shape [B=", batch,
                 ", Nq=", nq, ", W], got ", mask.sizes());
    JAKIRO_CHECK(mask.size(2) * 32 >= tree_len, kOp, "tree_mask is too narrow: W = ", mask.size(2),
                 " words hold ", mask.size(2) * 32, " bits but tree_len = ", tree_len,
                 " needs W >= ", (tree_len + 31) / 32);
  }
}

void check_tree_attention_seqlens(const at::Tensor& cache_seqlens_cpu, int64_t cache_size,
                                  int64_t tree_len) {
  const at::Tensor lens = cache_seqlens_cpu.contiguous();
  const int32_t* data = lens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < lens.size(0); ++b) {
    JAKIRO_CHECK(data[b] <= cache_size, kOp, "cache_seqlens[", b, "] = ", data[b],
                 " exceeds the cache size S = ", cache_size);
    JAKIRO_CHECK(data[b] >= tree_len, kOp, "cache_seqlens[", b, "] = ", data[b],
                 " is smaller than tree_len = ", tree_len, " (the tree's keys must be in the cache)");
  }
}

}  // namespace jakiro

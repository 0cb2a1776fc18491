// CUDA kernel of compact_kv (contract: docs/architecture.md), all layers in one launch. One
// thread owns one vector-sized column of one (layer, key/value, row, head) and
// moves it for j = 0 .. accept_len in increasing order. Every element is thus
// read and written by a single thread in the op's sequential order, which makes
// overlapping moves (a destination that is a later source, or the reverse)
// correct without barriers. Moves that would leave the cache are skipped and
// flagged, so any input is memory-safe.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "jakiro/verify.h"
#include "jakiro/verify_checks.h"

namespace jakiro {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

struct CacheLayout {
  int64_t stride[5];  // in vectors: layer, key/value, batch row, head, position
  int64_t heads, batch, units_per_row;
};

template <typename Vec>
__global__ void compact_kv_kernel(Vec* __restrict__ kv, CacheLayout layout, int64_t columns,
                                  int64_t seq_len, const int32_t* __restrict__ prefix_len,
                                  const int32_t* __restrict__ path, const int32_t* __restrict__ accept_len,
                                  int32_t n, int32_t* __restrict__ error) {
  for (int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; col < columns;
       col += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t unit = col % layout.units_per_row;
    int64_t rest = col / layout.units_per_row;
    const int64_t h = rest % layout.heads;
    rest /= layout.heads;
    const int64_t b = rest % layout.batch;
    rest /= layout.batch;
    const int64_t k = rest % 2, l = rest / 2;
    const int64_t start = prefix_len[b], last = accept_len[b];
    if (last < 0 || last >= n || start < 0 || start + last >= seq_len) {
      if (unit == 0) atomicOr(error, kBadMove);
      continue;
    }
    Vec* rows = kv + l * layout.stride[0] + k * layout.stride[1] + b * layout.stride[2] +
                h * layout.stride[3] + unit;
    const int32_t* path_b = path + b * n;
    for (int64_t j = 0; j <= last; ++j) {
      const int64_t src = path_b[j];
      if (src == j) continue;
      if (src < 0 || start + src >= seq_len) {
        if (unit == 0) atomicOr(error, kBadMove);
        continue;
      }
      rows[(start + j) * layout.stride[4]] = rows[(start + src) * layout.stride[4]];
    }
  }
}

// Widest access (16, 8, 4, 2 or 1 bytes) that divides the row size, the base
// address and every stride.
int64_t vector_bytes(const at::Tensor& kv) {
  const int64_t esize = kv.element_size();
  int64_t vec = 16;
  const auto fits = [&](int64_t bytes) { return bytes % vec == 0; };
  while (vec > 1) {
    bool ok = fits(kv.size(5) * esize) && reinterpret_cast<uintptr_t>(kv.data_ptr()) % vec == 0;
    for (int d = 0; d < 5; ++d) ok = ok && fits(kv.stride(d) * esize);
    if (ok) break;
    vec /= 2;
  }
  return vec;
}

template <typename Vec>
void launch(const at::Tensor& kv, int64_t vec_bytes, const at::Tensor& prefix_len,
            const at::Tensor& path, const at::Tensor& accept_len, const at::Tensor& error) {
  const int64_t esize = kv.element_size();
  CacheLayout layout;
  for (int d = 0; d < 5; ++d) layout.stride[d] = kv.stride(d) * esize / vec_bytes;
  layout.heads = kv.size(3);
  layout.batch = kv.size(2);
  layout.units_per_row = kv.size(5) * esize / vec_bytes;
  const int64_t columns = kv.size(0) * 2 * layout.batch * layout.heads * layout.units_per_row;
  const int64_t blocks = std::min<int64_t>(kMaxBlocks, (columns + kThreads - 1) / kThreads);
  compact_kv_kernel<Vec><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<Vec*>(kv.data_ptr()), layout, columns, kv.size(4),
      prefix_len.const_data_ptr<int32_t>(), path.const_data_ptr<int32_t>(),
      accept_len.const_data_ptr<int32_t>(), static_cast<int32_t>(path.size(1)),
      error.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void compact_kv_cuda(const at::Tensor& kv, const at::Tensor& prefix_len_in, const at::Tensor& path_in,
                     const at::Tensor& accept_len_in, bool validate) {
  constexpr const char* op = "compact_kv";
  check_compact_kv_shapes(kv, prefix_len_in, path_in, accept_len_in, op);
  const c10::cuda::CUDAGuard guard(kv.device());
  const at::Tensor prefix_len = prefix_len_in.contiguous(), path = path_in.contiguous(),
                   accept_len = accept_len_in.contiguous();
  if (kv.numel() == 0) return;
  JAKIRO_CHECK(path.size(1) >= 1, op, "path must have at least one column, got ", path.sizes());
  at::Tensor error = at::zeros({1}, prefix_len.options());
  const int64_t vec = vector_bytes(kv);
  switch (vec) {
    case 16: launch<uint4>(kv, vec, prefix_len, path, accept_len, error); break;
    case 8: launch<uint2>(kv, vec, prefix_len, path, accept_len, error); break;
    case 4: launch<uint32_t>(kv, vec, prefix_len, path, accept_len, error); break;
    case 2: launch<uint16_t>(kv, vec, prefix_len, path, accept_len, error); break;
    default: launch<uint8_t>(kv, vec, prefix_len, path, accept_len, error); break;
  }
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  if (validate && !capturing && error.item<int32_t>() != 0) {
    check_compact_kv_values(prefix_len.cpu(), path.cpu(), accept_len.cpu(), kv.size(4), op);
    TORCH_CHECK(false, op, ": the CUDA kernel flagged a move outside the cache that the CPU check did not find");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("compact_kv", &compact_kv_cuda); }

}  // namespace jakiro

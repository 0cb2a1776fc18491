// CUDA kernel of tree_attention (contract: docs/architecture.md): flash-style attention
// with an online softmax in fp32.
//
// A block takes kRows packed query rows of one (batch row, KV head) and one
// split of the keys. Packed row r is query i = r / G of query head
// hkv * G + r % G (G = GQA group size), so the K/V tiles a block loads serve
// every query head of the group. Long caches are split over gridDim.z; each
// split writes its normalised partial output and log-sum-exp, and a second
// kernel merges them. With a single split the first kernel writes `out`.
//
// Per tile of kKeys keys: load K and V to shared memory (fp32), scores
// (thread per (row, key)), softmax (warp per row, lane per key), then P·V
// (thread per (row, 1/8 of head_dim)). Barriers separate the phases. The mask
// is read only for keys in a row's tree region.
//
// Head sizes 64, 80, 96, 128 and 256 are compiled (all three kernels; the
// tensor-core tiles need multiples of 16). Every other multiple of 8 up to 256
// runs the scalar kernel of the next compiled size of 64, 128 or 256, its
// shared tiles zero-padded past the real size. A sliding window is a per-row first
// key (QueryKeyRange::begin): blocks start at their rows' lowest one. The
// soft-cap maps each score, in the log2 units the kernels use, before the mask.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#include "jakiro/checks.h"
#include "jakiro/kernel_env.h"
#include "jakiro/tree_attention.h"

namespace jakiro {
namespace {

constexpr const char* kOp = "tree_attention";
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kKeys = 32;                      // keys per tile: one per lane in the softmax
constexpr int kMinKeysPerSplit = 256;          // below this a split is not worth its merge
constexpr int kMinKeysPerStagedSplit = 128;
constexpr int kMaxSplits = 64;
constexpr int64_t kMaxGridYZ = 65535;
constexpr float kLog2e = 1.4426950408889634f;

// Packed query rows per block of the scalar kernel: 32, or 16 at D = 256 so that
// its fp32 tiles fit in 99 KB of shared memory (sm_86, sm_89).
template <int D>
constexpr int scalar_rows() { return D > 128 ? 16 : 32; }

// The head sizes every kernel is compiled for.
bool head_dim_compiled(int64_t head_dim) {
  return head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128 || head_dim == 256;
}

// Calls f(std::integral_constant<int, D>) for the compiled size D that serves
// head_dim: itself when compiled, else the next of 64, 128, 256 (padded, scalar only).
template <typename F>
void with_head_dim(int64_t head_dim, F&& f) {
  switch (head_dim) {
    case 80: return f(std::integral_constant<int, 80>{});
    case 96: return f(std::integral_constant<int, 96>{});
    default: break;
  }
  if (head_dim <= 64) return f(std::integral_constant<int, 64>{});
  if (head_dim <= 128) return f(std::integral_constant<int, 128>{});
  JAKIRO_CHECK(head_dim <= 256, kOp, "head_dim ", head_dim, " exceeds 256");
  return f(std::integral_constant<int, 256>{});
}

template <typename scalar_t>
struct Params {
  const scalar_t* q;  // contiguous [B, Hq, Nq, D]
  const scalar_t* k;
  const scalar_t* v;
  int64_t k_strides[3];  // batch, head, position; the last dimension is contiguous
  int64_t v_strides[3];
  const int32_t* seqlens;
  const uint32_t* mask;  // contiguous [B, Nq, W] when has_mask
  int64_t mask_words;
  bool has_mask;
  scalar_t* out;          // contiguous [B, Hq, Nq, D]
  float* partial_out;     // [splits, B * Hq * Nq, D] when splits > 1
  float* partial_lse;     // [splits, B * Hq * Nq], log2 domain
  int64_t hq, hkv, nq, group, cache_size, tree_len;
  int head_dim;            // the real size (the scalar kernel's padded copies read it)
  int64_t window;          // 0: no sliding window
  int64_t keys_per_split;
  int num_splits;
  float scale_log2;       // scale * log2(e): scores are in log2 units for exp2f
  float softcap_log2;     // softcap * log2(e), 0: off; and its inverse
  float inv_softcap_log2;
};

// The soft-cap of a score in log2 units: softcap * tanh(s / softcap) of the
// natural score s is cap * tanh(score / cap) with cap = softcap * log2(e).
__device__ __forceinline__ float soft_cap_log2(float score, float cap, float inv_cap) {
  return cap * tanhf(score * inv_cap);
}

// The window-cut range of one packed row (padding rows, past `packed_rows`, see nothing).
template <typename scalar_t>
__device__ __forceinline__ QueryKeyRange packed_row_range(const Params<scalar_t>& p, int64_t b, int64_t row,
                                                          int64_t kv_len) {
  QueryKeyRange range{0, 0};
  if (row >= p.nq * p.group) return range;
  const int64_t i = row / p.group;
  range = query_key_range(kv_len, p.tree_len, p.has_mask, p.nq, i);
  apply_window(range, p.has_mask ? p.mask + (b * p.nq + i) * p.mask_words : nullptr, p.tree_len, p.window);
  return range;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <int D>
constexpr size_t shared_bytes() {
  // row ranges (3 x int64), then fp32: q, k (padded), v, p (padded), alpha, max, sum
  constexpr int kRows = scalar_rows<D>();
  return 3 * kRows * sizeof(int64_t) +
         sizeof(float) * (kRows * D + kKeys * (D + 1) + kKeys * D + kRows * (kKeys + 1) + 3 * kRows);
}

// D: the compiled size; kPadded: the real size p.head_dim is smaller, and
// the shared tiles hold zeros past it.
template <typename scalar_t, int D, bool kPadded>
__global__ void __launch_bounds__(kThreads) tree_attention_kernel(const Params<scalar_t> p) {
  const int head_dim = kPadded ? p.head_dim : D;
  constexpr int kRows = scalar_rows<D>();
  constexpr int kRowsPerWarp = kRows / kWarps;   // softmax rows owned by one warp
  constexpr int kColGroups = kThreads / kRows;   // threads sharing one row in P·V
  static_assert(kRows % kWarps == 0 && kThreads % kRows == 0 && D % kColGroups == 0 && kKeys == 32, "tile shape");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* s_dense_end = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* s_visible_end = s_dense_end + kRows;
  int64_t* s_begin = s_visible_end + kRows;
  float* s_q = reinterpret_cast<float*>(s_begin + kRows);  // [kRows][D]
  float* s_k = s_q + kRows * D;                                   // [kKeys][D + 1]
  float* s_v = s_k + kKeys * (D + 1);                             // [kKeys][D]
  float* s_p = s_v + kKeys * D;                                   // [kRows][kKeys + 1]
  float* s_alpha = s_p + kRows * (kKeys + 1);
  float* s_max = s_alpha + kRows;
  float* s_sum = s_max + kRows;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t b = blockIdx.x / p.hkv, hkv = blockIdx.x % p.hkv;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int split = blockIdx.z;
  const int64_t packed_rows = p.nq * p.group;
  const int64_t kv_len = clamped_kv_len(p.seqlens[b], p.cache_size);
  const int64_t tree_start = query_key_range(kv_len, p.tree_len, true, p.nq, 0).dense_end;

  for (int idx = tid; idx < kRows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const int64_t row = row0 + r;
    float value = 0.f;
    if (row < packed_rows && d < head_dim) {
      const int64_t i = row / p.group, h = hkv * p.group + row % p.group;
      value = static_cast<float>(p.q[((b * p.hq + h) * p.nq + i) * head_dim + d]) * p.scale_log2;
    }
    s_q[idx] = value;
  }
  if (tid < kRows) {
    const QueryKeyRange range = packed_row_range(p, b, row0 + tid, kv_len);
    s_dense_end[tid] = range.dense_end;
    s_visible_end[tid] = range.visible_end;
    s_begin[tid] = range.begin;
  }
  __syncthreads();

  // Splits of keys_per_split keys from the real rows' first window key (0 without a window).
  int64_t block_end = 0, block_begin = std::numeric_limits<int64_t>::max();
  for (int r = 0; r < kRows; ++r) {
    block_end = max(block_end, s_visible_end[r]);
    if (row0 + r < packed_rows) block_begin = min(block_begin, s_begin[r]);
  }
  const int64_t begin = block_begin + static_cast<int64_t>(split) * p.keys_per_split;
  const int64_t end = min(begin + p.keys_per_split, block_end);

  float row_max[kRowsPerWarp], row_sum[kRowsPerWarp];
  for (int t = 0; t < kRowsPerWarp; ++t) {
    row_max[t] = -INFINITY;
    row_sum[t] = 0.f;
  }
  const int pv_row = tid / kColGroups, pv_col = tid % kColGroups;
  float acc[D / kColGroups];
  for (int c = 0; c < D / kColGroups; ++c) acc[c] = 0.f;

  const scalar_t* k_head = p.k + b * p.k_strides[0] + hkv * p.k_strides[1];
  const scalar_t* v_head = p.v + b * p.v_strides[0] + hkv * p.v_strides[1];
  for (int64_t key0 = begin; key0 < end; key0 += kKeys) {
    for (int idx = tid; idx < kKeys * D; idx += kThreads) {
      const int j = idx / D, d = idx % D;
      const int64_t key = key0 + j;
      float kx = 0.f, vx = 0.f;
      if (key < end && d < head_dim) {
        kx = static_cast<float>(k_head[key * p.k_strides[2] + d]);
        vx = static_cast<float>(v_head[key * p.v_strides[2] + d]);
      }
      s_k[j * (D + 1) + d] = kx;
      s_v[j * D + d] = vx;
    }
    __syncthreads();

    // Scores: warp w takes rows w, w + 8, ...; lane j takes key j.
    const int64_t key = key0 + lane;
    for (int r = warp; r < kRows; r += kWarps) {
      float dot = 0.f;
      const float* q = s_q + r * D;
      const float* k = s_k + lane * (D + 1);
#pragma unroll 16
      for (int d = 0; d < head_dim; ++d) dot = fmaf(q[d], k[d], dot);
      if (p.softcap_log2 > 0.f) dot = soft_cap_log2(dot, p.softcap_log2, p.inv_softcap_log2);
      bool visible = key < end && key >= s_begin[r] && key < s_visible_end[r];
      if (visible && key >= s_dense_end[r]) {  // a tree key: test its bit
        const int64_t i = (row0 + r) / p.group;
        visible = p.has_mask && tree_key_visible(p.mask + (b * p.nq + i) * p.mask_words, tree_start, key);
      }
      s_p[r * (kKeys + 1) + lane] = visible ? dot : -INFINITY;
    }
    __syncthreads();

    // Online softmax: warp w owns rows w * kRowsPerWarp + t.
    for (int t = 0; t < kRowsPerWarp; ++t) {
      const int r = warp * kRowsPerWarp + t;
      const float score = s_p[r * (kKeys + 1) + lane];
      const float new_max = fmaxf(row_max[t], warp_max(score));
      const float prob = new_max == -INFINITY ? 0.f : exp2f(score - new_max);
      const float rescale = row_max[t] == -INFINITY ? 0.f : exp2f(row_max[t] - new_max);
      row_sum[t] = row_sum[t] * rescale + warp_sum(prob);
      row_max[t] = new_max;
      s_p[r * (kKeys + 1) + lane] = prob;
      if (lane == 0) s_alpha[r] = rescale;
    }
    __syncthreads();

    // P·V: thread (row, col) owns columns col, col + kColGroups, ...
    const float rescale = s_alpha[pv_row];
    for (int c = 0; c < D / kColGroups; ++c) acc[c] *= rescale;
    for (int j = 0; j < kKeys; ++j) {
      const float prob = s_p[pv_row * (kKeys + 1) + j];
      const float* v = s_v + j * D + pv_col;
#pragma unroll
      for (int c = 0; c < D / kColGroups; ++c) acc[c] = fmaf(prob, v[c * kColGroups], acc[c]);
    }
    __syncthreads();  // the next tile overwrites s_k, s_v and s_p
  }

  if (lane == 0) {
    for (int t = 0; t < kRowsPerWarp; ++t) {
      s_max[warp * kRowsPerWarp + t] = row_max[t];
      s_sum[warp * kRowsPerWarp + t] = row_sum[t];
    }
  }
  __syncthreads();

  const int64_t row = row0 + pv_row;
  if (row >= packed_rows) return;
  const int64_t i = row / p.group, h = hkv * p.group + row % p.group;
  const int64_t out_row = (b * p.hq + h) * p.nq + i;
  const float sum = s_sum[pv_row];
  const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a row that sees no key gets zeros
  if (p.num_splits == 1) {
    scalar_t* out = p.out + out_row * head_dim + pv_col;
    for (int c = 0; c < D / kColGroups; ++c) {
      if (!kPadded || pv_col + c * kColGroups < head_dim) out[c * kColGroups] = static_cast<scalar_t>(acc[c] * inv);
    }
    return;
  }
  const int64_t total_rows = gridDim.x / p.hkv * p.hq * p.nq;
  float* out = p.partial_out + (split * total_rows + out_row) * head_dim + pv_col;
  for (int c = 0; c < D / kColGroups; ++c) {
    if (!kPadded || pv_col + c * kColGroups < head_dim) out[c * kColGroups] = acc[c] * inv;
  }
  if (pv_col == 0) p.partial_lse[split * total_rows + out_row] = sum > 0.f ? s_max[pv_row] + log2f(sum) : -INFINITY;
}

// Combines the splits' partial outputs, weighting each by its share of the
// softmax mass, 2^(lse_split - lse_max). One thread per output element.
template <typename scalar_t>
__global__ void merge_splits_kernel(const float* __restrict__ partial_out, const float* __restrict__ partial_lse,
                                    scalar_t* __restrict__ out, int64_t total_rows, int head_dim, int num_splits) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total_rows * head_dim) return;
  const int64_t row = idx / head_dim;
  float lse_max = -INFINITY;
  for (int s = 0; s < num_splits; ++s) lse_max = fmaxf(lse_max, partial_lse[s * total_rows + row]);
  float value = 0.f;
  if (lse_max != -INFINITY) {
    float weight_sum = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float lse = partial_lse[s * total_rows + row];
      if (lse == -INFINITY) continue;  // this split saw no key of the row
      const float weight = exp2f(lse - lse_max);
      weight_sum += weight;
      value += weight * partial_out[s * total_rows * head_dim + idx];
    }
    value /= weight_sum;
  }
  out[idx] = static_cast<scalar_t>(value);
}

}  // namespace
}  // namespace jakiro

#include "tree_attention_mma.cuh"         // the first tensor-core kernel (mma_v1), built on Params above
#include "tree_attention_mma_staged.cuh"  // the default tensor-core kernel, built on both

namespace jakiro {
namespace {

// How many splits of the keys: enough blocks to fill the GPU twice over, but
// never fewer than kMinKeysPerSplit keys per split. Decided from the cache size
// S (reading the lengths would synchronise); a split covers fixed keys and
// splits past a row's length exit at once. (Scalar and mma_v1 kernels.)
int choose_splits(int64_t base_blocks, int64_t cache_size, int num_sms) {
  const int64_t by_length = std::max<int64_t>(1, cache_size / kMinKeysPerSplit);
  const int64_t by_occupancy = std::max<int64_t>(1, (2 * num_sms + base_blocks - 1) / base_blocks);
  return static_cast<int>(std::min<int64_t>({by_length, by_occupancy, kMaxSplits}));
}

// Splits of the staged kernel, which shares each block's real length out
// among them (none idles): at most one wave of blocks (`blocks_per_sm`
// resident per SM), since a second, partial wave costs more than it spreads and
// every split adds fp32 partial outputs (rows x D x 4 bytes, written and read
// again by the merge); and kMinKeysPerStagedSplit keys per split of a full cache.
int choose_staged_splits(int64_t base_blocks, int64_t cache_size, int blocks_per_sm, int num_sms) {
  const int64_t by_length = std::max<int64_t>(1, cache_size / kMinKeysPerStagedSplit);
  const int64_t by_occupancy = std::max<int64_t>(1, int64_t{blocks_per_sm} * num_sms / base_blocks);
  return static_cast<int>(std::min<int64_t>({by_length, by_occupancy, kMaxSplits}));
}

// Which kernel runs: for fp16/bf16, whenever 16-byte loads are legal (sm_80+,
// aligned pointers and strides), the staged tensor-core kernel, or the first
// tensor-core kernel where the staged one's shared memory does not fit; else
// the scalar one. JAKIRO_TREE_ATTENTION_KERNEL=scalar forces the scalar kernel;
// =mma_v1 picks the first tensor-core kernel wherever tensor cores can run (and
// the scalar one elsewhere), so tests and benchmarks can compare all three;
// =mma demands the staged kernel and raises if it cannot run. The variable also
// picks the CPU copy: its CPU values (avx512, avx2, portable) mean auto here.
enum class Kernel { kScalar, kMmaV1, kMma };

bool aligned_16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  for (int dim = 0; dim + 1 < t.dim(); ++dim) {
    if ((t.stride(dim) * t.element_size()) % 16 != 0) return false;
  }
  return true;
}

// Row groups of 16 per warp of the staged kernel: 2 (256 rows per block) when
// one group (128 rows) would not cover the packed rows. At D = 256 always 1:
// two groups' accumulators would not fit in registers.
int staged_row_groups(int64_t packed_rows, int64_t head_dim) {
  return packed_rows > staged_rows<1>() && head_dim <= 128 ? 2 : 1;
}

// Shared memory per block of each kernel at this head size.
struct SharedBytes {
  size_t scalar, mma_v1, staged;
};

SharedBytes shared_bytes_for(int64_t head_dim, int row_groups) {
  SharedBytes bytes{};
  with_head_dim(head_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    bytes = {shared_bytes<D>(), mma_shared_bytes<D>(),
             row_groups == 1 ? staged_shared_bytes<D, 1>() : staged_shared_bytes<D, 2>()};
  });
  return bytes;
}

Kernel choose_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t packed_rows) {
  const KernelEnv env = read_kernel_env("JAKIRO_TREE_ATTENTION_KERNEL");
  std::string wanted = env.value ? env.value : "auto";
  const bool cpu_value = wanted == "avx512" || wanted == "avx2" || wanted == "portable";
  JAKIRO_CHECK(wanted == "auto" || wanted == "scalar" || wanted == "mma" || wanted == "mma_v1" || cpu_value, kOp,
               "JAKIRO_TREE_ATTENTION_KERNEL must be auto, scalar, mma or mma_v1 (CUDA kernels) or avx512, avx2 or "
               "portable (CPU copies, auto on CUDA), got ", wanted);
  if (cpu_value) wanted = "auto";
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t head_dim = q.size(3);
  const bool compiled = head_dim_compiled(head_dim);  // else only the padded scalar kernel
  const bool mma_possible = compiled && q.scalar_type() != at::kFloat && props->major >= 8 && aligned_16(q) &&
                            aligned_16(k) && aligned_16(v);
  // e.g. sm_86/sm_89 allow 99 KB per block: too little for 256 rows at D = 128,
  // or for either tensor-core kernel at D = 256 (A100's 163 KB: mma_v1 only)
  const SharedBytes bytes = shared_bytes_for(head_dim, staged_row_groups(packed_rows, head_dim));
  const size_t available = props->sharedMemPerBlockOptin;
  const bool staged_fits = bytes.staged <= available, v1_fits = bytes.mma_v1 <= available;
  if (wanted == "mma") {
    JAKIRO_CHECK(compiled, kOp, "JAKIRO_TREE_ATTENTION_KERNEL=mma needs a head size of 64, 80, 96, 128 or 256, got ",
                 head_dim);
    JAKIRO_CHECK(mma_possible, kOp, "JAKIRO_TREE_ATTENTION_KERNEL=mma needs fp16/bf16 inputs on sm_80+ with "
                 "16-byte aligned pointers and strides");
    JAKIRO_CHECK(staged_fits, kOp, "JAKIRO_TREE_ATTENTION_KERNEL=mma needs more shared memory per block than "
                 "this GPU offers");
  }
  Kernel kind = Kernel::kMma;
  if (wanted == "scalar" || !mma_possible) {
    kind = Kernel::kScalar;
  } else if (wanted == "mma_v1" || !staged_fits) {
    kind = v1_fits ? Kernel::kMmaV1 : Kernel::kScalar;
  }
  JAKIRO_CHECK(kind != Kernel::kScalar || bytes.scalar <= available, kOp, "head_dim ", head_dim, " needs ",
               bytes.scalar, " bytes of shared memory per block, this GPU offers ", available);
  return kind;
}

template <typename scalar_t, int D, int RG>
void launch_staged(const Params<scalar_t>& p, const dim3& grid, cudaStream_t stream) {
  static_assert(RG == 1 || D <= 128, "two row groups only up to D = 128");
  constexpr size_t smem = staged_shared_bytes<D, RG>();
  auto kernel = tree_attention_mma_staged_kernel<scalar_t, D, RG>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, kStagedThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int D>
void launch(const Params<scalar_t>& p, int64_t batch, int64_t row_tiles, Kernel kernel_kind) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(batch * p.hkv), static_cast<unsigned>(row_tiles),
                  static_cast<unsigned>(p.num_splits));
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (kernel_kind == Kernel::kMma) {
      if constexpr (D > 128) {
        launch_staged<scalar_t, D, 1>(p, grid, stream);
      } else if (staged_row_groups(p.nq * p.group, D) == 1) {
        launch_staged<scalar_t, D, 1>(p, grid, stream);
      } else {
        launch_staged<scalar_t, D, 2>(p, grid, stream);
      }
    }
    if (kernel_kind == Kernel::kMmaV1) {
      constexpr size_t smem = mma_shared_bytes<D>();
      auto kernel = tree_attention_mma_kernel<scalar_t, D>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      kernel<<<grid, kMmaThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (kernel_kind == Kernel::kScalar) {
    constexpr size_t smem = shared_bytes<D>();
    auto kernel = tree_attention_kernel<scalar_t, D, false>;
    if constexpr (D == 64 || D == 128 || D == 256) {  // the sizes that serve smaller ones, padded
      if (p.head_dim != D) kernel = tree_attention_kernel<scalar_t, D, true>;
    }
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (p.num_splits > 1) {
    const int64_t total_rows = batch * p.hq * p.nq;
    const int64_t elements = total_rows * p.head_dim;
    const int threads = 256;
    merge_splits_kernel<scalar_t><<<static_cast<unsigned>((elements + threads - 1) / threads), threads, 0, stream>>>(
        p.partial_out, p.partial_lse, p.out, total_rows, p.head_dim, p.num_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seqlens,
         const at::Tensor& mask, int64_t tree_len, double scale, int64_t window, double softcap, at::Tensor& out) {
  const int64_t batch = q.size(0), hq = q.size(1), nq = q.size(2), head_dim = q.size(3);
  const int64_t hkv = k.size(1), cache_size = k.size(2), group = hq / hkv;
  const Kernel kernel_kind = choose_kernel(q, k, v, nq * group);
  const int row_groups = staged_row_groups(nq * group, head_dim);
  int64_t rows_per_block = head_dim > 128 ? scalar_rows<256>() : scalar_rows<128>();
  if (kernel_kind == Kernel::kMmaV1) rows_per_block = kMmaRows;
  if (kernel_kind == Kernel::kMma) rows_per_block = row_groups == 1 ? staged_rows<1>() : staged_rows<2>();
  const int64_t row_tiles = (nq * group + rows_per_block - 1) / rows_per_block;
  JAKIRO_CHECK(row_tiles <= kMaxGridYZ, kOp, "too many query rows: Nq * Hq / Hkv = ", nq * group,
               " exceeds the CUDA kernel's limit of ", kMaxGridYZ * rows_per_block);
  JAKIRO_CHECK(batch * hkv <= std::numeric_limits<int32_t>::max(), kOp, "B * Hkv = ", batch * hkv, " is too large");

  Params<scalar_t> p{};
  p.q = q.const_data_ptr<scalar_t>();
  p.k = k.const_data_ptr<scalar_t>();
  p.v = v.const_data_ptr<scalar_t>();
  for (int dim = 0; dim < 3; ++dim) {
    p.k_strides[dim] = k.stride(dim);
    p.v_strides[dim] = v.stride(dim);
  }
  p.seqlens = seqlens.const_data_ptr<int32_t>();
  p.has_mask = mask.defined();
  p.mask = p.has_mask ? reinterpret_cast<const uint32_t*>(mask.const_data_ptr<int32_t>()) : nullptr;
  p.mask_words = p.has_mask ? mask.size(2) : 0;
  p.out = out.mutable_data_ptr<scalar_t>();
  p.hq = hq;
  p.hkv = hkv;
  p.nq = nq;
  p.group = group;
  p.cache_size = cache_size;
  p.tree_len = tree_len;
  p.head_dim = static_cast<int>(head_dim);
  p.window = window;
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.softcap_log2 = static_cast<float>(softcap) * kLog2e;
  p.inv_softcap_log2 = softcap > 0 ? 1.f / p.softcap_log2 : 0.f;

  // Splits are whole numbers of the larger key tile, so neither kernel's
  // tiles straddle a split boundary without need. With a window, a block's
  // rows see at most window + max(Nq, tree_len) consecutive keys (from their
  // lowest first key), so splits share out that many instead of S.
  constexpr int64_t kSplitQuantum = std::max(kKeys, kMmaKeys);
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t span = window > 0 ? std::min(cache_size, window + std::max(nq, tree_len)) : cache_size;
  if (kernel_kind == Kernel::kMma) {
    // The staged kernel divides each block's real key count by num_splits on
    // the device (keys_per_split unused): the count alone is decided here.
    const int blocks_per_sm = staged_min_blocks(head_dim, row_groups);  // its __launch_bounds__
    p.num_splits = choose_staged_splits(batch * hkv * row_tiles, span, blocks_per_sm, num_sms);
    p.keys_per_split = 0;
  } else {
    p.num_splits = choose_splits(batch * hkv * row_tiles, span, num_sms);
    const int64_t per_split = (span + p.num_splits - 1) / p.num_splits;
    const int64_t rounded = (per_split + kSplitQuantum - 1) / kSplitQuantum * kSplitQuantum;
    p.keys_per_split = std::max<int64_t>(kSplitQuantum, rounded);
    p.num_splits = static_cast<int>(std::max<int64_t>(1, (span + p.keys_per_split - 1) / p.keys_per_split));
  }

  at::Tensor partial_out, partial_lse;
  if (p.num_splits > 1) {
    partial_out = at::empty({p.num_splits, batch * hq * nq, head_dim}, q.options().dtype(at::kFloat));
    partial_lse = at::empty({p.num_splits, batch * hq * nq}, q.options().dtype(at::kFloat));
    p.partial_out = partial_out.mutable_data_ptr<float>();
    p.partial_lse = partial_lse.mutable_data_ptr<float>();
  }
  with_head_dim(head_dim, [&](auto dim) { launch<scalar_t, decltype(dim)::value>(p, batch, row_tiles, kernel_kind); });
}

at::Tensor tree_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& seqlens_in, const std::optional<at::Tensor>& tree_mask,
                               int64_t tree_len, double scale, bool validate, int64_t window, double softcap) {
  check_tree_attention_args(q_in, k_cache, v_cache, seqlens_in, tree_mask, tree_len, scale, window, softcap);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor seqlens = seqlens_in.contiguous();
  const at::Tensor mask = tree_mask.has_value() ? tree_mask->contiguous() : at::Tensor();
  const int64_t cache_size = k_cache.size(2);

  // Reading the lengths synchronises; impossible (and skipped) under graph capture.
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  if (validate && !capturing && seqlens.numel() > 0) {
    const bool bad = seqlens.gt(cache_size).logical_or(seqlens.lt(tree_len)).any().item<bool>();
    if (bad) {
      check_tree_attention_seqlens(seqlens.cpu(), cache_size, tree_len);  // raises with the row
      TORCH_CHECK(false, kOp, ": a cache length is out of range but the CPU check did not find it");
    }
  }

  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(q, k_cache, v_cache, seqlens, mask, tree_len, scale, window, softcap, out); break;
    case at::kHalf: run<at::Half>(q, k_cache, v_cache, seqlens, mask, tree_len, scale, window, softcap, out); break;
    case at::kBFloat16: run<at::BFloat16>(q, k_cache, v_cache, seqlens, mask, tree_len, scale, window, softcap, out); break;
    default: JAKIRO_CHECK(false, kOp, "unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("tree_attention", &tree_attention_cuda); }

}  // namespace jakiro

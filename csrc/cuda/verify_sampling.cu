// CUDA kernel of verify_sampling (DESIGN.md 5.5); the arithmetic is defined in
// include/jakiro/accept.h and mirrored by the CPU kernel. One block per batch
// row walks its tree. At each visited node the block makes passes over the
// logits row (never storing probabilities): max/argmax; the top-k and top-p
// thresholds by a radix descent over the order key of s (four 8-bit rounds,
// histograms in shared memory); the surviving mass Z. The children are then
// tried in index order; when none is accepted, the next token is drawn by an
// inverse CDF in token order (per-thread segment sums, a block scan, then one
// thread walks the segment that holds the target).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "jakiro/accept_checks.h"
#include "jakiro/block_ops.cuh"

namespace jakiro {
namespace {

constexpr int kThreads = 512;

struct SamplingShared {
  BlockScratch scratch;
  int32_t hist_count[kRadixBuckets];
  double hist_mass[kRadixBuckets];
  double above_mass;
  int32_t above_count;
  uint32_t prefix;
  int64_t accepted;
  double rejected_mass;
};

// The target distribution of one node, identical in every thread.
template <typename T>
struct NodeDist {
  const T* row;
  float max_z, temperature;
  uint32_t threshold;  // x survives iff key(s(x)) >= threshold
  double z;            // surviving mass

  __device__ float s_of(float logit) const { return scaled_logit(logit, max_z, temperature); }
  __device__ static uint32_t key_of(float s) { return float_order_key(__float_as_uint(s)); }
  // Weight w(x) of a survivor, 0 otherwise.
  __device__ double kept_weight(float logit) const {
    const float s = s_of(logit);
    return key_of(s) >= threshold ? static_cast<double>(expf(s)) : 0.0;
  }
  __device__ double kept_weight_at(int64_t x) const { return kept_weight(load_as_float(row[x])); }
  __device__ double p_at(int64_t x) const { return kept_weight_at(x) / z; }
};

// Smallest key k with measure(eligible keys > k) < limit (see accept.h).
template <typename T, typename Measure, typename Weight>
__device__ uint32_t block_descend(const NodeDist<T>& dist, int64_t vocab, uint32_t eligible_from,
                                  Measure limit, Measure* hist, Measure* above_shared,
                                  SamplingShared& sh, Weight weight) {
  uint32_t prefix = 0;
  if (threadIdx.x == 0) *above_shared = Measure(0);
  for (int round = 0; round < 32 / kRadixBits; ++round) {
    const int shift = 32 - kRadixBits * (round + 1);
    for (int d = threadIdx.x; d < kRadixBuckets; d += blockDim.x) hist[d] = Measure(0);
    __syncthreads();
    for_each_in_row(dist.row, vocab, [&](int64_t, float logit) {
      const float s = dist.s_of(logit);
      const uint32_t key = NodeDist<T>::key_of(s);
      if (key < eligible_from) return;
      if (round > 0 && (key >> (shift + kRadixBits)) != (prefix >> (shift + kRadixBits))) return;
      atomicAdd(&hist[(key >> shift) & (kRadixBuckets - 1)], weight(s));
    });
    __syncthreads();
    if (threadIdx.x == 0) {
      Measure above = *above_shared;
      const int digit = pick_radix_digit(hist, above, limit);
      *above_shared = above;
      sh.prefix = prefix | (static_cast<uint32_t>(digit) << shift);
    }
    __syncthreads();
    prefix = sh.prefix;
  }
  __syncthreads();  // everyone has read sh.prefix before it is reused
  return prefix;
}

template <typename T>
__device__ double block_kept_mass(const NodeDist<T>& dist, int64_t vocab, BlockScratch& s) {
  double local = 0.0;
  for_each_in_row(dist.row, vocab, [&](int64_t, float logit) { local += dist.kept_weight(logit); });
  return block_sum(local, s);
}

// The children of `node` in index order, into children[]; returns how many.
__device__ int32_t block_collect_children(const int32_t* par, int64_t n, int64_t node, int32_t* children,
                                          BlockScratch& s) {
  int32_t count = 0;
  for (int64_t base = node + 1; base < n; base += blockDim.x) {
    const int64_t c = base + threadIdx.x;
    const int32_t flag = (c < n && par[c] == node) ? 1 : 0;
    int32_t total;
    const int32_t offset = block_exclusive_scan<int32_t>(flag, total, s.n);
    if (flag) children[count + offset] = static_cast<int32_t>(c);
    count += total;
  }
  __syncthreads();
  return count;
}

// Inverse-CDF draw in token order over weight(x) >= 0: the first x whose running
// sum exceeds target; if rounding leaves none, the last x of positive weight;
// if there is none, fallback.
template <typename Weight>
__device__ int64_t block_draw(int64_t vocab, double target, int64_t fallback, BlockScratch& s,
                              Weight weight) {
  const int64_t seg = (vocab + blockDim.x - 1) / blockDim.x;
  const int64_t lo = std::min<int64_t>(vocab, threadIdx.x * seg), hi = std::min<int64_t>(vocab, lo + seg);
  double local = 0.0;
  int64_t last_positive = -1;
  for (int64_t x = lo; x < hi; ++x) {
    const double r = weight(x);
    if (r > 0.0) last_positive = x;
    local += r;
  }
  double total;
  const double before = block_exclusive_scan<double>(local, total, s.d);
  const int64_t holder =
      block_extreme<false>(local > 0.0 && target < before + local ? threadIdx.x : INT64_MAX, s);
  if (holder == INT64_MAX) {
    const int64_t last = block_extreme<true>(last_positive, s);
    return last >= 0 ? last : fallback;
  }
  if (threadIdx.x == holder) {
    double running = before;
    int64_t pick = last_positive;
    for (int64_t x = lo; x < hi; ++x) {
      running += weight(x);
      if (running > target) {
        pick = x;
        break;
      }
    }
    s.i[0] = pick;
  }
  __syncthreads();
  const int64_t pick = s.i[0];
  __syncthreads();
  return pick;
}

__device__ __forceinline__ bool bit_is_set(const uint32_t* bits, int64_t x) {
  return (bits[x / 32] >> (x % 32)) & 1u;
}

template <typename T>
__device__ int64_t block_sampling_walk(const T* logits_b, const float* q_b, const float* unif,
                                       const int32_t* par, const int64_t* tok, int64_t n, int64_t vocab,
                                       float temperature, float top_p, int32_t top_k, int32_t* path,
                                       int64_t& len, int32_t* children, uint32_t* rejected,
                                       SamplingShared& sh) {
  const bool point_drafts = q_b == nullptr;
  if (point_drafts) {
    for (int64_t w = threadIdx.x; w < (vocab + 31) / 32; w += blockDim.x) rejected[w] = 0;
    __syncthreads();
  }
  int64_t node = 0;
  len = 0;
  while (true) {
    NodeDist<T> dist;
    dist.row = logits_b + node * vocab;
    dist.temperature = temperature;
    const int64_t argmax = block_row_argmax(dist.row, vocab, sh.scratch, &dist.max_z);
    dist.threshold = 0;
    if (top_k > 0 && top_k < vocab) {
      dist.threshold = block_descend<T, int32_t>(dist, vocab, 0u, top_k, sh.hist_count, &sh.above_count,
                                                 sh, [](float) { return int32_t{1}; });
    }
    dist.z = block_kept_mass(dist, vocab, sh.scratch);
    if (top_p < 1.0f) {
      const double limit = static_cast<double>(top_p) * dist.z;
      dist.threshold = block_descend<T, double>(dist, vocab, dist.threshold, limit, sh.hist_mass,
                                                &sh.above_mass, sh,
                                                [](float s) { return static_cast<double>(expf(s)); });
      dist.z = block_kept_mass(dist, vocab, sh.scratch);
    }
    const int32_t count = block_collect_children(par, n, node, children, sh.scratch);

    int64_t accepted = -1, token = -1;
    if (point_drafts) {
      // Thread 0 alone tries the children (scalar work), so the bitmap of
      // rejected tokens needs no synchronisation until the draw.
      if (threadIdx.x == 0) {
        double rejected_mass = 0.0;
        for (int32_t k = 0; k < count; ++k) {
          const int64_t c = children[k], x = tok[c];
          if (x < 0 || x >= vocab || bit_is_set(rejected, x)) continue;
          const double px = dist.kept_weight_at(x);
          if (accept_point_draft(unif[2 * c], px, dist.z - rejected_mass)) {
            accepted = c;
            break;
          }
          rejected_mass += px;
          rejected[x / 32] |= 1u << (x % 32);
        }
        sh.accepted = accepted;
        sh.rejected_mass = rejected_mass;
      }
      __syncthreads();
      accepted = sh.accepted;
      const double rejected_mass = sh.rejected_mass;
      __syncthreads();
      if (accepted < 0) {
        token = block_draw(vocab, static_cast<double>(unif[2 * node + 1]) * (dist.z - rejected_mass),
                           argmax, sh.scratch, [&](int64_t x) {
                             return bit_is_set(rejected, x) ? 0.0 : dist.kept_weight_at(x);
                           });
      } else if (threadIdx.x == 0) {
        for (int32_t k = 0; k < count; ++k) {  // clean the bitmap for the next node
          const int64_t x = tok[children[k]];
          if (x >= 0 && x < vocab) rejected[x / 32] &= ~(1u << (x % 32));
        }
      }
      __syncthreads();
    } else {
      // Every thread makes the same decisions (same inputs, same arithmetic);
      // each rejection costs one pass for the new residual sum.
      const float* q = q_b + node * vocab;
      double removed = 0.0, residual_sum = 1.0;
      for (int32_t k = 0; k < count; ++k) {
        const int64_t c = children[k], x = tok[c];
        const bool valid = x >= 0 && x < vocab;
        const double qx = valid ? static_cast<double>(q[x]) : 0.0;
        const double r = valid ? residual_weight(dist.p_at(x), qx, removed) : 0.0;
        if (accept_sampled_draft(unif[2 * c], r, qx, residual_sum)) {
          accepted = c;
          break;
        }
        removed += residual_sum;
        double local = 0.0;
        for_each_in_row(dist.row, vocab, [&](int64_t y, float logit) {
          local += residual_weight(dist.kept_weight(logit) / dist.z, static_cast<double>(q[y]), removed);
        });
        residual_sum = block_sum(local, sh.scratch);
      }
      if (accepted < 0) {
        token = block_draw(vocab, static_cast<double>(unif[2 * node + 1]) * residual_sum, argmax,
                           sh.scratch, [&](int64_t y) {
                             return residual_weight(dist.p_at(y), static_cast<double>(q[y]), removed);
                           });
      }
    }
    if (accepted < 0) return token;
    ++len;
    if (threadIdx.x == 0) path[len] = static_cast<int32_t>(accepted);
    node = accepted;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    verify_sampling_kernel(const T* __restrict__ logits, const int64_t* __restrict__ tokens,
                           const int32_t* __restrict__ parents, const float* __restrict__ uniforms,
                           const float* __restrict__ temperature, const float* __restrict__ top_p,
                           const int32_t* __restrict__ top_k, const float* __restrict__ draft_probs,
                           int64_t n, int64_t vocab, int32_t* __restrict__ accept_len,
                           int32_t* __restrict__ path, int64_t* __restrict__ next_token,
                           int32_t* __restrict__ error) {
  extern __shared__ uint32_t dynamic_smem[];
  __shared__ SamplingShared sh;
  int32_t* children = reinterpret_cast<int32_t*>(dynamic_smem);  // [n]
  uint32_t* rejected = dynamic_smem + n;                          // [ceil(V / 32)], point drafts only
  const int64_t b = blockIdx.x;
  const int32_t* par = parents + b * n;
  const int64_t* tok = tokens + b * n;
  int32_t* path_b = path + b * n;
  block_check_tree(par, tok, n, vocab, error);
  const float temp = temperature[b], tp = top_p[b];
  const int32_t tk = top_k[b];
  const bool settings_ok = isfinite(temp) && temp >= 0.0f && tp > 0.0f && tp <= 1.0f && tk >= 0;
  if (threadIdx.x == 0 && !settings_ok) atomicOr(error, kBadSampling);
  const T* logits_b = logits + b * n * vocab;
  int64_t len = 0, token;
  if (temp > 0.0f && settings_ok) {
    token = block_sampling_walk(logits_b, draft_probs ? draft_probs + b * n * vocab : nullptr,
                                uniforms + b * n * 2, par, tok, n, vocab, temp, tp, tk, path_b, len,
                                children, rejected, sh);
  } else {  // temperature 0: greedy (also the memory-safe path for flagged settings)
    token = block_greedy_walk(logits_b, par, tok, n, vocab, path_b, len, sh.scratch);
  }
  block_finish_path(path_b, n, len);
  if (threadIdx.x == 0) {
    accept_len[b] = static_cast<int32_t>(len);
    next_token[b] = token;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sampling_cuda(
    const at::Tensor& tokens_in, const at::Tensor& parents_in, const at::Tensor& logits_in,
    const at::Tensor& uniforms_in, const at::Tensor& temperature_in, const at::Tensor& top_p_in,
    const at::Tensor& top_k_in, const std::optional<at::Tensor>& draft_probs_in, bool validate) {
  constexpr const char* op = "verify_sampling";
  check_tree_and_logits(tokens_in, parents_in, logits_in, op);
  check_sampling_shapes(temperature_in, top_p_in, top_k_in, logits_in, op);
  check_uniforms_and_drafts(uniforms_in, draft_probs_in, logits_in, op);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), parents = parents_in.contiguous(),
                   logits = logits_in.contiguous(), uniforms = uniforms_in.contiguous(),
                   temperature = temperature_in.contiguous(), top_p = top_p_in.contiguous(),
                   top_k = top_k_in.contiguous();
  const at::Tensor draft_probs = draft_probs_in.has_value() ? draft_probs_in->contiguous() : at::Tensor();
  const int64_t batch = parents.size(0), n = parents.size(1), vocab = logits.size(2);
  at::Tensor accept_len = at::empty({batch}, parents.options());
  at::Tensor path = at::empty({batch, n}, parents.options());
  at::Tensor next_token = at::empty({batch}, tokens.options());
  if (batch == 0) return {accept_len, path, next_token};
  JAKIRO_CHECK(batch <= 2147483647, op, "batch size ", batch, " is too large");
  at::Tensor error = at::zeros({1}, parents.options());
  const size_t smem = sizeof(int32_t) * n + (draft_probs.defined() ? 0 : sizeof(uint32_t) * ((vocab + 31) / 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    const auto kernel = verify_sampling_kernel<scalar_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    kernel<<<static_cast<unsigned>(batch), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<scalar_t>(), tokens.const_data_ptr<int64_t>(),
        parents.const_data_ptr<int32_t>(), uniforms.const_data_ptr<float>(),
        temperature.const_data_ptr<float>(), top_p.const_data_ptr<float>(), top_k.const_data_ptr<int32_t>(),
        draft_probs.defined() ? draft_probs.const_data_ptr<float>() : nullptr, n, vocab,
        accept_len.mutable_data_ptr<int32_t>(), path.mutable_data_ptr<int32_t>(),
        next_token.mutable_data_ptr<int64_t>(), error.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  if (validate && !capturing && error.item<int32_t>() != 0) {
    check_parents_values(parents.cpu(), op);
    check_token_values(tokens.cpu(), vocab, op);
    check_sampling_values(temperature.cpu(), top_p.cpu(), top_k.cpu(), op);
    TORCH_CHECK(false, op, ": the CUDA kernel flagged an input error that the CPU checks did not find");
  }
  return {accept_len, path, next_token};
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("verify_sampling", &verify_sampling_cuda); }

}  // namespace jakiro

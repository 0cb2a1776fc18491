// CUDA kernels of verify_sampling (contract: docs/architecture.md); the arithmetic is defined in
// include/jakiro/verify.h and mirrored by the CPU kernel. A node's statistics
// take passes over its logits row (never storing probabilities): max/argmax;
// the top-k and top-p thresholds by a radix descent over the order key of s
// (four 8-bit rounds, histograms in shared memory); the surviving mass Z.
// Two kernels, one launch either way (verify_kernel_choice.h picks):
//  - walk: one block per batch row walks its tree, computing the statistics of
//    each node it visits;
//  - parallel: one block per (row, node) computes that node's statistics into a
//    scratch array; the last block of a row to finish walks the row with them.
// Both call the same block_node_stats, so they make identical decisions. At
// each node the walk tries the children in index order; when none is accepted,
// the next token is drawn by an inverse CDF in token order (per-thread segment
// sums, a block scan, then one thread walks the segment that holds the target).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "jakiro/verify_checks.h"
#include "jakiro/verify_kernel_choice.h"
#include "jakiro/block_ops.cuh"

namespace jakiro {
namespace {

constexpr int kThreads = 512;
// Dynamic shared memory a launch may use without opting in (48 KiB minus the
// static SamplingShared, rounded down).
constexpr size_t kDefaultDynamicSmem = 40 * 1024;

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

// A thread's last four histogram buckets, kept in registers: most keys of a
// round share a few digits (floats of similar magnitude), and adding them up
// here first spares the shared-memory atomics most of their contention.
template <typename Measure>
struct DigitCache {
  int d0 = -1, d1 = -1, d2 = -1, d3 = -1;
  Measure s0 = 0, s1 = 0, s2 = 0, s3 = 0;

  __device__ void add(int d, Measure w, Measure* hist) {
    if (d == d0) { s0 += w; return; }
    if (d == d1) { s1 += w; return; }
    if (d == d2) { s2 += w; return; }
    if (d == d3) { s3 += w; return; }
    if (d3 >= 0) atomicAdd(&hist[d3], s3);  // evict the oldest bucket
    d3 = d2, s3 = s2, d2 = d1, s2 = s1, d1 = d0, s1 = s0, d0 = d, s0 = w;
  }
  __device__ void flush(Measure* hist) {
    if (d0 >= 0) atomicAdd(&hist[d0], s0);
    if (d1 >= 0) atomicAdd(&hist[d1], s1);
    if (d2 >= 0) atomicAdd(&hist[d2], s2);
    if (d3 >= 0) atomicAdd(&hist[d3], s3);
  }
};

// Smallest key k with measure(eligible keys > k) < limit (see verify.h).
// kScaledLimit (top-p): the limit is `limit` times the eligible mass, which round
// 0 sums on the way. Those are the same terms in the same order as
// block_kept_mass's with threshold eligible_from (which adds only zeros
// besides), so the sum is the same double; fusing it saves a pass.
template <typename T, typename Measure, bool kScaledLimit = false, typename Weight>
__device__ uint32_t block_descend(const NodeDist<T>& dist, int64_t vocab, uint32_t eligible_from,
                                  Measure limit, Measure* hist, Measure* above_shared,
                                  SamplingShared& sh, Weight weight) {
  uint32_t prefix = 0;
  if (threadIdx.x == 0) *above_shared = Measure(0);
  for (int round = 0; round < 32 / kRadixBits; ++round) {
    const int shift = 32 - kRadixBits * (round + 1);
    for (int d = threadIdx.x; d < kRadixBuckets; d += blockDim.x) hist[d] = Measure(0);
    __syncthreads();
    DigitCache<Measure> cache;
    double local_mass = 0.0;  // kScaledLimit, round 0 only
    for_each_in_row(dist.row, vocab, [&](int64_t, float logit) {
      const float s = dist.s_of(logit);
      const uint32_t key = NodeDist<T>::key_of(s);
      if (key < eligible_from) return;
      if (round > 0 && (key >> (shift + kRadixBits)) != (prefix >> (shift + kRadixBits))) return;
      const Measure w = weight(s);
      if (kScaledLimit && round == 0) local_mass += w;
      cache.add(static_cast<int>((key >> shift) & (kRadixBuckets - 1)), w, hist);
    });
    cache.flush(hist);
    __syncthreads();
    if (kScaledLimit && round == 0) {  // uniform branch: block_sum has barriers
      limit = limit * block_sum(local_mass, sh.scratch);
    }
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

// What the walk needs of one node's target distribution (see NodeDist).
struct NodeStats {
  float max_z;
  uint32_t threshold;
  double z;
  int64_t argmax;
};

// ld.global.cg loads of statistics written by other blocks of this launch.
__device__ __forceinline__ NodeStats load_stats_cg(const NodeStats* p) {
  NodeStats st;
  st.max_z = __ldcg(&p->max_z);
  st.threshold = __ldcg(&p->threshold);
  st.z = __ldcg(&p->z);
  st.argmax = static_cast<int64_t>(__ldcg(reinterpret_cast<const long long*>(&p->argmax)));
  return st;
}

// The statistics of one node's row, identical in every thread. With
// sampling = false (temperature 0 or flagged settings) only the argmax is needed.
template <typename T>
__device__ NodeStats block_node_stats(const T* row, int64_t vocab, bool sampling, float temperature,
                                      float top_p, int32_t top_k, SamplingShared& sh) {
  NodeDist<T> dist;
  dist.row = row;
  dist.temperature = temperature;
  NodeStats st;
  st.argmax = block_row_argmax(row, vocab, sh.scratch, &dist.max_z);
  st.max_z = dist.max_z;
  st.threshold = 0;
  st.z = 0.0;
  if (!sampling) return st;
  dist.threshold = 0;
  if (top_k > 0 && top_k < vocab) {
    dist.threshold = block_descend<T, int32_t>(dist, vocab, 0u, top_k, sh.hist_count, &sh.above_count, sh,
                                               [](float) { return int32_t{1}; });
  }
  if (top_p < 1.0f) {
    // limit = top_p * Z_k, with Z_k (the mass after top-k) summed by the descent's first round.
    dist.threshold = block_descend<T, double, true>(dist, vocab, dist.threshold, static_cast<double>(top_p),
                                                    sh.hist_mass, &sh.above_mass, sh,
                                                    [](float s) { return static_cast<double>(expf(s)); });
  }
  dist.z = block_kept_mass(dist, vocab, sh.scratch);
  st.threshold = dist.threshold;
  st.z = dist.z;
  return st;
}

// The sampling walk of one row; stats_of(node) gives a node's NodeStats
// (computed on the spot, or read from precomputed statistics), identical in
// every thread.
template <typename T, typename StatsOf>
__device__ int64_t block_sampling_walk(StatsOf&& stats_of, const T* logits_b, const float* q_b, const float* unif,
                                       const int32_t* par, const int64_t* tok, int64_t n, int64_t vocab,
                                       float temperature, int32_t* path, int64_t& len, int32_t* children,
                                       uint32_t* rejected, SamplingShared& sh, int32_t* error) {
  const bool point_drafts = q_b == nullptr;
  if (point_drafts) {
    for (int64_t w = threadIdx.x; w < (vocab + 31) / 32; w += blockDim.x) rejected[w] = 0;
    __syncthreads();
  }
  int64_t node = 0;
  len = 0;
  while (true) {
    const NodeStats st = stats_of(node);
    if (!isfinite(st.max_z)) {  // no distribution (NaN, +inf, all -inf): flag it, stop here
      if (threadIdx.x == 0) atomicOr(error, kBadLogits);
      return st.argmax;
    }
    NodeDist<T> dist;
    dist.row = logits_b + node * vocab;
    dist.temperature = temperature;
    dist.max_z = st.max_z;
    dist.threshold = st.threshold;
    dist.z = st.z;
    const int64_t argmax = st.argmax;
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

// The kernels' arguments (one struct, so the two kernels cannot disagree).
template <typename T>
struct SamplingArgs {
  const T* logits;
  const int64_t* tokens;
  const int32_t* parents;
  const float* uniforms;
  const float* temperature;
  const float* top_p;
  const int32_t* top_k;
  const float* draft_probs;  // nullptr: point drafts
  int64_t n, vocab;
  int32_t* accept_len;
  int32_t* path;
  int64_t* next_token;
  int32_t* error;
  NodeStats* stats;    // parallel path: [B, N] scratch
  int32_t* arrivals;   // parallel path: [B] zeroed counters
};

// Whether a row with these settings samples (temperature > 0, legal settings).
__device__ __forceinline__ bool row_samples(float temp, float tp, int32_t tk) {
  return isfinite(temp) && temp > 0.0f && tp > 0.0f && tp <= 1.0f && tk >= 0;
}

// Walks row b (all threads of the block); stats_of(node) gives a node's statistics.
template <typename T, typename StatsOf>
__device__ void block_verify_row(const SamplingArgs<T>& a, int64_t b, StatsOf&& stats_of, int32_t* children,
                                 uint32_t* rejected, SamplingShared& sh) {
  const int64_t n = a.n, vocab = a.vocab;
  const int32_t* par = a.parents + b * n;
  const int64_t* tok = a.tokens + b * n;
  int32_t* path_b = a.path + b * n;
  block_check_tree(par, tok, n, vocab, a.error);
  const float temp = a.temperature[b], tp = a.top_p[b];
  const int32_t tk = a.top_k[b];
  const bool settings_ok = isfinite(temp) && temp >= 0.0f && tp > 0.0f && tp <= 1.0f && tk >= 0;
  if (threadIdx.x == 0 && !settings_ok) atomicOr(a.error, kBadSampling);
  const T* logits_b = a.logits + b * n * vocab;
  int64_t len = 0, token;
  if (row_samples(temp, tp, tk)) {
    token = block_sampling_walk(stats_of, logits_b, a.draft_probs ? a.draft_probs + b * n * vocab : nullptr,
                                a.uniforms + b * n * 2, par, tok, n, vocab, temp, path_b, len, children,
                                rejected, sh, a.error);
  } else {  // temperature 0: greedy (also the memory-safe path for flagged settings)
    token = block_greedy_walk([&](int64_t node) { return stats_of(node).argmax; }, par, tok, n, path_b, len,
                              sh.scratch);
  }
  block_finish_path(path_b, n, len);
  if (threadIdx.x == 0) {
    a.accept_len[b] = static_cast<int32_t>(len);
    a.next_token[b] = token;
  }
}

// Dynamic shared memory of both kernels: children [n], then the bitmap of
// rejected tokens [ceil(V / 32)] (point drafts only).
template <typename T>
__device__ __forceinline__ uint32_t* rejected_bitmap(uint32_t* smem, const SamplingArgs<T>& a) {
  return smem + a.n;
}

// Walk path: block b walks row b, computing each visited node's statistics.
template <typename T>
__global__ void __launch_bounds__(kThreads) verify_sampling_walk_kernel(const SamplingArgs<T> a) {
  extern __shared__ uint32_t dynamic_smem[];
  __shared__ SamplingShared sh;
  const int64_t b = blockIdx.x;
  const float temp = a.temperature[b], tp = a.top_p[b];
  const int32_t tk = a.top_k[b];
  const bool sampling = row_samples(temp, tp, tk);
  const T* logits_b = a.logits + b * a.n * a.vocab;
  block_verify_row(
      a, b,
      [&](int64_t node) {
        return block_node_stats(logits_b + node * a.vocab, a.vocab, sampling, temp, tp, tk, sh);
      },
      reinterpret_cast<int32_t*>(dynamic_smem), rejected_bitmap(dynamic_smem, a), sh);
}

// Parallel path: block (b * n + node) computes the statistics of row (b, node);
// the last of row b's n blocks to finish walks row b with them.
template <typename T>
__global__ void __launch_bounds__(kThreads) verify_sampling_parallel_kernel(const SamplingArgs<T> a) {
  extern __shared__ uint32_t dynamic_smem[];
  __shared__ SamplingShared sh;
  __shared__ int32_t is_last;
  const int64_t b = blockIdx.x / a.n, node = blockIdx.x % a.n;
  const float temp = a.temperature[b], tp = a.top_p[b];
  const int32_t tk = a.top_k[b];
  const NodeStats st = block_node_stats(a.logits + (b * a.n + node) * a.vocab, a.vocab,
                                        row_samples(temp, tp, tk), temp, tp, tk, sh);
  if (threadIdx.x == 0) a.stats[b * a.n + node] = st;
  if (!block_arrive_last(a.arrivals + b, a.n, &is_last)) return;  // uniform over the block
  const NodeStats* stats_b = a.stats + b * a.n;
  block_verify_row(
      a, b, [&](int64_t i) { return load_stats_cg(stats_b + i); }, reinterpret_cast<int32_t*>(dynamic_smem),
      rejected_bitmap(dynamic_smem, a), sh);
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
  const int64_t sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const VerifyKernel route = choose_verify_kernel(batch, n, sm_count, kSamplingParallelBlocksPerSm, op);
  const bool parallel = route == VerifyKernel::kParallel;
  // flags[0]: the error flags; flags[1 + b]: the parallel path's arrival count of row b.
  at::Tensor flags = at::zeros({parallel ? 1 + batch : 1}, parents.options());
  // The parallel path's NodeStats [B, N], as raw bytes (the allocator aligns to 512).
  at::Tensor stats = at::empty({parallel ? batch * n * static_cast<int64_t>(sizeof(NodeStats)) : 0},
                               parents.options().dtype(at::kByte));
  const size_t smem = sizeof(int32_t) * n + (draft_probs.defined() ? 0 : sizeof(uint32_t) * ((vocab + 31) / 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    SamplingArgs<scalar_t> args;
    args.logits = logits.const_data_ptr<scalar_t>();
    args.tokens = tokens.const_data_ptr<int64_t>();
    args.parents = parents.const_data_ptr<int32_t>();
    args.uniforms = uniforms.const_data_ptr<float>();
    args.temperature = temperature.const_data_ptr<float>();
    args.top_p = top_p.const_data_ptr<float>();
    args.top_k = top_k.const_data_ptr<int32_t>();
    args.draft_probs = draft_probs.defined() ? draft_probs.const_data_ptr<float>() : nullptr;
    args.n = n;
    args.vocab = vocab;
    args.accept_len = accept_len.mutable_data_ptr<int32_t>();
    args.path = path.mutable_data_ptr<int32_t>();
    args.next_token = next_token.mutable_data_ptr<int64_t>();
    args.error = flags.mutable_data_ptr<int32_t>();
    args.stats = parallel ? reinterpret_cast<NodeStats*>(stats.mutable_data_ptr<uint8_t>()) : nullptr;
    args.arrivals = parallel ? args.error + 1 : nullptr;
    const auto kernel = parallel ? verify_sampling_parallel_kernel<scalar_t> : verify_sampling_walk_kernel<scalar_t>;
    if (smem > kDefaultDynamicSmem) {  // large trees and vocabularies need the opt-in
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    const int64_t blocks = parallel ? batch * n : batch;
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const bool capturing = at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
  if (!validate || capturing) return {accept_len, path, next_token};
  // The uniforms are checked on the device and read back with the kernel's flags:
  // still one synchronisation.
  const at::Tensor uniforms_bad = uniforms.ge(0.0).logical_and_(uniforms.lt(1.0)).all().logical_not();
  const int32_t error = flags[0].add(uniforms_bad.to(at::kInt).mul_(static_cast<int>(kBadUniform))).item<int32_t>();
  if (error != 0) {
    check_parents_values(parents.cpu(), op);
    check_token_values(tokens.cpu(), vocab, op);
    check_sampling_values(temperature.cpu(), top_p.cpu(), top_k.cpu(), op);
    check_uniform_values(uniforms.cpu(), op);
    if (error & kBadLogits) {
      // A sampled row's walk stopped at its first visited node without a finite
      // maximum: path[b, accept_len[b]].
      const at::Tensor maxima = logits.amax(-1).to(at::kFloat).cpu().contiguous();
      const at::Tensor temp_cpu = temperature.cpu(), len_cpu = accept_len.cpu(), path_cpu = path.cpu().contiguous();
      for (int64_t b = 0; b < batch; ++b) {
        if (!(temp_cpu.const_data_ptr<float>()[b] > 0.0f)) continue;
        const int64_t node = path_cpu.const_data_ptr<int32_t>()[b * n + len_cpu.const_data_ptr<int32_t>()[b]];
        const float max_z = maxima.const_data_ptr<float>()[b * n + node];
        if (!std::isfinite(max_z)) fail_no_finite_max(b, node, max_z, op);
      }
    }
    TORCH_CHECK(false, op, ": the CUDA kernel flagged an input error that the CPU checks did not find");
  }
  return {accept_len, path, next_token};
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("verify_sampling", &verify_sampling_cuda); }

}  // namespace jakiro

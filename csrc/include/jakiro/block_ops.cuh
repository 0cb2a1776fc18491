// Block-cooperative device helpers of the acceptance kernels (one CUDA block
// per batch row): vectorised passes over a logits row, block reductions and
// scans built from warp shuffles, and the greedy tree walk. Every helper must
// be called by all threads of the block (they contain __syncthreads).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "jakiro/verify.h"

namespace jakiro {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Scratch shared by the reductions of one block (one slot per warp).
struct BlockScratch {
  double d[kWarp];
  int64_t i[kWarp];
  float f[kWarp];
  int32_t n[kWarp];
};

template <typename T>
__device__ __forceinline__ float load_as_float(const T& v) {
  return static_cast<float>(v);
}

// Calls f(index, value) for every element of row[0, n), spread over the block,
// with 16-byte loads for the aligned body of the row.
template <typename T, typename F>
__device__ __forceinline__ void for_each_in_row(const T* __restrict__ row, int64_t n, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  int64_t head = static_cast<int64_t>((16 - addr % 16) % 16) / static_cast<int64_t>(sizeof(T));
  if (addr % sizeof(T) != 0 || head > n) head = n;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) f(i, load_as_float(row[i]));
  const int64_t vectors = (n - head) / kVec;
  const uint4* body = reinterpret_cast<const uint4*>(row + head);
  for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
    const uint4 raw = __ldg(body + v);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(head + v * kVec + k, load_as_float(e[k]));
  }
  for (int64_t i = head + vectors * kVec + threadIdx.x; i < n; i += blockDim.x)
    f(i, load_as_float(row[i]));
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum over the block; every thread gets the result.
__device__ __forceinline__ double block_sum(double v, BlockScratch& s) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_sum(v);
  if (lane == 0) s.d[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double t = lane < warps ? s.d[lane] : 0.0;
    t = warp_sum(t);
    if (lane == 0) s.d[0] = t;
  }
  __syncthreads();
  const double total = s.d[0];
  __syncthreads();
  return total;
}

// Minimum (op = min) or maximum over the block of an int64; every thread gets it.
template <bool kMax>
__device__ __forceinline__ int64_t block_extreme(int64_t v, BlockScratch& s) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  const auto pick = [](int64_t a, int64_t b) { return kMax ? (a > b ? a : b) : (a < b ? a : b); };
  for (int o = kWarp / 2; o > 0; o /= 2) v = pick(v, __shfl_xor_sync(kFullMask, v, o));
  if (lane == 0) s.i[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int64_t t = lane < warps ? s.i[lane] : s.i[0];
    for (int o = kWarp / 2; o > 0; o /= 2) t = pick(t, __shfl_xor_sync(kFullMask, t, o));
    if (lane == 0) s.i[0] = t;
  }
  __syncthreads();
  const int64_t result = s.i[0];
  __syncthreads();
  return result;
}

// Argmax (verify.h's argmax_better order) over the block; every thread gets it.
__device__ __forceinline__ void block_argmax(float& v, int64_t& i, BlockScratch& s) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const float ov = __shfl_xor_sync(kFullMask, v, o);
    const int64_t oi = __shfl_xor_sync(kFullMask, i, o);
    if (argmax_better(ov, oi, v, i)) v = ov, i = oi;
  }
  if (lane == 0) s.f[warp] = v, s.i[warp] = i;
  __syncthreads();
  if (warp == 0) {
    float tv = lane < warps ? s.f[lane] : s.f[0];
    int64_t ti = lane < warps ? s.i[lane] : s.i[0];
    for (int o = kWarp / 2; o > 0; o /= 2) {
      const float ov = __shfl_xor_sync(kFullMask, tv, o);
      const int64_t oi = __shfl_xor_sync(kFullMask, ti, o);
      if (argmax_better(ov, oi, tv, ti)) tv = ov, ti = oi;
    }
    if (lane == 0) s.f[0] = tv, s.i[0] = ti;
  }
  __syncthreads();
  v = s.f[0];
  i = s.i[0];
  __syncthreads();
}

// Exclusive prefix sum over the block in thread order; `total` gets the sum.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T& total, T* warp_totals /* [32] */) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  T inclusive = v;
  for (int o = 1; o < kWarp; o *= 2) {
    const T up = __shfl_up_sync(kFullMask, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  if (lane == kWarp - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    T t = lane < warps ? warp_totals[lane] : T(0);
    for (int o = 1; o < kWarp; o *= 2) {
      const T up = __shfl_up_sync(kFullMask, t, o);
      if (lane >= o) t += up;
    }
    if (lane < warps) warp_totals[lane] = t;  // inclusive over warps
  }
  __syncthreads();
  const T warp_offset = warp == 0 ? T(0) : warp_totals[warp - 1];
  total = warp_totals[warps - 1];
  __syncthreads();
  return warp_offset + inclusive - v;
}

// Argmax of one logits row over the block (lowest index among equal maxima).
template <typename T>
__device__ __forceinline__ int64_t block_row_argmax(const T* row, int64_t vocab, BlockScratch& s,
                                                    float* max_value = nullptr) {
  float best = -__int_as_float(0x7f800000);  // -inf
  int64_t best_i = vocab;                     // loses to any element
  for_each_in_row(row, vocab, [&](int64_t x, float v) {
    if (best_i == vocab || argmax_better(v, x, best, best_i)) best = v, best_i = x;
  });
  // A thread that saw no element must lose every comparison.
  if (best_i == vocab) best = __int_as_float(0xff800000), best_i = INT64_MAX;
  block_argmax(best, best_i, s);
  if (max_value != nullptr) *max_value = best;
  return best_i < vocab ? best_i : 0;
}

// The lowest-index child of `node` whose token is `token`, or -1.
__device__ __forceinline__ int64_t block_find_child(const int32_t* par, const int64_t* tok, int64_t n,
                                                    int64_t node, int64_t token, BlockScratch& s) {
  int64_t found = INT64_MAX;
  for (int64_t c = node + 1 + threadIdx.x; c < n; c += blockDim.x)
    if (par[c] == node && tok[c] == token && c < found) found = c;
  found = block_extreme<false>(found, s);
  return found == INT64_MAX ? -1 : found;
}

// Greedy walk of one row (docs/architecture.md, verify_greedy): thread 0 writes path[1..accept_len];
// the caller fills the rest. argmax_of(node) gives the argmax of a node's row
// (computed on the spot, or read from precomputed statistics), identical in
// every thread. Returns the bonus token; sets `len`.
template <typename ArgmaxOf>
__device__ int64_t block_greedy_walk(ArgmaxOf&& argmax_of, const int32_t* par, const int64_t* tok, int64_t n,
                                     int32_t* path, int64_t& len, BlockScratch& s) {
  int64_t node = 0;
  len = 0;
  while (true) {
    const int64_t t = argmax_of(node);
    const int64_t child = block_find_child(par, tok, n, node, t, s);
    if (child < 0) return t;
    ++len;
    if (threadIdx.x == 0) path[len] = static_cast<int32_t>(child);
    node = child;
  }
}

// The greedy walk that computes the argmax of each visited row itself.
template <typename T>
__device__ int64_t block_greedy_walk(const T* logits_b, const int32_t* par, const int64_t* tok, int64_t n,
                                     int64_t vocab, int32_t* path, int64_t& len, BlockScratch& s) {
  return block_greedy_walk([&](int64_t node) { return block_row_argmax(logits_b + node * vocab, vocab, s); },
                           par, tok, n, path, len, s);
}

// "Last block done": every block of a group calls this once after writing its
// results to global memory; it returns true (in every thread) in exactly one
// block, the last to arrive, which may then read all the group's results
// (with ld.global.cg loads, past the non-coherent L1). `arrivals` must be 0
// before the launch (the host zeroes it per call, so CUDA-graph replays work).
__device__ __forceinline__ bool block_arrive_last(int32_t* arrivals, int64_t group_size, int32_t* flag_shared) {
  __threadfence();  // this thread's results are visible device-wide before the arrival
  __syncthreads();  // ... for every thread of the block
  if (threadIdx.x == 0) {
    const bool last = atomicAdd(arrivals, 1) == static_cast<int32_t>(group_size - 1);
    if (last) __threadfence();  // order the reads of the others' results after the count
    *flag_shared = last ? 1 : 0;
  }
  __syncthreads();
  return *flag_shared != 0;
}

// Flags illegal parents or token ids of one row (memory-safe either way).
__device__ __forceinline__ void block_check_tree(const int32_t* par, const int64_t* tok, int64_t n,
                                                 int64_t vocab, int32_t* error) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    if (!is_valid_parent(i, par[i])) atomicOr(error, kBadParent);
    if (tok[i] < 0 || tok[i] >= vocab) atomicOr(error, kBadToken);
  }
}

// Fills path[len + 1 .. n) with -1 (path[0..len] were written by the walk).
__device__ __forceinline__ void block_finish_path(int32_t* path, int64_t n, int64_t len) {
  for (int64_t j = len + 1 + threadIdx.x; j < n; j += blockDim.x) path[j] = -1;
  if (threadIdx.x == 0) path[0] = 0;
}

}  // namespace jakiro

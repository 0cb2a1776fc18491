// mma_stream_kernel: the tensor-core weight-streaming kernel for few positions
// per expert (draft decode, T <= 64), fp16/bf16, sm_80+ (mma.sync only).
//
// Same contract as stream_kernel (grouped_kernels.cuh): expert e owns positions
// [seg_begin[e], seg_end[e]) (clamped), position p reads source row src_rows[p]
// (or p), and the epilogue stores, applies the gated activation (SwiGLU or
// GeGLU) or combines into acc.
//
// A block owns 32 weight rows of one expert (gated: 16 gate rows and the
// matching 16 up rows) and ALL of the expert's positions (up to 8 * NT per
// pass), so each weight byte is read from memory once. The weights are the A
// operand of mma.sync m16n8k16 (two m16 tiles per warp) and the positions the
// N side (NT tiles of 8), so the math is never the limit. The 8 warps split K:
// warp w takes the 128-wide k stages w, w + 8, ..., issuing all 16 of its
// 16-byte weight loads of a stage before any math; partial sums meet in shared
// memory (atomicAdd) and the block applies the epilogue.
//
// Operand layout trick: the dot product does not care about the order of k, so
// lane (g = lane / 4, t = lane % 4) loads 8 consecutive elements [kb + 8t, +8)
// of its weight rows and of its position's source row with one 16-byte load
// each, and both the A and the B fragments of the two k16 steps of a 32-wide
// block kb read them in the same permuted order (step s: elements 4s .. 4s+3).
// Requires k % 8 == 0 and 16-byte aligned rows (can_vectorize).
#pragma once

#include <cstdint>

#include "jakiro/grouped_kernels.cuh"

namespace jakiro {
namespace grouped {

constexpr int kMmaWarps = 8;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kMmaBlockRows = 32;     // weight rows per block (two m16 tiles)
constexpr int kMmaBlocksPerStage = 4;  // 32-wide k blocks per stage
constexpr int kMmaStageK = 32 * kMmaBlocksPerStage;
constexpr int kMmaMaxPositions = 64;  // positions per pass at the largest NT (8)

// c += a (16x16, row major) * b (16x8, column major), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma_16816: fp16 or bf16 only");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host only launches this kernel on sm_80+
#endif
}

// 16 bytes from global memory through the read-only path; zeros when p is null.
__device__ __forceinline__ uint4 load16_or_zero(const void* p) {
  return p ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0u, 0u, 0u, 0u);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T, Epilogue EPI, int NT>
__global__ void __launch_bounds__(kMmaThreads) mma_stream_kernel(const GroupedParams<T> p) {
  constexpr int kPositions = 8 * NT;  // positions per pass
  constexpr bool kGated = is_gated(EPI);
  constexpr int kOutCols = kGated ? kMmaBlockRows / 2 : kMmaBlockRows;  // output columns per block
  // sums[i][j]: weight row i of the block (gated: gate rows 0..15, up rows 16..31) . position j.
  __shared__ float sums[kMmaBlockRows][kPositions + 1];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int e = blockIdx.y;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kOutCols;  // first output column
  int64_t begin, end;
  segment(p.seg_begin, p.seg_end, e, p.positions, begin, end);

  // This lane's weight rows: m-tile mt, half hf (row g or g + 8). Null past n.
  const T* w_row[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = 8 * hf + g;                          // row inside the m-tile
      const int64_t col = kGated ? n0 + r : n0 + 16 * mt + r;  // output column
      const int64_t row = kGated ? mt * static_cast<int64_t>(p.n) + col : col;
      w_row[mt][hf] = col < p.n ? p.w + (static_cast<int64_t>(e) * p.w_rows + row) * p.k : nullptr;
    }

  for (int64_t p0 = begin; p0 < end; p0 += kPositions) {  // block-uniform loop
    const int count = static_cast<int>(min(static_cast<int64_t>(kPositions), end - p0));
    // This lane's source row for n-tile j: position p0 + 8j + g. Null past the segment.
    const T* x_row[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int64_t pos = p0 + 8 * j + g;
      x_row[j] = nullptr;
      if (pos < end) x_row[j] = p.src + static_cast<int64_t>(p.src_rows ? p.src_rows[pos] : pos) * p.k;
    }

    __syncthreads();  // the previous pass's epilogue no longer reads sums
    for (int i = threadIdx.x; i < kMmaBlockRows * (kPositions + 1); i += kMmaThreads) (&sums[0][0])[i] = 0.f;
    __syncthreads();  // zeros visible before any warp adds to them

    float acc[2][NT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mt][j][q] = 0.f;

    for (int k_stage = warp * kMmaStageK; k_stage < p.k; k_stage += kMmaWarps * kMmaStageK) {
      // All weight loads of the stage first: 16 x 16 bytes in flight per lane.
      uint4 a[kMmaBlocksPerStage][2][2];
#pragma unroll
      for (int b = 0; b < kMmaBlocksPerStage; ++b) {
        const int kk = k_stage + 32 * b + 8 * t;  // k % 8 == 0: a pack is wholly in or out
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) a[b][mt][hf] = load16_or_zero(kk < p.k && w_row[mt][hf] ? w_row[mt][hf] + kk : nullptr);
      }
#pragma unroll
      for (int b = 0; b < kMmaBlocksPerStage; ++b) {
        const int kk = k_stage + 32 * b + 8 * t;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if (8 * j < count) {  // warp-uniform: mma.sync needs the whole warp
            const uint4 x = load16_or_zero(kk < p.k && x_row[j] ? x_row[j] + kk : nullptr);
#pragma unroll
            for (int s = 0; s < 2; ++s)
#pragma unroll
              for (int mt = 0; mt < 2; ++mt)
                mma_16816<T>(acc[mt][j], word(a[b][mt][0], 2 * s), word(a[b][mt][1], 2 * s),
                             word(a[b][mt][0], 2 * s + 1), word(a[b][mt][1], 2 * s + 1), word(x, 2 * s),
                             word(x, 2 * s + 1));
          }
        }
      }
    }

    // Accumulator (mt, j, q) is weight row 16 mt + g + 8 (q / 2), position 8 j + 2 t + q % 2.
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int pos = 8 * j + 2 * t + q % 2;
          if (pos < count) atomicAdd(&sums[16 * mt + g + 8 * (q / 2)][pos], acc[mt][j][q]);
        }
    __syncthreads();

    // Consecutive threads take consecutive output columns of one position.
    for (int i = threadIdx.x; i < kOutCols * count; i += kMmaThreads) {
      const int j = i / kOutCols, r = i % kOutCols;
      const int64_t col = n0 + r, pos = p0 + j;
      if (col >= p.n) continue;
      if constexpr (EPI == Epilogue::kStore) {
        p.out[pos * p.n + col] = from_float<T>(sums[r][j]);
      } else if constexpr (kGated) {
        p.out[pos * p.n + col] = from_float<T>(gate_activation<EPI>(sums[r][j]) * sums[kOutCols + r][j]);
      } else {
        // Blocks of other experts add to the same entries, hence the atomics.
        const int64_t tok = p.out_tokens[pos];
        const float v = sums[r][j];
        for (int h = 0; h < p.heads; ++h) {
          atomicAdd(&p.acc[(h * p.tokens + tok) * p.n + col], p.coeff[(tok * p.heads + h) * p.experts + e] * v);
        }
      }
    }
  }
}

// Whether mma_stream_kernel can run: fp16/bf16, 16-byte loads legal, and a grid
// of ceil(n / cols) x experts blocks launchable.
template <typename T>
inline bool mma_stream_supported(bool vectorized, int64_t experts, int device_major) {
  return !std::is_same_v<T, float> && vectorized && experts <= 65535 && device_major >= 8;
}

// max_positions: an upper bound on any expert's number of positions (picks NT;
// more positions are handled in further passes).
template <typename T, Epilogue EPI>
void launch_mma_stream(const GroupedParams<T>& p, int64_t max_positions, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return;  // mma_stream_supported rules fp32 out
  } else {
    constexpr int kOutCols = is_gated(EPI) ? kMmaBlockRows / 2 : kMmaBlockRows;
    const dim3 grid(static_cast<unsigned>((p.n + kOutCols - 1) / kOutCols), static_cast<unsigned>(p.experts));
    if (max_positions <= 8) {
      mma_stream_kernel<T, EPI, 1><<<grid, kMmaThreads, 0, stream>>>(p);
    } else if (max_positions <= 16) {
      mma_stream_kernel<T, EPI, 2><<<grid, kMmaThreads, 0, stream>>>(p);
    } else if (max_positions <= 32) {
      mma_stream_kernel<T, EPI, 4><<<grid, kMmaThreads, 0, stream>>>(p);
    } else {
      mma_stream_kernel<T, EPI, 8><<<grid, kMmaThreads, 0, stream>>>(p);
    }
  }
}

}  // namespace grouped
}  // namespace jakiro

// Torch-free CUDA kernels for products of expert weights with groups of rows,
// shared by grouped_gemm and expert_mlp (docs/architecture.md, expert_mlp and grouped_gemm).
//
// Expert e owns the row positions [seg_begin[e], seg_end[e]) (clamped into
// [0, positions), so illegal segments never reach out of bounds). Position p
// reads source row src_rows[p] (a gather) or p itself, and for every weight row
// n computes dot(w[e, n, :], src[row, :]) with fp32 accumulation. What happens
// to the dot products is the epilogue:
//   kStore   out[p, n] = dot
//   kSwiGLU  out[p, n] = silu(dot with w row n) * (dot with w row n + N)
//   kGeGLU   out[p, n] = gelu_tanh(dot with w row n) * (dot with w row n + N)
//   kCombine acc[r, t, n] += coeff[t, r, e] * dot for every head r, t = out_tokens[p]
// kSwiGLU and kGeGLU are the gated epilogues (two weight rows per output column).
//
// Two kernel families:
//   stream_kernel: few rows (decode). A warp owns one weight row (two when
//     gated), streams it with 16-byte loads once per tile of 8 or 32 positions, and
//     dots it with the tile's rows staged in shared memory chunk by chunk; the
//     weight loads of a chunk are issued before its barriers. Weight-bandwidth
//     bound.
//   tile_kernel: many rows (training, prefill). 64x64 output tiles, tensor
//     cores (WMMA) for fp16/bf16, a register-blocked SIMT loop for fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace jakiro {
namespace grouped {

enum class Epilogue { kStore, kSwiGLU, kGeGLU, kCombine };

// Whether the epilogue multiplies an activated gate row by an up row.
__host__ __device__ constexpr bool is_gated(Epilogue epi) {
  return epi == Epilogue::kSwiGLU || epi == Epilogue::kGeGLU;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

// The tanh-approximated GELU, 0.5 g (1 + tanh(u)) with u = sqrt(2/pi) (g + 0.044715 g^3),
// written as g * sigmoid(2u) (the same identity): one fast exponential, like silu.
__device__ __forceinline__ float gelu_tanh(float g) {
  constexpr float kTwoSqrtTwoOverPi = 1.5957691216057308f;  // 2 * sqrt(2 / pi)
  const float two_u = kTwoSqrtTwoOverPi * fmaf(0.044715f * g, g * g, g);
  return g / (1.0f + __expf(-two_u));
}

// The gate's activation of a gated epilogue.
template <Epilogue EPI>
__device__ __forceinline__ float gate_activation(float g) {
  static_assert(is_gated(EPI), "gate_activation: gated epilogues only");
  if constexpr (EPI == Epilogue::kGeGLU) {
    return gelu_tanh(g);
  } else {
    return silu(g);
  }
}

// VEC consecutive elements moved as one load (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

// Expert e's positions [begin, end), clamped into [0, positions).
__device__ __forceinline__ void segment(const int32_t* seg_begin, const int32_t* seg_end, int e,
                                        int64_t positions, int64_t& begin, int64_t& end) {
  begin = min(max(static_cast<int64_t>(seg_begin[e]), int64_t{0}), positions);
  end = min(max(static_cast<int64_t>(seg_end[e]), begin), positions);
}

template <typename T>
struct GroupedParams {
  const T* src;               // [source rows][k]
  const int32_t* src_rows;    // nullable: source row of each position
  const T* w;                 // [experts][w_rows][k]
  const int32_t* seg_begin;   // [experts]
  const int32_t* seg_end;     // [experts]
  int64_t positions;          // number of positions (bound of every segment)
  int64_t w_rows;             // rows per expert in w: n, or 2n for the gated epilogues
  int32_t experts, n, k;      // n output columns per position
  T* out;                     // kStore, kSwiGLU, kGeGLU: [positions][n]
  float* acc;                 // kCombine: [heads][tokens][n], fp32
  const float* coeff;         // kCombine: [tokens][heads][experts]
  const int32_t* out_tokens;  // kCombine: token of each position
  int32_t heads;              // kCombine
  int64_t tokens;             // kCombine
};

// ---------------------------------------------------------------------------
// stream_kernel
// ---------------------------------------------------------------------------
constexpr int kStreamWarps = 8;                    // weight rows per block
constexpr int kStreamThreads = kStreamWarps * 32;
constexpr int kStreamChunkBytes = 1024;            // bytes of one staged row chunk
// Positions per pass over the weights: a small tile when every expert has few
// positions (fewer registers, so more warps in flight), else 32.
constexpr int kStreamSmallTile = 8, kStreamLargeTile = 32;

template <typename T, int VEC, Epilogue EPI, int TILE>
__global__ void __launch_bounds__(kStreamThreads) stream_kernel(const GroupedParams<T> p) {
  static_assert(TILE <= 32, "lane j finishes position j of a tile");
  constexpr int kChunk = kStreamChunkBytes / sizeof(T);
  static_assert(kChunk % (32 * VEC) == 0, "a chunk is whole packs for every lane");
  constexpr int kPacksPerLane = kChunk / (32 * VEC);
  constexpr int kRowsPerWarp = is_gated(EPI) ? 2 : 1;
  __shared__ __align__(16) T tile[TILE][kChunk];
  __shared__ int32_t tile_rows[TILE];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kStreamWarps + warp;  // weight row n
  const bool has_col = col < p.n;

  for (int e = 0; e < p.experts; ++e) {
    int64_t begin, end;
    segment(p.seg_begin, p.seg_end, e, p.positions, begin, end);
    const T* w_rows[kRowsPerWarp];
    for (int q = 0; q < kRowsPerWarp; ++q) {
      w_rows[q] = p.w + (static_cast<int64_t>(e) * p.w_rows + col + q * p.n) * p.k;
    }
    for (int64_t p0 = begin; p0 < end; p0 += TILE) {
      const int count = static_cast<int>(min(static_cast<int64_t>(TILE), end - p0));
      float dot[kRowsPerWarp][TILE];
#pragma unroll
      for (int q = 0; q < kRowsPerWarp; ++q)
#pragma unroll
        for (int j = 0; j < TILE; ++j) dot[q][j] = 0.f;

      __syncthreads();  // the previous tile's source rows are no longer read
      if (threadIdx.x < TILE) {
        const int64_t pos = p0 + threadIdx.x;
        tile_rows[threadIdx.x] = pos < end ? (p.src_rows ? p.src_rows[pos] : static_cast<int32_t>(pos)) : 0;
      }

      for (int k0 = 0; k0 < p.k; k0 += kChunk) {
        const int width = min(kChunk, p.k - k0);  // a multiple of VEC (k is)
        // Issue this chunk's weight loads first: they do not depend on the staged
        // tile, so their latency overlaps the barriers and the staging below.
        Pack<T, VEC> wp[kRowsPerWarp][kPacksPerLane];
        if (has_col) {
#pragma unroll
          for (int i = 0; i < kPacksPerLane; ++i) {
            const int c = (i * 32 + lane) * VEC;
            if (c < width) {
#pragma unroll
              for (int q = 0; q < kRowsPerWarp; ++q) wp[q][i] = load_pack<T, VEC>(w_rows[q] + k0 + c);
            }
          }
        }
        __syncthreads();  // the previous chunk is no longer read; tile_rows is visible
        const int packs = width / VEC;
        for (int i = threadIdx.x; i < count * packs; i += kStreamThreads) {
          const int j = i / packs, c = (i % packs) * VEC;
          store_pack<T, VEC>(&tile[j][c], load_pack<T, VEC>(p.src + static_cast<int64_t>(tile_rows[j]) * p.k + k0 + c));
        }
        __syncthreads();
        if (has_col) {
#pragma unroll
          for (int i = 0; i < kPacksPerLane; ++i) {
            const int c = (i * 32 + lane) * VEC;
            if (c < width) {
              float w[kRowsPerWarp][VEC];
#pragma unroll
              for (int q = 0; q < kRowsPerWarp; ++q)
#pragma unroll
                for (int v = 0; v < VEC; ++v) w[q][v] = to_float(wp[q][i].v[v]);
#pragma unroll
              for (int j = 0; j < TILE; ++j) {
                if (j < count) {
                  const Pack<T, VEC> xp = load_pack<T, VEC>(&tile[j][c]);
#pragma unroll
                  for (int v = 0; v < VEC; ++v) {
                    const float xv = to_float(xp.v[v]);
#pragma unroll
                    for (int q = 0; q < kRowsPerWarp; ++q) dot[q][j] = fmaf(w[q][v], xv, dot[q][j]);
                  }
                }
              }
            }
          }
        }
      }

      // Sum the lanes' partial dots; afterwards every lane holds every total and
      // lane j finishes position p0 + j.
      float mine[kRowsPerWarp] = {};
#pragma unroll
      for (int q = 0; q < kRowsPerWarp; ++q)
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
          if (j < count) {  // warp-uniform, so the shuffles stay converged
            float s = dot[q][j];
#pragma unroll
            for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
            if (lane == j) mine[q] = s;
          }
        }
      if (has_col && lane < count) {
        const int64_t pos = p0 + lane;
        if constexpr (EPI == Epilogue::kStore) {
          p.out[pos * p.n + col] = from_float<T>(mine[0]);
        } else if constexpr (is_gated(EPI)) {
          p.out[pos * p.n + col] = from_float<T>(gate_activation<EPI>(mine[0]) * mine[kRowsPerWarp - 1]);
        } else {
          // This warp alone owns column col of acc, so the read-modify-write needs no atomics.
          const int64_t t = p.out_tokens[pos];
          for (int r = 0; r < p.heads; ++r) {
            const float c = p.coeff[(t * p.heads + r) * p.experts + e];
            p.acc[(r * p.tokens + t) * p.n + col] += c * mine[0];
          }
        }
      }
      // Another lane may update the same acc entries for the next expert.
      __syncwarp();
    }
  }
}

// ---------------------------------------------------------------------------
// tile_kernel
// ---------------------------------------------------------------------------
constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kTileThreads = 128;

template <typename T>
constexpr bool kUseTensorCores = !std::is_same_v<T, float>;

// Row pitch (elements) of the staged tiles. WMMA wants a multiple of 8 (16-bit
// types); the fp32 SIMT loop wants an odd pitch so threads hit distinct banks.
template <typename T>
constexpr int kTilePitch = kUseTensorCores<T> ? kTileK + 8 : kTileK + 1;
constexpr int kAccPitch = kTileN + 4;

template <typename T, bool GATED>
constexpr int tile_smem_bytes() {
  constexpr int halves = GATED ? 2 : 1;
  constexpr int staged = (kTileM + halves * kTileN) * kTilePitch<T> * static_cast<int>(sizeof(T));
  constexpr int results = halves * kTileM * kAccPitch * static_cast<int>(sizeof(float));
  return staged > results ? staged : results;
}

// Copies rows [0, rows) x columns [k0, k0 + kTileK) of a row-major matrix into a
// staged tile; rows past `rows` and columns past k are zero.
template <typename T, int VEC, typename RowPtr>
__device__ __forceinline__ void stage_tile(T* dst, int tile_rows, int rows, RowPtr row_ptr, int k0, int k) {
  constexpr int kPacks = kTileK / VEC;
  for (int i = threadIdx.x; i < tile_rows * kPacks; i += kTileThreads) {
    const int r = i / kPacks, c = (i % kPacks) * VEC;
    Pack<T, VEC> v;
    if (r < rows && k0 + c < k) {
      v = load_pack<T, VEC>(row_ptr(r) + k0 + c);  // k is a multiple of VEC
    } else {
#pragma unroll
      for (int q = 0; q < VEC; ++q) v.v[q] = from_float<T>(0.f);
    }
    if constexpr ((kTilePitch<T> * sizeof(T)) % (VEC * sizeof(T)) == 0) {
      store_pack<T, VEC>(dst + r * kTilePitch<T> + c, v);  // the staged row keeps the pack's alignment
    } else {
#pragma unroll
      for (int q = 0; q < VEC; ++q) dst[r * kTilePitch<T> + c + q] = v.v[q];
    }
  }
}

// EPI: kStore, or a gated epilogue (kSwiGLU, kGeGLU).
template <typename T, int VEC, Epilogue EPI>
__global__ void __launch_bounds__(kTileThreads) tile_kernel(const GroupedParams<T> p) {
  static_assert(EPI != Epilogue::kCombine, "tile_kernel: store or gated epilogues only");
  constexpr bool kGated = is_gated(EPI);
  constexpr int halves = kGated ? 2 : 1;
  __shared__ __align__(128) unsigned char smem[tile_smem_bytes<T, kGated>()];
  T* a_tile = reinterpret_cast<T*>(smem);
  T* b_tile = a_tile + kTileM * kTilePitch<T>;  // halves x [kTileN][pitch]
  float* results = reinterpret_cast<float*>(smem);  // reused after the main loop

  // Which expert and which of its row tiles this block computes.
  int64_t tile = blockIdx.x, begin = 0, end = 0;
  int expert = -1;
  for (int e = 0; e < p.experts; ++e) {
    segment(p.seg_begin, p.seg_end, e, p.positions, begin, end);
    const int64_t tiles = (end - begin + kTileM - 1) / kTileM;
    if (tile < tiles) {
      expert = e;
      break;
    }
    tile -= tiles;
  }
  if (expert < 0) return;  // the grid is sized for the worst case
  const int64_t p0 = begin + tile * kTileM;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kTileM), end - p0));
  const int n0 = blockIdx.y * kTileN;
  const int cols = min(kTileN, p.n - n0);
  const T* w_expert = p.w + static_cast<int64_t>(expert) * p.w_rows * p.k;

  auto src_row = [&](int r) {
    const int64_t pos = p0 + r;
    const int64_t row = p.src_rows ? p.src_rows[pos] : pos;
    return p.src + row * p.k;
  };

  using namespace nvcuda;
  const int warp = threadIdx.x / 32;
  // Tensor cores: warp w computes the 32x32 quadrant (w / 2, w % 2) as 2x2 16x16 fragments.
  using AccFragment = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  [[maybe_unused]] AccFragment acc_tc[halves][2][2];
  // SIMT: thread (ty, tx) computes rows ty + 8i and columns tx + 16j.
  constexpr int kRowsPerThread = kTileM / 8, kColsPerThread = kTileN / 16;
  [[maybe_unused]] float acc_simt[halves][kRowsPerThread][kColsPerThread];
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  if constexpr (kUseTensorCores<T>) {
    for (int h = 0; h < halves; ++h)
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc_tc[h][i][j], 0.f);
  } else {
    for (int h = 0; h < halves; ++h)
      for (int i = 0; i < kRowsPerThread; ++i)
        for (int j = 0; j < kColsPerThread; ++j) acc_simt[h][i][j] = 0.f;
  }

  for (int k0 = 0; k0 < p.k; k0 += kTileK) {
    __syncthreads();  // the previous k-step's tiles are no longer read
    stage_tile<T, VEC>(a_tile, kTileM, rows, src_row, k0, p.k);
    for (int h = 0; h < halves; ++h) {
      const T* w_half = w_expert + (static_cast<int64_t>(h) * p.n + n0) * p.k;
      stage_tile<T, VEC>(b_tile + h * kTileN * kTilePitch<T>, kTileN, cols,
                         [&](int r) { return w_half + static_cast<int64_t>(r) * p.k; }, k0, p.k);
    }
    __syncthreads();
    if constexpr (kUseTensorCores<T>) {
      const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
#pragma unroll
      for (int kk = 0; kk < kTileK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag[2];
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(a_frag[i], a_tile + (wr + 16 * i) * kTilePitch<T> + kk, kTilePitch<T>);
        for (int h = 0; h < halves; ++h) {
          for (int j = 0; j < 2; ++j) {
            // The weight tile is [n][k]: column-major as the k x n right operand.
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag;
            wmma::load_matrix_sync(b_frag, b_tile + (h * kTileN + wc + 16 * j) * kTilePitch<T> + kk,
                                   kTilePitch<T>);
            for (int i = 0; i < 2; ++i) wmma::mma_sync(acc_tc[h][i][j], a_frag[i], b_frag, acc_tc[h][i][j]);
          }
        }
      }
    } else {
#pragma unroll 4
      for (int kk = 0; kk < kTileK; ++kk) {
        float a[kRowsPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) a[i] = to_float(a_tile[(ty + 8 * i) * kTilePitch<T> + kk]);
#pragma unroll
        for (int h = 0; h < halves; ++h)
#pragma unroll
          for (int j = 0; j < kColsPerThread; ++j) {
            const float b = to_float(b_tile[(h * kTileN + tx + 16 * j) * kTilePitch<T> + kk]);
#pragma unroll
            for (int i = 0; i < kRowsPerThread; ++i) acc_simt[h][i][j] = fmaf(a[i], b, acc_simt[h][i][j]);
          }
      }
    }
  }

  __syncthreads();  // the staged tiles become the results buffer
  for (int h = 0; h < halves; ++h) {
    float* res = results + h * kTileM * kAccPitch;
    if constexpr (kUseTensorCores<T>) {
      const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
          wmma::store_matrix_sync(res + (wr + 16 * i) * kAccPitch + wc + 16 * j, acc_tc[h][i][j], kAccPitch,
                                  wmma::mem_row_major);
    } else {
      for (int i = 0; i < kRowsPerThread; ++i)
        for (int j = 0; j < kColsPerThread; ++j) res[(ty + 8 * i) * kAccPitch + tx + 16 * j] = acc_simt[h][i][j];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTileM * kTileN; i += kTileThreads) {
    const int r = i / kTileN, c = i % kTileN;
    if (r >= rows || c >= cols) continue;
    float v = results[r * kAccPitch + c];
    if constexpr (kGated) v = gate_activation<EPI>(v) * results[kTileM * kAccPitch + r * kAccPitch + c];
    p.out[(p0 + r) * p.n + n0 + c] = from_float<T>(v);
  }
}

}  // namespace grouped
}  // namespace jakiro

namespace jakiro {
namespace grouped {

// Whether 16-byte loads are legal: every row starts 16-byte aligned.
template <typename T>
inline bool can_vectorize(int64_t row_length, std::initializer_list<const void*> bases) {
  constexpr int kVec = 16 / sizeof(T);
  if (row_length % kVec != 0) return false;
  for (const void* b : bases) {
    if (reinterpret_cast<uintptr_t>(b) % 16 != 0) return false;
  }
  return true;
}

// max_positions: an upper bound on any expert's number of positions.
template <typename T, Epilogue EPI>
void launch_stream(const GroupedParams<T>& p, bool vectorized, int64_t max_positions, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.n + kStreamWarps - 1) / kStreamWarps));
  constexpr int kVec = 16 / sizeof(T);
  if (max_positions <= kStreamSmallTile) {
    if (vectorized) {
      stream_kernel<T, kVec, EPI, kStreamSmallTile><<<grid, kStreamThreads, 0, stream>>>(p);
    } else {
      stream_kernel<T, 1, EPI, kStreamSmallTile><<<grid, kStreamThreads, 0, stream>>>(p);
    }
  } else if (vectorized) {
    stream_kernel<T, kVec, EPI, kStreamLargeTile><<<grid, kStreamThreads, 0, stream>>>(p);
  } else {
    stream_kernel<T, 1, EPI, kStreamLargeTile><<<grid, kStreamThreads, 0, stream>>>(p);
  }
}

// max_row_tiles: an upper bound on the number of kTileM-row tiles over all experts.
// EPI: kStore, kSwiGLU or kGeGLU.
template <typename T, Epilogue EPI>
void launch_tile(const GroupedParams<T>& p, bool vectorized, int64_t max_row_tiles, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(max_row_tiles), static_cast<unsigned>((p.n + kTileN - 1) / kTileN));
  if (vectorized) {
    tile_kernel<T, 16 / sizeof(T), EPI><<<grid, kTileThreads, 0, stream>>>(p);
  } else {
    tile_kernel<T, 1, EPI><<<grid, kTileThreads, 0, stream>>>(p);
  }
}

}  // namespace grouped
}  // namespace jakiro

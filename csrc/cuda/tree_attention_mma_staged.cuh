// Staged tensor-core path of tree_attention (the default for fp16/bf16 on
// sm_80+); included by tree_attention.cu after tree_attention_mma.cuh, whose
// MmaType, quad reductions and shared row stride it reuses.
//
// Why a second MMA kernel: the first one (tree_attention_mma.cuh, "mma_v1")
// covers 64 packed query rows per block, so a KV head whose G * Nq rows span
// several 64-row tiles has its keys read once per tile, and its loads stall
// the tensor cores. Here one block of 8 warps covers up to 16 * 8 * RG packed
// rows (RG row groups of 16 per warp: 128 or 256 rows), so the K/V tiles are
// read from global memory once per (batch row, KV head) whenever G * Nq <= 256.
// K and V tiles of kStagedKeys keys stream in through a ring of kStagedStages
// shared-memory stages with cp.async: tiles t + 1 and t + 2 are in flight while
// tile t is multiplied. Fragments come from shared memory
// through ldmatrix (V with .trans, so V needs no transposing copy).
//
// The keys of a block are split over gridDim.z by the real length on the
// device: split z takes the z-th share, in whole tiles, of the keys the block's
// rows see; the host sizes the number of splits from S without reading the
// lengths. Splits are merged by merge_splits_kernel as for the other kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace jakiro {
namespace {

constexpr int kStagedWarps = 8;
constexpr int kStagedThreads = 32 * kStagedWarps;
constexpr int kStagedKeys = 32;  // keys per pipeline stage
constexpr int kStagedStages = 3;  // tiles in the cp.async ring

// Packed query rows one block covers with RG row groups of 16 per warp.
template <int RG>
constexpr int staged_rows() { return 16 * kStagedWarps * RG; }

// Blocks per SM the kernel is built for (its __launch_bounds__): two leave
// 128 registers per thread, enough for one row group's accumulators up to D = 128.
constexpr int staged_min_blocks(int64_t head_dim, int row_groups) { return row_groups == 1 && head_dim <= 128 ? 2 : 1; }

template <int D, int RG>
constexpr size_t staged_shared_bytes() {
  // row ranges (3 x int64 per row), Q [rows][stride], then K and V per stage [keys][stride]
  return 3 * staged_rows<RG>() * sizeof(int64_t) +
         sizeof(uint16_t) * (staged_rows<RG>() + kStagedStages * 2 * kStagedKeys) * mma_row_stride<D>();
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; `valid` false writes zeros
// (source size 0: nothing is read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `Pending` of this thread's committed groups are in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p))
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p))
               : "memory");
}

template <typename scalar_t, int D, int RG>
__global__ void __launch_bounds__(kStagedThreads, staged_min_blocks(D, RG))
    tree_attention_mma_staged_kernel(const Params<scalar_t> p) {
  constexpr int kStride = mma_row_stride<D>();  // halves; 16-byte multiple, rows 16 bytes apart in banks
  constexpr int kChunks = D / 8;                // 16-byte chunks per row
  constexpr int kRowsPerBlock = staged_rows<RG>();
  constexpr int kTileHalves = kStagedKeys * kStride;  // one K (or V) tile
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* s_dense_end = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* s_visible_end = s_dense_end + kRowsPerBlock;
  int64_t* s_begin = s_visible_end + kRowsPerBlock;
  uint16_t* s_q = reinterpret_cast<uint16_t*>(s_begin + kRowsPerBlock);  // [kRowsPerBlock][kStride]
  uint16_t* s_kv = s_q + kRowsPerBlock * kStride;  // stage st: K at 2 st, V at 2 st + 1 (in tiles)

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int group = lane / 4, tig = lane % 4;
  const int64_t b = blockIdx.x / p.hkv, hkv = blockIdx.x % p.hkv;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock;
  const int split = blockIdx.z;
  const int64_t packed_rows = p.nq * p.group;
  const int64_t kv_len = clamped_kv_len(p.seqlens[b], p.cache_size);
  const int64_t tree_start = query_key_range(kv_len, p.tree_len, true, p.nq, 0).dense_end;

  for (int c = tid; c < kRowsPerBlock * kChunks; c += kStagedThreads) {
    const int r = c / kChunks, d0 = (c % kChunks) * 8;
    const int64_t row = row0 + r;
    uint4 chunk = make_uint4(0, 0, 0, 0);
    if (row < packed_rows) {
      const int64_t i = row / p.group, h = hkv * p.group + row % p.group;
      chunk = *reinterpret_cast<const uint4*>(p.q + ((b * p.hq + h) * p.nq + i) * D + d0);
    }
    *reinterpret_cast<uint4*>(s_q + r * kStride + d0) = chunk;
  }
  for (int r = tid; r < kRowsPerBlock; r += kStagedThreads) {
    const QueryKeyRange range = packed_row_range(p, b, row0 + r, kv_len);
    s_dense_end[r] = range.dense_end;
    s_visible_end[r] = range.visible_end;
    s_begin[r] = range.begin;
  }
  __syncthreads();

  // Keys this block's rows see: from the lowest window begin (0 without a
  // window) to the last visible end; every real row sees every key in
  // [highest begin, lowest dense_end).
  int64_t block_end = 0, block_dense_end = std::numeric_limits<int64_t>::max();
  int64_t block_begin = std::numeric_limits<int64_t>::max(), block_begin_max = 0;
  for (int r = 0; r < kRowsPerBlock; ++r) {
    block_end = max(block_end, s_visible_end[r]);
    if (row0 + r < packed_rows) {
      block_dense_end = min(block_dense_end, s_dense_end[r]);
      block_begin = min(block_begin, s_begin[r]);
      block_begin_max = max(block_begin_max, s_begin[r]);
    }
  }
  // This split's share of [first, block_end), in whole tiles from a tile boundary.
  const int64_t first = block_begin / kStagedKeys * kStagedKeys;
  const int64_t tiles_total = block_end > first ? (block_end - first + kStagedKeys - 1) / kStagedKeys : 0;
  const int64_t tiles_per_split = (tiles_total + p.num_splits - 1) / p.num_splits;
  const int64_t begin = first + split * tiles_per_split * kStagedKeys;
  const int64_t end = min(begin + tiles_per_split * kStagedKeys, block_end);
  const int64_t num_tiles = end > begin ? (end - begin + kStagedKeys - 1) / kStagedKeys : 0;
  // Tiles [fast_lo, fast_hi) lie inside [block_begin_max, min(end, block_dense_end)):
  // every real row sees all their keys, so they skip the per-key test (as tile
  // numbers, two registers instead of three 64-bit bounds: the kernel is short of them).
  const int64_t fast_end = min(end, block_dense_end);
  const int fast_lo = static_cast<int>(
      min(num_tiles, block_begin_max > begin ? (block_begin_max - begin + kStagedKeys - 1) / kStagedKeys : 0));
  const int fast_hi = static_cast<int>(min(num_tiles, fast_end > begin ? (fast_end - begin) / kStagedKeys : 0));

  // Row group rg of this warp holds local rows (warp + kStagedWarps * rg) * 16 + [0, 16);
  // the thread's two rows in it are group and group + 8 (local_row). Groups
  // wholly past the real rows are skipped (the condition is uniform over the
  // warp). The rows' key ranges stay in shared memory: registers are scarce.
  auto local_row = [&](int rg, int h) { return (warp + kStagedWarps * rg) * 16 + group + 8 * h; };
  bool active[RG];
  float row_max[RG][2], row_sum[RG][2];  // row_sum: this thread's keys only
  float o[RG][D / 8][4];
#pragma unroll
  for (int rg = 0; rg < RG; ++rg) {
    active[rg] = row0 + (warp + kStagedWarps * rg) * 16 < packed_rows;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_max[rg][h] = -INFINITY;
      row_sum[rg][h] = 0.f;
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[rg][dt][0] = o[rg][dt][1] = o[rg][dt][2] = o[rg][dt][3] = 0.f;
  }

  const scalar_t* k_head = p.k + b * p.k_strides[0] + hkv * p.k_strides[1];
  const scalar_t* v_head = p.v + b * p.v_strides[0] + hkv * p.v_strides[1];
  // Issues the copies of tile `tile` (relative to begin) into its stage of the ring.
  // Keys at or past `end` are zero-filled: 0 * garbage could be NaN in P V.
  auto load_tile = [&](int64_t tile) {
    uint16_t* s_k = s_kv + (tile % kStagedStages) * 2 * kTileHalves;
    uint16_t* s_v = s_k + kTileHalves;
    const int64_t key0 = begin + tile * kStagedKeys;
    for (int c = tid; c < kStagedKeys * kChunks; c += kStagedThreads) {
      const int j = c / kChunks, d0 = (c % kChunks) * 8;
      const int64_t key = key0 + j;
      const bool valid = key < end;
      const scalar_t* k_src = valid ? k_head + key * p.k_strides[2] + d0 : k_head;
      const scalar_t* v_src = valid ? v_head + key * p.v_strides[2] + d0 : v_head;
      cp_async_16(s_k + j * kStride + d0, k_src, valid);
      cp_async_16(s_v + j * kStride + d0, v_src, valid);
    }
  };

  // ldmatrix lane roles: which 8x8 matrix (lane / 8) and which row of it (lane % 8).
  const int mat = lane / 8, mat_row = lane % 8;

  // One commit group per tile (empty past the last), so that after tile + S - 1
  // is committed, "at most S - 1 groups pending" means tile has landed.
  for (int64_t tile = 0; tile < kStagedStages - 1; ++tile) {
    if (tile < num_tiles) load_tile(tile);
    cp_async_commit();
  }
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    // its stage last held tile - 1, released by the barrier ending that iteration
    if (tile + kStagedStages - 1 < num_tiles) load_tile(tile + kStagedStages - 1);
    cp_async_commit();
    cp_async_wait<kStagedStages - 1>();
    __syncthreads();  // every thread's copies of this tile are visible

    const uint16_t* s_k = s_kv + (tile % kStagedStages) * 2 * kTileHalves;
    const uint16_t* s_v = s_k + kTileHalves;
    const int64_t key0 = begin + tile * kStagedKeys;
    const bool all_visible = tile >= fast_lo && tile < fast_hi;
#pragma unroll
    for (int rg = 0; rg < RG; ++rg) {
      if (!active[rg]) continue;
      const uint16_t* q_rows = s_q + (warp + kStagedWarps * rg) * 16 * kStride;

      // S = Q K^T over 4 column tiles of 8 keys. Q's A fragment: matrices
      // (rows 0-7 | 8-15) x (cols 0-7 | 8-15); K's B fragments for key tiles
      // 2 np and 2 np + 1: matrices (keys 0-7 | 8-15) x (dims 0-7 | 8-15).
      float s[kStagedKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kStagedKeys / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, q_rows + ((mat % 2) * 8 + mat_row) * kStride + ks * 16 + (mat / 2) * 8);
#pragma unroll
        for (int np = 0; np < kStagedKeys / 16; ++np) {
          uint32_t bk[4];
          ldmatrix_x4(bk, s_k + (np * 16 + (mat / 2) * 8 + mat_row) * kStride + ks * 16 + (mat % 2) * 8);
          MmaType<scalar_t>::mma(s[2 * np], a, bk[0], bk[1]);
          MmaType<scalar_t>::mma(s[2 * np + 1], a, bk[2], bk[3]);
        }
      }

#pragma unroll
      for (int nt = 0; nt < kStagedKeys / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e / 2;
          const int64_t key = key0 + nt * 8 + 2 * tig + (e % 2);
          float score = s[nt][e] * p.scale_log2;
          if (p.softcap_log2 > 0.f) score = soft_cap_log2(score, p.softcap_log2, p.inv_softcap_log2);
          if (!all_visible) {
            const int r = local_row(rg, h);
            bool visible = key < end && key >= s_begin[r] && key < s_visible_end[r];
            if (visible && key >= s_dense_end[r]) {  // a tree key of a real row (padding rows see none)
              const int64_t i = (row0 + r) / p.group;
              visible = p.has_mask && tree_key_visible(p.mask + (b * p.nq + i) * p.mask_words, tree_start, key);
            }
            if (!visible) score = -INFINITY;
          }
          s[nt][e] = score;
        }
      }

      // Online softmax; the four threads of a quad share their two rows.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kStagedKeys / 8; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
        const float new_max = fmaxf(row_max[rg][h], quad_max(tile_max));
        const float rescale = row_max[rg][h] == -INFINITY ? 0.f : exp2f(row_max[rg][h] - new_max);
        float tile_sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kStagedKeys / 8; ++nt) {
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            s[nt][e] = new_max == -INFINITY ? 0.f : exp2f(s[nt][e] - new_max);
            tile_sum += s[nt][e];
          }
        }
        row_sum[rg][h] = row_sum[rg][h] * rescale + tile_sum;
        row_max[rg][h] = new_max;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o[rg][dt][2 * h] *= rescale;
          o[rg][dt][2 * h + 1] *= rescale;
        }
      }

      // O += P V. P's accumulator layout is the A layout of a 16-key step; V's
      // B fragments for dim tiles 2 dp and 2 dp + 1 come transposed from the
      // row-major tile: matrices (keys 0-7 | 8-15) x (dims 0-7 | 8-15).
#pragma unroll
      for (int ks = 0; ks < kStagedKeys / 16; ++ks) {
        const uint32_t p_frag[4] = {
            MmaType<scalar_t>::pack(s[2 * ks][0], s[2 * ks][1]), MmaType<scalar_t>::pack(s[2 * ks][2], s[2 * ks][3]),
            MmaType<scalar_t>::pack(s[2 * ks + 1][0], s[2 * ks + 1][1]),
            MmaType<scalar_t>::pack(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, s_v + (ks * 16 + (mat % 2) * 8 + mat_row) * kStride + dp * 16 + (mat / 2) * 8);
          MmaType<scalar_t>::mma(o[rg][2 * dp], p_frag, bv[0], bv[1]);
          MmaType<scalar_t>::mma(o[rg][2 * dp + 1], p_frag, bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }
  cp_async_wait<0>();  // no copy may outlive the block (only empty groups remain here)

  const int64_t total_rows = gridDim.x / p.hkv * p.hq * p.nq;
#pragma unroll
  for (int rg = 0; rg < RG; ++rg) {
    if (!active[rg]) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float sum = quad_sum(row_sum[rg][h]);
      const int64_t row = row0 + local_row(rg, h);
      if (row >= packed_rows) continue;
      const int64_t i = row / p.group, head = hkv * p.group + row % p.group;
      const int64_t out_row = (b * p.hq + head) * p.nq + i;
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a row that sees no key gets zeros
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const int col = dt * 8 + 2 * tig;
        if (p.num_splits == 1) {
          p.out[out_row * D + col] = static_cast<scalar_t>(o[rg][dt][2 * h] * inv);
          p.out[out_row * D + col + 1] = static_cast<scalar_t>(o[rg][dt][2 * h + 1] * inv);
        } else {
          float* out = p.partial_out + (split * total_rows + out_row) * D + col;
          out[0] = o[rg][dt][2 * h] * inv;
          out[1] = o[rg][dt][2 * h + 1] * inv;
        }
      }
      if (p.num_splits > 1 && tig == 0) {
        p.partial_lse[split * total_rows + out_row] = sum > 0.f ? row_max[rg][h] + log2f(sum) : -INFINITY;
      }
    }
  }
}

}  // namespace
}  // namespace jakiro

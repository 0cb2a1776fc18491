// Tensor-core (mma.sync m16n8k16, sm_80+) path of tree_attention for fp16 and
// bf16; included by tree_attention.cu, whose Params, split and merge it shares.
//
// A block of 4 warps takes kMmaRows = 64 packed query rows (16 per warp) of one
// (batch row, KV head) and one split of the keys, in tiles of kMmaKeys = 64
// keys. Per tile: K and V^T are staged in shared memory (16-byte loads; V is
// transposed so that both MMA operands are read with 32-bit loads), each warp
// computes its 16 x 64 scores S = Q K^T with fp32 accumulation, masks them,
// updates its online softmax in registers and adds P V (P rounded to the
// input type, as flash attention does). Fragment layouts follow the PTX ISA's
// description of mma.m16n8k16: lane = 4 * group + tig; A (16 x 16, row-major)
// registers hold rows {group, group + 8} x columns {2 tig, 2 tig + 1} and the
// same + 8; B (16 x 8) holds rows {2 tig, 2 tig + 1} (+ 8) of column group;
// C (16 x 8) holds rows {group, group + 8} x columns {2 tig, 2 tig + 1}.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace jakiro {
namespace {

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaRows = 16 * kMmaWarps;  // packed query rows per block
constexpr int kMmaKeys = 64;              // keys per tile
constexpr int kPad = 8;                   // halves of padding per shared row: no bank conflicts

template <int D>
constexpr int mma_row_stride() { return D + kPad; }  // of the Q and K tiles
constexpr int kVtStride = kMmaKeys + kPad;            // of the transposed V tile

template <int D>
constexpr size_t mma_shared_bytes() {
  return 3 * kMmaRows * sizeof(int64_t) +
         sizeof(uint16_t) * (kMmaRows * mma_row_stride<D>() + kMmaKeys * mma_row_stride<D>() + D * kVtStride);
}

template <typename scalar_t>
struct MmaType;
template <>
struct MmaType<at::Half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct MmaType<at::BFloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t load_u32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kMmaThreads) tree_attention_mma_kernel(const Params<scalar_t> p) {
  constexpr int kStride = mma_row_stride<D>();
  constexpr int kChunks = D / 8;  // 16-byte chunks per row of D halves
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* s_dense_end = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* s_visible_end = s_dense_end + kMmaRows;
  int64_t* s_begin = s_visible_end + kMmaRows;
  uint16_t* s_q = reinterpret_cast<uint16_t*>(s_begin + kMmaRows);  // [kMmaRows][kStride]
  uint16_t* s_k = s_q + kMmaRows * kStride;                                // [kMmaKeys][kStride]
  uint16_t* s_vt = s_k + kMmaKeys * kStride;                               // [D][kVtStride]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int group = lane / 4, tig = lane % 4;
  const int64_t b = blockIdx.x / p.hkv, hkv = blockIdx.x % p.hkv;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kMmaRows;
  const int split = blockIdx.z;
  const int64_t packed_rows = p.nq * p.group;
  const int64_t kv_len = clamped_kv_len(p.seqlens[b], p.cache_size);
  const int64_t tree_start = query_key_range(kv_len, p.tree_len, true, p.nq, 0).dense_end;

  for (int c = tid; c < kMmaRows * kChunks; c += kMmaThreads) {
    const int r = c / kChunks, d0 = (c % kChunks) * 8;
    const int64_t row = row0 + r;
    uint4 chunk = make_uint4(0, 0, 0, 0);
    if (row < packed_rows) {
      const int64_t i = row / p.group, h = hkv * p.group + row % p.group;
      chunk = *reinterpret_cast<const uint4*>(p.q + ((b * p.hq + h) * p.nq + i) * D + d0);
    }
    *reinterpret_cast<uint4*>(s_q + r * kStride + d0) = chunk;
  }
  if (tid < kMmaRows) {
    const QueryKeyRange range = packed_row_range(p, b, row0 + tid, kv_len);
    s_dense_end[tid] = range.dense_end;
    s_visible_end[tid] = range.visible_end;
    s_begin[tid] = range.begin;
  }
  __syncthreads();

  // Tiles entirely in [every real row's window begin, every real row's
  // dense_end) need no per-key test. Splits start at the rows' lowest begin.
  int64_t block_end = 0, block_dense_end = std::numeric_limits<int64_t>::max();
  int64_t block_begin = std::numeric_limits<int64_t>::max(), block_begin_max = 0;
  for (int r = 0; r < kMmaRows; ++r) {
    block_end = max(block_end, s_visible_end[r]);
    if (row0 + r < packed_rows) {
      block_dense_end = min(block_dense_end, s_dense_end[r]);
      block_begin = min(block_begin, s_begin[r]);
      block_begin_max = max(block_begin_max, s_begin[r]);
    }
  }
  const int64_t begin = block_begin + static_cast<int64_t>(split) * p.keys_per_split;
  const int64_t end = min(begin + p.keys_per_split, block_end);

  // This thread's two rows (group and group + 8 of its warp's 16).
  const int local_row[2] = {warp * 16 + group, warp * 16 + group + 8};
  int64_t dense_end[2], visible_end[2], first_key[2];
  const uint32_t* mask_row[2];
  for (int h = 0; h < 2; ++h) {
    dense_end[h] = s_dense_end[local_row[h]];
    visible_end[h] = s_visible_end[local_row[h]];
    first_key[h] = s_begin[local_row[h]];
    const int64_t row = row0 + local_row[h];
    mask_row[h] = p.has_mask && row < packed_rows ? p.mask + (b * p.nq + row / p.group) * p.mask_words : nullptr;
  }

  uint32_t q_frag[D / 16][4];
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint16_t* q = s_q + ks * 16 + 2 * tig;
    q_frag[ks][0] = load_u32(q + local_row[0] * kStride);
    q_frag[ks][1] = load_u32(q + local_row[1] * kStride);
    q_frag[ks][2] = load_u32(q + local_row[0] * kStride + 8);
    q_frag[ks][3] = load_u32(q + local_row[1] * kStride + 8);
  }

  float o[D / 8][4];
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // row_sum: this thread's keys only

  const scalar_t* k_head = p.k + b * p.k_strides[0] + hkv * p.k_strides[1];
  const scalar_t* v_head = p.v + b * p.v_strides[0] + hkv * p.v_strides[1];
  for (int64_t key0 = begin; key0 < end; key0 += kMmaKeys) {
    __syncthreads();  // every warp is done with the previous tile
    for (int c = tid; c < kMmaKeys * kChunks; c += kMmaThreads) {
      const int j = c / kChunks, d0 = (c % kChunks) * 8;
      const int64_t key = key0 + j;
      uint4 k_chunk = make_uint4(0, 0, 0, 0), v_chunk = make_uint4(0, 0, 0, 0);
      if (key < end) {  // zeros past the end: 0 * garbage could be NaN
        k_chunk = *reinterpret_cast<const uint4*>(k_head + key * p.k_strides[2] + d0);
        v_chunk = *reinterpret_cast<const uint4*>(v_head + key * p.v_strides[2] + d0);
      }
      *reinterpret_cast<uint4*>(s_k + j * kStride + d0) = k_chunk;
      const uint16_t* v_halves = reinterpret_cast<const uint16_t*>(&v_chunk);
      for (int e = 0; e < 8; ++e) s_vt[(d0 + e) * kVtStride + j] = v_halves[e];
    }
    __syncthreads();

    // S = Q K^T: 8 column tiles of 8 keys.
    float s[kMmaKeys / 8][4];
    for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      const uint16_t* k = s_k + (nt * 8 + group) * kStride + 2 * tig;
      for (int ks = 0; ks < D / 16; ++ks) {
        MmaType<scalar_t>::mma(s[nt], q_frag[ks], load_u32(k + ks * 16), load_u32(k + ks * 16 + 8));
      }
    }

    const bool all_visible = key0 >= block_begin_max && key0 + kMmaKeys <= min(end, block_dense_end);
    for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2;
        const int64_t key = key0 + nt * 8 + 2 * tig + (e % 2);
        float score = s[nt][e] * p.scale_log2;
        if (p.softcap_log2 > 0.f) score = soft_cap_log2(score, p.softcap_log2, p.inv_softcap_log2);
        if (!all_visible) {
          bool visible = key < end && key >= first_key[h] && key < visible_end[h];
          if (visible && key >= dense_end[h]) {
            visible = mask_row[h] != nullptr && tree_key_visible(mask_row[h], tree_start, key);
          }
          if (!visible) score = -INFINITY;
        }
        s[nt][e] = score;
      }
    }

    // Online softmax; the four threads of a quad share their two rows.
    for (int h = 0; h < 2; ++h) {
      float tile_max = -INFINITY;
      for (int nt = 0; nt < kMmaKeys / 8; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
      const float new_max = fmaxf(row_max[h], quad_max(tile_max));
      const float rescale = row_max[h] == -INFINITY ? 0.f : exp2f(row_max[h] - new_max);
      float tile_sum = 0.f;
      for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          s[nt][e] = new_max == -INFINITY ? 0.f : exp2f(s[nt][e] - new_max);
          tile_sum += s[nt][e];
        }
      }
      row_sum[h] = row_sum[h] * rescale + tile_sum;
      row_max[h] = new_max;
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * h] *= rescale;
        o[dt][2 * h + 1] *= rescale;
      }
    }

    // O += P V: P's accumulator layout is the A layout of 16-key steps.
    for (int ks = 0; ks < kMmaKeys / 16; ++ks) {
      const uint32_t p_frag[4] = {
          MmaType<scalar_t>::pack(s[2 * ks][0], s[2 * ks][1]), MmaType<scalar_t>::pack(s[2 * ks][2], s[2 * ks][3]),
          MmaType<scalar_t>::pack(s[2 * ks + 1][0], s[2 * ks + 1][1]),
          MmaType<scalar_t>::pack(s[2 * ks + 1][2], s[2 * ks + 1][3])};
      for (int dt = 0; dt < D / 8; ++dt) {
        const uint16_t* v = s_vt + (dt * 8 + group) * kVtStride + ks * 16 + 2 * tig;
        MmaType<scalar_t>::mma(o[dt], p_frag, load_u32(v), load_u32(v + 8));
      }
    }
  }

  const int64_t total_rows = gridDim.x / p.hkv * p.hq * p.nq;
  for (int h = 0; h < 2; ++h) {
    const float sum = quad_sum(row_sum[h]);
    const int64_t row = row0 + local_row[h];
    if (row >= packed_rows) continue;
    const int64_t i = row / p.group, head = hkv * p.group + row % p.group;
    const int64_t out_row = (b * p.hq + head) * p.nq + i;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a row that sees no key gets zeros
    for (int dt = 0; dt < D / 8; ++dt) {
      const int col = dt * 8 + 2 * tig;
      if (p.num_splits == 1) {
        p.out[out_row * D + col] = static_cast<scalar_t>(o[dt][2 * h] * inv);
        p.out[out_row * D + col + 1] = static_cast<scalar_t>(o[dt][2 * h + 1] * inv);
      } else {
        float* out = p.partial_out + (split * total_rows + out_row) * D + col;
        out[0] = o[dt][2 * h] * inv;
        out[1] = o[dt][2 * h + 1] * inv;
      }
    }
    if (p.num_splits > 1 && tig == 0) {
      p.partial_lse[split * total_rows + out_row] = sum > 0.f ? row_max[h] + log2f(sum) : -INFINITY;
    }
  }
}

}  // namespace
}  // namespace jakiro

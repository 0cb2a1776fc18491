// CPU kernel of tree_attention (DESIGN.md section 5.2).
//
// Work units are (batch row, KV head, block of packed query rows). Packed row
// r of KV head hkv is query i = r / G of query head hkv * G + r % G (G = GQA
// group size), so every key block, converted once to fp32, serves all the
// query heads that share it. Per key block: scores for all rows, online
// softmax per row in fp32, then P·V. Scores and P·V are register-blocked
// micro-kernels (4 rows x 16 keys or columns) on 8-float GCC/Clang vector
// types, and exp is a branch-free polynomial, so no -ffast-math is needed; on
// x86 two more copies of the block step are compiled and picked at run time:
// AVX2+FMA, and AVX-512VL with 8-row tiles (its 32 vector registers hold them;
// 1.2-1.3x the AVX2 copy on a 2-core EPYC, the same sums in the same order).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "jakiro/checks.h"
#include "jakiro/cpu_isa.h"
#include "jakiro/tree_attention.h"

// The micro-kernels pass 8-float vectors between always-inlined functions; GCC
// warns that their ABI differs with and without AVX, which never matters here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define JAKIRO_X86_COPIES 1
#define JAKIRO_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define JAKIRO_X86_COPIES 0
#define JAKIRO_ALWAYS_INLINE inline
#endif

namespace jakiro {
namespace {

constexpr const char* kOp = "tree_attention";
constexpr int64_t kRowBlock = 32;  // packed query rows per work unit
constexpr int kKeyBlock = 64;      // keys converted to fp32 at a time
constexpr int64_t kMinKeysPerSplit = 512;  // below this a key split is not worth its merge
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One query row's view of the keys plus its running softmax state.
struct RowState {
  QueryKeyRange range;
  const uint32_t* mask_row;  // nullptr without a tree mask
  float max;                 // running max of the scores seen so far
  float sum;                 // running sum of exp(score - max)
};

// What one key block step needs: fp32 copies of the block and of the rows.
// Row arrays hold kRowBlock rows; rows past num_rows are zero padding.
struct KeyBlock {
  const float* q;       // [kRowBlock][D], already multiplied by the scale
  const float* k_t;     // [D][kKeyBlock], transposed, zero past num_keys
  const float* v;       // [kKeyBlock][D], rows past num_keys unused
  float* scores;        // [kRowBlock][kKeyBlock] scratch: scores, then probabilities
  float* acc;           // [kRowBlock][D] unnormalised outputs
  RowState* rows;
  int64_t num_rows;
  int64_t first_key;    // absolute index of key 0 of the block
  int num_keys;         // valid keys in the block
  int64_t tree_start;   // first tree key of this batch row
};

static_assert(kRowBlock % 8 == 0 && kKeyBlock % 16 == 0, "micro-kernel tiles");

// Eight floats; GCC/Clang lower it to AVX2 in the AVX2 copy and to SSE pairs otherwise.
typedef float Vec8 __attribute__((vector_size(32)));
constexpr int kMaxTileRows = 8;  // rows are zero-padded to a multiple of the largest micro-kernel tile

JAKIRO_ALWAYS_INLINE Vec8 load8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

JAKIRO_ALWAYS_INLINE void store8(float* p, Vec8 v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for x <= 0 (or -inf), branch-free so loops over it vectorise: 2^n by
// exponent bits times a degree-6 Taylor polynomial of 2^f, |f| <= 1/2
// (relative error about 2e-7). Underflows to exactly 0 below -87.
JAKIRO_ALWAYS_INLINE float exp_nonpositive(float x) {
  const float t = std::max(x * 1.44269504f, -126.f);
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 trick)
  const float f = (t - n) * 0.693147181f;
  const float poly =
      1.f + f * (1.f + f * (0.5f + f * (1.f / 6 + f * (1.f / 24 + f * (1.f / 120 + f * (1.f / 720))))));
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &exponent_bits, sizeof(two_n));  // std::bit_cast, but C++17 too
  return x < -87.f ? 0.f : poly * two_n;
}

// scores[r][j] = q[r] . k[j] for all kRowBlock rows and kKeyBlock keys: tiles
// of kTileRows rows x 16 keys held in registers, one pass over D per tile.
template <int D, int kTileRows>
JAKIRO_ALWAYS_INLINE void block_scores(const KeyBlock& blk) {
  for (int64_t r0 = 0; r0 < blk.num_rows; r0 += kTileRows) {
    for (int j0 = 0; j0 < kKeyBlock; j0 += 16) {
      Vec8 acc[kTileRows][2] = {};
      for (int d = 0; d < D; ++d) {
        const Vec8 k0 = load8(blk.k_t + d * kKeyBlock + j0), k1 = load8(blk.k_t + d * kKeyBlock + j0 + 8);
        for (int rr = 0; rr < kTileRows; ++rr) {
          const float qd = blk.q[(r0 + rr) * D + d];
          acc[rr][0] += qd * k0;
          acc[rr][1] += qd * k1;
        }
      }
      for (int rr = 0; rr < kTileRows; ++rr) {
        store8(blk.scores + (r0 + rr) * kKeyBlock + j0, acc[rr][0]);
        store8(blk.scores + (r0 + rr) * kKeyBlock + j0 + 8, acc[rr][1]);
      }
    }
  }
}

// Masks one row's scores, updates its softmax state, turns the scores into
// probabilities and returns the factor its accumulator must be scaled by.
JAKIRO_ALWAYS_INLINE float row_softmax(const KeyBlock& blk, RowState& row, float* s) {
  if (row.range.visible_end <= blk.first_key) {  // nothing visible in this block
    for (int j = 0; j < kKeyBlock; ++j) s[j] = 0.f;
    return 1.f;
  }
  // Keys past dense_end are tree keys (tested bit by bit) or do not exist.
  if (blk.first_key + blk.num_keys > row.range.dense_end) {
    for (int j = 0; j < blk.num_keys; ++j) {
      const int64_t key = blk.first_key + j;
      if (key < row.range.dense_end) continue;
      const bool visible = key < row.range.visible_end && row.mask_row != nullptr &&
                           tree_key_visible(row.mask_row, blk.tree_start, key);
      if (!visible) s[j] = kNegInf;
    }
  }
  for (int j = blk.num_keys; j < kKeyBlock; ++j) s[j] = kNegInf;
  float block_max = kNegInf;
  for (int j = 0; j < kKeyBlock; ++j) block_max = std::max(block_max, s[j]);
  if (block_max == kNegInf) {
    for (int j = 0; j < kKeyBlock; ++j) s[j] = 0.f;
    return 1.f;
  }
  const float new_max = std::max(row.max, block_max);
  const float rescale = row.max == kNegInf ? 0.f : exp_nonpositive(row.max - new_max);
  // Two loops: the first vectorises; the second is a reduction, which would not.
  for (int j = 0; j < kKeyBlock; ++j) s[j] = exp_nonpositive(s[j] - new_max);  // masked: exp(-inf) == 0
  float block_sum = 0.f;
  for (int j = 0; j < kKeyBlock; ++j) block_sum += s[j];
  row.sum = row.sum * rescale + block_sum;
  row.max = new_max;
  return rescale;
}

// acc[r] = acc[r] * rescale[r] + sum_j p[r][j] v[j]: tiles of kTileRows rows x
// 16 columns held in registers over the block's keys.
template <int D, int kTileRows>
JAKIRO_ALWAYS_INLINE void block_values(const KeyBlock& blk, const float* rescale) {
  for (int64_t r0 = 0; r0 < blk.num_rows; r0 += kTileRows) {
    for (int d0 = 0; d0 < D; d0 += 16) {
      Vec8 acc[kTileRows][2];
      for (int rr = 0; rr < kTileRows; ++rr) {
        float* a = blk.acc + (r0 + rr) * D + d0;
        acc[rr][0] = load8(a) * rescale[r0 + rr];
        acc[rr][1] = load8(a + 8) * rescale[r0 + rr];
      }
      for (int j = 0; j < blk.num_keys; ++j) {
        const Vec8 v0 = load8(blk.v + j * D + d0), v1 = load8(blk.v + j * D + d0 + 8);
        for (int rr = 0; rr < kTileRows; ++rr) {
          const float p = blk.scores[(r0 + rr) * kKeyBlock + j];
          acc[rr][0] += p * v0;
          acc[rr][1] += p * v1;
        }
      }
      for (int rr = 0; rr < kTileRows; ++rr) {
        store8(blk.acc + (r0 + rr) * D + d0, acc[rr][0]);
        store8(blk.acc + (r0 + rr) * D + d0 + 8, acc[rr][1]);
      }
    }
  }
}

// Scores, masking, online softmax update and P·V for every row over one block;
// kTileRows rows share each loaded K/V vector in the micro-kernels (4 fit the 16
// vector registers of SSE/AVX2, 8 the 32 of AVX-512).
template <int D, int kTileRows>
JAKIRO_ALWAYS_INLINE void key_block_step(const KeyBlock& blk) {
  block_scores<D, kTileRows>(blk);
  float rescale[kRowBlock];
  for (int64_t r = 0; r < kRowBlock; ++r) {
    rescale[r] = r < blk.num_rows ? row_softmax(blk, blk.rows[r], blk.scores + r * kKeyBlock) : 1.f;
  }
  block_values<D, kTileRows>(blk, rescale);
}

template <int D>
void key_block_step_portable(const KeyBlock& blk) { key_block_step<D, 4>(blk); }

#if JAKIRO_X86_COPIES
template <int D>
__attribute__((target("avx2,fma"))) void key_block_step_avx2(const KeyBlock& blk) {
  key_block_step<D, 4>(blk);
}
template <int D>
__attribute__((target("avx512f,avx512vl"))) void key_block_step_avx512(const KeyBlock& blk) {
  key_block_step<D, 8>(blk);
}
#endif

using KeyBlockFn = void (*)(const KeyBlock&);

// The best copy this CPU runs, or the one JAKIRO_TREE_ATTENTION_CPU names
// (auto, avx512, avx2, portable).
template <int D>
KeyBlockFn pick_key_block_step() {
  switch (choose_cpu_isa("JAKIRO_TREE_ATTENTION_CPU", "portable", JAKIRO_X86_COPIES, kOp).isa) {
#if JAKIRO_X86_COPIES
    case CpuIsa::kAvx512: return &key_block_step_avx512<D>;
    case CpuIsa::kAvx2: return &key_block_step_avx2<D>;
#endif
    default: return &key_block_step_portable<D>;
  }
}

template <typename scalar_t>
struct Inputs {
  const scalar_t* q;  // contiguous [B, Hq, Nq, D]
  const scalar_t* k;
  const scalar_t* v;
  int64_t k_strides[3];  // batch, head, position (the last dimension is contiguous)
  int64_t v_strides[3];
  const int32_t* seqlens;
  bool has_mask;
  const uint32_t* mask;  // contiguous [B, Nq, W] when has_mask
  int64_t mask_words;
  scalar_t* out;  // contiguous [B, Hq, Nq, D]
  int64_t batch, hq, hkv, nq, cache_size, tree_len;
  float scale;
};

// How many splits of the keys: only when (batch row, KV head, row block) units
// alone cannot keep every thread busy (decoding one sequence, say), and never
// fewer than kMinKeysPerSplit keys per split.
int64_t choose_splits(int64_t base_units, int64_t cache_size) {
  const int64_t threads = at::get_num_threads();
  if (base_units >= 2 * threads) return 1;
  const int64_t by_threads = (2 * threads + base_units - 1) / base_units;
  return std::max<int64_t>(1, std::min(by_threads, cache_size / kMinKeysPerSplit));
}

template <typename scalar_t, int D>
void tree_attention_cpu_impl(const Inputs<scalar_t>& in) {
  static_assert(D % 16 == 0, "the P·V micro-kernel takes 16 columns at a time");
  const int64_t group = in.hq / in.hkv;
  const int64_t packed_rows = in.nq * group;
  const int64_t row_blocks = (packed_rows + kRowBlock - 1) / kRowBlock;
  const int64_t base_units = in.batch * in.hkv * row_blocks;
  int64_t splits = choose_splits(base_units, in.cache_size);
  const int64_t per_split = (in.cache_size + splits - 1) / splits;
  const int64_t keys_per_split = std::max<int64_t>(kKeyBlock, (per_split + kKeyBlock - 1) / kKeyBlock * kKeyBlock);
  splits = std::max<int64_t>(1, (in.cache_size + keys_per_split - 1) / keys_per_split);
  // With several splits each writes its normalised output and log-sum-exp;
  // a second pass merges them.
  const int64_t total_rows = in.batch * in.hq * in.nq;
  std::vector<float> partial_out(splits > 1 ? splits * total_rows * D : 0);
  std::vector<float> partial_lse(splits > 1 ? splits * total_rows : 0);
  const KeyBlockFn step = pick_key_block_step<D>();

  at::parallel_for(0, base_units * splits, 1, [&](int64_t unit0, int64_t unit1) {
    std::vector<float> q_buf(kRowBlock * D), acc(kRowBlock * D);
    std::vector<float> k_t(D * kKeyBlock), v_buf(kKeyBlock * D), scores(kRowBlock * kKeyBlock);
    RowState rows[kRowBlock];
    for (int64_t unit = unit0; unit < unit1; ++unit) {
      const int64_t split = unit % splits;
      const int64_t row_block = (unit / splits) % row_blocks;
      const int64_t hkv = (unit / (splits * row_blocks)) % in.hkv;
      const int64_t b = unit / (splits * row_blocks * in.hkv);
      const int64_t r0 = row_block * kRowBlock;
      const int64_t num_rows = std::min(kRowBlock, packed_rows - r0);
      const int64_t kv_len = clamped_kv_len(in.seqlens[b], in.cache_size);
      const int64_t tree_start = query_key_range(kv_len, in.tree_len, true, in.nq, 0).dense_end;

      int64_t end = 0;  // keys past every row's visible end are skipped
      // The micro-kernels work on whole tiles of rows: zero the padding rows.
      std::fill(q_buf.begin(), q_buf.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t tiled_rows = (num_rows + kMaxTileRows - 1) / kMaxTileRows * kMaxTileRows;
      for (RowState& row : rows) row = RowState{{0, 0}, nullptr, kNegInf, 0.f};  // padding sees nothing
      for (int64_t r = 0; r < num_rows; ++r) {
        const int64_t i = (r0 + r) / group, h = hkv * group + (r0 + r) % group;
        rows[r].range = query_key_range(kv_len, in.tree_len, in.has_mask, in.nq, i);
        rows[r].mask_row = in.has_mask ? in.mask + (b * in.nq + i) * in.mask_words : nullptr;
        end = std::max(end, rows[r].range.visible_end);
        const scalar_t* q = in.q + ((b * in.hq + h) * in.nq + i) * D;
        for (int d = 0; d < D; ++d) q_buf[r * D + d] = static_cast<float>(q[d]) * in.scale;
      }

      const int64_t begin = split * keys_per_split;
      end = std::min(end, begin + keys_per_split);
      const scalar_t* k_head = in.k + b * in.k_strides[0] + hkv * in.k_strides[1];
      const scalar_t* v_head = in.v + b * in.v_strides[0] + hkv * in.v_strides[1];
      for (int64_t key0 = begin; key0 < end; key0 += kKeyBlock) {
        const int num_keys = static_cast<int>(std::min<int64_t>(kKeyBlock, end - key0));
        for (int j = 0; j < kKeyBlock; ++j) {
          if (j < num_keys) {
            const scalar_t* k = k_head + (key0 + j) * in.k_strides[2];
            const scalar_t* v = v_head + (key0 + j) * in.v_strides[2];
            for (int d = 0; d < D; ++d) k_t[d * kKeyBlock + j] = static_cast<float>(k[d]);
            for (int d = 0; d < D; ++d) v_buf[j * D + d] = static_cast<float>(v[d]);
          } else {
            for (int d = 0; d < D; ++d) k_t[d * kKeyBlock + j] = 0.f;
          }
        }
        step(KeyBlock{q_buf.data(), k_t.data(), v_buf.data(), scores.data(), acc.data(), rows, tiled_rows,
                      key0, num_keys, tree_start});
      }

      for (int64_t r = 0; r < num_rows; ++r) {
        const int64_t i = (r0 + r) / group, h = hkv * group + (r0 + r) % group;
        const int64_t out_row = (b * in.hq + h) * in.nq + i;
        // A row that sees no key at all gets zeros.
        const float inv = rows[r].sum > 0.f ? 1.f / rows[r].sum : 0.f;
        if (splits == 1) {
          scalar_t* out = in.out + out_row * D;
          for (int d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[r * D + d] * inv);
        } else {
          float* out = partial_out.data() + (split * total_rows + out_row) * D;
          for (int d = 0; d < D; ++d) out[d] = acc[r * D + d] * inv;
          partial_lse[split * total_rows + out_row] =
              rows[r].sum > 0.f ? rows[r].max + std::log(rows[r].sum) : kNegInf;
        }
      }
    }
  });
  if (splits == 1) return;

  // Merge: weight each split by its share of the softmax mass, exp(lse - max).
  at::parallel_for(0, total_rows, 16, [&](int64_t row0, int64_t row1) {
    for (int64_t row = row0; row < row1; ++row) {
      float lse_max = kNegInf;
      for (int64_t sp = 0; sp < splits; ++sp) lse_max = std::max(lse_max, partial_lse[sp * total_rows + row]);
      float value[D] = {};
      float weight_sum = 0.f;
      if (lse_max != kNegInf) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const float lse = partial_lse[sp * total_rows + row];
          if (lse == kNegInf) continue;  // this split saw no key of the row
          const float weight = std::exp(lse - lse_max);
          weight_sum += weight;
          const float* o = partial_out.data() + (sp * total_rows + row) * D;
          for (int d = 0; d < D; ++d) value[d] += weight * o[d];
        }
      }
      const float inv = weight_sum > 0.f ? 1.f / weight_sum : 0.f;
      scalar_t* out = in.out + row * D;
      for (int d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(value[d] * inv);
    }
  });
}

template <typename scalar_t>
void dispatch_head_dim(const Inputs<scalar_t>& in, int64_t head_dim) {
  if (head_dim == 64) return tree_attention_cpu_impl<scalar_t, 64>(in);
  if (head_dim == 128) return tree_attention_cpu_impl<scalar_t, 128>(in);
  JAKIRO_CHECK(false, kOp, "head_dim ", head_dim, " is not supported");
}

template <typename scalar_t>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seqlens,
         const at::Tensor& mask, int64_t tree_len, double scale, at::Tensor& out) {
  Inputs<scalar_t> in{};
  in.q = q.const_data_ptr<scalar_t>();
  in.k = k.const_data_ptr<scalar_t>();
  in.v = v.const_data_ptr<scalar_t>();
  for (int dim = 0; dim < 3; ++dim) {
    in.k_strides[dim] = k.stride(dim);
    in.v_strides[dim] = v.stride(dim);
  }
  in.seqlens = seqlens.const_data_ptr<int32_t>();
  in.has_mask = mask.defined();
  in.mask = mask.defined() ? reinterpret_cast<const uint32_t*>(mask.const_data_ptr<int32_t>()) : nullptr;
  in.mask_words = mask.defined() ? mask.size(2) : 0;
  in.out = out.mutable_data_ptr<scalar_t>();
  in.batch = q.size(0);
  in.hq = q.size(1);
  in.nq = q.size(2);
  in.hkv = k.size(1);
  in.cache_size = k.size(2);
  in.tree_len = tree_len;
  in.scale = static_cast<float>(scale);
  dispatch_head_dim(in, q.size(3));
}

at::Tensor tree_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& seqlens_in,
                              const std::optional<at::Tensor>& tree_mask, int64_t tree_len,
                              double scale, bool validate) {
  check_tree_attention_args(q_in, k_cache, v_cache, seqlens_in, tree_mask, tree_len, scale);
  // Always validated on the CPU, where reading the lengths costs nothing.
  (void)validate;
  check_tree_attention_seqlens(seqlens_in, k_cache.size(2), tree_len);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor seqlens = seqlens_in.contiguous();
  const at::Tensor mask = tree_mask.has_value() ? tree_mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(q, k_cache, v_cache, seqlens, mask, tree_len, scale, out); break;
    case at::kHalf: run<c10::Half>(q, k_cache, v_cache, seqlens, mask, tree_len, scale, out); break;
    case at::kBFloat16: run<c10::BFloat16>(q, k_cache, v_cache, seqlens, mask, tree_len, scale, out); break;
    default: JAKIRO_CHECK(false, kOp, "unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CPU, m) { m.impl("tree_attention", &tree_attention_cpu); }

}  // namespace jakiro

// CPU kernel of tree_attention (contract: docs/architecture.md).
//
// Work units are (batch row, KV head, block of packed query rows, key split).
// Packed row r of KV head hkv is query i = r / G of query head hkv * G + r % G
// (G = GQA group size), so every key block, converted once to fp32, serves all
// the query heads that share it.
//
// Batch invariance: a query's output is bit-identical to what a one-query
// causal call computes over the same keys laid out contiguously, so verifying
// a tree reproduces vanilla decoding's numbers exactly in every dtype (greedy
// stays lossless even in bfloat16). Three things make it so:
// - a query's visible keys get virtual positions (the prefix keeps its own, its
//   visible tree keys follow in tree order), and the keys are split into fixed
//   chunks of kKeysPerSplit virtual positions, whatever the call's shape;
// - within a split the softmax is two-pass: the exact maximum first, then every
//   probability and P·V accumulated in key order, and the probabilities' sum
//   in 8 lanes by virtual position, so hidden keys add exact zeros and block
//   boundaries change nothing;
// - splits merge by log-sum-exp in split order, and a single split is the same
//   numbers as no merge.
// Scores and P·V are register-blocked micro-kernels (4 rows x 2 vectors of keys
// or columns) on GCC/Clang vector types of 8 floats, and exp is a branch-free
// polynomial, so no -ffast-math is needed; on x86 two more copies of the split
// step are compiled and picked at run time: AVX2+FMA, and AVX-512 with 12-row
// tiles of 16-float vectors (its 32 registers hold them; every sum stays in one
// lane, so the same sums in the same order). The softmax's sum runs in 8 lanes
// keyed by virtual position (probability_sum).
//
// Head sizes: every multiple of 8 up to 256. 64 and 128 (the common sizes) are
// compiled for their size; the others run one copy that reads the size at run
// time (the same code, so the same sums in the same order: batch invariance
// holds for every size). A sliding window only hides keys (exact zeros, as
// above) and the soft-cap maps each score on its own, so neither changes that.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <bitset>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "jakiro/checks.h"
#include "jakiro/cpu_isa.h"
#include "jakiro/kernel_env.h"
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
constexpr int64_t kRowBlock = 48;       // packed query rows per work unit, at most
constexpr int kKeyBlock = 64;           // keys converted to fp32 at a time
constexpr int64_t kKeysPerSplit = 512;  // virtual key positions per split, fixed (see the top)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kRuntimeHeadDim = 0;      // template head size meaning "read it at run time"

static_assert(kRowBlock % 8 == 0 && kKeyBlock % 16 == 0 && kKeysPerSplit % kKeyBlock == 0, "tiles");

// Eight floats; GCC/Clang lower it to AVX2 in the AVX2 copy and to SSE pairs otherwise.
typedef float Vec8 __attribute__((vector_size(32)));
// Sixteen floats: one AVX-512 register, the micro-kernels' vector in the AVX-512 copy. Every
// sum of the micro-kernels runs within one lane, so the width changes no result.
typedef float Vec16 __attribute__((vector_size(64)));
constexpr int kRowQuantum = 4;  // rows are zero-padded to a multiple of the smallest micro-kernel tile

template <class V>
constexpr int width() { return static_cast<int>(sizeof(V) / sizeof(float)); }

template <class V>
JAKIRO_ALWAYS_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class V>
JAKIRO_ALWAYS_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

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

// tanh(x), branch-free so the soft-cap loop vectorises: its Taylor series to
// x^11 below |x| = 0.3 (truncated below 1e-8 there), (1 - e) / (1 + e) with e = exp(-2|x|)
// above (no cancellation left: 1 - e > 0.45). Relative error about 3e-7.
JAKIRO_ALWAYS_INLINE float tanh_float(float x) {
  const float a = std::fabs(x);
  const float z = a * a;
  const float series =
      a * (1.f + z * (-1.f / 3 + z * (2.f / 15 + z * (-17.f / 315 + z * (62.f / 2835 + z * (-1382.f / 155925))))));
  const float e = exp_nonpositive(-2.f * a);
  const float t = a < 0.3f ? series : (1.f - e) / (1.f + e);
  return std::copysign(t, x);
}

// One query row of a work unit.
struct RowState {
  QueryKeyRange range;
  const uint32_t* mask_row;  // nullptr without a tree mask
  int64_t tree_rank;         // visible tree keys counted so far (the next one's virtual offset)
  float max;                 // exact maximum of the row's scores in the split
  float sum;                 // sum of exp(score - max) over them
};

// One split of one row block: the keys [scan_begin, scan_end) are read; a row
// counts those whose virtual position lies in [split_begin, split_end).
template <typename scalar_t>
struct SplitWork {
  const float* q;  // [tiled_rows][D], already multiplied by the scale; padding rows zero
  float* acc;      // [tiled_rows][D], zero on entry: unnormalised outputs on exit
  RowState* rows;
  int64_t num_rows, tiled_rows;
  int head_dim;                  // D (the template's, or the run-time size)
  float softcap, inv_softcap;    // softcap 0: off
  const scalar_t* k;  // key 0 of this (batch row, KV head)
  const scalar_t* v;
  int64_t k_stride, v_stride;  // between positions
  int64_t scan_begin, scan_end, split_begin, split_end, tree_start;
  float* k_t;            // [D][key_stride(D)] scratch, transposed
  float* v_block;        // [kKeyBlock][D] scratch (unused for float32 values stored back to back)
  float* scores;         // [tiled_rows][score_stride] scratch
  int64_t score_stride;  // scan length rounded up to kKeyBlock
};

// The head size: the template's when it is fixed, else the run-time one.
template <int kD>
JAKIRO_ALWAYS_INLINE int head_size(int runtime) { return kD != kRuntimeHeadDim ? kD : runtime; }

// Floats between the rows (dimensions) of the transposed key block: kKeyBlock,
// padded by a cache line above D = 128. The score loop walks all D rows for
// every 16 keys; 256-byte rows use only 16 of the 64 sets of a 48 KB L1, which
// hold 192 rows.
JAKIRO_ALWAYS_INLINE int key_stride(int D) { return D > 128 ? kKeyBlock + 16 : kKeyBlock; }

// scores[r][j] = q[r] . k[j] for kTileRows rows from r0 and kKeyBlock keys: tiles
// of kTileRows rows x 2 vectors of keys held in registers, one pass over D per tile.
template <class V, int kD, int kTileRows>
JAKIRO_ALWAYS_INLINE void tile_scores(const float* q, const float* k_t, float* scores, int64_t stride, int64_t r0,
                                      int head_dim) {
  constexpr int W = width<V>();
  static_assert(kKeyBlock % (2 * W) == 0, "a key block is whole tiles");
  const int D = head_size<kD>(head_dim);
  const int k_stride = key_stride(D);
  for (int j0 = 0; j0 < kKeyBlock; j0 += 2 * W) {
    V acc[kTileRows][2] = {};
    for (int d = 0; d < D; ++d) {
      const V k0 = load<V>(k_t + d * k_stride + j0), k1 = load<V>(k_t + d * k_stride + j0 + W);
      for (int rr = 0; rr < kTileRows; ++rr) {
        const float qd = q[(r0 + rr) * D + d];
        acc[rr][0] += qd * k0;
        acc[rr][1] += qd * k1;
      }
    }
    for (int rr = 0; rr < kTileRows; ++rr) {
      store(scores + (r0 + rr) * stride + j0, acc[rr][0]);
      store(scores + (r0 + rr) * stride + j0 + W, acc[rr][1]);
    }
  }
}

// acc[r][d0 .. d0 + kVecs vectors) += sum_j p[r][j] v[j][same columns], j in key
// order, for kTileRows rows from r0, held in registers over the block's keys. A
// column's sum does not depend on the columns beside it.
template <class V, int kTileRows, int kVecs>
JAKIRO_ALWAYS_INLINE void tile_value_columns(const float* p, int64_t stride, const float* v, int num_keys, float* acc,
                                             int64_t r0, int D, int d0) {
  constexpr int W = width<V>();
  V sum[kTileRows][kVecs];
  for (int rr = 0; rr < kTileRows; ++rr) {
    for (int c = 0; c < kVecs; ++c) sum[rr][c] = load<V>(acc + (r0 + rr) * D + d0 + W * c);
  }
  for (int j = 0; j < num_keys; ++j) {
    V vj[kVecs];
    for (int c = 0; c < kVecs; ++c) vj[c] = load<V>(v + j * D + d0 + W * c);
    for (int rr = 0; rr < kTileRows; ++rr) {
      const float pj = p[(r0 + rr) * stride + j];
      for (int c = 0; c < kVecs; ++c) sum[rr][c] += pj * vj[c];
    }
  }
  for (int rr = 0; rr < kTileRows; ++rr) {
    for (int c = 0; c < kVecs; ++c) store(acc + (r0 + rr) * D + d0 + W * c, sum[rr][c]);
  }
}

// acc[r] += sum_j p[r][j] v[j] for kTileRows rows from r0: tiles of 2 vectors of
// columns, then one vector, then 8 columns (D is a multiple of 8).
template <class V, int kD, int kTileRows>
JAKIRO_ALWAYS_INLINE void tile_values(const float* p, int64_t stride, const float* v, int num_keys, float* acc,
                                      int64_t r0, int head_dim) {
  constexpr int W = width<V>();
  const int D = head_size<kD>(head_dim);
  int d0 = 0;
  for (; d0 + 2 * W <= D; d0 += 2 * W) tile_value_columns<V, kTileRows, 2>(p, stride, v, num_keys, acc, r0, D, d0);
  if (d0 + W <= D) {
    tile_value_columns<V, kTileRows, 1>(p, stride, v, num_keys, acc, r0, D, d0);
    d0 += W;
  }
  if constexpr (W > 8) {
    if (d0 < D) tile_value_columns<Vec8, kTileRows, 1>(p, stride, v, num_keys, acc, r0, D, d0);
  }
}

// Every row (a multiple of kRowQuantum) in kTileRows tiles, the rest in
// kRowQuantum tiles: a row's sums do not depend on its tile.
template <class V, int kD, int kTileRows>
JAKIRO_ALWAYS_INLINE void block_scores(const float* q, const float* k_t, float* scores, int64_t stride,
                                       int64_t rows, int head_dim) {
  int64_t r0 = 0;
  for (; r0 + kTileRows <= rows; r0 += kTileRows) tile_scores<V, kD, kTileRows>(q, k_t, scores, stride, r0, head_dim);
  for (; r0 < rows; r0 += kRowQuantum) tile_scores<V, kD, kRowQuantum>(q, k_t, scores, stride, r0, head_dim);
}

template <class V, int kD, int kTileRows>
JAKIRO_ALWAYS_INLINE void block_values(const float* p, int64_t stride, const float* v, int num_keys, float* acc,
                                       int64_t rows, int head_dim) {
  int64_t r0 = 0;
  for (; r0 + kTileRows <= rows; r0 += kTileRows) {
    tile_values<V, kD, kTileRows>(p, stride, v, num_keys, acc, r0, head_dim);
  }
  for (; r0 < rows; r0 += kRowQuantum) tile_values<V, kD, kRowQuantum>(p, stride, v, num_keys, acc, r0, head_dim);
}

// Sets the scores of keys a row does not count in this split to -inf and returns
// the maximum of the others. Keys below dense_end are the row's own prefix (or
// causal range); a visible tree key's virtual position is the tree start plus
// the number of visible tree keys before it. Keys below the window's cut
// (range.begin) are hidden but still ranked.
template <typename scalar_t>
JAKIRO_ALWAYS_INLINE float mask_row(const SplitWork<scalar_t>& w, RowState& row, float* s) {
  const int64_t n = w.scan_end - w.scan_begin;
  const int64_t dense = std::clamp<int64_t>(row.range.dense_end - w.scan_begin, 0, n);
  const int64_t visible = std::clamp<int64_t>(row.range.visible_end - w.scan_begin, 0, n);
  const int64_t cut = std::clamp<int64_t>(row.range.begin - w.scan_begin, 0, n);
  for (int64_t j = 0; j < std::min(cut, dense); ++j) s[j] = kNegInf;
  for (int64_t j = dense; j < visible; ++j) {
    bool counted = false;
    if (row.mask_row != nullptr && tree_key_visible(row.mask_row, w.tree_start, w.scan_begin + j)) {
      const int64_t position = w.tree_start + row.tree_rank++;
      counted = j >= cut && position >= w.split_begin && position < w.split_end;
    }
    if (!counted) s[j] = kNegInf;
  }
  for (int64_t j = visible; j < n; ++j) s[j] = kNegInf;
  // A maximum is exact in any order, so it can run in 4 x 8 lanes.
  Vec8 lanes[4];
  for (int a = 0; a < 4; ++a)
    for (int l = 0; l < 8; ++l) lanes[a][l] = kNegInf;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    for (int a = 0; a < 4; ++a) {
      const Vec8 x = load<Vec8>(s + j + 8 * a);
      lanes[a] = x > lanes[a] ? x : lanes[a];
    }
  }
  float max = kNegInf;
  for (int a = 0; a < 4; ++a)
    for (int l = 0; l < 8; ++l) max = std::max(max, lanes[a][l]);
  for (; j < n; ++j) max = std::max(max, s[j]);
  return max;
}

// The sum of a row's probabilities s (hidden keys exactly 0), batch-invariant yet
// vectorised: a key adds into lane (virtual position mod 8), each lane in key
// order, and the lanes add up in a fixed order, so a key's lane and its place in
// its lane are what a one-query call over the row's keys laid out contiguously
// gives it. Prefix keys' virtual positions are their own; a visible tree key's
// is the tree start plus its rank, as in mask_row.
template <typename scalar_t>
JAKIRO_ALWAYS_INLINE float probability_sum(const SplitWork<scalar_t>& w, const RowState& row,
                                           int64_t tree_rank, const float* s) {
  const int64_t n = w.scan_end - w.scan_begin;
  const int64_t dense = std::clamp<int64_t>(row.range.dense_end - w.scan_begin, 0, n);
  const int64_t visible = std::clamp<int64_t>(row.range.visible_end - w.scan_begin, 0, n);
  Vec8 lanes = {};
  // Prefix keys: scalar up to a position that is a multiple of 8, then 8 at a time.
  const int64_t aligned = std::min(dense, (8 - w.scan_begin % 8) % 8);
  int64_t j = 0;
  for (; j < aligned; ++j) lanes[(w.scan_begin + j) % 8] += s[j];
  for (; j + 8 <= dense; j += 8) lanes += load<Vec8>(s + j);
  for (; j < dense; ++j) lanes[(w.scan_begin + j) % 8] += s[j];
  if (row.mask_row != nullptr) {
    for (j = dense; j < visible; ++j) {
      if (tree_key_visible(row.mask_row, w.tree_start, w.scan_begin + j)) lanes[(w.tree_start + tree_rank++) % 8] += s[j];
    }
  }
  float sum = 0.f;
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  return sum;
}

// score -> softcap * tanh(score / softcap), element by element.
JAKIRO_ALWAYS_INLINE void soft_cap(float* s, int64_t n, float softcap, float inv_softcap) {
  for (int64_t j = 0; j < n; ++j) s[j] = softcap * tanh_float(s[j] * inv_softcap);
}

#if JAKIRO_X86_COPIES
typedef int Index8 __attribute__((vector_size(32)));

// r[i] = element i of each of the 8 vectors, in place (three rounds of two-source shuffles).
JAKIRO_ALWAYS_INLINE void transpose8x8(Vec8 r[8]) {
  const Index8 lo32 = {0, 8, 1, 9, 4, 12, 5, 13}, hi32 = {2, 10, 3, 11, 6, 14, 7, 15};
  const Index8 lo64 = {0, 1, 8, 9, 4, 5, 12, 13}, hi64 = {2, 3, 10, 11, 6, 7, 14, 15};
  const Index8 lo128 = {0, 1, 2, 3, 8, 9, 10, 11}, hi128 = {4, 5, 6, 7, 12, 13, 14, 15};
  Vec8 a[8], b[8];
  for (int i = 0; i < 8; i += 2) {
    a[i] = __builtin_shuffle(r[i], r[i + 1], lo32);
    a[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi32);
  }
  for (int i = 0; i < 8; i += 4) {
    b[i] = __builtin_shuffle(a[i], a[i + 2], lo64);
    b[i + 1] = __builtin_shuffle(a[i], a[i + 2], hi64);
    b[i + 2] = __builtin_shuffle(a[i + 1], a[i + 3], lo64);
    b[i + 3] = __builtin_shuffle(a[i + 1], a[i + 3], hi64);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shuffle(b[i], b[i + 4], lo128);
    r[i + 4] = __builtin_shuffle(b[i], b[i + 4], hi128);
  }
}
#endif

// k_t[d][j] = key (first + j)[d] in fp32 for the block's num_keys keys, zeros
// past them. Float32 keys go through 8x8 register transposes (GCC on x86), the
// rest one element at a time; either way the same values land.
template <typename scalar_t>
JAKIRO_ALWAYS_INLINE void transpose_keys(const SplitWork<scalar_t>& w, int64_t first, int num_keys, int D) {
  const int stride = key_stride(D);
  int j = 0;
#if JAKIRO_X86_COPIES
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; j + 8 <= num_keys; j += 8) {
      const float* k = w.k + (first + j) * w.k_stride;
      for (int d = 0; d < D; d += 8) {
        Vec8 r[8];
        for (int i = 0; i < 8; ++i) r[i] = load<Vec8>(k + i * w.k_stride + d);
        transpose8x8(r);
        for (int i = 0; i < 8; ++i) store(w.k_t + (d + i) * stride + j, r[i]);
      }
    }
  }
#endif
  for (; j < num_keys; ++j) {
    const scalar_t* k = w.k + (first + j) * w.k_stride;
    for (int d = 0; d < D; ++d) w.k_t[d * stride + j] = static_cast<float>(k[d]);
  }
  for (; j < kKeyBlock; ++j) {
    for (int d = 0; d < D; ++d) w.k_t[d * stride + j] = 0.f;
  }
}

// The whole split for one row block: scores, exact softmax per row, P·V. Every
// sum runs in key order, so keys a row does not count add exact zeros.
template <typename scalar_t, class V, int kD, int kTileRows>
JAKIRO_ALWAYS_INLINE void attend_split(const SplitWork<scalar_t>& w) {
  const int D = head_size<kD>(w.head_dim);
  const int64_t n = w.scan_end - w.scan_begin;
  for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock) {
    const int num_keys = static_cast<int>(std::min<int64_t>(kKeyBlock, n - j0));
    transpose_keys(w, w.scan_begin + j0, num_keys, D);
    block_scores<V, kD, kTileRows>(w.q, w.k_t, w.scores + j0, w.score_stride, w.tiled_rows, D);
  }
  for (int64_t r = 0; r < w.tiled_rows; ++r) {
    float* s = w.scores + r * w.score_stride;
    if (r >= w.num_rows) {  // padding
      std::fill(s, s + n, 0.f);
      continue;
    }
    if (w.softcap > 0.f) soft_cap(s, n, w.softcap, w.inv_softcap);
    // Locals, not the row's fields, so the compiler knows s does not alias them.
    const int64_t first_tree_rank = w.rows[r].tree_rank;
    const float max = mask_row(w, w.rows[r], s);
    float sum = 0.f;
    if (max == kNegInf) {  // the row counts no key here
      std::fill(s, s + n, 0.f);
    } else {
      for (int64_t j = 0; j < n; ++j) s[j] = exp_nonpositive(s[j] - max);  // exp(-inf) == 0
      sum = probability_sum(w, w.rows[r], first_tree_rank, s);
    }
    w.rows[r].max = max;
    w.rows[r].sum = sum;
  }
  for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock) {
    const int num_keys = static_cast<int>(std::min<int64_t>(kKeyBlock, n - j0));
    const float* v_block = w.v_block;
    if (std::is_same_v<scalar_t, float> && w.v_stride == D) {  // float32 rows back to back: read in place
      v_block = reinterpret_cast<const float*>(w.v + (w.scan_begin + j0) * w.v_stride);
    } else {
      for (int j = 0; j < num_keys; ++j) {
        const scalar_t* v = w.v + (w.scan_begin + j0 + j) * w.v_stride;
        for (int d = 0; d < D; ++d) w.v_block[j * D + d] = static_cast<float>(v[d]);
      }
    }
    block_values<V, kD, kTileRows>(w.scores + j0, w.score_stride, v_block, num_keys, w.acc, w.tiled_rows, D);
  }
}

template <typename scalar_t, int kD>
void attend_split_portable(const SplitWork<scalar_t>& w) { attend_split<scalar_t, Vec8, kD, 4>(w); }

#if JAKIRO_X86_COPIES
template <typename scalar_t, int kD>
__attribute__((target("avx2,fma"))) void attend_split_avx2(const SplitWork<scalar_t>& w) {
  attend_split<scalar_t, Vec8, kD, 4>(w);
}
template <typename scalar_t, int kD>
__attribute__((target("avx512f,avx512vl"))) void attend_split_avx512(const SplitWork<scalar_t>& w) {
  attend_split<scalar_t, Vec16, kD, 12>(w);
}
#endif

template <typename scalar_t>
using SplitFn = void (*)(const SplitWork<scalar_t>&);

// The best copy this CPU runs, or the one JAKIRO_TREE_ATTENTION_KERNEL names
// (auto, avx512, avx2, portable). The variable also picks the CUDA kernel: its
// CUDA values (scalar, mma, mma_v1) mean auto here, any other value raises. The
// deprecated alias JAKIRO_TREE_ATTENTION_CPU (CPU values only) applies where
// JAKIRO_TREE_ATTENTION_KERNEL is unset.
const char* tree_attention_cpu_copy(const KernelEnv& env) {
  if (env.value == nullptr || std::strcmp(env.name, "JAKIRO_TREE_ATTENTION_KERNEL") != 0) return env.value;
  for (const char* cuda_value : {"scalar", "mma", "mma_v1"}) {
    if (std::strcmp(env.value, cuda_value) == 0) return nullptr;
  }
  bool cpu_value = false;
  for (const char* value : {"auto", "avx512", "avx2", "portable"}) cpu_value |= std::strcmp(env.value, value) == 0;
  JAKIRO_CHECK(cpu_value, kOp, "environment variable JAKIRO_TREE_ATTENTION_KERNEL must be auto, avx512, avx2 or "
               "portable (CPU copies) or scalar, mma or mma_v1 (CUDA kernels, auto on the CPU), got '", env.value, "'");
  return env.value;
}

template <typename scalar_t, int kD>
SplitFn<scalar_t> pick_split_step() {
  const KernelEnv env = read_kernel_env("JAKIRO_TREE_ATTENTION_KERNEL", "JAKIRO_TREE_ATTENTION_CPU");
  switch (choose_cpu_isa_value(tree_attention_cpu_copy(env), env.name, "portable", JAKIRO_X86_COPIES, kOp).isa) {
#if JAKIRO_X86_COPIES
    case CpuIsa::kAvx512: return &attend_split_avx512<scalar_t, kD>;
    case CpuIsa::kAvx2: return &attend_split_avx2<scalar_t, kD>;
#endif
    default: return &attend_split_portable<scalar_t, kD>;
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
  int64_t batch, hq, hkv, nq, cache_size, tree_len, window;
  int head_dim;
  float scale, softcap;
};

// Set bits among the first `count` bits of a mask row.
int64_t bits_before(const uint32_t* mask_row, int64_t count) {
  int64_t bits = 0;
  for (int64_t word = 0; word < count / 32; ++word) bits += std::bitset<32>(mask_row[word]).count();
  if (count % 32 != 0) bits += std::bitset<32>(mask_row[count / 32] & ((1u << (count % 32)) - 1u)).count();
  return bits;
}

// Merges one row's per-split results, weighting each by its share of the
// softmax mass, exp(lse - max), in split order (splits that saw nothing skipped).
template <typename scalar_t, int kD>
void merge_splits(const float* partial, int64_t partial_stride, const float* lse, int64_t lse_stride,
                  int64_t splits, scalar_t* out, int head_dim) {
  const int D = head_size<kD>(head_dim);
  float lse_max = kNegInf;
  for (int64_t sp = 0; sp < splits; ++sp) lse_max = std::max(lse_max, lse[sp * lse_stride]);
  float value[kMaxHeadDim] = {};
  float weight_sum = 0.f;
  if (lse_max != kNegInf) {
    for (int64_t sp = 0; sp < splits; ++sp) {
      if (lse[sp * lse_stride] == kNegInf) continue;
      const float weight = std::exp(lse[sp * lse_stride] - lse_max);
      weight_sum += weight;
      const float* o = partial + sp * partial_stride;
      for (int d = 0; d < D; ++d) value[d] += weight * o[d];
    }
  }
  const float inv = weight_sum > 0.f ? 1.f / weight_sum : 0.f;
  for (int d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(value[d] * inv);
}

template <typename scalar_t, int kD>
void tree_attention_cpu_impl(const Inputs<scalar_t>& in) {
  static_assert(kD % 8 == 0 && kD <= kMaxHeadDim, "the P·V micro-kernel takes 8 columns at a time");
  const int D = head_size<kD>(in.head_dim);
  const int64_t group = in.hq / in.hkv;
  const int64_t packed_rows = in.nq * group;
  const int64_t threads = at::get_num_threads();
  int64_t longest = 0;
  for (int64_t b = 0; b < in.batch; ++b) longest = std::max(longest, clamped_kv_len(in.seqlens[b], in.cache_size));
  const int64_t splits = std::max<int64_t>(1, (longest + kKeysPerSplit - 1) / kKeysPerSplit);
  // Rows go in even blocks of at most kRowBlock; with a single key split and too
  // few blocks to give every thread work, in more blocks of at least 8 rows. Rows
  // are independent, so this only moves work around (a tree of 8 nodes is 3 KV
  // heads x 24 rows: 6 blocks of 12 on 2 threads instead of 3 of 24).
  int64_t row_blocks = (packed_rows + kRowBlock - 1) / kRowBlock;
  while (splits == 1 && in.batch * in.hkv * row_blocks < 2 * threads && packed_rows >= 8 * (row_blocks + 1)) {
    ++row_blocks;
  }
  const int64_t block_rows = ((packed_rows + row_blocks - 1) / row_blocks + kRowQuantum - 1) / kRowQuantum * kRowQuantum;
  row_blocks = (packed_rows + block_rows - 1) / block_rows;
  const int64_t base_units = in.batch * in.hkv * row_blocks;
  // Units are (batch row, KV head, row block); when those alone cannot keep every
  // thread busy (decoding one sequence, say), each split is a unit of its own
  // and a second pass merges, else a unit runs its splits and merges them.
  const bool split_units = splits > 1 && base_units < 2 * threads;
  const int64_t total_rows = in.batch * in.hq * in.nq;
  std::vector<float> partial_out(split_units ? splits * total_rows * D : 0);
  std::vector<float> partial_lse(split_units ? splits * total_rows : 0);
  const SplitFn<scalar_t> attend = pick_split_step<scalar_t, kD>();

  at::parallel_for(0, split_units ? base_units * splits : base_units, 1, [&](int64_t unit0, int64_t unit1) {
    std::vector<float> q_buf(kRowBlock * D), acc(kRowBlock * D), k_t(D * key_stride(D)),
        v_block(kKeyBlock * D);
    std::vector<float> scores;
    std::vector<float> own_out(!split_units && splits > 1 ? splits * kRowBlock * D : 0);
    std::vector<float> own_lse(!split_units && splits > 1 ? splits * kRowBlock : 0);
    RowState rows[kRowBlock];
    for (int64_t unit = unit0; unit < unit1; ++unit) {
      const int64_t first_split = split_units ? unit % splits : 0;
      const int64_t last_split = split_units ? first_split + 1 : splits;
      const int64_t base = split_units ? unit / splits : unit;
      const int64_t row_block = base % row_blocks;
      const int64_t hkv = (base / row_blocks) % in.hkv;
      const int64_t b = base / (row_blocks * in.hkv);
      const int64_t r0 = row_block * block_rows;
      const int64_t num_rows = std::min(block_rows, packed_rows - r0);
      const int64_t tiled_rows = (num_rows + kRowQuantum - 1) / kRowQuantum * kRowQuantum;
      const int64_t kv_len = clamped_kv_len(in.seqlens[b], in.cache_size);
      const int64_t tree_start = in.has_mask ? query_key_range(kv_len, in.tree_len, true, in.nq, 0).dense_end : kv_len;

      // keys past every row's visible end, or before every row's window, are skipped
      int64_t begin = std::numeric_limits<int64_t>::max(), end = 0;
      std::fill(q_buf.begin(), q_buf.end(), 0.f);  // the micro-kernels work on whole tiles of rows
      for (int64_t r = 0; r < num_rows; ++r) {
        const int64_t i = (r0 + r) / group, h = hkv * group + (r0 + r) % group;
        rows[r].range = query_key_range(kv_len, in.tree_len, in.has_mask, in.nq, i);
        rows[r].mask_row = in.has_mask ? in.mask + (b * in.nq + i) * in.mask_words : nullptr;
        apply_window(rows[r].range, rows[r].mask_row, in.tree_len, in.window);
        begin = std::min(begin, rows[r].range.begin);
        end = std::max(end, rows[r].range.visible_end);
        const scalar_t* q = in.q + ((b * in.hq + h) * in.nq + i) * D;
        for (int d = 0; d < D; ++d) q_buf[r * D + d] = static_cast<float>(q[d]) * in.scale;
      }

      for (int64_t split = first_split; split < last_split; ++split) {
        SplitWork<scalar_t> w{};
        w.split_begin = split * kKeysPerSplit;
        w.split_end = w.split_begin + kKeysPerSplit;
        w.tree_start = tree_start;
        // A tree key's virtual position is at most its own, so a split that
        // reaches the tree reads all of it; no row counts a key before `begin`.
        w.scan_begin = std::max(w.split_begin, begin);
        w.scan_end = in.has_mask && tree_start < w.split_end ? end : std::min(end, w.split_end);
        std::fill(acc.begin(), acc.end(), 0.f);
        if (w.scan_begin < w.scan_end) {
          w.score_stride = (w.scan_end - w.scan_begin + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
          if (static_cast<int64_t>(scores.size()) < tiled_rows * w.score_stride) scores.resize(tiled_rows * w.score_stride);
          for (int64_t r = 0; r < num_rows; ++r) {
            rows[r].tree_rank = in.has_mask && w.scan_begin > tree_start
                                    ? bits_before(rows[r].mask_row, w.scan_begin - tree_start) : 0;
          }
          w.q = q_buf.data();
          w.acc = acc.data();
          w.rows = rows;
          w.num_rows = num_rows;
          w.tiled_rows = tiled_rows;
          w.head_dim = D;
          w.softcap = in.softcap;
          w.inv_softcap = in.softcap > 0.f ? 1.f / in.softcap : 0.f;
          w.k = in.k + b * in.k_strides[0] + hkv * in.k_strides[1];
          w.v = in.v + b * in.v_strides[0] + hkv * in.v_strides[1];
          w.k_stride = in.k_strides[2];
          w.v_stride = in.v_strides[2];
          w.k_t = k_t.data();
          w.v_block = v_block.data();
          w.scores = scores.data();
          attend(w);
        } else {
          for (int64_t r = 0; r < num_rows; ++r) rows[r].sum = 0.f;
        }

        for (int64_t r = 0; r < num_rows; ++r) {
          const int64_t i = (r0 + r) / group, h = hkv * group + (r0 + r) % group;
          const int64_t out_row = (b * in.hq + h) * in.nq + i;
          // A row that sees no key at all gets zeros.
          const float inv = rows[r].sum > 0.f ? 1.f / rows[r].sum : 0.f;
          if (splits == 1) {
            scalar_t* out = in.out + out_row * D;
            for (int d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[r * D + d] * inv);
            continue;
          }
          float* out = split_units ? partial_out.data() + (split * total_rows + out_row) * D
                                   : own_out.data() + (split * kRowBlock + r) * D;
          for (int d = 0; d < D; ++d) out[d] = acc[r * D + d] * inv;
          (split_units ? partial_lse[split * total_rows + out_row] : own_lse[split * kRowBlock + r]) =
              rows[r].sum > 0.f ? rows[r].max + std::log(rows[r].sum) : kNegInf;
        }
      }
      if (split_units || splits == 1) continue;
      for (int64_t r = 0; r < num_rows; ++r) {
        const int64_t i = (r0 + r) / group, h = hkv * group + (r0 + r) % group;
        merge_splits<scalar_t, kD>(own_out.data() + r * D, kRowBlock * D, own_lse.data() + r, kRowBlock, splits,
                                   in.out + ((b * in.hq + h) * in.nq + i) * D, D);
      }
    }
  });
  if (!split_units) return;
  at::parallel_for(0, total_rows, 16, [&](int64_t row0, int64_t row1) {
    for (int64_t row = row0; row < row1; ++row) {
      merge_splits<scalar_t, kD>(partial_out.data() + row * D, total_rows * D, partial_lse.data() + row, total_rows,
                                 splits, in.out + row * D, D);
    }
  });
}

// 64 and 128 compiled for their size; every other size (checked) at run time.
template <typename scalar_t>
void dispatch_head_dim(const Inputs<scalar_t>& in) {
  if (in.head_dim == 64) return tree_attention_cpu_impl<scalar_t, 64>(in);
  if (in.head_dim == 128) return tree_attention_cpu_impl<scalar_t, 128>(in);
  tree_attention_cpu_impl<scalar_t, kRuntimeHeadDim>(in);
}

template <typename scalar_t>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seqlens,
         const at::Tensor& mask, int64_t tree_len, double scale, int64_t window, double softcap, at::Tensor& out) {
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
  in.window = window;
  in.softcap = static_cast<float>(softcap);
  in.head_dim = static_cast<int>(q.size(3));
  dispatch_head_dim(in);
}

at::Tensor tree_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& seqlens_in,
                              const std::optional<at::Tensor>& tree_mask, int64_t tree_len,
                              double scale, bool validate, int64_t window, double softcap) {
  check_tree_attention_args(q_in, k_cache, v_cache, seqlens_in, tree_mask, tree_len, scale, window, softcap);
  // Always validated on the CPU, where reading the lengths costs nothing.
  (void)validate;
  check_tree_attention_seqlens(seqlens_in, k_cache.size(2), tree_len);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor seqlens = seqlens_in.contiguous();
  const at::Tensor mask = tree_mask.has_value() ? tree_mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(q, k_cache, v_cache, seqlens, mask, tree_len, scale, window, softcap, out); break;
    case at::kHalf: run<c10::Half>(q, k_cache, v_cache, seqlens, mask, tree_len, scale, window, softcap, out); break;
    case at::kBFloat16: run<c10::BFloat16>(q, k_cache, v_cache, seqlens, mask, tree_len, scale, window, softcap, out); break;
    default: JAKIRO_CHECK(false, kOp, "unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CPU, m) { m.impl("tree_attention", &tree_attention_cpu); }

}  // namespace jakiro

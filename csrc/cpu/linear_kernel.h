// The micro-kernel of the CPU linear op, written once over an instruction-set
// struct `Isa` and the element types Tx of x, bias and y and Tw of W (float, or
// uint16_t holding bfloat16). `Isa` has Vec (kWidth elements as loaded), Acc (16
// or 8 fp32 partial sums), zero, load (float32 or bfloat16 bits), fmadd (Vec x
// Vec + Acc) and sum. Included by linear_avx512.cpp, linear_avx512bf16.cpp and
// linear_avx2.cpp, each compiled for its instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "jakiro/linear.h"

namespace jakiro {
namespace linear_kernel {

constexpr int kWeightRows = 4;  // weight rows per tile
constexpr int kInputRows = 6;   // rows of x per tile: 4 x 6 accumulators + 5 loads fit 32 registers
constexpr int64_t kPrefetchBlocks = 4;  // blocks of weight rows the prefetch runs ahead (2-16: same speed)

inline float to_float(float v) { return v; }
inline float to_float(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline void store(float* out, float v) { *out = v; }
inline void store(uint16_t* out, float v) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  *out = (bits & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>((bits >> 16) | 0x40u)  // NaN stays NaN
                                            : static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// The last `count` < kWidth elements of a row as a vector, the lanes past them zero.
template <class Isa, class T>
inline typename Isa::Vec load_tail(const T* p, int count) {
  T padded[Isa::kWidth] = {};
  std::memcpy(padded, p, count * sizeof(T));
  return Isa::load(padded);
}

// y[m0 .. m0+R, n0 .. n0+C]: every accumulator runs along K for one (row of x, weight row),
// so each output's sum is the same sequence whatever R and C are (batch invariance).
template <class Isa, class Tx, class Tw, int R, int C>
inline void tile(const LinearProblem& p, int64_t m0, int64_t n0, const Tw* ahead, int first, int step) {
  using Vec = typename Isa::Vec;
  typename Isa::Acc acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Isa::zero();
  const Tx* x = static_cast<const Tx*>(p.x) + m0 * p.ldx;
  const Tw* w = static_cast<const Tw*>(p.w) + n0 * p.ldw;
  int64_t k = 0;
  for (; k + Isa::kWidth <= p.K; k += Isa::kWidth) {
    if (ahead != nullptr)
      for (int c = first; c < kWeightRows; c += step) __builtin_prefetch(ahead + c * p.ldw + k, 0, 2);
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = Isa::load(w + c * p.ldw + k);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Isa::load(x + r * p.ldx + k);
      for (int c = 0; c < C; ++c) acc[r][c] = Isa::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  if (k < p.K) {  // the last K % kWidth elements, lanes past the end read as zero
    const int rest = static_cast<int>(p.K - k);
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load_tail<Isa>(w + c * p.ldw + k, rest);
    for (int r = 0; r < R; ++r) {
      const Vec xv = load_tail<Isa>(x + r * p.ldx + k, rest);
      for (int c = 0; c < C; ++c) acc[r][c] = Isa::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  const Tx* bias = static_cast<const Tx*>(p.bias);
  for (int r = 0; r < R; ++r) {
    Tx* y = static_cast<Tx*>(p.y) + (m0 + r) * p.N + n0;
    for (int c = 0; c < C; ++c) store(y + c, Isa::sum(acc[r][c]) + (bias ? to_float(bias[n0 + c]) : 0.0f));
  }
}

// tile<R> for the `rows` (1..R) rows of x at m.
template <class Isa, class Tx, class Tw, int C, int R = kInputRows>
inline void rows_tile(const LinearProblem& p, int64_t m, int64_t n0, const Tw* ahead, int first, int step,
                      int64_t rows) {
  if constexpr (R > 0) {
    if (rows == R) return tile<Isa, Tx, Tw, R, C>(p, m, n0, ahead, first, step);
    rows_tile<Isa, Tx, Tw, C, R - 1>(p, m, n0, ahead, first, step, rows);
  }
}

// Weight rows [n0, n0 + C) against every row of x: the C weight rows stay in L1
// while the rows of x go by in tiles of equal height (M = 8 runs as 4 + 4, not
// 6 + 2: a short tile loads its weights for few multiplies).
template <class Isa, class Tx, class Tw, int C>
inline void column_block(const LinearProblem& p, int64_t n0, int64_t n_end) {
  // The tiles also pull a later block of weight rows into the cache (tile t the
  // rows t, t + tiles, ...), so the DRAM stream runs evenly while they compute:
  // the hardware prefetcher alone lags.
  const int64_t next = n0 + kPrefetchBlocks * kWeightRows;
  const Tw* ahead = next + kWeightRows <= n_end ? static_cast<const Tw*>(p.w) + next * p.ldw : nullptr;
  const int tiles = static_cast<int>((p.M + kInputRows - 1) / kInputRows);
  for (int t = 0, m = 0; t < tiles; ++t) {
    const int rows = static_cast<int>(p.M / tiles + (t < p.M % tiles ? 1 : 0));
    rows_tile<Isa, Tx, Tw, C>(p, m, n0, t < kWeightRows ? ahead : nullptr, t, tiles, rows);
    m += rows;
  }
}

// column_block<C> for the `columns` (1..C) weight rows at n.
template <class Isa, class Tx, class Tw, int C = kWeightRows>
inline void columns_block(const LinearProblem& p, int64_t n, int64_t n_end, int64_t columns) {
  if constexpr (C > 0) {
    if (columns == C) return column_block<Isa, Tx, Tw, C>(p, n, n_end);
    columns_block<Isa, Tx, Tw, C - 1>(p, n, n_end, columns);
  }
}

template <class Isa, class Tx, class Tw>
inline void columns(const LinearProblem& p, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; n += kWeightRows) {
    columns_block<Isa, Tx, Tw>(p, n, n_end, std::min<int64_t>(kWeightRows, n_end - n));
  }
}

// Dispatches on the problem's dtypes.
template <class Isa>
inline void columns(const LinearProblem& p, int64_t n_begin, int64_t n_end) {
  if (p.x_bf16) {
    columns<Isa, uint16_t, uint16_t>(p, n_begin, n_end);
  } else if (p.w_bf16) {
    columns<Isa, float, uint16_t>(p, n_begin, n_end);
  } else {
    columns<Isa, float, float>(p, n_begin, n_end);
  }
}

}  // namespace linear_kernel
}  // namespace jakiro

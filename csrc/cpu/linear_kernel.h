// The micro-kernel of the CPU linear op, written once over an instruction-set
// struct `Isa` (Vec, kWidth, zero, load, load_first, fmadd, sum). Included by
// linear_avx512.cpp and linear_avx2.cpp, each compiled for its instruction set.
#pragma once

#include <cstdint>

#include "jakiro/linear.h"

namespace jakiro {
namespace linear_kernel {

constexpr int kWeightRows = 4;  // weight rows per tile
constexpr int kInputRows = 6;   // rows of x per tile: 4 x 6 accumulators + 5 loads fit 32 registers
constexpr int64_t kPrefetchBlocks = 4;  // how many blocks of weight rows ahead the prefetch runs (2-8: same speed)

// y[m0 .. m0+R, n0 .. n0+C]: every accumulator runs along K for one (row of x, weight row),
// so each output's sum is the same sequence whatever R and C are (batch invariance).
template <class Isa, int R, int C>
inline void tile(const LinearProblem& p, int64_t m0, int64_t n0, const float* ahead) {
  using Vec = typename Isa::Vec;
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Isa::zero();
  const float* x = p.x + m0 * p.ldx;
  const float* w = p.w + n0 * p.ldw;
  int64_t k = 0;
  for (; k + Isa::kWidth <= p.K; k += Isa::kWidth) {
    if (ahead != nullptr)
      for (int c = 0; c < kWeightRows; ++c) __builtin_prefetch(ahead + c * p.ldw + k, 0, 3);
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
    for (int c = 0; c < C; ++c) wv[c] = Isa::load_first(w + c * p.ldw + k, rest);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Isa::load_first(x + r * p.ldx + k, rest);
      for (int c = 0; c < C; ++c) acc[r][c] = Isa::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* y = p.y + (m0 + r) * p.N + n0;
    for (int c = 0; c < C; ++c) y[c] = Isa::sum(acc[r][c]) + (p.bias ? p.bias[n0 + c] : 0.0f);
  }
}

// Weight rows [n0, n0 + C) against every row of x: the C weight rows stay in L1
// while the rows of x go by kInputRows at a time.
template <class Isa, int C>
inline void column_block(const LinearProblem& p, int64_t n0, int64_t n_end) {
  // The first tile also pulls a later block of weight rows into the cache, so the
  // DRAM stream runs while the tiles compute (the hardware prefetcher alone lags).
  const int64_t next = n0 + kPrefetchBlocks * kWeightRows;
  const float* ahead = next + kWeightRows <= n_end ? p.w + next * p.ldw : nullptr;
  int64_t m = 0;
  for (; m + kInputRows <= p.M; m += kInputRows, ahead = nullptr) tile<Isa, kInputRows, C>(p, m, n0, ahead);
  switch (p.M - m) {
    case 5: tile<Isa, 5, C>(p, m, n0, ahead); break;
    case 4: tile<Isa, 4, C>(p, m, n0, ahead); break;
    case 3: tile<Isa, 3, C>(p, m, n0, ahead); break;
    case 2: tile<Isa, 2, C>(p, m, n0, ahead); break;
    case 1: tile<Isa, 1, C>(p, m, n0, ahead); break;
    default: break;
  }
}

template <class Isa>
inline void columns(const LinearProblem& p, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kWeightRows <= n_end; n += kWeightRows) column_block<Isa, kWeightRows>(p, n, n_end);
  switch (n_end - n) {
    case 3: column_block<Isa, 3>(p, n, n_end); break;
    case 2: column_block<Isa, 2>(p, n, n_end); break;
    case 1: column_block<Isa, 1>(p, n, n_end); break;
    default: break;
  }
}

}  // namespace linear_kernel
}  // namespace jakiro

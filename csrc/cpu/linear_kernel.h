// The micro-kernel of the CPU linear op, written once over an instruction-set
// struct `Isa` (Vec, kWidth, zero, load, fmadd, sum; load takes float32 or
// bfloat16 bits) and an element type T (float, or uint16_t holding bfloat16).
// Included by linear_avx512.cpp and linear_avx2.cpp, each compiled for its
// instruction set.
#pragma once

#include <cstdint>
#include <cstring>

#include "jakiro/linear.h"

namespace jakiro {
namespace linear_kernel {

constexpr int kWeightRows = 4;  // weight rows per tile
constexpr int kInputRows = 6;   // rows of x per tile: 4 x 6 accumulators + 5 loads fit 32 registers
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

constexpr int64_t kPrefetchBlocks = 4;  // how many blocks of weight rows ahead the prefetch runs (2-8: same speed)

// y[m0 .. m0+R, n0 .. n0+C]: every accumulator runs along K for one (row of x, weight row),
// so each output's sum is the same sequence whatever R and C are (batch invariance).
template <class Isa, class T, int R, int C>
inline void tile(const LinearProblem& p, int64_t m0, int64_t n0, const T* ahead) {
  using Vec = typename Isa::Vec;
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Isa::zero();
  const T* x = static_cast<const T*>(p.x) + m0 * p.ldx;
  const T* w = static_cast<const T*>(p.w) + n0 * p.ldw;
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
    for (int c = 0; c < C; ++c) wv[c] = load_tail<Isa>(w + c * p.ldw + k, rest);
    for (int r = 0; r < R; ++r) {
      const Vec xv = load_tail<Isa>(x + r * p.ldx + k, rest);
      for (int c = 0; c < C; ++c) acc[r][c] = Isa::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  const T* bias = static_cast<const T*>(p.bias);
  for (int r = 0; r < R; ++r) {
    T* y = static_cast<T*>(p.y) + (m0 + r) * p.N + n0;
    for (int c = 0; c < C; ++c) store(y + c, Isa::sum(acc[r][c]) + (bias ? to_float(bias[n0 + c]) : 0.0f));
  }
}

// Weight rows [n0, n0 + C) against every row of x: the C weight rows stay in L1
// while the rows of x go by kInputRows at a time.
template <class Isa, class T, int C>
inline void column_block(const LinearProblem& p, int64_t n0, int64_t n_end) {
  // The first tile also pulls a later block of weight rows into the cache, so the
  // DRAM stream runs while the tiles compute (the hardware prefetcher alone lags).
  const int64_t next = n0 + kPrefetchBlocks * kWeightRows;
  const T* ahead = next + kWeightRows <= n_end ? static_cast<const T*>(p.w) + next * p.ldw : nullptr;
  int64_t m = 0;
  for (; m + kInputRows <= p.M; m += kInputRows, ahead = nullptr) tile<Isa, T, kInputRows, C>(p, m, n0, ahead);
  switch (p.M - m) {
    case 5: tile<Isa, T, 5, C>(p, m, n0, ahead); break;
    case 4: tile<Isa, T, 4, C>(p, m, n0, ahead); break;
    case 3: tile<Isa, T, 3, C>(p, m, n0, ahead); break;
    case 2: tile<Isa, T, 2, C>(p, m, n0, ahead); break;
    case 1: tile<Isa, T, 1, C>(p, m, n0, ahead); break;
    default: break;
  }
}

template <class Isa, class T>
inline void columns(const LinearProblem& p, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kWeightRows <= n_end; n += kWeightRows) column_block<Isa, T, kWeightRows>(p, n, n_end);
  switch (n_end - n) {
    case 3: column_block<Isa, T, 3>(p, n, n_end); break;
    case 2: column_block<Isa, T, 2>(p, n, n_end); break;
    case 1: column_block<Isa, T, 1>(p, n, n_end); break;
    default: break;
  }
}

}  // namespace linear_kernel
}  // namespace jakiro

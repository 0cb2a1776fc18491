// The CPU linear kernel for bfloat16 x and W on CPUs with AMX (Intel Sapphire
// Rapids and later): tdpbf16ps multiplies a 16 x 32 tile of bfloat16 by a 32 x 16
// one into 16 x 16 fp32 sums. oneDNN's AMX GEMM beats the AVX512_BF16 dot
// products 1.5-4x from 16 rows on (BENCHMARKS.md, "linear"), but its sums are
// not batch-invariant; this copy is. The weight is the A tile, 16 of nn.Linear's
// [N, K] rows read in place; the rows of x, repacked into AMX's pair-interleaved
// layout, are the B tile's columns. Output (n, m) then sums W row n against x row
// m, K in chunks of 32 in order, whatever the other rows of x are: the same
// numbers at every row count (the unused columns of a B tile are zeros). Sums
// are fp32; like vdpbf16ps, AMX treats subnormal inputs and outputs as zero.
#include "jakiro/linear.h"
#if JAKIRO_LINEAR_X86_KERNELS
#pragma GCC target("avx512f,amx-tile,amx-bf16")
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "linear_kernel.h"

namespace jakiro {
namespace {

constexpr int kTile = 16;        // rows of a tile: weight rows (A), k pairs (B), outputs (C)
constexpr int kChunk = 32;       // K values per tile product
constexpr int kMaxColumnTiles = 4;  // tiles of 16 rows of x per pass (tmm0-3; A is tmm4, B tmm5)

// Palette 1, six 16 x 64-byte tiles: C0-C3 (fp32 16 x 16), A (bf16 16 x 32), B (bf16 16 pairs x 16).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 6; ++t) {
      bytes_per_row[t] = 64;
      rows[t] = kTile;
    }
  }
};

// tmm0..tmm<C-1> += A (16 weight rows, one K chunk) x B (the chunk of tile c of x), every chunk.
template <int C>
void tile_products(const uint16_t* w, int64_t ldw_bytes, const uint16_t* packed, int64_t tile_elems, int64_t K) {
  for (int64_t k = 0; k < K; k += kChunk) {
    _tile_loadd(4, w + k, ldw_bytes);
    const uint16_t* b = packed + k * kTile;  // a chunk is 16 pair rows of 32 values
    _tile_loadd(5, b, 64);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (C > 1) {
      _tile_loadd(5, b + tile_elems, 64);
      _tile_dpbf16ps(1, 4, 5);
    }
    if constexpr (C > 2) {
      _tile_loadd(5, b + 2 * tile_elems, 64);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (C > 3) {
      _tile_loadd(5, b + 3 * tile_elems, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
}

// The 16 sums + bias of one x row, rounded to bfloat16 as linear_kernel::store
// rounds each (nearest even; a NaN stays a quiet NaN), stored to y_row.
inline void store_row(__m512 sums, __m512 bias, uint16_t* y_row) {
  const __m512i bits = _mm512_castps_si512(_mm512_add_ps(sums, bias));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                 _mm512_set1_epi32(0x7f800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y_row),
                      _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet)));
}

// y[m0 .. m0 + rows, n0 .. n0 + n_rows] from the C tiles (tile c: x rows m0 + 16c ..), plus the bias.
void store_tiles(const LinearProblem& p, int C, int64_t m0, int64_t rows, int64_t n0, int64_t n_rows) {
  alignas(64) float out[kMaxColumnTiles][kTile][kTile];  // [x tile][weight row][x row]
  _tile_stored(0, out[0], 64);
  if (C > 1) _tile_stored(1, out[1], 64);
  if (C > 2) _tile_stored(2, out[2], 64);
  if (C > 3) _tile_stored(3, out[3], 64);
  const uint16_t* bias = static_cast<const uint16_t*>(p.bias);
  uint16_t* y = static_cast<uint16_t*>(p.y);
  if (n_rows == kTile) {  // a column of a tile (its 16 weight rows for one x row) per gather
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(kTile));
    const __m512 bias_row = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                       _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + n0))), 16))
                                 : _mm512_setzero_ps();
    for (int64_t m = 0; m < rows; ++m) {
      const __m512 sums = _mm512_i32gather_ps(column, &out[m / kTile][0][m % kTile], 4);
      store_row(sums, bias_row, y + (m0 + m) * p.N + n0);
    }
    return;
  }
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t i = 0; i < n_rows; ++i) {
      const float sum = out[m / kTile][i][m % kTile] + (bias ? linear_kernel::to_float(bias[n0 + i]) : 0.0f);
      linear_kernel::store(y + (m0 + m) * p.N + n0 + i, sum);
    }
  }
}

}  // namespace

bool amx_usable() {
  // Linux hands out the AMX tile state only to processes that ask (arch_prctl
  // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); asking again is harmless.
  static const bool usable = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                             syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return usable;
}

int64_t amx_packed_x_elems(const LinearProblem& p) {
  const int64_t tiles = (p.M + kTile - 1) / kTile;
  return tiles * kTile * p.K;
}

void amx_pack_x(const LinearProblem& p, uint16_t* packed) {
  // Tile t, pair row r = k / 2: the pairs (x[m][2r], x[m][2r + 1]) of its 16 x rows
  // m, side by side; rows past M are zeros. A pair moves as one 32-bit word.
  const int64_t pairs = p.K / 2, tiles = (p.M + kTile - 1) / kTile;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  for (int64_t t = 0; t < tiles; ++t) {
    uint32_t* tile = reinterpret_cast<uint32_t*>(packed + t * kTile * p.K);
    for (int64_t j = 0; j < kTile; ++j) {
      const int64_t m = t * kTile + j;
      if (m >= p.M) {
        for (int64_t r = 0; r < pairs; ++r) tile[r * kTile + j] = 0;
        continue;
      }
      const uint16_t* row = x + m * p.ldx;
      for (int64_t r = 0; r < pairs; ++r) {
        uint32_t pair;
        std::memcpy(&pair, row + 2 * r, sizeof pair);
        tile[r * kTile + j] = pair;
      }
    }
  }
}

void linear_columns_amx(const LinearProblem& p, const uint16_t* packed, int64_t n_begin, int64_t n_end) {
  static const TileConfig config;
  _tile_loadconfig(&config);  // per thread, and oneDNN may have loaded its own
  const uint16_t* w = static_cast<const uint16_t*>(p.w);
  const int64_t tile_elems = kTile * p.K;
  std::vector<uint16_t> tail;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
    const int64_t n_rows = std::min<int64_t>(kTile, n_end - n0);
    const uint16_t* a = w + n0 * p.ldw;
    int64_t ld = p.ldw;
    if (n_rows < kTile) {  // a tile load reads 16 rows: give it zeros past the last one
      tail.assign(kTile * p.K, 0);
      for (int64_t i = 0; i < n_rows; ++i) std::memcpy(tail.data() + i * p.K, a + i * p.ldw, p.K * sizeof(uint16_t));
      a = tail.data();
      ld = p.K;
    }
    for (int64_t m0 = 0; m0 < p.M; m0 += kMaxColumnTiles * kTile) {
      const int64_t rows = std::min<int64_t>(kMaxColumnTiles * kTile, p.M - m0);
      const int C = static_cast<int>((rows + kTile - 1) / kTile);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* b = packed + (m0 / kTile) * tile_elems;
      switch (C) {
        case 1: tile_products<1>(a, ld * 2, b, tile_elems, p.K); break;
        case 2: tile_products<2>(a, ld * 2, b, tile_elems, p.K); break;
        case 3: tile_products<3>(a, ld * 2, b, tile_elems, p.K); break;
        default: tile_products<4>(a, ld * 2, b, tile_elems, p.K); break;
      }
      store_tiles(p, C, m0, rows, n0, n_rows);
    }
  }
  _tile_release();
}

}  // namespace jakiro
#endif

// The CPU linear micro-kernel for bfloat16 x and W on CPUs with AVX512_BF16:
// vdpbf16ps multiplies 32 bfloat16 pairs into 16 fp32 sums in one instruction,
// where the avx512 copy widens 16 of each to fp32 first (two extra instructions
// per load), so bfloat16 stays bound by the weight stream to more rows. Products
// of bfloat16 are exact in fp32; vdpbf16ps rounds each sum to nearest even and
// treats subnormal inputs as zero. See linear_avx512.cpp.
#include "jakiro/linear.h"
#if JAKIRO_LINEAR_X86_KERNELS
#pragma GCC target("avx512f,avx512bf16")
#include <immintrin.h>

#include "linear_kernel.h"

namespace jakiro {
namespace {

struct Avx512Bf16 {
  using Vec = __m512bh;  // 32 bfloat16
  using Acc = __m512;    // lane i sums the pairs 2i, 2i + 1 of every step
  static constexpr int kWidth = 32;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Vec load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static Acc fmadd(Vec a, Vec b, Acc c) { return _mm512_dpbf16_ps(c, a, b); }
  static float sum(Acc v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace

void linear_columns_avx512bf16(const LinearProblem& p, int64_t n_begin, int64_t n_end) {
  linear_kernel::columns<Avx512Bf16, uint16_t, uint16_t>(p, n_begin, n_end);
}

}  // namespace jakiro
#endif

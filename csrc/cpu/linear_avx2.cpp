// The CPU linear micro-kernel compiled for AVX2 + FMA (8 floats per vector),
// for x86 CPUs without AVX-512. See linear_avx512.cpp.
#include "jakiro/linear.h"
#if JAKIRO_LINEAR_X86_KERNELS
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "linear_kernel.h"

namespace jakiro {
namespace {

struct Avx2 {
  using Vec = __m256;
  using Acc = Vec;
  static constexpr int kWidth = 8;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load(const uint16_t* p) {  // 8 bfloat16: widen to 32 bits, shift into the high half
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

}  // namespace

void linear_columns_avx2(const LinearProblem& p, int64_t n_begin, int64_t n_end) {
  linear_kernel::columns<Avx2>(p, n_begin, n_end);
}

}  // namespace jakiro
#endif

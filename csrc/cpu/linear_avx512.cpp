// The CPU linear micro-kernel compiled for AVX-512 (16 floats per vector). The
// pragma applies to everything below it, so the templates in linear_kernel.h
// are instantiated with AVX-512 enabled; the op picks this copy at run time.
#include "jakiro/linear.h"
#if JAKIRO_LINEAR_X86_KERNELS
#pragma GCC target("avx512f")
#include <immintrin.h>

#include "linear_kernel.h"

namespace jakiro {
namespace {

struct Avx512 {
  using Vec = __m512;
  using Acc = Vec;
  static constexpr int kWidth = 16;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(const uint16_t* p) {  // 16 bfloat16: widen to 32 bits, shift into the high half
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(Vec v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace

void linear_columns_avx512(const LinearProblem& p, int64_t n_begin, int64_t n_end) {
  linear_kernel::columns<Avx512>(p, n_begin, n_end);
}

}  // namespace jakiro
#endif

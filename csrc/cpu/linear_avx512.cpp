// The CPU linear micro-kernel compiled for AVX-512 (16 floats per vector). The
// pragma applies to everything below it, so the templates in linear_kernel.h
// are instantiated with AVX-512 enabled; the op picks this copy at run time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx512f")
#include <immintrin.h>

#include "linear_kernel.h"

namespace jakiro {
namespace {

struct Avx512 {
  using Vec = __m512;
  static constexpr int kWidth = 16;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load_first(const float* p, int count) {  // lanes from `count` on are zero, never read
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), p);
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

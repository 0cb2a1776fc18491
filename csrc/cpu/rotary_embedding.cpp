// The rotary_embedding op (contract: jakiro.ops.rotary_embedding), Hugging Face's
// apply_rotary_pos_emb in one call: x * cos + rotate_half(x) * sin for the queries
// and the keys, with rotate_half(x) = [-x2, x1].
//
// Why it exists: Hugging Face runs it as about a dozen tensor ops (two slices, a
// negation and a concatenation per rotate_half, then the products and sums), each a
// dispatch of a few microseconds on a few hundred values; SmolLM2 pays them in
// every layer, about 2 ms of a 25 ms one-token step on a 2-core CPU. The kernel
// rounds exactly where the tensor ops do (each product, then the sum, to the
// input dtype; no fused multiply-add), so its outputs are Hugging Face's bit for
// bit, and every element depends on its own row only: batch-invariant.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "jakiro/rotary_embedding.h"

// A fused multiply-add would round once where the tensor ops round twice.
#if defined(__GNUC__) && !defined(__clang__)
#define JAKIRO_NO_FMA __attribute__((optimize("fp-contract=off")))
#else
#define JAKIRO_NO_FMA
#endif

namespace jakiro {
namespace {

constexpr int64_t kMinValuesPerTask = 1 << 14;  // smaller chunks are not worth a thread

// out[r] = x[r] * cos[t] + rotate_half(x[r]) * sin[t] for every row r = (b, h, t) of x.
template <typename scalar_t>
JAKIRO_NO_FMA void rotate_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t heads = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  const int64_t rows = x.size(0) * heads * T;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* cp = cos.const_data_ptr<scalar_t>();
  const scalar_t* sp = sin.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t cs0 = cos.stride(0), cs1 = cos.stride(1), ss0 = sin.stride(0), ss1 = sin.stride(1);
  const int64_t grain = std::max<int64_t>(1, kMinValuesPerTask / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (heads * T), h = (r / T) % heads, t = r % T;
      const scalar_t* xr = xp + b * xs0 + h * xs1 + t * xs2;
      const scalar_t* c = cp + b * cs0 + t * cs1;
      const scalar_t* s = sp + b * ss0 + t * ss1;
      scalar_t* o = op + r * D;
      for (int64_t d = 0; d < D; ++d) {
        // rotate_half: [-x2, x1]; negating is exact, so -(x2 * s) == (-x2) * s
        const float rotated = d < half ? -static_cast<float>(xr[d + half]) : static_cast<float>(xr[d - half]);
        const scalar_t straight = static_cast<scalar_t>(static_cast<float>(xr[d]) * static_cast<float>(c[d]));
        const scalar_t turned = static_cast<scalar_t>(rotated * static_cast<float>(s[d]));
        o[d] = static_cast<scalar_t>(static_cast<float>(straight) + static_cast<float>(turned));
      }
    }
  });
}

at::Tensor rotate(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin) {
  const at::Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_embedding",
                                  [&] { rotate_rows<scalar_t>(x, cos, sin, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& cos_in, const at::Tensor& sin_in) {
  check_rotary_embedding_args(q, k, cos_in, sin_in);
  const at::Tensor cos = cos_in.stride(2) == 1 ? cos_in : cos_in.contiguous();
  const at::Tensor sin = sin_in.stride(2) == 1 ? sin_in : sin_in.contiguous();
  return {rotate(q, cos, sin), rotate(k, cos, sin)};
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CPU, m) { m.impl("rotary_embedding", &rotary_embedding_cpu); }

}  // namespace jakiro

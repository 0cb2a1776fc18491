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

#include <tuple>

#include "jakiro/checks.h"

// A fused multiply-add would round once where the tensor ops round twice.
#if defined(__GNUC__) && !defined(__clang__)
#define JAKIRO_NO_FMA __attribute__((optimize("fp-contract=off")))
#else
#define JAKIRO_NO_FMA
#endif

namespace jakiro {
namespace {

constexpr const char* kOp = "rotary_embedding";
constexpr int64_t kMinValuesPerTask = 1 << 14;  // smaller chunks are not worth a thread

void check_rotary_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  check_dim(q, kOp, "q", 4, "[B, Hq, T, D]");
  check_dim(k, kOp, "k", 4, "[B, Hkv, T, D]");
  check_dim(cos, kOp, "cos", 3, "[B, T, D]");
  check_dim(sin, kOp, "sin", 3, "[B, T, D]");
  const at::ScalarType dtype = q.scalar_type();
  JAKIRO_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
               "q must be float32, bfloat16 or float16, got ", dtype);
  for (const auto& [t, name] : {std::pair{k, "k"}, std::pair{cos, "cos"}, std::pair{sin, "sin"}}) {
    JAKIRO_CHECK(t.scalar_type() == dtype, kOp, name, " must have q's dtype ", dtype, ", got ", t.scalar_type());
    check_same_device(q, "q", t, name, kOp);
  }
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3);
  JAKIRO_CHECK(D % 2 == 0, kOp, "the head size D must be even, got ", D);
  JAKIRO_CHECK(k.size(0) == B && k.size(2) == T && k.size(3) == D, kOp, "k must have q's B, T and D (q is ",
               q.sizes(), "), got ", k.sizes());
  JAKIRO_CHECK(cos.sizes() == at::IntArrayRef({B, T, D}) && sin.sizes() == cos.sizes(), kOp,
               "cos and sin must have shape [B, T, D] = [", B, ", ", T, ", ", D, "], got ", cos.sizes(), " and ",
               sin.sizes());
}

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
  check_rotary_args(q, k, cos_in, sin_in);
  const at::Tensor cos = cos_in.stride(2) == 1 ? cos_in : cos_in.contiguous();
  const at::Tensor sin = sin_in.stride(2) == 1 ? sin_in : sin_in.contiguous();
  return {rotate(q, cos, sin), rotate(k, cos, sin)};
}

#if JAKIRO_WITH_CUDA
// On a GPU, Hugging Face's tensor ops (the CPU's dispatch cost is what the kernel saves).
at::Tensor rotate_aten(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(3) / 2;
  const at::Tensor rotated = at::cat({-x.narrow(3, half, half), x.narrow(3, 0, half)}, 3);
  return (x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).contiguous();
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& cos, const at::Tensor& sin) {
  check_rotary_args(q, k, cos, sin);
  return {rotate_aten(q, cos, sin), rotate_aten(k, cos, sin)};
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CPU, m) { m.impl("rotary_embedding", &rotary_embedding_cpu); }
#if JAKIRO_WITH_CUDA
TORCH_LIBRARY_IMPL(jakiro, CUDA, m) { m.impl("rotary_embedding", &rotary_embedding_cuda); }
#endif

}  // namespace jakiro

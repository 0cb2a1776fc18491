// Argument checks of rotary_embedding (include/jakiro/rotary_embedding.h), shared
// by its CPU kernel and its CUDA registration.
#include "jakiro/rotary_embedding.h"

#include <utility>

#include "jakiro/checks.h"

namespace jakiro {
namespace {
constexpr const char* kOp = "rotary_embedding";
}

void check_rotary_embedding_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                 const at::Tensor& sin) {
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

}  // namespace jakiro

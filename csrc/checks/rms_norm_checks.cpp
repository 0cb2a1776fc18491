// Argument checks of rms_norm (include/jakiro/rms_norm.h), shared by its CPU
// kernel and its CUDA registration.
#include "jakiro/rms_norm.h"

#include <cmath>

#include "jakiro/checks.h"

namespace jakiro {
namespace {
constexpr const char* kOp = "rms_norm";
}

void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps) {
  JAKIRO_CHECK(x.dim() >= 1, kOp, "x must have shape [..., H], got a 0-dimensional tensor");
  const at::ScalarType dtype = x.scalar_type();
  JAKIRO_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
               "x must be float32, bfloat16 or float16, got ", dtype);
  check_dim(weight, kOp, "weight", 1, "[H]");
  JAKIRO_CHECK(weight.size(0) == x.size(-1), kOp, "weight must have x's last dimension H = ", x.size(-1),
               " entries, got ", weight.size(0));
  JAKIRO_CHECK(weight.scalar_type() == dtype, kOp, "weight must have x's dtype ", dtype, ", got ",
               weight.scalar_type());
  check_same_device(x, "x", weight, "weight", kOp);
  JAKIRO_CHECK(std::isfinite(eps) && eps >= 0, kOp, "eps must be a finite number >= 0, got ", eps);
}

}  // namespace jakiro

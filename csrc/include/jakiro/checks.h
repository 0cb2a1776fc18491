// Argument checks shared by every op. Each failure raises a Python ValueError
// whose message starts with "<op>: <argument> ..." so users see what to fix.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define JAKIRO_CHECK(cond, op, ...) TORCH_CHECK_VALUE((cond), op, ": ", __VA_ARGS__)

namespace jakiro {

inline void check_dtype(const at::Tensor& t, const char* op, const char* name, at::ScalarType want) {
  JAKIRO_CHECK(t.scalar_type() == want, op, name, " must be ", want, ", got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t want,
                      const char* shape) {
  JAKIRO_CHECK(t.dim() == want, op, name, " must have shape ", shape, " (", want,
               " dimensions), got ", t.dim(), " dimensions ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name, const char* op) {
  JAKIRO_CHECK(a.device() == b.device(), op, a_name, " and ", b_name,
               " must be on the same device, got ", a.device(), " and ", b.device());
}

}  // namespace jakiro

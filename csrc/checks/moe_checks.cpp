// Argument checks of the grouped expert ops (include/jakiro/moe.h), shared by
// their CPU and CUDA kernels so both reject the same inputs with the same words.
#include "jakiro/moe.h"

#include "jakiro/checks.h"

#include <string>

namespace jakiro {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

ExpertActivation check_expert_activation(c10::string_view activation, const char* op) {
  if (activation == "silu") return ExpertActivation::kSilu;
  if (activation == "gelu_tanh") return ExpertActivation::kGeluTanh;
  JAKIRO_CHECK(false, op, "activation must be \"silu\" or \"gelu_tanh\", got \"",
               std::string(activation.data(), activation.size()), "\"");
  return ExpertActivation::kSilu;  // unreachable
}

ExpertMlpShape check_expert_mlp_args(const at::Tensor& x, const at::Tensor& w_gate_up,
                                     const at::Tensor& w_down, const at::Tensor& coeff,
                                     const char* op) {
  check_dim(x, op, "x", 2, "[T, H]");
  check_dim(w_gate_up, op, "w_gate_up", 3, "[E, 2I, H]");
  check_dim(w_down, op, "w_down", 3, "[E, H, I]");
  check_dim(coeff, op, "coeff", 3, "[T, R, E]");
  check_same_device(x, "x", w_gate_up, "w_gate_up", op);
  check_same_device(x, "x", w_down, "w_down", op);
  check_same_device(x, "x", coeff, "coeff", op);
  JAKIRO_CHECK(is_supported_float(x.scalar_type()), op,
               "x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  check_dtype(w_gate_up, op, "w_gate_up", x.scalar_type());
  check_dtype(w_down, op, "w_down", x.scalar_type());
  JAKIRO_CHECK(coeff.scalar_type() == at::kFloat || coeff.scalar_type() == x.scalar_type(), op,
               "coeff must be float32 or x's dtype ", x.scalar_type(), ", got ", coeff.scalar_type());

  ExpertMlpShape s{x.size(0), x.size(1), 0, w_gate_up.size(0), coeff.size(1)};
  JAKIRO_CHECK(s.hidden >= 1, op, "x must have H >= 1 columns, got shape ", x.sizes());
  JAKIRO_CHECK(s.experts >= 1, op, "w_gate_up must hold at least one expert, got shape ",
               w_gate_up.sizes());
  JAKIRO_CHECK(w_gate_up.size(2) == s.hidden, op, "w_gate_up has shape ", w_gate_up.sizes(),
               " but its last dimension must equal H = ", s.hidden, " (x's columns)");
  JAKIRO_CHECK(w_gate_up.size(1) >= 2 && w_gate_up.size(1) % 2 == 0, op, "w_gate_up has shape ",
               w_gate_up.sizes(), ": its middle dimension must be 2I (gate rows, then up rows), I >= 1");
  s.intermediate = w_gate_up.size(1) / 2;
  JAKIRO_CHECK(w_down.size(0) == s.experts, op, "w_down has ", w_down.size(0),
               " experts but w_gate_up has ", s.experts);
  JAKIRO_CHECK(w_down.size(1) == s.hidden, op, "w_down has shape ", w_down.sizes(),
               " but must be [E, H, I] with H = ", s.hidden);
  JAKIRO_CHECK(w_down.size(2) == s.intermediate, op, "w_down has shape ", w_down.sizes(),
               " but its last dimension must equal I = ", s.intermediate,
               " (half of w_gate_up's middle dimension)");
  JAKIRO_CHECK(coeff.size(0) == s.tokens, op, "coeff has shape ", coeff.sizes(),
               " but must be [T, R, E] with T = ", s.tokens, " (x's rows)");
  JAKIRO_CHECK(coeff.size(2) == s.experts, op, "coeff has shape ", coeff.sizes(),
               " but must be [T, R, E] with E = ", s.experts);
  JAKIRO_CHECK(s.heads >= 1 && s.heads <= kMaxRoutingHeads, op, "coeff has R = ", s.heads,
               " routing heads; 1 to ", kMaxRoutingHeads, " are supported");
  return s;
}

GroupedGemmShape check_grouped_gemm_args(const at::Tensor& x, const at::Tensor& w,
                                         const at::Tensor& expert_offsets, const char* op) {
  check_dim(x, op, "x", 2, "[T, K]");
  check_dim(w, op, "w", 3, "[E, N, K]");
  check_dim(expert_offsets, op, "expert_offsets", 1, "[E + 1]");
  check_same_device(x, "x", w, "w", op);
  check_same_device(x, "x", expert_offsets, "expert_offsets", op);
  JAKIRO_CHECK(is_supported_float(x.scalar_type()), op,
               "x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  check_dtype(w, op, "w", x.scalar_type());
  check_dtype(expert_offsets, op, "expert_offsets", at::kInt);
  GroupedGemmShape s{x.size(0), x.size(1), w.size(1), w.size(0)};
  JAKIRO_CHECK(s.experts >= 1, op, "w must hold at least one expert, got shape ", w.sizes());
  JAKIRO_CHECK(w.size(2) == s.k, op, "w has shape ", w.sizes(),
               " but its last dimension must equal K = ", s.k, " (x's columns)");
  JAKIRO_CHECK(expert_offsets.size(0) == s.experts + 1, op, "expert_offsets must have E + 1 = ",
               s.experts + 1, " entries, got ", expert_offsets.size(0));
  JAKIRO_CHECK(s.rows <= INT32_MAX, op, "x has ", s.rows, " rows; at most 2^31 - 1 are supported");
  return s;
}

void check_expert_offsets_values(const at::Tensor& offsets_cpu, int64_t rows, const char* op) {
  const at::Tensor o = offsets_cpu.contiguous();
  const int32_t* v = o.const_data_ptr<int32_t>();
  const int64_t n = o.size(0);
  JAKIRO_CHECK(v[0] == 0, op, "expert_offsets[0] = ", v[0], " but must be 0");
  for (int64_t e = 1; e < n; ++e) {
    JAKIRO_CHECK(v[e] >= v[e - 1], op, "expert_offsets must be non-decreasing, but expert_offsets[",
                 e, "] = ", v[e], " < expert_offsets[", e - 1, "] = ", v[e - 1]);
  }
  JAKIRO_CHECK(v[n - 1] == rows, op, "expert_offsets[", n - 1, "] = ", v[n - 1],
               " but must equal T = ", rows, " (x's rows)");
}

}  // namespace jakiro

// CPU kernel of expert_mlp. Per expert: gather the tokens routed to it (any
// non-zero coefficient), run the gated MLP (SwiGLU or GeGLU) on them with two matrix products in
// the accumulation type (fp32, or fp64 for double inputs), and add each routing
// head's weighted result into an fp32/fp64 accumulator. Unrouted tokens cost nothing.
// With few tokens (drafting) the products run on the linear kernel, which reads
// float32 or bfloat16 weights as they are; otherwise the weights are converted.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "jakiro/linear.h"
#include "jakiro/moe.h"

namespace jakiro {
namespace {

// x_acc [n, K] (float32 or float64) times the expert's weight rows w [N, K] into x_acc's dtype [n, N].
at::Tensor expert_product(const at::Tensor& x_acc, const at::Tensor& w) {
  at::Tensor out;
  if (linear_on_kernel(x_acc, w, at::Tensor(), out, "expert_mlp")) return out;
  return at::mm(x_acc, w.to(x_acc.scalar_type()).t());
}

at::Tensor expert_mlp_cpu(const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                          const at::Tensor& coeff, c10::string_view activation) {
  const ExpertActivation act = check_expert_activation(activation, "expert_mlp");
  const ExpertMlpShape s = check_expert_mlp_args(x, w_gate_up, w_down, coeff, "expert_mlp");
  // Half-precision products would round every partial sum; accumulate in fp32 (fp64 stays fp64).
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor coeff_acc = coeff.to(acc_type);
  const at::Tensor routed = coeff_acc.ne(0).any(1);  // [T, E]: token t uses expert e
  at::Tensor out = at::zeros({s.heads, s.tokens, s.hidden}, x.options().dtype(acc_type));

  for (int64_t e = 0; e < s.experts; ++e) {
    const at::Tensor rows = routed.select(1, e).nonzero().squeeze(1);  // int64 token ids
    if (rows.numel() == 0) continue;
    const at::Tensor xe = x.index_select(0, rows).to(acc_type);
    const at::Tensor gate_up = expert_product(xe, w_gate_up.select(0, e));  // [n, 2I]
    const at::Tensor gate = gate_up.narrow(1, 0, s.intermediate);
    const at::Tensor h = (act == ExpertActivation::kSilu ? at::silu(gate) : at::gelu(gate, "tanh")) *
                         gate_up.narrow(1, s.intermediate, s.intermediate);
    const at::Tensor y = expert_product(h, w_down.select(0, e));  // [n, H]
    const at::Tensor c = coeff_acc.index_select(0, rows).select(2, e);    // [n, R]
    for (int64_t r = 0; r < s.heads; ++r) {
      out.select(0, r).index_add_(0, rows, y * c.narrow(1, r, 1));
    }
  }
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CPU, m) { m.impl("expert_mlp", &expert_mlp_cpu); }

}  // namespace jakiro

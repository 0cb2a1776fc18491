// The schema of every jakiro op, in one place. Kernels register themselves per
// device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) implementations and
// Python wrappers live in jakiro/ops.py. Contracts: DESIGN.md section 5.
#include <torch/library.h>

TORCH_LIBRARY(jakiro, m) {
  // Ancestor bitmask and depth of every node of a batch of draft trees.
  // validate=False skips the CUDA kernel's one host read of its error flag
  // (inputs are still never read out of bounds); CPU always validates.
  m.def("build_tree_mask(Tensor parents, bool validate=True) -> (Tensor tree_mask, Tensor depth)");
  // Every token through its routed SwiGLU experts, combined per routing head:
  // out[r, t] = sum_e coeff[t, r, e] * expert_e(x[t]); zero-coefficient experts are skipped.
  m.def("expert_mlp(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor coeff) -> Tensor");
  // Rows of x pre-sorted by expert: out[p] = w[e] @ x[p] for offsets[e] <= p < offsets[e + 1].
  // validate=False skips the CUDA kernel's one host read of the offsets (the kernel clamps them).
  m.def("grouped_gemm(Tensor x, Tensor w, Tensor expert_offsets, bool validate=True) -> Tensor");
}

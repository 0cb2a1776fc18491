// Validation of the tree format (include/jakiro/tree.h), shared by every op
// that takes `parents`.
#include "jakiro/tree.h"

#include "jakiro/checks.h"

namespace jakiro {

void check_parents_shape(const at::Tensor& parents, const char* op) {
  check_dtype(parents, op, "parents", at::kInt);
  check_dim(parents, op, "parents", 2, "[B, N]");
  const int64_t n = parents.size(1);
  JAKIRO_CHECK(n >= 1, op, "parents must have at least one node (the root), got N = ", n);
  JAKIRO_CHECK(n <= kMaxTreeNodes, op, "parents has N = ", n, " nodes; at most ", kMaxTreeNodes,
               " are supported");
}

void check_parents_values(const at::Tensor& parents_cpu, const char* op) {
  const at::Tensor p = parents_cpu.contiguous();
  const int32_t* data = p.const_data_ptr<int32_t>();
  const int64_t batch = p.size(0), n = p.size(1);
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* row = data + b * n;
    JAKIRO_CHECK(row[0] == -1, op, "parents[", b, ", 0] = ", row[0],
                 ": node 0 is the root and its parent must be -1");
    for (int64_t i = 1; i < n; ++i) {
      JAKIRO_CHECK(is_valid_parent(i, row[i]), op, "parents[", b, ", ", i, "] = ", row[i],
                   ": the parent of node ", i, " must be in [0, ", i,
                   ") (nodes are in topological order)");
    }
  }
}

}  // namespace jakiro

// CPU kernel of build_tree_mask: rows are built in node order, each one a copy
// of its parent's row plus its own bit (parents precede children).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

#include "jakiro/tree.h"

namespace jakiro {
namespace {

std::tuple<at::Tensor, at::Tensor> build_tree_mask_cpu(const at::Tensor& parents_in, bool validate) {
  constexpr const char* op = "build_tree_mask";
  check_parents_shape(parents_in, op);
  const at::Tensor parents = parents_in.contiguous();
  // Always validated on the CPU: it is cheap here and the kernel indexes by parent.
  (void)validate;
  check_parents_values(parents, op);

  const int64_t batch = parents.size(0), n = parents.size(1), words = tree_mask_words(n);
  at::Tensor mask = at::empty({batch, n, words}, parents.options());
  at::Tensor depth = at::empty({batch, n}, parents.options());
  const int32_t* par = parents.const_data_ptr<int32_t>();
  uint32_t* mask_data = reinterpret_cast<uint32_t*>(mask.mutable_data_ptr<int32_t>());
  int32_t* depth_data = depth.mutable_data_ptr<int32_t>();

  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int32_t* p = par + b * n;
      uint32_t* rows = mask_data + b * n * words;
      int32_t* d = depth_data + b * n;
      for (int64_t i = 0; i < n; ++i) {
        uint32_t* row = rows + i * words;
        if (p[i] < 0) {
          std::memset(row, 0, words * sizeof(uint32_t));
          d[i] = 0;
        } else {
          std::memcpy(row, rows + p[i] * words, words * sizeof(uint32_t));
          d[i] = d[p[i]] + 1;
        }
        row[i / 32] |= 1u << (i % 32);
      }
    }
  });
  return {mask, depth};
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CPU, m) { m.impl("build_tree_mask", &build_tree_mask_cpu); }

}  // namespace jakiro

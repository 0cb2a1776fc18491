// CPU kernel of compact_kv (contract: docs/architecture.md): for every (layer, key/value, row,
// head) the accepted rows move down in increasing j, which is the op's
// sequential definition, so overlapping moves read each source before any
// later move can overwrite it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

#include "jakiro/verify_checks.h"

namespace jakiro {
namespace {

void compact_kv_cpu(const at::Tensor& kv, const at::Tensor& prefix_len_in, const at::Tensor& path_in,
                    const at::Tensor& accept_len_in, bool validate) {
  constexpr const char* op = "compact_kv";
  check_compact_kv_shapes(kv, prefix_len_in, path_in, accept_len_in, op);
  const at::Tensor prefix_len = prefix_len_in.contiguous(), path = path_in.contiguous(),
                   accept_len = accept_len_in.contiguous();
  const int64_t seq_len = kv.size(4);
  check_compact_kv_values(prefix_len, path, accept_len, seq_len, op);
  if (kv.numel() == 0) return;

  const int64_t layers = kv.size(0), batch = kv.size(2), heads = kv.size(3), n = path.size(1);
  const int64_t esize = kv.element_size(), row_bytes = kv.size(5) * esize;
  char* base = static_cast<char*>(kv.data_ptr());
  const int32_t* pre = prefix_len.const_data_ptr<int32_t>();
  const int32_t* pth = path.const_data_ptr<int32_t>();
  const int32_t* acc = accept_len.const_data_ptr<int32_t>();
  const int64_t groups = layers * 2 * batch * heads;
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t h = g % heads, b = (g / heads) % batch, k = (g / heads / batch) % 2,
                    l = g / heads / batch / 2;
      char* rows = base + esize * (l * kv.stride(0) + k * kv.stride(1) + b * kv.stride(2) +
                                   h * kv.stride(3));
      for (int64_t j = 0; j <= acc[b]; ++j) {
        const int64_t src = pth[b * n + j];
        if (src == j) continue;
        std::memmove(rows + esize * (pre[b] + j) * kv.stride(4),
                     rows + esize * (pre[b] + src) * kv.stride(4), row_bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CPU, m) { m.impl("compact_kv", &compact_kv_cpu); }

}  // namespace jakiro

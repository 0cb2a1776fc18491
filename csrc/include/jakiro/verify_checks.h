// Argument checks of the acceptance ops (verify_greedy, verify_sampling,
// compact_kv), shared by their CPU and CUDA registrations. Shape/dtype checks
// touch no data; the *_values checks read CPU tensors and name the first bad entry.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <utility>

#include "jakiro/verify.h"
#include "jakiro/checks.h"
#include "jakiro/tree.h"

namespace jakiro {

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  JAKIRO_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, name,
               " must be Float, Half or BFloat16, got ", dt);
}

inline void check_sizes(const at::Tensor& t, const char* op, const char* name,
                        at::IntArrayRef want, const char* shape) {
  JAKIRO_CHECK(t.sizes() == want, op, name, " must have shape ", shape, " = ", want, ", got ",
               t.sizes());
}

// tokens int64 [B, N], parents int32 [B, N], logits float [B, N, V] on one device.
inline void check_tree_and_logits(const at::Tensor& tokens, const at::Tensor& parents,
                                  const at::Tensor& logits, const char* op) {
  check_parents_shape(parents, op);
  check_dtype(tokens, op, "tokens", at::kLong);
  check_dim(tokens, op, "tokens", 2, "[B, N]");
  check_dim(logits, op, "logits", 3, "[B, N, V]");
  check_float_dtype(logits, op, "logits");
  check_same_device(tokens, "tokens", parents, "parents", op);
  check_same_device(logits, "logits", parents, "parents", op);
  const int64_t batch = parents.size(0), n = parents.size(1);
  check_sizes(tokens, op, "tokens", {batch, n}, "[B, N] (as parents)");
  JAKIRO_CHECK(logits.size(0) == batch && logits.size(1) == n, op,
               "logits must have shape [B, N, V] with B, N as parents ", parents.sizes(), ", got ",
               logits.sizes());
  const int64_t vocab = logits.size(2);
  JAKIRO_CHECK(vocab >= 1 && vocab <= kMaxVocab, op, "logits has V = ", vocab,
               "; 1 <= V <= ", kMaxVocab, " is supported");
}

// Every token id must be a row of the logits: 0 <= tokens < V (tokens on the CPU).
inline void check_token_values(const at::Tensor& tokens_cpu, int64_t vocab, const char* op) {
  const at::Tensor t = tokens_cpu.contiguous();
  const int64_t* data = t.const_data_ptr<int64_t>();
  const int64_t n = t.size(1);
  for (int64_t k = 0; k < t.numel(); ++k) {
    JAKIRO_CHECK(data[k] >= 0 && data[k] < vocab, op, "tokens[", k / n, ", ", k % n, "] = ",
                 data[k], " is not a token id in [0, V = ", vocab, ")");
  }
}

// Per-row sampling settings: temperature float32 [B], top_p float32 [B], top_k int32 [B].
inline void check_sampling_shapes(const at::Tensor& temperature, const at::Tensor& top_p,
                                  const at::Tensor& top_k, const at::Tensor& logits,
                                  const char* op) {
  const int64_t batch = logits.size(0);
  check_dtype(temperature, op, "temperature", at::kFloat);
  check_dtype(top_p, op, "top_p", at::kFloat);
  check_dtype(top_k, op, "top_k", at::kInt);
  check_sizes(temperature, op, "temperature", {batch}, "[B]");
  check_sizes(top_p, op, "top_p", {batch}, "[B]");
  check_sizes(top_k, op, "top_k", {batch}, "[B]");
  check_same_device(temperature, "temperature", logits, "logits", op);
  check_same_device(top_p, "top_p", logits, "logits", op);
  check_same_device(top_k, "top_k", logits, "logits", op);
}

inline void check_sampling_values(const at::Tensor& temperature_cpu, const at::Tensor& top_p_cpu,
                                  const at::Tensor& top_k_cpu, const char* op) {
  const at::Tensor t = temperature_cpu.contiguous(), p = top_p_cpu.contiguous(),
                   k = top_k_cpu.contiguous();
  for (int64_t b = 0; b < t.numel(); ++b) {
    const float tb = t.const_data_ptr<float>()[b];
    JAKIRO_CHECK(std::isfinite(tb) && tb >= 0.0f, op, "temperature[", b, "] = ", tb,
                 " must be finite and >= 0 (0 means greedy)");
    const float pb = p.const_data_ptr<float>()[b];
    JAKIRO_CHECK(pb > 0.0f && pb <= 1.0f, op, "top_p[", b, "] = ", pb,
                 " must be in (0, 1] (1 disables top-p)");
    const int32_t kb = k.const_data_ptr<int32_t>()[b];
    JAKIRO_CHECK(kb >= 0, op, "top_k[", b, "] = ", kb, " must be >= 0 (0 disables top-k)");
  }
}

// uniforms float32 [B, N, 2]; draft_probs float32 [B, N, V] when given.
inline void check_uniforms_and_drafts(const at::Tensor& uniforms,
                                      const std::optional<at::Tensor>& draft_probs,
                                      const at::Tensor& logits, const char* op) {
  const int64_t batch = logits.size(0), n = logits.size(1);
  check_dtype(uniforms, op, "uniforms", at::kFloat);
  check_sizes(uniforms, op, "uniforms", {batch, n, 2}, "[B, N, 2]");
  check_same_device(uniforms, "uniforms", logits, "logits", op);
  if (draft_probs.has_value()) {
    check_dtype(*draft_probs, op, "draft_probs", at::kFloat);
    check_sizes(*draft_probs, op, "draft_probs", logits.sizes(), "[B, N, V] (as logits)");
    check_same_device(*draft_probs, "draft_probs", logits, "logits", op);
  }
}

// Every uniform must lie in [0, 1): one below 0 (or NaN, which compares false)
// accepts a token of probability 0, one at or above 1 draws past the last
// survivor (uniforms on the CPU).
inline void check_uniform_values(const at::Tensor& uniforms_cpu, const char* op) {
  const at::Tensor u = uniforms_cpu.contiguous();
  const float* data = u.const_data_ptr<float>();
  const int64_t n = u.size(1);
  for (int64_t k = 0; k < u.numel(); ++k) {
    JAKIRO_CHECK(data[k] >= 0.0f && data[k] < 1.0f, op, "uniforms[", k / (2 * n), ", ", (k / 2) % n, ", ",
                 k % 2, "] = ", data[k], " must be in [0, 1)");
  }
}

// The message for a sampled row's visited node whose logits have no finite
// maximum (NaN, +inf, or every entry -inf): there is no distribution to sample.
inline void fail_no_finite_max(int64_t b, int64_t node, float max_z, const char* op) {
  JAKIRO_CHECK(false, op, "logits[", b, ", ", node, "] has no finite maximum (max = ", max_z,
               "): a row sampled with temperature > 0 needs one (NaN, +inf or all -inf is not a distribution)");
}

// The NaN-propagating maximum of a logits row (what torch.max returns).
template <typename T>
float row_max(const T* row, int64_t vocab) {
  float best = static_cast<float>(row[0]);
  for (int64_t x = 1; x < vocab; ++x) {
    const float v = static_cast<float>(row[x]);
    if (v > best || v != v) best = v;
    if (best != best) break;
  }
  return best;
}

// kv [L, 2, B, Hkv, S, D] (last dim contiguous), prefix_len/accept_len int32 [B],
// path int32 [B, N].
inline void check_compact_kv_shapes(const at::Tensor& kv, const at::Tensor& prefix_len,
                                    const at::Tensor& path, const at::Tensor& accept_len,
                                    const char* op) {
  check_dim(kv, op, "kv", 6, "[L, 2, B, Hkv, S, D]");
  JAKIRO_CHECK(kv.size(1) == 2, op, "kv must have shape [L, 2, B, Hkv, S, D] (dim 1 = key/value), got ",
               kv.sizes());
  JAKIRO_CHECK(kv.size(5) <= 1 || kv.stride(5) == 1, op,
               "kv must be contiguous in its last dimension (D), got strides ", kv.strides());
  check_dtype(prefix_len, op, "prefix_len", at::kInt);
  check_dtype(path, op, "path", at::kInt);
  check_dtype(accept_len, op, "accept_len", at::kInt);
  const int64_t batch = kv.size(2);
  check_sizes(prefix_len, op, "prefix_len", {batch}, "[B] (B = kv.size(2))");
  check_sizes(accept_len, op, "accept_len", {batch}, "[B] (B = kv.size(2))");
  check_dim(path, op, "path", 2, "[B, N]");
  JAKIRO_CHECK(path.size(0) == batch, op, "path must have shape [B, N] with B = kv.size(2) = ", batch,
               ", got ", path.sizes());
  check_same_device(prefix_len, "prefix_len", kv, "kv", op);
  check_same_device(path, "path", kv, "kv", op);
  check_same_device(accept_len, "accept_len", kv, "kv", op);
  // kv is written in place: like torch's in-place ops, refuse elements that share
  // memory (an expanded dimension), where moves would overwrite one another, and
  // index tensors that live in kv's memory, which the moves would change.
  JAKIRO_CHECK(at::has_internal_overlap(kv) != at::MemOverlap::Yes, op,
               "kv has elements that share memory (e.g. an expanded dimension, strides ", kv.strides(),
               "); it is written in place, so pass a tensor whose elements are distinct (.contiguous())");
  const std::pair<const at::Tensor*, const char*> indices[] = {
      {&prefix_len, "prefix_len"}, {&path, "path"}, {&accept_len, "accept_len"}};
  for (const auto& [t, name] : indices) {
    const at::MemOverlapStatus status = at::get_overlap_status(kv, *t);
    JAKIRO_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, name,
                 " shares memory with kv, which is written in place");
  }
}

// Every move must stay inside the cache: 0 <= accept_len < N, and for
// j <= accept_len both prefix_len + path[j] and prefix_len + j lie in [0, S).
inline void check_compact_kv_values(const at::Tensor& prefix_cpu, const at::Tensor& path_cpu,
                                    const at::Tensor& accept_cpu, int64_t seq_len, const char* op) {
  const at::Tensor pre = prefix_cpu.contiguous(), pth = path_cpu.contiguous(),
                   acc = accept_cpu.contiguous();
  const int64_t n = pth.size(1);
  for (int64_t b = 0; b < pre.numel(); ++b) {
    const int64_t a = acc.const_data_ptr<int32_t>()[b];
    const int64_t p0 = pre.const_data_ptr<int32_t>()[b];
    JAKIRO_CHECK(a >= 0 && a < n, op, "accept_len[", b, "] = ", a, " must be in [0, N = ", n, ")");
    JAKIRO_CHECK(p0 >= 0 && p0 + a < seq_len, op, "prefix_len[", b, "] = ", p0,
                 ": rows prefix_len .. prefix_len + accept_len = ", p0 + a,
                 " must lie in the cache [0, S = ", seq_len, ")");
    for (int64_t j = 0; j <= a; ++j) {
      const int64_t src = pth.const_data_ptr<int32_t>()[b * n + j];
      JAKIRO_CHECK(src >= 0 && p0 + src < seq_len, op, "path[", b, ", ", j, "] = ", src,
                   ": source row prefix_len + path = ", p0 + src, " must lie in [0, S = ", seq_len,
                   ")");
    }
  }
}

}  // namespace jakiro

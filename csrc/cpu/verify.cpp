// CPU kernels of verify_greedy and verify_sampling (contracts: docs/architecture.md). Each
// batch row walks its tree from the root: at the current node it works out the
// target distribution (argmax, or the filtered softmax of include/jakiro/verify.h),
// tries the node's children in index order, and either moves to the accepted
// child or stops and draws the next token. The arithmetic is the one the CUDA
// kernels use; here every sum simply runs in index order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "jakiro/verify.h"
#include "jakiro/verify_checks.h"

namespace jakiro {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// What both ops share: the checked, contiguous tree and logits, the three outputs, and each
// batch row's slice of them.
struct TreeCall {
  at::Tensor tokens, parents, logits, accept_len, path, next_token;
  int64_t batch, n, vocab;

  TreeCall(const at::Tensor& tokens_in, const at::Tensor& parents_in, const at::Tensor& logits_in,
           const char* op) {
    check_tree_and_logits(tokens_in, parents_in, logits_in, op);
    tokens = tokens_in.contiguous(), parents = parents_in.contiguous(), logits = logits_in.contiguous();
    check_parents_values(parents, op);
    batch = parents.size(0), n = parents.size(1), vocab = logits.size(2);
    check_token_values(tokens, vocab, op);
    accept_len = at::empty({batch}, parents.options());
    path = at::empty({batch, n}, parents.options());
    next_token = at::empty({batch}, parents.options().dtype(at::kLong));
  }
  template <typename T>
  const T* logits_of(int64_t b) const { return logits.const_data_ptr<T>() + b * n * vocab; }
  const int32_t* parents_of(int64_t b) const { return parents.const_data_ptr<int32_t>() + b * n; }
  const int64_t* tokens_of(int64_t b) const { return tokens.const_data_ptr<int64_t>() + b * n; }
  int32_t* path_of(int64_t b) const { return path.mutable_data_ptr<int32_t>() + b * n; }
  int32_t* accept_len_of(int64_t b) const { return accept_len.mutable_data_ptr<int32_t>() + b; }
  int64_t* next_token_of(int64_t b) const { return next_token.mutable_data_ptr<int64_t>() + b; }
  Outputs outputs() const { return {accept_len, path, next_token}; }
};

uint32_t key_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return float_order_key(bits);
}

template <typename T>
int64_t argmax_row(const T* row, int64_t vocab) {
  float best = static_cast<float>(row[0]);
  int64_t best_i = 0;
  for (int64_t x = 1; x < vocab; ++x) {
    const float v = static_cast<float>(row[x]);
    if (argmax_better(v, x, best, best_i)) best = v, best_i = x;
  }
  return best_i;
}

// The lowest-index child of `node` whose token is `token`, or -1.
int64_t find_child_with_token(const int32_t* par, const int64_t* tok, int64_t n, int64_t node,
                              int64_t token) {
  for (int64_t c = node + 1; c < n; ++c)
    if (par[c] == node && tok[c] == token) return c;
  return -1;
}

// Walks one row greedily; returns the bonus token, fills path and accept_len.
template <typename T>
int64_t greedy_walk(const T* logits_b, const int32_t* par, const int64_t* tok, int64_t n,
                    int64_t vocab, int32_t* path, int32_t* accept_len) {
  for (int64_t j = 0; j < n; ++j) path[j] = -1;
  path[0] = 0;
  int64_t node = 0, len = 0;
  while (true) {
    const int64_t t = argmax_row(logits_b + node * vocab, vocab);
    const int64_t child = find_child_with_token(par, tok, n, node, t);
    if (child < 0) {
      *accept_len = static_cast<int32_t>(len);
      return t;
    }
    path[++len] = static_cast<int32_t>(child);
    node = child;
  }
}

Outputs verify_greedy_cpu(const at::Tensor& tokens_in, const at::Tensor& parents_in,
                          const at::Tensor& logits_in, bool validate) {
  constexpr const char* op = "verify_greedy";
  const TreeCall call(tokens_in, parents_in, logits_in, op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.logits.scalar_type(), op, [&] {
    at::parallel_for(0, call.batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        *call.next_token_of(b) = greedy_walk(call.logits_of<scalar_t>(b), call.parents_of(b), call.tokens_of(b),
                                             call.n, call.vocab, call.path_of(b), call.accept_len_of(b));
      }
    });
  });
  return call.outputs();
}

// The target distribution at one node: s, w and the filter threshold.
struct NodeDistribution {
  std::vector<float> s, w;
  uint32_t threshold = 0;  // x survives the filters iff key(s(x)) >= threshold
  double z = 0.0;          // sum of the survivors' w
  float max_z = 0.0f;      // NaN-propagating: not finite means no distribution

  bool kept(int64_t x) const { return key_of(s[x]) >= threshold; }
  double p(int64_t x) const { return kept(x) ? static_cast<double>(w[x]) / z : 0.0; }

  // Smallest key k with measure(eligible keys > k) < limit, where the measure
  // of a token is `weight(x)` (radix descent, see verify.h).
  template <typename Measure, typename Weight>
  uint32_t descend(int64_t vocab, uint32_t eligible_from, Measure limit, Weight weight) const {
    uint32_t prefix = 0;
    Measure above = 0;
    for (int round = 0; round < 32 / kRadixBits; ++round) {
      const int shift = 32 - kRadixBits * (round + 1);
      Measure hist[kRadixBuckets] = {};
      for (int64_t x = 0; x < vocab; ++x) {
        const uint32_t key = key_of(s[x]);
        if (key < eligible_from) continue;
        if (round > 0 && (key >> (shift + kRadixBits)) != (prefix >> (shift + kRadixBits))) continue;
        hist[(key >> shift) & (kRadixBuckets - 1)] += weight(x);
      }
      prefix |= static_cast<uint32_t>(pick_radix_digit(hist, above, limit)) << shift;
    }
    return prefix;
  }

  template <typename T>
  void compute(const T* row, int64_t vocab, float temperature, float top_p, int32_t top_k) {
    max_z = row_max(row, vocab);
    if (!std::isfinite(max_z)) return;  // the walk stops and the op raises
    for (int64_t x = 0; x < vocab; ++x) {
      s[x] = scaled_logit(static_cast<float>(row[x]), max_z, temperature);
      w[x] = std::exp(s[x]);
    }
    threshold = 0;
    if (top_k > 0 && top_k < vocab)
      threshold = descend<int64_t>(vocab, 0, top_k, [](int64_t) { return int64_t{1}; });
    z = sum_kept();
    if (top_p < 1.0f) {
      const double limit = static_cast<double>(top_p) * z;
      threshold = descend<double>(vocab, threshold, limit,
                                  [&](int64_t x) { return static_cast<double>(w[x]); });
      z = sum_kept();
    }
  }

  double sum_kept() const {
    double total = 0.0;
    for (size_t x = 0; x < w.size(); ++x)
      if (kept(x)) total += w[x];
    return total;
  }
};

// Inverse-CDF draw in index order: the first x whose running weight exceeds
// target; if rounding leaves none, the last x of positive weight; else argmax.
template <typename Weight>
int64_t draw(int64_t vocab, double target, int64_t argmax, Weight weight) {
  double running = 0.0;
  int64_t last_positive = -1;
  for (int64_t x = 0; x < vocab; ++x) {
    const double r = weight(x);
    if (r > 0.0) last_positive = x;
    running += r;
    if (running > target) return x;
  }
  return last_positive >= 0 ? last_positive : argmax;
}

template <typename T>
int64_t sampling_walk(const T* logits_b, const float* draft_b, const float* unif, const int32_t* par,
                      const int64_t* tok, int64_t n, int64_t vocab, float temperature, float top_p,
                      int32_t top_k, NodeDistribution& dist, std::vector<uint8_t>& rejected,
                      int32_t* path, int32_t* accept_len, int64_t* bad_node) {
  for (int64_t j = 0; j < n; ++j) path[j] = -1;
  path[0] = 0;
  int64_t node = 0, len = 0;
  std::vector<int64_t> rejected_tokens;
  while (true) {
    const T* row = logits_b + node * vocab;
    dist.compute(row, vocab, temperature, top_p, top_k);
    if (!std::isfinite(dist.max_z)) {
      *bad_node = node;
      *accept_len = static_cast<int32_t>(len);
      return 0;
    }
    int64_t accepted = -1;
    int64_t token;
    if (draft_b == nullptr) {
      // Point-mass drafts: a rejected token's mass leaves p; repeats are skipped.
      double rejected_mass = 0.0;
      for (int64_t c = node + 1; c < n && accepted < 0; ++c) {
        if (par[c] != node || rejected[tok[c]]) continue;
        const int64_t x = tok[c];
        const double px = dist.kept(x) ? static_cast<double>(dist.w[x]) : 0.0;
        if (accept_point_draft(unif[2 * c], px, dist.z - rejected_mass)) {
          accepted = c;
        } else {
          rejected_mass += px;
          rejected[x] = 1;
          rejected_tokens.push_back(x);
        }
      }
      if (accepted < 0) {
        token = draw(vocab, static_cast<double>(unif[2 * node + 1]) * (dist.z - rejected_mass),
                     argmax_row(row, vocab), [&](int64_t x) {
                       return dist.kept(x) && !rejected[x] ? static_cast<double>(dist.w[x]) : 0.0;
                     });
      }
      for (int64_t x : rejected_tokens) rejected[x] = 0;
      rejected_tokens.clear();
    } else {
      // Drafts drawn i.i.d. from q: p_c = max(p - c q, 0) / residual_sum.
      const float* q = draft_b + node * vocab;
      double c_removed = 0.0, residual_sum = 1.0;
      for (int64_t c = node + 1; c < n && accepted < 0; ++c) {
        if (par[c] != node) continue;
        const int64_t x = tok[c];
        const double r = residual_weight(dist.p(x), q[x], c_removed);
        if (accept_sampled_draft(unif[2 * c], r, q[x], residual_sum)) {
          accepted = c;
        } else {
          c_removed += residual_sum;
          residual_sum = 0.0;
          for (int64_t y = 0; y < vocab; ++y) residual_sum += residual_weight(dist.p(y), q[y], c_removed);
        }
      }
      if (accepted < 0) {
        token = draw(vocab, static_cast<double>(unif[2 * node + 1]) * residual_sum,
                     argmax_row(row, vocab),
                     [&](int64_t y) { return residual_weight(dist.p(y), q[y], c_removed); });
      }
    }
    if (accepted < 0) {
      *accept_len = static_cast<int32_t>(len);
      return token;
    }
    path[++len] = static_cast<int32_t>(accepted);
    node = accepted;
  }
}

Outputs verify_sampling_cpu(const at::Tensor& tokens_in, const at::Tensor& parents_in,
                            const at::Tensor& logits_in, const at::Tensor& uniforms_in,
                            const at::Tensor& temperature_in, const at::Tensor& top_p_in,
                            const at::Tensor& top_k_in,
                            const std::optional<at::Tensor>& draft_probs_in, bool validate) {
  constexpr const char* op = "verify_sampling";
  const TreeCall call(tokens_in, parents_in, logits_in, op);
  check_sampling_shapes(temperature_in, top_p_in, top_k_in, logits_in, op);
  check_uniforms_and_drafts(uniforms_in, draft_probs_in, logits_in, op);
  const at::Tensor uniforms = uniforms_in.contiguous(), temperature = temperature_in.contiguous(),
                   top_p = top_p_in.contiguous(), top_k = top_k_in.contiguous();
  const at::Tensor draft_probs =
      draft_probs_in.has_value() ? draft_probs_in->contiguous() : at::Tensor();
  check_sampling_values(temperature, top_p, top_k, op);
  check_uniform_values(uniforms, op);
  const int64_t n = call.n, vocab = call.vocab;
  std::vector<int64_t> bad_node(call.batch, -1);  // per row: a visited node without a finite max
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.logits.scalar_type(), op, [&] {
    const float* dp = draft_probs.defined() ? draft_probs.const_data_ptr<float>() : nullptr;
    const float* un = uniforms.const_data_ptr<float>();
    const float* temp = temperature.const_data_ptr<float>();
    const float* tp = top_p.const_data_ptr<float>();
    const int32_t* tk = top_k.const_data_ptr<int32_t>();
    at::parallel_for(0, call.batch, 1, [&](int64_t b0, int64_t b1) {
      NodeDistribution dist;
      dist.s.resize(vocab);
      dist.w.resize(vocab);
      std::vector<uint8_t> rejected(vocab, 0);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* lg_b = call.logits_of<scalar_t>(b);
        if (temp[b] == 0.0f) {  // temperature 0: greedy, as verify_greedy
          *call.next_token_of(b) = greedy_walk(lg_b, call.parents_of(b), call.tokens_of(b), n, vocab,
                                               call.path_of(b), call.accept_len_of(b));
          continue;
        }
        *call.next_token_of(b) =
            sampling_walk(lg_b, dp ? dp + b * n * vocab : nullptr, un + b * n * 2, call.parents_of(b),
                          call.tokens_of(b), n, vocab, temp[b], tp[b], tk[b], dist, rejected,
                          call.path_of(b), call.accept_len_of(b), &bad_node[b]);
      }
    });
    for (int64_t b = 0; b < call.batch; ++b) {
      if (bad_node[b] >= 0)
        fail_no_finite_max(b, bad_node[b], row_max(call.logits_of<scalar_t>(b) + bad_node[b] * vocab, vocab),
                           op);
    }
  });
  return call.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(jakiro, CPU, m) {
  m.impl("verify_greedy", &verify_greedy_cpu);
  m.impl("verify_sampling", &verify_sampling_cpu);
}

}  // namespace jakiro

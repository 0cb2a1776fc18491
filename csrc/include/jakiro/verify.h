// Torch-free arithmetic of tree acceptance (verify_greedy, verify_sampling),
// shared by the CPU and CUDA kernels so both make the same decisions.
//
// The sampling distribution at a node (docs/architecture.md, verify_sampling), per element x of
// the logits row z (any float type, read as fp32):
//   m    = max_x z(x)                                  (fp32, exact)
//   s(x) = (z(x) - m) / temperature                     (fp32, IEEE division)
//   w(x) = exp(s(x))                                    (fp32)
//   top-k (HF semantics, ties kept): x survives iff #{y : s(y) > s(x)} < top_k
//   top-p (after top-k, ties kept):  x survives iff
//          sum_{surviving y : s(y) > s(x)} w(y) < top_p * Z_k,  Z_k = sum of surviving w
//   p(x) = w(x) / Z for survivors, 0 otherwise, Z = sum of the survivors' w.
// All sums are float64. Both filters keep x iff s(x) >= some threshold, so the
// kernels find that threshold without sorting (radix descent over the 32-bit
// order key of s, see pick_radix_digit) and never store a probability row.
// Sums may be accumulated in different orders on different devices: decisions
// agree unless a uniform falls within ~1e-7 (relative) of a decision boundary.
#pragma once

#include <cstdint>

#include "jakiro/macros.h"

namespace jakiro {

// Largest vocabulary the acceptance ops accept: one bit per token of a row is
// kept in a CUDA block's shared memory (32 KiB).
constexpr int64_t kMaxVocab = 262144;

// Radix descent: 8 bits per round, 4 rounds for a 32-bit key.
constexpr int kRadixBits = 8;
constexpr int kRadixBuckets = 1 << kRadixBits;

// Monotone map of a float to an unsigned key: a < b  <=>  key(a) < key(b)
// (for non-NaN values; -0.0 sorts just below +0.0).
JAKIRO_HOST_DEVICE uint32_t float_order_key(uint32_t bits) {
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// One round of the radix descent for the smallest key k* with
// measure(keys > k*) < limit. `above` is the measure of keys greater than every
// key of the current range, `hist[d]` the measure of the range's keys whose
// current digit is d. Returns the digit of k* and adds the measure of the
// buckets above it to `above`. Scanning from the top bucket, the answer is the
// last bucket entered while the running measure is still below the limit.
template <typename Measure>
JAKIRO_HOST_DEVICE int pick_radix_digit(const Measure* hist, Measure& above, Measure limit) {
  int digit = kRadixBuckets - 1;
  Measure running = above;
  Measure above_digit = above;
  for (int d = kRadixBuckets - 1; d >= 0; --d) {
    if (!(running < limit)) break;
    digit = d;
    above_digit = running;
    running += hist[d];
  }
  above = above_digit;
  return digit;
}

// Argmax order: larger value wins, NaN beats everything (as torch.argmax), and
// among equals the lower index wins.
JAKIRO_HOST_DEVICE bool argmax_better(float v, int64_t i, float best_v, int64_t best_i) {
  const bool v_nan = v != v, best_nan = best_v != best_v;
  if (v_nan || best_nan) return v_nan && (!best_nan || i < best_i);
  return v > best_v || (v == best_v && i < best_i);
}

// s(x) as defined above.
JAKIRO_HOST_DEVICE float scaled_logit(float z, float max_z, float temperature) {
  return (z - max_z) / temperature;
}

// Deterministic drafts (draft_probs = None): the child's token x has weight px
// in what is left of p after the rejected siblings (remaining = Z - their w);
// accept with probability px / remaining.
JAKIRO_HOST_DEVICE bool accept_point_draft(float uniform, double px, double remaining) {
  return static_cast<double>(uniform) * remaining < px;
}

// Sampled drafts: accept x with probability min(1, p_c(x) / q(x)) where
// p_c = residual / residual_sum is the target after the earlier rejections.
JAKIRO_HOST_DEVICE bool accept_sampled_draft(float uniform, double residual, double q,
                                             double residual_sum) {
  return static_cast<double>(uniform) * q * residual_sum < residual;
}

// After c units of draft mass were removed (c grows by the residual sum at each
// rejection), p_c(x) is proportional to max(p(x) - c q(x), 0).
// Rounded multiply then subtract (no fused multiply-add, which nvcc would
// otherwise emit), so every device computes the same value.
JAKIRO_HOST_DEVICE double residual_weight(double p, double q, double c) {
#if defined(__CUDA_ARCH__)
  const double r = __dsub_rn(p, __dmul_rn(c, q));
#else
  const double r = p - c * q;
#endif
  return r > 0.0 ? r : 0.0;
}

// Error flags raised by the CUDA kernels (read back when validating).
enum AcceptError : int32_t {
  kBadParent = 1,
  kBadToken = 2,
  kBadSampling = 4,  // temperature, top_p or top_k out of range
  kBadMove = 8,      // compact_kv: a row outside the cache or accept_len out of range
  kBadUniform = 16,  // verify_sampling: a uniform outside [0, 1)
  kBadLogits = 32,   // verify_sampling: a visited node of a sampled row without a finite max
};

}  // namespace jakiro

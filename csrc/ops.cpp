// The schema of every jakiro op, in one place. Kernels register themselves per
// device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) implementations and
// Python wrappers live in jakiro/ops.py. Contracts: docs/architecture.md, "Op contracts".
#include <torch/library.h>

TORCH_LIBRARY(jakiro, m) {
  // Ancestor bitmask and depth of every node of a batch of draft trees.
  // validate=False skips the CUDA kernel's one host read of its error flag
  // (inputs are still never read out of bounds); CPU always validates.
  m.def("build_tree_mask(Tensor parents, bool validate=True) -> (Tensor tree_mask, Tensor depth)");
  // Attention of a block of tree queries over a KV cache whose last tree_len
  // keys are the tree (ancestor mask) and the rest the prefix; no mask means
  // bottom-right causal. validate=False skips the CUDA host read of
  // cache_seqlens (lengths are still clamped, never read out of bounds).
  // window > 0: sliding window over the query's own chain of keys; softcap > 0:
  // scores become softcap * tanh(score / softcap). 0 turns either off.
  m.def("tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? tree_mask, "
        "int tree_len, float scale, bool validate=True, int window=0, float softcap=0.0) -> Tensor");
  // Greedy tree acceptance with the argmax over V fused in. validate as above
  // (CUDA reads an error flag back; CPU always validates).
  m.def("verify_greedy(Tensor tokens, Tensor parents, Tensor logits, bool validate=True) -> (Tensor accept_len, Tensor path, Tensor next_token)");
  // Exact tree rejection sampling with temperature/top-k/top-p applied in the kernel.
  m.def("verify_sampling(Tensor tokens, Tensor parents, Tensor logits, Tensor uniforms, Tensor temperature, Tensor top_p, Tensor top_k, Tensor? draft_probs=None, bool validate=True) -> (Tensor accept_len, Tensor path, Tensor next_token)");
  // Moves the accepted KV rows of every layer down to prefix_len + j, in place.
  m.def("compact_kv(Tensor(a!) kv, Tensor prefix_len, Tensor path, Tensor accept_len, bool validate=True) -> ()");
  // Every token through its routed gated-MLP experts, combined per routing head:
  // out[r, t] = sum_e coeff[t, r, e] * expert_e(x[t]); zero-coefficient experts are skipped.
  // activation: the gate's, "silu" (SwiGLU) or "gelu_tanh" (GeGLU, tanh-approximated GELU).
  m.def("expert_mlp(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor coeff, str activation=\"silu\") -> Tensor");
  // Rows of x pre-sorted by expert: out[p] = w[e] @ x[p] for offsets[e] <= p < offsets[e + 1].
  // validate=False skips the CUDA kernel's one host read of the offsets (the kernel clamps them).
  m.def("grouped_gemm(Tensor x, Tensor w, Tensor expert_offsets, bool validate=True) -> Tensor");
  // y = x W^T + b, as at::linear; the CPU kernel streams each weight row once for
  // all rows of x (decoding and tree-verify sizes).
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // Hugging Face's RMSNorm in one call: weight * to_dtype(x * rsqrt(mean(x^2) + eps)).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // Hugging Face's apply_rotary_pos_emb in one call: x * cos + rotate_half(x) * sin for q and k.
  m.def("rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

"""Torch-native paths of the CUDA ops whose kernels lose to cuBLAS or SDPA on some shapes.

Each function has the contract of its op in ``jakiro/ops.py`` (arguments, output shape, dtype
and layout, zeros for a query that sees no key, coefficients applied as the op applies them) but
runs on stock PyTorch: ``F.scaled_dot_product_attention`` with a dense mask for
``tree_attention``, cuBLAS products for ``expert_mlp`` and ``grouped_gemm``. The wrappers in
``jakiro/ops.py`` choose between these and jakiro's kernels per shape (docs/kernels.md,
"Dispatch between jakiro's kernels and the native paths"); ``JAKIRO_<OP>_KERNEL=native`` forces
them on any device.

No function here reads a tensor's values back to the host except where the op itself does
(``validate=True``, outside CUDA-graph capture), and none indexes with a boolean mask, so the
paths stay CUDA-graph capturable. They are not batch-invariant.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["expert_mlp_native", "grouped_gemm_native", "grouped_mm_applies", "tree_attention_native",
           "tree_attention_native_visibility"]


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _require(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


# ---------------------------------------------------------------------------
# tree_attention


def tree_attention_native_visibility(cache_seqlens: torch.Tensor, tree_mask: torch.Tensor | None, tree_len: int,
                                     num_queries: int, cache_size: int, window: int = 0) -> torch.Tensor:
    """Dense boolean ``[B, Nq, S]``: whether query ``i`` of row ``b`` sees key ``s``, as
    ``ops.tree_attention`` defines it (and ``reference.tree_attention_visibility`` computes it).

    Built without ``[B, Nq, S]`` integer temporaries: every query keeps one contiguous range of
    prefix (or causal) slots, ``[lo, hi)``, compared against one ``arange(S)``; its tree keys
    are its mask bits (minus those the window drops), placed at the row's tree slots by a gather.
    """
    device = cache_seqlens.device
    lens = cache_seqlens.to(torch.int64).view(-1, 1, 1)                       # [B, 1, 1]
    slots = torch.arange(cache_size, device=device, dtype=torch.int64).view(1, 1, -1)
    if tree_mask is None:
        # query i at p = len - Nq + i sees slots (p - window, p]
        query = lens - num_queries + torch.arange(num_queries, device=device).view(1, -1, 1)  # [B, Nq, 1]
        lo = (query + 1 - window).clamp(min=0) if window else torch.zeros_like(query)
        return (slots >= lo) & (slots <= query)
    tree_start = lens - tree_len                                              # L, [B, 1, 1]
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    bits = ((tree_mask.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :tree_len].bool()  # [B, Nq, tree_len]
    seen = bits.sum(-1, keepdim=True)                                         # n, [B, Nq, 1]
    if window:
        # a visible tree key stays if fewer than `window` visible tree keys follow it; the
        # query sits at L + n - 1, so the prefix keeps slots >= L + n - window
        after = seen - bits.to(torch.int32).cumsum(-1)
        bits = bits & (after < window)
        lo = (tree_start + seen - window).clamp(min=0)
    else:
        lo = torch.zeros_like(seen)
    visible = (slots >= lo) & (slots < tree_start)                            # prefix
    if tree_len:
        index = (slots - tree_start).clamp(0, tree_len - 1)                   # [B, 1, S]
        in_tree = (slots >= tree_start) & (slots < lens)
        tree_part = torch.gather(bits, 2, index.expand(-1, num_queries, -1))
        visible = visible | (tree_part & in_tree)
    return visible


def _check_tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, tree_len, window, softcap):
    op = "tree_attention"
    _require(q.dim() == 4, f"{op}: q must have shape [B, Hq, Nq, D], got {tuple(q.shape)}")
    _require(k_cache.dim() == 4 and v_cache.dim() == 4, f"{op}: k_cache and v_cache must have shape [B, Hkv, S, D]")
    _require(k_cache.shape == v_cache.shape, f"{op}: k_cache and v_cache must have the same shape")
    _require(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, f"{op}: k_cache and v_cache must have q's dtype")
    _require(q.dtype in (torch.float16, torch.bfloat16, torch.float32),
             f"{op}: q must be float16, bfloat16 or float32, got {q.dtype}")
    batch, hq, _, head_dim = q.shape
    _require(k_cache.shape[0] == batch and k_cache.shape[3] == head_dim,
             f"{op}: k_cache and v_cache must have q's batch size and head size")
    _require(hq % k_cache.shape[1] == 0, f"{op}: Hq must be a multiple of Hkv")
    _require(cache_seqlens.dtype == torch.int32 and tuple(cache_seqlens.shape) == (batch,),
             f"{op}: cache_seqlens must be int32 [B]")
    _require(0 <= tree_len <= k_cache.shape[2], f"{op}: tree_len must be in [0, S], got {tree_len}")
    if tree_mask is not None:
        _require(tree_mask.dtype == torch.int32 and tree_mask.dim() == 3 and tree_mask.shape[:2] == q.shape[:1] + q.shape[2:3],
                 f"{op}: tree_mask must be int32 [B, Nq, W]")
        _require(32 * tree_mask.shape[2] >= tree_len, f"{op}: tree_mask has too few words for tree_len {tree_len}")
    _require(window >= 0, f"{op}: window must be >= 0 (0: no sliding window), got {window}")
    _require(not softcap, f"{op}: the native path has no soft-cap (SDPA cannot express it); "
                          f"unset JAKIRO_TREE_ATTENTION_KERNEL=native to run jakiro's kernel")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens),
                    ("tree_mask", tree_mask)):
        _require(t is None or t.device == q.device, f"{op}: q and {name} must be on the same device")


def tree_attention_native(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                          tree_mask: torch.Tensor | None = None, tree_len: int = 0, scale: float | None = None,
                          validate: bool = True, *, window: int | None = None,
                          softcap: float | None = None) -> torch.Tensor:
    """``ops.tree_attention`` as SDPA over a dense boolean mask (GQA by ``enable_gqa``).

    The mask is :func:`tree_attention_native_visibility` (prefix, per-row lengths, the tree
    bits or bottom-right causal, the sliding window); queries that see no key get zeros (SDPA
    would give NaN). Soft-cap is not expressible in SDPA: ``softcap`` other than None/0 is a
    ValueError (the dispatcher never picks this path then). ``validate`` reads the lengths back,
    as the op does (skipped under CUDA-graph capture).
    """
    window = 0 if window is None else int(window)
    softcap = 0.0 if softcap is None else float(softcap)
    tree_len = int(tree_len)
    _check_tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, tree_len, window, softcap)
    cache_size = k_cache.shape[2]
    if validate and not _capturing(q) and cache_seqlens.numel():
        low, high = (int(v) for v in torch.aminmax(cache_seqlens))
        _require(low >= tree_len and high <= cache_size,
                 f"tree_attention: cache_seqlens must be in [tree_len={tree_len}, S={cache_size}], "
                 f"got values in [{low}, {high}]")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    visible = tree_attention_native_visibility(cache_seqlens, tree_mask, tree_len, q.shape[2], cache_size, window)
    visible = visible.unsqueeze(1)                                            # [B, 1, Nq, S]
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible, scale=float(scale),
                                         enable_gqa=q.shape[1] != k_cache.shape[1])
    seen_any = visible.any(-1, keepdim=True)                                  # [B, 1, Nq, 1]
    return torch.where(seen_any, out, out.new_zeros(())).contiguous()


# ---------------------------------------------------------------------------
# expert_mlp


def _gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return F.silu(gate) * up


def expert_mlp_native(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, coeff: torch.Tensor,
                      activation: str = "silu") -> torch.Tensor:
    """``ops.expert_mlp`` as dense products: every expert on every token.

    The gate/up products of all experts are one ``mm`` against the stacked ``[E * 2I, H]``
    rows, the gated activation runs on the products in x's dtype (rounded there, as the op's
    CUDA paths and an ``nn.Linear`` stack do), the down products are one batched ``bmm``, and
    the heads combine in fp32 (fp64 for float64). An expert's output reaches a token only when
    one of the token's coefficients for it is non-zero, as in the op (a non-finite output of an
    expert a token skips is not multiplied by zero). Differentiable by autograd, with the op's
    gradients: when a gradient is needed every output takes part (the op's backward also runs
    every expert on every token).
    """
    _require(activation in ("silu", "gelu_tanh"),
             f'expert_mlp: activation must be "silu" or "gelu_tanh", got "{activation}"')
    _require(x.dim() == 2 and w_gate_up.dim() == 3 and w_down.dim() == 3 and coeff.dim() == 3,
             "expert_mlp: x, w_gate_up, w_down, coeff must have shapes [T, H], [E, 2I, H], [E, H, I], [T, R, E]")
    tokens, hidden = x.shape
    experts, hidden_down, intermediate = w_down.shape
    _require(tuple(w_gate_up.shape) == (experts, 2 * intermediate, hidden) and hidden_down == hidden
             and coeff.shape[0] == tokens and coeff.shape[2] == experts,
             "expert_mlp: sizes of x, w_gate_up, w_down and coeff do not match")
    _require(w_gate_up.dtype == x.dtype and w_down.dtype == x.dtype and coeff.dtype in (torch.float32, x.dtype),
             "expert_mlp: weights must have x's dtype and coeff float32 or x's dtype")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gate_up = (x @ w_gate_up.reshape(experts * 2 * intermediate, hidden).T)  # [T, E * 2I], x's dtype
    gate_up = gate_up.view(tokens, experts, 2 * intermediate).transpose(0, 1)  # [E, T, 2I]
    h = _gated(gate_up[..., :intermediate], gate_up[..., intermediate:], activation)
    y = torch.bmm(h, w_down.transpose(1, 2))                                  # [E, T, H]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate_up, w_down, coeff))):
        routed = (coeff != 0).any(1).T.unsqueeze(-1)                          # [E, T, 1]
        y = torch.where(routed, y, y.new_zeros(()))
    # else every output stays, so a zero coefficient's gradient is the expert's output, as the
    # op's backward defines it
    return torch.einsum("tre,eth->rth", coeff.to(acc), y.to(acc)).to(x.dtype)


# ---------------------------------------------------------------------------
# grouped_gemm


def grouped_mm_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs its own grouped kernel on these operands without
    reading the offsets back: CUDA compute capability 9.x or 10.x, bfloat16, ``K`` and ``N``
    multiples of 8 (16-byte rows), contiguous operands starting 16 bytes into their storage.
    Elsewhere torch falls back to a loop over the groups that copies the offsets to the host.
    On the CPU it is torch's reference loop (tests)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    major, _ = torch.cuda.get_device_capability(x.device)
    k, n = x.shape[1], w.shape[1]
    return (major in (9, 10) and k % 8 == 0 and n % 8 == 0 and x.is_contiguous() and w.is_contiguous()
            and (x.storage_offset() * x.element_size()) % 16 == 0
            and (w.storage_offset() * w.element_size()) % 16 == 0)


def grouped_gemm_native(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor, validate: bool = True,
                        *, method: str | None = None) -> torch.Tensor:
    """``ops.grouped_gemm`` on stock PyTorch: ``out[p] = w[e] @ x[p]`` for the rows of expert ``e``.

    ``method``: ``"grouped_mm"`` (``torch._grouped_mm`` over the offsets; the default where
    :func:`grouped_mm_applies`), or ``"dense"`` (the default elsewhere): a loop-free product of
    every row with every expert's ``[N, K]`` block as one ``mm`` (``E`` times the work), the
    row's own block picked by a gather. Products accumulate in fp32 (fp64 for float64) and are
    rounded to x's dtype once. ``validate`` reads the offsets back (skipped under capture), as
    the op does.
    """
    _require(x.dim() == 2 and w.dim() == 3 and x.shape[1] == w.shape[2],
             "grouped_gemm: x must be [T, K] and w [E, N, K] with the same K")
    _require(w.dtype == x.dtype, "grouped_gemm: w must have x's dtype")
    experts, n, k = w.shape
    tokens = x.shape[0]
    _require(expert_offsets.dtype == torch.int32 and tuple(expert_offsets.shape) == (experts + 1,),
             "grouped_gemm: expert_offsets must be int32 [E + 1]")
    if validate and not _capturing(x):
        offsets = expert_offsets.tolist()
        _require(offsets[0] == 0 and offsets[-1] == tokens and all(a <= b for a, b in zip(offsets, offsets[1:])),
                 f"grouped_gemm: expert_offsets must start at 0, not decrease and end at T={tokens}")
    if method is None:
        method = "grouped_mm" if grouped_mm_applies(x, w) else "dense"
    if method == "grouped_mm":
        # _grouped_mm takes the end offset of every group
        return torch._grouped_mm(x, w.transpose(1, 2), offs=expert_offsets[1:].contiguous()).to(x.dtype)
    _require(method == "dense", f"grouped_gemm_native: method must be 'grouped_mm' or 'dense', got {method!r}")
    if tokens == 0:
        return x.new_zeros((0, n))
    # each row's expert: the number of end offsets at or below its index
    rows = torch.arange(tokens, device=x.device, dtype=torch.int32)
    expert = torch.searchsorted(expert_offsets[1:].contiguous(), rows, right=True).clamp(max=experts - 1)
    everything = (x @ w.reshape(experts * n, k).T).view(tokens, experts, n)  # [T, E, N]
    index = expert.to(torch.int64).view(tokens, 1, 1).expand(tokens, 1, n)
    return torch.gather(everything, 1, index).squeeze(1)

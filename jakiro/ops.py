"""Python wrappers and fake (meta) implementations of the ``torch.ops.jakiro`` ops.

The kernels live in ``csrc/`` (one schema per op in ``csrc/ops.cpp``); their
plain-PyTorch twins, used as test oracles, are in ``jakiro/reference.py``.
The contracts are DESIGN.md section 5.
"""
from __future__ import annotations

import torch

__all__ = ["build_tree_mask", "expert_mlp", "grouped_gemm", "tree_mask_words"]


def tree_mask_words(num_nodes):
    """Number of int32 words per row of a tree mask: ``ceil(num_nodes / 32)``."""
    return (num_nodes + 31) // 32


def build_tree_mask(parents: torch.Tensor, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestor bitmask and depth of every node of a batch of trees (DESIGN.md §4, §5.1).

    Args:
        parents: int32 ``[B, N]``; ``parents[b, 0] == -1`` and ``0 <= parents[b, i] < i``
            for ``i > 0``. ``1 <= N <= jakiro.build_info()["max_tree_nodes"]``.
        validate: on CUDA, read the kernel's error flag back (one host synchronisation)
            and raise on illegal parents. Pass ``False`` inside a decoding loop whose
            trees are legal by construction; the kernel never reads out of bounds
            either way, but illegal input then gives unspecified masks. Skipped
            automatically under CUDA-graph capture. The CPU kernel always validates.

    Returns:
        ``(tree_mask, depth)``: int32 ``[B, N, ceil(N / 32)]`` where bit ``j % 32`` of word
        ``j // 32`` in row ``i`` is set iff ``j`` is ``i`` or an ancestor of ``i``; and
        int32 ``[B, N]`` with the root at depth 0.

    Raises:
        ValueError: naming the argument, for a wrong dtype, rank or size, or an illegal parent.
    """
    return torch.ops.jakiro.build_tree_mask(parents, validate)


@torch.library.register_fake("jakiro::build_tree_mask")
def _build_tree_mask_fake(parents, validate=True):
    torch._check(parents.dtype == torch.int32, lambda: f"build_tree_mask: parents must be int32, got {parents.dtype}")
    torch._check(parents.dim() == 2, lambda: f"build_tree_mask: parents must have shape [B, N], got {tuple(parents.shape)}")
    batch, n = parents.shape
    mask = parents.new_empty((batch, n, tree_mask_words(n)))
    depth = parents.new_empty((batch, n))
    return mask, depth


def expert_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts combined per routing head, in one pass over the experts (DESIGN.md §5.3).

    ``out[r, t] = sum_e coeff[t, r, e] * w_down[e] @ (silu(w_gate[e] @ x[t]) * (w_up[e] @ x[t]))``
    where ``w_gate[e] = w_gate_up[e, :I]`` and ``w_up[e] = w_gate_up[e, I:]``. Coefficients may
    be signed (Jakiro's contrastive head). An expert whose coefficients for token ``t`` are
    zero in every head is not run for ``t`` (sparse top-k routing costs only the chosen
    experts); the result is the same as the dense sum as long as the experts' outputs are finite.

    Args:
        x: ``[T, H]`` float16, bfloat16, float32 or float64 (float64: CPU only).
        w_gate_up: ``[E, 2I, H]``, x's dtype: rows ``0..I-1`` gate, ``I..2I-1`` up projection
            (``nn.Linear`` layout).
        w_down: ``[E, H, I]``, x's dtype (``nn.Linear`` layout).
        coeff: ``[T, R, E]`` float32 or x's dtype, ``1 <= R <= 8`` routing heads.

    Returns:
        ``[R, T, H]`` in x's dtype. Products accumulate in fp32 (fp64 for float64). On CUDA the
        SwiGLU activations are rounded to x's dtype between the two products, as an
        ``nn.Linear`` stack would do.

    Differentiable with respect to all four inputs (``torch.library.register_autograd``). The
    backward runs every expert on every token as batched GEMMs: the gradient with respect to a
    zero coefficient is the expert's output, which the forward did not compute.

    No host synchronisation on CUDA (CUDA-graph safe).

    Raises:
        ValueError: naming the argument, for a wrong rank, size (H, I, E or T mismatches), dtype
            mix, device mix, or R outside ``[1, 8]``.
    """
    return torch.ops.jakiro.expert_mlp(x, w_gate_up, w_down, coeff)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Grouped matrix product over rows pre-sorted by expert (DESIGN.md §5.3).

    ``out[p] = w[e] @ x[p]`` for ``expert_offsets[e] <= p < expert_offsets[e + 1]``.

    Args:
        x: ``[T, K]`` float16, bfloat16, float32 or float64 (float64: CPU only).
        w: ``[E, N, K]`` in x's dtype (``nn.Linear`` layout).
        expert_offsets: int32 ``[E + 1]`` on x's device, ``0 = offsets[0] <= ... <= offsets[E] = T``;
            empty experts are fine.
        validate: on CUDA, copy the offsets to the host (one synchronisation) and raise if they are
            illegal. With ``False`` the kernel clamps illegal offsets into ``[0, T]`` (never reads
            or writes out of bounds) but rows outside every clamped segment are left unwritten.
            The CPU kernel always validates.

    Returns:
        ``[T, N]`` in x's dtype, accumulated in fp32 (fp64 for float64).

    Raises:
        ValueError: naming the argument, for a wrong rank, size, dtype or device, or offsets that
            do not start at 0, decrease, or do not end at T.
    """
    return torch.ops.jakiro.grouped_gemm(x, w, expert_offsets, validate)


@torch.library.register_fake("jakiro::expert_mlp")
def _expert_mlp_fake(x, w_gate_up, w_down, coeff):
    torch._check(x.dim() == 2, lambda: f"expert_mlp: x must have shape [T, H], got {tuple(x.shape)}")
    torch._check(coeff.dim() == 3, lambda: f"expert_mlp: coeff must have shape [T, R, E], got {tuple(coeff.shape)}")
    return x.new_empty((coeff.shape[1], x.shape[0], x.shape[1]))


@torch.library.register_fake("jakiro::grouped_gemm")
def _grouped_gemm_fake(x, w, expert_offsets, validate=True):
    torch._check(x.dim() == 2, lambda: f"grouped_gemm: x must have shape [T, K], got {tuple(x.shape)}")
    torch._check(w.dim() == 3, lambda: f"grouped_gemm: w must have shape [E, N, K], got {tuple(w.shape)}")
    return x.new_empty((x.shape[0], w.shape[1]))


def _expert_mlp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _expert_mlp_backward(ctx, grad_out):
    # Every expert on every token, as batched (equal-group) GEMMs: tokens an expert skipped
    # have a zero output gradient, so they add nothing to dx or the weight gradients, and
    # their coefficient gradient needs the expert's output anyway.
    x, w_gate_up, w_down, coeff = ctx.saved_tensors
    need_x, need_w_gate_up, need_w_down, need_coeff = ctx.needs_input_grad
    experts, intermediate = w_down.shape[0], w_down.shape[2]
    xs = x.unsqueeze(0).expand(experts, -1, -1)                       # [E, T, H]
    gate, up = torch.bmm(xs, w_gate_up.transpose(1, 2)).split(intermediate, dim=-1)
    sig = torch.sigmoid(gate)
    act = gate * sig                                                  # silu(gate)
    h = act * up                                                      # [E, T, I]
    grad_out = grad_out.to(x.dtype)
    grad_y = torch.einsum("tre,rth->eth", coeff.to(x.dtype), grad_out)  # [E, T, H]

    grad_x = grad_w_gate_up = grad_w_down = grad_coeff = None
    if need_coeff:
        y = torch.bmm(h, w_down.transpose(1, 2))                      # [E, T, H]
        grad_coeff = torch.einsum("eth,rth->tre", y, grad_out).to(coeff.dtype)
    if need_w_down:
        grad_w_down = torch.bmm(grad_y.transpose(1, 2), h)            # [E, H, I]
    if need_x or need_w_gate_up:
        grad_h = torch.bmm(grad_y, w_down)                            # [E, T, I]
        grad_gate = grad_h * up * sig * (1 + gate * (1 - sig))        # silu'(g) = s (1 + g (1 - s))
        grad_up = grad_h * act
        grad_gate_up = torch.cat([grad_gate, grad_up], dim=-1)        # [E, T, 2I]
        if need_w_gate_up:
            grad_w_gate_up = torch.bmm(grad_gate_up.transpose(1, 2), xs)  # [E, 2I, H]
        if need_x:
            grad_x = torch.bmm(grad_gate_up, w_gate_up).sum(0)        # [T, H]
    return grad_x, grad_w_gate_up, grad_w_down, grad_coeff


torch.library.register_autograd("jakiro::expert_mlp", _expert_mlp_backward, setup_context=_expert_mlp_setup_context)

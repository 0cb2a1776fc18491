"""Python wrappers and fake (meta) implementations of the ``torch.ops.jakiro`` ops.

The kernels live in ``csrc/`` (one schema per op in ``csrc/ops.cpp``); their
plain-PyTorch twins, used as test oracles, are in ``jakiro/reference.py``.
The contracts are DESIGN.md section 5.
"""
from __future__ import annotations

import torch

__all__ = ["build_tree_mask", "tree_mask_words"]


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

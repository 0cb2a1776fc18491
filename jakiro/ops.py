"""Python wrappers and fake (meta) implementations of the ``torch.ops.jakiro`` ops.

The kernels live in ``csrc/`` (one schema per op in ``csrc/ops.cpp``); their
plain-PyTorch twins, used as test oracles, are in ``jakiro/reference.py``.
The contracts are DESIGN.md section 5.
"""
from __future__ import annotations

import torch

__all__ = ["build_tree_mask", "tree_attention", "tree_mask_words", "TREE_ATTENTION_HEAD_DIMS"]

# Head sizes the tree_attention kernels are built for.
TREE_ATTENTION_HEAD_DIMS = (64, 128)


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


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                   tree_mask: torch.Tensor | None = None, tree_len: int = 0, scale: float | None = None,
                   validate: bool = True) -> torch.Tensor:
    """Attention of a block of tree queries over a KV cache (DESIGN.md §5.2).

    Row ``b`` of the cache holds ``cache_seqlens[b]`` valid keys. The last ``tree_len`` of
    them (positions ``cache_seqlens[b] - tree_len .. cache_seqlens[b] - 1``) are the tree;
    bit ``j % 32`` of word ``j // 32`` of ``tree_mask[b, i]`` says whether query ``i`` sees
    tree key ``j`` (the format of :func:`build_tree_mask`). The keys before the tree are the
    committed prefix, visible to every query; keys at or after ``cache_seqlens[b]`` do not
    exist. ``tree_mask=None`` is bottom-right causal: query ``i`` sees the keys
    ``< cache_seqlens[b] - Nq + i + 1`` (prefill, chain decoding); ``tree_len`` is then
    only checked against the lengths. A query that sees no key at all gets zeros.

    The target's verify pass has ``Nq == tree_len == N`` and the tree's own mask; the draft's
    tree expansion passes the frontier's rows of the mask (``Nq`` < ``tree_len``).

    Args:
        q: ``[B, Hq, Nq, D]``, float16, bfloat16 or float32; any strides.
        k_cache, v_cache: ``[B, Hkv, S, D]`` of q's dtype and device; ``Hq % Hkv == 0``
            (grouped-query attention: query head ``h`` reads KV head ``h // (Hq // Hkv)``).
            May be strided views of a larger preallocated cache as long as the last
            dimension is contiguous (e.g. ``cache[:, :S].transpose(1, 2)`` of a
            ``[B, S_max, Hkv, D]`` tensor).
        cache_seqlens: int32 ``[B]`` with ``tree_len <= cache_seqlens[b] <= S``.
        tree_mask: int32 ``[B, Nq, W]`` with ``32 * W >= tree_len``, or None (causal).
        tree_len: number of tree keys at the end of every row, ``0 <= tree_len <= S``.
        scale: multiplier of ``q @ k^T``; default ``1 / sqrt(D)``.
        validate: on CUDA, read ``cache_seqlens`` back (one host synchronisation) and raise
            on lengths outside ``[tree_len, S]``. Pass ``False`` inside a decoding loop:
            the kernel clamps the lengths and never reads out of bounds, but invalid
            lengths then give unspecified outputs. Skipped under CUDA-graph capture. The
            CPU kernel always validates.

    Returns:
        ``[B, Hq, Nq, D]`` contiguous, of q's dtype. Scores, softmax and accumulation are fp32.

    Limits: ``D`` in ``TREE_ATTENTION_HEAD_DIMS`` (64, 128).

    Raises:
        ValueError: naming the argument, for a wrong dtype, device, rank, size or stride, an
        unsupported head size, ``Hq % Hkv != 0``, a mask too narrow for ``tree_len``, or (when
        validating) a length outside ``[tree_len, S]``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.jakiro.tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, int(tree_len),
                                           float(scale), validate)


@torch.library.register_fake("jakiro::tree_attention")
def _tree_attention_fake(q, k_cache, v_cache, cache_seqlens, tree_mask, tree_len, scale, validate=True):
    torch._check(q.dim() == 4, lambda: f"tree_attention: q must have shape [B, Hq, Nq, D], got {tuple(q.shape)}")
    torch._check(k_cache.dim() == 4 and v_cache.dim() == 4,
                 lambda: "tree_attention: k_cache and v_cache must have shape [B, Hkv, S, D]")
    torch._check(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
                 lambda: "tree_attention: k_cache and v_cache must have q's dtype")
    torch._check(q.shape[1] % k_cache.shape[1] == 0,
                 lambda: "tree_attention: Hq must be a multiple of Hkv")
    return q.new_empty(q.shape)  # contiguous, like the kernels

"""Plain-PyTorch twins of every jakiro op: the oracles the kernels are tested against.

They favour obviousness over speed, but run on any device without host loops
over the data where that stays readable.
"""
from __future__ import annotations

import torch

__all__ = ["build_tree_mask", "tree_attention", "tree_attention_visibility"]


def build_tree_mask(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``jakiro.ops.build_tree_mask`` (no validation).

    Builds a dense boolean ancestor matrix by repeated pointer jumping (log2 N
    rounds), then packs it into int32 words.
    """
    batch, n = parents.shape
    device = parents.device
    idx = torch.arange(n, device=device)
    parent = parents.long().clamp(min=-1)
    # ancestors[b, i, j]: j is i or an ancestor of i.
    ancestors = idx.view(1, n, 1) == idx.view(1, 1, n)
    ancestors = ancestors.expand(batch, n, n).clone()
    hop = parent.clone()  # the 2^r-th ancestor of each node, -1 once past the root
    while bool((hop >= 0).any()):
        has = hop >= 0
        safe = hop.clamp(min=0)
        # the nodes reachable from the hop target within 2^r steps
        reach = torch.gather(ancestors, 1, safe.unsqueeze(-1).expand(batch, n, n))
        ancestors = ancestors | (reach & has.unsqueeze(-1))
        hop_next = torch.gather(hop, 1, safe)
        hop = torch.where(has, hop_next, torch.full_like(hop, -1))
    depth = ancestors.sum(-1) - 1
    return pack_bits(ancestors), depth.to(torch.int32)


def pack_bits(dense: torch.Tensor) -> torch.Tensor:
    """Packs a boolean ``[..., N]`` tensor into int32 ``[..., ceil(N/32)]`` (bit j%32 of word j//32)."""
    n = dense.shape[-1]
    words = (n + 31) // 32
    padded = torch.zeros(*dense.shape[:-1], words * 32, dtype=torch.int64, device=dense.device)
    padded[..., :n] = dense.to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=dense.device),
                                       torch.arange(32, device=dense.device))
    packed = (padded.view(*dense.shape[:-1], words, 32) * weights).sum(-1)
    # reinterpret the low 32 bits as a signed int32
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: int32 ``[..., W]`` -> boolean ``[..., n]``."""
    bits = torch.arange(32, device=mask.device, dtype=torch.int32)
    dense = (mask.unsqueeze(-1) >> bits) & 1
    return dense.flatten(-2)[..., :n].bool()


def tree_attention_visibility(cache_seqlens: torch.Tensor, tree_mask: torch.Tensor | None, tree_len: int,
                              num_queries: int, cache_size: int) -> torch.Tensor:
    """Dense boolean ``[B, Nq, S]``: whether query i of row b sees key j (DESIGN.md §5.2)."""
    device = cache_seqlens.device
    pos = torch.arange(cache_size, device=device).view(1, 1, -1)
    lens = cache_seqlens.long().view(-1, 1, 1)
    if tree_mask is None:
        query = torch.arange(num_queries, device=device).view(1, -1, 1)
        return pos < lens - num_queries + query + 1
    tree_start = lens - tree_len
    prefix = pos < tree_start
    if tree_len == 0:
        return (pos < lens).expand(-1, num_queries, -1)
    in_tree = (pos >= tree_start) & (pos < lens)
    bits = unpack_bits(tree_mask, tree_mask.shape[-1] * 32)  # [B, Nq, 32 W]
    tree_index = (pos - tree_start).clamp(0, bits.shape[-1] - 1).expand(-1, num_queries, -1)
    return prefix | (in_tree & torch.gather(bits, 2, tree_index))


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                   tree_mask: torch.Tensor | None, tree_len: int, scale: float) -> torch.Tensor:
    """Reference of ``jakiro.ops.tree_attention`` (no validation): dense fp64 math.

    Builds the full ``[B, Nq, S]`` visibility, repeats the KV heads for GQA, and runs
    matmul-softmax-matmul in float64. Queries that see no key get zeros.
    """
    batch, hq, nq, _ = q.shape
    group = hq // k_cache.shape[1]
    visible = tree_attention_visibility(cache_seqlens, tree_mask, tree_len, nq, k_cache.shape[2])
    k = k_cache.double().repeat_interleave(group, dim=1)
    v = v_cache.double().repeat_interleave(group, dim=1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: NaN -> 0
    return (probs @ v).to(q.dtype)

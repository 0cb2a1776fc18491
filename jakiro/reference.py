"""Plain-PyTorch twins of every jakiro op: the oracles the kernels are tested against.

They favour obviousness over speed, but run on any device without host loops
over the data where that stays readable.
"""
from __future__ import annotations

import torch

__all__ = ["build_tree_mask"]


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

"""Plain-PyTorch twins of every jakiro op: the oracles the kernels are tested against.

They favour obviousness over speed, but run on any device without host loops
over the data where that stays readable.
"""
from __future__ import annotations

import torch

__all__ = ["build_tree_mask", "expert_mlp", "grouped_gemm"]


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


def expert_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """Reference of ``jakiro.ops.expert_mlp``: every expert on every token, dense.

    Computed in fp32 (fp64 for float64 inputs) and rounded to x's dtype at the end;
    differentiable, so its autograd is the oracle for the op's backward.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    intermediate = w_down.shape[2]
    gate_up = torch.einsum("th,enh->etn", x.to(acc), w_gate_up.to(acc))          # [E, T, 2I]
    h = torch.nn.functional.silu(gate_up[..., :intermediate]) * gate_up[..., intermediate:]
    y = torch.einsum("eti,ehi->eth", h, w_down.to(acc))                          # [E, T, H]
    return torch.einsum("tre,eth->rth", coeff.to(acc), y).to(x.dtype)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """Reference of ``jakiro.ops.grouped_gemm`` (no validation): a loop of fp32 products."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    offsets = expert_offsets.tolist()
    out = torch.zeros(x.shape[0], w.shape[1], dtype=acc, device=x.device)
    for e in range(w.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        out[lo:hi] = x[lo:hi].to(acc) @ w[e].to(acc).T
    return out.to(x.dtype)

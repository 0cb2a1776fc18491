"""Input generators shared by the tests and the benchmarks (not needed at run time).

Trees are in the DESIGN.md §4 format; expert inputs follow §5.3.
"""
from __future__ import annotations

import torch

SHAPES = ("chain", "star", "binary", "random")


def make_parents(shape: str, batch: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """int32 [batch, n] parents of trees of the given shape (node 0 the root)."""
    idx = torch.arange(n)
    if shape == "chain":
        row = idx - 1
        parents = row.expand(batch, n)
    elif shape == "star":
        parents = torch.zeros(batch, n, dtype=torch.long)
    elif shape == "binary":
        parents = ((idx - 1) // 2).expand(batch, n)
    elif shape == "random":
        # each node picks a uniformly random earlier node as parent
        u = torch.rand(batch, n, generator=generator)
        parents = (u * idx).floor().long()
    else:
        raise ValueError(f"unknown tree shape {shape!r}; expected one of {SHAPES}")
    parents = parents.clone().to(torch.int32)
    parents[:, 0] = -1
    return parents



COEFF_PATTERNS = ("dense", "top1", "top2", "zero_rows", "signed")


def make_coeff(pattern: str, tokens: int, heads: int, experts: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 [tokens, heads, experts] routing coefficients.

    dense: a softmax over all experts per head; top1/top2: the softmax weights of each
    token's top-k experts (chosen once per token, shared by the heads), zero elsewhere;
    zero_rows: dense, but every third token has no expert at all; signed: Jakiro's
    contrastive style, head 0 a softmax and the other heads signed random weights.
    """
    logits = torch.randn(tokens, heads, experts, generator=generator)
    weights = logits.softmax(-1)
    if pattern == "dense":
        return weights
    if pattern in ("top1", "top2"):
        k = min(int(pattern[-1]), experts)
        chosen = logits.mean(1).topk(k, dim=-1).indices                        # [T, k]
        mask = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, chosen, True)
        picked = torch.where(mask.unsqueeze(1), logits, torch.full_like(logits, float("-inf")))
        return picked.softmax(-1)
    if pattern == "zero_rows":
        weights[::3] = 0
        return weights
    if pattern == "signed":
        signed = torch.randn(tokens, heads, experts, generator=generator)
        signed[:, 0] = weights[:, 0]
        return signed
    raise ValueError(f"unknown coefficient pattern {pattern!r}; expected one of {COEFF_PATTERNS}")


def make_expert_mlp_inputs(tokens: int, hidden: int, intermediate: int, experts: int, heads: int,
                           pattern: str = "dense", dtype: torch.dtype = torch.float32,
                           device: torch.device | str = "cpu", generator: torch.Generator | None = None):
    """(x, w_gate_up, w_down, coeff) for expert_mlp, scaled so every stage stays O(1).

    coeff is float32, or float64 when dtype is (so gradcheck perturbs it precisely)."""
    x = torch.randn(tokens, hidden, generator=generator)
    w_gate_up = torch.randn(experts, 2 * intermediate, hidden, generator=generator) / hidden**0.5
    w_down = torch.randn(experts, hidden, intermediate, generator=generator) / intermediate**0.5
    coeff = make_coeff(pattern, tokens, heads, experts, generator)
    return (x.to(device, dtype), w_gate_up.to(device, dtype), w_down.to(device, dtype), coeff.to(device, torch.float64 if dtype == torch.float64 else torch.float32))


def make_expert_offsets(tokens: int, experts: int, empty: int = 0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """int32 [experts + 1] offsets of rows sorted by expert: random segment sizes summing to
    ``tokens``, with the first ``empty`` of the odd-numbered experts forced empty."""
    cuts = torch.randint(0, tokens + 1, (experts - 1,), generator=generator).sort().values
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.full((1,), tokens)])
    for e in list(range(1, experts, 2))[:empty]:
        if e + 1 < experts:
            offsets[e + 1] = offsets[e]  # segment e becomes empty, segment e + 1 absorbs its rows
        else:
            offsets[e] = offsets[e + 1]  # the last segment becomes empty, segment e - 1 absorbs it
    return offsets.to(torch.int32)

"""Input generators shared by the tests and the benchmarks (not needed at run time).

Trees are in the DESIGN.md §4 format.
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

"""Choosing ``total_tokens`` (tree nodes verified per cycle) for a device by timing it.

The authors' ``total_token=-1`` times the target on 40–60
tokens, divides each time by an expected acceptance gain (1, 1.05, 1.07, 1.10, 1.13) and
keeps the cheapest. Their gains follow ``(N / 40) ** 0.3`` to within 1%, which lets the rule
reach the small trees a CPU wants (there a verify pass grows with N from the first token,
while an H100 verifies 60 tokens at the price of one). We also add the draft's own time
per cycle, which does not depend on N, so a slow draft pushes the choice to larger trees.
"""
from __future__ import annotations

import statistics
import time

import torch

from jakiro import ops
from jakiro.target import TargetModel
from jakiro.tree import TreeDrafter

CANDIDATES = (4, 6, 8, 12, 16, 24, 32, 40, 48, 60)
GAIN_EXPONENT = 0.3


def expected_gain(total_tokens: int) -> float:
    """Relative accepted length of an N-node tree (the authors' table, extended)."""
    return (total_tokens / 40) ** GAIN_EXPONENT


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()                                               # warm-up
    return statistics.median(_seconds(fn, device) for _ in range(repeats))


def _verify_pass(target: TargetModel, total_tokens: int, context: int):
    """A call running one target pass over an N-node tree (a chain) after ``context`` cached tokens."""
    device = target.device
    cache = target.new_cache(1, context + total_tokens)
    cache.advance(context)
    ids = torch.randint(0, target.vocab_size, (1, total_tokens), device=device)
    parents = torch.arange(-1, total_tokens - 1, dtype=torch.int32, device=device).unsqueeze(0)
    mask, depth = ops.build_tree_mask(parents)
    positions = context + depth.to(torch.int64)

    @torch.no_grad()
    def verify():
        step = cache.step(total_tokens, tree_mask=mask, tree_len=total_tokens)
        target.forward(ids, positions, cache, step)
    return verify


def time_verify_all(target: TargetModel, sizes, context: int = 256, rounds: int = 7) -> dict[int, float]:
    """Seconds of one target pass over an N-node tree (a chain) after ``context`` cached tokens,
    for every N of ``sizes``: each measured in turn ``rounds`` times (median per size), so a
    slow spell of a shared machine spreads over the sizes instead of hitting one."""
    passes = {n: _verify_pass(target, n, context) for n in sizes}
    for verify in passes.values():
        verify()                                       # warm-up
    samples = {n: [] for n in sizes}
    for _ in range(rounds):
        for n, verify in passes.items():
            samples[n].append(_seconds(verify, target.device))
    return {n: statistics.median(times) for n, times in samples.items()}


@torch.no_grad()
def time_draft(drafter: TreeDrafter, context: int = 256, repeats: int = 3) -> float:
    """Seconds of one tree expansion (every level's draft pass and LM-head top-k)."""
    draft = drafter.draft
    device = draft.fc.weight.device
    hidden_size = draft.config.hidden_size
    cache = drafter.new_cache(1, context + drafter.max_new_pairs)
    hidden = torch.randn(1, context, hidden_size, device=device, dtype=draft.fc.weight.dtype)
    tokens = torch.randint(0, draft.config.vocab_size, (1, context), device=device)
    count = torch.tensor([context], dtype=torch.int32, device=device)
    context_out = drafter.advance(cache, hidden, tokens, count)
    root = tokens[:, -1]
    return _median_seconds(lambda: drafter.expand(cache, context_out, root), device, repeats)


def choose_total_tokens(target, draft, depth: int = 5, top_k: int = 10,
                        candidates: tuple[int, ...] = CANDIDATES) -> tuple[int, list[dict]]:
    """The N that minimises ``(verify(N) + draft) / expected_gain(N)`` on this device.

    Returns ``(N, table)``; ``table`` has one ``{"total_tokens", "verify_ms", "draft_ms",
    "cost"}`` row per candidate (candidates larger than the tree can hold are skipped).
    """
    target = TargetModel.of(target)
    limit = top_k + depth * top_k * top_k + 1
    usable = [n for n in candidates if 2 <= n <= limit]
    if not usable:
        raise ValueError(f"choose_total_tokens: no candidate fits a tree of depth={depth}, top_k={top_k}")
    draft_seconds = time_draft(TreeDrafter(draft, depth=depth, top_k=top_k, total_tokens=usable[0]))
    table = []
    for n, verify_seconds in time_verify_all(target, usable).items():
        table.append(dict(total_tokens=n, verify_ms=1e3 * verify_seconds, draft_ms=1e3 * draft_seconds,
                          cost=(verify_seconds + draft_seconds) / expected_gain(n)))
    best = min(table, key=lambda row: row["cost"])["total_tokens"]
    return best, table

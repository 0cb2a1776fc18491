"""Lookup candidates: continuations of n-gram matches in a row's own text, as an extra tree branch.

Text often repeats itself (code above all: names, signatures, indentation), and a draft head
predicts such repeats no better than any other text. :class:`NgramLookup` finds, per row, the
most recent earlier occurrence of the row's current suffix in its history (the prompt, then the
tokens emitted so far; the last of them is the next tree's root), longest n-gram first, and
proposes the tokens that followed it. :func:`merge` hangs that chain under the root of the
draft's tree; the target verifies it in the same pass as the draft's own nodes.

Both run on the device with static shapes and no host reads: every row gets a proposal of
``tokens`` entries and a length (0: no match), and every tree keeps ``total_tokens`` nodes.

Exactness: a tree only ever holds proposals. Given the history, the lookup chain is a fixed
function of it, so verification sees a deterministic tree as before (``verify_sampling`` with
``draft_probs=None``: deterministic proposals, rejected tokens leave the distribution), and the
output keeps the target's distribution; greedy output stays the target's greedy output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LookupProposal:
    """tokens: int64 ``[B, L]``, each row's proposed continuation (entries past ``length`` are 0);
    length: int64 ``[B]``, how many of them are proposed (0: no match)."""
    tokens: torch.Tensor
    length: torch.Tensor


class NgramLookup:
    """Proposes up to ``tokens`` tokens per row by n-gram matching (see the module docstring).

    Args:
        tokens: most tokens proposed per row (the lookup branch's depth).
        max_ngram, min_ngram: suffix lengths tried, longest first; the first length with a
            match decides.
    """

    def __init__(self, tokens: int, max_ngram: int = 3, min_ngram: int = 1):
        for name, value in (("tokens", tokens), ("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NgramLookup: {name} must be an int >= 1, got {value!r}")
        if min_ngram > max_ngram:
            raise ValueError(f"NgramLookup: min_ngram ({min_ngram}) must be <= max_ngram ({max_ngram})")
        self.tokens, self.max_ngram, self.min_ngram = tokens, max_ngram, min_ngram

    def propose(self, history: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> LookupProposal:
        """history int64 ``[B, S]``: row ``b``'s text is ``history[b, start[b]:end[b]]`` (the rest
        is padding, never matched or proposed); ``start``, ``end`` ``[B]`` with ``start < end``.

        The row's suffix of length n (its last n tokens) is looked up among the n-grams that
        end before the row's last token; of the matches, the most recent one followed by a full
        ``tokens`` continuation wins, else the most recent one. The proposal is the text after
        the match, at most ``tokens`` long and never past the row's last token.
        """
        batch, width = history.shape
        device = history.device
        start, last = start.to(torch.int64), end.to(torch.int64) - 1          # last: the root's index
        best = torch.full((batch,), -1, dtype=torch.int64, device=device)    # end index of the match
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if width < n + 1:
                continue
            suffix = history.gather(1, (last.unsqueeze(1) - n + 1 + torch.arange(n, device=device)).clamp(min=0))
            windows = history.unfold(1, n, 1)                                  # [B, S - n + 1, n]
            first = torch.arange(width - n + 1, device=device).unsqueeze(0)  # each window's first index
            ends = first + n - 1
            hit = (windows == suffix.unsqueeze(1)).all(-1) & (first >= start.unsqueeze(1))
            hit &= (ends < last.unsqueeze(1)) & (last - n + 1 >= start).unsqueeze(1)
            # The most recent match with a whole continuation, else the most recent one.
            full = (last.unsqueeze(1) - ends) >= self.tokens
            key = torch.where(hit, ends + width * full, -1).max(1).values
            found = (key >= 0) & (best < 0)
            best = torch.where(found, key % width, best)
        length = torch.where(best >= 0, (last - best).clamp(max=self.tokens), 0)
        index = best.unsqueeze(1) + 1 + torch.arange(self.tokens, device=device)
        tokens = history.gather(1, index.clamp(0, width - 1))
        tokens = torch.where(torch.arange(self.tokens, device=device) < length.unsqueeze(1), tokens, 0)
        return LookupProposal(tokens, length)


def merge(root: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor, parent_ids: torch.Tensor,
          level: torch.Tensor, proposal: LookupProposal, total_tokens: int):
    """A tree of ``total_tokens`` nodes per row from the draft's candidates and a lookup chain.

    The draft's candidates (``C`` of them; candidate ``c`` has global id ``c + 1``, the root 0):
    ``tokens`` int64 ``[B, C]``, cumulative ``scores`` float ``[B, C]``, ``parent_ids`` int64
    ``[B, C]`` (global ids, parents before children), ``level`` int64 ``[C]``.

    The chain is walked down from the root: while its next token is that of a candidate under
    the node reached so far, that candidate is reused (forced into the tree) instead of a copy;
    the rest of the chain is ``new`` fresh nodes. The draft keeps its best ``total_tokens - 1 -
    new`` candidates, forced ones first: lookup slots a row does not use (no match, a short
    match, tokens the draft already proposed) go back to the draft's next best. Forced nodes
    form a chain from the root and every other node's score is at most its parent's, so the
    kept set is closed under ancestors, as without lookup.

    Returns ``(tokens int64 [B, N], parents int32 [B, N], scores [B, N], level int64 [B, N])``
    in the tree format (node 0 the root; the draft's nodes in candidate order, then the new
    lookup nodes in chain order, so parents come first). Lookup nodes score 0.
    """
    batch, count = tokens.shape
    device = tokens.device
    keep = total_tokens - 1
    length = proposal.length.to(torch.int64)
    chain = proposal.tokens
    ids = torch.arange(count, device=device).unsqueeze(0)
    reached = torch.zeros(batch, dtype=torch.int64, device=device)   # global id of the last reused node
    matched = torch.zeros(batch, dtype=torch.int64, device=device)   # chain tokens reused
    forced = torch.zeros((batch, count), dtype=torch.bool, device=device)
    walking = torch.ones(batch, dtype=torch.bool, device=device)
    for i in range(chain.shape[1]):
        hit = (parent_ids == reached.unsqueeze(1)) & (tokens == chain[:, i:i + 1])
        walking &= (i < length) & hit.any(1)
        first = hit.to(torch.int32).argmax(1)                         # the lowest index among equals
        forced |= walking.unsqueeze(1) & (ids == first.unsqueeze(1))
        reached = torch.where(walking, first + 1, reached)
        matched += walking
    new = length - matched                                            # fresh lookup nodes per row
    drafted = (keep - new).unsqueeze(1)                               # the draft's nodes per row
    order = torch.sort(scores.masked_fill(forced, float("inf")), dim=1, descending=True, stable=True).indices
    rank = torch.arange(keep, device=device).unsqueeze(0)
    # Candidate index `count` marks a slot the lookup chain takes; sorted last.
    chosen = torch.where(rank < drafted, order[:, :keep], count).sort(dim=1).values
    safe = chosen.clamp(max=count - 1)

    def node_of(global_id):   # node index of a kept candidate (global id; 0: the root)
        return torch.where(global_id == 0, 0, torch.searchsorted(chosen, (global_id - 1).clamp(min=0)) + 1)

    parent_node = node_of(parent_ids.gather(1, safe))
    step = rank - drafted                                             # >= 0: the chain's new nodes
    fresh = step >= 0
    attach = node_of(reached.unsqueeze(1))
    parent_node = torch.where(fresh, torch.where(step == 0, attach, rank), parent_node)   # node rank = slot rank - 1
    node_tokens = torch.where(fresh, chain.gather(1, (matched.unsqueeze(1) + step).clamp(0, chain.shape[1] - 1)),
                              tokens.gather(1, safe))
    node_scores = torch.where(fresh, 0.0, scores.gather(1, safe))
    node_level = torch.where(fresh, matched.unsqueeze(1) + 1 + step, level[safe])
    minus_one = torch.full((batch, 1), -1, dtype=torch.int64, device=device)
    parents = torch.cat((minus_one, parent_node), dim=1).to(torch.int32)
    return (torch.cat((root.unsqueeze(1), node_tokens), dim=1), parents,
            torch.cat((scores.new_zeros((batch, 1)), node_scores), dim=1),
            torch.cat((torch.zeros_like(minus_one), node_level), dim=1))

"""Draft-tree expansion: EAGLE-2 dynamic trees with Jakiro's contrastive last level.

:class:`TreeDrafter` owns the draft's side of a decoding cycle, all on device (no host
reads):

* :meth:`TreeDrafter.advance` feeds the newly committed ``(f_t, x_{t+1})`` pairs of every
  row to the draft (its KV cache grows by exactly those pairs) and returns the draft's
  features at each row's last committed position (the context of the next tree);
* :meth:`TreeDrafter.expand` grows the tree: ``levels = depth + 1`` levels of candidates,
  ``top_k`` children per expanded node, the ``top_k`` best candidates of a level (by
  cumulative log-probability) expanded further, and finally the best
  ``total_tokens - 1`` candidates overall kept, in the tree format of ``docs/architecture.md``.

With ``contrastive=True`` the last level costs no draft pass: the pass over level
``levels - 2`` also returns the contrastive feature, which predicts two tokens ahead, and
its top-k are attached under the level ``levels - 1`` nodes *of the context that produced
them* (each node's own parent row). The authors' code attached them by rank instead,
under unrelated nodes.

Tree-node keys live in the draft cache after the committed pairs: level ``l`` (1-based)
takes slots ``(l - 1) * top_k .. l * top_k - 1`` past ``lengths`` and is overwritten by the
next cycle's committed pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from jakiro import calibration, ops
from jakiro.cpu_routing import cpu_routes, use_kernels
from jakiro.draft import DraftOutput, JakiroDraft
from jakiro.kv_cache import AttentionStep, KVCache
from jakiro.lookup import LookupProposal, merge


@dataclass
class DraftTree:
    """A batch of draft trees (``docs/architecture.md``, Tree format) with their cumulative draft log-probabilities.

    tokens: int64 ``[B, N]`` (node 0 = the root); parents: int32 ``[B, N]``;
    scores: float32 ``[B, N]`` (root and lookup nodes 0); level: int64 ``[B, N]`` depth of every node;
    mask: int32 ``[B, N, W]`` every node's ancestors (``build_tree_mask``'s format).
    """
    tokens: torch.Tensor
    parents: torch.Tensor
    scores: torch.Tensor
    level: torch.Tensor
    mask: torch.Tensor

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def positions(self, lengths: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, N]``: each node's position after ``lengths`` committed tokens (root first)."""
        return lengths.to(torch.int64).unsqueeze(1) + self.level

    def attention_step(self, cache: KVCache) -> AttentionStep:
        """Where the target's verify pass writes the tree in ``cache``, and what each node sees."""
        return cache.step(self.size, tree_mask=self.mask, tree_len=self.size)

    def path_tokens(self, path: torch.Tensor, accept_len: torch.Tensor, next_token: torch.Tensor,
                    width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens a cycle emits and the path's node indices, both ``[B, width]``: the accepted
        nodes after the root, then ``next_token``, at ``accept_len`` (the rest is don't-care)."""
        path = F.pad(path, (0, max(0, width - self.size)), value=-1)[:, :width].to(torch.int64).clamp(min=0)
        new = self.tokens.gather(1, path).roll(-1, dims=1)
        return new.scatter(1, accept_len.to(torch.int64).unsqueeze(1), next_token.unsqueeze(1)), path


def _slot_bits(slots: int, words: int, device) -> torch.Tensor:
    """int32 ``[slots, words]``: row s has only bit ``s % 32`` of word ``s // 32`` set."""
    table = torch.zeros((slots, words), dtype=torch.int32)
    for s in range(slots):
        bit = s % 32
        table[s, s // 32] = (1 << bit) if bit < 31 else -(1 << 31)
    return table.to(device)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for x ``[B, R, ...]`` and index ``[B, J]``."""
    shape = index.shape + x.shape[2:]
    flat = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(shape)
    return x.gather(1, flat)


def _sort_desc(scores: torch.Tensor) -> torch.Tensor:
    # Stable: among equal scores the lower index (an ancestor before its descendants) wins.
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


class TreeDrafter:
    """Builds draft trees with ``draft`` (see the module docstring).

    Args:
        draft: the draft model.
        depth: draft depth as in EAGLE-2 / Jakiro: the tree has ``depth + 1`` levels.
        top_k: children per expanded node and nodes expanded per level.
        total_tokens: nodes per tree including the root (``N``).
        lookup: most nodes of a lookup chain a tree may hold (0: none; ``jakiro.lookup``); they
            count in ``total_tokens``.
    """

    def __init__(self, draft: JakiroDraft, depth: int = 5, top_k: int = 10, total_tokens: int = 60,
                 lookup: int = 0):
        vocab = draft.drafting_vocab_size
        if depth < 1:
            raise ValueError(f"TreeDrafter: depth must be >= 1, got {depth}")
        if not 1 <= top_k <= vocab:
            raise ValueError(f"TreeDrafter: top_k must be in [1, {vocab}] (the drafting vocabulary), got {top_k}")
        if draft.config.candidate_mode == "per_expert" and top_k < draft.config.num_experts:
            raise ValueError(f"TreeDrafter: per_expert mode needs top_k >= num_experts "
                             f"({draft.config.num_experts}), got {top_k}")
        self.draft = draft
        self.depth, self.top_k = depth, top_k
        self.levels = depth + 1
        candidates = top_k + (self.levels - 1) * top_k * top_k
        if not 2 <= total_tokens <= candidates + 1:
            raise ValueError(f"TreeDrafter: total_tokens must be in [2, {candidates + 1}] for depth={depth}, "
                             f"top_k={top_k}, got {total_tokens}")
        self.total_tokens = total_tokens
        if isinstance(lookup, bool) or not isinstance(lookup, int) or not 0 <= lookup <= total_tokens - 1:
            raise ValueError(f"TreeDrafter: lookup must be an int in [0, total_tokens - 1 = {total_tokens - 1}] "
                             f"(lookup nodes share the tree's nodes), got {lookup!r}")
        self.lookup = lookup
        self.slots = self.levels * top_k
        self.words = ops.tree_mask_words(self.slots)
        self.contrastive = draft.config.contrastive
        self.per_expert = draft.config.candidate_mode == "per_expert"
        self._bits = None
        # The draft's numbers never reach the output: each layer and row count takes whichever of
        # jakiro's kernel and F.linear is faster on this CPU (jakiro.calibration, cached per CPU).
        self._kernel_routes = cpu_routes(draft.inference_modules(), calibration.DRAFT)

    @property
    def max_new_pairs(self) -> int:
        """Most pairs one cycle commits: the root plus a full root-to-leaf path (a lookup chain
        may be the deepest)."""
        return max(self.levels, self.lookup) + 1

    def new_cache(self, batch: int, committed_capacity: int) -> KVCache:
        """A draft cache for ``committed_capacity`` committed pairs plus the tree's slots."""
        return self.draft.new_cache(batch, committed_capacity + self.slots)

    def slot_bits(self, device) -> torch.Tensor:
        """The tree slots' mask bits (:func:`_slot_bits`), built once per device (before a
        compiled cycle's first call: it is a host-side build)."""
        if self._bits is None or self._bits.device != torch.device(device):
            self._bits = _slot_bits(self.slots, self.words, device)
        return self._bits

    # ------------------------------------------------------------------ context pass
    @torch.no_grad()
    def advance(self, cache: KVCache, hidden: torch.Tensor, tokens: torch.Tensor, count: torch.Tensor) -> DraftOutput:
        """Commits pairs and returns the features at each row's last committed pair.

        hidden ``[B, W, H]`` and tokens ``[B, W]`` are right-aligned: row b's ``count[b]``
        pairs are its last ones (the rest is padding, dropped). Returns a
        :class:`DraftOutput` whose tensors are ``[B, 1, H]`` (experts ``[E, B, 1, H]``).
        """
        width = tokens.shape[1]
        pad = width - count.to(torch.int64)
        positions = (cache.lengths.to(torch.int64).unsqueeze(1) + torch.arange(width, device=tokens.device)
                     - pad.unsqueeze(1)).clamp(min=0)
        step = cache.step(width, pad=pad)
        with use_kernels(self._kernel_routes):
            out = self.draft(hidden, tokens, positions, cache, step,
                             return_contrastive=self.contrastive and self.levels == 2,
                             return_experts=self.per_expert)
        cache.advance(count)
        last = slice(width - 1, width)
        return DraftOutput(out.mixture[:, last],
                           None if out.contrastive is None else out.contrastive[:, last],
                           None if out.experts is None else out.experts[:, :, last])

    # ------------------------------------------------------------------ tree growth
    def _propose(self, out: DraftOutput):
        """Top-k children of every row of ``out`` ``[B, R, H]``.

        Returns ``(logp [B, R, k], tokens [B, R, k], child_hidden [B, R, k, H], ahead)``: the
        feature a child is expanded with is the one that proposed it; ``ahead`` is ``(logp,
        tokens)`` of ``out``'s contrastive feature (two steps ahead: CEPD), None without one.
        All features go through the drafting head in one call, so its weights are read once.
        """
        k = self.top_k
        if self.per_expert:
            experts = out.experts.shape[0]
            features = list(out.experts)
            shares = [k // experts + (1 if e < k % experts else 0) for e in range(experts)]
        else:
            features, shares = [out.mixture], [k]
        if out.contrastive is not None:
            features.append(out.contrastive)
            shares.append(k)
        rows = out.mixture.shape[1]
        logits, vocab = self.draft.candidate_logits(torch.cat(features, dim=1) if len(features) > 1 else features[0])
        logp = F.log_softmax(logits.float(), dim=-1)
        proposals = []
        for i, share in enumerate(shares):
            best = logp[:, i * rows:(i + 1) * rows].topk(share, dim=-1)
            proposals.append((best.values, best.indices if vocab is None else vocab[best.indices]))
        ahead = proposals.pop() if out.contrastive is not None else None
        if not self.per_expert:
            values, tokens = proposals[0]
            return values, tokens, out.mixture.unsqueeze(2).expand(-1, -1, k, -1), ahead
        values = torch.cat([v for v, _ in proposals], dim=-1)
        tokens = torch.cat([t for _, t in proposals], dim=-1)
        hiddens = [out.experts[e].unsqueeze(2).expand(-1, -1, share, -1) for e, share in enumerate(shares[:experts])]
        # Two experts proposing the same token: keep the first, the copy can never be accepted.
        same = tokens.unsqueeze(-1) == tokens.unsqueeze(-2)                       # [B, R, k, k]
        earlier = torch.ones(k, k, dtype=torch.bool, device=tokens.device).tril(-1)
        repeated = (same & earlier).any(-1)
        values = values.masked_fill(repeated, float("-inf"))
        return values, tokens, torch.cat(hiddens, dim=2), ahead

    @torch.no_grad()
    def expand(self, cache: KVCache, context: DraftOutput, root: torch.Tensor,
               lookup: LookupProposal | None = None) -> DraftTree:
        """Grows one tree per row from ``context`` (see :meth:`advance`) under ``root`` int64 ``[B]``;
        a ``lookup`` proposal (at most ``self.lookup`` tokens) joins it (``jakiro.lookup.merge``)."""
        if lookup is not None and lookup.tokens.shape[1] > self.lookup:
            raise ValueError(f"TreeDrafter.expand: the lookup proposal has {lookup.tokens.shape[1]} tokens, "
                             f"more than this drafter's lookup={self.lookup}")
        with use_kernels(self._kernel_routes):
            return self._expand(cache, context, root, lookup)

    def _expand(self, cache: KVCache, context: DraftOutput, root: torch.Tensor, lookup=None) -> DraftTree:
        k, batch, device = self.top_k, root.shape[0], root.device
        self.slot_bits(device)
        base = cache.lengths.to(torch.int64).unsqueeze(1)                        # position of level 1

        # Level 1: the root's children, all of them expanded.
        logp, tokens, child_hidden, ahead = self._propose(context)               # [B, 1, k]
        scores = logp[:, 0]
        cand_tokens, cand_scores = [tokens[:, 0]], [scores]
        cand_parent = [torch.zeros((batch, k), dtype=torch.int64, device=device)]
        select = _sort_desc(scores)
        front_ids = 1 + select                                                    # global ids (root = 0)
        front_tokens = tokens[:, 0].gather(1, select)
        front_scores = scores.gather(1, select)
        front_hidden = _gather_rows(child_hidden[:, 0], select)
        front_mask = self._bits[:k].unsqueeze(0).expand(batch, -1, -1)            # [B, k, W]
        parent_row = torch.zeros((batch, k), dtype=torch.int64, device=device)   # row in `ahead`
        next_id = 1 + k

        for level in range(1, self.levels):                                      # builds level + 1
            if self.contrastive and level == self.levels - 1:
                # CEPD: the pass over level-1 nodes predicted two steps ahead; each node of
                # this level takes the predictions of its own parent's context.
                logp, tokens = _gather_rows(ahead[0], parent_row), _gather_rows(ahead[1], parent_row)
                child_hidden = None
            else:
                step = cache.step(k, offset=(level - 1) * k, tree_mask=front_mask.contiguous(),
                                  tree_len=level * k)
                out = self.draft(front_hidden, front_tokens, (base + level - 1).expand(batch, k), cache, step,
                                 return_contrastive=self.contrastive and level == self.levels - 2,
                                 return_experts=self.per_expert)
                logp, tokens, child_hidden, ahead = self._propose(out)          # [B, k, k]
            cumulative = (front_scores.unsqueeze(-1) + logp).flatten(1)           # [B, k*k]
            cand_tokens.append(tokens.flatten(1))
            cand_scores.append(cumulative)
            cand_parent.append(front_ids.repeat_interleave(k, dim=1))
            if level < self.levels - 1:
                select = _sort_desc(cumulative)[:, :k]
                parent_row = select // k
                front_ids = next_id + select
                front_tokens = tokens.flatten(1).gather(1, select)
                front_scores = cumulative.gather(1, select)
                front_hidden = _gather_rows(child_hidden.flatten(1, 2), select)
                front_mask = _gather_rows(front_mask, parent_row) | self._bits[level * k:(level + 1) * k]
            next_id += k * k

        return self._rerank(root, torch.cat(cand_tokens, 1), torch.cat(cand_scores, 1), torch.cat(cand_parent, 1),
                            lookup)

    def _rerank(self, root, tokens, scores, parent_ids, lookup=None) -> DraftTree:
        """Keeps the best ``total_tokens - 1`` candidates, in id order (parents first); with a
        ``lookup`` proposal, its chain shares those nodes (``jakiro.lookup.merge``)."""
        k = self.top_k
        if lookup is not None:
            index = torch.arange(tokens.shape[1], device=tokens.device)
            level = torch.where(index < k, 1, 2 + (index - k) // (k * k))    # as below
            node_tokens, parents, node_scores, level = merge(root, tokens, scores, parent_ids, level, lookup,
                                                             self.total_tokens)
            mask, _ = ops.build_tree_mask(parents, validate=False)
            return DraftTree(node_tokens, parents, node_scores, level, mask)
        keep = self.total_tokens - 1
        chosen = _sort_desc(scores)[:, :keep].sort(dim=1).values                 # candidate indices
        parent_id = parent_ids.gather(1, chosen)                                   # global id, root = 0
        # Candidate index c has global id c + 1; its node index in the tree is 1 + rank in `chosen`.
        parent_node = torch.searchsorted(chosen, (parent_id - 1).clamp(min=0)) + 1
        parent_node = torch.where(parent_id == 0, torch.zeros_like(parent_node), parent_node)
        batch = root.shape[0]
        minus_one = torch.full((batch, 1), -1, dtype=torch.int64, device=root.device)
        parents = torch.cat((minus_one, parent_node), dim=1).to(torch.int32)
        node_tokens = torch.cat((root.unsqueeze(1), tokens.gather(1, chosen)), dim=1)
        node_scores = torch.cat((scores.new_zeros((batch, 1)), scores.gather(1, chosen)), dim=1)
        level = torch.zeros_like(node_tokens)
        # Level of a candidate from its index: level 1 is [0, k), level l>1 is a k*k block.
        level[:, 1:] = torch.where(chosen < k, 1, 2 + (chosen - k) // (k * k))
        mask, _ = ops.build_tree_mask(parents, validate=False)
        return DraftTree(node_tokens, parents, node_scores, level, mask)

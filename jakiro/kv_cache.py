"""Preallocated KV cache with per-row lengths, and the attention call over it.

Both the target adapter and the draft model attend through :class:`KVCache`: a block of
``Nq`` new tokens per row is written into the cache (keys already rotated), then
``jakiro.ops.tree_attention`` runs over the cache with per-row lengths. What varies from
call to call (where the new rows go, the tree mask) is an :class:`AttentionStep`.

Ragged rows use *left padding*: row ``b`` of a block may start with ``pad[b]`` padding
tokens. Their keys go to a scratch slot past the end of the cache (never read) and the
real tokens land contiguously after the row's committed length, so the cache itself holds
no padding at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from jakiro import ops


@dataclass
class AttentionStep:
    """Where one block of new tokens goes and what its queries see (``ops.tree_attention``).

    positions: int64 ``[B, Nq]`` cache slot of every new token (the scratch slot for padding).
    seqlens: int32 ``[B]`` valid keys per row once the block is written.
    tree_mask: int32 ``[B, Nq, W]`` over the last ``tree_len`` keys, or None (causal).
    tree_len: number of tree keys at the end of each row (0 when causal).
    """
    positions: torch.Tensor
    seqlens: torch.Tensor
    tree_mask: torch.Tensor | None
    tree_len: int


class KVCache:
    """``kv[L, 2, B, Hkv, capacity + 1, D]`` plus committed lengths ``lengths`` int32 ``[B]``.

    Slot ``capacity`` is scratch: padding tokens are written there and never attended.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.capacity = int(capacity)
        self.kv = torch.zeros((num_layers, 2, batch, kv_heads, self.capacity + 1, head_dim), dtype=dtype,
                              device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self._rows = torch.arange(batch, device=device).unsqueeze(1)

    @property
    def batch(self) -> int:
        return self.kv.shape[2]

    def step(self, num_new: int, *, pad: torch.Tensor | None = None, offset: int = 0,
             tree_mask: torch.Tensor | None = None, tree_len: int = 0) -> AttentionStep:
        """Plans a block of ``num_new`` tokens per row written at ``lengths + offset``.

        pad: int ``[B]`` leading padding tokens of each row (dropped), or None.
        offset: slots to skip past the committed length (the draft's tree levels).
        tree_mask / tree_len: the tree the block belongs to (None: causal block).
        """
        device = self.lengths.device
        index = torch.arange(num_new, device=device).unsqueeze(0)
        start = self.lengths.to(torch.int64).unsqueeze(1) + offset
        if pad is None:
            positions = start + index
            seqlens = self.lengths + (offset + num_new)
        else:
            pad = pad.to(torch.int64).unsqueeze(1)
            positions = torch.where(index >= pad, start + index - pad, self.capacity)
            seqlens = (self.lengths + (offset + num_new) - pad.squeeze(1)).to(torch.int32)
        return AttentionStep(positions, seqlens.to(torch.int32), tree_mask, tree_len)

    def advance(self, count: torch.Tensor | int) -> None:
        """Commits the ``count[b]`` tokens written right after each row's committed length."""
        self.lengths += count.to(torch.int32) if isinstance(count, torch.Tensor) else int(count)

    def commit_path(self, path: torch.Tensor, accept_len: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Keeps the accepted root-to-node path of a tree written after the committed length.

        path: int32 ``[B, N]`` tree nodes of the path from the root (``verify_*``'s output);
        accept_len: int32 ``[B]`` accepted nodes after the root; live: bool ``[B]`` rows still
        decoding (the others commit nothing). Moves the path's keys and values into place
        (``compact_kv``) and commits the root plus the accepted nodes. Returns the committed
        counts, int32 ``[B]``.
        """
        accept_len = torch.where(live, accept_len, 0)
        ops.compact_kv(self.kv, self.lengths, path, accept_len, validate=False)
        committed = torch.where(live, accept_len + 1, 0).to(torch.int32)
        self.lengths += committed
        return committed

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               step: AttentionStep, scale: float | None = None, *, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        """Writes ``key``/``value`` ``[B, Hkv, Nq, D]`` at ``step.positions`` and attends.

        ``window``: a sliding-window layer's window (a query sees the ``window`` latest positions,
        its own included); ``softcap``: the attention logit soft-cap. None: off.
        Returns ``[B, Hq, Nq, D]`` (``query`` is ``[B, Hq, Nq, D]``).
        """
        cache_k, cache_v = self.kv[layer, 0], self.kv[layer, 1]          # [B, Hkv, S + 1, D]
        rows = self._rows.expand_as(step.positions)
        if torch.compiler.is_compiling():
            # One in-place op on the whole cache: written into a view of the cache, the block would
            # be functionalised by the compiler into a copy of the whole cache per layer.
            torch.ops.jakiro_compiled.write_kv(self.kv, layer, rows, step.positions, key, value)
        else:
            _write_kv(self.kv, layer, rows, step.positions, key, value)
        return ops.tree_attention(query.to(cache_k.dtype), cache_k, cache_v, step.seqlens, step.tree_mask,
                                  step.tree_len, scale, validate=False, window=window, softcap=softcap)


def _write_kv(kv: torch.Tensor, layer: int, rows: torch.Tensor, positions: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> None:
    """``kv[layer, 0|1]`` at (``rows``, ``positions``) = ``key`` / ``value`` ``[B, Hkv, Nq, D]``."""
    # cache[rows, :, positions] is [B, Nq, Hkv, D]: advanced indices come first.
    kv[layer, 0][rows, :, positions] = key.transpose(1, 2).to(kv.dtype)
    kv[layer, 1][rows, :, positions] = value.transpose(1, 2).to(kv.dtype)


# The same write as an opaque op that mutates the whole cache, for compiled cycles (jakiro.compiled).
torch.library.custom_op("jakiro_compiled::write_kv", mutates_args=("kv",))(_write_kv).register_fake(
    lambda kv, layer, rows, positions, key, value: None)

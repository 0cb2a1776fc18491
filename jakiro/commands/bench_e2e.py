"""``jakiro bench-e2e``: vanilla vs EAGLE-2 vs Jakiro on MT-bench and HumanEval, in one run.

For each prompt set and temperature, every method decodes every prompt (interleaved, see
:mod:`jakiro.commands.evaluate`); the report gives tokens/s, speedup over vanilla decoding on the same
cache and attention stack, and tau, plus the ``total_tokens`` chosen by timing this device
(:mod:`jakiro.autotune`). The drafts run alone; ``jakiro-lookup`` is Jakiro's mixture draft with
the lookup branch of ``--lookup`` tokens (:mod:`jakiro.lookup`), where lookup is on. Hugging Face
``generate`` runs too, as a second vanilla baseline.
At temperature 0 every jakiro method must reproduce vanilla's tokens exactly: a difference stops
the run with an error (:func:`greedy_must_match`), except in half precision on a GPU, where it is
reported. ``--plot DIR`` draws the report (tokens/s and speedups, the accepted-length histogram,
speed and tau against the tree size: :mod:`jakiro.plots`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

from jakiro.commands.options import (DRAFT_HELP, RunSettings, UsageError, add_compile_argument,
                                     add_target_arguments, at_least,
                                     check_context, greedy_must_match, load_draft, load_target_model,
                                     load_tokenizer, resolve_run_settings, resolve_total_tokens)
from jakiro.progress import PROGRESS_HELP

METHODS = ("vanilla", "hf-generate", "eagle2", "jakiro-mixture", "jakiro-per_expert", "jakiro-lookup")
# eagle2 and jakiro-* are the drafts alone; jakiro-lookup is jakiro-mixture with --lookup's branch.
DATASETS = ("mtbench", "humaneval")
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
def add_parser(commands):
    p = commands.add_parser(
        "bench-e2e", help="tau and tokens/s of vanilla, EAGLE-2 and Jakiro on MT-bench and HumanEval",
        description=__doc__.split("\n\n")[1])
    add_target_arguments(p)
    p.add_argument("--eagle2-draft", default=None, help=DRAFT_HELP.format(what="EAGLE-2-configuration draft"))
    p.add_argument("--datasets", default="mtbench,humaneval", help=f"comma-separated subset of {DATASETS}")
    p.add_argument("--limit", type=int, default=None, help="first K prompts of each dataset (default: all)")
    p.add_argument("--categories", default=None, help="MT-bench categories, comma-separated (default: all)")
    p.add_argument("--temperatures", default="0,1", help="comma-separated sampling temperatures (0: greedy)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {METHODS}; the drafts run alone, jakiro-lookup is "
                        f"jakiro-mixture with --lookup's branch (default: all; jakiro-lookup only where --lookup "
                        f"is on)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report here (JSON)")
    p.add_argument("--markdown", default=None, help="also write the tables here (markdown)")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="also draw the report as PNGs in DIR: tokens/s with speedups, the accepted-length "
                        "histogram, speed and tau against the tree size (needs matplotlib: pip install "
                        "'jakiro[plots]')")
    add_compile_argument(p, "; the compiling calls are untimed warm-ups, one per prompt length bucket, and "
                            "their time is in the report as compile_s")
    p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)


def _split(text: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise UsageError(f"--{what} is empty")
    if allowed is not None:
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise UsageError(f"unknown --{what} {unknown}; expected a subset of {list(allowed)}")
    return values


@dataclass(frozen=True)
class BenchSettings:
    run: RunSettings
    datasets: list[str]
    methods: list[str]
    categories: list[str] | None
    temperatures: list[float]


def validate(args) -> BenchSettings:
    """``jakiro bench-e2e``'s options, checked before any model loads."""
    methods = _split(args.methods or ",".join(METHODS), METHODS, "methods")
    if "vanilla" not in methods:
        methods.insert(0, "vanilla")   # the reference of the speedups and of the greedy check
    try:
        temperatures = [float(t) for t in _split(args.temperatures, None, "temperatures")]
    except ValueError:
        raise UsageError(f"--temperatures must be numbers, got {args.temperatures!r}") from None
    if not all(0 <= t < float("inf") for t in temperatures):
        raise UsageError(f"--temperatures must be >= 0 (0: greedy), got {args.temperatures!r}")
    datasets = _split(args.datasets, DATASETS, "datasets")
    categories = _split(args.categories, None, "categories") if args.categories else None
    at_least(args, 1, "limit")
    check_plot_option(args.plot)
    run = resolve_run_settings(args, ("jakiro", "eagle2") if "eagle2" in methods else ("jakiro",))
    if "jakiro-lookup" in methods and not run.lookup:
        if args.methods:
            raise UsageError("--methods jakiro-lookup needs --lookup >= 1 (lookup is off by default on "
                             f"{run.device.type})")
        methods.remove("jakiro-lookup")
    return BenchSettings(run, datasets, methods, categories, temperatures)


def check_plot_option(folder: str | None) -> None:
    """``--plot DIR``: matplotlib must be installed (the one-line install hint otherwise), before any
    model loads."""
    if folder is None:
        return
    from jakiro.plots import require_matplotlib
    try:
        require_matplotlib()
    except ImportError as error:
        raise UsageError(str(error)) from None
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--plot {folder} is a file, not a folder")


def write_plots(report: dict, folder: str, prefix: str) -> None:
    """The report's pictures under ``folder``, and one line saying which (and which were skipped)."""
    from jakiro.plots import describe, e2e_plots
    written, notes = e2e_plots(report, folder, prefix=prefix)
    print(f"[jakiro] {describe(written, notes)}", file=sys.stderr, flush=True)


def tuned_total_tokens(settings: RunSettings, target, draft, mode) -> tuple[int, list[dict]]:
    """:func:`resolve_total_tokens`, with a line before and after when it times the device."""
    from jakiro.progress import stage
    if settings.total_tokens != "auto":
        return resolve_total_tokens(settings, target, draft)
    with stage("[jakiro] timing tree sizes for total_tokens=auto", done="[jakiro] timed tree sizes",
               mode=mode) as timing:
        total_tokens, tuning = resolve_total_tokens(settings, target, draft)
        timing.detail = f"total_tokens={total_tokens}"
    return total_tokens, tuning


def prompt_sets(tokenizer, datasets: list[str], limit: int | None, categories: list[str] | None) -> dict:
    """``{dataset: [input_ids [1, P], ...]}``: MT-bench first turns and HumanEval prompts, chat-templated."""
    from jakiro.commands.evaluate import encode_prompt
    from jakiro.commands.prompts import humaneval_prompts, mtbench_questions
    texts = {}
    if "mtbench" in datasets:
        texts["mtbench"] = [q["turns"][0] for q in mtbench_questions(categories)]
    if "humaneval" in datasets:
        texts["humaneval"] = [HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"]) for r in humaneval_prompts()]
    return {name: [encode_prompt(tokenizer, t) for t in items[:limit]] for name, items in texts.items()}


def build_methods(names: list[str], target, settings: RunSettings, total_tokens: int, compile: bool = False) -> dict:
    """``{name: fn(input_ids, **options)}`` for the requested methods, in :data:`METHODS` order."""
    from jakiro.commands.evaluate import hf_generate_method
    from jakiro.generate import SpeculativeGenerator, vanilla_generate
    device = target.get_output_embeddings().weight.device
    methods = {}
    for name in sorted(names, key=METHODS.index):
        if name == "vanilla":
            methods[name] = lambda ids, **o: vanilla_generate(target, ids.to(device), compile=compile, **o)
            continue
        if name == "hf-generate":
            methods[name] = hf_generate_method(target)
            continue
        lookup = 0
        if name == "eagle2":
            draft = load_draft(settings, "eagle2", target)
        elif name == "jakiro-lookup":
            draft = load_draft(settings, "jakiro", target, candidate_mode="mixture")
            lookup = settings.lookup_for(total_tokens)
        else:
            draft = load_draft(settings, "jakiro", target, candidate_mode=name.split("-", 1)[1])
        try:
            generator = SpeculativeGenerator(target, draft, depth=settings.depth, top_k=settings.tree_top_k,
                                             total_tokens=total_tokens, lookup=lookup, compile=compile)
        except ValueError as error:   # a tree this draft cannot grow (per_expert: top_k >= its experts)
            raise SystemExit(f"jakiro: {name}: {error}") from None
        methods[name] = (lambda g: lambda ids, **o: g.generate(ids.to(device), **o))(generator)
    return methods


def compile_warmup(runners: dict, prompts: dict, temperatures: list[float], max_new: int, eos_token_id) -> dict:
    """``--compile``: one untimed call per method, temperature kind (greedy, sampled) and cache size
    bucket of the prompts (what a compiled cycle's graph depends on), so the timed runs compile
    nothing. Returns the seconds per method."""
    import torch

    from jakiro.compiled import CAPACITY_BUCKET
    seconds = {}
    firsts = {}
    for items in prompts.values():
        for ids in items:
            firsts.setdefault((ids.shape[1] + max_new) // CAPACITY_BUCKET, ids)
    kinds = sorted({0.0 if t == 0 else 1.0 for t in temperatures})
    for name, fn in runners.items():
        if name == "hf-generate":
            continue
        start = time.perf_counter()
        for ids in firsts.values():
            for temperature in kinds:
                fn(ids, max_new_tokens=max_new, temperature=temperature, eos_token_id=eos_token_id,
                   generator=torch.Generator(device="cpu").manual_seed(0))
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[jakiro] --compile: {name} compiled in {seconds[name]} s", file=sys.stderr, flush=True)
    return seconds


def run(args, bench: BenchSettings) -> int:
    from jakiro.commands.evaluate import LosslessError, environment, markdown_table, run_side_by_side
    from jakiro.progress import Progress, mode_from_args
    started = time.perf_counter()
    mode = mode_from_args(args)
    settings = bench.run
    folder, tokenizer, config = load_tokenizer(settings)
    max_new = settings.max_new_tokens
    prompts = prompt_sets(tokenizer, bench.datasets, args.limit, bench.categories)
    check_context(settings, config, max((ids.shape[1] for items in prompts.values() for ids in items), default=0))
    target, tokenizer = load_target_model(settings, folder)
    device, dtype = settings.device, settings.dtype
    total_tokens, tuning = tuned_total_tokens(settings, target, load_draft(settings, "jakiro", target), mode)
    runners = build_methods(bench.methods, target, settings, total_tokens, compile=args.compile)
    report = dict(environment(device, dtype), draft_dtype=args.draft_dtype, draft_vocab=settings.draft_vocab,
                  total_tokens=total_tokens, lookup=settings.lookup_for(total_tokens),
                  total_tokens_auto=settings.total_tokens == "auto", tuning=tuning, depth=settings.depth,
                  tree_top_k=settings.tree_top_k, max_new_tokens=max_new, compile=args.compile, results=[])
    lookup_note = f", lookup={report['lookup']} (jakiro-lookup)" if "jakiro-lookup" in runners else ""
    if args.compile:
        report["compile_s"] = compile_warmup(runners, prompts, bench.temperatures, max_new, tokenizer.eos_token_id)
    print(f"[jakiro] {report['device']}, {report['dtype']}, total_tokens={total_tokens}"
          f"{' (auto)' if tuning else ''}, depth={settings.depth}, top_k={settings.tree_top_k}{lookup_note}",
          flush=True)
    runs = sum(len(ids) for ids in prompts.values()) * len(bench.temperatures) * len(runners)
    with Progress(total=runs, desc="jakiro bench-e2e", unit="run", mode=mode) as bar:
        for dataset, ids in prompts.items():
            for temperature in bench.temperatures:
                bar.set_postfix(dataset=dataset, temperature=temperature)
                try:
                    stats = run_side_by_side(runners, ids, max_new_tokens=max_new, temperature=temperature,
                                             seed=settings.seed, eos_token_id=tokenizer.eos_token_id,
                                             unchecked=("hf-generate",),
                                             strict=greedy_must_match(device, dtype, total_tokens), progress=bar,
                                             warmup=not args.compile)
                except LosslessError as error:
                    raise SystemExit(f"jakiro bench-e2e: NOT LOSSLESS on {dataset}: {error}") from None
                for row in (s.summary(stats[0]) for s in stats):
                    report["results"].append(dict(dataset=dataset, temperature=temperature, prompts=len(ids), **row))
    columns = ["dataset", "temperature", "method", "prompts", "tokens", "tokens_per_s", "speedup", "tau"]
    if any("diverged_prompts" in row for row in report["results"]):
        columns.append("diverged_prompts")
    table = markdown_table(report["results"], columns)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{report['device']}, {report['dtype']}, torch {report['torch']}, total_tokens={total_tokens}, "
                    f"depth={settings.depth}, top_k={settings.tree_top_k}, {max_new} new tokens{lookup_note}"
                    f"\n\n{table}\n")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        write_plots(report, args.plot, "bench_e2e")
    json.dump(report, sys.stdout)
    print(flush=True)
    print(summary(report, runs, time.perf_counter() - started), file=sys.stderr, flush=True)
    return 0


def summary(report: dict, runs: int, seconds: float) -> str:
    """The closing line: what ran, how long, and the best speculative speedup."""
    from jakiro.progress import summary_line
    rows = report["results"]
    groups = len({(r["dataset"], r["temperature"]) for r in rows})
    methods = len({r["method"] for r in rows})
    what = f"bench-e2e: {runs} generate calls ({methods} methods, {groups} prompt set/temperature pairs)"
    spec = [r for r in rows if r["method"] not in ("vanilla", "hf-generate") and "speedup" in r]
    if not spec:
        return summary_line(what, seconds)
    best = max(spec, key=lambda r: r["speedup"])
    kind = "greedy" if best["temperature"] == 0 else f"T={best['temperature']:g}"
    return summary_line(what, seconds, f"best: {best['method']} {best['speedup']:.2f}x vanilla at tau "
                                       f"{best['tau']:.2f} ({best['dataset']}, {kind})")

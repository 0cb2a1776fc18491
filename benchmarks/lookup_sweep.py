"""tau and tokens/s of Jakiro (mixture draft) with and without the lookup branch, side by side.

The commands' CPU settings (tree shape, bfloat16 draft, 8192-token drafting vocabulary), the shipped
draft of the default target, greedy decoding; each prompt is decoded by every configuration in
turn (interleaved, so machine drift hits all alike) and the outputs must be identical. A
configuration is ``lookup,max_ngram,min_ngram`` (lookup 0: off). Example::

    python benchmarks/lookup_sweep.py --dataset humaneval --limit 10 --total-tokens 8 \\
        --configs "0,3,1;5,3,1;5,3,2" --json benchmarks/results/cpu_lookup_sweep.jsonl
"""
from __future__ import annotations

import argparse
import json

import torch

from jakiro.cli import _parser
from jakiro.commands import bench_e2e
from jakiro.commands.options import load_draft, load_target_model, load_tokenizer
from jakiro.generate import SpeculativeGenerator
from jakiro.lookup import NgramLookup


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=bench_e2e.DATASETS, default="humaneval")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--total-tokens", type=int, default=12)
    p.add_argument("--configs", default="0,3,1;5,3,1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="append one line per configuration here")
    args = p.parse_args()
    cli_args = _parser().parse_args(["bench-e2e", "--device", "cpu", "--threads", str(args.threads),
                                     "--total-tokens", str(args.total_tokens), "--datasets", args.dataset,
                                     "--limit", str(args.limit), "--methods", "jakiro-mixture"])
    settings = bench_e2e.validate(cli_args).run
    folder, tokenizer, _ = load_tokenizer(settings)
    prompts = bench_e2e.prompt_sets(tokenizer, [args.dataset], args.limit, None)[args.dataset]
    target, tokenizer = load_target_model(settings, folder)
    draft = load_draft(settings, "jakiro", target, candidate_mode="mixture")
    generators = {}
    for config in args.configs.split(";"):
        lookup, max_ngram, min_ngram = map(int, config.split(","))
        gen = SpeculativeGenerator(target, draft, depth=settings.depth, top_k=settings.tree_top_k,
                                   total_tokens=args.total_tokens, lookup=lookup)
        if lookup:
            gen.lookup = NgramLookup(lookup, max_ngram, min_ngram)
        generators[config] = gen
        gen.generate(prompts[0], max_new_tokens=8)                       # warm-up
    totals = {config: dict(committed=0, cycles=0, seconds=0.0, tokens=0) for config in generators}
    for ids in prompts:
        outputs = []
        for config, gen in generators.items():
            result = gen.generate(ids, max_new_tokens=settings.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
            accepted = result.accept_lengths[:, 0]
            accepted = accepted[accepted >= 0]
            t = totals[config]
            t["committed"] += int((accepted + 1).sum())
            t["cycles"] += accepted.numel()
            t["seconds"] += result.timings["total"]
            t["tokens"] += int(result.new_tokens[0])
            outputs.append(result.sequences)
        assert all(torch.equal(outputs[0], o) for o in outputs), "greedy outputs differ between configurations"
    for config, t in totals.items():
        row = dict(dataset=args.dataset, prompts=len(prompts), total_tokens=args.total_tokens,
                   config=config, tau=round(t["committed"] / t["cycles"], 3),
                   tokens_per_s=round(t["tokens"] / t["seconds"], 2), tokens=t["tokens"])
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

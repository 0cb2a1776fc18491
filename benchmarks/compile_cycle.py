"""Eager vs compiled decoding cycles (``compile=True``) on a real target, in one process.

Loads a target (default: SmolLM2-135M-Instruct, ``jakiro.pretrained``) with the shipped Jakiro
draft, and decodes MT-bench first turns with vanilla decoding and with speculative decoding, each
eager and compiled (``torch.compile(fullgraph=True, dynamic=False)`` of the whole cycle,
:mod:`jakiro.compiled`). The first compiled call of each method is a warm-up whose time (the
compilation, mostly) is reported separately; the timed calls then run the prompts interleaved
(eager, compiled, eager, ...). Greedy, every compiled output must equal the eager one. Sampled (the
same seeded generator; a compiled cycle takes eager's uniforms), the report counts the identical
answers: they are identical while the draft grows the same trees, which Inductor's rounding of a
half-precision draft does not guarantee (docs/architecture.md, Compiled cycles).

Not a ``bench_*.py`` script (``run_all.py`` does not run it: it loads a real model and compiles
for minutes). Run: ``python benchmarks/compile_cycle.py --threads 1 --json OUT.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=4, help="MT-bench first turns timed")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--tree-top-k", type=int, default=4)
    p.add_argument("--total-tokens", type=int, default=16)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from jakiro.commands.evaluate import encode_prompt
    from jakiro.commands.prompts import mtbench_questions
    from jakiro.draft import JakiroDraft
    from jakiro.generate import SpeculativeGenerator, vanilla_generate
    from jakiro.pretrained import load_target, shipped_draft

    device = torch.device(args.device)
    target, tokenizer = load_target(args.target, device=device, progress=False)
    draft = JakiroDraft.from_pretrained(shipped_draft("jakiro"), target, dtype=torch.bfloat16,
                                        draft_vocab=args.draft_vocab)
    prompts = [encode_prompt(tokenizer, q["turns"][0]).to(device) for q in mtbench_questions(None)[:args.prompts]]
    tree = dict(depth=args.depth, top_k=args.tree_top_k, total_tokens=args.total_tokens)
    gens = {False: SpeculativeGenerator(target, draft, **tree),
            True: SpeculativeGenerator(target, draft, **tree, compile=True)}
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   eos_token_id=tokenizer.eos_token_id)

    def call(method, compiled, ids, seed=0):
        generator = torch.Generator().manual_seed(seed) if args.temperature else None
        if method == "vanilla":
            return vanilla_generate(target, ids, compile=compiled, generator=generator, **options)
        return gens[compiled].generate(ids, generator=generator, **options)

    report = dict(cpu=cpu_name(), device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                  target=args.target, tree=tree, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, results=[])
    identical = {"vanilla": 0, "jakiro": 0}
    for method in ("vanilla", "jakiro"):
        # Warm-up: eager once, then the first compiled call (compilation) timed on its own.
        call(method, False, prompts[0])
        start = time.perf_counter()
        call(method, True, prompts[0])
        warmup_s = time.perf_counter() - start
        print(f"[compile_cycle] {method}: first compiled call {warmup_s:.1f} s", file=sys.stderr, flush=True)
        totals = {False: [0, 0.0, 0, 0], True: [0, 0.0, 0, 0]}    # tokens, seconds, cycles, accepted
        for i, ids in enumerate(prompts):
            outs = {}
            for compiled in (False, True):
                out = call(method, compiled, ids, seed=i)
                outs[compiled] = out
                t = totals[compiled]
                t[0] += int(out.new_tokens.sum())
                t[1] += out.timings["total"]
                t[2] += out.cycles
            same = torch.equal(outs[False].sequences, outs[True].sequences)
            identical[method] += same
            if not same and not args.temperature:
                raise SystemExit(f"compile_cycle: {method}: compiled output differs from eager on prompt {i}")
        for compiled in (False, True):
            tokens, seconds, cycles, _ = totals[compiled]
            row = dict(method=method, compiled=compiled, tokens=tokens, seconds=round(seconds, 3),
                       tokens_per_s=round(tokens / seconds, 2), cycles=cycles,
                       tau=round(tokens / max(cycles, 1), 3), identical_answers=f"{identical[method]}/{len(prompts)}")
            if compiled:
                row["first_call_s"] = round(warmup_s, 1)
            report["results"].append(row)
            print(json.dumps(row), flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

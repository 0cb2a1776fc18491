"""jakiro's shipped drafts served by vLLM, against vLLM's plain decoding and jakiro itself.

Three steps, run by scripts/check_vllm.sh (each writes JSON into WORK):

  jakiro  (jakiro's .venv)  the prompts (MT-bench first turns, chat template), each shipped draft
                            exported with `jakiro export --format vllm-eagle`, and jakiro's own tau
                            on those prompts: the chain vLLM drafts (depth K, one child per node,
                            the mixture feature only) and jakiro's CPU tree;
  vllm    (the vLLM venv)   vLLM 0.32 on the CPU, greedy, one engine per method in its own process:
                            plain decoding, `ngram`, and `eagle` with each exported draft; its own
                            spec-decode counters give the mean acceptance length;
  report  (either)          every speculative output must equal vLLM's plain output token for token,
                            and vLLM's acceptance length with a draft must be jakiro's chain tau for
                            the same draft within TAU_TOLERANCE (a wrong export drafts badly): else
                            exit 1. Prints the table and writes WORK/report.json.

`python scripts/vllm_check.py STEP --work WORK [--prompts N] [--max-new-tokens N] [-k K]`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The drafts checked: (name in the report, shipped draft, `jakiro export` options, what jakiro
# runs to match it: zero fc's bias when vLLM's own class drops it).
DRAFTS = [
    ("eagle2", "eagle2", [], False),                                     # EAGLE-2 config: the plugin's class (fc bias)
    ("eagle2-vllm-class", "eagle2", ["--arch", "vllm", "--drop-fc-bias"], True),  # vLLM's own EagleLlamaForCausalLM
    ("jakiro", "jakiro", [], False),                                     # the Jakiro MoE: the plugin's class
]
# vLLM's acceptance length with an exported draft vs jakiro's tau for the same chain: the two
# compute the same draft in float32 on different kernels, so they agree closely; a misread
# tensor (a swapped concat order, a transposed expert, the wrong RoPE) drafts near tau = 1.
TAU_TOLERANCE = 0.05     # relative


def _prompts(tokenizer, count: int) -> list[dict]:
    """``count`` MT-bench first turns spread over the 8 categories (every 10th question)."""
    from jakiro.commands.evaluate import encode_prompt
    from jakiro.commands.prompts import mtbench_questions
    questions = mtbench_questions()
    picked = [questions[(i * 10 + i // 8) % len(questions)] for i in range(count)]
    return [{"id": q["question_id"], "category": q["category"],
             "token_ids": encode_prompt(tokenizer, q["turns"][0]).flatten().tolist()} for q in picked]


def step_jakiro(args) -> int:
    import torch

    from jakiro.draft import JakiroDraft
    from jakiro.export import export_vllm_eagle
    from jakiro.generate import SpeculativeGenerator, vanilla_generate
    from jakiro.pretrained import load_target, resolve_target, shipped_draft

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    target, tokenizer = load_target(progress=False)
    prompts = _prompts(tokenizer, args.prompts)
    eos = tokenizer.eos_token_id
    result = {"target": str(resolve_target(progress=False)), "eos_token_id": eos, "k": args.k,
              "max_new_tokens": args.max_new_tokens, "prompts": prompts, "drafts": {}, "jakiro": {}}

    def run(label, make, draft=None):
        start = time.perf_counter()
        committed = cycles = 0
        outputs = []
        for prompt in prompts:
            ids = torch.tensor([prompt["token_ids"]])
            out = make(ids)
            new = int(out.new_tokens[0])
            outputs.append(out.sequences[0, ids.shape[1]:ids.shape[1] + new].tolist())
            active = out.accept_lengths >= 0
            committed += int((out.accept_lengths[active] + 1).sum())
            cycles += int(active.sum())
        seconds = time.perf_counter() - start
        tau = committed / max(cycles, 1)
        result["jakiro"][label] = {"tau": tau, "outputs": outputs, "seconds": seconds}
        print(f"vllm_check: jakiro {label}: tau {tau:.3f} ({seconds:.0f} s)", flush=True)

    run("vanilla", lambda ids: vanilla_generate(target, ids, max_new_tokens=args.max_new_tokens, eos_token_id=eos))
    for name, shipped, options, zero_bias in DRAFTS:
        out = work / "drafts" / name
        arch = options[options.index("--arch") + 1] if "--arch" in options else "auto"
        exported = export_vllm_eagle(shipped_draft(shipped), out, arch=arch, drop_fc_bias="--drop-fc-bias" in options,
                                     force=True)
        result["drafts"][name] = {"folder": str(out), "architecture": exported.architecture, "notes": exported.notes}
        print(f"vllm_check: exported the shipped {shipped} draft to {out} as {exported.architecture}", flush=True)
        # float32 draft on the full vocabulary: what vLLM runs (its draft takes the target's dtype).
        draft = JakiroDraft.from_pretrained(shipped_draft(shipped), target)
        if zero_bias:
            with torch.no_grad():
                draft.fc.bias.zero_()
        chain = SpeculativeGenerator(target, draft, depth=args.k, top_k=1, total_tokens=args.k + 1)
        chain.drafter.contrastive = False      # vLLM drafts every level from the mixture feature
        run(f"{name}:chain", lambda ids: chain.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=eos))
        if not zero_bias:
            # jakiro's own CPU configuration: a tree of depth 3, top-k 4, 8 nodes; the contrastive
            # head drafts the last level (Jakiro), the 8192 most frequent tokens, a bfloat16 draft.
            tree_draft = JakiroDraft.from_pretrained(shipped_draft(shipped), target, dtype=torch.bfloat16,
                                                     draft_vocab=8192)
            tree = SpeculativeGenerator(target, tree_draft, depth=3, top_k=4, total_tokens=8)
            run(f"{name}:tree", lambda ids: tree.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=eos))
    (work / "jakiro.json").write_text(json.dumps(result))
    return 0


def _vllm_methods(plan: dict) -> dict[str, dict | None]:
    methods = {"vanilla": None,
               "ngram": {"method": "ngram", "num_speculative_tokens": plan["k"], "prompt_lookup_max": 4,
                         "prompt_lookup_min": 2}}
    for name, info in plan["drafts"].items():
        methods[f"eagle:{name}"] = {"method": "eagle", "model": info["folder"], "num_speculative_tokens": plan["k"]}
    return methods


def step_vllm_one(args) -> int:
    """One vLLM engine (its own process: vLLM does not reliably free an engine within a process)."""
    from vllm import LLM, SamplingParams

    plan = json.loads((Path(args.work) / "jakiro.json").read_text())
    speculative = _vllm_methods(plan)[args.method]
    start = time.perf_counter()
    llm = LLM(model=plan["target"], dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
              disable_log_stats=False, speculative_config=speculative)
    loaded = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=plan["max_new_tokens"])
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p["token_ids"]} for p in plan["prompts"]], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    counters = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode_num_"):
            counters[metric.name] = getattr(metric, "value", None) if hasattr(metric, "value") else list(metric.values)
    drafts = counters.get("vllm:spec_decode_num_drafts", 0)
    accepted = counters.get("vllm:spec_decode_num_accepted_tokens", 0)
    per_pos = counters.get("vllm:spec_decode_num_accepted_tokens_per_pos")
    record = {"method": args.method, "outputs": [list(o.outputs[0].token_ids) for o in outputs],
              "load_seconds": loaded, "seconds": seconds, "counters": counters,
              "tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
              "acceptance_length": (1.0 + accepted / drafts) if drafts else None,
              "acceptance_per_position": [a / drafts for a in per_pos] if per_pos and drafts else None}
    name = args.method.replace(":", "-")
    (Path(args.work) / f"vllm-{name}.json").write_text(json.dumps(record))
    print(f"vllm_check: vllm {args.method}: {record['tokens']} tokens in {seconds:.1f} s (engine up in "
          f"{loaded:.0f} s), acceptance length {record['acceptance_length']}", flush=True)
    return 0


def step_vllm(args) -> int:
    """Every method in its own process, its output in LOGS/vllm-METHOD.log. Exit 3 when vLLM's
    plain decoding fails (vLLM does not run here: nothing of jakiro's is involved), 1 when a
    speculative method fails."""
    plan = json.loads((Path(args.work) / "jakiro.json").read_text())
    logs = Path(args.logs or args.work)
    logs.mkdir(parents=True, exist_ok=True)
    for method in _vllm_methods(plan):
        log = logs / f"vllm-{method.replace(':', '-')}.log"
        command = [sys.executable, os.path.abspath(__file__), "vllm-one", "--work", args.work, "--method", method]
        with open(log, "w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
        summary = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("vllm_check:")]
        print("\n".join(summary) if summary else f"vllm_check: vllm {method}: exit {code}", flush=True)
        if code != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            print(f"{tail}\nvllm_check: vLLM failed with method {method} (log: {log})", file=sys.stderr)
            return 3 if method == "vanilla" else 1
    return 0


def step_report(args) -> int:
    work = Path(args.work)
    plan = json.loads((work / "jakiro.json").read_text())
    runs = {m: json.loads((work / f"vllm-{m.replace(':', '-')}.json").read_text()) for m in _vllm_methods(plan)}
    reference = runs["vanilla"]["outputs"]
    failures, rows = [], []
    for method, run in runs.items():
        same = sum(a == b for a, b in zip(run["outputs"], reference))
        if method != "vanilla" and same != len(reference):
            failures.append(f"vLLM {method}: {len(reference) - same} of {len(reference)} greedy outputs differ from "
                            f"vLLM's plain decoding")
        name = method.split(":", 1)[1] if method.startswith("eagle:") else None
        jakiro_chain = plan["jakiro"].get(f"{name}:chain", {}).get("tau") if name else None
        jakiro_tree = plan["jakiro"].get(f"{name}:tree", {}).get("tau") if name else None
        accept = run["acceptance_length"]
        if jakiro_chain is not None and (accept is None or abs(accept - jakiro_chain) > TAU_TOLERANCE * jakiro_chain):
            failures.append(f"vLLM {method}: acceptance length {accept} is not jakiro's tau {jakiro_chain:.3f} for the "
                            f"same chain (tolerance {TAU_TOLERANCE:.0%}): the export or the plugin misreads the draft")
        architecture = plan["drafts"][name]["architecture"] if name else ""
        rows.append({"method": method, "architecture": architecture, "greedy_equal": f"{same}/{len(reference)}",
                     "vllm_acceptance_length": accept, "jakiro_chain_tau": jakiro_chain, "jakiro_tree_tau": jakiro_tree,
                     "vllm_tokens_per_s": run["tokens"] / max(run["seconds"], 1e-9),
                     "acceptance_per_position": run["acceptance_per_position"]})
    jakiro_vs_vllm = sum(a == b for a, b in zip(plan["jakiro"]["vanilla"]["outputs"], reference))
    fmt = lambda v: "-" if v is None else f"{v:.2f}"   # noqa: E731
    print(f"\n{len(reference)} MT-bench prompts, greedy, {plan['max_new_tokens']} new tokens at most, "
          f"{plan['k']} speculative tokens per step (vLLM 0.32 CPU, float32)\n")
    print("| vLLM method | draft class | greedy = vLLM plain | vLLM mean acceptance length | jakiro tau, same chain "
          "| jakiro tau, CPU tree | vLLM tok/s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['architecture'] or '-'} | {row['greedy_equal']} | "
              f"{fmt(row['vllm_acceptance_length'])} | {fmt(row['jakiro_chain_tau'])} | {fmt(row['jakiro_tree_tau'])} | "
              f"{row['vllm_tokens_per_s']:.1f} |")
    print(f"\njakiro's plain decoding equals vLLM's on {jakiro_vs_vllm}/{len(reference)} prompts (information only: "
          f"two float32 stacks may part at a near-tie)")
    (work / "report.json").write_text(json.dumps({"rows": rows, "failures": failures,
                                                  "jakiro_vanilla_equal_vllm": jakiro_vs_vllm}, indent=2))
    for failure in failures:
        print(f"vllm_check: FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["jakiro", "vllm", "vllm-one", "report"])
    parser.add_argument("--work", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("-k", type=int, default=3, help="speculative tokens per step (vLLM) / chain depth (jakiro)")
    parser.add_argument("--method", help="vllm-one: the method to run")
    parser.add_argument("--logs", help="vllm: where each engine's log goes (default: WORK)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {"jakiro": step_jakiro, "vllm": step_vllm, "vllm-one": step_vllm_one, "report": step_report}[args.step](args)


if __name__ == "__main__":    # vLLM spawns workers that import this file: nothing may run on import
    sys.exit(main())

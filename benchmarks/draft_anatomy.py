"""Where a draft's tokens are accepted: depth by depth, the contrastive level, and which experts route.

Runs greedy speculative decoding of a real target with one or more drafts over MT-bench first turns
(or HumanEval prompts) and records, per cycle, the levels of the tree's nodes and of the accepted
path, and, per draft pass, the routing coefficients. Reports per draft:

* tau and ``P(accepted >= d)`` for every depth ``d`` (how often the path reaches level ``d``);
* the tree's nodes per level (how the node budget is spent) and, of the accepted paths that
  reach the last level (the contrastive head's level in a Jakiro draft), how often;
* expert utilisation: the share of drafted positions routed to each expert by the mixture head
  and its mean weight; for the contrastive head (on the passes that compute it), how often each
  expert is the positive one.

The numbers are counts of a deterministic run (no timing), so a loaded machine changes nothing but
the wall time. Example (the shipped drafts, 20 MT-bench turns)::

    python benchmarks/draft_anatomy.py --limit 20 --json benchmarks/results/draft_anatomy.json
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

import jakiro
import jakiro.generate as generate_module
from jakiro.commands.bench_e2e import HUMANEVAL_INSTRUCTION
from jakiro.commands.evaluate import encode_prompt
from jakiro.commands.prompts import humaneval_prompts, mtbench_questions
from jakiro.draft import JakiroDraft
from jakiro.pretrained import load_target, shipped_draft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name  # noqa: E402


class Recorder:
    """Counts one draft's trees, accepted paths and routing during ``SpeculativeGenerator.generate``."""

    def __init__(self, gen: jakiro.SpeculativeGenerator):
        self.gen, self.tree = gen, None
        self.cycles = 0
        self.reached = defaultdict(int)        # depth d -> cycles whose accepted path reached level d
        self.nodes = defaultdict(int)          # level -> tree nodes at that level (summed over cycles)
        self.expert_hits = None                # [E] positions routed to each expert (mixture head)
        self.expert_weight = None              # [E] summed mixture weights
        self.positive = None                   # [E] contrastive head: positions where the expert is positive
        self.positions = self.contrastive_positions = 0
        expand = gen.drafter.expand

        def recording_expand(*args, **kwargs):
            self.tree = expand(*args, **kwargs)
            return self.tree
        gen.drafter.expand = recording_expand
        draft = gen.draft
        routing = draft._routing

        def recording_routing(u, contrastive, experts):
            coeff = routing(u, contrastive, experts)          # [T, heads, E]
            mixture = coeff[:, 0].float()
            if self.expert_hits is None:
                self.expert_hits = torch.zeros(mixture.shape[1])
                self.expert_weight = torch.zeros(mixture.shape[1])
                self.positive = torch.zeros(mixture.shape[1])
            self.expert_hits += (mixture > 0).sum(0).cpu()
            self.expert_weight += mixture.sum(0).cpu()
            if contrastive:
                self.positive += (coeff[:, 1].float() > 0).sum(0).cpu()
                self.contrastive_positions += coeff.shape[0]
            self.positions += mixture.shape[0]
            return coeff
        draft._routing = recording_routing

    def accepted(self, accept_len: torch.Tensor):
        levels = self.tree.level
        for row in range(levels.shape[0]):
            self.cycles += 1
            for depth in range(1, int(accept_len[row]) + 1):
                self.reached[depth] += 1
            for level, count in zip(*torch.unique(levels[row, 1:], return_counts=True)):
                self.nodes[int(level)] += int(count)

    def summary(self, levels: int) -> dict:
        cycles = max(self.cycles, 1)
        tau = 1 + sum(self.reached.values()) / cycles
        row = {"tau": round(tau, 4), "cycles": self.cycles,
               "reach": {d: round(self.reached[d] / cycles, 4) for d in range(1, levels + 1)},
               "nodes_per_tree": {lvl: round(self.nodes[lvl] / cycles, 3) for lvl in range(1, levels + 1)}}
        if self.expert_hits is not None and self.expert_hits.numel() > 1:
            positions = max(self.positions, 1)
            row["expert_share"] = [round(float(h) / positions, 4) for h in self.expert_hits]
            row["expert_mean_weight"] = [round(float(w) / positions, 4) for w in self.expert_weight]
            if self.contrastive_positions:
                row["contrastive_positive_share"] = [round(float(p) / self.contrastive_positions, 4)
                                                     for p in self.positive]
        return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2")
    p.add_argument("--drafts", default="jakiro,eagle2",
                   help="comma-separated: 'jakiro' / 'eagle2' (the shipped drafts) or draft folders")
    p.add_argument("--dataset", choices=("mtbench", "humaneval"), default="mtbench")
    p.add_argument("--limit", type=int, default=20, help="first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--tree-top-k", type=int, default=4)
    p.add_argument("--total-tokens", type=int, default=8)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, tokenizer = load_target(args.target)
    if args.dataset == "mtbench":
        texts = [q["turns"][0] for q in mtbench_questions()][:args.limit]
    else:
        texts = [HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"]) for r in humaneval_prompts()][:args.limit]
    prompts = [encode_prompt(tokenizer, text) for text in texts]
    eos = tokenizer.eos_token_id
    # The acceptance of every tree (one-node trees pick the first token and are skipped).
    recorders: list[Recorder] = []
    call = generate_module._Acceptor.__call__

    def recording_call(self, tokens, parents, logits, *rest):
        out = call(self, tokens, parents, logits, *rest)
        if tokens.shape[1] > 1 and recorders:
            recorders[-1].accepted(out[0])
        return out
    generate_module._Acceptor.__call__ = recording_call
    report = {"target": args.target, "dataset": args.dataset, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "tree": dict(depth=args.depth, top_k=args.tree_top_k,
                                                                  total_tokens=args.total_tokens),
              "device": device_name(torch.device("cpu")), "torch": torch.__version__, "drafts": {}}
    for spec in args.drafts.split(","):
        folder = shipped_draft(spec) if spec in ("jakiro", "eagle2") else spec
        draft = JakiroDraft.from_pretrained(folder, target, dtype=torch.bfloat16, draft_vocab=args.draft_vocab)
        gen = jakiro.SpeculativeGenerator(target, draft, depth=args.depth, top_k=args.tree_top_k,
                                          total_tokens=args.total_tokens)
        recorders.append(Recorder(gen))
        for ids in prompts:
            gen.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=eos)
        report["drafts"][spec] = recorders[-1].summary(args.depth + 1)
        print(spec, json.dumps(report["drafts"][spec]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

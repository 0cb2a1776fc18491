"""Probe: do the target's lower-layer features help the draft predict the next token?

EAGLE-3 feeds its draft a fusion of low, middle and high target layers instead of the last
layer alone. Before building that into jakiro (datagen, draft, the decoding loop), this probe
asks whether the extra layers carry information a one-layer draft can use, on SmolLM2:

1. the target (bfloat16) reruns the conversations of a ``jakiro datagen`` folder and keeps,
   per token, its last-layer feature (after the final norm, what jakiro trains on) and the
   residual stream after the ``--layers`` (default: three), each RMS-normalised;
2. two copies of a trained draft (default: the shipped EAGLE-2 configuration) are fine-tuned
   side by side on the same batches, one pass each, for ``--steps`` steps: the *baseline*
   reads ``fuse(f_last)``, the *fused* copy reads ``fuse([h_low; h_mid; h_high; f_last])``, where
   ``fuse`` is a new linear layer that starts as the identity on ``f_last`` (so both start as
   the trained draft), trained with everything else;
3. both are scored on held-out conversations: top-1 agreement with the target's next token
   (both argmaxes over the draft's 8192-token vocabulary), reading the target's features.

Only the first tree level reads target features when decoding; deeper levels read the draft's
own predictions, which this probe does not train (EAGLE-3 pairs the fusion with its
training-time test). A gain here is the upper bound of what the fusion gives level 1.

    python scripts/probe_feature_layers.py --data DATAGEN_FOLDER   # the defaults are TRAINING.md's run
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.nn import functional as F

from jakiro.draft import JakiroDraft
from jakiro.pretrained import load_target, shipped_draft
from jakiro.train.data import FeatureDataset
from jakiro.train.loss import TargetDistribution, branch_terms


class FusedInput(nn.Module):
    """``fuse(features)`` ahead of a draft; starts as the identity on the last ``H`` inputs."""

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.fuse = nn.Linear(inputs * hidden, hidden, bias=False)
        with torch.no_grad():
            self.fuse.weight.zero_()
            self.fuse.weight[:, -hidden:] = torch.eye(hidden)

    def forward(self, features):
        return self.fuse(features)


@torch.no_grad()
def layer_features(target, ids: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """``[S, (len(layers) + 1) * H]``: RMS-normalised residuals after ``layers``, then the last feature."""
    out = target.model(ids.unsqueeze(0), output_hidden_states=True)
    states = out.hidden_states
    picked = [F.rms_norm(states[layer][0].float(), (states[layer].shape[-1],)) for layer in layers]
    return torch.cat(picked + [out.last_hidden_state[0].float()], dim=-1)


def batches(samples, batch_size, max_len, generator):
    order = torch.randperm(len(samples), generator=generator).tolist()
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chosen = [samples[i] for i in order[start:start + batch_size]]
        length = min(max_len, max(s["ids"].numel() for s in chosen))
        width = chosen[0]["features"].shape[-1]
        ids = torch.zeros(batch_size, length, dtype=torch.int64)
        feats = torch.zeros(batch_size, length, width)
        mask = torch.zeros(batch_size, length)
        for row, s in enumerate(chosen):
            n = min(length, s["ids"].numel())
            ids[row, :n], feats[row, :n], mask[row, :n] = s["ids"][:n], s["features"][:n], s["mask"][:n]
        yield ids, feats, mask


def step_outputs(draft, fuse, ids, feats, width_used):
    """Draft predictions at positions 0..S-2 for f_{t+1}, from (fused feature at t, token t+1)."""
    inputs = fuse(feats[:, :-1, -width_used:])
    positions = torch.arange(ids.shape[1] - 1).expand(ids.shape[0], -1)
    return draft(inputs, ids[:, 1:], positions).mixture


def losses(head, out, feats, mask, hidden_size):
    """The authors' loss on pass 0 (jakiro's training loss without the contrastive branch):
    SmoothL1 to f_{t+1} + 0.1 x soft cross-entropy; and the numbers of top-1 hits and of positions."""
    trained = mask[:, 1:]
    last = feats[..., -hidden_size:]
    distribution = TargetDistribution.of(last, F.pad(trained, (1, 0)), head)
    smooth, ce, top1, _ = branch_terms(out, last[:, 1:], trained, head, distribution.row[:, 1:], distribution)
    return smooth + 0.1 * ce, top1 * trained.sum().clamp(min=1), trained.sum()   # top1 is hits / clamped count


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a `jakiro datagen` folder (its tokens and loss masks are used)")
    parser.add_argument("--draft", default=None, help="draft to fine-tune (default: the shipped EAGLE-2 configuration)")
    parser.add_argument("--layers", default="3,16,28",
                        help="hidden_states indices fused with the last feature (default: EAGLE-3's low/mid/high for 30 layers)")
    parser.add_argument("--conversations", type=int, default=1000, help="conversations read from --data")
    parser.add_argument("--held-out", type=int, default=100, help="the last N of them, never trained on")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, after a warm-up of steps/10")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = [int(x) for x in args.layers.split(",")]

    target, _ = load_target(dtype=torch.bfloat16, progress=False)
    hidden = target.config.hidden_size
    dataset = FeatureDataset(args.data)
    count = min(args.conversations, len(dataset))
    start = time.perf_counter()
    samples = []
    for i in range(count):
        s = dataset[i]
        samples.append({"ids": s["input_ids"], "mask": s["loss_mask"].float(),
                        "features": layer_features(target, s["input_ids"], layers)})
    print(f"features of {count} conversations: {time.perf_counter() - start:.0f} s", flush=True)
    train, held_out = samples[:count - args.held_out], samples[count - args.held_out:]

    target_f32 = target.float().requires_grad_(False)
    draft_dir = args.draft or shipped_draft("eagle2")
    variants = {}
    for name, inputs in (("baseline", 1), ("fused", len(layers) + 1)):
        draft = JakiroDraft.from_pretrained(draft_dir, target_f32, dtype=torch.float32, draft_vocab=8192)
        fuse = FusedInput(inputs, hidden)
        params = [p for p in list(draft.parameters()) + list(fuse.parameters()) if p.requires_grad]
        variants[name] = dict(draft=draft, fuse=fuse, width=inputs * hidden,
                              optimizer=torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=1e-3))
    head = variants["baseline"]["draft"]._shared["draft_head"]   # both drafts' heads: the same rows

    def evaluate():
        result = {}
        with torch.no_grad():
            for name, v in variants.items():
                hits = total = 0.0
                for s in held_out:
                    ids, feats, mask = (s["ids"][:args.max_len].unsqueeze(0), s["features"][:args.max_len].unsqueeze(0),
                                        s["mask"][:args.max_len].unsqueeze(0))
                    out = step_outputs(v["draft"], v["fuse"], ids, feats, v["width"])
                    _, h, n = losses(head, out, feats, mask, hidden)
                    hits, total = hits + float(h), total + float(n)
                result[name] = round(hits / total, 4)
        return result

    history = [{"step": 0, "held_out_top1": evaluate()}]
    print(json.dumps(history[-1]), flush=True)
    generator = torch.Generator().manual_seed(0)
    step, train_hits = 0, {name: [0.0, 0.0] for name in variants}
    while step < args.steps:
        for ids, feats, mask in batches(train, args.batch_size, args.max_len, generator):
            for name, v in variants.items():
                out = step_outputs(v["draft"], v["fuse"], ids, feats, v["width"])
                loss, h, n = losses(head, out, feats, mask, hidden)
                for group in v["optimizer"].param_groups:   # linear warm-up over the first 10% of steps
                    group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.steps // 10))
                v["optimizer"].zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_value_([p for g in v["optimizer"].param_groups for p in g["params"]], 0.5)
                v["optimizer"].step()
                train_hits[name][0] += float(h)
                train_hits[name][1] += float(n)
            step += 1
            if step % 100 == 0 or step == args.steps:
                record = {"step": step, "held_out_top1": evaluate(),
                          "train_top1": {k: round(a / max(b, 1), 4) for k, (a, b) in train_hits.items()}}
                train_hits = {name: [0.0, 0.0] for name in variants}
                history.append(record)
                print(json.dumps(record), flush=True)
            if step >= args.steps:
                break
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "history": history}, f, indent=1)


if __name__ == "__main__":
    main()

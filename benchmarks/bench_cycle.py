"""One speculative cycle on random models: speculative (Jakiro, EAGLE-2 configuration) vs vanilla decoding on
the same cache and attention stack, and vs Hugging Face ``generate``, all in one process.

Targets are random models (a "tiny" and a "mid-size" Llama) whose attention/MLP residuals are
scaled down so that the next token depends mostly on the current one; drafts are either
random (acceptance near zero: the speculative overhead) or rigged to predict the target's
greedy token (high acceptance: what a trained draft buys). Rows report tokens/s, the mean
accepted length tau, the per-cycle time split (draft / target / verify / other, measured with
device synchronisation at phase boundaries) and the rate at which the target's weights are
streamed (target passes x weight bytes / time) against the measured copy bandwidth.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, finish, measure_copy_bandwidth, parser, time_fn  # noqa: E402
import jakiro  # noqa: E402
from jakiro.testing import make_prompts, make_tiny_target, rig_draft  # noqa: E402

# (shape, residual scale): the deeper model needs a smaller scale to stay predictable.
MODELS = {
    "tiny": (dict(vocab=256, hidden=64, layers=2, heads=2, kv_heads=1, head_dim=64, intermediate=128), 0.05),
    "mid": (dict(vocab=8192, hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, intermediate=1408), 0.02),
}
TREE = dict(depth=5, top_k=10, total_tokens=60)
QUICK_TREE = dict(depth=4, top_k=4, total_tokens=24)


def weight_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    quick = args.quick
    max_new = 16 if quick else args.max_new_tokens
    tree = QUICK_TREE if quick else TREE
    # Each call is a whole generation: a few calls give a stable median.
    warmup, iters = (1, 2) if quick else (1, min(args.iters, 3))
    batches = {"tiny": (1, 4), "mid": (1,)} if quick else {"tiny": (1, 4, 16), "mid": (1, 4)}

    report = Report("cycle", device)
    report.meta.update(copy_bandwidth_GBps=measure_copy_bandwidth(device), dtype=str(dtype), tree=tree,
                       max_new_tokens=max_new, threads=torch.get_num_threads())
    peak = report.meta["copy_bandwidth_GBps"]
    for model_name, (shape, residual_scale) in MODELS.items():
        target = make_tiny_target("llama", seed=0, residual_scale=residual_scale, max_positions=4096, **shape)
        target = target.to(device=device, dtype=dtype)
        torch.manual_seed(1)
        drafts = {
            "jakiro (random draft)": jakiro.JakiroDraft.from_target(target),
            "jakiro (rigged draft)": rig_draft(jakiro.JakiroDraft.from_target(target)),
            "eagle2 config (rigged draft)": rig_draft(jakiro.JakiroDraft.from_target(target, eagle2=True)),
        }
        target_bytes = weight_bytes(target)
        for batch in batches[model_name]:
            ids, mask, _ = make_prompts(batch, shape["vocab"], 24, 32, torch.Generator().manual_seed(batch))
            ids, mask = ids.to(device), mask.to(device)
            case = f"{model_name} B={batch}"
            runs = {"vanilla (jakiro stack)": lambda: jakiro.vanilla_generate(target, ids, mask, max_new_tokens=max_new,
                                                                              profile=True)}
            for name, draft in drafts.items():
                generator = jakiro.SpeculativeGenerator(target, draft, **tree)
                runs[name] = (lambda g: lambda: g.generate(ids, mask, max_new_tokens=max_new, profile=True))(generator)
            hf_kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                             pad_token_id=0)
            runs["HF generate (sdpa)"] = lambda: target.generate(ids, **hf_kwargs)

            vanilla_rate = None
            for impl, fn in runs.items():
                outputs = []
                timing = time_fn(lambda: outputs.append(fn()), device, warmup=warmup, iters=iters)
                result = outputs[-1]
                seconds = timing.median_us * 1e-6
                tokens = batch * max_new
                row = dict(tokens_per_s=tokens / seconds)
                if isinstance(result, jakiro.GenerationResult):
                    cycles = max(result.cycles, 1)
                    passes = result.cycles + 1
                    row.update(tau=result.mean_accepted_length if impl != "vanilla (jakiro stack)" else 1.0,
                               cycles=result.cycles,
                               **{f"{phase}_ms_per_cycle": 1e3 * result.timings[phase] / cycles
                                  for phase in ("draft", "target", "verify", "other")})
                else:
                    passes = max_new
                gbps = target_bytes * passes / seconds / 1e9
                row.update(target_weights_GBps=gbps, pct_of_copy=100 * gbps / peak)
                if impl == "vanilla (jakiro stack)":
                    vanilla_rate = row["tokens_per_s"]
                if vanilla_rate:
                    row["speedup_vs_vanilla"] = row["tokens_per_s"] / vanilla_rate
                report.add(case=case, impl=impl, timing=timing, **row)
                print(f"{case:14s} {impl:30s} {row['tokens_per_s']:9.1f} tok/s", flush=True)
    finish(report, args)


if __name__ == "__main__":
    main()

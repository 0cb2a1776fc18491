"""Benchmark of rotary_embedding against Hugging Face's apply_rotary_pos_emb.

The baseline (``hf``) is ``transformers``' ``apply_rotary_pos_emb`` on the same inputs: q and k as
the attention layers make them ([B, H, T, D] views of [B, T, H, D] projections), cos and sin
[B, T, D]. Both give the same numbers bit for bit. Shapes: SmolLM2 (9 query heads, 3 KV heads,
D=64) and an 8B-class model (32 and 8 heads, D=128), with 1 and 8 tokens (a decoding step, a small
tree), 64 and 512 (a prompt).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, call_counts, finish, parser, time_fn  # noqa: E402
from jakiro import ops  # noqa: E402

# (name, Hq, Hkv, D, T)
CASES = [(name, hq, hkv, d, t) for name, hq, hkv, d in (("smollm2", 9, 3, 64), ("8b", 32, 8, 128))
         for t in (1, 8, 64, 512)]
QUICK_CASES = [("smollm2", 9, 3, 64, 1), ("smollm2", 9, 3, 64, 64)]


def main(argv=None):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    args = parser(__doc__).parse_args(argv)
    device = torch.device(args.device)
    report = Report("rotary_embedding", device)
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    warmup, iters = call_counts(args, quick_iters=20)
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for name, hq, hkv, d, t in QUICK_CASES if args.quick else CASES:
            q = torch.randn(1, t, hq, d, generator=gen).to(dtype).to(device).transpose(1, 2)
            k = torch.randn(1, t, hkv, d, generator=gen).to(dtype).to(device).transpose(1, 2)
            angles = torch.rand(1, t, d // 2, generator=gen).repeat(1, 1, 2) * 100
            cos, sin = angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)
            impls = {"jakiro": lambda: ops.rotary_embedding(q, k, cos, sin),
                     "hf": lambda: apply_rotary_pos_emb(q, k, cos, sin)}
            case = f"{str(dtype).removeprefix('torch.')} {name} T={t}"
            base = {}
            for impl, fn in impls.items():
                timing = time_fn(fn, device, warmup=warmup, iters=iters)
                report.add(case=case, impl=impl, timing=timing)
                base[impl] = timing.median_us
            for row in report.rows:
                if row["case"] == case:
                    row["speedup_vs_hf"] = base["hf"] / row["median_us"]
    finish(report, args)


if __name__ == "__main__":
    main()

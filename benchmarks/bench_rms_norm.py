"""Benchmark of rms_norm against Hugging Face's RMSNorm module and torch's F.rms_norm.

Baselines, timed in this process on the same inputs:
- ``hf_module``: ``transformers``' ``LlamaRMSNorm`` (eight tensor ops: to float32, pow, mean,
  add, rsqrt, mul, to dtype, mul), what a Hugging Face model runs and jakiro replaces on the CPU;
- ``F.rms_norm``: ``torch.nn.functional.rms_norm`` with the same weight (one call, torch's
  own kernel; it normalises in the input dtype, so its numbers differ slightly).
Rows: 1 and 8 (a decoding step, a small tree), 64, 512 (a prompt); H = 576 (SmolLM2) and 4096.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, call_counts, finish, parser, time_fn  # noqa: E402
from jakiro import ops  # noqa: E402

CASES = [(rows, hidden) for hidden in (576, 4096) for rows in (1, 8, 64, 512)]
QUICK_CASES = [(1, 576), (64, 576)]
EPS = 1e-5


def main(argv=None):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    args = parser(__doc__).parse_args(argv)
    device = torch.device(args.device)
    report = Report("rms_norm", device)
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    warmup, iters = call_counts(args, quick_iters=20)
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for rows, hidden in QUICK_CASES if args.quick else CASES:
            x = torch.randn(1, rows, hidden, generator=gen).to(dtype).to(device)
            norm = LlamaRMSNorm(hidden, EPS).to(dtype).to(device)
            with torch.no_grad():
                norm.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
            impls = {
                "jakiro": lambda: ops.rms_norm(x, norm.weight, EPS),
                "hf_module": lambda: norm(x),
                "F.rms_norm": lambda: F.rms_norm(x, (hidden,), norm.weight, EPS),
            }
            case = f"{str(dtype).removeprefix('torch.')} rows={rows} H={hidden}"
            base = {}
            with torch.no_grad():
                for impl, fn in impls.items():
                    t = time_fn(fn, device, warmup=warmup, iters=iters)
                    report.add(case=case, impl=impl, timing=t,
                               GBps=2 * x.numel() * x.element_size() / (t.median_us * 1e-6) / 1e9)
                    base[impl] = t.median_us
            for row in report.rows:
                if row["case"] == case:
                    row["speedup_vs_hf_module"] = base["hf_module"] / row["median_us"]
    finish(report, args)


if __name__ == "__main__":
    main()

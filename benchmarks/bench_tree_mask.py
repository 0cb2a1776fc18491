"""Benchmark of build_tree_mask: the jakiro kernel against the plain-PyTorch reference."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, finish, measure_copy_bandwidth, parser, time_fn  # noqa: E402
from jakiro import ops, reference  # noqa: E402
from jakiro.testing import make_parents  # noqa: E402

CASES = [(1, 60), (8, 60), (64, 64), (256, 128), (16, 1024), (4, 4096)]
QUICK_CASES = [(1, 60), (64, 64), (4, 1024)]


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    device = torch.device(args.device)
    report = Report("tree_mask", device)
    report.meta["copy_bandwidth_GBps"] = peak = measure_copy_bandwidth(device)
    gen = torch.Generator().manual_seed(0)
    for batch, n in QUICK_CASES if args.quick else CASES:
        parents = make_parents("random", batch, n, gen).to(device)
        words = (n + 31) // 32
        nbytes = 4 * batch * n * (1 + words + 1)  # parents read, mask and depth written
        case = f"B={batch} N={n}"
        impls = {"jakiro": lambda: ops.build_tree_mask(parents, validate=False)}
        if device.type == "cuda":
            # eager calls are bound by the host's launch overhead; graph replays show the device time
            impls["jakiro (CUDA graph)"] = impls["jakiro"]
            impls["jakiro(validate)"] = lambda: ops.build_tree_mask(parents)
        if n <= 1024:  # the reference is O(N^2 log N) in memory and time
            impls["reference"] = lambda: reference.build_tree_mask(parents)
        base = None
        for impl, fn in impls.items():
            t = time_fn(fn, device, warmup=args.warmup, iters=args.iters,
                        cuda_graph=impl == "jakiro (CUDA graph)" or (args.cuda_graph and impl == "jakiro"))
            gbps = nbytes / (t.median_us * 1e-6) / 1e9
            row = report.add(case=case, impl=impl, timing=t, GBps=gbps, pct_of_copy=100 * gbps / peak)
            if impl == "reference":
                base = row["median_us"]
        if base is not None:
            for row in report.rows:
                if row["case"] == case:
                    row["speedup_vs_reference"] = base / row["median_us"]
    finish(report, args)


if __name__ == "__main__":
    main()

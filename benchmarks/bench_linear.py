"""Benchmark of linear (y = x W^T) on the CPU: the products of decoding and tree verification.

"forward" cases run every nn.Linear product of one SmolLM2-135M forward pass (30 layers
of q, k, v, o, gate, up, down, then the 49152-row LM head), each matrix its own tensor,
so the 0.65 GB of float32 weights stream from memory as in a real pass; M is the number
of tokens (1: a decoding step, 8-32: a draft tree). "head" cases are the draft's
8192-row LM head, which stays in cache between tree levels. Every case is timed in one
process against (a) torch.nn.functional.linear (MKL / oneDNN), (b) MKL's prepacked
sgemm (torch.ops.mkl._mkl_linear, as torch.compile's CPU freezing uses; float32 only,
the packing done before timing). "jakiro_kernel" forces the kernel above the rows
where "jakiro" (auto) hands over to at::linear (128; bfloat16: 8, or 64 where the CPU has
AVX512_BF16 and the kernel its bfloat16 dot products); "jakiro_kernel_widen" is, on such a
CPU, the bfloat16 case on the avx512 copy, which widens to float32. On CUDA the op is
at::linear: nothing to compare, no rows.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, finish, measure_copy_bandwidth, parser, time_fn, with_env  # noqa: E402
from jakiro import ops  # noqa: E402

HIDDEN, INTERMEDIATE, KV, LAYERS, VOCAB, DRAFT_VOCAB = 576, 1536, 192, 30, 49152, 8192
FORWARD_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
QUICK_FORWARD_ROWS = (1, 16)
BF16_FORWARD_ROWS = (1, 4, 8, 16, 32, 64, 128)
HEAD_ROWS = (1, 4, 16)


def forward_weights(dtype, gen):
    """Every weight matrix [N, K] of one SmolLM2-135M forward pass, in order."""
    layer = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
             (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
    shapes = layer * LAYERS + [(VOCAB, HIDDEN)]
    return [(torch.randn(n, k, generator=gen) * 0.02).to(dtype) for n, k in shapes]


def kernel_path(dtype):
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512" and dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported():
        return "amx"
    if capability == "AVX512" and dtype == torch.bfloat16 and torch.cpu._is_avx512_bf16_supported():
        return "avx512bf16"
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability)


def impls_for(weights, rows, dtype, gen):
    """{name: fn} running every product of ``weights`` on ``rows`` tokens."""
    inputs = {k: torch.randn(rows, k, generator=gen).to(dtype) for k in {w.shape[1] for w in weights}}

    def run(product):
        def call():
            for w in weights:
                product(inputs[w.shape[1]], w)
        return call
    impls = {"jakiro": run(ops.linear)}
    path = kernel_path(dtype)
    if path is not None:
        impls["jakiro_kernel"] = with_env("JAKIRO_LINEAR_KERNEL", path, run(ops.linear))
    if path == "amx":
        impls["jakiro_kernel_bf16_dot"] = with_env("JAKIRO_LINEAR_KERNEL", "avx512bf16", run(ops.linear))
    if path in ("amx", "avx512bf16"):
        impls["jakiro_kernel_widen"] = with_env("JAKIRO_LINEAR_KERNEL", "avx512", run(ops.linear))
    impls["F.linear"] = run(F.linear)
    if dtype == torch.float32 and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        packed = {id(w): torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights}
        impls["mkl_packed"] = run(lambda x, w: torch.ops.mkl._mkl_linear(x, packed[id(w)], w, None, rows))
    return impls


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    device = torch.device(args.device)
    report = Report("linear", device)
    if device.type != "cpu":
        print("bench_linear: on CUDA jakiro.ops.linear is at::linear; nothing to compare", file=sys.stderr)
        finish(report, args)
        return
    report.meta["copy_bandwidth_GBps"] = peak = measure_copy_bandwidth(device)
    report.meta["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    gen = torch.Generator().manual_seed(0)
    warmup, iters = (1, 3) if args.quick else (2, 7)
    cases = [("forward", torch.float32, m) for m in (QUICK_FORWARD_ROWS if args.quick else FORWARD_ROWS)]
    cases += [("forward", torch.bfloat16, m) for m in (QUICK_FORWARD_ROWS if args.quick else BF16_FORWARD_ROWS)]
    cases += [("head", dtype, m) for dtype in (torch.float32, torch.bfloat16) for m in HEAD_ROWS]
    weights = {}
    for kind, dtype, rows in cases:
        key = (kind, dtype)
        if key not in weights:
            weights.clear()   # one weight set at a time: the float32 forward alone is 0.65 GB
            weights[key] = (forward_weights(dtype, gen) if kind == "forward"
                            else [(torch.randn(DRAFT_VOCAB, HIDDEN, generator=gen) * 0.02).to(dtype)])
        ws = weights[key]
        weight_bytes = sum(w.numel() for w in ws) * ws[0].element_size()
        flops = 2 * rows * sum(w.numel() for w in ws)
        case = f"{kind} {str(dtype).removeprefix('torch.')} M={rows}"
        case_rows = []
        for impl, fn in impls_for(ws, rows, dtype, gen).items():
            t = time_fn(fn, device, warmup=warmup, iters=iters if kind == "forward" else 10 * iters)
            gbps = weight_bytes / (t.median_us * 1e-6) / 1e9
            case_rows.append(report.add(case=case, impl=impl, timing=t, weight_GBps=gbps,
                                        pct_of_copy=100 * gbps / peak,
                                        GFLOPs=flops / (t.median_us * 1e-6) / 1e9))
        base = next(r["median_us"] for r in case_rows if r["impl"] == "F.linear")
        for r in case_rows:
            r["speedup_vs_F.linear"] = base / r["median_us"]
    finish(report, args)


if __name__ == "__main__":
    main()

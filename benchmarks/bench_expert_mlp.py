"""Benchmark of expert_mlp (the Jakiro MoE MLP, both routing heads) and grouped_gemm.

Every case is timed in one process against (a) the authors'-style PyTorch block
(each expert separate gate/up/down nn.Linear layers, every token through every
expert, heads combined elementwise), (b) a per-expert loop of torch.mm on fused
gate/up weights, (c) torch._grouped_mm where this torch and device have it.
Routing is Jakiro's: E=2 experts, R=2 heads (a softmax head and a signed
contrastive head), so every expert runs on every token. Reports GB/s of the
weight + activation traffic and TFLOP/s, and % of the measured copy bandwidth.
grouped_gemm is timed against a per-expert torch.mm loop and torch._grouped_mm.
On CUDA "jakiro" is the default implementation (JAKIRO_EXPERT_MLP_KERNEL=v1) and
"jakiro_auto" the opt-in tensor-core / cuBLAS paths, side by side.
The experts are SwiGLU (silu) except the cases marked "geglu": GeGLU with the
tanh-approximated GELU (Gemma targets), the baselines computing the same activation.
"""
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, finish, measure_copy_bandwidth, parser, time_fn, with_env  # noqa: E402
from jakiro import ops  # noqa: E402
from jakiro.testing import make_expert_mlp_inputs, make_expert_offsets  # noqa: E402

EXPERTS, HEADS = 2, 2
# (name, H, I, T, training[, activation]); the activation is silu unless given
CASES = [("draft", 4096, 4096, t, False) for t in (1, 10, 60, 600)] + \
        [("smollm2", 576, 576, t, False) for t in (1, 10, 60, 600)] + \
        [("train", 4096, 4096, 4096, True), ("train-smollm2", 576, 576, 4096, True)] + \
        [("draft geglu", 4096, 4096, t, False, "gelu_tanh") for t in (10, 600)]
QUICK_CASES = [("smollm2", 576, 576, 1, False), ("smollm2", 576, 576, 60, False),
               ("train-smollm2", 576, 576, 256, True), ("smollm2 geglu", 576, 576, 60, False, "gelu_tanh")]
ACTIVATION_FNS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}
# grouped_gemm alone: (T, K, N, E), rows spread over the experts at random
GEMM_CASES = [(60, 4096, 8192, 2), (600, 4096, 8192, 2), (4096, 4096, 8192, 8), (4096, 576, 1152, 8)]
GEMM_QUICK_CASES = [(60, 576, 1152, 2), (512, 576, 1152, 4)]


def authors_block(x, w_gate_up, w_down, coeff, activation="silu"):
    """Each expert an nn.Linear stack run on every token; heads combined elementwise."""
    inter = w_down.shape[2]
    act = ACTIVATION_FNS[activation]
    ys = []
    for e in range(w_down.shape[0]):
        gate = F.linear(x, w_gate_up[e, :inter])
        up = F.linear(x, w_gate_up[e, inter:])
        ys.append(F.linear(act(gate) * up, w_down[e]))
    c = coeff.to(x.dtype)
    heads = []
    for r in range(c.shape[1]):
        # the authors pick the sign per token with torch.where on the router logits
        head = c[:, r, 0:1] * ys[0]
        for e in range(1, len(ys)):
            head = torch.where(c[:, r, e:e + 1] != 0, head + c[:, r, e:e + 1] * ys[e], head)
        heads.append(head)
    return torch.stack(heads)


def mm_loop(x, w_gate_up, w_down, coeff, activation="silu"):
    """A per-expert loop of torch.mm on the fused gate/up weights."""
    inter = w_down.shape[2]
    act = ACTIVATION_FNS[activation]
    ys = []
    for e in range(w_down.shape[0]):
        gate_up = torch.mm(x, w_gate_up[e].t())
        ys.append(torch.mm(act(gate_up[:, :inter]) * gate_up[:, inter:], w_down[e].t()))
    return torch.einsum("tre,eth->rth", coeff.to(x.dtype), torch.stack(ys))


def grouped_mm(x, w_gate_up, w_down, coeff, activation="silu"):
    """torch._grouped_mm over the tokens repeated once per expert (dense routing)."""
    experts, inter, tokens = w_down.shape[0], w_down.shape[2], x.shape[0]
    offs = torch.arange(1, experts + 1, device=x.device, dtype=torch.int32) * tokens
    rows = x.repeat(experts, 1)
    gate_up = torch._grouped_mm(rows, w_gate_up.transpose(1, 2), offs=offs)
    h = ACTIVATION_FNS[activation](gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs).view(experts, tokens, -1)
    return torch.einsum("tre,eth->rth", coeff.to(x.dtype), y)


def jakiro_op(x, w_gate_up, w_down, coeff, activation="silu"):
    return ops.expert_mlp(x, w_gate_up, w_down, coeff, activation)


def with_kernel(kernel, fn):
    """fn run with JAKIRO_EXPERT_MLP_KERNEL=kernel (read by the CUDA op on every call)."""
    return with_env("JAKIRO_EXPERT_MLP_KERNEL", kernel, fn)


def jakiro_impls(fn, device):
    """The op's implementations to time: the default (v1), plus the opt-in kernels on CUDA."""
    impls = {"jakiro": with_kernel("v1", fn)}
    if device.type == "cuda":
        impls["jakiro_auto"] = with_kernel("auto", fn)
    return impls


def gemm_loop(x, w, offsets):
    """A per-expert loop of torch.mm; the offsets are read on the host (one synchronisation)."""
    out = x.new_empty(x.shape[0], w.shape[1])
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        torch.mm(x[bounds[e]:bounds[e + 1]], w[e].t(), out=out[bounds[e]:bounds[e + 1]])
    return out


def bench_grouped_gemm(args, device, dtype, peak, warmup, iters, gen):
    report = Report("grouped_gemm", device)
    report.meta["dtype"] = str(dtype)
    report.meta["copy_bandwidth_GBps"] = peak
    for tokens, k, n, experts in GEMM_QUICK_CASES if args.quick else GEMM_CASES:
        x = torch.randn(tokens, k, generator=gen).to(device, dtype)
        w = (torch.randn(experts, n, k, generator=gen) / k**0.5).to(device, dtype)
        offsets = make_expert_offsets(tokens, experts, generator=gen).to(device)
        impls = jakiro_impls(lambda: ops.grouped_gemm(x, w, offsets, validate=False), device)
        impls["mm_loop"] = lambda: gemm_loop(x, w, offsets)
        if hasattr(torch, "_grouped_mm"):
            ends = offsets[1:].contiguous()
            impls["torch._grouped_mm"] = lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=ends)
        nbytes = (x.numel() + w.numel() + tokens * n) * x.element_size()
        case = f"T={tokens} K={k} N={n} E={experts}"
        rows = []
        for impl, fn in impls.items():
            try:
                t = time_fn(fn, device, warmup=warmup, iters=iters, cuda_graph=args.cuda_graph and impl.startswith("jakiro"))
            except (RuntimeError, NotImplementedError) as exc:
                print(f"skipping {impl} on {case}: {str(exc).splitlines()[0]}", file=sys.stderr)
                continue
            gbps = nbytes / (t.median_us * 1e-6) / 1e9
            rows.append(report.add(case=case, impl=impl, timing=t, GBps=gbps, pct_of_copy=100 * gbps / peak,
                                   TFLOPs=2 * tokens * k * n / (t.median_us * 1e-6) / 1e12))
        base = next(r["median_us"] for r in rows if r["impl"] == "mm_loop")
        for r in rows:
            r["speedup_vs_mm_loop"] = base / r["median_us"]
    finish(report, args)


def training_step(fn, inputs, grad):
    def step():
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, grad)
    return step


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warmup, iters = (min(args.warmup, 2), min(args.iters, 5)) if args.quick else (args.warmup, args.iters)
    report = Report("expert_mlp", device)
    report.meta["dtype"] = str(dtype)
    report.meta["copy_bandwidth_GBps"] = peak = measure_copy_bandwidth(device)
    gen = torch.Generator().manual_seed(0)
    impls = {**jakiro_impls(jakiro_op, device), "authors_block": authors_block, "mm_loop": mm_loop}
    if hasattr(torch, "_grouped_mm"):
        impls["torch._grouped_mm"] = grouped_mm
    for name, hidden, inter, tokens, training, *activation in QUICK_CASES if args.quick else CASES:
        activation = activation[0] if activation else "silu"
        x, wgu, wd, coeff = make_expert_mlp_inputs(tokens, hidden, inter, EXPERTS, HEADS, "signed", dtype, device, gen)
        inputs = (x, wgu, wd, coeff)
        elsize = x.element_size()
        weight_bytes = (wgu.numel() + wd.numel()) * elsize
        act_bytes = (x.numel() + HEADS * tokens * hidden) * elsize + coeff.numel() * 4
        flops = 2 * tokens * EXPERTS * 3 * hidden * inter
        if training:
            inputs = tuple(t.clone().requires_grad_() for t in inputs)
            grad = torch.randn(HEADS, tokens, hidden, generator=gen).to(device, dtype)
            flops *= 3  # backward: twice the forward's products
        case = f"{name} H={hidden} I={inter} T={tokens}" + (" fwd+bwd" if training else "")
        rows = []
        for impl, fn in impls.items():
            if activation != "silu":
                fn = functools.partial(fn, activation=activation)
            call = training_step(fn, inputs, grad) if training else (lambda fn=fn: fn(*inputs))
            try:
                t = time_fn(call, device, warmup=warmup, iters=iters,
                            cuda_graph=args.cuda_graph and impl.startswith("jakiro") and not training)
            except (RuntimeError, NotImplementedError) as exc:  # e.g. _grouped_mm on an unsupported device
                print(f"skipping {impl} on {case}: {str(exc).splitlines()[0]}", file=sys.stderr)
                continue
            gbps = (weight_bytes + act_bytes) / (t.median_us * 1e-6) / 1e9
            rows.append(report.add(case=case, impl=impl, timing=t, GBps=gbps, pct_of_copy=100 * gbps / peak,
                                   TFLOPs=flops / (t.median_us * 1e-6) / 1e12))
        base = next((r["median_us"] for r in rows if r["impl"] == "authors_block"), None)
        for r in rows:
            if base is not None:
                r["speedup_vs_authors"] = base / r["median_us"]
    finish(report, args)
    bench_grouped_gemm(args, device, dtype, peak, warmup, iters, gen)


if __name__ == "__main__":
    main()

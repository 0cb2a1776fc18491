"""Benchmark of expert_mlp (and grouped_gemm): the Jakiro MoE MLP, both routing heads.

Every case is timed in one process against (a) the authors'-style PyTorch block
(each expert separate gate/up/down nn.Linear layers, every token through every
expert, heads combined elementwise), (b) a per-expert loop of torch.mm on fused
gate/up weights, (c) torch._grouped_mm where this torch and device have it.
Routing is Jakiro's: E=2 experts, R=2 heads (a softmax head and a signed
contrastive head), so every expert runs on every token. Reports GB/s of the
weight + activation traffic and TFLOP/s, and % of the measured copy bandwidth.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, finish, measure_copy_bandwidth, parser, time_fn  # noqa: E402
from jakiro import ops  # noqa: E402
from jakiro.testing import make_expert_mlp_inputs  # noqa: E402

EXPERTS, HEADS = 2, 2
# (name, H, I, T, training)
CASES = [("draft", 4096, 4096, t, False) for t in (1, 10, 60, 600)] + \
        [("smollm2", 576, 576, t, False) for t in (1, 10, 60, 600)] + \
        [("train", 4096, 4096, 4096, True), ("train-smollm2", 576, 576, 4096, True)]
QUICK_CASES = [("smollm2", 576, 576, 1, False), ("smollm2", 576, 576, 60, False),
               ("train-smollm2", 576, 576, 256, True)]


def authors_block(x, w_gate_up, w_down, coeff):
    """Each expert an nn.Linear stack run on every token; heads combined elementwise."""
    inter = w_down.shape[2]
    ys = []
    for e in range(w_down.shape[0]):
        gate = F.linear(x, w_gate_up[e, :inter])
        up = F.linear(x, w_gate_up[e, inter:])
        ys.append(F.linear(F.silu(gate) * up, w_down[e]))
    c = coeff.to(x.dtype)
    heads = []
    for r in range(c.shape[1]):
        # the authors pick the sign per token with torch.where on the router logits
        head = c[:, r, 0:1] * ys[0]
        for e in range(1, len(ys)):
            head = torch.where(c[:, r, e:e + 1] != 0, head + c[:, r, e:e + 1] * ys[e], head)
        heads.append(head)
    return torch.stack(heads)


def mm_loop(x, w_gate_up, w_down, coeff):
    """A per-expert loop of torch.mm on the fused gate/up weights."""
    inter = w_down.shape[2]
    ys = []
    for e in range(w_down.shape[0]):
        gate_up = torch.mm(x, w_gate_up[e].t())
        ys.append(torch.mm(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w_down[e].t()))
    return torch.einsum("tre,eth->rth", coeff.to(x.dtype), torch.stack(ys))


def grouped_mm(x, w_gate_up, w_down, coeff):
    """torch._grouped_mm over the tokens repeated once per expert (dense routing)."""
    experts, inter, tokens = w_down.shape[0], w_down.shape[2], x.shape[0]
    offs = torch.arange(1, experts + 1, device=x.device, dtype=torch.int32) * tokens
    rows = x.repeat(experts, 1)
    gate_up = torch._grouped_mm(rows, w_gate_up.transpose(1, 2), offs=offs)
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs).view(experts, tokens, -1)
    return torch.einsum("tre,eth->rth", coeff.to(x.dtype), y)


def jakiro_op(x, w_gate_up, w_down, coeff):
    return ops.expert_mlp(x, w_gate_up, w_down, coeff)


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
    impls = {"jakiro": jakiro_op, "authors_block": authors_block, "mm_loop": mm_loop}
    if hasattr(torch, "_grouped_mm") and device.type == "cuda":
        impls["torch._grouped_mm"] = grouped_mm
    for name, hidden, inter, tokens, training in QUICK_CASES if args.quick else CASES:
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
            call = training_step(fn, inputs, grad) if training else (lambda fn=fn: fn(*inputs))
            try:
                t = time_fn(call, device, warmup=warmup, iters=iters,
                            cuda_graph=args.cuda_graph and impl == "jakiro" and not training)
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


if __name__ == "__main__":
    main()

"""Benchmark of the verify step (tree acceptance): verify_greedy, verify_sampling and
compact_kv against the plain-PyTorch reference, a vectorised-PyTorch greedy (match -> cumprod
over leaf paths -> argmax), the authors'-style Python sampling loop (per-candidate .item(), host
random numbers) and per-layer / vectorised PyTorch KV copies. All in one process. On CUDA each
verify kernel is also timed forced (jakiro-walk, jakiro-parallel) next to the automatic choice
(jakiro)."""
import os
import random
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, finish, measure_copy_bandwidth, parser, time_fn  # noqa: E402
from jakiro import ops, reference  # noqa: E402
from jakiro.testing import make_parents  # noqa: E402

CASES = [(b, n, v) for v in (32000, 128256) for n in (16, 60, 128) for b in (1, 8, 64, 256)]
QUICK_CASES = [(1, 16, 32000), (8, 60, 32000)]
TEMPERATURE, TOP_P, TOP_K = 0.7, 0.9, 0  # the sampling settings benchmarked


def make_inputs(batch, n, vocab, device, dtype, gen):
    """A tree per row whose children often carry the parent's argmax (realistic acceptance)."""
    parents = make_parents("random", batch, n, gen).to(device)
    logits = (torch.randn(batch, n, vocab, device=device, dtype=dtype) * 4)
    favourite = logits.argmax(-1).gather(1, parents.long().clamp(min=0))
    random_ids = torch.randint(0, vocab, (batch, n), device=device)
    keep = torch.rand(batch, n, device=device) < 0.8
    tokens = torch.where(keep, favourite, random_ids)
    return tokens, parents, logits


# ------------------------------------------------------------------ baselines

def leaf_paths(parents_row):
    """EAGLE-style retrieve indices: one root-to-leaf path per leaf, -1 padded."""
    n = len(parents_row)
    is_leaf = [True] * n
    for i in range(1, n):
        is_leaf[parents_row[i]] = False
    paths = []
    for leaf in (i for i in range(n) if is_leaf[i]):
        path = [leaf]
        while path[-1] != 0:
            path.append(parents_row[path[-1]])
        paths.append(path[::-1])
    depth = max(len(p) for p in paths)
    return [p + [-1] * (depth - len(p)) for p in paths]


def make_vectorised_greedy(tokens, parents):
    """Vectorised-PyTorch greedy (the authors'/EAGLE evaluate_posterior): the leaf paths are
    known ahead, so the timed call is argmax -> match -> cumprod -> argmax."""
    rows = [leaf_paths(p) for p in parents.cpu().tolist()]
    leaves = max(len(r) for r in rows)
    depth = max(len(r[0]) for r in rows)
    retrieve = torch.full((len(rows), leaves, depth), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        retrieve[b, : len(r), : len(r[0])] = torch.tensor(r)
    retrieve = retrieve.to(tokens.device)
    valid = retrieve >= 0
    safe = retrieve.clamp(min=0)
    batch_idx = torch.arange(len(rows), device=tokens.device)

    def call(logits):
        predict = logits.argmax(-1)  # [B, N]
        cand = torch.gather(tokens, 1, safe.flatten(1)).view_as(safe)
        pred = torch.gather(predict, 1, safe.flatten(1)).view_as(safe)
        ok = (cand[:, :, 1:] == pred[:, :, :-1]) & valid[:, :, 1:]
        acc = torch.cumprod(ok.int(), -1).sum(-1)  # [B, leaves]
        best = acc.argmax(-1)
        accept_len = acc.max(-1).values
        last = safe[batch_idx, best, accept_len]
        return accept_len, predict[batch_idx, last]

    return call


def processed_probs(row, temperature, top_p, top_k):
    scores = row.float() / temperature
    if top_k > 0:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        s, order = torch.sort(scores)
        remove = s.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return scores.softmax(-1)


def make_authors_sampling_loop(tokens, parents):
    """The authors'-style stochastic acceptance: host walk, one .item() per candidate,
    Python's random numbers."""
    tok = tokens.cpu().tolist()
    children = [[[c for c in range(len(p)) if p[c] == u] for u in range(len(p))] for p in parents.cpu().tolist()]

    def call(logits):
        out = []
        for b in range(len(tok)):
            node, accepted_count = 0, 0
            while True:
                p = processed_probs(logits[b, node], TEMPERATURE, TOP_P, TOP_K)
                accepted, tried = None, set()
                for c in children[b][node]:
                    x = tok[b][c]
                    if x in tried:
                        continue
                    if random.random() <= p[x].item():
                        accepted = c
                        break
                    p[x] = 0
                    p = p / p.sum()
                    tried.add(x)
                if accepted is None:
                    out.append((accepted_count, torch.multinomial(p, 1).item()))
                    break
                node, accepted_count = accepted, accepted_count + 1
        return out

    return call


# ------------------------------------------------------------------ cases

CUDA_PATHS = ("walk", "parallel")  # the CUDA kernels, forced by JAKIRO_VERIFY_KERNEL (verify_kernel_choice.h)


@contextmanager
def verify_kernel(path):
    """Forces one CUDA kernel of the verify ops while timing (None: the automatic choice)."""
    old = os.environ.get("JAKIRO_VERIFY_KERNEL")
    if path is not None:
        os.environ["JAKIRO_VERIFY_KERNEL"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JAKIRO_VERIFY_KERNEL", None)
        else:
            os.environ["JAKIRO_VERIFY_KERNEL"] = old


def bench_verify(report, args, device, dtype, gen, cases):
    python_loops_max_batch = 8 if args.quick else 64
    for batch, n, vocab in cases:
        tokens, parents, logits = make_inputs(batch, n, vocab, device, dtype, gen)
        accept_len, _, _ = ops.verify_greedy(tokens, parents, logits)
        visited_rows = int(accept_len.sum()) + batch
        nbytes = visited_rows * vocab * logits.element_size()  # logits rows the walk reads (once)
        case = f"B={batch} N={n} V={vocab}"
        settings = [torch.full((batch,), v, dtype=t, device=device)
                    for v, t in ((TEMPERATURE, torch.float32), (TOP_P, torch.float32), (TOP_K, torch.int32))]
        uniforms = torch.rand(batch, n, 2, device=device)
        few = max(3, args.iters // 20)
        impls = {
            ("greedy", "jakiro"): (lambda: ops.verify_greedy(tokens, parents, logits, validate=False), args.iters),
            ("greedy", "vectorised-pytorch"): (lambda f=make_vectorised_greedy(tokens, parents): f(logits), args.iters),
            ("sampling", "jakiro"): (lambda: ops.verify_sampling(tokens, parents, logits, *settings,
                                                                 uniforms=uniforms, validate=False), args.iters),
        }
        if device.type == "cuda":  # each CUDA kernel side by side with the automatic choice
            for path in CUDA_PATHS:
                impls[("greedy", f"jakiro-{path}")] = impls[("greedy", "jakiro")]
                impls[("sampling", f"jakiro-{path}")] = impls[("sampling", "jakiro")]
        if batch <= python_loops_max_batch:
            impls[("greedy", "reference")] = (lambda: reference.verify_greedy(tokens, parents, logits), few)
            impls[("sampling", "authors-python-loop")] = (
                lambda f=make_authors_sampling_loop(tokens, parents): f(logits), few)
        if batch <= 8 and not (vocab > 32000 and n > 16):
            impls[("sampling", "reference")] = (lambda: reference.verify_sampling(
                tokens, parents, logits, uniforms, *settings), 3)
        for (op, impl), (fn, iters) in impls.items():
            path = impl.split("-", 1)[1] if impl.startswith("jakiro-") else None
            with verify_kernel(path):
                t = time_fn(fn, device, warmup=min(args.warmup, iters), iters=iters,
                            cuda_graph=args.cuda_graph and impl.startswith("jakiro"))
            gbps = nbytes / (t.median_us * 1e-6) / 1e9
            report.add(case=f"{op} {case}", impl=impl, timing=t, GBps=gbps,
                       pct_of_copy=100 * gbps / report.meta["copy_bandwidth_GBps"])
        add_speedups(report, f"greedy {case}", "vectorised-pytorch")
        add_speedups(report, f"sampling {case}", "authors-python-loop")


def bench_compact_kv(report, args, device, dtype, gen):
    layers, heads, head_dim, seq_len, n = (4, 4, 64, 512, 60) if device.type == "cpu" else (32, 8, 128, 1024, 60)
    for batch in ((1, 8) if args.quick else (1, 8, 64)):
        kv = torch.randn(layers, 2, batch, heads, seq_len, head_dim, device=device, dtype=dtype)
        parents = make_parents("random", batch, n, gen)
        path = torch.full((batch, n), -1, dtype=torch.int32)
        accept_len = torch.zeros(batch, dtype=torch.int32)
        for b in range(batch):  # the deepest root-to-node path of each tree
            depth = [0] * n
            for i in range(1, n):
                depth[i] = depth[int(parents[b, i])] + 1
            node, chain = max(range(n), key=lambda i: depth[i]), []
            while node != 0:
                chain.append(node)
                node = int(parents[b, node])
            chain = [0] + chain[::-1]
            path[b, : len(chain)] = torch.tensor(chain, dtype=torch.int32)
            accept_len[b] = len(chain) - 1
        prefix_len = torch.randint(0, seq_len - n, (batch,), generator=gen, dtype=torch.int32)
        prefix_len, path, accept_len = prefix_len.to(device), path.to(device), accept_len.to(device)
        moved_rows = int(accept_len.sum()) + batch
        nbytes = 2 * moved_rows * layers * 2 * heads * head_dim * kv.element_size()  # read + write
        src = (prefix_len.unsqueeze(1) + path.clamp(min=0)).long()
        dst = (prefix_len.unsqueeze(1) + torch.arange(n, device=device)).long()
        keep = (torch.arange(n, device=device) <= accept_len.unsqueeze(1))

        def per_layer_loop():  # EAGLE-style: one gather + copy per layer and row
            for b in range(batch):
                a = int(accept_len[b]) + 1
                for layer in range(layers):
                    rows = kv[layer, :, b].index_select(2, src[b, :a])
                    kv[layer, :, b, :, dst[b, 0]: dst[b, 0] + a] = rows

        def vectorised():  # one gather + one scatter over all layers (staged, so overlap-safe)
            bi, ji = keep.nonzero(as_tuple=True)
            kv[:, :, bi, :, dst[bi, ji]] = kv[:, :, bi, :, src[bi, ji]]

        impls = {"jakiro": lambda: ops.compact_kv(kv, prefix_len, path, accept_len, validate=False),
                 "vectorised-pytorch": vectorised,
                 "per-layer-loop": per_layer_loop}
        case = f"compact_kv B={batch} L={layers} Hkv={heads} D={head_dim} rows={moved_rows}"
        for impl, fn in impls.items():
            t = time_fn(fn, device, warmup=args.warmup, iters=args.iters,
                        cuda_graph=args.cuda_graph and impl == "jakiro")
            gbps = nbytes / (t.median_us * 1e-6) / 1e9
            report.add(case=case, impl=impl, timing=t, GBps=gbps,
                       pct_of_copy=100 * gbps / report.meta["copy_bandwidth_GBps"])
        add_speedups(report, case, "vectorised-pytorch")


def add_speedups(report, case, baseline):
    rows = [r for r in report.rows if r["case"] == case]
    base = next((r["median_us"] for r in rows if r["impl"] == baseline), None)
    if base is not None:
        for r in rows:
            r["speedup_vs_baseline"] = base / r["median_us"]
            r["baseline"] = baseline


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.iters = min(args.iters, 20)
        args.warmup = min(args.warmup, 3)
    dtype = torch.bfloat16
    report = Report("verify", device)
    report.meta["copy_bandwidth_GBps"] = measure_copy_bandwidth(device)
    report.meta.update(dtype=str(dtype), temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    random.seed(0)
    bench_verify(report, args, device, dtype, gen, QUICK_CASES if args.quick else CASES)
    bench_compact_kv(report, args, device, dtype, gen)
    finish(report, args)


if __name__ == "__main__":
    main()

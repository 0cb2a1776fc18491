"""Benchmark of tree_attention against SDPA with a dense mask, SDPA causal, and the reference.

Baselines, all timed in this process on the same inputs:
- ``sdpa_dense_mask``: ``scaled_dot_product_attention`` with a dense boolean
  ``[B, 1, Nq, S]`` mask (what EAGLE/Jakiro reference code does), GQA by
  ``enable_gqa``; the mask is built once, outside the timing.
- ``sdpa_causal``: the same keys and queries under a bottom-right causal mask
  (``causal_lower_right``: the flash backend on CUDA), what a chain of the same
  size costs: our speed of light.
- ``reference``: ``jakiro.reference.tree_attention`` (dense fp64), small cases only.
- on CUDA, ``jakiro_mma_v1``: the op with its first tensor-core kernel (64 query rows
  per block, no copy pipeline), so the staged default (``jakiro``) shows against it;
  ``jakiro_scalar``: the op with its scalar (non-tensor-core) kernel forced. The
  scalar kernel and the reference run at prefix <= 2048 only (the full grid stays
  well under a minute).

KV bandwidth counts the K and V bytes of the valid keys read once, as a fraction of
the copy bandwidth measured in-process.

Head sizes: on the CPU, besides SmolLM2's 64 and the default 128 (copies compiled for their
size), one shape at 16, 80, 96 and 256 (the copy that reads the size at run time), and two
with a sliding window and a soft-cap (Gemma 2/3 style; SDPA gets the windowed dense mask but
has no soft-cap, so its time is that of the window alone). On CUDA, the head-size cases run
every compiled size (64, 80, 96, 128, 256).
"""
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, call_counts, finish, measure_copy_bandwidth, parser, time_fn  # noqa: E402
from jakiro import ops, reference  # noqa: E402
from jakiro.testing import make_tree_attention_inputs  # noqa: E402

HQ, D, N = 32, 128, 60
KERNEL_ENV = "JAKIRO_TREE_ATTENTION_KERNEL"  # picks the CUDA kernel (see csrc/cuda/tree_attention.cu)
# (B, Hq, Hkv, head_dim, tree nodes, prefix, window, softcap): the grid (Hq=32, D=128,
# 60 nodes) on CUDA, smaller shapes on the CPU plus SmolLM2's decoding sizes there (9 query
# heads, 3 KV heads, D=64; trees of 6 and 16 nodes, and 1: a vanilla decoding step); then every
# head size at one small-model shape (8 query heads, 2 KV heads, a 16-node tree, prefix 1000),
# and Gemma-like windowed, soft-capped calls (4 query heads, 1 KV head, D=256).
CUDA_CASES = [(b, HQ, hkv, D, N, prefix, 0, 0.0) for hkv in (8, 32) for b in (1, 8, 32)
              for prefix in (512, 2048, 8192, 32768) if b * hkv * prefix <= 32 * 8 * 32768] + \
             [(8, 8, 2, d, 16, 2048, 0, 0.0) for d in (64, 80, 96, 128, 256)] + \
             [(8, 4, 1, 256, 16, 8192, 1024, 50.0)]
CUDA_QUICK = [(1, HQ, 8, D, N, 8192, 0, 0.0), (8, HQ, 8, D, N, 2048, 0, 0.0), (8, 8, 2, 80, 16, 2048, 0, 0.0)]
CPU_CASES = [(1, HQ, 8, D, N, 512, 0, 0.0), (1, HQ, 8, D, N, 2048, 0, 0.0), (4, HQ, 8, D, N, 512, 0, 0.0),
             (1, HQ, 32, D, N, 512, 0, 0.0)] + \
            [(1, 9, 3, 64, nodes, prefix, 0, 0.0) for prefix in (300, 1000) for nodes in (1, 6, 16)] + \
            [(1, 8, 2, d, 16, 1000, 0, 0.0) for d in (16, 64, 80, 96, 128, 256)] + \
            [(1, 4, 1, 256, 16, 4000, 512, 50.0), (1, 4, 1, 256, 1, 4000, 512, 50.0)]
CPU_QUICK = [(1, HQ, 8, D, N, 256, 0, 0.0), (1, 9, 3, 64, 16, 300, 0, 0.0), (1, 8, 2, 80, 16, 300, 0, 0.0)]
REFERENCE_MAX_ELEMENTS = 1 << 26  # scores tensor B * Hq * Nq * S (fp64) that the reference may build
SLOW_MAX_PREFIX = 2048  # longest prefix at which the scalar kernel and the reference are timed
# JAKIRO_TREE_ATTENTION_KERNEL value of each timed variant of the op
KERNEL_OF_IMPL = {"jakiro": "auto", "jakiro_mma_v1": "mma_v1", "jakiro_scalar": "scalar"}


def dense_mask(inputs, window) -> torch.Tensor:
    seqlens, mask = inputs["cache_seqlens"], inputs["tree_mask"]
    nq, cache_size = inputs["q"].shape[2], inputs["k_cache"].shape[2]
    return reference.tree_attention_visibility(seqlens, mask, inputs["tree_len"], nq, cache_size,
                                               window=window).unsqueeze(1)


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = Report("tree_attention", device)
    report.meta["copy_bandwidth_GBps"] = peak = measure_copy_bandwidth(device)
    report.meta.update(dtype=str(dtype), default_shape=dict(hq=HQ, head_dim=D, tree_nodes=N))
    if device.type == "cuda":
        cases = CUDA_QUICK if args.quick else CUDA_CASES
    else:
        cases = CPU_QUICK if args.quick else CPU_CASES
    warmup, iters = call_counts(args, quick_iters=10)
    gen = torch.Generator().manual_seed(0)
    for batch, hq, hkv, head_dim, nodes, prefix, window, softcap in cases:
        # keys: prefix + tree keys per row, no spare room so SDPA sees exactly the valid keys
        inputs = make_tree_attention_inputs(batch=batch, hq=hq, hkv=hkv, nq=nodes, head_dim=head_dim,
                                            prefix_lens=prefix, dtype=dtype, device=device, generator=gen,
                                            spare_keys=0)
        q, k, v = inputs["q"], inputs["k_cache"], inputs["v_cache"]
        mask = dense_mask(inputs, window)
        causal = causal_lower_right(nodes, prefix + nodes)
        kv_len = min(prefix + nodes, window + nodes) if window else prefix + nodes  # keys read
        kv_bytes = 2 * batch * hkv * kv_len * head_dim * k.element_size()
        flops = 4 * batch * hq * nodes * kv_len * head_dim  # QK^T and PV, as dense
        scale = inputs["scale"]
        impls = {
            "jakiro": lambda: ops.tree_attention(q, k, v, inputs["cache_seqlens"], inputs["tree_mask"],
                                                 nodes, scale, validate=False, window=window, softcap=softcap),
            "sdpa_dense_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                      enable_gqa=True),
            # bottom-right causal of the same size (flash backend on CUDA): a chain as long as the tree
            "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale,
                                                                  enable_gqa=True),
        }
        if device.type == "cuda":
            # the same op with the other CUDA kernels forced (picked by KERNEL_OF_IMPL below)
            impls["jakiro_mma_v1"] = impls["jakiro"]
            if prefix <= SLOW_MAX_PREFIX:
                impls["jakiro_scalar"] = impls["jakiro"]
        if prefix <= SLOW_MAX_PREFIX and batch * hq * nodes * kv_len <= REFERENCE_MAX_ELEMENTS:
            impls["reference"] = lambda: reference.tree_attention(q, k, v, inputs["cache_seqlens"],
                                                                  inputs["tree_mask"], nodes, scale, window=window,
                                                                  softcap=softcap)
        case = f"B={batch} Hkv={hkv} prefix={prefix}"
        if (hq, head_dim, nodes) != (HQ, D, N):
            case = f"B={batch} Hq={hq} Hkv={hkv} D={head_dim} nodes={nodes} prefix={prefix}"
        if window or softcap:
            case += f" window={window} softcap={softcap:g}"
        base = {}
        for impl, fn in impls.items():
            os.environ[KERNEL_ENV] = KERNEL_OF_IMPL.get(impl, "auto")
            t = time_fn(fn, device, warmup=warmup, iters=iters,
                        cuda_graph=args.cuda_graph and impl.startswith("jakiro"))
            gbps = kv_bytes / (t.median_us * 1e-6) / 1e9
            report.add(case=case, impl=impl, timing=t, kv_GBps=gbps, kv_pct_of_copy=100 * gbps / peak,
                       TFLOPs=flops / (t.median_us * 1e-6) / 1e12)
            base[impl] = t.median_us
        for row in report.rows:
            if row["case"] == case:
                row["speedup_vs_dense_mask"] = base["sdpa_dense_mask"] / row["median_us"]
                row["speedup_vs_causal"] = base["sdpa_causal"] / row["median_us"]
    os.environ.pop(KERNEL_ENV, None)
    finish(report, args)


if __name__ == "__main__":
    main()

"""The torch-native paths (jakiro/native.py) against jakiro/reference.py, and the dispatch between
them and jakiro's kernels (jakiro/ops.py, docs/kernels.md "Dispatch"): awkward sizes, GQA, windows
shorter than the tree, queries that see nothing, both gated activations, signed and zero
coefficients, empty experts; every point of a shape grid through the op wrappers with the native
path forced and with jakiro's kernels. CUDA cases carry the `cuda` mark (skipped without a GPU)."""
import itertools

import pytest
import torch

from jakiro import native, ops, reference
from jakiro.testing import make_expert_offsets, make_tree_attention_inputs

ATTENTION_ENV = "JAKIRO_TREE_ATTENTION_KERNEL"
EXPERT_ENV = "JAKIRO_EXPERT_MLP_KERNEL"
# largest error over the largest reference magnitude
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
MLP_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def assert_close(out, expected, tolerance):
    assert out.shape == expected.shape and out.dtype == expected.dtype
    out, expected = out.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.isfinite(out).all()
    if not expected.numel():
        return
    scale = expected.abs().max().clamp(min=1e-6)
    err = ((out - expected).abs().max() / scale).item()
    assert err <= tolerance, f"max error {err:.3g} relative to output scale > {tolerance:g}"


def attention_inputs(batch, hq, hkv, nq, head_dim, prefix, tree_len=None, shape="random", dtype=torch.float32,
                     device="cpu", seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    prefix_lens = [prefix + 3 * b for b in range(batch)]
    inputs = make_tree_attention_inputs(batch=batch, hq=hq, hkv=hkv, nq=nq, head_dim=head_dim,
                                        prefix_lens=prefix_lens, tree_len=tree_len, tree_shape=shape, dtype=dtype,
                                        device=device, generator=gen, strided=strided)
    inputs.pop("parents", None)
    return inputs


def attention_reference(inputs, **extra):
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return reference.tree_attention(**cpu, **extra)


# (B, Hq, Hkv, Nq, tree_len, D, prefix): odd sizes, GQA 1/3/4, the draft's frontier (Nq < tree_len)
ATTENTION_CASES = [
    (1, 3, 1, 1, 1, 16, 0),
    (3, 6, 2, 7, 7, 80, 5),
    (5, 4, 4, 13, 13, 16, 17),
    (3, 12, 3, 5, 11, 80, 9),
    (2, 4, 1, 9, 9, 256, 33),
    (1, 8, 2, 37, 37, 16, 40),
]


@pytest.mark.parametrize("window", [0, 1, 3, 8, 1000])
@pytest.mark.parametrize("masked", [True, False], ids=["tree", "causal"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_tree_attention_native_matches_reference(case, masked, window):
    batch, hq, hkv, nq, tree_len, head_dim, prefix = case
    inputs = attention_inputs(batch, hq, hkv, nq, head_dim, prefix, tree_len=tree_len,
                              shape="random" if masked else None, seed=sum(case) + window)
    out = native.tree_attention_native(**inputs, window=window or None)
    assert out.is_contiguous()
    assert_close(out, attention_reference(inputs, window=window or None), TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tree_attention_native_half_precision_and_strided_cache(dtype):
    inputs = attention_inputs(3, 6, 2, 9, 80, 21, dtype=dtype, seed=3, strided=True)
    out = native.tree_attention_native(**inputs, window=4)
    assert out.dtype == dtype
    assert_close(out, attention_reference(inputs, window=4), TOLERANCE[dtype])


@pytest.mark.parametrize("window", [0, 2, 5, 9, 40])
@pytest.mark.parametrize("nq, tree_len, prefix", [(1, 1, 0), (5, 5, 0), (12, 12, 3), (4, 20, 7), (33, 33, 1)])
def test_native_visibility_equals_reference(nq, tree_len, prefix, window):
    for shape in ("random", None):
        inputs = attention_inputs(3, 2, 1, nq, 8, prefix, tree_len=tree_len, shape=shape, seed=nq + window)
        args = (inputs["cache_seqlens"], inputs["tree_mask"], inputs["tree_len"], nq, inputs["k_cache"].shape[2])
        assert torch.equal(native.tree_attention_native_visibility(*args, window),
                           reference.tree_attention_visibility(*args, window or None))


def test_tree_attention_native_queries_that_see_nothing_get_zeros():
    # causal with fewer keys than queries: the first queries see no key
    inputs = attention_inputs(2, 4, 2, 6, 16, 0, tree_len=0, shape=None, seed=1)
    inputs["cache_seqlens"] = torch.tensor([2, 0], dtype=torch.int32)
    out = native.tree_attention_native(**inputs)
    expected = attention_reference(inputs)
    assert torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4])) and torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out, expected, TOLERANCE[torch.float32])
    # a tree row without bits and no prefix
    inputs = attention_inputs(2, 3, 1, 5, 16, 0, seed=2)
    inputs["tree_mask"][1, 2] = 0
    inputs["cache_seqlens"] = torch.tensor([5, 5], dtype=torch.int32)
    out = native.tree_attention_native(**inputs)
    assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2]))
    assert_close(out, attention_reference(inputs), TOLERANCE[torch.float32])


def test_tree_attention_native_refuses_softcap_and_bad_lengths(monkeypatch):
    inputs = attention_inputs(1, 2, 1, 3, 16, 4)
    with pytest.raises(ValueError, match="soft-cap"):
        native.tree_attention_native(**inputs, softcap=30.0)
    monkeypatch.setenv(ATTENTION_ENV, "native")
    with pytest.raises(ValueError, match="soft-cap"):
        ops.tree_attention(**inputs, softcap=30.0)
    bad = dict(inputs, cache_seqlens=inputs["cache_seqlens"] + 100)
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.tree_attention(**bad)
    assert not ops.tree_attention_native_rule(torch.empty(8, 2, 3, 16, device="meta"), None, softcap=30.0)


# ---------------------------------------------------------------------------
# expert_mlp


def mlp_inputs(tokens, hidden, intermediate, experts, heads, dtype=torch.float32, device="cpu", seed=0,
               zero_experts=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w_gate_up = torch.randn(experts, 2 * intermediate, hidden, generator=gen) / hidden**0.5
    w_down = torch.randn(experts, hidden, intermediate, generator=gen) / intermediate**0.5
    coeff = torch.randn(tokens, heads, experts, generator=gen)                 # signed
    if zero_experts and experts > 1:
        skip = torch.rand(tokens, experts, generator=gen) < 0.4                # not routed in any head
        coeff = coeff.masked_fill(skip.unsqueeze(1), 0.0)
    return [t.to(device, dtype) for t in (x, w_gate_up, w_down)] + [coeff.to(device)]


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("tokens, hidden, intermediate, experts, heads",
                         [(1, 16, 24, 1, 1), (7, 40, 24, 3, 2), (13, 24, 56, 2, 3), (61, 72, 40, 4, 8), (0, 16, 8, 2, 2)])
def test_expert_mlp_native_matches_reference(tokens, hidden, intermediate, experts, heads, dtype, activation):
    inputs = mlp_inputs(tokens, hidden, intermediate, experts, heads, dtype, seed=tokens + experts)
    out = native.expert_mlp_native(*inputs, activation)
    assert out.shape == (heads, tokens, hidden)
    assert_close(out, reference.expert_mlp(*inputs, activation), MLP_TOLERANCE[dtype])


def test_expert_mlp_native_skips_experts_a_token_does_not_use():
    x, w_gate_up, w_down, coeff = mlp_inputs(5, 16, 8, 2, 2, zero_experts=False, seed=4)
    coeff[:, :, 1] = 0.0
    w_down[1, 0, 0] = float("inf")                 # expert 1 would give inf, times zero: NaN
    out = native.expert_mlp_native(x, w_gate_up, w_down, coeff)
    expected = reference.expert_mlp(x, w_gate_up[:1], w_down[:1], coeff[:, :, :1])
    assert_close(out, expected, MLP_TOLERANCE[torch.float32])


def test_expert_mlp_native_gradients_match_reference():
    inputs = [t.double().requires_grad_() for t in mlp_inputs(6, 16, 12, 3, 2, seed=5)]
    grads = torch.autograd.grad(native.expert_mlp_native(*inputs, "gelu_tanh").sum(), inputs)
    expected = torch.autograd.grad(reference.expert_mlp(*inputs, "gelu_tanh").sum(), inputs)
    for g, e in zip(grads, expected):
        assert_close(g, e, 1e-10)


def test_expert_mlp_native_autocast_matches_the_op(monkeypatch):
    inputs = mlp_inputs(9, 32, 16, 2, 2, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = ops.expert_mlp(*inputs)
        monkeypatch.setenv(EXPERT_ENV, "native")
        forced = ops.expert_mlp(*inputs)
    assert forced.dtype == theirs.dtype == torch.bfloat16
    assert_close(forced, theirs.float().to(torch.bfloat16), MLP_TOLERANCE[torch.bfloat16])


# ---------------------------------------------------------------------------
# grouped_gemm


def gemm_inputs(tokens, k, n, experts, empty, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen).to(device, dtype)
    w = (torch.randn(experts, n, k, generator=gen) / k**0.5).to(device, dtype)
    return x, w, make_expert_offsets(tokens, experts, empty, gen).to(device)


@pytest.mark.parametrize("method", ["dense", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens, k, n, experts, empty",
                         [(1, 8, 16, 1, 0), (0, 8, 8, 3, 1), (7, 24, 40, 3, 1), (61, 40, 24, 5, 2), (130, 16, 8, 8, 5)])
def test_grouped_gemm_native_matches_reference(tokens, k, n, experts, empty, dtype, method):
    x, w, offsets = gemm_inputs(tokens, k, n, experts, empty, dtype, seed=tokens + experts)
    out = native.grouped_gemm_native(x, w, offsets, method=method)
    assert out.shape == (tokens, n) and out.dtype == dtype
    assert_close(out, reference.grouped_gemm(x, w, offsets), MLP_TOLERANCE[dtype])


def test_grouped_gemm_native_float64_and_bad_offsets():
    x, w, offsets = gemm_inputs(9, 8, 8, 3, 1, torch.float64, seed=7)
    assert_close(native.grouped_gemm_native(x, w, offsets), reference.grouped_gemm(x, w, offsets), 1e-12)
    with pytest.raises(ValueError, match="expert_offsets"):
        native.grouped_gemm_native(x, w, torch.tensor([0, 5, 3, 9], dtype=torch.int32))


# ---------------------------------------------------------------------------
# Dispatch


def test_rules_pick_the_measured_winners():
    """At the BENCHMARKS.md points the rule picks the faster side (meta tensors: shapes only)."""
    def q(batch):
        return torch.empty(batch, 32, 60, 128, dtype=torch.bfloat16, device="meta")
    for batch in (3, 8, 32):
        assert ops.tree_attention_native_rule(q(batch), None)          # SDPA 1.4-2.2x faster at B >= 8

    def mlp(tokens, size, experts=2):
        x = torch.empty(tokens, size, dtype=torch.bfloat16, device="meta")
        return ops.expert_mlp_native_rule(x, torch.empty(experts, size, size, device="meta"))
    measured = {(1, 4096): False, (10, 4096): True, (60, 4096): True, (600, 4096): True, (4096, 4096): True,
                (1, 576): False, (10, 576): False, (60, 576): False, (600, 576): False, (4096, 576): False}
    assert {key: mlp(*key) for key in measured} == measured
    assert not mlp(600, 4096, experts=8)                               # sparse routing: not measured


# every point: (B, Hq, Hkv, Nq, tree_len, D, prefix, window)
DISPATCH_GRID = [(b, 2 * g, 2, nq, nq, d, p, w) for b, g, nq, d, p, w in
                 itertools.product([1, 3], [1, 3], [1, 9], [16, 80], [0, 11], [0, 4])]


@pytest.mark.parametrize("path", ["native", "auto"])
def test_dispatch_grid_matches_reference(monkeypatch, path):
    monkeypatch.setenv(ATTENTION_ENV, path)
    monkeypatch.setenv(EXPERT_ENV, path if path == "native" else "")
    for index, (b, hq, hkv, nq, tree_len, d, prefix, window) in enumerate(DISPATCH_GRID):
        inputs = attention_inputs(b, hq, hkv, nq, d, prefix, tree_len=tree_len, seed=index)
        out = ops.tree_attention(**inputs, window=window or None)
        assert_close(out, attention_reference(inputs, window=window or None), TOLERANCE[torch.float32])
        if path == "native":                       # the forced path is the one that ran
            assert torch.equal(out, native.tree_attention_native(**inputs, window=window or None))
    for tokens, size, experts in itertools.product([1, 9, 65], [8, 24], [1, 3]):
        inputs = mlp_inputs(tokens, size, size + 8, experts, 2, seed=tokens + size)
        for activation in ("silu", "gelu_tanh"):
            assert_close(ops.expert_mlp(*inputs, activation), reference.expert_mlp(*inputs, activation),
                         MLP_TOLERANCE[torch.float32])
        x, w, offsets = gemm_inputs(tokens, size, size + 8, experts, 1 if experts > 1 else 0, seed=size)
        assert_close(ops.grouped_gemm(x, w, offsets), reference.grouped_gemm(x, w, offsets),
                     MLP_TOLERANCE[torch.float32])


def test_cpu_default_runs_jakiro_kernels(monkeypatch):
    """Unforced, the CPU keeps its batch-invariant kernel: bit for bit the op itself."""
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    monkeypatch.delenv(EXPERT_ENV, raising=False)
    inputs = attention_inputs(4, 4, 2, 9, 16, 7, seed=8)
    assert torch.equal(ops.tree_attention(**inputs), torch.ops.jakiro.tree_attention(
        inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"], inputs["tree_mask"],
        inputs["tree_len"], inputs["scale"], True, 0, 0.0))
    mlp = mlp_inputs(70, 16, 8, 2, 2)
    assert torch.equal(ops.expert_mlp(*mlp), torch.ops.jakiro.expert_mlp(*mlp, "silu"))


# ---------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_cuda_tree_attention_native_matches_reference(case, dtype):
    batch, hq, hkv, nq, tree_len, head_dim, prefix = case
    inputs = attention_inputs(batch, hq, hkv, nq, head_dim, prefix, tree_len=tree_len, dtype=dtype, device="cuda",
                              seed=sum(case))
    for window in (None, 3):
        assert_close(native.tree_attention_native(**inputs, window=window),
                     attention_reference(inputs, window=window), TOLERANCE[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["native", "auto"])
def test_cuda_dispatch_grid_matches_reference(monkeypatch, path):
    monkeypatch.setenv(ATTENTION_ENV, path)
    monkeypatch.setenv(EXPERT_ENV, path if path == "native" else "")
    for index, (b, hq, hkv, nq, tree_len, d, prefix, window) in enumerate(DISPATCH_GRID):
        for dtype in (torch.float32, torch.bfloat16):
            inputs = attention_inputs(b, hq, hkv, nq, d, prefix, tree_len=tree_len, dtype=dtype, device="cuda",
                                      seed=index)
            assert_close(ops.tree_attention(**inputs, window=window or None),
                         attention_reference(inputs, window=window or None), TOLERANCE[dtype])
    for tokens, size, experts in itertools.product([1, 9, 65, 600], [64, 512], [1, 2, 3]):
        for dtype in (torch.float32, torch.bfloat16):
            inputs = mlp_inputs(tokens, size, size, experts, 2, dtype, device="cuda", seed=tokens)
            cpu = [t.cpu() for t in inputs]
            assert_close(ops.expert_mlp(*inputs), reference.expert_mlp(*cpu), MLP_TOLERANCE[dtype])
            x, w, offsets = gemm_inputs(tokens, size, size + 64, experts, 1 if experts > 1 else 0, dtype, "cuda")
            assert_close(ops.grouped_gemm(x, w, offsets), reference.grouped_gemm(x.cpu(), w.cpu(), offsets.cpu()),
                         MLP_TOLERANCE[dtype])


@pytest.mark.cuda
def test_cuda_native_paths_capture_in_a_graph():
    inputs = attention_inputs(3, 8, 2, 9, 128, 40, dtype=torch.bfloat16, device="cuda", seed=9)
    mlp = mlp_inputs(33, 64, 64, 2, 2, torch.bfloat16, device="cuda")
    x, w, offsets = gemm_inputs(40, 64, 128, 3, 1, torch.bfloat16, "cuda")
    run = [lambda: native.tree_attention_native(**inputs, validate=False, window=5),
           lambda: native.expert_mlp_native(*mlp),
           lambda: native.grouped_gemm_native(x, w, offsets, validate=False)]
    eager = [f() for f in run]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in run:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = [f() for f in run]
    graph.replay()
    torch.cuda.synchronize()
    for c, e in zip(captured, eager):
        assert torch.equal(c, e)

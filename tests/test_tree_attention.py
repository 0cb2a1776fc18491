"""tree_attention: kernels vs the dense fp64 reference, a branch-as-chain oracle, SDPA, Hugging Face's
sliding-window mask, batch invariance on the CPU, bad input; every head size, windows, soft-caps."""
import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from jakiro import ops, reference
from jakiro.testing import make_tree_attention_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# On CUDA, fp16/bf16 inputs run the staged tensor-core kernel and fp32 the scalar
# one; "cuda-scalar" forces the scalar kernel for every dtype and "cuda-mma_v1"
# the first tensor-core kernel (for fp16/bf16; fp32 runs the scalar one), so
# all three are tested.
ATTENTION_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda),
                     pytest.param("cuda-scalar", marks=pytest.mark.cuda),
                     pytest.param("cuda-mma_v1", marks=pytest.mark.cuda)]
KERNEL_ENV = "JAKIRO_TREE_ATTENTION_KERNEL"


@pytest.fixture(params=ATTENTION_DEVICES)
def device(request, monkeypatch):
    """Overrides conftest's fixture: also runs CUDA cases with the other kernels forced."""
    if request.param.startswith("cuda-"):
        monkeypatch.setenv(KERNEL_ENV, request.param.removeprefix("cuda-"))
        return torch.device("cuda")
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    return torch.device(request.param)
# Largest error allowed, relative to the largest output magnitude.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def call(inputs, **overrides):
    args = {k: v for k, v in inputs.items() if k != "parents"}
    args.update(overrides)
    return ops.tree_attention(**args)


def call_reference(inputs):
    """The reference on the CPU; ``inputs`` may carry ``window`` and ``softcap`` too."""
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items() if k != "parents"}
    return reference.tree_attention(**cpu)


def assert_close_scaled(out, expected, dtype):
    assert out.dtype == expected.dtype and out.shape == expected.shape
    out, expected = out.cpu().double(), expected.cpu().double()
    assert torch.isfinite(out).all()
    scale = expected.abs().max().clamp(min=1e-6)
    err = ((out - expected).abs().max() / scale).item()
    assert err <= TOLERANCE[dtype], f"max error {err:.3g} relative to output scale > {TOLERANCE[dtype]:g}"


# Nq x prefix x GQA group, each case with its own head size; every dtype runs the grid.
GRID = [
    (nq, prefix, group, (64, 128)[index % 2])
    for index, (nq, prefix, group) in enumerate(itertools.product([1, 7, 60, 128], [0, 1, 100], [1, 3, 8]))
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq, prefix, group, head_dim", GRID)
def test_verify_matches_reference(device, nq, prefix, group, head_dim, dtype):
    gen = torch.Generator().manual_seed(nq * 1000 + prefix * 10 + group)
    # two rows with different lengths, both with an Nq-node random tree
    inputs = make_tree_attention_inputs(batch=2, hq=2 * group, hkv=2, nq=nq, head_dim=head_dim,
                                        prefix_lens=[prefix, prefix + 5], dtype=dtype, device=device,
                                        generator=gen)
    assert_close_scaled(call(inputs), call_reference(inputs), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nq, group, batch", [(60, 8, 2), (1, 1, 3), (128, 3, 1)])
def test_long_prefix_matches_reference(device, nq, group, batch, dtype):
    gen = torch.Generator().manual_seed(nq + group)
    prefix = [4095, 3000, 17][:batch]
    inputs = make_tree_attention_inputs(batch=batch, hq=2 * group, hkv=2, nq=nq, head_dim=128,
                                        prefix_lens=prefix, dtype=dtype, device=device, generator=gen)
    assert_close_scaled(call(inputs), call_reference(inputs), dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_key_splits_match_reference(causal):
    # Few (row, head) units and many threads: the CPU kernel splits the keys and
    # merges the splits by log-sum-exp.
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        gen = torch.Generator().manual_seed(12)
        inputs = make_tree_attention_inputs(batch=2, hq=2, hkv=1, nq=3, head_dim=64, prefix_lens=[3000, 700],
                                            tree_shape=None if causal else "binary", generator=gen)
        assert_close_scaled(call(inputs), call_reference(inputs), torch.float32)
    finally:
        torch.set_num_threads(threads)


_CAPABILITY = torch.backends.cpu.get_cpu_capability()
CPU_COPIES = ["portable"] + (["avx2"] if _CAPABILITY in ("AVX2", "AVX512") else []) + \
             (["avx512"] if _CAPABILITY == "AVX512" else [])


@pytest.mark.parametrize("copy", CPU_COPIES)
@pytest.mark.parametrize("nq, group, dtype", [(1, 3, torch.float32), (7, 3, torch.bfloat16), (60, 8, torch.float32),
                                              (13, 1, torch.float16)])
def test_every_cpu_copy_matches_reference(copy, nq, group, dtype, monkeypatch):
    # JAKIRO_TREE_ATTENTION_KERNEL picks the block step: the portable one, the AVX2+FMA copy
    # (4-row tiles), the AVX-512 copy (12-row tiles of 16 floats); every one this CPU can run is tested.
    monkeypatch.setenv(KERNEL_ENV, copy)
    gen = torch.Generator().manual_seed(nq + group)
    inputs = make_tree_attention_inputs(batch=2, hq=2 * group, hkv=2, nq=nq, head_dim=64, prefix_lens=[37, 130],
                                        dtype=dtype, generator=gen)
    assert_close_scaled(call(inputs), call_reference(inputs), dtype)


@pytest.mark.skipif("avx512" not in CPU_COPIES, reason="needs a CPU with AVX-512")
@pytest.mark.parametrize("head_dim", [128, 80, 24])
def test_avx2_and_avx512_copies_sum_alike(head_dim, monkeypatch):
    # The tile height and the vector width differ (8 and 16 floats; 80 and 24 end on a
    # narrower tile), the order of every sum does not: bit-identical outputs.
    gen = torch.Generator().manual_seed(5)
    inputs = make_tree_attention_inputs(batch=2, hq=9, hkv=3, nq=11, head_dim=head_dim, prefix_lens=[300, 64],
                                        generator=gen)
    outs = []
    for copy in ("avx2", "avx512"):
        monkeypatch.setenv(KERNEL_ENV, copy)
        outs.append(call(inputs))
    assert torch.equal(*outs)


def path_keys(inputs, b, i):
    """Cache positions of query i's keys, in order: row b's prefix, then its root->node path."""
    tree_len, parents = inputs["tree_len"], inputs["parents"]
    prefix = int(inputs["cache_seqlens"][b]) - tree_len
    path, node = [], tree_len - inputs["q"].shape[2] + i
    while node >= 0:
        path.append(prefix + node)
        node = int(parents[b, node])
    return list(range(prefix)) + path[::-1]


def one_query_call(inputs, b, keys, i):
    """What vanilla decoding computes for query i of row b: one causal query over its keys, contiguous."""
    k = inputs["k_cache"][b:b + 1, :, keys].contiguous()
    v = inputs["v_cache"][b:b + 1, :, keys].contiguous()
    q = inputs["q"][b:b + 1, :, i:i + 1]
    seqlens = torch.tensor([len(keys)], dtype=torch.int32)
    return ops.tree_attention(q, k, v, seqlens, None, 0, inputs["scale"])[0, :, 0]


# (prefixes, tree nodes, threads): trees inside, across and past the 512-key splits, and
# thread counts for which the tree call and the one-query calls split the work differently
# (key splits as units or not, rows in smaller blocks or not).
INVARIANCE_CASES = [([0, 3], 9, 1), ([0, 3], 9, 8), ([37, 300], 16, 2), ([37, 300], 16, 8), ([500, 490], 23, 2),
                    ([1020, 511], 60, 1), ([1100, 1500], 6, 8), ([2500, 100], 40, 3)]


@pytest.mark.parametrize("copy", CPU_COPIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prefixes, nodes, threads", INVARIANCE_CASES)
def test_cpu_tree_rows_equal_one_query_decoding(prefixes, nodes, threads, dtype, copy, monkeypatch):
    # Batch invariance, bit for bit: every tree query gets exactly the numbers a one-query
    # causal call over its prefix and root->node path gives, the call vanilla decoding makes,
    # so a verify pass reproduces greedy decoding in every dtype.
    monkeypatch.setenv(KERNEL_ENV, copy)
    gen = torch.Generator().manual_seed(nodes)
    inputs = make_tree_attention_inputs(batch=2, hq=9, hkv=3, nq=nodes, head_dim=64, prefix_lens=prefixes,
                                        dtype=dtype, generator=gen)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = call(inputs)
        for b in range(2):
            for i in range(nodes):
                expected = one_query_call(inputs, b, path_keys(inputs, b, i), i)
                assert torch.equal(out[b, :, i], expected), f"row {b}, node {i}"
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq, prefix", [(70, 0), (9, 600), (40, 1000)])
def test_cpu_causal_rows_equal_one_query_decoding(nq, prefix, dtype):
    # The same for a causal block (prefill, a chain): query i equals a one-query call over keys < its end.
    gen = torch.Generator().manual_seed(nq)
    inputs = make_tree_attention_inputs(batch=1, hq=4, hkv=2, nq=nq, head_dim=128, prefix_lens=prefix,
                                        tree_shape=None, dtype=dtype, generator=gen)
    out = call(inputs)
    for i in range(nq):
        expected = one_query_call(inputs, 0, list(range(prefix + i + 1)), i)
        assert torch.equal(out[0, :, i], expected), f"query {i}"


def test_cpu_copy_choice_is_explicit(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    inputs = make_tree_attention_inputs(batch=1, hq=2, hkv=1, nq=2, head_dim=64, prefix_lens=4)
    with pytest.raises(ValueError, match="tree_attention: environment variable JAKIRO_TREE_ATTENTION_KERNEL must be "
                                         "auto, avx512, avx2 or portable .* or scalar, mma or mma_v1"):
        call(inputs)


@pytest.mark.parametrize("cuda_value", ["scalar", "mma", "mma_v1"])
def test_cuda_kernel_values_mean_auto_on_the_cpu(cuda_value, monkeypatch):
    # One variable picks the kernel on both devices: a CUDA kernel's name is auto on the CPU.
    inputs = make_tree_attention_inputs(batch=2, hq=4, hkv=2, nq=5, head_dim=64, prefix_lens=[9, 30],
                                        generator=torch.Generator().manual_seed(2))
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    want = call(inputs)
    monkeypatch.setenv(KERNEL_ENV, cuda_value)
    assert torch.equal(call(inputs), want)


def test_deprecated_cpu_alias_still_applies_with_a_warning(monkeypatch, capfd):
    # JAKIRO_TREE_ATTENTION_CPU, the old name, still picks the copy where the new name is unset,
    # and warns to use JAKIRO_TREE_ATTENTION_KERNEL; the new name wins when both are set.
    inputs = make_tree_attention_inputs(batch=1, hq=2, hkv=1, nq=3, head_dim=64, prefix_lens=7)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setenv("JAKIRO_TREE_ATTENTION_CPU", "portable")
    torch.set_warn_always(True)  # the warning is once per process otherwise
    capfd.readouterr()
    try:
        out = call(inputs)
    finally:
        torch.set_warn_always(False)
    # torch's C++ warning, on standard error
    assert re.search("JAKIRO_TREE_ATTENTION_CPU is deprecated .* use JAKIRO_TREE_ATTENTION_KERNEL",
                     capfd.readouterr().err)
    monkeypatch.setenv(KERNEL_ENV, "portable")
    assert torch.equal(out, call(inputs))
    monkeypatch.setenv("JAKIRO_TREE_ATTENTION_CPU", "fastest")
    monkeypatch.setenv(KERNEL_ENV, "auto")
    call(inputs)  # the new name wins: the alias's bad value is not read
    monkeypatch.delenv(KERNEL_ENV)
    with pytest.raises(ValueError, match="environment variable JAKIRO_TREE_ATTENTION_CPU must be auto, avx512, "
                                         "avx2 or portable, got 'fastest'"):
        call(inputs)


def chain_oracle(inputs, window=None):
    """Each tree query's output is causal attention over its root->node path (plus the prefix);
    with ``window``, over the last ``window`` keys of that chain (a sliding window over the
    sequence that the query ends: old ancestors and the prefix go first)."""
    q, k, v = inputs["q"].cpu().double(), inputs["k_cache"].cpu().double(), inputs["v_cache"].cpu().double()
    parents, tree_len, scale = inputs["parents"], inputs["tree_len"], inputs["scale"]
    batch, hq, nq, _ = q.shape
    group = hq // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(batch):
        prefix = int(inputs["cache_seqlens"][b]) - tree_len
        for i in range(nq):
            path, node = [], tree_len - nq + i
            while node >= 0:
                path.append(prefix + node)
                node = int(parents[b, node])
            keys = list(range(prefix)) + path[::-1]
            if window is not None:
                keys = keys[-window:]
            kk = k[b, :, keys].repeat_interleave(group, 0)
            vv = v[b, :, keys].repeat_interleave(group, 0)
            # the node is the last token of its chain: it sees every key of the chain
            out[b, :, i] = F.scaled_dot_product_attention(q[b, :, i:i + 1], kk, vv, scale=scale)[:, 0]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["chain", "star", "binary", "random"])
@pytest.mark.parametrize("nq, tree_len", [(40, 40), (9, 33), (1, 70)])
def test_matches_branch_as_chain_oracle(device, shape, nq, tree_len, dtype):
    # nq < tree_len: the draft's expansion, whose queries are the newest nodes
    gen = torch.Generator().manual_seed(tree_len)
    inputs = make_tree_attention_inputs(batch=2, hq=4, hkv=2, nq=nq, tree_len=tree_len, head_dim=64,
                                        prefix_lens=[13, 50], tree_shape=shape, dtype=dtype, device=device,
                                        generator=gen)
    expected = chain_oracle(inputs)
    assert_close_scaled(call(inputs), expected.to(dtype), dtype)
    assert_close_scaled(call_reference(inputs), expected.to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq, prefix, group", [(1, 30, 1), (7, 0, 3), (60, 100, 8), (128, 5, 1)])
def test_causal_equals_sdpa_bottom_right(device, nq, prefix, group, dtype):
    gen = torch.Generator().manual_seed(nq + prefix)
    inputs = make_tree_attention_inputs(batch=2, hq=2 * group, hkv=2, nq=nq, head_dim=128,
                                        prefix_lens=[prefix, prefix + 9], tree_shape=None, dtype=dtype,
                                        device=device, generator=gen)
    out = call(inputs)
    for b in range(2):
        kv_len = int(inputs["cache_seqlens"][b])
        q = inputs["q"][b:b + 1].cpu().double()
        k = inputs["k_cache"][b:b + 1, :, :kv_len].cpu().double()
        v = inputs["v_cache"][b:b + 1, :, :kv_len].cpu().double()
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(nq, kv_len),
                                                  scale=inputs["scale"], enable_gqa=True)
        assert_close_scaled(out[b:b + 1], expected.to(dtype), dtype)
    assert_close_scaled(out, call_reference(inputs), dtype)


def test_queries_that_see_no_key_get_zeros(device):
    # causal with more queries than keys: the first queries see nothing
    inputs = make_tree_attention_inputs(batch=2, hq=2, hkv=1, nq=6, tree_len=0, head_dim=64, prefix_lens=[2, 0],
                                        tree_shape=None, device=device)
    out = call(inputs).cpu()
    assert torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0, :, 4:].abs().sum() > 0
    assert_close_scaled(out, call_reference(inputs), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_cache_views(device, dtype):
    gen = torch.Generator().manual_seed(5)
    inputs = make_tree_attention_inputs(batch=3, hq=6, hkv=2, nq=20, head_dim=128, prefix_lens=[300, 7, 64],
                                        dtype=dtype, device=device, generator=gen, strided=True)
    assert not inputs["k_cache"].is_contiguous() and inputs["k_cache"].stride(-1) == 1
    assert_close_scaled(call(inputs), call_reference(inputs), dtype)


def test_keys_past_the_lengths_are_never_read(device):
    gen = torch.Generator().manual_seed(6)
    inputs = make_tree_attention_inputs(batch=2, hq=4, hkv=4, nq=10, head_dim=64, prefix_lens=[40, 3],
                                        device=device, generator=gen, spare_keys=50)
    clean = call(inputs)
    for name in ("k_cache", "v_cache"):
        poisoned = inputs[name].clone()
        for b in range(2):
            poisoned[b, :, int(inputs["cache_seqlens"][b]):] = float("nan")
        inputs[name] = poisoned
    assert torch.equal(call(inputs), clean)


def test_q_heads_share_kv_heads_in_order(device):
    # GQA: query head h reads KV head h // (Hq / Hkv); a reference with the heads
    # spelled out one by one must agree.
    gen = torch.Generator().manual_seed(8)
    inputs = make_tree_attention_inputs(batch=1, hq=6, hkv=2, nq=5, head_dim=64, prefix_lens=[20],
                                        device=device, generator=gen)
    out = call(inputs).cpu()
    for h in range(6):
        single = dict(inputs, q=inputs["q"][:, h:h + 1], k_cache=inputs["k_cache"][:, h // 3:h // 3 + 1],
                      v_cache=inputs["v_cache"][:, h // 3:h // 3 + 1])
        assert_close_scaled(out[:, h:h + 1], call_reference(single), torch.float32)


def test_mask_bits_past_tree_len_are_ignored(device):
    gen = torch.Generator().manual_seed(9)
    inputs = make_tree_attention_inputs(batch=2, hq=2, hkv=2, nq=5, tree_len=5, head_dim=64,
                                        prefix_lens=[10, 20], device=device, generator=gen)
    noisy = inputs["tree_mask"] | torch.tensor(-64, dtype=torch.int32, device=device)  # bits 6..31 set
    torch.testing.assert_close(call(inputs, tree_mask=noisy), call(inputs), rtol=0, atol=0)


def test_tree_len_zero_with_mask_sees_the_whole_prefix(device):
    gen = torch.Generator().manual_seed(10)
    inputs = make_tree_attention_inputs(batch=2, hq=2, hkv=1, nq=3, tree_len=0, head_dim=64, prefix_lens=[9, 33],
                                        device=device, generator=gen)
    assert inputs["tree_mask"].shape == (2, 3, 0)
    assert_close_scaled(call(inputs), call_reference(inputs), torch.float32)


def test_empty_inputs(device):
    for batch, nq in [(0, 4), (2, 0)]:
        inputs = make_tree_attention_inputs(batch=batch, hq=2, hkv=1, nq=nq, tree_len=4, head_dim=64,
                                            prefix_lens=[3] * batch, device=device)
        assert call(inputs).shape == (batch, 2, nq, 64)


def test_default_scale_is_inverse_sqrt_head_dim(device):
    inputs = make_tree_attention_inputs(batch=1, hq=2, hkv=2, nq=4, head_dim=128, prefix_lens=[8], device=device)
    torch.testing.assert_close(call(inputs, scale=None), call(inputs, scale=128 ** -0.5))


def base_inputs(device="cpu", **kw):
    args = dict(batch=2, hq=4, hkv=2, nq=5, head_dim=64, prefix_lens=[40, 42], device=device)
    args.update(kw)
    return make_tree_attention_inputs(**args)


BAD_INPUTS = [
    (lambda i: dict(i, q=i["q"][:, :3]), "multiple of the number of KV heads"),
    (lambda i: dict(i, cache_seqlens=i["cache_seqlens"] + torch.tensor([0, 4], dtype=torch.int32, device=i["q"].device)),
     r"cache_seqlens\[1\] = 51 exceeds the cache size S = 50"),
    (lambda i: dict(i, tree_len=6), None),  # valid: a wider tree fits lengths 45 and 47
    (lambda i: dict(i, cache_seqlens=torch.tensor([9, 4], dtype=torch.int32, device=i["q"].device)),
     r"cache_seqlens\[1\] = 4 is smaller than tree_len = 5"),
    (lambda i: dict(i, tree_len=40), "tree_mask is too narrow"),
    (lambda i: dict(i, k_cache=i["k_cache"].half()), "k_cache must be Float, got Half"),
    (lambda i: dict(i, v_cache=i["v_cache"].double()), "v_cache must be Float"),
    (lambda i: dict(i, q=i["q"].double(), k_cache=i["k_cache"].double(), v_cache=i["v_cache"].double()),
     "q must be Half, BFloat16 or Float"),
    (lambda i: dict(i, q=i["q"][..., :12], k_cache=i["k_cache"][..., :12], v_cache=i["v_cache"][..., :12]),
     r"head_dim \(last dimension of q\) must be .*, got 12"),
    (lambda i: dict(i, cache_seqlens=i["cache_seqlens"].long()), "cache_seqlens must be Int"),
    (lambda i: dict(i, q=i["q"][0]), r"q must have shape \[B, Hq, Nq, D\]"),
    (lambda i: dict(i, k_cache=i["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
     "k_cache must be contiguous in its last dimension"),
    (lambda i: dict(i, v_cache=i["v_cache"][:, :, :-1]), "v_cache must have the shape of k_cache"),
    (lambda i: dict(i, tree_mask=i["tree_mask"][:, :4]), r"tree_mask must have shape \[B=2, Nq=5, W\]"),
    (lambda i: dict(i, tree_mask=i["tree_mask"].long()), "tree_mask must be Int"),
    (lambda i: dict(i, tree_len=-1), r"tree_len must be in \[0, S"),
    (lambda i: dict(i, cache_seqlens=i["cache_seqlens"][:1]), r"cache_seqlens must have shape \[B=2\]"),
    (lambda i: dict(i, scale=float("nan")), "scale must be finite"),
    (lambda i: dict(i, window=-1), r"window must be >= 0 \(0: no sliding window\), got -1"),
    (lambda i: dict(i, softcap=-1.0), r"softcap must be finite and >= 0 \(0: no soft-cap\), got -1"),
    (lambda i: dict(i, softcap=float("nan")), "softcap must be finite and >= 0"),
    (lambda i: dict(i, softcap=float("inf")), "softcap must be finite and >= 0"),
    (lambda i: dict(i, window=0, softcap=0.0), None),  # both off
]


@pytest.mark.parametrize("make_bad, message", BAD_INPUTS)
def test_bad_input_raises_clear_error(device, make_bad, message):
    args = make_bad(base_inputs(device))
    if message is None:
        call(args)
        return
    with pytest.raises(ValueError, match=f"tree_attention: .*{message}"):
        call(args)


@pytest.mark.cuda
def test_cuda_device_mismatch_is_a_clear_error():
    inputs = base_inputs("cuda")
    with pytest.raises(ValueError, match="tree_attention: q and cache_seqlens must be on the same device"):
        call(inputs, cache_seqlens=inputs["cache_seqlens"].cpu())
    with pytest.raises(ValueError, match="tree_attention: q and tree_mask must be on the same device"):
        call(inputs, tree_mask=inputs["tree_mask"].cpu())


@pytest.mark.cuda
def test_cuda_without_validation_is_memory_safe():
    inputs = base_inputs("cuda")
    bad = torch.tensor([100000, -7], dtype=torch.int32, device="cuda")
    call(inputs, cache_seqlens=bad, validate=False)
    torch.cuda.synchronize()
    assert_close_scaled(call(inputs), call_reference(inputs), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["auto", "scalar", "mma_v1"])
@pytest.mark.parametrize("batch, prefix, spare", [(1, 20000, 3), (64, 600, 3), (2, 5000, 30000)])
def test_cuda_split_and_unsplit_paths(batch, prefix, spare, kernel, monkeypatch):
    # one long row: many splits merged by log-sum-exp; many rows: a single split;
    # a cache much larger than the rows: splits sized from S, shared by the real length
    monkeypatch.setenv(KERNEL_ENV, kernel)
    gen = torch.Generator().manual_seed(batch)
    inputs = make_tree_attention_inputs(batch=batch, hq=8, hkv=2, nq=16, head_dim=128, prefix_lens=prefix,
                                        dtype=torch.bfloat16, device="cuda", generator=gen, spare_keys=spare)
    assert_close_scaled(call(inputs), call_reference(inputs), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["mma", "mma_v1"])
@pytest.mark.parametrize("nq, group, head_dim, causal", [(60, 4, 128, False), (60, 4, 64, True), (33, 7, 128, False),
                                                         (61, 5, 128, True), (16, 1, 64, False)])
def test_cuda_tensor_core_row_blocks(nq, group, head_dim, causal, kernel, monkeypatch):
    # packed rows G * Nq: 240 and 231 (one 256-row block), 305 (two 256-row blocks)
    # and 16 (one 128-row block): every row layout of the staged kernel, split prefixes
    monkeypatch.setenv(KERNEL_ENV, kernel)
    gen = torch.Generator().manual_seed(nq * group)
    inputs = make_tree_attention_inputs(batch=2, hq=2 * group, hkv=2, nq=nq, head_dim=head_dim,
                                        prefix_lens=[2500, 333], dtype=torch.bfloat16, device="cuda",
                                        generator=gen, tree_shape=None if causal else "random")
    assert_close_scaled(call(inputs), call_reference(inputs), torch.bfloat16)


def test_misaligned_views_fall_back_to_the_scalar_kernel(device):
    # q, k and v start 2 bytes into their storage: no 16-byte loads possible
    gen = torch.Generator().manual_seed(11)
    inputs = make_tree_attention_inputs(batch=2, hq=4, hkv=2, nq=9, head_dim=64, prefix_lens=[70, 5],
                                        dtype=torch.float16, device=device, generator=gen)
    for name in ("q", "k_cache", "v_cache"):
        t = inputs[name]
        shifted = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
        inputs[name] = shifted.copy_(t)
    assert_close_scaled(call(inputs), call_reference(inputs), torch.float16)


@pytest.mark.cuda
def test_cuda_kernel_choice_is_explicit(monkeypatch):
    inputs = base_inputs("cuda", dtype=torch.bfloat16)
    monkeypatch.setenv(KERNEL_ENV, "mma")
    assert_close_scaled(call(inputs), call_reference(inputs), torch.bfloat16)
    with pytest.raises(ValueError, match="tree_attention: JAKIRO_TREE_ATTENTION_KERNEL=mma needs fp16/bf16"):
        call(base_inputs("cuda"))
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(ValueError,
                       match="tree_attention: JAKIRO_TREE_ATTENTION_KERNEL must be auto, scalar, mma or mma_v1"):
        call(inputs)
    monkeypatch.setenv(KERNEL_ENV, "portable")  # a CPU copy's name: auto on CUDA
    assert_close_scaled(call(inputs), call_reference(inputs), torch.bfloat16)


@pytest.mark.parametrize("window, softcap", [(0, 0.0), (3, 0.0), (0, 2.5), (2, 1.5)])
def test_opcheck(device, window, softcap):
    inputs = base_inputs(device)
    args = (inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"], inputs["tree_mask"],
            inputs["tree_len"], inputs["scale"], True, window, softcap)
    torch.library.opcheck(torch.ops.jakiro.tree_attention.default, args)
    causal = (*args[:4], None, 0, inputs["scale"], True, window, softcap)
    torch.library.opcheck(torch.ops.jakiro.tree_attention.default, causal)
    # the schema's defaults: old positional callers (up to validate) keep working
    torch.library.opcheck(torch.ops.jakiro.tree_attention.default, args[:8])


def test_compiles_with_torch_compile():
    inputs = base_inputs()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def attend(q, k, v, lens, mask):
        return ops.tree_attention(q, k, v, lens, mask, tree_len=5) * 2

    out = attend(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"], inputs["tree_mask"])
    torch.testing.assert_close(out, call(inputs) * 2)


def test_compiles_with_window_and_softcap():
    inputs = make_tree_attention_inputs(batch=2, hq=4, hkv=2, nq=5, head_dim=80, prefix_lens=[40, 42])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def attend(q, k, v, lens, mask):
        return ops.tree_attention(q, k, v, lens, mask, tree_len=5, window=4, softcap=30.0)

    out = attend(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"], inputs["tree_mask"])
    torch.testing.assert_close(out, call(inputs, window=4, softcap=30.0))


# ---------------------------------------------------------------------------
# Head sizes, sliding windows and soft-caps.

HEAD_DIMS = list(range(8, 257, 8))
CUDA_HEAD_DIMS = [64, 80, 96, 128, 256]  # with tensor-core kernels of their own


def test_head_dims_per_device():
    assert ops.tree_attention_head_dims("cpu") == tuple(HEAD_DIMS)
    assert ops.tree_attention_head_dims(torch.device("cuda", 0)) == tuple(HEAD_DIMS)
    assert ops.tree_attention_head_dims("meta") == ()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_head_size_matches_reference(device, head_dim, dtype):
    # Odd batch, queries, cache size and GQA group; a tree for half the sizes, causal for the
    # rest; every third size with a window and a soft-cap. On the CPU 64 and 128 run the
    # copies compiled for their size, the others the run-time-size copy; on CUDA the sizes
    # without kernels of their own run the scalar kernel of 64, 128 or 256, padded.
    gen = torch.Generator().manual_seed(head_dim)
    index = head_dim // 8
    inputs = make_tree_attention_inputs(batch=3, hq=6, hkv=2, nq=7, head_dim=head_dim, prefix_lens=[0, 13, 29],
                                        tree_shape="random" if index % 2 else None, dtype=dtype, device=device,
                                        generator=gen)
    if index % 3 == 0:
        inputs.update(window=5, softcap=1.5)
    assert_close_scaled(call(inputs), call_reference(inputs), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", CUDA_HEAD_DIMS)
@pytest.mark.parametrize("causal, window, softcap", [(False, 0, 0.0), (True, 0, 0.0), (False, 3, 2.0),
                                                     (True, 17, 0.0)])
def test_cuda_head_sizes_match_reference(device, head_dim, causal, window, softcap, dtype):
    # The head sizes every device serves, through every CUDA kernel (the device fixture);
    # 65 queries x group 4 = 260 packed rows: two row blocks of every kernel (at D = 256
    # the staged kernel takes one row group per warp, 128 rows per block: three blocks).
    gen = torch.Generator().manual_seed(head_dim + window)
    inputs = make_tree_attention_inputs(batch=3, hq=8, hkv=2, nq=65, head_dim=head_dim, prefix_lens=[0, 40, 300],
                                        tree_shape=None if causal else "random", dtype=dtype, device=device,
                                        generator=gen)
    inputs.update(window=window, softcap=softcap)
    assert_close_scaled(call(inputs), call_reference(inputs), dtype)


def test_unsupported_head_size_names_the_allowed_ones():
    for head_dim in (12, 264, 4):
        inputs = make_tree_attention_inputs(batch=1, hq=2, hkv=1, nq=3, head_dim=head_dim, prefix_lens=5)
        with pytest.raises(ValueError, match=r"tree_attention: head_dim \(last dimension of q\) must be a multiple of "
                                             rf"8 from 8 to 256 on the CPU, got {head_dim}"):
            call(inputs)


@pytest.mark.cuda
def test_cuda_unsupported_head_size_names_the_allowed_ones(monkeypatch):
    for head_dim in (12, 264, 4):
        inputs = make_tree_attention_inputs(batch=1, hq=2, hkv=1, nq=3, head_dim=head_dim, prefix_lens=5,
                                            device="cuda")
        with pytest.raises(ValueError, match=r"tree_attention: head_dim \(last dimension of q\) must be a multiple of "
                                             rf"8 from 8 to 256 on CUDA, got {head_dim}"):
            call(inputs)
    # a size without tensor-core kernels cannot demand them
    monkeypatch.setenv(KERNEL_ENV, "mma")
    inputs = make_tree_attention_inputs(batch=1, hq=2, hkv=1, nq=3, head_dim=72, prefix_lens=5,
                                        dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="JAKIRO_TREE_ATTENTION_KERNEL=mma needs a head size of 64, 80, 96, 128 "
                                         "or 256, got 72"):
        call(inputs)


def test_meta_calls_check_window_and_softcap():
    # The fake implementation's checks read as the kernels' (torch.compile, meta tensors).
    inputs = base_inputs("meta")
    assert call(inputs, window=2, softcap=3.0).device.type == "meta"
    with pytest.raises(ValueError, match=r"tree_attention: window must be >= 0"):
        call(inputs, window=-2)
    with pytest.raises(ValueError, match=r"tree_attention: softcap must be finite and >= 0"):
        call(inputs, softcap=float("inf"))


# window against the chains: 1 (only itself), shorter than the tree's depth (old ancestors and
# the prefix go), about the chain, longer than every chain (no effect)
WINDOWS = [1, 2, 5, 30, 10000]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("shape, nq, tree_len", [("chain", 12, 12), ("binary", 20, 20), ("random", 9, 33)])
def test_tree_window_matches_chain_oracle(device, shape, nq, tree_len, window, dtype):
    # nq < tree_len: the draft's expansion (frontier rows); else the target's verify pass.
    gen = torch.Generator().manual_seed(tree_len + window)
    inputs = make_tree_attention_inputs(batch=3, hq=6, hkv=2, nq=nq, tree_len=tree_len, head_dim=64,
                                        prefix_lens=[0, 3, 25], tree_shape=shape, dtype=dtype, device=device,
                                        generator=gen)
    expected = chain_oracle(inputs, window).to(dtype)
    assert_close_scaled(call(inputs, window=window), expected, dtype)
    assert_close_scaled(call_reference(dict(inputs, window=window)), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("nq, prefix", [(1, 40), (9, 0), (33, 100)])
def test_causal_window_matches_reference(device, nq, prefix, window, dtype):
    gen = torch.Generator().manual_seed(nq + window)
    inputs = make_tree_attention_inputs(batch=2, hq=4, hkv=2, nq=nq, head_dim=96, prefix_lens=[prefix, prefix + 6],
                                        tree_shape=None, dtype=dtype, device=device, generator=gen)
    inputs["window"] = window
    assert_close_scaled(call(inputs), call_reference(inputs), dtype)


def test_window_visibility_by_hand():
    # One row: prefix of 3 keys (positions 0-2), a 4-node tree 0 <- 1 <- 2 and 0 <- 3 at slots
    # 3-6 (positions 3, 4, 5 and 4). Window 2: node 0 keeps key 2 and itself; node 2 only
    # nodes 1 and 2; node 3 nodes 0 and 3.
    parents = torch.tensor([[-1, 0, 1, 0]], dtype=torch.int32)
    mask = reference.build_tree_mask(parents)[0]
    seqlens = torch.tensor([7], dtype=torch.int32)
    visible = reference.tree_attention_visibility(seqlens, mask, 4, 4, 8, window=2)[0].int().tolist()
    assert visible == [[0, 0, 1, 1, 0, 0, 0, 0],
                       [0, 0, 0, 1, 1, 0, 0, 0],
                       [0, 0, 0, 0, 1, 1, 0, 0],
                       [0, 0, 0, 1, 0, 0, 1, 0]]
    causal = reference.tree_attention_visibility(seqlens, None, 0, 3, 8, window=3)[0].int().tolist()
    assert causal == [[0, 0, 1, 1, 1, 0, 0, 0],
                      [0, 0, 0, 1, 1, 1, 0, 0],
                      [0, 0, 0, 0, 1, 1, 1, 0]]


def test_a_query_whose_window_holds_no_key_gets_zeros(device):
    # Frontier rows with no tree bit set: the query sits at position L - 1, so window 1 keeps
    # the last prefix key; with an empty prefix it sees nothing and gets zeros.
    inputs = make_tree_attention_inputs(batch=2, hq=2, hkv=1, nq=3, tree_len=4, head_dim=64, prefix_lens=[0, 6],
                                        device=device)
    inputs["tree_mask"] = torch.zeros_like(inputs["tree_mask"])
    out = call(inputs, window=1).cpu()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    expected = inputs["v_cache"][1, :, 5].cpu().repeat_interleave(2, 0)  # one key: its value
    for i in range(3):
        torch.testing.assert_close(out[1, :, i], expected)
    assert_close_scaled(out, call_reference(dict(inputs, window=1)), torch.float32)


@pytest.mark.parametrize("window", [1, 4, 64])
@pytest.mark.parametrize("nq", [1, 5, 40])
def test_window_is_hugging_face_sliding_window(nq, window):
    # Hugging Face's sliding-window causal mask (transformers.masking_utils), queries at the
    # cache positions kv_len - nq .. kv_len - 1, against the reference's visibility and the op.
    masking_utils = pytest.importorskip("transformers.masking_utils")
    gen = torch.Generator().manual_seed(nq + window)
    inputs = make_tree_attention_inputs(batch=1, hq=4, hkv=2, nq=nq, head_dim=64, prefix_lens=70, tree_shape=None,
                                        spare_keys=0, generator=gen)
    kv_len = inputs["k_cache"].shape[2]
    q_idx = torch.arange(kv_len - nq, kv_len).view(-1, 1)
    kv_idx = torch.arange(kv_len).view(1, -1)
    hf = masking_utils.sliding_window_causal_mask_function(window)(0, 0, q_idx, kv_idx)
    assert hf.shape == (nq, kv_len) and hf.sum(-1).max() == min(window, kv_len)
    ours = reference.tree_attention_visibility(inputs["cache_seqlens"], None, 0, nq, kv_len, window=window)[0]
    assert torch.equal(ours, hf)
    expected = F.scaled_dot_product_attention(inputs["q"].double(), inputs["k_cache"].double(),
                                              inputs["v_cache"].double(), attn_mask=hf, scale=inputs["scale"],
                                              enable_gqa=True)
    assert_close_scaled(call(inputs, window=window), expected.float(), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [0.3, 1.0, 50.0])
@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap_matches_reference(device, causal, window, softcap, dtype):
    # Soft-caps that saturate most scores (0.3), about their size (1.0) and Gemma 2's 50.0.
    gen = torch.Generator().manual_seed(int(softcap * 10) + window)
    inputs = make_tree_attention_inputs(batch=2, hq=6, hkv=3, nq=11, head_dim=128, prefix_lens=[30, 5],
                                        tree_shape=None if causal else "random", dtype=dtype, device=device,
                                        generator=gen)
    inputs["q"] = inputs["q"] * 3  # scores of a few units, so the cap bends them
    inputs.update(window=window, softcap=softcap)
    out = call(inputs)
    assert_close_scaled(out, call_reference(inputs), dtype)
    if softcap < 50:
        assert not torch.allclose(out.cpu().float(), call(inputs, softcap=None).cpu().float(), atol=1e-3)


def test_softcap_bounds_the_scores():
    # Every score becomes softcap * tanh(s / softcap): with a tiny cap the scores are all
    # nearly equal, so each query's output is nearly the mean of the values it sees.
    inputs = make_tree_attention_inputs(batch=1, hq=2, hkv=2, nq=1, head_dim=32, prefix_lens=9, tree_shape=None,
                                        spare_keys=0, generator=torch.Generator().manual_seed(3))
    inputs["q"] = inputs["q"] * 100
    out = call(inputs, softcap=1e-4)
    torch.testing.assert_close(out[0, :, 0], inputs["v_cache"][0, :, :].mean(1), atol=1e-3, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["auto", "scalar", "mma_v1"])
@pytest.mark.parametrize("head_dim, window, causal", [(80, 700, False), (256, 300, True), (128, 1, False),
                                                      (96, 5000, True), (40, 0, False), (200, 900, True)])
def test_cuda_window_over_split_caches(head_dim, window, causal, kernel, monkeypatch):
    # Long caches with a window: blocks start at their rows' first key, splits share the
    # window's span (the staged kernel by the real lengths, the others in fixed parts). 40
    # and 200 run the padded scalar kernel, its split outputs merged at their real size.
    monkeypatch.setenv(KERNEL_ENV, kernel)
    gen = torch.Generator().manual_seed(head_dim + window)
    inputs = make_tree_attention_inputs(batch=2, hq=8, hkv=2, nq=24, head_dim=head_dim, prefix_lens=[6000, 1500],
                                        dtype=torch.bfloat16, device="cuda", generator=gen, spare_keys=200,
                                        tree_shape=None if causal else "random")
    inputs.update(window=window, softcap=30.0)
    assert_close_scaled(call(inputs), call_reference(inputs), torch.bfloat16)


# (head size, window, softcap): a compiled size and run-time sizes, with windows inside the
# tree, across the prefix and past everything
WINDOW_INVARIANCE = [(64, 3, 0.0), (64, 700, 0.0), (80, 5, 20.0), (256, 40, 0.0), (24, 600, 2.0)]


@pytest.mark.parametrize("copy", CPU_COPIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim, window, softcap", WINDOW_INVARIANCE)
@pytest.mark.parametrize("prefixes, nodes, threads", [([37, 900], 16, 2), ([1100, 600], 9, 8)])
def test_cpu_window_rows_equal_one_query_decoding(prefixes, nodes, threads, head_dim, window, softcap, dtype, copy,
                                                  monkeypatch):
    # Batch invariance with a window and a soft-cap, at run-time head sizes too: every tree
    # query equals a one-query causal call over its own keys, contiguous, with the same window.
    monkeypatch.setenv(KERNEL_ENV, copy)
    gen = torch.Generator().manual_seed(nodes + window)
    inputs = make_tree_attention_inputs(batch=2, hq=6, hkv=2, nq=nodes, head_dim=head_dim, prefix_lens=prefixes,
                                        dtype=dtype, generator=gen)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = call(inputs, window=window, softcap=softcap)
        for b in range(2):
            for i in range(nodes):
                keys = path_keys(inputs, b, i)
                k = inputs["k_cache"][b:b + 1, :, keys].contiguous()
                v = inputs["v_cache"][b:b + 1, :, keys].contiguous()
                expected = ops.tree_attention(inputs["q"][b:b + 1, :, i:i + 1], k, v,
                                              torch.tensor([len(keys)], dtype=torch.int32), None, 0, inputs["scale"],
                                              window=window, softcap=softcap)[0, :, 0]
                assert torch.equal(out[b, :, i], expected), f"row {b}, node {i}"
    finally:
        torch.set_num_threads(saved)

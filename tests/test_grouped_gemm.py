"""grouped_gemm: kernels vs the reference, empty experts, offsets validation.

Tolerance: largest absolute error over largest absolute reference value (fp32
reference); fp32 1e-4, fp16 5e-3, bf16 3e-2 (output rounding). On CUDA,
JAKIRO_EXPERT_MLP_KERNEL picks the implementation (auto: tensor-core weight
streaming for T <= 64, the tile kernel up to 512, cuBLAS above; v1: SIMT
weight streaming, then the tile kernel; cublas: cuBLAS at every T); tests
taking the grouped_kernel fixture run every one.
"""
import pytest
import torch

from jakiro import ops, reference
from jakiro.testing import make_expert_offsets

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def make_inputs(tokens, k, n, experts, dtype=torch.float32, device="cpu", empty=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen).to(device, dtype)
    w = (torch.randn(experts, n, k, generator=gen) / k**0.5).to(device, dtype)
    offsets = make_expert_offsets(tokens, experts, empty, gen).to(device)
    return x, w, offsets


def check(device, tokens, k, n, experts, dtype, empty=0, seed=0):
    x, w, offsets = make_inputs(tokens, k, n, experts, dtype, device, empty, seed)
    out = ops.grouped_gemm(x, w, offsets)
    ref = reference.grouped_gemm(x.cpu(), w.cpu(), offsets.cpu())
    assert out.shape == (tokens, n) and out.dtype == dtype and out.device.type == device.type
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    err = (out.double().cpu() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= TOLERANCE[dtype] * max(scale, 1e-6), f"max error {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.parametrize("empty", [0, 1, 3])
@pytest.mark.parametrize("experts", [1, 2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 3, 60, 600])
def test_matches_reference(device, tokens, experts, empty):
    check(device, tokens, 80, 64, experts, torch.float32, empty, seed=tokens * experts + empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k, n", [(64, 80), (576, 1000), (1000, 64), (61, 37)])
@pytest.mark.parametrize("tokens", [5, 40, 200])
def test_sizes_and_dtypes(device, tokens, k, n, dtype):
    check(device, tokens, k, n, 4, dtype, empty=1, seed=k + n)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k, n", [(64, 80), (576, 1000), (1000, 64), (61, 37), (136, 40)])
@pytest.mark.parametrize("tokens", [1, 5, 9, 17, 40, 64, 65, 200, 600])
def test_every_cuda_kernel(grouped_kernel, tokens, k, n, dtype):
    check(torch.device("cuda"), tokens, k, n, 4, dtype, empty=1, seed=k + n + tokens)


@pytest.mark.cuda
@pytest.mark.parametrize("experts", [1, 3, 64])
def test_every_cuda_kernel_many_experts(grouped_kernel, experts):
    for tokens in (1, 50, 700):
        check(torch.device("cuda"), tokens, 128, 96, experts, torch.bfloat16, empty=experts // 3, seed=experts)


def test_large(device):
    check(device, 4097, 576, 1000, 8, torch.bfloat16, empty=2)


def test_float64_on_cpu():
    check(torch.device("cpu"), 50, 24, 16, 3, torch.float64)


def test_all_rows_in_one_expert(device):
    x, w, _ = make_inputs(130, 64, 32, 4, device=device)
    offsets = torch.tensor([0, 0, 130, 130, 130], dtype=torch.int32, device=device)
    torch.testing.assert_close(ops.grouped_gemm(x, w, offsets), x @ w[1].T, rtol=1e-4, atol=1e-4)


def test_empty_input(device):
    x, w, _ = make_inputs(0, 16, 8, 2, device=device)
    offsets = torch.zeros(3, dtype=torch.int32, device=device)
    assert ops.grouped_gemm(x, w, offsets).shape == (0, 8)


def test_opcheck(device):
    x, w, offsets = make_inputs(70, 64, 48, 3, device=device, empty=1)
    torch.library.opcheck(torch.ops.jakiro.grouped_gemm.default, (x, w, offsets, True))


BAD_INPUTS = [
    (lambda x, w, o: (x[0], w, o), r"x must have shape \[T, K\]"),
    (lambda x, w, o: (x, w[0], o), r"w must have shape \[E, N, K\]"),
    (lambda x, w, o: (x, w[..., :5], o), "must equal K = 16"),
    (lambda x, w, o: (x, w.half(), o), "w must be Float"),
    (lambda x, w, o: (x, w, o.long()), "expert_offsets must be Int"),
    (lambda x, w, o: (x, w, o[:2]), "expert_offsets must have E \\+ 1 = 4 entries"),
    (lambda x, w, o: (x, w, torch.tensor([1, 3, 5, 10], dtype=torch.int32)), r"expert_offsets\[0\] = 1"),
    (lambda x, w, o: (x, w, torch.tensor([0, 6, 5, 10], dtype=torch.int32)), "non-decreasing"),
    (lambda x, w, o: (x, w, torch.tensor([0, 3, 5, 9], dtype=torch.int32)), r"expert_offsets\[3\] = 9 but must equal T = 10"),
    (lambda x, w, o: (x, w, torch.tensor([0, 3, 5, 11], dtype=torch.int32)), "must equal T = 10"),
]


@pytest.mark.parametrize("make_bad, message", BAD_INPUTS)
def test_bad_input_raises_clear_error(device, make_bad, message):
    x, w, offsets = make_inputs(10, 16, 8, 3)
    args = [t.to(device) for t in make_bad(x, w, offsets)]
    with pytest.raises(ValueError, match=f"grouped_gemm: .*{message}"):
        ops.grouped_gemm(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [10, 300, 700])
def test_cuda_without_validation_is_memory_safe(grouped_kernel, tokens):
    x, w, _ = make_inputs(tokens, 64, 32, 3, device="cuda")
    for bad in ([5, -100, 2**30, 7], [0, 2**31 - 1, -(2**31), tokens]):
        ops.grouped_gemm(x, w, torch.tensor(bad, dtype=torch.int32, device="cuda"), validate=False)
    torch.cuda.synchronize()
    x, w, offsets = make_inputs(tokens, 64, 32, 3, device="cuda", empty=1)
    torch.testing.assert_close(ops.grouped_gemm(x, w, offsets), reference.grouped_gemm(x, w, offsets), rtol=1e-4, atol=1e-4)

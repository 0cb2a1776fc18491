"""linear: the CPU kernel vs the float64 reference, batch invariance, layouts, the
at::linear fallbacks, autograd, and bad input.

Tolerance: largest absolute error over largest absolute reference value; fp32 1e-5,
bf16 8e-3 (the kernel sums in fp32 along K; bf16 output rounds). The CPU paths tested are those this CPU can run
(torch.backends.cpu.get_cpu_capability(), AVX512_BF16, AMX): amx, avx512bf16, avx512 and avx2
are forced at every row count, auto switches to at::linear above 128 rows (bfloat16 weights: 64),
aten always calls it. avx512bf16 runs float32 problems on the avx512 copy; amx runs bfloat16
problems whose K is not a multiple of 32 on the avx512bf16 copy, float32 on the avx512 one.
"""
import pytest
import torch
import torch.nn.functional as F

from jakiro import ops, reference

_CAPABILITY = torch.backends.cpu.get_cpu_capability()
_HAS_AVX512_BF16 = _CAPABILITY == "AVX512" and torch.cpu._is_avx512_bf16_supported()
_HAS_AMX = _HAS_AVX512_BF16 and torch.cpu._is_amx_tile_supported()
KERNEL_PATHS = ((["amx"] if _HAS_AMX else []) + (["avx512bf16"] if _HAS_AVX512_BF16 else []) +
                [name for name, needs in (("avx512", ("AVX512",)), ("avx2", ("AVX2", "AVX512")))
                 if _CAPABILITY in needs])
CPU_PATHS = KERNEL_PATHS + ["auto", "aten"]


@pytest.fixture(params=CPU_PATHS)
def cpu_path(request, monkeypatch):
    monkeypatch.setenv("JAKIRO_LINEAR_KERNEL", request.param)
    return request.param


def make(rows, k, n, bias=True, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) / max(k, 1) ** 0.5).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    return x, w, b


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


def check(out, x, w, b, tolerance=None):
    tolerance = tolerance or TOLERANCE[x.dtype]
    ref = reference.linear(x.cpu(), w.cpu(), None if b is None else b.cpu())
    assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    err = (out.double().cpu() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= tolerance * max(scale, 1e-6), f"max error {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 7, 15, 16, 17, 33, 64, 576, 1000])
@pytest.mark.parametrize("rows, n", [(1, 1), (2, 3), (5, 4), (6, 5), (7, 17), (13, 192), (48, 33), (49, 9),
                                     (100, 70), (129, 5)])
def test_matches_reference(cpu_path, rows, n, k, bias, dtype):
    x, w, b = make(rows, k, n, bias, dtype, seed=rows * 1000 + n + k)
    check(ops.linear(x, w, b), x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_batch_invariant(path, dtype, monkeypatch):
    # Every output element is summed in the same order whatever the other rows are,
    # so a tree verify and a one-token step agree bit for bit.
    monkeypatch.setenv("JAKIRO_LINEAR_KERNEL", path)
    x, w, b = make(37, 576, 203, dtype=dtype, seed=3)
    whole = ops.linear(x, w, b)
    for start, count in [(0, 1), (5, 1), (36, 1), (3, 6), (10, 13), (30, 7)]:
        part = ops.linear(x[start:start + count], w, b)
        assert torch.equal(part, whole[start:start + count]), (start, count)


@pytest.mark.skipif(not _HAS_AMX, reason="needs a CPU with AMX-BF16")
@pytest.mark.parametrize("bias", [True, False])
def test_amx_rows_agree_at_every_count(bias, monkeypatch):
    # The AMX copy puts up to 64 rows of x side by side in its B tiles (zeros past M) and
    # takes more in passes of 64: each output is still its own row's sum, bit for bit, at
    # every row count, over strided rows of x and W and a last block of fewer than 16
    # weight rows; and it matches the reference.
    monkeypatch.setenv("JAKIRO_LINEAR_KERNEL", "amx")
    x, w, b = make(70, 96, 37, bias, torch.bfloat16, seed=11)
    wide = torch.zeros(37, 128, dtype=torch.bfloat16)
    wide[:, 16:112] = w
    w_view = wide[:, 16:112]                        # weight rows 128 apart
    x_wide = torch.zeros(70, 160, dtype=torch.bfloat16)
    x_wide[:, :96] = x
    x_view = x_wide[:, :96]                         # rows of x 160 apart
    whole = ops.linear(x_view, w_view, b)
    check(whole, x, w, b)
    for start, count in [(0, 1), (69, 1), (3, 16), (10, 17), (0, 64), (5, 65)]:
        assert torch.equal(ops.linear(x[start:start + count], w, b), whole[start:start + count]), (start, count)


def test_leading_dims_and_strided_layouts(cpu_path):
    x, w, b = make(24, 80, 21, seed=4)
    check(ops.linear(x.view(2, 3, 4, 80), w, b), x.view(2, 3, 4, 80), w, b)
    rows = x[::3]                                   # rows 240 floats apart
    check(ops.linear(rows, w, b), rows, w, b)
    wide = torch.randn(21, 100)
    w_view = wide[:, 10:90]                         # weight rows 100 apart
    check(ops.linear(x, w_view, b), x, w_view, b)
    w_t = torch.randn(80, 21).t()                   # K not unit-stride: copied first
    check(ops.linear(x, w_t, b), x, w_t, b)
    x_t = torch.randn(80, 24).t()
    check(ops.linear(x_t, w, b), x_t, w, b)
    vector = x[0]                                   # 1-D x
    check(ops.linear(vector, w, b), vector, w, b)


def test_bfloat16_rounds_like_torch(cpu_path):
    # fp32 sums rounded once to bf16 (nearest even); specials pass through.
    x, w, b = make(9, 64, 12, dtype=torch.bfloat16, seed=9)
    x[0, 0], x[1, 0], x[2, 0] = float("inf"), float("nan"), -float("inf")
    ref = (x.float() @ w.float().T + b.float()).to(torch.bfloat16)
    out = ops.linear(x, w, b)
    assert torch.equal(out.isnan(), ref.isnan())
    finite = ~ref.isnan()
    scale = ref[finite & ref.isfinite()].float().abs().max()
    assert torch.equal(out[finite].isinf(), ref[finite].isinf())
    close = (out.float() - ref.float())[finite & ref.isfinite()].abs().max()
    assert close <= 8e-3 * scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes_match_torch(cpu_path, dtype):
    x, w, b = make(9, 40, 12, dtype=dtype, seed=5)
    assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))


def test_empty(cpu_path):
    x, w, b = make(0, 16, 5)
    assert ops.linear(x, w, b).shape == (0, 5)
    x, w, b = make(3, 0, 5)
    assert torch.equal(ops.linear(x, w, b), b.expand(3, 5))


def test_gradients():
    x, w, b = make(4, 7, 3, dtype=torch.float64, seed=6)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(ops.linear, inputs)
    x2, w2, _ = make(4, 7, 3, dtype=torch.float64, seed=6)
    assert torch.autograd.gradcheck(ops.linear, (x2.requires_grad_(), w2.requires_grad_()))


def test_opcheck():
    x, w, b = make(5, 24, 7, seed=7)
    torch.library.opcheck(torch.ops.jakiro.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.jakiro.linear.default, (x, w, None))


@pytest.mark.parametrize("args, message", [
    (lambda x, w, b: (x[:, :10], w, b), "x's last dimension \\(10\\) must equal weight's K"),
    (lambda x, w, b: (x, w.unsqueeze(0), b), "weight must have shape \\[N, K\\]"),
    (lambda x, w, b: (x, w, b[:2]), "bias must have weight's N = 5 entries, got 2"),
    (lambda x, w, b: (x, w, b.view(5, 1)), "bias must have shape \\[N\\]"),
    (lambda x, w, b: (x, w.double(), b), "weight must have x's dtype"),
    (lambda x, w, b: (x, w, b.double()), "bias must have x's dtype"),
    (lambda x, w, b: (x.int(), w.int(), None), "x must be a floating-point tensor"),
    (lambda x, w, b: (x[0, 0], w, b), "x must have shape \\[..., K\\]"),
])
def test_bad_input(args, message):
    x, w, b = make(3, 16, 5)
    with pytest.raises(ValueError, match="linear: " + message):
        ops.linear(*args(x, w, b))


def test_bad_environment(monkeypatch):
    monkeypatch.setenv("JAKIRO_LINEAR_KERNEL", "fastest")
    x, w, b = make(3, 16, 5)
    with pytest.raises(ValueError, match="linear: environment variable JAKIRO_LINEAR_KERNEL must be"):
        ops.linear(x, w, b)


@pytest.mark.cuda
def test_cuda_matches_torch():
    x, w, b = make(7, 64, 33, device="cuda", seed=8)
    check(ops.linear(x, w, b), x, w, b, tolerance=1e-4)
    with pytest.raises(ValueError, match="linear: x and weight must be on the same device"):
        ops.linear(x, w.cpu(), b)

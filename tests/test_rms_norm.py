"""rms_norm: the kernel vs the reference (Hugging Face's formula) on awkward sizes, batch
invariance, layouts, special values and bad input.

Tolerance: float32 within 1e-6 relative (the sum of squares runs in another order); bfloat16
and float16 within one rounding step of the output (the same sum may round the normalised
value to the neighbouring half-precision number).
"""
import pytest
import torch

from jakiro import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def make(shape, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
    w = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype).to(device)
    return x, w


def check(out, x, w, eps):
    expected = reference.rms_norm(x, w, eps)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    scale = expected.float().abs().max().clamp(min=1e-6)
    err = ((out.float() - expected.float()).abs().max() / scale).item()
    assert err <= TOLERANCE[x.dtype], f"max error {err:.3g} relative to output scale"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (2, 4, 9), (1, 576), (17, 576), (3, 1000), (300, 64)])
def test_matches_reference(device, shape, dtype):
    x, w = make(shape, dtype, device, seed=len(shape) + shape[-1])
    check(ops.rms_norm(x, w, 1e-5), x, w, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_are_batch_invariant(dtype):
    # A row's output is bit for bit the same alone as among 1, 8 or 700 others (what keeps tree
    # verification exact), with any thread count.
    x, w = make((700, 576), dtype, seed=3)
    full = ops.rms_norm(x, w, 1e-6)
    threads = torch.get_num_threads()
    try:
        for n in (1, 8, 64):
            torch.set_num_threads(1 if n == 8 else threads)
            assert torch.equal(ops.rms_norm(x[5:5 + n], w, 1e-6), full[5:5 + n])
    finally:
        torch.set_num_threads(threads)


def test_eps_and_strided_input():
    x, w = make((6, 40), seed=5)
    check(ops.rms_norm(x, w, 0.5), x, w, 0.5)
    view = make((40, 6), seed=6)[0].t()                  # not contiguous
    check(ops.rms_norm(view, w, 1e-6), view, w, 1e-6)
    assert torch.equal(ops.rms_norm(view, w, 1e-6), ops.rms_norm(view.contiguous(), w, 1e-6))


def test_zero_rows_and_special_values():
    x, w = make((3, 16), seed=7)
    assert ops.rms_norm(x[:0], w, 1e-6).shape == (0, 16)
    x[0] = 0                                             # all zero: rsqrt(eps) times zero
    x[1, 3] = float("nan")
    out = ops.rms_norm(x, w, 1e-6)
    assert torch.equal(out[0], torch.zeros(16)) and out[1].isnan().all() and out[2].isfinite().all()


def test_opcheck():
    x, w = make((5, 24), seed=8)
    torch.library.opcheck(torch.ops.jakiro.rms_norm.default, (x, w, 1e-5))


@pytest.mark.parametrize("args, message", [
    (lambda x, w: (x, w[:5], 1e-6), "weight must have x's last dimension H = 16 entries, got 5"),
    (lambda x, w: (x, w.view(4, 4), 1e-6), "weight must have shape \\[H\\]"),
    (lambda x, w: (x, w.double(), 1e-6), "weight must have x's dtype"),
    (lambda x, w: (x.double(), w.double(), 1e-6), "x must be float32, bfloat16 or float16"),
    (lambda x, w: (x[0, 0], w, 1e-6), "x must have shape \\[..., H\\]"),
    (lambda x, w: (x, w, -1.0), "eps must be a finite number >= 0"),
    (lambda x, w: (x, w, float("nan")), "eps must be a finite number >= 0"),
])
def test_bad_input(args, message):
    x, w = make((3, 16))
    with pytest.raises(ValueError, match="rms_norm: " + message):
        ops.rms_norm(*args(x, w))


@pytest.mark.cuda
def test_cuda_device_mismatch_is_a_clear_error():
    x, w = make((3, 16), device="cuda")
    with pytest.raises(ValueError, match="rms_norm: x and weight must be on the same device"):
        ops.rms_norm(x, w.cpu(), 1e-6)

"""expert_mlp: kernels vs the reference, autograd, opcheck and bad input, for both gate
activations (silu: SwiGLU, gelu_tanh: GeGLU with the tanh-approximated GELU).

Tolerances (documented in one place): the largest absolute error divided by the
largest absolute reference value, with the reference computed in fp32 (fp64 for
float64). fp32 1e-4 (reduction order only); fp16 5e-3 and bf16 3e-2: the output
is rounded to the dtype (2^-11 / 2^-8 relative), and on CUDA the SwiGLU
activations are rounded to it between the two products.
On CUDA, JAKIRO_EXPERT_MLP_KERNEL picks the implementation (auto: tensor-core
weight streaming for T <= 64, cuBLAS above; v1: SIMT weight streaming with 8-
or 32-position tiles, WMMA tile kernel above; cublas: cuBLAS at every T). The
tests taking the grouped_kernel fixture run every one of them, with T around
each switch point and each tile size, with and without 16-byte loads.
"""
import math

import pytest
import torch

from jakiro import ops, reference
from jakiro.testing import COEFF_PATTERNS, make_coeff, make_expert_mlp_inputs

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


ACTIVATIONS = ["silu", "gelu_tanh"]


def check(device, tokens, hidden, inter, experts, heads, pattern, dtype, seed=0, activation="silu"):
    gen = torch.Generator().manual_seed(seed)
    x, wgu, wd, coeff = make_expert_mlp_inputs(tokens, hidden, inter, experts, heads, pattern, dtype, device, gen)
    out = ops.expert_mlp(x, wgu, wd, coeff, activation)
    assert out.device.type == device.type
    ref = reference.expert_mlp(x.cpu(), wgu.cpu(), wd.cpu(), coeff.cpu(), activation)
    assert out.shape == (heads, tokens, hidden) and out.dtype == dtype
    scale = ref.double().abs().max().item()
    err = (out.double().cpu() - ref.double()).abs().max().item()
    assert err <= TOLERANCE[dtype] * max(scale, 1e-6), f"max error {err:.3g} vs max |ref| {scale:.3g}"
    return out, ref


def gelu_tanh_by_formula(g):
    """0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), written out."""
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


def expert_mlp_by_loops(x, w_gate_up, w_down, coeff, activation="silu"):
    """An independent oracle: token by token, expert by expert, in float64."""
    x, w_gate_up, w_down, coeff = (t.double() for t in (x, w_gate_up, w_down, coeff))
    tokens, heads, experts = coeff.shape
    inter = w_down.shape[2]
    out = torch.zeros(heads, tokens, x.shape[1], dtype=torch.float64)
    for t in range(tokens):
        for e in range(experts):
            gate = w_gate_up[e, :inter] @ x[t]
            up = w_gate_up[e, inter:] @ x[t]
            act = gate * torch.sigmoid(gate) if activation == "silu" else gelu_tanh_by_formula(gate)
            y = w_down[e] @ (act * up)
            for r in range(heads):
                out[r, t] += coeff[t, r, e] * y
    return out


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("pattern", COEFF_PATTERNS)
def test_reference_matches_loops(pattern, activation):
    inputs = make_expert_mlp_inputs(7, 12, 10, 3, 2, pattern, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(reference.expert_mlp(*inputs, activation).double(),
                               expert_mlp_by_loops(*inputs, activation), rtol=1e-5, atol=1e-6)


def test_gelu_tanh_is_torch_gelu_tanh():
    g = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    torch.testing.assert_close(gelu_tanh_by_formula(g), torch.nn.functional.gelu(g, approximate="tanh"))


def test_activations_differ():
    # The activation really reaches the kernel (gelu_tanh and silu differ by O(1) here).
    inputs = make_expert_mlp_inputs(9, 32, 24, 2, 2, "dense", generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(ops.expert_mlp(*inputs, "silu"), ops.expert_mlp(*inputs, "gelu_tanh"), atol=1e-3)


# Odd T, H, I, E and R everywhere (no 16-byte rows, no whole tiles); T either side of 64.
AWKWARD_SIZES = [(1, 23, 17, 3, 1), (7, 61, 37, 3, 3), (33, 45, 77, 5, 1), (65, 31, 19, 1, 3), (131, 77, 53, 7, 5)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("tokens, hidden, inter, experts, heads", AWKWARD_SIZES)
def test_activations_on_awkward_sizes(device, tokens, hidden, inter, experts, heads, dtype, activation):
    if dtype == torch.float64 and device.type == "cuda":
        pytest.skip("float64 is CPU only")
    pattern = ["signed", "top2", "zero_rows", "top1"][tokens % 4]
    check(device, tokens, hidden, inter, experts, heads, pattern, dtype, seed=tokens + hidden, activation=activation)


def test_hugging_face_activation_name_is_an_alias(device):
    inputs = make_expert_mlp_inputs(11, 32, 24, 3, 2, "top2", device=device)
    torch.testing.assert_close(ops.expert_mlp(*inputs, activation="gelu_pytorch_tanh"),
                               ops.expert_mlp(*inputs, activation="gelu_tanh"), rtol=0, atol=0)
    assert ops.EXPERT_MLP_ACTIVATIONS["gelu_pytorch_tanh"] == "gelu_tanh"
    assert set(ops.EXPERT_MLP_ACTIVATIONS.values()) == {"silu", "gelu_tanh"}


def test_most_routing_heads(device):
    check(device, 40, 64, 48, 3, 8, "signed", torch.float32)


@pytest.mark.parametrize("pattern", COEFF_PATTERNS)
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("experts", [1, 2, 4, 8])
def test_routing_grid(device, experts, heads, pattern):
    check(device, 60, 80, 64, experts, heads, pattern, torch.float32, seed=experts * 10 + heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden, inter", [(64, 80), (576, 64), (80, 1000)])
@pytest.mark.parametrize("tokens", [1, 3, 60, 600])
def test_sizes_and_dtypes(device, tokens, hidden, inter, dtype):
    pattern = "top1" if tokens % 2 else "signed"
    check(device, tokens, hidden, inter, 4, 2, pattern, dtype, seed=tokens + hidden)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large(device, dtype):
    check(device, 4097, 1000, 576, 4, 2, "top2", dtype)


@pytest.mark.parametrize("tokens", [5, 40, 65, 200])
def test_misaligned_rows_use_the_scalar_path(device, tokens):
    # H = 61, I = 37: no row is 16-byte aligned, so the kernels fall back to scalar loads.
    check(device, tokens, 61, 37, 3, 2, "top2", torch.float16, seed=tokens)
    check(device, tokens, 61, 37, 3, 2, "dense", torch.float32, seed=tokens)


def test_all_zero_coefficients_give_exact_zeros(device):
    x, wgu, wd, coeff = make_expert_mlp_inputs(70, 64, 64, 2, 2, device=device)
    out = ops.expert_mlp(x, wgu, wd, torch.zeros_like(coeff))
    assert torch.equal(out.cpu(), torch.zeros(2, 70, 64))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden, inter", [(64, 80), (576, 40), (136, 1000), (61, 37)])
@pytest.mark.parametrize("tokens", [1, 7, 8, 9, 16, 17, 33, 64, 65, 300])
def test_every_cuda_kernel(grouped_kernel, tokens, hidden, inter, dtype):
    # H and I not multiples of the 32/16-row blocks or of the 128-wide k stages; 61 and 37
    # forbid 16-byte loads (the scalar fallbacks).
    pattern = ["top2", "signed", "zero_rows"][tokens % 3]
    check(torch.device("cuda"), tokens, hidden, inter, 3, 2, pattern, dtype, seed=tokens + hidden)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden, inter", [(64, 80), (136, 1000), (61, 37)])
@pytest.mark.parametrize("tokens", [1, 8, 9, 33, 64, 65, 300])
def test_every_cuda_kernel_gelu_tanh(grouped_kernel, tokens, hidden, inter, dtype):
    # The GeGLU epilogues of every kernel: both stream tile sizes, mma_stream's NT choices,
    # the tile kernel and cuBLAS, with and without 16-byte loads.
    pattern = ["top2", "signed", "zero_rows"][tokens % 3]
    check(torch.device("cuda"), tokens, hidden, inter, 3, 2, pattern, dtype, seed=tokens + hidden,
          activation="gelu_tanh")


@pytest.mark.cuda
@pytest.mark.parametrize("experts", [1, 2, 8])
def test_every_cuda_kernel_routing(grouped_kernel, experts):
    for tokens in (5, 60, 130):
        check(torch.device("cuda"), tokens, 64, 48, experts, 2, "top1", torch.bfloat16, seed=experts)


@pytest.mark.cuda
def test_unknown_kernel_name_raises(monkeypatch):
    monkeypatch.setenv("JAKIRO_EXPERT_MLP_KERNEL", "fastest")
    x, wgu, wd, coeff = make_expert_mlp_inputs(4, 16, 8, 2, 2, device="cuda")
    with pytest.raises(ValueError, match="expert_mlp: environment variable JAKIRO_EXPERT_MLP_KERNEL"):
        ops.expert_mlp(x, wgu, wd, coeff)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [10, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skipped_experts_are_not_run_by_any_cuda_kernel(grouped_kernel, tokens, dtype):
    x, wgu, wd, _ = make_expert_mlp_inputs(tokens, 64, 32, 2, 2, dtype=dtype, device="cuda")
    wd[1] = float("nan")
    coeff = make_coeff("dense", tokens, 2, 2).cuda()
    coeff[:, :, 1] = 0
    out = ops.expert_mlp(x, wgu, wd, coeff)
    ref = reference.expert_mlp(x, wgu[:1], wd[:1], coeff[:, :, :1])
    assert (out.float() - ref.float()).abs().max() <= TOLERANCE[dtype] * ref.float().abs().max()


def test_skipped_experts_are_not_run(device):
    # An expert whose output is NaN must not leak into tokens that are not routed to it.
    x, wgu, wd, _ = make_expert_mlp_inputs(80, 64, 32, 2, 2, device=device)
    wd[1] = float("nan")
    coeff = make_coeff("dense", 80, 2, 2).to(device)
    coeff[:, :, 1] = 0
    out = ops.expert_mlp(x, wgu, wd, coeff)
    ref = reference.expert_mlp(x[:, :], wgu[:1], wd[:1], coeff[:, :, :1])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_non_contiguous_inputs(device):
    x, wgu, wd, coeff = make_expert_mlp_inputs(90, 64, 48, 3, 2, "top2", device=device)
    wide = torch.randn(180, 64, device=device)[::2]
    wide.copy_(x)
    coeff_t = coeff.transpose(0, 1).contiguous().transpose(0, 1)
    out = ops.expert_mlp(wide, wgu, wd, coeff_t)
    torch.testing.assert_close(out, ops.expert_mlp(x, wgu, wd, coeff), rtol=0, atol=0)


def test_half_coefficients(device):
    x, wgu, wd, coeff = make_expert_mlp_inputs(20, 64, 64, 2, 2, dtype=torch.bfloat16, device=device)
    out = ops.expert_mlp(x, wgu, wd, coeff.bfloat16())
    ref = reference.expert_mlp(x, wgu, wd, coeff.bfloat16())
    assert (out.float() - ref.float()).abs().max() <= 3e-2 * ref.float().abs().max()


def test_empty_tokens(device):
    x, wgu, wd, coeff = make_expert_mlp_inputs(0, 16, 8, 2, 2, device=device)
    assert ops.expert_mlp(x, wgu, wd, coeff).shape == (2, 0, 16)


@pytest.mark.parametrize("pattern", ["dense", "zero_rows", "top1", "signed"])
def test_gradcheck_float64(pattern):
    gen = torch.Generator().manual_seed(1)
    inputs = make_expert_mlp_inputs(5, 6, 4, 3, 2, pattern, torch.float64, "cpu", gen)
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(torch.ops.jakiro.expert_mlp, inputs)


@pytest.mark.parametrize("pattern", ["dense", "zero_rows", "top1", "signed"])
def test_gradcheck_float64_gelu_tanh(pattern):
    gen = torch.Generator().manual_seed(6)
    # Larger weights than make_expert_mlp_inputs' so the gates reach GELU's curved region (|g| ~ 1-3).
    x, wgu, wd, coeff = make_expert_mlp_inputs(5, 6, 4, 3, 2, pattern, torch.float64, "cpu", gen)
    inputs = [t.requires_grad_() for t in (x, 2 * wgu, wd, coeff)]
    assert torch.autograd.gradcheck(lambda *a: torch.ops.jakiro.expert_mlp(*a, "gelu_tanh"), inputs)
    assert torch.autograd.gradcheck(lambda *a: ops.expert_mlp(*a, activation="gelu_pytorch_tanh"), inputs)


def test_gelu_tanh_slope_far_out():
    # The backward's closed-form slope against autograd of torch's gelu, tails included.
    g = torch.linspace(-30, 30, 6001, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.gelu(g, approximate="tanh").sum().backward()
    act, slope = ops._expert_mlp_activation_and_slope(g.detach(), "gelu_tanh")
    torch.testing.assert_close(act, torch.nn.functional.gelu(g.detach(), approximate="tanh"))
    torch.testing.assert_close(slope, g.grad)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("pattern", ["top2", "signed"])
def test_training_step_matches_reference_autograd(device, pattern, activation):
    gen = torch.Generator().manual_seed(2)
    inputs = make_expert_mlp_inputs(70, 64, 80, 4, 2, pattern, torch.float32, device, gen)
    mine = [t.clone().requires_grad_() for t in inputs]
    theirs = [t.clone().requires_grad_() for t in inputs]
    grad = torch.randn(2, 70, 64, generator=gen).to(device)
    out = ops.expert_mlp(*mine, activation=activation)
    (out * grad).sum().backward()
    ref = reference.expert_mlp(*theirs, activation=activation)
    (ref * grad).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for name, a, b in zip(["x", "w_gate_up", "w_down", "coeff"], mine, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bf16_training_step_on_cuda(activation):
    gen = torch.Generator().manual_seed(3)
    inputs = make_expert_mlp_inputs(300, 128, 96, 2, 2, "dense", torch.bfloat16, "cuda", gen)
    mine = [t.clone().requires_grad_() for t in inputs]
    theirs = [t.float().clone().requires_grad_() for t in inputs]
    ops.expert_mlp(*mine, activation=activation).float().sum().backward()
    reference.expert_mlp(*theirs, activation=activation).sum().backward()
    for a, b in zip(mine, theirs):
        err = (a.grad.float() - b.grad).abs().max()
        assert err <= 3e-2 * b.grad.abs().max(), err


def test_opcheck(device):
    inputs = make_expert_mlp_inputs(33, 64, 40, 3, 2, "top2", device=device)
    torch.library.opcheck(torch.ops.jakiro.expert_mlp.default, inputs)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_with_activation(device, activation):
    inputs = make_expert_mlp_inputs(13, 24, 20, 3, 2, "signed", device=device)
    torch.library.opcheck(torch.ops.jakiro.expert_mlp.default, (*inputs, activation))
    inputs = [t.requires_grad_() for t in inputs]
    torch.library.opcheck(torch.ops.jakiro.expert_mlp.default, (*inputs, activation))


def test_schema_has_the_activation_with_its_default():
    arg = torch.ops.jakiro.expert_mlp.default._schema.arguments[-1]
    assert arg.name == "activation" and str(arg.type) == "str" and arg.default_value == "silu"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_autocast_passes_the_activation_through(device, activation):
    x, wgu, wd, coeff = make_expert_mlp_inputs(9, 32, 24, 2, 2, "signed", device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = ops.expert_mlp(x, wgu, wd, coeff, activation)
    assert out.dtype == torch.bfloat16
    expected = ops.expert_mlp(x.bfloat16(), wgu.bfloat16(), wd.bfloat16(), coeff, activation)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_compiles_with_torch_compile():
    inputs = make_expert_mlp_inputs(10, 32, 16, 2, 2, "signed")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def mlp(x, wgu, wd, coeff):
        return torch.ops.jakiro.expert_mlp(x, wgu, wd, coeff) * 2

    torch.testing.assert_close(mlp(*inputs), 2 * reference.expert_mlp(*inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_compiles_with_torch_compile(activation):
    mine = [t.requires_grad_() for t in make_expert_mlp_inputs(10, 32, 16, 2, 2, "top1")]
    theirs = [t.detach().clone().requires_grad_() for t in mine]

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=True)
    def loss(x, wgu, wd, coeff):
        return ops.expert_mlp(x, wgu, wd, coeff, activation).square().sum()

    loss(*mine).backward()
    reference.expert_mlp(*theirs, activation).square().sum().backward()
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [10, 300])
def test_cuda_graph_capture(grouped_kernel, tokens):
    # No host synchronisation: the op must capture and replay, with new routing each time.
    x, wgu, wd, coeff = make_expert_mlp_inputs(tokens, 128, 64, 4, 2, "top2", torch.bfloat16, "cuda")
    ops.expert_mlp(x, wgu, wd, coeff)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.expert_mlp(x, wgu, wd, coeff)
    coeff.copy_(make_coeff("top1", tokens, 2, 4).cuda())
    graph.replay()
    ref = reference.expert_mlp(x, wgu, wd, coeff)
    assert (out.float() - ref.float()).abs().max() <= 3e-2 * ref.float().abs().max()


def _inputs():
    return make_expert_mlp_inputs(6, 16, 8, 2, 2)


BAD_INPUTS = [
    (lambda x, g, d, c: (x[0], g, d, c), r"x must have shape \[T, H\]"),
    (lambda x, g, d, c: (x, g[0], d, c), r"w_gate_up must have shape \[E, 2I, H\]"),
    (lambda x, g, d, c: (x, g, d[0], c), r"w_down must have shape \[E, H, I\]"),
    (lambda x, g, d, c: (x, g, d, c[0]), r"coeff must have shape \[T, R, E\]"),
    (lambda x, g, d, c: (x[:, :15], g, d, c), "must equal H = 15"),
    (lambda x, g, d, c: (x, g[:, :15], d, c), "middle dimension must be 2I"),
    (lambda x, g, d, c: (x, g, d[..., :7], c), "must equal I = 8"),
    (lambda x, g, d, c: (x, g, d[:1], c), "w_down has 1 experts but w_gate_up has 2"),
    (lambda x, g, d, c: (x, g, d[:, :15], c), r"must be \[E, H, I\] with H = 16"),
    (lambda x, g, d, c: (x, g, d, c[:5]), "with T = 6"),
    (lambda x, g, d, c: (x, g, d, c[..., :1]), "with E = 2"),
    (lambda x, g, d, c: (x, g, d, c.repeat(1, 5, 1)), "R = 10 routing heads"),
    (lambda x, g, d, c: (x.half(), g, d, c), "w_gate_up must be Half"),
    (lambda x, g, d, c: (x, g, d.double(), c), "w_down must be Float"),
    (lambda x, g, d, c: (x.half(), g.half(), d.half(), c.double()), "coeff must be float32 or x's dtype"),
    (lambda x, g, d, c: (x.int(), g.int(), d.int(), c), "x must be float16, bfloat16, float32 or float64"),
]


@pytest.mark.parametrize("make_bad, message", BAD_INPUTS)
def test_bad_input_raises_clear_error(device, make_bad, message):
    args = [t.to(device) for t in make_bad(*_inputs())]
    with pytest.raises(ValueError, match=f"expert_mlp: .*{message}"):
        ops.expert_mlp(*args)


@pytest.mark.parametrize("bad", ["relu", "gelu", "SILU", "", "gelu_new"])
def test_bad_activation_raises_naming_the_allowed_values(device, bad):
    inputs = [t.to(device) for t in _inputs()]
    with pytest.raises(ValueError, match=f'expert_mlp: activation must be "silu" or "gelu_tanh", got "{bad}"'):
        torch.ops.jakiro.expert_mlp(*inputs, bad)
    # The wrapper also lists the Hugging Face alias it accepts.
    with pytest.raises(ValueError, match="expert_mlp: activation must be one of 'silu', 'gelu_tanh', "
                                         f"'gelu_pytorch_tanh', got '{bad}'"):
        ops.expert_mlp(*inputs, activation=bad)


def test_bad_activation_raises_in_the_fake():
    # Meta tensors route the call to the fake implementation, which must reject it alike.
    inputs = [t.to("meta") for t in _inputs()]
    assert torch.ops.jakiro.expert_mlp(*inputs, "gelu_tanh").shape == (2, 6, 16)
    with pytest.raises(ValueError, match='expert_mlp: activation must be "silu" or "gelu_tanh", got "tanh"'):
        torch.ops.jakiro.expert_mlp(*inputs, "tanh")
    # The op takes only its own names; the alias is the wrapper's.
    with pytest.raises(ValueError, match="activation must be"):
        torch.ops.jakiro.expert_mlp(*_inputs(), "gelu_pytorch_tanh")


def test_bad_activation_type_raises():
    with pytest.raises(ValueError, match="expert_mlp: activation must be one of"):
        ops.expert_mlp(*_inputs(), activation=None)


@pytest.mark.cuda
def test_mixed_devices_raise():
    x, g, d, c = _inputs()
    with pytest.raises(ValueError, match="expert_mlp: x and coeff must be on the same device"):
        ops.expert_mlp(x.cuda(), g.cuda(), d.cuda(), c)


@pytest.mark.cuda
def test_float64_is_rejected_on_cuda():
    x, g, d, c = [t.double().cuda() for t in _inputs()]
    with pytest.raises(ValueError, match="expert_mlp: x must be float16, bfloat16 or float32 on CUDA"):
        ops.expert_mlp(x, g, d, c)

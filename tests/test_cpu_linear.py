"""jakiro.cpu_linear: which nn.Linear layers run on the kernel, and only for the call."""
import torch
from torch import nn

from jakiro.cpu_linear import cpu_routes, linear_kernels
from jakiro.target import TargetModel
from jakiro.testing import make_tiny_target


class _QuantisedLinear(nn.Linear):
    """A subclass stands for a quantised layer: it keeps its own forward."""


def test_routes_plain_cpu_linears_only():
    plain, sub, hooked = nn.Linear(8, 4), _QuantisedLinear(8, 4), nn.Linear(8, 4)
    hooked.forward = lambda x: x                     # as accelerate's hooks replace it
    model = nn.Sequential(plain, nn.ReLU(), sub, nn.Sequential(hooked, plain))
    routes = cpu_routes([model])
    assert [module for module, _ in routes] == [plain]


def test_routing_lasts_for_the_call(monkeypatch):
    layer = nn.Linear(16, 5)
    x = torch.randn(3, 16)
    calls = []
    original = torch.ops.jakiro.linear

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return original(*args)
    monkeypatch.setattr(torch.ops.jakiro, "linear", Spy())
    with linear_kernels(cpu_routes([layer])):
        inside = layer(x)
    outside = layer(x)
    assert calls == [x.shape] and "forward" not in vars(layer)
    torch.testing.assert_close(inside, outside, rtol=1e-5, atol=1e-6)


def test_target_forward_on_the_kernel_matches_aten(monkeypatch):
    model = make_tiny_target("llama", hidden=128, heads=2, kv_heads=1, head_dim=64, seed=3)
    target = TargetModel(model)
    assert len(target._linear_routes) == 7 * 2 + 1   # q k v o gate up down per layer, the LM head
    ids = torch.randint(0, target.vocab_size, (2, 6))
    positions = torch.arange(6).expand(2, 6)

    def run():
        cache = target.new_cache(2, 8)
        return target.forward(ids, positions, cache, cache.step(6))
    kernel_logits, _ = run()
    monkeypatch.setenv("JAKIRO_LINEAR_KERNEL", "aten")
    aten_logits, _ = run()
    torch.testing.assert_close(kernel_logits, aten_logits, rtol=1e-4, atol=1e-4)
    assert all("forward" not in vars(m) for m in model.modules())   # the model is untouched after the call

"""jakiro.cpu_routing: which linear layers, RMSNorms and rotary embeddings run on the kernels, and only
for the call."""
import importlib
import inspect

import pytest
import torch
from torch import nn

from jakiro.cpu_routing import RMS_NORM_FAMILIES, ROTARY_FAMILIES, cpu_routes, route_kind, use_kernels
from jakiro.target import TargetModel
from jakiro.testing import make_tiny_target
from transformers.models.llama import modeling_llama

original_rotary = modeling_llama.apply_rotary_pos_emb


class _QuantisedLinear(nn.Linear):
    """A subclass stands for a quantised layer: it keeps its own forward."""


def test_routes_plain_cpu_linears_only():
    plain, sub, hooked = nn.Linear(8, 4), _QuantisedLinear(8, 4), nn.Linear(8, 4)
    hooked.forward = lambda x: x                     # as accelerate's hooks replace it
    model = nn.Sequential(plain, nn.ReLU(), sub, nn.Sequential(hooked, plain))
    routes = cpu_routes([model])
    assert [owner for owner, _, _ in routes] == [plain]


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
    with use_kernels(cpu_routes([layer])):
        inside = layer(x)
    outside = layer(x)
    assert calls == [x.shape] and "forward" not in vars(layer)
    torch.testing.assert_close(inside, outside, rtol=1e-5, atol=1e-6)


def _family_module(family: str):
    name = family.lower()
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def test_routed_families_run_llamas_code():
    # The routes replace code by Llama's arithmetic: a family belongs in the lists only while its
    # Hugging Face code is Llama's, word for word (a transformers upgrade that changes it fails here).
    llama = _family_module("Llama")
    norm = inspect.getsource(llama.LlamaRMSNorm.forward)
    rotary = inspect.getsource(llama.apply_rotary_pos_emb).split('"""')[-1]
    for family in RMS_NORM_FAMILIES:
        assert inspect.getsource(getattr(_family_module(family), f"{family}RMSNorm").forward) == norm, family
    for family in ROTARY_FAMILIES:
        assert inspect.getsource(_family_module(family).apply_rotary_pos_emb).split('"""')[-1] == rotary, family


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "ministral", "phi3", "smollm3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_routed_norms_match_hugging_face(family, dtype):
    # Every RMSNorm of the model (qwen3's q/k norms included) is routed, and gives Hugging Face's numbers.
    model = make_tiny_target(family, hidden=128, heads=2, kv_heads=1, head_dim=64, seed=4).to(dtype)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    routed = [m for m, attribute, _ in cpu_routes([model]) if attribute == "forward" and not isinstance(m, nn.Linear)]
    assert routed == norms and len(norms) == 2 * 2 + 1 + (2 * 2 if family == "qwen3" else 0)
    for norm in norms:
        x = torch.randn(3, 5, norm.weight.shape[0]).to(dtype)
        expected = norm(x)
        with use_kernels(cpu_routes([norm])):
            got = norm(x)
        assert "forward" not in vars(norm)
        torch.testing.assert_close(got, expected, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)


def test_norm_with_another_dtype_keeps_hugging_faces_forward():
    model = make_tiny_target("llama", hidden=128, heads=2, kv_heads=1, head_dim=64, seed=4)
    norm = model.model.norm
    x = torch.randn(2, 128, dtype=torch.bfloat16)     # float32 weight: Hugging Face promotes
    with use_kernels(cpu_routes([norm])):
        got = norm(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, norm(x))


def test_target_forward_on_the_kernels_matches_hugging_face():
    model = make_tiny_target("llama", hidden=128, heads=2, kv_heads=1, head_dim=64, seed=3)
    implementation = model.config._attn_implementation
    target = TargetModel(model)
    # q k v o gate up down and two norms per layer, the final norm, the LM head, the rotary function
    assert len(target._kernel_routes) == (7 + 2) * 2 + 1 + 1 + 1
    ids = torch.randint(0, target.vocab_size, (2, 6))
    positions = torch.arange(6).expand(2, 6)

    def run(target):
        cache = target.new_cache(2, 8)
        return target.forward(ids, positions, cache, cache.step(6))
    kernel_logits, _ = run(target)
    plain_logits, _ = run(TargetModel(model, kernels=()))
    torch.testing.assert_close(kernel_logits, plain_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernel_logits, model(ids, position_ids=positions).logits, rtol=1e-4, atol=1e-4)
    # The user's model is never changed: the routes and the attention choice live on the adapter's copy.
    assert all("forward" not in vars(m) for m in model.modules())
    assert model.config._attn_implementation == implementation
    assert modeling_llama.apply_rotary_pos_emb is original_rotary
    assert all(p is q for p, q in zip(model.parameters(), target._copy.parameters()))   # no weight copied


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "ministral", "smollm3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_routed_rotary_embedding_is_hugging_faces_bit_for_bit(family, dtype):
    # The rotary embedding alone routed: the numbers are exactly those of the model's own
    # forward; with the norms routed too, within their float32 sums' reordering.
    model = make_tiny_target(family, hidden=128, heads=2, kv_heads=1, head_dim=64, seed=6).to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    positions = torch.arange(3, 10).expand(2, 7)

    def run(kernels):
        target = TargetModel(model, kernels=kernels)
        kinds = {route_kind(route) for route in target._kernel_routes}
        assert kinds == set(kernels) - ({"rms_norm"} if family == "gemma3" else set())   # Gemma's (1 + w) norms stay
        cache = target.new_cache(2, 12)
        cache.advance(3)
        return target.forward(ids, positions, cache, cache.step(7))[0]
    plain = run(())
    assert torch.equal(run(("rotary_embedding",)), plain)
    torch.testing.assert_close(run(("rotary_embedding", "rms_norm")), plain,
                               rtol=1e-5 if dtype == torch.float32 else 2e-2,
                               atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_long_half_precision_blocks_keep_hugging_faces_rotary(monkeypatch):
    # Above ROTARY_HALF_MAX_VALUES the tensor ops are faster (the kernel's conversions are
    # scalar); both give the same numbers, so only the speed differs.
    from jakiro import cpu_routing
    calls = []
    rotary = cpu_routing._RotaryFunction(lambda *args: calls.append(args[0].shape) or args[:2])
    monkeypatch.setattr(cpu_routing, "ROTARY_HALF_MAX_VALUES", 9 * 4 * 64)
    for length, dtype in ((4, torch.bfloat16), (5, torch.bfloat16), (5, torch.float32)):
        q, k = torch.randn(1, 9, length, 64).to(dtype), torch.randn(1, 3, length, 64).to(dtype)
        cos, sin = torch.randn(1, length, 64).to(dtype), torch.randn(1, length, 64).to(dtype)
        rotary(q, k, cos, sin)
    assert calls == [(1, 9, 5, 64)]

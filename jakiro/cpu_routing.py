"""Running a model's linear layers, RMSNorms and rotary embedding through jakiro's CPU kernels.

- ``nn.Linear`` runs ``torch.ops.jakiro.linear``: with the few tokens of a decoding step or
  a draft tree, a CPU forward pass is a stream of the weights from memory, and the kernel
  reads each weight row once for all the tokens, where the GEMM library packs every matrix
  first (BENCHMARKS.md, linear).
- Hugging Face's RMSNorm and ``apply_rotary_pos_emb`` (the families whose code is Llama's) run
  ``torch.ops.jakiro.rms_norm`` and ``torch.ops.jakiro.rotary_embedding``: one call each
  instead of about eight and a dozen tensor ops, whose dispatch costs dominate rows of a few
  hundred values (BENCHMARKS.md, rms_norm and rotary_embedding).

Which linear layers take the kernel is measured on the CPU at hand (:mod:`jakiro.calibration`):
the draft's at each row count, where ``F.linear`` wins keeps ``F.linear``; the target's keep the
kernel at every row count unless ``JAKIRO_CALIBRATE=all`` (then one choice per layer for all row
counts). All three kernels are batch-invariant, which keeps tree verification exact. A route is
``(owner, attribute, replacement)``: a layer instance's ``forward``, or the
``apply_rotary_pos_emb`` function of a model's ``transformers`` module. The target adapter
installs its layer routes for good on its own copy of the model's modules
(:mod:`jakiro.target`), so the user's model is never changed; the draft's routes and the rotary
function are installed for the duration of a call (:func:`use_kernels`), counted across threads:
the first call in installs them, the last one out restores what was there. The rotary route is
the one process-wide change; its numbers are Hugging Face's bit for bit, so a concurrent Hugging
Face call gives what it gives alone.
"""
from __future__ import annotations

import contextlib
import sys
import threading

import torch
from torch import nn
from torch.nn import functional as F

from jakiro import calibration

# Families whose RMSNorm forward is Llama's, ``weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype)``
# with the statistics in float32: what ``jakiro.ops.rms_norm`` computes. (Gemma's ``(1 + w)``
# norms and OLMo 2's are different and keep their own code.)
RMS_NORM_FAMILIES = ("Llama", "Qwen2", "Qwen3", "Mistral", "Ministral", "Phi3", "SmolLM3")
# Families whose attention calls a module-level ``apply_rotary_pos_emb(q, k, cos, sin)`` that is
# Llama's (Phi-3's rotates part of a head, OLMo 2's and Helium's differ: their own code).
ROTARY_FAMILIES = ("Llama", "Qwen2", "Qwen3", "Mistral", "Ministral", "SmolLM3", "Gemma2", "Gemma3")
RMS_NORM_CLASSES = tuple(f"{family}RMSNorm" for family in RMS_NORM_FAMILIES)
ATTENTION_CLASSES = tuple(f"{family}Attention" for family in ROTARY_FAMILIES)
# Half-precision queries above this many values keep Hugging Face's ops (the same numbers): the
# kernel's conversions are scalar, so a long prompt's rotation is faster as tensor ops
# (BENCHMARKS.md, rotary_embedding); decoding steps and trees are far below it.
ROTARY_HALF_MAX_VALUES = 1 << 16
_MISSING = object()


class _LinearForward:
    """A forward for one ``nn.Linear`` that runs ``torch.ops.jakiro.linear`` on its weights, or,
    at the row counts ``choice`` gives to torch (:mod:`jakiro.calibration`), ``F.linear``."""

    def __init__(self, module: nn.Linear, choice=calibration.ALWAYS):
        self.module = module
        self.choice = choice
        self.always = choice == calibration.ALWAYS

    def __call__(self, x):
        module = self.module
        if self.always or calibration.uses_jakiro(self.choice, x.numel() // max(x.shape[-1], 1)):
            return torch.ops.jakiro.linear(x, module.weight, module.bias)
        return F.linear(x, module.weight, module.bias)


class _RmsNormForward:
    """A forward for one Hugging Face RMSNorm that runs ``torch.ops.jakiro.rms_norm``."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x):
        module = self.module
        if x.dtype != module.weight.dtype:       # Hugging Face's forward promotes; the kernel wants one dtype
            return type(module).forward(module, x)
        return torch.ops.jakiro.rms_norm(x, module.weight, module.variance_epsilon)


class _RotaryFunction:
    """``apply_rotary_pos_emb`` running ``torch.ops.jakiro.rotary_embedding`` on the CPU (the
    module's own function for other devices, dtypes or layouts, and long half-precision blocks)."""

    def __init__(self, original):
        self.original = original

    def __call__(self, q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim != 1 or q.device.type != "cpu" or not (q.dtype == k.dtype == cos.dtype == sin.dtype) \
                or q.dim() != 4 or cos.dim() != 3 or (q.dtype != torch.float32 and q.numel() > ROTARY_HALF_MAX_VALUES):
            return self.original(q, k, cos, sin, unsqueeze_dim)
        return torch.ops.jakiro.rotary_embedding(q, k, cos, sin)


def _from_transformers(module: nn.Module, names: tuple[str, ...]) -> bool:
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.")


def cpu_routes(modules, policy: calibration.Policy | None = None) -> list[tuple[object, str, object]]:
    """The routes of the layers inside ``modules`` that sit on the CPU: plain ``nn.Linear``
    layers, Hugging Face RMSNorms (:data:`RMS_NORM_CLASSES`) and the rotary embedding of
    Hugging Face attention layers (:data:`ATTENTION_CLASSES`). Subclasses (quantised layers)
    and layers whose forward was already replaced on the instance (accelerate's hooks) keep
    their own.

    ``policy`` (:data:`jakiro.calibration.TARGET` or ``DRAFT``): the linear layers' op chosen by
    timing this CPU; a layer whose every row count keeps ``F.linear`` is not routed. None: every
    linear layer on ``torch.ops.jakiro.linear``."""
    routes = {}
    linear = []
    for module in modules:
        for m in module.modules():
            weight = getattr(m, "weight", None)
            if _from_transformers(m, ATTENTION_CLASSES) and m.o_proj.weight.device.type == "cpu":
                namespace = sys.modules[type(m).__module__]
                original = namespace.__dict__.get("apply_rotary_pos_emb")
                if original is not None and id(namespace) not in routes:
                    routes[id(namespace)] = (namespace, "apply_rotary_pos_emb", _RotaryFunction(original))
            if id(m) in routes or "forward" in vars(m) or not isinstance(weight, torch.Tensor) \
                    or weight.device.type != "cpu":
                continue
            if type(m) is nn.Linear:
                routes[id(m)] = None        # its place in the order; the route once the choices are made
                linear.append(m)
            elif _from_transformers(m, RMS_NORM_CLASSES) and hasattr(m, "variance_epsilon"):
                routes[id(m)] = (m, "forward", _RmsNormForward(m))
    choices = calibration.linear_choices(linear, policy) if policy is not None and linear else {}
    for m in linear:
        choice = choices.get(id(m), calibration.ALWAYS)
        routes[id(m)] = None if choice == calibration.NEVER else (m, "forward", _LinearForward(m, choice))
    return [route for route in routes.values() if route is not None]


def route_kind(route) -> str:
    """``"linear"``, ``"rms_norm"`` or ``"rotary_embedding"``: the op a route runs."""
    return {_LinearForward: "linear", _RmsNormForward: "rms_norm", _RotaryFunction: "rotary_embedding"}[
        type(route[2])]


def install(routes) -> None:
    """Installs ``routes`` for good (on modules that only jakiro calls)."""
    for owner, attribute, replacement in routes:
        setattr(owner, attribute, replacement)


_installed_lock = threading.Lock()
_installed: dict[tuple[int, str], list] = {}    # (id(owner), attribute) -> [calls inside, what was there]


@contextlib.contextmanager
def use_kernels(routes):
    """Runs each route of ``routes`` (from :func:`cpu_routes`) through its kernel for the call.

    Thread-safe: overlapping calls share one installation (routes of the same owner and attribute
    compute the same thing), and the last call to leave restores the original.

    Inside ``torch.compile`` it does nothing: a compiled caller installs the routes around the
    compiled call (the lock and ``setattr`` cannot be traced), and the graph records them."""
    if torch.compiler.is_compiling():
        yield
        return
    with _installed_lock:
        for owner, attribute, replacement in routes:
            entry = _installed.get((id(owner), attribute))
            if entry is None:
                _installed[(id(owner), attribute)] = [1, vars(owner).get(attribute, _MISSING)]
                setattr(owner, attribute, replacement)
            else:
                entry[0] += 1
    try:
        yield
    finally:
        with _installed_lock:
            for owner, attribute, _ in routes:
                entry = _installed[(id(owner), attribute)]
                entry[0] -= 1
                if entry[0] == 0:
                    del _installed[(id(owner), attribute)]
                    if entry[1] is _MISSING:
                        delattr(owner, attribute)
                    else:
                        setattr(owner, attribute, entry[1])

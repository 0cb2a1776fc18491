"""Running a model's ``nn.Linear`` and RMSNorm layers through jakiro's CPU kernels.

- ``nn.Linear`` runs ``torch.ops.jakiro.linear``: with the few tokens of a decoding step or
  a draft tree, a CPU forward pass is a stream of the weights from memory, and the kernel
  reads each weight row once for all the tokens, where the GEMM library packs every matrix
  first (BENCHMARKS.md, linear).
- Hugging Face's RMSNorm (Llama, Qwen2, Qwen3, Mistral) runs ``torch.ops.jakiro.rms_norm``:
  one call instead of eight tensor ops, whose dispatch costs dominate rows of a few hundred
  values (BENCHMARKS.md, rms_norm).

Both kernels are batch-invariant, which keeps tree verification exact. Routing is done per
call (:func:`use_kernels`), so the model is untouched outside jakiro's passes and
``model.generate`` keeps its own code.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

# Hugging Face classes whose forward is ``weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype)``
# with the statistics in float32: what ``jakiro.ops.rms_norm`` computes.
RMS_NORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")


class _LinearForward:
    """A forward for one ``nn.Linear`` that runs ``torch.ops.jakiro.linear`` on its weights."""

    def __init__(self, module: nn.Linear):
        self.module = module

    def __call__(self, x):
        return torch.ops.jakiro.linear(x, self.module.weight, self.module.bias)


class _RmsNormForward:
    """A forward for one Hugging Face RMSNorm that runs ``torch.ops.jakiro.rms_norm``."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x):
        module = self.module
        if x.dtype != module.weight.dtype:       # Hugging Face's forward promotes; the kernel wants one dtype
            return type(module).forward(module, x)
        return torch.ops.jakiro.rms_norm(x, module.weight, module.variance_epsilon)


def _is_hf_rms_norm(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__name__ in RMS_NORM_CLASSES and cls.__module__.startswith("transformers.")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon"))


def cpu_routes(modules) -> list[tuple[nn.Module, object]]:
    """The plain ``nn.Linear`` layers and Hugging Face RMSNorm layers (:data:`RMS_NORM_CLASSES`)
    inside ``modules`` that sit on the CPU, each with its kernel forward. Subclasses
    (quantised layers) and layers whose forward was already replaced on the instance
    (accelerate's hooks) keep their own."""
    routes = {}
    for module in modules:
        for m in module.modules():
            weight = getattr(m, "weight", None)
            if id(m) in routes or "forward" in vars(m) or not isinstance(weight, torch.Tensor) \
                    or weight.device.type != "cpu":
                continue
            if type(m) is nn.Linear:
                routes[id(m)] = (m, _LinearForward(m))
            elif _is_hf_rms_norm(m):
                routes[id(m)] = (m, _RmsNormForward(m))
    return list(routes.values())


@contextlib.contextmanager
def use_kernels(routes):
    """Runs each layer of ``routes`` (from :func:`cpu_routes`) through its kernel for the call."""
    for module, forward in routes:
        module.forward = forward
    try:
        yield
    finally:
        for module, _ in routes:
            del module.forward

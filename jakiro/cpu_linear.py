"""Running a model's ``nn.Linear`` layers through ``torch.ops.jakiro.linear`` on the CPU.

With the few tokens of a decoding step or a draft tree, a CPU forward pass is a stream of
the weights from memory; the jakiro kernel reads each weight row once for all the tokens,
where the GEMM library packs every matrix first (BENCHMARKS.md, linear). Routing is done
per call (:func:`linear_kernels`), so the model is untouched outside jakiro's passes and
``model.generate`` keeps its own code.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class _KernelForward:
    """A forward for one ``nn.Linear`` that runs ``torch.ops.jakiro.linear`` on its weights."""

    def __init__(self, module: nn.Linear):
        self.module = module

    def __call__(self, x):
        return torch.ops.jakiro.linear(x, self.module.weight, self.module.bias)


def cpu_routes(modules) -> list[tuple[nn.Linear, _KernelForward]]:
    """The plain ``nn.Linear`` layers inside ``modules`` that sit on the CPU, each with its
    kernel forward. Subclasses (quantised layers) and layers whose forward was already
    replaced on the instance (accelerate's hooks) keep their own."""
    linears = {id(m): m for module in modules for m in module.modules()
               if type(m) is nn.Linear and m.weight.device.type == "cpu" and "forward" not in vars(m)}
    return [(m, _KernelForward(m)) for m in linears.values()]


@contextlib.contextmanager
def linear_kernels(routes):
    """Runs each layer of ``routes`` (from :func:`cpu_routes`) through the kernel for the call."""
    for module, forward in routes:
        module.forward = forward
    try:
        yield
    finally:
        for module, _ in routes:
            del module.forward

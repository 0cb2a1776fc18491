"""Shared test fixtures: devices to run on and the CUDA skip rule."""
import os

import pytest
import torch

import jakiro

# The draft's linear layers are routed by a per-CPU calibration (jakiro.calibration): the tests run
# without it, so routes are the same on every machine and nothing is written to the user's cache
# (child processes inherit this too); tests/test_calibration.py switches it on where it tests it.
os.environ.setdefault("JAKIRO_CALIBRATE", "0")

HAS_CUDA = torch.cuda.is_available()
CUDA_COMPILED = jakiro.build_info()["cuda_compiled"]

cuda_only = pytest.mark.skipif(
    not (HAS_CUDA and CUDA_COMPILED),
    reason="no CUDA device" if not HAS_CUDA else "extension built without CUDA kernels",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(cuda_only)


# Parametrise a test over this: the CUDA case carries the `cuda` mark, so it is
# skipped with a reason where no GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


# The CUDA implementations of expert_mlp / grouped_gemm (JAKIRO_EXPERT_MLP_KERNEL,
# csrc/include/jakiro/grouped_kernel_choice.h); tests taking this fixture run once per value.
GROUPED_KERNELS = ["auto", "v1", "cublas"]


@pytest.fixture(params=GROUPED_KERNELS)
def grouped_kernel(request, monkeypatch):
    monkeypatch.setenv("JAKIRO_EXPERT_MLP_KERNEL", request.param)
    return request.param

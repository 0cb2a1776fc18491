"""The extension's build: what it reports and which kernels it registered."""
import torch

import jakiro

# Every op schema in csrc/ops.cpp; a new op must be added here.
ALL_OPS = ["build_tree_mask", "compact_kv", "expert_mlp", "grouped_gemm", "linear", "rms_norm", "rotary_embedding",
           "tree_attention", "verify_greedy", "verify_sampling"]


def test_build_info_reports_facts():
    info = jakiro.build_info()
    for key in ("cuda_compiled", "cuda_arch_list", "built_against_torch", "torch_version", "max_tree_nodes"):
        assert key in info
    assert info["built_against_torch"].split("+")[0] == torch.__version__.split("+")[0], (
        "the extension was built against another torch: rebuild it (pip install --no-build-isolation -e .)"
    )
    if info["cuda_compiled"]:
        assert info["cuda_arch_list"], "a CUDA build must record its arch list"


def test_registered_ops_are_exactly_the_known_ones():
    registered = sorted(
        name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("jakiro::")
    )
    assert registered == sorted(ALL_OPS)


def test_every_op_has_cpu_kernel():
    for op in ALL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"jakiro::{op}", "CPU"), op


def test_every_op_has_cuda_kernel_when_built_with_cuda():
    # Runs without a GPU: registration is a property of the build, not of the device.
    if not jakiro.build_info()["cuda_compiled"]:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"jakiro::{ALL_OPS[0]}", "CUDA")
        return
    missing = [op for op in ALL_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"jakiro::{op}", "CUDA")]
    assert not missing, f"ops without a CUDA kernel in a CUDA build: {missing}"

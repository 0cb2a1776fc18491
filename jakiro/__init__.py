"""jakiro: Jakiro speculative decoding for Hugging Face causal LMs.

Importing the package loads the compiled extension, which registers every op
under ``torch.ops.jakiro``; ``jakiro.ops`` holds their Python wrappers.
"""
import torch  # noqa: F401  (the extension links against torch's libraries)


def _check_built_against(running: str) -> None:
    """Refuses, in one line naming both versions, compiled ops built against another torch: loading
    them would fail with an undefined symbol at best and crash on a changed ABI at worst."""
    try:
        from jakiro._built_with import TORCH_VERSION as built
    except ImportError:
        raise ImportError("jakiro's compiled ops are missing: build them with `bash scripts/setup.sh` or "
                          "`pip install --no-build-isolation .` in the checkout") from None
    if built != running:
        raise ImportError(f"jakiro's compiled ops were built against torch {built}, but torch {running} is "
                          "installed: rebuild jakiro with this torch (`pip install --no-build-isolation` "
                          "in the checkout, or `bash scripts/setup.sh`)")


_check_built_against(torch.__version__)
from jakiro import _C  # noqa: E402  (registers torch.ops.jakiro.*)
from jakiro import ops  # noqa: F401,E402  (fake implementations for torch.compile)

# The model-level API imports transformers: load it on first use, so op-only users don't pay.
_LAZY = {"DraftConfig": "jakiro.draft", "JakiroDraft": "jakiro.draft", "GenerationResult": "jakiro.generate",
         "SpeculativeGenerator": "jakiro.generate", "vanilla_generate": "jakiro.generate"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jakiro' has no attribute {name!r}")

__version__ = "0.1.0"


def build_info() -> dict:
    """How the extension was built, plus the versions it runs with now.

    Keys: ``cuda_compiled`` (CUDA kernels built), ``cuda_arch_list``,
    ``nvcc_version``, ``built_against_torch``, ``build_type``, ``cxx_compiler``,
    ``max_tree_nodes``, and at run time ``torch_version``, ``torch_cuda_version``,
    ``cuda_available``.
    """
    info = dict(_C.build_info())
    info["torch_version"] = torch.__version__
    info["torch_cuda_version"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    return info


__all__ = ["build_info", "ops", "__version__", "DraftConfig", "JakiroDraft", "GenerationResult",
           "SpeculativeGenerator", "vanilla_generate"]

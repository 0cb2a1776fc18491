"""jakiro's vLLM plugin: registers the Jakiro draft class for vLLM's ``eagle`` speculative method.

vLLM calls :func:`register` in each of its processes through the ``vllm.general_plugins``
entry point in jakiro's package metadata (``pyproject.toml``). It registers the architecture
``EagleJakiroForCausalLM`` (what ``jakiro export --format vllm-eagle`` writes for a Jakiro draft)
as ``jakiro.vllm_model:EagleJakiroForCausalLM``, which vLLM imports when it builds a draft of
that architecture. Importing this module imports neither vLLM nor ``jakiro.vllm_model``.

Serving an exported draft (``README.md``, Serving with vLLM)::

    from vllm import LLM
    llm = LLM(model=TARGET, speculative_config={"method": "eagle", "model": EXPORTED,
                                                 "num_speculative_tokens": 3})
"""
from __future__ import annotations

ARCHITECTURE = "EagleJakiroForCausalLM"               # = jakiro.export.JAKIRO_ARCH
MODEL_CLASS = f"jakiro.vllm_model:{ARCHITECTURE}"    # imported by vLLM on first use


def register() -> None:
    """Registers the Jakiro draft class with vLLM's ``ModelRegistry`` (idempotent: vLLM loads
    plugins once per process, and a second call changes nothing)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)

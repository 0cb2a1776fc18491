"""Writing a jakiro draft in the layout a serving engine loads: vLLM's EAGLE drafts.

``export_vllm_eagle(draft, out)`` writes a folder that vLLM's ``eagle`` speculative method
serves (``speculative_config={"method": "eagle", "model": out, ...}``). The draft is the one
decoder layer jakiro trains, which is the layer vLLM's EAGLE-1/2 Llama draft runs:

* ``fc``: ``[H, 2H]`` over ``[embed(x_{t+1}); f_t]`` (embedding first, as in jakiro);
* layer 0 with no input norm, attention with the target's RoPE, ``post_attention_layernorm``
  (jakiro's ``post_norm``), the MLP, and no final norm;
* no ``embed_tokens`` and no ``lm_head``: vLLM shares the target's when the draft has none.

Two architectures (the config's ``architectures``):

* ``EagleLlamaForCausalLM``, vLLM's own (``vllm/model_executor/models/llama_eagle.py``), for
  the EAGLE-2 configuration (one dense SwiGLU expert) whose ``fc`` has no bias: that class's
  ``fc`` has none, and a bias cannot be folded into anything it has (into the embedding only
  through the inverse of ``fc``'s embedding half, ill-conditioned for trained drafts).
  ``drop_fc_bias=True`` drops it: vLLM's proposals change, its outputs never do.
* ``EagleJakiroForCausalLM``, registered by jakiro's vLLM plugin (:mod:`jakiro.vllm_plugin`),
  for everything else that vLLM's proposer can run: the Jakiro MoE (top-k routing, softmax over
  the selected experts, SwiGLU or GeGLU experts), ``fc``'s bias. Its tensors are vLLM's names
  for the attention and the norm, and ``mlp.router.weight`` ``[E, H]`` (the mixture head's
  logits only), ``mlp.w_gate_up`` ``[E, 2I, H]``, ``mlp.w_down`` ``[E, H, I]`` for the MoE.

The contrastive head is not exported: vLLM's proposer drafts each token from one feature,
the previous step's, and the contrastive feature (a guess two tokens ahead, which jakiro uses
for a tree's last level) has no place in it.

What neither class can express is refused with one line that names it: a sliding window, an
attention scale other than ``head_dim ** -0.5``, an activation other than SiLU/tanh-GELU.

This module needs neither vLLM nor jakiro's compiled ops (torch, safetensors and, for the
target's configuration, transformers).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMATS = ("vllm-eagle",)
ARCHES = ("auto", "vllm", "jakiro")
VLLM_EAGLE_ARCH = "EagleLlamaForCausalLM"     # vLLM's own EAGLE-1/2 Llama draft
JAKIRO_ARCH = "EagleJakiroForCausalLM"        # registered by jakiro.vllm_plugin
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# The fields of a jakiro draft's config.json (jakiro.draft.DraftConfig, plus a legacy key the
# draft now takes from its target) and their defaults; tests/test_export.py keeps this equal to
# DraftConfig. An unknown field is refused: it may change what the layer computes.
DRAFT_FIELDS = {
    "hidden_size": None, "num_attention_heads": None, "num_key_value_heads": None, "head_dim": None,
    "vocab_size": None, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "num_experts": 2,
    "experts_per_token": None, "expert_intermediate_size": None, "contrastive": True,
    "candidate_mode": "mixture", "fc_bias": True, "attention_bias": False, "target_model_type": None,
    "attention_scale": None, "sliding_window": None, "norm_unit_offset": False, "hidden_act": "silu",
    "feature_layers": None,
}
LEGACY_FIELDS = ("rope_theta",)
REQUIRED_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
# The draft's expert activation -> the Hugging Face name written to the exported config.
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


class ExportError(ValueError):
    """A draft, a target or an output folder the export cannot use; the message is one line."""


@dataclass
class DraftFolder:
    """A jakiro draft as saved (``config.json`` + ``model.safetensors``), checked."""
    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        return "EAGLE-2" if self.config["num_experts"] == 1 else f"Jakiro ({self.config['num_experts']}-expert MoE)"


@dataclass
class ExportResult:
    """What :func:`export_vllm_eagle` wrote."""
    out: Path
    architecture: str
    config: dict
    tensors: dict[str, tuple[int, ...]]
    notes: list[str] = field(default_factory=list)
    needs_plugin: bool = False


def _expected_draft_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The tensors ``JakiroDraft.save_pretrained`` writes for config ``c``, with their shapes."""
    h, heads, kv, d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    e, i = c["num_experts"], c["expert_intermediate_size"]
    shapes = {"fc.weight": (h, 2 * h), "q_proj.weight": (heads * d, h), "k_proj.weight": (kv * d, h),
              "v_proj.weight": (kv * d, h), "o_proj.weight": (h, heads * d), "post_norm": (h,),
              "w_gate_up": (e, 2 * i, h), "w_down": (e, h, i)}
    if c["fc_bias"]:
        shapes["fc.bias"] = (h,)
    if c["attention_bias"]:
        shapes.update({"q_proj.bias": (heads * d,), "k_proj.bias": (kv * d,), "v_proj.bias": (kv * d,)})
    if e > 1:
        shapes["router.weight"] = (e * (2 if c["contrastive"] else 1), h)
    if c["feature_layers"]:
        shapes["fuse.weight"] = (h, h * (1 + len(c["feature_layers"])))
    return shapes


def _positive_int(config: dict, name: str, where: Path):
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExportError(f"{where}: {name} must be an int >= 1, got {value!r}")


def read_draft(folder: str | os.PathLike) -> DraftFolder:
    """Reads and checks a draft folder (``JakiroDraft.save_pretrained``'s output) without building
    the model: the config's fields, then every tensor's name and shape. :class:`ExportError` with
    one line naming the file and the problem otherwise."""
    path = Path(folder)
    if not path.is_dir():
        raise ExportError(f"draft {folder} is not a folder")
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for file in (config_path, weights_path):
        if not file.is_file():
            raise ExportError(f"{path} is not a jakiro draft folder: it has no {file.name}")
    try:
        values = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"{config_path} is not readable JSON ({error})") from None
    if not isinstance(values, dict):
        raise ExportError(f"{config_path} is not a draft configuration (not a JSON object)")
    unknown = sorted(set(values) - set(DRAFT_FIELDS) - set(LEGACY_FIELDS))
    if unknown:
        raise ExportError(f"{config_path} has fields this exporter does not know ({', '.join(unknown)}): "
                          f"a newer draft format?")
    missing = [name for name in REQUIRED_FIELDS if name not in values]
    if missing:
        raise ExportError(f"{config_path} is not a draft configuration: no {', '.join(missing)}")
    config = {name: values.get(name, default) for name, default in DRAFT_FIELDS.items()}
    for name in REQUIRED_FIELDS + ("num_experts", "max_position_embeddings"):
        _positive_int(config, name, config_path)
    if config["expert_intermediate_size"] is None:
        config["expert_intermediate_size"] = config["hidden_size"]
    if config["experts_per_token"] is None:
        config["experts_per_token"] = min(2, config["num_experts"])
    for name in ("expert_intermediate_size", "experts_per_token"):
        _positive_int(config, name, config_path)
    if config["experts_per_token"] > config["num_experts"]:
        raise ExportError(f"{config_path}: experts_per_token {config['experts_per_token']} > num_experts "
                          f"{config['num_experts']}")
    if config["contrastive"] and config["num_experts"] < 2:
        raise ExportError(f"{config_path}: a contrastive head needs num_experts >= 2")
    for name in ("contrastive", "fc_bias", "attention_bias", "norm_unit_offset"):
        if not isinstance(config[name], bool):
            raise ExportError(f"{config_path}: {name} must be true or false, got {config[name]!r}")

    from safetensors import safe_open
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:   # safetensors raises its own types for a bad header or truncated data
        raise ExportError(f"{weights_path} is not a readable safetensors file ({error})") from None
    expected = _expected_draft_shapes(config)
    problems = [f"missing {name}" for name in expected if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in expected]
    problems += [f"{name} is {list(tensors[name].shape)}, expected {list(shape)}"
                 for name, shape in expected.items() if name in tensors and tuple(tensors[name].shape) != shape]
    if problems:
        raise ExportError(f"{weights_path} does not hold this draft's weights: {'; '.join(problems)}")
    return DraftFolder(path, config, tensors)


def target_config(target=None):
    """The text config of ``target`` (None: the default SmolLM2; a name, a folder or a GGUF, as
    ``--target`` takes) read with transformers (weights are not loaded)."""
    from transformers import AutoConfig

    from jakiro.pretrained import resolve_target
    try:
        folder = resolve_target(target, progress=False)
        hf = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:    # FileNotFoundError is an OSError
        raise ExportError(f"target {target or 'smollm2'}: {' '.join(str(error).split())}") from None
    return hf.get_text_config() if hasattr(hf, "get_text_config") else hf


def _target_rope(hf) -> dict:
    """The target's RoPE parameters for its last layer (the layer the draft continues), as the
    ``rope_parameters`` dict vLLM's ``get_rope`` reads."""
    rope = getattr(hf, "rope_parameters", None)
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):
        types = getattr(hf, "layer_types", None)      # per layer type (Gemma 3): the last layer's
        kind = types[hf.num_hidden_layers - 1] if types else "full_attention"
        rope = rope.get(kind)
    if not isinstance(rope, dict):
        rope = {"rope_type": "default", "rope_theta": float(getattr(hf, "rope_theta", 10000.0))}
    rope = {k: (list(v) if isinstance(v, tuple) else v) for k, v in rope.items()}
    rope.setdefault("rope_type", rope.pop("type", "default"))
    factor = getattr(hf, "partial_rotary_factor", None)
    if factor is not None and "partial_rotary_factor" not in rope:
        rope["partial_rotary_factor"] = float(factor)
    return rope


def _problems(c: dict, arch: str, tensors: dict, drop_fc_bias: bool) -> list[str]:
    """Why ``arch`` cannot express the draft exactly (empty: it can)."""
    problems = []
    if c["feature_layers"]:
        problems.append(f"it fuses the target's layers {c['feature_layers']} with the last (EAGLE-3 features; "
                        f"vLLM's EAGLE proposer hands a draft the last layer's feature only): train it with "
                        f"`jakiro train --draft-config feature_layers=null`")
    if c["sliding_window"] is not None:
        problems.append(f"sliding-window attention (window {c['sliding_window']}) is not exported")
    if c["attention_scale"] is not None and not math.isclose(c["attention_scale"], c["head_dim"] ** -0.5,
                                                             rel_tol=1e-6):
        problems.append(f"an attention scale of {c['attention_scale']} (vLLM's Llama attention uses "
                        f"head_dim ** -0.5)")
    if c["hidden_act"] not in HF_ACTIVATIONS:
        problems.append(f"the expert activation {c['hidden_act']!r}")
    if arch == VLLM_EAGLE_ARCH:
        if c["num_experts"] > 1:
            problems.append(f"its MLP is a {c['num_experts']}-expert MoE (the jakiro plugin's {JAKIRO_ARCH} "
                            f"serves it: --arch jakiro)")
        if c["hidden_act"] != "silu":
            problems.append("GeGLU experts (vLLM's Llama MLP is SwiGLU only)")
        if c["fc_bias"] and not drop_fc_bias and bool(tensors["fc.bias"].any()):
            problems.append(f"fc has a bias, which vLLM's {VLLM_EAGLE_ARCH} lacks (--drop-fc-bias drops it: "
                            f"proposals change, outputs do not; or --arch jakiro keeps it)")
    return problems


def _stock_expressible(c: dict, tensors: dict) -> bool:
    return not _problems(c, VLLM_EAGLE_ARCH, tensors, drop_fc_bias=False)


def vllm_eagle_layout(draft: DraftFolder, hf, arch: str = "auto", drop_fc_bias: bool = False
                      ) -> tuple[dict, dict[str, torch.Tensor], list[str]]:
    """``(config, tensors, notes)`` of ``draft`` in vLLM's EAGLE layout for target config ``hf``.

    ``arch``: ``"vllm"`` (vLLM's own class; refused when it cannot express the draft),
    ``"jakiro"`` (the plugin's class) or ``"auto"`` (vLLM's own when it expresses the draft
    exactly, else the plugin's).
    """
    if arch not in ARCHES:
        raise ExportError(f"arch must be one of {', '.join(ARCHES)}, got {arch!r}")
    c, t = draft.config, draft.tensors
    if hf.hidden_size != c["hidden_size"] or hf.vocab_size != c["vocab_size"]:
        raise ExportError(f"the target does not match the draft: hidden size {hf.hidden_size} vs "
                          f"{c['hidden_size']}, vocabulary {hf.vocab_size} vs {c['vocab_size']}")
    if c["target_model_type"] is not None and getattr(hf, "model_type", None) != c["target_model_type"]:
        raise ExportError(f"the target is a {hf.model_type!r} model, the draft was trained for "
                          f"{c['target_model_type']!r}")
    if arch == "auto":
        architecture = VLLM_EAGLE_ARCH if _stock_expressible(c, t) else JAKIRO_ARCH
    else:
        architecture = VLLM_EAGLE_ARCH if arch == "vllm" else JAKIRO_ARCH
    problems = _problems(c, architecture, t, drop_fc_bias)
    if problems:
        raise ExportError(f"the {draft.kind} draft {draft.path} cannot be expressed as {architecture}: "
                          + "; ".join(problems))

    notes = []
    e, i, h = c["num_experts"], c["expert_intermediate_size"], c["hidden_size"]
    out = {"fc.weight": t["fc.weight"]}
    if c["fc_bias"]:
        if architecture == JAKIRO_ARCH:
            out["fc.bias"] = t["fc.bias"]
        elif bool(t["fc.bias"].any()):
            notes.append("fc's bias was dropped (vLLM's EagleLlamaForCausalLM has none): vLLM's proposals differ "
                         "from jakiro's, its outputs do not")
    prefix = "layers.0."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out[f"{prefix}self_attn.{name}.weight"] = t[f"{name}.weight"]
        if f"{name}.bias" in t:
            out[f"{prefix}self_attn.{name}.bias"] = t[f"{name}.bias"]
    norm = t["post_norm"]
    # Gemma's RMSNorm scales by (1 + w); vLLM's Llama RMSNorm by w: the offset goes into the weight.
    out[f"{prefix}post_attention_layernorm.weight"] = (norm.float() + 1.0).to(norm.dtype) \
        if c["norm_unit_offset"] else norm
    if architecture == VLLM_EAGLE_ARCH:
        out[f"{prefix}mlp.gate_proj.weight"] = t["w_gate_up"][0, :i]
        out[f"{prefix}mlp.up_proj.weight"] = t["w_gate_up"][0, i:]
        out[f"{prefix}mlp.down_proj.weight"] = t["w_down"][0]
    else:
        if e > 1:
            out[f"{prefix}mlp.router.weight"] = t["router.weight"][:e]     # the mixture head's logits
        out[f"{prefix}mlp.w_gate_up"] = t["w_gate_up"]
        out[f"{prefix}mlp.w_down"] = t["w_down"]
    if c["contrastive"]:
        notes.append("the contrastive head was not exported: vLLM's EAGLE proposer drafts every token from the "
                     "previous step's feature and has no use for a feature two tokens ahead")
    out = {name: tensor.contiguous() for name, tensor in out.items()}

    dtype = str(t["fc.weight"].dtype).removeprefix("torch.")
    config = {
        "architectures": [architecture],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": 1,
        "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c["num_key_value_heads"],
        "head_dim": c["head_dim"],
        "hidden_act": HF_ACTIVATIONS[c["hidden_act"]],
        "rms_norm_eps": c["rms_norm_eps"],
        "vocab_size": c["vocab_size"],
        "max_position_embeddings": int(getattr(hf, "max_position_embeddings", None) or c["max_position_embeddings"]),
        "rope_parameters": _target_rope(hf),
        # vLLM's Llama layer: `attention_bias` puts a bias on q/k/v and o; `qkv_bias` overrides q/k/v.
        "attention_bias": False,
        "qkv_bias": c["attention_bias"],
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": getattr(hf, "bos_token_id", None),
        "eos_token_id": getattr(hf, "eos_token_id", None),
        "dtype": dtype,
    }
    if architecture == JAKIRO_ARCH:
        # Prefixed: vLLM reads `num_experts` of any config as a sign of a fused-MoE model.
        config.update(jakiro_num_experts=e, jakiro_experts_per_token=c["experts_per_token"],
                      jakiro_fc_bias=c["fc_bias"])
    config["jakiro_export"] = {"format": "vllm-eagle", "draft": draft.path.name, "draft_kind": draft.kind,
                               "target_model_type": getattr(hf, "model_type", None),
                               "fc_bias_dropped": bool(c["fc_bias"] and architecture == VLLM_EAGLE_ARCH),
                               "contrastive_head_dropped": c["contrastive"]}
    return config, out, notes


def export_vllm_eagle(draft: str | os.PathLike, out: str | os.PathLike, target=None, arch: str = "auto",
                      drop_fc_bias: bool = False, force: bool = False) -> ExportResult:
    """Writes ``draft`` (a draft folder) to ``out`` in vLLM's EAGLE layout for ``target`` (None:
    the default SmolLM2; see :func:`vllm_eagle_layout` for ``arch`` and ``drop_fc_bias``). An
    existing ``out`` is refused unless ``force`` (then its config.json and model.safetensors are
    replaced; other files stay)."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists (pass --force to replace the export in it)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    folder = read_draft(draft)
    config, tensors, notes = vllm_eagle_layout(folder, target_config(target), arch, drop_fc_bias)
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    # Written beside, then renamed: an interrupted export never leaves a half-written file.
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as staging:
        save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(os.path.join(staging, name), out / name)
    return ExportResult(out, config["architectures"][0], config,
                        {name: tuple(t.shape) for name, t in tensors.items()}, notes,
                        needs_plugin=config["architectures"][0] == JAKIRO_ARCH)

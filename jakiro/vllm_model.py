"""The Jakiro draft as a vLLM model class, for vLLM's ``eagle`` speculative method.

Imported by vLLM (never by jakiro itself) once :mod:`jakiro.vllm_plugin` has registered it, to
build a draft whose config names the architecture ``EagleJakiroForCausalLM`` (written by
``jakiro export --format vllm-eagle``). It computes what ``jakiro.draft.JakiroDraft`` computes
along its mixture head, written against vLLM 0.32's building blocks:

    z   = fc([embed(x_{t+1}); f_t])                (with fc's bias when the draft has one)
    h   = z + attention(z)                          (no input norm; the target's RoPE; vLLM's
                                                     paged KV cache through its Llama attention)
    u   = rms_norm(h)                               (post_attention_layernorm)
    out = h + sum_e c_e(u) * expert_e(u)            (no final norm; the target's LM head reads it)

with ``c(u)`` the mixture head: the top ``experts_per_token`` of the router's logits, softmax
over the selected ones (zero elsewhere), and SwiGLU or GeGLU experts
``down_e(act(gate_e(u)) * up_e(u))``. One expert is a dense MLP (the EAGLE-2 configuration with
``fc``'s bias, which vLLM's own ``EagleLlamaForCausalLM`` lacks).

The forward returns the feature twice, as vLLM's EAGLE drafts do: once for the logits and once
as the next step's input feature. The embedding and the LM head are the target's: the proposer
attaches them after loading when the checkpoint has none (``has_own_embed_tokens`` /
``has_own_lm_head`` stay False).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsEagle
from vllm.model_executor.models.llama import LlamaAttention

_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
# Checkpoint names of the attention projections -> (vLLM's fused parameter, shard).
_QKV_SHARDS = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}


class JakiroMoE(nn.Module):
    """The draft's MLP: ``num_experts`` gated experts under the mixture routing head.

    Parameters as jakiro stores them: ``w_gate_up [E, 2I, H]`` (gate rows first),
    ``w_down [E, H, I]``, ``router.weight [E, H]`` (absent for one expert).
    """

    def __init__(self, hidden: int, intermediate: int, experts: int, per_token: int, activation: str):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"jakiro vLLM draft: unsupported expert activation {activation!r} "
                             f"(expected one of {sorted(_ACTIVATIONS)})")
        if not 1 <= per_token <= experts:
            raise ValueError(f"jakiro vLLM draft: experts_per_token must be in [1, {experts}], got {per_token}")
        self.experts, self.per_token, self.intermediate = experts, per_token, intermediate
        self.act = _ACTIVATIONS[activation]
        self.router = nn.Linear(hidden, experts, bias=False) if experts > 1 else None
        self.w_gate_up = nn.Parameter(torch.empty(experts, 2 * intermediate, hidden), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(experts, hidden, intermediate), requires_grad=False)

    def coefficients(self, u: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` float32: softmax over each token's top ``experts_per_token`` router logits."""
        logits = self.router(u).float()
        top = logits.topk(self.per_token, dim=-1)
        return torch.zeros_like(logits).scatter(1, top.indices, torch.softmax(top.values, dim=-1))

    def expert(self, e: int, u: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(u, self.w_gate_up[e]).split(self.intermediate, dim=-1)
        return F.linear(self.act(gate) * up, self.w_down[e])

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.experts == 1:
            return self.expert(0, u)
        coeff = self.coefficients(u)
        out = torch.zeros(u.shape, dtype=torch.float32, device=u.device)
        for e in range(self.experts):     # every expert on every token: no host sync, E is small
            out += coeff[:, e:e + 1] * self.expert(e, u).float()
        return out.to(u.dtype)


class JakiroDraftLayer(nn.Module):
    """The draft's decoder layer: no input norm, vLLM's Llama attention, the MoE MLP."""

    def __init__(self, vllm_config: VllmConfig, config, prefix: str):
        super().__init__()
        hidden = config.hidden_size
        self.self_attn = LlamaAttention(
            config=config, hidden_size=hidden, num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", config.num_attention_heads),
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192), quant_config=None,
            bias=bool(getattr(config, "qkv_bias", False)), bias_o_proj=False,
            cache_config=vllm_config.cache_config, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)
        experts = int(getattr(config, "jakiro_num_experts", 1))
        self.mlp = JakiroMoE(hidden, config.intermediate_size, experts,
                             int(getattr(config, "jakiro_experts_per_token", experts)), config.hidden_act)

    def forward(self, positions: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = z + self.self_attn(positions=positions, hidden_states=z)
        return h + self.mlp(self.post_attention_layernorm(h))


class JakiroDraftModel(nn.Module):
    """``fc`` and the one layer; ``embed_tokens`` is replaced by the target's after loading."""

    def __init__(self, vllm_config: VllmConfig, config, prefix: str, layer_id: int):
        super().__init__()
        hidden = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, prefix=f"{prefix}.embed_tokens")
        self.fc = nn.Linear(2 * hidden, hidden, bias=bool(getattr(config, "jakiro_fc_bias", False)))
        # The attention layer's name must not collide with the target's layers: index it after them.
        self.layers = nn.ModuleList([JakiroDraftLayer(vllm_config, config, prefix=f"{prefix}.layers.{layer_id}")])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids).to(hidden_states.dtype)
        z = self.fc(torch.cat((embeds, hidden_states), dim=-1))
        return self.layers[0](positions, z)


class EagleJakiroForCausalLM(nn.Module, SupportsEagle):
    """The Jakiro draft head for vLLM's EAGLE proposer (architecture ``EagleJakiroForCausalLM``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        speculative = vllm_config.speculative_config
        if speculative is None:
            raise ValueError("EagleJakiroForCausalLM is a draft head: serve it as the speculative model of "
                             "method 'eagle', not as a model")
        self.config = config = speculative.draft_model_config.hf_config
        if getattr(config, "draft_vocab_size", None) is None:
            config.draft_vocab_size = config.vocab_size   # the proposer drafts from the whole vocabulary
        if getattr(config, "num_hidden_layers", 1) != 1:
            raise ValueError(f"EagleJakiroForCausalLM: a Jakiro draft has one layer, the config says "
                             f"{config.num_hidden_layers}")
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        model_prefix = f"{prefix}.model" if prefix else "model"
        self.model = JakiroDraftModel(vllm_config, config, model_prefix, target_layers)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs_embeds is not None:
            raise NotImplementedError("EagleJakiroForCausalLM takes token ids, not input embeddings")
        feature = self.model(input_ids, positions, hidden_states)
        return feature, feature           # (for the logits, for the next draft step)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)   # lm_head: the target's, set by the proposer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads ``jakiro export``'s tensors (names relative to ``model.``); an unknown or
        missing tensor is an error naming it. Returns None: the embedding is the target's and
        is attached after loading, so vLLM's own count of loaded parameters does not apply."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name.startswith("lm_head."):
                raise ValueError("EagleJakiroForCausalLM: the draft checkpoint holds an lm_head; a Jakiro draft "
                                 "reads the target's (re-export it with `jakiro export`)")
            if name.startswith("embed_tokens."):
                self.has_own_embed_tokens = True
            parts = name.split(".")
            shard = None
            if len(parts) >= 2 and parts[-2] in _QKV_SHARDS and "self_attn" in parts:
                shard = _QKV_SHARDS[parts[-2]]
                parts[-2] = "qkv_proj"
            target = "model." + ".".join(parts)
            param = params.get(target)
            if param is None:
                raise ValueError(f"EagleJakiroForCausalLM: unexpected tensor {name!r} in the draft checkpoint")
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(target if shard is None else f"{target}:{shard}")
        expected = {n for n in params if not n.startswith("model.embed_tokens.")}
        expected = {f"{n}:{s}" for n in expected if ".qkv_proj." in n for s in _QKV_SHARDS.values()} | \
                   {n for n in expected if ".qkv_proj." not in n}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"EagleJakiroForCausalLM: the draft checkpoint lacks {', '.join(missing)}")

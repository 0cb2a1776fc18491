"""The Jakiro draft model (``docs/architecture.md``, The draft head).

One decoder layer on top of the target: ``z = fc([embed(x_{t+1}); f_t])`` (no activation),
``h = z + attention(z)`` (no input norm; RoPE; cache through ``jakiro.ops.tree_attention``),
``u = rms_norm(h)``, ``out = h + MoE(u)`` (no final norm; the target's LM head reads ``out``).

The layer follows its target's last layer: the target's own rotary embedding (whatever RoPE
variant ``transformers`` computed for it: scaled, partial, per layer type), head size, attention
scale, sliding window, RMSNorm form (Gemma's ``(1 + w)``), and MLP activation (SiLU or
tanh-GELU); the embedding is the target's module, with its scaling (Gemma).

The MoE is ``num_experts`` gated experts (SwiGLU or GeGLU) run by ``jakiro.ops.expert_mlp``
under several routing heads at once:

* the mixture head: router logits ``0..E-1``, top-``experts_per_token`` experts, softmax
  over the selected ones -> the autoregressive feature ``f_{t+1}``;
* the contrastive head (``contrastive=True``): router logits ``E..2E-1``, the two largest
  ``a, b`` with ``(v_a, v_b) = softmax(g_a, g_b)`` -> ``v_a E_a(u) - v_b E_b(u)``, a feature
  trained to predict one step further ahead (``f_{t+2}``); for E=2 this is the authors'
  4-logit router;
* one head per expert (``return_experts``): each expert's own feature, used by the
  ``"per_expert"`` candidate mode.

With ``feature_layers`` (EAGLE-3's multi-layer features, the default for new drafts) the
target's feature ``f_t`` read from the committed text is a fusion ``fuse([h_a; h_b; h_c; f_t])``
of the residual stream after a low, a middle and a high layer (each RMS-normalised) and the
last layer's feature; ``fuse`` starts as the identity on ``f_t``. Where the draft reads its
own predictions (deeper tree levels, later training-time-test passes) they are ``H``-wide
already and skip the fusion.

The embedding and LM head are the target's own modules (frozen, shared, never saved).
The EAGLE-2 baseline is the configuration ``DraftConfig.eagle2(...)``: one dense expert at
the target's intermediate size, no contrastive head.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from jakiro import ops
from jakiro.kv_cache import AttentionStep, KVCache

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
COUNTS_NAME = "token_counts.safetensors"   # training-data token frequencies (optional)
CANDIDATE_MODES = ("mixture", "per_expert")


# Hugging Face activation names -> the expert_mlp activation the draft's experts use.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_INT_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
               "max_position_embeddings", "num_experts", "experts_per_token", "expert_intermediate_size",
               "sliding_window")
_DEFAULTED_FIELDS = ("experts_per_token", "expert_intermediate_size", "sliding_window")  # None allowed
_POSITIVE_FIELDS = ("rms_norm_eps", "attention_scale")
_OPTIONAL_FIELDS = ("attention_scale",)
_BOOL_FIELDS = ("contrastive", "fc_bias", "attention_bias", "norm_unit_offset")


def default_feature_layers(num_layers: int) -> list[int] | None:
    """EAGLE-3's low, middle and high layers of a ``num_layers``-layer target, as indices of
    Hugging Face's ``hidden_states`` (``i``: the residual stream after layer ``i``): 3, L/2 + 1
    and L - 2 (3, 16, 28 for SmolLM2's 30), clipped to the layers below the last and
    deduplicated. None for a one-layer target (nothing below the last)."""
    if num_layers < 2:
        return None
    return sorted({min(max(i, 1), num_layers - 1) for i in (3, num_layers // 2 + 1, num_layers - 2)})
# Keys of older config.json files that the draft now takes from its target (the RoPE).
LEGACY_FIELDS = ("rope_theta",)


@dataclass
class DraftConfig:
    """Shape and behaviour of a :class:`JakiroDraft` (saved as config.json)."""
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    num_experts: int = 2
    experts_per_token: int | None = None            # None: min(2, num_experts)
    expert_intermediate_size: int | None = None   # None: hidden_size
    contrastive: bool = True
    candidate_mode: str = "mixture"
    fc_bias: bool = True
    attention_bias: bool = False
    target_model_type: str | None = None
    attention_scale: float | None = None          # None: head_dim ** -0.5
    sliding_window: int | None = None             # the target's last layer's window (None: full attention)
    norm_unit_offset: bool = False                # RMSNorm weight is (1 + w), as Gemma's
    hidden_act: str = "silu"                      # the experts' gate activation: "silu" or "gelu_tanh"
    feature_layers: list[int] | None = None       # the target's hidden_states fused with f_t (None: f_t only)

    def __post_init__(self):
        # Types and ranges first (a config.json may hold "256" or 8.0): one line naming the field.
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not (value is None and name in _DEFAULTED_FIELDS) and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"DraftConfig: {name} must be an int >= 1, got {value!r}")
        for name in _POSITIVE_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"DraftConfig: {name} must be a positive number, got {value!r}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DraftConfig: {name} must be true or false, got {getattr(self, name)!r}")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"DraftConfig: hidden_act must be 'silu' or 'gelu_tanh', got {self.hidden_act!r}")
        if self.feature_layers is not None:
            layers = self.feature_layers
            if (not isinstance(layers, (list, tuple)) or not layers
                    or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)
                    or list(layers) != sorted(set(layers))):
                raise ValueError(f"DraftConfig: feature_layers must be a non-empty increasing list of "
                                 f"hidden-state indices >= 0 (or null), got {layers!r}")
            self.feature_layers = list(layers)
        if self.target_model_type is not None and not isinstance(self.target_model_type, str):
            raise ValueError(f"DraftConfig: target_model_type must be a string, got {self.target_model_type!r}")
        if self.expert_intermediate_size is None:
            self.expert_intermediate_size = self.hidden_size
        if self.experts_per_token is None:
            self.experts_per_token = min(2, self.num_experts)
        if self.candidate_mode not in CANDIDATE_MODES:
            raise ValueError(f"DraftConfig: candidate_mode must be one of {CANDIDATE_MODES}, "
                             f"got {self.candidate_mode!r}")
        if self.num_experts < 1:
            raise ValueError(f"DraftConfig: num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"DraftConfig: experts_per_token must be in [1, num_experts={self.num_experts}], "
                             f"got {self.experts_per_token}")
        if self.contrastive and self.num_experts < 2:
            raise ValueError("DraftConfig: contrastive=True needs num_experts >= 2 (the contrastive head is a "
                             "signed difference of two experts)")
        if self.candidate_mode == "per_expert" and self.num_experts < 2:
            raise ValueError("DraftConfig: candidate_mode='per_expert' needs num_experts >= 2")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("DraftConfig: num_attention_heads must be a multiple of num_key_value_heads")
        # Routing heads of one expert_mlp call: mixture + contrastive + one per expert.
        if 1 + int(self.contrastive) + self.num_experts > 8 and self.candidate_mode == "per_expert":
            raise ValueError("DraftConfig: per_expert mode supports at most 6 experts (expert_mlp runs <= 8 heads)")

    @classmethod
    def from_target(cls, hf_config, **overrides) -> "DraftConfig":
        """The Jakiro defaults for a target with Hugging Face config ``hf_config``: the target's
        head layout, attention scale, last layer's sliding window, norm and activation, and
        EAGLE-3's multi-layer features (:func:`default_feature_layers`; ``feature_layers=None``
        for the last layer's feature alone)."""
        hf_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        model_type = getattr(hf_config, "model_type", None)
        act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None) or "silu"
        values = dict(
            hidden_size=hf_config.hidden_size,
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
            vocab_size=hf_config.vocab_size,
            rms_norm_eps=getattr(hf_config, "rms_norm_eps", 1e-6),
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", 4096),
            target_model_type=model_type,
            attention_scale=_attention_scale(hf_config),
            sliding_window=_last_layer_window(hf_config),
            norm_unit_offset=str(model_type).startswith("gemma"),
            hidden_act=ACTIVATIONS.get(act, "silu"),      # another activation: the draft keeps SiLU
            feature_layers=default_feature_layers(hf_config.num_hidden_layers),
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def eagle2(cls, hf_config, **overrides) -> "DraftConfig":
        """The EAGLE-2 baseline: one dense SwiGLU MLP at the target's intermediate size."""
        hf_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        values = dict(num_experts=1, experts_per_token=1, contrastive=False, candidate_mode="mixture",
                      expert_intermediate_size=hf_config.intermediate_size)
        values.update(overrides)
        return cls.from_target(hf_config, **values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def feature_size(self) -> int:
        """Width of the target features the draft reads from the committed text: ``H`` per
        feature layer plus the last layer's ``H``."""
        return self.hidden_size * (1 + len(self.feature_layers or ()))


def _attention_scale(hf_config) -> float | None:
    """The target's query-key scale when it is not ``head_dim ** -0.5`` (Gemma, Granite)."""
    if getattr(hf_config, "query_pre_attn_scalar", None):
        return float(hf_config.query_pre_attn_scalar) ** -0.5
    if getattr(hf_config, "attention_multiplier", None):
        return float(hf_config.attention_multiplier)
    return None


def _last_layer_type(hf_config) -> str | None:
    types = getattr(hf_config, "layer_types", None)
    return types[hf_config.num_hidden_layers - 1] if types else None


def _last_layer_window(hf_config) -> int | None:
    """The sliding window of the target's last layer (the one the draft continues), or None."""
    window = getattr(hf_config, "sliding_window", None)
    layer_type = _last_layer_type(hf_config)
    if window is None or (layer_type is not None and layer_type != "sliding_attention"):
        return None
    return int(window)


def target_rope(target_model: nn.Module) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_scaling)`` of the target's last layer, as its rotary embedding
    module computed them (``transformers``' own initialisation of every RoPE variant; the
    frequencies before any dynamic update). ``inv_freq`` has ``rotary_dim / 2`` entries."""
    rotary = getattr(target_model.get_decoder(), "rotary_emb", None)
    hf = target_model.config
    hf = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    if rotary is None:
        raise ValueError(f"JakiroDraft: the target ({hf.model_type}) has no rotary_emb module to take its RoPE from")
    layer_type = _last_layer_type(hf)
    for prefix in ([f"{layer_type}_"] if layer_type else []) + [""]:
        inv_freq = getattr(rotary, f"{prefix}original_inv_freq", None)
        if inv_freq is None:
            inv_freq = getattr(rotary, f"{prefix}inv_freq", None)
        if inv_freq is not None:
            return inv_freq.detach().float().clone(), float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
    raise ValueError(f"JakiroDraft: cannot find the inverse frequencies of the target's ({hf.model_type}) "
                     f"rotary embedding")


def most_frequent_tokens(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids of ``counts``, in increasing id order (ties: the
    smaller id wins, so the choice is deterministic). The reduced drafting vocabulary
    (``from_pretrained(draft_vocab=)``) and the training loss's (``jakiro train --loss-vocab``)."""
    size = min(size, counts.numel())
    return torch.sort(counts, descending=True, stable=True).indices[:size].sort().values


def head_rows(head: nn.Module, token_ids: torch.Tensor) -> nn.Linear:
    """A frozen copy of the rows ``token_ids`` of an LM head (its logits for those tokens only)."""
    rows = token_ids.to(head.weight.device)
    sub = nn.Linear(head.in_features, rows.numel(), bias=head.bias is not None, device=head.weight.device,
                    dtype=head.weight.dtype).requires_grad_(False)
    with torch.no_grad():
        sub.weight.copy_(head.weight[rows])
        if head.bias is not None:
            sub.bias.copy_(head.bias[rows])
    return sub


def _attend(q, k, v, mask=None, scale=None):
    """Attention of ``q`` over GQA keys/values, causal when ``mask`` is None."""
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask, is_causal=mask is None, scale=scale)


@dataclass
class DraftOutput:
    """Features of one draft forward, all ``[B, T, H]`` (``experts``: ``[E, B, T, H]``)."""
    mixture: torch.Tensor
    contrastive: torch.Tensor | None = None
    experts: torch.Tensor | None = None


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x, cos, sin):
    """RoPE on the first ``cos.shape[-1]`` dimensions of ``x`` (all of them unless partial)."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    head, tail = x[..., :rotary], x[..., rotary:]
    return torch.cat((head * cos + _rotate_half(head) * sin, tail), dim=-1)


class JakiroDraft(nn.Module):
    """Jakiro draft head. Build it with :meth:`from_target` or :meth:`from_pretrained`."""

    def __init__(self, config: DraftConfig):
        super().__init__()
        self.config = config
        hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                             config.num_key_value_heads, config.head_dim)
        experts, inter = config.num_experts, config.expert_intermediate_size
        # EAGLE-3's fusion of the target's layers into one H-wide feature (None: f_t alone).
        self.fuse = nn.Linear(config.feature_size, hidden, bias=False) if config.feature_layers else None
        self.fc = nn.Linear(2 * hidden, hidden, bias=config.fc_bias)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.post_norm = nn.Parameter(torch.empty(hidden))
        router_logits = experts * (2 if config.contrastive else 1)
        self.router = nn.Linear(hidden, router_logits, bias=False) if experts > 1 else None
        self.w_gate_up = nn.Parameter(torch.empty(experts, 2 * inter, hidden))
        self.w_down = nn.Parameter(torch.empty(experts, hidden, inter))
        # The target's RoPE, set by bind(): rotary_dim / 2 frequencies and the cos/sin scaling.
        self.register_buffer("inv_freq", None, persistent=False)
        self.rope_scaling = 1.0
        self._shared: dict[str, nn.Module] = {}  # the target's embedding and LM head, not submodules
        self.reset_parameters()

    # ----------------------------------------------------------------- construction
    def reset_parameters(self):
        std = 0.02
        for linear in (self.fc, self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.router):
            if linear is not None:
                nn.init.normal_(linear.weight, std=std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        nn.init.constant_(self.post_norm, 0.0 if self.config.norm_unit_offset else 1.0)   # a unit scale
        if self.fuse is not None:
            # The identity on f_t: a new draft starts as a one-feature one, the other layers' weights
            # grow from zero (random ones would drown f_t under three normalised streams).
            hidden = self.config.hidden_size
            nn.init.zeros_(self.fuse.weight)
            with torch.no_grad():
                self.fuse.weight[:, -hidden:] = torch.eye(hidden)
        nn.init.normal_(self.w_gate_up, std=std)
        nn.init.normal_(self.w_down, std=std)

    def bind(self, target_model: nn.Module, dtype: torch.dtype | None = None) -> "JakiroDraft":
        """Shares ``target_model``'s embedding and LM head (frozen) and moves to its device and
        dtype; or, with another ``dtype``, to that dtype with its own frozen copies of the two.

        The draft's precision never changes the output (the target verifies every token), so a
        bfloat16 draft may serve a float32 target: on a CPU that halves the bytes of the LM head
        each tree level streams, the draft's largest cost.
        """
        _check_compatible(self.config, target_model)
        inv_freq, self.rope_scaling = target_rope(target_model)
        if 2 * inv_freq.numel() > self.config.head_dim:
            raise ValueError(f"JakiroDraft: the target's RoPE rotates {2 * inv_freq.numel()} dimensions, more than "
                             f"the draft's head_dim {self.config.head_dim}")
        self.inv_freq = inv_freq
        embed, head = target_model.get_input_embeddings(), target_model.get_output_embeddings()
        for module in (embed, head):
            for p in module.parameters():
                p.requires_grad_(False)
        if dtype is not None and dtype != head.weight.dtype:
            tied = head.weight is embed.weight
            # A copy of the embedding module (its class keeps any scaling, Gemma's) over weights in dtype.
            weight = nn.Parameter(embed.weight.detach().to(dtype), requires_grad=False)
            embed = copy.deepcopy(embed, {id(embed.weight): weight})
            head_copy = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                                  device=head.weight.device, dtype=dtype).requires_grad_(False)
            head_copy.weight = embed.weight if tied else nn.Parameter(head.weight.detach().to(dtype),
                                                                      requires_grad=False)
            if head.bias is not None:
                head_copy.bias = nn.Parameter(head.bias.detach().to(dtype), requires_grad=False)
            head = head_copy
        self._shared = {"embed_tokens": embed, "lm_head": head}
        self.to(device=head.weight.device, dtype=head.weight.dtype)
        self.inv_freq = self.inv_freq.float()     # positions x frequencies stay fp32, as in the target
        return self

    @classmethod
    def from_target(cls, target_model: nn.Module, eagle2: bool = False, **config_overrides) -> "JakiroDraft":
        """A freshly initialised draft for ``target_model`` (``eagle2=True``: the EAGLE-2 configuration)."""
        make = DraftConfig.eagle2 if eagle2 else DraftConfig.from_target
        return cls(make(target_model.config, **config_overrides)).bind(target_model)

    def save_pretrained(self, directory: str | os.PathLike):
        """Writes config.json and model.safetensors (the draft's own weights only)."""
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        state = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME))

    def save_token_counts(self, directory: str | os.PathLike, counts: torch.Tensor):
        """Stores how often each token occurred in the training data next to the weights, so a
        reduced drafting vocabulary can be chosen at load time (``draft_vocab``)."""
        from safetensors.torch import save_file
        if counts.shape != (self.config.vocab_size,):
            raise ValueError(f"JakiroDraft: token counts must be [{self.config.vocab_size}], got {tuple(counts.shape)}")
        os.makedirs(directory, exist_ok=True)
        save_file({"counts": counts.to(torch.int64).contiguous()}, os.path.join(directory, COUNTS_NAME))

    def restrict_vocab(self, token_ids: torch.Tensor) -> "JakiroDraft":
        """Drafts only ``token_ids`` (sorted, distinct): trees are grown from the LM head's rows
        of those tokens, a fraction of the full head's bytes per tree level. A token outside the
        set is never proposed, so the target then accepts nothing past it (the output is
        unchanged, as always). Training and the target are unaffected."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.int64).flatten()
        if token_ids.numel() == 0 or bool((token_ids[1:] <= token_ids[:-1]).any()) or \
                int(token_ids[0]) < 0 or int(token_ids[-1]) >= self.config.vocab_size:
            raise ValueError("JakiroDraft.restrict_vocab: token_ids must be sorted, distinct ids in "
                             f"[0, {self.config.vocab_size})")
        self._shared["draft_head"] = head_rows(self.lm_head, token_ids)
        self._draft_vocab = token_ids.to(self.lm_head.weight.device)
        return self

    def inference_modules(self) -> list[nn.Module]:
        """The draft and the shared heads a tree expansion runs (what :mod:`jakiro.cpu_routing` routes)."""
        return [self, self.lm_head] + ([self._shared["draft_head"]] if "draft_head" in self._shared else [])

    @property
    def drafting_vocab_size(self) -> int:
        """How many tokens trees are drafted from (the vocabulary, or the restricted set)."""
        return int(self._draft_vocab.numel()) if "draft_head" in self._shared else self.config.vocab_size

    def candidate_logits(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits the tree is drafted from, and the token id of each column (None: all tokens)."""
        if "draft_head" in self._shared:
            return self._shared["draft_head"](feature), self._draft_vocab
        return self.lm_head(feature), None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, target: nn.Module, candidate_mode: str | None = None,
                        dtype: torch.dtype | None = None, draft_vocab: int | None = None) -> "JakiroDraft":
        """Loads a draft saved by :meth:`save_pretrained` and binds it to ``target`` (in
        ``dtype``, default the target's: see :meth:`bind`).

        ``candidate_mode`` overrides the saved one (it only changes how trees are drafted, so
        one set of weights serves "mixture" and "per_expert"). ``draft_vocab``: draft from the
        ``draft_vocab`` most frequent tokens of the training data (:meth:`restrict_vocab`; needs the
        token counts ``jakiro train`` saves with the draft).

        Raises ValueError naming the file when one is missing or unreadable (a truncated or
        garbage safetensors file, a config that is not one), and when the target does not
        match the draft (architecture, hidden size, vocabulary, head layout).
        """
        config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise ValueError(f"JakiroDraft.from_pretrained: {path} does not exist")
        try:
            with open(config_path) as f:
                values = json.load(f)
            if not isinstance(values, dict):
                raise ValueError("not a JSON object")
            for key in LEGACY_FIELDS:
                values.pop(key, None)
            if candidate_mode is not None:
                values["candidate_mode"] = candidate_mode
            config = DraftConfig(**values)
        except (OSError, ValueError, TypeError) as error:   # JSONDecodeError is a ValueError
            raise ValueError(f"JakiroDraft.from_pretrained: {config_path} is not a draft configuration: "
                             f"{error}") from None
        _check_compatible(config, target)
        draft = cls(config)
        try:
            draft.load_state_dict(_load_tensors(weights_path), strict=True)
        except RuntimeError as error:   # missing, unexpected or misshapen tensors
            problems = " ".join(str(error).split())
            raise ValueError(f"JakiroDraft.from_pretrained: {weights_path} does not hold this draft's weights: "
                             f"{problems}") from None
        draft.bind(target, dtype)
        if draft_vocab is not None and draft_vocab < config.vocab_size:
            counts_path = os.path.join(directory, COUNTS_NAME)
            if not os.path.isfile(counts_path):
                raise ValueError(f"JakiroDraft.from_pretrained: draft_vocab needs {counts_path} (written by "
                                 f"`jakiro train`)")
            if draft_vocab < 1:
                raise ValueError(f"JakiroDraft.from_pretrained: draft_vocab must be >= 1, got {draft_vocab}")
            counts = _load_tensors(counts_path).get("counts")
            if counts is None or counts.shape != (config.vocab_size,):
                raise ValueError(f"JakiroDraft.from_pretrained: {counts_path} holds no 'counts' tensor of "
                                 f"[{config.vocab_size}]")
            draft.restrict_vocab(most_frequent_tokens(counts, draft_vocab))
        return draft

    # ----------------------------------------------------------------- forward
    @property
    def embed_tokens(self) -> nn.Module:
        return self._shared["embed_tokens"]

    @property
    def lm_head(self) -> nn.Module:
        return self._shared["lm_head"]

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(1, batch, self.config.num_key_value_heads, self.config.head_dim, capacity,
                       self.fc.weight.dtype, self.fc.weight.device)

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                cache: KVCache | None = None, step: AttentionStep | None = None, *,
                return_contrastive: bool = False, return_experts: bool = False) -> DraftOutput:
        """One draft pass over pairs ``(f_t, x_{t+1})``.

        Args:
            hidden: ``[B, T, F]`` target features ``f_t`` (``F = config.feature_size``: with
                ``feature_layers``, the chosen layers then the last, concatenated) or ``[B, T, H]``
                the draft's own predictions.
            input_ids: int64 ``[B, T]`` the tokens ``x_{t+1}``.
            position_ids: int ``[B, T]`` the positions ``t``.
            cache, step: where the keys go and what each query sees (``jakiro.ops.tree_attention``
                over the cache: decoding). None for both: a plain causal pass over the T pairs
                with ``scaled_dot_product_attention``, differentiable (training).
            return_contrastive: also return the contrastive feature (needs ``contrastive``).
            return_experts: also return every expert's own feature.
        """
        self._check_inputs(hidden, input_ids, position_ids, return_contrastive)
        if (cache is None) != (step is None):
            raise ValueError("JakiroDraft: pass both cache and step, or neither")
        z = self._input(hidden, input_ids)
        q, k, v = self._qkv(z, position_ids)
        config = self.config
        if cache is None:
            attn = _attend(q, k, v, self._window_mask(hidden.shape[1], 0, hidden.device), config.attention_scale)
        else:
            attn = cache.attend(0, q, k, v, step, config.attention_scale, window=config.sliding_window)  # [B, Hq, T, D]
        return self._layer_output(z, attn, return_contrastive, return_experts)

    def rollout(self, hidden: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor, rounds: int, *,
                return_contrastive: bool = False) -> list[DraftOutput]:
        """Training-time test (EAGLE-3): ``rounds`` differentiable passes over the same pairs, pass
        ``r`` drafting as decoding does ``r`` levels below the committed prefix.

        Pass 0 is the plain causal :meth:`forward` over the target's features. Pass ``r`` reads at
        position ``t`` the pass-``r-1`` prediction made at ``t-1`` (detached) in place of ``f_t``
        (position 0 keeps ``f_0``) and attends as a chain node does while decoding: to pass 0's
        keys at positions ``<= t-r`` (the committed prefix, computed from target features) and to
        pass ``i``'s key at ``t-r+i`` for ``i = 1..r`` (the chain's drafted nodes, itself last).
        Every pass predicts ``f_{t+1}``, so all passes train against the same targets.
        """
        if rounds < 1:
            raise ValueError(f"JakiroDraft.rollout: rounds must be >= 1, got {rounds}")
        self._check_inputs(hidden, input_ids, position_ids, return_contrastive)
        length = hidden.shape[1]
        at = torch.arange(length, device=hidden.device)
        keys, values, outputs, features = [], [], [], hidden
        for r in range(rounds):
            if r:
                features = torch.cat((self.fused_feature(hidden[:, :1]).to(outputs[-1].mixture.dtype),
                                      outputs[-1].mixture[:, :-1].detach()), dim=1)
            z = self._input(features, input_ids)
            q, k, v = self._qkv(z, position_ids)
            keys.append(k)
            values.append(v)
            # [T, (r+1) T]: the causal prefix of pass 0 shifted by r, then one diagonal per later pass
            # (pass i's key is r - i positions behind the query: beyond a sliding window it is dropped).
            window = self.config.sliding_window or length + rounds
            mask = self._window_mask(length, 0, hidden.device) if r == 0 else torch.cat(
                [self._window_mask(length, r, hidden.device)] +
                [(at[None, :] == at[:, None] - r + i) & (r - i < window) for i in range(1, r + 1)], dim=1)
            attn = _attend(q, torch.cat(keys, 2), torch.cat(values, 2), mask, self.config.attention_scale)
            outputs.append(self._layer_output(z, attn, return_contrastive, False))
        return outputs

    def _window_mask(self, length: int, shift: int, device) -> torch.Tensor | None:
        """``[T, T]``: query ``t`` sees the keys ``s <= t - shift`` within the sliding window (None:
        plain causal, no window in reach)."""
        window = self.config.sliding_window
        if shift == 0 and (window is None or window >= length):
            return None
        at = torch.arange(length, device=device)
        distance = at[:, None] - at[None, :]
        return (distance >= shift) & (distance < (window or length + 1))

    def _check_inputs(self, hidden, input_ids, position_ids, return_contrastive):
        config = self.config
        if hidden.dim() != 3 or hidden.shape[-1] not in (config.hidden_size, config.feature_size):
            widths = f"{config.feature_size} (target features) or {config.hidden_size} (the draft's own)" \
                if config.feature_layers else str(config.hidden_size)
            raise ValueError(f"JakiroDraft: hidden must be [B, T, {widths}], got {tuple(hidden.shape)}")
        if input_ids.shape != hidden.shape[:2] or position_ids.shape != hidden.shape[:2]:
            raise ValueError("JakiroDraft: input_ids and position_ids must be [B, T] like hidden")
        if return_contrastive and not config.contrastive:
            raise ValueError("JakiroDraft: return_contrastive needs a draft built with contrastive=True")

    def fused_feature(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]``: target features of width ``feature_size`` fused into one (each lower
        layer RMS-normalised: residual streams differ in scale by orders of magnitude); an
        ``H``-wide feature (the last layer's, or the draft's own) is returned as it is."""
        hidden = hidden.to(self.fc.weight.dtype)          # target features may be wider than the draft
        size = self.config.hidden_size
        if self.fuse is None or hidden.shape[-1] == size:
            return hidden
        lower, last = hidden[..., :-size], hidden[..., -size:]
        lower = F.rms_norm(lower.unflatten(-1, (-1, size)), (size,), eps=self.config.rms_norm_eps).flatten(-2)
        return self.fuse(torch.cat((lower, last), dim=-1))

    def _input(self, hidden, input_ids):
        """``z = fc([embed(x_{t+1}); f_t])`` in the draft's dtype (``f_t`` fused first)."""
        hidden = self.fused_feature(hidden)
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        return self.fc(torch.cat((embeds, hidden), dim=-1))

    def _qkv(self, z, position_ids):
        """Queries, keys and values ``[B, heads, T, D]`` of ``z``, rotated to their positions."""
        config = self.config
        if self.inv_freq is None:
            raise RuntimeError("JakiroDraft: bind the draft to its target first (from_target, from_pretrained, bind)")
        batch, length, _ = z.shape
        q = self.q_proj(z).view(batch, length, -1, config.head_dim).transpose(1, 2)
        k = self.k_proj(z).view(batch, length, -1, config.head_dim).transpose(1, 2)
        v = self.v_proj(z).view(batch, length, -1, config.head_dim).transpose(1, 2)
        angles = position_ids.to(torch.float32).unsqueeze(-1) * self.inv_freq        # [B, T, R/2]
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)                   # [B, 1, T, R]
        cos, sin = angles.cos(), angles.sin()
        if self.rope_scaling != 1.0:
            cos, sin = cos * self.rope_scaling, sin * self.rope_scaling
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _layer_output(self, z, attn, return_contrastive, return_experts) -> DraftOutput:
        """The rest of the layer after attention: residual, norm, the MoE under its routing heads."""
        config = self.config
        batch, length, _ = z.shape
        h = z + self.o_proj(attn.transpose(1, 2).reshape(batch, length, -1))
        weight = self.post_norm + 1.0 if config.norm_unit_offset else self.post_norm
        u = F.rms_norm(h, (config.hidden_size,), weight, config.rms_norm_eps)
        flat = u.reshape(batch * length, -1)
        coeff = self._routing(flat, return_contrastive, return_experts)
        moe = ops.expert_mlp(flat, self.w_gate_up, self.w_down, coeff, activation=config.hidden_act)  # [R, B*T, H]
        features = h.unsqueeze(0) + moe.view(-1, batch, length, config.hidden_size)
        head = 1
        contrastive = experts = None
        if return_contrastive:
            contrastive, head = features[head], head + 1
        if return_experts:
            experts = features[head:head + config.num_experts]
        return DraftOutput(features[0], contrastive, experts)

    def _routing(self, u: torch.Tensor, contrastive: bool, experts: bool) -> torch.Tensor:
        """Coefficients ``[T, R, E]`` of the routing heads (mixture, [contrastive], [each expert])."""
        num = self.config.num_experts
        tokens = u.shape[0]
        heads = []
        if num == 1:
            heads.append(u.new_ones((tokens, 1), dtype=torch.float32))
        else:
            logits = self.router(u).float()
            top = logits[:, :num].topk(self.config.experts_per_token, dim=-1)
            mix = torch.zeros((tokens, num), dtype=torch.float32, device=u.device)
            heads.append(mix.scatter(1, top.indices, torch.softmax(top.values, dim=-1)))
            if contrastive:
                pair = logits[:, num:2 * num].topk(2, dim=-1)
                probs = torch.softmax(pair.values, dim=-1)      # (v_a, v_b) -> (v_a, -v_b): no host tensor
                signed = torch.stack((probs[:, 0], -probs[:, 1]), dim=1)
                heads.append(torch.zeros_like(mix).scatter(1, pair.indices, signed))
        if experts:
            heads.extend(torch.eye(num, device=u.device).expand(tokens, num, num).unbind(1))
        return torch.stack(heads, dim=1).contiguous()


def _load_tensors(path: str) -> dict:
    """A safetensors file's tensors; ValueError naming ``path`` when it is truncated or not one."""
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for a bad header or data
        raise ValueError(f"JakiroDraft.from_pretrained: {path} is not a readable safetensors file ({error})") from None


def _check_compatible(config: DraftConfig, target_model: nn.Module):
    hf = target_model.config
    hf = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    problems = []
    if config.target_model_type is not None and hf.model_type != config.target_model_type:
        problems.append(f"architecture {hf.model_type!r} != {config.target_model_type!r}")
    if hf.hidden_size != config.hidden_size:
        problems.append(f"hidden size {hf.hidden_size} != {config.hidden_size}")
    if hf.vocab_size != config.vocab_size:
        problems.append(f"vocabulary {hf.vocab_size} != {config.vocab_size}")
    if config.feature_layers and config.feature_layers[-1] >= hf.num_hidden_layers:
        problems.append(f"feature_layers {config.feature_layers} reach past the target's layers below the last "
                        f"(hidden_states 0..{hf.num_hidden_layers - 1})")
    if problems:
        raise ValueError("JakiroDraft: the target does not match this draft: " + "; ".join(problems))

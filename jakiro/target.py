"""Adapter that runs an unmodified Hugging Face causal LM over a jakiro KV cache.

:class:`TargetModel` keeps its own copy of the model's module tree over the same parameters and
buffers (no weight is copied), with its own config whose attention implementation is
``"jakiro"``: the backend this module registers with ``transformers.AttentionInterface`` (on the
first :class:`TargetModel`; a name that only models selecting it use). The backend reads the
cache and the :class:`~jakiro.kv_cache.AttentionStep` from the attention kwargs; everything else
about the model (weights, RoPE, norms, biases) is the model's own code. The user's model object
is never changed, so ``model.generate(...)`` keeps working as before, also in another thread
while jakiro runs. The copy snapshots the module tree: after moving or changing the model, build
a new :class:`TargetModel` (:meth:`TargetModel.of` keeps one per model).

The model is called with ``use_cache=False`` and no ``attention_mask``: the cache and the
tree mask live in the step, and positions come in as ``position_ids``. A layer's sliding window
and attention logit soft-cap arrive as the attention call's ``sliding_window`` / ``softcap``
arguments and go to ``tree_attention`` as they are; the cache keeps the whole sequence, so
sliding-window layers keep working past their window. What the family's ``ForCausalLM`` does to
the LM head's output (Gemma's final logit soft-cap) is repeated in :meth:`TargetModel.forward`.

On the CPU the copy's ``nn.Linear`` layers (the LM head included) run
``torch.ops.jakiro.linear`` (unless ``JAKIRO_CALIBRATE=all`` measured ``F.linear`` faster for a
layer: :mod:`jakiro.calibration`), its RMSNorm layers ``torch.ops.jakiro.rms_norm``, and during a
forward pass its rotary embedding ``torch.ops.jakiro.rotary_embedding``
(:mod:`jakiro.cpu_routing`).
"""
from __future__ import annotations

import copy
import itertools
import threading
import weakref

import torch
import transformers

from jakiro import calibration
from jakiro.cpu_routing import cpu_routes, install, route_kind, use_kernels
from jakiro.kv_cache import AttentionStep, KVCache

BACKEND_NAME = "jakiro"

# Model families (``config.model_type``) whose decoder layers call ALL_ATTENTION_FUNCTIONS with
# (module, q, k, v, mask, scaling=, sliding_window=, softcap=), take position_ids, and whose
# ForCausalLM computes logits as lm_head(final hidden state), followed at most by Gemma's final
# soft-cap: the ones this adapter is tested with (tests/test_families.py), each against the
# family's own greedy generate.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3",
                         "olmo2", "helium", "smollm3")
# Families known not to fit, with the reason (anything else unlisted: "not tested").
UNSUPPORTED_REASONS = {
    "gemma3": "the multimodal Gemma 3 model; load its text model (Gemma3ForCausalLM, model_type 'gemma3_text')",
    "granite": "its ForCausalLM divides the logits by logits_scaling after the LM head",
    "cohere": "its ForCausalLM scales the logits by logit_scale after the LM head",
    "cohere2": "its ForCausalLM scales the logits by logit_scale after the LM head",
}


def _jakiro_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      softcap=None, **kwargs):
    """The registered backend: ``query`` ``[B, Hq, Nq, D]``, ``key``/``value`` ``[B, Hkv, Nq, D]``
    (rotated, new tokens only). Returns ``([B, Nq, Hq, D], None)`` as transformers expects."""
    cache = kwargs.get("jakiro_cache")
    step = kwargs.get("jakiro_step")
    if cache is None or step is None:
        raise RuntimeError("the 'jakiro' attention backend only runs inside jakiro.target.TargetModel.forward")
    out = cache.attend(module.layer_idx, query, key, value, step, scaling, window=sliding_window, softcap=softcap)
    return out.transpose(1, 2), None


def _shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree of ``model`` over the same parameter and buffer tensors, with its own
    config and module objects (routes and the attention choice then change only the copy)."""
    shared = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)


def _text_config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"target: expected a Hugging Face causal LM, got {type(model).__name__} (no config)")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class TargetModel:
    """A Hugging Face causal LM seen as: a KV cache factory + a forward pass that returns
    logits and final-norm hidden states for a block of tokens (prefill, chain or tree).

    ``kernels``: which CPU layers run on jakiro's ops (``"linear"``, ``"rms_norm"``,
    ``"rotary_embedding"``; all by default, ``()`` for the model's own code).
    """

    _per_model = weakref.WeakKeyDictionary()
    _per_model_lock = threading.Lock()

    def __init__(self, model: torch.nn.Module, kernels=("linear", "rms_norm", "rotary_embedding")):
        config = _text_config(model)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            # The adapter relies on how these families call ALL_ATTENTION_FUNCTIONS and make logits.
            why = UNSUPPORTED_REASONS.get(model_type, "not tested with jakiro's attention backend")
            raise ValueError(f"target: model_type {model_type!r} is not supported ({why}); supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(f"target: this {model_type} model attends bidirectionally (an encoder, e.g. for "
                             f"embeddings): speculative decoding needs a causal model")
        transformers.AttentionInterface.register(BACKEND_NAME, _jakiro_attention)
        self.model = model
        self.config = config
        self._copy = _shared_copy(model)
        self._copy.config._attn_implementation = BACKEND_NAME
        self.decoder = self._copy.get_decoder()
        self.lm_head = self._copy.get_output_embeddings()
        self.num_layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.final_logit_softcap = getattr(config, "final_logit_softcapping", None)
        # CPU layers on jakiro's kernels (``kernels``: which of them; () keeps the model's own code).
        # Linear layers: the kernel everywhere (batch-invariant), or with JAKIRO_CALIBRATE=all one
        # op per layer for every row count, the faster on this CPU (jakiro.calibration).
        self._kernel_routes = [route for route in cpu_routes((self.decoder, self.lm_head), calibration.TARGET)
                               if route_kind(route) in kernels]
        install([route for route in self._kernel_routes if route[1] == "forward"])     # the copy's own layers
        self._call_routes = [route for route in self._kernel_routes if route[1] != "forward"]  # module functions

    @classmethod
    def of(cls, model) -> "TargetModel":
        """The adapter of ``model`` (built once per model object and reused), or ``model`` itself
        when it already is one."""
        if isinstance(model, TargetModel):
            return model
        # Rebuilt when the model's tensors changed identity (`.to()` replaces buffers, a layer swap).
        tensors = tuple(map(id, itertools.chain(model.parameters(), model.buffers())))
        with cls._per_model_lock:
            known = cls._per_model.get(model)
            if known is None or known[0] != tensors:
                known = cls._per_model[model] = (tensors, cls(model))
            return known[1]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """A zeroed cache for ``batch`` rows of up to ``capacity`` tokens each (sliding-window
        layers too: they mask what lies outside their window)."""
        return KVCache(self.num_layers, batch, self.kv_heads, self.head_dim, capacity, self.dtype, self.device)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                step: AttentionStep, feature_layers: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs ``input_ids`` ``[B, Nq]`` at ``position_ids`` ``[B, Nq]`` through the model,
        writing their KV into ``cache`` as ``step`` says.

        Returns ``(logits [B, Nq, V], features)``: ``features`` ``[B, Nq, H]`` is the last layer's
        output after the final norm (what the LM head reads, the draft's input feature); with
        ``feature_layers`` (indices of Hugging Face's ``hidden_states``, a multi-layer draft's
        ``config.feature_layers``) those residual streams come first, ``[B, Nq, (n + 1) H]``,
        from the same pass. Does not change ``cache.lengths``.
        """
        with use_kernels(self._call_routes):
            out = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                               jakiro_cache=cache, jakiro_step=step, output_hidden_states=bool(feature_layers))
            hidden = out.last_hidden_state
            logits = self.lm_head(hidden)
            if self.final_logit_softcap:        # Gemma 2/3: what their ForCausalLM does after the head
                logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
            return logits, decoder_features(out, feature_layers)


def decoder_features(out, feature_layers: list[int] | None) -> torch.Tensor:
    """What a draft reads from a decoder's output (run with ``output_hidden_states`` when
    ``feature_layers`` is set): the last layer's output after the final norm, after the residual
    streams ``hidden_states[i]`` of ``feature_layers``, concatenated ``[..., (n + 1) H]``."""
    if not feature_layers:
        return out.last_hidden_state
    return torch.cat([out.hidden_states[i] for i in feature_layers] + [out.last_hidden_state], dim=-1)

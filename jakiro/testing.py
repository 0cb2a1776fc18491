"""Input generators shared by the tests and the benchmarks (not needed at run time).

Trees are in the format of ``docs/architecture.md`` (Tree format); expert inputs follow the
``expert_mlp`` contract there.
"""
from __future__ import annotations

import contextlib

import torch

SHAPES = ("chain", "star", "binary", "random")


def make_parents(shape: str, batch: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """int32 [batch, n] parents of trees of the given shape (node 0 the root)."""
    idx = torch.arange(n)
    if shape == "chain":
        row = idx - 1
        parents = row.expand(batch, n)
    elif shape == "star":
        parents = torch.zeros(batch, n, dtype=torch.long)
    elif shape == "binary":
        parents = ((idx - 1) // 2).expand(batch, n)
    elif shape == "random":
        # each node picks a uniformly random earlier node as parent
        u = torch.rand(batch, n, generator=generator)
        parents = (u * idx).floor().long()
    else:
        raise ValueError(f"unknown tree shape {shape!r}; expected one of {SHAPES}")
    parents = parents.clone().to(torch.int32)
    parents[:, 0] = -1
    return parents


def make_tree_attention_inputs(*, batch: int, hq: int, hkv: int, nq: int, head_dim: int, prefix_lens,
                               tree_len: int | None = None, tree_shape: str | None = "random",
                               dtype: torch.dtype = torch.float32, device="cpu",
                               generator: torch.Generator | None = None, spare_keys: int = 3,
                               strided: bool = False) -> dict:
    """Random arguments of ``tree_attention`` (as keyword arguments) plus the tree's parents.

    Row b has ``prefix_lens[b]`` committed keys followed by ``tree_len`` tree keys (default
    ``nq``: a verify pass), and the cache ``spare_keys`` more positions than the longest row
    (garbage there must never be read). With a tree shape, the mask rows are those of the
    last ``nq`` nodes of a ``tree_len``-node tree (``nq < tree_len``: the draft's frontier);
    ``tree_shape=None`` gives no mask (causal). ``strided=True`` makes k/v views of a
    ``[B, S_max, Hkv, D]`` cache. Values are drawn on the CPU, so a seed gives the same
    inputs on every device.
    """
    tree_len = nq if tree_len is None else tree_len
    prefix = torch.as_tensor(prefix_lens, dtype=torch.int32).expand(batch).clone()
    seqlens = prefix + tree_len
    cache_size = int(seqlens.max()) + spare_keys if batch else tree_len + spare_keys

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    device = torch.device(device)
    q = randn(batch, hq, nq, head_dim).to(device)
    if strided:
        # views of a preallocated [B, S_max, Hkv, D] cache, made on the device (a copy
        # would make them contiguous)
        k_cache = randn(batch, cache_size + 5, hkv, head_dim).to(device)[:, :cache_size].transpose(1, 2)
        v_cache = randn(batch, cache_size + 5, hkv, head_dim).to(device)[:, :cache_size].transpose(1, 2)
    else:
        k_cache = randn(batch, hkv, cache_size, head_dim).to(device)
        v_cache = randn(batch, hkv, cache_size, head_dim).to(device)
    parents = tree_mask = None
    if tree_shape is not None:
        parents = make_parents(tree_shape, batch, max(tree_len, 1), generator)[:, :tree_len]
        from jakiro.reference import build_tree_mask  # the oracle, so inputs never depend on a kernel

        mask = build_tree_mask(parents)[0] if tree_len else torch.zeros(batch, 0, 0, dtype=torch.int32)
        tree_mask = mask[:, tree_len - nq:] if tree_len else torch.zeros(batch, nq, 0, dtype=torch.int32)
        tree_mask = tree_mask.contiguous().to(device)
    return {
        "q": q, "k_cache": k_cache, "v_cache": v_cache,
        "cache_seqlens": seqlens.to(device), "tree_mask": tree_mask, "tree_len": tree_len,
        "scale": head_dim ** -0.5, "parents": parents,
    }


def _sibling_rank(parents: torch.Tensor) -> torch.Tensor:
    """int64 [B, N]: how many earlier siblings each node has (0 for the first child and the root)."""
    batch, n = parents.shape
    same = parents.unsqueeze(2) == parents.unsqueeze(1)  # [B, i, j]: i and j share a parent
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)
    return (same & earlier).sum(-1)


def make_verify_inputs(batch: int, n: int, vocab: int, *, shape: str = "random", match: float = 0.7,
                       repeat: float = 0.15, dtype: torch.dtype = torch.float32, scale: float = 3.0,
                       generator: torch.Generator | None = None):
    """Random ``(tokens, parents, logits)`` for verify_greedy / verify_sampling.

    A node's token is, with probability ``match``, the argmax of its parent's logits (so
    greedy walks go deep and sampling accepts often); else a random id; with probability
    ``repeat`` it copies its previous sibling's token (repeated sibling tokens).
    """
    parents = make_parents(shape, batch, n, generator)
    logits = (torch.randn(batch, n, vocab, generator=generator) * scale).to(dtype)
    parent_idx = parents.long().clamp(min=0)
    favourite = logits.float().argmax(-1).gather(1, parent_idx)
    random_ids = torch.randint(0, vocab, (batch, n), generator=generator)
    tokens = torch.where(torch.rand(batch, n, generator=generator) < match, favourite, random_ids)
    rank = _sibling_rank(parents)
    copy = (torch.rand(batch, n, generator=generator) < repeat) & (rank > 0)
    for b, i in copy.nonzero().tolist():
        earlier = [j for j in range(i) if parents[b, j] == parents[b, i]]
        tokens[b, i] = tokens[b, earlier[-1]]
    tokens[:, 0] = random_ids[:, 0]
    return tokens, parents, logits


def make_kv_moves(batch: int, n: int, seq_len: int, *, shape: str = "random",
                  generator: torch.Generator | None = None):
    """Random ``(prefix_len, path, accept_len)`` of accepted root-to-node paths (path[j] >= j,
    increasing), each fitting in a cache of ``seq_len`` rows."""
    parents = make_parents(shape, batch, n, generator)
    path = torch.full((batch, n), -1, dtype=torch.int32)
    accept_len = torch.zeros(batch, dtype=torch.int32)
    prefix_len = torch.zeros(batch, dtype=torch.int32)
    for b in range(batch):
        node = n - 1 if shape == "chain" else int(torch.randint(0, n, (1,), generator=generator))
        chain = [node]
        while chain[-1] != 0:
            chain.append(int(parents[b, chain[-1]]))
        chain.reverse()
        path[b, : len(chain)] = torch.tensor(chain, dtype=torch.int32)
        accept_len[b] = len(chain) - 1
        prefix_len[b] = int(torch.randint(0, seq_len - n + 1, (1,), generator=generator))
    return prefix_len, path, accept_len

COEFF_PATTERNS = ("dense", "top1", "top2", "zero_rows", "signed")


def make_coeff(pattern: str, tokens: int, heads: int, experts: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 [tokens, heads, experts] routing coefficients.

    dense: a softmax over all experts per head; top1/top2: the softmax weights of each
    token's top-k experts (chosen once per token, shared by the heads), zero elsewhere;
    zero_rows: dense, but every third token has no expert at all; signed: Jakiro's
    contrastive style, head 0 a softmax and the other heads signed random weights.
    """
    logits = torch.randn(tokens, heads, experts, generator=generator)
    weights = logits.softmax(-1)
    if pattern == "dense":
        return weights
    if pattern in ("top1", "top2"):
        k = min(int(pattern[-1]), experts)
        chosen = logits.mean(1).topk(k, dim=-1).indices                        # [T, k]
        mask = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, chosen, True)
        picked = torch.where(mask.unsqueeze(1), logits, torch.full_like(logits, float("-inf")))
        return picked.softmax(-1)
    if pattern == "zero_rows":
        weights[::3] = 0
        return weights
    if pattern == "signed":
        signed = torch.randn(tokens, heads, experts, generator=generator)
        signed[:, 0] = weights[:, 0]
        return signed
    raise ValueError(f"unknown coefficient pattern {pattern!r}; expected one of {COEFF_PATTERNS}")


def make_expert_mlp_inputs(tokens: int, hidden: int, intermediate: int, experts: int, heads: int,
                           pattern: str = "dense", dtype: torch.dtype = torch.float32,
                           device: torch.device | str = "cpu", generator: torch.Generator | None = None):
    """(x, w_gate_up, w_down, coeff) for expert_mlp, scaled so every stage stays O(1).

    coeff is float32, or float64 when dtype is (so gradcheck perturbs it precisely)."""
    x = torch.randn(tokens, hidden, generator=generator)
    w_gate_up = torch.randn(experts, 2 * intermediate, hidden, generator=generator) / hidden**0.5
    w_down = torch.randn(experts, hidden, intermediate, generator=generator) / intermediate**0.5
    coeff = make_coeff(pattern, tokens, heads, experts, generator)
    return (x.to(device, dtype), w_gate_up.to(device, dtype), w_down.to(device, dtype), coeff.to(device, torch.float64 if dtype == torch.float64 else torch.float32))


def make_expert_offsets(tokens: int, experts: int, empty: int = 0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """int32 [experts + 1] offsets of rows sorted by expert: random segment sizes summing to
    ``tokens``, with the first ``empty`` of the odd-numbered experts forced empty."""
    cuts = torch.randint(0, tokens + 1, (experts - 1,), generator=generator).sort().values
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.full((1,), tokens)])
    for e in list(range(1, experts, 2))[:empty]:
        if e + 1 < experts:
            offsets[e + 1] = offsets[e]  # segment e becomes empty, segment e + 1 absorbs its rows
        else:
            offsets[e] = offsets[e + 1]  # the last segment becomes empty, segment e - 1 absorbs it
    return offsets.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Tiny Hugging Face targets, drafts and prompts for the generation tests and benchmarks.

# Tiny configurations of the families the target adapter serves: (config class, model class,
# family-specific settings). Sizes come from make_tiny_target's arguments.
TINY_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    # Llama 3.x RoPE scaling with a short original context, so that the scaling changes the frequencies.
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True)),   # q/k RMSNorm inside attention
    # Every other layer local, Gemma's (1 + w) norms, scaled embedding, GeGLU, query_pre_attn_scalar.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        tie_word_embeddings=True, sliding_window=8, layer_types=None, sliding_window_pattern=2,
        query_pre_attn_scalar=48, final_logit_softcapping=None)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=48, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)),
    # Fused qkv and gate/up projections, partial rotary (Phi-3.5 / Phi-4-mini rotate 3/4 of a head).
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False, partial_rotary_factor=0.75,
                                                   pad_token_id=None)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(tie_word_embeddings=False)),
    "helium": ("HeliumConfig", "HeliumForCausalLM", dict(tie_word_embeddings=False, head_dim=32)),  # o_proj: H x H
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(tie_word_embeddings=True, no_rope_layer_interval=2)),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=8,
                                                                    layer_types=["sliding_attention", "full_attention"])),
}


def make_tiny_target(family: str = "llama", *, vocab: int = 256, hidden: int = 64, layers: int = 2,
                     heads: int = 2, kv_heads: int = 1, head_dim: int = 64, intermediate: int = 128,
                     seed: int = 0, residual_scale: float = 1.0, max_positions: int = 1024, **config_overrides):
    """A randomly initialised float32 causal LM of ``family`` (a key of :data:`TINY_FAMILIES`:
    llama: GQA + untied head; qwen2: qkv bias + tied embeddings; mistral: GQA, untied; qwen3:
    q/k norms, tied; llama3, gemma3, gemma2, phi3, ...: see there) in eval mode.
    ``config_overrides`` go to the config (e.g. ``sliding_window``).

    ``residual_scale`` < 1 shrinks what attention and MLP add to the residual stream, so the
    next token depends mostly on the current one (a target a rigged draft can predict).
    """
    import transformers
    if family not in TINY_FAMILIES:
        raise ValueError(f"make_tiny_target: unknown family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    config_name, model_name, settings = TINY_FAMILIES[family]
    values = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    values.update(settings)
    values.update(config_overrides)
    config = getattr(transformers, config_name)(**values)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    if residual_scale != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                attention, mlp = layer.self_attn, layer.mlp
                attention.o_proj.weight.mul_(residual_scale)
                mlp.down_proj.weight.mul_(residual_scale)
    return model


def save_tiny_target_and_draft(root, seed: int = 3):
    """Saves a tiny Llama target (:func:`make_tiny_target`, 256 tokens) with a word-level tokenizer
    (``<unk>``, ``<eos>``, then ``w0`` .. ``w253``: word ``wN`` is token ``N + 2``) to ``root/target``
    and a fresh draft for it to ``root/draft``: what the command-line tests run. Returns the target."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jakiro.draft import JakiroDraft
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(254)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    target = make_tiny_target("llama", seed=seed)
    target.save_pretrained(f"{root}/target")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(
        f"{root}/target")
    torch.manual_seed(seed + 1)
    JakiroDraft.from_target(target).save_pretrained(f"{root}/draft")
    return target


def rig_draft(draft, sharpness: float = 80.0):
    """Makes ``draft`` predict from the next token alone: ``out = c * embed(x_{t+1})`` with
    ``c = sharpness / rms(embedding)`` (features ``sharpness`` times the target's RMS-normed scale).

    Against a target made with a small ``residual_scale`` this draft proposes the target's
    greedy token most of the time (long accepted paths, bonus tokens); ``sharpness`` makes its
    distribution peaked, so trees grow deep along that guess. Returns ``draft``.
    """
    hidden = draft.config.hidden_size
    with torch.no_grad():
        scale = sharpness / float(draft.embed_tokens.weight.float().pow(2).mean().sqrt())
        draft.fc.weight.zero_()
        draft.fc.weight[:, :hidden].copy_(scale * torch.eye(hidden))
        if draft.fc.bias is not None:
            draft.fc.bias.zero_()
        draft.o_proj.weight.zero_()
        draft.w_down.zero_()
    return draft


def make_prompts(batch: int, vocab: int, min_len: int, max_len: int, generator: torch.Generator | None = None):
    """Random prompts of lengths in ``[min_len, max_len]``, left-padded with 0.

    Returns ``(input_ids int64 [B, P], attention_mask int64 [B, P], rows)`` where ``rows`` is the
    list of unpadded ``[1, length]`` prompts.
    """
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=generator)
    width = int(lengths.max())
    ids = torch.zeros((batch, width), dtype=torch.int64)
    mask = torch.zeros((batch, width), dtype=torch.int64)
    rows = []
    for b, length in enumerate(lengths.tolist()):
        row = torch.randint(0, vocab, (1, length), generator=generator)
        ids[b, width - length:] = row[0]
        mask[b, width - length:] = 1
        rows.append(row)
    return ids, mask, rows


def make_target_and_draft(family: str, draft_kind: str, device, *, rigged: bool = False, seed: int = 0,
                          vocab: int = 256, **draft_overrides):
    """A tiny target of ``family`` and a fresh draft for it, on ``device``.

    draft_kind: "jakiro" (Jakiro draft; ``draft_overrides`` pick its mode) or "eagle2" (the
    EAGLE-2 configuration). rigged: the draft predicts the target's greedy token most of the
    time (see :func:`rig_draft`); otherwise it is random and mostly wrong.
    """
    from jakiro.draft import JakiroDraft
    target = make_tiny_target(family, vocab=vocab, seed=seed, residual_scale=0.05 if rigged else 1.0).to(device)
    torch.manual_seed(seed + 1)
    draft = JakiroDraft.from_target(target, eagle2=draft_kind == "eagle2", **draft_overrides)
    if rigged:
        rig_draft(draft)
    return target, draft


def hf_greedy_continuation(target, row: torch.Tensor, max_new_tokens: int, eos_token_id=None) -> torch.Tensor:
    """The new tokens of ``target.generate(do_sample=False)`` for an unpadded ``[1, L]`` prompt (on the CPU)."""
    row = row.to(target.device)
    out = target.generate(row, attention_mask=torch.ones_like(row), do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, row.shape[1]:].cpu()


def exact_two_token_distribution(target, prompt: torch.Tensor, temperature: float, top_p: float, top_k: int):
    """``[V, V]`` float64: the probability that sampling ``target`` (Hugging Face forward, the
    filters of ``jakiro.reference.filtered_distribution``) continues ``prompt`` ``[1, P]`` with
    the tokens ``(x, y)``."""
    from jakiro import reference
    vocab = target.config.vocab_size
    with torch.no_grad():
        first_logits = target(prompt).logits[0, -1]
        w, kept, z = reference.filtered_distribution(first_logits, temperature, top_p, top_k)
        p1 = torch.where(kept, w / z, torch.zeros_like(w))
        extended = torch.cat((prompt.repeat(vocab, 1), torch.arange(vocab).unsqueeze(1)), dim=1)
        second_logits = target(extended).logits[:, -1]
    joint = torch.zeros((vocab, vocab), dtype=torch.float64)
    for x in range(vocab):
        w, kept, z = reference.filtered_distribution(second_logits[x], temperature, top_p, top_k)
        joint[x] = p1[x] * torch.where(kept, w / z, torch.zeros_like(w))
    return joint


def assert_two_token_sampling_exact(generator, target, prompt: torch.Tensor, temperature: float, top_p: float,
                                    *, runs: int = 50_000, batch: int = 10_000, seed: int = 0):
    """Samples two tokens after ``prompt`` ``runs`` times with ``generator`` (a
    ``SpeculativeGenerator`` of ``target``) and checks the pairs against the target's exact joint
    distribution: a chi-square test (p > 1e-3), no pair outside the filtered support, and the draft
    accepted often enough for acceptance to be exercised."""
    from scipy import stats
    vocab, width = target.config.vocab_size, prompt.shape[1]
    rng = torch.Generator().manual_seed(seed)
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    accepted = 0
    for _ in range(runs // batch):
        result = generator.generate(prompt.repeat(batch, 1), max_new_tokens=2, temperature=temperature, top_p=top_p,
                                    generator=rng)
        pairs = result.sequences[:, width] * vocab + result.sequences[:, width + 1]
        counts += torch.bincount(pairs, minlength=vocab * vocab).double()
        accepted += int((result.accept_lengths[0] > 0).sum())
    assert accepted > runs // 20, "the draft never gets accepted: the test would not exercise acceptance"
    expected = exact_two_token_distribution(target, prompt, temperature, top_p, 0).flatten() * runs
    assert torch.all(counts[expected == 0] == 0), "a token outside the top-p set was emitted"
    big = expected >= 5
    observed = torch.cat((counts[big], counts[~big].sum().reshape(1)))
    wanted = torch.cat((expected[big], expected[~big].sum().reshape(1)))
    if wanted[-1] < 5:  # fold the tail into the smallest cell
        observed, wanted = observed[:-1], wanted[:-1]
        observed[-1] += counts[~big].sum()
        wanted[-1] += expected[~big].sum()
    result = stats.chisquare(observed.numpy(), wanted.numpy() * observed.sum().item() / wanted.sum().item())
    assert result.pvalue > 1e-3, (result, observed, wanted)


def capture_cuda_graph(step):
    """Warms ``step`` up on a side stream (as CUDA-graph capture requires), then captures one call.

    Returns ``(graph, outputs)``: ``outputs`` are the captured call's tensors, refreshed by every
    ``graph.replay()``.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


@contextlib.contextmanager
def single_thread():
    """Runs the block with one intra-op CPU thread: for tiny matrices on a shared CPU,
    threads cost far more than they save."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_feature_shards(target, directory, *, conversations: int = 16, length: int = 24, per_shard: int = 8,
                        seed: int = 0, equal_masks: bool = False, feature_layers: list[int] | None = None):
    """Writes a datagen-format folder (``jakiro.train.data``) for ``target`` from random tokens:
    one target forward per conversation, last-layer features after the final norm (with the
    residual streams of ``feature_layers`` before them, as datagen stores them), and a loss
    mask on a random "assistant" tail of each conversation (the same tail length everywhere
    with ``equal_masks``, and then every conversation has ``length`` tokens). Returns the index.
    """
    import os

    from jakiro.train.data import FORMAT, write_index, write_shard
    from jakiro.train.datagen import target_features
    generator = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    samples = []
    for _ in range(conversations):
        n = length if equal_masks else int(torch.randint(length // 2, length + 1, (1,), generator=generator))
        ids = torch.randint(0, vocab, (n,), generator=generator)
        hidden = target_features(target, ids, feature_layers).float()
        start = n // 3 if equal_masks else int(torch.randint(1, n // 2, (1,), generator=generator))
        mask = torch.zeros(n, dtype=torch.uint8)
        mask[start:] = 1
        samples.append({"input_ids": ids, "hidden_states": hidden, "loss_mask": mask})
    os.makedirs(directory, exist_ok=True)
    shards = [write_shard(str(directory), number, samples[at:at + per_shard])
              for number, at in enumerate(range(0, len(samples), per_shard))]
    index = {"format": FORMAT, "version": 1, "hidden_size": target.config.hidden_size, "shards": shards}
    if feature_layers:
        index["feature_layers"] = list(feature_layers)
    write_index(str(directory), index)
    return index


# SmolLM2-Instruct's template (ChatML with a default system prompt).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# A LLaMA-2-chat style template: BOS, [INST] blocks, answers closed by EOS.
LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")

# The words of the chat tests (and of the SmolLM2 system prompt).
CHAT_WORDS = ("You are a helpful AI assistant named SmolLM trained by Hugging Face system user assistant "
              "hello how is the weather it sunny today thanks and tomorrow rain INST").split()


def make_chat_tokenizer(template: str):
    """A word-level fast tokenizer over ``CHAT_WORDS`` (+ ChatML and LLaMA-2 markers) with chat ``template``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(special + ["[", "]", "[/", ","] + sorted(set(CHAT_WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = template
    return tokenizer

"""The draft model and the tree drafter: configuration, routing, cache consistency,
save/load, and the alignment of the contrastive last level."""
import os

import pytest
import torch
from torch.nn import functional as F

import jakiro
from jakiro import reference
from jakiro.draft import DraftConfig, JakiroDraft
from jakiro.testing import make_prompts, make_tiny_target, single_thread
from jakiro.testing import make_target_and_draft
from jakiro.tree import TreeDrafter


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def random_pairs(draft, batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    device = draft.fc.weight.device
    hidden = torch.randn((batch, length, draft.config.hidden_size), generator=g).to(device)
    tokens = torch.randint(0, draft.config.vocab_size, (batch, length), generator=g).to(device)
    positions = torch.arange(length, device=device).expand(batch, length)
    return hidden, tokens, positions


def test_config_from_target_and_eagle2():
    target = make_tiny_target("qwen2", intermediate=96)
    config = DraftConfig.from_target(target.config)
    assert (config.hidden_size, config.vocab_size, config.head_dim) == (64, 256, 64)
    assert (config.num_experts, config.experts_per_token, config.contrastive) == (2, 2, True)
    assert config.expert_intermediate_size == 64 and config.target_model_type == "qwen2"
    eagle = DraftConfig.eagle2(target.config)
    assert (eagle.num_experts, eagle.contrastive, eagle.expert_intermediate_size) == (1, False, 96)
    draft = JakiroDraft(eagle)
    assert draft.router is None and tuple(draft.w_gate_up.shape) == (1, 192, 64)


@pytest.mark.parametrize("overrides,message", [
    ({"candidate_mode": "both"}, "candidate_mode"),
    ({"num_experts": 0}, "num_experts"),
    ({"experts_per_token": 3}, "experts_per_token"),
    ({"num_experts": 1, "experts_per_token": 1}, "contrastive=True needs num_experts >= 2"),
    ({"num_experts": 1, "experts_per_token": 1, "contrastive": False, "candidate_mode": "per_expert"},
     "per_expert"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"hidden_size": "64"}, r"hidden_size must be an int >= 1, got '64'"),
    ({"num_attention_heads": 2.0}, r"num_attention_heads must be an int >= 1, got 2.0"),
    ({"num_experts": True}, r"num_experts must be an int >= 1, got True"),
    ({"rms_norm_eps": -1e-6}, r"rms_norm_eps must be a positive number"),
    ({"attention_scale": float("nan")}, r"attention_scale must be a positive number"),
    ({"sliding_window": 0}, r"sliding_window must be an int >= 1, got 0"),
    ({"hidden_act": "relu"}, r"hidden_act must be 'silu' or 'gelu_tanh', got 'relu'"),
    ({"norm_unit_offset": 1}, r"norm_unit_offset must be true or false, got 1"),
    ({"contrastive": "yes"}, r"contrastive must be true or false, got 'yes'"),
])
def test_config_rejects_bad_settings(overrides, message):
    target = make_tiny_target("llama")
    with pytest.raises(ValueError, match=message):
        DraftConfig.from_target(target.config, **overrides)


def test_experts_per_token_defaults_to_what_the_experts_allow():
    target = make_tiny_target("llama")
    assert DraftConfig.from_target(target.config).experts_per_token == 2
    single = JakiroDraft.from_target(target, num_experts=1, contrastive=False)   # the EAGLE-2 shape
    assert single.config.experts_per_token == 1
    assert DraftConfig.from_target(target.config, num_experts=4, candidate_mode="per_expert").experts_per_token == 2


def test_embedding_and_head_are_the_targets_frozen_and_unsaved():
    target, draft = make_target_and_draft("llama", "jakiro", "cpu")
    assert draft.embed_tokens is target.get_input_embeddings()
    assert draft.lm_head is target.get_output_embeddings()
    assert not target.lm_head.weight.requires_grad
    names = set(draft.state_dict())
    assert not any("embed" in n or "lm_head" in n for n in names), names
    assert {"fc.weight", "router.weight", "w_gate_up", "w_down", "post_norm"} <= names


def test_routing_heads_follow_the_jakiro_router():
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", seed=3)
    u = torch.randn(7, 64)
    coeff = draft._routing(u, contrastive=True, experts=True)                 # [T, 1 + 1 + E, E]
    logits = draft.router(u)
    mix = torch.softmax(logits[:, :2], dim=-1)
    torch.testing.assert_close(coeff[:, 0], mix)
    v = torch.softmax(logits[:, 2:], dim=-1)
    sign = torch.sign(logits[:, 2] - logits[:, 3]).unsqueeze(1)
    torch.testing.assert_close(coeff[:, 1], sign * torch.stack((v[:, 0], -v[:, 1]), dim=1))
    torch.testing.assert_close(coeff[:, 2:], torch.eye(2).expand(7, 2, 2))


def test_sparse_routing_renormalises_over_the_selected_experts():
    target = make_tiny_target("llama")
    draft = JakiroDraft.from_target(target, num_experts=4, experts_per_token=2)
    u = torch.randn(9, 64)
    coeff = draft._routing(u, contrastive=True, experts=False)
    assert ((coeff[:, 0] != 0).sum(-1) == 2).all()
    torch.testing.assert_close(coeff[:, 0].sum(-1), torch.ones(9))
    assert ((coeff[:, 1] > 0).sum(-1) == 1).all() and ((coeff[:, 1] < 0).sum(-1) == 1).all()


@torch.no_grad()
def plain_draft_forward(draft, hidden, tokens, positions):
    """The draft in plain PyTorch (causal attention, dense experts): the oracle of forward()."""
    config = draft.config
    z = draft.fc(torch.cat((draft.embed_tokens(tokens), hidden), -1))
    b, t, _ = z.shape
    q = draft.q_proj(z).view(b, t, -1, config.head_dim).transpose(1, 2)
    k = draft.k_proj(z).view(b, t, -1, config.head_dim).transpose(1, 2)
    v = draft.v_proj(z).view(b, t, -1, config.head_dim).transpose(1, 2)
    angles = positions.float().unsqueeze(-1) * draft.inv_freq
    angles = torch.cat((angles, angles), -1).unsqueeze(1)

    def rotate(x):
        half = x.shape[-1] // 2
        return x * angles.cos() + torch.cat((-x[..., half:], x[..., :half]), -1) * angles.sin()

    q, k = rotate(q), rotate(k)
    group = q.shape[1] // k.shape[1]
    attn = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          is_causal=True)
    h = z + draft.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
    u = F.rms_norm(h, (config.hidden_size,), draft.post_norm, config.rms_norm_eps).reshape(b * t, -1)
    coeff = draft._routing(u, config.contrastive, True)
    moe = reference.expert_mlp(u, draft.w_gate_up, draft.w_down, coeff)
    return h.unsqueeze(0) + moe.view(-1, b, t, config.hidden_size)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_forward_matches_plain_pytorch(device, family):
    target, draft = make_target_and_draft(family, "jakiro", device, seed=4)
    hidden, tokens, positions = random_pairs(draft, 2, 9, seed=5)
    cache = draft.new_cache(2, 12)
    with torch.no_grad():
        out = draft(hidden, tokens, positions, cache, cache.step(9), return_contrastive=True, return_experts=True)
    expected = plain_draft_forward(draft, hidden, tokens, positions)
    torch.testing.assert_close(out.mixture, expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.contrastive, expected[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.experts, expected[2:], atol=1e-4, rtol=1e-4)


def test_cached_chunks_equal_one_pass(device):
    # The cache path (ragged left-padded chunks, as in decoding) computes what one causal pass does.
    target, draft = make_target_and_draft("mistral", "jakiro", device, seed=6)
    hidden, tokens, positions = random_pairs(draft, 3, 10, seed=7)
    with torch.no_grad():
        full = draft(hidden, tokens, positions).mixture
    drafter = TreeDrafter(draft, depth=2, top_k=2, total_tokens=4)
    cache = drafter.new_cache(3, 16)
    counts = [torch.tensor([4, 2, 6]), torch.tensor([6, 8, 4])]
    done = torch.zeros(3, dtype=torch.long)
    for count in counts:
        width = int(count.max())
        idx = (done.unsqueeze(1) + torch.arange(width) - (width - count).unsqueeze(1)).clamp(0, 9).to(device)
        h = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, 64))
        last = drafter.advance(cache, h, tokens.gather(1, idx), count.to(device)).mixture[:, 0]
        done += count
        expected = full.gather(1, (done - 1).to(device).view(3, 1, 1).expand(-1, 1, 64))[:, 0]
        torch.testing.assert_close(last, expected, atol=1e-4, rtol=1e-4)
    assert cache.lengths.tolist() == [10, 10, 10]


@pytest.mark.parametrize("kind", ["jakiro", "eagle2"])
def test_rollout_pass_r_is_a_chain_drafted_r_levels_deep(kind):
    # Oracle: pass r at position t is the last output of a plain causal pass over its chain, the
    # target's pairs up to t-r followed by the pairs that read the earlier passes' predictions.
    target, draft = make_target_and_draft("llama", kind, "cpu", seed=12)
    hidden, tokens, positions = random_pairs(draft, 2, 8, seed=13)
    contrastive = kind == "jakiro"
    with torch.no_grad():
        passes = draft.rollout(hidden, tokens, positions, 3, return_contrastive=contrastive)
        torch.testing.assert_close(passes[0].mixture, draft(hidden, tokens, positions).mixture, rtol=0, atol=0)
        for r in (1, 2):
            for t in range(r, 8):
                chain = [hidden[:, :t - r + 1]] + [passes[i - 1].mixture[:, t - r + i - 1:t - r + i]
                                                   for i in range(1, r + 1)]
                out = draft(torch.cat(chain, 1), tokens[:, :t + 1], positions[:, :t + 1],
                            return_contrastive=contrastive)
                torch.testing.assert_close(passes[r].mixture[:, t], out.mixture[:, -1], atol=1e-5, rtol=1e-5)
                if contrastive:
                    torch.testing.assert_close(passes[r].contrastive[:, t], out.contrastive[:, -1],
                                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        draft.rollout(hidden, tokens, positions, 0)


def test_rollout_feeds_later_passes_detached_predictions():
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", seed=14)
    hidden, tokens, positions = random_pairs(draft, 1, 6, seed=15)
    hidden.requires_grad_()
    passes = draft.rollout(hidden, tokens, positions, 2)
    # Pass 1 depends on pass 0's keys (so on every f_t) but not on pass 0's predicted features.
    assert torch.autograd.grad(passes[1].mixture.sum(), passes[0].mixture, retain_graph=True,
                               allow_unused=True)[0] is None
    assert torch.autograd.grad(passes[1].mixture[:, -1].sum(), hidden)[0][:, :-1].abs().sum() > 0


def test_bad_forward_inputs_raise():
    target, draft = make_target_and_draft("llama", "eagle2", "cpu")
    hidden, tokens, positions = random_pairs(draft, 1, 4, seed=8)
    with pytest.raises(ValueError, match="hidden must be"):
        draft(hidden[..., :10], tokens, positions)
    with pytest.raises(ValueError, match="input_ids and position_ids"):
        draft(hidden, tokens[:, :2], positions)
    with pytest.raises(ValueError, match="return_contrastive"):
        draft(hidden, tokens, positions, return_contrastive=True)


# ---------------------------------------------------------------------------------------------
# Save / load.

def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    target, draft = make_target_and_draft("qwen2", "jakiro", "cpu", seed=9, candidate_mode="per_expert")
    draft.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = JakiroDraft.from_pretrained(tmp_path, target=target)
    assert loaded.config == draft.config
    for name, tensor in draft.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    ids, mask, _ = make_prompts(2, 256, 3, 6, torch.Generator().manual_seed(10))
    runs = [jakiro.SpeculativeGenerator(target, d, depth=3, top_k=4, total_tokens=14).generate(
        ids, mask, max_new_tokens=10, temperature=0.9, generator=torch.Generator().manual_seed(1))
        for d in (draft, loaded)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].accept_lengths, runs[1].accept_lengths)


@pytest.mark.parametrize("family", ["llama", "qwen2"])   # untied and tied embeddings
def test_a_bfloat16_draft_serves_a_float32_target_losslessly(tmp_path, family):
    target, draft = make_target_and_draft(family, "jakiro", "cpu", rigged=True, seed=5)
    draft.save_pretrained(tmp_path)
    half = JakiroDraft.from_pretrained(tmp_path, target=target, dtype=torch.bfloat16, candidate_mode="per_expert")
    assert half.config.candidate_mode == "per_expert" and draft.config.candidate_mode == "mixture"
    assert half.fc.weight.dtype == half.lm_head.weight.dtype == half.embed_tokens.weight.dtype == torch.bfloat16
    assert target.lm_head.weight.dtype == torch.float32 and not half.lm_head.weight.requires_grad
    assert (half.lm_head.weight is half.embed_tokens.weight) == (family == "qwen2")   # ties are kept
    assert torch.equal(half.lm_head.weight, target.lm_head.weight.to(torch.bfloat16))
    ids, mask, rows = make_prompts(2, 256, 3, 6, torch.Generator().manual_seed(3))
    spec = jakiro.SpeculativeGenerator(target, half, depth=3, top_k=4, total_tokens=14).generate(
        ids, mask, max_new_tokens=12)
    vanilla = jakiro.vanilla_generate(target, ids, mask, max_new_tokens=12)
    assert torch.equal(spec.sequences, vanilla.sequences)
    assert spec.mean_accepted_length > 2.0   # the rigged draft still drafts well in bfloat16


def test_a_restricted_drafting_vocabulary_proposes_only_its_tokens(tmp_path):
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", rigged=True, seed=6)
    ids, mask, _ = make_prompts(2, 256, 3, 6, torch.Generator().manual_seed(4))
    vanilla = jakiro.vanilla_generate(target, ids, mask, max_new_tokens=12)
    # Keep the tokens vanilla decoding produced plus every even id: the rigged draft still hits.
    kept = sorted(set(vanilla.sequences.flatten().tolist()) | set(range(0, 256, 2)))
    draft.restrict_vocab(torch.tensor(kept))
    assert draft.drafting_vocab_size == len(kept)
    logits, vocab = draft.candidate_logits(torch.randn(3, draft.config.hidden_size))
    assert logits.shape == (3, len(kept)) and vocab.tolist() == kept
    drafter = TreeDrafter(draft, depth=3, top_k=4, total_tokens=14)
    spec = jakiro.SpeculativeGenerator(target, draft, depth=3, top_k=4, total_tokens=14).generate(
        ids, mask, max_new_tokens=12)
    assert torch.equal(spec.sequences, vanilla.sequences) and spec.mean_accepted_length > 2.0
    cache = drafter.new_cache(2, 32)
    hidden, tokens, _ = random_pairs(draft, 2, 5, seed=7)
    context = drafter.advance(cache, hidden, tokens, torch.tensor([5, 5], dtype=torch.int32))
    tree = drafter.expand(cache, context, tokens[:, -1])
    assert set(tree.tokens[:, 1:].flatten().tolist()) <= set(kept)
    with pytest.raises(ValueError, match="sorted, distinct ids"):
        draft.restrict_vocab(torch.tensor([3, 3]))
    draft.restrict_vocab(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="top_k must be in"):
        TreeDrafter(draft, depth=2, top_k=3, total_tokens=4)
    draft.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="draft_vocab needs"):
        JakiroDraft.from_pretrained(tmp_path, target, draft_vocab=8)
    with pytest.raises(ValueError, match="token counts must be"):
        draft.save_token_counts(tmp_path, torch.ones(7, dtype=torch.int64))


def test_load_rejects_mismatched_targets(tmp_path):
    target, draft = make_target_and_draft("llama", "jakiro", "cpu")
    draft.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden size 128 != 64"):
        JakiroDraft.from_pretrained(tmp_path, target=make_tiny_target("llama", hidden=128))
    with pytest.raises(ValueError, match="vocabulary 300 != 256"):
        JakiroDraft.from_pretrained(tmp_path, target=make_tiny_target("llama", vocab=300))
    with pytest.raises(ValueError, match="architecture 'qwen2' != 'llama'"):
        JakiroDraft.from_pretrained(tmp_path, target=make_tiny_target("qwen2"))
    with pytest.raises(ValueError, match="does not exist"):
        JakiroDraft.from_pretrained(tmp_path / "missing", target=target)
    other = make_tiny_target("llama", vocab=300)
    with pytest.raises(ValueError, match="not built for this target"):
        jakiro.SpeculativeGenerator(other, draft)


def test_load_names_a_truncated_or_garbage_file(tmp_path):
    target, draft = make_target_and_draft("llama", "jakiro", "cpu")
    draft.save_pretrained(tmp_path)
    draft.save_token_counts(tmp_path, torch.ones(256, dtype=torch.int64))
    weights, config, counts = (tmp_path / n for n in ("model.safetensors", "config.json", "token_counts.safetensors"))
    whole = weights.read_bytes()
    for broken in (whole[:len(whole) // 2], whole[:5], b"not a safetensors file at all"):
        weights.write_bytes(broken)
        with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file"):
            JakiroDraft.from_pretrained(tmp_path, target)
    from safetensors.torch import save_file
    save_file({"fc.weight": torch.zeros(3, 3)}, weights)     # readable, but not this draft's tensors
    with pytest.raises(ValueError, match=f"{weights} does not hold this draft's weights: .*Missing key"):
        JakiroDraft.from_pretrained(tmp_path, target)
    weights.write_bytes(whole)
    counts.write_bytes(b"\x00" * 12)
    with pytest.raises(ValueError, match=f"{counts} is not a readable safetensors file"):
        JakiroDraft.from_pretrained(tmp_path, target, draft_vocab=8)
    config.write_text('{"hidden_size": 64, ')
    with pytest.raises(ValueError, match=f"{config} is not a draft configuration"):
        JakiroDraft.from_pretrained(tmp_path, target)
    config.write_text('{"no_such_field": 1}')
    with pytest.raises(ValueError, match=f"{config} is not a draft configuration"):
        JakiroDraft.from_pretrained(tmp_path, target)


# ---------------------------------------------------------------------------------------------
# Trees.

def draft_tree(draft, depth, top_k, total, batch=2, prompt=6, seed=11):
    drafter = TreeDrafter(draft, depth=depth, top_k=top_k, total_tokens=total)
    hidden, tokens, _ = random_pairs(draft, batch, prompt, seed)
    cache = drafter.new_cache(batch, 64)
    context = drafter.advance(cache, hidden, tokens, torch.full((batch,), prompt, device=hidden.device))
    root = torch.randint(0, draft.config.vocab_size, (batch,), generator=torch.Generator().manual_seed(seed))
    return drafter, hidden, tokens, drafter.expand(cache, context, root.to(hidden.device))


@pytest.mark.parametrize("overrides,shape", [
    ({}, (3, 4, 30)), ({"candidate_mode": "per_expert"}, (2, 5, 20)), ({"contrastive": False}, (4, 2, 9)),
    ({"num_experts": 3, "experts_per_token": 1, "candidate_mode": "per_expert"}, (1, 4, 5)),
])
def test_trees_are_well_formed(device, overrides, shape):
    target, draft = make_target_and_draft("llama", "jakiro", device, seed=12, **overrides)
    depth, top_k, total = shape
    drafter, _, _, tree = draft_tree(draft, depth, top_k, total)
    assert tree.tokens.shape == tree.parents.shape == (2, total)
    _, node_depth = jakiro.ops.build_tree_mask(tree.parents)                    # validates the parents
    torch.testing.assert_close(node_depth.long(), tree.level, check_dtype=False)
    assert int(tree.level.max()) <= depth + 1
    parent_scores = tree.scores.gather(1, tree.parents.clamp(min=0).long())
    assert bool((tree.scores[:, 1:] <= parent_scores[:, 1:]).all()), "a child scored above its parent"
    # Siblings with finite scores never repeat a token.
    for b in range(2):
        seen = set()
        for i in range(1, total):
            if torch.isfinite(tree.scores[b, i]):
                key = (int(tree.parents[b, i]), int(tree.tokens[b, i]))
                assert key not in seen
                seen.add(key)


@torch.no_grad()
def contrastive_at(draft, hidden, tokens, chain_tokens):
    """The contrastive feature at the context of a tree node, replaying the draft causally:
    the prompt pairs, then one pair (previous context's output, node token) per node of
    ``chain_tokens`` (the tokens of levels 1 .. the node; empty for the root)."""
    pairs_h, pairs_t = hidden, tokens
    positions = torch.arange(pairs_h.shape[1], device=hidden.device).unsqueeze(0)
    out = draft(pairs_h, pairs_t, positions, return_contrastive=True)
    for token in chain_tokens:
        pairs_h = torch.cat((pairs_h, out.mixture[:, -1:]), 1)
        pairs_t = torch.cat((pairs_t, torch.tensor([[token]], device=hidden.device)), 1)
        positions = torch.arange(pairs_h.shape[1], device=hidden.device).unsqueeze(0)
        out = draft(pairs_h, pairs_t, positions, return_contrastive=True)
    return out.contrastive[0, -1]


@pytest.mark.parametrize("depth,top_k", [(3, 3), (2, 4), (1, 3)])
def test_contrastive_last_level_comes_from_its_own_grandparent(device, depth, top_k):
    """Every last-level node was proposed by the contrastive head at its grandparent's
    context, with score = parent's score + that log-probability. (The authors' code
    attaches the predictions by rank, under nodes of other branches.)"""
    target, draft = make_target_and_draft("llama", "jakiro", device, seed=13)
    levels = depth + 1
    total = top_k + depth * top_k * top_k + 1                                  # keep every candidate
    drafter, hidden, tokens, tree = draft_tree(draft, depth, top_k, total)
    checked = 0
    for b in range(2):
        parents, node_tokens = tree.parents[b].tolist(), tree.tokens[b].tolist()
        for node in range(1, total):
            if int(tree.level[b, node]) != levels:
                continue
            chain = [node]
            while chain[-1] != 0:
                chain.append(parents[chain[-1]])
            chain = chain[::-1]                                                    # root, ..., parent, node
            grandparent_chain = [node_tokens[i] for i in chain[1:-2]]              # levels 1 .. grandparent
            feature = contrastive_at(draft, hidden[b:b + 1], tokens[b:b + 1], grandparent_chain)
            logp = F.log_softmax(draft.lm_head(feature).float(), -1)
            assert node_tokens[node] in logp.topk(top_k).indices.tolist(), \
                f"row {b} node {node}: its token was not proposed at its grandparent's context"
            expected = float(tree.scores[b, chain[-2]]) + float(logp[node_tokens[node]])
            assert abs(float(tree.scores[b, node]) - expected) < 1e-3
            checked += 1
    assert checked == 2 * top_k * top_k  # the whole last level was kept and checked

"""Speculative generation: lossless greedy against Hugging Face generate, exact sampling,
batching, stopping rules and errors (tiny random models)."""
import copy

import pytest
import torch

import jakiro
from jakiro import ops
from jakiro.target import TargetModel
from jakiro.testing import make_parents, make_prompts, make_tiny_target, single_thread
from jakiro.testing import assert_two_token_sampling_exact, hf_greedy_continuation, make_target_and_draft


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def assert_rows_match_hf(target, result, ids, rows, max_new_tokens, eos_token_id=None):
    width = ids.shape[1]
    for b, row in enumerate(rows):
        expected = hf_greedy_continuation(target, row, max_new_tokens, eos_token_id)
        count = int(result.new_tokens[b])
        got = result.sequences[b, width:width + count].cpu()
        assert torch.equal(got, expected), f"row {b}: {got.tolist()} != HF greedy {expected.tolist()}"
        assert torch.all(result.sequences[b, width + count:] == 0), "padding after a stopped row"
    assert torch.equal(result.sequences[:, :width].cpu(), ids)


# (family, draft kind, draft overrides, (depth, top_k, total_tokens), batch)
GREEDY_CASES = [
    ("llama", "jakiro", {}, (3, 4, 16), 4),
    ("llama", "jakiro", {"candidate_mode": "per_expert"}, (4, 4, 20), 4),
    ("llama", "jakiro", {"contrastive": False}, (2, 3, 8), 4),
    ("llama", "eagle2", {}, (3, 4, 16), 4),
    ("llama", "jakiro", {}, (1, 4, 12), 4),                      # CEPD straight from the context pass
    ("qwen2", "jakiro", {}, (3, 5, 24), 4),
    ("qwen2", "jakiro", {"candidate_mode": "per_expert", "contrastive": False}, (2, 4, 10), 4),
    ("mistral", "jakiro", {}, (5, 3, 20), 4),
    ("mistral", "eagle2", {}, (1, 4, 4), 4),
    ("llama", "jakiro", {"num_experts": 3, "experts_per_token": 2}, (3, 4, 30), 1),
    ("qwen2", "eagle2", {}, (2, 2, 3), 1),                       # tree shallower than the draft depth
    ("mistral", "jakiro", {"candidate_mode": "per_expert"}, (2, 5, 2), 1),
    ("llama", "jakiro", {}, (6, 2, 13), 1),
    ("qwen3", "jakiro", {}, (3, 4, 16), 2),
]

RIGGED_CASES = [
    ("llama", "jakiro", {}, (5, 4, 24), 4),
    ("qwen2", "jakiro", {"candidate_mode": "per_expert"}, (3, 4, 16), 4),
    ("mistral", "jakiro", {"contrastive": False}, (4, 3, 16), 4),
    ("llama", "eagle2", {}, (4, 3, 12), 4),
    ("qwen2", "jakiro", {}, (2, 6, 40), 1),
]


@pytest.mark.parametrize("case", range(len(GREEDY_CASES)))
def test_greedy_is_lossless_random_draft(device, case):
    family, kind, overrides, (depth, top_k, total), batch = GREEDY_CASES[case]
    target, draft = make_target_and_draft(family, kind, device, seed=case, **overrides)
    gen = jakiro.SpeculativeGenerator(target, draft, depth=depth, top_k=top_k, total_tokens=total)
    ids, mask, rows = make_prompts(batch, 256, 1, 9, torch.Generator().manual_seed(100 + case))
    result = gen.generate(ids.to(device), mask.to(device), max_new_tokens=14)
    assert result.new_tokens.tolist() == [14] * batch
    assert_rows_match_hf(target, result, ids, rows, 14)
    assert result.cycles == result.accept_lengths.shape[0] >= 1


@pytest.mark.parametrize("case", range(len(RIGGED_CASES)))
def test_greedy_is_lossless_rigged_draft(device, case):
    family, kind, overrides, (depth, top_k, total), batch = RIGGED_CASES[case]
    target, draft = make_target_and_draft(family, kind, device, rigged=True, seed=20 + case, **overrides)
    gen = jakiro.SpeculativeGenerator(target, draft, depth=depth, top_k=top_k, total_tokens=total)
    ids, mask, rows = make_prompts(batch, 256, 2, 8, torch.Generator().manual_seed(200 + case))
    result = gen.generate(ids.to(device), mask.to(device), max_new_tokens=24)
    assert_rows_match_hf(target, result, ids, rows, 24)
    # The rig works: long accepted paths, so full paths and bonus tokens are exercised.
    assert result.mean_accepted_length > 2.0, result.mean_accepted_length
    assert int(result.accept_lengths.max()) >= min(depth, 3)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_verify_logits_equal_one_token_steps(family, dtype):
    # What exact greedy output rests on: on the CPU every op of a verify pass is batch-invariant
    # (the linear, rms_norm, rotary_embedding and tree_attention kernels), so each tree node's logits are bit for bit those of
    # decoding its root->node path one token at a time, even in bfloat16, and past 512-key splits.
    target = TargetModel(make_tiny_target(family, seed=5, hidden=256, heads=4, kv_heads=2, intermediate=704).to(dtype))
    prefix, nodes = 500, 24
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (1, prefix), generator=gen)
    tree_ids = torch.randint(0, 256, (1, nodes), generator=gen)
    parents = make_parents("random", 1, nodes, gen)
    mask, depth = ops.build_tree_mask(parents)
    prefilled = target.new_cache(1, prefix + nodes)
    target.forward(prompt, torch.arange(prefix)[None], prefilled, prefilled.step(prefix))
    prefilled.lengths += prefix

    tree_cache = copy.deepcopy(prefilled)
    step = tree_cache.step(nodes, tree_mask=mask, tree_len=nodes)
    tree_logits, _ = target.forward(tree_ids, prefix + depth.long(), tree_cache, step)
    for node in range(nodes):
        path = [node]
        while parents[0, path[-1]] >= 0:
            path.append(int(parents[0, path[-1]]))
        cache = copy.deepcopy(prefilled)
        for position, n in enumerate(reversed(path), start=prefix):
            logits, _ = target.forward(tree_ids[:, n:n + 1], torch.tensor([[position]]), cache, cache.step(1))
            cache.lengths += 1
        assert torch.equal(logits[0, 0], tree_logits[0, node]), f"node {node}"


@pytest.mark.parametrize("family, kind, rigged", [("llama", "jakiro", True), ("qwen2", "eagle2", False),
                                                  ("mistral", "jakiro", True)])
def test_bfloat16_greedy_equals_vanilla_decoding_on_cpu(family, kind, rigged):
    # The same end to end: speculative greedy decoding in bfloat16 gives vanilla decoding's tokens.
    target, draft = make_target_and_draft(family, kind, "cpu", rigged=rigged, seed=7)
    target, draft = target.to(torch.bfloat16), draft.to(torch.bfloat16)
    gen = jakiro.SpeculativeGenerator(target, draft, depth=4, top_k=4, total_tokens=24)
    ids, mask, _ = make_prompts(2, 256, 380, 700, torch.Generator().manual_seed(3))
    result = gen.generate(ids, mask, max_new_tokens=64)
    expected = jakiro.vanilla_generate(target, ids, mask, max_new_tokens=64)
    assert torch.equal(result.sequences, expected.sequences)
    if rigged:
        assert result.mean_accepted_length > 2.0


def test_rows_stop_at_eos_at_different_times(device):
    target, draft = make_target_and_draft("llama", "jakiro", device, rigged=True, seed=40)
    ids, mask, rows = make_prompts(4, 256, 2, 7, torch.Generator().manual_seed(400))
    # An EOS id that row 0 emits early: rows then stop at different cycles (or never).
    eos = int(hf_greedy_continuation(target, rows[0], 6)[4])
    gen = jakiro.SpeculativeGenerator(target, draft, depth=4, top_k=3, total_tokens=16)
    result = gen.generate(ids.to(device), mask.to(device), max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert int(result.new_tokens[0]) <= 5
    assert len(set(result.new_tokens.tolist())) > 1
    assert_rows_match_hf(target, result, ids, rows, 20, eos_token_id=eos)
    assert bool((result.accept_lengths[-1] == -1).any()), "finished rows must be marked -1"


def test_budget_is_never_exceeded(device):
    target, draft = make_target_and_draft("qwen2", "jakiro", device, rigged=True, seed=50)
    gen = jakiro.SpeculativeGenerator(target, draft, depth=5, top_k=2, total_tokens=12)
    ids, mask, rows = make_prompts(3, 256, 1, 5, torch.Generator().manual_seed(500))
    for budget in (1, 2, 3, 7):
        result = gen.generate(ids.to(device), mask.to(device), max_new_tokens=budget)
        assert result.new_tokens.tolist() == [budget] * 3
        assert result.sequences.shape == (3, ids.shape[1] + budget)
        assert_rows_match_hf(target, result, ids, rows, budget)


def test_vanilla_generate_matches_hf_greedy(device):
    target = make_tiny_target("mistral", seed=60).to(device)
    ids, mask, rows = make_prompts(4, 256, 1, 9, torch.Generator().manual_seed(600))
    result = jakiro.vanilla_generate(target, ids.to(device), mask.to(device), max_new_tokens=10)
    assert result.cycles == 9
    assert_rows_match_hf(target, result, ids, rows, 10)


def test_streamer_receives_prompt_then_every_new_token():
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", rigged=True, seed=70)

    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    recorder = Recorder()
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(700))
    gen = jakiro.SpeculativeGenerator(target, draft, depth=3, top_k=3, total_tokens=10)
    result = gen.generate(ids, max_new_tokens=15, streamer=recorder)
    assert recorder.ended and recorder.chunks[0] == ids[0].tolist()
    streamed = [t for chunk in recorder.chunks[1:] for t in chunk]
    assert streamed == result.sequences[0, 5:].tolist()


def test_result_reports_timings_and_acceptance():
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", rigged=True, seed=75)
    ids, mask, _ = make_prompts(2, 256, 3, 6, torch.Generator().manual_seed(750))
    result = jakiro.SpeculativeGenerator(target, draft, depth=3, top_k=3, total_tokens=10).generate(
        ids, mask, max_new_tokens=12)
    phases = ("prefill", "draft", "target", "verify", "other")
    assert set(result.timings) == set(phases) | {"total"}
    assert all(result.timings[p] >= 0 for p in phases)
    assert sum(result.timings[p] for p in phases) <= result.timings["total"] * 1.01
    live = result.accept_lengths >= 0
    expected_tau = float((result.accept_lengths[live] + 1).double().mean())
    assert result.mean_accepted_length == pytest.approx(expected_tau)
    # Every row's tokens come from its cycles: 1 (prefill) + sum of (accepted + 1), capped by the budget.
    committed = 1 + (result.accept_lengths.clamp(min=-1) + 1).sum(0)
    assert torch.all(result.new_tokens == committed.clamp(max=12))
    assert result.tokens_per_second() > 0


# ---------------------------------------------------------------------------------------------
# Exact sampling: the first two tokens, over many batched runs, follow the target's distribution.

@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampling_matches_target_distribution(temperature, top_p):
    target = make_tiny_target("llama", vocab=12, seed=80)
    with torch.no_grad():  # sharpen the target a little so the draft's guesses are sometimes right
        target.lm_head.weight.mul_(4.0)
    torch.manual_seed(81)
    draft = jakiro.JakiroDraft.from_target(target)
    gen = jakiro.SpeculativeGenerator(target, draft, depth=2, top_k=3, total_tokens=8)
    assert_two_token_sampling_exact(gen, target, torch.tensor([[3, 7, 1]]), temperature, top_p, seed=82)


def test_sampling_is_reproducible_with_a_seeded_generator():
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", seed=90)
    gen = jakiro.SpeculativeGenerator(target, draft, depth=2, top_k=3, total_tokens=8)
    ids, mask, _ = make_prompts(3, 256, 2, 6, torch.Generator().manual_seed(900))
    runs = [gen.generate(ids, mask, max_new_tokens=8, temperature=0.8, top_k=20,
                         generator=torch.Generator().manual_seed(5)).sequences for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------------------------------------
# Errors.

def test_bad_generation_arguments_raise_clear_errors():
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", seed=95)
    gen = jakiro.SpeculativeGenerator(target, draft, depth=2, top_k=3, total_tokens=8, max_cache_len=64)
    with pytest.raises(ValueError, match="input_ids is empty"):
        gen.generate(torch.zeros((1, 0), dtype=torch.int64))
    with pytest.raises(ValueError, match="prompt is empty"):
        gen.generate(torch.zeros((2, 3), dtype=torch.int64), torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="left-padded"):
        gen.generate(torch.zeros((1, 3), dtype=torch.int64), torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match=r"token ids outside \[0, 256\)"):
        gen.generate(torch.tensor([[5, 256]]))
    with pytest.raises(ValueError, match="token ids outside"):
        jakiro.vanilla_generate(target, torch.tensor([[-1, 5]]))
    # Padding may hold any id: only real tokens are checked.
    gen.generate(torch.tensor([[999, 5]]), torch.tensor([[0, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="more than the cache holds"):
        gen.generate(torch.zeros((1, 60), dtype=torch.int64), max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(torch.zeros((1, 3), dtype=torch.int64), max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(torch.zeros((1, 3), dtype=torch.int64), temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="total_tokens"):
        jakiro.SpeculativeGenerator(target, draft, depth=1, top_k=2, total_tokens=10)
    prompt = torch.zeros((1, 3), dtype=torch.int64)
    for eos in ([], [3, 256], "2", 1.5, True):
        with pytest.raises(ValueError, match=r"eos_token_id must be a token id or a non-empty list .* got"):
            gen.generate(prompt, eos_token_id=eos)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[0, 2\*\*31\)"):
        gen.generate(prompt, temperature=1.0, top_k=2 ** 31)
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        jakiro.vanilla_generate(target, prompt, pad_token_id="0")
    with pytest.raises(ValueError, match="Hugging Face causal LM"):
        jakiro.vanilla_generate(torch.nn.Linear(2, 2), torch.zeros((1, 3), dtype=torch.int64))


def test_what_the_ops_cannot_serve_fails_at_construction():
    # Head size, vocabulary and node count beyond the ops' limits raise the op's own message
    # when the generator is built, before any prompt is read.
    from jakiro.draft import JakiroDraft
    torch.manual_seed(0)
    target = make_tiny_target("llama", hidden=64, heads=2, kv_heads=1, head_dim=12, seed=3)
    with pytest.raises(ValueError, match=r"tree_attention: head_dim .* must be a multiple of 8 from 8 to 256 on the "
                                         r"CPU, got 12"):
        jakiro.SpeculativeGenerator(target, JakiroDraft.from_target(target), depth=2, top_k=3, total_tokens=8)
    target = make_tiny_target("qwen2", vocab=ops.MAX_VOCAB + 1, hidden=32, heads=2, kv_heads=1, intermediate=64,
                              layers=1, seed=3)
    with pytest.raises(ValueError, match=rf"verify_greedy: logits has V = {ops.MAX_VOCAB + 1}; 1 <= V <= "):
        jakiro.SpeculativeGenerator(target, JakiroDraft.from_target(target), depth=2, top_k=3, total_tokens=8)
    del target
    target = make_tiny_target("llama", seed=3)
    draft = JakiroDraft.from_target(target)
    with pytest.raises(ValueError, match="build_tree_mask: parents has N = 4097 nodes; at most 4096"):
        jakiro.SpeculativeGenerator(target, draft, depth=2, top_k=50, total_tokens=4097)
    jakiro.SpeculativeGenerator(target, draft, depth=2, top_k=50, total_tokens=4096)

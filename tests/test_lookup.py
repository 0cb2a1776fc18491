"""Lookup candidates (jakiro.lookup): n-gram proposals and their merge into the draft tree against
plain-Python references on crafted contexts, lossless greedy and exact sampling with lookup on
(tiny random models), and bad input."""
import pytest
import torch

import jakiro
from jakiro import ops
from jakiro.lookup import LookupProposal, NgramLookup, merge
from jakiro.testing import (assert_two_token_sampling_exact, hf_greedy_continuation, make_prompts,
                            make_target_and_draft, make_tiny_target, single_thread)
from jakiro.tree import TreeDrafter


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


# ---------------------------------------------------------------------------------------------
# Plain-Python references.

def reference_propose(text: list, tokens: int, max_ngram: int = 3, min_ngram: int = 1) -> list:
    """The continuation of the latest match of the longest suffix that has one (a match followed
    by a whole ``tokens`` continuation first)."""
    last = len(text) - 1
    for n in range(max_ngram, min_ngram - 1, -1):
        if n > len(text):
            continue
        ends = [e for e in range(n - 1, last) if text[e - n + 1:e + 1] == text[-n:]]
        if ends:
            full = [e for e in ends if last - e >= tokens]
            e = max(full or ends)
            return text[e + 1:e + 1 + tokens]
    return []


def reference_merge(root, tokens, scores, parents, levels, chain, total_tokens):
    """One row: ``(tokens, parents, levels)`` lists of the merged tree."""
    reached, forced = 0, []
    for t in chain:
        kids = [c for c in range(len(tokens)) if parents[c] == reached and tokens[c] == t]
        if not kids:
            break
        forced.append(kids[0])
        reached = kids[0] + 1
    new = chain[len(forced):]
    order = sorted(range(len(tokens)), key=lambda c: (c not in forced, -scores[c], c))
    kept = sorted(order[:total_tokens - 1 - len(new)])
    node = {c: i + 1 for i, c in enumerate(kept)}
    out_tokens = [root] + [tokens[c] for c in kept] + new
    out_parents = [-1] + [0 if parents[c] == 0 else node[parents[c] - 1] for c in kept]
    out_levels = [0] + [levels[c] for c in kept]
    for i in range(len(new)):
        out_parents.append((node[forced[-1]] if forced else 0) if i == 0 else len(out_parents) - 1)
        out_levels.append(len(forced) + 1 + i)
    return out_tokens, out_parents, out_levels


def candidates(batch: int, k: int, depth: int, vocab: int, gen: torch.Generator):
    """Random candidates laid out as TreeDrafter's: k at level 1, then k*k per level, children of
    the k best of the level above; distinct sibling tokens (a top-k); cumulative scores (a child
    never above its parent)."""
    def siblings(groups):
        return torch.rand(batch, groups, vocab, generator=gen).argsort(-1)[..., :k].flatten(1)

    tokens = [siblings(1)]
    scores = [-torch.rand(batch, k, generator=gen) * 3]
    parents = [torch.zeros((batch, k), dtype=torch.int64)]
    levels = [torch.ones(k, dtype=torch.int64)]
    front_ids, front_scores, next_id = 1 + torch.arange(k).expand(batch, k), scores[0], 1 + k
    for level in range(2, depth + 2):
        cumulative = (front_scores.unsqueeze(-1) - torch.rand(batch, k, k, generator=gen) * 3).flatten(1)
        tokens.append(siblings(k))
        scores.append(cumulative)
        parents.append(front_ids.repeat_interleave(k, dim=1))
        levels.append(torch.full((k * k,), level, dtype=torch.int64))
        select = cumulative.sort(dim=1, descending=True, stable=True).indices[:, :k]
        front_ids, front_scores = next_id + select, cumulative.gather(1, select)
        next_id += k * k
    return torch.cat(tokens, 1), torch.cat(scores, 1), torch.cat(parents, 1), torch.cat(levels)


def root_path_tokens(tokens: list, parents: list, node: int) -> list:
    path = []
    while node > 0:
        path.append(tokens[node])
        node = parents[node]
    return path[::-1]


# ---------------------------------------------------------------------------------------------
# Proposals.

def padded_history(texts: list, extra: int = 0, pad_id: int = 7):
    """Left-padded texts (padding = ``pad_id``, which also occurs in the texts) plus ``extra``
    padding columns on the right: ``(history, start, end)``."""
    width = max(map(len, texts)) + 2
    history = torch.full((len(texts), width + extra), pad_id, dtype=torch.int64)
    start = torch.tensor([width - len(t) for t in texts])
    for b, t in enumerate(texts):
        history[b, width - len(t):width] = torch.tensor(t)
    return history, start, torch.full((len(texts),), width)


CRAFTED_TEXTS = [
    [1, 2, 3, 4, 5, 9, 2, 3, 6, 8, 1, 2, 3],      # trigram "1 2 3" wins over the later bigram "2 3"
    [4, 5, 4, 6, 4, 8, 8, 4],                       # unigrams only: the latest is followed by "8 8 4"
    [1, 2, 3, 4],                                   # no match
    [7, 7, 7, 7, 7],                                # a run: matches overlap the suffix
    [5],                                            # one token, nothing before it
    [1, 2, 1, 0, 0, 0, 9, 1, 2, 1, 2, 1],          # "1 2 1" twice before: the latest is followed by too little
    [9, 1, 7],                                      # 7 is also the padding id: padding never matches
]


@pytest.mark.parametrize("tokens", [1, 3, 5])
def test_proposals_match_the_reference_on_crafted_texts(tokens):
    lookup = NgramLookup(tokens)
    history, start, end = padded_history(CRAFTED_TEXTS, extra=3)
    got = lookup.propose(history, start, end)
    assert got.tokens.shape == (len(CRAFTED_TEXTS), tokens) and got.tokens.dtype == torch.int64
    for b, text in enumerate(CRAFTED_TEXTS):
        want = reference_propose(text, tokens)
        length = int(got.length[b])
        assert got.tokens[b, :length].tolist() == want, (b, text)
        assert torch.all(got.tokens[b, length:] == 0)
    # Spot checks of what the reference says.
    assert reference_propose(CRAFTED_TEXTS[0], 3) == [4, 5, 9]
    assert reference_propose(CRAFTED_TEXTS[1], 3) == [8, 8, 4]
    assert reference_propose(CRAFTED_TEXTS[2], 3) == []
    assert reference_propose(CRAFTED_TEXTS[5], 3) == [0, 0, 0]
    assert reference_propose(CRAFTED_TEXTS[6], 3) == []


@pytest.mark.parametrize("ngrams", [(3, 1), (2, 2), (4, 2)])
def test_proposals_match_the_reference_on_random_texts(ngrams):
    gen = torch.Generator().manual_seed(sum(ngrams))
    texts = [torch.randint(0, 5, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
             for _ in range(64)]
    lookup = NgramLookup(4, max_ngram=ngrams[0], min_ngram=ngrams[1])
    got = lookup.propose(*padded_history(texts))
    for b, text in enumerate(texts):
        assert got.tokens[b, :int(got.length[b])].tolist() == reference_propose(text, 4, *ngrams), (b, text)


# ---------------------------------------------------------------------------------------------
# The merge.

def check_merge(root, cand, chain_rows, total_tokens):
    tokens, scores, parents, levels = cand
    width = max([len(c) for c in chain_rows] + [1])
    chain = torch.zeros((len(chain_rows), width), dtype=torch.int64)
    for b, c in enumerate(chain_rows):
        chain[b, :len(c)] = torch.tensor(c, dtype=torch.int64)
    proposal = LookupProposal(chain, torch.tensor([len(c) for c in chain_rows]))
    got_tokens, got_parents, got_scores, got_levels = merge(root, tokens, scores, parents, levels, proposal,
                                                            total_tokens)
    assert got_tokens.shape == got_parents.shape == got_levels.shape == (len(chain_rows), total_tokens)
    assert got_parents.dtype == torch.int32
    _, depth = ops.build_tree_mask(got_parents)                   # validates the tree format
    assert torch.equal(depth.long(), got_levels), "level must be each node's depth"
    for b, c in enumerate(chain_rows):
        want = reference_merge(int(root[b]), tokens[b].tolist(), scores[b].tolist(), parents[b].tolist(),
                               levels.tolist(), c, total_tokens)
        got = (got_tokens[b].tolist(), got_parents[b].tolist(), got_levels[b].tolist())
        assert got == want, f"row {b}, chain {c}:\n{got}\n!=\n{want}"
        # The whole chain is a root path of the tree, and no two siblings carry one token.
        t, p = got[0], got[1]
        assert c == [] or any(root_path_tokens(t, p, i) == c for i in range(total_tokens))
        pairs = [(p[i], t[i]) for i in range(1, total_tokens)]
        assert len(set(pairs)) == len(pairs), "duplicate siblings"
    return got_tokens, got_parents


def test_merge_on_crafted_candidates():
    # k = 2, depth 1: level 1 = candidates 0, 1 (tokens 10, 11); level 2 = 2..5 under the two
    # level-1 nodes, in score order (candidate 0 first).
    tokens = torch.tensor([[10, 11, 20, 21, 22, 23]])
    scores = torch.tensor([[-0.1, -1.0, -0.3, -2.0, -1.5, -4.0]])
    parents = torch.tensor([[0, 0, 1, 1, 2, 2]])
    levels = torch.tensor([1, 1, 2, 2, 2, 2])
    cand = (tokens.repeat(5, 1), scores.repeat(5, 1), parents.repeat(5, 1), levels)
    root = torch.full((5,), 99)
    chains = [[],                # no match: the draft's best 5
              [10, 20, 30],      # overlaps the draft's best path, one new node under candidate 2
              [11, 23, 31],      # reuses low-scored candidates 1 and 5 (forced in), one new node
              [12, 13],          # nothing in common: a new branch under the root
              [10, 21, 22, 24]]  # 22 is candidate 4's token but not under candidate 3: new from there
    got_tokens, got_parents = check_merge(root, cand, chains, total_tokens=6)
    assert got_tokens[0].tolist() == [99, 10, 11, 20, 21, 22]
    assert got_tokens[1].tolist() == [99, 10, 11, 20, 22, 30] and got_parents[1, 5] == 3
    assert got_tokens[2].tolist() == [99, 10, 11, 20, 23, 31] and got_parents[2].tolist() == [-1, 0, 0, 1, 2, 4]
    assert got_tokens[3].tolist() == [99, 10, 11, 20, 12, 13] and got_parents[3].tolist() == [-1, 0, 0, 1, 0, 4]
    assert got_tokens[4].tolist() == [99, 10, 20, 21, 22, 24] and got_parents[4].tolist() == [-1, 0, 1, 1, 3, 4]


@pytest.mark.parametrize("k, depth, total_tokens, lookup", [(2, 2, 6, 3), (3, 3, 12, 5), (4, 2, 20, 8),
                                                            (2, 3, 4, 3)])
def test_merge_matches_the_reference_on_random_candidates(k, depth, total_tokens, lookup):
    gen = torch.Generator().manual_seed(k * 100 + total_tokens)
    batch = 48
    cand = candidates(batch, k, depth, vocab=5, gen=gen)           # 5 tokens: many overlaps
    tokens, scores, parents, _ = cand
    chains = []
    for b in range(batch):
        kind = b % 3
        length = int(torch.randint(0, lookup + 1, (1,), generator=gen))
        chain = torch.randint(0, 6, (length,), generator=gen).tolist()
        if kind == 1:   # start along a random candidate's root path (a long overlap)
            c = int(torch.randint(0, tokens.shape[1], (1,), generator=gen))
            path = []
            while c >= 0:
                path.append(int(tokens[b, c]))
                c = int(parents[b, c]) - 1
            chain = (path[::-1] + chain)[:lookup]
        elif kind == 2:
            chain = []
        chains.append(chain)
    root = torch.randint(0, 5, (batch,), generator=gen)
    check_merge(root, cand, chains, total_tokens)


def test_an_empty_proposal_leaves_the_draft_tree_as_it_was():
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", seed=11)
    plain = TreeDrafter(draft, depth=3, top_k=3, total_tokens=12)
    with_lookup = TreeDrafter(draft, depth=3, top_k=3, total_tokens=12, lookup=4)
    batch = 3
    cache = plain.new_cache(batch, 32)
    hidden = torch.randn(batch, 5, target.config.hidden_size, generator=torch.Generator().manual_seed(1))
    context = plain.advance(cache, hidden, torch.randint(0, 256, (batch, 5)), torch.full((batch,), 5))
    root = torch.tensor([1, 2, 3])
    none = LookupProposal(torch.zeros((batch, 4), dtype=torch.int64), torch.zeros(batch, dtype=torch.int64))
    a, b = plain.expand(cache, context, root), with_lookup.expand(cache, context, root, none)
    for name in ("tokens", "parents", "scores", "level", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert with_lookup.max_new_pairs == plain.max_new_pairs == 5
    assert TreeDrafter(draft, depth=1, top_k=3, total_tokens=8, lookup=6).max_new_pairs == 7


# ---------------------------------------------------------------------------------------------
# End to end: lossless with lookup on.

def repetitive_prompts(batch, vocab, gen):
    """Left-padded prompts that repeat a random phrase a few times (lookup finds matches)."""
    rows = []
    for _ in range(batch):
        phrase = torch.randint(0, vocab, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen)
        reps = int(torch.randint(1, 4, (1,), generator=gen))
        rows.append(torch.cat([phrase] * reps + [phrase[:1]]).unsqueeze(0))
    width = max(r.shape[1] for r in rows)
    ids = torch.zeros((batch, width), dtype=torch.int64)
    mask = torch.zeros((batch, width), dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, width - r.shape[1]:] = r[0]
        mask[b, width - r.shape[1]:] = 1
    return ids, mask, rows


# (family, draft kind, rigged, (depth, top_k, total_tokens, lookup))
GREEDY_CASES = [
    ("llama", "jakiro", False, (3, 4, 16, 5)),
    ("qwen2", "jakiro", True, (3, 3, 12, 4)),
    ("mistral", "eagle2", False, (2, 3, 8, 7)),      # lookup may take every node but the root
    ("gemma3", "jakiro", False, (1, 4, 6, 3)),       # sliding window; lookup deeper than the draft
]


@pytest.mark.parametrize("case", range(len(GREEDY_CASES)))
def test_greedy_is_lossless_with_lookup(case):
    family, kind, rigged, (depth, top_k, total, lookup) = GREEDY_CASES[case]
    target, draft = make_target_and_draft(family, kind, "cpu", rigged=rigged, seed=30 + case)
    gen = jakiro.SpeculativeGenerator(target, draft, depth=depth, top_k=top_k, total_tokens=total, lookup=lookup)
    plain = jakiro.SpeculativeGenerator(target, draft, depth=depth, top_k=top_k, total_tokens=total)
    g = torch.Generator().manual_seed(300 + case)
    for ids, mask, rows in (repetitive_prompts(4, 256, g), make_prompts(3, 256, 1, 9, g)):
        result = gen.generate(ids, mask, max_new_tokens=40)
        width = ids.shape[1]
        for b, row in enumerate(rows):
            expected = hf_greedy_continuation(target, row, 40)
            assert torch.equal(result.sequences[b, width:], expected), f"row {b}"
    # Random tiny models fall into loops; lookup then gets accepted where the draft alone is not.
    ids, mask, _ = repetitive_prompts(4, 256, torch.Generator().manual_seed(0))
    with_lookup = gen.generate(ids, mask, max_new_tokens=60)
    without = plain.generate(ids, mask, max_new_tokens=60)
    assert torch.equal(with_lookup.sequences, without.sequences)
    if not rigged:   # (a rigged draft already fills every tree's deepest path)
        assert with_lookup.mean_accepted_length > without.mean_accepted_length + 0.2, \
            (with_lookup.mean_accepted_length, without.mean_accepted_length)


def test_min_new_tokens_and_eos_with_lookup():
    # EOS masking reads each node's level: lookup nodes' levels must be right.
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", seed=41)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    base = hf_greedy_continuation(target, ids, 30)
    eos = int(base[3])
    gen = jakiro.SpeculativeGenerator(target, draft, depth=2, top_k=3, total_tokens=10, lookup=6)
    got = gen.generate(ids, max_new_tokens=30, eos_token_id=eos, min_new_tokens=12)
    want = jakiro.vanilla_generate(target, ids, max_new_tokens=30, eos_token_id=eos)
    assert int(want.new_tokens[0]) <= 4
    plain = jakiro.SpeculativeGenerator(target, draft, depth=2, top_k=3, total_tokens=10)
    assert torch.equal(got.sequences, plain.generate(ids, max_new_tokens=30, eos_token_id=eos,
                                                     min_new_tokens=12).sequences)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampling_is_exact_with_lookup(temperature, top_p):
    # A 12-token vocabulary and a prompt holding every token: the first sampled token always has
    # an earlier occurrence, so every tree carries a lookup branch (3 of its 6 nodes at most).
    target = make_tiny_target("llama", vocab=12, seed=80)
    with torch.no_grad():
        target.lm_head.weight.mul_(4.0)
    torch.manual_seed(81)
    draft = jakiro.JakiroDraft.from_target(target)
    gen = jakiro.SpeculativeGenerator(target, draft, depth=2, top_k=2, total_tokens=6, lookup=3)
    prompt = torch.tensor([[3, 7, 1, 0, 2, 4, 5, 6, 8, 9, 10, 11, 3, 7, 1]])
    assert_two_token_sampling_exact(gen, target, prompt, temperature, top_p, seed=83)


# ---------------------------------------------------------------------------------------------
# Bad input.

def test_bad_lookup_arguments_raise_clear_errors():
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", seed=95)
    for bad in (-1, 8, True, 2.0):
        with pytest.raises(ValueError, match=r"lookup must be an int in \[0, total_tokens - 1 = 7\]"):
            jakiro.SpeculativeGenerator(target, draft, depth=2, top_k=3, total_tokens=8, lookup=bad)
    with pytest.raises(ValueError, match="NgramLookup: tokens must be an int >= 1, got 0"):
        NgramLookup(0)
    with pytest.raises(ValueError, match=r"NgramLookup: min_ngram \(3\) must be <= max_ngram \(2\)"):
        NgramLookup(2, max_ngram=2, min_ngram=3)
    drafter = TreeDrafter(draft, depth=2, top_k=3, total_tokens=8, lookup=2)
    long = LookupProposal(torch.zeros((1, 3), dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="the lookup proposal has 3 tokens, more than this drafter's lookup=2"):
        drafter.expand(drafter.new_cache(1, 8), None, torch.zeros(1, dtype=torch.int64), long)


# ---------------------------------------------------------------------------------------------
# The commands' --lookup.

@pytest.fixture
def no_model(monkeypatch):
    from jakiro import pretrained

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(pretrained, "load_target", refuse)


@pytest.mark.parametrize("command, extra, match", [
    ("generate", ["--prompt", "hi", "--lookup", "-1"], "--lookup must be >= 0"),
    ("generate", ["--prompt", "hi", "--lookup", "8", "--total-tokens", "8"],
     "--lookup 8 needs --total-tokens >= 9 (lookup nodes share the tree), got 8"),
    ("bench-e2e", ["--methods", "jakiro-lookup", "--lookup", "0"], "--methods jakiro-lookup needs --lookup >= 1"),
    ("demo", ["--lookup", "5", "--total-tokens", "4"], "--lookup 5 needs --total-tokens >= 6"),
])
def test_commands_check_lookup_before_loading_a_model(no_model, capsys, command, extra, match):
    from jakiro import cli
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--device", "cpu"] + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_lookup_defaults_per_device_and_shrinks_to_the_tree():
    from jakiro.cli import _parser
    from jakiro.commands.options import LOOKUP_TOKENS, resolve_run_settings
    settings = resolve_run_settings(_parser().parse_args(["generate", "--prompt", "hi", "--device", "cpu"]))
    assert settings.lookup == LOOKUP_TOKENS["cpu"] and not settings.lookup_given
    assert settings.lookup_for(60) == LOOKUP_TOKENS["cpu"] and settings.lookup_for(3) == 2
    # The deepest path is the lookup chain (5 > depth + 1 = 4), in a tree of at most 53 nodes (depth 3, top-k 4).
    assert settings.max_tree_positions() == 5 + 1 + 53
    off = resolve_run_settings(_parser().parse_args(["generate", "--prompt", "hi", "--device", "cpu", "--lookup", "0"]))
    assert off.lookup == 0 and off.lookup_for(4) == 0

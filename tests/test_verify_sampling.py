"""verify_sampling: kernels vs the reference (same uniforms), the exact distribution of
the emitted tokens (chi-square against plain sampling), temperature 0, bad input."""
import math

import pytest
import torch

from jakiro import ops, reference
from jakiro.testing import SHAPES, capture_cuda_graph, make_parents, make_verify_inputs

SETTINGS = [  # (temperature, top_p, top_k)
    (1.0, 1.0, 0),
    (0.7, 1.0, 5),
    (0.7, 0.8, 0),
    (1.3, 0.9, 7),
]


def settings(batch, temperature, top_p, top_k, device="cpu"):
    return (torch.full((batch,), temperature, dtype=torch.float32, device=device),
            torch.full((batch,), top_p, dtype=torch.float32, device=device),
            torch.full((batch,), top_k, dtype=torch.int32, device=device))


def make_draft_probs(batch, n, vocab, gen, zero_fraction=0.2):
    q = torch.softmax(torch.randn(batch, n, vocab, generator=gen) * 2, -1)
    q = q * (torch.rand(batch, n, vocab, generator=gen) >= zero_fraction)
    q[..., 0] += 1e-3  # never an all-zero row
    return q / q.sum(-1, keepdim=True)


def run_both(device, tokens, parents, logits, uniforms, temperature, top_p, top_k, draft_probs=None):
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = ops.verify_sampling(dev(tokens), dev(parents), dev(logits), dev(temperature), dev(top_p), dev(top_k),
                              draft_probs=dev(draft_probs), uniforms=dev(uniforms))
    want = reference.verify_sampling(tokens, parents, logits, uniforms, temperature, top_p, top_k, draft_probs)
    for g, w, name in zip(got, want, ("accept_len", "path", "next_token")):
        assert g.dtype == w.dtype and g.device.type == torch.device(device).type, name
        assert torch.equal(g.cpu(), w), f"{name}:\n{g}\n!=\n{w}"
    return got


@pytest.mark.parametrize("drafts", ["point", "sampled"])
@pytest.mark.parametrize("temperature, top_p, top_k", SETTINGS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(device, drafts, temperature, top_p, top_k, shape, dtype):
    gen = torch.Generator().manual_seed(hash((drafts, temperature, top_k, shape, str(dtype))) % 2**31)
    batch, n, vocab = 4, 19, 17
    tokens, parents, logits = make_verify_inputs(batch, n, vocab, shape=shape, dtype=dtype, scale=2.0, generator=gen)
    logits[0, :, 3] = float("-inf")  # a zero-probability token, drafted as often as any
    tokens[0, 1::3] = 3
    uniforms = torch.rand(batch, n, 2, generator=gen)
    q = make_draft_probs(batch, n, vocab, gen) if drafts == "sampled" else None
    run_both(device, tokens, parents, logits, uniforms, *settings(batch, temperature, top_p, top_k), q)


@pytest.mark.parametrize("drafts", ["point", "sampled"])
@pytest.mark.parametrize("vocab, dtype", [(32000, torch.float32), (151936, torch.bfloat16), (262144, torch.float16)])
def test_large_vocab(device, drafts, vocab, dtype):
    gen = torch.Generator().manual_seed(vocab + len(drafts))
    batch, n = 3, 16
    tokens, parents, logits = make_verify_inputs(batch, n, vocab, scale=6.0, match=0.8, dtype=dtype, generator=gen)
    uniforms = torch.rand(batch, n, 2, generator=gen)
    temperature = torch.tensor([1.0, 0.7, 0.8])
    top_p = torch.tensor([1.0, 1.0, 0.9])
    top_k = torch.tensor([0, 50, 1000], dtype=torch.int32)
    q = None
    if drafts == "sampled":
        q = torch.softmax(logits.float() * 0.8, -1)
    run_both(device, tokens, parents, logits, uniforms, temperature, top_p, top_k, q)


@pytest.mark.parametrize("drafts", ["point", "sampled"])
def test_documented_limits(device, drafts):
    # B = 256 rows of N = 256 nodes (the minimum limits; V up to 262144 above).
    gen = torch.Generator().manual_seed(10)
    batch, n, vocab = 256, 256, 6
    tokens, parents, logits = make_verify_inputs(batch, n, vocab, match=0.9, scale=2.0, generator=gen)
    uniforms = torch.rand(batch, n, 2, generator=gen)
    q = make_draft_probs(batch, n, vocab, gen) if drafts == "sampled" else None
    run_both(device, tokens, parents, logits, uniforms, *settings(batch, 0.8, 0.95, 4), q)


def test_one_hot_targets_and_mixed_rows(device):
    # One-hot targets accept their token surely and reject everything else; rows of one
    # batch have different settings, one of them greedy.
    gen = torch.Generator().manual_seed(11)
    batch, n, vocab = 4, 12, 40
    tokens, parents, logits = make_verify_inputs(batch, n, vocab, shape="binary", generator=gen)
    logits[1] = float("-inf")
    logits[1, torch.arange(n), tokens[1].roll(-1)] = 0.0  # row 1: node i predicts token of node i+1 surely
    uniforms = torch.rand(batch, n, 2, generator=gen)
    temperature = torch.tensor([1.0, 0.5, 0.0, 2.0])
    top_p = torch.tensor([0.5, 1.0, 0.3, 1.0])
    top_k = torch.tensor([3, 0, 2, 1], dtype=torch.int32)
    for q in (None, make_draft_probs(batch, n, vocab, gen)):
        sampled = run_both(device, tokens, parents, logits, uniforms, temperature, top_p, top_k, q)
        greedy = ops.verify_greedy(tokens, parents, logits)
        # Row 2 (temperature 0) is decided greedily; so is row 1, whose targets are one-hot.
        for out, want in zip(sampled, greedy):
            assert torch.equal(out[1:3].cpu(), want[1:3])


def test_temperature_zero_is_greedy(device):
    gen = torch.Generator().manual_seed(12)
    tokens, parents, logits = make_verify_inputs(8, 30, 64, generator=gen)
    got = ops.verify_sampling(tokens.to(device), parents.to(device), logits.to(device), 0.0, 0.5, 3,
                              draft_probs=make_draft_probs(8, 30, 64, gen).to(device), seed=0)
    want = ops.verify_greedy(tokens, parents, logits)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


def test_top_k_one_is_greedy(device):
    # top_k = 1 keeps only the maximum: every draw and acceptance is the argmax.
    gen = torch.Generator().manual_seed(13)
    tokens, parents, logits = make_verify_inputs(6, 25, 50, generator=gen)
    got = ops.verify_sampling(tokens.to(device), parents.to(device), logits.to(device), 0.9, 1.0, 1, seed=3)
    want = ops.verify_greedy(tokens, parents, logits)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("drafts", ["point", "sampled"])
def test_uniforms_at_the_boundaries_with_top_k_one(device, drafts):
    # top_k = 1 leaves token 3 alone at the root: child 1 (token 5) has probability 0, child 2
    # (token 3) probability 1. At both ends of [0, 1) the first is refused, the second accepted,
    # and the leaf's token is its row's top-1.
    gen = torch.Generator().manual_seed(14)
    logits = torch.randn(1, 3, 8, generator=gen)
    logits[0, 0, 3] = 10.0
    tokens = torch.tensor([[0, 5, 3]])
    parents = torch.tensor([[-1, 0, 0]], dtype=torch.int32)
    q = torch.full((1, 3, 8), 1 / 8) if drafts == "sampled" else None
    for u in (0.0, 1.0 - 2.0 ** -24):
        uniforms = torch.full((1, 3, 2), u)
        got = ops.verify_sampling(tokens.to(device), parents.to(device), logits.to(device), 0.8, 1.0, 1,
                                  draft_probs=None if q is None else q.to(device), uniforms=uniforms.to(device))
        accept_len, path, next_token = (t.cpu() for t in got)
        assert accept_len.tolist() == [1] and path.tolist() == [[0, 2, -1]], u
        assert next_token.tolist() == [int(logits[0, 2].argmax())], u
    # Outside [0, 1) the same call would accept token 5 (u < 0) or draw past the survivors.
    for u in (-1e-3, 1.0, float("nan")):
        uniforms = torch.full((1, 3, 2), 0.5)
        uniforms[0, 1, 0] = u
        with pytest.raises(ValueError, match=r"verify_sampling: uniforms\[0, 1, 0\] = .* must be in \[0, 1\)"):
            ops.verify_sampling(tokens.to(device), parents.to(device), logits.to(device), 0.8, 1.0, 1,
                                uniforms=uniforms.to(device))


def test_logits_without_a_finite_maximum(device):
    # A visited node of a sampled row needs a finite maximum; a greedy row (temperature 0) takes
    # NaN as its maximum, and a node the walk never visits is not read.
    logits = torch.zeros(2, 3, 8)
    logits[:, 0, 3] = 5.0
    tokens = torch.tensor([[0, 6, 3], [0, 6, 3]])
    parents = torch.tensor([[-1, 0, 0], [-1, 0, 1]], dtype=torch.int32)
    dev = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    for bad in (float("nan"), float("inf")):
        row = logits.clone()
        row[1, 0, 0] = bad
        with pytest.raises(ValueError, match=rf"verify_sampling: logits\[1, 0\] has no finite maximum \(max = {bad}\)"):
            ops.verify_sampling(*dev(tokens, parents, row), 1.0, 1.0, 0, seed=0)
    row = logits.clone()
    row[0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"logits\[0, 0\] has no finite maximum \(max = -inf\)"):
        ops.verify_sampling(*dev(tokens, parents, row), 1.0, 1.0, 0, seed=0)
    # Row 0 is greedy: it visits node 2, whose NaN row's argmax is its first NaN (token 0). Row 1
    # samples, but token 6 has probability 0 under top_k = 1: nodes 1 and 2 are never visited.
    row = logits.clone()
    row[:, 1:] = float("nan")
    got = ops.verify_sampling(*dev(tokens, parents, row), torch.tensor([0.0, 1.0], device=device), 1.0, 1, seed=0)
    assert [t.cpu().tolist() for t in got] == [[1, 0], [[0, 2, -1], [0, -1, -1]], [0, 3]]


def test_generator_and_seed_are_reproducible(device):
    gen = torch.Generator().manual_seed(14)
    tokens, parents, logits = (t.to(device) for t in make_verify_inputs(16, 20, 30, scale=1.0, generator=gen))
    a = ops.verify_sampling(tokens, parents, logits, 1.0, seed=123)
    b = ops.verify_sampling(tokens, parents, logits, 1.0, generator=torch.Generator(device=device).manual_seed(123))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    outs = {tuple(ops.verify_sampling(tokens, parents, logits, 1.0, seed=s)[2].tolist()) for s in range(5)}
    assert len(outs) > 1  # the draws do depend on the seed


# ---------------------------------------------------------------------------
# Distribution: the first two emitted tokens must follow plain sampling exactly.

VOCAB = 10
ROOT_TOKEN = 0
ZERO_TOKEN = VOCAB - 1  # the target never emits it; drafts propose it


def hf_probs(logits, temperature, top_p, top_k):
    """Plain sampling's distribution, written like Hugging Face's warpers (float64)."""
    scores = logits.double() / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(-1)


class MarkovTarget:
    """A target whose next-token logits depend on the last token only."""

    def __init__(self, gen):
        self.logits = torch.randn(VOCAB, VOCAB, generator=gen) * 1.5
        self.logits[:, ZERO_TOKEN] = float("-inf")
        self.draft = torch.softmax(torch.randn(VOCAB, VOCAB, generator=gen), -1)  # i.i.d. draft q[prev]
        self.draft[:, 2] = 0.0  # a token the draft never proposes (the residual must cover it)
        self.draft /= self.draft.sum(-1, keepdim=True)
        # deterministic drafts: a fixed candidate list per previous token, with a repeat
        # and the zero-probability token
        ranked = torch.argsort(self.logits + torch.randn(VOCAB, VOCAB, generator=gen), dim=-1, descending=True)
        self.candidates = torch.stack([ranked[:, 0], ranked[:, 1], ranked[:, 0],
                                       torch.full((VOCAB,), ZERO_TOKEN), ranked[:, 2]], dim=1)

    def exact_pairs(self, temperature, top_p, top_k):
        p = hf_probs(self.logits, temperature, top_p, top_k)  # p[prev, next]
        return p[ROOT_TOKEN].unsqueeze(1) * p  # P(e1 = x, e2 = y)

    def trees(self, parents, roots, drafts, gen):
        """tokens, logits and draft probabilities of trees rooted at `roots`."""
        batch, n = parents.shape
        tokens = torch.empty(batch, n, dtype=torch.long)
        tokens[:, 0] = roots
        rank = [0] * n
        counts = {}
        for i in range(1, n):
            p = int(parents[0, i])
            rank[i] = counts.get(p, 0)
            counts[p] = rank[i] + 1
            prev = tokens[:, p]
            if drafts == "point":
                tokens[:, i] = self.candidates[prev, rank[i] % self.candidates.shape[1]]
            else:
                tokens[:, i] = torch.multinomial(self.draft[prev], 1, generator=gen).squeeze(1)
        logits = self.logits[tokens]
        q = self.draft[tokens] if drafts == "sampled" else None
        return tokens, logits, q


TREE_SHAPES = {
    "wide": [-1, 0, 0, 0, 0, 0, 1, 1, 2, 6],
    "chain": [-1, 0, 1, 2, 3],
    "bushy": [-1, 0, 0, 1, 1, 2, 3, 3, 4, 0, 9, 9],
}


def chi_square_p_value(counts, probs):
    expected = probs * counts.sum()
    keep = expected >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    expected = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    assert counts[probs == 0].sum() == 0, "emitted a token plain sampling never emits"
    nonzero = expected > 0
    stat = ((observed[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]).sum()
    dof = int(nonzero.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def emitted_pairs(target, tree, drafts, temperature, top_p, top_k, batch, device, gen):
    parents = torch.tensor([tree], dtype=torch.int32).expand(batch, -1).contiguous()
    roots = torch.full((batch,), ROOT_TOKEN)
    tokens, logits, q = target.trees(parents, roots, drafts, gen)
    settings_ = settings(batch, temperature, top_p, top_k, device)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    device_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    accept_len, path, next_token = (t.cpu() for t in ops.verify_sampling(
        dev(tokens), dev(parents), dev(logits), *settings_, draft_probs=dev(q), generator=device_gen))
    node = lambda j: path[:, j].clamp(min=0).long().unsqueeze(1)  # noqa: E731
    tok1 = tokens.gather(1, node(1)).squeeze(1)
    tok2 = tokens.gather(1, node(2)).squeeze(1)
    first = torch.where(accept_len >= 1, tok1, next_token)
    second = torch.where(accept_len >= 2, tok2, next_token)
    # Rows that accepted nothing emitted one token: the next cycle, a tree rooted at it, gives the second.
    again = accept_len == 0
    if again.any():
        rows = int(again.sum())
        tokens2, logits2, q2 = target.trees(parents[:rows], first[again], drafts, gen)
        acc2, path2, next2 = (t.cpu() for t in ops.verify_sampling(
            dev(tokens2), dev(parents[:rows]), dev(logits2), *(s[:rows] for s in settings_), draft_probs=dev(q2),
            generator=device_gen))
        tok21 = tokens2.gather(1, path2[:, 1:2].clamp(min=0).long()).squeeze(1)
        second[again] = torch.where(acc2 >= 1, tok21, next2)
    return first * VOCAB + second, accept_len


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 1.0, 4), (0.7, 0.8, 0)])
@pytest.mark.parametrize("tree", list(TREE_SHAPES))
@pytest.mark.parametrize("drafts", ["point", "sampled"])
def test_emitted_tokens_follow_plain_sampling(device, drafts, tree, temperature, top_p, top_k):
    gen = torch.Generator().manual_seed(2024)
    target = MarkovTarget(gen)
    probs = target.exact_pairs(temperature, top_p, top_k).flatten()
    counts = torch.zeros(VOCAB * VOCAB, dtype=torch.float64)
    accepted = 0
    calls, batch = 2, 100_000  # 200k draws
    for _ in range(calls):
        pairs, accept_len = emitted_pairs(target, TREE_SHAPES[tree], drafts, temperature, top_p, top_k, batch,
                                          device, gen)
        counts += torch.bincount(pairs, minlength=VOCAB * VOCAB).double()
        accepted += int(accept_len.sum())
    assert accepted > 0.1 * calls * batch, "the trees should be accepted often enough to test acceptance"
    p_value = chi_square_p_value(counts, probs)
    assert p_value > 1e-3, f"chi-square p = {p_value:.2e}"


def test_chi_square_detects_the_authors_bonus_defect():
    # The test above can fail: sampling the bonus token of a fully accepted leaf from the
    # unfiltered softmax (the authors' defect) is caught.
    gen = torch.Generator().manual_seed(7)
    target = MarkovTarget(gen)
    temperature, top_k = 0.7, 4
    wrong = torch.softmax(target.logits.double(), -1)  # no temperature, no top-k
    right = hf_probs(target.logits, temperature, 1.0, top_k)
    exact = (right[ROOT_TOKEN].unsqueeze(1) * right).flatten()
    buggy = (right[ROOT_TOKEN].unsqueeze(1) * wrong).flatten()
    counts = torch.bincount(torch.multinomial(buggy.float(), 200_000, replacement=True, generator=gen),
                            minlength=VOCAB * VOCAB).double()
    with pytest.raises(AssertionError):
        assert chi_square_p_value(counts, exact) > 1e-3


def test_hf_semantics_of_the_filters():
    # The kernels' filter (ties aside) keeps the same tokens as Hugging Face's warpers.
    gen = torch.Generator().manual_seed(8)
    for _ in range(20):
        logits = torch.randn(33, generator=gen) * 3
        for temperature, top_p, top_k in [(0.6, 0.9, 0), (1.0, 1.0, 5), (1.4, 0.7, 9), (0.9, 0.05, 0)]:
            w, kept, z = reference.filtered_distribution(logits, temperature, top_p, top_k)
            p = torch.where(kept, w / z, torch.zeros_like(w))
            torch.testing.assert_close(p, hf_probs(logits, temperature, top_p, top_k), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Bad input


def good_inputs():
    gen = torch.Generator().manual_seed(0)
    tokens, parents, logits = make_verify_inputs(2, 6, 11, generator=gen)
    return dict(tokens=tokens, parents=parents, logits=logits, uniforms=torch.rand(2, 6, 2, generator=gen),
                temperature=torch.tensor([1.0, 0.5]), top_p=torch.tensor([1.0, 0.9]),
                top_k=torch.tensor([0, 3], dtype=torch.int32), draft_probs=None)


def _with(**changes):
    args = good_inputs()
    for key, change in changes.items():
        args[key] = change(args[key]) if callable(change) else change
    return args


BAD_INPUTS = [
    (_with(uniforms=lambda u: u[..., :1]), r"uniforms must have shape \[B, N, 2\]"),
    (_with(uniforms=lambda u: u.double()), "uniforms must be Float"),
    (_with(temperature=torch.tensor([1.0, -0.5])), r"temperature\[1\] = -0.5 must be finite and >= 0"),
    (_with(temperature=torch.tensor([float("nan"), 1.0])), r"temperature\[0\] = nan"),
    (_with(temperature=torch.tensor([1.0])), r"temperature must have shape \[B\]"),
    (_with(temperature=lambda t: t.double()), "temperature must be Float"),
    (_with(top_p=torch.tensor([0.0, 1.0])), r"top_p\[0\] = 0 must be in \(0, 1\]"),
    (_with(top_p=torch.tensor([1.0, 1.5])), r"top_p\[1\] = 1.5 must be in \(0, 1\]"),
    (_with(top_k=torch.tensor([0, -2], dtype=torch.int32)), r"top_k\[1\] = -2 must be >= 0"),
    (_with(top_k=lambda k: k.long()), "top_k must be Int"),
    (_with(draft_probs=torch.rand(2, 6, 10)), r"draft_probs must have shape \[B, N, V\]"),
    (_with(draft_probs=torch.rand(2, 6, 11).half()), "draft_probs must be Float"),
    (_with(tokens=lambda t: t.index_fill(1, torch.tensor([3]), 11)), r"tokens\[0, 3\] = 11 is not a token id"),
    (_with(parents=lambda p: p.index_fill(1, torch.tensor([2]), 5)), r"parents\[0, 2\] = 5"),
    (_with(logits=lambda l: l.double()), "logits must be Float, Half or BFloat16"),
    (_with(tokens=lambda t: t[:1]), r"tokens must have shape \[B, N\]"),
    (_with(uniforms=lambda u: u.index_fill(2, torch.tensor([0]), -0.25)), r"uniforms\[0, 0, 0\] = -0.25 must be in \[0, 1\)"),
    (_with(uniforms=lambda u: u.index_fill(1, torch.tensor([4]), 1.0)), r"uniforms\[0, 4, 0\] = 1 must be in \[0, 1\)"),
    (_with(uniforms=lambda u: u.index_fill(1, torch.tensor([5]), float("nan"))), r"uniforms\[0, 5, 0\] = nan"),
    (_with(logits=lambda l: l.index_fill(1, torch.tensor([0]), float("nan"))), r"logits\[0, 0\] has no finite maximum"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_bad_input_raises_clear_error(device, args, message):
    a = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(ValueError, match=f"verify_sampling: .*{message}"):
        torch.ops.jakiro.verify_sampling(a["tokens"], a["parents"], a["logits"], a["uniforms"], a["temperature"],
                                         a["top_p"], a["top_k"], a["draft_probs"])


@pytest.mark.cuda
def test_cuda_without_validation_is_memory_safe():
    a = good_inputs()
    # Row 0 samples (legal settings) over illegal tokens and parents; row 1 has illegal settings.
    bad_tokens = a["tokens"].clone()
    bad_tokens[:, 1::2] = 10**12
    bad_tokens[:, 2::2] = -7
    bad = dict(a, tokens=bad_tokens, temperature=torch.tensor([1.0, float("nan")]),
               top_p=torch.tensor([0.5, -1.0]), top_k=torch.tensor([3, -4], dtype=torch.int32),
               parents=torch.tensor([[3, 0, -4, 100, 0, 1], [-1, 0, 7, 0, 0, 2]], dtype=torch.int32))
    c = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in bad.items()}
    for q in (None, torch.rand(2, 6, 11).cuda()):
        torch.ops.jakiro.verify_sampling(c["tokens"], c["parents"], c["logits"], c["uniforms"], c["temperature"],
                                         c["top_p"], c["top_k"], q, False)
    torch.cuda.synchronize()
    run_both("cuda", a["tokens"], a["parents"], a["logits"], a["uniforms"], a["temperature"], a["top_p"], a["top_k"])


@pytest.mark.parametrize("drafts", ["point", "sampled"])
def test_opcheck(device, drafts):
    a = good_inputs()
    q = make_draft_probs(2, 6, 11, torch.Generator().manual_seed(1)) if drafts == "sampled" else None
    args = tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in
                 (a["tokens"], a["parents"], a["logits"], a["uniforms"], a["temperature"], a["top_p"], a["top_k"], q))
    torch.library.opcheck(torch.ops.jakiro.verify_sampling.default, args + (True,))


@pytest.mark.cuda
def test_cuda_graph_replay_matches_eager():
    gen = torch.Generator().manual_seed(15)
    tokens, parents, logits = (t.cuda() for t in make_verify_inputs(8, 30, 1000, scale=4.0, generator=gen))
    uniforms = torch.rand(8, 30, 2, generator=gen).cuda()
    temperature, top_p, top_k = settings(8, 0.8, 0.9, 20, "cuda")

    def step():
        sampled = ops.verify_sampling(tokens, parents, logits, temperature, top_p, top_k, uniforms=uniforms)
        return sampled + ops.verify_greedy(tokens, parents, logits)

    eager = step()
    graph, captured = capture_cuda_graph(step)   # validation is skipped automatically under capture
    graph.replay()
    torch.cuda.synchronize()
    for e, c in zip(eager, captured):
        assert torch.equal(e, c)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["walk", "parallel"])
@pytest.mark.parametrize("drafts", ["point", "sampled"])
@pytest.mark.parametrize("batch, n, vocab, dtype", [
    (1, 1, 17, torch.float32), (6, 37, 1000, torch.bfloat16), (3, 60, 32001, torch.float16),
    (3, 16, 151936, torch.bfloat16), (40, 128, 40, torch.float32)])
def test_cuda_paths_match_reference(monkeypatch, path, drafts, batch, n, vocab, dtype):
    # Force each CUDA kernel (JAKIRO_VERIFY_KERNEL, see csrc/include/jakiro/verify_kernel_choice.h) over
    # mixed rows: plain, top-k, top-p, both, temperature 0 and illegal-free greedy fallbacks.
    # Repeated calls also check that the parallel path's arrival counters start from zero.
    monkeypatch.setenv("JAKIRO_VERIFY_KERNEL", path)
    gen = torch.Generator().manual_seed(batch * 7 + n + vocab + len(drafts))
    row_settings = [(1.0, 1.0, 0), (0.7, 1.0, 5), (0.7, 0.8, 0), (1.3, 0.9, 7), (0.0, 0.9, 3), (0.8, 1.0, 1)]
    rows = [row_settings[b % len(row_settings)] for b in range(batch)]
    temperature = torch.tensor([r[0] for r in rows])
    top_p = torch.tensor([r[1] for r in rows])
    top_k = torch.tensor([r[2] for r in rows], dtype=torch.int32)
    for shape in ("chain", "random"):
        tokens, parents, logits = make_verify_inputs(batch, n, vocab, shape=shape, match=0.8, scale=4.0, dtype=dtype,
                                                     generator=gen)
        uniforms = torch.rand(batch, n, 2, generator=gen)
        q = make_draft_probs(batch, n, vocab, gen) if drafts == "sampled" else None
        for _ in range(2):
            run_both("cuda", tokens, parents, logits, uniforms, temperature, top_p, top_k, q)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["walk", "parallel"])
def test_cuda_paths_flag_bad_input(monkeypatch, path):
    monkeypatch.setenv("JAKIRO_VERIFY_KERNEL", path)
    a = good_inputs()
    c = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    with pytest.raises(ValueError, match=r"verify_sampling: .*parents\[0, 4\] = 4"):
        ops.verify_sampling(c["tokens"], c["parents"].index_fill(1, torch.tensor([4], device="cuda"), 4), c["logits"],
                            c["temperature"], c["top_p"], c["top_k"], uniforms=c["uniforms"])
    bad_parents = torch.tensor([[3, 0, -4, 100, 0, 1], [-1, 0, 7, 0, 0, 2]], dtype=torch.int32, device="cuda")
    for q in (None, torch.rand(2, 6, 11).cuda()):
        torch.ops.jakiro.verify_sampling(c["tokens"] * 10**9, bad_parents, c["logits"], c["uniforms"],
                                         c["temperature"], c["top_p"], c["top_k"], q, False)
    torch.cuda.synchronize()
    run_both("cuda", a["tokens"], a["parents"], a["logits"], a["uniforms"], a["temperature"], a["top_p"], a["top_k"])


@pytest.mark.cuda
def test_cuda_graph_replay_parallel_path(monkeypatch):
    # The arrival counters are zeroed inside the graph, so every replay walks every row.
    monkeypatch.setenv("JAKIRO_VERIFY_KERNEL", "parallel")
    batch, n, vocab = 4, 30, 1000
    inputs = [t.cuda() for t in make_verify_inputs(batch, n, vocab, scale=4.0, generator=torch.Generator().manual_seed(3))]
    uniforms = torch.rand(batch, n, 2).cuda()
    sampling_settings = settings(batch, 0.8, 0.9, 20, "cuda")
    graph, out = capture_cuda_graph(
        lambda: ops.verify_sampling(*inputs, *sampling_settings, uniforms=uniforms, validate=False))
    for seed in range(3):
        gen = torch.Generator().manual_seed(100 + seed)
        new = make_verify_inputs(batch, n, vocab, scale=4.0, generator=gen)
        new_uniforms = torch.rand(batch, n, 2, generator=gen)
        for dst, src in zip(inputs + [uniforms], list(new) + [new_uniforms]):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want = reference.verify_sampling(*new, new_uniforms, *(s.cpu() for s in sampling_settings))
        for g, w in zip(out, want):
            assert torch.equal(g.cpu(), w)

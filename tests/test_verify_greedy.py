"""verify_greedy: kernels vs the reference, the argmax-chain oracle, ties, bad input."""
import re

import pytest
import torch

from jakiro import ops, reference
from jakiro.testing import SHAPES, capture_cuda_graph, make_parents, make_verify_inputs


def assert_same(got, want):
    for g, w, name in zip(got, want, ("accept_len", "path", "next_token")):
        assert g.dtype == w.dtype, name
        assert torch.equal(g.cpu(), w.cpu()), f"{name}: {g} != {w}"


def emitted_tokens(tokens, path, accept_len, next_token, b):
    a = int(accept_len[b])
    return [int(tokens[b, int(path[b, j])]) for j in range(1, a + 1)] + [int(next_token[b])]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, n, vocab", [(3, 1, 17), (4, 20, 17), (2, 61, 32), (3, 33, 1000)])
def test_matches_reference(device, shape, dtype, batch, n, vocab):
    gen = torch.Generator().manual_seed(batch * 1000 + n + vocab)
    tokens, parents, logits = make_verify_inputs(batch, n, vocab, shape=shape, dtype=dtype, generator=gen)
    got = ops.verify_greedy(tokens.to(device), parents.to(device), logits.to(device))
    assert got[0].device.type == device.type
    assert_same(got, reference.verify_greedy(tokens, parents, logits))


@pytest.mark.parametrize("vocab, dtype", [(32000, torch.float32), (151936, torch.bfloat16), (262144, torch.float16)])
def test_large_vocab(device, vocab, dtype):
    gen = torch.Generator().manual_seed(vocab)
    tokens, parents, logits = make_verify_inputs(2, 24, vocab, match=0.8, dtype=dtype, generator=gen)
    got = ops.verify_greedy(tokens.to(device), parents.to(device), logits.to(device))
    assert_same(got, reference.verify_greedy(tokens, parents, logits))


def test_documented_limits(device):
    # B = 256 rows of N = 256 nodes (the minimum limits; V up to 262144 above).
    gen = torch.Generator().manual_seed(9)
    tokens, parents, logits = make_verify_inputs(256, 256, 5, match=0.9, generator=gen)
    got = ops.verify_greedy(tokens.to(device), parents.to(device), logits.to(device))
    assert_same(got, reference.verify_greedy(tokens, parents, logits))


@pytest.mark.parametrize("seed", range(4))
def test_emits_the_target_argmax_chain(device, seed):
    # Whatever the tree, the emitted tokens are the target's own greedy continuation:
    # each one is the argmax of the logits of the node reached so far.
    gen = torch.Generator().manual_seed(seed)
    tokens, parents, logits = make_verify_inputs(6, 40, 50, match=0.8, generator=gen)
    accept_len, path, next_token = (t.cpu() for t in ops.verify_greedy(tokens.to(device), parents.to(device), logits.to(device)))
    argmax = logits.argmax(-1)
    for b in range(6):
        a = int(accept_len[b])
        nodes = path[b, : a + 1].tolist()
        assert nodes[0] == 0 and path[b, a + 1:].eq(-1).all()
        for prev, node in zip(nodes, nodes[1:]):
            assert int(parents[b, node]) == prev and int(tokens[b, node]) == int(argmax[b, prev])
        assert emitted_tokens(tokens, path, accept_len, next_token, b)[-1] == int(argmax[b, nodes[-1]])
        # stopped because no child of the last node carries its argmax
        last = nodes[-1]
        children = [c for c in range(parents.shape[1]) if int(parents[b, c]) == last]
        assert all(int(tokens[b, c]) != int(argmax[b, last]) for c in children)


def test_known_tree_and_lowest_index_wins(device):
    #     0
    #   1  2(same token as 1)  3
    #   4
    parents = torch.tensor([[-1, 0, 0, 0, 1]], dtype=torch.int32)
    tokens = torch.tensor([[9, 5, 5, 7, 3]])
    logits = torch.zeros(1, 5, 10)
    logits[0, 0, 5] = 2.0  # root predicts 5: children 1 and 2 both match, 1 wins
    logits[0, 1, 3] = 1.0  # node 1 predicts 3: child 4 matches
    logits[0, 4, 2] = logits[0, 4, 8] = 4.0  # tie: the lower index (2) is the bonus token
    accept_len, path, next_token = ops.verify_greedy(tokens.to(device), parents.to(device), logits.to(device))
    assert accept_len.tolist() == [2] and path.tolist() == [[0, 1, 4, -1, -1]] and next_token.tolist() == [2]


def test_all_equal_logits_pick_token_zero(device):
    parents = make_parents("star", 2, 4)
    tokens = torch.tensor([[1, 2, 0, 0], [1, 3, 2, 1]])
    logits = torch.zeros(2, 4, 7, dtype=torch.bfloat16)
    accept_len, path, next_token = ops.verify_greedy(tokens.to(device), parents.to(device), logits.to(device))
    assert accept_len.tolist() == [1, 0] and path[0, :2].tolist() == [0, 2] and next_token.tolist() == [0, 0]


def test_unaligned_rows_and_noncontiguous_logits(device):
    # V = 13 halves: rows start at odd 2-byte offsets, exercising the vector loads' head and tail.
    gen = torch.Generator().manual_seed(5)
    tokens, parents, logits = make_verify_inputs(3, 9, 13, dtype=torch.float16, generator=gen)
    wide = torch.randn(3, 9, 30, generator=gen).half()
    wide[..., 5:18] = logits
    strided = wide.to(device)[..., 5:18]
    got = ops.verify_greedy(tokens.to(device), parents.to(device), strided)
    assert_same(got, reference.verify_greedy(tokens, parents, logits))


def test_empty_batch(device):
    out = ops.verify_greedy(torch.empty(0, 5, dtype=torch.long, device=device),
                            torch.empty(0, 5, dtype=torch.int32, device=device),
                            torch.empty(0, 5, 11, device=device))
    assert [t.shape for t in out] == [(0,), (0, 5), (0,)]


def good_inputs():
    return make_verify_inputs(2, 6, 11, generator=torch.Generator().manual_seed(0))


def _with(index, value):
    args = list(good_inputs())
    args[index] = value(args[index]) if callable(value) else value
    return args


BAD_INPUTS = [
    (lambda: _with(0, lambda t: t.int()), "tokens must be Long"),
    (lambda: _with(1, lambda p: p.long()), "parents must be Int"),
    (lambda: _with(2, lambda l: l.double()), "logits must be Float, Half or BFloat16"),
    (lambda: _with(2, lambda l: l[0]), r"logits must have shape \[B, N, V\]"),
    (lambda: _with(2, lambda l: l[:, :5]), r"logits must have shape \[B, N, V\] with B, N as parents"),
    (lambda: _with(0, lambda t: t[:, :5]), r"tokens must have shape \[B, N\]"),
    (lambda: _with(2, lambda l: l[..., :0]), "V = 0"),
    (lambda: _with(0, lambda t: t.index_fill(1, torch.tensor([3]), 11)), r"tokens\[0, 3\] = 11 is not a token id"),
    (lambda: _with(0, lambda t: t.index_fill(1, torch.tensor([2]), -1)), r"tokens\[0, 2\] = -1"),
    (lambda: _with(1, lambda p: p.index_fill(1, torch.tensor([4]), 4)), r"parents\[0, 4\] = 4"),
    (lambda: _with(1, lambda p: p.index_fill(1, torch.tensor([0]), 0)), r"parents\[0, 0\] = 0"),
]


@pytest.mark.parametrize("make_bad, message", BAD_INPUTS)
def test_bad_input_raises_clear_error(device, make_bad, message):
    tokens, parents, logits = make_bad()
    with pytest.raises(ValueError, match=f"verify_greedy: .*{message}"):
        ops.verify_greedy(tokens.to(device), parents.to(device), logits.to(device))


def test_huge_vocab_rejected():
    tokens, parents, _ = good_inputs()
    logits = torch.empty(2, 6, 262145).as_strided((2, 6, 262145), (0, 0, 1))
    with pytest.raises(ValueError, match="verify_greedy: logits has V = 262145"):
        ops.verify_greedy(tokens, parents, logits)


@pytest.mark.cuda
def test_mixed_devices_rejected():
    tokens, parents, logits = good_inputs()
    with pytest.raises(ValueError, match="verify_greedy: logits and parents must be on the same device"):
        ops.verify_greedy(tokens.cuda(), parents.cuda(), logits)


@pytest.mark.cuda
def test_cuda_without_validation_is_memory_safe():
    tokens, parents, logits = good_inputs()
    bad_tokens = tokens.clone()
    bad_tokens[:, 1:] = 10**12
    bad_parents = torch.tensor([[5, 9, -3, 2, 100, 1], [-1, 0, 7, -9, 0, 2]], dtype=torch.int32)
    ops.verify_greedy(bad_tokens.cuda(), bad_parents.cuda(), logits.cuda(), validate=False)
    torch.cuda.synchronize()
    assert_same(ops.verify_greedy(tokens.cuda(), parents.cuda(), logits.cuda()),
                reference.verify_greedy(tokens, parents, logits))


def test_opcheck(device):
    tokens, parents, logits = make_verify_inputs(3, 12, 40, generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(torch.ops.jakiro.verify_greedy.default,
                          (tokens.to(device), parents.to(device), logits.to(device), True))


def test_compiles_with_torch_compile():
    tokens, parents, logits = make_verify_inputs(2, 10, 30, generator=torch.Generator().manual_seed(2))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(t, p, l):
        accept_len, path, next_token = torch.ops.jakiro.verify_greedy(t, p, l)
        return accept_len + 1, path, next_token

    acc1, path, nxt = step(tokens, parents, logits)
    ref = reference.verify_greedy(tokens, parents, logits)
    assert torch.equal(acc1, ref[0] + 1) and torch.equal(path, ref[1]) and torch.equal(nxt, ref[2])


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["walk", "parallel"])
@pytest.mark.parametrize("batch, n, vocab, dtype", [
    (1, 1, 17, torch.float32), (5, 37, 1000, torch.bfloat16), (3, 60, 32001, torch.float16),
    (2, 24, 151936, torch.bfloat16), (40, 256, 50, torch.float32)])
def test_cuda_paths_match_reference(monkeypatch, path, batch, n, vocab, dtype):
    # Force each CUDA kernel (JAKIRO_VERIFY_KERNEL, see csrc/include/jakiro/verify_kernel_choice.h);
    # repeated calls also check that the parallel path's arrival counters start from zero.
    monkeypatch.setenv("JAKIRO_VERIFY_KERNEL", path)
    gen = torch.Generator().manual_seed(batch * 7 + n + vocab)
    for shape in ("chain", "random"):
        tokens, parents, logits = make_verify_inputs(batch, n, vocab, shape=shape, match=0.8, dtype=dtype,
                                                     generator=gen)
        want = reference.verify_greedy(tokens, parents, logits)
        for _ in range(2):
            assert_same(ops.verify_greedy(tokens.cuda(), parents.cuda(), logits.cuda()), want)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["walk", "parallel"])
def test_cuda_paths_flag_bad_input(monkeypatch, path):
    monkeypatch.setenv("JAKIRO_VERIFY_KERNEL", path)
    tokens, parents, logits = good_inputs()
    with pytest.raises(ValueError, match=r"verify_greedy: .*parents\[0, 4\] = 4"):
        ops.verify_greedy(tokens.cuda(), parents.index_fill(1, torch.tensor([4]), 4).cuda(), logits.cuda())
    bad_parents = torch.tensor([[5, 9, -3, 2, 100, 1], [-1, 0, 7, -9, 0, 2]], dtype=torch.int32)
    ops.verify_greedy(tokens.cuda() * 10**9, bad_parents.cuda(), logits.cuda(), validate=False)
    torch.cuda.synchronize()
    assert_same(ops.verify_greedy(tokens.cuda(), parents.cuda(), logits.cuda()),
                reference.verify_greedy(tokens, parents, logits))


@pytest.mark.cuda
def test_cuda_kernel_choice_is_explicit(monkeypatch, capfd):
    # JAKIRO_VERIFY_KERNEL takes auto, walk or parallel; anything else is a ValueError. The old
    # name JAKIRO_ACCEPT_PATH still applies where the new one is unset, with a warning.
    tokens, parents, logits = (t.cuda() for t in good_inputs())
    want = reference.verify_greedy(*good_inputs())
    monkeypatch.setenv("JAKIRO_VERIFY_KERNEL", "fastest")
    with pytest.raises(ValueError, match="verify_greedy: environment variable JAKIRO_VERIFY_KERNEL must be auto, "
                                         "walk or parallel, got 'fastest'"):
        ops.verify_greedy(tokens, parents, logits)
    monkeypatch.delenv("JAKIRO_VERIFY_KERNEL")
    monkeypatch.setenv("JAKIRO_ACCEPT_PATH", "walk")
    torch.set_warn_always(True)  # the warning is once per process otherwise
    capfd.readouterr()
    try:
        assert_same(ops.verify_greedy(tokens, parents, logits), want)
    finally:
        torch.set_warn_always(False)
    # torch's C++ warning, on standard error
    assert re.search("JAKIRO_ACCEPT_PATH is deprecated .* use JAKIRO_VERIFY_KERNEL", capfd.readouterr().err)
    monkeypatch.setenv("JAKIRO_ACCEPT_PATH", "fastest")
    with pytest.raises(ValueError, match="environment variable JAKIRO_ACCEPT_PATH must be auto, walk or parallel"):
        ops.verify_greedy(tokens, parents, logits)
    monkeypatch.setenv("JAKIRO_VERIFY_KERNEL", "parallel")  # the new name wins
    assert_same(ops.verify_greedy(tokens, parents, logits), want)


@pytest.mark.cuda
def test_cuda_graph_replay_parallel_path(monkeypatch):
    # The arrival counters are zeroed inside the graph, so every replay walks every row.
    monkeypatch.setenv("JAKIRO_VERIFY_KERNEL", "parallel")
    gen = torch.Generator().manual_seed(11)
    tokens, parents, logits = (t.cuda() for t in make_verify_inputs(4, 30, 1000, match=0.8, generator=gen))
    graph, out = capture_cuda_graph(lambda: ops.verify_greedy(tokens, parents, logits, validate=False))
    for seed in range(3):
        new = make_verify_inputs(4, 30, 1000, match=0.8, generator=torch.Generator().manual_seed(seed))
        for dst, src in zip((tokens, parents, logits), new):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(out, reference.verify_greedy(*new))

"""compact_kv: kernels vs a naive sequential copy, overlapping moves, untouched rows, bad input."""
import pytest
import torch

from jakiro import ops, reference
from jakiro.testing import make_kv_moves


def naive_compact(kv, prefix_len, path, accept_len):
    """An independent oracle: one row at a time with plain Python indexing."""
    out = kv.clone()
    for b in range(kv.shape[2]):
        for j in range(int(accept_len[b]) + 1):
            src = int(prefix_len[b]) + int(path[b, j])
            dst = int(prefix_len[b]) + j
            for l in range(kv.shape[0]):
                for k in range(2):
                    out[l, k, b, :, dst] = out[l, k, b, :, src].clone()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
@pytest.mark.parametrize("shape", ["random", "chain", "binary"])
@pytest.mark.parametrize("head_dim", [1, 3, 8, 64])
def test_matches_naive_copy(device, dtype, shape, head_dim):
    gen = torch.Generator().manual_seed(head_dim * 7 + len(shape))
    layers, batch, heads, seq, n = 2, 3, 2, 48, 20
    kv = (torch.randn(layers, 2, batch, heads, seq, head_dim, generator=gen) * 50).to(dtype)
    prefix_len, path, accept_len = make_kv_moves(batch, n, seq, shape=shape, generator=gen)
    want = naive_compact(kv, prefix_len, path, accept_len)
    got = kv.clone().to(device)
    ops.compact_kv(got, prefix_len.to(device), path.to(device), accept_len.to(device))
    assert torch.equal(got.cpu(), want)
    ref = kv.clone()
    reference.compact_kv(ref, prefix_len, path, accept_len)
    assert torch.equal(ref, want)


def test_overlapping_moves_and_untouched_rows(device):
    # Row b=0: a chain that shifts every row down by one (each destination is the
    # next move's source). Row b=1: the identity (nothing moves). Row b=2: path [0, 5, 6, 9].
    seq, n = 16, 10
    kv = torch.arange(1 * 2 * 3 * 2 * seq * 4, dtype=torch.float32).view(1, 2, 3, 2, seq, 4)
    prefix_len = torch.tensor([2, 0, 3], dtype=torch.int32)
    path = torch.full((3, n), -1, dtype=torch.int32)
    path[0, :6] = torch.tensor([0, 2, 3, 4, 5, 6])
    path[1, :3] = torch.tensor([0, 1, 2])
    path[2, :4] = torch.tensor([0, 5, 6, 9])
    accept_len = torch.tensor([5, 2, 3], dtype=torch.int32)
    want = naive_compact(kv, prefix_len, path, accept_len)
    got = kv.clone().to(device)
    ops.compact_kv(got, prefix_len.to(device), path.to(device), accept_len.to(device))
    got = got.cpu()
    assert torch.equal(got, want)
    # rows from prefix_len + accept_len + 1 on are untouched
    for b in range(3):
        first_untouched = int(prefix_len[b] + accept_len[b]) + 1
        assert torch.equal(got[:, :, b, :, first_untouched:], kv[:, :, b, :, first_untouched:])
        assert torch.equal(got[:, :, b, :, : int(prefix_len[b])], kv[:, :, b, :, : int(prefix_len[b])])
    assert torch.equal(got[0, 0, 0, 0, 2 + 1], kv[0, 0, 0, 0, 2 + 2])  # prefix 2: row j=1 from path[1]=2
    assert torch.equal(got[0, 1, 2, 1, 3 + 1], kv[0, 1, 2, 1, 3 + 5])


def test_deep_chain_full_cache(device):
    layers, batch, heads, seq, n, d = 3, 2, 4, 130, 128, 16
    gen = torch.Generator().manual_seed(3)
    kv = torch.randn(layers, 2, batch, heads, seq, d, generator=gen).half()
    prefix_len = torch.tensor([2, 0], dtype=torch.int32)
    path = torch.full((batch, n), -1, dtype=torch.int32)
    # row 0: 63 accepted nodes spread over the tree (increasing, as a real path is)
    path[0, 0] = 0
    path[0, 1:64] = (torch.randperm(n - 1, generator=gen)[:63] + 1).sort().values.int()
    # row 1: the whole tree is one accepted chain (every move is a no-op)
    path[1] = torch.arange(n, dtype=torch.int32)
    accept_len = torch.tensor([63, n - 1], dtype=torch.int32)
    want = naive_compact(kv, prefix_len, path, accept_len)
    got = kv.clone().to(device)
    ops.compact_kv(got, prefix_len.to(device), path.to(device), accept_len.to(device))
    assert torch.equal(got.cpu(), want)


def test_strided_cache_view(device):
    # A cache that is a view into a larger buffer (extra heads, longer S): only the view changes.
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(2, 2, 3, 5, 40, 8, generator=gen)
    prefix_len, path, accept_len = make_kv_moves(3, 12, 30, generator=gen)
    view_cpu = big[:, :, :, 1:4, 5:35]
    want_view = naive_compact(view_cpu.clone(), prefix_len, path, accept_len)
    big_dev = big.clone().to(device)
    view = big_dev[:, :, :, 1:4, 5:35]
    ops.compact_kv(view, prefix_len.to(device), path.to(device), accept_len.to(device))
    got = big_dev.cpu()
    assert torch.equal(got[:, :, :, 1:4, 5:35], want_view)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[:, :, :, 1:4, 5:35] = False
    assert torch.equal(got[outside], big[outside])


def good_inputs():
    kv = torch.zeros(2, 2, 2, 1, 12, 4)
    prefix_len = torch.tensor([2, 4], dtype=torch.int32)
    path = torch.tensor([[0, 2, 3, -1], [0, 1, -1, -1]], dtype=torch.int32)
    accept_len = torch.tensor([2, 1], dtype=torch.int32)
    return [kv, prefix_len, path, accept_len]


def _with(index, value):
    args = good_inputs()
    args[index] = value(args[index])
    return args


BAD_INPUTS = [
    (lambda: _with(0, lambda kv: kv[0]), r"kv must have shape \[L, 2, B, Hkv, S, D\]"),
    (lambda: _with(0, lambda kv: kv.repeat(1, 2, 1, 1, 1, 1)), r"dim 1 = key/value"),
    (lambda: _with(0, lambda kv: kv.transpose(4, 5)), "contiguous in its last dimension"),
    (lambda: _with(1, lambda p: p.long()), "prefix_len must be Int"),
    (lambda: _with(2, lambda p: p.long()), "path must be Int"),
    (lambda: _with(3, lambda a: a.float()), "accept_len must be Int"),
    (lambda: _with(1, lambda p: p[:1]), r"prefix_len must have shape \[B\]"),
    (lambda: _with(2, lambda p: p[0]), r"path must have shape \[B, N\]"),
    (lambda: _with(3, lambda a: torch.tensor([2, 4], dtype=torch.int32)), r"accept_len\[1\] = 4 must be in \[0, N = 4\)"),
    (lambda: _with(3, lambda a: torch.tensor([-1, 1], dtype=torch.int32)), r"accept_len\[0\] = -1"),
    (lambda: _with(1, lambda p: torch.tensor([2, 11], dtype=torch.int32)), r"prefix_len\[1\] = 11"),
    (lambda: _with(1, lambda p: torch.tensor([-1, 0], dtype=torch.int32)), r"prefix_len\[0\] = -1"),
    (lambda: _with(2, lambda p: torch.tensor([[0, 2, 13, -1], [0, 1, -1, -1]], dtype=torch.int32)), r"path\[0, 2\] = 13"),
    (lambda: _with(2, lambda p: torch.tensor([[0, 2, 3, -1], [0, -1, -1, -1]], dtype=torch.int32)), r"path\[1, 1\] = -1"),
]


@pytest.mark.parametrize("make_bad, message", BAD_INPUTS)
def test_bad_input_raises_clear_error(device, make_bad, message):
    kv, prefix_len, path, accept_len = (t.to(device) for t in make_bad())
    before = kv.clone()
    with pytest.raises(ValueError, match=f"compact_kv: .*{message}"):
        ops.compact_kv(kv, prefix_len, path, accept_len)
    if device.type == "cpu":  # the CPU validates before moving anything
        assert torch.equal(kv, before)


def test_overlapping_kv_is_refused(device):
    # An expanded batch dimension: both rows are the same memory, so row 1's moves would
    # overwrite row 0's. Refused, as torch's in-place ops refuse it, with nothing written.
    kv, prefix_len, path, accept_len = (t.to(device) for t in good_inputs())
    kv = torch.randn_like(kv)
    shared = kv[:, :, :1].expand(-1, -1, 2, -1, -1, -1)
    before = kv.clone()
    with pytest.raises(ValueError, match="compact_kv: kv has elements that share memory"):
        ops.compact_kv(shared, prefix_len, path, accept_len)
    assert torch.equal(kv, before)
    # An index tensor inside kv's memory would change under the moves.
    flat = torch.zeros(2 * 2 * 2 * 12 * 4, dtype=torch.int32, device=device)
    kv_int = flat.view(2, 2, 2, 1, 12, 4)
    with pytest.raises(ValueError, match="compact_kv: path shares memory with kv"):
        ops.compact_kv(kv_int, prefix_len, flat[:8].view(2, 4), accept_len)


@pytest.mark.parametrize("arg", [0, 1, 2, 3])
def test_meta_tensor_with_cpu_tensors_is_refused(arg):
    args = good_inputs()
    args[0] = torch.randn_like(args[0])
    before = args[0].clone()
    args[arg] = args[arg].to("meta")
    with pytest.raises(ValueError, match="compact_kv: kv and .* must be on the same device, got"):
        ops.compact_kv(*args)
    if arg != 0:
        assert torch.equal(args[0], before)


@pytest.mark.cuda
def test_mixed_devices_rejected():
    kv, prefix_len, path, accept_len = good_inputs()
    with pytest.raises(ValueError, match="compact_kv: path and kv must be on the same device"):
        ops.compact_kv(kv.cuda(), prefix_len.cuda(), path, accept_len.cuda())


@pytest.mark.cuda
def test_cuda_without_validation_skips_illegal_moves():
    kv, prefix_len, path, accept_len = good_inputs()
    kv = torch.randn_like(kv).cuda()
    before = kv.clone()
    path = torch.tensor([[0, 2, 10**6, -1], [0, -5, -1, -1]], dtype=torch.int32)
    ops.compact_kv(kv, prefix_len.cuda(), path.cuda(), accept_len.cuda(), validate=False)
    torch.cuda.synchronize()
    # the legal move of row 0 happened, the illegal ones were skipped
    assert torch.equal(kv[:, :, 0, :, 3], before[:, :, 0, :, 4])
    assert torch.equal(kv[:, :, 0, :, 4], before[:, :, 0, :, 4])
    assert torch.equal(kv[:, :, 1], before[:, :, 1])


def test_opcheck(device):
    gen = torch.Generator().manual_seed(6)
    kv = torch.randn(2, 2, 3, 2, 30, 8, generator=gen).to(device)
    prefix_len, path, accept_len = (t.to(device) for t in make_kv_moves(3, 10, 30, generator=gen))
    torch.library.opcheck(torch.ops.jakiro.compact_kv.default, (kv, prefix_len, path, accept_len, True))

"""build_tree_mask: kernels vs the reference, structural oracles and bad input."""
import pytest
import torch

from jakiro import ops, reference
from jakiro.testing import SHAPES, make_parents

SIZES = [1, 2, 31, 32, 33, 64, 100]


def dense_ancestors_by_walking(parents: torch.Tensor) -> torch.Tensor:
    """An independent oracle: walk every node's chain in Python."""
    batch, n = parents.shape
    dense = torch.zeros(batch, n, n, dtype=torch.bool)
    for b in range(batch):
        for i in range(n):
            j = i
            while j >= 0:
                dense[b, i, j] = True
                j = int(parents[b, j])
    return dense


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_reference(device, shape, n, batch):
    gen = torch.Generator().manual_seed(1000 * n + batch)
    parents = make_parents(shape, batch, n, gen)
    mask, depth = ops.build_tree_mask(parents.to(device))
    ref_mask, ref_depth = reference.build_tree_mask(parents)
    assert mask.shape == (batch, n, (n + 31) // 32) and mask.dtype == torch.int32
    assert depth.shape == (batch, n) and depth.dtype == torch.int32
    assert mask.device.type == device.type
    torch.testing.assert_close(mask.cpu(), ref_mask, rtol=0, atol=0)
    torch.testing.assert_close(depth.cpu(), ref_depth, rtol=0, atol=0)


@pytest.mark.parametrize("n", [5, 33, 70])
def test_reference_matches_chain_walk(n):
    parents = make_parents("random", 2, n, torch.Generator().manual_seed(n))
    mask, depth = reference.build_tree_mask(parents)
    dense = dense_ancestors_by_walking(parents)
    assert torch.equal(reference.unpack_bits(mask, n), dense)
    assert torch.equal(depth.long(), dense.sum(-1) - 1)


def test_known_small_tree():
    #      0
    #    1   2
    #   3 4   5
    #           6
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 5]], dtype=torch.int32)
    mask, depth = ops.build_tree_mask(parents)
    assert mask[0, :, 0].tolist() == [0b1, 0b11, 0b101, 0b1011, 0b10011, 0b100101, 0b1100101]
    assert depth[0].tolist() == [0, 1, 1, 2, 2, 2, 3]


def test_bit_31_and_word_boundaries(device):
    # A chain of 65 nodes sets bit 31 (the int32 sign bit) and spans three words.
    parents = make_parents("chain", 1, 65).to(device)
    mask, depth = ops.build_tree_mask(parents)
    assert mask[0, 64].tolist() == [-1, -1, 1]
    assert mask[0, 31].tolist() == [-1, 0, 0]
    assert depth[0, 64].item() == 64


def test_largest_supported_tree(device):
    n = ops_max_nodes()
    parents = make_parents("random", 2, n, torch.Generator().manual_seed(7)).to(device)
    mask, depth = ops.build_tree_mask(parents)
    ref_mask, ref_depth = reference.build_tree_mask(parents.cpu())
    assert torch.equal(mask.cpu(), ref_mask) and torch.equal(depth.cpu(), ref_depth)


def test_non_contiguous_input(device):
    parents = make_parents("random", 4, 40, torch.Generator().manual_seed(3))
    strided = parents.to(device)[::2]
    mask, depth = ops.build_tree_mask(strided)
    ref_mask, ref_depth = reference.build_tree_mask(parents[::2])
    assert torch.equal(mask.cpu(), ref_mask) and torch.equal(depth.cpu(), ref_depth)


def test_empty_batch(device):
    mask, depth = ops.build_tree_mask(torch.empty(0, 9, dtype=torch.int32, device=device))
    assert mask.shape == (0, 9, 1) and depth.shape == (0, 9)


def ops_max_nodes():
    import jakiro

    return jakiro.build_info()["max_tree_nodes"]


BAD_INPUTS = [
    (lambda: torch.tensor([[-1, 0]], dtype=torch.int64), "must be Int"),
    (lambda: torch.tensor([-1, 0], dtype=torch.int32), r"shape \[B, N\]"),
    (lambda: torch.empty(2, 0, dtype=torch.int32), "at least one node"),
    (lambda: torch.tensor([[0, 0, 1]], dtype=torch.int32), r"parents\[0, 0\] = 0: node 0 is the root"),
    (lambda: torch.tensor([[-1, 0, 2]], dtype=torch.int32), r"parents\[0, 2\] = 2.*\[0, 2\)"),
    (lambda: torch.tensor([[-1, 0, 1], [-1, 5, 0]], dtype=torch.int32), r"parents\[1, 1\] = 5"),
    (lambda: torch.tensor([[-1, 0, -1]], dtype=torch.int32), r"parents\[0, 2\] = -1"),
    (lambda: torch.tensor([[-1, -7]], dtype=torch.int32), r"parents\[0, 1\] = -7"),
    (lambda: make_parents("chain", 1, ops_max_nodes() + 1), "at most"),
]


@pytest.mark.parametrize("make_bad, message", BAD_INPUTS)
def test_bad_input_raises_clear_error(device, make_bad, message):
    with pytest.raises(ValueError, match=f"build_tree_mask: .*{message}"):
        ops.build_tree_mask(make_bad().to(device))


@pytest.mark.cuda
def test_cuda_without_validation_is_memory_safe():
    # Illegal parents with validate=False: no error, no fault; the context stays usable.
    bad = torch.tensor([[3, 9, -5, 1000, 2]], dtype=torch.int32, device="cuda")
    ops.build_tree_mask(bad, validate=False)
    torch.cuda.synchronize()
    good = make_parents("binary", 2, 50).cuda()
    mask, _ = ops.build_tree_mask(good)
    assert torch.equal(mask.cpu(), reference.build_tree_mask(good.cpu())[0])


def test_opcheck(device):
    parents = make_parents("random", 3, 45, torch.Generator().manual_seed(0)).to(device)
    torch.library.opcheck(torch.ops.jakiro.build_tree_mask.default, (parents, True))


def test_compiles_with_torch_compile():
    parents = make_parents("binary", 2, 20)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def masks(p):
        mask, depth = torch.ops.jakiro.build_tree_mask(p)
        return mask, depth + 1

    mask, depth1 = masks(parents)
    ref_mask, ref_depth = reference.build_tree_mask(parents)
    assert torch.equal(mask, ref_mask) and torch.equal(depth1, ref_depth + 1)

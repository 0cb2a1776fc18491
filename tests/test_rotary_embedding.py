"""rotary_embedding: the kernel vs the reference and Hugging Face's apply_rotary_pos_emb, bit for bit,
on awkward sizes and layouts; batch invariance; bad input."""
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from jakiro import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(batch, hq, hkv, length, head_dim, dtype=torch.float32, device="cpu", seed=0, layout="bhtd"):
    """q, k as the attention layers make them: views [B, H, T, D] of [B, T, H, D] projections
    (layout "bthd"), or contiguous [B, H, T, D]; cos and sin [B, T, D] as the rotary embedding."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)
    if layout == "bthd":
        q, k = randn(batch, length, hq, head_dim).transpose(1, 2), randn(batch, length, hkv, head_dim).transpose(1, 2)
    else:
        q, k = randn(batch, hq, length, head_dim), randn(batch, hkv, length, head_dim)
    angles = torch.rand(batch, length, head_dim // 2, generator=gen) * 100
    angles = torch.cat((angles, angles), dim=-1)
    return q, k, angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, hq, hkv, length, head_dim, layout", [
    (1, 1, 1, 1, 2, "bhtd"), (1, 9, 3, 1, 64, "bthd"), (2, 9, 3, 7, 64, "bthd"), (3, 4, 4, 13, 128, "bhtd"),
    (1, 32, 8, 60, 128, "bthd"), (2, 2, 1, 5, 6, "bhtd"),
])
def test_equals_hugging_face_bit_for_bit(device, batch, hq, hkv, length, head_dim, layout, dtype):
    q, k, cos, sin = make(batch, hq, hkv, length, head_dim, dtype, device, seed=length + head_dim, layout=layout)
    got = ops.rotary_embedding(q, k, cos, sin)
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    ref = reference.rotary_embedding(q, k, cos, sin)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert got[0].is_contiguous() and got[1].is_contiguous()


def test_rows_are_batch_invariant():
    # A token's rotation is the same alone as among others (what keeps tree verification exact).
    q, k, cos, sin = make(1, 9, 3, 40, 64, torch.bfloat16, seed=2, layout="bthd")
    full = ops.rotary_embedding(q, k, cos, sin)
    alone = ops.rotary_embedding(q[:, :, 17:18], k[:, :, 17:18], cos[:, 17:18], sin[:, 17:18])
    assert torch.equal(alone[0], full[0][:, :, 17:18]) and torch.equal(alone[1], full[1][:, :, 17:18])


def test_empty_and_opcheck():
    q, k, cos, sin = make(1, 2, 1, 0, 64)
    out = ops.rotary_embedding(q, k, cos, sin)
    assert out[0].shape == q.shape and out[1].shape == k.shape
    torch.library.opcheck(torch.ops.jakiro.rotary_embedding.default, make(2, 4, 2, 3, 64, seed=1))


@pytest.mark.parametrize("args, message", [
    (lambda q, k, c, s: (q[0], k, c, s), "q must have shape \\[B, Hq, T, D\\]"),
    (lambda q, k, c, s: (q, k, c[0], s), "cos must have shape \\[B, T, D\\]"),
    (lambda q, k, c, s: (q, k[:, :, :2], c, s), "k must have q's B, T and D"),
    (lambda q, k, c, s: (q, k, c[:, :2], s[:, :2]), "cos and sin must have shape \\[B, T, D\\] = \\[2, 3, 64\\]"),
    (lambda q, k, c, s: (q, k.double(), c, s), "k must have q's dtype"),
    (lambda q, k, c, s: (q, k, c, s.half()), "sin must have q's dtype"),
    (lambda q, k, c, s: (q.double(), k.double(), c.double(), s.double()), "q must be float32, bfloat16 or float16"),
    (lambda q, k, c, s: (q[..., :63], k[..., :63], c[..., :63], s[..., :63]), "the head size D must be even"),
])
def test_bad_input(args, message):
    q, k, cos, sin = make(2, 4, 2, 3, 64)
    with pytest.raises(ValueError, match="rotary_embedding: " + message):
        ops.rotary_embedding(*args(q, k, cos, sin))


@pytest.mark.cuda
def test_cuda_device_mismatch_is_a_clear_error():
    q, k, cos, sin = make(2, 4, 2, 3, 64, device="cuda")
    with pytest.raises(ValueError, match="rotary_embedding: q and cos must be on the same device"):
        ops.rotary_embedding(q, k, cos.cpu(), sin)

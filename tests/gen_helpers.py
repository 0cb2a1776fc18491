"""Helpers of the generation tests: thread count, target/draft factories, HF references."""
import contextlib

import torch

import jakiro
from jakiro.testing import make_tiny_target, rig_draft


@contextlib.contextmanager
def single_thread():
    # Tiny matrices: on a shared CPU, intra-op threads cost far more than they save.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build(family, draft_kind, device, *, rigged=False, seed=0, vocab=256, **draft_overrides):
    """A tiny target of ``family`` and a draft of ``draft_kind`` on ``device``.

    draft_kind: "jakiro" (Jakiro draft; overrides pick the mode) or "eagle2" (the EAGLE-2
    configuration). rigged: the draft predicts the target's greedy token most of the time
    (else it is random and mostly wrong).
    """
    target = make_tiny_target(family, vocab=vocab, seed=seed, residual_scale=0.05 if rigged else 1.0).to(device)
    torch.manual_seed(seed + 1)
    draft = jakiro.JakiroDraft.from_target(target, eagle2=draft_kind == "eagle2", **draft_overrides)
    if rigged:
        rig_draft(draft)
    return target, draft


def hf_greedy(target, row, max_new_tokens, eos_token_id=None):
    """The target's own greedy continuation of an unpadded ``[1, L]`` prompt (new tokens only)."""
    row = row.to(target.device)
    out = target.generate(row, attention_mask=torch.ones_like(row), do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, row.shape[1]:].cpu()

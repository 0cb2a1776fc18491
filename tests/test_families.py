"""The model families the target adapter serves: lossless greedy decoding against each family's own
Hugging Face greedy generate (batched, ragged, left-padded prompts), in both draft configurations;
sliding windows shorter than prompt + answer, Llama 3 RoPE scaling, partial rotary, head sizes
16 to 256; exact sampling on a non-Llama family; clear refusals (tiny random models, CPU)."""
import pytest
import torch

import jakiro
from jakiro.draft import JakiroDraft
from jakiro.target import SUPPORTED_MODEL_TYPES, TargetModel
from jakiro.testing import (TINY_FAMILIES, assert_two_token_sampling_exact, hf_greedy_continuation,
                            make_prompts, make_tiny_target, single_thread)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def assert_lossless(target, draft, *, batch=3, max_new_tokens=24, min_len=3, max_len=20, seed=0,
                    tree=(3, 4, 12)):
    depth, top_k, total = tree
    gen = jakiro.SpeculativeGenerator(target, draft, depth=depth, top_k=top_k, total_tokens=total)
    ids, mask, rows = make_prompts(batch, target.config.vocab_size, min_len, max_len,
                                   torch.Generator().manual_seed(seed))
    result = gen.generate(ids, mask, max_new_tokens=max_new_tokens)
    width = ids.shape[1]
    for b, row in enumerate(rows):
        expected = hf_greedy_continuation(target, row, max_new_tokens)
        got = result.sequences[b, width:width + int(result.new_tokens[b])]
        assert torch.equal(got, expected), f"row {b}: {got.tolist()} != Hugging Face greedy {expected.tolist()}"
    return result


# (family, config overrides): every family at head_dim 64, and the settings that stress each one.
FAMILY_CASES = [(family, {}) for family in TINY_FAMILIES] + [
    ("mistral", {"sliding_window": 6}),                                        # every layer windowed
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),  # layer 1 windowed
    ("gemma3", {"sliding_window": 3, "head_dim": 256}),                       # Gemma 3 270M's head size
    ("gemma3", {"layer_types": ["sliding_attention", "sliding_attention"], "sliding_window": 4}),  # draft windowed
    ("llama", {"head_dim": 16}),
    ("llama", {"head_dim": 96, "heads": 3, "hidden": 96}),                    # Phi-3's head size
    ("phi3", {"head_dim": 96, "partial_rotary_factor": 1.0, "sliding_window": 7}),
    ("llama3", {"head_dim": 128}),
]


def _case_id(case):
    family, overrides = case
    return family + "".join(f"-{k}={v}" for k, v in overrides.items() if k != "layer_types") + \
        ("-all-sliding" if "layer_types" in overrides else "")


@pytest.mark.parametrize("draft_kind", ["jakiro", "eagle2"])
@pytest.mark.parametrize("case", FAMILY_CASES, ids=_case_id)
def test_greedy_is_lossless_for_every_family(case, draft_kind):
    family, overrides = case
    overrides = dict(overrides)
    heads = overrides.pop("heads", 2)
    target = make_tiny_target(family, heads=heads, seed=3, **overrides)
    torch.manual_seed(4)
    draft = JakiroDraft.from_target(target, eagle2=draft_kind == "eagle2")
    assert_lossless(target, draft)


def test_sliding_window_matters_and_is_honoured_past_the_window():
    """The window changes the model's output here (so the test can fail), and decoding long past it
    stays lossless."""
    windowed = make_tiny_target("mistral", sliding_window=4, seed=5)
    full = make_tiny_target("mistral", sliding_window=None, seed=5)
    row = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(6))
    assert not torch.equal(hf_greedy_continuation(windowed, row, 16), hf_greedy_continuation(full, row, 16))
    torch.manual_seed(7)
    assert_lossless(windowed, JakiroDraft.from_target(windowed), max_new_tokens=40, tree=(4, 3, 10))


def test_the_draft_follows_its_target():
    gemma = make_tiny_target("gemma3", layer_types=["full_attention", "sliding_attention"], sliding_window=5)
    config = JakiroDraft.from_target(gemma).config
    assert (config.hidden_act, config.norm_unit_offset, config.sliding_window) == ("gelu_tanh", True, 5)
    assert config.attention_scale == pytest.approx(48 ** -0.5)
    llama3 = make_tiny_target("llama3")
    draft = JakiroDraft.from_target(llama3)
    assert torch.equal(draft.inv_freq, llama3.model.rotary_emb.original_inv_freq)     # the scaled frequencies
    default = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    assert not torch.allclose(draft.inv_freq, default)
    phi3 = make_tiny_target("phi3")
    assert JakiroDraft.from_target(phi3).inv_freq.numel() == 24                        # 3/4 of 64 dims rotate
    eagle2 = JakiroDraft.from_target(llama3, num_experts=1, contrastive=False)       # EAGLE-2's configuration
    assert eagle2.config.experts_per_token == 1


def test_gemma_draft_keeps_the_embedding_scale_in_another_dtype():
    target = make_tiny_target("gemma3")
    ids = torch.tensor([[5, 9, 200]])
    draft = JakiroDraft.from_target(target).bind(target, torch.bfloat16)
    expected = target.get_input_embeddings()(ids).to(torch.bfloat16)
    assert torch.allclose(draft.embed_tokens(ids).float(), expected.float(), rtol=1e-2)


def test_sampling_is_exact_on_gemma3_with_a_window():
    target = make_tiny_target("gemma3", vocab=12, seed=80, sliding_window=2)
    with torch.no_grad():
        target.lm_head.weight.mul_(4.0)
    torch.manual_seed(81)
    gen = jakiro.SpeculativeGenerator(target, JakiroDraft.from_target(target), depth=2, top_k=3, total_tokens=8)
    assert_two_token_sampling_exact(gen, target, torch.tensor([[3, 7, 1]]), 0.8, 0.95, seed=83)


def test_every_supported_family_has_a_tiny_test_model():
    tested = {make_tiny_target(family).config.model_type for family in TINY_FAMILIES}
    assert set(SUPPORTED_MODEL_TYPES) <= tested


@pytest.mark.parametrize("make,message", [
    (lambda: __import__("transformers").GPT2LMHeadModel(__import__("transformers").GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=64)),
     r"model_type 'gpt2' is not supported \(not tested with jakiro's attention backend\); supported: llama"),
    (lambda: __import__("transformers").GraniteForCausalLM(__import__("transformers").GraniteConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64)),
     r"model_type 'granite' is not supported \(its ForCausalLM divides the logits by logits_scaling"),
    (lambda: make_tiny_target("gemma3", use_bidirectional_attention=True),
     r"target: this gemma3_text model attends bidirectionally \(an encoder"),
])
def test_unsupported_families_are_refused_in_one_line(make, message):
    with pytest.raises(ValueError, match=message):
        TargetModel(make())


def test_a_target_without_a_rotary_module_is_refused_by_the_draft():
    target = make_tiny_target("llama")
    del target.model.rotary_emb
    with pytest.raises(ValueError, match=r"JakiroDraft: the target \(llama\) has no rotary_emb module"):
        JakiroDraft.from_target(target)

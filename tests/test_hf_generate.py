"""jakiro.hf.speculative_decoding: Jakiro as the decoding loop of Hugging Face ``model.generate``
(``custom_generate=``), against ``model.generate`` itself on tiny random models (CPU)."""
import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

import jakiro
from jakiro.hf import speculative_decoding
from jakiro.testing import make_prompts, make_target_and_draft, single_thread

TREE = dict(depth=4, tree_top_k=3, total_tokens=16)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def llama():
    with single_thread():
        return make_target_and_draft("llama", "jakiro", "cpu", rigged=True, seed=40)


def jakiro_generate(model, draft, *args, **kwargs):
    return model.generate(*args, custom_generate=speculative_decoding, draft=draft, **{**TREE, **kwargs})


def make_tokenizer():
    """A fast tokenizer over 256 ids, built offline: ids 0-15 are the letters a-p, ids 16-255 the
    two-letter words "ba".."pp"; text is split into letters, and decoding joins tokens as they are."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    letters = "abcdefghijklmnop"
    words = {(letters[i] if i < 16 else letters[i // 16] + letters[i % 16]): i for i in range(256)}
    backend = Tokenizer(models.WordLevel(words, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="a")


# (family, rigged draft, batch)
CASES = [("llama", True, 4), ("qwen2", False, 3), ("qwen2", True, 1)]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_greedy_equals_generate_with_eos_as_int_and_list(case):
    family, rigged, batch = CASES[case]
    target, draft = make_target_and_draft(family, "jakiro", "cpu", rigged=rigged, seed=10 + case)
    ids, mask, _ = make_prompts(batch, 256, 1, 9, torch.Generator().manual_seed(100 + case))
    plain = dict(attention_mask=mask, do_sample=False, max_new_tokens=18, pad_token_id=0)
    expected = target.generate(ids, **plain)
    assert torch.equal(jakiro_generate(target, draft, ids, **plain), expected)
    # EOS ids taken from the greedy output, so rows stop at different points (or not at all).
    width = ids.shape[1]
    eos = int(expected[0, width + 3])
    eos_list = [255 - int(expected[0, width]) % 7, int(expected[-1, width + 6]), eos]
    for eos_token_id in (eos, eos_list):
        want = target.generate(ids, eos_token_id=eos_token_id, **plain)
        got = jakiro_generate(target, draft, ids, eos_token_id=eos_token_id, **plain)
        assert got.shape == want.shape and torch.equal(got, want), (eos_token_id, got, want)
    assert want.shape[1] < expected.shape[1] or batch > 1


def test_eos_and_pad_from_the_model_generation_config(llama):
    target, draft = llama
    ids, mask, _ = make_prompts(3, 256, 2, 6, torch.Generator().manual_seed(7))
    free = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0)
    config = GenerationConfig(eos_token_id=int(free[1, ids.shape[1] + 2]), pad_token_id=3, do_sample=False)
    expected = target.generate(ids, attention_mask=mask, generation_config=config, max_new_tokens=12)
    got = jakiro_generate(target, draft, ids, attention_mask=mask, generation_config=config, max_new_tokens=12)
    assert torch.equal(got, expected)
    assert bool((got == 3).any()), "a row that stopped early is padded with pad_token_id"


def test_max_length_and_min_new_tokens(llama):
    target, draft = llama
    ids, mask, _ = make_prompts(3, 256, 2, 7, torch.Generator().manual_seed(8))
    free = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=14, pad_token_id=0)
    eos = [int(free[0, ids.shape[1] + 1]), int(free[2, ids.shape[1] + 4])]
    for extra in (dict(max_length=ids.shape[1] + 9), dict(max_new_tokens=14, min_new_tokens=6),
                  dict(max_new_tokens=14, min_length=ids.shape[1] + 3)):
        plain = dict(attention_mask=mask, do_sample=False, eos_token_id=eos, pad_token_id=0, **extra)
        expected = target.generate(ids, **plain)
        assert torch.equal(jakiro_generate(target, draft, ids, **plain), expected), extra


def test_stop_strings_end_rows_as_generate_does(llama):
    target, draft = llama
    tokenizer = make_tokenizer()
    ids, mask, _ = make_prompts(3, 256, 2, 7, torch.Generator().manual_seed(9))
    width = ids.shape[1]
    free = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=0)
    # A stop string across two tokens of row 1 (the last letter of one, then the next), and one
    # inside a single token of row 2.
    words = tokenizer.convert_ids_to_tokens(free[1, width + 4:width + 6].tolist())
    stops = [words[0][-1] + words[1], tokenizer.convert_ids_to_tokens(int(free[2, width + 9]))]
    unused = sorted(set(range(256)) - set(free[:, width:].reshape(-1).tolist()))[0]
    plain = dict(attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=0, eos_token_id=unused)
    expected = target.generate(ids, stop_strings=stops, tokenizer=tokenizer, **plain)
    assert not torch.equal(expected, free), "the stop strings must end rows early"
    got = jakiro_generate(target, draft, ids, stop_strings=stops, tokenizer=tokenizer, **plain)
    assert torch.equal(got, expected)
    # One row and no EOS at all; and the criteria passed as HF objects.
    from transformers import StopStringCriteria, StoppingCriteriaList
    one = dict(do_sample=False, max_new_tokens=16)
    expected = target.generate(ids[1:2, -5:], stop_strings=stops[:1], tokenizer=tokenizer, **one)
    assert expected.shape[1] < 5 + 16
    assert torch.equal(jakiro_generate(target, draft, ids[1:2, -5:], stop_strings=stops[:1], tokenizer=tokenizer,
                                       **one), expected)
    criteria = StoppingCriteriaList([StopStringCriteria(tokenizer, stops[:1])])
    assert torch.equal(jakiro_generate(target, draft, ids[1:2, -5:], stopping_criteria=criteria, **one), expected)


def test_sampling_settings_are_mapped_and_seeded_runs_reproduce(llama, monkeypatch):
    target, draft = llama
    seen = []
    real = jakiro.SpeculativeGenerator.generate

    def spy(self, *args, **kwargs):
        seen.append({k: kwargs[k] for k in ("temperature", "top_p", "top_k")})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(jakiro.SpeculativeGenerator, "generate", spy)
    ids, mask, _ = make_prompts(3, 256, 2, 6, torch.Generator().manual_seed(11))
    sample = dict(attention_mask=mask, max_new_tokens=16, pad_token_id=0, do_sample=True, temperature=0.7,
                  top_p=0.9, top_k=20)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(jakiro_generate(target, draft, ids, **sample))
    assert seen[0] == dict(temperature=0.7, top_p=pytest.approx(0.9), top_k=20)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert torch.equal(runs[0][:, :ids.shape[1]], ids) and runs[0].shape == (3, ids.shape[1] + 16)
    with_generator = [jakiro_generate(target, draft, ids, generator=torch.Generator().manual_seed(5), **sample)
                      for _ in range(2)]
    assert torch.equal(*with_generator)
    # From the model's GenerationConfig (generate's default top_k=50 included); greedy -> temperature 0.
    target.generation_config.do_sample, target.generation_config.temperature = True, 0.5
    try:
        jakiro_generate(target, draft, ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    finally:
        target.generation_config.do_sample, target.generation_config.temperature = False, 1.0
    jakiro_generate(target, draft, ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    assert seen[-2:] == [dict(temperature=0.5, top_p=1.0, top_k=50), dict(temperature=0.0, top_p=1.0, top_k=0)]
    # num_return_sequences: generate repeats the rows before the decoding loop.
    out = jakiro_generate(target, draft, ids, num_return_sequences=2, **sample)
    assert out.shape == (6, ids.shape[1] + 16) and torch.equal(out[1::2, :ids.shape[1]], ids)


def test_streamer_gets_the_prompt_once_then_the_new_tokens(llama):
    from threading import Thread
    from transformers import TextIteratorStreamer
    target, draft = llama

    class Recorder:
        def __init__(self):
            self.chunks, self.ends = [], 0

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ends += 1

    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(12))
    recorder = Recorder()
    out = jakiro_generate(target, draft, ids, do_sample=False, max_new_tokens=15, streamer=recorder)
    assert recorder.chunks[0] == ids[0].tolist() and recorder.ends == 1
    assert [t for chunk in recorder.chunks[1:] for t in chunk] == out[0, 6:].tolist()
    assert len(recorder.chunks) > 2 and len(recorder.chunks) - 1 < 15, "one chunk per cycle"

    tokenizer = make_tokenizer()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    result = {}
    thread = Thread(target=lambda: result.update(out=jakiro_generate(target, draft, ids, do_sample=False,
                                                                     max_new_tokens=15, streamer=streamer)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == tokenizer.decode(result["out"][0, 6:])


def test_return_dict_in_generate(llama):
    target, draft = llama
    ids, mask, _ = make_prompts(2, 256, 3, 6, torch.Generator().manual_seed(13))
    plain = dict(attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)
    out = jakiro_generate(target, draft, ids, return_dict_in_generate=True, **plain)
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert torch.equal(out.sequences, jakiro_generate(target, draft, ids, **plain))
    assert torch.equal(out.sequences, target.generate(ids, **plain))
    assert out.scores is None and out.logits is None and out.cache is None


def test_draft_from_a_folder_and_auto_tree_size(llama, tmp_path):
    target, draft = llama
    draft.save_pretrained(tmp_path)
    ids, mask, _ = make_prompts(2, 256, 3, 6, torch.Generator().manual_seed(14))
    plain = dict(attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)
    expected = target.generate(ids, **plain)
    assert torch.equal(jakiro_generate(target, str(tmp_path), ids, **plain), expected)
    assert torch.equal(target.generate(ids, custom_generate=speculative_decoding, draft=tmp_path, depth=2,
                                       tree_top_k=3, total_tokens="auto", **plain), expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(repetition_penalty=1.2), "RepetitionPenaltyLogitsProcessor"),
    (dict(no_repeat_ngram_size=2), "NoRepeatNGramLogitsProcessor"),
    (dict(bad_words_ids=[[5]]), "NoBadWordsLogitsProcessor"),
    (dict(suppress_tokens=[5]), "SuppressTokensLogitsProcessor"),
    (dict(do_sample=True, min_p=0.1), "MinPLogitsWarper"),
    (dict(num_beams=2), "num_beams=2 is not supported"),
    (dict(return_dict_in_generate=True, output_scores=True), "output_scores cannot be returned"),
    (dict(return_dict_in_generate=True, output_logits=True), "output_logits cannot be returned"),
    (dict(stop_strings=["ab"]), "stop_strings needs tokenizer="),
    (dict(draft=None), "needs draft="),
    (dict(prompt_lookup_num_tokens=3), "'assisted_generation' is not supported"),
])
def test_what_cannot_be_exact_is_refused(llama, kwargs, message):
    target, draft = llama
    ids = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(15))
    with pytest.raises(ValueError, match=message):
        jakiro_generate(target, kwargs.pop("draft", draft), ids, max_new_tokens=4, pad_token_id=0, **kwargs)


def test_refusals_that_need_more_than_a_flag(llama):
    from transformers import StopStringCriteria, StoppingCriteriaList
    target, draft = llama
    ids = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(16))
    criteria = StoppingCriteriaList([StopStringCriteria(make_tokenizer(), ["ab"])])
    with pytest.raises(ValueError, match="StopStringCriteria in a batch of several rows needs an eos_token_id"):
        jakiro_generate(target, draft, ids, max_new_tokens=4, stopping_criteria=criteria)
    with pytest.raises(ValueError, match="'assisted_generation' is not supported"):
        jakiro_generate(target, draft, ids, max_new_tokens=4, pad_token_id=0, assistant_model=target)
    with pytest.raises(ValueError, match=r"model inputs \['inputs_embeds'\]"):
        target.generate(inputs_embeds=target.get_input_embeddings()(ids), custom_generate=speculative_decoding,
                        draft=draft, max_new_tokens=4, pad_token_id=0)


def test_lookup_branch_keeps_generate_s_greedy_output(llama):
    target, draft = llama
    # Prompts that repeat themselves, so the lookup branch has matches to propose.
    ids = torch.tensor([[5, 9, 2, 7, 5, 9, 2, 7, 5, 9], [3, 3, 4, 3, 3, 4, 3, 3, 4, 3]])
    plain = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20, pad_token_id=0)
    expected = target.generate(ids, **plain)
    assert torch.equal(jakiro_generate(target, draft, ids, lookup=4, **plain), expected)
    with pytest.raises(ValueError, match="lookup must be an int in"):
        jakiro_generate(target, draft, ids, lookup=16, **plain)

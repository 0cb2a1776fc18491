"""jakiro.pretrained (the default target, GGUF conversion, HF folders) and jakiro.commands.prompts."""
import torch

import pytest

from jakiro import pretrained
from jakiro.commands import prompts
from jakiro.testing import make_tiny_target
from jakiro.train.datagen import encode_conversation


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    """The default target converted into a fresh cache (the first-use path)."""
    cache = tmp_path_factory.mktemp("jakiro-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAKIRO_CACHE", str(cache))
        folder = pretrained.resolve_target(progress=False)
    assert folder.parent == cache
    return folder


def test_default_target_converts_once_and_matches_the_gguf(smollm2_folder, monkeypatch):
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("JAKIRO_CACHE", str(smollm2_folder.parent))
    assert pretrained.resolve_target("smollm2", progress=False) == smollm2_folder      # cached: no second conversion
    model, tokenizer = pretrained.load_target()
    config = model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size) == \
        ("llama", 576, 30, 49152)
    assert config.tie_word_embeddings and "quantization_config" not in config.to_dict()
    gguf = pretrained.smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([[1, 4093, 28, 253, 3458, 314, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    # transformers 5 does not prepend BOS; the chat template and its default system prompt are there.
    assert tokenizer("Hello")["input_ids"][0] != tokenizer.bos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_assistant_mask_on_the_real_smollm2_tokenizer(smollm2_folder):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    conversation = [{"role": "user", "content": "Hi there, how are you?"},
                    {"role": "assistant", "content": "I'm fine.\nThanks!"},
                    {"role": "user", "content": "Tell me more"},
                    {"role": "assistant", "content": "Sure: more."}]
    ids, mask = encode_conversation(tokenizer, conversation)
    assert tokenizer.decode(ids[mask.bool()]) == "I'm fine.\nThanks!<|im_end|>Sure: more.<|im_end|>"
    # Each answer's first masked token follows the assistant header's newline.
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    assert [tokenizer.decode(ids[i - 4:i]) for i in starts] == ["<|im_start|>assistant\n"] * 2


def test_hf_folder_and_gguf_paths_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("JAKIRO_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    make_tiny_target("llama", seed=0).save_pretrained(folder)
    assert pretrained.resolve_target(folder) == folder
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a GGUF file"):
        pretrained.resolve_target(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pretrained.resolve_target(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        pretrained.resolve_target(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="unknown shipped draft"):
        pretrained.shipped_draft("medusa")


def test_load_tokenizer_reads_no_weights(tmp_path):
    from jakiro.testing import SMOLLM2_CHAT_TEMPLATE, make_chat_tokenizer
    folder = tmp_path / "tiny"
    make_tiny_target("llama", seed=0, max_positions=512).save_pretrained(folder)
    make_chat_tokenizer(SMOLLM2_CHAT_TEMPLATE).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"garbage")   # never opened
    resolved, tokenizer, config = pretrained.load_tokenizer(folder)
    assert resolved == folder and config.max_position_embeddings == 512
    assert tokenizer("hello weather")["input_ids"] == [tokenizer.convert_tokens_to_ids(w) for w in ("hello", "weather")]


def test_a_user_gguf_is_cached_under_its_digest(tmp_path, monkeypatch):
    import shutil
    monkeypatch.setenv("JAKIRO_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "mine.gguf"
    shutil.copyfile(pretrained.smollm2_gguf(), copy)
    folder = pretrained.resolve_target(copy, progress=False)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("mine-")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_offline_datasets():
    questions = prompts.mtbench_questions()
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    categories = {q["category"] for q in questions}
    assert len(categories) == 8
    assert len(prompts.mtbench_questions(["coding", "math"])) == 20
    with pytest.raises(ValueError, match="unknown MT-bench categories"):
        prompts.mtbench_questions(["poetry"])
    tasks = prompts.humaneval_prompts()
    assert len(tasks) == 164 and tasks[0]["task_id"] == "HumanEval/0" and "def " in tasks[0]["prompt"]
    with pytest.raises(ValueError, match="unknown dataset"):
        prompts.dataset_path("gsm8k")


def test_sharegpt_slices_are_seeded_and_disjoint():
    train = prompts.sharegpt_first_turns(30, seed=0)
    held_out = prompts.sharegpt_first_turns(10, seed=0, skip=30)
    assert train == prompts.sharegpt_first_turns(30, seed=0)
    assert not set(train) & set(held_out)
    assert all(16 <= len(p) <= 2000 for p in train + held_out)
    # The first exchanges are those records with ShareGPT's own first answer.
    exchanges = prompts.sharegpt_first_exchanges(10, seed=0, skip=30)
    assert 8 <= len(exchanges) <= 10
    assert all([m["role"] for m in x] == ["user", "assistant"] and x[1]["content"] for x in exchanges)
    assert {x[0]["content"] for x in exchanges} <= set(held_out)


def test_the_old_module_name_still_works_with_a_deprecation_warning():
    import importlib
    import sys
    sys.modules.pop("jakiro.models", None)
    with pytest.warns(DeprecationWarning, match="jakiro.models is now jakiro.pretrained"):
        old = importlib.import_module("jakiro.models")
    assert old.load_target is pretrained.load_target and old.shipped_draft is pretrained.shipped_draft

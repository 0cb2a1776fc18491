"""jakiro datagen: the assistant mask from two chat templates, the readers, shards, resume."""
import json

import pytest
import torch

from jakiro.testing import (LLAMA2_CHAT_TEMPLATE, SMOLLM2_CHAT_TEMPLATE, make_chat_tokenizer,
                            make_tiny_target)
from jakiro.train.data import FeatureDataset, read_index
from jakiro.train.conversations import read_conversations, read_jsonl, read_sharegpt
from jakiro.train.datagen import encode_conversation, generate_features, regenerate_answers, target_features

CONVERSATION = [{"role": "user", "content": "hello how is the weather"},
                {"role": "assistant", "content": "it is sunny today"},
                {"role": "user", "content": "thanks and tomorrow"},
                {"role": "assistant", "content": "rain"}]


def _masked_tokens(tokenizer, conversation):
    ids, mask = encode_conversation(tokenizer, conversation)
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert "<unk>" not in tokens
    return [t for t, m in zip(tokens, mask.tolist()) if m]


def test_mask_covers_exactly_the_assistant_tokens_smollm2():
    tokenizer = make_chat_tokenizer(SMOLLM2_CHAT_TEMPLATE)
    assert _masked_tokens(tokenizer, CONVERSATION) == ["it", "is", "sunny", "today", "<|im_end|>", "rain", "<|im_end|>"]
    # The system prompt's "assistant" and the role headers are not assistant text.
    ids, mask = encode_conversation(tokenizer, CONVERSATION)
    assert mask.sum() == 7 and len(ids) > 20


def test_mask_covers_exactly_the_assistant_tokens_llama2_style():
    tokenizer = make_chat_tokenizer(LLAMA2_CHAT_TEMPLATE)
    assert _masked_tokens(tokenizer, CONVERSATION) == ["it", "is", "sunny", "today", "</s>", "rain", "</s>"]
    ids, _ = encode_conversation(tokenizer, CONVERSATION, max_len=5)
    assert len(ids) == 5


def test_template_that_is_not_prefix_stable_is_rejected():
    tokenizer = make_chat_tokenizer("{% for m in messages|reverse %}{{ m['content'] }} {% endfor %}")
    with pytest.raises(ValueError, match="prefix by prefix"):
        encode_conversation(tokenizer, CONVERSATION)


def test_sharegpt_reader_parses_a_truncated_file_record_by_record(tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
               for i in range(4)]
    records[1]["conversations"] = [{"from": "human", "value": "no answer"}]   # skipped: no assistant turn
    text = json.dumps(records, indent=1)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: text.index('"a3"') + 2])   # cut inside the last record
    conversations = list(read_sharegpt(str(path)))
    assert [c[1]["content"] for c in conversations] == ["a0", "a2"]
    assert conversations[0][0] == {"role": "user", "content": "q0"}
    path.write_text(text)
    assert len(list(read_sharegpt(str(path)))) == 3


def test_readers_reject_wrong_formats_naming_the_file(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    with pytest.raises(ValueError, match="data.jsonl is not a ShareGPT file"):
        list(read_conversations(str(jsonl), "sharegpt"))
    assert len(list(read_conversations(str(jsonl), "jsonl"))) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n[1, 2\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not a JSON line"):
        list(read_jsonl(str(bad)))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match="wrong.jsonl:1: a record needs"):
        list(read_jsonl(str(wrong)))
    with pytest.raises(ValueError, match="missing.json does not exist"):
        read_conversations(str(tmp_path / "missing.json"), "sharegpt")
    with pytest.raises(ValueError, match="format must be one of"):
        read_conversations(str(jsonl), "csv")


def test_generate_features_writes_shards_and_resumes(tmp_path):
    tokenizer = make_chat_tokenizer(SMOLLM2_CHAT_TEMPLATE)
    target = make_tiny_target("llama", hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab=64)
    conversations = [CONVERSATION, CONVERSATION[:2], CONVERSATION[2:], CONVERSATION] * 2
    out = tmp_path / "features"
    index = generate_features(target, tokenizer, conversations, str(out), per_shard=3, progress=False)
    assert [s["samples"] for s in index["shards"]] == [3, 3, 2]
    dataset = FeatureDataset(str(out))
    ids, mask = encode_conversation(tokenizer, CONVERSATION)
    assert torch.equal(dataset[0]["input_ids"], ids) and torch.equal(dataset[0]["loss_mask"], mask)
    torch.testing.assert_close(dataset[0]["hidden_states"], target_features(target, ids).float())
    # Resume: a deleted shard is regenerated, the others are left alone.
    (out / "shard_00001.safetensors").unlink()
    before = (out / "shard_00000.safetensors").stat().st_mtime_ns
    index = generate_features(target, tokenizer, conversations, str(out), per_shard=3, progress=False)
    assert [s["file"] for s in read_index(str(out))["shards"]] == [
        "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == before
    assert len(FeatureDataset(str(out))) == 8


@pytest.mark.parametrize("head_dim", [64, 16])   # 64: on jakiro's stack; 16: on HF generate (no kernel)
def test_regenerate_rewrites_answers_with_the_target_batched_like_one_by_one(tmp_path, head_dim):
    tokenizer = make_chat_tokenizer(SMOLLM2_CHAT_TEMPLATE)
    target = make_tiny_target("llama", hidden=2 * head_dim, heads=2, kv_heads=1, head_dim=head_dim,
                              intermediate=64, vocab=len(tokenizer), seed=8)
    target.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversations = [CONVERSATION, CONVERSATION[2:], [{"role": "user", "content": "hello"}] + CONVERSATION[1:2]]
    batched = regenerate_answers(target, tokenizer, conversations, max_new_tokens=5, batch_size=3)
    single = regenerate_answers(target, tokenizer, conversations, max_new_tokens=5, batch_size=1)
    assert batched == single
    assert [m["role"] for m in batched[0]] == [m["role"] for m in CONVERSATION]
    assert [m["content"] for m in batched[0] if m["role"] == "user"] == ["hello how is the weather", "thanks and tomorrow"]
    # Turn 1 of conversation 1 is the target's greedy continuation of its prompt.
    prompt = tokenizer.apply_chat_template(CONVERSATION[2:3], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                          eos_token_id=target.generation_config.eos_token_id, pad_token_id=0)
    assert batched[1][1]["content"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert batched[1][1]["content"] != CONVERSATION[3]["content"]
    index = generate_features(target, tokenizer, conversations, str(tmp_path / "regen"), regenerate=True,
                              max_new_tokens=5, progress=False)
    assert sum(entry["samples"] for entry in index["shards"]) >= 1


def test_generate_features_stores_the_feature_layers_and_resumes_only_with_them(tmp_path):
    tokenizer = make_chat_tokenizer(SMOLLM2_CHAT_TEMPLATE)
    target = make_tiny_target("llama", hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab=64,
                              layers=4)
    out = tmp_path / "features"
    index = generate_features(target, tokenizer, [CONVERSATION] * 4, str(out), per_shard=2, progress=False,
                              feature_layers=[1, 3])
    assert index["feature_layers"] == [1, 3]
    dataset = FeatureDataset(str(out))
    ids, _ = encode_conversation(tokenizer, CONVERSATION)
    with torch.no_grad():
        states = target.get_decoder()(input_ids=ids[None], output_hidden_states=True).hidden_states
    expected = torch.cat((states[1], states[3], states[-1]), dim=-1)[0]
    torch.testing.assert_close(dataset[0]["hidden_states"], expected)
    with pytest.raises(ValueError, match="feature_layers=\\[1, 3\\]"):
        generate_features(target, tokenizer, [CONVERSATION] * 4, str(out), per_shard=2, progress=False)

"""Bad arguments fail fast: every command checks its options before it loads a model and ends
with one stderr line (no traceback) and exit status 2; so do prompts too long for the context,
data that yields no training sample and features of another hidden size."""
import json
import subprocess
import sys
import time

import pytest
import torch

from jakiro import cli, pretrained
from jakiro.testing import (SMOLLM2_CHAT_TEMPLATE, make_chat_tokenizer, make_feature_shards, make_tiny_target,
                            save_tiny_target_and_draft)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny target (1024 positions) with a word-level tokenizer, a draft for it, a chat target
    and datagen features of hidden size 32."""
    root = tmp_path_factory.mktemp("cli_errors")
    save_tiny_target_and_draft(root)
    chat = make_tiny_target("llama", hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab=64, seed=2)
    chat.save_pretrained(root / "chat")
    make_chat_tokenizer(SMOLLM2_CHAT_TEMPLATE).save_pretrained(root / "chat")
    make_feature_shards(chat, root / "features32", conversations=4, length=10, per_shard=4, seed=1)
    records = [{"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "it is sunny"}]}]
    (root / "good.json").write_text(json.dumps(records))
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(pretrained, "load_target", refuse)


def fails(argv, capsys, match, model_loaded=False):
    """``jakiro argv`` exits with status 2 and one stderr line that contains ``match`` (after the
    loading bars of transformers when ``model_loaded``)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    if not model_loaded:
        assert len(err) == 1, err
    assert err[-1].startswith(f"jakiro {argv[0]}: error: ") and match in err[-1], err
    return err[-1]


TARGET_CASES = [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--depth", "0"], "--depth must be >= 1"),
    (["--tree-top-k", "0"], "--tree-top-k must be >= 1"),
    (["--draft-vocab", "-5"], "--draft-vocab must be >= 0"),
    (["--draft-vocab", "3", "--tree-top-k", "4"], "--tree-top-k 4 exceeds --draft-vocab 3"),
    (["--total-tokens", "many"], "--total-tokens must be an int or 'auto'"),
    (["--total-tokens", "1"], "--total-tokens must be in [2, 53]"),
    (["--depth", "2", "--tree-top-k", "2", "--total-tokens", "12"], "--total-tokens must be in [2, 11]"),
    (["--device", "gpu0"], "is not a device"),
    (["--device", "meta"], "jakiro runs on cpu or cuda"),
]


@pytest.mark.parametrize("extra,match", TARGET_CASES + [
    (["--temperature", "-1"], "--temperature must be a number >= 0"),
    (["--temperature", "nan"], "--temperature must be a number >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
])
def test_generate_checks_its_arguments_before_loading_a_model(saved, no_model, capsys, extra, match):
    fails(["generate", "--target", str(saved / "target"), "--prompt", "w1", "--device", "cpu"] + extra,
          capsys, match)


@pytest.mark.parametrize("command,extra,match", [
    ("demo", ["--questions", "0"], "--questions must be in [1, 8]"),
    ("demo", ["--temperature", "-0.5"], "--temperature must be a number >= 0"),
    ("demo", ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ("bench-e2e", ["--methods", "vanilla,medusa"], "unknown --methods ['medusa']"),
    ("bench-e2e", ["--datasets", "gsm8k"], "unknown --datasets"),
    ("bench-e2e", ["--temperatures", "0,-1"], "--temperatures must be >= 0"),
    ("bench-e2e", ["--temperatures", "hot"], "--temperatures must be numbers"),
    ("bench-e2e", ["--limit", "0"], "--limit must be >= 1"),
    ("bench-e2e", ["--total-tokens", "0"], "--total-tokens must be in [2, "),
    ("bench-e2e", ["--methods", "eagle2", "--eagle2-draft", "/nowhere"], "--eagle2-draft /nowhere has no config.json"),
    ("demo", ["--target", "gemma3-270m"], "no trained draft ships for --target gemma3-270m: pass --draft FOLDER"),
    ("bench-e2e", ["--target", "qwen2.5-coder-0.5b", "--draft", "untrained"],
     "no trained draft ships for --target qwen2.5-coder-0.5b: pass --eagle2-draft FOLDER"),
])
def test_demo_and_bench_check_their_arguments_before_loading_a_model(no_model, capsys, command, extra, match):
    fails([command, "--device", "cpu"] + extra, capsys, match)


@pytest.mark.parametrize("extra,match", [
    (["--max-len", "0"], "--max-len must be >= 3"),
    (["--per-shard", "0"], "--per-shard must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1"),
    (["--data", "/nowhere.json"], "--data /nowhere.json is not a file"),
    (["--feature-layers", "3,2"], "--feature-layers must be increasing"),
    (["--feature-layers", "low"], "--feature-layers must be auto, none or"),
])
def test_datagen_checks_its_arguments_before_loading_a_model(saved, no_model, capsys, tmp_path, extra, match):
    fails(["datagen", "--target", str(saved / "chat"), "--data", str(saved / "good.json"), "--format", "sharegpt",
           "--out", str(tmp_path / "out"), "--device", "cpu"] + extra, capsys, match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,match", [
    (["--steps", "-1"], "--steps must be >= 1, got -1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lr=-1e-4"], "--lr must be >= 0"),
    (["--lr", "nan"], "--lr must be >= 0"),
    (["--noise", "-0.1"], "--noise must be >= 0"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),   # argparse's own errors: one line too
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--loss-vocab", "0"], "--loss-vocab must be >= 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (["--max-len", "2"], "--max-len must be >= 3"),
    (["--draft-config", "num_expert=3"], "--draft-config: unknown keys ['num_expert']"),
    (["--draft-config", "num_experts"], "--draft-config expects KEY=VALUE"),
    (["--init", "/nowhere"], "--init /nowhere has no config.json"),
    (["--init", "/nowhere", "--eagle2"], "--init takes the draft's configuration from its folder"),
    (["--device", "tpu"], "is not a device"),
])
def test_train_checks_its_arguments_before_loading_a_model(saved, no_model, capsys, tmp_path, extra, match):
    fails(["train", "--target", str(saved / "chat"), "--data", str(saved / "features32"), "--out",
           str(tmp_path / "run"), "--device", "cpu", "--no-progress"] + extra, capsys, match)
    assert not (tmp_path / "run").exists()   # no untrained draft left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available")
@pytest.mark.parametrize("command", ["generate", "demo", "bench-e2e", "datagen", "train"])
def test_device_cuda_without_a_gpu_says_so(saved, no_model, capsys, tmp_path, command):
    argv = {"generate": ["--prompt", "w1"], "demo": [], "bench-e2e": [],
            "datagen": ["--data", str(saved / "good.json"), "--format", "sharegpt", "--out", str(tmp_path)],
            "train": ["--data", str(saved / "features32"), "--out", str(tmp_path)]}[command]
    fails([command, "--device", "cuda"] + argv, capsys, "--device cuda: no CUDA GPU is available here")


def test_a_prompt_longer_than_the_context_fails_before_the_model_loads(saved, no_model, capsys):
    # The tokenizer loads first (the model holds 1024 positions).
    prompt = " ".join(f"w{i % 250}" for i in range(5000))
    message = fails(["generate", "--target", str(saved / "target"), "--prompt", prompt, "--vanilla", "--device",
                     "cpu"], capsys, "a 5000-token prompt, 256 new tokens need 5257 positions")
    assert "context of 1024" in message
    # A prompt that fits alone but not with the draft tree and the new tokens.
    fails(["generate", "--target", str(saved / "target"), "--prompt", " ".join(["w1"] * 1000), "--device", "cpu",
           "--max-new-tokens", "20", "--total-tokens", "8"], capsys,
          "a 1000-token prompt, 20 new tokens and the draft tree need 1034 positions")   # lookup's chain: 5 deep


def test_a_draft_without_token_counts_explains_draft_vocab_0(saved, no_model, capsys):
    message = fails(["generate", "--target", str(saved / "target"), "--draft", str(saved / "draft"), "--prompt",
                     "w1", "--draft-vocab", "100", "--device", "cpu"], capsys, "has no token_counts.safetensors")
    assert "--draft-vocab 0" in message
    fails(["generate", "--target", str(saved / "target"), "--draft", str(saved / "missing"), "--prompt", "w1",
           "--device", "cpu"], capsys, "has no config.json")


def test_a_garbage_draft_file_is_one_line_naming_it(saved, tmp_path, capsys):
    import shutil
    shutil.copytree(saved / "draft", tmp_path / "draft")
    weights = tmp_path / "draft" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SystemExit, match="model.safetensors is not a readable safetensors file"):
        cli.main(["generate", "--target", str(saved / "target"), "--draft", str(tmp_path / "draft"),
                  "--prompt", "w1", "--total-tokens", "8", "--device", "cpu"])


def test_datagen_of_records_with_unusable_roles_fails_before_the_model_loads(saved, no_model, capsys, tmp_path):
    records = [{"conversations": [{"from": "narrator", "value": "hello"}, {"from": "gpt", "value": "hi"}]},
               {"conversations": [{"from": "human", "value": "only a question"}]}]
    data = tmp_path / "odd.json"
    data.write_text(json.dumps(records))
    fails(["datagen", "--target", str(saved / "chat"), "--data", str(data), "--format", "sharegpt", "--out",
           str(tmp_path / "out"), "--device", "cpu", "--no-progress"], capsys, "holds no usable conversation")


def test_datagen_that_yields_no_sample_is_an_error(saved, capsys, tmp_path):
    # 3 tokens of the template's system prompt: no assistant token survives the cut.
    fails(["datagen", "--target", str(saved / "chat"), "--data", str(saved / "good.json"), "--format", "sharegpt",
           "--out", str(tmp_path / "out"), "--max-len", "3", "--device", "cpu", "--no-progress"], capsys,
          "gave a training sample", model_loaded=True)


def test_train_checks_the_features_hidden_size_against_the_target(saved, capsys, tmp_path):
    message = fails(["train", "--target", str(saved / "target"), "--data", str(saved / "features32"), "--out",
                     str(tmp_path / "run"), "--steps", "1", "--device", "cpu", "--no-progress"], capsys,
                    "holds features of size 32", model_loaded=True)
    assert "hidden size 64" in message
    assert not (tmp_path / "run").exists()


def _run(args):
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "jakiro.cli"] + args, capture_output=True, text=True, timeout=300)
    return run, time.perf_counter() - start


def test_exit_status_and_one_line_in_a_real_process(saved, tmp_path):
    """`python -m jakiro.cli` (as the `jakiro` script): status 2, one stderr line, no traceback, in seconds."""
    prompt = " ".join(f"w{i % 250}" for i in range(5000))   # ~20,000 characters, 5000 tokens
    for args, match in [
        (["generate", "--target", str(saved / "target"), "--prompt", prompt, "--device", "cpu"],
         "more than the target's context of 1024"),
        (["generate", "--target", str(saved / "target"), "--prompt", "w1", "--max-new-tokens", "0"],
         "--max-new-tokens must be >= 1, got 0"),
        (["train", "--target", str(saved / "chat"), "--data", str(saved / "features32"), "--out",
          str(tmp_path / "run"), "--steps", "-1"], "--steps must be >= 1, got -1"),
    ]:
        run, seconds = _run(args)
        assert run.returncode == 2, run.stderr[-2000:]
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr[-2000:]
        assert match in run.stderr
        assert seconds < 60   # imports only: no model ran
    assert not (tmp_path / "run").exists()

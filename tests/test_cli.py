"""`jakiro generate` end to end on a tiny model and tokenizer saved to disk."""
import subprocess
import sys

import pytest
import torch

import jakiro
from jakiro import cli
from jakiro.testing import make_tiny_target


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(254)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    target = make_tiny_target("llama", seed=3)
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    torch.manual_seed(4)
    jakiro.JakiroDraft.from_target(target).save_pretrained(root / "draft")
    return root, target


def test_cli_generate_streams_and_summarises(saved_models, capsys):
    root, target = saved_models
    code = cli.main(["generate", "--target", str(root / "target"), "--draft", str(root / "draft"),
                     "--prompt", "w5 w9 w13 w2", "--max-new-tokens", "6", "--depth", "2", "--tree-top-k", "3",
                     "--total-tokens", "8", "--device", "cpu", "--dtype", "float32"])
    assert code == 0
    out, err = capsys.readouterr()
    assert "tokens/s" in err and "mean accepted length tau" in err
    # The streamed text is the target's greedy continuation (same device and dtype as the CLI run:
    # a random tiny model's near-ties make bf16-on-GPU greedy differ from fp32-on-CPU greedy).
    prompt = torch.tensor([[7, 11, 15, 4]])
    expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6,
                               eos_token_id=1, pad_token_id=0)[0, 4:]
    words = [f"w{int(t) - 2}" for t in expected if int(t) != 1]
    assert out.split() == words


def test_cli_requires_a_draft_unless_vanilla(saved_models):
    root, _ = saved_models
    with pytest.raises(SystemExit, match="--draft is required"):
        cli.main(["generate", "--target", str(root / "target"), "--prompt", "w1"])
    assert cli.main(["generate", "--target", str(root / "target"), "--prompt", "w1", "--vanilla",
                     "--max-new-tokens", "3"]) == 0


def test_python_dash_m_entry_point(saved_models):
    root, _ = saved_models
    run = subprocess.run([sys.executable, "-m", "jakiro.cli", "generate", "--target", str(root / "target"),
                          "--vanilla", "--prompt", "w3 w4", "--max-new-tokens", "3", "--temperature", "1.0",
                          "--seed", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "tokens/s" in run.stderr

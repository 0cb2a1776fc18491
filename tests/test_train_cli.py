"""`jakiro datagen` and `jakiro train` end to end, and the trainer under torchrun (gloo, 2 CPU processes)."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from jakiro import cli
from jakiro.draft import JakiroDraft, most_frequent_tokens
from jakiro.testing import SMOLLM2_CHAT_TEMPLATE, make_chat_tokenizer, make_feature_shards, make_tiny_target
from jakiro.train.data import FeatureDataset, token_counts
from jakiro.train.trainer import TrainConfig, Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved_target(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    target = make_tiny_target("llama", hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab=64, seed=2)
    target.save_pretrained(root / "target")
    make_chat_tokenizer(SMOLLM2_CHAT_TEMPLATE).save_pretrained(root / "target")
    return root, target


def test_cli_datagen_then_train(saved_target):
    root, target = saved_target
    records = [{"conversations": [{"from": "human", "value": "hello how is the weather"},
                                  {"from": "gpt", "value": "it is sunny today" + " rain" * i}]} for i in range(6)]
    data = root / "sharegpt.json"
    data.write_text(json.dumps(records))
    assert cli.main(["datagen", "--target", str(root / "target"), "--data", str(data), "--format", "sharegpt",
                     "--out", str(root / "features"), "--per-shard", "4", "--device", "cpu", "--no-progress"]) == 0
    assert len(FeatureDataset(str(root / "features"))) == 6
    assert cli.main(["datagen", "--target", str(root / "target"), "--data", str(data), "--format", "sharegpt",
                     "--out", str(root / "regenerated"), "--limit", "2", "--regenerate", "--max-new-tokens", "3",
                     "--device", "cpu", "--no-progress"]) == 0
    assert len(FeatureDataset(str(root / "regenerated"))) == 2
    assert cli.main(["train", "--target", str(root / "target"), "--data", str(root / "features"),
                     "--out", str(root / "run"), "--steps", "3", "--batch-size", "2", "--checkpoint-every", "2",
                     "--draft-config", "num_experts=3", "--device", "cpu", "--no-progress"]) == 0
    draft = JakiroDraft.from_pretrained(root / "run" / "draft", target)
    assert draft.config.num_experts == 3
    assert sorted(os.listdir(root / "run" / "checkpoints")) == ["step_00000002.safetensors",
                                                                  "step_00000003.safetensors"]
    # The training data's token counts travel with the draft: they choose a reduced drafting vocabulary.
    counts = token_counts(str(root / "features"), target.config.vocab_size)
    assert int(counts.sum()) == sum(len(FeatureDataset(str(root / "features"))[i]["input_ids"]) for i in range(6))
    reduced = JakiroDraft.from_pretrained(root / "run" / "draft", target, draft_vocab=5)
    assert reduced.drafting_vocab_size == 5
    assert torch.equal(reduced._draft_vocab, most_frequent_tokens(counts, 5))
    # Several data folders train together, the losses over a reduced vocabulary; the token counts
    # shipped with the draft are those of all the folders.
    assert cli.main(["train", "--target", str(root / "target"), "--data", str(root / "features"),
                     str(root / "regenerated"), "--out", str(root / "both"), "--steps", "2", "--batch-size", "2",
                     "--loss-vocab", "12", "--device", "cpu", "--no-progress"]) == 0
    both = token_counts([str(root / "features"), str(root / "regenerated")], target.config.vocab_size)
    shipped = JakiroDraft.from_pretrained(root / "both" / "draft", target, draft_vocab=12)
    assert torch.equal(shipped._draft_vocab, most_frequent_tokens(both, 12))
    # Fine-tuning: --init starts from a saved draft, its configuration included; with a zero
    # learning rate the weights come back unchanged.
    assert cli.main(["train", "--target", str(root / "target"), "--data", str(root / "features"),
                     "--out", str(root / "tuned"), "--init", str(root / "run" / "draft"), "--steps", "2",
                     "--batch-size", "2", "--lr", "0", "--device", "cpu", "--no-progress"]) == 0
    tuned = JakiroDraft.from_pretrained(root / "tuned" / "draft", target)
    assert tuned.config.num_experts == 3
    for name, value in draft.state_dict().items():
        assert torch.equal(value, tuned.state_dict()[name]), name
    with pytest.raises(SystemExit, match="--init takes the draft's configuration from its folder"):
        cli.main(["train", "--target", str(root / "target"), "--data", str(root / "features"), "--out",
                  str(root / "x"), "--init", str(root / "run" / "draft"), "--eagle2", "--device", "cpu"])


def test_cli_train_under_torchrun(saved_target, tmp_path):
    root, target = saved_target
    make_feature_shards(target, tmp_path / "features", conversations=6, length=10, per_shard=3, seed=6)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "--master_addr=127.0.0.1", "-m", "jakiro.cli", "train",
                          "--target", str(root / "target"), "--data", str(tmp_path / "features"), "--out",
                          str(tmp_path / "ddp_run"), "--steps", "2", "--batch-size", "1", "--device", "cpu",
                          "--no-progress"], capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("[jakiro] trained 2 steps") == 1        # rank 0 reports alone
    assert len((tmp_path / "ddp_run" / "train_log.jsonl").read_text().splitlines()) == 2
    JakiroDraft.from_pretrained(tmp_path / "ddp_run" / "draft", target)


def test_cli_errors_name_the_file(saved_target, tmp_path):
    root, _ = saved_target
    with pytest.raises(SystemExit, match="target .*nowhere is neither a model folder nor a GGUF file"):
        cli.main(["datagen", "--target", str(tmp_path / "nowhere"), "--data", str(root / "sharegpt.json"),
                  "--format", "sharegpt", "--out", str(tmp_path / "x"), "--device", "cpu"])
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"messages": []}\n')
    with pytest.raises(SystemExit, match="data.jsonl is not a ShareGPT file"):
        cli.main(["datagen", "--target", str(root / "target"), "--data", str(jsonl), "--format", "sharegpt",
                  "--out", str(tmp_path / "x"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="index.json does not exist"):
        cli.main(["train", "--target", str(root / "target"), "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                  "--device", "cpu"])


def test_cli_help_lists_the_training_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "datagen" in out and "train" in out and "generate" in out
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "torchrun" in capsys.readouterr().out


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from jakiro.draft import JakiroDraft
    from jakiro.testing import make_tiny_target
    from jakiro.train.data import FeatureDataset, token_counts
    from jakiro.train.trainer import TrainConfig, Trainer
    data, out = sys.argv[1], sys.argv[2]
    torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    target = make_tiny_target("llama", hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab=64, seed=2)
    torch.manual_seed(0 if torch.distributed.get_rank() == 0 else 1)   # DDP must broadcast rank 0's weights
    draft = JakiroDraft.from_target(target)
    config = TrainConfig(steps=6, batch_size=2, lr=1e-3, warmup_steps=2, checkpoint_every=100, noise=0.2, seed=3)
    Trainer(draft, FeatureDataset(data), out, config, progress=False).train()
    JakiroDraft.from_pretrained(f"{out}/draft", target)   # train() returns once rank 0 has written it
    torch.save(draft.state_dict(), f"{out}/rank{torch.distributed.get_rank()}.pt")
    torch.distributed.destroy_process_group()
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    target = make_tiny_target("llama", hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab=64, seed=2)
    # Equal lengths and masks: every rank's loss is normalised by the same token count.
    make_feature_shards(target, tmp_path / "data", conversations=10, length=12, per_shard=4, seed=4,
                        equal_masks=True, feature_layers=[1])
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(script),
                          str(tmp_path / "data"), str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert len(open(tmp_path / "ddp" / "train_log.jsonl").readlines()) == 6   # rank 0 logs alone

    torch.manual_seed(0)
    single = JakiroDraft.from_target(target)
    config = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=100, noise=0.2, seed=3)
    Trainer(single, FeatureDataset(str(tmp_path / "data")), str(tmp_path / "single"), config, progress=False).train()
    for name, value in single.state_dict().items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-6, msg=name)
    # The weights moved (the comparison is not between two untouched initialisations).
    torch.manual_seed(0)
    assert not torch.equal(JakiroDraft.from_target(target).fc.weight, single.fc.weight)

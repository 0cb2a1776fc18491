"""The draft trainer: data shards, learning, exact resume, torchrun DDP."""
import json
import os
import pickle
import shlex

import pytest
import torch

from jakiro.draft import JakiroDraft
from jakiro.testing import make_feature_shards, make_tiny_target
from jakiro.train.data import FeatureDataset, read_index
from jakiro.train.trainer import FINAL_DIR, LOG_NAME, TrainConfig, Trainer


@pytest.fixture(scope="module")
def target():
    return make_tiny_target("llama", hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab=64,
                            seed=5, residual_scale=0.3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, target):
    folder = tmp_path_factory.mktemp("features")
    # The layer a new draft of this 2-layer target fuses with the last (EAGLE-3 features).
    make_feature_shards(target, folder, conversations=12, length=20, per_shard=5, seed=1, feature_layers=[1])
    return folder


def _draft(target, seed=0, **overrides):
    torch.manual_seed(seed)
    return JakiroDraft.from_target(target, **overrides)


def _weights(draft):
    return {k: v.detach().clone() for k, v in draft.state_dict().items()}


def test_dataset_reads_every_conversation(data_dir):
    index = read_index(str(data_dir))
    assert [s["samples"] for s in index["shards"]] == [5, 5, 2]
    dataset = FeatureDataset(str(data_dir))
    assert len(dataset) == 12
    item = dataset[3]
    assert item["hidden_states"].shape == (item["input_ids"].numel(), 2 * 32) and item["index"] == 3
    assert len(FeatureDataset(str(data_dir), max_len=6)[0]["input_ids"]) == 6


def test_missing_or_corrupt_shard_is_named(data_dir, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    shard = broken / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="shard_00001.safetensors is corrupt"):
        FeatureDataset(str(broken))
    shard.unlink()
    with pytest.raises(ValueError, match="shard .*shard_00001.safetensors is missing"):
        FeatureDataset(str(broken))
    with pytest.raises(ValueError, match="index.json does not exist"):
        FeatureDataset(str(tmp_path / "nowhere"))
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json is not a valid index"):
        read_index(str(tmp_path))


@pytest.mark.parametrize("eagle2", [False, True], ids=["jakiro", "eagle2"])
def test_training_lowers_the_loss_and_raises_top1(target, data_dir, tmp_path, eagle2):
    draft = _draft(target, eagle2=eagle2)
    config = TrainConfig(steps=200, batch_size=4, lr=1e-2, warmup_steps=20, checkpoint_every=100, noise=0.05)
    Trainer(draft, FeatureDataset(str(data_dir)), str(tmp_path), config, progress=False).train()
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 201))

    def mean(key, records):
        return sum(r[key] for r in records) / len(records)
    # The CE terms hold the entropy of the random target's near-uniform p* (~log V), which no
    # draft removes; the total still drops clearly, the feature loss by far more.
    assert mean("loss", log[-10:]) < mean("loss", log[:10]) - 0.2
    assert mean("loss_feature_mixture", log[-10:]) < 0.4 * mean("loss_feature_mixture", log[:10])
    assert mean("top1_mixture", log[-10:]) > mean("top1_mixture", log[:10]) + 0.3
    if not eagle2:
        assert mean("loss_feature_contrastive", log[-10:]) < mean("loss_feature_contrastive", log[:10])
    # k-step accuracy is logged every k_step_every steps and at the end, for rounds 1..3.
    with_k = [r for r in log if "acc_1step" in r]
    assert [r["step"] for r in with_k] == [100, 200]
    assert all(0.0 <= r["acc_3step"] <= 1.0 for r in with_k) and with_k[-1]["acc_1step"] > 0.3
    # The final draft is saved and loads back with the same weights.
    loaded = JakiroDraft.from_pretrained(tmp_path / FINAL_DIR, target)
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, draft.state_dict()[name], rtol=0, atol=0)


def test_kill_and_resume_equals_an_uninterrupted_run(target, data_dir, tmp_path):
    config = TrainConfig(steps=12, batch_size=4, lr=1e-3, warmup_steps=3, checkpoint_every=5, noise=0.2, seed=7,
                         keep_checkpoints=2)
    dataset = FeatureDataset(str(data_dir))
    straight = _draft(target)
    Trainer(straight, dataset, str(tmp_path / "straight"), config, progress=False).train()

    interrupted = _draft(target)
    Trainer(interrupted, dataset, str(tmp_path / "resumed"), config, progress=False).train(stop_after=7)
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["step_00000005.safetensors",
                                                                       "step_00000007.safetensors"]
    torch.manual_seed(123)   # the resumed run must not depend on the state of the new process
    resumed = _draft(target, seed=99)
    Trainer(resumed, dataset, str(tmp_path / "resumed"), config, progress=False).train(resume=True)
    expected = _weights(straight)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["step_00000010.safetensors",
                                                                       "step_00000012.safetensors"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / LOG_NAME).read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_resume_without_checkpoint_is_an_error(target, data_dir, tmp_path):
    trainer = Trainer(_draft(target), FeatureDataset(str(data_dir)), str(tmp_path), TrainConfig(steps=2),
                      progress=False)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        trainer.train(resume=True)


class _Payload:
    """Unpickling this runs ``touch marker``: a hostile checkpoint's payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def test_checkpoint_is_safetensors_with_json_metadata(target, data_dir, tmp_path):
    from safetensors import safe_open
    config = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=2, k_step=0)
    Trainer(_draft(target), FeatureDataset(str(data_dir)), str(tmp_path), config, progress=False).train()
    with safe_open(str(tmp_path / "checkpoints" / "step_00000002.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["jakiro_checkpoint"])
        names = list(f.keys())
    assert meta["step"] == 2 and meta["format"] == 1
    assert "rng/torch" in names and any(n.startswith("optimizer/") for n in names)


def test_hostile_or_old_checkpoint_is_refused_without_running_it(target, data_dir, tmp_path):
    marker = tmp_path / "pwned"
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(live)))     # the payload works when unpickled...
    assert live.exists()
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    trainer = Trainer(_draft(target), FeatureDataset(str(data_dir)), str(tmp_path / "run"), TrainConfig(steps=2),
                      progress=False)
    # ...but never when resuming: an old torch.save checkpoint is named as such, not unpickled.
    torch.save({"step": _Payload(marker)}, folder / "step_00000001.pt")
    with pytest.raises(ValueError, match="step_00000001.pt is in the old pickle format"):
        trainer.train(resume=True)
    # The same pickle, or a bare one, under the current suffix.
    (folder / "step_00000002.safetensors").write_bytes((folder / "step_00000001.pt").read_bytes())
    with pytest.raises(ValueError, match="step_00000002.safetensors is in the old pickle format"):
        trainer.train(resume=True)
    (folder / "step_00000003.safetensors").write_bytes(pickle.dumps({"step": _Payload(marker)}, protocol=2))
    with pytest.raises(ValueError, match="step_00000003.safetensors is in the old pickle format"):
        trainer.train(resume=True)
    (folder / "step_00000004.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="step_00000004.safetensors cannot be read"):
        trainer.train(resume=True)
    assert not marker.exists()
    assert trainer.step == 0


def test_expert_mlp_runs_in_the_autocast_dtype(device):
    torch.manual_seed(0)
    x = torch.randn(5, 16, device=device)
    w_gate_up = (torch.randn(2, 24, 16, device=device) * 0.2).requires_grad_()
    w_down = (torch.randn(2, 16, 12, device=device) * 0.2).requires_grad_()
    coeff = torch.rand(5, 1, 2, device=device)
    from jakiro import ops
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = ops.expert_mlp(x, w_gate_up, w_down, coeff)
    assert out.dtype == torch.bfloat16
    expected = ops.expert_mlp(x.bfloat16(), w_gate_up.bfloat16(), w_down.bfloat16(), coeff)
    torch.testing.assert_close(out, expected)
    out.float().sum().backward()
    assert w_gate_up.grad.dtype == torch.float32 and w_gate_up.grad.abs().sum() > 0
    assert w_down.grad.abs().sum() > 0


def test_bf16_autocast_training_keeps_float32_weights_and_learns(target, data_dir, tmp_path, device):
    if device.type == "cuda":
        target = make_tiny_target("llama", hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab=64,
                                  seed=5, residual_scale=0.3).to(device)
    draft = _draft(target)
    config = TrainConfig(steps=60, batch_size=4, lr=1e-2, warmup_steps=5, noise=0.05, bf16=True)
    Trainer(draft, FeatureDataset(str(data_dir)), str(tmp_path), config, progress=False).train()
    assert all(p.dtype == torch.float32 for p in draft.parameters())
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert log[-1]["loss_feature_mixture"] < 0.7 * log[0]["loss_feature_mixture"]


def test_dataset_of_several_folders(target, data_dir, tmp_path):
    from jakiro.testing import make_feature_shards
    from jakiro.train.data import token_counts
    make_feature_shards(target, tmp_path / "more", conversations=3, length=9, per_shard=5, seed=2,
                        feature_layers=[1])
    both = FeatureDataset([str(data_dir), str(tmp_path / "more")])
    first, second = FeatureDataset(str(data_dir)), FeatureDataset(str(tmp_path / "more"))
    assert len(both) == 15 and both[12]["index"] == 12
    assert torch.equal(both[13]["input_ids"], second[1]["input_ids"])
    assert torch.equal(both[4]["hidden_states"], first[4]["hidden_states"])
    counts = token_counts([str(data_dir), str(tmp_path / "more")], 64)
    assert torch.equal(counts, token_counts(str(data_dir), 64) + token_counts(str(tmp_path / "more"), 64))
    wide = make_tiny_target("llama", hidden=48, heads=2, kv_heads=1, head_dim=24, intermediate=64, vocab=64, seed=5)
    make_feature_shards(wide, tmp_path / "wide", conversations=2, length=9, per_shard=5, seed=3, feature_layers=[1])
    with pytest.raises(ValueError, match="features of size 48"):
        FeatureDataset([str(data_dir), str(tmp_path / "wide")])


def test_most_frequent_tokens_breaks_ties_by_id():
    from jakiro.draft import most_frequent_tokens
    counts = torch.tensor([3, 5, 0, 5, 3, 9])
    assert most_frequent_tokens(counts, 3).tolist() == [1, 3, 5]
    assert most_frequent_tokens(counts, 4).tolist() == [0, 1, 3, 5]
    assert most_frequent_tokens(counts, 10).tolist() == [0, 1, 2, 3, 4, 5]


def test_loss_vocab_trains_over_the_most_frequent_tokens(target, data_dir, tmp_path):
    from jakiro.draft import most_frequent_tokens
    from jakiro.train.data import token_counts
    from jakiro.train.loss import jakiro_loss
    dataset = FeatureDataset(str(data_dir))
    config = TrainConfig(steps=150, batch_size=4, lr=1e-2, warmup_steps=10, noise=0.05, loss_vocab=24)
    draft = _draft(target)
    trainer = Trainer(draft, dataset, str(tmp_path), config, progress=False)
    rows = most_frequent_tokens(token_counts(str(data_dir), 64), 24)
    assert trainer.loss_head.weight.shape == (24, 32) and not trainer.loss_head.weight.requires_grad
    torch.testing.assert_close(trainer.loss_head.weight, draft.lm_head.weight[rows], rtol=0, atol=0)
    # The loss is the Jakiro loss through that head: the CE softmaxes renormalised over 24 tokens.
    trainer.sampler.set_epoch(0)
    batch = trainer._batch(list(trainer.sampler)[:4], 0)
    positions = torch.arange(batch["input_ids"].shape[1] - 1).expand(4, -1)
    with torch.no_grad():
        out = draft(batch["hidden_states"][:, :-1], batch["input_ids"][:, 1:], positions, return_contrastive=True)
        last = batch["clean_states"][..., -32:]       # the losses' targets: the last layer's features
        full = jakiro_loss(out.mixture, out.contrastive, last, batch["loss_mask"], draft.lm_head)
        expected = jakiro_loss(out.mixture, out.contrastive, last, batch["loss_mask"], trainer.loss_head)
    metrics = trainer.train_step(batch)
    assert metrics["loss"] == pytest.approx(expected.metrics["loss"], rel=1e-5)
    # The random target's p* is near uniform: its CE is about log 24 over 24 tokens, log 64 over all.
    assert metrics["loss_ce_mixture"] < full.metrics["loss_ce_mixture"] - 0.5
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert sum(r["top1_mixture"] for r in log[-10:]) > sum(r["top1_mixture"] for r in log[1:11]) + 3.0
    whole = _draft(target)
    assert Trainer(whole, dataset, str(tmp_path / "all"), TrainConfig(loss_vocab=64),
                   progress=False).loss_head is whole.lm_head
    with pytest.raises(ValueError, match="loss_vocab must be >= 1"):
        Trainer(_draft(target), dataset, str(tmp_path / "none"), TrainConfig(loss_vocab=0), progress=False)


def test_training_time_test_trains_the_later_passes(target, data_dir, tmp_path):
    from jakiro.train.trainer import ROUND_DECAY
    config = TrainConfig(steps=150, batch_size=4, lr=1e-2, warmup_steps=10, noise=0.05, rounds=2, k_step_every=150)
    Trainer(_draft(target), FeatureDataset(str(data_dir)), str(tmp_path), config, progress=False).train()
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    first, last = log[0], log[-1]
    # The loss minimised is pass 0's plus the decayed pass 1's.
    assert "loss_feature_mixture" in first and "top1_mixture_pass1" in first
    assert first["loss"] == pytest.approx(first["loss_feature_mixture"] + first["loss_pass1"] * ROUND_DECAY
                                          + 0.1 * first["loss_ce_mixture"] + 0.5 * (
                                              first["loss_feature_contrastive"] + 0.1 * first["loss_ce_contrastive"]),
                                          rel=1e-5)
    assert sum(r["top1_mixture_pass1"] for r in log[-10:]) > sum(r["top1_mixture_pass1"] for r in log[:10]) + 3.0
    assert 0.0 <= last["acc_3step"] <= 1.0 and last["acc_2step"] > 0.3
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        Trainer(_draft(target), FeatureDataset(str(data_dir)), str(tmp_path / "x"), TrainConfig(rounds=0),
                progress=False)

"""EAGLE-3 multi-layer features end to end: the target returns the chosen layers from the same
pass, datagen stores them, the draft fuses them, training reads them, decoding stays lossless,
and single-feature drafts and data keep working."""
import json
import os

import pytest
import torch

import jakiro
from jakiro.draft import DraftConfig, JakiroDraft, default_feature_layers
from jakiro.target import TargetModel
from jakiro.testing import (assert_two_token_sampling_exact, hf_greedy_continuation, make_feature_shards,
                            make_prompts, make_tiny_target)
from jakiro.train.data import FeatureDataset
from jakiro.train.trainer import TrainConfig, Trainer


def _multi_layer_draft(target, seed: int, eagle2: bool = False, **overrides) -> JakiroDraft:
    """A fresh multi-layer draft whose fusion is random (not the identity it starts as), so the
    lower layers really change what it drafts."""
    torch.manual_seed(seed)
    draft = JakiroDraft.from_target(target, eagle2=eagle2, **overrides)
    assert draft.fuse is not None
    with torch.no_grad():
        draft.fuse.weight.normal_(0.0, 0.1)
    return draft


@pytest.mark.parametrize("layers,expected", [(30, [3, 16, 28]), (24, [3, 13, 22]), (18, [3, 10, 16]),
                                             (4, [2, 3]), (2, [1]), (1, None)])
def test_default_feature_layers_are_eagle3s_choice(layers, expected):
    assert default_feature_layers(layers) == expected


def test_new_drafts_fuse_layers_and_start_as_the_last_layer_alone():
    target = make_tiny_target("llama", layers=4)
    draft = JakiroDraft.from_target(target)
    assert draft.config.feature_layers == [2, 3] and draft.config.feature_size == 3 * 64
    hidden = torch.randn(1, 5, 3 * 64)
    # Identity on f_t at initialisation: the same output as feeding the last layer's feature alone.
    ids, pos = torch.randint(0, 256, (1, 5)), torch.arange(5)[None]
    with torch.no_grad():
        assert torch.allclose(draft(hidden, ids, pos).mixture, draft(hidden[..., -64:], ids, pos).mixture, atol=1e-6)
    single = JakiroDraft.from_target(target, feature_layers=None)
    assert single.fuse is None and single.config.feature_size == 64


def test_target_returns_its_layers_from_the_same_pass():
    target = make_tiny_target("qwen3", layers=4, seed=2)
    adapter = TargetModel(target)
    ids = torch.randint(0, 256, (2, 7))
    positions = torch.arange(7).expand(2, -1)
    cache = adapter.new_cache(2, 16)
    logits, features = adapter.forward(ids, positions, cache, cache.step(7), feature_layers=[1, 3])
    with torch.no_grad():
        out = target(ids, output_hidden_states=True)
    assert features.shape == (2, 7, 3 * 64)
    expected = torch.cat((out.hidden_states[1], out.hidden_states[3], out.hidden_states[-1]), dim=-1)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    cache = adapter.new_cache(2, 16)
    _, last = adapter.forward(ids, positions, cache, cache.step(7))
    torch.testing.assert_close(last, features[..., -64:])


@pytest.mark.parametrize("family,eagle2", [("llama", False), ("gemma3", False), ("qwen2", True)])
def test_greedy_is_lossless_with_a_multi_layer_draft(family, eagle2):
    target = make_tiny_target(family, layers=4, seed=5)
    draft = _multi_layer_draft(target, 6, eagle2=eagle2)
    gen = jakiro.SpeculativeGenerator(target, draft, depth=3, top_k=3, total_tokens=10)
    ids, mask, rows = make_prompts(3, 256, 2, 9, torch.Generator().manual_seed(7))
    result = gen.generate(ids, mask, max_new_tokens=12)
    for b, row in enumerate(rows):
        assert result.sequences[b, ids.shape[1]:].tolist() == hf_greedy_continuation(target, row, 12).tolist()


def test_sampling_is_exact_with_a_multi_layer_draft():
    target = make_tiny_target("llama", vocab=12, layers=4, seed=80)
    with torch.no_grad():
        target.lm_head.weight.mul_(4.0)
    draft = _multi_layer_draft(target, 81)
    gen = jakiro.SpeculativeGenerator(target, draft, depth=2, top_k=3, total_tokens=8)
    assert_two_token_sampling_exact(gen, target, torch.tensor([[3, 7, 1]]), 1.0, 1.0, seed=84)


def test_a_single_feature_draft_saved_before_feature_layers_loads_and_decodes(tmp_path):
    target = make_tiny_target("llama", layers=4, seed=9)
    torch.manual_seed(10)
    JakiroDraft.from_target(target, feature_layers=None).save_pretrained(tmp_path)
    # An older config.json: no feature_layers key, and the rope_theta it used to carry.
    path = tmp_path / "config.json"
    values = json.loads(path.read_text())
    del values["feature_layers"]
    values["rope_theta"] = 10000.0
    path.write_text(json.dumps(values))
    draft = JakiroDraft.from_pretrained(tmp_path, target)
    assert draft.config.feature_layers is None and draft.fuse is None
    gen = jakiro.SpeculativeGenerator(target, draft, depth=2, top_k=3, total_tokens=6)
    prompt = torch.tensor([[5, 9, 2, 7]])
    result = gen.generate(prompt, max_new_tokens=10)
    assert result.sequences[0, 4:].tolist() == hf_greedy_continuation(target, prompt, 10).tolist()


def test_multi_layer_draft_round_trips_through_save_and_load(tmp_path):
    target = make_tiny_target("llama", layers=4, seed=11)
    draft = _multi_layer_draft(target, 12)
    draft.save_pretrained(tmp_path)
    loaded = JakiroDraft.from_pretrained(tmp_path, target)
    assert loaded.config.feature_layers == [2, 3]
    torch.testing.assert_close(loaded.fuse.weight, draft.fuse.weight)


def test_bad_feature_inputs_are_rejected():
    target = make_tiny_target("llama", layers=4)
    draft = JakiroDraft.from_target(target)
    ids, pos = torch.zeros(1, 3, dtype=torch.int64), torch.arange(3)[None]
    with pytest.raises(ValueError, match=r"192 \(target features\) or 64"):
        draft(torch.zeros(1, 3, 128), ids, pos)
    with pytest.raises(ValueError, match="feature_layers"):
        DraftConfig.from_target(target.config, feature_layers=[3, 2])
    with pytest.raises(ValueError, match="feature_layers"):
        DraftConfig.from_target(target.config, feature_layers=[])
    with pytest.raises(ValueError, match="reach past"):
        JakiroDraft.from_target(target, feature_layers=[1, 4])


def test_rollout_reads_fused_features_then_its_own_predictions():
    target = make_tiny_target("llama", layers=4, seed=13)
    draft = _multi_layer_draft(target, 14)
    hidden = torch.randn(2, 6, 192)
    outs = draft.rollout(hidden, torch.randint(0, 256, (2, 6)), torch.arange(6).expand(2, -1), 3)
    assert [o.mixture.shape for o in outs] == [(2, 6, 64)] * 3
    outs[2].mixture.sum().backward()
    assert draft.fuse.weight.grad is not None and draft.fuse.weight.grad[:, :128].abs().sum() > 0


def test_training_reads_multi_layer_data_and_single_feature_drafts_take_its_last_layer(tmp_path):
    target = make_tiny_target("llama", layers=4, seed=15)
    make_feature_shards(target, tmp_path / "data", conversations=8, length=12, feature_layers=[2, 3])
    dataset = FeatureDataset(str(tmp_path / "data"))
    assert dataset.feature_layers == [2, 3] and dataset.feature_size == 192
    assert dataset[0]["hidden_states"].shape[-1] == 192
    config = TrainConfig(lr=1e-3, steps=3, batch_size=2, warmup_steps=1, k_step=2, k_step_every=1,
                         checkpoint_every=10, rounds=2)
    multi = JakiroDraft.from_target(target, feature_layers=[2, 3])
    before = multi.fuse.weight.detach().clone()
    metrics = Trainer(multi, dataset, str(tmp_path / "multi"), config, progress=False).train()
    assert torch.isfinite(torch.tensor(metrics["loss"])) and "acc_2step" in metrics
    assert not torch.equal(before, multi.fuse.weight.detach())
    single = JakiroDraft.from_target(target, eagle2=True, feature_layers=None)
    metrics = Trainer(single, dataset, str(tmp_path / "single"), config, progress=False).train()
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    with pytest.raises(ValueError, match="datagen --feature-layers 1,3"):
        Trainer(JakiroDraft.from_target(target, feature_layers=[1, 3]), dataset, str(tmp_path / "x"), config)


def test_folders_of_different_layers_do_not_mix(tmp_path):
    target = make_tiny_target("llama", layers=4, seed=16)
    make_feature_shards(target, tmp_path / "a", conversations=4, length=10, feature_layers=[2, 3])
    make_feature_shards(target, tmp_path / "b", conversations=4, length=10)
    with pytest.raises(ValueError, match="layers"):
        FeatureDataset([str(tmp_path / "a"), str(tmp_path / "b")])
    # An index that lies about the width is caught when the shard opens.
    index = json.loads((tmp_path / "b" / "index.json").read_text())
    index["feature_layers"] = [1]
    (tmp_path / "b" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="width 64"):
        FeatureDataset(str(tmp_path / "b"))
    assert os.path.isfile(tmp_path / "b" / "index.json")


def test_held_out_scores_keep_the_best_draft_and_stop_early(tmp_path):
    target = make_tiny_target("llama", layers=4, seed=17)
    make_feature_shards(target, tmp_path / "data", conversations=12, length=12, feature_layers=[2, 3])
    dataset = FeatureDataset(str(tmp_path / "data"))
    # A learning rate that wrecks the draft after its first scores: the best one must survive.
    config = TrainConfig(lr=0.5, steps=40, batch_size=2, warmup_steps=1, k_step=0, checkpoint_every=2,
                         held_out=4, eval_every=1, patience=2, noise=0.0)
    draft = JakiroDraft.from_target(target)
    trainer = Trainer(draft, dataset, str(tmp_path / "run"), config, progress=False)
    held = set(trainer.held_out.indices)
    assert len(held) == 4 and not held & set(trainer.train_set.indices)
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    scores = [r["heldout_top1"] for r in log]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert trainer.best["top1"] == scores[best] and trainer.best["step"] == log[best]["step"]
    assert trainer.step < 40 and trainer.step == log[best]["step"] + 2        # patience 2, then stopped
    final = JakiroDraft.from_pretrained(tmp_path / "run" / "draft", target)
    scorer = Trainer(final, dataset, str(tmp_path / "score"), config, progress=False)
    assert scorer.held_out_top1() == pytest.approx(scores[best])
    # Resuming a stopped run does not train further.
    again = Trainer(JakiroDraft.from_target(target), dataset, str(tmp_path / "run"), config, progress=False)
    again.train(resume=True)
    assert again.step == trainer.step

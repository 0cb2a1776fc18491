"""The Jakiro loss against a value computed by hand, element by element."""
import math

import pytest
import torch

from jakiro.train.loss import LossWeights, TargetDistribution, jakiro_loss


def _smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _branch_by_hand(pred, target, mask, weight):
    """sum_t m_t * (mean_h SmoothL1, CE(p*, softmax(W pred))) / sum_t m_t, with python floats."""
    total_v = total_ce = count = 0.0
    for p, f, m in zip(pred, target, mask):
        if not m:
            continue
        count += 1
        total_v += sum(_smooth_l1(a, b) for a, b in zip(p, f)) / len(p)
        logit_p = [sum(w * x for w, x in zip(row, p)) for row in weight]
        logit_f = [sum(w * x for w, x in zip(row, f)) for row in weight]
        z_p = math.log(sum(math.exp(v) for v in logit_p))
        z_f = sum(math.exp(v) for v in logit_f)
        total_ce -= sum(math.exp(lf) / z_f * (lp - z_p) for lf, lp in zip(logit_f, logit_p))
    return total_v / count, total_ce / count


def _tiny_case():
    features = [[0.5, -1.0], [2.0, 0.3], [-0.7, 1.5], [0.1, 0.2], [1.2, -2.5]]   # f_0..f_4, H=2
    mixture = [[0.4, -0.8], [3.5, 0.0], [0.2, 0.2], [1.0, -1.0]]                # positions 0..3
    contrastive = [[-0.5, 1.0], [0.0, 0.4], [1.0, -3.0], [9.0, 9.0]]             # last one unused
    mask = [0, 1, 1, 0, 1]                                                        # f_3 is not trained on
    weight = [[1.0, 0.5], [-0.3, 2.0], [0.7, -1.1]]                              # V=3
    return features, mixture, contrastive, mask, weight


def test_jakiro_loss_equals_hand_computed_value():
    features, mixture, contrastive, mask, weight = _tiny_case()
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight))
    out = jakiro_loss(torch.tensor([mixture]), torch.tensor([contrastive]), torch.tensor([features]),
                      torch.tensor([mask]), head)
    # Mixture position t vs f_{t+1} with mask m_{t+1}; contrastive position t vs f_{t+2} with m_{t+2}.
    v_mix, ce_mix = _branch_by_hand(mixture, features[1:], mask[1:], weight)
    v_con, ce_con = _branch_by_hand(contrastive[:3], features[2:], mask[2:], weight)
    expected = (v_mix + 0.5 * v_con) + 0.1 * (ce_mix + 0.5 * ce_con)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["loss_feature_mixture"] == pytest.approx(v_mix, rel=1e-6)
    assert out.metrics["loss_ce_contrastive"] == pytest.approx(ce_con, rel=1e-6)
    # The unused last contrastive position and the masked f_3 change nothing.
    contrastive[3] = [-50.0, 50.0]
    mixture[2] = [70.0, -70.0]
    again = jakiro_loss(torch.tensor([mixture]), torch.tensor([contrastive]), torch.tensor([features]),
                        torch.tensor([mask]), head)
    assert again.loss.item() == pytest.approx(expected, rel=1e-6)


def test_eagle_loss_is_the_mixture_branch_only():
    features, mixture, _, mask, weight = _tiny_case()
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight))
    out = jakiro_loss(torch.tensor([mixture]), None, torch.tensor([features]), torch.tensor([mask]), head,
                      LossWeights())
    v_mix, ce_mix = _branch_by_hand(mixture, features[1:], mask[1:], weight)
    assert out.loss.item() == pytest.approx(v_mix + 0.1 * ce_mix, rel=1e-6)
    assert "loss_feature_contrastive" not in out.metrics


def test_loss_gradients_flow_and_top1_is_measured():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 16, bias=False)
    features = torch.randn(2, 6, 8)
    mixture = features[:, 1:].clone().requires_grad_()   # perfect prediction: top-1 = 1
    contrastive = torch.randn(2, 5, 8, requires_grad=True)
    out = jakiro_loss(mixture, contrastive, features, torch.ones(2, 6), head)
    out.loss.backward()
    assert out.metrics["top1_mixture"] == 1.0 and out.metrics["top3_mixture"] == 1.0
    assert out.metrics["top1_contrastive"] < 1.0
    assert contrastive.grad.abs().sum() > 0 and contrastive.grad[:, -1].abs().sum() == 0


def test_target_distribution_is_each_trained_positions_softmax_and_is_shared_by_passes():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 16, bias=False)
    features = torch.randn(2, 7, 8)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 1, 1]], dtype=torch.float32)
    dist = TargetDistribution.of(features, mask, head)
    expected_rows = torch.tensor([[-1, 0, -1, 1, 2, -1, -1], [-1, 3, 4, 5, -1, 6, 7]])   # f_0 never predicted
    assert torch.equal(dist.row, expected_rows)
    for b, s in (mask[:, 1:] > 0).nonzero().tolist():
        want = torch.softmax(head(features[b, s + 1]), dim=-1)
        assert torch.allclose(dist.probs[dist.row[b, s + 1]], want, atol=1e-6)
        assert dist.token[dist.row[b, s + 1]] == want.argmax()
    # Two passes over the batch with one shared distribution: the same losses as computing it per call.
    for _ in range(2):
        mixture, contrastive = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
        shared = jakiro_loss(mixture, contrastive, features, mask, head, distribution=dist)
        alone = jakiro_loss(mixture, contrastive, features, mask, head)
        assert shared.metrics == alone.metrics


def test_loss_rejects_bad_shapes():
    head = torch.nn.Linear(4, 5)
    with pytest.raises(ValueError, match="jakiro_loss: mixture"):
        jakiro_loss(torch.zeros(1, 4, 4), None, torch.zeros(1, 4, 4), torch.ones(1, 4), head)
    with pytest.raises(ValueError, match="jakiro_loss: loss_mask"):
        jakiro_loss(torch.zeros(1, 3, 4), None, torch.zeros(1, 4, 4), torch.ones(1, 3), head)

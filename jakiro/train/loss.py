"""The Jakiro training loss (the Jakiro paper's training objective).

A training sequence of S tokens gives the draft S-1 positions: position ``t`` reads
``(f_t, x_{t+1})`` and its mixture feature is compared with ``f_{t+1}``, its contrastive
feature with ``f_{t+2}`` (one step further ahead, so the contrastive branch has one
position less). Each comparison is a feature regression (SmoothL1, mean over H) plus a
cross-entropy against the target's own next-token distribution ``p* = softmax(head(f))``
through the frozen LM head (softmaxes in float32; the head's matmul in bfloat16 when
training in bfloat16):

    L = v_w * (v_mix + c * v_con) + p_w * (ce_mix + c * ce_con),   v_w=1, p_w=0.1, c=0.5

The EAGLE-2 configuration (no contrastive head) uses ``v_w * v_mix + p_w * ce_mix``.
Every term is averaged over the positions whose *predicted* feature belongs to an
assistant token (``loss_mask`` of the token the compared feature sits on).

Both branches, and every training-time-test pass, compare with the same target features, so
the target's distributions (:class:`TargetDistribution`: a head matmul and a softmax per
position) are computed once per batch and shared; recomputing them for each of a Jakiro step's
four comparisons cost 7% of the step on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class LossWeights:
    feature: float = 1.0        # v_w
    probability: float = 0.1    # p_w
    contrastive: float = 0.5    # c


@dataclass
class LossOutput:
    loss: torch.Tensor          # the scalar to minimise
    metrics: dict               # per-branch losses and accuracies, and the loss (python floats)


def _head_logits(head: torch.nn.Module, features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 logits of the head's matmul run in ``dtype``."""
    bias = None if getattr(head, "bias", None) is None else head.bias.to(dtype)
    return F.linear(features.to(dtype), head.weight.to(dtype), bias).float()


@dataclass
class TargetDistribution:
    """The target's next-token distribution ``softmax(head(f_s))`` at every trained position
    ``s >= 1`` of a batch (``loss_mask[b, s] > 0``), and its argmax."""
    probs: torch.Tensor         # [N, V] float32, one row per trained position
    token: torch.Tensor         # [N] int64
    row: torch.Tensor           # [B, S] int64: the row of position (b, s), -1 where not trained

    @classmethod
    @torch.no_grad()
    def of(cls, features: torch.Tensor, loss_mask: torch.Tensor, head: torch.nn.Module,
           head_dtype: torch.dtype = torch.float32) -> "TargetDistribution":
        trained = loss_mask > 0
        trained[:, 0] = False                   # f_0 is read, never predicted
        # One host sync on CUDA (the count sizes the rows); boolean-mask indexing syncs at every use.
        index = trained.flatten().nonzero().squeeze(1)
        row = torch.full((trained.numel(),), -1, dtype=torch.int64, device=features.device)
        row = row.scatter(0, index, torch.arange(index.numel(), device=features.device)).view(trained.shape)
        logits = _head_logits(head, features.flatten(0, 1).index_select(0, index), head_dtype)
        return cls(torch.softmax(logits, dim=-1), logits.argmax(-1), row)


def branch_terms(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, head: torch.nn.Module,
                 target_rows: torch.Tensor, distribution: TargetDistribution,
                 head_dtype: torch.dtype = torch.float32):
    """Feature loss, CE loss, top-1 and top-3 accuracy of one branch.

    ``pred`` and ``target`` are ``[B, T, H]``, ``mask`` is ``[B, T]`` (0/1), ``target_rows``
    ``[B, T]`` the rows of ``distribution`` for the target features. Returns
    ``(smooth_l1, cross_entropy, top1, top3)``; the last two are detached fractions. The head's
    matmuls run in ``head_dtype`` (bfloat16 halves the cost of the step's dominant work).
    """
    mask = mask.float()
    count = mask.sum().clamp_min(1.0)   # an all-masked batch contributes zero, not NaN
    regression = F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1)
    feature_loss = (regression * mask).sum() / count
    # The LM head (V x H per position) dominates the cost: run it on the trained positions only.
    # Integer indices: one host sync on CUDA, where a boolean mask would sync once per use and
    # again in the backward (index_select's backward is an index_add, which never syncs).
    keep = (mask.flatten() > 0).nonzero().squeeze(1)
    pred, rows = pred.flatten(0, -2).index_select(0, keep), target_rows.flatten().index_select(0, keep)
    target_probs, target_token = distribution.probs[rows], distribution.token[rows]
    logits = _head_logits(head, pred, head_dtype)
    ce_loss = -(target_probs * torch.log_softmax(logits, dim=-1)).sum() / count
    with torch.no_grad():
        top3 = logits.topk(min(3, logits.shape[-1]), dim=-1).indices
        top1 = (top3[:, 0] == target_token).float().sum() / count
        top3_acc = (top3 == target_token.unsqueeze(-1)).any(-1).float().sum() / count
    return feature_loss, ce_loss, top1, top3_acc


def jakiro_loss(mixture: torch.Tensor, contrastive: torch.Tensor | None, features: torch.Tensor,
                loss_mask: torch.Tensor, head: torch.nn.Module,
                weights: LossWeights = LossWeights(), head_dtype: torch.dtype = torch.float32,
                distribution: TargetDistribution | None = None) -> LossOutput:
    """The Jakiro loss (or the EAGLE loss when ``contrastive`` is None).

    Args:
        mixture: ``[B, S-1, H]`` the draft's mixture features at positions ``0..S-2``.
        contrastive: ``[B, S-1, H]`` its contrastive features, or None (EAGLE-2 draft).
        features: ``[B, S, H]`` the target's features ``f_0..f_{S-1}``.
        loss_mask: ``[B, S]`` 1 on the tokens whose features are trained on (assistant tokens,
            0 on padding).
        head: the target's LM head (frozen), run in ``head_dtype``; softmaxes are float32.
        distribution: ``TargetDistribution.of(features, loss_mask, head, head_dtype)``, when the
            caller already has it (it is the same for every pass over a batch); else computed here.
    """
    batch, length, hidden = features.shape
    if mixture.shape != (batch, length - 1, hidden):
        raise ValueError(f"jakiro_loss: mixture must be [B, S-1, H] = {(batch, length - 1, hidden)}, "
                         f"got {tuple(mixture.shape)}")
    if contrastive is not None and contrastive.shape != mixture.shape:
        raise ValueError(f"jakiro_loss: contrastive must be shaped like mixture, got {tuple(contrastive.shape)}")
    if loss_mask.shape != (batch, length):
        raise ValueError(f"jakiro_loss: loss_mask must be [B, S] = {(batch, length)}, got {tuple(loss_mask.shape)}")
    if distribution is None:
        distribution = TargetDistribution.of(features, loss_mask, head, head_dtype)
    next_features, next_mask = features[:, 1:], loss_mask[:, 1:]          # f_{t+1} for position t
    next_rows = distribution.row[:, 1:]
    v_mix, ce_mix, top1_mix, top3_mix = branch_terms(mixture, next_features, next_mask, head, next_rows,
                                                     distribution, head_dtype)
    loss = weights.feature * v_mix + weights.probability * ce_mix
    metrics = {"loss_feature_mixture": v_mix, "loss_ce_mixture": ce_mix,
               "top1_mixture": top1_mix, "top3_mixture": top3_mix}
    if contrastive is not None:
        # Position t of the contrastive branch predicts f_{t+2}: drop its last position.
        v_con, ce_con, top1_con, top3_con = branch_terms(contrastive[:, :-1], next_features[:, 1:],
                                                         next_mask[:, 1:], head, next_rows[:, 1:],
                                                         distribution, head_dtype)
        loss = loss + weights.contrastive * (weights.feature * v_con + weights.probability * ce_con)
        metrics.update(loss_feature_contrastive=v_con, loss_ce_contrastive=ce_con,
                       top1_contrastive=top1_con, top3_contrastive=top3_con)
    metrics["loss"] = loss
    # One device-to-host copy for all of them (one synchronisation per step on CUDA).
    values = torch.stack([value.detach().float() for value in metrics.values()]).tolist()
    return LossOutput(loss, dict(zip(metrics, values)))

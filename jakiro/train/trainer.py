"""Draft training loop: AdamW, warm-up + cosine, feature noise, value
clipping, bf16 autocast on GPU, JSON-lines log, resumable checkpoints, torchrun DDP; and two
EAGLE-3 additions: the losses over a reduced vocabulary (``loss_vocab``) and the
training-time test (``rounds``: later passes read the draft's own predictions).

Determinism is by construction, so that a resumed run equals an uninterrupted one and K
processes equal one process with the same global batch:

* the data order of epoch ``e`` is ``DistributedSampler(seed, epoch=e)``; a global step reads
  ``batch_size`` items per rank, so rank ``r`` of K sees every K-th item of the same order;
* the noise of a conversation depends only on (seed, epoch, its index), not on the rank,
  the batch it lands in or its padding;
* a checkpoint holds the weights, the optimizer, the scheduler, the step and the RNG states.

Checkpoints are safetensors files: the tensors (weights, optimizer moments, RNG states) as
tensors and everything else (step, scheduler, optimizer settings, Python's RNG) as JSON in
the file's metadata. Nothing is unpickled, so a checkpoint cannot run code when it is read;
the pickled ``step_N.pt`` files of earlier versions are refused.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass

import torch

from jakiro.draft import head_rows, most_frequent_tokens
from jakiro.train.data import FeatureDataset, collate, token_counts
from jakiro.train.loss import LossWeights, TargetDistribution, jakiro_loss

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_SUFFIX = ".safetensors"
OLD_CHECKPOINT_SUFFIX = ".pt"     # torch.save pickles of earlier versions: refused, never unpickled
CHECKPOINT_FORMAT = 1
_METADATA_KEY = "jakiro_checkpoint"
LOG_NAME = "train_log.jsonl"
FINAL_DIR = "draft"
BEST_DIR = "best"     # with a held-out set: the draft at its best held-out score so far
ROUND_DECAY = 0.8   # weight of training-time-test pass r: ROUND_DECAY ** r (EAGLE-3's)


@dataclass
class TrainConfig:
    lr: float = 9e-5
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 1e-3
    warmup_steps: int = 2000        # clamped to a tenth of the run when the run is short
    steps: int | None = None        # total optimizer steps; None: epochs * steps per epoch
    epochs: int = 20
    batch_size: int = 4             # per process
    grad_clip_value: float = 0.5    # clip_grad_value_, as the authors do
    noise: float = 0.2              # uniform feature noise U(-noise/2, noise/2) on the inputs
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3       # the newest ones are kept, older ones deleted (0: keep all)
    k_step: int = 3                 # rounds of the k-step accuracy (0: off)
    k_step_every: int = 100         # measured on the current batch every this many steps
    max_len: int = 2048
    bf16: bool | None = None        # bf16 autocast and LM-head matmuls; None: on CUDA only
    loss_vocab: int | None = None   # LM-head losses over the data's most frequent tokens only; None: all
    rounds: int = 1                 # training-time test passes (JakiroDraft.rollout); pass r weighs 0.8^r
    held_out: int = 0               # conversations kept out of training (seeded), scored every eval_every steps
    eval_every: int = 500           # steps between held-out scores (with held_out)
    patience: int = 0               # stop after this many scores without a new best (0: never stop early)
    loss_weights: LossWeights = LossWeights()


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _split(dataset, held_out: int, seed: int):
    """``(train, held_out)`` subsets: ``held_out`` conversations drawn with ``seed`` (both sources of a
    multi-folder dataset alike), the rest for training; ``(dataset, None)`` without a held-out set."""
    if held_out <= 0:
        return dataset, None
    if held_out >= len(dataset):
        raise ValueError(f"jakiro train: --held-out {held_out} leaves nothing to train on ({len(dataset)} "
                         f"conversations)")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return (torch.utils.data.Subset(dataset, sorted(order[held_out:])),
            torch.utils.data.Subset(dataset, sorted(order[:held_out])))


class _Rollout(torch.nn.Module):
    """What a training step calls (and DDP wraps): the draft's rollout, one pass or several."""

    def __init__(self, draft):
        super().__init__()
        self.draft = draft

    def forward(self, *args, **kwargs):
        return self.draft.rollout(*args, **kwargs)


class Trainer:
    """Trains ``draft`` (a :class:`jakiro.draft.JakiroDraft` bound to its target) on ``dataset``.

    With ``config.held_out``, that many conversations are kept out of training and scored every
    ``eval_every`` steps (:meth:`held_out_top1`, logged as ``heldout_top1``); the best draft so
    far is kept in ``out_dir/best``, becomes the final draft, and ``patience`` scores without a
    new best stop the run early.

    Writes ``out_dir/train_log.jsonl``, ``out_dir/checkpoints/step_N.safetensors`` and, at the end,
    ``out_dir/draft`` (``save_pretrained``). Under torchrun (``torch.distributed`` initialised
    before construction) the draft is wrapped in DDP and only rank 0 writes files. ``progress``:
    True (a bar on a terminal, else a line every 10% or 30 s), False, or a mode of
    :func:`jakiro.progress.resolve_mode`; rank 0 alone shows it.
    """

    def __init__(self, draft, dataset: FeatureDataset, out_dir: str, config: TrainConfig = TrainConfig(),
                 progress: bool | str = True):
        self.config, self.out_dir, self.dataset, self.progress = config, out_dir, dataset, progress
        self.world, self.rank = _distributed()
        self.device = draft.fc.weight.device
        self.draft = draft.float()          # fp32 master weights; autocast handles bf16 compute
        if config.rounds < 1:
            raise ValueError(f"jakiro train: rounds must be >= 1, got {config.rounds}")
        layers = draft.config.feature_layers
        if layers and layers != getattr(dataset, "feature_layers", layers):   # a plain list of items: as given
            raise ValueError(f"jakiro train: the draft fuses the target's layers {layers} with the last, the data "
                             f"holds the features of layers {dataset.feature_layers} (null: the last layer's only); "
                             f"run `jakiro datagen --feature-layers {','.join(map(str, layers))}`, or train a draft "
                             f"of the data's layers")
        self.model = _Rollout(self.draft)
        if self.world > 1:
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.train_set, self.held_out = _split(dataset, config.held_out, config.seed)
        self.sampler = torch.utils.data.DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank,
                                                           shuffle=True, seed=config.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"jakiro train: {len(self.train_set)} conversations are fewer than one global batch "
                             f"({config.batch_size} x {self.world} processes)")
        self.total_steps = config.steps if config.steps is not None else config.epochs * self.steps_per_epoch
        warmup = max(1, min(config.warmup_steps, self.total_steps // 10))
        params = [p for p in self.draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(step, warmup, self.total_steps))
        self.bf16 = config.bf16 if config.bf16 is not None else self.device.type == "cuda"
        self.loss_head = self._loss_head()
        self.step = 0
        self.best = None        # with held_out: {"top1", "step", "stale"} of the best held-out score so far

    def _loss_head(self) -> torch.nn.Module:
        """The frozen LM head the losses run through: the target's, or with ``loss_vocab`` its rows
        of the data's most frequent tokens (EAGLE-3's reduced draft vocabulary). Both softmaxes are
        then over that vocabulary, the target's renormalised: the head, which dominates the cost of a
        step, shrinks by ``V / loss_vocab``; the draft then drafts best from the same vocabulary."""
        head = self.draft.lm_head
        vocab = head.weight.shape[0]
        if self.config.loss_vocab is None or self.config.loss_vocab >= vocab:
            return head
        if self.config.loss_vocab < 1:
            raise ValueError(f"jakiro train: loss_vocab must be >= 1, got {self.config.loss_vocab}")
        return head_rows(head, most_frequent_tokens(token_counts(self.dataset.directories, vocab),
                                                    self.config.loss_vocab))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, step: int) -> str:
        return os.path.join(self.out_dir, CHECKPOINT_DIR, f"step_{step:08d}{CHECKPOINT_SUFFIX}")

    def save_checkpoint(self):
        if self.rank != 0:
            return
        from safetensors.torch import save_file
        os.makedirs(os.path.join(self.out_dir, CHECKPOINT_DIR), exist_ok=True)
        tensors = {f"draft/{name}": t for name, t in self.draft.state_dict().items()}
        optimizer = self.optimizer.state_dict()
        values = {}   # the optimizer state's non-tensor entries (none for AdamW)
        for index, entries in optimizer["state"].items():
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{index}/{name}"] = value
                else:
                    values.setdefault(str(index), {})[name] = value
        tensors["rng/torch"] = torch.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        for i, state in enumerate(cuda_states):
            tensors[f"rng/cuda/{i}"] = state
        meta = {"format": CHECKPOINT_FORMAT, "step": self.step, "config": asdict(self.config), "best": self.best,
                "scheduler": self.scheduler.state_dict(),
                "optimizer": {"param_groups": optimizer["param_groups"], "values": values},
                "rng": {"python": random.getstate(), "cuda": len(cuda_states)}}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        path = self.checkpoint_path(self.step)
        save_file(tensors, path + ".tmp", metadata={_METADATA_KEY: json.dumps(meta)})
        os.replace(path + ".tmp", path)
        if self.config.keep_checkpoints > 0:
            ours = [p for p in self._checkpoints() if p.endswith(CHECKPOINT_SUFFIX)]
            for old in ours[:-self.config.keep_checkpoints]:
                os.remove(old)

    def _checkpoints(self) -> list[str]:
        """Checkpoint files in step order, old pickled ones included (so that resuming names them)."""
        folder = os.path.join(self.out_dir, CHECKPOINT_DIR)
        if not os.path.isdir(folder):
            return []
        suffixes = (CHECKPOINT_SUFFIX, OLD_CHECKPOINT_SUFFIX)
        names = [n for n in os.listdir(folder) if n.startswith("step_") and n.endswith(suffixes)]
        # At the same step the current format sorts last, i.e. wins.
        names.sort(key=lambda n: (n.rsplit(".", 1)[0], n.endswith(CHECKPOINT_SUFFIX)))
        return [os.path.join(folder, n) for n in names]

    def latest_checkpoint(self) -> str | None:
        paths = self._checkpoints()
        return paths[-1] if paths else None

    def load_checkpoint(self, path: str):
        """Restores a checkpoint written by :meth:`save_checkpoint`. Only safetensors is parsed:
        a pickle (an old ``.pt`` checkpoint, or any file that is not safetensors) is refused
        without being unpickled, so loading never runs code from the file."""
        from safetensors import SafetensorError, safe_open
        try:
            with open(path, "rb") as f:
                start = f.read(9)
        except OSError as error:
            raise ValueError(f"jakiro train: checkpoint {path} cannot be read: {error}") from None
        # safetensors: an 8-byte header length, then the JSON header. torch.save: a zip archive
        # (PK..) or, in its older format, a bare pickle (0x80).
        pickled = start[8:9] != b"{" and start.startswith((b"PK\x03\x04", b"\x80"))
        if path.endswith(OLD_CHECKPOINT_SUFFIX) or pickled:
            raise ValueError(f"jakiro train: checkpoint {path} is in the old pickle format (torch.save), which "
                             "is no longer loaded: unpickling can run arbitrary code. Checkpoints are now "
                             f"step_N{CHECKPOINT_SUFFIX}; restart the run without --resume, or move the old "
                             "checkpoints away")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = json.loads((f.metadata() or {})[_METADATA_KEY])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"unknown checkpoint format {meta.get('format')!r}")
            draft = {name[len("draft/"):]: t for name, t in tensors.items() if name.startswith("draft/")}
            state = {int(index): dict(entries) for index, entries in meta["optimizer"]["values"].items()}
            for name, t in tensors.items():
                if name.startswith("optimizer/"):
                    _, index, key = name.split("/", 2)
                    state.setdefault(int(index), {})[key] = t
            # JSON has no tuples; AdamW's betas were one.
            groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
                      for group in meta["optimizer"]["param_groups"]]
            python_rng = meta["rng"]["python"]
            python_rng = (python_rng[0], tuple(python_rng[1]), python_rng[2])
            cuda_rng = [tensors[f"rng/cuda/{i}"] for i in range(meta["rng"]["cuda"])]
            torch_rng, step, scheduler = tensors["rng/torch"], int(meta["step"]), meta["scheduler"]
            best = meta.get("best")
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, IndexError) as error:
            raise ValueError(f"jakiro train: checkpoint {path} cannot be read (not a jakiro safetensors "
                             f"checkpoint): {error}") from None
        self.draft.load_state_dict(draft)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.scheduler.load_state_dict(scheduler)
        self.step, self.best = step, best
        torch.set_rng_state(torch_rng)
        random.setstate(python_rng)
        if cuda_rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_rng)

    # ------------------------------------------------------------------ training
    def _noise(self, epoch: int, index: int, length: int, width: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.config.seed * 1_000_003 + epoch) * 10_000_019 + index)
        return (torch.rand(length, width, generator=generator) - 0.5) * self.config.noise

    def _items(self, subset, indices) -> list[dict]:
        """Conversations of ``subset`` with the feature columns the draft reads: every stored layer
        for a multi-layer draft, the last layer's for a one-feature draft."""
        width = self.draft.config.feature_size
        items = [subset[i] for i in indices]
        for item in items:
            item["hidden_states"] = item["hidden_states"][:, -width:]
        return items

    def _batch(self, indices: list[int], epoch: int) -> dict:
        items = self._items(self.train_set, indices)
        width = self.draft.config.feature_size
        batch = collate(items)
        if self.config.noise > 0:
            for row, item in enumerate(items):
                n = item["input_ids"].numel()
                batch["hidden_states"][row, :n] += self._noise(epoch, item["index"], n, width)
            batch["clean_states"] = collate(items)["hidden_states"]
        else:
            batch["clean_states"] = batch["hidden_states"]
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_step(self, batch: dict) -> dict:
        ids, noisy, clean, mask = batch["input_ids"], batch["hidden_states"], batch["clean_states"], batch["loss_mask"]
        positions = torch.arange(ids.shape[1] - 1, device=self.device).expand(ids.shape[0], -1)
        contrastive = self.draft.config.contrastive
        clean = clean[..., -self.draft.config.hidden_size:]      # the targets: the last layer's features
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            passes = self.model(noisy[:, :-1], ids[:, 1:], positions, self.config.rounds,
                                return_contrastive=contrastive)
        # Targets are the clean features: the noise only perturbs what the draft reads.
        head_dtype = torch.bfloat16 if self.bf16 else torch.float32
        distribution = TargetDistribution.of(clean, mask, self.loss_head, head_dtype)   # shared by all passes
        loss, metrics, total = 0.0, {}, 0.0
        for r, out in enumerate(passes):
            result = jakiro_loss(out.mixture, out.contrastive, clean, mask, self.loss_head, self.config.loss_weights,
                                 head_dtype=head_dtype, distribution=distribution)
            loss = loss + ROUND_DECAY ** r * result.loss
            total += ROUND_DECAY ** r * result.metrics["loss"]
            metrics.update(result.metrics if r == 0 else
                           {f"{name}_pass{r}": result.metrics[name] for name in ("loss", "top1_mixture")})
        metrics["loss"] = total     # what is minimised: pass 0's loss, plus the later passes' when rounds > 1
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(self.draft.parameters(), self.config.grad_clip_value)
        self.optimizer.step()
        self.scheduler.step()
        return metrics

    @torch.no_grad()
    def k_step_accuracy(self, batch: dict, rounds: int) -> dict:
        """Top-1 accuracy of the mixture branch drafting ``1..rounds`` levels deep, as decoding does
        (:meth:`jakiro.draft.JakiroDraft.rollout` over the clean features): level ``j`` reads the
        draft's own predictions for its last ``j-1`` positions. Accuracy is against
        ``argmax head(f_{t+1})``, both argmaxes over the loss's vocabulary.
        """
        ids, clean, mask = batch["input_ids"], batch["clean_states"], batch["loss_mask"]
        positions = torch.arange(ids.shape[1] - 1, device=self.device).expand(ids.shape[0], -1)
        head = self.loss_head
        last = clean[:, 1:, -self.draft.config.hidden_size:]
        expected = head(last.to(head.weight.dtype)).argmax(-1)
        weight = mask[:, 1:].float()
        self.draft.eval()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            passes = self.draft.rollout(clean[:, :-1], ids[:, 1:], positions, rounds)
        self.draft.train()
        result = {}
        for j, out in enumerate(passes, 1):
            hits = (head(out.mixture.float().to(head.weight.dtype)).argmax(-1) == expected).float()
            result[f"acc_{j}step"] = float((hits * weight).sum() / weight.sum().clamp_min(1.0))
        return result

    @torch.no_grad()
    def held_out_top1(self) -> float:
        """Level-1 top-1 on the held-out conversations: the draft reads the target's (clean)
        features, as the first level of a tree does, and is scored against the target's own next
        token on the answer tokens, both argmaxes over the loss's vocabulary."""
        head, size = self.loss_head, self.config.batch_size
        hits = total = 0.0
        self.draft.eval()
        for at in range(0, len(self.held_out), size):
            items = self._items(self.held_out, range(at, min(at + size, len(self.held_out))))
            batch = {k: v.to(self.device) for k, v in collate(items).items()}
            ids, features, mask = batch["input_ids"], batch["hidden_states"], batch["loss_mask"][:, 1:]
            positions = torch.arange(ids.shape[1] - 1, device=self.device).expand(ids.shape[0], -1)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.draft(features[:, :-1], ids[:, 1:], positions)
            expected = head(features[:, 1:, -self.draft.config.hidden_size:].to(head.weight.dtype)).argmax(-1)
            got = head(out.mixture.float().to(head.weight.dtype)).argmax(-1)
            hits += float(((got == expected).float() * mask).sum())
            total += float(mask.sum())
        self.draft.train()
        return hits / max(total, 1.0)

    def _score_held_out(self) -> tuple[float, bool]:
        """Scores the held-out set; a new best is saved to ``out_dir/best``. Returns the score and
        whether training should stop (``patience`` scores in a row without a new best)."""
        top1 = self.held_out_top1()
        if self.best is None or top1 > self.best["top1"]:
            self.best = {"top1": top1, "step": self.step, "stale": 0}
            if self.rank == 0:
                self.draft.save_pretrained(os.path.join(self.out_dir, BEST_DIR))
        else:
            self.best["stale"] += 1
        return top1, self.config.patience > 0 and self.best["stale"] >= self.config.patience

    def _global_metrics(self, metrics: dict) -> dict:
        if self.world == 1:
            return metrics
        names = sorted(metrics)
        values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values)
        return {n: float(v) / self.world for n, v in zip(names, values)}

    def train(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Runs to ``total_steps`` (or stops after step ``stop_after``: an interruption), writing a
        checkpoint every ``checkpoint_every`` steps and at the end; returns the last metrics.
        Under torchrun every rank returns together, after rank 0 has written its files."""
        from jakiro.progress import Progress
        if resume:
            path = self.latest_checkpoint()
            if path is None:
                raise ValueError(f"jakiro train: --resume, but {os.path.join(self.out_dir, CHECKPOINT_DIR)} "
                                 "holds no checkpoint")
            self.load_checkpoint(path)
        else:
            torch.manual_seed(self.config.seed)
            random.seed(self.config.seed)
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        if self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
        bar = Progress(total=self.total_steps, initial=self.step, desc="jakiro train", unit="step",
                       mode=self.progress if self.rank == 0 else "off")
        log = open(os.path.join(self.out_dir, LOG_NAME), "a") if self.rank == 0 else None
        metrics, size = {}, self.config.batch_size
        stopped = self.best is not None and self.config.patience > 0 and self.best["stale"] >= self.config.patience
        try:
            self.model.train()
            while self.step < end and not stopped:
                epoch, first = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch)
                order = list(self.sampler)
                for position in range(first, self.steps_per_epoch):
                    batch = self._batch(order[position * size:(position + 1) * size], epoch)
                    metrics = self.train_step(batch)
                    self.step += 1
                    if self.config.k_step and (self.step % self.config.k_step_every == 0 or self.step == end):
                        metrics.update(self.k_step_accuracy(batch, self.config.k_step))
                    metrics = self._global_metrics(metrics)
                    if self.held_out is not None and (self.step % self.config.eval_every == 0 or self.step == end):
                        metrics["heldout_top1"], stopped = self._score_held_out()
                    record = {"step": self.step, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0], **metrics}
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    bar.set_postfix({k: round(v, 3) for k, v in metrics.items()
                                     if k.startswith(("loss_feature", "top1"))})
                    bar.update(1)
                    if self.step % self.config.checkpoint_every == 0 or self.step == end or stopped:
                        self.save_checkpoint()
                    if self.step >= end or stopped:
                        break
        finally:
            bar.close()
            if log is not None:
                log.close()
        if (self.step >= self.total_steps or stopped) and self.rank == 0:
            if self.best is not None:    # the draft of the best held-out score, not the last step's
                from safetensors.torch import load_file
                self.draft.load_state_dict(load_file(os.path.join(self.out_dir, BEST_DIR, "model.safetensors")))
                print(f"jakiro train: best held-out top-1 {self.best['top1']:.4f} at step {self.best['step']}"
                      + (f" (stopped early at step {self.step})" if stopped else ""), flush=True)
            self.draft.save_pretrained(os.path.join(self.out_dir, FINAL_DIR))
        if self.world > 1:
            # A gloo rank that tears its process group down while a peer is still busy can
            # abort at exit ("terminate called without an active exception": 4 in ~150
            # two-process test runs without this barrier, 0 in 200 with it).
            torch.distributed.barrier()
        return metrics

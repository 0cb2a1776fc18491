"""``jakiro train``: a Jakiro (or EAGLE-2) draft from ``jakiro datagen``'s shards (torchrun-ready)."""
from __future__ import annotations

import json
import os

import torch

from jakiro.commands.options import TARGET_HELP, UsageError, at_least, check_device, load_target_or_exit
from jakiro.progress import PROGRESS_HELP


def add_parser(commands):
    p = commands.add_parser(
        "train", help="train a Jakiro (or EAGLE-2) draft on datagen shards",
        description="Trains a draft with the Jakiro loss (mixture branch on f_{t+1}, contrastive branch on "
                    "f_{t+2}; the EAGLE loss with --eagle2). Writes OUT/train_log.jsonl, checkpoints in "
                    "OUT/checkpoints and the final draft in OUT/draft. Runs unchanged under "
                    "`torchrun --nproc_per_node=K` (DDP; --batch-size is per process).")
    p.add_argument("--target", default="smollm2", help=f"the target whose embedding and LM head the draft uses: {TARGET_HELP}")
    p.add_argument("--data", required=True, nargs="+", metavar="FOLDER",
                   help="one or more folders written by `jakiro datagen` (trained on together)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--eagle2", action="store_true", help="train the EAGLE-2 baseline configuration")
    p.add_argument("--draft-config", action="append", default=[], metavar="KEY=VALUE",
                   help="DraftConfig override, e.g. num_experts=4 (value parsed as JSON when possible); repeatable. "
                        "A new draft fuses the layers the data holds (datagen --feature-layers); "
                        "feature_layers=null trains one on the last layer's feature alone")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4, help="conversations per process and step")
    p.add_argument("--lr", type=float, default=9e-5)
    p.add_argument("--warmup-steps", type=int, default=2000,
                   help="linear warm-up, then cosine to 0 (capped at a tenth of a short run)")
    p.add_argument("--noise", type=float, default=0.2, help="width of the uniform feature noise")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (and at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept (0: all)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16: autocast and bf16 LM-head matmuls (fp32 master weights); auto: bf16 on CUDA only")
    p.add_argument("--loss-vocab", type=int, default=None, metavar="N",
                   help="run the LM-head losses over the N most frequent tokens of the data only (EAGLE-3's "
                        "reduced draft vocabulary): the head dominates a step, so 8192 of SmolLM2's 49152 "
                        "tokens make steps ~5x faster on a CPU. Draft with the same vocabulary "
                        "(--draft-vocab N). Default: the whole vocabulary")
    p.add_argument("--rounds", type=int, default=1,
                   help="training-time test (EAGLE-3): the draft also trains on R-1 passes that read its own "
                        "predictions, as it drafts the levels of a tree (pass r weighs 0.8^r; each pass costs "
                        "about one more step). Default 1: the target's features only")
    p.add_argument("--held-out", type=int, default=0, metavar="N",
                   help="keep N conversations (a seeded draw) out of training and score the draft's level-1 "
                        "top-1 on them every --eval-every steps (logged as heldout_top1); the final draft is "
                        "the best-scoring one (kept in OUT/best meanwhile). Default 0: no held-out set")
    p.add_argument("--eval-every", type=int, default=500, help="steps between held-out scores")
    p.add_argument("--patience", type=int, default=0,
                   help="with --held-out: stop after this many scores in a row without a new best (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    p.add_argument("--init", default=None, metavar="DRAFT",
                   help="start from a saved draft's weights and configuration (a `jakiro train` output's "
                        "draft/ folder or a shipped draft) instead of a fresh draft: fine-tuning")
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if available")
    p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)


def validate(args):
    """``jakiro train``'s options, checked before any model loads (the features' hidden size is
    checked against the target once it has loaded, before the first step)."""
    import dataclasses

    from jakiro.draft import CONFIG_NAME, WEIGHTS_NAME, DraftConfig
    if args.device is not None:
        check_device(args.device)
    at_least(args, 1, "steps", "epochs", "batch_size", "checkpoint_every", "loss_vocab", "rounds")
    at_least(args, 3, "max_len")
    at_least(args, 0, "lr", "warmup_steps", "noise", "keep_checkpoints", "held_out", "patience")
    at_least(args, 1, "eval_every")
    if args.patience and not args.held_out:
        raise UsageError("--patience stops on held-out scores: give --held-out N too")
    if args.init is not None:
        if args.eagle2 or args.draft_config:
            raise UsageError("--init takes the draft's configuration from its folder; drop --eagle2 and "
                             "--draft-config")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not os.path.isfile(os.path.join(args.init, name)):
                raise UsageError(f"--init {args.init} has no {name} (expected a draft folder: `jakiro train`'s "
                                 f"OUT/draft)")
    known = {f.name for f in dataclasses.fields(DraftConfig)}
    unknown = sorted(set(_overrides(args.draft_config)) - known)
    if unknown:
        raise UsageError(f"--draft-config: unknown keys {unknown}; DraftConfig has {sorted(known)}")


def _overrides(pairs: list[str]) -> dict:
    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
                    raise UsageError(f"--draft-config expects KEY=VALUE, got {pair!r}")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    return values


def run(args, settings=None) -> int:
    import time

    from jakiro.draft import JakiroDraft
    from jakiro.progress import mode_from_args, summary_line
    from jakiro.train.data import FeatureDataset, token_counts
    from jakiro.train.trainer import TrainConfig, Trainer
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = args.device
    if distributed:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        device = f"cuda:{local}" if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dataset = FeatureDataset(args.data, max_len=args.max_len)
        target, _ = load_target_or_exit(args.target, torch.bfloat16 if device.startswith("cuda") else torch.float32, device)
        hidden = target.config.get_text_config().hidden_size
        if dataset.hidden_size is not None and dataset.hidden_size != hidden:
            raise UsageError(f"--data {' '.join(args.data)} holds features of size {dataset.hidden_size}, the "
                             f"target {args.target} has hidden size {hidden}: run `jakiro datagen` with this target")
        torch.manual_seed(args.seed)
        if args.init is not None:
            draft = JakiroDraft.from_pretrained(args.init, target)   # float32 master weights, as the target
        else:
            try:
                # A new draft reads what the data holds: multi-layer features where datagen stored them.
                overrides = {"feature_layers": dataset.feature_layers, **_overrides(args.draft_config)}
                draft = JakiroDraft.from_target(target, eagle2=args.eagle2, **overrides)
            except TypeError as error:
                raise SystemExit(f"jakiro train: bad --draft-config: {error}") from None
        config = TrainConfig(lr=args.lr, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                             warmup_steps=args.warmup_steps, noise=args.noise, seed=args.seed,
                             checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                             max_len=args.max_len, bf16=None if args.precision == "auto" else args.precision == "bf16",
                             loss_vocab=args.loss_vocab, rounds=args.rounds, held_out=args.held_out,
                             eval_every=args.eval_every, patience=args.patience)
        trainer = Trainer(draft, dataset, args.out, config, progress=mode_from_args(args))
        started = time.perf_counter()
        metrics = trainer.train(resume=args.resume)
        seconds = time.perf_counter() - started
    except ValueError as error:
        raise SystemExit(str(error)) from None
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if trainer.rank == 0:
        draft.save_token_counts(os.path.join(args.out, "draft"), token_counts(args.data, draft.config.vocab_size))
        summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        rate = "" if args.resume else f"{trainer.step / max(seconds, 1e-9):.2f} steps/s; "
        print(summary_line(f"trained {trainer.step} steps", seconds,
                           f"{rate}last: {summary}; draft saved under {args.out}/draft"), flush=True)
    return 0

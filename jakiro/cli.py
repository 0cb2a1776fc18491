"""``jakiro`` command line (``python -m jakiro.cli``).

    jakiro demo [--json]                         the default target + shipped draft on MT-bench questions
    jakiro generate --prompt TEXT [--vanilla]    one answer, streamed, with a summary line
    jakiro bench-e2e [--datasets ...]            vanilla vs EAGLE-2 vs Jakiro, tau and tokens/s
    jakiro datagen --data FILE --format sharegpt|jsonl --out DIR    training features
    jakiro train --data DIR --out DIR [--eagle2]                     a draft (torchrun-ready)

Every command defaults to the embedded SmolLM2-135M-Instruct target (``--target`` takes an
HF folder or a GGUF file) and, where a draft is needed, the Jakiro draft shipped for it.

Every command checks its arguments before it loads a model; a bad one ends the run with a
one-line message on stderr and exit status 2 (:class:`UsageError`).
"""
from __future__ import annotations

import argparse
import sys

import torch


class UsageError(SystemExit):
    """A bad command-line argument: exit status 2, as argparse's own errors; :func:`main` prints
    the message (``str()``) as one stderr line."""

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


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, like the commands' own checks: the usage is one --help away.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from jakiro.bench_e2e import add_bench_parser, add_target_arguments
    from jakiro.demo import add_demo_parser
    from jakiro.train.commands import add_datagen_parser, add_train_parser
    parser = _Parser(prog="jakiro", description="Jakiro speculative decoding",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(commands)
    gen = commands.add_parser("generate", help="generate text with a target model and a Jakiro draft")
    add_target_arguments(gen)
    gen.add_argument("--vanilla", action="store_true", help="plain decoding, no draft (the baseline)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="sampling top-k (0: off)")
    gen.add_argument("--no-chat-template", action="store_true", help="use the prompt as is")
    add_bench_parser(commands)
    add_datagen_parser(commands)
    add_train_parser(commands)
    return parser


def validate_generate_args(args):
    """``jakiro generate``'s options, checked before any model loads (the prompt's length is
    checked once the tokenizer has loaded, still before the model)."""
    from jakiro.bench_e2e import validate_target_arguments
    validate_target_arguments(args, () if args.vanilla else ("jakiro",))
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    at_least(args, 0, "top_k")


def generate_command(args) -> int:
    from transformers import TextStreamer

    from jakiro.bench_e2e import check_context, load_draft, load_setup, load_tokenizer, resolve_total_tokens
    from jakiro.evaluate import encode_prompt
    from jakiro.generate import SpeculativeGenerator, vanilla_generate

    # The tokenizer alone first: a prompt too long for the context fails in about a second.
    folder, tokenizer, config = load_tokenizer(args)
    input_ids = encode_prompt(tokenizer, args.prompt, not args.no_chat_template)
    if input_ids.shape[1] == 0:
        raise UsageError("--prompt is empty (and --no-chat-template adds nothing to it)")
    max_new = 256 if args.max_new_tokens is None else args.max_new_tokens
    check_context(args, config, input_ids.shape[1], max_new, speculative=not args.vanilla)
    target, tokenizer, device, _ = load_setup(args, folder)
    input_ids = input_ids.to(device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    options = dict(max_new_tokens=max_new, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, eos_token_id=tokenizer.eos_token_id, streamer=streamer,
                   generator=torch.Generator(device="cpu").manual_seed(args.seed))
    try:
        if args.vanilla:
            result = vanilla_generate(target, input_ids, **options)
            tau = "n/a (vanilla)"
        else:
            draft = load_draft(args, "jakiro", target)
            total_tokens, _ = resolve_total_tokens(args, target, draft)
            generator = SpeculativeGenerator(target, draft, depth=args.depth, top_k=args.tree_top_k,
                                             total_tokens=total_tokens)
            result = generator.generate(input_ids, **options)
            tau = f"{result.mean_accepted_length:.2f} (total_tokens={total_tokens})"
    except ValueError as error:   # what only the loaded models can tell (e.g. a tree this draft cannot grow)
        raise SystemExit(f"jakiro generate: {error}") from None
    new = int(result.new_tokens[0])
    seconds = result.timings["total"]
    print(f"\n[jakiro] {new} tokens in {seconds:.2f} s: {new / max(seconds, 1e-9):.1f} tokens/s, "
          f"{result.cycles} target passes, mean accepted length tau = {tau}", file=sys.stderr)
    return 0


def _command(name: str):
    """``(validate(args), run(args) -> int)`` of a sub-command."""
    if name == "generate":
        return validate_generate_args, generate_command
    if name == "demo":
        from jakiro.demo import demo_command, validate_demo_args
        return validate_demo_args, demo_command
    if name == "bench-e2e":
        from jakiro.bench_e2e import bench_command, validate_bench_args
        return validate_bench_args, bench_command
    from jakiro.train.commands import datagen_command, train_command, validate_datagen_args, validate_train_args
    if name == "datagen":
        return validate_datagen_args, datagen_command
    return validate_train_args, train_command


def main(argv: list[str] | None = None) -> int:
    """Runs a command. Its checks run before any model loads (those that need the tokenizer or
    the data right after those load); a :class:`UsageError` is printed as one stderr line and
    re-raised: exit status 2."""
    args = _parser().parse_args(argv)
    validate, run = _command(args.command)
    try:
        validate(args)
        return run(args)
    except UsageError as error:
        print(f"jakiro {args.command}: error: {error}", file=sys.stderr)
        raise


if __name__ == "__main__":
    # The imported module's main: the sub-commands raise jakiro.cli.UsageError, which a
    # __main__ copy of this file would not catch.
    from jakiro.cli import main as cli_main
    sys.exit(cli_main())

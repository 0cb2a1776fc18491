"""``jakiro`` command line (``python -m jakiro.cli``).

    jakiro demo [--json]                         the default target + shipped draft on MT-bench questions
    jakiro generate --prompt TEXT [--vanilla]    one answer, streamed, with a summary line
    jakiro bench-e2e [--datasets ...]            vanilla vs EAGLE-2 vs Jakiro, tau and tokens/s
    jakiro datagen --data FILE --format sharegpt|jsonl --out DIR    training features
    jakiro train --data DIR --out DIR [--eagle2]                     a draft (torchrun-ready)

Every command defaults to the embedded SmolLM2-135M-Instruct target (``--target`` also takes
gemma3-270m or qwen2.5-coder-0.5b, an HF folder or a GGUF file) and, where a draft is needed,
the Jakiro draft shipped for it (``--draft untrained`` for a target without one).

Every command checks its arguments before it loads a model; a bad one ends the run with a
one-line message on stderr and exit status 2 (:class:`UsageError`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from jakiro.commands.options import UsageError  # noqa: F401  (re-exported: jakiro.cli.UsageError)

# Sub-command -> its module in jakiro.commands (add_parser, validate, run).
COMMANDS = {"demo": "demo", "generate": "generate", "bench-e2e": "bench_e2e", "datagen": "datagen", "train": "train", "export": "export"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, like the commands' own checks: the usage is one --help away.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _module(command: str):
    return importlib.import_module(f"jakiro.commands.{COMMANDS[command]}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jakiro", description="Jakiro speculative decoding",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        _module(command).add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a command. Its checks run before any model loads (those that need the tokenizer or
    the data right after those load); a :class:`UsageError` is printed as one stderr line and
    re-raised: exit status 2."""
    args = _parser().parse_args(argv)
    module = _module(args.command)
    try:
        return module.run(args, module.validate(args))
    except UsageError as error:
        print(f"jakiro {args.command}: error: {error}", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())

"""``jakiro`` command line (``python -m jakiro.cli``).

    jakiro demo [--json]                         the default target + shipped draft on MT-bench questions
    jakiro generate --prompt TEXT [--vanilla]    one answer, streamed, with a summary line
    jakiro bench-e2e [--datasets ...]            vanilla vs EAGLE-2 vs Jakiro, tau and tokens/s
    jakiro datagen --data FILE --format sharegpt|jsonl --out DIR    training features
    jakiro train --data DIR --out DIR [--eagle2]                     a draft (torchrun-ready)

Every command defaults to the embedded SmolLM2-135M-Instruct target (``--target`` takes an
HF folder or a GGUF file) and, where a draft is needed, the Jakiro draft shipped for it.
"""
from __future__ import annotations

import argparse
import sys

import torch


def _parser() -> argparse.ArgumentParser:
    from jakiro.bench_e2e import add_bench_parser, add_target_arguments
    from jakiro.demo import add_demo_parser
    from jakiro.train.commands import add_datagen_parser, add_train_parser
    parser = argparse.ArgumentParser(prog="jakiro", description="Jakiro speculative decoding",
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


def generate_command(args) -> int:
    from transformers import TextStreamer

    from jakiro.bench_e2e import load_draft, load_setup, resolve_total_tokens
    from jakiro.evaluate import encode_prompt
    from jakiro.generate import SpeculativeGenerator, vanilla_generate

    target, tokenizer, device, _ = load_setup(args)
    input_ids = encode_prompt(tokenizer, args.prompt, not args.no_chat_template).to(device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    options = dict(max_new_tokens=args.max_new_tokens or 256, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, eos_token_id=tokenizer.eos_token_id, streamer=streamer,
                   generator=torch.Generator(device="cpu").manual_seed(args.seed))
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
    new = int(result.new_tokens[0])
    seconds = result.timings["total"]
    print(f"\n[jakiro] {new} tokens in {seconds:.2f} s: {new / max(seconds, 1e-9):.1f} tokens/s, "
          f"{result.cycles} target passes, mean accepted length tau = {tau}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        return generate_command(args)
    if args.command == "demo":
        from jakiro.demo import demo_command
        return demo_command(args)
    if args.command == "bench-e2e":
        from jakiro.bench_e2e import bench_command
        return bench_command(args)
    from jakiro.train.commands import datagen_command, train_command
    if args.command == "datagen":
        return datagen_command(args)
    if args.command == "train":
        return train_command(args)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())

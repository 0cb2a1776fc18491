"""``jakiro`` command line (``python -m jakiro.cli``).

    jakiro generate --target PATH --draft PATH --prompt TEXT [--temperature T] [--max-new-tokens N]
    jakiro datagen --target PATH --data FILE --format sharegpt|jsonl --out DIR [--max-len N] [--limit K]
    jakiro train --target PATH --data DIR --out DIR [--steps N | --epochs E] [--resume]   (torchrun-ready)

loads a Hugging Face causal LM and a Jakiro draft saved with ``JakiroDraft.save_pretrained``,
applies the tokenizer's chat template when it has one, streams the generated text, and
ends with a summary line (tokens/s and the mean accepted length tau).
"""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jakiro", description="Jakiro speculative decoding")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text with a target model and a Jakiro draft")
    gen.add_argument("--target", required=True, help="Hugging Face model folder (or hub id available offline)")
    gen.add_argument("--draft", help="draft folder (config.json + model.safetensors); omit with --vanilla")
    gen.add_argument("--vanilla", action="store_true", help="plain decoding, no draft (the baseline)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="sampling top-k (0: off)")
    gen.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    gen.add_argument("--depth", type=int, default=5, help="draft tree depth (levels = depth + 1)")
    gen.add_argument("--tree-top-k", type=int, default=10, help="children per expanded tree node")
    gen.add_argument("--total-tokens", type=int, default=60, help="tree nodes verified per cycle")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    gen.add_argument("--no-chat-template", action="store_true", help="use the prompt as is")
    from jakiro.train.commands import add_datagen_parser, add_train_parser
    add_datagen_parser(commands)
    add_train_parser(commands)
    return parser


def _encode(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return torch.as_tensor(ids).reshape(1, -1)


def generate_command(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from jakiro.draft import JakiroDraft
    from jakiro.generate import SpeculativeGenerator, vanilla_generate

    if not args.vanilla and not args.draft:
        raise SystemExit("jakiro generate: --draft is required (or pass --vanilla)")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(args.device).eval()
    input_ids = _encode(tokenizer, args.prompt, not args.no_chat_template).to(args.device)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, eos_token_id=tokenizer.eos_token_id, generator=generator, streamer=streamer)
    if args.vanilla:
        result = vanilla_generate(target, input_ids, **options)
    else:
        draft = JakiroDraft.from_pretrained(args.draft, target=target)
        generator_ = SpeculativeGenerator(target, draft, depth=args.depth, top_k=args.tree_top_k,
                                          total_tokens=args.total_tokens)
        result = generator_.generate(input_ids, **options)
    new = int(result.new_tokens[0])
    seconds = result.timings["total"]
    tau = "n/a (vanilla)" if args.vanilla else f"{result.mean_accepted_length:.2f}"
    print(f"\n[jakiro] {new} tokens in {seconds:.2f} s: {new / max(seconds, 1e-9):.1f} tokens/s, "
          f"{result.cycles} target passes, mean accepted length tau = {tau}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        return generate_command(args)
    from jakiro.train.commands import datagen_command, train_command
    if args.command == "datagen":
        return datagen_command(args)
    if args.command == "train":
        return train_command(args)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())

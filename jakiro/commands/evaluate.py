"""End-to-end measurement: generation methods run side by side over a prompt set.

Every prompt is run by every method in turn (interleaved, so drift in machine speed hits
all methods alike) after one warm-up call per method. A method's numbers are totals over
the prompts: tokens/s = new tokens / wall seconds of the generate calls, and
tau = tokens committed per target verify pass (accepted draft tokens + 1). With greedy
decoding every method's tokens are compared with a reference method's (vanilla) and any
difference raises :class:`LosslessError`.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Callable

import torch


class LosslessError(AssertionError):
    """A speculative method's greedy output differs from vanilla decoding."""


@dataclass
class MethodStats:
    name: str
    new_tokens: int = 0
    seconds: float = 0.0
    cycles: int = 0
    committed: int = 0            # sum over cycles of accepted draft tokens + 1
    accept_hist: list = field(default_factory=list)   # [k]: cycles that accepted k draft tokens
    outputs: list = field(default_factory=list)
    diverged: list = field(default_factory=list)   # (prompt, first differing token), non-strict runs

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-12)

    @property
    def tau(self) -> float:
        return self.committed / max(self.cycles, 1)

    def add(self, result):
        """Accounts one :class:`~jakiro.generate.GenerationResult` (batch of one)."""
        count = int(result.new_tokens[0])
        self.new_tokens += count
        self.seconds += result.timings["total"]
        accepted = result.accept_lengths[:, 0]
        accepted = accepted[accepted >= 0]
        self.cycles += int(accepted.numel())
        self.committed += int((accepted + 1).sum())
        if accepted.numel():
            counts = torch.bincount(accepted.to(torch.int64)).tolist()
            if len(counts) > len(self.accept_hist):
                self.accept_hist += [0] * (len(counts) - len(self.accept_hist))
            for k, count in enumerate(counts):
                self.accept_hist[k] += count

    def summary(self, vanilla: "MethodStats | None" = None) -> dict:
        row = dict(method=self.name, tokens=self.new_tokens, seconds=round(self.seconds, 4),
                   tokens_per_s=round(self.tokens_per_s, 3), tau=round(self.tau, 4), cycles=self.cycles,
                   accept_hist=list(self.accept_hist))
        if vanilla is not None:
            row["speedup"] = round(self.tokens_per_s / max(vanilla.tokens_per_s, 1e-12), 4)
        if self.diverged:
            row["diverged_prompts"] = len(self.diverged)
        return row


def encode_prompt(tokenizer, text: str, chat: bool = True) -> torch.Tensor:
    """int64 ``[1, P]``: ``text`` as a user turn of the tokenizer's chat template (when it has one)."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return torch.as_tensor(ids).reshape(1, -1)


def run_side_by_side(methods: dict[str, Callable], prompts: list[torch.Tensor], *, max_new_tokens: int,
                     temperature: float = 0.0, seed: int = 0, eos_token_id=None, reference: str | None = None,
                     unchecked: tuple[str, ...] = (), strict: bool = True, on_prompt: Callable | None = None,
                     warmup: bool = True, progress=True) -> list[MethodStats]:
    """Runs every method on every prompt, in the given order; returns one :class:`MethodStats`
    per method.

    ``methods`` maps a name to ``fn(input_ids, **options) -> GenerationResult``. With greedy
    decoding every method's tokens must equal those of ``reference`` (default: the first
    method), except for the ``unchecked`` ones (another implementation of vanilla decoding, whose
    different kernels may round differently). A difference raises :class:`LosslessError`; with
    ``strict=False`` it is recorded in ``MethodStats.diverged`` instead (half precision: a tree
    pass and a one-token pass may round a near-tie apart). ``on_prompt(index, method_name,
    result)`` is called after each run (e.g. to print
    the answer). Sampling runs draw from a CPU generator seeded with ``seed + prompt index``.
    ``warmup``: one short untimed call per method first. ``progress``: True (a bar on a terminal,
    else a line every 10% or 30 s), False, a mode of :func:`jakiro.progress.resolve_mode`, or a
    :class:`jakiro.progress.Progress` shared by several calls (updated once per run, left open).
    """
    from jakiro.progress import Progress
    if not methods:
        raise ValueError("run_side_by_side: no methods")
    reference = reference or next(iter(methods))
    if reference not in methods:
        raise ValueError(f"run_side_by_side: reference {reference!r} is not one of the methods")
    stats = {name: MethodStats(name) for name in methods}
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos_token_id)
    if warmup and prompts:
        for fn in methods.values():
            fn(prompts[0], **dict(options, max_new_tokens=min(8, max_new_tokens)),
               generator=torch.Generator(device="cpu").manual_seed(seed))
    shared = isinstance(progress, Progress)
    bar = progress if shared else Progress(total=len(prompts) * len(methods), desc="jakiro e2e", unit="run",
                                           mode=progress, leave=False)
    for index, ids in enumerate(prompts):
        outputs = {}
        for name, fn in methods.items():
            generator = torch.Generator(device="cpu").manual_seed(seed + index)
            result = fn(ids, **options, generator=generator)
            outputs[name] = result.sequences[0, ids.shape[1]:ids.shape[1] + int(result.new_tokens[0])].tolist()
            stats[name].add(result)
            stats[name].outputs.append(outputs[name])
            if on_prompt is not None:
                on_prompt(index, name, result)
            bar.update(1)
        if temperature == 0.0:
            expected = outputs[reference]
            for name, tokens in outputs.items():
                if tokens != expected and name not in unchecked:
                    first = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b),
                                 min(len(tokens), len(expected)))
                    if not strict:
                        stats[name].diverged.append((index, first))
                        continue
                    raise LosslessError(f"{name}: greedy output differs from {reference} on prompt {index} "
                                        f"at new token {first} ({len(tokens)} vs {len(expected)} tokens)")
    if not shared:
        bar.close()
    return list(stats.values())


def hf_generate_method(model) -> Callable:
    """Hugging Face ``model.generate`` (its own cache and attention) as a method: another vanilla
    baseline, so the jakiro stack's own vanilla decoding can be checked for speed."""
    import time

    from jakiro.generate import GenerationResult

    def run(input_ids, max_new_tokens, temperature=0.0, eos_token_id=None, generator=None, **_):
        device = model.get_output_embeddings().weight.device
        ids = input_ids.to(device)
        start = time.perf_counter()
        sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
        if generator is not None:
            torch.manual_seed(int(generator.initial_seed()))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=eos_token_id, pad_token_id=eos_token_id, **sampling)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        new = out.shape[1] - ids.shape[1]
        return GenerationResult(out.cpu(), torch.tensor([new]), max(new - 1, 0),
                                torch.zeros((max(new - 1, 0), 1), dtype=torch.int32), {"total": seconds})
    return run


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Where a measurement ran: device name, dtype and versions (BENCHMARKS.md rule)."""
    import transformers
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"
    return dict(device=name, dtype=str(dtype).replace("torch.", ""), torch=torch.__version__,
                cuda=torch.version.cuda, transformers=transformers.__version__, python=platform.python_version())


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """``rows`` as a GitHub markdown table with the given columns."""
    def cell(value):
        return f"{value:.2f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)

"""Feature generation (``jakiro datagen``): conversations -> target features.

Each conversation is rendered with the target's own chat template and run through the
target once; the shard keeps its tokens, the last-layer features after the final norm (and,
for EAGLE-3's multi-layer drafts, the residual streams of ``feature_layers`` before them) and
a loss mask that covers exactly the assistant tokens.

The mask comes from the template itself, by rendering prefixes of the conversation: for
assistant turn ``i`` the text of ``messages[:i]`` with the generation prompt ends where the
answer starts, and the text of ``messages[:i+1]`` ends where it (with the template's
end-of-turn marker) stops. No per-model offsets; a template for which those renders are
not prefixes of the full render is rejected with an error.
"""
from __future__ import annotations

import itertools
import os
from typing import Iterable

import torch

from jakiro.train.data import FORMAT, read_index, shard_name, write_index, write_shard

# ---------------------------------------------------------------------------- masking
def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant answers."""
    text = _render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else _render(tokenizer, [], True)
        through = _render(tokenizer, messages[:i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError("jakiro datagen: the chat template does not render conversations prefix by prefix, "
                             "so the assistant tokens cannot be derived from it")
        # The whitespace a template adds after its end-of-turn marker is never generated.
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def encode_conversation(tokenizer, messages: list[dict], max_len: int | None = None):
    """``(input_ids [S], loss_mask [S])`` of one conversation: the mask is 1 on the tokens that
    start inside an assistant answer (its text and the template's end-of-turn marker)."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(encoded["input_ids"], dtype=torch.int64)
    mask = torch.zeros(len(ids), dtype=torch.uint8)
    for token, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(a <= start < b for a, b in spans):
            mask[token] = 1
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


# ---------------------------------------------------------------------------- generation
@torch.no_grad()
def target_features(target, input_ids: torch.Tensor, feature_layers: list[int] | None = None) -> torch.Tensor:
    """Last-layer features after the final norm, ``[S, H]``, from one forward of ``target``;
    with ``feature_layers`` (indices of ``hidden_states``) those layers' residual streams
    first, ``[S, (n + 1) H]`` (what ``TargetModel.forward`` gives a multi-layer draft)."""
    from jakiro.target import decoder_features
    device = target.get_input_embeddings().weight.device
    out = target.get_decoder()(input_ids=input_ids.to(device)[None], output_hidden_states=bool(feature_layers))
    return decoder_features(out, feature_layers)[0]


@torch.no_grad()
def regenerate_answers(target, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 512,
                       batch_size: int = 8, progress: bool | str = False) -> list[list[dict]]:
    """Self-distillation: every assistant turn rewritten by ``target`` (greedy), turn by turn, so
    later turns see the target's own earlier answers. Prompts are batched (left padding).

    Decoding runs on jakiro's own stack (:func:`jakiro.generate.vanilla_generate`, the tokens
    speculative decoding reproduces; on the CPU ~1.4x Hugging Face ``generate``), or on
    ``target.generate`` for a model the jakiro stack does not run (family or head size)."""
    from jakiro.generate import vanilla_generate
    from jakiro.progress import Progress
    from jakiro.ops import tree_attention_head_dims
    from jakiro.target import TargetModel
    device = target.get_input_embeddings().weight.device
    try:
        stack = TargetModel(target)
    except ValueError:
        stack = None
    if stack is not None and stack.head_dim not in tree_attention_head_dims(device):
        stack = None
    conversations = [[dict(m) for m in messages] for messages in conversations]
    eos = target.generation_config.eos_token_id if target.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    turn = 0
    while True:
        # (conversation, message index) of every conversation's assistant turn number ``turn``.
        jobs = []
        for c, messages in enumerate(conversations):
            answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if turn < len(answers):
                jobs.append((c, answers[turn]))
        if not jobs:
            return conversations
        # Similar lengths share a batch: less padding to compute.
        jobs.sort(key=lambda job: -len(_render(tokenizer, conversations[job[0]][:job[1]], True)))
        bar = Progress(total=len(jobs), desc=f"jakiro datagen: answers (turn {turn + 1})", unit="answer",
                       mode=progress, leave=False)
        for at in range(0, len(jobs), batch_size):
            chunk = jobs[at:at + batch_size]
            prompts = [tokenizer(_render(tokenizer, conversations[c][:i], True), add_special_tokens=False)["input_ids"]
                       for c, i in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
            attention = torch.zeros((len(prompts), width), dtype=torch.int64)
            for row, prompt in enumerate(prompts):
                ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.int64)
                attention[row, width - len(prompt):] = 1
            if stack is not None:
                out = vanilla_generate(stack, ids.to(device), attention_mask=attention.to(device),
                                       max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad).sequences
            else:
                out = target.generate(ids.to(device), attention_mask=attention.to(device), do_sample=False,
                                      max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
            for row, (c, i) in enumerate(chunk):
                conversations[c][i]["content"] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
            bar.update(len(chunk))
        bar.close()
        turn += 1


def generate_features(target, tokenizer, conversations: Iterable[list[dict]], out_dir: str, *,
                      max_len: int = 2048, limit: int | None = None, per_shard: int = 256,
                      regenerate: bool = False, max_new_tokens: int = 512, batch_size: int = 8,
                      progress: bool | str = True, feature_layers: list[int] | None = None) -> dict:
    """Writes the shards and index of ``conversations`` to ``out_dir``; returns the index.

    Shard ``k`` holds the usable conversations among records ``k*per_shard .. (k+1)*per_shard-1``
    of the stream, so a rerun skips the shards its index already lists (resumable; rerun with the
    same ``limit`` and ``per_shard``: a last, partial shard counts as finished). ``regenerate``:
    the target first rewrites the answers (:func:`regenerate_answers`, ``batch_size`` prompts at a time).
    ``feature_layers``: also store those layers' residual streams (:func:`target_features`;
    recorded in the index, so a resumed run must pass the same).
    ``progress``: True (a bar on a terminal, else a line every 10% or 30 s), False, or a mode of
    :func:`jakiro.progress.resolve_mode`.
    """
    from jakiro.progress import Progress
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("jakiro datagen: the target's tokenizer has no chat template")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isfile(os.path.join(out_dir, "index.json")):
        index = read_index(out_dir)
        if index.get("per_shard") != per_shard:
            raise ValueError(f"jakiro datagen: {out_dir} was written with per_shard={index.get('per_shard')}; "
                             f"resume with the same value or use another folder")
        if index.get("feature_layers") != feature_layers:
            raise ValueError(f"jakiro datagen: {out_dir} was written with feature_layers="
                             f"{index.get('feature_layers')}; resume with the same layers or use another folder")
    else:
        index = {"format": FORMAT, "version": 1, "hidden_size": target.config.get_text_config().hidden_size,
                 "per_shard": per_shard, "max_len": max_len, "shards": []}
        if feature_layers:
            index["feature_layers"] = list(feature_layers)
    done = {entry["file"] for entry in index["shards"] if os.path.isfile(os.path.join(out_dir, entry["file"]))}
    index["shards"] = [entry for entry in index["shards"] if entry["file"] in done]
    stream = iter(conversations) if limit is None else itertools.islice(conversations, limit)
    bar = Progress(total=limit, desc="jakiro datagen", unit="conv", mode=progress)
    for number in itertools.count():
        records = list(itertools.islice(stream, per_shard))
        if not records:
            break
        if shard_name(number) not in done:
            if regenerate:
                records = regenerate_answers(target, tokenizer, records, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, progress=progress)
            samples = []
            for messages in records:
                ids, mask = encode_conversation(tokenizer, messages, max_len)
                if mask.any() and len(ids) >= 3:
                    samples.append({"input_ids": ids, "hidden_states": target_features(target, ids, feature_layers),
                                    "loss_mask": mask})
                bar.update(1)
            if samples:
                index["shards"].append(write_shard(out_dir, number, samples))
                index["shards"].sort(key=lambda entry: entry["file"])
                write_index(out_dir, index)
        else:
            bar.update(len(records))
    bar.close()
    write_index(out_dir, index)   # also when nothing was usable: the folder still reads as a dataset
    return index

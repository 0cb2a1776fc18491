"""Which CPU ``nn.Linear`` layers run ``torch.ops.jakiro.linear`` and which keep ``F.linear``,
chosen by timing both on the CPU at hand.

The linear kernel was tuned on an AMD EPYC, where it beats the GEMM library 2-3.7x at the
few rows of decoding; on an Intel Xeon whose oneDNN has AMX tiles (or whose memory is
slower) ``F.linear`` can win, by 5x on bfloat16 trees. So the routes (:mod:`jakiro.cpu_routing`)
ask this module, per *shape class* (weight ``[N, K]``, dtype, row count), which one is faster
here, and cache the answer.

How a class is timed (:func:`measure`): the model's own weight matrices of that class (at most
:data:`MAX_TIMED_MATRICES` of them, within :data:`MAX_TIMED_BYTES`; a wider matrix, such as a
262k-token LM head, is cut to that many bytes of rows: a per-row stream costs the same per byte)
are multiplied by a random ``[rows, K]`` input, each product by the two ops in turn (interleaved,
the order alternating), :data:`REPEATS` passes round all classes; each op keeps its minimum.
``F.linear`` is the baseline: jakiro's kernel is chosen only when its minimum times
``1 + MARGIN`` is still below ``F.linear``'s (:func:`jakiro_wins`), so a tie or a noisy near-tie
never leaves torch's own op. The margin is 10%: the spread of minima between repeated
calibrations on a shared 2-core machine. The timed matrices sit in cache, which is what the
draft's do between tree levels; a whole target forward streams from memory, where the kernel
fares better (BENCHMARKS.md) - one more reason the target is not calibrated by default.

Two policies:

- :data:`DRAFT`: one choice per class *and row count* (the draft's numbers never reach the output,
  only how many of its tokens are accepted). A call with ``m`` rows uses the choice of the
  smallest calibrated row count ``>= m``; above the largest, ``F.linear``.
- :data:`TARGET`: one choice per class for *all* row counts (:data:`TARGET_ROWS` summed), so a
  tree node's product is the one a one-token step gets whichever op is chosen. Calibrating the
  target is opt-in (``JAKIRO_CALIBRATE=all``): with ``F.linear`` chosen the verify pass is no
  longer batch-invariant, and greedy speculative output equals vanilla decoding only up to the
  GEMM's rounding (docs/kernels.md, "linear"). By default the target keeps the kernel everywhere.

Environment:

- ``JAKIRO_LINEAR_KERNEL`` set to anything but ``auto``: no calibration; every layer is routed to
  the op, which then runs that kernel (or ``at::linear`` for ``aten``).
- ``JAKIRO_CALIBRATE``: ``1`` (default) calibrates the draft's layers; ``all`` the target's too;
  ``0`` none (every layer on the kernel, as before calibration existed).

Decisions are cached in ``<jakiro cache dir>/calibration.json`` (``$JAKIRO_CACHE`` or
``~/.cache/jakiro``), under a key naming the CPU model, its instruction-set flags that matter,
torch's version and the thread count (:func:`machine_key`): a second run on the same machine
measures nothing.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MARGIN = 0.10
REPEATS = 9
MAX_TIMED_BYTES = 4 << 20
CALIBRATION_BUDGET_S = 3.0
MIN_REPEATS = 3
MAX_TIMED_MATRICES = 2
TARGET_ROWS = (1, 8, 16, 32, 64)
DRAFT_ROWS = (1, 2, 4, 8, 16, 32, 64)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
FILE_NAME = "calibration.json"
FORMAT = 1


@dataclass(frozen=True)
class Policy:
    """Which row counts a model's layers are timed at, and whether each count gets its own choice."""
    name: str
    rows: tuple[int, ...]
    per_rows: bool


TARGET = Policy("target", TARGET_ROWS, per_rows=False)
DRAFT = Policy("draft", DRAFT_ROWS, per_rows=True)

# A layer's choice: ((largest rows, use jakiro), ...) ascending; above the last entry, F.linear.
Choice = tuple[tuple[int, bool], ...]
ALWAYS = ((1 << 62, True),)     # every row count on the op (which hands large ones to at::linear itself)
NEVER = ((1 << 62, False),)


def uses_jakiro(choice: Choice, rows: int) -> bool:
    """Whether a call with ``rows`` rows runs the op under ``choice``."""
    for largest, jakiro in choice:
        if rows <= largest:
            return jakiro
    return False


def mode() -> str:
    """``"off"``, ``"draft"`` or ``"all"``: which layers are calibrated (the environment above)."""
    kernel = os.environ.get("JAKIRO_LINEAR_KERNEL", "")
    if kernel not in ("", "auto"):
        return "off"
    value = os.environ.get("JAKIRO_CALIBRATE", "1").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value == "all":
        return "all"
    if value in ("", "1", "on", "true", "yes", "draft"):
        return "draft"
    raise ValueError(f"JAKIRO_CALIBRATE must be 0, 1 or all, got {value!r}")


def target_calibrated() -> bool:
    """Whether the target's CPU layers may run ``F.linear`` (``JAKIRO_CALIBRATE=all``)."""
    return mode() == "all"


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        import platform
        name = platform.processor() or platform.machine() or name
    return name, [flag for flag in ISA_FLAGS if flag in flags]


# Bumped when jakiro's CPU linear kernel changes speed (2: the AMX copy), so older timings are not reused.
KERNEL_GENERATION = 2


def machine_key() -> str:
    """The cache key: CPU model, the flags that change which op wins, torch version, threads,
    and the kernel's generation."""
    name, flags = _cpu_model_and_flags()
    return (f"{name} [{' '.join(flags)}] torch {torch.__version__} threads {torch.get_num_threads()} "
            f"kernel {KERNEL_GENERATION}")


def cache_path() -> Path:
    from jakiro.pretrained import cache_dir
    return cache_dir() / FILE_NAME


def shape_key(n: int, k: int, dtype: torch.dtype, rows: int) -> str:
    return f"{str(dtype).removeprefix('torch.')} {n}x{k} rows={rows}"


def jakiro_wins(jakiro_s: float, aten_s: float) -> bool:
    """The decision rule: the kernel only when faster than ``F.linear`` by :data:`MARGIN`."""
    return jakiro_s * (1 + MARGIN) < aten_s


def measure(problems: list[tuple[list[torch.Tensor], int]], repeats: int = REPEATS) -> list[tuple[float, float]]:
    """Seconds of ``(torch.ops.jakiro.linear, F.linear)`` for each problem ``(weights, rows)``: one
    product of a random ``[rows, K]`` input with every matrix of ``weights``, each matrix's
    minimum summed.

    A busy machine stalls a call for whole scheduler slices (milliseconds), in bursts; so each
    product is timed alone (a short call dodges them more often), the two ops alternate call by
    call (who goes first alternating too), and the ``repeats`` passes go round *all* problems in
    turn, so that a burst spoils one pass of a problem rather than all of them. Stops after
    :data:`MIN_REPEATS` passes once :data:`CALIBRATION_BUDGET_S` is spent."""
    ops = (torch.ops.jakiro.linear, F.linear)
    clock = time.perf_counter
    inputs = [torch.randn(rows, weights[0].shape[1]).to(weights[0].dtype) for weights, rows in problems]
    best = [[[math.inf] * len(weights) for _ in ops] for weights, _ in problems]
    started = clock()
    with torch.no_grad():
        for (weights, _), x in zip(problems, inputs):      # warm-up: first touch, oneDNN primitives
            for w in weights:
                ops[0](x, w, None), ops[1](x, w)
        for i in range(repeats):
            for p, ((weights, _), x) in enumerate(zip(problems, inputs)):
                for j, w in enumerate(weights):
                    for slot in ((0, 1) if (i + j) % 2 == 0 else (1, 0)):
                        start = clock()
                        ops[slot](x, w, None)
                        best[p][slot][j] = min(best[p][slot][j], clock() - start)
            if i + 1 >= MIN_REPEATS and clock() - started > CALIBRATION_BUDGET_S:
                break
    return [(sum(jakiro), sum(aten)) for jakiro, aten in best]


def _timed_stack(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The matrices a class is timed on: its first MAX_TIMED_MATRICES, within MAX_TIMED_BYTES (the
    first cut to that many rows if wider)."""
    stack, total = [], 0
    for w in weights:
        size = w.numel() * w.element_size()
        if total + size > MAX_TIMED_BYTES or len(stack) == MAX_TIMED_MATRICES:
            if not stack:   # one matrix wider than the budget: as many rows as fit
                keep = max(1, MAX_TIMED_BYTES // (w.shape[1] * w.element_size()))
                stack.append(w.detach()[:keep])
            break
        stack.append(w.detach())
        total += size
    return stack


_lock = threading.Lock()
_memo: dict[str, dict] = {}     # machine key -> {shape key: entry}, what this process knows


def _load(key: str) -> dict:
    if key not in _memo:
        entries = {}
        try:
            data = json.loads(cache_path().read_text())
            if data.get("format") == FORMAT:
                entries = dict(data.get("machines", {}).get(key, {}).get("linear", {}))
        except (OSError, ValueError, AttributeError):
            pass
        _memo[key] = entries
    return _memo[key]


def _save(key: str, entries: dict) -> None:
    path = cache_path()
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            data = {}
    except (OSError, ValueError):
        data = {}
    data["format"] = FORMAT
    machines = data.setdefault("machines", {})
    linear = machines.setdefault(key, {}).setdefault("linear", {})
    linear.update(entries)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass   # a read-only cache: decisions live for this process only


def decide(classes: dict[tuple[int, int, torch.dtype], list[torch.Tensor]], rows: tuple[int, ...]) -> dict:
    """``{(class, rows): entry}`` for every class and row count, timing only what the cache lacks.
    An entry is ``{"jakiro_us", "aten_us", "jakiro": bool}``."""
    key = machine_key()
    with _lock:
        known = _load(key)
        missing = [(cls, m) for cls in classes for m in rows if shape_key(*cls[:2], cls[2], m) not in known]
        if missing:
            stacks = {cls: _timed_stack(classes[cls]) for cls, _ in missing}
            timings = measure([(stacks[cls], m) for cls, m in missing])
            new = {}
            for (cls, m), (jakiro_s, aten_s) in zip(missing, timings):
                new[shape_key(*cls[:2], cls[2], m)] = {"jakiro_us": round(jakiro_s * 1e6, 1),
                                                        "aten_us": round(aten_s * 1e6, 1),
                                                        "jakiro": jakiro_wins(jakiro_s, aten_s)}
            known.update(new)
            _save(key, new)
        return {(cls, m): known[shape_key(*cls[:2], cls[2], m)] for cls in classes for m in rows}


def linear_choices(layers, policy: Policy) -> dict[int, Choice]:
    """``{id(layer): choice}`` for the CPU ``nn.Linear`` layers ``layers`` under ``policy``."""
    layers = list(layers)
    current = mode()
    if current == "off" or (policy is TARGET and current != "all"):
        return {id(layer): ALWAYS for layer in layers}
    classes: dict[tuple[int, int, torch.dtype], list[torch.Tensor]] = {}
    for layer in layers:
        w = layer.weight
        classes.setdefault((w.shape[0], w.shape[1], w.dtype), []).append(w)
    entries = decide(classes, policy.rows)
    per_class = {}
    for cls in classes:
        if policy.per_rows:
            choice = tuple((m, entries[cls, m]["jakiro"]) for m in policy.rows)
            per_class[cls] = choice if any(jakiro for _, jakiro in choice) else NEVER
        else:
            # One choice for every row count: the sum of one pass at each size, the same rule.
            jakiro_us = sum(entries[cls, m]["jakiro_us"] for m in policy.rows)
            aten_us = sum(entries[cls, m]["aten_us"] for m in policy.rows)
            per_class[cls] = ALWAYS if jakiro_wins(jakiro_us, aten_us) else NEVER
    return {id(layer): per_class[layer.weight.shape[0], layer.weight.shape[1], layer.weight.dtype]
            for layer in layers}


def forget() -> None:
    """Drops what this process remembers (the file stays): the next call reads the cache again."""
    with _lock:
        _memo.clear()

"""Progress of jakiro's long jobs (datagen, train, bench-e2e, model conversion): one helper for all.

Three ways to show it, picked by :func:`resolve_mode`:

* ``"bar"``: a tqdm bar with rate and ETA, on a terminal;
* ``"lines"``: plain lines for logs and CI, one every ``every_percent`` % of the total or every
  ``every_seconds`` seconds (whichever comes first; only the time rule when the total is
  unknown), so a long job prints a bounded number of lines: at most ``100 / every_percent``
  plus one per ``every_seconds`` of run time, plus one at the end;
* ``"off"``: nothing.

``"auto"`` (the commands' default) is ``"bar"`` when the stream is a terminal and ``CI`` is not set,
else ``"lines"``; the commands' ``--no-progress`` asks for ``"lines"`` (:func:`mode_from_args`).
Library calls keep their ``progress=True/False``: True is ``"auto"``, False ``"off"``.

    with Progress(total=len(items), desc="jakiro datagen", unit="conv", mode=mode) as bar:
        for item in items:
            ...
            bar.update(1)
            bar.set_postfix(loss=0.123)

    with stage("converting model.gguf (270.0 MB)", done="converted model.gguf"):
        convert(...)          # opaque work: a start line, a heartbeat every 30 s in lines mode, an end line

    print(summary_line("wrote 123 conversations under feats/", seconds, "1.5 conversations/s"))
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, TextIO

MODES = ("auto", "bar", "lines", "off")
PROGRESS_HELP = ("no progress bar: a line every 10%% or 30 s instead (also the default when stderr is not a "
                 "terminal or CI is set)")
EVERY_PERCENT = 10.0
EVERY_SECONDS = 30.0


def resolve_mode(progress: bool | str | None = True, stream: TextIO | None = None) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` for a ``progress`` setting: True/None/"auto" (a bar on a
    terminal outside CI, else lines), False/"off", "bar" or "lines"."""
    if progress is False or progress == "off":
        return "off"
    if progress is True or progress is None or progress == "auto":
        stream = sys.stderr if stream is None else stream
        try:
            terminal = bool(stream.isatty())
        except (AttributeError, ValueError):   # no isatty, or a closed stream
            terminal = False
        return "bar" if terminal and not os.environ.get("CI") else "lines"
    if progress in ("bar", "lines"):
        return progress
    raise ValueError(f"jakiro.progress: unknown progress mode {progress!r}; expected one of {MODES} or a bool")


def mode_from_args(args) -> str:
    """A command's progress mode: ``"lines"`` with ``--no-progress``, else ``"auto"``."""
    return "lines" if getattr(args, "no_progress", False) else "auto"


def format_duration(seconds: float) -> str:
    """``0.4 s``, ``12.3 s``, ``4m 05s``, ``2h 03m``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _format_count(value: float, unit_scale: bool) -> str:
    if not unit_scale:
        return f"{value:g}" if isinstance(value, float) else str(value)
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{prefix}"
    return f"{value:g}"


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Counts work done towards ``total`` (None: unknown) and shows it as a bar, lines or nothing.

    ``update(n)`` adds to the count, ``set_postfix(**values)`` sets the numbers shown after it (a
    loss, say), ``write(text)`` prints a line without breaking the bar, ``close()`` ends it (in lines
    mode with a last line, unless the last one already showed the final count). ``clock`` is for tests.
    """

    def __init__(self, total: int | float | None = None, desc: str = "jakiro", unit: str = "it", *,
                 mode: bool | str | None = "auto", stream: TextIO | None = None, initial: int | float = 0,
                 unit_scale: bool = False, every_percent: float = EVERY_PERCENT,
                 every_seconds: float = EVERY_SECONDS, leave: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self.mode = resolve_mode(mode, self.stream)
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.every_percent, self.every_seconds = every_percent, every_seconds
        self.count = self.initial = initial
        self.postfix: dict = {}
        self.clock = clock
        self.start = clock()
        self.lines = 0                       # lines printed in lines mode
        self._last_time = self.start
        self._last_count = initial
        self._next_percent = self._percent_step_after(initial)
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial,
                             file=self.stream, leave=leave, dynamic_ncols=True)

    # ----------------------------------------------------------------- counting
    def _percent_step_after(self, count) -> float:
        """The next percentage (a multiple of every_percent) above ``count``'s."""
        if not self.total or self.every_percent <= 0:
            return float("inf")
        done = 100.0 * count / self.total
        return (int(done // self.every_percent) + 1) * self.every_percent

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def update(self, n: int | float = 1):
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            now = self.clock()
            percent = 100.0 * self.count / self.total if self.total else None
            due_percent = percent is not None and percent + 1e-9 >= self._next_percent
            due_time = self.every_seconds > 0 and now - self._last_time >= self.every_seconds
            if due_percent or due_time:
                self._emit(now)

    def set_postfix(self, values: dict | None = None, **more):
        self.postfix = dict(values or {}, **more)
        if self._bar is not None:
            self._bar.set_postfix({k: _format_value(v) for k, v in self.postfix.items()}, refresh=False)

    def set_description(self, desc: str):
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)

    def write(self, text: str):
        """A line of text: above the bar on a terminal, as is in lines mode, nothing when off."""
        if self.mode == "off":
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    # ----------------------------------------------------------------- lines
    def line(self) -> str:
        """The state as one line: ``desc: 40/100 conv (40%), 12.0 s, ETA 18.0 s, 3.33 conv/s, loss=1.2``."""
        elapsed = self.elapsed
        done = self.count - self.initial
        count = _format_count(self.count, self.unit_scale)
        parts = []
        if self.total:
            parts.append(f"{count}/{_format_count(self.total, self.unit_scale)} {self.unit} "
                         f"({100.0 * self.count / self.total:.0f}%)")
        else:
            parts.append(f"{count} {self.unit}")
        parts.append(format_duration(elapsed))
        if self.total and done > 0 and self.count < self.total:
            parts.append(f"ETA {format_duration(elapsed * (self.total - self.count) / done)}")
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{_format_count(rate, True) if self.unit_scale else f'{rate:.3g}'} {self.unit}/s")
        text = f"{self.desc}: " + ", ".join(parts)
        if self.postfix:
            text += ", " + ", ".join(f"{k}={_format_value(v)}" for k, v in self.postfix.items())
        return text

    def _emit(self, now: float):
        print(self.line(), file=self.stream, flush=True)
        self.lines += 1
        self._last_time, self._last_count = now, self.count
        self._next_percent = self._percent_step_after(self.count)

    # ----------------------------------------------------------------- closing
    def close(self):
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self.count != self._last_count:
            self._emit(self.clock())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class stage:
    """A step whose progress cannot be counted (a model conversion, a tuning run): one line when it
    starts, in lines mode (``"lines"``, or ``"auto"`` off a terminal) a ``"{still}: still running
    after 30.0 s"`` line every ``every_seconds`` while it runs (``still`` defaults to the start
    line), and one line with its time when it ends.

        with stage("[jakiro] converting x.gguf (270 MB) to safetensors", done="[jakiro] converted x.gguf",
                   still="[jakiro] converting x.gguf", mode=mode) as s:
            convert()
            s.detail = "540 MB of safetensors"      # shown in the end line

    The end line is ``"{done} in 12.3 s (detail)"``; nothing is printed when the mode is ``"off"`` and
    no end line when the body raises (its error says what happened).
    """

    def __init__(self, start: str, done: str | None = None, *, still: str | None = None,
                 mode: bool | str | None = "auto", stream: TextIO | None = None,
                 every_seconds: float = EVERY_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self.mode = resolve_mode(mode, self.stream)
        self.start_text, self.done_text = start, done
        self.still_text = still if still is not None else start
        self.every_seconds, self.clock = every_seconds, clock
        self.detail: str | None = None
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = None

    def _print(self, text: str):
        print(text, file=self.stream, flush=True)

    def _heartbeat(self):
        while not self._stop.wait(self.every_seconds):
            self._print(f"{self.still_text}: still running after {format_duration(self.clock() - self.began)}")

    def __enter__(self) -> "stage":
        self.began = self.clock()
        if self.mode != "off":
            self._print(self.start_text)
        if self.mode == "lines" and self.every_seconds > 0:
            self._thread = threading.Thread(target=self._heartbeat, name="jakiro-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind, value, traceback):
        self.seconds = self.clock() - self.began
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if kind is None and self.mode != "off" and self.done_text is not None:
            detail = f" ({self.detail})" if self.detail else ""
            self._print(f"{self.done_text} in {format_duration(self.seconds)}{detail}")
        return False


def summary_line(what: str, seconds: float, key: str | None = None) -> str:
    """A command's closing line: ``[jakiro] {what} in {time}; {key}``, e.g. ``[jakiro] wrote 123
    conversations in 3 shards under feats/ in 1m 23s; 51200 tokens, 1.48 conversations/s``."""
    text = f"[jakiro] {what} in {format_duration(seconds)}"
    return f"{text}; {key}" if key else text

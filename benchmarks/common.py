"""Benchmark harness shared by every ``benchmarks/bench_*.py`` script.

Timing rules (BENCHMARKS.md, introduction): warm-up first, then many timed calls; report the
median and p90. On CUDA each call is timed with CUDA events (optionally as a
CUDA graph replaying ``graph_batch`` calls, to hide launch overhead); on the CPU
with a monotonic clock. Baselines are timed in the same process as the kernel.
Results go to JSON together with the environment (device, versions, dtype); ``--plot DIR`` also
draws the rows as one picture per report (jakiro.plots.kernel_plot; needs matplotlib:
``pip install 'jakiro[plots]'``, checked before anything runs).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

import jakiro


@dataclass
class Timing:
    median_us: float
    p90_us: float
    min_us: float
    calls: int

    @classmethod
    def from_samples(cls, samples_us: list[float]) -> "Timing":
        ordered = sorted(samples_us)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        return cls(statistics.median(ordered), p90, ordered[0], len(ordered))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 10, iters: int = 100,
            cuda_graph: bool = False, graph_batch: int = 20) -> Timing:
    """Times ``fn()``; every sample is one call (or one call's share of a graph replay)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        samples = []
        for _ in range(iters):
            start = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - start) / 1e3)
        return Timing.from_samples(samples)

    if cuda_graph:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()  # warm-up on the side stream, as graph capture requires
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(graph_batch):
                fn()
        call, per_sample = graph.replay, graph_batch
        for _ in range(3):
            call()
    else:
        call, per_sample = fn, 1
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        call()
        end.record()
    torch.cuda.synchronize(device)
    return Timing.from_samples([s.elapsed_time(e) * 1e3 / per_sample for s, e in events])


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Achieved device-memory bandwidth of a large copy, GB/s (bytes read + written).

    Measured in-process so kernel bandwidths can be quoted against what this
    device really delivers, not a datasheet.
    """
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * nbytes / (t.median_us * 1e-6) / 1e9


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    info = jakiro.build_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.device(device).type == "cuda" else None,
        "python": platform.python_version(),
        "jakiro_cuda_compiled": info["cuda_compiled"],
        "jakiro_cuda_arch_list": info["cuda_arch_list"],
        "host": platform.node(),
    }


@dataclass
class Report:
    """Rows of one benchmark script, printed as markdown and saved as JSON."""

    name: str
    device: torch.device
    rows: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def add(self, *, case: str, impl: str, timing: Timing, **metrics) -> dict:
        row = {"case": case, "impl": impl, **asdict(timing), **metrics}
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        keys = ["case", "impl", "median_us", "p90_us"]
        extra = sorted({k for r in self.rows for k in r} - set(keys) - {"min_us", "calls"})
        cols = keys + extra
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
        return "\n".join(lines)

    def save(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.json"
        payload = {"benchmark": self.name, "environment": environment(self.device), **self.meta, "rows": self.rows}
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _Parser(argparse.ArgumentParser):
    """Checks ``--plot`` (matplotlib installed) as soon as the options are read, before any case runs."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        if getattr(parsed, "plot", None):
            check_plot_option()
        return parsed, rest


def check_plot_option() -> None:
    """Ends the run with the one-line install hint when ``--plot`` is given without matplotlib."""
    from jakiro.plots import require_matplotlib
    try:
        require_matplotlib()
    except ImportError as error:
        raise SystemExit(f"benchmarks: {error}") from None


def parser(description: str) -> argparse.ArgumentParser:
    p = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=default_device(), help="cpu or cuda[:i]")
    p.add_argument("--out", default="bench-results", help="folder for the JSON results")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    p.add_argument("--iters", type=int, default=100, help="timed calls per case")
    p.add_argument("--quick", action="store_true", help="fewer cases and calls (smoke run)")
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays of many calls")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="also draw each report's rows as DIR/<name>.png (needs matplotlib: pip install 'jakiro[plots]')")
    return p


def call_counts(args, quick_iters: int) -> tuple[int, int]:
    """``(warmup, iters)`` per case: the options', capped for a ``--quick`` smoke run."""
    if args.quick:
        return min(args.warmup, 2), min(args.iters, quick_iters)
    return args.warmup, args.iters


def finish(report: Report, args) -> None:
    path = report.save(args.out)
    print(f"\n## {report.name} on {device_name(report.device)}\n")
    print(report.markdown())
    print(f"\nresults: {path}")
    if getattr(args, "plot", None) and report.rows:
        from jakiro.plots import kernel_plot
        # The picture reads the saved JSON: the same rows as the table above.
        picture = kernel_plot(json.loads(path.read_text()), Path(args.plot) / f"{report.name}.png")
        print(f"plot: {picture}")


def with_env(name: str, value: str, fn):
    """fn run with the environment variable ``name`` set to ``value`` (the jakiro ops read their
    kernel switches, e.g. JAKIRO_LINEAR_KERNEL, on every call), restored afterwards."""
    def call(*args, **kwargs):
        previous = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(*args, **kwargs)
        finally:
            if previous is None:
                del os.environ[name]
            else:
                os.environ[name] = previous
    return call

"""Pictures of jakiro's measurements (``--plot DIR``), drawn with matplotlib's Agg canvas (no display).

matplotlib is an optional extra (``pip install 'jakiro[plots]'``): nothing here imports it until a
plot is drawn, and :func:`require_matplotlib` is what the commands call before any model loads.

End to end (``jakiro bench-e2e --plot DIR``, ``jakiro demo --plot DIR``), from the command's report
(``results`` rows with ``dataset``, ``temperature``, ``method``, ``tokens_per_s``, ``speedup``,
``tau``, ``accept_hist``; the autotune ``tuning`` table):

* ``<prefix>_throughput.png``: tokens/s per method, one group of bars per prompt set and
  temperature, each bar labelled with its speedup over vanilla decoding;
* ``<prefix>_accept_lengths.png``: the tau histogram: the share of verify cycles that accepted
  0, 1, 2, ... drafted tokens, per speculative method;
* ``<prefix>_tree_size.png``: the autotune table against the tree size N: the cycle time it
  measured (target verify pass + draft), and the tau and tokens/s its cost model expects,
  anchored at the measured point of the chosen N (only when the tree size was autotuned).

Kernel benchmarks (``benchmarks/run_all.py --plot DIR``, or ``--plot`` of any ``bench_*.py``): one
picture per op family from the rows the markdown tables come from (:func:`kernel_plot`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

MISSING = "--plot needs matplotlib, which is not installed: pip install 'jakiro[plots]'"
DPI = 100
BASELINE_METHODS = ("vanilla", "hf-generate")     # no draft: no accepted-length histogram
# Fixed colours per method, so the same method looks the same in every picture.
METHOD_COLORS = {"vanilla": "#7f7f7f", "hf-generate": "#bcbd22", "eagle2": "#1f77b4",
                 "jakiro-mixture": "#d62728", "jakiro-per_expert": "#ff7f0e", "jakiro": "#d62728"}
_OTHER_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#1f77b4", "#ff7f0e")


def require_matplotlib() -> None:
    """Raises ImportError with the install hint (:data:`MISSING`) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise ImportError(MISSING) from None


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **options):
    """A figure on its own Agg canvas (no pyplot, no global state, no display) and its axes."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False, **options)
    return figure, axes


def _save(figure, path) -> Path:
    """The figure as a PNG of at most 256 colours (a few flat colours and their anti-aliasing: it
    looks the same at a third of the size), or as matplotlib writes it without Pillow."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.canvas.draw()
    try:
        from PIL import Image
    except ImportError:
        figure.savefig(path, dpi=DPI, format="png")
        return path
    image = Image.fromarray(__import__("numpy").asarray(figure.canvas.buffer_rgba())).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, format="PNG", optimize=True)
    return path


def _colors(names) -> dict:
    extra = iter(_OTHER_COLORS * (1 + len(names) // len(_OTHER_COLORS)))
    return {name: METHOD_COLORS.get(name) or next(extra) for name in names}


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _group_label(dataset, temperature) -> str:
    kind = "greedy" if float(temperature) == 0 else f"T={float(temperature):g}"
    return f"{dataset}\n{kind}"


def _context(report: dict) -> str:
    """One line saying where and how the numbers were measured."""
    parts = [report.get("device"), report.get("dtype")]
    if report.get("total_tokens") is not None:
        auto = " (auto)" if report.get("total_tokens_auto") else ""
        parts.append(f"tree {report['total_tokens']} nodes{auto}")
    if report.get("depth") is not None:
        parts.append(f"depth {report['depth']}, top-k {report.get('tree_top_k')}")
    if report.get("max_new_tokens") is not None:
        parts.append(f"{report['max_new_tokens']} new tokens max")
    return ", ".join(str(p) for p in parts if p)


# ---------------------------------------------------------------------------- end to end
def plot_throughput(report: dict, path) -> Path:
    """Tokens/s per method and prompt set/temperature, bars labelled with the speedup over vanilla."""
    rows = report["results"]
    if not rows:
        raise ValueError("jakiro.plots: the report has no results to plot")
    groups = _ordered((r["dataset"], r["temperature"]) for r in rows)
    methods = _ordered(r["method"] for r in rows)
    colors = _colors(methods)
    by_key = {(r["dataset"], r["temperature"], r["method"]): r for r in rows}
    figure, axes = _figure(max(7.0, 1.2 + 0.55 * len(groups) * len(methods)), 4.4)
    ax = axes[0, 0]
    width = 0.8 / len(methods)
    top = max(float(r["tokens_per_s"]) for r in rows)
    for m, method in enumerate(methods):
        xs, heights, labels = [], [], []
        for g, (dataset, temperature) in enumerate(groups):
            row = by_key.get((dataset, temperature, method))
            if row is None:
                continue
            xs.append(g - 0.4 + width * (m + 0.5))
            heights.append(float(row["tokens_per_s"]))
            speedup = row.get("speedup")
            label = f"{float(speedup):.2f}×" if speedup is not None else ""
            if method not in BASELINE_METHODS and row.get("tau") is not None:
                label += f"\nτ {float(row['tau']):.2f}"
            labels.append(label)
        bars = ax.bar(xs, heights, width * 0.92, label=method, color=colors[method])
        ax.bar_label(bars, labels=labels, padding=2, fontsize=7)
    ax.set_xticks(range(len(groups)), [_group_label(*g) for g in groups])
    ax.set_ylabel("tokens/s (higher is better)")
    ax.set_ylim(0, top * 1.2)
    ax.set_title("Decoding speed per method (label: speedup over vanilla decoding, and τ)", fontsize=10)
    ax.legend(fontsize=8, ncols=min(len(methods), 5), loc="upper center", bbox_to_anchor=(0.5, -0.18),
              frameon=False)
    ax.grid(axis="y", alpha=0.3)
    figure.suptitle(_context(report), fontsize=8, color="#444444")
    return _save(figure, path)


def _speculative_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["method"] not in BASELINE_METHODS and sum(r.get("accept_hist") or []) > 0]


def plot_accept_lengths(report: dict, path) -> Path | None:
    """The tau histogram per prompt set/temperature: share of verify cycles that accepted k drafted
    tokens, one bar per speculative method. None (nothing written) when no row has a histogram."""
    rows = _speculative_rows(report["results"])
    if not rows:
        return None
    groups = _ordered((r["dataset"], r["temperature"]) for r in rows)
    methods = _ordered(r["method"] for r in rows)
    colors = _colors(methods)
    longest = max(len(r["accept_hist"]) for r in rows)
    cols = min(len(groups), 2)
    grid_rows = math.ceil(len(groups) / cols)
    figure, axes = _figure(max(7.0, 4.2 * cols), 3.0 * grid_rows + 0.5, grid_rows, cols, sharey=True)
    width = 0.8 / len(methods)
    for g, (dataset, temperature) in enumerate(groups):
        ax = axes[g // cols, g % cols]
        for m, method in enumerate(methods):
            row = next((r for r in rows if (r["dataset"], r["temperature"], r["method"])
                        == (dataset, temperature, method)), None)
            if row is None:
                continue
            counts = list(row["accept_hist"]) + [0] * (longest - len(row["accept_hist"]))
            total = sum(counts)
            xs = [k - 0.4 + width * (m + 0.5) for k in range(longest)]
            ax.bar(xs, [100.0 * c / total for c in counts], width * 0.92, color=colors[method],
                   label=f"{method} (τ {float(row['tau']):.2f}, {total} cycles)")
        ax.set_xticks(range(longest))
        ax.set_title(_group_label(dataset, temperature).replace("\n", ", "), fontsize=9)
        ax.set_xlabel("drafted tokens accepted in a cycle (τ counts k + 1)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    for g in range(len(groups), grid_rows * cols):
        axes[g // cols, g % cols].set_visible(False)
    for r in range(grid_rows):
        axes[r, 0].set_ylabel("% of verify cycles")
    figure.suptitle("Accepted length per verify cycle (the τ histogram)", fontsize=10)
    figure.supxlabel(_context(report), fontsize=7, color="#444444")
    return _save(figure, path)


def _measured_point(rows: list[dict], total_tokens) -> tuple[str, float, float] | None:
    """``(method, tau, tokens/s)`` of the preferred speculative method at temperature 0 (else the
    lowest), over every prompt set: tau weighted by cycles, tokens/s as total tokens / total seconds."""
    rows = _speculative_rows(rows)
    if not rows:
        return None
    names = _ordered(r["method"] for r in rows)
    method = next((m for m in ("jakiro-mixture", "jakiro") if m in names), names[0])
    chosen = [r for r in rows if r["method"] == method]
    coldest = min(float(r["temperature"]) for r in chosen)
    chosen = [r for r in chosen if float(r["temperature"]) == coldest]
    cycles = sum(int(r.get("cycles") or 0) for r in chosen)
    tau = (sum(float(r["tau"]) * int(r.get("cycles") or 0) for r in chosen) / cycles) if cycles else \
        sum(float(r["tau"]) for r in chosen) / len(chosen)
    seconds = sum(float(r.get("seconds") or 0) for r in chosen)
    speed = (sum(int(r.get("tokens") or 0) for r in chosen) / seconds) if seconds > 0 else \
        sum(float(r["tokens_per_s"]) for r in chosen) / len(chosen)
    label = f"{method}, {'greedy' if coldest == 0 else f'T={coldest:g}'}"
    return label, tau, speed


def plot_tree_sizes(report: dict, path) -> Path | None:
    """Cycle time, expected tau and expected tokens/s against the tree size N, from the autotune
    table (``report["tuning"]``: ``total_tokens``, ``verify_ms``, ``draft_ms``, ``cost``).

    The autotune cost model (:func:`jakiro.autotune.choose_total_tokens`) expects tau to grow as
    ``gain(N) = (N / 40) ** 0.3`` and a cycle to take ``verify(N) + draft``; the curves are that
    model scaled to pass through the tau and tokens/s measured at the chosen N (for the preferred
    speculative method, greedy). None (nothing written) when the report has no table."""
    table = sorted(report.get("tuning") or [], key=lambda row: row["total_tokens"])
    if not table:
        return None
    chosen = report.get("total_tokens")
    sizes = [int(row["total_tokens"]) for row in table]
    verify = [float(row["verify_ms"]) for row in table]
    draft = [float(row["draft_ms"]) for row in table]
    cycle = [v + d for v, d in zip(verify, draft)]
    # cost = cycle seconds / gain, so the table itself gives gain(N).
    gain = [c / 1e3 / float(row["cost"]) if float(row["cost"]) > 0 else float("nan") for c, row in zip(cycle, table)]
    figure, axes = _figure(9.0, 3.8, 1, 2)
    left, right = axes[0, 0], axes[0, 1]
    left.plot(sizes, cycle, "o-", color="#333333", label="cycle (verify + draft)")
    left.plot(sizes, verify, "s--", color="#1f77b4", label="target verify pass")
    left.plot(sizes, draft, ":", color="#ff7f0e", label="draft (all tree levels)")
    left.set_xlabel("tree nodes verified per cycle (N)")
    left.set_ylabel("ms (measured by autotune)")
    left.set_title("Cycle time against tree size", fontsize=9)
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    measured = _measured_point(report.get("results") or [], chosen)
    anchor = sizes.index(chosen) if chosen in sizes else None
    if measured is not None and anchor is not None:
        label, tau, speed = measured
        taus = [max(1.0, tau * g / gain[anchor]) for g in gain]     # tau >= 1: a cycle commits a token
        speeds = [speed * float(table[anchor]["cost"]) / float(row["cost"]) for row in table]
        right.plot(sizes, speeds, "o-", color="#d62728", label="tokens/s (model)")
        right.plot([chosen], [speed], "*", color="#d62728", markersize=13, label=f"measured ({label})")
        right.set_ylabel("tokens/s")
        twin = right.twinx()
        twin.plot(sizes, taus, "s--", color="#2ca02c", label="τ (model)")
        twin.plot([chosen], [tau], "*", color="#2ca02c", markersize=13)
        twin.set_ylabel("τ (tokens per cycle)", color="#2ca02c")
        handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        right.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower right")
        right.set_title("Expected speed and τ (autotune model, anchored at the measurement)", fontsize=9)
    else:
        relative = [1.0 / float(row["cost"]) for row in table]
        best = max(relative)
        right.plot(sizes, [r / best for r in relative], "o-", color="#d62728", label="relative speed (model)")
        right.plot(sizes, [g / max(gain) for g in gain], "s--", color="#2ca02c", label="relative τ (model)")
        right.set_ylabel("relative to the best")
        right.legend(fontsize=7)
        right.set_title("Expected speed and τ (autotune model; no measurement)", fontsize=9)
    right.set_xlabel("tree nodes verified per cycle (N)")
    right.grid(alpha=0.3)
    if chosen is not None:
        for ax in (left, right):
            ax.axvline(chosen, color="#999999", linewidth=1, linestyle="-.")
        left.annotate(f"chosen N={chosen}", (chosen, 0), xytext=(4, 6), textcoords="offset points", fontsize=7)
    figure.suptitle(_context(report), fontsize=8, color="#444444")
    return _save(figure, path)


def e2e_plots(report: dict, out_dir, prefix: str = "bench_e2e") -> tuple[list[Path], list[str]]:
    """Every end-to-end picture of ``report`` under ``out_dir``: ``(paths written, notes on the
    pictures skipped)``."""
    out = Path(out_dir)
    written, notes = [plot_throughput(report, out / f"{prefix}_throughput.png")], []
    hist = plot_accept_lengths(report, out / f"{prefix}_accept_lengths.png")
    if hist is None:
        notes.append("no accepted-length plot: no speculative method ran")
    else:
        written.append(hist)
    if not report.get("tuning"):
        notes.append(f"no tree-size plot: the tree size was given (total_tokens={report.get('total_tokens')}), "
                     "not autotuned (--total-tokens auto times it)")
    else:
        written.append(plot_tree_sizes(report, out / f"{prefix}_tree_size.png"))
    return written, notes


# ---------------------------------------------------------------------------- kernel benchmarks
def _ours(impls: list[str]) -> str | None:
    """The implementation the speedups are of: ``jakiro`` (the op as called), else the first jakiro one."""
    if "jakiro" in impls:
        return "jakiro"
    return next((name for name in impls if name.startswith("jakiro")), None)


def kernel_plot(result: dict, path, name: str | None = None) -> Path:
    """One op family's benchmark (a ``Report`` JSON: ``rows`` of ``case``, ``impl``, ``median_us``,
    ``p90_us``) as a picture: the median time of every implementation across the cases (whiskers
    to p90; jakiro's own solid, baselines dashed, log scale), and below it jakiro's speedup over
    each baseline per case."""
    rows = result["rows"]
    if not rows:
        raise ValueError("jakiro.plots: the benchmark has no rows to plot")
    name = name or result.get("benchmark") or Path(path).stem
    cases = _ordered(r["case"] for r in rows)
    impls = _ordered(r["impl"] for r in rows)
    ours = _ours(impls)
    baselines = [i for i in impls if not i.startswith("jakiro")]
    times = {(r["case"], r["impl"]): r for r in rows}
    speedup_panel = ours is not None and bool(baselines)
    width = max(7.0, min(18.0, 2.5 + 0.42 * len(cases)))
    figure, axes = _figure(width, 6.4 if speedup_panel else 4.2, 2 if speedup_panel else 1, 1, sharex=True)
    ax = axes[0, 0]
    colors = _colors(impls)
    xs = list(range(len(cases)))
    nan = float("nan")
    for impl in impls:
        # NaN where a case lacks this implementation: the line breaks there instead of jumping over.
        median = [float(times[(c, impl)]["median_us"]) if (c, impl) in times else nan for c in cases]
        p90 = [max(float(times[(c, impl)].get("p90_us", m)), m) if (c, impl) in times else nan
               for c, m in zip(cases, median)]
        style = "-" if impl.startswith("jakiro") else "--"
        ax.errorbar(xs, median, yerr=[[0.0] * len(median), [p - m for p, m in zip(p90, median)]], fmt="o" + style,
                    color=colors[impl], markersize=4, linewidth=1.2, capsize=2, label=impl)
    ax.set_yscale("log")
    ax.set_ylabel("µs per call\n(median, whisker to p90)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=min(len(impls), 4))
    env = result.get("environment") or {}
    ax.set_title(f"{name}: time per call by implementation (lower is better)", fontsize=10)
    figure.suptitle(", ".join(str(v) for v in (env.get("device"), f"torch {env['torch']}" if env.get("torch") else None,
                                                env.get("date", "")[:10] or None) if v), fontsize=8, color="#444444")
    bottom = ax
    if speedup_panel:
        bottom = axes[1, 0]
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
        for impl in baselines:
            ratios = [float(times[(c, impl)]["median_us"]) / float(times[(c, ours)]["median_us"])
                      if (c, impl) in times and (c, ours) in times and float(times[(c, ours)]["median_us"]) > 0
                      else nan for c in cases]
            bottom.plot(xs, ratios, "o--", color=colors[impl], markersize=4, label=f"vs {impl}")
        bottom.axhline(1.0, color="#333333", linewidth=1)
        bottom.set_yscale("log")
        bottom.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}×"))
        bottom.yaxis.set_minor_formatter(NullFormatter())
        bottom.set_ylabel(f"{ours} speedup\n(baseline µs / {ours} µs)")
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize=7, ncols=min(len(baselines), 4))
    bottom.set_xticks(xs, cases, rotation=60, ha="right", fontsize=7)
    return _save(figure, path)


def kernel_payloads(data: dict, name: str | None = None) -> dict[str, dict]:
    """``{benchmark name: Report JSON}`` of a saved result: one benchmark's JSON, a file holding
    several (``{name: payload}``, as ``all.json`` or a device's combined results)."""
    if "rows" in data:
        return {data.get("benchmark") or name or "benchmark": data}
    payloads = {}
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(value.get("rows"), list):
            payloads[value.get("benchmark") or key] = value
    return payloads


def kernel_plots(results: dict[str, dict], out_dir, prefix: str = "") -> list[Path]:
    """One picture per benchmark of ``results`` (``{name: Report JSON}``): ``<prefix><name>.png``."""
    out = Path(out_dir)
    written = []
    for name, payload in results.items():
        if payload.get("rows"):
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
            written.append(kernel_plot(payload, out / f"{prefix}{safe}.png", name=payload.get("benchmark") or name))
    return written


def describe(paths, notes=()) -> str:
    """One line listing what was written and what was skipped."""
    text = "plots: " + (", ".join(os.fspath(p) for p in paths) if paths else "none")
    return text + "".join(f"; {note}" for note in notes)

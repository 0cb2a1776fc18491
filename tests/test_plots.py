"""jakiro.plots (``--plot``): the pictures are written and not empty, the accepted-length histogram
gets its data from the runs, and ``--plot`` without matplotlib fails before any model loads."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jakiro import cli, plots, pretrained
from jakiro.commands.evaluate import MethodStats
from jakiro.generate import GenerationResult

pytest.importorskip("matplotlib", reason="the plots extra (pip install 'jakiro[plots]') is not installed")

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    path = Path(path)
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def report(tuned: bool = True) -> dict:
    """A small bench-e2e report: two prompt sets, greedy, three methods."""
    results = []
    for dataset in ("mtbench", "humaneval"):
        for method, speed, hist in (("vanilla", 30.0, [90]), ("hf-generate", 16.0, [90]),
                                    ("jakiro-mixture", 37.5, [20, 15, 10, 5])):
            cycles = sum(hist)
            committed = sum((k + 1) * c for k, c in enumerate(hist))
            results.append(dict(dataset=dataset, temperature=0.0, prompts=2, method=method, tokens=96,
                                seconds=96 / speed, tokens_per_s=speed, tau=committed / cycles, cycles=cycles,
                                accept_hist=hist, speedup=speed / 30.0))
    tuning = [dict(total_tokens=n, verify_ms=30 + 2.0 * n, draft_ms=4.0, cost=(34 + 2.0 * n) / 1e3 / (n / 40) ** 0.3)
              for n in (4, 6, 8, 12, 16)] if tuned else []
    return dict(device="CPU (x86_64, 2 threads)", dtype="float32", total_tokens=6, total_tokens_auto=tuned,
                tuning=tuning, depth=3, tree_top_k=4, max_new_tokens=48, results=results)


def test_end_to_end_plots_are_written(tmp_path):
    written, notes = plots.e2e_plots(report(), tmp_path, prefix="bench_e2e")
    assert [p.name for p in written] == ["bench_e2e_throughput.png", "bench_e2e_accept_lengths.png",
                                         "bench_e2e_tree_size.png"]
    assert all(is_png(p) for p in written) and notes == []


def test_tree_size_plot_is_skipped_with_a_note_without_autotune(tmp_path):
    written, notes = plots.e2e_plots(report(tuned=False), tmp_path, prefix="demo")
    assert [p.name for p in written] == ["demo_throughput.png", "demo_accept_lengths.png"]
    assert len(notes) == 1 and "not autotuned" in notes[0]
    assert "no tree-size plot" in plots.describe(written, notes)


def test_accept_histogram_comes_from_the_generation_results():
    stats = MethodStats("jakiro")
    # Two calls: cycles accepting 0, 2, 2, 3 and (after the row ended: -1) nothing more; then 1, 0.
    stats.add(GenerationResult(torch.zeros(1, 9, dtype=torch.int64), torch.tensor([11]), 5,
                               torch.tensor([[0], [2], [2], [3], [-1]], dtype=torch.int32), {"total": 1.0}))
    stats.add(GenerationResult(torch.zeros(1, 4, dtype=torch.int64), torch.tensor([3]), 2,
                               torch.tensor([[1], [0]], dtype=torch.int32), {"total": 1.0}))
    assert stats.accept_hist == [2, 1, 2, 1]
    row = stats.summary()
    assert row["accept_hist"] == [2, 1, 2, 1] and row["cycles"] == 6
    assert stats.tau == pytest.approx(sum((k + 1) * c for k, c in enumerate(row["accept_hist"])) / 6)


def test_kernel_plot_from_report_rows(tmp_path):
    rows = []
    for case in ("rows=1", "rows=8", "rows=64"):
        for impl, us in (("jakiro", 3.0), ("F.rms_norm", 12.0), ("hf_module", 19.0)):
            rows.append(dict(case=case, impl=impl, median_us=us, p90_us=us * 1.1, min_us=us, calls=10))
    rows.append(dict(case="rows=512", impl="jakiro", median_us=40.0, p90_us=41.0, min_us=39.0, calls=10))
    payload = {"benchmark": "rms_norm", "environment": {"device": "cpu", "torch": "2"}, "rows": rows}
    assert is_png(plots.kernel_plot(payload, tmp_path / "rms_norm.png"))
    both = {"expert_mlp": dict(payload, benchmark="expert_mlp"), "grouped_gemm": dict(payload, benchmark="grouped_gemm"),
            "note": "not a benchmark"}
    written = plots.kernel_plots(plots.kernel_payloads(both), tmp_path / "all", prefix="cpu_")
    assert sorted(p.name for p in written) == ["cpu_expert_mlp.png", "cpu_grouped_gemm.png"]
    assert all(is_png(p) for p in written)


def test_run_all_plots_saved_results(tmp_path):
    rows = [dict(case=f"n={n}", impl=impl, median_us=float(n * k), p90_us=float(n * k), min_us=1.0, calls=3)
            for n in (1, 2) for impl, k in (("jakiro", 1), ("reference", 5))]
    saved = tmp_path / "cpu_tree_mask.json"
    saved.write_text(json.dumps({"benchmark": "tree_mask", "environment": {}, "rows": rows}))
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--plot", str(tmp_path / "out"),
                          "--from-json", str(saved)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert is_png(tmp_path / "out" / "cpu_tree_mask.png")


def _no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib -> ImportError


@pytest.mark.parametrize("command", ["bench-e2e", "demo"])
def test_plot_without_matplotlib_fails_before_any_model_loads(command, tmp_path, monkeypatch, capsys):
    _no_matplotlib(monkeypatch)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before --plot was checked")
    monkeypatch.setattr(pretrained, "load_target", refuse)
    monkeypatch.setattr(pretrained, "load_tokenizer", refuse)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--plot", str(tmp_path / "plots"), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'jakiro[plots]'" in err[0], err


def test_benchmark_plot_option_without_matplotlib_fails_at_once(monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import common
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    _no_matplotlib(monkeypatch)
    with pytest.raises(SystemExit, match=r"pip install 'jakiro\[plots\]'"):
        common.parser("x").parse_args(["--plot", "somewhere"])
    assert common.parser("x").parse_args([]).plot is None      # no --plot: no matplotlib needed


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from jakiro.testing import save_tiny_target_and_draft
    root = tmp_path_factory.mktemp("plots")
    save_tiny_target_and_draft(root)
    return root


def test_bench_e2e_plot_on_a_tiny_model(tiny_models, tmp_path, capsys):
    root = tiny_models
    code = cli.main(["bench-e2e", "--target", str(root / "target"), "--draft", str(root / "draft"),
                     "--methods", "vanilla,jakiro-mixture", "--datasets", "mtbench", "--limit", "1",
                     "--temperatures", "0", "--max-new-tokens", "8", "--depth", "2", "--tree-top-k", "3",
                     "--device", "cpu", "--dtype", "float32", "--draft-dtype", "target", "--no-progress",
                     "--plot", str(tmp_path / "plots"), "--json", str(tmp_path / "report.json")])
    assert code == 0
    err = capsys.readouterr().err
    names = ["bench_e2e_throughput.png", "bench_e2e_accept_lengths.png", "bench_e2e_tree_size.png"]
    for name in names:
        assert is_png(tmp_path / "plots" / name), name
        assert str(tmp_path / "plots" / name) in err
    saved = json.loads((tmp_path / "report.json").read_text())
    spec = next(r for r in saved["results"] if r["method"] == "jakiro-mixture")
    assert sum(spec["accept_hist"]) == spec["cycles"] > 0          # the histogram reached the report
    assert saved["tuning"] and saved["total_tokens_auto"]
    assert err.strip().splitlines()[-1].startswith("[jakiro] bench-e2e: ")   # the closing summary line

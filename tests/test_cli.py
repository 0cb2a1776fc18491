"""The `jakiro` command line: `generate` on a tiny model and tokenizer saved to disk; `demo`
and `bench-e2e` on the default target (SmolLM2-135M-Instruct) with the shipped drafts."""
import json
import subprocess
import sys

import pytest
import torch

from jakiro import cli
from jakiro.testing import save_tiny_target_and_draft


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, save_tiny_target_and_draft(root)


def test_cli_generate_streams_and_summarises(saved_models, capsys):
    root, target = saved_models
    code = cli.main(["generate", "--target", str(root / "target"), "--draft", str(root / "draft"),
                     "--prompt", "w5 w9 w13 w2", "--max-new-tokens", "6", "--depth", "2", "--tree-top-k", "3",
                     "--total-tokens", "8", "--device", "cpu", "--dtype", "float32"])
    assert code == 0
    out, err = capsys.readouterr()
    assert "tokens/s" in err and "mean accepted length tau" in err
    # The streamed text is the target's greedy continuation (same device and dtype as the CLI run:
    # a random tiny model's near-ties make bf16-on-GPU greedy differ from fp32-on-CPU greedy).
    prompt = torch.tensor([[7, 11, 15, 4]])
    expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6,
                               eos_token_id=1, pad_token_id=0)[0, 4:]
    words = [f"w{int(t) - 2}" for t in expected if int(t) != 1]
    assert out.split() == words


def test_cli_defaults_to_the_shipped_draft_which_needs_the_default_target(saved_models):
    root, _ = saved_models
    with pytest.raises(SystemExit, match="the target does not match this draft"):
        cli.main(["generate", "--target", str(root / "target"), "--prompt", "w1", "--device", "cpu"])
    assert cli.main(["generate", "--target", str(root / "target"), "--prompt", "w1", "--vanilla",
                     "--max-new-tokens", "3", "--device", "cpu"]) == 0


def test_an_untrained_draft_serves_any_target_exactly(saved_models, capsys):
    root, target = saved_models
    code = cli.main(["generate", "--target", str(root / "target"), "--draft", "untrained", "--prompt", "w5 w9 w13",
                     "--max-new-tokens", "6", "--depth", "2", "--tree-top-k", "3", "--total-tokens", "8",
                     "--device", "cpu", "--dtype", "float32"])
    assert code == 0
    out, _ = capsys.readouterr()
    prompt = torch.tensor([[7, 11, 15]])
    expected = target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6,
                               eos_token_id=1, pad_token_id=0)[0, 3:]
    assert out.split() == [f"w{int(t) - 2}" for t in expected if int(t) != 1]


def test_python_dash_m_entry_point(saved_models):
    root, _ = saved_models
    run = subprocess.run([sys.executable, "-m", "jakiro.cli", "generate", "--target", str(root / "target"),
                          "--vanilla", "--prompt", "w3 w4", "--max-new-tokens", "3", "--temperature", "1.0",
                          "--seed", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "tokens/s" in run.stderr


def test_help_lists_every_command():
    run = subprocess.run([sys.executable, "-m", "jakiro.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0
    for command in ("demo", "generate", "bench-e2e", "datagen", "train"):
        assert command in run.stdout


def test_demo_json_on_the_default_target(capsys):
    """`jakiro demo --json`: streams answers, checks them against vanilla, ends with the summary."""
    code = cli.main(["demo", "--json", "--questions", "2", "--max-new-tokens", "24", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "### writing:" in out and "### stem:" in out
    assert "greedy answers identical to vanilla decoding" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert {"vanilla_tok_s", "jakiro_tok_s", "speedup", "tau", "device"} <= set(summary)
    assert summary["questions"] == 2 and summary["vanilla_tok_s"] > 0 and summary["jakiro_tok_s"] > 0
    assert summary["tau"] > 1.0   # a trained draft: most cycles accept at least one drafted token


def test_bench_e2e_runs_every_method_and_writes_its_report(tmp_path, capsys):
    report_path, table_path = tmp_path / "report.json", tmp_path / "table.md"
    code = cli.main(["bench-e2e", "--limit", "1", "--max-new-tokens", "12", "--temperatures", "0,1",
                     "--total-tokens", "16", "--device", "cpu", "--no-progress", "--json", str(report_path),
                     "--markdown", str(table_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert report["total_tokens"] == 16 and not report["total_tokens_auto"]
    rows = {(r["dataset"], r["temperature"], r["method"]): r for r in report["results"]}
    assert len(rows) == 2 * 2 * 6   # jakiro-lookup too: lookup is on by default on a CPU
    for (dataset, temperature, method), row in rows.items():
        assert row["prompts"] == 1 and row["tokens"] > 0
        assert row["tau"] == 1.0 if method in ("vanilla", "hf-generate") else row["tau"] >= 1.0
    assert "jakiro-per_expert" in table_path.read_text() and "jakiro-lookup" in table_path.read_text()
    assert report["lookup"] == 5


def test_bench_e2e_rejects_unknown_choices():
    with pytest.raises(SystemExit, match="unknown --methods"):
        cli.main(["bench-e2e", "--methods", "vanilla,medusa"])
    with pytest.raises(SystemExit, match="unknown --datasets"):
        cli.main(["bench-e2e", "--datasets", "gsm8k"])

"""jakiro.progress: a bar on a terminal, a bounded number of plain lines in logs and CI, nothing when
off; every long command takes --no-progress and ends with a one-line summary."""
import io
import json
import time

import pytest

from jakiro import cli
from jakiro.progress import Progress, format_duration, mode_from_args, resolve_mode, stage, summary_line


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_mode_follows_the_terminal_and_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert resolve_mode(True, Terminal()) == "bar"
    assert resolve_mode("auto", io.StringIO()) == "lines"       # a log file or a pipe
    assert resolve_mode(False, Terminal()) == "off"
    assert resolve_mode("lines", Terminal()) == "lines"
    monkeypatch.setenv("CI", "true")
    assert resolve_mode(True, Terminal()) == "lines"
    with pytest.raises(ValueError, match="unknown progress mode"):
        resolve_mode("loud")


def test_no_progress_asks_for_lines():
    class Args:
        no_progress = True
    assert mode_from_args(Args()) == "lines"
    Args.no_progress = False
    assert mode_from_args(Args()) == "auto"


def test_quiet_lines_every_ten_percent():
    out, clock = io.StringIO(), Clock()
    with Progress(total=1000, desc="jakiro test", unit="item", mode="lines", stream=out, clock=clock) as bar:
        for _ in range(1000):
            clock.now += 0.01                      # 10 s in all: the time rule never fires
            bar.update(1)
            bar.set_postfix(loss=0.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 == bar.lines       # 10%, 20%, ..., 100%; none more at close
    assert lines[0].startswith("jakiro test: 100/1000 item (10%), 1.0 s, ETA 9.0 s")
    assert "loss=0.5" in lines[0]
    assert lines[-1].startswith("jakiro test: 1000/1000 item (100%), 10.0 s") and "ETA" not in lines[-1]


def test_quiet_lines_every_thirty_seconds_when_the_total_is_unknown():
    out, clock = io.StringIO(), Clock()
    bar = Progress(desc="jakiro test", unit="conv", mode="lines", stream=out, clock=clock)
    for _ in range(300):                           # 300 s of work, an update a second
        clock.now += 1.0
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10                        # one per 30 s; the last update fell on the 300 s line
    assert lines[0] == "jakiro test: 30 conv, 30.0 s, 1 conv/s"
    bar.close()                                    # closing twice prints nothing more
    assert len(out.getvalue().splitlines()) == 10


def test_line_count_is_bounded_for_any_number_of_updates():
    out, clock = io.StringIO(), Clock()
    with Progress(total=10 ** 6, mode="lines", stream=out, clock=clock) as bar:
        for _ in range(10 ** 5):
            clock.now += 0.001                     # 100 s: at most 3 lines from the time rule
            bar.update(10)
    assert len(out.getvalue().splitlines()) <= 10 + 3 + 1


def test_a_partial_run_ends_with_its_count_and_resume_starts_from_initial():
    out, clock = io.StringIO(), Clock()
    with Progress(total=100, initial=40, unit="step", mode="lines", stream=out, clock=clock) as bar:
        for _ in range(15):
            clock.now += 1.0
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == ["50/100 step", "55/100 step"]
    assert "ETA 50.0 s" in lines[0]                # 10 steps in 10 s, 50 to go


def test_off_prints_nothing_and_the_bar_draws_on_a_terminal(monkeypatch):
    out = io.StringIO()
    with Progress(total=10, mode=False, stream=out) as bar:
        for _ in range(10):
            bar.update(1)
        bar.write("hidden")
    assert out.getvalue() == ""
    monkeypatch.delenv("CI", raising=False)
    terminal = Terminal()
    with Progress(total=10, desc="jakiro bar", stream=terminal) as bar:
        assert bar.mode == "bar"
        bar.update(10)
    assert "jakiro bar" in terminal.getvalue() and "10/10" in terminal.getvalue()


def test_stage_prints_start_heartbeat_and_end():
    out = io.StringIO()
    with stage("[jakiro] converting x.gguf", done="[jakiro] converted x.gguf", still="[jakiro] converting",
               mode="lines", stream=out, every_seconds=0.05) as step:
        time.sleep(0.3)
        step.detail = "12.0 MB"
    lines = out.getvalue().splitlines()
    assert lines[0] == "[jakiro] converting x.gguf"
    assert any(line.startswith("[jakiro] converting: still running after") for line in lines[1:-1])
    assert lines[-1].startswith("[jakiro] converted x.gguf in ") and lines[-1].endswith("(12.0 MB)")
    assert step.seconds >= 0.3
    quiet = io.StringIO()
    with stage("x", done="y", mode="off", stream=quiet):
        pass
    assert quiet.getvalue() == ""
    failed = io.StringIO()
    with pytest.raises(RuntimeError):
        with stage("[jakiro] working", done="[jakiro] worked", mode="lines", stream=failed, every_seconds=0):
            raise RuntimeError("boom")
    assert failed.getvalue().splitlines() == ["[jakiro] working"]     # no "done" line after a failure


def test_summary_line_and_durations():
    assert format_duration(0.42) == "0.4 s" and format_duration(65) == "1m 05s" and format_duration(7500) == "2h 05m"
    assert summary_line("trained 3 steps", 1.25, "2.40 steps/s") == "[jakiro] trained 3 steps in 1.2 s; 2.40 steps/s"
    assert summary_line("wrote 2 shards", 0.5) == "[jakiro] wrote 2 shards in 0.5 s"


@pytest.mark.parametrize("argv", [
    ["datagen", "--data", "d.json", "--format", "sharegpt", "--out", "o"],
    ["train", "--data", "feats", "--out", "o"],
    ["bench-e2e"],
])
def test_every_long_command_accepts_no_progress(argv):
    args = cli._parser().parse_args(argv + ["--no-progress"])
    assert args.no_progress and mode_from_args(args) == "lines"


def test_datagen_and_train_report_in_lines_and_end_with_a_summary(tmp_path, capsys):
    from jakiro.testing import SMOLLM2_CHAT_TEMPLATE, make_chat_tokenizer, make_tiny_target
    target = make_tiny_target("llama", hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab=64, seed=2)
    target.save_pretrained(tmp_path / "target")
    make_chat_tokenizer(SMOLLM2_CHAT_TEMPLATE).save_pretrained(tmp_path / "target")
    records = [{"conversations": [{"from": "human", "value": "hello how is the weather"},
                                  {"from": "gpt", "value": "it is sunny today" + " rain" * i}]} for i in range(5)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    assert cli.main(["datagen", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "data.json"),
                     "--format", "sharegpt", "--out", str(tmp_path / "features"), "--limit", "5",
                     "--per-shard", "2", "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("jakiro datagen:")]
    assert 1 <= len(progress) <= 5 and progress[-1].startswith("jakiro datagen: 5/5 conv (100%)")
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith("[jakiro] wrote 5 conversations in 3 shards under") and "conversations/s" in last
    # A rerun resumes: it counts what it wrote itself, not the shards it found.
    (tmp_path / "features" / "shard_00002.safetensors").unlink()
    assert cli.main(["datagen", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "data.json"),
                     "--format", "sharegpt", "--out", str(tmp_path / "features"), "--limit", "5",
                     "--per-shard", "2", "--device", "cpu", "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[jakiro] wrote 1 conversations in 1 shards under") and \
        "(4 more in the 2 shards a previous run wrote)" in last, last
    assert cli.main(["train", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "features"),
                     "--out", str(tmp_path / "run"), "--steps", "4", "--batch-size", "2", "--device", "cpu",
                     "--no-progress"]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("jakiro train:")]
    assert 1 <= len(progress) <= 5 and progress[-1].startswith("jakiro train: 4/4 step (100%)")
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith("[jakiro] trained 4 steps in ") and "steps/s" in last and "draft saved under" in last

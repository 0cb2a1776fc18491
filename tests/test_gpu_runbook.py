"""The GPU runbook without a GPU: the model staging (scripts/stage_model.py: split, collect,
join, every byte checked) and scripts/gpu_runbook.sh (its options, its plan, and a short run of
the steps that need no GPU). docs/gpu-runbook.md says how they are used on the lent GPU."""
import gzip
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNBOOK = REPO / "scripts" / "gpu_runbook.sh"
spec = importlib.util.spec_from_file_location("stage_model", REPO / "scripts" / "stage_model.py")
stage_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage_model)
StageError = stage_model.StageError


def _model_file(path: Path, size: int = 300_000, seed: int = 0) -> bytes:
    """Bytes that compress a little, as a quantized model does: random, with repeated stretches."""
    rng = random.Random(seed)
    data = bytearray(rng.getrandbits(8) for _ in range(size))
    for at in range(0, size - 64, 997):
        data[at:at + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    return bytes(data)


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "stage_model.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("compress", ["gzip", "none"])
def test_split_and_join_are_byte_exact(tmp_path, compress):
    data = _model_file(tmp_path / "model.gguf")
    manifest = stage_model.split(tmp_path / "model.gguf", tmp_path / "parts", parts=3, compress=compress)
    parts = sorted((tmp_path / "parts").glob("part-*"))
    assert [p.name for p in parts] == ["part-1", "part-2", "part-3"]
    assert sum(p.stat().st_size for p in parts) == manifest["stream_size"]
    assert manifest["size"] == len(data) and manifest["compress"] == compress
    if compress == "gzip":
        assert manifest["stream_size"] < len(data)
        assert gzip.decompress(b"".join(p.read_bytes() for p in parts)) == data
    stage_model.join(tmp_path / "parts", tmp_path / "joined.gguf")
    assert (tmp_path / "joined.gguf").read_bytes() == data
    # The same file gives the same parts (no time stamp in the gzip header).
    again = stage_model.split(tmp_path / "model.gguf", tmp_path / "again", parts=3, compress=compress)
    assert [p["sha256"] for p in again["parts"]] == [p["sha256"] for p in manifest["parts"]]


def test_parts_fit_the_size_asked(tmp_path):
    _model_file(tmp_path / "model.gguf")
    manifest = stage_model.split(tmp_path / "model.gguf", tmp_path / "parts", max_part_bytes=70_000)
    sizes = [p["size"] for p in manifest["parts"]]
    assert len(sizes) >= 3 and max(sizes) <= 70_000 and max(sizes) - min(sizes) < len(sizes)   # near equal
    result = _cli("split", tmp_path / "model.gguf", tmp_path / "cli", "--parts", 2)
    assert result.returncode == 0, result.stderr
    assert _cli("join", tmp_path / "cli", tmp_path / "out.gguf").returncode == 0
    assert (tmp_path / "out.gguf").read_bytes() == (tmp_path / "model.gguf").read_bytes()


def test_a_damaged_part_is_refused_with_its_name(tmp_path):
    _model_file(tmp_path / "model.gguf")
    stage_model.split(tmp_path / "model.gguf", tmp_path / "parts", parts=3)
    part = tmp_path / "parts" / "part-2"
    data = bytearray(part.read_bytes())
    data[100] ^= 0x01                       # one bit
    part.write_bytes(bytes(data))
    with pytest.raises(StageError, match=r"part-2 \(part 2 of 3\) is damaged: .* carry it again"):
        stage_model.join(tmp_path / "parts", tmp_path / "joined.gguf")
    assert not (tmp_path / "joined.gguf").exists() and not (tmp_path / "joined.gguf.partial").exists()
    result = _cli("join", tmp_path / "parts", tmp_path / "joined.gguf")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert re.match(r"stage: .*part-2 \(part 2 of 3\) is damaged", result.stderr)
    part.write_bytes(bytes(data[:-10]))     # cut short
    with pytest.raises(StageError, match="part 2 of 3"):
        stage_model.join(tmp_path / "parts", tmp_path / "joined.gguf")


def test_a_missing_part_is_named(tmp_path):
    _model_file(tmp_path / "model.gguf")
    stage_model.split(tmp_path / "model.gguf", tmp_path / "parts", parts=3)
    (tmp_path / "parts" / "part-3").unlink()
    with pytest.raises(StageError, match="1 of 3 parts missing from .*: part-3"):
        stage_model.join(tmp_path / "parts", tmp_path / "joined.gguf")
    result = _cli("status", tmp_path / "parts")
    assert result.returncode == 3 and "2 of 3 parts; missing part-3" in result.stdout
    (tmp_path / "parts" / "manifest.json").unlink()
    with pytest.raises(StageError, match="manifest.json is missing"):
        stage_model.join(tmp_path / "parts", tmp_path / "joined.gguf")


def test_a_wrong_manifest_is_caught_after_joining(tmp_path):
    _model_file(tmp_path / "model.gguf")
    stage_model.split(tmp_path / "model.gguf", tmp_path / "parts", parts=2)
    manifest = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    manifest["sha256"] = "0" * 64
    (tmp_path / "parts" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StageError, match="expected .* bytes with sha256 0000"):
        stage_model.join(tmp_path / "parts", tmp_path / "joined.gguf")
    assert not (tmp_path / "joined.gguf").exists()


def _staged(tmp_path: Path, parts: int = 2) -> bytes:
    """A stage folder as prepare writes it, for a small file placed at site/pkg_model/model.gguf."""
    data = _model_file(tmp_path / "model.gguf")
    stage = tmp_path / "stage"
    stage_model.split(tmp_path / "model.gguf", stage / "parts", parts=parts,
                      install={"module": "pkg_model", "path": "model.gguf"})
    (stage / "common" / "site" / "pkg_model").mkdir(parents=True)
    (stage / "common" / "site" / "pkg_model" / "__init__.py").touch()
    (stage / "common" / "site" / "pkg_data").mkdir()
    (stage / "common" / "site" / "pkg_data" / "data.txt").write_text("prompts\n")
    shutil.copyfile(stage / "parts" / "manifest.json", stage / "common" / "manifest.json")
    return data


def test_parts_carried_in_separate_calls_are_gathered_then_joined(tmp_path, capsys):
    data = _staged(tmp_path)
    stage, stash = tmp_path / "stage", tmp_path / "stash"
    # Call 1 carries part 1 only: gathered, nothing joined yet.
    assert stage_model.install(stage, stash, only={1}) is None
    assert "still missing part-2" in capsys.readouterr().out
    assert (stash / "parts" / "part-1").is_file() and not (stash / "site").exists()
    # Call 2 carries part 2 only (part 1 stayed in the stash): joined and checked.
    (stage / "parts" / "part-1").unlink()
    site = stage_model.install(stage, stash)
    assert (site / "pkg_model" / "model.gguf").read_bytes() == data
    assert (site / "pkg_data" / "data.txt").read_text() == "prompts\n"
    assert "joined" in capsys.readouterr().out
    assert stage_model.install(stage, stash) == site          # a rerun: already joined and checked
    assert "already joined and checked" in capsys.readouterr().out
    result = _cli("install", "--stage", stage, "--stash", stash)
    assert result.returncode == 0 and result.stdout.strip().endswith(f"site: {site.resolve()}")


def test_collect_refuses_a_damaged_part_and_keeps_nothing_of_it(tmp_path):
    _staged(tmp_path)
    stage, stash = tmp_path / "stage", tmp_path / "stash"
    (stage / "parts" / "part-2").write_bytes(b"garbage")
    with pytest.raises(StageError, match="part-2 .* is damaged"):
        stage_model.collect(stage / "parts", stash / "parts")
    assert not (stash / "parts" / "part-2").exists()
    result = _cli("install", "--stage", stage, "--stash", stash)
    assert result.returncode == 1 and "is damaged" in result.stderr


def _git_repo(path: Path) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    (path / "tracked.txt").write_bytes(b"x" * 1000)
    subprocess.run(["git", "-C", str(path), "add", "tracked.txt"], check=True)
    return path


def test_budget_counts_what_travels(tmp_path, capsys):
    repo = _git_repo(tmp_path / "repo")
    (repo / "big_untracked").mkdir()
    (repo / "big_untracked" / "blob").write_bytes(b"y" * 2_000_000)
    (repo / ".stage" / "parts").mkdir(parents=True)
    (repo / ".stage" / "parts" / "part-1").write_bytes(b"z" * 5000)
    # .stage is not ignored yet: it would travel in every call, so it cannot be carried.
    with pytest.raises(StageError, match="not ignored by git"):
        stage_model.budget([".stage/parts/part-1"], repo)
    stage_model.ensure_ignored(repo, ".stage")
    stage_model.ensure_ignored(repo, ".stage")           # once only
    exclude = (repo / ".git" / "info" / "exclude").read_text()
    assert exclude.count("/.stage/") == 1
    capsys.readouterr()
    left = stage_model.budget([".stage/parts/part-1"], repo, limit=3_000_000)
    assert left == 3_000_000 - 1000 - 2_000_000 - 5000
    out = capsys.readouterr().out
    assert "big_untracked (2.0 MB)" in out and "ignore it" in out
    assert stage_model.budget([], repo, limit=1_500_000, quiet=True) < 0
    with pytest.raises(StageError, match="does not exist"):
        stage_model.budget([".stage/parts/part-9"], repo)


def _runbook(*args, env=None, timeout=300):
    environment = dict(os.environ, **(env or {}))
    environment.pop("OUT", None)
    return subprocess.run(["bash", str(RUNBOOK), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=environment, timeout=timeout)


def test_runbook_parses_and_plans():
    assert subprocess.run(["bash", "-n", str(RUNBOOK)]).returncode == 0
    result = _runbook("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: bash scripts/gpu_runbook.sh")
    for device in ("cuda", "cpu"):
        result = _runbook("--plan", "--device", device)
        assert result.returncode == 0, result.stderr
        for step in ("env", "stage", "build", "tests", "bench", "e2e", "e2e_compile"):
            assert re.search(rf"^  {step}: ", result.stdout, re.M), (step, result.stdout)
    plan = _runbook("--plan", "--steps", "stage,e2e").stdout
    assert "  build: not selected" in plan and "bench-e2e --device cuda --target smollm2" in plan
    assert "TORCH_CUDA_ARCH_LIST=9.0" in _runbook("--plan").stdout
    for bad in (["--device", "gpu"], ["--steps", "env,nope"], ["--deadline", "soon"], ["--frobnicate"]):
        result = _runbook(*bad)
        assert result.returncode == 2 and "gpu_runbook:" in result.stderr, bad


def _summary(out: Path) -> dict:
    names = sorted(p.name for p in out.iterdir())
    # What the device tool brings back: at most 8 files, named in letters, digits, '.', '_', '-'.
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.md").read_text().startswith("# jakiro GPU runbook")
    return {s["step"]: s for s in summary["steps"]}


def _stage_env(tmp_path: Path) -> dict:
    """The runbook's environment for a staging rehearsal: parts under tmp/stage, the stash under tmp/stash."""
    return {"JAKIRO_STAGE_SOURCE": str(tmp_path / "stage"), "JAKIRO_STAGE_DIR": str(tmp_path / "stash"),
            "PYTHON": sys.executable}


def test_runbook_cpu_rehearsal_of_the_staging(tmp_path):
    data = _staged(tmp_path)
    env = _stage_env(tmp_path)
    result = _runbook("--device", "cpu", "--steps", "stage", "--out", tmp_path / "out", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = _summary(tmp_path / "out")
    assert steps["stage"]["status"] == "OK" and "GGUF joined and checked" in steps["stage"]["note"]
    assert (tmp_path / "stash" / "site" / "pkg_model" / "model.gguf").read_bytes() == data
    assert "logs.tar.gz" in os.listdir(tmp_path / "out")


def test_runbook_on_cuda_reports_what_is_missing(tmp_path):
    # The first GPU call carries part 1 only: the stage step reports the missing part, not a failure.
    _staged(tmp_path)
    (tmp_path / "stage" / "parts" / "part-2").unlink()
    env = _stage_env(tmp_path)
    result = _runbook("--device", "cuda", "--steps", "stage", "--out", tmp_path / "out", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = _summary(tmp_path / "out")
    assert steps["stage"]["status"] == "PARTIAL" and "part-2" in steps["stage"]["note"]


def test_runbook_skips_what_the_deadline_leaves_no_time_for(tmp_path):
    result = _runbook("--device", "cpu", "--steps", "env,bench", "--deadline", "1", "--out", tmp_path / "out",
                      env={"PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    steps = _summary(tmp_path / "out")
    assert [s["status"] for s in steps.values()] == ["SKIPPED", "SKIPPED"]
    assert all(s["note"].startswith("deadline:") for s in steps.values())

"""The linear calibration: which CPU layers run jakiro's kernel and which keep F.linear."""
import json

import pytest
import torch
from torch import nn

from jakiro import calibration
from jakiro.cpu_routing import _LinearForward, cpu_routes, route_kind


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAKIRO_CACHE", str(tmp_path))
    monkeypatch.delenv("JAKIRO_LINEAR_KERNEL", raising=False)
    monkeypatch.delenv("JAKIRO_CALIBRATE", raising=False)
    calibration.forget()
    yield tmp_path / calibration.FILE_NAME
    calibration.forget()


def fake_timing(monkeypatch, winner, log):
    """A measure() that makes ``winner`` ("jakiro" or "aten") twice as fast, logging each problem."""
    def measure(problems, repeats=calibration.REPEATS):
        log.extend((tuple(w.shape[0] for w in weights), rows) for weights, rows in problems)
        return [(1e-4, 2e-4) if winner == "jakiro" else (2e-4, 1e-4) for _ in problems]
    monkeypatch.setattr(calibration, "measure", measure)


def stack():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.Linear(64, 96))


def linear_routes(model, policy):
    return [route for route in cpu_routes([model], policy) if route_kind(route) == "linear"]


@pytest.mark.parametrize("policy", [calibration.DRAFT, calibration.TARGET], ids=lambda p: p.name)
def test_aten_winning_routes_no_layer_and_jakiro_winning_routes_all(cache, monkeypatch, policy):
    monkeypatch.setenv("JAKIRO_CALIBRATE", "all")
    model, log = stack(), []
    fake_timing(monkeypatch, "aten", log)
    assert linear_routes(model, policy) == []
    calibration.forget()
    cache.unlink()
    fake_timing(monkeypatch, "jakiro", log)
    routes = linear_routes(model, policy)
    assert [route[0] for route in routes] == [model[0], model[2], model[3]]


def test_cache_is_written_once_and_reused(cache, monkeypatch):
    model, log = stack(), []
    fake_timing(monkeypatch, "jakiro", log)
    cpu_routes([model], calibration.DRAFT)
    # Two shape classes (96x64 twice, 64x96 once), every draft row count, timed in one call.
    assert sorted(set(log)) == sorted({(shape, m) for shape in ((96, 96), (64,)) for m in calibration.DRAFT_ROWS})
    data = json.loads(cache.read_text())
    (key, entry), = data["machines"].items()
    assert key == calibration.machine_key()
    assert len(entry["linear"]) == 2 * len(calibration.DRAFT_ROWS)
    written = cache.stat().st_mtime_ns
    calibration.forget()                        # a new process: reads the file, measures nothing
    count = len(log)
    cpu_routes([model], calibration.DRAFT)
    assert len(log) == count and cache.stat().st_mtime_ns == written


def test_cache_is_keyed_by_cpu(cache, monkeypatch):
    model, log = stack(), []
    fake_timing(monkeypatch, "jakiro", log)
    cpu_routes([model], calibration.DRAFT)
    count = len(log)
    monkeypatch.setattr(calibration, "_cpu_model_and_flags", lambda: ("Another CPU", ["avx2"]))
    calibration.forget()
    cpu_routes([model], calibration.DRAFT)
    assert len(log) == 2 * count                # another machine: measured again
    data = json.loads(cache.read_text())
    assert len(data["machines"]) == 2
    assert any(key.startswith("Another CPU [avx2] torch ") for key in data["machines"])


def test_draft_choice_per_row_count(cache, monkeypatch):
    def measure(problems, repeats=calibration.REPEATS):
        return [(1e-4, 2e-4) if rows <= 4 else (2e-4, 1e-4) for _, rows in problems]
    monkeypatch.setattr(calibration, "measure", measure)
    layer = nn.Linear(32, 48)
    (route,) = linear_routes(layer, calibration.DRAFT)
    calls = []
    monkeypatch.setattr(torch.ops.jakiro, "linear", lambda x, w, b: calls.append(x.shape[0]) or x @ w.T + b,
                        raising=False)
    forward = route[2]
    assert isinstance(forward, _LinearForward)
    for rows in (1, 3, 4, 5, 16, 200):
        torch.testing.assert_close(forward(torch.randn(rows, 32)).shape, torch.Size([rows, 48]))
    assert calls == [1, 3, 4]


def test_target_has_one_choice_for_every_row_count(cache, monkeypatch):
    # jakiro faster at verify sizes but slower in the sum: the whole layer keeps F.linear.
    monkeypatch.setenv("JAKIRO_CALIBRATE", "all")

    def measure(problems, repeats=calibration.REPEATS):
        return [(1e-3, 1e-4) if rows == 1 else (1e-4, 1.2e-4) for _, rows in problems]
    monkeypatch.setattr(calibration, "measure", measure)
    assert linear_routes(nn.Linear(32, 48), calibration.TARGET) == []


def test_target_keeps_the_kernel_unless_asked(cache, monkeypatch):
    log = []
    fake_timing(monkeypatch, "aten", log)
    assert len(linear_routes(stack(), calibration.TARGET)) == 3
    assert log == []


@pytest.mark.parametrize("env", [("JAKIRO_LINEAR_KERNEL", "avx2"), ("JAKIRO_LINEAR_KERNEL", "aten"),
                                 ("JAKIRO_CALIBRATE", "0")])
def test_environment_overrides_calibration(cache, monkeypatch, env):
    monkeypatch.setenv("JAKIRO_CALIBRATE", "all")
    monkeypatch.setenv(*env)
    log = []
    fake_timing(monkeypatch, "aten", log)
    for policy in (calibration.DRAFT, calibration.TARGET):
        assert len(linear_routes(stack(), policy)) == 3
    assert log == [] and not cache.exists()


def test_bad_calibrate_value_is_an_error(cache, monkeypatch):
    monkeypatch.setenv("JAKIRO_CALIBRATE", "sometimes")
    with pytest.raises(ValueError, match="JAKIRO_CALIBRATE"):
        calibration.mode()


def test_real_calibration_is_short_and_bounded(cache, monkeypatch):
    # The real timing, counted: every class and row count in one measure() call, at most
    # MAX_TIMED_MATRICES matrices each, at most REPEATS passes; a 262k-row head cut to the byte budget.
    head = nn.Linear(64, 262144, bias=False)
    model = nn.ModuleList([nn.Linear(64, 64) for _ in range(5)] + [head])
    calls, real = [], calibration.measure

    def counted(problems, repeats=calibration.REPEATS):
        calls.append([(len(weights), sum(w.numel() * w.element_size() for w in weights), rows)
                      for weights, rows in problems])
        return real(problems, repeats)
    monkeypatch.setattr(calibration, "measure", counted)
    monkeypatch.setattr(calibration, "CALIBRATION_BUDGET_S", 0.5)
    cpu_routes([model], calibration.DRAFT)
    (problems,) = calls
    assert len(problems) == 2 * len(calibration.DRAFT_ROWS)
    assert all(count <= calibration.MAX_TIMED_MATRICES and size <= calibration.MAX_TIMED_BYTES
               for count, size, _ in problems)
    data = json.loads(cache.read_text())
    entries = next(iter(data["machines"].values()))["linear"]
    assert all(e["jakiro_us"] > 0 and e["aten_us"] > 0 for e in entries.values())
    assert "float32 262144x64 rows=1" in entries

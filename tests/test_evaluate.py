"""jakiro.autotune (total_tokens by timing) and jakiro.commands.evaluate (side-by-side runs, lossless check)."""
import pytest
import torch

import jakiro
from jakiro.autotune import CANDIDATES, choose_total_tokens, expected_gain, time_verify_all
from jakiro.commands.evaluate import LosslessError, MethodStats, markdown_table, run_side_by_side
from jakiro.target import TargetModel
from jakiro.testing import make_prompts, make_target_and_draft, single_thread


@pytest.fixture(scope="module")
def rigged():
    with single_thread():
        target, draft = make_target_and_draft("llama", "jakiro", "cpu", rigged=True)
    return target, draft


def test_gain_curve_follows_the_authors_table():
    # ea_model.py: times at 40/48/50/56/60 tokens are divided by 1/1.05/1.07/1.10/1.13.
    for tokens, divisor in ((40, 1.0), (48, 1.05), (50, 1.07), (56, 1.10), (60, 1.13)):
        assert expected_gain(tokens) == pytest.approx(divisor, rel=0.01)


def test_choose_total_tokens_returns_the_cheapest_timed_candidate(rigged):
    target, draft = rigged
    with single_thread():
        timed = time_verify_all(TargetModel(target), [8, 4], context=16, rounds=1)
        assert timed.keys() == {8, 4} and all(seconds > 0 for seconds in timed.values())
        best, table = choose_total_tokens(target, draft, depth=2, top_k=3)
    # depth 2, top_k 3: a tree holds at most 3 + 2 * 9 + 1 = 22 nodes.
    assert [row["total_tokens"] for row in table] == [n for n in CANDIDATES if n <= 22]
    assert best == min(table, key=lambda row: row["cost"])["total_tokens"]
    for row in table:
        assert row["cost"] == pytest.approx((row["verify_ms"] + row["draft_ms"]) / 1e3 / expected_gain(
            row["total_tokens"]))
    with pytest.raises(ValueError, match="no candidate fits"):
        choose_total_tokens(target, draft, depth=1, top_k=1, candidates=(8,))


def _methods(target, draft):
    generator = jakiro.SpeculativeGenerator(target, draft, depth=3, top_k=4, total_tokens=16)
    return {"vanilla": lambda ids, **o: jakiro.vanilla_generate(target, ids, **o),
            "jakiro": lambda ids, **o: generator.generate(ids, **o)}


def test_side_by_side_counts_tokens_and_tau_and_checks_greedy(rigged):
    target, draft = rigged
    _, _, rows = make_prompts(3, 256, 4, 9, torch.Generator().manual_seed(0))
    seen = []
    with single_thread():
        vanilla, spec = run_side_by_side(_methods(target, draft), rows, max_new_tokens=12,
                                         on_prompt=lambda i, name, result: seen.append((i, name)))
    assert seen == [(i, name) for i in range(3) for name in ("vanilla", "jakiro")]
    assert vanilla.new_tokens == spec.new_tokens == 36 and vanilla.outputs == spec.outputs
    assert vanilla.tau == 1.0 and vanilla.cycles == 3 * 11          # the prefill gives the first token
    assert spec.tau > 2.0 and spec.cycles < vanilla.cycles
    summary = spec.summary(vanilla)
    assert summary["speedup"] == pytest.approx(spec.tokens_per_s / vanilla.tokens_per_s, rel=1e-3)
    assert "| jakiro |" in markdown_table([summary], ["method", "tau"])


def test_a_method_that_changes_the_greedy_output_is_caught(rigged):
    target, draft = rigged
    methods = _methods(target, draft)
    honest = methods["jakiro"]

    def corrupted(ids, **options):
        result = honest(ids, **options)
        result.sequences[0, -1] = (result.sequences[0, -1] + 1) % 256
        return result
    methods["jakiro"] = corrupted
    _, _, rows = make_prompts(1, 256, 4, 9, torch.Generator().manual_seed(1))
    with single_thread(), pytest.raises(LosslessError, match="jakiro: greedy output differs from vanilla"):
        run_side_by_side(methods, rows, max_new_tokens=6)
    # Sampling runs are not compared token for token (they are tested statistically elsewhere).
    with single_thread():
        run_side_by_side(methods, rows, max_new_tokens=6, temperature=1.0, warmup=False)


def test_method_stats_empty_is_safe():
    stats = MethodStats("x")
    assert stats.tau == 0.0 and stats.tokens_per_s == 0.0
    with pytest.raises(ValueError, match="no methods"):
        run_side_by_side({}, [], max_new_tokens=1)

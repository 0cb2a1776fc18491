"""Compiled decoding cycles (``compile=...``, jakiro/compiled.py): the cycle compiles as one graph
(``fullgraph=True``: a graph break fails the test), gives eager's tokens (greedy, float32) and,
for the same uniforms, eager's samples; a cycle synchronises a CUDA device at most once (the
``done`` flag, outside the graph); on CUDA, graph capture and replay equal eager.

Most checks compile with Dynamo's ``eager`` / ``aot_eager`` backends (seconds: the same trace and
the same graph as Inductor's input); one test runs Inductor itself on a one-layer model (the
file's slowest test: tens of seconds cold on a slow 2-core CPU, a few with Inductor's on-disk
cache warm).
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

import jakiro
from jakiro import compiled
from jakiro.generate import SpeculativeGenerator, _Decoding, vanilla_generate
from jakiro.testing import make_prompts, make_target_and_draft, make_tiny_target, single_thread

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _runs(gen_eager, gen_compiled, ids, mask, max_new_tokens=12, **options):
    """(eager, compiled) results of the same call, greedy and sampled (same seeded generator)."""
    pairs = []
    for temperature in (0.0, 1.0):
        results = [g.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                              generator=torch.Generator().manual_seed(7), **options)
                   for g in (gen_eager, gen_compiled)]
        pairs.append(results)
    return pairs


# (draft kind, draft overrides, (depth, top_k, total_tokens), lookup)
CASES = [
    ("jakiro", {"feature_layers": None}, (3, 4, 16), 0),
    ("jakiro", {"candidate_mode": "per_expert", "feature_layers": [0, 1]}, (2, 4, 10), 0),  # multi-layer features
    ("jakiro", {"feature_layers": None}, (1, 4, 12), 3),    # CEPD straight from the context pass; lookup
]


@pytest.mark.parametrize("kind,overrides,tree,lookup", CASES, ids=lambda c: str(c))
def test_compiled_cycle_is_one_graph_and_equals_eager(kind, overrides, tree, lookup):
    target, draft = make_target_and_draft("llama", kind, "cpu", rigged=True, seed=3, **overrides)
    depth, top_k, total = tree
    shape = dict(depth=depth, top_k=top_k, total_tokens=total, lookup=lookup)
    eager = SpeculativeGenerator(target, draft, **shape)
    traced = SpeculativeGenerator(target, draft, **shape, compile="eager")
    ids, mask, _ = make_prompts(3, 256, 2, 7, torch.Generator().manual_seed(30))
    for e, c in _runs(eager, traced, ids, mask, eos_token_id=5, min_new_tokens=2):
        assert torch.equal(e.sequences, c.sequences)
        assert torch.equal(e.accept_lengths, c.accept_lengths)
        assert e.cycles == c.cycles and c.timings["cycle"] > 0 and c.timings["target"] == 0


def test_compiled_vanilla_equals_eager():
    target = make_tiny_target("qwen2", seed=4)
    ids, mask, _ = make_prompts(2, 256, 2, 7, torch.Generator().manual_seed(40))
    for temperature in (0.0, 0.8):
        e, c = (vanilla_generate(target, ids, mask, max_new_tokens=10, temperature=temperature, top_k=20,
                                 generator=torch.Generator().manual_seed(8), compile=backend)
                for backend in (False, "aot_eager"))
        assert torch.equal(e.sequences, c.sequences)


def test_one_graph_per_shape_not_per_prompt():
    """Prompts of other lengths reuse the graph (the cache capacity is bucketed, and so is the
    prompt a lookup reads; the context is copied to fixed strides); a call with a streamer runs
    eager."""
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", seed=5)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for lookup in (0, 3):
        graphs.clear()
        gen = SpeculativeGenerator(target, draft, depth=2, top_k=3, total_tokens=8, lookup=lookup, compile=counting)
        for seed, longest in ((50, 5), (51, 9), (52, 30)):
            ids, mask, _ = make_prompts(2, 256, 2, longest, torch.Generator().manual_seed(seed))
            gen.generate(ids, mask, max_new_tokens=8)
        assert len(graphs) == 1, lookup

    class Streamer:
        def put(self, value):
            pass

        def end(self):
            pass

    result = gen.generate(ids[:1], mask[:1], max_new_tokens=8, streamer=Streamer())
    assert len(graphs) == 1 and "cycle" not in result.timings


# ---------------------------------------------------------------------------------------------
# What would synchronise a CUDA device, per cycle.

_INDEX_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default)


def _syncing(func, args, kwargs) -> str | None:
    """The kind of CUDA synchronisation ``func(*args)`` is (None: none)."""
    if func is aten._local_scalar_dense.default:
        return "host read"
    if func in (aten.nonzero.default, aten.masked_select.default):
        return "nonzero"
    if func in _INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                  for i in args[1]):
        return "boolean index"
    if func is aten._to_copy.default and "device" in kwargs and kwargs["device"] is not None \
            and torch.device(kwargs["device"]) != args[0].device and not kwargs.get("non_blocking", False):
        return "device copy"
    if func is aten.copy_.default and args[0].device != args[1].device and not (len(args) > 2 and args[2]):
        return "device copy"
    return None


class _Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _syncing(func, args, kwargs or {})
        if kind is not None:
            self.seen.append((kind, str(func)))
        return func(*args, **(kwargs or {}))


def _count_per_cycle(monkeypatch, owner, name):
    """Wraps ``owner.name`` (a cycle) and ``_Decoding.finished`` so that each runs under a
    :class:`_Syncs` mode; returns ``(cycle syncs, done-flag syncs, cycles)`` lists."""
    record = {"cycle": [], "done": []}
    original, finished = getattr(owner, name), _Decoding.finished

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            with _Syncs() as mode:
                out = fn(*args, **kwargs)
            record[kind].append(mode.seen)
            return out
        return wrapper

    monkeypatch.setattr(owner, name, counted("cycle", original))
    monkeypatch.setattr(_Decoding, "finished", counted("done", finished))
    return record


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_speculative_cycle_synchronises_at_most_once(monkeypatch, temperature):
    """The cycle function (eager: what the graph is traced from) has no host read, nonzero,
    boolean indexing or blocking device copy; the ``done`` flag is the cycle's one host read."""
    import jakiro.generate as generate
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", rigged=True, seed=6)
    gen = SpeculativeGenerator(target, draft, depth=3, top_k=4, total_tokens=16)
    record = _count_per_cycle(monkeypatch, generate.SpeculativeGenerator, "_cycle")
    ids, mask, _ = make_prompts(2, 256, 2, 7, torch.Generator().manual_seed(60))
    result = gen.generate(ids, mask, max_new_tokens=16, temperature=temperature, eos_token_id=3, min_new_tokens=1,
                          generator=torch.Generator().manual_seed(1))
    assert result.cycles == len(record["cycle"]) > 1
    assert all(seen == [] for seen in record["cycle"]), record["cycle"]
    assert all(len(seen) == 1 and seen[0][0] == "host read" for seen in record["done"]), record["done"]
    assert len(record["done"]) == result.cycles + 1      # the last read ends the loop


def test_a_vanilla_step_synchronises_at_most_once(monkeypatch):
    import jakiro.generate as generate
    target = make_tiny_target("llama", seed=7)
    record = _count_per_cycle(monkeypatch, generate, "_vanilla_cycle")
    ids, mask, _ = make_prompts(2, 256, 2, 7, torch.Generator().manual_seed(70))
    result = vanilla_generate(target, ids, mask, max_new_tokens=6)
    assert result.cycles == len(record["cycle"]) == 5           # the first token comes with the prefill
    assert all(seen == [] for seen in record["cycle"])
    assert all(len(seen) == 1 for seen in record["done"])


def test_the_compiled_graph_holds_no_synchronising_op():
    """The ATen graph the compiled cycle runs (after AOTAutograd): no ``_local_scalar_dense``,
    ``nonzero``, boolean indexing or device copy."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    recording = aot_autograd(fw_compiler=keep)
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", seed=8)
    gen = SpeculativeGenerator(target, draft, depth=2, top_k=3, total_tokens=8, compile=recording)
    ids, mask, _ = make_prompts(2, 256, 2, 7, torch.Generator().manual_seed(80))
    gen.generate(ids, mask, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(2))
    vanilla_generate(target, ids, mask, max_new_tokens=4, compile=recording)
    assert len(graphs) == 2
    for gm in graphs:
        ops = [node.target for node in gm.graph.nodes if node.op == "call_function"]
        assert aten._local_scalar_dense.default not in ops and aten.nonzero.default not in ops
        assert not any(node.op == "call_function" and node.target in _INDEX_OPS
                       and any(getattr(i, "meta", {}).get("val") is not None and i.meta["val"].dtype == torch.bool
                               for i in node.args[1] if isinstance(i, torch.fx.Node))
                       for node in gm.graph.nodes)
        assert any(op is torch.ops.jakiro.tree_attention.default for op in ops)


# ---------------------------------------------------------------------------------------------
# Inductor on the CPU, and CUDA graphs.

def test_inductor_cycle_equals_eager():
    """The real thing (``compile=True``: Inductor) on a one-layer model and a small tree, greedy.
    Each more graph would cost tens of seconds here: sampled runs and vanilla steps are checked
    with ``aot_eager`` above (the graph Inductor receives), and with Inductor on SmolLM2 by
    benchmarks/compile_cycle.py (every compiled output must equal eager's)."""
    target = make_tiny_target("llama", layers=1, seed=9, residual_scale=0.05)
    torch.manual_seed(10)
    draft = jakiro.JakiroDraft.from_target(target, feature_layers=None)
    eager = SpeculativeGenerator(target, draft, depth=1, top_k=3, total_tokens=6)
    inductor = SpeculativeGenerator(target, draft, depth=1, top_k=3, total_tokens=6, compile=True)
    ids, mask, _ = make_prompts(2, 256, 2, 6, torch.Generator().manual_seed(90))
    e, c = (g.generate(ids, mask, max_new_tokens=10) for g in (eager, inductor))
    assert torch.equal(e.sequences, c.sequences) and c.cycles == e.cycles


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay_equal_eager():
    target, draft = make_target_and_draft("llama", "jakiro", "cuda", rigged=True, seed=11)
    eager = SpeculativeGenerator(target, draft, depth=3, top_k=4, total_tokens=16)
    graphed = SpeculativeGenerator(target, draft, depth=3, top_k=4, total_tokens=16, compile=True)
    ids, mask, _ = make_prompts(3, 256, 2, 9, torch.Generator().manual_seed(100))
    ids, mask = ids.cuda(), mask.cuda()
    for e, c in _runs(eager, graphed, ids, mask, max_new_tokens=24, eos_token_id=5):
        assert torch.equal(e.sequences, c.sequences)
        assert c.cycles >= 3                                    # warm-up, capture, replays
    v = [vanilla_generate(target, ids, mask, max_new_tokens=12, compile=flag).sequences for flag in (False, True)]
    assert torch.equal(v[0], v[1])


def test_compile_argument_is_checked():
    target, draft = make_target_and_draft("llama", "jakiro", "cpu", seed=12)
    with pytest.raises(ValueError, match="compile must be"):
        SpeculativeGenerator(target, draft, depth=2, top_k=3, total_tokens=8, compile="no-such-backend")
    with pytest.raises(ValueError, match="compile must be"):
        vanilla_generate(target, torch.tensor([[1, 2]]), max_new_tokens=2, compile=3)
    assert compiled.bucket(300, make_tiny_target("llama", max_positions=1024), None) == 512
    assert compiled.bucket(1000, make_tiny_target("llama", max_positions=1024), None) == 1024


def test_commands_take_compile():
    from jakiro.cli import _parser
    for command in ("generate", "bench-e2e"):
        extra = ["--prompt", "hi"] if command == "generate" else []
        assert _parser().parse_args([command, "--compile", *extra]).compile
        assert not _parser().parse_args([command, *extra]).compile
        help_text = next(action.help for action in _parser()._subparsers._group_actions[0].choices[command]._actions
                         if "--compile" in action.option_strings)
        assert "fullgraph" in help_text and "CUDA graph" in help_text

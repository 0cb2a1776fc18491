"""Every op against a grid of bad inputs: each must raise a Python exception, never crash the
process with a signal or hang. The grid runs in a child process (restarted after the case
that killed it, so one crash does not hide the rest); a meta tensor mixed into a real call
is checked in-process too, for every op and every tensor argument."""
import os
import subprocess
import sys
import time

import pytest
import torch

import jakiro  # noqa: F401  (loads the ops)
from jakiro import ops

HERE = os.path.abspath(__file__)
GRID_SECONDS = 60       # the whole grid, restarts included (about 5 s here)


def good_args(device="cpu"):
    """name -> (op, keyword arguments) that the op accepts."""
    gen = torch.Generator().manual_seed(0)
    chain = torch.tensor([[-1, 0, 1, 1], [-1, 0, 0, 2]], dtype=torch.int32)
    tokens = torch.randint(0, 11, (2, 4), generator=gen)
    logits = torch.randn(2, 4, 11, generator=gen)
    kv = torch.randn(2, 2, 2, 1, 12, 4, generator=gen)
    args = {
        "build_tree_mask": (ops.build_tree_mask, dict(parents=chain)),
        "tree_attention": (ops.tree_attention, dict(
            q=torch.randn(2, 2, 4, 64, generator=gen), k_cache=torch.randn(2, 1, 9, 64, generator=gen),
            v_cache=torch.randn(2, 1, 9, 64, generator=gen), cache_seqlens=torch.tensor([6, 9], dtype=torch.int32),
            tree_mask=torch.full((2, 4, 1), -1, dtype=torch.int32), tree_len=4)),
        "verify_greedy": (ops.verify_greedy, dict(tokens=tokens, parents=chain, logits=logits)),
        "verify_sampling": (ops.verify_sampling, dict(
            tokens=tokens, parents=chain, logits=logits, temperature=torch.tensor([1.0, 0.7]),
            top_p=torch.tensor([1.0, 0.9]), top_k=torch.tensor([0, 3], dtype=torch.int32),
            draft_probs=torch.softmax(torch.randn(2, 4, 11, generator=gen), -1),
            uniforms=torch.rand(2, 4, 2, generator=gen))),
        "compact_kv": (ops.compact_kv, dict(kv=kv, prefix_len=torch.tensor([2, 4], dtype=torch.int32),
                                            path=torch.tensor([[0, 2, 3, -1], [0, 1, -1, -1]], dtype=torch.int32),
                                            accept_len=torch.tensor([2, 1], dtype=torch.int32))),
        "expert_mlp": (ops.expert_mlp, dict(x=torch.randn(3, 8, generator=gen), w_gate_up=torch.randn(2, 12, 8, generator=gen),
                                            w_down=torch.randn(2, 8, 6, generator=gen), coeff=torch.rand(3, 2, 2, generator=gen))),
        "grouped_gemm": (ops.grouped_gemm, dict(x=torch.randn(5, 8, generator=gen), w=torch.randn(2, 6, 8, generator=gen),
                                                expert_offsets=torch.tensor([0, 2, 5], dtype=torch.int32))),
        "linear": (ops.linear, dict(x=torch.randn(3, 8, generator=gen), weight=torch.randn(6, 8, generator=gen),
                                    bias=torch.randn(6, generator=gen))),
        "rms_norm": (ops.rms_norm, dict(x=torch.randn(3, 8, generator=gen), weight=torch.rand(8, generator=gen), eps=1e-6)),
        "rotary_embedding": (ops.rotary_embedding, dict(
            q=torch.randn(1, 2, 3, 8, generator=gen), k=torch.randn(1, 1, 3, 8, generator=gen),
            cos=torch.randn(1, 3, 8, generator=gen), sin=torch.randn(1, 3, 8, generator=gen))),
    }
    return {name: (op, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
            for name, (op, kw) in args.items()}


def _set(args, **changes):
    """A copy of ``args`` with entries replaced (a callable gets the old value; a new tensor goes
    to the old one's device)."""
    out = dict(args)
    for key, change in changes.items():
        if callable(change):
            out[key] = change(out[key])
        else:
            old = out.get(key)
            out[key] = change.to(old.device) if isinstance(change, torch.Tensor) and old is not None else change
    return out


def _fill(t, dim, index, value):
    """``t`` with entry ``index`` of dimension ``dim`` set to ``value`` (on t's device)."""
    t = t.clone()
    t.narrow(dim, index, 1).fill_(value)
    return t


NAN, INF = float("nan"), float("inf")


def _value_cases(good):
    """Inputs of the right types and shapes with illegal values."""
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    cases = []

    def add(name, **changes):
        op, kw = good[name]
        cases.append((f"{name}:{','.join(changes)}", op, _set(kw, **changes)))

    add("build_tree_mask", parents=torch.tensor([[0, 0, 1, 1], [-1, 0, 0, 2]], dtype=torch.int32))
    add("build_tree_mask", parents=torch.tensor([[-1, 3, 1, 1], [-1, 0, 0, 2**31 - 1]], dtype=torch.int32))
    add("build_tree_mask", parents=torch.full((1, 4097), -1, dtype=torch.int32))
    add("tree_attention", cache_seqlens=i32(6, 10))
    add("tree_attention", cache_seqlens=i32(-1, 9))
    add("tree_attention", cache_seqlens=i32(2**31 - 1, 9))
    add("tree_attention", tree_len=10)
    add("tree_attention", tree_len=-1)
    add("tree_attention", tree_mask=lambda m: m[..., :0])
    add("tree_attention", scale=NAN)
    add("tree_attention", q=lambda q: q[..., :12], k_cache=lambda k: k[..., :12], v_cache=lambda v: v[..., :12])
    add("tree_attention", window=-1)
    add("tree_attention", softcap=NAN)
    add("tree_attention", k_cache=lambda k: k.transpose(2, 3))
    for name in ("verify_greedy", "verify_sampling"):
        add(name, tokens=lambda t: _fill(t, 1, 2, 11))
        add(name, tokens=lambda t: _fill(t, 1, 3, -(2**62)))
        add(name, parents=torch.tensor([[-1, 0, 5, 1], [-1, 0, 0, 2]], dtype=torch.int32))
        add(name, logits=lambda l: l[..., :0])
    add("verify_sampling", uniforms=lambda u: _fill(u, 2, 0, -0.25))
    add("verify_sampling", uniforms=lambda u: _fill(u, 2, 1, 1.0))
    add("verify_sampling", uniforms=lambda u: _fill(u, 1, 2, NAN))
    add("verify_sampling", uniforms=lambda u: _fill(u, 1, 0, INF))
    add("verify_sampling", logits=lambda l: _fill(l, 1, 0, NAN))
    add("verify_sampling", logits=lambda l: _fill(l, 1, 0, INF))
    add("verify_sampling", logits=lambda l: _fill(l, 1, 0, -INF))
    add("verify_sampling", temperature=torch.tensor([NAN, 1.0]))
    add("verify_sampling", top_p=torch.tensor([1.0, 0.0]))
    add("verify_sampling", top_k=i32(-1, 0))
    add("compact_kv", kv=lambda kv: kv[:, :, :1].expand(-1, -1, 2, -1, -1, -1))
    add("compact_kv", kv=lambda kv: kv[..., :1].expand(-1, -1, -1, -1, -1, 4))
    add("compact_kv", path=lambda p: _fill(p, 1, 1, 2**31 - 1))
    add("compact_kv", prefix_len=i32(2**31 - 1, 0))
    add("compact_kv", accept_len=i32(4, 1))
    add("expert_mlp", coeff=lambda c: c[:, :0])
    add("expert_mlp", coeff=torch.rand(3, 9, 2))
    add("expert_mlp", w_down=lambda w: w[:, :, :5])
    add("expert_mlp", w_gate_up=lambda w: w[:, :11])
    add("grouped_gemm", expert_offsets=i32(0, 3, 2))
    add("grouped_gemm", expert_offsets=i32(1, 2, 5))
    add("grouped_gemm", expert_offsets=i32(0, 2, 2**31 - 1))
    add("grouped_gemm", expert_offsets=i32(0, -5, 5))
    add("linear", weight=lambda w: w[:, :7])
    add("linear", bias=lambda b: b[:5])
    add("rms_norm", weight=lambda w: w[:7])
    add("rms_norm", eps=NAN)
    add("rms_norm", eps=-1.0)
    add("rotary_embedding", q=lambda q: q[..., :7], k=lambda k: k[..., :7], cos=lambda c: c[..., :7],
        sin=lambda s: s[..., :7])
    add("rotary_embedding", cos=lambda c: c[:, :2])
    add("rotary_embedding", k=torch.randn(2, 1, 3, 8))
    return cases


def _structural_cases(good):
    """Every tensor argument made meta, 0-dimensional, one dimension more, or of a dtype no op takes."""
    cases = []
    for name, (op, kw) in good.items():
        for arg, value in kw.items():
            if not isinstance(value, torch.Tensor):
                continue
            for what, change in (("meta", lambda t: t.to("meta")), ("0-d", lambda t: t.flatten()[0]),
                                 ("complex", lambda t: t.to(torch.complex64)),
                                 ("unsqueeze", lambda t: t.unsqueeze(0))):
                if what == "meta" and sum(isinstance(v, torch.Tensor) for v in kw.values()) == 1:
                    continue   # all arguments meta: a legal shape-only call
                if what == "complex" and name == "compact_kv" and arg == "kv":
                    continue   # kv may be of any dtype
                if what == "unsqueeze" and (name, arg) in (("linear", "x"), ("rms_norm", "x")):
                    continue   # [..., K]: any leading dimensions
                cases.append((f"{name}:{arg}:{what}", op, _set(kw, **{arg: change})))
    return cases


def all_cases(device="cpu"):
    good = good_args(device)
    return _value_cases(good) + _structural_cases(good)


def _child(device, start):
    """Runs the grid from case ``start``, one line before and after each case."""
    for index, (name, op, kw) in enumerate(all_cases(device)):
        if index < start:
            continue
        print(f"start {index} {name}", flush=True)
        try:
            op(**kw)
            outcome = "returned"
        except Exception as error:  # noqa: BLE001 - any Python exception is the wanted outcome
            outcome = f"raised {type(error).__name__}"
        print(f"done {index} {outcome}", flush=True)


def run_grid(device):
    """{case index: outcome} for the whole grid; a crash or hang is recorded against its case."""
    outcomes, start, deadline = {}, 0, time.monotonic() + GRID_SECONDS
    total = len(all_cases("cpu"))
    repo = os.path.dirname(os.path.dirname(HERE))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    while start < total:
        try:
            proc = subprocess.run([sys.executable, HERE, device, str(start)], capture_output=True, text=True,
                                  env=env, timeout=max(1.0, deadline - time.monotonic()))
            stdout, status = proc.stdout, (f"signal {-proc.returncode}" if proc.returncode < 0
                                           else f"exit {proc.returncode}")
        except subprocess.TimeoutExpired as expired:
            stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
            status = "hang"
        last = None
        for line in stdout.splitlines():
            kind, index, rest = (line.split(" ", 2) + [""])[:3]
            if kind == "start":
                last = int(index)
            elif kind == "done":
                outcomes[int(index)] = rest
                last = None
        if last is None:   # finished, or died outside a case (e.g. on import): no progress to make
            if status != "exit 0":
                outcomes[start] = f"{status}: {proc.stderr[-2000:] if status != 'hang' else ''}"
            break
        outcomes[last] = status
        if status == "hang":
            break
        start = last + 1
    return outcomes


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_bad_input_grid_raises_never_crashes(device):
    cases = all_cases("cpu")
    outcomes = run_grid(device)
    failures = {f"{i} {cases[i][0]}": outcomes.get(i, "not run") for i in range(len(cases))
                if not outcomes.get(i, "").startswith("raised ")}
    assert not failures, f"{len(failures)} of {len(cases)} bad inputs did not raise: {failures}"


def _meta_mixes():
    for name, (op, kw) in good_args().items():
        if sum(isinstance(v, torch.Tensor) for v in kw.values()) < 2:
            continue   # nothing to mix with
        for arg, value in kw.items():
            if isinstance(value, torch.Tensor):
                yield pytest.param(op, kw, arg, id=f"{name}-{arg}")


@pytest.mark.parametrize("op, kw, arg", list(_meta_mixes()))
def test_meta_tensor_in_a_cpu_call_is_refused(op, kw, arg):
    kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    before = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    name = op.__name__
    with pytest.raises(ValueError, match=f"{name}: .*{arg}.* must be on the same device, got .*meta"):
        op(**_set(kw, **{arg: lambda t: t.to("meta")}))
    for k, v in before.items():   # nothing written (compact_kv works in place)
        assert torch.equal(kw[k], v)


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))

"""The CUDA paths of decoding and training, run without a GPU under ``FakeTensorMode``.

Under :class:`torch._subclasses.fake_tensor.FakeTensorMode` every op runs on metadata alone
(shape, dtype, device), so tensors can live on ``device="cuda"`` where there is no GPU: a CPU
tensor that meets a CUDA one in an op raises ``FakeTensorDeviceMismatchError``, and the jakiro
ops run their fake implementations (``jakiro/ops.py``), which check devices and the CUDA-only
limits (tree_attention's head sizes). That covers what the CUDA kernels cannot show here: that
``SpeculativeGenerator.generate``, ``vanilla_generate`` and the trainer's bf16 autocast step
(``expert_mlp``'s autocast kernel and backward included) keep every tensor on the device, and
where they make the device wait for the host.

What the fake mode cannot do by itself, and what this file does about it:

* *Host reads* (``bool(t)``, ``int(t)``, ``.item()``: ``aten._local_scalar_dense``) and
  boolean-mask indexing or ``nonzero`` (a data-dependent size) need values. :class:`_Recorder`,
  a dispatch mode above the fake mode, answers them and records each one with the jakiro
  function it came from; on CUDA each is a synchronisation, and so is a copy between host and
  device unless ``non_blocking`` (a pageable copy waits for the stream), which it records too.
  Answers: ``t.all()`` True and ``t.any()`` False (input checks pass), the decoding loop's
  ``done`` flag (``_Decoding.finished``) False for ``cycles`` reads and then True, a count of a
  boolean tensor its size and ``nonzero`` every position (all selected), other integers 1,
  floats 0.5. The tests then pin *where* the CUDA paths synchronise: once per decoding cycle
  (the ``done`` flag), and a fixed number of times per training step.
* ``Module.to()``/``.float()`` swap fake parameters with ``torch.utils.swap_tensors``, which
  refuses tensors with weak references, and the fake mode's memo of converted tensors holds one
  to each of its tensors: the memo (a cache) is emptied before each swap.
* ``torch.autocast("cuda")`` turns itself off when no GPU is available: told that one is.
* The autograd engine asks the CUDA driver for a primary context when the graph holds CUDA
  tensors (``RuntimeError: hasPrimaryContext expects a valid device index``): :func:`_backward`
  stands in for it, calling every node of the graph in topological order as the engine does
  (gradients summed, broadcast shapes reduced, dtypes cast, devices checked).
* ``torch.Generator(device="cuda")`` needs a driver: a CPU generator stands in while
  ``SpeculativeGenerator`` checks its ops (``verify_sampling(seed=0)``).
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import tempfile

import pytest
import torch
import torch.cuda.amp.common as amp_common
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import jakiro
from jakiro.draft import JakiroDraft
from jakiro.generate import SpeculativeGenerator, vanilla_generate
from jakiro.testing import make_feature_shards, make_tiny_target

pytestmark = pytest.mark.skipif(not torch.backends.cuda.is_built(),
                                reason="this torch has no CUDA support, so no fake CUDA tensors")

PACKAGE = os.path.dirname(os.path.abspath(jakiro.__file__))
CUDA = torch.device("cuda", 0)
aten = torch.ops.aten
_INDEX_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default)
_COPY_OPS = (aten._to_copy.default, aten.copy_.default)

# Where decoding may synchronise outside its cycles: the prompt's checks and its move to the
# device, the EOS ids, the tree's slot bits (built once per drafter), the result's width.
BEFORE_AND_AFTER_DECODING = {("generate.py", "_Prompt.__init__"), ("generate.py", "_Output.__init__"),
                             ("tree.py", "_slot_bits"), ("generate.py", "_Output.sequences")}
DONE_FLAG = ("generate.py", "_Decoding.finished")


def _caller():
    """``((file under jakiro/, function), (frame id, instruction))`` of the innermost jakiro frame
    calling the op (``("?", "?")`` outside jakiro)."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if filename.startswith(PACKAGE + os.sep):
            name = getattr(frame.f_code, "co_qualname", None)           # Python >= 3.11
            if name is None:
                owner = frame.f_locals.get("self")
                name = f"{type(owner).__name__}.{frame.f_code.co_name}" if owner is not None else frame.f_code.co_name
            return (os.path.relpath(filename, PACKAGE).replace(os.sep, "/"), name), (id(frame), frame.f_lasti)
        frame = frame.f_back
    return ("?", "?"), None


def _site() -> tuple[str, str]:
    return _caller()[0]


class _Recorder(TorchDispatchMode):
    """Answers and records host reads, data-dependent sizes and host/device copies (module docstring).

    ``syncs``: ``(kind, site)`` of every CUDA synchronisation seen since :meth:`clear`;
    ``ops``: ``(op, argument dtypes, site)`` of every op (for the autocast checks).
    """

    def __init__(self):
        super().__init__()
        self.cycles = 0
        self.clear()

    def clear(self, cycles: int = 0):
        self.syncs, self.ops, self.done_reads, self.cycles, self._last_read = [], [], 0, cycles, None

    def _sync(self, kind: str, site=None):
        self.syncs.append((kind, site or _site()))

    def _answer(self, t: torch.Tensor):
        site, call = _caller()
        # One sync per Python-level read: .tolist() reads every element here (back to back, from
        # one instruction), but copies the tensor to the host once on a GPU.
        if t.device.type == "cuda" and (call is None or call != self._last_read):
            self._sync("read", site)
        self._last_read = call
        if site == DONE_FLAG:
            self.done_reads += 1
            return self.done_reads > self.cycles
        if t.dtype == torch.bool:
            return getattr(t, "_fake_made_by", "all") != "any"
        if getattr(t, "_fake_count", None) is not None:
            return t._fake_count
        return 0.5 if t.dtype.is_floating_point else 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            return self._answer(args[0])
        self._last_read = None
        if func is aten.nonzero.default:
            t = args[0]
            if t.device.type == "cuda":
                self._sync("nonzero")
            return torch.empty((t.numel(), t.dim()), dtype=torch.int64, device=t.device)
        if func in _INDEX_OPS and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            # A boolean mask is a nonzero (a sync on CUDA): every position selected.
            if args[0].device.type == "cuda":
                self._sync("nonzero")
            indices = []
            for i in args[1]:
                if i is not None and i.dtype in (torch.bool, torch.uint8):
                    indices += [torch.empty(i.numel(), dtype=torch.int64, device=i.device)] * i.dim()
                else:
                    indices.append(i)
            args = (args[0], indices) + tuple(args[2:])
        self.ops.append((func, [a.dtype if isinstance(a, torch.Tensor) else a for a in args], _site()))
        out = func(*args, **kwargs)
        if func in _COPY_OPS:
            source, destination = (args[1], args[0]) if func is aten.copy_.default else (args[0], out)
            non_blocking = kwargs.get("non_blocking", func is aten.copy_.default and len(args) > 2 and args[2])
            if (isinstance(source, torch.Tensor) and source.device != destination.device
                    and source.dim() > 0 and not non_blocking):
                self._sync(f"copy {source.device.type}->{destination.device.type}")
        if func.overloadpacket in (aten.all, aten.any):
            out._fake_made_by = func.overloadpacket.__name__
        elif func.overloadpacket is aten.sum and args[0].dtype == torch.bool:
            out._fake_count = args[0].numel()
        return out

    def sync_sites(self) -> collections.Counter:
        return collections.Counter(site for _, site in self.syncs)


def _backward(loss, gradient=None, *unused, **unused_kwargs):
    """``loss.backward()`` without the autograd engine: every node of the graph called once, in
    topological order, with its summed incoming gradients (``AccumulateGrad`` nodes fill ``.grad``)."""
    order, seen, stack = [], set(), [(loss.grad_fn, False)]
    while stack:                                          # iterative post-order DFS
        node, finished = stack.pop()
        if finished:
            order.append(node)
        elif node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack.extend((child, False) for child, _ in node.next_functions if child is not None)
    pending = {loss.grad_fn: [torch.ones_like(loss) if gradient is None else gradient]}
    for node in reversed(order):                          # a node before everything it feeds
        incoming = pending.pop(node, None)
        if incoming is None:
            continue
        outputs = node.apply(*incoming) if hasattr(node, "apply") else node(*incoming)
        outputs = (outputs,) if outputs is None or isinstance(outputs, torch.Tensor) else outputs
        for (child, slot), grad in zip(node.next_functions, outputs):
            if child is None or grad is None:
                continue
            meta = child._input_metadata[slot]
            if grad.device != meta.device:
                raise RuntimeError(f"invalid gradient for {child.name()}: expected device {meta.device}, "
                                   f"got {grad.device}")
            if tuple(grad.shape) != tuple(meta.shape):
                grad = grad.sum_to_size(meta.shape)
            grad = grad.to(meta.dtype)
            slots = pending.setdefault(child, [None] * len(child._input_metadata))
            slots[slot] = grad if slots[slot] is None else slots[slot] + grad


class _CpuGenerator(torch.Generator):
    """``torch.Generator(device=...)`` that always makes a CPU generator."""

    def __new__(cls, device="cpu"):
        return _REAL_GENERATOR("cpu")


_REAL_GENERATOR = torch.Generator


@pytest.fixture
def fake_cuda(monkeypatch):
    """Yields a recorder inside a FakeTensorMode where CUDA tensors work without a GPU."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    swap = torch.utils.swap_tensors

    def swap_without_memo(a, b):
        memo = getattr(getattr(mode.fake_tensor_converter, "meta_converter", None), "tensor_memo", None)
        if memo is not None:
            memo.clear()
        return swap(a, b)

    monkeypatch.setattr(torch.utils, "swap_tensors", swap_without_memo)
    monkeypatch.setattr(amp_common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    recorder = _Recorder()
    with mode, recorder:
        yield recorder


def _tiny_target(**overrides):
    """A tiny Llama built on the (fake) GPU; head size 64, one the CUDA tree_attention serves."""
    settings = dict(hidden=128, heads=2, kv_heads=1, head_dim=64, intermediate=96, vocab=64, layers=2)
    settings.update(overrides)
    with torch.device(CUDA):
        return make_tiny_target("llama", **settings)


def _generator(target, draft, **tree):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "Generator", _CpuGenerator)
        return SpeculativeGenerator(target, draft, **tree)


def _prompts():
    """Two left-padded prompts (made on the host: generate moves them)."""
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, :3] = 0
    return ids, mask


def test_the_harness_catches_a_host_tensor_on_a_cuda_path(fake_cuda):
    target = _tiny_target()
    assert target.lm_head.weight.device == CUDA
    with pytest.raises(FakeTensorDeviceMismatchError):
        target.lm_head.weight + torch.ones(target.lm_head.weight.shape)
    cache = jakiro.kv_cache.KVCache(1, 2, 1, 64, 16, torch.float32, CUDA)
    with pytest.raises(FakeTensorDeviceMismatchError):
        cache.step(3, pad=torch.zeros(2, dtype=torch.int64, device="cpu"))
    assert bool(torch.ones(3, device=CUDA).all()) and fake_cuda.syncs[-1] == ("read", ("?", "?"))


CASES = {
    # name: (draft options, generate options)
    "jakiro-greedy": (dict(), dict()),
    "jakiro-sampled-eos": (dict(), dict(temperature=0.8, top_p=0.9, top_k=20, eos_token_id=[3, 5],
                                        min_new_tokens=2)),
    "per_expert-bf16-draft-vocab": (dict(candidate_mode="per_expert", dtype=torch.bfloat16, vocab=32), dict()),
    "eagle2": (dict(eagle2=True), dict(eos_token_id=3)),
}


def _draft(target, candidate_mode=None, dtype=None, vocab=None, eagle2=False):
    draft = JakiroDraft.from_target(target, eagle2=eagle2, **({"candidate_mode": candidate_mode}
                                                               if candidate_mode else {}))
    if dtype is not None:
        draft.bind(target, dtype)
    if vocab is not None:
        draft.restrict_vocab(torch.arange(0, 2 * vocab, 2))
    return draft


def _generate_and_check_syncs(recorder, generate, cycles: int):
    ids, mask = _prompts()
    recorder.clear(cycles)
    result = generate(ids, mask)
    assert result.sequences.device == CUDA and result.new_tokens.device == CUDA
    assert result.accept_lengths.device == CUDA and result.cycles == cycles
    sites = recorder.sync_sites()
    assert sites[DONE_FLAG] == cycles + 1, sites
    in_cycle = {site: count for site, count in sites.items()
                if site not in BEFORE_AND_AFTER_DECODING and site != DONE_FLAG}
    return in_cycle


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_generate_keeps_everything_on_the_gpu(fake_cuda, case):
    draft_options, options = CASES[case]
    target = _tiny_target()
    draft = _draft(target, **draft_options)
    assert draft.fc.weight.device == CUDA
    generator = _generator(target, draft, depth=3, top_k=4, total_tokens=12)
    in_cycle = _generate_and_check_syncs(
        fake_cuda, lambda ids, mask: generator.generate(ids, mask, max_new_tokens=20, **options), cycles=3)
    assert not in_cycle, in_cycle      # the "all rows done?" read is the cycle's only one


def test_vanilla_generate_keeps_everything_on_the_gpu(fake_cuda):
    target = _tiny_target()
    in_cycle = _generate_and_check_syncs(
        fake_cuda, lambda ids, mask: vanilla_generate(target, ids, mask, max_new_tokens=20, eos_token_id=3),
        cycles=4)
    assert not in_cycle, in_cycle


@pytest.fixture(scope="module")
def feature_items():
    """A few conversations of target features, read on the host before any fake mode (safetensors
    files cannot be read under it); the trainer takes the list as its dataset."""
    from jakiro.train.data import FeatureDataset
    target = make_tiny_target("llama", hidden=128, heads=2, kv_heads=1, head_dim=64, intermediate=96, vocab=64)
    with tempfile.TemporaryDirectory() as folder:
        # With the layer a new draft of a 2-layer target fuses (EAGLE-3 features: the wider input path).
        make_feature_shards(target, folder, conversations=6, length=14, per_shard=3, seed=1, feature_layers=[1])
        dataset = FeatureDataset(folder)
        return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("rounds", [1, 2])
@pytest.mark.parametrize("eagle2", [False, True], ids=["jakiro", "eagle2"])
def test_bf16_training_step_on_the_gpu(fake_cuda, feature_items, tmp_path, eagle2, rounds, monkeypatch):
    from jakiro.train.trainer import TrainConfig, Trainer
    target = _tiny_target()
    draft = JakiroDraft.from_target(target, eagle2=eagle2)
    trainer = Trainer(draft, feature_items, str(tmp_path), TrainConfig(batch_size=2, rounds=rounds, k_step=2),
                      progress=False)
    assert trainer.bf16 and trainer.device == CUDA
    batch = trainer._batch([0, 1], epoch=0)
    assert all(t.device == CUDA for t in batch.values())

    fake_cuda.clear()
    monkeypatch.setattr(torch.Tensor, "backward", _backward)
    metrics = trainer.train_step(batch)
    assert set(metrics) >= {"loss", "loss_feature_mixture", "top1_mixture"}

    # The draft's matmuls and experts ran in bf16 under autocast (expert_mlp's autocast kernel:
    # bf16 activations and weights, fp32 routing coefficients), as did the losses' LM head.
    # Left out: the backward (called from train_step), and the attention products inside
    # scaled_dot_product_attention (_attend), which the fake mode runs on the math backend, which
    # computes in fp32; a GPU runs a fused bf16 kernel there.
    experts = [dtypes for op, dtypes, _ in fake_cuda.ops if str(op).startswith("jakiro.expert_mlp")]
    assert experts and all(d[:3] == [torch.bfloat16] * 3 and d[3] == torch.float32 for d in experts), experts
    matmuls = [(dtypes, site) for op, dtypes, site in fake_cuda.ops if op.overloadpacket in (aten.mm, aten.addmm)
               and site[1] not in ("Trainer.train_step", "_attend")]
    assert len(matmuls) > 4 and all(set(d) == {torch.bfloat16} for d, _ in matmuls), matmuls
    # Float32 master weights, every trained one with a float32 gradient on the device, and stepped.
    for name, p in draft.named_parameters():
        assert p.dtype == torch.float32 and p.device == CUDA, name
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.device == CUDA, name
            assert trainer.optimizer.state[p]["exp_avg"].device == CUDA, name
    # Where a step waits for the device: the trained positions' indices once per batch and once
    # per branch and pass, the metrics once per pass; nothing in the backward.
    branches = 1 if eagle2 else 2
    expected = {("train/loss.py", "TargetDistribution.of"): 1,
                ("train/loss.py", "branch_terms"): branches * rounds,
                ("train/loss.py", "jakiro_loss"): rounds}
    assert dict(fake_cuda.sync_sites()) == expected

    accuracy = trainer.k_step_accuracy(batch, 2)
    assert set(accuracy) == {"acc_1step", "acc_2step"}

"""Compiled decoding cycles: ``compile=True`` of :class:`~jakiro.generate.SpeculativeGenerator`
and :func:`~jakiro.generate.vanilla_generate`.

A cycle's body is one function of tensors (``SpeculativeGenerator._cycle``,
``generate._vanilla_cycle``): the draft's tree expansion, the target's verify pass through the
``jakiro`` attention backend, acceptance (``verify_greedy`` / ``verify_sampling``, uniforms drawn
outside and passed in), the KV compaction, emission and the draft's advance, with the caches and
the output buffers updated in place. It has no host reads and no data-dependent shapes, so it
compiles as one graph: ``torch.compile(fn, fullgraph=True, dynamic=False)`` (a graph break is an
error, not a silent fallback). The ``all rows done?`` flag stays outside the graph: the one host
read per cycle.

* Shapes are static per batch size, tree size and cache capacity; with ``compile`` on the cache
  capacity is rounded up to a multiple of :data:`CAPACITY_BUCKET` (:func:`bucket`), so prompts of
  different lengths share a graph.
* The kernel routes (``jakiro.cpu_routing``) are installed around the compiled call, not inside:
  ``use_kernels`` does nothing while Dynamo traces.
* Calls with a ``streamer`` or a ``stop`` callable run eager: both read the host in every cycle.
* On CUDA the compiled cycle is also captured as a CUDA graph (:class:`_GraphedCycle`) with an
  explicit ``torch.cuda.CUDAGraph``, not ``mode="reduce-overhead"``: the cycle mutates the KV
  caches and output buffers in place, and Inductor's CUDA-graph trees skip graphs that mutate
  inputs that are not static (parameters, or tensors pinned with ``mark_static_address``, which
  Dynamo then guards by identity: a recompilation per call). Captured explicitly, the buffers of
  a call are the graph's static memory by construction; the state that changes from cycle to
  cycle (the draft's context features, the root token, the uniforms) is copied into the graph's
  input buffers before each replay.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils import _pytree as pytree

# Cache capacities with compile on are rounded up to a multiple of this (one graph per bucket).
CAPACITY_BUCKET = 256
# Graphs Dynamo keeps per cycle function (its default, 8, is shared by every generator, model,
# batch size, cache bucket and greedy/sampled setting of the process; past it, fullgraph fails).
RECOMPILE_LIMIT = 64

_compiled: dict = {}


def backend(compile, device):
    """The ``torch.compile`` backend ``compile`` asks for (None: eager). True: Inductor; a
    string: that backend (``"eager"``, ``"aot_eager"``, ``"inductor"``); a callable: a custom
    backend (tests use one to read the graph)."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "inductor"
    if callable(compile) or (isinstance(compile, str)
                             and compile in torch._dynamo.list_backends(exclude_tags=()) + ["eager"]):
        return compile
    raise ValueError(f"generate: compile must be True, False or a torch.compile backend name, got {compile!r}")


def bucket(capacity: int, target, max_cache_len: int | None) -> int:
    """``capacity`` rounded up to a multiple of :data:`CAPACITY_BUCKET`, within the cache's limit
    (none without a ``target``: a lookup's prompt width)."""
    rounded = -(-capacity // CAPACITY_BUCKET) * CAPACITY_BUCKET
    if target is None:
        return rounded
    limit = target.config.max_position_embeddings if max_cache_len is None else max_cache_len
    return max(capacity, min(rounded, limit))


def compiled(fn, backend_name):
    """``fn`` under ``torch.compile(fullgraph=True, dynamic=False)`` with ``backend_name``
    (one wrapper per function and backend; Dynamo keeps a graph per shape and setting)."""
    key = (getattr(fn, "__func__", fn), backend_name)
    wrapper = _compiled.get(key)
    if wrapper is None:
        # Inductor rounds to bfloat16 / float16 where eager does (not only at a fusion's end), so
        # a half-precision draft grows eager's trees as often as it can.
        options = {"emulate_precision_casts": True} if backend_name == "inductor" else None
        wrapper = _compiled[key] = torch.compile(getattr(fn, "__func__", fn), fullgraph=True, dynamic=False,
                                                 backend=backend_name, options=options)
    owner = getattr(fn, "__self__", None)
    return wrapper if owner is None else (lambda *args: wrapper(owner, *args))


def limits(backend_name):
    """The Dynamo settings compiled cycles run under (a context manager around the decoding loop;
    nothing for an eager run, which never imports Dynamo)."""
    if backend_name is None:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)


def cycle(fn, backend_name, fixed: int, device):
    """The cycle ``fn`` compiled; on CUDA with Inductor also captured as a CUDA graph and replayed.

    ``fn(*args)``: its first ``fixed`` arguments are the same objects at every cycle of a call (the
    decoding run, the caches); the others (tensors, tuples of tensors, None) change per cycle.
    """
    step = compiled(fn, backend_name)
    if backend_name == "inductor" and torch.device(device).type == "cuda":
        return _GraphedCycle(step, fixed)
    return step


class _GraphedCycle:
    """A compiled cycle captured as a CUDA graph on its second call and replayed from then on.

    The first call runs the compiled function on a side stream (compiling it, and warming up
    as capture requires) and is a real cycle. The second call captures one cycle (capture runs
    nothing) and replays it. From then on a call copies the changing arguments into the graph's
    input buffers and replays. Outputs are cloned out of the graph's memory (the next replay
    overwrites it). The fixed arguments' tensors (caches, output buffers) are used in place,
    so the graph belongs to one decoding call.
    """

    def __init__(self, step, fixed: int):
        self.step, self.fixed = step, fixed
        self.calls = 0
        self.graph = None

    def __call__(self, *args):
        fixed, varying = args[:self.fixed], args[self.fixed:]
        self.calls += 1
        if self.calls == 1:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*fixed, *varying)
            torch.cuda.current_stream().wait_stream(side)
            return out
        leaves, spec = pytree.tree_flatten(varying)
        if self.graph is None:
            self.inputs = [t.clone() if isinstance(t, torch.Tensor) else t for t in leaves]
            self.spec = spec
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.step(*fixed, *pytree.tree_unflatten(self.inputs, spec))
        else:
            for buffer, t in zip(self.inputs, leaves):
                if isinstance(t, torch.Tensor):
                    buffer.copy_(t)
        self.graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.outputs)

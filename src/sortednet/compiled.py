"""``nest.compile()``: the wrapped model compiled with the active sub-model's sliced
parameters as graph inputs.

``torch.compile(model)`` works on a wrapped model as is (one graph per
sub-model), but the slicing then happens inside the graph: AOTAutograd
differentiates ``weight[:n]`` by building a gradient of the FULL parameter
(zeros plus the slice) that autograd then adds into ``.grad``: two full-size
memory passes per sliced weight per step: a sub-model of 1/8 the width moves
8x the gradient bytes of a standalone model of its size (the ``c-train plain``
column of benchmarks/results/overhead.md).

Here the sliced weights are read eagerly, as in an eager forward (views whose
gradient :class:`~sortednet.views.SliceInto` adds straight into the slice of
``param.grad``) and handed to the compiled graph as inputs through
``torch.func.functional_call``: the graph sees tensors of the sub-model's size
and returns gradients of that size. The compiled model's own reads of those
attributes cut nothing more (a prefix cut of a tensor already at its size).

Only plain prefix views are handed over; attributes whose slice is a
concatenation of fused blocks (``chunks=`` / ``parts=``), computed by a custom
slicer on every read, or not a parameter (buffers) are sliced inside the graph
as with ``torch.compile(model)``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from .errors import SortedNetError
from .kvcache import CacheGuard
from .modes import finish_all
from .plan import HANDED
from .views import View, is_fsdp

if TYPE_CHECKING:
    from .nest import Nest

__all__ = ["Compiled"]


class Compiled:
    """A compiled callable running ``nest.model`` as the sub-model active for the caller.

    Call it like the model, inside ``nest.use(sub)`` (or after ``nest.activate``).
    Extra keywords go to ``torch.compile``; ``dynamic`` defaults to False (one
    graph per sub-model, each specialised to its shapes). Dynamo keeps at most
    ``torch._dynamo.config.recompile_limit`` graphs per compiled function: raise
    it to the number of sub-models you run.

    Under ``torch.no_grad()`` nothing is handed over (there is no gradient to
    place, and slicing inside the graph is as fast): the call is the model
    compiled as ``torch.compile(model)`` would. With gradients, calls from
    several threads at once are serialised by one lock per nest (shared by
    every ``nest.compile()`` of it): while a call runs, ``functional_call``
    swaps the sliced views into the model's modules, so calls without
    gradients wait for it too (they run side by side otherwise).

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
    >>> nest = sn.wrap(net, sn.Width("h", [16, 64], out="0", inp="2"))
    >>> step = nest.compile(backend="eager")          # inductor by default
    >>> with nest.use("h=16"):
    ...     step(torch.randn(4, 8)).square().mean().backward()
    >>> net[0].weight.grad.shape, bool(net[0].weight.grad[16:].abs().sum() == 0)
    (torch.Size([64, 8]), True)
    """

    def __init__(self, nest: Nest, **compile_kwargs: Any) -> None:
        nest._check_alive()
        unknown = sorted(set(compile_kwargs) - set(inspect.signature(torch.compile).parameters) - {"model"})
        if unknown or "model" in compile_kwargs:
            raise SortedNetError(f"nest.compile() passes keywords to torch.compile, which takes "
                                 f"{[k for k in inspect.signature(torch.compile).parameters if k != 'model']}; "
                                 f"got {unknown or ['model']}")
        if is_fsdp(nest.model):  # (it reads the sliced parameters at rest, where FSDP2 holds them in shards)
            raise SortedNetError("nest.compile() of a model sharded with FSDP2 (fully_shard) is not supported: it "
                                 "hands each sub-model's sliced parameters to the graph as inputs, while FSDP2 holds "
                                 "them as shards outside its forward; train it eagerly (sortednet.distributed."
                                 "accumulate), or compile in one process")
        flags = {k: v for k, v in compile_kwargs.items() if k in ("fullgraph", "disable", "dynamic")
                 and not (isinstance(v, bool) or v is None and k == "dynamic")}
        if flags:
            raise SortedNetError(f"nest.compile({', '.join(f'{k}={v!r}' for k, v in flags.items())}): "
                                 f"{', '.join(flags)} takes True or False" + (" (dynamic: or None)" if "dynamic" in
                                                                               flags else ""))
        compile_kwargs.setdefault("dynamic", False)
        self.nest = nest
        self._targets = handed_over(nest)
        self._dims = frozenset(b.dim.name for _, m, _ in self._targets for b in m._sn.bind.values())
        self._lock = _swap_lock(nest)
        model = nest.model

        def call(params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
            return torch.func.functional_call(model, params, args, kwargs, tie_weights=False, strict=False)

        try:
            self._compiled: Callable[..., Any] = torch.compile(call, **compile_kwargs)
        except Exception as e:  # (an unknown mode or backend: refused by torch.compile before anything is traced)
            given = ", ".join(f"{k}={v!r}" for k, v in compile_kwargs.items() if k != "dynamic" or v is not False)
            raise SortedNetError(f"nest.compile({given}): torch.compile refuses it: {type(e).__name__}: "
                                 f"{str(e)[:300]}") from e

    @property
    def names(self) -> list[str]:
        """Names of the parameters handed to the graph as sliced inputs."""
        return [key for key, _, _ in self._targets]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.nest._check_alive()
        state = self.nest._state
        if state._scoped is state:  # outside any use: pin the default for the whole call, as eager forwards
            from .plan import Use  # are pinned (each graph of a model with graph breaks would read the default

            with Use(state, state.default):  # again: an activate from another thread in between mixed two)
                return self._call(args, kwargs)
        return self._call(args, kwargs)

    def _call(self, args: tuple, kwargs: dict) -> Any:
        # the key/value cache check of the root (a forward pre-hook, which returns at once inside the graph):
        # run eagerly around the compiled call, so a cache another sub-model filled is refused as in eager
        model = self.nest.model
        guards = [h for h in model._forward_pre_hooks.values() if isinstance(h, CacheGuard)]
        for g in guards:
            g(model, args, kwargs)
        if not torch.is_grad_enabled():  # no gradient to place: slicing inside the graph is as fast (measured);
            with self._lock.shared():    # it waits only for a call with gradients of this nest (its swapped views)
                out = self._compiled({}, args, kwargs)
        else:
            with self._lock.exclusive():  # (one lock per nest: every nest.compile() of it)
                own = [m._parameters[name] for _, m, name in self._targets]
                plain = [key for (key, _, _), p in zip(self._targets, own) if not isinstance(p, torch.nn.Parameter)]
                if plain:
                    raise SortedNetError(f"nest.compile(): {plain[:3]} are not the model's parameters but plain "
                                         "tensors (a sliced view left in their place): another call swapped them "
                                         "in and did not put them back; nothing ran")
                params = {key: getattr(m, name) for key, m, name in self._targets}
                state = self.nest._state
                outer = HANDED.__dict__.get("held")
                HANDED.held = (state, state.plan(), self._dims)  # (a larger one inside: refused, see plan.Use)
                try:
                    out = self._compiled(params, args, kwargs)
                finally:
                    HANDED.held = outer
                    put_back(self._targets, own, params)
        for g in guards:
            g.made(model, args, kwargs, out)
        return out

    def __repr__(self) -> str:
        return f"Compiled({len(self._targets)} sliced parameters as graph inputs)"


class _SwapLock:
    """Calls with gradients of a nest's compiled callables swap sliced views into the model's modules: one at a
    time (``exclusive``), and calls without gradients, which read the modules' own parameters inside their
    graph, not while one runs (``shared``: any number of them at once). Reentrant on a thread in every order (a
    call inside a call of the same thread never waits for itself: one holding it exclusively goes on, a shared
    holder taking it exclusively waits for the other threads' shared calls only); a thread waiting to take it
    exclusively holds back new shared calls of other threads, so a stream of them never starves it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._readers = 0  # shared holds, all threads
        self._waiting = 0  # threads waiting to take it exclusively
        self._upgrading = 0  # of those, threads holding it shared
        self._mine = threading.local()  # this thread's shared holds

    def _held(self) -> int:
        return getattr(self._mine, "n", 0)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:
                held = self._held()
                if held and self._upgrading:  # (two threads each waiting for the other's shared call to end)
                    raise SortedNetError(
                        "nest.compile(): a call with gradients inside a call without gradients, on two threads at "
                        "once, would wait for each other forever; refused in this thread (nothing ran). Make the "
                        "outer call with gradients, or the inner one without")
                self._waiting += 1
                self._upgrading += bool(held)
                try:
                    while self._owner is not None or self._readers > held:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                    self._upgrading -= bool(held)
                self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._cond.notify_all()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner != me and not self._held():
                while self._owner is not None or self._waiting:
                    self._cond.wait()
            self._readers += 1
            self._mine.n = self._held() + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._mine.n = self._held() - 1
                self._cond.notify_all()


_SWAP_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SWAP_LOCKS_LOCK = threading.Lock()


def _swap_lock(nest: Nest) -> _SwapLock:
    """The nest's one :class:`_SwapLock`, shared by all its ``nest.compile()`` callables."""
    with _SWAP_LOCKS_LOCK:
        lock = _SWAP_LOCKS.get(nest)
        if lock is None:
            lock = _SWAP_LOCKS[nest] = _SwapLock()
        return lock


def put_back(targets: list[tuple[str, torch.nn.Module, str]], own: list[torch.Tensor],
             params: dict[str, torch.Tensor]) -> None:
    """Each module's own parameter back where ``functional_call`` left a handed-over view: its swap back
    (and its swap in, which puts nothing back on a KeyboardInterrupt) stops at the first error, and a
    Ctrl-C there would leave a plain tensor of the sub-model's size as the model's weight for good."""
    left = [(m, name, params[key], p) for (key, m, name), p in zip(targets, own, strict=True)
            if m._parameters.get(name) is params[key]]
    if left:
        finish_all([functools.partial(_restore, *t) for t in left])


def _restore(m: torch.nn.Module, name: str, view: torch.Tensor, own: torch.Tensor) -> None:
    if m._parameters.get(name) is view:
        m._parameters[name] = own


def handed_over(nest: Nest) -> list[tuple[str, torch.nn.Module, str]]:
    """``(dotted name, module, attribute)`` of every parameter that every plan serves as a plain prefix view."""
    out = []
    for path, m in nest._sliced.items():
        st = m._sn
        if any(b.chunks > 1 or b.parts for b in st.bind.values()):
            continue
        entries = [nest._plans.get(sub).entries[st.slot] for sub in (nest.smallest, nest.largest)]
        for name in st.slicer.attr_names(m, st.bind):
            if m._parameters.get(name) is None:
                continue
            if all(e.get(name).__class__ is View and e[name].segs is None for e in entries):
                out.append((f"{path}.{name}" if path else name, m, name))
    return out

"""Slicing plans: what every sliced attribute is under one sub-model, computed once.

A :class:`Plan` holds a sub-model, its sizes by dimension name and, per sliced
module (indexed by ``State.slot``), one entry per attribute: a
:class:`~sortednet.views.View` (the cuts of a tensor), a precomputed value
(``in_features``, ``num_heads``, ...) or ``DYNAMIC`` (the slicer's ``value``
runs on each read). ``nest.use(sub)`` puts the plan of ``sub`` in the nest's
context variable, so reading ``module.weight`` is one plan lookup plus the
view: no parsing, no dimension walk, no sharding check on the hot path.

Plans depend only on the sizes and on the shapes of the wrapped tensors, which
never change while a model is wrapped; they are cached per sub-model on the
nest (:class:`Plans`), a module's entries shared by every sub-model that gives
its dimensions the same sizes.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
import threading
import types
import warnings
import weakref
from typing import Any

import torch.utils.checkpoint as _checkpoint
from torch import nn

from ._tracing import compiling
from .dims import COMPOSABLE, NONREENTRANT, RECOMPUTE_PIN, REENTRANT, REENTRANT_LOCK, REENTRANT_THREADS, Active
from .errors import SortedNetError, caller_outside
from .submodel import SubModel
from .views import ABSENT, DYNAMIC, STATIC, View, cuts_for

__all__ = ["Plan", "Plans"]

#: at most this many sub-models keep a cached plan (more are rebuilt on use: about a microsecond per module)
MAX_PLANS = 4096


class Plan:
    """The sub-model ``sub`` ready to run: ``sizes`` by dimension name, ``entries`` per module slot."""

    __slots__ = ("sub", "sizes", "entries")

    def __init__(self, sub: SubModel, entries: tuple[dict[str, Any], ...] = ()) -> None:
        self.sub, self.sizes, self.entries = sub, dict(sub), entries

    def __repr__(self) -> str:
        return f"Plan({self.sub})"


class Plans:
    """The plans of one nest: built on first use of a sub-model, then one dict lookup.

    >>> import torch.nn as nn, sortednet as sn
    >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
    >>> plan = nest._plans.get(nest.smallest)
    >>> plan.entries[0]["weight"], plan.entries[0]["out_features"]
    (View('weight', ((0, 0, 2),), None), 2)
    """

    def __init__(self, modules: list[nn.Module], active: Active | None = None) -> None:
        self.modules = modules                     # by slot
        self.active = active
        self._dims = [tuple(sorted({b.dim.name for b in m.__dict__["_sn"].bind.values()})) for m in modules]
        self._plans: dict[Any, Plan] = {}          # SubModel (and the strings that named it) -> plan
        self._entries: dict[tuple, dict[str, Any]] = {}

    def get(self, sub: SubModel) -> Plan:
        """The plan of ``sub`` (a resolved, complete sub-model)."""
        plan = self._plans.get(sub)
        if plan is None:
            plan = self.build(sub)
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            if len(self._entries) >= 16 * MAX_PLANS:
                self._entries.clear()
            self._plans[sub] = plan
        return plan

    def hit(self, key: Any) -> Plan | None:
        """The cached plan of a SubModel or string already resolved once, else None."""
        try:
            return self._plans.get(key)
        except TypeError:  # unhashable (a dict): resolve it
            return None

    def alias(self, key: str, plan: Plan) -> None:
        """Remember that the string ``key`` names ``plan`` (no parsing next time)."""
        if len(self._plans) < MAX_PLANS:
            self._plans[key] = plan

    def clear(self) -> None:
        self._plans.clear()
        self._entries.clear()

    def build(self, sub: SubModel) -> Plan:
        plan = Plan(sub)
        if self.active is None:
            return plan
        # STATIC values are computed by the slicers' value(), which read the active sizes:
        # run them with this plan active, in a private copy of the caller's context
        plan.entries = contextvars.copy_context().run(self._fill, plan)
        return plan

    def _fill(self, plan: Plan) -> tuple[dict[str, Any], ...]:
        assert self.active is not None
        self.active.var.set(plan)
        sizes = plan.sizes
        out = []
        for slot, m in enumerate(self.modules):
            key = (slot, tuple(sizes[n] for n in self._dims[slot]))
            entries = self._entries.get(key)
            if entries is None:
                entries = self._entries[key] = module_entries(m, sizes)
            out.append(entries)
        return tuple(out)


def slicer_error(st: Any, name: str, err: Exception) -> SortedNetError:
    """A user's slicer (of the sliced module's state ``st``) failing to serve attribute ``name``, named."""
    return SortedNetError(f"the slicer {type(st.slicer).__name__} of {st.path or '<root>'!r} raised reading "
                          f"{name!r} at sizes {st.sizes()}: {type(err).__name__}: {str(err).rstrip('.')}. Check "
                          "its value() / views: each (axis, role) must cut an axis whose full size is that role's "
                          "(full(m, role))")


def module_entries(m: nn.Module, sizes: dict[str, int]) -> dict[str, Any]:
    """Plan entries of one sliced module at ``sizes`` (its sub-model's plan must be active)."""
    st = m.__dict__["_sn"]
    sl, bind = st.slicer, st.bind
    rules = sl.rules(m)
    out: dict[str, Any] = {}
    for name in sl.attr_names(m, bind):
        b = bind.get(f"attr:{name}")
        if b is not None:
            out[name] = sizes[b.dim.name] * b.unit // b.div
            continue
        rule = rules.get(name)
        if rule is None:
            out[name] = DYNAMIC
        elif rule is STATIC:
            try:
                out[name] = sl.value(m, name)
            except SortedNetError:
                raise
            except Exception as err:  # (a slicer of the user's failing on a static attribute: named, as a tensor's)
                if type(sl).__module__.startswith("sortednet."):
                    raise
                raise slicer_error(st, name, err) from err
        else:
            t = sl.tensor(m, name)  # (absent: a bias=False layer's, read at each use, where torch.func's
            out[name] = ABSENT if t is None else View(name, *cuts_for(t.shape, bind, rule, sizes))  # call
            #                                                   puts one in the slot for its forward)
    return out


class _Open:
    """One open ``use`` block on its context's stack: the value the variable held before it, where it was
    entered (a frame's id and code, not the frame: a copied context must not keep the caller's locals
    alive), and whether it was left while later blocks were still open. Never changed: a context copied
    inside the block (a task, ``copy_context().run``) keeps its own view of the stack.

    A forward's pin keeps its frame itself (torch's call of the root, not the user's) while it is open: a pin
    left behind by an interrupt is found stale by identity, where the id of a frame that ended may already be
    the id of the next forward's frame (the same code, so it would look still running, and keep the old default
    in force). Closed, it lets the frame go (a context copied during the forward keeps the entry)."""

    __slots__ = ("prev", "frame", "code", "left", "pin", "vtok", "utok", "held", "gen", "under")

    def __init__(self, prev: Any, frame: Any, left: bool = False, pin: bool = False) -> None:
        self.prev, self.left, self.pin = prev, left, pin
        self.vtok = self.utok = None  # the context variables' tokens of entering (see close_block)
        self.held = frame if pin else None
        self.under: frozenset[int] = frozenset()
        if frame is None:
            self.frame, self.code, self.gen = 0, None, False
        else:
            self.frame, self.code = id(frame), frame.f_code
            # (entered by a generator, which may hold the block across a yield: what shadowed() looks at, with the
            # frames that were running when it was entered: a caller's block among them is one the generator's
            # block was opened inside, a contextmanager's or a fixture's on purpose)
            self.gen = bool(frame.f_code.co_flags & _GENERATORS) and not pin

    def running(self, start: Any) -> bool:
        """Whether the frame that entered the block is on the call stack from ``start`` up (a block of a
        suspended generator is not)."""
        f, held = start, self.held
        while f is not None:
            if f is held if held is not None else (id(f) == self.frame and f.f_code is self.code):
                return True
            f = f.f_back
        return False


_GENERATORS = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def _running_among(frame: Any, ids: set[int]) -> frozenset[int]:
    """Those of ``ids`` that are frames on the call stack from ``frame`` down (the walk stops once all are found)."""
    found = set()
    while frame is not None and len(found) < len(ids):
        if id(frame) in ids:
            found.add(id(frame))
        frame = frame.f_back
    return frozenset(found)


class UseAcrossYieldWarning(UserWarning):
    """A ``nest.use`` block held across a ``yield`` by a suspended generator decides what another frame's forward
    runs (interleaved streams), or was ended by another frame's block."""


def shadowed(a: Active, uses: tuple, here: Any) -> None:
    """Warn where the innermost open block belongs to a suspended generator while a block below it belongs to a
    running frame that was not running when that block was entered: two generators each holding ``use`` across a
    ``yield``, stepped in turn: this forward runs the other generator's sub-model, not its own block's. (A
    suspended generator's block entered inside the caller's running block, a ``contextmanager``, a class's
    ``__enter__`` or a fixture holding ``use`` around the caller's code, is what its author meant; so is one over a
    frame with no block of its own.) Called only when the innermost block was entered by a generator.

    The ids compared are exact: a running block's frame was alive, suspended or running, when the generator's
    block was entered, so no frame alive then shared its id."""
    top = uses[-1]
    if top.left or top.running(here):
        return
    if any(not e.left and not e.pin and e.frame not in top.under and e.running(here) for e in uses[:-1]):
        _across_yield(f"a forward runs {a.var.get(a).sub}, the sub-model of a nest.use block a suspended generator "
                      "holds across a yield, not that of the block it runs in (two generators, each holding `use` "
                      "across its yields, stepped in turn: interleaved streams)")


def _across_yield(what: str) -> None:
    warnings.warn(f"{what}. Enter `use` around each step of a generator, never across a yield (docs/mechanism.md)",
                  UseAcrossYieldWarning, stacklevel=caller_outside("torch"))  # (at the user's line)


class CheckpointContext:
    """``nest.checkpoint_context``: a ``context_fn`` for non-reentrant activation checkpointing whose
    recomputation runs under the plan in force when the forward ran. Hugging Face stores it on every
    checkpointed layer (``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"context_fn": ...})``),
    so it goes wherever the model goes: a deep copy of the model (EMA / teacher, an export) keeps this one,
    which holds the run-time state those copies share (a bound method of the nest would drag the nest into
    the copy, which refuses); a pickled one comes back as a context that pins nothing (the unpickled model
    follows no nest)."""

    __slots__ = ("state",)

    def __init__(self, state: Active) -> None:
        self.state = state

    def __call__(self) -> tuple[Any, Any]:
        return contextlib.nullcontext(), Use(self.state, self.state.plan())

    def __deepcopy__(self, memo: dict) -> "CheckpointContext":
        return self

    def __reduce__(self) -> Any:
        return _unpickled_context, ()


def _no_contexts() -> tuple[Any, Any]:
    """A ``context_fn`` that pins nothing: what a pickled :class:`CheckpointContext` becomes."""
    return contextlib.nullcontext(), contextlib.nullcontext()


def _unpickled_context() -> Any:
    return _no_contexts


#: per thread: ``(nest state, plan, dimension names)`` while ``nest.compile()``'s call runs with that plan's sliced
#: parameters (those dimensions slice them) swapped into the model's modules (``sortednet.compiled``): a larger
#: sub-model there would read them as its own
HANDED = threading.local()


def refuse_in_handover(active: Active, sub: SubModel, what: str) -> None:
    """Refuse switching ``active``'s nest to ``sub`` inside a ``nest.compile()`` call of another sub-model in this
    thread when ``sub`` is larger in a dimension (the modules hold the call's slices: the larger one would run
    them as its own weights; a smaller one cuts its prefixes of them, as of the full weights)."""
    held = HANDED.__dict__.get("held")
    if held is not None and held[0] is active and any(sub.get(n, 0) > held[1].sub.get(n, 0) for n in held[2]):
        raise SortedNetError(f"{what}({sub}) inside a call of nest.compile() that runs {held[1].sub}: while it runs, "
                             f"the model's sliced parameters are {held[1].sub}'s slices, handed to the graph, and "
                             f"{sub} would read them as its own weights. Run that part outside the compiled call, "
                             "or compile with torch.compile(model) (slicing inside the graph)")


class Use:
    """Context manager of ``nest.use``: sets the nest's context variable to ``plan``; on exit the caller's
    previous state (another ``use`` or none: the default) comes back, in this context only. One object
    may be entered by several threads at once, but not twice in one thread before it is left.

    Each context keeps a stack of its open blocks (``Active.uses``), so blocks left out of order (a
    generator holding ``use`` across a ``yield``) stay right. A block left while a later block is still
    open: when that later block belongs to a running frame (the caller closed or exhausted the generator
    inside its own ``use``), it keeps its sub-model and this block is only marked left, passed over when
    the later block ends; when it belongs to a suspended generator, this block's exit restores what was in
    force before it, as if the generator's block had ended too (its own exit then changes nothing).
    """

    __slots__ = ("active", "plan", "tokens", "stale")

    def __init__(self, active: Active, plan: Plan) -> None:
        self.active, self.plan, self.tokens = active, plan, {}
        self.stale: set[int] = set()  # (threads whose block was left in another thread: ended, token kept)

    def __enter__(self) -> SubModel:
        key = threading.get_ident()
        if key in self.tokens:
            raise SortedNetError(f"this nest.use({self.plan.sub}) block is already entered in this thread (by "
                                 "another task, or nested in itself); call nest.use(...) for each block")
        a = self.active
        if HANDED.__dict__.get("held") is not None:
            refuse_in_handover(a, self.plan.sub, "nest.use")
        try:
            self.tokens[key] = entry = _Open(a.var.get(a), sys._getframe(1))  # (the block on this context's stack)
            if entry.gen:  # (the blocks open below it whose frames are running: the ones it is entered inside)
                below = {e.frame for e in a.uses.get() if not e.left and not e.pin}
                if below:
                    entry.under = _running_among(sys._getframe(1).f_back, below)  # (none below: a generator
                    # stepped from C code)
            entry.utok = a.uses.set((*a.uses.get(), entry))
            entry.vtok = a.var.set(self.plan)
            a.open[id(self)] = self.plan.sub
            a.users[id(self)] = self
            return self.plan.sub
        except BaseException:  # a Ctrl-C after the sets: the with block never starts, __exit__ never runs
            self._leave(key, sys._getframe(1))
            raise

    def __call__(self, fn: Any) -> Any:
        """As a decorator: ``fn`` runs under the plan at every call (plain functions: a coroutine or
        generator function would run its body after the call returned, outside the plan)."""
        if inspect.iscoroutinefunction(fn) or inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise SortedNetError(f"@nest.use({self.plan.sub}) cannot decorate {getattr(fn, '__name__', fn)!r}, a "
                                 "coroutine or generator function: its body runs after the call returns. Enter "
                                 "`with nest.use(...)` inside its body, around each step (not across a yield)")
        return functools.wraps(fn)(in_plan(self.active, self.plan, fn))

    def __exit__(self, *exc: object) -> None:
        try:  # (_leave, inlined: the hot path)
            key = threading.get_ident()
            entry = self.tokens.get(key)
            if entry is not None:
                close_block(self.active, entry, sys._getframe(1))
                del self.tokens[key]
                self._closed(key)
            elif self.tokens:  # entered by another thread only: a generator holding it across a yield, stepped
                if len(self.tokens) == 1:  # from another thread (a pool): the entering thread keeps it; its block
                    self._closed(next(iter(self.tokens)), stale=True)  # has ended, unwrap no longer waits for it
                _left_elsewhere(self.plan.sub)
        except BaseException:  # a Ctrl-C part-way: the block must not stay in force (closing twice is harmless)
            self._leave(threading.get_ident(), sys._getframe(1))
            raise

    def _leave(self, key: int, here: Any) -> None:
        """Close this thread's block (none: left in another thread than the one that entered, or never
        entered); the token goes only once the block is closed."""
        entry = self.tokens.get(key)
        if entry is not None:
            close_block(self.active, entry, here)
            self.tokens.pop(key, None)
        self._closed(key)

    def _closed(self, key: int, stale: bool = False) -> None:
        """Thread ``key``'s block has ended (``stale``: left in another thread, its token kept): once no thread
        is inside a block of this object, it is no longer open for ``unwrap``."""
        if stale:
            self.stale.add(key)
        elif key not in self.tokens:
            self.stale.discard(key)
        if self.tokens.keys() <= self.stale:
            self.active.open.pop(id(self), None)
            self.active.users.pop(id(self), None)


class UseLeftElsewhereWarning(UserWarning):
    """A ``nest.use`` block left in another thread than the one that entered it."""


def _left_elsewhere(sub: Any) -> None:
    warnings.warn(f"a nest.use({sub}) block was left in another thread than the one that entered it (a generator "
                  "holding `use` across a yield, stepped from a thread pool or closed elsewhere): the entering "
                  f"thread's context stays on {sub} for its later work, which may serve other requests. Enter "
                  "`use` around each step of a generator, never across a yield (docs/mechanism.md)",
                  UseLeftElsewhereWarning, stacklevel=3)


def _reset(var: contextvars.ContextVar, token: Any, value: Any) -> None:
    """``var`` back to before ``token`` (a variable never set before leaves the context: a context that outlives
    many nests, the main thread's, would otherwise keep each nest's state, its model included, for ever);
    ``value`` where the token cannot be used here (another context)."""
    try:
        if token is not None:
            var.reset(token)
            return
    except (ValueError, RuntimeError):
        pass
    var.set(value)


def close_block(a: Active, entry: _Open, here: Any, *, keep_above: bool = False) -> None:
    """Leave the block ``entry`` from frame ``here`` (see :class:`Use`); ``keep_above``: blocks opened after
    it stay whatever their frames (a stale pin found later: the blocks opened since are the caller's)."""
    stack = a.uses.get()
    if stack and stack[-1] is entry and (len(stack) == 1 or not stack[-2].left):  # in order: the common case
        if len(stack) == 1:  # the outermost: the context holds the variables as before any block
            _reset(a.var, entry.vtok, entry.prev)
            _reset(a.uses, entry.utok, ())
        else:
            a.var.set(entry.prev)
            a.uses.set(stack[:-1])
        return
    i = next((j for j, e in enumerate(stack) if e is entry), None)
    if i is None:  # left in another context (a generator closed elsewhere): leave that context as it is
        return
    above = [e for e in stack[i + 1:] if not e.left]
    if above and (keep_above or all(e.running(here) for e in above)):  # later blocks of running frames stay
        a.uses.set((*stack[:i], _Open(entry.prev, None, left=True), *stack[i + 1:]))
        return
    ended = any(e.gen and not e.running(here) for e in above)
    while i > 0 and stack[i - 1].left:  # blocks below left out of order during this one: gone too
        i -= 1
    a.var.set(stack[i].prev)
    a.uses.set(stack[:i])
    if ended:  # (said once the state is restored: a warnings filter that raises must not leave a block open)
        _across_yield("a nest.use block ended while a block a suspended generator entered after it (holding `use` "
                      "across a yield) was still open: that block ends with it, and the generator's later forwards "
                      "run what was in force before both")


def in_plan(active: Active, plan: Plan, fn: Any, calls: int = 0) -> Any:
    """``fn`` wrapped to run under ``plan`` wherever it is called (checkpoint recomputation). ``calls``: the calls
    to come until its recomputation has run (1 for a checkpoint whose forward runs now, 2 for one not started),
    kept in ``active.pending`` with ``plan`` until then."""

    def run(*args: Any, **kwargs: Any) -> Any:
        left = active.pending.get(run)
        if left is not None:
            if left[0] <= 1:
                active.pending.pop(run, None)
            else:
                left[0] -= 1
        with Use(active, plan):
            pin = getattr(active.on_no_grad_read, "__self__", None)
            if pin is None:
                return fn(*args, **kwargs)
            uses = active.uses.get()  # (the block just opened: an activate in fn re-pins it, see Pin.repin)
            root = pin.enter_root(sys._getframe(), uses[-1] if uses else None)  # a recomputation is a forward:
            try:                                    # checkpoints created in it (nested ones) are pinned too
                return fn(*args, **kwargs)
            finally:
                pin.exit_root(root)

    run._sn_active, run._sn_inner = active, fn  # type: ignore[attr-defined]
    if calls:
        active.pending[run] = [calls, plan]
    return run


# Reentrant activation checkpointing (``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)``) runs its
# function again during backward, under whatever sub-model is in force THERE: a backward outside the forward's
# ``use`` block (or on an accelerator's autograd thread, whose context has none) would recompute another
# sub-model and silently give its gradients. Its backward node (the ``ctx`` of ``CheckpointFunction.forward``)
# keeps the function as ``run_function``; the nest wraps that function to run under the plan of the forward
# (what ``nest.checkpoint`` does by hand), found when the forward reads a sliced attribute without gradients
# (sortednet.wrap.Pin.no_grad_read) or starts the root forward without gradients (Pin.pre): :func:`pin_checkpoints`.
_CKPT_FORWARD = getattr(getattr(_checkpoint, "CheckpointFunction", None), "forward", None)
_CKPT_FORWARD = inspect.unwrap(_CKPT_FORWARD) if _CKPT_FORWARD is not None else None  # (counted below)
_CKPT_CODE = getattr(_CKPT_FORWARD, "__code__", None)


def _count_reentrant_forwards() -> None:
    """Count reentrant checkpoints' forwards while they run (``sortednet.dims.REENTRANT``), once per process, at
    import: the function is wrapped, what it does is not changed. Without the count, a sliced read without
    gradients looks for a checkpoint on its stack only while a root forward with gradients runs (a frame walk
    per read would slow inference), and a reentrant checkpoint entered below the root's ``__call__``
    (``checkpoint(model.forward, x)``, a lambda over the layers, a Depth stack of a ``ModuleDict`` root)
    recomputed under whatever sub-model was in force during backward, in silence."""
    cls = getattr(_checkpoint, "CheckpointFunction", None)
    raw = getattr(cls, "__dict__", {}).get("forward")
    original = getattr(raw, "__func__", None)
    if original is None or getattr(cls.forward, "_sn_counts", None) is not None or original.__code__ is not _CKPT_CODE:
        return  # (counted already: by another copy of sortednet, whose counts this copy's dims shares)

    @functools.wraps(original)
    def forward(ctx: Any, *args: Any) -> Any:
        if compiling():  # (traced: nothing reads the count there)
            return original(ctx, *args)
        me = threading.get_ident()
        with REENTRANT_LOCK:
            REENTRANT[0] += 1
            REENTRANT_THREADS.setdefault(me, []).append(ctx)
        try:
            return original(ctx, *args)
        finally:
            with REENTRANT_LOCK:
                REENTRANT[0] -= 1
                mine = REENTRANT_THREADS[me]
                mine.pop()
                if not mine:
                    del REENTRANT_THREADS[me]

    forward._sn_counts = (REENTRANT, REENTRANT_THREADS, REENTRANT_LOCK)  # type: ignore[attr-defined]
    cls.forward = staticmethod(forward)


_count_reentrant_forwards()


def _count_nonreentrant_forwards() -> None:
    """Count non-reentrant checkpoints' forwards while they run (``sortednet.dims.NONREENTRANT``), once per
    process, at import: the saved-tensor hook class torch enters around the checkpointed function is wrapped,
    what it does is not changed. A read under saved-tensor hooks then walks its stack for a checkpoint to pin only
    while one runs (hooks of the user's own, ``save_on_cpu`` with no checkpoint, cost no walk per read)."""
    cls = getattr(_checkpoint, "_checkpoint_hook", None)
    if not isinstance(cls, type) or NONREENTRANT[0] is not None:
        return  # (no such class: every read under hooks walks; or counted already, by another copy of sortednet)
    enter, leave = cls.__enter__, cls.__exit__
    NONREENTRANT[0] = 0

    @functools.wraps(enter)
    def __enter__(self: Any) -> Any:
        if compiling():  # (traced: nothing reads the count there)
            return enter(self)
        with REENTRANT_LOCK:
            NONREENTRANT[0] += 1
        try:
            got = enter(self)
        except BaseException:
            with REENTRANT_LOCK:
                NONREENTRANT[0] -= 1
            raise
        try:
            _note_composable(self, sys._getframe(1))
        except Exception:  # (never fail the checkpoint itself: its exit would not run, the count would stay up)
            pass
        return got

    @functools.wraps(leave)
    def __exit__(self: Any, *args: Any) -> Any:
        if compiling():
            return leave(self, *args)
        try:
            return leave(self, *args)
        finally:
            with REENTRANT_LOCK:
                NONREENTRANT[0] -= 1
                note = self.__dict__.pop("_sn_composable", None)
                if note is not None:
                    mine = COMPOSABLE.get(note[0], [])
                    for i in range(len(mine) - 1, -1, -1):
                        if mine[i] is note[1]:
                            del mine[i]
                            break
                    if not mine:
                        COMPOSABLE.pop(note[0], None)

    __enter__._sn_counts = NONREENTRANT  # type: ignore[attr-defined]
    __enter__._sn_open = COMPOSABLE  # type: ignore[attr-defined]
    cls.__enter__, cls.__exit__ = __enter__, __exit__


def _note_composable(hook: Any, gen: Any) -> None:
    """Record a non-reentrant checkpoint entered by the composable API's forward pre-hook
    (``torch.distributed._composable.checkpoint(module)``): its generator lives in the module's state, so no frame
    of ``checkpoint`` holds it for :func:`pin_checkpoints` to find; the module's call frame (the pre-hook's caller)
    stands for it while the forward runs (unpinned, a backward under another sub-model recomputed that one: another
    depth silently, another width with PyTorch's raw CheckpointError). ``gen``: the generator's frame, entering."""
    caller = getattr(gen, "f_back", None)
    if caller is None or caller.f_code is _NR_CODE:  # (``checkpoint``: found by its code)
        return
    code = caller.f_code
    if code.co_name != "forward_pre_hook" or "_composable" not in code.co_filename:
        return
    new_frame, anchor = gen.f_locals.get("new_frame"), caller.f_back
    if new_frame is None or anchor is None:
        return
    me, entry = threading.get_ident(), (anchor, new_frame)
    with REENTRANT_LOCK:
        COMPOSABLE.setdefault(me, []).append(entry)
    hook.__dict__["_sn_composable"] = (me, entry)


_count_nonreentrant_forwards()
# Non-reentrant checkpointing recomputes through ``_CheckpointFrame.recompute_fn``, made by a generator that
# ``torch.utils.checkpoint.checkpoint`` holds as ``gen`` while the checkpointed function runs. A recomputation
# under another Width / Heads sub-model fails PyTorch's own check (the saved slices change shape); under another
# depth nothing changes shape (``blocks[-1]`` is another block of the same shape): a Depth layer list read inside
# the checkpointed function pins it as the reentrant ones are (:meth:`sortednet.slicers.depth.DepthSlicer`).
# torch 2.14 moved that body (and ``gen``) into ``_checkpoint_impl``, which ``checkpoint`` calls: the function
# holding ``gen`` is the one looked for (``tests/test_autograd.py`` asserts it is found on the installed torch).


def _generator_holder() -> types.CodeType | None:
    for name in ("_checkpoint_impl", "checkpoint"):
        fn = getattr(_checkpoint, name, None)
        code = getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None
        if isinstance(code, types.CodeType) and "gen" in code.co_varnames:
            return code
    return None


_NR_CODE = _generator_holder()
_CODES = frozenset(c for c in (_CKPT_CODE, _NR_CODE) if c is not None)


def _pinned(ctx: Any, active: Active, attr: str = "run_function") -> bool:
    g = getattr(ctx, attr, None)
    while g is not None:
        if getattr(g, "_sn_active", None) is active:
            return True
        g = getattr(g, "_sn_inner", None)
    return False


def unpinned_reentrant(active: Active) -> bool:
    """Whether a reentrant checkpoint's forward runs in this thread that ``active`` has not pinned yet (cheap:
    read where ``REENTRANT[0]``; a walk of the stack pins them, once per checkpoint, not once per read)."""
    ctxs = REENTRANT_THREADS.get(threading.get_ident())
    return bool(ctxs) and not all(_pinned(c, active) for c in list(ctxs))


def pin_checkpoints(active: Active, plan: Plan, frame: Any, stop: Any = None) -> None:
    """Every reentrant checkpoint whose forward is on the call stack from ``frame`` up (not past ``stop``)
    recomputes under the plan in force when its forward started: ``plan`` (the one read now), unless a use
    block (or a root forward's pin) was opened inside the checkpointed function since; then the value before
    the outermost such block. Checkpoints this nest pinned already stay as they are (one checkpointed
    function may run modules of several nests, each pins its own)."""
    opened = COMPOSABLE.get(threading.get_ident()) if COMPOSABLE else None
    calls = {id(e[0]): e[1] for e in list(opened)} if opened else None
    f = frame
    while f is not None and f is not stop and f.f_code not in _CODES and (calls is None or id(f) not in calls):
        f = f.f_back  # the common case: none (cheap)
    if f is None or f is stop:
        return
    inside: set[int] = set()
    f = frame
    while f is not None and f is not stop:
        if f.f_code is _CKPT_CODE:
            ctx = f.f_locals.get("ctx")
            fn = getattr(ctx, "run_function", None)
            if fn is not None and not _pinned(ctx, active):
                ctx.run_function = in_plan(active, _plan_at(active, plan, inside), fn, 1)
        elif f.f_code is _NR_CODE:
            gen = f.f_locals.get("gen")
            frame_ = getattr(getattr(gen, "gi_frame", None), "f_locals", {}).get("new_frame")
            _pin_frame(active, frame_, _plan_at(active, plan, inside))
        elif calls is not None and id(f) in calls:  # a composable checkpoint's module call
            _pin_frame(active, calls[id(f)], _plan_at(active, plan, inside))
        inside.add(id(f))
        f = f.f_back


def _pin_frame(active: Active, frame: Any, plan: Plan) -> None:
    fn = getattr(frame, "recompute_fn", None)  # (a non-reentrant checkpoint's frame)
    if fn is not None and not _pinned(frame, active, "recompute_fn"):
        frame.recompute_fn = in_plan(active, plan, fn, 1)


_CKPT_MODULE = _checkpoint.__name__


def pin_recomputation(a: Active, plan: Plan, hooks: tuple[Any, Any]) -> None:
    """A sliced attribute read with saved-tensor ``hooks`` on (maybe a non-reentrant activation checkpoint's
    forward, whose recomputation during backward reads the weights again; with or without gradients): each
    checkpoint on the call stack recomputes under ``plan``, wherever backward runs (outside the forward's ``use``
    block it read the full widths: PyTorch's recomputation check failed on the shapes, or, where no saved shape
    changes, the gradients were another sub-model's, in silence). The stack walk runs once per checkpoint and
    plan: the next reads under the same innermost hooks and plan skip it where those hooks are a checkpoint's own
    (made per call, so they name one checkpoint). A user's hooks on top (``save_on_cpu``, functions reused in
    every checkpoint) name none: each read under them walks, while a non-reentrant checkpoint's forward runs
    (``NONREENTRANT``; none: nothing to pin, no walk)."""
    last = a.recomputes
    if last is not None and last[1] is plan and last[0]() is hooks[0]:
        return
    if NONREENTRANT[0] == 0:  # (no non-reentrant checkpoint's forward runs: hooks of the user's own, a recomputation)
        return
    pin_checkpoints(a, plan, sys._getframe(2))
    a.recomputes = None
    if getattr(hooks[0], "__module__", None) == _CKPT_MODULE:
        try:
            a.recomputes = (weakref.ref(hooks[0]), plan)
        except TypeError:  # (a pack hook that takes no weak reference: walked at every read)
            pass


def _plan_at(active: Active, plan: Plan, inside: set[int]) -> Plan:
    """The plan in force before the outermost open block entered in one of the frames ``inside``."""
    for e in active.uses.get():  # oldest first
        if not e.left and e.frame in inside:
            return active.default if e.prev is active else e.prev
    return plan


def heal_pins(a: Active, here: Any) -> None:
    """Leave the pins of forwards that never reached their post hook (an interrupt) in THIS context: a pin
    whose forward's frame is no longer running. Blocks opened since stay in force."""
    for e in a.uses.get():
        if e.pin and not e.left and not e.running(here):
            close_block(a, e, here, keep_above=True)


RECOMPUTE_PIN[0] = pin_recomputation  # (what Active.plan() calls: dims sits below this module)

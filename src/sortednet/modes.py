"""Run a nest's model in eval mode without changing what other threads see.

``module.training`` and BatchNorm settings are plain attributes shared by every
thread: ``model.eval()`` in one thread changes the model another thread is
serving or training. :func:`eval_mode` instead yields a private copy of the
module tree in eval mode that shares every parameter, buffer and dimension
with the nest (no tensor is copied; the copy follows ``nest.use`` of the
calling thread). ``profile``, ``evaluate`` and ``calibrate`` measure on it.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import dataclasses
import functools
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor as Tensor_
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import SortedNetError

if TYPE_CHECKING:
    from .nest import Nest

__all__ = ["eval_mode", "eval_view", "dry_run", "train_view", "seeded", "finish_all"]


def casts_stale() -> None:
    """Weights were written in place (permuted, put back): inside a ``torch.autocast`` region, drop autocast's
    cached lower-precision copies of the parameters, which it keys by tensor and does not refresh on an in-place
    write, so the forwards that follow (a check's, the user's own) would still compute with the old values.
    The cache is this thread's and refills at the next forward; outside autocast there is nothing to drop."""
    import torch

    if torch._C._is_any_autocast_enabled() and torch.is_autocast_cache_enabled():
        torch.clear_autocast_cache()


#: ``[model, None]`` while ``export`` copies the model (a slicer's export checks its plain tensor attributes against
#: every parameter and buffer of it, mapped by storage into the second item at the first such check: one held there
#: would be exported as a detached copy)
EXPORTING: contextvars.ContextVar[list | None] = contextvars.ContextVar("sortednet_exporting", default=None)

#: the device types whose autocast :func:`exact_math` turns off where it is on
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu")


@contextlib.contextmanager
def exact_math(leave_inference: bool = True) -> Iterator[None]:
    """Arithmetic that builds a model's weights (a Rank's merge in ``export`` / ``unwrap``) in the weights' own
    dtype, as trainable tensors: autocast off (inside ``torch.autocast`` ``U @ V`` is computed in bf16: a weight
    of another dtype than its bias, or a rounded one) and out of ``inference_mode`` (a weight made there is an
    inference tensor: autograd never gives it a gradient, in silence). ``leave_inference=False``: stays in
    inference_mode (weights merged into a model whose other tensors are inference tensors: one of each kind
    could not run together)."""
    with contextlib.ExitStack() as stack:
        if torch._C._is_any_autocast_enabled():
            for dev in _AUTOCAST_DEVICES:
                try:
                    on = torch.is_autocast_enabled(dev)
                except (RuntimeError, TypeError, ValueError):  # (a device type this build does not know)
                    continue
                if on:
                    stack.enter_context(torch.autocast(dev, enabled=False))
        if leave_inference and torch.is_inference_mode_enabled():
            grad = torch.is_grad_enabled()
            stack.enter_context(torch.inference_mode(False))  # (which turns grad mode on: set back as it was)
            stack.enter_context(torch.set_grad_enabled(grad))
        yield


def finish_all(steps: Sequence[Callable[[], Any]]) -> None:
    """Run every step of a commit (or of putting state back) to the end, even when one raises: stopping
    half-way would leave the model half changed (some modules plain and others sliced at unwrap, some
    BatchNorm layers calibrated and others not, a dry run's statistics half restored). The steps are
    idempotent and cannot fail on their own (reference swaps, copies of values computed before): one that a
    KeyboardInterrupt (a Ctrl-C, or a subclass of it) stopped runs again, once; any other error (a custom
    slicer's ``restore`` breaking its contract) is not retried. The first error is raised after the last step."""
    first: BaseException | None = None
    i, again = 0, False
    while True:  # (no call outside the try: a Ctrl-C is handled only after a call returns)
        try:
            while i < len(steps):
                steps[i]()
                i, again = i + 1, False
            break
        except BaseException as e:  # noqa: PERF203 (every step must run)
            first = first if first is not None else e
            if again or not isinstance(e, KeyboardInterrupt):  # (retried once already, or not an interrupt)
                i, again = i + 1, False
            else:
                again = True
    if first is not None:
        raise first


def restore_modes(modes: Sequence[tuple[nn.Module, bool]]) -> None:
    """Each module's ``training`` flag back (``(module, flag)`` pairs), every one even after a Ctrl-C part-way:
    a model left partly in training mode would run dropout and update BatchNorm statistics in silence."""
    finish_all([functools.partial(setattr, m, "training", training) for m, training in modes])


@contextmanager
def dry_run(model: nn.Module, buffers: bool = True) -> Iterator[_SaveOnWrite]:
    """Run ``model``'s own forward without leaving a trace: on exit every parameter and buffer holds again
    what it held on entry. For checks that run the user's forward (``nest.check``, ``discover``,
    ``from_transformers``' self-check), which promise to change nothing. Yields the watch on the parameters
    (``saved``: ``{id: (parameter, its value before the first write)}`` of those written into so far).

    Buffers (a call counter, a running statistic) are copied on entry. A parameter is copied just before
    the first op that writes into its storage (weight clipping in a forward, running statistics kept as
    parameters, an ``nn.Embedding(max_norm=...)`` renormalising its rows), seen by a dispatch mode, so an
    untouched model costs no copy of its weights. A parameter or buffer that the forward replaced
    (``self.count = self.count + 1``, ``p.data = ...``) is put back.

    ``buffers=False``: a buffer is copied as a parameter is, just before this thread first writes into it (the
    forward runs on a view holding copies of them, see :func:`eval_view`'s ``own_buffers``; a hook or closure
    may still hold the model's own), and only those are put back: what other threads write meanwhile (a serving
    thread's cache, a training thread's running statistics) stays.
    """

    refuse_script(model, "a dry run of the model's forward")
    _DRY.depth = getattr(_DRY, "depth", 0) + 1
    try:
        with _dry_run(model, buffers) as guard:
            yield guard
    finally:
        _DRY.depth -= 1


#: this thread's open dry runs (their forwards leave no trace: a calibration does not go stale by them)
_DRY = threading.local()


def in_dry_run() -> bool:
    """Whether this thread runs a forward inside :func:`dry_run` (which puts every parameter and buffer back)."""
    return bool(getattr(_DRY, "depth", 0))


@contextmanager
def _dry_run(model: nn.Module, buffers: bool) -> Iterator[_SaveOnWrite]:
    import torch

    slots = [(m, d, name, t) for m in model.modules() for d in ((m._parameters, m._buffers) if buffers
                                                                else (m._parameters,))
             for name, t in d.items() if isinstance(t, torch.Tensor)]
    params = {id(t): t for m, d, _, t in slots if d is m._parameters}
    datas = [(p, p.data) for p in params.values()]  # the storage each parameter holds now (no copy)
    saved = [(t, t.detach().clone()) for m, d, _, t in slots if d is m._buffers]
    # parameters whose storage the dispatch mode cannot watch (tensor subclasses): copied now
    saved += [(p, p.detach().clone()) for p in params.values() if p.device.type != "meta" and not _storage(p)
              and p.numel()]
    watched = list(params.values())
    if not buffers:  # (this thread's writes only: copied before the first, as parameters are)
        watched += list({id(b): b for b in model.buffers()}.values())
    guard = _SaveOnWrite(watched)
    def put_back() -> None:  # (idempotent: run to the end even after a Ctrl-C, see finish_all)
        with torch.no_grad():
            for _, d, name, t in slots:
                if d.get(name) is not t:
                    d[name] = t
            for p, data in datas:
                now = p.data
                if (_storage(now) != _storage(data) or now.shape != data.shape or now.stride() != data.stride()
                        or now.storage_offset() != data.storage_offset()):
                    p.data = data
            for t, v in [*saved, *guard.saved.values()]:
                if t.shape != v.shape or t.layout != torch.strided:  # resized in place (resize_, set_), or a
                    t.data = v  # sparse / other layout (no torch.equal for it): its old shape and values back
                elif not t.is_meta and not torch.equal(t, v):  # (meta: no values to put back)
                    t.copy_(v)

    try:  # (under autocast, PyTorch's fused encoder-layer fast path fails inside a dispatch mode: it steps aside)
        with guard, (NoFastPath() if torch._C._is_any_autocast_enabled() else contextlib.nullcontext()):
            yield guard
    finally:
        finish_all([put_back])


class NoFastPath(torch.overrides.TorchFunctionMode):
    """A pass-through torch-function mode. PyTorch's fused attention / encoder fast paths step aside while any
    such mode is active (``has_torch_function``), and modes are per thread: unlike
    ``torch.backends.mha.set_fastpath_enabled``, no other thread is affected."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return func(*args, **(kwargs or {}))


def refuse_script(model: nn.Module, what: str) -> None:
    """A TorchScript module inside ``model`` (``torch.jit.script`` / ``trace``) holding tensors or children is
    refused, named: checks, discovery, sorting and FLOPs counting run and copy the Python modules, and a
    scripted part keeps its own compiled forward and parameter tables, which they cannot follow (nor restore).
    A stateless scripted leaf (an activation) is copied and run like any module."""
    script = torch.jit.ScriptModule
    for path, m in model.named_modules():
        if isinstance(m, script) and (next(m.parameters(), None) is not None or next(m.buffers(), None) is not None
                                      or next(m.children(), None) is not None):  # (a stateless leaf runs fine)
            raise SortedNetError(f"{path or '<root>'!r} is a TorchScript module ({type(m).__name__}, from "
                                 f"torch.jit.script / trace): {what} follows the model's Python modules and cannot "
                                 "run or copy a scripted part. Use the eager module here and script afterwards "
                                 "(nest.export(sub) is a plain model that torch.jit.script accepts)")


def _storage(t: Any) -> int:
    """Address of ``t``'s storage; 0 where it has none to write (meta, empty, a subclass without one)."""
    try:
        return 0 if t.device.type == "meta" else t.untyped_storage().data_ptr()
    except Exception:
        return 0


class _SaveOnWrite(TorchDispatchMode):
    """Copies a tensor of ``tensors`` once, just before the first op that writes into its storage.
    Higher-order operators (``torch.cond``, flex attention) pass through, unwatched inside."""

    supports_higher_order_operators = True

    def __init__(self, tensors: Iterable[Any]) -> None:
        super().__init__()
        self.by_storage = {}
        for t in tensors:
            key = _storage(t)
            if key:
                self.by_storage.setdefault(key, []).append(t)
        self.saved: dict[int, tuple[Any, Any]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        schema = getattr(func, "_schema", None)
        if schema is None:  # a higher-order operator: this mode is popped while it runs
            return func(*args, **kwargs)
        if self.by_storage and schema.is_mutable:
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is None or not arg.alias_info.is_write:
                    continue
                value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(t, Tensor_):
                        for owner in self.by_storage.get(_storage(t), ()):
                            if id(owner) not in self.saved:
                                self.saved[id(owner)] = (owner, owner.detach().clone())
        return func(*args, **kwargs)


@contextmanager
def eval_mode(nest: Nest, *, own_state: Iterable[nn.Module] = (), own_buffers: bool = False,
              replace: Mapping[int, object] | None = None) -> Iterator[tuple[nn.Module, dict[int, nn.Module]]]:
    """``(view, copies)``: a private eval-mode copy of ``nest.model`` sharing its tensors, and a map
    ``id(original module) -> its copy``.

    Modules in ``own_state`` get a private sortednet state (``_sn.extra``) and a
    private ``num_batches_tracked``, so a caller may put them in training mode
    and change those on the copy alone (BatchNorm calibration). ``own_buffers``: every buffer is a copy, so
    the view's forwards write none of the model's (a call counter, a cache kept in a buffer).

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> from sortednet.modes import eval_mode
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    >>> nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="2"))
    >>> with eval_mode(nest) as (view, _):
    ...     view.training, view[0].weight is model[0].weight, model.training
    (False, True, True)
    """
    view, copies = eval_view(nest.model, keep=nest.dims, own_state=own_state, own_buffers=own_buffers,
                             replace=replace)
    yield view, copies  # type: ignore[misc]


def eval_view(model: nn.Module, *, keep: Iterable[object] = (), own_state: Iterable[nn.Module] = (),
              own_stats: bool = False, own_buffers: bool = False,
              replace: Mapping[int, object] | None = None) -> tuple[nn.Module, dict[int, nn.Module]]:
    """A private eval-mode copy of ``model``'s module tree sharing every parameter, buffer,
    sortednet state and object in ``keep`` (see :func:`eval_mode`), and ``id(module) -> copy``.
    ``own_stats``: every BatchNorm / InstanceNorm copy gets copies of its running statistics and batch
    counter instead (a training-mode forward of the view then leaves the model's untouched). ``own_buffers``:
    every buffer is a copy (ties kept), so a forward of the view writes none of the model's. ``replace``:
    ``id(tensor) -> stand-in`` the view holds instead (every holder of a tied tensor gets the same one).

    >>> import torch.nn as nn
    >>> from sortednet.modes import eval_view
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    >>> view, _ = eval_view(model)
    >>> view.training, model.training, view[0].weight is model[0].weight
    (False, True, True)
    """
    refuse_script(model, "a private eval-mode view of the model")
    own = {id(m) for m in own_state}
    memo: dict[int, object] = {id(d): d for d in keep}
    for t in model.parameters():
        memo[id(t)] = t
    if own_buffers:
        memo.update(_own_copies(list(model.buffers())))
    else:
        memo.update((id(t), t) for t in model.buffers())
    for m in model.modules():
        st = m.__dict__.get("_sn")
        if st is not None:
            memo[id(st)] = dataclasses.replace(st, extra=dict(st.extra)) if id(m) in own else st
        if id(m) in own and getattr(m, "num_batches_tracked", None) is not None:
            memo[id(m.num_batches_tracked)] = m.num_batches_tracked.clone()
        if own_stats and isinstance(m, nn.modules.batchnorm._NormBase):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                t = m.__dict__["_buffers"].get(name)
                if t is not None:
                    memo[id(t)] = t.clone()
    memo.update(replace or {})
    view = copy_model(model, memo, f"a private eval-mode view of {type(model).__name__} (needed so that no other "
                                   "thread sees a mode change)")
    view.train(False)
    return view, {id(m): memo[id(m)] for m in model.modules()}  # type: ignore[misc]


def _own_copies(tensors: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """``id(tensor) -> copy`` where copies of tensors that share memory share it too (a buffer registered as a
    view of another, ``self.head = self.cache[:1]``: a write into one is read through the other, as in the model):
    one copy of the bytes two or more of them hold in one storage (not the rest of it), each rebuilt on it with
    its own offset, size and strides. A tensor alone in its storage is cloned by itself."""
    def key(t: torch.Tensor) -> tuple | None:
        try:
            st = t.untyped_storage()
            return (t.device, st.data_ptr(), st.nbytes()) if st.data_ptr() and type(t) is torch.Tensor else None
        except Exception:  # (a tensor of no storage: meta, a subclass)
            return None

    groups: dict[tuple, list[torch.Tensor]] = {}
    out = {}
    for t in tensors:
        k = key(t)
        if k is None:
            out[id(t)] = t.detach().clone()
        else:
            groups.setdefault(k, []).append(t)
    for ts in groups.values():
        if len(ts) == 1:
            out[id(ts[0])] = ts[0].detach().clone()
            continue
        spans = [(t.storage_offset() * t.element_size(), (t.storage_offset() + 1 + sum(
            (n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()) for t in ts if t.numel()]
        lo = min((a for a, _ in spans), default=0) // 16 * 16  # (a multiple of every element size: offsets stay whole)
        hi = max((b for _, b in spans), default=lo)
        whole = torch.empty(0, dtype=torch.uint8, device=ts[0].device).set_(
            ts[0].untyped_storage(), 0, (ts[0].untyped_storage().nbytes(),), (1,))
        storage = whole[lo:hi].clone().untyped_storage()  # (the bytes the buffers hold, not the whole storage)
        for t in ts:
            out[id(t)] = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                storage, (t.storage_offset() * t.element_size() - lo) // t.element_size() if t.numel() else 0,
                t.size(), t.stride())
    return out


def plain_items(x: object) -> list[object] | None:
    """What a plain container holds (a list, tuple, set, dict's keys and values, deque, ``SimpleNamespace``'s
    attributes, ``functools.partial``'s function and arguments; subclasses too), or None for anything else."""
    if isinstance(x, functools.partial):
        return [x.func, *x.args, *x.keywords.values()]
    if isinstance(x, dict):
        return [*x, *x.values()]
    if isinstance(x, (list, tuple, set, frozenset, collections.deque)):
        return list(x)
    if isinstance(x, types.SimpleNamespace):
        return list(vars(x).values())
    return None


def plain_leaves(v: object) -> list[object]:
    """What a plain attribute value holds, at any depth (a container met twice followed once): ``v`` itself, or
    the leaves of the containers :func:`plain_items` opens. How export finds blocks, sliced tensors and modules it
    replaces kept outside ``_modules``."""
    out: list[object] = []
    seen: set[int] = set()
    stack = [v]
    while stack:  # (no recursion: an attribute nested thousands of levels deep is walked too)
        x = stack.pop()
        items = plain_items(x)
        if items is None:
            out.append(x)
        elif id(x) not in seen:
            seen.add(id(x))
            stack.extend(reversed(items))
    return out


def held_leaves(v: object, budget: int = 10_000, seen: set[int] | None = None, code: bool = True,
                containers: set[int] | None = None) -> list[object]:
    """:func:`plain_leaves` that also opens the objects a deep copy copies by their attributes (a dataclass, a
    class instance: ``__dict__`` and ``__slots__``), as far as ``budget`` objects: where a tensor can hide from
    the plain walk and still reach an exported copy. Modules and tensors are leaves (not opened), and so are
    optimizers and learning-rate schedulers (they hold parameters to update, not to compute with). ``seen``: the
    objects (not plain containers) opened by earlier calls, not opened again: a vocabulary of objects every layer
    holds is walked once. ``code``: open what functions close over (a deep copy keeps functions as they are).
    ``containers``: the plain containers opened by earlier calls, for a caller that needs each found once only
    (by default they are opened again at each call, as :func:`plain_leaves` does). Strings, numbers and None are
    not returned: they hold nothing (a vocabulary of 300k words is not 600k leaves)."""
    out: list[object] = []
    seen = set() if seen is None else seen
    local: set[int] = set() if containers is None else containers
    stack = [v]
    while stack:
        x = stack.pop()
        if (isinstance(x, _LEAVES) or x is None or id(x) in seen or id(x) in local or budget <= 0
                or str(getattr(type(x), "__module__", "")).startswith("sortednet.")):  # (sortednet's own
            out.append(x)                                                 # objects: copied as they decide)
            if isinstance(x, torch.Tensor) and id(x) not in seen and budget > 0:
                seen.add(id(x))  # (a tensor's own Python attributes, t.src = weight: a deep copy copies them)
                d = x.__dict__ if type(x) is torch.Tensor or isinstance(x, torch.nn.Parameter) else {}
                stack.extend(reversed(list(d.values())))
            continue
        budget -= 1
        items = plain_items(x)
        if items is None:
            seen.add(id(x))
            items = object_values(x)
            if isinstance(x, types.FunctionType) and code:  # (a lambda reading a weight it closed over)
                items = [*items, *function_values(x)]
            elif isinstance(x, (types.MethodType, types.BuiltinMethodType)):  # (Holder(w).scale; w.t: what
                items = [*items, x.__self__]                                  # it is bound to, a copy keeps)
                if isinstance(x, types.MethodType) and code:
                    items.append(x.__func__)
            out.append(x)
        else:
            local.add(id(x))
            if type(x) not in _PLAIN:  # (a dict or list subclass: its own attributes are copied too)
                items = [*items, *object_values(x)]
        stack.extend([i for i in reversed(items) if type(i) not in _ATOMIC])
    return out


#: the types of values that hold nothing: not walked, not returned (exact types: a subclass may have attributes)
_ATOMIC = frozenset({str, bytes, int, float, complex, bool, type(None)})


_PLAIN = (dict, list, tuple, set, frozenset, collections.deque, types.SimpleNamespace, functools.partial)


def ours(hook: Any) -> bool:
    """Whether a hook table's entry is sortednet's (a function, method, partial or object of this package; torch
    wraps ``with_module`` hooks in an object holding the hook)."""
    module = hook_module(hook)
    return module == "sortednet" or module.startswith("sortednet.")


def hook_module(hook: Any) -> str:
    """The name of the module that defines a hook table's entry (what it holds, for torch's wrapper of a
    ``with_module`` hook, a bound method or a partial)."""
    for attr in ("hook", "__func__", "func"):
        hook = attr_of(hook, attr, hook)
    module = attr_of(hook, "__module__")
    return module if isinstance(module, str) else type(hook).__module__


def attr_of(x: object, name: str, default: Any = None) -> Any:
    """``getattr(x, name, default)``, ``default`` also where the read raises something else than AttributeError
    (a user's object whose ``__getattr__`` raises KeyError for what it lacks)."""
    try:
        return getattr(x, name, default)
    except Exception:
        return default


def function_values(fn: Any) -> list[object]:
    """What a function closes over (its filled cells) and its defaults, keyword-only ones too: what it keeps,
    as it is, in a deep copy."""
    out: list[object] = []
    for cell in attr_of(fn, "__closure__") or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # (an empty cell)
            continue
    return [*out, *(attr_of(fn, "__defaults__") or ()), *(attr_of(fn, "__kwdefaults__") or {}).values()]


_LEAVES = (torch.nn.Module, torch.Tensor, type, types.ModuleType, str, bytes, int, float, complex,
           torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)


def object_values(x: object) -> list[object]:
    """The values of an object's ``__dict__`` and ``__slots__`` (none for a proxy that refuses them). Not the state
    a class's own ``__getstate__`` gives: calling it is the user's code, with its costs and side effects (a deep
    copy calls it; export's count of the copy's references sees what it hands over)."""
    try:
        d = getattr(x, "__dict__", None)
        items = list(d.values()) if isinstance(d, dict) else []
        for cls in type(x).__mro__:  # (slots a parent class declares too)
            slots = cls.__dict__.get("__slots__", ())
            items += [getattr(x, n) for n in ([slots] if isinstance(slots, str) else slots)
                      if isinstance(n, str) and n not in ("__dict__", "__weakref__") and hasattr(x, n)]
        return items
    except Exception:
        return []


def copy_model(model: nn.Module, memo: dict[int, object], what: str) -> nn.Module:
    """``copy.deepcopy(model, memo)``, where a tensor attribute computed from parameters (legacy
    ``nn.utils.weight_norm``'s ``weight``, which deepcopy refuses; its hook recomputes it at each forward)
    is copied as its value without history, a lock (``threading.Lock`` / ``RLock``, alone or inside a
    ``Condition``, a ``queue.Queue``: deepcopy refuses them) as a new, released lock of the same kind, and any
    other attribute deepcopy refuses is named in a :class:`SortedNetError` saying that ``what`` could not be
    made."""
    for m in model.modules():
        for v in m.__dict__.values():
            if isinstance(v, torch.Tensor) and not v.is_leaf and id(v) not in memo:
                memo[id(v)] = v.detach().clone()
    start = dict(memo)
    try:
        return _copied_whole(model, copy.deepcopy(model, memo), memo, start, what)
    except SortedNetError:
        raise
    except Exception as e:  # an attribute that cannot be copied (a lock, a process group, ...)
        error = e
    fresh = _fresh_locks(model, memo)
    if fresh:  # (the copy again from the start: the failed one left half-made objects in the memo)
        memo.clear()
        memo.update(start)
        memo.update(fresh)
        if isinstance(getattr(memo, "reads", None), collections.Counter):  # (export's count of the copy)
            memo.reads.clear()  # type: ignore[attr-defined]
        try:
            return _copied_whole(model, copy.deepcopy(model, memo), memo, start, what)
        except SortedNetError:
            raise
        except Exception as e:
            error = e
    own = _own_deepcopies(model)
    raise SortedNetError(f"cannot make {what}: deepcopy failed with {type(error).__name__}: {error}"
                         f"{_uncopyable(model, memo)}. Keep such objects off the model's modules" + (
                             f" (or: {own} define __deepcopy__, which must pass the memo on, copy.deepcopy(value, "
                             "memo) for each attribute)" if own else "")) from error


def _own_deepcopies(model: nn.Module) -> list[str]:
    """The classes of ``model``'s modules that define a ``__deepcopy__`` of their own (not sortednet's)."""
    return sorted({type(m).__name__ for m in model.modules() if getattr(type(m), "_sn_sliced", False) is False
                   and callable(getattr(type(m), "__deepcopy__", None))})


def _copied_whole(model: nn.Module, new: nn.Module, memo: Mapping[int, object], start: Mapping[int, object],
                  what: str) -> nn.Module:
    """``new``, a deep copy of ``model``, if it went through every sliced module (each copy is made by the sliced
    class's ``__deepcopy__``, which enters it in ``memo``); a ``__deepcopy__`` of the user's own that builds a
    new model (``A(self.h)`` loaded from ``state_dict()``) or leaves ``memo`` out gives a copy without them."""
    missed, seen, stack = [], set(), [model]
    while stack:  # (from the root, not into what the memo held before the copy: a Depth's skipped blocks)
        m = stack.pop()
        if id(m) in seen or (m is not model and id(m) in start):
            continue
        seen.add(id(m))
        st = m.__dict__.get("_sn")
        if st is not None and id(m) not in memo:
            missed.append(st.path or "<root>")
        stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    if missed:
        raise SortedNetError(f"cannot make {what}: the deep copy of the model did not copy its sliced module(s) "
                             f"{missed[:3]} (a __deepcopy__ of {_own_deepcopies(model) or 'a class'} builds its "
                             "copy anew or leaves the memo out); a wrapped model's copy must deep-copy its modules: "
                             "copy.deepcopy(value, memo) for each attribute, or no __deepcopy__ of its own")
    return new


_LOCK, _RLOCK = type(threading.Lock()), type(threading.RLock())


def _fresh_locks(model: nn.Module, memo: Mapping[int, object]) -> dict[int, object]:
    """A deep copy's memo entries (by id) giving the copy new locks for the locks the attributes of ``model``'s
    modules hold (at any depth: :func:`held_leaves`) that ``memo`` does not map, and the new locks' methods for
    their methods (a ``Condition`` keeps its lock's ``acquire`` / ``release``, which a deep copy keeps as they
    are: bound to the live lock)."""
    seen: set[int] = set()
    leaves = [x for m in model.modules() for k, v in m.__dict__.items() if k not in ("_modules", "_parameters",
              "_buffers") for x in held_leaves(v, seen=seen)]
    out: dict[int, object] = {id(x): threading.RLock() if isinstance(x, _RLOCK) else threading.Lock()
                              for x in leaves if isinstance(x, (_LOCK, _RLOCK)) and id(x) not in memo}
    for x in leaves:
        owner = getattr(x, "__self__", None) if isinstance(x, types.BuiltinMethodType) else None
        if owner is not None and id(owner) in out and id(x) not in memo:
            out[id(x)] = getattr(out[id(owner)], x.__name__)
    return out


def _uncopyable(model: nn.Module, memo: dict[int, object]) -> str:
    """`` (module 'a.b', attribute 'lock')``: the first attribute of a module of ``model`` that deepcopy refuses."""
    for name, m in model.named_modules():
        for key, v in m.__dict__.items():
            if key in ("_modules", "_parameters", "_buffers") or id(v) in memo:
                continue
            try:
                copy.deepcopy(v, dict(memo))
            except Exception:
                return f" (module {name or type(model).__name__!r}, attribute {key!r})"
    return ""


def train_view(nest: Nest, *, running_stats: bool = False) -> tuple[nn.Module, dict[int, nn.Module]]:
    """Like :func:`eval_view` but in TRAINING mode, with dropout off: ``nn.Dropout*`` modules and float
    attributes named ``*drop*`` (Hugging Face attention dropout and layerdrop, timm's DropPath ``drop_prob``) are
    0 on the private copies, so
    training-only branches (auxiliary heads, batch statistics) can be compared run against run.
    BatchNorm / InstanceNorm running statistics and batch counters are the view's own copies (a training forward
    updates those, not the model's, which another thread may be reading), except with ``running_stats``; other
    buffers a training forward writes are shared: run it under :func:`dry_run`. ``running_stats``:
    BatchNorm copies normalise with their running statistics (eval) while the rest trains: a comparison of
    two runs then sees the training-only branches without BatchNorm over a small batch magnifying float
    rounding; they read the model's own statistics (a permutation of the model's reaches them)."""
    view, copies = eval_view(nest.model, keep=nest.dims, own_stats=not running_stats)
    view.train(True)
    if running_stats:
        for m in view.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(False)
    for m in view.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for k, v in list(vars(m).items()):
            if "drop" in k and type(v) is float:  # dropout, drop_prob / drop_path_rate (stochastic depth), layerdrop
                m.__dict__[k] = 0.0
    return view, copies


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """A fixed random stream inside (the CPU's, and every CUDA device's once CUDA is in use), the caller's
    streams untouched outside. Not ``torch.manual_seed``: it seeds every device's generator, and the CUDA ones
    it would leave seeded (or queue the seed for CUDA's first use), changing the user's dropout masks on a
    GPU."""
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        yield


def rebind_kept_forward(m: nn.Module, before: type) -> None:
    """``m``'s class was ``before`` and is another now (wrap, unwrap, an export's copy): a forward a hook kept
    bound to ``m`` from the class before calls the class's own now. accelerate's hooks keep the module's forward
    as ``_old_forward`` to call it (stock ``nn.MultiheadAttention.forward`` would run a sub-model with the full
    head count; the sliced class's would read sortednet's state after unwrap), and removing them leaves that
    bound forward on the instance (dropped: the class's applies)."""
    was, now = getattr(before, "forward", None), type(m).forward
    if was is None or was is now:
        return
    for name in ("_old_forward", "forward"):
        kept = m.__dict__.get(name)
        if getattr(kept, "__self__", None) is m and getattr(kept, "__func__", None) is was:
            if name == "forward":
                del m.__dict__["forward"]
            else:
                m.__dict__[name] = types.MethodType(now, m)

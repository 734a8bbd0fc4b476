"""Export: a plain, physically smaller copy of one sub-model.

The deep copy skips every full-size tensor a slicer replaces and every block
a Depth dimension skips; each slicer then turns its module's copy into a
plain module with contiguous, sliced tensors and the original class.

Tensors the model shares (tied input / output embeddings, one weight used by
two modules) stay shared: the export holds ONE tensor per source tensor, so
it holds exactly ``cost(sub, "params")`` parameters. Two users that would
need different slices of one tensor cannot be tied in a plain model: export
refuses them. No tensor of the export aliases the live model.
"""

from __future__ import annotations

import collections
import copy
import dis
import functools
import os
import sys
import types
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import SortedNetError
from .modes import (
    _ATOMIC,
    EXPORTING,
    attr_of,
    copy_model,
    exact_math,
    function_values,
    held_leaves,
    object_values,
    ours,
    plain_items,
    plain_leaves,
    rebind_kept_forward,
)
from .submodel import SubModel

if TYPE_CHECKING:
    from .nest import Nest

__all__ = ["export_submodel"]


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def export_submodel(nest: Nest, sub: SubModel) -> nn.Module:
    """A plain copy of ``sub`` of ``nest`` (see :meth:`Nest.export`).

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> class LM(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb, self.head = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)
    ...         self.head.weight = self.emb.weight             # tied
    ...     def forward(self, i): return self.head(self.emb(i))
    >>> lm = LM()
    >>> nest = sn.wrap(lm, sn.Width("d", [4, 8], out="emb", inp="head"))
    >>> small = export_submodel(nest, nest.smallest)
    >>> small.head.weight is small.emb.weight, small.emb.weight.shape, nest.cost("d=4")
    (True, torch.Size([10, 4]), 40)
    """
    model = nest.model
    token = EXPORTING.set([model, None])
    try:
        return _export(nest, model, sub)
    finally:
        EXPORTING.reset(token)


def _export(nest: Nest, model: nn.Module, sub: SubModel) -> nn.Module:
    with nest.use(sub), torch.no_grad(), exact_math():  # (a Rank's merged weight: fp32 under autocast, trainable)
        memo, skipped, drop, kept, dropped = _copy_plan(nest)
        shared = _refuse_held_aside(model, dropped, {k: t for k, t in memo.items() if isinstance(t, Tensor)}, sub,
                                    kept)
        _refuse_unrebuilt(nest, sub, kept)
        memo = _CountingMemo(memo, {k for k, t in memo.items() if isinstance(t, Tensor)})
        expected = _not_copied(model, memo, kept, shared)
        new = copy_model(model, memo, f"an exported copy of {type(model).__name__}")
        _refuse_held_in_objects(model, new, memo, sub, expected)
        held: dict[int, list[tuple[str, nn.Module, str]]] | None = None  # (built at the first replaced module)
        replaced: dict[int, nn.Module] = {}  # id(copied module) -> the module replacing it in the export
        for path in sorted(nest._sliced, key=lambda p: -p.count(".") - bool(p)):
            live = nest._sliced[path]
            cpath = kept.get(id(live))  # (None: in a skipped block that nothing kept holds; one also held
            if cpath is None:           # elsewhere, self.final = self.blocks[-1], runs and is exported there)
                continue
            c = new.get_submodule(cpath) if cpath else new
            sliced = type(c)
            c.__class__ = live._sn.cls
            del c.__dict__["_sn"]
            rebind_kept_forward(c, sliced)
            r = live._sn.slicer.export(live, c)
            if r is c:
                _check_exported(live, c, path, sub)
            if r is not c:
                replaced[id(c)] = r
                _carry_hooks(c, r)
                if not path:
                    new = r
                for parent in new.modules():  # every name that holds the module (``self.b = self.a``)
                    for name, child in list(parent._modules.items()):
                        if child is c:
                            parent._modules[name] = r
                if held is None:
                    held = _held_index(new)
                _replace_held(held, c, r, sub)
        _drop_wrap_hooks(nest._hooks, new)
        for m in new.modules():  # (a Rank nest's save guard: the export holds stock weights)
            if getattr(m.__dict__.get("save_pretrained"), "_sn_save_guard", False):
                del m.__dict__["save_pretrained"]
        for m in new.modules():  # their layer count attribute follows a Depth-cut layer list
            torch_stack = isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder))
            if torch_stack and isinstance(m.__dict__.get("num_layers"), int):
                m.num_layers = len(m.layers)
            if isinstance(m, nn.TransformerEncoder) and m.__dict__.get("use_nested_tensor"):
                _keep_nested_path(m)
        _share_once(model, new, skipped, sub)
        _rebind_weak_refs(new, memo, _counterparts(model, memo, replaced))
        _warn_live_hooks(model, new, sub)
        _instance_forwards(model, new, sub, kept)
    return new


def _copy_plan(nest: Nest) -> tuple[dict[int, object], list[str], list[tuple[nn.Module, str]], dict[int, str],
                                    set[int]]:
    """What the export of the active sub-model copies: the deep copy's memo (sortednet state and skipped blocks
    to None, sliced tensors to themselves: replaced after the copy), the skipped blocks' names and links, the
    modules kept (id -> a path reaching them) and the ids of the modules the export leaves out (skipped blocks
    and the modules only they hold)."""
    model = nest.model
    memo: dict[int, object] = {}
    skipped: list[str] = []
    drop: list[tuple[nn.Module, str]] = []
    for path, m in nest._sliced.items():
        memo[id(m._sn)] = None  # exported copies carry no sortednet state
        for t in m._sn.slicer.exported_tensors(m):
            memo[id(t)] = t  # replaced below; never copied at full size
        for name in m._sn.slicer.skipped(m):  # e.g. blocks past the active depth
            drop.append((m, name))
            skipped.append(_name(path, name))
    kept = _kept_paths(model, {(id(m), name) for m, name in drop})  # module id -> a path that reaches it
    blocks = [m._modules[name] for m, name in drop]
    for b in blocks:
        if id(b) not in kept:  # not also held by a kept position (a block shared ALBERT-style)
            memo[id(b)] = None
    dropped = {id(x) for b in blocks for x in b.modules() if id(x) not in kept}
    return memo, skipped, drop, kept, dropped


def refused_aside(nest: Nest, sub: SubModel) -> bool:
    """Whether ``export(sub)`` refuses the model for what its plain attributes hold (a sliced tensor besides its
    module, a block the sub-model skips or a module of one)."""
    with nest.use(sub):
        memo, _, _, kept, dropped = _copy_plan(nest)
        try:
            _refuse_held_aside(nest.model, dropped, {k: t for k, t in memo.items() if isinstance(t, Tensor)}, sub,
                               kept)
        except SortedNetError:
            return True
    return False


def _deep_captured(fn: Any, depth: int = 0, seen: set[int] | None = None) -> list[Any]:
    """``fn`` and what it holds, through closures of closures (a compiled wrapper keeps the bound method it
    compiled two levels down), bound methods' ``__self__`` and partials (a few levels, each object once)."""
    seen = set() if seen is None else seen
    if id(fn) in seen or depth > 4:
        return []
    seen.add(id(fn))
    out = [fn]
    inner = [*_captured(fn), attr_of(fn, "__self__"), attr_of(fn, "__func__"), attr_of(fn, "__wrapped__")]
    if isinstance(fn, functools.partial):  # (its arguments: a module it was bound to by hand)
        inner += [*fn.args, *fn.keywords.values()]
    elif not isinstance(fn, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, type)):
        inner += _attrs(fn)  # (a callable object's attributes)
    for x in inner:
        if x is None or isinstance(x, (nn.Module, Tensor)):
            out += [x] if x is not None else []
        elif callable(x):
            out += _deep_captured(x, depth + 1, seen)
    return out


_TORCH_DIR = os.path.dirname(torch.__file__)


def _compiles(compiled: Any, method: types.MethodType) -> bool:
    """Whether ``compiled`` (what torch.compile was given) is ``method``'s function itself, or a wrapper torch
    made of it (for a torch.nn layer's method Dynamo compiles a wrapper of its own, named as the method); not a
    wrapper of the user's (``functools.wraps`` names it so too, but its code is the user's)."""
    if compiled is None:
        return False
    code = getattr(compiled, "__code__", None)
    if compiled is method.__func__ or (code is not None and code is getattr(method.__func__, "__code__", None)):
        return True  # (the function, or Dynamo's copy of it)
    return (code is not None and os.path.abspath(code.co_filename).startswith(_TORCH_DIR + os.sep)
            and (getattr(compiled, "__module__", None), getattr(compiled, "__qualname__", None))
            == (method.__func__.__module__, method.__func__.__qualname__))


def _is_forward(method: types.MethodType) -> bool:
    """``method`` is its module's forward (or the forward sortednet installs on a sliced layer), not another method
    of it (``forward_features``, ``__call__``), which the export's own forward would not replace."""
    f = method.__func__
    return f.__name__ == "forward" or (f.__name__ == "_forward" and f.__module__.startswith("sortednet."))


class CompiledForwardWarning(UserWarning):
    """An export left out the ``torch.compile`` wrapper set on a live module's ``forward``: it runs uncompiled."""


def _instance_forwards(model: nn.Module, new: nn.Module, sub: SubModel, kept: Mapping[int, str]) -> None:
    """A ``forward`` set on an instance (``model.forward = torch.compile(model.forward)``, a function of the user's)
    is a plain function a deep copy keeps as it is, still calling the live model: the export would run the live
    model under whatever sub-model is in force. A compiled wrapper of the live module's own forward is dropped from
    the copy (its class's forward runs, uncompiled: compile the export itself), with a warning; another one that
    reaches the live model is refused."""
    by_id = {id(m): m for m in model.modules()}
    live_of: dict[int, nn.Module] = {}  # a module of the copy -> the live module it copies (a shared one: once)
    for i, p in kept.items():
        try:
            live_of[id(new.get_submodule(p))] = by_id[i]
        except (AttributeError, KeyError):
            continue
    live = set(by_id)
    for path, c in new.named_modules():
        fn = c.__dict__.get("forward")
        orig = c.__dict__.get("_original_forward")
        if fn is not None and getattr(orig, "__func__", None) is type(c).forward:  # (accelerate's mixed-precision
            del c.__dict__["forward"], c.__dict__["_original_forward"]  # wrapper, an autocast set by prepare():
            continue  # the export is a plain model, as from_pretrained of it builds, as unwrap_model() gives back)
        if fn is None or (isinstance(fn, types.MethodType) and fn.__self__ is c):
            continue
        hits = [x for x in _deep_captured(fn) if id(x) in live or id(attr_of(x, "__self__")) in live]
        if not hits:
            continue
        mine = live_of.get(id(c))
        compiled = getattr(fn, "_torchdynamo_orig_callable", None)  # (torch.compile(m.forward): m's forward function)
        own = [x for x in hits if isinstance(x, types.MethodType) and x.__self__ is mine and _is_forward(x)
               and _compiles(compiled, x)]
        where = f"{path!r}" if path else f"the model ({type(new).__name__})"
        if own:
            del c.__dict__["forward"]
            warnings.warn(f"export({sub}): {where} had forward = torch.compile(forward) set on the live model; the "
                          "export runs its own forward, uncompiled (the compiled wrapper calls the live model): "
                          "compile the export itself, e.g. small.forward = torch.compile(small.forward)",
                          CompiledForwardWarning, stacklevel=4)
            continue
        what = getattr(fn, "__qualname__", None) or type(fn).__name__  # (a partial's repr holds its arguments)
        raise SortedNetError(f"export({sub}): {where} has a forward set on the instance ({what}) that calls the "
                             "live model (a copy keeps a function as it is): the export would run the live model, "
                             "under whatever sub-model is in force. Delete it before exporting (del "
                             "module.forward) and set it on the export if it is needed there")


class LiveHookWarning(UserWarning):
    """A hook copied into an export refers to the live model (through its closure or a global its code reads):
    the export then reads the live weights, not its own."""


def _captured(fn: Any, depth: int = 0) -> list[Any]:
    """What hook ``fn`` reads besides its arguments and keeps in a deep copy: its closure's cells and the globals
    its code loads (one level into lists, tuples and dicts), a partial's function's too."""
    out: list[Any] = []
    if isinstance(fn, functools.partial) and depth < 3:  # (its arguments are deep-copied with the model: its
        out += _captured(fn.func, depth + 1)              # function's own closure and globals are not)
    wrapped = attr_of(fn, "hook")  # (torch's wrapper of a module-taking hook)
    if wrapped is not None and wrapped is not fn and depth < 3:
        out += _captured(wrapped, depth + 1)
    out += function_values(fn)  # (its closure; def hook(mod, i, o, lin=model.fc): a default)
    code, names = attr_of(fn, "__code__"), attr_of(fn, "__globals__")
    glob = [names[n] for n in _global_loads(code) if n in names] if (  # (a script's module-level model or layer)
        isinstance(code, types.CodeType) and isinstance(names, dict)) else []
    opened = [*out, *(x for x in glob if not isinstance(x, (list, tuple, dict)) or len(x) <= 100_000)]  # (a
    out += glob                                                         # global vocabulary of 200k: not opened)
    more = [v for x in opened if isinstance(x, (list, tuple)) for v in x]
    more += [v for x in opened if isinstance(x, dict) for v in x.values()]
    more += [v for x in opened if not isinstance(x, (nn.Module, Tensor, type, types.ModuleType, list, tuple, dict))
             for v in _attrs(x)]  # (holder.lin; a Nest's model too: a hook holding the nest may read the model)
    return out + more


def _attrs(x: object) -> list[Any]:
    """The values of ``x``'s instance dict ([] when it has none, or reading it raises: a slotted object whose
    ``__getattr__`` raises KeyError)."""
    try:
        d = object.__getattribute__(x, "__dict__")
    except Exception:
        return []
    return list(d.values()) if isinstance(d, dict) else []


@functools.lru_cache(maxsize=4096)
def _global_loads(code: types.CodeType) -> frozenset[str]:
    """The global names ``code`` (and code nested in it) loads: not the attribute names ``co_names`` also holds
    (``self.model`` names ``model`` too)."""
    found: set[str] = set()
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and isinstance(ins.argval, str):
            found.add(ins.argval)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            found |= _global_loads(c)
    return frozenset(found)


def _warn_live_hooks(model: nn.Module, new: nn.Module, sub: SubModel) -> None:
    """Warn (LiveHookWarning) when a hook the export carries holds a module or tensor of the live model: a deep
    copy keeps a function's closure as it is, so ``lambda mod, i, o: o * lin.weight.mean()`` in the export still
    reads the live ``lin`` (another sub-model's values now, and whatever training does to them later); and when a
    function kept in an attribute does (``self.extra = lambda h: layer(h)``)."""
    live = {id(x) for x in (*model.modules(), *model.parameters(), *model.buffers())}
    _warn_live_hook(new, sub, live)
    _warn_weak_refs(new, sub, live)
    for path, m in new.named_modules():  # (functions kept in attributes: an instance forward is checked apart)
        for attr, v in m.__dict__.items():
            if attr in _INTERNALS or attr == "forward":
                continue
            small = not isinstance(v, (list, tuple, dict, set, frozenset)) or len(v) <= 1024  # (not a vocabulary)
            for fn in plain_leaves(v) if small else ():
                fn = attr_of(fn, "__wrapped__") or fn  # (an lru_cache wrapper: a copy keeps it, and what it wraps)
                if not isinstance(fn, types.FunctionType):
                    continue
                hit = next((x for x in _captured(fn) if id(x) in live), None)
                if hit is not None:
                    st = hit.__dict__.get("_sn") if isinstance(hit, nn.Module) else None
                    warnings.warn(
                        f"export({sub}): {_name(path, attr)} holds a function whose closure, defaults or globals "
                        f"hold a {(st.cls if st is not None else type(hit)).__name__} of the live model, which a "
                        "copy keeps as it is: called from the export it reads the live model's module (its weights at "
                        "the live model's sizes, its attributes as the live model changes them), not the export's "
                        "own. Reach modules through self in a method instead",
                        LiveHookWarning, stacklevel=4)
                    return


def _counterparts(model: nn.Module, memo: Mapping[int, object], replaced: Mapping[int, nn.Module]) -> dict[int, object]:
    """The export's own module, parameter and buffer for each of ``model``'s (by id) that the export holds:
    ``memo``'s copy of a module (or the module replacing it, ``replaced``), the copy's parameter or buffer of the
    same name (a sliced one is made by its slicer, not by the copy)."""
    out: dict[int, object] = {}
    for m in model.modules():
        c = memo.get(id(m))
        c = replaced.get(id(c), c)
        if not isinstance(c, nn.Module):  # (a skipped block: not in the export)
            continue
        out[id(m)] = c
        for d, cd in ((m._parameters, c._parameters), (m._buffers, c._buffers)):
            for k, t in d.items():
                if t is not None and cd.get(k) is not None:
                    out[id(t)] = cd[k]
    return out


def _rebound(r: weakref.ref, to: Mapping[int, object]) -> weakref.ref | None:
    """``r`` pointing at the export's counterpart (``to``) of the live object it points at; None where it points
    at no object of the live model, or has a callback (a function of the live model's, which the export's going
    away would call), or is of a subclass of ``weakref.ref`` (which may hold more than its object)."""
    x = r()
    own = to.get(id(x)) if type(r) is weakref.ref and r.__callback__ is None and x is not None else None
    return None if own is None else weakref.ref(own)


#: the containers whose entries the rebinding writes (a subclass's own ``__setitem__`` may refuse or count it)
_WRITABLE = (dict, list, collections.OrderedDict, collections.defaultdict)
_CODE = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)
_SHARED = (nn.Module, Tensor, type, types.ModuleType, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
           *_CODE)


def _weak_holders(new: nn.Module, made: set[int]) -> list[tuple[object, Any, dict[Any, object]]]:
    """``(holder, where, entries)`` of what can hold a weak reference among the attributes of ``new``'s modules,
    at any depth (10,000 holders at most), of the objects in ``made`` (by id: what the deep copy made) alone: a
    module's or an object's ``__dict__`` (``where``) and its entries, a dict or list and its entries, a
    ``WeakValueDictionary``. Not opened: what the copy shares with the live model (an object whose deep copy is
    itself, an optimizer), modules and tensors (the walk starts from every module), functions, sortednet's own
    objects."""
    out: list[tuple[object, Any, dict[Any, object]]] = []
    seen: set[int] = set()
    stack: list[tuple[object, Any, dict[Any, object]]] = [
        (m, m.__dict__, {k: v for k, v in m.__dict__.items() if k not in _INTERNALS})
        for m in new.modules() if id(m) in made]
    while stack and len(out) < 10_000:
        holder, where, entries = stack.pop()
        out.append((holder, where, entries))
        for v in entries.values():
            if (type(v) in _ATOMIC or id(v) in seen or id(v) not in made or isinstance(v, (weakref.ref, *_SHARED))
                    or _sortednets(v)):
                continue
            seen.add(id(v))
            if isinstance(v, weakref.WeakValueDictionary):
                stack.append((v, v, dict(v.items())))
            elif isinstance(v, (dict, list)):
                stack.append((v, v, dict(v.items()) if isinstance(v, dict) else dict(enumerate(v))))
            elif isinstance(attr_of(v, "__dict__"), dict):
                stack.append((v, v.__dict__, dict(v.__dict__)))
    return out


def _rebind_weak_refs(new: nn.Module, memo: Mapping[int, object], to: Mapping[int, object]) -> None:
    """Point the weak references the export holds at its own modules, parameters and buffers (``to``): a deep
    copy keeps ``self._head = weakref.ref(self.fc2)`` pointing at the live ``fc2``, whose forward then ran the live
    model's full-size weights inside the export. Rebound where they sit in an attribute of a module or of an
    object the copy made (``memo``'s copies), a plain dict's values or list, a ``WeakValueDictionary``; never in
    an object the export shares with the live model (one whose deep copy is itself, an optimizer: the live
    model's). Those elsewhere (a tuple, a closure, ``__slots__``, a ``WeakKeyDictionary``'s keys, a container with
    its own ``__setitem__``, one with a callback) are named by :func:`_warn_weak_refs`."""
    made = {id(v) for k, v in memo.items() if id(v) != k}  # (a value that is its key's object: shared, not made)
    for holder, where, entries in _weak_holders(new, made):
        plain = where is not holder or type(holder) in _WRITABLE  # (an attribute, or a plain container's entry)
        for k, v in entries.items():
            if isinstance(holder, weakref.WeakValueDictionary):
                if id(v) in to:
                    holder[k] = to[id(v)]
            elif plain and isinstance(v, weakref.ref):
                r = _rebound(v, to)
                if r is not None:
                    where[k] = r


def _warn_weak_refs(new: nn.Module, sub: SubModel, live: set[int]) -> None:
    """Warn (LiveHookWarning) of a weak reference the export holds (in an object or container one of its modules
    holds) to a module, parameter or buffer of the live model, which :func:`_rebind_weak_refs` could not point at
    the export's own (one in a tuple, ``__slots__``, a closure, a ``WeakKeyDictionary``'s keys): a copy keeps a weak
    reference as it is, so one read in the export's forward reads the live model. Not refused: most weak references
    are bookkeeping never read in a forward."""
    seen: set[int] = set()
    for path, m in new.named_modules():
        for attr, v in m.__dict__.items():
            if attr in _INTERNALS:
                continue
            for x in held_leaves(v, seen=seen):
                if isinstance(x, weakref.ref) and id(x()) in live:
                    hit = x()
                    st = hit.__dict__.get("_sn") if isinstance(hit, nn.Module) else None
                    warnings.warn(
                        f"export({sub}): {_name(path, attr)} holds a weak reference to a "
                        f"{(st.cls if st is not None else type(hit)).__name__} of the live model, which a copy "
                        "keeps as it is: read from the export, it reads the live model (its full-size weights, "
                        "and whatever training does to them later), not the export's own (weak references in an "
                        "attribute, a list, a dict or a WeakValueDictionary are pointed at the export's own; not "
                        "this one: a WeakKeyDictionary's keys, a tuple's, one with a callback). Hold the module "
                        "itself, or reach it through self in a method",
                        LiveHookWarning, stacklevel=4)
                    return


def _warn_live_hook(new: nn.Module, sub: SubModel, live: set[int]) -> None:
    """:func:`_warn_live_hooks` of the hooks: the first hook holding a live module or tensor."""
    for path, m in new.named_modules():
        for attr in _HOOK_DICTS:
            for fn in list(getattr(m, attr, {}).values()):
                if isinstance(fn, (bool, int)):
                    continue
                held = [] if isinstance(fn, types.FunctionType) else held_leaves(  # (a partial's arguments,
                    fn.__self__ if isinstance(fn, types.MethodType) else fn)  # a hook object's attributes:
                hit = next((x for x in (*_captured(fn), *held) if id(x) in live), None)  # copied, a live tensor not)
                if hit is not None:
                    st = hit.__dict__.get("_sn") if isinstance(hit, nn.Module) else None
                    what = (st.cls if st is not None else type(hit)).__name__
                    warnings.warn(
                        f"export({sub}): a hook on {path or type(new).__name__!r} ({attr}) holds a {what} of the "
                        "live model (in its closure, a default argument, a global it reads, an attribute of an "
                        "object it holds or a functools.partial's arguments), which "
                        "a copy keeps as it is: the export computes with the live model's values there, not its "
                        "own. Read the "
                        "module the hook is given (its first argument) instead, as hooks of the module itself "
                        "are copied with it", LiveHookWarning, stacklevel=5)
                    return


def _keep_nested_path(enc: nn.TransformerEncoder) -> None:
    """An exported ``TransformerEncoder`` that turns a padded batch into a nested tensor (``use_nested_tensor``,
    set at its construction for the full model's even head count) keeps doing so, as the live model does: a
    layer whose attention now has an odd head count as a plain ``nn.MultiheadAttention`` (which refuses nested
    tensors outside PyTorch's fast path, itself closed to odd counts) is exported as a
    :class:`~sortednet.slicers.mha.PrunedMultiheadAttention`, sortednet's attention, which the live sub-model
    runs. Turning the nested path off instead (as PyTorch's ``__init__`` would for a model built at that size)
    changes the output at padded positions: computed there, where the live model gives zeros."""
    from .slicers.mha import PrunedMultiheadAttention

    for layer in enc.layers:
        a = getattr(layer, "self_attn", None)
        if type(a) is nn.MultiheadAttention and a.num_heads % 2:
            layer.self_attn = PrunedMultiheadAttention(a)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")
_EXTRA_HOOK_DICTS = {"_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
                     "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")}


def _same_hook(copied: Any, hook: Any) -> bool:
    """Whether ``copied`` (a deep copy's hook) is ``hook``: itself, a bound method of the same function on the
    same object (a deep copy makes a new method object), torch's wrapper of either, or an object of the same
    sortednet class (one of wrap's hook objects copied with the model). Never calls a hook's ``__eq__``."""
    if copied is hook:
        return True
    if isinstance(copied, types.MethodType) and isinstance(hook, types.MethodType):  # (no user __eq__ is called)
        return copied.__func__ is hook.__func__ and copied.__self__ is hook.__self__
    if type(copied) is type(hook) is getattr(nn.modules.module, "_WrappedHook", None):  # (torch's wrapper of a
        return _same_hook(copied.hook, hook.hook)                                    # module-taking hook)
    return type(copied) is type(hook) and type(hook).__module__.startswith("sortednet.")


_MAIN_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
                    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                    "_load_state_dict_post_hooks")


def _drop_wrap_hooks(handles: Any, new: nn.Module) -> None:
    """Wrap's own hooks (no-fast-path, the root's Pin, the cache guards), and those of sortednet's training
    integrations (a class with ``sn_training_only``), stay with the live model: each goes from
    the export's copy of the dict it was registered in, with its flags (a with-kwargs flag left behind would make
    a hook registered under that id after a reload take kwargs). Found by the hook object itself (a hook of the
    user's loaded from a pickle may hold the same id: ids restart in every process)."""
    ours = {}
    for h in handles:
        d = h.hooks_dict_ref()
        fn = d.get(h.id) if d is not None else None
        if fn is not None:
            ours[h.id] = fn
    for m in new.modules():
        for attr in _MAIN_HOOK_DICTS:
            d = m.__dict__.get(attr)
            for k in [k for k in d or () if k in ours and _same_hook(d[k], ours[k])
                      or getattr(type(d[k]), "sn_training_only", False)]:  # (a training integration's hook: the
                #                                                            Trainer callback's, which heals the nest)
                del d[k]
                for extra in _EXTRA_HOOK_DICTS.get(attr, ()):
                    m.__dict__.get(extra, {}).pop(k, None)


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """A slicer's export that builds another module (factored low rank: two Linears in a Sequential) keeps the
    user's forward / backward hooks of the module it replaces (same input and output)."""
    for attr in _HOOK_DICTS:
        hooks = old.__dict__.get(attr)
        if hooks and new.__dict__.get(attr) is not None and not new.__dict__[attr]:
            new.__dict__[attr].update(hooks)
            if attr == "_backward_hooks":  # whether they are full backward hooks (else torch never runs them)
                new.__dict__["_is_full_backward_hook"] = old.__dict__.get("_is_full_backward_hook")


class _Internals(frozenset):
    """Attribute names of a module that hold its machinery, not its state: nn.Module's own, sortednet's, and the
    state torch.distributed's composable APIs keep on it (FSDP2's ``fully_shard``: references to the module's
    parameters and its blocks, which a model loaded from a checkpoint does not hold)."""

    def __contains__(self, k: object) -> bool:
        return frozenset.__contains__(self, k) or (isinstance(k, str) and k.startswith("__composable_api_state_key"))


_INTERNALS = _Internals({*nn.Module().__dict__, "_sn"})
_TORCH_HOOK_DICTS = frozenset(k for k in nn.Module().__dict__ if k.endswith("hooks"))  # (not a user's own)


_ABSENT = object()


def _flat(v: Any) -> list[int]:
    return [int(v)] if isinstance(v, int) else [int(x) for x in v]


def _is_size(v: Any) -> bool:
    """An int (not a bool) or a tuple / list / torch.Size of ints."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, (tuple, list)) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                       for x in v))


def _check_exported(live: nn.Module, c: nn.Module, path: str, sub: SubModel) -> None:
    """Each sliced tensor a slicer's ``export`` left in the copy is a new tensor of the shape the live module
    reads under ``sub`` (a custom slicer returning the copy untouched would leave the live, full-size tensor:
    an export that disagrees with the live model and with ``cost``, sharing the live weights)."""
    sl = live._sn.slicer
    for name in sl.attr_names(live, live._sn.bind):
        full = sl.tensor(live, name)
        if full is None:  # a size (out_features, normalized_shape): the copy's must be what the live module reads
            kept, v = c.__dict__.get(name, _ABSENT), getattr(live, name, _ABSENT)
            if kept is not _ABSENT and _is_size(v) and _is_size(kept) and tuple(_flat(kept)) != tuple(_flat(v)):
                raise SortedNetError(f"export({sub}): {type(sl).__name__}.export left {name} = {kept!r} on "
                                     f"{path or 'the root module'}, where the live module "
                                     f"reads {v!r} under this sub-model: a slicer's export must set each size it "
                                     "slices to what its value() gives (Slicer.export does)")
            continue
        got = c._parameters.get(name) if name in c._parameters else c._buffers.get(name)
        v = getattr(live, name)
        if got is full or (isinstance(got, Tensor) and isinstance(v, Tensor) and got.shape != v.shape):
            what = "the live tensor itself" if got is full else f"a tensor of shape {tuple(got.shape)}"
            raise SortedNetError(f"export({sub}): {type(sl).__name__}.export left {what} as {_name(path, name)}, "
                                 f"where the live module reads {tuple(v.shape)} under this sub-model: a slicer's "
                                 "export must put a new tensor of what its value() gives (Slicer.export does)")


def aside_suspects(nest: Nest) -> bool:
    """Whether a plain attribute holds what ``export`` may refuse (a sliced tensor; a block of a Depth layer list,
    or a module in one): ``pick`` then asks :func:`refused_aside` of each sub-model."""
    return bool(aside_holders(nest))


def aside_holders(nest: Nest, extra: Iterable[int] = ()) -> list[tuple[nn.Module, str]]:
    """``(module, attribute)`` of each plain attribute holding a tensor sortednet slices, a block of a Depth layer
    list or a module in one, or an object of ``extra`` (ids: factored Rank targets): what ``pick``'s table read
    to pass over the sub-models ``export`` refuses."""
    watch = {id(t) for m in nest._sliced.values() for t in m._sn.slicer.exported_tensors(m)}
    watch |= {id(x) for m in nest._sliced.values() if "depth" in m._sn.bind
              for c in m._modules.values() if c is not None for x in c.modules()}
    watch |= set(extra)
    seen: set[int] = set()  # (an object or container every layer holds is walked once: its first holder named,
    opened: set[int] = set()  # whose change rebuilds the table, which then finds the others)
    return [(m, attr) for m in nest.model.modules() for attr, v in m.__dict__.items()
            if attr not in _INTERNALS and any(id(_bound_to(x)) in watch or _is_nest(x)
                                              for x in held_leaves(v, seen=seen, containers=opened))] + [
        (m, slots) for m in nest.model.modules() for slots in ("_parameters", "_buffers")  # (a tensor's attributes)
        if any(id(x) in watch for t in m.__dict__[slots].values() if t is not None
               for v in getattr(t, "__dict__", {}).values() for x in held_leaves(v, seen=seen))] + [
        (cls, attr) for cls, attr, v in class_attributes(nest.model)  # (cls.__dict__.get(attr): holders_state)
        if any(isinstance(x, Tensor) and id(x) in watch for x in held_leaves(v))]


def holders_state(holders: Sequence[tuple[nn.Module, str]], budget: int = 1024) -> tuple:
    """What the attributes of :func:`aside_holders` hold now, by identity: each value, and its containers' items
    (as :func:`plain_leaves` opens them) as far as ``budget`` items in all allow (a vocabulary beside a block is
    not walked at every pick; beyond it, a container by its length). A table built on them is rebuilt once this
    changes (an attribute deleted, emptied or refilled after export named it)."""
    out: list[object] = []
    seen: set[int] = set()
    for m, attr in holders:
        stack = [m.__dict__.get(attr, _ABSENT)]
        while stack:
            v = stack.pop()
            out.append(id(v))
            if isinstance(v, (dict, list, tuple, set, frozenset, collections.deque)) and len(v) > budget:
                out.append(len(v))  # (not opened: a container past the budget, by its length)
                continue
            items = plain_items(v)
            if items is None or id(v) in seen:
                continue
            seen.add(id(v))
            out.append(len(items))
            if len(items) <= budget:
                budget -= len(items)
                stack.extend(items)
    return tuple(out)


def held_aside(nest: Any) -> list[str]:
    """``path.attr`` of each plain attribute (a list, tuple, dict, partial, a tensor alone) that holds a tensor
    sortednet slices besides its module."""
    sliced = {id(t) for m in nest._sliced.values() for t in m._sn.slicer.exported_tensors(m)}
    seen: set[int] = set()
    return [_name(path, attr) for path, m in nest.model.named_modules()
            for attr, v in [*m.__dict__.items(), *_tensor_attributes(m)]
            if attr not in _INTERNALS and any(isinstance(x, Tensor) and id(x) in sliced
                                              for x in held_leaves(v, seen=seen))] + [
        f"{cls.__qualname__}.{attr}" for cls, attr, v in class_attributes(nest.model)
        if any(isinstance(x, Tensor) and id(x) in sliced for x in held_leaves(v, seen=seen))]


def _refuse_held_aside(model: nn.Module, dropped: set[int], sliced: dict[int, Tensor], sub: SubModel,
                       kept: Mapping[int, str]) -> list[object]:
    """Refuse an export that would leave ``None`` (or a stale copy) where a plain attribute (a Python list, tuple,
    dict, set or ``functools.partial``, a dict's keys too) holds a block the sub-model skips or a module in one,
    or would share a live full-size tensor that such an attribute holds besides its module: the copy's reference
    would still be the live tensor (aliased, at full size, and what a forward reading it uses). Neither can be cut
    out of the attribute safely: a forward that reads it (``zip(self.blocks, self.pairs)``, ``self.ends[1]``)
    would compute something else than the live model. Returns the optimizers and schedulers the attributes hold
    (which the export shares)."""
    shared: list[object] = []
    if not dropped and not sliced:
        return shared
    seen: set[int] = set()
    opened: set[int] = set()  # (a container every layer holds: walked once; found there, it is refused at once)
    for path, m in model.named_modules():
        if id(m) not in kept:  # in a block the sub-model skips and not held by kept code (another name): what it
            continue           # holds leaves with it (an accelerate hook's forward wrapper holding its own block)
        for attr, v in [*m.__dict__.items(), *_tensor_attributes(m)]:
            if attr not in _INTERNALS:
                shared += _refuse_held(_name(path, attr), v, dropped, sliced, sub, seen, opened)
    for cls, attr, v in class_attributes(model):
        shared += _refuse_held(f"{cls.__qualname__}.{attr} (a class attribute)", v, set(), sliced, sub, seen, opened)
    return shared


def _is_nest(x: object) -> bool:
    return type(x).__name__ == "Nest" and type(x).__module__ == "sortednet.nest"


def _sortednets(x: object) -> bool:
    """Whether ``x`` is an object of a sortednet class (a leaf of :func:`held_leaves`)."""
    return str(attr_of(type(x), "__module__", "")).startswith("sortednet.")


def class_attributes(model: nn.Module) -> list[tuple[type, str, object]]:
    """``(class, name, value)`` of the data attributes the classes of ``model``'s modules (and their bases)
    define, outside torch and sortednet: what every instance reads, which a deep copy does not copy
    (``type(self).W = w``). Not functions, descriptors or classes, nor containers past 1,024 items (a class-level
    table); read for sliced tensors only (a registry of instances, a singleton, is not an export's business)."""
    out: list[tuple[type, str, object]] = []
    seen: set[int] = set()
    for m in model.modules():
        for cls in type(m).__mro__:
            if id(cls) in seen:
                continue
            seen.add(id(cls))
            mod = getattr(cls, "__module__", "") or ""
            if mod == "builtins" or mod.split(".")[0] in ("torch", "sortednet"):
                continue
            out += [(cls, k, v) for k, v in list(cls.__dict__.items())
                    if not (k.startswith("__") and k.endswith("__")) and not isinstance(v, _NOT_DATA)
                    and not (isinstance(v, (list, tuple, dict, set, frozenset)) and len(v) > 1024)]
    return out


_NOT_DATA = (types.FunctionType, types.BuiltinFunctionType, staticmethod, classmethod, property, type,
             types.ModuleType, functools.partialmethod, str, bytes, int, float, bool, type(None))


def _refuse_held(name: str, v: object, dropped: set[int], sliced: dict[int, Tensor], sub: SubModel,
                 seen: set[int], opened: set[int]) -> list[object]:
    """:func:`_refuse_held_aside` of one attribute ``name`` holding ``v``: the optimizers and schedulers it
    holds."""
    held = held_leaves(v, seen=seen, containers=opened)
    if any(_is_nest(x) or (_sortednets(x) and any(map(_is_nest, object_values(x)))) for x in held):  # (nest.compile())
        raise SortedNetError(f"export({sub}): {name} holds the nest (what sn.wrap returned), which a copy cannot "
                             "hold (a Nest is not copied: it is the live model's). Keep the nest outside the model "
                             "(a variable of your script or trainer); pick passes over the sub-models this refuses")
    if dropped and any(isinstance(x, nn.Module) and id(x) in dropped for x in held):
        raise SortedNetError(f"export({sub}): {name} holds blocks the sub-model skips (or "
                             "modules of them), outside the layer list (a plain Python attribute, or an object it "
                             "holds); the export cannot hold them. Keep blocks only in the nn.ModuleList / "
                             "nn.Sequential and iterate it, or build such a list when it is read (a "
                             "property: return [b.norm for b in self.blocks] follows the depth); pick "
                             "passes over the depths this refuses")
    if any(isinstance(x, Tensor) and id(x) in sliced for x in held):
        raise SortedNetError(f"export({sub}): {name} holds a tensor that sortednet slices (a "
                             "module's weight or buffer) in a plain Python attribute (or an object it "
                             "holds: a dataclass, a class instance, a bound method's object): a forward "
                             "that reads it there runs the full-size tensor under every sub-model, and the export "
                             "would share it with the live model. Read it through its module "
                             "(module.weight), or keep the module itself in the attribute; build lists of "
                             "parameters (optimizer groups) when you need them, from "
                             "model.named_parameters(), rather than keeping them on the model")
    return [x for x in held if isinstance(x, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler))]


def _tensor_attributes(m: nn.Module) -> list[tuple[str, object]]:
    """``(name.attr, value)`` of the Python attributes of ``m``'s parameters and buffers (``self.tag.src =
    layer.weight``: a deep copy copies them)."""
    return [(f"{n}.{k}", x) for d in (m._parameters, m._buffers) for n, t in d.items() if t is not None
            for k, x in getattr(t, "__dict__", {}).items()]


class _CountingMemo(dict):
    """The deep copy's memo, counting how often the copy reads each of ``watched`` (the live tensors export
    replaces, which the memo maps to themselves): every reference the copy holds to one is a read of
    ``copy.deepcopy`` (other readers of the memo, a ``__deepcopy__`` looking objects up, are not counted)."""

    def __init__(self, memo: Mapping[int, object], watched: set[int]) -> None:
        super().__init__(memo)
        self.watched, self.reads = watched, collections.Counter()

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self.watched and sys._getframe(1).f_code is _DEEPCOPY:
            self.reads[key] += 1
        return super().get(key, default)


_DEEPCOPY = copy.deepcopy.__code__


def _not_copied(model: nn.Module, memo: _CountingMemo, kept: Mapping[int, str],
                shared: Iterable[object]) -> collections.Counter:
    """Set ``memo`` so that the export does not copy sortednet's own hooks (dropped from the copy after; one holds
    every sliced BatchNorm, a skipped block's too) nor ``shared`` (the optimizers and schedulers the model's
    attributes hold: parameters to update, not to compute with; the export holds the same objects); and count the
    references to the live sliced tensors the users' hooks hold, which the copy keeps and :func:`_warn_live_hooks`
    names, as expected: each hook object once, as the copy copies it once, and not what functions close over,
    which a copy keeps as they are."""
    for x in shared:
        memo[id(x)] = x
    expected: collections.Counter = collections.Counter()
    hooks: dict[int, object] = {}
    for m in model.modules():
        for attr, v in m.__dict__.items():
            if attr in _TORCH_HOOK_DICTS and isinstance(v, dict):
                for fn in v.values():
                    if ours(fn):  # (torch's wrapper of one too)
                        memo[id(fn)] = fn
                    elif id(m) in kept and not isinstance(fn, types.FunctionType):
                        held = fn.__self__ if isinstance(fn, types.MethodType) else fn
                        hooks[id(held)] = held
    seen: set[int] = set()
    for held in hooks.values():
        _copy_reads(held, memo.watched, expected, seen)
    return expected


def _copy_reads(v: object, watched: set[int], out: collections.Counter, seen: set[int], depth: int = 0) -> None:
    """Add to ``out`` the reads of ``watched`` tensors a deep copy of ``v`` makes: a list, dict, set or object is
    copied once (memoised); a tuple is not memoised where its items copy to themselves (a live tensor's do), so
    each reference to it reads them again. Functions are kept, not copied; modules are copied with the model."""
    if id(v) in watched:
        out[id(v)] += 1
        return
    if depth > 50 or isinstance(v, (nn.Module, Tensor, types.FunctionType, type, str, bytes, int, float)) or v is None:
        return
    if not isinstance(v, tuple):
        if id(v) in seen:
            return
        seen.add(id(v))
    items = plain_items(v)
    for x in items if items is not None else object_values(v):
        _copy_reads(x, watched, out, seen, depth + 1)


def _refuse_held_in_objects(model: nn.Module, new: nn.Module, memo: _CountingMemo, sub: SubModel,
                            expected: Mapping[int, int]) -> None:
    """Refuse an export whose deep copy took a live tensor that export replaces anywhere but in a module's
    parameters or buffers, the slots export replaces: an object of the user's (a dataclass, any class instance)
    holding ``module.weight`` (the plain containers :func:`_refuse_held_aside` refuses before the copy) would
    keep the live, full-size tensor in the export, which then changes with the live model. Exact: the copy's reads
    of each such tensor are counted and set against the slots holding it."""
    if not memo.reads:
        return
    slots = collections.Counter(id(t) for m in new.modules() for d in (m._parameters, m._buffers)
                                for t in d.values() if t is not None and id(t) in memo.watched)
    extra = {k for k, n in memo.reads.items() if n > slots[k] + expected.get(k, 0)}
    if not extra:
        return
    where = _object_holders(model, extra)
    raise SortedNetError(f"export({sub}): {', '.join(where[:3]) if where else 'an object on the model'} holds a "
                         "tensor that sortednet slices (a module's weight or buffer) inside an object (a dataclass, a "
                         "class instance): the export's copy of that object would hold the live, full-size tensor, "
                         "shared with the live model, and a forward reading it there runs the full-size tensor under "
                         "every sub-model. Read the tensor through its module (module.weight), or keep the module "
                         "itself in the object")


def _object_holders(model: nn.Module, ids: set[int]) -> list[str]:
    """``path.attr`` of the plain attributes of ``model``'s modules holding one of ``ids`` (:func:`held_leaves`)."""
    seen: set[int] = set()
    found = [(attr in _TORCH_HOOK_DICTS, _name(path, attr)) for path, m in model.named_modules()
             for attr, v in [*m.__dict__.items(), *_tensor_attributes(m)]
             if (attr not in _INTERNALS or attr in _TORCH_HOOK_DICTS) and any(
                 id(x) in ids for x in held_leaves(
                     [f for f in v.values() if not ours(f)] if attr in _TORCH_HOOK_DICTS else v, 100_000, seen))]
    return [n for hook, n in found if not hook] or [n for _, n in found]  # (hooks, which may hold it: the last)


def _swap_held(v: object, c: object, r: object, seen: dict[int, object], depth: int = 0) -> object:
    """``v`` with ``c`` replaced by ``r`` where ``_replace_held`` rebuilds: a plain list, tuple, set, dict (keys
    too) or ``functools.partial``, six levels deep; anything else as it is. A list or dict that holds itself
    (``d["self"] = d``) is rebuilt holding its new self."""
    if v is c:
        return r
    if id(v) in seen:  # (one list held by two attributes stays one list)
        return seen[id(v)]
    if depth >= 6:
        return v
    if type(v) is list:
        out: Any = []
        seen[id(v)] = out
        out.extend(_swap_held(x, c, r, seen, depth + 1) for x in v)
        return out
    if type(v) is dict:
        out = {}
        seen[id(v)] = out
        for k, x in v.items():
            out[r if k is c else k] = _swap_held(x, c, r, seen, depth + 1)
        return out
    if type(v) in (tuple, set, frozenset):
        out = type(v)(_swap_held(x, c, r, seen, depth + 1) for x in v)
    elif type(v) is functools.partial:
        out = functools.partial(_swap_held(v.func, c, r, seen, depth + 1),
                                *(_swap_held(x, c, r, seen, depth + 1) for x in v.args),
                                **{k: _swap_held(x, c, r, seen, depth + 1) for k, x in v.keywords.items()})
    else:
        return v
    seen[id(v)] = out
    return out


def _refuse_unrebuilt(nest: Nest, sub: SubModel, kept: Mapping[int, str]) -> None:
    """Refuse (as ``pick`` passes over it) a sub-model whose export replaces a module (an svd Rank target by two
    Linears) that the LIVE model holds where no rebuild reaches: in a function's closure or defaults (a deep copy
    keeps the function as it is, so the export's would call the live layer, at the live model's rank), an object,
    a container that is not rebuilt. Read under ``use(sub)``."""
    factored = {i: m for i, m in nest._factorable().items() if i in kept and m._sn.slicer.factored(m)}
    held = held_unrebuilt(nest.model, factored, kept) if factored else {}
    if held:
        i, where = next(iter(held.items()))
        raise SortedNetError(f"export({sub}): {where} holds a module that the export replaces "
                             f"({kept.get(i) or '<root>'!r}, an svd Rank target, by two Linears) in a way it does "
                             "not rebuild (a function's closure or defaults, a subclass "
                             "of a list, tuple, dict or set such as a namedtuple or an OrderedDict, an object such "
                             "as a dataclass, one more than six levels deep, or a bound method such as "
                             "self.run = self.fc.forward): it would keep calling the live layer. Hold the module in "
                             "a plain container, or as a child module, and call it; or declare sn.Rank(..., "
                             "export='merged') (pick passes over the sub-models this refuses)")


def held_unrebuilt(model: nn.Module, targets: Mapping[int, nn.Module],
                   kept: Mapping[int, str] | None = None) -> dict[int, str]:
    """Of ``targets`` (modules an export may replace: factored Rank targets), those a plain attribute holds in a
    container the export does not rebuild (a subclass of a list, tuple, dict or set, a deque, a
    ``SimpleNamespace``, one more than six levels deep): ``id -> path.attr``. ``export`` refuses to replace them,
    ``pick`` passes over those sub-models. With ``kept`` (the modules a sub-model's export holds, by id), only
    those are read: a holder or a target in a block the sub-model skips is not exported."""
    out: dict[int, str] = {}
    if kept is not None:
        targets = {i: t for i, t in targets.items() if i in kept}
    if not targets:
        return out
    for path, m in model.named_modules():
        if kept is not None and id(m) not in kept:
            continue
        for attr, v in m.__dict__.items():
            if attr in _INTERNALS:
                continue
            for x in held_leaves(v):  # (an object holding one: a dataclass, which the export does not rebuild)
                x = _bound_to(x)
                if id(x) in targets and id(x) not in out and _holds(held_leaves(_swap_held(v, x, _GONE, {})), x):
                    out[id(x)] = _name(path, attr)
    return out


class _Gone:
    """What :func:`_swap_held` puts in place of a module, to see whether it is still held (callable: a
    ``functools.partial`` of the module itself is rebuilt around it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise SortedNetError("sortednet internal: a placeholder for a replaced module was called")


_GONE = _Gone()


def _bound_to(x: object) -> object:
    """The module a bound method of it stands for (``self.run = self.fc.forward``), else ``x``."""
    return x.__self__ if isinstance(x, types.MethodType) and isinstance(x.__self__, nn.Module) else x


def _holds(leaves: Iterable[object], c: object) -> bool:
    """Whether ``leaves`` hold ``c``, itself or a method bound to it (which no rebuild can rebind: the
    module replacing ``c`` has other methods)."""
    return any(y is c or _bound_to(y) is c for y in leaves)


def _held_index(new: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every module a plain attribute of a module of ``new`` holds (at any depth), by id: the ``(path, module,
    attribute)`` holding it. Built once per export: each replaced module then reads only its own holders (an
    attribute of 50k items is walked once, not twice per replaced module)."""
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    seen: set[int] = set()  # (an object every layer holds: walked once, its first holder named: not rebuilt)
    for path, m in new.named_modules():
        for attr, v in m.__dict__.items():
            if attr in _INTERNALS:
                continue
            leaves = held_leaves(v, seen=seen)
            for x in {id(x): x for x in map(_bound_to, leaves) if isinstance(x, nn.Module)}.values():
                out.setdefault(id(x), []).append((path, m, attr))
    return out


def _replace_held(held: Mapping[int, list[tuple[str, nn.Module, str]]], c: nn.Module, r: nn.Module,
                  sub: SubModel) -> None:
    """A slicer's export replaced module ``c`` of the copy by ``r`` (a factored Rank's two Linears): a plain
    attribute that held ``c`` (alone, in a list, tuple, dict, set or ``functools.partial``, six levels deep)
    holds ``r``; one that holds it where that is not rebuilt (a deeper one, a namedtuple, an OrderedDict, a list
    subclass) would keep a stale module sharing the live model's tensors: refused, naming it, before any of
    them changes. ``held``: :func:`_held_index` of the copy."""
    holders = held.get(id(c), [])
    for path, m, attr in holders:
        v = m.__dict__[attr]
        if _holds(held_leaves(_swap_held(v, c, _GONE, {})), c):
            raise SortedNetError(f"export({sub}): {_name(path, attr)} holds a module that the export replaces "
                                 f"({type(c).__name__} by {type(r).__name__}), or a method bound to it, in a way it "
                                 "does not rebuild (a subclass of a list, tuple, dict or set, such as a namedtuple or "
                                 "an OrderedDict, an object such as a dataclass, one more than six levels deep, or "
                                 "a bound method such as "
                                 "self.run = self.fc.forward), which would keep the old one; hold the module itself "
                                 "in a plain container, or as a child module, and call it (pick passes over the "
                                 "sub-models this refuses)")
    seen: dict[int, object] = {}
    for _, m, attr in holders:
        m.__dict__[attr] = _swap_held(m.__dict__[attr], c, r, seen)


def _kept_paths(model: nn.Module, cut: set[tuple[int, str]]) -> dict[int, str]:
    """The first path of every module reachable from ``model`` without passing a link in ``cut``."""
    out: dict[int, str] = {}
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, m = stack.pop()
        if id(m) in out:
            continue
        out[id(m)] = path
        stack.extend((f"{path}.{name}" if path else name, c) for name, c in reversed(list(m._modules.items()))
                     if c is not None and (id(m), name) not in cut)
    return out


def reachable_modules(model: nn.Module, cut: set[tuple[int, str]]) -> dict[int, nn.Module]:
    """The modules reachable from ``model`` (by id) without passing a ``(id(parent), child name)`` in ``cut``
    (e.g. the skipped positions of a layer list: a block also held at a kept position stays reachable)."""
    seen: dict[int, nn.Module] = {}
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen[id(m)] = m
        stack.extend(c for name, c in m._modules.items() if c is not None and (id(m), name) not in cut)
    return seen


def _name(path: str, attr: str) -> str:
    return f"{path}.{attr}" if path else attr


def _fresh(t: Tensor) -> Tensor:
    """A full-size copy of a live tensor, Parameter-ness and requires_grad kept."""
    from .slicers.base import parameter_like

    c = t.detach().clone()
    return parameter_like(t, c) if isinstance(t, nn.Parameter) else c


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal values, NaN equal to NaN (a diverged or not yet loaded weight is still one tensor); tensors of the
    meta device have none to compare."""
    if a.is_meta or b.is_meta or torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _share_once(live: nn.Module, new: nn.Module, skipped: list[str], sub: SubModel) -> None:
    """Give every user of one live tensor the same exported tensor; replace any live tensor left in ``new``."""
    users: dict[int, list[tuple[str, str, Tensor]]] = {}
    seen: set[int] = set()
    for path, m in live.named_modules(remove_duplicate=False):
        if id(m) in seen or _inside(path, skipped):
            continue
        seen.add(id(m))
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is not None:
                    users.setdefault(id(t), []).append((path, name, t))
    live_ids = {id(t) for t in live.parameters()} | {id(t) for t in live.buffers()} | set(users)
    for group in users.values():
        slots = []
        for path, name, _ in group:
            try:
                c = new.get_submodule(path) if path else new
                lm = live.get_submodule(path) if path else live
                st = lm.__dict__.get("_sn")
                to = None if st is None else st.slicer.moved(lm).get(name)
                if to is not None:  # a tensor its slicer's export moved into a new child (factored low rank)
                    sub_path, _, name = to.rpartition(".")
                    c = c.get_submodule(sub_path)
            except AttributeError:  # restructured by its slicer's export
                continue
            store = c._parameters if name in c._parameters else c._buffers if name in c._buffers else None
            if store is not None and store[name] is not None:
                slots.append((path, name, store))
        if len(slots) == 1 and id(slots[0][2][slots[0][1]]) not in live_ids:
            continue
        canon = first = None
        for path, name, store in slots:
            if id(store[name]) not in live_ids:
                canon, first = store[name], _name(path, name)
                break
        if canon is None:  # only users holding the live tensor itself (its slicing user is gone)
            canon, first = _fresh(group[0][2]), _name(group[0][0], group[0][1])
        for path, name, store in slots:
            e = store[name]
            if e is canon:
                continue
            if e.shape != canon.shape or e.dtype != canon.dtype or not _same_values(e.detach(), canon.detach()):
                how = (f"{tuple(canon.shape)} vs {tuple(e.shape)}" if e.shape != canon.shape else
                       f"{canon.dtype} vs {e.dtype}" if e.dtype != canon.dtype else
                       f"both {tuple(e.shape)} but with other values: one of them changed by its slicer's export")
                raise SortedNetError(
                    f"export({sub}): {first!r} and {_name(path, name)!r} are one tensor in the model, but this "
                    f"sub-model uses different slices of it ({how}); a plain model "
                    "cannot tie them. Slice both users with the same dimension (e.g. list the tied "
                    "embedding and output layer under one Width) or export a sub-model where they agree")
            store[name] = canon

"""wrap: match patterns -> validate EVERYTHING -> then install; unwrap."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from . import slicers as _slicers
from .dims import Binding, Dimension, Target
from .errors import PatternError, SortedNetError, nearby
from .slicers import Slicer, State, is_sharded, sliced_subclass, slicer_for
from .slicers.attention import ATTRS_ONLY
from .submodel import SubModelLike

__all__ = ["wrap", "match_pattern", "unwrap_modules"]

# PyTorch layers whose fused inference fast path reads full-size weights directly
_FAST_PATH_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def match_pattern(pattern: str, modules: dict[str, nn.Module], what: str) -> list[str]:
    """Paths in ``modules`` matched by ``pattern``.

    Exact name; glob where ``*`` is one path component and ``**`` any number;
    ``re:<regex>`` matched against the whole path.

    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    >>> match_pattern("*", dict(m.named_modules()), "demo")
    ['0', '1', '2']
    """
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise PatternError(f"{what}: invalid regex {pattern!r}: {e}") from None
    elif pattern in modules:
        return [pattern]
    else:
        parts = (re.escape(p) for p in re.split(r"(\*\*|\*)", pattern))
        body = "".join({"\\*\\*": ".*", "\\*": "[^.]+"}.get(p, p) for p in parts)
        rx = re.compile(body)
    hits = [n for n in modules if n and rx.fullmatch(n)]
    if not hits:
        raise PatternError(f"{what}: pattern {pattern!r} matched no module; nearby names: "
                           f"{nearby(pattern, [n for n in modules if n])}")
    return hits


def _check_dims(dims: Sequence[Dimension]) -> None:
    seen: dict[str, Dimension] = {}
    for d in dims:
        if not isinstance(d, Dimension):
            raise SortedNetError(f"wrap() takes dimensions (sn.Width, sn.Heads, sn.Depth, ...), got {d!r}")
        if seen.get(d.name) is d:
            raise SortedNetError(f"dimension {d!r} is passed to wrap() twice; pass each dimension once "
                                 "(modules that share it are listed in its patterns)")
        if d.name in seen:
            raise SortedNetError(f"two dimensions are named {d.name!r}: {seen[d.name]!r} and {d!r}")
        if getattr(d, "_nest", None) is not None:
            raise SortedNetError(f"dimension {d.name!r} already belongs to a wrapped model; build a new one")
        seen[d.name] = d


def plan(model: nn.Module, dims: Sequence[Dimension]) -> dict[str, tuple[nn.Module, Slicer, dict[str, Binding]]]:
    """Everything ``wrap`` will install, fully validated; changes nothing."""
    if not isinstance(model, nn.Module):
        raise SortedNetError(f"wrap() needs an nn.Module, got {type(model).__name__}")
    _check_dims(dims)
    modules = dict(model.named_modules())
    wrapped = [n or "<root>" for n, m in modules.items() if "_sn" in m.__dict__]
    if wrapped:
        raise SortedNetError(f"model is already wrapped (sliced modules: {wrapped[:5]}); call nest.unwrap() first")
    sharded = [n for n, p in model.named_parameters() if is_sharded(p)]
    if sharded:
        raise SortedNetError(f"model parameters are already sharded (FSDP2 DTensors, e.g. {sharded[:3]}): "
                             "call sn.wrap before fully_shard (see docs/scaling.md)")
    targets: list[Target] = [t for d in dims for t in d.plan(modules)]
    by_path: dict[str, dict[str, Target]] = defaultdict(dict)
    for t in targets:
        prev = by_path[t.path].get(t.role)
        if prev is not None and prev.binding.dim is not t.binding.dim:
            raise PatternError(f"{t.path!r} role {t.role!r} is claimed by two dimensions: "
                               f"{prev.binding.dim.name!r} (pattern {prev.pattern!r}) and "
                               f"{t.binding.dim.name!r} (pattern {t.pattern!r}); couple them by using one object")
        by_path[t.path][t.role] = t
    out = {}
    for path, roles in by_path.items():
        m = modules[path]
        bind = {r: t.binding for r, t in roles.items()}
        own = {id(b.slicer): b.slicer for b in bind.values() if b.slicer is not None}
        if len(own) > 1:
            dims = sorted({b.dim.name for b in bind.values() if b.slicer is not None})
            raise PatternError(f"{path!r}: dimensions {dims} each need their own slicer for this module; "
                               "only one can own it")
        sl = next(iter(own.values())) if own else slicer_for(m)
        if sl is None and all(r.startswith("attr:") for r in bind):
            sl = ATTRS_ONLY
        if sl is None:
            pats = sorted({t.pattern for t in roles.values()})
            raise PatternError(f"{path!r} ({type(m).__name__}, matched by {pats}) has no slicer; register one "
                               "with @sn.slicer(YourType) (see docs/custom_slicers.md)")
        if sl is not ATTRS_ONLY:
            base = next(b for b in type(m).__mro__ if b in sl.types)
            if type(m) is not base and type(m).forward is not base.forward and not sl.overrides_forward:
                raise PatternError(f"{path!r}: {type(m).__name__} subclasses {base.__name__} with its own forward, "
                                   "which may ignore sliced attributes; register a slicer for it explicitly")
        sl.validate(m, bind, path)
        out[path] = (m, sl, bind)
    return out


def install(model: nn.Module, planned: dict, *, inplace_grad: bool, min_numel: int = 4096) -> list:
    """Swap in per-instance subclasses; returns hook handles.

    All-or-nothing: if a slicer's ``prepare`` fails (e.g. the SVD of a huge layer runs
    out of memory), every module converted so far gets back its class, ``__dict__``
    entries, parameters, buffers and ``requires_grad`` flags, and the error propagates.
    """
    saved: list[tuple[nn.Module, type, dict, dict, dict, dict]] = []
    hooks: list = []
    try:
        for path, (m, sl, bind) in planned.items():
            names = sl.attr_names(m, bind)
            cls = sliced_subclass(m, sl, names)
            saved.append((m, type(m), dict(m.__dict__), dict(m._parameters), dict(m._buffers),
                          {n: p.requires_grad for n, p in m._parameters.items() if p is not None}))
            m.__dict__["_sn"] = State(sl, bind, type(m), path, inplace_grad, min_numel=min_numel)
            sl.prepare(m)
            m.__class__ = cls
        sliced = {id(m) for m, _, _ in planned.values()}
        for m in model.modules():
            if isinstance(m, _FAST_PATH_LAYERS) and any(id(c) in sliced for c in m.modules()):
                hooks.append(m.register_forward_pre_hook(_no_fast_path))
    except BaseException:
        for h in hooks:
            h.remove()
        for m, cls, attrs, params, buffers, grads in reversed(saved):
            m.__class__ = cls
            for k in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[k]
            m.__dict__.update(attrs)
            for store, old in ((m._parameters, params), (m._buffers, buffers)):
                store.clear()
                store.update(old)
            for n, flag in grads.items():
                m._parameters[n].requires_grad_(flag)
        raise
    return hooks


def _no_fast_path(module: nn.Module, args: tuple) -> None:
    """Present only so PyTorch's fused Transformer fast path (which reads
    full-size weights) steps aside for sliced layers."""


def unwrap_modules(model: nn.Module, hooks: Iterable, *, merge: bool = False) -> None:
    for h in hooks:
        h.remove()
    for m in model.modules():
        st = m.__dict__.get("_sn")
        if st is not None:
            st.slicer.restore(m, merge)
            del m.__dict__["_sn"]
            m.__class__ = st.cls


def wrap(model: nn.Module, *dims: Dimension, submodels: Iterable[SubModelLike] | None = None,
         inplace_grad: bool = True, inplace_min_numel: int | None = None, example: Any = None):
    """Make ``model`` (changed in place) hold nested sub-models along ``dims``.

    All patterns and sizes are checked before anything changes; on error the
    model is left exactly as it was.

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> nest = sn.wrap(model, sn.Width("hidden", [8, 16, 32], out="0", inp="2"))
    >>> [str(s) for s in nest.submodels]
    ['hidden=8', 'hidden=16', 'hidden=32']
    >>> with nest.use("hidden=8"):
    ...     model(torch.randn(2, 8)).shape
    torch.Size([2, 4])

    ``inplace_grad`` (default True) adds the gradient of a sliced weight of at
    least ``inplace_min_numel`` elements (default ``sortednet.slicers.INPLACE_MIN_NUMEL``,
    4096; smaller tensors gain nothing) straight into its slice of ``.grad``,
    where that is exactly what plain autograd would do; ``torch.autograd.grad``,
    parameter hooks, ``create_graph`` and ``torch.func`` transforms get plain
    autograd automatically (see docs/mechanism.md). ``inplace_grad=False`` always
    uses plain autograd slicing (e.g. for DDP, see docs/scaling.md).

    ``example`` (inputs for one forward) runs :meth:`Nest.check` before returning:
    a wiring mistake raises a :class:`SortedNetError` naming the missing binding,
    and the model is unwrapped (left exactly as it was) first.
    """
    from .nest import Nest

    planned = plan(model, dims)
    nest = Nest.__new__(Nest)
    nest._prepare(model, dims, submodels)       # validates sub-models, still no mutation
    if inplace_min_numel is None:
        inplace_min_numel = _slicers.INPLACE_MIN_NUMEL
    if isinstance(inplace_min_numel, bool) or not isinstance(inplace_min_numel, int) or inplace_min_numel < 0:
        raise SortedNetError(f"inplace_min_numel must be an int >= 0, got {inplace_min_numel!r}")
    nest._inplace_min_numel = inplace_min_numel
    hooks = install(model, planned, inplace_grad=inplace_grad, min_numel=inplace_min_numel)
    try:
        nest._start([m for m, _, _ in planned.values()])  # run-time state first: _attach counts under use()
        nest._attach(planned, hooks)
    except BaseException:
        nest._stop()
        unwrap_modules(model, hooks)
        raise
    if example is not None:
        try:
            nest.check(example)
        except BaseException:
            nest.unwrap()
            raise
    return nest

"""Slicer registry and base class.

A slicer makes a module type nest WITHOUT touching its ``forward``: the
module gets a per-instance subclass whose attributes (``weight``,
``in_features``, ...) are properties returning views sized by the active
sub-model. One file per module type; each registers itself with
:func:`slicer`. Users register their own types the same way::

    @sn.slicer(MyLinear)
    class MyLinearSlicer(sn.Slicer):
        roles = ("out", "inp")
        attrs = ("weight", "bias")
        def full(self, m, role): return m.weight.shape[0 if role == "out" else 1]
        def value(self, m, name): return self.take(m, name, [(0, "out"), (1, "inp")][: 1 if name == "bias" else 2])
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..dims import Binding
from ..errors import PatternError, SizeError, SortedNetError

__all__ = ["Slicer", "slicer", "slicer_for", "State", "sliced_subclass"]

_REGISTRY: dict[type, "Slicer"] = {}
_SUBCLASSES: dict[tuple, type] = {}


@dataclass
class State:
    """What sortednet keeps on a sliced module (``module._sn``)."""

    slicer: "Slicer"
    bind: dict[str, Binding]
    cls: type                      # the original class, restored by unwrap / export
    path: str
    inplace_grad: bool = True
    extra: dict[str, Any] = field(default_factory=dict)



def slicer(*types: type) -> Callable[[type["Slicer"]], type["Slicer"]]:
    """Class decorator registering a :class:`Slicer` for module types.

    >>> import sortednet as sn, torch.nn as nn
    >>> sn.slicer_for(nn.Linear(2, 2)).__class__.__name__
    'LinearSlicer'
    """

    def deco(cls: type[Slicer]) -> type[Slicer]:
        inst = cls()
        for t in types:
            _REGISTRY[t] = inst
        cls.types = types
        return cls

    return deco


def slicer_for(module: nn.Module) -> "Slicer | None":
    """The registered slicer for ``module`` (exact type first, then base classes)."""
    for base in type(module).__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base]
    return None


def _cut(t: Tensor, cuts: tuple[tuple[int, int, int], ...]) -> Tensor:
    """``t`` narrowed by each ``(axis, start, length)``: a view."""
    for axis, start, length in cuts:
        t = t.narrow(axis, start, length)
    return t


class _SliceInto(torch.autograd.Function):
    """A view of a parameter whose gradient is added straight into its slice of ``param.grad``.

    Plain slicing makes autograd build a full-size zero gradient per slice and
    add it to ``.grad``; for small sub-models that costs as much as the
    matmuls. This backward touches only the slice and returns no gradient for
    the parameter, so no AccumulateGrad runs (a leaf view with a hook was
    measured slower: AccumulateGrad re-lays out gradients of strided views).
    Parameter hooks do not fire for these gradients (see docs/mechanism.md);
    ``wrap(..., inplace_grad=False)`` restores plain autograd.
    """

    @staticmethod
    def forward(ctx, param: Tensor, cuts: tuple) -> Tensor:  # type: ignore[override]
        ctx.param, ctx.cuts = param, cuts
        return _cut(param.detach(), cuts)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        p = ctx.param
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        _cut(p.grad, ctx.cuts).add_(grad)
        return None, None


#: below this many elements a full-size autograd gradient is as cheap as the custom Function
INPLACE_MIN_NUMEL = 4096


def _narrow(t: Tensor, cuts: tuple[tuple[int, int, int], ...], inplace: bool) -> Tensor:
    """``t`` cut to ``cuts``; when training, a view whose gradient goes straight into ``t.grad``."""
    if (inplace and t.requires_grad and t.numel() >= INPLACE_MIN_NUMEL and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return _SliceInto.apply(t, cuts)
    return _cut(t, cuts)


def is_sharded(t: object) -> bool:
    """True for a DTensor (FSDP2 keeps parameters sharded as DTensors between forwards).

    Never imports ``torch.distributed``: without it loaded no DTensor can exist.
    """
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


class Slicer:
    """Base slicer: declares roles, the attributes that become properties, and
    how to compute each attribute's active value."""

    def __deepcopy__(self, memo: dict) -> "Slicer":
        return self  # stateless singletons, shared by every copy

    types: ClassVar[tuple[type, ...]] = ()
    roles: ClassVar[tuple[str, ...]] = ()
    attrs: ClassVar[tuple[str, ...]] = ()
    #: the module's own forward is replaced (only where no attribute can be sliced)
    overrides_forward: ClassVar[bool] = False

    # -- to implement --------------------------------------------------
    def full(self, m: nn.Module, role: str) -> int:
        """Full number of features of ``role`` (before slicing)."""
        raise NotImplementedError

    def value(self, m: nn.Module, name: str) -> Any:
        """Active value of attribute ``name``."""
        raise NotImplementedError

    def check(self, m: nn.Module, bind: dict[str, Binding], path: str) -> None:
        """Extra validation (divisibility, ties). Raise SortedNetError."""

    # -- optional: slicers that add tensors (Rank factors / adapters) -------
    def prepare(self, m: nn.Module) -> None:
        """Create new tensors on ``m`` (``m._sn`` is set). Called by ``install``
        after every check passed: must not fail."""

    def restore(self, m: nn.Module, merge: bool) -> None:
        """Undo :meth:`prepare` at unwrap; ``merge`` bakes trained tensors into the original ones."""

    def numel(self, m: nn.Module, name: str) -> int:
        """Elements of tensor attribute ``name`` that ``export`` keeps for the active sub-model."""
        return getattr(m, name).numel()

    def adapters(self, m: nn.Module) -> list[Tensor]:
        """Parameters that alone should be trained (LoRA adapters); empty for most slicers."""
        return []

    # -- shared helpers ------------------------------------------------
    def validate(self, m: nn.Module, bind: dict[str, Binding], path: str) -> None:
        for role, b in bind.items():
            if role.startswith("attr:"):
                continue
            if role not in self.roles:
                raise PatternError(f"{b.dim.kind} {b.dim.name!r} cannot slice role {role!r} of {path!r} "
                                   f"({type(m).__name__}); it supports {list(self.roles)}")
            full = self.full(m, role)
            if b.full * b.chunks != full:
                raise SizeError(f"{b.dim.kind} {b.dim.name!r}: largest size {b.dim.full} gives "
                                f"{b.full * b.chunks} features but {path!r} ({type(m).__name__}) has {full} "
                                f"for role {role!r}")
        self.check(m, bind, path)

    @staticmethod
    def tensor(m: nn.Module, name: str) -> Tensor | None:
        t = m._parameters.get(name)
        return m._buffers.get(name) if t is None and name not in m._parameters else t

    def take(self, m: nn.Module, name: str, axes: list[tuple[int, str]]) -> Tensor | None:
        """``m.<name>`` sliced on each ``(axis, role)`` to the role's active features (a view).

        On the hot path of every forward: kept to a few dict lookups and ``narrow`` calls.
        """
        t = m._parameters.get(name)
        if t is None:
            t = m._buffers.get(name)
            if t is None:
                return None
        if is_sharded(t):  # FSDP2 at rest: its bookkeeping reads getattr(m, name) and
            return t       # must get its sharded parameter back, never a slice of it
        st: State = m.__dict__["_sn"]
        bind = st.bind
        cuts: list[tuple[int, int, int]] = []
        chunked = None
        for axis, role in axes:
            b = bind.get(role)
            if b is None:
                continue
            n = b.dim.active * b.unit // b.div
            full = t.shape[axis]
            if n * b.chunks == full:
                continue
            if b.chunks > 1:
                chunked = (axis, n, full // b.chunks)
            else:
                cuts.append((axis, 0, n))
        if chunked is None:
            return _narrow(t, tuple(cuts), st.inplace_grad) if cuts else t
        axis, n, per = chunked
        parts = [_narrow(t, (*cuts, (axis, c * per, n)), st.inplace_grad) for c in range(t.shape[axis] // per)]
        return torch.cat(parts, axis)

    def features(self, m: nn.Module, role: str, full: int) -> int:
        """Active features of ``role`` (``full`` when the role is not bound)."""
        b = m.__dict__["_sn"].bind.get(role)
        return full if b is None else b.features() * b.chunks

    def attr_names(self, m: nn.Module, bind: dict[str, Binding]) -> tuple[str, ...]:
        """Names that become properties on this instance's subclass."""
        return self.attrs + tuple(sorted(r[5:] for r in bind if r.startswith("attr:")))

    def namespace(self, m: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
        """Class body of the per-instance subclass."""

        def make(name: str) -> property:
            role = f"attr:{name}"

            def get(self_: nn.Module) -> Any:
                st = self_.__dict__["_sn"]
                b = st.bind.get(role)
                return st.slicer.value(self_, name) if b is None else b.features()

            def set_(self_: nn.Module, v: Any) -> None:
                self_.__dict__[name] = v

            return property(get, set_)

        return {n: make(n) for n in names}

    def export(self, live: nn.Module, copy_: nn.Module) -> nn.Module:
        """Turn the deep copy of a sliced module into a plain, smaller module.

        Called under ``use(sub)``; ``copy_`` already has the original class.
        """
        for name in self.attr_names(live, live._sn.bind):
            v = getattr(live, name)
            if name in live._parameters:
                copy_._parameters[name] = None if v is None else nn.Parameter(  # requires_grad of the full
                    v.detach().clone(memory_format=torch.contiguous_format),  # parameter: a cat under no_grad
                    requires_grad=live._parameters[name].requires_grad)  # (packed q/k/v) would lose it
            elif name in live._buffers:
                copy_._buffers[name] = None if v is None else v.detach().clone()
            else:
                copy_.__dict__[name] = copy.copy(v)
        return copy_

    def exported_tensors(self, m: nn.Module) -> list[Tensor]:
        """Full tensors that export replaces (so the deep copy can skip them)."""
        return [t for n in self.attrs if (t := self.tensor(m, n)) is not None]


def _deepcopy(self: nn.Module, memo: dict) -> nn.Module:
    """A copy that is sliced by the same dimensions (it follows the same active sub-model)."""
    new = type(self).__new__(type(self))
    memo[id(self)] = new
    new.__dict__.update(copy.deepcopy(self.__dict__, memo))
    return new


def _no_pickle(self: nn.Module, protocol: int) -> None:
    raise SortedNetError(f"a wrapped {self.__dict__['_sn'].cls.__name__} ({self.__dict__['_sn'].path!r}) cannot be "
                         "pickled (its class is made by sn.wrap): use sn.save(nest, path) for all sub-models, "
                         "nest.export(sub) for one plain model, or nest.unwrap() first")


def sliced_subclass(m: nn.Module, sl: Slicer, names: tuple[str, ...]) -> type:
    """The per-instance subclass of ``type(m)`` (cached per class, slicer and names)."""
    key = (type(m), type(sl), names)
    cls = _SUBCLASSES.get(key)
    if cls is None:
        base = type(m)
        cls = type(f"Sorted{base.__name__}", (base,), {**sl.namespace(m, names), "_sn_sliced": True,
                                                       "__module__": base.__module__,
                                                       "__deepcopy__": _deepcopy, "__reduce_ex__": _no_pickle})
        _SUBCLASSES[key] = cls
    return cls


# register the built-in slicers (each file registers itself where it is defined)
from . import attention, conv, depth, embedding, linear, mha, norm  # noqa: E402,F401

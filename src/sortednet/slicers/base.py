"""Slicer base class, registry (:func:`slicer`, :func:`slicer_for`), per-module state
(:class:`State`) and the per-instance sliced subclasses. The package ``sortednet.slicers``
re-exports these names; slicer files import them from here."""

from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..dims import REENTRANT, Active, Binding
from ..errors import PatternError, SizeError, SortedNetError
from ..modes import EXPORTING
from ..plan import pin_recomputation as _pin_recomputation
from ..plan import slicer_error as _slicer_error
from ..views import (
    ABSENT,
    DYNAMIC,
    STATIC,
    View,
    _aliases,
    _compiling,
    _grad_enabled,
    computed,
    cut,
    cuts_for,
    distributed_bookkeeping,
    fx_flag,
    fx_refused,
    fx_tracing,
    is_sharded,
    narrow,
    new_lock,
    sharded_read,
    view,
)
from ..views import SliceInto as _SliceInto  # noqa: F401  (kept importable: sortednet.slicers._SliceInto)

if TYPE_CHECKING:
    from .norm import NormStats

__all__ = ["Slicer", "slicer", "slicer_for", "State", "sliced_subclass", "STATIC"]

_REGISTRY: dict[type, "Slicer"] = {}
#: (class, slicer type, names) -> its sliced subclass, held weakly: shared by every module wrapped with them while
#: one is, then gone (a class made per model, by a factory, is freed with its last model after unwrap)
_SUBCLASSES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def memory_format(t: Tensor | None) -> torch.memory_format:
    """The layout an exported copy of a slice of ``t`` gets: channels-last when ``t`` is (a convolution
    weight after ``model.to(memory_format=torch.channels_last)``), else contiguous."""
    if t is not None and not t.is_contiguous():
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks


@dataclass
class State:
    """What sortednet keeps on a sliced module (``module._sn``)."""

    slicer: "Slicer"
    bind: dict[str, Binding]
    cls: type                      # the original class, restored by unwrap / export
    path: str
    inplace_grad: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    norm: NormStats | None = None  # calibrated BatchNorm statistics (slicers/norm.py; set by calibrate)
    min_numel: int = 4096          # smallest tensor served by the in-place gradient path
    slot: int = -1                 # index of this module in every plan (set by wrap)
    active: Active | None = None   # the nest's run-time state (set by wrap)
    lock: Any = field(default_factory=new_lock, repr=False)  # held while adding into .grad (one per nest)
    guard: frozenset = frozenset()  # parameters / buffers a user's slicer serves: a copy of one it computes
    #                                 refuses writes in place (check.guard_written_copies; views.computed)

    def __deepcopy__(self, memo: dict) -> "State":
        """A copy (EMA / teacher model) follows the same nest state, with its own lock."""
        new = copy.copy(self)
        memo[id(self)] = new
        new.bind = copy.deepcopy(self.bind, memo)
        new.extra = copy.deepcopy(self.extra, memo)
        new.norm = copy.deepcopy(self.norm, memo)
        new.lock = memo.setdefault(("sortednet.lock", id(self.lock)), new_lock())  # shared by the copy's modules
        return new

    def sizes(self) -> dict[str, int]:
        """Active size of every dimension (by name) for the caller."""
        a = self.active
        return a.plan().sizes if a is not None else {b.dim.name: b.dim.active for b in self.bind.values()}


def slicer(*types: type) -> Callable[[type["Slicer"]], type["Slicer"]]:
    """Class decorator registering a :class:`Slicer` for module types.

    >>> import sortednet as sn, torch.nn as nn
    >>> sn.slicer_for(nn.Linear(2, 2)).__class__.__name__
    'LinearSlicer'
    """

    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if not types or bad:
        raise SortedNetError(f"sn.slicer(...) takes the nn.Module classes the slicer serves, e.g. "
                             f"@sn.slicer(MyLayer); got {list(types) if types else 'none'}"
                             + (f" ({bad[0]!r} is not an nn.Module class)" if bad else ""))

    def deco(cls: type[Slicer]) -> type[Slicer]:
        if not (isinstance(cls, type) and issubclass(cls, Slicer)):
            raise SortedNetError(f"@sn.slicer({', '.join(t.__name__ for t in types)}) decorates a subclass of "
                                 f"sn.Slicer, not {cls!r}")
        if cls.full is Slicer.full:
            raise SortedNetError(f"slicer {cls.__name__}: full(m, role) is not defined (the number of features "
                                 "of each role before slicing); define it (docs/custom_slicers.md)")
        for field_ in ("roles", "attrs", "static"):
            v = getattr(cls, field_)
            if isinstance(v, str) or not isinstance(v, Sequence) or not all(isinstance(x, str) for x in v):
                raise SortedNetError(f"slicer {cls.__name__}: {field_} must be a tuple of names, e.g. "
                                     f"{field_} = ('weight',); got {v!r}")
            if not isinstance(v, tuple):  # (a list: served as the tuple it names)
                setattr(cls, field_, tuple(v))
        if not isinstance(cls.views, Mapping) or not all(isinstance(k, str) for k in cls.views):
            raise SortedNetError(f"slicer {cls.__name__}: views must be a dict of attribute name -> ((axis, role), "
                                 f"...); got {cls.views!r}")
        own_views = cls.__dict__.get("views", {})  # (inherited entries may name a role a subclass leaves out,
        for name, axes in own_views.items() if isinstance(own_views, Mapping) else ():  # harmlessly: never bound)
            if isinstance(axes, Sequence) and not isinstance(axes, str):
                for a in axes:
                    if isinstance(a, Sequence) and len(a) == 2 and isinstance(a[1], str) and a[1] not in cls.roles:
                        raise SortedNetError(f"slicer {cls.__name__}: views[{name!r}] cuts by role {a[1]!r}, which "
                                             f"is not one of its roles {cls.roles}")
        if cls.value is Slicer.value and cls.rules is Slicer.rules:
            unserved = [a for a in dict.fromkeys((*cls.attrs, *cls.static)) if a not in cls.views]
            static = [a for a in unserved if a in cls.static]
            if static:
                raise SortedNetError(f"slicer {cls.__name__}: attrs {static} are in static, which the slicer's "
                                     "value(m, name) computes once per size, and it defines none; add a value() "
                                     "(docs/custom_slicers.md)")
            if unserved:
                raise SortedNetError(f"slicer {cls.__name__}: attrs {unserved} have no views entry and the slicer "
                                     "defines no value(m, name) to compute them; add one of the two "
                                     "(docs/custom_slicers.md)")
        had = cls.__dict__.get("types")
        cls.types = tuple(dict.fromkeys((*(had or ()), *types)))  # (stacked decorators: all of them, for own_forward)
        try:
            inst = cls()
        except Exception as e:
            if had is None:
                del cls.types
            else:
                cls.types = had
            raise SortedNetError(f"slicer {cls.__name__}: it is made once with no arguments (cls()) and shared "
                                 f"by every module it serves; that failed: {type(e).__name__}: {e}") from e
        for t in types:
            _REGISTRY[t] = inst
        return cls

    return deco


def own_forward(cls: type, sl: "Slicer") -> bool:
    """Whether ``cls`` subclasses the type ``sl`` is registered for with a forward of its own, which may
    ignore the sliced attributes (unless the slicer replaces the forward; see also :meth:`Slicer.verifies_forward`)."""
    base = next((b for b in cls.__mro__ if b in sl.types), None)
    return base is not None and cls is not base and cls.forward is not base.forward and not sl.overrides_forward


#: called once per unregistered class on a miss of :func:`slicer_for`; each may register a slicer for it
#: (``sortednet.slicers`` adds the one for transformers' layer types, so that no import order matters)
ON_MISS: list[Callable[[type], None]] = []
_MISSED: set[type] = set()


def slicer_for(module: nn.Module) -> "Slicer | None":
    """The registered slicer for ``module`` (exact type first, then base classes)."""
    for attempt in range(2):
        for base in type(module).__mro__:
            if base in _REGISTRY:
                return _REGISTRY[base]
        if attempt or type(module) in _MISSED:
            return None
        _MISSED.add(type(module))
        for hook in ON_MISS:
            hook(type(module))
    return None


_cut, _narrow = cut, narrow  # older private names

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

    #: optional speed-up: tensor attributes that are plain views, ``{name: ((axis, role), ...)}``,
    #: and attributes that depend on the active sizes only (``STATIC``); see :meth:`rules`
    views: ClassVar[dict[str, tuple[tuple[int, str], ...]]] = {}
    static: ClassVar[tuple[str, ...]] = ()
    #: parameters wrap froze (LoRA's base weight and bias): one assigned in their place must be frozen too
    frozen: ClassVar[tuple[str, ...]] = ()

    # -- to implement --------------------------------------------------
    def full(self, m: nn.Module, role: str) -> int:
        """Full number of features of ``role`` (before slicing)."""
        raise NotImplementedError

    def value(self, m: nn.Module, name: str) -> Any:
        """Active value of attribute ``name``. The default serves a ``views`` entry by ``take()`` (read where no
        plan is in force yet); a slicer with other attributes defines its own."""
        axes = self.rules(m).get(name)
        if isinstance(axes, tuple):
            return self.take(m, name, list(axes))
        raise NotImplementedError(f"{type(self).__name__} serves {name!r} by neither views nor a value() of its own")

    def check(self, m: nn.Module, bind: dict[str, Binding], path: str) -> None:
        """Extra validation (divisibility, ties). Raise SortedNetError."""

    def verifies_forward(self, cls: type) -> bool:
        """Whether a subclass ``cls`` of a registered type with a forward of its own is accepted and run alone
        at wrap to verify that its forward reads the sliced attributes (BatchNorm: ``check.norm_self_check``).
        Default False: ``wrap`` refuses such subclasses unless a slicer is registered for them."""
        return False

    # -- optional: slicers that add tensors (Rank factors / adapters) -------
    def prepare(self, m: nn.Module) -> None:
        """Create new tensors on ``m`` (``m._sn`` is set). Called by ``install``
        after every check passed: must not fail."""

    def pre_restore(self, m: nn.Module, merge: bool) -> Any:
        """Compute what :meth:`restore` needs (may fail: nothing is changed yet). Default: nothing."""
        return None

    def restore(self, m: nn.Module, merge: bool, pending: Any = None) -> None:
        """Undo :meth:`prepare` at unwrap; ``merge`` bakes trained tensors into the original ones.
        ``pending`` is what :meth:`pre_restore` returned; must not fail (reference swaps only) and must be
        idempotent: after a Ctrl-C in the middle of it, unwrap runs it again."""

    def rules(self, m: nn.Module) -> dict[str, Any]:
        """How the per-sub-model plan serves each attribute of ``m`` without calling :meth:`value`:
        ``{name: ((axis, role), ...)}`` for a tensor that is exactly ``take(m, name, axes)``,
        ``{name: STATIC}`` for a value that depends on the active sizes only (computed once
        per sub-model by :meth:`value`). Attributes left out run :meth:`value` on every read.
        Default: the class attributes ``views`` and ``static``."""
        return {**dict.fromkeys(self.static, STATIC), **self.views}

    def numel(self, m: nn.Module, name: str) -> int:
        """Elements of tensor attribute ``name`` that ``export`` keeps for the active sub-model.

        A tensor sharded by FSDP2 is read whole (its bookkeeping needs the sharded parameter back), so its
        count comes from its global shape and the plan's cuts: counted, never sliced (no collective)."""
        t = self.tensor(m, name)
        if t is not None and is_sharded(t):
            axes = self.rules(m).get(name)
            st: State = m.__dict__["_sn"]
            if not isinstance(axes, tuple):
                raise SortedNetError(f"{st.path + '.' if st.path else ''}{name} is sharded (FSDP2) and its active "
                                     "size is not a plain slice: ask for costs before fully_shard (cost() "
                                     "answers from the model as wrapped), or in one process on the checkpoint")
            cuts, segs = cuts_for(t.shape, st.bind, axes, st.sizes())
            shape = list(t.shape)
            for axis, _, n in cuts:
                shape[axis] = n
            if segs is not None:
                shape[segs[0]] = sum(n for _, n in segs[1])
            return math.prod(shape)
        return getattr(m, name).numel()

    def adapters(self, m: nn.Module) -> list[Tensor]:
        """Parameters that alone should be trained (LoRA adapters); empty for most slicers."""
        return []

    def planned_state(self, m: nn.Module, bind: dict[str, Binding]) -> dict[str, tuple | None]:
        """What :meth:`prepare` will do to ``m``'s state_dict, known before it runs (``sn.load``
        checks a checkpoint against it before wrapping): local name -> ``(shape, dtype)`` of
        an added tensor, or None for a removed one. Empty for slicers that add nothing."""
        return {}

    # -- shared helpers ------------------------------------------------
    def validate(self, m: nn.Module, bind: dict[str, Binding], path: str) -> None:
        from torch.nn.utils import parametrize

        if parametrize.is_parametrized(m):
            raise PatternError(f"{path!r} ({type(m).__name__}) has parametrized tensors "
                               f"({sorted(m.parametrizations)}: weight_norm, spectral_norm, ...) whose value is "
                               "computed in every forward from other tensors: slicing it is not supported; "
                               "remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) "
                               "or leave the module out of the dimension")
        try:
            added = self.planned_state(m, bind)  # tensors prepare() creates (rank factors, adapters)
        except KeyError:  # a slicer validating part of its binding (Rank): it checks its own tensors
            added = dict.fromkeys(self.rules(m))
        for name, axes in self.rules(m).items():
            if axes is STATIC and (name in m._parameters or name in m._buffers
                                   or isinstance(m.__dict__.get(name), Tensor)):
                raise PatternError(
                    f"{path!r} ({type(m).__name__}): {type(self).__name__} declares the tensor {name!r} static "
                    "(computed once per sub-model and kept): it would keep reading the tensor of then after the "
                    "module's is replaced or moved (load_state_dict(assign=True), .to(), .double()). Declare it in "
                    "views (a cut along roles' axes) or leave it to value(); static is for sizes (docs/"
                    "custom_slicers.md)")
            if (isinstance(axes, tuple) and isinstance(m.__dict__.get(name), Tensor) and name not in added
                    and name not in m._parameters and name not in m._buffers):
                if f"{name}_orig" in m._parameters and f"{name}_mask" in m._buffers:
                    raise PatternError(
                        f"{path!r} ({type(m).__name__}) is pruned (torch.nn.utils.prune: {name!r} is computed in "
                        f"every forward from {name}_orig and {name}_mask): slicing it is not supported; make the "
                        f"pruning permanent first (torch.nn.utils.prune.remove(module, {name!r})) or leave the "
                        "module out of the dimension")
                if not type(self).__module__.startswith("sortednet."):  # (a slicer of the user's)
                    raise PatternError(
                        f"{path!r} ({type(m).__name__}): {type(self).__name__} declares {name!r} in views, but the "
                        "module has no parameter or buffer of that name, only a plain tensor attribute (views cut "
                        "parameters and buffers): register it as a buffer (m.register_buffer), serve it from "
                        "value() with take(), or, if a weight_norm / spectral_norm hook or other code computes it "
                        "in every forward, remove that hook or leave the module out of the dimension")
                raise PatternError(f"{path!r} ({type(m).__name__}) has no parameter or buffer {name!r} to slice "
                                   "(a weight_norm / spectral_norm hook or other code computes it in every "
                                   "forward): remove that hook or leave the module out of the dimension")
            if (name == "weight" and isinstance(axes, tuple) and name not in added and name not in m._parameters
                    and name not in m._buffers and name not in m.__dict__):  # (a bias may be absent: nn.RMSNorm)
                raise PatternError(f"{path!r} ({type(m).__name__}) has no {name!r} at all (code such as a WeightDrop "
                                   "pre-hook sets it in every forward from another tensor): there is nothing to "
                                   "slice; leave the module out of the dimension")
        for role, b in bind.items():
            if role.startswith("attr:"):
                continue
            if role not in self.roles:
                raise PatternError(f"{b.dim.kind} {b.dim.name!r} cannot slice role {role!r} of {path!r} "
                                   f"({type(m).__name__}); it supports {list(self.roles)}")
            full = self._full_named(m, path, role)
            if b.total(b.dim.full) != full:
                self.check(m, bind, path)  # its own, more specific refusal first (a LayerNorm over (C, H, W))
                hint = (f"; Heads {b.dim.name!r} cuts a per_head= module by one unit per head, and {path!r} has "
                        f"{full // b.full} per head ({full} for {b.dim.full} heads: a gate per head feature, as "
                        "wide as the heads' outputs): Heads cannot cut it; make it one unit per head (a Linear to "
                        f"the {b.dim.full} heads), or give the attention a slicer of yours (docs/custom_slicers.md)"
                        if b.dim.kind == "heads" and role == "out" and full % b.full == 0 else
                        f"; if {path!r} stacks {full // b.full} fused projections (e.g. gate|up), state it: "
                        "Width(..., chunks={pattern: n})"
                        if role == "out" and len(b.blocks) == 1 and full % b.full == 0 else
                        f"; {path!r} reads more features than the dimension has (the sliced ones concatenated with "
                        "others, or flattened with spatial positions): a prefix of its input is not the dimension's "
                        "units, so it cannot be bound here" if role == "inp" and full > b.total(b.dim.full) else "")
                what = "layers" if role == "depth" else "features"
                if not type(self).__module__.startswith("sortednet."):  # (a slicer of the user's: its full() too)
                    hint += (f"; or {type(self).__name__}.full({role!r}), a slicer of yours, reports another size "
                             "than the module's tensors have on that role's axis: check its full() "
                             "(docs/custom_slicers.md)")
                raise SizeError(f"{b.dim.kind} {b.dim.name!r}: largest size {b.dim.full} gives "
                                f"{b.total(b.dim.full)} {what} but {path!r} ({type(m).__name__}) has {full} "
                                f"for role {role!r}{hint}")
        self.check(m, bind, path)  # (an exception of the user's own passes as it is: check() is theirs to raise)
        self._check_declared(m, bind, path, added)  # (after the slicer's own, more specific refusals)

    def _full_named(self, m: nn.Module, path: str, role: str) -> int:
        """``full(m, role)``; a user's slicer failing there is refused naming the slicer and the module
        (sortednet's own slicers' errors pass as they are)."""
        try:
            n = self.full(m, role)
        except SortedNetError:
            raise
        except Exception as e:
            if type(self).__module__.startswith("sortednet."):
                raise
            raise PatternError(f"the slicer {type(self).__name__} of {path or '<root>'!r} ({type(m).__name__}) "
                               f"raised in full(): {type(e).__name__}: {e}") from e
        if isinstance(n, torch.Tensor) and n.dim() == 0 and not n.is_meta and not n.is_floating_point() \
                and not n.is_complex() and n.dtype != torch.bool:
            n = int(n)  # (a 0-dim integer tensor: w.shape[0] read as torch.tensor(w.shape)[0])
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
            raise PatternError(f"the slicer {type(self).__name__} of {path or '<root>'!r} ({type(m).__name__}) "
                               f"returned {type(n).__name__} {str(n)[:40]} from full(m, {role!r}): it must be the "
                               "role's unsliced number of features, an int >= 0 (docs/custom_slicers.md)")
        return int(n)

    def _check_declared(self, m: nn.Module, bind: dict[str, Binding], path: str, added: dict) -> None:
        """What the slicer declares must fit the module, before anything changes: every attribute it serves
        becomes a property of the module's subclass, so one the module's class computes itself (a property)
        would be replaced; every ``views`` entry cuts existing axes of the tensor, whose full length is the
        bound role's at the largest sizes (else the full model itself would be cut: the largest sub-model
        must be the model as it was)."""
        where = f"{path or '<root>'!r} ({type(m).__name__})"
        for name in self.attr_names(m, bind):
            d = inspect.getattr_static(type(m), name, None)
            if isinstance(d, functools.cached_property) or hasattr(type(d), "__set__"):
                raise PatternError(f"{where} defines {name!r} as a property (or another descriptor) of its class; "
                                   f"sortednet serves {name!r} itself, sized per sub-model, which would replace "
                                   "that code. Keep it a plain attribute, or register a slicer for the class "
                                   "that does not serve it (docs/custom_slicers.md)")
        for name, axes in self.rules(m).items():
            if axes is STATIC:
                continue
            if isinstance(axes, str) or not isinstance(axes, Sequence) or not all(
                    isinstance(a, Sequence) and len(a) == 2 and isinstance(a[0], numbers.Integral)
                    and not isinstance(a[0], bool) and isinstance(a[1], str) for a in axes):
                raise PatternError(f"the slicer {type(self).__name__} of {where}: views[{name!r}] must be a tuple "
                                   f"of (axis, role) pairs, e.g. ((0, 'out'), (1, 'inp')); got {axes!r}")
            t = None if name in added else self.tensor(m, name)
            if not isinstance(t, Tensor):
                continue
            for axis, role in axes:
                axis = int(axis)
                if not -t.dim() <= axis < t.dim():
                    raise PatternError(f"the slicer {type(self).__name__} of {where}: views[{name!r}] cuts axis "
                                       f"{axis} for role {role!r}, but {name!r} has {t.dim()} axes "
                                       f"{tuple(t.shape)}")
                b = bind.get(role)
                if b is None and not type(self).__module__.startswith("sortednet.") and role in self.roles \
                        and t.shape[axis] > 1:  # (an empty tensor for "none", a length-1 axis broadcast)
                    try:  # (a role no dimension binds here: its full() must still be that axis' length)
                        n = self.full(m, role)
                    except Exception:
                        n = None  # (full() failing is refused where it is called to size a bound role)
                    if isinstance(n, int) and not isinstance(n, bool) and n != t.shape[axis]:
                        raise SizeError(f"the slicer {type(self).__name__} of {where} cuts {name!r} "
                                        f"{tuple(t.shape)} on axis {axis} for role {role!r}, whose full size is "
                                        f"{n} (full(m, {role!r})), not that axis' {t.shape[axis]}: it cuts that "
                                        "tensor by the wrong role. Check its views (docs/custom_slicers.md)")
                if b is not None and t.shape[axis] != b.total(b.dim.full):
                    raise SizeError(f"{b.dim.kind} {b.dim.name!r}: the slicer {type(self).__name__} of {where} cuts "
                                    f"{name!r} {tuple(t.shape)} on axis {axis} for role {role!r}, whose largest "
                                    f"size {b.dim.full} gives {b.total(b.dim.full)} features, not that axis' "
                                    f"{t.shape[axis]}: the full model itself would be cut. Check its full() and "
                                    "views (docs/custom_slicers.md)")

    @staticmethod
    def tensor(m: nn.Module, name: str) -> Tensor | None:
        t = m._parameters.get(name)
        return m._buffers.get(name) if t is None and name not in m._parameters else t

    def take(self, m: nn.Module, name: str, axes: list[tuple[int, str]]) -> Tensor | None:
        """``m.<name>`` (a parameter, a buffer, or a plain tensor attribute of the instance) sliced on each
        ``(axis, role)`` to the role's active features (a view); None where the module holds none.

        Attributes declared in :meth:`rules` do not come here: their cuts are in the plan.
        """
        t = m._parameters.get(name)
        if t is None:
            t = m._buffers.get(name)
            if t is None:
                t = m.__dict__.get(name)  # (a plain tensor attribute: a mask kept on the instance)
                if not isinstance(t, Tensor):
                    return None
        st: State = m.__dict__["_sn"]
        for a in axes:
            if a[1] not in self.roles:  # (a typo would leave the tensor whole at every size)
                raise SortedNetError(f"the slicer {type(self).__name__} of {st.path or '<root>'!r} "
                                     f"({st.cls.__name__}): take({name!r}, ...) cuts by role {a[1]!r}, which is not "
                                     f"one of its roles {self.roles} (docs/custom_slicers.md)")
        cuts, segs = cuts_for(t.shape, st.bind, axes, st.sizes())
        if is_sharded(t):  # FSDP2 at rest: its bookkeeping reads getattr(m, name) and must get its sharded
            return sharded_read(t, bool(cuts) or segs is not None, st, name)  # parameter back, never a slice
        return view(t, cuts, segs, st, name, m)

    def features(self, m: nn.Module, role: str, full: int) -> int:
        """Active features of ``role`` (``full`` when the role is not bound)."""
        b = m.__dict__["_sn"].bind.get(role)
        return full if b is None else b.total()

    def attr_names(self, m: nn.Module, bind: dict[str, Binding]) -> tuple[str, ...]:
        """Names that become properties on this instance's subclass."""
        return self.attrs + tuple(sorted(r[5:] for r in bind if r.startswith("attr:")))

    def namespace(self, m: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
        """Class body of the per-instance subclass."""

        def make(name: str) -> property:
            role = f"attr:{name}"

            def get(self_: nn.Module) -> Any:  # the hot path: one plan lookup
                if fx_flag() and fx_tracing():
                    raise fx_refused(f"{self_.__dict__['_sn'].path or '<root>'!r}.{name}")
                st = self_.__dict__["_sn"]
                a = st.active
                try:
                    if a is None:  # not attached (yet)
                        b = st.bind.get(role)
                        return st.slicer.value(self_, name) if b is None else b.features()
                    p = a._scoped  # Active.plan(), inlined: the nest's context variable, else the default
                    p = a.default if p is a else p
                    if not _compiling():
                        if (h := _saved_tensors_hooks(False)) is not None:  # (maybe a non-reentrant checkpoint's
                            _pin_recomputation(a, p, h)                     # forward: both may be true)
                        if not _grad_enabled() and (a.training or REENTRANT[0]):  # (maybe a reentrant
                            a.on_no_grad_read(p)              # checkpoint's forward: Pin.no_grad_read)
                    e = p.entries[st.slot][name]
                    if e.__class__ is View:
                        return e.take(self_, st)
                    if e is ABSENT:  # (a views tensor registered as None: None, or what a functional call
                        t = self_._parameters.get(name, self_._buffers.get(name))  # put in the slot, sliced)
                        return None if t is None else st.slicer.take(self_, name, list(st.slicer.rules(self_)[name]))
                    if e is DYNAMIC:
                        t = self_._parameters.get(name)
                        if t is not None and is_sharded(t) and distributed_bookkeeping():  # FSDP2 must get its
                            return t  # parameter back, never a value computed from it (a LoRA weight W0 + B·A:
                        v = _whole(st.slicer.value(self_, name), self_, name)  # it took that for the parameter
                        return computed(v, self_, name, st) if name in st.guard else v  # and wrote it into the base)
                    return e
                except AttributeError as err:  # from a property, Python would fall back to nn.Module.__getattr__,
                    raise _read_error(st, name, err) from err  # which returns the FULL-size tensor: never that
                except SortedNetError:
                    raise
                except Exception as err:  # a user's slicer (an axis swapped, a role it does not have) failing
                    if not NAMING_SLICER_ERRORS[0] or type(st.slicer).__module__.startswith("sortednet."):
                        raise                 # while wrap reads every attribute: named (later errors, such as
                    raise _slicer_error(st, name, err) from err  # running out of memory, keep their type)

            def set_(self_: nn.Module, v: Any) -> None:  # (nn.Module.__setattr__ of a name that is not a
                d = self_.__dict__                         # parameter, buffer or child: in_features, a Rank
                if name in d and _same(d[name], v):        # layer's computed weight, ...)
                    return  # the value it has (transformers' tie_weights re-sets out_features)
                try:
                    now = get(self_)
                except SortedNetError:
                    now = _MISSING
                if now is not _MISSING and _same(now, v):
                    return  # the value it reads under the active sub-model (m.n = m.n inside use)
                raise _write_error(self_.__dict__["_sn"], name, v, replica=bool(d.get("_is_replica")))

            def del_(self_: nn.Module) -> None:
                raise _write_error(self_.__dict__["_sn"], name, None, delete=True)

            return property(get, set_, del_)

        return {n: make(n) for n in names}

    def export(self, live: nn.Module, copy_: nn.Module) -> nn.Module:
        """Turn the deep copy of a sliced module into a plain, smaller module.

        Called under ``use(sub)``; ``copy_`` already has the original class.
        """
        names = self.attr_names(live, live._sn.bind)
        values = _read_for_export(live, names)
        for name in names:
            v = values[name]
            if name in live._parameters:
                full = live._parameters[name]
                copy_._parameters[name] = None if v is None else parameter_like(  # requires_grad of the full
                    full, v.detach().clone(memory_format=memory_format(full)))  # parameter: a cat under no_grad
                #                                                                  (packed q/k/v) would lose it
            elif name in live._buffers:
                copy_._buffers[name] = None if v is None else v.detach().clone()
            elif isinstance(v, Tensor):  # a plain tensor attribute: the export's own memory, like the others
                own = v.detach().clone()
                copy_.__dict__[name] = own.requires_grad_() if v.requires_grad and own.is_floating_point() else own
            else:
                copy_.__dict__[name] = copy.copy(v)
        return copy_

    def exported_tensors(self, m: nn.Module) -> list[Tensor]:
        """Full tensors that export replaces (so the deep copy can skip them)."""
        return [t for n in self.attrs if (t := self.tensor(m, n)) is not None]

    def skipped(self, m: nn.Module) -> list[str]:
        """Names of ``m``'s children that the active sub-model does not run (export leaves
        them out of the copy; Depth: the blocks past the active depth). Empty by default."""
        return []

    def moved(self, m: nn.Module) -> dict[str, str]:
        """Where ``export`` puts ``m``'s tensors that it moves into new children, ``{name: "child.name"}``
        (a factored low-rank layer's bias), so a tensor ``m`` shares with other modules stays shared."""
        return {}


def _read_for_export(live: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
    """The values of ``names`` that ``export`` copies. In training mode each is read twice, the random state
    restored after (export draws nothing): a ``value()`` that draws (dropout on a weight, noise) reads other values
    each time (beyond rounding), and the export would keep one draw as its weight: refused, naming it."""
    tensors = [t for t in (*live._parameters.values(), *live._buffers.values()) if t is not None]
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices, enabled=live.training):
        out = {name: getattr(live, name) for name in names}
        for name in names:
            if name not in live._parameters and name not in live._buffers and isinstance(out[name], Tensor):
                _refuse_derived(live, name)
        for name in names if live.training else ():
            a, b = out[name], getattr(live, name)
            if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.device.type == "meta":  # (no values)
                continue
            if not (a.shape == b.shape and (torch.equal(a, b) or _close(a, b))):
                path = live._sn.path
                raise SortedNetError(
                    f"export: {f'{path}.{name}' if path else name} ({live._sn.cls.__name__}) reads other values at "
                    f"each read in training mode (its slicer's value() draws: dropout, noise), so the export would "
                    "keep one draw as its tensor. Export with the model in eval mode (model.eval(), then "
                    "nest.export(sub)), or draw in the module's forward")
    return out


def _close(a: Tensor, b: Tensor) -> bool:
    """Two reads of one value: equal but for rounding (a kernel that is not bit-repeatable, atomics on a GPU),
    where a draw (dropout, noise) differs by far more."""
    try:
        return torch.allclose(a, b, rtol=1e-3, atol=1e-5, equal_nan=True)
    except (RuntimeError, TypeError):  # (a dtype allclose does not take: they differ)
        return False


def _refuse_derived(live: nn.Module, name: str) -> None:
    """Refuse to export the plain tensor attribute ``name`` where the slicer computes it from parameters
    (``self.wT = self.weight.t()`` kept at init, served as a cut of the weight): the export would hold a detached
    copy of it, which no longer follows them (training the export would not change it, the parameters it came from
    would drive nothing). Read with gradients (export itself runs without them); a plain leaf tensor that
    requires grad, cut by ``value()``, is its own (exported as such)."""
    with torch.enable_grad():
        v = getattr(live, name)
    if not isinstance(v, Tensor):
        return
    sources = [n for n, p in live._parameters.items() if p is not None and _aliases(v, p)]
    if not sources:  # (another module's parameter, a view of a buffer: the copy would be cut loose from them)
        held = EXPORTING.get()
        if held is None:
            sources = [n for n, t in (*live._parameters.items(), *live._buffers.items())
                       if t is not None and _aliases(v, t)]
        else:  # (the model's storages, mapped once per export: a walk per attribute was quadratic)
            if held[1] is None:
                held[1] = _storages(held[0])
            sources = held[1].get(_storage(v), [])
    if not sources and v.grad_fn is not None:
        own = {id(p): n for n, p in live._parameters.items() if p is not None}
        sources = [own.get(id(t), f"a parameter {tuple(t.shape)} of another module") for t in _leaves(v.grad_fn)
                   if isinstance(t, nn.Parameter)]
    if sources:
        path = live._sn.path
        raise SortedNetError(
            f"export: {f'{path}.{name}' if path else name} ({live._sn.cls.__name__}) is a plain tensor attribute "
            f"its slicer ({type(live._sn.slicer).__name__}) computes from (or holds) "
            f"{', '.join(map(repr, sorted(set(sources))))}"
            ": the export would hold a detached copy of it that no longer follows them (training the export would "
            "not change it). Compute it in forward from the parameter (x @ self.weight.t()), or in a property of "
            "the class left out of the slicer's attrs (it then reads the sliced parameter)")


def _storage(t: Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # (a tensor without storage: nothing to write through)
        return None


def _storages(root: nn.Module) -> dict[int | None, list[str]]:
    """The names of ``root``'s parameters and buffers (not empty) by the address of their storage."""
    out: dict[int | None, list[str]] = {}
    for n, t in (*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)):
        if t is not None and t.numel() > 0 and (ptr := _storage(t)) is not None:
            out.setdefault(ptr, []).append(n)
    out.pop(0, None)  # (storages of no memory: meta tensors)
    return out


def _leaves(fn: Any, limit: int = 10_000) -> list[Tensor]:
    """The leaf tensors (AccumulateGrad nodes' variables) the autograd graph of ``fn`` reaches."""
    seen: set[int] = set()
    held: list[Any] = []  # (the nodes walked, alive: a freed node's id, reused by the next one, read as seen)
    stack, out = [fn], []
    while stack and len(seen) < limit:
        f = stack.pop()
        if f is None or id(f) in seen:
            continue
        seen.add(id(f))
        held.append(f)
        v = getattr(f, "variable", None)
        if isinstance(v, Tensor):
            out.append(v)
        stack.extend(g for g, _ in f.next_functions)
    return out


_MISSING = object()


def _same(old: Any, new: Any) -> bool:
    """Whether writing ``new`` over ``old`` changes nothing (tensors: only the same object)."""
    if old is new:
        return True
    if isinstance(old, Tensor) or isinstance(new, Tensor):
        return False
    both = all(isinstance(x, numbers.Number) and not isinstance(x, bool) for x in (old, new))
    if not both and type(old) is not type(new):  # (numbers compare by value: np.int64(16) is 16)
        return False
    try:
        return bool(old == new)
    except Exception:  # (an == that cannot answer: treat as a change)
        return False


def _write_error(st: State, name: str, v: Any, delete: bool = False, replica: bool = False) -> SortedNetError:
    if replica:  # torch.nn.parallel.replicate sets each replica's parameters as plain attributes
        return SortedNetError(f"{st.path + '.' if st.path else ''}{name}: torch.nn.DataParallel is not supported "
                              "(its replicas run in worker threads that do not see the active sub-model, and it "
                              "re-sets the sliced parameters on every forward); use DistributedDataParallel, one "
                              "process per device (docs/scaling.md)")
    what = "deleted" if delete else f"set (to {type(v).__name__} {_short(v)})"
    return SortedNetError(f"{st.path + '.' if st.path else ''}{name} is sliced by sortednet (its value follows the "
                          f"active sub-model, read through the {type(st.slicer).__name__}) and cannot be {what} "
                          "while wrapped: nest.unwrap() first, change the module, then wrap again")


def _short(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"of shape {tuple(v.shape)}"
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


#: > 0 while ``wrap`` counts parameters (it reads every sliced attribute): an error from a user's slicer is
#: then turned into a SortedNetError naming it
NAMING_SLICER_ERRORS = [0]


def _read_error(st: State, name: str, err: AttributeError) -> SortedNetError:
    return SortedNetError(f"reading the sliced {st.path + '.' if st.path else ''}{name} raised AttributeError: "
                          f"{err}")


def _guarded_delattr(base: type,
                     own: Callable[[nn.Module, str], None] | None = None) -> Callable[[nn.Module, str], None]:
    """``__delattr__`` of a sliced subclass: a sliced tensor cannot be deleted while wrapped (parametrize and
    spectral_norm start by deleting it; the nest would then slice nothing, and parametrize would fail
    half-way with the weight gone). ``prune`` is caught by :func:`_guarded_register`, the deprecated
    ``torch.nn.utils.weight_norm`` (which deletes through ``_parameters`` directly) by
    :func:`_guard_weight_norm`; any other deletion behind this guard is named by the next forward, ``use``
    or ``export`` (the sliced weight is gone). ``own``: the slicer namespace's ``__delattr__``, run after that
    check (a Depth layer list refuses removing a block)."""

    def __delattr__(self: nn.Module, name: str) -> None:
        refuse_removal(self, name)
        (own or base.__delattr__)(self, name)

    return __delattr__


def refuse_removal(m: Any, name: str) -> None:
    """Raise if ``name`` is a sliced tensor of the wrapped module ``m`` (it may not be removed or
    re-parametrized while wrapped); anything else passes."""
    st = m.__dict__.get("_sn") if isinstance(m, nn.Module) else None
    if (st is not None and name in getattr(type(m), "_sn_names", ())
            and (name in m._parameters or name in m._buffers)):
        if _fsdp1_running():
            raise SortedNetError(f"{st.path + '.' if st.path else ''}{name} is sliced by sortednet: FSDP1 "
                                 "(FullyShardedDataParallel) flattens the parameters of its units into one "
                                 "FlatParameter, which no slicer can cut, and is not supported; shard the wrapped "
                                 "model with torch.distributed.fsdp.fully_shard (FSDP2) instead")
        raise SortedNetError(f"{st.path + '.' if st.path else ''}{name} is sliced by sortednet and cannot be "
                             "removed or re-parametrized while wrapped (torch.nn.utils.parametrize, prune, "
                             "weight_norm and spectral_norm replace it): nest.unwrap() first, apply it, then "
                             "wrap again (wrap refuses what it cannot slice)")


def _fsdp1_running() -> bool:
    """An FSDP1 ``FullyShardedDataParallel`` constructor is on this thread's stack (it removes each parameter to
    flatten it)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_globals.get("__name__", "")
        if name.startswith("torch.distributed.fsdp.") and "_fully_shard" not in name:
            return True
        f = f.f_back
    return False


def _guard_parametrize() -> None:
    """Check ``torch.nn.utils.parametrize.register_parametrization`` before it runs: it writes
    ``right_inverse(weight)`` into the weight (``ParametrizationList``) before deleting the attribute, which
    is the first step :func:`_guarded_delattr` sees, so a refusal there would come after the weight changed
    (``orthogonal``: every value). ``torch.nn.utils.parametrizations`` calls it through its module, which is
    where this wrapper goes (once per process, at import; a pass-through for every module not sliced)."""
    from torch.nn.utils import parametrize

    original = parametrize.register_parametrization
    if getattr(original, "_sn_guard", False):
        return

    @functools.wraps(original)
    def register_parametrization(module: nn.Module, tensor_name: str, *args: Any, **kw: Any) -> Any:
        refuse_removal(module, tensor_name)
        return original(module, tensor_name, *args, **kw)

    register_parametrization._sn_guard = True  # type: ignore[attr-defined]
    parametrize.register_parametrization = register_parametrization


def _guard_fsdp1() -> None:
    """Check FSDP1's ``FullyShardedDataParallel(module)`` before it runs: it flattens (removes) the parameters of
    its units in module order, so the refusal at the first sliced one (:func:`refuse_removal`) would come after
    the unsliced layers before it lost theirs. The wrapper sits on the class (once per process, at import); a
    pass-through for a model with no sliced module."""
    try:
        import torch.distributed

        if not torch.distributed.is_available():
            return
        from torch.distributed.fsdp import FullyShardedDataParallel
    except (ImportError, AttributeError):
        return
    original = FullyShardedDataParallel.__dict__["__init__"]
    if getattr(original, "_sn_guard", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, module: Any = None, *args: Any, **kw: Any) -> None:
        if isinstance(module, nn.Module):
            sliced = next((path for path, m in module.named_modules() if "_sn" in m.__dict__), None)
            if sliced is not None:
                raise SortedNetError(f"FullyShardedDataParallel (FSDP1): {sliced or 'the root'!r} is sliced by "
                                     "sortednet, and FSDP1 flattens the parameters of its units into one "
                                     "FlatParameter, which no slicer can cut: not supported (refused before FSDP1 "
                                     "changed anything). Shard the wrapped model with "
                                     "torch.distributed.fsdp.fully_shard (FSDP2) instead")
        original(self, module, *args, **kw)

    __init__._sn_guard = True  # type: ignore[attr-defined]
    FullyShardedDataParallel.__init__ = __init__  # type: ignore[method-assign]


def _guard_weight_norm() -> None:
    """Check the deprecated ``torch.nn.utils.weight_norm`` before it runs: ``WeightNorm.apply`` deletes
    ``_parameters[name]`` directly (no hook sees it), registers ``<name>_g`` / ``<name>_v`` and only then sets
    the attribute, where a refusal would leave the module without its weight. The wrapper sits on the class,
    so it also holds for the function bound before ``import sortednet``."""
    try:  # (deprecated upstream: a torch without it has nothing to guard)
        from torch.nn.utils.weight_norm import WeightNorm

        original = WeightNorm.__dict__["apply"].__func__
    except (ImportError, KeyError, AttributeError):
        return
    if getattr(original, "_sn_guard", False):
        return

    @functools.wraps(original)
    def apply(module: nn.Module, name: str, dim: int) -> Any:
        refuse_removal(module, name)
        return original(module, name, dim)

    apply._sn_guard = True  # type: ignore[attr-defined]
    WeightNorm.apply = staticmethod(apply)  # type: ignore[method-assign]


def _guard_get_parameter() -> None:
    """``Module.get_parameter(name)`` of a sliced parameter under a smaller sub-model reads the attribute, the
    active slice, which is no ``nn.Parameter``: PyTorch raised "`weight` is not an nn.Parameter". It returns the
    parameter itself, as ``named_parameters()`` does there. Wraps the method on ``nn.Module``, once per process."""
    original = nn.Module.get_parameter
    if getattr(original, "_sn_guard", False):
        return

    @functools.wraps(original)
    def get_parameter(self: nn.Module, target: str) -> nn.Parameter:
        try:
            return original(self, target)
        except AttributeError:
            path, _, name = target.rpartition(".")
            try:
                mod = self.get_submodule(path)
            except AttributeError:
                mod = None
            p = mod._parameters.get(name) if getattr(type(mod), "_sn_sliced", False) else None
            if isinstance(p, nn.Parameter):
                return p
            raise

    get_parameter._sn_guard = True  # type: ignore[attr-defined]
    nn.Module.get_parameter = get_parameter  # type: ignore[method-assign]


def _buffer_guard(m: nn.Module, name: str, tensor: Any) -> None:
    """Global buffer registration hook (``register_buffer`` and ``module.buf = tensor``): a sliced buffer may be
    replaced by one of its own shape, never another (as :func:`_guarded_register` for parameters)."""
    st = m.__dict__.get("_sn")
    if st is None or name not in getattr(type(m), "_sn_names", ()) or _compiling():
        return None
    old = m._buffers.get(name)
    if tensor is None:  # (module.running_mean = None: the sliced buffer removed, as a parameter's is refused)
        if old is not None:
            refuse_removal(m, name)
        return None
    if old is None and name in m._buffers and isinstance(tensor, Tensor):
        raise _added_error(st, name, "buffer")
    if old is not None and isinstance(tensor, Tensor) and tuple(tensor.shape) != tuple(old.shape):
        raise SortedNetError(f"{st.path + '.' if st.path else ''}{name} is sliced by sortednet: it cannot be "
                             f"replaced by a buffer of another shape ({tuple(tensor.shape)} for {tuple(old.shape)}) "
                             "while wrapped; nest.unwrap() first, change the module, then wrap again")
    return None


_HOOKS: list = []


def _added_error(st: Any, name: str, kind: str) -> SortedNetError:
    """A tensor assigned to a sliced slot that held None when the model was wrapped (a ``bias=False`` layer's
    bias): the nest's sizes, costs, export and checkpoints describe the module as wrapped, without it."""
    return SortedNetError(f"{st.path + '.' if st.path else ''}{name} was None when the model was wrapped: a {kind} "
                          "assigned there now is one the nest's sizes, costs, export and checkpoints do not know "
                          + ("(of any shape)" if kind == "buffer" else
                             "(of any shape, and beside a Rank's frozen base it would train)")
                          + "; nest.unwrap() first, change the module, then wrap again")


def _guarded_register(base: type, names: frozenset) -> Callable[..., None]:
    """``register_parameter`` of a sliced subclass (also ``module.weight = nn.Parameter(...)``): a sliced
    parameter may be replaced by one of its own shape (``load_state_dict(assign=True)``, ``.to()``, FSDP2),
    never of another (the nest's sizes, costs and export describe the shape it wrapped). And
    ``torch.nn.utils.prune`` starts by registering ``<name>_orig`` and then deletes the sliced parameter
    behind ``__delattr__``'s back (``del module._parameters[name]``): refused at its first step, before the
    module changes."""

    def register_parameter(self: nn.Module, name: str, param: Any) -> None:
        st = self.__dict__.get("_sn")
        old = self._parameters.get(name) if st is not None and name in names else None
        if old is not None and param is None:  # (module.weight = None: the sliced parameter removed)
            refuse_removal(self, name)
        if old is None and param is not None and st is not None and name in names and name in self._parameters:
            raise _added_error(st, name, "parameter")  # (None when wrapped: a bias=False layer's bias)
        if old is not None and param is not None and tuple(param.shape) != tuple(old.shape):
            raise SortedNetError(f"{st.path + '.' if st.path else ''}{name} is sliced by sortednet: it cannot be "
                                 f"replaced by a parameter of another shape ({tuple(param.shape)} for "
                                 f"{tuple(old.shape)}) while wrapped; nest.unwrap() first, change the module, "
                                 "then wrap again")
        if (old is not None and param is not None and name in st.slicer.frozen and param.requires_grad
                and not old.requires_grad):
            raise SortedNetError(f"{st.path + '.' if st.path else ''}{name} is the frozen base of LoRA adapters "
                                 f"(Rank mode='lora'), but the parameter assigned in its place requires grad: it "
                                 "would train beside the adapters. Assign a frozen one "
                                 f"(nn.Parameter(w, requires_grad=False)), or copy into it with "
                                 f"module.{name}.data.copy_(w)")
        if st is not None and name in names and name not in self._parameters:  # a buffer, or computed (svd Rank)
            raise _write_error(st, name, param)
        if st is not None and name.endswith("_orig") and name[:-5] in names and name[:-5] in self._parameters:
            raise SortedNetError(f"{st.path + '.' if st.path else ''}{name[:-5]} is read through sortednet's "
                                 "slicer of its module (a view in every forward) and cannot be pruned while "
                                 f"wrapped (torch.nn.utils.prune moves it to {name!r}): "
                                 "nest.unwrap() first, prune, make it permanent (torch.nn.utils.prune.remove), "
                                 "then wrap again")
        base.register_parameter(self, name, param)

    return register_parameter


def _guarded_register_buffer(base: type, names: frozenset) -> Callable[..., None]:
    """``register_buffer`` of a sliced subclass: a name sliced as a parameter or computed by the slicer (a
    Rank layer's ``weight``) cannot become a buffer (PyTorch would raise a bare ``KeyError``); a sliced
    buffer's own replacement goes on to :func:`_buffer_guard`."""

    def register_buffer(self: nn.Module, name: str, tensor: Any, persistent: bool = True) -> None:
        st = self.__dict__.get("_sn")
        if st is not None and name in names and name not in self._buffers:
            raise _write_error(st, name, tensor)
        base.register_buffer(self, name, tensor, persistent)

    return register_buffer


def _deepcopy(self: nn.Module, memo: dict) -> nn.Module:
    """A copy that is sliced by the same dimensions (it follows the same active sub-model). As a plain module's
    copy (``nn.Module.__getstate__``), it leaves out ``Module.compile()``'s compiled call, which is bound to this
    module: the copy (an export, an EMA) would run the live module's weights."""
    new = type(self).__new__(type(self))
    memo[id(self)] = new
    state = {k: v for k, v in self.__dict__.items() if k != "_compiled_call_impl"}
    new.__dict__.update(copy.deepcopy(state, memo))
    return new


def _no_pickle(self: nn.Module, protocol: int) -> None:
    raise SortedNetError(f"a wrapped {self.__dict__['_sn'].cls.__name__} ({self.__dict__['_sn'].path!r}) cannot be "
                         "pickled or shallow-copied (copy.copy) (its class is made by sn.wrap): copy.deepcopy gives "
                         "a copy sliced by the same dimensions; use sn.save(nest, path) for all sub-models, "
                         "nest.export(sub) for one plain model, or nest.unwrap() first")


def _no_script(self: nn.Module) -> None:
    """``torch.jit.script`` calls it on every module first: a sliced class reads its weights per sub-model in
    Python, which TorchScript cannot compile."""
    raise SortedNetError(f"torch.jit.script of a wrapped model ({self.__dict__['_sn'].path or '<root>'!r} is a "
                         f"sliced {self.__dict__['_sn'].cls.__name__}): script nest.export(sub), a plain model of one "
                         "sub-model; torch.export.export, or torch.jit.trace under torch.no_grad(), of the live "
                         "model under nest.use(sub) capture that sub-model")


def sliced_subclass(m: nn.Module, sl: Slicer, names: tuple[str, ...], path: str = "") -> type:
    """The per-instance subclass of ``type(m)`` (cached per class, slicer and names)."""
    held = any(n in m._buffers for n in names)  # (sliced buffers: a Parameter assigned in place of one is refused)
    key = (type(m), type(sl), names, held)
    cls = _SUBCLASSES.get(key)
    if cls is None:
        base = type(m)
        if not _HOOKS:
            _HOOKS.append(nn.modules.module.register_module_buffer_registration_hook(_buffer_guard))
        ns = sl.namespace(m, names)
        if held:
            ns = {**ns, "__setattr__": _guarded_setattr(base, frozenset(names), ns.get("__setattr__"))}
        try:
            cls = _subclass(base, ns, names)
        except Exception as e:  # (the base's __init_subclass__ / metaclass runs: one that needs keywords fails)
            raise SortedNetError(f"{path or '<root>'!r} ({base.__name__}): sn.wrap slices a module by giving it a "
                                 f"subclass of its class, and making one failed: {type(e).__name__}: {e} (a class "
                                 "whose __init_subclass__ or metaclass takes arguments cannot be subclassed "
                                 "without them)") from e
        _SUBCLASSES[key] = cls
    return cls


def _guarded_setattr(base: type, names: frozenset, own: Callable[..., None] | None = None) -> Callable[..., None]:
    """``__setattr__`` of a sliced subclass whose module holds sliced buffers: a Parameter assigned in place of
    one is refused before ``nn.Module.__setattr__`` removes the buffer (it then refused the registration, and the
    module was left without the buffer: no running statistics, a raw error at the next forward)."""
    base_setattr = own or base.__setattr__  # (the slicer's own, a norm's: then the module's class's)

    def __setattr__(self: nn.Module, key: str, value: Any) -> None:
        if key in names and isinstance(value, nn.Parameter) and key in self._buffers:
            st = self.__dict__["_sn"]
            raise SortedNetError(f"{st.path + '.' if st.path else ''}{key} is a buffer sortednet slices: a Parameter "
                                 "assigned in its place would make it a parameter (PyTorch removes the buffer "
                                 f"first); copy into it (module.{key}.copy_(t)), or nest.unwrap() first")
        base_setattr(self, key, value)

    return __setattr__


def _subclass(base: type, ns: dict, names: tuple[str, ...]) -> type:
    return type(f"Sorted{base.__name__}", (base,), {
        **ns, "_sn_sliced": True, "_sn_names": frozenset(names),
        "__delattr__": _guarded_delattr(base, ns.get("__delattr__")),
        "register_parameter": _guarded_register(base, frozenset(names)),
        "register_buffer": _guarded_register_buffer(base, frozenset(names)),
        "__module__": base.__module__, "__deepcopy__": _deepcopy, "__reduce_ex__": _no_pickle,
        "__prepare_scriptable__": _no_script})


_guard_parametrize()
_guard_fsdp1()
_guard_weight_norm()
_guard_get_parameter()


def _guard_global_prune() -> None:
    """Check every ``(module, name)`` of ``torch.nn.utils.prune.global_unstructured`` before it prunes any:
    it prunes them one after another, so a refusal at a sliced tensor came after the modules listed before it
    were pruned (a model left half-pruned). Wraps the module attribute, once per process, at import."""
    try:
        from torch.nn.utils import prune

        original = prune.global_unstructured
    except (ImportError, AttributeError):
        return
    if getattr(original, "_sn_guard", False):
        return

    @functools.wraps(original)
    def global_unstructured(parameters: Any, *args: Any, **kwargs: Any) -> Any:
        parameters = list(parameters)  # (an iterator would be spent by the check)
        for item in parameters:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
                refuse_removal(*item)
        return original(parameters, *args, **kwargs)

    global_unstructured._sn_guard = True  # type: ignore[attr-defined]
    prune.global_unstructured = global_unstructured


_guard_global_prune()


def _whole(v: Any, m: nn.Module, name: str) -> Any:
    """A custom slicer's ``value`` that cut its tensor to the whole of it (``p[:k]`` at the full size, a view):
    the tensor itself, as ``take`` gives (outside ``use``, ``m.weight`` is the parameter: ``clip_grad_norm_`` over
    the attribute, ``.grad``, ``requires_grad_`` work on it)."""
    base = v._base if isinstance(v, Tensor) and not _compiling() else None  # (compiled: a view is as good)
    if base is None:
        return v
    t = m._parameters.get(name)
    if t is None:
        t = m._buffers.get(name)
    if base is t and v.shape == t.shape and v.stride() == t.stride() and v.storage_offset() == t.storage_offset() \
            and v.dtype == t.dtype:
        return t
    return v


def parameter_like(full: Tensor, data: Tensor) -> nn.Parameter:
    """``data`` as a parameter of ``full``'s class (a subclass that tags parameters, e.g. to leave them out of
    weight decay, as ``copy.deepcopy`` keeps it) and ``requires_grad``; a plain ``nn.Parameter`` where that class
    cannot be built from ``(data, requires_grad)``."""
    cls = type(full)
    if cls is not nn.Parameter and issubclass(cls, nn.Parameter):
        try:
            p = cls(data, requires_grad=full.requires_grad)
        except Exception:
            p = None
        if type(p) is cls and p.shape == data.shape and p.requires_grad == full.requires_grad:
            return p
    return nn.Parameter(data, requires_grad=full.requires_grad)

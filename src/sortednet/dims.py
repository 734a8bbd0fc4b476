"""Dimensions: named axes that nest (Width, Heads, Depth).

A dimension owns an ascending tuple of sizes and the target patterns of the
modules it slices. Dimensions that must agree share ONE object: coupling by
identity. At run time a dimension reads its active size from its nest's
:class:`Active` state: the sub-model entered with ``use`` in the calling
context (thread or asyncio task), else the nest-wide default (``activate``).
"""

from __future__ import annotations

import contextvars
import itertools
import numbers
import weakref
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ._tracing import compiling
from .errors import PatternError, SizeError, SortedNetError
from .patterns import match
from .submodel import as_int

#: reentrant activation checkpoints whose forward runs now, in any thread (``sortednet.plan`` counts them): a sliced
#: read without gradients then looks for one on its stack to pin its recomputation, also where no root forward
#: with gradients counted itself (``checkpoint(model.forward, x)``, a lambda over the layers)
#: ``REENTRANT_THREADS``: thread id -> the ``ctx`` of each reentrant checkpoint forward running in that thread (a read
#: in another thread skips the walk; one whose checkpoints are pinned already too). Kept on the counting wrapper
#: (``sortednet.plan``), so every copy of sortednet in the process (a vendored one, a reload) shares them.


def _shared_counts() -> tuple[list[int], dict[int, list[Any]], Any]:
    import threading

    import torch.utils.checkpoint as checkpoint

    forward = getattr(getattr(checkpoint, "CheckpointFunction", None), "forward", None)
    got = getattr(forward, "_sn_counts", None)
    return got if got is not None else ([0], {}, threading.Lock())


REENTRANT, REENTRANT_THREADS, REENTRANT_LOCK = _shared_counts()


def _nonreentrant_count() -> tuple[list[int | None], dict[int, list[Any]]]:
    import torch.utils.checkpoint as checkpoint

    enter = getattr(getattr(checkpoint, "_checkpoint_hook", None), "__enter__", None)
    got = getattr(enter, "_sn_counts", None)
    return ([None], {}) if got is None else (got, getattr(enter, "_sn_open", {}))


#: non-reentrant checkpoints' forwards running now, in any thread (``sortednet.plan`` counts them; None where this
#: torch has no hook class to count with): a read under saved-tensor hooks of the user's own (``save_on_cpu``)
#: walks its stack for a checkpoint to pin only while one runs
#: ``COMPOSABLE``: thread id -> ``(frame, checkpoint frame)`` of each non-reentrant checkpoint whose forward runs now
#: in that thread, entered by a forward pre-hook (``torch.distributed._composable.checkpoint``, FSDP2's), so no frame
#: of ``torch.utils.checkpoint.checkpoint`` holds it: ``frame`` is the checkpointed module's call, on the stack while
#: its forward runs
NONREENTRANT, COMPOSABLE = _nonreentrant_count()
#: ``sortednet.plan.pin_recomputation``, set when that module loads: what :meth:`Active.plan` calls on a read
#: with saved-tensor hooks on (a non-reentrant checkpoint's forward)
RECOMPUTE_PIN: list[Any] = [None]
_saved_hooks = torch._C._autograd._top_saved_tensors_default_hooks

__all__ = ["Dimension", "Width", "Depth", "Binding", "Target", "Active", "dimension_from_spec"]

_KINDS: dict[str, type["Dimension"]] = {}


@dataclass(frozen=True)
class Binding:
    """How one dimension sizes one role of one module.

    Active features = ``size * unit // div``, repeated ``chunks`` times along the
    axis (packed q/k/v). ``Heads`` uses ``unit=head_dim``; grouped-query k/v
    use ``div=group``. ``slicer`` (set by ``Rank``) replaces the module type's
    registered slicer for this target.

    ``parts`` states a fused layout as data: the axis stacks one block per entry,
    block ``i`` holding ``size * unit // parts[i]`` features (fused grouped-query
    q|k|v: ``parts=(1, group, group)``); each block is cut to its own prefix.
    ``chunks=c`` is the same as ``parts=(div,) * c``.
    """

    dim: "Dimension"
    unit: int = 1
    div: int = 1
    chunks: int = 1
    slicer: Any = None
    parts: tuple[int, ...] = ()

    def features(self, size: int | None = None) -> int:
        return (self.dim.active if size is None else size) * self.unit // self.div

    @property
    def full(self) -> int:
        return self.features(self.dim.full)

    @property
    def blocks(self) -> tuple[int, ...]:
        """Divisor of each stacked block along the axis (one block unless fused)."""
        return self.parts or (self.div,) * self.chunks

    def total(self, size: int | None = None) -> int:
        """Features over all stacked blocks at ``size`` (default: active)."""
        s = self.dim.active if size is None else size
        return sum(s * self.unit // d for d in self.blocks)

    def segments(self, size: int | None = None) -> tuple[tuple[int, int], ...]:
        """``(start, length)`` of the rows kept in each stacked block at ``size`` (default: active)."""
        s = self.dim.active if size is None else size
        out, start = [], 0
        for d in self.blocks:
            out.append((start, s * self.unit // d))
            start += self.dim.full * self.unit // d
        return tuple(out)


@dataclass(frozen=True)
class Target:
    """A planned binding: the module at ``path`` gets ``binding`` for ``role``."""

    path: str
    role: str
    binding: Binding
    pattern: str


def _as_patterns(value: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (bytes, bytearray, Mapping)) or not isinstance(value, str) and not isinstance(value, Iterable):
        raise PatternError(f"{what} patterns must be a string or a list of strings (\"\" is the root module), "
                           f"got {value!r}")
    out = (value,) if isinstance(value, str) else tuple(value)
    for p in out:
        if not isinstance(p, str):
            raise PatternError(f"{what} patterns must be strings (\"\" is the root module), got {p!r}")
    return out


class Dimension:
    """Base of all dimensions. Subclasses declare ``kind`` and ``plan``."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        # only a class that names a kind of its own: a subclass of Width (a helper with preset patterns)
        # inherits "width" and must not take the built-in's place, which checkpoints rebuild dimensions from
        kind = cls.__dict__.get("kind")
        if not kind:
            return
        had = _KINDS.get(kind)
        if had is not None and issubclass(cls, had):  # (restating its base's kind: a subclass like any other)
            return
        if had is not None and (had.__module__, had.__qualname__) != (cls.__module__, cls.__qualname__):
            raise SortedNetError(f"dimension kind {kind!r} is taken by {had.__module__}.{had.__qualname__}; "
                                 f"give {cls.__qualname__} a kind of its own (kind = \"...\")")
        _KINDS[kind] = cls  # (the same class defined again, e.g. a re-run notebook cell, replaces itself)

    def __init__(self, name: str, sizes: Sequence[int]) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise SortedNetError(f"dimension name must be an identifier, got {name!r}")
        if isinstance(sizes, (str, bytes)):  # (split into characters: "64" gave "size '6' is not an int")
            raise SizeError(f"{self.kind} {name!r}: sizes must be a sequence of ints (a list), got "
                            f"{type(sizes).__name__} {sizes!r}")
        if isinstance(sizes, (Mapping, Set)):  # (a dict would give its keys, a set an order of its own)
            raise SizeError(f"{self.kind} {name!r}: sizes must be a sequence of ints (a list), got "
                            f"{type(sizes).__name__} {sizes!r}")
        try:
            sizes = tuple(sizes)
        except TypeError:
            raise SizeError(f"{self.kind} {name!r}: sizes must be a sequence of ints, got {sizes!r}") from None
        if not sizes:
            raise SizeError(f"{self.kind} {name!r}: needs at least one size")
        for s in sizes:
            if as_int(s) is None:
                raise SizeError(f"{self.kind} {name!r}: size {s!r} is not an int (sizes {list(sizes)})")
        sizes = tuple(as_int(s) for s in sizes)  # numpy / torch integers become ints
        for s in sizes:
            if s <= 0:
                raise SizeError(f"{self.kind} {name!r}: size {s} must be positive (sizes {list(sizes)})")
        if any(a >= b for a, b in zip(sizes, sizes[1:])):
            raise SizeError(f"{self.kind} {name!r}: sizes must be strictly ascending, got {list(sizes)}")
        self.name = name
        self.sizes: tuple[int, ...] = sizes

    #: the run-time state of the nest this dimension belongs to (set by ``wrap``)
    _active: "Active | None" = None

    # -- run-time state -------------------------------------------------
    @property
    def full(self) -> int:
        return self.sizes[-1]

    @property
    def active(self) -> int:
        """The size in force for the caller: its ``use`` block, else the nest-wide default.

        >>> import sortednet as sn
        >>> sn.Width("h", [2, 4], out="fc").active      # not wrapped yet: the largest size
        4
        """
        a = self._active
        return self.sizes[-1] if a is None else a.plan().sizes[self.name]

    # -- planning -------------------------------------------------------
    def plan(self, modules: dict[str, nn.Module]) -> list[Target]:
        """Resolve patterns against ``{path: module}`` into targets (no mutation)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-able description; ``dimension_from_spec`` rebuilds it."""
        return {"kind": self.kind, "name": self.name, "sizes": list(self.sizes)}

    def __repr__(self) -> str:
        extra = {k: v for k, v in self.spec().items() if k not in ("kind", "name", "sizes") and v}
        opts = "".join(f", {k}={v!r}" for k, v in extra.items())
        return f"{type(self).__name__}({self.name!r}, {list(self.sizes)}{opts})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_active", "_nest", "_init_generators"):  # run-time links: a pickled dimension is a fresh one
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __deepcopy__(self, memo: dict) -> "Dimension":
        return self  # dimensions are coupling identities: never duplicated



_UIDS = itertools.count()


class Active:
    """Which sub-model each caller of one nest runs (``nest.use`` / ``nest.activate``).

    ONE ``contextvars.ContextVar`` holds the plan (the sub-model and its cuts,
    see :mod:`sortednet.plan`) entered with ``use`` in the calling context: a
    thread or an asyncio task, each its own. ``default`` is the nest-wide plan
    of ``activate``, replaced as one object, so a reader sees one sub-model,
    never a mix. A thread started inside ``use`` sees it only when it runs in a
    copy of the context (``contextvars.copy_context().run``); a plain
    ``threading.Thread`` starts with the default.

    ``torch.compile``: ``_scoped`` is a property whose getter is the C method
    ``ContextVar.get`` bound to this nest's variable (``var.get(self)``: the
    value, or ``self`` when unset). Dynamo calls such a property while tracing
    and guards on what it returned by calling it again, so the lookup costs no
    graph break, one graph is compiled per sub-model and switching back hits
    the cached graph. The default is read only outside ``use``: ``activate``
    does not invalidate graphs entered through ``use``.

    >>> a = Active("plan-0")
    >>> a.plan(), a.var.get(None)
    ('plan-0', None)
    >>> tok = a.var.set("plan-1"); a.plan()
    'plan-1'
    >>> a.var.reset(tok); a.plan()
    'plan-0'
    """

    __slots__ = ("var", "default", "uses", "training", "on_no_grad_read", "epoch", "owner", "uid", "recomputes",
                 "pending", "open", "users")

    def __new__(cls, default: Any) -> "Active":
        var: contextvars.ContextVar[Any] = contextvars.ContextVar("sortednet_active")
        own = type("Active", (cls,), {"_scoped": property(var.get), "__slots__": (), "__module__": __name__})
        self = object.__new__(own)
        self.var, self.default = var, default
        # the open ``use`` blocks of the context, oldest first (see sortednet.plan.Use); never mutated
        self.uses: contextvars.ContextVar[tuple] = contextvars.ContextVar("sortednet_uses", default=())
        # root forwards with gradients in progress (any thread), and what a read without gradients during one
        # calls: it may be a reentrant checkpoint's forward (sortednet.wrap.Pin.no_grad_read)
        self.training, self.on_no_grad_read = 0, None
        # (weakly, the pack hook of the non-reentrant checkpoint whose recomputation a read pinned last, and the
        # plan pinned): reads inside that checkpoint under that plan skip the stack walk (sortednet.slicers.base)
        self.recomputes: tuple[Any, Any] | None = None
        # weakly, the pinned checkpoint functions whose recomputation has not run yet -> [the calls still to come,
        # the plan pinned] (freed with their graph): unwrap refuses while one of a sub-model is alive (it would
        # recompute the unwrapped model)
        self.pending: weakref.WeakKeyDictionary[Any, list] = weakref.WeakKeyDictionary()
        # the nest.use blocks open now, in any thread (id of the Use object -> its sub-model): unwrap refuses while
        # one is (a deep copy would run that block's widths at full depth until it ends)
        self.open: dict[int, Any] = {}
        self.users: dict[int, Any] = {}  # (the same blocks: id of the Use object -> the object, whose tokens say
        #                                    which threads are inside it)
        # bumped whenever the units of the weights are re-ordered (sort_units, sort_by_importance): a key/value
        # cache filled before holds keys and values in the old order (sortednet.kvcache.CacheGuard)
        self.epoch = 0
        # weakly, the nest while it is wrapped (set by the nest, cleared by unwrap): deep copies of the model,
        # which share this object, find out whether the nest they follow is live (sortednet.wrap._copy_link)
        self.owner: Any = None
        # never reused in the process (an id() is, once the object is freed): what key/value caches are stamped
        # with, so a cache from a nest since unwrapped never matches a later nest's state
        self.uid = next(_UIDS)
        return self

    def plan(self) -> Any:
        """The plan in force for the caller."""
        p = self._scoped  # type: ignore[attr-defined]
        p = self.default if p is self else p
        if not compiling():  # (a checkpoint's forward reading it: its recomputation runs p)
            if (h := _saved_hooks(False)) is not None and RECOMPUTE_PIN[0] is not None:
                RECOMPUTE_PIN[0](self, p, h)
            if not torch.is_grad_enabled() and (self.training or REENTRANT[0]):
                self.on_no_grad_read(p)
        return p

    def __deepcopy__(self, memo: dict) -> "Active":
        return self  # a deep copy of the model follows the same sub-model

    def __reduce__(self) -> Any:
        raise SortedNetError(
            "a wrapped model, or a deep copy of one (an EMA / teacher copy), cannot be pickled whole (torch.save of "
            "the module): its sliced modules hold the nest's run-time state. Save its weights instead: "
            "sn.save(nest, path) for the wrapped model, sn.save(copy, path) for a deep copy of it; or pickle a plain "
            "model: nest.unwrap_copy(copy) gives the copy its original classes (also after nest.unwrap()), "
            "nest.export(sub) one sub-model")


def dimension_from_spec(spec: dict[str, Any]) -> Dimension:
    """Rebuild a dimension from :meth:`Dimension.spec` output."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in _KINDS:
        raise SortedNetError(f"unknown dimension kind {kind!r}; known: {sorted(_KINDS)}")
    name, sizes = spec.pop("name"), spec.pop("sizes")
    return _KINDS[kind](name, sizes, **spec)


class Width(Dimension):
    """Nested width: output features/channels (``out``), input features (``inp``)
    and normalised features (``norm``) of the matched modules.

    ``chunks`` states fused outputs: ``{out pattern: n}`` (or one int for every
    ``out`` pattern) for a module whose output rows stack ``n`` projections of
    this width, e.g. a fused ``gate_up_proj`` ``[gate; up]`` (``n=2``): each
    block keeps its own first ``size`` rows.

    >>> import sortednet as sn
    >>> sn.Width("ffn", [128, 256], out=["blocks.*.fc1"], inp=["blocks.*.fc2"])
    Width('ffn', [128, 256], out=['blocks.*.fc1'], inp=['blocks.*.fc2'])
    """

    kind = "width"

    def __init__(self, name: str, sizes: Sequence[int], *, out: str | Iterable[str] | None = None,
                 inp: str | Iterable[str] | None = None, norm: str | Iterable[str] | None = None,
                 chunks: int | dict[str, int] | None = None) -> None:
        super().__init__(name, sizes)
        self.out = _as_patterns(out, f"Width {name!r} out")
        if isinstance(chunks, numbers.Integral) and not isinstance(chunks, bool):  # (numpy ints as sizes are)
            chunks = {p: int(chunks) for p in self.out}
        if chunks is not None and not isinstance(chunks, dict):
            raise PatternError(f"Width {name!r}: chunks={chunks!r} must be a positive int or a dict mapping out= "
                               f"patterns {list(self.out)} to positive ints")
        chunks = {p: int(n) if isinstance(n, numbers.Integral) and not isinstance(n, bool) else n
                  for p, n in (chunks or {}).items()}
        bad = [(p, n) for p, n in chunks.items() if p not in self.out or isinstance(n, bool)
               or not isinstance(n, int) or n < 1]
        if bad:
            raise PatternError(f"Width {name!r}: chunks={chunks!r} must map out= patterns {list(self.out)} to "
                               f"positive ints; bad: {bad}")
        self.chunks = {p: n for p, n in chunks.items() if n > 1}
        self.inp = _as_patterns(inp, f"Width {name!r} inp")
        self.norm = _as_patterns(norm, f"Width {name!r} norm")
        if not (self.out or self.inp or self.norm):
            raise PatternError(f"Width {name!r}: give at least one of out=, inp=, norm=")

    def plan(self, modules: dict[str, nn.Module]) -> list[Target]:
        b = Binding(self)
        return [Target(path, role, Binding(self, chunks=self.chunks[pat]) if role == "out" and pat in self.chunks
                       else b, pat)
                for role, pats in (("out", self.out), ("inp", self.inp), ("norm", self.norm))
                for pat in pats for path in match(pat, modules, f"Width {self.name!r} {role}")]

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "out": list(self.out), "inp": list(self.inp), "norm": list(self.norm),
                "chunks": dict(self.chunks)}


class Depth(Dimension):
    """Nested depth: only the first ``d`` blocks of a ``ModuleList`` / ``Sequential`` run.

    >>> import sortednet as sn
    >>> sn.Depth("depth", [2, 4], layers="blocks")
    Depth('depth', [2, 4], layers=['blocks'])
    """

    kind = "depth"

    def __init__(self, name: str, sizes: Sequence[int], *, layers: str | Iterable[str]) -> None:
        super().__init__(name, sizes)
        self.layers = _as_patterns(layers, f"Depth {name!r} layers")
        if not self.layers:
            raise PatternError(f"Depth {name!r}: layers= must name a ModuleList or Sequential")

    def plan(self, modules: dict[str, nn.Module]) -> list[Target]:
        b = Binding(self)
        return [Target(path, "depth", b, pat) for pat in self.layers
                for path in match(pat, modules, f"Depth {self.name!r} layers")]

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "layers": list(self.layers)}


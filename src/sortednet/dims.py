"""Dimensions: named axes that nest (Width, Heads, Depth).

A dimension owns an ascending tuple of sizes and the target patterns of the
modules it slices. Dimensions that must agree share ONE object: coupling by
identity. At run time a dimension also holds its active size, per thread
(``use``) with a nest-wide default (``activate``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .errors import PatternError, SizeError, SortedNetError

__all__ = ["Dimension", "Width", "Heads", "Depth", "Binding", "Target", "dimension_from_spec"]

_KINDS: dict[str, type["Dimension"]] = {}


@dataclass(frozen=True)
class Binding:
    """How one dimension sizes one role of one module.

    Active features = ``size * unit // div``, repeated ``chunks`` times along the
    axis (packed q/k/v). ``Heads`` uses ``unit=head_dim``; grouped-query k/v
    use ``div=group``. ``slicer`` (set by ``Rank``) replaces the module type's
    registered slicer for this target.
    """

    dim: "Dimension"
    unit: int = 1
    div: int = 1
    chunks: int = 1
    slicer: Any = None

    def features(self, size: int | None = None) -> int:
        return (self.dim.active if size is None else size) * self.unit // self.div

    @property
    def full(self) -> int:
        return self.features(self.dim.full)


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
        if cls.kind:
            _KINDS[cls.kind] = cls

    def __init__(self, name: str, sizes: Sequence[int]) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise SortedNetError(f"dimension name must be an identifier, got {name!r}")
        try:
            sizes = tuple(sizes)
        except TypeError:
            raise SizeError(f"{self.kind} {name!r}: sizes must be a sequence of ints, got {sizes!r}") from None
        if not sizes:
            raise SizeError(f"{self.kind} {name!r}: needs at least one size")
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, int):
                raise SizeError(f"{self.kind} {name!r}: size {s!r} is not an int (sizes {list(sizes)})")
            if s <= 0:
                raise SizeError(f"{self.kind} {name!r}: size {s} must be positive (sizes {list(sizes)})")
        if any(a >= b for a, b in zip(sizes, sizes[1:])):
            raise SizeError(f"{self.kind} {name!r}: sizes must be strictly ascending, got {list(sizes)}")
        self.name = name
        self.sizes: tuple[int, ...] = sizes
        self._default = sizes[-1]
        self._local = threading.local()

    # -- run-time state -------------------------------------------------
    @property
    def full(self) -> int:
        return self.sizes[-1]

    @property
    def active(self) -> int:
        """The size in force for the calling thread.

        The nest-wide default is read only when no ``use`` is in force, so under
        ``torch.compile`` a graph entered through ``use`` guards on the thread's
        size alone and ``activate`` does not invalidate it. (Dynamo guards
        ``getattr`` on a ``threading.local`` soundly; reads through its
        ``__dict__`` are not guarded: do not "optimise" this into one.)
        """
        size = getattr(self._local, "size", None)
        return self._default if size is None else size

    def _set_local(self, size: int | None) -> None:
        if size is None:
            self._local.__dict__.pop("size", None)
        else:
            self._local.size = size

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
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> "Dimension":
        return self  # dimensions are coupling identities: never duplicated


def dimension_from_spec(spec: dict[str, Any]) -> Dimension:
    """Rebuild a dimension from :meth:`Dimension.spec` output."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in _KINDS:
        raise SortedNetError(f"unknown dimension kind {kind!r}; known: {sorted(_KINDS)}")
    name, sizes = spec.pop("name"), spec.pop("sizes")
    return _KINDS[kind](name, sizes, **spec)


def match(pattern: str, modules: dict[str, nn.Module], what: str) -> list[str]:
    """Module paths matching an exact name, a ``*`` glob or a ``re:`` regex.

    ``*`` matches one path component (``blocks.*.fc1``); ``**`` matches any
    number. A pattern that matches nothing is a :class:`PatternError` that
    lists nearby module names.
    """
    from .wrap import match_pattern  # local import: wrap owns pattern syntax

    return match_pattern(pattern, modules, what)


class Width(Dimension):
    """Nested width: output features/channels (``out``), input features (``inp``)
    and normalised features (``norm``) of the matched modules.

    >>> import sortednet as sn
    >>> sn.Width("ffn", [128, 256], out=["blocks.*.fc1"], inp=["blocks.*.fc2"])
    Width('ffn', [128, 256], out=['blocks.*.fc1'], inp=['blocks.*.fc2'])
    """

    kind = "width"

    def __init__(self, name: str, sizes: Sequence[int], *, out: str | Iterable[str] | None = None,
                 inp: str | Iterable[str] | None = None, norm: str | Iterable[str] | None = None) -> None:
        super().__init__(name, sizes)
        self.out = _as_patterns(out, f"Width {name!r} out")
        self.inp = _as_patterns(inp, f"Width {name!r} inp")
        self.norm = _as_patterns(norm, f"Width {name!r} norm")
        if not (self.out or self.inp or self.norm):
            raise PatternError(f"Width {name!r}: give at least one of out=, inp=, norm=")

    def plan(self, modules: dict[str, nn.Module]) -> list[Target]:
        b = Binding(self)
        return [Target(path, role, b, pat)
                for role, pats in (("out", self.out), ("inp", self.inp), ("norm", self.norm))
                for pat in pats for path in match(pat, modules, f"Width {self.name!r} {role}")]

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "out": list(self.out), "inp": list(self.inp), "norm": list(self.norm)}


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


from .heads import Heads  # noqa: E402  (Heads lives in its own file; re-exported here)

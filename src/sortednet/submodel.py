"""SubModel: a frozen, hashable mapping ``{dimension name: size}``."""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import SortedNetError

__all__ = ["SubModel", "SubModelLike", "SubModelList", "MAX_SUBMODELS"]

#: the most sub-models a nest lists (the full product or a ``submodels=`` list)
MAX_SUBMODELS = 10_000_000



def as_int(v: Any) -> int | None:
    """``v`` as a plain int when it is an integer (``int``, numpy / torch integer scalars), else None (bools,
    floats, strings: a size is never silently rounded)."""
    if type(v) is int:
        return v
    if isinstance(v, (bool, np.bool_)) or not hasattr(v, "__index__") or str(getattr(v, "dtype", "")) in (
            "torch.bool", "bool") or getattr(v, "ndim", 0) != 0:
        return None  # (a bool tensor has __index__: True would become size 1; a one-element tensor of any rank
    #                 has it too, while numpy's arrays have it only without dimensions: scalars only, for both)
    try:
        return operator.index(v)
    except (TypeError, RuntimeError, ValueError):  # a float tensor has __index__ and refuses it; a meta or
        return None                                # multi-element tensor raises other errors

class SubModel(Mapping[str, int]):
    """One nested sub-model: the active size of every dimension.

    Keeps the order it was built with (the nest's dimension order) for
    printing; equality and hashing ignore order.

    >>> from sortednet import SubModel
    >>> a = SubModel.parse("ffn=256,depth=2")
    >>> b = SubModel({"depth": 4, "ffn": 512})
    >>> a["ffn"], str(a), a.nested_in(b), b.nested_in(a)
    (256, 'ffn=256,depth=2', True, False)
    """

    __slots__ = ("_items", "_dict", "_hash")

    def __init__(self, sizes: Mapping[str, int] | None = None, /, **kw: int) -> None:
        if isinstance(sizes, (str, bytes)):
            raise SortedNetError(f"SubModel() takes a mapping {{dimension: size}} (or its pairs) or keywords, got "
                                 f"the text {str(sizes)[:60]!r}; parse text with SubModel.parse(...)")
        try:
            pairs = list((sizes or {}).items() if isinstance(sizes, Mapping) else () if sizes is None else sizes)
            items = dict(pairs)
        except (TypeError, ValueError, RuntimeError) as e:  # (RuntimeError: a tensor, iterated)
            raise SortedNetError(f"SubModel() takes a mapping {{dimension: size}} (or its pairs) or keywords, got "
                                 f"{type(sizes).__name__} {str(sizes)[:60]!r}: {e}") from None
        if len(items) != len(pairs):  # (dict(pairs) keeps the last of a name given twice, in silence)
            seen: set = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise SortedNetError(f"SubModel(): dimension {twice!r} given twice, "
                                 f"{[v for k, v in pairs if k == twice]}")
        twice = [k for k in kw if k in items]
        if twice:  # (dict(sizes, **kw) let the keyword win in silence; parse refuses "h=2,h=4" too)
            raise SortedNetError(f"SubModel(): dimension {twice[0]!r} given twice, {items[twice[0]]!r} in the "
                                 f"mapping and {kw[twice[0]]!r} as a keyword")
        items.update(kw)
        for name, size in items.items():
            if not isinstance(name, str) or not name:
                raise SortedNetError(f"sub-model keys must be dimension names, got {name!r}")
            n = as_int(size)
            if n is None:
                raise SortedNetError(f"sub-model size for {name!r} must be an int, got {size!r}")
            items[name] = n  # numpy / torch integers become ints
        object.__setattr__(self, "_items", tuple(items.items()))
        object.__setattr__(self, "_dict", items)
        object.__setattr__(self, "_hash", hash(frozenset(self._items)))

    @classmethod
    def parse(cls, text: str) -> "SubModel":
        """Parse ``"ffn=512,depth=4"`` (spaces allowed)."""
        sizes: dict[str, int] = {}
        if not isinstance(text, str):
            raise SortedNetError(f"cannot parse sub-model {text!r}: expected a 'name=int,...' string")
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, value = part.partition("=")
            name, value = name.strip(), value.strip()
            digits = value[1:] if value.startswith("-") else value
            if not eq or not name or not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
                raise SortedNetError(
                    f"cannot parse sub-model {text!r}: expected 'name=int,...', bad part {part!r}")
            if name in sizes:
                raise SortedNetError(f"cannot parse sub-model {text!r}: {name!r} given twice")
            sizes[name] = int(value)
        return cls(sizes)

    @classmethod
    def of(cls, sub: Any, who: str = "SubModel.of") -> "SubModel":
        """``sub`` as a SubModel: itself, a ``{dimension: size}`` mapping or its text (``"h=4,d=2"``); anything
        else is refused naming ``who``. (Dimensions are taken as given: ``nest.resolve`` fills in left-out ones.)"""
        if isinstance(sub, SubModel):
            return sub
        if isinstance(sub, str):
            return cls.parse(sub)
        if isinstance(sub, Mapping):
            return cls(sub)
        raise SortedNetError(f"{who}: a sub-model is a SubModel, a {{dimension: size}} dict or its text ('h=4'), "
                             f"got {type(sub).__name__} {str(sub)[:60]!r}")

    @classmethod
    def _trusted(cls, items: dict[str, int]) -> "SubModel":
        """Build from already validated ``{name: int}`` (no checks: internal fast path)."""
        new = object.__new__(cls)
        object.__setattr__(new, "_items", tuple(items.items()))
        object.__setattr__(new, "_dict", items)
        object.__setattr__(new, "_hash", hash(frozenset(new._items)))
        return new

    def __getitem__(self, name: str) -> int:
        return self._dict[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SubModel):
            return self._dict == other._dict
        if isinstance(other, Mapping):  # (sizes by the rule resolve() applies: {"h": 16.0} or True is no spec of
            other = dict(other)             # ours, so it equals none, as membership in a SubModelList says)
            return other.keys() == self._dict.keys() and all(
                (n := as_int(v)) is not None and n == self._dict[k] for k, v in other.items())
        return NotImplemented

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("SubModel is immutable")

    def __reduce__(self):
        return (SubModel, (dict(self._items),))

    def __repr__(self) -> str:
        return f"SubModel({self})"

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self._items)

    def __format__(self, spec: str) -> str:
        """Formatted as its text: ``f"{sub:>20}"`` pads ``"h=8,depth=2"``."""
        return format(str(self), spec)

    def nested_in(self, other: Mapping[str, int] | str) -> bool:
        """True when every size of ``self`` is ≤ the same dimension's size in ``other`` (a sub-model, a mapping
        or its text); False for other dimensions (not comparable: resolve both through the nest first)."""
        if isinstance(other, str):
            other = SubModel.parse(other)
        if not isinstance(other, Mapping):
            raise SortedNetError(f"nested_in() takes a sub-model, a mapping {{dimension: size}} or its text, got "
                                 f"{type(other).__name__} {str(other)[:60]!r}")
        return self.keys() == other.keys() and all(v <= other[k] for k, v in self._items)

    def replace(self, **sizes: int) -> "SubModel":
        """A copy with some sizes changed."""
        unknown = set(sizes) - set(self._dict)
        if unknown:
            raise SortedNetError(f"unknown dimension(s) {sorted(unknown)}; sub-model has {list(self._dict)}")
        return SubModel({**self._dict, **sizes})

    def to_dict(self) -> dict[str, int]:
        return dict(self._items)


SubModelLike = SubModel | Mapping[str, int] | str


class SubModelList(Sequence[SubModel]):
    """An immutable, compact sequence of sub-models (``nest.submodels``).

    Stored as one small-integer row of size indices per sub-model (a NumPy
    array), so a million sub-models take a few megabytes; a :class:`SubModel`
    is built only when an item is read. ``sub in lst`` and ``lst.index(sub)``
    are binary searches. Equal to any sequence holding the same sub-models in
    the same order.

    >>> lst = SubModelList.product(("a", "b"), ((1, 2), (3, 4, 5)))
    >>> len(lst), lst[0], lst[-1], SubModel(a=2, b=4) in lst, lst.index("a=1,b=5")
    (6, SubModel(a=1,b=3), SubModel(a=2,b=5), True, 2)
    >>> lst[1:3] == [SubModel(a=1, b=4), SubModel(a=1, b=5)]
    True
    """

    __slots__ = ("names", "sizes", "rows", "_keys", "_sorted", "_order")

    def __init__(self, names: Sequence[str], sizes: Sequence[Sequence[int]], rows: np.ndarray) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.sizes: tuple[tuple[int, ...], ...] = tuple(tuple(int(v) for v in s) for s in sizes)
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != len(self.names) or len(self.sizes) != len(self.names):
            raise SortedNetError(f"SubModelList: rows of shape {rows.shape} for dimensions {list(self.names)}")
        self.rows = rows
        self.rows.setflags(write=False)
        self._keys: dict[tuple[int, ...], int] | None = None
        self._sorted: np.ndarray | None = None
        self._order: np.ndarray | None = None

    @staticmethod
    def index_dtype(sizes: Sequence[Sequence[int]]) -> type:
        """The smallest unsigned integer type that indexes every dimension's sizes."""
        n = max((len(s) for s in sizes), default=1)
        return np.uint8 if n <= 256 else np.uint16 if n <= 65536 else np.uint32

    @classmethod
    def product(cls, names: Sequence[str], sizes: Sequence[Sequence[int]]) -> "SubModelList":
        """Every combination of sizes, in lexicographic order of the size tuples."""
        counts = [len(s) for s in sizes]
        dtype = cls.index_dtype(sizes)
        total = int(np.prod(counts, dtype=object)) if counts else 1
        rows = np.empty((total, len(counts)), dtype=dtype)
        rep = total
        for d, c in enumerate(counts):
            rep //= c
            rows[:, d] = np.tile(np.repeat(np.arange(c, dtype=dtype), rep), total // (rep * c))
        return cls(names, sizes, rows)

    # -- Sequence --------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def _make(self, row: Sequence[int]) -> SubModel:
        return SubModel._trusted({n: s[i] for n, s, i in zip(self.names, self.sizes, row)})

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return SubModelList(self.names, self.sizes, self.rows[i])
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"sub-model list indices must be integers or slices, not {type(i).__name__}")
        return self._make(self.rows[int(i)].tolist())

    def __iter__(self) -> Iterator[SubModel]:
        for start in range(0, len(self), 4096):
            for row in self.rows[start:start + 4096].tolist():
                yield self._make(row)

    def _row(self, sub: Any) -> tuple[int, ...] | None:
        if isinstance(sub, str):
            try:
                sub = SubModel.parse(sub)
            except SortedNetError:
                return None
        if not isinstance(sub, Mapping) or len(sub) != len(self.names):
            return None
        row = []
        for n, s in zip(self.names, self.sizes):
            v = as_int(sub.get(n))  # (a float 4.0 is no size, as resolve says: not listed)
            if v is None or v not in s:
                return None
            row.append(s.index(v))
        return tuple(row)

    def position(self, sub: Any) -> int | None:
        """Index of ``sub`` (a SubModel, mapping or string), or None when it is not listed."""
        row = self._row(sub)
        if row is None or not len(self):
            return None
        if self._sorted is None:
            counts = [len(s) for s in self.sizes]
            if int(np.prod(counts, dtype=object)) < 2 ** 62:
                keys = np.zeros(len(self), dtype=np.int64)
                for d, c in enumerate(counts):
                    keys = keys * c + self.rows[:, d]
                self._order = np.argsort(keys, kind="stable")
                self._sorted = keys[self._order]
            else:  # astronomically many combinations: a dict of the (listed, so few) rows
                self._keys = {tuple(r): i for i, r in enumerate(self.rows.tolist())}
                self._sorted = np.empty(0, dtype=np.int64)
        if self._keys is not None:
            return self._keys.get(row)
        key = 0
        for v, s in zip(row, self.sizes):
            key = key * len(s) + v
        j = int(np.searchsorted(self._sorted, key))
        if j < len(self._sorted) and int(self._sorted[j]) == key:
            return int(self._order[j])
        return None

    def __contains__(self, sub: object) -> bool:
        return self.position(sub) is not None

    def index(self, sub: Any, start: int = 0, stop: int | None = None) -> int:
        i = self.position(sub)
        start, stop, _ = slice(start, stop).indices(len(self))  # negative bounds count from the end, as list.index
        if i is None or i < start or i >= stop:
            raise SortedNetError(f"sub-model {sub} is not in this list of {len(self)} sub-models")
        return i

    def count(self, sub: Any) -> int:
        return int(self.position(sub) is not None)

    def __add__(self, other: Any) -> list[SubModel]:
        """Concatenation gives a plain list, as list's own does: ``nest.submodels[:2] + [sub]``."""
        if not isinstance(other, (list, tuple, SubModelList)):
            return NotImplemented
        return [*self, *other]

    def __radd__(self, other: Any) -> list[SubModel]:
        if not isinstance(other, (list, tuple)):
            return NotImplemented
        return [*other, *self]

    def values(self) -> np.ndarray:
        """The sizes themselves, one row per sub-model (int64; columns follow :attr:`names`)."""
        out = np.empty(self.rows.shape, dtype=np.int64)
        for d, s in enumerate(self.sizes):
            out[:, d] = np.asarray(s, dtype=np.int64)[self.rows[:, d]]
        return out

    def digest(self) -> str:
        """A short fingerprint of the contents and order (equal lists give equal digests)."""
        return sequence_digest(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SubModelList):
            if len(self) != len(other):
                return False
            if self.names == other.names and self.sizes == other.sizes:
                return bool(np.array_equal(self.rows, other.rows))
            return bool(np.array_equal(self.values(), other._values_as(self.names)))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def _values_as(self, names: tuple[str, ...]) -> np.ndarray | None:
        if set(names) != set(self.names):
            return None
        v = self.values()
        return v[:, [self.names.index(n) for n in names]]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n = len(self)
        if n <= 6:
            return f"SubModelList([{', '.join(str(s) for s in self)}])"
        return f"SubModelList({n} sub-models: {self[0]} ... {self[n - 1]})"


def sequence_digest(subs: Sequence[SubModel]) -> str:
    """sha256 of a sub-model sequence (names, then one row of sizes per sub-model, in order)."""
    h = hashlib.sha256()
    if isinstance(subs, SubModelList):
        names, values = subs.names, subs.values()
    else:
        names = tuple(subs[0]) if len(subs) else ()
        try:
            values = np.array([[s[n] for n in names] for s in subs], dtype=np.int64).reshape(len(subs), len(names))
        except (KeyError, TypeError, OverflowError):
            return "sha256:" + hashlib.sha256("\n".join(map(str, subs)).encode()).hexdigest()
    h.update(",".join(names).encode())
    h.update(np.ascontiguousarray(values, dtype="<i8").tobytes())
    return "sha256:" + h.hexdigest()

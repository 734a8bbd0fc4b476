"""SubModel: a frozen, hashable mapping ``{dimension name: size}``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from .errors import SortedNetError

__all__ = ["SubModel", "SubModelLike"]


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
        items = dict(sizes or {}, **kw)
        for name, size in items.items():
            if not isinstance(name, str) or not name:
                raise SortedNetError(f"sub-model keys must be dimension names, got {name!r}")
            if isinstance(size, bool) or not isinstance(size, int):
                raise SortedNetError(f"sub-model size for {name!r} must be an int, got {size!r}")
        object.__setattr__(self, "_items", tuple(items.items()))
        object.__setattr__(self, "_dict", items)
        object.__setattr__(self, "_hash", hash(frozenset(self._items)))

    @classmethod
    def parse(cls, text: str) -> "SubModel":
        """Parse ``"ffn=512,depth=4"`` (spaces allowed)."""
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not eq or not name or not value.lstrip("-").isdigit():
                raise SortedNetError(
                    f"cannot parse sub-model {text!r}: expected 'name=int,...', bad part {part!r}")
            if name in sizes:
                raise SortedNetError(f"cannot parse sub-model {text!r}: {name!r} given twice")
            sizes[name] = int(value)
        return cls(sizes)

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
        if isinstance(other, Mapping):
            return self._dict == dict(other)
        return NotImplemented

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("SubModel is immutable")

    def __reduce__(self):
        return (SubModel, (dict(self._items),))

    def __repr__(self) -> str:
        return f"SubModel({self})"

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self._items)

    def nested_in(self, other: Mapping[str, int]) -> bool:
        """True when every size of ``self`` is ≤ the same dimension's size in ``other``."""
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

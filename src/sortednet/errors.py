"""The one error type of sortednet.

Every check in the library raises :class:`SortedNetError` (or a subclass) with
a message that names the module path, pattern, dimension or size at fault.
Checks run before anything is changed, so a caught error leaves the user's
model exactly as it was.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable

import numpy

__all__ = ["SortedNetError", "PatternError", "SizeError", "BudgetError", "nearby"]


class SortedNetError(ValueError):
    """Raised for any invalid input to sortednet.

    >>> import sortednet as sn
    >>> try:
    ...     sn.Width("ffn", [])
    ... except sn.SortedNetError as e:
    ...     print("caught")
    caught
    """


class PatternError(SortedNetError):
    """A target pattern matched nothing, or matched a module it cannot slice."""


class SizeError(SortedNetError):
    """A size is zero, negative, above the full size, unsorted or indivisible."""


class BudgetError(SortedNetError):
    """No sub-model fits the requested budget."""


def nearby(word: str, candidates: Iterable[str], n: int = 5) -> str:
    """Format the candidates closest to ``word`` for an error message."""
    cands = list(candidates)
    close = difflib.get_close_matches(word, cands, n=n, cutoff=0.3)
    if not close:
        close = cands[:n]
    return ", ".join(repr(c) for c in close) if close else "(none)"


def flag(what: str, name: str, value: object) -> None:
    """Refuse a yes/no option that is not a bool (a string, a tensor, a number would be read by its truth).

    >>> flag("export", "plain", "no")
    Traceback (most recent call last):
    sortednet.errors.SortedNetError: export(plain=...) takes True or False, got str 'no'
    """
    if not isinstance(value, (bool, numpy.bool_)):
        raise SortedNetError(f"{what}({name}=...) takes True or False, got {type(value).__name__} {value!r}")


def caller_outside(*also: str) -> int:
    """``warnings.warn``'s stacklevel, from the function calling this, of the first frame outside sortednet (the
    user's ``sn.wrap`` / ``sn.Nest`` / ``sn.load`` / ``from_transformers`` call) and the packages named in
    ``also`` (``"torch"``: a warning of a forward hook, said at the user's call of the model)."""
    pkgs = tuple(p + "." for p in (__name__.rpartition(".")[0], *also))  # (by module name: a vendored copy, or
    f, level = sys._getframe(1), 1                                        # .pyc files compiled elsewhere)
    while f is not None and (f.f_globals.get("__name__", "") + ".").startswith(pkgs):
        f, level = f.f_back, level + 1
    return level

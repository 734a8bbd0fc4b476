"""Module-path patterns: exact names, ``*`` / ``**`` globs and ``re:`` regexes.

The one place that knows the pattern syntax; dimensions, ``wrap`` and the
checkpoint metadata all match module paths through :func:`match_pattern`.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from .errors import PatternError, caller_outside, nearby

__all__ = ["match", "match_pattern", "SecondNameWarning", "Named"]


class SecondNameWarning(UserWarning):
    """A glob or regex matched modules by their names, and also second names of a module it left out (a module is
    matched by its first name: a layer held as ``self.l`` and in ``self.blocks``)."""


class Named(dict):
    """``name -> module`` by first names, as ``dict(model.named_modules())``, knowing each second name of a module
    held under several (``seconds``: second name -> first name)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model.named_modules())
        first = {id(m): n for n, m in self.items()}
        self.seconds = {n: first[id(m)] for n, m in model.named_modules(remove_duplicate=False) if n not in self}
        self.current: object = None  # the dimension planning (wrap sets it)
        self.left: list[tuple[object, str, str, list[str], dict[str, list[str]]]] = []  # (dim, what, pattern, hits,
        #                                                                                     left out)

    def warn_left(self, targets: list) -> None:
        """Warn for each pattern that matched second names of a module that no target of the plan binds for the
        same dimension and role as the pattern's own targets (``targets``: the plan's, with ``path``, ``role``,
        ``binding.dim`` and ``pattern``): the user's list may name it by another pattern."""
        for dim, what, pattern, hits, left in self.left:
            role = what.rsplit(" ", 1)[-1]  # (a Width's role; one glob may be given for out= and inp= both)
            roles = {role} if role in ("out", "inp", "norm") else {
                t.role for t in targets if t.pattern == pattern and t.binding.dim is dim}
            bound = {t.path for t in targets if t.binding.dim is dim and t.role in roles}
            left = {first: names for first, names in left.items()
                    if not any(p == first or p.startswith(first + ".") for p in bound)}
            if left:
                said = "; ".join(f"{names[:3]} of {first!r}" for first, names in list(left.items())[:3])
                warnings.warn(f"{what}: pattern {pattern!r} matched {hits[:4]}{' ...' if len(hits) > 4 else ''}, "
                              f"and also second names of modules it leaves out ({said}): a module held under "
                              "several names is matched by its first name only; name it by that to include it",
                              SecondNameWarning, stacklevel=caller_outside())


def match_pattern(pattern: str, modules: dict[str, nn.Module], what: str) -> list[str]:
    """Paths in ``modules`` matched by ``pattern``.

    Exact name; glob where ``*`` is one path component and ``**`` one or more (``a.**.fc`` matches
    ``a.x.fc`` and ``a.x.y.fc``, not ``a.fc``);
    ``re:<regex>`` matched against the whole path. A pattern that matches
    nothing is a :class:`~sortednet.errors.PatternError` that lists nearby
    module names.

    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    >>> match_pattern("*", dict(m.named_modules()), "demo")
    ['0', '1', '2']
    >>> match_pattern("re:[02]", dict(m.named_modules()), "demo")
    ['0', '2']
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
        compiled = "_orig_mod" in modules and not pattern.startswith(("_orig_mod", "re:_orig_mod"))
        err = PatternError(f"{what}: pattern {pattern!r} matched no module; nearby names: "
                           f"{nearby(pattern, [n for n in modules if n])}"
                           + ("; the model is a torch.compile wrapper (its modules are under '_orig_mod.'): sn.wrap "
                              "the model itself, before compiling it, then torch.compile(model) or nest.compile()"
                              if compiled else ""))
        err.pattern = pattern  # (wrap names the modules it would match under their second names)
        raise err
    if isinstance(modules, Named) and modules.seconds and pattern not in modules:
        left: dict[str, list[str]] = {}
        for n, first in modules.seconds.items():
            if rx.fullmatch(n) and first not in hits:
                left.setdefault(first, []).append(n)
        if left:  # (said by wrap once the whole plan is known: another pattern may name the module)
            modules.left.append((modules.current, what, pattern, hits, left))
    return hits


match = match_pattern

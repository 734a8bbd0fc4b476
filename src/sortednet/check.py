"""check: a dry run of a nest that names the missing binding of any wiring mistake.

``nest.check(example)`` runs, in eval mode and without gradients, each
dimension alone at its smallest size, the smallest and the largest sub-model
and a few mixed ones; their outputs must keep the full model's shapes and
``export`` of the smallest must equal its live output. When one fails, the
wiring is compared with the coupled groups found by :mod:`sortednet.coupling`
and the error names the dimension, the module path and the role (``out=``,
``inp=``, ``norm=``) that is missing, instead of a raw shape error.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves

from .cost import call_model
from .coupling import analyse
from .errors import SortedNetError
from .modes import eval_mode
from .submodel import SubModel

if TYPE_CHECKING:
    from .nest import Nest

__all__ = ["check", "diagnose"]


def _bound(nest: Nest) -> dict[tuple[str, str], Any]:
    """(module path, role) -> the Width dimension that slices it."""
    return {(path, role): b.dim for path, m in nest._sliced.items() for role, b in m._sn.bind.items()
            if role in ("out", "inp", "norm") and b.dim.kind == "width"}


def diagnose(nest: Nest, example: Any, model: Any = None) -> list[str]:
    """Wiring problems of ``nest``'s Width dimensions: coupled roles left out or split between dimensions.

    ``model``: the module tree to trace (default ``nest.model``; ``check`` passes its eval-mode view)."""
    bound = _bound(nest)
    if not bound:
        return []
    with nest.use(nest.largest):
        groups = analyse(nest.model if model is None else model, example).groups
    problems = []
    for g in groups:
        mine = [(k, bound[k]) for k in g.bindings if k in bound]
        if not mine:
            continue
        dims = list(dict.fromkeys(d.name for _, d in mine))
        (p0, r0), d0 = mine[0]
        if len(dims) > 1:
            problems.append(f"dimensions {dims} slice features that must shrink together "
                            f"({[f'{p}:{r}=' for (p, r), _ in mine][:6]}); declare them as one dimension")
        missing = [k for k in g.bindings if k not in bound]
        if missing:
            lst = ", ".join(f"{r}={p!r}" for p, r in missing[:8]) + (" ..." if len(missing) > 8 else "")
            problems.append(f"{d0.kind} {d0.name!r}: {p0!r} ({r0}=) shares its {g.size} features with modules it "
                            f"does not slice; add {lst}")
        elif g.fixed is not None:
            problems.append(f"{d0.kind} {d0.name!r}: the features of {p0!r} ({r0}=) reach {g.fixed}, so they "
                            "cannot shrink; remove that binding")
    return problems


def _shapes(x: Any) -> list:
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in tree_leaves(x)]


def _plan(nest: Nest, mixed: int, seed: int) -> list[tuple[SubModel, str]]:
    """(sub-model, what it tests), among the nest's listed sub-models: each dimension at its smallest with
    as many others as possible at full size, the smallest, the largest and a few mixed ones."""
    subs = nest.submodels
    rng = random.Random(seed)
    pool = [subs[i] for i in (range(len(subs)) if len(subs) <= 4096 else sorted(rng.sample(range(len(subs)), 4096)))]
    out = []
    for d in nest.dims:
        cands = [s for s in pool if s[d.name] == d.sizes[0]] if len(d.sizes) > 1 else []
        if cands:
            best = max(cands, key=lambda s: sum(s[e.name] == e.full for e in nest.dims))
            out.append((best, f"{d.kind} {d.name!r} at {d.sizes[0]}"))
    out += [(nest.smallest, "the smallest sub-model"), (nest.largest, "the largest sub-model")]
    out += [(subs[rng.randrange(len(subs))], "a mixed sub-model") for _ in range(min(mixed, len(subs)))]
    return list(dict.fromkeys(out))


def _fail(nest: Nest, model: Any, example: Any, what: str, sub: SubModel, err: str) -> SortedNetError:
    try:
        problems = diagnose(nest, example, model)
    except SortedNetError as e:
        problems = [f"(could not analyse the wiring: {e})"]
    head = f"nest.check: {what} ({sub}) {err}"
    if problems:
        return SortedNetError(head + "\n  " + "\n  ".join(problems))
    return SortedNetError(head + "\n  (no missing binding found by tracing: check custom modules and ops of "
                          "the sliced features)")


def check(nest: Nest, example: Any, *, mixed: int = 3, seed: int = 0) -> None:
    """Dry-run ``nest`` on ``example``; raise a :class:`SortedNetError` naming the wiring mistake.

    The model's weights, buffers, train/eval mode and active sub-model are left as they were.

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> nest = sn.wrap(model, sn.Width("ch", [4, 8], out="0", inp="3"))   # BatchNorm '1' forgotten
    >>> try:
    ...     nest.check(torch.randn(2, 3, 8, 8))
    ... except sn.SortedNetError as e:
    ...     print(str(e).splitlines()[1].strip())
    width 'ch': '0' (out=) shares its 8 features with modules it does not slice; add norm='1'
    """
    with eval_mode(nest) as (model, _), torch.no_grad():  # a private eval-mode view: no shared flag changes
        with nest.use(nest.largest):
            want = _shapes(call_model(model, example))
        for sub, what in _plan(nest, mixed, seed):
            with nest.use(sub):
                try:
                    got = _shapes(call_model(model, example))
                except Exception as e:
                    raise _fail(nest, model, example, what, sub, f"fails: {type(e).__name__}: {e}") from e
            if got != want:
                raise _fail(nest, model, example, what, sub, f"changes the output shapes from {want} to {got}: "
                            "a dimension slices the network's output")
        sub = nest.smallest
        with nest.use(sub):
            live = call_model(model, example)
        got = call_model(nest.export(sub, plain=True).eval(), example)
        for a, b in zip(tree_leaves(got), tree_leaves(live)):
            if isinstance(a, torch.Tensor) and not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
                raise SortedNetError(f"nest.check: export({sub}) differs from its live output by "
                                     f"{(a - b).abs().max().item():.3g}")

"""Search-free selection: the best sub-model within every given budget.

Sub-models are ranked best first: by score (a profile's score, or the
parameter count when there is none: SortedNet's "bigger is better"), ties to
the lower cost in each limited metric (in the order params, flops, latency,
memory, whatever order the keywords came in), then to fewer
parameters, then to the later sub-model of the nest's cost order when no
scores are measured (the earlier otherwise); one ranking per set of limited
metrics, built on first use. ``pick`` returns the best-ranked sub-model that
fits every limit:

- one limit: a bisection in the list sorted by that cost plus a precomputed
  running best (O(log N));
- several limits: one vectorised pass over the ranking (O(N) in numpy, tens of
  microseconds at N = 10,000).

The best-scoring feasible sub-model always lies on the Pareto front of
(the limited costs, score). Growing any budget only grows the feasible set,
so the score of the pick never decreases (monotone), and a pick never exceeds
a budget. A budget below every sub-model raises :class:`BudgetError` stating
the smallest cost available.
"""

from __future__ import annotations

import decimal
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import BudgetError, SortedNetError
from .submodel import SubModel, SubModelList

__all__ = ["Selector", "budget"]


def budget(name: str, value: Any) -> float:
    """A budget given to ``pick`` as a float: a real number (int, float, ``Fraction``, ``Decimal``, a NumPy
    scalar or one-element array, a one-element real tensor), never a bool, string, complex or container; NaN is
    refused. Budgets and costs are compared as float64 (the costs are stored so): an exact number is rounded to
    the nearest float first, as ``float()`` does, so a budget equal to a cost picks it at any size; an int too
    large for a float is an unlimited budget (``inf``).

    >>> import torch, fractions
    >>> budget("params", 10**400), budget("flops", 2), budget("params", torch.tensor(30))
    (inf, 2.0, 30.0)
    >>> budget("params", fractions.Fraction(1, 4))
    0.25
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        if value.is_meta:
            raise SortedNetError(f"budget {name}= is a tensor on the meta device, which holds no value")
        if value.dtype is not torch.bool and not value.is_complex():
            value = value.item()
    elif isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        raise SortedNetError(f"budget {name}= must be a real number, got {type(value).__name__} {value!r}")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf if value > 0 else -math.inf
    except ValueError:  # a signalling Decimal NaN
        out = math.nan
    if out != out:
        raise SortedNetError(f"budget {name}={value} is not a number")
    return out


class Selector:
    """Precomputed tables answering ``pick`` for a fixed list of sub-models.

    >>> import sortednet as sn
    >>> subs = [sn.SubModel(h=h) for h in (2, 4, 8)]
    >>> sel = Selector(subs, {"params": [10, 20, 40], "latency": [3e-3, 1e-3, 2e-3]})
    >>> sel.pick({"params": 25}), sel.pick({"params": 40, "latency": 1.5e-3})
    (SubModel(h=4), SubModel(h=4))
    """

    def __init__(self, subs: Sequence[SubModel], costs: Mapping[str, Sequence[float]],
                 scores: Sequence[float] | None = None) -> None:
        n = len(subs)
        if n == 0:
            raise SortedNetError("no sub-models to select from")
        if "params" not in costs:
            raise SortedNetError("Selector needs the 'params' cost of every sub-model")
        listed = isinstance(subs, SubModelList)  # (a nest's list: distinct, of one nest's dimensions, and a
        if not listed and len(set(subs)) != n:     # million of them are no Python objects until read)
            seen: set[SubModel] = set()
            twice = next(s for s in subs if s in seen or seen.add(s))
            raise SortedNetError(f"{twice} is listed twice: a Selector picks among distinct sub-models")
        names = {tuple(sorted(s)) for s in subs} if not listed else set()
        if len(names) > 1:
            raise SortedNetError(f"the sub-models name different dimensions ({' vs '.join(map(repr, sorted(names)))}): "
                                 "a Selector picks among sub-models of one nest")
        self.subs = subs
        self.costs = {k: np.asarray(v, dtype=np.float64) for k, v in costs.items()}
        for k, v in self.costs.items():
            if v.shape != (n,):
                raise SortedNetError(f"{k!r} has {v.size} costs for {n} sub-models")
        for k, v in self.costs.items():
            if np.isnan(v).any():
                raise SortedNetError(f"{k!r} cost is NaN for {self.subs[int(np.isnan(v).argmax())]}: a NaN compares "
                                     "false with every budget; measure it again")
        params = self.costs["params"]
        if scores is None:
            self.scores = params
        else:
            self.scores = np.asarray(scores, dtype=np.float64)
            if self.scores.shape != (n,):
                raise SortedNetError(f"need {n} scores, one per sub-model, got {self.scores.size}")
            if not np.isfinite(self.scores).all():
                bad = int((~np.isfinite(self.scores)).argmax())
                raise SortedNetError(f"the score of {self.subs[bad]} is {self.scores[bad]}: scores must be finite "
                                     "(an infinite one outranks every measured score)")
        # the last tie-break: later in nest order without scores, earlier with them
        self._order = -np.arange(n) if scores is None else np.arange(n)
        self._rankings: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._single: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._ranked: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
        self._min = {k: float(v.min()) for k, v in self.costs.items()}

    def _ranking(self, metrics: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(ranking[r] = sub index of rank r, rank[i] = rank of sub i) with ties in score broken to the
        lower cost in each of ``metrics``: among equally scored sub-models a pick is never dominated in
        the costs it was limited by (it lies on their Pareto front)."""
        hit = self._rankings.get(metrics)
        if hit is None:
            keys = (self._order, self.costs["params"], *(self.costs[m] for m in reversed(metrics)), -self.scores)
            key = np.lexsort(keys)
            rank = np.empty(len(key), dtype=np.int64)
            rank[key] = np.arange(len(key))
            hit = self._rankings[metrics] = (key, rank)
        return hit

    def _table(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        t = self._single.get(metric)
        if t is None:
            ranking, rank = self._ranking((metric,))
            c = self.costs[metric]
            order = np.argsort(c, kind="stable")
            best = np.minimum.accumulate(rank[order])      # best rank among the i cheapest
            t = self._single[metric] = (c[order], ranking[best])
        return t

    def smallest(self, metric: str) -> tuple[float, SubModel]:
        """The lowest ``metric`` cost available and the sub-model ``pick`` returns at that budget (of several
        that cost it, the best-ranked)."""
        low = self._min[metric]
        return low, self.pick({metric: low})

    def pick(self, limits: Mapping[str, float]) -> SubModel:
        """Best-ranked sub-model with ``cost[metric] <= limit`` for every given limit."""
        if not limits:
            raise SortedNetError("pick() needs a budget, e.g. pick(params=1e6) or pick(fraction=0.5)")
        for metric, limit in limits.items():
            if metric not in self.costs:
                raise SortedNetError(f"no {metric!r} cost known for these sub-models; "
                                     f"known: {sorted(self.costs)} (run nest.profile(example) to measure more; "
                                     "for FLOPs, counting every sub-model with nest.cost(sub, 'flops', example=x) "
                                     "fills the same table)")
            if limit != limit:
                raise SortedNetError(f"budget {metric}={limit} is not a number")
        low = [m for m in limits if limits[m] < self._min[m]]
        if low:
            raise BudgetError("no sub-model fits " + ", ".join(
                f"{m} <= {_num(limits[m], c)} (the smallest available is {_num(c)}, {s})"
                for m in low for c, s in [self.smallest(m)]))
        if len(limits) == 1:
            (metric, limit), = limits.items()
            costs, best = self._table(metric)
            return self.subs[int(best[int(np.searchsorted(costs, limit, side="right")) - 1])]
        order = ("params", "flops", "latency", "memory")  # (ties go to the lower cost in this order, whatever
        metrics = tuple(sorted(limits, key=lambda m: (order.index(m) if m in order else len(order), m)))  # the
        ranking, _ = self._ranking(metrics)  # order of the keywords, or of fraction= turned into params)
        costs = self._ranked.get(metrics)
        if costs is None:
            costs = self._ranked[metrics] = {m: self.costs[m][ranking] for m in metrics}   # in ranking order
        ranked = None
        for metric, limit in limits.items():
            ok = costs[metric] <= limit
            ranked = ok if ranked is None else np.logical_and(ranked, ok, out=ranked)
        first = int(ranked.argmax())
        if not ranked[first]:
            raise BudgetError("no sub-model fits all of " + ", ".join(f"{m} <= {_num(v)}" for m, v in limits.items())
                              + " at once; each alone is feasible (smallest: " + ", ".join(
                                  f"{m} {_num(self.smallest(m)[0])}" for m in limits) + ")")
        return self.subs[int(ranking[first])]


def _num(v: float, near: float | None = None) -> str:
    """A budget or cost for a message: 12 significant digits (no float noise of a computed budget), all of them
    where those would print a budget just below the smallest cost as that cost (194.99999999999997 as 195)."""
    v = float(v)
    if v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    short = f"{v:.12g}"
    return repr(v) if near is not None and float(short) == float(near) and v != near else short

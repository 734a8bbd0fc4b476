"""Sampler: which sub-models each optimizer step trains.

A draw is a pure function of ``(seed, step)``: every call builds a fresh
NumPy generator from ``SeedSequence([seed, step])``, so a resumed run and
every data-parallel rank draw exactly the same sub-models with no RNG state
to carry around. ``state_dict`` holds the configuration only, to check that
a resumed run samples as the interrupted one did.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import SortedNetError
from .submodel import SubModel, SubModelList, as_int, sequence_digest

__all__ = ["Sampler", "STRATEGIES", "WEIGHT_RULES"]

STRATEGIES = ("uniform", "sandwich", "weighted", "all")
#: named rules for ``strategy="weighted"``: weight of the sub-model at position
#: ``i`` (ascending cost, 0-based) given its parameter count ``c``
WEIGHT_RULES = ("cost", "large", "small")
#: ``state_dict`` lists the sub-models by name up to this many; above, it stores a digest
STATE_LIST_MAX = 10_000


def _check_index(value: Any, what: str) -> int:
    n = as_int(value)  # (numpy and 0-d torch integers too, as fit's start_step; never a bool or a float)
    if n is None or n < 0:
        raise SortedNetError(f"{what} must be a non-negative int, got {value!r}")
    return n


def number_list(values: Any, what: str) -> list[float]:
    """``values`` as floats, one per entry, in the caller's order: a list, tuple, 1-d (or column) array or
    tensor, or an iterator (read once), of anything ``float()`` reads as a real number (Python, NumPy and
    ``Decimal`` numbers, 0-d arrays, one-element tensors); never bools, strings, complex numbers, sets or
    mappings, whose meaning or order is not the user's. Huge integers become ``inf`` (the caller's finiteness
    check refuses them by name). A :class:`SortedNetError` naming ``what`` otherwise."""
    bad = SortedNetError(f"{what} must be a list of real numbers in the order of the sub-models, got {values!r}")
    if isinstance(values, (str, bytes, set, frozenset, Mapping)) or isinstance(values, numbers.Number):
        raise bad
    if isinstance(values, (torch.Tensor, np.ndarray)):
        shape = tuple(values.shape)
        if len(shape) == 0 or sum(n > 1 for n in shape) > 1:  # (a row or column of any rank is a list)
            raise bad
        values = values.reshape(-1).tolist()
    try:
        values = list(values)
    except TypeError:
        raise bad from None
    out = []
    for x in values:
        kind = getattr(x, "dtype", None)
        if (isinstance(x, (bool, np.bool_, str, bytes)) or kind is torch.bool
                or getattr(kind, "kind", None) in ("b", "c", "O", "S", "U")
                or (isinstance(x, numbers.Complex) and not isinstance(x, numbers.Real))
                or (isinstance(x, torch.Tensor) and (x.numel() != 1 or x.is_complex()))):
            raise bad
        try:
            out.append(float(x))
        except OverflowError:
            out.append(math.inf if x > 0 else -math.inf)
        except (TypeError, ValueError):
            raise bad from None
    return out


def _check_order(subs: Sequence[SubModel]) -> None:
    """The list must be in ascending cost, as ``nest.submodels`` is (the sampler's smallest / largest, draw
    order, rank-based weights and ``small_first`` read it so): no sub-model may contain a later one (all sizes
    >=, one >). Checked for neighbours always, for every pair of lists up to 1,024 long."""
    if isinstance(subs, SubModelList):
        rows = np.asarray(subs.rows, dtype=np.int64)
        names = list(subs.names)
    else:
        names = list(subs[0])
        if any(set(x) != set(names) for x in subs):
            raise SortedNetError(f"Sampler's sub-models must name the same dimensions {names} (pass nest.submodels)")
        rows = np.array([[x[k] for k in names] for x in subs], dtype=np.int64)
    if len(rows) < 2:
        return

    def refuse(i: int, j: int) -> None:
        raise SortedNetError(f"Sampler's sub-models are not in ascending cost: {subs[i]} (position {i}) contains "
                             f"{subs[j]} (position {j}) that comes after it; pass nest.submodels, a forward slice of "
                             "it, or a list in its order")

    nxt = np.all(rows[1:] <= rows[:-1], axis=1) & np.any(rows[1:] < rows[:-1], axis=1)
    if nxt.any():
        i = int(np.argmax(nxt))
        refuse(i, i + 1)
    if len(rows) <= 1024:
        for i in range(len(rows) - 1):
            later = rows[i + 1:]
            bad = np.all(later <= rows[i], axis=1) & np.any(later < rows[i], axis=1)
            if bad.any():
                refuse(i, i + 1 + int(np.argmax(bad)))


#: the most partial draws (sets drawn so far, times the candidates of the next draw) :func:`inclusion` follows
#: exactly; beyond it, an approximation
EXACT_WORK = 1_000_000


def inclusion(p: Any, k: int) -> list[float]:
    """Probability that each item is among ``k`` drawn one after another without replacement, each draw in
    proportion to ``p`` over the items not drawn yet (``numpy.random.Generator.choice(replace=False, p=p)``).

    >>> [round(x, 4) for x in inclusion([0.5, 0.25, 0.25], 2)]
    [0.8333, 0.5833, 0.5833]
    """
    p = np.asarray(p, dtype=np.float64)
    n = len(p)
    if k <= 0:
        return [0.0] * n
    live = np.flatnonzero(p > 0)
    if k >= len(live):
        return [1.0 if x > 0 else 0.0 for x in p]
    if k == 1:
        return [float(x) for x in p / p.sum()]
    m, work, c = len(live), 0, 1
    for j in range(k):  # sets of j drawn items, each followed by up to m candidates
        work += c * m
        c = c * (m - j) // (j + 1)
    q = p[live] / p[live].sum()
    out = np.zeros(n)
    if work <= EXACT_WORK:
        states: dict[int, float] = {0: 1.0}  # drawn set (bit mask) -> its probability
        got = np.zeros(m)
        qs = q.tolist()
        for _ in range(k):
            nxt: dict[int, float] = {}
            for mask, pr in states.items():
                free = [j for j in range(m) if not mask >> j & 1]
                rest = sum(qs[j] for j in free)  # (summed, not 1 - drawn: tiny weights would cancel)
                for j in free:
                    step = pr * qs[j] / rest
                    got[j] += step
                    key = mask | 1 << j
                    nxt[key] = nxt.get(key, 0.0) + step
            states = nxt
        out[live] = np.minimum(got, 1.0)
        return [float(x) for x in out]
    lo, hi = 0.0, 1.0
    while (1 - np.exp(-q * hi)).sum() < k:
        hi *= 2
    for _ in range(100):
        t = (lo + hi) / 2
        lo, hi = (t, hi) if (1 - np.exp(-q * t)).sum() < k else (lo, t)
    out[live] = 1 - np.exp(-q * hi)
    return [float(x) for x in out]


def _no_op_options(strategy: Any, k: Any, n: int, weights: Any, small_first: Any) -> list[str]:
    """The options of a sampler configuration that change no draw: ``weights`` / ``small_first`` where every
    step draws every sub-model (``k == n``) or a sandwich of ``k=2`` (the smallest and the largest)."""
    if strategy == "all" or not (k == n or strategy == "sandwich" and k == 2):
        return []
    return [name for name, v in (("weights", weights), ("small_first", small_first)) if v]


def without_no_op_options(state: Mapping[str, Any], n: int) -> dict[str, Any]:
    """A saved sampler state (:meth:`Sampler.state_dict`) of ``n`` sub-models without the options that change no
    draw: earlier versions accepted and saved them (the draws are the same without), this one refuses them."""
    state = dict(state)
    for name in _no_op_options(state.get("strategy"), state.get("k"), n, state.get("weights"),
                               state.get("small_first")):
        state[name] = None if name == "weights" else 0
        if name == "weights" and state.get("strategy") == "weighted":  # (k = n: every sub-model, every step)
            state["strategy"] = "all"
    return state


def comparable_state(state: Mapping[str, Any], n: int) -> dict[str, Any]:
    """A saved sampler state as two runs that draw alike compare it: without the options that change no draw
    (:func:`without_no_op_options`), and without the seed of strategy ``'all'``, which draws every sub-model every
    step whatever the seed."""
    state = without_no_op_options(state, n)
    if state.get("strategy") == "all":
        state["seed"] = None
    return state


class Sampler:
    """Draws the sub-models of one training step, as a pure function of ``(seed, step)``.

    ``submodels`` is a cost-sorted sequence (``nest.submodels``) or the nest
    itself (needed for ``weights="cost"``). Strategies:

    - ``"uniform"``: ``k`` distinct sub-models, uniformly (SortedNet);
    - ``"sandwich"``: largest + smallest + ``k - 2`` distinct others, uniformly (US-Nets),
      or with probability proportional to ``weights`` when given (e.g. ``"small"``);
    - ``"weighted"``: ``k`` distinct sub-models with probability proportional to
      ``weights``: one non-negative number per sub-model, or a rule: ``"cost"``
      (parameter count), ``"large"`` (rank ``i + 1``: favours large), ``"small"``;
    - ``"all"``: every sub-model every step (MatFormer / DynaBERT; ``k`` is ignored
      or must equal the count).

    ``loss_weights`` (any strategy) scales each drawn sub-model's loss instead
    of the plain mean: positive numbers, one per sub-model, or a rule of
    ``WEIGHT_RULES`` (``"cost"`` needs the nest). :meth:`loss_weights_for` gives
    the weights of one draw, normalised to sum to 1, for ``sn.accumulate(...,
    weights=)``; ``sn.fit`` applies them. Draws do not depend on them.

    ``small_first`` (a number of steps, ``uniform`` / ``sandwich`` / ``weighted``)
    draws small sub-models more at the start of training: at step ``t`` below it,
    the sub-model at position ``i`` (ascending cost, of ``n``) has its draw weight
    multiplied by ``(n - i) ** (1 - t / small_first)`` (several draws are made one
    after another without replacement: not the ratio of how often each is drawn), annealed to the strategy's
    own distribution by step ``small_first`` (:meth:`expected_fraction` gives
    that one). Sandwich always draws the smallest and the largest; the schedule
    moves its other draws.

    An option that could change nothing is refused: ``weights`` or ``small_first``
    where every step draws every sub-model (``k`` equal to their count) or a
    sandwich of ``k=2`` (the smallest and the largest, nothing in between); a
    state an earlier version saved with one loads without it (the same draws).
    ``loss_weights`` with ``k=1`` weighs each draw's one loss 1 (they are
    normalised per draw); :meth:`loss_weights_for` still weighs a list of your own.

    ``draw`` returns sub-models in ascending cost order. A list of your own must be in ascending cost
    (``sorted(subs, key=nest.cost)``): positions decide the smallest / largest and rank-based weights, and
    a list of sub-models carries no costs, so only a sub-model containing a later one is refused.

    >>> import torch.nn as nn, sortednet as sn
    >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 4, 6, 8], out="0", inp="1"))
    >>> s = sn.Sampler(nest.submodels, k=3, strategy="sandwich", seed=0)
    >>> picked = s.draw(7)
    >>> picked == s.draw(7), picked[0] == nest.smallest, picked[-1] == nest.largest
    (True, True, True)
    >>> w = sn.Sampler(nest, k=2, strategy="sandwich", loss_weights="large")  # the largest weighs 4x the smallest
    >>> w.loss_weights_for(w.draw(0))
    [0.2, 0.8]
    """

    def __init__(self, submodels: Any, *, k: int | None = None, strategy: str = "uniform", seed: int = 0,
                 weights: Sequence[float] | str | None = None,
                 loss_weights: Sequence[float] | str | None = None, small_first: int = 0) -> None:
        nest = None
        if weights is not None and not isinstance(weights, str):
            weights = number_list(weights, "weights")  # (an iterator is read once, here)
        if loss_weights is not None and not isinstance(loss_weights, str):
            loss_weights = number_list(loss_weights, "loss_weights")
        if hasattr(submodels, "submodels") and hasattr(submodels, "cost"):
            nest, submodels = submodels, submodels.submodels
        if isinstance(submodels, (str, bytes, Mapping)) or not isinstance(submodels, Sequence):
            raise SortedNetError(f"Sampler needs a sequence of sub-models (nest.submodels), got "
                                 f"{type(submodels).__name__}")
        if isinstance(submodels, SubModelList):  # nest.submodels: distinct SubModels by construction, kept lazy
            subs: Sequence[SubModel] = submodels
        else:
            subs = tuple(submodels)
            bad = [s for s in subs if not isinstance(s, SubModel)]
            if bad:
                raise SortedNetError(f"Sampler takes SubModel objects (nest.submodels), got {bad[0]!r}: resolve "
                                     "a string or dict with nest.resolve(...)")
            if len(set(subs)) != len(subs):
                raise SortedNetError("Sampler got the same sub-model twice; pass nest.submodels")
        if not len(subs):
            raise SortedNetError("Sampler needs at least one sub-model, got an empty list")
        _check_order(subs)
        if strategy not in STRATEGIES:
            raise SortedNetError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")
        n = len(subs)
        lo = 2 if strategy == "sandwich" else 1
        if n < lo:
            raise SortedNetError(f"strategy 'sandwich' draws the smallest and the largest sub-model: it needs at "
                                 f"least 2 sub-models, this sampler has {n}; use strategy='uniform'")
        if strategy == "all":
            if k is not None and _check_index(k, "k") != n:
                raise SortedNetError(f"strategy 'all' trains all {n} sub-models each step; got k={k} "
                                     "(leave k out)")
            k = n
        elif k is None:
            raise SortedNetError(f"strategy {strategy!r} needs k (sub-models per step, {lo}..{n})")
        k = _check_index(k, "k")
        if not lo <= k <= n:
            raise SortedNetError(f"k={k} is out of range for strategy {strategy!r} with {n} sub-models "
                                 f"(need {lo} <= k <= {n})")
        probs = None
        if strategy == "weighted":
            probs = self._probabilities(weights, subs, nest)
            if int(np.count_nonzero(probs)) < k:
                raise SortedNetError(f"only {int(np.count_nonzero(probs))} sub-model(s) have a positive weight; "
                                     f"cannot draw k={k} distinct ones")
        elif strategy == "sandwich" and weights is not None:
            w = self._probabilities(weights, subs, nest)[1:-1]
            if int(np.count_nonzero(w)) < k - 2:
                raise SortedNetError(f"only {int(np.count_nonzero(w))} middle sub-model(s) have a positive weight; "
                                     f"cannot draw k-2={k - 2} distinct ones besides the smallest and largest")
            probs = w / w.sum() if w.sum() > 0 else w
        elif weights is not None:
            raise SortedNetError(f"weights= is only used by strategies 'weighted' and 'sandwich', not {strategy!r}")
        small_first = _check_index(small_first, "small_first")
        if small_first and strategy == "all":
            raise SortedNetError("small_first= has nothing to schedule with strategy 'all' (every sub-model every "
                                 "step); use 'uniform', 'sandwich' or 'weighted'")
        if strategy != "all" and k == n and _no_op_options(strategy, k, n, weights, small_first):
            what = "weights=" if weights is not None else "small_first="
            instead = "strategy='all'" if strategy == "weighted" else "leave it out (or strategy='all')"
            raise SortedNetError(f"{what} has nothing to choose with k={k} of {n} sub-models: every step draws all "
                                 f"of them; {instead}, or draw fewer (k < {n})")
        if strategy == "sandwich" and k == 2 and (weights is not None or small_first):
            what = "weights=" if weights is not None else "small_first="
            raise SortedNetError(f"{what} chooses the middle sub-models of a sandwich draw, and k=2 draws none: "
                                 f"every step is the smallest and the largest; leave it out, or use k >= 3 (or "
                                 f"strategy='weighted' / 'uniform' with k=2)")
        loss_w = None
        if loss_weights is not None:
            given = np.asarray(loss_weights, dtype=float) if not isinstance(loss_weights, str) else None
            if given is not None and len(given) == len(subs) and np.all(np.isfinite(given)) and np.any(given <= 0):
                at = int(np.argmin(given))
                raise SortedNetError(f"loss_weights must all be positive (a sub-model weighted 0 would be drawn but "
                                     "never trained; one weighted below 0, trained to raise its loss); got "
                                     f"{float(given[at])!r} for {subs[at]}")
            loss_w = self._probabilities(loss_weights, subs, nest, "loss_weights")
            if not np.all(loss_w > 0):
                raise SortedNetError(f"loss_weights must all be positive (a sub-model weighted 0 would be drawn but "
                                     f"never trained); got 0 for {subs[int(np.argmin(loss_w))]}")
            if np.any((loss_w / loss_w.max()).astype(np.float32) == 0):  # (a loss scaled in float32 to 0)
                at = int(np.argmin(loss_w))
                raise SortedNetError(f"loss_weights: {subs[at]}'s weight is positive but too small next to the "
                                     "largest to scale a float32 loss (it rounds to 0: drawn, never trained)")
        self.submodels: Sequence[SubModel] = subs
        self.k, self.strategy, self.seed = k, strategy, _check_index(seed, "seed")
        self.weights = weights
        self.probs: np.ndarray | None = probs
        self.loss_weights = loss_weights
        self._loss_w: np.ndarray | None = loss_w
        self.small_first = small_first
        self._pos: dict[SubModel, int] | None = None
        self._source = subs if nest is None else nest

    @staticmethod
    def _probabilities(weights: Sequence[float] | str | None, subs: Sequence[SubModel], nest: Any,
                       what: str = "weights") -> np.ndarray:
        n = len(subs)
        if weights is None:
            raise SortedNetError(f"strategy 'weighted' needs weights=: {n} numbers or one of {list(WEIGHT_RULES)}")
        if isinstance(weights, str):
            if weights == "cost":
                if nest is None:
                    raise SortedNetError(f"{what}='cost' needs the nest: Sampler(nest, ...) instead of nest.submodels"
                                         "; for a subset of its sub-models pass their costs, "
                                         "weights=[nest.cost(s) for s in subset]")
                if subs is nest.submodels and hasattr(nest, "_params"):
                    w = np.asarray(nest._params, dtype=float)
                else:
                    w = np.array([float(nest.cost(s, "params")) for s in subs])
            elif weights == "large":
                w = np.arange(1, n + 1, dtype=float)
            elif weights == "small":
                w = np.arange(n, 0, -1, dtype=float)
            else:
                raise SortedNetError(f"unknown weight rule {weights!r} for {what}; choose one of {list(WEIGHT_RULES)} "
                                     "or give one number per sub-model")
        else:
            w = np.array(number_list(weights, what))
            if len(w) != n:
                raise SortedNetError(f"{what} has {len(w)} entries but there are {n} sub-models (one per sub-model)")
            if not np.all(np.isfinite(w)) or np.any(w < 0):
                shown = [float(x) for x in w]
                sign = "positive" if what == "loss_weights" else "non-negative"
                raise SortedNetError(f"{what} must be finite and {sign}, got {shown[:8]}"
                                     f"{' ...' if len(shown) > 8 else ''}")
        if w.max() <= 0:
            raise SortedNetError(f"{what} sum to zero; at least one sub-model needs a positive weight")
        scaled = w / w.max()  # first: a sum of huge finite weights (1e308 each) would overflow to inf
        probs = scaled / scaled.sum()
        lost = np.flatnonzero((w > 0) & (probs == 0))  # (a subnormal share, 5e-324 beside 1.0, rounds to 0)
        if len(lost):
            raise SortedNetError(f"{what}: {float(w[lost[0]])!r} for {subs[int(lost[0])]} is positive but too small "
                                 f"next to the largest, {float(w.max())!r}, to be represented (its share of their "
                                 "sum underflows float64)")
        return probs

    def draw(self, step: int) -> list[SubModel]:
        """The sub-models to train at ``step`` (ascending cost; same answer for the same seed and step)."""
        step = _check_index(step, "step")
        n, k = len(self.submodels), self.k
        if self.strategy == "all":
            return list(self.submodels)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, step]))
        early = step < self.small_first
        if self.strategy == "uniform":
            idx = rng.choice(n, size=k, replace=False, p=self._early(n, 0, None, step) if early else None)
        elif self.strategy == "sandwich":
            # 1 + choice(n - 2) draws exactly what choice(arange(1, n - 1)) did, without the O(n) array
            p = self._early(n, 1, self.probs, step) if early and k > 2 else self.probs
            middle = (1 + rng.choice(n - 2, size=k - 2, replace=False, p=p)).tolist() if k > 2 else []
            idx = [0, n - 1, *middle]
        else:
            idx = rng.choice(n, size=k, replace=False, p=self._early(n, 0, self.probs, step) if early else self.probs)
        return [self.submodels[i] for i in sorted(int(i) for i in idx)]

    def _early(self, n: int, first: int, base: np.ndarray | None, step: int) -> np.ndarray:
        """Probabilities of positions ``first .. n - 1 - first`` at ``step`` of the small-first warm-up."""
        pos = np.arange(first, n - first, dtype=float)
        w = (n - pos) ** (1.0 - step / self.small_first)
        if base is not None:  # zeros stay zero: __init__ checked that enough entries are positive
            w = w * base
        return w / w.sum()

    def loss_weights_for(self, subs: Sequence[SubModel]) -> list[float] | None:
        """Loss weights of the drawn ``subs`` (summing to 1), or None without ``loss_weights``
        (``sn.accumulate`` then takes the plain mean)."""
        if self._loss_w is None:
            return None
        position = getattr(self.submodels, "position", None)
        if position is None:
            if self._pos is None:
                self._pos = {s: i for i, s in enumerate(self.submodels)}
            position = self._pos.get
        resolve = getattr(self._source, "resolve", None)  # (built from the nest: names read as nest.resolve does)

        def key(s: Any) -> Any:  # a string or dict names the same sub-model as its SubModel
            try:
                if resolve is not None and isinstance(s, (str, Mapping)):
                    return resolve(s)  # (a dimension left out: its largest size)
                return SubModel.of(s) if isinstance(s, (str, Mapping)) else s
            except SortedNetError:
                return s
        if isinstance(subs, (str, bytes, Mapping)) or not isinstance(subs, Sequence):
            raise SortedNetError(f"loss_weights_for takes the list of drawn sub-models (sampler.draw(step)), got "
                                 f"{subs!r}")
        idx = [position(key(s)) for s in subs]
        if not idx:
            raise SortedNetError("loss_weights_for takes the list of drawn sub-models (sampler.draw(step)), got an "
                                 "empty list")
        if any(i is None for i in idx):
            raise SortedNetError(f"loss_weights_for: {list(subs)!r} are not (all) sub-models of this sampler"
                                 + ("" if resolve is not None else " (name every dimension, or build the sampler "
                                    "from the nest, Sampler(nest, ...), to read names as nest.resolve does)"))
        if len(set(idx)) != len(idx):
            raise SortedNetError(f"loss_weights_for: {list(subs)!r} names one sub-model twice (sn.accumulate refuses "
                                 "it: it would train twice, at twice the weight)")
        w = self._loss_w[idx]
        return [float(x) for x in w / w.sum()]

    def expected_fraction(self) -> list[float]:
        """Probability that each sub-model is among a step's draws (for ``k=1``: the sampling distribution).

        Weighted draws of several sub-models (``weighted`` with ``k > 1``, ``sandwich`` with weights and
        ``k > 3``) are made one after another without replacement, each in proportion to the weights of
        those not drawn yet: the probabilities are then computed exactly over every partial draw while
        that takes at most :data:`EXACT_WORK` steps (e.g. 100 sub-models, ``k = 3``), else approximated
        (Rosén's formula for this successive sampling, ``1 - exp(-p t)`` with ``t`` such that they sum to
        ``k``: within a few hundredths). Every other case is exact.
        """
        n, k = len(self.submodels), self.k
        if self.strategy == "all":
            return [1.0] * n
        if self.strategy == "uniform":
            return [k / n] * n
        if self.strategy == "sandwich":
            if n <= 2:
                return [1.0] * n
            mid = [(k - 2) / (n - 2)] * (n - 2) if self.probs is None else inclusion(self.probs, k - 2)
            return [1.0, *mid, 1.0]
        return inclusion(self.probs, k)

    def state_dict(self) -> dict[str, Any]:
        """The configuration (JSON-able). Draws need no other state: they depend on ``(seed, step)`` only."""
        return {"strategy": self.strategy, "k": self.k, "seed": self.seed, "weights": self.weights,
                "loss_weights": self.loss_weights, "small_first": self.small_first, "submodels": self._listing()}

    def _listing(self) -> list[str] | str:
        """The sub-models by name, or (above ``STATE_LIST_MAX``) a digest of them."""
        if len(self.submodels) <= STATE_LIST_MAX:
            return [str(s) for s in self.submodels]
        return f"{len(self.submodels)} sub-models, {sequence_digest(self.submodels)}"

    def __getstate__(self) -> dict[str, Any]:
        """Pickled / deep-copied without the nest it was built from (a nest holds the live model and cannot be
        pickled): its sub-model list instead; draws are the same. Loading a ``weights="cost"`` state into the
        copy needs a sampler built from the nest again."""
        state = dict(self.__dict__)
        src = state["_source"]
        if hasattr(src, "submodels") and not isinstance(src, (list, tuple)):
            state["_source"] = src.submodels
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a configuration saved by :meth:`state_dict` (the sub-model list must match).

        >>> import torch.nn as nn, sortednet as sn
        >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 4, 8], out="0", inp="1"))
        >>> a = sn.Sampler(nest.submodels, k=2, seed=5)
        >>> b = sn.Sampler(nest.submodels, k=1, seed=0)
        >>> b.load_state_dict(a.state_dict())
        >>> b.draw(3) == a.draw(3)
        True
        """
        if not isinstance(state, Mapping):
            raise SortedNetError(f"load_state_dict takes what Sampler.state_dict() returned, got "
                                 f"{type(state).__name__}")
        missing = {"strategy", "k", "seed", "weights", "submodels"} - set(state)
        if missing:
            raise SortedNetError(f"sampler state lacks {sorted(missing)}")
        mine, theirs = self._listing(), state["submodels"]
        if isinstance(mine, str) or isinstance(theirs, str):
            if theirs != mine:
                raise SortedNetError(f"sampler state is for {str(theirs)[:80]}; this sampler has {str(mine)[:80]}")
        elif isinstance(theirs, (bytes, Mapping)) or not isinstance(theirs, Sequence):
            raise SortedNetError(f"sampler state: 'submodels' must be the list or digest state_dict() wrote, got "
                                 f"{type(theirs).__name__}")
        elif list(theirs) != mine and not _same_listing(list(theirs), self.submodels):
            raise SortedNetError(f"sampler state is for {len(theirs)} sub-models "
                                 f"{list(theirs)[:4]}..., this sampler has {len(mine)} {mine[:4]}...")
        try:  # (options an earlier version saved that change no draw: checked as then, then left out)
            _check_index(state.get("small_first", 0), "small_first")
            if state.get("weights") is not None:
                probs = self._probabilities(state["weights"], self.submodels, self._source if hasattr(
                    self._source, "cost") else None)
                k = state.get("k")
                if state.get("strategy") == "weighted" and isinstance(k, int) and np.count_nonzero(probs) < k:
                    raise SortedNetError(f"only {int(np.count_nonzero(probs))} sub-model(s) have a positive weight; "
                                         f"cannot draw k={k} distinct ones")
        except SortedNetError as e:
            hint = (" (build the sampler to load into from the nest, sn.Sampler(nest, ...), not from "
                    "nest.submodels)" if "needs the nest" in str(e) else "")
            raise SortedNetError(f"cannot load sampler state: {e}{hint}") from None
        state = without_no_op_options(state, len(self.submodels))
        try:
            other = Sampler(self._source, k=None if state["strategy"] == "all" else state["k"],
                            strategy=state["strategy"], seed=state["seed"], weights=state["weights"],
                            loss_weights=state.get("loss_weights"), small_first=state.get("small_first", 0))
        except SortedNetError as e:
            hint = (" (build the sampler to load into from the nest, sn.Sampler(nest, ...), not from "
                    "nest.submodels)" if "needs the nest" in str(e) else "")
            raise SortedNetError(f"cannot load sampler state: {e}{hint}") from None
        self.__dict__.update(other.__dict__)

    def __repr__(self) -> str:
        w = "" if self.weights is None else f", weights={self.weights if isinstance(self.weights, str) else '[...]'!r}"
        if self.loss_weights is not None:
            lw = self.loss_weights
            w += f", loss_weights={lw if isinstance(lw, str) else '[...]'!r}"
        if self.small_first:
            w += f", small_first={self.small_first}"
        return (f"Sampler({len(self.submodels)} sub-models, k={self.k}, strategy={self.strategy!r}, "
                f"seed={self.seed}{w})")


def _same_listing(names: list[Any], subs: Sequence[Any]) -> bool:
    """Whether sub-model names a state lists (``"h2=16,h1=8"``) are ``subs`` in order, whatever order each
    one's dimensions were written in (the same sub-models built with their keys in another order)."""
    if len(names) != len(subs):
        return False
    try:
        for name, sub in zip(names, subs):
            parts = dict(p.split("=", 1) for p in str(name).split(",")) if name else {}
            if {k: int(v) for k, v in parts.items()} != dict(sub.items()):
                return False
    except (ValueError, TypeError, AttributeError):  # (no such name: another listing)
        return False
    return True

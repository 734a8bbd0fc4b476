"""Profiles: the measured cost (and optional score) of every sub-model.

:func:`build_profile` measures a nest (``Nest.profile``) on a private
eval-mode view of its model; :class:`Profile` holds the table, finds the
Pareto front, prints it as markdown and plots it; :func:`pareto_front` is the
front of any table.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from .cost import METRICS, as_inputs, example_signature, measure_latency, measure_memory, sig_key, timing_counts
from .errors import SortedNetError
from .modes import eval_mode
from .submodel import SubModel

if TYPE_CHECKING:
    from .nest import Nest

__all__ = ["Profile", "pareto_front", "build_profile"]

_UNITS = {"params": "", "flops": "", "latency": "s", "memory": "B"}


def _number(v: Any, what: str) -> float:
    """``v`` as a float: a real number (Python, NumPy or a one-element tensor), not NaN, not a bool or a string."""
    if not _real(v) and not (isinstance(v, Tensor) and v.numel() == 1 and not v.is_complex()
                             and v.dtype is not torch.bool):
        raise SortedNetError(f"a {what} must be a real number, got {v!r}")
    f = float(v)
    if f != f:
        raise SortedNetError(f"a {what} is NaN")
    return f


def pareto_front(costs: Sequence[Sequence[float]], scores: Sequence[float], *, keep: str = "first") -> list[int]:
    """Indices of points not dominated: no other point costs ≤ on every axis and
    scores ≥, with at least one strict. ``costs[i]`` is a tuple (one entry per metric).
    Returned in input order; of exact duplicates only the first is kept (``keep="last"``: the last, as
    ``pick`` does without scores, where the later of equal sub-models is the larger in the nest's order).

    >>> pareto_front([(1,), (2,), (3,), (2,)], [0.5, 0.4, 0.9, 0.7])
    [0, 2, 3]
    >>> pareto_front([(1,), (1,)], [2, 2]), pareto_front([(1,), (1,)], [2, 2], keep="last")
    ([0], [1])
    """
    if keep not in ("first", "last"):
        raise SortedNetError(f"pareto_front(keep=...) takes 'first' or 'last', got {keep!r}")
    if len(costs) != len(scores):
        raise SortedNetError(f"pareto_front: {len(costs)} cost rows but {len(scores)} scores")
    pts = [(tuple(_number(x, "cost") for x in c), _number(s, "score")) for c, s in zip(costs, scores)]
    if len({len(c) for c, _ in pts}) > 1:
        raise SortedNetError(f"pareto_front: cost rows of different lengths {sorted({len(c) for c, _ in pts})}")
    # a point can only be dominated by one sorted before it (cost tuple ascending, score descending),
    # and if so also by a point already on the front: one pass, O(N * front)
    last = keep == "last"
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], -pts[i][1], -i if last else i))
    front: list[int] = []
    if all(len(c) == 1 for c, _ in pts):  # one cost axis: a sweep keeping the best score so far
        best = None
        for i in order:
            if best is None or pts[i][1] > best:
                front.append(i)
                best = pts[i][1]
        return sorted(front)
    for i in order:
        ci, si = pts[i]
        if not any(pts[j][1] >= si and all(a <= b for a, b in zip(pts[j][0], ci)) for j in front):
            front.append(i)
    return sorted(front)


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fmt(x: float, unit: str = "") -> str:
    """``x`` with an SI prefix (``1.2M``); with a unit, spaced: ``850 µs``, ``1.44 ms``, ``2.5 s``."""
    sep = " " if unit else ""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}{sep}{unit}"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""), (1e-3, "m")):
        if abs(x) >= scale:
            return f"{x / scale:.{4 if scale == 1 else 3}g}{sep}{prefix}{unit}"
    return f"{x * 1e6:.3g}{sep}µ{unit}"


class _ReadOnly(dict):
    """A dict that refuses changes: a :class:`Profile`'s ``costs`` and ``meta`` (the profile a nest keeps is
    the one ``nest.profile()`` returned; changing it would change what ``sn.save`` writes but not what ``pick``
    reads). A copy or a pickle of it is a plain dict: the user's own."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a Profile is read-only (the nest keeps this one): build a changed copy with "
                        "dataclasses.replace(profile, costs={...}) or Profile.from_dict(...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore

    def __reduce__(self) -> tuple:  # (a copy or a pickle is the user's own: a plain dict)
        return dict, (dict(self),)


class _ReadOnlyList(list):
    """A list that refuses changes (a :class:`Profile`'s meta values): equal to the list it holds."""

    _refuse = _ReadOnly._refuse
    __setitem__ = __delitem__ = append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __iadd__ = __imul__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        return list, (list(self),)


def _frozen(v: Any, where: str) -> Any:
    """``v`` (a JSON value: str, number, bool, None, list, dict with str keys) with lists and dicts read-only
    (a tuple becomes such a list, as JSON reads it back); anything else is refused (``sn.save`` writes the
    profile as JSON)."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise SortedNetError(f"Profile: {where} is {v!r}; profile meta holds finite numbers (saved as JSON)")
        return v
    if isinstance(v, (list, tuple)):
        return _ReadOnlyList(_frozen(x, f"{where}[{i}]") for i, x in enumerate(v))
    if isinstance(v, Mapping):
        bad = next((k for k in v if not isinstance(k, str)), None)
        if bad is not None:
            raise SortedNetError(f"Profile: {where} has the key {bad!r}; profile meta keys are strings (JSON)")
        return _ReadOnly({k: _frozen(x, f"{where}[{k!r}]") for k, x in v.items()})
    raise SortedNetError(f"Profile: {where} is a {type(v).__name__}; profile meta holds JSON values only (str, "
                         "int, float, bool, None, lists, dicts), as sn.save writes it")


def _thawed(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_thawed(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _thawed(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class Profile:
    """Measured cost (and optional score) of every sub-model. Made by :meth:`Nest.profile`;
    saved by ``sn.save`` and restored by ``sn.load``. Read-only, ``costs`` and ``meta`` included (the nest
    keeps the profile it returned): ``dataclasses.replace`` makes a changed copy.

    >>> import sortednet as sn
    >>> subs = tuple(sn.SubModel(h=h) for h in (2, 4, 8))
    >>> p = sn.Profile(subs, {"params": (10.0, 20.0, 40.0)}, scores=(0.5, 0.8, 0.8))
    >>> [str(s) for s in p.front("params")]
    ['h=2', 'h=4']
    >>> sn.Profile.from_dict(p.to_dict()) == p
    True
    """

    submodels: tuple[SubModel, ...]
    costs: dict[str, tuple[float, ...]]
    scores: tuple[float, ...] | None = None
    device: str = "cpu"
    meta: dict[str, Any] = field(default_factory=dict)

    __hash__ = None  # type: ignore[assignment]  # (it holds dicts: compared with ==, never hashed, like a dict)

    def __post_init__(self) -> None:
        if isinstance(self.submodels, (str, bytes, Mapping)) or not isinstance(self.submodels, Iterable):
            raise SortedNetError(f"Profile: submodels must be a sequence of sub-models, got "
                                 f"{type(self.submodels).__name__}")
        object.__setattr__(self, "submodels", tuple(SubModel.of(s, "Profile") for s in self.submodels))
        if not isinstance(self.costs, Mapping):
            raise SortedNetError(f"Profile: costs must be a mapping {{metric: one value per sub-model}}, got "
                                 f"{type(self.costs).__name__}")
        n, costs = len(self.submodels), {}
        for metric, values in self.costs.items():
            if metric not in METRICS:
                raise SortedNetError(f"Profile: unknown metric {metric!r}; known: {list(METRICS)}")
            if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
                raise SortedNetError(f"Profile: {metric!r} must be a sequence, one value per sub-model, got "
                                     f"{type(values).__name__}")
            values = costs[metric] = tuple(values)
            if len(values) != n:
                raise SortedNetError(f"Profile: {metric!r} has {len(values)} values for {n} sub-models")
            for sub, v in zip(self.submodels, values):
                if not _real(v) or not 0 <= v < math.inf:
                    raise SortedNetError(f"Profile: {metric!r} of {sub} is {v!r}; costs are finite numbers >= 0")
        object.__setattr__(self, "costs", _ReadOnly(costs))
        if self.scores is not None:
            if isinstance(self.scores, (str, bytes, Mapping)) or not isinstance(self.scores, Iterable):
                raise SortedNetError(f"Profile: scores must be a sequence, one per sub-model, got "
                                     f"{type(self.scores).__name__}")
            object.__setattr__(self, "scores", tuple(self.scores))
            if len(self.scores) != n:
                raise SortedNetError(f"Profile: {len(self.scores)} scores for {n} sub-models")
            for sub, v in zip(self.submodels, self.scores):
                if not _real(v) or not -math.inf < v < math.inf:
                    raise SortedNetError(f"Profile: the score of {sub} is {v!r}; scores are finite numbers")
        pos = {s: i for i, s in enumerate(self.submodels)}
        if len(pos) < n:
            twice = next(s for s in self.submodels if self.submodels.count(s) > 1)
            raise SortedNetError(f"Profile: {twice} is listed twice (one row per sub-model)")
        if len({tuple(s) for s in self.submodels}) > 1:
            raise SortedNetError(f"Profile: the sub-models name different dimensions "
                                 f"{sorted({tuple(s) for s in self.submodels})[:3]}")
        if not isinstance(self.meta, Mapping):
            raise SortedNetError(f"Profile: meta must be a mapping, got {type(self.meta).__name__}")
        object.__setattr__(self, "meta", _frozen(self.meta, "meta"))
        out = self.meta.get("not_exportable")
        if out is not None:  # (the front leaves them out: names of profiled sub-models)
            names = {str(s) for s in self.submodels}
            if not isinstance(out, list) or not all(isinstance(x, str) and x in names for x in out):
                raise SortedNetError(f"Profile: meta['not_exportable'] must list profiled sub-models by name (as "
                                     f"str(sub) writes them); got {str(out)[:200]}")
        object.__setattr__(self, "_pos", pos)

    def index(self, sub: SubModel | Mapping[str, int] | str) -> int:
        """Position of ``sub`` (a :class:`SubModel`, a dict or its text) in :attr:`submodels`."""
        sub = SubModel.of(sub, "Profile.index")
        i = self._pos.get(sub)
        if i is None:
            names = list(self.submodels[0]) if self.submodels else []
            if set(sub) < set(names):  # (a profile knows no dimension's full size: nest.resolve fills them in)
                raise SortedNetError(f"sub-model {sub} names {len(sub)} of the profile's dimensions {names}: a "
                                     "profile looks up whole sub-models (nest.resolve(...) fills in the rest)")
            raise SortedNetError(f"sub-model {sub} is not in this profile")
        return i

    def cost(self, sub: SubModel | Mapping[str, int] | str, metric: str = "params") -> float:
        """The recorded ``metric`` of ``sub`` (a :class:`SubModel`, a dict or its text)."""
        if metric not in self.costs:
            raise SortedNetError(f"this profile has no {metric!r}; it has {sorted(self.costs)}")
        return self.costs[metric][self.index(sub)]

    def front(self, metric: str = "params") -> tuple[SubModel, ...]:
        """Sub-models on the Pareto front of (``metric``, score), cheapest first.
        Without scores the parameter count stands in for the score. Of sub-models equal in both, the one
        ``nest.pick`` returns is kept: the earlier with scores, the later (the larger in the nest's order,
        e.g. the higher LoRA rank of equal size) without. Sub-models listed in ``meta["not_exportable"]`` (a
        tied tensor cut two ways), which ``pick`` passes over, are left out."""
        if metric not in self.costs:
            raise SortedNetError(f"this profile has no {metric!r}; it has {sorted(self.costs)}")
        scores = self.scores if self.scores is not None else self.costs.get("params")
        if scores is None:
            raise SortedNetError("a Pareto front needs scores or a 'params' column")
        out = set(self.meta.get("not_exportable") or ())  # (pick passes over them)
        rows = [i for i, s in enumerate(self.submodels) if str(s) not in out]
        idx = pareto_front([(self.costs[metric][i],) for i in rows], [scores[i] for i in rows],
                           keep="first" if self.scores is not None else "last")
        return tuple(self.submodels[rows[i]] for i in sorted(idx, key=lambda i: self.costs[metric][rows[i]]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; :meth:`from_dict` rebuilds an equal profile."""
        return {"submodels": [s.to_dict() for s in self.submodels],
                "costs": {k: list(v) for k, v in self.costs.items()},
                "scores": None if self.scores is None else list(self.scores),
                "device": self.device, "meta": _thawed(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        """Inverse of :meth:`to_dict`. A key it does not know is refused (a misspelt ``"score"`` would drop the
        scores in silence)."""
        if not isinstance(d, Mapping):
            raise SortedNetError(f"not a Profile dictionary: a {type(d).__name__}")
        unknown = sorted(map(str, set(d) - {"submodels", "costs", "scores", "device", "meta"}))
        if unknown:
            raise SortedNetError(f"not a Profile dictionary: unknown keys {unknown} (a profile has submodels, costs, "
                                 "scores, device and meta)")
        try:
            return cls(tuple(SubModel(s) for s in d["submodels"]),
                       {k: tuple(float(x) for x in v) for k, v in d["costs"].items()},
                       None if d.get("scores") is None else tuple(float(x) for x in d["scores"]),
                       d.get("device", "cpu"), dict(d.get("meta") or {}))
        except SortedNetError as e:
            raise SortedNetError(f"not a Profile dictionary: {e}") from None
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise SortedNetError(f"not a Profile dictionary: {e!r}") from None

    def to_markdown(self, metric: str = "params") -> str:
        """A markdown table, one row per sub-model; ``*`` marks the Pareto front of (``metric``, score)."""
        if metric not in self.costs:  # (a table with no front marked would read as "nothing is on it")
            raise SortedNetError(f"this profile has no {metric!r}; it has {sorted(self.costs)}")
        on_front = set(self.front(metric))
        metrics = [m for m in METRICS if m in self.costs]
        head = ["sub-model", *(f"{m}" + (f" ({_UNITS[m]})" if _UNITS[m] and m != "latency" else "")
                               for m in metrics)]
        if self.scores is not None:
            head.append("score")
        head.append("front")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, s in enumerate(self.submodels):
            row = [f"`{s}`", *(_fmt(self.costs[m][i], "s" if m == "latency" else "") for m in metrics)]
            if self.scores is not None:
                row.append(f"{self.scores[i]:.4g}")
            row.append("*" if s in on_front else "")
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str, metric: str = "params") -> None:
        """Save a scatter of score (or params) against ``metric``, front highlighted (needs matplotlib).

        Draws on its own ``Figure`` with the Agg canvas: pyplot, its global state and
        the process's matplotlib backend are left alone."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if metric not in self.costs:
            raise SortedNetError(f"this profile has no {metric!r}; it has {sorted(self.costs)}")
        ys = self.scores if self.scores is not None else self.costs["params"]
        xs = self.costs[metric]
        front = self.front(metric)
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.scatter(xs, ys, s=14, c="0.6", label="sub-models")
        fx = [self.cost(s, metric) for s in front]
        fy = [ys[self.index(s)] for s in front]
        ax.plot(fx, fy, "o-", c="C3", label="Pareto front")
        ax.set_xlabel(metric + (f" ({_UNITS[metric]})" if _UNITS[metric] else ""))
        ax.set_ylabel("score" if self.scores is not None else "params")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)


def _deployed(nest: Nest, sub: SubModel) -> Any:
    """``sub`` exported as it would be deployed, in eval mode (plain where the model's own class cannot hold
    it); None where it cannot be exported at all (a tied tensor cut two ways: ``pick`` never returns it)."""
    for plain in (False, True):
        try:
            return nest.export(sub, plain=plain).eval()
        except SortedNetError:
            continue
    return None


def build_profile(nest: Nest, example: Any, *, score: Callable[[SubModel], float] | None,
                  metrics: Sequence[str], repeat: int, warmup: int, progress: bool, on: str = "live") -> Profile:
    """Measure ``metrics`` (and ``score``) for every sub-model of ``nest``; see :meth:`Nest.profile`."""
    if on not in ("live", "export"):
        raise SortedNetError(f"profile(on=...) takes 'live' (time the wrapped model under use(sub)) or 'export' "
                             f"(time each nest.export(sub)), got {on!r}")
    if isinstance(metrics, str):  # one metric by name
        metrics = (metrics,)
    names = tuple(metrics) if isinstance(metrics, Iterable) and not isinstance(metrics, (bytes, Mapping)) else None
    if names is None or not all(isinstance(m, str) for m in names):
        raise SortedNetError(f"profile(metrics=...) takes metric names (a str, or a list / tuple / set of them) out "
                             f"of {list(METRICS)}, got {metrics!r}")
    metrics = tuple(dict.fromkeys(("params", *map(str, names))))
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise SortedNetError(f"unknown metric(s) {bad}; known: {list(METRICS)}")
    repeat, warmup = timing_counts(repeat, warmup)
    from tqdm.auto import tqdm

    cols: dict[str, list[float]] = {m: [] for m in metrics}
    scores: list[float] = []
    ok = nest._exportable()  # (a tied tensor cut two ways: pick passes over those, the front leaves them out)
    unexportable = set() if ok is None else {str(s) for s in nest.submodels if not ok(dict(s))}
    live_only: list[str] = []
    with eval_mode(nest, own_buffers=True) as (view, _):  # measured in eval mode on a private view, with buffers
        for sub in tqdm(nest.submodels, desc="profiling",  # of its own: no thread sees a mode change, and a
                        disable=not progress, leave=False):  # forward writing a buffer (a counter) writes its own
            cols["params"].append(float(nest.cost(sub, "params")))
            if "flops" in metrics:
                cols["flops"].append(float(nest._flops(sub, example, model=view, store=False, own_buffers=True)))
            timed = view
            if on == "export" and ("latency" in metrics or "memory" in metrics) and str(sub) not in unexportable:
                timed = _deployed(nest, sub)
                if timed is None:  # (an export that fails otherwise, even plain: measured live, and said so)
                    live_only.append(str(sub))
                    timed = view
            if "latency" in metrics:
                cols["latency"].append(measure_latency(nest, sub, example, repeat=repeat, warmup=warmup, model=timed))
            if "memory" in metrics:
                cols["memory"].append(float(measure_memory(nest, sub, example, model=timed)))
            del timed
            if score is not None:
                with nest.use(sub):
                    try:
                        value = float(score(sub))
                    except SortedNetError:
                        raise
                    except Exception as e:  # the user's score function: named as such, not as the example's fault
                        raise SortedNetError(f"score({sub}) raised {type(e).__name__}: {str(e)[:500]}") from e
                if not math.isfinite(value):
                    raise SortedNetError(f"score({sub}) returned {value}; scores must be finite numbers")
                scores.append(value)
    device = next((str(t.device) for t in tree_leaves(as_inputs(example)) if isinstance(t, Tensor)), "cpu")
    return Profile(tuple(nest.submodels), {m: tuple(v) for m, v in cols.items()},
                   tuple(scores) if score is not None else None, device,
                   {"repeat": repeat, "warmup": warmup, "input": [list(s) if isinstance(s, tuple) else s
                                                                  for s in sig_key(example_signature(example))],
                    "on": on,
                    **({"not_exportable": [str(s) for s in nest.submodels if str(s) in unexportable]}
                       if unexportable else {}),
                    **({"measured_live": live_only} if live_only else {})})

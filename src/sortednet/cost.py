"""Costs of sub-models and measured profiles.

``params`` is exact and cheap (counted once per size combination of the
dimensions each tensor depends on); ``flops`` is counted on an example input
with the formulas of :mod:`torch.utils.flop_counter`; ``latency`` (median
seconds of a forward) and ``memory`` (bytes: active weights plus the peak of
tensors created by the forward) are measured. :class:`Profile` holds them for
every sub-model with an optional score, finds the Pareto front and prints or
plots it.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves
from torch.utils.flop_counter import flop_registry

from .errors import SortedNetError
from .modes import eval_mode
from .submodel import SubModel

__all__ = ["METRICS", "Profile", "pareto_front", "ParamCounter", "count_flops", "measure_latency",
           "measure_memory", "call_model"]

METRICS = ("params", "flops", "latency", "memory")
_UNITS = {"params": "", "flops": "", "latency": "s", "memory": "B"}


def call_model(model: nn.Module | Callable, example: Any) -> Any:
    """``model(*example)`` for a tuple/list, ``model(**example)`` for a dict, else ``model(example)``."""
    if isinstance(example, (tuple, list)):
        return model(*example)
    if isinstance(example, dict):
        return model(**example)
    return model(example)


class ParamCounter:
    """Exact active parameter count of any sub-model of a nest, fast for many sub-models.

    Each parameter's count depends only on the dimensions that slice its module
    and on the Depth dimensions of the blocks holding it. Parameters are grouped
    by those dimensions and each group's total is computed once per size
    combination of its own dimensions (memoised), so 10,000 sub-models of 4
    independent widths cost a few dozen module walks, not 10,000.
    """

    def __init__(self, nest: Any) -> None:
        self.nest = nest
        names = [d.name for d in nest.dims]
        deps: dict[int, set[str]] = {}
        for m in nest._sliced.values():
            for name in m._sn.slicer.attr_names(m, m._sn.bind):
                t = m._sn.slicer.tensor(m, name)
                if isinstance(t, Tensor):
                    deps.setdefault(id(t), set()).update(b.dim.name for b in m._sn.bind.values())
        for m in nest._depth:
            for blk in m._modules.values():
                for p in blk.parameters():
                    deps.setdefault(id(p), set()).add(m._sn.bind["depth"].dim.name)
        groups: dict[tuple[str, ...], list[nn.Parameter]] = {}
        self.fixed = 0
        for p in nest.model.parameters():
            key = tuple(n for n in names if n in deps.get(id(p), ()))
            if key:
                groups.setdefault(key, []).append(p)
            else:
                self.fixed += p.numel()
        self.groups = groups
        self._memo: dict[tuple[tuple[str, ...], tuple[int, ...]], int] = {}

    def __call__(self, sub: SubModel) -> int:
        total = self.fixed
        for key, params in self.groups.items():
            sizes = tuple(sub[n] for n in key)
            hit = self._memo.get((key, sizes))
            if hit is None:
                # counted under the whole (listed) sub-model: a partial one could be outside a restricted nest
                hit = self._memo[(key, sizes)] = self._count(params, sub)
            total += hit
        return total

    def _count(self, params: list[nn.Parameter], sub: SubModel | dict[str, int]) -> int:
        """Active elements of ``params`` under ``sub`` (a listed sub-model, or during wrap any sizes)."""
        nest = self.nest
        with nest.use(sub), torch.no_grad():
            skipped = {id(p) for m in nest._depth for blk in m._sn.slicer.inactive(m) for p in blk.parameters()}
            total = 0
            for p in params:
                if id(p) in skipped:
                    continue
                owner = nest._tensor_owner.get(id(p))
                total += owner[0]._sn.slicer.numel(*owner) if owner else p.numel()
        return total


class _NoFastPath(TorchFunctionMode):
    """A pass-through torch-function mode. PyTorch's fused attention / encoder
    fast paths step aside while any such mode is active (``has_torch_function``),
    and modes are per thread: unlike ``torch.backends.mha.set_fastpath_enabled``,
    no other thread is affected."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return func(*args, **(kwargs or {}))


class _CountFlops(TorchDispatchMode):
    """FLOPs of this thread's operators, with :mod:`torch.utils.flop_counter`'s formulas.

    ``FlopCounterMode`` also tracks modules through process-wide module hooks
    (which fire in every thread); a total needs none of that.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        count = flop_registry.get(func._overloadpacket)
        if count is None and func is not torch.ops.prim.device.default:
            with self:  # composite operators: count what they decompose into
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def count_flops(nest: Any, sub: SubModel, example: Any, *, model: nn.Module | None = None) -> int:
    """Floating-point operations of one forward of ``sub`` on ``example`` (no grad),
    on ``model`` (default ``nest.model``).

    PyTorch's fused attention / encoder fast paths step aside while counting
    (the counter cannot see inside them, and they would make a full-size layer
    look cheaper than a sliced one), for this call and thread only.

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
    >>> count_flops(nest, sn.SubModel(h=2), torch.randn(1, 4))
    24
    """
    counter = _CountFlops()
    with nest.use(sub), torch.no_grad(), _NoFastPath(), counter:
        call_model(nest.model if model is None else model, example)
    return int(counter.total)


def _sync(example: Any) -> None:
    for t in tree_leaves(example):
        if isinstance(t, Tensor) and t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
            return


def measure_latency(nest: Any, sub: SubModel, example: Any, *, repeat: int = 20, warmup: int = 3,
                    model: nn.Module | None = None) -> float:
    """Median wall-clock seconds of one forward of ``sub`` on ``example`` (after ``warmup`` runs)
    on ``model`` (default ``nest.model``)."""
    model = nest.model if model is None else model
    times = []
    with nest.use(sub), torch.no_grad():
        for i in range(warmup + repeat):
            _sync(example)
            t0 = time.perf_counter()
            call_model(model, example)
            _sync(example)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _PeakBytes(TorchDispatchMode):
    """Tracks the bytes of storages created by ops while it is active (peak of live bytes)."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.existing, self.live, self.current, self.peak = existing, {}, 0, 0

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in self.existing or key == 0:
                continue
            if key in self.live:
                self.live[key][1] += 1
            else:
                self.live[key] = [st.nbytes(), 1]
                self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._drop, key)
        return out


def measure_memory(nest: Any, sub: SubModel, example: Any, *, model: nn.Module | None = None) -> int:
    """Bytes ``sub`` needs for one forward on ``example``: its active weights
    plus the peak of tensors the forward creates (inputs excluded), on ``model`` (default ``nest.model``)."""
    model = nest.model if model is None else model
    with nest.use(sub), torch.no_grad():
        ps = list(model.parameters())
        elem = ps[0].element_size() if ps else 4
        weights = nest.cost(sub, "params") * elem
        existing = {t.untyped_storage().data_ptr() for t in itertools.chain(
            model.parameters(), model.buffers(), tree_leaves(example)) if isinstance(t, Tensor)}
        mode = _PeakBytes(existing)
        with mode:
            out = call_model(model, example)
        del out
    return int(weights + mode.peak)


def pareto_front(costs: Sequence[Sequence[float]], scores: Sequence[float]) -> list[int]:
    """Indices of points not dominated: no other point costs ≤ on every axis and
    scores ≥, with at least one strict. ``costs[i]`` is a tuple (one entry per metric).
    Returned in input order; of exact duplicates only the first is kept.

    >>> pareto_front([(1,), (2,), (3,), (2,)], [0.5, 0.4, 0.9, 0.7])
    [0, 2, 3]
    """
    if len(costs) != len(scores):
        raise SortedNetError(f"pareto_front: {len(costs)} cost rows but {len(scores)} scores")
    pts = [(tuple(float(x) for x in c), float(s)) for c, s in zip(costs, scores)]
    # a point can only be dominated by one sorted before it (cost tuple ascending, score descending),
    # and if so also by a point already on the front: one pass, O(N * front)
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], -pts[i][1], i))
    front: list[int] = []
    if all(len(c) == 1 for c, _ in pts):  # one cost axis: a sweep keeping the best score so far
        best = -math.inf
        for i in order:
            if pts[i][1] > best:
                front.append(i)
                best = pts[i][1]
        return sorted(front)
    for i in order:
        ci, si = pts[i]
        if not any(pts[j][1] >= si and all(a <= b for a, b in zip(pts[j][0], ci)) for j in front):
            front.append(i)
    return sorted(front)


def _fmt(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    ax = abs(x)
    if ax >= 1e9:
        return f"{x / 1e9:.3g}G"
    if ax >= 1e6:
        return f"{x / 1e6:.3g}M"
    if ax >= 1e3:
        return f"{x / 1e3:.3g}k"
    if ax < 1e-3:
        return f"{x * 1e6:.3g}µ"
    if ax < 1:
        return f"{x * 1e3:.3g}m"
    return f"{x:.4g}"


@dataclass(frozen=True)
class Profile:
    """Measured cost (and optional score) of every sub-model. Made by :meth:`Nest.profile`;
    saved by ``sn.save`` and restored by ``sn.load``.

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

    def __post_init__(self) -> None:
        n = len(self.submodels)
        for metric, values in self.costs.items():
            if metric not in METRICS:
                raise SortedNetError(f"Profile: unknown metric {metric!r}; known: {list(METRICS)}")
            if len(values) != n:
                raise SortedNetError(f"Profile: {metric!r} has {len(values)} values for {n} sub-models")
        if self.scores is not None and len(self.scores) != n:
            raise SortedNetError(f"Profile: {len(self.scores)} scores for {n} sub-models")
        object.__setattr__(self, "_pos", {s: i for i, s in enumerate(self.submodels)})

    def index(self, sub: SubModel) -> int:
        """Position of ``sub`` in :attr:`submodels`."""
        i = self._pos.get(sub)
        if i is None:
            raise SortedNetError(f"sub-model {sub} is not in this profile")
        return i

    def cost(self, sub: SubModel, metric: str = "params") -> float:
        """The recorded ``metric`` of ``sub``."""
        if metric not in self.costs:
            raise SortedNetError(f"this profile has no {metric!r}; it has {sorted(self.costs)}")
        return self.costs[metric][self.index(sub)]

    def front(self, metric: str = "params") -> tuple[SubModel, ...]:
        """Sub-models on the Pareto front of (``metric``, score), cheapest first.
        Without scores the parameter count stands in for the score."""
        if metric not in self.costs:
            raise SortedNetError(f"this profile has no {metric!r}; it has {sorted(self.costs)}")
        scores = self.scores if self.scores is not None else self.costs.get("params")
        if scores is None:
            raise SortedNetError("a Pareto front needs scores or a 'params' column")
        idx = pareto_front([(c,) for c in self.costs[metric]], scores)
        return tuple(self.submodels[i] for i in sorted(idx, key=lambda i: self.costs[metric][i]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; :meth:`from_dict` rebuilds an equal profile."""
        return {"submodels": [s.to_dict() for s in self.submodels],
                "costs": {k: list(v) for k, v in self.costs.items()},
                "scores": None if self.scores is None else list(self.scores),
                "device": self.device, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(tuple(SubModel(s) for s in d["submodels"]),
                       {k: tuple(float(x) for x in v) for k, v in d["costs"].items()},
                       None if d.get("scores") is None else tuple(float(x) for x in d["scores"]),
                       d.get("device", "cpu"), dict(d.get("meta") or {}))
        except (KeyError, TypeError, AttributeError) as e:
            raise SortedNetError(f"not a Profile dictionary: {e!r}") from None

    def to_markdown(self, metric: str = "params") -> str:
        """A markdown table, one row per sub-model; ``*`` marks the Pareto front of (``metric``, score)."""
        on_front = set(self.front(metric)) if metric in self.costs else set()
        metrics = [m for m in METRICS if m in self.costs]
        head = ["sub-model", *(f"{m}" + (f" ({_UNITS[m]})" if _UNITS[m] else "") for m in metrics)]
        if self.scores is not None:
            head.append("score")
        head.append("front")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, s in enumerate(self.submodels):
            row = [f"`{s}`", *(_fmt(self.costs[m][i]) for m in metrics)]
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


def example_signature(example: Any) -> tuple:
    """Structure (tuple / dict keys), shapes, dtypes and devices of the tensors and the other values
    in ``example`` (FLOPs are cached per signature).

    >>> import torch
    >>> example_signature({"x": torch.zeros(2, 3)}) == example_signature({"y": torch.zeros(2, 3)})
    False
    """
    leaves, spec = tree_flatten(example)
    return (str(spec), *((tuple(t.shape), str(t.dtype), str(t.device)) if isinstance(t, Tensor) else repr(t)
                         for t in leaves))


def build_profile(nest: Any, example: Any, *, score: Callable[[SubModel], float] | None,
                  metrics: Sequence[str], repeat: int, warmup: int, progress: bool) -> Profile:
    """Measure ``metrics`` (and ``score``) for every sub-model of ``nest``; see :meth:`Nest.profile`."""
    metrics = tuple(dict.fromkeys(("params", *metrics)))
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise SortedNetError(f"unknown metric(s) {bad}; known: {list(METRICS)}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1 or warmup < 0:
        raise SortedNetError(f"repeat must be an int >= 1 and warmup >= 0, got repeat={repeat!r}, warmup={warmup!r}")
    from tqdm.auto import tqdm

    cols: dict[str, list[float]] = {m: [] for m in metrics}
    scores: list[float] = []
    with eval_mode(nest) as (view, _):  # measured in eval mode on a private view: no thread sees a mode change
        for sub in tqdm(nest.submodels, desc="profiling", disable=not progress, leave=False):
            cols["params"].append(float(nest.cost(sub, "params")))
            if "flops" in metrics:
                cols["flops"].append(float(nest._flops(sub, example, model=view)))
            if "latency" in metrics:
                cols["latency"].append(measure_latency(nest, sub, example, repeat=repeat, warmup=warmup, model=view))
            if "memory" in metrics:
                cols["memory"].append(float(measure_memory(nest, sub, example, model=view)))
            if score is not None:
                with nest.use(sub):
                    value = float(score(sub))
                if value != value:
                    raise SortedNetError(f"score({sub}) returned NaN")
                scores.append(value)
    device = next((str(t.device) for t in tree_leaves(example) if isinstance(t, Tensor)), "cpu")
    return Profile(tuple(nest.submodels), {m: tuple(v) for m, v in cols.items()},
                   tuple(scores) if score is not None else None, device,
                   {"repeat": repeat, "warmup": warmup, "input": [list(map(str, s)) if isinstance(s, tuple) else s
                                                                  for s in example_signature(example)]})

"""Nest: the wrapped model plus its dimensions.

Lists sub-models sorted by cost, activates one (per thread with ``use``,
nest-wide with ``activate``), counts costs, picks by budget, exports a
physically smaller plain model, and unwraps.
"""

from __future__ import annotations

import bisect
import copy
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .cost import METRICS, ParamCounter, Profile
from .dims import Dimension
from .errors import SortedNetError
from .select import Selector
from .submodel import SubModel, SubModelLike

__all__ = ["Nest"]


class Nest:
    """A model holding nested sub-models that share its weights. Build with :func:`sortednet.wrap`.

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="0", inp="2"))
    >>> nest.smallest, nest.cost(nest.smallest, "params")
    (SubModel(h=4), 30)
    >>> small = nest.export("h=4")          # plain nn.Sequential, physically smaller
    >>> small[0].weight.shape
    torch.Size([4, 4])
    """

    model: nn.Module
    dims: tuple[Dimension, ...]
    submodels: tuple[SubModel, ...]

    # -- construction (called by wrap) -------------------------------------
    def _prepare(self, model: nn.Module, dims: Sequence[Dimension],
                 submodels: Iterable[SubModelLike] | None) -> None:
        self.model, self.dims = model, tuple(dims)
        self._by_name = {d.name: d for d in self.dims}
        self._alive = True
        if submodels is None:
            subs = [SubModel(dict(zip(self._by_name, sizes)))
                    for sizes in itertools.product(*(d.sizes for d in self.dims))]
        else:
            subs = list(dict.fromkeys(self.resolve(s) for s in submodels))
            if not subs:
                raise SortedNetError("submodels= is empty; give at least one sub-model or None for all")
        self._subs = subs

    def _attach(self, planned: dict, hooks: list) -> None:
        self._sliced = {path: m for path, (m, _, _) in planned.items()}
        self._hooks = hooks
        self._tensor_owner: dict[int, tuple[nn.Module, str]] = {}
        for m in self._sliced.values():
            for name in m._sn.slicer.attr_names(m, m._sn.bind):
                t = m._sn.slicer.tensor(m, name)
                if isinstance(t, torch.Tensor):
                    self._tensor_owner[id(t)] = (m, name)
        self._depth = [m for m in self._sliced.values() if "depth" in m._sn.bind]
        self._cost_cache: dict[str, dict[SubModel, float]] = {m: {} for m in METRICS}
        self._sorted_by: dict[str, tuple[list[float], list[SubModel]]] = {}
        self._param_counter = ParamCounter(self)
        self._flops_example: Any = None
        self._profile: Profile | None = None
        self._selector: Selector | None = None
        params = {s: self.cost(s, "params") for s in self._subs}
        self.submodels = tuple(sorted(self._subs, key=lambda s: (params[s], tuple(s.values()))))
        for d in self.dims:
            d._nest = self

    # -- sub-models ------------------------------------------------------------
    @property
    def largest(self) -> SubModel:
        """The full model (every dimension at its largest listed size)."""
        return self.submodels[-1]

    @property
    def smallest(self) -> SubModel:
        return self.submodels[0]

    def resolve(self, sub: SubModelLike | None) -> SubModel:
        """A full :class:`SubModel` from a SubModel, dict or ``"ffn=512,depth=4"``.

        Dimensions left out take their largest size.
        """
        if sub is None:
            return self.active
        if isinstance(sub, str):
            sub = SubModel.parse(sub)
        elif not isinstance(sub, Mapping):
            raise SortedNetError(f"expected a SubModel, dict or 'name=size,...' string, got {type(sub).__name__}")
        unknown = [k for k in sub if k not in self._by_name]
        if unknown:
            raise SortedNetError(f"unknown dimension(s) {unknown}; this nest has {list(self._by_name)}")
        sizes = {}
        for name, d in self._by_name.items():
            s = sub.get(name, d.full)
            if s not in d.sizes:
                raise SortedNetError(f"{d.kind} {name!r} has no size {s!r}; sizes are {list(d.sizes)}")
            sizes[name] = s
        return SubModel(sizes)

    @property
    def active(self) -> SubModel:
        """The sub-model in force for the calling thread."""
        return SubModel({d.name: d.active for d in self.dims})

    @contextmanager
    def use(self, sub: SubModelLike) -> Iterator[SubModel]:
        """Run ``sub`` inside the block (this thread only); the previous one is
        restored on exit, also when the body raises. Copies no tensor.

        >>> import torch, torch.nn as nn, sortednet as sn
        >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
        >>> with nest.use({"h": 2}):
        ...     nest.model[0].weight.shape
        torch.Size([2, 4])
        """
        self._check_alive()
        sub = self.resolve(sub)
        prev = [(d, d._local.__dict__.get("size")) for d in self.dims]
        for d in self.dims:
            d._set_local(sub[d.name])
        try:
            yield sub
        finally:
            for d, s in prev:
                d._set_local(s)

    def activate(self, sub: SubModelLike) -> SubModel:
        """Make ``sub`` the nest-wide default (threads outside ``use`` see it)."""
        self._check_alive()
        sub = self.resolve(sub)
        for d in self.dims:
            d._default = sub[d.name]
        return sub

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # -- costs and selection -------------------------------------------------
    def cost(self, sub: SubModelLike, metric: str = "params") -> float:
        """Cost of ``sub``: ``"params"`` counts the parameters it uses (exactly
        what ``export(sub)`` holds)."""
        sub = self.resolve(sub)
        cache = self._cost_cache.get(metric)
        if cache is None:
            raise SortedNetError(f"unknown cost metric {metric!r}; available: {sorted(self._cost_cache)}")
        if sub not in cache:
            if metric != "params":
                raise SortedNetError(f"no {metric!r} cost for {sub}; measure it first (nest.profile)")
            cache[sub] = self._count_params(sub)
        return cache[sub]

    def _count_params(self, sub: SubModel) -> int:
        with self.use(sub), torch.no_grad():
            skipped = {id(p) for m in self._depth for blk in m._sn.slicer.inactive(m) for p in blk.parameters()}
            total = 0
            for p in self.model.parameters():
                if id(p) in skipped:
                    continue
                owner = self._tensor_owner.get(id(p))
                total += getattr(*owner).numel() if owner else p.numel()
        return total

    def pick(self, *, params: float | None = None, fraction: float | None = None) -> SubModel:
        """The largest sub-model whose parameter count fits the budget (no search:
        a bisection in the cost-sorted list). ``fraction`` is relative to the
        largest sub-model's count.

        >>> import torch.nn as nn, sortednet as sn
        >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 4, 8], out="0", inp="1"))
        >>> nest.pick(params=40)
        SubModel(h=4)
        """
        limits = {}
        if params is not None:
            limits["params"] = float(params)
        if fraction is not None:
            if not 0 < fraction <= 1:
                raise SortedNetError(f"fraction must be in (0, 1], got {fraction}")
            limits["params"] = min(limits.get("params", float("inf")), fraction * self.cost(self.largest))
        if not limits:
            raise SortedNetError("pick() needs a budget, e.g. pick(params=1e6) or pick(fraction=0.5)")
        costs, subs = self._sorted("params")
        i = bisect.bisect_right(costs, limits["params"])
        if i == 0:
            raise BudgetError(f"no sub-model fits params <= {limits['params']:g}; the smallest, "
                              f"{subs[0]}, has {costs[0]:g}")
        return subs[i - 1]

    def _sorted(self, metric: str) -> tuple[list[float], list[SubModel]]:
        if metric not in self._sorted_by:
            pairs = sorted(((self.cost(s, metric), i) for i, s in enumerate(self.submodels)))
            self._sorted_by[metric] = ([c for c, _ in pairs], [self.submodels[i] for _, i in pairs])
        return self._sorted_by[metric]

    # -- export / unwrap ------------------------------------------------------
    def export(self, sub: SubModelLike | None = None) -> nn.Module:
        """A plain, physically smaller copy of ``sub`` (default: the active one).

        Sliced weights are cloned contiguous; the original classes come back;
        skipped blocks are dropped. The nest is untouched.
        """
        self._check_alive()
        sub = self.resolve(sub)
        with self.use(sub), torch.no_grad():
            memo: dict[int, Any] = {}
            skipped: list[str] = []
            for path, m in self._sliced.items():
                for t in m._sn.slicer.exported_tensors(m):
                    memo[id(t)] = t  # replaced below; never copied at full size
                if "depth" in m._sn.bind:
                    for name, blk in list(m._modules.items())[len(m):]:
                        memo[id(blk)] = None
                        skipped.append(f"{path}.{name}" if path else name)
            new = copy.deepcopy(self.model, memo)
            for path in sorted(self._sliced, key=lambda p: -p.count(".") - bool(p)):
                if any(path == s or path.startswith(s + ".") for s in skipped):
                    continue
                live = self._sliced[path]
                c = new.get_submodule(path) if path else new
                c.__class__ = live._sn.cls
                del c.__dict__["_sn"]
                r = live._sn.slicer.export(live, c)
                if r is not c:
                    if not path:
                        new = r
                    else:
                        parent, _, name = path.rpartition(".")
                        setattr(new.get_submodule(parent) if parent else new, name, r)
            for h in self._hooks:
                for m in new.modules():
                    m._forward_pre_hooks.pop(h.id, None)
        return new

    def unwrap(self) -> nn.Module:
        """Restore the original classes and return the model (weights untouched)."""
        self._check_alive()
        from .wrap import unwrap_modules

        unwrap_modules(self.model, self._hooks)
        for d in self.dims:
            d._nest = None
            d._default = d.full
        self._alive = False
        return self.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should get (those requiring grad, each once)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _extra_state(self) -> dict[str, Any]:
        """JSON-able state saved with the checkpoint (extended by features such as profiles)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` returned."""

    def _check_alive(self) -> None:
        if not self._alive:
            raise SortedNetError("this nest was unwrapped; wrap the model again to use sub-models")

    def __repr__(self) -> str:
        dims = ", ".join(repr(d) for d in self.dims)
        return f"Nest({type(self.model).__name__}, {len(self.submodels)} sub-models: {dims})"

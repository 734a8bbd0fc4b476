"""Nest: the wrapped model plus its dimensions.

Lists sub-models sorted by cost, activates one (per thread with ``use``,
nest-wide with ``activate``), counts costs, picks by budget, exports a
physically smaller plain model, and unwraps.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .cost import METRICS, ParamCounter, Profile, build_profile, count_flops, example_signature
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
        self._canonical: dict[SubModel, SubModel] = {}   # listed sub-models: resolve() is one dict lookup
        if submodels is None:
            subs = [SubModel(dict(zip(self._by_name, sizes)))
                    for sizes in itertools.product(*(d.sizes for d in self.dims))]
        else:
            subs = list(dict.fromkeys(self.resolve(s) for s in submodels))
            if not subs:
                raise SortedNetError("submodels= is empty; give at least one sub-model or None for all")
        self._subs = subs
        self._canonical = {s: s for s in subs}

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
        if isinstance(sub, SubModel):
            hit = self._canonical.get(sub)
            if hit is not None:
                return hit
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
    def cost(self, sub: SubModelLike, metric: str = "params", *, example: Any = None) -> float:
        """Cost of ``sub``: ``"params"`` counts the parameters it uses (exactly
        what ``export(sub)`` holds); ``"flops"`` counts one forward on ``example``
        (cached per sub-model; a new example shape recounts); ``"latency"``
        (median seconds) and ``"memory"`` (bytes) are known after :meth:`profile`.

        >>> import torch, torch.nn as nn, sortednet as sn
        >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
        >>> nest.cost("h=2"), nest.cost("h=2", "flops", example=torch.randn(1, 4))
        (16, 24)
        """
        sub = self.resolve(sub)
        cache = self._cost_cache.get(metric)
        if cache is None:
            raise SortedNetError(f"unknown cost metric {metric!r}; available: {list(METRICS)}")
        if metric == "flops" and example is not None:
            sig = example_signature(example)
            if sig != self._flops_example:
                cache.clear()
                self._flops_example = sig
                self._selector = None
            if sub not in cache:
                cache[sub] = count_flops(self, sub, example)
                self._selector = None
        if sub not in cache:
            if metric != "params":
                hint = "pass example=..." if metric == "flops" else "measure it with nest.profile(example)"
                raise SortedNetError(f"no {metric!r} cost for {sub} yet; {hint}")
            cache[sub] = self._param_counter(sub)
        return cache[sub]

    def profile(self, example_inputs: Any, *, score: Callable[[SubModel], float] | None = None,
                metrics: Sequence[str] = ("params", "flops", "latency", "memory"), repeat: int = 20,
                warmup: int = 3, progress: bool = True) -> Profile:
        """Measure every sub-model on ``example_inputs`` (a tensor, tuple of args or dict
        of kwargs): params, FLOPs, latency (median of ``repeat`` after ``warmup``, on the
        inputs' device), memory, and ``score(sub)`` (called inside ``use(sub)``, e.g.
        validation accuracy). Kept on the nest for :meth:`pick` and saved by ``sn.save``.

        >>> import torch, torch.nn as nn, sortednet as sn
        >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
        >>> prof = nest.profile(torch.randn(1, 4), repeat=2, progress=False)
        >>> prof.costs["flops"]
        (24.0, 96.0)
        """
        self._check_alive()
        prof = build_profile(self, example_inputs, score=score, metrics=metrics, repeat=repeat,
                             warmup=warmup, progress=progress)
        self._set_profile(prof)
        return prof

    def _set_profile(self, prof: Profile | None) -> None:
        self._profile, self._selector = prof, None
        if prof is not None:
            for metric, values in prof.costs.items():
                if metric != "params":
                    self._cost_cache[metric].update(
                        (s, v) for s, v in zip(prof.submodels, values) if s in self._cost_cache["params"])

    def pick(self, *, params: float | None = None, flops: float | None = None, latency: float | None = None,
             memory: float | None = None, fraction: float | None = None) -> SubModel:
        """The best sub-model within every given budget, without search (see
        :mod:`sortednet.select`): with a profile holding scores, the best-scoring
        one; otherwise the one with most parameters. ``fraction`` limits params
        relative to the largest sub-model. Monotone; never over budget; a budget
        below every sub-model raises :class:`~sortednet.errors.BudgetError`.

        >>> import torch.nn as nn, sortednet as sn
        >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 4, 8], out="0", inp="1"))
        >>> nest.pick(params=40), nest.pick(fraction=1.0)
        (SubModel(h=4), SubModel(h=8))
        """
        limits = {m: float(v) for m, v in (("params", params), ("flops", flops), ("latency", latency),
                                           ("memory", memory)) if v is not None}
        if fraction is not None:
            if not 0 < fraction <= 1:
                raise SortedNetError(f"fraction must be in (0, 1], got {fraction}")
            limits["params"] = min(limits.get("params", float("inf")), fraction * self.cost(self.largest))
        return self._select().pick(limits)

    def _select(self) -> Selector:
        if self._selector is None:
            subs = self.submodels
            costs = {m: [c[s] for s in subs] for m, c in self._cost_cache.items()
                     if m == "params" or (c and all(s in c for s in subs))}
            prof = self._profile
            scores = None
            if prof is not None and prof.scores is not None and all(s in prof._pos for s in subs):
                scores = [prof.scores[prof._pos[s]] for s in subs]
            self._selector = Selector(subs, costs, scores)
        return self._selector

    def calibrate(self, loader: Iterable[Any], *, subs: Iterable[SubModelLike] | None = None,
                  batches: int = 10) -> list[SubModel]:
        """Recompute BatchNorm running statistics for each of ``subs`` (default: all)
        from ``batches`` batches of ``loader`` and keep them per sub-model: in eval
        mode ``use(sub)`` and ``export(sub)`` then use that sub-model's own
        statistics. Saved and loaded with the checkpoint. See :mod:`sortednet.calibrate`.
        """
        from .calibrate import calibrate

        self._check_alive()
        return calibrate(self, loader, subs=subs, batches=batches)

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
                memo[id(m._sn)] = None  # exported copies carry no sortednet state
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

    def unwrap(self, *, merge: bool = False) -> nn.Module:
        """Restore the original classes and return the model (weights untouched).

        ``Rank`` targets get their original weight back and lose their factors /
        adapters; ``merge=True`` first bakes the largest rank into that weight
        (svd: ``U @ V``; lora: ``W0 + alpha / R * B @ A``). See docs/rank.md.
        """
        self._check_alive()
        from .wrap import unwrap_modules

        unwrap_modules(self.model, self._hooks, merge=merge)
        for d in self.dims:
            d._nest = None
            d._default = d.full
        self._alive = False
        return self.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should get (those requiring grad, each once):
        only the adapters when the nest has LoRA adapters (``Rank(mode="lora")``)."""
        adapters = {id(t): t for m in self._sliced.values() for t in m._sn.slicer.adapters(m)}
        params = adapters.values() if adapters else self.model.parameters()
        return [p for p in params if p.requires_grad]

    def _extra_state(self) -> dict[str, Any]:
        """JSON-able state saved with the checkpoint (extended by features such as profiles)."""
        return {} if self._profile is None else {"profile": self._profile.to_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` returned."""
        prof = state.get("profile")
        self._set_profile(None if prof is None else Profile.from_dict(prof))

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved with the checkpoint besides the weights (calibrated BatchNorm statistics)."""
        from .calibrate import stats_to_tensors

        return stats_to_tensors(self)

    def _load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`_extra_tensors` returned (replacing any current ones)."""
        from .calibrate import stats_from_tensors

        stats_from_tensors(self, tensors)

    def _check_alive(self) -> None:
        if not self._alive:
            raise SortedNetError("this nest was unwrapped; wrap the model again to use sub-models")

    def __repr__(self) -> str:
        dims = ", ".join(repr(d) for d in self.dims)
        return f"Nest({type(self.model).__name__}, {len(self.submodels)} sub-models: {dims})"

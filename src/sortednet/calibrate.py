"""BatchNorm recalibration per sub-model (as Slimmable networks and Once-for-All do).

Sub-models share one set of BatchNorm running statistics, a prefix of the
full model's. A smaller sub-model sees different activations, so those
statistics are off and its eval accuracy drops. :func:`calibrate` runs a few
batches through each sub-model with BatchNorm in training mode and a
cumulative average (``momentum=None``), starting from zero mean / unit
variance, and stores the result per sub-model on each sliced BatchNorm
(:class:`~sortednet.slicers.norm.NormStats` on ``module._sn.norm``, keyed by the sizes of the
nest's dimensions). From then on, in eval mode, ``use(sub)`` reads that sub-model's
own statistics and ``export(sub)`` bakes them in. In training mode the shared
statistics are used and updated as before; calibrate again after training.

Only BatchNorm modules sliced by a dimension (listed under ``norm=``) are
recalibrated; other BatchNorm modules keep their shared statistics.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .cost import call_model
from .errors import SortedNetError
from .meta import EXTRA_PREFIX
from .modes import eval_mode, finish_all
from .slicers.norm import NormStats, StaleCalibrationWarning, WeightWatch, active_stats, trained_since, unwritten
from .submodel import SubModel, SubModelLike, as_int
from .views import watch_fused_steps, world_size

if TYPE_CHECKING:
    from .nest import Nest

__all__ = ["calibrate", "batchnorms", "active_stats", "stats_to_tensors", "stats_from_tensors",
           "StaleCalibrationWarning"]

_NAMES = ("running_mean", "running_var")
DEFAULT_BATCHES = 10  # batches=None: up to this many (a shorter loader is used whole, without a warning)
COUNT = "num_batches_tracked"  # stored beside a sub-model's statistics: the number of batches they average


def batchnorms(nest: Nest) -> dict[str, nn.Module]:
    """Sliced BatchNorm modules of ``nest`` that track running statistics, by path."""
    return {p: m for p, m in nest._sliced.items()
            if isinstance(m, _BatchNorm) and "norm" in m._sn.bind and m.__dict__["track_running_stats"]}


def _watch(nest: Nest, bns: dict[str, nn.Module]) -> WeightWatch:
    """The :class:`WeightWatch` of a calibration (or load) made now (a fused optimizer's steps then move the
    version counters of the parameters it steps, as any other in-place write does)."""
    watch_fused_steps()
    return WeightWatch(nest.model, bns.values(), nest._pin.forward_key)


def _key(nest: Nest) -> tuple[int, ...]:
    return tuple(d.active for d in nest.dims)


def _inputs(batch: Any) -> Any:
    """The model input of one loader item: ``x`` of ``(x, y, ...)``, kwargs of a dict, else the item."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def calibrate(nest: Nest, loader: Iterable[Any], *, subs: Iterable[SubModelLike] | None = None,
              batches: int | None = None) -> list[SubModel]:
    """Recalibrate BatchNorm statistics of each sub-model in ``subs`` (default: all)
    on the first ``batches`` items of ``loader`` (default: up to 10); returns the sub-models calibrated.
    A loader that ends before the ``batches`` asked for warns: the statistics average the fewer batches
    it had.

    Items are ``(inputs, targets, ...)`` (first element used), a dict of kwargs or
    the inputs themselves. The same batches are used for every sub-model.

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    ...                       nn.Flatten(), nn.Linear(4, 2)).eval()
    >>> nest = sn.wrap(model, sn.Width("c", [2, 4], out="0", norm="1", inp="5"))
    >>> data = [torch.randn(8, 1, 6, 6) for _ in range(3)]
    >>> [str(s) for s in nest.calibrate(data, batches=3)]
    ['c=2', 'c=4']
    >>> with nest.use("c=2"):
    ...     tuple(nest.model[1].running_mean.shape)
    (2,)
    """
    if world_size() > 1:
        raise SortedNetError(f"calibrate() runs in one process, but a process group of {world_size()} "
                             "ranks is initialised: each rank would calibrate on its own batches and the ranks "
                             "would keep different statistics (DDP does not broadcast them; sortednet.distributed."
                             "save would write rank 0's). Calibrate in a single process: load the checkpoint "
                             "there with sn.load, calibrate on the full data, then save")
    bns = batchnorms(nest)
    if not bns:
        untracked = [p for p, m in nest._sliced.items()
                     if isinstance(m, _BatchNorm) and "norm" in m._sn.bind and not m.__dict__["track_running_stats"]]
        if untracked:
            raise SortedNetError(f"calibrate(): the sliced BatchNorm layers {untracked[:4]} are built with "
                                 "track_running_stats=False: they normalise by each batch's own statistics in eval "
                                 "mode too and keep none, so there is nothing to calibrate (every sub-model is "
                                 "already right in eval mode)")
        cut = [m for m in nest._sliced.values() if "depth" in m._sn.bind]  # (a BatchNorm inside a Depth's blocks
        inside = {id(b) for lst in cut for b in lst.modules()}           # sees the same inputs at every depth)
        order = list(nest.model.named_modules())
        first = min((i for i, (_, m) in enumerate(order) if any(m is c for c in cut)), default=0)
        outside = [(i, p) for i, (p, m) in enumerate(order)
                   if isinstance(m, _BatchNorm) and m.track_running_stats and id(m) not in inside]
        # (those declared after the stack first: a stem's inputs keep at every depth; the declaration order may
        # not be the run's, so the others follow)
        unlisted = [p for i, p in outside if i >= first] + [p for i, p in outside if i < first]
        raise SortedNetError("calibrate(): no BatchNorm module with running statistics is sliced; "
                             "list BatchNorm layers under norm= of a Width (a BatchNorm whose channel count no "
                             "dimension changes, e.g. one after a Depth stack, keeps one set of statistics for "
                             "every sub-model" + (
                                 "; to give one that runs after the stack, whose inputs change with the depth, "
                                 "statistics of each sub-model's own, list it under norm= of a Width of one size, "
                                 "its channel count: sn.Width('bn', [channels], norm=[path]) (BatchNorms outside "
                                 f"the blocks, those declared after the stack first: {unlisted[:4]}; one before "
                                 "the stack sees the same inputs at every depth)"
                                 if unlisted and cut else "") + ")")
    asked = batches is not None
    batches = DEFAULT_BATCHES if batches is None else batches
    n = as_int(batches)  # (numpy and 0-d torch integers too; never a bool or a float)
    if n is None or n < 1:
        raise SortedNetError(f"calibrate(): batches must be an int >= 1, got {batches!r}")
    batches = n
    if isinstance(subs, (str, bytes)) or isinstance(subs, dict):
        raise SortedNetError(f"calibrate(subs=...) takes a list of sub-models, got {type(subs).__name__} {subs!r}; "
                             "wrap it in a list")
    if loader is None:
        raise SortedNetError("calibrate() needs a loader of batches (a DataLoader, a list), got None")
    todo = list(nest.submodels) if subs is None else list(dict.fromkeys(nest.resolve(s, full_ok=True) for s in subs))
    if not todo:
        raise SortedNetError("calibrate(): subs= is empty")
    try:
        batch_iter = iter(loader)
    except TypeError:
        raise SortedNetError(f"calibrate() needs a loader of batches (a DataLoader, a list), got "
                             f"{type(loader).__name__} {loader!r}") from None
    data = [_inputs(b) for b in itertools.islice(batch_iter, batches)]
    if not data:
        raise SortedNetError("calibrate(): the loader yielded no batch")
    if asked and len(data) < batches:
        warnings.warn(f"calibrate(): batches={batches} asked, but the loader yielded only {len(data)}: the "
                      f"statistics average those {len(data)} (pass a longer loader, or batches={len(data)} to "
                      "say so)", stacklevel=3)
    shared = [p for p, m in nest._sliced.items() if not isinstance(m, _BatchNorm)
              and getattr(m, "track_running_stats", False) and "norm" in m._sn.bind]
    if shared:
        warnings.warn(f"calibrate(): only BatchNorm statistics are recalibrated; the running statistics of "
                      f"{shared[:3]} (InstanceNorm with track_running_stats=True) stay shared prefixes of the "
                      "full model's", stacklevel=3)

    results: dict[nn.Module, dict[tuple[int, ...], dict[str, Tensor]]] = {m: {} for m in bns.values()}
    # on a private eval-mode view sharing every weight: its BatchNorm copies alone go to training mode,
    # with their own momentum, statistics and counters, so no thread sees a mode or statistic change
    sliced = {id(m) for m in bns.values()}
    others = {p: m for p, m in nest.model.named_modules() if isinstance(m, _BatchNorm)
              and m.track_running_stats and id(m) not in sliced}
    seen: dict[str, list[Tensor]] = {p: [] for p in others}  # per sub-model: the mean input of unsliced ones
    with eval_mode(nest, own_state=bns.values()) as (view, copies):
        pairs = [(m, copies[id(m)]) for m in bns.values()]
        for _, c in pairs:
            c.train()
            c.momentum = None  # cumulative average over the batches
        for p, m in others.items():  # (hooks on the private view's copies: the user's modules are untouched)
            copies[id(m)].register_forward_pre_hook(functools.partial(_record, seen[p]))
        # a sub-model calibrated alone has no other to compare the inputs of unsliced BatchNorms with: the nest's
        # smallest and largest run too (their statistics are not kept): one set of statistics serves every
        # sub-model there, right only where their inputs agree (a restricted nest: its listed ones')
        refs = [s for s in dict.fromkeys((nest.smallest, nest.largest)) if s not in todo] if others else []
        for sub in [*todo, *refs]:
            for v in seen.values():
                v.append(None)
            with nest.use(sub), torch.no_grad():
                for m, c in pairs:
                    n, ref = c.num_features, m.__dict__["_buffers"]["running_mean"]
                    c._sn.norm = NormStats(override={  # c's state is private to the view
                        "running_mean": torch.zeros(n, dtype=ref.dtype, device=ref.device),
                        "running_var": torch.ones(n, dtype=ref.dtype, device=ref.device)})
                    if c.num_batches_tracked is not None:
                        c.num_batches_tracked.zero_()
                for x in data:
                    try:
                        call_model(view, x)
                    except Exception as e:  # the statistics are kept: nothing is assigned until every run ends
                        raise nest._forward_error("calibrate", sub, x, e) from e
                for m, c in pairs:  # fresh, normal tensors (also under inference_mode): an in-place write
                    with torch.inference_mode(False):  # after this is detected (their version counters)
                        own = {n: t.clone() for n, t in c._sn.norm.override.items()}
                        # the batches averaged: an export's num_batches_tracked (momentum=None weighs by it);
                        # the copy's own count, as a plain recalibration's (a BatchNorm run twice per forward)
                        count = c.num_batches_tracked
                        own[COUNT] = (count.detach().clone().to(torch.long) if count is not None else
                                      torch.tensor(len(data), dtype=torch.long, device=own["running_mean"].device))
                        if sub not in refs:
                            results[m][_key(nest)] = own
                    c._sn.norm = None
    names = [d.name for d in nest.dims]
    bad = [(p, SubModel(dict(zip(names, key)))) for p, m in bns.items() for key, own in results[m].items()
           if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in own.values())]
    if bad:  # (eval and export would read them: every output of those sub-models NaN)
        raise SortedNetError(
            f"calibrate(): the statistics of BatchNorm {bad[0][0]!r} for sub-model {bad[0][1]} are not finite (NaN "
            f"or inf{f'; {len(bad) - 1} more module / sub-model pair(s)' if len(bad) > 1 else ''}): a batch holds "
            "non-finite values, or the forward overflows on it (half precision); nothing was changed"
            + (", the earlier calibration stays" if nest._calibrated() else "") + ". Calibrate on finite batches")
    norms, told = {}, [False]
    weights = _watch(nest, bns)
    for m, stats in results.items():  # every module's new statistics first (nothing changed yet) ...
        prev = m._sn.norm
        old = prev.stats if prev is not None else {}
        kept = [k for k in old if k not in stats]
        stale = () if prev is None else kept if trained_since(m, prev) else set(prev.since.get("stale", ())) & set(kept)
        norm = norms[m] = NormStats(nest.dims, {**old, **stats}).watch(m, told, stale, nest._pin.trained, weights)
        if prev is not None:  # a statistic of another sub-model written in place stays refused
            norm.carry(prev, kept)
    # ... then one assignment per module (readers see old or new), each made even after a Ctrl-C: never some
    # layers calibrated and others not
    finish_all([functools.partial(setattr, m._sn, "norm", norm) for m, norm in norms.items()])
    moved = [p for p, v in seen.items() if _differ([t for t in v if t is not None])]
    if moved:
        warnings.warn(f"calibrate(): the BatchNorm layers {moved[:3]}{' ...' if len(moved) > 3 else ''} are in no "
                      "dimension's norm=, but their inputs differ between the sub-models calibrated and the "
                      "nest's smallest / largest (a Depth, or a "
                      "width upstream that reaches them through a layer of fixed size, changes them): they keep one "
                      "set of running statistics (what training accumulated) for every sub-model, so sub-models' "
                      "eval outputs and exports are not calibrated there (to calibrate one per sub-model, list it "
                      "under norm= of a Width of one size, its channel count: sn.Width('bn', [channels], norm=[path]))",
                      stacklevel=3)
    return todo


def _record(into: list, module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: add the per-channel mean and mean square of the input to ``into[-1]``."""
    x = args[0] if args else None
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        return
    dims = [d for d in range(x.dim()) if d != 1]
    xd = x.detach().double()
    m = torch.stack([xd.mean(dims), xd.square().mean(dims)]).cpu()
    into[-1] = m if into[-1] is None else into[-1] + m


def _differ(means: list[Tensor]) -> bool:
    """Do these per-sub-model input moments differ beyond rounding (relative to the inputs' scale)?"""
    if len(means) < 2 or any(m.shape != means[0].shape for m in means):
        return False
    a = torch.stack(means)                                # (sub-models, [mean, mean square], channels)
    ms = a[:, 1].clamp_min(0).max() + 1e-24              # the inputs' largest mean square
    return bool((a[:, 0] - a[:1, 0]).abs().max() / ms.sqrt() > 1e-4 or (a[:, 1] - a[:1, 1]).abs().max() / ms > 1e-4)


def stats_to_tensors(nest: Nest) -> dict[str, Tensor]:
    """Calibrated statistics as flat tensors under the checkpoint's reserved prefix."""
    names = [d.name for d in nest.dims]
    out = {}
    older = list(stale_statistics(nest))
    if older:
        warnings.warn(f"saving the per-sub-model BatchNorm statistics of {older[:3]}{' ...' if len(older) > 3 else ''}"
                      ", which predate training of the model (training-mode forwards with gradients, a step or "
                      "another in-place write of its weights, its BatchNorm layers' running statistics moved; "
                      "calibrated or loaded before it trained on): they describe the weights of before. "
                      "nest.calibrate(loader) again first, or nest.drop_calibration() to save none",
                      StaleCalibrationWarning, stacklevel=4)
    for path, m in batchnorms(nest).items():
        for key, stats in (m._sn.norm.stats if m._sn.norm is not None else {}).items():
            sub = SubModel(dict(zip(names, key)))
            for name in _NAMES:
                buf = m.__dict__["_buffers"][name]  # in the buffer's dtype / device (model.to() moved those)
                t = unwritten(path, name, stats[name], m._sn.norm).detach()
                out[f"{EXTRA_PREFIX}bn/{sub}/{path}/{name}"] = t.to(device=buf.device, dtype=buf.dtype).contiguous()
            if COUNT in stats:
                out[f"{EXTRA_PREFIX}bn/{sub}/{path}/{COUNT}"] = stats[COUNT].detach().to(torch.long).clone()
    return out


def stale_statistics(nest: Nest) -> dict[str, list[str]]:
    """The calibrated statistics that predate training (path -> sub-models), saved beside them so that
    a loaded nest warns about them as this one does."""
    out = {}
    for path, m in batchnorms(nest).items():
        norm = m._sn.norm
        if norm is None or not norm.stats:
            continue
        old = norm.since.get("stale", ())
        keys = list(norm.stats) if trained_since(m, norm) else [k for k in norm.stats if k in old]
        if keys:
            out[path] = [str(SubModel(dict(zip([d.name for d in nest.dims], k)))) for k in keys]
    return out


def stats_from_tensors(nest: Nest, tensors: dict[str, Tensor], stale: dict[str, list[str]] | None = None) -> None:
    """Replace the calibrated statistics of ``nest`` with those in ``tensors`` (from :func:`stats_to_tensors`);
    ``stale`` (from :func:`stale_statistics`): those out of date when saved, which stay so."""
    bns = batchnorms(nest)
    found: dict[nn.Module, dict[tuple[int, ...], dict[str, Tensor]]] = {}
    prefix = f"{EXTRA_PREFIX}bn/"
    for k, t in tensors.items():
        if not k.startswith(prefix):
            continue
        try:
            sub_text, rest = k[len(prefix):].split("/", 1)
            path, name = rest.rsplit("/", 1)
        except ValueError:
            raise SortedNetError(f"malformed calibration key {k!r} in checkpoint") from None
        if path not in bns or name not in (*_NAMES, COUNT):
            raise SortedNetError(f"checkpoint has calibration for {path!r}.{name}, which is not a sliced "
                                 f"BatchNorm statistic of this nest (sliced BatchNorm: {sorted(bns)[:8]})")
        sub = nest.resolve(sub_text, full_ok=True)  # (a restricted nest's full model: calibrated by name)
        m = bns[path]
        buf = m.__dict__["_buffers"][name if name != COUNT else "running_mean"]
        with torch.inference_mode(False):
            found.setdefault(m, {}).setdefault(tuple(sub[d.name] for d in nest.dims), {})[name] = \
                t.to(device=buf.device, dtype=buf.dtype if name != COUNT else torch.long, copy=True)
    told, stale = [False], stale or {}
    keys = {path: {tuple(nest.resolve(t, full_ok=True)[d.name] for d in nest.dims) for t in subs}
            for path, subs in stale.items()}
    weights = _watch(nest, bns)
    for path, m in bns.items():
        m._sn.norm = (NormStats(nest.dims, found[m]).watch(m, told, keys.get(path, ()), nest._pin.trained, weights)
                      if m in found else None)

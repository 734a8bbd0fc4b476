"""Importance sorting for any nest: the most important units of every dimension first.

:func:`sort_units` scores the units of every ``Width`` (channels, neurons, hidden
features) and ``Heads`` dimension and permutes them, consistently in every
binding of the group (producers' rows and biases, consumers' columns, norm
weights and BatchNorm running statistics, packed q/k/v chunks, whole key/value
groups with grouped-query attention, whole GroupNorm groups), so the full
model computes the same function while small sub-models keep the units scored highest (a heuristic
start for sorted training: each unit is scored alone, so an untrained small sub-model is not always better).

Scores: ``"l1"`` / ``"l2"`` norm of each unit's weights (producers' rows for a
width, the output projection's columns for heads); ``"bn"`` BatchNorm |gamma|
(widths without an affine BatchNorm fall back to ``"l1"``); ``"taylor"`` the first-order
score ``|sum(w * dL/dw)|`` over the consumers' columns, accumulated over
``data`` batches (DynaBERT). With an example, each width is split into the
independently coupled groups found by tracing (each layer's FFN gets its own
order) and the result is verified: if the full model's output changes by more
than ``atol`` (relative), every tensor is restored and a SortedNetError raised.
"""

from __future__ import annotations

import collections
import functools
import gc
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .cost import call_model, keyword_inputs
from .coupling import analyse
from .coupling_ops import leaves, without_fills
from .errors import SortedNetError, caller_outside
from .modes import casts_stale, dry_run, eval_mode, finish_all, seeded, train_view
from .plan import Use
from .slicers.norm import group_size
from .submodel import SubModel
from .views import is_fsdp, storage_key, world_size
from .wrap import count_load

if TYPE_CHECKING:
    from .nest import Nest

__all__ = ["sort_units", "METHODS"]

METHODS = ("l1", "l2", "bn", "taylor")

# slicer class name -> role -> [(tensor attribute, axis)]; weights first (the others follow the order)
_AXES: dict[str, dict[str, list[tuple[str, int]]]] = {
    "LinearSlicer": {"out": [("weight", 0), ("bias", 0)], "inp": [("weight", 1)]},
    "ConvSlicer": {"out": [("weight", 0), ("bias", 0)], "inp": [("weight", 1)]},
    "ConvTransposeSlicer": {"out": [("weight", 1), ("bias", 0)], "inp": [("weight", 0)]},
    "EmbeddingSlicer": {"out": [("weight", 1)]},
    "HFConv1DSlicer": {"out": [("weight", 1), ("bias", 0)], "inp": [("weight", 0)]},
    "LayerNormSlicer": {"norm": [("weight", 0), ("bias", 0)]},
    "GroupNormSlicer": {"norm": [("weight", 0), ("bias", 0)]},
    "BatchNormSlicer": {"norm": [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]},
    "PReLUSlicer": {"norm": [("weight", 0)]},
    "InstanceNormSlicer": {"norm": [("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)]},
    "MHASlicer": {"inp": [("in_proj_weight", 1)], "heads": [("in_proj_weight", 0), ("in_proj_bias", 0)]},
}


class _Bind:
    """One binding of a unit group: module, role, and how units map to features."""

    def __init__(self, path: str, m: nn.Module, role: str, unit: int, div: int, chunks: int,
                 parts: tuple[int, ...] = ()) -> None:
        self.path, self.m, self.role, self.unit, self.div, self.chunks = path, m, role, unit, div, chunks
        # a fused layout stacking blocks of unequal widths (grouped-query q|k|v: the divisor of each block)
        self.parts = parts if len(set(parts)) > 1 else ()
        self.head = 0  # head size of a fused interleaved projection (a block [q x div, k, v] per key/value head)
        name = type(m._sn.slicer).__name__
        known = _AXES.get(name) if type(m._sn.slicer).__module__.startswith("sortednet.") else None
        known = known if known is not None else _views_axes(m)
        if known is None:
            hf = m._sn.cls.__module__.startswith("transformers.")
            raise SortedNetError(f"sort_units: {path!r} ({m._sn.cls.__name__}) is sliced by {name}, whose layout "
                                 "importance sorting does not know (it computes attributes in value(), not only "
                                 "views of its tensors); it cannot be permuted"
                                 + ("; sort this family with sn.sort_by_importance (sortednet.integrations), which "
                                    "knows the layouts sn.from_transformers nests" if hf else ""))
        axes = known.get(role, [])
        if name == "ConvSlicer" and role == "inp" and m.__dict__["groups"] > 1:
            axes = []  # depthwise: its out binding moves the filters
        found = [(n, t, ax) for n, ax in axes if (t := m._parameters.get(n, m._buffers.get(n))) is not None]
        self.tensors = [(t, ax) for _, t, ax in found]
        self.names = [n for n, _, _ in found]

    def features(self, idx: Tensor, full_units: int, group: int) -> Tensor:
        """Feature permutation of this binding for a unit order ``idx`` (whole groups first)."""
        if self.head:  # each key/value head's block moves whole, its query heads in the order idx gives them
            g, d = self.div, self.head
            heads = idx.reshape(-1, g)
            base = heads[:, :1] // g * self.unit
            starts = torch.cat([base + heads % g * d, base + g * d, base + (g + 1) * d], 1)
            return (starts[..., None] + torch.arange(d, device=starts.device)).reshape(-1)
        if self.parts:  # each block in its own order: whole key / value groups in k and v, the heads in q
            out, start = [], 0
            for d in self.parts:
                units = idx if d == 1 else idx.reshape(-1, d)[:, 0] // d
                f = (units[:, None] * self.unit + torch.arange(self.unit, device=idx.device)[None, :]).reshape(-1)
                out.append(f + start)
                start += full_units // d * self.unit
            return torch.cat(out)
        if self.div > 1:
            idx = idx.reshape(-1, group)[:, 0] // group
        per = full_units // self.div * self.unit
        f = (idx[:, None] * self.unit + torch.arange(self.unit, device=idx.device)[None, :]).reshape(-1)
        return torch.cat([f + c * per for c in range(self.chunks)])

    def per_unit(self, v: Tensor, full_units: int) -> Tensor:
        """Per-feature values ``v`` summed into per-unit scores (chunks and head features added up)."""
        if self.parts:
            out, start = 0, 0
            for d in self.parts:
                n = full_units // d * self.unit
                u = v[start:start + n].reshape(full_units // d, self.unit).sum(1)
                out = out + (u.repeat_interleave(d) if d > 1 else u)
                start += n
            return out
        u = v.reshape(self.chunks, full_units // self.div, self.unit).sum((0, 2))
        return u.repeat_interleave(self.div) if self.div > 1 else u


def _views_axes(m: nn.Module) -> dict[str, list[tuple[str, int]]] | None:
    """role -> [(tensor attribute, axis)] of a slicer of the user's whose every attribute is a view of a tensor
    (``views``) or depends on the sizes alone (``static``): permuting those tensors along those axes permutes
    the units. None for one that computes an attribute in ``value()`` (its layout is unknown)."""
    sl = m._sn.slicer
    rules = sl.rules(m)
    if any(a not in rules for a in sl.attrs):
        return None
    out: dict[str, list[tuple[str, int]]] = {}
    for attr, cuts in rules.items():
        if isinstance(cuts, tuple):
            for axis, role in cuts:
                out.setdefault(role, []).append((attr, axis))
    return out


def _groups(nest: Nest, example: Any, only: frozenset[str] | None = None) -> list[tuple[str, Any, list[_Bind], int]]:
    """(label, dimension, bindings, block) per independently permutable group of units (of the dimensions named
    in ``only``; None: all)."""
    by_dim: dict[str, list[_Bind]] = {}
    for path, m in nest._sliced.items():
        for role, b in m._sn.bind.items():
            if role.startswith("attr:") or b.dim.kind not in ("width", "heads") or (
                    only is not None and b.dim.name not in only):
                continue
            by_dim.setdefault(b.dim.name, []).append(_Bind(path, m, role, b.unit, b.div, b.chunks, b.blocks))
    traced: dict[tuple[str, str], int] = {}
    if example is not None:
        with _at_full(nest):
            traced = analyse(nest.model, example).role_group
    out = []
    for d in nest.dims:
        binds = by_dim.get(d.name, [])
        if not binds:
            continue
        if d.kind == "heads":
            parts = _heads_parts(nest, d, binds)
        elif binds and all((b.path, b.role) in traced for b in binds):
            keys = {traced[(b.path, b.role)] for b in binds}
            parts = [[b for b in binds if traced[(b.path, b.role)] == k] for k in sorted(keys)]
            parts = [(next((b.path for b in p if b.role == "out"), p[0].path), p) for p in parts]
        else:
            parts = [(next((b.path for b in binds if b.role == "out"), binds[0].path), binds)] if binds else []
        for where, part in parts:
            block = 1
            for b in part:
                if type(b.m._sn.slicer).__name__ == "GroupNormSlicer":
                    block = math.lcm(block, group_size(b.m))
                block = max(block, b.div, *b.parts)
            out.append((f"{d.name}@{where}", d, part, block))
    return out


def _per_block(nest: Nest, whole: list[tuple[str, Any, list[_Bind], int]]
               ) -> list[tuple[str, Any, list[_Bind], int]] | None:
    """``whole`` with each Width's units split by the element of a module list holding them (a transformer's
    layers), where every element holds writers (``out``) and readers (``inp``) of its part; None where no
    Width splits so. A candidate like the trace's groups: the sort verifies the full model's output with it."""
    lists = {p for p, m in nest.model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))}

    def block(path: str) -> str | None:
        parts = path.split(".")
        return next((".".join(parts[:i + 1]) for i in range(1, len(parts))
                     if parts[i].isdigit() and ".".join(parts[:i]) in lists), None)

    out, split = [], False
    for label, d, part, size in whole:
        blocks = [block(b.path) for b in part]
        by: dict[str, list[_Bind]] = {}
        for k, b in zip(blocks, part):
            by.setdefault(k or "", []).append(b)
        if d.kind != "width" or None in blocks or len(by) < 2 or not all(
                {"out", "inp"} <= {b.role for b in p} for p in by.values()):
            out.append((label, d, part, size))
            continue
        split = True
        out += [(f"{d.name}@{next(b.path for b in p if b.role == 'out')}", d, p, size) for p in by.values()]
    return out if split else None


def _heads_parts(nest: Nest, d: Any, binds: list[_Bind]) -> list[tuple[str, list[_Bind]]]:
    from .dims import match

    modules = dict(nest.model.named_modules())
    by_path = {(b.path, b.role): b for b in binds}
    parts = []
    for pat in d.attn:
        for path in match(pat, modules, f"Heads {d.name!r} attn"):
            keys = [(t.path, t.role) for t in d._plan_one(path, modules[path], pat) if not t.role.startswith("attr:")]
            part = [by_path[k] for k in keys if k in by_path]
            heads = {b.unit for b in part if b.div == 1 and b.role == "inp"}  # (the output projection's columns)
            for b in part:  # a fused interleaved q/k/v: one block of (group + 2) heads per key/value head
                if len(heads) == 1 and b.div > 1 and b.chunks == 1 and b.unit == (b.div + 2) * min(heads):
                    b.head = min(heads)
            held = set()  # the modules this attention's projections are (a projection shared with another
            for t in keys:  # attention's, cross-layer key / value sharing, is bound under one path only)
                try:
                    held.add(id(nest.model.get_submodule(t[0])))
                except AttributeError:
                    pass
            parts.append((path, part, held))
    merged: list[tuple[str, list[_Bind], set[int]]] = []  # attentions sharing a projection: one order for them all
    for path, part, held in parts:
        into = [m for m in merged if m[2] & held]
        for m in into:
            merged.remove(m)
        keep = {(b.path, b.role): b for m in into for b in m[1]}
        keep.update({(b.path, b.role): b for b in part})
        merged.append((into[0][0] if into else path, list(keep.values()), held.union(*(m[2] for m in into))))
    return [(w, p) for w, p, _ in merged if p]


def _scores(part: list[_Bind], full: int, method: str, kind: str, taylor: dict[tuple[str, str], Tensor]) -> Tensor:
    """Per-unit scores, on the CPU (whatever the model's device and the default device)."""
    def zeros() -> Tensor:
        return torch.zeros(full, device="cpu")

    if method == "taylor":
        src = [b for b in part if b.role == "inp"] or part
        return sum((taylor.get((b.path, b.role), zeros()).cpu() for b in src), zeros())
    if method == "bn":
        gammas = [(b, g) for b in part if type(b.m._sn.slicer).__name__ == "BatchNormSlicer"
                  and (g := b.m._parameters.get("weight")) is not None]  # affine only: else "l1"
        if gammas and kind == "width":
            return sum((b.per_unit(g.detach().abs().float().cpu(), full) for b, g in gammas), zeros())
    first = ("inp", "heads", "out") if kind == "heads" else ("out", "inp", "norm")
    src = next(([b for b in part if b.role == r and b.tensors] for r in first
                if any(b.role == r and b.tensors for b in part)), [])
    score = zeros()
    for b in src:
        t, ax = b.tensors[0]
        w = t.detach().float().movedim(ax, 0).reshape(t.shape[ax], -1).cpu()
        score += b.per_unit(w.abs().sum(1) if method != "l2" else w.pow(2).sum(1), full)
    return score


def _order(score: Tensor, block: int, part: list[_Bind] = ()) -> Tensor:
    """Unit order: whole blocks by their summed score, then the units inside each stretch of a block that no
    GroupNorm group boundary crosses (GroupNorms of unequal group sizes: a unit moved across a boundary of the
    smaller groups would be normalised with other units)."""
    by = score.reshape(-1, block)
    g = torch.argsort(by.sum(1), descending=True, stable=True)
    sizes = {group_size(b.m) for b in part if type(b.m._sn.slicer).__name__ == "GroupNormSlicer"}
    cuts = sorted({0, block} | {k for s in sizes if s < block for k in range(s, block, s)})
    within = torch.cat([torch.argsort(by[g][:, a:z], dim=1, descending=True, stable=True) + a
                        for a, z in zip(cuts, cuts[1:])], 1)
    return (g[:, None] * block + within).reshape(-1)


def _at_full(nest: Nest) -> Use:
    """The full model in force: every dimension at its full size, also in a restricted nest whose list leaves it
    out (its ``largest`` is then smaller, and a permutation changes which units its prefixes keep)."""
    return Use(nest._state, nest._plans.build(SubModel({d.name: d.full for d in nest.dims})))


def _loss(model: nn.Module, batch: Any) -> Tensor:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:  # ((inputs, labels): inputs called as everywhere)
        y = batch[1]
        if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex():  # (as fit's default loss)
            what = f"{y.dtype}, shape {tuple(y.shape)}" if isinstance(y, Tensor) else f"a {type(y).__name__}"
            raise SortedNetError(
                f"sort_units(method='taylor'): the labels of a batch are {what}, and the default loss is "
                "F.cross_entropy on class indices (float targets would be read as class probabilities: a "
                "regression scored on a meaningless loss); pass loss_fn=lambda model, batch: ..., e.g. "
                "F.mse_loss(model(batch[0]), batch[1]). Nothing was changed")
        out = call_model(model, batch[0])
        if isinstance(out, Tensor) and out.dim() >= 2 and out.shape[1] == 1:
            raise SortedNetError(
                f"sort_units(method='taylor'): the model's output {tuple(out.shape)} holds one logit per example, "
                "and the default loss, F.cross_entropy over one class, is 0 whatever the weights (every score "
                "would be 0); pass loss_fn=, e.g. lambda model, batch: F.binary_cross_entropy_with_logits("
                "model(batch[0]).squeeze(1), batch[1].float()). Nothing was changed")
        return F.cross_entropy(out, y.long())
    if keyword_inputs(batch):  # (a dict, a tokenizer's BatchEncoding)
        out = call_model(model, batch)
        if getattr(out, "loss", None) is not None:
            return out.loss
    raise SortedNetError("sort_units(method='taylor'): give batches of (inputs, labels), dicts with labels, "
                         "or loss_fn=lambda model, batch: ...")


def _taylor(nest: Nest, model: nn.Module, groups: list, data: Iterable[Any] | None,
            loss_fn: Callable | None) -> dict[tuple[str, str], Tensor]:
    if data is None:
        raise SortedNetError("sort_units(method='taylor') needs data= (a few batches)")
    if torch.is_inference_mode_enabled():  # (no gradient can be taken there: a raw RuntimeError at backward)
        raise SortedNetError("sort_units(method='taylor') scores units by |weight x gradient|, and it is called "
                             "inside torch.inference_mode(), where no gradient can be taken: call it outside "
                             "inference mode (or sort by 'l1' / 'l2' / 'bn'). Nothing was changed")
    params = list(model.parameters())
    saved = [p.grad for p in params]
    # frozen parameters that score units (a frozen layer reading them): their gradient is needed, so they require
    # grad during scoring only (left frozen, they got none: every score 0, the order unchanged, in silence).
    # Parameters only: a buffer first in its binding (a norm's running mean where it has no affine weight) is no
    # weight, and a norm refuses a running statistic that requires grad
    frozen = list({id(t): t for _, _, part, _ in groups for b in part for t, _ in b.tensors[:1]
                   if isinstance(t, nn.Parameter) and t.is_leaf and not t.requires_grad and not t.is_inference()
                   and (t.is_floating_point() or t.is_complex())}.values())
    acc: dict[tuple[str, str], Tensor] = {}
    n = 0
    try:
        for t in frozen:
            t.requires_grad_(True)
        with dry_run(nest.model), _at_full(nest), torch.enable_grad():
            for batch in data:
                for p in params:
                    p.grad = None
                try:
                    loss = (_loss if loss_fn is None else loss_fn)(model, batch)
                except SortedNetError:
                    raise
                except Exception as e:  # the user's batch or loss_fn: named, nothing changed
                    raise SortedNetError(f"sort_units(method='taylor'): the loss of batch {n} raised "
                                         f"{type(e).__name__}: {str(e)[:300]}; nothing was changed") from e
                if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
                    raise SortedNetError("sort_units(method='taylor'): the loss must be a scalar floating-point "
                                         f"tensor, got {type(loss).__name__}"
                                         + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
                if not bool(torch.isfinite(loss.detach()).all()):
                    raise SortedNetError(f"sort_units(method='taylor'): the loss of batch {n} is "
                                         f"{float(loss.detach())}; its gradient scores would be NaN and every order "
                                         "meaningless. Nothing was changed: drop that batch (or fix the loss)")
                if not loss.requires_grad:
                    raise SortedNetError(f"sort_units(method='taylor'): the loss of batch {n} carries no gradient "
                                         "(computed under torch.no_grad() or inference_mode, or detached), and the "
                                         "scores are gradients; nothing was changed: return the loss as computed")
                loss.reshape(()).backward()
                for _, d, part, _ in groups:
                    for b in part:
                        t, ax = b.tensors[0] if b.tensors else (None, 0)
                        if t is None or t.grad is None:
                            continue
                        wg = (t.detach().float() * t.grad.float()).movedim(ax, 0).reshape(t.shape[ax], -1).sum(1).cpu()
                        # (in float32: a float16 product of a weight ~0.02 and a gradient ~1e-6 underflows to 0)
                        key = (b.path, b.role)
                        acc[key] = acc.get(key, 0) + b.per_unit(wg, d.full).abs()
                n += 1
    finally:  # (every gradient and flag back, even after a Ctrl-C: finish_all)
        finish_all([lambda: [t.requires_grad_(False) for t in frozen],
                    lambda: [setattr(p, "grad", g) for p, g in zip(params, saved)]])
    if n == 0:
        raise SortedNetError("sort_units(method='taylor'): data is empty")
    bad = [f"{path} ({role})" for (path, role), v in acc.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise SortedNetError(f"sort_units(method='taylor'): the gradient scores of {bad[:3]} are not finite "
                             "(gradients overflowed: inputs or loss far out of scale); nothing was changed")
    if not any(bool(v.any()) for v in acc.values() if isinstance(v, Tensor)):
        raise SortedNetError(f"sort_units(method='taylor'): every score |weight x gradient| is zero over the {n} "
                             "batch(es), so it cannot order any unit: the sliced weights or their gradients are all "
                             "zero (a zero-initialised layer after them or among them, an untrained model, a "
                             "loss_fn that ignores the model's output or is scaled by 0); sort a trained model, or "
                             "by weight norm (method='l1' / 'l2'); nothing was changed")
    return acc


def _maps_unordered(outs: list[Tensor], heads: set[int]) -> list[Tensor]:
    """``outs`` with each attention map (a 4-d floating-point output ``(batch, heads, queries, keys)`` of a Heads
    dimension's full count whose rows are probabilities, ``output_attentions=True``) sorted along its heads axis:
    what a permutation of the heads changes there, to say so when a sort is refused for it."""
    def is_map(t: Tensor) -> bool:
        if not (t.dim() == 4 and t.shape[1] in heads and t.is_floating_point() and t.numel()):
            return False
        f = t.detach().float()
        return bool((f >= 0).all()) and bool(torch.allclose(f.sum(-1), torch.ones((), device=f.device), atol=1e-3))

    return [t.sort(dim=1).values if is_map(t) else t for t in outs]


def _head_counts(nest: Any) -> set[int]:
    """Sizes a heads axis of an output may have at full size: each Heads dimension's count and, for grouped
    keys and values, its count over a group size (the key / value heads of a cache the model returns)."""
    return {d.full // g for d in nest.dims if d.kind == "heads" for g in range(1, d.full + 1)
            if d.full % g == 0 and d.full // g > 1}


def _heads_matched(got: list[Tensor], ref: list[Tensor], sizes: set[int]) -> list[Tensor]:
    """``got`` with the slices of each floating-point output along a heads axis (1 or 2, of a size in ``sizes``)
    put in the order of ``ref``'s that they are nearest to, where that is a permutation: a sort of the heads
    reorders a per-head output the model returns (its key / value cache) and nothing else in it."""
    out = []
    for g, r in zip(got, ref):
        if not (isinstance(g, Tensor) and isinstance(r, Tensor) and g.shape == r.shape and g.is_floating_point()
                and g.dim() >= 3) or torch.equal(g, r):
            out.append(g)
            continue
        for axis in (1, 2):
            n = g.shape[axis]
            if n not in sizes:
                continue
            near = torch.cdist(r.detach().movedim(axis, 0).reshape(n, -1).double(),
                               g.detach().movedim(axis, 0).reshape(n, -1).double()).argmin(1)
            if len(set(near.tolist())) == n:
                g = g.index_select(axis, near.to(g.device))
                break
        out.append(g)
    return out


def _leaves(out: Any) -> list[Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in leaves(out) if isinstance(t, Tensor)]


def _example_of(data: Any) -> Any:
    for batch in data:
        if isinstance(batch, (tuple, list)):
            return batch[0]
        if keyword_inputs(batch):  # (a dict, a tokenizer's BatchEncoding)
            return {k: v for k, v in batch.items() if k != "labels"}
        return batch
    return None


class OptimizerStateWarning(UserWarning):
    """A sort permuted parameters that an optimizer not passed as ``optimizer=`` holds per-element state
    for (momentum, Adam's moments): that state stays where the units were, so further steps of that
    optimizer would apply one unit's moments to another."""


def optimizers(fn: str, optimizer: Any) -> tuple[torch.optim.Optimizer, ...]:
    """``optimizer=`` of a sort as a tuple: one optimizer, a list / tuple of them (a model trained by
    several), or None (their state is checked by :func:`check_states`, once the sort knows what it moves). A
    wrapper's inner
    optimizer comes along (ZeroRedundancyOptimizer's ``optim``, Accelerate's ``optimizer``: the state
    lives there), and each state is kept once (a wrapper that shares its inner optimizer's state, or one
    passed twice, would move it twice)."""
    if optimizer is None:
        return ()
    opts = (optimizer,) if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    if not isinstance(opts, (list, tuple)) or not all(isinstance(o, torch.optim.Optimizer) for o in opts):
        raise SortedNetError(f"{fn}: optimizer= takes a torch.optim.Optimizer (or a list of them), got "
                             f"{type(optimizer).__name__}")
    out: dict[int, torch.optim.Optimizer] = {}
    todo = list(opts)
    while todo:
        o = todo.pop(0)
        inner = [getattr(o, a, None) for a in ("optim", "optimizer")]
        todo += [i for i in inner if isinstance(i, torch.optim.Optimizer) and i is not o]
        out.setdefault(id(o.state), o)
    return tuple(out.values())


def check_states(fn: str, opts: tuple[torch.optim.Optimizer, ...], params: Iterable[Tensor], model: nn.Module
                 ) -> None:
    """Refuse (before anything changes) an optimizer of ``opts`` that holds a parameter of ``params`` (what the
    sort permutes, its copies' too) and keeps state that does not live element by element (:func:`_check_state`):
    an optimizer of parameters the sort leaves in place alone (an Adafactor over the embeddings) is nobody's
    business here."""
    ids = {id(p) for p in params}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for o in opts:
        held = [p for g in o.param_groups for p in g.get("params", ())]
        if any(id(p) in ids for p in held):
            _check_state(o, fn, names)


def stray_optimizers(params: Iterable[Tensor], passed: tuple[torch.optim.Optimizer, ...]) -> list[str]:
    """Every live optimizer of this process, other than ``passed``, that holds per-element state for one of
    ``params`` (those a sort permutes), by name: its moments would no longer line up with their units once the
    sort moved them. (Found by a scan of the live objects: a sort is rare, the scan cheap next to its forwards;
    an optimizer that is garbage but not collected yet is collected first.) Found before the sort, said after
    it, with :func:`warn_stray_optimizers`: a refused sort moves nothing."""
    ids = {id(p) for p in params}
    mine = {id(o.state) for o in passed}

    def stray() -> list[str]:
        found: dict[int, str] = {}
        for o in gc.get_objects():
            if not issubclass(type(o), torch.optim.Optimizer):  # (type(): no object's __class__ is read)
                continue
            try:
                state = o.state
            except Exception:  # (a wrapper whose state cannot be read: not ours to judge)
                continue
            if not isinstance(state, Mapping) or id(state) in mine or id(state) in found:
                continue
            n = sum(1 for p, st in list(state.items()) if id(p) in ids and isinstance(st, Mapping)
                    and any(isinstance(v, Tensor) and v.numel() > 1 for v in st.values()))
            if n:
                found[id(state)] = f"{type(o).__name__} (state for {n} of them)"
        return list(found.values())

    if not stray():
        return []
    gc.collect()
    return stray()


def warn_stray_optimizers(fn: str, names: list[str]) -> None:
    """Warn (:class:`OptimizerStateWarning`) about the optimizers :func:`stray_optimizers` found, once the sort
    is done (with warnings as errors, the raise then leaves a finished sort)."""
    if names:
        warnings.warn(f"{fn}: {', '.join(names)} holds momentum / moments for parameters this sort permutes and "
                      "was not passed as optimizer=: its state stays where the units were, so its next steps "
                      "would apply one unit's moments to another. Pass it (optimizer=opt, or a list of every "
                      "optimizer of the model), or build a new optimizer after sorting", OptimizerStateWarning,
                      stacklevel=3)


def _check_state(optimizer: torch.optim.Optimizer, fn: str, names: dict[int, str]) -> None:
    """Refuse (before anything changes) an optimizer whose state does not live element by element on each
    parameter: a list of tensors (L-BFGS's direction history) or a tensor of another shape than its parameter
    (L-BFGS keeps the whole model's flattened state on the first parameter), which no permutation of units can
    follow, whichever parameters it permutes."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            nested = isinstance(v, (list, tuple, dict)) and any(
                isinstance(t, Tensor) for t in (v.values() if isinstance(v, dict) else v))
            flat = isinstance(v, Tensor) and isinstance(p, Tensor) and v.numel() > 1 and (
                v.dim() != p.dim() or any(a not in (1, b) for a, b in zip(v.shape, p.shape)))
            if nested or flat:
                at = names.get(id(p), "a parameter of a copy of the model")
                raise SortedNetError(f"{fn}: {type(optimizer).__name__}'s state {k!r} "
                                     f"({'a list of tensors' if nested else f'shape {tuple(v.shape)}'}) does not "
                                     f"follow its parameter {at!r} {tuple(p.shape)} element by element, and the "
                                     "optimizer holds parameters the sort permutes, so no permutation of units can "
                                     "carry its state; sort before building the optimizer (or build a new one after "
                                     "sorting). Nothing was changed")


def _companions(t: Tensor, opts: tuple[torch.optim.Optimizer, ...] = (), own: frozenset[int] = frozenset()
                ) -> list[Tensor]:
    """``t`` and the tensors whose units follow it: its ``.grad`` and the optimizers' state for it (momentum,
    Adam's moments; a factored optimizer's row / column statistics, of size 1 along reduced axes). Other
    non-scalar state (a flattened layout) cannot follow the units: refused. ``own``: ids of the model's tensors,
    for a deep copy's: one that is the model's own tensor has the model's optimizer state, moved already."""
    if id(t) in own:
        opts = ()
    out = [t]
    if t.grad is not None:
        out.append(t.grad)
    for optimizer in opts:
        torch_own = type(optimizer).__module__.startswith("torch.optim")  # (their state is per element)
        for k, v in optimizer.state.get(t, {}).items():
            if not isinstance(v, Tensor) or v.numel() == 1:
                continue  # step counts and other scalars
            if v.dim() != t.dim() or any(a not in (1, b) for a, b in zip(v.shape, t.shape)):
                raise SortedNetError(f"sort_units: the optimizer's state {k!r} of a {tuple(t.shape)} parameter has "
                                     f"shape {tuple(v.shape)}, which cannot follow a permutation of its units; "
                                     "sort before building the optimizer")
            if not torch_own and t.dim() == 2 and t.shape[0] == t.shape[1]:
                raise SortedNetError(f"sort_units: the state {k!r} of {type(optimizer).__name__} for a "
                                     f"{tuple(t.shape)} parameter may be per element or a matrix over one of its "
                                     "equal axes (a Shampoo-style preconditioner), which would need the units "
                                     "permuted on both of its axes; sort before building the optimizer")
            out.append(v)
    return out


def _refuse_shared_memory(groups: list) -> None:
    """Two tensors a sort permutes that overlap in memory (``dec.weight = nn.Parameter(enc.weight.detach().t())``:
    one buffer under two Parameters) would be permuted once through each: refused by name, before anything
    moves (the output check would refuse the result, blaming the wiring)."""
    spans: dict[tuple[str, int], list[tuple[int, int, int, str]]] = {}
    for _, _, part, _ in groups:
        for b in part:
            for (t, _), name in zip(b.tensors, b.names):
                if t.device.type == "meta" or not t.numel():
                    continue
                try:
                    base = t.untyped_storage().data_ptr()
                except (RuntimeError, NotImplementedError):  # (a tensor subclass without plain memory)
                    continue
                lo = t.storage_offset()
                hi = lo + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
                spans.setdefault((str(t.device), base), []).append((lo, hi, id(t), f"{b.path}.{name}".lstrip(".")))
    for held in spans.values():
        held.sort()
        top, i, a = -1, None, ""  # (the span reaching furthest so far)
        for lo, hi, j, b2 in held:
            if j != i and lo < top:
                first, second = sorted((a, b2))
                raise SortedNetError(f"sort_units: {first!r} and {second!r} are two tensors over the same memory (one "
                                     "Parameter made from the other's data, e.g. nn.Parameter(w.detach().t())): a "
                                     "permutation would move that memory once through each. Tie them as one "
                                     "Parameter, or give each its own memory (.clone()). Nothing was changed")
            if hi > top:
                top, i, a = hi, j, b2


def _apply(groups: list, orders: list[Tensor], optimizer: tuple[torch.optim.Optimizer, ...] = ()
           ) -> list[tuple[str, str, int, Tensor]]:
    """Permute every bound tensor (each once), its ``.grad`` and ``optimizer``'s state for it; returns the moves
    made, ``(module path, tensor name, axis, index)``, to make them again in a deep copy of the model."""
    done: dict[tuple[int, int], tuple[int, Tensor]] = {}
    moves = []
    for (label, d, part, block), order in zip(groups, orders):
        for b in part:
            idx = b.features(order, d.full, block)
            for (t, ax), name in zip(b.tensors, b.names):
                key = (id(t), ax)
                prev = done.get(key)
                moves.append((b.path, name, ax, idx))  # (each name: a copy may hold them as two tensors)
                if prev is not None:
                    if prev[0] != id(order) or not torch.equal(prev[1], idx):
                        raise SortedNetError(f"sort_units: {b.path!r} is permuted by two groups ({label!r}); "
                                             "its units cannot follow both")
                    continue
                done[key] = (id(order), idx)
                for c in _companions(t, optimizer):
                    if c.shape[ax] == t.shape[ax]:  # (a statistic reduced over this axis has size 1: unchanged)
                        c.data.copy_(c.data.index_select(ax, idx.to(c.device)))
    return moves


def follow_moves(moves: list[tuple[str, str, int, Tensor]], optimizer: tuple[torch.optim.Optimizer, ...] = (),
                 own: frozenset[int] = frozenset()) -> Callable[[nn.Module, set], None]:
    """What makes ``moves`` (see :func:`_apply`) in a deep copy of the model (an EMA / teacher copy): its
    tensors, their ``.grad`` and ``optimizer``'s state for them (the copy's own optimizer, when it was passed),
    all checked before the first is written. Memory the copy shares with the model (or with a copy permuted
    before) is left alone, tensor by tensor; a parameter that IS one of the model's (``own``: their ids) has
    the model's optimizer state, moved already."""
    def follow(root: nn.Module, held: set) -> None:
        todo, seen = [], set()
        for path, name, ax, idx in moves:
            m = root.get_submodule(path)
            t = m._parameters.get(name, m._buffers.get(name))
            if t is None or t.dim() <= ax or t.shape[ax] != idx.numel():
                raise SortedNetError(f"the copy's {path}.{name} does not match the model's")
            if (id(t), ax) not in seen:  # (a tensor the copy holds under two names, as the model does)
                seen.add((id(t), ax))
                todo += [(c, ax, idx) for c in _companions(t, optimizer, own)
                         if c.shape[ax] == t.shape[ax]]  # (held memory: skipped by permute_unshared)
        with torch.no_grad():
            held.update(permute_unshared(todo, held))
    return follow


def permute_unshared(moves: list[tuple[Tensor, int, Tensor]], held: set) -> set:
    """``c.index_select(ax, idx)`` into each ``c`` (one copy's moves, a tensor possibly along two axes), except
    memory in ``held`` (the model's, or another copy's permuted before): a copy sharing a tensor with the model
    or another copy does not permute it a second time. Returns the memory written, for the caller to hold."""
    written = set()
    for c, ax, idx in moves:
        key = storage_key(c)
        if key is not None and key in held:
            continue
        c.data.copy_(c.data.index_select(ax, idx.to(c.device)))
        if key is not None:
            written.add(key)
    return written


def one_process(nest: Nest, who: str, data_based: bool) -> None:
    """Refuse a sort that ranks would do differently: under FSDP2 (sharded weights: sort in one process,
    before ``fully_shard``), and, in a process group of several ranks, a sort whose scores come from data (each
    rank's own batches would give each replica another order, silently: DDP does not compare weights)."""
    if is_fsdp(nest.model):
        raise SortedNetError(f"{who}: the model is sharded with FSDP2 (fully_shard), whose parameters cannot be "
                             "permuted in place across ranks; sort in one process, before fully_shard (or load "
                             "the checkpoint in one process with sn.load, sort, save)")
    if data_based and world_size() > 1:
        raise SortedNetError(f"{who} scores units from data, but a process group of {world_size()} ranks "
                             "is initialised: each rank would score its own batches and apply another order to "
                             "its replica, leaving the replicas different. Sort in one process before "
                             "distributing (or with a weight-norm method, 'l1' / 'l2' / 'bn', which every rank "
                             "computes alike)")


def sort_units(nest: Nest, method: str = "l1", *, example: Any = None, data: Iterable[Any] | None = None,
               loss_fn: Callable[[nn.Module, Any], Tensor] | None = None, atol: float | None = None,
               optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
               dims: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Permute the units of every Width / Heads dimension of ``nest`` (or of those named in ``dims``), most
    important first.

    ``method``: ``"l1"`` | ``"l2"`` | ``"bn"`` | ``"taylor"`` (needs ``data``, batches of
    ``(inputs, labels)`` or dicts with labels, or any batch with ``loss_fn(model, batch)``).
    ``example`` (default: the inputs of the first batch) is needed: it splits widths into
    their independently coupled groups and verifies that the full model's output is
    unchanged (relative ``atol``; default 1e-4, 5e-2 for a model with float16 / bfloat16 parameters, whose
    sums round differently once reordered); otherwise everything is restored and a SortedNetError
    raised. Returns the unit order applied per group (``"dim@first module"``).

    A parameter's ``.grad`` is permuted with it. An optimizer that already holds state for the
    model (momentum, Adam moments) must be passed as ``optimizer=`` (a list for several) so that its
    per-element state follows the units; sort before building the optimizer, or pass it (any other live
    optimizer holding such state gets an :class:`OptimizerStateWarning`). Copies of the
    model (an EMA or teacher ``copy.deepcopy``, which follow the nest's sub-models) are permuted with
    it (weights, ``.grad``, and the state of an optimizer of their own when it is passed in ``optimizer=``
    too; left out, it gets the warning); one that cannot follow (its modules changed) is refused at its next
    forward.

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> from sortednet.importance import sort_units
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> nest = sn.wrap(model, sn.Width("h", [2, 8], out="0", inp="2"))
    >>> x = torch.randn(3, 4)
    >>> before = model(x)
    >>> orders = sort_units(nest, "l1", example=x)
    >>> torch.allclose(model(x), before, atol=1e-6), list(orders)
    (True, ['h@0'])
    >>> norms = model[0].weight.abs().sum(1)
    >>> bool((norms[:-1] >= norms[1:]).all())
    True
    """
    if method not in METHODS:
        raise SortedNetError(f"sort_units: unknown method {method!r}; choose one of {list(METHODS)}")
    nest._check_structure("sort_units")
    one_process(nest, "sort_units", data_based=method == "taylor")
    if any(d.kind == "rank" for d in nest.dims):
        raise SortedNetError("sort_units permutes full weight matrices; sort a nest without a Rank dimension "
                             "first, then unwrap and wrap again with Rank")
    if not any(d.kind in ("width", "heads") for d in nest.dims):
        raise SortedNetError(f"sort_units: the nest has no Width or Heads dimension "
                             f"({[d.name for d in nest.dims]}), so there are no units to sort; nothing was changed")
    only = _only_dims(nest, dims)
    calibrated = nest._calibrated()
    if calibrated:
        raise SortedNetError(f"sort_units: {calibrated[:3]} hold calibrated per-sub-model BatchNorm statistics "
                             "that a permutation would invalidate; sort before nest.calibrate")
    with nest._pin.lock:
        copies = [c for c in nest._pin.copies.keys() if c is not nest.model]
    held = [n for c in copies for n, m in c.named_modules()
            if getattr(getattr(m.__dict__.get("_sn"), "norm", None), "stats", None)]
    if held:  # (a deep copy made after calibrate keeps its own statistics, per sub-model: they cannot follow)
        raise SortedNetError(f"sort_units: a deep copy of the model (an EMA or teacher copy) holds calibrated "
                             f"per-sub-model BatchNorm statistics at {held[:3]}, which a permutation would "
                             "invalidate (each describes the first channels of the old order); the copy's weights "
                             "would follow the sort, its statistics could not. Sort before nest.calibrate and "
                             "before copying the model, or drop the copy. Nothing was changed")
    if atol is None:
        half = any(p.is_floating_point() and p.dtype not in (torch.float32, torch.float64)
                   for p in nest.model.parameters())
        atol = 5e-2 if half else 1e-4  # half precision: a reordered sum rounds differently (bf16 ulp ~ 8e-3)
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not 0 <= atol < math.inf:
        raise SortedNetError(f"sort_units(atol=...) takes the relative tolerance of the full model's output, a "
                             f"finite number >= 0, got {atol!r}")
    if data is not None:
        if isinstance(data, (str, bytes, torch.Tensor)) or not isinstance(data, Iterable):
            raise SortedNetError(f"sort_units(data=...) takes batches of the model's input (a list or a "
                                 f"DataLoader), got {type(data).__name__}")
        data = list(data)
    if example is None and data is not None:
        example = _example_of(data)
    if example is None:
        raise SortedNetError("sort_units needs example= (or data=) to split and verify the permutation")
    from .kvcache import refuse_cache_example

    refuse_cache_example(example, "sort_units")
    optimizer = optimizers("sort_units", optimizer)
    moved = in_copies(nest, [p for m in nest._sliced.values() if any(  # (of the dimensions dims= names)
        b.dim.kind in ("width", "heads") and (only is None or b.dim.name in only) for b in m._sn.bind.values())
        for p in m.parameters(recurse=False)])
    check_states("sort_units", optimizer, moved, nest.model)
    refuse_held_outside(nest, moved, "sort_units", [  # (a Width / Heads's bindings: the units move together)
        [p for p, m in nest._sliced.items() if any(b.dim is d for r, b in m._sn.bind.items() if not r.startswith(
            "attr:"))] for d in nest.dims if d.kind in ("width", "heads") and (only is None or d.name in only)])
    stray = stray_optimizers(moved, optimizer)
    with eval_mode(nest) as (model, copies):  # a private eval-mode view: no training flag of the user's model
        orders, moves, token = _sort(nest, model, copies, method, example, data, loss_fn, atol, optimizer,  # flips
                                     only)
    nest._drop_scores("sort_units", orders.values(), follow=follow_moves(moves, optimizer, frozenset(
        id(t) for t in [*nest.model.parameters(), *nest.model.buffers()])), token=token)
    warn_stray_optimizers("sort_units", stray)  # (once the sort is done: a refused one moved nothing)
    return orders


def refuse_held_outside(nest: Nest, moved: Iterable[Tensor], what: str, groups: Sequence[Sequence[str]]) -> None:
    """Refuse a sort when a module outside the nest's model (and its views and deep copies) holds one of the
    model's modules whose subtree holds part, not all, of the modules a group of units moves together (``groups``:
    their paths; a stem shared with a second model, a block list two task models share), or a parameter the sort
    moves (a weight tied into another model): the permutation keeps the model's output, and changes that model's,
    in silence. A holder of the whole model (DDP, a compiled wrapper, a list of the model and its EMA), or of a
    part that holds whole groups, is no such module. Found by the objects referring to them (garbage, once
    collected, holds nothing)."""
    model = nest.model
    path_of = {id(m): p for p, m in model.named_modules() if m is not model}
    ids = {id(t) for t in moved}
    params = {id(t): n for n, t in model.named_parameters(remove_duplicate=False) if id(t) in ids}

    def straddles(h: str) -> bool:
        inside = [[p == h or p.startswith(f"{h}.") for p in g] for g in groups]
        return any(any(x) and not all(x) for x in inside)

    modules = {id(m): m for m in model.modules() if m is not model and straddles(path_of[id(m)])}
    tensors = {id(t): t for m in model.modules() for t in m._parameters.values() if t is not None and id(t) in params}

    def holders() -> list[str]:  # (three scans of the tracked objects, in C: who refers to them, to those dicts)
        mine = {id(d) for m in model.modules() for d in (m._modules, m._parameters)}
        dicts = [r for r in gc.get_referrers(*modules.values(), *tensors.values())
                 if type(r) in (dict, collections.OrderedDict) and id(r) not in mine]
        if not dicts:
            return []
        found: list[str] = []
        inner = {id(d): d for d in dicts}
        owners: dict[int, nn.Module] = {}
        for r in gc.get_referrers(*dicts):  # (a module refers to its _modules dict through its instance __dict__,
            if issubclass(type(r), nn.Module):  # or itself where Python keeps the attributes inline)
                owners[id(r)] = r
            elif type(r) is dict:
                owners.update((id(o), o) for o in gc.get_referrers(r) if issubclass(type(o), nn.Module))
        for obj in owners.values():
            own = object.__getattribute__(obj, "__dict__")
            if "_sn" in own:  # (a view's or copy's sliced modules hold the model's parameters: theirs follow)
                continue
            for store in ("_modules", "_parameters"):
                d = own.get(store)
                if isinstance(d, dict) and id(d) in inner:
                    found += [f"{type(obj).__name__}.{k} is the model's "
                              + (repr(path_of[id(v)]) if store == "_modules" else f"parameter {params[id(v)]!r}")
                              for k, v in d.items() if id(v) in (modules if store == "_modules" else tensors)]
        return found

    from .views import REGISTRATIONS, count_registrations

    count_registrations()  # (a new holder registers the module or weight it takes: none since the last look, none)
    key = (REGISTRATIONS[0], frozenset(modules), frozenset(tensors))
    if nest.__dict__.get("_held_outside_seen") == key:
        return
    held = holders() if modules or tensors else []
    if held:  # (garbage not collected yet holds nothing: found again after a collection, or not)
        gc.collect()
        held = holders()
    if not held:
        nest.__dict__["_held_outside_seen"] = key
    if held:
        raise SortedNetError(f"{what}: a module outside the nest's model holds what the sort would permute "
                             f"({'; '.join(held[:3])}): a model sharing a layer or a weight with it (a stem of two "
                             "task models, a tied weight) would compute with the new order where its own layers "
                             "read the old one, its output changed in silence. Wrap the model that holds every "
                             "user of the shared layer (one nest over both), or sort before sharing it. Nothing "
                             "was changed")


def _only_dims(nest: Nest, dims: Iterable[str] | None) -> frozenset[str] | None:
    """The names of the dimensions ``sort_units(dims=...)`` sorts (None: every Width and Heads)."""
    if dims is None:
        return None
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Iterable):
        raise SortedNetError(f"sort_units(dims=...) takes a list of dimension names, got {type(dims).__name__} "
                             f"{dims!r}; wrap one name in a list")
    names = list(dims)
    sortable = [d.name for d in nest.dims if d.kind in ("width", "heads")]
    bad = [n for n in names if n not in sortable]
    if bad or not names:
        raise SortedNetError(f"sort_units(dims=...): {bad if bad else 'an empty list'} "
                             f"{'names no Width or Heads dimension' if bad else 'sorts nothing'} of this nest "
                             f"(its Width and Heads dimensions: {sortable}); nothing was changed")
    return frozenset(names)


def in_copies(nest: Nest, params: list[Tensor]) -> list[Tensor]:
    """``params`` (the model's, which a sort permutes) and the same-named parameters of every live deep copy of
    the model (EMA / teacher copies follow the sort): an optimizer of a copy holds state for those."""
    with nest._pin.lock:
        copies = [c for c in nest._pin.copies.keys() if c is not nest.model]
    if not copies:
        return params
    ids = {id(p) for p in params}
    names = [n for n, p in nest.model.named_parameters(remove_duplicate=False) if id(p) in ids]
    out = list(params)
    for c in copies:
        mine = dict(c.named_parameters(remove_duplicate=False))
        out += [mine[n] for n in names if n in mine]
    return out


def _sort(nest: Nest, model: nn.Module, copies: dict[int, nn.Module], method: str, example: Any, data: Any,
          loss_fn: Callable | None, atol: float, optimizer: tuple[torch.optim.Optimizer, ...],
          only: frozenset[str] | None = None) -> tuple[dict[str, Tensor], list[tuple[str, str, int, Tensor]], Any]:
    err, maps = float("inf"), False
    heads = {d.full for d in nest.dims if d.kind == "heads"}
    counts = _head_counts(nest)
    with dry_run(nest.model), torch.no_grad(), _at_full(nest):
        try:
            ref = _leaves(call_model(model, example))
        except Exception as e:
            raise SortedNetError(f"sort_units: the full model does not run on the example: {type(e).__name__}: "
                                 f"{str(e)[:300]}; nothing was changed") from e
    floats = [t for t in ref if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    if not floats:
        raise SortedNetError("sort_units verifies that the full model's output is unchanged by the permutation, but "
                             "its output on the example holds no floating-point tensor (only indices, a top-k or a "
                             "bool mask), which cannot show a small change; sort a model (or a wrapper of it) that "
                             "returns the scores. Nothing was changed")
    if all(bool(t.isnan().all()) for t in floats):
        raise SortedNetError("sort_units verifies that the full model's output is unchanged by the permutation, but "
                             "its output on the example is NaN throughout, which shows no change: give an example "
                             "the model computes numbers on (its weights or the example hold NaN?). Nothing was "
                             "changed")
    if all(not bool(t.nan_to_num(posinf=0.0, neginf=0.0).any()) for t in floats):
        raise SortedNetError("sort_units: the full model's output on the example is all zeros, so no permutation "
                             "could change it and none can be verified: a zero-initialised output layer (sort "
                             "before zeroing it, or sort a wrapper that returns the features it reads), or an "
                             "all-zero input to a model without biases (give an example of real inputs). Nothing "
                             "was changed")
    from .check import _ignoring_queries_and_keys, _own_attentions

    with dry_run(nest.model), torch.no_grad():
        blind = _ignoring_queries_and_keys(nest, model, example, _own_attentions(nest, copies))
    if blind:
        d, path = blind[0]
        raise SortedNetError(f"sort_units: Heads {d.name!r} at {path or '<root>'!r}: on this example the "
                             "attention's output does not depend on its queries and keys (attention over one key "
                             "position returns its "
                             "values whatever the heads' order), so a permutation cannot be verified; give an "
                             "example of two or more positions. Nothing was changed")
    fresh = nest._scores_fresh()  # (before the check forwards below, which move running statistics' counters)
    tview, _ = train_view(nest, running_stats=True)  # batch statistics of a small example magnify rounding

    def train_out(seed: int) -> list[Tensor]:
        with dry_run(nest.model), seeded(seed), torch.no_grad(), _at_full(nest), _NoDropout():
            return _leaves(call_model(tview, example))

    random = False  # training mode random beyond dropout: compared under one seed, before and after
    try:  # training mode too (auxiliary heads, ...)
        ref_t = train_out(0)
        random = any(not torch.equal(a, b) for a, b in zip(ref_t, train_out(1)))
    except Exception as e:  # e.g. BatchNorm on a batch of one: the example does not run in training mode
        ref_t = None
        from .check import UncheckedTrainingWarning

        warnings.warn(f"sort_units: the full model fails in training mode on this example ({type(e).__name__}: "
                      f"{str(e)[:200]}), so the permutation is verified in eval mode only: a unit coupling that "
                      "only a training-mode branch reads (an auxiliary head) is not checked. Give an example the "
                      "model can train on (e.g. a batch of 2 or more for BatchNorm)", UncheckedTrainingWarning,
                      stacklevel=caller_outside())
    where = ""
    split = _groups(nest, example, only)
    taylor = _taylor(nest, model, split, data, loss_fn) if method == "taylor" else {}
    whole = _groups(nest, None, only)
    per_block = _per_block(nest, whole)  # (where the trace could not pair a layer's writers and readers: a fused
    for groups in (split, *([per_block] if per_block is not None else []), whole):  # gate_up chunked, a Linear
        _refuse_shared_memory(groups)  # subclass computing with its own matmul, each layer its own order still)
        held = {id(c): c for _, _, part, _ in groups for b in part for t, _ in b.tensors
                for c in _companions(t, optimizer)}
        saved = [(c, c.detach().clone()) for c in held.values()]
        orders = [_order(_scores(part, d.full, method, d.kind, taylor), block, part) for _, d, part, block in groups]
        err, where, token = None, "", None
        with torch.no_grad():
            try:
                count_load(nest.model)  # (the units move: replicas under DDP are compared again at the next step)
                token = nest._permuting(fresh)  # (copies in the old order: refused until followed, if this stops)
                moves = _apply(groups, orders, optimizer)
                casts_stale()  # (under autocast: the check forward, and the user's after it, see the new order)
                with dry_run(nest.model), _at_full(nest):
                    got = _leaves(call_model(model, example))
                err = rel_err(got, ref)
                if err > atol and rel_err(_maps_unordered(got, heads), _maps_unordered(ref, heads)) <= atol:
                    maps = True  # (only the attention maps among the outputs changed, by the heads' new order)
                elif err > atol and counts:  # (a per-head output other than maps, a key / value cache the model
                    err = rel_err(_heads_matched(got, ref, counts), ref)  # returns: reordered, no value changed)
                if err <= atol and ref_t is not None:
                    now = train_out(0)
                    err = rel_err(_heads_matched(now, ref_t, counts) if counts else now, ref_t)
                    where = " in training mode" if err > atol else ""
            except SortedNetError:
                err = float("inf")
            except BaseException:  # anything else (an interrupt, a failing forward): undo, then re-raise
                finish_all(_undo_steps(nest, saved, token))
                raise
            if err <= atol:
                return {label: o for (label, *_), o in zip(groups, orders)}, moves, token
            finish_all(_undo_steps(nest, saved, token))  # (every tensor, even after a Ctrl-C)
    if maps:
        raise SortedNetError("sort_units: the full model's output holds attention maps (batch, heads, queries, keys), "
                             "which a permutation of the heads reorders (its other outputs are unchanged): a model "
                             "whose result is per-head maps would change. Sort with the maps off "
                             "(output_attentions=False, or an example / wrapper whose output leaves them out). "
                             "Nothing was changed")
    if err == float("inf"):
        raise SortedNetError("sort_units: these dimensions cannot be permuted consistently (a tensor would follow two "
                             "groups, or one of its modules cannot be permuted); run nest.check(example)")
    raise SortedNetError(f"sort_units: permuting changes the full model's output{where} (by {err:.3g}, more than "
                         f"atol={atol:g}): "
                         + ("the training-mode run is random beyond dropout (dropout modules, functions and float "
                            "attributes named like *drop* are off there; a stochastic depth or feature noise is "
                            "not), so it was compared under one seed, and randomness drawn per unit moves with a "
                            "permutation: turn it off around sort_units if that is the cause. Otherwise a "
                            if where and random else "a ")
                         + "module coupled to a dimension is not declared in it"
                         + (" (one used only in training, e.g. an auxiliary head)" if where else "")
                         + _reader_only_hint(nest, only)
                         + "; run nest.check(example) to find it. If check passes, the model reads the units in "
                         "their order (cumsum / cummax over the features, a convolution or pooling along them, a "
                         "per-position table indexed by unit, or one layer's table read by all layers as T5's "
                         "relative position bias)" + _own_slicer_hint(nest) + ": prefixes still nest, but the units "
                         "cannot be sorted; train the nest unsorted" + (". For a transformers model, "
                         "sn.sort_by_importance sorts the layouts it knows and names the parts it cannot"
                         if type(nest.model).__module__.startswith("transformers.") else "")
                         + _cache_hint(nest) + ". Nothing was changed")


def _own_slicer_hint(nest: Nest) -> str:
    """Where modules of the nest are served by slicers of the user's: that one may hold a per-unit tensor its
    slicer does not declare (which ``check`` cannot see: it stays in place at every size)."""
    own = [f"{p or '<root>'!r} ({type(m._sn.slicer).__name__})" for p, m in nest._sliced.items()
           if not type(m._sn.slicer).__module__.startswith("sortednet.")]
    return "" if not own else (
        f", or a module of a slicer of yours ({', '.join(own[:3])}{' ...' if len(own) > 3 else ''}) holds a "
        "per-unit tensor its slicer does not declare (a buffer left out of attrs / views stays in place while the "
        "declared ones move; declare it)")


def _reader_only_hint(nest: Nest, only: frozenset[str] | None) -> str:
    """Widths sorted that bind only ``inp=`` (features other layers write) or only ``out=`` (features other layers
    read): one half of a pair coupled by ``submodels=`` (channels before a flatten, features after it), whose
    units a sort orders apart from the other half's; named, with the ``dims=`` that sorts the rest."""
    roles: dict[str, set[str]] = {}
    for m in nest._sliced.values():
        for role, b in m._sn.bind.items():
            if b.dim.kind == "width" and (only is None or b.dim.name in only):
                roles.setdefault(b.dim.name, set()).add(role)
    halves = [n for n, r in roles.items() if r in ({"inp"}, {"out"})]
    if not halves or nest._rows is None:
        return ""
    rest = [d.name for d in nest.dims if d.kind in ("width", "heads") and d.name not in halves
            and (only is None or d.name in only)]
    return (f" (Width {halves[:3]} binds only inp= or only out=: one half of features coupled through "
            "submodels= (listed size for size with another dimension), whose units a sort cannot order with the "
            "other half's" + (f"; sort the others alone with dims={rest})" if rest else ")"))


def _cache_hint(nest: Nest) -> str:
    """A model whose forward takes a key/value cache of plain tensors returns one too: sorted heads reorder its keys
    and values, which the output comparison counts."""
    from .kvcache import CacheGuard

    if not any(d.kind == "heads" for d in nest.dims) or not any(
            isinstance(h, CacheGuard) and h.plain for h in nest.model._forward_pre_hooks.values()):
        return ""
    return (". If the model returns its key/value cache as tensors (a list of (k, v)), that is compared too and "
            "sorted heads reorder its keys and values: sort a wrapper module that returns only the logits, on the "
            "same modules")


def _undo_steps(nest: Nest, saved: list[tuple[Tensor, Tensor]], token: Any) -> list[Callable[[], None]]:
    """Every saved tensor back, then the nest told that no unit moved (see :func:`sortednet.modes.finish_all`)."""
    return [functools.partial(_put_back, saved), *([functools.partial(nest._unpermuted, token)] if token else [])]


def _put_back(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for c, v in saved:
            c.copy_(v)
    casts_stale()


class _NoDropout(TorchFunctionMode):
    """Dropout functions called in a forward (``F.dropout(h, self.p, self.training)``, whatever the attribute's
    name) return their input: a per-element mask would move with a permutation of the units."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _DROPOUTS:
            return args[0] if args else kwargs["input"]
        return func(*args, **kwargs)


_DROPOUTS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                       torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout})


def rel_err(got: list[Tensor], ref: list[Tensor]) -> float:
    """Largest change of an output relative to that output's own scale, so small-valued outputs count too;
    an output below 1e-4 of the largest one's scale (rounding noise around zero, e.g. the mean of normalised
    features returned for logging) is measured against that floor instead. Non-finite values (logits masked
    to -inf) must stay where and what they are (else 1.0); the finite ones are compared. Integer / bool outputs
    (indices, masks) are not: an argmax near a tie may flip by rounding alone (the scores beside them are
    compared; an output of no floats is refused before). Outputs that differ in shape: inf."""
    if len(got) != len(ref):
        return float("inf")
    pairs, exact = [], 0.0
    for a, b in zip(got, ref):
        if not isinstance(a, Tensor) or not isinstance(b, Tensor) or not b.numel():
            continue
        if a.shape != b.shape:
            return float("inf")
        if not b.is_floating_point():
            continue
        a, b = a.detach().double(), b.detach().double()
        fin = torch.isfinite(b)
        if not bool(fin.all()):
            odd = {"nan": 0.0, "posinf": 1.0, "neginf": -1.0}
            if not torch.equal(torch.isfinite(a), fin) or not torch.equal(a[~fin].nan_to_num(**odd),
                                                                          b[~fin].nan_to_num(**odd)):
                exact = max(exact, 1.0)
                continue
            a, b = a[fin], b[fin]
        a, b = without_fills(a, b)  # (a -1e9 mask would set the scale: measured like -inf, where it stays)
        if b.numel():
            pairs.append((a, b))
    if not pairs:
        return exact
    floor = 1e-4 * max(b.abs().max().item() for _, b in pairs)
    return max(exact, *(((a - b).abs().max() / b.abs().max().clamp_min(max(floor, 1e-30))).item() for a, b in pairs))

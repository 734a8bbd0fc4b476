"""check: a dry run of a nest that names the missing binding of any wiring mistake.

``nest.check(example)`` runs, without gradients, in eval mode and again in
training mode (dropout off; training-only branches such as auxiliary heads
must be wired too), each dimension alone at its smallest size, each depth below full (the shallowest and the
deepest also with each other dimension at its smallest), the smallest and the largest sub-model and a few
mixed ones; their outputs must
keep the full model's shapes (a lower depth those of the full widths at that depth, fewer heads may
shorten attention maps) and
``export`` of the smallest must equal its live output. When one fails, the
wiring is compared with the coupled groups found by :mod:`sortednet.coupling`
and the error names the dimension, the module path and the role (``out=``,
``inp=``, ``norm=``) that is missing, instead of a raw shape error.
"""

from __future__ import annotations

import cmath
import contextlib
import contextvars
import copy
import dataclasses
import functools
import inspect
import math
import numbers
import os
import random
import re
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .cost import call_model
from .coupling import MOVED, analyse
from .coupling_ops import _hf_conv1d, leaves, without_fills
from .errors import SortedNetError, caller_outside
from .export import CompiledForwardWarning
from .modes import dry_run, eval_mode, eval_view, finish_all, seeded, train_view
from .plan import Use
from .slicers import slicer_for
from .slicers.base import Slicer
from .submodel import SubModel
from .wrap import split_ties

if TYPE_CHECKING:
    from .nest import Nest

__all__ = ["check", "diagnose", "moved_features", "whole_units_error"]


def _bound(nest: Nest) -> dict[tuple[str, str], Any]:
    """(module path, role) -> the Width dimension that slices it."""
    return {(path, role): b.dim for path, m in nest._sliced.items() for role, b in m._sn.bind.items()
            if role in ("out", "inp", "norm") and b.dim.kind == "width"}


_MOVED = MOVED  # (why the wiring trace fixes an axis when an op moves units between positions: coupling.py)


def _bound_groups(nest: Nest, example: Any, model: Any) -> list[tuple[Any, list[tuple[tuple[str, str], Any]]]]:
    """The coupled groups of the traced wiring (at the largest sub-model) that hold a binding of a Width of
    ``nest``, each with those bindings ``((path, role), dimension)``."""
    bound = _bound(nest)
    if not bound:
        return []
    with nest.use(nest.largest):
        groups = analyse(nest.model if model is None else model, example).groups
    return [(g, mine) for g in groups if (mine := [(k, bound[k]) for k in g.bindings if k in bound])]


def moved_features(nest: Nest, example: Any, model: Any = None) -> list[tuple[Any, str, str]]:
    """``(dimension, op, message)`` for each group of Width features that reaches an op moving them between
    positions (:data:`_MOVED`), leaving out dimensions with ``chunks=`` (``check`` measures a fused output unit
    by unit). ``model``: as for :func:`diagnose`."""
    return _traced_findings(nest, example, model)[0]


_UNKNOWN = "an op discovery does not understand"  # (the reason the wiring trace gives: coupling.py)
#: a tensor the trace did not see made (``torch.from_numpy``, ``x.new_tensor([...])`` of a list sized by the width):
#: sized with the features where the dry runs pass, it was built from the width, outside what the trace follows
_OUTSIDE = "a tensor from outside the traced ops"


def _traced_findings(nest: Nest, example: Any, model: Any,
                     groups: list | None = None) -> tuple[list[tuple[Any, str, str]], list[str]]:
    """:func:`moved_features`, and the groups that reach an op the wiring trace does not understand (``gather``,
    ``torch.cond``, an op of the user's) outside the modules the nest slices (whether a sub-model's first units
    are the full model's there cannot be told; the shapes may still fit), from one trace of the wiring
    (``groups``: :func:`_bound_groups` traced already)."""
    moved, unfollowed = [], []
    for g, mine in _bound_groups(nest, example, model) if groups is None else groups:
        if any(getattr(d, "chunks", None) for _, d in mine):
            continue
        (p0, r0), d0 = mine[0]
        off = sorted({n for _, d in mine for n in d.sizes if g.divides % n}) if g.divides else []
        if off and (g.fixed is None or not _MOVED.search(g.fixed)):  # (a roll by a multiple of the traced size)
            moved.append((d0, f"rolled by {g.divides}", f"{d0.kind} {d0.name!r}: the features of {p0!r} ({r0}=) "
                          f"are rolled by {g.divides} positions (the identity at the full size, a multiple of it), "
                          f"which moves them at size(s) {off} that do not divide it: a sub-model's first units are "
                          "not the full model's there (its shapes still fit, so the dry runs pass); remove the roll "
                          "or that binding"))
        if g.fixed is None or off:
            continue
        if _MOVED.search(g.fixed):
            whose = f"the features {p0!r} reads (inp=)" if r0 == "inp" else f"the features of {p0!r} ({r0}=)"
            moved.append((d0, g.fixed, f"{d0.kind} {d0.name!r}: {whose} are moved between positions on their way "
                                       f"({g.fixed}): a sub-model's first units are not the "
                                       "full model's there (its shapes still fit, so the dry runs pass); remove that "
                                       "binding, or for a fused output (gate|up) declare chunks=, for whole heads "
                                       "split by a view declare sn.Heads"))
        elif (_UNKNOWN in g.fixed or _OUTSIDE in g.fixed) and not _inside_sliced(nest, g.fixed):
            # (inside a module a slicer of the user's slices, its forward recorded op by op, the slicer stands for it)
            unfollowed.append(f"{d0.kind} {d0.name!r}: the features of {p0!r} ({r0}=) reach {g.fixed}")
    return moved, unfollowed


def _inside_sliced(nest: Nest, fixed: str) -> bool:
    """Whether the op ``fixed`` names ran in the forward of a module ``nest`` slices (or below it)."""
    where = re.search(r"\(in '([^']*)'\)", fixed)
    if where is None:
        return False
    at = "" if where.group(1) == "<root>" else where.group(1)
    return any(at == p or (p == "" and at) or at.startswith(f"{p}.") for p in nest._sliced)


_RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"})


class _ReshapeLog(TorchFunctionMode):
    """Records ``(input shape, output shape)`` of every view / reshape / flatten / unflatten, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in _RESHAPES and args and isinstance(args[0], torch.Tensor) \
                and isinstance(out, torch.Tensor):
            self.calls.append((tuple(args[0].shape), tuple(out.shape)))
        return out


def _axis_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """The axes of shape ``a`` and of shape ``b`` (one reshaped into the other) that hold the same elements, in
    order: ``(16,) -> (4, 4)`` is one group ``([0], [0, 1])``; None where they do not factor (a zero size)."""
    if 0 in a or 0 in b:
        return None
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i == len(a) or j == len(b):  # trailing size-1 axes
            if any(x != 1 for x in a[i:]) or any(x != 1 for x in b[j:]):
                return None
            groups.append((list(range(i, len(a))), list(range(j, len(b)))))
            break
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i == len(a):
                    return None
                gi.append(i)
                pa, i = pa * a[i], i + 1
            else:
                if j == len(b):
                    return None
                gj.append(j)
                pb, j = pb * b[j], j + 1
        groups.append((gi, gj))
    return groups


def _reshape_calls(nest: Nest, sub: SubModel, example: Any, model: Any) -> list[tuple[tuple[int, ...], ...]]:
    """``(input shape, output shape)`` of every view / reshape / flatten / unflatten of one forward of ``sub``."""
    log = _ReshapeLog()
    with Use(nest._state, nest._plans.build(sub)), seeded(0), log:
        call_model(model, example)
    return log.calls


def _recut(ref: list[tuple[tuple[int, ...], ...]], got: list[tuple[tuple[int, ...], ...]]) -> bool | None:
    """Whether a view / reshape re-cuts units between the full model's calls ``ref`` and a sub-model's ``got``
    (:func:`_reshape_calls`): only the leading axis (of size > 1) of a group of axes may shrink, on both sides:
    ``view(B, T, -1, head_dim)`` keeps whole heads; ``view(B, T, 4, -1)`` shrinks every head, and a channels-last
    flatten interleaves channels; and each group of axes must shrink alike on both sides (``reshape(B, 16, -1)``
    of 4 channels, 16 a count stored at full size, moves channels into the last axis). Decided on shapes alone
    (values, the example's contents and the weights cannot hide it). None when the calls cannot be aligned
    (size-dependent control flow)."""
    if len(got) != len(ref):
        return None
    for (fa, fb), (sa, sb) in zip(ref, got):
        if (fa, fb) == (sa, sb):
            continue
        groups = _axis_groups(fa, fb)
        if groups is None or len(sa) != len(fa) or len(sb) != len(fb):
            return None
        for gi, gj in groups:
            if math.prod(sa[x] for x in gi) * math.prod(fb[x] for x in gj) != \
                    math.prod(fa[x] for x in gi) * math.prod(sb[x] for x in gj):
                return True  # (units moved between groups: reshape(B, 16, -1) of 4 channels, 16 a stored count)
            lead_i = next((x for x in gi if fa[x] != 1), gi[0] if gi else None)  # (trailing size-1 axes
            lead_j = next((x for x in gj if fb[x] != 1), gj[0] if gj else None)  # may match nothing)
            if [x for x in gi if fa[x] != sa[x]] not in ([], [lead_i]) or \
                    [x for x in gj if fb[x] != sb[x]] not in ([], [lead_j]):
                return True
    return False


def diagnose(nest: Nest, example: Any, model: Any = None, *, coupling_only: bool = False,
             groups: list | None = None, dims_of: list | None = None) -> list[str]:
    """Wiring problems of ``nest``'s Width dimensions: coupled roles left out or split between dimensions.

    ``model``: the module tree to trace (default ``nest.model``; ``check`` passes its eval-mode view).
    ``coupling_only``: only features shared with modules no dimension slices, and features two dimensions
    slice where a listed sub-model gives them other sizes (what no dry run may show: a forward that adds a skip
    only where the shapes match drops it in silence); ``groups``: :func:`_bound_groups` traced already;
    ``dims_of``: filled with the dimensions each problem concerns, in order."""
    problems = []
    bound = _bound(nest)
    first = {id(m): n for n, m in nest.model.named_modules()}  # (a module held under two names: patterns match
    canon = {n: first[id(m)] for n, m in nest.model.named_modules(remove_duplicate=False)}  # its first name)
    for g, mine in _bound_groups(nest, example, model) if groups is None else groups:
        dims = list(dict.fromkeys(d.name for _, d in mine))
        (p0, r0), d0 = mine[0]
        if coupling_only and len(dims) > 1:
            binds = [nest._sliced[canon.get(p, p)]._sn.bind[r] for (p, r), _ in mine]
            if not any(len({b.features(sub[b.dim.name]) for b in binds}) > 1 for sub in nest.submodels):
                dims = dims[:1]  # (every listed sub-model gives them one size: a restricted nest coupling them)
        involved = list(dict.fromkeys(d for _, d in mine))
        if len(dims) > 1:
            problems.append(f"dimensions {dims} slice features that must shrink together "
                            f"({[f'{p}:{r}=' for (p, r), _ in mine][:6]}); declare them as one dimension")
            if dims_of is not None:
                dims_of.append(involved)
        missing = [k for k in dict.fromkeys((canon.get(p, p), r) for p, r in g.bindings) if k not in bound]
        if coupling_only:  # (a norm without tensors that a binding would not change: computes the same unbound)
            missing = [k for k in missing if not (k[1] == "norm" and _inert_norm(nest.model, k[0]))]
        if missing:
            lst = ", ".join(f"{r}={p!r}" for p, r in missing[:8]) + (" ..." if len(missing) > 8 else "")
            alone = len(mine) == 1 and sum(d is d0 for d in bound.values()) > 1
            problems.append(f"{d0.kind} {d0.name!r}: {p0!r} ({r0}=) shares its {g.size} features with modules it "
                            f"does not slice; add {lst}" + (
                                f"; or, if {p0!r} uses another axis of the same size (none of the dimension's "
                                "other modules reads or writes these features; e.g. a token-mixing layer's "
                                f"sequence axis), remove {r0}={p0!r}" if alone else ""))
            if dims_of is not None:
                dims_of.append(involved)
        elif g.fixed is not None and not coupling_only:
            own = next((p for p, m in nest._sliced.items() if p and f"'{p}." in g.fixed and any(
                b.dim is d0 for b in m._sn.bind.values()) and _sliced_attr(m, p, g.fixed)), None)
            if own is not None:  # a module this dimension slices, recorded op by op (a slicer of the user's)
                problems.append(f"{d0.kind} {d0.name!r}: the features of {p0!r} ({r0}=) reach {g.fixed}, which "
                                f"this dimension slices itself: {nest._sliced[own]._sn.cls.__name__} {own!r} has a "
                                "forward the wiring trace does not know, so it cannot name what is missing; check "
                                "that every module reading or writing these features is bound (same-kind modules "
                                "of every layer, the final norm, position embeddings)")
            elif (hint := _unbound_owner(nest, g.fixed)) is not None:
                problems.append(f"{d0.kind} {d0.name!r}: the features of {p0!r} ({r0}=) reach {g.fixed}, of a "
                                f"module it does not slice; add {hint}")
            elif (inner := _user_sliced_at(nest, g.fixed)) is not None:  # (the op ran in the forward of a module
                problems.append(                                       # a slicer of the user's serves)
                    f"{d0.kind} {d0.name!r}: the features of {p0!r} ({r0}=) reach {g.fixed}, inside {inner[0]!r}, "
                    f"which the slicer {inner[1]} of your own serves: the wiring trace does not follow that "
                    "forward, so whether the binding is right cannot be told here; if a dry run failed, check "
                    "that slicer first (its views / value() must cut every tensor the forward reads by the right "
                    "role: docs/custom_slicers.md)")
            else:
                raw = re.fullmatch(r"(?:parameter|buffer) '(.+)'", g.fixed)
                problems.append(f"{d0.kind} {d0.name!r}: the features of {p0!r} ({r0}=) reach {g.fixed}, so they "
                                "cannot shrink; remove that binding" + (
                                    f", or, to slice them, hold {raw.group(1)!r} in a module a slicer serves "
                                    "(nn.LayerNorm / nn.RMSNorm for a norm weight; a small module of yours with "
                                    "@sn.slicer for a layer scale or a token: docs/custom_slicers.md) and bind "
                                    "that module" if raw else ""))
    return problems


def _user_sliced_at(nest: Nest, fixed: str) -> tuple[str, str] | None:
    """(path, slicer name) of the module a slicer of the user's serves whose forward ran the op ``fixed`` names
    (``"'linear' (in '0'), ..."``), or None."""
    where = re.search(r"\(in '([^']*)'\)", fixed)
    if where is None:
        return None
    at = "" if where.group(1) == "<root>" else where.group(1)
    for p, m in nest._sliced.items():
        if (at == p or at.startswith(f"{p}.")) and not type(m._sn.slicer).__module__.startswith("sortednet."):
            return p or "<root>", type(m._sn.slicer).__name__
    return None


def _unbound_owner(nest: Nest, fixed: str) -> str | None:
    """``role='path'`` when ``fixed`` names a parameter of a module that a slicer with one role could slice
    but that no dimension binds (a norm of the user's, traced op by op, left out of ``norm=``)."""
    found = re.fullmatch(r"(?:parameter|buffer) '(.+)\.[^.']+'", fixed)
    if found is None:
        return None
    path = found.group(1)
    try:
        m = nest.model.get_submodule(path)
    except AttributeError:
        return None
    sl = None if "_sn" in m.__dict__ else slicer_for(m)
    return None if sl is None or len(sl.roles) != 1 else f"{sl.roles[0]}={path!r}"


def output_leaves(out: Any) -> list[Any]:
    """The leaves of a model output (pytree containers and dataclasses opened); an object of another class
    (a ``torch.distributions`` policy, a result record) is opened one level: its tensor attributes, by name."""
    out_ = []
    for leaf in leaves(out):
        if isinstance(leaf, torch.Tensor) or not hasattr(leaf, "__dict__") or isinstance(leaf, (type, nn.Module)):
            out_.append(leaf)
            continue
        ts = [v for _, v in sorted(vars(leaf).items()) if isinstance(v, torch.Tensor)]
        out_ += ts if ts else [leaf]
    return out_


def first_float(out: Any) -> torch.Tensor | None:
    """The first floating-point tensor of a model output (logits / last hidden state / the tensor itself)."""
    return next(iter(float_outputs(out)), None)


def float_outputs(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output, in order (a complex one as its real view: (..., 2) reals)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [torch.view_as_real(t) if t.is_complex() else t for t in output_leaves(out)
            if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _maskable() -> tuple[type, ...]:
    conv1d = _hf_conv1d()  # GPT-2's transposed Linear
    return (nn.Linear, *_CONVS) if conv1d is None else (nn.Linear, *_CONVS, conv1d)


def _is_maskable(m: nn.Module) -> bool:
    """A reading module whose input units are its weight's columns (a grouped conv mixes no units across
    groups: its columns are not the input channels)."""
    return isinstance(m, _maskable()) and (not isinstance(m, _CONVS) or m.__dict__.get("groups", 1) == 1)


def _depthwise(m: nn.Module) -> bool:
    """A depthwise convolution (groups == in == out channels, full sizes)."""
    d = m.__dict__
    return isinstance(m, _CONVS) and d.get("groups", 1) > 1 and d.get("groups") == d.get("in_channels") == d.get(
        "out_channels")


def _mixes_units(nest: Nest, dim: Any) -> bool:
    """Whether a norm bound to ``dim`` normalises across its units (LayerNorm, GroupNorm, RMSNorm: the full
    model with units masked is then no reference); BatchNorm keeps every channel to itself."""
    return any(not isinstance(m, _BatchNorm) for m in nest._sliced.values()
               if "norm" in m._sn.bind and m._sn.bind["norm"].dim is dim)


def _input_axis(m: nn.Module) -> int:
    """Axis of ``m``'s weight that its input features index (GPT-2's Conv1D stores ``(in, out)``)."""
    return 1 if isinstance(m, (nn.Linear, *_CONVS)) else 0


def _feature_axis(m: nn.Module) -> int:
    """Axis of ``m``'s input that holds its input features (channels of a conv: axis 1)."""
    return 1 if isinstance(m, _CONVS) else -1


def whole_units_error(nest: Nest, dim: Any, size: int, example: Any, model: Any = None,
                      copies: dict[int, nn.Module] | None = None, within: nn.Module | None = None) -> float | None:
    """How far ``dim`` at ``size`` (the others full) is from being the first ``size`` whole units.

    The reference is the FULL model with the weight columns of the projections that read ``dim``'s
    units (``inp=`` bindings: attention output / FFN down projections) zeroed beyond the first
    ``size``: exactly "the model with only those units" when units are independent (whole heads),
    however the projection's weight is read (its forward, ``F.linear(x, proj.weight)``,
    ``nn.MultiheadAttention``). Two measures, the larger is returned: each floating-point output's largest
    difference relative to its scale (at least 1), of the outputs the masking reaches (the full model's differs
    with the units masked; one that shrinks with the units is skipped), and, where the reading projections are
    called through their forward, the largest difference of each one's input (the kept units' values,
    layer by layer) relative to that input's own scale, which a large residual stream cannot hide.
    None when it cannot be measured (a reading module that is not a plain Linear / Conv1D or whose
    weight is factorised). ``model`` / ``copies``: the module tree to run (e.g.
    :func:`sortednet.modes.eval_mode`'s view) and its module map; ``within``: only the reading projections
    inside this module (of ``model``) count.
    """
    model = nest.model if model is None else model
    copies = copies or {}
    reads = [(copies.get(id(m), m), m._sn.bind["inp"]) for m in nest._sliced.values()
             if "inp" in m._sn.bind and m._sn.bind["inp"].dim is dim]
    if within is not None:
        inside = {id(m) for m in within.modules()}
        reads = [(m, b) for m, b in reads if id(m) in inside]
    # a plain reader's weight columns are masked; a rank-factorised one's (whose weight is computed) input, and
    # a depthwise convolution's (each channel its own: masking its input channels is the model without them)
    by_input = {id(m) for m, _ in reads if "rank" in m._sn.bind or _depthwise(m)}
    if not reads or any(id(m) not in by_input and (not _is_maskable(m) or not isinstance(
            m._parameters.get("weight"), torch.Tensor)) for m, _ in reads):
        return None
    full = SubModel({d.name: d.full for d in nest.dims})
    if size not in dim.sizes:
        return None
    # measured at sizes the nest may not list (a restricted nest): the plans exist for any sizes
    sub_plan, full_plan = nest._plans.build(full.replace(**{dim.name: size})), nest._plans.build(full)  # uncached:
    # use() of a restricted nest must not find plans of sub-models it does not list
    inputs: dict[str, dict[int, list[torch.Tensor]]] = {"live": {}, "ref": {}}

    def capture(run: str, keep: int, axis: int) -> Any:
        def hook(mod: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() > max(axis, 0):
                inputs[run].setdefault(id(mod), []).append(_dense(args[0]).narrow(axis, 0, keep).detach().double())
        return hook

    # the attention modules' own outputs too (Heads): a reader called as F.linear(y, o.weight) inside a
    # residual block has no input to capture, and a large residual stream would hide its error at the output
    attns = _attention_modules(nest, dim, copies, within)
    outputs: dict[str, dict[int, list[torch.Tensor]]] = {"live": {}, "ref": {}}
    # what the attention modules inside the model return beside their output (attention weights, averaged over
    # the heads in force; caches), per call, from the sub-model's run: the reference gets the sub-model's, so that
    # a forward reading them (a map returned for a plot, a loss on it, a rollout, a top-k of it) reads alike in
    # both, and every output the masking reaches is measured
    aside: dict[int, list[list[torch.Tensor | None]]] = {}

    def keep_output(run: str) -> Any:
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            y = first_float(out)
            if y is not None:
                outputs[run].setdefault(id(mod), []).append(_dense(y).detach().double())
            if run == "live" and mod is not model:
                aside.setdefault(id(mod), []).append(
                    [t.detach() if _is_float(t) and t is not y else None for t in tree_flatten(out)[0]])
        return hook

    calls: dict[int, int] = {}

    def sub_models_aside(mod: nn.Module, args: tuple, out: Any) -> Any:
        """The sub-model's tensors of this call in place of the reference's, where shapes agree."""
        i = calls[id(mod)] = calls.get(id(mod), -1) + 1
        live_ = aside.get(id(mod), [])
        if mod is model or i >= len(live_):
            return None
        flat, spec = tree_flatten(out)
        y = first_float(out)
        if len(flat) != len(live_[i]):
            return None
        new = [t2 if t2 is not None and _is_float(t) and t is not y and t2.shape == t.shape else t
               for t, t2 in zip(flat, live_[i])]
        if all(a is b for a, b in zip(new, flat)):
            return None
        try:
            return tree_unflatten(new, spec)
        except Exception:  # (a container pytree cannot rebuild: left as it is)
            return None

    def mask_input(keep: int, axis: int) -> Any:
        def hook(mod: nn.Module, args: tuple) -> tuple | None:
            if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() <= max(axis, 0):
                return None
            x = args[0].clone()
            x.narrow(axis, keep, x.shape[axis] - keep).zero_()
            return (x, *args[1:])
        return hook

    hooks = [m.register_forward_pre_hook(capture("live", b.total(size), _feature_axis(m))) for m, b in reads]
    hooks += [a.register_forward_hook(keep_output("live")) for a in attns]
    try:
        with Use(nest._state, sub_plan), seeded(0):  # a forward that samples (a VAE) draws alike in both runs
            live = float_outputs(call_model(model, example))
    except Exception:  # sizes a restricted nest does not list (never dry-run) may not run: nothing to measure
        return None
    finally:
        for h in hooks:
            h.remove()
    held = [(m, m._parameters["weight"]) for m, _ in reads if id(m) not in by_input]

    def masked_run(hooks: list[Any]) -> list[torch.Tensor]:
        """The full model with the readers' columns past ``size`` masked (and ``hooks``, removed after)."""
        hooks = hooks + [m.register_forward_pre_hook(mask_input(b.total(size), _feature_axis(m)), prepend=True)
                         for m, b in reads if id(m) in by_input]
        try:
            for (m, b) in reads:  # swapped in this module's own parameter dict, not written
                if id(m) in by_input:
                    continue
                w = m._parameters["weight"]
                masked = w.detach().clone()
                masked.narrow(_input_axis(m), b.total(size), w.shape[_input_axis(m)] - b.total(size)).zero_()
                m._parameters["weight"] = masked
            with Use(nest._state, full_plan), seeded(0):
                return float_outputs(call_model(model, example))
        finally:
            for h in hooks:
                h.remove()
            for m, w in held:
                m._parameters["weight"] = w

    ref = masked_run([m.register_forward_pre_hook(capture("ref", b.total(size), _feature_axis(m))) for m, b in reads]
                     + [a.register_forward_hook(keep_output("ref")) for a in attns]
                     + [a.register_forward_hook(sub_models_aside) for a in attns])
    if by_input and not all(id(m) in inputs["ref"] for m, _ in reads if id(m) in by_input):
        return None  # a factorised reader read without its forward: its input could not be masked
    try:
        with Use(nest._state, full_plan), seeded(0):  # (the full model unmasked: which outputs the masking reaches)
            plain = float_outputs(call_model(model, example))
    except Exception:
        return None
    # every output of the model the masked units reach (the full model's differs with them masked) and that keeps
    # its shape, each of which must match: not one that shrinks with the units (a per-head attention map or cache),
    # nor one the masking does not reach (the input or embeddings returned beside the output: equal in every run,
    # it vouches for nothing); then the measures inside the model, each of which must match
    reached = [(x, y) for x, y, z in zip(live, ref, plain) if x.shape == y.shape == z.shape and y.numel()
               and not torch.equal(y, z)] if len(live) == len(ref) == len(plain) else []
    errs = _rel_diffs([(x.detach().double(), y.detach().double()) for x, y in reached])
    for k, ys in outputs["live"].items():
        for x, y in zip(ys, outputs["ref"].get(k, ())):
            if x.shape == y.shape and y.numel():
                errs.append(_rel_diff(x, y, 1e-12))
    a, b = inputs["live"], inputs["ref"]
    if set(a) == set(b) == {id(m) for m, _ in reads} and all(len(a[k]) == len(b[k]) for k in a):
        for k in a:
            for x, y in zip(a[k], b[k]):
                if x.shape == y.shape and y.numel():
                    errs.append(_rel_diff(x, y, 1e-12))
    return max(errs) if errs else None


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t``, a nested tensor (a TransformerEncoder's padded batch on its fast path) padded with zeros."""
    return t.to_padded_tensor(0.0) if t.is_nested else t


def _attention_paths(nest: Nest, d: Any, modules: dict[str, nn.Module]) -> list[str]:
    """The paths of the attention modules a Heads ``d`` names, each once."""
    from .patterns import match

    return list(dict.fromkeys(p for pat in d.attn for p in match(pat, modules, f"Heads {d.name!r} attn")))


#: set by ``from_transformers`` while it wraps: the transformers attention classes it declares Heads on are its
#: own layouts, which it verifies itself once the nest is made
FROM_TRANSFORMERS: contextvars.ContextVar[bool] = contextvars.ContextVar("sortednet_from_transformers", default=False)


def _known_layout(m: nn.Module, nest: Nest) -> bool:
    """``nn.MultiheadAttention`` (sortednet runs it itself) or a transformers class in a nest made by
    ``from_transformers`` (which verifies it): not hand-written attention. A transformers class under a
    ``Heads`` declared by hand is checked like any module of the user's."""
    cls = type(m).__bases__[0] if getattr(type(m), "_sn_sliced", False) else type(m)
    hf = getattr(nest, "_hf", None) is not None or FROM_TRANSFORMERS.get()
    return issubclass(cls, nn.MultiheadAttention) or (hf and cls.__module__.startswith("transformers."))


def _hand_written_attentions(nest: Nest) -> Iterator[tuple[Any, str, nn.Module]]:
    """(Heads, path, module) of every hand-written attention module a Heads below its full size slices."""
    modules = dict(nest.model.named_modules())
    for d in nest.dims:
        if d.kind == "heads" and d.sizes[0] < d.full:
            for p in _attention_paths(nest, d, modules):
                if not _known_layout(modules[p], nest):
                    yield d, p, modules[p]


def _own_attentions(nest: Nest, copies: dict[int, nn.Module]) -> list[tuple[Any, str, nn.Module, list[tuple]]]:
    """(Heads, path, module as run, its query / key producers as run) of the hand-written attention modules
    the nest's Heads slice. A producer is ``(projection, rows)``: separate q and k projections (rows None,
    all of their outputs), or a stacked fused ``[q; k; v]`` projection with its query and key rows; an
    interleaved fused projection has none."""
    from .heads import STACKED_NAMES, fused_qkv, separate_qkv

    out = []
    for d, p, m in _hand_written_attentions(nest):
        children = {n for n, _ in m.named_children()}
        names = d.qkv if isinstance(d.qkv, tuple) else None if isinstance(d.qkv, str) else separate_qkv(children)
        fused = d.qkv if isinstance(d.qkv, str) else None if names else fused_qkv(children)
        qk: list[tuple] = []
        if names:
            try:
                qk = [(copies.get(id(q), q), None) for q in (m.get_submodule(n) for n in names[:2])]
            except AttributeError:  # (Heads refused such a declaration at wrap)
                qk = []
        elif fused is not None and (d.layout or ("stacked" if fused in STACKED_NAMES else None)) == "stacked":
            rows = _stacked_qk_rows(m, fused, d, nest)
            if rows:
                f = m.get_submodule(fused)
                qk = [(copies.get(id(f), f), rows)]
        out.append((d, p, copies.get(id(m), m), qk))
    return out


def _stacked_qk_rows(m: nn.Module, fused: str, d: Any, nest: Nest) -> int:
    """How many of a stacked fused projection's outputs are queries and keys (0 if not told): the output
    projection reads the queries' width, and the keys are as wide as the values."""
    inside = {id(c) for c in m.modules()}
    o = next((q for q in nest._sliced.values() if id(q) in inside and q._sn.bind.get("inp") is not None
              and q._sn.bind["inp"].dim is d), None)
    f = m.get_submodule(fused)
    total = f.__dict__.get("out_features") or f.__dict__.get("nf")
    width = None if o is None else (o.__dict__.get("in_features") or o.__dict__.get("nx"))
    if not isinstance(total, int) or not isinstance(width, int) or (total - width) % 2:
        return 0
    return width + (total - width) // 2


def _sliced_attr(m: nn.Module, path: str, fixed: str) -> bool:
    """Whether ``fixed`` (``"parameter 'a.weight'"``, ...) names a tensor of ``m`` (at ``path``) that its slicer
    cuts, not one the user registered on it beside them (``a.scale = nn.Parameter(...)``), or no tensor."""
    got = re.fullmatch(r"\w+ '(.+)'", fixed)
    if got is None or not got.group(1).startswith(f"{path}."):
        return True
    name = got.group(1)[len(path) + 1:]
    return "." in name or name in getattr(m._sn.slicer, "attrs", (name,))


def _ignoring_queries_and_keys(nest: Nest, model: nn.Module, example: Any,
                               attentions: list[tuple[Any, str, nn.Module, list[tuple]]]) -> list[tuple[Any, str]]:
    """(Heads, path) of the attentions whose output stays the same when the outputs of every listed q and k
    projection are replaced by noise (one run each way, whatever the number of layers): their softmax runs
    over one key, so the example cannot tell whole heads apart. A stacked fused ``[q; k; v]`` projection
    gets noise in its query and key rows; an interleaved one cannot be told and is never listed. A q or k
    ``nn.Linear`` that runs no forward of its own (``F.linear(x, q.weight, q.bias)``) gets noise in its weight and
    bias instead, on the private view's own parameter dicts (a third run); an attention with another such
    projection is never listed, nor is anything when the model does not run."""
    todo = [(d, path, att, qk) for d, path, att, qk in attentions if qk]
    if not todo:
        return []
    outs: dict[int, list[list[torch.Tensor | None]]] = {id(att): [[], [], []] for _, _, att, _ in todo}

    def keep(run: int) -> Any:
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            outs[id(mod)][run].append(first_float(out))
        return hook

    fired: set[int] = set()  # projections whose output got noise; one whose weight the forward only reads
    #                          (F.linear(x, q.weight)) runs no hook: a third run gives its weight noise instead

    def noise(rows: int | None) -> Any:
        def hook(mod: nn.Module, args: tuple, out: Any) -> Any:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            fired.add(id(mod))
            g = torch.Generator(device=out.device).manual_seed(out.numel())
            fresh = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype) * 3
            if rows is None:
                return fresh
            return torch.cat([fresh[..., :rows], out[..., rows:]], -1)  # a stacked [q; k; v]: q and k only
        return hook

    def noisy(t: torch.Tensor, rows: int | None) -> torch.Tensor:
        g = torch.Generator(device=t.device).manual_seed(t.numel())
        fresh = torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype) * 3
        return fresh if rows is None else torch.cat([fresh[:rows], t[rows:]])  # (the out axis of a Linear)

    full = nest._plans.build(SubModel({d.name: d.full for d in nest.dims}))
    quiet: list[tuple[nn.Module, int | None]] = []
    for run in (0, 1, 2):
        if run == 2:
            quiet = list({id(p): (p, r) for _, _, _, qk in todo for p, r in qk if id(p) not in fired}.values())
            if not quiet or not all(isinstance(p, nn.Linear) for p, _ in quiet):
                quiet = []  # (every projection ran, or one whose weight layout is not a Linear's: cannot tell)
                break
        hooks = [att.register_forward_hook(keep(run)) for att in {id(a): a for _, _, a, _ in todo}.values()]
        if run:
            hooks += [proj.register_forward_hook(noise(rows)) for _, _, _, qk in todo for proj, rows in qk]
        swapped = []
        try:
            for proj, rows in quiet:  # (the view's own parameter dicts: the user's model is not touched)
                for name in ("weight", "bias"):
                    t = proj._parameters.get(name)
                    if t is not None:
                        swapped.append((proj, name, t))
                        proj._parameters[name] = nn.Parameter(noisy(t.detach(), rows), requires_grad=False)
            with Use(nest._state, full), seeded(0):
                call_model(model, example)
        except Exception:
            return []
        finally:
            for h in hooks:
                h.remove()
            for proj, name, t in swapped:
                proj._parameters[name] = t

    def same(a: list, b: list) -> bool:
        return bool(a) and len(a) == len(b) and all(
            x is not None and y is not None and x.shape == y.shape and torch.allclose(x, y, rtol=1e-5, atol=1e-6)
            for x, y in zip(a, b))

    told = {id(p) for p, _ in quiet}
    out = []
    for d, path, att, qk in todo:
        if all(id(p) in fired for p, _ in qk):
            blind = same(outs[id(att)][0], outs[id(att)][1])
        else:
            blind = all(id(p) in fired or id(p) in told for p, _ in qk) and same(outs[id(att)][0], outs[id(att)][2])
        if blind:
            out.append((d, path))
    return out


def _attention_modules(nest: Nest, dim: Any, copies: dict[int, nn.Module],
                       within: nn.Module | None) -> list[nn.Module]:
    """The attention modules a Heads ``dim`` names (as run: their copies in ``copies``), inside ``within``."""
    if getattr(dim, "kind", None) != "heads":
        return []
    modules = dict(nest.model.named_modules())
    out = [copies.get(id(modules[p]), modules[p]) for p in _attention_paths(nest, dim, modules)]
    if within is not None:
        inside = {id(m) for m in within.modules()}
        out = [m for m in out if id(m) in inside]
    return out


def _positions(width: int) -> int:
    """Positions of ``attention_self_check``'s random input: 64 (per-head behaviour that appears only past a
    few positions, such as per-head attention windows, shows), fewer for wide modules (a run costs ~16 T C^2
    operations: about 2e8 at most while T > 5, that is up to 1,443 features), never below 5."""
    return max(5, min(64, 12_500_000 // max(1, width * width)))


def _width_out(m: nn.Module) -> int | None:
    """The output features of a projection over the last axis (``nn.Linear``; transformers' ``Conv1D`` keeps them
    as ``nf``), else None."""
    if isinstance(m, nn.Linear):
        return m.out_features
    conv1d = _hf_conv1d()
    return m.__dict__.get("nf") if conv1d is not None and isinstance(m, conv1d) else None


def zero_stand_ins(*modules: nn.Module) -> dict[int, torch.Tensor]:
    """``id(weight) -> random stand-in`` for every all-zero weight matrix of ``modules`` (a zero-initialised query
    or output projection: muP, ReZero, adaLN-Zero): with queries at zero every head attends uniformly whatever
    the heads' layout, so whole heads measured on the model's own weights pass a layout that mixes them (it
    shows once training moves the weights). The measures of whole heads run again on a view holding these
    (seeded, scaled 1 / sqrt(fan-in)); the model's tensors are not touched. Plain tensors only (not meta, not
    sharded)."""
    out: dict[int, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)
    for p in {id(p): p for m in modules for p in m.parameters()}.values():
        if (type(p.data) is torch.Tensor and p.is_floating_point() and p.dim() >= 2 and p.numel()
                and not p.is_meta and not bool(p.detach().any())):
            fresh = torch.randn(p.shape, generator=g, device="cpu") / math.sqrt(max(1, p[0].numel()))
            out[id(p)] = nn.Parameter(fresh.to(p), requires_grad=p.requires_grad)
    return out


def _paired_reader(nest: Nest, d: Any, bound: dict[Any, list[tuple[str, str]]]) -> bool:
    """Whether, in a restricted nest, another width that only reads (``inp=`` / ``norm=``, no ``out=``) follows
    ``d`` size for size in every listed sub-model: a Width before a flatten and one after it (``f = 4 * c``),
    coupled by the list, read what ``d`` writes."""
    if nest._rows is None:
        return False
    for e, keys in bound.items():
        if e is d or "out" in {role for _, role in keys}:
            continue
        pairs = {(sub[d.name], sub[e.name]) for sub in nest.submodels}
        if len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs}) and \
                [b for _, b in sorted(pairs)] == sorted(b for _, b in pairs):
            return True
    return False


def _internal_outs(nest: Nest, model: nn.Module, d: Any, keys: list[tuple[str, str]], example: Any) -> bool:
    """Whether every module ``d`` binds as ``out`` has a slicer of a user's and keeps its outputs' shapes at
    ``d``'s smallest size (measured on one forward at the full size and one there): the role may then be a width
    inside the module (a gated MLP written as one module), which the refusal's message says."""
    paths = [p for p, _ in keys]
    if any(type(nest._sliced[p]._sn.slicer).__module__.startswith("sortednet.") for p in paths):
        return False
    shapes: dict[str, list] = {p: [] for p in paths}

    def hook(path: str) -> Any:
        def record(_m: nn.Module, _args: Any, out: Any) -> None:
            shapes[path].append(tuple(tuple(t.shape) for t in output_leaves(out) if isinstance(t, torch.Tensor)))
        return record

    full = SubModel({e.name: e.full for e in nest.dims})
    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    if not _hooked_runs(nest, model, example, (full, full.replace(**{d.name: d.sizes[0]})), handles):
        return False
    return all(len(v) % 2 == 0 and v and v[:len(v) // 2] == v[len(v) // 2:] for v in shapes.values())


def _hooked_runs(nest: Nest, model: nn.Module, example: Any, subs: Any, handles: list, mode: Any = None,
                 outs: list | None = None) -> bool:
    """Run ``model`` on ``example`` without gradients under each of ``subs`` (inside ``mode``, a torch function
    mode, where given), then remove ``handles``: False where a run raised (the dry runs report what fails).
    The outputs go to ``outs`` where given."""
    try:
        with torch.no_grad(), mode if mode is not None else contextlib.nullcontext():
            for sub in subs:
                with nest.use(sub):
                    out = call_model(model, example)
                    if outs is not None:
                        outs.append(out)
    except Exception:
        return False
    finally:
        for h in handles:
            h.remove()
    return True


_PRODUCTS = frozenset({"mul", "multiply", "__mul__", "__rmul__"})
_SUMS = frozenset({"sum", "nansum"})
_CASTS = frozenset({"to", "float", "half", "bfloat16", "double", "type", "type_as"})
_META_ONLY = frozenset({"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
                        "new_zeros", "new_ones", "new_empty", "new_full", "size", "dim", "numel"})  # (a shape, a dtype)
_VALUES_OF_SELF = frozenset({"type_as", "expand_as", "view_as", "reshape_as", "to"})  # (the others: shape, dtype)
_KEEPS_UNITS = frozenset({  # ops that keep each unit in place (element by element, or a view / cast of them)
    "add", "__add__", "__radd__", "__iadd__", "sub", "__sub__", "__rsub__", "mul", "__mul__", "__rmul__", "div",
    "__truediv__", "true_divide", "neg", "__neg__", "relu", "gelu", "silu", "tanh", "sigmoid", "dropout", "view",
    "reshape", "flatten", "unsqueeze", "squeeze", "contiguous", "clone", "detach", "to", "float", "half", "bfloat16",
    "double", "type_as", "expand", "expand_as", "__get__", "dim", "size", "numel", "pow", "__pow__", "square", "exp",
    "log", "sqrt", "rsqrt", "abs", "__abs__"})
_SCALES = frozenset({"mul", "multiply", "__mul__", "__rmul__", "div", "divide", "true_divide", "__truediv__", "neg",
                     "__neg__", "negative"})  # (by a number: a temperature between the product and its sum)
_MOVES_AXES = frozenset({"t", "transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "adjoint"})
_REDUCES = frozenset({"mean", "sum", "nansum", "nanmean", "amax", "amin", "prod", "logsumexp", "norm"})  # (any axes)


# ops that may move units along one axis (or all of them), and where their axis argument is: (position, keyword,
# default); an op over an axis of another size than the features' moves none of their units
_ALONG = {"sort": (1, "dim", -1), "argsort": (1, "dim", -1), "msort": (None, None, 0), "topk": (2, "dim", -1),
          "gather": (1, "dim", None), "take_along_dim": (2, "dim", None), "index_select": (1, "dim", None),
          "narrow": (1, "dim", None), "roll": (2, "dims", None),
          "flip": (1, "dims", None), "scatter": (1, "dim", None), "scatter_add": (1, "dim", None),
          "index_add": (1, "dim", None), "index_copy": (1, "dim", None), "index_fill": (1, "dim", None),
          "repeat_interleave": (2, "dim", None), "diff": (2, "dim", -1), "unfold": (1, "dimension", None),
          "fliplr": (None, None, 1), "flipud": (None, None, 0), "kthvalue": (2, "dim", -1)}
_PREFIX_CLOSED = frozenset({"cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"})  # (unit i from units <= i:
#   a sub-model's first units of the result are the full model's first units of it)
_REORDERS = frozenset({*_ALONG, "__getitem__", "take", "rot90", "index_put", "index_put_", "as_strided", "cat",
                       "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "repeat", "tile", "chunk",
                       "split", "tensor_split", "unbind", "index_reduce", "masked_scatter", "put", "put_"})


def _keeps_units(name: str, args: tuple, small: int, kwargs: dict | None = None) -> bool:
    """Whether an op that takes features moves none of their units to another place on their axis: it moves whole
    axes (a transpose), reduces axes (a mean pooling over positions; over the features' axis, nothing of them
    stays), works along an axis of another size than ``small`` (``W.index_select(0, ids)``, a table's rows), or
    indexes only axes of another size (the last position, ``h[:, -1]``) or takes a prefix of one of that size
    (``narrow(t, d, 0, n)``: a slicer's own cut). A tied decoder after it reads the units where the full model
    has them."""
    kwargs = kwargs or {}
    if name in _MOVES_AXES or name in _REDUCES or name in _PREFIX_CLOSED:
        return True
    if name in ("cat", "concat", "concatenate") and args and isinstance(args[0], (tuple, list)) and args[0] \
            and all(isinstance(t, torch.Tensor) for t in args[0]):  # (rows added to a table: a special token's)
        t, axis = args[0][0], args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
        return isinstance(axis, int) and -t.dim() <= axis < t.dim() and t.shape[axis] != small
    if name == "stack":  # (a new axis: every unit stays in place on its own)
        return True
    if name in _ALONG and args and isinstance(args[0], torch.Tensor):
        t, (pos, key, default) = args[0], _ALONG[name]
        axis = args[pos] if pos is not None and len(args) > pos else kwargs.get(key, default) if key else default
        if name == "narrow":
            start = args[2] if len(args) > 2 else kwargs.get("start")
            if isinstance(start, int) and start == 0:
                return True
        axes = axis if isinstance(axis, (tuple, list)) else (axis,)
        if not axes or not all(isinstance(a, int) and not isinstance(a, bool) and -t.dim() <= a < t.dim()
                               for a in axes):
            return False  # (no axis: over the flattened tensor, every axis)
        return all(t.shape[a] != small for a in axes)
    if name != "__getitem__" or len(args) != 2 or not isinstance(args[0], torch.Tensor):
        return False
    t, key = args
    key = key if isinstance(key, tuple) else (key,)

    def width(k: Any) -> int | None:  # (the axes one entry of the key consumes)
        if k is None:
            return 0
        if isinstance(k, torch.Tensor) and k.dtype == torch.bool:
            return k.dim()
        if isinstance(k, (int, slice, torch.Tensor, list)) and not isinstance(k, bool):
            return 1
        return None

    widths = [None if k is Ellipsis else width(k) for k in key]
    if sum(k is Ellipsis for k in key) > 1 or any(w is None for w, k in zip(widths, key) if k is not Ellipsis):
        return False
    rest = t.dim() - sum(w for w, k in zip(widths, key) if k is not Ellipsis)
    axis = 0
    for k, w in zip(key, widths):
        if k is Ellipsis:
            axis += rest
            continue
        prefix = isinstance(k, slice) and k.start in (None, 0) and k.step in (None, 1)
        if not prefix and any(t.shape[a] == small for a in range(axis, min(axis + w, t.dim()))):
            return False
        axis += w
    return True


def _cut_read_elsewhere(nest: Nest, model: nn.Module, d: Any, keys: list[tuple[str, str]],
                        example: Any) -> tuple[list[str], set[str], list[str], list[tuple[str, str]]]:
    """The modules of ``keys`` (those ``d`` binds as ``out``) whose features no op reads outside their forward, at
    ``d``'s smallest size (empty: every one is read), and the names of the ops that read them. A reader takes
    features one of them wrote (its outputs, or what ops made of them) with an axis of that size, together with a
    tensor made from one of their cut tensors outside their forward (a view, a transpose, a copy or a cast of it),
    and makes new tensors with fewer axes of that size than the features (contracted); or multiplies them with it on
    a common axis of that size (``h[..., None, :] * weight``, ``h * weight[j]``), then sums that over it, with
    nothing but views and casts between: a tied transposed decoder (``F.linear(h, enc.weight.t())``) reads the
    features ``d`` writes through ``enc``'s own weight, a reader no binding can name. Not a reader: the weight read
    without those features (a regulariser, whatever the batch size), a product over other axes (``h[..., None] *
    w[j][..., None, :]`` summed over ``w``'s axis keeps ``h``'s), or a product left unsummed (a gate). Each module
    is judged by its own features: another one's tied decoder reads nothing of a module whose outputs are reduced
    away. An embedding lookup of a module's cut weight outside its forward (``F.embedding(ids, emb.weight)``) makes
    its features too. A read counts only where what it made reaches the model's output (tied logits kept on a
    module for an auxiliary loss read nothing the output shows); a scale by a number (a temperature) may come
    between the product and its sum. Also returns the names of the reading ops, the modules whose cut weights
    they took (where any read counted), and the ops that reorder a module's cut weight outside its layer
    (``W.gather``, ``W.sort``: a tied read of it reads other units than the full model has there) with the
    module."""
    mods = [model.get_submodule(p) for p, _ in keys]
    small, inside, first, path = d.sizes[0], [0], {}, []

    def ptr(t: Any) -> int | None:
        try:
            return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None
        except Exception:  # (a tensor of no storage)
            return None

    owner = {ptr(t): i for i, m in enumerate(mods) for t in m._parameters.values() if t is not None}
    cut = set(owner) - {None, 0}
    layers = [model.get_submodule(p) for p, m in nest._sliced.items()  # (every layer d binds, any role)
              if any(b.dim is d for b in m._sn.bind.values())]
    cut_any = {ptr(t) for m in layers for t in m._parameters.values() if t is not None} - {None, 0}
    within, other = [0], set()  # (inside a layer d binds: its slicer follows it; ops elsewhere the trace may not)
    feats: dict[int, tuple[torch.Tensor, frozenset]] = {}  # id -> (tensor, the modules it was made from)
    weights: dict[int, tuple[torch.Tensor, frozenset]] = {}  # (held for the run: an id is not reused)
    held: set[int] = set()  # the modules whose cut weights a reader took
    moved: list[tuple[str, frozenset]] = []  # ops that reorder a cut weight outside its layer, and whose it is
    reordered: dict[int, tuple[torch.Tensor, str]] = {}  # what they made (and views / casts of it) -> the op
    met: dict[int, tuple[torch.Tensor, frozenset]] = {}  # features multiplied with a weight, not yet summed
    results: dict[int, tuple[torch.Tensor, frozenset]] = {}  # what the readers made, and what ops made of it

    def origin(t: torch.Tensor, table: dict) -> frozenset | None:
        hit = table.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def aligned(x: torch.Tensor, y: torch.Tensor) -> bool:  # (an axis of the cut size in both, once broadcast)
        return any(x.shape[-i] == small == y.shape[-i] for i in range(1, min(x.dim(), y.dim()) + 1))

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if inside[0]:
                return out
            ins = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
            made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            f = [t for t in ins if origin(t, feats) is not None]
            w = [t for t in ins if origin(t, weights) is not None or ptr(t) in cut]
            mine_w = frozenset().union(*(o if (o := origin(t, weights)) is not None else {owner[ptr(t)]} for t in w))
            m = [t for t in ins if origin(t, met) is not None]
            count = lambda t: sum(n == small for n in t.shape)  # noqa: E731  (axes of the cut size)
            fresh = made and not any(ptr(t) in cut for t in made)
            name = getattr(func, "__name__", "")
            src = frozenset().union(*(origin(t, feats) for t in f)) if f else frozenset()
            carried = [] if name in _META_ONLY else ins[:1] if name in _VALUES_OF_SELF else ins
            got = frozenset().union(*(o for t in carried if (o := origin(t, results)) is not None))
            took, reading = bool(f), False
            if not f and name == "embedding" and fresh and w:  # (the module's lookup, functional: of its cut
                f, src = made, mine_w                           # weight, or of a table made of it, special
                took = reading = True                           # tokens' rows added)
            elif f and w and fresh and any(small in t.shape for t in w):
                if max(map(count, f)) > max(map(count, made)):  # (fewer such axes: the features contracted)
                    got |= src
                    reading = True
                    held.update(mine_w)
                elif name in _PRODUCTS and any(aligned(x, y) for x in f for y in w):  # (multiplied on a common
                    met.update((id(t), (t, src)) for t in made)                       # axis: h[..., None, :] * w)
                    held.update(mine_w)
                    reading = True
            elif m and fresh and name in _SUMS and max(map(count, m)) > max(map(count, made)):  # (... then summed
                got |= frozenset().union(*(origin(t, met) for t in m))                        # over it)
                reading = True
            elif m and (name in _CASTS or any(ptr(t) == ptr(x) for t in made for x in m)  # (a view or a cast of it,
                        or name in _SCALES and all(t.numel() == 1 for t in ins if origin(t, met) is None)):  # or a
                mine = frozenset().union(*(origin(t, met) for t in m))       # scale, stays one; any other op ends it)
                met.update((id(t), (t, mine)) for t in made)
            if reading:  # (a tied read of a cut weight reordered outside its layer, W.gather / W.sort: it reads
                for t in w:  # other units than the full model has there)
                    if (op := origin(t, reordered)) is not None:
                        other.add(name)
                        moved.append((op, mine_w))
            if w and not f and not m and not took and not within[0] and made:
                if name in _REORDERS and not _keeps_units(name, args, small, kwargs):
                    op = f"{name!r} (in {(path[-1] if path else '') or '<root>'!r})"
                    reordered.update((id(t), (t, op)) for t in made)
                else:  # (a view or a cast of a reordered one is one)
                    op = next((o for t in w if (o := origin(t, reordered)) is not None), None)
                    if op is not None:
                        reordered.update((id(t), (t, op)) for t in made)
            if took:  # (the first op of each name, in each module, that takes the features: a reader, or another
                first.setdefault((name, path[-1] if path else ""), reading)  # op the trace may name alike, whose
                #                                                                 warning must stay)
                keeps = name in _KEEPS_UNITS or _keeps_units(name, args, small, kwargs)
                if not (reading or within[0] or keeps or m or any(ptr(t) in cut_any for t in ins)
                        and max(map(count, f)) > max(map(count, made))):  # (an op that is no reader, no layer's
                    other.add(name)  # functional read, and may move the units: every warning of d stays)
            if name == "__setitem__" and ins and isinstance(args[0], torch.Tensor):  # (buf[:] = logits: written
                made = [args[0]]                                                     # into the buffer)
            if got and not all(t.dtype == torch.bool for t in made):  # (a read counts where its values reach the
                results.update((id(t), (t, got)) for t in made)        # output: not kept aside, nor only its shape,
                #                                                        dtype or a test of it, zeros_like, isnan)
            if f and not (reading and name not in _PRODUCTS and name != "embedding"):  # (what a reader contracted
                #                                                                           holds no features)
                feats.update((id(t), (t, src)) for t in made)
            elif w:
                weights.update((id(t), (t, mine_w)) for t in made)
            return out

    def enter(*_: Any) -> None:
        inside[0] += 1

    def leave(i: int) -> Any:
        def hook(_m: nn.Module, args: Any, out: Any) -> None:
            inside[0] -= 1
            made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            feats.update((id(t), (t, frozenset({i}))) for t in made)
            got = frozenset().union(*(o for t in tree_leaves(args) if (o := origin(t, results)) is not None))
            if got:
                results.update((id(t), (t, got)) for t in made)
        return hook

    handles = [h for i, m in enumerate(mods) for h in (m.register_forward_pre_hook(enter),
                                                       m.register_forward_hook(leave(i), always_call=True))]

    def push(where: str) -> Any:
        def hook(*_: Any) -> None:
            path.append(where)
        return hook

    def pop(*_: Any) -> None:
        if path:
            path.pop()

    for where, m in model.named_modules():  # (the module each op runs in, as the wiring trace names it)
        handles += [m.register_forward_pre_hook(push(where)), m.register_forward_hook(pop, always_call=True)]

    def into(*_: Any) -> None:
        within[0] += 1

    def out_of(*_: Any) -> None:
        within[0] -= 1

    def not_features(_m: nn.Module, _args: Any, out: Any) -> None:  # (a layer reading d's units, not writing
        for t in tree_leaves(out):                                    # them: its outputs are another axis)
            if isinstance(t, torch.Tensor) and origin(t, feats) is not None:
                del feats[id(t)]

    for m in layers:
        handles += [m.register_forward_pre_hook(into), m.register_forward_hook(out_of, always_call=True)]
        if {r for r, b in m._sn.bind.items() if b.dim is d} == {"inp"}:
            handles.append(m.register_forward_hook(not_features, always_call=True))
    full = SubModel({e.name: e.full for e in nest.dims})
    outs: list = []
    ran = _hooked_runs(nest, model, example, (full.replace(**{d.name: small}),), handles, Reads(), outs)
    read: set[int] = set()
    for x in (t for out in outs for t in output_leaves(out)):  # (containers, ModelOutput, dataclasses, records)
        if isinstance(x, torch.Tensor):
            read |= origin(x, results) or set()
    readers = {f"{n!r} (in {w or '<root>'!r})" for (n, w), reading in first.items() if reading and not other}
    return ([p for i, (p, _) in enumerate(keys) if not (ran and i in read)],
            readers if ran and read else set(), [p for i, (p, _) in enumerate(keys) if ran and read and i in held],
            list(dict.fromkeys((op, keys[i][0]) for op, mods in moved for i in sorted(mods))) if ran else [])


def _inert_norm(model: nn.Module, path: str) -> bool:
    """Whether the module at ``path`` is a norm holding no tensor whose computation a binding would not change
    (per channel, or over all channels at once): InstanceNorm / BatchNorm without affine weights or running
    statistics, a GroupNorm of one group without weights. (A GroupNorm of more groups regroups the channels.)"""
    try:
        m = model.get_submodule(path)
    except AttributeError:
        return False
    if any(t is not None for t in (*m._parameters.values(), *m._buffers.values())):
        return False
    if isinstance(m, nn.GroupNorm):
        return m.num_groups == 1
    return isinstance(m, (nn.modules.instancenorm._InstanceNorm, _BatchNorm))


def _listed(nest: Nest, sub: SubModel) -> SubModel | None:
    """``sub``, or in a restricted nest that does not list it the listed sub-model with the same sizes in the
    dimensions where ``sub`` is not full, most others full (None if none): sizes a restricted nest never runs
    may not even fit together (a Width before a flatten and one after it, coupled only by the list)."""
    if nest._rows is None or nest.submodels.position(sub) is not None:
        return sub
    changed = [d.name for d in nest.dims if sub[d.name] != d.full]
    cands = [s for s in nest.submodels if all(s[n] == sub[n] for n in changed)]
    return max(cands, key=lambda s: sum(s[d.name] == d.full for d in nest.dims), default=None)


def _measured(nest: Nest, d: Any, size: int, example: Any, model: Any, copies: Any) -> float | None:
    """:func:`whole_units_error`, None where ``d`` alone at ``size`` does not run (a restricted nest's sizes that
    never run together)."""
    try:
        return whole_units_error(nest, d, size, example, model, copies)
    except Exception:
        if nest._rows is None:
            raise
        return None


def _units_off(nest: Nest, d: Any, size: int, example: Any, model: Any, copies: Any, tol: float) -> bool | None:
    """Whether ``d`` at ``size`` is further from the full model's first whole units than ``tol`` (None: not
    measurable). In half precision (``tol`` above float32's), whose rounding hides an error of a few percent, an
    error within it is measured again with the view's tensors in float32, against float32's limit."""
    err = _measured(nest, d, size, example, model, copies)
    if err is None or not err <= tol:
        return None if err is None else True
    if tol > 1e-3:
        err32 = _in_float32(model, example, lambda ex: _measured(nest, d, size, ex, model, copies))
        if err32 is not None and not err32 <= 1e-3:
            return True
    return False


def _unfollowed_counts(nest: Any, d: Any, outs: list[str]) -> list[str]:
    """``"<attention>: <attr>"`` for the integer attributes equal to ``d``'s head count in the attention modules
    (the parents of its output projections ``outs``) and their children that no binding makes follow it."""
    found = []
    for o in dict.fromkeys(p.rpartition(".")[0] for p in outs):
        att = nest.model.get_submodule(o)
        for sub, c in att.named_modules():
            st = c.__dict__.get("_sn")
            bound = {r[5:] for r in (st.bind if st is not None else ())
                     if r.startswith("attr:") and st.bind[r].dim is d}
            found += [f"{o or '<root>'}: {sub + '.' if sub else ''}{a}" for a, v in vars(c).items()
                      if type(v) is int and v == d.full and "head" in a.lower() and a not in bound]
    return found[:3]


def _zero_named(model: nn.Module, stand_ins: dict[int, torch.Tensor]) -> str:
    names = [n for n, p in model.named_parameters() if id(p) in stand_ins]
    return (f" (measured with random stand-ins for the all-zero {names[:3]}: zero-initialised weights hide it "
            "until training moves them)") if names else ""


def attention_self_check(nest: Nest, warn: bool = True) -> None:
    """``wrap`` without an example: every hand-written attention module a ``Heads`` dimension slices (not
    ``nn.MultiheadAttention``, which sortednet runs itself, nor a transformers class, which
    ``from_transformers`` verifies) whose forward takes one tensor is run alone on a random
    ``(2, T, features)`` input (T = 64 positions, fewer for wide modules, at least 5; 5 where the module
    refuses T), on a private eval-mode view: each smaller head count must be the first
    heads of the full module (a layout read from a name, a head count kept under a name Heads does not
    know, per-head values computed in the forward from the head count give something else), and it must
    run where the full module runs. A module that needs more arguments is left to ``check(example)``."""
    todo = []  # (dimension, attention path, its output projection, class name)
    unverified: list[str] = []  # attentions this check cannot run alone: said, not silently passed
    for d, path, att in _hand_written_attentions(nest):
        inside = {id(m) for m in att.modules()}
        readers = [m for m in nest._sliced.values() if id(m) in inside and m._sn.bind.get("inp") is not None
                   and m._sn.bind["inp"].dim is d]
        o = next((m for m in readers if _width_out(m) is not None), None)
        if not readers or any(t.is_meta or not t.is_floating_point() for t in att.parameters()):
            continue  # (a model built on the meta device has nothing to run)
        if o is None or any(not _is_maskable(m) for m in readers):  # (an output projection of another kind: a
            unverified.append(path or "<root>")                   # Conv1d over (B, C, T), a module of the user's)
            continue
        try:
            params = list(inspect.signature(type(att).forward).parameters.values())[1:]
        except (TypeError, ValueError):
            unverified.append(path or "<root>")
            continue
        required = [q for q in params if q.default is q.empty and q.kind in (q.POSITIONAL_ONLY,
                                                                             q.POSITIONAL_OR_KEYWORD)]
        if len(required) != 1 or any(q.default is q.empty and q.kind is q.KEYWORD_ONLY for q in params):
            unverified.append(path or "<root>")
            continue
        cls = (type(att).__bases__[0] if getattr(type(att), "_sn_sliced", False) else type(att)).__name__
        todo.append((d, path, o, cls))
    _self_check_runs(nest, todo, unverified)
    if unverified and warn:
        warnings.warn(f"sn.wrap: Heads could not run the attention module(s) {unverified[:5]} alone (their "
                      "forward takes more than one tensor, e.g. cross-attention, or refused a random (batch, "
                      "positions, features) input, or their output projection is not a plain nn.Linear whose "
                      "weight columns can be masked), so whole heads are not verified there: pass "
                      "wrap(..., example=...) or run nest.check(example)", UnverifiedHeadsWarning, stacklevel=4)


class UnverifiedHeadsWarning(UserWarning):
    """``wrap`` without an example could not verify that a Heads dimension slices whole heads of an attention."""


class UnfollowedOpWarning(UserWarning):
    """``check``: a Width's features reach an op the wiring trace does not understand, where the dry runs pass:
    whether a sub-model's first units are the full model's there was not verified."""


class UncheckedTrainingWarning(UserWarning):
    """``check``: the full model fails in training mode on the example (BatchNorm on a batch of one), so the
    training-mode dry run was skipped."""


class LayerCountWarning(UserWarning):
    """``check``: the forward reads an int named like a layer count, equal to a Depth's full size, kept on a
    module holding the layer list (``self.n_layers``) or in its config object: it reads the full count at every
    depth."""


_COUNT_NAME = re.compile(  # (n_layers, num_hidden_layers, num_enc_layers, encoder_layers, text_layers, num_res_blocks,
    # layer_count, depth, decoder_depth, decoder_num_hidden_layers; not max_window_layers, freeze_layers, bit_depth,
    # max_depth, num_stages)
    r"(?:n|nb|num|number_of|count_of|total)_?(?:(?:hidden|transformer|trans|encoder|decoder|enc|dec|text|vision|res"
    r"|residual|model)_)*(?:layers?|blocks?)"
    r"|(?:(?:hidden|transformer|trans|encoder|decoder|enc|dec|text|vision)_)+(?:layers|blocks)"
    r"|(?:layers?|blocks?)_?(?:count|num|number)"
    r"|(?:(?:encoder|decoder|enc|dec|transformer|model|vit|text|vision)_)?depth"
    r"|(?:encoder|decoder|text|vision)_(?:num|n)_?(?:hidden_)?layers", re.IGNORECASE)
_CONFIGS = ("config", "cfg", "args", "hparams", "params", "model_config", "model_args")


def _count_spots(nest: Nest, model: nn.Module) -> list[tuple[Any, str, str, int, tuple[Any, ...]]]:
    """(holder, attribute, display name, full depth, chain) of each int named like a layer count and equal to a
    Depth's full size, on a module above a Depth layer list or on one of its blocks (in ``model``, the check's
    private view) or in a config object it keeps (by its usual name, or any other, and the ones that config holds:
    ``self.config.model.n_layers``); ``chain``: the config objects from the module's attribute down to the holder
    (another tower may hold any of them: :func:`_counts_read`). PyTorch's and transformers' own classes and
    configs are left out: their forwards read ``len()`` of the list or slice it
    (``layers[:config.num_hidden_layers]``), which follows the depth."""
    spots: dict[tuple[int, str], tuple[Any, str, str, int, tuple[Any, ...]]] = {}
    holders: dict[int, list[tuple[Any, str]]] = {}
    for path, m in nest._sliced.items():
        b = m._sn.bind.get("depth")
        parts = path.split(".") if path and b is not None else []
        wheres = [".".join(parts[:i]) for i in range(len(parts))]
        try:  # (and the blocks themselves: ``if self.idx == self.config.n_layer - 1`` in a block holding it)
            wheres += [f"{path}.{k}" for k in model.get_submodule(path)._modules] if parts else []
        except AttributeError:
            pass
        for where in wheres:
            try:
                holder = model.get_submodule(where)
            except AttributeError:
                continue
            cls = type(holder).__bases__[0] if getattr(type(holder), "_sn_sliced", False) else type(holder)
            if cls.__module__.startswith(("torch.", "transformers.")):
                continue
            objs, chains, parents = [(holder, where)], [()], [None]
            for name, c in holder._modules.items():  # (a transformers model the user's module holds: its forward
                cfg = getattr(c, "config", None) if c is not None and type(c).__module__.startswith(  # may read
                    "transformers.") else None  # self.backbone.config.num_hidden_layers)
                if cfg is not None and not isinstance(cfg, (nn.Module, torch.Tensor)) and not callable(cfg):
                    objs.append((cfg, f"{where}.{name}.config" if where else f"{name}.config"))
                    chains.append((cfg,))
                    parents.append((c, "config"))
            for (obj, at), chain in zip(objs, chains):  # (configs: a plain dict, self.config["n_layers"], or an
                if len(objs) > 64:  # object, a dataclass (frozen too), a namespace, a named tuple, a transformers
                    break           # config a module of the user's holds; and the ones they hold,
                try:                # self.config.model.n_layers; any name, self.hp / self.opts)
                    items = list(_config_items(obj).items())
                except Exception:
                    continue
                for k, v in items:
                    if isinstance(k, str) and _named_tuple(v) and (obj, k) not in holders.setdefault(id(v), []):
                        holders[id(v)].append((obj, k))  # (every holder of a named tuple gets the copy: a block
                    if isinstance(k, str) and (type(v) is dict or _named_tuple(v) or (  # holding it reads it too)
                            v is not None and not isinstance(v, (nn.Module, torch.Tensor, type))
                            and not type(v).__module__.startswith(("builtins", "torch", "numpy", "functools"))
                            and (hasattr(v, "__dict__") or dataclasses.is_dataclass(v)) and not callable(v))) and \
                            (obj is not holder or k in _CONFIGS or not k.startswith("_")) and \
                            all(v is not o for o, _ in objs) and at.count(".") - where.count(".") < 3:
                        objs.append((v, f"{at}.{k}" if at else k))
                        chains.append((*chain, v))
                        parents.append((obj, k))
            for (obj, at), chain, parent in zip(objs, chains, parents):
                try:
                    attrs = _config_items(obj)
                except Exception:  # (no __dict__, or one that is not a mapping)
                    continue
                for k, v in attrs.items():
                    if type(v) in (int, float) and v == b.dim.full and isinstance(k, str) and _COUNT_NAME.fullmatch(k) \
                            and _names_this_list(k, v, path, model):
                        shown = f"{at}[{k!r}]" if type(obj) is dict else f"{at}.{k}" if at else k
                        spots.setdefault((id(obj), k), (obj, k, shown, v, chain, _setter(obj, k, parent, holders)))
    if holders:  # (a named tuple measured is put in every module holding it: a head beside the blocks reads it too)
        for mod in model.modules():
            for k, v in vars(mod).items():
                if id(v) in holders and (mod, k) not in holders[id(v)]:
                    holders[id(v)].append((mod, k))
    return list(spots.values())


def _named_tuple(v: Any) -> bool:
    return isinstance(v, tuple) and isinstance(getattr(type(v), "_fields", None), tuple) and hasattr(v, "_replace")


def _config_items(obj: Any) -> dict[str, Any]:
    """What a config object holds by name: a dict's items, a named tuple's fields, a dataclass's fields (slotted
    ones too) with its other attributes, an object's attributes."""
    if type(obj) is dict:
        return dict(obj)
    if _named_tuple(obj):
        return dict(obj._asdict())
    out = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    try:
        out.update(vars(obj))
    except TypeError:  # (slots only)
        if not out:
            raise
    return out


def _setter(obj: Any, k: str, parent: tuple[Any, str] | None,
            holders: dict[int, list[tuple[Any, str]]] | None = None) -> Callable[[Any], None]:
    """A function writing ``obj``'s ``k``: an item of a dict, an attribute (a frozen dataclass's through
    ``object.__setattr__``, as its own ``__init__`` does), or, for a named tuple, a copy with it put in the
    places of its holders (``holders``: id -> (holder, key) of each found; else ``parent``)."""
    if type(obj) is dict:
        return lambda v: obj.__setitem__(k, v)
    if _named_tuple(obj):
        places = (holders or {}).get(id(obj)) or ([parent] if parent is not None else [])
        if not places or any(_named_tuple(h) for h, _ in places):
            raise TypeError("a named tuple held in a named tuple")  # (not measured: skipped)

        def put(v: Any) -> None:  # (restored with the value the tuple held: the original tuple goes back)
            new = obj if v == getattr(obj, k) else obj._replace(**{k: v})
            for holder, key in places:
                _setter(holder, key, None)(new)
        return put
    if dataclasses.is_dataclass(obj) and getattr(type(obj), "__dataclass_params__", None) is not None \
            and type(obj).__dataclass_params__.frozen:
        return lambda v: object.__setattr__(obj, k, v)
    return lambda v: setattr(obj, k, v)


def _members(v: Any) -> list[Any]:
    """The values a config ``v`` holds one level down (a dict's values, an object's attributes), or none."""
    if type(v) is dict:
        return list(v.values())
    if isinstance(v, (nn.Module, torch.Tensor, type)) or type(v).__module__.startswith(("builtins", "torch")):
        return []
    try:
        return list(_config_items(v).values())
    except Exception:  # (no __dict__)
        return []


def _other_towers(model: nn.Module, lists: list[str], chain: tuple[Any, ...], count: int) -> list[tuple[Any, str]]:
    """(module, attribute) of the towers off the paths of the Depth layer ``lists`` (neither above one, nor one,
    nor inside one) that hold a config of ``chain`` (or one holding it) and a layer list of ``count`` entries of
    their own: their forwards may read the count for that list, which no depth of these lists changes."""
    if not chain:
        return []
    ids = {id(c) for c in chain}
    out = []
    for p, mod in model.named_modules():
        if any(p == q or p.startswith(f"{q}.") or q.startswith(f"{p}.") or not p for q in lists):
            continue
        held = [name for name, v in vars(mod).items() if id(v) in ids or any(id(u) in ids for u in _members(v))]
        if held and any(isinstance(c, (nn.ModuleList, nn.Sequential)) and len(c) == count for c in mod.modules()):
            out += [(mod, name) for name in held]
    return out


_TOWERS = {"encoder": "encoder", "enc": "encoder", "decoder": "decoder", "dec": "decoder", "text": "text",
           "vision": "vision"}


def _towers_of(name: str) -> set[str]:
    return {_TOWERS[t] for t in re.split(r"[._]", name.lower()) if t in _TOWERS}


def _names_this_list(count: str, value: int, path: str, model: nn.Module) -> bool:
    """Whether a count named for a tower (``num_decoder_layers``) may be the count of the layer list at ``path``:
    not where ``path`` is not named for that tower and the model holds a list that is, of ``value`` entries (the
    decoder's count beside a nested encoder is read right at every encoder depth)."""
    towers = _towers_of(count)
    if not towers or towers & _towers_of(path):
        return True
    return not any(towers & _towers_of(n) and len(m) == value for n, m in model.named_modules()
                   if n != path and isinstance(m, (nn.ModuleList, nn.Sequential)))


def _run_from(nest: Nest, model: nn.Module, example: Any, sub: SubModel,
              values: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """``sub``'s floating-point outputs on ``example``, its tensors first put back to ``values`` ((tensor, value)
    pairs: weights, buffers), under a fixed random stream."""
    for t, value in values:
        t.copy_(value)
    with nest.use(sub), seeded(0):
        out = call_model(model, example)
    return [o.detach().double() for o in float_outputs(out)]


def _moved(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest relative difference of two runs' outputs (inf where shapes differ)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return math.inf
    return max(_rel_diffs(list(zip(a, b))), default=0.0)


def _counts_read(nest: Nest, model: nn.Module, example: Any) -> None:
    """Warn (:class:`LayerCountWarning`) when the forward computes with a layer count kept aside: at a
    shallower depth ``1 / sqrt(2 * self.n_layers)`` keeps the full model's scale and ``if i == self.n_layers -
    1: x = self.norm(x)`` never reaches its final norm, while the export computes the same (no other check can
    tell). Measured: each Depth at its shallowest runs once with the counts as they are and once with each count
    set to that depth, as a model built with that many layers would hold it; an output that moves (or a forward
    that fails one way only) names the count. A count only kept (nanoGPT's ``config.n_layer`` for its init), or
    read where it changes nothing at any depth (an assertion ``len(self.blocks) <= self.n_layers``, a table of
    one entry per layer), is not named."""
    try:
        spots = _count_spots(nest, model)
    except Exception:  # (a module whose __dict__ or config is not what Python's usually are: nothing to say)
        return
    if not spots:
        return
    buffers = [(b, b.detach().clone()) for b in nest.model.buffers()]

    def run(sub: SubModel) -> list[torch.Tensor]:
        return _run_from(nest, model, example, sub, buffers)

    read: list[str] = []
    for dd in (d for d in nest.dims if d.kind == "depth" and d.sizes[0] < d.full):
        mine = [spot for spot in spots if spot[3] == dd.full and spot[2] not in read]
        sub = _at_depth(nest, dd, dd.sizes[0])
        if not mine or sub is None:
            continue
        try:
            base = run(sub)
        except Exception:  # the dry runs report what fails; this only looks
            continue
        lists = [p for p, mm in nest._sliced.items() if "depth" in mm._sn.bind and mm._sn.bind["depth"].dim is dd]
        for _, _, name, v, chain, put in mine:
            shadows = [(mod, attr, mod.__dict__[attr]) for mod, attr in _other_towers(model, lists, chain, v)]
            try:  # (another tower holding the same config reads a copy of it, as it was: a count only it reads
                copies = [(mod, attr, copy.deepcopy(held)) for mod, attr, held in shadows]  # moves no output;
            except Exception:  # a config that cannot be copied is measured as it is)
                copies = []
            try:
                put(dd.sizes[0])
            except Exception:  # (a slotted or read-only attribute, a named tuple inside a named tuple)
                continue
            for mod, attr, twin in copies:
                mod.__dict__[attr] = twin
            try:
                try:
                    out = run(sub)
                except Exception:
                    read.append(name)
                    continue
                if len(out) != len(base) or _moved(base, out) > 1e-6:
                    read.append(name)
            finally:
                put(v)
                for mod, attr, held in shadows if copies else ():
                    mod.__dict__[attr] = held
    if read:
        lists = [p for p, m in nest._sliced.items() if "depth" in m._sn.bind]
        warnings.warn(f"nest.check: the forward computes with {read[:3]}, the full layer count of the Depth layer "
                      f"list {lists[:2]}: at a shallower depth it still reads the full count (a final norm after "
                      "block n_layers - 1 is never reached, a residual scale 1 / sqrt(2 * n_layers) stays the full "
                      "model's), so a sub-model is not the network of its first d blocks, and its export computes "
                      "the same. Read len() of the layer list in the forward, which follows the depth",
                      LayerCountWarning, stacklevel=4)


class BlockHeldOutsideWarning(UserWarning):
    """``wrap``: a block of a Depth layer list that the model also holds outside the list (``self.final =
    self.blocks[-1]``): a forward calling it there runs it at every depth (at depth 1, maybe instead of the list's
    first block), and ``cost`` and every export keep it."""


def warn_blocks_held_outside(nest: Nest) -> None:
    """:class:`BlockHeldOutsideWarning` for each Depth layer list with blocks (or layers of them that hold tensors)
    the model reaches without passing the list (a block the list holds at several positions, ALBERT-style, is not
    one)."""
    model = nest.model
    for path, m in nest._sliced.items():
        if "depth" not in m._sn.bind:
            continue
        dim = m._sn.bind["depth"].dim
        lists = [q for q in nest._sliced.values() if "depth" in q._sn.bind and q._sn.bind["depth"].dim is dim]
        cut = {(id(q), name) for q in lists for name in q._modules}  # (a list the same Depth cuts is no outside:
        held: dict[int, str] = {}                                    # a norm list paired with the blocks)
        stack: list[tuple[str, nn.Module]] = [("", model)]
        while stack:  # (the first path reaching each module without entering the list's positions)
            at, mod = stack.pop()
            if id(mod) in held:
                continue
            held[id(mod)] = at
            stack.extend((f"{at}.{n}" if at else n, c) for n, c in reversed(mod._modules.items())
                         if c is not None and (id(mod), n) not in cut)
        owners: dict[int, set[int]] = {}  # (module -> the positions whose blocks hold it, in any list it cuts)
        for q in lists:
            for i, b in enumerate(q._modules.values()):
                for c in ([] if b is None else b.modules()):
                    owners.setdefault(id(c), set()).add(i)
        outside = []
        for i, (n, b) in enumerate(m._modules.items()):  # (a block, or a layer of it holding tensors: self.extra =
            if b is None or i < dim.sizes[0]:  # blocks[1].fc; one every depth keeps runs and is kept anyway)
                continue
            for sub, c in b.named_modules():
                if (id(c) in held and min(owners[id(c)]) >= dim.sizes[0]  # (one a block every depth keeps holds
                        and (c is b or any(True for _ in c.parameters()) or any(True for _ in c.buffers()))):
                    outside.append((".".join(x for x in (path, n, sub) if x), held[id(c)]))  # too, as a rotary
                    break  # table every block shares, runs at every depth anyway)
        if outside:
            shown = "; ".join(f"{b} as {o!r}" for b, o in outside[:3])
            warnings.warn(f"Depth {dim.name!r}: the model also holds {len(outside)} block(s) (or their layers) of the "
                          f"layer list {path or type(model).__name__!r} outside it ({shown}): a forward calling one "
                          "there runs it at every depth (at a shallow depth maybe instead of the list's first "
                          "blocks), and cost and every export keep it. Read the last block as "
                          "self.<list>[-1], which follows the depth; a block meant to run always belongs "
                          "outside the list", BlockHeldOutsideWarning, stacklevel=caller_outside())


class IdleLayersWarning(UserWarning):
    """``check``: a second per-layer list the forward pairs with a Depth's blocks (``zip(self.blocks,
    self.norms)``) but the Depth does not cut: at a shallower depth its later entries do not run, while ``cost``
    counts them and ``export`` keeps them."""


def _self_check_runs(nest: Nest, todo: list, unverified: list[str]) -> None:
    if not todo:
        return
    full = SubModel({k.name: k.full for k in nest.dims})
    modules = dict(nest.model.named_modules())  # (an all-zero projection cannot tell whole heads from mixed ones)
    zeros = zero_stand_ins(*(modules[path] for _, path, _, _ in todo))
    with dry_run(nest.model), eval_mode(nest, replace=zeros) as (view, copies), torch.no_grad():  # one private
        for d, path, o, cls in todo:                                                          # view for all
            mod, o = view.get_submodule(path), copies.get(id(o), o)  # (o: its output projection, as run)
            # in float32 where the module is in half precision: half precision's rounding (tolerance 1e-1) would
            # hide a head layout off by a few percent (a scale computed from the full width over the active head
            # count). One module at a time, in the view (the model's tensors are not touched); natively where
            # it does not run in float32 (a forward casting its input to its own half dtype)
            with _wide(mod) as wide:
                done = _self_check_module(nest, d, path, mod, o, cls, full, copies, zeros, 1e-3)
            if not done and wide:
                done = _self_check_module(nest, d, path, mod, o, cls, full, copies, zeros, 1e-1)
            if not done:
                unverified.append(path or "<root>")


@contextlib.contextmanager
def _wide(mod: nn.Module) -> Iterator[bool]:
    """The half-precision parameters and buffers of ``mod``'s modules (a private view's) swapped for float32
    copies for the duration (ties kept, restored after); whether any was."""
    wide: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    for m in mod.modules():
        for slots in (m._parameters, m._buffers):
            for name, t in slots.items():
                if t is None or t.dtype not in (torch.float16, torch.bfloat16) or t.is_meta or \
                        type(t.data) is not torch.Tensor:
                    continue
                if id(t) not in wide:
                    f = t.detach().float()
                    wide[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
                swapped.append((slots, name, t))
                slots[name] = wide[id(t)]
    try:
        yield bool(swapped)
    finally:
        for slots, name, t in reversed(swapped):
            slots[name] = t


def _own_head_tensors(mod: nn.Module, o: nn.Module) -> str:
    """Where the attention ``mod`` holds parameters or buffers of its own with an axis as wide as all its heads
    (``o``'s input: heads x head size, or three times it): per-head values beside the projections (BEiT's
    ``q_bias`` / ``v_bias``) that Heads leaves whole; named, with what to do. Empty where there are none."""
    w = o._parameters.get("weight") if isinstance(o._parameters.get("weight"), torch.Tensor) else None
    width = None if w is None or w.dim() != 2 else w.shape[1]
    own = [f"{n} {tuple(t.shape)}" for n, t in (*mod._parameters.items(), *mod._buffers.items())
           if t is not None and width and any(a in (width, 3 * width) for a in t.shape)]
    if not own:
        return ""
    return (f"It holds {own[:4]} itself, as wide as all its heads ({width} features), which Heads leaves whole "
            "(per-head values beside the projections, such as q/v biases added in the forward): make them the "
            "projections' own bias (a q/k/v bias with zeros for k), or give the attention a custom slicer that "
            "cuts them with the heads (docs/custom_slicers.md)")


def _head_sized_guesses(mod: nn.Module, heads: int, o: nn.Module) -> str:
    """More causes to weigh for an attention ``mod`` failing below its full head count, where it holds a tensor of
    its own with an axis of ``heads`` (per-head values wrap could not tell from a rotary table: the head count
    equals the head size or half of it), or an unsliced Linear child as wide as all heads' outputs (``o``'s
    input: perhaps a gate per head feature). Empty where there is none."""
    out = ""
    own = [f"{n} {tuple(t.shape)}" for n, t in (*mod._parameters.items(), *mod._buffers.items())
           if isinstance(t, torch.Tensor) and t.dim() and next((s for s in t.shape if s != 1), None) == heads]
    if own:
        out += (f". If {own[:4]}, which it holds itself with an axis of its {heads} heads, are per-head values "
                "(ALiBi slopes, a temperature; not a rotary table), Heads leaves them whole: keep them in a child "
                "module named in per_head=, cut with the heads (docs/heads.md)")
    w = getattr(o, "weight", None)
    width = w.shape[1] if isinstance(w, torch.Tensor) and w.dim() == 2 else None
    wide = [rel for rel, c in mod.named_modules() if rel and "_sn" not in c.__dict__ and isinstance(c, nn.Linear)
            and isinstance(c._parameters.get("weight"), torch.Tensor) and width is not None
            and c._parameters["weight"].shape[0] == width != heads]
    if wide:
        out += (f". If its child {wide[0]!r}, with {width} outputs as wide as all {heads} heads' outputs, gates each "
                "head feature, no slicer cuts it, and Heads cuts a per_head= module by one unit per head only: make "
                "it one unit per head (a Linear to the heads), or give the attention a slicer of yours")
    return out


def _per_head_children(mod: nn.Module, heads: int) -> str:
    """Where a child of the attention ``mod`` that no dimension slices holds a tensor with an axis of ``heads``
    (a per-head gate, a relative-position table): named, with ``per_head=`` to cut it with the heads. Empty
    where there is none."""
    found: dict[str, list[str]] = {}
    for rel, c in mod.named_modules():
        if not rel or "_sn" in c.__dict__:
            continue
        for n, t in (*c._parameters.items(), *c._buffers.items()):
            if isinstance(t, torch.Tensor) and heads in t.shape:
                found.setdefault(rel, []).append(f"{rel}.{n} {tuple(t.shape)}")
    if not found:
        return ""
    tensors = [t for ts in found.values() for t in ts]
    return (f"Its child {list(found)[0]!r} holds {tensors[:4]}, with an axis of its {heads} heads, which no slicer "
            f"cuts: name it with per_head={list(found)[0]!r} (cut with the heads; a module of your own there needs "
            "a slicer, docs/heads.md), or count_attrs= for an attribute that counts heads")


def _self_check_module(nest: Nest, d: Any, path: str, mod: nn.Module, o: nn.Module, cls: str, full: SubModel,
                       copies: dict[int, nn.Module], zeros: dict[int, torch.Tensor], tol: float) -> bool:
    """:func:`attention_self_check` of one attention module ``mod`` (in the view; ``o`` its output projection)
    for Heads ``d``: whether it ran and was measured (every size whole heads within ``tol``); refused otherwise."""
    w = next(iter(o.parameters()))
    where = repr(path) if path else "the model's root"
    x = None
    width = _width_out(o)
    for n in dict.fromkeys((_positions(width), 5)):  # long enough for per-head windows, where the width makes
        x = torch.randn(2, n, width, generator=torch.Generator().manual_seed(0),  # it cheap
                        device="cpu").to(w)
        try:
            with Use(nest._state, nest._plans.build(full)), seeded(0):
                call_model(mod, x)
            break
        except Exception:  # not a self-attention of (batch, positions, features), or not that long
            x = None
    if x is None:
        return False
    for size in d.sizes[:-1]:  # every size: a reordering of heads may keep the smallest whole only
        try:
            with Use(nest._state, nest._plans.build(full.replace(**{d.name: size}))), seeded(0):
                call_model(mod, x)
        except Exception as e:
            raise SortedNetError(
                f"Heads {d.name!r} at {where} ({cls}): the module runs at {d.full} heads "
                f"but fails at {size}: {type(e).__name__}: {str(e)[:300]}. " + (
                    _own_head_tensors(mod, o) or _per_head_children(mod, d.full) or (
                        "It sizes something by an attribute Heads does not slice (name it with count_attrs=), or by "
                        "the input's width (C // self.n_head, split(C, dim=-1): use the head size, a fixed "
                        "self.head_dim, or -1 there, as docs/heads.md shows), or needs a custom slicer "
                        "(docs/custom_slicers.md)" + _head_sized_guesses(mod, d.full, o)))) from e
        err = whole_units_error(nest, d, size, x, mod, copies, within=mod)
        if err is None:
            return False
        if not err <= tol:
            raise SortedNetError(
                f"Heads {d.name!r} at {where} ({cls}): {size} heads are not the first "
                f"{size} whole heads of the full module (relative difference {err:.3g}, run alone on a "
                "random input): its fused projection is not laid out as Heads read it (state layout=), it "
                "keeps the head count under a name Heads does not slice (count_attrs=), it computes "
                "per-head values (ALiBi slopes) from the head count in its forward, it reorders heads, or "
                "(grouped-query attention) it shares key/value heads in another order than query head i "
                "reading key/value head i // group (repeat_interleave, not repeat); fix the layout, or "
                f"give it a custom slicer{_zero_named(nest.model, zeros)}")
    return True


def slicer_value_self_check(nest: Nest, modules: dict[str, nn.Module]) -> None:
    """``wrap`` (before parameters are counted): every attribute a user's slicer serves is read at the full and
    the smallest sizes. A failing read is refused naming the slicer, the module and the attribute; a tensor
    attribute (the module's parameter or buffer of that name) must read as a tensor, no larger than the
    tensor on any axis, and at the full sizes exactly its shape: the largest sub-model is the model as it
    was (a ``full()`` or ``value()`` under-reporting a role would cut the full model itself, silently)."""
    from .slicers import base as _base

    user = [(path, m) for path, m in modules.items() if not type(m._sn.slicer).__module__.startswith("sortednet.")]
    if not user:
        return
    full = SubModel({d.name: d.full for d in nest.dims})
    _base.NAMING_SLICER_ERRORS[0] += 1
    try:
        for sub in (full, SubModel({d.name: d.sizes[0] for d in nest.dims})):
            with Use(nest._state, nest._plans.build(sub)), torch.no_grad():
                for path, m in user:
                    sl = m._sn.slicer
                    for name in sl.attr_names(m, m._sn.bind):
                        v = getattr(m, name)
                        t = sl.tensor(m, name)
                        where = f"{type(sl).__name__} (slicer of {path or '<root>'!r}, {m._sn.cls.__name__})"
                        if sub is full:
                            _full_value_kept(where, name, v, m.__dict__.get(name, _UNSET) if t is None else t, sub,
                                             m.training)
                        if t is None and isinstance(m.__dict__.get(name), torch.Tensor):
                            t = m.__dict__[name]  # (a plain tensor attribute: served as a tensor, cut or whole)
                        if not isinstance(t, torch.Tensor):
                            continue
                        if not isinstance(v, torch.Tensor):
                            raise SortedNetError(f"{where} gives {type(v).__name__} for {name!r} at {sub}, which "
                                                 f"is a tensor {tuple(t.shape)} of the module: value() must return "
                                                 "the tensor cut to the active sizes (docs/custom_slicers.md)")
                        if sub is full and v.shape != t.shape:
                            raise SortedNetError(f"{where} gives {name!r} at the full sizes {sub} as "
                                                 f"{tuple(v.shape)}, but the module's {name!r} is {tuple(t.shape)}: "
                                                 "the full model itself would be cut. Check its full() and "
                                                 "value() (docs/custom_slicers.md)")
                        if v.dim() != t.dim() or any(a > b for a, b in zip(v.shape, t.shape)):
                            raise SortedNetError(f"{where} gives {name!r} at {sub} as {tuple(v.shape)}, not a cut of "
                                                 f"the module's {tuple(t.shape)} (docs/custom_slicers.md)")
    finally:
        _base.NAMING_SLICER_ERRORS[0] -= 1


_UNSET = object()


def _number(x: Any) -> bool:
    return isinstance(x, (numbers.Number, np.generic)) and not isinstance(x, (str, bytes))


def _comparable(x: Any) -> bool:
    """A number, None, or a list / tuple of them: what the full-size check compares."""
    return x is None or _number(x) or (isinstance(x, (tuple, list)) and all(_number(y) for y in x))


def _same_value(old: Any, new: Any) -> bool:
    """``new`` serves what ``old`` is: None for None; an integer (or bool) of the same value for an integer (a
    float only if it is that whole number); a float for a float up to float32 rounding (``k ** -0.5`` for ``1 /
    math.sqrt(k)``, ``np.float32(0.1)`` for ``0.1``); a list or tuple (``torch.Size`` too) for a list or tuple,
    item by item."""
    if old is None or new is None:
        return old is new
    if isinstance(new, torch.Tensor) and new.dim() == 0 and not new.is_meta and _number(old):
        new = new.item()  # (a 0-dim tensor for a number: the value it holds, in its dtype's precision)
    if isinstance(old, (tuple, list)):
        return isinstance(new, (tuple, list)) and len(new) == len(old) and all(
            _same_value(a, b) for a, b in zip(old, new))
    if not _number(new) or isinstance(new, (tuple, list)):
        return False
    whole = (numbers.Integral, np.integer, np.bool_)  # (a bool is the integer 0 or 1, as Python compares it)
    try:
        if isinstance(old, whole):
            if isinstance(new, whole):
                return int(old) == int(new)
            return isinstance(new, (numbers.Real, np.floating)) and float(new).is_integer() and int(new) == int(old)
        a, b = complex(old), complex(new)
    except (TypeError, ValueError, OverflowError):
        return False
    if cmath.isnan(a) and cmath.isnan(b):
        return True
    return a == b or (math.isfinite(abs(a)) and abs(a - b) <= 1e-6 * max(abs(a), abs(b)))


def _full_value_kept(where: str, name: str, v: Any, old: Any, sub: SubModel, training: bool = False) -> None:
    """A user's slicer must serve, at the full sizes, what the module held before wrap (a parameter's or buffer's
    values, an int such as ``fan_in`` kept in the instance ``__dict__``): the largest sub-model is the model as it
    was. A value it computes otherwise (the wrong axis' length, ``None``, a tensor scaled by mistake) would change
    the full model itself, and export copies the same value, so no comparison of the two would see it.
    Values of other kinds (objects, configs) are not compared."""
    if old is _UNSET:
        return
    if isinstance(old, torch.Tensor):
        if not isinstance(v, torch.Tensor) or v.shape != old.shape or old.is_meta or v.is_meta:
            return  # (a shape the checks below refuse by name; meta tensors hold no values)
        a, b = v.detach(), old.detach()
        if a.layout != torch.strided or b.layout != torch.strided:  # (sparse: its dense values; a layout without
            try:                                                    # one is not compared)
                a, b = a.to_dense(), b.to_dense()
            except (RuntimeError, NotImplementedError, TypeError):
                return
        if a.dtype == b.dtype and a.device == b.device and a.data_ptr() == b.data_ptr() and \
                a.stride() == b.stride() and a.storage_offset() == b.storage_offset():
            return  # (the module's own memory, as a slicer's views serve it: equal, in any dtype)
        if b.is_floating_point() and b.element_size() == 1 and a.is_floating_point() and a.element_size() > 1:
            a, b = a.double(), b.double()  # (float8 held, a wider float served: the float8 values exactly, which a
            #                                 wider type holds; a cast back to float8 would pass an error under a step)
        if a.dtype != b.dtype:  # (a float value in the module's float dtype, as the module would hold it: a float64
            if b.is_floating_point() and (a.is_floating_point() or not a.is_complex()):  # recomputation passes, a
                a = a.to(b.dtype)                                 # bfloat16 cast does not; any other in a dtype
            else:                                                 # holding both exactly: a fraction or a float32
                kind = torch.complex128 if a.is_complex() or b.is_complex() else (  # rounding served for an
                    torch.int64 if not a.is_floating_point() else torch.float64)   # integer buffer does not pass)
                a, b = a.to(kind), b.to(kind)
        try:
            if b.is_floating_point() and b.element_size() == 1:  # (float8, cast to the module's dtype: equal as
                a, b = a.float(), b.float()                      # float32 values, which hold each exactly; torch
                same = bool(torch.equal(a, b) or torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))  # has
            else:                                                                             # no float8 equal)
                same = bool(torch.equal(a, b))
                if not same and (a.is_floating_point() or a.is_complex()):  # (NaN where the module holds NaN; a few
                    eps = torch.finfo(b.dtype).eps if b.is_floating_point() else 2.0 ** -52  # ulps: recomputed in
                    same = bool(torch.allclose(a, b, rtol=4 * eps, atol=0.0, equal_nan=True))  # another precision)
        except (RuntimeError, NotImplementedError, TypeError):  # (a dtype without these kernels: not compared)
            return
        if not same:
            try:
                diff = f" (largest difference {(a - b).abs().max().item():.3g})"
            except (RuntimeError, NotImplementedError, TypeError):  # (bool tensors do not subtract)
                diff = ""
            raise SortedNetError(f"{where} gives {name!r} at the full sizes {sub} with other values than the "
                                 f"module's {name!r}{diff}: the largest sub-model must be the model as it was. "
                                 "value() must return the tensor itself (cut to the active sizes) there "
                                 "(docs/custom_slicers.md)" + (
                                     ". The module is in training mode: a value() that draws at random there "
                                     "(DropConnect) differs from the module's tensor; wrap the model after "
                                     "model.eval() (the values eval mode serves are compared), then call "
                                     "model.train()" if training else ""))
        return
    if not _comparable(old):
        return
    if not _same_value(old, v):
        raise SortedNetError(f"{where} gives {name!r} at the full sizes {sub} as {type(v).__name__} {str(v)[:40]}, "
                             f"but the module holds {type(old).__name__} {str(old)[:40]}: the largest sub-model "
                             "must be the model as it was. value() must return the module's own value at the "
                             "full sizes (read it from m.__dict__, or compute it from the unsliced sizes) "
                             "(docs/custom_slicers.md)")


def guard_written_copies(nest: Nest) -> None:
    """``wrap``: the parameters and buffers a user's slicer serves (``State.guard``). Where its ``value()`` is a
    new tensor, not the tensor's memory (``.contiguous()`` of a strided slice, ``.clone()``, a cast), a forward's
    write in place into it (running statistics, a clamp) would be lost where the plain model writes its tensor:
    those copies refuse writes (:func:`sortednet.views.computed`)."""
    for m in nest._sliced.values():
        st = m._sn
        if not type(st.slicer).__module__.startswith("sortednet."):
            st.guard = frozenset(n for n in st.slicer.attr_names(m, st.bind)
                                 if isinstance(m._parameters.get(n), torch.Tensor)
                                 or isinstance(m._buffers.get(n), torch.Tensor))


def slicer_grad_self_check(nest: Nest) -> None:
    """``wrap``: a slicer of the user's own whose ``value()`` cuts a parameter that requires grad must give a
    tensor connected to it (a view, or any differentiable op), at the full and the smallest sizes: one cut from
    ``.data`` or ``.detach()`` would leave that parameter untrained, at every size, with nothing said. Refused,
    naming the slicer, the module and the tensor."""
    user = [(path, m) for path, m in nest._sliced.items() if not type(m._sn.slicer).__module__.startswith("sortednet.")]
    if not user or torch.is_inference_mode_enabled():  # (inference mode: no value has a gradient to lose)
        return
    # a frozen parameter is read as trainable too (restored after): one frozen at wrap and unfrozen to fine-tune
    # later would otherwise get no gradient in silence
    frozen = [p for _, m in user for name in m._sn.slicer.attr_names(m, m._sn.bind)
              if (p := m._parameters.get(name)) is not None and not p.requires_grad and not p.is_inference()
              and (p.is_floating_point() or p.is_complex())]
    frozen = list({id(p): p for p in frozen}.values())
    try:
        for p in frozen:
            p.requires_grad_(True)
        found = _read_connected(nest, user)
    finally:
        finish_all([functools.partial(torch.Tensor.requires_grad_, p, False) for p in frozen])
    frozen_ids = {id(p) for p in frozen}
    for where, name, sub, p in found:
        what = (f"{where} gives {name!r} at {sub} without a gradient path to the parameter (cut from .data or "
                ".detach(), computed by an op without one: a comparison, an integer cast; or a new leaf of its "
                "own: nn.Parameter(w.clone()), w.detach().requires_grad_())")
        if id(p) not in frozen_ids:
            raise SortedNetError(f"{what}: its gradient would never reach the parameter, which would not train at "
                                 "any size. Cut the parameter itself (a view such as p[:k] or p.narrow(...)) in "
                                 "value() (docs/custom_slicers.md)")
        warnings.warn(f"{what}. It is frozen now; unfrozen later, it would not train at any size. A tensor that "
                      "never trains (a fixed mask) is a buffer: register_buffer silences this", UserWarning,
                      stacklevel=caller_outside())


def _reaches(v: torch.Tensor, p: torch.Tensor, limit: int = 100_000) -> bool:
    """Whether ``v``'s autograd graph leads to the leaf ``p`` (a value that requires grad through a leaf of its
    own, ``nn.Parameter(w.clone())`` or ``w.detach().requires_grad_()``, would train that leaf, never ``p``)."""
    if not v.requires_grad:
        return False
    if v is p:
        return True
    todo, seen = [v.grad_fn], set()
    while todo and len(seen) < limit:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if getattr(f, "variable", None) is p:
            return True
        todo.extend(g for g, _ in f.next_functions)
    return len(seen) >= limit  # (a graph too large to walk: not refused)


def _read_connected(nest: Nest, user: list[tuple[str, nn.Module]]) -> list[tuple[str, str, SubModel, Any]]:
    """(slicer and module, attribute, sub-model, parameter) of each parameter read without a gradient path."""
    found, seen = [], set()
    for sub in (SubModel({d.name: d.full for d in nest.dims}), SubModel({d.name: d.sizes[0] for d in nest.dims})):
        with Use(nest._state, nest._plans.build(sub)), torch.enable_grad():
            for path, m in user:
                sl = m._sn.slicer
                for name in sl.attr_names(m, m._sn.bind):
                    p = m._parameters.get(name)
                    if p is None or not p.requires_grad or p.is_inference() or id(p) in seen:
                        continue
                    v = getattr(m, name)
                    if isinstance(v, torch.Tensor) and not _reaches(v, p):
                        seen.add(id(p))
                        found.append((f"{type(sl).__name__} (slicer of {path or '<root>'!r}, {m._sn.cls.__name__})",
                                      name, sub, p))
    return found


def norm_self_check(nest: Nest) -> None:
    """``wrap``: every sliced BatchNorm whose class has a forward of its own (timm's ``BatchNormAct2d``,
    a user's subclass; not ``SyncBatchNorm``) is run alone, in eval and in training mode, on a private view with
    distinct per-channel statistics and affine values: at each smaller size its output must be the full
    module's output on the kept channels (a batch norm and an elementwise activation act per channel). A
    forward that sizes something by an attribute sortednet does not slice, or reads the full tensors, is
    refused here, naming the module, instead of computing a wrong sub-model."""
    from .slicers.base import own_forward

    todo = [(path, m) for path, m in nest._sliced.items()
            if isinstance(m, _BatchNorm) and "norm" in m._sn.bind and own_forward(m._sn.cls, m._sn.slicer)]
    if not todo:
        return
    full = SubModel({k.name: k.full for k in nest.dims})
    gen = torch.Generator().manual_seed(0)
    own: dict[int, torch.Tensor] = {}  # (the view's own copies of these norms' tensors, which the runs below fill
    for _, live in todo:               # with test values: never the ones another thread serving the model reads)
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            t = live._parameters.get(n) if n in live._parameters else live._buffers.get(n)
            if isinstance(t, torch.Tensor) and not t.is_meta:
                own[id(t)] = nn.Parameter(t.detach().clone(), t.requires_grad) if isinstance(
                    t, nn.Parameter) else t.detach().clone()
    with dry_run(nest.model), eval_mode(nest, replace=own) as (view, _), torch.no_grad():
        for path, live in todo:
            b = live._sn.bind["norm"]
            mod = view.get_submodule(path)
            cls = live._sn.cls.__name__
            c = b.full
            tensors = [t for t in (mod._parameters.get(n) if n in mod._parameters else mod._buffers.get(n)
                                   for n in ("weight", "bias", "running_mean", "running_var")) if t is not None]
            if any(t.is_meta or not t.is_floating_point() for t in tensors):  # nothing to run: not verified
                raise SortedNetError(
                    f"{b.dim.kind} {b.dim.name!r} at {path!r} ({cls}, a BatchNorm with a forward of its own): "
                    "sortednet verifies such a module by running it, which its meta-device (or non-float) tensors "
                    "cannot; materialise the model (model.to_empty(device=...)), then wrap it")
            like = tensors[0] if tensors else torch.empty(0, device="cpu")
            for n, lo in (("weight", 0.5), ("bias", -1.0), ("running_mean", -1.0), ("running_var", 0.5)):
                t = mod._parameters.get(n) if n in mod._parameters else mod._buffers.get(n)
                if t is not None:  # distinct per channel: a forward reading other channels shows
                    t.copy_(lo + torch.rand(t.shape, generator=gen, device="cpu").to(t))
            ndim = next((k for cls_, k in ((nn.BatchNorm1d, 3), (nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5))
                         if isinstance(live, cls_)), 4)
            x = (torch.randn(4, c, *(3,) * (ndim - 2), generator=gen, device="cpu") * 2 + 0.5).to(like)
            for training in (False, True):
                mod.train(training)
                try:
                    with Use(nest._state, nest._plans.build(full)), seeded(0):
                        want = call_model(mod, x)
                except Exception as e:  # not a norm over (batch, channels, ...): its slicing cannot be verified
                    raise SortedNetError(
                        f"{b.dim.kind} {b.dim.name!r} at {path!r} ({cls}, a BatchNorm with a forward of its own): "
                        f"sortednet verifies such a module by running it alone on a (batch, channels, ...) input, "
                        f"which it does not take ({type(e).__name__}: {str(e)[:200]}); register a slicer for it "
                        "(docs/custom_slicers.md) or leave it out") from e
                for size in b.dim.sizes[:-1]:
                    keep = torch.cat([torch.arange(st, st + n, device="cpu") for st, n in b.segments(size)])
                    sub = full.replace(**{b.dim.name: size})
                    try:
                        with Use(nest._state, nest._plans.build(sub)), seeded(0):
                            got = call_model(mod, x[:, keep])
                        err = _rel_diff(got, want[:, keep], 1e-6) if got.shape == want[:, keep].shape else None
                    except Exception as e:
                        raise SortedNetError(
                            f"{b.dim.kind} {b.dim.name!r} at {path!r} ({cls}, a BatchNorm with a forward of its "
                            f"own): it runs on {c} channels but fails on {b.total(size)}: {type(e).__name__}: "
                            f"{str(e)[:300]}. Its forward sizes something by an attribute sortednet does not "
                            "slice; register a slicer for it (docs/custom_slicers.md) or leave it out") from e
                    if err is None or err > 1e-4:
                        raise SortedNetError(
                            f"{b.dim.kind} {b.dim.name!r} at {path!r} ({cls}, a BatchNorm with a forward of its "
                            f"own): at {b.total(size)} channels its output is not the full module's on those "
                            f"channels ({'another shape' if err is None else f'relative difference {err:.3g}'}"
                            f", {'training' if training else 'eval'} mode, run alone on a random input): its "
                            "forward does not read the sliced statistics and affine parameters; register a "
                            "slicer for it (docs/custom_slicers.md) or leave it out")


_TINY = 1e-30  # the scale floor of outputs compared whole: an output of scale 1e-5 (probabilities over a large
# vocabulary, a regression in small units) is compared relative to that scale, not as if it were 1


def _scale(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest magnitude of ``y``'s finite entries, fill values such as -1e9 left out (as :func:`_rel_diff` leaves
    them: told from ``x``, the output compared with ``y``), 0.0 if none."""
    if x.shape != y.shape:
        return 0.0
    fin = torch.isfinite(x) & torch.isfinite(y)
    y = without_fills(x[fin], y[fin])[1]
    return float(y.abs().max()) if y.numel() else 0.0


def _rel_diffs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """:func:`_rel_diff` of each pair ``(got, want)`` of one run's outputs, relative to ``want``'s own scale; an
    output below 1e-4 of the largest one's scale (rounding noise around zero: the mean of normalised features
    returned beside the logits) is measured against that floor instead."""
    floor = max([1e-4 * _scale(x, y) for x, y in pairs] + [_TINY])
    return [_rel_diff(x, y, floor) for x, y in pairs]


def _rel_diff(x: torch.Tensor, y: torch.Tensor, floor: float) -> float:
    """Largest difference of the finite entries relative to ``y``'s scale (at least ``floor``; fill values such
    as -1e9 left out of it: :func:`~sortednet.coupling_ops.without_fills`); non-finite entries (an output masked
    with -inf) must agree exactly, else inf."""
    nan_x, nan_y = torch.isnan(x), torch.isnan(y)
    inf_x, inf_y = torch.isinf(x), torch.isinf(y)
    if not torch.equal(nan_x, nan_y) or not torch.equal(inf_x, inf_y) or not torch.equal(x[inf_x], y[inf_y]):
        return float("inf")
    fin = ~(nan_y | inf_y)
    if not bool(fin.any()):
        return 0.0
    x, y = without_fills(x[fin], y[fin])
    return ((x - y).abs().max() / y.abs().max().clamp_min(floor)).item()


def _in_float32(view: nn.Module, example: Any, measure: Callable[[Any], float | None]) -> float | None:
    """``measure(example)`` with the half-precision tensors of ``view`` (a private view) and of the example in
    float32; None where there are none, or it does not run so (a forward casting to its own half dtype)."""
    with _wide(view) as wide:
        if not wide:
            return None
        flat, spec = tree_flatten(example)
        wide_example = tree_unflatten([t.float() if isinstance(t, torch.Tensor) and t.dtype in (
            torch.float16, torch.bfloat16) else t for t in flat], spec)
        try:
            return measure(wide_example)
        except Exception:
            return None


def _tolerance(nest: Nest) -> float:
    """Relative error that whole units may show: float32 / float64 rounding, or half precision's."""
    half = any(p.is_floating_point() and p.dtype not in (torch.float32, torch.float64) for p in nest.model.parameters())
    return 1e-1 if half else 1e-3  # half precision: the rounding a deep stack accumulates


def _reference_shapes(nest: Nest, shapes: Callable[[], list], want: list) -> Callable[..., list]:
    """The output shapes a sub-model must give: the full model's (``want``), or, when its depths differ, those
    of the full widths at its depths (a model returning one hidden state per layer returns fewer; a width or
    head count must change nothing). Each depth combination is run once, listed in the nest or not."""
    depths = [d for d in nest.dims if d.kind == "depth"]
    cache: dict[tuple, list] = {}

    def at(sub: SubModel, got: list | None = None) -> list:
        """(``got``: the shapes ``sub`` gave; a sub-model at full widths is its depth's reference itself.)"""
        key = tuple(sub[d.name] for d in depths)
        if all(k == d.full for k, d in zip(key, depths)):
            return want
        if got is not None and key not in cache and all(sub[d.name] == d.full for d in nest.dims
                                                       if d.kind != "depth"):
            cache[key] = got
        if key not in cache:
            ref = SubModel({d.name: d.full for d in nest.dims}).replace(**dict(zip((d.name for d in depths), key)))
            try:
                with Use(nest._state, nest._plans.build(ref)):  # (uncached: a restricted nest may not list it)
                    made = shapes()
            except Exception as e:
                if got is None or not nest._restricted:
                    raise SortedNetError(f"nest.check: {ref} (the full widths at {sub}'s depth) does not run on the "
                                         f"example: {type(e).__name__}: {e}") from e
                made = got  # (a restricted nest that couples a width to the depth, as a block dropped that re-sizes
            cache[key] = made  # the stream does: the first listed sub-model at this depth is the reference)
        return cache[key]

    return at


def _same_but_heads(nest: Nest, sub: SubModel, got: list, ref: list) -> bool:
    """``got`` equals ``ref`` but for outputs with one axis of a Heads dimension's count going from full to the
    sub-model's (attention maps, ``output_attentions=True``), or a key / value head count to the sub-model's
    (full and sub-model's counts over a group size: a grouped-query cache the model returns as tensors): whole
    heads dropped, no feature sliced."""
    counts = {(d.full // g, sub[d.name] // g) for d in nest.dims if d.kind == "heads" and sub[d.name] != d.full
              for g in range(1, d.full + 1) if d.full % g == 0 and sub[d.name] % g == 0}
    if not counts or len(got) != len(ref):
        return False
    for g, r in zip(got, ref):
        if g == r:
            continue
        if not (isinstance(g, tuple) and isinstance(r, tuple) and len(g) == len(r)):
            return False
        diff = [(a, b) for a, b in zip(r, g) if a != b]
        if len(diff) != 1 or diff[0] not in counts:
            return False
    return True


def _shapes(x: Any) -> list:
    """The shape of every tensor of a model output (dataclass fields included), the type of anything else."""
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in output_leaves(x)]


def _plan(nest: Nest, mixed: int, seed: int, every_depth: bool = True) -> list[tuple[SubModel, str]]:
    """(sub-model, what it tests), among the nest's listed sub-models: each dimension at its smallest with
    as many others as possible at full size, the smallest, the largest, each depth below full (``every_depth``;
    else the shallowest) with the others as full and as small as listed, the shallowest and deepest below full
    with each other dimension at its smallest, and a few mixed ones."""
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
    # a depth that drops a block can hand the layers after it another dimension's width (a block that re-sizes
    # the stream, skipped): depths below full with each other dimension at its smallest, the rest as full as
    # listed, so two widths meeting only there differ (the smallest sub-model can match them by coincidence)
    for dd in (d for d in nest.dims if d.kind == "depth"):
        for size in dd.sizes[:-1]:  # every depth (a middle block may re-size the stream), and the shallowest and
            cands = [s for s in pool if s[dd.name] == size]  # deepest below full with each other dimension at
            if cands and (every_depth or size == dd.sizes[0]):  # its smallest
                best = max(cands, key=lambda s: sum(s[e.name] == e.full for e in nest.dims))
                out.append((best, f"depth {dd.name!r} at {size}"))
                others = [e for e in nest.dims if e is not dd and len(e.sizes) > 1]
                if others:  # (and with the others at their smallest: a width bound only between middle blocks)
                    low = max(cands, key=lambda s: sum(s[e.name] == e.sizes[0] for e in others))
                    out.append((low, f"depth {dd.name!r} at {size} with the other dimensions as small as listed"))
            if size not in (dd.sizes[0], dd.sizes[-2]):
                continue
            for w in (e for e in nest.dims if e is not dd and len(e.sizes) > 1):
                cands = [s for s in pool if s[dd.name] == size and s[w.name] == w.sizes[0]]
                if cands:
                    best = max(cands, key=lambda s: sum(s[e.name] == e.full for e in nest.dims))
                    out.append((best, f"depth {dd.name!r} at {size} with {w.kind} {w.name!r} at {w.sizes[0]}"))
    out += [(subs[rng.randrange(len(subs))], "a mixed sub-model") for _ in range(min(mixed, len(subs)))]
    return list(dict.fromkeys(out))


def _raised_in(model: Any, exc: BaseException | None) -> str:
    """`` (raised in <module path> (<class>), <file>:<line>)``: the innermost module of ``model`` whose own code
    (a method taking it as its first argument, not torch's call machinery around a hook) was running when ``exc``
    was raised, from its traceback; empty when none was."""
    if exc is None or not isinstance(model, nn.Module):
        return ""
    names = {id(m): p for p, m in model.named_modules()}
    where, at, tb = "", "", exc.__traceback__
    machinery = os.path.dirname(nn.Module.__call__.__code__.co_filename)  # (torch/nn/modules: _call_impl, hooks)
    libraries = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)  # (the torch and
    #                                                       sortednet packages alone: transformers' code is a model's)
    while tb is not None:
        code = tb.tb_frame.f_code
        first = tb.tb_frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
        try:
            module = isinstance(first, nn.Module)
        except Exception:  # (a proxy object whose __class__ raises)
            module = False
        own = not code.co_filename.startswith(libraries)  # (the user's code: neither torch's nor sortednet's)
        if own:
            at = f"{os.path.basename(code.co_filename)}:{tb.tb_lineno}"
        if module and id(first) in names and (
                os.path.dirname(code.co_filename) != machinery or code.co_name == "forward"):
            st = first.__dict__.get("_sn")  # (a sliced module: its own class, not sortednet's subclass)
            cls = st.cls.__name__ if st is not None and hasattr(st, "cls") else type(first).__name__
            where = f"raised in {names[id(first)] or '<root>'!r} ({cls})"
            where_at = at
        tb = tb.tb_next
    if not where:
        return ""
    return f" ({where}, {where_at})" if where_at else f" ({where})"


def _stored_width(nest: Nest, sub: SubModel, err: str) -> str:
    """A hint where a view / reshape failed on a shape that holds the full size of a width the sub-model cuts, and
    that shape with the active size in its place fits the input: the forward asks for a width it stored
    (``self.c = 16`` at init) instead of taking it from the tensor."""
    m = re.search(r"shape '\[([-\d, ]+)\]' is invalid for input of size (\d+)", err)
    if m is None:
        return ""
    shape, numel = [int(v) for v in m.group(1).split(",") if v.strip()], int(m.group(2))
    for d in nest.dims:
        if d.kind != "width" or sub[d.name] == d.full or d.full not in shape:
            continue
        fixed = [sub[d.name] if i == shape.index(d.full) else v for i, v in enumerate(shape)]
        known = math.prod(v for v in fixed if v != -1)
        if known and (numel == known if -1 not in fixed else numel % known == 0):
            return (f"; the shape [{m.group(1)}] holds {d.full}, the full size of width {d.name!r} (here "
                    f"{sub[d.name]}): a view or reshape to a width the forward stores or derives itself (self.c "
                    "set at init) still asks for the full size; take it from the tensor (x.shape[1], or -1)")
    return ""


def _fail(nest: Nest, model: Any, example: Any, what: str, sub: SubModel, err: str,
          exc: BaseException | None = None) -> SortedNetError:
    try:
        problems = diagnose(nest, example, model)
    except SortedNetError as e:
        problems = [f"(could not analyse the wiring: {e})"]
    head = f"nest.check: {what} ({sub}) {err}{_raised_in(model, exc)}{_stored_width(nest, sub, err)}"
    if problems:
        return SortedNetError(head + "\n  " + "\n  ".join(problems))
    if isinstance(exc, SortedNetError) and not isinstance(exc, IndexError):  # (a refusal of its own, which says
        return SortedNetError(head)  # what is at fault: no wiring guesses; an index past a Depth list's blocks: the
        #                              forward counting them itself, said below)
    heads = [d.name for d in nest.dims if d.kind == "heads" and sub[d.name] != d.full]
    hint = (f"; Heads {heads}: an attention that splits or reshapes with widths it stores or derives itself "
            "(q, k, v = qkv.split(self.n_embd), head_dim = C // self.n_head, a view to its own embedding width) "
            "still sees the full widths: derive them from the tensors or from attributes Heads slices "
            "(num_heads, head_dim, ...; count_attrs=), see docs/heads.md" if heads else "")
    depths = [d.name for d in nest.dims if d.kind == "depth" and sub[d.name] != d.full]
    # (a forward counting its blocks itself fails with an IndexError, or a ValueError from zip(strict=True): there a
    # block re-sizing the stream is no cause; a stream of another size fails a shape check of any kind)
    counted = isinstance(exc, IndexError) or (isinstance(exc, ValueError) and "zip()" in str(exc))
    shaped = not counted and not isinstance(exc, SortedNetError)
    resizers = _dropped_resizers(nest, model, example, sub) if depths and not hint and shaped else []
    if resizers:
        order = {q: k for k, q in enumerate(dict(nest.model.named_modules()))}  # (the lists as the model holds
        later = [p for n in depths for p in sorted(                               # them: an encoder first)
            [q for q, m in nest._sliced.items() if "depth" in m._sn.bind and m._sn.bind["depth"].dim.name == n],
            key=lambda q: order.get(q, 0))[1:]]
        # (a block of a list after the first re-sizes the stream: a decoder's, which may be stored in the order
        # opposite to its encoder's)
        later_resizes = any(r.startswith(f"{p!r}"[:-1] + ".") for r in resizers for p in later)
        hint = (f"; depth {depths}: blocks it drops re-size the stream the layers after them read "
                f"({'; '.join(resizers[:4])}{' ...' if len(resizers) > 4 else ''}, in the largest sub-model), which "
                "then get the stream of the last block kept: list only depths that keep them, keep such blocks "
                "out of the Depth, or bind those layers to the dimensions of every block that can end the stream "
                "(one Width for the stream)" + ("; a Depth over several lists keeps the first blocks of each: a "
                                                "decoder list stored deepest level first (a U-Net's ups built in "
                                                "decoding order) pairs its first blocks with the encoder's last, "
                                                "which a shallower depth cuts: store it in the encoder's order "
                                                "(outermost first) and walk it reversed" if later_resizes
                                                else ""))
    elif depths and not hint:
        hint = (f"; depth {depths}: a forward that counts its blocks itself (range(self.num_layers), zip(..., "
                "strict=True) with a list of another length) must take len() of the layer list instead; or the "
                "blocks it drops re-size the stream the layers after them read, which then get the width of the "
                "last block kept: bind those layers to the dimensions of every block that can end the stream (one "
                "Width for the stream), or keep such blocks out of the Depth")
    return SortedNetError(head + "\n  (no missing binding found by tracing: check custom modules and ops of "
                          f"the sliced features{hint})")


def _dropped_resizers(nest: Nest, model: Any, example: Any, sub: SubModel) -> list[str]:
    """``'blocks.2' (Bottleneck) maps [2, 32, 8, 8] to [2, 64, 4, 4]`` for each block ``sub`` drops whose output
    has another shape than its input in the largest sub-model (a forward of ``model``, the check's view, with a
    hook on each; its first tensor in and out). Empty where none does, or the forward or a hook fails."""
    dropped: list[tuple[str, nn.Module]] = []
    with nest.use(sub):
        for path, live in nest._sliced.items():
            for name in live._sn.slicer.skipped(live):
                full = f"{path}.{name}" if path else name
                try:
                    dropped.append((full, model.get_submodule(full)))
                except AttributeError:
                    continue
    shapes: dict[str, tuple[list[int], list[int]]] = {}

    def record(path: str, module: nn.Module, args: Any, out: Any) -> None:
        into = next((t for t in tree_leaves(args) if isinstance(t, torch.Tensor)), None)
        got = next((t for t in tree_leaves(out) if isinstance(t, torch.Tensor)), None)
        if into is not None and got is not None:
            shapes.setdefault(path, (list(into.shape), list(got.shape)))

    handles = [m.register_forward_hook(functools.partial(record, p)) for p, m in dropped]
    try:
        with nest.use(nest.largest), torch.no_grad():
            call_model(model, example)
    except Exception:
        return []
    finally:
        for h in handles:
            h.remove()
    out = []
    for p, m in dropped:
        if p in shapes and shapes[p][0] != shapes[p][1]:
            st = m.__dict__.get("_sn")
            cls = st.cls.__name__ if st is not None and hasattr(st, "cls") else type(m).__name__
            out.append(f"{p!r} ({cls}) maps {shapes[p][0]} to {shapes[p][1]}")
    return out


class _Reads(TorchFunctionMode):
    """Notes (in ``ran``) every torch function given one of ``weights`` (``id -> name``) as an argument."""

    def __init__(self, weights: dict[int, str], ran: list[str]) -> None:
        super().__init__()
        self.weights, self.ran = weights, ran

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        hit = next((self.weights[id(t)] for t in tree_leaves((args, kwargs)) if id(t) in self.weights), None)
        if hit is not None:
            self.ran.append(hit)
        return func(*args, **kwargs)


def _at_depth(nest: Nest, dd: Any, size: int) -> SubModel | None:
    """The sub-model that runs Depth ``dd`` at ``size`` with every other dimension as large as it can be: the
    full widths, or, in a restricted nest (``submodels=``), the last listed one at that depth (None if none)."""
    full = SubModel({d.name: d.full for d in nest.dims})
    if not nest._restricted:
        return full.replace(**{dd.name: size})
    return next((s for s in reversed(nest.submodels) if s[dd.name] == size), None)


def _skipped_layers_run(nest: Nest, model: nn.Module, copies: dict[int, nn.Module], example: Any) -> None:
    """Each Depth at its shallowest: no layer of a block it skips may run, and no weight of one may enter an op,
    unless the model also holds it where the depth does not reach (a block kept as ``self.final``, a module every
    block shares: what the export keeps too). A forward that reaches the skipped blocks' layers or weights
    another way (a Python list or dict of them) runs them under every depth: the depth would change nothing, and
    cost / export would describe a model the forward does not compute."""
    from .export import reachable_modules

    for dd in (d for d in nest.dims if d.kind == "depth"):
        ran: list[str] = []
        shallow = next((s for s in (_at_depth(nest, dd, n) for n in dd.sizes) if s is not None), None)
        if shallow is None or shallow[dd.name] == dd.full:
            continue

        def seen(where: str, ran: list[str] = ran) -> Callable[..., None]:
            return lambda mod, args: ran.append(where)

        with Use(nest._state, nest._plans.build(shallow)):
            drop = [(path, m, name) for path, m in nest._sliced.items() for name in m._sn.slicer.skipped(m)]
            kept = reachable_modules(nest.model, {(id(m), name) for _, m, name in drop})
            inside = [(f"{path}.{name}.{sp}".rstrip("."), c) for path, m, name in drop
                      for sp, c in m._modules[name].named_modules() if id(c) not in kept]
            kept_tensors = {id(t) for c in kept.values() for t in (*c._parameters.values(), *c._buffers.values())}
            weights = {id(t): f"{where}.{n}" for where, c in inside
                       for n, t in (*c._parameters.items(), *c._buffers.items())
                       if t is not None and id(t) not in kept_tensors}

            hooks = [copies[id(c)].register_forward_pre_hook(seen(where)) for where, c in inside if id(c) in copies]
            try:
                with _Reads(weights, ran):
                    call_model(model, example)
            finally:
                for h in hooks:
                    h.remove()
        if ran:
            raise SortedNetError(
                f"nest.check: depth {dd.name!r} at {dd.sizes[0]} skips the block holding {ran[0]!r}, but the "
                "forward ran it: it reaches the blocks' layers or weights outside the layer list (a list or dict "
                "attribute of them), so they run under every depth and the depth changes nothing. Call the blocks "
                "through the layer list")


def _idle_at_depth(nest: Nest, model: nn.Module, copies: dict[int, nn.Module], example: Any) -> None:
    """A second per-layer list the forward pairs with a Depth's blocks (``zip(self.blocks, self.norms)``,
    ``self.norms[i]``) but the Depth does not cut: at each depth d only its first d entries run, while ``cost``
    counts and ``export`` keeps all of them. Said with an :class:`IdleLayersWarning` naming it and how to bind
    it (a wrong count, not a wrong output). Only a list as long as the blocks, run whole at full depth and
    exactly its first d entries at every depth d (or its last d: ``reversed(self.norms)``, which a Depth
    cannot cut; the warning says to order it like the blocks), counts: which experts a router picks, or which branch an
    input takes, also changes with the depth, and is no such list."""
    bound = {id(m) for m in nest._sliced.values() if "depth" in m._sn.bind}  # (every Depth's own layer lists)
    for dd in (d for d in nest.dims if d.kind == "depth"):
        lists = [(path, c) for path, c in nest.model.named_modules()
                 if isinstance(c, (nn.ModuleList, nn.Sequential)) and id(c) not in bound and len(c) == dd.full
                 and id(c) in copies and any(True for _ in c.parameters())]
        if not lists:
            continue
        holders = {path: c for path, c in lists}
        full = SubModel({d.name: d.full for d in nest.dims})
        ran = _entries_run(nest, model, copies, example, holders, full)
        whole = {k for k, r in ran.items() if r == set(range(dd.full))}
        prefix = set(whole)  # (the ones that run exactly their first d entries, a Depth can cut those; others run
        #                      exactly their last d: read from the end)
        exits = {k for k, r in ran.items() if r == {dd.full - 1}}  # (an exit per depth: the last block's head,
        smallest: dict[str, set[int]] = {}                         # ``self.exits[len(self.blocks) - 1]``)
        low = dd.sizes[0]
        for size in dd.sizes[:-1]:
            sub = _at_depth(nest, dd, size)
            if not whole and not exits:
                break
            if sub is None:
                continue
            at = _entries_run(nest, model, copies, example, holders, sub)
            whole = {k for k in whole if at[k] in (set(range(size)), set(range(dd.full - size, dd.full)))}
            prefix = {k for k in prefix & whole if at[k] == set(range(size))}
            exits = {k for k in exits if at[k] == {size - 1}}
            if not smallest:
                smallest, low = {k: at[k] for k in whole | exits}, size
        if exits and len(dd.sizes) > 1:
            idle = sorted(exits)
            count = sum(t.numel() for p in idle for i, e in enumerate(holders[p])
                        if i not in smallest.get(p, {low - 1}) for t in e.parameters())
            warnings.warn(
                f"nest.check: depth {dd.name!r} runs one entry of {idle[:3]} at each depth d, the d-th (an exit "
                f"per depth: the head of the last block run), yet cost counts and export keeps all {dd.full}: "
                f"{count:,} idle parameters at depth {low}. Cut them with the blocks: sn.Depth({dd.name!r}, ..., "
                f"layers=[<the blocks>, {', '.join(map(repr, idle[:2]))}]) (a sub-model keeps its own exit and "
                "those of the depths below it)", IdleLayersWarning, stacklevel=4)
        if whole:
            idle = sorted(whole)
            count = sum(t.numel() for p in idle for i, e in enumerate(holders[p])
                        if i not in smallest.get(p, range(low)) for t in e.parameters())
            how = (f"Cut them with the blocks: sn.Depth({dd.name!r}, ..., layers=[<the blocks>, "
                   f"{', '.join(map(repr, idle[:2]))}])" if set(idle) <= prefix else
                   "A Depth keeps the first d entries of a list, and the forward runs others of "
                   f"{sorted(set(idle) - prefix)[:2]} (e.g. from its end): order that list like the blocks "
                   "(entry i with block i) to cut it with them")
            warnings.warn(
                f"nest.check: depth {dd.name!r} runs only d entries of {idle[:3]} (per-layer lists the "
                f"forward pairs with its blocks), yet cost counts and export keeps all {dd.full}: {count:,} idle "
                f"parameters at depth {low}. {how}", IdleLayersWarning, stacklevel=4)


def _depth_order(nest: Nest, model: nn.Module, copies: dict[int, nn.Module], example: Any) -> None:
    """A Depth keeps the first d entries of each of its layer lists: right only where what a sub-model runs is the
    full model's run of those entries, in the same order. A list read from its end (``reversed(self.norms)``
    zipped with the blocks, ``self.norms[len(self.norms) - 1 - i]``) pairs block 0 with the last norm at full
    depth and with norm d-1 at depth d: shapes fit, every output is another model's."""
    full = SubModel({d.name: d.full for d in nest.dims})
    for dd in (d for d in nest.dims if d.kind == "depth"):
        holders = {p: m for p, m in nest._sliced.items() if "depth" in m._sn.bind and m._sn.bind["depth"].dim is dd}
        if not holders:
            continue
        ref = _calls(nest, model, copies, example, holders, full)
        _refuse_crossed_pairs(dd, holders, ref)
        for size in dd.sizes[:-1]:
            sub = _at_depth(nest, dd, size)
            if sub is None:
                continue
            # the order in which the kept entries first run (a block run again later, or by a block the depth
            # skips, or one module at several positions of an ALBERT-like list, changes nothing here)
            got = _first_runs(_calls(nest, model, copies, example, holders, sub), size)
            want = _first_runs(ref, size)
            both = set(got) & set(want)  # (an entry only one side runs: the last exit head, self.exits[-1])
            got, want = [c for c in got if c in both], [c for c in want if c in both]
            if got != want:
                k = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                show = lambda calls, k=k: ", ".join(f"{p}[{i}]" for p, i in calls[max(0, k - 2):k + 3]) or "nothing"  # noqa: E731
                raise SortedNetError(
                    f"nest.check: depth {dd.name!r} keeps the first {size} entries of each of its layer lists "
                    f"{sorted(holders)[:3]}, but at depth {size} the forward runs them in another order than the full "
                    f"model runs those entries: entry {k + 1} to run is {show(got)} where the full model runs "
                    f"{show(want)} (a list "
                    "read from its end, reversed(...) or indexed from len(...), pairs other entries once cut). Read "
                    "every list of the Depth from its start, in the blocks' order")


def _refuse_crossed_pairs(dd: Any, holders: dict[str, nn.Module], calls: list[tuple[str, int]]) -> None:
    """Two layer lists of one Depth whose entries the full model runs in turn (a block, a norm, a block, a norm:
    ``zip(self.blocks, self.norms)``) pair entry i of one with entry i of the other, or a sub-model of the first d
    entries of each is not the full model's: ``zip(self.blocks, reversed(self.norms))`` pairs block 0 with the
    last norm at full depth and with norm d-1 at depth d. The order of the entries a sub-model keeps cannot show
    it where the only size below full is 1 (block 0, then norm 0, in both runs); the pairs of the full run do."""
    first = list(dict.fromkeys(calls))
    paths = sorted(holders)
    for a_i, a in enumerate(paths):
        for b in paths[a_i + 1:]:
            seq = [c for c in first if c[0] in (a, b)]
            n = min(len(holders[a]._modules), len(holders[b]._modules))
            if n < 2 or len(seq) != 2 * n or any(seq[k][0] == seq[k + 1][0] for k in range(len(seq) - 1)):
                continue  # (not run in turn: one list after the other, a U-Net's decoder read from its end)
            pairs = list(zip(seq[0::2], seq[1::2]))
            crossed = next(((x, y) for x, y in pairs if x[1] != y[1]), None)
            if crossed is not None:
                (xp, xi), (yp, yi) = crossed
                raise SortedNetError(
                    f"nest.check: depth {dd.name!r} keeps the first entries of each of its layer lists, but the full "
                    f"model runs {xp}[{xi}] with {yp}[{yi}] (the lists in turn, entries of other positions paired: a "
                    "list read from its end, reversed(...) or indexed from len(...)): at a shallower depth the first "
                    "entries pair otherwise, and no sub-model is the full model's first blocks. Read every list of "
                    "the Depth from its start, in the blocks' order")


class LayerPairingWarning(UserWarning):
    """``check``: a per-layer tensor outside a Depth's layer lists (a ``(layers, ...)`` parameter, an
    ``nn.ParameterList`` or an embedding of one row per layer) whose entries the forward pairs with the blocks
    otherwise at a shallower depth than at full depth (read from the end: ``self.gammas[len(self.blocks) - 1 - i]``):
    a sub-model is not the full model's first blocks there."""


class _EntryReads(TorchFunctionMode):
    """Records, in call order, which entries of per-layer tensors each op reads: ``stacked`` (id -> name) are
    tensors of one row per layer (an integer index, ``select`` / ``narrow`` / ``index_select`` on axis 0 or an
    embedding lookup reads those rows, any other op all of them), ``entries`` (id -> (name, i)) the parameters of
    an ``nn.ParameterList`` of one entry per layer."""

    def __init__(self, stacked: dict[int, str], entries: dict[int, tuple[str, int]], rows: int,
                 events: list) -> None:
        super().__init__()
        self.stacked, self.entries, self.rows, self.events = stacked, entries, rows, events

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if not isinstance(t, torch.Tensor):
                continue
            if id(t) in self.entries:
                name, i = self.entries[id(t)]
                self.events.append((name, {i}))
            elif id(t) in self.stacked:
                self.events.append((self.stacked[id(t)], self._rows(func, args, kwargs, t)))
        return func(*args, **kwargs)

    def _rows(self, func: Any, args: tuple, kwargs: dict, t: torch.Tensor) -> set[int]:
        every = set(range(self.rows))
        name = getattr(func, "__name__", "")
        with torch._C.DisableTorchFunction():
            try:
                if name == "embedding" and len(args) > 1 and args[1] is t and isinstance(args[0], torch.Tensor):
                    return {int(v) % self.rows for v in args[0].reshape(-1).tolist()}
                if not args or args[0] is not t:
                    return every
                if name == "__getitem__" and len(args) > 1:
                    idx = args[1][0] if isinstance(args[1], tuple) and args[1] else args[1]
                    if isinstance(idx, slice):
                        return set(range(self.rows)[idx])
                    if isinstance(idx, torch.Tensor) and not idx.is_floating_point() and idx.dtype != torch.bool:
                        return {int(v) % self.rows for v in idx.reshape(-1).tolist()}
                    if isinstance(idx, (int, np.integer)) and not isinstance(idx, (bool, np.bool_)):
                        return {int(idx) % self.rows}
                    return every
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                if isinstance(dim, int) and dim % max(t.dim(), 1) == 0:
                    if name == "select" and len(args) > 2:
                        return {int(args[2]) % self.rows}
                    if name == "narrow" and len(args) > 3:
                        start = int(args[2]) % self.rows
                        return set(range(start, start + int(args[3])))
                    if name == "index_select" and len(args) > 2 and isinstance(args[2], torch.Tensor):
                        return {int(v) % self.rows for v in args[2].reshape(-1).tolist()}
            except Exception:  # (an index this reading does not know: every row)
                return every
        return every


def _segment_reads(nest: Nest, model: nn.Module, example: Any, sub: SubModel, blocks: dict[int, int | None],
                   modules: dict[int, nn.Module], reads: _EntryReads, trailing: bool
                   ) -> dict[int, dict[str, set[int]]]:
    """A forward of ``sub``: per place, the entries ``reads`` saw read there. A place is the position of the block
    called last (-1 before any: ``blocks`` maps each block to its position in the list), or, where one module
    stands at several positions (shared ALBERT-style), the number of block calls so far. ``trailing``: the reads
    after the last block call are kept too."""
    events = reads.events = []
    hooks = [modules[k].register_forward_pre_hook(lambda *_, k=k: events.append(("@", k))) for k in modules]
    try:
        with Use(nest._state, nest._plans.build(sub)), seeded(0), reads:
            call_model(model, example)
    finally:
        for h in hooks:
            h.remove()
    last = max((i for i, e in enumerate(events) if e[0] == "@"), default=-1)
    keyed = all(i is not None for i in blocks.values())
    place, calls, out = -1, 0, {}
    for i, e in enumerate(events):
        if e[0] == "@":
            calls += 1
            place = blocks[e[1]] if keyed else calls  # type: ignore[assignment]
        elif trailing or i < last:
            out.setdefault(place, {}).setdefault(e[0], set()).update(e[1])
    return out


def _per_layer_pairing(nest: Nest, model: nn.Module, copies: dict[int, nn.Module], example: Any) -> set[str]:
    """Per-layer tensors a Depth does not cut, read in the loop over its blocks: at depth d, the entries read
    between the calls of the first d blocks must be ones the full model reads at those places (``gammas[i]``
    with block i; every entry read once before the loop also passes). Read from the end with a count that follows
    the depth (``gammas[len(self.blocks) - 1 - i]``), block 0 meets entry d-1 at depth d and entry L-1 at full
    depth: shapes fit, and the sub-model is another network than the full model's first blocks. Said with a
    :class:`LayerPairingWarning` (the reads after the last block are not compared: a final layer reading the
    last entry of what runs, like ``self.blocks[-1]``, follows the depth on purpose). Returns the names of the
    Depths warned of."""
    warned: set[str] = set()
    for dd in (d for d in nest.dims if d.kind == "depth"):
        lists = [m for m in nest._sliced.values() if "depth" in m._sn.bind and m._sn.bind["depth"].dim is dd]
        if not lists or dd.full < 2:
            continue
        inside = {id(t) for lst in nest._sliced.values() if "depth" in lst._sn.bind
                  for t in (*lst.parameters(), *lst.buffers())}
        stacked: dict[int, str] = {}
        entries: dict[int, tuple[str, int]] = {}
        for path, m in model.named_modules():
            if isinstance(m, nn.ParameterList) and len(m) == dd.full:
                for i, t in enumerate(m):
                    if isinstance(t, torch.Tensor) and id(t) not in inside:
                        entries.setdefault(id(t), (path, i))
            for n, t in (*m._parameters.items(), *m._buffers.items()):
                if (isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == dd.full and id(t) not in inside
                        and id(t) not in entries and not isinstance(m, nn.ParameterList)):
                    stacked.setdefault(id(t), f"{path}.{n}" if path else n)
        if not stacked and not entries:
            continue
        modules: dict[int, nn.Module] = {}
        blocks: dict[int, int | None] = {}
        for i, e in enumerate(lists[0]._modules.values()):
            if e is not None:
                c = copies.get(id(e), e)
                modules[id(c)] = c
                blocks[id(c)] = None if id(c) in blocks else i  # (one module at several positions: counted)
        reads = _EntryReads(stacked, entries, dd.full, [])
        try:
            ref = _segment_reads(nest, model, example, SubModel({d.name: d.full for d in nest.dims}), blocks,
                                 modules, reads, True)
        except Exception:
            continue
        for size in dd.sizes[:-1]:
            sub = _at_depth(nest, dd, size)
            if sub is None:
                continue
            try:
                got = _segment_reads(nest, model, example, sub, blocks, modules, reads, False)
            except Exception:
                continue
            off = [(k, name, sorted(rows - ref.get(k, {}).get(name, set())), sorted(ref.get(k, {}).get(name, set())))
                   for k, at in got.items() for name, rows in at.items()
                   if not rows <= ref.get(k, {}).get(name, set())]
            if off:
                k, name, extra, want = off[0]
                keyed = all(i is not None for i in blocks.values())
                place = ("before the first block" if k == -1 else f"after block {k}" if keyed else
                         f"after {k} block call(s)")
                warnings.warn(
                    f"nest.check: depth {dd.name!r} at {size} reads entries {extra[:4]} of {name!r} (one entry per "
                    f"layer, which the Depth does not cut) {place}, where the full model reads "
                    f"{want[:4] if want else 'none of its entries'}: the forward pairs the blocks with other "
                    "entries at a shallower depth (read from the end, with a count that follows the depth?), so a "
                    "sub-model is not the full model's first blocks there. Read entry i with block i (index it by the "
                    "block's position, or keep it in the block)", LayerPairingWarning,
                    stacklevel=4)
                warned.add(dd.name)
                break
    return warned


_EXACT = 4096       # elements: a value up to this size is kept whole (on the CPU), a larger one as a sketch
_CHUNK = 1 << 16    # a sketch projects a value chunk by chunk
_PROJ = 8           # random projections per sketch


class _Sketch:
    """Fixed-size digests of the values blocks read and give, what ``check`` keeps of one forward to compare it with
    another (whole copies of every call's tensors took gigabytes for a block called thousands of times, or for a
    mask expanded over the batch and the heads). An expanded view is taken as the tensor it expands (its shape
    kept too). A value of up to ``_EXACT`` elements is kept whole, on the CPU; a larger one as the largest of its
    finite entries, ``_PROJ`` projections of them on random normals, the same for both runs (``E[(g . (a - b))^2]
    = |a - b|^2``: the projections' spread estimates the difference's L2 norm, which is at least its largest entry;
    chunk by chunk, weighted by random normals, which keeps that, with no copy of the whole value), and projections
    of its non-finite pattern (a mask's -inf, which must agree exactly). Python floats: small tensors kept between
    a forward's large temporaries fragment the CPU heap, which then never shrinks."""

    def __init__(self) -> None:
        self._basis: dict[torch.device, torch.Tensor] = {}
        self._weights: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, t: torch.Tensor) -> tuple:
        t = _dense(t).detach()
        lean = t[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for n, st in zip(t.shape, t.stride()))]
        shape = (tuple(t.shape), tuple(lean.shape))
        if lean.numel() <= _EXACT:
            return shape, lean.to("cpu", copy=True), None
        f = lean.reshape(-1)
        basis = self._basis.get(f.device)
        if basis is None:
            g = torch.Generator().manual_seed(0)  # (normals: two entries' changes cancel on signs)
            basis = torch.randn(_CHUNK, _PROJ, generator=g, dtype=torch.float64)
            basis = self._basis[f.device] = basis.to(f.device)
        rows = -(-f.numel() // _CHUNK)
        weights = self._weights.get((rows, f.device))
        if weights is None:
            g = torch.Generator().manual_seed(rows)
            weights = torch.randn(rows, _PROJ, generator=g, dtype=torch.float64) if rows > 1 else torch.ones(1, _PROJ,
                                                                                                   dtype=torch.float64)
            weights = self._weights[rows, f.device] = weights.to(f.device)
        proj = torch.zeros(_PROJ, dtype=torch.float64, device=f.device)
        odd, top, bad = torch.zeros_like(proj), torch.zeros((), dtype=torch.float64, device=f.device), False
        for i in range(rows):
            c = f[i * _CHUNK:(i + 1) * _CHUNK].double()
            s = basis[:c.numel()]
            fin = torch.isfinite(c)
            if not bool(fin.all()):
                code = torch.where(torch.isnan(c), 1.0, torch.where(c > 0, 2.0, 3.0)).double().masked_fill_(fin, 0.0)
                odd += (code @ s) * weights[i]
                c, bad = c.masked_fill(~fin, 0.0), True
            proj += (c @ s) * weights[i]
            top = torch.maximum(top, c.abs().max())
        return shape, None, (tuple(proj.tolist()), top.item(), tuple(odd.tolist()) if bad else None)


def _sketch_diff(a: tuple, b: tuple) -> float | None:
    """The difference of the values sketched in ``a`` and ``b`` relative to ``b``'s scale (inf where their non-finite
    entries differ); None where their shapes differ (a table as long as the depth: not comparable)."""
    (shape_a, whole_a, sk_a), (shape_b, whole_b, sk_b) = a, b
    if shape_a != shape_b:
        return None
    if whole_b is not None:
        return _rel_diff(whole_a.double(), whole_b.double(), 1e-12)
    (pa, _, odd_a), (pb, top_b, odd_b) = sk_a, sk_b
    if (odd_a is None) != (odd_b is None) or (odd_a is not None and not all(
            math.isclose(x, y, rel_tol=1e-9) for x, y in zip(odd_a, odd_b))):
        return float("inf")
    # (the difference's L2 norm over the largest entry: never below the largest entry's difference over it, the
    # measure of the values kept whole, so a change in a few entries of a large value is not diluted)
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(pa, pb)) / len(pa)) / max(top_b, 1e-12)


def _blocks_fed(nest: Nest, model: nn.Module, example: Any, sub: SubModel, kept: list[nn.Module], lasts: set[int],
                skipped: list[nn.Module], sketch: _Sketch, limit: dict[int, int] | None = None, seed: int = 0,
                want: dict[int, list[tuple]] | None = None) -> tuple[dict[int, Any], dict[int, int]] | None:
    """A forward of ``sub``: per module of ``kept``, call by call, what it read (its tensor arguments, but one-element
    booleans, flags, and complex ones) and, but for the last kept block of each list (ids in ``lasts``), what it
    gave, until a module of ``skipped`` runs (what
    follows depends on blocks a sub-model does not run), or, with ``limit`` (module id -> calls), for that many
    calls; and the calls recorded per module. Without ``want``, each value's sketch is kept (a list per module);
    with ``want`` (what such a run kept), each value is compared with the one at its place there as it comes and
    only ``(values compared, largest difference)`` is kept per module: pairs of other shapes are passed over.
    None where the forward fails."""
    seen: dict[Any, Any] = {}  # ((module id, 'in' / 'out') -> sketches, or (values compared, largest diff))
    calls: dict[int, int] = {}
    kept_calls: dict[int, int] = {}
    stop = [False]

    def keep(mod: nn.Module, ts: list[torch.Tensor], part: str) -> None:  # (dense ones: a sparse adjacency passed
        key = (id(mod), part)                                                # along is skipped)
        for t in ts:
            if not (t.is_nested or t.layout == torch.strided):
                continue
            if want is None:
                seen.setdefault(key, []).append(sketch(t))
                continue
            n, worst = seen.get(key, (0, 0.0))
            ref = want.get(key, [])
            d = _sketch_diff(sketch(t), ref[n]) if n < len(ref) else None
            seen[key] = (n + 1, worst if d is None else max(worst, d))

    def recording(mod: nn.Module) -> bool:
        return not stop[0] and (limit is None or calls[id(mod)] <= limit.get(id(mod), 0))

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        if recording(mod):
            kept_calls[id(mod)] = calls[id(mod)]
            # (not numbers: a count given every block for the last to know it is the last, layer_idx == n_layers -
            # 1, is one; a number that changes a block's result shows in what the block gives)
            keep(mod, [t for t in (*tree_leaves(args), *tree_leaves(kwargs))  # (a boolean mask too, not a flag)
                       if isinstance(t, torch.Tensor) and not (t.dtype == torch.bool and t.numel() == 1)
                       and not t.is_complex()], "in")

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        # (not the last block's output: a block told it is the last, final=(i == len(self.blocks) - 1), follows
        # the depth as self.blocks[-1] does)
        if id(mod) not in lasts and recording(mod):
            keep(mod, [t for t in [first_float(out)] if t is not None], "out")

    def halt(mod: nn.Module, args: tuple) -> None:
        stop[0] = True

    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in kept]
    hooks += [m.register_forward_hook(post, with_kwargs=True) for m in kept]
    hooks += [m.register_forward_pre_hook(halt) for m in skipped]
    try:
        with torch.no_grad(), Use(nest._state, nest._plans.build(sub)), seeded(seed):
            call_model(model, example)
    except Exception:
        return None
    finally:
        for h in hooks:
            h.remove()
    return seen, kept_calls


def _fed_error(got: dict[tuple, tuple[int, float]], want: dict[tuple, list[tuple]], kept: list[nn.Module],
               tol: float, got_calls: dict[int, int] | None = None,
               want_calls: dict[int, int] | None = None) -> tuple[float, int]:
    """The largest relative difference ``got`` (a compared run) found, block by block until one recorded as many
    values as ``want`` does not, and the first block (index in ``kept``) over ``tol``: -1 where none is. What a
    block reads and what it gives are kept apart: a block called as often in both runs (``got_calls`` /
    ``want_calls``) that read another number of tensors (a skip connection passed in one run only, or a mask it
    may not read, None in the other) is judged by what it gives."""
    worst, first = 0.0, -1
    for k, b in enumerate(kept):
        for part in ("in", "out"):
            n, err = got.get((id(b), part), (0, 0.0))
            if n != len(want.get((id(b), part), [])):
                if part == "in" and got_calls is not None and want_calls is not None and got_calls.get(
                        id(b), 0) == want_calls.get(id(b), 0) > 0:
                    continue  # (its output says whether it computed the same)
                return worst, first
            worst = max(worst, err)
            if err > tol and first < 0:
                first = k
    return worst, first


def _blocks_fed_alike(nest: Nest, model: nn.Module, copies: dict[int, nn.Module], example: Any,
                      warned: set[str]) -> None:
    """Each Depth at each smaller size: the blocks a sub-model runs must read (their tensor arguments) and
    give (but the last, which a forward may tell it is the last) what they do in the full model, up to where the
    full model runs a block the sub-model skips: a shallower model is the full model's first blocks. Values the
    forward feeds the blocks that follow the depth otherwise (per-layer values read from the end or reversed with the
    depth's count, gathered before the loop, sliced as ``g[-n:]``, flipped, unbound, looked up by
    ``arange(n).flip(0)``; a scale computed from the count, ``1 / len(self.blocks)``) make a sub-model another
    network: said with a :class:`LayerPairingWarning` (not for a Depth already warned of by the reads, nor where the
    forward samples: its random draws differ between the runs). What comes after the last block is not compared (a
    final layer may follow the depth on purpose: ``self.blocks[-1]``); nor are shared blocks (one module at several
    positions of the list, ALBERT-like). Each value is compared alone (one of another shape, a table as long as the
    depth, is passed over); numbers count through what the blocks give (a count for the last block to know it is
    the last is no pairing); a value is kept as a :class:`_Sketch`. The tolerance is float32's in every dtype:
    before the first skipped block both runs compute the same ops on the same shapes (a correct model differs by
    nothing), and half precision's would pass a reversed table of nearby values (LayerScale's, 3% apart)."""
    tol = 1e-3
    sketch = _Sketch()
    for dd in (d for d in nest.dims if d.kind == "depth"):
        lists = [m for m in nest._sliced.values() if "depth" in m._sn.bind and m._sn.bind["depth"].dim is dd]
        if not lists or dd.full < 2 or dd.name in warned:
            continue
        # (the blocks of every list the Depth cuts, an encoder's and a decoder's: those that run before the full
        # model's first skipped block are compared, in whichever list)
        per_list = [(m, [copies.get(id(e), e) for e in m._modules.values() if e is not None]) for m in lists]
        blocks = [b for _, bs in per_list for b in bs]
        if len({id(b) for b in blocks}) != len(blocks):  # (one module at several positions, ALBERT-like)
            continue
        for size in dd.sizes[:-1]:
            sub = _at_depth(nest, dd, size)
            if sub is None:
                continue
            with Use(nest._state, nest._plans.build(sub)):
                skip = {id(c): c for m in lists for name in m._sn.slicer.skipped(m)
                        for c in (copies.get(id(m._modules[name]), m._modules[name]),) if c is not None}
            kept = [b for b in blocks if id(b) not in skip]
            if not kept:
                continue
            lasts = {id(k[-1]) for _, bs in per_list for k in [[b for b in bs if id(b) not in skip]] if k}
            try:  # (values this comparison cannot take: not compared)
                full = sub.replace(**{dd.name: dd.full})
                want = _blocks_fed(nest, model, example, full, kept, lasts, list(skip.values()), sketch)
                # (the sub-model's calls compared as many as the full model's before its first skipped block: a
                # loop calling the blocks many times, RNN-like, is not followed to its end)
                got = None if want is None else _blocks_fed(nest, model, example, sub, kept, lasts, [], sketch,
                                                            want[1], want=want[0])
                if got is None:
                    continue
                err, k = _fed_error(got[0], want[0], kept, tol, got[1], want[1])
                if k < 0:
                    continue
                again = _blocks_fed(nest, model, example, full, kept, lasts, list(skip.values()), sketch, seed=1,
                                    want=want[0])  # (a forward that samples: the full model's own draws differ)
                if again is None or _fed_error(again[0], want[0], kept, tol, again[1], want[1])[1] >= 0:
                    continue
            except Exception:
                continue
            holder, index = next((m, bs.index(kept[k])) for m, bs in per_list if kept[k] in bs)
            warnings.warn(
                f"nest.check: depth {dd.name!r} at {size}: block {index} of {holder._sn.path or '<root>'!r} reads "
                f"or gives other values than in the full model ("
                f"relative difference {err:.2g}) before any block the "
                "depth skips runs there: the forward feeds the blocks something that follows the depth (per-layer "
                "values read from the end or reversed with the depth's count, gathered before the loop, "
                "g[-len(self.blocks):], a flip; a scale computed from len(self.blocks)), so a sub-model is not the "
                "full model's first blocks there. Read entry i with block i (index it by the block's position, or "
                "keep it in the block); of a value computed from the count, the full model's", LayerPairingWarning,
                stacklevel=4)
            break  # (one warning per Depth)


def _first_runs(calls: list[tuple[str, int]], size: int) -> list[tuple[str, int]]:
    """The entries at positions below ``size`` in ``calls``, each once, in the order they first ran."""
    return [c for c in dict.fromkeys(calls) if c[1] < size]


def _calls(nest: Nest, model: nn.Module, copies: dict[int, nn.Module], example: Any,
           holders: dict[str, nn.Module], sub: SubModel) -> list[tuple[str, int]]:
    """``(list path, index)`` of each entry of the lists in ``holders`` as a forward of ``sub`` calls it, in order."""
    calls: list[tuple[str, int]] = []
    hooks = [copies[id(e)].register_forward_pre_hook(lambda mod, args, key=(path, i): calls.append(key))
             for path, c in holders.items() for i, e in enumerate(c._modules.values()) if id(e) in copies]
    try:
        with Use(nest._state, nest._plans.build(sub)), seeded(0):
            call_model(model, example)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _entries_run(nest: Nest, model: nn.Module, copies: dict[int, nn.Module], example: Any,
                 holders: dict[str, nn.Module], sub: SubModel) -> dict[str, set[int]]:
    """The indices of each list in ``holders`` whose entry ran in a forward of ``sub`` on ``example``."""
    ran: dict[str, set[int]] = {path: set() for path in holders}
    for path, i in _calls(nest, model, copies, example, holders, sub):
        ran[path].add(i)
    return ran


def _check_size_two(nest: Nest, model: Any, example: Any, want: list) -> None:
    """A Width whose smallest size is 1 also runs at 2 units (the others full), whether listed or not: one
    unit broadcasts against a layer it was not bound to ((B, 1) * (B, C) is no shape error), two do not."""
    full = SubModel({d.name: d.full for d in nest.dims})
    for d in nest.dims:
        if d.kind != "width" or d.sizes[0] != 1 or d.full < 3:
            continue
        sub = full.replace(**{d.name: 2})
        try:
            plan = nest._plans.build(sub)  # uncached: use() of a restricted nest must not find it
        except Exception:
            continue
        with Use(nest._state, plan):
            try:
                got = _shapes(call_model(model, example))
            except Exception as e:
                raise _fail(nest, model, example, f"width {d.name!r} at 2 (its smallest size, 1, broadcasts)", sub,
                            f"fails: {type(e).__name__}: {e}", e) from e
        if got != want:
            raise _fail(nest, model, example, f"width {d.name!r} at 2 (its smallest size, 1, broadcasts)", sub,
                        f"changes the output shapes from {want} to {got}: a dimension slices the network's output")


def _check_training_mode(nest: Nest, example: Any, mixed: int, seed: int) -> tuple[nn.Module, list] | None:
    """The same sub-models in TRAINING mode (dropout off, batch statistics undone by the caller's
    dry_run): branches that run only in training (auxiliary heads, ...) must be wired too. Skipped when
    the example does not run the full model in training mode (e.g. BatchNorm on a batch of one): None;
    else the training view and the sub-models it ran."""
    view, _ = train_view(nest)

    def run(sub: SubModel) -> list:
        with nest.use(sub), seeded(seed):
            return _shapes(call_model(view, example))

    try:
        want = run(nest.largest)
    except Exception as e:
        warnings.warn(f"nest.check: the full model fails in training mode on this example ({type(e).__name__}: "
                      f"{str(e)[:200]}), so the sub-models were dry-run in eval mode only: a branch that runs only "
                      "in training (an auxiliary head) is not verified. Give an example the model can train on "
                      "(e.g. a batch of 2 or more for BatchNorm)", UncheckedTrainingWarning, stacklevel=4)
        return None

    def shapes() -> list:
        with seeded(seed):
            return _shapes(call_model(view, example))

    at_depth = _reference_shapes(nest, shapes, want)
    ran = _plan(nest, mixed, seed, every_depth=False)  # (every depth ran in eval mode already)
    for sub, what in ran:
        try:
            got = run(sub)
        except Exception as e:
            raise _fail(nest, view, example, f"{what} in training mode", sub, f"fails: {type(e).__name__}: {e} "
                        "(a module that runs only in training, e.g. an auxiliary head, reads sliced features "
                        "without being in the dimension)", e) from e
        if got != at_depth(sub, got) and not _same_but_heads(nest, sub, got, at_depth(sub)):
            raise _fail(nest, view, example, f"{what} in training mode", sub,
                        f"changes the output shapes from {want} to {got}")
    return view, [sub for sub, _ in ran]


def _to_export(nest: Nest, ran: list[tuple[SubModel, str]]) -> list[SubModel]:
    """The sub-models whose export check compares with their live output: the smallest, and the two most
    mixed of those it dry-ran (``ran``: an export written for one combination of sizes can fail another)."""
    others = [s for s, _ in ran if s not in (nest.smallest, nest.largest)]

    def spread(s: SubModel) -> tuple[int, int]:  # dimensions neither full nor smallest, then neither full
        return (sum(s[d.name] not in (d.full, d.sizes[0]) for d in nest.dims),
                sum(s[d.name] != d.full for d in nest.dims))

    return [nest.smallest, *sorted(dict.fromkeys(others), key=spread, reverse=True)[:2]]


def _export_matches(nest: Nest, model: Any, example: Any, sub: SubModel, tol: float, hint: str, seed: int) -> None:
    """``export(sub)`` holds ``cost(sub)`` parameters and computes ``sub``'s live output (else a
    :class:`SortedNetError` naming the sub-model; ``hint`` added where ``sub`` drops blocks)."""
    if not any(d.kind == "depth" and sub[d.name] < d.full for d in nest.dims):
        hint = ""
    try:  # copied before the live run: a forward that counts its calls in a buffer starts both at one count
        with warnings.catch_warnings():  # (an export of check's own: its compiled forward left out is no news)
            warnings.simplefilter("ignore", CompiledForwardWarning)
            exported = nest.export(sub, plain=True).eval()
    except SortedNetError:
        raise
    except Exception as e:
        raise SortedNetError(f"nest.check: export({sub}) failed: {type(e).__name__}: {e}{hint}") from e
    held, counted = sum(p.numel() for p in exported.parameters()), nest.cost(sub)
    if held != counted:
        raise SortedNetError(
            f"nest.check: cost({sub}) counts {counted:,} parameters but export({sub}) holds {held:,}: a slicer's "
            "numel() disagrees with the tensors it serves (or its export() keeps others), so pick and every budget "
            "would choose by a wrong size")
    with nest.use(sub), seeded(seed):
        live = call_model(model, example)
    try:
        with seeded(seed):
            got = call_model(exported, example)
    except Exception as e:
        mask = "" if not str(e).startswith("attn_mask of shape") else (
            " (an nn.MultiheadAttention whose heads are sliced takes the full model's per-head masks, (batch x "
            "heads, L, S), under use; its export, a module of the active heads, takes only theirs: give check an "
            "example with an (L, S) mask, and serve the export with its own heads' masks)")
        raise SortedNetError(f"nest.check: export({sub}) does not run on the example: "
                             f"{'' if isinstance(e, SortedNetError) else type(e).__name__ + ': '}{e}{mask}{hint}"
                             ) from e
    got, live = float_outputs(got), float_outputs(live)
    if len(got) != len(live):
        raise SortedNetError(f"nest.check: export({sub}) returns {len(got)} floating-point outputs, its live model "
                             f"{len(live)}{hint}")
    pairs = [(a.detach().double(), b.detach().double()) for a, b in zip(got, live) if a.shape == b.shape]
    rels = iter(_rel_diffs(pairs))
    for a, b in zip(got, live):
        rel = next(rels) if a.shape == b.shape else None
        if rel is None or rel > tol:  # relative to the output's scale (large outputs round more)
            _export_differs(nest, sub, f"by {rel:.3g} relative to its scale" if rel is not None else
                            f"in shape {tuple(a.shape)}", hint)
    if tol > 1e-2:  # half precision: its rounding hides a few percent; the same weights computed in float32 do not
        def wide_run(ex: Any) -> float | None:
            with nest.use(sub), seeded(seed):
                live32 = float_outputs(call_model(model, ex))
            with _wide(exported), seeded(seed):
                got32 = float_outputs(call_model(exported, ex))
            if len(got32) != len(live32) or any(a.shape != b.shape for a, b in zip(got32, live32)):
                return None
            return max(_rel_diffs([(a.detach().double(), b.detach().double()) for a, b in zip(got32, live32)]),
                       default=0.0)

        rel32 = _in_float32(model, example, wide_run)
        half = max(_rel_diffs(pairs), default=0.0)
        # an export of the live tensors' own values (the built-in slicers') computes what they do up to float32's
        # rounding; one that merges (a Rank's low-rank factors into the weight) or may (a slicer of yours folding
        # a scale) rounds the result to the half dtype once per weight, which a deep stack adds up: allowed a
        # multiple of the unit rounding of those modules' weights (2^-8 in bfloat16, 2^-11 in float16; a slicer of
        # yours that keeps the base class's export() serves its value() tensors as they are)
        folds = [m for m in nest._sliced.values() if not type(m._sn.slicer).__module__.startswith("sortednet.")
                 and type(m._sn.slicer).export is not Slicer.export]
        merges = [m for m in nest._sliced.values() if "rank" in m._sn.bind]
        limit = max(1e-3, 8 * _rounding(merges), 2.5 * _rounding(folds))
        if rel32 is not None and rel32 > limit:
            _export_differs(nest, sub, f"by {rel32:.3g} relative to its scale, both run in float32 (in the "
                            f"model's half precision: {half:.3g})", hint)
        if rel32 is None and half > tol / 10:  # (a forward casting to its own half dtype: not run in float32)
            warnings.warn(f"nest.check: export({sub}) differs from its live output by {half:.3g} relative to its "
                          "scale in the model's half precision, within that precision's rounding (an output past "
                          "an exp differs by the rounding of its logits) but not verified in float32: the forward "
                          "does not run with its tensors in float32 (it casts to its own half dtype), so an export "
                          f"off by a few percent cannot be told from rounding here; check it with the model in "
                          "float32 (model.float(), the casts following its dtype)", UnverifiedExportWarning,
                          stacklevel=4)


def _rounding(mods: list[nn.Module]) -> float:
    """The unit rounding of the coarsest half-precision parameter ``mods`` hold (0 where none is half)."""
    return max((torch.finfo(p.dtype).eps / 2 for m in mods for p in m._parameters.values()
                if p is not None and p.dtype in (torch.float16, torch.bfloat16)), default=0.0)


class UnverifiedExportWarning(UserWarning):
    """``nest.check`` in half precision could not compare an export with its live sub-model in float32 and found a
    difference within half precision's rounding: a slicer's error of a few percent cannot be told from it."""


def _export_differs(nest: Nest, sub: SubModel, diff: str, hint: str) -> None:
    own = [f"{p or '<root>'!r} ({type(m._sn.slicer).__name__})" for p, m in nest._sliced.items()
           if not type(m._sn.slicer).__module__.startswith("sortednet.")]
    mine = (f"; modules served by slicers of your own, whose export() must give what their value() "
            f"serves: {', '.join(own[:4])}{' ...' if len(own) > 4 else ''}") if own else ""
    raise SortedNetError(f"nest.check: export({sub}) differs from its live output {diff}{hint}{mine}")


def _refuse_weight_writes(nest: Nest, model: nn.Module, example: Any, watch: Any, subs: list[SubModel],
                          measured: set[int], seed: int | None = None) -> None:
    """A forward that writes into a sliced parameter in place writes, under a sub-model, only the slice that
    sub-model reads. Where the write depends on more than each element (a row renormalisation
    ``w.div_(w.norm(...))``, ``F.embedding(..., max_norm=)``), a sub-model writes other values there than the
    full model would: running a small sub-model, even for inference, moves the weights all of them share. Such
    a write is measured (only where a write was seen): from the same weights, every element a sub-model's
    forward changes must take the value the full model's forward gives it (clipping, a decay: element-wise,
    accepted). The dry runs put the weights back, so this is seen only here. ``measured``: the ids of the
    tensors measured already (added to); ``seed``: a training-mode ``model``, run with this random stream (a
    write only a training forward makes, measured after the training-mode dry runs). Elements that two runs
    of the full model from the same weights write differently (a schedule following a counter the forward
    advances) are not measured."""
    params = {id(p) for p in nest.model.parameters()}  # (a buffer is the place for a running statistic)
    sliced = {id(t) for m in nest._sliced.values() for t in m._sn.slicer.exported_tensors(m) if id(t) in params}
    hit = [(t, orig) for t, orig in list(watch.saved.values())
           if id(t) in sliced and id(t) not in measured and not t.is_meta]
    measured.update(id(t) for t, _ in hit)
    if not hit:
        return

    def after(sub: SubModel) -> list[torch.Tensor]:
        for t, orig in hit:
            t.copy_(orig)
        with nest.use(sub), seeded(0 if seed is None else seed):
            call_model(model, example)
        return [t.detach().clone() for t, _ in hit]

    full = after(nest.largest)
    # (elements the full model itself writes otherwise from run to run, as a momentum that follows a step counter
    # the forward advances, tell nothing: measured where two full runs from the same weights agree)
    stable = [torch.eq(a, b) | (a.isnan() & b.isnan()) if a.is_floating_point() else torch.eq(a, b)
              for a, b in zip(full, after(nest.largest))]
    bad: set[int] = set()
    own: dict[SubModel, list[torch.Tensor]] = {}
    for sub in dict.fromkeys(subs):
        own[sub] = after(sub)
        for i, ((_, orig), got, want, keep) in enumerate(zip(hit, own[sub], full, stable)):
            changed = (got != orig) & keep
            if not torch.allclose(got[changed], want[changed], rtol=1e-5, atol=1e-7, equal_nan=True):
                bad.add(i)
    if not bad and seed is None and all(bool(k.all()) for k in stable):
        _refuse_full_model_writes(nest, model, example, hit, full, own)
    if not bad:
        return
    ids = {id(hit[i][0]) for i in bad}
    names = [n for n, p in nest.model.named_parameters(remove_duplicate=False) if id(p) in ids]
    if seed is not None:  # (a training forward's own update, as a VQ codebook's EMA: training, said, not refused)
        warnings.warn(
            f"nest.check: the training forward writes in place into the sliced parameter(s) {names[:4]}, and a "
            "sub-model writes other values there than the full model's forward gives the same elements (a "
            "statistic of its own activations, as an EMA codebook update; a renormalisation of the slice it "
            "reads): training a sub-model updates those weights by its own statistics. Intended for an update "
            "of training (as an optimizer step is)? Then ignore this; a renormalisation belongs in a copy "
            "(F.normalize(w, dim=1) rather than w.div_(...))", InPlaceTrainingWriteWarning,
            stacklevel=caller_outside())
        return
    raise SortedNetError(
        f"nest.check: the forward writes in place into the sliced parameter(s) {names[:4]}, and a sub-model "
        "writes other values there than the full model's forward gives the same elements (a renormalisation of "
        "the slice it reads, as div_ by a norm or F.embedding(..., max_norm=) do; a statistic of its own "
        "activations; random values), so running a small sub-model, even for inference, changes the weights "
        "every sub-model shares. Compute on a copy in forward instead (F.normalize(w, dim=1) rather than "
        "w.div_(...)), keep a running statistic in a buffer, or leave the module out of the dimension")


def _refuse_full_model_writes(nest: Nest, model: nn.Module, example: Any, hit: list[tuple[torch.Tensor, torch.Tensor]],
                              full: list[torch.Tensor], own: dict[SubModel, list[torch.Tensor]]) -> None:
    """The other half of :func:`_refuse_weight_writes`: the full model's forward writes into a sliced parameter
    values that change what a smaller sub-model computes, where that sub-model's own forward writes other values
    there or none (a row renormalised by ``F.embedding(..., max_norm=)`` whose full norm is over the bound, its
    kept part under it): running the full model, even for inference, changes the sub-model. Measured as the
    sub-model's output from the weights its own forward left (``own``) and from those the full model's forward
    left (``full``), both from the same weights and buffers: the same output for an element-wise write (a clamp,
    a decay, before or after the weight is read), which the sub-model makes on its own part itself. A forward
    whose output differs between two runs from the same weights (a counter kept in a plain attribute) tells
    nothing: not measured."""
    buffers = [(b, b.detach().clone()) for b in nest.model.buffers()]

    def output(sub: SubModel, start: list[torch.Tensor]) -> list[torch.Tensor]:
        return _run_from(nest, model, example, sub, [*zip((t for t, _ in hit), start), *buffers])


    for sub, left in own.items():
        if sub == nest.largest:
            continue
        base = output(sub, left)
        if _moved(base, output(sub, left)) > 1e-6:
            continue
        by = _moved(base, output(sub, full))
        if by > 1e-6:
            ids = {id(t) for t, _ in hit}
            names = [n for n, p in nest.model.named_parameters(remove_duplicate=False) if id(p) in ids]
            raise SortedNetError(
                f"nest.check: the full model's forward writes in place into the sliced parameter(s) {names[:4]}, "
                f"and what it writes changes the output of {sub} (by {by:.3g} relative to its scale), whose own "
                "forward writes other values there or none (a renormalisation over the whole row, as "
                "F.embedding(..., max_norm=) makes where the full row is over the bound and the sub-model's part "
                "under it): running the full model, even for inference, changes the smaller sub-models. Compute on "
                "a copy in forward instead (F.normalize, or renormalise the looked-up rows out of place), or leave "
                "the module out of the dimension")


class InPlaceTrainingWriteWarning(UserWarning):
    """A training forward writes into a sliced parameter other values under a sub-model than the full model's."""


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
    from .kvcache import refuse_cache_example

    refuse_cache_example(example, "nest.check")
    with dry_run(nest.model) as watch, eval_mode(nest) as (model, copies), torch.no_grad():  # a private eval-mode
        with nest.use(nest.largest):                                                        # view
            try:
                out = call_model(model, example)
            except Exception as e:
                what = "the full model" if not nest._restricted else "the largest listed sub-model"
                raise SortedNetError(f"nest.check: {what} ({nest.largest}) does not run on the example: "
                                     f"{type(e).__name__}: {e}") from e
            want = _shapes(out)
            if not any(isinstance(t, torch.Tensor) for t in output_leaves(out)):
                raise SortedNetError(f"nest.check: the model's output ({type(out).__name__}) holds no tensor that "
                                     "check can see (tensors, tuples, lists, dicts, named tuples, dataclasses, "
                                     "Hugging Face outputs and the tensor attributes of other objects are opened), "
                                     "so it cannot tell a sliced output from a right one; return one of those, or "
                                     "check a wrapper whose forward does")
            if not any(bool(torch.isfinite(t.detach().double()).any()) for t in float_outputs(out)):
                leaves = [f"{t.dtype} {tuple(t.shape)}" for t in output_leaves(out) if isinstance(t, torch.Tensor)]
                raise SortedNetError(
                    f"nest.check: the model's output ({', '.join(leaves[:4])}{' ...' if len(leaves) > 4 else ''}) "
                    "holds no finite floating-point value to compare, so no sub-model's output can be told from a "
                    "right one (an integer output such as argmax hides a difference in the scores; an empty batch "
                    "shows none, and its loss is NaN; an example holding NaN gives NaN everywhere): give an example "
                    "with finite entries, or check a wrapper that returns the scores")
        heads = any(d.kind == "heads" and d.sizes[0] < d.full for d in nest.dims)  # a second view for the measures
        stand_ins = zero_stand_ins(nest.model) if heads else {}          # of whole heads (zero-initialised projections)
        alt = eval_view(nest.model, keep=nest.dims, replace=stand_ins) if stand_ins else None
        amodel, acopies = alt or (model, copies)
        for d, path in _ignoring_queries_and_keys(nest, amodel, example, _own_attentions(nest, acopies))[:1]:
            raise SortedNetError(
                f"nest.check: Heads {d.name!r} at {path!r}: on this example the attention's output does not "
                "depend on its queries and keys (attention over one key position returns its values whatever "
                "the heads' layout), so whole heads cannot be verified; check with an example of two or more "
                "positions")
        at_depth = _reference_shapes(nest, lambda: _shapes(call_model(model, example)), want)
        ran = _plan(nest, mixed, seed)
        for sub, what in ran:
            with nest.use(sub):
                try:
                    got = _shapes(call_model(model, example))
                except Exception as e:
                    raise _fail(nest, model, example, what, sub, f"fails: {type(e).__name__}: {e}", e) from e
            if got != at_depth(sub, got) and not _same_but_heads(nest, sub, got, at_depth(sub)):
                raise _fail(nest, model, example, what, sub, f"changes the output shapes from {want} to {got}: "
                            "a dimension slices the network's output")
        measured: set[int] = set()
        _refuse_weight_writes(nest, model, example, watch, [sub for sub, _ in ran], measured)
        try:  # (one trace of the wiring, for what moves features and for what they are shared with)
            groups: list | None = _bound_groups(nest, example, model)
            moved, unfollowed = _traced_findings(nest, example, model, groups)
        except SortedNetError:  # a part the wiring trace cannot follow (a TorchScript module): the dry runs stand
            groups, moved, unfollowed = None, [], []
        tol = _tolerance(nest)
        flagged = {d for d, _, _ in moved}
        widths = [d for d in nest.dims if d.kind == "width" and not getattr(d, "chunks", None)]
        full = SubModel({k.name: k.full for k in nest.dims})
        try:
            ref = _reshape_calls(nest, full, example, model)
        except Exception:  # (a restricted nest whose full sizes do not fit together: its largest listed one)
            if nest._rows is None:
                raise
            ref = _reshape_calls(nest, nest.largest, example, model)

        def recut(subs: list[SubModel]) -> bool | None:
            verdicts = []
            for sub in subs:  # (sizes a restricted nest never runs together may not fit: the listed sub-model
                for run in dict.fromkeys((sub, _listed(nest, sub))):  # with those sizes then, else the dry runs
                    if run is None:                                     # of the listed ones stand)
                        continue
                    try:
                        verdicts.append(_recut(ref, _reshape_calls(nest, run, example, model)))
                        break
                    except Exception:
                        if nest._rows is None:
                            raise
            return True if True in verdicts else None if None in verdicts else False

        # every width at its smallest at once first: where no view re-cuts there, none is judged one by one
        calm = not flagged and recut([full.replace(**{d.name: d.sizes[0] for d in widths})]) is False
        for d in [] if calm else widths:  # a view that splits the axis into (units, fixed inner size) keeps whole
            if d in flagged and not all("merges or splits this axis" in op for e, op, _ in moved if e is d):
                continue                  # units, e.g. heads split by view(B, T, -1, head_dim); judged on shapes
            cut = recut([full.replace(**{d.name: size}) for size in d.sizes[:-1]])
            if d not in flagged:  # (also where the trace took the module for an attention of its own)
                if cut is True:
                    moved.append((d, "", f"width {d.name!r}: a view / reshape re-cuts its units at a smaller size "
                                         "(a factor after the leading one shrinks: heads or groups of a hard-coded "
                                         "count, a channels-last flatten), so a sub-model computes on other units "
                                         "than the full model; for whole heads declare sn.Heads"))
            elif cut is None:
                moved.append((d, "", f"width {d.name!r}: its view / reshape calls differ in number between sizes "
                                     "(control flow that depends on the size), so check cannot compare them call by "
                                     "call"))
            elif cut is False:  # and measured, where it can be: equal to the full model with the other units masked
                offs = [] if _mixes_units(nest, d) else [  # (a q head paired with another key/value head is not)
                    _units_off(nest, d, size, example, model, copies, tol) for size in d.sizes[:-1]]
                if not any(offs):
                    moved = [m for m in moved if m[0] is not d]
        coupled = []  # features shared with a module no dimension slices, or cut two ways: the dry runs may pass (a
        involved: list = []  # skip added only where the shapes match), so each is measured
        found = [] if groups is None else diagnose(nest, example, model, coupling_only=True, groups=groups,
                                                   dims_of=involved)
        for msg, ds in zip(found, involved):
            offs = [_units_off(nest, d, size, example, model, copies, tol) for d in ds for size in d.sizes[:-1]]
            if any(offs):
                coupled.append(msg + " (a sub-model differs from the full model with the other units masked)")
            elif any(o is None for o in offs):  # (not measurable here: said, as an op the trace cannot follow)
                unfollowed.append(msg + " (not measured: whether a sub-model is the full model's first units "
                                        "there was not verified)")
        if moved or coupled:
            raise SortedNetError("nest.check: the dry runs pass, but\n  " + "\n  ".join(
                [m for _, _, m in moved] + coupled))
        bound: dict[Any, list[tuple[str, str]]] = {}
        for key, d in _bound(nest).items():
            bound.setdefault(d, []).append(key)
        tied = {}  # what a tied decoder reads: the op it reads the features of a module with is followed
        for d, keys in bound.items():
            outs = [k for k in keys if k[1] == "out"]
            if outs and any(m.startswith(f"{d.kind} {d.name!r}: ") for m in unfollowed):
                tied[d] = _cut_read_elsewhere(nest, model, d, outs, example)
                read = [p for p, _ in outs if p not in tied[d][0]] + tied[d][2]  # (its features, or its weight)
                unfollowed = [m for m in unfollowed if not any(
                    m.startswith(f"{d.kind} {d.name!r}: the features of {p!r} (out=) reach {op}")
                    for p in read for op in tied[d][1])] + [
                    f"{d.kind} {d.name!r}: the cut weight of {p!r} is reordered by {op} outside its layer, and "
                    "a tied read of it may read other units than the full model's there" for op, p in tied[d][3]]
        if unfollowed:
            warnings.warn("nest.check: the dry runs pass, but whether these ops keep each unit in place (a sub-model's "
                          "first units the full model's) was not verified; act on each unit alone there, or "
                          "compare a sub-model with the full model masked:\n  " + "\n  ".join(unfollowed),
                          UnfollowedOpWarning, stacklevel=3)
        for d, keys in bound.items():
            if {role for _, role in keys} == {"out"} and not _paired_reader(nest, d, bound):
                if _internal_outs(nest, model, d, keys, example):
                    raise SortedNetError(
                        f"nest.check: width {d.name!r} binds only out= of {[p for p, _ in keys][:4]}, whose "
                        "outputs keep their size at every width (measured): if it is a width inside your slicer's "
                        "module (a gated MLP's hidden units), name that role 'inp' in the slicer and bind it with "
                        "inp= ('out' says the module's outputs are cut, and then a layer must read them: none "
                        "does, so a sub-model would compute over fewer of them unseen)")
                unread = tied[d][0] if d in tied else _cut_read_elsewhere(nest, model, d, keys, example)[0]
                if not unread:  # (a tied transposed decoder)
                    continue
                raise SortedNetError(
                    f"nest.check: width {d.name!r} slices the outputs of {unread[:4]} but no layer "
                    "reads them (no inp=, no norm=): the dry runs pass because those features are reduced away (a "
                    "sum, a max or logsumexp over classes) or leave the network unseen (stored on a module), so a "
                    "sub-model silently computes over fewer of them. Bind the layers that read them with inp=, or "
                    "remove the dimension")
        _skipped_layers_run(nest, model, copies, example)
        _idle_at_depth(nest, model, copies, example)
        _depth_order(nest, model, copies, example)
        _blocks_fed_alike(nest, model, copies, example, _per_layer_pairing(nest, model, copies, example))
        _counts_read(nest, model, example)
        _check_size_two(nest, model, example, want)
        why = split_ties(nest.model, {p: (m, m._sn.slicer, m._sn.bind) for p, m in nest._sliced.items()})
        if why is not None:
            raise SortedNetError(f"nest.check: {why}: the sub-models where those cuts differ run live but no plain "
                                 "model can hold them (export refuses them, pick passes them over); bind both holders "
                                 "to one dimension on the same axis, or untie the weights")
        trained = _check_training_mode(nest, example, mixed, seed)
        if trained is not None:  # (a write only a training forward makes: measured in training mode)
            _refuse_weight_writes(nest, trained[0], example, watch, trained[1], measured, seed)
        for d in nest.dims:  # every size: a reordering of heads may keep the smallest whole, not the others
            for size in (d.sizes[:-1] if d.kind == "heads" else ()):
                sub = full.replace(**{d.name: size})
                if size != d.sizes[0]:  # (the smallest alone already ran above; any sizes: a restricted nest
                    with Use(nest._state, nest._plans.build(sub)):  # need not list this one)
                        try:
                            call_model(model, example)
                        except Exception as e:
                            raise _fail(nest, model, example, f"heads {d.name!r} alone at {size}", sub,
                                        f"fails: {type(e).__name__}: {e}", e) from e
                err = whole_units_error(nest, d, size, example, model, copies)
                limit = tol
                if tol > 1e-3 and err is not None and err <= tol:  # half precision: its rounding (tolerance 1e-1)
                    err32 = _in_float32(model, example, lambda ex, d=d, size=size: whole_units_error(  # hides a
                        nest, d, size, ex, model, copies))  # layout off by a few percent (a scale of the full width
                    #                                           over the active head count)
                    if err32 is not None and err32 > 1e-3:
                        err, limit = err32, 1e-3  # (measured in float32)
                zeros = ""
                if alt is not None and err is not None and err <= limit:
                    err2 = whole_units_error(nest, d, size, example, *alt)
                    if err2 is not None and not err2 <= limit:
                        err, zeros = err2, _zero_named(nest.model, stand_ins)
                blind = [p or "<root>" for p, m in nest._sliced.items() if m._sn.bind.get("inp") is not None
                         and m._sn.bind["inp"].dim is d and not _is_maskable(m) and "rank" not in m._sn.bind
                         and not _depthwise(m)] if err is None and size == d.sizes[0] else []
                if blind:
                    warnings.warn(f"nest.check: heads {d.name!r}: whole heads are not verified, for any attention "
                                  f"it slices: the output projection(s) {blind[:3]} are not plain Linear / Conv1D "
                                  "layers whose weight columns check can mask to build the reference (a module of "
                                  "your own: test a sub-model against the full model with the other heads' "
                                  "outputs zeroed by hand)", UnverifiedHeadsWarning, stacklevel=3)
                if err is not None and not err <= limit:
                    o = [p for p, m in nest._sliced.items() if m._sn.bind.get("inp") is not None
                         and m._sn.bind["inp"].dim is d]
                    held = _unfollowed_counts(nest, d, o)
                    raise SortedNetError(
                        f"nest.check: heads {d.name!r} at {size} is not the first {size} whole heads of "
                        f"the full model (relative difference {err:.3g} from the full model with the other heads' "
                        f"outputs masked at {o[:3]}): the attention splits its projections with the heads as the "
                        "fast axis (e.g. view(B, N, head_dim, heads)), packs q/k/v in another order, reorders or "
                        "mixes heads (a norm over all heads), or computes per-head values from the head count in "
                        "its forward (ALiBi slopes, a per-head temperature built from self.num_heads: a sub-model's "
                        "heads get other values than the full model's first heads); with the heads as the fast axis "
                        "a Width over the projections shrinks every head's size instead; otherwise fix the layout "
                        "(per-head values: a buffer or parameter of one entry per head, named in per_head=). A "
                        "correct layout fails this too when the forward reads the heads elsewhere than through the "
                        "attention's output (per-head attention weights it averages or sums itself, as "
                        "need_weights=True with average_attn_weights=False): fewer heads change that reading by "
                        "more than masking their outputs does, so this check cannot vouch for the nest; only "
                        f"where that reading is the cause and intended, declare it without example={zeros}"
                        + (f". Integer attributes equal to the head count {d.full} that do not follow it: {held} "
                           "(if the forward reads one as the head count, name it in count_attrs=, as "
                           f"{held[0].split(': ')[1]!r})" if held else ""))
        if tol > 1e-3 and any(d.kind == "heads" for d in nest.dims):  # half precision: each hand-written
            attention_self_check(nest, warn=False)  # attention alone, in float32 too (rounding hides a few percent)
        for d in nest.dims:  # fused projections (gate|up): each chunk's first units must pair up
            if d.kind == "width" and getattr(d, "chunks", None) and d.sizes[0] < d.full and not _mixes_units(nest, d):
                err = whole_units_error(nest, d, d.sizes[0], example, model, copies)
                if err is not None and not err <= tol:
                    raise SortedNetError(
                        f"nest.check: width {d.name!r} at {d.sizes[0]} is not the first {d.sizes[0]} whole units of "
                        f"the full model (relative difference {err:.3g} from the full model with the other units "
                        f"masked), although chunks={d.chunks} says its out= layers stack that many projections "
                        "(e.g. gate|up) one after another: the layer interleaves them (e.g. y[..., ::2] / "
                        "y[..., 1::2]) or its units are not independent; such a layer cannot be sliced by a prefix")
        depth = [d.name for d in nest.dims if d.kind == "depth"]
        hint = (f" (Depth {depth}: a forward that walks its layer list with .children(), .named_children(), "
                "._modules or torch.utils.checkpoint.checkpoint_sequential sees every block; iterate it, index it "
                "or take len() of it instead)" if depth else "")
        for i, sub in enumerate(_to_export(nest, ran)):  # the smallest within a tenth of the tolerance;
            _export_matches(nest, model, example, sub, tol / 10 if i == 0 and tol < 1e-2 else tol, hint, seed)
            # deeper / wider sub-models in half precision round further apart (a rank target's computed weight:
            # ~1e-2 in bf16), and in half precision any output past an exp (probabilities) differs from one rounding
            # of its logits to another by about the logits' own rounding (|z| / 256 in bf16: a few percent)

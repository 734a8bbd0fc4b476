"""discover: the coupled widths and heads of any model, as ready declarations.

``sn.discover(model, example, ratios=...)`` records one forward of ``model`` on
``example`` (see :mod:`sortednet.coupling`), groups the module roles whose
features must shrink together (residual adds, depthwise convolutions,
BatchNorm / LayerNorm / GroupNorm, squeeze-excitation scales, pooling and
flatten into a Linear, attention heads) and returns one ``sn.Width`` per free
group and one ``sn.Heads`` per recognised attention module, with exact module
paths as patterns. What must not shrink (the network's input and output, the
classes, raw parameters such as class tokens or layer scales, concatenated or
reshaped axes, anything an op discovery does not understand touches) is left
out. Each candidate is then dry-run on a copy of the model (smallest size,
alone and together): one that fails, or whose live output is not its
export's, is dropped.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .check import (
    _ignoring_queries_and_keys,
    _own_attentions,
    _rel_diffs,
    _same_but_heads,
    _shapes,
    _tolerance,
    float_outputs,
    whole_units_error,
)
from .cost import call_model
from .coupling import Coupling, Group, analyse
from .dims import Dimension, Width, dimension_from_spec
from .errors import SortedNetError
from .errors import flag as _flag
from .heads import Heads
from .kvcache import UnfollowedCacheWarning, refuse_cache_example
from .modes import copy_model, seeded
from .nest import wrap
from .sampler import number_list
from .submodel import SubModel
from .wrap import split_ties

__all__ = ["discover", "sizes_for", "by_ratio"]


def sizes_for(full: int, ratios: Sequence[float], multiple: int = 1) -> list[int]:
    """Ascending unique sizes ``ratio * full`` rounded to a multiple of ``multiple``; ``full`` always last.

    >>> sizes_for(64, [0.25, 0.5, 0.75]), sizes_for(6, [0.25, 0.5], multiple=2), sizes_for(3, [0.1])
    ([16, 32, 48, 64], [2, 4, 6], [1, 3])
    """
    m = multiple if multiple >= 1 and full % multiple == 0 else 1
    return sorted({min(full, max(m, round(r * full / m) * m)) for r in ratios} | {full})


def _check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    bad = SortedNetError(f"ratios must be a sequence of numbers in (0, 1], got {ratios!r}")
    if isinstance(ratios, (set, frozenset)):  # (the order of ratios does not matter: they are sorted)
        ratios = list(ratios)
    try:
        out = tuple(number_list(ratios, "ratios"))
    except SortedNetError:
        raise bad from None
    if not out or any(not 0 < r <= 1 for r in out):
        raise SortedNetError(f"ratios must be non-empty numbers in (0, 1], got {list(ratios)}")
    return out


def _name(path: str, taken: set[str], suffix: str = "") -> str:
    base = (re.sub(r"\W", "_", path) or "root") + suffix
    if not base[0].isalpha():
        base = "w" + base
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _width(g: Group, ratios: Sequence[float], multiple_of: int, taken: set[str]) -> Width | None:
    mult = math.lcm(g.multiple, multiple_of)
    if g.size % mult:
        mult = g.multiple
    if g.size % mult:
        return None
    sizes = sizes_for(g.size, ratios, mult)
    if g.divides:  # (features rolled by a multiple of their size: kept in place only at sizes dividing the shift)
        sizes = [n for n in sizes if g.divides % n == 0]
    if len(sizes) < 2:
        return None
    roles = {r: list(dict.fromkeys(g.roles(r))) for r in ("out", "inp", "norm")}
    if not roles["inp"]:  # features no layer reads: reduced away (a class axis under softmax().max(), logsumexp,
        return None       # sum) or leaving the graph unseen (stored on a module, a container pytree cannot open)
    return Width(_name(roles["out"][0], taken), sizes, **roles)


def declarations(c: Coupling, ratios: Sequence[float], *, heads: bool = True,
                 multiple_of: int = 1) -> list[Dimension]:
    """``Width`` / ``Heads`` declarations for the free groups of ``c`` (no dry run)."""
    taken: set[str] = set()
    dims: list[Dimension] = [w for g in c.free() if (w := _width(g, ratios, multiple_of, taken)) is not None]
    if heads:
        for a in c.attention:
            sizes = sizes_for(a.heads, ratios, a.group)
            if len(sizes) > 1:
                dims.append(Heads(_name(a.path, taken, "_heads"), sizes, attn=a.path, qkv=a.qkv, o=a.o))
    return dims


def _fresh(dims: Sequence[Dimension]) -> list[Dimension]:
    return [dimension_from_spec(d.spec()) for d in dims]


def _quiet_wrap(model: nn.Module, *dims: Dimension, **kw: Any) -> Any:
    """``wrap`` for discovery's own dry runs on the example: the warning that ``wrap`` could not verify an
    attention alone is not for the user (discovery measures whole heads on the example itself)."""
    import warnings

    from .check import UnverifiedHeadsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedHeadsWarning)
        return wrap(model, *dims, **kw)


def _failures(probe: nn.Module, example: Any, dims: list[Dimension], want: list) -> list[int] | None:
    """Indices of ``dims`` whose smallest size (alone) fails on ``probe``; None when they do not wrap together."""
    fresh = _fresh(dims)
    subs = [{}, {d.name: d.sizes[0] for d in fresh}, *({d.name: d.sizes[0]} for d in fresh)]
    try:
        nest = _quiet_wrap(probe, *fresh, submodels=subs)
    except SortedNetError:
        return None
    if split_ties(probe, {p: (m, m._sn.slicer, m._sn.bind) for p, m in nest._sliced.items()}) is not None:
        nest.unwrap()  # a tied weight sliced by one declaration and not the other: not exportable
        return None
    def fits(sub: SubModel) -> bool:
        """The full model's output shapes, but for attention maps with fewer heads (output_attentions=True)."""
        with nest.use(sub):
            got = _shapes(call_model(probe, example))
        return got == want or _same_but_heads(nest, sub, got, want)

    bad = []
    try:
        for i, d in enumerate(dims):
            try:
                if not fits(nest.resolve({d.name: d.sizes[0]})):
                    bad.append(i)
            except Exception:
                bad.append(i)
        if not bad:
            try:
                if not fits(nest.smallest):
                    bad = list(range(len(dims)))
            except Exception:
                bad = list(range(len(dims)))
    finally:
        nest.unwrap()
    return bad


def _verified(model: nn.Module, example: Any, dims: list[Dimension]) -> list[Dimension]:
    """The dims that wrap and run (alone at their smallest and all smallest together) on a copy of ``model``."""
    probe = copy_model(model, {}, f"a private copy of {type(model).__name__} to verify the groups on").eval()
    with torch.no_grad():
        want = _shapes(call_model(probe, example))
        bad = _failures(probe, example, dims, want)
        if bad is not None and len(bad) < len(dims) and bad != list(range(len(dims))):
            dims = [d for i, d in enumerate(dims) if i not in bad]
            bad = _failures(probe, example, dims, want)
        if bad is None or bad:  # slow path: add one dimension at a time
            kept: list[Dimension] = []
            failed: list[Dimension] = []
            for d in dims:
                if _failures(probe, example, [*kept, d], want) == []:
                    kept.append(d)
                else:
                    failed.append(d)
            dims = kept + _merged(probe, example, kept, failed, want)
        dims = _whole_heads(probe, example, dims)
        dims = _uncut_widths(probe, example, dims)
        for _ in range(len(dims)):
            bad = _unlike_export(probe, example, dims)
            if not bad:
                break
            dims = [d for i, d in enumerate(dims) if i not in bad]
    return dims


def _merged(probe: nn.Module, example: Any, kept: list[Dimension], failed: list[Dimension], want: list,
            tries: int = 32) -> list[Dimension]:
    """Widths that fail alone but run as one: two groups the trace could not couple (a view that reshapes one
    layer's output by another's channel count, as SegFormer's sequence reduction does: the conv's output must
    shrink with the stream it is reshaped by) merged into one Width of the same sizes, where the merge passes the
    dry run beside ``kept``. Each merge records the names it holds (``merged_from``)."""
    out: list[Dimension] = []
    todo = [d for d in failed if isinstance(d, Width) and not d.chunks]
    while todo and tries > 0:
        a, found = todo.pop(0), None
        for b in todo:
            if list(b.sizes) != list(a.sizes) or tries <= 0:
                continue
            tries -= 1
            both = Width(a.name, list(a.sizes), out=list(dict.fromkeys([*a.out, *b.out])) or None,
                         inp=list(dict.fromkeys([*a.inp, *b.inp])) or None,
                         norm=list(dict.fromkeys([*a.norm, *b.norm])) or None)
            if _failures(probe, example, [*kept, *out, both], want) == []:
                found = b
                both.merged_from = (a.name, b.name)
                out.append(both)
                break
        if found is not None:
            todo.remove(found)
    return out


def _uncut_widths(probe: nn.Module, example: Any, dims: list[Dimension]) -> list[Dimension]:
    """``dims`` less every Width whose smallest size makes a view / reshape re-cut its units (a count stored at
    full size, ``reshape(B, 16, -1)``: at 4 channels it moves them into the last axis, the same values flowing
    through a differently shaped op; the trace at full size cannot see it, the shapes at the smallest can)."""
    from .check import _recut, _reshape_calls

    widths = [i for i, d in enumerate(dims) if isinstance(d, Width) and not d.chunks and len(d.sizes) > 1]
    if not widths:
        return dims
    fresh = _fresh(dims)
    every = {fresh[i].name: fresh[i].sizes[0] for i in widths}
    nest = _quiet_wrap(probe, *fresh, submodels=[{}, every, *({fresh[i].name: fresh[i].sizes[0]} for i in widths)])
    try:
        full = SubModel({d.name: d.full for d in fresh})
        ref = _reshape_calls(nest, full, example, probe)
        calm = _recut(ref, _reshape_calls(nest, full.replace(**every), example, probe)) is False  # (one forward
        bad = set() if calm else {  # where no view re-cuts with every width at its smallest)
            i for i in widths if _recut(ref, _reshape_calls(nest, full.replace(**{fresh[i].name: fresh[i].sizes[0]}),
                                                            example, probe)) is True}
    finally:
        nest.unwrap()
    return [d for i, d in enumerate(dims) if i not in bad]


def _unlike_export(probe: nn.Module, example: Any, dims: list[Dimension]) -> list[int]:
    """Indices of ``dims`` whose live sub-model (its smallest size, alone) computes something else than its
    export: a forward that reads a parameter whole (``sum(p.square().sum() for p in m.parameters())``, which
    the recording cannot tell from the sliced attribute) sees the full tensor live, the smaller one exported.
    Checked on all smallest together first; [] when they agree or the nest does not export."""
    if not dims:
        return []
    fresh = _fresh(dims)
    smallest = {d.name: d.sizes[0] for d in fresh}
    nest = _quiet_wrap(probe, *fresh, submodels=[{}, smallest, *({d.name: d.sizes[0]} for d in fresh)])
    tol = _tolerance(nest)
    tol = tol / 10 if tol < 1e-2 else tol  # (half precision: check's own tolerance for an export)

    def unlike(x: Any, y: Any) -> bool:
        a_, b_ = float_outputs(x), float_outputs(y)
        return len(a_) != len(b_) or any(a.shape != b.shape for a, b in zip(a_, b_)) or \
            any(r > tol for r in _rel_diffs([(a.double(), b.double()) for a, b in zip(a_, b_)]))

    def differs(sub: dict[str, int]) -> bool | None:
        try:  # copied before the live runs: a forward that counts calls in a buffer starts both at one count
            exported = nest.export(sub, plain=True).eval()
        except SortedNetError:  # not exportable: nothing to compare with (check says why)
            return None
        runs = []
        for _ in range(2):
            with nest.use(sub), seeded(0):
                runs.append(call_model(probe, example))
        if unlike(runs[1], runs[0]):  # the forward is not repeatable (its own RNG, a counter): no comparison
            return None
        try:
            with seeded(0):
                got = call_model(exported, example)
        except Exception:
            return True
        return unlike(got, runs[0])

    try:
        if not differs(smallest):
            return []
        return [i for i, d in enumerate(fresh) if differs({d.name: d.sizes[0]})] or list(range(len(dims)))
    finally:
        nest.unwrap()


def _whole_heads(probe: nn.Module, example: Any, dims: list[Dimension]) -> list[Dimension]:
    """``dims`` less every Heads that at one of its sizes does not run or is not the first heads of the
    full model (heads split as the fast axis, ``"b n (d h)"``, mixed or reordered by the attention, a head
    count that is not the module's): measured at every size, not assumed."""
    heads = [i for i, d in enumerate(dims) if isinstance(d, Heads)]
    if not heads:
        return dims
    fresh = _fresh(dims)
    nest = _quiet_wrap(probe, *fresh,
                       submodels=[{}, *({fresh[i].name: s} for i in heads for s in fresh[i].sizes[:-1])])
    full = SubModel({d.name: d.full for d in fresh})

    def whole(d: Dimension, size: int) -> bool:
        try:
            with nest.use(full.replace(**{d.name: size})):
                call_model(probe, example)
        except Exception:
            return False
        err = whole_units_error(nest, d, size, example)
        return err is None or err <= _tolerance(nest)

    try:
        bad = {i for i in heads if not all(whole(fresh[i], s) for s in fresh[i].sizes[:-1])}
        # an example over which an attention's output does not depend on its queries and keys (one position)
        # cannot tell whole heads apart: such a Heads is unverified, as wrap(..., example=) says, so left out
        blind = {id(d) for d, _ in _ignoring_queries_and_keys(nest, probe, example, _own_attentions(nest, {}))}
        bad |= {i for i in heads if id(fresh[i]) in blind}
    finally:
        nest.unwrap()
    return [d for i, d in enumerate(dims) if i not in bad]


def by_ratio(dims: Sequence[Dimension], ratios: Sequence[float]) -> list[dict[str, int]]:
    """Sub-models with every dimension at the same fraction of its full size, one per ratio: a ``submodels=``
    list for nests of many dimensions, whose full product is too large (a CNN's discovered groups). ``ratios``
    as for :func:`discover`. A dimension :func:`discover` returned (its sizes as discover made them) is, for a
    ratio discover made a size for, at that size (``ratio * full`` rounded to the nearest multiple of the sizes'
    greatest common divisor: discover's own multiple or one of it, so it lands on discover's size); any other
    dimension (sizes of your own, or read back from a checkpoint), or another ratio, at its smallest size at
    least ``ratio * full``.

    >>> import sortednet as sn
    >>> dims = [sn.Width("a", [4, 8, 16], out="0", inp="2"), sn.Width("b", [2, 4], out="2", inp="4")]
    >>> sn.by_ratio(dims, [0.25, 0.5, 1.0])
    [{'a': 4, 'b': 2}, {'a': 8, 'b': 2}, {'a': 16, 'b': 4}]
    """
    ratios = _check_ratios(ratios)
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not all(isinstance(d, Dimension)
                                                                                   for d in dims):
        raise SortedNetError(f"by_ratio needs a list of dimensions (sn.Width / sn.Heads / ..., e.g. from sn.discover), "
                             f"got {dims!r}")
    names = [d.name for d in dims]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # (a sub-model holds one size per name: the second would overwrite the first)
        raise SortedNetError(f"by_ratio: dimension names {twice} are given twice; a nest takes each name once")
    return list({tuple(sorted(s.items())): s for s in (
        {d.name: _at_ratio(d.sizes, d.full, r, discovered=_made_for(d, r)) for d in dims} for r in ratios)}.values())


#: the attribute discover marks its declarations with: (their sizes as it made them, the ratios it made them for).
#: Not kept by checkpoints (``by_ratio`` is for the ``submodels=`` list at wrap, which ``sn.save`` stores itself)
_DISCOVERED = "_sn_discovered_sizes"


def _made_for(d: Dimension, ratio: float) -> bool:
    """Whether ``d`` is a declaration :func:`discover` returned, sizes unchanged, and made a size for ``ratio``."""
    made = d.__dict__.get(_DISCOVERED)
    return made is not None and made[0] == tuple(d.sizes) and any(abs(ratio - r) <= 1e-6 * r for r in made[1])


def _at_ratio(sizes: Sequence[int], full: int, ratio: float, discovered: bool = False) -> int:
    """The size of ``sizes`` (ascending, ``full`` last) :func:`by_ratio` gives ``ratio``: see there."""
    if discovered:
        g = math.gcd(*sizes)
        target = min(full, max(g, round(ratio * full / g) * g))
        if target in sizes:
            return target
    return next(x for x in sizes if x >= ratio * full * (1 - 1e-6))  # (a float32 ratio: 0.3 is 0.30000001)


def discover(model: nn.Module, example: Any, ratios: Sequence[float] = (0.25, 0.5, 0.75, 1.0), *,
             heads: bool = True, multiple_of: int = 1, verify: bool = True) -> list[Dimension]:
    """Coupled channel / feature groups of ``model`` as ready ``sn.Width`` / ``sn.Heads`` declarations.

    ``example`` is a tensor, a tuple of positional inputs or a dict of keyword
    inputs. Sizes are ``ratio * full`` per group, rounded to ``multiple_of``
    (and to GroupNorm groups / grouped-query key-value groups), ascending and
    unique; the full size is always included. ``heads=False`` leaves attention
    heads out. Every declaration is dry-run on a copy of the model
    (``verify=False`` skips that). The model itself is not changed.

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
    ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    >>> dims = sn.discover(model, torch.randn(2, 3, 8, 8), ratios=[0.25, 0.5, 1.0])
    >>> dims
    [Width('w0', [4, 8, 16], out=['0'], inp=['5'], norm=['1'])]
    >>> nest = sn.wrap(model, *dims)
    >>> nest.export("w0=4")[5]
    Linear(in_features=4, out_features=10, bias=True)
    """
    _flag("discover", "heads", heads)
    _flag("discover", "verify", verify)
    ratios = _check_ratios(ratios)
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise SortedNetError(f"discover(): multiple_of must be a positive int, got {multiple_of!r}")
    if not isinstance(model, nn.Module):
        raise SortedNetError(f"discover() needs an nn.Module, got {type(model).__name__}")
    if any("_sn" in m.__dict__ for m in model.modules()):
        raise SortedNetError("discover() needs a model that is not wrapped; call nest.unwrap() first")
    lazy = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if isinstance(t, nn.parameter.UninitializedTensorMixin)]
    if lazy:  # tracing would materialise them in place (and draw their values from the global RNG)
        raise SortedNetError(f"discover() got a model with uninitialised (lazy) tensors {lazy[:4]}: run one forward "
                             "pass first so they get their shapes, then discover")
    refuse_cache_example(example, "discover()")
    coupling = analyse(model, example)
    dims = declarations(coupling, ratios, heads=heads, multiple_of=multiple_of)
    with warnings.catch_warnings():  # (its dry runs' wraps: the user's own wrap and forwards say it, once)
        warnings.simplefilter("ignore", UnfollowedCacheWarning)
        found = _verified(model, example, dims) if verify and dims else dims
    names = {n for d in found for n in getattr(d, "merged_from", (d.name,))}
    dropped = [d for d in dims if d.name not in names]
    if not found:
        warnings.warn(_none_found(coupling, dropped, dims), stacklevel=2)
    elif (kept := _kept_whole(coupling, dims)) or dropped:
        warnings.warn(KeptWholeWarning(_partly_found(kept, dropped, len(found))), stacklevel=2)
    for d in found:  # (by_ratio gives these, and only these, the sizes made for each ratio)
        d.__dict__[_DISCOVERED] = (tuple(d.sizes), ratios)
    return found


class KeptWholeWarning(UserWarning):
    """``discover`` returned declarations, and left other groups of features out (kept whole, with the reason
    the trace gives: a raw parameter such as a class token or a layer scale, a concatenation, an op it does not
    understand), or dropped declarations that failed their dry run: the result slices part of the model."""


def _kept_whole(c: Coupling, dims: list[Any] = ()) -> list[Any]:  # type: ignore[assignment]
    """Groups the trace keeps whole for a reason inside the model (not the network's input or output), and free
    groups rolled by a multiple of their size that no declaration in ``dims`` took (no two sizes divide it)."""
    declared = {p for d in dims for p in getattr(d, "out", ())}
    kept = [g for g in c.groups if g.size >= 2 and (g.roles("out") or g.writer is not None) and (
        (g.fixed is not None and g.fixed not in ("the network input", "the network output"))
        or (g.fixed is None and g.divides and g.roles("out") and not set(g.roles("out")) & declared))]
    return sorted(kept, key=lambda g: not g.roles("out"))  # (groups sliceable modules write named first: those
    #                                                    only a layer of one's own writes do not crowd them out)


def _label(g: Any) -> str:
    """A group named by the modules writing it: sliceable ones, or a layer of one's own holding its weights whose
    forward discovery does not understand (a convolution computing its weight)."""
    out = g.roles("out")
    return (str(out[:2])[:-1] + f", ... {len(out) - 2} more]" if len(out) > 2 else str(out)) if out else str([g.writer])


def _why(kept: list[Any]) -> str:
    return ("; ".join(f"{_label(g)} ({g.size} features): " + (
        g.fixed or f"rolled by {g.divides} (in place only at the sizes that divide it)") for g in kept[:4])
            + (f" (and {len(kept) - 4} more)" if len(kept) > 4 else ""))


def _dropped(dims: list[Any]) -> str:
    """The declarations that failed their dry run or could not be verified on the example, named (wrapping
    with one says why)."""
    if not dims:
        return ""
    named = ", ".join(f"{d.kind} {d.name!r}" for d in dims[:4]) + (f" (and {len(dims) - 4} more)" if len(dims) > 4
                                                                    else "")
    heads = any(d.kind == "heads" for d in dims)
    return (f"; {len(dims)} declaration(s) failed their dry run or could not be verified on the example"
            + (" (e.g. Heads over a single position, where attention does not depend on queries and keys)"
               if heads else "")
            + f": {named} (discover(..., verify=False) returns them; sn.wrap(model, that_declaration, example=x) "
            "says why)")


def _partly_found(kept: list[Any], dropped: list[Any], found: int) -> str:
    return (f"discover() returns {found} declaration(s) and leaves part of the model unsliced"
            + (f"; kept whole: {_why(kept)}" if kept else "")
            + _dropped(dropped)
            + ". To slice those features too, declare sn.Width(...) by hand (docs/width.md) or give a tensor the "
              "model reads raw a slicer (docs/custom_slicers.md); warnings.simplefilter('ignore', "
              "sortednet.discovery.KeptWholeWarning) silences this")


def _none_found(c: Coupling, dropped: list[Any], dims: list[Any] = ()) -> str:  # type: ignore[assignment]
    """Why discover returns no declaration: the groups it had to keep whole, with their reasons."""
    kept = _kept_whole(c, dims)  # (and, nothing else being there, the features the model returns)
    kept += [g for g in c.groups if g.size >= 2 and g.roles("out") and g.fixed == "the network output"
             and g not in kept and any(r != "out" for _, r in g.bindings)]
    why = _why(kept)
    return ("discover() found no group it can slice safely, so wrapping with its result gives a nest of the full "
            "model alone" + _dropped(dropped)
            + (f"; kept whole: {why}" if kept else "")
            + ". Declare sn.Width(...) by hand for such parts (docs/width.md), or give a tensor the model reads "
              "raw a slicer (docs/custom_slicers.md)")

"""Conversion steps of ``sortednet.wrap``: match patterns -> validate EVERYTHING (:func:`plan`) -> then
:func:`install`; :func:`unwrap_modules`. The public ``wrap`` and :class:`~sortednet.nest.Nest` live in nest.py."""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import operator
import sys
import threading
import types
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .dims import REENTRANT, Binding, Dimension, Target
from .errors import PatternError, SortedNetError, caller_outside
from .modes import attr_of, exact_math, finish_all, hook_module, in_dry_run, rebind_kept_forward
from .modes import ours as _ours
from .patterns import Named, match_pattern
from .plan import _Open, close_block, heal_pins, pin_checkpoints, shadowed, unpinned_reentrant
from .slicers import Slicer, State, is_sharded, sliced_subclass, slicer_for
from .slicers.attention import ATTRS_ONLY
from .slicers.base import own_forward
from .slicers.depth import _saved_tensors_hooks, refuse_tree_change
from .views import _compiling, _grad_enabled, cuts_for, fsdp_units

__all__ = ["plan", "install", "unwrap_modules", "wrap_hooks", "split_ties", "match_pattern", "Pin", "guard_tree",
           "unguard_tree", "tree_links"]

# PyTorch layers whose fused inference fast path reads full-size weights directly
_FAST_PATH_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _check_dims(dims: Sequence[Dimension]) -> None:
    seen: dict[str, Dimension] = {}
    for d in dims:
        if not isinstance(d, Dimension):
            raise SortedNetError(f"wrap() takes dimensions (sn.Width, sn.Heads, sn.Depth, ...), got {d!r}")
        if seen.get(d.name) is d:
            raise SortedNetError(f"dimension {d!r} is passed to wrap() twice; pass each dimension once "
                                 "(modules that share it are listed in its patterns)")
        if d.name in seen:
            raise SortedNetError(f"two dimensions are named {d.name!r}: {seen[d.name]!r} and {d!r}")
        if getattr(d, "_nest", None) is not None:
            raise SortedNetError(f"dimension {d.name!r} already belongs to a wrapped model; build a new one")
        seen[d.name] = d


def _offloaded(m: nn.Module, submodules: bool = False) -> bool:
    """``m`` carries an accelerate hook that loads its weights in at each forward (offloading); with
    ``submodules``: one that loads its children's too (``place_submodules``)."""
    hook = m.__dict__.get("_hf_hook")
    if hook is None:
        return False
    return any(getattr(h, "offload", False) is True and (not submodules or getattr(h, "place_submodules", False))
               for h in getattr(hook, "hooks", None) or (hook,))


def plan(model: nn.Module, dims: Sequence[Dimension]) -> dict[str, tuple[nn.Module, Slicer, dict[str, Binding]]]:
    """Everything ``wrap`` will install, fully validated; changes nothing."""
    if not isinstance(model, nn.Module):
        raise SortedNetError(f"wrap() needs an nn.Module, got {type(model).__name__}")
    _check_dims(dims)
    cycle = _cyclic_path(model)
    if cycle is not None:
        raise SortedNetError(f"{cycle!r} is a module that contains itself (a cycle in the module tree): "
                             "state_dict, parameters() with duplicates and sortednet's walks of the tree cannot "
                             "end; hold the module once (a plain attribute outside _modules for the back reference)")
    modules = dict(model.named_modules())
    wrapped = [n or "<root>" for n, m in modules.items() if "_sn" in m.__dict__]
    if wrapped:
        more = f" and {len(wrapped) - 5} more" if len(wrapped) > 5 else ""
        if all(getattr(m.__dict__["_sn"].active, "owner", 1) is None for m in modules.values() if "_sn" in m.__dict__):
            raise SortedNetError(f"model holds sliced modules ({wrapped[:5]}{more}) of a nest that was unwrapped: a "
                                 "deep copy made while it was wrapped (an EMA / teacher copy), which runs the full "
                                 "model. Give it its original classes with that nest's unwrap_copy(copy) (the "
                                 "unwrapped Nest object still does it), then wrap; or deep-copy the model after "
                                 "unwrap next time")
        owners = [getattr(m.__dict__["_sn"].active, "owner", None) for m in modules.values() if "_sn" in m.__dict__]
        nests = {id(n): n for ref in owners if callable(ref) and (n := ref()) is not None}
        held = {id(m) for m in modules.values()}  # (only a part of this model is another nest's model)
        whole = not nests or any(n.model is model or id(n.model) not in held for n in nests.values())
        raise SortedNetError((f"model is already wrapped (sliced modules: {wrapped[:5]}{more}); call nest.unwrap() "
                              "first (sn.Nest.of(model) gives the nest; a deep copy of a wrapped model follows that "
                              "model's nest: nest.unwrap_copy(copy))") if whole else (
            f"a part of this model is wrapped by another nest (its sliced modules: {wrapped[:5]}{more}): unwrap that "
            "nest first (sn.Nest.of(part) gives it), then wrap the whole model once with every dimension"))
    lazy = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if _uninitialized(t)]
    if lazy:  # their shapes (and so every parameter count) are not known yet
        owners = sorted({type(model.get_submodule(n.rpartition(".")[0])).__name__ for n in lazy})
        raise PatternError(f"model has uninitialised (lazy) tensors {lazy[:4]} (of {', '.join(owners[:3])}): run one "
                           "forward pass first so they get their shapes, then wrap")
    sharded = [n for n, p in model.named_parameters() if is_sharded(p)]
    if sharded:
        raise SortedNetError(f"model parameters are already sharded (FSDP2 DTensors, e.g. {sharded[:3]}): "
                             "call sn.wrap before fully_shard (see docs/scaling.md)")
    shard_units = {id(u) for u in fsdp_units(model)}
    units = [n or "<root>" for n, m in modules.items() if id(m) in shard_units]
    if units:  # (unsharded between a forward and its backward, or kept so: reshard_after_forward=False)
        raise SortedNetError(f"{units[0]!r} was sharded with FSDP2 (fully_shard): call sn.wrap before fully_shard "
                             "(see docs/scaling.md)")
    inner = model
    while isinstance(getattr(inner, "_orig_mod", None), nn.Module):  # (torch.compile of the wrapper)
        inner = inner._orig_mod
    if any(c.__name__ in ("DistributedDataParallel", "DataParallel") and c.__module__.startswith(
            "torch.nn.parallel") for c in type(inner).__mro__):  # ('module.' patterns and checkpoint keys)
        compiled = " (compiled)" if inner is not model else ""
        how = ("sn.wrap(model, ...), then DDP(model): a DDP wrapper built first broadcast the weights without "
               "what wrap adds" if "Distributed" in type(inner).__name__ else
               "sn.wrap(dp.module, ...); the wrapper then runs the wrapped model")
        raise SortedNetError(f"'<root>' is a {type(inner).__name__} wrapper{compiled}: call sn.wrap on the model "
                             f"inside it ({how}; see docs/scaling.md)")
    fsdp1 = [n or "<root>" for n, m in modules.items() if _is_fsdp1(m)]
    if fsdp1:
        raise SortedNetError(f"{fsdp1[0]!r} is managed by FSDP1 (FullyShardedDataParallel), which flattens the "
                             "parameters of each unit into one FlatParameter that no slicer can cut: not supported; "
                             "call sn.wrap on the plain model, then shard it with torch.distributed.fsdp.fully_shard "
                             "(FSDP2)")
    try:
        named = Named(model)  # (a glob over second names of a module it leaves out is said: SecondNameWarning)
        targets: list[Target] = []
        for d in dims:
            named.current = d
            targets += d.plan(named)
    except PatternError as e:  # a second name of a module (self.b = self.a): say which name to use
        canon = {id(m): n for n, m in modules.items()}
        seconds = {n: m for n, m in model.named_modules(remove_duplicate=False) if n not in modules and id(m) in canon}
        pattern = getattr(e, "pattern", None)
        try:  # (the names the pattern would match under a second name: a glob over a list of one shared layer)
            hit = match_pattern(pattern, seconds, "") if isinstance(pattern, str) and seconds else []
        except PatternError:
            hit = []
        alias = [f"{n!r} is the module named {canon[id(seconds[n])]!r}" for n in hit]
        if alias:
            raise PatternError(f"{e}; {', '.join(alias[:3])}{' ...' if len(alias) > 3 else ''} (a module held under "
                               "two names is matched by its first name)") from None
        raise
    if any(t.path not in modules for t in targets):  # a module reached under a second name (an attention's
        first = {id(m): n for n, m in modules.items()}  # o-projection shared by every block): its first name
        alias = {n: first[id(m)] for n, m in model.named_modules(remove_duplicate=False) if n not in modules}
        targets = [dataclasses.replace(t, path=alias[t.path]) if t.path in alias else t for t in targets]
    named.warn_left(targets)
    by_path: dict[str, dict[str, Target]] = defaultdict(dict)
    for t in targets:
        prev = by_path[t.path].get(t.role)
        if prev is not None and prev.binding.dim is not t.binding.dim:
            a, b = prev.binding.dim, t.binding.dim
            fix = ("a layer takes one Rank dimension: list it in the targets= of one of them only"
                   if a.kind == b.kind == "rank" else
                   "couple them by using one object")
            raise PatternError(f"{t.path!r} role {t.role!r} is claimed by two dimensions: "
                               f"{a.name!r} (pattern {prev.pattern!r}) and "
                               f"{b.name!r} (pattern {t.pattern!r}); {fix}")
        by_path[t.path][t.role] = t
    out = {}
    for path, roles in by_path.items():
        m = modules[path]
        bind = {r: t.binding for r, t in roles.items()}
        own = {id(b.slicer): b.slicer for b in bind.values() if b.slicer is not None}
        if len(own) > 1:
            dims = sorted({b.dim.name for b in bind.values() if b.slicer is not None})
            raise PatternError(f"{path!r}: dimensions {dims} each need their own slicer for this module; "
                               "only one can own it")
        sl = next(iter(own.values())) if own else slicer_for(m)
        if sl is None and all(r.startswith("attr:") for r in bind):
            sl = ATTRS_ONLY
        if sl is None:
            pats = sorted({t.pattern for t in roles.values()})
            if "depth" in bind:
                raise PatternError(
                    f"Depth {bind['depth'].dim.name!r}: {path!r} ({type(m).__name__}, matched by {pats}) is not a "
                    "layer list a Depth can cut: it takes an nn.ModuleList or nn.Sequential of blocks (run in order "
                    "by the forward); hold the blocks in an nn.ModuleList (an nn.ModuleDict's blocks: "
                    "nn.ModuleList(blocks.values()), with the forward running that list in order)")
            kind = type(m).__name__  # (a PyTorch class in full: torch.ao's quantized Linear is a "Linear" too)
            kind = f"{type(m).__module__}.{type(m).__qualname__}" if type(m).__module__.startswith("torch.") else kind
            hint = (" (a quantized module holds packed weights that cannot be cut: wrap and train the float model, "
                    "then quantize the exported sub-model)" if kind.startswith(("torch.ao.", "torch.nn.quantized"))
                    else "")
            raise PatternError(f"{path!r} ({kind}, matched by {pats}) has no slicer{hint}; register one "
                               "with @sn.slicer(YourType) (see docs/custom_slicers.md)")
        if sl is not ATTRS_ONLY and own_forward(type(m), sl) and not sl.verifies_forward(type(m)):
            base = next(b for b in type(m).__mro__ if b in sl.types)
            name, of = type(m).__name__, base.__name__
            if name == of:  # (torch.ao's QAT Linear subclasses Linear: said in full)
                name, of = (f"{c.__module__}.{c.__qualname__}" for c in (type(m), base))
            qat = (" (a quantization-aware training module: wrap and train the float model, then prepare the "
                   "exported sub-model)" if type(m).__module__.startswith(("torch.ao.", "torch.nn.qat",
                                                                            "torch.nn.intrinsic")) else "")
            raise PatternError(f"{path!r}: {name} subclasses {of} with its own forward, "
                               f"which may ignore sliced attributes{qat}; register a slicer for it explicitly")
        sl.validate(m, bind, path)
        out[path] = (m, sl, bind)
    above = {p for p, m in modules.items() if _offloaded(m, submodules=True)}  # (a hook that places its children)
    offloaded = [p or "<root>" for p, (m, _, _) in out.items() if _offloaded(m) or any(
        a == "" or p.startswith(a + ".") for a in above)]
    if offloaded:
        raise SortedNetError(f"accelerate offloads the weights of {offloaded[:3]} (device_map with 'cpu' / 'disk' "
                             "entries, cpu_offload, disk_offload): its hook writes the full-size weights into each "
                             "module at every forward, which smaller sub-models cannot slice. Load the model "
                             "without offloading (every weight on one device) to wrap it")
    _refuse_tied_factors(model, out)
    return out


def _cyclic_path(model: nn.Module) -> str | None:
    """The path at which a module first holds one of its own ancestors (``c.d = c``), or None: a depth-first walk
    that tells a module met again on the current path (a cycle) from one met on another (a shared module)."""
    state = {id(model): 1}  # 1: on the current path, 2: done
    stack = [("", iter(model._modules.items()), model)]
    while stack:
        path, children, m = stack[-1]
        for name, c in children:
            if c is None:
                continue
            here = f"{path}.{name}" if path else name
            seen = state.get(id(c))
            if seen == 1:
                return here
            if seen is None:
                state[id(c)] = 1
                stack.append((here, iter(c._modules.items()), c))
                break
        else:
            state[id(m)] = 2
            stack.pop()
    return None


def _is_fsdp1(m: nn.Module) -> bool:
    """An FSDP1 ``FullyShardedDataParallel`` wrapper, or a module inside one (FSDP1 marks those; so does FSDP2's
    ``fully_shard``, whose DTensor parameters are recognised first)."""
    t = type(m)
    return (t.__name__ == "FullyShardedDataParallel" and t.__module__.startswith("torch.distributed.fsdp")) or (
        m.__dict__.get("_is_fsdp_managed_module") is True and "_fsdp_use_orig_params" in m.__dict__)


def _uninitialized(t: object) -> bool:
    return isinstance(t, nn.parameter.UninitializedTensorMixin)


def _split_groups(model: nn.Module, planned: dict) -> list[list[tuple[str, dict, Any]]]:
    """Parameters held by several modules (tied weights) that they slice differently (another dimension or
    axis, or one of them not at all): per such tensor, its holders as ``(name, {axis: dimension}, cut)``,
    ``cut(sizes)`` giving the holder's cuts of the tensor under a sub-model's sizes."""
    by_module = {id(m): (path, sl, bind) for path, (m, sl, bind) in planned.items()}
    holders: dict[int, list[tuple[str, dict | None, Any]]] = {}
    seen: set[int] = set()
    for path, m in model.named_modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        for name, t in m._parameters.items():
            if t is None:
                continue
            hit = by_module.get(id(m))
            cut: Any = lambda sizes: ((), None)  # noqa: E731  (an unsliced holder: the whole tensor, as cuts_for)
            if hit is None:
                axes: dict | None = {}
            else:
                rule = hit[1].rules(m).get(name)
                if rule is None:
                    axes = {} if name not in hit[1].attr_names(m, hit[2]) else None  # computed: unknown
                elif isinstance(rule, tuple):
                    axes = {ax: hit[2][role].dim for ax, role in rule if role in hit[2]}
                    cut = functools.partial(cuts_for, t.shape, hit[2], rule)
                else:
                    axes = None
            holders.setdefault(id(t), []).append((f"{path}.{name}" if path else name, axes, cut))
    out = []
    for group in holders.values():
        if len(group) < 2 or any(a is None for _, a, _ in group):
            continue
        (_, a0, _), *rest = group
        if any(set(a0) != set(a1) or any(a0[k] is not a1[k] for k in a0) for _, a1, _ in rest):
            out.append(group)
    return out


def split_ties(model: nn.Module, planned: dict) -> str | None:
    """Why some sub-models of ``planned`` cannot be exported, or None: a parameter held by several modules
    (tied weights) that they slice differently (another dimension or axis, or one of them not at all). Such
    sub-models run live, but read different slices of one tensor, which no plain model can hold (export
    refuses them; ``pick`` passes them over). ``sn.discover`` leaves such declarations out."""
    for (p0, a0, _), *rest in _split_groups(model, planned):
        for p1, a1, _ in rest:
            if set(a0) != set(a1) or any(a0[k] is not a1[k] for k in a0):
                def say(a: dict) -> str:
                    return ", ".join(f"{d.name!r} on axis {k}" for k, d in sorted(a.items())) or "nothing"
                return (f"{p0!r} and {p1!r} are one tensor (tied), but {p0!r} is sliced by {say(a0)} "
                        f"and {p1!r} by {say(a1)}")
    return None


def exportable(model: nn.Module, planned: dict,
               running: Callable[[dict[str, int]], Callable[[str], bool]] | None = None) -> Any:
    """A test ``sizes -> bool``: can the sub-model of these sizes be exported (every tied tensor cut alike
    by all its holders that run)? None when every sub-model can. ``running(sizes)`` tells by a holder's name
    (``path.param``) whether its module runs at those sizes (a Depth sub-model leaves blocks out, and a block
    left out holds nothing of the export); without it every holder counts."""
    groups = _split_groups(model, planned)
    if not groups:
        return None

    def test(sizes: dict[str, int]) -> bool:
        alive = None
        for g in groups:
            if len({repr(cut(sizes)) for _, _, cut in g}) == 1:
                continue
            if running is None:
                return False
            alive = alive or running(sizes)
            if len({repr(cut(sizes)) for name, _, cut in g if alive(name)}) > 1:
                return False
        return True

    return test


_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"_sn"}


def _span(t: torch.Tensor) -> tuple[str, int, int] | None:
    """The device and byte range ``t`` reads ([first, last] byte addresses); None for tensors without plain
    memory (meta, some subclasses). Ranges that overlap may still share no element (column halves of one
    matrix): :func:`_share_elements` tells."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    try:
        ptr = t.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if not ptr:
        return None
    hi = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # (torch strides are never negative)
    size = t.element_size()
    return str(t.device), ptr, ptr + hi * size + size - 1


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (byte ranges overlapping) read a common byte: a view of a weight (``.T``, a slice,
    ``.detach()``, another dtype) does; the column halves of one matrix, or the disjoint parts of one flat buffer,
    do not. A contiguous one covers its whole range; otherwise the bytes of the one not covering its range are
    marked in a mask over that tensor's own range (no copy of either tensor, nothing as large as a flat buffer
    both sit in)."""
    for x, y in ((a, b), (b, a)):
        if x.is_contiguous():  # (x covers [lo, hi]: does a byte of y fall in it?)
            _, lo, hi = _span(x)  # type: ignore[misc]
            if y.is_contiguous():  # (both cover their ranges)
                _, y_lo, y_hi = _span(y)  # type: ignore[misc]
                return y_lo <= hi and lo <= y_hi
            _, y_lo, y_hi = _span(y)  # type: ignore[misc]
            start, stop = max(lo, y_lo), min(hi, y_hi)
            return stop >= start and bool(_bytes(y, y_lo, y_hi)[start - y_lo:stop - y_lo + 1].any())
    (_, lo_a, hi_a), (_, lo_b, hi_b) = _span(a), _span(b)  # type: ignore[misc]
    lo, hi = min(lo_a, lo_b), max(hi_a, hi_b)
    return bool((_bytes(a, lo, hi) & _bytes(b, lo, hi)).any())


def _bytes(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """A bool mask over the byte addresses ``[lo, hi]`` (which hold ``t``'s range), True where ``t`` reads."""
    mask = torch.zeros(hi - lo + 1, dtype=torch.bool, device="cpu")
    es = t.element_size()
    mask.as_strided((*t.shape, es), (*(st * es for st in t.stride()), 1), t.data_ptr() - lo).fill_(True)
    return mask


_HELD_LIMIT = 1_000_000  # objects a Rank holder walk opens at most (a model's own attributes are a few hundred)
_OPAQUE = (str, bytes, bytearray, int, float, complex, bool, type, type(None), types.ModuleType)
_FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks")  # (what a forward runs: a backward hook reads no weight)


#: objects that hold parameters to step them, never to read them in a forward
_STEPPERS = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)


class HeldWalkWarning(UserWarning):
    """The walk for other holders of a Rank target's weight stopped at its limit: what lies beyond is unchecked."""


def held_tensors(v: object, seen: set[int], registered: set[int]) -> Iterator[torch.Tensor]:
    """The tensors a plain attribute value reaches: inside containers (any depth), ``functools.partial``,
    the ``__dict__`` / ``__slots__`` of plain objects, the closure cells and defaults of functions and lambdas,
    bound methods' objects, and the parameters, buffers, forward hooks and attributes of modules held outside
    ``_modules`` (``registered``: the ids of the model's own modules, walked by the caller). Not an optimizer
    or a learning-rate scheduler (it holds parameters to step them, never reads them in a forward), nor the
    globals a function reads. Each object once (``seen``, shared by the caller's walks), at most
    ``_HELD_LIMIT`` of them in all (then a :class:`HeldWalkWarning`); strings and numbers are not counted."""
    stack = [v]
    while stack:
        v = stack.pop()
        if isinstance(v, _OPAQUE) or id(v) in seen:
            continue
        if len(seen) >= _HELD_LIMIT:
            raise _WalkLimit
        seen.add(id(v))
        if isinstance(v, torch.Tensor):
            yield v
        elif id(v) in registered or isinstance(v, _STEPPERS):
            continue
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset, collections.deque)):
            stack.extend(v)
        elif isinstance(v, functools.partial):
            stack.extend((v.func, v.args, v.keywords))
        elif isinstance(v, types.MethodType):
            stack.extend((v.__self__, v.__func__))
        elif isinstance(v, types.FunctionType):
            stack.extend(_contents(c) for c in v.__closure__ or ())
            stack.extend((v.__defaults__ or (), v.__kwdefaults__ or {}))
        elif isinstance(v, nn.Module):  # (a module kept outside _modules: its own tensors and attributes)
            stack.extend(v._parameters.values())
            stack.extend(v._buffers.values())
            stack.extend(x for k, x in v.__dict__.items() if k not in _MODULE_INTERNALS or k in _FORWARD_HOOKS)
            stack.extend(v._modules.values())
        else:
            stack.extend(_fields(v))


class _WalkLimit(Exception):
    pass


def _fields(v: object) -> list[object]:
    """The values of a plain object's ``__dict__`` and ``__slots__`` (read as the object allows: an object whose
    ``__getattr__`` raises for them has none)."""
    out: list[object] = []
    try:
        d = object.__getattribute__(v, "__dict__")
    except Exception:
        d = None
    if isinstance(d, dict):
        out.extend(d.values())
    for slot in (x for c in type(v).__mro__ for x in c.__dict__.get("__slots__", ())):
        if isinstance(slot, str) and slot not in ("__dict__", "__weakref__"):
            try:
                out.append(object.__getattribute__(v, slot))
            except Exception:
                pass
    return out


def _contents(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # (an empty cell: a name the function assigns later)
        return None


def _refuse_tied_factors(model: nn.Module, planned: dict) -> None:
    """A Rank target's weight is replaced by factors (svd: the old tensor is left behind, full rank) or frozen
    under adapters (lora: reads of the weight itself never see them) and merged at unwrap: a weight another
    module also holds (tied embedding / output layer), a buffer holds, a plain Python attribute holds, or that
    a view of it shares, cannot follow; a forward reading it there would run the full-rank weight under every
    rank, silently."""
    from .slicers.lowrank import LowRankSlicer

    ranked = {id(m._parameters.get("weight")): (path, m) for path, (m, sl, _) in planned.items()
              if isinstance(sl, LowRankSlicer) and m._parameters.get("weight") is not None}
    if not ranked:
        return
    spans = [(key, ranked[i][0], m._parameters["weight"]) for i, (_, m) in ranked.items()
             if (key := _span(m._parameters["weight"]))]

    def refuse(target: str, where: str, same: bool) -> None:
        what = "its weight is also" if same else "a view of its weight (same memory) is"
        raise PatternError(f"Rank target {target!r}: {what} {where}; factorising it (svd) would leave that one on "
                           "the old full-rank weight, and adapters (lora) never reach it, so a forward reading it "
                           "there runs the full rank under every sub-model (and an optimizer given it trains "
                           "nothing of the layer). Read the weight through its module, untie them, or leave the "
                           "layer out of the Rank targets; a list of parameters kept for optimizer groups: build "
                           "it after wrap, from model.named_parameters()")

    def check(t: torch.Tensor, where: str, owner: nn.Module | None = None) -> None:
        hit = ranked.get(id(t))
        if hit is not None:
            if owner is not hit[1]:  # (the same module twice is fine)
                refuse(hit[0], where, True)
            return
        if (key := _span(t)) is not None:
            target = next((p for (dev, lo, hi), p, w in spans if dev == key[0] and lo <= key[2] and key[1] <= hi
                           and _share_elements(w, t)), None)
            if target is not None:
                refuse(target, where, False)

    registered = {id(m) for m in model.modules()}
    seen: set[int] = set()
    for path, m in model.named_modules(remove_duplicate=False):
        at = f"{path}." if path else ""
        for name, p in m._parameters.items():
            if p is not None:
                check(p, f"{at + name!r} (tied)", m)
        for name, b in m._buffers.items():
            if b is not None:
                check(b, f"the buffer {at + name!r}")
        for attr, v in m.__dict__.items():
            if attr not in _MODULE_INTERNALS or attr in _FORWARD_HOOKS:
                what = ("a forward hook of the module" if attr in _FORWARD_HOOKS else
                        "a plain Python attribute, or an object, function or module outside the model that it holds")
                try:
                    for t in held_tensors(v, seen, registered):
                        check(t, f"held by {at + attr!r} ({what})")
                except _WalkLimit:
                    warnings.warn(f"sn.wrap: the search for other holders of the Rank targets' weights stopped after "
                                  f"{_HELD_LIMIT:,} objects, at {at + attr!r}: objects beyond it are not checked (a "
                                  "weight a forward reads from there would run at full rank under every sub-model)",
                                  HeldWalkWarning, stacklevel=caller_outside())
                    return


def install(model: nn.Module, planned: dict, *, inplace_grad: bool, min_numel: int = 4096,
            hooks: list | None = None, before: dict[int, frozenset] | None = None) -> list:
    """Swap in per-instance subclasses; returns hook handles (appended to ``hooks`` as each is registered: the
    caller's list holds every handle whatever stops the caller after this returns).

    All-or-nothing: if a slicer's ``prepare`` fails (e.g. the SVD of a huge layer runs
    out of memory), every module converted so far gets back its class, ``__dict__``
    entries, parameters, buffers and ``requires_grad`` flags, and the error propagates.
    """
    saved: list[tuple[nn.Module, type, dict, dict, dict, dict]] = []
    hooks = [] if hooks is None else hooks
    before = hook_keys(model) if before is None else before
    keyed = {path: changed for path, (m, sl, bind) in planned.items() if (changed := sl.planned_state(m, bind))}
    try:
        for path, (m, sl, bind) in planned.items():
            names = sl.attr_names(m, bind)
            cls = sliced_subclass(m, sl, names, path)
            saved.append((m, type(m), dict(m.__dict__), dict(m._parameters), dict(m._buffers),
                          {n: p.requires_grad for n, p in m._parameters.items() if p is not None}))
            m.__dict__["_sn"] = State(sl, bind, type(m), path, inplace_grad, min_numel=min_numel)
            with torch.inference_mode(False):  # tensors it makes (Rank factors) are normal tensors, also
                sl.prepare(m)                   # when wrap runs under inference_mode (they train later)
            m.__class__ = cls
            rebind_kept_forward(m, saved[-1][1])  # (a hook added before wrap calls the sliced forward)
        sliced = {id(m) for m, _, _ in planned.values()}
        for m in model.modules():
            if isinstance(m, _FAST_PATH_LAYERS) and any(id(c) in sliced for c in m.modules()):
                hooks.append(m.register_forward_pre_hook(_no_fast_path))
        for _, m in cumulative_norms(planned):  # a cumulative average with one batch counter for every channel
            hooks.append(m.register_forward_pre_hook(CumulativeAverageGuard()))  # (momentum read at each call)
        # key checks first on each module, before StaleCalibration: a load they refuse keeps the calibration
        _guard_state_keys(model, planned, keyed, hooks)
        shapes = StateShapes()  # (on every module: a load into a sub-module checks its own part)
        for m in model.modules():
            if not isinstance(m, torch.jit.ScriptModule):  # (which takes no such hook: left to PyTorch)
                hooks.append(m._register_load_state_dict_pre_hook(StateShapes(root=True) if m is model else shapes,
                                                                  with_module=True))
        bns = tuple(m for m, _, bind in planned.values() if isinstance(m, _BatchNorm) and "norm" in bind)
        if bns:  # calibration possible: a load that changes any tensor makes it stale
            stale = StaleCalibration(bns)
            for m in model.modules():
                if (m._parameters or m._buffers) and not isinstance(m, torch.jit.ScriptModule):
                    hooks.append(m._register_load_state_dict_pre_hook(stale, with_module=True))
        for path, (m, _, bind) in planned.items():
            if "depth" in bind:
                hooks.extend(_guard_blocks(model, path, m, bind["depth"]))
    except BaseException:
        for h in hooks:
            h.remove()
        hooks.clear()
        drop_hooks_since(model, before)  # (one registered as a Ctrl-C came, before its handle was kept)
        for m, cls, attrs, params, buffers, grads in reversed(saved):
            m.__class__ = cls
            for k in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[k]
            m.__dict__.update(attrs)
            for store, old in ((m._parameters, params), (m._buffers, buffers)):
                store.clear()
                store.update(old)
            for n, flag in grads.items():
                m._parameters[n].requires_grad_(flag)
        raise
    finally:  # initialisation generators a slicer kept on its dimension while preparing (LoRA adapters)
        for _, _, bind in planned.values():
            for b in bind.values():
                b.dim.__dict__.pop("_init_generators", None)
    return hooks


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
               "_state_dict_pre_hooks", "_state_dict_hooks", "_backward_pre_hooks", "_backward_hooks")


def hook_keys(model: nn.Module) -> dict[int, frozenset]:
    """The keys of every non-empty hook table of ``model``'s modules (see :func:`drop_hooks_since`)."""
    return {id(d): frozenset(d) for m in model.modules() for name in _HOOK_DICTS if (d := m.__dict__.get(name))}


def drop_hooks_since(model: nn.Module, before: dict[int, frozenset]) -> None:
    """Remove every sortednet hook registered on ``model``'s modules since :func:`hook_keys` gave ``before``: the
    undo of a wrap finds them all, also one whose handle a Ctrl-C kept from reaching the list of handles. Hooks
    anyone else registered meanwhile (a slicer's ``prepare``, another thread) stay."""
    for m in model.modules():
        for name in _HOOK_DICTS:
            d = m.__dict__.get(name)
            if d:
                old = before.get(id(d), frozenset())
                for k in [k for k in d if k not in old and _ours(d[k])]:
                    d.pop(k, None)
                    for other in _HOOK_DICTS:  # (torch keeps a hook's flags in tables of their own)
                        extra = m.__dict__.get(other)
                        if extra and k in extra and not callable(extra[k]):
                            extra.pop(k, None)


def _guard_state_keys(model: nn.Module, planned: dict, keyed: dict[str, dict], hooks: list) -> None:
    """One :class:`StateKeys` pre-hook on each module on the path to a module whose state_dict keys wrap
    changes (a Rank target: svd ``weight`` -> ``U``, ``V``; lora adds ``lora_A``, ``lora_B``), that module too:
    a ``load_state_dict`` from any of them checks those keys before its first tensor is copied."""
    below: dict[str, list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]] = {}
    for path, changed in keyed.items():
        _, sl, bind = planned[path]
        b = bind.get("rank")
        what = f"Rank {b.dim.name!r} (mode={b.dim.mode!r})" if b is not None and hasattr(b.dim, "mode") \
            else type(sl).__name__
        removed = tuple(n for n, v in changed.items() if v is None)
        added = tuple(n for n, v in changed.items() if v is not None)
        parts = path.split(".") if path else []
        for i in range(len(parts) + 1):
            below.setdefault(".".join(parts[:i]), []).append((path, ".".join(parts[i:]), what, removed, added))
    for anc, t in below.items():  # (each handle kept as soon as it is made: see install)
        hooks.append(model.get_submodule(anc)._register_load_state_dict_pre_hook(StateKeys(tuple(t), anc == ""),
                                                                                 with_module=True))


_FACTORS = ("U", "V", "lora_A", "lora_B")  # (the tensors a Rank target holds beside its weight, either mode)


class StateKeys:
    """``load_state_dict`` pre-hook (see :func:`_guard_state_keys`). A state_dict holding a key wrap removed
    (svd's ``weight``: a checkpoint of the model before wrap) but not the keys that replaced it would have that
    tensor ignored (``strict=False``: training on silently from other weights) or refused by PyTorch after the
    other tensors were copied (``strict=True``: a half-loaded model); refused here first, naming the module.
    A load lacking only added keys (lora's adapters: a checkpoint of the base model) is fine with
    ``strict=False``; with ``strict=True`` PyTorch would refuse it after copying every other tensor, so it is
    refused here first too (PyTorch tells a pre-hook ``strict=True`` whatever the caller passed: the caller's
    own ``strict`` is read off the running ``Module.load_state_dict``). Holds paths only: a deep copy of the
    model keeps a working one."""

    __slots__ = ("targets", "root")

    def __init__(self, targets: tuple[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], ...],
                 root: bool = False) -> None:
        self.targets, self.root = targets, root  # (root: the hook of the wrapped model's root)

    def __call__(self, module: nn.Module, state_dict: Mapping, prefix: str, *args: Any) -> None:
        # (factor / adapter keys of modules of this model that hold no such tensor: another nest's Rank targets;
        # a tensor of the model's own under such a name, an RNN's U, is no adapter). Looked for once per load: by
        # the root's hook, or by the hook of the module the load was called on; and where a message needs them
        found: list[list[str]] = []
        loading = _loading()
        # (a load called on something above this module, a container of one's own holding the wrapped model, has
        # copied the modules before it: what was not copied is what lies under this prefix)
        nothing = ("nothing was copied" if loading is module or not prefix else
                   f"nothing under {prefix[:-1]!r} was copied")

        held: list[set[int]] = []

        def own(v: Any) -> bool:  # (the model's own tensor: torch.distributed.checkpoint's set_model_state_dict
            if not held:          # fills the keys a state_dict lacks with them, so U / V given are not the file's)
                held.append({id(t) for t in (*module.parameters(), *module.buffers())})
            return id(v) in held[0]

        def foreign() -> list[str]:
            if not found:
                found.append([k for k in state_dict if k.startswith(prefix) and k.rpartition(".")[2] in _FACTORS
                              and _not_held(module, k[len(prefix):])])
            return found[0]

        def why(at: str, other: list[str], lenient: bool) -> str:
            elsewhere = [k for k in foreign() if not k.startswith(at) or k in other]
            return (f"; it holds {other} instead: a checkpoint of a Rank of another mode (wrap with the same mode, "
                    "or load the source's weights merged: nest.unwrap(merge=True) there)" if other else
                    f"; it holds the factors / adapters of {sorted({k.rpartition('.')[0] for k in elsewhere})[:4]}:"
                    " a checkpoint of a nest with other Rank targets (wrap with the same targets" + (
                        "; strict=False would load the other weights and drop those adapters)" if lenient else ")")
                    if elsewhere else "")

        for path, rel, what, removed, added in self.targets:
            at = prefix + _keyed_as(module, rel, state_dict, prefix, (*removed, *added, *_FACTORS, "weight"))
            name = repr(path) if path else "the model's root"
            other = [at + n for n in _FACTORS if n not in added and at + n in state_dict]  # (another Rank mode's)
            stale = [at + n for n in removed if at + n in state_dict]
            if stale and not any(at + n in state_dict and not own(state_dict[at + n]) for n in added):
                said = why(at, other, False)
                raise SortedNetError(
                    f"load_state_dict: {name} is a {what} target; wrap replaced its "
                    f"{list(removed)} by {list(added)}, so this state_dict's {stale} " + (
                        said[2:].replace("it holds", "(it holds", 1) + ")" if said else
                        "(from the model before wrap, or from an exported sub-model)") +
                    " would be ignored (strict=False) or refused after the other tensors loaded. Load those weights "
                    "before sn.wrap (or nest.unwrap(), load, wrap again); the wrapped model's own state_dict and "
                    f"sn.save / sn.load hold the new keys. {nothing[0].upper() + nothing[1:]}")
            lacking = [at + n for n in added if at + n not in state_dict]
            if lacking and (other or any(at + n in state_dict for n in (*removed, "weight"))) and _strict_load():
                raise SortedNetError(
                    f"load_state_dict: {name} is a {what} target; this state_dict lacks "
                    f"{lacking}" + (why(at, other, True) or " (the keys wrap added: a state_dict of the model before "
                                                            "wrap); pass strict=False to load the other weights and "
                                                            "keep the nest's own (the adapters), or load before "
                                                            "sn.wrap") +
                    f". load_state_dict(strict=True) would refuse it only after copying every other tensor: {nothing}")
        if (self.root or loading is module) and foreign() and _strict_load():
            raise SortedNetError(
                f"load_state_dict: this state_dict holds {foreign()[:4]}, the factors / adapters of modules this "
                f"nest's Rank dimensions do not slice ({sorted({k.rpartition('.')[0] for k in foreign()})[:4]}): a "
                "checkpoint of a nest with other Rank targets (wrap with the same targets). load_state_dict("
                f"strict=True) would refuse it only after copying every other tensor: {nothing}")


def _keyed_as(module: nn.Module, rel: str, state_dict: Mapping, prefix: str, names: tuple[str, ...]) -> str:
    """The key prefix, relative to ``module``, under which ``state_dict`` holds the tensors of its descendant
    ``rel``: ``rel.`` itself, or, below a module with a load pre-hook of someone else's and a private child (an
    activation-checkpoint wrapper's ``_checkpoint_wrapped_module``, whose hook adds that name to the keys only
    when the load reaches it), ``rel.`` without that child's name, where the state_dict holds one of ``names``
    there (under ``prefix``, the load's key prefix of ``module``): the keys of the model before the wrapper, which
    the checks above the wrapper must read as they come."""
    parts = rel.split(".") if rel else []
    forms = [[]]
    m: nn.Module | None = module
    for part in parts:
        wrapper = m is not None and _renames(m) and part.startswith("_")
        forms = [f + [part] for f in forms] + ([list(f) for f in forms] if wrapper else [])
        m = m._modules.get(part) if m is not None else None
    for f in forms:
        at = ".".join(f) + "." if f else ""
        if any(prefix + at + n in state_dict for n in names):
            return at
    return rel + "." if rel else ""


def _not_held(module: nn.Module, key: str) -> bool:
    """Whether ``key`` (relative to ``module``) names a tensor the module it points to does not hold: that module
    exists (a key of another model is PyTorch's to report) and has no parameter or buffer of that name. Through an
    activation-checkpoint wrapper, whose state-dict hooks drop its inner module's name from the keys, either form;
    False where another module on the way renames its keys (a state-dict hook of someone else's: the path may not
    lead to the holder)."""
    path, _, name = key.rpartition(".")
    m: nn.Module | None = module
    for part in [*(path.split(".") if path else []), None]:
        while _renames(m):  # (an activation-checkpoint wrapper: the key may leave its inner name out; another
            inner = _wrapped_child(m)  # module renaming its keys: the path does not lead to the holder)
            if inner is None:
                return False
            if part == inner:
                break
            m = m._modules[inner]
        if part is None:
            break
        m = m._modules.get(part)
        if m is None:
            return False
    return name not in m._parameters and name not in m._buffers and not _own_key(m, name)


def _own_key(m: nn.Module, name: str) -> bool:
    """Whether ``m``'s own state-dict code (a packed or quantized layer's) writes a key ``name``, which then names
    a tensor of its own, not another nest's adapter (a loader of its own that only converts legacy keys writes
    none such)."""
    st = m.__dict__.get("_sn")
    cls = st.cls if st is not None else type(m)
    if cls._save_to_state_dict is nn.Module._save_to_state_dict and \
            getattr(cls, "_load_from_state_dict", None) in _LOADERS:
        return False
    dest: dict[str, Any] = {}
    try:
        m._save_to_state_dict(dest, "", True)
    except Exception:  # (code of its own that cannot run here: its keys are its own to judge)
        return True
    return name in dest


def _renames(m: nn.Module) -> bool:
    """Whether ``m`` has a state-dict or load pre-hook that is not sortednet's nor FSDP2's (one that may rename its
    keys)."""
    return any(not _keeps_keys(h) for hooks in (m._state_dict_hooks, m._state_dict_pre_hooks,
                                                 m._load_state_dict_pre_hooks) for h in hooks.values())


_FSDP2 = "torch.distributed.fsdp._fully_shard."


def _keeps_keys(hook: Any) -> bool:
    """Whether a state-dict hook table's entry keeps the keys and values as they are for sortednet's checks:
    sortednet's own, or FSDP2's (``fully_shard`` registers, on every module holding its parameters, load hooks that
    reshard them before a load and after it: they rename no key, and drop no missing key)."""
    return _ours(hook) or hook_module(hook).startswith(_FSDP2)


class _ShapeMismatch(SortedNetError, RuntimeError):
    """A ``load_state_dict`` refused for tensors of other shapes (a ``RuntimeError`` too, as PyTorch's own)."""


_LOADERS = (nn.Module._load_from_state_dict, nn.modules.batchnorm._NormBase._load_from_state_dict,
            nn.modules.instancenorm._InstanceNorm._load_from_state_dict)


_LOADS = [0]  # loads into wrapped models in this process (StateShapes, sn.load): distributed re-checks replicas
_LOADED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()  # module loaded into -> loads


def loads(within: nn.Module | None = None) -> int:
    """How many loads (``load_state_dict`` of a wrapped model or a part of it, ``sn.load``, of a module
    ``sortednet.distributed.accumulate`` was given) this process began, into ``within`` or its parts (None:
    anywhere): ``sortednet.distributed.accumulate`` compares the ranks' weights again after one."""
    if within is None:
        return _LOADS[0]
    keys = list(_LOADED.items())
    inside = {id(m) for m in within.modules()} if keys else set()
    return sum(n for m, n in keys if id(m) in inside)


def count_load(module: nn.Module) -> None:
    """Count a load into ``module`` (before any copy, also where it is refused)."""
    _LOADS[0] += 1
    _LOADED[module] = _LOADED.get(module, 0) + 1


class StateShapes:
    """``load_state_dict`` pre-hook of every module of the wrapped model; the module ``load_state_dict`` was called
    on (the whole model or a part) checks its part: a tensor of another shape than the model's own (a checkpoint
    of a nest of another largest size or rank: ``lora_A`` (4, in) for (8, in)) is refused here, before any tensor
    is copied; PyTorch refuses it only after copying every other tensor (a half-loaded model). Modules with a
    loader of their own (quantized layers), or under a load pre-hook of someone else's (which may convert an old
    layout), are left to it. A load called on something that holds the wrapped model (``torch.compile``'s
    module, DDP, a container of one's own) is checked by the wrapped model's root, under its prefix."""

    __slots__ = ("root",)

    def __init__(self, root: bool = False) -> None:
        self.root = root

    def __call__(self, module: nn.Module, state_dict: Mapping, prefix: str, *args: Any) -> None:
        loading = _loading()
        if loading is not module and not (  # (a part of the load: the module it was called on checked it)
                self.root and isinstance(loading, nn.Module) and any(m is module for m in loading.modules())):
            return
        count_load(module)  # (before any copy, also where refused: a re-check of the replicas costs one digest)
        bad = []
        assign = bool(args and isinstance(args[0], Mapping) and args[0].get("assign_to_params_buffers"))
        stack: list[tuple[tuple[str, ...], nn.Module]] = [(("",), module)]
        while stack:  # (as load_state_dict walks: a shared module under each of its paths)
            paths, m = stack.pop()
            if any(not _keeps_keys(h) for h in m._load_state_dict_pre_hooks.values()):
                inner = _wrapped_child(m)  # (a hook of someone else's may convert the state_dict of this module and
                if inner is not None:      # below; an activation-checkpoint wrapper's only adds its inner name)
                    stack.append(((*(_join(p, inner) for p in paths), *paths), m._modules[inner]))
                continue
            stack.extend((tuple(_join(p, n) for p in paths), c) for n, c in m._modules.items() if c is not None)
            st = m.__dict__.get("_sn")
            if getattr(st.cls if st is not None else type(m), "_load_from_state_dict", None) not in _LOADERS:
                continue
            for name, t in (*m._parameters.items(), *m._buffers.items()):
                at = next((a for a in (prefix + (f"{p}." if p else "") for p in paths) if a + name in state_dict),
                          None)  # (the keys as the state_dict holds them, above a wrapper or below it)
                if (t is None or at is None or name in m._non_persistent_buffers_set
                        or isinstance(t, nn.parameter.UninitializedTensorMixin)):
                    continue
                v = state_dict[at + name]
                if not torch.overrides.is_tensor_like(v):  # (PyTorch refuses it too, after the others' copy)
                    bad.append(f"{at + name}: a {type(v).__name__}, not a tensor")
                elif v.is_meta and not t.is_meta and not assign:  # (a state_dict of an empty-weights model)
                    bad.append(f"{at + name}: a meta tensor, which holds no values")
                elif v.shape != t.shape and not (t.dim() == 0 and tuple(v.shape) == (1,)):
                    bad.append(f"{at + name}: {tuple(v.shape)} for {tuple(t.shape)}")
        if bad:
            empty = sum(b.endswith((", not a tensor", "holds no values")) for b in bad)
            shapes = len(bad) - empty
            what = "; ".join(([f"size mismatch for {shapes} tensor(s), of another shape than the model's"]
                              if shapes else []) + ([f"{empty} value(s) that hold no tensor data, for the model's"]
                                                    if empty else []))
            where = "was" if loading is module else f"under {prefix[:-1]!r} was"
            hint = ". A checkpoint of a nest of other sizes or ranks? sn.load names the difference" if shapes else ""
            raise _ShapeMismatch(f"load_state_dict: {what} ({'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}): "
                                 f"nothing {where} copied (PyTorch would refuse them only after copying every other "
                                 f"tensor){hint}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_RENAMERS = ("torch.distributed.algorithms._checkpoint.",)  # (checkpoint_wrapper's state-dict hooks)


def _wrapped_child(m: nn.Module) -> str | None:
    """The name of the one child of ``m``, an activation-checkpoint wrapper (``_checkpoint_wrapped_module``) whose
    state-dict hooks only take that name out of the keys and put it back on load: the keys under it are the
    child's, in either form. None for any other module (a hook of someone else's may convert the tensors too)."""
    kids = [n for n, c in m._modules.items() if c is not None]
    if len(kids) != 1 or not kids[0].startswith("_") or m._parameters or m._buffers:
        return None
    hooks = [h for table in (m._state_dict_hooks, m._state_dict_pre_hooks, m._load_state_dict_pre_hooks)
             for h in table.values() if not _keeps_keys(h)]
    return kids[0] if hooks and all(hook_module(h).startswith(_RENAMERS) for h in hooks) else None



def _load_call() -> dict[str, Any]:
    """The locals of the innermost ``Module.load_state_dict`` call running in this thread (``self``, ``strict``),
    empty where none runs (a loader of its own calling ``_load_from_state_dict``)."""
    f = sys._getframe(2)
    while f is not None:  # (by name and file, not by code: a library may wrap Module.load_state_dict, whose
        if f.f_code.co_name == "load_state_dict" and f.f_code.co_filename == _MODULE_FILE:  # frame holds
            return f.f_locals  # ``strict`` in its kwargs)
        f = f.f_back
    return {}


_MODULE_FILE = nn.modules.module.register_module_forward_hook.__code__.co_filename  # (torch's module.py)


def _loading() -> nn.Module | None:
    """The module whose ``load_state_dict`` runs in this thread (the innermost call), if any."""
    return _load_call().get("self")


def _strict_load() -> bool:
    """Whether the ``Module.load_state_dict`` call running in this thread will refuse missing keys: its
    ``strict``, unless a load_state_dict post-hook in the loaded model may drop them from the result (PEFT-style
    loaders of base weights do). False if no such call is found (a loader of its own that calls
    ``_load_from_state_dict`` decides for itself)."""
    call = _load_call()
    if not call:
        return False
    root = call.get("self")
    hooked = isinstance(root, nn.Module) and any(not _keeps_keys(h) for m in root.modules()
                                                 for h in m._load_state_dict_post_hooks.values())
    return bool(call.get("strict", True)) and not hooked


class StaleCalibration:
    """``load_state_dict`` pre-hook of every module of a wrapped model that holds tensors: a load that changes one
    of them (weights, statistics) makes all per-sub-model statistics of ``nest.calibrate`` stale (they describe
    other weights, also downstream of a sub-module loaded alone); they are dropped, so eval reads the loaded
    buffers, as plain PyTorch does. ``sn.load`` restores a checkpoint's calibration. Only tensors whose values
    change count: a tensor of another shape is refused by ``load_state_dict``, which leaves it, and the same
    values change nothing (a load that PyTorch refuses for another key, of the model's own state), so the
    calibration stays then. Costs a look at the sliced BatchNorms while nothing is calibrated. A deep copy of
    the model gets its own (the copy's BatchNorms)."""

    __slots__ = ("bns",)

    def __init__(self, bns: tuple[nn.Module, ...]) -> None:
        self.bns = bns

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        calibrated = [st for b in self.bns if (st := b.__dict__.get("_sn")) is not None and st.norm is not None]
        if not calibrated:
            return
        own = list(module._parameters.items()) + [
            (n, t) for n, t in module._buffers.items() if n not in module._non_persistent_buffers_set]
        for name, old in own:
            if name == "num_batches_tracked":  # a counter: neither eval nor the calibrated statistics read it
                continue                       # (a refused load of an export's state copies it alone)
            new = state_dict.get(prefix + name)
            if (isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and new.shape == old.shape
                    and not new.is_meta and not old.is_meta
                    and not torch.equal(new.detach().to(old.device, old.dtype), old.detach())):
                for st in calibrated:
                    st.norm = None
                return


class DepthGuard:
    """Forward pre-hook of a block in a Depth-sliced layer list: running it under a sub-model that skips it
    raises. The list itself hides skipped blocks (iteration, ``len``, indexing); a forward that reaches them
    another way (a Python list kept aside, ``children()``, ``checkpoint_sequential``) would otherwise run
    them silently, unlike the exported model. Blocks also held outside the list get no guard."""

    __slots__ = ("binding", "index", "path")

    def __init__(self, binding: Binding, index: int, path: str) -> None:
        self.binding, self.index, self.path = binding, index, path

    def __deepcopy__(self, memo: dict) -> "DepthGuard":
        return self  # a deep copy of the model follows the same nest state

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.index >= self.binding.features():
            d = self.binding.dim
            if torch._C._current_graph_task_id() != -1:  # a forward run by a backward: a checkpoint recomputing
                raise SortedNetError(
                    f"block {self.path!r} is recomputed by an activation checkpoint during a backward under "
                    f"{d.name}={d.active}, which skips it: its forward ran under another sub-model. Run the backward "
                    "inside the nest.use(...) block of its forward (one backward per sub-model), or checkpoint "
                    "with nest.checkpoint(fn, ...) or checkpoint(..., use_reentrant=False, "
                    "context_fn=nest.checkpoint_context), which recompute under the forward's sub-model")
            raise SortedNetError(
                f"block {self.path!r} ran under {d.name}={d.active}, which skips it: the forward reaches the "
                "blocks of the layer list other than by iterating, indexing or slicing it (e.g. a Python list of "
                "the blocks kept aside, .children(), checkpoint_sequential); iterate the list itself")


def _guard_blocks(model: nn.Module, path: str, container: nn.Module, binding: Binding) -> list:
    """:class:`DepthGuard` hooks on the blocks of a Depth-sliced ``container`` that only it holds."""
    from .export import reachable_modules

    scripted = [name for name, b in container._modules.items() if isinstance(b, torch.jit.ScriptModule)]
    if scripted:
        raise SortedNetError(f"Depth {binding.dim.name!r}: the blocks {scripted[:3]} of {path or '<root>'!r} are "
                             "TorchScript modules (torch.jit.script / trace), which take no hooks: sortednet cannot "
                             "follow their calls. Wrap the Python modules (to compile the wrapped model: "
                             "nest.compile())")
    elsewhere = reachable_modules(model, {(id(container), name) for name in container._modules})
    first: dict[int, tuple[int, str, nn.Module]] = {}
    for i, (name, b) in enumerate(container._modules.items()):
        if b is not None and id(b) not in elsewhere:
            first.setdefault(id(b), (i, name, b))
    # a block that is a container of modules (nn.ModuleList([norm, ff]), unpacked by the forward, or a module of
    # the user's without a forward, whose layers the parent calls) has no forward of its own to hook: its modules
    # are guarded, down to the first with a forward; a module several blocks hold
    # (a Perceiver's tied layers) with the first block's index, as a block held at several positions is
    lowest: dict[int, int] = {}  # (the first block holding each module: a block with a forward of its own too)
    for i, _, b in sorted(first.values(), key=lambda t: t[0]):
        for m in b.modules():
            lowest.setdefault(id(m), i)
    targets: dict[int, tuple[int, str, nn.Module]] = {}
    for i, name, b in sorted(first.values(), key=lambda t: t[0]):
        stack = [(f"{path}.{name}" if path else name, b)]
        while stack:
            where, m = stack.pop()
            if id(m) in targets and m is not b:
                continue
            if isinstance(m, (nn.ModuleList, nn.ModuleDict)) or (type(m).forward is nn.Module.forward
                                                                  and m._modules):
                # (a block without a forward of its own: the parent calls its layers, b.fc(x), so they are
                # what runs)
                stack.extend(reversed([(f"{where}.{n}", c) for n, c in m._modules.items()
                                       if c is not None and id(c) not in elsewhere]))
            else:
                targets.setdefault(id(m), (lowest.get(id(m), i), where, m))
    return [m.register_forward_pre_hook(DepthGuard(binding, i, where)) for i, where, m in targets.values()]


def cumulative_norms(planned: Mapping[str, tuple[nn.Module, Any, dict]]) -> list[tuple[str, nn.Module]]:
    """The sliced BatchNorm layers (path, module) that track statistics and whose channels a width of several sizes
    cuts: with ``momentum=None`` (built so or set later) they keep a cumulative average that a narrower sub-model's
    training forward corrupts (:func:`refuse_cumulative`). (An InstanceNorm takes ``momentum=None`` as 0: its
    statistics never move.)"""
    return [(path, m) for path, (m, _, bind) in planned.items()
            if isinstance(m, _BatchNorm) and "norm" in bind and m.__dict__["track_running_stats"]
            and len(bind["norm"].dim.sizes) > 1]


def refuse_cumulative(module: nn.Module) -> None:
    """Refuse a training-mode forward of ``module`` (see :func:`cumulative_norms`) with ``momentum=None`` under a
    sub-model narrower than its channels: its running statistics are a cumulative average, each batch weighed by
    ``1 / num_batches_tracked``, one counter for every channel, so the batch a narrower sub-model counts is one its
    last channels never saw, and their averages drift toward their initial values (12% off after a sandwich run).
    Eval mode, the full width, sortednet's dry runs and ``nest.calibrate``'s private copies run as always."""
    if not module.training or module.momentum is not None or not module.track_running_stats or in_dry_run():
        return
    st = module.__dict__.get("_sn")
    b = None if st is None else st.bind.get("norm")
    if b is None or b.features() >= b.full or (st.norm is not None and st.norm.override is not None):
        return  # (nest.calibrate's private copies average into statistics of each sub-model's own)
    raise SortedNetError(
        f"{st.path!r}: {st.cls.__name__} with momentum=None (a cumulative average, each batch weighed by "
        f"1 / num_batches_tracked, one counter for all {b.full} channels) runs in training mode with "
        f"{b.features()} of them ({b.dim.name}={b.dim.active}): the counter would count a batch its other "
        "channels never saw, and their averages drift toward their initial values. Give it a momentum before "
        "training (module.momentum = 0.1: an exponential average per channel; eval mode reads the statistics "
        "alike), or, in a training loop of your own, keep it in eval mode (frozen statistics) and "
        "nest.calibrate(loader) after. Raised before it ran (the modules before it in this forward did run)")


class CumulativeAverageGuard:
    """Forward pre-hook of each layer of :func:`cumulative_norms` (its momentum read at each call: set to None
    after wrap, on a deep copy, too): a forward that reaches it in training mode under a narrower sub-model with
    ``momentum=None`` is refused there (:func:`refuse_cumulative`), before it runs, compiled or not; the layers
    before it in that forward ran. Only where it runs: a layer in a block a Depth skips, or in a branch left out,
    is no matter."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple) -> None:
        refuse_cumulative(module)


def _no_fast_path(module: nn.Module, args: tuple) -> None:
    """Present only so PyTorch's fused Transformer fast path (which reads
    full-size weights) steps aside for sliced layers."""


class _HookKey:
    """A removable handle for a hook found in a module's hook dict (a deep copy's, whose handles
    ``wrap`` never returned)."""

    def __init__(self, hooks: dict, key: int) -> None:
        self.hooks, self.key = hooks, key

    def remove(self) -> None:
        self.hooks.pop(self.key, None)


class FactorsNotPretrained:
    """State-dict pre-hook on a Hugging Face model wrapped with ``Rank``: refuses ``model.save_pretrained``
    (which reads ``model.state_dict()``), whose files would hold the factors / adapters that
    ``from_pretrained`` re-initialises or drops with only a load report: a different model, silently."""

    def __init__(self, dims: str) -> None:
        self.dims = dims

    def __call__(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        f = sys._getframe(2)
        for _ in range(4):
            if f is None:
                return
            if f.f_code.co_name == "save_pretrained" and str(f.f_globals.get("__name__", "")).startswith(
                    "transformers."):
                raise SortedNetError(
                    f"save_pretrained of this {type(module).__name__}: its parameters hold the factors / adapters "
                    f"of {self.dims}, which from_pretrained would re-initialise or drop (a different model, with "
                    "only a load report). Save sortednet.integrations.export_pretrained(nest, nest.largest)"
                    ".save_pretrained(path) (stock weights, the largest sub-model merged), sn.save(nest, path) to "
                    "resume, or call nest.unwrap(merge=True) first (no weights were written; save_pretrained had "
                    "written its config files already)")
            f = f.f_back


class SavePretrainedGuard:
    """``save_pretrained`` set on the instance of a Hugging Face model wrapped with ``Rank``: refuses a save that
    would read ``model.state_dict()`` (factors / adapters, which ``from_pretrained`` re-initialises or drops)
    before transformers writes anything (it writes the config files first, then reads the state dict: a refusal
    there left a folder whose config.json describes another model than the weights already in it). A save given
    its weights (``state_dict=``, e.g. the merged ones ``SortedTrainer`` passes) runs the class's own method.
    :class:`FactorsNotPretrained` stays as the second line (``type(model).save_pretrained(model, ...)``)."""

    _sn_save_guard = True  # (how an export finds it on its copy)

    def __init__(self, model: nn.Module, dims: str) -> None:
        self.model, self.dims = model, dims

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """The model's class has transformers' own ``save_pretrained`` (a method of the user's, or another
        library's, is theirs: :class:`FactorsNotPretrained` guards only transformers' too)."""
        method = getattr(type(model), "save_pretrained", None)
        return callable(method) and str(getattr(method, "__module__", "")).startswith("transformers.")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        method = type(self.model).save_pretrained
        try:
            bound = inspect.signature(method).bind(self.model, *args, **kwargs)
        except TypeError:  # (wrong arguments: the method's own error)
            return method(self.model, *args, **kwargs)
        given = bound.arguments.get("state_dict")
        for name, p in inspect.signature(method).parameters.items():
            if given is None and p.kind is p.VAR_KEYWORD:
                given = bound.arguments.get(name, {}).get("state_dict")
        if given is None:
            raise SortedNetError(
                f"save_pretrained of this {type(self.model).__name__}: its parameters hold the factors / adapters of "
                f"{self.dims}, which from_pretrained would re-initialise or drop (a different model, with only a "
                "load report). Save sortednet.integrations.export_pretrained(nest, nest.largest).save_pretrained("
                "path) (stock weights, the largest sub-model merged), sn.save(nest, path) to resume, or call "
                "nest.unwrap(merge=True) first (nothing was written)")
        return method(self.model, *args, **kwargs)


class AttrKey:
    """A removable handle for an attribute wrap set on a module's instance (its ``__dict__``): removed only
    while it still holds what wrap set. ``hooks_dict_ref`` / ``id`` as a hook handle's (no hook dict)."""

    id = None

    def __init__(self, holder: dict, key: str) -> None:
        self.holder, self.key, self.value = holder, key, holder.get(key)

    def hooks_dict_ref(self) -> None:
        return None

    def remove(self) -> None:
        if self.holder.get(self.key) is self.value:
            del self.holder[self.key]


def wrap_hooks(model: nn.Module, skip: frozenset[int] = frozenset()) -> list[_HookKey]:
    """The hooks ``wrap`` registered (no-fast-path pre-hooks, the root's :class:`Pin`, the depth,
    cumulative-average and key/value cache guards, the load checks, the save guards
    :class:`FactorsNotPretrained` and :class:`SavePretrainedGuard`), found in ``model``
    (e.g. a deep copy of a wrapped one, whose handles ``wrap`` never returned); ``skip``: ids of modules left
    alone (those a copy shares with the live model keep its hooks)."""
    from .kvcache import CacheGuard, EncoderGuard

    guards = (DepthGuard, CumulativeAverageGuard, CacheGuard, EncoderGuard)
    out = []
    for m in model.modules():
        if id(m) in skip:
            continue
        loads = m.__dict__.get("_load_state_dict_pre_hooks", {})
        out.extend(_HookKey(loads, k) for k, f in list(loads.items())
                   if isinstance(attr_of(f, "hook"), (StaleCalibration, StateKeys, StateShapes)))
        saves = m.__dict__.get("_state_dict_pre_hooks", {})
        out.extend(_HookKey(saves, k) for k, f in list(saves.items()) if isinstance(f, FactorsNotPretrained))
        if isinstance(m.__dict__.get("save_pretrained"), SavePretrainedGuard):
            out.append(AttrKey(m.__dict__, "save_pretrained"))  # type: ignore[arg-type]
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = m.__dict__.get(attr, {})
            for k, f in list(hooks.items()):
                if (f is _no_fast_path or isinstance(f, guards)
                        or isinstance(attr_of(f, "__self__"), (Pin, *guards))):
                    out.append(_HookKey(hooks, k))
                    out.append(_HookKey(m.__dict__.get(f"{attr}_with_kwargs", {}), k))  # (its flags go with it)
                    if attr == "_forward_hooks":
                        out.append(_HookKey(m.__dict__.get("_forward_hooks_always_called", {}), k))
    return out



def entry_children(model: nn.Module, planned: dict) -> list[nn.Module]:
    """The root's direct children that a training script may call instead of the root (``model.model`` of a
    Hugging Face head model, PEFT calling ``model.forward`` and then it): those with a forward of their own and
    sliced modules below them, so that such a forward is pinned as the root's (not a sliced leaf itself: a
    checkpoint inside it cannot hold another module). None under an ``nn.Sequential`` root: its forward calls
    every child, and each hook costs a few microseconds per call (it takes the child off PyTorch's fast call
    path)."""
    if type(model).forward is nn.Sequential.forward:
        return []
    sliced = {id(m) for m, _, _ in planned.values()}
    out: list[nn.Module] = []
    for c in model.children():
        if (c is model or any(c is o for o in out) or isinstance(c, torch.jit.ScriptModule)  # (no hooks there)
                or type(c).forward is nn.Module.forward):
            continue
        if any(id(d) in sliced for _, d in c.named_modules() if d is not c):
            out.append(c)
    return out


#: what :meth:`Pin.inner_pre` pushes inside a forward already pinned: no block, no count
_INNER: list = [None, None, None, 0, None]


def _refuse_late_in_reducer(ddp: nn.Module, pin: Pin) -> None:
    """A forward through a DDP wrapper whose backward its reducer syncs: trainable parameters of sliced modules
    it was built without (added by ``sn.wrap`` after ``DDP(...)``: Rank adapters or factors) are left out of its
    gradient averaging, so each rank would train its own copy and the replicas drift apart in silence, even from equal
    starts. Refused, naming them; looked up once per wrapper and nest (``ddp._sn_late``: the names found, by the
    nest's pin, held weakly; several nests may run in one wrapper). Parameters the wrapper leaves out of its
    buckets on purpose (``parameters_to_ignore``, which also holds ``delay_all_reduce_named_params``, averaged
    by DDP itself) are not late. ``snd.accumulate`` runs its backwards under ``no_sync`` and averages every
    gradient itself: not here."""
    known = getattr(ddp, "_module_parameters", None)
    inner = getattr(ddp, "module", None)
    late: tuple[str, ...] = ()
    if known is not None and isinstance(inner, nn.Module):
        ids = {id(p) for p in known}
        ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ()) | set(  # (as distributed._ignored reads
            getattr(inner, "_ddp_params_and_buffers_to_ignore", ()) or ())       # them; wrap sits below it)
        late = tuple(f"{path}.{n}" if path else n for path, m in inner.named_modules() if "_sn" in m.__dict__
                     for n, p in m._parameters.items() if p is not None and p.requires_grad and id(p) not in ids
                     and (f"{path}.{n}" if path else n) not in ignored)  # (a sliced module's: the user's own
        #                                                             parameters added after DDP(...) are DDP's)
    ddp.__dict__.setdefault("_sn_late", weakref.WeakKeyDictionary())[pin] = late
    if late:
        raise SortedNetError(
            f"the trainable parameters {list(late[:3])}{' ...' if len(late) > 3 else ''} are not in this "
            "DistributedDataParallel wrapper's gradient averaging: it was built before they existed (added by "
            "sn.wrap: Rank adapters or factors), so its reducer would leave them out and each rank would train "
            "its own copy (the replicas drift apart in silence). Call sn.wrap before DDP(...) (docs/scaling.md)")


class Pin:
    """Forward hooks on the wrapped model's root: a forward that starts outside any ``use`` runs the
    nest-wide default in force when it starts, to its end. ``activate`` from another thread then takes
    effect at the next forward, never inside one (every attribute read would otherwise take the default
    anew, and one forward could mix two sub-models); an ``activate`` in this thread during the forward (a
    hook, the forward itself) takes effect at once, as without the pin. Compiled graphs guard on the default
    themselves (a graph break between two graphs can still see two defaults). A forward left by an
    interrupt (KeyboardInterrupt skips the post hook) is found stale by the next one and undone.

    It also keeps reentrant activation checkpoints exact: a forward with gradients counts itself in
    ``active.training``; a sliced attribute read without gradients meanwhile (:meth:`no_grad_read`) may be
    a reentrant checkpoint's forward inside the model, whose recomputation is then pinned to the plan read."""

    __slots__ = ("active", "local", "lock", "guards", "note", "root", "copies", "trained", "last", "__weakref__")

    def __init__(self, active: Any, root: nn.Module | None = None) -> None:
        self.active, self.local, self.lock = active, threading.local(), threading.Lock()
        # weakly (deep copies of the model share this pin: it must not keep the original alive), the nest's
        # module tree, whose containers' child counts are checked, and what adds a note to an error a forward
        # raises under a sub-model (the error itself unchanged)
        self.guards: weakref.ref[Guards] | None = None
        self.note: weakref.WeakMethod | None = None
        # weakly, the nest's own root and its deep copies (EMA / teacher): copy -> the unit order (``epoch``) its
        # weights were copied in, or None for a private view that shares the weights (they follow every sort)
        self.root = weakref.ref(root) if root is not None else None
        self.copies: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()
        # training-mode forwards with gradients of the model itself (not of a copy, nor a dry run's): calibrated
        # BatchNorm statistics made before one describe the weights of before, wherever the layers that changed sit
        self.trained = [0]
        # (thread, plan) of the outermost forward with gradients that started last, in any thread: accumulate
        # tells a closure that runs the model in another thread, where this thread's nest.use is not in force (a
        # serving thread's forwards, without gradients, are not taken for it)
        self.last: tuple[int, Any] | None = None
        active.on_no_grad_read = self.no_grad_read

    def __deepcopy__(self, memo: dict) -> "Pin":
        """A deep copy of the model follows the same nest state (this pin); the copy is noted with the unit order
        of the weights it copied, so that a later sort permutes it too (``Nest._drop_scores``), or, where it
        cannot, refuses it (:meth:`stale`)."""
        root = self.root() if self.root is not None else None
        with self.lock:  # (threads copy at once: exports and the private views of cost / profile copy the root)
            for src in [root, *list(self.copies)]:
                new = memo.get(id(src)) if src is not None else None
                if isinstance(new, nn.Module) and new is not src and new not in self.copies:
                    # a view shares every parameter and buffer (a copy sharing only some is permuted where it
                    # does not; a scalar counter of its own does not count)
                    held = [*src.parameters(), *(b for b in src.buffers() if b.dim() > 0)]
                    shared = bool(held) and all(memo.get(id(w)) is w for w in held)
                    self.copies[new] = None if shared else (self.active.epoch if src is root
                                                            else self.copies.get(src))
        return self

    def stale(self, module: nn.Module) -> None:
        """Refuse a forward of a deep copy left in the old unit order by a sort that could not permute it (its
        modules changed; copies are permuted with the model otherwise): under a sub-model it would run other units
        than the nest does (and averaging it with the model, as an EMA does, mixes unrelated units). Not once the
        nest is unwrapped (copies then run the full model)."""
        epoch = self.copies.get(module)
        if epoch is not None and epoch != self.active.epoch and self.active.owner is not None:
            raise SortedNetError(
                f"this copy of the model ({type(module).__name__}, an EMA / teacher copy.deepcopy) was made before "
                "the nest's units were re-ordered (sort_units / sort_by_importance) and could not be permuted with "
                "the model (its modules changed, or the sort was stopped before it reached this copy): its weights "
                "are in the old "
                "order, so under a sub-model it would run other units than the nest, and averaging it with the "
                "model mixes unrelated units. Copy the model again after sorting; nest.unwrap_copy(copy) gives "
                "its full model as a plain module")

    def _stack(self, here: Any = None) -> list:
        """This thread's pins ``[open block or None, frame of the root call, pinned plan, with gradients]``,
        stale ones undone (``here``: the calling hook's caller, by default ``sys._getframe(2)``)."""
        stack = self.local.__dict__.setdefault("stack", [])
        if stack:
            outer, f = stack[0][1], here or sys._getframe(2)
            while f is not None and f is not outer:
                f = f.f_back
            if f is None:  # the outermost pinned forward is gone without its post hook (an interrupt)
                self._count(-sum(e[3] for e in stack))
                stack.clear()
        return stack

    def forward_key(self) -> int | None:
        """A key of the outermost forward of the nest's model running in this thread (new for each one), or None
        outside one."""
        d = self.local.__dict__
        return d.get("serial") if d.get("stack") else None

    def in_forward(self) -> bool:
        """Whether a forward of the nest's model (pinned by this object) runs in this thread."""
        return bool(self.local.__dict__.get("stack"))

    def _count(self, n: int) -> None:
        if n:
            with self.lock:
                self.active.training += n

    def pre(self, module: nn.Module, args: tuple) -> None:
        if _compiling():
            return
        self._enter(module, sys._getframe(1))
        if module.training and _grad_enabled():
            self._trains(module)
        ddp = sys.modules.get("torch.nn.parallel.distributed")  # (a forward through DDP: its reducer averages)
        ddp = ddp.DistributedDataParallel._active_ddp_module if ddp is not None else None
        if ddp is not None and _grad_enabled() and ddp.require_backward_grad_sync:
            seen = ddp.__dict__.get("_sn_late")  # (by pin, weakly: what was found for it)
            seen = None if seen is None else seen.get(self)
            if seen is None or seen:
                _refuse_late_in_reducer(ddp, self)  # (after _enter: the post hook, always called, takes it back)

    def inner_pre(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of a direct child of the root that holds sliced modules: a forward entered there,
        while no forward of the root runs in this thread (``model.model(ids)``, or ``model.forward(x)`` as
        PEFT's tuners call it, then ``model.model``), is pinned and counted as the root's is, so reentrant
        checkpoints inside it recompute its sub-model; inside a root forward it only marks its place."""
        if _compiling():
            return
        here = sys._getframe(1)
        stack = self._stack(here)
        if stack:
            stack.append(_INNER)
        else:
            self._enter(module, here)
            if module.training and _grad_enabled():
                self._trains(module)

    def _trains(self, module: nn.Module) -> None:
        """A training-mode forward with gradients of ``module`` (the root, or a child entered on its own) starts:
        counted in :attr:`trained` where it is the nest's own model's, outside a dry run (one without gradients,
        Monte-Carlo dropout, trains nothing; the BatchNorm layers it runs count their own batches)."""
        root = self.root() if self.root is not None else None
        if root is not None and (module is root or module in root._modules.values()) and not in_dry_run():
            self.trained[0] += 1

    def inner_post(self, module: nn.Module, args: tuple, out: Any) -> None:
        if _compiling():
            return
        stack = self.local.__dict__.get("stack")
        if stack and stack[-1] is _INNER:
            stack.pop()
        else:
            self._leave(stack, sys._getframe(1), out)

    def _enter(self, module: nn.Module, here: Any) -> None:
        # This thread's record first (the post hook, which torch runs also when this one raises, takes it back),
        # then the count and the pin on the context's stack (as use): a Ctrl-C anywhere leaves a record that
        # holds all that was done (the next forward finds it stale and undoes it)
        stack = self._stack(here)
        if not stack:  # (an outermost forward of this thread: what is read once per forward keys on it)
            self.local.serial = self.local.__dict__.get("serial", 0) + 1
        top = [None, here, None, 0, sys.exc_info()[1]]
        stack.append(top)
        if self.copies and module in self.copies:
            self.stale(module)
        g = self.guards() if self.guards is not None else None
        if g is not None:
            g.check_counts()  # (a few len() calls: insert / pop / del reach no registration hook)
        a = self.active
        if a.uses.get():  # pins left by interrupted forwards of this context: gone, the blocks opened since stay
            heal_pins(a, here)
            uses = a.uses.get()
            if uses and uses[-1].gen:  # (a generator's block on top: another frame's forward may run under it)
                shadowed(a, uses, here)
        grad = _grad_enabled()
        if not grad or _saved_tensors_hooks(False) is not None:  # (inside a reentrant checkpoint's forward, or
            p = a._scoped                                          # a non-reentrant one's: it recomputes the
            pin_checkpoints(a, a.default if p is a else p, here)  # plan in force there)
        pinned = a._scoped is a  # (inside use, or inside a pinned forward: nothing to pin)
        plan = top[2] = a.default if pinned else None
        if len(stack) == 1 and grad:
            self.last = (threading.get_ident(), plan if pinned else a._scoped)
        if grad:
            with self.lock:
                a.training += 1
                top[3] = 1  # (no signal is handled between these two lines: neither calls)
        if pinned:
            top[0] = entry = _Open(a.var.get(a), here, pin=True)
            entry.utok = a.uses.set((*a.uses.get(), entry))
            entry.vtok = a.var.set(plan)

    def post(self, module: nn.Module, args: tuple, out: Any) -> None:
        if _compiling():
            return
        self._leave(self.local.__dict__.get("stack"), sys._getframe(1), out)

    def _leave(self, stack: list | None, here: Any, out: Any = None) -> None:
        if stack:
            top = stack[-1]
            if out is None:  # (always_call: also after the forward raised, inside torch's except block)
                self._annotate(top[4] if len(top) > 4 else None)
            # the pin closed and the count taken back before the record goes (the reverse of _enter): a Ctrl-C
            # anywhere leaves the record of what is left to undo
            if top[0] is not None:  # (a use block the user's hooks opened around the forward ends with it)
                close_block(self.active, top[0], here)
                top[0].held = None  # (a context copied during the forward keeps the entry: not the frame)
            if top[3]:
                with self.lock:
                    self.active.training -= 1
                    top[3] = 0
            stack.pop()

    def _annotate(self, before: BaseException | None) -> None:
        """Add a note naming the sub-model to the error the forward is raising (not one that was in flight when
        it started): a raw shape error of an unchecked wiring then points at ``nest.check``. The error's type
        and message stay as they are."""
        err = sys.exc_info()[1]
        note = self.note() if self.note is not None else None
        if (err is None or err is before or note is None or isinstance(err, SortedNetError)
                or not isinstance(err, (RuntimeError, ValueError, IndexError, AssertionError))
                or not hasattr(err, "add_note")):
            return
        a = self.active
        p = a._scoped  # (Active.plan() without its checkpoint side effect)
        try:
            text = note((a.default if p is a else p).sub)
        except Exception:
            return
        if text and text not in getattr(err, "__notes__", ()):
            err.add_note(text)

    def no_grad_read(self, plan: Any) -> None:
        """A sliced attribute read without gradients while a forward with gradients runs (in some thread):
        when that forward is in this thread and the read comes from a reentrant checkpoint's forward inside
        it, the checkpoint recomputes under ``plan`` during backward, wherever backward runs."""
        stack = self.local.__dict__.get("stack")
        if stack:
            for e in reversed(stack):
                if e[3]:  # the innermost forward with gradients of this thread
                    pin_checkpoints(self.active, plan, sys._getframe(2), stop=e[1])
                    return
        # a reentrant checkpoint's forward in this thread entered without a root forward (checkpoint(model.forward,
        # x), a lambda over the layers), not pinned yet: pinned as well
        if REENTRANT[0] and unpinned_reentrant(self.active):
            pin_checkpoints(self.active, plan, sys._getframe(2))

    def enter_root(self, frame: Any, block: Any = None) -> list:
        """A forward that is not the root's (a checkpoint's recomputation, run by ``in_plan`` inside its use
        ``block``) starts in ``frame``: reads without gradients inside it pin checkpoints as in a root forward,
        and an ``activate`` in this thread during it re-pins the block, as in a pinned root forward (the
        checkpointed function activating another sub-model recomputes as its forward ran)."""
        stack = self._stack()
        entry = [block, frame, None, 0]
        stack.append(entry)  # (the record first, then the count: see _enter)
        if _grad_enabled():
            with self.lock:
                self.active.training += 1
                entry[3] = 1
        return entry

    def exit_root(self, entry: list) -> None:
        stack = self.local.__dict__.get("stack")
        if stack and any(e is entry for e in stack):
            if entry[3]:
                with self.lock:
                    self.active.training -= 1
                    entry[3] = 0
            stack[:] = [e for e in stack if e is not entry]

    def repin(self, plan: Any) -> None:
        """``activate(plan)`` in this thread during a pinned forward: the rest of it runs ``plan`` (not inside
        a use block opened during the forward: that block keeps its sub-model). Also leaves pins of this
        context's interrupted forwards, which would otherwise keep the old default in force."""
        if _compiling():
            return
        a = self.active
        here = sys._getframe(1)
        if a.uses.get():
            heal_pins(a, here)
        stack = self._stack(here)  # (records of this thread's interrupted forwards: gone too)
        if stack:
            top = next((e for e in reversed(stack) if e[0] is not None), None)
            uses = a.uses.get()
            if top is not None and uses and uses[-1] is top[0]:  # the pin is the innermost open block
                a.var.set(plan)
                top[2] = plan


def tree_links(root: nn.Module, paths: Iterable[str]) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """Every ``(parent, child name, child, child path)`` link on the paths from ``root`` to ``paths``, each once,
    a parent's before its children's."""
    seen: dict[tuple[int, str], tuple[nn.Module, str, nn.Module, str]] = {}
    for path in paths:
        parent, at = root, ""
        for name in path.split(".") if path else ():
            child = parent._modules[name]
            at = f"{at}.{name}" if at else name
            seen.setdefault((id(parent), name), (parent, name, child, at))
            parent = child
    return list(seen.values())


@dataclass
class Guards:
    """What a nest guards: the ``(parent, child name)`` links (name None: a Depth layer list), and every
    container on them with its child count, which ``insert`` / ``pop`` / ``del`` change without any
    registration hook seeing it (the root forward checks the counts, see :class:`Pin`)."""

    links: list[tuple[nn.Module, str | None]] = field(default_factory=list)
    counts: list[tuple[nn.Module, int, str]] = field(default_factory=list)

    def check_counts(self) -> None:
        for i, (c, n, path) in enumerate(self.counts):
            if len(c._modules) != n:
                if not _links_hold(c):
                    raise SortedNetError(
                        f"{path or '<root>'!r} holds {len(c._modules)} modules, {n} when wrapped: a module was "
                        "inserted or removed after wrap (insert / pop / del), so sliced modules moved to other paths "
                        "and a module that was never wrapped may run unsliced. nest.unwrap(), change the model, "
                        "then wrap it again")
                self.counts[i] = (c, len(c._modules), path)  # (one appended or removed elsewhere: nothing moved)


def _links_hold(c: nn.Module) -> bool:
    """Whether every guarded child of the container ``c`` is still where it was wrapped, holding the sliced
    modules below it (a Depth layer list's blocks count: never)."""
    names = _GUARDED.get(c) or {}
    if None in names:
        return False
    return all(_at(c._modules.get(name), rel) is m() for name, g in names.items() for rel, m in g.below)


@dataclass(frozen=True)
class _Guard:
    path: str                               # the guarded child's path (a layer list's own path for its key None)
    below: tuple[tuple[str, Any], ...]      # weakly, the sliced modules at or below it, by path relative to it
    guards_ref: Any                         # weakly, the nest's Guards (a re-made container's links join them):
    # _GUARDED's values hold nothing strongly that leads back to its keys (a sliced module leads to the nest,
    # the nest to the model): a model dropped without unwrap() would never be freed


#: parent module -> {child name (None: any name, a Depth layer list) -> _Guard}: the links from a nest's root
#: to its sliced modules, and its layer lists, as wrapped. A module registration hook refuses an assignment
#: that would change one of them before it lands.
_GUARDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HOOK: list = []


def _at(m: nn.Module | None, rel: str) -> Any:
    for name in rel.split(".") if rel else ():
        if m is None:
            return None
        m = m._modules.get(name)
        if m is None:
            return None
    return m


def _registration_guard(parent: nn.Module, name: str, value: Any, deleting: bool = False,
                        dry: bool = False) -> None:
    """Global module registration hook (``setattr`` / ``add_module`` of a child): refuses changing a guarded
    link or a block of a Depth layer list (also of a deep copy of a wrapped model, which follows the nest);
    a container re-made around the same sliced modules (at the same paths) is accepted and guarded. Costs
    one weak-dict lookup per module registration in the process. Not traced by Dynamo (a module assigned in
    a compiled forward: guards on the weak dict's changing keys would fail to build)."""
    if _compiling():
        return None
    names = _GUARDED.get(parent)
    st = parent.__dict__.get("_sn")
    depth = st is not None and "depth" in st.bind
    if names is None and not depth:
        return _copy_link(parent, name, value, deleting)
    g = None if names is None else names.get(name)
    if g is None and not depth or parent._modules.get(name, ()) is value:  # not guarded, or the same module
        return None
    below = None if g is None else tuple((rel, m()) for rel, m in g.below)
    if g is not None and value is not None and all(_at(value, rel) is m for rel, m in below):
        guards = g.guards_ref()
        if guards is not None and not dry:  # (dry: a check before a change of several children, nothing guarded)
            _guard(value, g.path, below, guards)
        return None
    lists = st.path if depth else ""
    where = g.path if g is not None else f"{lists}.{name}" if lists else name
    why = None
    if isinstance(value, nn.SyncBatchNorm) and not depth:  # (torch's convert_sync_batchnorm, child by child)
        why = ("a sliced BatchNorm cannot become an nn.SyncBatchNorm (its synchronised forward is its own). "
               "nn.SyncBatchNorm.convert_sync_batchnorm converts child by child: BatchNorms it reached before this "
               "one (unsliced) are converted already and stay so; leave the model unconverted (DDP broadcasts "
               "BatchNorm statistics from rank 0, docs/scaling.md), or convert only modules no dimension slices")
    elif below and isinstance(value, nn.Module) and not depth:  # (an adapter around the sliced module: PEFT-style)
        inside = {id(m): rel for rel, m in value.named_modules()}
        held = [(rel, inside[id(m)]) for rel, m in below if m is not None and id(m) in inside]
        if held:
            rel, at = held[0]
            sliced = f"{where}.{rel}" if rel else where
            why = (f"the new {type(value).__name__} holds the sliced {sliced!r} (as {at!r}), but what it adds around "
                   "it is not sliced: its own parameters would run at full size under every sub-model. Adapters "
                   "that are cut with the model: sn.Rank(..., mode='lora') (docs/rank.md); else add them before "
                   "wrapping and bind their layers to the dimensions")
    refuse_tree_change(lists if depth else where, f"deleting {where!r}" if deleting else
                       f"setting {where!r} to {'None' if value is None else 'a new ' + type(value).__name__}", depth,
                       why)


def _copy_link(parent: nn.Module, name: str, value: Any, deleting: bool = False) -> None:
    """A link no nest guards. Inside a deep copy of a wrapped model (an EMA or teacher copy, which follows the
    live nest), replacing a child on the path to a copied sliced module is refused as on the wrapped model: the
    new module would run unsliced under every sub-model. Such a link is recognised by the sliced module's path
    in the wrapped model ending with this link's (``blocks.0`` + ``0`` for ``blocks.0.0``) and by ``parent``
    holding copies of every sliced module the wrapped model holds below that place, at the same places. A
    module holding a whole model or copy (a user's wrapper, an EMA holder), a model assembled from some copied
    parts, and copies of a nest no longer live (they run the full model) are left alone, as is a new child
    that holds the same sliced modules at the same places."""
    old = parent._modules.get(name)
    if old is None or old is value:
        return None
    hits, where = [], None
    for rel, m in old.named_modules():
        st = m.__dict__.get("_sn")
        owner = None if st is None else getattr(st.active, "owner", None)
        nest = None if owner is None else owner()
        if nest is None or nest._sliced.get(st.path) is m:  # (a copy of an unwrapped nest, or the nest's own module)
            continue
        tail = f"{name}.{rel}" if rel else name
        if st.path == tail or st.path.endswith("." + tail):
            hits.append((rel, m))
            where = where or (nest, st.path[:len(st.path) - len(tail)].rstrip("."))
    if not hits or value is not None and all(_at(value, rel) is m for rel, m in hits):
        return None
    nest, above = where
    for path in nest._sliced:  # a copy holds every sliced module below its place, each where the original has it
        if above and not path.startswith(above + "."):
            continue
        m = _at(parent, path[len(above) + 1:] if above else path)
        st = None if m is None else m.__dict__.get("_sn")
        if st is None or st.path != path or st.active is not nest._state:
            return None
    held = hits[0][1].__dict__["_sn"].path
    refuse_tree_change(name, f"deleting {name!r} of a copy of a wrapped model (it holds the sliced {held!r})"
                       if deleting else f"setting {name!r} of a copy of a wrapped model (it holds the sliced "
                       f"{held!r}) to {'None' if value is None else 'a new ' + type(value).__name__}", False)


def _guard(root: nn.Module, root_path: str, sliced: Iterable[tuple[str, nn.Module]], guards: Guards) -> None:
    sliced = tuple(sliced)
    containers = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
    for parent, name, _, path in tree_links(root, [rel for rel, _ in sliced]):
        full = f"{root_path}.{path}" if root_path and path else root_path or path
        below = tuple((rel[len(path) + 1:] if rel != path else "", weakref.ref(m)) for rel, m in sliced
                      if rel == path or rel.startswith(path + "."))
        _GUARDED.setdefault(parent, {})[name] = _Guard(full, below, weakref.ref(guards))
        guards.links.append((parent, name))
        if isinstance(parent, containers) and all(c is not parent for c, _, _ in guards.counts):
            guards.counts.append((parent, len(parent._modules), full.rpartition(".")[0]))


def _guard_delattr() -> None:
    """``del model.mlp`` (a child on the path to a sliced module, or a Depth list itself) fires no module
    registration hook: ``nn.Module.__delattr__`` (and ``nn.ModuleDict``'s ``__delitem__`` / ``pop`` / ``clear``,
    which write ``_modules`` directly) are wrapped, once per process, to ask the same guard first (one dict lookup
    per deleted child). Changes of several children ask it for every one before the first lands:
    ``ModuleDict.update`` and a slice deleted from an ``nn.Sequential`` / ``nn.ModuleList`` (torch deletes child
    by child)."""
    original = nn.Module.__delattr__
    if getattr(original, "_sn_guard", False):
        return

    @functools.wraps(original)
    def __delattr__(self: nn.Module, name: str) -> None:
        if name in self.__dict__.get("_modules", ()) and not _compiling():
            _registration_guard(self, name, None, deleting=True)
        original(self, name)

    __delattr__._sn_guard = True  # type: ignore[attr-defined]
    nn.Module.__delattr__ = __delattr__  # type: ignore[method-assign]
    delitem, clear = nn.ModuleDict.__delitem__, nn.ModuleDict.clear  # (they write _modules directly)

    @functools.wraps(delitem)
    def __delitem__(self: nn.ModuleDict, key: str) -> None:
        if key in self._modules and not _compiling():
            _registration_guard(self, key, None, deleting=True)
        delitem(self, key)

    @functools.wraps(clear)
    def clear_(self: nn.ModuleDict) -> None:
        if not _compiling():
            for key in self._modules:
                _registration_guard(self, key, None, deleting=True)
        clear(self)

    nn.ModuleDict.__delitem__, nn.ModuleDict.clear = __delitem__, clear_  # type: ignore[method-assign]
    update = nn.ModuleDict.update

    @functools.wraps(update)
    def update_(self: nn.ModuleDict, modules: Any) -> None:
        if not _compiling():  # every key checked before the first is set: a refusal changes nothing
            if not isinstance(modules, (Mapping, nn.ModuleDict)) and isinstance(modules, Iterable):
                modules = list(modules)  # (an iterator: read once, here)
            pairs = modules.items() if isinstance(modules, (Mapping, nn.ModuleDict)) else \
                [p for p in modules if isinstance(p, (tuple, list)) and len(p) == 2] if isinstance(modules, list) \
                else ()
            for key, value in pairs:
                if key in self._modules:
                    _registration_guard(self, key, value, dry=True)
        update(self, modules)

    nn.ModuleDict.update = update_  # type: ignore[method-assign]
    for cls in (nn.Sequential, nn.ModuleList):  # del seq[1:] deletes child by child: checked all first
        def make(delete: Any) -> Any:
            @functools.wraps(delete)
            def __delitem__(self: nn.Module, idx: Any) -> None:
                if not _compiling() and (self in _GUARDED or isinstance(idx, slice)):
                    keys = list(self._modules)  # (a slice: every key asked first, also in a deep copy's list)
                    if isinstance(idx, slice):
                        gone = keys[idx]
                    else:
                        try:
                            i = operator.index(idx)  # (numpy and torch integers too, as torch takes them)
                        except TypeError:
                            i = None
                        gone = [keys[i]] if i is not None and -len(keys) <= i < len(keys) else []
                    for key in gone:
                        _registration_guard(self, key, None, deleting=True, dry=True)
                    if gone and self in _GUARDED:  # torch re-keys the children left as 0..n-1 (named ones too)
                        left = [k for k in keys if k not in set(gone)]
                        _refuse_renumbering(self, [(k, str(i)) for i, k in enumerate(left)],
                                            f"deleting {gone[0]!r}" + (f" (and {len(gone) - 1} more)" if len(gone) > 1
                                                                       else ""))
                delete(self, idx)
            return __delitem__

        def make_insert(insert: Any, shifts_all: bool) -> Any:
            @functools.wraps(insert)
            def insert_(self: nn.Module, index: int, module: nn.Module) -> Any:
                if not _compiling() and self in _GUARDED:
                    keys = list(self._modules)
                    try:
                        at = operator.index(index)
                    except TypeError:
                        at = None
                    if at is not None and at < 0:  # (Sequential counts from the end; ModuleList's insert shifts
                        at = 0 if shifts_all else max(0, at + len(keys))  # every child before failing on it)
                    if at is not None:
                        _refuse_renumbering(self, [(k, str(i + 1) if i >= at else k) for i, k in enumerate(keys)],
                                            f"inserting a module at position {at}")
                return insert(self, index, module)  # (Sequential.insert returns the Sequential)
            return insert_

        cls.__delitem__ = make(cls.__delitem__)  # type: ignore[method-assign]
        cls.insert = make_insert(cls.insert, cls is nn.ModuleList)  # type: ignore[method-assign]


def _refuse_renumbering(c: nn.Module, rekeyed: list[tuple[str, str]], action: str) -> None:
    """Refuse ``action`` on the list ``c`` where it re-keys a guarded child (one holding a sliced module: under
    another key it is another path); ``rekeyed``: ``(key, key after the action)`` of the children it keeps."""
    names = _GUARDED.get(c) or {}
    if None in names:
        return  # (a Depth layer list: its own guard refuses any change)
    moved = [(k, new) for k, new in rekeyed if k in names and k != new]
    if moved:
        g = names[moved[0][0]]
        where = g.path.rpartition(".")[0]
        refuse_tree_change(g.path, f"{action} of {where or '<root>'!r} (it re-keys {g.path!r} as {moved[0][1]!r}: "
                           "another path)", False)


def guard_tree(root: nn.Module, sliced: dict[str, nn.Module], containers: dict[str, nn.Module]) -> Guards:
    """Guard the links from ``root`` to its ``sliced`` modules (path -> module) and the Depth layer lists
    ``containers`` (path -> list) against assignments; returns them for :func:`unguard_tree`."""
    if not _HOOK:
        _HOOK.append(nn.modules.module.register_module_module_registration_hook(_registration_guard))
        _guard_delattr()
    guards = Guards()
    _guard(root, "", sliced.items(), guards)
    for path, c in containers.items():
        _GUARDED.setdefault(c, {})[None] = _Guard(path, (), weakref.ref(guards))
        guards.links.append((c, None))
        if all(x is not c for x, _, _ in guards.counts):
            guards.counts.append((c, len(c._modules), path))
    return guards


def unguard_tree(guards: Guards | None) -> None:
    for parent, name in () if guards is None else guards.links:
        names = _GUARDED.get(parent)
        if names is not None:
            names.pop(name, None)
            if not names:
                del _GUARDED[parent]


def unwrap_modules(modules: Iterable[nn.Module], hooks: Iterable, *, merge: bool = False,
                   ranks: Mapping[str, int] | None = None, then: Sequence[Callable[[], Any]] = ()) -> None:
    """Restore the original classes of ``modules`` (a nest's own sliced modules, never another nest's).

    Two phases: every slicer first computes what its restore needs (``pre_restore``: merged
    rank weights, tensors converted to the model's current dtype / device), which may fail
    (out of memory, a meta tensor); only then is anything changed, by steps that cannot fail
    (reference swaps), each run even if one raises (:func:`finish_all`), ``then`` (the caller's own
    bookkeeping) last.
    With ``merge``, a module bound to a rank dimension named in ``ranks`` gets that rank as its
    ``merge`` (the largest its nest's sub-models use: a restricted nest never trained the rest).
    """
    modules = list(modules)
    parametrized = [m for m in modules if "_sn" in m.__dict__
                    and isinstance(m._modules.get("parametrizations"), nn.ModuleDict)]
    if parametrized:  # (register_parametrization after wrap swapped the class for one built on the sliced class:
        st = parametrized[0].__dict__["_sn"]  # restoring the original class would drop it and its tensors)
        names = list(parametrized[0]._modules["parametrizations"].keys())
        raise SortedNetError(
            f"unwrap: {st.path or type(parametrized[0]).__name__!r} was parametrized after wrap "
            f"(register_parametrization of {names}), which gave it a class of PyTorch's built on the sliced one; "
            "restoring its original class would drop the parametrization and the tensors it computes. Remove it "
            f"first (torch.nn.utils.parametrize.remove_parametrizations(module, {names[0]!r})), unwrap, then "
            "parametrize the unwrapped model. Nothing was changed")

    def merge_of(m: nn.Module) -> bool | int:
        b = m.__dict__["_sn"].bind.get("rank")
        return ranks.get(b.dim.name, merge) if merge and ranks and b is not None else merge

    frozen = any(t.is_inference() for m in modules for t in m.parameters(recurse=False))  # (built under
    with exact_math(leave_inference=not frozen):  # inference_mode: merged alike) (its own dtype under autocast)
        pending = [m.__dict__["_sn"].slicer.pre_restore(m, merge_of(m)) for m in modules]

    def restore(m: nn.Module, pre: Any) -> None:  # (idempotent: finish_all may run it again)
        st = m.__dict__.get("_sn")
        if st is None:
            return
        if pre is None:  # slicers written before pre_restore take (m, merge)
            st.slicer.restore(m, merge)
        else:
            st.slicer.restore(m, merge, pre)
        sliced = type(m)
        m.__class__ = st.cls
        del m.__dict__["_sn"]
        rebind_kept_forward(m, sliced)

    steps = [h.remove for h in hooks] + [functools.partial(restore, m, pre) for m, pre in zip(modules, pending)]
    finish_all(steps + list(then))



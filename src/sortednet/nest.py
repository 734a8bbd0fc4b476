"""Nest: the wrapped model plus its dimensions.

Lists sub-models sorted by cost, activates one (per context, thread or asyncio task, with ``use``;
nest-wide with ``activate``), counts costs, picks by budget, exports a
physically smaller plain model, and unwraps.
"""

from __future__ import annotations

import decimal
import functools
import gc
import math
import numbers
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from torch import nn

from . import slicers as _slicers
from ._tracing import compiling
from .cost import METRICS, ParamCounter, call_model, count_flops, example_signature, example_text, modules_digest
from .cost import sig_key as _sig_key
from .dims import Active, Dimension
from .errors import BudgetError, SortedNetError
from .errors import flag as _flag
from .export import (
    _kept_paths,
    aside_holders,
    aside_suspects,
    export_submodel,
    held_aside,
    held_unrebuilt,
    holders_state,
    refused_aside,
)
from .kvcache import fresh_caches, install_guards, refuse_cache_example
from .modes import casts_stale, dry_run, eval_mode
from .plan import CheckpointContext, Plans, Use, in_plan
from .profile import Profile, build_profile
from .select import Selector, budget
from .slicers import base as _base
from .submodel import MAX_SUBMODELS, SubModel, SubModelLike, SubModelList, as_int
from .views import REGISTRATIONS, count_registrations, is_fsdp, new_lock, storage_key, watch_fused_steps
from .wrap import (
    AttrKey,
    FactorsNotPretrained,
    Pin,
    SavePretrainedGuard,
    drop_hooks_since,
    entry_children,
    exportable,
    guard_tree,
    hook_keys,
    install,
    plan,
    split_ties,
    tree_links,
    unguard_tree,
    unwrap_modules,
    wrap_hooks,
)

__all__ = ["Nest", "wrap", "MAX_SUBMODELS"]

#: ``hook(nest, sub, exported) -> exported`` run by :meth:`Nest.export` (integrations register theirs:
#: sortednet.integrations gives transformers models a config that matches the exported shapes)
EXPORT_HOOKS: dict[str, Callable[..., nn.Module]] = {}
#: called when a model with a library config is exported and no hook is registered yet: each may import the
#: module that registers one (the package registers the import of ``sortednet.integrations``)
EXPORT_HOOK_LOADERS: list[Callable[[], None]] = []


def _said(v: Any, limit: int = 300) -> str:
    """``repr(v)`` for a message, cut to ``limit`` characters."""
    text = repr(v)
    return text if len(text) <= limit else f"{text[:limit]} ... ({len(text)} characters)"


def _profile_sig(prof: Profile) -> tuple:
    """The signature key of the example ``prof`` was measured on (one of its own when it records none)."""
    stored = prof.meta.get("input")  # the profile's example signature, as text
    return _sig_key(stored) if isinstance(stored, (list, tuple)) else ("profile", id(prof))


_LIVE: "weakref.WeakSet[Nest]" = weakref.WeakSet()  # nests not unwrapped yet


_OPTIMIZER_HOOK: list = []  # the process's optimizer step pre-hook, registered when a nest first has svd Rank targets


def _watch_optimizers() -> None:
    if not _OPTIMIZER_HOOK:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _OPTIMIZER_HOOK.append(register_optimizer_step_pre_hook(_stale_optimizer))


#: id -> (weak reference, "'path' (factors of Rank 'r')") of the factors / adapters an unwrap dropped: an optimizer
#: still holding one steps nothing of that layer (the weight it came back to is another tensor)
_DROPPED: dict[int, tuple[weakref.ref, str, str]] = {}


def _drop(t: torch.Tensor, where: str, who: str = "nest.unwrap()") -> None:
    key = id(t)
    _DROPPED[key] = (weakref.ref(t, lambda _, key=key: _DROPPED.pop(key, None)), where, who)


def _stale_optimizer(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Before any eager ``optimizer.step()`` while a nest with svd Rank targets is live: an optimizer built
    before ``sn.wrap`` holds a target's weight that svd replaced by factors (no longer in the model): its steps
    would train nothing of those layers, silently. Refused before the step changes anything. (A lora target
    keeps its weight, frozen: an optimizer holding it and no adapter may be an old one or one built for the
    rest of the model beside the adapters' own; that cannot be told apart, so it is not refused.)"""
    nests = [n for n in list(_LIVE) if n._alive and n._factored]
    if not (nests or _DROPPED) or compiling():
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    held = {id(p) for p in params}
    for n in nests:
        n._refuse_stale_optimizer(held)
    for p in params if _DROPPED else ():
        hit = _DROPPED.get(id(p))
        if hit is not None and hit[0]() is p:
            raise SortedNetError(
                f"optimizer.step(): this optimizer holds {hit[1]}, which {hit[2]} dropped (the layer's "
                "weight is a plain parameter again, merged or not): its steps would train nothing of that "
                "layer. Build a new optimizer over model.parameters() after unwrap")


def _refuse_inside_another(model: nn.Module) -> None:
    """A model inside (or equal to) a model another live nest wrapped: that nest's unwrap, export and
    checkpoints would take this nest's modules along. Wrap the whole model once, with every dimension."""
    for other in list(_LIVE):
        if not other._alive or other.model is model:  # the same model: plan() says it is already wrapped
            continue
        where = next((n for n, m in other.model.named_modules() if m is model), None)
        if where is not None:
            raise SortedNetError(f"{type(model).__name__} is {where!r} of a model another nest wraps ({other!r}); "
                                 "wrap the whole model once with every dimension, or call that nest's unwrap() first")


def _refuse_save_pretrained(cls: str, sub: str, *args: Any, **kwargs: Any) -> None:
    """``save_pretrained`` of a ``plain=True`` export of a smaller sub-model (set on the instance)."""
    raise SortedNetError(f"this {cls} is nest.export({sub!r}, plain=True): its config still describes the full "
                         "model, so save_pretrained would write a checkpoint that from_pretrained loads with other "
                         "shapes (or, with fewer layers, with the missing ones initialised at random); save it with "
                         "torch.save, or export without plain=True for a config cut to the sub-model")


def _refuse_inner_save_pretrained(cls: str, path: str, sub: str, plain: bool, *args: Any, **kwargs: Any) -> None:
    """``save_pretrained`` of a library model inside an export whose config still describes the full model."""
    fix = ("export without plain=True for configs cut to the sub-model" if plain else
           "for a checkpoint from_pretrained loads, nest that model itself (sn.from_transformers(model."
           f"{path}, ...), whose exports get a config cut to the sub-model)")
    raise SortedNetError(f"this {cls} is {path!r} of nest.export({sub!r}{', plain=True' if plain else ''}): its "
                         "tensors are cut to the sub-model but its config still describes the full model's, so "
                         "save_pretrained "
                         "would write a checkpoint that from_pretrained loads with other shapes (or, with fewer "
                         f"layers, with the missing ones initialised at random); save the export with torch.save, or "
                         f"{fix}. Nothing was written")


def _refuse_shared_with_another(model: nn.Module, planned: Mapping[str, Any]) -> None:
    """A module this nest would slice that is also part of a model another live nest wraps (two models sharing
    a block list, a layer): its sub-models would change that model's forward, exports and costs too, under
    that nest's full model. (The other way round, a module the other nest slices, is refused as wrapped.)"""
    mine = {id(entry[0]): path for path, entry in planned.items()}
    for other in list(_LIVE):
        if not other._alive or other.model is model:
            continue
        for where, m in other.model.named_modules():
            if id(m) in mine:
                raise SortedNetError(f"{mine[id(m)]!r} of this {type(model).__name__} is also {where!r} of the "
                                     f"model another nest wraps ({other!r}): slicing it here would change that "
                                     "model's forward, exports and costs as well; wrap one model holding both "
                                     "(every dimension in one nest), copy the shared module, or call that nest's "
                                     "unwrap() first")


def _use_not_traced() -> None:
    """Where Dynamo meets ``nest.use`` inside a compiled function: it cannot trace the context variable."""


_USE_REASON = ("sortednet: nest.use() sets a context variable, which Dynamo cannot trace; enter `with "
               "nest.use(sub):` outside the compiled function (the compiled model then has one graph per "
               "sub-model), or drop fullgraph=True to let Dynamo split the function there")


def _activate_not_traced() -> None:
    """Where Dynamo meets ``nest.activate`` inside a compiled function (its first plan of a sub-model copies a
    context, which Dynamo cannot trace: whether it traced depended on the nest's plan cache)."""


_ACTIVATE_REASON = ("sortednet: nest.activate() changes the nest-wide default sub-model, which a compiled graph "
                    "cannot hold; call it outside the compiled function (the compiled model then has one graph per "
                    "sub-model), or drop fullgraph=True to let Dynamo split the function there")
try:
    _use_not_traced = torch.compiler.disable(_use_not_traced, reason=_USE_REASON)
    _activate_not_traced = torch.compiler.disable(_activate_not_traced, reason=_ACTIVATE_REASON)
except TypeError:  # (torch < 2.8: no reason)
    _use_not_traced = torch.compiler.disable(_use_not_traced)
    _activate_not_traced = torch.compiler.disable(_activate_not_traced)


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
    submodels: SubModelList

    # -- construction ---------------------------------------------------------
    def __init__(self, model: nn.Module, *dims: Dimension, submodels: Iterable[SubModelLike] | None = None,
                 inplace_grad: bool = True, inplace_min_numel: int | None = None, example: Any = None) -> None:
        """Convert ``model`` in place; the same as :func:`sortednet.wrap` (see there for the options).

        Validates everything (patterns, sizes, sub-models) first, then installs the slicers; on any
        error the model is left exactly as it was.
        """
        _refuse_inside_another(model)
        planned = plan(model, dims)
        _refuse_shared_with_another(model, planned)
        self._prepare(model, dims, submodels)       # validates sub-models, still no mutation
        if inplace_min_numel is None:
            inplace_min_numel = _slicers.INPLACE_MIN_NUMEL
        if isinstance(inplace_min_numel, bool) or not isinstance(inplace_min_numel, int) or inplace_min_numel < 0:
            raise SortedNetError(f"inplace_min_numel must be an int >= 0, got {inplace_min_numel!r}")
        _flag("wrap", "inplace_grad", inplace_grad)
        inplace_grad = bool(inplace_grad)
        self._inplace_min_numel = inplace_min_numel
        hooks: list = []
        before = hook_keys(model)
        try:  # (install undoes itself when it fails; what stops this after it is undone here)
            install(model, planned, inplace_grad=inplace_grad, min_numel=inplace_min_numel, hooks=hooks,
                    before=before)
            self._start([m for m, _, _ in planned.values()])  # run-time state first: _attach counts under use()
            self._pin = pin = Pin(self._state, model)
            pin.note = weakref.WeakMethod(self._failure_note)
            hooks.append(model.register_forward_pre_hook(pin.pre))  # (each handle kept as soon as it is made)
            hooks.append(model.register_forward_hook(pin.post, always_call=True))
            for c in entry_children(model, planned):  # forwards entered below the root are pinned as well
                hooks.append(c.register_forward_pre_hook(pin.inner_pre))
                hooks.append(c.register_forward_hook(pin.inner_post, always_call=True))
            hooks += install_guards(model, self._state, self.dims)  # (Hugging Face) a cache another sub-model
            # filled is continued only where it is exact
            ranks = [d for d in self.dims if d.kind == "rank"]
            if ranks and callable(getattr(model, "save_pretrained", None)):
                names = ", ".join(f"Rank {d.name!r} (mode={d.mode!r})" for d in ranks)
                hooks.append(model.register_state_dict_pre_hook(FactorsNotPretrained(names)))
                if SavePretrainedGuard.applies(model):  # (transformers' own: it writes its config files first)
                    model.__dict__["save_pretrained"] = SavePretrainedGuard(model, names)  # refused before any file
                    hooks.append(AttrKey(model.__dict__, "save_pretrained"))
            from .check import slicer_value_self_check
            slicer_value_self_check(self, {path: m for path, (m, _, _) in planned.items()})
            self._attach(planned, hooks)
        except BaseException:
            self._stop()
            unwrap_modules([m for m, _, _ in planned.values() if "_sn" in m.__dict__], hooks)
            drop_hooks_since(model, before)
            raise
        _LIVE.add(self)
        if self._factored:
            _watch_optimizers()
        try:
            from .check import (
                attention_self_check,
                guard_written_copies,
                norm_self_check,
                slicer_grad_self_check,
                warn_blocks_held_outside,
            )
            warn_blocks_held_outside(self)
            guard_written_copies(self)  # a user's slicer's copies of tensors a write would reach refuse writes
            slicer_grad_self_check(self)  # a user's slicer must not cut a trained parameter off its gradient
            norm_self_check(self)  # a BatchNorm subclass with its own forward must read the sliced tensors
            if example is not None:
                self.check(example)
            else:  # hand-written attention that can run alone: its smaller head counts must be its first heads
                attention_self_check(self)
        except BaseException:
            self.unwrap()
            raise

    def _prepare(self, model: nn.Module, dims: Sequence[Dimension],
                 submodels: Iterable[SubModelLike] | None) -> None:
        """Validate the sub-model list (no mutation). The full product is kept implicit."""
        self.model, self.dims = model, tuple(dims)
        self._by_name = {d.name: d for d in self.dims}
        self._alive = True
        self.submodels = None  # type: ignore[assignment]  # set by _attach; no restriction to check before
        sizes = [d.sizes for d in self.dims]
        self._rows: np.ndarray | None = None      # listed sub-models (size indices); None: the full product
        self._restricted = submodels is not None
        if submodels is None:
            total = math.prod(len(s) for s in sizes)
            if total > MAX_SUBMODELS:
                raise SortedNetError(f"{total:,} sub-models ({' x '.join(str(len(s)) for s in sizes)} sizes) exceed "
                                     f"the limit of {MAX_SUBMODELS:,}; list the ones to keep with submodels=[...], "
                                     "e.g. every dimension at the same ratio: sn.by_ratio(dims, ratios) "
                                     "(many dimensions, as sn.discover finds in a CNN, multiply fast)")
            return
        if isinstance(submodels, (str, bytes, Mapping, torch.Tensor)) or not isinstance(submodels, Iterable):
            raise SortedNetError(f"submodels= takes a list of sub-models, got {type(submodels).__name__} "
                                 f"{submodels!r}; wrap it in a list")
        pos = [{v: i for i, v in enumerate(s)} for s in sizes]
        rows: set[tuple[int, ...]] = set()
        for s in submodels:
            if s is None:
                raise SortedNetError("submodels= lists None; give sub-models (SubModel, dict or 'name=size,...')")
            r = self.resolve(s)
            rows.add(tuple(p[r[d.name]] for p, d in zip(pos, self.dims)))
            if len(rows) > MAX_SUBMODELS:
                raise SortedNetError(f"submodels= lists more than {MAX_SUBMODELS:,} sub-models")
        if not rows:
            raise SortedNetError("submodels= is empty; give at least one sub-model or None for all")
        self._rows = np.array(sorted(rows), dtype=SubModelList.index_dtype(sizes)).reshape(len(rows), len(sizes))

    def _attach(self, planned: dict, hooks: list) -> None:
        self._sliced = {path: m for path, (m, _, _) in planned.items()}
        self._hooks = hooks
        self._depth = [m for m in self._sliced.values() if "depth" in m._sn.bind]
        self._factored = [(path, m) for path, m in self._sliced.items()  # svd Rank targets (held-aside weights)
                          if "rank" in m._sn.bind and m._sn.extra.get("weight") is not None]
        self._cost_cache: dict[str, dict[SubModel, float]] = {m: {} for m in METRICS}
        self._cost_lock = threading.Lock()
        self._read_marks = 0  # changes of what pick's table is built from (cost tables, a profile, svd Rank weights
        #                       seen read as a matrix): a table built over one is not kept
        self._count_tensors()
        self._flops_example: Any = None   # input signature of the FLOPs in _cost_cache["flops"]
        self._profile_flops: Any = None   # the profile's example signature when it holds FLOPs (pick's table)
        self._flops_complete: Any = None  # the FLOPs table last found to hold every listed sub-model
        self._profile: Profile | None = None
        self._profile_digest: str | None = None  # modules_digest of the tree the profile was measured on
        self._scored_on: Any = None      # the weights the profile's scores were measured on (_weights_key)
        self._checked = False            # nest.check passed (wrap(example=) runs it): see _failure_note
        self._checking = False           # nest.check is running: its own refusals say what is missing
        self._stale_warned: Any = None   # the weights a stale-scores warning was last given for
        self._score_slots: list | None = None  # the parameter and buffer slots _weights_key reads
        self._slots_at = -1                    # REGISTRATIONS when they were listed
        self._closure_seen = False             # an accumulate closure was seen running the model (train.py)
        self._calibrations = 0           # calibrate / drop_calibration calls (they change what eval computes)
        self._selector: Selector | None = None
        self._selector_reads: tuple | None = None  # (plain attributes the table passed sub-models over for, state)
        self._told_other_flops: set = set()  # input signatures OtherInputFlopsWarning was given for
        names, sizes = tuple(self._by_name), tuple(d.sizes for d in self.dims)
        rows = SubModelList.product(names, sizes).rows if self._rows is None else self._rows
        _base.NAMING_SLICER_ERRORS[0] += 1
        try:
            params = self._param_table(rows)
        finally:
            _base.NAMING_SLICER_ERRORS[0] -= 1
        order = np.argsort(params, kind="stable")  # rows are in size order: ties go to smaller sizes first
        self._params = params[order]
        self._params.setflags(write=False)
        self.submodels = SubModelList(names, sizes, rows[order])
        if self._rows is not None:  # counting built plans of unlisted sub-models: use() must not hit them
            self._plans.clear()
        for d in self.dims:
            d._nest = self
        self._structure = self._fingerprint()
        self._sliced_buffers = self._buffer_shapes()
        self._links = self._wrapped_links()
        self._guard()

    def _guard(self) -> None:
        """Refuse, from now on, assignments that would change the module tree under the nest (a sliced module
        or one above it replaced, a block added to a Depth layer list): the live sub-models would run another
        model silently (see :func:`~sortednet.wrap.guard_tree`)."""
        unguard_tree(getattr(self, "_guards", None))
        self._guards = guard_tree(
            self.model, self._sliced, {p: m for p, m in self._sliced.items() if "depth" in m._sn.bind})
        self._pin.guards = weakref.ref(self._guards)

    def _count_tensors(self) -> None:
        """(Re)build what counts parameters by object: the owner of each sliced tensor and the counter, then
        swap them in at once (another thread's cost() uses one counter with its own owners throughout)."""
        owners: dict[int, list[tuple[nn.Module, str]]] = {}  # every holder, in the model's order
        for m in self._sliced.values():
            for name in m._sn.slicer.attr_names(m, m._sn.bind):
                t = m._sn.slicer.tensor(m, name)
                if isinstance(t, torch.Tensor):
                    owners.setdefault(id(t), []).append((m, name))
        for m in self.model.modules():  # (a module no dimension slices that holds one too reads it whole)
            if "_sn" not in m.__dict__:
                for name, t in m._parameters.items():
                    if t is not None and id(t) in owners:
                        owners[id(t)].append((m, name))
        ids = self._tensor_ids()
        old_dtypes = [d for _, d in getattr(self, "_tensors", ())]
        self._tensor_owner = owners
        counter = ParamCounter(self, owners)
        with self._cost_lock:
            self._param_counter, self._cost_cache["params"], self._tensors = counter, {}, ids
            self._selector, self._read_marks = None, self._read_marks + 1
        if old_dtypes and old_dtypes != [d for _, d in ids]:  # latency and memory were measured at the old dtypes
            self._drop_measured(("memory", "latency"), "the model's parameter dtypes changed", 5)
            self._scores_of_other_weights()  # (and the scores on other values: `.to()` moves no version counter)

    def _drop_measured(self, metrics: tuple[str, ...], why: str, stacklevel: int, warn: bool = True) -> None:
        """Forget ``metrics`` (cached and in the profile, with a warning when the profile had them): ``why``
        (after nest.profile) made them describe another model."""
        prof = getattr(self, "_profile", None)
        stale = [m for m in metrics if prof is not None and m in prof.costs]
        with self._cost_lock:
            for m in metrics:
                self._cost_cache[m] = {}
            if "flops" in metrics:
                self._flops_example = None
            self._selector, self._read_marks = None, self._read_marks + 1
        if stale:
            import dataclasses
            import warnings

            scored, told = self._scored_on, self._stale_warned  # (the scores describe what they described)
            self._set_profile(dataclasses.replace(prof, costs={k: v for k, v in prof.costs.items() if k not in stale}))
            self._scored_on, self._stale_warned = scored, told
            if warn:  # (sn.load warns before it changes anything: a warning filter set to error refuses the load)
                warnings.warn(f"{why} after nest.profile: its measured {stale} no longer apply and were dropped; "
                              "measure them again with nest.profile(example)", stacklevel=stacklevel)

    def _tensor_ids(self) -> tuple:
        return tuple((id(p), p.dtype) for p in self.model.parameters())

    def _fingerprint(self) -> tuple:
        """The model as the cost tables and export rely on: its parameters (names, shapes and which names
        hold one tensor: ties; values may change while wrapped, this may not) and its modules (path and object:
        one added, removed or replaced without parameters, e.g. an activation appended to a Sequential, changes
        the forward that FLOPs, latency and memory were measured on). One walk of the tree."""
        first: dict[int, int] = {}
        params: list[tuple] = []
        paths: list[tuple[str, int]] = []
        tensors: list[tuple[int, torch.dtype]] = []  # _tensor_ids() of the same walk (a second walk doubled a pick)
        for path, m in self.model.named_modules(remove_duplicate=False):
            paths.append((path, id(m)))
            for n, p in m._parameters.items():
                if p is not None:
                    if id(p) not in first:
                        tensors.append((id(p), p.dtype))
                    params.append((f"{path}.{n}" if path else n, tuple(p.shape), first.setdefault(id(p), len(params))))
        return tuple(params), tuple(paths), tuple(tensors)

    def _buffer_shapes(self) -> tuple:
        """Shapes of the sliced buffers (BatchNorm running statistics, ...): as the slicers read them."""
        return tuple((f"{path}.{n}" if path else n, None if (b := m._buffers[n]) is None else tuple(b.shape))
                     for path, m in self._sliced.items() for n in sorted(getattr(type(m), "_sn_names", ()))
                     if n in m._buffers)

    def _wrapped_links(self) -> list[tuple[nn.Module, str, nn.Module]]:
        """Every ``(parent, child name, child)`` link on the paths from the root to the sliced modules, as
        wrapped (taken at wrap time): checking that each still holds is a dict lookup per link."""
        return [(parent, name, child) for parent, name, child, _ in tree_links(self.model, self._sliced)]

    def _check_structure(self, what: str) -> None:
        """Refuse ``what`` (cost, pick, export, save...) on a model whose module tree changed after wrap:
        a sliced module moved or replaced, a module added or removed, a parameter re-shaped, tied or untied.
        The nest's tables and paths describe the model as wrapped; going on would answer for another model."""
        self._check_alive()
        guards = getattr(self, "_guards", None)
        if guards is not None:  # (a block put in a Depth list through _modules, insert / pop / del: as a forward
            try:                # refuses it, whatever parameters it holds)
                guards.check_counts()
            except SortedNetError as e:
                raise SortedNetError(f"{what}: the model changed after wrap: {e}") from None
        why = None
        if not all(parent._modules.get(name) is child for parent, name, child in self._links):
            paths = {id(m): path for path, m in self._sliced.items()}
            for path, m in self._sliced.items():
                try:
                    now = self.model.get_submodule(path) if path else self.model
                except AttributeError:
                    now = None
                if now is not m:
                    now_s = ("nothing" if now is None else f"the module wrapped at {paths[id(now)]!r}"
                             if id(now) in paths else f"a {type(now).__name__}")
                    why = f"{path!r} is no longer the module sortednet wrapped there (now: {now_s})"
                    break
            if why is None:  # every path still leads to its module (a container re-made around them): fine
                self._links = self._wrapped_links()
                self._guard()
        if why is None:  # an instance attribute of a child's name wins over the child (object.__setattr__)
            shadow = next((n for p, n, _ in self._links if n in p.__dict__), None)
            if shadow is not None:
                why = f"the child {shadow!r} is hidden by an instance attribute of that name"
        if why is None:
            new = self._fingerprint()
            if new[0] != self._structure[0]:
                old_d = {n: (shape, tie) for n, shape, tie in self._structure[0]}
                new_d = {n: (shape, tie) for n, shape, tie in new[0]}
                added = [n for n in new_d if n not in old_d]
                gone = [n for n in old_d if n not in new_d]
                changed = [n for n in new_d if n in old_d and new_d[n][0] != old_d[n][0]]
                if added or gone or changed:
                    why = "; ".join(f"{k} {v[:3]}" + (" ..." if len(v) > 3 else "") for k, v in
                                    (("parameters added:", added), ("parameters removed:", gone),
                                     ("parameters re-shaped:", changed)) if v)
                else:
                    why = "parameters were tied or untied (a tensor now held under other names)"
                    if is_fsdp(self.model):  # (fully_shard of units that split a tie gives each its own tensor)
                        old = self._structure[0]
                        was = [f"{old[tie][0]} / {n}" for i, (n, _, tie) in enumerate(old) if tie != i]
                        raise SortedNetError(
                            f"{what}: tied parameters of the wrapped model are apart now"
                            f"{f' ({was[:3]})' if was else ''}"
                            ": fully_shard gave each FSDP2 unit its own copy of a tensor two units held (a tie across"
                            " units), so they no longer train as one. Keep tied modules in one unit: shard their "
                            "common parent (or the root only), not each block apart")
        if why is None and (bufs := self._buffer_shapes()) != self._sliced_buffers:
            was = dict(self._sliced_buffers)
            changed = [f"{n} {was.get(n)} -> {shape}" for n, shape in bufs if was.get(n) != shape]
            why = f"sliced buffers re-shaped: {changed[:3]}" + (" ..." if len(changed) > 3 else "")
        if why is not None:
            raise SortedNetError(f"{what}: the model changed after wrap: {why}. The nest's cost tables, paths and "
                                 "export describe the model as wrapped; nest.unwrap(), change the model, then "
                                 "wrap it again")
        if new[1] != self._structure[1]:  # modules without parameters added, removed or replaced: the forward
            self._structure = new          # may differ from the one counted and timed (FLOPs count again)
            self._drop_measured(("flops", "latency", "memory"), "modules of the model were added, removed or "
                                "replaced", 4)
            self._scores_of_other_weights("modules were added, removed or replaced since: another forward")
        if new[2] != self._tensors:  # the same names and shapes in new objects or dtypes
            self._count_tensors()  # (load_state_dict(assign=True), fully_shard, .to() that replaces them)

    def _param_table(self, rows: np.ndarray) -> np.ndarray:
        """Exact parameter count of every row of size indices, vectorised.

        Each group of parameters of :class:`ParamCounter` depends on a few
        dimensions only; its count is taken once per size combination of those
        dimensions (present in ``rows``) and gathered for all rows at once.
        """
        counter = self._param_counter
        total = np.full(len(rows), counter.fixed, dtype=np.int64)
        col = {d.name: i for i, d in enumerate(self.dims)}
        for key, params in counter.groups.items():
            cols = [col[n] for n in key]
            counts = [len(self.dims[c].sizes) for c in cols]
            flat = np.zeros(len(rows), dtype=np.int64)
            for c, n in zip(cols, counts):
                flat = flat * n + rows[:, c]
            grid = math.prod(counts)
            combos, inverse = (np.arange(grid), flat) if grid <= 4 * len(rows) else \
                np.unique(flat, return_inverse=True)
            table = np.empty(len(combos), dtype=np.int64)
            for j, code in enumerate(combos.tolist()):
                ix = []
                for n in reversed(counts):
                    code, r = divmod(code, n)
                    ix.append(r)
                sizes = {k: self.dims[c].sizes[i] for k, c, i in zip(key, cols, reversed(ix))}
                table[j] = counter._count(params, sizes)
            total += table[inverse]
        return total

    # -- sub-models ------------------------------------------------------------
    @property
    def largest(self) -> SubModel:
        """The most expensive listed sub-model: the full model, unless a restricted nest
        (``wrap(..., submodels=[...])``) leaves it out."""
        return self.submodels[-1]

    @property
    def smallest(self) -> SubModel:
        return self.submodels[0]

    def resolve(self, sub: SubModelLike | None, *, full_ok: bool = False) -> SubModel:
        """A full :class:`SubModel` from a SubModel, dict or ``"ffn=512,depth=4"``.

        Dimensions left out take their largest size. ``full_ok``: a restricted nest takes the full model too
        (the model as it was: what it runs outside ``use``), also where its list leaves it out.
        """
        given = sub
        if sub is None:  # (the active one; a restricted nest's default, the full model, is not listed)
            sub = self.active
            if self._rows is None or full_ok:
                return sub
        if isinstance(sub, SubModel) and self.submodels is not None:
            i = self.submodels.position(sub)
            if i is not None:  # a listed sub-model: returned with the nest's dimension order
                return sub if tuple(sub) == self.submodels.names else self.submodels[i]
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
            n = as_int(s)  # (a tensor is compared by its value, never by its own ==)
            if n is None or n not in d.sizes:
                kind = "" if n is not None or isinstance(s, str) else (
                    f" (a {type(s).__name__}: sizes here are integers, the counts themselves; fractions of the full "
                    "size are taken only when a nest is built, by sn.from_transformers)" if isinstance(s, float) else
                    f" (a {type(s).__name__}: sizes are integers)")
                raise SortedNetError(f"{d.kind} {name!r} has no size {s!r}{kind}; sizes are {list(d.sizes)}")
            sizes[name] = n
        out = SubModel(sizes)
        if (self._rows is not None and self.submodels is not None and self.submodels.position(out) is None
                and not (full_ok and all(out[d.name] == d.full for d in self.dims))):
            listed = self.submodels
            some = ", ".join(str(s) for s in (*listed[:3], *([listed[-1]] if len(listed) > 3 else [])))
            raise SortedNetError(f"{out} is not one of the {len(listed)} sub-models this nest was restricted to "
                                 f"(wrap(..., submodels=[...])), e.g. {some}; see nest.submodels" + (
                                     " (no sub-model was given: the one in force is the full model, which runs "
                                     "outside use; name a listed one, or use / activate it)" if given is None
                                     else ""))
        return out

    # -- the active sub-model (run-time state: sortednet.dims.Active, sortednet.plan) --------------
    def _start(self, modules: list[nn.Module]) -> None:
        """Create the run-time state (called by ``wrap`` before ``_attach``, which counts
        parameters under ``use``): modules get their plan slots, dimensions the state."""
        self._plans = Plans(modules)
        self._state = Active(self._plans.build(SubModel({d.name: d.full for d in self.dims})))
        self._state.owner = weakref.ref(self)
        self._plans.active = self._state
        lock = new_lock()  # one per nest: tied parameters are written through several modules
        for slot, m in enumerate(modules):
            st = m.__dict__["_sn"]
            st.slot, st.active, st.lock = slot, self._state, lock
        for d in self.dims:
            d._active = self._state
        self._state.default = self._plans.get(self._state.default.sub)

    def _stop(self) -> None:
        for d in self.dims:
            d._active = None
        if "_plans" in self.__dict__:
            self._plans.clear()

    def _plan(self, sub: SubModelLike | None) -> Any:
        """The plan of ``sub``: one dict lookup for a SubModel or string seen before."""
        plan = self._plans.hit(sub)
        if plan is None:
            self._check_alive()
            plan = self._plans.get(self.resolve(sub, full_ok=True))  # (the default of a restricted nest too)
            if isinstance(sub, str):
                self._plans.alias(sub, plan)
        return plan

    @property
    def active(self) -> SubModel:
        """The sub-model in force for the caller: its innermost ``use`` block, else the default."""
        return self._state.plan().sub

    def use(self, sub: SubModelLike) -> AbstractContextManager[SubModel]:
        """Run ``sub`` inside the block; the previous one is restored on exit, also
        when the body raises. Copies no tensor.

        The sub-model belongs to the calling *context*: this thread, or this asyncio
        task (tasks interleaving ``use`` blocks on one thread each see their own).
        Code that runs elsewhere sees the nest-wide default (:meth:`activate`)
        unless it is given the context: ``contextvars.copy_context().run(fn)`` in a
        new thread, ``loop.run_in_executor(None, ctx.run, fn)`` for an executor
        (``asyncio.to_thread`` copies it itself). A plain ``threading.Thread``
        started inside the block runs the default. For activation checkpointing
        see :meth:`checkpoint`.

        >>> import torch, torch.nn as nn, sortednet as sn
        >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
        >>> with nest.use({"h": 2}):
        ...     nest.model[0].weight.shape
        torch.Size([2, 4])
        >>> import contextvars, threading
        >>> seen = []
        >>> with nest.use("h=2"):
        ...     ctx = contextvars.copy_context()
        ...     t1 = threading.Thread(target=ctx.run, args=(lambda: seen.append(str(nest.active)),))
        ...     t2 = threading.Thread(target=lambda: seen.append(str(nest.active)))
        ...     _ = t1.start(), t1.join(), t2.start(), t2.join()
        >>> seen
        ['h=2', 'h=8']
        """
        if compiling():
            _use_not_traced()  # (Dynamo: a graph break here, or fullgraph=True's error with the reason)
        return Use(self._state, self._plan(sub))

    def activate(self, sub: SubModelLike) -> SubModel:
        """Make ``sub`` the nest-wide default (callers outside ``use`` see it).
        Atomic: a concurrent forward of the model sees the old or the new sub-model, never a mix (a forward of
        the model's root is pinned to the default it starts with; a part of the model called on its own outside
        ``use`` is not: docs/deployment.md)."""
        if compiling():
            _activate_not_traced()  # (Dynamo: a graph break here, or fullgraph=True's error with the reason)
        plan = self._plan(sub)
        self._check_alive()
        self._state.default = plan
        self._pin.repin(plan)  # a forward of this thread in progress runs it from here on, as without the pin
        return plan.sub

    def checkpoint(self, fn: Callable[..., Any], *args: Any, use_reentrant: bool = False, **kwargs: Any) -> Any:
        """``torch.utils.checkpoint.checkpoint(fn, *args, ...)`` whose recomputation during
        backward runs the sub-model active now, whatever thread or context runs backward.

        >>> import torch, torch.nn as nn, sortednet as sn
        >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
        >>> with nest.use("h=2"):
        ...     y = nest.checkpoint(nest.model, torch.randn(3, 4, requires_grad=True))
        >>> y.sum().backward()                   # outside use(): recomputes h=2
        >>> nest.model[0].weight.grad[2:].abs().sum().item()
        0.0
        """
        from torch.utils.checkpoint import checkpoint

        if not callable(fn):
            raise SortedNetError(f"nest.checkpoint(fn, ...) needs a callable (a module or function), got {fn!r}")
        if not isinstance(use_reentrant, bool):  # (the string "False" is true: the reentrant variant, silently)
            raise SortedNetError(f"nest.checkpoint(use_reentrant={use_reentrant!r}): takes True or False")

        if compiling():  # traced, the recomputation is part of the graph, with the sliced
            # weights of the forward it was traced under: nothing to pin there (the pending entry of an eager
            # call, one per call, would fail Dynamo's guards at every call: nothing compiled, each call traced
            # again). Where Dynamo runs the checkpoint eagerly instead (a graph break inside fn), the function
            # runs pinned to the forward's plan, as eagerly
            eager = in_plan(self._state, self._state.plan(), fn)

            def run(*a: Any, **kw: Any) -> Any:
                return fn(*a, **kw) if compiling() else eager(*a, **kw)

            return checkpoint(run, *args, use_reentrant=use_reentrant, **kwargs)
        run = in_plan(self._state, self._state.plan(), fn, 2)
        return checkpoint(run, *args, use_reentrant=use_reentrant, **kwargs)

    def compile(self, **compile_kwargs: Any) -> Any:
        """The model compiled with the active sub-model's sliced parameters as graph inputs
        (:class:`~sortednet.compiled.Compiled`): compiled training adds each gradient into
        its slice of ``.grad`` as eager training does. ``compile_kwargs`` go to ``torch.compile``."""
        from .compiled import Compiled

        return Compiled(self, **compile_kwargs)

    @property
    def checkpoint_context(self) -> Callable[[], tuple[AbstractContextManager[Any], AbstractContextManager[Any]]]:
        """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False,
        context_fn=nest.checkpoint_context)``: the recomputation runs the sub-model active at forward. It
        holds the run-time state, not the nest: a model that stores it (Hugging Face gradient checkpointing)
        can still be deep-copied and exported."""
        return CheckpointContext(self._state)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.model(*args, **kwargs)
        except RuntimeError as e:
            if self._wiring_hint():  # a shape error that an incomplete dimension explains
                raise self._forward_error("forward", self.active, args, e) from e
            raise

    def _wiring_hint(self) -> str:
        """Dimensions that slice outputs but no inputs (a common wiring mistake), as advice."""
        out = []
        for d in self.dims:
            spec = d.spec()
            if spec.get("kind") == "width" and spec.get("out") and not spec.get("inp") and not spec.get("norm"):
                out.append(f"Width {d.name!r} slices the outputs of {spec['out']} but no layer's inputs: if those "
                           "outputs feed another layer, list it under inp= (nest.check(example) names it)")
        return "; ".join(out)

    def _forward_error(self, what: str, sub: SubModel, example: Any, e: BaseException) -> SortedNetError:
        hint = self._wiring_hint()
        return SortedNetError(f"{what}: sub-model {sub} failed on the example {example_text(example)}: "
                              f"{type(e).__name__}: {str(e)[:500]}" + (f". {hint}" if hint else ""))

    # -- costs and selection -------------------------------------------------
    def cost(self, sub: SubModelLike, metric: str = "params", *, example: Any = None) -> float:
        """Cost of ``sub``: ``"params"`` counts the parameters ``export(sub)`` holds (its slices and
        blocks, plus every parameter outside the nest's dimensions, used or not: a list of per-block norms
        walked in parallel with a Depth list is kept whole unless the Depth names it too); ``"flops"``
        counts one forward on ``example``
        (cached per sub-model; a new example shape recounts; without ``example``: the table ``pick`` reads,
        the profile's input while a profile measured FLOPs, else the input counted last); ``"latency"``
        (median seconds) and ``"memory"`` (bytes) are known after :meth:`profile`, measured on its input (they
        refuse ``example=``; ``"params"`` ignores it).

        >>> import torch, torch.nn as nn, sortednet as sn
        >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
        >>> nest.cost("h=2"), nest.cost("h=2", "flops", example=torch.randn(1, 4))
        (16, 24)
        """
        if not isinstance(metric, str):
            raise SortedNetError(f"cost: metric must be one of {list(METRICS)}, got {metric!r}")
        self._check_structure(f"cost(..., {metric!r})")
        sub = self.resolve(sub)
        cache = self._cost_cache.get(metric)
        if cache is None:
            raise SortedNetError(f"unknown cost metric {metric!r}; available: {list(METRICS)}")
        if metric == "flops" and example is not None:  # (one run, on a copy of a cache the example holds)
            return self._flops(sub, fresh_caches(example, "nest.cost(..., 'flops', example=)"))
        if example is not None and metric != "params":  # (params do not depend on the input)
            raise SortedNetError(f"cost(..., {metric!r}, example=...): {metric} is measured by nest.profile(example) "
                                 "on the profile's input, not on this one; example= counts FLOPs only. Profile on "
                                 f"this input (nest.profile(x, metrics=[{metric!r}])) and call cost without example=")
        if sub not in cache:
            if metric != "params":
                hint = ("count them on an input: nest.cost(sub, 'flops', example=x) (sn.wrap(..., example=x) only "
                        "checks the wiring), or nest.profile(x) for every sub-model") if metric == "flops" else \
                    "measure it with nest.profile(example)"
                raise SortedNetError(f"no {metric!r} cost for {sub} yet; {hint}")
            counter = self._param_counter
            n = counter(sub)
            with self._cost_lock:
                if self._param_counter is counter:  # not rebuilt meanwhile (parameters replaced): keep it
                    self._cost_cache["params"][sub] = n
            return n
        return cache[sub]

    def _flops(self, sub: SubModel, example: Any, *, model: nn.Module | None = None, store: bool = True,
               own_buffers: bool = False) -> int:
        """FLOPs of ``sub`` on ``example``, cached under the example's signature. Thread-safe: the
        table ``pick`` reads only ever holds counts of one signature (the latest asked for, or the
        profile's while a profile holds FLOPs)."""
        sig = _sig_key(example_signature(example))
        with self._cost_lock:
            hit = self._cost_cache["flops"].get(sub) if sig == self._flops_example and store else None
        if hit is None:  # (a profile counts afresh: a module setting changed in place since, a stride, is seen)
            try:
                hit = count_flops(self, sub, example, model=model, own_buffers=own_buffers)  # (outside the lock:
                #                                                                    other threads go on)
            except SortedNetError:
                raise
            except Exception as e:
                raise self._forward_error(f"cost({sub}, 'flops')", sub, example, e) from e
            if not store:  # a profile being built: its table is installed with it, or not at all
                return hit
            with self._cost_lock:
                if self._profile_flops is not None and sig != self._profile_flops:
                    # the profile's FLOPs table stays pick's: latency and memory were measured on its example,
                    # and sn.save stores it (a count on another example answers this call only)
                    told = self._told_other_flops
                    if sig not in told:  # (a pick(flops=) budget meant for this input would read the other table)
                        told.add(sig)
                        import warnings

                        prof = self._profile
                        warnings.warn(
                            f"cost(..., 'flops', example=...): this count, on {example_text(example)}, answers "
                            f"this call only; pick(flops=...) reads the profile's FLOPs table, counted on "
                            f"{None if prof is None else _said(prof.meta.get('input'))}. To pick by FLOPs of this "
                            "input, profile it: nest.profile(example)", OtherInputFlopsWarning, stacklevel=3)
                    return hit
                if sig != self._flops_example:
                    self._cost_cache["flops"] = {}  # a new table: a reader of the old one is not disturbed
                    self._flops_example = sig
                self._cost_cache["flops"][sub] = hit
                self._selector, self._read_marks = None, self._read_marks + 1
        return hit

    def profile(self, example_inputs: Any, *, score: Callable[[SubModel], float] | None = None,
                metrics: Sequence[str] = ("params", "flops", "latency", "memory"), repeat: int = 20,
                warmup: int = 3, progress: bool = True, on: str = "live") -> Profile:
        """Measure every sub-model on ``example_inputs`` (a tensor, tuple of args or dict
        of kwargs): params, FLOPs, latency (median of ``repeat`` after ``warmup``, on the
        inputs' device), memory, and ``score(sub)`` (called inside ``use(sub)``, e.g.
        validation accuracy; higher is better: pass a loss negated). Kept on the nest for
        :meth:`pick` and saved by ``sn.save``. Scores that fall almost always as sub-models grow
        (a loss passed as is) get a warning.
        ``on="live"`` (default) times the wrapped model under ``use(sub)``, as multi-budget serving runs it;
        ``on="export"`` times (and measures the memory of) each ``nest.export(sub)`` in turn, as deployed (one
        copy at a time; a sub-model that cannot be exported, which pick never returns, is measured live: such
        sub-models are listed in ``meta["not_exportable"]``, and the profile's front leaves them out). FLOPs and
        params always describe the export.
        Costs are measured in eval mode on a private view sharing the weights; no
        module's mode changes (other threads may be serving or training), so
        ``score`` runs your code on your model as it is: call ``model.eval()``
        first, or score with :func:`sortednet.train.evaluate`.

        >>> import torch, torch.nn as nn, sortednet as sn
        >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
        >>> prof = nest.profile(torch.randn(1, 4), repeat=2, progress=False)
        >>> prof.costs["flops"]
        (24.0, 96.0)
        """
        self._check_structure("profile")
        refuse_cache_example(example_inputs, "nest.profile")
        checked = None if score is None else _checked_score(score)  # (a score that is no callable: refused first)
        if is_fsdp(self.model):
            raise SortedNetError("nest.profile: the model is sharded with FSDP2 (fully_shard); profile runs private "
                                 "eval-mode copies of it, which sharded weights cannot give: profile before "
                                 "fully_shard, or in one process on a checkpoint (sortednet.distributed.save, then "
                                 "sn.load)")
        if any(t.is_meta for t in (*self.model.parameters(), *self.model.buffers())) and not any(
                "_hf_hook" in m.__dict__ for m in self.model.modules()):  # (accelerate loads offloaded ones in)
            raise SortedNetError("profile: the model is on the meta device, where forwards time and allocate "
                                 "nothing real; profile once the weights are materialised (FLOPs: "
                                 "nest.cost(sub, 'flops', example=x) counts them on meta)")
        # a dry forward of the extremes names the sub-model when the example does not fit; in eval mode
        # on a private view sharing the weights (model.eval() would change the mode for every thread), with copies
        # of the buffers (what this thread writes into the model's own through a hook is put back)
        with eval_mode(self, own_buffers=True) as (view, _), dry_run(self.model, buffers=False):
            for sub in dict.fromkeys((self.smallest, self.largest)):
                with self.use(sub), torch.no_grad():
                    try:
                        call_model(view, example_inputs)
                    except Exception as e:
                        raise self._forward_error("profile", sub, example_inputs, e) from e
        try:
            prof = build_profile(self, example_inputs, score=checked,
                                 metrics=metrics, repeat=repeat, warmup=warmup, progress=progress, on=on)
        except SortedNetError:
            raise
        except Exception as e:
            raise SortedNetError(f"profile on the example {example_text(example_inputs)} failed: "
                                 f"{type(e).__name__}: {str(e)[:500]}") from e
        self._set_profile(prof)
        self._profile_digest = modules_digest(self.model)  # (what sn.save records: the tree measured on, not
        _warn_if_loss_like(prof)                             # one changed since)
        return prof

    def _scores_fresh(self) -> bool:
        """Whether the profile's scores describe the weights as they are now."""
        prof = self.__dict__.get("_profile")
        on = self.__dict__.get("_scored_on")
        return prof is not None and prof.scores is not None and on is not None and on == self._weights_key()

    def _permuting(self, fresh: bool | None = None) -> tuple[int, dict[str, Any], bool]:
        """A sort is about to write permuted units: from now on deep copies of the model in the current order
        (EMA / teacher) and key/value caches filled in it are stale (refused at their next use) and the profile's
        scores are set aside (``pick`` does not rank by them), until :meth:`_drop_scores` permutes the copies
        alike, or :meth:`_unpermuted` says every unit is back. So a sort stopped anywhere (an error, a Ctrl-C)
        never leaves a copy silently in another order. Returns what :meth:`_unpermuted` needs. ``fresh``: whether
        the scores described the weights when the sort began (its dry-run check forwards, whose writes are put
        back, move the version counters of running statistics), else judged now."""
        if fresh is None:
            fresh = self._scores_fresh()
        with self._pin.lock:
            old = self._state.epoch
            self._state.epoch = old + 1
        kept = {k: self.__dict__.get(k) for k in ("_profile", "_selector", "_selector_reads", "_scored_on",
                                                  "_stale_warned")}
        prof = kept["_profile"]
        if prof is not None and prof.scores is not None:
            import dataclasses

            with self._cost_lock:
                self._profile, self._selector = dataclasses.replace(prof, scores=None), None
                self._read_marks += 1
        return old, kept, fresh

    def _unpermuted(self, token: tuple[int, dict[str, Any], bool]) -> None:
        """The sort begun by :meth:`_permuting` was undone (every unit back in place): copies and caches of that
        order are current again, and the profile is as it was (scores that described the weights then still
        do: the values are the same, though writing them back moved their version counters). Idempotent."""
        old, kept, fresh = token
        with self._pin.lock:
            self._state.epoch = old
        self.__dict__.update(kept)
        if fresh:
            self._scored_on = self._weights_key()

    def _drop_scores(self, why: str, orders: Iterable[torch.Tensor] = (),
                     follow: Callable[[nn.Module, set], None] | None = None,
                     token: tuple[int, dict[str, Any], bool] | None = None) -> None:
        """The units were permuted by ``orders`` (unit orders; all the identity: nothing moved, nothing to do)
        since :meth:`_permuting` gave ``token`` (None: call it now): the profile's scores no longer describe the
        weights (its costs stay), and a key/value cache filled before holds keys and values in the old order
        (refused from now on). Deep copies of the model (EMA / teacher) that were in the old order are permuted
        alike by ``follow(copy)``; one it cannot permute (its modules changed) is refused at its next forward
        (:meth:`sortednet.wrap.Pin.stale`)."""
        orders = list(orders)
        if token is None:
            token = self._permuting()
        old, kept, _ = token
        if all(torch.equal(o, torch.arange(o.shape[-1], device=o.device).expand_as(o)) for o in orders):
            self._unpermuted(token)
            return
        pin = self._pin
        with pin.lock:
            behind = [c for c, e in pin.copies.items() if e == old]
        prof = kept["_profile"]
        if prof is not None and prof.scores is not None:
            import dataclasses
            import warnings

            self._set_profile(dataclasses.replace(prof, scores=None))
            warnings.warn(f"{why}: the profile's scores were measured before and no longer apply; they were "
                          "dropped (its costs stay). Measure them again: nest.profile(example, score=...)",
                          stacklevel=3)
        # memory the model holds (permuted already, or not to be permuted): a copy's tensor that shares it is
        # left alone; what one copy permutes is added, so memory copies share is permuted once
        held = {k for t in [*self.model.parameters(), *self.model.buffers()]
                for u in (t, t.grad) if u is not None and (k := storage_key(u)) is not None}
        for c in behind if follow is not None else ():
            try:
                follow(c, held)
            except Exception:  # (nothing written: it stays in the old order, and is refused at its forward)
                continue
            with pin.lock:  # (each copy current once permuted; one not reached (a Ctrl-C) stays refused)
                if pin.copies.get(c) == old:
                    pin.copies[c] = self._state.epoch

    def _weights_key(self) -> Any:
        """What the model computes with: the tensor in every parameter and persistent buffer slot (object and
        version counter: an optimizer step, ``load_state_dict`` or any in-place write moves it) and the
        calibrations made. ``.data`` writes and inference tensors (no version counter) are not seen. The slots
        are listed again only after a module, parameter or buffer was registered anywhere (a global count):
        walking the module tree on every ``pick`` cost more than the pick."""
        watch_fused_steps()
        if self._score_slots is None or self._slots_at != REGISTRATIONS[0]:
            count_registrations()
            self._slots_at = REGISTRATIONS[0]
            self._score_slots = [(store, n) for m in self.model.modules()
                                 for store, skip in ((m._parameters, ()), (m._buffers, m._non_persistent_buffers_set))
                                 for n in store if n not in skip]  # (a non-persistent buffer caches derived values:
        key: list[Any] = [self._calibrations]                       # dynamic RoPE's inv_freq)
        for store, n in self._score_slots:
            t = store.get(n)
            try:
                key.append(None if t is None else (id(t), t._version))
            except RuntimeError:  # an inference tensor
                key.append((id(t), None))
        return tuple(key)

    def _set_profile(self, prof: Profile | None) -> None:
        try:
            self._install_profile(prof)
        finally:  # (a pick in another thread that built its table from the old costs meanwhile keeps it not)
            with self._cost_lock:
                self._selector, self._read_marks = None, self._read_marks + 1

    def _install_profile(self, prof: Profile | None) -> None:
        old, self._profile = getattr(self, "_profile", None), prof
        self._told_other_flops = set()  # (a new profile's table: another input may be warned about again)
        self._scored_on = self._stale_warned = self._score_slots = None
        self._profile_flops = None
        if old is not None:  # the new profile (or none: a checkpoint without one) replaces the old one's costs
            with self._cost_lock:  # (costs counted by cost(..., example=) stay unless the new profile has them)
                for metric in old.costs:
                    if metric != "params" and (prof is None or metric not in prof.costs):
                        self._cost_cache[metric] = {}
                        if metric == "flops":
                            self._flops_example = None
        if prof is None:
            self._profile_digest = None
            return
        if prof.scores is not None:
            self._scored_on = self._weights_key()
        for metric, values in prof.costs.items():
            if metric == "flops":  # measured on the profile's example, whose signature is not known here:
                with self._cost_lock:  # a new table that no cost(..., example=x) mistakes for its own
                    self._cost_cache["flops"] = {s: v for s, v in zip(prof.submodels, values)
                                                 if s in self.submodels}
                    self._flops_example = self._profile_flops = _profile_sig(prof)
            elif metric != "params":
                self._cost_cache[metric].update(
                    (s, v) for s, v in zip(prof.submodels, values) if s in self.submodels)

    def pick(self, *, params: float | None = None, flops: float | None = None, latency: float | None = None,
             memory: float | None = None, fraction: float | None = None) -> SubModel:
        """The best sub-model within every given budget, without search (see
        :mod:`sortednet.select`): with a profile holding scores, the best-scoring
        one; otherwise the one with most parameters. ``fraction`` limits params
        relative to the largest sub-model (``fraction * largest``, float rounding of the
        product forgiven: ``fraction=cost / largest`` picks a sub-model of that cost).
        Monotone; never over budget (costs and budgets compare as float64: above 2**53, two costs closer than
        their float spacing compare equal); a budget below every sub-model raises
        :class:`~sortednet.errors.BudgetError`.

        >>> import torch.nn as nn, sortednet as sn
        >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 4, 8], out="0", inp="1"))
        >>> nest.pick(params=40), nest.pick(fraction=1.0)
        (SubModel(h=4), SubModel(h=8))
        """
        self._check_structure("pick")
        limits = {m: budget(m, v) for m, v in (("params", params), ("flops", flops), ("latency", latency),
                                               ("memory", memory)) if v is not None}
        if fraction is not None:
            fraction = budget("fraction", fraction)
            if not 0 < fraction <= 1:
                raise SortedNetError(f"fraction must be in (0, 1], got {fraction}")
            # (a count, so the product is rounded up past float error, a few units in the last place:
            # fraction = cost / largest picks that cost, and never one a parameter over)
            share = fraction * self.cost(self.largest)
            limits["params"] = min(limits.get("params", float("inf")), math.floor(share * (1 + 2.0 ** -50)))
        measured = [m for m in ("latency", "memory") if m in limits]
        prof = self._profile
        if measured and prof is not None:  # timed on the profile's device: another one's would rank other costs
            where = torch.device(prof.device).type
            have = {p.device.type for p in self.model.parameters()}
            if have and where not in have:
                raise SortedNetError(
                    f"pick({measured[0]}=...): the profile measured {' and '.join(measured)} on {prof.device}, "
                    f"but the model's parameters are now on {', '.join(sorted(have))}: those costs do not "
                    "describe this device. Profile again there (nest.profile(example on that device)), or move the "
                    "model back")
        if "flops" in limits:
            if (measured and prof is not None and self._flops_example is not None
                    and self._flops_example != _profile_sig(prof)):  # (none counted: "no 'flops' cost" below)
                raise SortedNetError(
                    f"pick(flops=..., {measured[0]}=...): the FLOPs table was counted on another input than the "
                    f"profile's {measured[0]} (cost(..., 'flops', example=...) on {self._flops_example!r}, the "
                    f"profile on {_said(prof.meta.get('input'))}): the limits would describe two different inputs. "
                    "Profile that input (nest.profile(example)), or count FLOPs on the profile's example")
            have = self._cost_cache["flops"]
            # (a table only grows, and a new one is a new dict: one complete pass per table, not per pick)
            if 0 < len(have) and have is not self._flops_complete and not all(sub in have for sub in self.submodels):
                raise SortedNetError(
                    f"pick(flops=...): FLOPs are known for {sum(sub in have for sub in self.submodels)} of "
                    f"{len(self.submodels)} sub-models on the input signature counted last (the table holds one "
                    "input signature and starts anew when a count is made on another shape, or when modules of "
                    "the model were added, removed or replaced). Run nest.profile(example) again, or count every "
                    "sub-model on one example (cost(sub, 'flops', example=...))")
            if 0 < len(have):
                self._flops_complete = have
        if self._scored_on is not None:
            self._warn_if_scores_stale()
        if fraction is not None and limits["params"] < self._params.min() and \
                (params is None or limits["params"] < budget("params", params)):  # the fraction is the limit
            raise BudgetError(f"no sub-model fits fraction={fraction} of the largest sub-model's "
                              f"{self.cost(self.largest)} parameters (params <= {limits['params']}; the smallest "
                              f"available is {int(self._params.min())})")
        selector = self._select()
        try:
            return selector.pick(limits)
        except BudgetError as e:
            left = len(self.submodels) - len(selector.subs)
            if not left:
                raise
            raise BudgetError(f"{e}; {left} sub-model(s) passed over, as export refuses them: "
                              f"{self._unexportable_why()}") from e

    def _scores_of_other_weights(self, why: str | None = None) -> None:
        """The profile's scores were measured on weights the model does not hold as a whole (a checkpoint
        loaded with ``strict=False`` that left some weights as they were), or on another forward (``why``: a
        module without parameters swapped): the next pick warns."""
        if self._scored_on is not None:
            self._scored_on = ()  # (equals no state of the weights)
            self._stale_warned = None  # (a change the weights' key does not show: warned about as a change too)
            self._stale_why = why

    def _warn_if_scores_stale(self) -> None:
        """Warn (once per state of the weights) when the model changed since its profile's scores were measured:
        pick still ranks by them."""
        now = self._weights_key()
        if self._scored_on is None or now == self._scored_on or now == self._stale_warned:
            return
        self._stale_warned = now
        import warnings

        why = self.__dict__.get("_stale_why") if self._scored_on == () else None
        warnings.warn("nest.pick: the profile's scores were measured on "
                      + (f"another model ({why})" if why else "other weights (the model was trained, loaded or "
                         "calibrated since)")
                      + "; pick still ranks sub-models by them. Measure them again with "
                      "nest.profile(example, score=...), or drop them with nest.profile(example) (costs only)",
                      StaleScoresWarning, stacklevel=3)

    def _select(self) -> Selector:
        seen = self._selector_reads
        if self._selector is not None and seen is not None and holders_state(seen[0]) != seen[1]:
            self._selector = None  # (an attribute it passed sub-models over for changed: read it again)
        if self._selector is None:
            marks = self._read_marks
            subs, n = self.submodels, len(self.submodels)
            costs: dict[str, Any] = {"params": self._params}
            for m, c in self._cost_cache.items():
                if m != "params" and len(c) >= n and all(s in c for s in subs):
                    costs[m] = [c[s] for s in subs]
            prof = self._profile
            scores = None
            if prof is not None and prof.scores is not None and len(prof._pos) >= n and \
                    all(s in prof._pos for s in subs):
                scores = [prof.scores[prof._pos[s]] for s in subs]
            ok = self._exportable()
            if ok is not None:  # a tied tensor sliced differently by its holders: pick only what exports
                keep = [i for i, s in enumerate(subs) if ok(dict(s))]
                if not keep:
                    raise SortedNetError(f"pick: no sub-model of this nest can be exported: "
                                         f"{self._unexportable_why()}")
                subs = [subs[i] for i in keep]
                costs = {m: [c[i] for i in keep] for m, c in costs.items()}
                scores = None if scores is None else [scores[i] for i in keep]
            selector = Selector(subs, costs, scores)
            holders = None if ok is None else aside_holders(self, self._factorable())
            with self._cost_lock:  # (a weight read marked meanwhile by another thread: built again next time)
                if self._read_marks == marks:
                    self._selector = selector
                    self._selector_reads = None if not holders else (holders, holders_state(holders))
            return selector
        return self._selector

    def _exportable(self) -> Callable[[dict], bool] | None:
        """A test ``sizes -> bool``: does the sub-model export (every tied tensor cut alike by its holders, no
        svd Rank target it keeps exported as two Linears where a forward reads its weight as a matrix or a plain
        attribute holds it in a container export cannot rebuild, no sliced tensor or skipped block held in a
        plain attribute)? None when every sub-model does. ``pick`` passes over the others, and a profile's front
        leaves them out."""
        depth = any(d.kind == "depth" for d in self.dims)
        ties = exportable(self.model, {p: (m, m._sn.slicer, m._sn.bind) for p, m in self._sliced.items()},
                          self._running if depth else None)
        aside = aside_suspects(self)  # (a plain attribute holding a sliced tensor or a block: export may refuse)
        factored = self._factorable()
        kept_aside = held_unrebuilt(self.model, factored)  # (held where export cannot put the two Linears)
        read = [m for m in factored.values() if m._sn.extra.get("matrix_read") or id(m) in kept_aside]
        if not aside and not read:
            return ties

        def test(sizes: dict) -> bool:
            if (ties is not None and not ties(sizes)) or (aside and refused_aside(self, sizes)):
                return False
            with self.use(sizes):  # (export refuses a factored export of such a target: two Linears, no weight)
                live = {id(m): m for m in read if m._sn.slicer.factored(m)}
                if not live:
                    return True
                kept = None  # (a target, or a holder, in a block the depth skips is not exported)
                if depth:
                    kept = _kept_paths(self.model, {(id(m), name) for m in self._sliced.values()
                                                    for name in m._sn.slicer.skipped(m)})
                    live = {i: m for i, m in live.items() if i in kept}
                if any(m._sn.extra.get("matrix_read") for m in live.values()):
                    return False
                held = {i: m for i, m in live.items() if i in kept_aside}
                return not (held and held_unrebuilt(self.model, held, kept))

        return test

    def _factorable(self) -> dict[int, nn.Module]:
        """The svd Rank targets (by id) whose export may be two Linears in place of the module."""
        return {id(m): m for m in self._sliced.values() if "rank" in m._sn.bind and hasattr(m._sn.slicer, "factored")}

    def _unexportable_why(self) -> str:
        """Why ``pick`` has no sub-model left (every one is refused by ``export``)."""
        planned = {p: (m, m._sn.slicer, m._sn.bind) for p, m in self._sliced.items()}
        why = split_ties(self.model, planned)
        aside = held_aside(self)
        if aside:
            why = (f"{why}; " if why else "") + (
                f"{aside[:3]} hold tensors that sortednet slices in plain Python attributes (or objects they "
                "hold), which export refuses (build lists of parameters when you need them, from "
                "model.named_parameters())")
        read = [p for p, m in self._sliced.items() if m._sn.extra.get("matrix_read") and "rank" in m._sn.bind]
        if read:
            why = (f"{why}; " if why else "") + (
                f"a forward reads the weight matrix of the svd Rank targets {read[:3]}, which a factored export "
                "(two Linears) cannot hold: declare sn.Rank(..., export='merged') for them")
        held = held_unrebuilt(self.model, self._factorable())
        if held:
            why = (f"{why}; " if why else "") + (
                f"{sorted(set(held.values()))[:3]} hold svd Rank targets in containers a factored export (two "
                "Linears) cannot rebuild (a namedtuple, an OrderedDict, a list subclass, a deque, a namespace, "
                "more than six levels deep, or a method bound to one: self.run = self.fc.forward): hold them in a "
                "plain list, tuple, dict or set at most six levels deep, or as child modules, and call them")
        return why or ("a plain attribute holds blocks a depth skips, or modules of them, or holds the nest itself "
                       "(nest.export(sub) names it)")

    def _running(self, sizes: dict[str, int]) -> Callable[[str], bool]:
        """By a parameter's name (``path.param``): does its module run under the sub-model of ``sizes``, that is,
        is it reachable from the model without passing a block a Depth leaves out (as the export finds them)?"""
        with self.use(sizes):
            cut = {(id(m), name) for m in self._sliced.values() for name in m._sn.slicer.skipped(m)}
        kept = _kept_paths(self.model, cut)

        def alive(holder: str) -> bool:
            return id(self.model.get_submodule(holder.rpartition(".")[0])) in kept
        return alive

    def calibrate(self, loader: Iterable[Any], *, subs: Iterable[SubModelLike] | None = None,
                  batches: int | None = None) -> list[SubModel]:
        """Recompute BatchNorm running statistics for each of ``subs`` (default: all)
        from ``batches`` batches of ``loader`` (default: up to 10; a loader shorter than an explicit
        ``batches`` warns) and keep them per sub-model: in eval
        mode ``use(sub)`` and ``export(sub)`` then use that sub-model's own
        statistics. Saved and loaded with the checkpoint. See :mod:`sortednet.calibrate`.
        """
        from .calibrate import calibrate

        self._check_structure("calibrate")
        done = calibrate(self, loader, subs=subs, batches=batches)
        self._calibrations += 1  # (what eval computes changed: profile scores measured before are stale)
        return done

    def _calibrated(self) -> list[str]:
        """Paths of the sliced BatchNorms holding per-sub-model statistics of :meth:`calibrate`."""
        return [p for p, m in self._sliced.items() if m._sn.norm is not None and m._sn.norm.stats]

    def drop_calibration(self) -> None:
        """Forget the per-sub-model BatchNorm statistics of :meth:`calibrate` (or of a loaded checkpoint): eval mode
        reads the shared running statistics again, as before calibrating.

        >>> import torch, torch.nn as nn, sortednet as sn
        >>> m = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).eval()
        >>> nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", norm="1", inp="2"))
        >>> _ = nest.calibrate([torch.randn(16, 3)], batches=1)
        >>> nest.drop_calibration(); m[1].running_mean.equal(torch.zeros(8))
        True
        """
        from .calibrate import batchnorms

        self._check_alive()
        for m in batchnorms(self).values():
            if m._sn.norm is not None:
                m._sn.norm = None
                self._calibrations += 1

    # -- export / unwrap ------------------------------------------------------
    def export(self, sub: SubModelLike | None = None, *, plain: bool = False) -> nn.Module:
        """A plain, physically smaller copy of ``sub`` (default: the active one).

        Sliced weights are cloned contiguous; the original classes come back;
        skipped blocks are dropped. The nest is untouched and never aliased.
        Tensors the model shares (tied embeddings) stay shared, one tensor each;
        two users needing different slices of one tensor raise SortedNetError.
        A model with a library config (a transformers ``PreTrainedModel``) gets a
        config matching its shapes from the hooks in :data:`EXPORT_HOOKS`, or a
        SortedNetError when none can describe it; ``plain=True`` skips them
        (the copy then keeps the full model's config).
        """
        _flag("export", "plain", plain)
        self._check_structure("export")
        sub = self.resolve(sub)
        if is_fsdp(self.model):
            raise SortedNetError(f"export({sub}): the model is sharded with FSDP2 (fully_shard), which holds each "
                                 "weight in pieces over the ranks and cannot be copied; save a checkpoint with "
                                 "sortednet.distributed.save(nest, path) on every rank, then in one process "
                                 "sn.load it into a fresh model and export there")
        try:
            new = export_submodel(self, sub)
        except SortedNetError:  # (what it refuses may be new since pick's table was built: built again)
            with self._cost_lock:
                self._selector, self._read_marks = None, self._read_marks + 1
            raise
        held, counted = sum(p.numel() for p in new.parameters()), self.cost(sub)
        if held != counted:  # (a slicer of one's own whose numel() or export() is wrong: pick would choose by
            raise SortedNetError(  # wrong sizes and the export would not be the sub-model it counts)
                f"export({sub}) holds {held:,} parameters but cost({sub}) counts {counted:,}: a slicer's numel() "
                "disagrees with the tensors it serves, or its export() keeps others (nest.check(example) names "
                f"more); slicers: {sorted({type(m._sn.slicer).__name__ for m in self._sliced.values()})}")
        stale = getattr(new, "config", None) if hasattr(new, "save_pretrained") else None
        if plain:
            if stale is not None and self._shapes_differ(new):
                # its config describes the full model: a checkpoint of it would load other shapes, or (fewer
                # layers) load with the missing ones initialised at random
                new.__dict__["save_pretrained"] = functools.partial(_refuse_save_pretrained, type(new).__name__,
                                                                   str(sub))
            self._guard_inner_configs(new, sub, plain)
            return new
        if stale is not None and "transformers" not in EXPORT_HOOKS:
            for load in EXPORT_HOOK_LOADERS:  # a transformers model: its hook lives in sortednet.integrations
                load()
        for hook in EXPORT_HOOKS.values():
            new = hook(self, sub, new)
        if stale is not None and getattr(new, "config", None) is stale:  # no hook wrote a config for the shapes
            raise SortedNetError(f"export of a {type(new).__name__} needs its config updated to the sub-model's "
                                 "shapes, which sortednet can do only for transformers models (import "
                                 "sortednet.integrations first); pass plain=True for a plain module that keeps the "
                                 "full model's config")
        self._guard_inner_configs(new, sub, plain)
        return new

    def _guard_inner_configs(self, new: nn.Module, sub: SubModel, plain: bool) -> None:
        """Refuse ``save_pretrained`` of a library model inside export ``new`` (a ``plain=True`` export's inner
        ``.model``, a transformers model inside a module of the user's) whose config still describes the live
        model's (no export hook rewrote it) while its tensors are cut: a checkpoint of it would load other shapes,
        or with the dropped layers initialised at random."""
        for path, m in new.named_modules():
            if not path or "save_pretrained" in m.__dict__ or not callable(getattr(type(m), "save_pretrained", None)):
                continue
            to_dict = getattr(getattr(m, "config", None), "to_dict", None)
            try:
                live = self.model.get_submodule(path)
                same = callable(to_dict) and to_dict() == live.config.to_dict()
            except Exception:  # (no counterpart at that path, or a config of another kind: not judged)
                continue
            if same and self._shapes_differ(m, path):
                m.__dict__["save_pretrained"] = functools.partial(_refuse_inner_save_pretrained, type(m).__name__,
                                                                 path, str(sub), plain)

    def _shapes_differ(self, new: nn.Module, at: str = "") -> bool:
        """Whether export ``new`` (of the module at path ``at``) holds other tensors than the model's full state
        (a shape cut, a layer dropped), a Rank's factors / adapters aside (an export merges them into the weight
        they stand for)."""
        full = self.model.get_submodule(at).state_dict()
        mine = new.state_dict()
        inside = f"{at}." if at else ""
        paths = [p[len(inside):] if at else p for p, m in self._sliced.items()
                 if "rank" in m._sn.bind and (p.startswith(inside) or not at)]
        key = lambda p, n: f"{p}.{n}" if p else n  # noqa: E731
        rank = {key(p, n) for p in paths for n in ("U", "V", "lora_A", "lora_B")}
        # the model's own keys: a Rank target's weight (held as factors by svd) is merged back into it; an export
        # holding other keys (a factored layer as two Linear layers) is not what the model's config describes
        stock = {k for k in full if k not in rank} | {key(p, "weight") for p in paths}
        return (any(k in full and tuple(v.shape) != tuple(full[k].shape) for k, v in mine.items())
                or set(mine) != stock)

    def unwrap(self, *, merge: bool = False) -> nn.Module:
        """Restore the original classes and return the model (weights untouched).

        ``Rank`` targets get their original weight back and lose their factors /
        adapters; ``merge=True`` first bakes a rank into that weight (svd: ``U[:, :r] @ V[:r]``;
        lora: ``W0 + alpha / r * B[:, :r] @ A[:r]``; ``r`` is the largest size unless ``submodels=``
        restricted the nest, then the rank of its largest sub-model at full size in every other
        dimension, which the merged model computes). See docs/rank.md.
        """
        _flag("unwrap", "merge", merge)
        self._check_alive()
        if self._pin.in_forward():
            raise SortedNetError("unwrap() inside a forward of the model (a hook of its own, or the forward itself): "
                                 "the rest of that forward would run the full model after its first part ran the "
                                 "sub-model, an output of neither; unwrap once the forward has returned. Nothing "
                                 "was changed")
        if self._state._scoped is not self._state or self._state.open:
            inside = self._state._scoped is not self._state
            sub = self._state.plan().sub if inside else next(iter(self._state.open.values()), None)
            raise SortedNetError(
                f"unwrap() while a nest.use({sub}) block is open{'' if inside else ' (in another thread or task)'}: "
                "deep copies of the model (an EMA or teacher copy) would go on running parts of that sub-model "
                "there until the block ends (its widths, not its depth), an output of no sub-model; unwrap once "
                "the block has ended. Nothing was changed")
        self._refuse_pending("unwrap()")
        full = self._plans.get(SubModel({d.name: d.full for d in self.dims}))

        def forget() -> None:  # (run by the commit even if a step before it raised: never a half-unwrapped nest)
            self._pin.guards = self._pin.note = None  # (deep copies keep the pin: they no longer check the model)
            for d in self.dims:
                d._nest = None
            self._state.default = full  # deep copies of the model (EMA / teacher) still follow it: the full model
            self._state.owner = None
            self._alive = False
            _LIVE.discard(self)

        dropped = _rank_factors(self._sliced.values())
        unwrap_modules(self._sliced.values(), self._hooks, merge=merge, ranks=self._merge_ranks(merge),
                       then=(functools.partial(unguard_tree, self._guards), forget, self._stop, casts_stale))
        _drop_factors(self.model, dropped)
        return self.model

    @staticmethod
    def of(model: nn.Module) -> "Nest":
        """The nest (not unwrapped) that slices ``model`` or modules in it: the nest that wrapped it, or the one a
        deep copy of its model (an EMA or teacher copy) follows. For a model whose nest was not kept. (For a copy,
        ``.model`` of the nest is the original: ``sn.save(copy, path)`` saves the copy's weights, ``sn.save(
        Nest.of(copy), path)`` the original's.)

        >>> import torch.nn as nn, sortednet as sn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        >>> _ = sn.wrap(model, sn.Width("h", [2, 8], out="0", inp="1"))
        >>> sn.Nest.of(model).unwrap() is model
        True
        """
        if not isinstance(model, nn.Module):
            raise SortedNetError(f"Nest.of() takes an nn.Module, got {type(model).__name__}")
        states = [m.__dict__["_sn"].active for m in model.modules() if "_sn" in m.__dict__]
        own = [n for n in list(_LIVE) if n._alive and n.model is model]  # (its own nest first, whatever it holds)
        found = own or list({id(n): n for a in states if a is not None and (ref := a.owner) is not None
                             and (n := ref()) is not None
                             and n._alive}.values())  # (the nest each module's run-time state belongs to, while live)
        if len(found) > 1:
            raise SortedNetError(f"Nest.of(): {len(found)} nests slice modules of this {type(model).__name__} "
                                 f"(of {[type(n.model).__name__ for n in found]}); ask for each model alone")
        if found:
            return found[0]
        raise SortedNetError(f"Nest.of(): no nest slices this {type(model).__name__}" + (
            " (a deep copy of a model whose nest was unwrapped: it runs the full model; that nest's "
            "unwrap_copy(copy) gives it its original classes, or deep-copy the unwrapped model instead)"
            if states else ""))

    def unwrap_copy(self, copy: nn.Module, *, merge: bool = False) -> nn.Module:
        """Restore the original classes of a ``copy.deepcopy`` of the wrapped model (an EMA or
        teacher copy, which follows this nest's sub-models) and return it; like :meth:`unwrap`,
        and also after the nest itself was unwrapped (the copy then runs the full model)."""
        _flag("unwrap_copy", "merge", merge)
        if not isinstance(copy, nn.Module):
            raise SortedNetError(f"unwrap_copy() takes a deep copy of the wrapped model, got {type(copy).__name__}")
        if copy is self.model:
            raise SortedNetError("unwrap_copy() got the nest's own model; call nest.unwrap()")
        mods = [m for m in copy.modules() if "_sn" in m.__dict__]
        own = {id(m) for m in self._sliced.values()}
        if self._alive and any(id(m) in own for m in mods):
            raise SortedNetError(f"unwrap_copy(): {type(copy).__name__} holds modules of the nest's own model "
                                 "(a part of it, or a wrapper around it), not a copy; call nest.unwrap()")
        foreign = [m.__dict__["_sn"].path for m in mods if m.__dict__["_sn"].active is not self._state]
        if not mods or foreign:
            raise SortedNetError(f"unwrap_copy(): {type(copy).__name__} is not a copy of this nest's model"
                                 + (f" (modules {foreign[:3]} belong to another nest)" if foreign else
                                    " (it holds no sliced module)"))
        if self._pin.in_forward():  # (a copy follows the model's pin: its forward is one of them)
            raise SortedNetError("unwrap_copy() inside a forward of the model or of a copy of it (a hook of its own, "
                                 "or the forward itself): the rest of that forward would run the full model after "
                                 "its first part ran the sub-model, an output of neither; call it once the forward "
                                 "has returned. Nothing was changed")
        self._refuse_pending("unwrap_copy()")
        live = {id(p) for p in self.model.parameters()} if self._alive else set()  # (a copy sharing the
        dropped = [d for d in _rank_factors(mods) if id(d[0]) not in live]      # model's factors: still in use)
        shared = frozenset(id(m) for m in self.model.modules()) if self._alive else frozenset()
        unwrap_modules(mods, wrap_hooks(copy, shared), merge=merge, ranks=self._merge_ranks(merge))
        _drop_factors(copy, dropped, "nest.unwrap_copy(copy)")
        return copy

    def _refuse_pending(self, who: str) -> None:
        """Refuse while an activation checkpoint pinned by this nest (the model's or a deep copy's: they share the
        run-time state) has its recomputation to come under a sub-model: after unwrap it would run the plain,
        full model (reentrant checkpoints: another network's gradients, in silence). One of the full model
        recomputes alike, unless a Rank dimension makes the unwrapped model another (adapters dropped, a merge)."""
        whole = None if any(d.kind == "rank" for d in self.dims) else SubModel({d.name: d.full for d in self.dims})

        def pending() -> int:
            return sum(p[1].sub != whole for p in list(self._state.pending.values()))

        if pending():
            gc.collect()  # (a graph dropped but held in a reference cycle: freed, its checkpoints no longer pend)
        if pending():
            raise SortedNetError(f"{who}: an activation checkpoint ran its forward under a sub-model (of this "
                                 "model or a deep copy of it) and has not run its backward yet: its "
                                 "recomputation during backward would run the unwrapped model, and the gradients "
                                 "would be another network's. Run backward first, or drop what holds the graph "
                                 "(del loss; a traceback kept of an error raised inside the checkpoint, such as "
                                 "sys.last_traceback, holds it too), then unwrap. Nothing was changed")

    def _merge_ranks(self, merge: bool) -> dict[str, int] | None:
        """Per Rank dimension, the rank ``merge=True`` bakes in. The unwrapped model runs every other dimension at
        its full size, so: the ranks of the largest listed sub-model that does too (then the merged model computes
        what that sub-model computed; in a product nest, the full ranks). A restricted nest that lists no such
        sub-model gives the largest rank any of its sub-models uses (components above it were never active, never
        trained). Read off the listed rows' size indices (sizes ascend), not sub-model by sub-model."""
        if not merge:
            return None
        ranks = [i for i, d in enumerate(self.dims) if d.kind == "rank"]
        if self._rows is None:
            return {self.dims[i].name: self.dims[i].full for i in ranks}
        full = np.ones(len(self._rows), dtype=bool)
        for i, d in enumerate(self.dims):
            if d.kind != "rank":
                full &= self._rows[:, i] == len(d.sizes) - 1
        if full.any():  # (the listed sub-models are in the nest's order: the last such row is the largest)
            row = next(s for s in reversed(self.submodels) if all(s[d.name] == d.full for d in self.dims
                                                                  if d.kind != "rank"))
            return {self.dims[i].name: row[self.dims[i].name] for i in ranks}
        return {self.dims[i].name: self.dims[i].sizes[int(self._rows[:, i].max())] for i in ranks}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should get (those requiring grad, each once): all of them, or,
        when the nest has LoRA adapters (``Rank(mode="lora")``), only what its Rank dimensions train:
        the adapters, and the ``U`` / ``V`` factors of ``Rank(mode="svd")`` targets next to them."""
        self._check_alive()
        adapters = {id(t): t for m in self._sliced.values() for t in m._sn.slicer.adapters(m)}
        if not adapters:
            return [p for p in self.model.parameters() if p.requires_grad]
        from .slicers.lowrank import SVD

        keep = {*adapters, *(id(t) for m in self._sliced.values() if m._sn.slicer is SVD
                              for t in (m._parameters.get(n) for n in SVD.factors) if t is not None)}
        return [p for p in self.model.parameters() if id(p) in keep and p.requires_grad]

    def _refuse_stale_optimizer(self, held: set[int]) -> None:
        """See :func:`_stale_optimizer`; ``held``: ids of the optimizer's parameters."""
        for path, m in self._factored:
            st = m._sn
            if id(st.extra.get("weight")) in held:  # svd's replaced weight: no longer in the model, so only an
                dim = st.bind["rank"].dim           # optimizer built before wrap holds it
                raise SortedNetError(
                    f"optimizer.step(): this optimizer holds the weight of {path or 'the root'!r}, which sn.wrap "
                    f"replaced by the factors {list(st.slicer.factors)} of Rank {dim.name!r} (svd), and is no "
                    "longer in the model: the optimizer was built before wrap, and its steps would train nothing "
                    "of that layer. Build the optimizer after sn.wrap, over nest.trainable_parameters()")

    def _extra_state(self) -> dict[str, Any]:
        """JSON-able state saved with the checkpoint (extended by features such as profiles): the profile, whether
        its scores were already stale (measured on other weights) and which calibrated statistics were (they
        predate training): a loaded nest warns about them as this one would."""
        from .calibrate import stale_statistics

        out: dict[str, Any] = {}
        if self._profile is not None:
            out["profile"] = self._profile.to_dict()
            out["profile_structure"] = self.__dict__.get("_profile_digest") or modules_digest(self.model)
            if self._scored_on is not None and self._weights_key() != self._scored_on:
                out["scores_stale"] = True
        stale = stale_statistics(self)
        if stale:
            out["calibration_stale"] = stale
        return out

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` returned."""
        prof = state.get("profile")
        self._set_profile(None if prof is None else Profile.from_dict(prof))
        if prof is not None:  # (the tree the file's profile was measured on; sn.load warned where this one differs)
            self._profile_digest = state.get("profile_structure")
        if state.get("scores_stale") is True:
            self._scores_of_other_weights()

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved with the checkpoint besides the weights (calibrated BatchNorm statistics)."""
        from .calibrate import stats_to_tensors

        return stats_to_tensors(self)

    def _load_extra_tensors(self, tensors: dict[str, torch.Tensor], stale: dict[str, list[str]] | None = None) -> None:
        """Restore what :meth:`_extra_tensors` returned (replacing any current ones); ``stale``: the statistics that
        were out of date when saved (path -> sub-models)."""
        from .calibrate import stats_from_tensors

        stats_from_tensors(self, tensors, stale or {})

    def _check_alive(self) -> None:
        if not self._alive:
            raise SortedNetError("this nest was unwrapped; wrap the model again to use sub-models")

    def __deepcopy__(self, memo: dict) -> "Nest":
        raise SortedNetError("a Nest cannot be copied: copy.deepcopy(nest.model) gives a copy of the model that "
                             "follows this nest's sub-models (EMA / teacher; nest.unwrap_copy restores it), "
                             "sn.save(nest, path) a checkpoint")

    def __copy__(self) -> "Nest":
        raise SortedNetError("a Nest cannot be copied: the nest is one per model (sn.Nest.of(model) gives it); "
                             "copy.deepcopy(nest.model) gives a copy of the model that follows this nest's "
                             "sub-models, sn.save(nest, path) a checkpoint")

    def __reduce_ex__(self, protocol: int) -> Any:
        raise SortedNetError("a Nest cannot be pickled: use sn.save(nest, path) for all sub-models, "
                             "nest.export(sub) for one plain model")

    def __repr__(self) -> str:
        dims = ", ".join(repr(d) for d in self.dims)
        return f"Nest({type(self.model).__name__}, {len(self.submodels)} sub-models: {dims})"

    def _failure_note(self, sub: SubModel) -> str | None:
        """The note added to an error a forward raises under ``sub`` (see ``Pin._annotate``): none at full size."""
        if all(sub[d.name] == d.full for d in self.dims):
            return None
        if self._checked or self._checking:  # (check's own dry runs: its SortedNetError names the binding)
            return f"(sortednet: raised while running sub-model {sub})"
        return (f"(sortednet: raised while running sub-model {sub}, below the full model. The nest was wrapped "
                "without an example, so its wiring is unchecked: if this is a shape error the full model does not "
                "raise on this input, nest.check(example) names the dimension, module and binding that is missing)")

    def _unlisted_tensors(self, failure: BaseException | None) -> str:
        """Tensors of a module under a user's slicer that its ``attrs`` leave out although one of their axes has
        the full size of a role this nest slices there, when ``failure`` (what a dry run of check raised) was
        raised inside that module's forward: reading them mixes full and sliced sizes."""
        inside = set()
        tb = getattr(failure, "__traceback__", None)
        while tb is not None:  # each frame's first argument (a method's self, whatever its name): a sliced
            code = tb.tb_frame.f_code  # module (check runs eval-mode copies of them: by path)
            first = tb.tb_frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
            st = first.__dict__.get("_sn") if issubclass(type(first), nn.Module) else None  # (an object of the
            #    user's: its __getattr__ may raise anything, and its __class__ too (a proxy); it is no module)
            if st is not None:
                inside.add(st.path)
            tb = tb.tb_next
        out = []
        for path, m in self._sliced.items():
            st = m._sn
            if path not in inside or type(st.slicer).__module__.startswith("sortednet."):
                continue
            listed = set(st.slicer.attr_names(m, st.bind))
            fulls = {st.slicer.full(m, r): r for r, b in st.bind.items() if not r.startswith("attr:")
                     and b.dim.sizes[0] < b.dim.full}
            for name, t in (*m._parameters.items(), *m._buffers.items()):
                role = next((fulls[n] for n in getattr(t, "shape", ()) if n in fulls), None)
                if t is not None and name not in listed and role is not None:
                    out.append(f"{path + '.' if path else ''}{name} {tuple(t.shape)} has the full size of the "
                               f"sliced role {role!r}")
        if not out:
            return ""
        return (f"the slicers of your own types leave out of attrs: {'; '.join(out[:4])}. A tensor the forward "
                "reads must be listed in attrs and cut in value() (docs/custom_slicers.md)")

    def check(self, example: Any, *, mixed: int = 3) -> None:
        """Dry-run sub-models on ``example`` (each dimension at its smallest, smallest, largest, ``mixed``
        random ones, export of the smallest); a wiring mistake raises a :class:`SortedNetError` naming the
        dimension, module path and missing binding. See :mod:`sortednet.check`."""
        from .check import check

        if isinstance(mixed, bool) or not isinstance(mixed, int) or mixed < 0:
            raise SortedNetError(f"check(mixed=...) takes the number of random mixed sub-models, an int >= 0, got "
                                 f"{mixed!r}")
        self._check_structure("check")
        if is_fsdp(self.model):
            raise SortedNetError("nest.check: the model is sharded with FSDP2 (fully_shard); check runs private "
                                 "eval-mode copies of it, which sharded weights cannot give: check before "
                                 "fully_shard (wrap(..., example=x) does), or in one process on a checkpoint")
        from .coupling_ops import leaves

        if any(t.is_meta for t in (*self.model.parameters(), *self.model.buffers())) or any(
                isinstance(t, torch.Tensor) and t.is_meta for t in leaves(example)):
            raise SortedNetError("nest.check: the model or the example is on the meta device, where nothing can "
                                 "run or be compared: wrap without example= and check once the weights are "
                                 "materialised (model.to_empty(device=...) and their initialisation)")
        fresh = self._scored_on is not None and self._weights_key() == self._scored_on
        checking, self._checking = self._checking, True
        try:
            check(self, example, mixed=mixed)
            self._checked = True
        except SortedNetError as e:
            full_fails = str(e).startswith("nest.check: the full model")  # (then it is not about slicing)
            unlisted = "" if full_fails else self._unlisted_tensors(e.__cause__)
            if unlisted:  # a sub-model's dry run failed inside such a module: a likely cause
                raise SortedNetError(f"{e}\n  note: {unlisted}") from e
            raise
        finally:  # its dry runs put back every value (BatchNorm statistics by copy_, which moves the version
            self._checking = checking
            if fresh:  # counters): the profile's scores still describe the weights
                self._scored_on = self._weights_key()


def wrap(model: nn.Module, *dims: Dimension, submodels: Iterable[SubModelLike] | None = None,
         inplace_grad: bool = True, inplace_min_numel: int | None = None, example: Any = None) -> Nest:
    """Make ``model`` (changed in place) hold nested sub-models along ``dims``.

    All patterns and sizes are checked before anything changes; on error the
    model is left exactly as it was.

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> nest = sn.wrap(model, sn.Width("hidden", [8, 16, 32], out="0", inp="2"))
    >>> [str(s) for s in nest.submodels]
    ['hidden=8', 'hidden=16', 'hidden=32']
    >>> with nest.use("hidden=8"):
    ...     model(torch.randn(2, 8)).shape
    torch.Size([2, 4])

    ``inplace_grad`` (default True) adds the gradient of a sliced weight of at
    least ``inplace_min_numel`` elements (default ``sortednet.slicers.INPLACE_MIN_NUMEL``,
    4096; smaller tensors gain nothing) straight into its slice of ``.grad``,
    where that is exactly what plain autograd would do; ``torch.autograd.grad``,
    parameter hooks, ``create_graph`` and ``torch.func`` transforms get plain
    autograd automatically (see docs/mechanism.md). ``inplace_grad=False`` always
    uses plain autograd slicing (e.g. for DDP, see docs/scaling.md).

    ``example`` (inputs for one forward) runs :meth:`Nest.check` before returning:
    a wiring mistake raises a :class:`SortedNetError` naming the missing binding,
    and the model is unwrapped (left exactly as it was) first.
    """
    return Nest(model, *dims, submodels=submodels, inplace_grad=inplace_grad,
                inplace_min_numel=inplace_min_numel, example=example)


def _rank_factors(modules: Iterable[nn.Module]) -> list[tuple[torch.Tensor, str]]:
    """The factors / adapters of the Rank-sliced ``modules`` (what an unwrap drops), each with its name for a
    message."""
    return [(t, f"{name!r} of {m._sn.path or 'the root'!r} (Rank {m._sn.bind['rank'].dim.name!r})")
            for m in modules if "rank" in m._sn.bind
            for name, t in m._parameters.items() if t is not None and name not in ("weight", "bias")]


def _drop_factors(model: nn.Module, dropped: list[tuple[torch.Tensor, str]], who: str = "nest.unwrap()") -> None:
    """Mark what ``model`` no longer holds after an unwrap (an optimizer over it trains nothing: its next step is
    refused, naming it and ``who`` dropped it)."""
    kept = {id(p) for p in model.parameters()}
    for t, where in dropped:
        if id(t) not in kept:
            _drop(t, where, who)
    if dropped:
        _watch_optimizers()


class OtherInputFlopsWarning(UserWarning):
    """``cost(..., 'flops', example=x)`` on another input than the profile's: the count answers that call, but
    ``pick(flops=...)`` keeps reading the profile's table (warned once per input signature)."""


class StaleScoresWarning(UserWarning):
    """``pick`` ranks by profile scores measured before the model last changed."""


def _warn_if_loss_like(prof: Profile) -> None:
    """Warn when the scores fall with the parameter count almost everywhere (rank correlation below -0.8
    over at least 3 sub-models): most likely a loss, which ``pick`` would read as "smaller is better"."""
    if prof.scores is None or len(prof.scores) < 3 or "params" not in prof.costs:
        return
    p = np.argsort(np.argsort(np.asarray(prof.costs["params"], dtype=float), kind="stable"))
    q = np.argsort(np.argsort(np.asarray(prof.scores, dtype=float), kind="stable"))
    if p.std() == 0 or q.std() == 0:
        return
    rho = float(np.corrcoef(p, q)[0, 1])
    if rho < -0.8:
        warnings.warn(f"nest.profile: the scores fall as sub-models grow (rank correlation {rho:.2f} with the "
                      "parameter count); pick() takes a higher score as better: if the score is a loss, pass its "
                      "negation (score=lambda sub: -loss(sub)), or pick takes the worst sub-model; if it already "
                      "is a higher-is-better score, larger sub-models score worse here (an untrained nest, or "
                      "scores of another data set)", UserWarning, stacklevel=3)


def _checked_score(score: Callable[[SubModel], Any]) -> Callable[[SubModel], float]:
    """``score`` refusing anything but a real number (a string or bool would be cast or fail obscurely); a
    ``score`` that is not callable is refused at once, before anything is measured."""
    if not callable(score):
        raise SortedNetError(f"profile(score=...) takes a callable score(sub) returning a real number, got "
                             f"{type(score).__name__} {str(score)[:80]!r}")

    def checked(sub: SubModel) -> float:
        value = score(sub)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() \
                or isinstance(value, np.ndarray) and value.size == 1 and not np.iscomplexobj(value):
            value = value.item()  # (a 0-d or one-value tensor or array)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, decimal.Decimal)):
            raise SortedNetError(f"score({sub}) returned {type(value).__name__} {str(value)[:80]!r}; "
                                 "it must return a real number")
        return float(value)  # (a Fraction, a Decimal too)

    return checked


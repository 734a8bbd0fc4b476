"""save / load: one safetensors file holds the weights of every sub-model
(they share them) plus the nest's description as JSON metadata.

``load`` is all-or-nothing: the file's structure, metadata, dimensions,
sub-model list, tensor names, shapes, dtypes, checksums, calibration tensors
and profile are all checked against the target (a fresh model, whose wrap is
planned but not installed, or an existing nest) before the first change.
Nothing read from a file is executed: module paths are matched exactly, never
as patterns. See docs/checkpoints.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import checkpoint as ck
from .cost import RECORDS
from .errors import SortedNetError, flag
from .meta import (
    CHECKSUM,
    EXTRA_PREFIX,
    FORMAT,
    FORMATS,
    INFO_FIELDS,
    MAX_DIMS,
    MAX_SIZES,
    PATTERN_FIELDS,
    calibration_entries,
    check_profile,
    check_stale_marks,
    exact_spec,
    read_meta,
    rows_of,
)
from .modes import casts_stale
from .nest import Nest, modules_digest, wrap
from .views import is_fsdp, is_sharded
from .wrap import _keyed_as, count_load, plan

__all__ = ["save", "load", "read_metadata", "FORMAT", "EXTRA_PREFIX"]


def _foreign_entries(model: nn.Module, sd: Mapping[str, Any]) -> list[str]:
    """``state_dict`` entries (of ``sd``, taken with ``keep_vars=True``) that are not a parameter or buffer the
    module holds: what a module's own ``get_extra_state`` or ``_save_to_state_dict`` computes. Writing into
    such a tensor changes a temporary; only the module's own load code could restore it."""
    own = {id(t) for m in model.modules() for store in (m._parameters, m._buffers) for t in store.values()
           if t is not None}  # (by object: state_dict hooks may rename keys, e.g. checkpoint_wrapper's prefix)
    return [k for k, v in sd.items() if id(v) not in own]


def _refuse_foreign(model: nn.Module, sd: Mapping[str, Any], what: str) -> None:
    foreign = _foreign_entries(model, sd)
    if foreign:
        raise SortedNetError(
            f"{what}: state_dict entries {foreign[:3]} are not parameters or buffers of their modules but what the "
            "module's own code computes (get_extra_state, an overridden _save_to_state_dict); a sortednet checkpoint "
            "copies tensors in place and cannot run that code's load side, so the state would be lost in silence. "
            "Save that module's state separately (or register it as a buffer), or save an exported sub-model with "
            "torch.save")


def _target_state(model: nn.Module, planned: Mapping[str, tuple]) -> dict[str, tuple[torch.Tensor | None, tuple,
                                                                                       torch.dtype]]:
    """The state_dict the (planned) nest will have: name -> (tensor or None if not yet made, shape, dtype)."""
    sd = model.state_dict(keep_vars=True)
    _refuse_foreign(model, sd, "sn.load")
    out: dict[str, tuple[torch.Tensor | None, tuple, torch.dtype]] = {
        k: (v, tuple(v.shape), v.dtype) for k, v in sd.items()}
    names: dict[int, list[str]] = {}  # every name of each module (one held under two names: both change)
    for path, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(path)
    for m, sl, bind in planned.values():
        if "_sn" in m.__dict__:
            continue  # already wrapped: its state_dict is final
        made = sl.planned_state(m, bind)
        own = (*m._parameters, *m._buffers, *made)
        for path in names.get(id(m), ()):
            # (the keys' form: under an activation-checkpoint wrapper, without its inner module's name)
            prefix = _keyed_as(model, path, sd, "", own)
            for name, new in made.items():
                if new is None:
                    out.pop(prefix + name, None)
                else:  # one placeholder per made tensor, shared by its names (they alias one tensor)
                    out[prefix + name] = (_New(id(m), name), tuple(new[0]), new[1])
    return out


class _New:
    """Placeholder of a tensor that wrap will make (a Rank factor): not a tensor yet, one per module and name."""

    __slots__ = ("key",)

    def __init__(self, mid: int, name: str) -> None:
        self.key = ("new", mid, name)


def _written(state: Mapping[str, tuple]) -> Mapping[str, tuple]:
    """``state`` with the placeholders of tensors wrap will make read as None."""
    return {k: (None if isinstance(t, _New) else t, shape, dtype) for k, (t, shape, dtype) in state.items()}


def _alias_groups(state: Mapping[str, tuple]) -> list[list[str]]:
    """State-dict names grouped by the tensor they share (tied weights), in state_dict order."""
    groups: dict[Any, list[str]] = {}
    for k, (t, _, _) in state.items():
        if isinstance(t, _New):  # made by wrap: one per module and name, under each of the module's names
            key: Any = t.key
        elif t is None or t.numel() == 0:
            key = ("new", k)
        elif t.is_meta:  # no storage
            key = ("meta", id(t))
        else:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(key, []).append(k)
    return list(groups.values())


def save(nest: "Nest | nn.Module", path: str | os.PathLike, *,  # noqa: F821
         state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write ``nest`` (weights, dimensions with the exact module paths they bind, the
    sub-model list when it is not the full product, calibration and profile) to ``path``.

    ``nest`` may also be the wrapped model, or a ``copy.deepcopy`` of it that follows the nest (an EMA
    or teacher copy): then the copy's weights are written, with the nest's dimensions and sub-models and
    its profile's costs (its scores marked as measured on other weights). (``sn.Nest.of(copy)`` is the
    nest the copy follows, whose model is the original: saving that writes the original's weights.)

    Tensors shared by several names (tied weights) are stored once. The file is
    written beside ``path`` under a temporary name and renamed into place, with the
    permissions of a plain ``open()`` (the user's umask applies). ``state`` replaces
    ``nest.model.state_dict()`` (e.g. the full state gathered from FSDP shards).

    >>> import tempfile, os, torch.nn as nn, sortednet as sn
    >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [4, 8], out="0", inp="1"))
    >>> path = os.path.join(tempfile.mkdtemp(), "nest.safetensors")
    >>> sn.save(nest, path)
    >>> sn.load(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), path).submodels == nest.submodels
    True
    """
    copy = None
    if isinstance(nest, nn.Module):
        nest, copy = _nest_of_copy(nest, state)
    if not isinstance(nest, Nest):
        swapped = isinstance(nest, (str, os.PathLike)) and isinstance(path, (Nest, nn.Module))
        raise SortedNetError(f"sn.save() needs a Nest (from sn.wrap), got {type(nest).__name__}"
                             + ("; the arguments are (nest, path): sn.save(nest, path)" if swapped else ""))
    nest._check_structure("sn.save")
    big = [d.name for d in nest.dims if len(d.sizes) > MAX_SIZES]
    if len(nest.dims) > MAX_DIMS or big:  # (a file load would refuse: never written)
        raise SortedNetError(f"sn.save(): a checkpoint holds at most {MAX_DIMS} dimensions of at most {MAX_SIZES} "
                             f"sizes each; this nest has {len(nest.dims)}" + (f", and {big[:3]} more sizes" if big
                                                                              else ""))
    if copy is not None:
        state = copy.state_dict()
    if not isinstance(path, (str, os.PathLike)):
        raise SortedNetError(f"sn.save() needs a file path, got {type(path).__name__}")
    p = os.fspath(path)
    if isinstance(p, bytes):
        raise SortedNetError(f"sn.save() needs a str path, got bytes {p!r}")
    if not p:
        raise SortedNetError("sn.save() needs a file path, got an empty string")
    folder = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(folder):
        raise SortedNetError(f"cannot save to {p!r}: folder {folder!r} does not exist")
    if os.path.isdir(p):
        raise SortedNetError(f"cannot save to {p!r}: it is a folder")
    if os.path.exists(p) and not os.path.isfile(p):  # (a device, a FIFO: the rename into place would replace it)
        raise SortedNetError(f"cannot save to {p!r}: it is not a regular file (a device, a FIFO or a socket), "
                             "which the checkpoint written beside it and renamed into place would replace")
    modules = dict(nest.model.named_modules())
    dims = [exact_spec(d, modules) for d in nest.dims]
    full = len(nest.submodels) == _product(nest)
    subs = None if full else [[s[d.name] for d in nest.dims] for s in nest.submodels]
    sd = nest.model.state_dict() if state is None else _checked_state(
        nest, state, "sn.save(state=)" if copy is None else "sn.save(copy)")
    shards = [k for k, t in sd.items() if is_sharded(t)]
    if shards:
        raise SortedNetError(f"sn.save(): {shards[0]!r} (and {len(shards) - 1} more) is a shard (the model is "
                             "sharded with FSDP2): use sortednet.distributed.save(nest, path) on every rank, which "
                             "gathers the full state and writes it from rank 0")
    if state is None or copy is not None:
        _refuse_foreign(copy or nest.model, (copy or nest.model).state_dict(keep_vars=True), "sn.save")
    odd = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise SortedNetError(f"cannot save: state_dict entries {odd[:3]} are not tensors (a module's "
                             "get_extra_state); a safetensors checkpoint holds tensors only: save that state "
                             "separately, or save one exported sub-model with torch.save")
    sparse = [f"{k} ({v.layout})" for k, v in sd.items() if v.layout != torch.strided]
    if sparse:
        raise SortedNetError(f"cannot save: {sparse[:3]} are not dense tensors, which a safetensors checkpoint cannot "
                             "hold; keep them dense in the model (tensor.to_dense()) or save them separately")
    meta_keys = [k for k, v in sd.items() if v.is_meta]
    if meta_keys:
        raise SortedNetError(f"cannot save: {meta_keys[:3]} are on the meta device (no values); materialise the "
                             "model first (model.to_empty(device=...) and initialise or load its weights)")
    entries = {k: (v, tuple(v.shape), v.dtype) for k, v in sd.items()}
    groups = _alias_groups(entries)
    tensors = {g[0]: entries[g[0]][0] for g in groups}
    ties = [g for g in groups if len(g) > 1]  # the names each stored tensor stood for: a model that holds them
    # as separate tensors (built untied, e.g. materialised from the meta device) gets the value in each
    extra = nest._extra_tensors() if copy is None else {}  # (a copy holds no calibration: _nest_of_copy)
    clash = sorted(set(extra) & set(tensors))
    if clash:
        raise SortedNetError(f"model state_dict keys {clash[:3]} use the reserved prefix {EXTRA_PREFIX!r}")
    tensors.update(extra)

    def metadata(crcs: dict[str, str]) -> dict[str, str]:
        meta = {"format": FORMAT, "dims": dims, "submodels": subs, "count": len(nest.submodels),
                "extra": nest._extra_state() if copy is None else _copy_extra_state(nest),
                "checksum": CHECKSUM, "crc32": crcs}
        if ties:  # (only where there are: a file without ties stays readable by versions before them)
            meta["ties"] = ties
        return {"sortednet": _dumps(meta)}

    ck.write(p, tensors, metadata)


def _nest_of_copy(model: nn.Module, state: Any) -> tuple[Nest, nn.Module | None]:
    """``sn.save(model)``: the nest of a wrapped model (no copy), or of a deep copy that follows it (the copy)."""
    try:
        nest = Nest.of(model)
    except SortedNetError as e:
        if "unwrapped" in str(e):  # (a deep copy of a model whose nest was unwrapped: Nest.of says what to do)
            raise SortedNetError(f"sn.save(): {e}") from None
        raise SortedNetError(f"sn.save() needs a Nest (from sn.wrap), got {type(model).__name__}, which no nest "
                             "slices (a wrapped model, or a deep copy of one, is saved with its nest)") from None
    if model is nest.model:
        return nest, None
    with nest._pin.lock:
        known = set(nest._pin.copies.keys())
    if model not in known:
        inner = [n for n, m in model.named_modules() if m is nest.model or m in known]
        if inner:  # (e.g. torch.optim.swa_utils.AveragedModel: the copy is its .module)
            where = [f"obj.get_submodule({n!r})" for n in inner[:3]]
            raise SortedNetError(f"sn.save(): this {type(model).__name__} holds the model or deep copies of it at "
                                 f"{inner[:3]}; save each on its own: sn.save({where[0]}, path)")
        if not any(m is model for m in nest.model.modules()):
            raise SortedNetError(f"sn.save() takes a nest, its model or a deep copy of that model; this "
                                 f"{type(model).__name__} shares modules with the model of {nest!r} without being "
                                 "it (a shallow copy, copy.copy, or a module built from its parts): save the nest, "
                                 "or a deep copy (copy.deepcopy)")
        raise SortedNetError(f"sn.save() takes a nest, its model or a deep copy of that model; this "
                             f"{type(model).__name__} is a module inside the model of {nest!r}: save the nest")
    if state is not None:
        raise SortedNetError("sn.save(copy, state=...): the copy's own state_dict is what is saved; pass one of them")
    nest._pin.stale(model)  # (a copy left in the old unit order by a sort: refused, as at its forward)
    held = [n for n, m in model.named_modules() if getattr(getattr(m.__dict__.get("_sn"), "norm", None), "stats",
                                                           None)]
    if held:
        raise SortedNetError(f"sn.save(copy): the copy holds per-sub-model BatchNorm statistics at {held[:3]} (it was "
                             "copied after nest.calibrate), which describe the model's weights as they were then, not "
                             "the copy's; save the copy before calibrating, or calibrate a nest loaded from it")
    return nest, model


def _copy_extra_state(nest: Nest) -> dict[str, Any]:
    """The nest's saved state for a copy's weights: the profile (its costs hold for any weights of these shapes;
    its scores were measured on the model's weights: marked so), no calibration."""
    out = {k: v for k, v in nest._extra_state().items() if k in ("profile", "profile_structure")}
    if nest._profile is not None and nest._profile.scores is not None:
        out["scores_stale"] = True
    return out


def _checked_state(nest: Nest, state: Any, who: str = "sn.save(state=)") -> Mapping[str, torch.Tensor]:
    """``save(..., state=)`` (or the state of a deep copy saved, ``who`` says which) must be the model's state_dict
    in full (gathered FSDP shards): the same keys, shapes and dtypes, or the checkpoint could never be loaded."""
    if not isinstance(state, Mapping):
        raise SortedNetError(f"sn.save(state=) takes a state_dict (a mapping of tensors), got {type(state).__name__}")
    own = nest.model.state_dict(keep_vars=True)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SortedNetError(f"{who}: {bad[:3]} are not tensors" + (
            ": state= takes the model's own state_dict, in full (gathered from FSDP shards); save an optimizer's "
            "state, a scheduler's or other objects beside the checkpoint (torch.save)" if who == "sn.save(state=)"
            else ""))
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise SortedNetError(f"{who} does not match the model's state_dict: missing keys {missing[:5]}, "
                             f"unexpected keys {unexpected[:5]}")
    for k, v in own.items():
        if not isinstance(v, torch.Tensor):
            continue  # a module's get_extra_state: refused by save itself
        if tuple(state[k].shape) != tuple(v.shape) or state[k].dtype != v.dtype:
            hint = ("the full, gathered state is needed" if who == "sn.save(state=)" else "a copy is saved in the "
                    "wrapped model's shapes and dtypes, which a checkpoint of the nest describes: save it before "
                    "converting it, or convert a model loaded from the checkpoint")
            raise SortedNetError(f"{who}: {k!r} is {list(state[k].shape)} {state[k].dtype}, the model's "
                                 f"{list(v.shape)} {v.dtype} ({hint})")
    if who == "sn.save(state=)":
        _refuse_copy_state(nest, state)
    out = _retied(own, state, who)
    if who == "sn.save(state=)":
        _refuse_other_values(nest, own, state)
    return out


def _refuse_other_values(nest: Nest, own: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """``sn.save(nest, state=)`` where the model's tensors are plain (one process, DDP's replicas; not DTensor
    shards, which FSDP2 keeps even with one rank: not compared), with other values than the model's (an EMA's
    weights cloned into a dict): saved beside the nest's calibration and profile scores, which describe the
    model's own weights. Refused, naming the first key that differs."""
    if any(isinstance(v, torch.Tensor) and (is_sharded(v) or v.is_meta) for v in own.values()):
        return
    for k, v in own.items():
        if not isinstance(v, torch.Tensor):
            continue
        t = state[k].detach()
        if t.is_meta:
            continue
        t, v = t.to(v.device), v.detach()
        same = torch.equal(t, v) or (v.is_floating_point() and bool(((t == v) | (t.isnan() & v.isnan())).all()))
        if not same:
            raise SortedNetError(
                f"sn.save(state=): {k!r} holds other values than the model's (another model's weights, an EMA's "
                "cloned into a dict?): state= is the model's own state gathered from FSDP shards, saved beside the "
                "nest's calibration and profile scores, which describe the model's own weights. Load those weights "
                "into a deep copy of the model and save that, sn.save(copy, path), or into the model itself "
                "(model.load_state_dict) first; nothing was written")


def _wrapped_target(model: nn.Module) -> str | None:
    """Why ``sn.load`` cannot load into ``model`` as a fresh model (it is, holds, or sits inside one a live nest
    wraps, or is a deep copy following one), with what to load into instead; None where it can."""
    try:
        nest = Nest.of(model)
    except SortedNetError:
        nest = None
    held: set = set()
    if nest is not None and getattr(nest, "_alive", True):
        if model is nest.model:
            return ("sn.load into a model that a live nest wraps: load into that nest, sn.load(sn.Nest.of(model), "
                    "path) (it keeps the nest and its dimensions, checked against the file's)")
        with nest._pin.lock:
            copy = model in nest._pin.copies
        if copy:
            return ("sn.load into a deep copy of a wrapped model (an EMA / teacher copy, which follows the model's "
                    "nest): load the file into the nest, or its weights into the copy with copy.load_state_dict(...)")
        with nest._pin.lock:
            held = set(nest._pin.copies.keys())
        if not any(m is nest.model or m in held for m in model.modules()):
            return (f"sn.load into a {type(model).__name__} inside the model of {nest!r}: load the whole checkpoint "
                    "into the nest, sn.load(nest, path)")
    inner = next((n for n, m in model.named_modules() if n and _is_live_root(m)), None)
    copy_at = next((n for n, m in model.named_modules() if n and m in held), None)
    if inner is None and copy_at is not None:
        return (f"sn.load: this {type(model).__name__} holds a deep copy of a wrapped model (an EMA / teacher copy) "
                f"at {copy_at!r}: load the file into the nest, or its weights into the copy with "
                f"obj.{copy_at}.load_state_dict(...)")
    if inner is not None:
        return (f"sn.load: this {type(model).__name__} holds a wrapped model at {inner!r}; load into its nest, "
                f"sn.load(sn.Nest.of(obj.{inner}), path) (a checkpoint of this whole {type(model).__name__}: "
                "unwrap that nest first, nest.unwrap())")
    return None


def _is_live_root(m: nn.Module) -> bool:
    """Whether ``m`` is the model of a live nest."""
    try:
        nest = Nest.of(m)
    except SortedNetError:
        return False
    return nest.model is m and getattr(nest, "_alive", True)


def _retied(own: Mapping[str, Any], state: Mapping[str, torch.Tensor], who: str) -> Mapping[str, torch.Tensor]:
    """``state`` with the names the model holds as one (tied) tensor sharing one again: a state gathered or
    copied name by name (``{k: v.clone()}``, ``{k: v.cpu()}``) holds a copy under each, which the file would
    store apart, and no load (not even into this model) takes a file that unties what the model ties. Refused
    where the copies differ."""
    by_id: dict[int, list[str]] = {}  # (the names of one tensor object: a tie; by identity, as a sharded tensor,
    for k, v in own.items():          # a DTensor of FSDP2, has no plain storage to compare)
        if isinstance(v, torch.Tensor):
            by_id.setdefault(id(v), []).append(k)
    groups = [g for g in by_id.values() if len(g) > 1]
    if not groups:
        return state
    out = dict(state)
    for g in groups:
        first = out[g[0]]
        for k in g[1:]:
            t = out[k]
            if t is first:
                continue
            a, b = t.detach().cpu(), first.detach().cpu()
            if not (t.is_meta or first.is_meta) and not (torch.equal(a, b) or a.is_floating_point() and torch.allclose(
                    a, b, rtol=0.0, atol=0.0, equal_nan=True)):  # (a diverged run's NaN, equal to itself here)
                fix = ("tie them in the copy again as the model holds them" if who == "sn.save(copy)" else
                       "pass the state of this model (its tied names equal)")
                raise SortedNetError(f"{who}: the model holds {g} as one shared (tied) tensor, but the state gives "
                                     f"{g[0]!r} and {k!r} different values: a file of them could not be loaded into "
                                     f"the model; {fix}")
            out[k] = first
    return out


def _refuse_copy_state(nest: Nest, state: Mapping[str, torch.Tensor]) -> None:
    """``sn.save(nest, state=copy.state_dict())`` would save a deep copy's weights (an EMA's) beside the nest's
    own calibrated statistics and profile scores, as if they described them: refused, naming ``sn.save(copy)``."""
    with nest._pin.lock:
        copies = [m for m, epoch in nest._pin.copies.items() if epoch is not None]  # (not a private view)
    if not copies:
        return
    def ptr(t: torch.Tensor) -> int | None:
        if t.is_meta or not t.numel() or is_sharded(t) or type(t) not in (torch.Tensor, nn.Parameter):
            return None  # (a DTensor shard of FSDP2, a subclass: no plain storage to compare)
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None

    held = {ptr(t) for m in copies for t in (*m.parameters(), *m.buffers())} - {None}
    own = {ptr(t) for t in (*nest.model.parameters(), *nest.model.buffers())}
    hit = [k for k, t in state.items() if isinstance(t, torch.Tensor) and (p := ptr(t)) in held and p not in own]
    if hit:
        raise SortedNetError(f"sn.save(state=): {hit[:3]} are tensors of a deep copy of the model (an EMA or "
                             "teacher copy), not of the nest's model: saved with the nest's calibration and profile "
                             "scores, which describe the nest's own weights. Save the copy itself, sn.save(copy, "
                             "path), which writes its weights with the nest's dimensions")


def _dumps(obj: Any) -> str:
    import json

    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except ValueError as e:  # NaN / inf in a profile
        raise SortedNetError(f"cannot save: the nest's metadata holds a non-finite number ({e})") from None


def _product(nest: Nest) -> int:
    n = 1
    for d in nest.dims:
        n *= len(d.sizes)
    return n


def read_metadata(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The nest description stored in a file written by :func:`save` (checked, never executed). ``verify``
    (default) checks the header's CRC-32 first, as :func:`load` does: a description changed after it was
    written is refused, not returned."""
    flag("read_metadata", "verify", verify)
    with ck.read(path) as f:
        meta = read_meta(f)
        if verify:
            where = repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else repr(path)
            _check_header(f, meta, where, "read_metadata(..., verify=False)")
    return {k: v for k, v in meta.items() if k not in ("dims_built", "rows")}


def _check_header(f: ck.Container, meta: dict[str, Any], where: str, skip: str) -> None:
    """Refuse a file whose header (the nest's description, the tensor table) changed after it was written; first
    of all checks: a damaged description would mislead every other one."""
    if meta["crc32"] is None:  # (format 1: no checksums at all)
        return
    ok = f.header_ok()
    if ok is False or (ok is None and meta["checksum"] == CHECKSUM):
        raise SortedNetError(f"checkpoint {where}: the header is damaged (its CRC-32 "
                             f"{'is missing' if ok is None else 'does not match'}: the nest's description "
                             f"or the tensor table changed after it was written); {skip} skips this check")


def _refuse_while_serving(nest: Any) -> None:
    """A load into ``nest`` while a ``nest.use`` block is open in another thread or task, or while a forward of
    the model runs (a hook that loads): that request would finish on a mix of the old weights and the new ones,
    an output of neither model. (A block of this thread's own is no request in flight.)"""
    import sys
    import threading

    a = nest._state
    running, f = set(), sys._getframe(1)
    while f is not None:  # (this thread's frames now: a block one of them entered is this caller's own)
        running.add(id(f))
        f = f.f_back
    me = threading.get_ident()
    elsewhere = next((u.plan.sub for u in list(a.users.values()) for k, e in list(u.tokens.items())
                      if k not in u.stale and not e.left and (k != me or e.frame not in running)), None)
    if nest._pin.in_forward() or elsewhere is not None:
        raise SortedNetError(
            "sn.load into a nest " + ("inside a forward of its model" if nest._pin.in_forward() else
                                      f"while a nest.use({elsewhere}) block is open in another thread or task (or "
                                      "a suspended generator)")
            + ": that request would finish on a mix of the old and the new weights, an output of neither; load "
            "when no request runs (or into a copy, then swap). Nothing was changed")


def load(model: "nn.Module | Nest", path: str | os.PathLike, *, strict: bool = True,  # noqa: F821
         verify: bool = True) -> "Nest":  # noqa: F821
    """Wrap ``model`` (a fresh instance of the saved architecture) as saved and load the
    weights; or, given a Nest with the same dimensions and sub-models, load into it.

    All-or-nothing: everything is checked before the first change, and on any fault a
    :class:`SortedNetError` names it with the target exactly as it was (a Ctrl-C or a disk
    read error while weights are copied stops it part-way: the error says how far). ``verify``
    (default) checks every tensor's CRC-32 first; ``strict=False`` tolerates weights
    missing from the file (left as they are) and extra ones (ignored). Tensors must
    have the target's dtype (no silent cast): convert the model after loading instead.

    >>> import tempfile, os, torch.nn as nn, sortednet as sn
    >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [4, 8], out="0", inp="1"))
    >>> path = os.path.join(tempfile.mkdtemp(), "nest.safetensors")
    >>> sn.save(nest, path)
    >>> sn.load(nest, path) is nest
    True
    """
    if not isinstance(model, (Nest, nn.Module)):
        swapped = isinstance(model, (str, os.PathLike)) and isinstance(path, (Nest, nn.Module))
        raise SortedNetError(f"load() needs an nn.Module or a Nest, got {type(model).__name__}"
                             + ("; the arguments are (model, path): sn.load(model, path)" if swapped else ""))
    flag("load", "strict", strict)
    flag("load", "verify", verify)
    if isinstance(model, Nest):
        model._check_structure("sn.load")
        _refuse_while_serving(model)
    target = model.model if isinstance(model, Nest) else model
    if is_fsdp(target):  # (its parameters are shards: read back from the file's full tensors they would not be)
        raise SortedNetError(
            "sn.load into a model sharded with FSDP2 (fully_shard): its parameters are DTensor shards. Load into the "
            "model before fully_shard (then shard it), or load the weights with torch.distributed.checkpoint's "
            "set_model_state_dict (full_state_dict=True) on every rank")
    where = repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else repr(path)
    if not isinstance(path, (str, os.PathLike)):
        raise SortedNetError(f"load() needs a file path, got {type(path).__name__}")
    with ck.read(path) as f:
        meta = read_meta(f)
        if verify:
            _check_header(f, meta, where, "load(..., verify=False)")
        names = [d["name"] for d in meta["dims"]]
        if isinstance(model, Nest):
            nest, dims = model, None
            _check_same_nest(nest, meta, where)
            planned = {p: (m, m._sn.slicer, m._sn.bind) for p, m in nest._sliced.items()}
            target_model = nest.model
        else:
            if type(model).__name__ == "OptimizedModule" and isinstance(model._modules.get("_orig_mod"), nn.Module) \
                    and not any(k.startswith("_orig_mod.") for k in f.entries):  # (torch.compile(model); a file
                wrapped = any("_sn" in m.__dict__ for m in model._modules["_orig_mod"].modules())
                raise SortedNetError(  # of the model it compiles: its paths lack the wrapper's '_orig_mod.')
                    f"sn.load into a torch.compile wrapper ({type(model).__name__}) of a checkpoint of the model "
                    "it compiles: the wrapper's modules are under '_orig_mod.'; load into "
                    + ("the nest that wraps that model, sn.load(sn.Nest.of(obj._orig_mod), path)" if wrapped else
                       "that model, sn.load(obj._orig_mod, path)") + " (the compiled object then runs the loaded nest)")
            why = _wrapped_target(model)
            if why is not None:  # (sn.save takes the wrapped model: load is asked the same way)
                raise SortedNetError(why)
            dims = meta["dims_built"](dict(model.named_modules()))
            try:
                planned = plan(model, dims)               # validates the wrap; changes nothing
            except SortedNetError as e:
                raise type(e)(f"checkpoint {where} does not fit this {type(model).__name__}: {e}") from None
            target_model = model
        rows = rows_of(meta, where)
        aliased = _target_state(target_model, planned)
        state = _written(aliased)
        on_meta = [k for k, (t, _, _) in state.items() if t is not None and t.is_meta]
        if on_meta:
            raise SortedNetError(f"checkpoint {where}: the model's {on_meta[:3]} are on the meta device, where no "
                                 "value can be loaded; materialise it first (model.to_empty(device=...)), re-create "
                                 "its non-persistent buffers (no checkpoint holds them: e.g. rotary inv_freq), then "
                                 "load")
        frozen = [k for k, (t, _, _) in state.items() if t is not None and t.is_inference()]
        if frozen and not torch.is_inference_mode_enabled():
            raise SortedNetError(f"checkpoint {where}: the model's {frozen[:3]} are inference tensors (created "
                                 "under torch.inference_mode), which cannot be written outside it; build the model "
                                 "outside inference_mode, then load")
        copies = _match_tensors(f, aliased, strict, where, meta["ties"])
        equal = _unwritable(f, state, copies, where)
        loaded = {k for targets in copies.values() for k in targets} | equal
        left = [k for k in state if k not in loaded]  # strict=False: weights the file lacks, left as they are
        extra_names = [k for k in f.entries if k.startswith(EXTRA_PREFIX)]
        calib = calibration_entries(f, extra_names, planned, meta, rows, where)
        check_profile(meta["extra"].get("profile"), meta, rows, where)
        check_stale_marks(meta["extra"], calib, where)
        if verify and meta["crc32"] is not None:
            for k in f.entries:
                if f.crc(k) != meta["crc32"][k]:
                    raise SortedNetError(f"checkpoint {where}: tensor {k!r} is damaged (CRC-32 {f.crc(k)} != "
                                         f"stored {meta['crc32'][k]}); load(..., verify=False) skips this check")
        # the file's profile measured on another model: said before anything changes (a warnings filter set to
        # "error" refuses the load here); its FLOPs, memory and latency are dropped after the copy
        unexpected = [k for k in f.entries if k not in state and not k.startswith(EXTRA_PREFIX)]
        measured = set((meta["extra"].get("profile") or {}).get("costs") or ()) - {"params"}
        other = []
        if measured and (left or unexpected):  # (sn.save writes every tensor of its model: the file's is another)
            other.append(f"sn.load(strict=False) of {where} read the profile of another model ({len(left)} of "
                         f"this model's tensors are not in the file, {len(unexpected)} of the file's are not in this "
                         "model), measured on that model")
        stored = meta["extra"].get("profile_structure")
        target = model if dims is not None else nest.model
        if measured and not other and stored is not None and \
                all(stored != modules_digest(target, r) for r in RECORDS):  # (a file of an earlier record: as then)
            other.append(f"sn.load of {where}: the checkpoint's profile was measured on a model whose modules "
                         "(paths, classes or settings) differ from this one's")
        if other:
            import warnings

            warnings.warn(f"{other[0]}: its measured {sorted(measured)} no longer apply and are dropped; measure "
                          "them again with nest.profile(example)", stacklevel=2)
        # -- every check passed: change the target ------------------------------------
        done, started, copying = 0, 0, False
        try:
            if dims is not None:
                subs = None if rows is None else [dict(zip(names, r)) for r in rows]
                import warnings

                from .check import UnverifiedHeadsWarning

                with warnings.catch_warnings():  # (sn.load takes no example: nest.check(example) verifies; the
                    warnings.simplefilter("ignore", UnverifiedHeadsWarning)  # wrap-time warning: not actionable)
                    nest = wrap(model, *dims, submodels=subs)
            copying = True
            count_load(nest.model)
            sd = nest.model.state_dict(keep_vars=True)
            with torch.no_grad():
                for name, targets in copies.items():
                    started += 1  # (a copy interrupted as it returns: copied, not yet counted)
                    f.copy_into(name, [sd[k] for k in targets])
                    done += 1
            casts_stale()  # (loaded inside torch.autocast: the next forwards compute with the loaded weights)
            nest._load_extra_state(meta["extra"])
            if left:  # strict=False left tensors as they were: the file's scores describe the file's model
                nest._scores_of_other_weights()
            if other:  # (warned above, before the copy)
                nest._drop_measured(("flops", "memory", "latency"), other[0], 3, warn=False)
                nest._profile_digest = None  # (what is left, parameters, describes this model)
                nest._scores_of_other_weights()
            mixed = [k for k in left if state[k][0] is not None and state[k][0].is_floating_point()]
            if mixed:  # ... and so do its per-sub-model statistics (an integer counter left changes no weight)
                _drop_mixed_calibration(nest, calib, mixed, where)
            else:
                nest._load_extra_tensors({k: f.tensor(k) for k in calib}, meta["extra"].get("calibration_stale"))
        except BaseException as e:  # (an interrupt, a read error of the disk): past every check, nothing to undo
            if dims is not None:  # a fresh model: back to its own classes, so that sn.load(model, path) can run again
                _unwrap_fresh(model)  # (also when stopped as wrap returned, before its nest was handed over)
            if not copying:  # (wrap refused, or was stopped: it undid itself; nothing was copied)
                raise
            dropped = False
            if started and dims is None:  # an existing nest now holds other (or mixed) weights: its per-sub-model
                dropped = _calibrated(nest)  # statistics describe neither (as load_state_dict drops them)
                nest.drop_calibration()
            if done == len(copies):  # (every weight copied: the calibration / profile step failed)
                msg = (f"checkpoint {where}: all {done} tensors were copied, then restoring the nest's calibration "
                       f"and profile failed ({type(e).__name__}: {e}): the weights are the checkpoint's, the "
                       "per-sub-model statistics and scores may not be" + (
                           " (the nest's own statistics were dropped)" if dropped else "") + "; load again")
            elif started == 0:
                msg = (f"checkpoint {where}: loading stopped before any of its {len(copies)} tensors was copied "
                       f"({type(e).__name__}: {e}): the model holds its own values; load again")
            else:
                msg = (f"checkpoint {where}: loading stopped after {done} of {len(copies)} tensors had been copied "
                       f"({type(e).__name__}: {e}): the model now holds some of the checkpoint's values and some of "
                       "its own" + (", and its per-sub-model BatchNorm statistics were dropped" if dropped else "")
                       + "; load again")
            if not isinstance(e, Exception):
                e.add_note(msg) if hasattr(e, "add_note") else None
                raise
            raise SortedNetError(msg) from e
    return nest


def _unwrap_fresh(model: nn.Module) -> None:
    """Unwrap the nest that load made on ``model``, if it got that far."""
    if any("_sn" in m.__dict__ for m in model.modules()):
        Nest.of(model).unwrap()


def _check_same_nest(nest: Nest, meta: dict[str, Any], where: str) -> None:
    modules = dict(nest.model.named_modules())
    mine = [exact_spec(d, modules) for d in nest.dims]
    theirs = meta["dims"]
    if meta["format"] == FORMATS[0]:  # sortednet/1 stored the patterns as written: compare as text
        mine = [{k: v for k, v in d.spec().items() if (k in t or v) and k not in INFO_FIELDS.get(d.kind, ())}
                for d, t in zip(nest.dims, theirs)]
    else:  # the bound modules decide (in any order within a field), not how the patterns were written
        mine, theirs = [_bound(d) for d in mine], [_bound(d) for d in theirs]
        # an option a later version added, left empty (None, [], ...), is what a file without it says
        mine = [{k: v for k, v in d.items() if k in t or not _empty(v)} if isinstance(d, dict) and isinstance(t, dict)
                else d for d, t in zip(mine, theirs)] + mine[len(theirs):]
    if len(mine) == len(theirs) and mine != theirs and sorted(map(repr, mine)) == sorted(map(repr, theirs)):
        # the same dimensions in another order: the file's sub-model rows, calibration and profile are in its
        # order, so it is refused rather than remapped
        raise SortedNetError(f"checkpoint {where} has the nest's dimensions in another order: saved "
                             f"{[d.get('name') for d in theirs]}, the nest {[d.name for d in nest.dims]}; wrap "
                             "with the dimensions in the checkpoint's order, then load")
    if len(mine) != len(theirs) or any(a != b for a, b in zip(mine, theirs)):
        diff = next(((a, b) for a, b in zip(theirs, mine) if a != b), (theirs, mine))
        fields = ""
        if isinstance(diff[0], dict) and isinstance(diff[1], dict):  # (name the fields: sizes, mode, targets...)
            keys = [k for k in {**diff[0], **diff[1]} if diff[0].get(k) != diff[1].get(k)]
            fields = f" ({diff[0].get('name')!r}: " + ", ".join(
                f"{k} {diff[0].get(k)!r} saved, {diff[1].get(k)!r} in the nest" for k in keys)[:300] + ")"
        raise SortedNetError(f"checkpoint {where} dimensions {[d.get('name') for d in theirs]} "
                             f"{[d.get('sizes') for d in theirs]} differ from the nest's "
                             f"{[d.name for d in nest.dims]} {[list(d.sizes) for d in nest.dims]}{fields}: "
                             f"saved {str(diff[0])[:300]} vs {str(diff[1])[:300]}")
    rows = rows_of(meta, where)
    n = len(nest.submodels)
    if rows is None:
        if n != _product(nest):
            raise SortedNetError(f"checkpoint {where} holds all {_product(nest)} sub-models but the nest lists "
                                 f"{n}; wrap with the same submodels=")
        return
    names = [d.name for d in nest.dims]
    missing = next((r for r in rows if dict(zip(names, r)) not in nest.submodels), None)
    if len(rows) != n or missing is not None:
        raise SortedNetError(f"checkpoint {where} lists {len(rows)} sub-models, the nest {n}"
                             + (f"; e.g. {dict(zip(names, missing))} is not in the nest" if missing else "")
                             + "; wrap with the same submodels=")


def _empty(v: Any) -> bool:
    """An option left at its empty default (None, False, an empty list / dict)."""
    return v is None or v is False or (isinstance(v, (list, tuple, dict)) and not v)


def _bound(spec: Any) -> Any:
    """A stored / exact dimension spec as compared by ``load``: without the patterns as written (kept for
    information), each list of matched module paths as a set."""
    if not isinstance(spec, dict):
        return spec
    fields = PATTERN_FIELDS.get(spec.get("kind"), ())
    return {k: sorted(v) if k in fields and isinstance(v, list) and all(isinstance(x, str) for x in v) else v
            for k, v in spec.items() if k != "patterns" and k not in INFO_FIELDS.get(spec.get("kind"), ())}


def _calibrated(nest: Nest) -> bool:
    from .calibrate import batchnorms

    return any(m._sn.norm is not None for m in batchnorms(nest).values())


def _drop_mixed_calibration(nest: Nest, calib: Any, left: list[str], where: str) -> None:
    """``strict=False`` left ``left`` as they were: neither the file's per-sub-model BatchNorm statistics nor the
    nest's own describe the weights now held; dropped, with a warning when there were any."""
    from .calibrate import StaleCalibrationWarning

    had = _calibrated(nest)
    nest.drop_calibration()
    if calib or had:
        import warnings

        warnings.warn(f"sn.load(strict=False) of {where}: {len(left)} of the model's tensors are not in the file "
                      f"(e.g. {left[0]!r}) and were left as they were, so the per-sub-model BatchNorm statistics "
                      "(the file's and the nest's) describe other weights than those now held and were dropped; "
                      "run nest.calibrate(...) again", StaleCalibrationWarning, stacklevel=3)


def _unwritable(f: ck.Container, state: Mapping[str, tuple], copies: dict[str, list[str]], where: str) -> set[str]:
    """Targets whose elements share memory (a buffer registered as ``torch.ones(1).expand(n)``) cannot be
    written: a file value equal to what they hold is skipped (dropped from ``copies`` and returned), any other
    refused."""
    equal: set[str] = set()
    for name, targets in list(copies.items()):
        shared = [k for k in targets
                  if state[k][0] is not None and torch._debug_has_internal_overlap(state[k][0]) == 1]
        if not shared:
            continue
        src = f.tensor(name)  # (on the CPU: compared where each target lives)
        if all(torch.equal(src.to(state[k][0].device), state[k][0]) for k in shared):
            copies[name] = [k for k in targets if k not in shared]
            equal.update(shared)
            continue
        raise SortedNetError(f"checkpoint {where}: the model's {shared[0]!r} is a broadcast view whose elements share "
                             "memory (registered as an expand()), so it cannot hold the saved values, which differ "
                             "from its own; register it as a full tensor (.clone()) in the model, then load")
    return equal


def _match_tensors(f: ck.Container, state: dict[str, tuple], strict: bool, where: str,
                   ties: list[list[str]] = ()) -> dict[str, list[str]]:
    """File tensor -> target names it fills; every name, shape and dtype checked. A name the file stored
    under a tied partner's (``ties``) takes that tensor (a model that holds the two apart gets it in each)."""
    stored_as = {k: g[0] for g in ties for k in g}
    copies: dict[str, list[str]] = {}
    missing: list[str] = []
    for group in _alias_groups(state):
        present = [k for k in group if k in f.entries]
        if len(present) > 1:
            raise SortedNetError(f"checkpoint {where} stores {present} separately, but in the model they are one "
                                 "shared (tied) tensor")
        if not present:
            present = list(dict.fromkeys(stored_as[k] for k in group if k in stored_as))[:1]
        if not present:
            missing += group
            continue
        e = f.entries[present[0]]
        _, shape, dtype = state[group[0]]
        if e.shape != shape:
            raise SortedNetError(f"checkpoint {where}: {present[0]!r} has shape {list(e.shape)}, the model's "
                                 f"{group[0]!r} {list(shape)}")
        if e.dtype != dtype:
            raise SortedNetError(f"checkpoint {where}: {present[0]!r} is {e.dtype}, the model's {group[0]!r} is "
                                 f"{dtype}; sortednet does not cast silently: load into a model of the saved dtype "
                                 "and convert it afterwards (model.to(dtype))")
        copies[present[0]] = copies.get(present[0], []) + group
    unexpected = [k for k in f.entries if k not in state and not k.startswith(EXTRA_PREFIX)]
    if strict and (missing or unexpected):
        raise SortedNetError(f"checkpoint {where} does not fit the model: missing keys {sorted(missing)[:8]}, "
                             f"unexpected keys {sorted(unexpected)[:8]} (load(..., strict=False) skips them)")
    return copies

"""Normalisation layers over sliced features (``norm`` role).

LayerNorm / RMSNorm over the last dimension; GroupNorm when the channels per
group divide every size (the group count follows); BatchNorm1d/2d/3d with
sliced affine parameters and running statistics; InstanceNorm1d/2d/3d likewise;
PReLU slopes per channel. BatchNorm statistics are shared prefixes: small sub-models
need recalibration (``nest.calibrate``, see
sortednet/calibrate.py), after which eval mode and export use per-sub-model ones
(:class:`NormStats` on ``module._sn.norm``, filled by calibrate, read here).
"""

from __future__ import annotations

import copy
import operator
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import PatternError, SizeError, SortedNetError
from ..modes import in_dry_run
from ..views import REGISTRATIONS, _compiling, count_registrations, fx_flag
from .base import Slicer, slicer
from .depth import _pin_checkpoints

if TYPE_CHECKING:
    from ..dims import Dimension

_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


@dataclass(frozen=True)
class NormStats:
    """Calibrated BatchNorm running statistics of one sliced module (``module._sn.norm``).

    ``stats`` maps the active sizes of ``dims`` to that sub-model's ``running_mean`` /
    ``running_var``; ``override`` (set by ``nest.calibrate`` on its private copy while it
    accumulates) wins over everything. Filled by :mod:`sortednet.calibrate` and ``sn.load``,
    replaced as a whole (readers on other threads see the old or the new object).

    >>> import torch
    >>> NormStats(override={"running_mean": torch.zeros(2)}).active("running_mean", training=True)
    tensor([0., 0.])
    >>> NormStats().active("running_var", training=False) is None
    True
    """

    dims: tuple[Dimension, ...] = ()
    stats: dict[tuple[int, ...], dict[str, Tensor]] = field(default_factory=dict)
    override: dict[str, Tensor] | None = None
    #: version counter of each stored tensor when stored (see :func:`unwritten`)
    base: dict[int, int] = field(init=False, repr=False, compare=False, default_factory=dict)
    #: what the statistics were computed after (see :meth:`watch`): ``at``, each ``num_batches_tracked`` tensor
    #: of the module seen (weakly keyed) -> (version counter, value) then: every training-mode forward adds 1 to
    #: it, while PyTorch does not count its running-statistics updates; ``stale``, sub-models whose statistics were
    #: already older than a training-mode forward when this object was made; ``told``, a flag shared by the
    #: modules of one calibration (one warning for all of them)
    since: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.base.update((id(t), t._version) for d in self.stats.values() for t in d.values()
                         if not t.is_inference())

    def __deepcopy__(self, memo: dict) -> NormStats:
        """A copy with its own tensors, counted from now (deep-copying a tensor moves its version counter); a
        statistic written in place before stays marked written in the copy."""
        new = NormStats(copy.deepcopy(self.dims, memo), copy.deepcopy(self.stats, memo),
                        copy.deepcopy(self.override, memo)).carry(self)
        told = self.since.get("told", [False])  # (one flag for the copy's modules of one calibration, as here)
        new.since.update(self.since, told=memo.setdefault(("sortednet.told", id(told)), [bool(told[0])]))
        forwards = new.since.pop("forwards", None)  # (the model's count: a copy's own forwards are not counted;
        if forwards is not None and forwards[0][0] != forwards[1]:  # the model's since the calibration are kept)
            new.since["trained"] = True
        weights = new.since.pop("weights", None)  # (a move of the model's weights since the calibration is kept;
        if weights is not None and weights.check():  # a copy of the whole model watches its own from there)
            new.since["trained"] = True
        elif weights is not None:
            twin = copy.deepcopy(weights, memo)
            if twin is not None:
                new.since["weights"] = twin
        if "at" in self.since:  # each counter's copy (a module's buffers are copied before its sortednet state)
            at = new.since["at"] = WeakIdKeyDictionary(self.since["at"])  # counts from the same baseline; one
            for t, base in list(self.since["at"].items()):                # not copied yet: from its first read
                twin = memo.get(id(t))
                if isinstance(twin, Tensor) and twin is not t:
                    at[twin] = (None, base[1])  # (its version counter is its own: compared by value first)
        return new

    def to(self, like: Tensor) -> NormStats:
        """The statistics in ``like``'s dtype and on its device (a statistic written in place stays marked)."""
        with torch.inference_mode(False):
            new = NormStats(self.dims, {k: {n: t.to(device=like.device, copy=True,  # (a batch count stays long)
                                                 dtype=like.dtype if t.is_floating_point() else t.dtype)
                                            for n, t in d.items()} for k, d in self.stats.items()},
                            self.override).carry(self)
        new.since.update(self.since)
        return new

    def written(self, t: Tensor) -> bool:
        """Whether stored statistic ``t`` was written in place since it was stored (its version counter)."""
        return not t.is_inference() and t._version != self.base.get(id(t), 0)

    def carry(self, old: NormStats, keys: Any = None) -> NormStats:
        """Keep ``old``'s written marks in this one, made from it (the same sub-models' statistics, converted,
        copied or carried over): a new object counts versions from now and would otherwise pass a write made
        before it. ``keys``: the sub-models carried (default: all of ``old``'s). Returns ``self``."""
        for k in old.stats if keys is None else keys:
            for n, t in old.stats.get(k, {}).items():
                mine = self.stats.get(k, {}).get(n)
                if mine is not None and old.written(t):
                    self.base[id(mine)] = -1  # (no version counter is negative: unwritten() refuses it)
        return self

    def watch(self, m: nn.Module, told: list[bool], stale: Any = (), forwards: list[int] | None = None,
              weights: WeightWatch | None = None) -> NormStats:
        """Count training-mode forwards of ``m`` from now (see :func:`trained_since`); ``stale``: keys of
        statistics carried over that were already out of date; ``forwards``: the nest's count of training-mode
        forwards with gradients of its model (any of them moves what reaches ``m``, though ``m`` itself may not
        run: a layer past the depth trained); ``weights``: the calibration's :class:`WeightWatch` (a step of the
        weights, wherever it came from: a part of the model trained on its own, a compiled forward). Returns
        ``self``."""
        if forwards is not None:
            self.since["forwards"] = (forwards, forwards[0])
        if weights is not None:
            self.since["weights"] = weights
        at, now = WeakIdKeyDictionary(), _counter(m)
        if now is not None:
            at[now[0]] = (now[1], _value(now[0]))
        for t, version in _shared(m):  # (and the shared statistics: written into in place since, they moved)
            at[t] = (version, t.detach().clone())
        self.since.update(at=at, told=told, stale=frozenset(stale))
        return self

    def active(self, name: str, *, training: bool, any_mode: bool = False) -> Tensor | None:
        """Statistic ``name`` for the active sub-model, or None (none calibrated for it, or
        ``training`` and not ``any_mode``)."""
        if self.override is not None:
            return self.override.get(name)
        if not self.stats or (training and not any_mode):
            return None
        hit = self.stats.get(tuple(d.active for d in self.dims))
        return None if hit is None else hit.get(name)  # (a batch count is absent from older checkpoints)


def _fingerprint(t: Tensor, rounded: bool = False) -> Tensor | None:
    """Sum, norm, a sum weighted by position along each axis (``u @ t @ v`` of ``t`` as a matrix: units reordered
    in place, which keep the sum and norm, move it) and the sum of magnitudes (the scale :func:`_same` compares
    at) of ``t``'s values, all in float64, in row-major order and in row blocks of bounded size (a bfloat16 weight
    is not summed in bfloat16, a large one is not converted at once): one row of 4; ``rounded``, one more row for
    the values rounded to each other floating dtype of :data:`_ROUNDINGS` (the same weights after ``model.half()``,
    ``.bfloat16()``, or a round trip such as ``.half().float()``). On ``t``'s device, not synchronised. None where
    none can be taken without a cost of its own (a meta tensor, a DTensor: a collective)."""
    if t.is_meta or type(t.data).__name__ == "DTensor":
        return None
    with torch.no_grad():
        try:
            t = t.detach()
            if t.is_complex():
                t = torch.view_as_real(t)
            mat = t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)
            rows, cols = mat.shape
            kinds = [None] + ([d for d in _ROUNDINGS if d != t.dtype] if rounded and t.is_floating_point() else [])
            out = torch.zeros(len(kinds), 4, dtype=torch.float64, device=t.device)
            if mat.numel() == 0:
                return out
            u = torch.linspace(1, 2, rows, dtype=torch.float64, device=t.device)
            v = torch.linspace(1, 3, cols, dtype=torch.float64, device=t.device)
            step = max(1, _BLOCK // cols)
            for i in range(0, rows, step):  # (blocks that stay in cache: converting a whole weight to float64
                block = mat[i:i + step]      # at once cost more than every sum over it)
                for k, d in enumerate(kinds):
                    part = (block if d is None else block.to(d)).to(torch.float64)
                    flat = part.reshape(-1)
                    out[k] += torch.stack([flat.sum(), torch.dot(flat, flat), u[i:i + step] @ part @ v,
                                           torch.linalg.vector_norm(flat, 1)])
            out[:, 1] = out[:, 1].sqrt()
            return out
        except Exception:
            return None


_BLOCK = 1 << 18  # elements of a weight that _fingerprint converts to float64 at once (2 MiB)
_ROUNDINGS = (torch.float32, torch.bfloat16, torch.float16)
_EXACT = 1e-12  # _same's relative error: float64 rounding of the sums (their order follows the thread count)


def _same(now: Tensor, held: Tensor) -> bool:
    """Whether fingerprint ``now`` (one row of :func:`_fingerprint`) is of the values ``held`` was taken of (any
    of its rows: those values, or them rounded to another dtype), up to float64 rounding of the sums."""
    now, held = now[0], held.to(now.device)
    scale = torch.maximum(held[:, 3], now[3])
    limit = torch.stack([scale, torch.maximum(held[:, 1], now[1]), 6 * scale, scale], 1) * _EXACT
    return bool(((now - held).abs() <= limit).all(1).any())


def _ptr(t: Tensor) -> int | None:
    """``t``'s data pointer (a write through ``.data``, ``vector_to_parameters``, moves it, not the version
    counter), or None where it has none (a tensor subclass without storage)."""
    try:
        return t.data_ptr()
    except Exception:
        return None


def _watched(model: nn.Module, skip: frozenset, known: dict | None = None) -> tuple[list[list[Any]], list[Any]]:
    """What :class:`WeightWatch` watches in ``model``: one entry per parameter slot and persistent buffer slot,
    ``[slots dict, name, path, tensor, version, data pointer, fingerprint]`` (floating-point buffers only: a call
    or step counter a forward moves is no weight; the buffers of the modules at paths ``skip`` left out: the
    calibrated ones, whose statistics are watched by their own counters), and one per
    module, ``(path, children dict, children, parameter slots dict, parameter names, empty slots)`` (a module
    replaced or added, a parameter slot added or removed: ``torch.nn.utils.prune``, an adapter; ``(slots dict,
    name)`` of each parameter or persistent buffer slot holding None, a bias one may fill later). ``known``: path
    -> (tensor id, version, data pointer, fingerprint) of tensors whose fingerprint is not taken again while
    those hold."""
    slots: list[list[Any]] = []
    tree: list[Any] = []
    for path, m in model.named_modules():
        gone = m.__dict__.get("_non_persistent_buffers_set", ())
        tree.append(_entry(path, m, skip))
        held = [(m._parameters, n, p) for n, p in m._parameters.items()]
        if path not in skip:
            held += [(m._buffers, n, b) for n, b in m._buffers.items()
                     if n not in gone and b is not None and b.is_floating_point()]
        for store, n, t in held:
            if t is None or t.is_inference():
                continue
            where, ptr = f"{path}.{n}" if path else n, _ptr(t)
            old = known.get(where) if known is not None else None
            same = old is not None and old[:3] == (id(t), t._version, ptr)
            slots.append([store, n, where, t, t._version, ptr, old[3] if same else _fingerprint(t, rounded=True)])
    return slots, tree


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _entry(path: str, m: nn.Module, skip: frozenset) -> tuple[Any, ...]:
    """:func:`_watched`'s entry of module ``m`` at ``path``: ``(path, children dict, children, parameter slots dict,
    parameter names, empty slots, whether it is a container whose children all run)``."""
    gone = m.__dict__.get("_non_persistent_buffers_set", ())
    vacant = [(m._parameters, n) for n, p in m._parameters.items() if p is None] + (
        [(m._buffers, n) for n, b in m._buffers.items() if b is None and n not in gone] if path not in skip else [])
    return (path, m._modules, tuple(m._modules.values()), m._parameters, tuple(m._parameters), vacant,
            isinstance(m, _CONTAINERS))


def _same_children(now: tuple[Any, ...], was: tuple[Any, ...], container: bool) -> bool:
    """Whether a module's children ``now`` compute what the ones it had (``was``) did: each in its place the same
    module or one :func:`_equivalent` to it (a forward re-creating its activation, ``self.act = nn.GELU()``, or
    its list, ``nn.ModuleList(list(self.blocks))``, at each call), and, in a module that is no container (whose
    children all run: a Sequential, a list), modules added after them that hold no parameter or buffer (one a
    forward creates at its first call, after the calibration's forwards ran on a private view): no weight the
    statistics were computed with moved."""
    return (len(now) == len(was) or (len(now) > len(was) and not container)) and all(map(_equivalent, now, was)) \
        and all(c is None or (next(c.parameters(), None) is None and next(c.buffers(), None) is None)
                for c in now[len(was):])


_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_BOOKKEEPING = frozenset(nn.Module().__dict__) | {"_sn"}


def _equivalent(a: Any, b: Any, depth: int = 0) -> bool:
    """``a`` is ``b``, or both are modules of one class holding no tensor of their own, whose every other
    attribute (public or not: a scale kept as ``self._s``, a function, a tensor or list attribute) is the same
    object or an equal number or string (nn.Module's own bookkeeping aside), with children that are pairwise
    so."""
    if a is b:
        return True
    if not isinstance(a, nn.Module) or type(a) is not type(b) or depth > 8:
        return False
    if any(t is not None for m in (a, b) for t in (*m._parameters.values(), *m._buffers.values())):
        return False
    va, vb = ({k: v for k, v in vars(m).items() if k not in _BOOKKEEPING} for m in (a, b))
    if va.keys() != vb.keys() or any(
            x is not y and not (type(x) is type(y) and isinstance(x, _SCALARS) and x == y)
            for x, y in ((va[k], vb[k]) for k in va)):
        return False
    return list(a._modules) == list(b._modules) and all(
        _equivalent(x, y, depth + 1) for x, y in zip(a._modules.values(), b._modules.values()))


class WeightWatch:
    """What every calibrated statistic of one calibration (or load) was computed after, model-wide: the tensor in
    each parameter slot and persistent buffer slot of the model (the calibrated statistics left out), its version
    counter and data pointer (an optimizer step, a load, any in-place write, a write through ``.data`` moves one;
    a fused optimizer's step is made to, see ``views.watch_fused_steps``), and the model's modules and parameter
    names. Where a counter moved, the values are compared by :func:`_fingerprint` (sortednet's dry runs put
    statistics back, DDP broadcasts the same weights, a load may copy the same ones, ``model.half()`` rounds
    them). Once any moved, every statistic of the calibration describes the model as it was before (a layer that
    changed may sit where the calibrated ones never run: a shallow sub-model trained). Shared by the calibration's
    :class:`NormStats`; read at most once per forward of the model (``key``: the pin's forward key of this
    thread, None outside one): the counters and pointers of the tensors held, and the slots and modules only
    after a module, parameter or buffer was registered anywhere (``views.REGISTRATIONS``). A deep copy of the
    model (an EMA) gets its own (:meth:`__deepcopy__`)."""

    __slots__ = ("root", "skip", "slots", "tree", "tensors", "versions", "pointed", "ptrs", "epoch", "moved",
                 "key", "memo", "base", "stores", "names", "kids", "was", "vacant")

    def __init__(self, model: nn.Module, calibrated: Any, key: Any = None) -> None:
        count_registrations()
        calibrated = {id(m) for m in calibrated}
        self.skip = frozenset(p for p, m in model.named_modules() if id(m) in calibrated)
        self.root = weakref.ref(model)
        self.base: tuple[dict, list] | None = None  # (a copy's until its first read, see __deepcopy__)
        self.epoch = REGISTRATIONS[0]
        self._hold(*_watched(model, self.skip))
        self.moved = False
        self.key = None if key is None else weakref.WeakMethod(key)
        self.memo = threading.local()

    def _hold(self, slots: list[list[Any]], tree: list[Any]) -> None:
        """Take ``slots`` and ``tree`` (:func:`_watched`) as the ones compared from now, with the lists of the fast
        path (each held tensor's version counter and data pointer)."""
        self.slots, self.tree = slots, tree
        self.tensors, self.versions = [e[3] for e in slots], [e[4] for e in slots]
        self.pointed, self.ptrs = [e[3] for e in slots if e[5] is not None], [e[5] for e in slots if e[5] is not None]
        # (the slots themselves and the children: a tensor or module put straight into a module's dicts,
        # module._parameters[n] = t, as accelerate's loading, to_empty() and torch.func.functional_call do, calls
        # no registration hook)
        self.stores, self.names = [e[0] for e in slots], [e[1] for e in slots]
        self.kids, self.was = [e[1] for e in tree], [e[2] for e in tree]
        self.vacant = [v for e in tree for v in e[5]]

    def __deepcopy__(self, memo: dict) -> WeightWatch | None:
        """The watch of a deep copy of the whole model (None for a copy of a part: its weights are not watched).
        At its first read it compares the copy's weights and modules with the ones the statistics were computed
        after (a tensor the copy shares with the model, unchanged since, is not read again: a private view)."""
        root = self.root()
        twin = memo.get(id(root)) if root is not None else None
        if not isinstance(twin, nn.Module) or twin is root:
            return None
        new = WeightWatch.__new__(WeightWatch)
        new.root, new.skip, new.key, new.memo = weakref.ref(twin), self.skip, self.key, threading.local()
        new.moved, new.epoch = self.check(), -1
        new.base = ({e[2]: (id(e[3]), e[4], e[5], e[6]) for e in self.slots},
                    [(e[0], tuple(e[1]), tuple(e[3])) for e in self.tree])
        new._hold([], [])
        return new

    def check(self) -> bool:
        """Whether anything watched moved since (once moved, stays so). Not looked at in sortednet's dry runs
        (nothing of theirs is kept); read with torch functions off, so that a mode watching which weights a
        forward reads (check's, a user's) does not count these reads as the forward's."""
        if self.moved or in_dry_run():
            return self.moved
        key = self.key() if self.key is not None else None
        now = key() if key is not None else None
        if now is not None and self.memo.__dict__.get("key") == now:
            return False
        with torch._C.DisableTorchFunction():
            try:
                moved = self._first() if self.base is not None else self._moved()
            except Exception:  # (a slot holding what has no version counter or values to compare)
                moved = True
        if moved:
            self.moved = True
            self._hold([], [])  # (nothing more to compare: the tensors are not kept alive)
            return True
        if now is not None:
            self.memo.key = now
        return False

    def _first(self) -> bool:
        """A copy's first read: its weights and modules against the ones its statistics were computed after."""
        root = self.root()
        if root is None:
            return False
        known, names = self.base
        epoch = REGISTRATIONS[0]
        slots, tree = _watched(root, self.skip, known)
        if sorted((e[0], tuple(e[1]), tuple(e[3])) for e in tree) != sorted(names) or \
                sorted(e[2] for e in slots) != sorted(known):
            return True
        for e in slots:
            held = known[e[2]]
            if (id(e[3]), e[4], e[5]) != held[:3] and (e[6] is None or held[3] is None
                                                       or not _same(e[6], held[3])):
                return True
        self.base, self.epoch = None, epoch
        self._hold(slots, tree)
        return False

    def _moved(self) -> bool:
        epoch = REGISTRATIONS[0]
        if (epoch == self.epoch and [t._version for t in self.tensors] == self.versions
                and [t.data_ptr() for t in self.pointed] == self.ptrs
                and all(map(operator.is_, map(dict.get, self.stores, self.names), self.tensors))
                and list(map(tuple, map(dict.values, self.kids))) == self.was
                and not any(store.get(n) is not None for store, n in self.vacant)):
            return False
        changed = []
        for i, (_, kids, was, params, names, vacant, container) in enumerate(self.tree):
            now = tuple(kids.values())
            if (now != was and not _same_children(now, was, container)) or tuple(params) != names or any(
                    store.get(n) is not None for store, n in vacant):
                return True
            if now != was:  # (the modules now there are watched from here)
                changed.append((i, was))
        unsure = False
        for e in self.slots:
            store, n, _, old, v, ptr, held = e
            t = store.get(n)
            if t is old and t._version == v and _ptr(t) == ptr:
                continue
            if t is not None and t.is_meta:  # (a meta forward computes no values, and its weights have none to
                unsure = True                # compare: told once the slot holds values again)
                continue
            now = None if t is None or t.is_inference() or held is None else _fingerprint(t)
            if now is None or not _same(now, held):
                return True
            e[3], e[4], e[5] = t, t._version, _ptr(t)
        if not unsure:
            self.epoch = epoch
            if changed:
                self._retree(changed)
            self._hold(self.slots, self.tree)
        return False

    def _retree(self, changed: list[tuple[int, tuple[Any, ...]]]) -> None:
        """The tree after children were replaced by equivalent ones or tensor-free ones were added (``changed``:
        index of each parent's entry, its children before): the parents' entries take their children now, the
        modules gone leave it, the new ones (no tensors of their own: the slots stay) join it."""
        tree = self.tree
        held = {id(e[1]) for e in tree}
        drop: set[int] = set()
        add: list[tuple[Any, ...]] = []
        for i, was in changed:
            path, kids = tree[i][0], tree[i][1]
            tree[i] = (*tree[i][:2], tuple(kids.values()), *tree[i][3:])
            for k, (name, new) in enumerate(kids.items()):
                old = was[k] if k < len(was) else None
                if new is old:
                    continue
                fresh = {} if new is None else {id(m._modules): (p, m) for p, m in new.named_modules(
                    prefix=f"{path}.{name}" if path else name)}
                if old is not None:
                    drop |= {id(m._modules) for m in old.modules()} - set(fresh)
                add += [_entry(p, m, self.skip) for key, (p, m) in fresh.items() if key not in held]
                held |= set(fresh)
        self.tree = [e for e in tree if id(e[1]) not in drop] + add


def unwritten(path: str, name: str, t: Tensor, norm: NormStats) -> Tensor:
    """``t``, a calibrated statistic of ``norm``, after checking that nothing wrote into it in place (its version
    counter; a write through ``.data`` is not counted, as in PyTorch's own checks)."""
    if norm.written(t):
        raise SortedNetError(f"{path}.{name}: the calibrated statistics of a sub-model were changed in place (e.g. "
                             f"{path}.{name}.zero_() or .copy_(...) in eval mode after nest.calibrate): in eval mode "
                             f"a calibrated BatchNorm's {name} is that sub-model's own statistic, not the shared "
                             "buffer, which the write did not reach. nest.drop_calibration() (eval reads the shared "
                             "buffers again) or nest.calibrate(...) again; module.reset_running_stats() drops the "
                             "module's calibration itself")
    return t


class StaleCalibrationWarning(UserWarning):
    """Eval mode, ``export`` or ``sn.save`` read per-sub-model BatchNorm statistics of ``nest.calibrate`` (or of a
    loaded checkpoint) after training-mode forwards of the model: they describe the model as it was before."""


def _counter(m: nn.Module) -> tuple[Tensor, int] | None:
    """``m``'s shared ``num_batches_tracked`` and its version counter, or None (none, or an inference tensor: no
    version counter)."""
    t = m.__dict__["_buffers"].get("num_batches_tracked")
    if t is None:
        return None
    try:
        return t, t._version
    except RuntimeError:
        return None


def _value(t: Tensor) -> int | None:
    try:
        return int(t)
    except Exception:  # (a meta tensor: no value)
        return None


def _shared(m: nn.Module) -> list[tuple[Tensor, int]]:
    """``m``'s shared ``running_mean`` / ``running_var`` buffers with their version counters (an inference or meta
    tensor left out: no counter, or no value)."""
    out = []
    for name in ("running_mean", "running_var"):
        t = m.__dict__["_buffers"].get(name)
        if t is not None and not t.is_meta:
            try:
                out.append((t, t._version))
            except Exception:  # (an inference tensor)
                continue
    return out


def _shared_written(m: nn.Module, at: Any) -> bool:
    """Whether a shared running statistic of ``m`` was written into in place with other values since it was seen
    (an EMA copy's buffers synced with ``copy_`` while eval mode reads the calibrated ones). Compared by value only
    where its version counter moved (a run that put the values back, a dry run of sortednet's, moves the counter,
    not the values); one first seen here (``model.to(...)``, a copy) is counted from now."""
    for t, version in _shared(m):
        base = at.get(t)
        if base is not None and base[0] == version:
            continue
        held = None if base is None else base[1]
        if not isinstance(held, Tensor) or held.shape != t.shape or held.dtype != t.dtype or held.device != t.device:
            at[t] = (version, t.detach().clone())
            continue
        if not torch.equal(held, t):
            return True
        at[t] = (version, held)
    return False


def trained_since(m: nn.Module, norm: NormStats) -> bool:
    """Whether ``m`` ran a training-mode forward since ``norm`` was computed or loaded: its batch counter
    ``num_batches_tracked`` (+1 per training-mode forward) holds another value. Read only when the counter's
    version moved (PyTorch does not count running-statistics updates, but it counts the counter's); a run that put
    the counter back to its value (a dry run of sortednet's) moved the version, not the value. A counter first seen
    here (``model.to(device)``, a deep copy, a view's own copy) is counted from now; once seen trained, it stays so.
    Also true once the model trained anywhere since (the nest's count of its forwards with gradients, the
    calibration's :class:`WeightWatch`)."""
    since = norm.since
    if since.get("trained"):
        return True
    forwards = since.get("forwards")
    if forwards is not None and forwards[0][0] != forwards[1]:
        since["trained"] = True
        return True
    weights = since.get("weights")
    if weights is not None and weights.check():
        since["trained"] = True
        return True
    at, now = since.get("at"), _counter(m)
    if at is not None and _shared_written(m, at):
        since["trained"] = True
        return True
    if at is None or now is None:
        return False
    t, version = now
    base = at.get(t)
    if base is not None and base[0] == version:
        return False
    value = _value(t)
    if base is None or value is None or base[1] is None or value == base[1]:
        at[t] = (version, value)
        return False
    since["trained"] = True
    return True


def _warn_if_trained(path: str, m: nn.Module, norm: NormStats) -> None:
    told = norm.since.get("told")
    if told is None or told[0]:
        return
    key = tuple(d.active for d in norm.dims)
    if not (trained_since(m, norm) or key in norm.since["stale"]):
        return
    told[0] = True
    warnings.warn(f"{path}: this sub-model's BatchNorm statistics from nest.calibrate (or sn.load) predate "
                  "training of the model (training-mode forwards with gradients, a step or another in-place write "
                  "of its weights; any part of it, called on its own too), or writes into its shared running "
                  "statistics (they or num_batches_tracked moved since: a training step, an EMA's copy_ of another "
                  "model's): eval "
                  "mode and export still read them, and they describe the model as it was then (its weights of "
                  "before, if it trained). "
                  "Calibrate again after training (nest.calibrate(loader)), or nest.drop_calibration() to read the "
                  "shared statistics (sn.fit and SortedTrainer drop them as they train)", StaleCalibrationWarning,
                  stacklevel=4)


def _same_storage(a: Tensor, b: Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.device == b.device
    except Exception:  # (a tensor without storage: a meta or functional one)
        return a is b


def active_stats(m: nn.Module, name: str, *, any_mode: bool = False) -> Tensor | None:
    """The calibrated ``running_mean`` / ``running_var`` of sliced ``m`` for the active
    sub-model, or None (no calibration for it, or ``m`` is training and not ``any_mode``).
    In the dtype and on the device of ``m``'s own buffer: ``model.to(...)`` after calibrating
    (or after ``sn.load``) moves the buffers, and the calibrated statistics follow them."""
    st = m.__dict__["_sn"]
    norm = st.norm
    own = None if norm is None else norm.active(name, training=m.training, any_mode=any_mode)
    if own is not None and norm.override is None and not _compiling():  # (a version counter is no graph value)
        unwritten(st.path, name, own, norm)
        _warn_if_trained(st.path, m, norm)
    buf = m.__dict__["_buffers"].get(name)
    if own is not None and buf is not None and (own.dtype != buf.dtype or own.device != buf.device):
        if norm.override is None and not _compiling() and not buf.is_meta:  # converted once and kept (one
            st.norm = norm = norm.to(buf)  # assignment), so that a write into what this returns is seen like any
            # other; (not to the meta device, a shape pass's: the statistics' values would be gone)
            return norm.active(name, training=m.training, any_mode=any_mode)
        own = own.to(device=buf.device, dtype=buf.dtype)
    return own


_STATS = ("running_mean", "running_var", "num_batches_tracked")


@slicer(nn.LayerNorm, *_RMS)
class LayerNormSlicer(Slicer):
    roles = ("norm",)
    attrs = ("weight", "bias", "normalized_shape")
    views = {"weight": ((0, "norm"),), "bias": ((0, "norm"),)}
    static = ("normalized_shape",)

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["normalized_shape"][-1]

    def check(self, m: nn.Module, bind: dict, path: str) -> None:
        if len(m.__dict__["normalized_shape"]) != 1:
            raise PatternError(f"{path!r}: {type(m).__name__} normalised over "
                               f"{tuple(m.__dict__['normalized_shape'])}; only 1-d shapes can be sliced")

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "normalized_shape":
            return (self.features(m, "norm", self.full(m, "norm")),)
        return self.take(m, name, [(0, "norm")])


def group_size(m: nn.Module) -> int:
    """Channels a sub-model keeps or drops together in GroupNorm ``m``: its channels per group (the group
    count follows the active channels), or 1 for ``GroupNorm(1, C)``, which stays one group of the active
    channels (normalised together, as a LayerNorm over fewer features)."""
    g = m.__dict__["num_groups"]
    return 1 if g == 1 else m.__dict__["num_channels"] // g


@slicer(nn.GroupNorm)
class GroupNormSlicer(Slicer):
    roles = ("norm",)
    attrs = ("weight", "bias", "num_channels", "num_groups")
    views = {"weight": ((0, "norm"),), "bias": ((0, "norm"),)}
    static = ("num_channels", "num_groups")

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["num_channels"]

    def check(self, m: nn.Module, bind: dict, path: str) -> None:
        per = group_size(m)
        b = bind["norm"]
        bad = [s for s in b.dim.sizes if b.features(s) % per]
        if bad:
            raise SizeError(f"{path!r}: GroupNorm has {per} channels per group; sizes {bad} of "
                            f"{b.dim.name!r} are not multiples of {per}")

    def value(self, m: nn.Module, name: str) -> Any:
        c = self.features(m, "norm", m.__dict__["num_channels"])
        if name == "num_channels":
            return c
        if name == "num_groups":
            return 1 if m.__dict__["num_groups"] == 1 else c // group_size(m)
        return self.take(m, name, [(0, "norm")])


@slicer(_BatchNorm)
class BatchNormSlicer(Slicer):
    roles = ("norm",)
    attrs = ("weight", "bias", "running_mean", "running_var", "num_features")
    views = {"weight": ((0, "norm"),), "bias": ((0, "norm"),)}  # running stats: per-sub-model when calibrated
    static = ("num_features",)

    def verifies_forward(self, cls: type) -> bool:
        """timm's ``BatchNormAct2d``, a user's subclass: ``check.norm_self_check`` runs them at wrap.
        ``SyncBatchNorm`` is not: its synchronised path runs only under a process group."""
        return not issubclass(cls, nn.SyncBatchNorm)

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["num_features"]

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "num_features":
            return self.features(m, "norm", m.__dict__["num_features"])
        if name in ("running_mean", "running_var") and m.__dict__["_sn"].norm is not None:
            own = active_stats(m, name)  # per-sub-model statistics from nest.calibrate (eval mode)
            if own is not None:  # (read inside an activation checkpoint: its recomputation reads this sub-model's
                if not fx_flag():  # too, wherever backward runs; the full model's have the same
                    _pin_checkpoints(m)          # shape, so PyTorch's recomputation check could not tell them
                return own                       # apart)
        return self.take(m, name, [(0, "norm")])

    def namespace(self, m: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
        base = type(m)

        def reset_running_stats(self_: nn.Module) -> None:
            """Reset the shared running statistics and drop this module's calibrated ones (eval mode read them
            instead of the buffers: ``torch.optim.swa_utils.update_bn`` starts here)."""
            self_.__dict__["_sn"].norm = None
            base.reset_running_stats(self_)

        def __setattr__(self_: nn.Module, name: str, value: Any) -> None:
            """``module.running_mean = tensor`` (plain PyTorch's way to replace a statistic) drops this module's
            calibrated statistics when it changes a value, as ``load_state_dict`` does: eval mode read them
            instead of the buffer, so the assignment was silently ignored."""
            st = self_.__dict__.get("_sn")
            old = self_.__dict__["_buffers"].get(name) if name in _STATS else None
            calibrated = old is not None and st is not None and st.norm is not None and st.norm.override is None
            read = getattr(self_, name) if calibrated else None  # (what eval reads now: the calibrated statistic)
            if calibrated and isinstance(value, Tensor) and any(_same_storage(value, t) for d in st.norm.stats.values()
                                                                 for t in d.values()):
                value = value.detach().clone()  # (a calibrated statistic made the shared buffer would be updated
            base.__setattr__(self_, name, value)  # in place by a training forward, unseen) PyTorch's checks first
            if calibrated and value is not old and not any(
                    isinstance(value, Tensor) and isinstance(t, Tensor) and value.shape == t.shape
                    and torch.equal(value.detach().to(t.device, t.dtype), t.detach()) for t in (old, read)):
                st.norm = None  # (the buffer's values, or what eval reads, written back: m.x = m.x keeps it)

        return {**super().namespace(m, names), "reset_running_stats": reset_running_stats,
                "__setattr__": __setattr__}

    def export(self, live: nn.Module, copy_: nn.Module) -> nn.Module:
        copy_ = super().export(live, copy_)
        for name in ("running_mean", "running_var"):
            own = active_stats(live, name, any_mode=True)
            if own is not None:
                copy_._buffers[name] = own.detach().clone()
        norm = live.__dict__["_sn"].norm
        count = None if norm is None else norm.active("num_batches_tracked", training=False)
        if count is not None and copy_._buffers.get("num_batches_tracked") is not None:
            # the calibration's batch count, not the shared training counter: with momentum=None the next
            # training batch of the export is weighed 1 / (count + 1), as after a plain cumulative recalibration
            copy_._buffers["num_batches_tracked"] = count.detach().to(
                device=copy_._buffers["num_batches_tracked"].device).clone()
        return copy_


@slicer(_InstanceNorm)
class InstanceNormSlicer(Slicer):
    """nn.InstanceNorm1d/2d/3d: per-channel statistics of each sample, so channels are independent; the
    affine parameters and (``track_running_stats=True``) running statistics are sliced with them. (Not
    calibrated per sub-model: ``nest.calibrate`` recomputes BatchNorm statistics only.)"""

    roles = ("norm",)
    attrs = ("weight", "bias", "running_mean", "running_var", "num_features")
    views = {n: ((0, "norm"),) for n in ("weight", "bias", "running_mean", "running_var")}
    static = ("num_features",)

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["num_features"]

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "num_features":
            return self.features(m, "norm", m.__dict__["num_features"])
        return self.take(m, name, [(0, "norm")])


@slicer(nn.PReLU)
class PReLUSlicer(Slicer):
    """nn.PReLU with one slope per channel (``num_parameters=C``): its slopes follow the channels, listed
    under ``norm=`` (the role of per-feature parameters). A PReLU with one shared slope needs no slicing:
    leave it out."""

    roles = ("norm",)
    attrs = ("weight", "num_parameters")
    views = {"weight": ((0, "norm"),)}
    static = ("num_parameters",)

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["num_parameters"]

    def check(self, m: nn.Module, bind: dict, path: str) -> None:
        if m.__dict__["num_parameters"] == 1:
            raise PatternError(f"{path!r}: PReLU with one shared slope (num_parameters=1) has nothing to slice; "
                               "leave it out of norm=")

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "num_parameters":
            return self.features(m, "norm", m.__dict__["num_parameters"])
        return self.take(m, name, [(0, "norm")])

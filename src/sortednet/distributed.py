"""Data-parallel training of a nest: DDP, FSDP2 (``fully_shard``), Accelerate.

Every rank draws the same sub-models from ``Sampler(seed=...).draw(step)`` with
no communication. What needs care is the gradient synchronisation:

- Depth-skipped blocks get no gradient at all in some micro-steps: DDP's reducer,
  which waits for every parameter it cannot prove unused, errors at the next step
  (``find_unused_parameters=False``), or needs a graph traversal per synced backward.
- Nothing in DDP checks that the ranks ran the same sub-models: it would average
  the gradients of different ones as one.

:func:`accumulate` therefore runs every sub-model's backward under DDP's
``no_sync`` and then :func:`sync_gradients` all-reduces every gradient once per
optimizer step, in flat buckets; a parameter no rank touched keeps
``grad=None`` (exactly as in one process). Under FSDP2 each backward's
reduce-scatter already sees the sliced gradients (they land in the unsharded
parameter's ``.grad`` before FSDP2 reads it), so :func:`accumulate` lets FSDP2
do its own reduction. See docs/scaling.md.

>>> import torch, torch.nn as nn, torch.nn.functional as F, sortednet as sn
>>> import sortednet.distributed as snd
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> nest = sn.wrap(model, sn.Width("h", [2, 4, 8], out="0", inp="2"))
>>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
>>> losses = snd.accumulate(nest, nest.submodels, lambda: F.cross_entropy(model(x), y))  # one process: no sync
>>> len(losses), model[0].weight.grad.shape
(3, torch.Size([8, 4]))
"""

from __future__ import annotations

import os
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from .agreement import _FORWARD, _GRADS, _SAVE, _START, _agree_on, _collective_device, _loss_agreement, _sync, _told
from .errors import SortedNetError
from .slicers import is_sharded
from .submodel import SubModel, SubModelLike
from .views import _compiling, is_fsdp
from .views import fsdp_units as _fsdp_modules
from .wrap import _is_fsdp1, count_load, loads

if TYPE_CHECKING:
    from .nest import Nest

__all__ = ["accumulate", "sync_gradients", "sync_buffers", "no_sync", "check_submodels", "guard", "save", "is_fsdp"]

_BUCKET_BYTES = 25 * 2**20


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _ddp_type() -> type:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


def _uncompiled(module: Any) -> Any:
    """``module`` without ``torch.compile``'s wrapper (``torch.compile(DDP(model))`` is still a DDP model)."""
    while isinstance(module, nn.Module) and type(module).__name__ == "OptimizedModule" \
            and isinstance(getattr(module, "_orig_mod", None), nn.Module):
        module = module._orig_mod
    return module


def _inner(module: nn.Module) -> nn.Module:
    module = _uncompiled(module)
    return module.module if isinstance(module, _ddp_type()) else module


@contextmanager
def no_sync(module: nn.Module | None) -> Iterator[None]:
    """Backward passes inside skip the data-parallel gradient reduction of ``module``.

    DDP: its own ``no_sync()``. FSDP2: ``set_requires_gradient_sync(False)``
    (restored to ``True`` on exit). Anything else, or ``None``: nothing.

    >>> import torch.nn as nn, sortednet.distributed as snd
    >>> with snd.no_sync(nn.Linear(2, 2)):
    ...     pass
    """
    module = _uncompiled(module)
    if module is not None and isinstance(module, _ddp_type()):
        with module.no_sync():
            yield
        return
    setter = getattr(module, "set_requires_gradient_sync", None)
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def _refuse_sparse(module: nn.Module, who: str) -> None:
    """Sparse gradients (``nn.Embedding(sparse=True)``) cannot go into one flat ``all_reduce``: refused on every
    rank alike (the modules are the same on every rank), before any backward or collective."""
    sparse = [n for n, m in module.named_modules() if getattr(m, "sparse", False) is True
              and isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    sparse = sparse or [n for n, p in module.named_parameters()
                        if p.grad is not None and p.grad.layout is not torch.strided]
    if sparse:
        raise SortedNetError(f"{who}: {sparse[:3]} produce sparse gradients, which sortednet's one-shot gradient "
                             "averaging does not handle; build them with sparse=False (dense gradients), or "
                             "let DDP itself reduce them (a stock DDP loop without sortednet.distributed)")


def sync_gradients(module: nn.Module, *, group: Any = None, bucket_bytes: int = _BUCKET_BYTES) -> int:
    """Average ``.grad`` of every trainable parameter of ``module`` over the ranks of ``group``.

    Parameters DDP was told to leave alone (``DDP._set_params_and_buffers_to_ignore_for_model``: rank-local
    weights) keep each rank's own gradient, as under DDP itself; those of a part given to FSDP1
    (``FullyShardedDataParallel``, which reduces its own gradients in each backward) are left to it.

    One ``all_reduce`` per bucket of ``bucket_bytes`` (per dtype and device), each gradient divided by the
    number of ranks before the sum (as DDP does: a half-precision gradient does not overflow in the sum).
    A parameter with no gradient on a rank counts as zero there; one with no
    gradient on ANY rank keeps ``grad=None`` (the optimizer skips it, as it
    would in one process). First, one small ``all_reduce`` checks that every rank averages the same parameters
    (names, shapes, dtypes): a parameter frozen on some ranks only would shift the buckets, and the gradients
    of different parameters would be averaged together. A no-op without an initialised process group or
    with one rank. Returns the number of gradient collectives issued.

    >>> import torch, torch.nn as nn, sortednet.distributed as snd
    >>> m = nn.Linear(2, 2); m(torch.ones(1, 2)).sum().backward()
    >>> snd.sync_gradients(m)   # single process: nothing to do
    0
    """
    if not isinstance(module, nn.Module):
        from .nest import Nest

        hint = " (a Nest: pass its model, nest.model, or the DDP wrapper of it)" if isinstance(module, Nest) else ""
        raise SortedNetError(f"sync_gradients() averages the gradients of a module, got "
                             f"{type(module).__name__}{hint}")
    _check_group(group, "sync_gradients")
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise SortedNetError(f"sync_gradients(bucket_bytes=...) takes a positive int (bytes per all_reduce), got "
                             f"{bucket_bytes!r}")
    named = _averaged(module)
    module = _inner(module)
    params = [p for _, p in named]
    sharded = [n for n, p in module.named_parameters() if is_sharded(p)]
    if sharded:
        raise SortedNetError(f"sync_gradients got FSDP2-sharded parameters ({sharded[:3]}); FSDP2 reduces its "
                             "own gradients: use sortednet.distributed.accumulate(..., module=fsdp_model)")
    if not _active() or dist.get_world_size(group) == 1:
        return 0
    _refuse_sparse(module, "sync_gradients")
    _same_parameters(named, bucket_bytes, group)
    world = dist.get_world_size(group)
    buckets: dict[tuple, list[list[nn.Parameter]]] = {}
    for p in params:
        chunks = buckets.setdefault((p.dtype, p.device), [[]])
        if chunks[-1] and sum(q.numel() for q in chunks[-1]) * p.element_size() >= bucket_bytes:
            chunks.append([])
        chunks[-1].append(p)
    calls = 0
    for (dtype, device), chunks in buckets.items():
        for chunk in chunks:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in chunk]
                             + [torch.tensor([float(p.grad is not None) for p in chunk], dtype=dtype, device=device)])
            flat[:-len(chunk)].div_(world)  # (before the sum, as DDP: fp16 gradients summed first overflow)
            dist.all_reduce(flat, group=group)
            calls += 1
            seen = flat[-len(chunk):].tolist()
            offset = 0
            for i, p in enumerate(chunk):
                g = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if seen[i] == 0:
                    continue  # no rank produced a gradient: keep None
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
    return calls


def _averaged(module: nn.Module, frozen: bool = False) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters :func:`sync_gradients` averages over the ranks: all but those DDP leaves alone
    and those of a part given to FSDP1 (it reduce-scatters its gradients itself in every backward and keeps this
    rank's shard; averaged again here, one rank's shard would be added to another's). ``frozen``: the frozen
    ones too (every parameter the replicas hold alike: a LoRA base restored on one rank is another model)."""
    ignored = _ignored(module)
    module = _inner(module)
    fsdp1 = {id(p) for m in module.modules() if _is_fsdp1(m) for p in m.parameters()}
    fsdp1 -= {id(p) for m in module.modules() for p in getattr(m, "_ignored_params", ())}  # (ignored_modules=:
    #                                                                  FSDP1 leaves those to the caller)
    return [(n, p) for n, p in module.named_parameters() if (p.requires_grad or frozen) and n not in ignored
            and id(p) not in fsdp1]


def _check_group(group: Any, who: str) -> None:
    """``group=`` is None (the default group) or a process group (``dist.new_group(...)``)."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise SortedNetError(f"{who}(group=...) takes a process group (torch.distributed.new_group(...)) or None "
                             f"(the default group), got {type(group).__name__} {group!r}"[:300])


def _same_parameters(named: list[tuple[str, nn.Parameter]], bucket_bytes: int, group: Any) -> None:
    """Raise on every rank unless every rank averages the same parameters (names, shapes, dtypes, in order)
    in the same buckets: otherwise the flat buckets would not line up (the gradients of different parameters
    averaged together, in silence) or differ in size (gloo aborts the process). One small ``all_reduce``."""
    import hashlib

    h = hashlib.sha1(str(bucket_bytes).encode())
    for n, p in named:
        h.update(f"{n}|{tuple(p.shape)}|{p.dtype}|{p.device.type}\n".encode())
    same, _ = _sync(_GRADS, int.from_bytes(h.digest()[:7], "big"), (), group)
    if not same:  # (every rank sees it: the collectives stay matched)
        raise _told(f"sync_gradients: the ranks would average different parameters (this rank: {len(named)} "
                    f"trainable, {sum(p.numel() for _, p in named)} values): a parameter frozen, added or re-shaped "
                    "on some ranks only, or another model or nest on some ranks, or another bucket_bytes "
                    f"(this rank: {bucket_bytes}); the gradients of different parameters would be averaged "
                    "together. Build the same model, nest and requires_grad flags on every rank, and give every "
                    "rank the same bucket_bytes")


def _ignored(module: nn.Module) -> set[str]:
    """Names (relative to the model inside a DDP wrapper) of the parameters and buffers DDP leaves alone: the
    wrapper's ``parameters_to_ignore``, or, for the model itself, what
    ``DDP._set_params_and_buffers_to_ignore_for_model`` marked on it."""
    ddp = _uncompiled(module)
    names = set(getattr(ddp, "parameters_to_ignore", ()) or ()) if isinstance(ddp, _ddp_type()) else set()
    return names | set(getattr(_inner(module), "_ddp_params_and_buffers_to_ignore", ()) or ())


def sync_buffers(module: nn.Module, *, group: Any = None) -> int:
    """Copy the buffers (BatchNorm running statistics) of the first rank of ``group`` to every rank, as a
    ``DistributedDataParallel`` wrapper with ``broadcast_buffers=True`` does before each forward that is not under
    its ``no_sync``. sortednet runs every forward of a step under ``no_sync`` (one gradient all-reduce per step), so
    DDP broadcast nothing: :func:`accumulate` and ``SortedTrainer`` call this at each optimizer step's end instead.
    A DDP wrapper built with ``broadcast_buffers=False`` keeps each rank's own, and so do the buffers DDP was told
    to ignore and a buffer whose shape or dtype differs between ranks (a cache one rank grew). One all-reduce
    of a digest of the buffers' names and shapes (an ``all_gather_object`` of them only where they differ), then
    one broadcast per dtype. Returns the number of collectives (0 without a process group of several ranks).

    >>> import torch.nn as nn, sortednet.distributed as snd
    >>> snd.sync_buffers(nn.BatchNorm1d(4))   # single process: nothing to do
    0
    """
    _check_group(group, "sync_buffers")
    ddp = _uncompiled(module)
    ignored = _ignored(module)  # (DDP leaves those alone too)
    if isinstance(ddp, _ddp_type()):
        if not getattr(ddp, "broadcast_buffers", True):
            return 0
        group = ddp.process_group if group is None else group
    if not _active() or dist.get_world_size(group) == 1:
        return 0
    mine = {n: b for n, b in _inner(module).named_buffers() if n not in ignored}
    if not mine:
        return 0
    signature = [(n, tuple(b.shape), str(b.dtype), str(b.device)) for n, b in mine.items()]
    digest = zlib.crc32(repr(signature).encode())
    flag = torch.tensor([digest, -digest], dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)  # max == min == mine: every rank holds the same
    calls = 1
    if int(flag[0]) == digest == -int(flag[1]):
        order = signature
    else:  # a cache grown on one rank only (another shape): the others are broadcast, that one stays each rank's
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, signature, group=group)
        calls += 1
        common = set.intersection(*(set(e) for e in every))
        order = [e for e in every[0] if e in common]  # in the first rank's order on every rank
    src = 0 if group is None else dist.get_global_rank(group, 0)
    bundles: dict[tuple, list[torch.Tensor]] = {}
    for n, _, dtype, device in order:
        bundles.setdefault((dtype, device), []).append(mine[n])
    for tensors in bundles.values():  # one broadcast per dtype and device
        flat = torch.cat([t.reshape(-1) for t in tensors])  # (a copy: written back below)
        dist.broadcast(flat, src=src, group=group)
        calls += 1
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return calls


def _refuse_unbroadcast(ddp: nn.Module, module: nn.Module) -> None:
    """Refuse parameters that the DDP wrapper did not have when it was built (added by ``sn.wrap``: Rank adapters
    or factors; or by a change of the model since) where they differ between the ranks: DDP broadcast the first
    rank's weights at construction, without them, so each rank would run and train its own copy (the gradients
    are averaged, the replicas drift apart in silence). Equal on every rank (factors of broadcast weights, one
    seed), they are fine. A rank holding such parameters meets the others in one agreement collective per call
    (a digest of their values, computed once per set of parameter objects); a nest wrapped before DDP has none
    and costs nothing."""
    known = getattr(ddp, "_module_parameters", None)  # (what DDP broadcast from the first rank when it was built)
    if known is None:
        return
    ids, ignored = {id(p) for p in known}, _ignored(module)
    late = [(n, p) for n, p in _inner(module).named_parameters() if id(p) not in ids and n not in ignored]
    group = ddp.process_group
    if not late or not _active() or dist.get_world_size(group) == 1:
        return
    seen = getattr(ddp, "_sn_unbroadcast", None)  # (weak references: a new parameter reusing an id is new)
    if seen is not None and len(seen[0]) == len(late) and all(r() is p for r, (_, p) in zip(seen[0], late)):
        digest = seen[1]
    else:
        digest = 0
        for n, p in late:
            digest = zlib.crc32(_value_bytes(p), zlib.crc32(f"{n}{tuple(p.shape)}{p.dtype}".encode(), digest))
        ddp._sn_unbroadcast = ([weakref.ref(p) for _, p in late], digest)
    same, _ = _sync(_START, digest, (), group)
    if not same:  # (every rank sees it: the collectives stay matched)
        names = [n for n, _ in late]
        raise _told(
            f"the parameters {names[:3]}{' ...' if len(names) > 3 else ''} differ between the ranks: the "
            "DistributedDataParallel wrapper was built before they existed (added by sn.wrap: Rank adapters or "
            "factors; or by a change of the model since, such as a resized embedding), so it never broadcast them, "
            "and each rank would run and train its own copy (the replicas drift apart in silence). Call sn.wrap "
            "(and such changes) before DDP(...) (docs/scaling.md)")


#: module -> (the process's load count, the count of loads into the module) when its replicas were last found
#: equal (:func:`sortednet.wrap.loads`)
_REPLICAS_CHECKED: weakref.WeakKeyDictionary[nn.Module, tuple[int, int]] = weakref.WeakKeyDictionary()


def _replicas_unchecked(module: nn.Module) -> bool:
    """Whether this rank has not compared ``module``'s weights with the other ranks' since a load into it or a
    part of it (or ever): the step's agreement carries it, so every rank compares again where one must."""
    seen = _REPLICAS_CHECKED.get(module)
    if seen is None:
        return True
    if seen[0] == loads():  # (no load anywhere since: the common case, no walk of the modules)
        return False
    if loads(module) != seen[1]:
        return True  # (left as it is until a comparison passes: a refused step is compared again at the next)
    _REPLICAS_CHECKED[module] = (loads(), seen[1])  # (loads into other models only)
    return False


def _replicas_checked(module: nn.Module) -> None:
    _REPLICAS_CHECKED[module] = (loads(), loads(module))


#: module= -> the parts of it already looked at (a step walks the modules once, the wrapped model's only for new ones)
_LOAD_PARTS: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet] = weakref.WeakKeyDictionary()


def _count_loads_of(module: nn.Module, nest: Nest) -> None:
    """Count loads into the parts of ``module`` (``module=``) outside the wrapped model (a task head the DDP
    wrapper holds beside it, also one added since the last step), whose own hooks count theirs: a head restored
    on one rank is compared again too."""
    seen = _LOAD_PARTS.setdefault(module, weakref.WeakSet())
    new = [m for m in module.modules() if m not in seen]
    if not new:
        return
    inside = {id(m) for m in nest.model.modules()}
    for m in new:
        if id(m) not in inside and not m.__dict__.get("_sn_load_counted"):
            m._register_load_state_dict_pre_hook(_counting(m))
            m.__dict__["_sn_load_counted"] = True
        seen.add(m)


def _counting(module: nn.Module) -> Callable[..., None]:
    ref = weakref.ref(module)

    def hook(*_: Any) -> None:
        m = ref()
        if m is not None:
            count_load(m)
    return hook


def _refuse_diverged(module: nn.Module, group: Any, again: bool) -> None:
    """At the first :func:`accumulate` of ``module`` (DDP or plain processes), and again at the first after a
    load on any rank (``again``: the same on every rank), refuse on every rank replicas that differ: models built
    with a seed per rank (plain processes have no broadcast), or weights loaded on one rank only after the DDP
    wrapper broadcast them (a best checkpoint restored on rank 0 mid-training). Their gradients would be averaged
    as one model's while each rank keeps its own weights, in silence. One small collective: a digest of up to
    1,024 values of each parameter, frozen ones too, with an integer sum of all their values' bits (what DDP
    leaves alone excepted); where they differ, one more (every rank is there) names the first that differs."""
    if not again:
        return
    named = [(n, p) for n, p in _averaged(module, frozen=True) if not p.is_meta and not is_sharded(p)]
    sums = _word_sums([p for _, p in named])
    digests = []
    for (n, p), total in zip(named, sums):
        t = p.detach().reshape(-1)
        t = t[::max(1, t.numel() // 1024)]
        digests.append(zlib.crc32(_value_bytes(t) + str(total).encode(),
                                  zlib.crc32(f"{n}{tuple(p.shape)}{p.dtype}{p.requires_grad}".encode())))
    digest = zlib.crc32(str(digests).encode())
    same, _ = _sync(_START, digest, (), group)
    if same:  # (refused: every rank checks again at its next call)
        _replicas_checked(module)
        return
    every: list[Any] = [None] * dist.get_world_size(group)  # (every rank is here: the collective stays matched)
    dist.all_gather_object(every, dict(zip((n for n, _ in named), digests)), group=group)
    names = list(every[0]) + [n for other in every[1:] for n in other if n not in every[0]]
    where = next(((n, r) for n in names for r, other in enumerate(every[1:], 1)
                  if other.get(n) != every[0].get(n)), None)
    raise _told("sortednet.distributed.accumulate: the ranks' models differ, in their weights (built with a "
                "seed per rank, or a checkpoint loaded or units sorted on some ranks only, at the start or since the "
                "last step) "
                "or in which parameters train (requires_grad set on some ranks only)"
                + (f": {where[0]!r} differs between rank 0 and rank {where[1]}" if where else "")
                + ". Their gradients would be averaged as one "
                "model's while each rank kept its own weights, drifting apart in silence. "
                "Build the model with the same seed and frozen parameters on every rank (a DDP wrapper "
                "broadcasts rank 0's weights when it is built: load checkpoints before it, or on every rank)")


_SPAN = 8191  # (a prime: a row of units moved to another row keeps every value's class only where the rows are
#               a multiple of it long)


def _word_sums(params: list[torch.Tensor]) -> list[int]:
    """Each tensor's values read as integers of their width, summed in ``_SPAN`` residue classes of their position
    (wrapping in 64 bits) and the classes weighted 1, 2, ... and added to their plain sum, on its device, one
    transfer for all: any single changed value changes it, which a sample of the values can miss (a checkpoint
    that differs in a few rows of an embedding), and so do values moved to other places (units sorted on one rank
    only: a plain sum of a permutation is the same)."""
    words = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    out = []
    for p in params:
        t = p.detach()
        if t.layout != torch.strided or t.is_complex() or t.element_size() not in words:
            out.append(torch.zeros((), dtype=torch.int64, device=t.device))
            continue
        flat = t.contiguous().reshape(-1).view(words[t.element_size()])
        classes = torch.zeros(_SPAN, dtype=torch.int64, device=t.device)
        whole = flat.numel() - flat.numel() % _SPAN
        for i in range(0, whole, _SPAN * 2048):  # (in pieces: an int64 copy of a large table at once is large)
            classes += flat[i:min(whole, i + _SPAN * 2048)].reshape(-1, _SPAN).sum(0, dtype=torch.int64)
        classes[:flat.numel() - whole] += flat[whole:].to(torch.int64)
        weights = torch.arange(1, _SPAN + 1, dtype=torch.int64, device=t.device)
        out.append(classes.sum() + (classes * weights).sum() * 1_000_003)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(out):
        by_device.setdefault(v.device, []).append(i)
    result = [0] * len(out)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([out[i] for i in idx]).cpu().tolist()):
            result[i] = v
    return result


def _value_bytes(p: torch.Tensor) -> bytes:
    """The bytes of ``p``'s values, whatever its dtype (a sparse tensor's dense values; none for a meta one)."""
    t = p.detach()
    if t.is_meta:
        return b""
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def guard(module: nn.Module, nest: Nest) -> nn.Module:
    """Make a DDP ``module`` refuse forwards whose backward its reducer would get wrong.

    DDP's reducer expects a gradient for every parameter it cannot prove unused
    (a depth below full leaves the skipped blocks without one: DDP then raises
    at the next step, or needs ``find_unused_parameters=True``), and nothing
    checks that the ranks run the same sub-model in such a backward. With
    ``inplace_grad=True`` (the default) a forward with gradient sync on and a
    sub-model below the largest raises :class:`SortedNetError` instead.
    :func:`accumulate` (always under ``no_sync``, agreement checked) installs
    this itself. Returns ``module``. Other modules pass unchanged.

    >>> import torch.nn as nn, sortednet as sn, sortednet.distributed as snd
    >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [4, 8], out="0", inp="1"))
    >>> snd.guard(nest.model, nest) is nest.model
    True
    """
    ddp = _uncompiled(module)
    if not isinstance(ddp, _ddp_type()):
        return module
    _refuse_unbroadcast(ddp, module)
    if getattr(ddp, "_sn_guarded", False):
        return module
    inplace = any(m._sn.inplace_grad for m in nest._sliced.values())

    def check(mod: nn.Module, args: tuple) -> None:
        if inplace and torch.is_grad_enabled() and mod.require_backward_grad_sync and nest.active != nest.largest:
            raise SortedNetError(
                f"DDP forward of sub-model {nest.active} with gradient sync on: DDP's reducer would wait for the "
                "blocks a depth skips and average without checking that the ranks ran the same sub-model. Use "
                "sortednet.distributed.accumulate(nest, subs, closure, module=ddp_model), or wrap(..., "
                "inplace_grad=False) with DDP(find_unused_parameters=True)")

    ddp.register_forward_pre_hook(check)
    ddp._sn_guarded = True
    return module


def accumulate(nest: Nest, subs: Sequence[SubModelLike], closure: Callable[[], Any], *,
               module: nn.Module | None = None, group: Any = None, **kwargs: Any) -> list[float]:
    """:func:`sortednet.accumulate` with one gradient synchronisation per optimizer step.

    ``module`` is what the closure calls: the ``DistributedDataParallel``
    wrapper (also what ``accelerator.prepare`` returns), an FSDP2 model, or
    ``None`` / the plain model (then gradients are still averaged over the
    process group, if one is initialised). DDP / plain: every backward runs
    under ``no_sync`` and :func:`sync_gradients` then averages all gradients
    at once (no unused-parameter search, depth-skipped blocks cannot hang).
    FSDP2: its own reduce-scatter after each backward. Keyword arguments
    (``distill=``, ``weights=``, ``nonfinite=``) go to :func:`sortednet.accumulate`;
    a non-finite loss on any rank counts on every rank (one all_reduce of a flag per
    sub-model), so all ranks skip, or raise for, the same sub-model. Returns
    this rank's losses.

    >>> import torch, torch.nn as nn, sortednet as sn, sortednet.distributed as snd
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    >>> nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="1"))
    >>> x = torch.randn(3, 4)
    >>> [round(v, 6) >= 0 for v in snd.accumulate(nest, nest.submodels, lambda: model(x).square().mean())]
    [True, True]
    """
    from .train import _need_nest, refuse_unscaled
    from .train import accumulate as _accumulate

    _need_nest(nest, "sortednet.distributed.accumulate")
    _check_group(group, "sortednet.distributed.accumulate")
    if module is not None and not isinstance(module, nn.Module):
        raise SortedNetError(f"module= takes the DDP / FSDP2 model the closure calls, got {type(module).__name__}")
    if module is not None and not any(m is nest.model for m in module.modules()):
        raise SortedNetError(f"module= ({type(module).__name__}) does not contain this nest's model "
                             f"({type(nest.model).__name__}); pass the wrapper the closure calls")
    refuse_unscaled(nest, kwargs.get("backward"), module)
    ddp = _uncompiled(module)
    if isinstance(ddp, _ddp_type()) and getattr(ddp, "static_graph", False):
        raise SortedNetError("DDP(static_graph=True) cannot run sortednet's accumulation: every sub-model's "
                             "backward runs under no_sync (sliced gradients are synchronised once afterwards), "
                             "which a static graph does not support; build the DDP wrapper without static_graph")
    if group is None and isinstance(ddp, _ddp_type()):
        group = ddp.process_group  # (DDP(process_group=...): its replicas, not the whole world)
    hooks = []
    if _active() and dist.get_world_size(group) > 1:
        _refuse_sparse(nest.model if module is None else _inner(module), "sortednet.distributed.accumulate")
        if module is not None:
            _count_loads_of(module, nest)
        unchecked = _replicas_unchecked(module if module is not None else nest.model)
        kwargs["_prechecked"], (again, somewhere_checked) = _same_on_every_rank(  # (checked once)
            nest, subs, group, closure, kwargs, (unchecked, not unchecked))
        kwargs["_agree"] = lambda bad, failed: _loss_agreement(bad, failed, group)
        # before FSDP's all-gathers and DDP's buffer broadcast (prepended, also on the wrapper the closure
        # calls): every rank runs the same sub-model in each forward
        agree = _forward_agreement(nest, group)
        # (torch.compile(ddp_model): its wrapper's own hooks run eagerly, outside the graph, where the hooks
        # of the modules it traces are skipped; every rank compiles alike, so one of them always runs)
        for m in {id(m): m for m in (module, ddp, nest.model) if m is not None}.values():
            hooks.append(m.register_forward_pre_hook(agree, prepend=True))
    try:
        units = _fsdp_modules(module if module is not None else nest.model)
        if units or is_fsdp(nest.model):
            if _active() and dist.get_world_size(group) > 1 and again:
                _refuse_loaded_on_some(module if module is not None else nest.model, somewhere_checked)
            judged = _refuse_unsharded(module if module is not None else nest.model, units, group)
            _gather_once(units)
            for u in units:  # a forward since the last step (an evaluation before optimizer.step()) left its unit
                u.reshard()  # unsharded with the values before that step: the next forward would reuse them
            if _active() and dist.get_world_size(group) > 1:  # (a head outside module=: no unit reduces its grads)
                closure = _trains_inside(closure, nest.model if module is None else _inner(module), module is None)
            try:
                fsdp_losses = _accumulate(nest, subs, closure, **kwargs)
            finally:  # a forward without its backward (a sub-model skipped for a non-finite loss, as the last
                for u in units:  # of the step) leaves its unit unsharded: the optimizer would step the sharded
                    u.reshard()  # parameters while the next forward reused the stale unsharded ones
            if not judged:  # (the first step: FSDP2 linked its units during it; this step's gradients are in .grad)
                _refuse_unsharded(module if module is not None else nest.model, units, group)
            return fsdp_losses
        if module is not None:
            guard(module, nest)
        if _active() and dist.get_world_size(group) > 1:
            _refuse_diverged(module if module is not None else nest.model, group, again)
        if _active() and not isinstance(ddp, _ddp_type()):  # (module= left out, or naming the model inside the
            hooks.append(nest.model.register_forward_pre_hook(_unnamed_ddp))  # wrapper the closure calls)
        if _active() and dist.get_world_size(group) > 1:
            closure = _trains_inside(closure, nest.model if module is None else _inner(module), module is None)
        with no_sync(module):
            losses = _accumulate(nest, subs, closure, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    # everything the closure trains: also parameters outside the nest inside the DDP wrapper (a task head,
    # the LM head of a nested backbone), whose gradients no_sync kept local too
    sync_gradients(nest.model if module is None else module, group=group)  # (the wrapper: what DDP ignores)
    if isinstance(ddp, _ddp_type()):  # what DDP's pre-forward broadcast would have done (every forward ran
        sync_buffers(ddp, group=group)  # under no_sync): the running statistics of the first rank's shards
    else:  # plain processes: the same rule (each rank's own statistics drifted apart, in silence, and sn.save
        sync_buffers(nest.model if module is None else module, group=group)  # wrote rank 0's alone)
    return losses


def _refuse_loaded_on_some(module: nn.Module, somewhere_checked: bool) -> None:
    """A sharded (FSDP2) model: each rank holds its own shard, so no two ranks' weights can be compared; a load
    since the last step on some ranks only (``somewhere_checked``: a rank that loaded nothing) left a model that
    is one checkpoint in the shards of those ranks and another in the rest, in silence. Refused on every rank
    (the flags are the same everywhere); a load on every rank, or the first step, marks the model checked."""
    if somewhere_checked:
        raise _told("sortednet.distributed.accumulate: a sharded (FSDP2) model was loaded into on some ranks only "
                    "since the last step: each rank holds its own shard, so the model is now one checkpoint in "
                    "those ranks' shards and another in the others'. Load on every rank (load_state_dict of the "
                    "sharded state dict, torch.distributed.checkpoint, or set_model_state_dict)")
    _replicas_checked(module)


def _trains_inside(closure: Callable[[], Any], synced: nn.Module, plain: bool) -> Callable[[], Any]:
    """``closure``, whose first loss of the step is checked before its backward: every parameter it trains must
    be in ``synced`` (what :func:`sync_gradients` averages). A task head called next to the nest's model but
    outside it (and outside ``module=``) would keep each rank's own gradient: the replicas drift apart, in
    silence. An error here is raised on every rank (the loss agreement after the closure tells the others)."""
    done: list[bool] = []

    def run() -> Any:
        out = closure()
        if not done:
            done.append(True)
            loss = out[0] if isinstance(out, (tuple, list)) and out else out
            inside = {id(p) for p in synced.parameters()}
            loose = [p for p in _trained(loss) if id(p) not in inside]
            stepping = _stepped_by(loose) if loose else []
            if stepping:
                where = "the nest's model" if plain else "module="
                raise SortedNetError(
                    f"sortednet.distributed.accumulate: the closure trains {len(loose)} parameter(s) outside {where} "
                    f"(shapes {[list(p.shape) for p in loose][:4]}; {stepping[0]} steps them), whose gradients no "
                    "rank would average: the replicas would drift apart. Pass module= a module that holds every "
                    "trained parameter (e.g. nn.Sequential(model, head), or the DDP wrapper of it), or freeze them")
        return out
    return run


#: parameter sets outside what accumulate averages that no optimizer steps (a teacher / EMA copy called with
#: gradients on): judged once each (a scan of the live objects), bounded
_UNSTEPPED: dict[frozenset[int], bool] = {}


def _stepped_by(params: list[nn.Parameter]) -> list[str]:
    """The live optimizers whose parameter groups hold one of ``params`` (their gradient matters only then: a
    gradient reaching a teacher that nothing steps is harmless)."""
    key = frozenset(id(p) for p in params)
    if key in _UNSTEPPED:
        return []
    import gc

    ids, out = set(key), []
    for o in gc.get_objects():
        if issubclass(type(o), torch.optim.Optimizer):  # (type(): no object's __class__ is read)
            try:
                groups = o.param_groups
            except Exception:
                continue
            if any(id(p) in ids for g in groups for p in g.get("params", ())):
                out.append(type(o).__name__)
    if not out:
        if len(_UNSTEPPED) > 64:
            _UNSTEPPED.clear()
        _UNSTEPPED[key] = True
    return out


def _trained(loss: Any) -> list[nn.Parameter]:
    """The parameters ``loss``'s backward would accumulate into (the ``AccumulateGrad`` nodes of its graph)."""
    if not isinstance(loss, torch.Tensor):
        return []
    seen, todo, out = set(), [loss.grad_fn], {}
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        v = getattr(fn, "variable", None)
        if isinstance(v, nn.Parameter):
            out.setdefault(id(v), v)
            continue
        todo.extend(f for f, _ in getattr(fn, "next_functions", ()))
    return list(out.values())


def _fsdp_managed(units: list[nn.Module]) -> set[tuple[int, str]] | None:
    """``(id(module), name)`` of every parameter some FSDP2 unit of the model manages, from FSDP2's own records:
    the units found and every state of their tree (an enclosing root unit included), which FSDP2 links at its
    root's first forward. None before that, or where FSDP2's records differ from what this reads (a torch
    version): nothing is judged then."""
    try:
        states: dict[int, Any] = {}
        for u in units:
            st = u._get_fsdp_state()
            every = st._state_ctx.all_states
            if not every:  # (not initialised by a forward yet)
                return None
            states.update((id(x), x) for x in every)
        managed: set[tuple[int, str]] = set()
        for st in states.values():
            group = st._fsdp_param_group
            for fp in () if group is None else group.fsdp_params:
                info = fp._module_info
                managed.add((id(info.module), info.param_name))
                managed.update((id(m), n) for m, n in zip(info.shared_modules, info.shared_param_names))
        return managed
    except AttributeError:
        return None


def _refuse_unsharded(module: nn.Module, units: list[nn.Module], group: Any) -> bool:
    """Under FSDP2 on several ranks, trainable parameters no ``fully_shard`` unit manages (the blocks sharded,
    the root left plain) keep each rank's own gradient: the replicas drift apart in silence, as under plain
    FSDP2. Judged from FSDP2's records, the same on every rank (the model is), so every rank raises alike.
    A parameter inside a unit that the unit leaves unsharded (``ignored_params``) is left alone. Returns whether
    it could judge (FSDP2 links its units at the root's first forward)."""
    if not _active() or dist.get_world_size(group) == 1 or not units:
        return True
    managed = _fsdp_managed(units)
    if managed is None:
        return False
    inside = {id(p) for u in units for p in u.parameters()}
    loose = [f"{path}.{n}" if path else n for path, m in _inner(module).named_modules()
             for n, p in m._parameters.items()
             if p is not None and p.requires_grad and (id(m), n) not in managed and id(p) not in inside]
    if loose:
        raise SortedNetError(
            f"FSDP2: the trainable parameters {loose[:3]}{' ...' if len(loose) > 3 else ''} are in no fully_shard "
            "unit, so no rank averages their gradients and the replicas would drift apart; fully_shard the root "
            "module too (after its blocks)")
    return True


def _forward_agreement(nest: Nest, group: Any) -> Callable[[nn.Module, tuple], None]:
    """Forward pre-hook while :func:`accumulate` runs on several ranks: refuses, on every rank, a forward in
    which ranks run different sub-models (a closure that opens ``nest.use`` on some ranks only): their
    gradients would be averaged as one sub-model's, and FSDP's all-gathers would no longer match (a hang)."""
    def pre(mod: nn.Module, args: tuple) -> None:
        if not _compiling():
            _agree_on([str(nest.active)], group, "the sub-model of a forward inside accumulate",
                      "a closure that switches sub-models (nest.use inside it) must do so alike on every rank",
                      phase=_FORWARD)
    return pre


def _unnamed_ddp(mod: nn.Module, args: tuple) -> None:
    """Forward pre-hook while :func:`accumulate` runs without ``module=``: a closure that calls a DDP wrapper
    anyway (with gradient sync on, and no unused-parameter search) would meet DDP's own error at the next
    backward (its reducer waits for gradients that sliced weights hand over in place): said here instead."""
    ddp = _ddp_type()._active_ddp_module
    if ddp is not None and ddp.require_backward_grad_sync and not ddp.find_unused_parameters:
        raise SortedNetError("the closure calls a DistributedDataParallel wrapper that "
                             "sortednet.distributed.accumulate was not given (module= left out, or naming the "
                             "model inside the wrapper): pass the wrapper, accumulate(nest, subs, "
                             "closure, module=ddp_model), so every backward runs under its no_sync and the "
                             "gradients are averaged once")


_GATHERED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _gather_once(units: list[nn.Module]) -> None:
    """All-gather, then free, each FSDP2 unit once, one unit at a time (collective: every rank calls it).

    FSDP2 creates a parameter's unsharded tensor at its unit's first all-gather. In torch 2.13, a backward
    under ``set_requires_gradient_sync(False)`` with a ``reduce_dtype`` other than the parameters' dtype then
    reads that tensor in EVERY unit, also one whose forward never ran (a block that a shallow sub-model
    skips): ``AttributeError: 'FSDPParam' object has no attribute '_unsharded_param'``. Gathering each unit
    once up front creates it (pytorch/pytorch#194058 guards the read upstream).
    """
    for u in units:
        if u not in _GATHERED:
            u.unshard()
            u.reshard()
            _GATHERED.add(u)


def _same_on_every_rank(nest: Nest, subs: Sequence[SubModelLike], group: Any, closure: Any = None,
                        kwargs: dict[str, Any] | None = None,
                        flags: tuple[bool, ...] = ()) -> tuple[tuple[list[SubModel], list[float]], list[bool]]:
    """Raise :class:`SortedNetError` on every rank unless every rank passes the same sub-models, in the same
    order, with the same weights, distillation and ``nonfinite``. Ranks that drew differently (a seed per
    rank, another ``k``) would average the gradients of different sub-models, or mismatch their collectives
    and abort. Arguments that :func:`sortednet.accumulate` refuses on one rank only are refused on every rank
    (that rank's own error there, the others naming it), before any collective of the step. Also returns
    whether each of ``flags`` (replicas not compared since a load, ...) holds on any rank."""
    from .train import _checked

    kw = kwargs or {}
    error, checked = None, None
    try:
        checked = _checked(nest, subs, closure if closure is not None else (lambda: None), kw.get("distill"),
                           kw.get("weights"), kw.get("backward"), kw.get("nonfinite", "raise"))
        names = [str(s) for s in checked[0]]
    except SortedNetError as e:
        error, names = e, []
    if error is None:
        weights = kw.get("weights")
        names += [f"weights={None if weights is None else [float(w) for w in weights]}",
                  f"distill={kw.get('distill')!r}", f"nonfinite={kw.get('nonfinite', 'raise')!r}",
                  f"nest={_nest_digest(nest)}"]
    else:
        names += [f"refused: {error}"]
    try:
        anywhere = _agree_on(
            names, group, "the sub-models (and weights, distill=, nonfinite=, the nest) of this step",
            "give every rank's Sampler the same seed, k and step (the gradients of different sub-models would be "
            "averaged), the same accumulate arguments, and the same nest (nest=: a digest of its dimensions and of "
            "the modules they slice)", flags=flags)
    except SortedNetError:
        if error is not None:
            raise error from None
        raise
    if error is not None or checked is None:  # (the same refusal on every rank: each raises its own, no
        raise error or SortedNetError("accumulate: arguments not checked")  # collective pending)
    return checked, anywhere


def _nest_digest(nest: Nest) -> str:
    """The nest as every rank must have it: each dimension's spec and the paths and roles of what it slices (two
    ranks slicing different blocks under the same sub-model names would average two networks' gradients)."""
    import hashlib

    def canonical(v: Any) -> Any:  # (patterns given as a set come in another order on each rank)
        if isinstance(v, dict):
            return sorted((str(k), canonical(x)) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            items = [canonical(x) for x in v]
            return sorted(items, key=repr) if all(isinstance(x, str) for x in v) else items
        return v

    text = repr([canonical(d.spec()) for d in nest.dims]) + repr(
        sorted((p, sorted((r, b.dim.name) for r, b in m._sn.bind.items())) for p, m in nest._sliced.items()))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def check_submodels(subs: Sequence[SubModelLike], *, group: Any = None) -> None:
    """Raise :class:`SortedNetError` unless every rank passes the same sub-models (one ``all_gather``).

    A debugging aid: ``Sampler.draw(step)`` agrees on every rank by construction
    when all ranks use the same seed. No-op without a process group.

    >>> import sortednet.distributed as snd
    >>> snd.check_submodels(["h=4", "h=8"])
    """
    if isinstance(subs, (str, bytes, SubModel, dict)) or not isinstance(subs, Iterable):
        raise SortedNetError(f"check_submodels() takes the list of this step's sub-models, got "
                             f"{type(subs).__name__} {subs!r}")
    _check_group(group, "check_submodels")
    mine = [str(s) for s in subs]
    if not _active() or dist.get_world_size(group) == 1:
        return
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    bad = [r for r, other in enumerate(every) if other != every[0]]
    if bad:
        raise SortedNetError(f"ranks disagree on the sub-models of this step: rank 0 has {every[0]}, rank {bad[0]} "
                             f"has {every[bad[0]]}; give every rank's Sampler the same seed and step")


def save(nest: Nest, path: str | os.PathLike) -> None:
    """Write a checkpoint of a distributed run that :func:`sortednet.load` reads in one process.

    Collective: call it on every rank. DDP / plain: rank 0 calls
    :func:`sortednet.save` (weights are replicated). FSDP2: every rank takes
    part in gathering the full state dict (to CPU, held by rank 0 only), which
    rank 0 writes. Ends with rank 0 telling every rank how the write went (a
    broadcast, which is also the barrier: the file exists everywhere afterwards,
    on a shared file system); when rank 0 could not write it (a missing folder),
    every rank raises, none is left waiting.

    >>> import os, tempfile, torch.nn as nn, sortednet as sn, sortednet.distributed as snd
    >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [4, 8], out="0", inp="1"))
    >>> path = os.path.join(tempfile.mkdtemp(), "nest.safetensors")
    >>> snd.save(nest, path); os.path.exists(path)
    True
    """
    from .io import save as _save
    from .nest import Nest

    if not isinstance(nest, Nest):  # (every rank alike: nothing collective has started)
        hint = (" (the wrapped model itself: pass sn.Nest.of(model); a deep copy of it, an EMA, is saved by "
                "sn.save(copy, path) on one rank, with the copy's own values)") if isinstance(nest, nn.Module) else ""
        raise SortedNetError(f"sortednet.distributed.save needs a Nest (what sn.wrap returned), got "
                             f"{type(nest).__name__}{hint}")
    nest._check_alive()
    me = dist.get_rank() if _active() else 0
    error: Exception | None = None

    def collective(e: Exception, step: str) -> SortedNetError:
        return SortedNetError(
            f"sortednet.distributed.save is collective: every rank must call it (not rank 0 alone, inside `if "
            f"rank == 0:`); its {step} failed on rank {me} ({type(e).__name__}: {str(e)[:200]})"
            + (f"; rank 0 wrote {os.fspath(path)!r}" if me == 0 and wrote else "; nothing was written"))

    def agree() -> None:
        """One phase-tagged collective (as every collective of snd.accumulate): a rank still inside a step (the
        ranks ran different numbers of steps) meets it there, and every rank raises, none waits."""
        if _active():
            try:
                _sync(_SAVE, 0, (), None)
            except SortedNetError:
                raise
            except Exception as e:  # (a rank that never called it: a timeout)
                raise collective(e, "agreement") from e

    wrote = False
    fsdp = is_fsdp(nest.model)
    agree()  # (before anything is gathered or written: a rank still inside a step raises with the others, and the
    #          file at path stays as it was; FSDP's gather would pair with another rank's step and abort)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


        state = get_model_state_dict(nest.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if me == 0:  # gathered tensors may be views into padded buffers: store compact copies
            try:
                compact = {k: v.detach().clone() for k, v in state.items()}
                # a tied weight was gathered once per name, into tensors of their own: one tensor again, as the
                # model holds it (the file records the tie; stored twice it could not be loaded into the model)
                held: dict[int, list[str]] = {}
                for name, p in nest.model.named_parameters(remove_duplicate=False):
                    held.setdefault(id(p), []).append(name)
                for names in held.values():
                    present = [n for n in names if n in compact]
                    for n in present[1:]:
                        compact[n] = compact[present[0]]
                _save(nest, path, state=compact)
                wrote = True
            except Exception as e:
                error = e
    elif me == 0:
        try:
            _save(nest, path)
            wrote = True
        except Exception as e:
            error = e
    if _active():  # rank 0's outcome, to every rank (also the barrier: the file exists when this returns)
        outcome = [None if error is None else f"{type(error).__name__}: {error}"]
        try:
            dist.broadcast_object_list(outcome, src=0)
        except Exception as e:  # (a rank that never called it, `if rank == 0: snd.save(...)`: a timeout)
            raise collective(e, "closing broadcast from rank 0") from e
        if outcome[0] is not None and error is None:
            raise SortedNetError(f"sortednet.distributed.save: rank 0 could not write the checkpoint ({outcome[0]})")
    if error is not None:
        raise error

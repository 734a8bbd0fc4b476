"""Costs of sub-models.

``params`` is exact and cheap (counted once per size combination of the
dimensions each tensor depends on); ``flops`` is counted on an example input
with the formulas of :mod:`torch.utils.flop_counter`; ``latency`` (median
seconds of a forward) and ``memory`` (bytes: active weights plus the peak of
tensors created by the forward) are measured. :mod:`sortednet.profile` holds
them for every sub-model (:class:`~sortednet.profile.Profile`).
"""

from __future__ import annotations

import collections
import enum
import hashlib
import inspect
import itertools
import math
import numbers
import os
import re
import statistics
import threading
import time
import types
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves
from torch.utils.flop_counter import flop_registry

from .errors import SortedNetError
from .export import reachable_modules
from .slicers.lowrank import COUNTING
from .submodel import SubModel

if TYPE_CHECKING:
    from .nest import Nest

__all__ = ["METRICS", "ParamCounter", "count_flops", "measure_latency", "example_signature",
           "measure_memory", "call_model"]

METRICS = ("params", "flops", "latency", "memory")


def call_model(model: nn.Module | Callable, example: Any) -> Any:
    """``model(*example)`` for a tuple/list, ``model(**example)`` for keyword inputs (:func:`keyword_inputs`: a
    dict, a BatchEncoding) where the forward takes them, else ``model(example)``: another mapping, and a dict or
    BatchEncoding none of whose keys the forward takes as a keyword (``forward(self, batch)``) are its one
    input."""
    if isinstance(example, (tuple, list)):
        return model(*example)
    if keyword_inputs(example) and takes_keywords(model, example):
        return model(**example)
    return model(example)


def takes_keywords(model: nn.Module | Callable, example: Mapping) -> bool:
    """Whether ``model``'s forward takes the keys of ``example`` as keyword arguments: it has ``**kwargs``, or a
    parameter named as one of the keys (an unexpected other key is then the model's own error), or it takes no
    positional argument, or its signature cannot be read. Otherwise (``forward(self, batch)`` and a batch dict)
    the mapping is one positional input. Through a decorator (``functools.wraps``: ``torch.no_grad()``, a
    logger), the signature read is the forward it passes the arguments on to, unless the decorator itself takes
    keywords only (it then gets them, and packs them as it likes)."""
    fn = model.forward if isinstance(model, nn.Module) else model
    keys = tuple(example)
    if not all(isinstance(k, str) for k in keys):
        return False
    bound = isinstance(fn, types.MethodType)
    fn = fn.__func__ if bound else fn
    try:
        known = _KEYWORDS.setdefault(fn, {})  # (weakly keyed: a per-instance forward holding its model frees it)
    except TypeError:  # (not weakly referenceable, or unhashable)
        known = {}
    if (bound, keys) not in known:
        known[bound, keys] = _takes_keywords(fn, bound, keys)
    return known[bound, keys]


_KEYWORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _takes_keywords(fn: Callable, bound: bool, keys: tuple[str, ...]) -> bool:
    def own(sig: inspect.Signature) -> list[inspect.Parameter]:  # (without the instance of a bound method)
        ps = list(sig.parameters.values())
        return ps[1:] if bound and ps and ps[0].kind in (ps[0].POSITIONAL_ONLY, ps[0].POSITIONAL_OR_KEYWORD) else ps

    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    try:
        outer = own(inspect.signature(fn, follow_wrapped=False))
        params = own(inspect.signature(fn))  # (through functools.wraps: the forward a decorator passes on to)
    except (TypeError, ValueError):
        return True
    if not any(p.kind in positional for p in outer):  # (a decorator taking keywords only: it packs them itself)
        return True
    if any(p.kind is p.VAR_KEYWORD for p in params) or any(
            p.name in keys for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)):
        return True
    return not any(p.kind in positional for p in params)


class ParamCounter:
    """Exact active parameter count of any sub-model of a nest, fast for many sub-models.

    Each parameter's count depends only on the dimensions that slice its module
    and on the Depth dimensions of the blocks holding it. Parameters are grouped
    by those dimensions and each group's total is computed once per size
    combination of its own dimensions (memoised), so 10,000 sub-models of 4
    independent widths cost a few dozen module walks, not 10,000.
    """

    def __init__(self, nest: Nest, owners: dict[int, list[tuple[nn.Module, str]]] | None = None) -> None:
        self.nest = nest
        self.owners = nest._tensor_owner if owners is None else owners  # sliced tensor -> [(module, name)]
        names = [d.name for d in nest.dims]
        deps: dict[int, set[str]] = {}
        for m in nest._sliced.values():
            for name in m._sn.slicer.attr_names(m, m._sn.bind):
                t = m._sn.slicer.tensor(m, name)
                if isinstance(t, Tensor):
                    deps.setdefault(id(t), set()).update(b.dim.name for b in m._sn.bind.values())
        for m in nest._depth:
            for blk in m._modules.values():
                for p in blk.parameters():
                    deps.setdefault(id(p), set()).add(m._sn.bind["depth"].dim.name)
        groups: dict[tuple[str, ...], list[nn.Parameter]] = {}
        self.fixed = self.fixed_bytes = 0
        for p in nest.model.parameters():
            key = tuple(n for n in names if n in deps.get(id(p), ()))
            if key:
                groups.setdefault(key, []).append(p)
            else:
                self.fixed += p.numel()
                self.fixed_bytes += p.numel() * p.element_size()
        self.groups = groups
        self._memo: dict[tuple[tuple[str, ...], tuple[int, ...]], int] = {}

    def __call__(self, sub: SubModel) -> int:
        total = self.fixed
        for key, params in self.groups.items():
            sizes = tuple(sub[n] for n in key)
            hit = self._memo.get((key, sizes))
            if hit is None:
                # counted under the whole (listed) sub-model: a partial one could be outside a restricted nest
                hit = self._memo[(key, sizes)] = self._count(params, sub)
            total += hit
        return total

    def bytes(self, sub: SubModel) -> int:
        """Bytes of the parameters ``export(sub)`` holds, each at its own element size (mixed dtypes)."""
        return self.fixed_bytes + sum(self._count(params, sub, in_bytes=True) for params in self.groups.values())

    def _count(self, params: list[nn.Parameter], sub: SubModel | dict[str, int], in_bytes: bool = False) -> int:
        """Active elements (or bytes) of ``params`` under ``sub`` (a listed sub-model, or during wrap any sizes)."""
        nest = self.nest
        with nest.use(sub), torch.no_grad():
            blocks = [blk for m in nest._depth for blk in m._sn.slicer.inactive(m)]
            skipped = {id(p) for blk in blocks for p in blk.parameters()}
            gone = {id(x) for blk in blocks for x in blk.modules()}  # (modules that do not run)
            if skipped:  # a weight of a skipped block that a running module also holds (tied, shared) still counts
                held = reachable_modules(nest.model, {(id(m), name) for m in nest._depth
                                                      for name in m._sn.slicer.skipped(m)})
                skipped -= {id(p) for m in held.values() for p in m._parameters.values() if p is not None}
                gone -= {id(m) for m in held.values()}  # (a block also at a kept position, ALBERT-style, runs)
            total = 0
            for p in params:
                if id(p) in skipped:
                    continue
                # a tied tensor: the largest cut of its holders that run (a holder no dimension slices reads it
                # whole; none running: held whole by a module that runs and no dimension binds)
                running = [h for h in self.owners.get(id(p)) or () if id(h[0]) not in gone]
                n = max((h[0]._sn.slicer.numel(*h) if "_sn" in h[0].__dict__ else p.numel() for h in running),
                        default=p.numel())
                total += n * p.element_size() if in_bytes else n
        return total


def _sdpa_flops(q: Tensor, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> int:
    """``q @ k^T`` and ``scores @ v`` of one fused attention call, ``(..., L, E)`` query, ``(..., S, E)``
    key, ``(..., S, Ev)`` value, key / value heads broadcast to the query's (GQA)."""
    *lead, L, E = q.shape
    S, Ev = k.shape[-2], v.shape[-1]
    return 2 * math.prod(lead) * L * S * (E + Ev)


def _grouped_mm_flops(a: Tensor, b: Tensor, *args: Any, **kwargs: Any) -> int:
    """One grouped matmul (mixture-of-experts kernels): ``(M, K) x (G, K, N)`` (rows split by group),
    ``(G, M, K) x (G, K, N)``, ``(G, M, K) x (K, N)`` (columns split) or ``(M, K) x (K, N)`` (the
    reduction split); every case multiplies each row of ``a`` with one group's ``K x N`` block."""
    if a.dim() == 2 and b.dim() == 3:
        return 2 * a.shape[0] * a.shape[1] * b.shape[2]
    if a.dim() == 3 and b.dim() == 3:
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if a.dim() == 3:
        return 2 * a.shape[1] * a.shape[2] * b.shape[1]
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _rnn_layer_flops(x: Tensor, w_ih: Tensor, w_hh: Tensor, *args: Any, **kwargs: Any) -> int:
    """One fused recurrent layer (oneDNN's LSTM / GRU kernel on the CPU): every time step of every
    sequence multiplies its input by ``w_ih`` and its hidden state by ``w_hh`` (as a recurrent
    layer decomposed into ``mm`` counts)."""
    return 2 * (x.numel() // x.shape[-1]) * (w_ih.numel() + w_hh.numel())


def _trilinear_flops(i1: Tensor, i2: Tensor, i3: Tensor, expand1: list[int], expand2: list[int],
                     expand3: list[int], *args: Any, **kwargs: Any) -> int:
    """``nn.Bilinear``'s kernel: the three inputs, each unsqueezed at its ``expand`` dims, multiply over their
    broadcast shape and sum some of its dims; 2 per multiply-add of that shape (``N x out x in1 x in2``
    for a bilinear layer)."""
    shapes = []
    for t, expand in ((i1, expand1), (i2, expand2), (i3, expand3)):
        shape = list(t.shape)
        for d in sorted(expand):
            shape.insert(d, 1)
        shapes.append(shape)
    return 2 * math.prod(torch.broadcast_shapes(*shapes))


def _mv_flops(a: Tensor, b: Tensor, *args: Any, **kwargs: Any) -> int:
    """``matrix @ vector`` (``aten.mv``): 2 per multiply-add."""
    return 2 * a.numel()


def _addmv_flops(bias: Tensor, a: Tensor, b: Tensor, *args: Any, **kwargs: Any) -> int:
    return 2 * a.numel()


def _dot_flops(a: Tensor, b: Tensor, *args: Any, **kwargs: Any) -> int:
    return 2 * a.numel()


#: kernels that torch.utils.flop_counter has no formula for, by operator name: the fused attention
#: kernels (the CPU one: without it, every attention score matmul of a model on the CPU would count as
#: zero), the grouped matmuls mixture-of-experts layers run (transformers' experts, and its fallback
#: for them), oneDNN's fused recurrent layer (nn.LSTM on the CPU) and nn.Bilinear's kernel
_MORE_FLOPS: dict[str, Callable[..., int]] = {
    "aten._scaled_dot_product_flash_attention_for_cpu": _sdpa_flops,
    "aten._scaled_dot_product_fused_attention_overrideable": _sdpa_flops,
    "aten._grouped_mm": _grouped_mm_flops,
    "aten._scaled_grouped_mm": _grouped_mm_flops,
    "transformers.grouped_mm_fallback": _grouped_mm_flops,
    "aten.mkldnn_rnn_layer": _rnn_layer_flops,
    "aten._trilinear": _trilinear_flops,
    # matrix @ vector and vector . vector (a hand-written RNN cell, a learned query vector, unbatched inputs)
    "aten.mv": _mv_flops,
    "aten.addmv": _addmv_flops,
    "aten.addmv_": _addmv_flops,
    "aten.dot": _dot_flops,
    "aten.vdot": _dot_flops,
    # in-place and fused variants of the registry's own: the same multiply-adds
    "aten.addmm_": flop_registry[torch.ops.aten.addmm],
    "aten._addmm_activation": flop_registry[torch.ops.aten.addmm],
    "aten.baddbmm_": flop_registry[torch.ops.aten.baddbmm],
    "aten.addbmm": flop_registry[torch.ops.aten.baddbmm],
    "aten.addbmm_": flop_registry[torch.ops.aten.baddbmm],
}

#: a word of an operator's name that says it multiplies matrices (``aten._int_mm``, ``aten._cudnn_rnn``,
#: a custom ``mylib::fused_attention`` or ``flash_attn::_flash_attn_forward``): such an operator with no formula and no
#: decomposition would count as zero, so counting refuses it rather than return a total without it
_COMPUTE_WORD = re.compile(
    r"(?:^|_)(?:\w*mm|\w*matmul|\w*gemm|\w*gemv|\w*mv|v?dot|einsum|conv(?:olution|\dd|_\w+)?|\w*linear|atten\w*|"
    r"attn|rnn|lstm|gru)(?:_|$)")


def _uncountable(name: str) -> bool:
    """Whether an operator named ``name`` (``ns.op``) multiplies matrices by its name (see
    :data:`_COMPUTE_WORD`): not the interpolations whose names say ``linear`` (``upsample_bilinear2d``)."""
    op = name.rpartition(".")[2]
    return bool(_COMPUTE_WORD.search(op)) and "upsample" not in op


class _Pause:
    """A reusable context manager: the operators run inside it are not counted."""

    def __init__(self, counter: _CountFlops) -> None:
        self.counter = counter

    def __enter__(self) -> None:
        self.counter.paused += 1

    def __exit__(self, *exc: object) -> None:
        self.counter.paused -= 1


class _CountFlops(TorchDispatchMode):
    """FLOPs of this thread's operators, with :mod:`torch.utils.flop_counter`'s formulas.

    ``FlopCounterMode`` also tracks modules through process-wide module hooks
    (which fire in every thread); a total needs none of that.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.paused = 0
        self.pause = _Pause(self)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        packet = func._overloadpacket
        count = flop_registry.get(packet) or _MORE_FLOPS.get(str(packet))
        if count is None and func is not torch.ops.prim.device.default:
            with self:  # composite operators: count what they decompose into
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
            if _uncountable(str(packet)):
                raise SortedNetError(
                    f"cannot count the FLOPs of operator {packet}: torch.utils.flop_counter has no formula for "
                    "it, so a count would leave its work out (and pick(flops=) would choose by that wrong "
                    "count); register one with torch.utils.flop_counter.register_flop_formula, run the model "
                    "through operators that have one, or budget by params / latency instead")
        out = func(*args, **kwargs)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def count_flops(nest: Nest, sub: SubModel, example: Any, *, model: nn.Module | None = None,
                own_buffers: bool = False) -> int:
    """Floating-point operations of one forward of ``sub`` on ``example`` (no grad, eval mode),
    on ``model`` (default: a private eval-mode view of ``nest.model`` sharing its tensors, so no
    BatchNorm statistic, random draw or training flag of the model changes; ``own_buffers``: ``model`` holds
    copies of the model's buffers, as that view does). The model's buffers are then left alone: a buffer
    another thread writes meanwhile (a serving thread's cache) keeps what it wrote.

    PyTorch's fused attention / encoder fast paths step aside while counting
    (the counter cannot see inside them, and they would make a full-size layer
    look cheaper than a sliced one), for this call and thread only.

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
    >>> count_flops(nest, sn.SubModel(h=2), torch.randn(1, 4))
    24
    """
    from .modes import NoFastPath, dry_run, eval_view

    own = model is None or own_buffers
    if model is None:  # a private eval-mode view with buffers of its own: no BatchNorm statistic, dropout draw,
        model, _ = eval_view(nest.model, keep=nest.dims, own_buffers=True)  # mode flag or buffer of the model
    counter = _CountFlops()                                                 # changes, and none is put back over
    COUNTING.pause = counter.pause                                          # what another thread wrote meanwhile
    try:
        with dry_run(nest.model, buffers=not own), nest.use(sub), torch.no_grad(), NoFastPath(), counter:
            call_model(model, example)
    finally:
        COUNTING.pause = None
    return int(counter.total)


def _sync(example: Any) -> None:
    for t in tree_leaves(example):
        if isinstance(t, Tensor) and t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
            return


def timing_counts(repeat: Any, warmup: Any) -> tuple[int, int]:
    """``repeat`` (>= 1) timed runs after ``warmup`` (>= 0) untimed ones, as ints; refused otherwise."""
    if (isinstance(repeat, bool) or not isinstance(repeat, numbers.Integral) or repeat < 1
            or isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0):
        raise SortedNetError(f"repeat must be an int >= 1 and warmup >= 0, got repeat={repeat!r}, warmup={warmup!r}")
    return int(repeat), int(warmup)


def measure_latency(nest: Nest, sub: SubModel, example: Any, *, repeat: int = 20, warmup: int = 3,
                    model: nn.Module | None = None) -> float:
    """Median wall-clock seconds of one forward of ``sub`` on ``example`` (after ``warmup`` runs)
    on ``model`` (default ``nest.model``)."""
    repeat, warmup = timing_counts(repeat, warmup)
    model = nest.model if model is None else model
    times = []
    leaves = as_inputs(example)  # (a BatchEncoding's tensors)
    with nest.use(sub), torch.no_grad():
        for i in range(warmup + repeat):
            _sync(leaves)
            t0 = time.perf_counter()
            call_model(model, example)
            _sync(leaves)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _PeakBytes(TorchDispatchMode):
    """Tracks the bytes of storages created by ops while it is active (peak of live bytes)."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.existing, self.live, self.current, self.peak = existing, {}, 0, 0

    def _drop(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in self.existing or key == 0:
                continue
            if key in self.live:
                self.live[key][1] += 1
            else:
                self.live[key] = [st.nbytes(), 1]
                self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._drop, key)
        return out


def measure_memory(nest: Nest, sub: SubModel, example: Any, *, model: nn.Module | None = None) -> int:
    """Bytes ``sub`` needs for one forward on ``example``: its active weights and buffers (as its export holds
    them) plus the peak of tensors the forward creates (inputs excluded), on ``model`` (default ``nest.model``)."""
    model = nest.model if model is None else model
    with nest.use(sub), torch.no_grad():
        weights = nest._param_counter.bytes(sub) + _buffer_bytes(nest, model)  # (each at its own element size)
        existing = {t.untyped_storage().data_ptr() for t in itertools.chain(
            model.parameters(), model.buffers(), tree_leaves(as_inputs(example))) if isinstance(t, Tensor)}
        mode = _PeakBytes(existing)
        with mode:
            out = call_model(model, example)
        del out
    return int(weights + mode.peak)


def _buffer_bytes(nest: Nest, model: nn.Module) -> int:
    """Bytes of the buffers the active sub-model holds, as its export does: cut where a slicer cuts them
    (BatchNorm statistics of a Width), none of a block a Depth skips (unless a running module also holds it),
    each storage once (masks, rotary tables, statistics: the model's memory beside its parameters)."""
    if model is not nest.model and not any("_sn" in m.__dict__ for m in model.modules()):  # (an export: its own)
        tensors = [b for b in model.buffers()]
    else:  # (the model, or a private view of it sharing its tensors: profile's eval view, counted on the model)
        # the modules that run: reachable without passing a position a Depth skips (a block also held at a kept
        # position, ALBERT-style, runs)
        skipped = {(id(m), name) for m in nest._depth for name in m._sn.slicer.skipped(m)}
        running = reachable_modules(nest.model, skipped)
        tensors = []
        for m in running.values():
            st = m.__dict__.get("_sn")
            cut = set(st.slicer.attr_names(m, st.bind)) if st is not None else set()
            for name, b in m._buffers.items():
                if b is not None:
                    tensors.append(getattr(m, name) if name in cut else b)  # (the active cut of a sliced one)
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def as_inputs(example: Any) -> Any:
    """``example`` with a ``BatchEncoding`` (keyword inputs that are no pytree) as its dict, so that its tensors
    are seen (signature, device, memory); anything else as given."""
    return dict(example) if keyword_inputs(example) and not isinstance(example, dict) else example


def keyword_inputs(example: Any) -> bool:
    """Whether ``example`` is keyword arguments of the model: a dict, or transformers' ``BatchEncoding`` /
    ``BatchFeature`` (a tokenizer's or processor's output, a mapping that is no dict). Any other mapping is one
    input, as PyTorch would pass it."""
    if isinstance(example, dict):
        return True
    return isinstance(example, Mapping) and any(
        c.__name__ in ("BatchEncoding", "BatchFeature") and c.__module__.startswith("transformers")
        for c in type(example).__mro__)


def example_signature(example: Any) -> tuple:
    """Structure (tuple / dict keys), shapes, dtypes and devices of the tensors and the other values
    in ``example`` (FLOPs are cached per signature).

    >>> import torch
    >>> example_signature({"x": torch.zeros(2, 3)}) == example_signature({"y": torch.zeros(2, 3)})
    False
    """
    leaves, spec = tree_flatten(as_inputs(example))
    return (str(spec), *(_leaf_signature(t) for t in leaves))


def sig_key(sig: Any) -> tuple:
    """An example signature (:func:`sortednet.cost.example_signature`) in the text form a profile stores (past
    20,000 characters, its SHA-256: a profile of an example holding a million entries stores 80 bytes)."""
    key = tuple(tuple(map(str, s)) if isinstance(s, (tuple, list)) else s for s in sig)
    text = repr(key)
    return key if len(text) <= 20_000 else ("sha256", hashlib.sha256(text.encode()).hexdigest())


def example_text(example: Any, limit: int = 300) -> str:
    """:func:`example_signature` as text for a message, cut to ``limit`` characters (an example holding a
    million entries would make the message a million entries long)."""
    text = str(example_signature(example))
    return text if len(text) <= limit else f"{text[:limit]} ... ({len(text)} characters)"


def _leaf_signature(v: Any) -> Any:
    """A tensor's :func:`_tensor_signature`; an object of one's own holding fields (a key/value cache, a batch
    dataclass) by its type and what it holds, field by field (tensors by their signatures: a cache's repr does not
    show how many positions it holds, nor an object's default repr anything but its address, which a later one
    may reuse), up to 16,384 entries and 32 levels (past them a token equal to nothing: such an input is counted
    afresh each time; an object met again named by where it was first met); anything else (a
    number, a string, an array, a set, a class) by its repr; a function or method by identity (what it computes
    is not in its repr, and a freed one's address is reused: :func:`_callable_token`); a module by identity and
    its tree's settings (:func:`modules_digest`)."""
    if isinstance(v, Tensor):
        return _tensor_signature(v)
    if type(v) in _ATOMS:
        return repr(v)
    from .kvcache import _fields

    budget = [16384]
    first: dict[int, int] = {}

    def sign(x: Any, depth: int) -> Any:
        budget[0] -= 1
        if isinstance(x, Tensor):
            return _tensor_signature(x)
        if type(x) in _ATOMS:
            return repr(x)
        if id(x) in first:
            return ("<again>", first[id(x)])
        if isinstance(x, _CODE):  # (by identity: a freed function's address is reused by the next, and a
            return _callable_token(x)  # bound method's self is not all it computes)
        if isinstance(x, nn.Module):  # (its repr names no setting of a module of one's own: by identity and
            return ("<module>", _callable_token(x), modules_digest(x))  # settings, a setting changed in place too)
        fields = _fields(x, max(budget[0], 0)) if not isinstance(x, (nn.Module, type)) else None
        size = len(x) if isinstance(x, (Mapping, list, tuple, collections.deque)) else None
        if fields is None or not fields and not size:  # (an atom, an empty container, an object without fields)
            return type(x).__qualname__ if type(x).__repr__ is object.__repr__ else repr(x)
        if depth > 32 or budget[0] < 0 or size is not None and size > len(fields):
            return ("<not signed>", f"{next(_UNSIGNED)}@{_PROCESS}")  # (more than can be signed: counted afresh)
        first[id(x)] = len(first)
        return (type(x).__qualname__, size, *((repr(k), sign(f, depth + 1)) for k, f in fields))

    return sign(v, 0)


_WRAPPED = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod")  # (a wrapper's child)
#: plain attributes that leave the forward's work as it is: the mode, where a model was loaded from, whether
#: its blocks recompute activations in the backward (transformers' gradient checkpointing)
_NOT_SETTINGS = frozenset({"training", "name_or_path", "gradient_checkpointing", "model_tags"})
#: settings that leave the forward's values and work as they are (record 3 on): whether an activation writes its
#: input's memory (``ReLU(inplace=True)``), whether blocks recompute activations in the backward (timm's
#: ``grad_checkpointing``), whether a part of the model gets gradients (transformers' ``_requires_grad``, which
#: ``freeze_feature_encoder()`` clears)
_SAME_WORK = frozenset({"inplace", "grad_checkpointing", "_requires_grad"})
#: private attributes of a module's own that describe no forward: torch's bookkeeping (every ``nn.Module``'s own
#: fields, hooks and flags that DDP, FSDP and replicas set), ours (``_sn``, ``_sn_*``), transformers' (whether a
#: module's weights were initialised, a loaded model's kernel and weight-conversion flags, its attention
#: implementation)
_BOOKKEEPING = frozenset(nn.Module().__dict__) | {
    "_is_replica", "_is_fsdp_managed_module", "_fsdp_use_orig_params", "_ddp_params_and_buffers_to_ignore",
    "_is_hf_initialized", "_kernels_mode", "_use_kernels", "_weight_conversions", "_attn_implementation", "_sn"}
#: bookkeeping of record 4 on: Accelerate's ``prepare`` (the Trainer's too) flag, transformers' PEFT hotswap flag
_BOOKKEEPING_4 = _BOOKKEEPING | {"_is_accelerate_prepared", "_hotswap_enabled", "_hf_peft_config_loaded"}
#: names of numbers of training alone: dropout and drop-path rates, layer drop, router jitter, an auxiliary loss's
#: coefficient (a flag such as EfficientNet's apply_dropout, which decides a residual add, counts; so does a count
#: such as drop_tokens, which an eval forward follows)
_TRAINING_RATES = re.compile(r"(?i)dropout|drop_?path|drop_?prob|drop_?rate|pdrop|layer_?drop|jitter|aux_loss")
#: modules that are the identity in eval mode (dropout, stochastic depth): one of them or an nn.Identity in its place
#: (a drop-path rate of 0) is the same forward
_EVAL_IDENTITY = re.compile(r"(?i)(dropout(\dd)?|drop_?path|stochastic_?depth)$|^identity$")


def _in_transformers(c: type) -> bool:
    return c.__module__ == "transformers" or c.__module__.startswith("transformers.")


def _transformers_private(cls: type, record: int) -> bool | frozenset[str] | set[str]:
    """The private attributes of a ``cls`` instance that are transformers' bookkeeping: for a transformers model
    class of transformers' own, all of them (True); for a class of the user's (or remote code) deriving from
    ``PreTrainedModel``, the names transformers' classes in its MRO define (``_no_split_modules``, ``_tp_plan``:
    the instance copies them), so that a ``self._n_repeat`` of the user's counts (record 4 on; record 3 left out
    every private attribute of a ``PreTrainedModel``)."""
    mro = [c for c in cls.__mro__ if _in_transformers(c)]
    if record < 3 or not any(c.__name__ == "PreTrainedModel" for c in mro):
        return frozenset()
    if record == 3 or _in_transformers(cls):
        return True
    return {k for c in mro for k in vars(c) if k.startswith("_")}


def module_settings(m: nn.Module, record: int = 4) -> tuple[str, list[tuple[str, str]]]:
    """``m``'s class name and settings as :func:`modules_digest` records them (``record``: the record's version,
    :data:`RECORDS`)."""
    st = m.__dict__.get("_sn")
    cls = getattr(st, "cls", None) or type(m)
    cls = next((c for c in cls.__mro__ if not c.__module__.startswith("torch.distributed")), cls)  # (FSDP2's
    if record == 0:  # (own classes)
        return cls.__qualname__, sorted(
            (k, repr(v)) for k, v in m.__dict__.items()
            if not k.startswith("_") and k not in ("training", "name_or_path", "gradient_checkpointing")
            and "dropout" not in k and not isinstance(m, nn.modules.dropout._DropoutNd)
            and not (k == "momentum" and isinstance(m, nn.modules.batchnorm._NormBase)) and _plain(v))
    if isinstance(m, nn.modules.dropout._DropoutNd) or _EVAL_IDENTITY.search(cls.__name__):
        return "Identity", []  # (costs are measured in eval mode)
    out = []
    hf = _transformers_private(cls, record)
    kept = _BOOKKEEPING_4 if record >= 4 else _BOOKKEEPING
    for k, v in m.__dict__.items():
        if k.startswith("_") and (record < 3 or k in kept or k.startswith("_sn_") or hf is True or k in hf) \
                or k in ("training", "name_or_path", "gradient_checkpointing") or "cache" in k.lower() \
                or (k == "momentum" and isinstance(m, nn.modules.batchnorm._NormBase)) \
                or record >= 3 and k in _SAME_WORK:
            continue
        if record == 1:  # (as it was: exact types, ``None`` a setting, hub tags counted)
            if _plain(v) and not (type(v) in (int, float) and _TRAINING_RATES.search(k)):
                out.append((k, repr(v)))
            continue
        v = _setting(v, long=record >= 3)
        if k not in _NOT_SETTINGS and v is not _NOT_PLAIN and v is not None and \
                not (type(v) in (int, float) and _TRAINING_RATES.search(k)):
            out.append((k, repr(v)))
    return cls.__qualname__, sorted(out)


#: versions of the module record: 0 before training rates were left out (files written before 2026-12-06), 1 before
#: numpy numbers and tuple types (``torch.Size``) counted as the numbers and tuples they are and a setting of
#: ``None`` as no setting, 2 before private settings (``self._stride``) and lists longer than 64 counted and an
#: activation's ``inplace`` flag stopped counting (2026-12-07), 3 before the private settings of a user's own
#: ``PreTrainedModel`` subclass counted and Accelerate's ``_is_accelerate_prepared`` flag stopped counting
#: (2026-12-07), 4 today. A file's record is compared with each: a
#: file of an earlier version was written by code that computed that one (a file of today's matches only today's,
#: short of a SHA-256 collision).
RECORDS = (4, 3, 2, 1, 0)


def modules_digest(model: nn.Module, record: int = 4) -> str:
    """The module tree a profile was measured on, as a checkpoint records it: every module's path, class name and
    settings (its plain attributes, private ones too: numbers, numpy numbers, strings, flags and tuples or lists of them
    of any length, such as a convolution's stride, an upsampling's ``torch.Size``, a mixture's experts per token or a
    ``self._stride`` of one's own; a setting of ``None`` counts as none), hashed. What leaves the forward as it is does
    not count: the module a class is defined in (``__main__.Net`` in the training script, ``mymodel.Net`` where it is
    served), the bookkeeping torch, transformers and sortednet keep under private names (:data:`_BOOKKEEPING`, a
    transformers model class's own private fields; a ``PreTrainedModel`` subclass of the user's counts its own, only the
    names transformers' classes define are left out), whether an activation writes in place, activation-checkpoint and
    FSDP wrappers (and transformers' ``gradient_checkpointing`` flag), where a model was loaded from (``name_or_path``)
    and its hub tags (``model_tags``), numbers of training alone (dropout and drop-path rates, layer drop, router
    jitter, an auxiliary loss's coefficient, a BatchNorm's momentum: costs are measured in eval mode; a dropout or
    drop-path module counts as an ``nn.Identity``, and an identity as no module: a dropout of rate 0 left out, ``None``
    in its place), state a forward updates (names with ``cache``: a rotary table's cached length), tensors and other
    objects a module holds (a persistent buffer's shape is checked by the load itself; a non-persistent one, often a
    table a forward builds or grows, is not followed). The same on the model before ``sn.wrap`` and after (a sliced
    module's attributes hold its full sizes). ``record``: the version (:data:`RECORDS`) an earlier file was written
    with."""
    h = hashlib.sha256()
    for path, m in model.named_modules(remove_duplicate=False):
        if any(n in m._modules for n in _WRAPPED) and type(m).__module__.startswith(("torch.distributed", "torch._")):
            continue  # (the wrapper itself: its child is the module)
        cls, settings = module_settings(m, record)
        if cls == "Identity" and record >= 2:
            continue
        path = ".".join(p for p in path.split(".") if p not in _WRAPPED)
        h.update(f"{path}\0{cls}\0{settings}\n".encode())
    return h.hexdigest()


def _plain(v: Any, depth: int = 0) -> bool:
    if v is None or type(v) in (bool, int, float, str):
        return True
    return type(v) in (tuple, list) and depth < 2 and len(v) <= 64 and all(_plain(x, depth + 1) for x in v)


_NOT_PLAIN = object()


def _setting(v: Any, depth: int = 0, long: bool = True) -> Any:
    """``v`` as a plain value (numbers, flags, strings, ``None``, tuples of them: a ``torch.Size``, a named
    tuple or a list as the tuple it holds, a numpy number as the number), or ``_NOT_PLAIN`` (``long``: tuples of
    any length, nested up to 4 deep; record 2 took up to 64 items, 2 deep)."""
    if v is None or type(v) in (bool, int, float, str):
        return v
    if isinstance(v, enum.Enum):
        return f"{type(v).__qualname__}.{v.name}"
    for t in (bool, int, float, str):  # (a subclass of one, numpy's float64: its value)
        if isinstance(v, t):
            return t(v)
    if type(v).__module__ == "numpy" and hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        return _setting(v.item(), depth, long)
    if isinstance(v, (tuple, list)) and (depth < 4 if long else depth < 2 and len(v) <= 64):
        items = tuple(_setting(x, depth + 1, long) for x in v)
        return _NOT_PLAIN if any(x is _NOT_PLAIN for x in items) else items
    return _NOT_PLAIN


def _callable_token(x: Any) -> str:
    """A function as a token equal only for the same one (a bound method: its object and function, however often
    the attribute read makes a new method object; a builtin method: its object and name), kept in a registry of
    the last 1,024 signed by weak reference where the object takes one (so it keeps nothing alive: a freed one's
    successor at its address is another object, another token) and strongly otherwise; one signed again after
    leaving it gets a new token (counted afresh). The token names this process: a profile saved with it never
    matches a function of another process."""
    if isinstance(x, types.MethodType):
        parts: tuple = (x.__self__, x.__func__)
    elif isinstance(x, (types.BuiltinMethodType, types.MethodWrapperType)) and \
            not isinstance(getattr(x, "__self__", None), (types.ModuleType, type(None))):
        parts = (x.__self__, x.__name__)  # (t.add, lst.append: a new object at every read)
    else:
        parts = (x,)
    key = tuple(p if isinstance(p, str) else id(p) for p in parts)
    with _CALLABLES_LOCK:
        hit = _CALLABLES.get(key)
        if hit is None or any(not isinstance(p, str) and (r() if isinstance(r, weakref.ref) else r) is not p
                              for r, p in zip(hit[0], parts)):
            hit = (tuple(_weak(p) for p in parts), next(_UNSIGNED))
        _CALLABLES[key] = hit
        _CALLABLES.move_to_end(key)
        while len(_CALLABLES) > 1024:
            _CALLABLES.popitem(last=False)
    return f"<function {getattr(x, '__qualname__', type(x).__name__)} #{hit[1]}@{_PROCESS}>"


def _weak(p: Any) -> Any:
    if isinstance(p, str):
        return p
    try:
        return weakref.ref(p)
    except TypeError:
        return p


_CALLABLES: collections.OrderedDict[tuple, tuple[tuple, int]] = collections.OrderedDict()  # (id keys: a lock)
_CALLABLES_LOCK = threading.Lock()
_ATOMS = frozenset({int, float, bool, str, bytes, complex, type(None)})
_CODE = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.MethodWrapperType,
         types.WrapperDescriptorType, types.MethodDescriptorType, types.CodeType)
_UNSIGNED = itertools.count()  # (a part of an input too large to sign: never equal, so never a stale count)
_PROCESS = os.urandom(6).hex()  # (tokens of this process: a saved profile's never match another process's)


def _tensor_signature(t: Tensor) -> tuple:
    """Shape, dtype and device; and the value of a one-element integer or bool tensor (a step count or a flag
    that a forward may branch on, as it would on a Python int); and a digest of a bool tensor's values (a mask
    a forward selects with, ``x[mask]``: its count of True sets the FLOPs)."""
    sig = (tuple(t.shape), str(t.dtype), str(t.device))
    if t.device.type == "meta" or t.layout != torch.strided:
        return sig
    if t.numel() == 1 and not t.is_floating_point() and not t.is_complex():
        return (*sig, t.item())
    if t.dtype == torch.bool:
        data = t.detach().cpu().contiguous().numpy().tobytes()
        return (*sig, "mask:" + hashlib.blake2b(data, digest_size=8).hexdigest())
    return sig

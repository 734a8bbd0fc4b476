"""Sliced views of parameters and how their gradients reach ``param.grad``.

The hot path of every forward: a sliced attribute read is one lookup of the
active plan (:mod:`sortednet.plan`) plus :func:`view`. Two ways to give a
sliced weight its gradient:

- plain autograd (``narrow``): ``SliceBackward`` builds a zero gradient of the
  FULL parameter and ``AccumulateGrad`` adds it to ``.grad``: two full-size
  memory passes per sliced weight per backward;
- :class:`SliceInto` (``wrap(..., inplace_grad=True)``, the default, for
  tensors of at least ``inplace_min_numel`` elements): the backward adds the
  slice's gradient straight into ``param.grad[slice]`` when, and only when,
  that is exactly what plain autograd would do; otherwise it returns the
  full-size gradient and autograd carries on as usual (see
  :func:`accumulates_plainly`). A fast path is an optimisation, never a
  different semantics.
"""

from __future__ import annotations

import copy
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.fx import _symbolic_trace
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.nn import functional as F

from ._tracing import compiling
from .errors import SortedNetError

if TYPE_CHECKING:
    from .dims import Binding

__all__ = ["SliceInto", "View", "DYNAMIC", "STATIC", "ABSENT", "cut", "cuts_for", "view", "narrow", "is_sharded",
           "sharded_read", "accumulates_plainly"]

Cuts = tuple[tuple[int, int, int], ...]
Segments = tuple[int, tuple[tuple[int, int], ...], int] | None  # (axis, ((start, length), ...), full length along
#                                                                  the axis) of fused blocks

_Parameter, _Tensor = nn.Parameter, Tensor


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: plan entry: the slicer's ``value()`` runs on every read (computed attributes, custom slicers)
DYNAMIC = _Marker("DYNAMIC")
#: slicer rule: the attribute depends on the active sizes only; the plan stores its value
STATIC = _Marker("STATIC")
#: plan entry: a ``views`` tensor absent when the plan was made (registered as None: a ``bias=False`` layer's),
#: read at each use: None, or the slice of one ``torch.func.functional_call`` puts in the slot for its forward
ABSENT = _Marker("ABSENT")


def is_sharded(t: object) -> bool:
    """True for a DTensor (FSDP2 keeps parameters sharded as DTensors between forwards).

    Never imports ``torch.distributed``: without it loaded no DTensor can exist.
    """
    if t.__class__ is _Parameter or t.__class__ is _Tensor:  # (the common case, without a module lookup)
        return False
    kind = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)  # None while another thread is
    return kind is not None and isinstance(t, kind)                                # still importing the module


def distributed_bookkeeping() -> bool:
    """Whether the code reading a sliced attribute (the first caller outside sortednet) is torch.distributed's
    own bookkeeping: FSDP2 finds its sharded parameters again with ``getattr(module, name)`` (lazy init at the
    first forward, ``.to()``, ``load_state_dict``), distributed checkpointing walks parameter names with it
    (``get_model_state_dict``, ``get_optimizer_state_dict``): they must get the parameter itself back. A
    forward's read (tensor parallelism) comes from the module's own code (``torch.nn``, the user's)."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_globals.get("__name__", "")
        if not (name == "sortednet" or name.startswith("sortednet.") or name == _MODULE_MACHINERY):
            return name.startswith("torch.distributed.")
        f = f.f_back
    return False


#: nn.Module's own machinery (``__setattr__`` -> ``register_parameter``, which reads ``hasattr(module, name)``):
#: passed over like sortednet's frames, to the code that called it (FSDP2 puts its parameters back with
#: ``setattr`` on a module whose class has its own ``__setattr__``, a sliced BatchNorm's); a forward's read comes
#: from the module's own file (``torch.nn.modules.linear``, the user's)
_MODULE_MACHINERY = nn.Module.__module__


def sharded_read(t: Tensor, cutting: bool, st: Any, name: str) -> Tensor:
    """A DTensor parameter read through a sliced attribute: FSDP2's bookkeeping and reads the active
    sub-model does not cut get it whole; any other read that the sub-model would cut is refused. Such a read
    is tensor parallelism (its DTensors stay sharded in the forward, where a slice of the local shard is not
    the sub-model's slice) or a read of FSDP2's sharded parameter outside a forward: handing the whole tensor
    out would run the full-size layer under the sub-model, in silence."""
    if not cutting or distributed_bookkeeping():
        return t
    where = f"{st.path + '.' if st.path else ''}{name}"
    raise SortedNetError(f"{where} is a DTensor ({getattr(t, 'placements', '?')}) where the active sub-model cuts "
                         "it: sortednet slices plain tensors only. Tensor parallelism (parallelize_module, "
                         "DTensor parameters inside the forward) is not supported; FSDP2 (fully_shard) is, and "
                         "its sharded parameters are plain inside the forward: read sliced attributes there, or "
                         "outside use(...) (the full model)")


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The modules of ``module`` that ``fully_shard`` made FSDP2 units (their parameters may be unsharded
    plain tensors between a forward and its backward, so the parameter types alone cannot tell)."""
    kinds = tuple(k for mod in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")  # (torch < 2.6:
                  if (k := getattr(sys.modules.get(mod), "FSDPModule", None)) is not None)  # the latter)
    return [m for m in module.modules() if isinstance(m, kinds)] if kinds else []


def is_fsdp(module: nn.Module) -> bool:
    """True when ``module`` or one of its sub-modules was sharded with FSDP2 ``fully_shard``.

    >>> import torch.nn as nn, sortednet.distributed as snd
    >>> snd.is_fsdp(nn.Linear(2, 2))
    False
    """
    return any(is_sharded(p) for p in module.parameters()) or bool(fsdp_units(module))


def cut(t: Tensor, cuts: Cuts) -> Tensor:
    """``t`` narrowed by each ``(axis, start, length)``: a view."""
    for axis, start, length in cuts:
        t = t.narrow(axis, start, length)
    return t


def cuts_for(shape: torch.Size | tuple[int, ...], bind: dict[str, Binding], axes: Any,
             sizes: dict[str, int]) -> tuple[Cuts, Segments]:
    """The cuts of a tensor of ``shape`` sliced on ``(axis, role)`` pairs at ``sizes``.

    Fused blocks stacked along an axis (``chunks`` / ``parts``) are each cut to
    their own prefix: returned as segments, the tensor is then a ``cat``.
    """
    cuts: list[tuple[int, int, int]] = []
    segs: Segments = None
    for axis, role in axes:
        b = bind.get(role)
        if b is None:
            continue
        s = sizes[b.dim.name]
        if b.chunks > 1 or b.parts:
            if s != b.dim.full:
                segs = (axis, b.segments(s), sum(b.dim.full * b.unit // d for d in b.blocks))
            continue
        n = s * b.unit // b.div
        if n != shape[axis]:
            cuts.append((axis, 0, n))
    return tuple(cuts), segs


#: a column-major 2-d gradient of at least this many elements is added into a row-major slice of ``.grad``
#: in blocks of :data:`ADD_BLOCK` columns (see :func:`_add`)
BLOCKED_ADD_MIN = 1 << 18
ADD_BLOCK = 128


def _add(target: Tensor, grad: Tensor) -> None:
    """``target += grad``. ``mm``'s backward hands an input-sliced (strided) weight a column-major gradient;
    added into the row-major slice of ``.grad`` in one go, every row of the target reads a strided column
    of the gradient, which leaves the cache once the weight is larger than it. Column blocks keep both
    operands of each add cache-resident (benchmarks/results/layout.md: `row view, blocked add`)."""
    if (grad.dim() == 2 and grad.numel() >= BLOCKED_ADD_MIN and grad.stride(0) == 1 and target.stride(1) == 1
            and grad.shape[1] > ADD_BLOCK):
        for j in range(0, grad.shape[1], ADD_BLOCK):
            target[:, j:j + ADD_BLOCK].add_(grad[:, j:j + ADD_BLOCK])
    else:
        target.add_(grad)


class SliceInto(torch.autograd.Function):
    """A view of a leaf parameter whose gradient goes straight into its slice of ``param.grad``.

    Backward takes the fast path only when plain autograd would do exactly an
    accumulation into ``param.grad`` (:func:`accumulates_plainly`): a plain
    ``.backward()`` that accumulates into this parameter, without
    ``create_graph``, parameter hooks or a special ``.grad``. Otherwise it
    returns the full-size gradient, as ``narrow``'s backward does, and autograd
    proceeds as usual (``autograd.grad`` receives it, hooks see it, a second
    order graph is built). Writes into ``.grad`` hold a per-module lock, so
    threads running backward at once add up exactly.
    """

    @staticmethod
    def forward(ctx: Any, param: Tensor, cuts: Cuts, lock: Any) -> Tensor:  # type: ignore[override]
        ctx.param, ctx.cuts, ctx.lock = param, cuts, lock
        return cut(param.detach(), cuts)  # a view: in-place changes and version checks reach the parameter

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        p, cuts = ctx.param, ctx.cuts
        if not p.requires_grad:  # frozen after the forward: autograd's AccumulateGrad drops it too
            return None, None, None
        if accumulates_plainly(ctx, p, grad, whole=not cuts):
            with ctx.lock:
                g = p.grad
                if g is None and not cuts:
                    p.grad = torch.empty_like(p).copy_(grad)   # in the parameter's layout, as AccumulateGrad
                else:
                    if g is None:
                        p.grad = g = torch.zeros_like(p)
                    _add(cut(g, cuts), grad)
            return None, None, None
        if not cuts:
            return grad, None, None
        full = grad.new_zeros(p.shape)
        cut(full, ctx.cuts).copy_(grad)  # differentiable under create_graph
        return full, None, None


class SliceCopy(SliceInto):
    """:class:`SliceInto` for a weight the reader would copy anyway: a contiguous copy of the slice, whose
    gradient goes into its slice of ``param.grad`` as :class:`SliceInto`'s does.

    A convolution hands its weight to its kernels contiguous: an input-sliced weight ``W[:o, :i]`` (a strided
    view) is copied in the forward and copied again in the backward. Read once as a copy, the forward and the
    backward share it (see :func:`dense_cut`). The view is saved too (no memory of its own): unpacking it in
    the backward makes autograd's version check, so a parameter changed in place between forward and backward
    raises as in plain PyTorch (and ``allow_mutation_on_saved_tensors`` works as there).
    """

    @staticmethod
    def forward(ctx: Any, param: Tensor, cuts: Cuts, lock: Any) -> Tensor:  # type: ignore[override]
        ctx.param, ctx.cuts, ctx.lock = param, cuts, lock
        v = cut(param.detach(), cuts)
        ctx.save_for_backward(v)
        return v.clone()  # (dense in the parameter's memory format: channels-last stays channels-last)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        ctx.saved_tensors  # noqa: B018  (autograd's version check of the parameter)
        return SliceInto.backward(ctx, grad)


#: ``SliceInto.apply`` without ``autograd.Function.apply``'s Python wrapper (which only adds
#: functorch and ``setup_context`` handling: :func:`narrow` never calls it under functorch)
_slice_into = super(torch.autograd.Function, SliceInto).apply  # type: ignore[misc]
_slice_copy = super(torch.autograd.Function, SliceCopy).apply  # type: ignore[misc]
if hasattr(_symbolic_trace, "_is_fx_tracing_flag"):  # torch <= 2.13: one process-wide flag
    def fx_flag() -> bool:
        """``torch.fx.symbolic_trace`` may be running (cheap, read first on hot paths; then :func:`fx_tracing`)."""
        return _symbolic_trace._is_fx_tracing_flag
else:  # torch 2.14+: the flag is per thread
    _FX_TLS = _symbolic_trace._is_fx_tracing_tls
    _COMPILING = compiling

    def fx_flag() -> bool:
        """``torch.fx.symbolic_trace`` may be running (cheap, read first on hot paths; then :func:`fx_tracing`).
        Not read while torch.compile traces: a graph guarding on a thread's own flag recompiled in every new
        serving thread."""
        return not _COMPILING() and getattr(_FX_TLS, "flag", False)


_TRACE_CODE = _symbolic_trace.Tracer.trace.__code__


def fx_tracing() -> bool:
    """``torch.fx.symbolic_trace`` is running IN THIS THREAD (proxies instead of tensors: what a sliced read returns
    would be baked into the graph as one sub-model's constant); ``torch.export``'s make_fx runs real tensors: not
    this. torch.fx's flag is process-wide (another thread compiling sets it): this thread's frames are walked for
    ``Tracer.trace`` (subclasses such as Hugging Face's tracer call it), only while the flag is set."""
    if not fx_flag() or get_proxy_mode() is not None:
        return False
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is _TRACE_CODE:
            return True
        f = f.f_back
    return False


def fx_refused(what: str) -> SortedNetError:
    return SortedNetError(
        f"torch.fx symbolic tracing of a wrapped model: {what} would be baked into the graph as the sub-model "
        "active during the trace, while its sliced layers, called as modules, follow nest.use at call time: the "
        "traced module would mix two sub-models. Trace nest.export(sub) (a plain model), or capture a sub-model "
        "with torch.export.export(model, ...) inside nest.use(sub)")
_grad_enabled = torch.is_grad_enabled
_compiling = compiling  # (this thread's tracing: _tracing.py)
_functorch_active = torch._C._are_functorch_transforms_active


def accumulates_plainly(node: Any, p: Tensor, grad: Tensor, whole: bool = False, index: int = 0) -> bool:
    """Inside :class:`SliceInto`'s backward: would autograd just add the gradient into ``p.grad``?

    False under ``create_graph`` (grad mode is on in backward), under compiled autograd, when ``p`` has
    tensor hooks or post-accumulate-grad hooks, under anomaly detection, when ``.grad`` is not a plain
    dense tensor of the gradient's dtype or ``p.grad_dtype`` asks for another
    (fp32 gradients of bf16 weights), and when the engine will not run
    ``p``'s AccumulateGrad node (``torch.autograd.grad``, ``backward(inputs=...)``
    without ``p``: PyTorch raises for leaf nodes there, which also says no).
    A ``whole`` (uncut) parameter also goes to AccumulateGrad when ``torch.distributed``
    is initialised: DDP's reducer hooks it there.
    """
    if torch.is_grad_enabled() or p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
        return False
    if _anomaly():  # (a backward run under detect_anomaly checks each gradient returned: return it)
        return False
    if _compiling() or _compiled_autograd():  # a traced backward: a write into p.grad would not be in the graph
        return False
    if grad.__class__ is not Tensor or grad.layout is not torch.strided or (whole and _distributed()):
        return False  # (a tensor subclass's gradient, TwoTensor's pair: autograd accumulates it as the subclass)
    if getattr(p, "grad_dtype", None) not in (None, grad.dtype):  # AccumulateGrad converts to p.grad_dtype
        return False
    g = p.grad
    if g is not None and (g.__class__ is not Tensor or g.requires_grad or g.layout is not torch.strided
                          or g.dtype != grad.dtype or g.device != grad.device):
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node.next_functions[index][0]))
    except (RuntimeError, IndexError, AttributeError):
        return False


def _compiled_autograd() -> bool:
    """A backward run by compiled autograd (``torch._dynamo.config.compiled_autograd``, ``compiled_autograd._enable``):
    it traces the backward into a graph, and a Python-side write into ``.grad`` is not part of it (the gradient
    was lost in silence). Read from ``sys.modules``: nothing is imported on the backward's hot path."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return ca is not None and bool(getattr(ca, "in_compiled_autograd_region", False))


def _distributed() -> bool:
    dist = sys.modules.get("torch.distributed")
    ready = getattr(dist, "is_initialized", None)  # (None while another thread is still importing it)
    return ready is not None and dist.is_available() and ready()


def world_size() -> int:
    """Ranks of the initialised default process group (1 without one): > 1 where work done in one process
    (calibration, a data-based sort, ``fit``) would differ between ranks."""
    return sys.modules["torch.distributed"].get_world_size() if _distributed() else 1


class LinearInto(torch.autograd.Function):
    """``F.linear(x, W[cuts], b[bcuts])`` whose weight gradient is accumulated into its slice of ``W.grad`` by
    the matmul itself (``addmm_`` with ``beta=1``), in the slice's own row-major layout.

    The fused form of :class:`SliceInto` for a plain ``nn.Linear`` (see :func:`linear`): with the weight read as
    a view, ``mm``'s backward returns an input-sliced weight's gradient column-major, and adding it into the
    row-major slice of ``.grad`` is a transposing add (docs/mechanism.md). Here one GEMM writes the gradient
    where it belongs, with no temporary and no separate add. The same rules as :class:`SliceInto` decide
    between that and plain autograd's result (:func:`accumulates_plainly`, per parameter); under
    ``create_graph`` the backward computes with the weight's values saved at forward, connected to the
    parameter, so second-order gradients are those of ``F.linear``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, wcuts: Cuts,  # type: ignore[override]
                bcuts: Cuts, lock: Any) -> Tensor:
        wv = cut(w.detach(), wcuts)
        bv = None if b is None else cut(b.detach(), bcuts)
        ctx.save_for_backward(x, wv)  # the view: autograd's version check sees in-place changes of the weight
        ctx.w, ctx.b, ctx.wcuts, ctx.bcuts, ctx.lock = w, b, wcuts, bcuts, lock
        return torch.nn.functional.linear(x, wv, bv)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, wv = ctx.saved_tensors
        w, b, wcuts, bcuts = ctx.w, ctx.b, ctx.wcuts, ctx.bcuts
        if torch.is_grad_enabled():  # create_graph: the values saved at forward (as F.linear's backward uses:
            wv = _saved_as(cut(w, wcuts), wv)  # a `p.data = ...` swap or a mutation allowed on saved tensors
            #                                    since then does not reach them), differentiable in the parameter
        gx = g.matmul(wv) if ctx.needs_input_grad[0] else None
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gw = gb = None
        if w.requires_grad:
            if accumulates_plainly(ctx, w, g, index=1):
                with ctx.lock:
                    if w.grad is None:
                        w.grad = torch.zeros_like(w)
                    cut(w.grad, wcuts).addmm_(g2.t(), x2)
            else:
                gw = _full(w, g2.t().mm(x2), wcuts)
        if b is not None and b.requires_grad:
            s = g2.sum(0)
            if bcuts and accumulates_plainly(ctx, b, g, index=2):
                with ctx.lock:
                    if b.grad is None:
                        b.grad = torch.zeros_like(b)
                    cut(b.grad, bcuts).add_(s)
            else:
                gb = _full(b, s, bcuts)
        return gx, gw, gb, None, None, None


class _SavedAs(torch.autograd.Function):
    """``saved``'s values with ``live``'s gradient (identity): a weight saved at forward, differentiable in the
    parameter it was cut from (``saved + (live - live.detach())`` would turn an infinite weight into NaN)."""

    @staticmethod
    def forward(ctx: Any, live: Tensor, saved: Tensor) -> Tensor:  # type: ignore[override]
        return saved.view_as(saved)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return g, None


_saved_as = _SavedAs.apply


def _full(p: Tensor, g: Tensor, cuts: Cuts) -> Tensor:
    """The full-size gradient of ``p`` whose slice ``cuts`` is ``g`` (``narrow``'s backward)."""
    if not cuts:
        return g
    full = g.new_zeros(p.shape)
    cut(full, cuts).copy_(g)  # differentiable under create_graph
    return full


_linear_into = super(torch.autograd.Function, LinearInto).apply  # type: ignore[misc]
_forward_ad = torch.autograd.forward_ad   # (its _current_level >= 0 inside dual_level: F.linear has the jvp)
_autocast = torch._C._is_any_autocast_enabled
_anomaly = torch.is_anomaly_enabled
_top_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def _saved_hooks() -> bool:
    """Saved-tensor hooks in force: a non-reentrant activation checkpoint (its forward and its recomputation in
    the backward), activation offloading. A checkpoint matches what the recomputation saves to what the forward
    saved by position, checking shapes only: both must take the same path, and a condition of the fused ones
    that differs between them (anomaly mode around the backward alone, a compiled forward on plain views and an
    eager recomputation on the parameters) would pair other tensors, in silence where the shapes agree. Under
    the hooks both take the plain path."""
    return _top_hooks(False) is not None


#: switch for the fused ``nn.Linear`` gradient path (benchmarks/layout.py compares both sides in one run)
FUSED_LINEAR = True
_PLAIN = (Tensor, _Parameter)  # (inputs without a __torch_function__ of their own: a learned query is a Parameter)


def linear(m: nn.Module, x: Tensor, wv: View, bv: Any, st: Any) -> Tensor | None:
    """``m``'s linear map of ``x`` by :class:`LinearInto` when it applies (training, a sliced real leaf weight of
    at least ``inplace_min_numel`` elements, no autocast, compile, functorch or forward-mode AD), else None."""
    w = m._parameters.get("weight")
    if (not FUSED_LINEAR or w is None or w.__class__ is not _Parameter or not w.requires_grad or not st.inplace_grad
            or wv.segs is not None or not wv.cuts or w.numel() < st.min_numel or not _grad_enabled()
            or _compiling() or _functorch_active() or _autocast() or _forward_ad._current_level >= 0
            or w.is_inference() or w.is_complex() or _anomaly() or x.__class__ not in _PLAIN or x.is_nested
            or _saved_hooks()):
        return None  # (saved-tensor hooks: _saved_hooks; inference: refused by narrow, by name; complex:
        #              autograd's conjugates, which LinearInto's GEMMs leave out; anomaly mode: it checks every
        #              gradient a backward returns, and one written into .grad here is not returned; a tensor
        #              subclass's input: its __torch_function__ may change
        #              F.linear, which the backward's own GEMMs would leave out; a nested (jagged) input: its
        #              gradient has no 2-d view for the GEMMs)
    b = m._parameters.get("bias")
    if b is None:
        return None if "bias" in m._buffers else _linear_into(x, w, None, wv.cuts, (), st.lock)
    if b.__class__ is not _Parameter or bv.__class__ is not View or bv.segs is not None:
        return None
    return _linear_into(x, w, b, wv.cuts, bv.cuts, st.lock)


_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
#: switch for the contiguous convolution weight read (benchmarks/conv_weight.py compares both sides)
DENSE_CONV = True


def dense_cut(m: nn.Module, wv: View, st: Any) -> Tensor | None:
    """``m.weight`` cut by ``wv`` as a :class:`SliceCopy` when training reads a strided slice of a real leaf weight
    that the module's own (library) forward hands to a kernel needing it contiguous, else None (then the weight
    is read as usual). The same conditions as :class:`SliceInto`'s path in :func:`narrow`, and those of
    :func:`linear`."""
    w = m._parameters.get("weight")
    if (not DENSE_CONV or w is None or w.__class__ is not _Parameter or not w.requires_grad or not st.inplace_grad
            or wv.segs is not None or not wv.cuts or w.numel() < st.min_numel or fx_flag()
            or _functorch_active() or _autocast() or _forward_ad._current_level >= 0 or w.is_inference()
            or _anomaly() or _saved_hooks()):
        return None
    v = cut(w, wv.cuts)
    if v.is_contiguous() or v.is_contiguous(memory_format=_LAST.get(v.dim(), torch.contiguous_format)):
        return None  # (output channels only: a dense block already)
    return _slice_copy(w, wv.cuts, st.lock)


def narrow(t: Tensor, cuts: Cuts, st: Any) -> Tensor:
    """``t`` cut to ``cuts``; when training, a :class:`SliceInto` view (``st``: the module's State).

    An uncut tensor is the parameter itself (a leaf: ``module.weight is param``,
    ``module.weight.grad`` and optimizers work as in plain PyTorch); its gradient
    goes through AccumulateGrad. Threads that run backward at the same moment
    with one using a parameter whole and another a slice of it must use
    ``inplace_grad=False`` (docs/mechanism.md); slices from several threads add up
    exactly under the nest's lock.
    """
    if not cuts:
        return t
    if t.requires_grad and _grad_enabled() and not _compiling():
        if t.is_inference():
            raise _inference_refused(st)
        if (st.inplace_grad and t.is_leaf and t.numel() >= st.min_numel and not _functorch_active()
                and _forward_ad._current_level < 0 and not _anomaly()):  # (forward-mode AD: SliceInto has no
            return _slice_into(t, cuts, st.lock)                           # jvp; anomaly mode: see linear)
    for axis, start, length in cuts:
        t = t.narrow(axis, start, length)
    return t


def _inference_refused(st: Any) -> SortedNetError:
    """A slice of an inference tensor (made under ``torch.inference_mode``) read with gradients on: PyTorch
    gives it no gradient at all (a view of an inference tensor outside inference mode does not require grad),
    so a sub-model would train nothing of it, silently, where the full model's backward raises."""
    return SortedNetError(f"{st.path or '<root>'!r}: its parameters are inference tensors (the model was built or "
                          "loaded under torch.inference_mode), which cannot be trained: a sub-model's slices of them "
                          "would get no gradient. Build the model outside inference_mode to train it; run "
                          "sub-models for inference under torch.inference_mode() or torch.no_grad()")


def view(t: Tensor, cuts: Cuts, segs: Segments, st: Any, name: str = "", m: Any = None) -> Tensor:
    """``t`` sliced by :func:`cuts_for`'s result (a view, or a ``cat`` of fused blocks: a :class:`FusedCopy`)."""
    if segs is None:
        return narrow(t, cuts, st)
    axis, parts, span = segs
    if t.shape[axis] != span:  # (each block is cut at the full tensor's offsets: another length reads other rows)
        where = f"{st.path + '.' if st.path else ''}{name}"
        raise SortedNetError(f"{where}: a tensor of shape {tuple(t.shape)} where sortednet cuts fused blocks "
                             f"spanning {span} along axis {axis} (the full model's): each block is cut at the full "
                             "tensor's offsets, so another length would read other rows. Give it the full-size "
                             "tensor (torch.func.functional_call, load_state_dict(assign=True), a reassigned "
                             f"parameter); a slicer of yours reading a tensor of one entry per unit beside the fused "
                             f"one (a per-unit scale) with take(): cut that one by hand, p[:features // {len(parts)}] "
                             "(docs/custom_slicers.md)")
    out = torch.cat([narrow(t, (*cuts, (axis, start, n)), st) for start, n in parts], axis)
    if _compiling() or _functorch_active() or _inspected(m):
        return out
    cat, out = out, out.as_subclass(FusedCopy)
    out._sn_where = f"{st.path}.{name}" if st.path and name else name or st.path or "a fused attribute"
    out._sn_of = cat  # (the copy's memory)
    out._sn_read = True  # (the attribute's value itself: `.data =` / set_ on it meant the module's tensor)
    return out


_NOT_TRACED = ("a fused weight read under a sortednet sub-model outside the compiled code (a copy that refuses "
               "in-place writes) runs its operations eagerly; read it inside the compiled function, or pass "
               "w.clone() (a plain tensor)")
try:  # (a compiled function handed one runs its ops eagerly through here: dynamo never traces the check)
    _eager_only = torch.compiler.disable(reason=_NOT_TRACED)
except TypeError:  # (torch < 2.8: no reason)
    _eager_only = torch.compiler.disable


# functions that write some of their tensor arguments inside the kernel (or in their own Python, which runs below
# the subclass): name -> (parameter names in order, the flag that makes them write and its default, the written)
_NORM_OP = (("input", "weight", "bias", "running_mean", "running_var", "training"), "training", False,
            ("running_mean", "running_var"))
_KERNEL_WRITES: dict[str, tuple[tuple[str, ...], str, Any, tuple[str, ...]]] = {
    "batch_norm": _NORM_OP, "native_batch_norm": _NORM_OP, "_native_batch_norm_legit": _NORM_OP,
    "instance_norm": (("input", "weight", "bias", "running_mean", "running_var", "use_input_stats"),
                      "use_input_stats", True, ("running_mean", "running_var")),
}
_F_WRITES: dict[Any, tuple[tuple[str, ...], str, Any, tuple[str, ...]]] = {  # torch.nn.functional's own orders
    F.batch_norm: (("input", "running_mean", "running_var", "weight", "bias", "training"), "training", False,
                   ("running_mean", "running_var")),
    F.instance_norm: (("input", "running_mean", "running_var", "weight", "bias", "use_input_stats"),
                      "use_input_stats", True, ("running_mean", "running_var")),
    F.embedding: (("input", "weight", "padding_idx", "max_norm"), "max_norm", None, ("weight",)),
    F.embedding_bag: (("input", "weight", "offsets", "max_norm"), "max_norm", None, ("weight",)),
}
_KERNEL_WRITES = {**_KERNEL_WRITES, "embedding": _F_WRITES[F.embedding], "embedding_bag": _F_WRITES[F.embedding_bag]}


def _kernel_written(func: Any, op: str, args: tuple, kwargs: dict) -> Tensor | None:
    """The :class:`FusedCopy` among the arguments that ``func`` writes inside its kernel (BatchNorm's running
    statistics in training, an embedding's rows renormalised by ``max_norm``), or None."""
    spec = _F_WRITES.get(func)
    if spec is None:
        if op in ("embedding", "embedding_bag"):  # (torch.embedding / embedding_bag: no max_norm, write nothing)
            return None
        spec = _KERNEL_WRITES[op]
    names, flag, default, written = spec

    def arg(n: str, default: Any = None) -> Any:
        i = names.index(n)
        return kwargs[n] if n in kwargs else args[i] if len(args) > i else default

    on = arg(flag, default)
    if on is None or on is False or (isinstance(on, Tensor) and not bool(on)):
        return None
    return next((t for t in (arg(n) for n in written) if isinstance(t, FusedCopy)), None)


class FusedCopy(torch.Tensor):
    """A fused-block attribute under a sub-model (``chunks=`` / ``parts=``: the first rows of each block of
    ``[q; k; v]`` or ``[gate; up]``, MultiheadAttention's ``in_proj_weight`` under Heads): a ``cat`` of the
    blocks' slices, a copy, not a view of the parameter. A write into it in place (``nn.init.*_``,
    ``.clamp_``, ``.copy_``, ``[...] =``, through ``.data``, ``.detach()`` or an indexed view of it) would not
    reach the parameter and be lost in silence: it is refused. Every other operation runs as on a plain
    tensor and returns plain tensors."""

    @classmethod
    @_eager_only
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        op = name.partition(".")[0]  # (torch.ops.aten.add_.Tensor is named "add_.Tensor")
        me = args[0] if args and isinstance(args[0], FusedCopy) else None
        out = kwargs.get("out")
        written = None
        if func == _DATA_SET:
            # (`.data = t` on the attribute's value itself: a parameter's would change the module, this temporary's
            # is lost. On an alias, w.detach(), it rebinds that alias only, as for a plain tensor: allowed)
            written, name = (me if me is not None and me.__dict__.get("_sn_read") else None), ".data ="
        elif ((op.endswith("_") and not op.startswith("__") and op not in _NOT_WRITES) or op in _WRITES
                or kwargs.get("inplace") is True):
            # (the tensor written: a method's self, the first tensor of a function such as nn.init.normal_ or
            # F.relu(inplace=True), which hand their tensor over by keyword, or any of a list: _foreach_add_)
            first = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            written = next((t for t in (first if isinstance(first, (list, tuple)) else (first,))
                            if isinstance(t, FusedCopy)), None)
        if written is None:
            written = next((o for o in (out if isinstance(out, (tuple, list)) else [out])
                            if isinstance(o, FusedCopy)), None)
        if written is None and op in _KERNEL_WRITES:
            written = _kernel_written(func, op, args, kwargs)
        if written is not None and _holds_copy(written):
            _refuse_write(written, name)
        with _NoSubclass():
            result = func(*args, **kwargs)
            if me is None or func == _BASE:  # (`_base`: the plain cat under the subclass view, as for PyTorch's own)
                return result
            if isinstance(result, (tuple, list)):  # (split, chunk, unbind: views of it, a write there is lost too)
                return type(result)(_alias_of(r, me) for r in result)
            return _alias_of(result, me)  # (.data, .detach(), w[0], w.view(...))

    def set_(self, *args: Any, **kwargs: Any) -> Tensor:
        """On the attribute's value itself, refused as ``.data =`` is (``set_`` reaches no
        ``__torch_function__``): it rebinds this temporary only, and what the caller meant to load into the
        module's tensor would be lost. On an alias (``w.detach()``) it rebinds the alias, as for a plain tensor."""
        if self.__dict__.get("_sn_read") and _holds_copy(self):
            _refuse_write(self, "set_")
        with _NoSubclass():
            return Tensor.set_(self, *args, **kwargs)

    def __copy__(self) -> Tensor:
        """``copy.copy``: as for a plain tensor, a tensor sharing its memory (so checked as it is)."""
        return _alias_of(copy.copy(plain(self)), self)

    def numpy(self, *args: Any, **kwargs: Any) -> Any:
        """A read-only array (a write through it could not reach the parameter: numpy refuses it)."""
        arr = plain(self).numpy(*args, **kwargs)
        arr.flags.writeable = False
        return arr

    # what belongs to the object, not to values a write would lose: as a plain tensor (a copy is plain)
    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        return plain(self).__repr__(*args, **kwargs)

    def __format__(self, spec: str) -> str:
        return plain(self).__format__(spec)

    def __deepcopy__(self, memo: dict) -> Tensor:
        return plain(self).__deepcopy__(memo)

    def __reduce_ex__(self, proto: Any) -> Any:
        return plain(self).__reduce_ex__(proto)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_is_param" and value:  # nn.Parameter(w.detach()): a parameter of its own (of a copy), plain
            object.__setattr__(self, "__class__", nn.Parameter)
            self.__dict__.pop("_sn_where", None)
            self.__dict__.pop("_sn_of", None)
            return
        super().__setattr__(name, value)


def _refuse_write(written: "FusedCopy", name: str) -> None:
    """Raise the refusal of the write ``name`` (an op, ``.data =``) into ``written``, naming its attribute."""
    where = written._sn_where
    if written.__dict__.get("_sn_computed"):
        raise SortedNetError(
            f"{where}: written in place ({name}) under a sub-model, where it is the value its slicer's "
            "value() computed (a new tensor, not a view of the module's parameter or buffer): the write "
            "would not reach the module's tensor and be lost. Return a view from value() (self.take(...), "
            "or t[:k] / t.narrow(...) of the tensor itself; docs/custom_slicers.md). If the forward meant "
            "to write a copy of its own (w = self.weight.to(dtype) where value() already cast it, so .to "
            "made no copy), take one that always copies: .clone()")
    if written.__dict__.get("_sn_rank"):
        raise SortedNetError(
            f"{where}: written in place ({name}), where it is a Rank target's weight, computed at every read "
            "(U @ V in svd mode, the frozen base weight + alpha / r * lora_B @ lora_A in lora mode): the "
            "write would not reach any parameter and be lost. Write into U / V (svd) or the adapters and "
            "the base weight (lora: module._parameters['weight']), or initialise the weight before sn.wrap")
    raise SortedNetError(
        f"{where}: written in place ({name}) under a sub-model, where it is a concatenation of slices of "
        "fused blocks (a copy, not a view of the parameter): the write would not reach the parameter. "
        "Write to the full parameter outside nest.use(...) (module._parameters[...] is the whole tensor), "
        "or to the exported sub-model")


def _alias_of(result: Any, me: FusedCopy) -> Any:
    """``result`` as a :class:`FusedCopy` where it shares ``me``'s memory (a write into it would be lost too)."""
    if result.__class__ is not Tensor or not _aliases(result, me):
        return result
    with _NoSubclass():
        alias = result.as_subclass(FusedCopy)
    alias._sn_where, alias._sn_of = me._sn_where, me._sn_of
    for flag in ("_sn_computed", "_sn_rank"):
        if me.__dict__.get(flag):
            setattr(alias, flag, True)
    return alias


def computed(v: Any, m: nn.Module, name: str, st: Any) -> Any:
    """``v``, a user's slicer's ``value()`` of ``m``'s parameter or buffer ``name`` (``State.guard``), as a
    :class:`FusedCopy` (which refuses writes in place, naming the attribute) where it is a new tensor, not the
    tensor's memory (``.contiguous()`` of a strided slice, ``.clone()``, a cast): a forward that writes it in
    place (running statistics, a clamp) would write into the copy, where the plain model writes its tensor."""
    if _compiling() or _functorch_active() or (v.__class__ is not Tensor and v.__class__ is not _Parameter):
        return v
    src = m._parameters.get(name)
    if src is None:
        src = m._buffers.get(name)
    if src is None or _aliases(v, src) or (name in m._parameters and not _renorms(m) and _inspected(m)):
        return v  # (library forwards write their buffers, running statistics, and a max_norm embedding its weight)
    return _guarded_copy(v, f"{st.path}.{name}" if st.path else name, "_sn_computed")


def rank_weight(v: Tensor, m: nn.Module, st: Any) -> Tensor:
    """A Rank target's ``weight`` (``v``: ``U @ V``, or the base weight plus the adapters' product, computed at
    every read) as a :class:`FusedCopy` that refuses writes in place, naming the attribute: ``nn.init.*_``,
    ``reset_parameters``, ``.data`` writes changed a temporary and nothing else, in silence. Other operations run
    as on a plain tensor (a parent's forward reading it, MultiheadAttention's ``out_proj.weight``, pays the
    per-operation check). Plain where :func:`_inspected` trusts the reader, in compiled graphs and under
    functorch."""
    if _compiling() or _functorch_active() or v.__class__ is not Tensor or _inspected(m, 3):
        return v
    return _guarded_copy(v, f"{st.path}.weight" if st.path else "weight", "_sn_rank")


def _guarded_copy(v: Tensor, where: str, flag: str) -> FusedCopy:
    """``v`` as a :class:`FusedCopy` of the attribute ``where``, marked with ``flag`` (which refusal names it)."""
    with _NoSubclass():
        out = v.as_subclass(FusedCopy)
    out._sn_where, out._sn_of, out._sn_read = where, v, True
    setattr(out, flag, True)
    return out


def _renorms(m: nn.Module) -> bool:
    """An ``nn.Embedding`` (or EmbeddingBag) with ``max_norm``: its forward renormalises rows of its weight."""
    return m.__dict__.get("max_norm") is not None


_BASE = Tensor._base.__get__
_DATA_SET = Tensor.data.__set__


def _holds_copy(t: FusedCopy) -> bool:
    """Whether ``t`` still holds the copy's memory (after ``alias.set_(other)`` it holds ``other``: a write there
    is real; ``set_`` on the attribute's value itself is refused, FusedCopy.set_)."""
    with _NoSubclass():
        return _aliases(t, t._sn_of)


def plain(t: Tensor | None) -> Tensor | None:
    """``t`` as a plain tensor (a :class:`FusedCopy` unwrapped: sortednet's own forwards, which write nothing,
    skip its per-operation check)."""
    if t.__class__ is not FusedCopy:
        return t
    with _NoSubclass():
        return t.as_subclass(Tensor)


# PyTorch code that reads fused attributes only to decide on its fast paths (a tensor subclass among them turns
# TransformerEncoder's nested-tensor path off, and padded positions would then differ from the export's), or
# reads a child's weight only to compute (MultiheadAttention's out_proj.weight, a Rank target's computed weight: a
# subclass there refuses the nested tensor the encoder's fast path hands it)
_INSPECTORS = frozenset(f.__code__ for f in (torch.nn.TransformerEncoder.forward,
                                              torch.nn.TransformerEncoderLayer.forward,
                                              torch.nn.MultiheadAttention.forward))


def _inspected(m: Any, up: int = 2) -> bool:
    """Whether the read comes from the forward of ``m``'s class when that class is library code that reads its
    weight only to compute (PyTorch's and Hugging Face's layers: the per-operation check of a
    :class:`FusedCopy` would only cost time), or from PyTorch code that reads fused attributes to choose a fast
    path (:data:`_INSPECTORS`). A user's own forward keeps the check: it may write its weight in place."""
    own = _trusted_forward(type(m))
    f = sys._getframe(up)
    for _ in range(5):
        if f is None:
            return False
        code = f.f_code
        if code is own or code in _INSPECTORS:
            return True
        f = f.f_back
    return False


_TRUSTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # (FSDP2 makes a class per module)
_LIBRARIES = ("torch.nn.", "transformers.", "sortednet.")  # (remote code loads as `transformers_modules.`: not trusted)


def _trusted_forward(cls: type) -> Any:
    """The code object of ``cls.forward`` when PyTorch, transformers or sortednet (the forwards it installs on
    sliced layers) defines it, else ``None`` (cached)."""
    try:
        return _TRUSTED[cls]
    except KeyError:
        fwd = getattr(cls, "forward", None)
        code = getattr(fwd, "__code__", None)
        mod = getattr(fwd, "__module__", "") or ""
        _TRUSTED[cls] = out = code if mod.startswith(_LIBRARIES) else None
        return out


# flags, or a change of the tensor's shape / strides only (its values stay; a later write into it is still checked)
# (`.data =` and `set_` rebind the temporary: refused, FusedCopy.set_)
_NOT_WRITES = frozenset({"requires_grad_", "share_memory_", "t_", "transpose_", "swapdims_", "swapaxes_",
                         "unsqueeze_", "squeeze_", "as_strided_", "resize_", "resize_as_", "detach_"})
_WRITES = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                     "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                     "__imatmul__"})
_NoSubclass = torch._C.DisableTorchFunctionSubclass


def _aliases(a: Tensor, b: Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and b.numel() > 0
    except (RuntimeError, NotImplementedError):  # (a tensor without storage: nothing to write through)
        return False


class View:
    """Plan entry of a tensor attribute: the same-named parameter / buffer, cut to precomputed cuts."""

    __slots__ = ("name", "cuts", "segs")

    def __init__(self, name: str, cuts: Cuts, segs: Segments) -> None:
        self.name, self.cuts, self.segs = name, cuts, segs

    def take(self, m: nn.Module, st: Any) -> Tensor | None:
        t = m._parameters.get(self.name)
        if t is None:
            t = m._buffers.get(self.name)
            if t is None:
                if self.name in m._parameters or self.name in m._buffers:
                    return None  # registered as None (set to None after wrap)
                raise SortedNetError(f"{st.path + '.' if st.path else ''}{self.name}: the tensor sortednet slices "
                                     "is no longer a parameter or buffer of its module (pruned, re-parametrized or "
                                     "deleted after wrap); nest.unwrap() first, change the module, then wrap again")
        tp = type(t)
        if tp is not _Parameter and tp is not _Tensor and is_sharded(t):
            return sharded_read(t, bool(self.cuts) or self.segs is not None, st, self.name)
        if self.segs is None:
            try:
                return narrow(t, self.cuts, st)
            except RuntimeError as e:  # (a tensor shorter than the cut: functional_call with a smaller one)
                short = [(a, t.shape[a], s + n) for a, s, n in self.cuts if s + n > t.shape[a]]
                if not short:
                    raise
                where = f"{st.path + '.' if st.path else ''}{self.name}"
                a, have, need = short[0]
                raise SortedNetError(f"{where}: a tensor of shape {tuple(t.shape)}, {have} along axis {a}, where the "
                                     f"active sub-model reads {need}: give it a tensor of at least the active size "
                                     "(the full-size one; torch.func.functional_call, load_state_dict(assign=True), "
                                     "a reassigned parameter)") from e
        return view(t, self.cuts, self.segs, st, self.name, m)

    def __repr__(self) -> str:
        return f"View({self.name!r}, {self.cuts}, {self.segs})"


def new_lock() -> Any:
    """The lock a module's ``.grad`` writes hold (one per sliced module)."""
    return threading.Lock()


def storage_key(t: torch.Tensor) -> tuple | None:
    """Which memory ``t`` reads (device, address of its first element, shape, strides), to tell a tensor
    holding the same memory as another (one tensor under two names, ``load_state_dict(assign=True)``) from
    views of other parts of one buffer; None for tensors without memory (meta)."""
    if t.device.type == "meta":
        return None
    try:
        ptr = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # (a tensor subclass without plain memory)
        return None
    return (str(t.device), ptr, tuple(t.shape), t.stride()) if ptr else None


_WATCHING: list = []


#: registrations of modules, parameters and buffers in any module since the count started (a module
#: replaced or a buffer added after ``profile`` or ``calibrate`` gives new slots to watch)
REGISTRATIONS = [0]
#: modules registered into a data-parallel wrapper (DDP, FSDP) since the count started: a new wrapper (what
#: Accelerate's prepare returns on several processes) may hold a nest's model
WRAPPINGS = [0]
_WRAPPERS = frozenset({"DistributedDataParallel", "FullyShardedDataParallel", "DataParallel"})
_COUNTING: list = []


def count_registrations() -> None:
    """Install the global registration hooks that keep :data:`REGISTRATIONS` and :data:`WRAPPINGS` (once per
    process)."""
    if _COUNTING:
        return

    def bump(*_: Any) -> None:
        REGISTRATIONS[0] += 1

    def bump_module(parent: Any, *_: Any) -> None:
        REGISTRATIONS[0] += 1
        if type(parent).__name__ in _WRAPPERS:
            WRAPPINGS[0] += 1

    mod = nn.modules.module
    _COUNTING.extend((mod.register_module_module_registration_hook(bump_module),
                      mod.register_module_parameter_registration_hook(bump),
                      mod.register_module_buffer_registration_hook(bump)))


def watch_fused_steps() -> None:
    """A ``fused=True`` optimizer (transformers' default ``adamw_torch_fused``) writes the parameters in one
    kernel that leaves their version counters as they were, so a step would not make profile scores or BatchNorm
    calibrations stale: a global post-step hook (once per process, installed when scores are first recorded or a
    calibration made) moves the counters of the parameters a fused optimizer just stepped, as every other in-place
    write does."""
    if _WATCHING:
        return
    from torch.autograd.graph import increment_version
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def stepped(opt: torch.optim.Optimizer, *_: Any) -> None:
        for group in opt.param_groups:
            if group.get("fused"):
                for p in group["params"]:
                    if not p.is_inference():
                        increment_version(p)

    _WATCHING.append(register_optimizer_step_post_hook(stepped))

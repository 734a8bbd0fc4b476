"""How each recorded op and module links axis variables (see :mod:`sortednet.coupling`).

A handler links an output axis to the input axes it carries unchanged; an axis
it cannot account for is fixed. Anything without a handler is fixed whole by
the caller: adding an op here is how discovery learns more.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils._pytree import tree_leaves

from .slicers.base import own_forward, slicer_for
from .slicers.norm import group_size

__all__ = ["handle", "module", "attention_block", "Attention"]

_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM_LAST = (nn.LayerNorm, *_RMS)
_LEAVES = (nn.Linear, *_CONV, *_CONV_T, nn.Embedding, *_NORM_LAST, nn.GroupNorm, _BatchNorm, _InstanceNorm,
           nn.PReLU, nn.MultiheadAttention)



def leaf_types() -> tuple[type, ...]:
    """The module types recorded as one call: :data:`_LEAVES`, and transformers' GPT-2 ``Conv1D`` (a linear
    layer with a transposed weight) once transformers is imported."""
    conv1d = _hf_conv1d()
    return _LEAVES if conv1d is None else (*_LEAVES, conv1d)


def _hf_conv1d() -> type | None:
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _linear_like(m: nn.Module) -> bool:
    conv1d = _hf_conv1d()
    return isinstance(m, nn.Linear) or (conv1d is not None and isinstance(m, conv1d))


_ELEMENTWISE = set("""add add_ sub sub_ rsub mul mul_ div div_ true_divide floor_divide remainder pow pow_ relu relu_
gelu silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_ hardsigmoid hardsigmoid_ hardtanh hardtanh_ relu6
leaky_relu leaky_relu_ elu elu_ selu celu mish softplus softsign logsigmoid glu_ neg exp log sqrt rsqrt abs sin cos
erf clamp clamp_ clamp_min clamp_max square reciprocal where maximum minimum dropout dropout_ dropout1d dropout2d
dropout3d alpha_dropout feature_alpha_dropout threshold __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__
__rmul__ __imul__ __truediv__ __rtruediv__ __itruediv__ __neg__ lerp addcmul addcdiv log_sigmoid masked_fill
masked_fill_ nan_to_num nan_to_num_ clip clip_ log1p expm1 sign round sinh cosh tan atan asin acos asinh acosh
atanh sigmoid_ rrelu rrelu_ softshrink hardshrink tanhshrink exp_ log_ sqrt_ abs_ neg_ gelu_ erfc expit logit
isnan isinf isfinite eq ne gt ge lt le logical_and logical_or logical_not __eq__ __ne__ __gt__ __ge__ __lt__
__le__ __and__ __or__ __invert__""".split())
# tensors of the input's shape with new values: linked to it as its elementwise partners will be
_LIKE = set("""zeros_like ones_like empty_like full_like rand_like randn_like randint_like bernoulli bernoulli_ uniform_
normal_ fill_ zero_ random_ exponential_ geometric_ cauchy_ log_normal_""".split())
# fresh tensors of a given shape (DropPath's x.new_empty((B, 1, 1)).bernoulli_(p)): no link to the input's axes
_NEW = set("new_empty new_zeros new_ones new_full new_tensor".split())
_UNARY = set("""contiguous clone detach to float half double bfloat16 type type_as softmax log_softmax cumsum
normalize requires_grad_ __get__""".split())
_REDUCE = set("mean sum amax amin std var norm logsumexp prod max min".split())
_RESHAPE = set("view reshape flatten unflatten squeeze unsqueeze squeeze_ unsqueeze_ view_as reshape_as ravel".split())
_POOL = re.compile(r"(adaptive_)?(avg|max|lp)_pool([123])d(_with_indices)?$")


@dataclass
class Attention:
    """An attention module recognised as whole heads (a candidate ``Heads``)."""

    path: str
    heads: int
    group: int = 1                             # grouped-query attention: query heads per key/value head
    qkv: tuple[str, ...] | None = None         # paths relative to ``path`` where Heads cannot find them alone
    o: str | None = None


def without_fills(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` (finite entries of two outputs to compare, ``b`` the reference) without the entries that
    are fill values: unchanged, of magnitude 1e3 or more and over 1,000 times as large as every entry that changed
    (logits masked with -1e9 or ``finfo.min`` rather than -inf). Kept, they set the scale a change is measured
    against and hide any change of the other entries. An entry that changed at all is measured, however large
    (a price beside a probability, a level beside its difference): a mask added to changing logits in a precision
    that shows their change (-1e4 in float32) is measured as an output too."""
    same = a == b
    if bool(same.all()) or not bool(same.any()):
        return a, b
    fill = same & (b.abs() >= 1e3) & (b.abs() > 1e3 * b[~same].abs().max())
    return (a[~fill], b[~fill]) if bool(fill.any()) else (a, b)


def leaves(x: Any) -> list[Any]:
    """``tree_leaves`` that also opens dataclass instances (a model output such as ``Out(logits=...)``,
    which pytree keeps whole): their fields' leaves, in field order."""
    out = []
    for leaf in tree_leaves(x):
        if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            out += leaves([getattr(leaf, f.name, None) for f in dataclasses.fields(leaf)])  # (init=False: unset)
        elif isinstance(leaf, Mapping) and not isinstance(leaf, type):  # a UserDict, a mapping pytree keeps whole
            out += leaves(list(leaf.values()))
        else:
            out.append(leaf)
    return out


def _tensors(x: Any) -> list[Tensor]:
    return [t for t in leaves(x) if isinstance(t, Tensor)]



_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29)
_PERMUTE = {"permute", "transpose", "transpose_", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "T", "mT"}
_SPLIT = {"chunk", "split", "tensor_split", "unbind", "split_with_sizes"}


def _first(ev) -> Tensor | None:
    ts = _tensors(ev.args) or _tensors(ev.kwargs)
    return ts[0] if ts else None


def _norm_dims(dim: Any, n: int) -> list[int] | None:
    if isinstance(dim, bool):  # std(unbiased) / var(unbiased): a flag, not a dim
        return None
    if dim is None:
        return list(range(n))
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not all(isinstance(d, int) for d in dims):
        return None
    return [d % n for d in dims] if n else []


def _broadcast(a, ins: list[Tensor], outs: list[Tensor], why: str) -> None:
    for o in outs:
        srcs: list[list[int]] = [[] for _ in o.shape]
        for t in ins:
            tv = a.of(t)
            for i in range(1, min(t.dim(), o.dim()) + 1):
                if t.shape[-i] == o.shape[-i]:
                    srcs[o.dim() - i].append(tv[-i])
        a.assign(o, srcs, why)


def _reshape(a, x: Tensor, o: Tensor, why: str) -> bool:
    xs, os_ = list(x.shape), list(o.shape)
    xv = a.of(x)
    xi = [i for i, s in enumerate(xs) if s != 1]
    oi = [j for j, s in enumerate(os_) if s != 1]
    srcs: list[list[int]] = [[] for _ in os_]
    i = j = 0
    while i < len(xi) and j < len(oi):
        gi, gj = [xi[i]], [oi[j]]
        pi, pj = xs[xi[i]], os_[oi[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(xi):
                gi.append(xi[i])
                pi, i = pi * xs[xi[i]], i + 1
            elif pj < pi and j < len(oi):
                gj.append(oi[j])
                pj, j = pj * os_[oi[j]], j + 1
            else:
                return False
        if len(gi) == 1 and len(gj) == 1:
            srcs[gj[0]].append(xv[gi[0]])
        else:
            for k in gi:
                a.uf.fix(xv[k], why)
    a.assign(o, srcs, why)
    return True


def _permuted(ev, x: Tensor) -> list[int] | None:
    """Input axis of each output axis, found by replaying the op on a tensor of distinct prime sizes."""
    n = x.dim()
    if n > len(_PRIMES):
        return None
    tag = torch.empty(_PRIMES[:n], device="meta")
    try:
        if ev.name in ("T", "mT"):
            out = tag.T if ev.name == "T" else tag.mT
        else:
            args = tuple(tag if t is x else t for t in ev.args)
            out = ev.func(*args, **ev.kwargs)
    except Exception:
        return None
    return [_PRIMES.index(s) for s in out.shape]


def _index(a, x: Tensor, o: Tensor, idx: Any, why: str) -> bool:
    idx = idx if isinstance(idx, tuple) else (idx,)
    tensors = [i for i in idx if isinstance(i, Tensor)]
    if len(tensors) > 1 or (tensors and (tensors[0].dim() != 1 or tensors[0].is_floating_point()
                                         or tensors[0].is_complex())):
        return False  # (several tensor indices, or one of other rank: broadcast together, axes moved)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice, Tensor))) or isinstance(i, bool)
           for i in idx):
        return False
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (x.dim() - used) + idx[k + 1:]
    idx = idx + (slice(None),) * (x.dim() - sum(1 for i in idx if i is not None))
    xv = a.of(x)
    srcs: list[list[int]] = []
    picked: list[int] = []
    ax = 0
    for i in idx:
        if i is None:
            srcs.append([])
            continue
        if isinstance(i, int):  # counted from the end, or computed from the size (h[:, h.shape[1] - 1]): another
            a.uf.fix(xv[ax], f"{why} (an integer index)")  # unit at every size; the trace cannot tell them apart
        if isinstance(i, Tensor):  # h[:, order] (x.index_select written as indexing): units picked by a tensor
            n = x.shape[ax]
            picks = i.cpu()
            mask = picks.dtype in (torch.bool, torch.uint8)  # (a uint8 index is a mask, as in old PyTorch)
            whole = bool(picks.all()) and picks.numel() == n if mask else (
                picks.numel() == n and bool((picks == torch.arange(n, device="cpu")).all()))  # (every unit in place)
            if whole:
                srcs.append([xv[ax]])
            else:
                a.uf.fix(xv[ax], f"{why} (a tensor index)")
                srcs.append([])
                picked.append(len(srcs) - 1)
        if isinstance(i, slice):
            full = i.step in (None, 1) and (i.start in (None, 0)) and (i.stop is None or i.stop >= x.shape[ax])
            if full:
                srcs.append([xv[ax]])
            else:
                a.uf.fix(xv[ax], why)
                srcs.append([])
        ax += 1
    if len(srcs) != o.dim():
        return False
    ov = a.assign(o, srcs, f"{why}{OUTPUT}")  # (a fresh axis: a moving reason, that reaches no padding's source)
    for i in picked:  # (units picked by a tensor: in another order at the output too)
        a.uf.fix(ov[i], f"{why} (a tensor index){OUTPUT}")
    return True


def _dim_arg(ev, pos: int, default: Any = 0) -> Any:
    for key in ("dim", "axis"):  # (torch takes NumPy's axis= too: torch.cat(xs, axis=1), x.sum(axis=1))
        if key in ev.kwargs:
            return ev.kwargs[key]
    return ev.args[pos] if len(ev.args) > pos else default


def handle(a, ev) -> bool:
    """Link the variables of one op; False when the op is not understood."""
    name, x = ev.name, _first(ev)
    outs = _tensors(ev.out)
    why = f"{name!r} in {ev.where or '<root>'!r}"
    if x is None:
        return False
    if name in _ELEMENTWISE:
        _broadcast(a, _tensors((ev.args, ev.kwargs)), outs, why)
        return True
    if name in _NEW:
        return True
    if name in _UNARY or name in _LIKE or name == "data":
        if any(o.shape != x.shape for o in outs):
            return False
        for o in outs:
            a.assign(o, [[v] for v in a.of(x)], why)
        return True
    if name in ("expand", "expand_as", "broadcast_to"):
        _broadcast(a, [x], outs, why)
        return True
    if name in _RESHAPE:
        return len(outs) == 1 and _reshape(a, x, outs[0], f"{why} merges or splits this axis")
    if name in _PERMUTE:
        perm = _permuted(ev, x)
        if perm is None or len(outs) != 1:
            return False
        xv = a.of(x)
        a.assign(outs[0], [[xv[p]] for p in perm], why)
        return True
    if name in _REDUCE:
        if len(ev.args) > 1 and isinstance(ev.args[1], Tensor):
            _broadcast(a, _tensors(ev.args), outs, why)
            return True
        dims = _norm_dims(_dim_arg(ev, 2 if name == "norm" else 1, None), x.dim())
        keep = ev.kwargs.get("keepdim", next((v for v in ev.args[1:] if isinstance(v, bool)), False))
        if dims is None:
            return False
        xv = a.of(x)
        srcs = [[] if i in dims else [xv[i]] for i in range(x.dim()) if keep or i not in dims]
        for o in outs:
            if o.dim() != len(srcs):
                return False
            a.assign(o, srcs, why)
        return True
    m = _POOL.match(name)
    if m or name == "interpolate":
        k = int(m.group(3)) if m else x.dim() - 2
        xv = a.of(x)
        for i in range(max(x.dim() - k, 0), x.dim()):  # pooled / resampled: its units are mixed
            a.uf.fix(xv[i], f"{why} pools or resamples this axis")
        for o in outs:
            a.assign(o, [[xv[i]] if i < x.dim() - k else [] for i in range(o.dim())], f"spatial axis ({why})")
        return True
    if name in ("pad", "constant_pad_nd"):  # (F.pad(x, pad, mode, value); torch.constant_pad_nd(x, pad, value))
        pad = ev.args[1] if len(ev.args) > 1 else ev.kwargs.get("pad")
        if name == "pad":
            mode = ev.args[2] if len(ev.args) > 2 else ev.kwargs.get("mode", "constant")
            value = ev.args[3] if len(ev.args) > 3 else ev.kwargs.get("value")
        else:
            mode, value = "constant", ev.args[2] if len(ev.args) > 2 else ev.kwargs.get("value")
        # after a sub-model's last unit, zeros are the full model's next units masked, other values (a constant
        # of ones, reflected / replicated units) are not; before its first, any constant or its own first units
        # (replicate, reflect) are the full model's, but wrapped ones (circular) are its last units
        plain = mode in (None, "constant")
        xv, o = a.of(x), outs[0]
        srcs = [[v] for v in xv]
        for j in range(len(pad) // 2):
            if pad[2 * j] < 0 or pad[2 * j + 1] < 0:  # (a negative padding crops: before the first unit it shifts
                # them, after the last a later zero padding stands where the full model keeps units)
                a.uf.fix(xv[-1 - j], f"{why} crops this axis (a negative padding, {tuple(pad[2 * j:2 * j + 2])})")
                srcs[-1 - j] = []
            elif pad[2 * j] or pad[2 * j + 1]:
                moves = (pad[2 * j + 1] > 0 and not (plain and not value)) or (pad[2 * j] > 0 and mode == "circular")
                a.uf.fix(xv[-1 - j], f"{why} pads this axis" + (
                    f" with other values than zeros ({mode!r}" + (f", value={value!r})" if value else ")")
                    if moves else ""))
                srcs[-1 - j] = []
        ov = a.assign(o, srcs, why)
        for j in range(len(pad) // 2):  # (an op that moves the padded axis' units moves the source's: coupling)
            if (pad[2 * j] or pad[2 * j + 1]) and len(ov) > j and len(xv) > j:
                a.uf.origin[ov[-1 - j]] = xv[-1 - j]
        return True
    if name in ("repeat", "tile"):  # (x.repeat(1, 2), x.repeat((1, 2)), x.repeat(repeats=...), torch.tile(x, dims))
        reps = ev.kwargs.get("repeats", ev.kwargs.get("dims")) if len(ev.args) < 2 else (
            ev.args[1:] if len(ev.args) > 2 or not isinstance(ev.args[1], (tuple, list)) else ev.args[1])
        reps = (1,) * (x.dim() - len(reps)) + tuple(reps)  # (tile: fewer dims than the tensor's repeat the last)
        xv, o = a.of(x), outs[0]
        srcs: list[list[int]] = [[] for _ in o.shape]
        for i in range(1, x.dim() + 1):
            if reps[-i] == 1:
                srcs[-i].append(xv[-i])
            else:
                a.uf.fix(xv[-i], f"{why} repeats this axis")
        a.assign(o, srcs, why)
        return True
    if name in ("cat", "concat", "concatenate", "stack"):
        parts = list(ev.args[0]) if ev.args and isinstance(ev.args[0], (list, tuple)) else ev.kwargs.get("tensors")
        o = outs[0]
        d = _dim_arg(ev, 1) % o.dim()
        srcs: list[list[int]] = [[] for _ in o.shape]
        if any(t.dim() != o.dim() - (name == "stack") for t in parts):
            return False
        for t in parts:
            tv = a.of(t)
            for i in range(o.dim()):
                if i == d:
                    if name != "stack":
                        a.uf.fix(tv[i], f"concatenated by {why}")
                    continue
                srcs[i].append(tv[i - (name == "stack" and i > d)])
        a.assign(o, srcs, f"concatenated by {why}")
        return True
    if name in _SPLIT:
        d = _dim_arg(ev, 1 if name == "unbind" else 2) % x.dim()
        xv = a.of(x)
        for o in outs:
            srcs = []
            for i in range(x.dim()):
                if i == d and name == "unbind":  # one tensor per unit: its count and their positions follow
                    a.uf.fix(xv[i], f"unbound by {why}")  # the size (units[-1] is another unit at every size)
                    continue
                if i == d and o.shape[i] != x.shape[i]:
                    a.uf.fix(xv[i], f"split by {why}")
                    srcs.append([])
                else:
                    srcs.append([xv[i]])
            a.assign(o, srcs, why)
        return True
    if name == "__getitem__":
        return len(outs) == 1 and _index(a, x, outs[0], ev.args[1], f"indexed by {why}")
    if name in ("narrow", "narrow_copy"):  # x.narrow(dim, start, length): the slice it is
        dim, start = _dim_arg(ev, 1), ev.args[2] if len(ev.args) > 2 else ev.kwargs.get("start")
        length = ev.args[3] if len(ev.args) > 3 else ev.kwargs.get("length")
        start = int(start) if isinstance(start, Tensor) and start.numel() == 1 else start
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (dim, start, length)) or len(outs) != 1:
            return False
        dim %= x.dim()
        start %= max(x.shape[dim], 1)
        return _index(a, x, outs[0], (slice(None),) * dim + (slice(start, start + length),), f"indexed by {why}")
    if name == "index_select" and len(outs) == 1:  # x.index_select(dim, index): units picked by a tensor
        dim = _dim_arg(ev, 1)
        if not isinstance(dim, int) or isinstance(dim, bool):
            return False
        xv, o = a.of(x), outs[0]
        dim %= x.dim()
        index = ev.args[2] if len(ev.args) > 2 else ev.kwargs.get("index")
        whole = isinstance(index, Tensor) and index.dim() == 1 and index.numel() == x.shape[dim] and bool(
            (index.cpu() == torch.arange(x.shape[dim], device="cpu")).all())  # (every unit in place: the identity)
        if not whole:
            a.uf.fix(xv[dim], f"indexed by {why}")
        ov = a.assign(o, [[v] if i != dim or whole else [] for i, v in enumerate(xv)], why)
        if not whole:  # (picked units: a per-unit parameter picked in another order meets the features so)
            a.uf.fix(ov[dim], f"indexed by {why}{OUTPUT}")
        return True
    if name in _REORDER and len(outs) == 1 and outs[0].shape == x.shape:
        return _reorder(a, ev, x, outs[0], why)
    if name in _SHUFFLE and len(outs) == 1 and outs[0].shape == x.shape and x.dim() >= 2:
        xv = a.of(x)  # (ShuffleNet: channels (g, c/g) transposed to (c/g, g), axis 1 of a batched input; the unit
        a.uf.fix(xv[1], f"reordered by {why}")  # at each position is another one at every width)
        ov = a.assign(outs[0], [[] if i == 1 else [v] for i, v in enumerate(xv)], why)
        a.uf.fix(ov[1], f"reordered by {why}{OUTPUT}")
        return True
    if name in _FUNCTIONAL_NORM:
        return _functional_norm(a, ev, x, outs, why)
    if name in _FUNCTIONAL_LAYER:
        return _functional_layer(a, ev, x, outs)
    return False


#: ends the reason given to a reorder's OUTPUT axis (``gamma[:n].flip(0)``): features meeting it are refused, but it
#: does not reach the source of a zero padding it meets (a padded axis is of a fixed size: its source's units stay
#: in place when a fixed-size reordered tensor is added to it)
OUTPUT = " (its output)"

#: ops that keep every axis's size but reorder the units of some: a prefix of such an axis is not a prefix after
_REORDER = frozenset({"roll", "flip", "fliplr", "flipud"})
_SHUFFLE = frozenset({"channel_shuffle", "native_channel_shuffle"})


def _reorder(a, ev, x: Tensor, o: Tensor, why: str) -> bool:
    """``roll`` / ``flip``: the reordered axes are fixed (a sub-model would compute on other units than the full
    model, with shapes that fit), every other axis carried unchanged (Swin's shifted windows roll H and W)."""
    n = x.dim()
    if ev.name == "fliplr":
        dims: Any = [1]
    elif ev.name == "flipud":
        dims = [0]
    else:
        pos = 2 if ev.name == "roll" else 1
        dims = ev.kwargs.get("dims", ev.args[pos] if len(ev.args) > pos else None)
    if dims is None:  # roll without dims: over the flattened tensor, every axis
        dims = list(range(n))
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) and not isinstance(d, bool) and -n <= d < n for d in dims):
        return False
    moved = {d % n for d in dims}
    xv = a.of(x)
    if ev.name == "roll":  # (a shift of 0 keeps every unit of its axis in place; one of a multiple of the axis's
        shifts = ev.kwargs.get("shifts", ev.args[1] if len(ev.args) > 1 else None)  # size too, at the sizes
        shifts = [shifts] if isinstance(shifts, int) else list(shifts) if isinstance(shifts, (tuple, list)) else None
        if shifts is not None and len(shifts) == len(dims) and all(  # that divide it: check compares the sizes)
                isinstance(k, int) and not isinstance(k, bool) for k in shifts):
            moved = set()
            for k, d in zip(shifts, dims):
                d %= n
                if x.shape[d] and k % x.shape[d] == 0:
                    if k:
                        a.uf.rolled(xv[d], abs(k))
                else:
                    moved.add(d)
    for i in moved:
        a.uf.fix(xv[i], f"reordered by {why}")
    ov = a.assign(o, [[] if i in moved else [v] for i, v in enumerate(xv)], why)
    for i in moved:  # (the output's units are reordered too: a flipped per-unit parameter meeting the features)
        a.uf.fix(ov[i], f"reordered by {why}{OUTPUT}")
    return True


#: functional norms a norm module's own forward may call (timm's BatchNormAct2d, LayerNorm2d; a subclass
#: of a stock norm with its own forward): op -> (module types, the module tensor each positional argument
#: after the input stands for, None for a non-tensor argument such as normalized_shape)
_FUNCTIONAL_NORM: dict[str, tuple[tuple[type, ...], tuple[str | None, ...]]] = {
    "batch_norm": ((_BatchNorm,), ("running_mean", "running_var", "weight", "bias")),
    "layer_norm": (_NORM_LAST, (None, "weight", "bias")),
    "rms_norm": (_NORM_LAST, (None, "weight")),
    "group_norm": ((nn.GroupNorm,), (None, "weight", "bias")),
}


def _functional_norm(a, ev, x: Tensor, outs: list[Tensor], why: str = "") -> bool:
    """``F.batch_norm`` / ``layer_norm`` / ``rms_norm`` / ``group_norm`` reading exactly the tensors of one norm
    module of a kind sortednet slices (its parameters and buffers under their own names): that module's
    ``norm`` role on the normalised axis, the output's axes the input's. Anything else (tensors of another
    module, computed ones, a norm over several axes) is not understood, and its axes stay fixed."""
    kinds, names = _FUNCTIONAL_NORM[ev.name]
    if len(outs) != 1 or outs[0].shape != x.shape or not ev.args or ev.args[0] is not x:
        return False
    given = {n: ev.args[i + 1] for i, n in enumerate(names) if n is not None and i + 1 < len(ev.args)}
    given.update({n: v for n, v in ev.kwargs.items() if n in names})
    tensors = {n: t for n, t in given.items() if t is not None}
    if not tensors or any(not isinstance(t, Tensor) for t in tensors.values()):
        return False
    owners = {a.params.get(id(t), "").rpartition(".")[0] for t in tensors.values()}
    path = owners.pop() if len(owners) == 1 else None
    m = a.modules.get(path) if path is not None else None
    sl = slicer_for(m) if m is not None and isinstance(m, kinds) else None
    if sl is None and m is not None and slicer_for(m) is None:  # (a norm class of the model's own: ConvNeXt's
        stock = {"batch_norm": "BatchNorm", "layer_norm": "LayerNorm", "rms_norm": "RMSNorm",  # LayerNorm)
                 "group_norm": "GroupNorm"}[ev.name]
        a.unknown(ev, f"{ev.name!r} on the tensors of {path!r}, a {type(m).__name__} that is no nn.{stock} and has "
                      "no slicer (use nn." + stock + ", or register a slicer for it: docs/custom_slicers.md)")
        return True
    if sl is None or (own_forward(type(m), sl) and not sl.verifies_forward(type(m))):  # a subclass wrap would refuse
        return False
    for n, t in tensors.items():  # each the module's own tensor of that name
        own = m._parameters.get(n) if n in m._parameters else m._buffers.get(n)
        if own is not t or a.params.get(id(t)) != (f"{path}.{n}" if path else n):
            return False
    groups = (ev.args[1] if len(ev.args) > 1 else ev.kwargs.get("num_groups")) if ev.name == "group_norm" else None
    if isinstance(m, nn.GroupNorm) and groups != m.__dict__["num_groups"]:  # a group count of the call's own
        axis = 1 if x.dim() > 1 else 0  # (F.group_norm(h, 4, gn.weight, ...) on a GroupNorm(1, C)): the module's
        xv = a.of(x)                    # rule (its groups follow the channels) is not the call's, whose groups
        a.uf.bind(xv[axis], path, "norm")  # a sub-model would cut anew: the channels are fixed, named
        a.uf.fix(xv[axis], f"regrouped by {why or repr(ev.name)}: {groups} groups of its own where "
                           f"{path!r} has {m.__dict__['num_groups']}")
        a.assign(outs[0], [[] if i == axis else [v] for i, v in enumerate(xv)], path)
        return True
    if isinstance(m, _NORM_LAST):
        shape = ev.args[1] if len(ev.args) > 1 else ev.kwargs.get("normalized_shape")
        if tuple(shape) != (x.shape[-1],):
            return False
        axis = x.dim() - 1
    else:
        axis = 1 if x.dim() > 1 else 0
    xv = a.of(x)
    a.assign(outs[0], [[v] for v in xv], path)
    a.uf.bind(xv[axis], path, "norm")
    if isinstance(m, nn.GroupNorm):
        r = a.uf.find(xv[axis])
        a.uf.mult[r] = math.lcm(a.uf.mult[r], group_size(m))
    return True


def sliceable(m: nn.Module | None) -> bool:
    """Whether wrap would slice ``m`` under its slicer (a subclass whose own forward the slicer cannot vouch
    for is refused)."""
    sl = None if m is None else slicer_for(m)
    if sl is None:
        return False
    st = m.__dict__.get("_sn")
    cls = type(m) if st is None else st.cls  # (a wrapped layer: the class it was wrapped from)
    return not own_forward(cls, sl) or sl.verifies_forward(cls)


#: functional forms of the layers :func:`module` links: op -> (module types, position of ``groups``)
_FUNCTIONAL_LAYER: dict[str, tuple[tuple[type, ...], int | None]] = {
    "linear": ((nn.Linear,), None), "conv1d": ((nn.Conv1d,), 6), "conv2d": ((nn.Conv2d,), 6),
    "conv3d": ((nn.Conv3d,), 6),
}


def _functional_layer(a, ev, x: Tensor, outs: list[Tensor]) -> bool:
    """``F.linear`` / ``F.conv1d/2d/3d`` on exactly one stock layer's own ``weight`` (and its ``bias``, or
    none), with the layer's ``groups``: linked as a call of that layer (its attributes are the active slice,
    so the call computes on the sub-model's units as the module would). Anything else (a computed or sliced
    weight, another module's bias, a grouped or depthwise convolution, whose group count the call may give as a
    number that does not follow the sub-model) is not understood: its axes stay fixed."""
    kinds, at = _FUNCTIONAL_LAYER[ev.name]
    if len(outs) != 1 or not ev.args or ev.args[0] is not x:
        return False
    w = ev.args[1] if len(ev.args) > 1 else ev.kwargs.get("weight")
    b = ev.args[2] if len(ev.args) > 2 else ev.kwargs.get("bias")
    name = a.params.get(id(w)) if isinstance(w, Tensor) else None
    if name is None:
        return False
    path, _, attr = name.rpartition(".")
    m = a.modules.get(path)
    own = None if m is None or isinstance(m, kinds) or m._parameters.get(attr) is not w else slicer_for(m)
    if own is not None and not type(own).__module__.startswith("sortednet."):  # (a slicer of the user's)
        a.unknown(ev, f"{ev.name!r} (in {ev.where or '<root>'!r}) on {attr!r} of {path or '<root>'!r}, a module of a "
                      "slicer's own: discover follows this call on stock layers only (declare that Width by hand; "
                      "nest.check verifies it)")
        return True
    if attr != "weight" or m is None or not isinstance(m, kinds) or m._parameters.get("weight") is not w:
        return False
    if b is not None and (not isinstance(b, Tensor) or b is not m._parameters.get("bias")):
        return False
    if not sliceable(m):
        return False
    if at is not None:  # (a depthwise layer's count, written as a number or read from the layer, cannot be
        groups = ev.args[at] if len(ev.args) > at else ev.kwargs.get("groups", 1)  # told apart: not understood)
        if groups != 1 or m.__dict__["groups"] != 1:
            return False
    module(a, _Call(path, m, (x,), outs[0]))
    return True


@dataclass
class _Call:
    """A layer's functional call as :func:`module` reads one (``ev.name``: the layer's path)."""

    name: str
    func: nn.Module
    args: tuple
    out: Any
    kwargs: dict = dataclasses.field(default_factory=dict)
    where: str = ""
    kind: str = "mod"


def _new_out(a, size: int, path: str, role: str = "out") -> int:
    v = a.uf.new(size)
    a.uf.bind(v, path, role)
    return v


def module(a, ev) -> None:
    """Link the variables of one opaque call of a sliceable module."""
    m, path = ev.func, ev.name
    x, outs = _first(ev), _tensors(ev.out)
    if x is None or not outs:
        return a.unknown(ev)
    y = outs[0]
    xv = a.of(x)
    if _linear_like(m):
        if y.shape[:-1] != x.shape[:-1]:
            return a.unknown(ev)
        a.uf.bind(xv[-1], path, "inp")
        a.assign(y, [[v] for v in xv[:-1]] + [[_new_out(a, y.shape[-1], path)]], path)
    elif isinstance(m, _CONV):
        c = x.dim() - len(m.kernel_size) - 1  # channel axis: 1 (batched) or 0
        g, cin, cout = m.__dict__["groups"], m.__dict__["in_channels"], m.__dict__["out_channels"]
        if g == 1:
            a.uf.bind(xv[c], path, "inp")
            ch = _new_out(a, y.shape[c], path)
        elif g == cin == cout:
            ch = xv[c]
            a.uf.bind(ch, path, "out")
            a.uf.bind(ch, path, "inp")
        else:
            return a.unknown(ev, f"grouped convolution {path!r} (groups={g}), which cannot be sliced")
        for i in range(c + 1, x.dim()):  # the kernel slides along these: neighbouring units mix
            a.uf.fix(xv[i], f"a spatial axis of {path!r}")
        a.assign(y, [[xv[0]] if c == 1 and i == 0 else [ch] if i == c else [] for i in range(y.dim())],
                 f"spatial axis of {path!r}")
    elif isinstance(m, _CONV_T):
        c = x.dim() - len(m.kernel_size) - 1
        if m.__dict__["groups"] != 1:
            return a.unknown(ev, f"grouped transposed convolution {path!r}, which cannot be sliced")
        a.uf.bind(xv[c], path, "inp")
        ch = _new_out(a, y.shape[c], path)
        for i in range(c + 1, x.dim()):
            a.uf.fix(xv[i], f"a spatial axis of {path!r}")
        a.assign(y, [[xv[0]] if c == 1 and i == 0 else [ch] if i == c else [] for i in range(y.dim())],
                 f"spatial axis of {path!r}")
    elif isinstance(m, nn.Embedding):
        a.assign(y, [[v] for v in xv] + [[_new_out(a, y.shape[-1], path)]], path)
    elif isinstance(m, (*_NORM_LAST, nn.GroupNorm, _BatchNorm, _InstanceNorm)):
        if y.shape != x.shape or (isinstance(m, _NORM_LAST) and len(m.__dict__["normalized_shape"]) != 1):
            return a.unknown(ev, f"{type(m).__name__} {path!r} over several axes")
        a.assign(y, [[v] for v in xv], path)
        if isinstance(m, _InstanceNorm):  # (C, *spatial) unbatched, else (N, C, *spatial)
            axis = 0 if x.dim() == m._get_no_batch_dim() else 1
        else:
            axis = -1 if isinstance(m, _NORM_LAST) else (1 if x.dim() > 1 else 0)
        a.uf.bind(xv[axis], path, "norm")
        if isinstance(m, nn.GroupNorm):
            r = a.uf.find(xv[axis])
            a.uf.mult[r] = math.lcm(a.uf.mult[r], group_size(m))
    elif isinstance(m, nn.PReLU):  # one slope per channel (axis 1, or 0 for a 1-d input), or one shared
        if y.shape != x.shape:
            return a.unknown(ev)
        a.assign(y, [[v] for v in xv], path)
        if m.__dict__["num_parameters"] > 1:
            a.uf.bind(xv[1 if x.dim() > 1 else 0], path, "norm")
    elif isinstance(m, nn.MultiheadAttention):
        _mha(a, ev, m, path, outs)
    else:
        a.unknown(ev)


def _mha(a, ev, m: nn.MultiheadAttention, path: str, outs: list[Tensor]) -> None:
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return a.unknown(ev, f"MultiheadAttention {path!r} with kdim/vdim/add_bias_kv/add_zero_attn")
    names = ("query", "key", "value")
    qkv = [ev.args[i] if i < len(ev.args) else ev.kwargs.get(n) for i, n in enumerate(names)]
    if not all(isinstance(t, Tensor) for t in qkv):
        return a.unknown(ev)
    q = qkv[0]
    v = a.of(q)[-1]
    for t in qkv[1:]:
        v = a.uf.union(v, a.of(t)[-1])
    a.uf.bind(v, path, "inp")
    a.fix_all([t for t in _tensors((ev.args, ev.kwargs)) if all(t is not u for u in qkv)], f"a mask of {path!r}")
    y = outs[0]
    qv = a.of(q)
    out_proj = f"{path}.out_proj" if path else "out_proj"
    a.assign(y, [[u] for u in qv[:-1]] + [[_new_out(a, y.shape[-1], out_proj)]], path)
    for t in outs[1:]:
        a.assign(t, [], f"attention weights of {path!r}")
    a.attention.append(Attention(path, m.__dict__["num_heads"]))


def _residual_add(inner: list, x: Tensor, o_out: Tensor, y: Tensor) -> Any:
    """The recorded op ``y = x + o_out`` (either order, same shapes, no ``alpha``), else None."""
    for e in inner:
        if e.kind == "op" and e.name in ("add", "__add__", "__radd__") and not e.kwargs \
                and _tensors(e.out) and _tensors(e.out)[0] is y:
            ts = _tensors(e.args)
            if len(ts) == 2 and {id(t) for t in ts} == {id(x), id(o_out)} and x.shape == o_out.shape == y.shape:
                return e
    return None


def attention_block(a, ev) -> bool:
    """A recognised attention module as one call: True when its recorded inside confirms the pattern.

    A *producer* (BERT's ``BertSelfAttention``: q/k/v and the head count, the output projection in a
    sibling module) returns the merged heads; its output's features stay whole here (the Heads
    declaration slices them with the projection that reads them, and discover verifies it by a dry run)."""
    att, proj, o = a.attn_info[ev.name]
    producer = att.o is not None
    x = _first(ev)
    outs = _tensors(ev.out)
    mods = {}
    for e in ev.inner:
        if e.kind == "mod" and e.name in (*proj, o):
            if e.name in mods:
                return False
            mods[e.name] = e
    if x is None or not outs or len(mods) != len(proj) + (not producer):
        return False
    residual = None  # ``return x + self.o(...)``: the block's own residual add, the one other reader of x
    if not producer and _tensors(mods[o].out)[0] is not outs[0]:
        residual = _residual_add(ev.inner, x, _tensors(mods[o].out)[0], outs[0])
        if residual is None:
            return False
    if any(_first(mods[p]) is not x for p in proj):
        return False
    for e in ev.inner:
        if not (e.kind == "mod" and e.name in proj) and e is not residual and _tensors(e.out) \
                and any(t is x for t in _tensors((e.args, e.kwargs))):
            return False
    y = outs[0]
    if y.shape[:-1] != x.shape[:-1]:
        return False
    xv = a.of(x)
    for p in proj:
        a.uf.bind(xv[-1], p, "inp")
    a.fix_all([t for t in _tensors((ev.args, ev.kwargs)) if t is not x], f"an extra input of {ev.name!r}")
    last = [] if producer else [_new_out(a, y.shape[-1], o)] + ([xv[-1]] if residual is not None else [])
    a.assign(y, [[u] for u in xv[:-1]] + [last], ev.name)
    for t in outs[1:]:
        a.assign(t, [], f"an extra output of {ev.name!r}")
    a.attention.append(att)
    return True

"""nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d: output channels (``out``), input channels (``inp``).

Grouped convolutions are refused except depthwise ones (groups == in ==
out channels), whose ``in`` and ``out`` must be one dimension: the group
count follows the active channels.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import PatternError
from ..views import View, _compiling, _grad_enabled, dense_cut
from .base import Slicer, _pin_recomputation, _saved_tensors_hooks, slicer


@slicer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvSlicer(Slicer):
    roles = ("out", "inp")
    attrs = ("weight", "bias", "in_channels", "out_channels", "groups")
    static = ("in_channels", "out_channels", "groups")

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["out_channels" if role == "out" else "in_channels"]

    def check(self, m: nn.Module, bind: dict, path: str) -> None:
        g, cin, cout = m.__dict__["groups"], m.__dict__["in_channels"], m.__dict__["out_channels"]
        if g == 1:
            return
        if not (g == cin == cout):
            raise PatternError(f"{path!r}: grouped {type(m).__name__} (groups={g}, in={cin}, out={cout}) "
                               "cannot be sliced; only groups=1 or depthwise (groups == in == out)")
        o, i = bind.get("out"), bind.get("inp")
        if o is None or i is None or o.dim is not i.dim:
            raise PatternError(f"{path!r}: depthwise {type(m).__name__} needs its out and in channels in the "
                               "same dimension (list it under both out= and inp= of one Width)")

    def rules(self, m: nn.Module) -> dict[str, Any]:
        w = ((0, "out"),) if m.__dict__["groups"] > 1 else ((0, "out"), (1, "inp"))
        return {**super().rules(m), "weight": w, "bias": ((0, "out"),)}

    def value(self, m: nn.Module, name: str) -> Any:
        depthwise = m.__dict__["groups"] > 1
        if name == "weight":
            return self.take(m, "weight", [(0, "out")] if depthwise else [(0, "out"), (1, "inp")])
        if name == "bias":
            return self.take(m, "bias", [(0, "out")])
        if name == "groups":
            return self.features(m, "out", m.__dict__["out_channels"]) if depthwise else 1
        if name in ("out_channels", "in_channels"):
            return self.features(m, "out" if name == "out_channels" else "inp", m.__dict__[name])
        return super().value(m, name)  # (a subclass's own views entry: its tensor absent when the plan was made)

    def namespace(self, m: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
        ns = super().namespace(m, names)
        cls = type(m)
        if (cls.forward, cls._conv_forward) in _STOCK:  # a subclass's own forward (or _conv_forward, which may
            ns["forward"] = _forward                     # write its weight argument in place) is left as it is
        return ns


_STOCK = {(c.forward, c._conv_forward) for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}


def _forward(self: nn.Conv2d, input: Tensor) -> Tensor:
    """``nn.Conv1d/2d/3d.forward``; when training an input-sliced weight, read as one contiguous copy
    (views.SliceCopy) that the convolution's forward and backward share, instead of a strided view that each
    of them copies (benchmarks/results/conv_weight.md). Inference and compiled graphs read the weight as usual."""
    if _grad_enabled() and not _compiling():
        st = self.__dict__["_sn"]
        a = st.active
        if a is not None:
            p = a._scoped
            p = a.default if p is a else p
            if (h := _saved_tensors_hooks(False)) is not None:  # (a non-reentrant checkpoint's forward)
                _pin_recomputation(a, p, h)
            wv = p.entries[st.slot]["weight"]
            if wv.__class__ is View:
                w = dense_cut(self, wv, st)
                if w is not None:
                    return self._conv_forward(input, w, self.bias)
    return self._conv_forward(input, self.weight, self.bias)


@slicer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeSlicer(Slicer):
    """nn.ConvTranspose1d/2d/3d (upsampling in U-Nets, decoders): output channels (``out``) and input
    channels (``inp``). Its weight is ``(in, out // groups, *kernel)``: ``inp`` on axis 0, ``out`` on
    axis 1. Only ``groups=1``."""

    roles = ("out", "inp")
    attrs = ("weight", "bias", "in_channels", "out_channels")
    static = ("in_channels", "out_channels")

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["out_channels" if role == "out" else "in_channels"]

    def check(self, m: nn.Module, bind: dict, path: str) -> None:
        if m.__dict__["groups"] != 1:
            raise PatternError(f"{path!r}: grouped {type(m).__name__} (groups={m.__dict__['groups']}) cannot be "
                               "sliced; only groups=1")

    def rules(self, m: nn.Module) -> dict[str, Any]:
        return {**super().rules(m), "weight": ((0, "inp"), (1, "out")), "bias": ((0, "out"),)}

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "weight":
            return self.take(m, "weight", [(0, "inp"), (1, "out")])
        if name == "bias":
            return self.take(m, "bias", [(0, "out")])
        if name in ("out_channels", "in_channels"):
            return self.features(m, "out" if name == "out_channels" else "inp", m.__dict__[name])
        return super().value(m, name)  # (a subclass's own views entry: its tensor absent when the plan was made)

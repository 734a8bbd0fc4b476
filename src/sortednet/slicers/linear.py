"""nn.Linear: output features (``out``) and input features (``inp``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from ..views import View, _compiling, _grad_enabled, linear, plain
from .base import Slicer, _pin_recomputation, _saved_tensors_hooks, slicer


@slicer(nn.Linear)
class LinearSlicer(Slicer):
    roles = ("out", "inp")
    attrs = ("weight", "bias", "in_features", "out_features")
    views = {"weight": ((0, "out"), (1, "inp")), "bias": ((0, "out"),)}
    static = ("in_features", "out_features")

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["out_features" if role == "out" else "in_features"]

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "weight":
            return self.take(m, "weight", [(0, "out"), (1, "inp")])
        if name == "bias":
            return self.take(m, "bias", [(0, "out")])
        if name in ("out_features", "in_features"):
            return self.features(m, "out" if name == "out_features" else "inp", m.__dict__[name])
        return super().value(m, name)  # (a subclass's own views entry: its tensor absent when the plan was made)

    def namespace(self, m: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
        ns = super().namespace(m, names)
        if type(m).forward is nn.Linear.forward:  # a subclass's own forward is left as it is
            ns["forward"] = _forward
        return ns


def _forward(self: nn.Linear, input: Tensor) -> Tensor:
    """``nn.Linear.forward``; when training a sliced weight, the fused gradient path (views.LinearInto).
    Inference and compiled graphs take ``nn.Linear``'s own line at the cost of one flag test."""
    if _grad_enabled() and not _compiling():
        st = self.__dict__["_sn"]
        a = st.active
        if a is not None:
            p = a._scoped
            p = a.default if p is a else p
            if (h := _saved_tensors_hooks(False)) is not None:  # (a non-reentrant checkpoint's forward)
                _pin_recomputation(a, p, h)
            e = p.entries[st.slot]
            wv = e["weight"]
            if wv.__class__ is View:
                y = linear(self, input, wv, e["bias"], st)
                if y is not None:
                    return y
    return F.linear(input, plain(self.weight), plain(self.bias))

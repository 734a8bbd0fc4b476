"""nn.Linear: output features (``out``) and input features (``inp``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Slicer, slicer


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
        role = "out" if name == "out_features" else "inp"
        return self.features(m, role, m.__dict__[name])

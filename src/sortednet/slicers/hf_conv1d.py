"""transformers' GPT-2 ``Conv1D``: a linear layer with a transposed weight.

``weight`` is ``(nx, nf)`` = (in, out), so ``out`` slices axis 1 and ``inp``
axis 0; ``nf`` / ``nx`` report the active sizes (its forward reads ``nf``).
Imported only by :mod:`sortednet.integrations` (it needs transformers), so
``import sortednet`` never imports transformers.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from .base import Slicer, slicer


@slicer(Conv1D)
class HFConv1DSlicer(Slicer):
    roles = ("out", "inp")
    attrs = ("weight", "bias", "nf", "nx")
    views = {"weight": ((1, "out"), (0, "inp")), "bias": ((0, "out"),)}
    static = ("nf", "nx")

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["nf" if role == "out" else "nx"]

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "weight":
            return self.take(m, "weight", [(1, "out"), (0, "inp")])
        if name == "bias":
            return self.take(m, "bias", [(0, "out")])
        return self.features(m, "out" if name == "nf" else "inp", m.__dict__[name])

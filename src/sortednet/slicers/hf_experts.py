"""Mixture-of-experts weights stored as 3-D tensors (transformers 5 ``*Experts`` modules).

``gate_up_proj`` is ``(experts, 2 * ffn, hidden)`` with the gate and up
projections stacked (``[gate; up]`` per expert), ``down_proj`` is
``(experts, hidden, ffn)``. ``out`` slices axis 1 of ``gate_up_proj`` (bind it
with ``Width(..., chunks=2)``: each half keeps its first rows), ``inp`` axis 2
of ``down_proj``; ``intermediate_dim`` reports the active width. One FFN width
for every expert. The module's own forward (and transformers' experts
kernels) read these attributes. Registered per class by
:func:`register_experts` (sortednet.integrations does it for the classes it
knows), so ``import sortednet`` never imports transformers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import _REGISTRY, Slicer

__all__ = ["ExpertsSlicer", "register_experts"]


class ExpertsSlicer(Slicer):
    roles = ("out", "inp")
    attrs = ("gate_up_proj", "down_proj", "intermediate_dim")

    def full(self, m: nn.Module, role: str) -> int:
        return m._parameters["gate_up_proj"].shape[1] if role == "out" else m._parameters["down_proj"].shape[2]

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "gate_up_proj":
            return self.take(m, name, [(1, "out")])
        if name == "down_proj":
            return self.take(m, name, [(2, "inp")])
        return self.features(m, "inp", m.__dict__[name])


EXPERTS = ExpertsSlicer()


def register_experts(cls: type) -> None:
    """Slice ``cls`` (a module with 3-D ``gate_up_proj`` / ``down_proj`` and ``intermediate_dim``) by FFN width.

    >>> import torch.nn as nn
    >>> class Experts(nn.Module):  # gate_up_proj (E, 2 * ffn, hidden), down_proj (E, hidden, ffn)
    ...     intermediate_dim = 4
    >>> register_experts(Experts)
    >>> Experts in ExpertsSlicer.types
    True
    """
    if cls not in ExpertsSlicer.types:
        ExpertsSlicer.types = (*ExpertsSlicer.types, cls)
    _REGISTRY[cls] = EXPERTS

"""transformers' per-head tables held by a child of the attention: Swin's ``SwinRelativePositionBias``
(``relative_position_bias_table`` of shape (positions, heads)). Its ``out`` role is the heads axis, cut by a
``Heads`` dimension that names the child in ``per_head=``. Registered by
:func:`sortednet.slicers.register_transformers_types` when the model's module is loaded (never imports
transformers itself)."""

from __future__ import annotations

from torch import nn

from .base import Slicer, slicer


class HeadsLastTable(Slicer):
    """A module whose ``relative_position_bias_table`` parameter holds one column per head (the last axis)."""

    roles = ("out",)
    attrs = ("relative_position_bias_table",)
    views = {"relative_position_bias_table": ((1, "out"),)}

    def full(self, m: nn.Module, role: str) -> int:
        return m._parameters["relative_position_bias_table"].shape[1]


def register_tables(*types: type) -> None:
    """Serve ``types`` (classes whose 2-D ``relative_position_bias_table`` has the heads last) with
    :class:`HeadsLastTable` (idempotent)."""
    slicer(*types)(HeadsLastTable)

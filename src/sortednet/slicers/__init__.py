"""Slicer registry and base class.

A slicer makes a module type nest WITHOUT touching its ``forward``: the
module gets a per-instance subclass whose attributes (``weight``,
``in_features``, ...) are properties returning views sized by the active
sub-model. One file per module type; each registers itself with
:func:`slicer`. Users register their own types the same way::

    @sn.slicer(MyLinear)
    class MyLinearSlicer(sn.Slicer):
        roles = ("out", "inp")
        attrs = ("weight", "bias")
        def full(self, m, role): return m.weight.shape[0 if role == "out" else 1]
        def value(self, m, name): return self.take(m, name, [(0, "out"), (1, "inp")][: 1 if name == "bias" else 2])
"""

from __future__ import annotations

from torch import nn

# register the built-in slicers (each file registers itself where it is defined)
from . import attention, conv, depth, embedding, linear, mha, norm  # noqa: F401
from .base import (  # noqa: F401  (the public names of sortednet.slicers; older private ones kept importable)
    _REGISTRY,
    _SUBCLASSES,
    DYNAMIC,
    ON_MISS,
    STATIC,
    Slicer,
    State,
    View,
    _cut,
    _narrow,
    _SliceInto,
    cut,
    cuts_for,
    is_sharded,
    narrow,
    sliced_subclass,
    slicer,
    slicer_for,
    view,
)

__all__ = ["Slicer", "slicer", "slicer_for", "State", "sliced_subclass", "STATIC", "INPLACE_MIN_NUMEL"]


def register_transformers_types() -> None:
    """Slicers for transformers' own layer types whose modules are loaded (idempotent; never imports
    transformers itself): GPT-2's ``Conv1D``, Falcon's ``FalconLinear``, Mixtral / Qwen2-MoE experts, Swin's
    per-head ``SwinRelativePositionBias`` (nested by ``Heads(..., per_head="relative_position_bias")``)."""
    import sys

    if "transformers.pytorch_utils" in sys.modules:
        from . import hf_conv1d  # noqa: F401  (registers itself on import)
    falcon = sys.modules.get("transformers.models.falcon.modeling_falcon")
    if falcon is not None:
        linear.LinearSlicer.types = (*{*linear.LinearSlicer.types, falcon.FalconLinear},)
        _REGISTRY.setdefault(falcon.FalconLinear, _REGISTRY[nn.Linear])
    swin = sys.modules.get("transformers.models.swin.modeling_swin")
    table = getattr(swin, "SwinRelativePositionBias", None)
    if isinstance(table, type) and table not in _REGISTRY:  # (the table per head, in a child of the attention)
        from .hf_tables import register_tables

        register_tables(table)
    for mod, name in (("mixtral.modeling_mixtral", "MixtralExperts"),  # (Qwen3-MoE's and OLMoE's: Mixtral's code,
                      ("qwen2_moe.modeling_qwen2_moe", "Qwen2MoeExperts"),  # read from another config key)
                      ("qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts"), ("olmoe.modeling_olmoe", "OlmoeExperts")):
        cls = getattr(sys.modules.get(f"transformers.models.{mod}"), name, None)
        if isinstance(cls, type):  # (a transformers without that class: its experts are modules of their own)
            from .hf_experts import register_experts

            register_experts(cls)


def _on_miss(cls: type) -> None:
    """A module of transformers met before ``sortednet.integrations`` was imported (``sn.wrap`` or
    ``sn.load`` of a GPT-2 in a fresh process): register what it needs, as that import would."""
    if cls.__module__.startswith("transformers."):
        register_transformers_types()


ON_MISS.append(_on_miss)

#: default of ``wrap(..., inplace_min_numel=)``: below this many elements a full-size
#: autograd gradient costs about as much as the in-place path (read when ``wrap`` runs)
INPLACE_MIN_NUMEL = 4096

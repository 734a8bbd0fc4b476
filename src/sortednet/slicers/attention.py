"""Attention containers: only integer attributes change (``num_heads``, ...).

``Heads`` slices the q/k/v/o projections themselves (they are ``nn.Linear``
or another registered type); the container's own ``forward`` keeps running
and reads the head count through these attributes. Any module type can be a
container: nothing but the named integers (or the named object holding them,
copied with the active values) is overridden.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .base import Slicer


class AttrSlicer(Slicer):
    """Integer attributes (``attr:num_heads``), or integer fields of an attribute object
    (``attr:config.num_attention_heads``: reads of ``m.config`` under a smaller sub-model return a shallow copy
    with the active values, for forwards that read the head count from a config shared by every layer; at the
    full counts, the object itself)."""

    roles = ()
    attrs = ()

    def attr_names(self, m: nn.Module, bind: dict) -> tuple[str, ...]:
        return tuple(sorted({r[5:].split(".")[0] for r in bind if r.startswith("attr:")}))

    def value(self, m: nn.Module, name: str) -> Any:  # a dotted role: a copy with the active fields
        orig = m.__dict__[name]
        fields = [(role[len(name) + 6:], b.features()) for role, b in m.__dict__["_sn"].bind.items()
                  if role.startswith(f"attr:{name}.")]
        if all(getattr(orig, f, None) == n for f, n in fields):
            return orig  # (the full counts: the object itself, so writes through the module reach it)
        obj = copy.copy(orig)
        for f, n in fields:
            setattr(obj, f, n)
        return obj


ATTRS_ONLY = AttrSlicer()

"""Attention containers: only integer attributes change (``num_heads``, ...).

``Heads`` slices the q/k/v/o projections themselves (they are ``nn.Linear``
or another registered type); the container's own ``forward`` keeps running
and reads the head count through these attributes. Any module type can be a
container: nothing but the named integers is overridden.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import Slicer


class AttrSlicer(Slicer):
    roles = ()
    attrs = ()

    def value(self, m: nn.Module, name: str) -> Any:  # every name is an attr: role
        raise AssertionError(name)


ATTRS_ONLY = AttrSlicer()

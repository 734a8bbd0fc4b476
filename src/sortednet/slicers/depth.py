"""Depth over nn.ModuleList / nn.Sequential: the first ``d`` blocks run.

Iteration, ``len``, slicing and integer indexing see the active blocks, as in
the exported model (``blocks[-1]`` is the last active block: a forward that
reads it behaves as the export does); ``parameters()`` / ``state_dict()``
still list all of them. Sequential's own forward iterates, so it needs
nothing more.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

from .base import Slicer, slicer


@slicer(nn.ModuleList, nn.Sequential)
class DepthSlicer(Slicer):
    roles = ("depth",)

    def full(self, m: nn.Module, role: str) -> int:
        return len(m._modules)

    def active(self, m: nn.Module) -> list[nn.Module]:
        mods = list(m._modules.values())
        return mods[: m.__dict__["_sn"].bind["depth"].features()]

    def namespace(self, m: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
        def __iter__(self_):
            return iter(self_._sn.slicer.active(self_))

        def __len__(self_):
            return self_._sn.bind["depth"].features()

        def __getitem__(self_, idx):
            base = self_._sn.cls
            if not isinstance(idx, slice):
                return base.__getitem__(self_, idx)
            items = list(self_._modules.items())[: len(self_)][idx]
            if issubclass(base, nn.Sequential):
                return base(OrderedDict(items))
            return base([mod for _, mod in items])

        return {"__iter__": __iter__, "__len__": __len__, "__getitem__": __getitem__}

    def inactive(self, m: nn.Module) -> list[nn.Module]:
        """Blocks skipped by the active depth (their parameters are not in use)."""
        return list(m._modules.values())[m._sn.bind["depth"].features():]

    def export(self, live: nn.Module, copy_: nn.Module) -> nn.Module:
        keep = list(copy_._modules.items())[: live._sn.bind["depth"].features()]
        copy_._modules.clear()
        copy_._modules.update(keep)
        return copy_

    def exported_tensors(self, m: nn.Module) -> list:
        return []

    def skipped(self, m: nn.Module) -> list[str]:
        return list(m._modules)[m._sn.bind["depth"].features():]

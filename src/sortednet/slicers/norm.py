"""Normalisation layers over sliced features (``norm`` role).

LayerNorm / RMSNorm over the last dimension; GroupNorm when the channels per
group divide every size (the group count follows); BatchNorm1d/2d/3d with
sliced affine parameters and running statistics. BatchNorm statistics are
shared prefixes: small sub-models need recalibration (``nest.calibrate``, see
sortednet/calibrate.py), after which eval mode and export use per-sub-model ones.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..calibrate import active_stats
from ..errors import PatternError, SizeError
from . import Slicer, slicer

_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


@slicer(nn.LayerNorm, *_RMS)
class LayerNormSlicer(Slicer):
    roles = ("norm",)
    attrs = ("weight", "bias", "normalized_shape")
    views = {"weight": ((0, "norm"),), "bias": ((0, "norm"),)}
    static = ("normalized_shape",)

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["normalized_shape"][-1]

    def check(self, m: nn.Module, bind: dict, path: str) -> None:
        if len(m.__dict__["normalized_shape"]) != 1:
            raise PatternError(f"{path!r}: {type(m).__name__} normalised over "
                               f"{tuple(m.__dict__['normalized_shape'])}; only 1-d shapes can be sliced")

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "normalized_shape":
            return (self.features(m, "norm", self.full(m, "norm")),)
        return self.take(m, name, [(0, "norm")])


@slicer(nn.GroupNorm)
class GroupNormSlicer(Slicer):
    roles = ("norm",)
    attrs = ("weight", "bias", "num_channels", "num_groups")
    views = {"weight": ((0, "norm"),), "bias": ((0, "norm"),)}
    static = ("num_channels", "num_groups")

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["num_channels"]

    def check(self, m: nn.Module, bind: dict, path: str) -> None:
        per = m.__dict__["num_channels"] // m.__dict__["num_groups"]
        b = bind["norm"]
        bad = [s for s in b.dim.sizes if b.features(s) % per]
        if bad:
            raise SizeError(f"{path!r}: GroupNorm has {per} channels per group; sizes {bad} of "
                            f"{b.dim.name!r} are not multiples of {per}")

    def value(self, m: nn.Module, name: str) -> Any:
        c = self.features(m, "norm", m.__dict__["num_channels"])
        if name == "num_channels":
            return c
        if name == "num_groups":
            return c // (m.__dict__["num_channels"] // m.__dict__["num_groups"])
        return self.take(m, name, [(0, "norm")])


@slicer(_BatchNorm)
class BatchNormSlicer(Slicer):
    roles = ("norm",)
    attrs = ("weight", "bias", "running_mean", "running_var", "num_features")
    views = {"weight": ((0, "norm"),), "bias": ((0, "norm"),)}  # running stats: per-sub-model when calibrated
    static = ("num_features",)

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["num_features"]

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "num_features":
            return self.features(m, "norm", m.__dict__["num_features"])
        if name in ("running_mean", "running_var") and m.__dict__["_sn"].extra:
            own = active_stats(m, name)  # per-sub-model statistics from nest.calibrate (eval mode)
            if own is not None:
                return own
        return self.take(m, name, [(0, "norm")])

    def export(self, live: nn.Module, copy_: nn.Module) -> nn.Module:
        copy_ = super().export(live, copy_)
        for name in ("running_mean", "running_var"):
            own = active_stats(live, name, any_mode=True)
            if own is not None:
                copy_._buffers[name] = own.detach().clone()
        return copy_

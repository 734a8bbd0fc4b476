"""Rank: nested low rank of ``nn.Linear`` layers (ordered factorisation or DyLoRA adapters)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from .dims import Binding, Dimension, Target, _as_patterns, match
from .errors import PatternError, SizeError, SortedNetError
from .slicers.lowrank import LORA, SVD

__all__ = ["Rank", "MODES", "EXPORTS"]

MODES = ("svd", "lora")
EXPORTS = ("auto", "factored", "merged")


class Rank(Dimension):
    """Nested rank of the matched ``nn.Linear`` layers; sub-models at rank ``r``
    use the first ``r`` components.

    ``mode="svd"`` (Maestro-style ordered low rank): the weight becomes factors
    ``U`` (out x R), ``V`` (R x in) from its truncated SVD, so at wrap time every
    prefix rank is the best rank-r approximation; all factors train.
    ``mode="lora"`` (DyLoRA): the base weight and bias are frozen and adapters
    ``lora_A`` (R x in), ``lora_B`` (out x R, zero) added; rank ``r`` adds
    ``alpha / r * B[:, :r] @ A[:r]`` (``alpha`` defaults to the largest rank R).

    ``export`` chooses what ``nest.export`` writes for a rank target (and so
    what ``cost(sub, "params")`` counts): ``"factored"`` (two Linears,
    ``in -> r -> out``), ``"merged"`` (one Linear), ``"auto"`` (factored only
    where ``r (out + in) < out * in``). LoRA always merges:
    ``W0 + alpha / r * B[:, :r] @ A[:r]``.

    New state_dict keys per target: ``<path>.U``, ``<path>.V`` (replacing
    ``<path>.weight``) in svd mode; ``<path>.lora_A``, ``<path>.lora_B`` in lora mode.

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> nest = sn.wrap(model, sn.Rank("rank", [4, 8, 32], targets="0"))
    >>> sorted(model.state_dict())
    ['0.U', '0.V', '0.bias', '2.bias', '2.weight']
    >>> [nest.cost(s) for s in nest.submodels]      # factored at 4 and 8, merged at 32
    [420, 676, 1188]
    >>> nest.export("rank=8")[0]
    Sequential(
      (0): Linear(in_features=32, out_features=8, bias=False)
      (1): Linear(in_features=8, out_features=32, bias=True)
    )
    """

    kind = "rank"

    def __init__(self, name: str, sizes: Sequence[int], *, targets: str | Iterable[str], mode: str = "svd",
                 alpha: float | None = None, export: str = "auto") -> None:
        super().__init__(name, sizes)
        self.targets = _as_patterns(targets, f"Rank {name!r} targets")
        if not self.targets:
            raise PatternError(f"Rank {name!r}: targets= must name nn.Linear layers")
        if mode not in MODES:
            raise SortedNetError(f"Rank {name!r}: mode must be one of {list(MODES)}, got {mode!r}")
        if export not in EXPORTS:
            raise SortedNetError(f"Rank {name!r}: export must be one of {list(EXPORTS)}, got {export!r}")
        if mode == "svd" and alpha is not None:
            raise SortedNetError(f"Rank {name!r}: alpha is the LoRA scale; mode='svd' has none")
        if mode == "lora":
            if export == "factored":
                raise SortedNetError(f"Rank {name!r}: mode='lora' exports merged weights; export='factored' "
                                     "needs mode='svd'")
            alpha = float(self.full) if alpha is None else alpha
            if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) \
                    or alpha <= 0:
                raise SortedNetError(f"Rank {name!r}: alpha must be a positive number, got {alpha!r}")
            alpha = float(alpha)
        self.mode, self.alpha, self.export = mode, alpha, export

    def scale(self, rank: int | None = None) -> float:
        """LoRA scaling ``alpha / rank`` (default: the active rank).

        >>> import sortednet as sn
        >>> sn.Rank("r", [4, 8], targets="fc", mode="lora", alpha=16).scale(4)
        4.0
        """
        if self.mode != "lora":
            raise SortedNetError(f"Rank {self.name!r}: scale() is defined for mode='lora' only")
        if rank is None:
            return self.alpha / self.active
        if type(rank) is bool or rank not in self.sizes:
            raise SizeError(f"Rank {self.name!r}: scale({rank!r}): the rank must be one of its sizes {self.sizes}")
        return self.alpha / rank

    def plan(self, modules: dict[str, nn.Module]) -> list[Target]:
        b = Binding(self, slicer=SVD if self.mode == "svd" else LORA)
        out = []
        for pat in self.targets:
            for path in match(pat, modules, f"Rank {self.name!r} targets"):
                m = modules[path]
                if not isinstance(m, nn.Linear):
                    raise PatternError(f"Rank {self.name!r}: pattern {pat!r} matched {path!r}, a "
                                       f"{type(m).__name__}; rank targets must be nn.Linear")
                parent, _, child = path.rpartition(".")
                owner = modules.get(parent)
                if self.mode == "svd" and self.export != "merged" and (
                        (child == "out_proj" and isinstance(owner, nn.MultiheadAttention))
                        or (child in ("linear1", "linear2") and isinstance(owner, nn.TransformerEncoderLayer))):
                    raise PatternError(f"Rank {self.name!r}: {path!r} is read as a weight matrix by its "
                                       f"{type(owner).__name__} (its inference fast path), which cannot run two "
                                       "factored Linears; use export='merged' (or mode='lora')")
                out.append(Target(path, "rank", b, pat))
        return out

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "targets": list(self.targets), "mode": self.mode, "alpha": self.alpha,
                "export": self.export}

"""nn.Embedding: the embedding dimension (``out``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import PatternError
from .base import Slicer, slicer


@slicer(nn.Embedding)
class EmbeddingSlicer(Slicer):
    roles = ("out",)
    # max_norm / sparse: read as they were at wrap (None / False, which check requires); a write of another
    # value is refused as for embedding_dim (max_norm renormalises looked-up rows of the shared weight in place)
    attrs = ("weight", "embedding_dim", "max_norm", "sparse")
    views = {"weight": ((1, "out"),)}
    static = ("embedding_dim", "max_norm", "sparse")

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["embedding_dim"]

    def check(self, m: nn.Module, bind: dict, path: str) -> None:
        if m.max_norm is not None:
            raise PatternError(f"{path!r}: an nn.Embedding with max_norm={m.max_norm} renormalises the rows it "
                               "looks up IN PLACE; a sub-model would rescale its slice of the shared weight "
                               "(changing every other sub-model): slicing it is not supported")
        if m.sparse:
            raise PatternError(f"{path!r}: an nn.Embedding with sparse=True gives sparse gradients, which "
                               "cannot be sliced: use sparse=False or leave it out of the dimension")

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "weight":
            return self.take(m, "weight", [(1, "out")])
        if name in ("max_norm", "sparse"):
            return m.__dict__[name]
        return self.features(m, "out", m.__dict__["embedding_dim"])

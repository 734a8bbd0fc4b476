"""nn.Embedding: the embedding dimension (``out``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Slicer, slicer


@slicer(nn.Embedding)
class EmbeddingSlicer(Slicer):
    roles = ("out",)
    attrs = ("weight", "embedding_dim")
    views = {"weight": ((1, "out"),)}
    static = ("embedding_dim",)

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["embedding_dim"]

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "weight":
            return self.take(m, "weight", [(1, "out")])
        return self.features(m, "out", m.__dict__["embedding_dim"])

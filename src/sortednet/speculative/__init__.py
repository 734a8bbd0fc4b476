"""Speculative decoding with nested drafts: self-speculative (shared KV cache) and S2D cascades.

A sorted causal LM holds its own drafts: its shallow sub-models read through
the same final norm and LM head. :func:`speculative_generate` drafts tokens
with them (or with a separate sorted draft nest whose exits form a cascade),
verifies them with the target in one pass, and returns exactly what the
target's own decoding gives (greedy: token for token; sampling: in
distribution). See docs/speculative.md.
"""

from .generate import ExitStats, SpeculativeOutput, SpeculativeStats, speculative_generate

__all__ = ["speculative_generate", "SpeculativeOutput", "SpeculativeStats", "ExitStats"]

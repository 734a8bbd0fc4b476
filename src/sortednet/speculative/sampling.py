"""Token choice and acceptance rules of speculative decoding.

``filtered`` turns logits into the distribution ``generate`` samples from
(temperature, then top-k, then top-p, as transformers' logits warpers do).
``accept_greedy`` keeps drafted tokens while they equal the target's argmax;
``accept_sampled`` is Leviathan et al. (arXiv 2211.17192), Algorithm 1: keep
draft token ``t`` with probability ``min(1, p(t) / q(t))`` where ``q`` is the
distribution it was drawn from, else draw from ``norm(max(0, p - q))``; all
randomness comes from the ``generator`` passed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SortedNetError

__all__ = ["Sampling", "filtered", "accept_greedy", "accept_sampled", "auto_draft_length"]


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: ``do_sample=False`` is greedy (argmax of the logits in float32, as ``generate``
    casts them)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def probs(self, logits: Tensor) -> Tensor:
        p = filtered(logits, self.temperature, self.top_k, self.top_p).softmax(-1)
        if not bool(torch.isfinite(p).all()):  # (drawing from them would be a raw error of torch.multinomial)
            raise SortedNetError(f"speculative_generate(temperature={self.temperature}): the logits divided by "
                                 "the temperature overflow (or the logits are not finite), so there is no "
                                 "distribution to sample from; use a larger temperature, or do_sample=False for "
                                 "the greedy tokens such a temperature tends to")
        return p

    def draw(self, probs: Tensor) -> int:
        return int(torch.multinomial(_on(probs, self.generator), 1, generator=self.generator))


def filtered(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None) -> Tensor:
    """Logits after temperature -> top-k -> top-p, removed tokens at ``-inf`` (like ``generate``).

    >>> filtered(torch.tensor([[1.0, 3.0, 2.0]]), top_k=2)
    tensor([[-inf, 3., 2.]])
    """
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k is not None:
        k = min(top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return scores


def accept_greedy(target_logits: Tensor, drafted: list[int]) -> tuple[int, int]:
    """(number of drafted tokens kept, the target's next token after them).

    >>> accept_greedy(torch.tensor([[0., 1.], [1., 0.], [0., 1.]]), [1, 1])
    (1, 0)
    """
    best = target_logits.float().argmax(-1).tolist()  # (in float32, as generate's: a float64 near-tie alike)
    j = 0
    while j < len(drafted) and drafted[j] == best[j]:
        j += 1
    return j, best[j]


def accept_sampled(p: Tensor, q: Tensor, drafted: list[int], generator: torch.Generator | None) -> tuple[int, int]:
    """Leviathan et al. acceptance: ``p`` (k+1, V) target probabilities, ``q`` (k, V) the draft's.

    >>> p = torch.tensor([[0.0, 1.0], [0.5, 0.5]]); q = torch.tensor([[1.0, 0.0]])
    >>> accept_sampled(p, q, [0], torch.Generator().manual_seed(0))   # p(0) = 0: always rejected
    (0, 1)
    """
    for i, t in enumerate(drafted):
        r = torch.rand((), generator=generator, device=_on(p, generator).device)
        if r * q[i, t] < p[i, t]:
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = residual.sum()
        dist = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(_on(dist, generator), 1, generator=generator))
    return len(drafted), int(torch.multinomial(_on(p[len(drafted)], generator), 1, generator=generator))


def _on(t: Tensor, generator: torch.Generator | None) -> Tensor:
    """``t`` where ``generator`` draws (a CPU generator serves a model on a GPU; without one, where ``t`` is)."""
    return t if generator is None else t.to(generator.device)


def auto_draft_length(accepted: int, rejections: int, cost: float, most: int = 12) -> int:
    """Draft length maximising expected tokens per unit of work, from the acceptance seen so far.

    With per-token acceptance ``a`` (estimated ``(accepted + 1) / (accepted + rejections + 2)``) and a
    draft token costing ``cost`` target passes, ``k`` drafts yield ``(1 - a**(k+1)) / (1 - a)`` tokens
    for ``1 + cost * k`` passes.

    >>> auto_draft_length(0, 0, 0.25), auto_draft_length(80, 20, 0.25), auto_draft_length(99, 1, 0.1)
    (1, 3, 12)
    """
    a = min((accepted + 1) / (accepted + rejections + 2), 0.999)
    cost = max(cost, 1e-3)
    return max(range(1, most + 1), key=lambda k: (1 - a ** (k + 1)) / (1 - a) / (1 + cost * k))

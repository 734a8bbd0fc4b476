"""Key/value caches continued by another sub-model: allowed where the result is the same, else refused.

A Hugging Face cache (``past_key_values``) holds, per layer, the keys and values that the sub-model which
filled it computed. Continuing it under another sub-model is right only when every layer the new one runs
holds exactly what that sub-model would have computed:

- another width or head count (any dimension but depth) changes every layer's keys and values (or their
  shapes): refused while the cache holds anything;
- a shallower depth runs a prefix of the same layers: right, but the layers it skips miss the positions it
  adds;
- a deeper depth is right only if no shallower call left its extra layers behind.

:class:`CacheGuard` (a forward pre-hook of the wrapped model's root, installed when its ``forward`` takes
``past_key_values``, or ``cache`` in transformers 5) keeps, per cache object (weakly), the sizes that
filled it and, per depth ``d`` that ran on it, the first position the layers from ``d`` on are missing.
An empty cache starts afresh; a cropped cache (speculative decoding rolls back) is right again for the
positions it kept.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

from .errors import SortedNetError
from .views import _compiling


class CacheGuard:
    """``past_key_values`` continued by a sub-model that would read another's keys and values: refused."""

    def __init__(self, active: Any, dims: tuple, names: tuple[str, ...] = ("past_key_values",)) -> None:
        self.active, self.names = active, names
        depth = [d for d in dims if d.kind == "depth"]
        self.depth = depth[0].name if len(depth) == 1 else None  # several depth lists: every switch is refused
        self.full = depth[0].full if len(depth) == 1 else 0
        self.records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __deepcopy__(self, memo: dict) -> "CacheGuard":
        return self

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        cache = next((c for c in map(kwargs.get, self.names) if c is not None), None)
        if cache is None or _compiling():
            return None
        try:
            filled = int(cache.get_seq_length())
            rec = self.records.get(cache)
        except Exception:  # a legacy tuple cache (transformers refuses it itself), another cache type
            return None
        sub = self.active.plan().sub
        key = tuple((n, s) for n, s in sub.items() if n != self.depth)
        if rec is None or filled == 0:
            rec = self.records[cache] = (key, {})
        elif rec[0] != key:
            raise SortedNetError(
                f"the key/value cache holds {filled} positions computed by sub-model "
                f"{','.join(f'{n}={s}' for n, s in rec[0])}; sub-model {sub} computes other keys and values "
                "(another width or head count): continuing that cache would mix two models. Start a new cache "
                "for each sub-model (generate() makes its own when past_key_values is not given)")
        if self.depth is None:
            return None
        d, missing = sub[self.depth], rec[1]
        behind = [(e, p) for e, p in missing.items() if e < d and p < filled]
        if behind:
            e, p = min(behind, key=lambda t: t[1])
            raise SortedNetError(
                f"key/value cache: a sub-model of {self.depth}={e} ran on this cache at position {p}, so its "
                f"layers from {e} on miss positions {p}..{filled - 1}; {sub} runs them and would attend to a "
                f"past they never saw. Crop every layer of the cache back to {p} positions, or start a new one")
        for e in [e for e, p in missing.items() if e < d]:  # (p >= filled: this call fills those layers again)
            del missing[e]
        if d < self.full:  # the layers from d on stop at `filled`
            missing[d] = min(missing.get(d, filled), filled)
        return None


def kv_cache_names(model: Any) -> tuple[str, ...]:
    """The keywords of ``model.forward`` that take a Hugging Face cache (``past_key_values``; ``cache`` in
    transformers 5, which still accepts the old name), or ``()``."""
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return ()
    if "past_key_values" in params:
        return ("past_key_values",)
    if "cache" in params and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return ("cache", "past_key_values")
    return ()

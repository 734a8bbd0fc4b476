"""Key/value caches continued by another sub-model: allowed where the result is the same, else refused.

A Hugging Face cache (``past_key_values``) holds, per layer, the keys and values that the sub-model which
filled it computed. Continuing it under another sub-model is right only when every layer the new one runs
holds exactly what that sub-model would have computed:

- another width or head count (any dimension but depth) changes every layer's keys and values (or their
  shapes): refused while the cache holds anything;
- a shallower depth runs a prefix of the same layers: right, but the layers it skips miss the positions it
  adds;
- a deeper depth is right only if no shallower call left its extra layers behind.

:class:`CacheGuard` (a forward pre-hook with keyword arguments on the wrapped model's root and on every
Hugging Face model inside it whose ``forward`` takes ``past_key_values``, ``cache`` in transformers 5)
keeps on each cache object the sizes that filled it and, per depth ``d`` that ran on it, the first
position the layers from ``d`` on are missing. An empty cache starts afresh; a cropped cache (speculative
decoding rolls back) is right again for the positions it kept. An encoder-decoder cache, or a nest with
several layer lists under its depth, allows no change at all: the encoder's output differs.
"""

from __future__ import annotations

import collections
import functools
import inspect
import sys
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .errors import SortedNetError
from .modes import attr_of as _get  # (a user's config whose __getattr__ raises KeyError)
from .views import _compiling


class CacheGuard:
    """A key/value cache continued by a sub-model that would read another's keys and values: refused.

    The record lives on the cache object (``copy.deepcopy`` of a prompt cache carries it), under this
    nest's key; a cache that holds positions but no record (filled before ``wrap``, by an exported model,
    or where no guard saw it) is refused: nothing tells which sub-model computed it."""

    ATTR = "_sortednet_kv"

    def __init__(self, active: Any, dims: tuple, names: tuple[str, ...], index: int | tuple[int, ...] | None,
                 plain: bool = False, anykw: bool = False) -> None:
        self.active, self.names = active, names
        self.index = (index,) if isinstance(index, int) else tuple(index or ())
        self.anykw = anykw  # (a forward with **kwargs: any keyword named as a cache is one)
        self.heads = {d.name for d in dims if d.kind == "heads"}  # (they change the keys' shapes)
        self.heads_full = {d.name: d.full for d in dims if d.kind == "heads"}
        depth = [d for d in dims if d.kind == "depth"]
        # one list of layers: a shallower depth runs a prefix of the same layers; several (an encoder and a
        # decoder under one Depth) or several Depth dimensions: every change of sub-model is refused
        prefix = len(depth) == 1 and len(getattr(depth[0], "layers", ())) == 1
        self.depth = depth[0].name if prefix else None
        self.full = depth[0].full if prefix else 0
        self.plain = plain  # a hand-written forward: caches of plain tensors are named in a warning, once
        self.told = False

    def __deepcopy__(self, memo: dict) -> "CacheGuard":
        return self

    def _key(self, cache: Any, sub: Any) -> tuple[str | None, tuple]:
        """(the depth dimension that may shrink on this cache or None, the sizes that must stay)."""
        depth = None if hasattr(cache, "cross_attention_cache") else self.depth  # cross-attention keys: the
        return depth, tuple((n, s) for n, s in sub.items() if n != depth)        # encoder's output

    @staticmethod
    def _ran(module: Any, sub: Any, depth: str) -> int:
        """The layers a forward runs: the active depth, or fewer while the model's config says so
        (transformers' ``assistant_early_exit`` lowers ``config.num_hidden_layers`` while its draft runs, and
        Llama-family models run ``layers[:config.num_hidden_layers]``)."""
        d = sub[depth]
        n = _get(_get(module, "config"), "num_hidden_layers")
        return n if type(n) is int and 0 < n < d else d

    def _given(self, args: tuple, kwargs: dict) -> list:
        """The caches the call was given (by keyword or by position)."""
        out = [c for c in map(kwargs.get, self.names) if c is not None]
        if self.anykw:
            out += [c for k, c in kwargs.items() if c is not None and k not in self.names and is_cache_name(k)]
        return out + [args[i] for i in self.index if i < len(args) and args[i] is not None]

    def made(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook: a cache the forward made itself (none was given, ``use_cache=True``) gets its record,
        as one that came in empty would (the manual decode loop continues with it); also one a hand-written
        forward returns in a tuple or dict, ``(logits, cache)``."""
        if _compiling() or self._given(args, kwargs):
            return None
        # transformers 5 outputs hold `cache`; their `past_key_values` is a deprecated alias that warns
        names = ("cache",) if "cache" in getattr(output, "__dataclass_fields__", ()) else ("cache", "past_key_values")
        found = [getattr(output, n, None) for n in names]
        if isinstance(output, (tuple, list)):  # (a hand-written model returning `(logits, cache)`)
            found += list(output)
        elif type(output) is dict:
            found += list(output.values())
        cache = next((c for c in found if c is not None and _is_cache_object(c)), None)
        if cache is None:
            return None
        try:
            records = cache.__dict__.setdefault(self.ATTR, {})
        except AttributeError:
            return None
        if self.active.uid in records:  # (an inner model's hook stamped it already)
            return None
        sub = self.active.plan().sub
        depth, key = self._key(cache, sub)
        d = None if depth is None else self._ran(module, sub, depth)
        records[self.active.uid] = [key, {d: 0} if d is not None and d < self.full else {}, self.active.epoch]
        return None

    def _unfollowed(self, cache: Any) -> None:
        """A cache of plain tensors (a list of ``(k, v)``, a dict, an object of the model's own without
        ``get_seq_length``): which sub-model wrote which position cannot be told from it, and such an argument may
        hold other things than keys and values (a rotary table, a previous prediction, prefix-tuning tensors), so it
        is not refused, but said once: continuing it with another sub-model is not checked."""
        if self.told or not _tensors(cache):
            return None
        self.told = True
        warnings.warn(f"a cache-like argument ({type(cache).__name__} of tensors) was given to the wrapped model; "
                      "sortednet follows caches that count their positions (get_seq_length(), as transformers' "
                      "caches do), not tensors in lists, tuples or dicts: if they are keys and values, one filled "
                      "under a sub-model and continued under another (other widths or heads, a deeper depth) is NOT "
                      "refused and mixes two models. Start a new cache whenever you switch sub-model "
                      "(docs/transformers.md, caches of decoders you wrote)", UnfollowedCacheWarning, stacklevel=4)
        return None

    def _refuse_full_allocation(self, module: Any, cache: Any, sub: Any) -> None:
        """A fresh preallocated cache (a StaticCache transformers sized from the config) holding the full model's
        key/value heads, given to a sub-model with fewer heads: its writes would fail deep inside transformers
        (``index_copy_``) or, with other shapes, mix layouts; refused, named, before the forward."""
        inside = {b.dim.name for m in module.modules() if "_sn" in m.__dict__ for b in m.__dict__["_sn"].bind.values()
                  if b.dim.kind == "heads"}  # (a Heads dimension of another part of the model leaves this one be)
        fewer = {n: sub[n] for n, full in self.heads_full.items() if sub[n] < full and n in inside}
        cfg = _get(module, "config")
        kv = _get(cfg, "num_key_value_heads") or _get(cfg, "num_attention_heads")
        if not fewer or type(kv) is not int or kv == 1:  # (multi-query: one key/value head at any head count)
            return None
        own = getattr(cache, "self_attention_cache", cache)  # (an encoder-decoder cache: its decoder's own)
        got = next((x.keys.shape[1] for x in getattr(own, "layers", ()) if isinstance(getattr(x, "keys", None),
                    torch.Tensor) and x.keys.numel() > 0 and x.keys.dim() == 4), None)
        if got == kv:
            raise SortedNetError(
                f"the key/value cache ({type(cache).__name__}) was allocated for the full model's {kv} key/value "
                f"heads (from the model's config), and sub-model {sub} computes fewer "
                f"({', '.join(f'{n}={s}' for n, s in fewer.items())}): its writes do not fit. Let the cache size "
                "itself on its first write (a DynamicCache, or generate() without cache_implementation='static' / "
                "prefill_chunk_size), or generate with the exported sub-model (nest.export), whose config holds "
                "its own head count")
        return None

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        if _compiling():  # first: anything before it could break the graph and run the rest eagerly, checking a
            return None   # cache whose compiled prefill recorded nothing (made() does not record while compiling)
        given = self._given(args, kwargs)
        if not given:
            return None
        if self.plain:  # tensors in lists, tuples, dicts or an object of the model's own: said, not followed
            for c in given:
                if not _is_cache_object(c):
                    self._unfollowed(c)
        cache = next((c for c in given if _is_cache_object(c)), None)
        if cache is None:
            return None
        sub = self.active.plan().sub
        try:
            filled = int(cache.get_seq_length())
            records = cache.__dict__.setdefault(self.ATTR, {})
        except Exception:  # (a cache object that cannot count or hold a record: a type of its own)
            return self._unfollowed(cache) if self.plain else None
        depth, key = self._key(cache, sub)
        rec = records.get(self.active.uid)
        if filled == 0:
            held = _allocated(cache)  # (a StaticCache after reset(), a DynamicCache cropped to nothing)
            if rec is not None and (held == "static" or held == "cropped" and len(self.heads) == 1) and any(
                    dict(rec[0]).get(n) != dict(key).get(n) for n in self.heads):
                raise SortedNetError(
                    f"the key/value cache was allocated for sub-model {','.join(f'{n}={s}' for n, s in rec[0])} "
                    f"(emptied by reset() or cropped to no position, its tensors keep those shapes); sub-model "
                    f"{sub} computes keys and "
                    "values of other shapes. Start a new cache for each sub-model")
            decoder = getattr(cache, "self_attention_cache", None)  # (an encoder-decoder cache)
            if rec is None and "static" in (held, _allocated(decoder)):
                self._refuse_full_allocation(module, cache, sub)
            rec = records[self.active.uid] = [key, {}, self.active.epoch]
        elif rec is None:
            raise SortedNetError(
                f"the key/value cache holds {filled} positions that this nest did not see computed (filled "
                "before wrap, by an exported model, or by a module that is not the wrapped model): it cannot "
                f"tell whether sub-model {sub} would have computed them. Fill the cache through the wrapped "
                "model, or start a new one")
        elif rec[2] != self.active.epoch:
            raise SortedNetError(
                f"the key/value cache holds {filled} positions computed before the nest's units were re-ordered "
                "(sort_units / sort_by_importance permuted heads or neurons in the weights since): its keys and "
                "values are in the old order. Start a new cache")
        elif rec[0] != key:
            was, now = dict(rec[0]), dict(key)
            changed = ", ".join(f"{n} {was.get(n)} -> {now.get(n)}" for n in now if was.get(n) != now.get(n))
            raise SortedNetError(
                f"the key/value cache holds {filled} positions computed by sub-model "
                f"{','.join(f'{n}={s}' for n, s in rec[0])}" + (f" (at any {depth})" if depth is not None else "")
                + f"; sub-model {sub} computes other keys and values ({changed}"
                + ("; in an encoder-decoder cache, any change does" if hasattr(cache, "cross_attention_cache") else
                   "; any dimension but depth changes the keys and values of every layer" if depth is not None
                   else "") + ")"
                + ": continuing that cache would mix two models. Start a new cache for each sub-model "
                "(generate() makes its own when past_key_values is not given)")
        if depth is None:
            return None
        d, missing = self._ran(module, sub, depth), rec[1]
        behind = [(e, p) for e, p in missing.items() if e < d and p < filled]
        if behind:
            e, p = min(behind, key=lambda t: t[1])
            raise SortedNetError(
                f"key/value cache: a sub-model of {depth}={e} ran on this cache at position {p}, so its "
                f"layers from {e} on miss positions {p}..{filled - 1}; {sub} runs them and would attend to a "
                f"past they never saw. " + (
                    "Start a new cache, or empty this one (cache.reset()): no position is held by every layer"
                    if p == 0 else
                    f"Crop each layer back to {p} positions (by its own count: the layers hold different "
                    "lengths; transformers' sliding-window layers cannot be cropped once full), or start a new "
                    "cache"))
        layers = getattr(cache, "layers", None)
        if not isinstance(layers, (list, tuple)) and filled and any(e < d for e in missing):
            e = min(e for e in missing if e < d)
            raise SortedNetError(
                f"key/value cache ({type(cache).__name__}): a sub-model of {depth}={e} ran on it, so its layers from "
                f"{e} on hold fewer positions, and since then it was cropped; it does not list its layers "
                f"(`.layers`, as transformers' caches do), so whether every layer {sub} runs now holds the same "
                "positions cannot be checked. Start a new cache")
        if isinstance(layers, (list, tuple)) and filled:  # what the layers this sub-model runs really hold
            short = [(i, int(layers[i].get_seq_length()) if i < len(layers) else 0) for i in range(d)
                     if i >= len(layers) or hasattr(layers[i], "get_seq_length")]  # (a layer that reuses
            # another's keys and values, Gemma3n's num_kv_shared_layers, holds none of its own)
            stateful = _state_layers(module)  # (a linear-attention / convolution layer keeps a state, no keys)
            short = [(i, n) for i, n in short if n != filled and i not in stateful]
            if short:
                raise SortedNetError(
                    f"key/value cache: layer {short[0][0]} holds {short[0][1]} positions and layer 0 holds "
                    f"{filled}: a shallower sub-model ran on it (or a crop removed the same count from layers of "
                    f"different lengths); {sub} runs layers 0..{d - 1} and would attend to a past they do not "
                    "hold. Crop each layer back to the positions all of them hold, or start a new cache")
        for e in [e for e, p in missing.items() if e < d]:  # (p >= filled: this call fills those layers again)
            del missing[e]
        if d < self.full:  # the layers from d on stop at `filled`
            missing[d] = min(missing.get(d, filled), filled)
        return None


#: ``config.layer_types`` entries of layers that keep a recurrent or convolution state instead of keys and values
STATE_LAYER_TYPES = ("linear_attention", "conv", "mamba", "recurrent")


def layer_types(cfg: Any) -> list:
    """The per-layer kinds a (text) config lists in ``layer_types``, or ``[]``."""
    text = cfg.get_text_config(decoder=True) if callable(_get(cfg, "get_text_config")) else cfg
    kinds = _get(text, "layer_types")
    return list(kinds) if isinstance(kinds, (list, tuple)) else []


def _state_layers(module: Any) -> frozenset[int]:
    """Indices of the layers that ``module``'s config marks as keeping a state, not keys and values (MiniMax's
    lightning attention: its cache holds that state aside, and the layer's key/value entry stays empty)."""
    return frozenset(i for i, k in enumerate(layer_types(_get(module, "config"))) if k in STATE_LAYER_TYPES)


def _allocated(cache: Any) -> str | None:
    """Whether the layers of an empty cache hold key tensors: ``"static"`` (preallocated: a static cache, also
    after ``reset()``), ``"cropped"`` (a dynamic cache cropped to no position keeps ``(batch, heads, 0, head_dim)``
    tensors, which the next update concatenates to; which layers hold them is not told, so only one Heads
    dimension, every layer's, is judged by them) or None."""
    layers = getattr(cache, "layers", None)
    keys = [x.keys for x in layers if isinstance(getattr(x, "keys", None), torch.Tensor)] \
        if isinstance(layers, (list, tuple)) else []
    if any(k.numel() > 0 for k in keys):
        return "static"
    return "cropped" if any(k.dim() >= 3 for k in keys) else None


def _is_cache_object(c: Any) -> bool:
    """A cache object that counts its positions (transformers' caches, or one of the model's own alike)."""
    if isinstance(c, torch.Tensor):
        return False
    try:
        return callable(getattr(c, "get_seq_length", None))
    except Exception:  # (a __getattr__ of the user's that raises KeyError)
        return False


def _example_cache(c: Any, key: Any) -> bool:
    """Whether ``c``, found in an example under ``key``, is a key/value cache: an object that counts its positions
    and is one of transformers' caches, is named as a cache (its class) or is given as one (its key or attribute
    name). A batch of one's own with a ``get_seq_length`` helper is not."""
    if isinstance(c, (Mapping, list, tuple)) or not _is_cache_object(c):
        return False
    if any(k.__name__ == "Cache" and k.__module__.startswith("transformers.") for k in type(c).__mro__):
        return True
    return "cache" in type(c).__name__.lower() or (isinstance(key, str) and is_cache_name(key))


def _fields(x: Any, limit: int | None = None) -> list[tuple[Any, Any]] | None:
    """``(key, value)`` of what a plain container or an object of one's own holds (its attributes, ``__slots__``
    too; the first ``limit`` of a container's); None for an atom (a tensor, a module, the nest, a number, a
    function, a Python module, a class)."""
    import functools
    import itertools
    import types

    if isinstance(x, (torch.Tensor, torch.nn.Module, type, types.ModuleType, types.FunctionType,
                      types.BuiltinFunctionType, str, bytes, int, float, complex, bool)) or x is None:
        return None
    if type(x).__module__ == "sortednet.nest":
        return None
    if isinstance(x, functools.partial):
        return [("func", x.func), *enumerate(x.args), *x.keywords.items()]
    if inspect.ismethod(x):
        return [("__self__", x.__self__)]
    try:
        if isinstance(x, Mapping):
            return list(itertools.islice(x.items(), limit))
        if isinstance(x, (list, tuple, collections.deque)):
            return list(itertools.islice(enumerate(x), limit))
        out = list(vars(x).items()) if hasattr(x, "__dict__") else []
        for k in type(x).__mro__:
            slots = getattr(k, "__slots__", ())
            for name in (slots,) if isinstance(slots, str) else slots:
                if name not in ("__dict__", "__weakref__") and hasattr(x, name):
                    out.append((name, getattr(x, name)))
        return out
    except Exception:  # (a mapping or attribute that raises when read: taken as an atom)
        return None


_ATOMS = frozenset({int, float, bool, str, bytes, complex, type(None)})


def _caches_in(example: Any, holders: set[int] | None = None, who: str = "sortednet") -> list[tuple[str, Any]]:
    """``(where, cache)`` for every key/value cache ``example`` holds (in its dicts, lists, tuples and objects);
    ``holders``: filled with the ids of every container and object on the way to one. Tensors and numbers are
    not searched; an example holding more than 100,000 other containers and objects is refused (a cache past
    them would go unseen: the runs would append to it)."""
    out: list[tuple[str, Any]] = []
    seen: set[int] = set()
    found: set[int] = set()
    # (the way to each thing as a chain of (above, label, id) nodes: a deep example costs no copied paths)
    stack: list[tuple[Any, Any, str, tuple | None]] = [(example, None, "", None)]
    objects = 100_000

    def ids(node: tuple | None) -> Iterator[int]:
        while node is not None:
            yield node[2]
            node = node[0]

    def where(node: tuple | None, label: str) -> str:
        parts = [label]
        while node is not None:
            parts.append(node[1])
            node = node[0]
        text = "".join(reversed(parts))
        return "the example" + text if not text or text.startswith(".") else text

    while stack:
        x, key, label, above = stack.pop()
        if type(x) in _ATOMS or isinstance(x, torch.Tensor):  # (the example itself)
            continue
        if id(x) in seen:  # (a cache, or a container holding one, met again: the way here leads to it too)
            if holders is not None and (id(x) in found or id(x) in holders):
                holders.update(ids(above))
            continue
        seen.add(id(x))
        if _example_cache(x, key):
            out.append((where(above, label), x))
            found.add(id(x))
            if holders is not None:
                holders.update(ids(above))
            continue
        objects -= 1
        if objects < 0:
            raise SortedNetError(f"{who}: the example holds more than 100,000 containers and objects besides its "
                                 "tensors and numbers: too many to search for a key/value cache, which the runs "
                                 "would append to; give the model's inputs as tensors (a cache apart)")
        fields = _fields(x)
        if not fields or inspect.ismethod(x):
            continue
        attr = not isinstance(x, (Mapping, list, tuple, collections.deque))
        node = (above, label, id(x))
        stack.extend((v, k, f".{k}" if attr else f"[{k!r}]", node)
                     for k, v in reversed(fields) if type(v) not in _ATOMS and not isinstance(v, torch.Tensor))
    return out


def refuse_cache_example(example: Any, who: str) -> None:
    """Refuse an example holding a key/value cache object for a call that runs the model on it several times: each
    run would append its positions to the user's cache (and a sub-model's run leave it unfit for the others)."""
    found = _caches_in(example, who=who)
    if found:
        where, c = found[0]
        raise SortedNetError(f"{who}: the example holds a key/value cache (at {where}: {type(c).__name__}) "
                             "that each of its runs would append to, leaving your cache changed and the later runs "
                             "reading the earlier ones' positions; give the inputs without the cache (the prompt: "
                             "the wiring and the sub-models are the same)")


def fresh_caches(example: Any, who: str = "sortednet") -> Any:
    """``example`` with every key/value cache in it deep-copied (one run on it leaves the user's caches as they
    were), the containers and objects on the way to one copied shallowly, all else the example's own (tensors,
    modules, a sentinel compared by identity, a lock); the example itself where it holds none. A cache's tensors
    are copied detached (a cache filled with gradients on holds non-leaf tensors, which deepcopy refuses: their
    values are what counts); a module or the nest it refers to is shared."""
    import copy

    holders: set[int] = set()
    caches = {id(c): c for _, c in _caches_in(example, holders, who)}
    if not caches:
        return example

    def fresh(c: Any) -> Any:
        tensors, shared = reachable(c)
        memo: dict[int, Any] = {id(t): t.detach().clone() for t in tensors}
        memo.update((id(m), m) for m in shared)
        try:
            return copy.deepcopy(c, memo)
        except Exception as e:
            raise SortedNetError(f"the example's key/value cache ({type(c).__name__}) cannot be copied to count on "
                                 f"({type(e).__name__}: {str(e)[:160]}), and a run on it would append to your "
                                 "cache; count on the prompt, or on a copy of the cache you make") from None

    made: dict[int, Any] = {}  # (one copy of each cache and holder, however many ways lead to it)

    def rebuild(x: Any) -> Any:
        if id(x) in made:
            return made[id(x)]
        if id(x) in caches:
            made[id(x)] = out = fresh(x)
            return out
        if id(x) not in holders:
            return x
        try:
            if isinstance(x, Mapping):
                out = copy_mapping(x)
                made[id(x)] = out
                for k in list(out):
                    out[k] = rebuild(out[k])
                return out
            if isinstance(x, collections.deque):
                out = copy.copy(x)  # (its maxlen kept)
                made[id(x)] = out
                out.clear()
                out.extend(rebuild(v) for v in x)
                return out
            if isinstance(x, (list, tuple)):
                items = [rebuild(v) for v in x]
                if type(x) in (list, tuple):
                    out = type(x)(items)
                elif hasattr(x, "_fields"):
                    out = type(x)(*items)
                else:  # (a subclass of one's own: copied, its items replaced)
                    out = copy.copy(x)
                    out[:] = items
                made[id(x)] = out
                return out
            out = copy.copy(x)  # (an object holding one: its fields rebound on the copy)
            made[id(x)] = out
            for k, v in _fields(x) or ():
                if id(v) in caches or id(v) in holders:
                    object.__setattr__(out, k, rebuild(v))
            return out
        except SortedNetError:
            raise
        except Exception as e:
            raise SortedNetError(f"the example holds a key/value cache inside a {type(x).__name__}, which cannot be "
                                 f"copied to count on ({type(e).__name__}: {str(e)[:160]}), and a run on it would "
                                 "append to your cache; give the cache in a dict or a tuple, or count on the "
                                 "prompt") from None

    return rebuild(example)


def reachable(obj: Any) -> tuple[list[torch.Tensor], list[Any]]:
    """The tensors, and the modules and nests (which a copy shares, never copies), an object holds through its
    dicts, lists, tuples, attributes, partials and bound methods, at any depth (each object followed once; a
    module's own contents are not followed)."""
    out: list[torch.Tensor] = []
    modules: list[Any] = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, torch.nn.Module) or type(x).__module__ == "sortednet.nest":
            modules.append(x)
        else:
            stack.extend(v for _, v in reversed(_fields(x) or []))
    return out, modules


def copy_mapping(m: Mapping) -> Any:
    """A shallow copy of ``m`` of its own type where that copies (a dict, a BatchEncoding), else a dict."""
    try:
        return m.copy()  # type: ignore[attr-defined]
    except Exception:
        return dict(m)


def _tensors(c: Any) -> list[torch.Tensor]:
    """The tensors of a cache kept in plain containers: lists, tuples and dicts of tensors, and the attributes of an
    object of the model's own that holds them (one level)."""
    out = []
    for leaf in tree_leaves(c):
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        elif hasattr(leaf, "__dict__") and not isinstance(leaf, (torch.nn.Module, type)):
            out += [t for v in vars(leaf).values() for t in tree_leaves(v) if isinstance(t, torch.Tensor)]
    return out


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (moved by every in-place write), or None for an inference tensor (it has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


class EncoderGuard:
    """An encoder-decoder's encoder output is noted with the sizes, under the sub-model that computed it, of
    the dimensions that reach the encoder; a decoder given it under other such sizes (``model(encoder_outputs=
    ...)`` or ``generate(encoder_outputs=...)`` after a switch) is refused: its cross-attention would read
    another model's encoding. Dimensions of the decoder alone may differ. The note is kept beside the tensor
    (by identity, dropped with it), never on it: the tensor pickles as without sortednet. A copy of a noted output,
    or one expanded for beams (each row repeated), is found by its values; an output computed elsewhere carries
    no note and passes."""

    def __init__(self, active: Any, names: frozenset[str]) -> None:
        self.active, self.names = active, names
        self.notes: dict[int, tuple[Any, tuple, int | None]] = {}  # id -> (tensor, sizes, its version then)
        self.outputs: dict[int, tuple[Any, tuple]] = {}  # the output objects, by identity
        self.unnoted = WeakIdKeyDictionary()  # tensors compared with every note and matching none

    def __deepcopy__(self, memo: dict) -> "EncoderGuard":
        return self

    def _sizes(self) -> tuple:
        return tuple((n, s) for n, s in self.active.plan().sub.items() if n in self.names)

    def made(self, module: Any, args: tuple, output: Any) -> None:
        if _compiling() or not self.names:
            return None
        t = getattr(output, "last_hidden_state", None)
        if t is None and isinstance(output, (tuple, list)) and output:
            t = output[0]
        if isinstance(t, torch.Tensor):
            sizes = self._sizes()
            self._keep(t, sizes)
            if t is getattr(output, "last_hidden_state", None):
                key, outs = id(output), self.outputs
                try:
                    outs[key] = (weakref.ref(output, lambda _, key=key, outs=outs: outs.pop(key, None)), sizes)
                except TypeError:  # (an output object without weak references)
                    pass
        return None

    def _copied(self, t: torch.Tensor, now: tuple, written: bool = False) -> tuple[Any, tuple] | None:
        """The note of a noted output that ``t`` is, or copies with its rows repeated ``k`` times each
        (``generate`` expands the encoder output for beams or several sequences with ``repeat_interleave``, in
        place in the output object it was given; ``k = 1``: a copy), then kept for ``t`` itself (the next decoding
        steps get it again); None if ``t`` copies none. Of several matching notes (sub-models whose encodings are
        equal), one with the sizes ``now`` in force wins. ``written``: ``t`` was written in place since it was noted
        (its values decide, not the output object that holds it)."""
        for ref, sizes in [] if written else list(self.outputs.values()):  # (the output object generate
            out = ref()                                                      # expanded in place)
            if out is not None and getattr(out, "last_hidden_state", None) is t:
                return self._keep(t, sizes)
        base = t._base  # a view of a noted output (a slice of its rows or positions: h[i:i + 1])
        if base is not None:
            note = self.notes.get(id(base))
            if note is not None and note[0]() is base and note[2] == _version(base):
                return self._keep(t, note[1])
        if t in self.unnoted and self.unnoted[t] == _version(t):  # (compared before: the next decoding steps
            return None                                             # get the same tensor)
        found = None
        for ref, sizes, _ in list(self.notes.values()):
            o = ref()
            if (o is None or o is t or o.dim() != t.dim() or o.dim() == 0 or o.shape[1:] != t.shape[1:]
                    or o.shape[0] == 0 or t.shape[0] % o.shape[0] or o.dtype != t.dtype or o.device != t.device
                    or (found is not None and sizes != now)):
                continue
            k = t.shape[0] // o.shape[0]
            with torch.no_grad():  # (rows repeated: compared by broadcasting, no copy)
                same = bool((t.reshape(o.shape[0], k, *o.shape[1:]) == o.unsqueeze(1)).all())
            if same:
                found = sizes
                if sizes == now:
                    break
        if found is None:
            found = self._rows_of(t, now)
        if found is None:
            self.unnoted[t] = _version(t)
            return None
        return self._keep(t, found)

    def _rows_of(self, t: torch.Tensor, now: tuple) -> tuple | None:
        """The sizes of noted outputs that rows of ``t`` copy, each row the first ``t.shape[1]`` positions of a row of
        one (rows picked, reordered or concatenated from outputs of several calls: a serving batch assembled from
        requests encoded one at a time); of several, ones other than ``now`` first (a mix is refused). Rows are
        matched by a fingerprint of their bits (an integer sum, the same whatever order a kernel adds in: a float
        sum over batches of other sizes could round otherwise on a GPU and miss a copy), then compared exactly."""
        if t.dim() < 2 or t[0].numel() == 0 or not t.is_floating_point():  # (no position: every row would match)
            return None
        n = t.shape[1]
        with torch.no_grad():
            w = torch.arange(1, t[0, :n].numel() + 1, dtype=torch.int64, device=t.device)
            mine = (_bits(t) * w).sum(1)  # (an int64 product and sum: matmul has no integer kernel on GPUs)
            hits: set = set()
            for ref, sizes, _ in list(self.notes.values()):
                o = ref()
                if (o is None or o is t or o.dim() != t.dim() or o.shape[2:] != t.shape[2:] or o.shape[1] < n
                        or o.shape[0] == 0 or o.dtype != t.dtype or o.device != t.device or sizes in hits):
                    continue
                rows = o[:, :n]
                theirs = (_bits(rows) * w).sum(1)
                for i, j in (mine[:, None] == theirs[None, :]).nonzero().tolist():
                    if torch.equal(t[i], rows[j]):
                        hits.add(sizes)
                        break
        other = sorted(h for h in hits if h != now)
        return other[0] if other else (now if hits else None)

    def _keep(self, t: torch.Tensor, sizes: tuple) -> tuple[Any, tuple, int | None]:
        key, notes = id(t), self.notes
        notes[key] = (weakref.ref(t, lambda _, key=key, notes=notes: notes.pop(key, None)), sizes, _version(t))
        return notes[key]

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        if _compiling() or not self.names:
            return None
        t = kwargs.get("encoder_hidden_states")
        if t is None and args:  # (given by position: t5.decoder(ids, mask, encoder_hidden_states))
            i = _position(type(module), "encoder_hidden_states")
            t = args[i] if i is not None and i < len(args) else None
        if not isinstance(t, torch.Tensor):
            return None
        now = self._sizes()
        note = self.notes.get(id(t))
        if note is not None and note[0]() is t and note[2] != _version(t):  # written in place since: a buffer
            note = self._copied(t, now, True) or self._keep(t, note[1])  # refilled with another output is judged by
        elif note is None or note[0]() is not t:                      # it, else it stays what it was computed as
            note = self._copied(t, now)
            if note is None:
                return None
        if note[1] != now:
            show = lambda sizes: ",".join(f"{n}={s}" for n, s in sizes)  # noqa: E731
            raise SortedNetError(f"the encoder output given to the decoder was computed with {show(note[1])}; "
                                 f"the sub-model now in force ({self.active.plan().sub}) runs the encoder with "
                                 f"{show(now)}, and its decoder's cross-attention expects that encoder's output. "
                                 "Run the encoder under the same sub-model (or leave encoder_outputs out)")
        return None


_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s rows (its first dimension) as int64 bit patterns of its elements, one row each (for an exact,
    order-free fingerprint: integer sums wrap around the same way in any order)."""
    return t.reshape(t.shape[0], -1).contiguous().view(_INTS[t.element_size()]).long()


def install_guards(model: Any, active: Any, dims: tuple) -> list:
    """Hooks of :class:`CacheGuard` on the wrapped model's root and on every Hugging Face model inside it
    (``model.model``, T5's stacks) whose forward takes a cache."""
    mods = [model]
    tf = sys.modules.get("transformers")
    if tf is not None and hasattr(tf, "PreTrainedModel"):
        mods += [m for m in model.modules() if m is not model and isinstance(m, tf.PreTrainedModel)]
    hooks = []
    guards = [(m, CacheGuard(active, dims, *kv_cache_params(m))) for m in mods if kv_cache_params(m)[0]]
    # hand-written forwards (transformers 5 keeps caches in objects and refuses a legacy tuple cache itself): the
    # outermost modules that take a cache, the root or a model inside a wrapper of yours
    hf = getattr(tf, "PreTrainedModel", ()) if tf is not None else ()
    todo = [model]
    while todo:
        m = todo.pop()
        if isinstance(m, hf) or isinstance(m, torch.jit.ScriptModule):
            continue
        names, index, anykw = plain_cache_params(m)
        if names:
            guards = [(g, h) for g, h in guards if g is not m]
            guards.append((m, CacheGuard(active, dims, names, index, plain=True, anykw=anykw)))
        else:
            todo += list(m.children())
    for m, guard in guards:
        hooks += [m.register_forward_pre_hook(guard, with_kwargs=True),
                  m.register_forward_hook(guard.made, with_kwargs=True)]
    _warn_module_caches(model, hf)
    top = next((m for m in mods if _get(_get(m, "config"), "is_encoder_decoder")
                and callable(_get(m, "get_encoder"))), None)
    encoder = top.get_encoder() if top is not None else None
    if isinstance(encoder, torch.nn.Module):
        names = frozenset(b.dim.name for m in encoder.modules() if "_sn" in m.__dict__  # (dims reaching it)
                          for b in m.__dict__["_sn"].bind.values())
        enc = EncoderGuard(active, names)
        hooks.append(encoder.register_forward_hook(enc.made))
        for m in mods:  # the decoder stacks (transformers models themselves) that take the encoder's output
            if m is not encoder and not any(m is e for e in encoder.modules()) and _takes(m, "encoder_hidden_states"):
                hooks.append(m.register_forward_pre_hook(enc, with_kwargs=True))
    return hooks


class UnfollowedCacheWarning(UserWarning):
    """A key/value cache that sortednet cannot follow across sub-models (tensors in plain containers given to the
    forward, or kept on a module between calls): continuing it under another sub-model is not refused."""


_KV_TOKENS = frozenset({"k", "v", "kv", "key", "keys", "value", "values"})


def is_module_cache_name(name: str) -> bool:
    """An attribute named as a key/value cache kept on a module: ``k_cache``, ``cache_v``, ``kv_cache``,
    ``key_cache``, ``past_key_values`` (not a rotary table's ``cos_cached``)."""
    tokens = set(name.lower().strip("_").split("_"))
    return bool(tokens & {"cache", "cached", "past", "kvcache"}) and bool(tokens & (_KV_TOKENS | {"kvcache"}))


def _warn_module_caches(model: torch.nn.Module, hf: Any) -> None:
    """Warns once, at wrap, naming the modules that keep an attribute named as a key/value cache (a buffer or any
    attribute): state kept between calls is not followed across sub-models (docs/transformers.md)."""
    found, todo = [], [("", model)]
    while todo and len(found) < 4:
        path, m = todo.pop()
        if isinstance(m, hf) or isinstance(m, torch.jit.ScriptModule):  # (a scripted part: refused elsewhere)
            continue
        found += [f"{path}.{n}" if path else n for n in [*m._buffers, *m.__dict__]
                  if not n.startswith("_sortednet") and is_module_cache_name(n)]
        todo += [(f"{path}.{n}" if path else n, c) for n, c in reversed(m._modules.items()) if c is not None]
    if found:
        warnings.warn(f"sn.wrap: {found[:3]}{' ...' if len(found) > 3 else ''} look like key/value caches kept on "
                      "modules between calls; sortednet follows caches passed to the forward, not state a module "
                      "keeps, so one filled under a sub-model and read under another is not refused: clear or "
                      "refill it whenever you switch sub-model (docs/transformers.md, caches of decoders you "
                      "wrote)", UnfollowedCacheWarning, stacklevel=5)


@functools.cache
def _position(cls: type, name: str) -> int | None:
    """The position of argument ``name`` among those ``cls.forward`` takes by position (after ``self``)."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names.index(name) if name in names else None


def _takes(m: Any, name: str) -> bool:
    try:
        return name in inspect.signature(type(m).forward).parameters
    except (TypeError, ValueError):
        return False


_NOT_CACHES = ("use_cache", "cache_position", "cache_positions", "return_past")


def is_cache_name(name: str) -> bool:
    """Whether an argument of a hand-written forward named so takes a key/value cache (``past_key_values``, ``past``,
    ``layer_past``, ``kv_cache``, ``cache``, ``kv``; not ``use_cache``, ``cache_position`` or a time series'
    ``past_values``)."""
    n = name.lower()
    if n in _NOT_CACHES or n.endswith(("_mask", "_len", "_length", "_size", "_position", "_positions")):
        return False
    return ("cache" in n or n in ("past", "layer_past", "kv", "kvs") or n.startswith("kv_")
            or n.endswith(("_kv", "_kvs")) or "past" in n and ("key" in n or "kv" in n))


def plain_cache_params(model: Any) -> tuple[tuple[str, ...], tuple[int, ...], bool]:
    """The arguments of a hand-written ``model.forward`` named as key/value caches, their positions among the
    positional arguments, and whether it takes ``**kwargs`` (where a keyword so named is one too)."""
    cls = type(model)
    found = _PLAIN.get(cls)
    if found is None:
        try:
            params = list(inspect.signature(cls.forward).parameters.values())[1:]
        except (TypeError, ValueError, AttributeError):  # (a TorchScript module's forward is no Python function)
            params = []
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = tuple(p.name for p in params
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and is_cache_name(p.name))
        found = _PLAIN[cls] = (names, tuple(positional.index(n) for n in names if n in positional),
                               any(p.kind is p.VAR_KEYWORD for p in params))
    return found


_PLAIN: "weakref.WeakKeyDictionary[type, tuple]" = weakref.WeakKeyDictionary()  # (classes wrap makes come and go)


def kv_cache_params(model: Any) -> tuple[tuple[str, ...], int | None]:
    """The keywords of ``model.forward`` that take a Hugging Face cache (``past_key_values``; ``cache`` in
    transformers 5, which still accepts the old name) and its position among the positional arguments, or
    ``((), None)``."""
    try:
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return (), None
    byname = {p.name: p for p in params}
    if "past_key_values" in byname:
        names, name = ("past_key_values",), "past_key_values"
    elif "cache" in byname and any(p.kind is p.VAR_KEYWORD for p in params):
        names, name = ("cache", "past_key_values"), "cache"
    else:
        return (), None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names, positional.index(name) if name in positional else None

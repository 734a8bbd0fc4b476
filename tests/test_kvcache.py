"""Key/value caches of hand-written language models (not Hugging Face).

A cache object that counts its positions (``get_seq_length()``), filled by one sub-model and continued by another, is
either right (a shallower depth runs a prefix of the same layers) or refused with a SortedNetError, never a silent
mix of two models; with per-layer ``.layers`` as transformers' caches, or without (then a crop after a shallower
depth is refused). Caches of plain tensors (lists, dicts, objects without ``get_seq_length``) and caches kept on
modules cannot be followed: they are said once (``UnfollowedCacheWarning``), and never refused, since arguments named
so may hold other things that rightly cross sub-models (a rotary table, a previous prediction, prefix tensors).
Outputs are compared with a tolerance (an incremental forward sums in another order than the full one)."""

from __future__ import annotations

import collections
import itertools
import re
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sortednet as sn
from sortednet.importance import sort_units
from sortednet.kvcache import UnfollowedCacheWarning, is_cache_name, is_module_cache_name

D, H, FFN, L, V, P = 16, 4, 32, 4, 23, 32


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_heads, self.head_dim = H, D // H
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, past):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        S = k.shape[2]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(T, S, dtype=torch.bool).tril(S - T))
        return self.o(y.transpose(1, 2).reshape(B, T, -1)), (k, v)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2, self.attn = nn.LayerNorm(D), nn.LayerNorm(D), Attn()
        self.fc1, self.fc2 = nn.Linear(D, FFN), nn.Linear(FFN, D)

    def forward(self, x, past):
        a, kv = self.attn(self.n1(x), past)
        x = x + a
        return x + self.fc2(F.gelu(self.fc1(self.n2(x)))), kv


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(P, D)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.head = nn.Linear(D, V)

    def run(self, ids, layers, start):
        """``layers(i)``: layer i's past or None; returns logits and the per-layer ``(k, v)``."""
        x = self.wte(ids) + self.wpe(torch.arange(start, start + ids.shape[1]))
        new = []
        for i, b in enumerate(self.blocks):
            x, kv = b(x, layers(i))
            new.append(kv)
        return self.head(x), new


class Layer:
    """One layer's keys and values, counting its own positions (as transformers' cache layers)."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def get_seq_length(self):
        return self.k.shape[2]


class Counted:
    """A cache object of the model's own that counts its positions (layer 0's); ``layers=True``: it lists them."""

    def __init__(self, listed=True):
        self.listed, self.store = listed, []

    @property
    def layers(self):
        if not self.listed:
            raise AttributeError("layers")
        return self.store

    def get_seq_length(self, layer=0):
        return self.store[layer].get_seq_length() if len(self.store) > layer else 0

    def crop(self, n):  # relative: the same count off every layer
        for x in self.store:
            x.k, x.v = x.k[:, :, :x.k.shape[2] - n], x.v[:, :, :x.v.shape[2] - n]


class CountedLM(LM):
    def __init__(self, listed=True):
        super().__init__()
        self.listed = listed

    def forward(self, ids, past_key_values=None):
        cache = past_key_values if past_key_values is not None else Counted(self.listed)
        start = cache.get_seq_length()
        logits, new = self.run(ids, lambda i: (cache.store[i].k, cache.store[i].v) if i < len(cache.store) else None,
                               start)
        for i, (k, v) in enumerate(new):
            if i < len(cache.store):
                cache.store[i].k, cache.store[i].v = k, v
            else:
                cache.store.append(Layer(k, v))
        return logits, cache  # (made here and returned in a plain tuple: the decode loop continues with it)


class ListLM(LM):
    def forward(self, ids, past_key_values=None):
        past = past_key_values or []
        start = past[0][0].shape[2] if past else 0
        return self.run(ids, lambda i: past[i] if i < len(past) else None, start)


def _nest(model, seed=0):
    nest = sn.wrap(model, sn.Depth("depth", [1, 2, 4], layers="blocks"),
                   sn.Heads("heads", [2, 4], attn="blocks.*.attn"),
                   sn.Width("ffn", [8, 32], out="blocks.*.fc1", inp="blocks.*.fc2"),
                   example=torch.randint(0, V, (2, 6)))
    return model, nest


def _built(cls, *args, seed=0):
    torch.manual_seed(seed)
    return _nest(cls(*args).eval())


@pytest.mark.parametrize("listed", [True, False])
def test_incremental_decoding_equals_the_full_forward(listed):
    model, nest = _built(CountedLM, listed)
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        for sub in nest.submodels:
            with nest.use(sub):
                full = model(ids)[0]
                out, cache = model(ids[:, :5])
                outs = [out]
                for t in range(5, 9):
                    out, cache = model(ids[:, t:t + 1], past_key_values=cache)
                    outs.append(out)
            torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("listed", [True, False])
def test_a_cache_object_continued_by_another_sub_model_is_right_or_refused(listed):
    model, nest = _built(CountedLM, listed)
    ids = torch.randint(0, V, (2, 6))
    for a, b in itertools.permutations(nest.submodels, 2):
        with torch.no_grad():
            with nest.use(a):
                _, cache = model(ids[:, :5])
            with nest.use(b):
                fresh = model(ids)[0][:, -1:]
                try:
                    out = model(ids[:, 5:], past_key_values=cache)[0]
                except sn.SortedNetError as e:
                    out, err = None, e
                else:
                    err = None
        if all(a[n] == b[n] for n in ("heads", "ffn")) and b["depth"] <= a["depth"]:  # a prefix of its layers
            assert err is None, (a, b, err)
            torch.testing.assert_close(out, fresh, atol=1e-5, rtol=1e-5)
        else:  # other keys and values, or layers that missed the prompt
            assert err is not None, (a, b, (out - fresh).abs().max())


@settings(max_examples=25, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([1, 2, 4]), st.integers(1, 2), st.integers(0, 1)), min_size=2,
                      max_size=6),
       listed=st.booleans())
def test_a_decode_loop_over_depths_and_crops_never_mixes_silently(steps, listed):
    """Any sequence of depths continuing one cache object, with relative crops between steps: each step either
    equals that depth's fresh forward on the positions the cache holds plus the new ones, or is refused."""
    model, nest = _built(CountedLM, listed, seed=1)
    ids = torch.randint(0, V, (1, 24))
    n, cache = 0, None
    with torch.no_grad():
        for depth, t, crop in steps:
            if cache is not None and crop and n > 1:
                cache.crop(1)
                n -= 1
            with nest.use(f"depth={depth}"):
                try:
                    out, cache2 = model(ids[:, n:n + t], past_key_values=cache)
                except sn.SortedNetError:
                    n, cache = 0, None
                    continue
                torch.testing.assert_close(out, model(ids[:, :n + t])[0][:, n:], atol=1e-5, rtol=1e-5)
            n, cache = n + t, cache2


def test_a_cache_object_without_layers_refuses_a_deeper_depth_after_a_crop():
    """Listed layers show that the crop left layers 2-3 a position short; unlisted ones cannot: refused."""
    for listed, match in ((True, "layer 2 holds 5 positions"), (False, "does not list its layers")):
        model, nest = _built(CountedLM, listed)
        ids = torch.randint(0, V, (1, 7))
        with torch.no_grad():
            with nest.use("depth=4"):
                _, cache = model(ids[:, :5])
                out, cache = model(ids[:, 5:6], past_key_values=cache)  # made in the forward: recorded
                torch.testing.assert_close(out, model(ids[:, :6])[0][:, -1:], atol=1e-5, rtol=1e-5)
            with nest.use("depth=2"):
                _, cache = model(ids[:, 6:7], past_key_values=cache)
            cache.crop(1)  # layers 0-1 hold 6 positions, layers 2-3 hold 5 (7, 6 before)
            with nest.use("depth=4"), pytest.raises(sn.SortedNetError, match=match):
                model(ids[:, 6:7], past_key_values=cache)


class Logits(nn.Module):
    """A wrapper returning the logits alone: sorting verifies them, not the cache (whose heads it reorders)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids)[0]


def test_a_cache_object_from_before_a_sort_is_refused_and_a_model_returning_its_cache_sorts():
    torch.manual_seed(0)
    model = ListLM().eval()
    ids = torch.randint(0, V, (1, 6))
    dims = lambda p: (sn.Heads("heads", [2, 4], attn=f"{p}blocks.*.attn"),  # noqa: E731
                      sn.Width("ffn", [8, 32], out=f"{p}blocks.*.fc1", inp=f"{p}blocks.*.fc2"))
    nest = sn.wrap(model, *dims(""), example=ids)
    with torch.no_grad():
        before = model(ids)[0]
    sort_units(nest, "l1", example=ids)  # (the returned cache's heads move with the weights: compared up to that)
    with torch.no_grad():
        logits, cache = model(ids[:, :5])
        torch.testing.assert_close(model(ids)[0], before, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(ids[:, 5:6], past_key_values=cache)[0][:, -1], before[:, -1],
                                   rtol=1e-4, atol=1e-4)
    nest.unwrap()
    torch.manual_seed(0)
    counted = CountedLM().eval()
    nest = sn.wrap(Logits(counted), *dims("lm."), example=ids)  # the guard sits on the model inside the wrapper
    with torch.no_grad():
        _, cache = counted(ids[:, :5])
    sort_units(nest, "l1", example=ids)
    with torch.no_grad(), pytest.raises(sn.SortedNetError, match="re-ordered"):
        counted(ids[:, 5:6], past_key_values=cache)


def test_plain_tensor_caches_are_said_once_never_refused():
    """A list of (k, v) passed as a cache-named argument: one UnfollowedCacheWarning, and no sub-model is refused
    (such an argument may hold what rightly crosses sub-models; a list cache is yours to renew); sortednet's own
    runs (check, profile, export) work on such a model."""
    torch.manual_seed(0)
    model, nest = _nest(ListLM().eval())
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        with nest.use("depth=2,heads=2,ffn=8"):
            _, cache = model(ids[:, :5])
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for sub in nest.submodels:
                with nest.use(sub):
                    try:
                        model(ids[:, 5:], past_key_values=cache)
                    except RuntimeError:  # (another head count: the model's own shape error, not sortednet's)
                        assert sub["heads"] != 2
    assert sum(issubclass(w.category, UnfollowedCacheWarning) for w in record) == 1
    nest.check(ids)
    nest.profile(ids, progress=False)
    nest.export(nest.smallest)


class HeldAttn(Attn):
    """Meta's Llama reference style: the cache is the module's own buffer, written at a position."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache_k", torch.zeros(1, P, H, D // H), persistent=False)
        self.k_cache = None


def test_wrap_warns_about_caches_kept_on_modules():
    """State a module keeps between calls is not followed across sub-models: wrap says so, naming the modules."""
    torch.manual_seed(0)
    model = ListLM().eval()
    model.blocks[1].attn = HeldAttn()
    with pytest.warns(UnfollowedCacheWarning, match=r"blocks\.1\.attn\.cache_k"):
        sn.wrap(model, sn.Width("ffn", [8, 32], out="blocks.*.fc1", inp="blocks.*.fc2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnfollowedCacheWarning)
        sn.wrap(ListLM(), sn.Width("ffn", [8, 32], out="blocks.*.fc1", inp="blocks.*.fc2"))


@pytest.mark.parametrize("name, cache", [
    ("past_key_values", True), ("past", True), ("layer_past", True), ("kv_cache", True), ("cache", True),
    ("past_kv", True), ("kv", True), ("caches", True), ("use_cache", False), ("cache_position", False),
    ("past_values", False), ("past_observed_mask", False), ("attention_mask", False), ("input_ids", False)])
def test_which_arguments_take_a_cache(name, cache):
    assert is_cache_name(name) is cache


@pytest.mark.parametrize("name, cache", [
    ("k_cache", True), ("cache_v", True), ("kv_cache", True), ("key_cache", True), ("past_key_values", True),
    ("_kvcache", True), ("cos_cached", False), ("sin_cached", False), ("cache", False), ("kernel", False)])
def test_which_module_attributes_look_like_caches(name, cache):
    assert is_module_cache_name(name) is cache


def test_a_cache_from_a_nest_since_unwrapped_is_refused_by_every_later_nest():
    """Caches were stamped with id() of the nest's state: once a nest was unwrapped and freed, a later nest's state
    could get the same address, and a cache filled under the old nest (keys in another unit order after a sort)
    was continued as its own, in silence (the probe's logits 1.55 off). Stamped now with a number never reused."""
    import gc

    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    counted = CountedLM().eval()
    caches = []
    for _ in range(8):
        nest = sn.wrap(counted, sn.Heads("heads", [2, 4], attn="blocks.*.attn"),
                       sn.Width("ffn", [8, 32], out="blocks.*.fc1", inp="blocks.*.fc2"))
        with torch.no_grad():
            for cache in caches:
                with pytest.raises(sn.SortedNetError, match="did not see computed"):
                    counted(ids[:, 5:6], past_key_values=cache)
            caches.append(counted(ids[:, :5])[1])
        nest.unwrap()
        del nest
        gc.collect()


def _lengths(cache):
    return [layer.get_seq_length() for layer in cache.store]


def test_dry_runs_on_a_decode_step_leave_the_cache_alone():
    """nest.check on a decode step (a prompt's cache object in the example) ran every sub-model on the user's
    cache: each appended its positions (layer lengths 10 -> 13/11), check then refused the correct model on its
    own earlier runs, and the user's next step was refused. The calls that run the model several times refuse
    such an example before any run; a FLOPs count runs once, on a copy."""
    model, nest = _built(CountedLM)
    with torch.no_grad():
        _, cache = model(torch.randint(0, V, (2, 5)))
    step = {"ids": torch.randint(0, V, (2, 1)), "past_key_values": cache}
    before = _lengths(cache)
    for name, call in [("nest.check", lambda: nest.check(step)), ("nest.profile", lambda: nest.profile(step)),
                       ("discover()", lambda: sn.discover(CountedLM().eval(), step)),
                       ("sort_units", lambda: sort_units(nest, "l1", example=step))]:
        with pytest.raises(sn.SortedNetError, match=rf"{re.escape(name)}: the example holds a key/value cache "
                                                    r"\(at \['past_key_values'\]: Counted\)"):
            call()
        assert _lengths(cache) == before, name
    flops = nest.cost(nest.largest, "flops", example=step)  # (the sub-model that filled the cache)
    assert _lengths(cache) == before and flops > 0
    assert nest.cost(nest.largest, "flops", example=step) == flops  # (each count on a fresh copy: the same)
    with torch.no_grad(), nest.use(nest.largest):
        logits, _ = model(**step)  # the user's next step runs
    assert logits.shape == (2, 1, V)
    _, graphed = model(step["ids"].repeat(1, 5))  # (filled with gradients on: non-leaf tensors, which deepcopy
    copied = {"ids": step["ids"], "past_key_values": graphed}  # refuses; counted on detached copies)
    graphed.owner, graphed.nest = _NoCopy(), nest  # (a module or the nest the cache refers to: shared, not copied)
    assert nest.cost(nest.largest, "flops", example=copied) == flops and _lengths(graphed) == before
    with torch.no_grad(), nest.use(nest.largest):
        _, longer = model(step["ids"].repeat(1, 9))
    more = nest.cost(nest.largest, "flops", example={"ids": step["ids"], "past_key_values": longer})
    assert more > flops  # (a cache's positions are part of the count's signature: a stale count was returned)


class _NoCopy(nn.Module):
    def __deepcopy__(self, memo):
        raise AssertionError("a module the cache refers to was copied")


class _Store:
    """A cache of one's own, named as one, held by an object input (not a dict)."""

    def __init__(self):
        self.ks = [torch.randn(5, 8)]

    def get_seq_length(self):
        return sum(k.shape[0] for k in self.ks)


class _Step:
    def __init__(self, x, cache):
        self.x, self.cache = x, cache


class _Batch:
    """A batch of one's own with a get_seq_length helper: no cache."""

    def __init__(self, ids):
        self.ids = ids

    def get_seq_length(self):
        return self.ids.shape[1]


class _Dec(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, step):
        if isinstance(step, _Batch):
            return self.b(torch.relu(self.a(step.ids.float())))
        h = self.b(torch.relu(self.a(step.x)))
        step.cache.ks.append(h.detach())
        past = torch.cat(step.cache.ks)
        return (h @ past.T) @ past


def test_a_cache_inside_an_object_input_is_copied_or_refused_and_a_batch_is_not_a_cache():
    """The search for caches looked only into dicts, lists and tuples: a cache held by an object input grew under
    cost (5 -> 6 positions) and profile (-> 58), and check blamed the model; and any object with a
    get_seq_length helper was refused as a cache. Objects are searched too; a cache is one of transformers',
    named as one, or given as one; a module or the nest a cache refers to through a partial is shared by the
    copy, not copied."""
    import functools

    nest = sn.wrap(_Dec(), sn.Width("h", [16, 32], out="a", inp="b"))
    store = _Store()
    store.on_update = functools.partial(lambda model, h: None, _NoCopy())
    step = _Step(torch.randn(1, 8), store)
    assert nest.cost(nest.largest, "flops", example=step) > 0 and store.get_seq_length() == 5
    for call in (lambda: nest.profile(step), lambda: nest.check(step)):
        with pytest.raises(sn.SortedNetError, match=r"key/value cache \(at the example\.cache: _Store\)"):
            call()
        assert store.get_seq_length() == 5
    batch = _Batch(torch.randn(2, 8))
    nest.check(batch)
    assert nest.profile(batch, repeat=1, warmup=0, progress=False)


_FAST = object()


class _KVCache:
    def __init__(self):
        self.k = []

    def get_seq_length(self):
        return 0


class _Logger:
    def __init__(self):
        self.lock = threading.Lock()


class _Sentinel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x, kv_cache=None, mode=None, log=None):
        h = self.a(x)
        if mode is not _FAST:
            h = h + self.a(x)
        return self.b(h)


def test_a_count_on_a_copied_cache_keeps_the_rest_of_the_example_as_it_is():
    """The copy made for a FLOPs count on a cache deep-copied the whole example: a sentinel compared by identity
    was another object in the copy (another count: 192 for 128), and a lock beside the cache refused the count,
    blaming the cache. Only the caches are copied now, and the containers on the way to them."""
    nest = sn.wrap(_Sentinel(), sn.Width("h", [2, 8], out="a", inp="b"))
    x = torch.randn(1, 4)
    plain = nest.cost("h=8", "flops", example={"x": x, "mode": _FAST})
    assert nest.cost("h=8", "flops", example={"x": x, "kv_cache": _KVCache(), "mode": _FAST, "log": _Logger()}) == plain


class _Appending:
    def __init__(self):
        self.k = []

    def get_seq_length(self):
        return sum(t.shape[1] for t in self.k)

    def update(self, t):
        self.k.append(t)
        return torch.cat(self.k, 1)


class _TwoWays(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x, past_key_values, state):
        past_key_values.update(x)
        return self.b(torch.relu(self.a(state["cache"].update(x))))


class _NoCopyHolder:
    def __init__(self, cache):
        self.cache = cache

    def __copy__(self):
        raise TypeError("not copyable")


def test_a_cache_reached_two_ways_is_one_copy_and_an_uncopyable_way_is_refused():
    """A cache reached through two ways into the example was copied along the first alone: the second led to the
    user's cache (appended to), or each way got its own copy (half the count). One copy per cache now, however many
    ways lead to it; a holder that cannot be copied is refused with a SortedNetError (it was a raw TypeError)."""
    nest = sn.wrap(_TwoWays(), sn.Width("h", [8, 32], out="a", inp="b"))
    x = torch.randn(1, 4, 8)
    for order in ("cache first", "state first"):
        c = _Appending()
        ex = {"x": x, "past_key_values": c, "state": {"cache": c}}
        if order == "state first":
            ex = {"state": {"cache": c}, "x": x, "past_key_values": c}
        assert nest.cost("h=32", "flops", example=ex) == 8192 and c.get_seq_length() == 0
    with pytest.raises(sn.SortedNetError, match="inside a _NoCopyHolder, which cannot be copied"):
        nest.cost("h=32", "flops", example={"x": x, "past_key_values": _Appending(),
                                             "state": _NoCopyHolder(_Appending())})


class _GrowingCache:
    """A cache of one's own (its class name says so), appended to by every run."""

    def __init__(self):
        self.k = None

    def get_seq_length(self):
        return 0 if self.k is None else self.k.shape[1]

    def update(self, k):
        self.k = k if self.k is None else torch.cat([self.k, k], 1)
        return self.k


class _Feats(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x, feats, cache):
        h = self.b(torch.relu(self.a(x + feats[0])))
        k = cache.update(h)
        return h + (h @ k.transpose(1, 2)) @ k


@pytest.mark.parametrize("many", ["tensors", "objects"])
def test_a_cache_after_thousands_of_other_entries_is_found_or_the_example_refused(many):
    """The search for a cache stopped after 2,000 entries, tensors included: a cache behind a list of 2,500
    tensors went unseen, cost ran on the user's own cache and check appended to it several times before
    refusing. Tensors are not searched now (a list of them is read whole), and an example with more than 100,000
    other objects is refused as too large to search, before any run."""
    m = _Feats()
    nest = sn.wrap(m, sn.Width("h", [2, 8], out="a", inp="b"))
    cache = _GrowingCache()
    with torch.no_grad():
        m(torch.randn(1, 3, 4), [torch.zeros(1)], cache)
    filler = [torch.zeros(1)] * 2500 if many == "tensors" else [torch.zeros(1)] + [[i] for i in range(100_001)]
    ex = {"x": torch.randn(1, 1, 4), "feats": filler, "cache": cache}
    if many == "tensors":
        assert nest.cost("h=8", "flops", example=ex) > 0
        with pytest.raises(sn.SortedNetError, match=r"nest.check: the example holds a key.value cache \(at \['cache"):
            nest.check(ex)
    else:
        with pytest.raises(sn.SortedNetError, match="more than 100,000 containers and objects.*too many to search"):
            nest.cost("h=8", "flops", example=ex)
        with pytest.raises(sn.SortedNetError, match="nest.check: the example holds more than 100,000"):
            nest.check(ex)
    assert cache.get_seq_length() == 3
    table = {"x": torch.randn(1, 1, 4), "feats": [torch.zeros(1), list(range(1_000_001))], "cache": _GrowingCache()}
    assert nest.cost("h=8", "flops", example=table) > 0  # (numbers hold no cache: never counted, never refused)
    assert table["cache"].get_seq_length() == 0  # (a copy of the cache counted on)


class _FromQueue(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x, caches):
        return self.b(torch.relu(self.a(caches[0].update(x))))


@pytest.mark.parametrize("holder", [list, tuple, collections.deque, lambda c: collections.deque(c, maxlen=4)])
def test_a_cache_in_a_deque_is_copied_like_one_in_a_list(holder):
    """A cache inside a ``collections.deque`` (a queue of per-request caches) was not searched: cost ran on the
    user's own cache and appended three positions to it. Deques are searched and copied item by item (their
    maxlen kept), as lists are."""
    nest = sn.wrap(_FromQueue(), sn.Width("h", [8, 32], out="a", inp="b"))
    x = torch.randn(1, 3, 8)
    c = _GrowingCache()
    counts = {nest.cost(s, "flops", example=(x, holder([c]))) for s in (nest.largest, nest.largest)}
    assert c.get_seq_length() == 0 and len(counts) == 1
    with pytest.raises(sn.SortedNetError, match=r"nest.profile: the example holds a key/value cache \(at \[1\]\[0\]"):
        nest.profile((x, holder([c])), metrics=("params", "flops"), repeat=1, warmup=0, progress=False)
    assert c.get_seq_length() == 0


def test_a_cache_a_shallower_sub_model_began_says_to_start_afresh():
    """A cache begun by a shallower sub-model (position 0): its deeper layers hold nothing, and the refusal said
    to crop each layer back to 0 positions, which transformers' ``crop(0)`` does not do (it keeps every
    position). With no position held by every layer, it says to start a new cache or ``reset()`` this one."""
    model, nest = _built(CountedLM, True)
    ids = torch.randint(0, V, (1, 7))
    with torch.no_grad():
        with nest.use("depth=2"):
            _, cache = model(ids[:, :5])
        with nest.use("depth=4"), pytest.raises(sn.SortedNetError, match=r"depth=2 ran on this cache at position "
                                                                        r"0.*Start a new cache, or empty this one"):
            model(ids[:, 5:6], past_key_values=cache)

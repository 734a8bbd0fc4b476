"""Key/value caches of hand-written language models (not Hugging Face): a cache filled by one sub-model and continued
by another is either right (a shallower depth runs a prefix of the same layers) or refused with a SortedNetError,
never a silent mix of two models.

The caches come in the styles hand-written decoders use: a list of ``(k, v)`` tuples returned and passed back (as
``past_key_values=``, by position as ``past``, or in a dict ``kv_cache=``), an object of the model's own holding
lists, and per-layer tensors preallocated and written in place at a position. Outputs are compared with a tolerance
(an incremental forward sums in another order than the full one)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sortednet as sn
from sortednet.importance import sort_units
from sortednet.kvcache import ModuleCacheWarning, is_cache_name, is_module_cache_name

D, H, FFN, L, V, P = 16, 4, 32, 4, 23, 32


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_heads, self.head_dim = H, D // H
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, past, start, style):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if style == "inplace":  # preallocated (B, heads, P, head_dim), written at [start, start + T)
            if past is None:
                past = (k.new_zeros(B, k.shape[1], P, self.head_dim), v.new_zeros(B, v.shape[1], P, self.head_dim))
            past[0][:, :, start:start + T] = k
            past[1][:, :, start:start + T] = v
            k, v, kv = past[0][:, :, :start + T], past[1][:, :, :start + T], past
        else:
            if past is not None:
                k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            kv = (k, v)
        S = k.shape[2]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(T, S, dtype=torch.bool).tril(S - T))
        return self.o(y.transpose(1, 2).reshape(B, T, -1)), kv


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2, self.attn = nn.LayerNorm(D), nn.LayerNorm(D), Attn()
        self.fc1, self.fc2 = nn.Linear(D, FFN), nn.Linear(FFN, D)

    def forward(self, x, past, start, style):
        a, kv = self.attn(self.n1(x), past, start, style)
        x = x + a
        return x + self.fc2(F.gelu(self.fc1(self.n2(x)))), kv


class Store:
    """A cache object of the model's own: lists per layer, no ``get_seq_length``."""

    def __init__(self):
        self.k, self.v = [], []


class LM(nn.Module):
    def __init__(self, style):
        super().__init__()
        self.style = style
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(P, D)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.head = nn.Linear(D, V)

    def run(self, ids, layers, start):
        """``layers(i)``: layer i's past or None; returns logits and the per-layer caches."""
        x = self.wte(ids) + self.wpe(torch.arange(start, start + ids.shape[1]))
        new = []
        for i, b in enumerate(self.blocks):
            x, kv = b(x, layers(i), start, self.style)
            new.append(kv)
        return self.head(x), new


class ListLM(LM):
    def forward(self, ids, past_key_values=None):
        past = past_key_values or []
        start = past[0][0].shape[2] if past else 0
        return self.run(ids, lambda i: past[i] if i < len(past) else None, start)


class PositionalLM(LM):
    def forward(self, ids, past=None):
        past = past or ()
        start = past[0][0].shape[2] if past else 0
        logits, new = self.run(ids, lambda i: past[i] if i < len(past) else None, start)
        return logits, tuple(new)


class DictLM(LM):
    def forward(self, ids, kv_cache=None):
        kv_cache = kv_cache or {}
        start = kv_cache["0"][0].shape[2] if kv_cache else 0
        logits, new = self.run(ids, lambda i: kv_cache.get(str(i)), start)
        return {"logits": logits, "kv_cache": {str(i): kv for i, kv in enumerate(new)}}


class StoreLM(LM):
    def forward(self, ids, cache: Store | None = None):
        store = cache if cache is not None else Store()
        start = store.k[0].shape[2] if store.k else 0
        logits, new = self.run(ids, lambda i: (store.k[i], store.v[i]) if i < len(store.k) else None, start)
        for i, (k, v) in enumerate(new):  # in place: the object is the cache
            if i < len(store.k):
                store.k[i], store.v[i] = k, v
            else:
                store.k.append(k)
                store.v.append(v)
        return logits, store


class InplaceLM(LM):
    def __init__(self):
        super().__init__("inplace")

    def forward(self, ids, layer_past=None, start=0):
        past = layer_past or []
        logits, new = self.run(ids, lambda i: past[i] if i < len(past) else None, start)
        for i, kv in enumerate(new):  # (a depth that stops early leaves the deeper layers' tensors as they were)
            if i >= len(past):
                past.append(kv)
        return logits, past


STYLES = {"list": lambda: ListLM("list"), "positional": lambda: PositionalLM("list"),
          "dict": lambda: DictLM("list"), "store": lambda: StoreLM("list"), "inplace": InplaceLM}


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out[0]


def _step(model, style, ids, cache, start):
    """One call continuing ``cache`` (None: a prompt); returns (logits, the cache to continue)."""
    if style == "list":
        out = model(ids, past_key_values=cache)
    elif style == "positional":
        out = model(ids, cache)
    elif style == "dict":
        out = model(ids, kv_cache=cache)
    elif style == "store":
        out = model(ids, cache=cache)
    else:
        out = model(ids, layer_past=cache, start=start)
    return _logits(out), (out["kv_cache"] if isinstance(out, dict) else out[1])


def _nest(style, seed=0):
    torch.manual_seed(seed)
    model = STYLES[style]().eval()
    nest = sn.wrap(model, sn.Depth("depth", [1, 2, 4], layers="blocks"),
                   sn.Heads("heads", [2, 4], attn="blocks.*.attn"),
                   sn.Width("ffn", [8, 32], out="blocks.*.fc1", inp="blocks.*.fc2"),
                   example=torch.randint(0, V, (2, 6)))
    return model, nest


def _switch(model, nest, style, ids, a, b, n=5):
    """A prompt of ``n`` tokens under ``a``, one more token under ``b``: (logits, b's fresh logits) or the error."""
    with torch.no_grad():
        with nest.use(a):
            _, cache = _step(model, style, ids[:, :n], None, 0)
        with nest.use(b):
            fresh = _logits(model(ids[:, :n + 1]))[:, -1:]
            try:
                out, _ = _step(model, style, ids[:, n:n + 1], cache, n)
            except sn.SortedNetError as e:
                return None, fresh, e
    return out, fresh, None


@pytest.mark.parametrize("style", list(STYLES))
def test_incremental_decoding_equals_the_full_forward(style):
    model, nest = _nest(style)
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        for sub in nest.submodels:
            with nest.use(sub):
                full = _logits(model(ids))
                out, cache = _step(model, style, ids[:, :5], None, 0)
                outs = [out]
                for t in range(5, 9):
                    out, cache = _step(model, style, ids[:, t:t + 1], cache, t)
                    outs.append(out)
            torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", list(STYLES))
def test_a_cache_continued_by_another_sub_model_is_right_or_refused(style):
    model, nest = _nest(style)
    ids = torch.randint(0, V, (2, 6))
    for a, b in itertools.permutations(nest.submodels, 2):
        out, fresh, err = _switch(model, nest, style, ids, a, b)
        same_widths = all(a[n] == b[n] for n in ("heads", "ffn"))
        if same_widths and b["depth"] <= a["depth"]:  # a prefix of the layers that filled it: right, not refused
            assert err is None, (a, b, err)
            torch.testing.assert_close(out, fresh, atol=1e-5, rtol=1e-5)
        else:  # other keys and values, or layers that missed the prompt
            assert err is not None, (a, b, (out - fresh).abs().max())
            assert "computed by sub-model" in str(err) and "Start a new cache" in str(err)


@settings(max_examples=25, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([1, 2, 4]), st.integers(1, 2)), min_size=2, max_size=5),
       style=st.sampled_from(list(STYLES)))
def test_a_decode_loop_over_depths_never_mixes_silently(steps, style):
    """Any sequence of depths continuing one cache: each step either equals that depth's fresh forward on the whole
    sequence so far, or is refused (and the loop starts over)."""
    model, nest = _nest(style, seed=1)
    ids = torch.randint(0, V, (1, 16))
    n, cache = 0, None
    with torch.no_grad():
        for depth, t in steps:
            sub = f"depth={depth}"
            with nest.use(sub):
                try:
                    out, cache2 = _step(model, style, ids[:, n:n + t], cache, n)
                except sn.SortedNetError:
                    n, cache = 0, None
                    continue
                torch.testing.assert_close(out, _logits(model(ids[:, :n + t]))[:, n:], atol=1e-5, rtol=1e-5)
            n, cache = n + t, cache2


def test_a_cache_zeroed_by_the_user_is_theirs_again():
    """A preallocated cache written in place by the user between calls (``zero_()``) is taken as reset: a new
    prompt from position 0 under another sub-model runs, and is right."""
    model, nest = _nest("inplace")
    ids = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        with nest.use("depth=4,heads=4,ffn=8"):
            _, cache = _step(model, "inplace", ids[:, :5], None, 0)
        with nest.use("depth=4,heads=4,ffn=32"):
            with pytest.raises(sn.SortedNetError, match="other widths"):
                _step(model, "inplace", ids[:, :5], cache, 0)
            for k, v in cache:
                k.zero_()
                v.zero_()
            out, _ = _step(model, "inplace", ids[:, :5], cache, 0)
            torch.testing.assert_close(out, _logits(model(ids[:, :5])), atol=1e-5, rtol=1e-5)


def test_inference_mode_caches_keep_the_shallowest_depth():
    """Tensors made under ``torch.inference_mode`` have no version counter: whether a shallower step wrote them is
    unknown, so the deeper continuation is refused for every layer the shallower step was given."""
    model, nest = _nest("inplace")
    ids = torch.randint(0, V, (1, 8))
    with torch.inference_mode():
        with nest.use("depth=4"):
            _, cache = _step(model, "inplace", ids[:, :5], None, 0)
        with nest.use("depth=2"):
            out, cache = _step(model, "inplace", ids[:, 5:6], cache, 5)
            torch.testing.assert_close(out, _logits(model(ids[:, :6]))[:, -1:], atol=1e-5, rtol=1e-5)
        with nest.use("depth=4"), pytest.raises(sn.SortedNetError, match="depth=2"):
            _step(model, "inplace", ids[:, 6:7], cache, 6)


class Logits(nn.Module):
    """A wrapper returning the logits alone: sorting verifies them, not the cache (whose heads it reorders)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids)[0]


def test_a_cache_in_the_old_unit_order_is_refused():
    torch.manual_seed(0)
    model = ListLM("list").eval()
    dims = (sn.Heads("heads", [2, 4], attn="blocks.*.attn"), sn.Width("ffn", [8, 32], out="blocks.*.fc1",
                                                                       inp="blocks.*.fc2"))
    ids = torch.randint(0, V, (1, 6))
    nest = sn.wrap(model, *dims, example=ids)
    with torch.no_grad():
        _, cache = _step(model, "list", ids[:, :5], None, 0)
    with pytest.raises(sn.SortedNetError, match="returns its key/value cache"):  # (the cache's heads move)
        sort_units(nest, "l1", example=ids)
    nest.unwrap()
    wrapped = Logits(model)
    nest = sn.wrap(wrapped, *(sn.Heads("heads", [2, 4], attn="lm.blocks.*.attn"),
                              sn.Width("ffn", [8, 32], out="lm.blocks.*.fc1", inp="lm.blocks.*.fc2")), example=ids)
    with torch.no_grad():
        _, cache = _step(model, "list", ids[:, :5], None, 0)
    sort_units(nest, "l1", example=ids)
    with torch.no_grad(), pytest.raises(sn.SortedNetError, match="old order"):
        _step(model, "list", ids[:, 5:6], cache, 5)


class Counted:
    """A cache object of the model's own that counts its positions (layer 0's), without transformers' ``.layers``."""

    def __init__(self):
        self.k, self.v = [], []

    def get_seq_length(self, layer=0):
        return self.k[layer].shape[2] if len(self.k) > layer else 0

    def crop(self, n):  # relative: the same count off every layer
        self.k = [k[:, :, :k.shape[2] - n] for k in self.k]
        self.v = [v[:, :, :v.shape[2] - n] for v in self.v]


class CountedLM(LM):
    def forward(self, ids, past_key_values=None):
        store = past_key_values if past_key_values is not None else Counted()
        start = store.get_seq_length()
        logits, new = self.run(ids, lambda i: (store.k[i], store.v[i]) if i < len(store.k) else None, start)
        for i, (k, v) in enumerate(new):
            if i < len(store.k):
                store.k[i], store.v[i] = k, v
            else:
                store.k.append(k)
                store.v.append(v)
        return logits, store  # (made here and returned in a plain tuple: the decode loop continues with it)


def test_a_cache_object_without_layers_refuses_a_deeper_depth_after_a_crop():
    torch.manual_seed(0)
    model = CountedLM("list").eval()
    nest = sn.wrap(model, sn.Depth("depth", [2, 4], layers="blocks"))
    ids = torch.randint(0, V, (1, 7))
    with torch.no_grad():
        with nest.use("depth=4"):
            _, cache = model(ids[:, :5])
            out, cache = model(ids[:, 5:6], past_key_values=cache)  # made in the forward, recorded: same sub-model
            torch.testing.assert_close(out, model(ids[:, :6])[0][:, -1:], atol=1e-5, rtol=1e-5)
        with nest.use("depth=2"):
            _, cache = model(ids[:, 6:7], past_key_values=cache)
        cache.crop(1)  # layers 0-1 hold 6 positions, layers 2-3 hold 5
        with nest.use("depth=4"), pytest.raises(sn.SortedNetError, match="does not list its layers"):
            model(ids[:, 6:7], past_key_values=cache)


@pytest.mark.parametrize("name, cache", [
    ("past_key_values", True), ("past", True), ("layer_past", True), ("kv_cache", True), ("cache", True),
    ("past_kv", True), ("kv", True), ("caches", True), ("use_cache", False), ("cache_position", False),
    ("past_values", False), ("past_observed_mask", False), ("attention_mask", False), ("input_ids", False)])
def test_which_arguments_take_a_cache(name, cache):
    assert is_cache_name(name) is cache


class HeldAttn(Attn):
    """Meta's Llama reference style: the cache is the module's own buffer, written at a position."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache_k", torch.zeros(1, P, H, D // H), persistent=False)
        self.k_cache = None


def test_wrap_warns_about_caches_kept_on_modules():
    """State a module keeps between calls is not followed across sub-models: wrap says so, naming the modules."""
    torch.manual_seed(0)
    model = ListLM("list").eval()
    model.blocks[1].attn = HeldAttn()
    with pytest.warns(ModuleCacheWarning, match=r"blocks\.1\.attn\.cache_k"):
        sn.wrap(model, sn.Width("ffn", [8, 32], out="blocks.*.fc1", inp="blocks.*.fc2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModuleCacheWarning)
        sn.wrap(ListLM("list"), sn.Width("ffn", [8, 32], out="blocks.*.fc1", inp="blocks.*.fc2"))


@pytest.mark.parametrize("name, cache", [
    ("k_cache", True), ("cache_v", True), ("kv_cache", True), ("key_cache", True), ("past_key_values", True),
    ("_kvcache", True), ("cos_cached", False), ("sin_cached", False), ("cache", False), ("kernel", False)])
def test_which_module_attributes_look_like_caches(name, cache):
    assert is_module_cache_name(name) is cache

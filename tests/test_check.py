"""nest.check / wrap(example=): each wiring mistake of the table is caught with a
message naming the module and the missing binding; a correct nest passes; a
failed wrap(example=) leaves the model exactly as it was."""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import math
import re
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import arch
import sortednet as sn
from models import FAMILIES, InterruptAt, assert_unchanged, interrupted, snapshot
from sortednet.check import UnfollowedOpWarning


@functools.cache
def _specs(name: str) -> tuple:
    model, x = _build(name)
    return tuple(d.spec() for d in sn.discover(model, x, ratios=[0.5, 1.0]))


def _build(name: str):
    if name in arch.ARCHS:
        return arch.build(name)
    case = FAMILIES[name]()
    return case.model.eval(), case.example


def _dims(name: str) -> list:
    return [sn.dims.dimension_from_spec(s) for s in _specs(name)]


def listed(dims) -> list[dict]:
    """Full, smallest, and each dimension alone at its smallest (what check dry-runs)."""
    return [{}, {d.name: d.sizes[0] for d in dims}, *({d.name: d.sizes[0]} for d in dims)]


def drop(path: str, *roles: str):
    """The discovered declarations with ``path`` removed from ``roles`` of the Width that lists it."""

    def edit(specs: list[dict]) -> list[dict]:
        hit = [s for s in specs if s["kind"] == "width" and any(path in s[r] for r in roles)]
        assert hit, (path, roles)
        for s in hit:
            for r in roles:
                s[r] = [p for p in s[r] if p != path]
        return specs

    return edit


def add(role: str, path: str, size: int = 2):
    def edit(specs: list[dict]) -> list[dict]:
        return [*specs, {"kind": "width", "name": "extra", "sizes": [size, _full(path, role)], "out": [path],
                         "inp": [], "norm": []}]

    return edit


def _full(path, role):
    return 5  # mlp's fc3 has 5 classes


def split(path: str):
    """The Width listing ``path`` under out= split in two dimensions (``path`` alone in the second)."""

    def edit(specs: list[dict]) -> list[dict]:
        s = next(s for s in specs if s["kind"] == "width" and path in s["out"])
        s["out"] = [p for p in s["out"] if p != path]
        return [*specs, {**s, "name": s["name"] + "_b", "out": [path], "inp": [], "norm": [],
                         "sizes": [s["sizes"][0] * 2 if s["sizes"][0] * 2 < s["sizes"][-1] else 1, s["sizes"][-1]]}]

    return edit


# (architecture, edit of its discovered declarations, text the error must contain)
MISTAKES = [
    ("resnet18", drop("layer2.0.downsample.0", "out"), "out='layer2.0.downsample.0'"),       # downsample branch
    ("resnet18", drop("layer2.0.downsample.1", "norm"), "norm='layer2.0.downsample.1'"),     # its BatchNorm
    ("resnet18", drop("layer1.0.bn1", "norm"), "norm='layer1.0.bn1'"),                         # forgotten norm=
    ("resnet18", drop("layer1.0.conv2", "inp"), "inp='layer1.0.conv2'"),                       # out= without inp=
    ("resnet18", drop("layer1.0.conv2", "out"), "out='layer1.0.conv2'"),                       # residual partner
    ("resnet50", drop("layer1.0.downsample.0", "inp"), "inp='layer1.0.downsample.0'"),         # stem -> downsample
    ("mobilenet_v3", drop("features.1.block.1.fc1", "inp"), "inp='features.1.block.1.fc1'"),  # SE squeeze input
    ("mobilenet_v3", drop("features.1.block.1.fc2", "out"), "out='features.1.block.1.fc2'"),  # SE scale
    ("mobilenet_v2", drop("features.2.conv.1.0", "out", "inp"), "features.2.conv.1.0"),       # depthwise conv
    ("efficientnet_b0", drop("features.2.0.block.1.1", "norm"), "norm='features.2.0.block.1.1'"),
    ("cnn_bn_residual", drop("gn", "norm"), "norm='gn'"),                                      # GroupNorm
    ("mlp", drop("ln", "norm"), "norm='ln'"),                                                  # LayerNorm
    ("lm_width_heads_depth", drop("blocks.1.attn.k", "inp"), "inp='blocks.1.attn.k'"),         # one of q/k/v
    ("torch_encoder", drop("enc.layers.0.self_attn", "inp"), "inp='enc.layers.0.self_attn'"),  # MHA embed dim
    ("mlp", add("out", "fc3"), "'fc3'"),                                                       # classes sliced
    ("resnet18", split("layer1.0.conv2"), "must shrink together"),                             # two dims, one group
]


@pytest.mark.parametrize("name,edit,text", MISTAKES, ids=[f"{m[0]}-{m[2][:30]}" for m in MISTAKES])
def test_check_names_the_missing_binding(name, edit, text):
    model, x = _build(name)
    dims = [sn.dims.dimension_from_spec(s) for s in edit([dict(s) for s in _specs(name)])]
    nest = sn.wrap(model, *dims, submodels=listed(dims))
    with pytest.raises(sn.SortedNetError) as err:
        nest.check(x)
    assert text in str(err.value), str(err.value)
    assert "nest.check" in str(err.value)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3", "lm_width_heads_depth"])
def test_wrap_with_example_leaves_the_model_as_it_was_on_failure(name):
    model, x = _build(name)
    snap = snapshot(model)
    was = [m.training for m in model.modules()]
    dims = [sn.dims.dimension_from_spec(s) for s in MISTAKES[[m[0] for m in MISTAKES].index(name)][1](
        [dict(s) for s in _specs(name)])]
    with pytest.raises(sn.SortedNetError, match="nest.check"):
        sn.wrap(model, *dims, submodels=listed(dims), example=x)
    assert_unchanged(model, snap)
    assert [m.training for m in model.modules()] == was
    dims = _dims(name)
    nest = sn.wrap(model, *dims, submodels=listed(dims), example=x)  # the same model wraps fine afterwards
    assert nest.active == nest.largest


def test_check_keeps_training_mode_and_weights():
    model, x = _build("resnet18")
    model.train()
    dims = _dims("resnet18")
    nest = sn.wrap(model, *dims, submodels=listed(dims))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nest.check(x)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _SplitAttn(torch.nn.Module):
    """Self-attention over q/k/v/o Linears; ``heads_fast`` splits features as "(d h)" (heads the fast
    axis) instead of the usual "(h d)": its first features are not its first heads."""

    def __init__(self, heads_fast: bool, d: int = 16, h: int = 4):
        super().__init__()
        self.num_heads, self.heads_fast = h, heads_fast
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def split(self, t):
        B, N, _ = t.shape
        if self.heads_fast:
            return t.view(B, N, -1, self.num_heads).permute(0, 3, 1, 2)
        return t.view(B, N, self.num_heads, -1).transpose(1, 2)

    def merge(self, a):
        B, _, N, _ = a.shape
        return (a.permute(0, 2, 3, 1) if self.heads_fast else a.transpose(1, 2)).reshape(B, N, -1)

    def forward(self, x):
        a = torch.nn.functional.scaled_dot_product_attention(self.split(self.q(x)), self.split(self.k(x)),
                                                             self.split(self.v(x)))
        return self.o(self.merge(a))


class _MaskedSplitAttn(_SplitAttn):
    """The same attention with a mask argument: wrap cannot run it alone, check(example) measures it."""

    def forward(self, x, mask):
        a = torch.nn.functional.scaled_dot_product_attention(self.split(self.q(x)), self.split(self.k(x)),
                                                             self.split(self.v(x)), attn_mask=mask)
        return self.o(self.merge(a))


class _AttnNet(torch.nn.Module):
    def __init__(self, heads_fast: bool, masked: bool = False):
        super().__init__()
        self.masked = masked
        att = (_MaskedSplitAttn if masked else _SplitAttn)(heads_fast)
        self.inp, self.att, self.out = torch.nn.Linear(5, 16), att, torch.nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        if self.masked:
            return self.out(h + self.att(h, torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()))
        return self.out(h + self.att(h))


@pytest.mark.parametrize("masked", [False, True], ids=["runs_alone", "needs_a_mask"])
@pytest.mark.parametrize("heads_fast", [False, True])
def test_heads_must_be_whole_heads(heads_fast, masked):
    """A Heads sub-model must equal the full model with the other heads' outputs masked. discover
    proposes Heads only where that holds; wrap refuses a hand-declared Heads where it does not and the
    attention runs alone on one tensor; check (with the user's example) refuses the others."""
    torch.manual_seed(0)
    model, x = _AttnNet(heads_fast, masked).eval(), torch.randn(2, 6, 5)
    found = [d for d in sn.discover(model, x, ratios=[0.5, 1.0]) if d.kind == "heads"]
    assert [d.spec()["attn"] for d in found] == ([] if heads_fast else [["att"]])
    before = snapshot(model)
    if heads_fast and not masked:
        with pytest.raises(sn.SortedNetError, match="at 'att' .*not the first 2 whole heads"):
            sn.wrap(model, sn.Heads("h", [2, 4], attn="att"))
        assert_unchanged(model, before)
        return
    nest = sn.wrap(model, sn.Heads("h", [2, 4], attn="att"))
    if heads_fast:
        with pytest.raises(sn.SortedNetError, match="not the first 2 whole heads.*att.o"):
            nest.check(x)
    else:
        nest.check(x)
    nest.unwrap()
    assert_unchanged(model, before)


class _CosineAttn(torch.nn.Module):
    """Cosine-similarity attention: ``mixed`` normalises q and k over ALL heads before splitting them (a head's
    scores depend on the others: not whole heads), else per head (whole heads). ``zero``: the query projection
    (muP) or the output projection (ReZero / adaLN-Zero / guided diffusion) starts at zero."""

    def __init__(self, mixed: bool, zero: str | None, E=32, H=4):
        super().__init__()
        self.num_heads, self.head_dim, self.mixed = H, E // H, mixed
        self.q, self.k, self.v, self.o = (torch.nn.Linear(E, E) for _ in range(4))
        if zero is not None:
            torch.nn.init.zeros_(getattr(self, zero).weight)
            torch.nn.init.zeros_(getattr(self, zero).bias)

    def forward(self, x, mask=None):
        B, T, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        split = [t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v)]
        if self.mixed:
            q, k = (torch.nn.functional.normalize(t, dim=-1) * 4 for t in (q, k))
            split[:2] = [t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k)]
        else:
            split[:2] = [torch.nn.functional.normalize(t, dim=-1) * 4 for t in split[:2]]
        a = torch.nn.functional.scaled_dot_product_attention(*split, attn_mask=mask, scale=1.0)
        return self.o(a.transpose(1, 2).reshape(B, T, -1))


class _MaskedCosine(_CosineAttn):
    def forward(self, x, mask):  # (a second argument: wrap cannot run it alone; check(example) measures it)
        return super().forward(x, mask)


class _CosineNet(torch.nn.Module):
    def __init__(self, att):
        super().__init__()
        self.att = att

    def forward(self, x, mask=None):
        return x + (self.att(x) if mask is None else self.att(x, mask))


@pytest.mark.parametrize("alone", [True, False], ids=["runs_alone", "needs_a_mask"])
@pytest.mark.parametrize("zero", [None, "q", "o"])
def test_zero_initialised_projections_neither_hide_nor_fake_a_heads_layout(zero, alone):
    """With the query projection at zero every head attends uniformly, so whole heads measured on the model's
    own weights passed a layout that mixes heads in q / k (wrap and check(example) accepted it; once training
    moved q, heads=1 was 0.57 off the full model's first head). With the output projection at zero the attention's
    output was constant, and check(example) refused a right layout as 'attention over one key position'. Whole
    heads are measured again with random stand-ins for all-zero weights (the model's own are not touched)."""
    x, mask = torch.randn(2, 7, 32), torch.ones(7, 7, dtype=torch.bool).tril()
    example = x if alone else (x, mask)
    for mixed in (False, True):
        torch.manual_seed(0)
        model = _CosineNet((_CosineAttn if alone else _MaskedCosine)(mixed, zero))
        before = snapshot(model)
        if not mixed:
            nest = sn.wrap(model, sn.Heads("h", [1, 2, 4], attn="att"), example=example)
            with torch.no_grad(), nest.use("h=2"):
                torch.testing.assert_close(model(*example) if not alone else model(x),
                                           nest.export("h=2")(*example) if not alone else nest.export("h=2")(x))
            nest.unwrap()
            assert_unchanged(model, before)
            continue
        stand_in = "" if zero != "q" else r".*random stand-ins for the all-zero \['att.q.weight'\]"
        if alone:
            with pytest.raises(sn.SortedNetError, match=f"(?s)1 heads are not the first 1 whole heads{stand_in}"):
                sn.wrap(model, sn.Heads("h", [1, 2, 4], attn="att"))
        else:
            with pytest.raises(sn.SortedNetError, match=f"(?s)heads 'h' at 1 is not the first 1 whole heads"
                                                        f"{stand_in}"):
                sn.wrap(model, sn.Heads("h", [1, 2, 4], attn="att"), example=example)
        assert_unchanged(model, before)


class _NamedQkvInterleaved(torch.nn.Module):
    """A child named ``qkv`` (read as stacked [q; k; v]) whose rows are per-head [q_h, k_h, v_h]."""

    def __init__(self, E=32, H=4):
        super().__init__()
        self.num_heads, self.head_dim = H, E // H
        self.qkv, self.proj = torch.nn.Linear(E, 3 * E), torch.nn.Linear(E, E)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, self.num_heads, 3 * self.head_dim).transpose(1, 2).chunk(3, -1)
        return self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))


class _Separate(torch.nn.Module):
    def __init__(self, E=32, H=4, count="num_heads", alibi=False, embed_dim=False):
        super().__init__()
        setattr(self, count, H)
        self.count, self.alibi, self.E = count, alibi, (E if embed_dim else None)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(E, E) for _ in range(4))

    def forward(self, x):
        B, T, _ = x.shape
        h = getattr(self, self.count)
        q, k, v = (p(x).view(B, T, h, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        bias = None
        if self.alibi:  # per-head slopes computed from the head count
            slopes = 2.0 ** (-8.0 * torch.arange(1, h + 1) / h)
            pos = torch.arange(T)
            bias = -(pos[None, :] - pos[:, None]).abs() * slopes[:, None, None]
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
        return self.o(a.reshape(B, T, self.E if self.E is not None else -1))


@pytest.mark.parametrize("build, needle", [
    (_NamedQkvInterleaved, "not the first 2 whole heads"),
    (lambda: _Separate(alibi=True), "not the first 2 whole heads"),
    (lambda: _Separate(count="nh"), "not the first 2 whole heads"),
    (lambda: _Separate(embed_dim=True), "runs at 4 heads but fails at 2"),
], ids=["qkv_name_interleaved", "alibi_from_count", "unknown_count_name", "reshape_to_embed_dim"])
def test_wrap_runs_hand_written_attention_alone_and_refuses_what_is_not_whole_heads(build, needle):
    """Layouts Heads cannot know from the module's names (a guess would give other heads than the first),
    found at wrap without an example by running the attention alone; the model is left as it was."""
    torch.manual_seed(0)
    for where in ("", "att"):
        model = build() if not where else torch.nn.ModuleDict({"att": build()})
        before = snapshot(model)
        with pytest.raises(sn.SortedNetError, match=needle):
            sn.wrap(model, sn.Heads("h", [2, 4], attn=where))
        assert_unchanged(model, before)
        assert not any("_sn" in m.__dict__ for m in model.modules())


class _ToOut(_Separate):
    """The output projection inside a container (vit-pytorch's ``to_out = Sequential(Linear, Dropout)``)."""

    def __init__(self):
        super().__init__()
        self.to_out = torch.nn.Sequential(self.o, torch.nn.Dropout(0.1))
        del self.o

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.to_out(a.reshape(B, T, -1))


@pytest.mark.parametrize("build, o", [(_Separate, None), (_ToOut, "to_out.0")], ids=["separate", "to_out_container"])
def test_hand_written_attention_that_is_whole_heads_wraps_without_an_example(build, o):
    torch.manual_seed(0)
    m = build().eval()
    x = torch.randn(2, 5, 32)
    kw = {} if o is None else {"o": o}
    nest = sn.wrap(m, sn.Heads("h", [2, 4], attn="", **kw))
    with nest.use("h=2"):
        torch.testing.assert_close(m(x), nest.export("h=2")(x))
    nest.unwrap()
    with torch.device("meta"):  # built on the meta device: nothing to run, nothing refused
        meta = build()
    nest = sn.wrap(meta, sn.Heads("h", [2, 4], attn="", **kw))
    assert nest.cost("h=2") < nest.cost("h=4")


class _SideEffects(torch.nn.Module):
    """A forward that counts its calls in a buffer and renormalises embedding rows in place (max_norm)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6, max_norm=1.0)
        self.fc1, self.fc2 = torch.nn.Linear(6, 16), torch.nn.Linear(16, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        with torch.no_grad():
            self.emb.weight.mul_(5)  # rows above max_norm: a lookup would shrink them

    def forward(self, ids):
        self.calls += 1
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def test_dry_runs_leave_buffers_and_weights_as_they_were():
    """discover, check and sort_units run the user's forward; whatever it does to buffers or (in-place
    renormalised) weights is undone; only sort_units' permutation itself stays."""
    from sortednet.importance import sort_units

    torch.manual_seed(0)
    model, ids = _SideEffects().eval(), torch.randint(0, 10, (4, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dims = sn.discover(model, ids, ratios=[0.5, 1.0])
    assert [d.spec()["out"] for d in dims] == [["fc1"]]
    nest = sn.wrap(model, *dims)
    nest.check(ids)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    sort_units(nest, "l1", example=ids)
    after = model.state_dict()
    assert torch.equal(after["calls"], before["calls"]) and torch.equal(after["emb.weight"], before["emb.weight"])
    assert not torch.equal(after["fc1.weight"], before["fc1.weight"])  # the permutation


def test_whole_heads_check_measures_a_sub_model_a_restricted_nest_lacks():
    """nest.check on a nest restricted to sub-models where heads never shrink alone: the measurement runs
    at those sizes anyway (plans exist for any sizes), and correct heads pass."""
    from sortednet.check import whole_units_error

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _AttnNet(False)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x) + self.mlp(x)

    torch.manual_seed(0)
    model, x = Two().eval(), torch.randn(2, 6, 5)
    nest = sn.wrap(model, sn.Heads("h", [2, 4], attn="net.att"), sn.Width("f", [8, 16], out="mlp.0", inp="mlp.2"),
                   submodels=[{"h": 4, "f": 16}, {"h": 2, "f": 8}])
    nest.check(x)
    assert whole_units_error(nest, nest.dims[0], 2, x) <= 1e-5
    full = sn.wrap(_AttnNet(False).eval(), sn.Heads("h", [2, 4], attn="att"))
    assert whole_units_error(full, full.dims[0], 2, x) <= 1e-5


class _Gate(torch.nn.Module):
    """Squeeze-excite: the gate ``se2`` has one output per channel of ``conv``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.se1, self.se2 = torch.nn.Linear(8, 4), torch.nn.Linear(4, 8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        g = torch.sigmoid(self.se2(torch.relu(self.se1(h.mean((2, 3))))))
        return self.fc((h * g[:, :, None, None]).mean((2, 3)))


@pytest.mark.parametrize("sizes", [[1, 8], [1, 4, 8], [2, 8]])
def test_a_smallest_size_of_one_cannot_hide_a_missing_binding_by_broadcasting(sizes):
    """One gate unit broadcasts over the 8 channels it should match ((B, 1) * (B, 8) is no shape error):
    check also runs such a Width at 2 units, listed or not."""
    model, x = _Gate().eval(), torch.randn(2, 3, 6, 6)
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match="gate"):
        sn.wrap(model, sn.Width("gate", sizes, out="se2"), example=x)
    assert_unchanged(model, before)
    sn.wrap(model, sn.Width("ch", sizes, out=["conv", "se2"], inp=["se1", "fc"]), example=x)  # the right one


def test_outputs_are_opened_and_one_check_cannot_see_is_refused():
    """A distribution (an RL policy's output) is opened through its tensor attributes: a Width on its
    classes is refused as for a plain tensor. An object holding no tensor attribute is refused outright."""

    class Box:
        def __init__(self, y):
            self.ys = [y]

    class Net(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out
            self.a, self.o = torch.nn.Linear(6, 8), torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.out(self.o(torch.relu(self.a(x))))

    x = torch.randn(3, 6)
    policy = Net(lambda y: torch.distributions.Categorical(logits=y))
    sn.wrap(policy, sn.Width("h", [2, 8], out="a", inp="o"), example=x)
    with pytest.raises(sn.SortedNetError, match="changes the output shapes"):
        sn.wrap(Net(lambda y: torch.distributions.Categorical(logits=y)), sn.Width("c", [2, 5], out="o"), example=x)
    nest = sn.wrap(Net(Box), sn.Width("h", [2, 8], out="a", inp="o"))
    with pytest.raises(sn.SortedNetError, match="holds no tensor that check can see"):
        nest.check(x)


class _WritesItsParameters(torch.nn.Module):
    """A forward that clips a weight in place, keeps a running centre as a frozen Parameter, rebinds a
    buffer (``self.count = self.count + 1``) and a parameter's ``.data``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = torch.nn.Linear(6, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)
        self.center = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
        self.scale = torch.nn.Parameter(torch.ones(3), requires_grad=False)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        with torch.no_grad():
            self.b.weight.clamp_(-0.1, 0.1)
            if self.training:
                self.center.mul_(0.9).add_(0.1 * x.mean())
            self.scale.data = self.scale.data.clone()  # new storage, same values
        self.count = self.count + 1
        return (self.o(torch.relu(self.b(torch.relu(self.a(x))))) - self.center) * self.scale


def test_dry_runs_undo_what_the_forward_writes_into_parameters():
    from sortednet.importance import sort_units

    torch.manual_seed(0)
    model, x = _WritesItsParameters().eval(), torch.randn(4, 6)
    before = snapshot(model)
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    dims = sn.discover(model, x, ratios=[0.5, 1.0])  # also traces in training mode
    assert dims
    assert_unchanged(model, before)
    with pytest.raises(sn.SortedNetError):
        sn.wrap(model, sn.Width("w", [2, 8], out="a"), example=x)  # b's input left out: refused
    assert_unchanged(model, before)
    nest = sn.wrap(model, *dims, example=x)
    nest.check(x)
    nest.cost(nest.smallest, "flops", example=x)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before["state"].items())
    assert {k: v.data_ptr() for k, v in state.items()} == ptrs
    sort_units(nest, "taylor", example=x, data=[x], loss_fn=lambda m, b: m(b).square().mean())
    after = model.state_dict()
    assert all(torch.equal(after[k], before["state"][k]) for k in ("center", "scale", "count"))


def test_dry_runs_restore_a_resized_buffer_and_run_higher_order_ops():
    """A cache buffer the forward grows in place (resize_) gets its shape and values back; a forward with
    torch.cond (a higher-order operator) runs under the dry run's write watch."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
            self.register_buffer("cache", torch.zeros(2))

        def forward(self, x):
            self.cache.resize_(self.cache.numel() + 1).fill_(1.0)
            h = torch.relu(self.a(x))
            h = torch.cond(h.sum() > 0, lambda t: t * 2, lambda t: t - 1, (h,))
            return self.o(h)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(4, 6)
    before = snapshot(model)
    sn.discover(model, x, ratios=[0.5, 1.0])  # runs (torch.cond is an op it does not know: fixed, left out)
    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="'cond'"):  # (an op the wiring trace does not follow: said, not refused)
        nest = sn.wrap(model, sn.Width("h", [4, 8], out="a", inp="o"), example=x)
    with pytest.warns(UserWarning, match="'cond'"):
        nest.check(x)
    assert torch.equal(model.cache, torch.zeros(2))


def test_dry_run_restores_a_parameter_whose_data_was_re_viewed():
    from sortednet.modes import dry_run

    lin = torch.nn.Linear(4, 4)
    w, before = lin.weight, lin.weight.detach().clone()
    with dry_run(lin):
        lin.weight.data = lin.weight.data.t()  # same storage and shape, other strides
    assert lin.weight is w and torch.equal(lin.weight, before)


class _FastAxisAttention(nn.Module):
    """Heads split as the FAST axis (``view(B, N, head_dim, heads)``): a prefix of features is not whole
    heads. It takes a mask, so wrap cannot run it alone: only check(example) can see the layout."""

    def __init__(self, d=16, heads=4, functional_o=False):
        super().__init__()
        self.num_heads, self.functional_o = heads, functional_o
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def split(self, t):
        B, N, _ = t.shape
        return t.view(B, N, -1, self.num_heads).permute(0, 3, 1, 2)

    def forward(self, x, mask):
        a = F.scaled_dot_product_attention(self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x)),
                                           attn_mask=mask)
        B, _, N, _ = a.shape
        y = a.permute(0, 2, 3, 1).reshape(B, N, -1)
        return F.linear(y, self.o.weight, self.o.bias) if self.functional_o else self.o(y)


class _ResidualBlock(nn.Module):
    """A pre-LayerNorm residual block over a stream of scale ``scale``."""

    def __init__(self, scale=1.0, functional_o=False):
        super().__init__()
        self.inp, self.att, self.out = nn.Linear(5, 16), _FastAxisAttention(functional_o=functional_o), nn.Linear(16, 3)
        self.ln, self.scale = nn.LayerNorm(16), scale

    def forward(self, x):
        T = x.shape[1]
        h = self.inp(x) * self.scale
        return self.out(h + self.att(self.ln(h), torch.ones(T, T, dtype=torch.bool).tril()))


@pytest.mark.parametrize("case", ["one_position", "functional_o_large_residual", "rank_factorised_o"])
def test_heads_in_the_wrong_layout_are_refused_however_the_output_projection_is_read(case):
    torch.manual_seed(0)
    model = _ResidualBlock(scale=100.0 if case == "functional_o_large_residual" else 1.0,
                           functional_o=case == "functional_o_large_residual").eval()
    dims = [sn.Heads("h", [2, 4], attn="att")]
    if case == "rank_factorised_o":  # the output projection's weight is computed: its input is masked instead
        dims.append(sn.Rank("r", [8, 16], targets="att.o", mode="lora"))
    nest = sn.wrap(model, *dims)
    x = torch.randn(2, 1 if case == "one_position" else 6, 5)
    needle = "one key position" if case == "one_position" else "not the first 2 whole heads"
    with pytest.raises(sn.SortedNetError, match=needle):
        nest.check(x)


class _TiedLM(nn.Module):
    def __init__(self, vocab=11, width=16):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(vocab, width), nn.Linear(width, width), nn.Linear(width, vocab)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.tanh(self.fc(self.emb(t))))


def test_a_tied_weight_cut_by_two_dimensions_is_refused_by_check():
    nest = sn.wrap(_TiedLM().eval(), sn.Width("a", [4, 16], out="emb", inp="fc"),
                   sn.Width("b", [4, 16], out="fc", inp="head"))
    with pytest.raises(sn.SortedNetError, match=r"'emb\.weight' and 'head\.weight' are one tensor.*bind both"):
        nest.check(torch.randint(0, 11, (2, 5)))


class _CrossAttention(nn.Module):
    def __init__(self, d=16, heads=4):
        super().__init__()
        self.num_heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, query, x):
        B = x.shape[0]
        split = lambda t: t.view(B, t.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(query)), split(self.k(x)), split(self.v(x)))
        return self.o(a.transpose(1, 2).reshape(B, query.shape[1], -1))


class _OneQueryPooling(nn.Module):
    """Cross-attention of ONE query position (a learned pooling query, the attention's first argument) over
    many keys: heads still matter (softmax over several keys), so check measures them instead of refusing."""

    def __init__(self):
        super().__init__()
        self.inp, self.att, self.out = nn.Linear(5, 16), _CrossAttention(), nn.Linear(16, 3)
        self.query = nn.Parameter(torch.randn(1, 1, 16))

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.att(self.query.expand(h.shape[0], 1, -1), h)).squeeze(1)


def test_one_query_position_over_many_keys_is_checked_not_refused():
    torch.manual_seed(0)
    model = _OneQueryPooling().eval()
    nest = sn.wrap(model, sn.Heads("h", [1, 2, 4], attn="att"))
    nest.check(torch.randn(2, 6, 5))
    with pytest.raises(sn.SortedNetError, match="one key position"):
        nest.check(torch.randn(2, 1, 5))


class _SeqFirstAttention(nn.Module):
    """fairseq-style ``(T, B, E)``: with batch 1 the axis before the features is the batch, not positions."""

    def __init__(self, e=32, heads=4):
        super().__init__()
        self.num_heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(e, e) for _ in range(4))

    def forward(self, x):
        T, B, _ = x.shape
        q, k, v = (p(x).view(T, B, self.num_heads, -1).permute(1, 2, 0, 3) for p in (self.q_proj, self.k_proj,
                                                                                      self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).permute(2, 0, 1, 3).reshape(T, B, -1))


class _ConvAttention(nn.Module):
    """1x1-convolution q / k / v over ``(B, C, H, W)``, attention over the H * W positions."""

    def __init__(self, e=32, heads=4):
        super().__init__()
        self.num_heads = heads
        self.q, self.k, self.v, self.o = (nn.Conv2d(e, e, 1) for _ in range(4))

    def forward(self, x):
        B, _, H, W = x.shape
        q, k, v = (p(x).view(B, self.num_heads, -1, H * W).transpose(-1, -2) for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, -1, H, W))


@pytest.mark.parametrize("cls, kw, x", [(_SeqFirstAttention, {}, torch.randn(5, 1, 32)),
                                        (_ConvAttention, dict(qkv=("q", "k", "v"), o="o"), torch.randn(2, 32, 1, 6))],
                         ids=["seq_first_batch_1", "conv_image_of_one_row"])
def test_many_positions_in_any_layout_are_not_mistaken_for_one(cls, kw, x):
    torch.manual_seed(0)
    sn.wrap(cls().eval(), sn.Heads("h", [1, 2, 4], attn="", **kw), example=x)  # accepted: the heads are whole


class _ReorderedHeads(nn.Module):
    """Whole heads, but reordered before the output projection (head 0 stays, the others reversed): one head
    is still the first head; two are not the first two."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.num_heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, N, _ = x.shape
        split = lambda t: t.view(B, N, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        a = torch.cat([a[:, :1], a[:, 1:].flip(1)], 1)
        return self.o(a.transpose(1, 2).reshape(B, N, -1))


class _ReorderedHeadsWithScale(_ReorderedHeads):
    """The same taking a second argument: wrap cannot run it alone, check(example) measures it."""

    def forward(self, x, scale):
        return super().forward(x * scale)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.att, self.out = nn.Linear(5, 16), _ReorderedHeadsWithScale(), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.att(self.inp(x), 2.0))


def test_heads_are_checked_at_every_size_not_only_the_smallest():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5)
    alone = nn.Sequential(nn.Linear(5, 16), _ReorderedHeads(), nn.Linear(16, 3)).eval()
    assert not [d for d in sn.discover(alone, x, ratios=[0.25, 0.5, 1.0]) if isinstance(d, sn.Heads)]
    with pytest.raises(sn.SortedNetError, match="2 heads are not the first 2 whole heads"):  # run alone at wrap
        sn.wrap(alone, sn.Heads("h", [1, 2, 4], attn="1"))
    nest = sn.wrap(_Scaled().eval(), sn.Heads("h", [1, 2, 4], attn="att"))
    with pytest.raises(sn.SortedNetError, match="heads 'h' at 2 is not the first 2 whole heads"):
        nest.check(x)


class _AlibiFromItsCount(nn.Module):
    """Attention taking a mask beside its input (wrap cannot run it alone) whose ALiBi slopes come from its head
    count at each forward: a sub-model's heads get other slopes than the full model's first heads."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.head_dim = 4, 4
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        slopes = torch.tensor([2 ** (-8 * (i + 1) / self.num_heads) for i in range(self.num_heads)])
        att = q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + mask + slopes.view(-1, 1, 1) * torch.arange(t)
        return self.o((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


class _AlibiModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = _AlibiFromItsCount()

    def forward(self, x):
        return x + self.att(x, torch.triu(torch.full((x.shape[1],) * 2, float("-inf")), 1))


def test_per_head_values_computed_from_the_count_are_named_and_not_waved_through():
    """check refused ALiBi slopes computed from the head count naming only layouts, and ended by offering to
    declare the nest without example= 'if that reading is intended': which gave sub-models whose heads read
    other slopes than the full model's. The cause is named; the way around the check only for averaged weights."""
    torch.manual_seed(0)
    nest = sn.wrap(_AlibiModel().eval(), sn.Heads("h", [1, 2, 4], attn="att"))
    with pytest.raises(sn.SortedNetError, match=r"(?s)is not the first 1 whole heads.*per-head values from the head "
                                                r"count.*ALiBi slopes.*only where that reading is the cause"):
        nest.check(torch.randn(2, 5, 16))


class _HeadValuesAttention(nn.Module):
    """4 heads of 8 features (the head count half the head size, as a rotary table's length), with per-head
    slopes of its own (``how="slopes"``) or a gate per head feature (``how="gate"``)."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.head_dim = how, 8
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
        if how == "slopes":
            self.register_buffer("slopes", torch.tensor([0.5, 0.25, 0.125, 0.0625]))
        else:
            self.g_proj = nn.Linear(32, 32)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = q @ k.transpose(-1, -2) * self.head_dim ** -0.5
        if self.how == "slopes":
            att = att + self.slopes.view(-1, 1, 1) * torch.arange(t)
        y = (att.softmax(-1) @ v).transpose(1, 2)
        if self.how == "gate":
            y = y * torch.sigmoid(self.g_proj(x)).view(b, t, -1, self.head_dim)
        return self.o(y.reshape(b, t, -1))


@pytest.mark.parametrize("how", ["slopes", "gate", "gate_per_head"])
def test_per_head_tensors_wrap_cannot_tell_apart_are_named_when_the_attention_fails(how):
    """Per-head slopes of the attention's own, when the head count is half the head size (wrap leaves such a
    length alone: a rotary table's), and a gate per head feature, failed the attention's own run with a bare
    shape error and advice about count attributes; naming the gate in per_head= was answered with advice for
    fused projections of a Width. Each is named, with what Heads can cut."""
    match = {"slopes": r"count_attrs=.*If \['slopes \(4,\)'\], which it holds itself with an axis of its 4 heads",
             "gate": r"count_attrs=.*If its child 'g_proj', with 32 outputs as wide as all 4 heads' outputs",
             "gate_per_head": r"'g_proj' has 8 per head .*Heads cannot cut it"}[how]
    model = _HeadValuesAttention("slopes" if how == "slopes" else "gate")
    with pytest.raises(sn.SortedNetError, match=match) as e:
        sn.wrap(model, sn.Heads("h", [1, 2, 4], attn="", **({"per_head": "g_proj"} if how == "gate_per_head" else {})))
    assert "fused projections" not in str(e.value) and type(model.q) is nn.Linear


class _ReadsAttentionWeights(nn.Module):
    def __init__(self, per_head):
        super().__init__()
        self.att, self.out = nn.MultiheadAttention(16, 4, batch_first=True), nn.Linear(16, 3)
        self.per_head = per_head

    def forward(self, x):
        y, w = self.att(x, x, x, need_weights=True, average_attn_weights=not self.per_head)
        return self.out(x + y) + (w.mean(1) if self.per_head else w)[..., :1]  # (averaged over the heads in force)


@pytest.mark.parametrize("per_head", [False, True])
def test_a_forward_reading_the_attention_weights(per_head):
    """A forward that reads the attention weights the attention returns (averaged over the heads in force) failed
    the whole-heads check with a correct layout, the reference averaging all heads: the reference now reads the
    sub-model's own weights there, and the model passes (each sub-model equal to its export). Per-head weights
    the forward averages itself cannot be read alike (the reference holds all heads): refused, naming that
    reading."""
    torch.manual_seed(0)
    m = _ReadsAttentionWeights(per_head).eval()
    nest = sn.wrap(m, sn.Heads("h", [1, 2, 4], attn="att"))
    x = torch.randn(2, 6, 16)
    if per_head:
        with pytest.raises(sn.SortedNetError, match=r"(?s)is not the first 1 whole heads.*per-head attention weights"):
            nest.check(x)
        return
    nest.check(x)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(nest.export(sub)(x), m(x), rtol=1e-5, atol=1e-6)


class _WindowedHeads(nn.Module):
    """Each head attends within its own causal window, spread over [1, 64] by the head count: at 2 heads the
    windows are [1, 64], the full module's first two [1, 22]; alike on 5 positions, not on 32."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, width // heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        win = torch.linspace(1, 64, self.num_heads).round()
        dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        allowed = (dist >= 0) & (dist[None] < win[:, None, None])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def test_per_head_behaviour_past_a_few_positions_is_refused_at_wrap():
    """wrap's self-check ran 5 positions: per-head windows computed from the head count passed it, and the
    2-head sub-model differed from the full model's first two heads by 8% on 32 positions."""
    torch.manual_seed(0)
    m = _WindowedHeads()
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match="2 heads are not the first 2 whole heads"):
        sn.wrap(m, sn.Heads("h", [2, 4], attn=""))
    assert type(m) is _WindowedHeads and m.num_heads == 4
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in snap.items())


class _FusedFastAxis(nn.Module):
    """nanoGPT-style fused ``c_attn`` ([q; k; v] stacked), heads split as the FAST axis, and a mask argument
    (so wrap cannot run it alone)."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.n_head = heads
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, mask):
        B, N, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, -1)
        split = lambda t: t.view(B, N, -1, self.n_head).permute(0, 3, 1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return self.c_proj(a.permute(0, 2, 3, 1).reshape(B, N, -1))


class _FusedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.att, self.out = nn.Linear(5, 16), _FusedFastAxis(), nn.Linear(16, 3)

    def forward(self, x):
        T = x.shape[1]
        return self.out(self.att(self.inp(x), torch.ones(T, T, dtype=torch.bool).tril()))


def test_a_fused_attention_on_one_position_is_refused_too():
    torch.manual_seed(0)
    nest = sn.wrap(_FusedBlock().eval(), sn.Heads("h", [2, 4], attn="att"))
    with pytest.raises(sn.SortedNetError, match="one key position"):
        nest.check(torch.randn(2, 1, 5))
    with pytest.raises(sn.SortedNetError, match="not the first 2 whole heads"):
        nest.check(torch.randn(2, 6, 5))


class _MyRMSNorm(nn.Module):
    """A norm of the user's, with a slicer of the user's (sn.slicer): the wiring trace records its ops."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


@sn.slicer(_MyRMSNorm)
class _MyRMSNormSlicer(sn.Slicer):
    roles = ("norm",)
    attrs = ("weight",)

    def full(self, m, role):
        return m._parameters["weight"].shape[0]

    def value(self, m, name):
        return self.take(m, "weight", [(0, "norm")])


def test_a_forgotten_binding_next_to_a_norm_of_the_users_does_not_blame_the_norm():
    """The user's norm reads its own weight in its forward: that read is the norm's features (its role), so the
    trace follows the group through it and names the forgotten module; it once said to remove the norm's
    (correct) binding."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), _MyRMSNorm(16), nn.Linear(16, 16), _MyRMSNorm(16), nn.Linear(16, 3))
    x = torch.randn(2, 4)
    ok = sn.wrap(m, sn.Width("h", [8, 16], out=["0", "2"], inp=["2", "4"], norm=["1", "3"]), example=x)
    ok.unwrap()
    with pytest.raises(sn.SortedNetError) as e:   # the second norm forgotten
        sn.wrap(m, sn.Width("h", [8, 16], out=["0", "2"], inp=["2", "4"], norm=["1"]), example=x)
    assert "add norm='3'" in str(e.value) and "remove that binding" not in str(e.value)
    assert "norm='1'" not in str(e.value)


class _Mixer(nn.Module):
    """MLP-Mixer-like: a token-mixing MLP over the sequence axis (16 tokens) next to a channel MLP over
    the embedding (16 channels): the same size, different axes."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln1, self.ln2 = nn.Linear(12, 16), nn.LayerNorm(16), nn.LayerNorm(16)
        self.tok1, self.tok2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.ch1, self.ch2, self.fc = nn.Linear(16, 48), nn.Linear(48, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.tok2(F.gelu(self.tok1(self.ln1(h).transpose(1, 2)))).transpose(1, 2)
        h = h + self.ch2(F.gelu(self.ch1(self.ln2(h))))
        return self.fc(h.mean(1))


def test_a_binding_on_an_axis_of_the_same_size_is_named_with_both_ways_out():
    """A token-mixing layer put in the channel dimension (its sequence axis has as many units): the message
    said only "add out='tok2'" (which makes it worse); it now also says to remove the binding, and only where
    the binding is alone in its traced group."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 12)
    channels = dict(out=["emb", "ch2"], inp=["ch1", "fc"], norm=["ln1", "ln2"])
    sn.wrap(_Mixer(), sn.Width("e", [8, 16], **channels), example=x).unwrap()  # the right wiring passes
    with pytest.raises(sn.SortedNetError) as e:
        sn.wrap(_Mixer(), sn.Width("e", [8, 16], **{**channels, "inp": ["ch1", "fc", "tok1"]}), example=x)
    assert "'tok1' (inp=) shares its 16 features" in str(e.value) and "remove inp='tok1'" in str(e.value)
    with pytest.raises(sn.SortedNetError) as e:  # a forgotten partner: only the advice to add it
        sn.wrap(_Mixer(), sn.Width("e", [8, 16], **{**channels, "out": ["emb"]}), example=x)
    assert "add out='ch2'" in str(e.value) and "remove" not in str(e.value)


class _LayerScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gamma, self.b = nn.Linear(8, 16), nn.Parameter(torch.ones(16)), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(self.a(x) * self.gamma)


def test_features_reaching_a_raw_parameter_name_the_way_to_slice_them():
    """A layer scale read raw: the message said only "remove that binding", which gives up the width the user
    wants; it now also says how to slice it (the parameter in a module with a slicer)."""
    with pytest.raises(sn.SortedNetError) as e:
        sn.wrap(_LayerScaled(), sn.Width("h", [8, 16], out="a", inp="b"), example=torch.randn(2, 8))
    msg = str(e.value)
    assert "reach parameter 'gamma'" in msg and "remove that binding" in msg
    assert "hold 'gamma' in a module a slicer serves" in msg and "custom_slicers.md" in msg


class _Affine(nn.Module):
    """A module of the user's with non-standard parameter names."""

    def __init__(self, i: int, o: int):
        super().__init__()
        self.W, self.b = nn.Parameter(torch.randn(o, i) * 0.3), nn.Parameter(torch.randn(o) * 0.1)

    def forward(self, x):
        return x @ self.W.T + self.b


class _AffineB(_Affine):
    pass


class _AffineSlicer(sn.Slicer):
    roles, attrs = ("out", "inp"), ("W", "b")

    def full(self, m, role):
        return m._parameters["W"].shape[0 if role == "out" else 1]

    def value(self, m, name):
        return self.take(m, name, [(0, "out"), (1, "inp")] if name == "W" else [(0, "out")])


def test_a_slicer_registered_for_two_types_refuses_own_forward_subclasses_of_both():
    """Stacked ``@sn.slicer`` decorators: the subclass-with-its-own-forward refusal held for the last type only
    (``types`` was overwritten), so a subclass of the other that reads ``_parameters`` directly was wrapped."""
    cls = sn.slicer(_AffineB)(sn.slicer(_Affine)(type("_Stacked", (_AffineSlicer,), {})))
    assert set(cls.types) == {_Affine, _AffineB}

    class Sub(_Affine):
        def forward(self, x):
            return x @ self._parameters["W"].T

    class SubB(_AffineB):
        def forward(self, x):
            return x @ self._parameters["W"].T

    for kind in (Sub, SubB):
        m = nn.Sequential(kind(4, 16), nn.ReLU(), nn.Linear(16, 3))
        with pytest.raises(sn.PatternError, match="with its own forward"):
            sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))


class _ScaledLinear(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.scale = nn.Parameter(torch.ones(n_out))

    def forward(self, x):
        return F.linear(x, self.weight) * self.scale


class _ScaledSlicerBase(sn.Slicer):
    """Roles and sizes of ``_ScaledLinear`` (not registered: the tests below register variants of ``value``)."""

    roles = ("out", "inp")
    attrs = ("weight", "scale")

    def full(self, m, role):
        return m._parameters["weight"].shape[0 if role == "out" else 1]


def _refused_at_wrap(slicer: type, tag: str, match: str, sizes=(8, 16, 32)) -> nn.Module:
    """Register ``slicer`` for a fresh ``_ScaledLinear`` subclass; wrapping a model of it must be refused
    (``match``), the model left as it was. Returns the model."""
    cls = type(f"_ScaledLinear{tag}", (_ScaledLinear,), {})
    sn.slicer(cls)(type(f"{slicer.__name__}{tag}", (slicer,), {}))
    m = nn.Sequential(cls(8, 32), nn.ReLU(), nn.Linear(32, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=match):
        sn.wrap(m, sn.Width("h", list(sizes), out="0", inp="2" if sizes[-1] == 32 else ()))
    assert type(m[0]) is cls and "_sn" not in m[0].__dict__
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    return m


class _CountedNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight, self.dim = nn.Parameter(torch.ones(d)), d

    def forward(self, x):
        return x * self.weight


class _EmptyBias(nn.Module):
    """No bias held as an empty tensor (not None)."""

    def __init__(self, i, o):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(o, i)), nn.Parameter(torch.zeros(0))

    def forward(self, x):
        y = F.linear(x, self.weight)
        return y + self.bias if self.bias.numel() else y


def test_a_views_entry_of_an_unbound_role_is_checked_unless_the_axis_is_empty_or_broadcast():
    """A views entry cut by a role no dimension binds is checked against full() at wrap (a bias cut by 'inp' was
    accepted and failed only at check); an empty tensor standing for "no bias" is not a wrong role."""
    @sn.slicer(_EmptyBias)
    class _EmptyBiasSlicer(sn.Slicer):
        roles, attrs = ("out", "inp"), ("weight", "bias")
        views = {"weight": ((0, "out"), (1, "inp")), "bias": ((0, "out"),)}

        def full(self, m, role):
            return m._parameters["weight"].shape[0 if role == "out" else 1]

    m = nn.Sequential(nn.Linear(8, 16), _EmptyBias(16, 4))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="1"), example=torch.randn(2, 8))
    x = torch.randn(3, 8)
    with nest.use("h=4"), torch.no_grad():
        torch.testing.assert_close(nest.export("h=4")(x), m(x))


def test_a_custom_slicer_failing_on_a_static_attribute_is_named():
    """A slicer whose value() raised for an attribute listed in ``static`` (a user's mistake: a helper called
    without an argument) reached the user as the raw TypeError, naming neither slicer nor module; a tensor
    attribute's failure was named. Both are now, and the model is left as it was."""
    @sn.slicer(_CountedNorm)
    class _Counted(sn.Slicer):
        roles, attrs, static = ("norm",), ("weight", "dim"), ("dim",)
        views = {"weight": ((0, "norm"),)}

        def full(self, m, role):
            return m._parameters["weight"].shape[0]

        def value(self, m, name):
            raise TypeError("features() missing 1 required positional argument: 'full'")

    m = nn.Sequential(nn.Linear(8, 16), _CountedNorm(16), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"slicer _Counted of '1' raised reading 'dim' at sizes .*TypeError"):
        sn.wrap(m, sn.Width("h", [4, 16], out="0", norm="1", inp="2"))
    assert [type(c) for c in m] == [nn.Linear, _CountedNorm, nn.Linear] and "_sn" not in m[1].__dict__
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("cut", ["data", "detach", "leaf", "parameter"])
def test_a_custom_slicer_that_cuts_a_parameter_off_its_gradient_is_refused(cut):
    """A value() that cut from ``.data`` (or ``.detach()``) passed wrap and check: the parameter's gradient was
    None at every size, so it never trained, with nothing said. So did a value that requires grad through a leaf
    of its own (``w.detach().requires_grad_()``, ``nn.Parameter(w.clone())``): that leaf got the gradient."""

    class Detached(_ScaledSlicerBase):
        def value(self, m, name):
            if name == "weight":
                return self.take(m, "weight", [(0, "out"), (1, "inp")])
            k = self.features(m, "out", m._parameters["scale"].shape[0])
            scale = m._parameters["scale"]
            if cut == "leaf":
                return scale.detach().requires_grad_()[:k]
            if cut == "parameter":
                return nn.Parameter(scale[:k].clone())
            return (scale.data if cut == "data" else scale.detach())[:k]

    m = _refused_at_wrap(Detached, f"_{cut}", rf"Detached_{cut} \(slicer of '0'.*'scale' at .* without a "
                                              r"gradient path")
    # frozen at wrap: accepted, with a warning (was silent: unfrozen later to fine-tune, it got no gradient at any
    # size); a tensor that never trains (a fixed mask) is a buffer
    m[0].scale.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"'scale' at .* without a gradient path.*frozen now; unfrozen later"):
        nest = sn.wrap(m, sn.Width("h", [8, 16, 32], out="0", inp="2"))
    assert not m[0]._parameters["scale"].requires_grad and m[0].weight.requires_grad
    nest.unwrap()


class _RunningNorm(nn.Module):
    """Keeps ``[mean; mean of squares]`` of its input in one ``(2, C)`` buffer, updated in place in training."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.register_buffer("stats", torch.zeros(2, c))

    def forward(self, x):
        if self.training:
            mu = x.mean(0).detach()
            self.stats[0].mul_(0.9).add_(0.1 * mu)
            self.stats[1].mul_(0.9).add_(0.1 * mu * mu)
            return (x - mu) * self.weight
        return (x - self.stats[0]) * self.weight


class _ClippedLinear(nn.Module):
    """A weight stored ``(in, out)`` and clipped in place by the forward."""

    def __init__(self, i, o):
        super().__init__()
        self.w_t = nn.Parameter(torch.randn(i, o))

    def forward(self, x):
        with torch.no_grad():
            self.w_t.clamp_(-0.5, 0.5)
        return x @ self.w_t


@pytest.mark.parametrize("layer", ["buffer", "parameter"])
@pytest.mark.parametrize("example", [False, True])
def test_a_forward_writing_a_copy_a_custom_slicer_computed_is_refused(layer, example):
    """A value() that is a new tensor (``.contiguous()`` of a strided slice, a clone) of a buffer kept by the
    forward (running statistics) or a parameter it clips: the forward wrote into the copy, and the module's
    tensor stayed as it was at every smaller size, with nothing said. The write is refused, naming it (by
    ``wrap(..., example=)``'s check, or where the forward runs); reading the copy stays fine."""
    cls = type(f"_L_{layer}_{example}", (_RunningNorm if layer == "buffer" else _ClippedLinear,), {})
    name, axis = ("stats", 1) if layer == "buffer" else ("w_t", 1)

    class Copying(sn.Slicer):
        roles = ("norm",) if layer == "buffer" else ("out",)
        attrs = ("weight", "stats") if layer == "buffer" else ("w_t",)
        views = {"weight": ((0, "norm"),)} if layer == "buffer" else {}

        def full(self, m, role):
            return m._parameters["weight" if layer == "buffer" else "w_t"].shape[0 if layer == "buffer" else 1]

        def value(self, m, attr):
            return self.take(m, name, [(axis, self.roles[0])]).contiguous()

    sn.slicer(cls)(Copying)
    torch.manual_seed(0)
    first = cls(8) if layer == "buffer" else cls(4, 8)
    m = nn.Sequential(nn.Linear(4, 8), first, nn.Linear(8, 2)) if layer == "buffer" else \
        nn.Sequential(first, nn.ReLU(), nn.Linear(8, 2))
    dim = sn.Width("h", [4, 8], out="0", norm="1", inp="2") if layer == "buffer" else \
        sn.Width("h", [4, 8], out="0", inp="2")
    x = torch.randn(6, 4)
    where = (rf"{'1' if layer == 'buffer' else '0'}\.{name}: written in place .* "
             r"the value its slicer's value\(\) computed")
    if example:
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(sn.SortedNetError, match=where):
            sn.wrap(m, dim, example=x)
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
        return
    nest = sn.wrap(m, dim)
    with nest.use("h=4"), pytest.raises(sn.SortedNetError, match=where):
        m(x)
    m.eval()
    with torch.no_grad(), nest.use("h=4"):
        got = m(x) if layer == "buffer" else None
    if layer == "buffer":  # (eval reads the copy: no write)
        torch.testing.assert_close(got, nest.export("h=4")(x))


class _CastLinear(nn.Module):
    """A bfloat16 weight computed with in float32: the forward scales its float32 copy in place."""

    clone = False

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i, generator=torch.Generator().manual_seed(2)).bfloat16())

    def forward(self, x):
        w = self.weight.to(x.dtype)  # (a copy of the bfloat16 parameter: writing it is the forward's own business)
        w = w.clone() if self.clone else w
        w.mul_(0.5)
        return F.linear(x, w)


@sn.slicer(_CastLinear)
class _CastSlicer(sn.Slicer):
    roles = ("out", "inp")
    attrs = ("weight",)

    def full(self, m, role):
        return m._parameters["weight"].shape[0 if role == "out" else 1]

    def value(self, m, name):
        return self.take(m, "weight", [(0, "out"), (1, "inp")]).float()


def test_a_write_into_a_cast_copy_a_custom_slicer_made_is_refused_and_a_clone_is_not():
    """A value() that casts (bfloat16 to float32) makes a copy at every size: a forward's ``.to(x.dtype)`` then
    copies nothing, and a write meant for the forward's own copy lands in the slicer's, where the plain model's
    ``.to`` copied. Such writes are refused (a running statistic written into a cast would be lost), naming
    ``.clone()``, which copies always and is accepted, equal to the export."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    for clone in (False, True):
        cls = type(f"_CastLinear{clone}", (_CastLinear,), {"clone": clone})
        sn.slicer(cls)(type(f"_CastSlicer{clone}", (_CastSlicer,), {}))
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), cls(8, 3))
        if not clone:
            with pytest.raises(sn.SortedNetError, match=r"2\.weight: written in place .*\.clone\(\)"):
                sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="2"), example=x)
            continue
        nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="2"), example=x)
        with nest.use("h=4"), torch.no_grad():
            torch.testing.assert_close(model(x), nest.export("h=4")(x))


def test_a_guarded_custom_value_compiles_in_one_graph(fresh_dynamo):
    """The write guard of a custom slicer's copies is never traced: a compiled forward keeps one graph
    (``fullgraph=True`` raised on its memory check)."""
    cls = type("_RunningNormCompiled", (_RunningNorm,), {})

    class Copying(sn.Slicer):
        roles = ("norm",)
        attrs = ("weight", "stats")
        views = {"weight": ((0, "norm"),)}

        def full(self, m, role):
            return m._parameters["weight"].shape[0]

        def value(self, m, attr):
            return self.take(m, "stats", [(1, "norm")]).contiguous()

    sn.slicer(cls)(Copying)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), cls(8), nn.Linear(8, 2)).eval()
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", norm="1", inp="2"))
    assert "stats" in nest._sliced["1"]._sn.guard
    x = torch.randn(6, 4)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with nest.use("h=4"), torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_a_frozen_parameter_of_a_custom_slicer_stays_frozen_and_trains_once_unfrozen():
    cls = type("_ScaledLinearFrozen", (_ScaledLinear,), {})
    sn.slicer(cls)(type("FrozenOk", (_ScaledSlicerBase,), _views({"weight": ((0, "out"), (1, "inp")),
                                                                   "scale": ((0, "out"),)})))
    torch.manual_seed(0)
    m = nn.Sequential(cls(8, 32), nn.ReLU(), nn.Linear(32, 2))
    m[0].scale.requires_grad_(False)
    nest = sn.wrap(m, sn.Width("h", [8, 16, 32], out="0", inp="2"))
    assert not m[0].scale.requires_grad
    x = torch.randn(3, 8)
    with nest.use("h=16"):
        m(x).sum().backward()
        assert not m[0].scale.requires_grad
    assert m[0].scale.grad is None and m[0].weight.grad is not None
    m[0].scale.requires_grad_(True)                    # unfrozen: trains at every size
    with nest.use("h=16"):
        m(x).sum().backward()
    assert m[0].scale.grad is not None and m[0].scale.grad[:16].abs().sum() > 0 and not m[0].scale.grad[16:].any()


class _ZippedNorms(nn.Module):
    """Blocks paired with a second per-layer list (``zip(self.blocks, self.norms)``)."""

    def __init__(self, n=4, reverse=False):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(n))
        self.head = nn.Linear(8, 2)
        self.reverse = reverse

    def forward(self, x):
        for block, norm in zip(self.blocks, reversed(self.norms) if self.reverse else self.norms):
            x = norm(block(x))
        return self.head(x)


class _RoutedHead(nn.Module):
    """Blocks, then a router picking one of as many experts as there are blocks, per example: which experts run
    changes with the depth too, but the list is not paired with the blocks (cost and export are right)."""

    def __init__(self, n=4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.router = nn.Linear(8, n)
        self.experts = nn.ModuleList(nn.Linear(8, 2) for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        pick = self.router(x).argmax(-1)
        out = torch.zeros(len(x), 2)
        for i, expert in enumerate(self.experts):
            if bool((pick == i).any()):
                out[pick == i] = expert(x[pick == i])
        return out


class _PerLayerValues(nn.Module):
    """Blocks scaled by a per-layer value the Depth does not cut: a ``(layers, features)`` parameter, an
    ``nn.ParameterList``, a buffer or an embedding row, entry ``j`` with block ``i``: ``"end"`` reads from the
    end with the depth's count (``len(self.blocks) - 1 - i``), ``"top"`` from the end with the full count,
    ``"own"`` entry i, ``"ahead"`` every entry of the depth at once before the loop, ``"last"`` entry
    ``len(self.blocks) - 1`` once after it (a final layer following the depth), ``"reversed"`` the blocks from
    the last, each with its own entry."""

    def __init__(self, kind, read, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.read, self.n = kind, read, n
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.gammas = nn.Parameter(torch.rand(n, 8) + 0.5)
        self.register_buffer("betas", torch.rand(n, 8))
        self.scales = nn.ParameterList(nn.Parameter(torch.rand(8) + 0.5) for _ in range(n))
        self.emb = nn.Embedding(n, 8)

    def value(self, j):
        if self.kind == "param":
            return self.gammas[j]
        if self.kind == "numpy_index":
            return self.gammas[np.int64(j)]
        if self.kind == "buffer":
            return self.betas.select(0, j)
        if self.kind == "plist":
            return self.scales[j]
        return self.emb(torch.tensor(j))

    def forward(self, x):
        d = len(self.blocks)
        ahead = [self.value(j) for j in range(d)] if self.read == "ahead" else None
        if self.read == "reversed":  # (the blocks walked from the last, each with its own entry)
            for i in reversed(range(d)):
                x = x + torch.tanh(self.blocks[i](x)) * self.value(i)
            return x
        for i, b in enumerate(self.blocks):
            j = {"end": d - 1 - i, "top": self.n - 1 - i}.get(self.read, i)
            v = ahead[i] if ahead is not None else None if self.read == "last" else self.value(j)
            x = x + torch.tanh(b(x)) * (1 if v is None else v)
        return x * self.value(d - 1) if self.read == "last" else x


@pytest.mark.parametrize("kind", ["param", "numpy_index", "buffer", "plist", "embedding"])
def test_a_per_layer_value_paired_with_other_blocks_at_a_shallow_depth_is_warned(kind):
    """``self.gammas[len(self.blocks) - 1 - i]``: at depth 2 block 0 meets entry 1, at full depth entry 3, so a
    sub-model is not the full model's first blocks (0.7-2.2 off), and check passed it in silence (a list of
    modules read so is refused or warned of; a per-layer tensor was not looked at)."""
    x = torch.randn(3, 8)
    m = _PerLayerValues(kind, "end")
    full = copy.deepcopy(m)
    with pytest.warns(sn.check.LayerPairingWarning, match=r"depth 'depth' at 2 reads entries \[1\] of '(gammas|betas|"
                                                          r"scales|emb.weight)'.*full model reads \[3\]"):
        nest = sn.wrap(m, sn.Depth("depth", [2, 4], layers="blocks"), example=x)
    full.blocks, full.read = full.blocks[:2], "top"  # (the full model's first two blocks, with their entries)
    with torch.no_grad(), nest.use("depth=2"):
        assert not torch.allclose(m(x), full(x))  # (the sub-model really is another network)
    for read in ("top", "own", "ahead", "last", "reversed"):  # (entries the full model pairs with the blocks, or one
        #                                                            final read)
        m = _PerLayerValues(kind, read)
        with warnings.catch_warnings():
            warnings.simplefilter("error", sn.check.LayerPairingWarning)
            nest = sn.wrap(m, sn.Depth("depth", [1, 2, 4], layers="blocks"), example=x)


class _GatheredAhead(nn.Module):
    """Per-layer values gathered for the blocks before the loop, in the order that pairs entry ``d - 1 - i`` with
    block ``i`` at depth d: every read happens before the first block, where any entry passes the reads' test."""

    def __init__(self, how, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.gammas = nn.Parameter(torch.rand(n, 8) + 0.5)
        self.table = nn.Parameter(torch.rand(8, n) + 0.5)  # (a (features, layers) layout)
        self.emb = nn.Embedding(n, 8)

    def values(self, d):
        return {"listcomp": lambda: [self.gammas[d - 1 - i] for i in range(d)],
                "flip": lambda: self.gammas[:d].flip(0),
                "from_end": lambda: self.gammas[-d:],
                "unbind": lambda: self.gammas.unbind(0)[:d][::-1],
                "columns": lambda: self.table[:, :d].flip(1).T,
                "embedding": lambda: self.emb(torch.arange(d).flip(0))}[self.how]()

    def forward(self, x, values=None):
        for b, g in zip(self.blocks, self.values(len(self.blocks)) if values is None else values):
            x = x + torch.tanh(b(x)) * g
        return x


@pytest.mark.parametrize("how", ["listcomp", "flip", "from_end", "unbind", "columns", "embedding"])
def test_per_layer_values_gathered_before_the_loop_and_paired_from_the_end_are_warned(how):
    """The reads alone cannot tell these from a forward reading every entry once up front (each entry is read
    before the first block in both): at depth 2 block 1 got entry 0 where the full model gives it entry 2, a sub-model
    0.8 off the full model's first blocks, and check passed it in silence. The blocks' inputs are compared with
    the full model's now, up to the first block the sub-model skips."""
    x = torch.randn(3, 8)
    with pytest.warns(sn.check.LayerPairingWarning, match=r"depth 'depth' at 2: block 1 of 'blocks' reads or gives "
                                                          r"other values than in the full model"):
        nest = sn.wrap(_GatheredAhead(how), sn.Depth("depth", [2, 4], layers="blocks"), example=x)
    full = _GatheredAhead(how)
    with torch.no_grad():
        with nest.use("depth=2"):
            got = nest.model(x)
        full.blocks = full.blocks[:2]  # (the full model's first two blocks, with the values it gives them)
        assert (got - full(x, values=full.values(4))).abs().max() > 0.1


class _FedByTheLoop(nn.Module):
    """Blocks whose sub-models ARE the full model's first blocks, though the runs differ: ``"sampling"`` draws a
    latent per block before the loop and samples inside each block (MC dropout): the full model draws more, so a
    block's draws differ between the runs; ``"final"`` tells the last block that runs it is the last (it applies
    the final norm), as ``self.blocks[-1]`` follows the depth. ``"count"`` scales each block by
    ``1 / len(self.blocks)``, ``"number"`` passes each block its index from the end: a sub-model is not the full
    model's first blocks."""

    def __init__(self, how, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.blocks = nn.ModuleList(_FinalNormBlock() for _ in range(n))

    def forward(self, x):
        d = len(self.blocks)
        if self.how in ("final", "final_int"):  # (the flag as a bool, or as an int)
            last = True if self.how == "final" else 1
            for i, b in enumerate(self.blocks):
                x = b(x, final=last) if i == d - 1 else x + b(x, final=0 * last)
            return x
        if self.how == "number":  # (a layer index counted from the end, passed as a plain int)
            for i, b in enumerate(self.blocks):
                x = x + b(x, rank=d - 1 - i)
            return x
        zs = [0.1 * torch.randn_like(x) for _ in range(d)] if self.how == "sampling" else [0.0] * d
        for b, z in zip(self.blocks, zs):
            h = b(x + z)
            if self.how == "sampling":
                h = F.dropout(h, 0.2, training=True)
            x = x + h / d if self.how == "count" else x + h
        return x


class _FinalNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x, final=False, rank=0):  # (the last block: its residual and the final norm)
        h = torch.tanh(self.fc(x)) * (1 + rank / 2)
        return self.norm(x + h) if final else h


@pytest.mark.parametrize("how", ["sampling", "final", "final_int", "count", "number"])
def test_blocks_fed_alike_warns_of_a_count_not_of_sampling_or_a_last_block(how):
    """The comparison of what the blocks read and give with the full model's took the random draws of a forward
    that samples, and the last block told it is the last (a flag, or an int), for another pairing; a scale by the
    count is one, and so is a layer index from the end passed as an int."""
    x = torch.randn(3, 8)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        nest = sn.wrap(_FedByTheLoop(how), sn.Depth("depth", [1, 2, 4], layers="blocks"), example=x)
    pairing = [str(w.message) for w in got if issubclass(w.category, sn.check.LayerPairingWarning)]
    if how in ("count", "number"):
        assert pairing and ("depth 'depth' at 2: block 1 of 'blocks'" if how == "count" else
                            "depth 'depth' at 2: block 0 of 'blocks'") in pairing[0]
        return
    assert not pairing
    with torch.no_grad():
        torch.manual_seed(3)
        with nest.use("depth=2"):
            live = nest.model(x)
        torch.manual_seed(3)
        torch.testing.assert_close(nest.export("depth=2")(x), live)  # (the sub-model is what its export computes)


class _SparseGraphBlocks(nn.Module):
    """Graph convolutions: every block reads a sparse adjacency matrix beside the node features."""

    def __init__(self, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))

    def forward(self, x, adj):
        for b in self.blocks:
            x = x + torch.tanh(torch.sparse.mm(adj, b(x)))
        return x


class _TwoStacks(nn.Module):
    """Two stacks, each with its own Depth, each pairing its per-layer values from the end (gathered first)."""

    def __init__(self, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.ModuleList(nn.Linear(8, 8) for _ in range(n)), nn.ModuleList(nn.Linear(8, 8)
                                                                                             for _ in range(n))
        self.g, self.h = nn.Parameter(torch.rand(n, 8) + 0.5), nn.Parameter(torch.rand(n, 8) + 0.5)

    def forward(self, x):
        for blocks, g in ((self.enc, self.g), (self.dec, self.h)):
            for b, s in zip(blocks, g[:len(blocks)].flip(0)):
                x = x + torch.tanh(b(x)) * s
        return x


def test_the_blocks_comparison_takes_sparse_arguments_and_warns_of_each_depth():
    """A sparse argument of every block made check fail (``torch.equal`` has no sparse kernel), and the first Depth
    warned of hid the others."""
    adj = (torch.rand(5, 5) > 0.5).float().to_sparse()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sn.check.LayerPairingWarning)
        sn.wrap(_SparseGraphBlocks(), sn.Depth("d", [1, 2, 4], layers="blocks"), example=(torch.randn(5, 8), adj))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        sn.wrap(_TwoStacks(), sn.Depth("de", [2, 4], layers="enc"), sn.Depth("dd", [2, 4], layers="dec"),
                example=torch.randn(3, 8))
    said = {m.group(1) for w in got if issubclass(w.category, sn.check.LayerPairingWarning)
            for m in [re.search(r"depth '(\w+)' at 2", str(w.message))] if m}
    assert said == {"de", "dd"}


class _SlotBlock(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.fc, self.norm = nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x, slots=None, i=0, n_layers=0, mask=None):
        if slots is not None:
            slots[i] = x.mean(0)  # (its own per-layer slot of a table as long as the depth)
        h = x + torch.tanh(self.fc(x))
        if mask is not None:
            h = h + torch.softmax(h @ h.transpose(-1, -2) + mask, -1) @ h
        return self.norm(h) if i == n_layers - 1 else h  # (the last block applies the final norm)


class _Slots(nn.Module):
    """Blocks fed, beside the hidden state, a table as long as the depth (``"slots"``), a count for the last block to
    know it is the last (``"count"``), or a causal -inf mask expanded over the batch (``"mask"``); ``scales``: per
    layer residual scales, Python floats, read from the end with the depth's count (``"end"``, the sub-models are
    other networks) or with each block's own (``"own"``). ``rows`` x ``width`` hidden states: past a few thousand
    elements the comparison keeps sketches of the values."""

    def __init__(self, feed, scales, rows=3, width=16, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.feed, self.read, self.rows = feed, scales, rows
        self.blocks = nn.ModuleList(_SlotBlock(width) for _ in range(n))
        self.scales = [0.25, 0.5, 1.0, 2.0]

    def forward(self, x):
        n = len(self.blocks)
        kw = {}
        if self.feed == "slots":
            kw["slots"] = torch.zeros(n, x.shape[-1])
        mask = torch.full((x.shape[-2], x.shape[-2]), float("-inf")).triu(1)
        for i, b in enumerate(self.blocks):
            if self.feed == "count":
                kw.update(i=i, n_layers=n)
            if self.feed == "mask":
                kw["mask"] = mask.expand(*x.shape[:-2], -1, -1)
            if self.feed == "slots":
                kw["i"] = i
            scale = self.scales[n - 1 - i if self.read == "end" else i]
            x = x + scale * (b(x, **kw) - x)
        return x


@pytest.mark.parametrize("rows", [3, 600], ids=["whole", "sketched"])
@pytest.mark.parametrize("feed", ["slots", "count", "mask"])
def test_the_blocks_comparison_takes_each_value_alone(feed, rows):
    """One argument of a shape that follows the depth (a table as long as it, each block writing its slot) turned the
    whole comparison off: a per-layer value read from the end was passed in silence. A count given every block for
    the last to know it is the last (``i == n_layers - 1``, as ``final=`` is) was taken for another pairing. Each
    value is compared alone now (those of other shapes passed over), numbers only through what the blocks give;
    the same past a few thousand elements, where a sketch of each value is kept, and with an expanded -inf mask."""
    x = torch.randn(2, rows, 16) if feed == "mask" else torch.randn(rows, 16)
    dim = sn.Depth("depth", [1, 2, 4], layers="blocks")
    with pytest.warns(sn.check.LayerPairingWarning, match=r"depth 'depth' at 2: block 1 of 'blocks' reads or gives "):
        sn.wrap(_Slots(feed, "end", rows), dim, example=x).unwrap()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sn.check.LayerPairingWarning)
        nest = sn.wrap(_Slots(feed, "own", rows), dim, example=x)
    with torch.no_grad(), nest.use("depth=2"):
        torch.testing.assert_close(nest.model(x), nest.export("depth=2")(x))


class _ScaledStack(nn.Module):
    """A LayerScale table (nearby values, 0.05 to 0.15): read with each block's own index, reversed before the loop
    (``gammas[:n].flip(0)``), or with a scale computed from the count."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Linear(16, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
                                    for _ in range(6))
        self.gammas = nn.Parameter(0.05 + 0.1 * torch.rand(6, 64))
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        x, n = self.stem(x), len(self.blocks)
        gs = self.gammas[:n].flip(0) if self.how == "flip" else self.gammas
        for i, b in enumerate(self.blocks):
            x = x + gs[i] * b(x) * (math.sqrt(6 / n) if self.how == "count" else 1.0)
        return self.head(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_blocks_comparison_holds_in_half_precision(dtype):
    """The values comparison took half precision's output tolerance (1e-1): a reversed LayerScale table (values 3%
    apart) or a scale from the count passed in bfloat16 on a small example (whole values), and was warned on a
    large one (sketches). Both runs compute the same ops on the same shapes before the first skipped block, so the
    tolerance is float32's in every dtype; a correct model is not warned."""
    x = torch.randn(2, 8, 16).to(dtype)
    for how in ("flip", "count"):
        torch.manual_seed(0)
        with pytest.warns(sn.check.LayerPairingWarning, match=r"depth 'depth' at 2: block [01] of 'blocks'"):
            sn.wrap(_ScaledStack(how).to(dtype), sn.Depth("depth", [2, 4, 6], layers="blocks"), example=x)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sn.check.LayerPairingWarning)
        sn.wrap(_ScaledStack("own").to(dtype), sn.Depth("depth", [2, 4, 6], layers="blocks"), example=x)


class _WindowAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, ok):
        return x + self.fc(torch.softmax((x @ x.transpose(-1, -2)).masked_fill(~ok, float("-inf")), -1) @ x)


class _WindowBlocks(nn.Module):
    """Attention blocks each given a boolean window mask of its own width, the widths read from the end with the
    depth's count (``"end"``: at depth 1 block 0 gets the last layer's window) or by each block's index."""

    def __init__(self, read, n=4, T=6):
        super().__init__()
        torch.manual_seed(0)
        self.read, self.T = read, T
        self.blocks = nn.ModuleList(_WindowAttention() for _ in range(n))
        self.widths = [1, 2, 3, T]

    def forward(self, x):
        n, i_ = len(self.blocks), torch.arange(self.T)
        for i, b in enumerate(self.blocks):
            w = self.widths[n - 1 - i if self.read == "end" else i]
            x = b(x, (i_[None, :] <= i_[:, None]) & (i_[:, None] - i_[None, :] < w))
        return x


class _FlagBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x, last):
        h = x + torch.tanh(self.fc(x))
        return torch.where(last, self.norm(h), h)  # (the last block applies the final norm)


class _Flagged(nn.Module):
    """Blocks told they are the last by a one-element boolean tensor."""

    def __init__(self, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_FlagBlock() for _ in range(n))

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(x, torch.tensor([i == len(self.blocks) - 1]))
        return x


def test_a_one_element_boolean_is_a_flag():
    """Boolean tensors are compared; a one-element one telling the last block it is the last, as ``final=True``
    does, is a flag, not a per-layer value."""
    x = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sn.check.LayerPairingWarning)
        nest = sn.wrap(_Flagged(), sn.Depth("depth", [1, 2, 4], layers="blocks"), example=x)
    with torch.no_grad(), nest.use("depth=2"):
        torch.testing.assert_close(nest.model(x), nest.export("depth=2")(x))


def test_a_boolean_mask_read_from_the_end_is_compared():
    """Boolean tensors were never compared (taken for flags): a per-layer boolean window read from the end went
    unwarned where a float one was. Only a 0-dim boolean is a flag now."""
    x = torch.randn(2, 6, 8)
    with pytest.warns(sn.check.LayerPairingWarning, match=r"depth 'depth' at 1: block 0"):
        sn.wrap(_WindowBlocks("end"), sn.Depth("depth", [1, 4], layers="blocks"), example=x).unwrap()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sn.check.LayerPairingWarning)
        sn.wrap(_WindowBlocks("own"), sn.Depth("depth", [1, 4], layers="blocks"), example=x)


class _EncDec(nn.Module):
    """An encoder and a decoder under one Depth, the decoder declared first; the encoder pairs its per-layer gains
    from the end (``wrong``) or with each block."""

    def __init__(self, wrong, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.wrong = wrong
        self.dec, self.enc = nn.ModuleList(nn.Linear(8, 8) for _ in range(n)), nn.ModuleList(nn.Linear(8, 8)
                                                                                             for _ in range(n))
        self.gains = nn.Parameter(torch.rand(n, 8) + 0.5)

    def forward(self, x):
        n = len(self.enc)
        for i, b in enumerate(self.enc):
            x = x + torch.tanh(b(x * self.gains[n - 1 - i if self.wrong else i]))
        for b in self.dec:
            x = x + torch.tanh(b(x))
        return x


def test_a_depth_over_two_lists_compares_the_blocks_of_the_one_that_runs_first():
    """Only the first list of a Depth (in the order of layers=) was compared: with the decoder named first, which
    runs after the encoder's first skipped block, nothing was, and the encoder's gains read from the end passed."""
    x = torch.randn(3, 8)
    dim = sn.Depth("depth", [2, 4], layers=["dec", "enc"])
    with pytest.warns(sn.check.LayerPairingWarning, match=r"depth 'depth' at 2: block 0 of 'enc' reads or gives"):
        sn.wrap(_EncDec(True), dim, example=x).unwrap()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sn.check.LayerPairingWarning)
        sn.wrap(_EncDec(False), dim, example=x)


@pytest.mark.parametrize("numel", [5000, 70_000, 200_003])
def test_a_sketch_estimates_the_relative_difference_and_keeps_no_tensor(numel):
    """The comparison keeps of a large value its sketch: a few Python floats (no tensor: kept between a long loop's
    temporaries, they grew the CPU heap by gigabytes). Equal values sketch alike; the difference of two sketches
    estimates the L2 norm of the values' difference over their largest entry (within a factor 3 here), at least
    the largest entry's difference over it, also for a change in one or two entries; non-finite entries must
    agree, also when one only moves."""
    from sortednet.check import _Sketch, _sketch_diff

    sketch = _Sketch()
    g = torch.Generator().manual_seed(numel)
    a = torch.randn(numel, generator=g)
    sa = sketch(a)
    assert all(not isinstance(v, torch.Tensor) for v in (sa[1], *sa[2]))
    assert _sketch_diff(sketch(a.clone()), sa) == 0.0
    top = a.abs().max()
    for r in (1e-2, 0.3):
        d = torch.randn(numel, generator=g)
        b = a + d * (r * top / d.norm())
        assert r / 3 < _sketch_diff(sketch(b), sa) < 3 * r
    for off in ([numel // 2], [1, numel - 2]):  # (one or two entries off, by as much, opposite signs)
        few = a.clone()
        few[off] += torch.tensor([0.01, -0.01][:len(off)]) * top
        assert _sketch_diff(sketch(few), sa) > 0.01 / 3
    m = a.clone()
    m[::7] = float("-inf")
    assert _sketch_diff(sketch(m.clone()), sketch(m)) == 0.0
    assert _sketch_diff(sketch(m), sa) == float("inf")
    for i, v in ((0, float("inf")), (1, float("-inf"))):  # (a sign flipped; an -inf moved one place)
        other = m.clone()
        other[i] = v
        if i == 1:
            other[0] = a[0]
        assert _sketch_diff(sketch(other), sketch(m)) == float("inf")
    assert _sketch_diff(sketch(a[:-1]), sa) is None  # (other shapes: not compared)


@pytest.mark.parametrize("seed", range(12))
def test_routing_that_changes_with_the_depth_is_not_taken_for_an_idle_list(seed):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sn.check.IdleLayersWarning)
        sn.wrap(_RoutedHead(), sn.Depth("depth", [1, 4], layers="blocks"), example=torch.randn(6, 8)).unwrap()


def test_layers_idle_at_a_shallow_depth_are_named_with_how_to_bind_them():
    """A per-layer list the Depth does not reach: at depth 1 three of its norms never ran, yet cost counted them
    and export kept them (154 parameters for a 106-parameter model), with nothing said by check."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    m = _ZippedNorms()
    with pytest.warns(sn.check.IdleLayersWarning, match=r"runs only d entries of \['norms'\].*all 4: 48 idle "
                                                         r"parameters at depth 1.*layers=\[<the blocks>, 'norms'\]"):
        nest = sn.wrap(m, sn.Depth("depth", [1, 4], layers="blocks"), example=x)
    assert nest.cost("depth=1") == 154
    nest.unwrap()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sn.check.IdleLayersWarning)
        nest = sn.wrap(m, sn.Depth("depth", [1, 4], layers=["blocks", "norms"]), example=x)
    assert nest.cost("depth=1") == 106 == sum(p.numel() for p in nest.export("depth=1").parameters())


def test_an_exit_per_depth_idle_at_a_shallow_depth_is_named():
    """``self.exits[len(self.blocks) - 1]``: at depth d only the d-th exit head runs, yet cost counted all four
    and export kept them (144 parameters for a 90-parameter sub-model; pick(params=100) found nothing), with
    nothing said (the zip form was warned of)."""
    class Exits(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
            self.exits = nn.ModuleList(nn.Linear(8, 2) for _ in range(4))

        def forward(self, x):
            for b in self.blocks:
                x = torch.relu(b(x))
            return self.exits[len(self.blocks) - 1](x)

    x = torch.randn(3, 8)
    m = Exits()
    with pytest.warns(sn.check.IdleLayersWarning, match=r"runs one entry of \['exits'\] at each depth d, the d-th.*"
                                                         r"54 idle parameters at depth 1.*layers=\[<the blocks>, "
                                                         r"'exits'\]"):
        nest = sn.wrap(m, sn.Depth("depth", [1, 2, 4], layers="blocks"), example=x)
    assert nest.cost("depth=1") == 144
    nest.unwrap()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sn.check.IdleLayersWarning)
        nest = sn.wrap(m, sn.Depth("depth", [1, 2, 4], layers=["blocks", "exits"]), example=x)
    assert nest.cost("depth=1") == 90 == sum(p.numel() for p in nest.export("depth=1").parameters())
    with torch.no_grad(), nest.use("depth=2"):
        torch.testing.assert_close(m(x), m.exits[1](torch.relu(m.blocks[1](torch.relu(m.blocks[0](x))))))
        torch.testing.assert_close(m(x), nest.export("depth=2")(x))


def test_layers_read_from_the_end_and_idle_at_a_shallow_depth_are_named():
    """``zip(self.blocks, reversed(self.norms))``: depth 1 runs the last norm only, yet cost counted all four and
    export kept them, with nothing said (the forward-order pairing was warned of). A Depth cannot cut a list's
    last entries: the warning says to order the list like the blocks. The outputs are the sub-models' own."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    m = _ZippedNorms(reverse=True)
    with pytest.warns(sn.check.IdleLayersWarning, match=r"runs only d entries of \['norms'\].*48 idle parameters at "
                                                         r"depth 1.*order that list like the blocks"):
        nest = sn.wrap(m, sn.Depth("depth", [1, 2, 4], layers="blocks"), example=x)
    with torch.no_grad(), nest.use("depth=1"):
        torch.testing.assert_close(m(x), m.head(m.norms[3](m.blocks[0](x))))
        torch.testing.assert_close(m(x), nest.export("depth=1")(x))


@pytest.mark.parametrize("how", ["value", "views"])
def test_a_custom_slicer_that_raises_is_named_and_the_model_left_as_it_was(how):
    """A slicer whose axes are swapped (``(1, "out")`` on a ``(out, in)`` weight) raised torch's own
    ``start (0) + length (16) exceeds dimension size (8)`` from wrap, naming neither module nor slicer."""
    axes = ((1, "out"), (0, "inp"))

    class Swapped(_ScaledSlicerBase):
        def value(self, m, name):
            return self.take(m, name, list(axes) if name == "weight" else [(0, "out")])

    if how == "views":  # (a views entry is checked against the tensor before anything changes)
        Swapped.views = {"weight": axes}
    _refused_at_wrap(Swapped, how, rf"slicer Swapped{how} of '0' raised reading 'weight'" if how == "value" else
                     rf"slicer Swapped{how} of '0' .*cuts 'weight' \(32, 8\) on axis 1 for role 'out'")


def _views(entries):
    return {"views": entries, "value": lambda self, m, name: self.take(m, name, list(entries[name]))}


@pytest.mark.parametrize("case, body, match", [
    # full() under-reports a role: the full model itself would have been cut (it was: 12.0 off, wrong costs)
    ("full_lies", {"full": lambda self, m, role: 16 if role == "out" else m._parameters["weight"].shape[1],
                   **_views({"weight": ((0, "out"), (1, "inp")), "scale": ((0, "out"),)})},
     r"largest size 16 gives 16 features, not that axis' 32: the full model itself would be cut"),
    ("axis_out_of_range", _views({"weight": ((0, "out"), (2, "inp")), "scale": ((0, "out"),)}),
     r"views\['weight'\] cuts axis 2 for role 'inp', but 'weight' has 2 axes"),
    # a tensor cut by a role no dimension binds here (scale by 'inp'): accepted, failing only at check
    ("wrong_unbound_role", _views({"weight": ((0, "out"), (1, "inp")), "scale": ((0, "inp"),)}),
     r"cuts 'scale' \(32,\) on axis 0 for role 'inp', whose full size is 8 .* by the wrong role"),
    ("not_pairs", {"views": {"weight": "out", "scale": ((0, "out"),)}},
     r"views\['weight'\] must be a tuple of \(axis, role\) pairs"),
    ("value_none", {"value": lambda self, m, name: None}, r"gives NoneType for 'weight' at h=32"),
    ("value_lies", {"value": lambda self, m, name: self.take(m, name, [(0, "out")])[:16]},
     r"gives 'weight' at the full sizes h=32 as \(16, 8\), but the module's 'weight' is \(32, 8\)"),
    ("unserved_attr", {"attrs": ("weight", "scale", "nothere"),
                       **_views({"weight": ((0, "out"), (1, "inp")), "scale": ((0, "out"),)})},
     r"raised reading 'nothere' at sizes"),
    # a stray factor: the right shape, other values (the full model itself changed; export the same, unseen)
    ("value_scaled", {"value": lambda self, m, name: self.take(m, name, [(0, "out"), (1, "inp")] if name == "weight"
                                                              else [(0, "out")]) * 2},
     r"gives 'weight' at the full sizes h=32 with other values than the module's 'weight' \(largest difference"),
    ("take_typo", {"value": lambda self, m, name: self.take(m, name, [(0, "ouput")] if name == "scale" else
                                                         [(0, "out"), (1, "inp")])},
     r"take\('scale', \.\.\.\) cuts by role 'ouput', which is not one of its roles \('out', 'inp'\)"),
    ("full_none", {"full": lambda self, m, role: None, **_views({"weight": ((0, "out"), (1, "inp")),
                                                                "scale": ((0, "out"),)})},
     r"slicer Unnamedfull_none of '0' \(_ScaledLinearfull_none\) returned NoneType None from full\(m, 'out'\)"),
    ("full_float", {"full": lambda self, m, role: torch.tensor(32.0), **_views({"weight": ((0, "out"), (1, "inp")),
                                                                             "scale": ((0, "out"),)})},
     r"returned Tensor tensor\(32\.\) from full\(m, 'out'\)"),
    ("full_raises", {"full": lambda self, m, role: m.no_such_attribute,
                     **_views({"weight": ((0, "out"), (1, "inp")), "scale": ((0, "out"),)})},
     r"slicer Unnamedfull_raises of '0' \(_ScaledLinearfull_raises\) raised in full\(\): AttributeError"),
])
def test_a_custom_slicer_that_does_not_fit_its_module_is_refused_before_anything_changes(case, body, match):
    """Each was accepted (a wrong full model, wrong costs) or raised a raw IndexError / ValueError /
    AttributeError / bare NotImplementedError, from wrap or later from export."""
    unnamed = type("Unnamed", (_ScaledSlicerBase,), dict(body))
    _refused_at_wrap(unnamed, case, match, sizes=(8, 16) if case == "full_lies" else (8, 16, 32))


class _FanIn(nn.Module):
    """Scales by its input count, an int kept beside the weight (served by a slicer of the user's own)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight, self.fan_in = nn.Parameter(torch.randn(n_out, n_in)), n_in

    def forward(self, x):
        return F.linear(x, self.weight) * self.fan_in ** -0.5


@pytest.mark.parametrize("served, match", [
    ("other_axis", r"gives 'fan_in' at the full sizes a=32,b=16 as int 16, but the module holds int 32"),
    ("none", r"gives 'fan_in' at the full sizes a=32,b=16 as NoneType None, but the module holds int 32"),
    ("float", None),  # 32.0 for 32: the same number, accepted
    ("numpy", None),  # np.int64(32)
    ("tensor", None),  # torch.tensor(32): a 0-dim tensor of the number
    ("right", None),
])
def test_a_custom_slicer_serving_another_int_at_the_full_sizes_is_refused(served, match):
    """``fan_in`` read from the wrong axis (16 where the module has 32), or served as None, passed wrap and check:
    the largest sub-model was no longer the model as it was, and export copied the same value (unseen)."""
    cls = type(f"_FanIn{served}", (_FanIn,), {})

    @sn.slicer(cls)
    class FanIn(sn.Slicer):
        roles, attrs = ("out", "inp"), ("weight", "fan_in")
        views = {"weight": ((0, "out"), (1, "inp"))}

        def full(self, m, role):
            return m._parameters["weight"].shape[0 if role == "out" else 1]

        def value(self, m, name):
            w = self.take(m, "weight", [(0, "out"), (1, "inp")])
            return {"other_axis": w.shape[0], "none": None, "float": float(w.shape[1]), "numpy": np.int64(w.shape[1]),
                    "tensor": torch.tensor(w.shape[1]), "right": w.shape[1]}[served]

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), cls(32, 16), nn.ReLU(), nn.Linear(16, 2))
    ref = m(x).detach()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    dims = sn.Width("a", [8, 32], out="0", inp="2"), sn.Width("b", [4, 16], out="2", inp="4")
    if match is None:
        nest = sn.wrap(m, *dims, example=x)
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
        with nest.use("a=8,b=4"):
            assert m[2].fan_in == 8
        return
    with pytest.raises(sn.SortedNetError, match=match):
        sn.wrap(m, *dims)
    assert type(m[2]) is cls and m[2].fan_in == 32 and "_sn" not in m[2].__dict__
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


class _ScaledValues(nn.Module):
    """Holds the values a slicer of the user's serves computed otherwise: a float scale, a shape tuple, a flag and
    an integer step buffer."""

    def __init__(self, n_in=8, n_out=32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.register_buffer("steps", torch.tensor([3, 123456789]))
        self.scale, self.shape, self.flag = 1 / math.sqrt(n_out), (-1, n_out), True

    def forward(self, x):
        y = (F.linear(x, self.weight) * self.scale).reshape(self.shape) if self.flag else x
        return y + (self.steps.sum() % 7)


@pytest.mark.parametrize("served, ok", [
    ("computed_alike", True),   # k ** -0.5 (1 ulp from 1 / sqrt(k)), torch.Size for (-1, k), np.bool_
    ("steps_fraction", False),  # the integer buffer served as floats + 0.5: the full model changed
    ("steps_float32", False),   # ... as float32, which rounds 123456789 (compared in float32: equal)
    ("weight_bf16", False),     # a rounding cast of the weight at the full sizes: the full model changed
    ("shape_list", True),       # a list for the tuple: the same shape
])
def test_the_full_size_check_compares_values_computed_another_way_as_equal(served, ok):
    """The check of a custom slicer's full-size values refused a float computed another way (one ulp apart), a
    list (or torch.Size) for a tuple and np.bool_(True) for True; it passed an integer buffer served as
    fractions (compared after a cast to the buffer's integer dtype)."""
    cls = type(f"_ScaledValues{served}", (_ScaledValues,), {})

    @sn.slicer(cls)
    class Scaled(sn.Slicer):
        roles, attrs = ("out",), ("weight", "scale", "shape", "flag", "steps")

        def full(self, m, role):
            return m._parameters["weight"].shape[0]

        def value(self, m, name):
            w = self.take(m, "weight", [(0, "out")])
            k = w.shape[0]
            steps = m._buffers["steps"]
            return {"weight": w.bfloat16() if served == "weight_bf16" else w, "scale": k ** -0.5,
                    "shape": [-1, k] if served == "shape_list" else torch.Size([-1, k]),
                    "flag": np.bool_(True),
                    "steps": {"steps_fraction": steps + 0.5, "steps_float32": steps.float()}.get(served, steps)}[name]

    torch.manual_seed(0)
    m = nn.Sequential(cls(), nn.ReLU(), nn.Linear(32, 2))
    assert 1 / math.sqrt(32) != 32 ** -0.5  # (the two spellings differ in the last bit)
    dims = sn.Width("h", [8, 32], out="0", inp="2")
    if ok:
        sn.wrap(m, dims, example=torch.randn(3, 8)).unwrap()
        return
    with pytest.raises(sn.SortedNetError, match=rf"gives '{served.split('_')[0]}' at the full sizes h=32 with "
                                                r"other values than the module's"):
        sn.wrap(m, dims)
    assert type(m[0]) is cls


class _Float8Linear(nn.Module):
    """Weight-only float8 quantisation: a float8 weight buffer dequantised in forward, and a sparse mask buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", (torch.randn(16, 8) / 3).to(torch.float8_e4m3fn))
        self.register_buffer("mask", torch.ones(16, 8).to_sparse())
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return F.linear(x, self.qweight.float()) * self.scale


@pytest.mark.parametrize("served", ["views", "float32", "scaled", "float32_scaled", "float32_nudged"])
def test_the_full_size_check_compares_float8_and_sparse_tensors(served):
    """The full-size value check crashed wrap with a raw NotImplementedError on a float8 weight (``torch.equal``
    has no float8 kernel) and on a sparse buffer, the model rolled back: float8 values are compared as the float32
    values they are (a value served in another dtype cast to float8 first), sparse ones by their dense values; a
    float8 weight served doubled, in float8 or float32, is refused (skipped once the first fix compared bytes), and
    so is one served in float32 1% off, which a cast back to float8 rounded away (float8 values are exact in
    float32: compared there)."""
    cls = type(f"_Float8Linear{served}", (_Float8Linear,), {})

    @sn.slicer(cls)
    class Q(sn.Slicer):
        roles, attrs = ("out", "inp"), ("qweight", "scale", "mask")
        views = {"scale": ((0, "out"),)}

        def full(self, m, role):  # (a 0-dim integer tensor: read as the int it holds)
            return torch.tensor(m._buffers["qweight"].shape)[0 if role == "out" else 1]

        def value(self, m, name):
            if name == "mask":
                return m._buffers["mask"]
            q = self.take(m, "qweight", [(0, "out"), (1, "inp")])
            return {"scaled": (q.float() * 2).to(torch.float8_e4m3fn), "float32": q.float(),
                    "float32_scaled": q.float() * 2, "float32_nudged": q.float() * 1.01}.get(served, q)

    torch.manual_seed(0)
    m = nn.Sequential(cls(), nn.ReLU(), nn.Linear(16, 2))
    dims = sn.Width("h", [4, 16], out="0", inp="2")
    if served in ("views", "float32"):
        x = torch.randn(3, 8)
        ref = m(x)
        nest = sn.wrap(m, dims)  # (no example: check exports, and a sparse buffer does not export)
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
        with nest.use("h=4"):
            assert m[0].qweight.shape == (4, 8)
            torch.testing.assert_close(m(x), m[2](F.relu(F.linear(x, m[0].qweight.float()) * m[0].scale)))
        return
    with pytest.raises(sn.SortedNetError, match=r"gives 'qweight' at the full sizes h=16 with other values"):
        sn.wrap(m, dims)
    assert type(m[0]) is cls


def test_a_slicer_declaring_attrs_as_a_string_is_refused_at_registration():
    bad = type("AttrsStr", (_ScaledSlicerBase,), {"attrs": "weight"})
    with pytest.raises(sn.SortedNetError, match=r"slicer AttrsStr: attrs must be a tuple of names.*got 'weight'"):
        sn.slicer(type("_ScaledLinearAttrsStr", (_ScaledLinear,), {}))(bad)
    with pytest.raises(sn.SortedNetError, match=r"views must be a dict"):
        sn.slicer(type("_ScaledLinearViews", (_ScaledLinear,), {}))(
            type("ViewsList", (_ScaledSlicerBase,), {"views": [("weight", ((0, "out"),))]}))


def test_slicer_declarations_as_lists_mappings_and_numpy_axes_are_served():
    """Declarations written as lists, a read-only mapping or NumPy axes served right before the checks of
    registration and of views entries came in: they stay accepted, and the sub-models equal the masked model."""
    import types

    views = {"weight": [[np.int64(0), "out"], [1, "inp"]], "scale": [(0, "out")]}
    decl = type("Lists", (_ScaledSlicerBase,), {"roles": ["out", "inp"], "attrs": ["weight", "scale"], "static": [],
                                                "views": types.MappingProxyType(views)})
    cls = type("_ScaledLinearLists", (_ScaledLinear,), {})
    sn.slicer(cls)(decl)
    torch.manual_seed(0)
    m, x = nn.Sequential(cls(8, 32), nn.ReLU(), nn.Linear(32, 2)).eval(), torch.randn(4, 8)
    nest = sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"), example=x)
    with torch.no_grad(), nest.use("h=8"):
        y = m(x)
        masked = F.linear(torch.relu(F.linear(x, m[0]._parameters["weight"][:8]) * m[0]._parameters["scale"][:8]),
                          m[2]._parameters["weight"][:, :8], m[2]._parameters["bias"])
    torch.testing.assert_close(y, masked)


def test_an_exception_of_the_slicers_own_check_reaches_the_caller_as_it_is():
    class Mine(Exception):
        pass

    def check(self, m, bind, path):
        raise Mine(f"{path} is not for me")

    cls = type("_ScaledLinearMine", (_ScaledLinear,), {})
    sn.slicer(cls)(type("MineSlicer", (_ScaledSlicerBase,), {
        "check": check, **_views({"weight": ((0, "out"), (1, "inp")), "scale": ((0, "out"),)})}))
    m = nn.Sequential(cls(8, 32), nn.ReLU(), nn.Linear(32, 2))
    with pytest.raises(Mine, match="0 is not for me"):
        sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"))
    assert type(m[0]) is cls and "_sn" not in m[0].__dict__


def test_a_linear_subclass_computing_in_features_as_a_property_is_refused():
    """sortednet serves in_features itself; the subclass's property was replaced (a raw KeyError from wrap)."""

    class PropLinear(nn.Linear):
        @property
        def in_features(self):
            return self.weight.shape[1]

        @in_features.setter
        def in_features(self, v):
            pass

    m = nn.Sequential(PropLinear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(sn.PatternError, match=r"'0' \(PropLinear\) defines 'in_features' as a property"):
        sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    assert type(m[0]) is PropLinear and "_sn" not in m[0].__dict__
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


class _Shifted(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.shift = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return F.linear(x, self.weight) + self.shift


@sn.slicer(_Shifted)
class _ShiftForgotten(sn.Slicer):
    roles = ("out", "inp")
    attrs = ("weight",)  # the mistake: 'shift' left out

    def full(self, m, role):
        return m._parameters["weight"].shape[0 if role == "out" else 1]

    def value(self, m, name):
        return self.take(m, name, [(0, "out"), (1, "inp")])


def test_check_names_a_tensor_a_custom_slicer_leaves_out():
    """check refused, but blamed the (right) inp= binding of the next layer: the cause is the custom slicer's
    attrs, which leave out a tensor of the sliced role's full size."""
    m = nn.Sequential(_Shifted(8, 32), nn.ReLU(), nn.Linear(32, 2))
    with pytest.raises(sn.SortedNetError, match=r"leave out of attrs: 0\.shift \(32,\) has the full size of the "
                                                r"sliced role 'out'"):
        sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"), example=torch.randn(3, 8))
    ok = sn.wrap(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)), sn.Width("h", [8, 32], out="0"))
    assert ok._unlisted_tensors(None) == ""
    with pytest.raises(sn.SortedNetError) as e:  # (the right bindings are not called wrong: "remove that binding")
        sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"), example=torch.randn(3, 8))
    assert "remove that binding" not in str(e.value) and "the slicer _ShiftForgotten of your own serves" in \
        str(e.value)


@pytest.mark.parametrize("bug", ["untouched", "full_copy"])
def test_a_custom_export_that_leaves_the_full_tensor_is_named(bug):
    class Exporting(_AffineSlicer):
        def export(self, live, copy_):
            if bug == "full_copy":
                copy_._parameters["W"] = nn.Parameter(live._parameters["W"].detach().clone())
                copy_._parameters["b"] = nn.Parameter(live._parameters["b"].detach().clone())
            return copy_

    class Mine(_Affine):
        pass

    sn.slicer(Mine)(Exporting)
    torch.manual_seed(0)
    m = nn.Sequential(Mine(4, 16), nn.ReLU(), nn.Linear(16, 3))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
    what = "the live tensor itself" if bug == "untouched" else r"a tensor of shape \(16, 4\)"
    with pytest.raises(sn.SortedNetError, match=rf"Exporting.export left {what} as 0.W, where the live module "
                                                r"reads \(8, 4\)"):
        nest.export("h=8")
    with pytest.raises(sn.SortedNetError, match="Exporting.export left"):
        nest.check(torch.randn(2, 4))


class _TLinear(nn.Module):
    """A weight stored (in, out), its output size kept as an int the forward does not read."""

    def __init__(self, i, o):
        super().__init__()
        self.weight, self.bias, self.out_features = nn.Parameter(torch.randn(i, o)), nn.Parameter(torch.randn(o)), o

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.mark.parametrize("size", ["int", "tuple"])
def test_a_custom_export_that_leaves_a_size_at_full_is_named(size):
    """A declared size (in attrs and static) that the slicer's export put back at its full value exported a module
    saying out_features=20 around a (16, 4) weight: wrap(example=), check and export passed in silence."""
    class Mine(_TLinear):
        pass

    @sn.slicer(Mine)
    class FullSize(sn.Slicer):
        roles, attrs, static = ("out", "inp"), ("weight", "bias", "out_features"), ("out_features",)
        views = {"weight": ((0, "inp"), (1, "out")), "bias": ((0, "out"),)}

        def full(self, m, role):
            return m._parameters["weight"].shape[1 if role == "out" else 0]

        def value(self, m, name):
            n = m._sn.bind["out"].total()
            return n if size == "int" else (n,)

        def export(self, live, copy_):  # the mistake: the full value kept
            copy_ = sn.Slicer.export(self, live, copy_)
            copy_.__dict__["out_features"] = live.__dict__["out_features"] if size == "int" else (20,)
            return copy_

    model = nn.Sequential(nn.Linear(6, 16), Mine(16, 20), nn.ReLU(), nn.Linear(20, 3))
    model[1].out_features = 20 if size == "int" else (20,)
    shown = "20" if size == "int" else r"\(20,\)"
    with pytest.raises(sn.SortedNetError, match=rf"FullSize.export left out_features = {shown} on 1, where the live "
                                                r"module reads \(?4"):
        sn.wrap(model, sn.Width("a", [4, 20], out="1", inp="3"), example=torch.randn(5, 6))
    assert type(model[1]) is Mine
    nest = sn.wrap(model, sn.Width("a", [4, 20], out="1", inp="3"))
    with pytest.raises(sn.SortedNetError, match="FullSize.export left out_features"):
        nest.export("a=4")
    assert nest.export("a=20")[1].out_features == model[1].out_features


class _PerLayer(nn.Module):
    """Returns the logits and one hidden state per block (as ``output_hidden_states``)."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        h, hs = self.inp(x), []
        for b in self.blocks:
            h = h + torch.relu(b(h))
            hs.append(h)
        return self.head(h), tuple(hs)


def test_check_lets_a_per_layer_output_follow_depth_and_still_names_a_width_fault():
    """A Depth sub-model returns fewer per-layer states (the export does the same): check compared them with
    the full model's and refused every such model; it compares with the full widths at the same depth."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    nest = sn.wrap(_PerLayer(), sn.Depth("d", [1, 2, 3], layers="blocks"), example=x)
    with torch.no_grad(), nest.use("d=2"):
        assert len(nest.model(x)[1]) == 2
    nest.unwrap()
    with pytest.raises(sn.SortedNetError, match="slices the network's output"):   # blocks.* outputs sliced
        sn.wrap(_PerLayer(), sn.Depth("d", [1, 3], layers="blocks"),
                sn.Width("w", [8, 16], out=["inp", "blocks.*"], inp=["blocks.*", "head"]), example=x)


class _StreamResizer(nn.Module):
    """A residual block, then a block that re-sizes the stream the head reads: a depth that drops the second
    hands the head the first's width."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.steps = nn.ModuleList([
            nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 16, 1)),
            nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.GELU())])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.steps[0](x)
        for blk in self.steps[1:]:
            x = blk(x)
        return self.head(x.mean((2, 3)))


class _Stacked(nn.Module):
    """Returns its per-layer states stacked on ``axis`` (with the embedding state, and a final one), or
    concatenated on the features: a lower depth returns fewer."""

    def __init__(self, axis: int, how: str = "stack"):
        super().__init__()
        self.blocks, self.axis, self.how = nn.ModuleList(nn.Linear(8, 8) for _ in range(4)), axis, how
        self.final = nn.LayerNorm(8)

    def forward(self, x):
        hs = [x]
        for b in self.blocks:
            x = b(x)
            hs.append(x)
        hs.append(self.final(x))
        join = torch.stack if self.how == "stack" else torch.cat
        return self.final(x), join(hs, self.axis), join(hs[1:-1], self.axis)


class _Maps(nn.Module):
    """An attention that also returns its attention maps, one per head (``output_attentions=True``)."""

    def __init__(self, E: int = 16, H: int = 4):
        super().__init__()
        self.num_heads = H
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return self.o((a @ v).transpose(1, 2).reshape(B, T, -1)), a


@pytest.mark.parametrize("axis, how", [(0, "stack"), (1, "stack"), (-1, "stack"), (-1, "cat"), (0, "cat")])
def test_per_layer_states_stacked_or_concatenated_follow_depth_and_attention_maps_follow_heads(axis, how):
    """A lower depth may return fewer stacked / concatenated per-layer states (any count per layer, with an
    embedding and a final state), fewer heads shorter attention maps: all valid, all accepted."""
    x = torch.randn(3, 8)
    nest = sn.wrap(_Stacked(axis, how), sn.Depth("d", [1, 2, 4], layers="blocks"), example=x)
    with torch.no_grad(), nest.use("d=2"):
        assert nest.model(x)[1].shape[axis] == (4 if how == "stack" else 4 * 8 if axis else 4 * 3)
    torch.manual_seed(0)
    nest = sn.wrap(_Maps(), sn.Heads("h", [1, 2, 4], attn=""), example=torch.randn(2, 5, 16))
    with torch.no_grad(), nest.use("h=2"):
        assert nest.model(torch.randn(2, 5, 16))[1].shape == (2, 2, 5, 5)


class _Widening(nn.Module):
    """Block 2 widens the stream and block 3 narrows it back: depth 3 hands the head 32 features."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 32), nn.Linear(32, 16)])
        self.head = nn.Linear(16, 7)

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return self.head(x)


def test_every_depth_is_checked_even_alone():
    """Only the smallest, the largest and random mixes ran for a nest of one Depth: the middle depth that fails
    was accepted by chance."""
    m = _Widening()
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"depth 'd' at 3 \(d=3\) fails: RuntimeError"):
        sn.wrap(m, sn.Depth("d", [1, 2, 3, 4], layers="blocks"), example=torch.randn(10, 16))
    assert_unchanged(m, before)


class _Backbone(nn.Module):
    """Stride-2 stages returning their feature map: a lower depth returns a larger one (a valid model)."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
                                    for _ in range(3))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        return x


def test_a_lower_depth_may_return_a_larger_feature_map():
    nest = sn.wrap(_Backbone(), sn.Depth("d", [1, 2, 3], layers="stages"), example=torch.randn(2, 3, 16, 16))
    with torch.no_grad(), nest.use("d=1"):
        assert nest.model(torch.randn(2, 3, 16, 16)).shape == (2, 8, 8, 8)


class _Downsampling(nn.Module):
    """A stage list whose third block doubles the channels (and halves the map): the head reads its width."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                                    nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Conv2d(32, 32, 3, padding=1))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("sizes", [[1, 2, 3, 4], [2, 4]])
def test_a_depth_dropping_a_block_that_resizes_the_stream_is_refused_naming_the_block(sizes):
    """A depth that drops the downsampling block hands the head 16 channels for 32: check named only the layer
    that failed (the head) and guessed at two causes; it names the dropped block, with the shapes it maps
    between in the largest sub-model. Depths that keep it are accepted and export as they run."""
    torch.manual_seed(0)
    m = _Downsampling().eval()
    before = snapshot(m)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(sn.SortedNetError, match=r"(?s)raised in 'head' \(Linear\).*'blocks\.2' \(Conv2d\) maps "
                                                r"\[2, 16, 8, 8\] to \[2, 32, 4, 4\]") as e:
        sn.wrap(m, sn.Depth("d", sizes, layers="blocks"), example=x)
    assert "'blocks.3'" not in str(e.value) and "'blocks.1'" not in str(e.value)  # (keep the stream's shape)
    assert_unchanged(m, before)
    nest = sn.wrap(m, sn.Depth("d", [3, 4], layers="blocks"), example=x)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(nest.export(sub)(x), m(x))


class _CountsItsBlocks(nn.Module):
    """Blocks of 8 channels, one of them halving the feature map (harmless: the head pools), and a forward that
    counts the blocks itself (``range(self.n)``): the fault under a lower depth."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                     nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1)])
        self.n, self.head = 4, nn.Linear(8, 3)

    def forward(self, x):
        for i in range(self.n):
            x = self.blocks[i](x)
        return self.head(x.mean((2, 3)))


class _AssertsItsWidth(nn.Module):
    """A dropped block widens the stream, and the forward checks the width with an ``assert``."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 16)])
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        assert x.shape[-1] == 16, f"expected 16 features, got {x.shape[-1]}"
        return self.out(x)


def test_a_dropped_block_resizing_the_stream_is_named_whatever_error_the_forward_raises():
    """The shape check that fails may be the user's own (an assert, a ValueError), not a PyTorch kernel's."""
    torch.manual_seed(0)
    with pytest.raises(sn.SortedNetError, match=r"(?s)AssertionError.*'blocks\.2' \(Linear\) maps \[2, 4, 8\] to "
                                                r"\[2, 4, 16\]"):
        sn.wrap(_AssertsItsWidth().eval(), sn.Depth("d", [2, 3], layers="blocks"), example=torch.randn(2, 4, 8))


def test_a_forward_counting_its_blocks_is_named_not_a_dropped_block_that_resizes_the_map():
    """The forward indexes past the kept blocks (an IndexError): check blamed the dropped block that halves the
    feature map (a shape change that never failed) and advised a Width. A block re-sizing the stream is named
    only where a shape check failed; here the hint names the count."""
    torch.manual_seed(0)
    m = _CountsItsBlocks().eval()
    with pytest.raises(sn.SortedNetError, match=r"(?s)IndexError.*range\(self\.num_layers\).*len\(\)") as e:
        sn.wrap(m, sn.Depth("d", [2, 4], layers="blocks"), example=torch.randn(2, 8, 8, 8))
    assert "'blocks.2'" not in str(e.value)


def test_a_depth_that_hands_on_another_width_is_refused():
    """A wiring a fuzzer found accepted by ``wrap(example=)``: a Depth that drops a block re-sizing the stream
    (18 of 54 listed sub-models raised a raw shape error at forward; the smallest, the largest, each dimension
    alone and the mixed samples all happened to run). Refused naming the depth. (A lower depth may change the
    output's shapes: fewer per-layer states, a feature map downsampled fewer times; ``check`` compares with
    the full widths at the same depth.)"""
    torch.manual_seed(0)
    m = _StreamResizer().eval()
    before = snapshot(m)
    dims = [sn.Width("stem", [4, 8, 16], out=["stem", "steps.0.3"], inp=["steps.0.0", "steps.1.0"]),
            sn.Width("inner", [2, 4, 8], out=["steps.0.0"], inp=["steps.0.3"], norm=["steps.0.1"]),
            sn.Width("last", [4, 8, 16], out=["steps.1.0"], inp=["head"]),
            sn.Depth("dd", [1, 2], layers="steps")]
    with pytest.raises(sn.SortedNetError, match=r"(?s)depth 'dd' at 1 with width '(stem|last)'.*re-size the stream"):
        sn.wrap(m, *dims, example=torch.randn(2, 3, 8, 8))
    assert_unchanged(m, before)
    nest = sn.wrap(m, *dims)  # without an example: as declared; the faulty sub-models are the ones check names
    bad = []
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            try:
                m(torch.randn(2, 3, 8, 8))
            except RuntimeError:
                bad.append(sub)
    assert bad and all(sub["dd"] == 1 and sub["stem"] != sub["last"] for sub in bad)


class _ConvBlocks(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()) for _ in range(n)])
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("between", [0, 1, 2])
def test_a_width_between_middle_blocks_is_checked_at_every_depth_that_ends_there(between):
    """A Width bound only between blocks ``between`` and ``between + 1`` of a Depth: the depth that ends at the
    narrowed block hands the head the small width. Only the shallowest and deepest depths below full ran with the
    width at its smallest: the middle case (d=2, w=8) passed check and then raised a raw shape error."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    dims = (sn.Depth("d", [1, 2, 3, 4], layers="blocks"),
            sn.Width("w", [8, 16], out=f"blocks.{between}.0", inp=f"blocks.{between + 1}.0"))
    m = _ConvBlocks().eval()
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=rf"\(d={between + 1},w=8\) fails"):
        sn.wrap(m, *dims, example=x)
    assert_unchanged(m, before)


class _FunctionalQKV(nn.Module):
    """Attention whose q / k / v Linears are read through ``F.linear(x, p.weight, p.bias)``: they run no forward of
    their own."""

    def __init__(self, e=32, h=4):
        super().__init__()
        self.num_heads, self.head_dim = h, e // h
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (F.linear(x, p.weight, p.bias).view(b, t, -1, self.head_dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


def test_an_attention_reading_its_projections_weights_is_checked_not_taken_for_one_key_position():
    """check (and wrap(example=)) refused this valid attention as 'attention over one key position' on an example
    of six: the noise meant for the queries and keys went to hooks on projections that never run. Their weights
    get the noise now (on the check's private view), so one position is still told apart from six."""
    torch.manual_seed(0)
    m = _FunctionalQKV().eval()
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="one key position"):
        sn.wrap(m, sn.Heads("h", [1, 2, 4], attn=""), example=torch.randn(2, 1, 32))
    assert_unchanged(m, before)
    x = torch.randn(2, 6, 32)
    nest = sn.wrap(m, sn.Heads("h", [1, 2, 4], attn=""), example=x)
    nest.check(x)
    assert all(p is q for p, (_, q) in zip(m.parameters(), before["params"]))
    with torch.no_grad(), nest.use("h=2"):
        torch.testing.assert_close(nest.export("h=2")(x), m(x), rtol=1e-5, atol=1e-6)  # (other BLAS layouts)


class _MultiQuery(nn.Module):
    """One key/value head read by every query head (PaLM, Falcon-7B, Gemma-2B): ``repeat`` says how its forward
    learns how many query heads there are."""

    def __init__(self, repeat: str, E: int = 32, H: int = 4, d: int = 8):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.repeat = H, d, 1, repeat
        self.num_key_value_groups = H  # (transformers' name: query heads per key/value head)
        self.rep = H                    # (a name Heads does not know)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(E, H * d), nn.Linear(E, d), nn.Linear(E, d)
        self.o_proj = nn.Linear(H * d, E)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (p(x).view(B, T, 1, self.head_dim).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        n = {"groups": self.num_key_value_groups, "computed": self.num_heads // self.num_kv_heads,
             "expand": None, "unknown": self.rep}[self.repeat]
        k, v = (k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1)) if n is None else \
            (k.repeat_interleave(n, 1), v.repeat_interleave(n, 1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class _MQABlock(nn.Module):
    def __init__(self, repeat: str):
        super().__init__()
        self.attn, self.head = _MultiQuery(repeat), nn.Linear(32, 5)

    def forward(self, x):
        return self.head(x + self.attn(x))


@pytest.mark.parametrize("repeat", ["groups", "computed", "expand"])
def test_multi_query_attention_takes_any_number_of_heads(repeat):
    """k / v of one head stay whole and every query-head count is a sub-model (it was refused: 'sizes that
    are multiples of 4'); each equals the full model with the other heads' output columns zeroed."""
    torch.manual_seed(0)
    model, x = _MQABlock(repeat).eval(), torch.randn(2, 6, 32)
    ref = __import__("copy").deepcopy(model)
    nest = sn.wrap(model, sn.Heads("h", [1, 2, 3, 4], attn="attn"), example=x)
    for sub in nest.submodels:
        masked = __import__("copy").deepcopy(ref)
        with torch.no_grad():
            masked.attn.o_proj.weight[:, sub["h"] * 8:] = 0
            with nest.use(sub):
                live = model(x)
            small = nest.export(sub)
            torch.testing.assert_close(live, masked(x), atol=1e-5, rtol=0)
            torch.testing.assert_close(small(x), live, atol=1e-5, rtol=0)
        assert small.attn.k_proj.out_features == 8 and small.attn.q_proj.out_features == sub["h"] * 8
        assert nest.cost(sub) == sum(p.numel() for p in small.parameters())


def test_multi_query_attention_with_a_repeat_count_of_its_own_is_refused_by_the_check():
    torch.manual_seed(0)
    model, x = _MQABlock("unknown").eval(), torch.randn(2, 6, 32)
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match="heads 'h' at 1"):
        sn.wrap(model, sn.Heads("h", [1, 2, 4], attn="attn"), example=x)
    assert_unchanged(model, before)


class _CrossAttentionOwnCount(nn.Module):
    """Cross-attention (two inputs) keeping its head count under a name Heads does not know."""

    def __init__(self, E: int = 32, H: int = 4):
        super().__init__()
        self.num_heads, self.h = H, H
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))

    def forward(self, x, ctx):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, -1).transpose(1, 2)  # (self.h: the full count at every size)
        k, v = (p(ctx).view(B, ctx.shape[1], self.h, -1).transpose(1, 2) for p in (self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))


class _CrossBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _CrossAttentionOwnCount()

    def forward(self, x, ctx):
        return self.attn(x, ctx)


def test_an_attention_wrap_cannot_run_alone_is_named_in_a_warning():
    """wrap without an example runs single-input attention alone; a cross-attention (two inputs) was passed
    in silence, and this one gives sub-models 0.02-0.05 off the first heads: now a warning names it, and
    wrap(example=) refuses it."""
    import warnings

    from sortednet.check import UnverifiedHeadsWarning

    torch.manual_seed(0)
    model, x, ctx = _CrossBlock().eval(), torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    with pytest.warns(UnverifiedHeadsWarning, match=r"\['attn'\]"):
        nest = sn.wrap(model, sn.Heads("h", [1, 2, 4], attn="attn", qkv=("q", "k", "v"), o="o"))
    nest.unwrap()
    with pytest.raises(sn.SortedNetError, match="heads 'h'"):
        sn.wrap(model, sn.Heads("h", [1, 2, 4], attn="attn", qkv=("q", "k", "v"), o="o"), example=(x, ctx))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedHeadsWarning)  # a self-attention it runs: no warning
        sn.wrap(_MQABlock("groups").eval(), sn.Heads("h", [2, 4], attn="attn"))


class _MaskedAttention(nn.Module):
    """Self-attention taking a mask (a second required input): whole heads, verified only on an example."""

    def __init__(self, E: int = 32, H: int = 4):
        super().__init__()
        self.num_heads = H
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))

    def forward(self, x, mask):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class _MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = _MaskedAttention(), nn.Linear(32, 3)

    def forward(self, x):
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return self.head(x + self.attn(x, mask))


def test_the_unverified_heads_warning_is_only_for_wrap_without_an_example(tmp_path):
    """discover (which measures whole heads on its example) and sn.load (which takes no example) wrap
    internally: they gave the warning meant for wrap without an example, telling the user to pass one."""
    import warnings

    from sortednet.check import UnverifiedHeadsWarning

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedHeadsWarning)
        dims = sn.discover(_MaskedNet().eval(), x, ratios=[0.5, 1.0])
        assert any(d.kind == "heads" for d in dims), dims
        model = _MaskedNet().eval()
        nest = sn.wrap(model, sn.Heads("h", [2, 4], attn="attn", qkv=("q", "k", "v"), o="o"), example=x)
        path = str(tmp_path / "n.safetensors")
        sn.save(nest, path)
        sn.load(_MaskedNet().eval(), path)
    with pytest.warns(UnverifiedHeadsWarning, match="attn"):
        sn.wrap(_MaskedNet().eval(), sn.Heads("h", [2, 4], attn="attn", qkv=("q", "k", "v"), o="o"))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes (add_note) are Python 3.11+")
def test_a_raw_error_under_an_unchecked_sub_model_gets_a_note_pointing_at_check():
    """A nest wrapped without an example runs its wiring unchecked: a forgotten binding surfaces as PyTorch's raw
    error at forward. The error keeps its type and message (code catching it still works) and gains a note naming
    the sub-model and ``nest.check``; errors of the full model, errors already in flight and sortednet's own
    errors get none."""
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3))
    nest = sn.wrap(m, sn.Width("ch", [4, 8, 16], out="0", inp="3"))  # BatchNorm '1' forgotten
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements") as e:
        with nest.use(nest.smallest):
            m(x)
    assert any("sub-model ch=4" in n and "nest.check(example)" in n for n in e.value.__notes__)
    with pytest.raises(RuntimeError) as e:  # the full model's own error: no note
        m(torch.randn(2, 5, 8, 8))
    assert not getattr(e.value, "__notes__", None)
    try:
        raise ValueError("in flight")
    except ValueError as outer:
        with nest.use(nest.smallest), pytest.raises(RuntimeError):
            m(x)
        assert not getattr(outer, "__notes__", None)
    checked = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                      sn.Width("h", [4, 8], out="0", inp="2"), example=torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="cannot be multiplied") as e:
        with checked.use(checked.smallest):
            checked.model(torch.randn(3, 5))
    assert e.value.__notes__ == ["(sortednet: raised while running sub-model h=4)"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes (add_note) are Python 3.11+")
@pytest.mark.parametrize("how", ["wrap", "check"])
def test_checks_own_refusal_does_not_tell_the_user_to_run_check(how):
    """The raw error under check's own refusal (its ``__cause__``) carried the note for unchecked nests ("wrapped
    without an example ... nest.check(example) names ..."), printed in the traceback of a user who had passed an
    example or was running check: only the sub-model is named there."""
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    dim, x = sn.Width("h", [4, 8], out="0"), torch.randn(3, 4)  # inp="2" forgotten
    with pytest.raises(sn.SortedNetError, match="h=4") as e:
        if how == "wrap":
            sn.wrap(m, dim, example=x)
        else:
            sn.wrap(m, dim).check(x)
    assert e.value.__cause__.__notes__ == ["(sortednet: raised while running sub-model h=4)"]


def test_a_meta_model_or_example_is_refused_by_check_not_a_raw_error():
    """``wrap(meta_model, ..., example=meta_x)`` leaked PyTorch's NotImplementedError (``aten::equal`` on Meta)."""
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    classes, params = [type(c) for c in m.modules()], list(m.parameters())  # (meta tensors have no values)
    with pytest.raises(sn.SortedNetError, match="meta device"):
        sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2"), example=torch.empty(3, 4, device="meta"))
    assert [type(c) for c in m.modules()] == classes and all(a is b for a, b in zip(m.parameters(), params))
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2"))  # without an example: as documented
    with pytest.raises(sn.SortedNetError, match="profile: the model is on the meta device"):  # (timed nothing)
        nest.profile(torch.empty(3, 4, device="meta"), repeat=1, progress=False)
    m.to_empty(device="cpu")
    for p in m.parameters():
        torch.nn.init.normal_(p)
    nest.check(torch.randn(3, 4))


class _Blocks(nn.Module):
    """Four residual blocks in a layer list; ``how`` is how the forward reaches them."""

    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        act = nn.GELU()  # one activation module every block holds: runs under every depth, legitimately
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), act) for _ in range(4))
        self.head, self.how = nn.Linear(8, 2), how
        if how == "registered":
            self.lins = nn.ModuleList(b[0] for b in self.layers)
        elif how == "list":
            self.__dict__["lins"] = [b[0] for b in self.layers]
        elif how == "weights":
            self.__dict__["ws"] = [(b[0].weight, b[0].bias) for b in self.layers]

    def forward(self, x):
        if self.how in ("registered", "list"):
            for lin in self.lins:
                x = x + lin(x)
        elif self.how == "weights":
            for w, b in self.ws:
                x = x + torch.nn.functional.linear(x, w, b)
        else:
            for blk in self.layers:
                x = x + blk(x)
        return self.head(x)


@pytest.mark.parametrize("how", ["list", "weights"])
def test_depth_whose_layers_the_forward_reaches_outside_the_list_is_refused(how):
    """The blocks' layers (or weights) held in a plain list and called from there ran under every depth: the depth
    changed nothing, check accepted it, cost counted 99 parameters of a forward reading 315, and the export
    carried weights it did not register. check now runs the shallowest depth with a hook on every layer of the
    skipped blocks and watches every op for their weights."""
    m = _Blocks(how)
    params = list(m.parameters())
    with pytest.raises(sn.SortedNetError, match="skips the block holding 'layers.1.0.*the forward ran it"):
        sn.wrap(m, sn.Depth("d", [1, 4], layers="layers"), example=torch.randn(3, 8))
    assert all(a is b for a, b in zip(m.parameters(), params)) and type(m.layers) is nn.ModuleList


def test_depth_with_layers_registered_twice_is_consistent_and_a_held_list_never_called_is_fine():
    """Layers registered in a second ModuleList run under every depth, and the export keeps them too: cost and
    export describe what the forward computes (the depth is useless, not wrong). A plain list of the blocks'
    norms or parameters that the forward never calls (logging, optimizer groups) is no reason to refuse."""
    m = _Blocks("registered")
    nest = sn.wrap(m, sn.Depth("d", [1, 4], layers="layers"), example=torch.randn(3, 8))
    x = torch.randn(3, 8)
    with nest.use("d=1"), torch.no_grad():
        small = nest.export("d=1")
        assert torch.allclose(small(x), m(x)) and nest.cost("d=1") == sum(p.numel() for p in small.parameters())
    held = _Blocks("layers")
    held.__dict__["no_decay"] = [p for b in held.layers for n, p in b.named_parameters() if n.endswith("bias")]
    nest = sn.wrap(held, sn.Depth("d", [1, 4], layers="layers"), example=torch.randn(3, 8))
    with nest.use("d=1"), torch.no_grad():
        assert torch.allclose(nest.export("d=1")(x), held(x))


def test_depth_with_a_module_every_block_holds_still_passes_check():
    m = _Blocks("layers")
    nest = sn.wrap(m, sn.Depth("d", [1, 2, 4], layers="layers"), example=torch.randn(3, 8))
    x = torch.randn(3, 8)
    with nest.use("d=2"), torch.no_grad():
        assert torch.allclose(nest.export("d=2")(x), m(x))


class _Moves(nn.Module):
    """Features of ``fc1`` (16) reaching an op that moves them between positions, with shapes that still fit at 8:
    the dry runs pass, yet the sub-model computes on other units than the full model."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(8 if how in ("tail", "narrow", "index_select") else 16, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.how == "tail":     # the last 8 features: at h=8 the first 8, other units
            return self.fc2(h[:, -8:])
        if self.how == "narrow":   # the same by narrow, its start computed from the size
            return self.fc2(h.narrow(1, h.shape[1] - 8, 8))
        if self.how == "index_select":  # the same picked by an index tensor
            return self.fc2(h.index_select(1, torch.arange(h.shape[1] - 8, h.shape[1])))
        if self.how == "reversed":  # units reversed by a tensor index (index_select written as indexing)
            return self.fc2(h[:, torch.arange(h.shape[1] - 1, -1, -1)])
        if self.how == "masked":   # every other unit, by a boolean mask
            return self.fc2(h[..., torch.arange(h.shape[1]) % 2 == 0].repeat(1, 2))
        if self.how == "chunk":    # q / k halves: at h=8 features 4..7 switch from q to k
            q, k = h.chunk(2, -1)
            return self.fc2(h) + (q * k).sum(-1, keepdim=True)
        if self.how == "roll":     # units shifted by one: at h=8 unit 7 comes from another place
            return self.fc2(h.roll(1, 1))
        if self.how == "flip":     # reversed units added: at h=8 unit 0 meets unit 7, not unit 15
            return self.fc2(h + h.flip(1))
        if self.how == "groups":   # a softmax within two groups of the features: the groups are re-cut
            return self.fc2(h.view(h.shape[0], 2, -1).softmax(-1).flatten(1))
        b = x.shape[0]
        if self.how == "head_dim":  # groups of 4 (a head size): a prefix of the axis is whole groups
            return self.fc2(h.view(b, -1, 4).softmax(-1).reshape(b, -1))
        return self.fc2(h.view(b, 4, -1).softmax(-1).reshape(b, -1))  # "heads": 4 hard-coded, every one re-cut


@pytest.mark.parametrize("how,op", [("tail", "__getitem__"), ("chunk", "chunk"), ("groups", "view"),
                                    ("heads", "view"), ("narrow", "narrow"), ("index_select", "index_select"),
                                    ("roll", "roll"), ("flip", "flip"), ("reversed", "__getitem__"),
                                    ("masked", "__getitem__")])
def test_features_moved_between_positions_are_refused_though_the_shapes_fit(how, op):
    """check refused these only when a shape broke; the wiring trace names the op that moves the features."""
    torch.manual_seed(0)
    model, x = _Moves(how).eval(), torch.randn(3, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dims = [sn.Width("h", [8, 16], out="fc1", inp=[] if how in ("tail", "narrow", "index_select") else "fc2")]
    with pytest.raises(sn.SortedNetError,
                       match=rf"dry runs pass, but\n.*'fc1' \(out=\) are moved between positions.*'{op}'"):
        sn.wrap(model, *dims, example=x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model.fc1) is nn.Linear


class _FunctionalCNN(nn.Module):
    """Layers applied by their functional forms on their own tensors (``F.conv2d(x, self.a.weight, ...)``,
    ``F.linear``), with an op between ``a`` and ``b`` that moves channels (or none)."""

    def __init__(self, move, functional=True):
        super().__init__()
        self.move, self.functional = move, functional
        self.a, self.b, self.fc = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 8, 1), nn.Linear(8, 3)
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x):
        f = self.functional
        h = F.relu(F.conv2d(x, self.a.weight, self.a.bias) if f else self.a(x))
        if self.move == "flip":
            h = h.flip(1)
        elif self.move == "roll":
            h = torch.roll(h, 3, 1)
        elif self.move == "channel_shuffle":
            h = F.channel_shuffle(h, 2)
        elif self.move == "ChannelShuffle":
            h = self.shuffle(h)
        h = F.relu(F.conv2d(h, self.b.weight, self.b.bias) if f else self.b(h)).mean((2, 3))
        return F.linear(h, self.fc.weight, self.fc.bias) if f else self.fc(h)


@pytest.mark.parametrize("functional", [True, False])
@pytest.mark.parametrize("move,op", [("flip", "flip"), ("roll", "roll"), ("channel_shuffle", "channel_shuffle"),
                                     ("ChannelShuffle", "channel_shuffle")])
def test_channels_moved_between_layers_called_functionally_are_refused(move, op, functional):
    """Layers run as F.conv2d on their own weights were not traced as those layers: the binding of `a` and `b`
    reached no group, and a flip, roll or channel shuffle between them passed check in silence (c=4 off the
    full model's first 4 channels by 0.11); a channel shuffle, by module or by function, was only warned of."""
    torch.manual_seed(0)
    model, x = _FunctionalCNN(move, functional).eval(), torch.randn(2, 3, 5, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError,
                       match=rf"dry runs pass, but\n.*'a' \(out=\) are moved between positions.*'{op}'"):
        sn.wrap(model, sn.Width("c", [4, 8, 16], out="a", inp="b"), example=x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model.a) is nn.Conv2d and type(model.b) is nn.Conv2d


def test_layers_called_functionally_are_traced_as_those_layers():
    """Without a move, the functional model is the module model's wiring: discover finds the same groups, check
    passes in silence, and every sub-model's export equals its live run and the module model's sub-model."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    fmodel = _FunctionalCNN(None).eval()
    mmodel = copy.deepcopy(fmodel)
    mmodel.functional = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fdims = sn.discover(fmodel, x, ratios=[0.25, 0.5, 1.0])
        mdims = sn.discover(mmodel, x, ratios=[0.25, 0.5, 1.0])
        assert [(d.out, d.inp, d.sizes) for d in fdims] == [(d.out, d.inp, d.sizes) for d in mdims] \
            == [(("a",), ("b",), (4, 8, 16)), (("b",), ("fc",), (2, 4, 8))]
        fnest, mnest = sn.wrap(fmodel, *fdims, example=x), sn.wrap(mmodel, *mdims, example=x)
    for sub in fnest.submodels:
        with torch.no_grad(), fnest.use(sub), mnest.use(sub):
            live, ref = fmodel(x), mmodel(x)
        torch.testing.assert_close(live, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(fnest.export(sub)(x), live, atol=1e-5, rtol=0)


class _OwnLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass with a forward of its own (wrap refuses it: its slicer cannot vouch for the forward)."""

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


class _NotTracedAsLayers(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.ln, self.b, self.c = nn.Linear(8, 12), _OwnLayerNorm(12), nn.Linear(12, 12), nn.Linear(12, 4)
        self.pw, self.dw = nn.Conv1d(8, 12, 1), nn.Conv1d(12, 12, 3, padding=1, groups=12)

    def forward(self, x):
        if self.how == "own_norm":  # its tensors read by its own forward: not a layer wrap would slice
            return self.c(F.relu(self.b(self.ln(F.relu(self.a(x))))))
        h = F.relu(self.pw(x.unsqueeze(-1).expand(-1, -1, 5)))  # depthwise, its group count a fixed number
        return self.c(F.conv1d(h, self.dw.weight, self.dw.bias, 1, 1, 1, 12).mean(-1))


@pytest.mark.parametrize("how,kept", [("own_norm", "parameter 'ln.weight'"), ("literal_groups", "'conv1d'")])
def test_tensors_read_where_the_trace_cannot_vouch_for_a_layer_keep_their_features_whole(how, kept):
    """Reads of a layer's tensors join its features only where wrap would slice that layer and the call follows
    the sub-model: a norm subclass with its own forward was proposed as norm= (which wrap then refused), and a
    depthwise F.conv1d with groups=12 written as a number (a crash at 6) as out= / inp=. Kept whole, named."""
    torch.manual_seed(0)
    model, x = _NotTracedAsLayers(how).eval(), torch.randn(3, 8)
    for verify in (True, False):
        with pytest.warns(UserWarning, match=kept):  # (KeptWholeWarning, or "found no group" where none is left)
            dims = sn.discover(model, x, ratios=[0.5, 1.0], verify=verify)
        assert all("ln" not in d.norm and "dw" not in d.out for d in dims if d.kind == "width"), dims
    nest = sn.wrap(model, *dims, example=x)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(nest.export(sub)(x), model(x), atol=1e-5, rtol=0)


class _Gathered(nn.Module):
    """``fc1``'s units reversed by ``gather`` (an op the wiring trace does not understand), shapes that fit."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        idx = torch.arange(h.shape[1] - 1, -1, -1).expand(h.shape[0], -1)
        return self.fc2(torch.gather(h, 1, idx))


def test_features_reaching_an_op_the_trace_cannot_follow_are_named_in_a_warning():
    """A sub-model of this nest runs and passes the dry runs, yet computes on reversed units; check cannot tell
    (the op may as well act on each unit alone, as torch.cond of elementwise branches does), so it says so,
    naming the op, instead of passing in silence."""

    torch.manual_seed(0)
    model, x = _Gathered().eval(), torch.randn(3, 6)
    with pytest.warns(UnfollowedOpWarning, match=r"not verified.*\n.*'fc1' \(out=\) reach 'gather'"):
        sn.wrap(model, sn.Width("h", [8, 16], out="fc1", inp="fc2"), example=x)


class _ScaledByWidth(nn.Module):
    """``fc1``'s units scaled by a ramp built from the width outside the ops the trace follows."""

    def __init__(self, how, kept=False):
        super().__init__()
        self.fc1, self.fc2, self.how, self.kept = nn.Linear(6, 16), nn.Linear(16, 3), how, kept

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        c = h.shape[1]
        ramp = (h.new_tensor([(i + 1) / c for i in range(c)]) if self.how == "new_tensor" else
                torch.from_numpy(np.linspace(0.1, 1.0, c, dtype=np.float32)))
        if self.kept:  # (stored on the module by the forward: still the forward's own result)
            self.ramp = ramp
            ramp = self.ramp
        return self.fc2(h * ramp)


@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("how", ["new_tensor", "from_numpy"])
def test_features_meeting_a_tensor_built_outside_the_trace_are_named_in_a_warning(how, kept):
    """``torch.tensor`` / ``torch.linspace`` of the width warned; the same ramp from ``x.new_tensor([...])`` or
    ``torch.from_numpy`` passed in silence, while a sub-model's units meet other scales than the full model's
    (1e-2 off the masked full model); also when the forward keeps it on the module first."""

    torch.manual_seed(0)
    model, x = _ScaledByWidth(how, kept).eval(), torch.randn(3, 6)
    with pytest.warns(UnfollowedOpWarning, match=r"not verified.*\n.*'fc1' \(out=\) reach a tensor from outside"):
        sn.wrap(model, sn.Width("h", [8, 16], out="fc1", inp="fc2"), example=x)


class _PlainTable(nn.Module):
    """A table kept as a plain tensor attribute (not a buffer), read to the active width in the forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.table = torch.randn(16)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h + self.table[:h.shape[-1]])


def test_a_plain_tensor_attribute_read_to_the_width_is_the_models_own_tensor():
    """Such a table is the model's own, as a buffer is: no UnfollowedOpWarning (the sub-model is the masked model)."""
    torch.manual_seed(0)
    model, x = _PlainTable().eval(), torch.randn(3, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nest = sn.wrap(model, sn.Width("h", [8, 16], out="fc1", inp="fc2"), example=x)
    with torch.no_grad(), nest.use("h=8"):
        h = torch.relu(F.linear(x, model.fc1.weight, model.fc1.bias))
        torch.testing.assert_close(model(x), F.linear(h + model.table[:8], model.fc2.weight, model.fc2.bias))


def test_narrow_and_index_select_that_keep_every_unit_in_place_pass():
    class Keep(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = torch.relu(self.fc1(x)).index_select(0, torch.tensor([2, 1, 0]))  # (rows: not a feature axis)
            h = h.narrow(1, 0, h.shape[1]).index_select(1, torch.arange(h.shape[1]))
            h = h[:, torch.arange(h.shape[1])][:, torch.ones(h.shape[1], dtype=torch.bool)][torch.tensor([0, 2, 1])]
            return self.fc2(h)

    nest = sn.wrap(Keep().eval(), sn.Width("h", [8, 16], out="fc1", inp="fc2"), example=torch.randn(3, 6))
    x = torch.randn(3, 6)
    with torch.no_grad(), nest.use("h=8"):
        torch.testing.assert_close(nest.export("h=8")(x), nest.model(x))


class _GatedDepthwise(nn.Module):
    """Mamba's in_proj -> (x | z), x through a depthwise causal conv: stacked halves, or interleaved ones."""

    def __init__(self, interleaved):
        super().__init__()
        self.interleaved = interleaved
        self.in_proj, self.conv1d = nn.Linear(8, 32), nn.Conv1d(16, 16, 3, groups=16, padding=2)
        self.out_proj = nn.Linear(16, 8)

    def forward(self, h):
        xz = self.in_proj(h)
        x, z = (xz[..., ::2], xz[..., 1::2]) if self.interleaved else xz.chunk(2, -1)
        x = self.conv1d(x.transpose(1, 2))[:, :, :h.shape[1]].transpose(1, 2)
        return self.out_proj(F.silu(x) * z)


@pytest.mark.parametrize("interleaved", [False, True])
def test_a_fused_output_read_by_a_depthwise_conv_is_measured(interleaved):
    """chunks= is measured unit by unit; a depthwise conv reader made the measurement impossible, so an
    interleaved x | z (a sub-model mixing x and z units) passed silently. Its input is masked now."""
    torch.manual_seed(0)
    width = sn.Width("di", [4, 8, 16], out=["in_proj", "conv1d"], inp=["conv1d", "out_proj"],
                     chunks={"in_proj": 2})
    model, x = _GatedDepthwise(interleaved).eval(), torch.randn(2, 7, 8)
    if interleaved:
        with pytest.raises(sn.SortedNetError, match="is not the first 4 whole units"):
            sn.wrap(model, width, example=x)
        return
    nest = sn.wrap(model, width, example=x)
    with torch.no_grad(), nest.use("di=4"):
        torch.testing.assert_close(nest.export("di=4")(x), model(x))


class _Attention(nn.Module):
    """Hand-written attention, heads split by a view: ``view(B, T, -1, 4)`` (head size 4) or ``view(B, T, 4, -1)``
    (four heads hard-coded), with an optional per-head gate."""

    def __init__(self, fixed_heads: bool, gate: bool = False):
        super().__init__()
        self.fixed, self.q, self.k, self.v, self.o = fixed_heads, *(nn.Linear(16, 16) for _ in range(4))
        self.gate = nn.Parameter(torch.ones(4, 1)) if gate else None

    def split(self, t):
        b, n, _ = t.shape
        return (t.view(b, n, 4, -1) if self.fixed else t.view(b, n, -1, 4)).transpose(1, 2)

    def forward(self, x):
        b, n, _ = x.shape
        y = F.scaled_dot_product_attention(self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x)))
        if self.gate is not None:
            y = y * self.gate[: y.shape[1], :, None]
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("example", ["random", "one_token", "zeros", "same_tokens"])
@pytest.mark.parametrize("gate", [False, True])
def test_heads_split_by_a_view_are_judged_by_shapes_not_by_the_examples_values(example, gate):
    """Four hard-coded heads re-cut by a Width over q/k/v/o: a one-token, all-zero or repeated-token example (or a
    gate still at its initial ones) made the masked-units measurement equal, so it was accepted; the shapes of the
    view at the smaller size decide now. A head size kept by view(B, T, -1, 4) is accepted on every example."""
    torch.manual_seed(0)
    x = {"random": torch.randn(2, 5, 16), "one_token": torch.randn(2, 1, 16), "zeros": torch.zeros(2, 5, 16),
         "same_tokens": torch.randn(2, 1, 16).expand(2, 5, 16).contiguous()}[example]
    dims = lambda: [sn.Width("w", [8, 16], out=["q", "k", "v"], inp="o")]  # noqa: E731
    with pytest.raises(sn.SortedNetError, match="merges or splits this axis"):
        sn.wrap(_Attention(True, gate).eval(), *dims(), example=x)
    model = _Attention(False, gate).eval()
    nest = sn.wrap(model, *dims(), example=x)
    y = torch.randn(2, 5, 16)
    with nest.use("w=8"), torch.no_grad():
        torch.testing.assert_close(nest.export("w=8")(y), model(y))


def test_hard_coded_heads_in_a_module_that_names_its_head_count_are_refused():
    """With num_heads / head_dim attributes the wiring trace takes the module for an attention of its own and flags
    nothing: the view's shapes at the smaller size still show the re-cut heads."""
    torch.manual_seed(0)
    model, x = _Attention(True).eval(), torch.randn(2, 5, 16)
    model.num_heads, model.head_dim = 4, 4
    with pytest.raises(sn.SortedNetError, match="re-cuts its units"):
        sn.wrap(model, sn.Width("w", [8, 16], out=["q", "k", "v"], inp="o"), example=x)
    assert type(model.q) is nn.Linear


def test_a_view_into_units_of_a_fixed_size_keeps_whole_units_and_is_accepted():
    """view(B, -1, head_dim) splits the sliced axis into whole units: measured equal to the full model with the
    other units masked, so check accepts it (as sn.Heads would be)."""
    torch.manual_seed(0)
    model, x = _Moves("head_dim").eval(), torch.randn(3, 6)
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="fc1", inp="fc2"), example=x)
    with nest.use("h=8"), torch.no_grad():
        torch.testing.assert_close(nest.export("h=8")(x), model(x))


@pytest.mark.parametrize("reduce", [lambda y: y.logsumexp(-1), lambda y: y.softmax(-1).amax(-1), lambda y: y.sum(-1)])
def test_a_width_whose_features_no_layer_reads_is_refused(reduce):
    """Classes sliced, then reduced away before the output: the shapes fit, half the classes were gone."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 10)

        def forward(self, x):
            return reduce(self.head(torch.relu(self.a(x))))

    model, x = Net().eval(), torch.randn(3, 6)
    with pytest.raises(sn.SortedNetError, match=r"width 'cls' slices the outputs of \['head'\] but no layer reads"):
        sn.wrap(model, sn.Width("cls", [5, 10], out="head"), example=x)
    assert type(model.head) is nn.Linear
    sn.wrap(model, sn.Width("h", [4, 8], out="a", inp="head"), example=x)  # the hidden width is fine


class _TiedAE(nn.Module):
    """An autoencoder whose decoder is the encoder's own weight transposed; ``tail`` says what else the forward
    does with the encoder's outputs or weight."""

    def __init__(self, tail, h=16):
        super().__init__()
        self.enc, self.bias, self.tail = nn.Linear(6, h), nn.Parameter(torch.randn(6)), tail

    def forward(self, x):
        h, w = torch.relu(self.enc(x)), self.enc.weight
        if self.tail == "decode":
            return F.linear(h, w.t(), self.bias)
        if self.tail == "decode_copy":  # through a contiguous copy of the transposed weight
            return F.linear(h, w.t().contiguous(), self.bias)
        if self.tail == "decode_cast":  # in another dtype
            return F.linear(h.double(), w.double().t(), self.bias.double()).float()
        if self.tail == "decode_spread":  # as a product spread over the weight's inputs, summed over the features
            return (h.unsqueeze(-1) * w).sum(-2) + self.bias
        if self.tail == "decode_spread_cast":  # the same in bfloat16, cast back before the sum
            return (h.unsqueeze(-1).bfloat16() * w.bfloat16()).float().sum(-2) + self.bias
        if self.tail == "decode_dot":  # a dot product with one column of the weight (word2vec-style scoring)
            return (h * w[:, 0]).sum(-1, keepdim=True) + self.bias
        if self.tail == "decode_temperature":  # a scale between the product and its sum
            return (h.unsqueeze(-1) * w / 0.5).sum(-2) + self.bias
        # the features reduced away, the weight read elsewhere:
        if self.tail == "regulariser":
            return h.logsumexp(-1) + w.pow(2).sum()
        if self.tail == "projection":  # with the input, a batch as large as the smallest width
            return h.logsumexp(-1) + (x @ w.t()).pow(2).mean()
        if self.tail == "normalised":  # a normalised copy, written out
            return h.logsumexp(-1) + (w / w.norm(dim=1, keepdim=True)).sum()
        if self.tail == "gate":  # met with the features element by element
            return (h * self.enc.bias).logsumexp(-1)
        if self.tail == "spread_add":  # spread over the weight's inputs, but added, not multiplied
            return (h.unsqueeze(-1) + w).sum(-2)
        if self.tail == "spread_lse":  # multiplied, then reduced by another op than a sum
            return (h.unsqueeze(-1) * w).logsumexp(-2)
        if self.tail == "spread_exp":  # multiplied, another op between, then summed
            return (h.unsqueeze(-1) * w).exp().sum(-2)
        if self.tail == "aux":  # a tied decoding kept aside for an auxiliary loss; the output reduces them away
            self.aux = F.linear(h, w.t(), self.bias)
            return h.logsumexp(-1)
        if self.tail == "spread_outer":  # multiplied over another axis than the features, summed over that one
            return (h.unsqueeze(-1) * w[:, 0].unsqueeze(-2)).sum(-1).logsumexp(-1)
        # a cosine head: the weight normalised (a copy), the classes reduced away
        return F.linear(F.normalize(x, dim=-1) @ torch.ones(6, 6), F.normalize(w, dim=-1)).logsumexp(-1)


def test_a_tied_transposed_decoder_reads_the_features_its_encoder_writes():
    """``F.linear(h, enc.weight.t())``: the encoder's output features are read through its own (cut) weight,
    a reader no ``inp=`` can name: check refused the exact nest, saying no layer reads them. An op outside the
    encoder that takes its features with a tensor made of its cut weight (a view, a copy, a cast) and contracts
    them is that reader now; the weight read without the features (a regulariser, also where the batch is as
    large as the smallest width), through a normalised copy, or met with them element by element (a gate), the
    features reduced away, is still refused."""
    torch.manual_seed(0)
    x = torch.randn(4, 6)  # (a batch of 4: the smallest width)
    for tail in ("decode", "decode_copy", "decode_cast", "decode_spread", "decode_spread_cast", "decode_dot",
                 "decode_temperature"):
        model = _TiedAE(tail).eval()
        nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="enc"), example=x)
        nest.check(x)
        for size in (4, 8):
            small = _TiedAE(tail, h=size).eval()
            small.enc.load_state_dict({"weight": model.enc.weight[:size], "bias": model.enc.bias[:size]})
            small.bias.data.copy_(model.bias)
            with nest.use(f"h={size}"), torch.no_grad():
                tol = {"rtol": 2e-2, "atol": 2e-2} if "cast" in tail else {}  # (bfloat16 products)
                torch.testing.assert_close(model(x), small(x), **tol)
                torch.testing.assert_close(nest.export(f"h={size}")(x), small(x), **tol)
    class ConvAE(nn.Module):  # a tied transposed convolution, on maps as wide as the smallest width
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv2d(3, 16, 3, padding=1)

        def forward(self, x):
            return F.conv_transpose2d(torch.relu(self.enc(x)), self.enc.weight, padding=1)

    conv, maps = ConvAE().eval(), torch.randn(2, 3, 4, 4)
    nest = sn.wrap(conv, sn.Width("c", [4, 16], out="enc"), example=maps)
    with nest.use("c=4"), torch.no_grad():
        torch.testing.assert_close(nest.export("c=4")(maps), conv(maps))
    for tail in ("regulariser", "projection", "normalised", "gate", "cosine", "spread_add", "spread_lse",
                 "spread_exp", "spread_outer", "aux"):
        other = _TiedAE(tail).eval()
        with pytest.raises(sn.SortedNetError, match=r"slices the outputs of \['enc'\] but no layer reads"):
            sn.wrap(other, sn.Width("h", [4, 16], out="enc"), example=x)
        assert type(other.enc) is nn.Linear


@dataclasses.dataclass
class _Logits:
    logits: torch.Tensor


def test_each_module_a_width_cuts_is_read_on_its_own_and_a_functional_tie_reads_the_features():
    """A tied decoder reading one module's features excused another module of the same width whose outputs are
    reduced away (class scores through logsumexp over 4 classes of 16, silently); a tie written functionally
    (``F.linear(F.embedding(ids, emb.weight), emb.weight)``) was refused, and the canonical tied decoder warned
    that its matmul was not followed."""
    V, D = 50, 16
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))

    class Tied(nn.Module):
        def __init__(self, how):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.cls, self.how = nn.Embedding(V, D), nn.Linear(8, D), how

        def forward(self, i):
            if self.how == "functional":
                return F.linear(F.embedding(i, self.emb.weight), self.emb.weight)
            h = self.emb(i)
            logits = h @ self.emb.weight.T
            if self.how == "two":
                return logits + self.cls(torch.ones(*i.shape, 8)).logsumexp(-1, keepdim=True)
            if self.how == "setitem":  # written into a buffer
                buf = torch.zeros_like(logits)
                buf[:] = logits
                return buf
            if self.how == "record":  # in a dataclass
                return _Logits(logits)
            if self.how == "plain":
                return logits
            score = h.logsumexp(-1)  # (the features reduced away; the tied logits reach the output only as:)
            if self.how == "type_as":  # a dtype
                return score.type_as(logits)
            if self.how == "zeros_like":  # a shape
                return score + torch.zeros_like(logits).sum(-1)
            if self.how == "isnan":  # a test of them
                return torch.where(logits.isnan().any(-1), 0.0, score)
            return logits

    with pytest.raises(sn.SortedNetError, match=r"slices the outputs of \['cls'\] but no layer reads"):
        sn.wrap(Tied("two"), sn.Width("d", [4, 8, 16], out=["emb", "cls"]), example=ids)
    for how in ("type_as", "zeros_like", "isnan"):  # (what the read made reaches the output as no value of it)
        with pytest.raises(sn.SortedNetError, match=r"slices the outputs of \['emb'\] but no layer reads"):
            sn.wrap(Tied(how), sn.Width("d", [4, 8, 16], out="emb"), example=ids)

    class Albert(nn.Module):  # a factorised embedding tied to the decoder's output projection: the width has a
        def __init__(self):  # reader (proj) and a tied one (the decoder reads dec's features with emb's weight)
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.proj, self.dec = nn.Embedding(V, 8), nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, i):
            return F.linear(F.gelu(self.dec(torch.relu(self.proj(self.emb(i))))), self.emb.weight)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnfollowedOpWarning)
        sn.wrap(Albert().eval(), sn.Width("e", [4, 8], out=["emb", "dec"], inp="proj"), example=ids)

    class Flipped(nn.Module):  # the units reversed by a matrix built at the active width, then the tied decoder:
        def __init__(self):  # the decoder's op is followed, the flip's (the same op) still warned
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(V, 16)

        def forward(self, i):
            h = F.linear(self.emb(i), torch.eye(self.emb.weight.shape[1]).flip(0))
            return F.linear(h, self.emb.weight)

    with pytest.warns(UnfollowedOpWarning, match=r"the features of 'emb' \(out=\) reach 'linear'"):
        sn.wrap(Flipped().eval(), sn.Width("d", [4, 8, 16], out="emb"), example=ids)

    class TiedThenShuffled(nn.Module):  # a tied decoder, then the units shuffled by another op (or the same op)
        def __init__(self, how):  # and decoded again: the trace names the group's first op, the decoder's; the
            super().__init__()  # warning stays (the shuffle moves the units)
            torch.manual_seed(0)
            self.emb, self.how = nn.Embedding(V, 16), how

        def forward(self, i):
            h = self.emb(i)
            logits = F.linear(h, self.emb.weight)  # (first: the op the trace names)
            if self.how == "gather":
                moved = torch.gather(h, -1, torch.arange(h.shape[-1]).flip(0).expand_as(h))
            else:
                moved = F.linear(h, torch.eye(h.shape[-1]).flip(0))
            return logits + F.linear(moved, self.emb.weight)

    for how in ("gather", "linear"):
        with pytest.warns(UnfollowedOpWarning, match=r"the features of 'emb' \(out=\) reach"):
            sn.wrap(TiedThenShuffled(how).eval(), sn.Width("d", [4, 8, 16], out="emb"), example=ids)
    for how in ("functional", "plain", "setitem", "record"):
        model = Tied(how).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnfollowedOpWarning)
            nest = sn.wrap(model, sn.Width("d", [4, 8, 16], out="emb"), example=ids)
        with nest.use("d=4"), torch.no_grad():
            logits = (lambda out: getattr(out, "logits", out))  # noqa: E731
            torch.testing.assert_close(logits(nest.export("d=4")(ids)), logits(model(ids)))
            emb = model.emb.weight[:, :4]
            torch.testing.assert_close(logits(model(ids)), F.embedding(ids, emb) @ emb.T)


def test_a_tied_decoder_after_a_pooling_a_pick_or_a_transpose_is_followed():
    """A tied decoder on the last position (``h[:, -1]``), on a mean pooling, or written as ``W @ h^T`` was warned
    about (UnfollowedOpWarning naming the decoder itself) because the pick, the pooling or the transpose was taken
    for an op that may move the units; and a temperature of shape ``(1,)`` between the product and its sum was
    refused (only 0-d ones were a scale). An index over the features' own axis is still refused."""
    V, D = 50, 16
    ids = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(1))

    class LM(nn.Module):
        def __init__(self, how):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.fc1, self.fc2, self.how = nn.Embedding(V, D), nn.Linear(D, 32), nn.Linear(32, D), how
            self.tau = nn.Parameter(torch.full((1,), 2.0))

        def forward(self, i):
            W = self.emb.weight
            h = self.emb(i)
            h = h + self.fc2(F.gelu(self.fc1(h)))
            if self.how == "last":
                return F.linear(h[:, -1], W)
            if self.how == "mean":
                return F.linear(h.mean(1), W)
            if self.how == "transposed":
                return W.matmul(h.transpose(1, 2)).transpose(1, 2)
            if self.how == "mm":
                return W.mm(h.reshape(-1, h.shape[-1]).t())
            if self.how == "retrieval":  # beside the logits: the last position scored against the first token
                return F.linear(h, W), (h[:, -1] * W[i[:, 0]]).sum(-1)
            if self.how == "temperature":
                return (h.mean(1).unsqueeze(-2) * W / self.tau).sum(-1)
            if self.how == "last_unit":  # (the last unit picked, then decoded: another unit than a sub-model's)
                return F.linear(h, W) + h[..., -1:]
            return F.linear(h[..., torch.arange(h.shape[-1]).flip(0)], W)  # (the units reversed, then decoded)

    width = dict(out=["emb", "fc2"], inp="fc1")
    for how in ("last", "mean", "transposed", "mm", "retrieval", "temperature"):
        model = LM(how).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnfollowedOpWarning)
            nest = sn.wrap(model, sn.Width("d", [4, 8, 16], **width), example=ids)
        for size in (4, 8):
            small = LM(how).eval()  # (the prefix model: every weight cut to its first `size` units of d)
            with torch.no_grad():
                small.emb.weight = nn.Parameter(model.emb.weight[:, :size].clone())
                small.fc1.weight = nn.Parameter(model.fc1.weight[:, :size].clone())
                small.fc1.bias = model.fc1.bias
                small.fc2.weight = nn.Parameter(model.fc2.weight[:size].clone())
                small.fc2.bias = nn.Parameter(model.fc2.bias[:size].clone())
                small.tau = model.tau
            with nest.use(f"d={size}"), torch.no_grad():
                live, want, exported = model(ids), small(ids), nest.export(f"d={size}")(ids)
            torch.testing.assert_close(live, want)
            torch.testing.assert_close(exported, want)
    for how in ("last_unit", "reversed"):  # (the index over the features is refused: it moves their units)
        with pytest.raises(sn.SortedNetError, match=r"moved between positions on their way \(indexed by '__getitem__'"):
            sn.wrap(LM(how).eval(), sn.Width("d", [4, 8, 16], **width), example=ids)

    class Reordered(nn.Module):  # the tied weight's units reordered outside its layer, then decoded: another
        def __init__(self, how):  # unit than a sub-model's (9.0 off the full model masked, with no warning)
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.special, self.how = nn.Embedding(V, D), nn.Embedding(3, D), how

        def forward(self, i):
            W, h = self.emb.weight, self.emb(i)
            rev = torch.arange(h.shape[-1]).flip(0)
            if self.how == "gather":
                return F.linear(h, W.gather(-1, rev.expand_as(W)))
            if self.how == "take_along_dim":
                return F.linear(h, torch.take_along_dim(W, rev[None], 1))
            if self.how == "sort":
                return F.linear(h, W.sort(-1).values)
            if self.how == "sorted_aside":  # (reordered for a term of its own, the tied read of W itself)
                return F.linear(h, W) + W.sort(-1).values.sum()
            if self.how == "special":  # (rows of special tokens added to the table, read in and out)
                table = torch.cat([W, self.special.weight], 0)
                return F.linear(F.embedding(i, table), table)
            return F.linear(h, {  # (each unit in place: element by element, or over the table's rows)
                "rows": lambda: W.index_select(0, i[:, 0]), "rows_kw": lambda: torch.index_select(W, dim=0, index=i[0]),
                "clamp": lambda: W.clamp(-10, 10), "type": lambda: W.type(torch.float64).float(),
                "where": lambda: torch.where(W > 0, W, 0.0), "quantised": lambda: torch.round(W * 8) / 8,
                "masked_fill": lambda: W.masked_fill(W.abs() < 1e-3, 0.0), "roll_rows": lambda: W.roll(1, 0),
                "cat_rows": lambda: torch.cat([W[V // 2:], W[:V // 2]], -2),
                "cumsum": lambda: W.cumsum(1)}[self.how]())  # (unit i from units <= i: a prefix stays one)

    for how in ("gather", "take_along_dim", "sort"):
        with pytest.warns(UnfollowedOpWarning, match=rf"the cut weight of 'emb' is reordered by '{how}' \(in "
                                                     r"'<root>'\) outside its layer"):
            sn.wrap(Reordered(how).eval(), sn.Width("d", [4, 8, 16], out="emb"), example=ids)
    for how in ("sorted_aside", "rows", "rows_kw", "clamp", "type", "where", "quantised", "masked_fill", "roll_rows",
                "cat_rows", "cumsum"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnfollowedOpWarning)
            sn.wrap(Reordered(how).eval(), sn.Width("d", [4, 8, 16], out="emb"), example=ids)
    special = Reordered("special").eval()
    with warnings.catch_warnings(record=True) as seen:  # (the table's lookup and its tied read: followed)
        warnings.simplefilter("always")
        nest = sn.wrap(special, sn.Width("d", [4, 8, 16], out=["emb", "special"]), example=ids)
    assert not any("'emb'" in str(w.message) or "reordered" in str(w.message) for w in seen), seen
    with torch.no_grad(), nest.use("d=4"):
        table = torch.cat([special.emb.weight, special.special.weight], 0)
        torch.testing.assert_close(special(ids), F.embedding(ids, table) @ table.T)


class _GatedMLP(nn.Module):
    """A gated MLP written as one module: its hidden width is internal, its output stays the model's width."""

    def __init__(self, d, h):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_gate = nn.Parameter(torch.randn(h, d, generator=g) / d ** 0.5)
        self.w_up = nn.Parameter(torch.randn(h, d, generator=g) / d ** 0.5)
        self.w_down = nn.Parameter(torch.randn(d, h, generator=g) / h ** 0.5)

    def forward(self, x):
        return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)


class _SummedHead(nn.Module):
    """A head whose output features a custom slicer cuts, reduced away by the model."""

    def __init__(self, d, c):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, d, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        return F.linear(x, self.w)


@sn.slicer(_GatedMLP)
class _GatedMLPSlicer(sn.Slicer):
    roles = ("out",)
    attrs = ("w_gate", "w_up", "w_down")
    views = {"w_gate": ((0, "out"),), "w_up": ((0, "out"),), "w_down": ((1, "out"),)}

    def full(self, m, role):
        return m._parameters["w_gate"].shape[0]


@sn.slicer(_SummedHead)
class _SummedHeadSlicer(sn.Slicer):
    roles = ("out",)
    attrs = ("w",)
    views = {"w": ((0, "out"),)}

    def full(self, m, role):
        return m._parameters["w"].shape[0]


def test_a_custom_slicers_internal_width_is_named_otherwise_than_out():
    """A custom slicer's role named ``out`` says the module's outputs are cut: a width inside the module (a
    gated MLP written as one module) bound as ``out`` only was refused for a missing reader no layer could be;
    the message now says to name the role ``inp`` (measured: the outputs keep their shapes), and so named it is
    accepted and exact. A module whose outputs do change size gets no such hint."""
    model = nn.Sequential(nn.Linear(6, 8), _GatedMLP(8, 32), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 6)
    with pytest.raises(sn.SortedNetError, match=r"binds only out= of \['1'\], whose outputs keep their size.*name "
                                               r"that role 'inp' in the slicer"):
        sn.wrap(model, sn.Width("f", [8, 16, 32], out="1"), example=x)
    cls = type("_GatedMLPHidden", (_GatedMLP,), {})
    sn.slicer(cls)(type("_Hidden", (sn.Slicer,), {
        "roles": ("inp",), "attrs": ("w_gate", "w_up", "w_down"),
        "views": {"w_gate": ((0, "inp"),), "w_up": ((0, "inp"),), "w_down": ((1, "inp"),)},
        "full": lambda self, m, role: m._parameters["w_gate"].shape[0]}))
    hidden = cls(8, 32)
    hidden.load_state_dict(model[1].state_dict())
    model[1] = hidden
    nest = sn.wrap(model, sn.Width("f", [8, 16, 32], inp="1"), example=x)
    for sub in nest.submodels:
        with nest.use(sub), torch.no_grad():
            torch.testing.assert_close(nest.export(sub)(x), model(x))
    nest.unwrap()

    class Sum(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 8), _SummedHead(8, 10))

        def forward(self, x):
            return self.body(x).sum(-1)

    with pytest.raises(sn.SortedNetError, match=r"slices the outputs of \['body.1'\] but no layer reads") as e:
        sn.wrap(Sum(), sn.Width("cls", [5, 10], out="body.1"), example=x)
    assert "name that role" not in str(e.value)


class _VitPytorchAttention(nn.Module):
    """lucidrains vit-pytorch's Attention: the output projection sits in ``to_out = Sequential(Linear, Dropout)``."""

    def __init__(self, dim=32, heads=4, dim_head=8):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, dim_head * heads * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim_head * heads, dim), nn.Dropout(0.0))

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(-1)
        return self.to_out((attn @ v).transpose(1, 2).flatten(2))


def test_an_output_projection_inside_a_sequential_is_found():
    """Auto-detection took to_out (a Sequential) as the projection: 'input width None is not a whole number of
    4 heads'. It reads the Linear inside now; an explicit o='to_out' says which name to give."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    m = _VitPytorchAttention().eval()
    with pytest.raises(sn.SortedNetError, match=r"o='to_out.0'"):
        sn.wrap(m, sn.Heads("h", [1, 2, 4], attn="", o="to_out"))
    ref = copy.deepcopy(m)
    nest = sn.wrap(m, sn.Heads("h", [1, 2, 4], attn=""))
    with torch.no_grad():
        ref.to_out[0].weight[:, 16:] = 0  # the full model's first two heads
        with nest.use("h=2"):
            live = m(x)
        torch.testing.assert_close(live, ref(x))
        torch.testing.assert_close(nest.export("h=2")(x), live)


@dataclasses.dataclass(frozen=True)
class _FrozenArgs:
    n_layers: int


@dataclasses.dataclass(frozen=True, **({"slots": True} if sys.version_info >= (3, 10) else {}))
class _SlottedArgs:
    n_layers: int


_TupleArgs = collections.namedtuple("_TupleArgs", "n_layers width")


class _CountsItsLayers(nn.Module):
    """A stack that keeps its layer count (``how``: on itself, in a config object of its own, or not at all)
    and reads it in the forward: a residual scale and a final norm after the last block."""

    def __init__(self, n: int, how: str):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.norm = nn.LayerNorm(8)
        if how in ("attribute", "kept"):  # kept: only stored, as nanoGPT keeps config.n_layer for its init
            self.n_layers = n
        elif how == "config":
            self.config = type("Config", (), {})()
            self.config.num_layers = n
        elif how == "dict":  # a plain dict config
            self.cfg = {"n_layers": n, "width": 8}
        elif how == "nested config":  # Hydra-style: self.opts.model.n_layers
            self.opts = types.SimpleNamespace(model=types.SimpleNamespace(n_layers=n), lr=0.1)
        elif how == "nested dict":
            self.hp = {"model": {"num_layers": n}}
        elif how == "frozen dataclass":
            self.args = _FrozenArgs(n)
        elif how == "slotted dataclass":
            self.args = _SlottedArgs(n)
        elif how == "named tuple":
            self.args = _TupleArgs(n, 8)
        elif how == "named tuple in a dict":
            self.hp = {"model": _TupleArgs(n, 8)}
        self.how = how

    def count(self) -> int:
        return {"attribute": lambda: self.n_layers, "config": lambda: self.config.num_layers,
                "dict": lambda: self.cfg["n_layers"], "len": lambda: len(self.blocks),
                "kept": lambda: len(self.blocks), "nested config": lambda: self.opts.model.n_layers,
                "nested dict": lambda: self.hp["model"]["num_layers"],
                "frozen dataclass": lambda: self.args.n_layers, "slotted dataclass": lambda: self.args.n_layers,
                "named tuple": lambda: self.args.n_layers,
                "named tuple in a dict": lambda: self.hp["model"].n_layers}[self.how]()

    def forward(self, x):
        n = self.count()
        for i, block in enumerate(self.blocks):
            x = x + block(x) / (2 * n) ** 0.5
            if i == n - 1:
                x = self.norm(x)
        return x


@pytest.mark.parametrize("how", ["attribute", "config", "dict", "len", "kept", "nested config", "nested dict",
                                 "frozen dataclass", "slotted dataclass", "named tuple", "named tuple in a dict"])
def test_a_layer_count_the_forward_reads_is_said_not_to_follow_the_depth(how):
    """At depth 2 of 4, a forward reading a stored count keeps the 4-layer scale and never reaches its final
    norm: not the 2-layer network, while its export computes the same (no other check can tell). ``len()`` of
    the list follows the depth and equals the 2-layer model; a count only stored is not named. A count in a
    frozen dataclass (which could not be set to measure it) or a named tuple (not found) went unnamed."""
    from sortednet.check import LayerCountWarning

    torch.manual_seed(0)
    model, x = _CountsItsLayers(4, how), torch.randn(3, 8)
    two = _CountsItsLayers(2, how)
    two.load_state_dict(model.state_dict(), strict=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        nest = sn.wrap(model, sn.Depth("depth", [2, 4], layers="blocks"), example=x)
    said = [w for w in seen if issubclass(w.category, LayerCountWarning)]
    with torch.no_grad(), nest.use("depth=2"):
        live = model(x)
    same = torch.allclose(live, two(x), atol=1e-6)
    assert same == (how in ("len", "kept")) and bool(said) == (not same)
    if how == "attribute":
        assert type(model.n_layers) is int and model.n_layers == 4  # (put back as it was)
    if said:
        assert {"attribute": "n_layers", "config": "config.num_layers", "dict": "cfg['n_layers']",
                "nested config": "opts.model.n_layers", "nested dict": "hp.model['num_layers']",
                "frozen dataclass": "args.n_layers", "slotted dataclass": "args.n_layers",
                "named tuple": "args.n_layers", "named tuple in a dict": "hp.model.n_layers"}[how] \
            in str(said[0].message)
    if how == "dict":
        assert type(model.cfg["n_layers"]) is int  # (put back as it was)
    if how in ("frozen dataclass", "slotted dataclass", "named tuple"):
        assert model.args == type(model.args)(*((4, 8) if how == "named tuple" else (4,)))  # (put back)
    if how == "named tuple in a dict":
        assert model.hp["model"] == _TupleArgs(4, 8)
    with warnings.catch_warnings():  # PyTorch's own encoder keeps num_layers and reads len() of its layers
        warnings.simplefilter("error", LayerCountWarning)
        enc = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 4,
                                                  enable_nested_tensor=False))
        sn.wrap(enc, sn.Depth("depth", [2, 4], layers="0.layers"), example=torch.randn(2, 3, 8)).unwrap()


class _Tower(nn.Module):
    def __init__(self, conf, name, reads):
        super().__init__()
        self.name, self.reads, self.layers = name, reads, nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        setattr(self, name, conf)

    def forward(self, x):
        n = getattr(self, self.name)["model"]["num_layers"] if self.reads else 1
        for layer in self.layers:
            x = x + layer(x) / math.sqrt(2 * n)
        return x


class _Scale(nn.Module):
    """A helper module off the layer list's path, holding no list of its own, whose output scales every block."""

    def __init__(self, conf):
        super().__init__()
        self.conf = conf

    def forward(self, x):
        return x / math.sqrt(2 * self.conf["model"]["num_layers"])


@pytest.mark.parametrize("name", ["hp", "config"])
@pytest.mark.parametrize("reader", ["other", "other_sub", "nested", "helper"])
def test_a_count_in_a_config_two_towers_hold_is_blamed_only_on_the_tower_that_reads_it(name, reader):
    """A config held by two towers, read by the un-nested one only: check set the count to the nested list's
    shallow depth, saw the output move (the other tower read it) and told the user to fix the nested tower's
    correct forward. A tower off the list's path holding the config (or a part of it) and a list of that many
    layers reads a copy of it as it was while the count is measured: a count the nested tower or a helper of its
    own reads is still named, one only the other tower reads is not."""
    from sortednet.check import LayerCountWarning

    conf = {"model": {"num_layers": 3}}
    other = _Tower(conf["model"] if reader == "other_sub" else conf, name, reads=reader.startswith("other"))
    if reader == "other_sub":  # (it holds the inner config, and reads it one level up)
        other.__dict__[name] = {"model": conf["model"]}
    nested = _Tower(conf, name, reads=reader == "nested")
    model = nn.Sequential(other, nested, nn.Linear(8, 2))
    if reader == "helper":
        model.append(_Scale(conf))
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sn.wrap(model, sn.Depth("depth", [1, 2, 3], layers="1.layers"), example=torch.randn(4, 8))
    said = [str(w.message) for w in seen if issubclass(w.category, LayerCountWarning)]
    assert bool(said) == (reader in ("nested", "helper"))
    assert conf == {"model": {"num_layers": 3}} and nested.__dict__[name] is conf  # (put back as it was)


def test_a_layer_count_a_block_reads_from_its_own_config_is_said_not_to_follow_the_depth():
    """Blocks built as ``Block(config, i)`` that apply the final norm when ``i == config.n_layer - 1``, the model
    itself holding no config: at depth 2 of 4 the norm never ran, with nothing said (the count was looked for
    only on the modules above the layer list)."""
    from sortednet.check import LayerCountWarning

    class Cfg:
        def __init__(self):
            self.n_layer = 4

    class Block(nn.Module):
        def __init__(self, cfg, i):
            super().__init__()
            self.config, self.layer_idx, self.fc, self.ln = cfg, i, nn.Linear(8, 8), nn.LayerNorm(8)

        def forward(self, x):
            x = x + self.fc(x)
            return self.ln(x) if self.layer_idx == self.config.n_layer - 1 else x

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            cfg = Cfg()
            self.blocks, self.head = nn.ModuleList(Block(cfg, i) for i in range(4)), nn.Linear(8, 2)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    model = Stack()
    with pytest.warns(LayerCountWarning, match=r"the forward computes with \['blocks\.0\.config\.n_layer'\]"):
        sn.wrap(model, sn.Depth("depth", [2, 4], layers="blocks"), example=torch.randn(3, 8))
    assert type(model.blocks[0].config.n_layer) is int and model.blocks[0].config.n_layer == 4  # (put back)


class _ScalesByItsCount(nn.Module):
    def __init__(self, n: int, how: str):
        super().__init__()
        self.blocks, self.n_layers, self.how = nn.ModuleList(nn.Linear(8, 8) for _ in range(n)), n, how
        if how == "hf_config":  # (a transformers config held by a model of the user's)
            import transformers

            self.config = transformers.GPT2Config(n_layer=n, n_embd=8)

    def forward(self, x):
        if self.how == "assert":
            assert len(self.blocks) <= self.n_layers
        table = torch.ones(self.n_layers)
        for i, block in enumerate(self.blocks):
            if self.how == "tensor":
                x = x + block(x) / self.n_layers
            elif self.how == "float":
                x = x + block(x) * (1.0 / self.n_layers)
            elif self.how == "hf_config":
                x = x + block(x) / math.sqrt(2 * self.config.n_layer)
            else:  # "assert", "table": a count read where it changes nothing at any depth
                x = x + block(x) * table[i]
        return x


class _NestedEncoderFixedDecoder(nn.Module):
    def __init__(self, enc="encoder", dec="decoder"):
        super().__init__()
        self.names = enc, dec
        setattr(self, enc, nn.ModuleList(nn.Linear(8, 8) for _ in range(2)))
        setattr(self, dec, nn.ModuleList(nn.Linear(8, 8) for _ in range(2)))
        self.num_decoder_layers = 2  # the decoder's own count, right at every encoder depth

    def forward(self, x):
        for layer in getattr(self, self.names[0]):
            x = torch.tanh(layer(x))
        for layer in getattr(self, self.names[1]):
            x = x + layer(x) / math.sqrt(2 * self.num_decoder_layers)
        return x


def test_a_count_of_another_towers_list_is_not_named():
    """A Depth over the encoder, beside a fixed decoder reading num_decoder_layers (equal to the encoder's full
    depth by chance): the decoder's count was named, though it is right at every encoder depth."""
    from sortednet.check import LayerCountWarning

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayerCountWarning)
        sn.wrap(_NestedEncoderFixedDecoder(), sn.Depth("enc", [1, 2], layers="encoder"), example=torch.randn(4, 8))
    with pytest.warns(LayerCountWarning, match="num_decoder_layers"):  # (the decoder's own Depth: named)
        sn.wrap(_NestedEncoderFixedDecoder(), sn.Depth("dec", [1, 2], layers="decoder"), example=torch.randn(4, 8))
    with warnings.catch_warnings():  # (enc / dec name the same towers as encoder / decoder)
        warnings.simplefilter("error", LayerCountWarning)
        sn.wrap(_NestedEncoderFixedDecoder("enc_blocks", "dec_blocks"), sn.Depth("enc", [1, 2], layers="enc_blocks"),
                example=torch.randn(4, 8))


class _ScalesByADecoderCount(nn.Module):
    """One layer list, a residual scale read from a decoder-named count, and a small decoder list of another
    length beside it (the count is not that list's)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.decoder_heads = nn.ModuleList([nn.Linear(8, 8)])
        self.num_decoder_layers = 2

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x) / math.sqrt(2 * self.num_decoder_layers)
        return self.decoder_heads[0](x)


def test_a_tower_named_count_of_the_nested_list_is_still_named():
    from sortednet.check import LayerCountWarning

    torch.manual_seed(0)
    with pytest.warns(LayerCountWarning, match="num_decoder_layers"):
        sn.wrap(_ScalesByADecoderCount(), sn.Depth("d", [1, 2], layers="blocks"), example=torch.randn(4, 8))


@pytest.mark.parametrize("how", ["tensor", "float", "hf_config", "assert", "table"])
def test_a_layer_count_is_named_where_it_changes_a_shallower_sub_model(how):
    """``x / self.n_layers`` (the tensor's operator reads the int's value) and ``x * (1.0 / self.n_layers)``
    (float's does) never called the watched count's own methods: the most common residual scale kept the full
    model's at every depth, with no LayerCountWarning; nor was a transformers config a model of the user's holds
    looked at. An assertion or a table of one entry per layer, which change nothing at any depth, were named.
    Measured now: the shallowest sub-model with the count as it is and as a model of that depth holds it."""
    from sortednet.check import LayerCountWarning

    torch.manual_seed(0)
    model = _ScalesByItsCount(4, how)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sn.wrap(model, sn.Depth("depth", [2, 4], layers="blocks"), example=torch.randn(3, 8))
    said = [str(w.message) for w in seen if issubclass(w.category, LayerCountWarning)]
    name = "config.n_layer" if how == "hf_config" else "n_layers"
    assert bool(said) == (how in ("tensor", "float", "hf_config")) and all(f"['{name}']" in m for m in said), said
    assert type(model.n_layers) is int and model.n_layers == 4


class _ScaledBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.fc = cfg, nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x) / math.sqrt(2 * self.cfg.n_layers)


class _SharesItsTupleConfig(nn.Module):
    """Blocks reading the layer count of a named-tuple config the model holds too."""

    def __init__(self, n: int):
        super().__init__()
        self.cfg = _TupleArgs(n, 8)
        self.blocks = nn.ModuleList(_ScaledBlock(self.cfg) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class _ScaledHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.fc = cfg, nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) * (4.0 / self.cfg.n_layers)


class _HeadSharesItsTupleConfig(nn.Module):
    """A head beside the blocks reading the layer count of a named-tuple config the model holds too."""

    def __init__(self, n: int):
        super().__init__()
        self.cfg = _TupleArgs(n, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.head = _ScaledHead(self.cfg)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


@pytest.mark.parametrize("model", [_SharesItsTupleConfig, _HeadSharesItsTupleConfig])
def test_a_named_tuple_config_is_measured_in_every_holder(model):
    """A named tuple is measured by putting a copy with the shallow count in its holder's place: only the first
    holder found (the model) got it, the blocks holding the same tuple read the full count, nothing moved and
    the count went unnamed. Every holder gets the copy; each gets its own tuple back."""
    from sortednet.check import LayerCountWarning

    torch.manual_seed(0)
    model = model(4)
    cfg = model.cfg
    with pytest.warns(LayerCountWarning, match=r"\['cfg.n_layers'\]"):
        sn.wrap(model, sn.Depth("depth", [2, 4], layers="blocks"), example=torch.randn(3, 8))
    assert model.cfg is cfg and all(m.cfg is cfg for m in model.modules() if hasattr(m, "cfg"))


class _ReadsItsBackbonesCount(nn.Module):
    """A classifier on the middle layer of a transformers backbone, the layer found by the backbone's config."""

    def __init__(self, reads: bool):
        super().__init__()
        import transformers

        self.reads = reads
        self.backbone = transformers.LlamaModel(transformers.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1))
        self.head = nn.Linear(16, 2)

    def forward(self, ids):
        states = self.backbone(ids, output_hidden_states=True).hidden_states
        middle = (self.backbone.config.num_hidden_layers if self.reads else len(self.backbone.layers)) // 2
        return self.head(states[middle][:, -1])


@pytest.mark.parametrize("reads", [True, False])
def test_a_count_read_through_a_transformers_backbones_own_config_is_named(reads):
    """``self.backbone.config.num_hidden_layers`` read by the user's forward: transformers' modules were left
    out of the search (their own forwards follow the depth), so the count went unnamed while a depth-2 sub-model
    read the 4-layer model's middle layer (1.05 off a 2-layer model). Their configs held by a module of the
    user's are measured now; a backbone whose count only its own forward reads is not named."""
    from sortednet.check import LayerCountWarning

    torch.manual_seed(0)
    model, ids = _ReadsItsBackbonesCount(reads).eval(), torch.randint(0, 40, (2, 6))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        nest = sn.wrap(model, sn.Depth("depth", [2, 4], layers="backbone.layers"), example=ids)
    said = [str(w.message) for w in seen if issubclass(w.category, LayerCountWarning)]
    assert bool(said) == reads and all("['backbone.config.num_hidden_layers']" in m for m in said), said
    assert model.backbone.config.num_hidden_layers == 4
    with torch.no_grad(), nest.use("depth=2"):
        states = model.backbone(ids, output_hidden_states=True).hidden_states
        assert torch.allclose(model(ids), model.head(states[1][:, -1])) == (not reads)


class _CountsByName(nn.Module):
    def __init__(self, n: int, name: str):
        super().__init__()
        self.blocks, self.norm, self.name = nn.ModuleList(nn.Linear(8, 8) for _ in range(n)), nn.LayerNorm(8), name
        setattr(self, name, n)

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = torch.relu(block(x))
            if i == getattr(self, self.name) - 1:
                x = self.norm(x)
        return x


@pytest.mark.parametrize("name", ["num_encoder_layers", "encoder_layers", "num_res_blocks", "layer_count", "nb_layers",
                                  "decoder_depth", "num_enc_layers", "text_layers", "decoder_num_hidden_layers",
                                  "total_layers"])
def test_a_layer_count_under_another_common_name_is_said_not_to_follow_the_depth(name):
    """Only ``n_layers``-like names were watched: a count kept as ``num_encoder_layers`` (BART, T5),
    ``num_res_blocks`` (diffusion U-Nets), ``layer_count``, ... never reached the final norm at depth 2 in
    silence (0.51 off the 2-block network). Names that are no count of the list (``block_size``, a sliding
    window's ``max_window_layers``, ``num_stages`` above a Depth of one stage's blocks, ``bit_depth``) stay
    unwatched."""
    from sortednet.check import LayerCountWarning

    torch.manual_seed(0)
    model, x = _CountsByName(4, name), torch.randn(3, 8)
    with pytest.warns(LayerCountWarning, match=name):
        sn.wrap(model, sn.Depth("depth", [2, 4], layers="blocks"), example=x).unwrap()
    for other in ("block_size", "max_window_layers", "num_stages", "bit_depth", "max_depth", "freeze_layers"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", LayerCountWarning)
            sn.wrap(_CountsByName(4, other), sn.Depth("depth", [2, 4], layers="blocks"), example=x).unwrap()


class _MiscountedLinear(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.weight, self.scale = nn.Parameter(torch.randn(o, i) / i ** 0.5), nn.Parameter(1 + torch.rand(o))

    def forward(self, x):
        return F.linear(x, self.weight) * self.scale


class _MiscountingSlicer(sn.Slicer):
    roles, attrs = ("out", "inp"), ("weight", "scale")

    def full(self, m, role):
        return m._parameters["weight"].shape[0 if role == "out" else 1]

    def value(self, m, name):
        return self.take(m, name, [(0, "out"), (1, "inp")] if name == "weight" else [(0, "out")])

    def numel(self, m, name):  # a user's mistake: the full size, whatever the sub-model
        return m._parameters[name].numel()


sn.slicer(_MiscountedLinear)(_MiscountingSlicer)


class _Proj(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.weight, self.hidden = nn.Parameter(torch.randn(o, i) / i ** 0.5), o

    def forward(self, x):
        return F.linear(x, self.weight) / self.hidden ** 0.5


@sn.slicer(_Proj)
class _ProjSlicer(sn.Slicer):
    roles, attrs = ("out", "inp"), ("weight", "hidden")
    views, static = {"weight": ((0, "out"), (1, "inp"))}, ("hidden",)

    def full(self, m, role):
        return m._parameters["weight"].shape[0 if role == "out" else 1]

    def value(self, m, name):
        return self.features(m, "out", m.__dict__["hidden"])

    def export(self, live, copy_):  # a user's mistake: the width of the wrong role where both are bound
        copy_ = super().export(live, copy_)
        copy_.hidden = (live._sn.bind.get("inp") or live._sn.bind["out"]).total()
        return copy_


class _Proj2(_Proj):
    pass


@sn.slicer(_Proj2)
class _ValueSlicer(_ProjSlicer):
    def export(self, live, copy_):  # a mistake in values, right where both widths agree
        copy_ = sn.Slicer.export(self, live, copy_)
        bind = live._sn.bind
        if "inp" in bind and bind["inp"].total() != bind["out"].total():
            copy_.weight.data.mul_(1.5)
        return copy_


@pytest.mark.parametrize("proj,message", [
    (_Proj, r"export\(A=\d+,B=\d+\): _ProjSlicer.export left hidden = \d+ on b, where the live module reads \d+"),
    (_Proj2, r"export\(A=\d+,B=\d+\) differs from its live output.*slicers of your own.*'a' \(_ValueSlicer\)")],
    ids=["size", "values"])
def test_check_compares_counts_and_mixed_sub_models_with_their_exports(proj, message):
    """A custom slicer's ``numel()`` was trusted: ``cost`` said 315 parameters where the export held 99, and pick
    chose by that. A custom ``export()`` right at the smallest sub-model alone exported 6 of 9 sub-models other
    than they run (check exported the smallest only). Each export now compares its parameter count with cost
    (check's, and one without an example), and check exports the two most mixed sub-models it dry-runs too."""
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    m = nn.Sequential(_MiscountedLinear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    nest = sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"))
    with pytest.raises(sn.SortedNetError, match=r"export\(h=8\) holds 99 parameters but cost\(h=8\) counts 315"):
        nest.check(x)
    with pytest.raises(sn.SortedNetError, match=r"export\(h=8\) holds 99 parameters but cost\(h=8\) counts 315.*"
                                                r"_MiscountingSlicer"):
        nest.export("h=8")  # (without an example too: the export itself compares)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = proj(8, 32), proj(32, 32), nn.Linear(32, 3)

        def forward(self, x):
            return self.c(F.relu(self.b(F.relu(self.a(x)))))

    net = Net()
    before = copy.deepcopy(net.state_dict())
    dims = (sn.Width("A", [8, 16, 32], out="a", inp="b"), sn.Width("B", [8, 16, 32], out="b", inp="c"))
    with pytest.raises(sn.SortedNetError, match=message):
        sn.wrap(net, *dims, example=x)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert type(net.a) is proj


@pytest.mark.parametrize("only", ["equal", "copy_"])
def test_an_interrupted_check_puts_every_statistic_back(only):
    """check's dry runs put back what they move (BatchNorm statistics run on copies since; other writes are put
    back): a Ctrl-C at any write or comparison still leaves the model exactly as before, not half restored."""
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).train()
        return m, sn.wrap(m, sn.Width("a", [2, 4, 8], out="0", norm="1", inp="3"),
                          sn.Width("b", [4, 8], out="3", norm="4", inp="8"))

    x = torch.randn(4, 3, 8, 8)
    m, nest = build()
    with InterruptAt(10**9, only) as count:
        nest.check(x)
    hit = 0
    for n in range(1, count.calls + 1):
        m, nest = build()
        before = snapshot(m)
        if interrupted(n, lambda: nest.check(x), only):  # noqa: B023
            hit += 1
            assert_unchanged(m, before)
    assert hit == count.calls >= 1


class _PairedFromTheEnd(nn.Module):
    """Blocks and norms in one Depth; ``how`` says in which order the forward reads the norms."""

    def __init__(self, how, n=4, d=8):
        super().__init__()
        self.how = how
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))

    def forward(self, x):
        if self.how == "reversed":       # block i with norm n-1-i: at depth d, norm d-1-i
            pairs = zip(self.blocks, reversed(self.norms))
        elif self.how == "from_len":     # the same by index
            pairs = ((b, self.norms[len(self.norms) - 1 - i]) for i, b in enumerate(self.blocks))
        else:                            # "aligned" / "after": block i with norm i
            pairs = zip(self.blocks, self.norms)
        if self.how == "after":          # every block, then every norm on its output (a U-Net-like second pass)
            outs = []
            for b in self.blocks:
                x = x + b(x)
                outs.append(x)
            return sum(n(o) for n, o in zip(self.norms, outs))
        for b, n in pairs:
            x = x + b(n(x))
        return x


@pytest.mark.parametrize("sizes", [[1, 2, 4], [1, 4]])
@pytest.mark.parametrize("how", ["reversed", "from_len"])
def test_a_depth_list_read_from_its_end_is_refused(how, sizes):
    """The Depth keeps the first d norms, and the forward pairs block i with the (d-1-i)-th: every sub-model
    computed another model (4.1 off at depth 1), live, export and cost all agreeing with each other. With sizes
    [1, 4] the order of what depth 1 keeps (norm 0, block 0) is the full model's too: accepted, in silence; the
    full run's pairs (norm 3 with block 0) are measured now."""
    torch.manual_seed(0)
    model, x = _PairedFromTheEnd(how).eval(), torch.randn(2, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"depth 'depth' keeps the first entries of each of its layer lists, "
                                                r"but the full model runs norms\[3\] with blocks\[0\]"):
        sn.wrap(model, sn.Depth("depth", sizes, layers=["blocks", "norms"]), example=x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model.blocks) is nn.ModuleList


@pytest.mark.parametrize("how", ["aligned", "after"])
def test_depth_lists_read_from_their_start_pass_and_equal_the_first_blocks(how):
    torch.manual_seed(0)
    model, x = _PairedFromTheEnd(how).eval(), torch.randn(2, 8)
    twin = copy.deepcopy(model)
    nest = sn.wrap(model, sn.Depth("depth", [1, 2, 4], layers=["blocks", "norms"]), example=x)
    for d in (1, 2):
        hand = copy.deepcopy(twin)
        hand.blocks, hand.norms = hand.blocks[:d], hand.norms[:d]
        with torch.no_grad(), nest.use(f"depth={d}"):
            torch.testing.assert_close(model(x), hand(x), rtol=0, atol=1e-6)


def test_check_of_a_restricted_nest_runs_listed_sub_models_only():
    """A block that re-sizes the stream coupled to a width by submodels=: check ran the unlisted full widths at the
    shallow depth and raised torch's raw shape error from inside wrap."""
    class Resizes(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 16)])
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            for b in self.blocks:
                x = b(x).tanh()
            return self.head(x)

    torch.manual_seed(0)
    model, x = Resizes().eval(), torch.randn(2, 8)
    nest = sn.wrap(model, sn.Depth("depth", [2, 3], layers="blocks"), sn.Width("w", [8, 16], out="blocks.2",
                                                                                   inp="head"),
                   submodels=[{"depth": 2, "w": 8}, {"depth": 3, "w": 16}], example=x)
    with torch.no_grad(), nest.use("depth=2,w=8"):
        torch.testing.assert_close(nest.export("depth=2,w=8")(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("how", ["shared_ab", "one_block", "calls_first"])
def test_depth_order_passes_shared_and_re_run_blocks(how):
    """One module at several positions (ALBERT-like [a, b, a, b], [a] * 4) and a block re-run by later blocks
    (blocks[0] called again at each step) are read from the start: the order check passes them, and each
    sub-model equals its first d blocks."""
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    entries = {"shared_ab": [a, b, a, b], "one_block": [a] * 4,
               "calls_first": [nn.Linear(8, 8) for _ in range(4)]}[how]

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(entries)

        def forward(self, x):
            for i, blk in enumerate(self.blocks):
                x = torch.tanh(blk(x)) + (self.blocks[0](x) if how == "calls_first" and i > 0 else 0)
            return x

    model, x = Stack().eval(), torch.randn(2, 8)
    twin = copy.deepcopy(model)
    nest = sn.wrap(model, sn.Depth("d", [1, 2, 4], layers="blocks"), example=x)
    for d in (1, 2):
        hand = copy.deepcopy(twin)
        hand.blocks = nn.ModuleList(list(hand.blocks)[:d])
        with torch.no_grad(), nest.use(f"d={d}"):
            torch.testing.assert_close(model(x), hand(x), rtol=0, atol=1e-6)


def test_depth_order_passes_a_last_exit_head_read_as_the_lists_last_entry():
    """One exit head per depth, the forward reading ``self.exits[-1]`` (the last kept entry): the full model
    never runs the shallower heads, which the order check compared anyway and refused."""
    class MultiExit(nn.Module):
        def __init__(self, d=8, n=4):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
            self.exits = nn.ModuleList(nn.Linear(d, 3) for _ in range(n))

        def forward(self, x):
            for b in self.blocks:
                x = torch.relu(b(x))
            return self.exits[-1](x)

    torch.manual_seed(0)
    model, x = MultiExit().eval(), torch.randn(2, 8)
    nest = sn.wrap(model, sn.Depth("depth", [1, 2, 4], layers=["blocks", "exits"]), example=x)
    with torch.no_grad(), nest.use("depth=2"):
        want = model.exits[1](torch.relu(model.blocks[1](torch.relu(model.blocks[0](x)))))
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)


class _OwnProj(_MiscountedLinear):
    """An output projection of the user's own (a Linear with a per-output scale), with a right slicer."""


@sn.slicer(_OwnProj)
class _OwnProjSlicer(sn.Slicer):
    roles, attrs = ("out", "inp"), ("weight", "scale")

    def full(self, m, role):
        return m._parameters["weight"].shape[0 if role == "out" else 1]

    def value(self, m, name):
        return self.take(m, name, [(0, "out"), (1, "inp")] if name == "weight" else [(0, "out")])


class _PerHeadRowsNamedQkv(nn.Module):
    """Rows per head [q_h k_h v_h] under the name qkv (read as stacked [q; k; v]): not whole heads."""

    def __init__(self, proj, d=32, h=4):
        super().__init__()
        self.num_heads, self.head_dim = h, d // h
        self.qkv, self.proj = nn.Linear(d, 3 * d), proj(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, self.num_heads, 3 * self.head_dim).transpose(1, 2).chunk(3, -1)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


def test_whole_heads_that_cannot_be_measured_are_said_not_verified():
    """An attention whose output projection is no plain Linear (a module of the user's own, with a right slicer)
    was skipped by wrap's self-check and passed check in silence, with a wrong fused layout (0.47 off the full
    model with the other heads masked): both now say the heads are not verified there."""
    from sortednet.check import UnverifiedHeadsWarning

    torch.manual_seed(0)
    model, x = _PerHeadRowsNamedQkv(_OwnProj).eval(), torch.randn(2, 7, 32)
    with pytest.warns(UnverifiedHeadsWarning, match=r"output projection is not a plain nn\.Linear"):
        nest = sn.wrap(model, sn.Heads("heads", [1, 2, 4], attn=""))
    with pytest.warns(UnverifiedHeadsWarning, match=r"whole heads are not verified.*\['proj'\]"):
        nest.check(x)
    with pytest.raises(sn.SortedNetError, match="not the first 1 whole heads"):  # a plain Linear there: measured
        sn.wrap(_PerHeadRowsNamedQkv(nn.Linear).eval(), sn.Heads("heads", [1, 2, 4], attn=""))


def test_heads_over_multihead_attention_with_a_lora_out_proj_are_checked_without_a_warning():
    """nn.MultiheadAttention reads out_proj's (computed) weight without calling it: check cannot mask a rank
    reader's input there, and warned, naming no projection, about what it verified before."""
    from sortednet.check import UnverifiedHeadsWarning

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    nest = sn.wrap(model, sn.Heads("heads", [2, 4], attn="layers.*.self_attn"),
                   sn.Rank("r", [2, 16], targets="layers.*.self_attn.out_proj", mode="lora"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedHeadsWarning)
        nest.check(torch.randn(2, 5, 16))


def test_an_attention_with_conv1d_projections_is_verified_at_wrap():
    """transformers' Conv1D (GPT-2's transposed Linear) as the projections of a hand-written attention: wrap's
    self-check runs it (it said 'not verified' after the last change) and refuses a wrong layout at wrap."""
    from transformers.pytorch_utils import Conv1D

    from sortednet.check import UnverifiedHeadsWarning

    class Attn(nn.Module):
        def __init__(self, d=16, h=4, heads_fast=False):
            super().__init__()
            self.num_heads, self.head_dim, self.heads_fast = h, d // h, heads_fast
            self.q, self.k, self.v, self.o = (Conv1D(d, d) for _ in range(4))

        def forward(self, x):
            b, t, _ = x.shape
            if self.heads_fast:  # heads as the fast axis: not whole heads
                sp = lambda y: y.view(b, t, self.head_dim, -1).permute(0, 3, 1, 2)  # noqa: E731
                y = F.scaled_dot_product_attention(sp(self.q(x)), sp(self.k(x)), sp(self.v(x)))
                return self.o(y.permute(0, 2, 3, 1).reshape(b, t, -1))
            sp = lambda y: y.view(b, t, -1, self.head_dim).transpose(1, 2)  # noqa: E731
            y = F.scaled_dot_product_attention(sp(self.q(x)), sp(self.k(x)), sp(self.v(x)))
            return self.o(y.transpose(1, 2).reshape(b, t, -1))

    torch.manual_seed(0)
    good, bad = Attn(), Attn(heads_fast=True)
    for m in (good, bad):
        for p in m.parameters():
            nn.init.normal_(p, std=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedHeadsWarning)
        sn.wrap(good, sn.Heads("h", [1, 2, 4], attn=""))
    with pytest.raises(sn.SortedNetError, match="not the first 1 whole heads of the full module"):
        sn.wrap(bad, sn.Heads("h", [1, 2, 4], attn=""))


class _ScaleOnLinear(nn.Module):
    """A per-channel scale registered on a sliced Linear beside its weight and bias (``a.scale``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)
        self.a.scale = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        return self.b(F.relu(self.a(x)) * self.a.scale)


def test_a_parameter_registered_on_a_sliced_module_is_named_as_unsliced():
    """check said 'a.scale' is a parameter "which this dimension slices itself" with a forward the trace does not
    know (nn.Linear's): it is the user's tensor beside the weights, which no slicer cuts."""
    torch.manual_seed(0)
    nest = sn.wrap(_ScaleOnLinear(), sn.Width("h", [4, 16], out="a", inp="b"))
    with pytest.raises(sn.SortedNetError, match=r"reach parameter 'a.scale', so they cannot shrink; remove that "
                                                r"binding, or, to slice them, hold 'a.scale' in a module"):
        nest.check(torch.randn(3, 6))


class _WritesItsWeight(nn.Module):
    """A forward that writes into a weight a dimension slices: under a sub-model only the slice is written."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(10, 16)
        self.f = nn.Linear(16, 16)
        self.proto = nn.Linear(16, 3, bias=False)
        self.step = 0

    def forward(self, i):
        h = self.f(F.embedding(i, self.emb.weight, max_norm=1.0 if self.how == "max_norm" else None)).mean(1)
        with torch.no_grad():
            w = self.proto.weight
            if self.how == "row_norm" or (self.how == "train_row_norm" and self.training):  # a cosine classifier
                w.div_(w.norm(dim=1, keepdim=True))                                          # (in place)
            elif self.how == "clamp":
                w.clamp_(-0.2, 0.2)
            elif self.how == "momentum" and self.training:  # a momentum encoder's schedule, by a step counter
                w.mul_(0.9 + 0.0001 * self.step)
                self.step += 1
        if self.how == "out_of_place":                 # the same computed on a copy: fine
            return F.linear(F.normalize(h, dim=-1), F.normalize(self.proto.weight, dim=1))
        return self.proto(F.normalize(h, dim=-1))


@pytest.mark.parametrize("how", ["row_norm", "max_norm", "train_row_norm", "clamp", "momentum", "out_of_place"])
def test_a_forward_writing_into_a_sliced_weight_is_refused_where_a_sub_model_writes_other_values(how):
    """Accepted with example= before: one inference forward of h=4 renormalised only the kept columns of each
    row (or the looked-up rows' first 4 features), and the full model's output then moved by 0.08 (0.03 with
    max_norm), in silence; the dry runs put the weights back, so nothing showed. A write only a training forward
    makes was not measured at all (check measured its eval-mode runs): it is said now, with a warning (an update
    of training, as an EMA codebook's, is not refused). An element-wise write (clipping) gives
    each element the value the full model gives it: accepted, and the nest stays the plain model; so is a
    momentum that follows a step counter the forward advances (two full runs write other values too)."""
    torch.manual_seed(0)
    m = _WritesItsWeight(how).eval()
    x = torch.randint(0, 10, (2, 5))
    dims = [sn.Width("h", [4, 16], out=["emb", "f"], inp=["f", "proto"])]
    before, plain = snapshot(m), copy.deepcopy(m)
    if how == "train_row_norm":  # (a training forward's own update, as an EMA codebook's, is training: said)
        from sortednet.check import InPlaceTrainingWriteWarning

        with pytest.warns(InPlaceTrainingWriteWarning, match=r"the training forward writes in place into the sliced "
                                                             r"parameter\(s\) \['proto\.weight'\]"):
            sn.wrap(m, *dims, example=x)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in before["state"].items())  # (dry runs: put back)
        return
    if how in ("row_norm", "max_norm"):
        with pytest.raises(sn.SortedNetError, match=r"writes in place into the sliced parameter\(s\) \['(emb|proto)"
                                                    r"\.weight'\].*a sub-model writes other values there"):
            sn.wrap(m, *dims, example=x)
        assert_unchanged(m, before)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnfollowedOpWarning)   # (functional calls: check cannot follow each unit)
        nest = sn.wrap(m, *dims, example=x)
    state = m.state_dict()                                     # (the dry runs put the clipped weight back)
    assert all(torch.equal(state[k], v) for k, v in before["state"].items())
    with torch.no_grad():
        with nest.use("h=4"):
            m(x)
        torch.testing.assert_close(m(x), plain(x), rtol=0, atol=1e-6)   # (the bug: 0.08 off)
        torch.testing.assert_close(m.proto.weight, plain.proto.weight, rtol=0, atol=0)


class _MaxNormLookup(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.o = nn.Embedding(10, 16), nn.Linear(16, 3)

    def forward(self, i):
        return self.o(F.embedding(i, self.e.weight, max_norm=3.0))


def test_a_full_model_forward_renormalising_rows_a_sub_model_leaves_alone_is_refused():
    """F.embedding(..., max_norm=) in a parent's forward, on rows whose full norm is over the bound and whose kept
    part is under it: the sub-model writes nothing, so the check of what a sub-model writes passed; but one
    inference forward of the full model renormalised those rows and moved h=4's output by 0.11, in silence. The
    full model's write is measured against the sub-model's output now; a clamp (element-wise) stays accepted."""
    torch.manual_seed(0)
    m = _MaxNormLookup().eval()
    x = torch.tensor([[0, 1, 2, 3]])
    with torch.no_grad():
        assert (m.e.weight[:4].norm(dim=1) > 3).all() and (m.e.weight[:4, :4].norm(dim=1) < 3).all()
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"the full model's forward writes in place into the sliced "
                                                r"parameter\(s\) \['e\.weight'\], and what it writes changes the "
                                                r"output of h=4"):
        sn.wrap(m, sn.Width("h", [4, 16], out="e", inp="o"), example=x)
    assert_unchanged(m, before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnfollowedOpWarning)
        sn.wrap(_WritesItsWeight("clamp").eval(), sn.Width("h", [4, 16], out=["emb", "f"], inp=["f", "proto"]),
                example=torch.randint(0, 10, (2, 5)))


class _CountsCalls(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return super().forward(x) + 0.01 * self.calls


@pytest.mark.parametrize("when", ["pre_clamp", "post_clamp", "pre_decay", "post_decay", "counted_clamp"])
def test_element_wise_weight_writes_of_the_full_model_stay_accepted(when):
    """The full model's write was measured against the sub-model's output from the weights as they were: a decay
    (not idempotent), a clamp after the weight is read and a forward counting its calls in a buffer beside a clamp
    were refused, though the sub-model writes the same values itself. Measured from the weights (and buffers) its
    own forward leaves now."""
    torch.manual_seed(0)
    m = _CountsCalls() if when == "counted_clamp" else nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def write(mod, *_):
        with torch.no_grad():
            mod.weight.mul_(0.999) if when.endswith("decay") else mod.weight.clamp_(-0.1, 0.1)

    (m[0].register_forward_hook if when.startswith("post") else m[0].register_forward_pre_hook)(write)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sn.wrap(m, sn.Width("w", [4, 16], out="0", inp="2"), example=torch.randn(3, 8))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())  # (the dry runs put them back)


class _RunningScale(nn.Module):
    """A scale with a running statistic of its input in a buffer, updated by a training forward."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.register_buffer("running", torch.ones(dim))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.running.mul_(0.9).add_(0.1 * x.abs().mean(0))
        return x * self.gamma / self.running


class _RunningScaleSlicer(sn.Slicer):
    roles = ("norm",)
    attrs = ("gamma", "running")

    def full(self, m, role):
        return m._parameters["gamma"].shape[0]

    def value(self, m, name):
        return self.take(m, name, [(0, "norm")])


def test_a_running_statistic_a_training_forward_writes_into_a_sliced_buffer_is_accepted():
    """A buffer is the place for a running statistic (as BatchNorm's, recalibrated per sub-model): the
    training-mode measure of in-place writes covers parameters only, and the dry runs leave the buffer as it
    was."""
    sn.slicer(_RunningScale)(_RunningScaleSlicer)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), _RunningScale(16), nn.Linear(16, 2))
    x = torch.randn(4, 8)
    before = snapshot(model)
    sn.wrap(model, sn.Width("h", [4, 16], out=["0", "1"], inp=["1", "3"], norm="2"), example=x)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before["state"].items())


class _Masked(nn.Module):
    def __init__(self, dim, learnable=False):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.mask = torch.ones(dim, requires_grad=learnable)  # a plain tensor attribute (no buffer)

    def forward(self, x):
        return x * self.gamma * self.mask


class _MaskedSlicer(sn.Slicer):
    roles = ("norm",)
    attrs = ("gamma", "mask")

    def full(self, m, role):
        return m._parameters["gamma"].shape[0]

    def value(self, m, name):
        if name == "gamma":
            return self.take(m, "gamma", [(0, "norm")])
        return m.__dict__["mask"][: self.features(m, "norm", m.__dict__["mask"].shape[0])]


@pytest.mark.parametrize("sub", ["h=4", "h=16"])
@pytest.mark.parametrize("learnable", [False, True], ids=["constant", "learnable"])
def test_an_export_owns_a_plain_tensor_attribute_a_custom_slicer_serves(sub, learnable):
    """The base export shallow-copied a tensor that is neither parameter nor buffer: the export's mask was the
    live model's memory, and zeroing the live mask afterwards changed the export's output by 0.25. A learnable
    one (a leaf that requires grad, cut by value(): its own, not computed from a parameter) exports learnable."""
    sn.slicer(_Masked)(_MaskedSlicer)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), _Masked(16, learnable), nn.Linear(16, 2))
    x = torch.randn(2, 8)
    nest = sn.wrap(model, sn.Width("h", [4, 16], out="0", norm="1", inp="2"), example=x)
    small = nest.export(sub)
    want = small(x).detach().clone()
    with nest.use(sub):
        torch.testing.assert_close(want, model(x))
    assert small[1].mask.requires_grad is learnable and small[1].mask.is_leaf
    with torch.no_grad():
        model[1].__dict__["mask"].zero_()              # the live model changes after the export
    assert small[1].mask.untyped_storage().data_ptr() != model[1].__dict__["mask"].untyped_storage().data_ptr()
    torch.testing.assert_close(small(x), want, rtol=0, atol=0)


class _GuardedSkip(nn.Module):
    """A skip added only where the shapes match: the "if x.shape == h.shape" idiom."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16, affine=False)
        self.o = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        x = F.relu(self.a(x))
        h = F.relu(self.b(x))
        h = x + h if x.shape[1] == h.shape[1] else h
        return self.o(self.gn(h))


@pytest.mark.parametrize("dims, needle", [
    ([sn.Width("q", [8, 16], out="b", inp="o", norm="gn")], "add out='a', inp='b'"),
    ([sn.Width("p", [8, 16], out="a", inp="b"), sn.Width("q", [8, 16], out="b", inp="o", norm="gn")],
     r"dimensions \['p', 'q'\] slice features that must shrink together"),
    ([sn.Width("q", [8, 16], out=["a", "b"], inp=["b", "o"])], "add norm='gn'"),
], ids=["one-side", "two-widths", "norm-without-weight"])
def test_features_shared_with_a_module_no_dimension_slices_are_refused_when_the_dry_runs_pass(dims, needle):
    """The dry runs passed (the skip was dropped where the shapes differed; a GroupNorm without weights fed 8
    channels makes 4 groups of 2, not the full model's first 2 groups of 4), and check accepted sub-models that
    are not the full model's first units, in silence. The wiring trace's coupling is now checked whether or not a
    dry run fails, naming what to add."""
    torch.manual_seed(0)
    model = _GuardedSkip().eval()
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=r"the dry runs pass, but\n.*" + needle):
        sn.wrap(model, *dims, example=torch.randn(2, 3, 6, 6))
    assert_unchanged(model, before)
    nest = sn.wrap(model, sn.Width("q", [8, 16], out=["a", "b"], inp=["b", "o"], norm="gn"),
                   example=torch.randn(2, 3, 6, 6))
    assert nest.export("q=8").gn.num_groups == 2


class _FlatHead(nn.Module):
    """A C x 2 x 2 map flattened into a Linear: its input width is 4 C, another Width coupled by the list."""

    def __init__(self, last: bool):
        super().__init__()
        self.last = last
        self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(32, 2)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(F.relu(self.c(x)), 2)
        return self.fc((h.permute(0, 2, 3, 1) if self.last else h).flatten(1))


@pytest.mark.parametrize("last", [False, True], ids=["channels-first", "channels-last"])
def test_a_restricted_nest_is_checked_on_the_sub_models_it_lists(last):
    """Two Widths coupled only by the list (c=4 with f=16, c=8 with f=32): check ran sizes the nest never lists
    (c=4 with f=32), whose shapes do not fit, and a bare RuntimeError came out; with that fixed, c's outputs
    were said to be read by no layer (f reads them, through the flatten). The channels-first flatten keeps
    whole channels and is accepted; the channels-last one interleaves them and is refused by name."""
    torch.manual_seed(0)
    model, x = _FlatHead(last), torch.randn(2, 3, 8, 8)
    dims = [sn.Width("c", [4, 8], out="c"), sn.Width("f", [16, 32], inp="fc")]
    if last:
        with pytest.raises(sn.SortedNetError, match=r"'flatten'.*merges or splits this axis"):
            sn.wrap(model, *dims, submodels=["c=4,f=16", "c=8,f=32"], example=x)
        return
    nest = sn.wrap(model, *dims, submodels=["c=4,f=16", "c=8,f=32"], example=x)
    with torch.no_grad(), nest.use("c=4,f=16"):
        h = F.adaptive_avg_pool2d(F.relu(F.conv2d(x, model.c._parameters["weight"][:4],
                                                  model.c._parameters["bias"][:4], padding=1)), 2).flatten(1)
        torch.testing.assert_close(model(x), F.linear(h, model.fc._parameters["weight"][:, :16],
                                                       model.fc._parameters["bias"]))


class _SharedNorm(nn.Module):
    """One InstanceNorm without weights after two convs of two Widths, and another per block unbound."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 8, 1)
        self.c3, self.c4 = nn.Conv2d(8, 32, 3, padding=1), nn.Conv2d(32, 2, 1)
        self.norm = nn.InstanceNorm2d(32)

    def forward(self, x):
        return self.c4(F.relu(self.norm(self.c3(self.c2(F.relu(self.norm(self.c1(x))))))))


def test_a_norm_without_weights_shared_or_left_out_is_measured_not_refused():
    """The coupling refusal must not refuse what is right: a per-channel norm without weights (InstanceNorm at
    PyTorch's defaults) left out of norm=, and one instance used after layers of two Widths (the wiring trace
    couples them through it), give sub-models equal to the full model with the other units masked: measured,
    accepted, as before the refusal was added."""
    torch.manual_seed(0)
    model, x = _SharedNorm().eval(), torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (InstanceNorm's own: num_features is not used)
        nest = sn.wrap(model, sn.Width("a", [8, 32], out="c1", inp="c2"), sn.Width("b", [8, 32], out="c3", inp="c4"),
                       example=x)
        for sub in ("a=8,b=32", "a=32,b=8", "a=8,b=8"):
            with torch.no_grad(), nest.use(sub):
                torch.testing.assert_close(nest.export(sub)(x), model(x))
    # a GroupNorm of one group without weights normalises over all channels: a binding would not change it
    seq = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(1, 16, affine=False), nn.Conv2d(16, 2, 1)).eval()
    nest = sn.wrap(seq, sn.Width("w", [8, 16], out="0", inp="2"), example=x)
    with torch.no_grad(), nest.use("w=8"):
        torch.testing.assert_close(nest.export("w=8")(x), seq(x))


class _FnNorm(nn.Module):
    """A norm of the user's whose running statistics are written inside a kernel (F.batch_norm / F.instance_norm /
    torch.batch_norm), not by a method ending in ``_``."""

    how = "F.batch_norm"

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        rm, rv, w, b, t = self.running_mean, self.running_var, self.weight, self.bias, self.training
        if self.how == "F.batch_norm":
            return F.batch_norm(x, rm, rv, w, b, t, 0.1, 1e-5)
        if self.how == "F.batch_norm kw":
            return F.batch_norm(x, running_mean=rm, running_var=rv, weight=w, bias=b, training=t)
        if self.how == "torch.batch_norm":
            return torch.batch_norm(x, w, b, rm, rv, t, 0.1, 1e-5, False)
        if self.how == "native_batch_norm":
            return torch.native_batch_norm(x, w, b, rm, rv, t, 0.1, 1e-5)[0]
        return F.instance_norm(x[..., None], rm, rv, w, b, use_input_stats=t)[..., 0]


def _copying_norm_slicer(cls):
    class CopyStats(sn.Slicer):
        roles, attrs = ("norm",), ("weight", "bias", "running_mean", "running_var")
        views = {"weight": ((0, "norm"),), "bias": ((0, "norm"),)}

        def full(self, m, role):
            return m._parameters["weight"].shape[0]

        def value(self, m, name):
            return self.take(m, name, [(0, "norm")]).clone()  # a copy of the statistics: their writes are lost

    sn.slicer(cls)(CopyStats)


@pytest.mark.parametrize("how", ["F.batch_norm", "F.batch_norm kw", "torch.batch_norm", "native_batch_norm",
                                 "F.instance_norm"])
def test_running_statistics_written_inside_a_kernel_into_a_copy_are_refused(how):
    """The write guard looked at method names only: F.batch_norm(training=True) wrote a custom slicer's copy of
    the running statistics inside its kernel, and the update was lost under every smaller sub-model (check and
    wrap(example=) passed). Refused now, naming the statistic; eval (no write) runs and equals the export."""
    cls = type(f"_FnNorm_{how.replace(' ', '_').replace('.', '_')}", (_FnNorm,), {"how": how})
    _copying_norm_slicer(cls)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), cls(8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(6, 4)
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", norm="1", inp="3"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with nest.use("h=4"), pytest.raises(sn.SortedNetError, match=r"1\.running_(mean|var): written in place"):
        m(x)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    m.eval()
    with torch.no_grad(), nest.use("h=4"):
        torch.testing.assert_close(m(x), nest.export("h=4")(x))


def test_copies_a_users_slicer_makes_for_library_layers_that_write_them_are_refused():
    """Reads inside PyTorch's own forwards skipped the guard (they write nothing, it was assumed), but
    nn.BatchNorm1d writes its running statistics and an nn.Embedding with max_norm renormalises its weight's
    rows: a user's slicer for them that returns copies lost those writes. Both are refused now; an Embedding
    without max_norm reads its copy unguarded."""
    class BN(nn.BatchNorm1d):
        pass

    class Emb(nn.Embedding):
        pass

    class BNCopy(sn.Slicer):
        roles, attrs = ("norm",), ("weight", "bias", "running_mean", "running_var", "num_features")
        views = {"weight": ((0, "norm"),), "bias": ((0, "norm"),)}

        def full(self, m, role):
            return m.__dict__["num_features"]

        def value(self, m, name):
            if name == "num_features":
                return self.features(m, "norm", m.__dict__[name])
            return self.take(m, name, [(0, "norm")]).clone()

    sn.slicer(BN)(BNCopy)
    sn.slicer(Emb)(type("EmbCopy", (_EmbeddingCopy,), {}))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), BN(8), nn.Linear(8, 2))
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", norm="1", inp="2"))
    with nest.use("h=4"), pytest.raises(sn.SortedNetError, match=r"1\.running_mean: written in place"):
        m(torch.randn(6, 4))
    nest.unwrap()
    _renormalised_rows_refused(Emb, "embedding")


class _EmbeddingCopy(sn.Slicer):
    """A user's slicer for an embedding (bag) that returns a copy of the weight's columns."""

    roles, attrs = ("out",), ("weight", "embedding_dim")

    def full(self, m, role):
        return m.__dict__["embedding_dim"]

    def value(self, m, name):
        if name == "embedding_dim":
            return self.features(m, "out", m.__dict__[name])
        return self.take(m, "weight", [(1, "out")]).clone()


def _renormalised_rows_refused(cls, op):
    """With max_norm, a forward under a smaller sub-model is refused (its renorm would write the copy); without,
    the live sub-model equals its export."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 3]])
    for max_norm in (1.0, None):
        e = nn.Sequential(cls(10, 8, max_norm=max_norm), nn.Linear(8, 2))
        with torch.no_grad():
            e[0].weight.mul_(5)  # (rows longer than max_norm: renormalised by every forward that reads them)
        nest = sn.wrap(e, sn.Width("h", [4, 8], out="0", inp="1"))
        if max_norm is not None:
            with nest.use("h=4"), pytest.raises(sn.SortedNetError, match=rf"0\.weight: written in place \({op}"):
                e(ids)
        else:
            with nest.use("h=4"), torch.no_grad():
                torch.testing.assert_close(e(ids), nest.export("h=4")(ids))
        nest.unwrap()


def test_rows_an_embedding_bag_renormalises_into_a_copy_are_refused():
    """F.embedding_bag(max_norm=) renormalises the rows it reads, in place: into a custom slicer's copy that
    write was lost (the guard knew F.embedding only)."""
    class Bag(nn.EmbeddingBag):
        pass

    sn.slicer(Bag)(type("BagCopy", (_EmbeddingCopy,), {}))
    _renormalised_rows_refused(functools.partial(Bag, mode="mean"), "embedding_bag")


def test_a_view_to_a_stored_width_is_named_with_where_it_was_raised():
    """A squeeze-excitation forward viewing to a channel count it stored at init (``.view(b, self.c)``) failed under
    a smaller width with a bare 'shape [2, 16] is invalid' and 'no missing binding found': the message now names
    the module whose code raised it and the full size the shape still holds."""
    class SE(nn.Module):
        def __init__(self, c=16):
            super().__init__()
            self.c = c
            self.conv, self.fc1, self.fc2 = nn.Conv2d(3, c, 3, padding=1), nn.Linear(c, 4), nn.Linear(4, c)
            self.out = nn.Conv2d(c, 8, 1)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            s = nn.functional.adaptive_avg_pool2d(h, 1).view(h.size(0), self.c)
            return self.out(h * torch.sigmoid(self.fc2(torch.relu(self.fc1(s)))).view(h.size(0), self.c, 1, 1))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.se = SE()

        def forward(self, x):
            return self.se(x).mean((2, 3))

    with pytest.raises(sn.SortedNetError, match=r"raised in 'se' \(SE\), test_check.py:\d+\); the shape \[2, 16\] "
                                                r"holds 16, the full size of width 'c' \(here 4\)"):
        sn.wrap(Outer(), sn.Width("c", [4, 16], out=["se.conv", "se.fc2"], inp=["se.fc1", "se.out"]),
                example=torch.randn(2, 3, 8, 8))


def test_a_refusal_of_an_input_names_the_fix_without_wiring_guesses():
    """``nn.MultiheadAttention(is_causal=True)`` without a mask runs whole on PyTorch's inference fast path (which
    ignores the hint) and is refused in every smaller sub-model: the message said only PyTorch's words and then
    guessed at wiring ('no missing binding found ... derive head widths from the tensors'); it names the mask to
    pass and why the full model ran, and guesses nothing."""
    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.attn(x, x, x, is_causal=True, need_weights=False)[0])

    m = Causal().eval()
    before = snapshot(m)
    want = r"heads 'h' at 2 .*generate_square_subsequent_mask\(6\).*fast path[^\n]*\(raised in 'attn' "
    with pytest.raises(sn.SortedNetError, match=want + r"\(MultiheadAttention\), test_check.py:\d+\)$"):
        sn.wrap(m, sn.Heads("h", [2, 4], attn="attn"), example=torch.randn(2, 6, 32))
    assert_unchanged(m, before)


def test_a_failure_inside_a_sliced_layer_names_its_class_and_the_users_line():
    """A root forward feeding a full-width tensor to a sliced Linear was reported as raised in 'b' (SortedLinear),
    linear.py:53: sortednet's internal class and file, not the user's line that called the layer."""
    class Pad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(torch.cat([h, h.new_zeros(len(h), 16 - h.shape[1])], 1))  # (16 wide at any size)

    line = Pad.forward.__code__.co_firstlineno + 2
    with pytest.raises(sn.SortedNetError, match=rf"\(raised in 'b' \(Linear\), test_check.py:{line}\)"):
        sn.wrap(Pad(), sn.Width("w", [4, 16], out="a", inp="b"), example=torch.randn(3, 8))


def test_a_failure_raised_below_a_proxy_argument_is_still_a_named_refusal():
    """Naming where a failure was raised reads each frame's first argument: one whose ``__class__`` raises (a proxy
    object) made check end in that raw error instead of its refusal."""
    class Proxy:
        @property
        def __class__(self):
            raise RuntimeError("no class for you")

    def widen(proxy, h):
        return h.view(h.shape[0], 16)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.b(widen(Proxy(), self.a(x)))

    with pytest.raises(sn.SortedNetError, match="shape '\\[2, 16\\]' is invalid"):
        sn.wrap(Net(), sn.Width("h", [4, 16], out="a", inp="b"), example=torch.randn(2, 4))


class _MapsFirst(nn.Module):
    """Grouped-query attention sharing key/value heads with ``repeat`` (not ``repeat_interleave``: query head i
    reads another head than i // group, so fewer heads are not the first whole heads), returning its per-head
    attention map first, then the map averaged over the heads, as the model does."""

    def __init__(self, share="repeat"):
        super().__init__()
        self.ln, self.head, self.share = nn.LayerNorm(32), nn.Linear(32, 5), share
        self.num_heads, self.head_dim, self.num_key_value_heads = 4, 8, 2
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)
        self.o_proj = nn.Linear(32, 32)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.ln(x)
        q, k, v = (p(h).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                 self.v_proj))
        n = self.num_heads // self.num_key_value_heads
        k, v = (k.repeat(1, n, 1, 1), v.repeat(1, n, 1, 1)) if self.share == "repeat" else (
            k.repeat_interleave(n, 1), v.repeat_interleave(n, 1))
        p = (q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)).softmax(-1)
        return {"attn": p, "avg": p.mean(1),  # (averaged over the heads in force: not the sub-model's to match)
                "logits": self.head(x + self.o_proj((p @ v).transpose(1, 2).reshape(b, t, -1)))}


@pytest.mark.parametrize("share", ["repeat", "repeat_interleave"])
def test_whole_heads_are_measured_when_the_first_output_is_a_per_head_map(share):
    """The whole-heads measure read the model's first output only: a per-head attention map returned first shrinks
    with the heads, so nothing was compared and a wrong key/value sharing order was accepted (0.095 off at 2 heads),
    where the same model returning its logits first was refused."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    dim = sn.Heads("h", [2, 4], attn="", qkv=["q_proj", "k_proj", "v_proj"], o="o_proj")
    if share == "repeat_interleave":
        sn.wrap(_MapsFirst(share).eval(), dim, example=x).unwrap()
        return
    with pytest.raises(sn.SortedNetError, match=r"heads 'h' at 2 is not the first 2 whole heads"):
        sn.wrap(_MapsFirst(share).eval(), dim, example=x)


class _ScaleFromWidth(nn.Module):
    """Attention whose softmax scale divides its full width by the active head count: wrong below the full
    count by a few percent."""

    def __init__(self):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = 64, 8, 8
        self.q, self.k, self.v, self.o = (nn.Linear(64, 64) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        scale = (self.embed_dim // self.num_heads) ** -0.5
        return self.o(((q @ k.transpose(-1, -2)) * scale).softmax(-1).matmul(v).transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("example", [False, True])
def test_whole_heads_of_a_half_precision_model_are_measured_in_float32(example):
    """In bfloat16 the whole-heads tolerance (1e-1, for half precision's rounding) passed a head count read into a
    scale (0.07 off at 6 of 8 heads) that float32 refuses; each attention is now also run alone in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(64), _ScaleFromWidth(), nn.Linear(64, 5)).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 16, 64).to(torch.bfloat16)
    with pytest.raises(sn.SortedNetError, match=r"(6 heads are|at 6 is) not the first 6 whole heads"):
        sn.wrap(model, sn.Heads("h", [6, 8], attn="1"), example=x if example else None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _CastsItsInput(nn.Module):
    """A bfloat16 attention casting its input to bfloat16 (``x.to(self.q.weight.dtype)`` read as a fixed dtype),
    heads split along the fast axis (``view(b, t, head_dim, -1)``: wrong for Heads) when ``wrong``."""

    def __init__(self, wrong):
        super().__init__()
        self.num_heads, self.head_dim, self.wrong = 4, 8, wrong
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        x = x.to(torch.bfloat16)
        b, t, _ = x.shape
        split = (lambda y: y.view(b, t, self.head_dim, -1).transpose(1, 3)) if self.wrong else (
            lambda y: y.view(b, t, -1, self.head_dim).transpose(1, 2))
        q, k, v = (split(p(x)) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 3) if self.wrong else y.transpose(1, 2)
        return self.o(y.reshape(b, t, -1))


@pytest.mark.parametrize("wrong", [False, True])
def test_a_half_precision_attention_that_casts_its_input_is_still_measured(wrong):
    """Run alone in float32, an attention casting its input to bfloat16 fails (float32 weights, a bfloat16
    input): it went unmeasured (UnverifiedHeadsWarning) where it had been measured in bfloat16. Where float32
    does not run, it is measured in its own precision (tolerance 1e-1): a correct one passes unwarned, heads
    split along the wrong axis are refused."""
    from sortednet.check import UnverifiedHeadsWarning
    torch.manual_seed(0)
    model = nn.Sequential(_CastsItsInput(wrong), nn.Linear(32, 5)).to(torch.bfloat16)
    dim = sn.Heads("h", [2, 4], attn="0")
    if wrong:
        with pytest.raises(sn.SortedNetError, match=r"2 heads are not the first 2 whole heads"):
            sn.wrap(model, dim)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedHeadsWarning)
        sn.wrap(model, dim).unwrap()


class _WeightsToo(nn.Module):
    """Returns the attention weights (averaged over the heads in force) beside its output: returned, not read."""

    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 8)

    def forward(self, x):
        y, w = self.attn(x, x, x, need_weights=True)
        return self.head(y), w, (w * w).sum()


def test_outputs_returned_beside_the_models_output_are_not_held_to_whole_heads():
    """Measuring every output that keeps its shape refused correct attention: weights averaged over the heads and an
    auxiliary term returned beside the output differ, as they should, between fewer heads and masked ones."""
    torch.manual_seed(0)
    sn.wrap(_WeightsToo(), sn.Heads("h", [1, 2, 4], attn="attn"), example=torch.randn(2, 5, 32)).unwrap()


class _FastAxisBesideEmbeddings(nn.Module):
    """Heads split as the fast axis (``view(B, T, -1, h)``: wrong for Heads), the output projection applied outside
    the attention by ``F.linear`` (its input is not captured), and the embeddings returned beside the logits (as a
    Hugging Face ``hidden_states[0]``): an output that does not depend on the heads."""

    def __init__(self, first=False):
        super().__init__()
        self.emb, self.att, self.head, self.first = nn.Linear(5, 16), nn.Module(), nn.Linear(16, 3), first
        self.att.num_heads = 4
        self.att.q, self.att.k, self.att.v, self.att.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        e = self.emb(x)
        b, t, _ = e.shape
        a = self.att
        q, k, v = (p(e).view(b, t, -1, a.num_heads).permute(0, 3, 1, 2) for p in (a.q, a.k, a.v))
        y = ((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ v).permute(0, 2, 3, 1).reshape(b, t, -1)
        hidden = e + F.linear(y, a.o.weight, a.o.bias)
        return (e, self.head(hidden)) if self.first else (self.head(hidden), e)


@pytest.mark.parametrize("first", [False, True])
def test_an_output_the_heads_do_not_reach_vouches_for_nothing(first):
    """Taking the closest of the outputs accepted a wrong layout whenever the model also returned its embeddings
    (equal in every run: 2% off at 2 of 4 heads); returned first, they had been the only output measured. Only the
    outputs the masked heads reach are measured now."""
    torch.manual_seed(0)
    with pytest.raises(sn.SortedNetError, match=r"heads 'h' at 2 is not the first 2 whole heads"):
        sn.wrap(_FastAxisBesideEmbeddings(first).eval(), sn.Heads("h", [2, 4], attn="att", qkv=["q", "k", "v"],
                                                                  o="o"), example=torch.randn(2, 6, 5))


class _TwoLayersWithMaps(nn.Module):
    """Two ``nn.MultiheadAttention`` layers under one Heads, returning the second one's attention weights
    (averaged over its heads, for a plot) or a loss on them beside the logits, in either order."""

    def __init__(self, what: str):
        super().__init__()
        self.a1, self.a2 = (nn.MultiheadAttention(32, 4, batch_first=True) for _ in range(2))
        self.head, self.what = nn.Linear(32, 5), what

    def forward(self, x):
        h = x + self.a1(x, x, x)[0]
        y, w2 = self.a2(h, h, h)
        out = self.head(h + y)
        return {"maps": (out, w2), "maps_first": (w2, out), "loss": (out, w2.square().mean())}[self.what]


@pytest.mark.parametrize("what", ["maps", "maps_first", "loss"])
def test_a_later_layers_attention_weights_returned_beside_the_output_are_not_held_to_whole_heads(what):
    """Measuring every output the masked heads reach refused this correct model: the second layer's weights are
    reached (through the first layer's masked heads), but in the reference they average all its heads, the
    sub-model's only the kept ones. Outputs the weights an attention module returns feed (moved in one more
    reference run, they move) are not measured; the sub-models equal their exports."""
    torch.manual_seed(0)
    m = _TwoLayersWithMaps(what)
    x = torch.randn(2, 6, 32)
    nest = sn.wrap(m, sn.Heads("h", [1, 2, 4], attn=["a1", "a2"]), example=x)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            live = m(x)
            small = nest.export(sub)(x)
        for a, b in zip(live, small):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _ScaledLastBlock(nn.Module):
    """Two attention blocks under one Heads; the last scales its attention's output by a count it takes from the
    full head count (``4 / num_heads``, outside the attention: wrong below 4 heads); per-layer hidden states
    returned beside the logits when ``hidden``."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden, self.head = hidden, nn.Linear(32, 5)
        self.attn = nn.ModuleList(_SelfAttention() for _ in range(2))

    def forward(self, x):
        hs = []
        for i, a in enumerate(self.attn):
            y = a(x)
            x = x + (y * (4 / a.num_heads) if i else y)
            hs.append(x)
        return (self.head(x), *hs) if self.hidden else self.head(x)


class _SelfAttention(nn.Module):
    def __init__(self, heads_axis_last=False, gate_first=False):
        super().__init__()
        self.num_heads, self.head_dim, self.last, self.gate_first = 4, 8, heads_axis_last, gate_first
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
        self.g = nn.Linear(32, 1)

    def forward(self, x):
        b, t, _ = x.shape
        if self.last:  # heads along the fast axis: wrong for Heads
            q, k, v = (p(x).view(b, t, self.head_dim, -1).permute(0, 3, 1, 2) for p in (self.q, self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 3, 1).reshape(b, t, -1)
        else:
            q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        out = F.linear(y, self.o.weight, self.o.bias)
        return (torch.sigmoid(self.g(x)), out) if self.gate_first else out


@pytest.mark.parametrize("hidden", [False, True])
def test_every_output_the_heads_reach_must_match(hidden):
    """Measuring the closest of the outputs the masked heads reach let the first block's hidden state (correct)
    vouch for the second block's error outside its attention (a scale from the full head count): refused with
    the hidden states returned as without them."""
    torch.manual_seed(0)
    with pytest.raises(sn.SortedNetError, match=r"heads 'h' at 2 is not the first 2 whole heads"):
        sn.wrap(_ScaledLastBlock(hidden).eval(), sn.Heads("h", [2, 4], attn=["attn.0", "attn.1"]),
                example=torch.randn(2, 6, 32))


def test_an_attention_returning_its_output_second_is_measured_on_it():
    """An attention returning ``(gate, output)``, run alone by wrap's self-check: the gate (which the heads do not
    reach) was measured and the output skipped as 'returned beside it', so heads split along the wrong axis were
    accepted in silence (0.085 off at 2 of 4 heads)."""
    torch.manual_seed(0)
    m = _SelfAttention(heads_axis_last=True, gate_first=True).eval()
    with pytest.raises(sn.SortedNetError, match=r"2 heads are not the first 2 whole heads of the full module"):
        sn.wrap(m, sn.Heads("h", [2, 4], attn="", qkv=["q", "k", "v"], o="o"))
    sn.wrap(_SelfAttention(gate_first=True).eval(), sn.Heads("h", [2, 4], attn="", qkv=["q", "k", "v"], o="o"))


class _FusedGateUp(nn.Module):
    def __init__(self, interleaved):
        super().__init__()
        self.gu, self.down, self.interleaved = nn.Linear(16, 64), nn.Linear(32, 16), interleaved

    def forward(self, x):
        h = self.gu(x)
        g, u = (h[..., ::2], h[..., 1::2]) if self.interleaved else h.chunk(2, -1)
        return F.linear(F.silu(g) * u, self.down.weight, self.down.bias)


class _GateUpStack(nn.Module):
    """Two fused gate|up MLPs, the second interleaved (``h[..., ::2]``: not the two chunks Width(chunks=2) cuts);
    its down projection read as ``F.linear(z, down.weight)`` (no input to capture)."""

    def __init__(self, ret):
        super().__init__()
        self.ret, self.m, self.head = ret, nn.ModuleList([_FusedGateUp(False), _FusedGateUp(True)]), nn.Linear(16, 3)

    def forward(self, x):
        hs = []
        for m in self.m:
            x = x + m(x)
            hs.append(x)
        out = self.head(x)
        return {"logits": out, "hidden": (out, *hs),
                "aux": (out, sum(m.down.weight.square().sum() for m in self.m))}[self.ret]


@pytest.mark.parametrize("ret", ["logits", "hidden", "aux"])
def test_an_output_computed_from_the_masked_weights_vouches_for_nothing(ret):
    """An L2 term of the readers' weights equals the masked reference at every layout, and the first MLP's hidden
    state is right: as the closest output either accepted a chunk layout the second MLP does not use."""
    torch.manual_seed(0)
    with pytest.raises(sn.SortedNetError, match=r"width 'f' at 16 is not the first 16 whole units"):
        sn.wrap(_GateUpStack(ret).eval(), sn.Width("f", [16, 32], out=["m.*.gu"], inp=["m.*.down"], chunks=2),
                example=torch.randn(4, 16))


class _GatedByTheMap(nn.Module):
    """Two attention layers returning ``(out, map averaged over the heads in force)``, the map read by the forward
    (a rollout added to the logits); with ``scale`` the logits also read a head count from the full model outside
    the attention (``4 / num_heads``: wrong below 4 heads). ``ret`` picks the attention's return container."""

    def __init__(self, scale, ret):
        super().__init__()
        self.emb, self.head, self.scale, self.ret = nn.Linear(8, 32), nn.Linear(32, 5), scale, ret
        self.attn = nn.ModuleList(_MapAttention(ret) for _ in range(2))

    def forward(self, x):
        h, roll = self.emb(x), None
        for a in self.attn:
            out = a(h)
            y, w = (out["out"], out["map"]) if self.ret == "dict" else (out[0], out[1][0]) if self.ret == "nested" \
                else (out[0], out[1])
            h = h + y
            roll = w if roll is None else w @ roll
        logits = self.head(h) * (4 / self.attn[0].num_heads if self.scale else 1.0)
        return logits + roll[..., :1], h


class _MapAttention(nn.Module):
    def __init__(self, ret):
        super().__init__()
        self.num_heads, self.head_dim, self.ret = 4, 8, ret
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        w = (q @ k.transpose(-1, -2) / self.head_dim ** 0.5).softmax(-1)
        out = self.o((w @ v).transpose(1, 2).reshape(b, t, -1))
        w = w.mean(1)
        return {"tuple": lambda: (out, w), "namedtuple": lambda: _Pair(out, w), "dict": lambda: {"out": out, "map": w},
                "nested": lambda: (out, (w, None))}[self.ret]()


_Pair = collections.namedtuple("_Pair", "out map")


@pytest.mark.parametrize("ret", ["tuple", "namedtuple", "dict", "nested"])
@pytest.mark.parametrize("scale", [False, True])
def test_outputs_reading_the_returned_maps_are_measured_with_the_sub_models_maps(ret, scale):
    """Leaving out the outputs fed by the maps the attentions return let a head count read outside the attention
    pass beside a clean hidden state; a map returned in a namedtuple, a dict or a nested tuple was not recognised
    and a correct model refused. The reference reads the sub-model's own maps: a correct model passes whatever the
    container, and a wrong scale on the map-fed output is refused."""
    torch.manual_seed(0)
    dim, x = sn.Heads("h", [2, 4], attn="attn.*"), torch.randn(2, 6, 8)
    if scale:
        with pytest.raises(sn.SortedNetError, match=r"heads 'h' at 2 is not the first 2 whole heads"):
            sn.wrap(_GatedByTheMap(scale, ret).eval(), dim, example=x)
        return
    sn.wrap(_GatedByTheMap(scale, ret).eval(), dim, example=x).unwrap()


class _ScaledOut(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.weight, self.scale = nn.Parameter(torch.randn(o, i) / i ** 0.5), nn.Parameter(torch.ones(o))
        self.register_buffer("shift", torch.zeros(o))

    def forward(self, x):
        return F.linear(x, self.weight) * self.scale + self.shift


@pytest.mark.parametrize("static", ["scale", "shift"])
def test_a_slicer_declaring_a_tensor_static_is_refused_before_anything_changes(static):
    """``static`` values are computed once per sub-model and kept: a parameter (or buffer) declared there kept
    the tensor of then, so after ``load_state_dict(assign=True)`` the sub-model read the old values (1.0 for 3.0)
    and the new parameter got no gradient, in silence. Refused at wrap, naming the slicer and tensor."""
    class Slicer(sn.Slicer):
        roles, attrs = ("out", "inp"), ("weight", "scale", "shift")
        views = {"weight": ((0, "out"), (1, "inp")), **{n: ((0, "out"),) for n in ("scale", "shift") if n != static}}

        def full(self, m, role):
            return m._parameters["weight"].shape[0 if role == "out" else 1]

        def value(self, m, name):
            return self.take(m, name, [(0, "out")])

    Slicer.static = (static,)
    sn.slicer(_ScaledOut)(Slicer)
    torch.manual_seed(0)
    m = nn.Sequential(_ScaledOut(8, 32), nn.ReLU(), nn.Linear(32, 3))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=rf"'0' \(_ScaledOut\): Slicer declares the tensor '{static}' static"):
        sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"))
    assert_unchanged(m, before)


class _Doubled(nn.Module):
    """A shortcut that doubles the channels by ``repeat``, or a feature map padded with more channels (of zeros,
    ones, or the features' own edge values) before the layer that reads them."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        if self.how == "repeat":
            y = self.conv(x) + x.repeat(1, 2, 1, 1)
        elif self.how == "repeat_keyword":
            y = self.conv(x) + x.repeat(repeats=(1, 2, 1, 1))
        elif self.how == "tile":
            y = self.conv(x) + torch.tile(x, (2, 1, 1))
        elif self.how in ("front_ones", "front_circular"):  # (the channels last, of (B, H * W, C))
            b, c, h, w = x.shape
            t = x.flatten(2).transpose(1, 2)
            t = F.pad(t, (8, 0), value=1.0) if self.how == "front_ones" else F.pad(t, (8, 0), mode="circular")
            y = t.transpose(1, 2).reshape(b, -1, h, w)
        elif self.how == "replicate":  # (the channels moved last, of (B, H * W, C): replicate pads the last axis)
            b, c, h, w = x.shape
            y = F.pad(x.flatten(2).transpose(1, 2), (0, 8), mode="replicate").transpose(1, 2).reshape(b, -1, h, w)
        else:
            y = F.pad(x, (0, 0, 0, 0, 0, 8), value=1.0 if self.how == "ones" else 0.0)
        return self.head(F.relu(y)).mean((2, 3))


@pytest.mark.parametrize("how", ["repeat", "repeat_keyword", "tile", "ones", "replicate", "front_circular", "zeros",
                                 "front_ones"])
def test_a_repeat_or_a_padding_of_other_values_along_the_sliced_axis_is_refused(how):
    """``x.repeat(1, 2, 1, 1)`` along the channels (a channel-doubling shortcut, also as ``torch.tile`` or
    ``repeat(repeats=)``) and a channel padding of other values than zeros after the units (or wrapped units
    before them) put other values next to a sub-model's first units than the full model has there (0.12 and 0.30
    off the masked full model), with shapes that fit: ``check`` passed them in silence (the trace named them,
    check read neither reason; tile only warned). Refused, naming the op; a zero padding, or a constant before
    the units, is the masked full model: accepted."""
    m = _Doubled(how).eval()
    x = torch.randn(2, 3, 8, 8)
    if how in ("repeat", "repeat_keyword", "tile"):
        dims = (sn.Width("c", [4, 8], out="stem", inp="conv"), sn.Width("c2", [8, 16], out="conv", inp="head"))
        subs = [{"c": 4, "c2": 8}, {"c": 8, "c2": 16}]
    else:
        dims = (sn.Width("c", [4, 8], out="stem"), sn.Width("c2", [12, 16], inp="head"))
        subs = [{"c": 4, "c2": 12}, {"c": 8, "c2": 16}]
    before = snapshot(m)
    if how in ("zeros", "front_ones"):
        nest = sn.wrap(m, *dims, example=x, submodels=subs)
        with torch.no_grad():
            with nest.use(nest.smallest):
                live = m(x)
            nest.unwrap()
            masked = copy.deepcopy(m)
            masked.stem.weight[4:] = 0
            masked.stem.bias[4:] = 0
            masked.head.weight[:, 12:] = 0
            torch.testing.assert_close(live, masked(x))
        return
    with pytest.raises(sn.SortedNetError, match=r"repeat|tile" if how in ("repeat", "repeat_keyword", "tile")
                       else r"pad.* other values than zeros"):
        sn.wrap(m, *dims, example=x, submodels=subs)
    assert_unchanged(m, before)


_PADDED = {
    "constant_pad_nd_ones": (lambda h: torch.constant_pad_nd(h, (0, 2), 1.0), lambda c: c + 2),
    "crop_then_ones": (lambda h: F.pad(F.pad(h, (0, -2)), (0, 4), value=1.0), lambda c: c + 2),
    "zeros_then_flip": (lambda h: F.pad(h, (0, 2)).flip(1), lambda c: c + 2),
    "front_ones_then_flip": (lambda h: F.pad(h, (2, 0), value=1.0).flip(1), lambda c: c + 2),
    "zeros_then_repeat": (lambda h: F.pad(h, (0, 2)).repeat(1, 2), lambda c: 2 * (c + 2)),
    # (a negative padding crops: before the units it shifts them, after them a later zero padding stands where
    # the full model keeps units)
    "crop_front": (lambda h: F.pad(h, (-1, 1)), lambda c: c),
    "crop_then_zeros": (lambda h: F.pad(F.pad(h, (0, -2)), (0, 2)), lambda c: c),
    "constant_pad_nd_crop_then_zeros": (lambda h: torch.constant_pad_nd(torch.constant_pad_nd(h, (0, -2)), (0, 2)),
                                        lambda c: c),
    "zero_pad_module_crop_front": (nn.ZeroPad1d((-1, 1)), lambda c: c),
}


class _PerUnitOperand(nn.Module):
    """Features scaled by a per-unit parameter (or offset by an embedding) the forward reorders itself."""

    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.how, self.fc1, self.fc2 = how, nn.Linear(6, 8), nn.Linear(8, 3)
        self.gamma, self.emb = nn.Parameter(torch.randn(8)), nn.Embedding(8, 1)

    def forward(self, x):
        h = self.fc1(x)
        n = h.shape[-1]
        if self.how == "flip":
            return self.fc2(h * self.gamma[:n].flip(0))
        if self.how in ("roll", "roll_by_its_size"):  # (a roll by the axis's size keeps every unit in place)
            return self.fc2(h * torch.roll(self.gamma[:n], 1 if self.how == "roll" else n, 0))
        if self.how == "permuted":
            return self.fc2(h * self.gamma[:n][torch.tensor(list(range(n))[::-1])])
        return self.fc2(h + self.emb(torch.arange(n).flip(0))[:, 0])


@pytest.mark.parametrize("how", ["flip", "roll", "permuted", "embedding_of_flipped_positions"])
def test_a_per_unit_operand_reordered_before_it_meets_the_features_is_refused(how):
    """A per-unit scale kept as a raw parameter (or an embedding of unit positions) reordered by the forward
    before it multiplies the features: the reordered output was a fresh axis in the wiring trace, so the
    features met it with no word, and sub-model h=4 scaled its units by other units' factors (0.5 to 0.7 off
    the masked full model, the export the same). The reordered output carries the reason; refused, nothing
    changed."""
    m, x = _PerUnitOperand(how), torch.randn(5, 6)
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"are moved between positions"):
        sn.wrap(m, sn.Width("h", [4, 8], out="fc1", inp="fc2"), example=x)
    assert_unchanged(m, before)


class _PadMeetsReorder(nn.Module):
    """Width features zero-padded to a fixed 16 and added to a fixed-size stream the forward reordered."""

    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.how, self.fc1, self.fc2, self.fc3, self.head = how, nn.Linear(6, 12), nn.Linear(12, 3), \
            nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        g = self.fc3(x)
        r = {"flip": lambda: g.flip(-1), "roll": lambda: torch.roll(g, 3, -1),
             "index_select": lambda: g.index_select(-1, torch.arange(16).flip(0)),
             "tensor_index": lambda: g[:, torch.arange(16).flip(0)]}[self.how]()
        return self.fc2(h) + self.head(F.pad(h, (0, 16 - h.shape[-1])) + r)


@pytest.mark.parametrize("how", ["flip", "roll", "index_select", "tensor_index"])
def test_padded_features_meeting_a_reordered_stream_of_fixed_size_are_accepted(how):
    """A zero padding of the features to a fixed size added to a stream the forward reordered: the features'
    units stay in place (the sub-model equals the masked full model), but the reorder's reason reached the
    padding's source and the Width was refused. A reorder's output moves what meets it, not the source of a
    padding it meets; a roll by 0 is the identity."""
    x = torch.randn(5, 6)
    m = _PadMeetsReorder(how).eval()
    masked = copy.deepcopy(m)
    with torch.no_grad():
        masked.fc1.weight[4:] = 0
        masked.fc1.bias[4:] = 0
    nest = sn.wrap(m, sn.Width("w", [4, 8, 12], out="fc1", inp="fc2"), example=x)
    with torch.no_grad(), nest.use("w=4"):
        torch.testing.assert_close(m(x), masked(x))
    sn.wrap(_PerUnitOperand("roll_by_its_size"), sn.Width("h", [4, 8], out="fc1", inp="fc2"), example=x)


class _RolledBy(nn.Module):
    """``roll(shifts, dims)`` of the hidden features of shape (batch, tokens, hidden)."""

    def __init__(self, shifts, dims):
        super().__init__()
        torch.manual_seed(0)
        self.shifts, self.dims = shifts, dims
        self.a, self.b = nn.Linear(4, 24), nn.Linear(24, 3)

    def forward(self, x):
        return self.b(torch.roll(torch.relu(self.a(x)), self.shifts, self.dims))


def _masked_equal(m: nn.Module, nest, size: int, x: torch.Tensor) -> bool:
    masked = copy.deepcopy(m).eval()
    with torch.no_grad():
        masked.a.weight[size:] = 0
        masked.a.bias[size:] = 0
        want = masked(x)  # (outside use: a copy of a wrapped model follows the nest's sub-models)
    with torch.no_grad(), nest.use({"h": size}):
        return torch.allclose(m.eval()(x), want, atol=1e-6)


@pytest.mark.parametrize("shift,sizes", [(24, [12, 16, 24]), (48, [18, 24]), (-24, [10, 24])])
def test_a_roll_by_a_multiple_of_the_full_size_is_refused_at_sizes_that_do_not_divide_it(shift, sizes):
    """A roll by a multiple of the traced (full) size is the identity there, and was taken for one at every
    size; at a size that does not divide the shift it moves the units (roll(24) of 16 features shifts them by
    8): check passed a sub-model that is not the full model's first units."""
    x = torch.randn(2, 5, 4)
    m = _RolledBy(shift, -1)
    nest = sn.wrap(m, sn.Width("h", sizes, out="a", inp="b"))
    assert not _masked_equal(m, nest, next(n for n in sizes if shift % n), x)  # (the sub-model really differs)
    bad = [n for n in sizes if shift % n]
    with pytest.raises(sn.SortedNetError, match=rf"rolled by {abs(shift)} .*size\(s\) {re.escape(str(bad))}"):
        nest.check(x)
    with warnings.catch_warnings(record=True) as said:  # (no size but the full one kept: discover names the group)
        warnings.simplefilter("always")
        found = sn.discover(_RolledBy(shift, -1), x, ratios=[n / 24 for n in sizes], heads=False)
    assert all(shift % n == 0 for d in found for n in d.sizes)  # (discovery proposes only the sizes it keeps)
    if not found:
        assert any(f"['a'] (24 features): rolled by {abs(shift)}" in str(w.message) for w in said), said


@pytest.mark.parametrize("shifts,dims,sizes", [(24, -1, [6, 8, 12, 24]), ((1, 0), (1, 2), [8, 16, 24]),
                                               ((0, 2), (2, 1), [12, 24]), ((48, 3), (-1, 1), [12, 24])])
def test_a_roll_keeping_the_features_in_place_at_every_size_is_accepted(shifts, dims, sizes):
    """A roll of the features by a multiple of every size, or by 0 beside a shift of the tokens, keeps every
    feature in place at every size; a shift of 0 was judged moved when another axis was shifted."""
    x = torch.randn(2, 5, 4)
    m = _RolledBy(shifts, dims)
    nest = sn.wrap(m, sn.Width("h", sizes, out="a", inp="b"), example=x)
    for n in sizes:
        assert _masked_equal(m, nest, n, x)


class _Padded(nn.Module):
    def __init__(self, op, width):
        super().__init__()
        torch.manual_seed(0)
        self.op, self.a, self.b = op, nn.Linear(4, 8), nn.Linear(width, 3)

    def forward(self, x):
        return self.b(self.op(torch.relu(self.a(x))))


class _PaddedAndRepeated(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(16, 3), nn.Linear(10, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(F.pad(h, (0, 2))) + self.b(h.repeat(1, 2))


@pytest.mark.parametrize("how", [*_PADDED, "pad_beside_a_repeat"])
def test_an_op_moving_units_after_a_padding_of_the_sliced_axis_is_refused(how):
    """A padded axis is a new one in the wiring trace: a flip or a repeat after a padding (and ``constant_pad_nd``,
    a padding of ones after a crop) moved a sub-model's units with no word from ``check`` (0.05 to 0.63 off the
    masked full model); and a zero padding fixing the axis first hid a repeat of it beside (the first reason
    won). A negative padding (a crop: ``F.pad(h, (-1, 1))`` shifts the units, a crop of the end then a zero
    padding puts zeros where the full model keeps units, 0.11 to 0.29 off) was read as a zero padding. Refused,
    naming the op that moves them."""
    x = torch.randn(2, 4)
    if how == "pad_beside_a_repeat":
        m = _PaddedAndRepeated().eval()
        dims = (sn.Width("c", [4, 8], out="a"), sn.Width("c2", [8, 16], inp="b"), sn.Width("c3", [6, 10], inp="c"))
        subs = [{"c": 4, "c2": 8, "c3": 6}, {"c": 8, "c2": 16, "c3": 10}]
    else:
        op, width = _PADDED[how]
        m = _Padded(op, width(8)).eval()
        dims = (sn.Width("c", [4, 8], out="a"), sn.Width("c2", [width(4), width(8)], inp="b"))
        subs = [{"c": 4, "c2": width(4)}, {"c": 8, "c2": width(8)}]
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"are moved between positions"):
        sn.wrap(m, *dims, example=x, submodels=subs)
    assert_unchanged(m, before)


class _MaskedScaledAttention(nn.Module):
    """A hand-written attention whose forward needs a mask (the self-check of one tensor cannot run it), with the
    scale right (``head_dim ** -0.5``) or computed from the full width over the active head count."""

    def __init__(self, wrong_scale: bool):
        super().__init__()
        torch.manual_seed(0)
        self.num_heads, self.head_dim, self.embed_dim, self.wrong = 4, 16, 64, wrong_scale
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(64, 64) for _ in range(3))
        self.o_proj = nn.Linear(64, 64)

    def forward(self, x, attention_mask):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        scale = (self.embed_dim / self.num_heads) ** -0.5 if self.wrong else self.head_dim ** -0.5
        a = (q @ k.transpose(-1, -2) * scale + attention_mask).softmax(-1)
        return self.o_proj((a @ v).transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_whole_heads_of_a_half_precision_attention_that_needs_a_mask_are_measured_in_float32(dtype):
    """In half precision whole heads are measured to 1e-1 (rounding): a scale from the full width over the active
    head count, 8% off in float32 (refused there), passed in bfloat16 / float16 where the forward needs a second
    argument (the float32 self-check runs attention of one tensor only). Measured in float32 too: refused; the
    right scale is accepted."""
    x = torch.randn(2, 12, 64).to(dtype)
    mask = torch.triu(torch.full((12, 12), float("-inf")), 1).to(dtype)
    for wrong in (True, False):
        m = _MaskedScaledAttention(wrong).to(dtype).eval()
        before = snapshot(m)
        if wrong:
            with pytest.raises(sn.SortedNetError, match=r"not the first 2 whole heads"):
                sn.wrap(m, sn.Heads("heads", [2, 4], attn=""), example=(x, mask))
            assert_unchanged(m, before)
        else:
            sn.wrap(m, sn.Heads("heads", [2, 4], attn=""), example=(x, mask))


class _SkipBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, skip=None):
        h = x + torch.tanh(self.fc(x))
        return h if skip is None else h + skip


class _LongSkips(nn.Module):
    """U-Net long skips in one block list, its halves split by the list's length (modded-nanogpt / U-ViT style):
    at half the depth, block 2 is a decoder block (it takes a skip), in the full model an encoder block."""

    def __init__(self, as_argument):
        super().__init__()
        self.as_argument = as_argument
        self.blocks = nn.ModuleList(_SkipBlock() for _ in range(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        n, skips = len(self.blocks), []
        for i, b in enumerate(self.blocks):
            if i < n // 2:
                x = b(x)
                skips.append(x)
            else:
                x = b(x, skips.pop()) if self.as_argument else b(x + skips.pop())
        return self.head(x)


@pytest.mark.parametrize("as_argument", [True, False])
def test_a_block_fed_another_number_of_tensors_at_a_smaller_depth_is_a_pairing_warning(as_argument):
    """The pairing check stopped at the first block that recorded another number of values than in the full
    model: a skip passed as a second argument at the smaller depth only (block 2 turns from an encoder into a
    decoder block, its output 4 off) was not said, while the same skip added before the call was."""
    from sortednet.check import LayerPairingWarning

    torch.manual_seed(0)
    with pytest.warns(LayerPairingWarning, match="depth 'L' at 4: block 2 of 'blocks' reads or gives other values"):
        sn.wrap(_LongSkips(as_argument), sn.Depth("L", [4, 8], layers="blocks"), example=torch.randn(3, 8))


class _KeepBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, keep=None):  # the last block computes only the positions kept
        h = x + torch.tanh(self.fc(x))
        return h if keep is None else h[:, keep]


class _ToldLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_KeepBlock() for _ in range(4))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        keep = torch.tensor([x.shape[1] - 1])
        for i, b in enumerate(self.blocks):
            x = b(x, keep=keep if i == len(self.blocks) - 1 else None)
        return self.head(x)


def test_a_last_block_handed_a_tensor_of_its_own_is_no_pairing_warning():
    """A block told it is the last through a tensor argument follows the depth, as ``self.blocks[-1]`` does: the
    count of tensors it reads is not compared (it was, for a moment, a false LayerPairingWarning)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sn.wrap(_ToldLast(), sn.Depth("d", [1, 2, 4], layers="blocks"), example=torch.randn(2, 5, 16))


class _KindBlock(nn.Module):
    def __init__(self, d, local):
        super().__init__()
        self.local = local
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, global_mask, local_mask):  # a local layer reads the local mask, a global one the global
        q, k, v = self.qkv(x).chunk(3, -1)
        mask = local_mask if self.local else global_mask
        return x + self.o(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class _MasksByKind(nn.Module):
    """Each mask is built only when some layer of its kind runs: at depth 2 (two local layers) the global mask is
    None, so the blocks get one tensor fewer than in the full model, and compute the same."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Linear(4, d)
        self.blocks = nn.ModuleList(_KindBlock(d, local) for local in (True, True, False, False))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        global_mask = causal if any(not b.local for b in self.blocks) else None
        local_mask = causal & torch.ones(t, t, dtype=torch.bool).triu(-2) if any(b.local for b in self.blocks) \
            else None
        h = self.emb(x)
        for b in self.blocks:
            h = b(h, global_mask, local_mask)
        return self.head(h)


def test_a_block_handed_none_for_a_tensor_it_does_not_read_is_judged_by_its_output():
    """What a block reads and gives are compared apart: a block that reads another number of tensors (a mask it
    never reads is None at the smaller depth) but gives the same output is no pairing problem (it was, for a
    moment, a false LayerPairingWarning); one that gives another output is (the U-Net case above)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sn.wrap(_MasksByKind(), sn.Depth("depth", [2, 4], layers="blocks"), example=torch.randn(2, 6, 4))


class _ReadsWhole(nn.Module):
    """Reads its sliced layer's weight whole (``_parameters``: the full tensor live, the cut one exported): a
    sub-model's output differs from its export by a factor; ``out`` shapes the output."""

    def __init__(self, scale: float, out: str = "float"):
        super().__init__()
        self.a, self.b, self.scale, self.out = nn.Linear(8, 16), nn.Linear(16, 10), scale, out

    def forward(self, x):
        n = self.a._parameters["weight"].shape[0]
        logits = self.scale * self.b(torch.relu(self.a(x))) * n
        if self.out == "argmax":  # (live and exported, the classes' order differs)
            return (logits + (n - 10) * torch.arange(10.0)).argmax(-1)
        return torch.complex(logits, logits) if self.out == "complex" else logits


class _SmallMLP(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.a, self.b, self.scale = nn.Linear(8, 16), nn.Linear(16, 10), scale

    def forward(self, x):
        return self.scale * self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("scale", [1e-7, 1e-4, 1.0, 1e3])
def test_an_export_unlike_its_live_model_is_refused_at_any_output_scale(scale):
    torch.manual_seed(0)
    nest = sn.wrap(_ReadsWhole(scale), sn.Width("h", [4, 16], out="a", inp="b"))
    with pytest.raises(sn.SortedNetError, match="differs from its live output"):
        nest.check(torch.randn(5, 8))


@pytest.mark.parametrize("out", ["argmax", "complex"])
def test_an_integer_or_complex_output_does_not_hide_an_export_unlike_its_live_model(out):
    torch.manual_seed(0)
    nest = sn.wrap(_ReadsWhole(1e-5, out), sn.Width("h", [4, 16], out="a", inp="b"))
    match = "no finite floating-point value" if out == "argmax" else "differs from its live output"
    with pytest.raises(sn.SortedNetError, match=match):
        nest.check(torch.randn(5, 8))


def test_an_example_of_no_entries_is_refused_not_vouched_for():
    torch.manual_seed(0)
    model = _ReadsWhole(1.0)
    nest = sn.wrap(model, sn.Width("h", [4, 16], out="a", inp="b"))
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=r"float32 \(0, 10\)\) holds no finite floating-point value"):
        nest.check(torch.randn(0, 8))
    assert_unchanged(model, before)


@pytest.mark.parametrize("scale", [1e-9, 1e-5, 1.0, 1e4])
@pytest.mark.parametrize("complex_out", [False, True])
def test_a_right_nest_passes_whatever_its_output_scale(scale, complex_out):
    torch.manual_seed(0)
    model = _SmallMLP(scale)
    if complex_out:
        model = _Complex(model)
    nest = sn.wrap(model, sn.Width("h", [2, 4, 8, 16], out="a" if not complex_out else "inner.a",
                                   inp="b" if not complex_out else "inner.b"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nest.check(torch.randn(7, 8))


class _Complex(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        return torch.complex(y, -y)


class _HeadGate(nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.g = nn.Parameter(torch.rand(heads) + 0.5)

    def forward(self, y):
        return y * self.g[None, :, None, None]


class _GatedAttention(nn.Module):
    def __init__(self, dim=48, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.gate = _HeadGate(heads)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = self.gate(F.scaled_dot_product_attention(q, k, v))
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("dim", [32, 48])
def test_a_per_head_tensor_of_a_child_heads_leave_whole_is_named_with_per_head(dim):
    model = _GatedAttention(dim)
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=r"child 'gate' holds \['gate.g \(4,\)'\].*per_head='gate'"):
        sn.wrap(model, sn.Heads("heads", [2, 4], attn=""))
    assert_unchanged(model, before)


class _DeepestFirstUNet(nn.Module):
    """A U-Net whose decoder list is built in decoding order (deepest level first): its first blocks pair with
    the encoder's last, which a shallower Depth over both lists cuts."""

    def __init__(self):
        super().__init__()
        ch, cin = [4, 8, 8], [4, 4, 8]
        self.inp = nn.Conv2d(1, 4, 3, 1, 1)
        self.downs = nn.ModuleList(nn.Sequential(nn.Conv2d(i, o, 3, 1, 1), nn.ReLU()) for i, o in zip(cin, ch))
        self.ups = nn.ModuleList(nn.Sequential(nn.Conv2d(2 * o, i, 3, 1, 1), nn.ReLU())
                                 for i, o in reversed(list(zip(cin, ch))))
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        x, skips = self.inp(x), []
        for d in self.downs:
            x = d(x)
            skips.append(x)
            x = F.avg_pool2d(x, 2)
        for u, skip in zip(self.ups, reversed(skips)):
            x = u(torch.cat([F.interpolate(x, scale_factor=2), skip], 1))
        return self.out(x)


@pytest.mark.parametrize("layers", [["downs", "ups"], ["ups", "downs"]])
def test_a_decoder_list_stored_deepest_first_is_named_when_check_refuses_it(layers):
    torch.manual_seed(0)
    model = _DeepestFirstUNet()
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match="stored deepest level first.*walk it reversed"):
        sn.wrap(model, sn.Depth("depth", [2, 3], layers=layers), example=torch.randn(2, 1, 16, 16))
    assert_unchanged(model, before)


class _ResizedWithNorms(nn.Module):
    """Blocks that re-size the stream (16 to 32 at block 1), walked with a parallel list of norms: no decoder."""

    def __init__(self):
        super().__init__()
        dims = [16, 16, 32, 32, 32]
        self.blocks = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(4))
        self.norms = nn.ModuleList(nn.LayerNorm(dims[i + 1]) for i in range(4))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        for b, n in zip(self.blocks, self.norms):
            x = n(b(x))
        return self.head(x)


def test_a_resized_stream_of_the_first_list_gets_no_decoder_order_hint():
    with pytest.raises(sn.SortedNetError, match="re-size the stream") as info:
        sn.wrap(_ResizedWithNorms(), sn.Depth("depth", [1, 2, 4], layers=["blocks", "norms"]),
                example=torch.randn(2, 16))
    assert "deepest level first" not in str(info.value)


class _NormsInBoth(nn.Module):
    """Per-block norms held in the blocks and in a parallel list, both cut by one Depth."""

    def __init__(self):
        super().__init__()
        norms = [nn.LayerNorm(8) for _ in range(4)]
        self.layers = nn.ModuleList(nn.ModuleList([norms[i], nn.Linear(8, 8)]) for i in range(4))
        self.norms = nn.ModuleList(norms)

    def forward(self, x):
        for (n, f), n2 in zip(self.layers, self.norms):
            x = x + f(n(x)) + 0.5 * n2(x)
        return x


def test_blocks_also_held_by_another_list_the_same_depth_cuts_are_not_held_outside():
    from sortednet.check import BlockHeldOutsideWarning

    torch.manual_seed(0)
    m = _NormsInBoth()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BlockHeldOutsideWarning)
        nest = sn.wrap(m, sn.Depth("depth", [1, 2, 4], layers=["layers", "norms"]))
    x = torch.randn(2, 8)
    for depth in (1, 2, 4):
        exported = nest.export(f"depth={depth}")
        assert sum(p.numel() for p in exported.parameters()) == nest.cost(f"depth={depth}") == depth * (16 + 72)
        with torch.no_grad(), nest.use(f"depth={depth}"):
            torch.testing.assert_close(m(x), exported(x))


class _StatBeside(nn.Module):
    """Logits and, returned beside them for logging, the mean of the normalised features (rounding noise around
    zero: ~1e-9 in float32, ~1e-17 in float64), after a LoRA-able MLP or a hand-written attention."""

    def __init__(self, attention: bool):
        super().__init__()
        self.attention = attention
        if attention:
            self.attn = _FourHeads()
        else:
            self.a, self.b = nn.Linear(64, 128), nn.Linear(128, 64)
        self.norm, self.head = nn.LayerNorm(64), nn.Linear(64, 10)

    def forward(self, x):
        h = self.norm(x + self.attn(x) if self.attention else self.b(torch.relu(self.a(x))))
        return self.head(h), h.mean()


class _FourHeads(nn.Module):
    def __init__(self, dim=64, heads=8):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("case", ["lora_float32", "heads_float64", "heads_float32"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_output_of_rounding_noise_beside_the_logits_is_no_refusal(case, seed):
    """Each output was compared against its own scale alone: an output that is rounding noise around zero (the
    mean of normalised features, returned for logging) differs between two right computations by 100% of itself,
    and check refused a right LoRA export ("differs from its live output by 1") or a right head layout ("not the
    first whole heads"). An output below 1e-4 of the largest output's scale is measured against that floor."""
    torch.manual_seed(seed)
    attention = case != "lora_float32"
    model = _StatBeside(attention).to(torch.float64 if case == "heads_float64" else torch.float32)
    if attention:
        nest = sn.wrap(model, sn.Heads("h", [2, 4, 8], attn="attn"))
        x = torch.randn(2, 5, 64, dtype=next(model.parameters()).dtype)
    else:
        nest = sn.wrap(model, sn.Rank("r", [4, 16, 64], targets=["a", "b"], mode="lora", alpha=8))
        with torch.no_grad():  # (trained adapters)
            model.a.lora_B.normal_(0, 0.05)
            model.b.lora_B.normal_(0, 0.05)
        x = torch.randn(16, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nest.check(x)


class _Biased(nn.Module):
    """A rare-event detector: logits near -8, returned as probabilities (sigmoid or softmax) or as they are."""

    def __init__(self, final: str):
        super().__init__()
        self.a, self.b, self.final = nn.Linear(64, 128), nn.Linear(128, 32), final
        with torch.no_grad():
            self.b.bias.fill_(-8.0)

    def forward(self, x):
        z = self.b(torch.tanh(self.a(x)))
        return torch.sigmoid(z) if self.final == "sigmoid" else z.softmax(-1) if self.final == "softmax" else z


@pytest.mark.parametrize("final", ["logits", "sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_probabilities_of_a_right_lora_export_pass(final, dtype):
    """In half precision an output past an exp differs from one rounding of its logits to another by about the
    logits' own rounding (|z| / 256 in bf16: 3% at |z| = 8): check held the smallest sub-model's export to 1%,
    relative to the probabilities' own scale, and refused a right bf16 LoRA merge. Half precision's tolerance
    holds for every export; a wrong one (next test) is still refused."""
    torch.manual_seed(0)
    model = _Biased(final).to(dtype)
    nest = sn.wrap(model, sn.Rank("r", [2, 8, 32], targets=["a", "b"], mode="lora", alpha=8))
    with torch.no_grad():
        model.a.lora_B.normal_(0, 0.05)
        model.b.lora_B.normal_(0, 0.05)
    nest.check(torch.randn(16, 64, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1e-4, 1.0])
def test_a_half_precision_export_unlike_its_live_model_is_refused(dtype, scale):
    torch.manual_seed(0)
    nest = sn.wrap(_ReadsWhole(scale).to(dtype), sn.Width("h", [4, 16], out="a", inp="b"))
    with pytest.raises(sn.SortedNetError, match="differs from its live output"):
        nest.check(torch.randn(5, 8, dtype=dtype))


class _WithLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x, y=None):
        logits = self.b(torch.relu(self.a(x)))
        return logits if y is None else (logits, F.cross_entropy(logits, y))


@pytest.mark.parametrize("example", ["empty_with_labels", "nan_input"])
def test_an_example_of_no_finite_output_is_refused_not_vouched_for(example):
    """An empty batch with labels gives logits of no entries and a NaN loss; an example holding NaN gives NaN
    everywhere: no output has a finite value to compare, and check passed a nest whose export is wrong."""
    model = _WithLoss()
    nest = sn.wrap(model, sn.Width("w", [8, 32], out="a", inp="b"))
    x = ((torch.randn(0, 8), torch.zeros(0, dtype=torch.long)) if example == "empty_with_labels"
         else torch.full((3, 8), float("nan")))
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match="holds no finite floating-point value"):
        nest.check(x)
    assert_unchanged(model, before)
    nest.check(torch.randn(3, 8))  # (a right nest: an example with entries passes)


class _ScalingLinear(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.scale = nn.Parameter(torch.ones(n_out))

    def forward(self, x):
        return F.linear(x, self.weight) * self.scale


class _ScalingNet(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.a, self.b = cls(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _scaling_type(name: str, factor: float) -> type:
    """A _ScalingLinear type of its own (slicers register per type) whose slicer's export scales ``scale`` by
    ``factor`` (1.0: a right export; else a mistake of the user's)."""

    class Buggy(sn.Slicer):
        roles, attrs = ("out", "inp"), ("weight", "scale")

        def full(self, m, role):
            return m._parameters["weight"].shape[0 if role == "out" else 1]

        def value(self, m, name):
            if name == "weight":
                return self.take(m, "weight", [(0, "out"), (1, "inp")])
            return self.take(m, "scale", [(0, "out")])

        def export(self, live, copy_):
            c = super().export(live, copy_)
            with torch.no_grad():
                c.scale.mul_(factor)
            return c

    cls = type(name, (_ScalingLinear,), {})
    sn.slicer(cls)(Buggy)
    return cls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("factor", [1.0, 1.03, 1.08])
def test_a_half_precision_export_a_few_percent_off_is_refused_by_its_float32_run(dtype, factor):
    """Half precision's tolerance (its rounding hides a few percent) passed an export of a slicer of one's own
    that scales by 1.03 to 1.08: the export and the live model run again with their tensors in float32, where an
    export of the live values computes what they do; a right one passes."""

    cls = _scaling_type(f"_ScalingLinear{str(dtype)[6:]}{factor}", factor)
    torch.manual_seed(0)
    model = _ScalingNet(cls)
    nest = sn.wrap(model.to(dtype), sn.Width("h", [8, 16, 32], out="a", inp="b"))
    x = torch.randn(4, 8, dtype=dtype)
    if factor == 1.0:
        nest.check(x)
    else:
        with pytest.raises(sn.SortedNetError, match=r"differs from its live output by .* both run in float32.*"
                                                    r"slicers of your own.*'a' \(Buggy\)"):
            nest.check(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_deep_half_precision_lora_export_passes_its_float32_run(dtype):
    """A merge rounds each weight to the half dtype once: eight merged layers stay within the float32 run's
    tolerance for merges."""
    torch.manual_seed(0)
    layers = [nn.Linear(32, 32) for _ in range(8)]
    model = nn.Sequential(*[m for lin in layers for m in (lin, nn.Tanh())], nn.Linear(32, 10)).to(dtype)
    targets = [str(2 * i) for i in range(8)]
    nest = sn.wrap(model, sn.Rank("r", [4, 16, 32], targets=targets, mode="lora", alpha=8))
    with torch.no_grad():
        for t in targets:
            model[int(t)].lora_B.normal_(0, 0.05)
    nest.check(torch.randn(16, 32, dtype=dtype))


class _CastIn(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_export_that_cannot_run_in_float32_is_said_unverified(dtype):
    """A forward that casts to its own half dtype cannot run with its tensors in float32: the float32 comparison
    was skipped in silence and an export 8% off passed on half precision's tolerance. Warned now, naming what
    could not be verified; a right one says nothing."""
    from sortednet.check import UnverifiedExportWarning

    for factor, wrong in ((1.08, True), (1.0, False)):
        cls = _scaling_type(f"_CastScaled{str(dtype)[6:]}{factor}", factor)
        torch.manual_seed(0)
        model = nn.Sequential(_CastIn(dtype), cls(8, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)
        nest = sn.wrap(model, sn.Width("h", [8, 16, 32], out="1", inp="3"))
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            nest.check(torch.randn(4, 8))
        said = [w for w in got if issubclass(w.category, UnverifiedExportWarning)]
        assert bool(said) == wrong, [str(w.message)[:200] for w in got]


class _HalfTableNet(nn.Module):
    """A float32 model with one frozen bfloat16 table beside it (the rest of its computation in float32)."""

    def __init__(self, cls, table_dtype):
        super().__init__()
        self.a, self.b = cls(8, 32), nn.Linear(32, 4)
        self.table = nn.Parameter(torch.ones(4, dtype=table_dtype), requires_grad=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) * self.table.float()


@pytest.mark.parametrize("case", ["float16", "float32_beside_a_bfloat16_table"])
def test_a_custom_export_off_by_a_fraction_of_a_percent_is_refused_where_its_weights_round_finer(case):
    """The float32 run of a half-precision check allowed every slicer of the user's an error of 1e-2 (a bfloat16
    weight's rounding, which an export() that folds a scale may add): an export 0.5% off passed in float16, whose
    rounding is 8 times finer, and in a float32 model that holds one frozen bfloat16 table. The allowance now
    follows the dtype of the weights the slicer's export() computes (and is float32's where it keeps the base
    export())."""
    factor = 1.005 if case == "float16" else 1.01
    cls = _scaling_type(f"_ScalingLinearFine{case}", factor)
    right = _scaling_type(f"_ScalingLinearFineRight{case}", 1.0)
    for kind, wrong in ((cls, True), (right, False)):
        torch.manual_seed(0)
        if case == "float16":
            model, x = _ScalingNet(kind).to(torch.float16), torch.randn(4, 8, dtype=torch.float16)
        else:
            model, x = _HalfTableNet(kind, torch.bfloat16), torch.randn(4, 8)
        nest = sn.wrap(model, sn.Width("h", [8, 16, 32], out="a", inp="b"))
        if wrong:
            with pytest.raises(sn.SortedNetError, match=r"export\(.*\) differs from its live output by .*Buggy"):
                nest.check(x)
        else:
            nest.check(x)


class _ForgottenNorm(nn.Module):
    """GroupNorm (no affine) on the sliced channels, left out of norm=: a sub-model normalises its 8 channels over
    other groups than the full model's first 8 (a few percent off at k = 0.1)."""

    def __init__(self, k=0.1):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 3)
        self.gn = nn.GroupNorm(4, 16, affine=False)
        self.k = k

    def forward(self, x):
        h = self.c1(x)
        return self.c2(torch.relu(h + self.k * self.gn(h)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "float32_beside_a_bfloat16_scalar"])
def test_features_shared_with_an_unsliced_module_are_measured_in_float32_in_half_precision(dtype):
    """Features shared with a module no dimension slices were measured against half precision's tolerance (1e-1,
    also for a float32 model holding one bfloat16 scalar): a GroupNorm forgotten in norm= whose effect is a few
    percent passed. An error within that tolerance is measured again with the tensors in float32."""
    torch.manual_seed(0)
    model = _ForgottenNorm()
    if isinstance(dtype, torch.dtype):
        model, x = model.to(dtype), torch.randn(2, 3, 8, 8, dtype=dtype)
    else:
        model.gain = nn.Parameter(torch.ones((), dtype=torch.bfloat16), requires_grad=False)
        x = torch.randn(2, 3, 8, 8)
    nest = sn.wrap(model, sn.Width("c", [8, 16], out="c1", inp="c2"))
    with pytest.raises(sn.SortedNetError, match=r"'c1' \(out=\) shares its 16 features with modules it does not "
                                                r"slice; add norm='gn'"):
        nest.check(x)
    nest.unwrap()
    sn.wrap(model, sn.Width("c", [8, 16], out="c1", norm="gn", inp="c2")).check(x)

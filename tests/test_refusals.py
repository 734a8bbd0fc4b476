"""What sortednet cannot slice right it refuses before changing anything, and its dry runs cover
what eval mode alone would miss: weights computed by parametrizations or hooks, sparse / in-place
renormalised embeddings, and branches that run only in training (an auxiliary head)."""

from __future__ import annotations

import collections
import copy
import functools
import itertools
import re
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sortednet as sn
from models import InterruptAt, assert_unchanged, interrupted, snapshot
from sortednet.check import UncheckedTrainingWarning
from sortednet.importance import sort_units


def _mlp():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _weight_norm(m):
    nn.utils.parametrizations.weight_norm(m[0])


def _spectral_norm(m):
    nn.utils.parametrizations.spectral_norm(m[0])


def _legacy_weight_norm(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.utils.weight_norm(m[0])


def _prune(m):
    nn.utils.prune.l1_unstructured(m[0], "weight", amount=0.5)


def _weight_drop(m):
    """AWD-LSTM's WeightDrop: ``weight`` moved to ``weight_raw``, set by a pre-hook at every forward (never run
    yet: the module has no ``weight`` at all; wrap accepted it and export built a model that could not run)."""
    w = m[0]._parameters.pop("weight")
    m[0].register_parameter("weight_raw", nn.Parameter(w.data))
    m[0].register_forward_pre_hook(lambda mod, inp: setattr(mod, "weight", mod.weight_raw * 1.0))


@pytest.mark.parametrize("apply, needle", [(_weight_norm, "parametrized"), (_spectral_norm, "parametrized"),
                                           (_legacy_weight_norm, "no parameter or buffer 'weight'"),
                                           (_weight_drop, "no parameter or buffer 'weight'"),
                                           (_prune, r"is pruned .*prune\.remove\(module, 'weight'\)")])
def test_computed_weights_are_refused_and_the_model_kept(apply, needle):
    torch.manual_seed(0)
    m = _mlp()
    apply(m)
    x = torch.randn(5, 4)
    with torch.no_grad():
        ref = m(x)
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=f"'0'.*{needle}"):
        sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    assert_unchanged(m, before)
    with torch.no_grad():
        assert torch.equal(m(x), ref)



def test_a_legacy_weight_norm_outside_the_groups_is_discovered_around_checked_and_exported():
    """Legacy ``nn.utils.weight_norm`` keeps a computed, non-leaf ``weight`` attribute that deepcopy
    refuses; the private copies of discover, check and export carry its value (the hook recomputes it)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.utils.weight_norm(m[4])
    x = torch.randn(3, 8)
    dims = sn.discover(m, x, ratios=[0.5, 1.0])
    assert [tuple(d.sizes) for d in dims] == [(8, 16)]  # the 2 -> 4 group would slice the normed weight
    nest = sn.wrap(m, *dims, example=x)
    for sub in nest.submodels:
        small = nest.export(sub)
        with torch.no_grad(), nest.use(sub):
            assert torch.equal(small(x), m(x))
    assert small[4].weight_g is not m[4].weight_g and small[4].weight_v is not m[4].weight_v


class _Uncopyable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fc.feed = (i for i in range(3))  # (a generator: no deep copy can take it)

    def forward(self, x):
        return self.fc(x)


def test_a_weight_a_hook_sets_at_every_forward_is_refused_before_the_first_forward_too():
    """Before its first forward a WeightDrop module has no ``weight`` at all: wrap accepted it, ``cost`` counted
    ``weight_raw`` and ``export`` built a model that could not run."""
    torch.manual_seed(0)
    m = _mlp()
    _weight_drop(m)
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="'0' \\(Linear\\) has no 'weight' at all"):
        sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    assert_unchanged(m, before)
    assert m(torch.randn(2, 4)).shape == (2, 3)


def test_an_attribute_that_cannot_be_copied_is_named():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), _Uncopyable())
    with pytest.raises(sn.SortedNetError, match=r"module '2\.fc', attribute 'feed'"):
        sn.discover(m, torch.randn(2, 4), ratios=[0.5, 1.0])


class _Emb(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8, **kw), nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids))


@pytest.mark.parametrize("kw, needle", [(dict(sparse=True), "sparse=True"), (dict(max_norm=1.0), "max_norm")])
def test_embeddings_that_cannot_be_sliced_are_refused(kw, needle):
    torch.manual_seed(0)
    m = _Emb(**kw)
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=f"'emb'.*{needle}"):
        sn.wrap(m, sn.Width("d", [4, 8], out="emb", inp="fc"))
    assert_unchanged(m, before)


class _AuxNet(nn.Module):
    """A trunk whose features an auxiliary head reads only in training (GoogLeNet-style)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.aux = nn.Linear(6, 16), nn.Linear(16, 3), nn.Linear(16, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        out = self.fc2(self.drop(h))
        return (out, self.aux(h)) if self.training else out


@pytest.mark.parametrize("declared", [False, True])
def test_training_only_branches_are_checked(declared):
    """check dry-runs training mode too; sort_units verifies the training-mode output (dropout off)
    and restores everything when a training-only reader of the permuted features is undeclared."""
    torch.manual_seed(0)
    m, x = _AuxNet().train(), torch.randn(4, 6)
    inp = ["fc2", "aux"] if declared else ["fc2"]
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp=inp))
    if declared:
        nest.check(x)
        sort_units(nest, "l1", example=x)
        m.drop.p = 0.0
        small = nest.export("h=4").train()
        with nest.use("h=4"):
            for a, b in zip(m(x), small(x)):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        return
    with pytest.raises(sn.SortedNetError, match="add inp='aux'"):  # (the wiring trace names the reader)
        nest.check(x)
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="in training mode"):
        sort_units(nest, "l1", example=x)
    assert_unchanged(m, before)
    assert m.training and m.drop.p == 0.5


def test_a_refused_sort_interrupted_while_it_undoes_puts_every_weight_back():
    """sort_units permutes, sees the output change (an undeclared training-only reader) and undoes the
    permutation: a Ctrl-C during that undo still puts back every tensor."""
    def build():
        torch.manual_seed(0)
        m = _AuxNet().train()
        return m, sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp=["fc2"]))

    x = torch.randn(4, 6)
    m, nest = build()
    with InterruptAt(10**9, "copy_") as count, pytest.raises(sn.SortedNetError, match="in training mode"):
        sort_units(nest, "l1", example=x)
    hit = 0
    for n in range(1, count.calls + 1):
        m, nest = build()
        before = snapshot(m)
        if interrupted(n, lambda: sort_units(nest, "l1", example=x), "copy_"):  # noqa: B023
            hit += 1
            assert_unchanged(m, before)
    assert hit == count.calls >= 4


class _AuxBNNet(_AuxNet):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):
        h = torch.relu(self.bn(self.fc1(x)))
        out = self.fc2(self.drop(h))
        return (out, self.aux(h)) if self.training else out


def test_a_training_mode_check_that_cannot_run_says_so():
    """On a batch of one, BatchNorm cannot run in training mode, so check's training-mode pass cannot run:
    it says so (the undeclared auxiliary head goes unverified) instead of passing in silence; on a batch of
    two the same mistake is caught."""
    torch.manual_seed(0)
    m = _AuxBNNet().train()
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", norm="bn", inp="fc2"))
    with pytest.warns(UncheckedTrainingWarning, match="fails in training mode.*batch of 2 or more"):
        nest.check(torch.randn(1, 6))
    with pytest.raises(sn.SortedNetError, match="add inp='aux'"):
        nest.check(torch.randn(2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncheckedTrainingWarning)
        sn.wrap(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)),
                sn.Width("w", [4, 8], out="0", norm="1", inp="2"), example=torch.randn(2, 6))


def test_rank_svd_of_a_meta_model_is_refused_and_a_meta_model_has_no_false_ties(tmp_path):
    """A model on the meta device has no values: the SVD factors of Rank(svd) cannot be built (a clear
    refusal, not a raw error); loading a checkpoint into it is refused as such (load_state_dict would be
    a no-op), not mistaken for tied weights (its tensors all sit at address 0)."""
    with torch.device("meta"):
        m = _mlp()
    with pytest.raises(sn.SortedNetError, match="meta device"):
        sn.wrap(m, sn.Rank("r", [2, 3], targets="2", mode="svd"))
    assert not any("_sn" in x.__dict__ for x in m.modules())
    torch.manual_seed(0)
    real = _mlp()
    sn.save(sn.wrap(real, sn.Width("h", [4, 16], out="0", inp="2")), tmp_path / "w.safetensors")
    with pytest.raises(sn.SortedNetError, match="meta device.*to_empty") as err:
        sn.load(m, tmp_path / "w.safetensors")
    assert "tied" not in str(err.value) and not any("_sn" in x.__dict__ for x in m.modules())
    m.to_empty(device="cpu")
    sn.load(m, tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), real.state_dict().values()))


def test_discover_wires_training_only_readers():
    """discover traces training mode too (dropout off): the auxiliary head that reads the trunk only in
    training is bound with it, so the proposed nest checks, sorts and exports in both modes."""
    torch.manual_seed(0)
    m, x = _AuxNet().train(), torch.randn(4, 6)
    dims = sn.discover(m, x, ratios=[0.25, 1.0])
    assert [(d.spec()["out"], d.spec()["inp"]) for d in dims] == [(["fc1"], ["fc2", "aux"])]
    nest = sn.wrap(m, *dims, example=x)
    sort_units(nest, "l1", example=x)
    m.drop.p = 0.0
    with nest.use(nest.smallest):
        for a, b in zip(m(x), nest.export(nest.smallest).train()(x)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", [nn.ModuleList, nn.Sequential])
def test_depth_indexing_sees_the_active_blocks_as_the_export_does(cls):
    blocks = [nn.Linear(4, 4) for _ in range(6)]
    stack = cls(blocks) if cls is nn.ModuleList else cls(*blocks)
    nest = sn.wrap(nn.ModuleDict({"stack": stack}), sn.Depth("depth", [2, 4, 6], layers="stack"))
    with nest.use("depth=2"):
        small = nest.export("depth=2")["stack"]
        assert stack[-1] is blocks[1] and len(small) == 2
        assert torch.equal(stack[-1].weight, small[-1].weight)
        with pytest.raises(IndexError):
            stack[4]
    assert stack[-1] is blocks[5] and stack[4] is blocks[4]


@pytest.mark.parametrize("mode", ["svd", "lora"])
def test_rank_on_a_tied_weight_is_refused(mode):
    """Factorising (svd) or merging adapters into (lora) a weight that another module also holds would
    change that module too: refused at wrap, nothing changed."""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(20, 16), nn.Linear(16, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    torch.manual_seed(0)
    m = LM()
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="'head'.*'emb.weight' \\(tied\\)"):
        sn.wrap(m, sn.Rank("r", [2, 8, 16], targets="head", mode=mode))
    assert_unchanged(m, before)


class _Slotted:
    __slots__ = ("w",)

    def __init__(self, w):
        self.w = w


class _HeldAside(nn.Module):
    """A Rank target's weight also reachable outside its module; the forward reads it there."""

    def __init__(self, how: str):
        super().__init__()
        self.fc, self.head, self.how = nn.Linear(16, 16), nn.Linear(16, 3), how
        w = self.fc.weight
        if how == "buffer":
            self.register_buffer("wb", w, persistent=False)
        elif how == "buffer of its transpose":
            self.register_buffer("wb", w.detach().T)
        elif how == "list":
            self.ws = [w]
        elif how == "dict of a detached view":
            self.ws = {"a": (w.detach(),)}
        elif how == "functools.partial":
            self.fn = functools.partial(F.linear, weight=w)
        elif how == "parameter on its memory":
            self.p2 = nn.Parameter(w.data)
        elif how == "object":
            self.cfg = types.SimpleNamespace(w=w)
        elif how == "closure":
            self.fn = lambda: w
        elif how == "object with slots":
            self.cfg = _Slotted(w)
        elif how == "module outside _modules":
            twin = nn.Linear(16, 16)
            twin.weight = w
            self.aux = [twin]
        elif how == "deep list":
            self.ws = [[[[[[[[w]]]]]]]]
        elif how == "deque":
            self.ws = collections.deque([w])

    def read(self) -> torch.Tensor:
        how = self.how
        if how == "none":
            return self.fc.weight
        if how == "functools.partial":
            return self.fn.keywords["weight"]
        if how in ("object", "object with slots"):
            return self.cfg.w
        if how == "closure":
            return self.fn()
        if how == "module outside _modules":
            return self.aux[0].weight
        if how == "deep list":
            return self.ws[0][0][0][0][0][0][0][0]
        w = {"list": lambda: self.ws[0], "deque": lambda: self.ws[0],
             "dict of a detached view": lambda: self.ws["a"][0],
             "parameter on its memory": lambda: self.p2}.get(how, lambda: self.wb)()
        return w.T if how == "buffer of its transpose" else w

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.read())))


@pytest.mark.parametrize("mode", ["svd", "lora"])
@pytest.mark.parametrize("how", ["buffer", "buffer of its transpose", "list", "dict of a detached view",
                                 "functools.partial", "parameter on its memory", "object", "closure",
                                 "object with slots", "module outside _modules", "deep list", "deque"])
def test_rank_on_a_weight_held_outside_its_module_is_refused(how, mode):
    """svd leaves such a reference on the old full-rank weight and lora's adapters never reach it: a forward
    reading it there ran the full rank under every sub-model (r=2 was 0.2-0.6 off a true rank-2 model; with
    svd the export agreed with it, so even ``example=`` passed). Refused at wrap, with or without an example,
    naming the holder; nothing changed. (A plain object, a closure, a module kept outside ``_modules`` and a
    list nested seven deep got through before.)"""
    torch.manual_seed(0)
    m, x = _HeldAside(how), torch.randn(4, 16)
    before = snapshot(m)
    holder = {"list": "ws", "dict of a detached view": "ws", "functools.partial": "fn", "closure": "fn",
              "parameter on its memory": "p2", "object": "cfg", "object with slots": "cfg",
              "module outside _modules": "aux", "deep list": "ws", "deque": "ws"}.get(how, "wb")
    for example in (None, x):
        with pytest.raises(sn.SortedNetError, match=f"Rank target 'fc'.*'{holder}'.*Read the weight through its "
                                                    "module"):
            sn.wrap(m, sn.Rank("r", [2, 4, 16], targets="fc", mode=mode), example=example)
        assert_unchanged(m, before)


class _RaisingGetattr:
    """An object whose ``__getattr__`` raises KeyError for anything it lacks (``__dict__`` included)."""

    __slots__ = ("w",)

    def __init__(self, w):
        self.w = w

    def __getattr__(self, name):
        raise KeyError(name)


def test_an_object_whose_getattr_raises_keyerror_gets_the_checks_own_refusal():
    """check's message for a model it cannot copy read each traceback frame's first argument with getattr; an
    object of the user's whose __getattr__ raises KeyError put a raw KeyError over the SortedNetError."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    m.odd = _RaisingGetattr(torch.randn(2))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"private eval-mode view .* attribute 'odd'"):
        sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2"), example=torch.randn(2, 4))
    assert_unchanged(m, before)


@pytest.mark.parametrize("mode", ["svd", "lora"])
def test_rank_holder_walk_sees_past_big_attributes_and_hooks_and_passes_optimizers(mode, monkeypatch):
    """The walk for other holders of a Rank target's weight: a 30,000-entry vocabulary on the root (or a long list
    walked first) used up a shared budget, and a weight kept in a plain list further on was accepted (full rank
    under every sub-model, silently); a forward hook's closure was never opened. An optimizer or scheduler kept on
    the model holds the weight to step it, never to read it in a forward: not refused at wrap (svd's stale
    optimizer is refused at its step). An object whose __getattr__ raises KeyError does not crash the walk. When
    the walk reaches its limit it warns, naming where it stopped."""
    import importlib

    from sortednet.wrap import HeldWalkWarning

    sw = importlib.import_module("sortednet.wrap")

    def model():
        torch.manual_seed(0)
        m = _HeldAside("none")
        m.vocab = {f"tok{i}": i for i in range(30_000)}
        m.long = [types.SimpleNamespace(i=i) for i in range(25_000)]
        return m

    m = model()
    m.head.keep = [m.fc.weight]
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"held by 'head.keep'"):
        sn.wrap(m, sn.Rank("r", [2, 16], targets="fc", mode=mode))
    assert_unchanged(m, before)
    m = model()
    w = m.fc.weight
    m.head.register_forward_hook(lambda mod, args, out: out + F.linear(args[0], w).sum())
    with pytest.raises(sn.SortedNetError, match=r"held by 'head._forward_hooks' \(a forward hook of the module\)"):
        sn.wrap(m, sn.Rank("r", [2, 16], targets="fc", mode=mode))
    m = model()
    m.optimizer = torch.optim.AdamW(m.parameters())
    m.scheduler = torch.optim.lr_scheduler.StepLR(m.optimizer, 1)

    class MyAdamW(torch.optim.AdamW):  # (an optimizer defined outside torch.optim: still one)
        pass

    mine = MyAdamW(m.parameters())
    m.head.register_forward_hook(lambda mod, args, out, opt=mine: out)
    params = dict(m.named_parameters())  # (a backward hook reads gradients, never a weight in a forward)
    m.head.register_full_backward_hook(lambda mod, gi, go: [p.grad for p in params.values()] and None)
    m.odd = _RaisingGetattr(torch.randn(2))
    nest = sn.wrap(m, sn.Rank("r", [2, 16], targets="fc", mode=mode))
    nest.unwrap()
    monkeypatch.setattr(sw, "_HELD_LIMIT", 1000)
    with pytest.warns(HeldWalkWarning, match=r"stopped after 1,000 objects, at '(long|vocab)'"):
        sn.wrap(m, sn.Rank("r", [2, 16], targets="fc", mode=mode))


def test_rank_accepts_tensors_beside_its_weight_in_one_flat_storage():
    """Weights laid out side by side in one flat buffer (as FSDP1 and packed loaders do), an unrelated buffer
    and another layer's weight held in a list are not the target's weight: wrap accepts them, and so are
    objects, closures and methods reaching other tensors, the model itself or a cycle."""
    torch.manual_seed(0)
    m = _HeldAside("none")
    m.register_buffer("other", torch.randn(16, 16))
    m.ws = [m.head.weight]
    cycle: list = [torch.randn(2)]
    cycle.append(cycle)
    m.cfg = types.SimpleNamespace(t=torch.randn(16, 16), model=m, read=m.read, cycle=cycle,
                                  fn=lambda: m.head.weight, many=[types.SimpleNamespace(i=i) for i in range(30_000)])
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    at = 0
    for p in m.parameters():
        p.data = flat[at:at + p.numel()].view_as(p)
        at += p.numel()
    nest = sn.wrap(m, sn.Rank("r", [2, 4, 16], targets="fc", export="merged"), example=torch.randn(4, 16))
    with nest.use("r=2"):
        assert torch.linalg.matrix_rank(m.fc.weight.detach()) == 2
    nest.unwrap()
    halves = torch.randn(16, 32)  # the column halves of one matrix: overlapping address ranges, no common element
    m.fc.weight, m.head.weight = nn.Parameter(halves[:, :16]), nn.Parameter(halves[:3, 16:])
    for mode in ("svd", "lora"):
        sn.wrap(m, sn.Rank("r", [2, 4, 16], targets="fc", mode=mode, export="merged")).unwrap()


def test_a_save_pretrained_of_the_users_own_is_theirs_under_rank(tmp_path):
    """Only transformers' save_pretrained (which writes its config files, then reads the state dict of
    factors) is refused for a Rank nest; a method of the user's own name runs as before."""
    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)

        def save_pretrained(self, path):
            torch.save(self.state_dict(), path)

    m = Own()
    nest = sn.wrap(m, sn.Rank("r", [2, 8], targets="fc"))
    m.save_pretrained(tmp_path / "own.pt")
    assert set(torch.load(tmp_path / "own.pt")) == set(m.state_dict())
    nest.unwrap()


# -- wirings that run yet are not nested sub-models: check and discover measure, never assume ----------------
class _FastAxisAttention(nn.Module):
    """Heads as the FAST axis of the projections ("b n (d h)"): slicing a prefix is not whole heads."""

    def __init__(self, dim=32, heads=4, direct=False):
        super().__init__()
        self.heads, self.direct = heads, direct
        self.to_qkv, self.to_out = nn.Linear(dim, dim * 3, bias=False), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (t.reshape(B, N, -1, self.heads).permute(0, 3, 1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v).permute(0, 2, 3, 1).reshape(B, N, -1)
        if self.direct:  # the out projection's weight read directly, not through its forward
            return torch.nn.functional.linear(y, self.to_out.weight, self.to_out.bias)
        return self.to_out(y)


class _ResidualBlock(nn.Module):
    def __init__(self, scale=1.0, direct=False):
        super().__init__()
        self.scale = scale
        self.emb, self.ln, self.head = nn.Linear(6, 32), nn.LayerNorm(32), nn.Linear(32, 3)
        self.attn = _FastAxisAttention(direct=direct)

    def forward(self, x):
        h = self.emb(x) * self.scale
        return self.head(h + self.attn(self.ln(h)))


@pytest.mark.parametrize("scale, direct", [(100.0, False), (1.0, True)])
def test_heads_that_are_not_whole_heads_are_refused_behind_a_large_residual_or_a_direct_weight_read(scale, direct):
    """The whole-heads measure compares each reading projection's input with its own scale (a residual stream
    100x larger cannot hide the error) and masks the projection's weight, so a weight read with F.linear is
    measured too."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    m = _ResidualBlock(scale, direct).eval()
    assert not [d for d in sn.discover(m, x, ratios=(0.5, 1.0)) if d.kind == "heads"]
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="not the first 2 whole heads"):
        sn.wrap(m, sn.Heads("h", [2, 4], attn="attn"), example=x)
    assert_unchanged(m, before)


class _InterleavedGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up, self.down = nn.Linear(8, 32), nn.Linear(16, 8)

    def forward(self, x):
        y = self.gate_up(x)
        return self.down(torch.nn.functional.silu(y[..., ::2]) * y[..., 1::2])


def test_fused_chunks_that_interleave_are_refused():
    """chunks=2 says gate|up are stacked halves; an interleaved layer (y[..., ::2]) is caught by check."""
    torch.manual_seed(0)
    m, x = _InterleavedGLU(), torch.randn(4, 8)
    with pytest.raises(sn.SortedNetError, match="not the first 4 whole units"):
        sn.wrap(m, sn.Width("ffn", [4, 8, 16], out="gate_up", inp="down", chunks=2), example=x)


class _Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.e = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.d = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        y = self.c(x)
        B, C, H, W = y.shape
        y = y.view(B, 2, C // 2, H, W).transpose(1, 2).reshape(B, C, H, W)  # channel shuffle
        return self.e(torch.relu(self.d(y))).mean((2, 3))


def test_the_traced_review_names_a_wiring_that_runs_but_reshapes_the_sliced_axis():
    """A channel shuffle runs at every size, so the dry runs pass; the tracer's review (diagnose) names it. It is
    not a refusal of check: the tracer also stops at ops it does not know that are fine (chunk of fused
    projections, torch.where, ...)."""
    from sortednet.check import diagnose

    torch.manual_seed(0)
    m, x = _Shuffle().eval(), torch.randn(2, 3, 5, 5)
    nest = sn.wrap(m, sn.Width("ch", [4, 8], out=["c", "d"], inp=["d", "e"]))
    assert any("cannot shrink" in p and "'c'" in p for p in diagnose(nest, x))


class _SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up, self.down = nn.Linear(8, 32), nn.Linear(16, 8)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, -1)
        return self.down(torch.nn.functional.silu(g) * torch.where(u > 0, u, 0.5 * u))


def test_correct_nests_are_not_refused_by_the_measurements():
    """Stacked gate|up (chunks=2) with ops the tracer does not know, a restricted nest whose listed
    sub-models leave out the full model, and half precision (its own tolerance) all pass check."""
    torch.manual_seed(0)
    sn.wrap(_SwiGLU(), sn.Width("ffn", [4, 8, 16], out="gate_up", inp="down", chunks=2), example=torch.randn(4, 8))
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval().to(dtype)
        x = torch.randn(2, 5, 16, dtype=dtype)
        heads = sn.Heads("heads", [2, 4], attn="layers.*.self_attn")
        ffn = sn.Width("ffn", [16, 32], out="layers.*.linear1", inp="layers.*.linear2")
        subs = [{"heads": 2, "ffn": 32}, {"heads": 4, "ffn": 16}] if dtype == torch.float32 else None
        sn.wrap(enc, heads, ffn, submodels=subs, example=x).unwrap()


def test_depth_walked_with_children_is_caught_and_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            for b in self.blocks.children():  # sees every block, whatever the depth
                x = b(x)
            return self.head(x)

    torch.manual_seed(0)
    with pytest.raises(sn.SortedNetError, match=r"block 'blocks.1' ran under d=1, which skips it.*\.children\(\)"):
        sn.wrap(Net(), sn.Depth("d", [1, 4], layers="blocks"), example=torch.randn(2, 8))


class _Layers(nn.Module):
    """A block without a forward of its own: the parent calls its layers."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)


@pytest.mark.parametrize("walk", ["children", "aside"])
def test_a_block_without_a_forward_walked_around_the_list_is_caught_without_an_example(walk):
    """The depth guard hooked each block's own forward (or, for a ModuleList block, its modules'): a block whose
    layers the parent calls (b.fc(b.ln(x))), reached through .children() or a list kept aside, ran under every
    depth in silence without example= (0.98 off the first-d-blocks model, which cost and export describe)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(_Layers() for _ in range(4))
            self.run = list(self.blocks)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            for b in (self.blocks.children() if walk == "children" else self.run):
                x = x + b.fc(b.ln(x))
            return self.head(x)

    torch.manual_seed(0)
    m, x = Net(), torch.randn(2, 8)
    nest = sn.wrap(m, sn.Depth("d", [2, 4], layers="blocks"))
    with pytest.raises(sn.SortedNetError, match=r"block 'blocks.2.ln' ran under d=2, which skips it"):
        with nest.use("d=2"):
            m(x)
    with nest.use("d=4"):
        m(x)


def test_lazy_modules_are_refused_by_wrap_and_discover_without_materialising_them():
    m, x = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(2, 8)
    rng = torch.get_rng_state()
    with pytest.raises(sn.SortedNetError, match="lazy"):
        sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    with pytest.raises(sn.SortedNetError, match="lazy"):
        sn.discover(m, x)
    assert isinstance(m[0].weight, nn.parameter.UninitializedParameter) and torch.equal(torch.get_rng_state(), rng)
    conv = nn.Sequential(nn.LazyConv2d(16, 3), nn.ReLU(), nn.Conv2d(16, 3, 1))
    with pytest.raises(sn.SortedNetError, match=r"lazy\) tensors \['0.weight', '0.bias'\] \(of LazyConv2d\)"):
        sn.wrap(conv, sn.Width("w", [8, 16], out="0", inp="2"))  # (the hint named nn.LazyLinear, whatever it was)


def test_discover_leaves_out_declarations_that_slice_a_tied_weight_differently():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.nxt = nn.Linear(8, 16), nn.Linear(16, 2)
            self.aux, self.auxo = nn.Linear(8, 16), nn.Linear(16, 2)
            self.aux.weight = self.fc.weight

        def forward(self, x):
            return self.nxt(torch.relu(self.fc(x))) + self.auxo(torch.relu(self.aux(x * 2)))

    torch.manual_seed(0)
    m, x = Tied().eval(), torch.randn(3, 8)
    dims = sn.discover(m, x, ratios=(0.5, 1.0))
    nest = sn.wrap(m, *dims, example=x)
    for s in nest.submodels:  # every sub-model it offers exports, with the parameters cost counts
        assert sum(p.numel() for p in nest.export(s).parameters()) == nest.cost(s)


def test_a_replacing_export_keeps_hooks_and_every_name_of_the_module():
    """Factored low rank exports a Sequential in place of the Linear: the user's forward hook goes with it,
    and a module held under two names (self.b = self.a) is replaced under both."""
    class TwoNames(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(16, 16), nn.Linear(16, 3)
            self.b = self.a

        def forward(self, x):
            return self.o(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    m, x = TwoNames(), torch.randn(4, 16)
    m.a.register_forward_hook(lambda mod, args, out: out * 2)
    nest = sn.wrap(m, sn.Rank("r", [2, 4, 16], targets="a", export="factored"))
    live_ids = {id(t) for t in m.parameters()}
    for s in nest.submodels:
        e = nest.export(s)
        assert e.a is e.b and not any(id(t) in live_ids for t in e.parameters())
        assert sum(p.numel() for p in e.parameters()) == nest.cost(s)
        with torch.no_grad(), nest.use(s):
            torch.testing.assert_close(e(x), m(x), atol=1e-5, rtol=1e-5)


def test_a_replacing_export_keeps_full_backward_hooks():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    seen = []
    m[0].register_full_backward_hook(lambda mod, gin, gout: seen.append(gout[0].shape))
    nest = sn.wrap(m, sn.Rank("r", [2, 8], targets="0", export="factored"))
    e = nest.export("r=2")
    assert isinstance(e[0], nn.Sequential)
    e(torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert seen == [(2, 8)]


class _TimmAttention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.proj(y.reshape(B, N, self.num_heads * self.head_dim))


class _MaskedPolicy(nn.Module):
    """timm-layout heads (the slow axis) before logits masked with -inf, a forward that samples (mu + noise)
    and a DropPath-style residual (x.new_empty(...).bernoulli_) in training."""

    def __init__(self):
        super().__init__()
        self.inp, self.attn, self.head = nn.Linear(6, 32), _TimmAttention(), nn.Linear(32, 5)

    def forward(self, x):
        h = self.inp(x)
        y = self.attn(h)
        if self.training:
            y = y * y.new_empty((y.shape[0], 1, 1)).bernoulli_(0.9) / 0.9
        h = h + y
        logits = self.head(h)
        logits = logits + 0.01 * torch.randn_like(logits)
        return logits.masked_fill(torch.arange(5) >= 4, float("-inf"))


def test_correct_heads_pass_with_masked_logits_a_sampling_forward_and_drop_path():
    torch.manual_seed(0)
    m, x = _MaskedPolicy().eval(), torch.randn(2, 5, 6)
    kinds = sorted(d.kind for d in sn.discover(m, x, ratios=(0.5, 1.0)))
    assert kinds == ["heads", "width"], kinds  # the residual stream too (DropPath's new_empty is understood)
    nest = sn.wrap(m, sn.Heads("h", [1, 2, 4], attn="attn"), example=x)
    assert nest.smallest["h"] == 1


@pytest.mark.parametrize("kind", ["temperature", "temperature_half_head_dim", "alibi", "gate", "swin_bias_table"])
def test_per_head_tensors_of_an_attention_are_refused_at_wrap_and_named(kind):
    """Swin's relative position bias table (positions, heads) passed wrap (heads on its last axis), and a
    temperature (H, 1, 1) did where H is half the head size (the 1-D rotary exemption): a raw shape error at the
    first smaller forward, and check named neither."""
    E, H = 48, 4     # (a 1-D tensor as long as the head size or half of it is left to check: rotary tables)
    D = 8 if kind == "temperature_half_head_dim" else 12
    E = H * D

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.n_heads, self.head_dim = H, D
            self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
            if kind.startswith("temperature"):
                self.temp = nn.Parameter(torch.ones(H, 1, 1))          # Swin-v2 style logit scale
            elif kind == "alibi":
                self.register_buffer("slopes", 2.0 ** -torch.arange(1.0, H + 1))
            elif kind == "swin_bias_table":
                self.table = nn.Parameter(torch.zeros(9, H))           # indexed by relative position
            else:
                self.gate = nn.Parameter(torch.ones(1, H, 1, 1))       # head-wise gate

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (self.q(x), self.k(x),
                                                                                            self.v(x)))
            att = q @ k.transpose(-1, -2) * D ** -0.5
            if kind.startswith("temperature"):
                att = att * self.temp
            elif kind == "swin_bias_table":
                pos = torch.arange(T)
                att = att + self.table[(pos[None] - pos[:, None]).clamp(-4, 4) + 4].permute(2, 0, 1)
            elif kind == "alibi":
                pos = torch.arange(T)
                att = att - self.slopes.view(-1, 1, 1) * (pos[None] - pos[:, None]).abs()
            y = att.softmax(-1) @ v
            if kind == "gate":
                y = y * self.gate
            return self.o(y.transpose(1, 2).reshape(B, T, -1))

    m = Attn()
    before = snapshot(m)
    name = {"temperature": "temp", "temperature_half_head_dim": "temp", "alibi": "slopes", "gate": "gate",
            "swin_bias_table": "table"}[kind]
    m(torch.randn(2, 5, E))                                  # (the model runs)
    with pytest.raises(sn.PatternError, match=f"'{name}' of shape .* looks per-head"):
        sn.wrap(m, sn.Heads("heads", [2, 4], attn=""))
    assert_unchanged(m, before)


class _RelBias(nn.Module):
    """A per-head relative position bias held by a child of the attention (HF Swin's layout): a table of
    (positions, heads), returned as (1, heads, T, T)."""

    def __init__(self, heads: int, reach: int = 4):
        super().__init__()
        self.reach = reach
        self.table = nn.Parameter(torch.randn(2 * reach + 1, heads))

    def forward(self, T: int) -> torch.Tensor:
        pos = torch.arange(T)
        return self.table[(pos[None] - pos[:, None]).clamp(-self.reach, self.reach) + self.reach].permute(2, 0, 1)[None]


@sn.slicer(_RelBias)
class _RelBiasSlicer(sn.Slicer):
    roles = ("out",)
    attrs = ("table",)
    views = {"table": ((1, "out"),)}

    def full(self, m, role):
        return m._parameters["table"].shape[1]


class _BiasAttn(nn.Module):
    def __init__(self, heads: int = 4, D: int = 6, gate: bool = False):
        super().__init__()
        E = heads * D
        self.num_heads, self.head_dim = heads, D
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.rel = _RelBias(heads)
        self.gate = nn.Linear(E, heads) if gate else None  # a head-wise gate, one output per head

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (self.q(x), self.k(x),
                                                                                          self.v(x)))
        y = ((q @ k.transpose(-1, -2)) * self.head_dim ** -0.5 + self.rel(T)).softmax(-1) @ v
        if self.gate is not None:
            y = y * self.gate(x).sigmoid().transpose(1, 2)[..., None]
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def _first_heads(m: _BiasAttn, h: int) -> _BiasAttn:
    """A standalone attention of ``h`` heads holding the first ``h`` heads of ``m`` (the reference)."""
    D, E = m.head_dim, m.num_heads * m.head_dim
    small = _BiasAttn(h, D)
    small.q, small.k, small.v = (nn.Linear(E, h * D) for _ in range(3))
    small.o = nn.Linear(h * D, E)
    with torch.no_grad():
        for n in "qkv":
            getattr(small, n).weight.copy_(getattr(m, n).weight[: h * D])
            getattr(small, n).bias.copy_(getattr(m, n).bias[: h * D])
        small.o.weight.copy_(m.o.weight[:, : h * D])
        small.o.bias.copy_(m.o.bias)
        small.rel.table.copy_(m.rel.table[:, :h])
    return small


@pytest.mark.parametrize("gate", [False, True])
def test_a_per_head_table_in_a_child_is_refused_naming_it_and_per_head(gate):
    """A child's per-head table (positions, heads) or a Linear(hidden, heads) gate passed wrap and was left
    whole: a raw shape error in the first smaller forward (HF Swin). Refused at wrap, naming the child, the tensor
    and per_head=, with nothing changed."""
    torch.manual_seed(0)
    m = _BiasAttn(gate=gate).eval()
    before = snapshot(m)
    name, tensor = ("gate", "weight") if gate else ("rel", "table")
    dims = [sn.Heads("h", [2, 4], attn="", per_head="rel")] if gate else [sn.Heads("h", [2, 4], attn="")]
    with pytest.raises(sn.PatternError, match=rf"child '{name}' .* parameter '{tensor}' of shape .* looks per-head"
                                              rf".*per_head='{name}'"):
        sn.wrap(m, *dims)
    assert_unchanged(m, before)


@settings(max_examples=8, deadline=None)
@given(heads=st.sampled_from([2, 3, 4]), T=st.integers(1, 7), seed=st.integers(0, 2 ** 16))
def test_per_head_slices_a_childs_table_with_the_heads(heads, T, seed):
    """per_head= cuts the child's out role one unit per head: every sub-model equals a standalone attention of
    its first heads (table columns included) and its export."""
    torch.manual_seed(seed)
    m = _BiasAttn(heads).eval()
    sizes = list(range(1, heads + 1))
    nest = sn.wrap(m, sn.Heads("h", sizes, attn="", per_head=["rel"]))
    x = torch.randn(2, T, m.num_heads * m.head_dim)
    for h in sizes:
        want = _first_heads(m, h).eval()(x)
        with torch.no_grad(), nest.use(f"h={h}"):
            got = m(x)
            assert m.rel.table.shape == (9, h)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(nest.export(f"h={h}")(x), want, rtol=1e-5, atol=1e-6)
    nest.unwrap()


class _SideAttn(nn.Module):
    """Attention of ``heads`` heads with a side module whose width equals the head count but is not per-head:
    ``"adapter"`` (``x + B(A(x))`` of rank ``heads``, shared by all heads), ``"memory"`` (``heads`` learned memory
    tokens that every head attends to: an own parameter of shape (heads, E)) or ``"router"`` (a
    ``Linear(E, heads)`` whose outputs are summed into a scalar gate). ``mqa``: one key/value head."""

    def __init__(self, side: str, heads: int = 4, D: int = 3, mqa: bool = False):
        super().__init__()
        E = heads * D
        self.num_heads, self.head_dim, self.side = heads, D, side
        self.q, self.o = nn.Linear(E, E), nn.Linear(E, E)
        self.k, self.v = (nn.Linear(E, D if mqa else E) for _ in range(2))
        if side == "adapter":
            self.adapter = nn.Sequential(nn.Linear(E, heads, bias=False), nn.Linear(heads, E, bias=False))
        elif side == "memory":
            self.memory = nn.Parameter(torch.randn(heads, E))
        else:
            self.router = nn.Linear(E, heads)

    def forward(self, x):
        B, T, E = x.shape
        if self.side == "adapter":
            x = x + self.adapter(x)
        kv = torch.cat([self.memory.expand(B, -1, -1), x], 1) if self.side == "memory" else x
        q = self.q(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k, v = (p(kv).view(B, kv.shape[1], -1, self.head_dim).transpose(1, 2) for p in (self.k, self.v))
        if k.shape[1] != q.shape[1]:
            k, v = k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1)
        y = self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))
        return y * self.router(x).sum(-1, keepdim=True).sigmoid() if self.side == "router" else y


def _heads_reference(m: _SideAttn, x: torch.Tensor, h: int) -> torch.Tensor:
    """``m`` on ``x`` with its first ``h`` query heads (and key/value heads), by hand."""
    B, T, _ = x.shape
    D = m.head_dim
    if m.side == "adapter":
        x = x + m.adapter(x)
    kv = torch.cat([m.memory.expand(B, -1, -1), x], 1) if m.side == "memory" else x
    q = F.linear(x, m.q.weight[: h * D], m.q.bias[: h * D]).view(B, T, h, D).transpose(1, 2)
    mqa = m.k.out_features == D
    rows = D if mqa else h * D
    k, v = (F.linear(kv, p.weight[:rows], p.bias[:rows]).view(B, kv.shape[1], -1, D).transpose(1, 2)
            for p in (m.k, m.v))
    if mqa:
        k, v = k.expand(-1, h, -1, -1), v.expand(-1, h, -1, -1)
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, h * D)
    y = F.linear(y, m.o.weight[:, : h * D], m.o.bias)
    return y * m.router(x).sum(-1, keepdim=True).sigmoid() if m.side == "router" else y


@settings(max_examples=10, deadline=None)
@given(heads=st.sampled_from([4, 8]), mqa=st.booleans(), T=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_a_width_equal_to_the_head_count_that_is_not_per_head(heads, mqa, T, seed):
    """A low-rank adapter of rank == heads (a pair of sibling Linears meeting in that width) and a multi-query
    attention's single key/value head (a projection Heads leaves whole) were refused as per-head tables since the
    per-head check: both wrap. A memory-token table and a router of that length are undecidable, refused unless
    named in whole=. Every sub-model equals the attention of its first heads by hand, and its export."""
    torch.manual_seed(seed)
    x = torch.randn(2, T, heads * 3)
    sizes = [heads // 4, heads // 2, heads]
    for side in ("adapter", "memory", "router"):
        m = _SideAttn(side, heads, mqa=mqa).eval()
        whole = {} if side == "adapter" else {"whole": side}
        if whole:
            before = snapshot(m)
            with pytest.raises(sn.PatternError, match=rf"'{side}' .*looks per-head.*whole='{side}'"):
                sn.wrap(m, sn.Heads("h", sizes, attn=""))
            assert_unchanged(m, before)
        nest = sn.wrap(m, sn.Heads("h", sizes, attn="", **whole))
        for h in sizes:
            with torch.no_grad(), nest.use(f"h={h}"):
                got = m(x)
                want = _heads_reference(m, x, h)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(nest.export(f"h={h}")(x), want, rtol=1e-5, atol=1e-6)
        nest.unwrap()


class _UpFirstLoRA(nn.Module):
    """Attention beside a low-rank adapter of rank == heads whose up projection is declared before its down one."""

    def __init__(self, E=12, H=4):
        super().__init__()
        self.num_heads, self.head_dim = H, E // H
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.lora_up, self.lora_down = nn.Linear(H, E, bias=False), nn.Linear(E, H, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1)
        return self.o(y) + self.lora_up(self.lora_down(x))


def test_an_adapter_declared_up_before_down_is_refused_naming_both():
    """The pair order that tells Swin-v2's position-bias MLP (taking the coordinates first, one value per head
    last) from a low-rank adapter cannot tell an adapter declared up before down (a module of one's own runs its
    children in any order): refused, and the message suggested whole= of one of them, refused again for the other.
    It names both now; with both in whole= every sub-model equals its export."""
    torch.manual_seed(0)
    m, x = _UpFirstLoRA().eval(), torch.randn(2, 5, 12)
    before = snapshot(m)
    for whole in (None, "lora_up"):
        with pytest.raises(sn.PatternError, match=r"its children \['lora_up', 'lora_down'\] \(Linears\) meet in a "
                                                  r"width of 4, the head count.*whole=\['lora_up', 'lora_down'\]"):
            sn.wrap(m, sn.Heads("h", [1, 2, 4], attn="", whole=whole))
    assert_unchanged(m, before)
    nest = sn.wrap(m, sn.Heads("h", [1, 2, 4], attn="", whole=["lora_up", "lora_down"]))
    for h in (1, 2, 4):
        with torch.no_grad(), nest.use(f"h={h}"):
            torch.testing.assert_close(m(x), nest.export(f"h={h}")(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads", [2, 3])
def test_swinv2_position_bias_mlp_and_logit_scale_are_refused_at_wrap(heads):
    """Swin-v2's attention holds per-head tensors in a child: a logit scale of shape (heads, 1, 1) and a
    position-bias MLP ``Linear(2, 512)``, ReLU, ``Linear(512, heads)``. With 2 heads that MLP was taken for a
    low-rank adapter meeting in a width of the head count (exempt) and the (heads, 1, 1) scale, not 2-D, was not
    read: wrap accepted, the first smaller forward raised a raw shape error. Both are refused at wrap, named,
    nothing changed; whole= may name the one tensor of a child ('self.logit_scale')."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Swinv2Config(image_size=32, patch_size=4, embed_dim=16 * heads, depths=[1, 1],
                                    num_heads=[heads, 2 * heads], window_size=4)
    m = transformers.Swinv2Model(cfg).eval()
    before = snapshot(m)
    dim = functools.partial(sn.Heads, "h0", [1, heads], attn="encoder.layers.0.blocks.*.attention",
                            qkv=("self.query", "self.key", "self.value"), o="output.dense")
    with pytest.raises(sn.PatternError, match=rf"child 'self' .*'logit_scale' of shape \({heads}, 1, 1\).*"
                       r"whole='self.logit_scale'"):
        sn.wrap(m, dim())
    with pytest.raises(sn.PatternError, match=r"child(ren)? \[?'self.continuous_position_bias_mlp.[02]'"):
        sn.wrap(m, dim(whole="self.logit_scale"))
    assert_unchanged(m, before)


@pytest.mark.parametrize("whole, why", [
    ("q", "projection 'q'"), ("nothing", "names no child module or own parameter"),
    (["router", "router"], "each once"), ("", "relative paths"), (".router", "relative paths")])
def test_whole_names_are_checked(whole, why):
    m = _SideAttn("router").eval()
    before = snapshot(m)
    with pytest.raises(sn.PatternError, match=why):
        sn.wrap(m, sn.Heads("h", [2, 4], attn="", whole=whole))
    assert_unchanged(m, before)
    for per_head, both in (("router", "router"), ("router.w", "router"), ("router", "router.w")):
        with pytest.raises(sn.PatternError, match=rf"\['{both}'\] named \(or held\) in both per_head= .* whole="):
            sn.Heads("h", [2, 4], attn="", per_head=per_head, whole=both)


def test_a_format_1_checkpoint_loads_into_a_nest_naming_whole(tmp_path):
    """load ignored whole= for sortednet/2 files only: a sortednet/1 file (patterns as written) was refused by a
    nest naming whole= ('whole None saved')."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = _SideAttn("memory").eval()
    sn.save(sn.wrap(m, sn.Heads("h", [2, 4], attn="", whole="memory")), tmp_path / "v2.sn")
    with safe_open(str(tmp_path / "v2.sn"), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["sortednet"])
    dim = {k: v for k, v in meta["dims"][0].items() if k not in ("patterns", "whole")}
    dim["attn"] = [""]
    old = {"format": "sortednet/1", "dims": [dim], "submodels": [f"h={s}" for s in dim["sizes"]],
           "extra": meta.get("extra", {})}
    save_file(tensors, str(tmp_path / "v1.sn"), metadata={"sortednet": json.dumps(old)})
    torch.manual_seed(1)
    other = _SideAttn("memory").eval()
    sn.load(sn.wrap(other, sn.Heads("h", [2, 4], attn="", whole="memory")), tmp_path / "v1.sn")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), other.state_dict().values()))


def test_whole_on_tables_heads_slices_or_cannot_hold():
    """whole= named T5's relative_attention_bias and was ignored (the table was still cut), was accepted unread
    on an nn.MultiheadAttention, and an embedding of head-count width named in it was still refused."""
    m = _SideAttn("router").eval()
    m.relative_attention_bias = nn.Embedding(9, 4)
    m.slots = nn.Embedding(5, 4)  # (five slots of a width that happens to equal the head count)
    with pytest.raises(sn.PatternError, match=r"child 'slots' is an embedding of width 4"):
        sn.wrap(m, sn.Heads("h", [2, 4], attn="", whole="router"))
    with pytest.raises(sn.PatternError, match=r"whole='relative_attention_bias' names the per-head relative"):
        sn.wrap(m, sn.Heads("h", [2, 4], attn="", whole=["router", "relative_attention_bias"]))
    nest = sn.wrap(m, sn.Heads("h", [2, 4], attn="", whole=["router", "slots"]))
    with nest.use("h=2"):
        assert m.slots.weight.shape == (5, 4) and m.relative_attention_bias.weight.shape == (9, 2)
    nest.unwrap()
    mha = nn.Sequential(nn.MultiheadAttention(8, 4))
    with pytest.raises(sn.PatternError, match=r"MultiheadAttention takes no \['whole'\]"):
        sn.wrap(mha, sn.Heads("h", [2, 4], attn="0", whole="x"))


def test_whole_is_in_the_spec_and_files_with_or_without_it_load(tmp_path, monkeypatch):
    """whole= describes (nothing it names is sliced): it is in the spec and repr, and load ignores it, so a
    checkpoint written without it (before the per-head check existed) loads into a nest that names it, and back."""
    torch.manual_seed(0)
    m = _SideAttn("memory").eval()
    nest = sn.wrap(m, sn.Heads("h", [2, 4], attn="", whole="memory"))
    assert nest.dims[0].spec()["whole"] == ["memory"] and "whole=['memory']" in repr(nest.dims[0])
    assert "whole" not in sn.Heads("h", [2, 4], attn="").spec()
    sn.save(nest, tmp_path / "new.sn")
    real = sn.Heads.spec
    monkeypatch.setattr(sn.Heads, "spec", lambda self: {k: v for k, v in real(self).items() if k != "whole"})
    sn.save(nest, tmp_path / "old.sn")  # (as a version without whole= wrote it)
    monkeypatch.setattr(sn.Heads, "spec", real)
    x = torch.randn(2, 3, 12)
    for name in ("old.sn", "new.sn"):
        torch.manual_seed(1)
        other = _SideAttn("memory").eval()
        twin = sn.wrap(other, sn.Heads("h", [2, 4], attn="", whole="memory"))
        sn.load(twin, tmp_path / name)
        with torch.no_grad(), nest.use("h=2"), twin.use("h=2"):
            torch.testing.assert_close(other(x), m(x))
        twin.unwrap()


class _ConvKVAttn(nn.Module):
    """PvT / CvT style: a convolution over the tokens before the key/value projections, its kernel (or its
    stride) as long as the head count; and optionally learned rotary frequencies (1, head_dim / 2)."""

    def __init__(self, heads: int, D: int, kernel: int, freqs: bool = False):
        super().__init__()
        E = heads * D
        self.num_heads, self.head_dim = heads, D
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.reduce = nn.Conv1d(E, E, kernel, padding=kernel // 2, groups=E)
        self.rope = nn.Module() if freqs else None  # (a child holding the learned frequencies)
        if freqs:
            self.rope.freqs = nn.Parameter(torch.randn(1, D // 2))

    def forward(self, x):
        B, T, E = x.shape
        kv = self.reduce(x.transpose(1, 2))[..., :T].transpose(1, 2)
        q = self.q(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k, v = (p(kv).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.k, self.v))
        if self.rope is not None:
            ang = torch.arange(T)[:, None] * self.rope.freqs
            q = q * ang.cos().repeat(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("heads,D,kernel,freqs", [(3, 4, 3, False), (2, 6, 2, False), (4, 8, 4, True),
                                                   (2, 4, 3, True)])
def test_per_head_looking_tensors_that_are_not_are_left_to_check(heads, D, kernel, freqs):
    """The child check took a convolution's kernel axis (= the head count: CvT's 3 heads and kernel 3) and
    learned rotary frequencies (1, head_dim / 2) for per-head tensors and refused attentions the earlier code
    nested exactly. It reads matrices only, and not where the head count is the head size or half of it."""
    torch.manual_seed(0)
    m = _ConvKVAttn(heads, D, kernel, freqs).eval()
    x = torch.randn(2, 6, heads * D)
    sizes = list(range(1, heads + 1))
    nest = sn.wrap(m, sn.Heads("h", sizes, attn="", qkv=("q", "k", "v"), o="o"), example=x)
    for h in sizes:
        with torch.no_grad(), nest.use(f"h={h}"):
            torch.testing.assert_close(m(x), nest.export(f"h={h}")(x))
    nest.unwrap()


class _EmbAttn(_BiasAttn):
    """A per-head bias kept in an nn.Embedding of width heads (an index per relative position)."""

    def __init__(self, heads=4, D=6):
        super().__init__(heads, D)
        self.rel = None
        self.pos = nn.Embedding(9, heads)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (self.q(x), self.k(x),
                                                                                          self.v(x)))
        pos = torch.arange(T)
        bias = self.pos((pos[None] - pos[:, None]).clamp(-4, 4) + 4).permute(2, 0, 1)
        y = ((q @ k.transpose(-1, -2)) * self.head_dim ** -0.5 + bias).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def test_per_head_takes_an_embedding_child_and_one_that_only_some_attentions_hold():
    """per_head= naming an nn.Embedding of width heads was refused before it was read ('known:
    relative_attention_bias'); and a child that only the first layer holds (T5's layout) was refused in the
    others. Both nest now, every sub-model equal to its export; the refusal without per_head= names it."""
    torch.manual_seed(0)
    model = nn.Sequential(_EmbAttn(), _EmbAttn()).eval()
    del model[1].pos
    model[1].pos = None
    x = torch.randn(2, 5, 24)
    with pytest.raises(sn.PatternError, match=r"child 'pos' is an embedding of width 4.*per_head='pos'"):
        sn.wrap(nn.Sequential(_EmbAttn()), sn.Heads("h", [2, 4], attn="0"))
    single = nn.Sequential(_EmbAttn()).eval()
    nest = sn.wrap(single, sn.Heads("h", [1, 2, 4], attn="0", per_head="pos"), example=x)
    for h in (1, 2, 4):
        with torch.no_grad(), nest.use(f"h={h}"):
            assert single[0].pos.weight.shape == (9, h)
            torch.testing.assert_close(single(x), nest.export(f"h={h}")(x))
    targets = sn.Heads("h", [2, 4], attn="*", per_head="pos").plan(dict(model.named_modules()))
    assert [t.path for t in targets if t.path.endswith("pos")] == ["0.pos"]
    with pytest.raises(sn.PatternError, match="per_head='nope' names no child module of it, nor of the other"):
        sn.Heads("h", [2, 4], attn="*", per_head=["pos", "nope"]).plan(dict(model.named_modules()))


def test_per_head_names_a_child_that_is_not_a_projection():
    torch.manual_seed(0)
    for per_head, msg in [("q", "projection 'q'"), ("nope", "names no child module"),
                          ("rel.table", "names no child module")]:
        m = _BiasAttn().eval()
        before = snapshot(m)
        with pytest.raises(sn.PatternError, match=msg):
            sn.wrap(m, sn.Heads("h", [2, 4], attn="", per_head=per_head))
        assert_unchanged(m, before)
    for bad in ([], ["rel", "rel"], [""], [".rel"]):
        with pytest.raises(sn.PatternError, match="per_head= takes"):
            sn.Heads("h", [2, 4], attn="", per_head=bad)
    with pytest.raises(sn.PatternError, match=r"takes no \['per_head'\]"):
        sn.wrap(nn.MultiheadAttention(8, 4), sn.Heads("h", [2, 4], attn="", per_head="rel"))
    spec = sn.Heads("h", [2, 4], attn="", per_head="rel").spec()
    assert spec["per_head"] == ["rel"] and sn.dims.dimension_from_spec(spec).per_head == ("rel",)


def test_a_rotary_buffer_as_long_as_the_head_count_is_not_taken_for_a_per_head_tensor():
    E, H, D = 128, 8, 16                    # inv_freq has D / 2 = 8 = H entries, shared by every head

    class Rope(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.head_dim = H, D
            self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
            self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))

        def forward(self, x):
            B, T, _ = x.shape
            ang = torch.arange(T).float()[:, None] * self.inv_freq[None]
            cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)

            def rot(t):
                a, b = t.chunk(2, -1)
                return t * cos + torch.cat([-b, a], -1) * sin

            q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (self.q(x), self.k(x),
                                                                                              self.v(x)))
            y = torch.nn.functional.scaled_dot_product_attention(rot(q), rot(k), v)
            return self.o(y.transpose(1, 2).reshape(B, T, -1))

    torch.manual_seed(0)
    m = Rope()
    x = torch.randn(2, 5, E)
    nest = sn.wrap(m, sn.Heads("heads", [4, 8], attn=""), example=x)
    with nest.use("heads=4"):
        torch.testing.assert_close(m(x), nest.export("heads=4")(x))


def test_weights_accelerate_offloads_are_refused_and_its_device_hooks_export():
    """accelerate's offloading hook (cpu_offload, a device_map with 'cpu' / 'disk') writes each module's
    full-size weights in at every forward: wrap accepted it, and every smaller sub-model then failed with
    accelerate's raw ValueError. A hook that only moves tensors between devices (a dispatched model) is fine,
    and a shallower depth exports (its forward wrapper holding its own, skipped block was taken for a block
    held aside)."""
    hooks = pytest.importorskip("accelerate.hooks")
    from accelerate import cpu_offload

    m = _mlp()
    x = torch.randn(2, 4)
    want = m(x)
    cpu_offload(m, execution_device=torch.device("cpu"))
    before = {n: type(mod) for n, mod in m.named_modules()}
    with pytest.raises(sn.SortedNetError, match=r"accelerate offloads the weights of \['0', '2'\]"):
        sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
    assert {n: type(mod) for n, mod in m.named_modules()} == before
    torch.testing.assert_close(m(x), want)
    outer = nn.Sequential(_mlp())  # one hook on a parent that loads its children's weights (place_submodules)
    hooks.add_hook_to_module(outer[0], hooks.AlignDevicesHook(
        execution_device="cpu", offload=True, weights_map=dict(outer[0].state_dict()), place_submodules=True))
    with pytest.raises(sn.SortedNetError, match=r"accelerate offloads the weights of \['0.0', '0.2'\]"):
        sn.wrap(outer, sn.Width("h", [8, 16], out="0.0", inp="0.2"))

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
            self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

        def forward(self, x):
            x = self.inp(x)
            for b in self.blocks:
                x = torch.relu(b(x))
            return self.out(x)

    net = Net()
    for b in net.blocks:
        hooks.add_hook_to_module(b, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
    nest = sn.wrap(net, sn.Depth("depth", [1, 3], layers="blocks"))
    with torch.no_grad(), nest.use("depth=1"):
        torch.testing.assert_close(nest.export("depth=1")(x), net(x))


def test_a_device_hook_added_after_wrap_leaves_exports_and_the_unwrapped_model_working():
    """accelerate's hook (dispatch_model, a device map) added after wrap keeps the module's forward to call it:
    the sliced class's, which an export's copy and the unwrapped model no longer serve, so their forwards with
    gradients failed (KeyError '_sn'), also after removing the hooks: the model could not be trained again.
    That kept forward is the module's own class's again."""
    hooks = pytest.importorskip("accelerate.hooks")

    m = _mlp()
    x = torch.randn(2, 4)
    want = m(x)
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
    for name in ("0", "2"):
        hooks.add_hook_to_module(m.get_submodule(name), hooks.AlignDevicesHook(execution_device="cpu"))
    with nest.use("h=8"):
        live = m(x)
    small = nest.export("h=8")
    got = small(x)
    got.sum().backward()
    torch.testing.assert_close(got, live)
    nest.unwrap()
    m(x).sum().backward()
    hooks.remove_hook_from_module(m, recurse=True)
    out = m(x)
    out.sum().backward()
    torch.testing.assert_close(out, want)
    assert all(type(mod) in (nn.Linear, nn.ReLU, nn.Sequential) for mod in m.modules())
    # a hook removed before unwrap leaves the kept (sliced) forward on the instance; one added before wrap kept
    # the stock forward, which ran a smaller MultiheadAttention with the full head count
    torch.manual_seed(0)
    mha, ref = nn.MultiheadAttention(8, 2, batch_first=True), None
    ref = copy.deepcopy(mha)
    q = torch.randn(2, 3, 8)
    nest = sn.wrap(mha, sn.Heads("h", [1, 2], attn=""))
    hooks.add_hook_to_module(mha, hooks.ModelHook())
    hooks.remove_hook_from_module(mha)
    torch.testing.assert_close(nest.unwrap()(q, q, q)[0], ref(q, q, q)[0])
    hooks.add_hook_to_module(mha, hooks.ModelHook())
    nest = sn.wrap(mha, sn.Heads("h", [1, 2], attn=""))
    with nest.use("h=1"):
        torch.testing.assert_close(mha(q, q, q)[0], nest.export("h=1")(q, q, q)[0])
    nest.unwrap()
    torch.testing.assert_close(mha(q, q, q)[0], ref(q, q, q)[0])


@pytest.mark.parametrize("container", ["dict", "params"])
def test_a_depth_over_a_container_it_cannot_cut_says_what_it_takes(container):
    """A Depth over an nn.ModuleDict or nn.ParameterList said 'has no slicer; register one': it takes an
    nn.ModuleList or nn.Sequential of blocks, which the refusal now says, before anything changes."""
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            if container == "dict":
                self.blocks = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
            else:
                self.blocks = nn.ParameterList([nn.Parameter(torch.ones(4)) for _ in range(2)])

        def forward(self, x):
            for b in (self.blocks.values() if container == "dict" else self.blocks):
                x = b(x) if container == "dict" else x * b
            return x

    model = Stack()
    before = snapshot(model)
    with pytest.raises(sn.PatternError, match=r"Depth 'd': 'blocks' \((ModuleDict|ParameterList),.* is not a layer "
                                              r"list a Depth can cut: it takes an nn\.ModuleList or nn\.Sequential"):
        sn.wrap(model, sn.Depth("d", [1, 2], layers="blocks"))
    assert_unchanged(model, before)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_share_elements_agrees_with_the_element_sets(data):
    """The held-aside check's memory test against brute force: two strided views of one buffer (slices with
    steps, transposes, another dtype's view) share memory exactly when their byte sets intersect."""
    from sortednet.wrap import _share_elements, _span

    base = torch.zeros(6, 8)

    def view():
        rows = sorted(data.draw(st.lists(st.integers(0, 6), min_size=2, max_size=2, unique=True)))
        cols = sorted(data.draw(st.lists(st.integers(0, 8), min_size=2, max_size=2, unique=True)))
        v = base[rows[0]:rows[1]:data.draw(st.integers(1, 3)), cols[0]:cols[1]:data.draw(st.integers(1, 3))]
        return v.T if data.draw(st.booleans()) else v

    def byte_set(t):
        es, start = t.element_size(), t.data_ptr()
        offsets = {start + sum(i * s for i, s in zip(idx, t.stride())) * es
                   for idx in itertools.product(*(range(n) for n in t.shape))}
        return {o + k for o in offsets for k in range(es)}

    a, b = view(), view()
    (_, lo_a, hi_a), (_, lo_b, hi_b) = _span(a), _span(b)
    if lo_a <= hi_b and lo_b <= hi_a:  # (its callers ask only where the byte ranges overlap)
        assert _share_elements(a, b) == bool(byte_set(a) & byte_set(b))


@pytest.mark.parametrize("inplace_grad", [True, False])
@pytest.mark.parametrize("min_numel", [0, 1 << 20])
def test_a_model_built_under_inference_mode_serves_but_refuses_training(inplace_grad, min_numel):
    """Parameters made under ``torch.inference_mode`` are inference tensors: a slice of one read with gradients
    on gets no gradient at all (PyTorch's rule for views of inference tensors), so a sub-model's backward left
    every sliced weight's ``.grad`` None and trained nothing of it, silently (the full model's backward raises,
    as in plain PyTorch). Refused by name; serving under no_grad / inference_mode still runs."""
    with torch.inference_mode():
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"), inplace_grad=inplace_grad,
                   inplace_min_numel=min_numel)
    x = torch.randn(3, 8)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx(), nest.use("h=4"):
            torch.testing.assert_close(m(x), nest.export("h=4")(x))
    with pytest.raises(sn.SortedNetError, match=r"'0': its parameters are inference tensors"):
        sn.accumulate(nest, ["h=4"], lambda: m(x).sum())
    assert all(p.grad is None for p in m.parameters())


def test_a_quantized_module_is_refused_with_its_full_class_name_and_what_to_do():
    """A dynamically quantized ``Linear`` is also named ``Linear``: the refusal said "'0' (Linear, ...) has no
    slicer", which reads as if sortednet could not slice an nn.Linear. It now names the class in full and says
    to nest the float model and quantize the exported sub-model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(_mlp(), {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(2, 4)
    classes, before = [type(m) for m in model.modules()], model(x)
    with pytest.raises(sn.PatternError, match=r"'0' \(torch\.ao\.nn\.quantized\.dynamic\..*Linear.*quantize the "
                                              r"exported sub-model"):
        sn.wrap(model, sn.Width("h", [4, 16], out="0", inp="2"))
    assert [type(m) for m in model.modules()] == classes
    assert torch.equal(model(x), before)  # (packed weights: no state_dict of plain tensors to snapshot)


def test_a_quantization_aware_training_module_is_named_in_full():
    """torch.ao's QAT ``Linear`` subclasses ``nn.Linear`` with its own forward: the refusal said "Linear
    subclasses Linear", naming two classes alike. Both are named in full now, with what to do."""
    model = _mlp().train()
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.prepare_qat(model, inplace=False)
    classes = [type(m) for m in model.modules()]
    with pytest.raises(sn.PatternError, match=r"'0': torch\.ao\.nn\.qat\..*Linear subclasses torch\.nn\.modules\."
                                              r"linear\.Linear .*prepare the exported sub-model"):
        sn.wrap(model, sn.Width("h", [4, 16], out="0", inp="2"))
    assert [type(m) for m in model.modules()] == classes


def test_a_class_that_cannot_be_subclassed_without_arguments_is_refused_by_path():
    """wrap slices a module through a subclass of its class: an ``__init_subclass__`` that needs a keyword raised a
    bare TypeError naming no module."""

    class NeedsKind(nn.Linear):
        def __init_subclass__(cls, *, kind, **kw):
            super().__init_subclass__(**kw)

    torch.manual_seed(0)
    m = nn.Sequential(NeedsKind(4, 16), nn.ReLU(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"'0' \(NeedsKind\): sn.wrap slices a module by giving it a subclass "
                                                r".*TypeError: .*__init_subclass__\(\) missing 1 required"):
        sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    assert type(m[0]) is NeedsKind and type(m[2]) is nn.Linear and "_sn" not in m[0].__dict__
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_a_shallow_copy_of_a_sliced_module_names_copy_not_only_pickle():
    import copy

    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    with pytest.raises(sn.SortedNetError, match=r"cannot be pickled or shallow-copied \(copy.copy\).*copy.deepcopy"):
        copy.copy(m[0])
    assert copy.deepcopy(m)[0].weight.shape == (16, 4)


class _ComplexRope(nn.Module):
    """Meta-style rotary attention: a (max_pos, head_dim // 2) complex buffer, whose last axis is as long as the
    head count in the usual tiny configs (hidden 32, 4 heads)."""

    def __init__(self, dim, heads, max_pos=64):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        d = self.head_dim
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
        angles = torch.outer(torch.arange(max_pos).float(), inv)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        fc = self.freqs_cis[:T]

        def rot(t):
            return torch.view_as_real(torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2)) * fc).flatten(-2)

        y = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("dim, heads", [(32, 4), (128, 8)])
def test_a_rotary_cache_whose_last_axis_is_the_head_count_is_not_a_per_head_tensor(dim, heads):
    """Regression (the last-axis rule for Swin's bias table): a rotary buffer (max_pos, head_dim // 2) with
    head_dim // 2 == heads was refused; that rule is for trained parameters, and buffers of those lengths are left
    to check, which measures the module."""
    torch.manual_seed(0)
    m = _ComplexRope(dim, heads)
    x = torch.randn(2, 10, dim)
    nest = sn.wrap(m, sn.Heads("heads", [heads // 2, heads], attn=""), example=x)
    small = nest.export(nest.smallest)
    with nest.use(nest.smallest):
        torch.testing.assert_close(small(x), m(x))


def test_depth_over_a_module_dict_is_refused_with_a_way_that_works():
    """The refusal suggested registering a slicer for nn.ModuleDict (docs/custom_slicers.md), which says nothing
    of Depth; a DepthSlicer registered so broke even the full model. It now names the way that works."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({f"b{i}": nn.Linear(8, 8) for i in range(4)})

        def forward(self, x):
            for b in self.blocks.values():
                x = torch.tanh(b(x))
            return x

    m = Net()
    with pytest.raises(sn.SortedNetError, match=r"'blocks' \(ModuleDict.*nn\.ModuleList\(blocks\.values\(\)\)") as e:
        sn.wrap(m, sn.Depth("d", [2, 4], layers="blocks"))
    assert "custom_slicers" not in str(e.value) and type(m.blocks) is nn.ModuleDict


@pytest.mark.parametrize("attn", ["layers.*", "layers.0"])
def test_heads_naming_a_layer_instead_of_its_attention_names_the_attention(attn):
    """``attn=`` naming a TransformerEncoderLayer (or a decoder block) instead of the attention it holds said 'no
    q/k/v projections found ... pass qkv=(...)', a fix that cannot apply: the attention inside is named, with the
    pattern to give."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                enable_nested_tensor=False)
    want = attn.replace("*", "0")
    with pytest.raises(sn.SortedNetError, match=rf"at '{want}': TransformerEncoderLayer is not an attention itself: "
                                                rf"it holds one at \['{want}.self_attn'\]; name that module, "
                                                rf"attn='{re.escape(attn)}.self_attn'"):
        sn.wrap(enc, sn.Heads("h", [2, 4], attn=attn))
    assert type(enc.layers[0].self_attn) is nn.MultiheadAttention
    sn.wrap(enc, sn.Heads("h", [2, 4], attn=attn + ".self_attn")).unwrap()


class _BeitAttention(nn.Module):
    """BEiT-style attention: a bias-free fused qkv with q / v biases of its own, concatenated in the forward."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim) / 10), nn.Parameter(torch.randn(dim) / 10)

    def forward(self, x):
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


def test_an_attentions_own_biases_as_wide_as_its_heads_are_named():
    """BEiT's q / v biases beside a fused projection failed the first smaller forward with a hint to name a count
    attribute in count_attrs= (which would not help): the tensors Heads leaves whole are named, with the fix."""
    torch.manual_seed(0)
    m = nn.Sequential(_BeitAttention(), nn.Linear(32, 5))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"fails at 2: .*It holds \['q_bias \(32,\)', 'v_bias \(32,\)'\] "
                                                r"itself, as wide as all its heads \(32 features\)"):
        sn.wrap(m, sn.Heads("h", [2, 4], attn="0"))
    assert_unchanged(m, before)


class _ScriptedBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.Tanh())) for _ in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_a_depth_over_torchscript_blocks_is_refused_naming_them():
    """Scripted blocks take no forward hooks: wrap failed with PyTorch's raw RuntimeError from registering the depth
    guard (the model was left as it was)."""
    m = _ScriptedBlocks()
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"Depth 'd': the blocks \['0', '1', '2'\] of 'blocks' are "
                                                r"TorchScript modules"):
        sn.wrap(m, sn.Depth("d", [2, 4], layers="blocks"))
    assert_unchanged(m, before)


class _Adapter(nn.Module):
    """A PEFT-style adapter around a layer: its own low-rank factors beside the layer it holds."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.zeros(2, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, 2))

    def forward(self, x):
        return self.base(x) + x @ self.A.T @ self.B.T


@pytest.mark.parametrize("where", ["0", "2"])
def test_an_adapter_put_around_a_sliced_layer_is_refused_naming_what_it_adds(where):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sn.wrap(model, sn.Width("h", [4, 16], out="0", inp="2"))
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=rf"holds the sliced '{where}' \(as 'base'\), but what it adds "
                                                r"around it is not sliced.*mode='lora'"):
        model[int(where)] = _Adapter(model[int(where)])
    assert_unchanged(model, before)
    with pytest.raises(sn.SortedNetError, match="a module put in its place would run unsliced"):
        model[0] = nn.Linear(8, 16)  # (a new layer: the reason said so)


def test_converting_a_sliced_batchnorm_to_syncbatchnorm_says_what_torch_converted_already():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 4, 3))
    sn.wrap(model, sn.Width("c", [4, 8], out="3", norm="4", inp="6"))
    with pytest.raises(sn.SortedNetError, match=r"cannot become an nn.SyncBatchNorm.*reached before this one"):
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(model[1], nn.SyncBatchNorm) and type(model[4]).__name__ == "SortedBatchNorm2d"


class _PairBlocks(nn.Module):
    """lucidrains-style blocks: each an nn.ModuleList([norm, ff]) the forward unpacks (no forward of its own),
    walked through a list kept aside."""

    def __init__(self, nested: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleList([nn.LayerNorm(16), nn.ModuleList([nn.Linear(16, 16)])
                                                   if nested else nn.Linear(16, 16)]) for _ in range(4))
        self.run = list(self.blocks)
        self.nested = nested

    def forward(self, x):
        for ln, ff in self.run:
            x = x + (ff[0] if self.nested else ff)(ln(x))
        return x


@pytest.mark.parametrize("nested", [False, True])
def test_a_skipped_block_that_is_a_list_of_modules_is_caught_when_its_modules_run(nested):
    torch.manual_seed(0)
    m = _PairBlocks(nested)
    nest = sn.wrap(m, sn.Depth("depth", [1, 2, 4], layers="blocks"))
    x = torch.randn(2, 16)
    m(x)
    with nest.use("depth=4"):
        m(x)
    with nest.use("depth=1"), pytest.raises(sn.SortedNetError, match=r"block 'blocks\.1\.0' ran under depth=1"):
        m(x)
    nest.unwrap()
    m(x)  # (the hooks go with the nest)
    assert not any(mod._forward_pre_hooks for mod in m.modules())


class _TiedPairs(nn.Module):
    """Perceiver-style tied layers: blocks are nn.ModuleLists that share modules (one norm in every block, or
    one nested a level deeper), iterated as the list."""

    def __init__(self, deeper: bool = False):
        super().__init__()
        shared = nn.LayerNorm(16)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.ModuleList([shared, nn.Identity()]) if deeper else shared, nn.Linear(16, 16)])
            for _ in range(4))
        self.deeper = deeper

    def forward(self, x):
        for ln, ff in self.blocks:
            x = x + ff(ln[0](x) if self.deeper else ln(x))
        return x


@pytest.mark.parametrize("deeper", [False, True])
def test_blocks_that_are_lists_sharing_a_module_run_at_every_depth(deeper):
    torch.manual_seed(0)
    m = _TiedPairs(deeper)
    nest = sn.wrap(m, sn.Depth("depth", [1, 2, 4], layers="blocks"), example=torch.randn(2, 16))
    x = torch.randn(2, 16)
    for depth in (1, 2, 4):
        with torch.no_grad(), nest.use(f"depth={depth}"):
            got = m(x)
        want = x
        for ln, ff in list(m.blocks)[:depth]:
            want = want + ff(ln[0](want) if deeper else ln(want))
        torch.testing.assert_close(got, want.detach())


class _MixedBlocks(nn.Module):
    """A layer list of a block with a forward of its own and blocks that are ModuleLists, one module shared by
    all of them."""

    def __init__(self):
        super().__init__()
        shared = nn.LayerNorm(16)
        first = nn.Sequential(nn.Linear(16, 16), shared)
        self.layers = nn.ModuleList([first, *(nn.ModuleList([nn.Linear(16, 16), shared]) for _ in range(2))])

    def forward(self, x):
        for i, block in enumerate(self.layers):
            x = block(x) if i == 0 else block[1](block[0](x))
        return x


def test_a_module_shared_with_a_block_of_its_own_forward_is_guarded_with_that_blocks_index():
    torch.manual_seed(0)
    m = _MixedBlocks()
    nest = sn.wrap(m, sn.Depth("depth", [1, 2, 3], layers="layers"))
    x = torch.randn(2, 16)
    for depth in (1, 2, 3):
        with torch.no_grad(), nest.use(f"depth={depth}"):
            torch.testing.assert_close(m(x), nest.export(f"depth={depth}")(x))


def _bad_mha_inputs(batch_first: bool):
    x = lambda *s: torch.randn(*s)  # noqa: E731
    seq = (lambda b, n, e: x(b, n, e)) if batch_first else (lambda b, n, e: x(n, b, e))
    return {
        "embedding_width": (seq(2, 5, 16), seq(2, 5, 16), seq(2, 5, 16)),
        "key_value_lengths": (seq(2, 5, 32), seq(2, 6, 32), seq(2, 7, 32)),
        "four_d_query": (x(2, 2, 5, 32), x(2, 2, 5, 32), x(2, 2, 5, 32)),
        "batched_query_unbatched_kv": (seq(2, 5, 32), x(6, 32), x(6, 32)),
        "batch_sizes": (seq(2, 5, 32), seq(3, 6, 32), seq(3, 6, 32)),
    }


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", sorted(_bad_mha_inputs(True)))
def test_a_multihead_attention_sub_model_refuses_the_inputs_the_full_model_refuses(case, batch_first):
    """The full model (PyTorch's forward) refuses these inputs (an AssertionError; a RuntimeError of a reshape for
    other batch sizes); a sub-model (sortednet's
    attention) raised raw reshape or matmul errors, or, where a reshape happened to fit, read them another way.
    Refused alike now, before any projection, as an AssertionError and a SortedNetError."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    nest = sn.wrap(nn.Sequential(mha), sn.Heads("h", [2, 4], attn="0"))
    q, k, v = _bad_mha_inputs(batch_first)[case]
    with pytest.raises(RuntimeError if case == "batch_sizes" else AssertionError):  # (PyTorch's own reshape)
        mha(q, k, v)
    with nest.use("h=2"), pytest.raises(sn.SortedNetError, match=r"a 2-head sub-model of nn.MultiheadAttention: "
                                                               r".*got query") as info:
        mha(q, k, v)
    assert isinstance(info.value, AssertionError)


def test_messages_about_holders_copies_and_parts_say_what_happened(tmp_path):
    """Misleading refusals: a holder of the model and its EMA was told to run ``sn.save(obj.0, path)`` (not
    Python) and only one of the two was named; ``copy.copy(nest)`` was called a pickling error; an EMA copy saved
    after its nest's unwrap was 'a module no nest slices'; wrapping a model a part of which another nest wraps
    was 'model is already wrapped'; unwrap_copy inside the copy's own forward ran on into raw shape errors."""
    import copy

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="2"))
    ema = copy.deepcopy(model)
    with pytest.raises(sn.SortedNetError, match=r"at \['ema', 'model'\]; save each on its own: "
                                                r"sn.save\(obj.get_submodule\('ema'\), path\)"):
        sn.save(torch.nn.ModuleDict({"ema": ema, "model": model}), str(tmp_path / "x.safetensors"))
    with pytest.raises(sn.SortedNetError, match="a Nest cannot be copied"):
        copy.copy(nest)
    hook = ema[1].register_forward_hook(lambda *a: nest.unwrap_copy(ema))  # (mid-forward: then raw shape errors)
    with pytest.raises(sn.SortedNetError, match=r"unwrap_copy\(\) inside a forward"), nest.use("h=4"):
        ema(torch.randn(2, 4))
    hook.remove()
    assert "_sn" in ema[0].__dict__
    outer = torch.nn.Sequential(model, torch.nn.Linear(2, 2))
    with pytest.raises(sn.SortedNetError, match=r"a part of this model is wrapped by another nest .*unwrap that nest"):
        sn.wrap(outer, sn.Width("o", [1, 2], out="1"))
    nest.unwrap()
    with pytest.raises(sn.SortedNetError, match=r"sn.save\(\): .*a deep copy of a model whose nest was unwrapped"):
        sn.save(ema, str(tmp_path / "ema.safetensors"))
    assert not list(tmp_path.iterdir())

"""Invariant 5: wrapping keeps state_dict keys, Parameter objects and
isinstance; unwrap restores classes with bit-identical weights; sn.save /
sn.load round-trip every sub-model bit-exactly."""

from __future__ import annotations

import contextlib
import copy
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sortednet as sn
from models import FAMILIES, assert_unchanged, call_budget, case_params, run, snapshot
from sortednet.meta import exact_spec
from sortednet.nest import StaleScoresWarning

FAMS = sorted(FAMILIES)


def exact(d, nest):
    """A dimension's spec with its patterns resolved to the module paths they bind."""
    spec = exact_spec(d, dict(nest.model.named_modules()))
    spec.pop("patterns", None)
    return spec


def outputs(nest, example):
    out = {}
    for s in nest.submodels:
        with nest.use(s):
            out[s] = run(nest.model, example)
    return out


@pytest.mark.parametrize("family", FAMS)
def test_wrap_keeps_keys_identity_and_isinstance(family):
    c = FAMILIES[family]()
    ref = copy.deepcopy(c.model)
    keys, params = list(c.model.state_dict()), list(c.model.named_parameters())
    classes = [(n, type(m)) for n, m in c.model.named_modules()]
    nest = sn.wrap(c.model, *c.dims)
    assert list(c.model.state_dict()) == keys
    assert all(p is q for (_, p), (_, q) in zip(c.model.named_parameters(), params))
    assert [n for n, _ in c.model.named_parameters()] == [n for n, _ in params]
    assert len(list(c.model.parameters())) == len(params)   # Depth keeps skipped blocks registered
    sliced = 0
    for (n, m), (_, cls) in zip(c.model.named_modules(), classes):
        assert isinstance(m, cls), n
        sliced += type(m) is not cls
    assert sliced > 0
    with nest.use(nest.smallest):                            # state_dict is full size in any sub-model
        sd = c.model.state_dict()
        assert list(sd) == keys
        assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("family", FAMS)
def test_unwrap_restores_classes_and_weights(family):
    c = FAMILIES[family]()
    ref = copy.deepcopy(c.model)
    classes = [(n, type(m)) for n, m in c.model.named_modules()]
    params = list(c.model.parameters())
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in c.model.modules()]
    nest = sn.wrap(c.model, *c.dims)
    with nest.use(nest.smallest):
        run(c.model, c.example)
    nest.activate(nest.smallest)
    model = nest.unwrap()
    assert model is c.model
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    assert all(p is q for p, q in zip(model.parameters(), params))
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert not any("_sn" in m.__dict__ for m in model.modules())
    for (k, v), (k2, w) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k
    assert torch.equal(run(model, c.example), run(ref, c.example))
    again = sn.wrap(model, *FAMILIES[family]().dims)        # wrappable again
    assert again.active == again.largest


@pytest.mark.parametrize("family", FAMS)
@given(data=st.data())
def test_save_load_round_trip(family, data, tmp_path_factory):
    kw = data.draw(case_params(family))
    c = FAMILIES[family](**kw)
    subs = data.draw(st.none() | st.just("some"))
    nest = sn.wrap(c.model, *c.dims)
    if subs:                                                   # an explicit sub-model list survives too
        nest = sn.wrap(nest.unwrap(), *FAMILIES[family](**kw).dims, submodels=nest.submodels[::2])
    with torch.no_grad():
        for p in c.model.parameters():                          # weights no builder reproduces
            p.add_(torch.randn_like(p) * 0.01)
    want = outputs(nest, c.example)
    path = os.path.join(tmp_path_factory.mktemp("io"), "nest.safetensors")
    sn.save(nest, path)
    fresh = FAMILIES[family](**{**kw, "seed": kw["seed"] + 1})
    loaded = sn.load(fresh.model, path)
    assert loaded.submodels == nest.submodels
    assert [exact(d, loaded) for d in loaded.dims] == [exact(d, nest) for d in nest.dims]
    assert list(fresh.model.state_dict()) == list(c.model.state_dict())
    for k, v in c.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v), k
    got = outputs(loaded, c.example)
    assert all(torch.equal(got[s], want[s]) for s in want)
    other = FAMILIES[family](**{**kw, "seed": kw["seed"] + 2})  # into an existing nest
    into = sn.wrap(other.model, *other.dims, submodels=nest.submodels)
    assert sn.load(into, path) is into
    got = outputs(into, c.example)
    assert all(torch.equal(got[s], want[s]) for s in want)


@pytest.mark.parametrize("family", FAMS)
def test_deepcopy_of_wrapped_model_follows_the_same_submodels(family):
    """copy.deepcopy (EMA / teacher copies) gives independent weights sliced by the same dimensions."""
    c = FAMILIES[family]()
    nest = sn.wrap(c.model, *c.dims)
    twin = copy.deepcopy(c.model)
    assert all(p is not q for p, q in zip(twin.parameters(), c.model.parameters()))
    for s in (nest.smallest, nest.submodels[len(nest.submodels) // 2], nest.largest):
        with nest.use(s):
            assert torch.equal(run(twin, c.example), run(c.model, c.example)), s
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    with nest.use(nest.largest):
        assert not torch.equal(run(twin, c.example), run(c.model, c.example))


def test_pickling_a_wrapped_model_says_what_to_do(tmp_path):
    c = FAMILIES["mlp"]()
    sn.wrap(c.model, *c.dims)
    with pytest.raises(sn.SortedNetError, match=r"cannot be pickled.*sn\.save"):
        torch.save(c.model, tmp_path / "model.pt")
    nest = sn.Nest.of(c.model)
    ema = copy.deepcopy(c.model)
    for unwrapped in (False, True):  # (a deep copy: the advice that works for it, before and after unwrap)
        with pytest.raises(sn.SortedNetError, match=r"sn\.save\(copy, path\).*nest\.unwrap_copy\(copy\)"):
            torch.save(ema, tmp_path / "ema.pt")
        if unwrapped:
            torch.save(nest.unwrap_copy(ema), tmp_path / "ema.pt")
            assert type(torch.load(tmp_path / "ema.pt", weights_only=False)) is type(c.model)
        else:
            nest.unwrap()


# -- issue 10: wrap rollback, file hygiene, scale -------------------------------------------
class FlakyLinear(torch.nn.Linear):
    """A Linear whose slicer's prepare fails on its second call (like an SVD running out of memory)."""


@sn.slicer(FlakyLinear)
class FlakySlicer(sn.Slicer):
    roles = ("out", "inp")
    attrs = ("weight", "bias", "in_features", "out_features")
    calls = 0

    def full(self, m, role):
        return m.__dict__["out_features" if role == "out" else "in_features"]

    def value(self, m, name):
        if name in ("weight", "bias"):
            return self.take(m, name, [(0, "out"), (1, "inp")][: 1 if name == "bias" else 2])
        return self.features(m, "out" if name == "out_features" else "inp", m.__dict__[name])

    def prepare(self, m):
        m._parameters["extra"] = torch.nn.Parameter(torch.zeros(1))   # half-done work to undo
        m.weight.requires_grad_(False)
        type(self).calls += 1
        if type(self).calls % 2 == 0:
            raise MemoryError("simulated: out of memory in prepare")


def test_wrap_restores_every_module_when_prepare_fails():
    torch.manual_seed(0)
    model = torch.nn.Sequential(FlakyLinear(4, 8), torch.nn.ReLU(), FlakyLinear(8, 8), FlakyLinear(8, 2))
    FlakySlicer.calls = 0
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(MemoryError):
        sn.wrap(model, sn.Width("a", [4, 8], out="0", inp="2"), sn.Width("b", [4, 8], out="2", inp="3"))
    assert_unchanged(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any("_sn" in m.__dict__ for m in model.modules())


def test_save_keeps_umask_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from sortednet import checkpoint

    c = FAMILIES["mlp"]()
    nest = sn.wrap(c.model, *c.dims)
    path = tmp_path / "n.safetensors"
    old = os.umask(0o022)
    try:
        sn.save(nest, path)
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["n.safetensors"]
    good = path.read_bytes()
    calls = []

    def failing(t):
        calls.append(t)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed half-way
        return real(t)

    real = checkpoint._raw
    monkeypatch.setattr(checkpoint, "_raw", failing)
    with pytest.raises(KeyboardInterrupt):
        sn.save(nest, path)
    assert sorted(os.listdir(tmp_path)) == ["n.safetensors"]  # no .tmp left, old file intact
    assert path.read_bytes() == good


@pytest.mark.parametrize("family", FAMS)
def test_vectorised_params_equal_the_counter(family):
    """nest._params (one gather per parameter group) equals ParamCounter and export's count."""
    from sortednet.cost import ParamCounter

    c = FAMILIES[family]()
    nest = sn.wrap(c.model, *c.dims)
    counter = ParamCounter(nest)
    assert list(nest._params) == [counter(s) for s in nest.submodels]
    assert list(nest._params) == sorted(nest._params)
    for s in (nest.smallest, nest.largest):
        assert nest.cost(s) == sum(p.numel() for p in nest.export(s).parameters())
    sub = nest.submodels[::2]
    again = sn.wrap(nest.unwrap(), *FAMILIES[family]().dims, submodels=sub)
    assert list(again.submodels) == sorted(sub, key=lambda s: (counter(s), tuple(s.values())))


def test_a_million_submodels_stay_small_and_fast(tmp_path):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 20)] + [torch.nn.Linear(20, 20) for _ in range(5)] + [torch.nn.Linear(20, 4)]
    model = torch.nn.Sequential(*layers)
    sizes = list(range(2, 21, 2))
    dims = [sn.Width(f"w{i}", sizes, out=str(i), inp=str(i + 1)) for i in range(6)]
    with call_budget(10 ** 6 // 2) as work:      # no Python work per sub-model (about 1.4e5 calls here)
        nest = sn.wrap(model, *dims)
        assert len(nest.submodels) == 10 ** 6
        pick = nest.pick(params=1500)
    assert work.calls > 10_000                    # (the count saw the wrap)
    assert nest.cost(pick) == nest._params[nest._params <= 1500].max()       # the most params within budget
    assert sn.Sampler(nest, k=3, strategy="sandwich", seed=1).draw(5)[-1] == nest.largest
    path = tmp_path / "big.safetensors"
    sn.save(nest, path)
    assert path.stat().st_size < 100_000
    loaded = sn.load(copy.deepcopy(nest.unwrap()), path)
    assert loaded.submodels == nest.submodels
    sampler = sn.Sampler(loaded, k=4, seed=3, strategy="weighted", weights="cost")
    again = sn.Sampler(loaded, k=1, seed=0)
    again.load_state_dict(sampler.state_dict())                 # a digest stands for 10^6 names
    assert again.draw(9) == sampler.draw(9)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 1)), min_size=1, max_size=30),
       st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers(0, 2)))
def test_submodel_list_is_a_sequence_of_submodels(rows, probe):
    """SubModelList answers len / [] / in / index / == exactly as the tuple of its items does."""
    import numpy as np

    from sortednet.submodel import SubModelList

    sizes = ((1, 2, 4, 8), (3, 5, 7), (10, 20))
    lst = SubModelList(("a", "b", "c"), sizes, np.array(rows, dtype=np.uint8))
    ref = tuple(sn.SubModel(a=sizes[0][i], b=sizes[1][j], c=sizes[2][k]) for i, j, k in rows)
    assert len(lst) == len(ref) and tuple(lst) == ref and lst == ref and lst == list(ref)
    assert lst[-1] == ref[-1] and tuple(lst[1::2]) == ref[1::2]
    sub = dict(a=(sizes[0] + (99,))[probe[0]], b=(sizes[1] + (99,))[probe[1]], c=(sizes[2] + (99,))[probe[2]])
    assert (sub in lst) == (sn.SubModel(sub) in ref)
    if sub in lst:
        assert lst[lst.index(sub)] == sub
    else:
        with pytest.raises(sn.SortedNetError):
            lst.index(sub)


class _ExpandedScale(torch.nn.Module):
    """A buffer registered as a broadcast view (one element shared by all eight)."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
        self.register_buffer("scale", torch.full((1,), value).expand(8))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) * self.scale)


@pytest.mark.parametrize("same_value", [True, False])
def test_load_into_a_broadcast_buffer_skips_an_equal_value_and_refuses_another_before_any_change(tmp_path,
                                                                                                  same_value):
    torch.manual_seed(0)
    model = _ExpandedScale()
    nest = sn.wrap(model, sn.Rank("r", [2, 8], targets="a"))
    path = tmp_path / "nest.safetensors"
    sn.save(nest, path)
    torch.manual_seed(1)
    fresh = _ExpandedScale(1.0 if same_value else 2.0)
    snap = snapshot(fresh)
    x = torch.randn(3, 8)
    if same_value:
        sn.load(fresh, path)
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
        torch.testing.assert_close(fresh(x), model(x), atol=1e-6, rtol=0)
    else:
        with pytest.raises(sn.SortedNetError, match="'scale'.*broadcast view"):
            sn.load(fresh, path)
        assert_unchanged(fresh, snap)                   # not wrapped, nothing written


class _Twice(torch.nn.Module):
    """One Linear held under two names (``b`` is ``a``)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
        self.b = self.a

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("mode", ["svd", "lora"])
def test_a_rank_module_held_under_two_names_loads_into_a_fresh_model(tmp_path, mode):
    torch.manual_seed(0)
    model = _Twice()
    nest = sn.wrap(model, sn.Rank("r", [2, 8], targets="a", mode=mode))
    with torch.no_grad():
        for p in nest.trainable_parameters():
            p.add_(0.1)
    path = tmp_path / "nest.safetensors"
    sn.save(nest, path)
    torch.manual_seed(5)
    fresh = _Twice()
    loaded = sn.load(fresh, path)                       # strict: every name of the module is accounted for
    x = torch.randn(3, 8)
    for sub in nest.submodels:
        with nest.use(sub), loaded.use(sub):
            torch.testing.assert_close(fresh(x), model(x), atol=1e-6, rtol=0)


def _mlp3():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 2))


def test_a_subclass_of_a_dimension_neither_replaces_the_built_in_nor_changes_what_is_saved(tmp_path):
    """Defining a subclass of Width (a helper presetting its patterns) registered it as kind "width" for the
    whole process: plain Widths saved after it kept their patterns as written (a file no fresh model could
    load), and loads rebuilt every "width" as the subclass. Now the built-in stays; a subclass that only
    presets its arguments is saved with exact paths like the built-in; reusing a taken kind is refused."""
    from sortednet.dims import _KINDS

    x = torch.randn(3, 4)
    plain = sn.wrap(_mlp3(), sn.Width("h", [4, 8, 16], out="re:^[02]$", inp="re:^[24]$"))

    class FFN(sn.Width):  # defined after the nest: must change nothing of it
        def __init__(self, sizes):
            super().__init__("h", sizes, out="re:^[02]$", inp="re:^[24]$")

    assert _KINDS["width"] is sn.Width
    preset = sn.wrap(_mlp3(), FFN([4, 8, 16]))
    for i, nest in enumerate((plain, preset)):
        path = str(tmp_path / f"n{i}.safetensors")
        sn.save(nest, path)
        assert sn.io.read_metadata(path)["dims"][0]["out"] == ["0", "2"]
        loaded = sn.load(_mlp3(), path)
        assert type(loaded.dims[0]) is sn.Width
        assert sn.load(nest, path) is nest
        for s in nest.submodels:
            with nest.use(s), loaded.use(s):
                torch.testing.assert_close(loaded.model(x), nest.model(x), rtol=0, atol=0)
    type("Restated", (sn.Width,), {"kind": "width"})  # (restating the base's kind: a subclass like FFN)
    with pytest.raises(sn.SortedNetError, match="kind 'width' is taken"):  # another dimension taking it
        type("Other", (sn.Dimension,), {"kind": "width"})
    assert _KINDS["width"] is sn.Width


@pytest.mark.parametrize("takes", ["keywords", "nothing"])
def test_a_dimension_of_a_kind_of_its_own_loads_into_the_nest_it_was_saved_from(tmp_path, takes):
    """A Width subclass with a kind of its own saved, and then no load accepted the file, not even into the nest
    it came from: the file check counted only the keywords its __init__ names ("ffn takes []" for one taking
    **kw or none). Such a kind is compared with the nest's own dimension, never rebuilt from the file: the load
    into a nest of it works (and refuses other sizes before changing anything); into a plain model it names
    why not."""
    if takes == "keywords":
        class Own(sn.Width):
            kind = f"own_kw_{id(tmp_path)}"

            def __init__(self, name, sizes, **kw):
                super().__init__(name, sizes, out="0", inp="2")
    else:
        class Own(sn.Width):
            kind = f"own_none_{id(tmp_path)}"

            def __init__(self, name, sizes):
                super().__init__(name, sizes, out="0", inp="2")

    mlp = lambda: torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))  # noqa: E731
    saved, path = sn.wrap(mlp(), Own("h", [4, 16])), str(tmp_path / "own.safetensors")
    sn.save(saved, path)
    into = sn.wrap(mlp(), Own("h", [4, 16]))
    assert sn.load(into, path) is into
    x = torch.randn(3, 4)
    for s in saved.submodels:
        with saved.use(s), into.use(s):
            torch.testing.assert_close(into.model(x), saved.model(x), rtol=0, atol=0)
    other = sn.wrap(mlp(), Own("h", [8, 16]))
    before = snapshot(other.model)
    with pytest.raises(sn.SortedNetError, match=r"sizes \[4, 16\] saved, \[8, 16\] in the nest"):
        sn.load(other, path)
    assert_unchanged(other.model, before)
    with pytest.raises(sn.SortedNetError, match="cannot be rebuilt from a file safely"):
        sn.load(mlp(), path)


class _SparseMixer(torch.nn.Module):
    """A model whose input passes through a sparse buffer (a fixed graph / mixing matrix) before its MLP."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("mix", (torch.eye(4) * 2).to_sparse())
        self.fc1, self.fc2 = torch.nn.Linear(4, 16), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.sparse.mm(self.mix, x.T).T)))


def test_a_model_with_a_sparse_buffer_wraps_and_save_refuses_it_by_name(tmp_path):
    """A sparse buffer made wrap (its self-check put buffers back with torch.equal, which sparse tensors do
    not have) and sn.save raise a raw NotImplementedError. Now the nest works and save names the buffer."""
    model, x = _SparseMixer(), torch.randn(5, 4)
    want = model(x)
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="fc1", inp="fc2"), example=x)
    torch.testing.assert_close(model(x), want)
    for s in nest.submodels:
        with nest.use(s):
            torch.testing.assert_close(nest.export(s)(x), model(x))
    path = tmp_path / "n.safetensors"
    with pytest.raises(sn.SortedNetError, match=r"\['mix \(torch.sparse_coo\)'\] are not dense"):
        sn.save(nest, str(path))
    assert not path.exists()
    assert nest.unwrap() is model and type(model.fc1) is torch.nn.Linear


def test_an_ema_copy_is_saved_with_its_own_weights(tmp_path):
    """sn.save(sn.Nest.of(ema)) wrote the ORIGINAL model's weights (the nest a copy follows is the original's),
    and nothing saved the copy. sn.save(copy) now writes the copy's weights with the nest's dimensions; every
    sub-model of the loaded nest equals the copy's; profile scores come back marked stale, costs kept; a module
    inside the model and a copy holding calibrated statistics are refused before anything is written."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 2)).eval()
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="0", norm="1", inp="3"))
    x = torch.randn(6, 4)
    nest.profile(x, score=lambda s: float(s["h"]), metrics=("params",), repeat=1, progress=False)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    path = str(tmp_path / "ema.safetensors")
    sn.save(ema, path)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 2)).eval()
    loaded = sn.load(fresh, path)
    for s in nest.submodels:
        with nest.use(s), loaded.use(s):
            torch.testing.assert_close(loaded.model(x), ema(x), rtol=0, atol=0)
    with pytest.warns(StaleScoresWarning, match="measured on other weights"):  # (the model's, not the copy's)
        assert loaded.pick(params=nest.cost("h=8")) == nest.pick(params=nest.cost("h=8"))
    sn.save(model, str(tmp_path / "model.safetensors"))  # the wrapped model itself: the nest
    assert sn.load(nest, str(tmp_path / "model.safetensors")) is nest
    with pytest.raises(sn.SortedNetError, match="a module inside the model"):
        sn.save(model[0], str(tmp_path / "part.safetensors"))
    nest.calibrate([x], batches=1)
    calibrated = copy.deepcopy(model)
    with pytest.raises(sn.SortedNetError, match="per-sub-model BatchNorm statistics"):
        sn.save(calibrated, str(tmp_path / "cal.safetensors"))
    assert not (tmp_path / "part.safetensors").exists() and not (tmp_path / "cal.safetensors").exists()


def test_a_file_written_before_an_option_existed_loads_into_a_nest_that_leaves_it_empty(tmp_path, monkeypatch):
    """Heads gained per_head=: its spec held "per_head": None, and every Heads checkpoint written before that
    (without the key) was refused by load, naming no differing field. An option left empty now reads as one the
    file does not have; one the file sets, or the nest sets, still differs."""
    from models import FAMILIES

    c = FAMILIES["attn_block"]()
    heads = next(d for d in c.dims if isinstance(d, sn.Heads))
    real = sn.Heads.spec
    monkeypatch.setattr(sn.Heads, "spec", lambda self: {k: v for k, v in real(self).items()
                                                         if k not in ("layout", "count_attrs", "per_head")})
    nest = sn.wrap(c.model, *c.dims)
    sn.save(nest, tmp_path / "old.sn")  # (as a version without those options wrote it)
    monkeypatch.setattr(sn.Heads, "spec", real)
    fresh = FAMILIES["attn_block"](seed=1)
    twin = sn.wrap(fresh.model, *fresh.dims)
    sn.load(twin, tmp_path / "old.sn")
    assert all(torch.equal(a, b) for a, b in zip(c.model.state_dict().values(), fresh.model.state_dict().values()))
    other = FAMILIES["attn_block"](seed=1)
    dims = [sn.Heads(heads.name, heads.sizes, attn=heads.attn, count_attrs=["num_heads"])
            if isinstance(d, sn.Heads) else d for d in other.dims]
    nest3 = sn.wrap(other.model, *dims)
    with pytest.raises(sn.SortedNetError, match=r"count_attrs None saved, \['num_heads'\] in the nest"):
        sn.load(nest3, tmp_path / "old.sn")


def test_every_nest_save_writes_loads_and_save_refuses_what_load_would(tmp_path, monkeypatch):
    """sn.save wrote nests that sn.load refused: 66 dimensions (discover's one per group, on a deep model), a
    nest wrapped without any dimension. load now takes every nest save writes (up to 4,096 dimensions of 65,536
    sizes), and save refuses beyond the bounds load checks, writing nothing."""
    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(132)])
        dims = [sn.Width(f"w{i}", [2, 4], out=str(i), inp=str(i + 1)) for i in range(0, 132, 2)]
        subs = [{d.name: 4 for d in dims}, {d.name: 2 for d in dims}]
        return model, sn.wrap(model, *dims, submodels=subs)

    model, nest = build(0)
    assert len(nest.dims) == 66
    sn.save(nest, tmp_path / "many.sn")
    twin, twin_nest = build(1)
    sn.load(twin_nest, tmp_path / "many.sn")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    sn.save(sn.wrap(plain), tmp_path / "none.sn")
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    sn.load(sn.wrap(other), tmp_path / "none.sn")
    assert torch.equal(other[0].weight, plain[0].weight)
    import sortednet.io as sio
    import sortednet.meta as smeta

    for mod in (sio, smeta):
        monkeypatch.setattr(mod, "MAX_DIMS", 65)
    with pytest.raises(sn.SortedNetError, match="at most 65 dimensions .* this nest has 66"):
        sn.save(nest, tmp_path / "refused.sn")
    assert not (tmp_path / "refused.sn").exists()


class _Body(torch.nn.Module):
    def __init__(self, head: str, classes: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        setattr(self, head, torch.nn.Linear(16, classes))
        self._head = head

    def forward(self, x):
        return getattr(self, self._head)(self.body(x))


def test_a_partial_load_of_another_models_file_drops_its_measured_costs(tmp_path):
    """sn.load(strict=False) of a file written from another model (the same body, another head) kept that model's
    FLOPs (and memory, latency) as this nest's: cost returned them even with an example, and pick(flops=) returned
    sub-models over the budget. They are dropped with a warning (counted again from an example); a partial load
    of the same model's file keeps them."""
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    a = _Body("head", 3)
    na = sn.wrap(a, sn.Width("h", [8, 16, 32], out="body.0", inp="body.2"))
    na.profile(x, metrics=("params", "flops"), progress=False)
    sn.save(na, tmp_path / "a.sn")
    b = _Body("classifier", 40)
    nb = sn.wrap(b, sn.Width("h", [8, 16, 32], out="body.0", inp="body.2"))
    with pytest.warns(UserWarning, match=r"another model \(2 of this model's tensors are not in the file, 2 of the "
                                         r"file's are not in this model\).*\['flops'\] no longer apply"):
        sn.load(nb, tmp_path / "a.sn", strict=False)
    with pytest.raises(sn.SortedNetError, match="no 'flops' cost"):
        nb.cost("h=32", "flops")
    from torch.utils.flop_counter import FlopCounterMode
    for s in nb.submodels:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            nb.export(s)(x)
        assert nb.cost(s, "flops", example=x) == fc.get_total_flops()
    twin = _Body("head", 3)
    nt = sn.wrap(twin, sn.Width("h", [8, 16, 32], out="body.0", inp="body.2"))
    sn.load(nt, tmp_path / "a.sn", strict=False)  # (the same model's file: its measured costs hold)
    assert nt.cost("h=32", "flops") == na.cost("h=32", "flops")
    c = _Body("classifier", 40)  # (a file without a profile: the nest's own counts, on its own model, stay)
    nc = sn.wrap(c, sn.Width("h", [8, 16, 32], out="body.0", inp="body.2"))
    own = nc.cost("h=32", "flops", example=x)
    bare = _Body("head", 3)
    sn.save(sn.wrap(bare, sn.Width("h", [8, 16, 32], out="body.0", inp="body.2")), tmp_path / "bare.sn")
    sn.load(nc, tmp_path / "bare.sn", strict=False)
    assert nc.cost("h=32", "flops") == own


class _Pairwise(torch.nn.Module):
    def forward(self, x):
        return x @ x.transpose(-1, -2) @ x


def _act_mlp(act):
    return torch.nn.Sequential(torch.nn.Linear(8, 64), act, torch.nn.Linear(64, 3)).eval()


def test_a_profile_loaded_into_a_model_with_other_parameter_free_modules_loses_its_measured_costs(tmp_path):
    """The weights do not show an activation changed in the model's code between save and load: a profile's
    FLOPs (and latency, memory) measured on ReLU were kept for a model computing x x^T x there, and pick(flops=)
    went past the budget. The checkpoint records the module tree its profile was measured on; another tree drops
    the measured columns with a warning (params stay), the same tree keeps them."""
    x = torch.randn(16, 8)
    width = lambda: sn.Width("h", [16, 32, 64], out="0", inp="2")  # noqa: E731
    nest = sn.wrap(_act_mlp(torch.nn.ReLU()), width())
    nest.profile(x, repeat=2, progress=False)
    sn.save(nest, tmp_path / "a.sn")
    import warnings

    with warnings.catch_warnings():  # (warned before anything changes: an error filter refuses the load)
        warnings.simplefilter("error")
        target = _act_mlp(_Pairwise())
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(UserWarning):
            sn.load(target, tmp_path / "a.sn")
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
        assert not any("_sn" in m.__dict__ for m in target.modules())
    with pytest.warns(UserWarning, match=r"modules \(paths, classes or settings\) differ.*"
                                         r"\['flops', 'latency', 'memory'\] no longer apply"):
        other = sn.load(_act_mlp(_Pairwise()), tmp_path / "a.sn")
    assert sorted(other._profile.costs) == ["params"]
    with pytest.raises(sn.SortedNetError, match="no 'flops' cost"):
        other.pick(flops=20000)
    for s in other.submodels:  # counted afresh on an example: the model's own FLOPs
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            other.export(s)(x)
        assert other.cost(s, "flops", example=x) == fc.get_total_flops()
    same = sn.load(_act_mlp(torch.nn.ReLU()), tmp_path / "a.sn")
    assert same._profile == nest._profile
    assert same.pick(flops=20000) == nest.pick(flops=20000)


def test_a_profile_is_read_only_and_what_save_writes_is_what_pick_reads(tmp_path):
    """nest.profile() returned the nest's own profile with plain dicts inside: a user converting its latencies
    to milliseconds for a report changed what sn.save wrote but not what pick read (the reloaded nest picked
    another sub-model), and a tensor put in its meta crashed save with a raw TypeError."""
    nest = sn.wrap(_act_mlp(torch.nn.ReLU()), sn.Width("h", [16, 32, 64], out="0", inp="2"))
    prof = nest.profile(torch.randn(2, 8), metrics=["latency"], repeat=2, progress=False)
    for change in (lambda: prof.costs.__setitem__("latency", (1.0, 2.0, 3.0)), lambda: prof.costs.pop("latency"),
                   lambda: prof.meta.__setitem__("x", 1), lambda: prof.meta.update(x=1), prof.meta.clear):
        with pytest.raises(TypeError, match="read-only"):
            change()
    assert copy.deepcopy(prof) == prof and sn.Profile.from_dict(prof.to_dict()) == prof
    with pytest.raises(TypeError, match="unhashable type: 'Profile'"):  # (was: unhashable type '_ReadOnly')
        hash(prof)
    import dataclasses
    import pickle
    assert pickle.loads(pickle.dumps(prof)) == prof
    ms = dataclasses.replace(prof, costs={"latency": tuple(v * 1000 for v in prof.costs["latency"])})
    assert ms.costs["latency"][0] == 1000 * prof.costs["latency"][0] and nest._profile is prof
    sn.save(nest, tmp_path / "p.sn")
    back = sn.load(_act_mlp(torch.nn.ReLU()), tmp_path / "p.sn")
    assert back._profile == prof
    with pytest.raises(sn.SortedNetError, match=r"meta\['x'\] is a Tensor; profile meta holds JSON values"):
        sn.Profile(prof.submodels, prof.costs, meta={"x": torch.tensor(4)})
    with pytest.raises(sn.SortedNetError, match="finite"):
        sn.Profile(prof.submodels, prof.costs, meta={"x": [float("nan")]})


class _Strided(torch.nn.Module):
    def __init__(self, stride=1):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=stride, padding=1)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_the_profiles_module_record_sees_settings_and_ignores_where_a_class_lives(tmp_path):
    """The record of the profiled module tree held paths and classes only: a convolution's stride changed between
    save and load kept FLOPs four times too high, while the same class imported from another module (the training
    script's __main__.Net served as mymodel.Net) or an activation-checkpoint wrapper dropped correct ones."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    x = torch.randn(2, 3, 16, 16)
    width = lambda: sn.Width("c", [8, 16], out="conv", inp="head")  # noqa: E731
    nest = sn.wrap(_Strided(1), width())
    nest.profile(x, metrics=("params", "flops"), progress=False)
    sn.save(nest, tmp_path / "s.sn")
    with pytest.warns(UserWarning, match=r"settings\) differ"):
        strided = sn.load(_Strided(2), tmp_path / "s.sn")
    with pytest.raises(sn.SortedNetError, match="no 'flops' cost"):
        strided.cost("c=16", "flops")
    moved = type("_Strided", (_Strided,), {"__module__": "elsewhere", "__qualname__": "_Strided"})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = sn.load(moved(1), tmp_path / "s.sn")
        assert same.cost("c=16", "flops") == nest.cost("c=16", "flops")
        into_nest = sn.load(sn.wrap(_Strided(1), width()), tmp_path / "s.sn")
        assert into_nest.cost("c=8", "flops") == nest.cost("c=8", "flops")
    from sortednet.nest import modules_digest  # (a wrapper that leaves the forward as it is does not count)
    blocks = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    assert modules_digest(torch.nn.Sequential(checkpoint_wrapper(copy.deepcopy(blocks)))) == \
        modules_digest(torch.nn.Sequential(copy.deepcopy(blocks)))
    assert modules_digest(_Strided(1)) == modules_digest(sn.wrap(_Strided(1), width()).model)
    assert modules_digest(_Strided(1)) != modules_digest(_Strided(2))
    a, b = _Strided(1), _Strided(1)  # (what a module holds besides plain settings: not part of the record)
    a.act, b.act = torch.nn.functional.gelu, lambda t: torch.nn.functional.gelu(t)
    with torch.no_grad():
        b.conv.weight.mul_(3)
    assert modules_digest(a) == modules_digest(b)
    a.conv.top_k, b.conv.top_k = 1, 2  # (a plain setting: part of it)
    assert modules_digest(a) != modules_digest(b)
    tuned = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8, momentum=0.01), torch.nn.Dropout(0.3))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.1))
    assert modules_digest(tuned) == modules_digest(plain)  # (training alone: costs are measured in eval mode)


def test_a_converted_copy_is_refused_in_its_own_words(tmp_path):
    """sn.save of a deep copy converted to half precision was refused as "sn.save(state=)", an argument the user
    never passed. It names the copy now, and says what to do; nothing is written."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="1"))
    with pytest.raises(sn.SortedNetError, match=r"sn.save\(copy\): '0.weight' is \[8, 4\] torch.float16, the model's "
                                                r"\[8, 4\] torch.float32 \(a copy is saved in the wrapped model's"):
        sn.save(copy.deepcopy(m).half(), tmp_path / "half.sn")
    assert not (tmp_path / "half.sn").exists()
    sn.save(copy.deepcopy(m), tmp_path / "copy.sn")  # (unconverted: saved)
    assert (tmp_path / "copy.sn").exists()


def test_the_module_record_is_taken_when_profiling_not_when_saving(tmp_path):
    """The record was taken at save time: a stride changed after profiling, then saved, presented the stride-1
    FLOPs as valid for a stride-2 model (four times too high) in another process. It describes the tree the
    profile was measured on now."""
    x = torch.randn(2, 3, 16, 16)
    nest = sn.wrap(_Strided(1), sn.Width("c", [8, 16], out="conv", inp="head"))
    nest.profile(x, metrics=("params", "flops"), progress=False)
    flops = nest.cost("c=16", "flops")
    nest.model.conv.stride = (2, 2)
    sn.save(nest, tmp_path / "s.sn")
    with pytest.warns(UserWarning, match=r"settings\) differ"):
        sn.load(_Strided(2), tmp_path / "s.sn")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = sn.load(_Strided(1), tmp_path / "s.sn")   # (the tree it was measured on)
    assert same.cost("c=16", "flops") == flops
    sn.save(same, tmp_path / "again.sn")   # (a loaded profile keeps the file's record)
    with pytest.warns(UserWarning, match=r"settings\) differ"):
        sn.load(_Strided(2), tmp_path / "again.sn")


class _Block(torch.nn.Module):
    def __init__(self, drop, jitter=0.0, cached=16, n_pos=16, apply_dropout=True, drop_tokens=0):
        super().__init__()
        self.drop_tokens = drop_tokens
        self.apply_dropout = apply_dropout  # (a flag, not a rate: EfficientNet's decides a residual add)
        self.fc1, self.fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
        self.drop_path = _DropPath(drop) if drop else torch.nn.Identity()
        self.dropout = torch.nn.Dropout(drop) if drop else torch.nn.Identity()
        self.router_jitter_noise, self.router_aux_loss_coef, self.layerdrop = jitter, jitter, jitter
        self.attn_pdrop = jitter  # (GPT-2 style rate names)
        self.max_seq_len_cached = cached
        self.register_buffer("pos", torch.zeros(n_pos, 8), persistent=False)

    def forward(self, x):
        return x + self.drop_path(self.dropout(self.fc2(torch.relu(self.fc1(x + self.pos[: x.shape[0]])))))


class _DropPath(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        if not self.training or not self.drop_prob:
            return x
        keep = torch.rand(x.shape[0], 1) >= self.drop_prob
        return x * keep / (1 - self.drop_prob)


@pytest.mark.parametrize("served, same", [
    (dict(drop=0.0), True),                 # drop-path and dropout of rate 0: an Identity in their place
    (dict(drop=0.3), True),                 # another rate
    (dict(drop=0.1, jitter=0.5), True),     # router jitter, an auxiliary loss's coefficient, layer drop
    (dict(drop=0.1, cached=40), True),      # a length a forward caches
    (dict(drop=0.1, n_pos=4096), True),     # a non-persistent table of another length (one a forward grows)
    (dict(drop=0.1, apply_dropout=False), False),  # a flag with "drop" in its name: a setting
    (dict(drop=0.1, drop_tokens=4), False),          # a count an eval forward follows (token pruning): a setting
])
def test_the_module_record_ignores_training_only_settings(tmp_path, served, same):
    """Training with drop-path and serving without it (an nn.Identity in its place: timm's and transformers'
    recipe) dropped a valid profile on load, as did a router's jitter, a loss coefficient, layer drop, or a
    rotary table's cached length grown by a long prompt. Rates are left out, flags are not."""
    import warnings

    x = torch.randn(4, 8)
    nest = sn.wrap(_Block(0.1), sn.Width("h", [8, 32], out="fc1", inp="fc2"))
    nest.profile(x, metrics=("params", "flops", "memory"), repeat=1, warmup=0, progress=False)
    sn.save(nest, tmp_path / "b.sn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = sn.load(_Block(**served), tmp_path / "b.sn")
    said = [w for w in caught if "differ from this one's" in str(w.message)]
    assert (not said) == same
    assert ("memory" in back._profile.costs) == same


def test_a_checkpoint_with_the_earlier_module_record_loads_its_profile(tmp_path):
    """Files written before the record left training rates out (a dropout module was its own class there, an
    Identity now) would lose their measured costs on load with a false warning: the earlier record is accepted
    too."""
    import functools

    from sortednet.cost import modules_digest

    legacy_digest = functools.partial(modules_digest, record=0)

    def mk():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                   torch.nn.Linear(64, 5))

    assert legacy_digest(mk()) != modules_digest(mk())
    other = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(64, 5))
    _an_earlier_record_loads(tmp_path, legacy_digest, mk, other, sn.Width("w", [16, 32, 64], out="0", inp="3"))


def _an_earlier_record_loads(tmp_path, digest, mk, other, dim):
    """A profile recorded with ``digest`` (as the earlier code recorded it) loads into ``mk()`` without a
    warning and with its measured costs, and warns for ``other``."""
    import warnings
    from unittest import mock

    nest = sn.wrap(mk(), dim)
    with mock.patch("sortednet.nest.modules_digest", digest):
        nest.profile(torch.randn(4, 16), repeat=1, warmup=0, progress=False)
    sn.save(nest, tmp_path / "old.sn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = sn.load(mk(), tmp_path / "old.sn")
    assert set(back._profile.costs) == {"params", "flops", "latency", "memory"}
    with pytest.warns(UserWarning, match=r"settings\) differ"):
        sn.load(other, tmp_path / "old.sn")


def test_a_checkpoint_with_the_second_module_record_loads_its_profile(tmp_path):
    """The record before numpy numbers and ``torch.Size`` counted (a setting of ``None`` was one then): a file
    written with it loads its measured costs into the same model, and still warns on a changed activation."""
    import functools

    from sortednet.cost import modules_digest

    def mk(act=torch.nn.ReLU):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 64), act(), torch.nn.Dropout(0.1),
                                   torch.nn.Embedding(4, 4), torch.nn.Linear(64, 5))

    class Net(torch.nn.Module):
        def __init__(self, act=torch.nn.ReLU):
            super().__init__()
            self.body = mk(act)

        def forward(self, x):
            for i in (0, 1, 2, 4):
                x = self.body[i](x)
            return x

    assert modules_digest(Net(), record=1) != modules_digest(Net())  # (the embedding's padding_idx=None)
    _an_earlier_record_loads(tmp_path, functools.partial(modules_digest, record=1), Net, Net(torch.nn.GELU),
                             sn.Width("w", [16, 32, 64], out="body.0", inp="body.4"))


class _Upsampled(torch.nn.Module):
    """A setting held as a ``torch.Size`` or a numpy number, and a dropout that is ``None`` at rate 0."""

    def __init__(self, size, reps=1, p=0.0):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 4, 3, padding=1)
        self.up, self.reps = torch.nn.Upsample(size=size), reps
        self.drop = torch.nn.Dropout(p) if p > 0 else None

    def forward(self, x):
        h = self.up(torch.relu(self.conv1(x)))
        h = h if self.drop is None else self.drop(h)
        for _ in range(int(self.reps)):
            h = self.conv2.weight.new_ones(()) * h
        return self.conv2(h)


@pytest.mark.parametrize("saved,loaded,same", [
    ((torch.Size([8, 8]), 1), (torch.Size([32, 32]), 1), False),  # torch.Size settings were not recorded
    (((8, 8), np.int64(1)), ((8, 8), np.int64(3)), False),  # ... nor numpy numbers
    ((torch.Size([8, 8]), 1), ((8, 8), np.int64(1)), True),  # the same values, other types: the same forward
    (((8, 8), 1, 0.1), ((8, 8), 1, 0.0), True),  # a dropout, or None in its place at rate 0
])
def test_the_module_record_counts_sizes_and_numpy_numbers_as_their_values(tmp_path, saved, loaded, same):
    """A setting held as a ``torch.Size`` (``nn.Upsample(size=x.shape[-2:])``) or as a numpy number was left out
    of the module record, so a checkpoint's profile loaded into a model upsampling to 32x32 instead of 8x8 kept
    the file's FLOPs (129,024 against 1,234,944) without a word. Both count now, by value (a tuple and a
    ``torch.Size`` of the same sizes are the same setting); a dropout left out at rate 0 (``None`` in its place)
    is the identity it is in eval mode."""
    import warnings

    x = torch.randn(1, 3, 8, 8)
    torch.manual_seed(0)
    nest = sn.wrap(_Upsampled(*saved), sn.Width("h", [8, 16], out="conv1", inp="conv2"))
    nest.profile(x, progress=False, repeat=1, warmup=0)
    sn.save(nest, tmp_path / "a.sn")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        back = sn.load(_Upsampled(*loaded).eval(), tmp_path / "a.sn")
    said = any("differ" in str(w.message) for w in seen)
    assert said != same
    truth = sn.wrap(_Upsampled(*loaded), sn.Width("h", [8, 16], out="conv1", inp="conv2"))
    if same:
        assert back.cost("h=16", "flops") == truth.cost("h=16", "flops", example=x)
    else:
        assert "flops" not in back._profile.costs


class _Private(torch.nn.Module):
    """Settings a forward follows held under a private name (``self._stride``) and in a long list, and an
    activation that writes its input's memory or not."""

    def __init__(self, stride=1, sched=(1,) * 70, inplace=False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(4, 16), torch.nn.Conv1d(16, 16, 3, padding=1), torch.nn.Linear(16, 2)
        self.act = torch.nn.ReLU(inplace=inplace)
        self._stride, self.sched = stride, list(sched)

    def forward(self, x):
        h = self.act(self.a(x)).transpose(1, 2)
        h = h[:, :, ::self._stride][:, :, ::self.sched[-1]]
        return self.c(self.b(h).mean(2))


@pytest.mark.parametrize("loaded, same", [
    (dict(stride=4), False),          # a private setting (underscore names were not recorded)
    (dict(sched=(4,) * 70), False),   # a list of more than 64 settings (not recorded at all)
    (dict(sched=(4,) * 60), False),   # ... a shorter one was
    (dict(inplace=True), True),       # the same values and work: the profile stays
    (dict(), True),
])
def test_the_module_record_counts_private_settings_and_long_lists(tmp_path, loaded, same):
    """A file profiled on a model striding by ``self._stride = 1`` loaded into one with ``_stride = 4`` (or whose
    70-entry schedule list changed) kept the file's FLOPs, 3.2x the true count, without a word, and
    ``cost(..., example=x)`` returned them too. Private plain settings and lists of any length count now (torch's,
    transformers' and our own bookkeeping does not); ``ReLU(inplace=True)`` against ``ReLU()`` no longer drops a
    valid profile."""
    import warnings

    x = torch.randn(1, 64, 4)
    dim = lambda: sn.Width("w", [8, 16], out="a", inp="b")  # noqa: E731
    nest = sn.wrap(_Private(), dim())
    nest.profile(x, metrics=("params", "flops"), progress=False)
    sn.save(nest, tmp_path / "p.sn")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        back = sn.load(_Private(**loaded), tmp_path / "p.sn")
    assert any("differ" in str(w.message) for w in seen) != same
    truth = sn.wrap(_Private(**loaded), dim()).cost("w=16", "flops", example=x)
    if same:
        assert back.cost("w=16", "flops") == truth
    else:
        assert "flops" not in back._profile.costs
        assert back.cost("w=16", "flops", example=x) == truth


def test_the_module_record_skips_bookkeeping(tmp_path):
    """What torch, transformers and sortednet keep under private names describes no forward: the record is the
    same on a model built from its config and on the one ``from_pretrained`` loads (which sets kernel and
    weight-conversion flags), before and after ``sn.wrap``, and on a DDP-style replica flag."""
    transformers = pytest.importorskip("transformers")
    from sortednet.cost import modules_digest

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    built = transformers.LlamaForCausalLM(cfg).eval()
    built.save_pretrained(tmp_path / "m")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    before = modules_digest(built)
    assert modules_digest(loaded) == before
    sn.from_transformers(loaded, ffn=[32], heads=[2])
    assert modules_digest(loaded) == before
    plain = _Private()
    digest = modules_digest(plain)
    plain.a._is_replica = True
    plain.b._is_fsdp_managed_module = True
    assert modules_digest(plain) == digest
    plain.b._requires_grad = False  # (transformers' freeze_feature_encoder(): gradients, not work)
    plain.c.grad_checkpointing = True  # (timm: recompute in the backward)
    assert modules_digest(plain) == digest
    plain.b._snr_steps = 3  # (a setting of one's own whose name starts like ours)
    assert modules_digest(plain) != digest
    del plain.b._snr_steps
    plain.b._stride = 2  # (a setting of one's own under a private name)
    assert modules_digest(plain) != digest
    cfg = transformers.Wav2Vec2Config(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=37, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                                      num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    frozen = transformers.Wav2Vec2ForCTC(cfg)
    frozen.freeze_feature_encoder()
    torch.manual_seed(0)
    assert modules_digest(frozen) == modules_digest(transformers.Wav2Vec2ForCTC(cfg))


def test_a_checkpoint_with_the_third_module_record_loads_its_profile(tmp_path):
    """The record before private settings and long lists counted: a file written with it loads its measured costs
    into the same model, and still warns on a changed activation."""
    import functools

    from sortednet.cost import modules_digest

    class Net(torch.nn.Module):
        def __init__(self, act=torch.nn.ReLU):
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.Sequential(torch.nn.Linear(16, 64), act(), torch.nn.Linear(64, 5))
            self._scale = 2  # (not in record 2)

        def forward(self, x):
            return self.body(x) * self._scale

    assert modules_digest(Net(), record=2) != modules_digest(Net())
    _an_earlier_record_loads(tmp_path, functools.partial(modules_digest, record=2), Net, Net(torch.nn.GELU),
                             sn.Width("w", [16, 32, 64], out="body.0", inp="body.2"))


def _repeating_pretrained_model():
    """A ``PreTrainedModel`` subclass of a user's own whose forward repeats its block ``self._n_repeat`` times."""
    transformers = pytest.importorskip("transformers")

    class RepConfig(transformers.PretrainedConfig):
        model_type = "sn_test_repeat"

        def __init__(self, n_repeat=1, **kw):
            self.n_repeat = n_repeat
            super().__init__(**kw)

    class RepModel(transformers.PreTrainedModel):
        config_class = RepConfig
        _no_split_modules = ["Linear"]  # (a name transformers defines: the instance's copy is bookkeeping)

        def __init__(self, config):
            super().__init__(config)
            self.fc, self.act, self.head = torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16)
            self._n_repeat = config.n_repeat
            self.post_init()

        def forward(self, x):
            for _ in range(self._n_repeat):
                x = self.head(self.act(self.fc(x)))
            return x

    def build(n=1):
        torch.manual_seed(0)
        return RepModel(RepConfig(n_repeat=n))

    return build


def test_the_private_settings_of_a_users_pretrained_model_count(tmp_path):
    """Record 3 left out every private attribute of a ``PreTrainedModel``, a subclass of the user's too: a profile
    measured with ``self._n_repeat = 1`` loaded into the model repeating 3 times kept a third of its FLOPs, and
    ``pick(flops=)`` and ``cost(..., example=x)`` read them. Its own private settings count now; transformers'
    (class fields the instance copies, a loaded model's kernel flags) do not, so the same model loaded with
    ``from_pretrained`` keeps the profile."""
    import functools
    import warnings

    from sortednet.cost import modules_digest

    build = _repeating_pretrained_model()
    assert modules_digest(build(1)) != modules_digest(build(3))
    build(1).save_pretrained(tmp_path / "hf")
    loaded = type(build()).from_pretrained(tmp_path / "hf")
    assert modules_digest(loaded) == modules_digest(build(1))
    x = torch.randn(4, 16)
    nest = sn.wrap(build(1), sn.Width("h", [8, 16], out="fc", inp="head"))
    nest.profile(x, metrics=("params", "flops"), progress=False)
    sn.save(nest, tmp_path / "n.sn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "flops" in sn.load(loaded, tmp_path / "n.sn")._profile.costs
    with pytest.warns(UserWarning, match=r"settings\) differ"):
        back = sn.load(build(3), tmp_path / "n.sn")
    assert set(back._profile.costs) == {"params"}
    assert back.cost(back.largest, "flops", example=x) == 3 * nest.cost(nest.largest, "flops", example=x)
    other = build(1)
    other.act = torch.nn.GELU()
    _an_earlier_record_loads(tmp_path, functools.partial(modules_digest, record=3), build, other,
                             sn.Width("h", [8, 16], out="fc", inp="head"))


def test_a_model_accelerate_prepared_keeps_its_profile_in_a_fresh_one(tmp_path):
    """Accelerate's prepare (every Trainer run) sets ``model._is_accelerate_prepared = True``: record 3 counted it,
    so a profile measured after training dropped its FLOPs on load into the same model built fresh."""
    import warnings

    accelerate = pytest.importorskip("accelerate")
    from sortednet.cost import modules_digest

    build = _repeating_pretrained_model()
    for mk in (build, lambda: torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())):
        prepared = accelerate.Accelerator(cpu=True).prepare(mk())
        assert prepared._is_accelerate_prepared and modules_digest(prepared) == modules_digest(mk())
    nest = sn.wrap(accelerate.Accelerator(cpu=True).prepare(build()), sn.Width("h", [8, 16], out="fc", inp="head"))
    nest.profile(torch.randn(4, 16), metrics=("params", "flops"), progress=False)
    sn.save(nest, tmp_path / "n.sn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "flops" in sn.load(build(), tmp_path / "n.sn")._profile.costs


def test_hub_tags_are_not_a_setting(tmp_path):
    """``PreTrainedModel.add_model_tags`` (TRL's trainers call it) sets ``model_tags`` on the model: it counted as a
    setting, so a checkpoint of a tagged model lost its measured FLOPs and latency on load into the same model
    untagged."""
    transformers = pytest.importorskip("transformers")
    import warnings

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    tagged = transformers.LlamaForCausalLM(cfg).eval()
    tagged.add_model_tags(["trl", "sft"])
    nest = sn.from_transformers(tagged, ffn=[32])
    nest.profile(torch.randint(0, 64, (1, 8)), progress=False, repeat=1, warmup=0)
    sn.save(nest, tmp_path / "n.sn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = sn.load(transformers.LlamaForCausalLM(cfg).eval(), tmp_path / "n.sn")
    assert back.cost(back.largest, "flops") == nest.cost(nest.largest, "flops")


def test_load_into_a_compiled_model_names_the_model_it_compiles(tmp_path, fresh_dynamo):
    """sn.load of a torch.compile wrapper failed on the file's patterns ("'0' is not a module path ... nearby
    '_orig_mod.0'"); it says where to load now, before anything changes, and loading there runs the nest through
    the compiled object."""
    def mk():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    nest = sn.wrap(mk(), sn.Width("w", [4, 8], out="0", inp="2"))
    with torch.no_grad():
        nest.model[0].weight.mul_(2)
    sn.save(nest, tmp_path / "a.sn")
    compiled = torch.compile(mk(), backend="eager")
    before = {k: v.clone() for k, v in compiled.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"sn.load\(obj._orig_mod, path\)"):
        sn.load(compiled, tmp_path / "a.sn")
    assert all(torch.equal(before[k], v) for k, v in compiled.state_dict().items())
    back = sn.load(compiled._orig_mod, tmp_path / "a.sn")
    wrapped = torch.compile(back.model, backend="eager")  # (wrapped, then compiled: the advice names its nest)
    with pytest.raises(sn.SortedNetError, match=r"sn.load\(sn.Nest.of\(obj._orig_mod\), path\)"):
        sn.load(wrapped, tmp_path / "a.sn")
    assert sn.load(sn.Nest.of(wrapped._orig_mod), tmp_path / "a.sn") is back
    x = torch.randn(3, 4)
    for sub in ("w=4", "w=8"):
        with back.use(sub):
            got = compiled(x)
        with nest.use(sub):
            assert torch.allclose(got, nest.model(x), atol=1e-6)


def test_a_nest_of_a_compiled_model_saves_and_loads_as_before(tmp_path, fresh_dynamo):
    """The refusal above must not catch a nest built around the compile wrapper (its file's paths hold
    '_orig_mod.'): it loads into an identical nest and into a fresh compile wrapper, as it did."""
    def mk():
        torch.manual_seed(0)
        return torch.compile(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                             backend="eager")

    def dim():
        return sn.Width("h", [4, 8], out="_orig_mod.0", inp="_orig_mod.2")

    nest = sn.wrap(mk(), dim())
    with torch.no_grad():
        nest.model._orig_mod[0].weight.mul_(2)
    sn.save(nest, tmp_path / "a.sn")
    x = torch.randn(2, 4)
    for back in (sn.load(sn.wrap(mk(), dim()), tmp_path / "a.sn"), sn.load(mk(), tmp_path / "a.sn")):
        for sub in ("h=4", "h=8"):
            with back.use(sub), nest.use(sub):
                assert torch.equal(back.model(x), nest.model(x))


@contextlib.contextmanager
def _held_in_thread(block):
    """``block`` (a ``nest.use``) entered in another thread, held open until the with-block ends."""
    import threading

    entered, go = threading.Event(), threading.Event()

    def hold():
        with block:
            entered.set()
            go.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        entered.wait(30)
        yield
    finally:
        go.set()
        t.join()


def test_a_load_while_another_thread_serves_a_sub_model_is_refused_before_any_copy(tmp_path):
    """sn.load into a nest while a request ran in another thread: the request finished on a mix of the old and the
    new weights (an output of neither). Refused now, with nothing changed, also where both threads entered one Use
    object and for a task started inside its parent's open block; in the thread's own block it loads."""
    import asyncio

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).eval()
    nest = sn.wrap(model, sn.Width("h", [16, 64], out="0", inp="2"))
    path = tmp_path / "m.safetensors"
    sn.save(nest, path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with _held_in_thread(nest.use("h=16")):
        with pytest.raises(sn.SortedNetError, match=r"while a nest.use\(h=16\) block is open in another thread"):
            sn.load(nest, path)
    shared = nest.use("h=16")  # (one Use object in two threads: open for unwrap, but counted as this thread's own)
    with _held_in_thread(shared), shared, pytest.raises(sn.SortedNetError, match="open in another thread or task"):
        sn.load(nest, path)

    async def parent():  # a task started inside its parent's open block inherits it: not the loader's own
        with nest.use("h=16"):
            return await asyncio.get_running_loop().create_task(_load_in_task(nest, path))

    with pytest.raises(sn.SortedNetError, match="block is open in another thread or task"):
        asyncio.run(parent())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with nest.use("h=16"):  # (this thread's own block: no request in flight)
        sn.load(nest, path)
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


async def _load_in_task(nest, path):
    sn.load(nest, path)


class _TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 16)
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


def test_a_state_copied_name_by_name_keeps_the_models_ties(tmp_path):
    """sn.save(state={k: v.clone()}) (or .cpu() of a GPU model) stored each tied name apart: no load, not even
    into the nest that wrote the file, took it. The names the model ties are stored as one again; a state whose
    tied names differ is refused."""
    torch.manual_seed(0)
    model = _TiedLM()
    nest = sn.wrap(model, sn.Width("w", [8, 16, 32], out="fc1", inp="fc2"))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sn.save(nest, tmp_path / "c.safetensors", state=state)
    torch.manual_seed(1)
    back = sn.load(_TiedLM(), tmp_path / "c.safetensors")
    assert back.model.head.weight is back.model.emb.weight
    ids = torch.randint(0, 10, (3, 5))
    with torch.no_grad(), nest.use("w=8"), back.use("w=8"):
        assert torch.equal(back.model(ids), model(ids))
    sn.load(nest, tmp_path / "c.safetensors")
    state["head.weight"] = state["head.weight"] + 1
    with pytest.raises(sn.SortedNetError, match=r"holds \['emb.weight', 'head.weight'\] as one shared \(tied\) "
                                                r"tensor, but the state gives"):
        sn.save(nest, tmp_path / "d.safetensors", state=state)
    assert not (tmp_path / "d.safetensors").exists()


def test_a_state_of_a_deep_copy_is_refused_and_the_copy_itself_named(tmp_path):
    """sn.save(nest, path, state=ema.state_dict()) wrote the EMA's weights beside the nest's calibrated statistics
    and profile scores, marked fresh: loaded, a sub-model computed with statistics of other weights (3.6 off)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", norm="1", inp="2"))
    ema = copy.deepcopy(model)
    nest.calibrate([torch.randn(16, 4)])
    with pytest.raises(sn.SortedNetError, match=r"are tensors of a deep copy of the model .* sn.save\(copy, path\)"):
        sn.save(nest, tmp_path / "c.safetensors", state=ema.state_dict())
    sn.save(ema, tmp_path / "c.safetensors")   # (what the message names)
    sn.save(nest, tmp_path / "d.safetensors", state=model.state_dict())


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("state", ["ema_clone", "optimizer_state"])
def test_a_state_that_is_not_the_models_own_is_refused_and_nothing_written(state, ranks, tmp_path, monkeypatch):
    """sn.save(nest, path, state={k: ema_v.clone()}) (an EMA's weights cloned into a dict: no storage of a deep
    copy to recognise) wrote them beside the nest's calibrated statistics and profile scores, marked fresh. Where
    the model holds no shard the model's own values are at hand: a state holding others is refused (on several
    processes too: DDP's replicas are plain tensors, and were not compared). An optimizer's state dict given as
    state= is named as such."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", norm="1", inp="2"))
    nest.calibrate([torch.randn(16, 4)])
    if ranks > 1:  # (calibrated in one process, then trained with DDP: saved on rank 0)
        import torch.distributed as dist

        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: ranks)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    if state == "ema_clone":
        given = {k: v.detach().clone() * (0.5 if k == "2.weight" else 1) for k, v in model.state_dict().items()}
        match = r"sn.save\(state=\): '2.weight' holds other values than the model's .* sn.save\(copy, path\)"
    else:
        given = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
        match = r"\['state', 'param_groups'\] are not tensors: state= takes the model's own state_dict.*torch.save"
    with pytest.raises(sn.SortedNetError, match=match):
        sn.save(nest, tmp_path / "c.safetensors", state=given)
    assert not (tmp_path / "c.safetensors").exists()
    nan = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].bias[0] = float("nan")  # (NaN where the model holds NaN: its own values)
    nan["0.bias"][0] = float("nan")
    sn.save(nest, tmp_path / "d.safetensors", state=nan)


@pytest.mark.parametrize("into", ["model", "copy"])
def test_loading_into_a_wrapped_model_names_the_nest_to_load_into(into, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="1"))
    sn.save(nest, tmp_path / "c.safetensors")
    target = model if into == "model" else copy.deepcopy(model)
    match = r"load into that nest, sn.load\(sn.Nest.of\(model\), path\)" if into == "model" else \
        r"deep copy of a wrapped model .* copy.load_state_dict"
    with pytest.raises(sn.SortedNetError, match=match):
        sn.load(target, tmp_path / "c.safetensors")
    assert sn.load(sn.Nest.of(model), tmp_path / "c.safetensors") is nest


def test_a_state_with_nan_in_tied_weights_saves():
    """The tie check compared the tied names' values with torch.equal, for which NaN differs from itself: a
    diverged run's state, saved to debug it, was refused as untied."""
    torch.manual_seed(0)
    model = _TiedLM()
    nest = sn.wrap(model, sn.Width("w", [8, 16, 32], out="fc1", inp="fc2"))
    with torch.no_grad():
        model.emb.weight[0, 0] = float("nan")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        sn.save(nest, os.path.join(d, "c.safetensors"), state={k: v.clone() for k, v in model.state_dict().items()})
        back = sn.load(_TiedLM(), os.path.join(d, "c.safetensors"))
        assert back.model.head.weight is back.model.emb.weight and back.model.emb.weight[0, 0].isnan()


class _Holder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner


@pytest.mark.parametrize("target", ["holder", "inside", "holder_of_copy"])
def test_loading_into_a_module_holding_or_inside_a_wrapped_model_names_what_it_is(target, tmp_path):
    """sn.load into a module that holds the wrapped model (DataParallel's .module, a wrapper of one's own) or sits
    inside it was told it was 'a deep copy'; sn.save names these as they are, and so does load."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="1"))
    sn.save(nest, tmp_path / "c.safetensors")
    obj, match = {"holder": (_Holder(model), r"this _Holder holds a wrapped model at 'inner'; load into its nest, "
                                              r"sn.load\(sn.Nest.of\(obj.inner\), path\)"),
                  "inside": (model[0], r"inside the model of Nest.*load the whole checkpoint into the nest"),
                  "holder_of_copy": (_Holder(copy.deepcopy(model)), r"this _Holder holds a deep copy of a wrapped "
                                                                    r"model .* at 'inner'.*obj.inner.load_state_dict")
                  }[target]
    with pytest.raises(sn.SortedNetError, match=match):
        sn.load(obj, tmp_path / "c.safetensors")

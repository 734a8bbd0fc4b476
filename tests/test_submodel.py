"""SubModel (parse/format, hashing, nesting order, immutability) and switching
sub-models: use() / activate() semantics (invariant 6) and zero-copy switching."""

from __future__ import annotations

import pickle
import string

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import sortednet as sn
from models import FAMILIES, case_params, run
from sortednet import SubModel, slicers

FAMS = sorted(FAMILIES)
names = st.text(string.ascii_lowercase + "_", min_size=1, max_size=6)
sizes_dicts = st.dictionaries(names, st.integers(1, 4096), min_size=1, max_size=5)


@given(sizes_dicts)
def test_parse_and_str_round_trip(d):
    s = SubModel(d)
    assert SubModel.parse(str(s)) == s
    assert str(SubModel.parse(str(s))) == str(s)            # order kept for printing
    assert SubModel.parse(" , ".join(f" {k} = {v} " for k, v in d.items())) == s
    assert pickle.loads(pickle.dumps(s)) == s and repr(s) == f"SubModel({s})"
    assert f"{s:>40}" == f"{str(s):>40}" and f"{s}" == str(s)  # (a width spec raised a raw TypeError)


@given(sizes_dicts, st.randoms())
def test_hash_and_equality_ignore_order_and_match_dicts(d, rnd):
    items = list(d.items())
    rnd.shuffle(items)
    a, b = SubModel(d), SubModel(dict(items))
    assert a == b and hash(a) == hash(b) and a == d and d == a
    assert {a: 1}[b] == 1 and len({a, b}) == 1
    changed = {**d, next(iter(d)): d[next(iter(d))] + 1}
    assert a != SubModel(changed) and a != changed
    assert a.to_dict() == d and dict(a) == d and len(a) == len(d)


@given(st.lists(st.tuples(*[st.integers(1, 4)] * 3), min_size=3, max_size=3))
def test_nested_in_is_a_partial_order(triples):
    a, b, c = (SubModel(x=p, y=q, z=r) for p, q, r in triples)
    assert a.nested_in(a)
    if a.nested_in(b) and b.nested_in(a):
        assert a == b
    if a.nested_in(b) and b.nested_in(c):
        assert a.nested_in(c)
    assert a.nested_in(b) == all(a[k] <= b[k] for k in a)
    assert not a.nested_in({"x": 4, "y": 4})                 # different dimensions: not comparable
    assert a.nested_in(str(b)) == a.nested_in(b)             # (its text too: was an AttributeError)
    with pytest.raises(sn.SortedNetError, match="nested_in"):
        a.nested_in(4)


def test_submodel_is_immutable():
    s = SubModel(ffn=4)
    with pytest.raises(AttributeError):
        s.ffn = 8
    with pytest.raises(TypeError):
        s["ffn"] = 8  # type: ignore[index]
    assert not hasattr(s, "__dict__")
    assert s.replace(ffn=8) == {"ffn": 8} and s == {"ffn": 4}


@pytest.mark.parametrize("bad", ["ffn", "ffn=", "=4", "ffn=4,ffn=8", "ffn=a", "ffn=4;depth=2", "ffn=1.5"])
def test_parse_rejects(bad):
    with pytest.raises(sn.SortedNetError, match="cannot parse"):
        SubModel.parse(bad)


@pytest.mark.parametrize("bad", [{"ffn": "4"}, {"ffn": True}, {"": 4}, {3: 4}, {"ffn": 4.0}, {"ffn": np.float64(4)},
                                 {"ffn": torch.tensor(4.0)}, {"ffn": np.bool_(True)}, {"ffn": torch.tensor(True)},
                                 {"ffn": np.array(True)}, "ffn=4", 5, [("ffn",)], {"ffn": np.array([4])},
                                 {"ffn": torch.tensor([4])}, {"ffn": torch.tensor([[4]])}])
def test_constructor_rejects(bad):
    with pytest.raises(sn.SortedNetError):
        SubModel(bad)


def test_a_dimension_given_twice_is_refused():
    """``SubModel({"h": 2}, h=4)`` built h=4 in silence (dict(mapping, **keywords): the keyword wins), while
    ``parse("h=2,h=4")`` refused; both refuse now, naming the dimension and both sizes."""
    with pytest.raises(sn.SortedNetError, match=r"dimension 'h' given twice, 2 in the mapping and 4 as a keyword"):
        SubModel({"h": 2}, h=4)
    with pytest.raises(sn.SortedNetError, match="given twice"):
        SubModel.parse("h=2,h=4")
    assert SubModel({"h": 2}, g=4) == SubModel(h=2, g=4)
    with pytest.raises(sn.SortedNetError, match=r"dimension 'h' given twice, \[2, 4\]"):
        SubModel([("h", 2), ("h", 4)])  # (pairs: dict(pairs) kept the last in silence)
    assert SubModel([("h", 2), ("g", 4)]) == SubModel(h=2, g=4)
    with pytest.raises(sn.SortedNetError, match="takes a mapping"):
        SubModel(torch.tensor([1, 2]))  # (a raw RuntimeError from the tensor's truth value)


@given(n=st.integers(1, 2**40), kind=st.sampled_from([np.int64, np.int32, np.uint16, torch.tensor]))
def test_numpy_and_torch_integers_are_sizes(n, kind):
    """Integer scalars of numpy / torch (``np.arange`` sizes, a size read from a tensor) count as ints: stored
    as plain ints, equal and hashed as those."""
    if kind is np.int32:
        n = min(n, 2**31 - 2)
    if kind is np.uint16:
        n = min(n, 2**16 - 2)
    s = SubModel({"ffn": kind(n)})
    assert type(s["ffn"]) is int and s == SubModel(ffn=n) and hash(s) == hash(SubModel(ffn=n))
    w = sn.Width("h", [kind(n), kind(n + 1)], out="a")
    assert w.sizes == (n, n + 1) and all(type(v) is int for v in w.sizes)
    with pytest.raises(sn.SortedNetError, match="not an int"):
        sn.Width("h", [1.0 * n], out="a")


# -- use() / activate() -------------------------------------------------------
def wrapped(family, kw):
    c = FAMILIES[family](**kw)
    return c, sn.wrap(c.model, *c.dims)


@pytest.mark.parametrize("family", FAMS)
@given(data=st.data())
def test_use_restores_even_when_the_body_raises(family, data):
    c, nest = wrapped(family, data.draw(case_params(family)))
    a, b, d = (data.draw(st.sampled_from(nest.submodels)) for _ in range(3))
    outs = {}
    for s in {a, b, d, nest.largest}:
        with nest.use(s):
            outs[s] = run(c.model, c.example)
    assert nest.active == nest.largest
    with nest.use(a) as got:
        assert got == a and nest.active == a
        with nest.use(str(b)):                               # nested, string form
            assert nest.active == b and torch.equal(run(c.model, c.example), outs[b])
            with pytest.raises(KeyError):
                with nest.use(dict(d)):
                    assert nest.active == d
                    raise KeyError("boom")
            assert nest.active == b
        assert nest.active == a and torch.equal(run(c.model, c.example), outs[a])
    assert nest.active == nest.largest
    assert torch.equal(run(c.model, c.example), outs[nest.largest])


@pytest.mark.parametrize("family", FAMS)
@given(data=st.data())
def test_activate_is_sticky_and_use_overrides_it(family, data):
    c, nest = wrapped(family, data.draw(case_params(family)))
    a, b, d = (data.draw(st.sampled_from(nest.submodels)) for _ in range(3))
    assert nest.activate(a) == a and nest.active == a
    with nest.use(a):
        out_a = run(c.model, c.example)
    assert torch.equal(run(c.model, c.example), out_a)      # sticky default, no context needed
    with nest.use(b):
        assert nest.active == b
        nest.activate(d)                                     # changes the default, not this block
        assert nest.active == b
    assert nest.active == d
    with pytest.raises(RuntimeError):
        with nest.use(a):
            raise RuntimeError
    assert nest.active == d
    nest.activate(nest.largest)
    assert nest.active == nest.largest


# -- switching copies no tensor ------------------------------------------------
class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, out))
        return out


def tensor_attrs(model):
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        path, _, attr = name.rpartition(".")
        yield name, p, getattr(model.get_submodule(path), attr)


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("grad", [False, True, "hooks"])
def test_switching_copies_no_tensor(family, grad, monkeypatch):
    if grad == "hooks":                                      # training views with slice-gradient hooks
        monkeypatch.setattr(slicers, "INPLACE_MIN_NUMEL", 0)
    grad = bool(grad)
    c, nest = wrapped(family, {})
    ptrs = {n: p.data_ptr() for n, p in c.model.state_dict(keep_vars=True).items()}
    for sub in nest.submodels:
        with torch.set_grad_enabled(grad):
            with OpLog() as log:
                with nest.use(sub):
                    pass
                nest.activate(sub)
                nest.activate(nest.largest)
            assert log.ops == [], f"switching ran tensor ops: {log.ops[:3]}"
            with nest.use(sub), OpLog() as log:
                views = list(tensor_attrs(c.model))
        for name, p, v in views:
            if name.endswith(("in_proj_weight", "in_proj_bias")) and v.numel() < p.numel():
                assert v.numel() < p.numel()                 # packed q/k/v: the active heads only
                continue
            assert v.untyped_storage().data_ptr() == p.untyped_storage().data_ptr(), f"{name} copied"
        for func, out in log.ops:
            if isinstance(out, torch.Tensor) and not func._schema.is_mutable:
                assert "cat" in str(func) or func.is_view or out.untyped_storage().data_ptr() in {
                    p.untyped_storage().data_ptr() for _, p, _ in views}, f"{func} allocated {tuple(out.shape)}"
    assert {n: p.data_ptr() for n, p in c.model.state_dict(keep_vars=True).items()} == ptrs


def test_constructor_takes_pairs_as_dict_does():
    assert SubModel(zip(["ffn", "depth"], [8, 2])) == SubModel([("ffn", 8), ("depth", 2)]) == {"ffn": 8, "depth": 2}
    assert SubModel(SubModel(ffn=4).items(), depth=1) == {"ffn": 4, "depth": 1}


def test_a_sub_model_list_concatenates_with_lists_into_a_plain_list():
    """``[nest.smallest] + nest.submodels[1:]`` raised a raw TypeError (a SubModelList is not a list)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Width("h", [2, 4, 8], out="0", inp="1"))
    subs = list(nest.submodels)
    assert [nest.smallest] + nest.submodels[1:] == subs
    assert nest.submodels[:2] + [nest.largest] == subs
    assert nest.submodels[:1] + nest.submodels[1:] == subs
    assert (nest.smallest,) + nest.submodels[1:] == subs
    assert isinstance(nest.submodels[:1] + nest.submodels[1:], list)
    with pytest.raises(TypeError):
        nest.submodels + 3


@pytest.mark.parametrize("form", ["h=4,d=2", {"d": 2, "h": 4}, sn.SubModel(h=4, d=2)])
def test_of_reads_a_submodel_a_mapping_or_its_text_and_refuses_the_rest(form):
    assert sn.SubModel.of(form) == sn.SubModel(h=4, d=2)
    for bad in (4, ["h=4"], None):
        with pytest.raises(sn.SortedNetError, match=r"where: a sub-model is a SubModel, a \{dimension: size\} dict"):
            sn.SubModel.of(bad, "where")


@pytest.mark.parametrize("size", [4.0, np.float32(4), torch.tensor(4.0), True, "4"])
def test_a_size_that_is_no_integer_is_in_no_list_as_resolve_says(size):
    """``{"h": 4.0} in nest.submodels`` and ``.index`` found a float size that ``resolve`` refuses ("has no size
    4.0"): the list and resolve agree now. Integer scalars of numpy and torch stay sizes."""
    nest = sn.wrap(torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 2)),
                   sn.Width("h", [4, 8], out="0", inp="1"))
    assert {"h": size} not in nest.submodels and nest.submodels.count({"h": size}) == 0
    assert nest.submodels[0] != {"h": size} and {"h": size} not in list(nest.submodels)  # (== agrees: a dict
    #                                                                   compared 4 == 4.0 and 1 == True)
    with pytest.raises(sn.SortedNetError):
        nest.submodels.index({"h": size})
    with pytest.raises(sn.SortedNetError):
        nest.resolve({"h": size})
    for ok in (4, np.int64(4), torch.tensor(4)):
        assert nest.submodels[0] == {"h": ok} and {"h": ok} in list(nest.submodels)
        assert {"h": ok} in nest.submodels and nest.submodels.index({"h": ok}) == 0 == \
            nest.submodels.index(nest.resolve({"h": ok}))

"""Invariant 5: wrapping keeps state_dict keys, Parameter objects and
isinstance; unwrap restores classes with bit-identical weights; sn.save /
sn.load round-trip every sub-model bit-exactly."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sortednet as sn
from models import FAMILIES, case_params, run
from sortednet.meta import exact_spec

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

"""A nest restricted with ``wrap(..., submodels=[...])`` serves and exports only those sub-models;
the same dimension passed twice and a Heads size that disagrees with the module's own head count are
refused at wrap time, before anything changes (invariants 9 and 13)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sortednet as sn
from models import FAMILIES, Attention, assert_unchanged, snapshot


def _forms(sub: sn.SubModel) -> list:
    return [sub, dict(sub), str(sub)]


@settings(max_examples=15, deadline=None)
@given(family=st.sampled_from(["mlp", "lm_width_heads_depth", "tied_lm"]), data=st.data())
def test_restricted_nest_refuses_unlisted_submodels(family, data):
    probe = FAMILIES[family]()
    every = list(sn.wrap(probe.model, *probe.dims).submodels)
    listed = data.draw(st.lists(st.sampled_from(every), min_size=1, max_size=len(every) - 1, unique=True))
    case = FAMILIES[family]()
    nest = sn.wrap(case.model, *case.dims, submodels=listed)
    assert set(nest.submodels) == set(listed)
    outside = [s for s in every if s not in set(listed)]
    full = every[-1]  # (the model as it was, which runs outside use: use and activate take it, listed or not)
    assert all(full[d.name] == d.full for d in nest.dims)
    for sub in data.draw(st.lists(st.sampled_from(outside), min_size=1, max_size=3, unique=True)):
        for form in _forms(sub):
            with pytest.raises(sn.SortedNetError, match="restricted"):
                nest.export(form)
            if sub == full:
                with nest.use(form) as got:
                    assert got == full and nest.active == full
                assert nest.activate(form) == full
                continue
            with pytest.raises(sn.SortedNetError, match="not one of the .* sub-models this nest was restricted to"):
                with nest.use(form):
                    pass
            with pytest.raises(sn.SortedNetError, match="restricted"):
                nest.activate(form)
    for sub in listed:
        for form in _forms(sub):
            with nest.use(form) as got:
                assert got == sub and nest.active == sub
        assert sum(p.numel() for p in nest.export(sub).parameters()) == nest.cost(sub)


def test_a_restricted_nest_that_leaves_the_full_model_out_can_activate_its_default_again():
    """Outside ``use`` a restricted nest runs the full model, listed or not; after ``activate(listed)`` nothing
    got back there (``activate(previous)`` and ``use(nest.active)`` refused it as unlisted). ``use`` and
    ``activate`` take the full model; export, cost and pick keep to the list."""
    case = FAMILIES["mlp"]()
    x = case.example
    with torch.no_grad():
        want = case.model(x)
    nest = sn.wrap(case.model, *case.dims, submodels=["h1=4,h2=4", "h1=8,h2=12"])
    before = nest.active
    assert all(before[d.name] == d.full for d in nest.dims)
    with nest.use(nest.active):
        pass
    nest.activate("h1=4,h2=4")
    with torch.no_grad():
        assert not torch.allclose(case.model(x), want)
    assert nest.activate(before) == before and nest.active == before
    with torch.no_grad():
        torch.testing.assert_close(case.model(x), want)
    with pytest.raises(sn.SortedNetError, match="restricted"):
        nest.export(before)


def test_restricted_message_lists_allowed_submodels():
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims, submodels=["h1=4,h2=4", "h1=16,h2=12"])
    with pytest.raises(sn.SortedNetError, match=r"h1=4,h2=4.*h1=16,h2=12|h1=16,h2=12.*h1=4,h2=4"):
        nest.export("h1=8,h2=12")


def test_same_dimension_twice_is_refused_before_anything_changes():
    case = FAMILIES["mlp"]()
    before = snapshot(case.model)
    with pytest.raises(sn.SortedNetError, match="passed to wrap\\(\\) twice"):
        sn.wrap(case.model, case.dims[0], *case.dims)
    assert_unchanged(case.model, before)
    nest = sn.wrap(case.model, *case.dims)                    # the same dimensions, once each: fine
    assert len(nest.submodels) == len(case.dims[0].sizes) * len(case.dims[1].sizes)


class Block12(torch.nn.Module):
    """Hand-written attention with num_heads=4 over 12 features (head size 3)."""

    def __init__(self):
        super().__init__()
        self.attn = Attention(12, 4)

    def forward(self, x):
        return self.attn(x)


@pytest.mark.parametrize("sizes", [[1, 2, 3], [2, 6], [3, 12]])
def test_heads_sizes_disagreeing_with_the_modules_head_count_are_refused(sizes):
    torch.manual_seed(0)
    model = Block12()
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=rf"'attn'.*num_heads=4.*largest size {sizes[-1]}"):
        sn.wrap(model, sn.Heads("heads", sizes, attn="attn"))
    assert_unchanged(model, before)


class _HeadSizeOnly(torch.nn.Module):
    """Llama-style attention that keeps its head size, not its head count."""

    def __init__(self, width=16, heads=4):
        super().__init__()
        self.head_dim = width // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("sizes", [[2, 4, 8], [8], [2, 16]])
def test_heads_sizes_disagreeing_with_the_modules_head_size_are_refused(sizes):
    """A module without a head count attribute took more declared heads than it has: 'heads=2' of Heads([2, 4, 8])
    ran one of its 4-wide heads, a mislabelled sub-model in every table."""
    torch.manual_seed(0)
    model = _HeadSizeOnly()
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=rf"head size head_dim=4 differs from the head size {16 // sizes[-1]} "
                                               r".*count_attrs="):
        sn.wrap(model, sn.Heads("heads", sizes, attn=""))
    assert_unchanged(model, before)
    nest = sn.wrap(model, sn.Heads("heads", [1, 2, 4], attn=""))
    x = torch.randn(2, 3, 16)
    with torch.no_grad(), nest.use("heads=2"):
        assert model.q_proj.weight.shape == (8, 16)
        torch.testing.assert_close(nest.export("heads=2")(x), model(x))


def test_a_head_size_attribute_of_another_meaning_is_not_taken_for_the_head_size():
    """The whole width under a head-size name (Lxmert's head_size = heads x head size) is not a per-head size;
    count_attrs= states the module's attributes, so an unrelated one can be passed over."""
    model = _HeadSizeOnly()
    model.head_size = 16
    sn.wrap(model, sn.Heads("heads", [2, 4], attn=""))
    model = _HeadSizeOnly()
    model.d_head = 8  # (an attribute of another meaning under a head-size name)
    with pytest.raises(sn.SortedNetError, match="d_head=8"):
        sn.wrap(model, sn.Heads("heads", [2, 4], attn=""))
    sn.wrap(model, sn.Heads("heads", [2, 4], attn="", count_attrs=()))


def test_heads_sizes_matching_the_head_count_are_accepted():
    torch.manual_seed(0)
    model = Block12()
    nest = sn.wrap(model, sn.Heads("heads", [1, 2, 4], attn="attn"))
    with nest.use("heads=2"):
        assert model.attn.num_heads == 2 and model.attn.q.weight.shape == (6, 12)


def test_check_names_the_largest_listed_submodel_not_the_full_model():
    """A restricted nest's largest sub-model is not the full model: a failing check says which it ran."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    nest = sn.wrap(model, sn.Width("w", [4, 8, 16], out="0", inp="2"), submodels=[{"w": 4}, {"w": 8}])
    with pytest.raises(sn.SortedNetError, match=r"the largest listed sub-model \(w=8\) does not run"):
        nest.check(torch.randn(3, 9))

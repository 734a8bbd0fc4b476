"""The user's model and state stay whole: one nest per model tree, unwrap that changes nothing until it
cannot fail, copies that never get stuck on a sub-model, sorting that carries gradients and optimizer
state along, checkpoints and generator states that are checked before anything changes."""

from __future__ import annotations

import copy
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sortednet as sn
from models import assert_unchanged, snapshot
from sortednet.importance import sort_units
from sortednet.rng import rng_state, set_rng_state


def _two_blocks():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)),
                         nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))


def test_a_nest_inside_another_nests_model_is_refused_and_unwrap_restores_only_its_own_modules():
    m = _two_blocks()
    outer = sn.wrap(m, sn.Width("a", [4, 16], out="0.0", inp="0.2"))
    before = snapshot(m[1])
    with pytest.raises(sn.SortedNetError, match="'1' of a model another nest wraps"):
        sn.wrap(m[1], sn.Width("b", [4, 16], out="0", inp="2"))
    assert_unchanged(m[1], before)
    outer.unwrap()
    inner = sn.wrap(m[1], sn.Width("b", [4, 16], out="0", inp="2"))  # once the outer nest is gone: fine
    other = sn.wrap(m[0], sn.Width("a", [4, 16], out="0", inp="2"))  # a sibling tree: its own nest
    other.unwrap()
    assert type(m[1][0]) is not nn.Linear and type(m[0][0]) is nn.Linear  # the sibling's unwrap left it alone
    with inner.use("b=4"):
        assert m[1][0].weight.shape == (4, 8)
    inner.unwrap()


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rank_svd_unwrap_follows_the_models_dtype(dtype, merge):
    """The weight a Rank(svd) target set aside comes back in the model's current dtype (model.to after wrap)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    w = m[0].weight
    nest = sn.wrap(m, sn.Rank("r", [2, 8], targets="0", mode="svd"))
    m.to(dtype)
    with torch.no_grad():
        merged = m[0].U @ m[0].V
    nest.unwrap(merge=merge)
    assert m[0].weight is w and {p.dtype for p in m.parameters()} == {dtype}
    if merge:
        torch.testing.assert_close(m[0].weight.detach(), merged)
    m(torch.randn(2, 8, dtype=dtype))  # runs: no mixed dtypes left


def test_unwrap_computes_everything_before_it_changes_anything():
    """On the meta device merging cannot copy into the float weights set aside: nothing is half-restored."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    nest = sn.wrap(m, sn.Rank("r", [2, 8], targets=["2", "4"], mode="svd"))
    m.to("meta")
    nest.unwrap(merge=True)
    assert [type(x) for x in m] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert all(p.is_meta for p in m.parameters()) and list(m.state_dict()) == [
        f"{i}.{n}" for i in (0, 2, 4) for n in ("weight", "bias")]


def test_a_deep_copy_runs_the_full_model_after_unwrap_and_unwrap_copy_restores_it():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ref = copy.deepcopy(m)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    ema = copy.deepcopy(m)
    nest.activate("h=4")
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert ema(x).shape == (3, 4) and ema[0].weight.shape == (4, 8)  # follows the nest
        nest.unwrap()
        torch.testing.assert_close(ema(x), ref(x))  # not stuck on h=4
    with pytest.raises(sn.SortedNetError, match="nest.unwrap"):
        nest.unwrap_copy(m)
    assert nest.unwrap_copy(ema) is ema and [type(x) for x in ema] == [nn.Linear, nn.ReLU, nn.Linear]
    pickle.dumps(ema)
    with pytest.raises(sn.SortedNetError, match="not a copy of this nest's model"):
        nest.unwrap_copy(nn.Linear(2, 2))


def _trained(sort: bool, optimizer_kw: bool, optimizer: type = torch.optim.Adam):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    opt = optimizer(m.parameters(), lr=1e-2)
    for _ in range(5):
        sn.accumulate(nest, [nest.smallest, nest.largest], lambda: F.cross_entropy(m(x), y))
        opt.step()
        opt.zero_grad()
    F.cross_entropy(m(x), y).backward()  # a pending gradient, as mid-accumulation
    if sort:
        sort_units(nest, "l1", example=x, **({"optimizer": opt} if optimizer_kw else {}))
    opt.step()
    with torch.no_grad():
        return m(x)


def test_sort_units_carries_gradients_and_optimizer_state_with_the_units():
    """Sorting between steps is function-preserving for the whole run, not only the weights: the pending
    .grad and Adam's moments follow the permutation (passed as optimizer=)."""
    unsorted = _trained(False, False)
    torch.testing.assert_close(_trained(True, True), unsorted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_trained(True, False), unsorted, atol=1e-4)  # moments left behind: another step


def test_sort_units_undoes_the_permutation_when_anything_fails(monkeypatch):
    import sortednet.importance as imp

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    x = torch.randn(4, 8)
    before = snapshot(m)
    real, calls = imp.call_model, [0]

    def flaky(model, example):
        calls[0] += 1
        if calls[0] == 3:  # the verification forward after permuting
            raise KeyboardInterrupt
        return real(model, example)

    monkeypatch.setattr(imp, "call_model", flaky)
    with pytest.raises(KeyboardInterrupt):
        sort_units(nest, "l1", example=x)
    assert_unchanged(m, before)


def test_checkpoints_refuse_what_could_never_load(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    path = tmp_path / "n.safetensors"
    state = dict(m.state_dict())
    for bad, needle in [({**state, "0.weight": torch.zeros(3)}, "'0.weight' is \\[3\\]"),
                        ({k: v for k, v in state.items() if k != "2.bias"}, "missing keys \\['2.bias'\\]"),
                        ({**state, "x": 1}, "not tensors"), ([1, 2], "a state_dict")]:
        with pytest.raises(sn.SortedNetError, match=needle):
            sn.save(nest, path, state=bad)
        assert not os.path.exists(path)
    for bad in (None, b"n.safetensors", 3):
        with pytest.raises(sn.SortedNetError, match="path"):
            sn.save(nest, bad)
    m.to("meta")
    with pytest.raises(sn.SortedNetError, match="meta device"):
        sn.save(nest, path)


def test_a_nest_is_never_copied_or_pickled_but_its_dimensions_are():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    dim = sn.Width("h", [4, 16], out="0", inp="2")
    nest = sn.wrap(m, dim)
    for action in (lambda: copy.deepcopy(nest), lambda: pickle.dumps(nest)):
        with pytest.raises(sn.SortedNetError, match="Nest cannot be"):
            action()
    back = pickle.loads(pickle.dumps(dim))
    assert back.spec() == dim.spec() and back is not dim
    sn.wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), back)  # a fresh, unbound dimension


def test_stored_profile_numbers_beyond_any_cost_are_refused():
    from sortednet.meta import _numbers

    with pytest.raises(sn.SortedNetError, match="digits"):
        _numbers([10**400], 1, "'params' costs", "f")


def test_set_rng_state_changes_no_generator_when_a_part_is_bad():
    state = rng_state()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    now = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    for broken in ({**state, "numpy": {**state["numpy"], "keys": torch.zeros(3, dtype=torch.int64)}},
                   {**state, "python": {**state["python"], "internal": [1, 2]}}):
        with pytest.raises(sn.SortedNetError):
            set_rng_state(broken)
        assert torch.equal(torch.get_rng_state(), now[0]) and (np.random.get_state()[1] == now[1]).all()
        assert random.getstate() == now[2]


def test_lora_adapters_are_seeded_by_the_global_generator_without_advancing_it():
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        g = torch.get_rng_state()
        sn.wrap(m, sn.Rank("r", [2, 4], targets=["0", "2"], mode="lora"))
        assert torch.equal(torch.get_rng_state(), g)
        return m

    a, b = build(), build()
    assert torch.equal(a[0].lora_A, b[0].lora_A)                 # reproducible from torch.manual_seed
    assert not torch.equal(a[0].lora_A, a[2].lora_A)             # each layer its own draw
    fresh = nn.Linear(8, 2)                                      # the global stream is not replayed
    assert not torch.equal(fresh.weight, a[0].lora_A[:2])
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    sn.wrap(m, sn.Rank("r1", [2, 4], targets="0", mode="lora"), sn.Rank("r2", [2, 4], targets="2", mode="lora"))
    assert not torch.equal(m[0].lora_A, m[2].lora_A)             # another dimension, other values


def test_lora_on_the_meta_device_is_refused():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(sn.SortedNetError, match="meta device"):
        sn.wrap(m, sn.Rank("r", [2, 4], targets="0", mode="lora"))


def test_unwrap_copy_refuses_the_nests_own_modules():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    for wrong in (m[0], nn.Sequential(m)):
        with pytest.raises(sn.SortedNetError, match="nest's own model"):
            nest.unwrap_copy(wrong)
    with nest.use("h=4"):
        assert m[0].weight.shape == (4, 8)  # still sliced


def test_sort_units_carries_a_factored_optimizers_statistics():
    """Adafactor keeps row / column statistics (size 1 along the reduced axis): they follow the units."""
    factored = torch.optim.Adafactor
    torch.testing.assert_close(_trained(True, True, factored), _trained(False, False, factored), atol=1e-5, rtol=1e-5)


def test_models_with_lazy_modules_or_extra_state_are_refused_clearly(tmp_path):
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.LazyLinear(2))
    with pytest.raises(sn.SortedNetError, match="lazy"):
        sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    assert not any("_sn" in x.__dict__ for x in m.modules())

    class Stateful(nn.Linear):
        def get_extra_state(self):
            return {"calls": 3}

        def set_extra_state(self, state):
            pass

    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Stateful(16, 4))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    with pytest.raises(sn.SortedNetError, match="get_extra_state"):
        sn.save(nest, tmp_path / "n.safetensors")

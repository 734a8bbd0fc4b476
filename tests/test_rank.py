"""Rank (svd factorisation / DyLoRA adapters): invariants 1-6, 8, 9 over
a table of nests mixing Rank with Width / Heads / Depth, plus the rank-specific
properties (Eckart-Young at wrap time, exact alpha / r scaling, frozen base)."""

from __future__ import annotations

import copy
import functools
import math
import os
import re
import tempfile
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sortednet as sn
from models import assert_unchanged, encoder, lm, mlp, run, snapshot
from sortednet.dims import dimension_from_spec
from sortednet.meta import exact_spec
from sortednet.slicers.lowrank import LORA, SVD


def _rank(case, *dims):
    case.dims = [*case.dims, *dims]
    return case


def _root(seed=0):
    torch.manual_seed(seed)
    from models import Case
    return Case(nn.Linear(10, 6), [sn.Rank("r", [1, 3, 6], targets="", export="factored")], torch.randn(4, 10))


# name -> builder(seed); svd cases keep the largest rank at min(out, in) so the largest sub-model is the layer
CASES = {
    "mlp_svd_auto": lambda s: _rank(mlp(s), sn.Rank("r", [3, 6, 12], targets=["fc1", "fc2"])),
    "mlp_lora": lambda s: _rank(mlp(s), sn.Rank("r", [2, 5], targets=["fc1", "fc2", "fc3"], mode="lora", alpha=3)),
    "lm_svd_attn": lambda s: _rank(lm(s, layers=2), sn.Rank("rank", [4, 16], targets=["blocks.*.attn.q",
                                                                                       "blocks.*.attn.o"])),
    "lm_lora": lambda s: _rank(lm(s, layers=2), sn.Rank("rank", [2, 8], targets=["blocks.*.attn.v", "blocks.*.fc1"],
                                                        mode="lora", alpha=4.0)),
    "encoder_svd_merged_and_lora": lambda s: _rank(
        encoder(s, layers=2), sn.Rank("rank", [4, 16], targets="enc.layers.*.self_attn.out_proj", export="merged"),
        sn.Rank("ad", [2, 4], targets="enc.layers.*.linear1", mode="lora")),
    "root_linear_factored": _root,
}
NAMES = sorted(CASES)


def build(name, seed=0, *, perturb=True, **kw):
    case = CASES[name](seed)
    nest = sn.wrap(case.model, *case.dims, **kw)
    if perturb:  # adapters as after training, so that they matter
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _, m in rank_modules(case.model):
                if m._sn.slicer is LORA:
                    B = m._parameters["lora_B"]
                    B.copy_(torch.randn(B.shape, generator=g) * 0.3)
    return case, nest


def key(path: str, attr: str) -> str:
    return f"{path}.{attr}" if path else attr


def rank_modules(model):
    return [(n, m) for n, m in model.named_modules() if "_sn" in m.__dict__ and m._sn.slicer in (SVD, LORA)]


def factor_views(model) -> dict[str, torch.Tensor]:
    """Active views of every rank tensor (factors, adapters, frozen base, bias)."""
    out = {}
    for n, m in rank_modules(model):
        names = ("U", "V") if m._sn.slicer is SVD else ("lora_A", "lora_B")
        for a in names:
            out[key(n, a)] = getattr(m, a).detach()
        if m._sn.slicer is LORA:
            out[key(n, "weight")] = LORA.base(m).detach()
        if m.bias is not None:
            out[key(n, "bias")] = m.bias.detach()
    return out


def loss_of(y):
    g = torch.Generator().manual_seed(1)
    return (y * torch.randn(y.shape, generator=g)).sum()


# -- invariant 1 ------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_largest_reproduces_the_layer(name):
    case = CASES[name](3)
    ref = copy.deepcopy(case.model)
    nest = sn.wrap(case.model, *case.dims)
    want, got = run(ref, case.example), run(case.model, case.example)
    if all(d.mode == "lora" for d in case.dims if isinstance(d, sn.Rank)):
        assert torch.equal(got, want)                       # zero-initialised B: exact
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # U V = W within float tolerance
    assert nest.active == nest.largest


# -- invariant 2 ------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_export_matches_live_and_cost(name):
    case, nest = build(name, 1)
    subs = nest.submodels
    for sub in {*subs[:: max(1, len(subs) // 12)], nest.smallest, nest.largest}:
        with nest.use(sub):
            live = run(case.model, case.example)
        small = nest.export(sub)
        torch.testing.assert_close(run(small, case.example), live, atol=1e-5, rtol=0)
        assert sum(p.numel() for p in small.parameters()) == nest.cost(sub, "params")
        assert not any(getattr(type(m), "_sn_sliced", False) or "_sn" in vars(m) for m in small.modules()), sub
        for n, m in rank_modules(case.model):
            if m._sn.slicer is SVD and m._sn.bind["rank"].dim.export == "factored":
                part = small.get_submodule(n) if n else small
                assert isinstance(part, nn.Sequential) and part[0].weight.shape[0] == sub[m._sn.bind["rank"].dim.name]
    assert nest.active == nest.largest


def test_auto_export_factors_only_where_smaller():
    layer = nn.Linear(40, 10)
    nest = sn.wrap(layer, sn.Rank("r", [2, 7, 8, 10], targets=""))
    for r in (2, 7, 8, 10):
        small = nest.export(f"r={r}")
        assert isinstance(small, nn.Sequential) == (r * 50 < 400)
        assert nest.cost(f"r={r}") == min(r * 50, 400) + 10


# -- invariant 3 ------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=3)
@given(data=st.data())
def test_smaller_factors_are_prefixes(name, data):
    case, nest = build(name, data.draw(st.integers(0, 99)))
    a, b = data.draw(st.lists(st.sampled_from(nest.submodels), min_size=2, max_size=2))
    b = sn.SubModel({k: max(a[k], b[k]) for k in a})
    with nest.use(a):
        va = factor_views(case.model)
    with nest.use(b):
        vb = factor_views(case.model)
    full = {k: v.detach() for k, v in case.model.named_parameters()}
    for k, t in va.items():
        lead = tuple(slice(0, s) for s in t.shape)
        assert torch.equal(vb[k][lead], t), k
        assert torch.equal(full[k][lead], t), k
    assert nest.cost(a) <= nest.cost(b)


# -- invariant 4 ------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_training_touches_only_the_slice(name, monkeypatch):
    monkeypatch.setattr(sn.slicers, "INPLACE_MIN_NUMEL", 0)  # the slice-gradient path even for tiny factors
    grads = {}
    probe = build(name)[1]
    sub = probe.submodels[len(probe.submodels) // 3]
    for inplace in (True, False):
        case, nest = build(name, 2, inplace_grad=inplace)
        ran: set[int] = set()
        hook = lambda mod, i, o, ran=ran: ran.add(id(mod))  # noqa: E731
        handles = [m.register_forward_hook(hook) for _, m in rank_modules(case.model)]
        with nest.use(sub):
            loss_of(case.model(case.example)).backward()
            views = factor_views(case.model)
        for h in handles:
            h.remove()
        params = dict(case.model.named_parameters())
        for n, m in rank_modules(case.model):
            for a in (("U", "V") if m._sn.slicer is SVD else ("lora_A", "lora_B")):
                k = key(n, a)
                g = params[k].grad
                if id(m) not in ran:
                    assert g is None or not g.any(), k
                    continue
                mask = torch.zeros_like(g, dtype=torch.bool)
                mask[tuple(slice(0, s) for s in views[k].shape)] = True
                assert not g[~mask].any(), f"{k}: gradient outside the {sub} slice"
                assert g[mask].any(), f"{k}: no gradient inside the slice"
            if m._sn.slicer is LORA:  # frozen base
                assert m._parameters["weight"].grad is None and (m.bias is None or m._parameters["bias"].grad is None)
        grads[inplace] = {k: p.grad for k, p in params.items()}
    for k, g in grads[True].items():
        h = grads[False][k]
        if g is None or h is None:
            assert (g is None or not g.any()) and (h is None or not h.any()), k
        else:
            torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-5, msg=k)


# -- invariant 5 ------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_save_load(name):
    case, nest = build(name, 4)
    base = list(CASES[name](4).model.state_dict())
    want = []
    for k in base:
        path, _, attr = k.rpartition(".")
        m = case.model.get_submodule(path)
        sl = m.__dict__.get("_sn") and m._sn.slicer
        if sl is SVD and attr == "weight":
            want += [key(path, "U"), key(path, "V")]
        else:
            want.append(k)
        if sl is LORA and attr == "weight":
            want += [key(path, "lora_A"), key(path, "lora_B")]
    assert sorted(case.model.state_dict()) == sorted(want)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank.safetensors")
        sn.save(nest, path)
        fresh = CASES[name](5)
        loaded = sn.load(fresh.model, path)
    def exact(n):  # a loaded nest's dimensions name the exact module paths their patterns bound
        return [{k: v for k, v in exact_spec(d, dict(n.model.named_modules())).items() if k != "patterns"}
                for d in n.dims]

    assert exact(loaded) == exact(nest)
    a, b = case.model.state_dict(), fresh.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    for sub in (nest.smallest, nest.largest):
        with nest.use(sub), loaded.use(sub):
            assert torch.equal(run(case.model, case.example), run(fresh.model, case.example))


def test_spec_round_trips():
    for d in (sn.Rank("r", [2, 4], targets=["a", "b.*"]), sn.Rank("q", [1, 8], targets="x", mode="lora", alpha=2.5),
              sn.Rank("m", [3], targets="y", export="merged")):
        again = dimension_from_spec(d.spec())
        assert type(again) is sn.Rank and again.spec() == d.spec() and repr(again) == repr(d)


# -- invariants 6 and 8 -----------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_use_restores_and_pick_is_monotone(name):
    case, nest = build(name)
    with pytest.raises(RuntimeError), nest.use(nest.smallest):
        raise RuntimeError("boom")
    assert nest.active == nest.largest
    costs = [nest.cost(s) for s in nest.submodels]
    assert costs == sorted(costs)
    for a in nest.submodels:
        for b in nest.submodels:
            if a.nested_in(b):
                assert nest.cost(a) <= nest.cost(b), (a, b)
    budgets = sorted({costs[0], *costs[:: 3], costs[-1] * 2})
    picked = [nest.cost(nest.pick(params=b)) for b in budgets]
    assert picked == sorted(picked) and all(c <= b for c, b in zip(picked, budgets))


# -- unwrap ------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_unwrap_restores_original_layer(name):
    case = CASES[name](6)
    ref = copy.deepcopy(case.model)
    snap = snapshot(case.model)
    nest = sn.wrap(case.model, *case.dims)
    for _, m in rank_modules(case.model):  # "training" of the factors / adapters
        for n in m._sn.slicer.factors:
            m._parameters[n].data.add_(0.01)
    assert nest.unwrap() is case.model
    assert_unchanged(case.model, snap)   # same classes, Parameter objects, bits, requires_grad flags below
    assert [p.requires_grad for p in case.model.parameters()] == [p.requires_grad for p in ref.parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_unwrap_merge_bakes_the_largest_rank(name):
    case, nest = build(name, 7)
    with nest.use(nest.largest):
        live = run(case.model, case.example)
    model = nest.unwrap(merge=True)
    assert not rank_modules(model)
    torch.testing.assert_close(run(model, case.example), live, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "svd"])
def test_unwrap_merge_of_a_restricted_nest_bakes_its_largest_rank(mode):
    """A nest restricted to ranks {2, 4} of sizes [2, 4, 8] never trains components 5..8: merging bakes rank 4,
    the nest's largest sub-model (lora at alpha / 4, not alpha / 8), in the nest and in a deep copy alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))
    nest = sn.wrap(model, sn.Rank("r", [2, 4, 8], targets=["0", "2"], mode=mode), submodels=[{"r": 2}, {"r": 4}])
    for _, m in rank_modules(model):  # "training" of the factors / adapters, every component
        for n in m._sn.slicer.factors:
            m._parameters[n].data.add_(torch.randn_like(m._parameters[n]) * 0.1)
    x = torch.randn(8, 12)
    with nest.use(nest.largest):
        live = model(x).detach()
    twin = copy.deepcopy(model)
    merged = nest.unwrap(merge=True)
    torch.testing.assert_close(merged(x), live, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nest.unwrap_copy(twin, merge=True)(x), live, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,subs", [("svd", ["r=8,h=8", "r=4,h=32"]), ("lora", ["r=2,h=32", "r=4,h=8"]),
                                       ("svd", ["r=8,h=8", "r=2,h=32", "r=4,h=32"])])
def test_unwrap_merge_of_a_nest_restricted_across_dimensions_is_its_largest_full_width_submodel(mode, subs):
    """The unwrapped model runs every other dimension at full size. With ranks and widths listed together, the
    merge baked the highest rank any sub-model used (8, only ever used at width 8): the merged model was no listed
    sub-model (0.31 off nest.largest in svd, 0.57 in lora: rank does not change a lora sub-model's cost, so the
    largest is decided by width). It now bakes the rank of the largest listed sub-model at full width."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 2))
    nest = sn.wrap(model, sn.Rank("r", [2, 4, 8], targets="0", mode=mode), sn.Width("h", [8, 32], out="0", inp="2"),
                   submodels=subs)
    for _, m in rank_modules(model):
        for n in m._sn.slicer.factors:
            m._parameters[n].data.add_(torch.randn_like(m._parameters[n]) * 0.3)
    x = torch.randn(3, 16)
    assert nest.largest["h"] == 32
    with torch.no_grad(), nest.use(nest.largest):
        live = model(x)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(nest.unwrap_copy(twin, merge=True)(x), live, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nest.unwrap(merge=True)(x), live, atol=1e-5, rtol=1e-5)


def _stack(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Linear(12, 32), nn.ReLU()), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))


@pytest.mark.parametrize("strict", [True, False])
def test_svd_target_refuses_a_state_dict_from_before_wrap(strict):
    """svd replaced ``weight`` by ``U``, ``V``: a state_dict of the unwrapped model would have that weight ignored
    (strict=False: the model trains on from other weights) or refused after the other tensors were copied
    (strict=True: half loaded). Refused first, from the root, a parent, the target, a wrapper and a deep copy."""
    plain = _stack(1).state_dict()
    model = _stack(0)
    nest = sn.wrap(model, sn.Rank("r", [2, 4, 8], targets=["0.0", "1"], mode="svd"))
    outer = nn.ModuleDict({"net": model})  # a wrapper: keys under "net."
    for target, sd in ((model, plain), (model[0], {k[2:]: v for k, v in plain.items() if k.startswith("0.")}),
                       (model[0][0], {"weight": plain["0.0.weight"], "bias": plain["0.0.bias"]}),
                       (outer, {f"net.{k}": v for k, v in plain.items()}), (copy.deepcopy(model), plain)):
        snap = snapshot(target)
        with pytest.raises(sn.SortedNetError, match=r"'0\.0' is a Rank 'r' \(mode='svd'\) target.*0\.0\.weight|"
                                                     r"'0\.0' is a Rank.*\['weight'\]"):
            target.load_state_dict(sd, strict=strict)
        assert_unchanged(target, snap)
    model.load_state_dict(model.state_dict(), strict=strict)  # its own keys: fine
    nest.unwrap()
    model.load_state_dict(plain, strict=strict)  # unwrapped: the guard left with the nest
    torch.testing.assert_close(model[3].weight, plain["3.weight"], rtol=0, atol=0)


def test_an_optimizer_built_before_an_svd_wrap_is_refused_at_its_step():
    """svd swaps a target's weight for U, V: an optimizer built before wrap holds the old weight and not the
    factors, and its steps trained everything but those layers, silently. Its step is refused before any
    change; one built after wrap (over the model or nest.trainable_parameters()) steps; after unwrap (the
    weight is back in the model) the old one is fine again."""
    torch.manual_seed(0)
    model = _stack(0)
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    nest = sn.wrap(model, sn.Rank("r", [2, 4, 8], targets=["0.0", "1"], mode="svd"))
    x, y = torch.randn(16, 12), torch.randn(16, 5)
    sn.accumulate(nest, nest.submodels, lambda: F.mse_loss(model(x), y))
    snap = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=r"optimizer holds the weight of '0\.0'.*built before wrap"):
        early.step()
    assert_unchanged(model, snap)
    for params in (model.parameters(), nest.trainable_parameters()):
        torch.optim.SGD(params, lr=0.1).step()
    nest.unwrap()
    early.step()


@pytest.mark.parametrize("copied", [False, True])
@pytest.mark.parametrize("mode", ["svd", "lora"])
@pytest.mark.parametrize("merge", [False, True])
def test_an_optimizer_over_the_factors_is_refused_at_its_step_after_unwrap(mode, merge, copied):
    """unwrap drops the factors (svd) or adapters (lora): an optimizer built after wrap over
    nest.trainable_parameters() kept stepping after unwrap(merge=True) and trained nothing of those layers
    (their weight had a gradient, the optimizer did not hold it), in silence. Refused before any change,
    naming what it holds; a new optimizer over the unwrapped model steps. The same for a deep copy (a student)
    and its own optimizer after unwrap_copy, which marked nothing."""
    torch.manual_seed(0)
    model = _stack(0)
    nest = sn.wrap(model, sn.Rank("r", [2, 4, 8], targets=["0.0", "1"], mode=mode))
    opt = torch.optim.SGD(nest.trainable_parameters(), lr=0.1)
    if copied:
        student = copy.deepcopy(model)
        opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
        nest.unwrap(merge=merge)
        model = nest.unwrap_copy(student, merge=merge)
    else:
        nest.unwrap(merge=merge)
    model(torch.randn(4, 12)).sum().backward()
    snap = snapshot(model)
    factor = "U" if mode == "svd" else "lora_A"
    who = r"nest.unwrap_copy\(copy\)" if copied else r"nest.unwrap\(\)"
    with pytest.raises(sn.SortedNetError, match=rf"optimizer holds '{factor}' of '0\.0' \(Rank 'r'\), which "
                                                rf"{who} dropped"):
        opt.step()
    assert_unchanged(model, snap)
    before = model[1].weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(model[1].weight, before)


def test_a_trainable_parameter_assigned_as_a_lora_base_is_refused():
    """lora freezes the base weight and bias; a trainable nn.Parameter assigned in its place after wrap (a base
    loaded late) was accepted and trained beside the adapters by any optimizer over model.parameters(),
    against the documented contract. Refused before any change; a frozen one, an in-place copy,
    load_state_dict(assign=True) and .to() (which keep the flag) are accepted."""
    torch.manual_seed(0)
    model = _stack(0)
    sn.wrap(model, sn.Rank("r", [2, 4, 8], targets=["0.0", "1"], mode="lora"))
    snap = snapshot(model)
    for name, shape in (("weight", model[1]._parameters["weight"].shape), ("bias", model[1].bias.shape)):
        with pytest.raises(sn.SortedNetError, match=rf"1\.{name} is the frozen base of LoRA adapters.*requires "
                                                    r"grad"):
            setattr(model[1], name, nn.Parameter(torch.randn(shape)))
    assert_unchanged(model, snap)
    new = torch.randn(model[1]._parameters["weight"].shape)
    model[1].weight = nn.Parameter(new, requires_grad=False)
    assert model[1]._parameters["weight"] is not None and torch.equal(model[1]._parameters["weight"], new)
    model[1]._parameters["weight"].data.copy_(new * 2)
    model.load_state_dict(model.state_dict(), assign=True)
    model.double()
    assert not any(model[1]._parameters[n].requires_grad for n in ("weight", "bias"))


def test_lora_adapters_and_the_rest_in_two_optimizers_step():
    """lora keeps the frozen base weight in the model: an optimizer for the rest of the model (holding it, and
    no adapter) beside one for the adapters is a normal setup, never refused."""
    torch.manual_seed(0)
    model = _stack(0)
    nest = sn.wrap(model, sn.Rank("r", [2, 4, 8], targets=["0.0", "1"], mode="lora"))
    adapters = nest.trainable_parameters()
    rest = [p for p in model.parameters() if all(p is not a for a in adapters)]
    sn.accumulate(nest, nest.submodels, lambda: model(torch.randn(4, 12)).sum())
    for params in (adapters, rest):
        torch.optim.SGD(params, lr=0.1).step()


def test_a_refused_load_keeps_the_calibration():
    """The key check runs before the hook that drops per-sub-model BatchNorm statistics on a load: a refused
    load changes nothing, calibration included (it was dropped, and eval silently ran uncalibrated)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))  # the root holds a tensor: its hooks run first
            self.fc, self.bn, self.out = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)

        def forward(self, x):
            return self.out(torch.relu(self.bn(self.fc(x)))) * self.scale

    torch.manual_seed(0)
    model = Net()
    plain = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    nest = sn.wrap(model, sn.Width("w", [8, 16], out="fc", inp="out", norm="bn"),
                   sn.Rank("r", [2, 4], targets="out"))
    x = torch.randn(32, 8)
    nest.calibrate([x], batches=1)
    model.eval()
    with torch.no_grad(), nest.use("w=8,r=4"):
        before = model(x[:4])
    with pytest.raises(sn.SortedNetError, match="'out' is a Rank 'r'"):
        model.load_state_dict(plain, strict=False)
    with torch.no_grad(), nest.use("w=8,r=4"):
        torch.testing.assert_close(model(x[:4]), before)  # (uncalibrated, w=8 reads the shared statistics)


def test_lora_target_loads_base_weights_without_adapters():
    """lora keeps ``weight`` (frozen under the adapters): a state_dict from before wrap loads it with
    strict=False and leaves the adapters as they are."""
    plain = _stack(1).state_dict()
    model = _stack(0)
    sn.wrap(model, sn.Rank("r", [2, 4, 8], targets=["0.0", "1"], mode="lora"))
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}
    result = model.load_state_dict(plain, strict=False)
    assert sorted(result.missing_keys) == sorted(adapters) and not result.unexpected_keys
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, adapters[k] if "lora" in k else plain[k], rtol=0, atol=0)


def test_lora_target_refuses_a_strict_load_without_adapters_before_any_copy():
    """With strict=True PyTorch refused the missing adapters only after copying every other tensor (a
    half-loaded model, a RuntimeError): refused first with a SortedNetError, from the root, a parent, the
    target, a wrapper and a deep copy, nothing changed; strict=False still loads the base weights."""
    plain = _stack(1).state_dict()
    model = _stack(0)
    sn.wrap(model, sn.Rank("r", [2, 4, 8], targets=["0.0", "1"], mode="lora"))
    outer = nn.ModuleDict({"net": model})
    for target, sd in ((model, plain), (model[0], {k[2:]: v for k, v in plain.items() if k.startswith("0.")}),
                       (model[0][0], {"weight": plain["0.0.weight"], "bias": plain["0.0.bias"]}),
                       (outer, {f"net.{k}": v for k, v in plain.items()}), (copy.deepcopy(model), plain)):
        snap = snapshot(target)
        with pytest.raises(sn.SortedNetError, match=r"is a Rank 'r' \(mode='lora'\) target; this state_dict lacks"
                                                     r" \[.*lora_A.*lora_B.*strict=False"):
            target.load_state_dict(sd)
        assert_unchanged(target, snap)
    model.load_state_dict(model.state_dict())  # its own keys: fine
    model.load_state_dict(plain, strict=False)
    torch.testing.assert_close(model[3].weight, plain["3.weight"], rtol=0, atol=0)

    def adapters_optional(module, result):  # a PEFT-style post-hook: the adapters may be missing
        result.missing_keys[:] = [k for k in result.missing_keys if "lora_" not in k]

    model.register_load_state_dict_post_hook(adapters_optional)
    model.load_state_dict(_stack(2).state_dict())  # strict=True, made to pass by the hook: not refused


@pytest.mark.parametrize("source", ["svd", "other_targets", "more_targets"])
def test_a_strict_load_of_another_rank_nest_is_refused_before_any_copy_naming_it(source):
    """An svd nest's state_dict (``U`` / ``V``, no ``weight``) into a lora nest, or a lora nest's with adapters on
    more layers: PyTorch refused it only after copying every tensor it could (a half-loaded model, a raw
    RuntimeError). A lora nest's of other targets was refused first, but as a state_dict of the model before wrap,
    with strict=False suggested (which drops its adapters)."""
    model = _stack(0)
    sn.wrap(model, sn.Rank("r", [2, 4, 8], targets=["1"], mode="lora"))
    targets = {"svd": ["1"], "other_targets": ["0.0"], "more_targets": ["0.0", "1"]}[source]
    other = sn.wrap(_stack(1), sn.Rank("r", [2, 4, 8], targets=targets,
                                       mode="svd" if source == "svd" else "lora")).model.state_dict()
    snap = snapshot(model)
    want = {"svd": r"lacks \['1.lora_A', '1.lora_B'\]; it holds \['1.U', '1.V'\] instead: a checkpoint of a Rank of "
                   r"another mode",
            "other_targets": r"holds the factors / adapters of \['0.0'\]: a checkpoint of a nest with other Rank "
                             r"targets",
            "more_targets": r"holds \['0.0.lora_A', '0.0.lora_B'\], the factors / adapters of modules this nest's Rank "
                            r"dimensions do not slice"}[source]
    with pytest.raises(sn.SortedNetError, match=want + r".*nothing was copied"):
        model.load_state_dict(other)
    assert_unchanged(model, snap)
    result = model.load_state_dict(other, strict=False)  # (PyTorch's: what it could, the rest reported)
    assert result.missing_keys or result.unexpected_keys


class _WithOwnU(nn.Module):
    """A model holding a tensor of its own named like svd's factor (an RNN's ``U``) beside a lora target."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.Module()
        self.rnn.U = nn.Parameter(torch.randn(8, 8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x @ self.rnn.U)


def test_a_models_own_tensor_named_like_a_factor_is_no_other_nests_adapter():
    """``rnn.U`` was taken for another nest's factor: the refusal of a state_dict from before wrap said "a
    checkpoint of a nest with other Rank targets" (and refuses nothing of the nest's own state_dict)."""
    plain = _WithOwnU().state_dict()
    model = _WithOwnU()
    sn.wrap(model, sn.Rank("r", [2, 8], targets=["fc"], mode="lora"))
    with pytest.raises(sn.SortedNetError, match=r"lacks \['fc.lora_A', 'fc.lora_B'\] \(the keys wrap added: a "
                                                r"state_dict of the model before wrap\)"):
        model.load_state_dict(plain)
    model.load_state_dict(model.state_dict())
    model.load_state_dict(plain, strict=False)


class _HandLoRA(nn.Module):
    """A LoRA layer of the model's own: ``lora_A`` / ``lora_B`` parameters of its own."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.lora_A, self.lora_B = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.zeros(8, 4))

    def forward(self, x):
        return x @ (self.weight + self.lora_B @ self.lora_A).T


def test_a_model_whose_wrapper_renames_keys_loads_its_own_state_dict():
    """An activation-checkpoint wrapper drops its inner module's name from the keys (``1.lora_A`` for the wrapper
    at ``1``, which holds no ``lora_A``): the refusal of another nest's adapters took the model's own for them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), checkpoint_wrapper(_HandLoRA()), nn.Linear(8, 2))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sn.wrap(model, sn.Rank("r", [2, 8], targets="0", mode="lora"))
    with torch.no_grad():
        model[1]._checkpoint_wrapped_module.lora_A.zero_()
    model.load_state_dict({**model.state_dict(), "1.lora_A": sd["1.lora_A"]})
    torch.testing.assert_close(model[1]._checkpoint_wrapped_module.lora_A, sd["1.lora_A"], rtol=0, atol=0)


class _FcBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + self.fc(x)


def _wrapped_in_checkpoint(seed):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), checkpoint_wrapper(_FcBlock()), nn.Linear(16, 4))


@pytest.mark.parametrize("source", ["before_wrap", "other_mode"])
@pytest.mark.parametrize("mode", ["svd", "lora"])
def test_a_refused_load_of_a_target_under_a_checkpoint_wrapper_copies_nothing(mode, source):
    """A Rank target under an activation-checkpoint wrapper: the state_dict names it without the wrapper's inner
    name (``1.fc.weight``), which the wrapper's hook adds only when the load reaches it. The root's check looked
    for ``1._checkpoint_wrapped_module.fc.*``, found nothing, and the target's own hook refused after layer 0 had
    loaded, saying "Nothing was copied" and naming keys the state_dict does not hold. Read as they come now:
    refused first, nothing changed, the user's keys named; the nest's own state_dict loads."""
    model = _wrapped_in_checkpoint(0)
    target = "1._checkpoint_wrapped_module.fc"
    sn.wrap(model, sn.Rank("r", [2, 8], targets=target, mode=mode))
    if source == "before_wrap":
        sd = _wrapped_in_checkpoint(1).state_dict()
    else:
        sd = sn.wrap(_wrapped_in_checkpoint(1), sn.Rank("r", [2, 8], targets=target,
                                                       mode="lora" if mode == "svd" else "svd")).model.state_dict()
    assert "1.fc.weight" in sd or "1.fc.U" in sd
    snap = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=rf"'{re.escape(target)}' is a Rank 'r' \(mode='{mode}'\) target.*"
                                                r"'1\.fc\.(weight|U|lora_A)'.*[Nn]othing was copied"):
        model.load_state_dict(sd)
    assert_unchanged(model, snap)
    outer = nn.ModuleDict({"module": model})  # (a key prefix: DDP's module., torch.compile's _orig_mod.)
    with pytest.raises(sn.SortedNetError, match=r"'module\.1\.fc\.(weight|U|lora_A)'"):
        outer.load_state_dict({f"module.{k}": v for k, v in sd.items()})
    assert_unchanged(model, snap)
    wider = sn.wrap(_wrapped_in_checkpoint(1), sn.Rank("r", [2, 4], targets=target, mode=mode)).model.state_dict()
    with pytest.raises(sn.SortedNetError, match=r"size mismatch .*1\.fc\.(U|V|lora_A|lora_B): \(\d+, \d+\) for"):
        model.load_state_dict({k.replace("_checkpoint_wrapped_module.", ""): v for k, v in wider.items()})
    assert_unchanged(model, snap)  # (another largest rank, under the wrapper: refused before any copy)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(own)


@pytest.mark.parametrize("mode", ["svd", "lora"])
def test_sn_load_into_a_fresh_model_restores_a_target_under_a_checkpoint_wrapper(mode, tmp_path):
    """sn.load planned the fresh model's keys from its module paths (``1._checkpoint_wrapped_module.fc.U``) while
    the file holds them as the state_dict writes them (``1.fc.U``): its own checkpoint was refused with
    ``strict=True``, and the message's ``strict=False`` loaded the file's other tensors and left the factors at
    their wrap-time values. Planned in the keys' form now: the file loads exactly."""
    target = "1._checkpoint_wrapped_module.fc"
    nest = sn.wrap(_wrapped_in_checkpoint(0), sn.Rank("r", [2, 8], targets=target, mode=mode))
    with torch.no_grad():
        for p in nest.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = os.path.join(tmp_path, "nest.safetensors")
    sn.save(nest, path)
    x = torch.randn(3, 8)
    for strict in (True, False):
        loaded = sn.load(_wrapped_in_checkpoint(1), path, strict=strict)
        assert loaded.model.state_dict().keys() == nest.model.state_dict().keys()
        for sub in nest.submodels:
            with torch.no_grad(), nest.use(sub), loaded.use(sub):
                assert torch.equal(loaded(x), nest(x)), (strict, sub)


class _LegacyT(nn.Module):
    """A wrapper of one private child, no tensors of its own, whose load pre-hook takes an old layout (the weight
    stored transposed, under the wrapper's own name)."""

    def __init__(self, inner):
        super().__init__()
        self._x = inner
        self._register_load_state_dict_pre_hook(_LegacyT._convert)

    @staticmethod
    def _convert(sd, prefix, *args):
        if prefix + "weight" in sd:
            sd[prefix + "_x.weight"] = sd.pop(prefix + "weight").t()
        if prefix + "bias" in sd:
            sd[prefix + "_x.bias"] = sd.pop(prefix + "bias")

    def forward(self, x):
        return self._x(x)


def test_the_checks_read_through_a_checkpoint_wrapper_only():
    """The shape check read the keys under any wrapper of one private child in both forms: a wrapper of one's own
    whose hook converts an old layout (a transposed weight) had its legacy checkpoint refused for the shape it
    converts. And another nest's adapters on one more target under an activation-checkpoint wrapper were not
    looked for (the wrapper's key form): a raw error after every tensor was copied."""
    def legacy_model(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), _LegacyT(nn.Linear(16, 32)), nn.ReLU(), nn.Linear(32, 4))

    legacy = {k.replace("1._x.", "1."): (v.t() if k == "1._x.weight" else v)
              for k, v in legacy_model(1).state_dict().items()}
    m = legacy_model(0)
    sn.wrap(m, sn.Rank("r", [2, 8], targets=["0"], mode="lora"))
    m.load_state_dict(legacy, strict=False)
    torch.testing.assert_close(m[1]._x.weight, legacy["1.weight"].t(), rtol=0, atol=0)

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc(x)))

    def build(seed, targets):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(8, 16), checkpoint_wrapper(Blk()), nn.Linear(16, 4))
        sn.wrap(net, sn.Rank("r", [2, 8], targets=[f"1._checkpoint_wrapped_module.{t}" for t in targets],
                             mode="lora"))
        return net

    a = build(0, ["fc"])
    snap = snapshot(a)
    with pytest.raises(sn.SortedNetError, match=r"holds \['1.fc2.lora_A', '1.fc2.lora_B'\], the factors / adapters"):
        a.load_state_dict(build(1, ["fc", "fc2"]).state_dict())
    assert_unchanged(a, snap)


def test_a_refusal_under_a_container_of_ones_own_says_what_was_not_copied():
    """A load called on a container holding the wrapped model has copied the container's modules before it when
    the wrapped model's hooks run: the refusal said "nothing was copied"; it says what lies under its prefix."""
    def build(seed, targets):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
        sn.wrap(m, sn.Rank("r", [2, 8], targets=targets))
        return m

    outer = nn.Sequential(nn.Linear(3, 3), build(0, ["2"]))
    other = nn.Sequential(nn.Linear(3, 3), build(1, ["2", "4"]))
    snap = snapshot(outer[1])
    with pytest.raises(sn.SortedNetError, match=r"nothing under '1' was copied"):
        outer.load_state_dict(other.state_dict())
    assert_unchanged(outer[1], snap)


class _Packed(nn.Module):
    """A layer whose own state_dict code writes its packed buffer under the keys ``U`` and ``V``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("packed", torch.randn(2, 4, 4))

    def _save_to_state_dict(self, dest, prefix, keep_vars):
        dest[prefix + "U"], dest[prefix + "V"] = self.packed[0].clone(), self.packed[1].clone()

    def _load_from_state_dict(self, sd, prefix, *args):
        with torch.no_grad():
            self.packed[0].copy_(sd[prefix + "U"])
            self.packed[1].copy_(sd[prefix + "V"])

    def forward(self, x):
        return x @ self.packed[0] @ self.packed[1]


class _LegacyLinear(nn.Linear):
    """A Linear whose own loader takes a legacy key (``w`` for ``weight``)."""

    def _load_from_state_dict(self, sd, prefix, *args):
        if prefix + "w" in sd:
            sd[prefix + "weight"] = sd.pop(prefix + "w")
        super()._load_from_state_dict(sd, prefix, *args)


def test_keys_a_modules_own_loader_reads_are_no_other_nests_factors():
    """``1.U`` / ``1.V``, written and read by a layer's own state_dict code, were taken for another nest's svd
    factors: the model's own state_dict was refused after wrap, which PyTorch loads. A loader of its own that
    writes no such key (one converting legacy keys) still has another nest's adapters refused before any copy."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), _Packed(), nn.Linear(4, 4))
    sn.wrap(m, sn.Rank("r", [2, 4], targets="0", mode="lora"))
    sd = {k: v + 1 if k == "1.U" else v for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    torch.testing.assert_close(m[1].packed[0], sd["1.U"], rtol=0, atol=0)

    def build(seed, targets):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), _LegacyLinear(16, 16), nn.ReLU(), nn.Linear(16, 8))
        sn.wrap(net, sn.Rank("r", [2, 8], targets=targets, mode="lora"))
        return net

    a = build(0, ["0"])
    snap = snapshot(a)
    with pytest.raises(sn.SortedNetError, match=r"holds \['2.lora_A', '2.lora_B'\], the factors / adapters of "
                                                r"modules this nest's Rank dimensions do not slice"):
        a.load_state_dict(build(1, ["0", "2"]).state_dict())
    assert_unchanged(a, snap)


def test_an_svd_refusal_of_other_targets_offers_no_strict_false_and_names_a_root_target():
    """The svd refusal of another nest's factors suggested strict=False, which it refuses too; a target at the
    model's root was named by the sliced class ('SortedLinear')."""
    def build(seed, targets):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        sn.wrap(m, sn.Rank("r", [2, 8], targets=targets))
        return m

    a, b = build(0, ["0"]), build(1, ["2"])
    for strict in (True, False):
        with pytest.raises(sn.SortedNetError, match=r"factors / adapters of \['2'\].*same targets\)\) would be") as e:
            a.load_state_dict(b.state_dict(), strict=strict)
        assert "strict=False would" not in str(e.value)
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    plain = nn.Linear(8, 8).state_dict()
    sn.wrap(layer, sn.Rank("r", [2, 8], targets=""))
    with pytest.raises(sn.SortedNetError, match=r"^load_state_dict: the model's root is a Rank 'r'"):
        layer.load_state_dict(plain)


# -- svd: Eckart-Young at wrap time ------------------------------------------------
@settings(max_examples=8)
@given(out=st.integers(1, 24), inp=st.integers(1, 24), seed=st.integers(0, 2**16), dtype=st.sampled_from(["64", "32"]))
def test_svd_prefixes_are_optimal_low_rank(out, inp, seed, dtype):
    dt = {"64": torch.float64, "32": torch.float32}[dtype]
    torch.manual_seed(seed)
    layer = nn.Linear(inp, out, dtype=dt)
    W = layer.weight.detach().double().clone()
    s = torch.linalg.svdvals(W)
    nest = sn.wrap(layer, sn.Rank("r", list(range(1, min(out, inp) + 1)), targets=""))
    U, V = layer._parameters["U"].detach().double(), layer._parameters["V"].detach().double()
    eps = (1e-10 if dt == torch.float64 else 1e-5) * s.norm().item()
    # singular values split sqrt / sqrt; a component below 1e-3 of the largest keeps a U column of norm
    # sqrt(floor) (trainable), its V row carrying the rest
    left = s.clamp_min(1e-3 * s.max().item()) if s.max() > 0 else torch.ones_like(s)
    torch.testing.assert_close(U.T @ U, torch.diag(left), atol=eps, rtol=0)
    torch.testing.assert_close(V @ V.T, torch.diag(s.square() / left), atol=eps, rtol=0)
    errs = []
    for r in nest.dims[0].sizes:
        with nest.use(f"r={r}"):
            err = torch.linalg.norm(W - layer.weight.detach().double()).item()
        opt = s[r:].square().sum().sqrt().item()
        tol = 1e-4 * opt + (1e-12 if dt == torch.float64 else 2e-6) * s.norm().item()
        assert abs(err - opt) <= tol, (r, err, opt)
        errs.append(err)
    assert all(b <= a + 1e-6 * s.norm().item() for a, b in zip(errs, errs[1:]))


@pytest.mark.parametrize("weight", ["zero", "zero_padded", "rank_one"])
def test_svd_components_of_zero_singular_value_train(weight):
    """Split evenly, a zero singular value gives both factors zero: each one's gradient is the other's times
    the output's, so the component never trained (a zero-initialised layer stayed zero; the ranks past a
    zero-padded weight's own rank stayed dead, the larger sub-models equal to the smaller)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        if weight == "zero":
            layer.weight.zero_()
        elif weight == "zero_padded":
            layer.weight[4:].zero_()
            layer.weight[:, 4:].zero_()
        else:
            layer.weight.copy_(torch.randn(8, 1) @ torch.randn(1, 8))
    W = layer.weight.detach().clone()
    nest = sn.wrap(layer, sn.Rank("r", [4, 8], targets=""))
    for r in (4, 8):
        with nest.use(f"r={r}"):
            torch.testing.assert_close(layer.weight, W, atol=1e-6, rtol=0)  # rank <= 4: both exact
    x = torch.randn(64, 8)
    target = x @ torch.randn(8, 8)   # reachable by a full-rank layer only
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        with nest.use("r=8"):
            F.mse_loss(layer(x), target).backward()
        opt.step()
    with torch.no_grad(), nest.use("r=8"):
        full = layer.weight.clone()
        assert torch.linalg.matrix_rank(full).item() == 8
        assert F.mse_loss(layer(x), target) < 0.1 * F.mse_loss(x @ W.T, target)


# -- lora: exact scaling, frozen base, adapters only -------------------------------
@pytest.mark.parametrize("alpha", [None, 1.0, 12.0])
def test_lora_uses_alpha_over_active_rank(alpha):
    torch.manual_seed(0)
    layer = nn.Linear(9, 7)
    W0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    nest = sn.wrap(layer, sn.Rank("r", [1, 3, 7], targets="", mode="lora", alpha=alpha))
    A, B = layer._parameters["lora_A"], layer._parameters["lora_B"]
    with torch.no_grad():
        B.normal_()
    x = torch.randn(5, 9)
    for r in (1, 3, 7):
        scale = (7.0 if alpha is None else alpha) / r
        want = x @ W0.T + b0 + scale * (x @ A[:r].T) @ B[:, :r].T
        with nest.use(f"r={r}"):
            torch.testing.assert_close(run(layer, x), want.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.weight.detach(), (W0 + scale * B[:, :r] @ A[:r]).detach())
            assert nest.dims[0].scale() == scale


def test_lora_training_keeps_base_frozen_and_trains_only_adapters():
    case, nest = build("lm_lora", 8, perturb=False)
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    adapters = [p for n, p in case.model.named_parameters() if n.endswith(("lora_A", "lora_B"))]
    assert {id(p) for p in nest.trainable_parameters()} == {id(p) for p in adapters} and adapters
    opt = torch.optim.Adam(nest.trainable_parameters(), lr=1e-2)
    idx = case.example
    for step in range(4):
        for sub in (nest.smallest, nest.submodels[step * 7 % len(nest.submodels)], nest.largest):
            with nest.use(sub):
                F.cross_entropy(case.model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    after = case.model.state_dict()
    for _, m in rank_modules(case.model):
        assert m._parameters["weight"].grad is None and not m._parameters["weight"].requires_grad
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("lora_A", "lora_B")) for k in changed), changed


def test_svd_trainable_parameters_include_factors():
    case, nest = build("mlp_svd_auto")
    names = {n for n, p in case.model.named_parameters() if any(p is q for q in nest.trainable_parameters())}
    assert {"fc1.U", "fc1.V", "fc2.U", "fc2.V", "fc3.weight"} <= names


def test_lora_next_to_svd_trains_the_svd_factors_too():
    """With a LoRA Rank in the nest, trainable_parameters() returned only the adapters: the factors of an svd
    Rank beside it, which hold the layer's weights, got gradients that no optimizer built from it applied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Rank("s", [2, 8], targets="0"), sn.Rank("l", [2, 4], targets="2", mode="lora"))
    names = [n for n, p in model.named_parameters() if any(p is q for q in nest.trainable_parameters())]
    assert names == ["0.U", "0.V", "2.lora_A", "2.lora_B"]
    opt = torch.optim.SGD(nest.trainable_parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with nest.use(nest.smallest):
        model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))
    assert changed == ["0.U", "0.V", "2.lora_B"]  # (lora_B starts at 0: lora_A's first gradient is 0)


# -- invariant 9: bad input, model unchanged ---------------------------------------
class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc, self.odd = nn.Linear(8, 6), OwnForward(6, 6)
        self.ln = nn.LayerNorm(6)
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)


BAD = {
    "rank_zero": lambda: [sn.Rank("r", [0, 4], targets="fc")],
    "rank_above_min": lambda: [sn.Rank("r", [2, 7], targets="fc")],
    "rank_above_min_lora": lambda: [sn.Rank("r", [7], targets="fc", mode="lora")],
    "not_linear": lambda: [sn.Rank("r", [2], targets="ln")],
    "no_match": lambda: [sn.Rank("r", [2], targets="fcc")],
    "own_forward": lambda: [sn.Rank("r", [2], targets="odd")],
    "mha_out_proj_factored": lambda: [sn.Rank("r", [2], targets="attn.out_proj")],
    # the encoder layer's inference fast path reads linear1.weight / linear2.weight: a factored export crashed
    "encoder_layer_linear_factored": lambda: [sn.Rank("r", [2], targets="enc.linear2")],
    "unsorted": lambda: [sn.Rank("r", [4, 2], targets="fc")],
    "bad_mode": lambda: [sn.Rank("r", [2], targets="fc", mode="dora")],
    "alpha_in_svd": lambda: [sn.Rank("r", [2], targets="fc", alpha=2.0)],
    "alpha_negative": lambda: [sn.Rank("r", [2], targets="fc", mode="lora", alpha=-1.0)],
    "lora_factored": lambda: [sn.Rank("r", [2], targets="fc", mode="lora", export="factored")],
    "bad_export": lambda: [sn.Rank("r", [2], targets="fc", export="fast")],
    "two_ranks_one_layer": lambda: [sn.Rank("r", [2], targets="fc"), sn.Rank("q", [2], targets="fc", mode="lora")],
    "width_role_unsupported": lambda: [sn.Rank("r", [2], targets="fc", mode="lora"),
                                       sn.Width("w", [3, 6], norm="fc")],
    "width_size_mismatch": lambda: [sn.Rank("r", [2], targets="fc", mode="lora"), sn.Width("w", [3, 5], out="fc")],
    "good_then_bad": lambda: [sn.Rank("r", [2], targets="fc", mode="lora"), sn.Rank("q", [9], targets="attn.out_proj",
                                                                                  export="merged")],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_and_leaves_model_unchanged(case):
    model = WithMHA()
    snap = snapshot(model)
    with pytest.raises(sn.SortedNetError) as e:
        sn.wrap(model, *BAD[case]())
    assert "'r'" in str(e.value) or "'q'" in str(e.value) or "'fc'" in str(e.value) or "fcc" in str(e.value)
    assert_unchanged(model, snap)


def test_non_finite_weight_is_refused():
    model = WithMHA()
    with torch.no_grad():
        model.fc.weight[0, 0] = math.nan
    snap = snapshot(model)
    with pytest.raises(sn.SortedNetError, match="non-finite"):
        sn.wrap(model, sn.Rank("r", [2], targets="fc"))
    assert [(n, type(m)) for n, m in model.named_modules()] == snap["classes"]
    assert all(p is q for (_, p), (_, q) in zip(model.named_parameters(), snap["params"]))
    assert list(model.state_dict()) == list(snap["state"])


@pytest.mark.parametrize("mode,export", [("svd", "merged"), ("svd", "factored"), ("lora", "auto")])
@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_export_keeps_the_requires_grad_of_weight_and_bias_each(mode, export, frozen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    getattr(model[0], frozen).requires_grad_(False)
    want = {n: p.requires_grad for n, p in model[0].named_parameters()}
    nest = sn.wrap(model, sn.Rank("r", [2, 8], targets="0", mode=mode, export=export))
    small = nest.export(nest.smallest)
    layers = [m for m in small[0].modules() if isinstance(m, nn.Linear)]
    assert layers[-1].bias.requires_grad == want["bias"]           # the bias sits on the last factor
    assert all(m.weight.requires_grad == want["weight"] for m in layers)


@pytest.mark.parametrize("mode", ["svd", "lora"])
def test_wrap_under_inference_mode_makes_trainable_factors(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.inference_mode():
        nest = sn.wrap(model, sn.Rank("r", [2, 8], targets="0", mode=mode))
    assert not any(p.is_inference() for p in model.parameters())
    with nest.use(nest.smallest):
        model(torch.randn(3, 8)).sum().backward()
    assert all(p.grad is not None for p in nest.trainable_parameters())


@pytest.mark.parametrize("mode,export", [("svd", "factored"), ("svd", "auto"), ("svd", "merged"), ("lora", "auto")])
def test_a_bias_shared_with_another_layer_stays_shared_in_every_export(mode, export):
    """A factored export moves the bias into a new Linear; it was a clone there, so the tie was lost and the
    export held more parameters than cost() counted (112 vs 104)."""
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.bias = self.a.bias

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    m = Two()
    kw = {"export": export} if mode == "svd" else {}
    nest = sn.wrap(m, sn.Rank("r", [2, 8], targets=["a"], mode=mode, **kw))
    x = torch.randn(3, 8)
    for sub in nest.submodels:
        small = nest.export(sub)
        biases = [mod.bias for mod in small.modules() if isinstance(mod, nn.Linear) and mod.bias is not None]
        assert len({id(b) for b in biases}) == 1, sub
        assert sum(p.numel() for p in small.parameters()) == nest.cost(sub, "params"), sub
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(small(x), m(x), atol=1e-5, rtol=0)


class _ReadsWeight(nn.Module):
    """A forward that reads a rank target's weight matrix instead of calling the layer."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(F.linear(x, self.fc.weight, self.fc.bias)))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.head = nn.MultiheadAttention(16, 4, batch_first=True), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=True)[0])


def _flops_of(module, x):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("mode,model,target", [("lora", _ReadsWeight, "fc"), ("svd", _ReadsWeight, "fc"),
                                               ("lora", _Attention, "mha.out_proj"),
                                               ("svd", _Attention, "mha.out_proj")])
def test_flops_of_a_target_read_as_a_matrix_are_those_of_its_merged_export(mode, model, target):
    """A weight read (F.linear(x, layer.weight), MultiheadAttention's out_proj) built U_r V_r / B_r A_r counted:
    cost grew with the rank (185,600 at r=32 for an export of 54,528 at every rank) and pick(flops=) refused the
    export's own count."""
    torch.manual_seed(0)
    m = model()
    kw = {"export": "merged"} if mode == "svd" else {}
    nest = sn.wrap(m, sn.Rank("r", [1, 4, 16], targets=target, mode=mode, **kw))
    x = torch.randn(2, 5, 16)
    counts = []
    for sub in nest.submodels:
        counts.append(_flops_of(nest.export(sub).train(), x))  # (train: MultiheadAttention's fast path,
        # which a counter cannot see into, steps aside, as it does while cost counts)
        assert nest.cost(sub, "flops", example=x) == counts[-1], sub
    assert nest.pick(flops=min(counts)) == nest.largest  # (ties: the highest rank)


def test_a_factored_export_of_a_target_read_as_a_matrix_is_refused():
    """An svd target whose weight the forward reads exported as two Linears: the export ran, and the exported
    model then failed with a raw AttributeError ('Sequential' object has no attribute 'weight')."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    for export in ("auto", "factored"):
        m = _ReadsWeight()
        nest = sn.wrap(m, sn.Rank("r", [2, 4, 16], targets="fc", export=export))
        with torch.no_grad(), nest.use("r=2"):
            m(x)
        with pytest.raises(sn.SortedNetError, match=r"fc: a forward of the model reads .*export='merged'"):
            nest.export("r=2")
        with pytest.raises(sn.SortedNetError, match="export='merged'"):
            nest.check(x)
        _ = m.fc.weight  # (a read outside a forward is the user's own)
    m = _ReadsWeight()
    nest = sn.wrap(m, sn.Rank("r", [2, 4, 16], targets="fc", export="merged"))
    with torch.no_grad(), nest.use("r=2"):
        live = m(x)
    torch.testing.assert_close(nest.export("r=2")(x), live, atol=1e-5, rtol=0)
    m = _ReadsWeight()
    nest = sn.wrap(m, sn.Rank("r", [2, 4, 16], targets="fc", export="factored"))
    _ = m.fc.weight.sum()  # a read outside any forward of the model does not make the export refuse
    assert isinstance(nest.export("r=2").fc, nn.Sequential)
    called = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))  # the layer called, a hook reads it
    nest = sn.wrap(called, sn.Rank("r", [2, 4, 16], targets="0", export="factored"))
    seen = []
    handle = called[0].register_forward_hook(lambda mod, args, out: seen.append(float(mod.weight.norm())))
    with torch.no_grad(), nest.use("r=2"):
        live = called(x)
    handle.remove()
    assert seen
    torch.testing.assert_close(nest.export("r=2")(x), live, atol=1e-5, rtol=0)


@pytest.mark.parametrize("export", ["auto", "factored"])
def test_pick_passes_over_ranks_whose_factored_export_a_matrix_read_refuses(export):
    """Once a forward had read an svd target's weight as a matrix, export refused its factored ranks, but
    pick (and a profile's front) still returned them by their factored size, and cost(flops) counted the product
    U_r V_r for them (more than the full rank's). pick now passes over them, the front leaves them out, and the
    product is not counted."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    m = _ReadsWeight()
    nest = sn.wrap(m, sn.Rank("r", [1, 2, 4, 16], targets="fc", export=export))
    costs = {str(s): nest.cost(s) for s in nest.submodels}
    assert nest.pick(params=costs["r=1"]) == nest.smallest  # (no read seen yet: every rank exports)
    with torch.no_grad(), nest.use("r=2"):
        m(x)
    ok = []
    for sub in nest.submodels:
        try:
            nest.export(sub)
            ok.append(sub)
        except sn.SortedNetError:
            pass
    if export == "factored":  # (every rank is two Linears)
        assert not ok
        with pytest.raises(sn.SortedNetError, match=r"no sub-model of this nest can be exported.*\['fc'\].*"
                                                    r"export='merged'"):
            nest.pick(params=1e9)
        return
    assert ok and ok != list(nest.submodels)
    for budget in sorted(costs.values()):
        try:
            got = nest.pick(params=budget)
        except sn.errors.BudgetError:
            assert budget < min(nest.cost(s) for s in ok)
            continue
        assert got in ok and nest.cost(got) <= budget
        nest.export(got)
    prof = nest.profile(x, repeat=1, progress=False)
    assert set(prof.front("params")) <= set(ok)
    flops = [nest.cost(s, "flops", example=x) for s in nest.submodels]
    assert flops == sorted(flops), flops  # (the read's product uncounted: a rank never costs more than a higher)


def test_a_plain_attribute_holding_a_factored_target_holds_the_exports_module():
    """A list holding an svd target module exported as two Linears kept the old module in the export: a stale
    Linear sharing the live model's full-size U, failing when called. The list (tuple, dict, set, partial) holds
    the export's module."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Rank("r", [2, 16], targets="0", export="factored"))
    m.groups = {"first": [m[0]], "pair": (m[0], m[2])}
    m.again, m.by_layer = m.groups, {m[0]: 0.1}  # (the same dict twice; a module as a key)
    small = nest.export("r=2")
    assert isinstance(small[0], nn.Sequential)
    assert small.groups["first"][0] is small[0] and small.groups["pair"] == (small[0], small[2])
    assert small.again is small.groups and list(small.by_layer) == [small[0]]
    live = {id(p) for p in m.parameters()}
    assert not any(id(p) in live for p in small.groups["first"][0].parameters())
    x = torch.randn(3, 16)
    with torch.no_grad(), nest.use("r=2"):
        torch.testing.assert_close(small.groups["first"][0](x), m[0](x), rtol=1e-5, atol=1e-6)
    m.groups, m.frozen = functools.partial(print, m[0], sep=m[2]), {m[0]}  # (a partial, a set: rebuilt too)
    m.call = functools.partial(m[0])  # (the target as the partial's function: a raw TypeError in export and pick)
    small = nest.export("r=2")
    assert small.groups.args == (small[0],) and small.groups.keywords == {"sep": small[2]}
    assert small.frozen == {small[0]} and small.call.func is small[0]
    assert nest.pick(params=1e9) == nest.largest


class _Held(list):
    """A list subclass: export does not rebuild it (its constructor may be anything)."""


@pytest.mark.parametrize("holder", ["namedtuple", "ordered_dict", "list_subclass", "seven_deep", "deque",
                                    "namespace", "bound_method", "bound_method_in_a_list", "dataclass", "closure"])
def test_a_factored_target_held_where_export_cannot_rebuild_is_refused_and_passed_over_by_pick(holder):
    """A factored svd target held in a container export does not rebuild (a namedtuple, an OrderedDict, a list
    subclass) was refused by export but returned by pick; one held seven levels deep was neither rebuilt nor
    refused: the export kept the old Linear, sharing the live model's full-size tensors and failing when called.
    Both are refused, naming the attribute, and pick passes over the ranks refused. So is a method bound to the
    target (``self.run = self.fc.forward``): the export returned a model whose method was bound to the old,
    emptied Linear (a raw AttributeError when called). So was one held in a dataclass. One a function's closure
    holds (``fc = self.fc; self.aside = lambda z: fc(z)``) was passed over by pick, but exported with a warning:
    the export's function ran the live layer (0.91 off the rank-2 sub-model)."""
    import collections
    import dataclasses

    pair = collections.namedtuple("pair", "layer lr")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    m.held = {"namedtuple": lambda: pair(m[0], 0.1), "ordered_dict": lambda: collections.OrderedDict(a=m[0]),
              "list_subclass": lambda: _Held([m[0]]), "seven_deep": lambda: [[[[[[[m[0]]]]]]]],
              "deque": lambda: collections.deque([m[0]]),
              "namespace": lambda: types.SimpleNamespace(layer=m[0]), "bound_method": lambda: m[0].forward,
              "bound_method_in_a_list": lambda: [m[0].forward],
              "dataclass": lambda: dataclasses.make_dataclass("Refs", ["proj"])(m[0]),
              "closure": lambda: (lambda fc: lambda z: fc(z))(m[0])}[holder]()
    nest = sn.wrap(m, sn.Rank("r", [4, 8, 32], targets="0"))  # (export="auto": two Linears at 4 and 8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for r in (4, 8):
        with pytest.raises(sn.SortedNetError, match="held"):
            nest.export(f"r={r}")
    with pytest.raises(sn.BudgetError, match="2 sub-model"):
        nest.pick(params=nest.cost("r=8"))
    assert nest.pick(params=1e9) == nest.largest
    full = nest.export(nest.largest)  # (merged: one Linear, the module itself)
    assert isinstance(full[0], nn.Linear)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_a_factored_target_held_in_a_skipped_block_or_a_dict_holding_itself_exports():
    """Passed over by pick although export accepts them: a target held (in an OrderedDict) by the block a depth
    skips, where neither the target nor its holder is exported; and a target in a plain dict that holds itself
    (``registry["self"] = registry``), which export refused as 'more than six levels deep'."""
    import collections

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4))
            self.blocks[3].refs = collections.OrderedDict(fc=self.blocks[3][0])

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x

    m = Stack()
    nest = sn.wrap(m, sn.Depth("d", [2, 4], layers="blocks"), sn.Rank("r", [2, 16], targets="blocks.*.0"))
    x = torch.randn(3, 16)
    with torch.no_grad(), nest.use("d=2,r=2"):
        torch.testing.assert_close(nest.export("d=2,r=2")(x), m(x))
    with pytest.raises(sn.SortedNetError, match="blocks.3.refs holds a module that the export replaces"):
        nest.export("d=4,r=2")
    assert nest.pick(params=nest.cost("d=2,r=2")) == nest.resolve("d=2,r=2")
    assert nest.pick(params=nest.cost("d=4,r=2")) == nest.resolve("d=2,r=2")  # (d=4,r=2 refused)

    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    m.registry = {"fc": m[0]}
    m.registry["self"] = m.registry
    nest = sn.wrap(m, sn.Rank("r", [2, 16], targets="0"))
    small = nest.export("r=2")
    assert small.registry["fc"] is small[0] and small.registry["self"] is small.registry
    assert nest.pick(params=nest.cost("r=2")) == nest.resolve("r=2")


@pytest.mark.parametrize("training", [True, False])
def test_a_factored_export_keeps_the_models_mode(training):
    """The Sequential that holds the two factors was made in training mode inside an eval-mode export."""
    model = nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.5), nn.Linear(32, 4)).train(training)
    nest = sn.wrap(model, sn.Rank("r", [2, 32], targets="0", export="factored"))
    small = nest.export("r=2")
    assert isinstance(small[0], nn.Sequential)
    assert {m.training for m in small.modules()} == {training}


@pytest.mark.parametrize("mode", ["svd", "lora"])
@pytest.mark.parametrize("region", ["autocast", "inference_mode"])
def test_merges_inside_autocast_or_inference_mode_are_exact_trainable_weights(mode, region):
    """A merged weight (export, unwrap(merge=True)) was computed by autocast in bf16 (svd: a bf16 weight beside
    an fp32 bias, which then failed to run; lora: rounded, 2.5e-2 off, baked into the model), or made an
    inference tensor under inference_mode (autograd never gave it a gradient: the layer stopped training in
    silence). Merges run in the weights' own dtype, as normal tensors, wherever they are called."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    kw = {"export": "merged"} if mode == "svd" else {}
    nest = sn.wrap(m, sn.Rank("r", [2, 8], targets="0", mode=mode, **kw))
    if mode == "lora":
        with torch.no_grad():
            m[0].lora_B.normal_()
    x = torch.randn(3, 8)
    with nest.use("r=8"), torch.no_grad():
        want = m(x)

    def region_():
        return torch.autocast("cpu", dtype=torch.bfloat16) if region == "autocast" else torch.inference_mode()

    with region_():
        small = nest.export("r=8")
    with region_():
        back = nest.unwrap(merge=True)
    for got in (small, back):
        w = got[0].weight
        assert w.dtype == torch.float32 and not w.is_inference()
        torch.testing.assert_close(got(x).detach(), want, atol=1e-5, rtol=1e-5)
        w.requires_grad_(True)
        got(x).sum().backward()
        assert w.grad is not None


@pytest.mark.parametrize("export", ["merged", "factored"])
def test_an_svd_export_follows_the_factors_requires_grad_as_a_width_export_does(export):
    """A Width export takes each tensor's requires_grad as it is now; an svd export took the flag the weight had
    at wrap time (a layer frozen after wrap came out trainable, one unfrozen after a frozen wrap came out
    frozen). Now the factors' flags decide: the merged weight trains if either factor does."""
    for frozen in ("U", "V", "UV", ""):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
        nest = sn.wrap(model, sn.Rank("r", [2, 16], targets="0", mode="svd", export=export))
        for name in frozen:
            model[0]._parameters[name].requires_grad_(False)
        small = nest.export(nest.smallest)
        flags = [p.requires_grad for n, p in small.named_parameters() if n.startswith("0.") and "bias" not in n]
        want = {"merged": [frozen != "UV"], "factored": ["V" not in frozen, "U" not in frozen]}[export]
        assert flags == want, (frozen, flags)


def test_a_checkpoint_of_another_rank_mode_names_the_field_that_differs(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "lora.safetensors")
    sn.save(sn.wrap(_stack(0), sn.Rank("r", [2, 4, 8], targets=["1"], mode="lora", alpha=3)), path)
    svd = sn.wrap(_stack(0), sn.Rank("r", [2, 4, 8], targets=["1"], mode="svd"))
    with pytest.raises(sn.SortedNetError, match=r"\('r': mode 'lora' saved, 'svd' in the nest, alpha 3\.0 saved"):
        sn.load(svd, path)


@pytest.mark.parametrize("mode", ["svd", "lora"])
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_a_pruned_rank_target_is_refused_at_wrap_naming_the_pruning(mode, name):
    """A pruned bias passed wrap, then every forward raised "2.bias is sliced ... cannot be set" (the user had
    changed nothing) and the export failed when run; a pruned weight was blamed on a weight_norm hook. Refused
    at wrap, naming torch.nn.utils.prune, with the model unchanged."""
    from torch.nn.utils import prune

    model = _stack(0)
    prune.l1_unstructured(model[1], name, amount=0.5)
    snap = snapshot(model)
    with pytest.raises(sn.PatternError, match=rf"'1': the layer is pruned .*\['{name}'\].*prune\.remove"):
        sn.wrap(model, sn.Rank("r", [2, 4, 8], targets="1", mode=mode))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("mode", ["svd", "lora"])
def test_a_model_built_under_inference_mode_merges_into_tensors_of_its_kind(mode):
    """Built, wrapped and unwrapped with merge=True inside inference_mode (serving code): the merged weight must
    be an inference tensor like the model's others (a normal one beside them made every forward raise
    "Inference tensors do not track version counter")."""
    with torch.inference_mode():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        nest = sn.wrap(m, sn.Rank("r", [2, 8], targets="0", mode=mode))
        x = torch.randn(3, 8)
        with nest.use("r=8"):
            want = m(x)
        back = nest.unwrap(merge=True)
        torch.testing.assert_close(back(x), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [3, 0, -2, 16, True, 4.5])
def test_lora_scale_of_a_rank_not_among_the_sizes_is_refused(bad):
    """Rank.scale(r) is public (the adapters' alpha / r): scale(3) with sizes [2, 4, 8] returned 2.667 for a rank
    no sub-model has, scale(-2) a negative scale and scale(0) a bare ZeroDivisionError."""
    dim = sn.Rank("r", [2, 4, 8], targets="fc", mode="lora", alpha=8)
    assert [dim.scale(r) for r in (2, 4, 8)] == [4.0, 2.0, 1.0]
    with pytest.raises(sn.SortedNetError, match=r"Rank .r.: scale\(.*\): the rank must be one of its sizes"):
        dim.scale(bad)


_WEIGHT_WRITES = {"init": lambda m: nn.init.zeros_(m[0].weight), "reset_parameters": lambda m: m[0].reset_parameters(),
                  "data": lambda m: m[0].weight.data.zero_(), "mul_": lambda m: m[0].weight.mul_(0),
                  "copy_": lambda m: m[0].weight.copy_(torch.ones(16, 8)), "index": lambda m: m[0].weight[0].fill_(1.0),
                  "apply": lambda m: m.apply(lambda mod: nn.init.zeros_(mod.weight) if mod is m[0] else None),
                  "data_assign": lambda m: setattr(m[0].weight, "data", torch.zeros(16, 8)),
                  "set_": lambda m: m[0].weight.set_(torch.zeros(16, 8))}


@pytest.mark.parametrize("write", list(_WEIGHT_WRITES))
@pytest.mark.parametrize("mode", ["svd", "lora"])
def test_a_write_into_a_rank_targets_computed_weight_is_refused_not_lost(mode, write):
    """A Rank target's ``weight`` is computed at every read (``U @ V``, or the base weight plus the adapters'
    product): ``nn.init.zeros_(layer.weight)``, ``reset_parameters()`` (which went on to re-initialise the bias
    alone), ``.data`` writes, ``.data = w`` and ``set_(w)`` (loading a weight by hand) changed a temporary and
    nothing else, in silence. Refused, naming the layer, before
    anything changes; reads of it compute as before and give plain tensors."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Rank("r", [2, 4, 8], targets="0", mode=mode))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad(), pytest.raises(sn.SortedNetError, match=r"0\.weight: written in place .* a Rank target's"):
        _WEIGHT_WRITES[write](m)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with nest.use("r=4"):
        w = m[0].weight
        want = (m[0].U @ m[0].V) if mode == "svd" else m[0]._parameters["weight"] + nest.dims[0].scale(4) * (
            m[0].lora_B @ m[0].lora_A)
        assert type(w * 1) is torch.Tensor
        torch.testing.assert_close(torch.as_tensor(w * 1), want)


@pytest.mark.parametrize("mode", ["svd", "lora"])
def test_a_stock_encoder_with_a_rank_on_its_attention_output_runs_padded_batches_in_eval(mode):
    """``nn.TransformerEncoder`` at its defaults (nested tensors on) in eval, with a padding mask, hands
    MultiheadAttention a nested tensor, which its slow path refuses when a weight it reads is a tensor subclass:
    the guarded copy of the Rank target ``out_proj.weight`` raised a raw AssertionError there. MultiheadAttention
    only computes with that read: it gets the plain weight, and every sub-model matches its export."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2)
    kw = {"export": "merged"} if mode == "svd" else {"mode": "lora"}
    nest = sn.wrap(enc, sn.Rank("r", [4, 16], targets="layers.*.self_attn.out_proj", **kw))
    enc.eval()
    x = torch.randn(3, 6, 16)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[1, 4:] = mask[2, 2:] = True
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            live = enc(x, src_key_padding_mask=mask)
        with torch.no_grad():
            exported = nest.export(sub).eval()(x, src_key_padding_mask=mask)
        keep = ~mask
        torch.testing.assert_close(live[keep], exported[keep], atol=1e-5, rtol=1e-5, msg=str(sub))
    with pytest.raises(sn.SortedNetError, match=r"self_attn\.out_proj\.weight: written in place"):
        nn.init.zeros_(enc.layers[0].self_attn.out_proj.weight)  # (a user's own read stays guarded)


class _GainLinear(nn.Linear):
    """A Linear subclass keeping Linear's forward, with a parameter and a buffer of its own its parent reads."""

    def __init__(self, *a):
        super().__init__(*a)
        self.gain = nn.Parameter(torch.full((1,), 3.0))
        self.register_buffer("shift", torch.ones(1))
        self.clip, self.scale_t = 30.0, torch.tensor(0.5)  # (a plain tensor attribute too)


class _ReadsTarget(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = _GainLinear(16, 16), nn.Linear(16, 2)

    def forward(self, x):
        x = x.reshape(-1, self.fc.in_features)  # (the parent reads the target's size, gain and shift)
        return self.out(torch.relu(self.fc(x) * self.fc.gain + self.fc.shift).clamp(max=self.fc.clip) * self.fc.scale_t)


@pytest.mark.parametrize("mode,how", [("lora", "auto"), ("svd", "merged"), ("svd", "factored")])
def test_exports_keep_what_a_forward_reads_of_a_linear_subclass(mode, how):
    """Every export of a Rank target wrote back its weight and bias only: a Linear subclass's own parameter was
    dropped (each export refused with a parameter count that "disagrees", blaming a slicer), and a factored
    export, two Linears in a Sequential, had no in_features, buffer or gain for the parent's forward to read (a
    raw AttributeError when the deployed model ran, on a sub-model pick had chosen). Kept now: the export runs
    and equals the live sub-model, shares no tensor, and holds the parameters cost counts."""
    torch.manual_seed(0)
    model, x = _ReadsTarget(), torch.randn(3, 16)
    nest = sn.wrap(model, sn.Rank("r", [2, 16], targets="fc", mode=mode, export=how), example=x)
    live = {id(t) for t in (*model.parameters(), *model.buffers())}
    for sub in nest.submodels:
        exported = nest.export(sub)
        assert not any(id(t) in live for t in (*exported.parameters(), *exported.buffers()))
        assert {"fc.gain", "fc.shift"} <= set(exported.state_dict())
        assert nest.cost(sub) == sum(p.numel() for p in exported.parameters())
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)


class _WithAct(nn.Linear):
    """A Linear subclass holding a module its parent calls (``layer.act``)."""

    def __init__(self, i, o):
        super().__init__(i, o)
        self.act = nn.Tanh()


class _CallsChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.head = _WithAct(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.proj.act(self.proj(x)))


@pytest.mark.parametrize("how", ["auto", "merged", "factored"])
def test_a_linear_subclass_holding_modules_is_merged_or_refused_never_exported_without_them(how):
    """A factored export (two Linears in an nn.Sequential) dropped a Linear subclass's child modules: the deployed
    model failed with a raw AttributeError (``layer.act``), and the child could not come along (a Sequential runs
    every child it holds). ``auto`` merges such a layer now; ``factored`` is refused at wrap, model unchanged."""
    torch.manual_seed(0)
    model, x = _CallsChild(), torch.randn(5, 16)
    if how == "factored":
        before = snapshot(model)
        with pytest.raises(sn.SortedNetError, match=r"'proj'.*holds the modules \['act'\].*export='merged'"):
            sn.wrap(model, sn.Rank("r", [2, 16], targets="proj", export=how))
        assert_unchanged(model, before)
        assert not any("_sn" in m.__dict__ for m in model.modules())
        return
    nest = sn.wrap(model, sn.Rank("r", [2, 16], targets="proj", export=how), example=x)
    for sub in nest.submodels:
        exported = nest.export(sub)
        assert type(exported.proj) is _WithAct
        assert nest.cost(sub) == sum(p.numel() for p in exported.parameters())
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)


def test_fit_warns_when_a_thawed_lora_base_would_train():
    """Assigning a trainable base is refused; ``model.requires_grad_(True)`` thawed it in place in silence, and fit
    then trained the base beside the adapters (every sub-model changed). Warned when the optimizer holds it."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Rank("r", [2, 4], targets="0", mode="lora"))
    model.requires_grad_(True)
    batch = [(torch.randn(16, 8), torch.randint(0, 2, (16,)))]
    with pytest.warns(UserWarning, match=r"frozen base of a lora Rank target requires grad again \(\['0\.weight'\]"):
        sn.fit(nest, batch, torch.optim.SGD(model.parameters(), lr=0.1), sn.Sampler(nest, k=1), progress=False)
    model[0]._parameters["weight"].requires_grad_(False)  # (a bias trained beside the adapters, PEFT's
    with warnings.catch_warnings():                         # bias="lora_only": a choice, not warned)
        warnings.simplefilter("error")
        sn.fit(nest, batch, torch.optim.SGD(model.parameters(), lr=0.1), sn.Sampler(nest, k=1), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (an optimizer of the adapters alone: the base gets no step, nothing said)
        sn.fit(nest, batch, torch.optim.SGD(nest.trainable_parameters(), lr=0.1), sn.Sampler(nest, k=1),
               progress=False)


def test_two_rank_dimensions_on_one_layer_are_refused_with_the_rule_not_a_coupling_hint():
    """Two Rank dimensions on one layer (svd and lora, other sizes) were refused with "couple them by using one
    object", which cannot hold two modes: the refusal states the rule, and the model is left as it was."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(sn.PatternError, match=r"'0' role 'rank' is claimed by two dimensions: 'r' .* and 'q' .*; "
                                              r"a layer takes one Rank dimension"):
        sn.wrap(m, sn.Rank("r", [2, 4], targets=["0"]), sn.Rank("q", [2, 4], targets=["0"], mode="lora"))
    assert type(m[0]) is nn.Linear and m.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_a_target_weight_of_another_dtype_is_named_by_its_dtype():
    """A complex (or integer) weight was refused as 'must be a floating-point nn.Parameter, got Parameter': it
    is one; its dtype is what is wrong, and the message names it."""
    with pytest.raises(sn.SortedNetError, match=r"floating-point nn.Parameter, got Parameter of torch.complex64"):
        sn.wrap(torch.nn.Linear(8, 8, dtype=torch.complex64), sn.Rank("r", [2], targets=""))

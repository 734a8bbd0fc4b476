"""Invariants 1-4 and 8 (docs/concepts.md) over every model family, sizes and sub-models
chosen by hypothesis."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sortednet as sn
from models import FAMILIES, case_params, chunks_of, leading, place, run, same_kernels
from sortednet import slicers

FAMS = sorted(FAMILIES)


def build(family: str, kw: dict, **wrap_kw):
    case = FAMILIES[family](**kw)
    return case, sn.wrap(case.model, *case.dims, **wrap_kw)


def loss_of(y: torch.Tensor) -> torch.Tensor:
    """A loss with no symmetry that could zero gradients by accident."""
    g = torch.Generator().manual_seed(1)
    return (y * torch.randn(y.shape, generator=g).to(y.device)).sum()


def active_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter / buffer as the model's modules see it now (sliced views)."""
    out = {}
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        path, _, attr = name.rpartition(".")
        v = getattr(model.get_submodule(path), attr)
        if isinstance(v, torch.Tensor):
            out[name] = v.detach()
    return out


def active_blocks(model: torch.nn.Module) -> dict[str, list[int]]:
    """Ids of the blocks each ModuleList / Sequential runs now."""
    return {n: [id(b) for b in m] for n, m in model.named_modules()
            if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential))}


@pytest.mark.parametrize("family", FAMS)
@given(data=st.data())
def test_largest_is_the_unwrapped_model(family, data):
    kw = data.draw(case_params(family))
    case = FAMILIES[family](**kw)
    ref = same_kernels(copy.deepcopy(case.model))
    nest = sn.wrap(case.model, *case.dims)
    assert dict(nest.largest) == {d.name: d.full for d in case.dims}
    expected = run(ref, case.example)
    assert torch.equal(run(case.model, case.example), expected)
    with nest.use(nest.largest):  # autograd path too (PyTorch's own layers may differ between the two modes)
        assert torch.equal(nest(case.example).detach(), ref(case.example).detach())


@pytest.mark.parametrize("family", FAMS)
@given(data=st.data())
def test_export_matches_live_and_cost(family, data):
    kw = data.draw(case_params(family))
    case, nest = build(family, kw)
    subs = nest.submodels
    picks = subs if len(subs) <= 9 else data.draw(st.lists(st.sampled_from(subs), max_size=6, unique=True))
    for sub in {nest.smallest, nest.largest, *picks}:
        with nest.use(sub):
            live = run(case.model, case.example)
        small = nest.export(sub)
        torch.testing.assert_close(run(small, case.example), live, atol=1e-5, rtol=0)
        assert sum(p.numel() for p in small.parameters()) == nest.cost(sub, "params")
    assert nest.active == nest.largest  # export leaves the active sub-model alone


@pytest.mark.parametrize("family", FAMS)
@given(data=st.data())
def test_smaller_weights_are_prefixes(family, data):
    kw = data.draw(case_params(family))
    case, nest = build(family, kw)
    full = {k: v.detach() for k, v in [*case.model.named_parameters(), *case.model.named_buffers()]}
    a, b = sorted(data.draw(st.lists(st.sampled_from(nest.submodels), min_size=2, max_size=2)),
                  key=lambda s: tuple(s.values()))
    b = sn.SubModel({k: max(a[k], b[k]) for k in a})        # b >= a on every dimension
    assert a.nested_in(b)
    with nest.use(a):
        ta, blocks_a = active_tensors(case.model), active_blocks(case.model)
    with nest.use(b):
        tb, blocks_b = active_tensors(case.model), active_blocks(case.model)
    for name, run_a in blocks_a.items():                 # Depth: the first d blocks
        assert run_a == blocks_b[name][: len(run_a)], name
    sliced = 0
    for name, va in ta.items():
        vb, c = tb[name], chunks_of(name)
        assert all(x <= y for x, y in zip(va.shape, vb.shape)), name
        assert torch.equal(leading(vb, va.shape, c), va), name
        assert torch.equal(leading(full[name], va.shape, c), va), name
        sliced += va.shape != full[name].shape
    widths = [d.name for d in case.dims if not isinstance(d, sn.Depth)]
    assert sliced > 0 or all(a[n] == nest.largest[n] for n in widths)
    assert nest.cost(a) <= nest.cost(b)


def sub_grads(family: str, kw: dict, sub: sn.SubModel | None, **wrap_kw):
    case, nest = build(family, kw, **wrap_kw)
    sub = nest.resolve(sub)
    with nest.use(sub):
        loss_of(case.model(case.example)).backward()
    return case, nest, sub


# gradient modes: slice hooks on every tensor, the default (hooks on big tensors only), plain autograd
GRAD_MODES = {"hooks": (True, 0), "default": (True, None), "autograd": (False, None)}


@pytest.mark.parametrize("family", FAMS)
@given(data=st.data())
def test_training_touches_only_the_slice(family, data):
    kw = data.draw(case_params(family))
    _, probe = build(family, kw)
    sub = data.draw(st.sampled_from(probe.submodels))
    grads = {}
    for mode, (inplace, threshold) in GRAD_MODES.items():
        with pytest.MonkeyPatch.context() as mp:
            if threshold is not None:
                mp.setattr(slicers, "INPLACE_MIN_NUMEL", threshold)
            case, nest, sub = sub_grads(family, kw, sub, inplace_grad=inplace)
        small = nest.export(sub)
        loss_of(small(case.example)).backward()
        exported = dict(small.named_parameters())
        nonzero_inside = 0
        for name, p in case.model.named_parameters():
            g = torch.zeros_like(p) if p.grad is None else p.grad
            if name not in exported:               # a skipped block: untouched
                assert not g.any(), name
                continue
            e = exported[name]
            want, mask = place(e.grad, p.shape, chunks_of(name))
            assert not g[~mask].any(), f"{name}: gradient outside the {sub} slice ({mode})"
            torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4, msg=name)
            if p.dim() >= 2 and e.grad.any():
                assert g[mask].any(), f"{name}: zero gradient inside the slice ({mode})"
            nonzero_inside += bool(g[mask].any())
        assert nonzero_inside > 0
        grads[mode] = {n: p.grad for n, p in case.model.named_parameters()}
    for name, g in grads["hooks"].items():
        for mode in ("default", "autograd"):
            h = grads[mode][name]
            if g is None or h is None:
                assert (g is None or not g.any()) and (h is None or not h.any()), name
            else:  # the fused nn.Linear path accumulates inside the GEMM (addmm_): equal up to rounding only
                torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-5, msg=f"{name} ({mode})")


@given(c=st.sampled_from([8, 16]), data=st.data())
def test_training_updates_only_active_batchnorm_statistics(c, data):
    case, nest = build("cnn_bn_residual", {"c": c})
    sub = data.draw(st.sampled_from(nest.submodels))
    case.model.train()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    with nest.use(sub):
        case.model(case.example)
    for bn in ("bn1", "bn2"):
        for stat in ("running_mean", "running_var"):
            old, new, n = before[f"{bn}.{stat}"], getattr(case.model, bn)._buffers[stat], sub["ch"]
            assert not torch.equal(new[:n], old[:n]) and torch.equal(new[n:], old[n:]), (bn, stat)
        assert getattr(case.model, bn).num_batches_tracked == 1


@pytest.mark.parametrize("family", FAMS)
def test_submodels_sorted_and_complete(family):
    case, nest = build(family, {})
    costs = [nest.cost(s) for s in nest.submodels]
    assert costs == sorted(costs)
    assert len(nest.submodels) == math.prod(len(d.sizes) for d in case.dims) == len(set(nest.submodels))
    assert dict(nest.smallest) == {d.name: d.sizes[0] for d in case.dims}
    for a in nest.submodels:
        for b in nest.submodels:
            if a.nested_in(b):
                assert nest.cost(a) <= nest.cost(b), (a, b)


@pytest.mark.parametrize("family", FAMS)
@given(data=st.data())
def test_pick_is_monotone_and_within_budget(family, data):
    kw = data.draw(case_params(family))
    _, nest = build(family, kw)
    lo, hi = nest.cost(nest.smallest), nest.cost(nest.largest)
    budgets = sorted(data.draw(st.lists(st.floats(lo, hi * 1.5), min_size=2, max_size=5)))
    picked = [nest.pick(params=b) for b in budgets]
    for b, s in zip(budgets, picked):
        assert nest.cost(s) <= b
        assert not any(b >= nest.cost(t) > nest.cost(s) for t in nest.submodels)  # best within budget
    assert [nest.cost(s) for s in picked] == sorted(nest.cost(s) for s in picked)
    assert nest.pick(params=hi) == nest.largest or nest.cost(nest.pick(params=hi)) == hi
    frac = data.draw(st.floats(lo / hi, 1.0))  # (lo / hi * hi may round below lo: the limit forgives float error)
    assert nest.cost(nest.pick(fraction=frac)) <= frac * hi * (1 + 1e-9)
    below = data.draw(st.floats(0, lo, exclude_max=True))
    with pytest.raises(sn.SortedNetError, match=str(nest.smallest)) as e:
        nest.pick(params=below)
    assert f"{lo:g}" in str(e.value)

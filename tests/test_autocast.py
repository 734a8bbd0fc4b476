"""Weights the library writes in place inside a ``torch.autocast`` region are the ones the next forwards use.

Autocast caches its lower-precision copy of each parameter for the rest of the region, keyed by the tensor and
blind to in-place writes. Sorting units, loading a checkpoint into a nest or merging adapters there left the
region computing with the old values: ``sort_units`` refused a correctly wired nest (its own check forward saw
stale copies beside permuted ones), and a forward after any of them silently used the old weights."""

from __future__ import annotations

import os

import pytest
import torch

import sortednet as sn
from models import FAMILIES
from sortednet.importance import sort_units


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def fresh_region(model, x):
    with bf16(), torch.no_grad():
        return model(x)


@pytest.mark.parametrize("family", ["lm_width_heads_depth", "tied_lm", "cnn_bn_residual", "mlp"])
@pytest.mark.parametrize("method", ["l1", "l2"])
def test_sort_units_inside_autocast_sorts_and_the_region_sees_the_sorted_weights(family, method):
    case = FAMILIES[family](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    with bf16():
        case.model(case.example)  # fills the region's cast cache with the weights in their old order
        sort_units(nest, method, example=case.example)
        with torch.no_grad():
            inside = case.model(case.example)
            with nest.use(nest.smallest):
                small = case.model(case.example)
    assert torch.equal(inside, fresh_region(case.model, case.example))
    with nest.use(nest.smallest):
        assert torch.equal(small, fresh_region(case.model, case.example))


def test_a_refused_sort_inside_autocast_leaves_the_region_on_the_original_weights():
    """A model that reads its units in order (a cumulative sum over the features) cannot be sorted: the weights
    are put back, and the region's next forward computes with them, not with the permuted copies."""
    class Cumulative(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.a(x).cumsum(-1))

    torch.manual_seed(0)
    model, x = Cumulative(), torch.randn(4, 6)
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="a", inp="b"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with bf16():
        want = model(x)
        with pytest.raises(sn.SortedNetError, match="Nothing was changed"):
            sort_units(nest, "l1", example=x)
        got = model(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(got, want)


def test_load_into_a_nest_inside_autocast_is_what_the_region_computes_with(tmp_path):
    case, other = FAMILIES["mlp"](seed=0), FAMILIES["mlp"](seed=5)
    nest = sn.wrap(case.model, *case.dims)
    path = os.path.join(tmp_path, "other.safetensors")
    sn.save(sn.wrap(other.model, *other.dims), path)
    with bf16():
        case.model(case.example)
        sn.load(nest, path)
        got = case.model(case.example)
    assert torch.equal(got, fresh_region(other.model, case.example))


def test_unwrap_merge_inside_autocast_is_what_the_region_computes_with():
    case = FAMILIES["mlp"](seed=1)
    nest = sn.wrap(case.model, sn.Rank("r", [2, 4], targets=["fc1", "fc2"], mode="lora"))
    with torch.no_grad():
        for n, p in case.model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # (adapters that change the merged weight)
    with bf16():
        case.model(case.example)
        model = nest.unwrap(merge=True)
        got = model(case.example)
    assert torch.equal(got, fresh_region(model, case.example))


def test_check_and_wrap_with_an_example_inside_autocast_pass_a_valid_encoder():
    """``nn.TransformerEncoder``'s fused fast path fails under autocast inside the dispatch mode that keeps a
    check's forward side-effect free ('expected m1 and m2 to have the same dtype'), and check blamed the Depth
    wiring of a valid nest. Under autocast the fast path steps aside for those forwards."""
    case, again = FAMILIES["torch_encoder"](seed=0), FAMILIES["torch_encoder"](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    with bf16():
        nest.check(case.example)
        sn.wrap(again.model, *again.dims, example=again.example)
    assert not torch.overrides._get_current_function_mode_stack()  # (the pass-through mode is gone after)


def test_fit_inside_one_autocast_region_trains_on_the_updated_weights():
    """``sn.fit`` wrapped in one ``torch.autocast`` region (the obvious way to train in bfloat16): autocast's cast
    of each full-size weight, cached at the first step, was what the largest sub-model computed with at every
    later step (its loss stayed put, its gradients were those of the first weights). Each step in a region of
    its own is the reference; the region is left computing with the trained weights."""
    def run(one_region: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                    torch.nn.ReLU(), torch.nn.Linear(64, 3))
        nest = sn.wrap(model, sn.Width("h1", [16, 32, 64], out="0", inp="2"),
                       sn.Width("h2", [16, 32, 64], out="2", inp="4"))
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sampler = sn.Sampler(nest.submodels, k=3, strategy="sandwich", seed=0)
        records = []
        if one_region:
            with bf16():
                records = sn.fit(nest, [(x, y)] * 4, opt, sampler, progress=False).train
                after = model(x)
        else:  # (fit resumed at each step draws what the whole run draws)
            for step in range(4):
                with bf16():
                    records += sn.fit(nest, [(x, y)], opt, sampler, start_step=step, progress=False).train
            after = fresh_region(model, x)
        return records, model, after, str(nest.largest)

    got, model, after, largest = run(True)
    want, ref, ref_after, _ = run(False)
    assert len({r["losses"][largest] for r in got}) == len(got)  # (a stale cast kept the largest's loss fixed)
    for a, b in zip(got, want, strict=True):
        assert a["losses"].keys() == b["losses"].keys()
        assert all(abs(a["losses"][k] - b["losses"][k]) <= 1e-6 for k in a["losses"])
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.float(), ref_after.float(), rtol=0, atol=1e-6)

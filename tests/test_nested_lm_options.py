"""Training options added for nested language models (issue 14): per-sub-model loss weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sortednet as sn


def _nest(seed: int = 0) -> tuple[nn.Module, sn.Nest]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, sn.wrap(model, sn.Width("a", [2, 4, 8], out="0", inp="2"), sn.Width("b", [4, 8], out="2", inp="4"))


STRATS = [("uniform", 3), ("sandwich", 3), ("weighted", 2), ("all", None)]


@pytest.mark.parametrize("strategy,k", STRATS)
@pytest.mark.parametrize("rule", ["cost", "large", "small", "list"])
def test_loss_weights_follow_the_rule_and_sum_to_one(strategy: str, k: int | None, rule: str) -> None:
    _, nest = _nest()
    n = len(nest.submodels)
    raw = {"cost": [nest.cost(s) for s in nest.submodels], "large": list(range(1, n + 1)),
           "small": list(range(n, 0, -1)), "list": [0.5 + (i * 7) % 5 for i in range(n)]}[rule]
    kw = {"weights": "large"} if strategy == "weighted" else {}
    s = sn.Sampler(nest, k=k, strategy=strategy, seed=3, loss_weights=raw if rule == "list" else rule, **kw)
    plain = sn.Sampler(nest, k=k, strategy=strategy, seed=3, **kw)
    pos = {sub: i for i, sub in enumerate(nest.submodels)}
    for step in range(6):
        subs = s.draw(step)
        assert subs == plain.draw(step)  # loss weights never change what is drawn
        w = s.loss_weights_for(subs)
        assert sum(w) == pytest.approx(1.0)
        expect = [raw[pos[x]] for x in subs]
        assert w == pytest.approx([e / sum(expect) for e in expect])
    assert plain.loss_weights_for(plain.draw(0)) is None


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(0.1, 10.0), min_size=6, max_size=6), st.integers(0, 50))
def test_accumulate_with_sampler_weights_is_the_weighted_sum_of_gradients(raw: list[float], step: int) -> None:
    model, nest = _nest()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    s = sn.Sampler(nest.submodels, k=3, strategy="sandwich", seed=1, loss_weights=raw)
    subs = s.draw(step)
    sn.accumulate(nest, subs, lambda: F.cross_entropy(model(x), y), weights=s.loss_weights_for(subs))
    got = [p.grad.clone() for p in model.parameters()]
    want = [torch.zeros_like(p) for p in model.parameters()]
    for sub, w in zip(subs, s.loss_weights_for(subs)):
        model.zero_grad()
        with nest.use(sub):
            F.cross_entropy(model(x), y).backward()
        for acc, p in zip(want, model.parameters()):
            acc += w * p.grad
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def _one_fit_step(loss_weights: list[float] | None) -> list[torch.Tensor]:
    model, nest = _nest()
    torch.manual_seed(1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    s = sn.Sampler(nest.submodels, k=3, strategy="sandwich", seed=0, loss_weights=loss_weights)
    sn.fit(nest, [(x, y)], opt, s, progress=False)
    return [p.detach().clone() for p in model.parameters()]


def test_fit_applies_the_samplers_loss_weights() -> None:
    n = 6
    heavy_large = [1.0] * (n - 1) + [50.0]
    uniform = [1.0] * n
    base, same, skewed = _one_fit_step(None), _one_fit_step(uniform), _one_fit_step(heavy_large)
    for a, b in zip(base, same):  # equal loss weights == the plain mean
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(base, skewed))


def test_loss_weights_round_trip_through_state_dict() -> None:
    _, nest = _nest()
    a = sn.Sampler(nest, k=2, strategy="uniform", seed=4, loss_weights="cost")
    b = sn.Sampler(nest, k=2, strategy="uniform", seed=0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.loss_weights == "cost"
    assert b.loss_weights_for(b.draw(5)) == a.loss_weights_for(a.draw(5))
    old = {k: v for k, v in a.state_dict().items() if k != "loss_weights"}  # a state saved before the option
    b.load_state_dict(old)
    assert b.loss_weights_for(b.draw(5)) is None
    assert "loss_weights='cost'" in repr(a)


@pytest.mark.parametrize("bad,match", [
    ([1.0, 2.0], "6 sub-models"), ([1.0, 1.0, 1.0, 0.0, 1.0, 1.0], "positive"),
    ([1.0, 1.0, -1.0, 1.0, 1.0, 1.0], "must all be positive"), ("huge", "unknown weight rule 'huge' for loss_weights"),
    ([float("nan")] * 6, "loss_weights must be finite and positive"), ([float("inf")] + [1.0] * 8, "9 entries"),
    (["a"] * 6, "numbers"),
])
def test_bad_loss_weights_are_refused_naming_the_option(bad: object, match: str) -> None:
    _, nest = _nest()
    with pytest.raises(sn.SortedNetError, match="loss_weights") as e:
        sn.Sampler(nest, k=2, loss_weights=bad)
    assert match in str(e.value)


def test_loss_weights_for_refuses_a_foreign_sub_model() -> None:
    _, nest = _nest()
    s = sn.Sampler(nest.submodels[:3], k=2, loss_weights="large")
    with pytest.raises(sn.SortedNetError, match="not"):
        s.loss_weights_for([nest.largest])
    with pytest.raises(sn.SortedNetError, match="cost"):
        sn.Sampler(nest.submodels, k=2, loss_weights="cost")  # the rule needs the nest

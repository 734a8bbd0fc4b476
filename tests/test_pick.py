"""pick: best within every budget, never over, monotone, exact at boundaries,
BudgetError below the smallest; against a brute-force oracle on random tables
and on real nests."""

from __future__ import annotations

import decimal
import fractions
import functools
import itertools
import re
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sortednet as sn
from models import FAMILIES
from sortednet.errors import BudgetError
from sortednet.select import Selector

METRICS = ("params", "flops", "latency", "memory")
COMBOS = [c for r in (1, 2, 3, 4) for c in itertools.combinations(METRICS, r)]


@st.composite
def tables(draw):
    """A random cost table (ties likely: small integer costs) with or without scores."""
    n = draw(st.integers(1, 12))
    subs = [sn.SubModel(i=i) for i in range(n)]
    value = st.integers(1, 8).map(float)
    costs = {m: draw(st.lists(value, min_size=n, max_size=n)) for m in METRICS}
    scores = draw(st.one_of(st.none(), st.lists(st.integers(0, 5).map(float), min_size=n, max_size=n)))
    return subs, costs, scores


def oracle_score(costs, scores, limits):
    """Best score among sub-models within every limit (None if none fits): brute force."""
    score = scores if scores is not None else costs["params"]
    ok = [i for i in range(len(score)) if all(costs[m][i] <= v for m, v in limits.items())]
    return max((score[i] for i in ok), default=None)


@pytest.mark.parametrize("metrics", COMBOS, ids="+".join)
@given(table=tables(), data=st.data())
def test_selector_matches_oracle_and_is_monotone(metrics, table, data):
    subs, costs, scores = table
    sel = Selector(subs, costs, scores)
    score = scores if scores is not None else costs["params"]
    budgets = [{m: data.draw(st.sampled_from([*costs[m], 0.5, 4.5, 9.0])) for m in metrics} for _ in range(4)]
    for lo in budgets:
        hi = {m: max(lo[m], data.draw(st.sampled_from([*costs[m], 9.0]))) for m in metrics}
        best = oracle_score(costs, scores, lo)
        if best is None:
            with pytest.raises(BudgetError):
                sel.pick(lo)
            continue
        got = subs.index(sel.pick(lo))
        assert all(costs[m][got] <= lo[m] for m in metrics), "over budget"
        assert score[got] == best, "not the best within budget"
        feasible = [j for j in range(len(subs)) if all(costs[m][j] <= lo[m] for m in metrics)]
        assert not [j for j in feasible if score[j] == best and all(costs[m][j] <= costs[m][got] for m in metrics)
                    and any(costs[m][j] < costs[m][got] for m in metrics)], "a tie that costs less was passed over"
        got_hi = subs.index(sel.pick(hi))
        assert score[got_hi] >= score[got], "a larger budget gave a worse sub-model"


@given(table=tables())
def test_exact_boundary_and_below_smallest(table):
    subs, costs, scores = table
    sel = Selector(subs, costs, scores)
    score = scores if scores is not None else costs["params"]
    for m in METRICS:
        for i in range(len(subs)):
            got = subs.index(sel.pick({m: costs[m][i]}))   # budget exactly a sub-model's cost
            assert costs[m][got] <= costs[m][i] and score[got] >= score[i]
        low = min(costs[m])
        with pytest.raises(BudgetError, match=rf"{m} <= \S+ \(the smallest available is \S+,") as e:
            sel.pick({m: low - 0.5})
        said = re.search(rf"{m} <= (\S+) \(the smallest available is (\S+),", str(e.value)).groups()
        assert [float(v) for v in said] == [low - 0.5, low], "the message rounds the budget or the cost"


def test_a_budget_just_below_the_smallest_is_not_rounded_up_to_it_in_the_message():
    subs = [sn.SubModel(i=i) for i in range(2)]
    sel = Selector(subs, {"params": [195.0, 2_500_000.0]})
    with pytest.raises(BudgetError, match=r"params <= 194\.9999 \(the smallest available is 195, i=0\)"):
        sel.pick({"params": 194.9999})
    with pytest.raises(BudgetError, match=r"params <= 194\.99999999999997 \(the smallest available is 195,"):
        sel.pick({"params": 195 - 2 ** -45})
    with pytest.raises(BudgetError, match=r"params <= 0\.3 \(the smallest"):  # (no float noise of 0.1 * 3)
        sel.pick({"params": 0.1 * 3})


def test_jointly_infeasible_budget_names_the_limits():
    subs = [sn.SubModel(i=i) for i in range(2)]
    sel = Selector(subs, {"params": [1.0, 5.0], "latency": [5.0, 1.0]})
    with pytest.raises(BudgetError, match="at once"):
        sel.pick({"params": 2, "latency": 2})


def test_a_nan_cost_is_refused():
    subs = [sn.SubModel(i=i) for i in range(2)]
    with pytest.raises(sn.SortedNetError, match="'latency' cost is NaN for i=0"):
        Selector(subs, {"params": [1.0, 5.0], "latency": [float("nan"), 1.0]})
    with pytest.raises(sn.SortedNetError, match="'latency' of i=0 is nan"):
        sn.Profile(subs, {"params": [1.0, 5.0], "latency": [float("nan"), 1.0]})


@pytest.mark.parametrize("scores, subs, match", [
    ((0.5, float("nan")), None, "the score of i=1 is nan"),
    ((float("inf"), 0.5), None, "the score of i=0 is inf"),     # (it outranked every finite score)
    ((0.5,), None, "need 2 scores, one per sub-model, got 1"),
    (None, [sn.SubModel(i=0), sn.SubModel(i=0)], "i=0 is listed twice"),
    (None, [sn.SubModel(i=0), sn.SubModel(j=0)], "name different dimensions"),
])
def test_a_selector_refuses_what_a_profile_refuses(scores, subs, match):
    subs = subs or [sn.SubModel(i=i) for i in range(2)]
    with pytest.raises(sn.SortedNetError, match=re.escape(match)):
        Selector(subs, {"params": [1.0, 5.0]}, scores)


@pytest.mark.parametrize("costs, scores, subs, match", [
    ({"latency": (np.float32("nan"), 1.0)}, None, None, "'latency' of i=0 is np.float32.nan."),   # a NumPy NaN
    ({"params": (np.float32(-5), 1.0)}, None, None, "'params' of i=0 is np.float32.-5.0."),
    ({"params": (True, 1.0)}, None, None, "'params' of i=0 is True"),
    ({"params": ("10", 1.0)}, None, None, "'params' of i=0 is '10'"),
    ({"params": (float("inf"), 1.0)}, None, None, "finite numbers >= 0"),
    ({"params": (1.0, 2.0)}, (0.5, float("nan")), None, "the score of i=1 is nan"),
    ({"params": (1.0, 2.0)}, (float("-inf"), 0.5), None, "the score of i=0 is -inf"),
    ({"params": (10.0, 99.0)}, None, [sn.SubModel(i=0), sn.SubModel(i=0)], "i=0 is listed twice"),
    ({"params": (10.0, 99.0)}, None, [sn.SubModel(i=0), sn.SubModel(j=0)], "name different dimensions"),
])
def test_a_profile_refuses_what_would_mislead_its_front(costs, scores, subs, match):
    """A Profile built by hand is checked as one loaded from a checkpoint: a NaN cost or score would make the
    Pareto front drop points nothing dominates, a sub-model listed twice would answer with another row's cost."""
    subs = subs or [sn.SubModel(i=i) for i in range(2)]
    with pytest.raises(sn.SortedNetError, match=match):
        sn.Profile(tuple(subs), costs, scores=scores)


def test_a_profile_reads_sub_models_as_dicts_or_text_like_the_nest():
    """``Profile.cost("h=4")`` said the sub-model was not in the profile (it is), a dict raised a raw TypeError,
    and a profile built from text rows held strings no SubModel found. Each takes a SubModel, a dict or its
    text, as every other API; costs that are no mapping and rows of another type are refused by name."""
    nest = sn.wrap(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)),
                   sn.Width("h", [4, 16], out="0", inp="2"))
    prof = nest.profile(torch.randn(2, 8), metrics=("params",), progress=False)
    for sub in ("h=4", {"h": 4}, sn.SubModel(h=4)):
        assert prof.index(sub) == 0 and prof.cost(sub) == nest.cost("h=4")
    built = sn.Profile(("h=4", {"h": 16}), {"params": (1.0, 2.0)})
    assert built.submodels == (sn.SubModel(h=4), sn.SubModel(h=16)) and built.cost(sn.SubModel(h=16)) == 2.0
    with pytest.raises(sn.SortedNetError, match="h=8 is not in this profile"):
        prof.cost("h=8")
    with pytest.raises(sn.SortedNetError, match="a sub-model is a SubModel, a .* got int"):
        prof.cost(4)
    two = sn.Profile(({"a": 1, "b": 2},), {"params": (1.0,)})
    with pytest.raises(sn.SortedNetError, match=r"a=1 names 1 of the profile's dimensions \['a', 'b'\].*nest.resolve"):
        two.cost("a=1")
    with pytest.raises(sn.SortedNetError, match="costs must be a mapping"):
        sn.Profile((sn.SubModel(h=4),), [("params", (1.0,))])


def test_latency_counts_are_checked_where_they_are_measured():
    """``measure_latency(..., repeat=0)`` raised statistics' raw "no median for empty data"."""
    from sortednet.cost import measure_latency
    nest = sn.wrap(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)),
                   sn.Width("h", [4, 16], out="0", inp="2"))
    for repeat, warmup in ((0, 0), (1, -1), (2.0, 0), (True, 0)):
        with pytest.raises(sn.SortedNetError, match="repeat must be an int >= 1 and warmup >= 0"):
            measure_latency(nest, nest.smallest, torch.randn(2, 8), repeat=repeat, warmup=warmup)
    assert measure_latency(nest, nest.smallest, torch.randn(2, 8), repeat=1, warmup=0) >= 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0]), min_size=1, max_size=1),
                          st.sampled_from([float("-inf"), -1.0, 0.0, 0.5, 0.5, 1.0, float("inf")])),
                min_size=1, max_size=8),
       st.integers(1, 2))
def test_pareto_front_equals_brute_force(points, axes):
    """Not dominated: no other point costs <= on every axis and scores >=, one strictly; of exact duplicates the
    first. Infinite scores included (one axis and two take different paths)."""
    from sortednet.profile import pareto_front

    costs = [tuple(c * axes) if axes == 1 else (c[0], 3.0 - c[0] + (i % 2)) for i, (c, _) in enumerate(points)]
    scores = [s for _, s in points]

    def dominated(i):
        return any((all(a <= b for a, b in zip(costs[j], costs[i])) and scores[j] >= scores[i]
                    and (costs[j] != costs[i] or scores[j] != scores[i] or j < i)) for j in range(len(costs)) if j != i)

    assert pareto_front(costs, scores) == [i for i in range(len(costs)) if not dominated(i)]
    with pytest.raises(sn.SortedNetError, match="NaN"):
        pareto_front(costs + [costs[0]], scores + [float("nan")])


def test_a_fraction_never_picks_a_sub_model_over_its_share():
    """The allowance for float rounding in fraction * largest is a few units in the last place, not 1e-9 of the
    budget (at 1e6 parameters: a parameter over)."""
    import torch.nn as nn

    nest = sn.wrap(nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10)),
                   sn.Width("h", list(range(100, 1001, 100)), out="0", inp="2"))
    big = nest.cost(nest.largest)
    for s in nest.submodels:
        c = nest.cost(s)
        assert nest.cost(nest.pick(fraction=c / big)) == c
        if s != nest.smallest:
            assert nest.cost(nest.pick(fraction=(c - 0.0003) / big)) < c


def test_ties_with_scores_go_to_fewer_params():
    subs = [sn.SubModel(i=i) for i in range(3)]
    sel = Selector(subs, {"params": [3.0, 1.0, 2.0]}, scores=[0.9, 0.9, 0.5])
    assert sel.pick({"params": 10}) == subs[1]


def test_ties_follow_the_fixed_metric_order_whatever_order_the_limits_come_in():
    """Of two sub-models tied in score, one fewer params (more flops), the other fewer flops: ties go to the lower
    params, then flops. Given in another order, or params given as fraction= (added after flops), the ranking
    once went by flops first."""
    subs = [sn.SubModel(i=i) for i in range(2)]
    sel = Selector(subs, {"params": [12815.0, 49589.0], "flops": [245888.0, 154112.0]}, scores=[1.0, 1.0])
    for limits in ({"params": 5e4, "flops": 3e5}, {"flops": 3e5, "params": 5e4}):
        assert sel.pick(limits) == subs[0], limits
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1), nn.Flatten(),
                      nn.Linear(3 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 4))  # (convolutions: few params, many flops)
    nest = sn.wrap(m, sn.Width("c", [2, 8], out="0", inp="2"), sn.Width("f", [16, 64], out="4", inp="6"),
                   submodels=["c=8,f=16", "c=2,f=64"])
    nest.profile(torch.randn(1, 3, 8, 8), score=lambda sub: 1.0, metrics=("params", "flops"), progress=False)
    few_params, few_flops = sorted(nest.submodels, key=nest.cost)
    assert nest.cost(few_flops, "flops") < nest.cost(few_params, "flops")
    top = max(nest.cost(s, "flops") for s in nest.submodels)
    for kw in ({"params": nest.cost(nest.largest), "flops": top}, {"flops": top, "params": nest.cost(nest.largest)},
               {"fraction": 1.0, "flops": top}, {"flops": top, "fraction": 1.0}):
        assert nest.pick(**kw) == few_params, kw


@settings(max_examples=60, deadline=None)
@given(table=tables())
def test_the_printed_front_holds_what_pick_returns(table):
    """Profile.front (and the table's stars) keeps, of sub-models tied in cost and score, the one pick returns."""
    subs, costs, scores = table
    prof = sn.Profile(tuple(subs), {m: tuple(v) for m, v in costs.items()},
                      None if scores is None else tuple(scores))
    sel = Selector(subs, costs, scores)
    for metric in METRICS:
        front = prof.front(metric)
        assert {sel.pick({metric: costs[metric][subs.index(s)]}) for s in front} == set(front)
    starred = {line.split("`")[1] for line in prof.to_markdown().splitlines() if line.endswith("| * |")}
    assert starred == {str(s) for s in prof.front("params")}
    c, s = sel.smallest("params")
    assert sel.pick({"params": c}) == s, "the smallest named in a BudgetError is not what pick returns there"


def test_equal_size_ranks_front_and_pick_agree_on_a_nest():
    """LoRA ranks do not change the deployed size: the front and pick both keep the highest rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="0", inp="2"),
                   sn.Rank("r", [1, 2, 4], targets="0", mode="lora"))
    prof = nest.profile(torch.randn(1, 8), metrics=("params", "flops"), progress=False)
    front = prof.front("params")
    assert [s["r"] for s in front] == [4, 4, 4]
    assert [nest.pick(params=nest.cost(s)) for s in front] == list(front)
    with pytest.raises(BudgetError, match=r"the smallest available is 56, h=4,r=4\)"):
        nest.pick(params=55)


@pytest.mark.parametrize("value", [fractions.Fraction(600), decimal.Decimal("600.5"), torch.tensor(600),
                                   torch.tensor([600.0]), np.float32(600), np.array(600), np.array([600.0])])
def test_a_budget_may_be_any_real_number(value):
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    assert nest.pick(params=value) == nest.pick(params=600)


def test_a_budget_equal_to_a_cost_picks_it_at_any_size():
    """Costs are compared as float64: an int budget equal to a FLOP count above 2**53 (a big model counted on the
    meta device) picks that sub-model, whatever type carries it."""
    big = 108152352493780956  # float() rounds it up by 4
    subs = [sn.SubModel(h=h) for h in (2, 4)]
    sel = Selector(subs, {"params": [1.0, 2.0], "flops": [float(big // 2), float(big)]})
    for value in (big, np.int64(big), torch.tensor(big), fractions.Fraction(big), decimal.Decimal(big)):
        assert sel.pick({"flops": sn.select.budget("flops", value)}) == subs[1], type(value)


@pytest.mark.parametrize("value", [torch.tensor(True), torch.tensor([1.0, 2.0]), torch.tensor(1 + 1j),
                                   torch.tensor(600.0, device="meta"), np.array(True), np.array([1.0, 2.0]),
                                   decimal.Decimal("sNaN"), "600"])
def test_a_budget_that_is_no_real_number_is_refused(value):
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    with pytest.raises(sn.SortedNetError, match="budget params="):
        nest.pick(params=value)


@functools.cache
def nest_with_profile(family: str, scored: bool):
    """Profiled once per module run (pick never changes the nest)."""
    case = FAMILIES[family]()
    nest = sn.wrap(case.model, *case.dims)
    score = None
    if scored:   # an arbitrary, non-monotone score: pick must follow it, not size
        score = lambda sub: float(zlib.crc32(str(sub).encode()) % 97)  # noqa: E731  (same in every process)
    nest.profile(case.example, score=score, repeat=1, warmup=0, progress=False)
    return nest


@pytest.mark.parametrize("family", ["mlp", "lm_width_heads_depth", "cnn_bn_residual"])
@pytest.mark.parametrize("scored", [False, True])
@given(data=st.data())
def test_nest_pick_every_metric_and_combination(family, scored, data):
    nest = nest_with_profile(family, scored)
    subs = nest.submodels
    costs = {m: [nest.cost(s, m) for s in subs] for m in METRICS}
    prof = nest._profile
    scores = None if not scored else [prof.scores[prof.index(s)] for s in subs]
    score = scores if scores is not None else costs["params"]
    for metrics in data.draw(st.lists(st.sampled_from(COMBOS), min_size=1, max_size=4)):
        lo = {m: data.draw(st.sampled_from(costs[m])) for m in metrics}
        hi = {m: data.draw(st.sampled_from([c for c in costs[m] if c >= lo[m]])) for m in metrics}
        best = oracle_score(costs, scores, lo)
        if best is None:
            with pytest.raises(BudgetError):
                nest.pick(**lo)
            continue
        got = nest.pick(**lo)
        assert all(nest.cost(got, m) <= lo[m] for m in metrics)
        assert score[subs.index(got)] == best
        assert score[subs.index(nest.pick(**hi))] >= score[subs.index(got)]


def test_pick_without_profile_is_most_params_within_budget():
    case = FAMILIES["lm_width_heads_depth"]()
    nest = sn.wrap(case.model, *case.dims)
    costs = sorted({nest.cost(s) for s in nest.submodels})
    for c in costs:
        assert nest.cost(nest.pick(params=c)) == c
        assert nest.cost(nest.pick(params=c + 0.5)) == c
    with pytest.raises(BudgetError, match=re.escape(f"the smallest available is {costs[0]:g}")):
        nest.pick(params=costs[0] - 1)
    with pytest.raises(sn.SortedNetError, match="profile"):
        nest.pick(latency=1.0)
    with pytest.raises(sn.SortedNetError, match="needs a budget"):
        nest.pick()
    assert nest.cost(nest.pick(fraction=0.5)) <= 0.5 * nest.cost(nest.largest)


def test_flops_pick_after_counting_with_an_example():
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    flops = {s: nest.cost(s, "flops", example=case.example) for s in nest.submodels}
    assert len(set(flops.values())) > 1
    for s, f in flops.items():
        got = nest.pick(flops=f)
        assert flops[got] <= f and nest.cost(got) >= nest.cost(s)  # most params within the FLOPs
    # a different input shape recounts
    big = nest.cost(nest.largest, "flops", example=torch.randn(12, 12))
    assert big == 2 * flops[nest.largest]


def test_a_fraction_equal_to_a_sub_models_share_picks_it():
    """fraction * largest is a float product: cost / largest * largest can round just below cost."""
    import torch.nn as nn

    for h in range(3, 40):
        nest = sn.wrap(nn.Sequential(nn.Linear(5, h), nn.ReLU(), nn.Linear(h, 4)),
                       sn.Width("h", list(range(1, h + 1)), out="0", inp="2"))
        hi = nest.cost(nest.largest)
        for s in nest.submodels:
            assert nest.cost(nest.pick(fraction=nest.cost(s) / hi)) == nest.cost(s)


class _TiedTwice(torch.nn.Module):
    """``c`` holds ``b``'s weight; the wiring below slices it by ``h1``/``h2`` in ``b`` and ``h2``/``h3`` in ``c``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16)
        self.c, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)
        self.c.weight = self.b.weight

    def forward(self, x):
        return self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


@settings(max_examples=15, deadline=None)
@given(budget=st.integers(150, 700))
def test_pick_passes_over_submodels_that_cannot_be_exported(budget):
    """A tied weight sliced differently by its two holders: most sub-models run live but cannot be exported
    (export refuses them); ``pick`` returned them anyway (``h1=16,h2=8,h3=16`` for 2000 parameters). It now
    picks the best exportable one, whose export has the parameters ``cost`` counts."""
    torch.manual_seed(0)
    m = _TiedTwice()
    W = sn.Width
    nest = sn.wrap(m, W("h1", [4, 8, 16], out="a", inp="b"), W("h2", [4, 8, 16], out="b", inp="c"),
                   W("h3", [4, 8, 16], out="c", inp="head"))
    sub = nest.pick(params=budget)
    assert sum(p.numel() for p in nest.export(sub).parameters()) == nest.cost(sub) <= budget
    fits = []
    for s in nest.submodels:  # the oracle: the most parameters among exportable sub-models within budget
        if nest.cost(s) <= budget:
            try:
                nest.export(s)
            except sn.SortedNetError:
                continue
            fits.append(nest.cost(s))
    assert nest.cost(sub) == max(fits)


class _SlicedAndWhole(nn.Module):
    """One weight held by a sliced Linear (``a``) and by a Linear no dimension slices (``c``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(8, 16)
        self.c.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + self.c(x).sum(-1, keepdim=True)


def test_pick_keeps_the_full_model_when_a_tied_weight_is_also_held_whole():
    """The unsliced holder's cut of the shared weight was written as ``()``, a sliced holder's at full size as
    ``((), None)``: the two never compared equal, so every sub-model, the full one included (which exports),
    counted as unexportable and pick refused whatever the budget."""
    torch.manual_seed(0)
    nest = sn.wrap(_SlicedAndWhole(), sn.Width("h", [4, 8, 16], out="a", inp="b"))
    x = torch.randn(3, 8)
    assert nest.pick(params=1e9) == nest.largest == nest.pick(fraction=1.0)
    torch.testing.assert_close(nest.export(nest.largest)(x), nest.model(x))
    for s in nest.submodels[:-1]:  # the smaller ones cut the shared weight one way in a, not at all in c
        with pytest.raises(sn.SortedNetError, match="tied"):
            nest.export(s)
    with pytest.raises(BudgetError):
        nest.pick(params=nest.cost(nest.largest) - 1)


class _HeadTiedToTheLastBlock(nn.Module):
    """The head holds the last block's first weight (tied): sliced by ``h`` in the block, whole in the head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"a": nn.Linear(8, 16), "b": nn.Linear(16, 8)}) for _ in range(3))
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.blocks[2]["a"].weight

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk["b"](torch.relu(blk["a"](x)))
        return self.head(x)


def test_a_tie_to_a_block_a_depth_leaves_out_does_not_bar_the_sub_model():
    """At depth 1 the last block does not run and is not exported, so its cut of the tied weight does not
    count: that sub-model exports (its params as cost says), yet pick and the profile's front passed over it
    (pick refused every budget below the next size, naming a smallest sub-model above nest.smallest). At depth
    3 the block runs and cuts the weight the head holds whole: still passed over."""
    torch.manual_seed(0)
    nest = sn.wrap(_HeadTiedToTheLastBlock(), sn.Depth("depth", [1, 3], layers="blocks"),
                   sn.Width("h", [4, 16], out="blocks.*.a", inp="blocks.*.b"))
    x = torch.randn(3, 8)
    small = nest.resolve("depth=1,h=4")
    exported = nest.export(small)
    assert sum(p.numel() for p in exported.parameters()) == nest.cost(small)
    with nest.use(small):
        torch.testing.assert_close(exported(x), nest.model(x), atol=1e-5, rtol=0)
    with pytest.raises(sn.SortedNetError, match="tied"):
        nest.export("depth=3,h=4")
    for budget in (nest.cost(small), nest.cost("depth=1,h=16") - 1):
        assert nest.pick(params=budget) == small
    assert all(nest.pick(params=b) != nest.resolve("depth=3,h=4") for b in range(int(nest.cost(small)), 2000, 37))
    prof = nest.profile(x, on="export", progress=False)
    assert [str(s) for s in prof.meta["not_exportable"]] == ["depth=3,h=4"]


def test_pick_warns_once_when_the_scores_were_measured_on_other_weights(tmp_path):
    """Scores measured, then the model calibrated, trained or changed in place: pick kept ranking by the old
    scores without a word (the probe's CNN picked a 92.7% sub-model where a 95.7% one fit after calibrating)."""
    import warnings

    from sortednet.nest import StaleScoresWarning

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2)).eval()

    m = build()
    nest = sn.wrap(m, sn.Width("h", [2, 4, 8], out="0", norm="1", inp="3"))
    x = torch.randn(16, 4)

    def stale(fn):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            fn()
            nest.pick(params=100)
            nest.pick(params=100)  # once per state of the weights
        return sum(issubclass(w.category, StaleScoresWarning) for w in got)

    assert stale(lambda: nest.profile(x, score=lambda s: s["h"], metrics=("params",), progress=False)) == 0
    assert stale(lambda: nest.check(x)) == 0  # (its training-mode dry run puts BatchNorm statistics back)
    assert stale(lambda: pytest.raises(sn.SortedNetError, nest.calibrate, [], batches=1)) == 0  # nothing happened
    assert stale(nest.drop_calibration) == 0  # nothing to drop
    assert stale(lambda: nest.calibrate([x], batches=1)) == 1
    assert stale(lambda: nest.profile(x, score=lambda s: s["h"], metrics=("params",), progress=False)) == 0
    path = str(tmp_path / "n.safetensors")
    sn.save(nest, path)
    loaded = sn.load(build(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleScoresWarning)
        assert loaded.pick(params=100) == nest.pick(params=100)  # the scores describe the loaded weights
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sn.accumulate(nest, [nest.largest], lambda: m(x).square().mean())
    assert stale(opt.step) == 1
    assert stale(nest.drop_calibration) == 1
    assert stale(lambda: nest.profile(x, score=lambda s: s["h"], metrics=("params",), progress=False)) == 0
    assert stale(lambda: m[4].register_buffer("extra", torch.ones(2))) == 1  # a slot the profile never saw
    torch.manual_seed(3)
    assert stale(lambda: m.__setitem__(4, nn.Linear(2, 2))) == 1  # an unsliced module replaced, new weights
    # a checkpoint loaded with strict=False that leaves weights the file lacks as they were: its scores were
    # measured on the file's model, not on this mix (a full load of the same file: the file's weights)
    for strict, warned in ((True, 0), (False, 1)):
        m2 = build()
        if not strict:
            m2[4].register_buffer("extra", torch.ones(2))  # not in the file
        nest = sn.wrap(m2, sn.Width("h", [2, 4, 8], out="0", norm="1", inp="3"))
        assert stale(lambda: sn.load(nest, path, strict=strict)) == warned  # noqa: B023
    assert stale(lambda: nest.profile(x, metrics=("params",), progress=False)) == 0  # no scores: nothing to warn


@pytest.mark.parametrize("opt", ["AdamW", "SGD", "Adagrad"])
def test_a_fused_optimizer_step_makes_scores_stale_and_the_file_says_so(opt, tmp_path):
    """A ``fused=True`` optimizer (transformers' default ``adamw_torch_fused``) writes the weights in one kernel
    that leaves their version counters alone: the scores outlived such a step in silence (weights moved by 0.3,
    no warning, and a checkpoint saved then marked them fresh)."""

    from sortednet.nest import StaleScoresWarning

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    m, x = build(), torch.randn(16, 4)
    nest = sn.wrap(m, sn.Width("h", [2, 4, 8], out="0", inp="2"))
    nest.profile(x, score=lambda s: s["h"], metrics=("params",), progress=False)
    kw = {"momentum": 0.9} if opt == "SGD" else {}
    step = getattr(torch.optim, opt)(m.parameters(), lr=0.1, fused=True, **kw)
    sn.accumulate(nest, [nest.largest], lambda: m(x).square().mean())
    before = m[0].weight.detach().clone()
    step.step()
    assert not torch.equal(m[0].weight, before)
    with pytest.warns(StaleScoresWarning):
        nest.pick(params=100)
    path = str(tmp_path / "n.safetensors")
    sn.save(nest, path)
    with pytest.warns(StaleScoresWarning):  # (the file marks the scores stale)
        sn.load(build(), path).pick(params=100)


def test_a_buffer_that_only_caches_derived_values_does_not_make_scores_stale():
    """Dynamic RoPE re-assigns its non-persistent inv_freq after a long input and back after a short one:
    outputs and weights unchanged, yet pick warned that the scores were stale."""
    import warnings

    from sortednet.nest import StaleScoresWarning

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
            self.register_buffer("scale", torch.ones(()), persistent=False)

        def forward(self, x):
            self.scale = torch.ones(()) * (2.0 if x.shape[0] > 4 else 1.0)  # re-made from the input's length
            return self.fc2(torch.relu(self.fc1(x)) * self.scale / self.scale)

    model = Cached()
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="fc1", inp="fc2"))
    x = torch.randn(3, 4)
    nest.profile(x, score=lambda s: s["h"], metrics=("params",), progress=False)
    with torch.no_grad():
        model(torch.randn(6, 4))
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleScoresWarning)
        nest.pick(params=100)


@pytest.mark.parametrize("bad, match", [
    (lambda s: 1 / 0, r"score\(h=2\) raised ZeroDivisionError: division by zero"),
    (lambda s: float("nan"), r"score\(h=2\) returned nan"),
    (lambda s: "0.9", r"score\(h=2\) returned str"),
    (lambda s: True, r"score\(h=2\) returned bool"),
    (lambda s: torch.ones(2), r"score\(h=2\) returned Tensor"),
])
def test_a_failing_or_non_numeric_score_is_named_and_keeps_the_profile(bad, match):
    """A score function that raises was reported as the example's fault ("profile on the example ... failed");
    every failure names ``score(sub)`` and leaves the nest's previous profile in place."""
    torch.manual_seed(0)
    nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                   sn.Width("h", [2, 4, 8], out="0", inp="2"))
    x = torch.randn(3, 4)
    first = nest.profile(x, score=lambda s: float(s["h"]), metrics=("params",), repeat=1, warmup=0, progress=False)
    with pytest.raises(sn.SortedNetError, match=match) as e:
        nest.profile(x, score=bad, metrics=("params",), repeat=1, warmup=0, progress=False)
    assert "on the example" not in str(e.value)
    assert nest._profile is first and nest.pick(params=1e9) == nest.largest


def test_pick_with_flops_checks_the_table_once_not_per_call():
    """Every ``pick(flops=...)`` walked all sub-models to see that the FLOPs table was complete: 3.9 ms per pick
    at N = 1,000 (0.1 ms at N = 10), against a flat lookup. A table only grows and a new one is a new dict, so one
    pass per table is enough. Counted (no timing): membership tests of the table per pick."""
    torch.manual_seed(0)
    nest = sn.wrap(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)),
                   sn.Width("a", [2, 4, 8, 16], out="0", inp="2"), sn.Width("b", [2, 4, 8, 16], out="2", inp="4"))
    nest.profile(torch.randn(1, 4), metrics=("flops",), repeat=1, warmup=0, progress=False)

    class Counting(dict):
        tests = 0

        def __contains__(self, key):
            Counting.tests += 1
            return super().__contains__(key)

    nest._cost_cache["flops"] = Counting(nest._cost_cache["flops"])
    budget = dict(params=nest.cost(nest.largest), flops=nest.cost(nest.largest, "flops"))
    assert nest.pick(**budget) == nest.largest and Counting.tests >= len(nest.submodels)
    after = Counting.tests
    for _ in range(5):
        assert nest.pick(**budget) == nest.largest
    assert Counting.tests - after <= 5, "every pick walks the sub-models"
    del nest._cost_cache["flops"][nest.submodels[3]]  # (never done by the nest: shows the check is still there)
    nest._cost_cache["flops"] = Counting(nest._cost_cache["flops"])
    with pytest.raises(sn.SortedNetError, match="FLOPs are known for 15 of 16"):
        nest.pick(**budget)


def test_latency_and_memory_limits_need_the_profiles_device():
    """A profile timed on one device does not rank sub-models on another: pick(latency=/memory=) refuses once no
    parameter is on the profile's device any more (model.to(...) keeps the parameter objects, so nothing else
    notices); parameter limits go on."""
    import torch.nn as nn

    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    nest = sn.wrap(m, sn.Width("h", [8, 16, 32], out="0", inp="2"))
    nest.profile(torch.randn(2, 8), repeat=1, warmup=0, progress=False)
    assert nest.pick(latency=1.0, memory=1e12) == nest.largest
    m.to("meta")
    for kw in (dict(latency=1.0), dict(memory=1e12), dict(params=1e9, latency=1.0)):
        with pytest.raises(sn.SortedNetError, match=r"measured .* on cpu, but the model.s parameters are now on meta"):
            nest.pick(**kw)
    assert nest.pick(params=1e9) == nest.largest


@pytest.mark.parametrize("counted", [False, True])
def test_a_checkpoint_without_a_profile_drops_the_profiles_costs(tmp_path, counted):
    """sn.load of a file saved before profiling replaces the profile by none: its measured latency, memory and
    FLOPs went on answering cost() and pick() with no device check left to catch a moved model. A FLOPs table
    counted by cost(..., example=) next to a profile without FLOPs is not the profile's: it stays."""
    import torch.nn as nn

    def build(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    sn.save(sn.wrap(build(1), sn.Width("h", [4, 8, 16], out="0", inp="2")), tmp_path / "plain.safetensors")
    m = build(0)
    nest = sn.wrap(m, sn.Width("h", [4, 8, 16], out="0", inp="2"))
    metrics = ("params", "latency", "memory") if counted else ("params", "flops", "latency", "memory")
    nest.profile(torch.randn(4, 6), metrics=metrics, repeat=1, warmup=0, progress=False)
    if counted:
        nest.cost(nest.largest, "flops", example=torch.randn(2, 6))
    flops = nest.cost(nest.largest, "flops")
    sn.load(nest, tmp_path / "plain.safetensors")
    assert nest._profile is None
    for metric in ("latency", "memory"):
        with pytest.raises(sn.SortedNetError, match=f"no '{metric}' cost"):
            nest.cost(nest.largest, metric)
    with pytest.raises(sn.SortedNetError, match="latency"):
        nest.pick(latency=1.0)
    if counted:
        assert nest.cost(nest.largest, "flops") == flops
    else:
        with pytest.raises(sn.SortedNetError, match="no 'flops' cost"):
            nest.cost(nest.largest, "flops")
    assert nest.pick(params=1e9) == nest.largest


def test_a_flops_count_on_another_input_than_the_profiles_warns_that_pick_does_not_read_it():
    """pick(flops=) reads the profile's table: counting every sub-model on a batch of 64 and then picking a
    budget meant for that batch chose the largest sub-model, 5x over it, in silence."""
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    nest.profile(case.example[:1], metrics=("params", "flops"), progress=False)
    big = case.example.repeat(8, 1)
    with pytest.warns(sn.nest.OtherInputFlopsWarning, match="answers this call only"):
        counts = {s: nest.cost(s, "flops", example=big) for s in nest.submodels}
    assert counts[nest.largest] == 8 * case.example.shape[0] * nest.cost(nest.largest, "flops")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nest.cost(nest.smallest, "flops", example=big)              # once per input
        nest.cost(nest.smallest, "flops", example=case.example[:1])  # the profile's own input: no warning
    nest.profile(case.example[:2], metrics=("params", "flops"), progress=False)  # a new table: told again
    with pytest.warns(sn.nest.OtherInputFlopsWarning):
        nest.cost(nest.smallest, "flops", example=big)


def test_a_profile_on_the_export_measures_each_exported_sub_model(monkeypatch):
    """profile(on="export") times and measures what is deployed: each sub-model's export, not the live model."""
    from sortednet.cost import measure_memory

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    nest = sn.wrap(m, sn.Rank("r", [4, 8, 16, 32], targets="0"), sn.Width("h", [8, 32], out="0", inp="2"))
    x = torch.randn(2, 32)
    export, runs = nest.export, {}

    def spy(sub, **kw):
        small = export(sub, **kw)
        runs[str(sub)] = 0
        small.register_forward_hook(lambda *_: runs.__setitem__(str(sub), runs[str(sub)] + 1))
        return small

    monkeypatch.setattr(nest, "export", spy)
    prof = nest.profile(x, metrics=("memory", "latency"), repeat=3, warmup=1, progress=False, on="export")
    monkeypatch.undo()
    assert runs == {str(s): 3 + 1 + 1 for s in nest.submodels}  # latency (warm-up + repeats) and memory
    assert prof.meta["on"] == "export" and "measured_live" not in prof.meta and "not_exportable" not in prof.meta
    for s in nest.submodels:
        assert prof.cost(s, "memory") == measure_memory(nest, s, x, model=nest.export(s).eval())
    budget = sorted(prof.costs["latency"])[3]
    assert prof.cost(nest.pick(latency=budget), "latency") <= budget  # pick reads the export's timings
    assert nest.profile(x, metrics=("memory",), progress=False).meta["on"] == "live"  # (always said)
    with pytest.raises(sn.SortedNetError, match=r"on=.*'live'.*'export'.*'deployed'"):
        nest.profile(x, metrics=("latency",), progress=False, on="deployed")


def test_a_profile_lists_what_cannot_be_exported_and_leaves_it_off_its_front():
    torch.manual_seed(0)
    W = sn.Width
    nest = sn.wrap(_TiedTwice(), W("h1", [4, 16], out="a", inp="b"), W("h2", [4, 16], out="b", inp="c"))
    x = torch.randn(2, 8)
    prof = nest.profile(x, metrics=("memory",), repeat=1, warmup=0, progress=False, on="export")
    unexportable = []
    for s in nest.submodels:
        try:
            nest.export(s)
        except sn.SortedNetError:
            unexportable.append(str(s))
    assert unexportable and prof.meta["not_exportable"] == unexportable and "measured_live" not in prof.meta
    front = prof.front("params")  # pick passes over them: the front too
    assert front and not set(map(str, front)) & set(unexportable)
    assert {nest.pick(params=prof.cost(s, "params")) for s in front} == set(front)


def test_a_complete_load_of_a_model_with_a_broadcast_buffer_keeps_its_scores_fresh(tmp_path):
    """A buffer registered as an expand() is skipped by a load (the file holds what it holds): that was read as
    "strict=False left weights as they were", and pick warned that a complete load's scores were stale."""
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        m.register_buffer("scale", torch.ones(1).expand(2))
        return m

    nest = sn.wrap(build(), sn.Width("h", [4, 8], out="0", inp="2"))
    nest.profile(torch.randn(1, 4), score=lambda sub: float(sub["h"]), metrics=("params",), progress=False)
    sn.save(nest, tmp_path / "n.safetensors")
    loaded = sn.load(build(), tmp_path / "n.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loaded.pick(params=10**6) == loaded.largest


@pytest.mark.parametrize("bad", [["h=9"], ["h = 2"], "h=2", 5, [{"h": 2}]])
def test_a_profile_refuses_a_not_exportable_list_that_names_no_profiled_sub_model(bad):
    subs = tuple(sn.SubModel(h=h) for h in (1, 2, 3))
    with pytest.raises(sn.SortedNetError, match=r"meta\['not_exportable'\] must list profiled sub-models"):
        sn.Profile(subs, {"params": (1.0, 2.0, 3.0)}, meta={"not_exportable": bad})
    good = sn.Profile(subs, {"params": (1.0, 2.0, 3.0)}, meta={"not_exportable": ["h=3"]})
    assert [str(s) for s in good.front()] == ["h=1", "h=2"] and sn.Profile.from_dict(good.to_dict()) == good


@pytest.mark.parametrize("then", ["save_load_same", "save_load_fresh", "dtype", "module_swap"])
def test_scores_stay_stale_through_save_load_a_dtype_move_and_a_module_swap(then, tmp_path):
    """Scores measured, the model trained (stale): a checkpoint saved then keeps them stale for the nest that loads
    it, and dropping the latency / memory a dtype move invalidates keeps them stale too. A module without parameters
    replaced (ReLU -> Tanh: no weight moved) changes what every sub-model computes: stale as well."""
    import warnings

    from sortednet.nest import StaleScoresWarning

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    m = build()
    nest = sn.wrap(m, sn.Width("h", [2, 4, 8], out="0", inp="2"))
    x = torch.randn(16, 4)
    nest.profile(x, score=lambda s: s["h"], metrics=("params", "latency"), repeat=1, progress=False)

    def warned(n):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            n.pick(params=100)
        return sum(issubclass(w.category, StaleScoresWarning) for w in got)

    if then != "module_swap":
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(x).square().mean().backward()
        opt.step()
        if then != "dtype":  # (warned once per state of the weights: a dtype move is the next pick's news)
            assert warned(nest) == 1
    if then.startswith("save_load"):
        path = tmp_path / "n.safetensors"
        sn.save(nest, path)
        target = nest if then == "save_load_same" else build()
        loaded = sn.load(target, path)
        assert warned(loaded) == 1
        fresh = build()  # a profile measured on the weights it is saved with stays fresh
        fnest = sn.wrap(fresh, sn.Width("h", [2, 4, 8], out="0", inp="2"))
        fnest.profile(x, score=lambda s: s["h"], metrics=("params",), progress=False)
        sn.save(fnest, tmp_path / "fresh.safetensors")
        assert warned(sn.load(build(), tmp_path / "fresh.safetensors")) == 0
    elif then == "dtype":  # (pick also warns that the profile's latency was dropped)
        m.double()
        assert warned(nest) == 1
    else:
        assert warned(nest) == 0
        m[1] = nn.Tanh()
        assert warned(nest) == 1


def test_a_checkpoint_with_malformed_stale_marks_is_refused_before_anything_changes(tmp_path):
    import json
    import struct

    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    nest = sn.wrap(m, sn.Width("h", [2, 4, 8], out="0", inp="2"))
    path = tmp_path / "n.safetensors"
    sn.save(nest, path)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["sortednet"])
    for extra in ({"scores_stale": True}, {"calibration_stale": {"0": ["h=2"]}}, {"scores_stale": 1}):
        meta["extra"] = extra
        header["__metadata__"]["sortednet"] = json.dumps(meta)
        body = json.dumps(header).encode()
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(sn.SortedNetError, match="stale"):
            sn.load(nest, bad, verify=False)
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_a_profile_without_flops_or_a_misspelt_metric_is_said_so():
    """pick(flops=, latency=) on a profile that counted no FLOPs blamed "another input" (of None), and
    to_markdown("latncy") printed a table with no front marked (read: nothing is on it), where front() and
    plot() refuse the same name."""
    nest = sn.wrap(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)),
                   sn.Width("a", [8, 16, 32], out="0", inp="2"))
    prof = nest.profile(torch.randn(2, 8), metrics=("params", "latency"), repeat=1, warmup=0, progress=False)
    with pytest.raises(sn.SortedNetError, match="no 'flops' cost known"):
        nest.pick(flops=1e9, latency=1)
    with pytest.raises(sn.SortedNetError, match="this profile has no 'latncy'; it has"):
        prof.to_markdown("latncy")
    assert prof.to_markdown("latency").count("| * |") >= 1


def test_the_stale_scores_warning_comes_again_for_each_change_the_weights_do_not_show():
    """After one StaleScoresWarning (a cast), a module swapped later (ReLU for Tanh) warned no more: it does not
    change the weights' key the warning was tracked by. Every change is said once now."""
    import torch.nn as nn

    import sortednet as sn
    from sortednet.nest import StaleScoresWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    nest = sn.wrap(model, sn.Width("h1", [16, 32, 64], out="0", inp="2"),
                   sn.Width("h2", [16, 32, 64], out="2", inp="4"))
    nest.profile(torch.randn(4, 8), score=lambda s: float(nest.cost(s) % 5), progress=False, metrics=("params",))

    def said():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            nest.pick(params=1e9)
        return [x.category for x in w if x.category is StaleScoresWarning]

    assert said() == []
    model.half()
    assert len(said()) == 1 and said() == []
    model[1] = nn.Tanh()
    assert len(said()) == 1 and said() == []
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert len(said()) == 1


def test_scores_that_fall_as_sub_models_grow_warn_that_a_loss_needs_its_negation():
    """The warning told a user whose score was already a negated loss to negate it; it now says both cases."""
    from sortednet.nest import _warn_if_loss_like

    subs = [sn.SubModel(i=i) for i in range(4)]
    with pytest.warns(UserWarning, match=r"rank correlation -1.00.*if the score is a loss, pass its negation.*if it "
                                         r"already is a higher-is-better score, larger sub-models score worse"):
        _warn_if_loss_like(sn.Profile(subs, {"params": [1.0, 2.0, 3.0, 4.0]}, [0.9, 0.8, 0.7, 0.6]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_loss_like(sn.Profile(subs, {"params": [1.0, 2.0, 3.0, 4.0]}, [0.6, 0.7, 0.8, 0.9]))


def test_a_score_of_any_real_kind_is_taken_and_others_refused():
    """A score returning a ``Fraction``, a ``Decimal`` or a 0-d NumPy array was refused as "not a real number"
    (budgets take them); strings, bools, complex numbers and arrays of several values still are."""
    from decimal import Decimal
    from fractions import Fraction

    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    nest = sn.wrap(m, sn.Width("h", [2, 4, 8], out="0", inp="1"))
    x = torch.randn(2, 4)
    for kind in (lambda v: Fraction(v, 3), Decimal, lambda v: np.array(float(v)), lambda v: torch.tensor([[v * 1.0]])):
        prof = nest.profile(x, score=lambda s, kind=kind: kind(s["h"]), metrics=("params",), progress=False)
        assert list(prof.scores) == pytest.approx([float(kind(h)) for h in (2, 4, 8)])
        assert nest.pick(params=nest.cost("h=4")) == sn.SubModel(h=4)  # (the best score under the budget)
    for bad in (lambda v: "x", lambda v: True, lambda v: 1 + 2j, lambda v: np.array([1.0, 2.0])):
        with pytest.raises(sn.SortedNetError, match=r"it must return a real number"):
            nest.profile(x, score=lambda s, bad=bad: bad(s["h"]), metrics=("params",), progress=False)


def test_scores_made_stale_by_a_swapped_module_say_so():
    """An activation swapped after profile(score=) made the scores stale, as it should, but the warning blamed
    weights that had not changed ("the model was trained, loaded or calibrated since")."""
    from sortednet.nest import StaleScoresWarning

    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    nest = sn.wrap(m, sn.Width("h", [2, 4, 8], out="0", inp="2"))
    nest.profile(torch.randn(2, 4), score=lambda s: float(s["h"]), metrics=("params",), progress=False)
    m[1] = torch.nn.GELU()
    with pytest.warns(StaleScoresWarning, match=r"measured on another model \(modules were added, removed or "
                                                r"replaced since"):
        nest.pick(params=nest.cost("h=4"))

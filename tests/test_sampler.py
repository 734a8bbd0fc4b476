"""Sampler invariants: purity in (seed, step), distributions, sandwich, state, bad arguments."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import sortednet as sn


def make_nest(n: int = 8) -> sn.Nest:
    sizes = list(range(1, n + 1))
    return sn.wrap(nn.Sequential(nn.Linear(3, n), nn.ReLU(), nn.Linear(n, 2)),
                   sn.Width("h", sizes, out="0", inp="2"))


NEST = make_nest(8)
SUBS = NEST.submodels
N = len(SUBS)


def chi2(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs))


# critical values of chi-square at p = 0.001 for df 1..8 (draws are deterministic, so this never flakes)
CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}

CONFIGS = st.one_of(
    st.fixed_dictionaries({"strategy": st.just("uniform"), "k": st.integers(1, N)}),
    st.fixed_dictionaries({"strategy": st.just("sandwich"), "k": st.integers(2, N)}),
    st.fixed_dictionaries({"strategy": st.just("sandwich"), "k": st.integers(2, N), "weights": st.just("small")}),
    st.fixed_dictionaries({"strategy": st.just("weighted"), "k": st.integers(1, 4),
                           "weights": st.sampled_from(["large", "small", [1, 0, 2, 0, 3, 1, 1, 5]])}),
    st.fixed_dictionaries({"strategy": st.just("all")}),
)


@given(cfg=CONFIGS, seed=st.integers(0, 2**31), steps=st.lists(st.integers(0, 10**9), min_size=1, max_size=6))
def test_draw_is_pure_function_of_seed_and_step(cfg, seed, steps):
    a, b = sn.Sampler(SUBS, seed=seed, **cfg), sn.Sampler(SUBS, seed=seed, **cfg)
    first = [a.draw(s) for s in steps]
    b.draw(12345)  # unrelated draws change nothing
    assert [b.draw(s) for s in reversed(steps)][::-1] == first
    assert [a.draw(s) for s in steps] == first
    for picked in first:
        idx = [SUBS.index(s) for s in picked]
        assert len(picked) == a.k and idx == sorted(set(idx))  # distinct, ascending cost


@pytest.mark.parametrize("strategy,k", [("uniform", 1), ("uniform", 3), ("sandwich", 3)])
def test_seeds_and_steps_give_different_draws(strategy, k):
    s0, s1 = sn.Sampler(SUBS, k=k, strategy=strategy, seed=0), sn.Sampler(SUBS, k=k, strategy=strategy, seed=1)
    d0 = [s0.draw(i) for i in range(50)]
    assert d0 != [s1.draw(i) for i in range(50)]
    assert len({tuple(d) for d in d0}) > 5


@pytest.mark.parametrize("cfg", [
    {"strategy": "uniform", "k": 1},
    {"strategy": "uniform", "k": 3},
    {"strategy": "weighted", "k": 1, "weights": "large"},
    {"strategy": "weighted", "k": 1, "weights": "small"},
    {"strategy": "weighted", "k": 1, "weights": [5, 1, 1, 2, 0.5, 3, 1, 4]},
    {"strategy": "weighted", "k": 1, "weights": "cost", "nest": True},
    {"strategy": "sandwich", "k": 4},
    {"strategy": "sandwich", "k": 3, "weights": "small"},
    {"strategy": "sandwich", "k": 3, "weights": [9, 5, 1, 2, 0.5, 3, 1, 9]},
    {"strategy": "weighted", "k": 3, "weights": [5, 1, 1, 2, 0.5, 3, 1, 4]},
    {"strategy": "weighted", "k": 5, "weights": "large"},
    {"strategy": "sandwich", "k": 5, "weights": [9, 1, 2, 3, 4, 6, 8, 9]},
], ids=str)
def test_inclusion_frequencies_match_expected(cfg):
    cfg = dict(cfg)
    src = NEST if cfg.pop("nest", False) else SUBS
    s = sn.Sampler(src, seed=3, **cfg)
    draws = 4000
    counts = Counter(sub for step in range(draws) for sub in s.draw(step))
    expect = s.expected_fraction()
    random_idx = [i for i, p in enumerate(expect) if 0 < p < 1]
    for i, p in enumerate(expect):
        if p in (0.0, 1.0):
            assert counts[SUBS[i]] == p * draws
    # Pearson statistic on per-draw inclusion frequencies, normalised to a distribution
    obs = [counts[SUBS[i]] for i in random_idx]
    probs = [expect[i] for i in random_idx]
    probs = [p / sum(probs) for p in probs]
    stat = chi2(obs, probs)
    assert stat < CRIT[len(obs) - 1], (stat, obs, probs)


def test_weighted_rules_order_probabilities():
    large = sn.Sampler(SUBS, k=1, strategy="weighted", weights="large").probs
    small = sn.Sampler(SUBS, k=1, strategy="weighted", weights="small").probs
    cost = sn.Sampler(NEST, k=1, strategy="weighted", weights="cost").probs
    assert list(large) == sorted(large) and list(small) == sorted(small, reverse=True)
    assert list(cost) == sorted(cost) and abs(cost.sum() - 1) < 1e-12
    params = [NEST.cost(s) for s in SUBS]
    assert cost[-1] / cost[0] == pytest.approx(params[-1] / params[0])


@given(scale=st.sampled_from([1e-300, 1e-5, 1.0, 1e100, 1e307, 1.7e308]),
       rel=st.lists(st.floats(0.0, 1.0), min_size=N, max_size=N).filter(lambda r: max(r) > 0))
def test_weights_are_scale_free_even_near_the_float_limits(scale, rel):
    """Finite weights of any magnitude give the probabilities of their ratios (a sum of huge weights must not
    overflow to inf, nor tiny ones vanish)."""
    w = [scale * r for r in rel]
    if max(w) == 0:  # (rel * 1e-300 can underflow to 0)
        return
    want = [x / max(w) for x in w]
    if any(a > 0 and x / sum(want) == 0 for a, x in zip(w, want)):  # (a positive share that float64 cannot hold)
        with pytest.raises(sn.SortedNetError, match="positive but too small"):
            sn.Sampler(SUBS, k=1, strategy="weighted", weights=w)
        return
    probs = sn.Sampler(SUBS, k=1, strategy="weighted", weights=w).probs
    lw = sn.Sampler(SUBS, k=1, loss_weights=[scale] * N).loss_weights_for(SUBS[:2])
    assert abs(probs.sum() - 1) < 1e-9 and lw == pytest.approx([0.5, 0.5])
    assert list(probs) == pytest.approx([x / sum(want) for x in want], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("how", ["weights", "all_positive", "loss_weights"])
def test_a_positive_weight_whose_share_underflows_is_refused(how):
    """5e-324 beside 1.0: its ratio to the largest is representable, its share of the sum is not, so the
    sub-model was never drawn though weighted positive, in silence (or refused as if weighted 0: "only 3
    sub-models have a positive weight", "got 0")."""
    w = [5e-324] + [1.0] * (N - 1)
    with pytest.raises(sn.SortedNetError, match=r"5e-324 for .* positive but too small"):
        if how == "weights":
            sn.Sampler(SUBS, k=1, strategy="weighted", weights=w)
        elif how == "all_positive":
            sn.Sampler(SUBS, k=N, strategy="weighted", weights=w)
        else:
            sn.Sampler(SUBS, k=2, loss_weights=w)


@given(k=st.integers(2, N), seed=st.integers(0, 10**6), step=st.integers(0, 10**6),
       weights=st.sampled_from([None, "small", "large"]))
def test_sandwich_has_smallest_and_largest(k, seed, step, weights):
    weights = weights if 2 < k < N else None  # (k=2 and k=N leave weights nothing to choose: refused)
    picked = sn.Sampler(SUBS, k=k, strategy="sandwich", seed=seed, weights=weights).draw(step)
    assert picked[0] == NEST.smallest and picked[-1] == NEST.largest and len(set(picked)) == k


def test_all_returns_every_submodel():
    s = sn.Sampler(SUBS, strategy="all")
    assert s.draw(0) == list(SUBS) == s.draw(99) and s.k == N
    assert sn.Sampler(SUBS, strategy="all", k=N).draw(1) == list(SUBS)


@pytest.mark.parametrize("cfg", [
    {"strategy": "uniform", "k": 2, "seed": 7},
    {"strategy": "sandwich", "k": 3, "seed": 1},
    {"strategy": "weighted", "k": 2, "seed": 4, "weights": [1, 2, 3, 4, 5, 6, 7, 8]},
    {"strategy": "weighted", "k": 1, "seed": 4, "weights": "large"},
    {"strategy": "all", "seed": 0},
], ids=str)
def test_state_round_trip(cfg):
    a = sn.Sampler(SUBS, **cfg)
    b = sn.Sampler(SUBS, k=1, strategy="uniform", seed=99)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [b.draw(i) for i in range(30)] == [a.draw(i) for i in range(30)]
    assert b.state_dict() == a.state_dict()


def test_state_round_trip_cost_rule_needs_nest():
    a = sn.Sampler(NEST, k=2, strategy="weighted", weights="cost", seed=2)
    b = sn.Sampler(NEST, k=1, seed=0)
    b.load_state_dict(a.state_dict())
    assert [b.draw(i) for i in range(20)] == [a.draw(i) for i in range(20)]
    c = sn.Sampler(SUBS, k=1, seed=0)
    before = c.state_dict()
    with pytest.raises(sn.SortedNetError, match="nest"):
        c.load_state_dict(a.state_dict())
    assert c.state_dict() == before


@pytest.mark.parametrize("state,match", [
    ({"strategy": "uniform", "k": 2, "seed": 0, "weights": None, "submodels": ["h=1"]}, "sub-models"),
    ({"strategy": "uniform", "k": 99, "seed": 0, "weights": None}, "k=99"),
    ({"strategy": "bogus", "k": 1, "seed": 0, "weights": None}, "strategy"),
    ({"strategy": "uniform", "k": 1}, "lacks"),
])
def test_bad_state_leaves_sampler_unchanged(state, match):
    s = sn.Sampler(SUBS, k=3, strategy="sandwich", seed=5)
    before, draws = s.state_dict(), [s.draw(i) for i in range(5)]
    state = {"submodels": [str(x) for x in SUBS], **state}
    with pytest.raises(sn.SortedNetError, match=match):
        s.load_state_dict(state)
    assert s.state_dict() == before and [s.draw(i) for i in range(5)] == draws


@pytest.mark.parametrize("args,kwargs,match", [
    ((SUBS,), {"k": 0}, "k=0"),
    ((SUBS,), {"k": -1}, "non-negative"),
    ((SUBS,), {"k": N + 1}, "out of range"),
    ((SUBS,), {"k": 1.5}, "int"),
    ((SUBS,), {}, "needs k"),
    ((SUBS,), {"k": 1, "strategy": "sandwich"}, "2 <= k"),
    ((SUBS,), {"k": N + 1, "strategy": "all"}, "all"),
    ((SUBS,), {"k": 2, "strategy": "all"}, "all"),
    (([],), {"k": 1}, "empty"),
    ((SUBS,), {"k": 1, "strategy": "random"}, "unknown strategy"),
    ((SUBS,), {"k": 1, "strategy": "weighted"}, "needs weights"),
    ((SUBS,), {"k": 1, "strategy": "weighted", "weights": [1, 2]}, "2 entries"),
    ((SUBS,), {"k": 1, "strategy": "weighted", "weights": [1, 1, 1, -1, 1, 1, 1, 1]}, "non-negative"),
    ((SUBS,), {"k": 1, "strategy": "weighted", "weights": [float("nan")] * N}, "finite"),
    ((SUBS,), {"k": 1, "strategy": "weighted", "weights": [0] * N}, "zero"),
    ((SUBS,), {"k": 3, "strategy": "weighted", "weights": [1, 1] + [0] * (N - 2)}, "positive weight"),
    ((SUBS,), {"k": 1, "strategy": "weighted", "weights": "huge"}, "unknown weight rule"),
    ((SUBS,), {"k": 1, "strategy": "weighted", "weights": "cost"}, "needs the nest"),
    ((SUBS,), {"k": 1, "weights": [1] * N}, "only used"),
    ((SUBS,), {"k": 1, "seed": -3}, "seed"),
    (("h=1",), {"k": 1}, "sequence"),
    (([{"h": 1}],), {"k": 1}, "SubModel"),
    (([SUBS[0], SUBS[0]],), {"k": 1}, "twice"),
])
def test_bad_arguments_raise(args, kwargs, match):
    with pytest.raises(sn.SortedNetError, match=match):
        sn.Sampler(*args, **kwargs)


@pytest.mark.parametrize("step", [-1, 1.0, "3", None, True])
def test_bad_step_raises(step):
    with pytest.raises(sn.SortedNetError, match="step"):
        sn.Sampler(SUBS, k=2).draw(step)


@given(cfg=st.sampled_from([{"strategy": "uniform", "k": 2}, {"strategy": "sandwich", "k": 4},
                            {"strategy": "weighted", "k": 2, "weights": [1, 0, 2, 0, 3, 1, 1, 5]}]),
       seed=st.integers(0, 10**6), warm=st.integers(1, 500), after=st.integers(0, 10**6))
def test_small_first_ends_at_the_strategy_itself(cfg, seed, warm, after):
    """From step small_first on, draws are exactly those of the same sampler without the schedule."""
    plain = sn.Sampler(SUBS, seed=seed, **cfg)
    sched = sn.Sampler(SUBS, seed=seed, small_first=warm, **cfg)
    assert sched.draw(warm + after) == plain.draw(warm + after)
    early = sched.draw(warm // 2)
    assert len(set(early)) == sched.k and early == sorted(early, key=SUBS.index)
    if cfg["strategy"] == "sandwich":
        assert early[0] == NEST.smallest and early[-1] == NEST.largest
    if "weights" in cfg:  # a sub-model weighted 0 stays undrawn during the warm-up too
        assert not {SUBS[1], SUBS[3]} & set(early)


@pytest.mark.parametrize("strategy,k", [("uniform", 1), ("sandwich", 3)])
def test_small_first_step_zero_frequencies_follow_position_weights(strategy, k):
    """At step 0 the sub-model at position i is drawn with probability proportional to (n - i)
    (k = 1, or the one middle draw of a sandwich): a chi-square test over 4000 seeds."""
    first = 0 if strategy == "uniform" else 1
    positions = list(range(first, N - first))
    counts = Counter()
    for seed in range(4000):
        picked = sn.Sampler(SUBS, k=k, strategy=strategy, seed=seed, small_first=100).draw(0)
        counts.update(SUBS.index(s) for s in picked if SUBS.index(s) in positions)
    w = [N - i for i in positions]
    probs = [x / sum(w) for x in w]
    obs = [counts[i] for i in positions]
    assert chi2(obs, probs) < CRIT[len(obs) - 1], (obs, probs)
    assert obs[0] > 2 * obs[-1]   # the smallest drawable one far more often than the largest


def test_small_first_state_round_trip_and_bad_values():
    a = sn.Sampler(SUBS, k=3, strategy="sandwich", seed=5, small_first=50)
    b = sn.Sampler(SUBS, k=1, seed=0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [b.draw(i) for i in range(60)] == [a.draw(i) for i in range(60)] and b.small_first == 50
    assert "small_first=50" in repr(a)
    with pytest.raises(sn.SortedNetError, match="small_first"):
        sn.Sampler(SUBS, strategy="all", small_first=10)
    with pytest.raises(sn.SortedNetError, match="small_first"):
        sn.Sampler(SUBS, k=2, small_first=-1)


def test_loss_weights_take_strings_and_dicts_like_every_other_api():
    import torch.nn as nn

    nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 4, 8], out="0", inp="1"))
    for source in (nest, list(nest.submodels)):
        s = sn.Sampler(source, k=2, seed=0, loss_weights="small")
        want = s.loss_weights_for([nest.resolve("h=2"), nest.resolve("h=8")])
        assert s.loss_weights_for(["h=2", {"h": 8}]) == want
        with pytest.raises(sn.SortedNetError, match="names one sub-model twice"):  # (accumulate refuses it too)
            s.loss_weights_for(["h=2", nest.resolve("h=2")])


def test_loss_weights_read_a_partial_name_as_the_nest_does():
    """"a=4" (b left out: its largest size) is a sub-model for nest.resolve and sn.accumulate, but
    loss_weights_for refused it; a sampler built from the nest now reads it the same way, and one built from a
    list says what to do."""
    import torch.nn as nn

    nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
                   sn.Width("a", [4, 8], out="0", inp="2"), sn.Width("b", [2, 8], out="2", inp="4"))
    s = sn.Sampler(nest, k=2, seed=0, loss_weights="small")
    assert s.loss_weights_for(["a=4", {"a": 8, "b": 2}]) == s.loss_weights_for(["a=4,b=8", "a=8,b=2"])
    with pytest.raises(sn.SortedNetError, match="build the sampler from the nest"):
        sn.Sampler(list(nest.submodels), k=2, seed=0, loss_weights="small").loss_weights_for(["a=4", "a=8,b=2"])


def test_a_sampler_refuses_a_list_out_of_cost_order():
    """smallest / largest, draw order, rank-based weights and small_first read the list's order."""
    import torch.nn as nn

    nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
                   sn.Width("a", [2, 4, 8], out="0", inp="2"), sn.Width("b", [2, 8], out="2", inp="4"))
    subs = nest.submodels
    for bad in (subs[::-1], [subs[3], subs[0], subs[5]]):
        with pytest.raises(sn.SortedNetError, match="not in ascending cost"):
            sn.Sampler(bad, k=2, strategy="sandwich")
    sn.Sampler(subs[1:5], k=2, strategy="sandwich")  # a forward slice keeps the order
    for bad_weights in ([True] * len(subs), [1e308] * 0):
        with pytest.raises(sn.SortedNetError):
            sn.Sampler(subs, k=1, strategy="weighted", weights=bad_weights)


def test_a_cost_rule_state_loads_into_a_sampler_of_the_nest_and_says_so_otherwise():
    """State of a sampler whose rule reads costs loads into one built from the nest; one built from
    ``nest.submodels`` (no costs) is refused naming that fix."""
    nest = sn.wrap(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)),
                   sn.Width("h", [2, 4, 8, 16], out="0", inp="2"))
    for kw in ({"strategy": "weighted", "weights": "cost"}, {"strategy": "uniform", "loss_weights": "cost"}):
        a = sn.Sampler(nest, k=2, seed=3, **kw)
        b = sn.Sampler(nest, k=1, seed=0)
        b.load_state_dict(a.state_dict())
        assert b.draw(7) == a.draw(7)
        with pytest.raises(sn.SortedNetError, match=r"sn.Sampler\(nest, ...\)"):
            sn.Sampler(nest.submodels, k=1).load_state_dict(a.state_dict())


def test_a_sampler_built_from_the_nest_pickles_and_copies_without_it():
    """It held the nest (for cost weights), which cannot be pickled: pickle / deepcopy of the sampler raised
    about the Nest. The copy draws the same sub-models with the same loss weights."""
    import copy
    import pickle

    nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 4, 6, 8], out="0", inp="1"))
    s = sn.Sampler(nest, k=2, strategy="sandwich", loss_weights="cost", seed=3)
    for t in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        assert all(t.draw(i) == s.draw(i) and t.loss_weights_for(s.draw(i)) == s.loss_weights_for(s.draw(i))
                   for i in range(6))
        with pytest.raises(sn.SortedNetError, match="needs the nest"):  # rebuilding cost weights needs the nest
            t.load_state_dict(s.state_dict())
    assert s._source is nest   # the original keeps it


def _brute_inclusion(p, k):
    """Every ordered draw of k items, each with its probability (successive sampling)."""
    import itertools

    out = [0.0] * len(p)
    for seq in itertools.permutations(range(len(p)), k):
        pr, left = 1.0, set(range(len(p)))
        for i in seq:
            pr *= p[i] / sum(p[j] for j in left)
            left.discard(i)
        for i in seq:
            out[i] += pr
    return out


@settings(max_examples=40, deadline=None)
@given(w=st.lists(st.floats(0.0, 10.0), min_size=2, max_size=7), k=st.integers(1, 6))
def test_inclusion_is_exact_for_successive_weighted_draws(w, k):
    """expected_fraction for weighted draws of several sub-models (min(1, k p) said 0.3 where 0.454 came out)."""
    from sortednet.sampler import inclusion

    assume(sum(w) > 0)
    p = [x / sum(w) for x in w]
    assume(sum(x > 0 for x in p) > k)  # (a subnormal weight can round to probability 0: the Sampler refuses that)
    got = inclusion(p, k)
    assert got == pytest.approx(_brute_inclusion(p, k), abs=1e-9)
    assert sum(got) == pytest.approx(k)


def test_inclusion_beyond_the_exact_budget_is_close(monkeypatch):
    import sortednet.sampler as smp

    rng = np.random.default_rng(0)
    p = rng.random(9) ** 2
    p /= p.sum()
    exact = smp.inclusion(p, 4)
    monkeypatch.setattr(smp, "EXACT_WORK", 0)
    approx = smp.inclusion(p, 4)
    assert sum(approx) == pytest.approx(4) and max(abs(a - b) for a, b in zip(exact, approx)) < 0.05


def test_weights_take_every_real_number_float_reads_and_refuse_what_is_not_one():
    """Weights are read in the caller's order as ``float()`` reads them (0-d arrays, ``Decimal``, object arrays,
    a column tensor were accepted before the stricter check and must stay so); strings, sets, bools, complex
    numbers are refused, for ``weights=``, ``loss_weights=`` and ``sn.accumulate(weights=)`` alike."""
    import decimal

    nest = sn.wrap(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)),
                   sn.Width("h", [2, 4, 8], out="0", inp="1"))
    good = [[np.array(1.0), np.array(2.0), np.array(3.0)], [decimal.Decimal("1"), 2, 3],
            np.array([1, 2, 3], dtype=object), torch.tensor([[1.0], [2.0], [3.0]]), np.array([1, 2, 3], np.float16),
            [torch.tensor(1.0), torch.tensor(2), np.float32(3)], (x for x in (1, 2, 3)), range(1, 4)]
    for w in good:
        for kw in ("weights", "loss_weights"):
            w = w if not hasattr(w, "__next__") else (x for x in (1, 2, 3))
            s = sn.Sampler(nest, k=2, **({"strategy": "weighted"} if kw == "weights" else {}), **{kw: w})
            assert getattr(s, kw) == [1.0, 2.0, 3.0]
            json.dumps(s.state_dict())
    bad = [["1", "2", "3"], {1.0, 2.0, 3.0}, [np.True_, np.False_, np.True_], [1 + 0j, 2, 3],
           np.array([1 + 1j, 2, 3]), torch.ones(3, 2), {"a": 1}]
    for w in bad:
        with pytest.raises(sn.SortedNetError, match="weights"):
            sn.Sampler(nest, k=1, strategy="weighted", weights=w)
    x = torch.randn(3, 4)
    ref = sn.accumulate(nest, [nest.smallest, nest.largest], lambda: nest.model(x).square().mean(), weights=[0.3, 0.7])
    same = sn.accumulate(nest, [nest.smallest, nest.largest], lambda: nest.model(x).square().mean(),
                         weights=[np.array(0.3), decimal.Decimal("0.7")])
    assert list(ref) == list(same)


@pytest.mark.parametrize("as_", [np.int64, torch.tensor])
def test_integer_scalars_of_numpy_and_torch_are_steps_and_counts(as_):
    """``fit(start_step=torch.tensor(3))`` was accepted but ``Sampler.draw(torch.tensor(3))`` and
    ``Sampler(k=torch.tensor(2))`` refused (a step read back from a saved record): one rule for all now; floats
    and bools stay refused."""
    nest = sn.wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
                   sn.Width("h", [4, 8, 16], out="0", inp="2"))
    s, plain = sn.Sampler(nest, k=as_(2), seed=as_(0)), sn.Sampler(nest, k=2, seed=0)
    assert s.draw(as_(3)) == plain.draw(3)
    for bad in (3.0, True, torch.tensor(3.0), torch.tensor([3])):
        with pytest.raises(sn.SortedNetError, match="step must be a non-negative int"):
            s.draw(bad)


@pytest.mark.parametrize("cfg", [
    dict(k=2, strategy="sandwich", weights="small"),
    dict(k=2, strategy="sandwich", weights=[1.0] + [0.0] * (N - 2) + [1.0]),
    dict(k=2, strategy="sandwich", small_first=1000),
    dict(k=N, strategy="sandwich", weights="large"),
    dict(k=N, strategy="uniform", small_first=1000),
    dict(k=N, strategy="weighted", weights="small"),
    dict(k=N, strategy="weighted", weights="small", small_first=10),
])
def test_an_option_that_changes_no_draw_is_refused(cfg):
    """``Sampler(k=2, strategy="sandwich", weights="small")`` (or ``small_first=``) was accepted and drew exactly
    what the plain sandwich draws (the smallest and the largest, nothing in between), as did either option where
    every step draws every sub-model: the user believed a schedule ran. Refused, naming the option and k."""
    what = "weights=" if "weights" in cfg else "small_first="
    with pytest.raises(sn.SortedNetError, match=rf"{what} .*k={cfg['k']}"):
        sn.Sampler(SUBS, seed=0, **cfg)


@pytest.mark.parametrize("cfg", [
    dict(k=3, strategy="sandwich", weights="small"),
    dict(k=3, strategy="sandwich", small_first=1000),
    dict(k=N - 1, strategy="uniform", small_first=1000),
    dict(k=N - 1, strategy="weighted", weights="small"),
])
def test_the_same_options_with_a_choice_left_move_the_draws(cfg):
    """The cases next to the refused ones are accepted and do change what is drawn."""
    plain = sn.Sampler(SUBS, seed=0, k=cfg["k"], strategy=cfg["strategy"],
                       **({"weights": "large"} if cfg["strategy"] == "weighted" else {}))
    s = sn.Sampler(SUBS, seed=0, **cfg)
    assert any(s.draw(t) != plain.draw(t) for t in range(50))


def test_a_saved_state_with_an_option_that_changes_no_draw_loads_without_it():
    """States earlier versions wrote with weights= / small_first= that change no draw load without them (the
    same draws): a sandwich of k=2, and k equal to the count (a weighted sampler of every sub-model is 'all').
    What they hold is still checked; a state that keeps a choice keeps its options."""
    plain = sn.Sampler(SUBS, k=2, strategy="sandwich", seed=4)
    for extra in (dict(weights="small"), dict(small_first=100), dict(weights=[1.0] * N, small_first=7)):
        s = sn.Sampler(SUBS, k=1, seed=0)
        s.load_state_dict({**plain.state_dict(), **extra})
        assert all(s.draw(t) == plain.draw(t) for t in range(30))
        assert s.state_dict() == plain.state_dict()
    every = sn.Sampler(SUBS, strategy="all", seed=4)
    s = sn.Sampler(SUBS, k=1, seed=0)
    s.load_state_dict({**every.state_dict(), "strategy": "weighted", "weights": list(range(1, N + 1))})
    assert s.state_dict() == every.state_dict() and s.draw(3) == list(SUBS)
    for bad, what in ((dict(weights="bogus"), "weight rule"), (dict(weights=[0.0] * N), "sum to zero"),
                      (dict(small_first=-3), "small_first")):
        with pytest.raises(sn.SortedNetError, match=what):
            sn.Sampler(SUBS, k=1).load_state_dict({**plain.state_dict(), **bad})
    with pytest.raises(sn.SortedNetError, match=rf"only {N - 1} sub-model\(s\) have a positive weight"):
        sn.Sampler(SUBS, k=1).load_state_dict({**every.state_dict(), "strategy": "weighted",
                                               "weights": [0.0] + [1.0] * (N - 1)})  # (refused as then)
    kept = sn.Sampler(SUBS, k=3, strategy="sandwich", seed=4, weights="small", small_first=50)
    s = sn.Sampler(SUBS, k=1)
    s.load_state_dict(kept.state_dict())
    assert s.state_dict() == kept.state_dict()


def test_the_refusal_of_a_no_op_option_says_why():
    with pytest.raises(sn.SortedNetError, match=r"chooses the middle sub-models of a sandwich draw, and k=2"):
        sn.Sampler(SUBS, k=2, strategy="sandwich", weights="small")
    with pytest.raises(sn.SortedNetError, match=r"every step draws all of them; strategy='all'"):
        sn.Sampler(SUBS, k=N, strategy="weighted", weights="small")


def test_a_state_loads_into_a_sampler_of_the_same_submodels_written_in_another_key_order():
    """The same sub-models built with their dimensions in another order (``SubModel(h2=..., h1=...)``) were
    refused ("sampler state is for 9 sub-models ...") though every draw agrees; another list still is."""
    import torch.nn as nn

    m = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 2))
    nest = sn.wrap(m, sn.Width("h1", [4, 8, 16], out="0", inp="1"), sn.Width("h2", [4, 8, 16], out="1", inp="2"))
    mine = [sn.SubModel(h2=s["h2"], h1=s["h1"]) for s in nest.submodels]
    a, b = sn.Sampler(mine, k=2, seed=1), sn.Sampler(nest, k=2, seed=7)
    b.load_state_dict(a.state_dict())
    assert all(a.draw(i) == b.draw(i) for i in range(50))
    with pytest.raises(sn.SortedNetError, match="sampler state is for 9 sub-models"):
        sn.Sampler(list(nest.submodels)[:8], k=2, seed=1).load_state_dict(a.state_dict())


@pytest.mark.parametrize("first", [1e-46, -1.0, 0.0])
def test_a_loss_weight_that_trains_nothing_is_refused_naming_it(first):
    """1e-46 beside 1.0 is positive in float64 and 0 as the float32 scale of a loss: drawn, never trained, in
    silence; a negative one was refused as 'non-negative' though 0 is refused too."""
    with pytest.raises(sn.SortedNetError, match="too small next to the largest to scale a float32 loss" if first > 0
                       else rf"loss_weights must all be positive .*got {first!r} for"):
        sn.Sampler(SUBS, k=2, strategy="sandwich", loss_weights=[first] + [1.0] * (N - 1))


def test_loss_weights_for_an_empty_list_says_it_is_empty():
    s = sn.Sampler(SUBS, k=2, loss_weights="large")
    with pytest.raises(sn.SortedNetError, match="got an empty list"):
        s.loss_weights_for([])

"""Costs (params, FLOPs, memory), Profile round-trips and the Pareto front."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import sortednet as sn
from models import FAMILIES
from sortednet.modes import NoFastPath
from sortednet.profile import pareto_front

FAMS = sorted(FAMILIES)


def naive_params(nest, sub) -> int:
    """Walk every parameter under use(sub): the definition the fast counter must match."""
    with nest.use(sub):
        skipped = {id(p) for m in nest._depth for blk in m._sn.slicer.inactive(m) for p in blk.parameters()}
        total = 0
        for p in nest.model.parameters():
            if id(p) in skipped:
                continue
            holders = nest._tensor_owner.get(id(p))  # (its first holder: no family here skips one of a tie)
            total += holders[0][0]._sn.slicer.numel(*holders[0]) if holders else p.numel()
    return total


def flops_of(model, x) -> int:
    """PyTorch's own FlopCounterMode, fused fast paths off for this call (as count_flops: the counter
    cannot see inside fused kernels) and attention on the math kernel (its score matmuls are plain
    ``bmm`` calls; the CPU's fused kernel has no formula in PyTorch's table)."""
    c = FlopCounterMode(display=False)
    with torch.no_grad(), NoFastPath(), sdpa_kernel(SDPBackend.MATH), c:
        model(x)
    return c.get_total_flops()


def with_rank(family, rank):
    def build():
        case = FAMILIES[family]()
        case.dims = [*case.dims, rank()]
        return case
    return build


BUILDS = {**{f: FAMILIES[f] for f in FAMS},
          "mlp+svd": with_rank("mlp", lambda: sn.Rank("r", [3, 6, 12], targets=["fc1", "fc2"])),
          "lm+lora": with_rank("lm_width_heads_depth", lambda: sn.Rank(
              "rank", [2, 8], targets=["blocks.*.attn.v", "blocks.*.fc1"], mode="lora"))}


@pytest.mark.parametrize("family", sorted(BUILDS))
def test_fast_param_count_equals_module_walk_and_export(family):
    case = BUILDS[family]()
    nest = sn.wrap(case.model, *case.dims)
    for sub in nest.submodels:
        assert nest.cost(sub) == naive_params(nest, sub), sub
    for sub in nest.submodels[:: max(1, len(nest.submodels) // 5)]:
        assert nest.cost(sub) == sum(p.numel() for p in nest.export(sub).parameters()), sub


@pytest.mark.parametrize("family", sorted(BUILDS))
def test_flops_nested_monotone_and_equal_to_export(family):
    """FLOPs count what the export computes: a rank target merged at export (svd ``"auto"`` where
    factors would be larger, lora always) counts as one Linear, as its params do."""
    case = BUILDS[family]()
    full = flops_of(case.model, case.example)
    nest = sn.wrap(case.model, *case.dims)
    flops = {s: nest.cost(s, "flops", example=case.example) for s in nest.submodels}
    for a in nest.submodels:
        for b in nest.submodels:
            if a.nested_in(b):
                assert flops[a] <= flops[b], (a, b)
    assert flops[nest.largest] == full
    for s in (nest.smallest, nest.submodels[len(nest.submodels) // 2]):
        assert flops_of(nest.export(s).eval(), case.example) == flops[s]


@pytest.mark.parametrize("family", ["mlp", "cnn_bn_residual", "lm_width_heads_depth"])
def test_memory_covers_weights_and_grows_with_nesting(family):
    case = FAMILIES[family]()
    nest = sn.wrap(case.model, *case.dims)
    prof = nest.profile(case.example, metrics=("memory",), progress=False)
    mem = dict(zip(prof.submodels, prof.costs["memory"]))
    for s, m in mem.items():
        assert m > nest.cost(s) * 4          # fp32 weights plus some activations
    assert mem[nest.smallest] < mem[nest.largest]
    assert "latency" not in prof.costs and nest.cost(nest.smallest, "memory") == mem[nest.smallest]


@pytest.mark.parametrize("first", [torch.bfloat16, torch.float32])
def test_memory_counts_each_weight_at_its_own_element_size(first):
    """Mixed dtypes (a bf16 layer next to an fp32 one, as Hugging Face's fp32-kept modules): the weights
    of every sub-model count at their own sizes, so memory covers the exported model's bytes."""
    from torch import nn

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 64).to(first)
            self.fc2 = nn.Linear(64, 8).to(torch.float32 if first == torch.bfloat16 else torch.bfloat16)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.to(self.fc1.weight.dtype))).to(self.fc2.weight.dtype))

    nest = sn.wrap(Mixed(), sn.Width("h", [16, 64], out="fc1", inp="fc2"))
    prof = nest.profile(torch.randn(1, 8), metrics=("memory",), progress=False, repeat=1, warmup=0)
    for sub, mem in zip(prof.submodels, prof.costs["memory"]):
        exported = sum(p.numel() * p.element_size() for p in nest.export(sub).parameters())
        assert exported <= mem < exported + 4096, (sub, mem, exported)


def test_bad_metric_and_bad_repeat_raise_before_measuring():
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    with pytest.raises(sn.SortedNetError, match="'energy'"):
        nest.profile(case.example, metrics=("energy",))
    with pytest.raises(sn.SortedNetError, match="repeat"):
        nest.profile(case.example, repeat=0)
    with pytest.raises(sn.SortedNetError, match="'energy'"):
        nest.cost(nest.largest, "energy")
    with pytest.raises(sn.SortedNetError, match="example="):
        nest.cost(nest.largest, "flops")
    assert nest._profile is None


def brute_front(costs, scores):
    """The definition: i is on the front unless some j is no worse everywhere and
    strictly better somewhere (exact duplicates: first one kept)."""
    out = []
    for i, (ci, si) in enumerate(zip(costs, scores)):
        dom = False
        for j, (cj, sj) in enumerate(zip(costs, scores)):
            if j == i:
                continue
            no_worse = sj >= si and all(a <= b for a, b in zip(cj, ci))
            strict = sj > si or any(a < b for a, b in zip(cj, ci))
            dom = dom or (no_worse and (strict or j < i))
        if not dom:
            out.append(i)
    return out


@pytest.mark.parametrize("costs,scores,front", [
    ([(1,), (2,), (3,)], [0.1, 0.2, 0.3], [0, 1, 2]),          # all on the front
    ([(1,), (2,), (3,)], [0.3, 0.2, 0.1], [0]),                # cheapest dominates
    ([(1,), (2,), (3,), (4,)], [0.5, 0.4, 0.9, 0.9], [0, 2]),  # equal score, more cost: dominated
    ([(2,), (1,), (2,)], [0.7, 0.7, 0.8], [1, 2]),
    ([(1, 5), (5, 1), (3, 3), (4, 4)], [1, 1, 1, 1], [0, 1, 2]),  # two metrics: (4,4) dominated by (3,3)
    ([(1, 1), (1, 1)], [0.5, 0.5], [0]),                       # duplicates: first kept
])
def test_pareto_front_hand_built(costs, scores, front):
    assert pareto_front(costs, scores) == front


@given(st.integers(1, 3).flatmap(lambda k: st.lists(
    st.tuples(st.tuples(*[st.integers(0, 4)] * k), st.integers(0, 4)), min_size=1, max_size=25)))
def test_pareto_front_matches_definition(points):
    costs, scores = [p[0] for p in points], [p[1] for p in points]
    assert pareto_front(costs, scores) == brute_front(costs, scores)


profiles = st.integers(1, 6).flatmap(lambda n: st.builds(
    lambda vals, sc, dev: sn.Profile(tuple(sn.SubModel(h=i + 1) for i in range(n)),
                                     {"params": tuple(vals[0]), "latency": tuple(vals[1])}, sc, dev),
    st.lists(st.lists(st.floats(0, 1e9, allow_nan=False), min_size=n, max_size=n), min_size=2, max_size=2),
    st.one_of(st.none(), st.lists(st.floats(-1, 1, allow_nan=False), min_size=n, max_size=n).map(tuple)),
    st.sampled_from(["cpu", "cuda:0"])))


@given(profiles)
def test_profile_dict_and_json_round_trip(prof):
    assert sn.Profile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof
    table = prof.to_markdown()
    assert table.count("\n") == len(prof.submodels) + 2
    assert table.count("| * |") == len(prof.front("params"))


def test_profile_rejects_bad_tables():
    subs = (sn.SubModel(h=1), sn.SubModel(h=2))
    with pytest.raises(sn.SortedNetError, match="'speed'"):
        sn.Profile(subs, {"speed": (1.0, 2.0)})
    with pytest.raises(sn.SortedNetError, match="1 values for 2"):
        sn.Profile(subs, {"params": (1.0,)})
    for bad in ({"costs": {}}, {"submodels": [{"h": 1}], "costs": {"params": ["a"]}},
                {"submodels": ["h=1"], "costs": {"params": [1]}}, [("costs", {})]):
        with pytest.raises(sn.SortedNetError, match="not a Profile"):
            sn.Profile.from_dict(bad)
    good = sn.Profile(subs, {"params": (1.0, 2.0)}, (0.5, 0.7)).to_dict()
    good["score"] = good.pop("scores")  # a misspelt key: the scores were dropped in silence
    with pytest.raises(sn.SortedNetError, match=r"unknown keys \['score'\]"):
        sn.Profile.from_dict(good)


@pytest.mark.parametrize("family", ["mlp", "cnn_bn_residual"])
def test_profile_saved_and_loaded_with_the_checkpoint(family, tmp_path):
    case = FAMILIES[family]()
    nest = sn.wrap(case.model, *case.dims)
    # an arbitrary score, the same in every process (hash() of a str is salted per process)
    prof = nest.profile(case.example, score=lambda s: -float(zlib.crc32(str(s).encode()) % 13), repeat=2,
                        progress=False)
    path = tmp_path / "n.safetensors"
    sn.save(nest, path)
    again = sn.load(FAMILIES[family]().model, path)
    assert again._profile == prof
    for m in prof.costs:
        lim = sorted(prof.costs[m])[len(prof.costs[m]) // 2]
        assert again.pick(**{m: lim}) == nest.pick(**{m: lim})
    prof.plot(str(tmp_path / "p.png"), "flops")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


class _TiedDepth(torch.nn.Module):
    """A head tied to the last block's weight, and (``shared``) blocks that reuse the first block's layer:
    a skipped block's weight still runs when another module holds it."""

    def __init__(self, shared: bool):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        if shared:
            for b in range(1, 3):
                self.blocks[b] = self.blocks[0]
        self.head = torch.nn.Linear(8, 8)
        self.head.weight = self.blocks[2].weight

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return self.head(x)


@pytest.mark.parametrize("shared", [False, True])
def test_params_of_skipped_blocks_count_when_a_running_module_holds_them(shared):
    """cost(sub, "params") equals the exported model's parameters, and pick never goes over budget,
    with weights tied across a Depth boundary or layers shared between blocks."""
    torch.manual_seed(0)
    model = _TiedDepth(shared)
    nest = sn.wrap(model, sn.Depth("depth", [1, 2, 3], layers="blocks"))
    x = torch.randn(2, 8)
    for sub in nest.submodels:
        small = nest.export(sub)
        assert nest.cost(sub, "params") == sum(p.numel() for p in small.parameters()), sub
        with nest.use(sub), torch.no_grad():
            torch.testing.assert_close(small(x), model(x), atol=1e-6, rtol=0)
    for budget in range(100, 260, 8):
        try:
            sub = nest.pick(params=budget)
        except sn.BudgetError:
            continue
        assert sum(p.numel() for p in nest.export(sub).parameters()) <= budget


def test_flops_of_an_example_after_loading_a_profile_of_another(tmp_path):
    """A loaded profile's FLOPs were counted on the file's example: cost(sub, "flops", example=x)
    counts x, never returns the file's number."""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def dims():
        return [sn.Width("h", [8, 16, 32], out="0", inp="2")]

    x1, x64 = torch.randn(1, 8), torch.randn(64, 8)
    other = sn.wrap(build(), *dims())
    other.profile(x64, repeat=1, warmup=0, progress=False)
    sn.save(other, tmp_path / "p.safetensors")
    nest = sn.wrap(build(), *dims())
    want = nest.cost(nest.smallest, "flops", example=x1)
    sn.load(nest, tmp_path / "p.safetensors")
    assert nest.cost(nest.smallest, "flops") == other.cost(other.smallest, "flops")  # the profile's table
    assert nest.cost(nest.smallest, "flops", example=x1) == want
    assert nest.cost(nest.smallest, "flops", example=x64) == other.cost(other.smallest, "flops")


def test_counting_flops_changes_no_state():
    """cost(sub, "flops", example=) counts on a private eval-mode view: a model in training mode keeps
    its BatchNorm statistics, its training flag and the global random stream."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Dropout(0.5),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).train()
    nest = sn.wrap(model, sn.Width("c", [4, 8], out="0", norm="1", inp="5"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 6, 6)
    rng = torch.get_rng_state()
    assert nest.cost(nest.smallest, "flops", example=x) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.training and all(m.training for m in model.modules())


def test_a_profiles_flops_answer_for_its_own_example():
    """cost(sub, "flops", example=x) with the profile's own example keeps the profile's FLOPs for pick."""
    import torch.nn as nn

    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    nest = sn.wrap(m, sn.Width("a", [4, 8, 32], out="0", inp="2"))
    x = torch.randn(1, 8)
    prof = nest.profile(x, repeat=1, warmup=0, progress=False)
    best = nest.pick(flops=prof.costs["flops"][1])
    assert nest.cost("a=4", "flops", example=x) == prof.costs["flops"][0]
    assert nest.pick(flops=prof.costs["flops"][1]) == best
    assert nest.cost("a=8", "flops") == prof.costs["flops"][1]


def test_a_new_profile_keeps_costs_it_does_not_measure_again_only_if_counted_by_cost():
    import torch.nn as nn

    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    nest = sn.wrap(m, sn.Width("h", [2, 4, 8], out="0", inp="2"))
    x = torch.randn(1, 4)
    flops = [nest.cost(s, "flops", example=x) for s in nest.submodels]
    nest.profile(x, metrics=["latency"], repeat=2, warmup=0, progress=False)
    assert [nest.cost(s, "flops") for s in nest.submodels] == flops  # counted by cost(): kept
    nest.pick(flops=flops[1], latency=1.0)
    nest.profile(x, metrics=["params"], repeat=1, warmup=0, progress=False)  # replaces the measured latency
    with pytest.raises(sn.SortedNetError, match="latency"):
        nest.pick(latency=1.0)


def test_costs_follow_parameters_replaced_after_wrap():
    """load_state_dict(assign=True) (or fully_shard, or a .to() that replaces parameters) puts new objects of
    the same names and shapes in: parameter counts (Depth-skipped blocks left out) and weight bytes follow."""
    case = FAMILIES["lm_width_heads_depth"]()
    nest = sn.wrap(case.model, *case.dims)
    before = {s: sum(p.numel() for p in nest.export(s).parameters()) for s in nest.submodels}
    fresh = {k: v.detach().clone().double() if v.is_floating_point() else v.clone()
             for k, v in case.model.state_dict().items()}
    case.model.load_state_dict(fresh, assign=True)
    for s in nest.submodels:
        exported = nest.export(s)
        assert nest.cost(s) == before[s] == sum(p.numel() for p in exported.parameters()), s
    prof = nest.profile(case.example.clone(), metrics=("memory",), progress=False, repeat=1, warmup=0)
    for s, mem in zip(prof.submodels, prof.costs["memory"]):
        assert mem >= sum(p.numel() * p.element_size() for p in nest.export(s).parameters()), s



def test_measured_memory_and_latency_are_dropped_when_the_dtypes_change():
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    nest.profile(case.example, metrics=("params", "memory", "latency"), progress=False, repeat=1, warmup=0)
    case.model.double()
    with pytest.warns(UserWarning, match="no longer apply"):
        with pytest.raises(sn.SortedNetError, match="memory"):
            nest.pick(memory=10**9)
    assert sorted(nest._profile.costs) == ["params"] and nest.pick(params=10**9) == nest.largest
    prof = nest.profile(case.example.double(), metrics=("memory",), progress=False, repeat=1, warmup=0)
    for s, mem in zip(prof.submodels, prof.costs["memory"]):
        assert mem >= sum(p.numel() * 8 for p in nest.export(s).parameters())


def test_a_table_writes_latency_with_its_unit():
    subs = (sn.SubModel(h=2), sn.SubModel(h=4), sn.SubModel(h=8))
    table = sn.Profile(subs, {"params": (10.0, 20.0, 40.0), "latency": (8.5e-4, 1.44e-3, 2.5)}).to_markdown()
    assert "| latency |" in table.splitlines()[0]
    assert [line.split(" | ")[2] for line in table.splitlines()[2:]] == ["850 µs", "1.44 ms", "2.5 s"]


def test_flops_are_recounted_for_a_control_tensor_of_another_value():
    """A one-element integer tensor that a forward branches on (a step count) keys the FLOPs table by its
    value, as a Python int does (the count of the first value was returned for every other)."""
    class Steps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.big, self.o = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)

        def forward(self, x, steps):
            h = self.a(x)
            for _ in range(int(steps)):
                h = self.big(h)
            return self.o(h)

    m = Steps()
    nest = sn.wrap(m, sn.Width("w", [8, 16], out=["a", "big"], inp=["big", "o"]))
    x = torch.randn(2, 8)
    by_int = [nest.cost("w=8", "flops", example=(x, n)) for n in (1, 5)]
    by_tensor = [nest.cost("w=8", "flops", example=(x, torch.tensor(n))) for n in (1, 5)]
    assert by_tensor == by_int and by_int[0] < by_int[1]


def test_flops_are_recounted_for_a_mask_of_other_values():
    """A forward that keeps the rows a bool mask selects (token dropping, routing) does work in proportion to the
    mask's True count: a mask of the same shape and other values is counted again (the count of the first
    mask was returned, 10x too many FLOPs), and each count equals the export's."""
    class Keep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

        def forward(self, x, keep):
            return self.b(torch.relu(self.a(x[keep])))

    nest = sn.wrap(Keep(), sn.Width("h", [16, 64], out="a", inp="b"))
    x, every, few = torch.randn(100, 16), torch.ones(100, dtype=torch.bool), torch.zeros(100, dtype=torch.bool)
    few[:10] = True
    for sub in nest.submodels:
        counts = [nest.cost(sub, "flops", example=(x, m)) for m in (every, few, every)]
        small = nest.export(sub)
        assert counts == [flops_of(lambda inp, small=small: small(*inp), (x, m)) for m in (every, few, every)]
        assert counts[1] * 10 == counts[0]


def _mlp_nest():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return model, sn.wrap(model, sn.Width("h", [8, 16, 32], out="0", inp="2"))


def test_a_profiles_flops_stay_picks_table_and_survive_save_and_load(tmp_path):
    """Counting FLOPs on another example answers that call but leaves the profile's table (measured on the
    example of its latency and memory, and the one sn.save stores) to pick: the same budget picks the same
    sub-model before and after a save and load."""
    x1, x64 = torch.randn(1, 8), torch.randn(64, 8)
    model, nest = _mlp_nest()
    prof = nest.profile(x1, repeat=1, warmup=0, progress=False)
    big = [nest.cost(s, "flops", example=x64) for s in nest.submodels]
    assert big == [64 * f for f in prof.costs["flops"]]                       # the call counts its example
    assert [nest.cost(s, "flops") for s in nest.submodels] == list(prof.costs["flops"])
    budget = prof.costs["flops"][1]
    picked = [nest.pick(flops=budget), nest.pick(flops=budget, memory=1e12)]
    sn.save(nest, tmp_path / "n.safetensors")
    _, fresh = _mlp_nest()
    sn.load(fresh, tmp_path / "n.safetensors")
    assert [fresh.cost(s, "flops") for s in fresh.submodels] == [nest.cost(s, "flops") for s in nest.submodels]
    assert [fresh.pick(flops=budget), fresh.pick(flops=budget, memory=1e12)] == picked == [nest.submodels[1]] * 2


def test_pick_refuses_flops_and_measured_limits_of_two_different_inputs():
    """FLOPs counted on one input next to latency / memory profiled on another: refused, not mixed."""
    x1, x64 = torch.randn(1, 8), torch.randn(64, 8)
    _, nest = _mlp_nest()
    nest.profile(x1, metrics=("params", "latency", "memory"), repeat=1, warmup=0, progress=False)
    flops = [nest.cost(s, "flops", example=x64) for s in nest.submodels]
    assert nest.pick(flops=flops[1]) == nest.submodels[1]                     # FLOPs alone: one input
    for measured in ("memory", "latency"):
        with pytest.raises(sn.SortedNetError, match=rf"pick\(flops=\.\.\., {measured}=\.\.\.\).*another input"):
            nest.pick(flops=flops[1], **{measured: 1e12})
    flops = [nest.cost(s, "flops", example=x1) for s in nest.submodels]      # the profile's input
    assert nest.pick(flops=flops[1], memory=1e12, latency=1e12) == nest.submodels[1]


class _Gram(torch.nn.Module):
    """No parameters, but a matmul: FLOPs of its own."""

    def forward(self, x):
        return x @ x.T @ x


@pytest.mark.parametrize("change", ["append", "replace"])
def test_a_module_without_parameters_added_or_replaced_after_profiling_is_counted_again(change):
    """The model's parameters stay, its forward does not: FLOPs are counted on the new forward (they were served
    from the table of the old one), and the profile's measured costs are dropped with a warning."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(6, 8)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4), torch.nn.Identity())
    nest = sn.wrap(model, sn.Width("h", [8, 16, 32], out="0", inp="2"))
    nest.profile(x, repeat=1, warmup=0, progress=False)
    before = [nest.cost(s, "flops", example=x) for s in nest.submodels]
    if change == "append":  # a Sequential on the way to sliced modules grew at its end: nothing sliced moved
        model.append(_Gram())
    else:
        model[3] = _Gram()
    with pytest.warns(UserWarning, match=r"added, removed or replaced after nest.profile.*'flops', 'latency'"):
        now = [nest.cost(s, "flops", example=x) for s in nest.submodels]
    want = []
    for s in nest.submodels:
        with FlopCounterMode(display=False) as counter:
            nest.export(s)(x)
        want.append(counter.get_total_flops())
    assert now == want and all(a > b for a, b in zip(now, before))
    with pytest.raises(sn.SortedNetError, match="latency"):
        nest.pick(latency=1.0)
    assert nest.pick(flops=now[1]) == nest.submodels[1]


class _Recurrent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.rnn(x)[0])))


def test_a_recurrent_layer_counts_the_same_on_the_fused_and_the_plain_kernel():
    """nn.LSTM on the CPU runs oneDNN's fused layer, which PyTorch's FLOP table does not know (it counted as
    zero); with oneDNN off the same layer runs as plain matmuls: both counts agree."""
    x = torch.randn(3, 5, 8)
    counts = []
    for fused in (True, False):
        torch.manual_seed(0)
        with torch.backends.mkldnn.flags(enabled=fused):
            nest = sn.wrap(_Recurrent().eval(), sn.Width("h", [16, 64], out="fc1", inp="fc2"))
            counts.append([nest.cost(s, "flops", example=x) for s in nest.submodels])
    assert counts[0] == counts[1]
    lstm = 2 * 3 * 5 * sum(p.numel() for n, p in nest.model.rnn.named_parameters() if n.startswith("weight"))
    assert counts[0][0] > lstm


def test_a_bilinear_layer_counts_its_multiply_adds():
    """nn.Bilinear runs ``aten._trilinear``, which PyTorch's FLOP table does not know (it counted as zero):
    ``2 x N x out x in1 x in2``."""

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.bl = torch.nn.Linear(8, 32), torch.nn.Linear(32, 6), torch.nn.Bilinear(6, 5, 7)

        def forward(self, x):
            return self.bl(self.fc2(torch.relu(self.fc1(x))), x[:, :5])

    nest = sn.wrap(Head(), sn.Width("h", [8, 32], out="fc1", inp="fc2"))
    x = torch.randn(4, 8)
    assert [nest.cost(s, "flops", example=x) for s in nest.submodels] == [
        2 * 4 * 8 * h + 2 * 4 * h * 6 + 2 * 4 * 7 * 6 * 5 for h in (8, 32)]


def _nest_calling(name: str) -> sn.Nest:
    """A nest whose first layer runs through a new custom operator ``name`` (``ns::op``, x @ w.t()) that has no
    flop formula."""
    @torch.library.custom_op(name, mutates_args=())
    def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w.t()

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 3)

        def forward(self, x):
            return self.fc2(torch.relu(product(x, self.fc1.weight) + self.fc1.bias))

    return sn.wrap(Custom(), sn.Width("h", [8, 32], out="fc1", inp="fc2"))


def test_an_operator_without_a_flop_formula_is_refused_not_counted_as_zero():
    """A matmul-like custom operator has no formula: counting refuses it (naming it) instead of a total
    without its work; once a formula is registered it counts."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    name = f"sntest_{zlib.crc32(str(id(object())).encode())}::fused_mm"
    nest = _nest_calling(name)
    x = torch.randn(4, 8)
    with pytest.raises(sn.SortedNetError, match=r"operator sntest_\d+\.fused_mm"):
        nest.cost(nest.smallest, "flops", example=x)
    with pytest.raises(sn.SortedNetError, match="fused_mm"):
        nest.profile(x, metrics=("flops",), progress=False)
    with pytest.raises(sn.SortedNetError,  # nothing half-counted was kept
                       match=r"no 'flops' cost .* nest.cost\(sub, 'flops', example=x\) \(sn.wrap\("):
        nest.cost(nest.smallest, "flops")
    op = getattr(torch.ops, name.split("::")[0]).fused_mm

    @register_flop_formula(op)
    def _(x_shape, w_shape, *args, **kwargs):
        return 2 * x_shape[0] * x_shape[1] * w_shape[0]

    try:
        flops = [nest.cost(s, "flops", example=x) for s in nest.submodels]
        assert flops == [2 * 4 * 8 * h + 2 * 4 * h * 3 for h in (8, 32)]
    finally:
        flop_registry.pop(op, None)


def test_matrix_vector_and_dot_products_are_counted():
    """``W @ v`` with a 1-D ``v`` runs as aten.mv, which PyTorch's table has no formula for: a hand-written RNN
    cell over one unbatched sequence counted its recurrence as zero (pick(flops=) chose a sub-model 7.8x over the
    budget). mv, addmv and dot now count their multiply-adds."""
    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.rec, self.o = torch.nn.Linear(8, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 2)
            self.q = torch.nn.Parameter(torch.randn(2))

        def forward(self, x):  # x: (T, 8), one sequence
            u, st = self.a(x), torch.zeros(self.rec.weight.shape[0])
            for t in range(x.shape[0]):
                st = torch.tanh(self.rec.weight @ st + u[t])                   # aten.mv
                st = torch.addmv(self.rec.bias, self.rec.weight, st).tanh()    # aten.addmv
            return torch.dot(self.o(st), self.q)                                # aten.dot

    nest = sn.wrap(Cell(), sn.Width("h", [8, 64], out=["a", "rec"], inp=["rec", "o"]))
    x = torch.randn(5, 8)
    assert [nest.cost(s, "flops", example=x) for s in nest.submodels] == [
        2 * 5 * 8 * h + 5 * 2 * (2 * h * h) + 2 * h * 2 + 2 * 2 for h in (8, 64)]


@pytest.mark.parametrize("word", ["mymatmul", "my_gemv", "qmv", "vdot_q"])
def test_an_operator_named_for_a_product_without_a_formula_is_refused(word):
    nest = _nest_calling(f"sntest_{zlib.crc32(str(id(object())).encode())}_{word}::{word}")
    with pytest.raises(sn.SortedNetError, match=f"cannot count the FLOPs of operator .*{word}"):
        nest.cost(nest.smallest, "flops", example=torch.randn(4, 8))


def test_a_tied_tensor_is_counted_at_the_cut_of_a_holder_that_runs():
    """One weight held by two blocks, each with a Width of its own, under a Depth: at depth 1 cost counted it at
    the skipped block's cut (816 where the export holds 1072; two sub-models computing the same model cost
    differently). Every exportable sub-model's cost now equals its export."""
    from torch import nn

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
                                        for _ in range(2))

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x

    torch.manual_seed(0)
    m = Two()
    m.blocks[1][0].weight = m.blocks[0][0].weight
    nest = sn.wrap(m, sn.Width("f0", [16, 32], out="blocks.0.0", inp="blocks.0.2"),
                   sn.Width("f1", [16, 32], out="blocks.1.0", inp="blocks.1.2"),
                   sn.Depth("depth", [1, 2], layers="blocks"))
    for sub in nest.submodels:
        try:
            exported = nest.export(sub)
        except sn.SortedNetError:  # (a tied tensor cut two ways where both blocks run: no plain model holds it)
            continue
        held = sum({id(p): p.numel() for p in exported.parameters()}.values())
        assert nest.cost(sub) == held, sub
    assert nest.cost("f0=32,f1=16,depth=1") == nest.cost("f0=32,f1=32,depth=1")


def test_a_tensor_tied_to_an_unbound_layer_counts_whole_when_its_bound_holder_is_skipped():
    """A block's weight also held by a layer outside the Depth that no dimension binds: at depth 1 the block does
    not run, the other layer holds the tensor whole, and cost counted it at the skipped block's cut."""
    from torch import nn

    def mlp():
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.post = nn.ModuleList(mlp() for _ in range(2)), mlp()

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x + self.post(x)

    torch.manual_seed(0)
    m = M()
    m.post[0].weight = m.blocks[1][0].weight
    nest = sn.wrap(m, sn.Width("f1", [16, 32], out="blocks.1.0", inp="blocks.1.2"),
                   sn.Depth("depth", [1, 2], layers="blocks"))
    for sub in ("f1=16,depth=1", "f1=32,depth=1"):
        assert nest.cost(sub) == sum({id(p): p.numel() for p in nest.export(sub).parameters()}.values()), sub
    # both run at depth 2: 'post' reads the tensor whole, so it counts whole (it was counted at the block's cut, 480
    # elements short, so the depth-2 sub-model cost less than the depth-1 one it contains: nest.submodels came out
    # in another order than containment and sn.Sampler(nest.submodels) refused them)
    full_tied = m.post[0].weight.numel()
    with nest.use("f1=16,depth=2"):
        assert tuple(m.post[0].weight.shape) == (32, 16) and tuple(m.blocks[1][0].weight.shape) == (16, 16)
    assert nest.cost("f1=16,depth=2") == nest.cost("f1=16,depth=1") + sum(
        p.numel() for p in m.blocks[1].parameters()) - full_tied - 16 * 16 - 16
    costs = [nest.cost(s) for s in nest.submodels]
    assert costs == sorted(costs) and nest.cost("f1=16,depth=2") > nest.cost("f1=16,depth=1")
    sn.Sampler(nest, k=2, strategy="sandwich").draw(0)


class _Masked(torch.nn.Module):
    """A block holding a large buffer its forward reads (a mask, a rotary table)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.register_buffer("mask", torch.ones(128, 128))

    def forward(self, x):
        return self.fc(x) + self.mask[:1, :16]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_memory_counts_the_buffers_the_export_holds(family):
    """The memory cost counted parameters and the forward's new tensors, not buffers (BatchNorm statistics,
    masks, rotary tables): pick(memory=) chose a sub-model whose export held 1 MiB of buffers under a 10 KB
    budget. Each sub-model now counts the buffers its export holds, cut and depth-skipped as there."""
    from sortednet.cost import _buffer_bytes

    case = FAMILIES[family]()
    nest = sn.wrap(case.model, *case.dims)
    for sub in {nest.smallest, nest.largest, *nest.submodels[:: max(1, len(nest.submodels) // 4)]}:
        small = nest.export(sub)
        want = sum(b.numel() * b.element_size() for b in small.buffers())
        with nest.use(sub):
            assert _buffer_bytes(nest, nest.model) == want, sub
        assert _buffer_bytes(nest, small) == want
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), _Masked(), _Masked(), torch.nn.Linear(16, 2))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="1.fc"))
    x = torch.randn(2, 8)
    prof = nest.profile(x, metrics=("params", "memory"), repeat=1, progress=False)
    assert all(v >= 2 * 128 * 128 * 4 for v in prof.costs["memory"])
    # the live profile (a private view of the model) counts the buffers as cut, as the export holds them
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                             torch.nn.Linear(64, 2)).eval()
    bnest = sn.wrap(bn, sn.Width("w", [16, 64], out="0", norm="1", inp="3"))
    live, exported = (bnest.profile(x, metrics=("memory",), repeat=1, progress=False, on=on).costs["memory"]
                      for on in ("live", "export"))
    assert list(live) == list(exported) and live[0] < live[-1]
    with pytest.raises(sn.BudgetError, match="memory"):
        nest.pick(memory=10_000)


@pytest.mark.parametrize("bad", [dict(warmup="3"), dict(warmup=1.5), dict(warmup=None), dict(warmup=True),
                                 dict(metrics=None), dict(metrics=[1]), dict(repeat=True)])
def test_bad_profile_arguments_are_named_not_blamed_on_the_example(bad):
    """warmup="3" / None / 1.5 and metrics=None failed inside the timing loop and were reported as a failure of
    the model "on the example"; warmup=True was stored as the profile's warmup."""
    from torch import nn

    nest = sn.wrap(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2)), sn.Width("h", [4, 16], out="0", inp="1"))
    key = next(iter(bad))
    with pytest.raises(sn.SortedNetError, match=rf"{key}.*{bad[key]!r}"):
        nest.profile(torch.randn(2, 8), progress=False, **{"repeat": 1, "warmup": 0, **bad})
    assert nest._profile is None


@pytest.mark.parametrize("metric", ["latency", "memory"])
def test_cost_refuses_an_example_for_a_measured_metric(metric):
    """cost(sub, "memory", example=big) returned the profile's figure on its own small input, as if measured on
    the big one; example= counts FLOPs only (params ignore it)."""
    from torch import nn

    nest = sn.wrap(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2)), sn.Width("h", [4, 16], out="0", inp="1"))
    nest.profile(torch.randn(1, 8), metrics=[metric], repeat=1, warmup=0, progress=False)
    assert nest.cost("h=4", metric) > 0
    with pytest.raises(sn.SortedNetError, match=rf"cost\(\.\.\., '{metric}', example=\.\.\.\): {metric} is measured "
                                                r"by nest.profile"):
        nest.cost("h=4", metric, example=torch.randn(4096, 8))
    assert nest.cost("h=4", "params", example=torch.randn(4096, 8)) == nest.cost("h=4")


def test_profile_takes_any_iterable_of_metric_names_and_numpy_integers():
    """The argument checks must not refuse what worked: a set / dict keys / generator of names, numpy ints."""
    import numpy as np
    from torch import nn

    nest = sn.wrap(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2)), sn.Width("h", [4, 16], out="0", inp="1"))
    for metrics in ({"flops"}, {"flops": 1}.keys(), (m for m in ["flops"]), np.array(["flops"])):
        prof = nest.profile(torch.randn(2, 8), metrics=metrics, repeat=np.int64(1), warmup=np.int64(0),
                            progress=False)
        assert set(prof.costs) == {"params", "flops"} and all(type(m) is str for m in prof.costs)


class _Repeats:
    """A batch object of one's own: its number of passes changes the FLOPs, its tensor's shape does not."""

    def __init__(self, x, repeats):
        self.x, self.repeats = x, repeats


class _Slot:
    __slots__ = ("x",)

    def __init__(self, x):
        self.x = x


class _ObjectInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, batch):
        x = batch.x
        for _ in range(getattr(batch, "repeats", 1)):
            x = self.b(torch.relu(self.a(x)))
        return x


def test_flops_of_object_inputs_are_never_taken_from_another_input():
    """FLOPs are kept per input signature. An object input was signed by its repr: a cache's repr does not show its
    positions, and an object's default repr only its address, which a later object reuses (three inputs of 1, 64
    and 1,000 rows all got the first count); signed by its type and its tensors alone, a field that sets the work
    (passes over the data) was lost. Signed field by field now."""
    nest = sn.wrap(_ObjectInput(), sn.Width("h", [16, 32], out="a", inp="b"))
    x = torch.randn(2, 8)
    counts = [nest.cost(nest.largest, "flops", example=_Repeats(x, r)) for r in (1, 4)]
    assert counts[1] == 4 * counts[0]
    rows = [nest.cost(nest.largest, "flops", example=_Slot(torch.randn(n, 8))) for n in (1, 64, 1000)]
    assert rows[1] == 64 * rows[0] and rows[2] == 1000 * rows[0]


class _Steps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    def forward(self, x, steps):
        for _ in range(steps()):
            x = self.b(torch.relu(self.a(x)))
        return x


class _Counts:
    def one(self):
        return 1

    def three(self):
        return 3


def test_flops_of_inputs_holding_functions_are_counted_for_each_function():
    """A function in the example was signed by its repr, whose address a freed closure's successor reuses (four
    closures returning 1..4 passes all got the first count), and a bound method by its object alone (s.one and
    s.three alike). Signed by identity now, the signature holding the function (no successor takes its address):
    one function passed again is the same input (a FLOPs table for pick), another is counted afresh."""
    nest = sn.wrap(_Steps(), sn.Width("h", [2, 8], out="a", inp="b"))
    x = torch.randn(1, 4)

    def passes(n):
        return lambda: n

    one = nest.cost("h=8", "flops", example=(x, passes(1)))
    assert [nest.cost("h=8", "flops", example=(x, passes(n))) for n in (1, 2, 3, 4)] == [one, 2 * one, 3 * one, 4 * one]
    s = _Counts()
    assert nest.cost("h=8", "flops", example=(x, s.one)) == one
    assert nest.cost("h=8", "flops", example=(x, s.three)) == 3 * one
    import functools
    assert nest.cost("h=8", "flops", example=(x, functools.partial(int, 2))) == 2 * one
    assert nest.cost("h=8", "flops", example=(x, functools.partial(int, 4))) == 4 * one
    three = passes(3)
    for sub in nest.submodels:  # (one function for every sub-model: one table, which pick reads)
        nest.cost(sub, "flops", example=(x, three))
    assert nest.pick(flops=3 * one) == nest.largest


class _Options:
    """Options read as attributes over a dict: a missing one raises KeyError, not AttributeError."""

    def __init__(self, **d):
        self.__dict__["_d"] = d

    def __getattr__(self, k):
        return self._d[k]


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x, opts):
        return self.b(torch.relu(self.a(x))) * opts.scale


def test_inputs_of_ones_own_are_read_without_raising():
    """Looking for a key/value cache in the example read ``get_seq_length`` from every object: an object whose
    __getattr__ raises KeyError made cost, check, profile and discover fail with a raw KeyError."""
    nest = sn.wrap(_Scaled(), sn.Width("h", [16, 32], out="a", inp="b"))
    ex = (torch.randn(2, 8), _Options(scale=2.0))
    assert nest.cost(nest.largest, "flops", example=ex) > 0
    nest.check(ex)
    assert sn.discover(_Scaled(), ex, ratios=[0.5, 1.0])


class _Passes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    def forward(self, x, n):
        k = n.stop if isinstance(n, slice) else len(n) if isinstance(n, (set, range, np.ndarray)) else int(n)
        for _ in range(k):
            x = self.b(self.a(x))
        return x


class _Seq:
    def __init__(self, t):
        self.t = t


class _Pick:
    def __init__(self, a, b, use):
        self.a, self.b, self.use = a, b, use


class _UsesPick(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    def forward(self, batch):
        return self.b(self.a(batch.use.t))


@pytest.mark.parametrize("one,five", [(np.int64(1), np.int64(5)), ({1}, {1, 2, 3, 4, 5}), (np.arange(1), np.arange(5)),
                                      (slice(0, 1), slice(0, 5)), (range(1), range(5))])
def test_values_without_fields_and_objects_met_twice_are_signed_by_what_they_are(one, five):
    """Signing objects field by field took a value with no attributes (a numpy integer, a set, an array, a
    range) for an empty object, and an object met a second time for "a cycle": counts of other inputs were
    returned (128 for 640). Such values are signed by their repr, and an object met again by where it was first
    met."""
    nest = sn.wrap(_Passes(), sn.Width("h", [2, 8], out="a", inp="b"))
    x = torch.randn(1, 4)
    assert nest.cost("h=8", "flops", example=(x, five)) == 5 * nest.cost("h=8", "flops", example=(x, one))
    nest = sn.wrap(_UsesPick(), sn.Width("h", [2, 8], out="a", inp="b"))
    short, long_ = _Seq(torch.randn(1, 4)), _Seq(torch.randn(9, 4))
    assert nest.cost("h=8", "flops", example=_Pick(short, long_, long_)) == 9 * nest.cost(
        "h=8", "flops", example=_Pick(short, long_, short))


class _Tokens:
    def __init__(self, tokens, x):
        self.tokens, self.x = tokens, x


def test_an_input_too_large_to_sign_is_counted_afresh():
    """Past the signing budget the remaining fields were left out of the signature: a batch holding 6,000 token
    lists got the count of another batch of 100x the rows. Such an input is never taken for another now."""
    nest = sn.wrap(_ObjectInput(), sn.Width("h", [16, 32], out="a", inp="b"))
    tokens = [["a", "b"] for _ in range(6000)]
    small = nest.cost(nest.largest, "flops", example=_Tokens(tokens, torch.randn(1, 8)))
    assert nest.cost(nest.largest, "flops", example=_Tokens(tokens, torch.randn(100, 8))) == 100 * small


class _Tabled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x, table):
        return self.b(torch.relu(self.a(x))) * (1.0 if table else 0.0)


def test_an_example_holding_a_large_table_is_stored_and_said_in_short():
    """An example holding 100,000 entries made a profile store a 2.4 MB signature (written into the checkpoint
    header) and messages millions of characters long. Past 20,000 characters the signature is stored as its
    SHA-256 (still matching the same example), and messages cut it to a few hundred characters."""
    nest = sn.wrap(_Tabled(), sn.Width("h", [16, 32], out="a", inp="b"))
    example = (torch.randn(2, 8), {f"k{i}": i for i in range(100_000)})
    prof = nest.profile(example, metrics=("params", "flops"), progress=False)
    assert len(repr(prof.meta["input"])) < 200 and prof.meta["input"][0] == "sha256"
    assert nest.cost("h=16", "flops", example=example) == prof.cost("h=16", "flops")  # (the profile's table)
    other = (torch.randn(5, 8), example[1])
    with pytest.warns(sn.nest.OtherInputFlopsWarning) as seen:
        nest.cost("h=16", "flops", example=other)
    assert len(str(seen[0].message)) < 2_000
    with pytest.raises(sn.SortedNetError) as e:
        nest.cost("h=16", "flops", example=(torch.randn(2, 9), example[1]))
    assert len(str(e.value)) < 3_000


class _Calls(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x, fn):
        for _ in range(int(fn(torch.ones(1)).sum()) if fn is not None else 1):
            x = self.b(torch.relu(self.a(x)))
        return x


def test_a_saved_profile_never_matches_a_function_of_another_process(tmp_path, monkeypatch):
    """A function was signed by a counter that starts at 0 in every process: a profile saved on (x, lambda: 1)
    matched (x, lambda: 50) in the next process, and cost returned the profile's count, 50x too low, without a
    word. The token names its process now. Builtin methods (t.add: a new object at every read) are signed by
    their object and name, and the registry keeps no object alive."""
    import gc
    import itertools
    import weakref

    import sortednet.cost as cost

    nest = sn.wrap(_Calls(), sn.Width("h", [16, 32], out="a", inp="b"))
    x = torch.randn(2, 8)
    one = nest.profile((x, lambda t: t), metrics=("params", "flops"), progress=False).cost(nest.largest, "flops")
    sn.save(nest, tmp_path / "f.sn")
    monkeypatch.setattr(cost, "_UNSIGNED", itertools.count())  # (a new process: its counter starts again)
    monkeypatch.setattr(cost, "_PROCESS", "another")
    monkeypatch.setattr(cost, "_CALLABLES", type(cost._CALLABLES)())
    back = sn.load(_Calls(), tmp_path / "f.sn")
    with pytest.warns(sn.nest.OtherInputFlopsWarning):
        assert back.cost(back.largest, "flops", example=(x, lambda t: 50 * t)) == 50 * one
    t = torch.ones(1)
    prof = nest.profile((x, t.add), metrics=("params", "flops"), progress=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the profile's own input: its table, no other-input warning)
        assert nest.cost(nest.largest, "flops", example=(x, t.add)) == prof.cost(nest.largest, "flops") == 2 * one
    big = torch.zeros(1_000)
    ref = weakref.ref(big)
    nest.cost(nest.largest, "flops", example=(x, big.add))
    del big
    gc.collect()
    assert ref() is None  # (signed: nothing kept alive)


class _Positions(torch.nn.Module):
    """A mask (a persistent buffer) and a table (a non-persistent one) the forward grows for longer inputs, and
    one registered None and filled by the first forward: caches, as many hand-written models keep."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 64), torch.nn.Linear(64, 3)
        self.register_buffer("mask", torch.ones(4, 4).tril())
        self.register_buffer("lazy", None)

    def forward(self, x):
        n = x.shape[0]
        if self.mask.shape[0] < n:
            self.mask = torch.ones(n, n).tril()
        if getattr(self, "grown", None) is None or self.grown.shape[0] < n:
            self.register_buffer("grown", torch.zeros(n, 8), persistent=False)
        if self.lazy is None:
            self.lazy = torch.ones(3)
        return self.mask[:n, :n] @ self.fc2(torch.relu(self.fc1(x + self.grown[:n]))) * self.lazy


def test_buffers_a_forward_builds_or_grows_drop_no_measured_cost():
    """For a moment, buffers re-shaped after profiling dropped the measured costs: serving one longer input (a
    mask grown 4x4 -> 12x12) or a first forward filling a buffer registered None wiped a valid profile (pick
    refused, "no 'latency' cost known"). Caches look the same as a buffer re-assigned by hand, so buffers are not
    followed: memory counts them as profiled (docs/deployment.md)."""
    import warnings

    torch.manual_seed(0)
    net = _Positions().eval()
    nest = sn.wrap(net, sn.Width("h", [16, 32, 64], out="fc1", inp="fc2"))
    nest.profile(torch.randn(4, 8), repeat=1, warmup=0, progress=False)
    with torch.no_grad():
        net(torch.randn(12, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nest.pick(memory=1e12, latency=1e12, flops=1e12) == nest.largest


class _Repeat(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, t):
        return t.repeat(self.n, 1)


class _WithPre(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 4)

    def forward(self, x, pre):
        return self.b(torch.relu(self.a(pre(x))))


def test_a_module_in_the_example_is_signed_by_identity_and_settings():
    """A module in the example was signed by its repr ("_Repeat()" for every instance): the FLOPs of Repeat(3)
    were served from Repeat(1)'s count, a third of the work. Modules are signed by identity and settings now."""
    nest = sn.wrap(_WithPre(), sn.Width("h", [8, 32], out="a", inp="b"))
    x = torch.randn(5, 8)
    one = nest.cost("h=32", "flops", example={"x": x, "pre": _Repeat(1)})
    three = _Repeat(3)
    assert nest.cost("h=32", "flops", example={"x": x, "pre": three}) == 3 * one
    three.n = 2  # (a setting changed in place: counted again)
    assert nest.cost("h=32", "flops", example={"x": x, "pre": three}) == 2 * one


def _export_flops(nest, sub, x):
    with FlopCounterMode(display=False) as counter:
        nest.export(sub)(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("setting", ["stride", "scale"])
def test_a_profile_counts_flops_afresh_after_a_module_setting_changed_in_place(setting):
    """FLOPs are cached per input signature (a setting changed in place is not seen by cost): a profile
    counts afresh, and pick then reads its counts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Upsample(scale_factor=2.0), torch.nn.Conv2d(16, 8, 3, padding=1))
    nest = sn.wrap(model, sn.Width("c", [4, 8, 16], out="0", inp="3"))
    x = torch.randn(1, 3, 16, 16)
    first = [nest.cost(s, "flops", example=x) for s in nest.submodels]
    assert first == [_export_flops(nest, s, x) for s in nest.submodels]
    for value in (4, 2):
        if setting == "stride":
            model[0].stride = (value, value)
        else:
            model[2].scale_factor = float(value)
        now = [_export_flops(nest, s, x) for s in nest.submodels]
        assert now != first
        first = now
        assert list(nest.profile(x, metrics=["flops"], progress=False).costs["flops"]) == now
        assert [nest.cost(s, "flops", example=x) for s in nest.submodels] == now
        assert nest.pick(flops=now[-1]) == nest.largest and nest.pick(flops=now[0]) == nest.smallest

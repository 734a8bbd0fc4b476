"""The package's layering (errors -> submodel -> patterns/dims -> slicers -> wrap -> nest -> io/train ->
integrations) and the seams between layers: ``Nest.__init__`` is ``wrap``, slicers own their export
decisions (``Slicer.skipped``), calibrated BatchNorm statistics are a typed field the norm slicer reads."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sortednet as sn
from models import FAMILIES, assert_unchanged, run, snapshot
from sortednet.slicers import Slicer
from sortednet.slicers.norm import NormStats
from test_imports import MODULES, imports_of

LAYERS = [["errors"], ["submodel"], ["patterns", "dims"], ["slicers"], ["wrap"], ["nest"], ["io", "train"],
          ["integrations"]]


def layer(module: str) -> int | None:
    short = module.removeprefix("sortednet.")
    for i, names in enumerate(LAYERS):
        if any(short == n or short.startswith(n + ".") for n in names):
            return i
    return None


def upward(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import chains (through any module) from a layer to a higher one."""
    bad = []
    for m in sorted(graph):
        if layer(m) is None:
            continue
        parent: dict[str, str] = {}
        stack, seen = [m], {m}
        while stack:
            x = stack.pop()
            for y in sorted(graph.get(x, ())):
                if y not in seen:
                    seen.add(y)
                    parent[y] = x
                    stack.append(y)
        for d in sorted(seen):
            if (ld := layer(d)) is not None and ld > layer(m):
                chain = [d]
                while chain[-1] != m:
                    chain.append(parent[chain[-1]])
                bad.append(chain[::-1])
    return bad


def test_layers_import_downward_only():
    graph = {n: imports_of(n) - {"sortednet"} for n in MODULES if n != "sortednet"}
    bad = upward(graph)
    assert not bad, "upward imports: " + "; ".join(" -> ".join(c) for c in bad[:5])


def test_upward_detects_an_indirect_import():
    g = {"sortednet.slicers.norm": {"sortednet.calibrate"}, "sortednet.calibrate": {"sortednet.io"},
         "sortednet.io": set(), "sortednet.dims": {"sortednet.errors"}, "sortednet.errors": set()}
    assert upward(g) == [["sortednet.slicers.norm", "sortednet.calibrate", "sortednet.io"]]


@pytest.mark.parametrize("family", ["mlp", "sequential", "lm_width_heads_depth"])
def test_nest_constructor_is_wrap(family):
    a, b = FAMILIES[family](seed=1), FAMILIES[family](seed=1)
    via_wrap = sn.wrap(a.model, *a.dims)
    via_init = sn.Nest(b.model, *b.dims)
    assert list(via_init.submodels) == list(via_wrap.submodels)
    for sub in (via_wrap.smallest, via_wrap.largest):
        with via_wrap.use(sub), via_init.use(sub):
            assert torch.equal(run(a.model, a.example), run(b.model, b.example))


def test_nest_constructor_refuses_before_changing_anything():
    case = FAMILIES["mlp"](seed=0)
    snap = snapshot(case.model)
    with pytest.raises(sn.SortedNetError, match="fc9"):
        sn.Nest(case.model, *case.dims, sn.Width("x", [1, 2], out="fc9"))
    assert_unchanged(case.model, snap)


def test_export_leaves_out_what_the_slicer_skips():
    case = FAMILIES["sequential"](seed=0, depth=4)
    nest = sn.wrap(case.model, *case.dims)
    blocks = case.model[1]
    assert Slicer.skipped(blocks._sn.slicer, case.model[0]) == []  # base default: nothing skipped
    sub = sn.SubModel(depth=2, ch=8)
    with nest.use(sub):
        assert blocks._sn.slicer.skipped(blocks) == ["2", "3"]
    small = nest.export(sub)
    assert list(small[1]._modules) == ["0", "1"]
    with nest.use(sub):
        assert torch.equal(run(case.model, case.example), run(small, case.example))


def test_calibrated_statistics_are_typed_and_copied_with_the_model():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    nest = sn.wrap(model, sn.Width("c", [2, 4], out="0", norm="1", inp="5"))
    assert model[1]._sn.norm is None
    torch.manual_seed(0)
    nest.calibrate([torch.randn(8, 1, 6, 6) for _ in range(2)], batches=2)
    st = model[1]._sn.norm
    assert isinstance(st, NormStats) and set(st.stats) == {(2,), (4,)} and st.override is None
    assert not any(k.startswith("bn") for k in model[1]._sn.extra)
    twin = copy.deepcopy(model)
    assert twin[1]._sn.norm is not st and twin[1]._sn.norm.stats[(2,)]["running_mean"] is not \
        st.stats[(2,)]["running_mean"]
    with nest.use("c=2"):
        assert torch.equal(twin[1].running_mean, model[1].running_mean)
        assert torch.equal(model[1].running_mean, st.stats[(2,)]["running_mean"])

"""Target patterns: exact name, ``*`` (one path component), ``**`` (one or
more components), ``re:`` regex; a pattern that matches nothing names itself
and nearby modules."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sortednet as sn
from models import FAMILIES
from sortednet.wrap import match_pattern

comp = st.sampled_from(["a", "b", "fc1", "fc2", "attn", "0", "1", "blocks"])


def tree(paths: list[tuple[str, ...]]) -> nn.Module:
    """A ModuleDict tree holding a Linear leaf at every path."""
    root = nn.ModuleDict()
    for path in paths:
        node = root
        for i, c in enumerate(path):
            if c not in node:
                node[c] = nn.ModuleDict() if i < len(path) - 1 else nn.Linear(1, 1)
            node = node[c]
            if not isinstance(node, nn.ModuleDict):
                break
    return root


def reference(pattern: str, path: str) -> bool:
    """Component-wise glob: ``*`` is one component, ``**`` one or more."""
    def go(ps: list[str], xs: list[str]) -> bool:
        if not ps:
            return not xs
        if ps[0] == "**":
            return any(go(ps[1:], xs[i:]) for i in range(1, len(xs) + 1))
        return bool(xs) and (ps[0] == "*" or ps[0] == xs[0]) and go(ps[1:], xs[1:])
    return go(pattern.split("."), path.split("."))


@given(st.lists(st.lists(comp, min_size=1, max_size=4).map(tuple), min_size=1, max_size=6), st.data())
def test_globs_match_whole_components(paths, data):
    modules = {n: m for n, m in tree(paths).named_modules() if n}
    target = data.draw(st.sampled_from(sorted(modules))).split(".")
    pat = [data.draw(st.sampled_from([c, "*", "**"])) for c in target]
    pattern = ".".join(pat)
    want = [n for n in modules if reference(pattern, n)]
    got = match_pattern(pattern, dict(tree(paths).named_modules()), "test")
    assert sorted(got) == sorted(want) and ".".join(target) in got
    if "*" not in pattern:
        assert got == [pattern]                               # exact name: that module only


@given(st.lists(st.lists(comp, min_size=1, max_size=3).map(tuple), min_size=1, max_size=6), st.data())
def test_regex_is_a_full_match(paths, data):
    modules = dict(tree(paths).named_modules())
    rx = data.draw(st.sampled_from([r"fc\d", r".*fc\d", r"a\..*", r"[ab]", r"\d+\..*", r".*"]))
    want = [n for n in modules if n and re.fullmatch(rx, n)]
    if want:
        assert match_pattern("re:" + rx, modules, "test") == want
    else:
        with pytest.raises(sn.SortedNetError) as e:
            match_pattern("re:" + rx, modules, "test")
        assert repr("re:" + rx) in str(e.value)


def test_no_match_lists_nearby_names():
    modules = dict(FAMILIES["lm_width_heads_depth"]().model.named_modules())
    with pytest.raises(sn.SortedNetError) as e:
        match_pattern("blocks.0.fc3", modules, "Width 'ffn' out")
    msg = str(e.value)
    assert "'blocks.0.fc3'" in msg and "Width 'ffn' out" in msg and "'blocks.0.fc1'" in msg
    with pytest.raises(sn.SortedNetError, match="invalid regex"):
        match_pattern("re:blocks.(", modules, "x")


def test_partial_component_glob():
    modules = dict(FAMILIES["mlp"]().model.named_modules())
    assert match_pattern("fc*", modules, "x") == ["fc1", "fc2", "fc3"]
    assert match_pattern("re:fc[12]", modules, "x") == ["fc1", "fc2"]


@pytest.mark.parametrize("out, inp", [
    ("blocks.*.fc1", "blocks.*.fc2"),
    ("blocks.**.fc1", "re:blocks\\.\\d+\\.fc2"),
    (["blocks.0.fc1", "blocks.1.fc1", "blocks.2.fc1"], ["blocks.*.fc2", "blocks.1.fc2"]),  # overlap is fine
])
def test_pattern_kinds_slice_the_same_modules(out, inp):
    c = FAMILIES["lm_width_heads_depth"]()
    dims = [d for d in c.dims if d.name != "ffn"] + [sn.Width("ffn", [8, 16, 32], out=out, inp=inp)]
    nest = sn.wrap(c.model, *dims)
    with nest.use("ffn=8"):
        shapes = [(b.fc1.weight.shape, b.fc2.weight.shape, b.attn.q.weight.shape) for b in c.model.blocks]
    assert shapes == [(torch.Size([8, 16]), torch.Size([16, 8]), torch.Size([16, 16]))] * 3


def test_a_second_name_of_a_module_is_explained():
    import torch.nn as nn

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.mid, self.out = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 2)
            self.mid2 = self.mid

        def forward(self, x):
            return self.out(self.mid2(self.mid(self.inp(x))))

    with pytest.raises(sn.SortedNetError, match="'mid2' is the module named 'mid'"):
        sn.wrap(M(), sn.Width("h", [8, 16], out=["inp", "mid2"], inp=["mid", "out"]))


@pytest.mark.parametrize("pattern", ["blocks.*", "re:blocks\\.\\d", "blocks.1"])
def test_a_glob_over_second_names_of_a_shared_layer_names_its_first(pattern):
    """A layer held as ``self.l`` and twice in ``self.blocks`` (one layer applied twice) has ``blocks.0`` and
    ``blocks.1`` as second names, which patterns do not match (a module is matched by its first name): a glob or
    regex over them said only "matched no module; nearby names: 'blocks'", as if the list were empty. Every form
    of pattern names the first name now, and the model is left as it was."""
    import torch.nn as nn

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(16, 16)
            self.blocks, self.out = nn.ModuleList([self.l, self.l]), nn.Linear(16, 3)

        def forward(self, x):
            for b in self.blocks:
                x = torch.relu(b(x))
            return self.out(x)

    model = Shared()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.PatternError, match=r"matched no module.*'blocks\.\d' is the module named 'l'"):
        sn.wrap(model, sn.Rank("r", [2, 16], targets=pattern))
    assert type(model.l) is nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    nest = sn.wrap(model, sn.Rank("r", [2, 16], targets="l"))
    assert list(nest._sliced) == ["l"]


def test_a_glob_over_first_and_second_names_says_which_module_it_leaves_out():
    """``blocks = ModuleList([l, other, l])``: ``blocks.*`` matches ``blocks.1`` by its first name, and ``l``
    only under second names, so it was left out in silence (the user meant every block). It is said now, naming
    the module and its names; a pattern that matches the module by its first name too warns nothing."""
    import warnings

    import torch.nn as nn

    from sortednet.patterns import SecondNameWarning

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(16, 16)
            self.blocks, self.out = nn.ModuleList([self.l, nn.Linear(16, 16), self.l]), nn.Linear(16, 3)

        def forward(self, x):
            for b in self.blocks:
                x = torch.relu(b(x))
            return self.out(x)

    for pattern in ("blocks.*", "re:blocks\\.\\d", "blocks.**"):
        with pytest.warns(SecondNameWarning, match=r"\['blocks\.0', 'blocks\.2'\] of 'l'.*first name"):
            nest = sn.wrap(Shared(), sn.Rank("r", [2, 16], targets=pattern))
        assert "blocks.1" in nest._sliced and "l" not in nest._sliced
    with warnings.catch_warnings():
        warnings.simplefilter("error", SecondNameWarning)
        for pattern in ("re:(l|blocks\\.\\d)", "re:l|blocks\\.1", ["blocks.*", "l"]):  # (another names it)
            nest = sn.wrap(Shared(), sn.Rank("r", [2, 16], targets=pattern))
            assert {"l", "blocks.1"} <= set(nest._sliced)


def test_a_left_out_module_named_by_another_role_or_dimension_is_still_said():
    """``out='b.*'`` leaves out ``b.1`` (the module first named ``a.1``): the warning was silenced when ``a.1``
    had any binding in the plan (``inp='a.1'``, or another dimension's ``out``), although its ``out`` binding of
    this dimension was still dropped. Only the same dimension naming it for the same role silences it."""
    import warnings

    import torch.nn as nn

    from sortednet.patterns import SecondNameWarning

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
            self.b = nn.ModuleList([nn.Linear(8, 8), self.a[1]])

        def forward(self, x):
            return self.b[0](self.a[0](x))

    for dims in ([sn.Width("x", [4, 8], out="b.*", inp="a.1")],
                 [sn.Width("x", [4, 8], out="b.*"), sn.Width("y", [2, 8], out="a.1")],
                 [sn.Width("x", [4, 8], out=["b.*", "a.1"], inp="b.*")]):  # (one glob for two roles)
        with pytest.warns(SecondNameWarning, match=r"\['b\.1'\] of 'a\.1'"):
            sn.wrap(M(), *dims)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SecondNameWarning)
        nest = sn.wrap(M(), sn.Width("x", [4, 8], out=["b.*", "a.1"]))
        assert {"a.1", "b.0"} <= set(nest._sliced)

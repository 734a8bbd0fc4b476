"""sn.discover: on every rebuilt architecture and test family, the discovered
declarations wrap into nests whose sampled sub-models run, export and equal the
live output; what must not shrink is left out."""

from __future__ import annotations

import collections
import copy
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import arch
import sortednet as sn
from models import FAMILIES, assert_unchanged, case_params, run, snapshot
from sortednet.check import output_leaves
from sortednet.discovery import KeptWholeWarning, sizes_for
from sortednet.importance import sort_units

NAMES = sorted(arch.ARCHS) + sorted(FAMILIES)


def build(name: str):
    if name in arch.ARCHS:
        return arch.build(name)
    case = FAMILIES[name]()
    return case.model.eval(), case.example


def sample(dims, n=4, seed=0):
    """Each dimension alone at its smallest, all smallest, and ``n`` random mixes."""
    rng = random.Random(seed)
    subs = [{d.name: d.sizes[0]} for d in dims] + [{d.name: d.sizes[0] for d in dims}, {}]
    subs += [{d.name: rng.choice(d.sizes) for d in dims} for _ in range(n)]
    return subs


def widths(dims):
    return [d for d in dims if isinstance(d, sn.Width)]


@pytest.mark.parametrize("name", NAMES)
def test_discovered_nest_runs_exports_and_matches(name):
    model, x = build(name)
    expected = run(copy.deepcopy(model), x)
    snap = snapshot(model)
    dims = sn.discover(model, x, ratios=[0.25, 0.5, 1.0])
    assert_unchanged(model, snap)                       # discovery never touches the model
    assert widths(dims), f"{name}: no width found"
    nest = sn.wrap(model, *dims, submodels=sample(dims))
    assert torch.equal(run(model, x), expected)         # largest = the original model
    for sub in nest.submodels:
        with nest.use(sub):
            live = run(model, x)
        small = nest.export(sub)
        assert live.shape == expected.shape             # the network's output never shrinks
        torch.testing.assert_close(run(small, x), live, atol=1e-5, rtol=0)
        assert sum(p.numel() for p in small.parameters()) == nest.cost(sub, "params")
    nest.check(x)


@pytest.mark.parametrize("family", ["mlp", "cnn_bn_residual", "attn_block"])
@settings(max_examples=5)
@given(data=st.data())
def test_discovered_sizes_and_exports_over_random_models(family, data):
    case = FAMILIES[family](**data.draw(case_params(family)))
    ratios = data.draw(st.lists(st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.75, 1.0]), min_size=1, max_size=4))
    dims = sn.discover(case.model.eval(), case.example, ratios=ratios)
    for d in dims:
        assert list(d.sizes) == sorted(set(d.sizes)) and d.sizes[0] >= 1
    nest = sn.wrap(case.model, *dims)
    sub = data.draw(st.sampled_from(nest.submodels))
    with nest.use(sub):
        live = run(case.model, case.example)
    torch.testing.assert_close(run(nest.export(sub), case.example), live, atol=1e-5, rtol=0)


def _where(dims, path, role):
    return [d.name for d in widths(dims) if path in getattr(d, role)]


def test_resnet18_groups_residual_downsample_and_stem():
    model, x = arch.build("resnet18")
    dims = sn.discover(model, x)
    stage1 = next(d for d in dims if "layer1.0.conv2" in d.out)
    assert {"conv1", "layer1.0.conv2"} <= set(stage1.out) and {"bn1", "layer1.0.bn2"} <= set(stage1.norm)
    assert {"layer2.0.conv1", "layer2.0.downsample.0"} <= set(stage1.inp)
    stage2 = next(d for d in dims if "layer2.0.conv2" in d.out)
    assert "layer2.0.downsample.0" in stage2.out and "layer2.0.downsample.1" in stage2.norm
    assert _where(dims, "fc", "inp") and not _where(dims, "fc", "out")  # classes never shrink
    assert not _where(dims, "conv1", "inp")                            # nor does the input


def test_left_out_what_cannot_shrink():
    dims = sn.discover(*arch.build("convnext"))        # layer scale: a raw parameter on the stage width
    assert all(d.out[0].endswith("block.3") for d in widths(dims)) and len(widths(dims)) == 4
    dims = sn.discover(*arch.build("regnet_y"))        # grouped 3x3 convolution
    assert not any(p.endswith("f.b.0") for d in widths(dims) for p in (*d.out, *d.inp))
    dims = sn.discover(*arch.build("vit_torchvision"))  # class token + position embedding
    assert not _where(dims, "conv_proj", "out")
    assert [d.attn for d in dims if isinstance(d, sn.Heads)] == [("layers.0.self_attention",),
                                                                  ("layers.1.self_attention",)]
    assert not _where(*[sn.discover(*build("sequential")), "2", "out"])  # flatten of 4x10 into a Linear


class _Gated(nn.Module):
    """Hidden features scaled by a raw parameter: the one group must stay whole."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Linear(8, 16), nn.Parameter(torch.ones(16)), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(self.a(x) * self.g)


def test_finding_nothing_says_why():
    """An empty result would wrap into a nest of the full model alone without a word: it warns, naming each
    group kept whole and the reason (here the raw parameter), while a model with groups is not warned about."""
    model, x = _Gated(), torch.randn(2, 8)
    with pytest.warns(UserWarning, match=r"found no group.*\['a'\] \(16 features\): parameter 'g'"):
        assert sn.discover(model, x) == []
    masked = _Gated()
    del masked.g
    masked.register_buffer("g", torch.ones(16))  # (a buffer is named as one, not as a parameter)
    with pytest.warns(UserWarning, match=r"found no group.*\['a'\] \(16 features\): buffer 'g'"):
        assert sn.discover(masked, x) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sn.discover(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), x)


class _StdConv(nn.Conv2d):
    """A convolution of one's own (BiT's weight standardisation): its conv2d reads a computed weight, an op
    discovery does not understand."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _StdConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = _StdConv(3, 16, 3, padding=1), _StdConv(16, 32, 3, padding=1)
        self.fc, self.out = nn.Linear(32, 64), nn.Linear(64, 3)

    def forward(self, x):
        return self.out(F.relu(self.fc(self.c2(F.relu(self.c1(x))).mean((2, 3)))))


class _ReturnsFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(h), h


class _OneHot(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.fc = nn.Linear(7, 16), nn.Linear(16, 10)

    def forward(self, ids):
        return self.fc(self.l(F.one_hot(ids, 7).float()).relu())


class _TimeEmbedding(nn.Module):
    """A diffusion model's sinusoidal time embedding: features made from the input by ops, concatenated."""

    def __init__(self):
        super().__init__()
        self.t1, self.t2, self.inp, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x, t):
        f = torch.exp(-math.log(1e4) * torch.arange(8) / 8) * t[:, None]
        emb = self.t2(F.silu(self.t1(torch.cat([f.sin(), f.cos()], -1))))
        return self.out(F.silu(self.inp(x) + emb))


@pytest.mark.parametrize("case", ["flatten", "one_hot", "time_embedding", "bert"])
def test_features_made_from_the_input_are_not_said_kept_whole(case):
    """Only groups a module writes are named: features an op makes from the network input (a flatten, a one-hot,
    a concatenated time embedding) can never be sliced, and a warning about them would be noise; nor is BERT's
    attention output, which the Heads found slices."""
    from sortednet.discovery import KeptWholeWarning

    if case == "bert":
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        bert = transformers.BertModel(transformers.BertConfig(
            vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=16)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error", KeptWholeWarning)
            dims = sn.discover(bert, {"input_ids": torch.randint(0, 50, (2, 6))}, ratios=[0.5, 1.0])
        assert any(isinstance(d, sn.Heads) for d in dims)
        return
    model, x = {"flatten": (nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)),
                            torch.randn(2, 3, 4, 4)),
                "one_hot": (_OneHot(), torch.randint(0, 7, (4,))),
                "time_embedding": (_TimeEmbedding(), (torch.randn(2, 8), torch.rand(2)))}[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptWholeWarning)
        assert sn.discover(model.eval(), x, ratios=[0.5, 1.0])


class _OwnLinear(nn.Module):
    """A linear layer of one's own whose forward discovery does not understand, its weight held as a parameter, as
    int8 buffers with a scale (a quantized layer) or in a ParameterDict."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        w = torch.randn(24, 32) * 0.1
        if how == "buffers":
            scale = w.abs().amax(1, keepdim=True) / 127
            self.register_buffer("qweight", (w / scale).round().to(torch.int8))
            self.register_buffer("scale", scale)
        elif how == "dict":
            self.p = nn.ParameterDict({"w": nn.Parameter(w)})
        else:
            self.w = nn.Parameter(w)

    def forward(self, x):
        w = {"buffers": lambda: self.qweight.float() * self.scale, "dict": lambda: self.p["w"] * 1.0,
             "parameter": lambda: self.w * 1.0}[self.how]()
        return F.linear(x, w)


@pytest.mark.parametrize("how", ["parameter", "buffers", "dict"])
def test_a_layer_of_ones_own_writing_a_group_is_named_wherever_it_holds_its_weight(how):
    from sortednet.discovery import KeptWholeWarning

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), _OwnLinear(how), nn.ReLU(), nn.Linear(24, 8), nn.ReLU(),
                          nn.Linear(8, 4))
    with pytest.warns(KeptWholeWarning, match=r"\['2'\] \(24 features\): 'linear' \(in '2'\)"):
        sn.discover(model, torch.randn(4, 16))


class _Ema(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("ema", torch.zeros(16))

    def forward(self, h):
        if self.training:
            with torch.no_grad():
                self.ema.mul_(0.9).add_(0.1 * h.mean((0, 2, 3)))
        return h


def test_discover_writes_no_buffer_of_the_model():
    """The training-mode trace wrote the model's own buffers (BatchNorm statistics, spectral norm's power
    iteration vectors, an EMA kept in a buffer) and put them back: a serving thread read the changed values. It
    runs on copies of every buffer now; the version counters (moved by any write) stay."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Conv2d(3, 16, 3, padding=1)), nn.BatchNorm2d(16), _Ema(), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    before = {k: v._version for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sn.discover(model, torch.randn(4, 3, 8, 8))
    assert {k: v._version for k, v in [*model.named_parameters(), *model.named_buffers()]} == before


def test_groups_written_by_an_op_not_understood_and_returned_features_are_named():
    """A group written by an op discovery does not understand (a convolution subclass computing its weight)
    has no writer to name, and was left out of the KeptWholeWarning (the list looked like the whole model);
    when nothing is found, features the model returns beside its output were not named either."""
    from sortednet.discovery import KeptWholeWarning

    with pytest.warns(KeptWholeWarning, match=r"kept whole: \['c2'\] \(32 features\): 'conv2d' \(in 'c2'\)"):
        dims = sn.discover(_StdConvNet(), torch.randn(2, 3, 8, 8), ratios=[0.5, 1.0])
    assert [d.spec()["out"] for d in dims] == [["fc"]]
    with pytest.warns(UserWarning, match=r"found no group.*\['a'\] \(32 features\): the network output"):
        assert sn.discover(_ReturnsFeatures(), torch.randn(4, 8), ratios=[0.5, 1.0]) == []


class _GatedAfterMLP(nn.Module):
    """A free MLP width, then a width scaled by a raw parameter (a layer scale): one group found, one kept."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)
        self.a, self.g, self.b = nn.Linear(8, 16), nn.Parameter(torch.ones(16)), nn.Linear(16, 4)

    def forward(self, x):
        h = x + self.down(torch.relu(self.up(x)))
        return self.b(self.a(h) * self.g)


@pytest.mark.parametrize("arch_name", ["vit_timm", "unet"])
def test_a_result_that_leaves_groups_whole_says_which_and_why(arch_name):
    """discover returned the groups it found and dropped the others in silence (a user never learned that the
    residual width of a ViT, or a U-Net's concatenated skips, stay whole): a KeptWholeWarning names them with
    the reason; a model with nothing kept whole (resnet18) gets no warning."""
    from sortednet.discovery import KeptWholeWarning

    with pytest.warns(KeptWholeWarning, match=r"returns 1 declaration.*\['a'\] \(16 features\): parameter 'g'"):
        dims = sn.discover(_GatedAfterMLP(), torch.randn(2, 8), ratios=[0.5, 1.0])
    assert [d.name for d in dims] and dims[0].spec()["out"] == ["up"]
    model, x = arch.build(arch_name)
    reason = {"vit_timm": "parameter 'cls_token'", "unet": "concatenated by 'cat'"}[arch_name]
    with pytest.warns(KeptWholeWarning, match=f"kept whole: .*{reason}"):
        assert sn.discover(model, x, ratios=[0.5, 1.0])
    model, x = arch.build("resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sn.discover(model, x, ratios=[0.5, 1.0])


def test_heads_that_would_crash_are_dropped():
    torch.manual_seed(0)
    model = arch.TimmViT(reshape_c=True).eval()        # timm's reshape(B, N, C): fewer heads cannot run
    x = torch.randn(2, 3, 16, 16)
    dims = sn.discover(model, x)
    assert not [d for d in dims if isinstance(d, sn.Heads)] and len(widths(dims)) == 2
    assert len([d for d in sn.discover(model, x, verify=False) if isinstance(d, sn.Heads)]) == 2


class Odd(nn.Module):
    """Channels rolled, concatenated, split: discovery must leave those out, keep the plain one."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.d, self.e = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 2)
        self.f, self.g = nn.Conv2d(8, 6, 1), nn.Conv2d(6, 8, 1)

    def forward(self, x):
        y = torch.roll(self.a(x), 1, dims=1)                          # not understood: fixed
        z = self.d(torch.cat([self.b(x), self.c(x)], 1))             # concatenated channels: fixed
        w, _ = self.e(y + z).chunk(2, dim=1)                         # split channels: fixed
        v = self.g(F.relu(self.f(torch.cat([w, w], 1))))             # 6 free channels between f and g
        return self.head(v.mean((2, 3)))


def test_unknown_ops_concat_and_split_fix_their_channels():
    model = Odd().eval()
    dims = sn.discover(model, torch.randn(2, 3, 5, 5))
    assert [(d.out, d.inp) for d in widths(dims)] == [(("f",), ("g",)), (("g",), ("head",))]


class _SpatialRoll(nn.Module):
    """Swin's shifted windows: a roll over height and width carries every channel unchanged."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.roll(F.relu(self.a(x)), shifts=(-1, -1), dims=(2, 3)).flip(-1)
        return self.head(F.relu(self.b(h)).mean((2, 3)))


def test_a_roll_or_flip_over_other_axes_keeps_the_channels():
    model, x = _SpatialRoll().eval(), torch.randn(2, 3, 5, 5)
    dims = sn.discover(model, x, ratios=[0.5, 1.0])
    assert (("a",), ("b",)) in [(d.out, d.inp) for d in widths(dims)]
    nest = sn.wrap(model, *dims, example=x)
    for sub in nest.submodels:
        with nest.use(sub), torch.no_grad():
            torch.testing.assert_close(model(x), nest.export(sub)(x))


def test_sizes_respect_group_norm_and_grouped_query_heads():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.GroupNorm(4, 16), nn.Conv2d(16, 2, 1))
    (d,) = sn.discover(model, torch.randn(1, 3, 4, 4), ratios=[0.3, 0.6])
    assert d.sizes == (4, 8, 16) and d.norm == ("1",)
    lm, x = build("lm_width_heads_depth")
    heads = [d for d in sn.discover(lm, x, ratios=[0.25, 0.5]) if isinstance(d, sn.Heads)]
    assert heads and all(s % 2 == 0 for d in heads for s in d.sizes)   # 4 query heads over 2 kv heads


@pytest.mark.parametrize("ratios", [[], [0.0], [1.5], ["a"], None])
def test_bad_ratios_are_refused(ratios):
    model, x = build("mlp")
    with pytest.raises(sn.SortedNetError, match="ratios"):
        sn.discover(model, x, ratios=ratios)


def test_refuses_a_wrapped_model_and_a_failing_forward():
    model, x = build("mlp")
    nest = sn.wrap(model, *sn.discover(model, x))
    with pytest.raises(sn.SortedNetError, match="unwrap"):
        sn.discover(model, x)
    nest.unwrap()
    with pytest.raises(sn.SortedNetError, match="failed on the example"):
        sn.discover(model, torch.randn(2, 3))


@pytest.mark.parametrize("full,ratios,mult", [(64, [0.25, 0.5], 1), (7, [0.1, 0.5, 0.9], 1), (24, [0.3], 8),
                                              (10, [0.5], 4)])
def test_sizes_for_is_ascending_unique_and_ends_full(full, ratios, mult):
    s = sizes_for(full, ratios, mult)
    assert s == sorted(set(s)) and s[-1] == full and s[0] >= 1
    if full % mult == 0:
        assert all(v % mult == 0 for v in s)


@pytest.mark.parametrize("family", ["bert", "llama", "bert_attention_maps"])
def test_hf_models_from_config(family):
    """Also with the attention maps among the outputs (``output_attentions=True``): fewer heads shorten their
    heads axis, and discovery dropped every Heads as failing its dry run, though wrap and export take it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kw = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    maps = family == "bert_attention_maps"
    if maps:
        model = transformers.BertModel(transformers.BertConfig(**kw, output_attentions=True,
                                                               attn_implementation="eager")).eval()
        family = "bert"
    elif family == "bert":
        model = transformers.BertModel(transformers.BertConfig(**kw)).eval()
    else:  # gate * up -> down; its output also carries a cache object (not a tensor)
        model = transformers.LlamaModel(transformers.LlamaConfig(**kw, num_key_value_heads=2)).eval()
    ex = {"input_ids": torch.randint(0, 50, (2, 7))}
    dims = sn.discover(model, ex, ratios=[0.5, 1.0])
    assert [len(d.out) + len(d.inp) for d in widths(dims)] == [3 if family == "llama" else 2] * 2  # FFN per layer
    # heads per layer; BERT's q/k/v sit in `attention.self`, its output projection in `attention.output`
    assert [tuple(d.sizes) for d in dims if isinstance(d, sn.Heads)] == [(2, 4)] * 2
    nest = sn.wrap(model, *dims, example=ex)
    for sub in nest.submodels[::3]:
        with nest.use(sub), torch.no_grad():
            live = model(**ex).last_hidden_state
        with torch.no_grad():
            small = nest.export(sub, plain=True)
            torch.testing.assert_close(small(**ex).last_hidden_state, live, atol=1e-5, rtol=0)
        assert nest.cost(sub) == sum(p.numel() for p in small.parameters())
    with torch.no_grad():
        ref = model(**ex).last_hidden_state
        if maps:  # a permutation of the heads reorders the maps: refused, saying so (a result may be the maps)
            with pytest.raises(sn.SortedNetError, match="holds attention maps"):
                sort_units(nest, "l1", example=ex)
            model.config.output_attentions = False
        sort_units(nest, "l1", example=ex)
        torch.testing.assert_close(model(**ex).last_hidden_state, ref, atol=1e-5, rtol=0)


def test_gpt2_conv1d_layers_are_discovered_like_linears():
    """transformers' ``Conv1D`` (a linear layer with a transposed weight) is one call to discovery: GPT-2's
    FFN of each layer and its residual width (tied ``wte`` / ``lm_head``, ``wpe``, every LayerNorm) are found,
    and a forgotten ``c_proj`` is named by check (it blamed the first ``c_attn``, an op it did not know)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ex = torch.randint(0, 64, (2, 7))
    dims = sn.discover(model, ex, ratios=[0.5, 1.0])
    ffn = [d for d in widths(dims) if len(d.out) == 1]
    assert [(d.out, d.inp) for d in ffn] == [((f"transformer.h.{i}.mlp.c_fc",), (f"transformer.h.{i}.mlp.c_proj",))
                                             for i in range(2)]
    hidden = next(d for d in widths(dims) if "transformer.wte" in d.out)
    assert "transformer.wpe" in hidden.out and "lm_head" in hidden.inp and "transformer.ln_f" in hidden.norm
    nest = sn.wrap(model, *dims, example=ex)
    for sub in nest.submodels[::3]:
        with nest.use(sub), torch.no_grad():
            live = model(ex).logits
        small = nest.export(sub, plain=True)
        assert small.lm_head.weight is small.transformer.wte.weight
        with torch.no_grad():
            torch.testing.assert_close(small(ex).logits, live, atol=1e-5, rtol=0)
    nest.unwrap()
    forgot = sn.Width("h", [16, 32], out=[p for p in hidden.out if p != "transformer.h.1.mlp.c_proj"],
                      inp=list(hidden.inp), norm=list(hidden.norm))
    with pytest.raises(sn.SortedNetError, match="add out='transformer.h.1.mlp.c_proj'"):
        sn.wrap(model, forgot, example=ex)


class _Mixing(nn.Module):
    """``a``'s 8 features reach an op that mixes or reorders them along their own axis (``how``), then ``o``;
    ``b`` -> ``c`` next to it is a plain pair that stays discoverable."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.o = nn.Linear(6, 8), nn.Linear({"pool": 4, "interp": 16, "conv": 5}.get(how, 8), 3)
        self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 3)
        self.conv = nn.Conv1d(1, 5, 3, padding=1)
        if how == "hook":  # a user's forward hook on a sliceable module: its ops count like forward's
            self.a.register_forward_hook(lambda m, i, out: out.flip(-1))

    def forward(self, x):
        h = F.relu(self.a(x))
        if self.how == "pool":
            h = F.adaptive_avg_pool1d(h.unsqueeze(1), 4).squeeze(1)
        elif self.how == "interp":
            h = F.interpolate(h.unsqueeze(1), size=16, mode="linear").squeeze(1)
        elif self.how == "conv":  # (B, 1, 8): a Conv1d slides along the 8 features, then max over them
            h = self.conv(h.unsqueeze(1)).amax(-1)
        elif self.how == "negative_index":
            h = h * torch.sigmoid(h[:, -1, None])  # the LAST unit gates: another unit at every width
        elif self.how == "computed_index":  # the same, by a positive index computed from the width
            h = h * torch.sigmoid(h[:, h.shape[1] - 1, None])
        elif self.how == "unbind":  # one tensor per unit, the last one picked
            h = h * torch.sigmoid(h.unbind(1)[-1])[:, None]
        return self.o(h) + self.c(F.relu(self.b(x)))


@pytest.mark.parametrize("how", ["pool", "interp", "conv", "negative_index", "computed_index", "unbind", "hook"])
def test_features_mixed_along_their_axis_are_left_out(how):
    model, x = _Mixing(how).eval(), torch.randn(3, 6)
    dims = sn.discover(model, x, ratios=[0.25, 1.0])
    assert not [d for d in dims if "a" in d.out or (how != "conv" and "o" in d.inp)], dims
    assert (("b",), ("c",)) in [(d.out, d.inp) for d in widths(dims)]


class _RawRead(nn.Module):
    """``a -> b -> o`` where the forward also reads ``b``'s tensors directly (``how``), next to a plain pair
    ``c -> d``. Read as an attribute of a wrapped module a tensor is the active slice, so what the op does to
    it decides, as for features: an integer index picks another unit at every width, a penalty over
    ``b.parameters()`` sees the full tensors live (and the smaller ones exported); an elementwise use of the
    slice is consistent at every width."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a, self.b, self.o = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.c, self.d = nn.Linear(6, 8), nn.Linear(8, 3)
        if how == "user_buffer":  # a tensor of the user's on a Linear: not sliced, read whole
            self.b.register_buffer("gate", torch.rand(8))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        h = F.relu(self.b(F.relu(self.a(x))))
        if self.how == "user_buffer":
            return self.o(h * self.b.gate) + self.d(F.relu(self.c(x)))
        if self.how == "counter":  # not repeatable: each call counts (the export comparison steps aside)
            self.calls += 1
            return (self.o(h) + self.d(F.relu(self.c(x)))) * (1 + 0.01 * self.calls)
        y = self.o(h) + self.d(F.relu(self.c(x)))
        if self.how == "last_bias":
            return y + self.b.bias[-1]
        if self.how == "parameters":  # a penalty returned next to the output
            return y, sum(p.square().sum() for p in self.b.parameters())
        if self.how == "parameters_scale":
            return y * torch.stack([p.mean() for p in self.b.parameters()]).sum()
        if self.how == "functional":  # b's weight in a functional call beside b's own: a call of b, its mean over
            # b's features reduces over the sub-model's own (as a model built at that width does)
            return y + F.linear(F.relu(self.a(x)), self.b.weight).mean(-1, keepdim=True)
        if self.how == "scale_by_bias":  # b's features scaled by its own bias: the same slice live and exported
            return self.o(h * self.b.bias) + self.d(F.relu(self.c(x)))
        if self.how == "clamp":  # an in-place write into the slice, as a weight clip in the forward
            with torch.no_grad():
                self.b.weight.clamp_(-0.5, 0.5)
            return y
        raise AssertionError(self.how)


@pytest.mark.parametrize("how, kept_b_out, kept_a_out", [
    ("last_bias", False, True), ("parameters", False, False), ("parameters_scale", False, False),
    ("functional", True, True), ("scale_by_bias", True, True), ("clamp", True, True),
    ("user_buffer", False, True), ("counter", True, True)])
def test_a_module_tensor_read_by_the_forward_is_linked_to_its_features(how, kept_b_out, kept_a_out):
    model, x = _RawRead(how).eval(), torch.randn(3, 6)
    with torch.no_grad():
        model.b.weight.mul_(0.5)  # (inside the clamp: the clip writes nothing)
    expected = run(copy.deepcopy(model), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dims = sn.discover(model, x, ratios=[0.25, 1.0])
    outs = {p for d in widths(dims) for p in d.out}
    assert ("b" in outs, "a" in outs) == (kept_b_out, kept_a_out), dims
    assert (("c",), ("d",)) in [(d.out, d.inp) for d in widths(dims)]
    nest = sn.wrap(model, *dims, example=x)  # (check compares with the export too: a counter starts both alike)
    model.calls.zero_()
    assert all(map(torch.equal, output_leaves(run(model, x)), output_leaves(expected)))
    for sub in nest.submodels:
        small = nest.export(sub)
        with torch.no_grad(), nest.use(sub):
            live = model(x)
        for a, b in zip(output_leaves(small(x)), output_leaves(live)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


class _ReadsItsStatistics(nn.Module):
    """A forward that scales by a BatchNorm's running variance, read directly: the running statistics are
    sliced with the channels, so the group stays."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv(x)) * self.bn.running_var.mean()))


def test_a_norm_statistic_read_by_the_forward_follows_the_channels():
    torch.manual_seed(0)
    model, x = _ReadsItsStatistics().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
    dims = sn.discover(model, x, ratios=[0.25, 1.0])
    assert [(d.out, d.inp, d.norm) for d in widths(dims)] == [(("conv",), ("conv2",), ("bn",))]
    nest = sn.wrap(model, *dims, example=x)
    with torch.no_grad(), nest.use(nest.smallest):
        torch.testing.assert_close(nest.export(nest.smallest)(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dataclass_out", [False, True])
def test_a_dataclass_output_is_opened_so_its_classes_never_shrink(dataclass_out):
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        note: str = "x"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(6, 8), nn.Linear(8, 5)

        def forward(self, x):
            y = self.o(F.relu(self.a(x)))
            return Out(y) if dataclass_out else y

    model, x = Net().eval(), torch.randn(3, 6)
    dims = sn.discover(model, x, ratios=[0.25, 1.0])
    assert [(d.out, d.inp) for d in widths(dims)] == [(("a",), ("o",))]
    with pytest.raises(sn.SortedNetError, match="changes the output shapes"):
        sn.wrap(model, sn.Width("cls", [2, 5], out="o"), example=x)
    assert type(model.o) is nn.Linear  # refused before anything changed


class _Classes(nn.Module):
    """Class scores that leave the network reduced (top class and its probability, log-partition, a sum), stored on
    the module, or inside a container pytree keeps whole: no layer reads them, and they are not a visible output."""

    def __init__(self, how):
        super().__init__()
        self.how, self.a, self.o, self.aux = how, nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        y = self.o(h)
        if self.how == "top":
            r = y.softmax(-1).max(-1)
            return r.values, r.indices
        if self.how == "logsumexp":
            return torch.logsumexp(y, -1)
        if self.how == "sum":
            return y.sum(-1) + self.aux(h).pow(2).mean()
        if self.how == "stored":
            self.last_aux = self.aux(h)
            return y
        return y, collections.UserDict(aux=self.aux(h))


@pytest.mark.parametrize("how", ["top", "logsumexp", "sum", "stored", "userdict"])
def test_features_no_layer_reads_are_never_shrunk(how):
    """A Width only writing features (no layer reads them) would shrink classes that leave the network unseen: the
    sub-model picked its top class among the first half, or returned half of an auxiliary head."""
    model, x = _Classes(how).eval(), torch.randn(3, 6)
    dims = sn.discover(model, x, ratios=[0.5, 1.0])
    assert [(d.out, d.inp) for d in widths(dims)] == [(("a",), ("o", "aux") if how in ("sum", "stored", "userdict")
                                                      else ("o",))]
    if how == "userdict":  # check compares the tensors inside the container too
        with pytest.raises(sn.SortedNetError, match="changes the output shapes"):
            sn.wrap(model, sn.Width("cls", [2, 4], out="aux"), example=x)
        assert type(model.aux) is nn.Linear


class _TokenMean(nn.Module):
    def __init__(self, key):
        super().__init__()
        self.key, self.a, self.c = key, nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.c(F.relu(self.a(x)).mean(**{self.key: 1}))


@pytest.mark.parametrize("key", ["dim", "axis"])
def test_numpy_style_axis_keywords_are_read_like_dim(key):
    """``h.mean(axis=1)`` (torch takes NumPy's spelling) averages the tokens, as ``dim=1`` does: the features stay
    one group (axis= was taken for the default dimension, and the group was dropped)."""
    dims = sn.discover(_TokenMean(key).eval(), torch.randn(2, 5, 8), ratios=[0.5, 1.0])
    assert [(d.out, d.inp, d.sizes) for d in widths(dims)] == [(("a",), ("c",), (8, 16))]


# -- BatchNorm subclasses with a forward of their own (timm's BatchNormAct2d) ----------------------------------
class _FullStatsBN(nn.BatchNorm2d):
    """Reads its statistics from the registry, not the (sliced) attributes."""

    def forward(self, x):
        return F.batch_norm(x, self._buffers["running_mean"], self._buffers["running_var"], self.weight, self.bias,
                            self.training, self.momentum, self.eps)


class _LastChannelsBN(nn.BatchNorm2d):
    """Takes as many channels as it gets, from the end: runs at every size, with the wrong channels."""

    def forward(self, x):
        c = x.shape[1]
        p, b = self._parameters, self._buffers
        return F.batch_norm(x, b["running_mean"][-c:], b["running_var"][-c:], p["weight"][-c:], p["bias"][-c:],
                            self.training, self.momentum, self.eps)


class _StoredCountBN(nn.BatchNorm2d):
    """Sizes a reshape by a channel count kept under its own name."""

    def __init__(self, c):
        super().__init__(c)
        self.c = c

    def forward(self, x):
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return y.reshape(x.shape[0], self.c, -1).reshape(x.shape)


class _ChannelsLastBN(nn.BatchNorm2d):
    """Takes (batch, height, width, channels): cannot be run on the check's (batch, channels, ...) input."""

    def forward(self, x):
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


@pytest.mark.parametrize("bn,why", [(_FullStatsBN, "fails on 4"), (_LastChannelsBN, "relative difference"),
                                    (_StoredCountBN, "fails on 4"), (_ChannelsLastBN, "does not take")])
def test_a_batchnorm_subclass_whose_forward_ignores_the_slices_is_refused_unchanged(bn, why):
    if bn is _ChannelsLastBN:  # (batch, h, w, channels) throughout
        layers, x = (nn.Linear(3, 8), bn(8), nn.Linear(8, 2)), torch.randn(2, 4, 4, 3)
    else:
        layers, x = (nn.Conv2d(3, 8, 1), bn(8), nn.Conv2d(8, 2, 1)), torch.randn(2, 3, 4, 4)
    model = arch._randomise_bn(nn.Sequential(*layers))
    expected, snap = run(model, x), snapshot(model)
    with pytest.raises(sn.SortedNetError, match=why) as e:
        sn.wrap(model, sn.Width("c", [4, 8], out="0", inp="2", norm="1"))
    assert "'1'" in str(e.value) and bn.__name__ in str(e.value)
    assert_unchanged(model, snap)
    assert torch.equal(run(model, x), expected)


def test_a_batchnorm_subclass_that_reads_its_attributes_is_discovered_trained_calibrated_and_exported():
    model, x = build("mobilenet_v2_timm")
    snap = snapshot(model)
    dims = sn.discover(model, x, ratios=[0.5, 1.0])
    norms = {p for d in widths(dims) for p in d.norm}
    assert {"bn1", "blocks.0.bn1", "blocks.0.bn2", "bn2"} <= norms   # the BatchNormAct2d modules, as norms
    nest = sn.wrap(model, *dims, submodels=sn.by_ratio(dims, [0.5, 1.0]), example=x)
    assert all(torch.equal(v, snap["state"][k]) for k, v in model.state_dict().items())  # the check wrote nothing
    small = nest.smallest
    model.train()
    with nest.use(small):
        model(torch.randn(8, 3, 16, 16)).square().mean().backward()   # the training path runs sliced
    assert all(p.grad is not None for p in model.parameters())
    nest.calibrate([torch.randn(8, 3, 16, 16) for _ in range(2)])
    model.eval()
    with nest.use(small):
        live = run(model, x)
    torch.testing.assert_close(run(nest.export(small), x), live, atol=1e-5, rtol=0)


def test_sync_batchnorm_is_still_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.SyncBatchNorm(8), nn.Conv2d(8, 2, 1))
    with pytest.raises(sn.SortedNetError, match="own forward"):
        sn.wrap(model, sn.Width("c", [4, 8], out="0", inp="2", norm="1"))


@pytest.mark.parametrize("mult", [0, -3, 2.5, True, "2"])
def test_bad_multiple_of_is_refused(mult):
    model, x = build("mlp")
    with pytest.raises(sn.SortedNetError, match="multiple_of"):
        sn.discover(model, x, multiple_of=mult)


class _TwoGroupNorms(nn.Module):
    """One conv read by GroupNorms of 2 and of 3 channels per group: sizes must be multiples of 6."""

    def __init__(self):
        super().__init__()
        self.c1, self.g1, self.g2 = nn.Conv2d(3, 12, 1), nn.GroupNorm(6, 12), nn.GroupNorm(4, 12)
        self.c2 = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        h = self.c1(x)
        return self.c2(self.g1(h) + self.g2(h))


def test_group_norms_of_several_group_sizes_take_the_least_common_multiple():
    (d,) = sn.discover(_TwoGroupNorms().eval(), torch.randn(2, 3, 4, 4), ratios=[0.25, 0.5, 1.0])
    assert d.sizes == (6, 12) and set(d.norm) == {"g1", "g2"}


class _OneGroupNorm(nn.Module):
    """GroupNorm(1, C), the "LayerNorm for conv" idiom, next to GroupNorm(4, 8)."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(1, 16)
        self.c2, self.gn2, self.head = nn.Conv2d(16, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.gn2(self.c2(torch.relu(self.gn(self.c1(x))))))
        return self.head(h.mean((2, 3)))


def test_one_group_norm_shrinks_as_one_group_of_the_active_channels():
    """GroupNorm(1, C) was refused at every smaller size ("16 channels per group; sizes not multiples of 16")
    and left whole by discover: it is one group of the active channels, exported as GroupNorm(1, c)."""
    torch.manual_seed(0)
    model, x = _OneGroupNorm(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    dims = sn.discover(model, x, ratios=[0.25, 0.5, 1.0])
    assert [(d.sizes, d.norm) for d in dims] == [((4, 8, 16), ("gn",)), ((2, 4, 8), ("gn2",))]
    nest = sn.wrap(model, *dims, example=x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)
        for sub in nest.submodels:
            small = nest.export(sub)
            assert (small.gn.num_groups, small.gn.num_channels) == (1, sub[dims[0].name])
            with nest.use(sub):
                torch.testing.assert_close(model(x), small(x), rtol=1e-5, atol=1e-6)
        sort_units(nest, "l1", example=x)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


class _CallsGroupNorm(nn.Module):
    """A forward calling F.group_norm with a group count of its own on a GroupNorm's weights."""

    def __init__(self, call_groups: int, module_groups: int):
        super().__init__()
        self.call_groups = call_groups
        self.c0, self.gn = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(module_groups, 16)
        self.c1, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        h = F.group_norm(self.c0(x), self.call_groups, self.gn.weight, self.gn.bias)
        return self.fc(self.c1(F.relu(h)).mean((2, 3)))


@pytest.mark.parametrize("call_groups, module_groups", [(4, 1), (2, 4), (1, 1), (4, 4)])
def test_a_group_norm_call_with_its_own_group_count_is_not_taken_for_the_modules(call_groups, module_groups):
    """F.group_norm(h, 4, gn.weight, gn.bias) on a GroupNorm(1, 16): discover sliced the channels by the module's
    rule (one group of the active channels) while the call cut 4 groups anew at every width (the sub-model's
    norm 0.69 off the full model's on the kept channels, live == export, no word); a GroupNorm(4, 16) called with
    2 groups was as silent. Now the channels are kept whole and a hand-written Width is refused by name; a
    call with the module's own count is sliced as before."""
    torch.manual_seed(0)
    model, x = _CallsGroupNorm(call_groups, module_groups).eval(), torch.randn(2, 3, 8, 8)
    own = call_groups == module_groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dims = sn.discover(model, x, ratios=[0.25, 0.5, 1.0])
    assert any(d.spec().get("norm") == ["gn"] for d in dims) == own
    decl = sn.Width("w", [4, 16], out="c0", inp="c1", norm="gn")
    if own:
        sn.wrap(model, decl, example=x).unwrap()
    else:
        with pytest.raises(sn.SortedNetError, match=f"regrouped by 'group_norm'.*{call_groups} groups of its own"):
            sn.wrap(model, decl, example=x)


def test_sort_units_on_units_read_in_order_names_the_cause():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
    model.append(_Cumsum()).append(nn.Linear(16, 2))
    x = torch.randn(8, 4)
    nest = sn.wrap(model, *sn.discover(model, x, ratios=[0.5, 1.0]), example=x)
    with pytest.raises(sn.SortedNetError, match="in their order"):
        sort_units(nest, "l1", example=x)


class _Cumsum(nn.Module):
    def forward(self, x):
        return x.cumsum(-1)


def test_a_batchnorm_subclass_on_the_meta_device_is_refused_unverified():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 1), arch.BatchNormAct2d(8), nn.Conv2d(8, 2, 1))
    with pytest.raises(sn.SortedNetError, match="meta-device"):
        sn.wrap(model, sn.Width("c", [4, 8], out="0", inp="2", norm="1"))
    assert not any("_sn" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("first", [True, False])
def test_heads_of_an_attention_that_adds_its_own_residual_are_discovered(kv_heads, first):
    torch.manual_seed(0)
    from models import Attention

    class Attn(Attention):  # the same attention, its residual inside its forward
        def forward(self, x):
            y = super().forward(x)
            return x + y if first else y + x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(6, 16), Attn(16, 4, kv_heads), nn.Linear(16, 3)

        def forward(self, x):
            return self.out(self.attn(self.inp(x)))

    model, x = Net().eval(), torch.randn(2, 5, 6)
    dims = sn.discover(model, x, ratios=[0.5, 1.0])
    heads = [d for d in dims if isinstance(d, sn.Heads)]
    assert [(d.attn, tuple(d.sizes)) for d in heads] == [(("attn",), (2, 4))]
    hidden = [d for d in dims if isinstance(d, sn.Width) and "attn.o" in d.out]
    assert hidden and "inp" in hidden[0].out      # the residual couples o's output with the block's input
    nest = sn.wrap(model, *dims, example=x)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(nest.export(sub)(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("where", ["leaf", "container"])
def test_a_torchscript_part_is_refused_by_name_and_the_model_left_whole(where):
    """A scripted module keeps its own forward and parameter tables, which the dry runs and private copies of
    discover / check / sort_units cannot follow (they raised a raw AttributeError / KeyError)."""
    from sortednet.importance import sort_units

    part = nn.Linear(16, 16) if where == "leaf" else nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), torch.jit.script(part), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 3)).eval()
    x = torch.randn(3, 6)
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match="'2' is a TorchScript module"):
        sn.discover(model, x, ratios=[0.5, 1.0])
    assert_unchanged(model, before)
    dim = sn.Width("h", [6, 12], out="4", inp="6")  # (a width the scripted part does not read; still a dry run
    with pytest.raises(sn.SortedNetError, match="'2' is a TorchScript module"):  # of the whole forward)
        sn.wrap(model, dim, example=x)
    assert_unchanged(model, before)
    nest = sn.wrap(model, dim)
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match="'2' is a TorchScript module"):
        sort_units(nest, "l1", example=x)
    assert_unchanged(model, before)


class _ScriptedAct(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2


def test_a_stateless_scripted_activation_is_run_like_any_module():
    """Only scripted parts holding tensors or children are refused by the dry runs (a scripted activation
    worked before that refusal and works now); tracing the wiring cannot see inside it and says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), torch.jit.script(_ScriptedAct()), nn.Linear(16, 3)).eval()
    x = torch.randn(3, 6)
    nest = sn.wrap(model, sn.Width("h", [4, 16], out="0", inp="2"), example=x)
    assert nest.cost(nest.smallest, "flops", example=x) < nest.cost(nest.largest, "flops", example=x)
    with torch.no_grad(), nest.use(nest.smallest):
        torch.testing.assert_close(nest.export(nest.smallest)(x), model(x), atol=1e-6, rtol=0)
    nest.unwrap()
    with pytest.raises(sn.SortedNetError, match="'1' is a TorchScript module"):
        sn.discover(model, x, ratios=[0.5, 1.0])


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_multi_query_attention_heads_are_discovered(kv_heads):
    """One key/value head that every query head reads: its k / v projections have no Heads target, so the block
    was not taken for attention and its heads were kept whole (a KeptWholeWarning, no Heads)."""
    torch.manual_seed(0)
    from models import Attention

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(6, 16), Attention(16, 4, kv_heads), nn.Linear(16, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.out(h + self.attn(h))

    model, x = Net().double().eval(), torch.randn(2, 5, 6, dtype=torch.float64)
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptWholeWarning)
        dims = sn.discover(model, x, ratios=[0.25, 0.5, 1.0])
    heads = [d for d in dims if isinstance(d, sn.Heads)]
    assert [(d.attn, tuple(d.sizes)) for d in heads] == [(("attn",), (1, 2, 4) if kv_heads == 1 else (2, 4))]
    nest = sn.wrap(model, *dims, example=x)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(nest.export(sub)(x), model(x), atol=1e-12, rtol=0)
    size = heads[0].sizes[0]
    with torch.no_grad():
        reference.attn.o.weight[:, size * 4:] = 0  # the heads a sub-model drops, silenced in the full model
        with nest.use({**nest.largest, heads[0].name: size}):
            torch.testing.assert_close(model(x), reference(x), atol=1e-12, rtol=0)


class _PaddedEncoder(nn.Module):
    """A TransformerEncoder fed a padding mask: in eval under no_grad its padded batch is a nested tensor."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2)
        self.out = nn.Linear(16, 3)

    def forward(self, x, mask):
        return self.out(self.enc(self.inp(x), src_key_padding_mask=mask))


def test_check_and_discover_run_an_encoder_on_its_nested_tensor_path():
    """The attention outputs check compares per unit were nested tensors there, and discover and
    wrap(..., example=) stopped with PyTorch's "NestedTensorImpl doesn't support sizes"."""
    torch.manual_seed(0)
    model = _PaddedEncoder().eval()
    x, mask = torch.randn(3, 7, 6), torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 5:], mask[1, 3:] = True, True
    nest = sn.wrap(model, sn.Heads("heads", [2, 4], attn="enc.layers.*.self_attn"),
                   sn.Width("ffn", [16, 32], out="enc.layers.*.linear1", inp="enc.layers.*.linear2"),
                   example=(x, mask))
    nest.unwrap()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (PyTorch's prototype warning for nested tensors; KeptWholeWarning)
        dims = sn.discover(model, (x, mask), ratios=[0.5, 1.0])
    assert any(isinstance(d, sn.Heads) for d in dims) and widths(dims), dims
    nest = sn.wrap(model, *dims, example=(x, mask))
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            live = model(x, mask)
        with torch.no_grad():
            torch.testing.assert_close(nest.export(sub).eval()(x, mask), live, atol=1e-5, rtol=0)


class _OwnHeadCount(nn.Module):
    """An attention that splits its heads by a count of its own (``self.h``), beside the ``num_heads`` attribute
    that discover binds: its Heads declaration fails the dry run."""

    def __init__(self, c=16, h=4):
        super().__init__()
        self.h = self.num_heads = h
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.h, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class _OwnHeadsBlock(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.attn, self.fc1, self.fc2, self.head = _OwnHeadCount(c), nn.Linear(c, 32), nn.Linear(32, c), nn.Linear(c, 5)

    def forward(self, x):
        h = x + self.attn(x)
        return self.head((h + self.fc2(F.gelu(self.fc1(h)))).mean(1))


def test_a_declaration_dropped_by_its_dry_run_is_named():
    """The warning said only "1 declaration(s) failed their dry run": which one, and how to learn why, is said."""
    torch.manual_seed(0)
    model, x = _OwnHeadsBlock().eval(), torch.randn(2, 6, 16)
    proposed = sn.discover(model, x, ratios=[0.5, 1.0], verify=False)
    heads = [d for d in proposed if d.kind == "heads"]
    assert heads, proposed  # (the trace binds num_heads: the declaration the dry run then drops)
    with pytest.warns(KeptWholeWarning, match=rf"1 declaration\(s\) failed their dry run or could not be "
                                              rf"verified on the example \(.*\): heads {heads[0].name!r} "
                                              r"\(discover\(\.\.\., verify=False\) returns them"):
        found = sn.discover(model, x, ratios=[0.5, 1.0])
    assert all(d.kind != "heads" for d in found) and found
    with pytest.raises(sn.SortedNetError):
        sn.wrap(model, heads[0], example=x)


class _SpatialSoftmax(nn.Module):
    """A per-channel spatial softmax, its reshape given the channel count stored at full size (``stored``), or
    read from the tensor: at 4 of 16 channels ``reshape(b, 16, -1)`` moves channels into the spatial axis."""

    def __init__(self, stored: bool):
        super().__init__()
        self.stored, self.ch = stored, 16
        self.stem, self.bn = nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.c1, self.fc = nn.Conv2d(16, 16, 3, 1, 1), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        y = self.c1(x)
        a = y.reshape(y.shape[0], self.ch if self.stored else y.shape[1], -1).softmax(-1).reshape(y.shape)
        return self.fc((x + y * a).mean((2, 3)))


def test_a_reshape_to_a_count_stored_at_full_size_is_kept_whole_and_refused_by_check():
    """reshape(b, self.ch, -1) with self.ch = 16: the trace at full size sees the channel axis carried through,
    so discover sliced the group and check passed, while every smaller sub-model ran the softmax over quarter
    maps (0.25 off the nested model). The shapes at the smallest size show the channels moving into another
    axis: discover keeps the group whole (saying why) and check refuses a hand declaration of it. Written with
    y.shape[1], the same model is discovered and passes."""
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="no group it can slice safely"):
        assert sn.discover(_SpatialSoftmax(stored=True).eval(), x, ratios=[0.25, 1.0]) == []
    dims = sn.discover(_SpatialSoftmax(stored=False).eval(), x, ratios=[0.25, 1.0])
    assert [d.sizes for d in dims] == [(4, 16)]
    sn.wrap(_SpatialSoftmax(stored=False).eval(), *dims, example=x)
    model = _SpatialSoftmax(stored=True).eval()
    with pytest.raises(sn.SortedNetError, match="re-cuts its units at a smaller size"):
        sn.wrap(model, sn.Width("w", [4, 16], out=["stem", "c1"], inp=["c1", "fc"], norm="bn"), example=x)
    assert not any("_sn" in m.__dict__ for m in model.modules())


class _SequenceReduction(nn.Module):
    """SegFormer's efficient attention in small: a conv's output reshaped by the stream's channel count, so the
    conv's outputs and the stream must shrink together (the trace sees two groups)."""

    def __init__(self, c=16):
        super().__init__()
        self.inp, self.sr = nn.Linear(8, c), nn.Conv2d(c, c, 2, stride=2)
        self.norm, self.kv, self.out = nn.LayerNorm(c), nn.Linear(c, c), nn.Linear(c, 4)

    def forward(self, x):
        h = self.inp(x)
        b, _, c = h.shape
        r = self.sr(h.permute(0, 2, 1).reshape(b, c, 4, 4)).reshape(b, c, -1).permute(0, 2, 1)
        return self.out(h.mean(1) + self.kv(self.norm(r)).mean(1))


def test_groups_that_fail_alone_but_run_together_are_merged():
    """Two groups the trace could not couple, each failing its dry run alone, were both dropped (part of the
    model unsliced, SegFormer's stages among them); merged into one Width they run, check and export."""
    torch.manual_seed(0)
    model, x = _SequenceReduction().eval(), torch.randn(2, 16, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (nothing dropped, nothing to warn about)
        dims = sn.discover(model, x, ratios=[0.5, 1.0])
    assert len(dims) == 1 and set(dims[0].out) == {"inp", "kv", "sr"} and set(dims[0].norm) == {"norm"}
    nest = sn.wrap(model, *dims, example=x)
    for sub in nest.submodels:
        with nest.use(sub), torch.no_grad():
            torch.testing.assert_close(nest.export(sub)(x), model(x))


@settings(max_examples=40, deadline=None)
@given(full=st.integers(2, 600), multiple=st.sampled_from([1, 2, 4, 8, 16]),
       ratios=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=5))
def test_by_ratio_picks_the_size_discover_made_for_each_ratio(full, multiple, ratios):
    """by_ratio took the smallest size at least ratio * full, where discover rounds ratio * full to the nearest
    multiple: wherever discover rounded down, the ratio's sub-model skipped its size for the next one (a group
    at full width in the '0.5' sub-model; a discovered size never used). Each ratio now gets, in every
    dimension discover returned, the size it made for the ratio, whatever the multiple; the same sizes declared
    by hand keep the smallest size at least ratio * full."""
    model = nn.Sequential(nn.Linear(3, full), nn.ReLU(), nn.Linear(full, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dims = sn.discover(model, torch.randn(2, 3), ratios=ratios, multiple_of=multiple, verify=False)
    m = multiple if full % multiple == 0 else 1
    made = {min(full, max(m, round(r * full / m) * m)) for r in ratios}
    if len(made | {full}) < 2:
        assert dims == []
        return
    (dim,) = dims
    assert {s[dim.name] for s in sn.by_ratio(dims, ratios)} == made
    own = sn.Width(dim.name, dim.sizes, out="0", inp="2")
    assert [s[dim.name] for s in sn.by_ratio([own], ratios)] == list(dict.fromkeys(
        next(x for x in dim.sizes if x >= r * full * (1 - 1e-6)) for r in ratios))


def test_by_ratio_on_discovered_groups_keeps_every_group_at_the_ratio():
    model = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 2))
    dims = sn.discover(model, torch.randn(3, 5), ratios=[0.25, 0.5, 1.0], multiple_of=8)
    assert [list(d.sizes) for d in dims] == [[8, 16, 40], [8, 16, 24]]
    assert sn.by_ratio(dims, [0.25, 0.5, 1.0]) == [{"w0": 8, "w2": 8}, {"w0": 16, "w2": 16}, {"w0": 40, "w2": 24}]
    import numpy as np

    three = [sn.Width("a", [3, 6, 10], out="0", inp="2")]
    assert sn.by_ratio(three, [np.float32(0.3)]) == sn.by_ratio(three, [0.3]) == [{"a": 3}]
    # sizes of the user's own, where no size is discover's for the ratio: the smallest at least ratio * full
    # (every even grid too: [64, 128, 192, 256] at 0.3 took 64, a sub-model at 25% for a ratio of 0.3)
    for sizes, ratio, want in (([8, 64], 0.5, 64), ([16, 48, 64], 0.5, 48), ([2, 4, 6, 8], 0.375, 4),
                               ([4, 10, 16], 0.5, 10), ([64, 128, 192, 256], 0.3, 128),
                               ([64, 128, 192, 256], 0.6, 192), ([32, 64, 96, 128], 0.6, 96), ([2, 4, 6, 8], 0.3, 4),
                               ([2, 4, 6, 8], 0.55, 6)):
        assert sn.by_ratio([sn.Width("a", sizes, out="0", inp="2")], [ratio]) == [{"a": want}], sizes
    assert sn.by_ratio([sn.Depth("d", [3, 6, 9, 12], layers="blocks")], [0.6]) == [{"d": 9}]
    # a ratio discover made no size for: the smallest size at least ratio * full (0.6 of [25, 50, 75, 100] took 50)
    hundred = sn.discover(nn.Sequential(nn.Linear(5, 100), nn.ReLU(), nn.Linear(100, 2)), torch.randn(3, 5),
                          ratios=[0.25, 0.5, 0.75, 1.0])
    assert list(hundred[0].sizes) == [25, 50, 75, 100]
    assert sn.by_ratio(hundred, [0.6, 0.3, 0.5]) == [{"w0": 75}, {"w0": 50}]
    # a discovered declaration whose sizes the user changed is one of theirs
    edited = sn.discover(model, torch.randn(3, 5), ratios=[0.25, 0.5, 1.0], multiple_of=8)[0]
    edited = sn.Width(edited.name, [8, 16, 24, 40], out=edited.out, inp=edited.inp)
    assert sn.by_ratio([edited], [0.25]) == [{"w0": 16}]


def test_heads_are_not_proposed_on_an_example_of_one_position():
    """On one position an attention's output does not depend on its queries and keys, so whole heads cannot be
    verified there (wrap(..., example=) refuses that example): discover still proposed Heads, wrong for a model
    that builds per-head biases from the head count, and wrap() without an example took them in silence."""
    lm, x = build("lm_width_heads_depth")
    assert x.dim() == 2 and x.shape[1] > 1
    assert [d for d in sn.discover(lm, x, ratios=[0.5]) if isinstance(d, sn.Heads)]
    with pytest.warns(UserWarning, match="could not be verified on the example .*single position"):
        one = sn.discover(lm, x[:, :1], ratios=[0.5])
    assert one and not [d for d in one if isinstance(d, sn.Heads)]


class _FixedViewGate(nn.Module):
    """A squeeze-excite gate reshaped with the channel count stored at init (``view(B, self.c, 1, 1)``)."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.c = c
        self.conv1, self.conv2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 5, 1)
        self.bn, self.act = nn.BatchNorm2d(c), nn.PReLU(c)
        self.fc1, self.fc2 = nn.Linear(c, 4), nn.Linear(4, c)

    def forward(self, x):
        h = self.act(self.bn(self.conv1(x)))
        z = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))
        return self.conv2(h * z.view(h.shape[0], self.c, 1, 1)).mean((2, 3))


def test_a_dropped_width_is_not_said_to_be_heads_over_a_single_position():
    """A Width dropped by its dry run (a hard-coded view) was explained as "Heads over a single position, where
    attention does not depend on queries and keys", in a model without attention."""
    torch.manual_seed(0)
    model, x = _FixedViewGate().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sn.discover(model, x, ratios=[0.5, 1.0])
    said = [str(w.message) for w in seen if issubclass(w.category, KeptWholeWarning)]
    assert any("failed their dry run" in m for m in said), said
    assert not any("Heads over a single position" in m for m in said), said


class _OwnLayerNorm(nn.Module):
    """ConvNeXt's own LayerNorm class: a plain module calling F.layer_norm on its tensors."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-6)


def test_a_norm_class_of_the_models_own_is_named_as_such():
    """Kept whole (no slicer for it), but the reason given was "'layer_norm', an op discovery does not understand",
    an op it understands on a stock norm's tensors: the module's class is the cause, named with the way out."""
    model = nn.Sequential(nn.Linear(4, 16), _OwnLayerNorm(16), nn.Linear(16, 2))
    with pytest.warns(UserWarning, match=r"'layer_norm' on the tensors of '1', a _OwnLayerNorm that is no "
                                         r"nn.LayerNorm and has no slicer \(use nn.LayerNorm"):
        assert sn.discover(model, torch.randn(3, 4), ratios=[0.5, 1.0]) == []
    model[1] = nn.LayerNorm(16)
    assert [d.kind for d in sn.discover(model, torch.randn(3, 4), ratios=[0.5, 1.0])] == ["width"]


class _PenaltyMasked(torch.nn.Module):
    """Reads ``a``'s weights whole (a penalty added to the output: its sub-models differ from their export) and
    masks one logit with ``fill``."""

    def __init__(self, fill):
        super().__init__()
        self.a, self.b, self.fill = torch.nn.Linear(8, 16), torch.nn.Linear(16, 5), fill
        self.register_buffer("mask", torch.tensor([False, False, False, False, True]))

    def forward(self, x):
        pen = 0.1 * sum(p.square().sum() for p in self.a.parameters())
        y = self.b(torch.relu(self.a(x))) + pen
        return y + self.mask * self.fill[1] if isinstance(self.fill, tuple) else y.masked_fill(self.mask, self.fill)


@pytest.mark.parametrize("fill", [float("-inf"), -1e9, torch.finfo(torch.float32).min, ("added", -1e9)])
def test_a_large_finite_mask_value_does_not_hide_a_sub_model_that_differs_from_its_export(fill):
    """The live-against-export comparison measured the change against the output's largest entry: a -1e9 mask
    hid a difference of 0.49 (on a scale of 1.06), and discover kept a declaration whose sub-models are not their
    exports (with -inf it was dropped). Fill values are left out of the scale now."""
    import warnings

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dims = sn.discover(_PenaltyMasked(fill).eval(), x, ratios=[0.25, 1.0])
    assert not dims, [str(d) for d in dims]  # (the only width there is, a's, is read whole: dropped)
    with pytest.raises(sn.SortedNetError):
        sn.wrap(_PenaltyMasked(fill).eval(), sn.Width("h", [4, 16], out="a", inp="b"), example=x)


class _OwnScaledLinear(nn.Module):
    """A linear layer of the user's with a per-output scale (a slicer of the user's serves it)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.scale = nn.Parameter(torch.ones(n_out))

    def forward(self, x):
        return F.linear(x, self.weight) * self.scale


@sn.slicer(_OwnScaledLinear)
class _OwnScaledLinearSlicer(sn.Slicer):
    roles, attrs = ("out", "inp"), ("weight", "scale")
    views = {"weight": ((0, "out"), (1, "inp")), "scale": ((0, "out"),)}

    def full(self, m, role):
        return m._parameters["weight"].shape[0 if role == "out" else 1]


def test_discover_names_a_call_on_the_weight_of_a_module_of_a_slicer_of_ones_own():
    """F.linear on the weight of a module a user's slicer serves was kept whole as "'linear', an op discovery does
    not understand", though discover follows F.linear on a stock layer's weight: the reason names the module as
    one of a slicer's own, whose Width is declared by hand (and check verifies it)."""
    torch.manual_seed(0)
    model = nn.Sequential(_OwnScaledLinear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match=r"'linear' \(in '0'\) on 'weight' of '0', a module of a slicer's own: "
                                         r"discover follows this call on stock layers only"):
        assert sn.discover(model, x, ratios=[0.5, 1.0]) == []
    sn.wrap(model, sn.Width("h", [16, 32], out="0", inp="2")).check(x)


class _ListLayer(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cin, 8), nn.Linear(8, 4)

    def forward(self, feats):
        return self.fc2(torch.relu(self.fc1(torch.cat(feats, 1))))


class _AppendsAfterCat(nn.Module):
    """DenseNet's pattern: a list concatenated by a layer, then appended to after that op ran."""

    def __init__(self):
        super().__init__()
        self.l1, self.m, self.head = _ListLayer(6), nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x):
        feats = [x]
        h = self.l1(feats)
        feats.append(torch.relu(self.m(h)))  # (never concatenated: appended after l1's cat ran)
        return self.head(feats[-1])


def test_a_list_appended_to_after_an_op_read_it_is_recorded_as_the_op_saw_it():
    """discover recorded an op's list argument by reference: a tensor appended after torch.cat(feats) ran was
    taken for a part of that cat, its width kept whole ('concatenated by cat in l1') and not nested."""
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        found = sn.discover(_AppendsAfterCat(), torch.randn(2, 6), ratios=[0.5, 1.0])
    assert any(d.name == "m" and list(d.sizes) == [8, 16] for d in found)
    assert not any("['m']" in str(w.message) for w in record)


def test_a_kept_whole_group_names_how_many_writers_it_holds_beyond_the_first_two():
    """The warning named a group by its first two writers only, as if that were all of it."""
    from sortednet.discovery import _label

    class Group:
        writer = "w"

        def __init__(self, out):
            self.out = out

        def roles(self, role):
            return self.out

    assert _label(Group(["a", "b", "c", "d"])) == "['a', 'b', ... 2 more]"
    assert _label(Group(["a", "b"])) == "['a', 'b']" and _label(Group([])) == "['w']"

"""sortednet.importance.sort_units: function-preserving on CNN, MLP, transformer
and HF families for every method; refuses (and restores) what it cannot permute;
raises the score of small sub-models of a trained model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import arch
import sortednet as sn
from models import FAMILIES, InterruptAt, assert_unchanged, interrupted, run, snapshot
from sortednet import importance
from sortednet.importance import METHODS, sort_units


def energy(model, x):
    return model(x).float().pow(2).mean()


def _case(name):
    if name in FAMILIES:
        case = FAMILIES[name]()
        return case.model.eval(), case.dims, case.example
    model, x = arch.build(name)
    return model, sn.discover(model, x, ratios=[0.5, 1.0]), x


CASES = [*sorted(FAMILIES), "resnet18", "mobilenet_v3", "vit_torchvision", "vit_timm", "unet"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", CASES)
def test_full_model_output_is_preserved(name, method):
    model, dims, x = _case(name)
    before = run(model, x)
    nest = sn.wrap(model, *dims, submodels=[{}])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    orders = sort_units(nest, method, example=x, data=[x, x], loss_fn=energy)
    after = run(model, x)
    torch.testing.assert_close(after, before, atol=1e-5 * max(1.0, before.abs().max().item()), rtol=0)
    assert orders and all(sorted(o.tolist()) == list(range(len(o))) for o in orders.values())
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert moved or method == "bn", "nothing was permuted"  # fresh BatchNorms: all gammas 1, nothing to sort


def test_l1_puts_the_largest_rows_first_per_layer():
    model, dims, x = _case("lm_width_heads_depth")
    nest = sn.wrap(model, *dims, submodels=[{}])
    orders = sort_units(nest, "l1", example=x)
    assert {"ffn@blocks.0.fc1", "ffn@blocks.1.fc1", "ffn@blocks.2.fc1"} <= set(orders)  # one order per layer
    for b in model.blocks:
        n = b.fc1.weight.abs().sum(1)
        assert (n[:-1] >= n[1:]).all()


def test_batchnorm_gamma_and_running_stats_move_together():
    model, dims, x = _case("cnn_bn_residual")
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 1.5)
    nest = sn.wrap(model, *dims, submodels=[{}])
    pairs = {(round(g.item(), 6), round(m.item(), 6)) for g, m in zip(model.bn1.weight, model.bn1.running_mean)}
    sort_units(nest, "bn", example=x)
    pair = model.bn1.weight.detach().reshape(-1, 2)   # bn1 alone has gammas that vary; GroupNorm: pairs move whole
    assert (pair.sum(1)[:-1] >= pair.sum(1)[1:]).all() and (pair[:, 0] >= pair[:, 1]).all()
    assert {(round(g.item(), 6), round(m.item(), 6)) for g, m in zip(model.bn1.weight, model.bn1.running_mean)} == pairs


class _TwoGroupNorms(nn.Module):
    """One residual stream normalised by GroupNorms of unequal group sizes (``a`` and ``b`` channels a group)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.c1, self.gn1 = nn.Conv2d(3, 24, 3, padding=1), nn.GroupNorm(24 // a, 24)
        self.c2, self.gn2 = nn.Conv2d(24, 24, 1), nn.GroupNorm(24 // b, 24)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        x = F.relu(self.gn1(self.c1(x)))
        return self.fc((x + self.gn2(self.c2(x))).mean((2, 3)))


@pytest.mark.parametrize("sizes", [(4, 8), (8, 4), (4, 6), (3, 6), (2, 3)])
@pytest.mark.parametrize("method", ["l1", "l2", "taylor"])
def test_groupnorms_of_unequal_group_sizes_sort(sizes, method):
    """Whole blocks of the groups' least common multiple move, and the units inside a block move only within a
    stretch no group boundary crosses (sorting across the smaller groups' boundaries changed the output, and
    every such nest was refused as "not declared")."""
    torch.manual_seed(0)
    model, x = _TwoGroupNorms(*sizes).eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for m in (model.gn1, model.gn2):
            m.weight.uniform_(0.2, 2.0)
    before = model(x)
    nest = sn.wrap(model, *sn.discover(model, x, ratios=[0.5, 1.0]), submodels=[{}])
    orders = sort_units(nest, method, example=x, data=[x], loss_fn=energy)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    (order,) = orders.values()
    assert not torch.equal(order, torch.arange(24)), "nothing was permuted"
    for g in sizes:  # every group of either GroupNorm maps onto one group
        assert all(len({int(u) // g for u in chunk}) == 1 for chunk in order.reshape(-1, g))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_hf_models_keep_their_output(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48)
        model = transformers.BertModel(cfg).eval()
    else:
        cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48)
        model = transformers.LlamaModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    before = model(input_ids=ids).last_hidden_state
    nest = sn.from_transformers(model, ffn=[0.5], heads=[0.5])
    for method in ("l2", "taylor"):
        sort_units(nest, method, example={"input_ids": ids}, data=[{"input_ids": ids}],
                   loss_fn=lambda m, b: m(**b).last_hidden_state.pow(2).mean())
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).last_hidden_state, before, atol=1e-5, rtol=0)


def test_an_incomplete_nest_is_refused_and_restored():
    case = FAMILIES["cnn_bn_residual"]()
    model = case.model
    dims = [sn.Width("ch", [2, 4, 8], out=["stem", "dw"], inp=["conv", "dw", "head"], norm=["bn1", "gn"])]
    nest = sn.wrap(model, *dims, submodels=[{}])  # conv / bn2, the residual partner, are missing
    snap = snapshot(model)
    with pytest.raises(sn.SortedNetError, match="not declared"):
        sort_units(nest, "l1", example=case.example)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_sort_with_a_tolerance_of_their_rounding(dtype):
    """A reordered sum rounds differently in half precision (float16: 4e-4 relative on this MLP): the default
    tolerance follows the parameters' dtype instead of refusing a correct nest as "not declared"; a real
    undeclared coupling (a per-unit gate) is still refused."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 4)).to(dtype)
    nest = sn.wrap(m, sn.Width("h1", [256, 1024], out="0", inp="2"), sn.Width("h2", [256, 1024], out="2", inp="4"))
    x = torch.randn(32, 16, dtype=dtype)
    with torch.no_grad():
        before = m(x).float()
    assert set(sort_units(nest, "l1", example=x)) == {"h1@0", "h2@2"}
    with torch.no_grad():
        after = m(x).float()
    assert (after - before).norm() <= 5e-2 * before.norm()

    gated = _Gated().to(dtype)
    nest = sn.wrap(gated, sn.Width("h", [4, 8, 16], out="fc1", inp="fc2"))
    snap = snapshot(gated)
    with pytest.raises(sn.SortedNetError, match="not declared"):
        sort_units(nest, "l1", example=torch.randn(64, 8, dtype=dtype))
    assert_unchanged(gated, snap)


@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_an_undeclared_per_unit_gate_is_caught_at_any_output_scale(scale):
    """The output check is relative to the output's own scale: a small-valued output (a regression target
    in small units) changed by a permutation is refused as a large one is."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 1)
            self.gate = nn.Parameter(torch.rand(16) * 2)  # per hidden unit, left out of the Width

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            return self.fc2(h * self.gate[: h.shape[-1]])

    torch.manual_seed(0)
    model = Gated().eval()
    with torch.no_grad():
        model.fc2.weight.mul_(scale)
        model.fc2.bias.zero_()
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="fc1", inp="fc2"))
    snap = snapshot(model)
    with pytest.raises(sn.SortedNetError, match="not declared"):
        sort_units(nest, "l1", example=torch.randn(64, 8))
    assert_unchanged(model, snap)


def test_refusals():
    model, dims, x = _case("mlp")
    nest = sn.wrap(model, *dims)
    with pytest.raises(sn.SortedNetError, match="unknown method"):
        sort_units(nest, "random", example=x)
    with pytest.raises(sn.SortedNetError, match="example"):
        sort_units(nest, "l1")
    with pytest.raises(sn.SortedNetError, match="data"):
        sort_units(nest, "taylor", example=x)
    nest.unwrap()
    nest = sn.wrap(model, sn.Rank("r", [2, 4], targets=["fc1"], mode="svd"))
    with pytest.raises(sn.SortedNetError, match="Rank"):
        sort_units(nest, "l1", example=x)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    return x, torch.tensor(d.target)


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("method", ["l1", "l2", "taylor"])
def test_sorting_raises_small_submodel_accuracy_on_a_trained_mlp(method):
    x, y = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x[:1200]), y[:1200]).backward()
        opt.step()
    trained = copy.deepcopy(model)
    nest = sn.wrap(model, sn.Width("h", [8, 64], out="0", inp="2"))
    xt, yt = x[1200:], y[1200:]
    with nest.use("h=8"):
        before = _accuracy(model, xt, yt)
    full = _accuracy(model, xt, yt)
    sort_units(nest, method, data=[(x[:600], y[:600]), (x[600:1200], y[600:1200])])
    with nest.use("h=8"):
        after = _accuracy(model, xt, yt)
    assert _accuracy(model, xt, yt) == full == _accuracy(trained, xt, yt)
    assert after > before + 0.05, (before, after)


def test_sorting_a_resnet_on_a_small_batch_is_not_refused():
    """resnet18's wiring at full width, batch 2 at 32x32: the last stage's BatchNorm sees 2 values per channel
    in training mode, whose batch statistics magnify float32 rounding of the permuted sums. The training-mode
    verification uses running statistics, so the exact permutation is accepted."""
    torch.manual_seed(0)
    m, x = arch.ResNet(arch.BasicBlock, layers=(2, 2, 2, 2), width=64).eval(), torch.randn(2, 3, 32, 32)
    nest = sn.wrap(m, *sn.discover(m, x, ratios=[0.5, 1.0]))
    with torch.no_grad():
        before = m(x)
    sort_units(nest, "l1", example=x)
    with torch.no_grad():
        torch.testing.assert_close(m(x), before, atol=1e-5, rtol=1e-5)


def test_an_output_that_is_rounding_noise_around_zero_does_not_refuse_a_correct_sort():
    """An output of ~1e-9 (the mean of normalised features, returned for logging) changes by rounding under
    any permutation: measured against 1e-4 of the largest output's scale, it does not refuse the sort."""

    class Logged(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.ln, self.h = nn.Linear(16, 64), nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 4)

        def forward(self, x):
            z = self.ln(self.b(torch.relu(self.a(x))))
            return self.h(z), z.mean()

    torch.manual_seed(0)
    model, x = Logged().eval(), torch.randn(32, 16)
    nest = sn.wrap(model, sn.Width("h", [16, 32, 64], out="a", inp="b"))
    with torch.no_grad():
        ref = model(x)[0]
    sort_units(nest, "l1", example=x)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref, atol=1e-5, rtol=1e-5)


def test_sorting_drops_profile_scores_measured_before_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="0", inp="2"))
    x = torch.randn(32, 4)
    nest.profile(x, metrics=("params",), score=lambda sub: float(model(x).detach().std()), progress=False)
    assert nest._profile.scores is not None
    with pytest.warns(UserWarning, match="no longer apply"):
        sort_units(nest, "l1", example=x)
    assert nest._profile is not None and nest._profile.scores is None and "params" in nest._profile.costs


class _Gated(nn.Module):
    """A per-unit gate the width does not declare: any permutation changes the output (the sort is refused)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.gate = nn.Parameter(torch.rand(16) * 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h * self.gate[: h.shape[-1]])


@pytest.mark.parametrize("sort", ["refused", "identity"])
@pytest.mark.parametrize("trained", [False, True])
def test_a_sort_that_moves_nothing_keeps_the_scores_and_their_staleness(sort, trained):
    """A refused sort (undone) or one that moves nothing leaves the profile exactly as it was: scores that
    described the weights still do (no stale warning for the write-back), and scores made stale by training
    before the sort are still said to be stale at pick."""
    from sortednet.nest import StaleScoresWarning

    torch.manual_seed(0)
    if sort == "refused":
        m = _Gated()
        nest = sn.wrap(m, sn.Width("h", [4, 8, 16], out="fc1", inp="fc2"))
    else:
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        nest = sn.wrap(m, sn.Width("h", [4, 8, 16], out="0", inp="2"))
    x = torch.randn(16, 8)
    if sort == "identity":
        sort_units(nest, "l1", example=x)  # sorted once: the second sort is the identity
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nest.profile(x, score=lambda s: float(m(x).abs().mean()), repeat=1, progress=False)
    if trained:  # (a tiny step: the weights change, their unit order does not)
        opt = torch.optim.SGD(m.parameters(), lr=1e-7)
        m(x).sum().backward()
        opt.step()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if sort == "refused":
            with pytest.raises(sn.SortedNetError, match="permuting changes"):
                sort_units(nest, "l1", example=x)
        else:
            assert all(torch.equal(o, torch.arange(len(o))) for o in sort_units(nest, "l1", example=x).values())
        assert not [w for w in seen if "no longer apply" in str(w.message)]
        assert nest._profile.scores is not None
        nest.pick(params=10**9)
    assert any(issubclass(w.category, StaleScoresWarning) for w in seen) == trained, [str(w.message) for w in seen]


def test_bn_scores_fall_back_to_l1_where_the_batchnorm_has_no_gamma():
    """``affine=False``: no gamma to rank by (its first tensor is the running mean): "bn" orders as "l1"."""
    orders = {}
    for method in ("bn", "l1"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(), nn.Linear(8, 3)).eval()
        with torch.no_grad():
            m[1].running_mean.copy_(torch.arange(8.0) * 0.01)  # ascending: an order unrelated to the weights
        nest = sn.wrap(m, sn.Width("h", [2, 8], out="0", norm="1", inp="3"))
        orders[method] = sort_units(nest, method, example=torch.randn(4, 6))["h@0"].tolist()
    assert orders["bn"] == orders["l1"] != list(range(7, -1, -1))


class _PreWidth(nn.Module):
    """A parameter outside the width comes first: L-BFGS keeps its whole flattened state there."""

    def __init__(self):
        super().__init__()
        self.pre, self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.pre(x)))))


def test_an_optimizer_whose_state_is_not_per_element_is_refused_unchanged():
    torch.manual_seed(0)
    m, x, y = _PreWidth(), torch.randn(8, 6), torch.randn(8, 3)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp="fc2"))
    opt = torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=3, history_size=5)

    def closure():
        opt.zero_grad()
        loss = (m(x) - y).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    before, state = snapshot(m), copy.deepcopy(opt.state_dict())
    with pytest.raises(sn.SortedNetError, match="LBFGS's state .* element by element"):
        sort_units(nest, "l1", example=x, optimizer=opt)
    assert_unchanged(m, before)
    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
        return a == b

    after = opt.state_dict()["state"][0]
    assert state["state"][0].keys() == after.keys()
    assert all(same(v, after[k]) for k, v in state["state"][0].items())
    # an optimizer of parameters the sort leaves in place (an Adafactor over the embeddings) refused the sort too
    pre = torch.optim.LBFGS(m.pre.parameters(), lr=0.5, max_iter=3, history_size=5)
    adam = torch.optim.Adam([*m.fc1.parameters(), *m.fc2.parameters()])
    (m(x) - y).pow(2).mean().backward()
    adam.step()
    pre.step(lambda: (m(x) - y).pow(2).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sort_units(nest, "l1", example=x, optimizer=[adam, pre])
    # nor one of parameters only a dimension left out of dims= would permute
    m2 = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    nest2 = sn.wrap(m2, sn.Width("h", [4, 16], out="0", inp="2"), sn.Width("g", [2, 8], out="2", inp="4"))
    last, x2 = torch.optim.LBFGS(m2[4].parameters(), lr=0.1, max_iter=2), torch.randn(5, 4)

    def loss2():
        last.zero_grad()
        loss = m2(x2).pow(2).mean()
        loss.backward()
        return loss

    last.step(loss2)
    assert last.state
    sort_units(nest2, "l1", example=torch.randn(5, 4), optimizer=[last], dims=["h"])


def _under_no_grad(f):
    with torch.no_grad():
        return f()


@pytest.mark.parametrize("bad, match", [
    (lambda m, b: torch.tensor(float("nan"), requires_grad=True) * m(b[0]).sum(), "loss of batch 0 is nan"),
    (lambda m, b: m(b[0]).sum() * 1e38 * 1e38, "loss of batch 0 is inf"),
    (lambda m, b: m(b[0]), "must be a scalar"),
    (lambda m, b: 1 / 0, "loss of batch 0 raised ZeroDivisionError"),
    # no gradient at all (a raw RuntimeError from backward)
    (lambda m, b: m(b[0]).sum().detach(), "loss of batch 0 carries no gradient"),
    (lambda m, b: _under_no_grad(lambda: m(b[0]).sum()), "loss of batch 0 carries no gradient"),
    # no gradient signal: the sort "succeeded" with the identity order everywhere, in silence
    (lambda m, b: m(b[0]).sum() * 0, r"every score \|weight x gradient\| is zero.*method='l1'"),
    (lambda m, b: torch.tensor(1.0, requires_grad=True), r"every score \|weight x gradient\| is zero"),
    # a zero-initialised layer after the sliced ones: every gradient reaching them is zero
    ("zero_head", r"zero-initialised layer"),
])
def test_taylor_refuses_a_loss_it_cannot_score_by_before_anything_changes(bad, match):
    """A NaN loss gave NaN scores for every unit; the sort then "succeeded" with the identity order, dropped the
    profile's scores and invalidated every KV cache. A loss that raises escaped as a raw error."""
    model, dims, x = _case("mlp")
    if bad == "zero_head":
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        nn.init.zeros_(last.weight)
        bad = lambda m, b: m(b[0]).square().mean()  # noqa: E731
    nest = sn.wrap(model, *dims)
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=match):
        sort_units(nest, "taylor", example=x, data=[(x, None)], loss_fn=bad)
    assert_unchanged(model, before)
    with pytest.raises(sn.SortedNetError, match="full model does not run on the example"):
        sort_units(nest, "l1", example=torch.randn(3, 999))
    assert_unchanged(model, before)


def test_a_nest_without_width_or_heads_is_refused_without_side_effects():
    """A Depth-only nest has no units: sort_units returned {} but still dropped the profile's scores and made
    every KV cache filled before it count as stale."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    nest = sn.wrap(nn.ModuleDict({"s": model}), sn.Depth("d", [1, 3], layers="s"))
    epoch = nest._state.epoch
    with pytest.raises(sn.SortedNetError, match="no Width or Heads dimension"):
        sort_units(nest, "l1", example=torch.randn(2, 4))
    assert nest._state.epoch == epoch


def test_sort_by_importance_moves_gradients_and_optimizer_state_with_the_units():
    """Gradients accumulated before ``sort_by_importance`` stayed in the old unit order (every family: the
    next optimizer step applied them to other neurons / heads); it had no ``optimizer=``. Both now follow: a
    sorted model trained on equals the never-sorted twin trained on, up to float rounding."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg)
        nest = sn.from_transformers(m, ffn=[32], heads=[2])
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(2):
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()  # gradients accumulated, step not taken yet
        return m, nest, opt

    def finish(m, opt):
        for _ in range(3):
            opt.step()
            opt.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            return m(input_ids=ids).logits

    twin, _, topt = build()
    m, nest, opt = build()
    perms = sn.sort_by_importance(nest, [ids], optimizer=opt)
    assert any(not torch.equal(p["ffn"], torch.arange(64)) for p in perms.values())  # units did move
    torch.testing.assert_close(finish(m, opt), finish(twin, topt), rtol=1e-4, atol=1e-4)
    with pytest.raises(sn.SortedNetError, match="optimizer= takes a torch.optim.Optimizer"):
        sn.sort_by_importance(nest, [ids], optimizer=object())


class _Inner(torch.optim.Optimizer):
    """A wrapper whose state lives in an inner optimizer (as ZeroRedundancyOptimizer's ``optim``)."""

    def __init__(self, params):
        params = list(params)
        super().__init__(params, {})
        self.optim = torch.optim.Adam(params, lr=0.05)

    def step(self, closure=None):
        return self.optim.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optim.zero_grad(set_to_none)


class _Shared(torch.optim.Optimizer):
    """A wrapper sharing its inner optimizer's state (as Accelerate's AcceleratedOptimizer)."""

    def __init__(self, params):  # (no Optimizer.__init__: every attribute is the inner one's)
        self.optimizer = torch.optim.Adam(params, lr=0.05)

    state = property(lambda self: self.optimizer.state)
    param_groups = property(lambda self: self.optimizer.param_groups)

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)


def test_an_optimizer_left_out_of_a_sort_is_named_and_several_can_be_passed():
    """An Adam that had stepped and was not passed as ``optimizer=`` kept its moments where the units were:
    three more steps later the model differed from its never-sorted twin by 0.2, with no word. It is now named
    in an OptimizerStateWarning; a model trained by two optimizers passes both (a list), a wrapper brings its
    inner optimizer's state along (and a state shared by the two, or passed twice, moves once): each trains on as
    its twin does."""
    from sortednet.importance import OptimizerStateWarning

    x, y = torch.randn(16, 6), torch.randn(16, 3)

    def build(kind):
        torch.manual_seed(0)
        m = _PreWidth()
        nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp="fc2"))
        opts = {"two": lambda: [torch.optim.Adam([*m.pre.parameters(), *m.fc1.parameters()], lr=0.05),
                                torch.optim.SGD(m.fc2.parameters(), lr=0.05, momentum=0.9)],
                "inner": lambda: [_Inner(m.parameters())], "shared": lambda: [_Shared(m.parameters())],
                }.get(kind, lambda: [torch.optim.Adam(m.parameters(), lr=0.05)])()
        for _ in range(3):
            (m(x) - y).pow(2).mean().backward()
            for o in opts:
                o.step()
                o.zero_grad()
        return m, nest, opts

    def finish(m, opts):
        for _ in range(3):
            (m(x) - y).pow(2).mean().backward()
            for o in opts:
                o.step()
                o.zero_grad()
        with torch.no_grad():
            return m(x)

    m, nest, opts = build("one")
    with warnings.catch_warnings():  # (a refused sort moves nothing: no warning about state left behind)
        warnings.simplefilter("error", OptimizerStateWarning)
        with pytest.raises(sn.SortedNetError, match="needs data="):
            sort_units(nest, "taylor", example=x)
    with pytest.warns(OptimizerStateWarning, match=r"sort_units: Adam \(state for 4 of them\)"):
        orders = sort_units(nest, "l1", example=x)
    assert not torch.equal(orders["h@fc1"], torch.arange(16))
    for kind in ("one", "twice", "two", "inner", "shared"):
        twin, _, topts = build(kind)
        m, nest, opts = build(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("error", OptimizerStateWarning)
            sort_units(nest, "l1", example=x, optimizer=opts + opts if kind == "twice" else
                       opts if kind == "two" else opts[0])
        torch.testing.assert_close(finish(m, opts), finish(twin, topts), rtol=1e-4, atol=1e-5, msg=kind)
    with pytest.raises(sn.SortedNetError, match="optimizer= takes a torch.optim.Optimizer \\(or a list of them\\)"):
        sort_units(nest, "l1", example=x, optimizer=[opts[0], "adam"])


@pytest.mark.parametrize("method", ["l1", "taylor"])
def test_a_restricted_nest_without_the_full_model_is_sorted_against_the_full_model(method):
    """sort_units verified (and scored) under ``nest.largest``: in a nest whose list leaves out the full model
    that is a smaller sub-model, whose output a permutation legitimately changes, so every sort was refused as a
    wiring mistake ("a module coupled to a dimension is not declared"; check passed)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    nest = sn.wrap(m, sn.Width("a", [8, 16, 32], out="0", inp="2"), sn.Width("b", [8, 16, 32], out="2", inp="4"),
                   submodels=[{"a": 8, "b": 8}, {"a": 16, "b": 16}])
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    with torch.no_grad():
        ref = m(x)
    w = m[0].weight.detach().clone()
    orders = sort_units(nest, method, example=x, data=[(x, y)])
    assert set(orders) == {"a@0", "b@2"} and not torch.equal(m[0].weight, w)  # units moved
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(sn.SortedNetError, match="restricted"):  # the list still holds (use takes the full
        nest.use("a=16,b=8").__enter__()  # model, what runs outside use, listed or not)
    with pytest.raises(sn.SortedNetError, match="restricted"):
        nest.export("a=32,b=32")


def test_copies_made_before_sorting_are_permuted_with_the_model(monkeypatch):
    """An EMA / teacher deep copy made before sort_units follows the nest's sub-models: left in the old unit order
    it ran other units than the nest (and an EMA average mixed unrelated units), silently. Copies are permuted
    with the model (weights and .grad), also an AveragedModel and a copy of a copy, so every sub-model of a copy
    equals the model's and averaging stays aligned; a copy whose modules were changed (it cannot follow) is
    refused at its forward; a sort that moves nothing changes nothing; the nest's own views (profile, check,
    cost) follow the sort; once the nest is unwrapped the refused copy runs its (full) model again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    nest = sn.wrap(model, sn.Width("h", [4, 16], out="0", inp="2"))
    x = torch.randn(3, 4)
    old, ema = copy.deepcopy(model), torch.optim.swa_utils.AveragedModel(model)
    older = copy.deepcopy(old)
    tied = copy.deepcopy(model)
    tied[2].weight = model[2].weight  # (a copy sharing one tensor with the model: permuted once, not twice)
    ema.update_parameters(model)
    model(x).sum().backward()
    old(x).sum().backward()
    with torch.no_grad():
        full = model(x)
    sort_units(nest, "l1", example=x)
    ema.update_parameters(model)  # an average of two copies in the same order
    for sub in ("h=4", "h=16"):
        with torch.no_grad(), nest.use(sub):
            want = model(x)
            for c in (old, ema, older, tied):
                assert torch.allclose(c(x), want, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(model(x), full, atol=1e-6)  # the model's own weights were permuted once
    torch.testing.assert_close(old[0].weight.grad, model[0].weight.grad)
    assert all(torch.equal(o, torch.arange(16)) for o in sort_units(nest, "l1", example=x).values())
    with nest.use("h=4"):  # a sort that moved nothing leaves every copy as it was
        torch.testing.assert_close(old(x), model(x))
    nest.check(x)
    nest.profile(x, repeat=1, progress=False)

    def cannot(moves, *args):  # a copy that cannot follow (its modules changed): refused at its forward
        def follow(root):
            raise sn.SortedNetError("the copy's 0.weight does not match the model's")
        return follow

    monkeypatch.setattr(importance, "follow_moves", cannot)
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(0.5, 2.0, 16)[:, None])  # (the l1 order now reverses)
    sort_units(nest, "l1", example=x)
    with pytest.raises(sn.SortedNetError, match="made before the nest's units were re-ordered"):
        old(x)
    nest.unwrap()
    old(x)  # (the nest gone, copies run their full model)


def test_the_optimizer_of_a_copy_is_named_or_follows_the_sort_with_it():
    """A teacher / EMA deep copy follows a sort (its weights are permuted), but its own optimizer's moments were
    left where the units were, with no warning, and passing that optimizer as optimizer= changed nothing. Now
    an optimizer holding state for a copy's permuted parameters is named in an OptimizerStateWarning, and once
    passed its state moves with the copy's units (each moment the same permutation as its weight)."""
    from sortednet.importance import OptimizerStateWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    nest = sn.wrap(model, sn.Width("h", [4, 16], out="0", inp="2"), sn.Width("g", [8, 16], out="2", inp="4"))
    teacher = copy.deepcopy(model)
    opt = torch.optim.Adam(teacher.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    for _ in range(2):
        teacher(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(2.0, 0.5, 16)[:, None])  # (an order the sort must change)
        teacher[0].weight.mul_(torch.linspace(2.0, 0.5, 16)[:, None])
    with torch.no_grad():
        taught = teacher(x)
    with warnings.catch_warnings():  # (warnings as errors: raised once the sort, copies included, is done)
        warnings.simplefilter("error", OptimizerStateWarning)
        with pytest.raises(OptimizerStateWarning, match=r"Adam \(state for \d+ of them\)"):
            sort_units(nest, "l1", example=x)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), taught)  # (the copy followed the sort: it runs, as before)
        model[0].weight.mul_(torch.linspace(0.25, 4.0, 16)[:, None])  # (and back: another order)
        teacher[0].weight.mul_(torch.linspace(0.25, 4.0, 16)[:, None])
    before = {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
              for n, p in teacher.named_parameters()}
    with torch.no_grad():
        full = teacher(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizerStateWarning)
        orders = sort_units(nest, "l1", example=x, optimizer=opt)
    h, g = orders["h@0"], orders["g@2"]
    assert not torch.equal(h, torch.arange(16))
    moved = {"0.weight": ((0, h),), "0.bias": ((0, h),), "2.weight": ((0, g), (1, h)), "2.bias": ((0, g),),
             "4.weight": ((1, g),), "4.bias": ()}  # (axis, unit order) of each tensor
    for name, p in teacher.named_parameters():
        w0, st0 = before[name]
        for t, want in ((p.detach(), w0), *((opt.state[p][k], v) for k, v in st0.items() if v.dim())):
            for ax, order in moved[name]:
                want = want.index_select(ax, order)
            assert torch.equal(t, want), name
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), full)  # (the copy's own function kept)
    # a copy whose parameter is its own Parameter on the model's memory: the memory is permuted once (with the
    # model), the copy's own pending .grad and optimizer state still follow (a rule skipping everything that
    # follows a shared memory left them in the old order)
    shares = copy.deepcopy(model)
    shares[2].weight = nn.Parameter(model[2].weight.data)
    own_opt = torch.optim.SGD(shares.parameters(), lr=0.1, momentum=0.9)
    shares(x).square().mean().backward()
    own_opt.step()
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(0.1, 10.0, 16)[:, None])  # (another order again)
        shares[0].weight.mul_(torch.linspace(0.1, 10.0, 16)[:, None])
    shares(x).square().mean().backward()
    momentum = own_opt.state[shares[2].weight]["momentum_buffer"].clone()
    grad = shares[2].weight.grad.clone()
    orders = sort_units(nest, "l1", example=x, optimizer=[opt, own_opt])
    h, g = orders["h@0"], orders["g@2"]
    assert not torch.equal(h, torch.arange(16))
    torch.testing.assert_close(shares[2].weight.grad, grad.index_select(0, g).index_select(1, h), rtol=0, atol=0)
    torch.testing.assert_close(own_opt.state[shares[2].weight]["momentum_buffer"],
                               momentum.index_select(0, g).index_select(1, h), rtol=0, atol=0)


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(10, 16), nn.Linear(16, 16), nn.Linear(16, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


def test_copies_follow_a_sort_whatever_memory_they_share():
    """Copies are permuted tensor by tensor: one untied after copying (its head its own) gets both tensors
    permuted; two copies whose weights are views of one flat buffer each get theirs (memory is told apart by
    address, shape and strides, not by the buffer); a copy sharing every parameter but owning its buffers is
    permuted there. Each then equals the model under every sub-model."""
    torch.manual_seed(0)
    model = _TiedLM()
    nest = sn.wrap(model, sn.Width("d", [4, 8, 16], out=["emb", "fc"], inp=["fc", "head"]))
    ids = torch.randint(0, 10, (2, 5))
    untied = copy.deepcopy(model)
    untied.head.weight = nn.Parameter(untied.emb.weight.detach().clone())
    flat = torch.zeros(2 * 16 * 16)
    pair = [copy.deepcopy(model) for _ in range(2)]
    for i, c in enumerate(pair):  # (each copy's fc weight a view of its own part of one buffer)
        view = flat[i * 256:(i + 1) * 256].view(16, 16)
        view.copy_(c.fc.weight.detach())
        c.fc.weight = nn.Parameter(view)
    bn_model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    bn_nest = sn.wrap(bn_model, sn.Width("h", [2, 8], out="0", inp="3", norm="1"))
    bn_model.train()(torch.randn(16, 4))
    bn_model.eval()
    own_buffers = copy.deepcopy(bn_model, {id(p): p for p in bn_model.parameters()})
    sort_units(nest, "l1", example=ids)
    sort_units(bn_nest, "l1", example=torch.randn(3, 4))
    with torch.no_grad():
        for sub in nest.submodels:
            with nest.use(sub):
                for c in (untied, *pair):
                    torch.testing.assert_close(c(ids), model(ids))
        x = torch.randn(5, 4)
        for sub in bn_nest.submodels:
            with bn_nest.use(sub):
                torch.testing.assert_close(own_buffers(x), bn_model(x))


@pytest.mark.parametrize("only", ["__set__", "copy_"])
def test_an_interrupted_taylor_sort_is_all_or_nothing(only):
    """A Ctrl-C anywhere in sort_units(method='taylor') while it puts state back or commits: the weights,
    BatchNorm statistics, pending gradients and momentum are all as before, or all as a never-interrupted
    sort left them; never some gradients put back and others holding the scoring pass's."""
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).train()
        nest = sn.wrap(m, sn.Width("a", [2, 4, 8], out="0", norm="1", inp="3"),
                       sn.Width("b", [4, 8], out="3", norm="4", inp="8"))
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()  # momentum buffers
        for p in m.parameters():
            p.grad = torch.randn_like(p)  # and a pending gradient
        return m, nest, opt

    def state(m, opt):
        return ({k: v.clone() for k, v in m.state_dict().items()},
                [p.grad.clone() for p in m.parameters()],
                [opt.state[p]["momentum_buffer"].clone() for p in m.parameters()])

    def same(a, b):
        return all(torch.equal(u, v) for x, y in zip(a, b) for u, v in
                   zip(x.values() if isinstance(x, dict) else x, y.values() if isinstance(y, dict) else y))

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g))]
    m, nest, opt = build()
    with InterruptAt(10**9, only) as count:
        sort_units(nest, "taylor", data=batches, optimizer=opt)
    sorted_ = state(m, opt)
    hit = 0
    for n in range(1, count.calls + 1):
        m, nest, opt = build()
        before = state(m, opt)
        if not interrupted(n, lambda: sort_units(nest, "taylor", data=batches, optimizer=opt), only):  # noqa: B023
            continue
        hit += 1
        now = state(m, opt)
        assert same(now, before) or same(now, sorted_), f"a mix after an interrupt at {only} call {n}"
    assert hit == count.calls and not same(before, sorted_)


class _InterleavedAttention(nn.Module):
    """A fused projection laid out per key/value head as [q x group, k, v] (Falcon's new decoder layout)."""

    def __init__(self, width=12, heads=4, kv_heads=2, head=4):
        super().__init__()
        self.num_heads, self.head_dim, self.num_key_value_heads = heads, head, kv_heads
        self.query_key_value = nn.Linear(width, (heads + 2 * kv_heads) * head)
        self.dense = nn.Linear(heads * head, width)

    def forward(self, x):
        b, t, _ = x.shape
        d, g = self.head_dim, self.num_heads // self.num_key_value_heads
        h = self.query_key_value(x).view(b, t, -1, (g + 2) * d)
        q, k, v = h.split([g * d, d, d], -1)
        q = q.reshape(b, t, -1, d).transpose(1, 2)  # query head i reads key/value head i // g
        k, v = k.transpose(1, 2).repeat_interleave(g, 1), v.transpose(1, 2).repeat_interleave(g, 1)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.dense(y.transpose(1, 2).reshape(b, t, -1))


class _InterleavedNet(nn.Module):
    def __init__(self, kv_heads):
        super().__init__()
        self.inp, self.attn, self.head = nn.Linear(6, 12), _InterleavedAttention(kv_heads=kv_heads), nn.Linear(12, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.attn(h))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_an_interleaved_fused_projection_sorts_its_query_heads_within_their_groups(kv_heads):
    """Falcon-style [q x group, k, v] blocks: the blocks moved whole while the output projection's columns
    followed the query heads' own order, so the full output changed (0.055) and the sort was refused as an
    undeclared coupling, which nest.check could not find."""
    torch.manual_seed(0)
    model = _InterleavedNet(kv_heads).double()
    with torch.no_grad():  # the last query head scores highest, the one before it next
        model.attn.dense.weight[:, 12:16] *= 5
        model.attn.dense.weight[:, 8:12] *= 3
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    before = run(model, x)
    sizes = [4] if kv_heads == 1 else [4 // kv_heads, 4]
    nest = sn.wrap(model, sn.Heads("heads", sizes, attn="attn", layout="interleaved"), example=x)
    order = sort_units(nest, "l1", example=x)["heads@attn"]
    torch.testing.assert_close(run(model, x), before, atol=1e-12, rtol=0)
    assert order[:2].tolist() == [3, 2], order  # (heads 2 and 3 share a key/value head when there are 2 or 1)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            live = model(x)
        torch.testing.assert_close(nest.export(sub)(x), live, atol=1e-12, rtol=0)


# -- what the verification can see: outputs, examples and randomness it could not compare before -------------
class _Scores(nn.Module):
    """An MLP whose width-16 hidden layer also feeds an output-gate (``gate``) that a Width may leave out
    (an undeclared reader: any permutation changes the output). ``out``: what the forward returns."""

    def __init__(self, out="logits", bias=True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16, bias=bias), nn.Linear(16, 5, bias=bias)
        self.gate = nn.Parameter(torch.rand(16) + 0.5)
        self.out = out

    def forward(self, x):
        logits = self.fc2(torch.relu(self.fc1(x)) * self.gate)
        if self.out == "argmax":
            return logits.argmax(-1)
        if self.out == "topk":
            return logits.topk(2, -1).indices
        if self.out == "mask":
            return logits > 0
        if self.out == "masked_logits":  # a correct sort leaves the -inf where they were
            return logits.masked_fill(torch.arange(5) >= 3, float("-inf"))
        return logits


@pytest.mark.parametrize("out", ["argmax", "topk", "mask"])
def test_an_output_without_floats_cannot_verify_a_sort_and_is_refused(out):
    """Only floating outputs were compared: a model returning argmax / top-k indices / a bool mask was sorted
    with an undeclared per-unit gate in the way (the logits changed by 0.85, 98% of the argmax changed)."""
    torch.manual_seed(0)
    m, x = _Scores(out), torch.randn(8, 6)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp="fc2"))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="holds no floating-point tensor.*Nothing was changed"):
        sort_units(nest, "l1", example=x)
    assert_unchanged(m, before)


def test_masked_logits_at_minus_inf_sort_and_a_wrong_permutation_there_is_still_refused():
    """-inf in the output made the measured change nan, so every sort was refused (a correct one too)."""
    torch.manual_seed(0)
    m, x = _Scores("masked_logits"), torch.randn(8, 6)
    m.gate.data.fill_(1.0)  # (a per-unit gate of one value everywhere commutes with any permutation)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp="fc2"))
    want = m(x)
    sort_units(nest, "l1", example=x)
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    nest.unwrap()
    torch.manual_seed(1)
    m = _Scores("masked_logits")
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp="fc2"))
    with pytest.raises(sn.SortedNetError, match=r"changes the full model's output \(by [0-9.e-]+,"):
        sort_units(nest, "l1", example=x)


def test_an_all_zero_output_on_the_example_cannot_verify_a_sort():
    """A model without biases given torch.zeros: the reference is all zeros, so any permutation "kept" it (the
    model then changed by 0.90 on random inputs)."""
    torch.manual_seed(0)
    m = _Scores(bias=False)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp="fc2"))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="all zeros.*real inputs"):
        sort_units(nest, "l1", example=torch.zeros(8, 6))
    assert_unchanged(m, before)


class _OnePositionAttention(nn.Module):
    def __init__(self, E=16, H=4):
        super().__init__()
        self.num_heads, self.head_dim = H, E // H
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        # per-head, not declared: heads cannot be reordered (1-D and as long as the head size: wrap leaves it to
        # the measurements, as it does rotary inv_freq)
        self.bias = nn.Parameter(torch.randn(H))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        ramp = self.bias[:self.num_heads, None, None] * torch.arange(T).float()
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5 + ramp
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))


def test_an_example_of_one_position_cannot_verify_a_heads_sort():
    """Attention over one key position returns its values whatever the heads' order: a sort that reorders
    heads with a per-head bias left behind passed on a (2, 1) example and changed longer inputs."""
    torch.manual_seed(0)
    m = _OnePositionAttention()
    nest = sn.wrap(m, sn.Heads("h", [2, 4], attn=""))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="Heads 'h' at '<root>'.*two or more positions"):
        sort_units(nest, "l1", example=torch.randn(2, 1, 16))
    assert_unchanged(m, before)
    with pytest.raises(sn.SortedNetError, match="changes the full model's output"):
        sort_units(nest, "l1", example=torch.randn(2, 6, 16))
    assert_unchanged(m, before)


class _DropPath(nn.Module):
    """Stochastic depth per sample, under a name train_view does not know (``rate``)."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or not self.rate:
            return x
        keep = (torch.rand(x.shape[0], 1) >= self.rate).to(x)
        return x * keep / (1 - self.rate)


class _AuxNet(nn.Module):
    def __init__(self, rate, declared):
        super().__init__()
        self.fc1, self.fc2, self.aux = nn.Linear(6, 16), nn.Linear(16, 3), nn.Linear(16, 2)
        self.gate = nn.Parameter(torch.rand(16) + 0.5)
        self.drop, self.declared = _DropPath(rate), declared

    def forward(self, x):
        h = self.drop(torch.relu(self.fc1(x)))
        out = self.fc2(h)
        if self.training:  # an auxiliary head only training runs
            return out, self.aux(h if self.declared else h * self.gate)
        return out


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_training_mode_randomness_beyond_dropout_is_compared_under_one_seed(rate):
    """With stochastic depth (random per sample) the training-mode check was skipped, silently: an auxiliary head
    reading the units through an undeclared gate was sorted (its output changed by 1.7). The run is compared
    before and after under one seed; a correct sort passes."""
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    m = _AuxNet(rate, declared=False)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp=["fc2", "aux"]))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="in training mode" + (".*random beyond dropout" if rate else "")):
        sort_units(nest, "l1", example=x)
    assert_unchanged(m, before)
    nest.unwrap()
    m = _AuxNet(rate, declared=True)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp=["fc2", "aux"]))
    torch.manual_seed(1)
    want = [t.detach() for t in m.train()(x)]
    sort_units(nest, "l1", example=x)
    torch.manual_seed(1)
    for a, b in zip(m(x), want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _KronSGD(torch.optim.Optimizer):
    """A Shampoo-like optimizer (not torch's): a left preconditioner ``L`` (out x out) per matrix."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if p.dim() == 2:
                    st["L"] = st.get("L", torch.zeros(p.shape[0], p.shape[0])) + p.grad @ p.grad.T
                    p -= g["lr"] * (st["L"] + torch.eye(p.shape[0])).inverse() @ p.grad
                else:
                    p -= g["lr"] * p.grad


def test_a_square_matrix_state_of_an_optimizer_not_of_torch_is_refused():
    """A Shampoo-style (out x out) preconditioner of a square weight has the weight's shape: it was taken for
    per-element state and permuted along one axis (the sorted model drifted 16% from its unsorted twin)."""
    torch.manual_seed(0)
    m, x = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(8, 6)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="2", inp="4"))
    opt = _KronSGD(m[2].parameters())  # (its square weight only: a non-square one is refused by shape)
    m(x).square().mean().backward()
    opt.step()
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="state 'L' of _KronSGD for a \\(16, 16\\) parameter.*Shampoo"):
        sort_units(nest, "l1", example=x, optimizer=opt)
    assert_unchanged(m, before)


class _FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.p = nn.Linear(6, 16), nn.Linear(16, 3), 0.3

    def forward(self, x):  # (a dropout probability under a name of its own)
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), self.p, self.training))


def test_a_dropout_function_in_the_forward_does_not_refuse_a_correct_sort():
    """F.dropout(h, self.p, self.training) draws a mask per unit, which moves with a permutation: the
    training-mode comparison under one seed refused a correct sort (by 0.2). Dropout functions are off there."""
    torch.manual_seed(0)
    m, x = _FunctionalDropout().train(), torch.randn(8, 6)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp="fc2"))
    want = m.eval()(x)
    sort_units(nest, "l1", example=x)
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


class _SharedMemoryAE(nn.Module):
    """An autoencoder whose decoder weight is a Parameter over the encoder's memory (``shared="transposed"``), or
    whose two weights are disjoint views of one flat buffer (``shared="disjoint"``, as flat-parameter tools lay
    them out)."""

    def __init__(self, shared):
        super().__init__()
        self.enc, self.dec = nn.Linear(10, 16), nn.Linear(16, 10)
        if shared == "transposed":
            self.dec.weight = nn.Parameter(self.enc.weight.detach().t())
        else:
            flat = torch.cat([self.enc.weight.detach().reshape(-1), self.dec.weight.detach().reshape(-1)])
            self.enc.weight = nn.Parameter(flat[:160].view(16, 10))
            self.dec.weight = nn.Parameter(flat[160:].view(10, 16))

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


@pytest.mark.parametrize("shared", ["transposed", "disjoint"])
def test_parameters_over_one_memory_are_refused_by_name_and_disjoint_views_sort(shared):
    """Two Parameters over the same memory were each permuted: the output check refused the result, blaming an
    undeclared coupled module or ordered reads. Refused now naming both, before anything moves; parameters that
    are disjoint views of one buffer sort as any others."""
    torch.manual_seed(0)
    m, x = _SharedMemoryAE(shared), torch.randn(8, 10)
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="enc", inp="dec"))
    before, out = snapshot(m), run(m, x)
    if shared == "transposed":
        with pytest.raises(sn.SortedNetError, match=r"'dec.weight' and 'enc.weight' are two tensors over the same "
                                                    r"memory"):
            sort_units(nest, "l1", example=x)
        assert_unchanged(m, before)
    else:
        sort_units(nest, "l1", example=x)
        torch.testing.assert_close(run(m, x), out, rtol=1e-5, atol=1e-6)
        old = before["state"]["enc.weight"]  # (its rows, permuted: each exactly once)
        assert sorted(map(tuple, m.enc.weight.detach().tolist())) == sorted(map(tuple, old.tolist()))


def test_taylor_scores_a_frozen_layer_as_it_scores_a_trainable_one():
    """A frozen layer reading the sorted units (requires_grad=False) got no gradient: every taylor score was 0
    and the order left unchanged, in silence. Its tensors require grad during scoring only: the order is the
    one of the same model trainable, and flags and .grad are as they were."""
    orders = []
    for freeze in (False, True):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        if freeze:
            m[2].requires_grad_(False)
        nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
        x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
        orders.append({k: [int(i) for i in v] for k, v in sort_units(nest, "taylor", example=x, data=[(x, y)]).items()})
        assert [p.requires_grad for p in m[2].parameters()] == [not freeze] * 2
        assert all(p.grad is None for p in m.parameters())
    assert orders[0] == orders[1]
    assert list(orders[0].values())[0] != list(range(16))


@pytest.mark.parametrize("norm", [lambda: nn.BatchNorm1d(16, affine=False),
                                  lambda: nn.InstanceNorm1d(16, track_running_stats=True)],
                         ids=["bn_no_affine", "instancenorm_running_stats"])
def test_taylor_sorts_a_model_whose_norm_has_running_statistics_and_no_weight(norm):
    """A norm with running statistics and no affine weight: its running mean (a buffer, the first tensor of its
    binding) was made to require grad like a frozen weight, and the norm refused it: every taylor sort of the
    model failed, blamed on the user's loss. Only frozen parameters are scored; the order is the one of the
    same model without that norm's buffers counted, the buffers untouched."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(8, 16, 1), norm(), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                      nn.Linear(16, 4)).eval()
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", norm="1", inp="5"))
    x = torch.randn(32, 8, 5)
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 1.5)
    y = torch.randint(0, 4, (32,))
    out, stats = run(m, x), [m[1].running_mean.clone(), m[1].running_var.clone()]
    order = list(sort_units(nest, "taylor", example=x, data=[(x, y)]).values())[0]
    assert sorted(order.tolist()) == list(range(16)) and order.tolist() != list(range(16))
    torch.testing.assert_close(run(m, x), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m[1].running_mean, stats[0][order])
    torch.testing.assert_close(m[1].running_var, stats[1][order])
    assert not m[1].running_mean.requires_grad and not m[1].running_var.requires_grad


def test_a_refused_sort_of_a_batchnorm_model_keeps_the_profiles_scores_current(monkeypatch):
    """The dry-run check forwards in training mode write BatchNorm running statistics and put them back, which
    moves their version counters: a refused or interrupted sort then left the scores judged stale (pick warned
    "measured on other weights" about unchanged weights). Freshness is judged when the sort begins."""
    import sortednet.importance as imp
    from sortednet.nest import StaleScoresWarning

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    nest = sn.wrap(m, sn.Width("h", [4, 8, 16], out="0", norm="1", inp="3"))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def score(sub):
        with nest.use(sub), torch.no_grad():
            return -F.cross_entropy(m(x), y).item()

    nest.profile(x, score=score, progress=False, repeat=1, warmup=0)
    before = snapshot(m)
    with monkeypatch.context() as mp:
        mp.setattr(imp, "rel_err", lambda *a, **k: 1.0)  # (every permutation judged to change the output)
        with pytest.raises(sn.SortedNetError, match="changes the full model's output"):
            sort_units(nest, "l1", example=x)
    assert_unchanged(m, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleScoresWarning)
        nest.pick(params=1e9)


class _Scale(nn.Module):
    """A per-feature scale of the user's (CaiT's layer scale), its slicer a view of ``gamma`` or a computed value."""

    def __init__(self, n):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * self.gamma


class _ComputedScale(_Scale):
    pass


@sn.slicer(_Scale)
class _ScaleViews(sn.Slicer):
    roles, attrs = ("norm",), ("gamma",)
    views = {"gamma": ((0, "norm"),)}

    def full(self, m, role):
        return m._parameters["gamma"].shape[0]


@sn.slicer(_ComputedScale)
class _ScaleComputed(sn.Slicer):
    roles, attrs = ("norm",), ("gamma",)

    def full(self, m, role):
        return m._parameters["gamma"].shape[0]

    def value(self, m, name):
        return self.take(m, "gamma", [(0, "norm")]) * 1.0


@pytest.mark.parametrize("method", ["l1", "l2"])
def test_slicers_of_the_users_made_of_views_are_permuted_with_their_units(method):
    """A slicer of the user's whose attributes are all views (``views``) was refused by every sort ('whose layout
    importance sorting does not know'): its tensors are now permuted along the axes its views cut, and the full
    model's output is kept; one that computes an attribute in value() is still refused, unchanged."""
    torch.manual_seed(0)
    for kind in (_Scale, _ComputedScale):
        model = nn.Sequential(nn.Linear(6, 8), kind(8), nn.ReLU(), nn.Linear(8, 3))
        x = torch.randn(5, 6)
        ref, before = model(x), snapshot(model)
        g = model[1].gamma.detach().clone()
        nest = sn.wrap(model, sn.Width("h", [2, 4, 8], out="0", norm="1", inp="3"))
        if kind is _ComputedScale:
            with pytest.raises(sn.SortedNetError, match=r"'1' \(_ComputedScale\) is sliced by _ScaleComputed.*"
                                                        r"computes attributes in value\(\)"):
                sort_units(nest, method, example=x)
            nest.unwrap()
            assert_unchanged(model, before)
            continue
        order = sort_units(nest, method, example=x)["h@0"]
        assert sorted(order.tolist()) == list(range(8)) and order.tolist() != list(range(8))
        torch.testing.assert_close(model[1].gamma.detach(), g[order])
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
        nest.unwrap()


def test_a_per_head_child_table_is_permuted_with_its_heads():
    """per_head= bindings sort with the heads: the table's columns follow the query rows."""
    from test_refusals import _BiasAttn

    torch.manual_seed(0)
    m = _BiasAttn(4).eval()
    x = torch.randn(2, 5, 24)
    ref, table, q = m(x), m.rel.table.detach().clone(), m.q.weight.detach().clone()
    nest = sn.wrap(m, sn.Heads("h", [1, 2, 4], attn="", per_head="rel"))
    order = sort_units(nest, "l1", example=x)["h@"]
    assert order.tolist() != [0, 1, 2, 3]
    torch.testing.assert_close(m.rel.table.detach(), table[:, order])
    torch.testing.assert_close(m.q.weight.detach(), q.view(4, 6, 24)[order].reshape(24, 24))
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6)


def test_taylor_scores_of_a_float16_model_are_taken_in_float32():
    """A float16 weight (~0.005) times its gradient (~1e-7) underflowed to 0 in float16: every score 0, and the
    sort refused as if the loss ignored the weights (before that refusal, an identity sort in silence)."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 16, generator=g).half(), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    for lin in (m[0], m[2]):
        nn.init.normal_(lin.weight, std=0.005)
    m = m.half()
    nest = sn.wrap(m, sn.Width("h", [16, 64], out="0", inp="2"))

    def loss_fn(mod, b):
        return F.cross_entropy(mod(b[0]).float(), b[1]) * 3e-5

    loss_fn(m, data[0]).backward()
    w, gr = m[2].weight.detach(), m[2].weight.grad
    assert bool((gr != 0).any()) and not bool((w * gr != 0).any())  # (the float16 product underflows)
    m.zero_grad(set_to_none=True)
    orders = sort_units(nest, "taylor", data=data, loss_fn=loss_fn)
    assert any(not torch.equal(o, torch.arange(len(o))) for o in orders.values())


def test_taylor_scores_a_model_of_two_inputs_from_input_label_batches():
    """Batches of ((a, b), labels) for ``forward(a, b)``: the default loss called ``model((a, b))`` while the
    example taken from the same batch was called ``model(a, b)``: one of the two always failed. Both call the
    model as every other entry point does (a tuple is its positional inputs)."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 3)

        def forward(self, x, y):
            return self.b(torch.relu(self.a(x + y)))

    model = Two()
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="a", inp="b"))
    batches = [((torch.randn(6, 4), torch.randn(6, 4)), torch.randint(0, 3, (6,))) for _ in range(2)]
    x = batches[0][0]
    with torch.no_grad():
        want = model(*x)
    orders = sort_units(nest, "taylor", data=batches)
    with torch.no_grad():
        torch.testing.assert_close(model(*x), want, rtol=1e-5, atol=1e-6)
    assert sorted(orders["h@a"].tolist()) == list(range(16))


class _TrainingOnlyCoupling(nn.Module):
    """A training-only auxiliary head normalising over the batch, weighting the hidden units by a buffer no
    dimension declares: sorting the units changes the training-mode output only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.aux = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 1)
        self.register_buffer("w_aux", torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if self.training:
            return self.fc2(h), self.aux(F.batch_norm(h, None, None, training=True) * self.w_aux[: h.shape[-1]])
        return self.fc2(h)


def test_sorting_on_an_example_the_model_cannot_train_on_warns_that_training_mode_is_unverified():
    """sort_units checks the full model in eval and in training mode; on a batch of one, where the training
    forward fails (batch statistics of one sample), the training-mode check was skipped in silence and a sort
    that changes the training-mode output by 58% went through. It warns now (as check does); an example of two
    samples is refused, nothing changed."""
    m = _TrainingOnlyCoupling().eval()
    nest = sn.wrap(m, sn.Width("h", [4, 8, 16], out="fc1", inp=["fc2", "aux"]))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match="in training mode"):
        sn.sort_units(nest, "l1", example=torch.randn(2, 8))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    with pytest.warns(sn.check.UncheckedTrainingWarning, match=r"sort_units: the full model fails in training mode.*"
                                                               r"verified in eval mode only"):
        sn.sort_units(nest, "l1", example=torch.randn(1, 8))


class _FlattenCoupled(nn.Module):
    """Channels before a flatten and features after it: two Widths listed size for size (submodels=)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(2)
        self.fc1, self.fc2 = nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.pool(F.relu(self.conv(x))).flatten(1))))


def _flatten_coupled_nest(x):
    m = _FlattenCoupled()
    return m, sn.wrap(m, sn.Width("c", [4, 8], out="conv"), sn.Width("f", [16, 32], inp="fc1"),
                      sn.Width("h", [8, 16], out="fc1", inp="fc2"),
                      submodels=["c=4,f=16,h=8", "c=8,f=32,h=8", "c=4,f=16,h=16", "c=8,f=32,h=16"], example=x)


def test_a_nest_with_dimensions_coupled_by_its_list_sorts_the_others_with_dims():
    """Two Widths coupled by submodels= (one writes the channels, the other reads them after a flatten) cannot be
    ordered apart: the whole sort was refused, blaming an undeclared module (check passes), with no way to sort the
    third, independent Width. The refusal names the coupled halves and the dims= that sorts the rest."""
    x = torch.randn(4, 3, 8, 8)
    m, nest = _flatten_coupled_nest(x)
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"Width \['c', 'f'\] binds only inp= or only out=.*"
                                                r"sort the others alone with dims=\['h'\]"):
        sn.sort_units(nest, "l1", example=x)
    assert_unchanged(m, before)
    with torch.no_grad():
        ref = m(x)
    assert list(sn.sort_units(nest, "l1", example=x, dims=["h"])) == ["h@fc1"]
    norms = m.fc1.weight.abs().sum(1)
    assert bool((norms[:-1] >= norms[1:]).all())
    assert torch.equal(m.conv.weight, before["state"]["conv.weight"])  # (c and f left in their order)
    torch.testing.assert_close(m.fc1.weight.detach().abs().sum(0), before["state"]["fc1.weight"].abs().sum(0))
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6)
        for sub in nest.submodels:
            with nest.use(sub):
                torch.testing.assert_close(nest.export(sub)(x), m(x))
    for bad, why in (("h", "a list of dimension names"), (["x"], r"\['x'\] names no Width"), ([], "sorts nothing")):
        with pytest.raises(sn.SortedNetError, match=why):
            sn.sort_units(nest, "l1", example=x, dims=bad)


class _MaskedGate(nn.Module):
    """Logits with one action masked by a large finite value (as many RL / constrained-decoding heads do), and a
    per-unit gate the Width leaves out: permuting the units changes the live logits."""

    def __init__(self, fill, added=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 5)
        self.gate = nn.Parameter(torch.rand(16) * 2)
        self.register_buffer("mask", torch.tensor([False, False, False, False, True]))
        self.fill, self.added = fill, added

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        y = self.fc2(h * self.gate[: h.shape[-1]])
        return y + self.mask * self.fill if self.added else y.masked_fill(self.mask, self.fill)


@pytest.mark.parametrize("fill, added, dtype", [
    (float("-inf"), False, torch.float32), (-1e9, False, torch.float32), (torch.finfo(torch.float32).min, False,
                                                                            torch.float32),
    (1e12, False, torch.float32), (-1e9, True, torch.float32)])
def test_a_sort_that_changes_the_full_model_is_refused_beside_large_finite_fill_values(fill, added, dtype):
    """The change of an output was measured against its largest entry: one -1e9 mask entry set that scale, and a
    permutation changing the live logits by 0.49 (on a scale of 1.4) passed as rounding. Fill values (unchanged,
    1e3 or more, 1,000 times every entry that changed) are left out of the scale, as -inf ones are."""
    torch.manual_seed(0)
    m = _MaskedGate(fill, added).to(dtype).eval()
    x = torch.randn(64, 8, dtype=dtype)
    nest = sn.wrap(m, sn.Width("h", [4, 8, 16], out="fc1", inp="fc2"))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="permuting changes the full model's output"):
        sort_units(nest, "l1", example=x)
    assert_unchanged(m, before)


class _PriceNet(nn.Module):
    """[price in dollars, P(sale)]: a large real output beside a small one; ``price`` reads the hidden units."""

    def __init__(self, ramp=False):
        super().__init__()
        self.fc1, self.fc2, self.price = nn.Linear(4, 16), nn.Linear(16, 1), nn.Linear(16, 1)
        self.register_buffer("ramp", torch.linspace(0.5, 1.5, 16) if ramp else torch.ones(16))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return torch.cat([2e5 + self.price(h * self.ramp[: h.shape[-1]]), torch.sigmoid(self.fc2(h))], -1)


class _Forecaster(nn.Module):
    """The next levels (~2e5) and their change from the last one seen (a difference of two large numbers)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 64)

    def forward(self, hist):
        last = hist[:, -1:]
        level = last + 100 * torch.tanh(self.fc2(torch.relu(self.fc1(hist / last - 1))))
        return torch.cat([level, level - last], -1)


@pytest.mark.parametrize("ramp", [False, True])
def test_a_large_real_output_that_changed_is_measured(ramp):
    """Only unchanged entries can be fill values: a price (2e5) moved by $193 by a sort that left its head out of
    the Width (9.7e-4 relative, above atol) must be refused, as before fill values were left out."""
    torch.manual_seed(0)
    m = _PriceNet(ramp)
    with torch.no_grad():
        m.price.weight.mul_(700)
    x = torch.randn(8, 4)
    nest = sn.wrap(m, sn.Width("w", [8, 16], out="fc1", inp="fc2"))   # (price left out)
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="permuting changes the full model's output"):
        sort_units(nest, "l1", example=x, atol=1e-6 if ramp else None)
    assert_unchanged(m, before)


def test_levels_beside_their_differences_sort_within_rounding():
    """Levels of 2e5 change by one rounding step (1/64) when sorted; their differences from the last level are
    small numbers of the same rounding: measured on the output's scale, the sort passes."""
    torch.manual_seed(0)
    x = 2e5 + 100 * torch.randn(256, 8).cumsum(1)
    m = _Forecaster()
    nest = sn.wrap(m, sn.Width("w", [8, 16, 32], out="fc1", inp="fc2"))
    with torch.no_grad():
        ref = m(x)
    sort_units(nest, "l1", example=x)
    with torch.no_grad():
        assert (m(x) - ref).abs().max() <= 0.05


def test_large_real_outputs_beside_tiny_changed_ones_are_no_fill_values():
    """Outputs [-1e-8, 4.0] where the permutation rounds the tiny entry to 0: the 4.0 is no fill value (it is
    under 1e3), so the change is measured on the output's scale and the sort passes."""
    m = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.diag(torch.tensor([1., 2., 3., 4.])))
        m[2].weight.copy_(torch.tensor([[1., 1., -1., -1.], [2., 0., 2., 0.]]))
    x = torch.tensor([[1., 1e-8 / 2, 1. / 3, 1e-8 / 4]])
    nest = sn.wrap(m, sn.Width("h", [2, 4], out="0", inp="2"))
    assert torch.equal(sort_units(nest, "l1", example=x)["h@0"], torch.tensor([3, 2, 1, 0]))


def test_rounding_beside_a_large_fill_value_still_passes():
    """The other side: a model whose units are all declared sorts beside a -1e9 mask (only rounding changes)."""
    torch.manual_seed(0)
    m = _MaskedGate(-1e9).eval()
    m.gate.requires_grad_(False).fill_(1.0)  # (a gate of ones: reading it whole changes nothing)
    x = torch.randn(64, 8)
    with torch.no_grad():
        ref = m(x)
    nest = sn.wrap(m, sn.Width("h", [4, 8, 16], out="fc1", inp="fc2"))
    sort_units(nest, "l1", example=x)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref)


class _SharedKV(nn.Module):
    """Two causal attentions; the second reuses the first's key and value projections (cross-layer K/V sharing)."""

    class Attn(nn.Module):
        def __init__(self, d=32, h=8):
            super().__init__()
            self.num_heads, self.head_dim = h, d // h
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def __init__(self):
        super().__init__()
        self.emb, self.a0, self.a1, self.head = nn.Embedding(50, 32), self.Attn(), self.Attn(), nn.Linear(32, 50)
        self.a1.k_proj, self.a1.v_proj = self.a0.k_proj, self.a0.v_proj

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.a0(h)
        return self.head(h + self.a1(h))


@pytest.mark.parametrize("method", ["l1", "taylor"])
def test_attentions_sharing_projections_sort_their_heads_with_one_order(method):
    """Heads were ordered per attention module; a key/value projection shared by two is bound under one path, so
    one order permuted it and the other the second attention's queries: refused as "a module coupled to a
    dimension is not declared", though check passes. They are sorted together now, the function kept."""
    torch.manual_seed(0)
    m = _SharedKV().eval()
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        ref = m(ids)
    nest = sn.wrap(m, sn.Heads("h", [4, 8], attn=["a0", "a1"]), example=ids)
    data = [(ids, ids)] if method == "taylor" else None
    loss = (lambda model, b: F.cross_entropy(model(b[0]).flatten(0, 1), b[1].flatten())) if data else None
    orders = sort_units(nest, method, example=ids, data=data, loss_fn=loss)
    assert orders and not all(torch.equal(o, torch.arange(len(o))) for o in orders.values())
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref, atol=1e-5, rtol=1e-5)
        with nest.use("h=4"):
            m(ids)


def test_taylor_inside_inference_mode_and_an_all_nan_output_are_refused_by_name():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1])
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    before = snapshot(m)
    with torch.inference_mode(), pytest.raises(sn.SortedNetError, match=r"inside torch.inference_mode\(\)"):
        sort_units(nest, "taylor", data=[(x, y)])
    with pytest.raises(sn.SortedNetError, match="NaN throughout"):
        sort_units(nest, "l1", example=torch.full((5, 8), float("nan")))
    assert_unchanged(m, before)


class _CallsKept(list):
    """A taylor loss that keeps a record of its calls: an empty list is falsy."""

    def __call__(self, model, batch):
        self.append(1)
        return model(batch)[:, 0].sum()


def test_a_taylor_loss_that_is_falsy_is_the_loss_used():
    """``loss_fn or _loss`` took a loss object that tests false (a list subclass, empty at first) for none: the
    default loss scored the units in its place (here it refuses for a batch of no labels, raising on a batch
    the user's loss handles). The given loss is used, and scores the units: the first output's own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="2"))
    x = torch.randn(16, 4)
    calls = _CallsKept()
    sort_units(nest, "taylor", example=x, data=[x, x], loss_fn=calls)
    assert len(calls) == 2


@pytest.mark.parametrize("head", ["regression", "one_logit"])
def test_taylor_scoring_refuses_targets_its_default_loss_would_misread(head):
    """The default loss of taylor scoring is F.cross_entropy on class indices, as fit's: float targets (a
    regression) would be scored as class probabilities, one logit per example gives a loss of 0 whatever the
    weights; both refused naming loss_fn=, before anything changes."""
    torch.manual_seed(0)
    out = 3 if head == "regression" else 1
    m = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, out))
    nest = sn.wrap(m, sn.Width("h", [4, 8, 12], out="0", inp="2"))
    x = torch.randn(16, 6)
    y = torch.randn(16, out) * 5 if head == "regression" else torch.randint(0, 2, (16,))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="float32, shape \\(16, 3\\)" if head == "regression" else
                       "one logit per example"):
        sn.sort_units(nest, "taylor", data=[(x, y)])
    assert_unchanged(m, before)
    assert all(p.grad is None for p in m.parameters())
    loss = (lambda mm, b: F.mse_loss(mm(b[0]), b[1])) if head == "regression" else \
        (lambda mm, b: F.binary_cross_entropy_with_logits(mm(b[0]).squeeze(1), b[1].float()))
    with torch.no_grad():
        ref = m(x)
    sn.sort_units(nest, "taylor", data=[(x, y)], loss_fn=loss)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref)


class _MaskedScale(nn.Module):
    """A per-unit scale with a per-unit mask buffer its slicer leaves undeclared (the forward cuts it itself)."""

    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)
        self.register_buffer("mask", (torch.arange(d) % 3 != 0).float())

    def forward(self, x):
        return x * self.gamma * self.mask[: x.shape[-1]]


@sn.slicer(_MaskedScale)
class _GammaOnly(sn.Slicer):
    roles, attrs, views = ("norm",), ("gamma",), {"gamma": ((0, "norm"),)}

    def full(self, m, role):
        return m._parameters["gamma"].shape[0]


def test_a_sort_refused_for_an_undeclared_per_unit_tensor_names_the_slicer_of_ones_own():
    """A per-unit buffer a slicer of the user's leaves out of attrs stays in place while the declared tensors move:
    the refusal said "run nest.check to find it; if check passes, the units cannot be sorted" (check passes, and
    the units can be, once the buffer is declared). It names the module of the user's slicer as a cause now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), _MaskedScale(12), nn.ReLU(), nn.Linear(12, 2)).eval()
    x = torch.randn(6, 4)
    nest = sn.wrap(model, sn.Width("h", [6, 12], out="0", norm="1", inp="3"), example=x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"permuting changes the full model's output.*a module of a slicer of "
                                                r"yours \('1' \(_GammaOnly\)\) holds a per-unit tensor"):
        sn.sort_units(nest, "l1", example=x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _CachedAttention(nn.Module):
    """Hand-written attention with ``kv`` key / value heads (grouped when fewer than the 4 query heads) that
    returns its key / value cache as plain tensors ``(batch, kv heads, positions, head_dim)``."""

    def __init__(self, kv):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = 4, kv, 8
        self.q_proj, self.o_proj = nn.Linear(32, 32), nn.Linear(32, 32)
        self.k_proj, self.v_proj = nn.Linear(32, kv * 8), nn.Linear(32, kv * 8)

    def forward(self, x, past=None):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, 8).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        rep = q.shape[1] // k.shape[1]
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                           is_causal=past is None)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1)), (k, v)


class _CachedBlock(nn.Module):
    def __init__(self, kv):
        super().__init__()
        self.attn, self.fc1, self.fc2 = _CachedAttention(kv), nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x, past=None):
        a, cache = self.attn(x, past)
        x = x + a
        return x + self.fc2(F.gelu(self.fc1(x))), cache


@pytest.mark.parametrize("kv", [4, 2])
def test_a_model_returning_its_key_value_cache_is_checked_and_sorted(kv):
    """A hand-written attention returning its key / value cache as tensors: check refused grouped-query ones
    ('a dimension slices the network's output': the cache's 2 key / value heads became 1), and sort_units
    refused both (the cache's heads reordered, 'permuting changes the full model's output'). The sorted model
    still decodes with its own cache as it runs the whole sequence."""
    torch.manual_seed(0)
    model, x = _CachedBlock(kv), torch.randn(2, 6, 32)
    nest = sn.wrap(model, sn.Heads("heads", [2, 4], attn="attn"), sn.Width("ffn", [32, 64], out="fc1", inp="fc2"),
                   example=x)
    before = model(x)[0].detach()
    sort_units(nest, "l1", example=x)
    torch.testing.assert_close(model(x)[0], before, rtol=1e-5, atol=1e-5)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            whole, past, steps = model(x)[0], None, []
            for t in range(x.shape[1]):
                out, past = model(x[:, t:t + 1], past)
                steps.append(out)
            assert past[0].shape[1] == sub["heads"] * kv // 4
            torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-5, atol=1e-5)


def test_per_head_outputs_match_only_up_to_a_reorder_of_whole_heads():
    torch.manual_seed(0)
    ref = torch.randn(2, 4, 5, 8)
    assert torch.equal(importance._heads_matched([ref[:, [2, 0, 3, 1]]], [ref], {4})[0], ref)
    moved = ref[:, [2, 0, 3, 1]].clone()
    moved[0, 1, 0, 0] += 1.0  # (a value changed, not only the order)
    assert not torch.allclose(importance._heads_matched([moved], [ref], {4})[0], ref)
    assert torch.equal(importance._heads_matched([ref[:, [1, 0, 2, 3]]], [ref], {3})[0], ref[:, [1, 0, 2, 3]])


class _OwnMatmul(nn.Linear):
    """A Linear computing with its own matmul (as Falcon's FalconLinear): a trace cannot follow its features."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


sn.slicer(_OwnMatmul)(type("_OwnMatmulSlicer", (sn.slicers.linear.LinearSlicer,), {}))  # (its forward reads W)


class _FusedBlock(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.up = nn.Linear(8, 2 * 16) if fused else _OwnMatmul(8, 16)
        self.down = nn.Linear(16, 8) if fused else _OwnMatmul(16, 8)

    def forward(self, x):
        if self.fused:  # a fused gate_up projection chunked in two (as Phi-3's)
            gate, up = self.up(x).chunk(2, dim=-1)
            return x + self.down(F.silu(gate) * up)
        return x + self.down(F.gelu(self.up(x)))


@pytest.mark.parametrize("fused", [False, True])
def test_each_layer_gets_its_own_order_where_the_trace_cannot_pair_its_writers_and_readers(fused):
    """Where the wiring trace could not pair a layer's FFN writer with its reader (a gate_up projection chunked in
    two, a Linear subclass computing with its own matmul: Phi-3, Falcon), sort_units fell back to ONE order for
    every layer, scored over all of them: a sub-model kept each layer's units by the sum over layers. Each layer
    (element of a module list) is now tried as its own group, verified like the trace's."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(_FusedBlock(fused) for _ in range(3))
    with torch.no_grad():
        for b in blocks:  # layers whose units rank differently
            b.up.weight.mul_(torch.rand(b.up.weight.shape[0], 1) * 4)
    model = _Stack(nn.Linear(4, 8), blocks)
    x = torch.randn(5, 4)
    want = model(x)
    chunks = {"blocks.*.up": 2} if fused else None
    nest = sn.wrap(model, sn.Width("ffn", [8, 16], out="blocks.*.up", inp="blocks.*.down", chunks=chunks))
    before = [b.up.weight.detach().clone() for b in blocks]
    orders = sort_units(nest, "l1", example=x)
    assert sorted(orders) == [f"ffn@blocks.{i}.up" for i in range(3)]
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    for i, b in enumerate(blocks):
        w = before[i].abs().sum(1)
        own = (w.reshape(2, 16).sum(0) if fused else w).argsort(descending=True, stable=True)
        assert orders[f"ffn@blocks.{i}.up"].tolist() == own.tolist()
        torch.testing.assert_close(b.up.weight, before[i].reshape(-1, 16, 8)[:, own].reshape(-1, 8) if fused
                                   else before[i][own])


class _Stack(nn.Module):
    def __init__(self, stem, blocks):
        super().__init__()
        self.stem, self.blocks = stem, blocks

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("share", ["module", "weight", "container"])
def test_a_layer_shared_with_a_model_outside_the_nest_refuses_the_sort(share):
    """A stem shared by two task models, one wrapped: the sort kept the wrapped model's output and changed the
    other's (1.61), in silence; so did a container of the model's (a stem Sequential) held by the other. Refused,
    naming the holder, nothing changed; a holder of the whole model (a list of the model and its EMA), garbage
    not collected yet and a dead weak proxy (torch.compile leaves them) are no such holders, and the walk warns
    nothing of its own (a deprecated torch object it passes)."""
    import gc
    import weakref

    torch.manual_seed(0)
    a = nn.Sequential(nn.Sequential(nn.Linear(8, 32)), nn.ReLU(), nn.Linear(32, 4))
    b = nn.Sequential(a[0] if share == "container" else a[0][0] if share == "module" else nn.Linear(8, 32),
                      nn.ReLU(), nn.Linear(32, 3))
    if share == "weight":
        b[0].weight = a[0][0].weight
    nest = sn.wrap(a, sn.Width("h", [8, 16, 32], out="0.0", inp="2"))
    x = torch.randn(5, 8)
    before, want = snapshot(a), b(x)
    with pytest.raises(sn.SortedNetError, match=r"a module outside the nest's model holds what the sort would "
                                                r"permute \(" + {"module": "Sequential.0 is the model's '0.0'",
                                                                 "container": "Sequential.0 is the model's '0'",
                                                                 "weight": "Linear.weight is the model's parameter "
                                                                           "'0.0.weight'"}[share]):
        sort_units(nest, "l1", example=x)
    assert_unchanged(a, before)
    torch.testing.assert_close(b(x), want, rtol=0, atol=0)
    del b
    holder = nn.ModuleList([a, copy.deepcopy(a)])
    gc.disable()
    try:
        cycle = nn.Sequential(a[0])  # (garbage in a cycle, not collected yet)
        cycle.me = [cycle]
        del cycle
        dead = [weakref.proxy(nn.Linear(2, 2))]  # (a proxy whose object is gone)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sort_units(nest, "l1", example=x)
    finally:
        gc.enable()
    assert holder[1] is not a and len(dead) == 1

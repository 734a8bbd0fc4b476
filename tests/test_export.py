"""Export: a plain, physically smaller model with no sortednet class left,
the sliced shapes, cost(sub, "params") parameters, and that survives
torch.save / torch.load and torch.export."""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import pickle
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sortednet as sn
from models import FAMILIES, assert_unchanged, case_params, run, snapshot
from sortednet.slicers.mha import PrunedMultiheadAttention

FAMS = sorted(FAMILIES)


def wrapped(family, kw=None):
    c = FAMILIES[family](**(kw or {}))
    return c, sn.wrap(c.model, *c.dims)


def needs_pruned_mha(live: nn.Module, path: str) -> bool:
    m = live.get_submodule(path)
    return m.num_heads * m.head_dim != m.embed_dim


def check_plain(small: nn.Module, live: nn.Module, nest: sn.Nest, sub: sn.SubModel) -> None:
    """No sortednet class, state or hook; shapes as the live sliced attributes."""
    with nest.use(sub):
        for name, m in small.named_modules():
            cls = type(m)
            assert "_sn" not in m.__dict__ and not hasattr(cls, "_sn_sliced"), name
            hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
            assert not any(h.__module__.startswith("sortednet") for h in hooks), name
            if cls is PrunedMultiheadAttention:              # the one documented exception
                assert needs_pruned_mha(live, name), name
            else:
                assert not cls.__module__.startswith("sortednet"), (name, cls)
                if isinstance(m, nn.MultiheadAttention):
                    assert not needs_pruned_mha(live, name), name
        live_ptrs = {p.untyped_storage().data_ptr() for p in live.parameters()}
        for name, p in [*small.named_parameters(), *small.named_buffers()]:
            path, _, attr = name.rpartition(".")
            want = getattr(live.get_submodule(path), attr)
            assert p.shape == want.shape and p.is_contiguous(), name
            assert torch.equal(p.detach(), want.detach()), name
            assert p.untyped_storage().data_ptr() not in live_ptrs, f"{name} shares memory with the nest"
        full = dict(live.named_parameters())
        for name, p in small.named_parameters():
            assert p.requires_grad == full[name].requires_grad, name
    assert sum(p.numel() for p in small.parameters()) == nest.cost(sub, "params")
    assert set(dict(small.named_parameters())) <= set(dict(live.named_parameters()))


@pytest.mark.parametrize("family", FAMS)
@given(data=st.data())
def test_export_is_plain_and_sliced(family, data):
    c, nest = wrapped(family, data.draw(case_params(family)))
    before = snapshot(c.model)
    picks = data.draw(st.lists(st.sampled_from(nest.submodels), min_size=1, max_size=4, unique=True))
    for sub in picks:
        small = nest.export(sub)
        check_plain(small, c.model, nest, sub)
        with nest.use(sub):
            torch.testing.assert_close(run(small, c.example), run(c.model, c.example), atol=1e-5, rtol=0)
    assert_unchanged(c.model, before)                         # export leaves the nest alone


def test_pruned_mha_appears_exactly_when_needed():
    c, nest = wrapped("torch_encoder")
    seen = set()
    for sub in nest.submodels:
        small = nest.export(sub)
        pruned = any(isinstance(m, PrunedMultiheadAttention) for m in small.modules())
        seen.add(pruned)
        assert pruned == (sub["heads"] * 4 != sub["hidden"]), sub   # head_dim 4
        check_plain(small, c.model, nest, sub)
    assert seen == {True, False}


@pytest.mark.parametrize("family", FAMS)
def test_exported_model_trains_on_its_own(family):
    c, nest = wrapped(family)
    small = nest.export(nest.smallest)
    before = snapshot(c.model)
    small(c.example).float().pow(2).mean().backward()
    torch.optim.SGD(small.parameters(), lr=0.1).step()
    assert all(p.grad is not None for p in small.parameters())
    assert_unchanged(c.model, before)


@pytest.mark.parametrize("family", FAMS)
def test_torch_save_load_round_trip(family):
    c, nest = wrapped(family)
    for sub in (nest.smallest, nest.submodels[len(nest.submodels) // 2]):
        small = nest.export(sub)
        buf = io.BytesIO()
        torch.save(small, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        assert [type(m) for m in back.modules()] == [type(m) for m in small.modules()]
        assert torch.equal(run(back, c.example), run(small, c.example))


@pytest.mark.parametrize("family", FAMS)
def test_torch_export(family):
    c, nest = wrapped(family)
    sub = nest.submodels[len(nest.submodels) // 3]
    small = nest.export(sub).eval()
    prog = torch.export.export(small, (c.example,))
    torch.testing.assert_close(prog.module()(c.example), run(small, c.example), atol=1e-5, rtol=0)


@given(layers=st.sampled_from([1, 2]), seed=st.integers(0, 99), causal=st.booleans())
def test_sliced_attention_with_masks_matches_export(layers, seed, causal):
    """Live sliced MultiheadAttention (sortednet's own attention) vs the exported
    stock / pruned module, with an attention mask and key padding."""
    c, nest = wrapped("torch_encoder", {"layers": layers, "seed": seed})
    dev = c.example.device  # (the CPU, or SORTEDNET_TEST_DEVICE)
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed)).to(dev)
    mask = torch.ones(5, 5, dtype=torch.bool, device=dev).triu(1)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]], device=dev)
    kw = {"is_causal": True} if causal else {"src_key_padding_mask": pad}
    for sub in nest.submodels:
        x = h[..., : sub["hidden"]]
        with nest.use(sub), torch.no_grad():
            live = c.model.enc(x, mask=mask, **kw)
        with torch.no_grad():
            got = nest.export(sub).enc(x, mask=mask, **kw)
        torch.testing.assert_close(got, live, atol=1e-5, rtol=0)


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre, self.mha = nn.Linear(16, 64), nn.MultiheadAttention(64, 8, batch_first=True, dropout=0.5)

    def forward(self, x, **kw):
        h = self.pre(x)
        return self.mha(h, h, h, **kw)


@pytest.mark.parametrize("average", [True, False])
def test_sliced_attention_returns_the_weights_it_applied(average):
    """Training with dropout and ``need_weights``: the live sub-model returns the attention weights after
    dropout, as stock ``nn.MultiheadAttention`` (the export) does; and ``is_causal`` without a mask is
    refused at every size, as stock does."""
    torch.manual_seed(0)
    m = _MHA()
    nest = sn.wrap(m, sn.Heads("h", [4, 8], attn="mha"),
                   sn.Width("e", [32, 64], inp="mha", out=["mha.out_proj", "pre"]))
    x = torch.randn(2, 5, 16)
    for sub in nest.submodels:
        small = nest.export(sub)
        torch.manual_seed(1)
        with nest.use(sub):
            live = m(x, average_attn_weights=average)
        torch.manual_seed(1)
        want = small(x, average_attn_weights=average)
        for got, ref in zip(live, want):
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
        m.eval()
        small.eval()
        with pytest.raises(RuntimeError, match="Need attn_mask"):
            small(x, is_causal=True)
        with nest.use(sub), pytest.raises(RuntimeError, match="Need attn_mask"):
            m(x, is_causal=True)
        if sub != nest.submodels[-1]:  # (a SortedNetError naming the fix, at every smaller size, grad or not)
            with nest.use(sub), torch.no_grad(), pytest.raises(sn.SortedNetError, match="generate_square_sub"):
                m(x, is_causal=True)
        m.train()


# -- invariant 10: shared tensors stay shared, the export never aliases the nest ---------------------
@pytest.mark.parametrize("family", FAMS)
def test_export_never_aliases_the_live_model(family):
    c, nest = wrapped(family)
    before = snapshot(c.model)
    for sub in (nest.smallest, nest.largest):
        small = nest.export(sub)
        with torch.no_grad():
            for t in [*small.parameters(), *small.buffers()]:
                t.fill_(7.0) if t.is_floating_point() else t.zero_()
    assert_unchanged(c.model, before)


@given(kw=case_params("tied_lm"))
def test_tied_embedding_stays_tied_and_counted_once(kw):
    c, nest = wrapped("tied_lm", kw)
    assert c.model.head._parameters["weight"] is c.model.emb._parameters["weight"]   # (attributes are views)
    for sub in nest.submodels:
        small = nest.export(sub)
        assert small.head.weight is small.emb.weight, sub
        assert small.emb.weight.shape == (kw["vocab"], sub["hidden"])
        assert sum(p.numel() for p in small.parameters()) == nest.cost(sub, "params"), sub
        check_plain(small, c.model, nest, sub)


@pytest.mark.parametrize("how", ["meta", "nan"])
def test_a_tied_weight_on_the_meta_device_or_holding_a_nan_exports_tied(how):
    """The tie check compared values with torch.equal: on the meta device it raised a raw NotImplementedError, and
    a NaN in the shared weight (a diverged run, memory not loaded yet) read as "different slices of one tensor"."""
    c = FAMILIES["tied_lm"](seed=0)
    model = c.model.to("meta") if how == "meta" else c.model
    model.head.weight = model.emb.weight  # (Module.to onto the meta device unties them: new Parameters)
    if how == "nan":
        with torch.no_grad():
            model.emb.weight[3, 2] = float("nan")
    nest = sn.wrap(model, *c.dims)
    for sub in (nest.smallest, nest.largest):
        small = nest.export(sub)
        assert small.head.weight is small.emb.weight, sub
        assert small.emb.weight.is_meta == (how == "meta")
        if how == "nan":
            assert small.emb.weight.isnan().sum() == 1


class SharedUnsliced(nn.Module):
    """``head`` (sliced by ``vocab``) shares its weight with ``emb``, which no dimension slices."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(20, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, i):
        return self.head(self.fc2(torch.relu(self.fc1(self.emb(i)))))


def test_unsliced_user_of_a_sliced_tensor_gets_a_copy_not_the_live_tensor():
    torch.manual_seed(0)
    m = SharedUnsliced()
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="fc1", inp="fc2"), sn.Width("vocab", [10, 20], out="head"))
    before = snapshot(m)
    x = torch.randint(0, 20, (2, 5))
    for sub in nest.submodels:
        if sub["vocab"] == 20:                           # both users see the whole tensor: one tied copy
            small = nest.export(sub)
            assert small.head.weight is small.emb.weight
            assert small.emb.weight is not m.emb.weight
            assert sum(p.numel() for p in small.parameters()) == nest.cost(sub)
            with nest.use(sub):
                torch.testing.assert_close(run(small, x), run(m, x), atol=1e-5, rtol=0)
            with torch.no_grad():
                small.emb.weight.zero_()
        else:                                            # (10, 16) for head, (20, 16) for emb: refused
            with pytest.raises(sn.SortedNetError, match=r"'head.weight'.*'emb.weight'|'emb.weight'.*'head.weight'"):
                nest.export(sub)
    assert_unchanged(m, before)


def test_gpt2_tied_lm_head_export():
    transformers = pytest.importorskip("transformers")
    import sortednet.integrations  # noqa: F401  (registers the GPT-2 Conv1D slicer)

    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                  tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    h = "transformer.h.*"
    nest = sn.wrap(model, sn.Width("hidden", [16, 32], out=["transformer.wte", "transformer.wpe", f"{h}.attn.c_proj",
                                                            f"{h}.mlp.c_proj"],
                                   inp=[f"{h}.attn.c_attn", f"{h}.mlp.c_fc", "lm_head"],
                                   norm=[f"{h}.ln_1", f"{h}.ln_2", "transformer.ln_f"]),
                   sn.Depth("depth", [1, 2], layers="transformer.h"))
    before = snapshot(model)
    x = torch.randint(0, 50, (2, 6))
    for sub in nest.submodels:
        small = nest.export(sub, plain=True)   # (a GPT2Config cannot state a sliced hidden width)
        assert small.lm_head.weight is small.transformer.wte.weight, sub
        assert sum(p.numel() for p in small.parameters()) == nest.cost(sub, "params"), sub
        with nest.use(sub), torch.no_grad():
            live = model(x).logits
        with torch.no_grad():
            torch.testing.assert_close(small(x).logits, live, atol=1e-5, rtol=0)
            for p in small.parameters():
                p.zero_()
    assert_unchanged(model, before)


class _MHANet(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.att = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.out = nn.Linear(16, 3)

    def forward(self, x, kpm=None, mask=None, need_weights=False):
        y, w = self.att(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=need_weights)
        return self.out(y), w


@given(batch_first=st.booleans(), batched=st.booleans(), kpm=st.booleans(), mask=st.booleans(),
       need_weights=st.booleans(), seed=st.integers(0, 2**16))
def test_sliced_mha_equals_stock_mha_in_every_call_form(batch_first, batched, kpm, mask, need_weights, seed):
    """Batched and unbatched inputs, batch_first or not, padding and attention masks, with or without
    weights: the live sub-model equals its export, a stock ``nn.MultiheadAttention`` (PyTorch's own
    forward), and an unbatched input equals the same sequence as a batch of one."""
    torch.manual_seed(seed)
    m = _MHANet(batch_first).eval()
    nest = sn.wrap(m, sn.Heads("h", [2, 4], attn="att"), sn.Width("d", [8, 16], inp=["att", "out"], out="att.out_proj"))
    sub = nest.resolve("h=2,d=8")
    L = 5
    x = torch.randn(L, 8) if not batched else torch.randn(*((2, L) if batch_first else (L, 2)), 8)
    b = 2 if batched else None
    pad = None
    if kpm:
        pad = torch.zeros(*((b, L) if batched else (L,)), dtype=torch.bool)
        pad[..., -1] = True
    am = torch.ones(L, L, dtype=torch.bool).triu(1) if mask else None
    small = nest.export(sub).eval()
    assert type(small.att) is nn.MultiheadAttention
    with torch.no_grad(), nest.use(sub):
        live, lw = m(x, pad, am, need_weights)
        want, ww = small(x, pad, am, need_weights)
        torch.testing.assert_close(live, want, atol=1e-5, rtol=0)
        assert (lw is None) == (ww is None)
        if lw is not None:
            torch.testing.assert_close(lw, ww, atol=1e-5, rtol=0)
        if not batched:
            one, _ = m(x.unsqueeze(0 if batch_first else 1), None if pad is None else pad[None], am, need_weights)
            torch.testing.assert_close(live, one.squeeze(0 if batch_first else 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32, torch.float64])
def test_sliced_mha_reads_masks_as_stock_mha_does(which, dtype):
    """Boolean masks and masks of the query's dtype only, as ``nn.MultiheadAttention``: an integer mask (a
    uint8 0/1 mask) was read as +1 added to the scores by every smaller sub-model and its export, where the
    full model refuses it; a float mask of the query's dtype is added, and equals its boolean form."""
    torch.manual_seed(0)
    m = _MHANet(True).eval()
    nest = sn.wrap(m, sn.Heads("h", [2, 4], attn="att"))
    x = torch.randn(2, 5, 16)
    block = torch.ones(5, 5, dtype=torch.bool).triu(1) if which == "attn_mask" else \
        torch.tensor([[False] * 4 + [True], [False] * 3 + [True] * 2])
    kw = {"mask" if which == "attn_mask" else "kpm": block.to(dtype) if not dtype.is_floating_point
          else torch.zeros(block.shape, dtype=dtype).masked_fill(block, float("-inf"))}
    ref = {"mask" if which == "attn_mask" else "kpm": block}
    for sub in ("h=2", "h=4"):
        small = nest.export(sub).eval()
        with torch.no_grad(), nest.use(sub):
            for run in (m, small):
                if dtype == x.dtype:
                    torch.testing.assert_close(run(x, **kw)[0], run(x, **ref)[0], atol=1e-6, rtol=0)
                else:  # stock: AssertionError (integer), RuntimeError (another float dtype)
                    with pytest.raises((AssertionError, RuntimeError), match=f"{which}|attn_mask dtype"):
                        run(x, **kw)


def _one_attention(dim: int, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """A model of one 4-head nn.MultiheadAttention (as ``attn``) in ``dtype``, eval mode, and a copy of it."""
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("attn", nn.MultiheadAttention(dim, 4, batch_first=True))
    m = m.to(dtype).eval()
    return m, copy.deepcopy(m)


def test_a_float32_mask_beside_a_bfloat16_model_runs_as_stock_attention_runs_it():
    """A model cast to bfloat16 given a float32 padding mask: stock nn.MultiheadAttention without weights
    (need_weights=False: how nn.TransformerEncoderLayer calls it) adds it in the query's dtype, and the full
    model ran; every smaller sub-model refused it ("nn.MultiheadAttention refuses it too", which holds only with
    weights). It runs now, as the full model with the other heads' outputs zeroed; with weights both refuse."""
    m, ref = _one_attention(32, torch.bfloat16)
    m.train(), ref.train()
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    kpm = torch.zeros(2, 5)
    kpm[0, -2:] = float("-inf")
    nest = sn.wrap(m, sn.Heads("heads", [2, 4], attn="attn"))
    with torch.no_grad():
        ref.attn.out_proj.weight[:, 16:] = 0
        want, _ = ref.attn(x, x, x, key_padding_mask=kpm.bfloat16(), need_weights=False)
    with nest.use("heads=2"), torch.no_grad():
        got, _ = m.attn(x, x, x, key_padding_mask=kpm, need_weights=False)
        torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
        with pytest.raises(sn.SortedNetError, match="with need_weights=True"):
            m.attn(x, x, x, key_padding_mask=kpm, need_weights=True)
    with pytest.raises(RuntimeError):  # (stock, with weights)
        ref.attn(x, x, x, key_padding_mask=kpm, need_weights=True)


@pytest.mark.parametrize("need_weights", [False, True])
def test_two_masks_of_other_dtypes_are_checked_as_their_sum_as_stock_attention_does(need_weights):
    """PyTorch adds the attention mask and the padding mask (type promotion) and checks the sum: a float64 model
    given a bool causal mask and a float32 padding mask runs (the sum is float64). Each mask was checked alone,
    so every smaller sub-model refused what the full model ran."""
    m, ref = _one_attention(16, torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    pad = torch.zeros(2, 5)
    pad[1, -2:] = float("-inf")
    nest = sn.wrap(m, sn.Heads("heads", [2, 4], attn="attn"))
    with torch.no_grad():
        ref.attn.out_proj.weight[:, 8:] = 0
        want = ref.attn(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=need_weights)[0]
        with nest.use("heads=2"):
            got = m.attn(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=need_weights)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("encoder", [False, True])
def test_float32_masks_under_autocast_run_as_in_stock_attention(need_weights, encoder):
    """Under ``torch.autocast`` the projections are bfloat16 and a float32 mask (a causal mask from
    ``generate_square_subsequent_mask``, the float mask ``nn.TransformerEncoder`` makes of a bool padding mask)
    is cast by autocast's attention: stock PyTorch runs it, so every sub-model and its export do too."""
    torch.manual_seed(0)
    if encoder:
        m = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False).eval()
        attn = "layers.*.self_attn"
    else:
        m = _MHANet(True).eval()
        attn = "att"
    plain_model = copy.deepcopy(m)
    x = torch.randn(2, 5, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)          # float32, -inf above the diagonal
    pad = torch.tensor([[False] * 4 + [True], [False] * 3 + [True] * 2])

    def run(model):
        if encoder:
            return model(x, mask=causal, src_key_padding_mask=pad)
        return model(x, pad.float().masked_fill(pad, float("-inf")), causal, need_weights)[0]

    nest = sn.wrap(m, sn.Heads("h", [1, 2, 4], attn=attn))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        # the full model (the stock encoder's fused inference path returns bfloat16, its regular path float32)
        torch.testing.assert_close(run(m), run(plain_model), atol=0.05, rtol=0.05, check_dtype=False)
        for sub in nest.submodels:
            small = nest.export(sub).eval()
            with nest.use(sub):
                live = run(m)
            assert live.isfinite().all()
            torch.testing.assert_close(live, run(small), atol=0.05, rtol=0.05, check_dtype=False)
    for autocast in (False, True):  # another float dtype is still refused, as PyTorch does (autocast casts no
        with torch.no_grad(), nest.use("h=2"), torch.autocast("cpu", torch.bfloat16, enabled=autocast):  # float64)
            with pytest.raises(sn.SortedNetError, match="dtype"):
                m(x, mask=causal.double()) if encoder else m.att(x, x, x, attn_mask=causal.double())


@pytest.mark.parametrize("mask,kpm", [
    ((12, 5, 5), None),   # per head, for a batch of 3: batch 1 would get batch 0's last heads' masks
    ((6, 5, 5), None),    # three heads per sequence (neither the full model's 4 nor the sub-model's 2)
    ((2, 5, 5), None),    # one mask per sequence: PyTorch refuses it, broadcast over heads it was not
    ((1, 5, 5), None), ((4, 5), None), (None, (2, 4))])
def test_sliced_mha_refuses_the_mask_shapes_stock_mha_refuses(mask, kpm):
    torch.manual_seed(0)
    m = _MHANet(True).eval()
    x = torch.randn(2, 5, 16)
    am = None if mask is None else torch.rand(mask) > 0.7
    pad = None if kpm is None else torch.zeros(kpm, dtype=torch.bool)
    with pytest.raises((RuntimeError, AssertionError)):
        m(x, pad, am)                                   # the full model, unwrapped: PyTorch refuses
    nest = sn.wrap(m, sn.Heads("h", [2, 4], attn="att"))
    with nest.use("h=2"), pytest.raises(sn.SortedNetError, match="must be"):
        m(x, pad, am)


def test_sliced_mha_takes_per_head_masks_of_the_full_model_or_of_the_submodel():
    torch.manual_seed(0)
    m = _MHANet(True).eval()
    nest = sn.wrap(m, sn.Heads("h", [2, 4], attn="att"))
    x = torch.randn(2, 5, 16)
    full = torch.rand(2, 4, 5, 5) > 0.6
    full[..., 0] = False                                # every query sees a key
    small = nest.export("h=2").eval()
    with torch.no_grad(), nest.use("h=2"):
        live = m(x, None, full.reshape(8, 5, 5))[0]     # the full model's mask: its first 2 heads are kept
        torch.testing.assert_close(live, m(x, None, full[:, :2].reshape(4, 5, 5))[0])
        torch.testing.assert_close(live, small(x, None, full[:, :2].reshape(4, 5, 5))[0], atol=1e-5, rtol=0)


def test_check_of_a_per_head_mask_of_the_full_model_says_the_export_takes_its_own_heads_masks():
    """``check`` on an example whose per-head mask is the full model's (which the live sub-models take) fails
    at the export, a module of the active heads: it said only that the mask must be the export's shape, as if
    the example were wrong for the live model. It names the check's export run and what to give it instead;
    an (L, S) mask checks."""
    torch.manual_seed(0)
    m = _MHANet(True).eval()
    x = torch.randn(2, 5, 16)
    full = torch.rand(8, 5, 5) > 0.6
    full[..., 0] = False
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"check: export\(h=2\) does not run on the example: attn_mask .*"
                                                r"its export, a module of the active heads, takes only theirs"):
        sn.wrap(m, sn.Heads("h", [2, 4], attn="att"), example=(x, None, full))
    assert_unchanged(m, before)
    sn.wrap(m, sn.Heads("h", [2, 4], attn="att"), example=(x, None, full[0]))


@pytest.mark.parametrize("opt", [dict(qkv=("a", "b", "c")), dict(o="nope"), dict(count_attrs=["bogus"]),
                                 dict(layout="interleaved")])
def test_heads_options_of_hand_written_attention_are_refused_on_stock_mha(opt):
    """They were ignored silently on an nn.MultiheadAttention, even naming children it does not have."""
    m = _MHANet(True)
    with pytest.raises(sn.SortedNetError, match=f"takes no \\['{next(iter(opt))}'\\]"):
        sn.wrap(m, sn.Heads("h", [2, 4], attn="att", **opt))
    assert type(m.att) is nn.MultiheadAttention


@pytest.mark.filterwarnings("ignore::UserWarning")
@given(heads=st.sampled_from([1, 2, 4]), batch_first=st.booleans(), seed=st.integers(0, 2**16))
def test_transformer_encoder_with_padding_under_no_grad(heads, batch_first, seed):
    """``nn.TransformerEncoder`` turns a padded batch into nested tensors under ``no_grad`` (eval, with
    ``src_key_padding_mask``): every sub-model gives at the valid positions what it gives with
    gradients on, the export gives the same, and the full model equals the model before wrapping."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
    enc = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] + [True] * 4])
    valid = ~pad if batch_first else ~pad.T
    with torch.no_grad():
        before = enc(x, src_key_padding_mask=pad)
    nest = sn.wrap(enc, sn.Heads("h", [1, 2, 4], attn="layers.*.self_attn"))
    sub = nest.resolve({"h": heads})
    with nest.use(sub):
        with_grad = enc(x, src_key_padding_mask=pad).detach()
        with torch.no_grad():
            live = enc(x, src_key_padding_mask=pad)
    small = nest.export(sub).eval()
    with torch.no_grad():
        exported = small(x, src_key_padding_mask=pad)
    torch.testing.assert_close(live[valid], with_grad[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(exported, live, atol=1e-5, rtol=0)
    if sub == nest.largest:
        torch.testing.assert_close(live, before, atol=1e-6, rtol=0)


def test_an_exported_encoder_with_an_odd_head_count_keeps_the_live_models_nested_path():
    """Heads with the model width narrowed alongside: the sub-model's attention of 3 heads would export as a plain
    nn.MultiheadAttention, which raises PyTorch's 'num_heads is not even' AssertionError on the nested tensor a
    padded batch becomes under no_grad. The export once turned the encoder's ``use_nested_tensor`` off (as a
    TransformerEncoder built at that size does), which fixed the crash but gave computed values at the padded
    positions where the live model, still on the nested path, gives zeros. The odd-head attention now exports
    as sortednet's PrunedMultiheadAttention (the attention the live sub-model runs): equal everywhere."""
    from sortednet.slicers.mha import PrunedMultiheadAttention

    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 16)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2)

        def forward(self, x, pad=None):
            return self.enc(self.inp(x), src_key_padding_mask=pad)

    model = M().eval()
    nest = sn.wrap(model, sn.Heads("heads", [3, 4], attn="enc.layers.*.self_attn"),
                   sn.Width("embed", [12, 16], out=["inp", "enc.layers.*.self_attn.out_proj", "enc.layers.*.linear2"],
                            inp=["enc.layers.*.self_attn", "enc.layers.*.linear1"],
                            norm=["enc.layers.*.norm1", "enc.layers.*.norm2"]))
    x, pad = torch.randn(3, 6, 5), torch.zeros(3, 6, dtype=torch.bool)
    pad[0, -2:] = True
    kinds = set()
    for sub in nest.submodels:  # (heads x head size != width: sortednet's PrunedMultiheadAttention as well)
        small = nest.export(sub).eval()
        attn = small.enc.layers[0].self_attn
        assert small.enc.use_nested_tensor
        assert type(attn) is (nn.MultiheadAttention if attn.num_heads % 2 == 0 and attn.num_heads * attn.head_dim
                              == attn.embed_dim else PrunedMultiheadAttention)
        kinds.add((type(attn).__name__, attn.num_heads, attn.embed_dim))
        with torch.no_grad():
            with nest.use(sub):
                live = model(x, pad)
            out = small(x, pad)
        torch.testing.assert_close(out, live, atol=1e-5, rtol=0)
        assert out[0, -2:].abs().sum() == 0  # (the nested path's padding)
    assert ("PrunedMultiheadAttention", 3, 12) in kinds and ("MultiheadAttention", 4, 16) in kinds


def test_a_multihead_attention_subclass_with_its_own_forward_is_refused_at_wrap():
    """Sortednet runs its own attention for every smaller sub-model: a subclass's forward (here scaling the
    output; torch's quantizable MultiheadAttention projects through other modules) was skipped there, silently,
    and dropped by export. Refused, naming the class; the model is unchanged."""
    from torch.ao.nn.quantizable import MultiheadAttention as QuantizableMHA

    class ScaledMHA(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            out, w = super().forward(*args, **kwargs)
            return out * 10, w

    for cls in (ScaledMHA, QuantizableMHA):
        m = nn.Sequential(cls(16, 4, batch_first=True))
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(sn.SortedNetError, match=f"{cls.__qualname__} subclasses nn.MultiheadAttention with a "
                                                    "forward of its own"):
            sn.wrap(m, sn.Heads("h", [2, 4], attn="0"))
        assert type(m[0]) is cls and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_a_model_with_a_config_that_no_hook_writes_is_refused_even_with_the_integrations_loaded():
    import sortednet.integrations  # noqa: F401  (registers the transformers export hook)

    class Cfg:
        hidden = 32

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.a, self.b = Cfg(), nn.Linear(8, 32), nn.Linear(32, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

        def save_pretrained(self, path):
            pass

    nest = sn.wrap(M(), sn.Width("h", [8, 32], out="a", inp="b"))
    with pytest.raises(sn.SortedNetError, match="config updated"):
        nest.export("h=8")
    assert nest.export("h=8", plain=True).a.weight.shape == (8, 8)


def test_a_transformer_encoders_layer_count_follows_depth_on_export():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    nest = sn.wrap(enc, sn.Depth("d", [1, 3], layers="layers"))
    small = nest.export("d=1")
    assert len(small.layers) == small.num_layers == 1


@pytest.mark.parametrize("when", ["before_wrap", "after_wrap"])
def test_export_keeps_a_channels_last_layout(when):
    """A model in ``channels_last`` exports its (sliced) convolution weights channels-last too, equal in
    value; contiguous models stay contiguous."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.ReLU(),
                      nn.Conv2d(8, 4, 1)).eval()
    if when == "before_wrap":
        m = m.to(memory_format=torch.channels_last)
    nest = sn.wrap(m, sn.Width("a", [4, 16], out="0", norm="1", inp="3"), sn.Width("b", [2, 8], out="3", inp="5"))
    if when == "after_wrap":
        m = m.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    for sub in ("a=4,b=2", "a=16,b=2", "a=16,b=8"):
        small = nest.export(sub)
        for i in (0, 3, 5):  # (a 1x1 kernel's weight is both layouts at once)
            w = small[i].weight
            assert w.is_contiguous(memory_format=torch.channels_last) and (i == 5 or not w.is_contiguous()), (sub, i)
        with nest.use(sub), torch.no_grad():
            torch.testing.assert_close(small(x), m(x), rtol=0, atol=1e-6)
    plain = sn.wrap(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)), sn.Width("c", [2, 8], out="0", inp="1"))
    assert all(p.is_contiguous() for p in plain.export("c=2").parameters())


@pytest.mark.parametrize("dim", [1, 2, 3])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), bias=st.booleans())
def test_transposed_convolutions_slice_export_and_train_like_their_export(dim, seed, bias):
    """``nn.ConvTranspose{1,2,3}d`` (U-Net upsampling): weight ``(in, out, *k)``, ``inp`` on axis 0 and ``out``
    on axis 1; every sub-model equals its export (forward and gradients) and costs its parameters."""
    torch.manual_seed(seed)
    conv, convt = [(nn.Conv1d, nn.ConvTranspose1d), (nn.Conv2d, nn.ConvTranspose2d),
                   (nn.Conv3d, nn.ConvTranspose3d)][dim - 1]
    m = nn.Sequential(conv(3, 8, 3, padding=1), nn.ReLU(), convt(8, 6, 2, stride=2, bias=bias), nn.ReLU(),
                      conv(6, 2, 1))
    nest = sn.wrap(m, sn.Width("a", [2, 4, 8], out="0", inp="2"), sn.Width("b", [3, 6], out="2", inp="4"))
    x = torch.randn(2, 3, *([4] * dim))
    for sub in nest.submodels:
        small = nest.export(sub)
        assert type(small[2]) is convt and small[2].weight.shape[:2] == (sub["a"], sub["b"])
        assert sum(p.numel() for p in small.parameters()) == nest.cost(sub)
        m.zero_grad(set_to_none=True)
        with nest.use(sub):
            live = m(x)
            live.square().sum().backward()
        out = small(x)
        out.square().sum().backward()
        torch.testing.assert_close(out, live, atol=1e-5, rtol=0)
        torch.testing.assert_close(m[2].weight.grad[:sub["a"], :sub["b"]], small[2].weight.grad, atol=1e-5, rtol=0)


def test_grouped_transposed_convolution_is_refused_and_discovery_finds_transposed_ones():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 2, groups=2), nn.Conv2d(8, 2, 1))
    before = snapshot(m)
    with pytest.raises(sn.PatternError, match="grouped ConvTranspose2d"):
        sn.wrap(m, sn.Width("a", [4, 8], out="0", inp="1"))
    assert_unchanged(m, before)
    import arch

    model, x = arch.build("unet")
    dims = {d.name: d for d in sn.discover(model, x, ratios=[0.5, 1.0])}
    bound = {p for d in dims.values() for p in (*d.spec().get("out", ()), *d.spec().get("inp", ()))}
    assert {"up2.0", "up1"} <= bound, dims              # the transposed convolutions join their groups


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("affine,track", [(False, False), (True, False), (True, True), (False, True)])
def test_instance_norm_is_discovered_sliced_sorted_and_exported(dim, affine, track):
    """``nn.InstanceNorm{1,2,3}d`` (per-sample, per-channel statistics): discovered as its channels' norm,
    every sub-model equals its export in eval and in training (running statistics updated on the same
    slice), and sorting keeps the full model."""
    conv, inorm = [(nn.Conv1d, nn.InstanceNorm1d), (nn.Conv2d, nn.InstanceNorm2d),
                   (nn.Conv3d, nn.InstanceNorm3d)][dim - 1]
    torch.manual_seed(dim)
    m = nn.Sequential(conv(3, 8, 3, padding=1), inorm(8, affine=affine, track_running_stats=track), nn.ReLU(),
                      conv(8, 2, 1))
    x = torch.randn(2, 3, *([5] * dim))
    with torch.no_grad():
        m.train()(x * 2 + 1)  # running statistics away from their initial values
        if affine:
            m[1].weight.uniform_(0.5, 1.5)
            m[1].bias.normal_()
    m.eval()
    dims = sn.discover(m, x, ratios=[0.25, 0.5, 1.0])
    assert [d.spec()["norm"] for d in dims] == [["1"]]
    nest = sn.wrap(m, *dims, example=x)
    for sub in nest.submodels:
        for mode in ("eval", "train"):
            getattr(m, mode)()
            small = getattr(nest.export(sub), mode)()
            with nest.use(sub), torch.no_grad():
                live = m(x)
            torch.testing.assert_close(small(x), live, atol=1e-5, rtol=0)
            if track and mode == "train":   # both updated their statistics the same way
                k = sub[dims[0].name]
                torch.testing.assert_close(m[1].running_mean[:k], small[1].running_mean, atol=1e-6, rtol=0)
        assert sum(p.numel() for p in nest.export(sub).parameters()) == nest.cost(sub)
    m.eval()
    with torch.no_grad():
        now = m(x)
    from sortednet.importance import sort_units

    sort_units(nest, "l1", example=x)
    with torch.no_grad():
        torch.testing.assert_close(m(x), now, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_prelu_slopes_follow_their_channels(layer):
    """``nn.PReLU(C)`` has one slope per channel: discovery binds it as its channels' per-feature parameter,
    every sub-model equals its export, sorting keeps the full model; a shared slope (``PReLU()``) is left
    alone, and listing it under ``norm=`` is refused before any change."""
    torch.manual_seed(0)
    if layer == "conv":
        m, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 2, 1)), torch.randn(2, 3, 6, 6)
    else:
        m, x = nn.Sequential(nn.Linear(3, 8), nn.PReLU(8), nn.Linear(8, 2)), torch.randn(4, 3)
    with torch.no_grad():
        m[1].weight.uniform_(-1, 1)
    dims = sn.discover(m, x, ratios=[0.25, 0.5, 1.0])
    assert [d.spec()["norm"] for d in dims] == [["1"]]
    nest = sn.wrap(m, *dims, example=x)
    for sub in nest.submodels:
        small = nest.export(sub)
        with nest.use(sub), torch.no_grad():
            torch.testing.assert_close(small(x), m(x), atol=1e-6, rtol=0)
        assert small[1].weight.shape == (sub[dims[0].name],) and small[1].num_parameters == sub[dims[0].name]
        assert sum(p.numel() for p in small.parameters()) == nest.cost(sub)
    with torch.no_grad():
        now = m(x)
    from sortednet.importance import sort_units

    sort_units(nest, "l1", example=x)
    with torch.no_grad():
        torch.testing.assert_close(m(x), now, atol=1e-6, rtol=0)
    shared = nn.Sequential(nn.Linear(3, 8), nn.PReLU(), nn.Linear(8, 2))
    before = snapshot(shared)
    with pytest.raises(sn.SortedNetError, match=r"one shared slope|'1' \(PReLU\) has 1"):
        sn.wrap(shared, sn.Width("h", [4, 8], out="0", norm="1", inp="2"))
    assert_unchanged(shared, before)


def test_an_exported_attention_keeps_the_models_mode_and_scripting_is_refused_clearly():
    """The export of fewer heads than the embedding width is a PrunedMultiheadAttention, a new module: it
    started in training mode, so the dropout of an eval model ran at inference (two calls differed)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.3, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    nest = sn.wrap(enc, sn.Heads("h", [2, 4], attn="layers.*.self_attn"))
    x = torch.randn(2, 5, 16)
    small = nest.export("h=2")
    assert not any(m.training for m in small.modules())
    with torch.no_grad(), nest.use("h=2"):
        live = enc(x)
        torch.testing.assert_close(small(x), live, atol=1e-5, rtol=0)
        torch.testing.assert_close(small(x), small(x), atol=1e-6, rtol=0)   # no dropout in eval
    with pytest.raises(sn.SortedNetError, match="PrunedMultiheadAttention.*not scriptable"):
        torch.jit.script(small)
    with pytest.raises(sn.SortedNetError, match="torch.jit.script of a wrapped model"):
        torch.jit.script(enc)
    torch.testing.assert_close(torch.jit.trace(small, x)(x), live, atol=1e-5, rtol=0)


def test_fx_symbolic_trace_of_a_depth_nest_is_refused_and_torch_export_captures_the_submodel():
    """``torch.fx.symbolic_trace`` unrolled the layer list at the trace's depth while the sliced layers (leaf
    modules to FX) followed ``use`` at call time: the GraphModule silently mixed two sub-models (0.07 from the
    sub-model, 0.28 from the full model). ``torch.export`` (make_fx) runs the real forward: it stays allowed."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(3))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.head = blocks, nn.Linear(8, 2)

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return self.head(x)

    m = Net().eval()
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="blocks.*.0", inp="blocks.*.2"), sn.Depth("d", [1, 3],
                                                                                          layers="blocks"))
    for sub in (nest.largest, nest.smallest):
        with nest.use(sub), pytest.raises(sn.SortedNetError, match="torch.fx symbolic tracing"):
            torch.fx.symbolic_trace(m)
    x = torch.randn(4, 8)
    with nest.use(nest.smallest):
        want = m(x)
        prog = torch.export.export(m, (x,))
    torch.testing.assert_close(prog.module()(x), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(nest.export(nest.smallest)(x), want, atol=1e-6, rtol=0)


def test_fx_symbolic_trace_refuses_a_sliced_size_read_in_python_and_keeps_width_only_models_live():
    """A forward that reads a sliced attribute in Python (``self.fc.out_features`` to size a view) had it baked
    into the traced graph as the traced sub-model's value; a width-only model whose forward only calls its layers
    traces to a module that follows ``use`` like the live model."""
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.out(self.fc(x).view(-1, self.fc.out_features).relu())

    m = Reads()
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="fc", inp="out"))
    with pytest.raises(sn.SortedNetError, match="'fc'.out_features"):
        torch.fx.symbolic_trace(m)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    nest = sn.wrap(plain, sn.Width("h", [8, 16], out="0", inp="2"))
    traced = torch.fx.symbolic_trace(plain)
    x = torch.randn(3, 8)
    for sub in nest.submodels:
        with nest.use(sub):
            torch.testing.assert_close(traced(x), plain(x), atol=1e-6, rtol=0)


class _PlainCfg:
    def __init__(self, n_heads=4, temp=1.0):
        self.n_heads, self.temp = n_heads, temp


class _SlotCfg:
    __slots__ = ("n_heads", "temp")

    def __init__(self, n_heads=4, temp=1.0):
        self.n_heads, self.temp = n_heads, temp


@dataclasses.dataclass
class _DataCfg:
    n_heads: int = 4
    temp: float = 1.0


class _CfgAttention(nn.Module):
    """Hand-written attention that reads its head count and a temperature from a config object."""

    def __init__(self, cfg, width=16):
        super().__init__()
        self.cfg = cfg
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        h = self.cfg.n_heads
        q, k, v = (f(x).view(b, t, h, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q * self.cfg.temp, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, h * 4))


@pytest.mark.parametrize("make", [_PlainCfg, _SlotCfg, _DataCfg, lambda: types.SimpleNamespace(n_heads=4, temp=1.0)],
                         ids=["plain", "slots", "dataclass", "namespace"])
def test_a_config_holding_the_head_count_is_the_users_object_at_the_full_count(make):
    """count_attrs=["cfg.n_heads"]: reads of module.cfg were per-read copies at every size, so a write through
    the module (module.cfg.temp = 0.1, outside any use block) was lost silently. At the full count the read is
    the user's object itself; under a smaller sub-model a copy of the same class with the active count, which
    reads the object's latest values."""
    torch.manual_seed(0)
    cfg = make()
    m = _CfgAttention(cfg)
    nest = sn.wrap(m, sn.Heads("h", [1, 2, 4], attn="", count_attrs=["cfg.n_heads"]))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = m(x)
        assert m.cfg is cfg
        m.cfg.temp = 0.1
        assert cfg.temp == 0.1
        assert not torch.allclose(m(x), before)
    with nest.use("h=2"):
        view = m.cfg
        assert type(view) is type(cfg) and view is not cfg and view.n_heads == 2 and view.temp == 0.1
        assert cfg.n_heads == 4
        for back in (pickle.loads(pickle.dumps(view)), copy.deepcopy(view)):
            assert type(back) is type(cfg) and back.n_heads == 2 and back.temp == 0.1
    small = nest.export("h=2")
    assert type(small.cfg) is type(cfg) and small.cfg.n_heads == 2 and small.cfg.temp == 0.1
    assert cfg.n_heads == 4


class _QKVCore(nn.Module):
    """An attention core without weights that keeps its own head count (guided diffusion's QKVAttention)."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        b, width, t = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (z.reshape(b * self.n_heads, ch, t) for z in qkv.chunk(3, dim=1))
        w = torch.einsum("bct,bcs->bts", q, k).mul(ch ** -0.5).softmax(-1)
        return torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, t)


class _CoreAttention(nn.Module):
    def __init__(self, width=32, heads=4, core_heads=None):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Conv1d(width, 3 * width, 1)
        self.attention = _QKVCore(core_heads or heads)
        self.proj_out = nn.Conv1d(width, width, 1)

    def forward(self, x):
        return x + self.proj_out(self.attention(self.qkv(x)))


@pytest.mark.parametrize("count_attrs", [None, ["num_heads", "attention.n_heads"]], ids=["found", "named"])
def test_an_attention_core_child_follows_the_head_count(count_attrs):
    """The head count kept by a child module without weights (guided diffusion's AttentionBlock holds
    QKVAttention(n_heads)) stayed at the full count: every smaller sub-model was refused by the check, and
    count_attrs= could not name it. It now follows the heads, found or named as "attention.n_heads"."""
    torch.manual_seed(0)
    model = nn.Sequential(_CoreAttention(), _CoreAttention())
    x = torch.randn(2, 32, 5)
    nest = sn.wrap(model, sn.Heads("h", [1, 2, 4], attn="*", qkv="qkv", o="proj_out", count_attrs=count_attrs),
                   example=x)
    for h in (1, 2, 4):
        with torch.no_grad(), nest.use({"h": h}):
            live = model(x)
            assert model[0].attention.n_heads == h
        small = nest.export({"h": h})
        assert small[1].attention.n_heads == h and small[1].qkv.out_channels == 3 * 8 * h
        torch.testing.assert_close(small(x), live)
    assert model[0].attention.n_heads == 4


def test_an_attention_core_child_left_out_is_named_and_one_of_another_count_refused():
    """count_attrs= without the child's count: the check's refusal names the attribute to add; a core counting
    other heads than the largest size is not made to follow (that count may be the child's own business), and the
    check refuses the heads it then computes, before anything changes."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 5)
    model = nn.Sequential(_CoreAttention())
    with pytest.raises(sn.SortedNetError, match=r"'0: attention.n_heads'.*count_attrs=, as 'attention.n_heads'"):
        sn.wrap(model, sn.Heads("h", [2, 4], attn="*", qkv="qkv", o="proj_out", count_attrs=["num_heads"]),
                example=x)
    model = nn.Sequential(_CoreAttention(core_heads=2))
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=r"is not the first 2 whole heads"):
        sn.wrap(model, sn.Heads("h", [2, 4], attn="*", qkv="qkv", o="proj_out"), example=x)
    assert_unchanged(model, before)
    assert model[0].attention.n_heads == 2
    with pytest.raises(sn.SortedNetError, match=r"count_attrs \['qkv.out_channels'\] name attributes of the proj"):
        sn.wrap(model, sn.Heads("h", [2, 4], attn="*", qkv="qkv", o="proj_out", count_attrs=["qkv.out_channels"]))
    assert_unchanged(model, before)


class _SelfAttention(nn.Module):
    """BERT / MobileViT's self-attention: it holds the q/k/v projections and its own head counts, and runs them
    by those counts (not by a reshape to -1)."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, width // heads
        self.all_head_size = width
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.num_attention_heads, self.attention_head_size).transpose(1, 2)
                   for f in (self.query, self.key, self.value))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return o.reshape(b, t, self.all_head_size)


class _AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = _SelfAttention()
        self.output = nn.Sequential(nn.Linear(32, 32))

    def forward(self, x):
        return x + self.output(self.attention(x))


def test_the_counts_of_the_child_holding_the_projections_follow_the_heads():
    """Heads over a block whose child runs the projections by its own counts (MobileViT's attention, with
    ``attention.query`` ... and ``output.0``): those counts stayed full, and every smaller sub-model failed its
    dry run (discover dropped all such heads). They now follow the head count."""
    torch.manual_seed(0)
    model = nn.Sequential(_AttentionBlock(), _AttentionBlock())
    x = torch.randn(2, 5, 32)
    nest = sn.wrap(model, sn.Heads("h", [1, 2, 4], attn="*", qkv=("attention.query", "attention.key",
                                                                   "attention.value"), o="output.0"), example=x)
    for h in (1, 2, 4):
        with torch.no_grad(), nest.use({"h": h}):
            live = model(x)
            assert model[0].attention.num_attention_heads == h and model[0].attention.all_head_size == 8 * h
        torch.testing.assert_close(nest.export({"h": h})(x), live)
    assert model[1].attention.num_attention_heads == 4


def test_a_child_holding_the_projections_with_another_head_count_is_refused_by_size():
    """The child that runs the projections counts 8 heads of 4 where Heads declares 4 of 8: check caught it only
    as heads split "as the fast axis"; wrap now names the child and its count, as for the attention itself."""
    torch.manual_seed(0)
    block = _AttentionBlock()
    block.attention = _SelfAttention(heads=8)
    model = nn.Sequential(block)
    before = snapshot(model)
    with pytest.raises(sn.SizeError, match=r"at '0': its child 'attention' \(_SelfAttention\), which holds the "
                                           r"projections, has its own head count num_attention_heads=8, not the "
                                           r"largest size 4"):
        sn.wrap(model, sn.Heads("h", [2, 4], attn="*", qkv=("attention.query", "attention.key", "attention.value"),
                                o="output.0"))
    assert_unchanged(model, before)


def test_a_symbolic_trace_in_another_thread_does_not_refuse_this_threads_forward():
    """torch.fx's tracing flag is process-wide: while another thread traced (torch.compile and make_fx set it too),
    every forward of the wrapped model in a serving thread was refused as a symbolic trace of its own."""
    import threading

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    nest = sn.wrap(model, sn.Width("h", [4, 16], out="0", inp="2"))
    inside, release = threading.Event(), threading.Event()

    def waits(x):
        inside.set()
        assert release.wait(60)
        return x + 1

    from torch.fx.experimental.proxy_tensor import make_fx

    traced = []  # (make_fx, as torch.compile runs it: a plain symbolic_trace patches nn.Module.__call__ for all)
    tracer = threading.Thread(target=lambda: traced.append(make_fx(waits)(torch.randn(2))))
    tracer.start()
    try:
        assert inside.wait(60)
        x = torch.randn(3, 8)
        with torch.no_grad(), nest.use("h=4"):
            got = model(x)
        torch.testing.assert_close(got, nest.export("h=4")(x), rtol=0, atol=1e-6)
    finally:
        release.set()
        tracer.join(60)
    assert isinstance(traced[0], torch.fx.GraphModule)  # (a trace in this thread: refused, tests above)


def test_wraps_own_hooks_leave_the_export_by_object_not_by_id():
    """Hook ids restart in every process: a hook of the user's loaded with the model (torch.load) may hold the id of
    one of wrap's hooks. Export dropped every entry under that id from every hook dict (the user's backward and
    state-dict hooks went too), and left the with-kwargs flags of wrap's hooks behind."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Width("h", [2, 8], out="0", inp="2"))
    ids = [h.id for h in nest._hooks]
    assert ids
    class Tagger:  # a hook object whose __eq__ fails on anything else (export called it: AttributeError)
        def __call__(self, mod, args, out):
            return None

        def __eq__(self, other):
            return self.tag == other.tag

        __hash__ = object.__hash__

    user = {}
    for m in model.modules():  # the user's hooks under the same ids, as after a reload in another process
        for i in ids:
            m._backward_hooks[i] = user.setdefault(("bwd", i), lambda mod, gi, go: None)
            m._state_dict_hooks[i] = user.setdefault(("sd", i), lambda mod, sd, prefix, local: None)
    for m in list(model.modules())[1:]:
        for i in ids:
            m._forward_hooks[i] = Tagger()
    small = nest.export("h=2")
    for j, m in enumerate(small.modules()):
        assert all(m._backward_hooks.get(i) is user[("bwd", i)] for i in ids)
        assert all(m._state_dict_hooks.get(i) is user[("sd", i)] for i in ids)
        assert not m._forward_pre_hooks and not m._forward_pre_hooks_with_kwargs and not m._forward_hooks_with_kwargs
        assert j == 0 or all(type(m._forward_hooks.get(i)).__name__ == "Tagger" for i in ids)


_LIVE_LAYER: list = []


def test_an_exported_hook_that_reads_the_live_model_is_warned_about():
    """A copy keeps a hook function's closure and globals as they are: a hook written as
    ``lambda mod, i, o: o * lin.weight.abs().mean()`` (``lin`` a live layer) made the export compute with the live
    model's values (4e-3 off at a=4, and following later training), in silence. Warned at export, for a closure
    and a global; a hook reading the module it is given, or a functools.partial (whose arguments a deep copy maps
    to the copy's modules), exports exactly, without a warning."""
    import functools
    import warnings

    from sortednet.export import LiveHookWarning

    def scaled(lin, mod, inp, out):
        return out * lin.weight.abs().mean()

    x = torch.randn(5, 8)
    class Holder:
        pass

    for how in ("closure", "global", "partial", "own", "attribute", "default", "kwdefault", "holder"):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        lin = m[0]
        _LIVE_LAYER[:] = [lin]
        hook = {"closure": lambda mod, i, o: o * lin.weight.abs().mean(),  # noqa: B023 (the point of the test)
                "global": lambda mod, i, o: o * _LIVE_LAYER[0].weight.abs().mean(),
                "partial": functools.partial(scaled, lin),
                "own": lambda mod, i, o: o * mod.weight.abs().mean(),
                # (an attribute of the same name as a global holding a live layer: not a read of that global)
                "attribute": lambda mod, i, o: o * mod._LIVE_LAYER,
                # (a default argument, and an attribute of an object the closure holds: unseen before)
                "default": lambda mod, i, o, lin=lin: o * lin.weight.abs().mean(),
                "kwdefault": lambda mod, i, o, *, lin=lin: o * lin.weight.abs().mean(),
                "holder": None}[how]
        if how == "holder":
            holder = Holder()
            holder.lin = lin
            hook = lambda mod, i, o: o * holder.lin.weight.abs().mean()  # noqa: B023, E731
        m[2]._LIVE_LAYER = 2.0
        m[2].register_forward_hook(hook)
        nest = sn.wrap(m, sn.Width("a", [4, 8, 16], out="0", inp="2"))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            small = nest.export("a=4")
        warned = [w for w in seen if issubclass(w.category, LiveHookWarning)]
        assert bool(warned) == (how in ("closure", "global", "default", "kwdefault", "holder")), how
        if warned:
            assert "'2' (_forward_hooks) holds a" in str(warned[0].message) and "live model" in str(warned[0].message)
        else:
            with torch.no_grad(), nest.use("a=4"):
                torch.testing.assert_close(small(x), m(x))
    _LIVE_LAYER.clear()


def test_an_attention_child_shared_by_several_attentions_is_left_to_them():
    """A weightless child held by every attention module (a tag carrying num_heads), each attention its own Heads
    dimension (as discover proposes): the child's count was bound by each, and wrap refused the model ("claimed by
    two dimensions"). A child with more than one parent is not made to follow any of them."""
    class Tag(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = 4

    class Attn(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.num_heads, self.tag = 4, tag
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (f(x).view(b, t, self.num_heads, 4).transpose(1, 2) for f in (self.q, self.k, self.v))
            return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))

    torch.manual_seed(0)
    tag = Tag()
    model = nn.Sequential(Attn(tag), Attn(tag))
    x = torch.randn(2, 5, 16)
    nest = sn.wrap(model, sn.Heads("h0", [2, 4], attn="0"), sn.Heads("h1", [2, 4], attn="1"), example=x)
    with torch.no_grad(), nest.use("h0=2,h1=4"):
        torch.testing.assert_close(nest.export("h0=2,h1=4")(x), model(x))
        assert tag.num_heads == 4


def test_a_forward_set_on_the_instance_never_lets_an_export_run_the_live_model(fresh_dynamo):
    """model.forward = torch.compile(model.forward) (transformers' documented pattern) stores a function on the
    instance, which a deep copy keeps: the export ran the LIVE model (its full size, or whatever use() was in
    force) with the export's parameter count. The compiled wrapper of a module's own forward is dropped from the
    export (its class's forward runs), with a warning; another instance forward that calls the live model is
    refused; one that reaches nothing live is kept."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    nest = sn.wrap(net, sn.Width("h", [16, 64], out="0", inp="2"))
    x = torch.randn(3, 8)
    ref = nest.export("h=16")(x)
    for where in (net, net[0]):
        where.forward = torch.compile(where.forward, backend="eager")
        with pytest.warns(UserWarning, match=r"forward = torch.compile\(forward\) set on the live model"):
            small = nest.export("h=16")
        assert "forward" not in small.__dict__ and "forward" not in small[0].__dict__
        with torch.no_grad():
            torch.testing.assert_close(small(x), ref)
            with nest.use("h=64"):
                torch.testing.assert_close(small(x), ref)
        del where.forward

    def fwd(x):
        return net[2](torch.relu(net[0](x)))

    net.forward = fwd
    with pytest.raises(sn.SortedNetError, match=r"forward set on the instance .* calls the live model"):
        nest.export("h=16")
    net.forward = functools.partial(fwd)
    with pytest.raises(sn.SortedNetError, match=r"forward set on the instance"):
        nest.export("h=16")
    net.forward = lambda x: x * 2.0  # (reaches nothing live: kept)
    assert torch.equal(nest.export("h=16")(x), x * 2.0)
    del net.forward
    orig = net.forward

    @functools.wraps(orig)  # (named as the forward it wraps, but it changes the output: refused, never dropped)
    def scaled(x):
        return orig(x) * 100.0

    for bad in (torch.compile(scaled, backend="eager"), torch.compile(functools.partial(type(net).forward, net),
                                                                      backend="eager"),
                lambda x: functools.partial(type(net).forward, net)(x)):
        net.forward = bad
        with pytest.raises(sn.SortedNetError, match=r"forward set on the instance"):
            nest.export("h=16")
        del net.forward
    net.forward_scaled = types.MethodType(lambda self, x: type(self).forward(self, x) * 10.0, net)
    for other in (net.forward_scaled, net.__call__):  # (another method of the module, compiled: not its forward)
        net.forward = torch.compile(other, backend="eager")
        with pytest.raises(sn.SortedNetError, match=r"forward set on the instance"):
            nest.export("h=16")
        del net.forward
    del net.forward_scaled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (check's own exports say nothing of a compiled forward)
        net.forward = torch.compile(net.forward, backend="eager")
        nest.check(x)
        del net.forward


def test_a_compiled_forward_set_before_wrap_or_on_a_shared_block_is_left_out_of_the_export(fresh_dynamo):
    """torch.compile(layer.forward) set before wrap on a layer wrap slices, and on a block held under two names
    (self.final = self.blocks[-1], its first path in the export another than in the live model): dropped with
    the warning, the export equal to the sub-model (a shared block was refused, a sliced layer's compile too)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
                                        for _ in range(3))
            self.final = self.blocks[2]

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x

    torch.manual_seed(0)
    x = torch.randn(2, 8)
    for where in ("blocks.0.0", "final"):
        net = Net().eval()
        dims = [sn.Width("h", [4, 16], out="blocks.*.0", inp="blocks.*.2"), sn.Depth("d", [2, 3], layers="blocks")]
        if where == "blocks.0.0":
            net.blocks[0][0].forward = torch.compile(net.blocks[0][0].forward, backend="eager")
        nest = sn.wrap(net, *dims)
        sub = "h=4,d=2"  # (blocks.2 is cut: the export reaches it as final only)
        ref = nest.export(sub)(x) if where == "final" else None
        if where == "final":
            net.final.forward = torch.compile(net.final.forward, backend="eager")
        with pytest.warns(UserWarning, match="forward = torch.compile"):
            small = nest.export(sub)
        with torch.no_grad():
            with nest.use(sub):
                live = net(x)
            torch.testing.assert_close(small(x), live)
            if ref is not None:
                torch.testing.assert_close(small(x), ref)


def test_a_hook_holding_the_nest_is_warned_about():
    """A hook reaching the live model through the nest it holds (nest.model...) computed with the live weights in
    the export, unwarned."""
    import warnings

    from sortednet.export import LiveHookWarning

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Width("a", [4, 8, 16], out="0", inp="2"))
    m[2].register_forward_hook(lambda mod, i, o: o * nest.model[0].weight.abs().mean())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        nest.export("a=4")
    assert any(issubclass(w.category, LiveHookWarning) for w in seen)


class _CachedTranspose(nn.Module):
    """Keeps a tensor computed from its weight at init (``wT``: a transposed view, or a scaled copy), read by its
    forward."""

    def __init__(self, n_in: int, n_out: int, how: str):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.wT = self.weight.t() if how == "view" else self.weight.t() * 1.0
        self.how = how

    def forward(self, x):
        return x @ self.wT


@sn.slicer(_CachedTranspose)
class _CachedTransposeSlicer(sn.Slicer):
    roles = ("out", "inp")
    attrs = ("weight", "wT")
    views = {"weight": ((0, "out"), (1, "inp"))}

    def full(self, m, role):
        return m._parameters["weight"].shape[0 if role == "out" else 1]

    def value(self, m, name):
        w = self.take(m, "weight", [(0, "out"), (1, "inp")]).t()
        return w if m.how == "view" else w * 1.0


@pytest.mark.parametrize("how", ["view", "copy"])
def test_a_plain_attribute_a_slicer_computes_from_a_parameter_is_refused_by_export_not_detached(how):
    """A tensor kept at init from the weight (``self.wT = self.weight.t()``) and served by a slicer's value():
    the export held a detached copy of it, so the exported weight drove nothing and got no gradient (the live
    sub-model trains it). Refused, naming the attribute; by ``wrap(example=)`` too, before anything changes. (A
    plain attribute no parameter computes exports as before: test_check's
    ``test_an_export_owns_a_plain_tensor_attribute_a_custom_slicer_serves``.)"""
    torch.manual_seed(0)
    m = nn.Sequential(_CachedTranspose(8, 32, how), nn.ReLU(), nn.Linear(32, 3))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"0\.wT \(_CachedTranspose\) is a plain tensor attribute .*'weight'"):
        sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"), example=torch.randn(2, 8))
    assert_unchanged(m, before)
    nest = sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"))
    x = torch.randn(4, 8)
    with nest.use("h=8"):
        m(x).sum().backward()
    assert m[0]._parameters["weight"].grad[8:].abs().sum() == 0 and m[0]._parameters["weight"].grad.abs().sum() > 0
    with pytest.raises(sn.SortedNetError, match=r"0\.wT .*x @ self\.weight\.t\(\)"):
        nest.export("h=8")
    with torch.no_grad(), nest.use("h=8"):  # (the live sub-models run as before)
        assert m(x).shape == (4, 3)


class _HeldTensors(nn.Module):
    """A module holding, as plain attributes its slicer serves unchanged, another module's parameter (``w``) and
    a view of its own buffer (``maskv``)."""

    def __init__(self, shared: torch.Tensor):
        super().__init__()
        self.__dict__["w"] = shared
        self.fc = nn.Linear(8, 8)
        self.register_buffer("mask", torch.ones(8))
        self.__dict__["maskv"] = self.mask.view(8)

    def forward(self, x):
        return F.linear(self.fc(x) * self.maskv, self.w)


@sn.slicer(_HeldTensors)
class _HeldTensorsSlicer(sn.Slicer):
    roles = ("norm",)
    attrs = ("w", "maskv")

    def full(self, m, role):
        return 8

    def value(self, m, name):
        return m.__dict__[name]


class _HoldsShared(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.p = _HeldTensors(self.emb.weight)

    def forward(self, x):
        return self.p(self.fc2(torch.relu(self.fc1(self.emb(x)))))


@pytest.mark.parametrize("held", ["w", "maskv"])
def test_a_plain_attribute_holding_another_modules_parameter_or_a_buffer_view_is_refused_by_export(held):
    """A slicer serving, as a plain attribute, another module's parameter or a view of a buffer: the export held
    a detached copy (``ex.p.w`` no longer ``ex.emb.weight``, in no ``parameters()``), so training or loading the
    export would leave it behind, in silence. Refused, naming it."""
    torch.manual_seed(0)
    m = _HoldsShared()
    if held == "w":
        m.p.__dict__["maskv"] = torch.ones(8)
    else:
        m.p.__dict__["w"] = torch.randn(8, 8)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp="fc2"), sn.Width("o", [8], norm=["p"]))
    what = "emb.weight" if held == "w" else "p.mask"
    with pytest.raises(sn.SortedNetError, match=rf"p\.{held} \(_HeldTensors\) is a plain tensor attribute .*{what}"):
        nest.export(nest.smallest)


class _DropConnect(nn.Module):
    def __init__(self, n_in: int, n_out: int, p: float = 0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.p = p

    def forward(self, x):
        return F.linear(x, self.weight)


@sn.slicer(_DropConnect)
class _DropConnectSlicer(sn.Slicer):
    """DropConnect in ``value()``: a training-mode draw on the weight, the identity in eval."""

    roles = ("out", "inp")
    attrs = ("weight",)

    def full(self, m, role):
        return m._parameters["weight"].shape[0 if role == "out" else 1]

    def value(self, m, name):
        return F.dropout(self.take(m, "weight", [(0, "out"), (1, "inp")]), m.p, m.training)


def test_an_export_in_training_mode_of_a_value_that_draws_is_refused_and_draws_nothing():
    """A slicer's value() that draws in training mode (DropConnect): an export taken mid-training kept one draw
    as its weight (60 of 128 entries zero; 0.21 off the live sub-model in eval), and consumed the random state.
    Refused, naming the attribute, with the random state as it was; in eval mode it exports, and an export of a
    model without such a value in training mode draws nothing either."""
    torch.manual_seed(0)
    m = nn.Sequential(_DropConnect(8, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    nest = sn.wrap(m, sn.Width("h", [16, 64], out="0", inp="2"), example=torch.randn(2, 8))
    m.train()
    state = torch.get_rng_state()
    with pytest.raises(sn.SortedNetError, match=r"0\.weight \(_DropConnect\) reads other values .* eval mode"):
        nest.export("h=16")
    assert torch.equal(torch.get_rng_state(), state)
    m.eval()
    small, x = nest.export("h=16"), torch.randn(4, 8)
    with torch.no_grad(), nest.use("h=16"):
        torch.testing.assert_close(small(x), m(x))
    plain = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3)).train()
    other = sn.wrap(plain, sn.Width("h", [16, 64], out="0", inp="2"))
    state = torch.get_rng_state()
    other.export("h=16")
    assert torch.equal(torch.get_rng_state(), state)


def test_wrapping_a_value_that_draws_in_training_mode_says_to_wrap_in_eval_mode():
    """A freshly built model is in training mode, where a DropConnect value() differs from the module's tensor:
    wrap's full-size check refused it saying value() must return the tensor itself, which it does in eval mode.
    The refusal names the training mode and the order that works (wrap after eval(), then train())."""
    torch.manual_seed(0)
    m = nn.Sequential(_DropConnect(8, 64), nn.ReLU(), nn.Linear(64, 3)).train()
    with pytest.raises(sn.SortedNetError, match=r"'weight'.*training mode.*DropConnect.*wrap the model after "
                                                r"model\.eval\(\)"):
        sn.wrap(m, sn.Width("h", [16, 64], out="0", inp="2"))
    assert type(m[0]) is _DropConnect and m.training
    sn.wrap(m.eval(), sn.Width("h", [16, 64], out="0", inp="2"))
    m.train()


def test_a_layer_compiled_in_place_is_exported_and_copied_as_its_own(fresh_dynamo):
    """``model[0].compile()`` (``nn.Module.compile``, in place) keeps a compiled call bound to that module; the
    deep copy of a sliced layer took it along (a plain module's copy drops it), so the export, and an EMA made
    with ``copy.deepcopy``, ran the LIVE layer: edits of the live model changed the export's output in silence,
    and outside ``use`` it failed on shapes. The copy runs its own weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    nest = sn.wrap(model, sn.Width("h", [4, 16], out="0", inp="2"))
    model[0].compile(backend="eager")
    x = torch.randn(5, 8)
    small, ema = nest.export("h=4"), copy.deepcopy(model)
    with torch.no_grad():
        before, ema_before = small(x), ema(x)
        with nest.use("h=4"):
            torch.testing.assert_close(model(x), before)
        model[0].weight.mul_(2)
        torch.testing.assert_close(small(x), before)
        torch.testing.assert_close(ema(x), ema_before)
        with nest.use("h=4"):
            torch.testing.assert_close(small(x), before)


class _RebuiltOnCopy(nn.Module):
    """A model whose ``__deepcopy__`` builds a new one from its config and state_dict."""

    def __init__(self, h=16):
        super().__init__()
        self.h, self.fc1, self.fc2 = h, nn.Linear(8, h), nn.Linear(h, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def __deepcopy__(self, memo):
        new = _RebuiltOnCopy(self.h)
        new.load_state_dict(self.state_dict())
        return new


def test_a_model_whose_deepcopy_builds_a_new_one_is_refused_by_name():
    """A ``__deepcopy__`` of the user's own that rebuilds the model (plain modules, none of the nest's) ended
    export, profile, check and FLOP counting in a raw ``KeyError: '_sn'`` (or an id); refused naming the class
    and what a wrapped model's copy needs. The live model is as it was."""
    torch.manual_seed(0)
    m = _RebuiltOnCopy()
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="fc1", inp="fc2"))
    before = snapshot(m)
    x = torch.randn(2, 8)
    for attempt in (lambda: nest.export("h=4"), lambda: nest.cost("h=4", "flops", example=x),
                    lambda: nest.check(x)):
        with pytest.raises(sn.SortedNetError, match=r"did not copy its sliced module\(s\) \['fc1', 'fc2'\] \(a "
                                                    r"__deepcopy__ of \['_RebuiltOnCopy'\]"):
            attempt()
        assert_unchanged(m, before)
    assert nest.active == nest.largest


class _NoDecay(torch.nn.Parameter):
    """A parameter subclass a user tags parameters with (left out of weight decay by isinstance)."""


def test_an_export_keeps_the_class_of_a_parameter_subclass():
    """Every tensor a slicer lists became a plain nn.Parameter in the export, cut or not, even at the largest
    sub-model (a deep copy keeps the subclass): an isinstance grouping of the exported model's parameters (no
    weight decay) changed in silence."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    m[1].weight = _NoDecay(m[1].weight.detach().clone())
    m[2].bias = _NoDecay(m[2].bias.detach().clone())
    nest = sn.wrap(m, sn.Width("w", [4, 8], out="0", norm="1", inp="2"))
    x = torch.randn(3, 4)
    for sub in nest.submodels:
        exported = nest.export(sub)
        kinds = {n: type(p) for n, p in exported.named_parameters()}
        assert kinds == {n: type(p) for n, p in copy.deepcopy(m).named_parameters()}
        assert kinds["1.weight"] is _NoDecay and kinds["2.bias"] is _NoDecay and kinds["0.weight"] is torch.nn.Parameter
        assert exported[1].weight.requires_grad
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(exported(x), m(x))

"""Speculative decoding: the target's own output, whatever the draft (tiny models built from configs)."""

from __future__ import annotations

import contextlib
import functools
import math

import pytest

transformers = pytest.importorskip("transformers")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from scipy.stats import chi2  # noqa: E402
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import sortednet as sn  # noqa: E402
from sortednet.integrations import soft_loss  # noqa: E402
from sortednet.speculative import generate as spec  # noqa: E402

V = 23


def llama(seed: int = 0, layers: int = 4, vocab: int = V, init: float = 0.02):  # GQA: 4 query, 2 key/value heads
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, initializer_range=init,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def gpt2(seed: int = 0, layers: int = 4, vocab: int = V):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=96,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0)).eval()


FAMILIES = {"llama": llama, "gpt2": gpt2}


def soft_train(nest: sn.Nest, steps: int = 20) -> None:
    """Brief SoFT on partly predictable sequences (steps of +1 or +2 mod V): exits agree often, not always."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(nest.model.parameters(), lr=1e-2)
    nest.model.train()
    for _ in range(steps):
        x = (torch.randint(0, V, (8, 1), generator=g) + torch.randint(1, 3, (8, 24), generator=g).cumsum(1)) % V
        soft_loss(nest, x).loss.backward()
        opt.step()
        opt.zero_grad()
    nest.model.eval()


@functools.cache
def nested(family: str, trained: bool) -> sn.Nest:
    nest = sn.from_transformers(FAMILIES[family](), ffn=[24], heads=[2], depth=[1, 2, 3])
    if trained:
        soft_train(nest)
    return nest


@functools.cache
def draft_nest(family: str) -> sn.Nest:
    nest = sn.from_transformers(FAMILIES[family](seed=1, layers=3), depth=[1, 2])
    soft_train(nest)
    return nest


def plain(model, ids, n, eos=None, **kw):
    """transformers' own greedy decoding; eos=None: the model's default, as speculative_generate's."""
    if eos is not None:
        kw["eos_token_id"] = eos
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


prompts = st.lists(st.integers(1, V - 1), min_size=1, max_size=6).map(lambda p: torch.tensor([p]))


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("trained", [False, True], ids=["random", "soft"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@settings(max_examples=2, derandomize=True)  # fixed prompts: no flaky fp32 near-ties between runs
@given(ids=prompts, k=st.sampled_from([1, 2, 3, 5, 8]))
def test_greedy_equals_plain_generate_for_every_depth_length_and_cache_mode(family, trained, depth, ids, k):
    nest = nested(family, trained)
    ref = plain(nest.model, ids, 12)
    for share in (None, False):
        out = sn.speculative_generate(nest, ids, draft=f"depth={depth}", max_new_tokens=12, num_draft_tokens=k,
                                      share_cache=share)
        assert torch.equal(out.sequences, ref), (share, out.stats)
        s = out.stats
        assert s.new_tokens == ref.shape[1] - ids.shape[1] and s.accepted <= s.drafted
        assert sum(e.drafted for e in s.exits.values()) == s.drafted


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("target_sub,draft", [("depth=3", "depth=1"), ("ffn=24,heads=2", "depth=2"),
                                              (None, "depth=2,heads=2"), (None, "depth=1,ffn=24"),
                                              (None, "auto")])
def test_greedy_sub_model_targets_narrow_drafts_and_auto_length(family, target_sub, draft):
    nest = nested(family, True)
    ids = torch.tensor([[3, 5, 7, 8]])
    with nest.use(target_sub or nest.largest):
        ref = plain(nest.model, ids, 24)
    k = "auto" if draft == "auto" else 3
    out = sn.speculative_generate(nest, ids, draft="depth=2" if draft == "auto" else draft, max_new_tokens=24,
                                  num_draft_tokens=k, target_sub=target_sub)
    assert torch.equal(out.sequences, ref)
    assert nest.active == nest.largest
    if draft == "auto":
        assert max(out.stats.draft_lengths) <= 12


@pytest.mark.parametrize("how", ["use", "activate"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_default_target_is_the_sub_model_the_caller_runs(family, how):
    """Inside ``nest.use(sub)`` (or after ``activate``), ``model.generate`` decodes ``sub``: so does
    ``speculative_generate`` without ``target_sub`` (it decoded the largest there)."""
    nest = nested(family, True)
    ids = torch.tensor([[3, 5, 7, 8]])
    sub = nest.resolve("ffn=24,heads=2,depth=3")
    with nest.use(sub):
        ref = plain(nest.model, ids, 16)
    assert not torch.equal(ref, plain(nest.model, ids, 16))   # the test tells the two apart
    try:
        with nest.use(sub) if how == "use" else contextlib.nullcontext():
            if how == "activate":
                nest.activate(sub)
            out = sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=16)
            assert nest.active == sub
    finally:
        nest.activate(nest.largest)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("thresholds", [[0, 0, 0], [0.3, 0.5, 0], [0.9, 0.2, 0], [1, 1, 1]])
@pytest.mark.parametrize("separate", [False, True], ids=["same_nest", "s2d_draft_nest"])
def test_cascade_greedy_equality_and_threshold_semantics(family, thresholds, separate):
    target = nested(family, True)
    draft = draft_nest(family) if separate else target   # S2D: a separate, smaller sorted draft nest
    exits = ["depth=1", "depth=2", "depth=3"]
    for ids in [torch.tensor([[4, 6, 8]]), torch.tensor([[1, 2, 3, 4, 5, 6, 7]])][int(separate):][:1]:
        ref = plain(target.model, ids, 20)
        out = sn.speculative_generate(target, ids, draft=draft, exits=exits, thresholds=thresholds,
                                      max_new_tokens=20, num_draft_tokens=4)
        assert torch.equal(out.sequences, ref)
        alone = {0: exits[0], 3: exits[-1]}.get(0 if thresholds[0] == 0 else 3 if thresholds[0] == 1 else None)
        if alone is not None:  # thresholds 0: the first exit alone; unreachable: the last exit alone
            one = sn.speculative_generate(target, ids, draft=draft, exits=[alone], max_new_tokens=20,
                                          num_draft_tokens=4, share_cache=False)
            assert (out.stats.drafted, out.stats.accepted) == (one.stats.drafted, one.stats.accepted)
            assert out.stats.exits[str(draft.resolve(alone) if separate else target.resolve(alone))].drafted \
                == out.stats.drafted


def test_numpy_numbers_are_numbers_and_a_string_is_no_list_of_thresholds():
    """numpy thresholds, token counts and temperature were refused with a false reason ('must lie in [0, 1]', got
    [0.3, 0]); a string of thresholds was split into its characters. numpy values now decode as Python numbers do
    (the same sequences, greedy and sampled), and a string is refused as no list."""
    target = nested("llama", False)
    ids = torch.tensor([[4, 6, 8]])
    exits = ["depth=1", "depth=2", "depth=3"]
    greedy = dict(draft=target, exits=exits)
    py = sn.speculative_generate(target, ids, thresholds=[0.3, 0.5, 0], max_new_tokens=6, num_draft_tokens=3,
                                 **greedy)
    for th in ([np.float32(0.3), np.float64(0.5), np.int64(0)], np.array([0.3, 0.5, 0.0])):
        got = sn.speculative_generate(target, ids, thresholds=th, max_new_tokens=np.int64(6),
                                      num_draft_tokens=np.int32(3), **greedy)
        assert torch.equal(got.sequences, py.sequences)
    sampled = [sn.speculative_generate(target, ids, draft="depth=1", do_sample=True, temperature=t,
                                       top_p=p, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
               for t, p in ((0.75, 0.5), (np.float32(0.75), np.float64(0.5)))]
    assert torch.equal(sampled[0].sequences, sampled[1].sequences)
    with pytest.raises(sn.SortedNetError, match="thresholds must be a list with one value per exit"):
        sn.speculative_generate(target, ids, thresholds="0.3", max_new_tokens=2, **greedy)
    rank = sn.Rank("r", [2, 4], targets="x", mode="lora", alpha=np.float32(2))
    assert rank.alpha == 2.0 and type(rank.alpha) is float
    x = torch.randint(0, V, (2, 8))
    a, b = soft_loss(target, x, exits=np.array([1, 2])), soft_loss(target, x, exits=[1, 2])
    assert list(a.losses) == [1, 2] and all(type(k) is int for k in a.losses)
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_useless_draft_accepts_nothing(family):
    target = FAMILIES[family]()
    with torch.no_grad():
        target.get_output_embeddings().weight[0] = 0   # the target never prefers token 0 ...
    draft = FAMILIES[family](seed=3)
    with torch.no_grad():
        draft.get_output_embeddings().weight.zero_()  # ... which the draft always proposes (all logits tie)
    ids = torch.tensor([[5, 6, 7]])
    ref = plain(target, ids, 12, eos=[])
    out = sn.speculative_generate(target, ids, draft=draft, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    assert out.stats.accepted == 0 and out.stats.drafted > 0 and out.stats.target_forwards == 12
    auto = sn.speculative_generate(target, ids, draft=draft, max_new_tokens=12, eos_token_id=[],
                                   num_draft_tokens="auto")
    assert torch.equal(auto.sequences, ref) and set(auto.stats.draft_lengths) == {1, 0}  # "auto" stays short


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("new", [1, 11])
@pytest.mark.parametrize("share", [None, False])
def test_draft_equal_to_target_accepts_everything(family, k, new, share):
    nest = nested(family, True)
    ids = torch.tensor([[2, 9, 4]])
    out = sn.speculative_generate(nest, ids, draft="depth=4", max_new_tokens=new, num_draft_tokens=k,
                                  share_cache=share, eos_token_id=[])
    assert torch.equal(out.sequences, plain(nest.model, ids, new, eos=[]))
    s = out.stats
    assert s.accepted == s.drafted and s.target_forwards == math.ceil(new / (k + 1))


def test_auto_draft_length_grows_with_acceptance():
    nest = nested("gpt2", False)   # its depth-1 exit agrees with the full model: everything is accepted
    ids = torch.tensor([[2, 9, 4]])
    out = sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=60, num_draft_tokens="auto",
                                  eos_token_id=[])
    assert torch.equal(out.sequences, plain(nest.model, ids, 60, eos=[])) and out.stats.accepted == out.stats.drafted
    lengths = out.stats.draft_lengths
    assert lengths[0] == 1 and lengths[:-1] == sorted(lengths[:-1]) and max(lengths) >= 6, lengths
    same = sn.speculative_generate(nest, ids, draft="depth=4", max_new_tokens=20, num_draft_tokens="auto",
                                   eos_token_id=[])
    assert set(same.stats.draft_lengths) <= {0, 1}   # a draft as costly as the target: no point in drafting more


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["shared", "separate", "cascade_shared", "cascade_separate"])
def test_caches_track_the_sequence_and_shared_logits_match_a_fresh_forward(family, kind, monkeypatch):
    nest = nested(family, True)
    kw = dict(draft="depth=1", share_cache=kind == "shared")
    if kind.startswith("cascade"):
        kw = dict(draft=nest, exits=["depth=1", "depth=2"], thresholds=[0.4, 0], share_cache=kind == "cascade_shared")
    rounds = []

    def check(r):
        rounds.append(r)
        stacks = {id(s): s for s in [r.plan.target] + [s for s, _ in r.plan.exits]}.values()
        for s in stacks:
            s.check()
        assert r.plan.target.layer_lengths() == [r.length - 1] * 4
        if r.plan.shared:
            assert all(n == r.length - 1 for n in r.plan.exits[0][0].layer_lengths())
        fresh = nest.model(r.ids).logits[0, r.first:]
        assert torch.allclose(r.target_logits, fresh, atol=1e-4), (r.target_logits - fresh).abs().max()

    monkeypatch.setattr(spec, "_on_round", check)
    ids = torch.tensor([[7, 1, 8, 2]])
    out = sn.speculative_generate(nest, ids, max_new_tokens=20, num_draft_tokens=4, eos_token_id=[], **kw)
    assert len(rounds) == out.stats.target_forwards and torch.equal(out.sequences, plain(nest.model, ids, 20, eos=[]))
    assert out.stats.accepted < out.stats.drafted  # rejections happened: rollback was exercised


def test_eos_attention_mask_plain_target_and_restored_state():
    nest = nested("llama", True)
    model = nest.model
    ids = torch.tensor([[3, 4, 5]])
    free = plain(model, ids, 20, eos=[])
    eos = int(free[0, 8])  # a token the target does produce
    out = sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(out.sequences, plain(model, ids, 20, eos=eos)) and out.sequences[0, -1] == eos
    padded, mask = torch.tensor([[0, 0, 3, 4, 5]]), torch.tensor([[0, 0, 1, 1, 1]])
    out = sn.speculative_generate(nest, padded, attention_mask=mask, draft="depth=2", max_new_tokens=10,
                                  eos_token_id=[])
    assert torch.equal(out.sequences, plain(model, padded, 10, eos=[], attention_mask=mask))
    # a plain transformers target with a separate sorted draft nest (the plain two-model case)
    draft = sn.from_transformers(llama(seed=5, layers=2), depth=[1])
    out = sn.speculative_generate(llama(), ids, draft=draft, exits=["depth=1"], max_new_tokens=10, eos_token_id=[])
    assert torch.equal(out.sequences, plain(llama(), ids, 10, eos=[]))
    # a draft nest without exits= drafts with its sub-model in force (its use block, else its default), as the
    # target runs its own: the draft's largest was used inside `draft.use(...)`
    for sub in ("depth=1", None):
        with draft.use(sub) if sub else contextlib.nullcontext():
            out = sn.speculative_generate(llama(), ids, draft=draft, max_new_tokens=6, eos_token_id=[])
        assert torch.equal(out.sequences, plain(llama(), ids, 6, eos=[]))
        assert list(out.stats.exits) == [str(draft.resolve(sub) if sub else draft.largest)]
    # state: active sub-model, training flags and the global RNG are as before
    model.train()
    model.model.layers[1].eval()
    rng = torch.get_rng_state()
    with nest.use("depth=3,ffn=24"):
        sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=5, do_sample=True,
                                generator=torch.Generator().manual_seed(0))
        assert nest.active == nest.resolve("depth=3,ffn=24")
    assert torch.equal(torch.get_rng_state(), rng) and model.training and not model.model.layers[1].training
    model.eval()


SEEDS = 300


def _first_tokens(target, draft, ids, seeds, vocab, **kw):
    counts = torch.zeros(vocab, vocab)
    for seed in range(seeds):
        out = sn.speculative_generate(target, ids, draft=draft, max_new_tokens=2, do_sample=True, num_draft_tokens=2,
                                      eos_token_id=[], generator=torch.Generator().manual_seed(seed), **kw)
        a, b = out.sequences[0, -2:].tolist()
        counts[a, b] += 1
    return counts


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=3, top_p=0.9)], ids=["plain", "filtered"])
def test_sampling_keeps_the_target_distribution_and_detects_a_wrong_rule(kw, monkeypatch):
    """Chi-square goodness of fit of the first two tokens over SEEDS seeds against the exact distribution of
    plain sampling from the target (batched forwards; cells expecting < 5 pooled), significance 0.001; an
    always-accept rule must fail the same test."""
    target = sn.from_transformers(llama(seed=7, vocab=4, layers=2, init=0.3), depth=[1])
    other = llama(seed=8, vocab=4, layers=1, init=0.3)   # the plain two-model case
    ids = torch.tensor([[1, 2]])
    samp = spec.Sampling(True, kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p"))
    with torch.no_grad():
        p1 = samp.probs(target.model(ids).logits[0, -1])
        p2 = samp.probs(target.model(torch.cat([ids.repeat(4, 1), torch.arange(4)[:, None]], 1)).logits[:, -1])
        with target.use("depth=1"):
            q1 = samp.probs(target.model(ids).logits[0, -1])
    exact = (p1[:, None] * p2).flatten()
    assert 0.5 * (p1 - q1).abs().sum() > 0.2   # the wrong rule has something to be caught at

    def pvalue(counts):
        counts = counts.flatten()
        if counts[exact == 0].sum() > 0:             # tokens outside the filtered support
            return 0.0
        e, o = exact * counts.sum(), counts
        small = e < 5                                # pool cells with few expected counts
        e = torch.cat([e[~small], e[small].sum()[None]]) if small.any() else e
        o = torch.cat([o[~small], o[small].sum()[None]]) if small.any() else o
        keep = e > 0
        return chi2.sf(float(((o[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1)

    assert pvalue(_first_tokens(target, "depth=1", ids, SEEDS, 4, **kw)) > 1e-3   # self-speculative, shared cache
    if not kw:
        assert pvalue(_first_tokens(target, other, ids, SEEDS, 4, **kw)) > 1e-3
    monkeypatch.setattr(spec, "_accept", lambda p, q, drafted, g: (len(drafted), spec.Sampling(True).draw(p[-1])))
    assert pvalue(_first_tokens(target, "depth=1", ids, SEEDS, 4, **kw)) < 1e-3


def test_same_generator_same_output():
    nest = nested("gpt2", True)
    ids = torch.tensor([[1, 5]])
    runs = [sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=12, do_sample=True,
                                    generator=torch.Generator().manual_seed(4)).sequences for _ in range(2)]
    torch.manual_seed(123)
    runs.append(sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=12, do_sample=True,
                                        generator=torch.Generator().manual_seed(4)).sequences)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def _forward_counter(*models):
    calls = []
    for m in models:
        for mod in m.modules():
            mod.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def test_bad_input_is_refused_before_any_forward():
    target = sn.from_transformers(llama(), ffn=[24], depth=[1, 2, 3])
    other = sn.from_transformers(llama(seed=2, vocab=V + 1), depth=[1])
    bigger = sn.from_transformers(llama(seed=2, layers=6), depth=[2])
    calls = _forward_counter(target.model, other.model, bigger.model)
    ids = torch.tensor([[1, 2, 3]])
    bert = BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=32))
    bad = [
        dict(target_sub="depth=2", draft="depth=3"),                     # draft deeper than the target
        dict(target_sub="ffn=24", draft="depth=1,ffn=48"),               # draft wider than the target
        dict(draft=bigger, exits=["depth=6"]),                           # separate draft with more parameters
        dict(draft=other, exits=["depth=1"]),                            # another vocabulary
        dict(draft=target, exits=["depth=1", "depth=2"], thresholds=[0.5]),        # one threshold per exit
        dict(draft=target, exits=["depth=1", "depth=2"], thresholds=[0.5, 1.5]),   # outside [0, 1]
        dict(draft=target, exits=["depth=1", "depth=2"], thresholds=[float("nan"), 0]),
        dict(draft=target, exits=["depth=2", "depth=1"]),                # not ascending
        dict(draft=target, exits=["depth=1,ffn=24", "depth=2"]),         # exits differ in width
        dict(draft="depth=1,ffn=24", share_cache=True),                  # narrower: keys/values differ
        dict(draft="depth=1", num_draft_tokens=0),
        dict(draft="depth=1", do_sample=True, temperature=0.0),
        dict(draft="depth=1", top_p=1.5),
        dict(draft="depth=1", attention_mask=torch.tensor([[1, 1, 0]])),  # right padding
        dict(draft="depth=1", input_ids=torch.tensor([[1, 2, 3], [1, 2, 3]])),     # batch 2
        dict(draft="depth=1", input_ids=torch.tensor([[1, V]])),          # token outside the vocabulary
        dict(draft="depth=9"),                                           # no such sub-model
        dict(draft="depth=1", target=bert),                              # not a causal LM
        dict(draft="depth=1", target=target.model),                      # a sub-model needs a Nest target
        dict(draft=target, exits=["depth=1"], target=target.model),      # the draft nest wraps the target itself
        # a type fuzzer: raw TypeError / RuntimeError, or a value read by its truth (do_sample="no" sampled)
        dict(draft="depth=1", eos_token_id=2.0),
        dict(draft="depth=1", do_sample="no"),
        dict(draft="depth=1", do_sample=torch.tensor([1, 0])),
        dict(draft="depth=1", share_cache=torch.tensor([1, 0])),
        dict(draft="depth=1", do_sample=True, top_p=True),
        dict(draft="depth=1", do_sample=True, temperature=float("inf")),
        # meta tensors hold no values: a raw "item() cannot be called on meta tensors" / "Cannot copy out of meta"
        dict(draft="depth=1", input_ids=torch.tensor([[1, 2, 3]], device="meta")),
        dict(draft="depth=1", attention_mask=torch.ones(1, 3, dtype=torch.long, device="meta")),
        dict(draft="depth=1", eos_token_id=torch.tensor([3], device="meta")),
        # generate()'s other options: a raw TypeError, unlike the same settings in the generation config
        dict(draft="depth=1", repetition_penalty=1.3),
        dict(draft="depth=1", num_return_sequences=2, streamer=None),
    ]
    for typo, meant in [({"max_new_token": 4}, "max_new_tokens"), ({"num_draft_token": 2}, "num_draft_tokens"),
                        ({"dratf": "depth=1"}, "draft")]:  # (a missing max_new_tokens / draft: Python's TypeError)
        base = {"max_new_tokens": 4, "draft": "depth=1"}
        with pytest.raises(sn.SortedNetError, match=f"did you mean '{meant}'"):
            sn.speculative_generate(target, ids, **{k: v for k, v in base.items() if k != meant}, **typo)
    for left_out in ("draft", "max_new_tokens"):
        with pytest.raises(sn.SortedNetError, match=f"needs {left_out}="):
            sn.speculative_generate(target, ids, **{k: v for k, v in base.items() if k != left_out})
    for kw in bad:
        kw = {"target": target, "input_ids": ids, "max_new_tokens": 4, **kw}
        with pytest.raises(sn.SortedNetError):
            sn.speculative_generate(kw.pop("target"), kw.pop("input_ids"), **kw)
    assert calls == [] and target.active == target.largest


def test_other_families_fall_back_to_their_own_forward():
    """Qwen2 blocks are not run range by range: sharing falls back to separate caches (or is refused when
    insisted on), and the output is still the target's greedy output."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=1, eos_token_id=0)).eval()
    nest = sn.from_transformers(model, depth=[1])
    ids = torch.tensor([[4, 5, 6]])
    out = sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=12)
    assert torch.equal(out.sequences, plain(model, ids, 12))
    for kw in (dict(draft="depth=1", share_cache=True), dict(draft=nest, exits=["depth=1", "depth=3"])):
        with pytest.raises(sn.SortedNetError, match="range by range"):
            sn.speculative_generate(nest, ids, max_new_tokens=4, **kw)


def test_an_error_of_the_models_own_forward_after_the_cache_served_is_passed_on_as_it_is():
    """On the fallback path (the model's own forward), any error was said to be the family's cache, one speculative
    decoding cannot drive, also a hook's that failed after several rounds had decoded: the error is passed on as it
    is once a forward with the cache went through."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=1, eos_token_id=0)).eval()
    nest = sn.from_transformers(model, depth=[1, 2])
    calls = [0]

    def boom(module, args):
        calls[0] += 1
        if calls[0] == 6:
            raise ValueError("my hook failed")

    handle = model.model.layers[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(ValueError, match="my hook failed") as info:
            sn.speculative_generate(nest, torch.tensor([[3, 1, 4, 1, 5]]), draft="depth=2", max_new_tokens=20)
    finally:
        handle.remove()
    assert type(info.value) is ValueError  # (not a SortedNetError blaming the family's cache)
    assert nest.active == nest.largest


def test_block_arguments_are_read_from_the_installed_blocks_and_a_pass_through_subclass():
    """The block range runner passes each argument under the name the installed transformers gives it (renamed
    within 5.x: past_key_values -> cache); a block subclass whose forward passes (*args, **kwargs) through reads
    as its base, and a block whose forward names other arguments and takes the rest as **kwargs is refused for a
    shared cache (whether it hands the cache on cannot be told: dropped, it would be left unfilled) and falls back
    to separate caches by default."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class PassThrough(LlamaDecoderLayer):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    class Opaque(LlamaDecoderLayer):
        def forward(self, hidden_states, **kwargs):
            return super().forward(hidden_states, **kwargs)

    ids = torch.tensor([[4, 6, 8]])
    for cls in (PassThrough, Opaque):
        model = llama()
        want = plain(model, ids, 8)
        for layer in model.model.layers:
            layer.__class__ = cls
        nest = sn.from_transformers(model, depth=[1, 2, 3])
        out = sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=8)
        assert torch.equal(out.sequences, want)
        for kw in (dict(draft="depth=1", share_cache=True), dict(draft=nest, exits=["depth=1", "depth=2"])):
            if cls is PassThrough:
                assert torch.equal(sn.speculative_generate(nest, ids, max_new_tokens=8, **kw).sequences, want)
            else:
                with pytest.raises(sn.SortedNetError, match=r"Opaque \(transformers .*lacks.*cache argument"):
                    sn.speculative_generate(nest, ids, max_new_tokens=8, **kw)


def test_sliding_window_models_equal_generate():
    """Mistral-style sliding-window attention: the drafts' caches are rolled back, which a sliding-window
    cache layer cannot do; full-length caches with the model's own window mask give generate's tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                             bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    nest = sn.from_transformers(model, depth=[1, 2])
    for ids in (torch.tensor([[3, 5, 7, 9, 11, 2]]), torch.tensor([[4]])):
        want = plain(model, ids, 12)
        for draft, k in (("depth=1", 3), ("depth=2", 5)):
            got = sn.speculative_generate(nest, ids, draft=draft, max_new_tokens=12, num_draft_tokens=k)
            assert torch.equal(got.sequences, want), (draft, k)


@pytest.mark.parametrize("setting, value, sampling", [
    ("repetition_penalty", 1.3, False), ("stop_strings", ["ab"], False),
    ("min_p", 0.3, True), ("typical_p", 0.2, True), ("epsilon_cutoff", 0.01, True), ("eta_cutoff", 0.01, True),
    ("top_h", 0.5, True), ("dola_layers", "high", False), ("force_words_ids", [[3]], False)])
def test_generation_config_logit_processors_are_refused_before_any_forward(setting, value, sampling):
    """Settings with which generate() would give other tokens (or, sampling, another distribution: the probe's
    min_p=0.3 drew 39 of 40 first tokens outside generate's support) are refused; a sampling filter only when
    sampling, as generate() applies it only then."""
    model = llama()
    nest = sn.from_transformers(model, depth=[2])
    old = getattr(model.generation_config, setting)
    setattr(model.generation_config, setting, value)
    calls = []
    h = model.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[1, 2, 3]])
    try:
        with pytest.raises(sn.SortedNetError, match=setting):
            sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=4, do_sample=True,
                                    generator=torch.Generator().manual_seed(0))
        assert not calls
        if sampling:  # greedy: generate() ignores the filter, and so may speculative decoding
            got = sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=4)
            assert torch.equal(got.sequences, plain(model, ids, 4))
        else:
            with pytest.raises(sn.SortedNetError, match=setting):
                sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=4)
    finally:
        h.remove()
        setattr(model.generation_config, setting, old)


@pytest.mark.parametrize("setting, value, eos", [
    ("suppress_tokens", [], 0), ("begin_suppress_tokens", [], 0), ("min_new_tokens", 5, None),
    ("min_length", 9, None)])
def test_generation_settings_that_change_nothing_are_accepted(setting, value, eos):
    """An empty token list, or a minimum length where no eos token is set (generate() adds no processor for
    either: its output is plain greedy), was refused as if it transformed the logits."""
    model = llama()
    nest = sn.from_transformers(model, depth=[2])
    ids = torch.tensor([[1, 2, 3]])
    gen = model.generation_config
    old = {k: getattr(gen, k) for k in (setting, "eos_token_id")}
    try:
        setattr(gen, setting, value)
        gen.eos_token_id = eos
        got = sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=6)
        with torch.no_grad():
            want = model.generate(ids, do_sample=False, max_new_tokens=6, attention_mask=torch.ones_like(ids))
        assert torch.equal(got.sequences, want)
        if setting.startswith("min_"):  # with an eos token they hold it back: refused
            gen.eos_token_id = 0
            with pytest.raises(sn.SortedNetError, match=setting):
                sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=6)
    finally:
        for k, v in old.items():
            setattr(gen, k, v)


@pytest.mark.parametrize("share_cache", [None, False])
@pytest.mark.parametrize("when", [1, 4])
def test_out_of_memory_passes_through_as_it_is(share_cache, when):
    """An out-of-memory error in the target's forward (the first, the pre-flight check's, or one in the middle of
    decoding) came back as a SortedNetError blaming the family's cache ("decode with model.generate instead"), so a
    caller's ``except torch.OutOfMemoryError`` retry never saw it. It passes through unchanged now; the model is
    left as it was."""
    model = llama()
    nest = sn.from_transformers(model, depth=[2])
    ids = torch.tensor([[7, 14, 21, 2, 5]])
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    calls = [0]

    def hook(mod, args, kwargs):
        calls[0] += 1
        if calls[0] == when:
            raise oom("CUDA out of memory. Tried to allocate 2.00 GiB")

    h = model.model.layers[3].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(oom, match="out of memory"):
            sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=8, share_cache=share_cache)
    finally:
        h.remove()
    assert nest.active == nest.largest
    assert torch.equal(sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=8).sequences,
                       plain(model, ids, 8))


@pytest.mark.parametrize("plain_target", [False, True])
def test_sampling_left_out_is_taken_as_generate_takes_it(plain_target):
    """generate() samples with its generation config's do_sample / temperature / top_k / top_p and, where
    neither sets one, top-k 50: speculative_generate sampled from the whole vocabulary (42% of tokens outside
    generate's top 50 on a 100-token model) and ignored a config's temperature. Each value left out now comes
    from the same place; sampled tokens stay inside the set generate can draw from."""
    model = llama(vocab=100, init=0.1)  # a quarter of the probability outside the top 50
    nest = sn.from_transformers(model, depth=[2])
    ids = torch.tensor([[1, 2, 3]])
    target, draft = (model, nest.export("depth=2")) if plain_target else (nest, "depth=2")
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    ranked = logits.sort(descending=True).values

    def drawn(n=150, **kw):
        g = torch.Generator().manual_seed(0)
        return {int(sn.speculative_generate(target, ids, draft=draft, max_new_tokens=1, generator=g,
                                            **kw).sequences[0, -1]) for _ in range(n)}

    def beyond(tokens, k):  # tokens clearly outside the top k (a margin for another path's rounding)
        return [t for t in tokens if logits[t] < ranked[k - 1] - 1e-4]

    got = drawn(do_sample=True)
    assert not beyond(got, 50) and len(got) > 10
    assert beyond(drawn(do_sample=True, top_k=0), 50)  # top_k=0: no top-k filter, as in generate
    gen = model.generation_config
    try:
        gen.do_sample, gen.top_k = True, 3  # do_sample and top_k from the config, as generate reads them
        assert not beyond(drawn(), 3)
        assert len(drawn(top_k=20)) > 3  # an argument still wins over the config
        gen.do_sample = False
        assert torch.equal(sn.speculative_generate(target, ids, draft=draft, max_new_tokens=4).sequences,
                           plain(model, ids, 4))
        gen.top_k, gen.top_p = -1, 0.0  # values greedy decoding never reads: not looked at, as in generate
        assert torch.equal(sn.speculative_generate(target, ids, draft=draft, max_new_tokens=4,
                                                   do_sample=np.bool_(False)).sequences, plain(model, ids, 4))
    finally:
        gen.do_sample, gen.top_k, gen.top_p = False, None, None


def test_a_prompt_holding_the_pad_token_is_masked_as_generate_does():
    """generate() infers attention_mask = ids != pad_token_id when the prompt holds the pad token (and it
    is not an eos token); speculative_generate infers the same, so their greedy tokens agree."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=1, pad_token_id=0)).eval()
    nest = sn.from_transformers(model, depth=[2])
    ids = torch.tensor([[0, 0, 3, 19, 7, 12]])
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    got = sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=6)
    assert torch.equal(got.sequences, want)
    with pytest.raises(sn.SortedNetError, match="pad token 0"):  # a pad in the middle is not left padding
        sn.speculative_generate(nest, torch.tensor([[3, 0, 5]]), draft="depth=2", max_new_tokens=2)


def test_gpt2_decodes_up_to_one_past_its_positions_as_generate_does():
    """The last new token is returned, never fed back: generate() runs a 57-token prompt + 8 new tokens on 64
    positions, which speculative_generate refused; one more is refused by both. A draft length far above what is
    left to emit no longer sizes the token buffer by itself (10**8 allocated ~1 GB)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                       eos_token_id=None)).eval()
    nest = sn.from_transformers(model, depth=[1, 2])
    for n, new in ((57, 8), (64, 1)):
        ids = torch.randint(2, V, (1, n), generator=torch.Generator().manual_seed(n))
        want = model.generate(ids, max_new_tokens=new, do_sample=False)
        for k in (4, 10**12):
            got = sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=new, num_draft_tokens=k)
            assert torch.equal(got.sequences, want), (n, new, k)
    with pytest.raises(sn.SortedNetError, match=r"prompt \(58\) \+ max_new_tokens \(8\) exceeds"):
        sn.speculative_generate(nest, torch.randint(2, V, (1, 58)), draft="depth=1", max_new_tokens=8)


def test_what_speculative_decoding_cannot_reproduce_is_refused():
    """Recurrent state (no rollback of rejected drafts), position-dependent RoPE frequencies, and generation
    settings that change generate()'s output (guidance, beams, ...) are refused before any forward."""
    import transformers as T

    ids = torch.tensor([[5, 9, 3, 17, 4, 8]])
    torch.manual_seed(0)
    mamba = T.MambaForCausalLM(T.MambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, state_size=4,
                                             expand=2, conv_kernel=3, eos_token_id=None, pad_token_id=0)).eval()
    with pytest.raises(sn.SortedNetError, match="recurrent state"):
        sn.speculative_generate(mamba, ids, draft=mamba, max_new_tokens=4)
    dyn = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       rope_scaling={"rope_type": "dynamic", "factor": 2.0})).eval()
    with pytest.raises(sn.SortedNetError, match="dynamic"):
        sn.speculative_generate(sn.from_transformers(dyn, depth=[1]), ids, draft="depth=1", max_new_tokens=4)
    shared = T.Gemma3nForCausalLM(T.Gemma3nTextConfig(  # (its last layers read earlier layers' keys and values)
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_kv_shared_layers=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=V, laurel_rank=4, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4,
        pad_token_id=0, bos_token_id=0, eos_token_id=None)).eval()
    for draft in ("depth=3", "depth=4"):
        with pytest.raises(sn.SortedNetError, match="last 2 layers reuse the keys and values"):
            sn.speculative_generate(sn.from_transformers(shared, depth=[3]), ids, draft=draft, max_new_tokens=4)
        sn.Nest.of(shared).unwrap()
    model = llama()
    nest = sn.from_transformers(model, depth=[1, 2])
    for key, value in (("guidance_scale", 3.0), ("num_beams", 3)):
        setattr(model.generation_config, key, value)
        with pytest.raises(sn.SortedNetError, match=key):
            sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=4)
        setattr(model.generation_config, key, None)


def test_float64_near_tie_picks_what_generate_picks():
    """generate takes the argmax of float32-cast logits: two tokens equal in float32 but not in float64 tie there and
    the lower index wins; speculative decoding must pick alike (it took the float64 argmax)."""
    model = llama(seed=0, init=0.2).double()
    with torch.no_grad():
        w = model.lm_head.weight
        w[3], w[5] = w[11] * 3, w[11] * 3 * (1 + 1e-12)  # equal logits in float32; in float64 5 wins where > 0
    nest = sn.from_transformers(model, depth=[1, 2])
    ids = torch.tensor([[10, 20, 11]])
    ref = plain(model, ids, 8, eos=[])
    out = sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=8, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    with torch.no_grad():
        logits = model(ref[:, :-1]).logits[0, ids.shape[1] - 1:]
    tied = logits[:, [3, 5]]
    assert ((tied[:, 0].float() == tied[:, 1].float()) & (tied[:, 1] > tied[:, 0])).any()  # a tie was decided


@pytest.mark.parametrize("draft", ["depth=1", {"depth": 1}, "SubModel"])
def test_a_partial_draft_takes_the_targets_other_sizes_in_every_form(draft):
    nest = nested("llama", True)
    draft = sn.SubModel.parse("depth=1") if draft == "SubModel" else draft
    ids = torch.tensor([[3, 5, 7, 8]])
    with nest.use("ffn=24,depth=4"):
        ref = plain(nest.model, ids, 12)
        out = sn.speculative_generate(nest, ids, draft=draft, max_new_tokens=12)
    assert torch.equal(out.sequences, ref)
    assert list(out.stats.exits) == [str(nest.resolve("ffn=24,depth=1"))]


def test_learned_positions_of_any_model_in_the_run_are_checked_before_a_forward():
    """Only a GPT-2 target's n_positions was read: a separate draft with fewer learned positions, or an OPT target,
    ran into a raw IndexError part-way; up to one past the positions both decode as generate does."""
    from transformers import OPTConfig, OPTForCausalLM

    target = llama(layers=2)
    torch.manual_seed(1)
    draft = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=8,
                                       bos_token_id=0, eos_token_id=None)).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    nest = sn.from_transformers(target, depth=[1])
    with pytest.raises(sn.SortedNetError, match="draft model's 8 learned positions"):
        sn.speculative_generate(nest, ids, draft=draft, max_new_tokens=5)
    for k in (1, 3, 6):  # (5 + 4 = one past the draft's 8 positions)
        out = sn.speculative_generate(nest, ids, draft=draft, max_new_tokens=4, num_draft_tokens=k)
        assert torch.equal(out.sequences, target.generate(ids, max_new_tokens=4, do_sample=False))
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=16, word_embed_proj_dim=32, bos_token_id=None,
                                   eos_token_id=None, pad_token_id=None)).eval()
    opt_nest = sn.from_transformers(opt, depth=[1])
    with pytest.raises(sn.SortedNetError, match="target model's 16 learned positions"):
        sn.speculative_generate(opt_nest, ids, draft="depth=1", max_new_tokens=13)
    out = sn.speculative_generate(opt_nest, ids, draft="depth=1", max_new_tokens=12, num_draft_tokens=3)
    assert torch.equal(out.sequences, opt.generate(ids, max_new_tokens=12, do_sample=False))


def test_the_nests_own_model_as_a_plain_draft_is_refused_by_name():
    """It runs the target's sub-model; with Rank adapters it was refused as 'larger than the target' (its raw
    parameter count, adapters included, against the target's cost)."""
    model = llama(layers=4)
    nest = sn.from_transformers(model, depth=[1, 2], rank=[2, 4])
    with pytest.raises(sn.SortedNetError, match="the draft is the target model itself"):
        sn.speculative_generate(nest, torch.tensor([[1, 2, 3]]), draft=model, max_new_tokens=4)


def test_a_forward_that_cannot_run_with_the_driven_cache_is_a_named_refusal(monkeypatch):
    """A family whose forward builds its cache its own way (transformers' Dory appends per-loop layers only to a
    cache made from its config) failed inside speculative decoding with a raw shape error; a model forward that
    raises under the cache speculative decoding drives is now a SortedNetError saying so (its error the cause).
    Simulated on Llama: its forward raising once a cache holds positions."""
    model = llama()
    nest = sn.from_transformers(model, depth=[2, 4])
    ids = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(0))
    forward = type(model).forward

    def picky(self, *args, **kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None and cache.get_seq_length() > 0:
            raise RuntimeError("The size of tensor a (17) must match the size of tensor b (13)")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", picky)
    with pytest.raises(sn.SortedNetError, match="forward raised RuntimeError .* model.generate instead") as e:
        sn.speculative_generate(nest, ids, draft={"depth": 2}, max_new_tokens=4, share_cache=False)
    assert isinstance(e.value.__cause__, RuntimeError)


def test_two_calls_at_once_keep_a_training_model_in_eval_mode_until_the_last_ends(monkeypatch):
    """Each call put the models in eval mode and restored their training flags when IT ended: the first call to
    end on a training-mode model restored training mode while another call still decoded, which then ran with
    dropout, in silence (8 of 8 longer calls gave other tokens). The flags come back when the last call running
    on the model ends. (No timing: each call is held inside its decoding by an event.)"""
    import threading

    nest = sn.from_transformers(llama(), depth=[1, 2])
    model = nest.model
    ids = torch.tensor([[3, 4, 5]])
    want = plain(model.eval(), ids, 6, eos=[])
    model.train()
    decode, out = spec._decode, {}
    inside = {n: threading.Event() for n in ("a", "b")}
    release = {n: threading.Event() for n in ("a", "b")}

    def held(*args, **kw):
        name = threading.current_thread().name
        inside[name].set()
        assert release[name].wait(60)
        return decode(*args, **kw)

    def call(name):
        out[name] = sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=6, eos_token_id=[])

    monkeypatch.setattr(spec, "_decode", held)
    threads = {n: threading.Thread(name=n, target=call, args=(n,)) for n in ("a", "b")}
    try:
        threads["a"].start()
        assert inside["a"].wait(60)
        threads["b"].start()
        assert inside["b"].wait(60)
        release["a"].set()
        threads["a"].join(60)
        assert "a" in out and not any(m.training for m in model.modules())  # (b still decodes: eval mode held)
    finally:
        for event in release.values():
            event.set()
        for thread in threads.values():
            thread.join(60)
    assert torch.equal(out["a"].sequences, want) and torch.equal(out["b"].sequences, want)
    assert all(m.training for m in model.modules())
    model.eval()


def test_a_call_stopped_while_setting_eval_mode_gives_every_flag_back():
    """A train() override raising inside the call's model.eval() (a Ctrl-C there does the same) left the counts
    of modules held in eval mode raised: from then on no call gave the training flags back."""
    class Once(torch.nn.Module):
        armed = True

        def train(self, mode=True):
            if Once.armed and not mode:
                Once.armed = False
                raise RuntimeError("refused once")
            return super().train(mode)

    nest = sn.from_transformers(llama(), depth=[1, 2])
    model = nest.model
    model.model.layers[0].guard = Once()
    model.train()
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(RuntimeError, match="refused once"):
        sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=3, eos_token_id=[])
    assert all(m.training for m in model.modules()) and not spec._HELD
    sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=3, eos_token_id=[])
    assert all(m.training for m in model.modules()) and not spec._HELD
    model.eval()


def _bert_lm(is_decoder: bool):
    from transformers import BertLMHeadModel

    torch.manual_seed(0)
    m = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, is_decoder=is_decoder)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(3)
    return m


@pytest.mark.parametrize("is_decoder", [False, True])
def test_a_target_that_attends_both_ways_is_refused_and_a_causal_one_equals_generate(is_decoder):
    """BertLMHeadModel with is_decoder=False (its from_pretrained default) attends both ways: verifying several
    drafts in one pass let earlier positions see later ones, and 7 of 10 prompts gave other tokens than generate,
    in silence. Refused (found by running it), nest or plain target; the causal configuration is exact."""
    m = _bert_lm(is_decoder)
    nest = sn.from_transformers(m, depth=[1])
    for s in range(4):
        ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(s))
        if not is_decoder:
            with pytest.raises(sn.SortedNetError, match=r"\(BertLMHeadModel\) attends both ways.*is_decoder"):
                sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=12, num_draft_tokens=3)
            continue
        out = sn.speculative_generate(nest, ids, draft="depth=1", max_new_tokens=12, num_draft_tokens=3)
        assert torch.equal(out.sequences, m.generate(ids, max_new_tokens=12, do_sample=False))


def test_left_padding_for_a_target_that_takes_no_position_ids_is_refused():
    """BartForCausalLM counts positions from the padded start in generate (it takes no position_ids); the padding
    was dropped and positions counted from 0: other tokens than generate's. Refused (found by running it on a
    padded and an unpadded prompt); unpadded it is exact, and an ALiBi model (Bloom) padded is accepted."""
    from transformers import BartConfig, BartForCausalLM

    torch.manual_seed(0)
    target = BartForCausalLM(BartConfig(
        vocab_size=64, d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
        max_position_embeddings=64, pad_token_id=1, eos_token_id=None, bos_token_id=None,
        forced_eos_token_id=None)).eval()
    draft = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.tensor([[1, 1, 1, 1, 17, 42, 9, 33, 5, 28]])
    for mask in ((ids != 1).long(), None):  # (given, or inferred from the pad token as generate infers it)
        with pytest.raises(sn.SortedNetError, match=r"left padding, and the target \(BartForCausalLM\) takes no "
                                                    "position_ids and counts its positions from the padded start"):
            sn.speculative_generate(target, ids, attention_mask=mask, draft=draft, max_new_tokens=12)
    real = ids[:, 4:]
    out = sn.speculative_generate(target, real, draft=draft, max_new_tokens=12)
    assert torch.equal(out.sequences, target.generate(real, max_new_tokens=12, do_sample=False))
    # ALiBi (Bloom) takes no position_ids either, but its attention depends on distances only: padding changes
    # nothing in generate(), and speculative decoding of the padded prompt is accepted and equal to it
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, pad_token_id=1,
                                         eos_token_id=None, bos_token_id=None)).eval()
    nest = sn.from_transformers(bloom, depth=[1])
    mask = (ids != 1).long()
    out = sn.speculative_generate(nest, ids, attention_mask=mask, draft="depth=1", max_new_tokens=10)
    assert torch.equal(out.sequences, bloom.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False))


def test_soft_loss_refuses_exits_without_an_order_beside_weights():
    """exits={4, 2} with weights=[1.0, 0.0] paired the weights in the set's iteration order: the loss of the
    other exit, in silence."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=1))
    nest = sn.from_transformers(model, depth=[2])
    ids = torch.randint(0, 40, (2, 6))
    with pytest.raises(sn.SortedNetError, match="exits given as a set have no order"):
        soft_loss(nest, ids, exits={4, 2}, weights=[1.0, 0.0])
    out = soft_loss(nest, ids, exits=[4, 2], weights=[1.0, 0.0])
    torch.testing.assert_close(out.loss, out.losses[4])
    assert float(soft_loss(nest, ids, exits={4, 2}).loss.detach()) > 0  # (no weights: the order does not matter)
    with pytest.raises(sn.SortedNetError, match="exits is a mapping"):  # (its values were dropped in silence)
        soft_loss(nest, ids, exits={2: 0.1, 4: 0.9})
    ordered = {4: 1.0, 2: 0.0}
    torch.testing.assert_close(soft_loss(nest, ids, exits=ordered.keys(), weights=list(ordered.values())).loss,
                               out.loss)


def test_a_plain_draft_beside_a_plain_target_is_checked_before_any_forward():
    """With a plain target the draft went unchecked: a draft that is no causal LM failed with a raw
    AttributeError, a recurrent one (Mamba) only after the target had run. Refused by name now, as beside a
    Nest target, before any forward."""

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(V, 8), torch.nn.Linear(8, V)

        def forward(self, input_ids, **kw):
            return self.head(self.emb(input_ids))

    model = llama()
    nest = sn.from_transformers(model, depth=[2])
    calls = []
    h = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for target in (model, nest):
            with pytest.raises(sn.SortedNetError, match="the draft must be a Hugging Face causal LM"):
                sn.speculative_generate(target, torch.tensor([[1, 2, 3]]), draft=TinyLM(), max_new_tokens=4)
        assert not calls
    finally:
        h.remove()


def test_a_subclass_of_a_causal_lm_class_is_a_causal_lm():
    """``class MyLlama(LlamaForCausalLM)`` was refused as target and as draft (its class name is not in
    transformers' table), though generate and sn.from_transformers take it."""
    MyLlama = type("MyLlama", (LlamaForCausalLM,), {})
    torch.manual_seed(0)
    model = MyLlama(llama().config).eval()
    torch.manual_seed(1)
    small = MyLlama(LlamaConfig(**{**llama().config.to_dict(), "num_hidden_layers": 2})).eval()
    ids = torch.tensor([[3, 5, 7]])
    want = plain(model, ids, 8)
    for target, draft in ((sn.from_transformers(model, depth=[2]), "depth=2"), (model, small)):
        assert torch.equal(sn.speculative_generate(target, ids, draft=draft, max_new_tokens=8).sequences, want)


def test_max_new_tokens_far_past_the_end_costs_nothing_up_front():
    """The token buffer was sized by max_new_tokens before the first round: 10**11 (generate stops at the eos
    after 3 tokens) failed to allocate 800 GB, 10**8 took 760 MB more. It grows as tokens come (120 tokens: past
    its first size; float64: no near-tie decides a token differently between one-token and several-token
    passes)."""
    model = llama().double()
    nest = sn.from_transformers(model, depth=[2])
    ids = torch.tensor([[3, 5, 7]])
    free = plain(model, ids, 120, eos=[])
    for k in (3, "auto"):
        got = sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=120, num_draft_tokens=k,
                                      eos_token_id=[])
        assert torch.equal(got.sequences, free), k
    long = plain(model, ids, 200, eos=[])  # (a round of 190 drafts: past the first size within the round)
    got = sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=200, num_draft_tokens=190, eos_token_id=[])
    assert torch.equal(got.sequences, long)
    eos = int(free[0, ids.shape[1] + 2])  # (the third new token: generate stops there)
    want = plain(model, ids, 10**11, eos=eos)
    assert want.shape[1] <= ids.shape[1] + 3
    for k in (4, 500):
        got = sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=10**11, eos_token_id=eos,
                                      num_draft_tokens=k)
        assert torch.equal(got.sequences, want), k


def test_compiled_models_and_a_same_named_class_of_another_module_are_causal_lms(fresh_dynamo):
    """The draft check beside a plain target (new today) refused what decoded right before it: a
    ``torch.compile``d draft, and a remote-code class imported as is (its own module, a transformers class name);
    ``torch.compile`` of the target or of a draft beside a Nest target was refused too. Accepted, each equal to
    generate's tokens."""
    from transformers import GenerationMixin
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

    def mk(layers, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                            eos_token_id=None)).double().eval()

    remote = type("LlamaForCausalLM", (LlamaPreTrainedModel, GenerationMixin),
                  {k: v for k, v in LlamaForCausalLM.__dict__.items() if k not in ("__dict__", "__weakref__")})
    remote.__module__ = "transformers_modules.acme.modeling_acme"
    target, draft = mk(4, 0), mk(1, 1)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    want = target.generate(ids, max_new_tokens=12, do_sample=False)
    other = mk(1, 1)
    other.__class__ = remote
    nest = sn.from_transformers(mk(4, 0), depth=[2])
    runs = [(torch.compile(target, backend="eager"), draft), (target, torch.compile(draft, backend="eager")),
            (nest, torch.compile(draft, backend="eager")), (target, other), (nest, other)]
    for t, d in runs:
        got = sn.speculative_generate(t, ids, draft=d, max_new_tokens=12, num_draft_tokens=3)
        assert torch.equal(got.sequences, want), (type(t).__name__, type(d).__module__)


def test_a_module_of_ones_own_under_a_transformers_name_is_no_causal_lm():
    """A class of one's own named ``GPT2LMHeadModel`` (not a PreTrainedModel) that ignores the cache it is handed
    was decoded (its logits from the new tokens alone: 7 of 8 prompts gave other tokens than its own greedy);
    refused by name before any forward, as target and as draft."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class GPT2LMHeadModel(torch.nn.Module):  # noqa: N801 (the name is the point)
        def __init__(self, hf):
            super().__init__()
            self.hf, self.config, self.generation_config = hf, hf.config, hf.generation_config

        def get_output_embeddings(self):
            return self.hf.lm_head

        def forward(self, input_ids=None, past_key_values=None, **kw):
            return CausalLMOutputWithPast(logits=self.hf(input_ids, use_cache=False).logits,
                                          past_key_values=past_key_values)

    own = GPT2LMHeadModel(gpt2()).eval()
    calls = []
    h = own.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for target, draft in ((own, gpt2(seed=1, layers=1)), (gpt2(), own)):
            with pytest.raises(sn.SortedNetError, match="must be a Hugging Face causal LM"):
                sn.speculative_generate(target, torch.tensor([[1, 2, 3]]), draft=draft, max_new_tokens=4)
        assert not calls
    finally:
        h.remove()


class _MaskedLM(LlamaForCausalLM):
    """A forward that does more after the head: the last 8 tokens masked in place."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits[..., -8:] = torch.finfo(out.logits.dtype).min
        return out


def test_a_shared_cache_is_not_used_where_it_would_misread_the_targets_logits():
    """With a shared cache the target's tokens come from its blocks, final norm and LM head run one by one: a
    forward of its own that masks part of the vocabulary after the head was bypassed, and the default (a shared
    cache for Llama) decoded other tokens than generate (the masked tokens, favoured by the head), in silence.
    Left to the plan, the cache is not shared then; share_cache=True is refused."""
    torch.manual_seed(0)
    model = _MaskedLM(LlamaConfig(vocab_size=V + 16, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=None,
                                  pad_token_id=0)).eval()
    with torch.no_grad():
        model.lm_head.weight[-8:] += 3.0  # (the masked tokens would win every step)
    nest = sn.from_transformers(model, depth=[1, 2])
    ids = torch.tensor([[3, 5, 7, 9, 11, 2]])
    want = plain(model, ids, 10)
    for draft in ("depth=1", "depth=2"):
        got = sn.speculative_generate(nest, ids, draft=draft, max_new_tokens=10)
        assert torch.equal(got.sequences, want), draft
        with pytest.raises(sn.SortedNetError, match=r"share_cache=True.*own logits differ from that reading"):
            sn.speculative_generate(nest, ids, draft=draft, max_new_tokens=10, share_cache=True)
    assert torch.equal(sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=10,
                                               share_cache=False).sequences, want)


def test_sampling_edges_as_generate_takes_them():
    """top_p=0.0 (generate: the most likely token alone) was refused as outside (0, 1]; a temperature so small
    that the logits divided by it overflow gave torch.multinomial's raw "probability tensor contains inf, nan"
    (generate's too): a SortedNetError naming the temperature now, the model left as it was."""
    model = llama()
    nest = sn.from_transformers(model, depth=[2])
    ids = torch.tensor([[1, 2, 3]])
    got = sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=5, do_sample=True, top_p=0.0,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(got.sequences, plain(model, ids, 5))  # (one token left each step: the greedy one)
    modes = [m.training for m in model.modules()]
    with pytest.raises(sn.SortedNetError, match=r"temperature=1e-45\).*overflow"):
        sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=5, do_sample=True, temperature=1e-45,
                                generator=torch.Generator().manual_seed(0))
    assert [m.training for m in model.modules()] == modes and nest.active == nest.largest


def test_generation_config_max_new_tokens_numpy_eos_and_int32_prompts_as_generate():
    """As generate(): max_new_tokens from the model's generation_config was refused as missing, a NumPy array of
    eos ids was refused, an int32 prompt came back as int32 sequences (generate gives int64)."""
    target = nested("llama", False)
    ids = torch.tensor([[4, 6, 8]])
    want = plain(target.model, ids, 5, eos=[17, 22])
    got = sn.speculative_generate(target, ids.int(), draft="depth=1", max_new_tokens=5,
                                  eos_token_id=np.array([17, 22]))
    assert got.sequences.dtype == want.dtype == torch.int64 and torch.equal(got.sequences, want)
    config = target.model.generation_config
    old = config.max_new_tokens
    config.max_new_tokens = 5
    try:
        got = sn.speculative_generate(target, ids, draft="depth=1", eos_token_id=[17, 22])
    finally:
        config.max_new_tokens = old
    assert torch.equal(got.sequences, want)

"""Every family in sortednet.integrations.LAYOUTS, built from a tiny config (no downloads), plus the fused
layouts that were silently wrong (GPT-NeoX interleaved q/k/v, Phi-3 [gate; up], fused grouped-query q/k/v)
and T5's per-head relative position bias.

With ``SORTEDNET_COVERAGE=path.json`` the tests record what each family passed; ``scripts/coverage_table.py``
renders docs/transformers.md's coverage table from that file.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
import transformers as T  # noqa: E402
from torch import nn  # noqa: E402

import sortednet as sn  # noqa: E402
import sortednet.integrations as sni  # noqa: E402
from sortednet.integrations import export_pretrained, soft_loss  # noqa: E402

V = 50
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
IMG = dict(image_size=16, patch_size=8, num_channels=3)
TOK = dict(vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _c(cls, cfg, **kw):
    return lambda: getattr(T, cls)(getattr(T, cfg)(**kw))


# name -> (builder, from_transformers kwargs, kind, heads-sliced export loads in the stock class)
FAMILIES = {
    "llama": (_c("LlamaForCausalLM", "LlamaConfig", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, **TOK), dict(ffn=[24], heads=[2], depth=[1]),
              "causal", True),
    "gpt2": (_c("GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=32, **TOK),
             dict(ffn=[64], heads=[2], depth=[1]), "causal", False),
    "bert": (_c("BertModel", "BertConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=32), dict(ffn=[24], heads=[2], depth=[1]),
             "encoder", False),
    "phi3": (_c("Phi3ForCausalLM", "Phi3Config", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, **TOK), dict(ffn=[16], heads=[2], depth=[1]),
             "causal", True),
    "gpt_neox": (_c("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, **TOK), dict(ffn=[24], heads=[2], depth=[1]), "causal", False),
    "opt": (_c("OPTForCausalLM", "OPTConfig", hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
               word_embed_proj_dim=32, max_position_embeddings=64, **TOK),
            dict(ffn=[24], heads=[2], depth=[1]), "causal", False),
    "falcon": (_c("FalconForCausalLM", "FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  new_decoder_architecture=True, num_kv_heads=2, **TOK),
               dict(ffn=[64], heads=[2], depth=[1]), "causal", False),
    "mixtral": (_c("MixtralForCausalLM", "MixtralConfig", hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, **TOK),
                dict(ffn=[12], heads=[2], depth=[1]), "causal", True),
    "qwen2_moe": (_c("Qwen2MoeForCausalLM", "Qwen2MoeConfig", hidden_size=32, intermediate_size=48,
                     moe_intermediate_size=16, shared_expert_intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, num_experts=3, num_experts_per_tok=2, **TOK),
                  dict(ffn=[8], heads=[2], depth=[1]), "causal", True),
    "t5": (_c("T5ForConditionalGeneration", "T5Config", vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2,
              num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
           dict(ffn=[24], heads=[2], depth=[1]), "seq2seq", True),
    "distilbert": (_c("DistilBertModel", "DistilBertConfig", vocab_size=V, dim=32, hidden_dim=48, n_layers=2,
                      n_heads=4), dict(ffn=[24], heads=[2], depth=[1]), "encoder", False),
    "vit": (_c("ViTModel", "ViTConfig", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, **IMG), dict(ffn=[24], heads=[2], depth=[1]), "vision", False),
    "deit": (_c("DeiTModel", "DeiTConfig", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, **IMG), dict(ffn=[24], heads=[2], depth=[1]), "vision", False),
    "clip_vision": (_c("CLIPVisionModel", "CLIPVisionConfig", hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, **IMG),
                    dict(ffn=[24], heads=[2], depth=[1]), "vision", False),
    "gpt_bigcode": (_c("GPTBigCodeForCausalLM", "GPTBigCodeConfig", n_embd=32, n_layer=2, n_head=4, n_positions=32,
                       multi_query=False, **TOK), dict(ffn=[64], heads=[2], depth=[1]), "causal", False),
    "mt5": (_c("MT5ForConditionalGeneration", "MT5Config", vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2,
               num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),  # gated-gelu: wi_0 / wi_1
            dict(ffn=[24], heads=[2], depth=[1]), "seq2seq", True),
    "clip_text": (_c("CLIPTextModel", "CLIPTextConfig", vocab_size=V, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16),
                  dict(ffn=[24], heads=[2], depth=[1]), "encoder", False),
    "phi": (_c("PhiForCausalLM", "PhiConfig", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, qk_layernorm=True, partial_rotary_factor=0.5, **TOK),
            dict(ffn=[24], heads=[2], depth=[1]), "causal", False),  # q/k norms sized hidden / heads
    "starcoder2": (_c("Starcoder2ForCausalLM", "Starcoder2Config", hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **TOK),
                   dict(ffn=[24], heads=[2], depth=[1]), "causal", True),
    "gptj": (_c("GPTJForCausalLM", "GPTJConfig", n_embd=32, n_inner=48, n_layer=2, n_head=4, rotary_dim=4,
                n_positions=32, **TOK), dict(ffn=[24], heads=[2], depth=[1]), "causal", False),
}
RECORD = os.environ.get("SORTEDNET_COVERAGE")


def record(family: str, check: str) -> None:
    """Append ``family passed check`` to the coverage file (only when SORTEDNET_COVERAGE is set)."""
    if RECORD:
        with open(RECORD, "a") as f:
            f.write(json.dumps({"family": family, "check": check}) + "\n")


def build(name, seed=0):
    torch.manual_seed(seed)
    make, kw, kind, loads = FAMILIES[name]
    model = make().eval()
    with torch.no_grad():  # non-trivial norms and biases: a wrong slice cannot hide
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model, kw, kind, loads


def inputs(kind, seed=1, b=2, t=7):
    g = torch.Generator().manual_seed(seed)
    if kind == "vision":
        return {"pixel_values": torch.randn(b, 3, 16, 16, generator=g)}
    x = torch.randint(2, V, (b, t), generator=g)
    return {"input_ids": x, "decoder_input_ids": x[:, :5]} if kind == "seq2seq" else {"input_ids": x}


def out(model, x):
    o = model(**x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


INPUTS_SRC = f"V = {V}\n" + inspect.getsource(inputs) + inspect.getsource(out)


@pytest.mark.parametrize("name", FAMILIES)
def test_largest_is_original_and_every_export_matches_live(name):
    model, kw, kind, loads = build(name)
    x = inputs(kind)
    with torch.no_grad():
        ref = out(model, x)
        nest = sn.from_transformers(model, **kw)
        assert torch.equal(out(model, x), ref)
        for sub in nest.submodels:
            with nest.use(sub):
                live = out(model, x)
            small = nest.export(sub, plain=True)
            torch.testing.assert_close(out(small, x), live, atol=1e-5, rtol=0)
            fewer_heads = sub.get("heads", 4) < 4
            if loads or not fewer_heads:  # nest.export of a PreTrainedModel: config matches the shapes
                small = nest.export(sub)
                assert small.config is not model.config
                with torch.device("meta"):
                    fresh = type(small)(small.config)
                assert {k: v.shape for k, v in fresh.state_dict().items()} == \
                       {k: v.shape for k, v in small.state_dict().items()}
                torch.testing.assert_close(out(small, x), live, atol=1e-5, rtol=0)
            else:
                with pytest.raises(sn.SortedNetError, match="plain=True"):
                    nest.export(sub)
        assert torch.equal(out(model, x), ref)
    for dim in kw:
        record(name, dim)
    if loads and "heads" in kw:
        record(name, "heads-sliced export loads")


def test_fresh_process_from_pretrained_equals_live(tmp_path):
    """Every family: export -> save_pretrained -> from_pretrained in ONE other Python process."""
    want = {}
    for name, (_, kw, kind, loads) in FAMILIES.items():
        model, kw, kind, loads = build(name)
        nest = sn.from_transformers(model, **kw)
        sub = nest.smallest if loads else nest.resolve({"heads": 4})
        export_pretrained(nest, sub).save_pretrained(tmp_path / name)
        with torch.no_grad(), nest.use(sub):
            want[name] = (type(model).__name__, kind, out(model, inputs(kind)).tolist())
    code = ("import json, sys, torch, transformers as T\n" + INPUTS_SRC +  # no sortednet in that process
            "res = {}\n"
            "for name, (cls, kind, _) in json.load(open(sys.argv[1] + '/want.json')).items():\n"
            "    m = getattr(T, cls).from_pretrained(sys.argv[1] + '/' + name).eval()\n"
            "    with torch.no_grad():\n        res[name] = out(m, inputs(kind)).tolist()\nprint(json.dumps(res))")
    (tmp_path / "want.json").write_text(json.dumps(want))
    env = {**os.environ, "PYTHONPATH": SRC, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sortednet" not in proc.stdout
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_, _, live) in want.items():
        torch.testing.assert_close(torch.tensor(fresh[name]), torch.tensor(live), atol=1e-5, rtol=0)
        record(name, "from_pretrained (fresh process)")


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f[2] in ("causal", "seq2seq")])
def test_generate_live_equals_export(name):
    model, kw, kind, loads = build(name)
    nest = sn.from_transformers(model, **kw)
    prompt = inputs(kind, b=1, t=4)["input_ids"]
    sub = nest.smallest
    with torch.no_grad(), nest.use(sub):
        live = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(live, uncached)
    small = export_pretrained(nest, sub) if loads else nest.export(sub, plain=True)
    assert torch.equal(small.generate(prompt, max_new_tokens=5, do_sample=False), live)
    record(name, "generate live == export")


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f[2] == "causal"])
def test_soft_loss_equals_separate_exits(name):
    model, _, kind, _ = build(name)
    nest = sn.from_transformers(model, depth=[1])
    x = inputs(kind)["input_ids"]
    got = soft_loss(nest, x)
    for d in (1, 2):
        with nest.use({"depth": d}):
            torch.testing.assert_close(got.losses[d], model(input_ids=x, labels=x).loss, atol=1e-5, rtol=1e-5)
    record(name, "SoFT")


SORTABLE = ["llama", "gpt2", "bert", "phi3", "gpt_neox", "opt", "distilbert", "vit", "deit", "clip_vision",
            "clip_text", "mixtral", "qwen2_moe", "t5", "falcon", "gpt_bigcode", "mt5", "phi", "starcoder2",
            "gptj"]  # t5, mt5: FFN only


@pytest.mark.parametrize("name", SORTABLE)
def test_importance_sorting_preserves_the_full_model(name):
    model, kw, kind, _ = build(name)
    kw = {k: v for k, v in kw.items() if k != "depth" and (k != "heads" or name not in ("t5", "mt5"))}
    nest = sn.from_transformers(model, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + torch.rand_like(p))
    x = inputs(kind, b=3)
    with torch.no_grad():
        ref = out(model, x)

    def loss_fn(m, b):  # encoders: a mean-pooled embedding objective
        return out(m, b).mean(1).pow(2).sum()

    perms = sn.sort_by_importance(nest, [x], loss_fn=loss_fn)
    with torch.no_grad():  # a permutation only reorders sums: equal up to rounding, relative to the output's scale
        err = (out(model, x) - ref).abs().max() / ref.abs().max().clamp_min(1)
    assert err <= 1e-5, err
    assert not all(torch.equal(p, torch.arange(len(p))) for layer in perms.values() for p in layer.values())
    asked = {part for part in ("ffn", "heads") if part in kw}  # every part asked for is sorted (MoE: heads too)
    assert all(asked <= set(layer) for layer in perms.values()), (asked, perms.keys())
    record(name, "importance sorting")


@pytest.mark.parametrize("name", ["t5"])
def test_importance_sorting_refuses_what_it_cannot_permute(name):
    model, kw, kind, _ = build(name)
    nest = sn.from_transformers(model, **kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match="does not support the"):
        sn.sort_by_importance(nest, [inputs(kind)], loss_fn=lambda m, b: out(m, b).sum())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_generic_sorting_of_t5_heads_names_the_shared_bias_and_changes_nothing():
    """``sort_units`` permutes each layer's heads by its own scores; T5's first layer's relative position
    bias serves every layer, so the full model would change: refused, the message names the cause."""
    from sortednet.importance import sort_units

    model, _, kind, _ = build("t5")
    nest = sn.from_transformers(model, heads=[2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match="(?s)relative position bias.*sn.sort_by_importance"):
        sort_units(nest, "l1", example=inputs(kind))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

def test_a_model_with_two_towers_is_nested_one_tower_at_a_time():
    clip = T.CLIPModel(T.CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, **IMG),
        projection_dim=16))
    with pytest.raises(sn.SortedNetError, match=r"one tower.*get_submodule\('text_model'\).*towers: "
                                                r"\['text_model', 'vision_model'\]"):
        sn.from_transformers(clip, ffn=[24])  # (the outermost module holding one tower: its own embeddings and norm)
    nest = sn.from_transformers(clip.vision_model, ffn=[24], heads=[2])
    assert nest.smallest["heads"] == 2


def test_a_per_head_refusal_in_from_transformers_offers_what_it_takes():
    """GPT-OSS's attention sinks (one per head): the Heads refusal told a from_transformers user to pass
    per_head= or whole=, which from_transformers does not take (a TypeError). It says how to nest by hand now,
    and changes nothing."""
    torch.manual_seed(0)
    cfg = T.GptOssConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=32, layer_types=["sliding_attention", "full_attention"],
                         sliding_window=8)
    model = T.GptOssForCausalLM(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"'sinks'.*from_transformers takes neither per_head= nor whole=: "
                                                r"nest this family's heads by hand"):
        sn.from_transformers(model, heads=[2])
    assert not any("_sn" in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sizes_given_as_arrays_or_tensors_are_taken_as_lists():
    """sn.Width takes its sizes as a numpy array or a tensor; from_transformers refused them (a SizeError)."""
    import numpy as np

    dims = []
    for ffn, depth in (([24], [1, 2]), (np.array([24]), torch.tensor([1, 2])), (torch.tensor([24]), np.array([1, 2])),
                       ([np.int64(24)], list(torch.tensor([1, 2])))):
        torch.manual_seed(0)
        model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        dims.append([d.spec() for d in sn.from_transformers(model, ffn=ffn, depth=depth).dims])
    assert all(d == dims[0] for d in dims)


def test_sort_by_importance_batch_errors():
    model = T.BertModel(T.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=48))
    nest = sn.from_transformers(model, ffn=[24])
    bad = (torch.randint(0, V, (2, 5)), ["some text"], torch.randn(2, 5), {"input_ids": torch.ones(1, 3).long()})
    for batch in bad:
        with pytest.raises(sn.SortedNetError, match="loss_fn=") as e:
            sn.sort_by_importance(nest, [batch])
        assert len(str(e.value)) < 600  # never the model's repr


# -- the cases that were silently wrong -------------------------------------------------------------------

def _masked_reference(model, x, dense_modules, keep: int, unit: int):
    """Full model with the inputs of the output projections zeroed beyond ``keep`` heads of ``unit`` features."""
    hooks = [m.register_forward_pre_hook(lambda m, a: (a[0] * (torch.arange(a[0].shape[-1]) < keep * unit),))
             for m in dense_modules]
    try:
        return out(model, x)
    finally:
        for h in hooks:
            h.remove()


def test_interleaved_qkv_equals_masked_heads_and_unstated_layout_is_refused():
    model, _, kind, _ = build("gpt_neox")
    x = inputs(kind)
    with pytest.raises(sn.SortedNetError, match="layout='interleaved'"):  # was: silently sliced as thirds
        sn.wrap(model, sn.Heads("heads", [2, 4], attn="gpt_neox.layers.*.attention", qkv="query_key_value"))
    assert type(model.gpt_neox.layers[0].attention.query_key_value) is nn.Linear  # left unchanged
    with torch.no_grad():
        want = _masked_reference(model, x, [b.attention.dense for b in model.gpt_neox.layers], 2, 8)
        nest = sn.wrap(model, sn.Heads("heads", [2, 4], attn="gpt_neox.layers.*.attention", qkv="query_key_value",
                                       layout="interleaved"))
        with nest.use("heads=2"):
            torch.testing.assert_close(out(model, x), want, atol=1e-5, rtol=1e-5)


def test_fused_gate_up_equals_masked_neurons():
    model, _, kind, _ = build("phi3")
    x = inputs(kind)
    with torch.no_grad():
        want = _masked_reference(model, x, [b.mlp.down_proj for b in model.model.layers], 16, 1)
        with pytest.raises(sn.SortedNetError, match="chunks="):
            sn.wrap(model, sn.Width("ffn", [16, 48], out="model.layers.*.mlp.gate_up_proj",
                                    inp="model.layers.*.mlp.down_proj"))
        nest = sn.wrap(model, sn.Width("ffn", [16, 48], out="model.layers.*.mlp.gate_up_proj",
                                       inp="model.layers.*.mlp.down_proj", chunks=2))
        with nest.use("ffn=16"):
            torch.testing.assert_close(out(model, x), want, atol=1e-5, rtol=1e-5)
            assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (32, 32)


class _FusedGQA(nn.Module):
    """Fused grouped-query attention: rows [q (H*d); k (KV*d); v (KV*d)] of one projection."""

    def __init__(self, E=32, H=4, KV=2):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = H, KV, E // H
        self.qkv = nn.Linear(E, (H + 2 * KV) * self.head_dim)
        self.proj = nn.Linear(E, E)

    def forward(self, x):
        B, T_, _ = x.shape
        H, KV, d = self.num_heads, self.num_key_value_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * d, KV * d, KV * d], -1)
        q = q.view(B, T_, H, d).transpose(1, 2)
        k, v = (t.view(B, T_, KV, d).transpose(1, 2).repeat_interleave(H // KV, 1) for t in (k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T_, H * d))


def test_fused_grouped_query_qkv_equals_masked_heads():
    torch.manual_seed(0)
    attn = _FusedGQA().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        h = attn.proj.register_forward_pre_hook(lambda m, a: (a[0] * (torch.arange(32) < 16),))
        want = attn(x)
        h.remove()
        nest = sn.wrap(attn, sn.Heads("heads", [2, 4], attn="", layout="stacked"))
        with nest.use("heads=2"):
            torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)
            assert attn.qkv.weight.shape == (16 + 8 + 8, 32) and attn.num_key_value_heads == 1


def test_t5_heads_slice_the_relative_position_bias():
    model, _, kind, _ = build("t5")
    x = inputs(kind)
    nest = sn.from_transformers(model, heads=[2])
    with torch.no_grad(), nest.use("heads=2"):
        blocks = [*model.encoder.block, *model.decoder.block]
        dense = [m for b in blocks for n, m in b.named_modules() if n.endswith("Attention.o")]
        nest_out = out(model, x)
    assert model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape == (32, 4)
    with torch.no_grad():
        torch.testing.assert_close(nest_out, _masked_reference(model, x, dense, 2, 8), atol=1e-5, rtol=1e-5)


def test_export_of_a_pretrained_model_never_keeps_a_stale_config(tmp_path):
    model, _, kind, _ = build("phi3")
    nest = sn.wrap(model, sn.Depth("depth", [1, 2], layers="model.layers"))  # declared by hand
    small = nest.export("depth=1")
    assert small.config.num_hidden_layers == 1 and model.config.num_hidden_layers == 2
    small.save_pretrained(tmp_path)
    T.Phi3ForCausalLM.from_pretrained(tmp_path)  # was: refused (mismatched sizes)
    plain = nest.export("depth=1", plain=True)
    assert plain.config.num_hidden_layers == 2  # explicitly plain
    # its checkpoint was written: from_pretrained then built 2 layers, one of them at random (only a log said so)
    with pytest.raises(sn.SortedNetError, match=r"nest.export\('depth=1', plain=True\): its config still"):
        plain.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    torch.save(plain, tmp_path / "plain.pt")  # the way to keep it
    nest.export("depth=2", plain=True).save_pretrained(tmp_path / "full")  # the full model's config is its own
    T.Phi3ForCausalLM.from_pretrained(tmp_path / "full")
    nest.unwrap()
    lora = sn.from_transformers(model, rank=[2, 4])  # adapters merge away: a rank sub-model keeps every shape
    lora.export("rank=2", plain=True).save_pretrained(tmp_path / "lora")


def test_rank_svd_export_pretrained_and_rank_targets(tmp_path):
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, **TOK)).eval()
    nest = sn.from_transformers(model, rank=[4, 16], rank_mode="svd",
                                rank_targets=["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"])
    assert {p.rsplit(".", 1)[-1] for p in nest.dims[0].targets} == {"q_proj", "o_proj", "up_proj"}
    x = inputs("causal")
    for sub in nest.submodels:
        small = export_pretrained(nest, sub)  # was: AttributeError 'Sequential' object has no attribute 'weight'
        small.save_pretrained(tmp_path / str(sub))
        back = T.LlamaForCausalLM.from_pretrained(tmp_path / str(sub)).eval()
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(out(back, x), out(model, x), atol=1e-4, rtol=1e-4)


def test_rank_targets_each_name_a_module_of_some_block():
    """A misspelled target next to a right one was dropped without a word (adapters on the right one only);
    a target only some blocks hold (a dense layer among mixture-of-experts ones) was dropped when the first
    block lacked it. Each target must name a module of some block; it reaches every block that has it.
    ``ffn=`` on such a mixed model is refused naming both FFN kinds (it named a "llama block" alone)."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, **TOK)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for targets, bad in [(["self_attn.q_proj", "mlp.nope"], "['mlp.nope']"),
                         (["mlp.up_proj", "mlp.down_prj"], "['mlp.down_prj']"), (["self_attn.q_prj"], "q_prj")]:
        with pytest.raises(sn.SortedNetError, match=re.escape(bad) + ".*match no module.*self_attn.q_proj"):
            sn.from_transformers(model, rank=[2, 4], rank_targets=targets)
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    cfg = T.Qwen2MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                           shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, mlp_only_layers=[1],
                           **TOK)
    moe = T.Qwen2MoeForCausalLM(cfg).eval()
    with pytest.raises(sn.SortedNetError, match=r"blocks hold different FFNs: model\.layers\.0 has \['mlp\.experts'\]"
                       r".*block model\.layers\.1 has none"):  # one width cannot span expert and dense FFNs
        sn.from_transformers(moe, ffn=[8])
    nest = sn.from_transformers(moe, rank=[2, 8], rank_mode="lora", rank_targets=["mlp.gate_proj", "self_attn.v_proj"])
    assert sorted(p for p, m in moe.named_modules() if hasattr(m, "lora_A")) == [
        "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.self_attn.v_proj",
        "model.layers.2.self_attn.v_proj"]
    with torch.no_grad():
        for m in moe.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_()
    x = inputs("causal")
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(out(nest.export(sub, plain=True), x), out(moe, x), atol=1e-5, rtol=1e-5)


class _DemoLayout:
    """Persimmon (fused per-head q/k/v, q/k norms) is not in the built-in table: a user describes it once."""

    layout = sni.Layout("persimmon", probe=("self_attn.query_key_value", "self_attn.dense", "mlp.dense_h_to_4h",
                                            "mlp.dense_4h_to_h"),
                        ffn_out=("mlp.dense_h_to_4h",), ffn_inp=("mlp.dense_4h_to_h",), attn=("self_attn",),
                        qkv="query_key_value", o="dense", qkv_layout="interleaved", norm="final_layernorm",
                        causal=True)


def test_register_layout_gives_an_unlisted_family_every_feature(tmp_path):
    torch.manual_seed(0)
    model = T.PersimmonForCausalLM(T.PersimmonConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, qk_layernorm=True, **TOK)).eval()
    with pytest.raises(sn.SortedNetError, match="register_layout"):
        sn.from_transformers(model, ffn=[24])
    manual = sn.wrap(model, sn.Depth("depth", [1, 2], layers="model.layers"))
    with pytest.raises(sn.SortedNetError, match="register_layout") as e:
        soft_loss(manual, inputs("causal")["input_ids"])
    assert "by hand" in str(e.value) and "declare the dimensions" not in str(e.value)
    manual.unwrap()
    lay = sni.register_layout(_DemoLayout.layout)
    try:
        nest = sn.from_transformers(model, ffn=[24], heads=[2], depth=[1])
        x = inputs("causal")["input_ids"]
        sn.sort_by_importance(nest, [x])
        soft_loss(nest, x).loss.backward()
        export_pretrained(nest, "ffn=24,heads=4,depth=1").save_pretrained(tmp_path)
        back = T.PersimmonForCausalLM.from_pretrained(tmp_path).eval()
        with torch.no_grad(), nest.use("ffn=24,heads=4,depth=1"):
            torch.testing.assert_close(out(back, {"input_ids": x}), out(model, {"input_ids": x}), atol=1e-5, rtol=0)
    finally:
        sni.unregister_layout(lay)


def test_a_registered_family_without_heads_exports_its_ffn_and_depth_sub_models():
    """A layout registered for a family without attention (FNet): every export read the layout's head count from
    the config, heads nested or not, so ffn= and depth= exports were refused ("FNetConfig has no
    'num_attention_heads'"); heads_key=None then failed with a TypeError. Exports equal live now, and heads= on a
    layout without a heads_key is refused by name. XLNet's max_position_embeddings=-1 (no limit) made the
    self-check's input a raw RuntimeError."""
    lay = sni.register_layout(sni.Layout("fnet_test", probe=("fourier", "intermediate.dense"),
                                         ffn_out=("intermediate.dense",), ffn_inp=("output.dense",), heads_key=None))
    xl = sni.register_layout(sni.Layout("xlnet_test", probe=("rel_attn", "ff.layer_1"), ffn_out=("ff.layer_1",),
                                        ffn_inp=("ff.layer_2",), ffn_key="d_inner", depth_keys=("n_layer",)))
    try:
        torch.manual_seed(0)
        model = T.FNetModel(T.FNetConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                         intermediate_size=64)).eval()
        with pytest.raises(sn.SortedNetError, match=r"'fnet_test' layout names no heads_key"):
            sn.from_transformers(model, heads=[1])
        nest = sn.from_transformers(model, ffn=[32], depth=[1])
        x = torch.randint(0, V, (2, 8))
        for sub in nest.submodels:
            with torch.no_grad(), nest.use(sub):
                want = model(input_ids=x).last_hidden_state
            small = nest.export(sub).eval()
            assert (small.config.num_hidden_layers, small.config.intermediate_size) == (sub["depth"], sub["ffn"])
            with torch.no_grad():
                torch.testing.assert_close(small(input_ids=x).last_hidden_state, want)
        xlnet = T.XLNetLMHeadModel(T.XLNetConfig(vocab_size=V, d_model=32, n_layer=2, n_head=4, d_inner=64)).eval()
        assert sn.from_transformers(xlnet, ffn=[32]).submodels == [sn.SubModel(ffn=32), sn.SubModel(ffn=64)]
    finally:
        sni.unregister_layout(lay)
        sni.unregister_layout(xl)


class _ScaledConfig(T.PretrainedConfig):
    model_type = "sn_test_scaled"

    def __init__(self, d_model=32, n_heads=4, head_dim=8, ffn_dim=48, n_layers=4, how="", **kw):
        self.d_model, self.n_heads, self.head_dim, self.ffn_dim, self.n_layers, self.how = (
            d_model, n_heads, head_dim, ffn_dim, n_layers, how)
        super().__init__(**kw)


class _ScaledAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config, self.n_heads, self.hd = cfg, cfg.n_heads, cfg.head_dim
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim) for _ in range(3))
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model)

    def forward(self, x):
        B, T_, _ = x.shape
        q, k, v = (f(x).view(B, T_, -1, self.hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        scale = (self.config.d_model / self.config.n_heads) ** -0.5 if self.config.how == "config_scale" else None
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return self.o(a.transpose(1, 2).reshape(B, T_, -1))


class _ScaledBlock(nn.Module):
    """A block whose attention scale reads the config's head count in forward (``how="config_scale"``), or that
    uses the layer count it keeps as an int for a MiniCPM-style residual scale (``how="depth_int"``; kept, and
    unused, otherwise)."""

    def __init__(self, cfg):
        super().__init__()
        self.how, self.n_layers = cfg.how, cfg.n_layers
        self.attn = _ScaledAttention(cfg)
        self.up, self.down = nn.Linear(cfg.d_model, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x):
        r = 1.4 / self.n_layers ** 0.5 if self.how == "depth_int" else 1.0
        x = x + r * self.attn(x)
        return x + r * self.down(torch.relu(self.up(x)))


class _ScaledModel(T.PreTrainedModel):
    config_class = _ScaledConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.embed = nn.Embedding(V, cfg.d_model)
        self.blocks = nn.ModuleList(_ScaledBlock(cfg) for _ in range(cfg.n_layers))
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, **kw):
        x = self.embed(input_ids)
        for b in self.blocks:
            x = b(x)
        return T.modeling_outputs.BaseModelOutput(last_hidden_state=x)


_SCALED = sni.Layout("sn_test_scaled", probe=("attn.q", "attn.o", "up"), ffn_out=("up",), ffn_inp=("down",),
                     attn=("attn",), qkv=("q", "k", "v"), o="o", count_attrs=("n_heads",), ffn_key="ffn_dim",
                     heads_key="n_heads", head_dim_key="head_dim", depth_keys=("n_layers",))


@pytest.mark.parametrize("how, dim", [("config_scale", "heads"), ("depth_int", "depth"), ("", "heads"),
                                      ("", "depth")])
def test_an_export_whose_class_reads_the_rewritten_config_otherwise_is_refused(how, dim, tmp_path):
    """A class reading the config's head count in forward (a softmax scale beside an explicit head size) computed
    another network once the export's config said 2 heads: 2.5 off the live sub-model, in silence (the layout's
    own check compares the live sub-model with the full model masked, which keeps the full scale). A block
    keeping the layer count as an int (MiniCPM's residual scale) exported equal, and loaded 1.1 off, as
    from_pretrained rebuilt it from the new count. Both are refused now; the same class without them (the count
    kept, unused) exports and loads equal."""
    lay = sni.register_layout(_SCALED)
    try:
        torch.manual_seed(0)
        model = _ScaledModel(_ScaledConfig(how=how)).eval()
        with torch.no_grad():  # (weights of a trained scale: at init's 0.02 the attention is near uniform, whatever
            for p in model.parameters():  # its softmax scale)
                p.normal_(0, 0.3)
        nest = sn.from_transformers(model, **{dim: [2]})
        sub = nest.smallest
        if how:
            with pytest.raises(sn.SortedNetError, match="computes other outputs than the live|derives a constant"):
                export_pretrained(nest, sub)
            return
        model.embed.weight.requires_grad_(False)  # (the comparison's rebuilt model gave it back requires_grad)
        small = export_pretrained(nest, sub)
        assert not small.embed.weight.requires_grad and small.blocks[0].up.weight.requires_grad
        small.save_pretrained(tmp_path)
        x = torch.randint(0, V, (2, 6))
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(_ScaledModel.from_pretrained(tmp_path).eval()(input_ids=x).last_hidden_state,
                                       model(input_ids=x).last_hidden_state)
    finally:
        sni.unregister_layout(lay)


def test_an_export_of_a_model_changed_after_it_was_built_is_refused():
    """A Llama whose activations were replaced after construction exported with its config, and from_pretrained
    rebuilt SiLU: another network, in silence. The class built from the config is compared with the live model."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, **TOK)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    for layer in model.model.layers:
        layer.mlp.act_fn = nn.GELU()
    nest = sn.from_transformers(model, ffn=[24])
    with pytest.raises(sn.SortedNetError, match=r"a model built from its config \(from_pretrained\) computes other "
                                                r"outputs.*a module replaced or changed after the model was built"):
        export_pretrained(nest, nest.largest)
    nest.export(nest.largest, plain=True)


def test_a_layout_given_a_string_for_a_tuple_is_refused_by_name():
    """probe="attn.qkv" (a tuple of one without its comma) was taken letter by letter: errors named 'm', 'l',
    'p' or a config key 'n'. Refused when the layout is made now; one registered twice is listed once."""
    with pytest.raises(sn.SortedNetError, match=r"probe= takes a tuple of names, got the string 'attn.qkv'; write "
                                                r"probe=\('attn.qkv',\)"):
        sni.Layout("mine", probe="attn.qkv")
    with pytest.raises(sn.SortedNetError, match=r"depth_keys= takes a tuple"):
        sni.Layout("mine", probe=("attn.qkv",), depth_keys="n_layers")
    n = len(sni.LAYOUTS)
    lay = sni.Layout("mine", probe=["attn.qkv"])
    assert lay.probe == ("attn.qkv",)
    sni.register_layout(lay)
    sni.register_layout(lay)
    assert len(sni.LAYOUTS) == n + 1
    sni.unregister_layout(lay)
    assert len(sni.LAYOUTS) == n


@pytest.mark.parametrize("kv", [2, 4])
def test_importance_sorting_permutes_a_fused_grouped_query_projection(kv):
    """Core sort_units refused a fused grouped-query q|k|v (blocks of unequal widths: [32, 16, 16]). Each block
    is permuted in its own order now: the query heads in q, whole key / value groups in k and v; the full model
    is unchanged and every sub-model's export equals its live model."""
    from sortednet.importance import sort_units

    torch.manual_seed(0)
    attn, x = _FusedGQA(KV=kv), torch.randn(2, 5, 32)
    with torch.no_grad():
        attn.qkv.weight[16:32] *= 10  # (query heads 2 and 3, the second key / value group's at kv=2: sorted first)
    nest = sn.wrap(attn, sn.Heads("heads", [2, 4], attn="", layout="stacked"), example=x)
    with torch.no_grad():
        w = attn.qkv.weight.clone()
        full = attn(x)
    heads = lambda rows: {tuple(rows[i:i + 8].flatten().tolist()) for i in range(0, len(rows), 8)}  # noqa: E731
    sort_units(nest, "l2", example=x)
    with torch.no_grad():  # (the heavy heads lead now, and the key / value heads they read moved with them)
        now = attn.qkv.weight
        assert heads(now[:16]) == heads(w[16:32])
        assert heads(now[32:32 + 8 * kv // 2]) == heads(w[32 + 8 * kv // 2:32 + 8 * kv])
    with torch.no_grad():
        torch.testing.assert_close(attn(x), full, rtol=1e-5, atol=1e-5)
        for sub in nest.submodels:
            with nest.use(sub):
                torch.testing.assert_close(nest.export(sub)(x), attn(x), rtol=1e-6, atol=1e-6)
    nest.check(x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_nest_compile_trains_like_eager(name, fresh_dynamo):
    """nest.compile() on Hugging Face models: loss and every .grad equal eager training's, for the smallest
    and a middle sub-model; fused projections (GPT-2's c_attn) stay sliced inside the graph."""
    model, kw, kind, _ = build(name)
    nest = sn.from_transformers(model, **kw)
    step = nest.compile(backend="aot_eager")
    assert step.names
    if name == "gpt2":
        assert not any(n.endswith("c_attn.weight") for n in step.names), step.names
    x = inputs(kind)
    for sub in (nest.smallest, nest.submodels[len(nest.submodels) // 2]):
        got = []
        for fn in (model, step):
            model.zero_grad(set_to_none=True)
            with nest.use(sub):
                o = fn(**x)
            loss = (o.logits if hasattr(o, "logits") else o.last_hidden_state).float().pow(2).mean()
            loss.backward()
            got.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (le, ge), (lc, gc) = got
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        assert ge.keys() <= gc.keys(), sub
        for n in gc.keys() - ge.keys():  # outputs the loss ignores (BERT's pooler): compiled graphs, like
            assert not gc[n].any(), n      # torch.compile(model), give zeros where eager leaves None
        for n in ge:
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-5, msg=f"{name} {sub} {n}")
    record(name, "nest.compile")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _unchanged(model, before, x, ref):
    state, classes = before
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert [type(m) for m in model.modules()] == classes
    assert not any("_sn" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(out(model, x), ref, atol=0, rtol=0)


REFUSED = {
    # heads whose attention is not made of separable whole heads, or crashes below full: refused by the self-check
    "xglm heads": (_c("XGLMForCausalLM", "XGLMConfig", d_model=32, num_layers=2, attention_heads=4, ffn_dim=48,
                      max_position_embeddings=32, **TOK), dict(heads=[2]), "causal", "heads=2"),
    "bloom heads (ALiBi)": (_c("BloomForCausalLM", "BloomConfig", hidden_size=32, n_layer=2, n_head=4, **TOK),
                            dict(heads=[2]), "causal", "ALiBi"),
    "olmo2 heads (q/k norm over all heads)": (
        _c("Olmo2ForCausalLM", "Olmo2Config", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, **TOK), dict(heads=[2]), "causal", "heads=2"),
    "olmoe heads (q/k norm over all heads)": (
        _c("OlmoeForCausalLM", "OlmoeConfig", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, **TOK),
        dict(heads=[2]), "causal", "heads=2"),
    # only one of two towers matches the layout
    "longt5": (_c("LongT5ForConditionalGeneration", "LongT5Config", vocab_size=V, d_model=32, d_kv=8, d_ff=48,
                  num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
               dict(ffn=[24]), "seq2seq", "encoder.block"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_what_cannot_be_nested_right_is_refused_and_left_unchanged(name):
    """Sliced correctly or refused before anything changes: never a sub-model that is silently not what its
    size says (from_transformers verifies the layout on the model itself)."""
    make, kw, kind, match = REFUSED[name]
    torch.manual_seed(0)
    model = make().eval()
    x = inputs(kind)
    with torch.no_grad():
        ref = out(model, x)
    before = _state(model)
    with pytest.raises(sn.SortedNetError, match=match):
        sn.from_transformers(model, **kw)
    _unchanged(model, before, x, ref)


def test_a_layout_described_wrongly_is_caught_by_the_self_check():
    """GPT-NeoX packs q/k/v per head; a layout that says "stacked" would slice the wrong rows. The
    self-check (sub-model vs the full model with the dropped heads masked) refuses it; verify=False
    is the user's explicit opt-out."""
    import dataclasses

    # (sni.LAYOUTS, not the module path: pytest's importlib mode, collecting layouts.py's doctests before the
    # package, can put a second copy of that module in sys.modules, whose Layout class register_layout refuses)
    neox = next(lay for lay in sni.LAYOUTS if lay.family == "gpt_neox")
    wrong = sni.register_layout(dataclasses.replace(neox, family="neox_wrong", qkv_layout="stacked"))
    try:
        model, _, kind, _ = build("gpt_neox")
        x = inputs(kind)
        with torch.no_grad():
            ref = out(model, x)
        before = _state(model)
        with pytest.raises(sn.SortedNetError, match="not the first 2 whole heads"):
            sn.from_transformers(model, heads=[2])
        _unchanged(model, before, x, ref)
        nest = sn.from_transformers(model, heads=[2], verify=False)
        assert nest._hf.layout.family == "neox_wrong"
        nest.unwrap()
    finally:
        sni.unregister_layout(wrong)
    nest = sn.from_transformers(model, heads=[2])  # the right layout passes
    assert nest._hf.layout.family == "gpt_neox"


def test_swin_stage_head_lists_are_refused_cleanly():
    torch.manual_seed(0)
    model = T.SwinModel(T.SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[2], num_heads=[4],
                                     window_size=2)).eval()
    x = {"pixel_values": torch.randn(1, 3, 16, 16)}
    with torch.no_grad():
        ref = model(**x).last_hidden_state
    before = _state(model)
    with pytest.raises(sn.SortedNetError, match="num_attention_heads"):
        sn.from_transformers(model, heads=[2])
    state, classes = before
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(**x).last_hidden_state, ref)


def test_swin_heads_by_hand_slice_the_childs_position_bias_table_with_per_head():
    """HF Swin keeps its per-head relative position bias table (positions, heads) in a child of the attention:
    Heads left it whole (a raw shape error in the first smaller forward). It is refused naming the child; with
    per_head= (sortednet serves SwinRelativePositionBias itself), every sub-model runs and equals its plain
    export, and importance sorting moves the table's columns with the heads."""
    swin = pytest.importorskip("transformers.models.swin.modeling_swin")
    table_cls = getattr(swin, "SwinRelativePositionBias", None)
    if table_cls is None or "relative_position_bias_table" not in dict(table_cls(2, (2, 2)).named_parameters()):
        pytest.skip("this transformers version keeps Swin's table on the attention itself")
    torch.manual_seed(0)
    model = T.SwinModel(T.SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                     window_size=2)).eval()
    for mod in model.modules():
        if isinstance(mod, table_cls):
            nn.init.normal_(mod.relative_position_bias_table)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    with pytest.raises(sn.PatternError, match="child 'relative_position_bias'.*per_head='relative_position_bias'"):
        sn.wrap(model, sn.Heads("h0", [1, 2], attn="encoder.layers.0.blocks.*.attention"))
    nest = sn.wrap(model, *[sn.Heads(f"h{i}", [n // 2, n], attn=f"encoder.layers.{i}.blocks.*.attention",
                                     per_head="relative_position_bias") for i, n in enumerate([2, 4])], example=x)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            live = model(pixel_values=x).last_hidden_state
        with torch.no_grad():
            torch.testing.assert_close(nest.export(sub, plain=True)(pixel_values=x).last_hidden_state, live)
    table = model.encoder.layers[1].blocks[0].attention.relative_position_bias.relative_position_bias_table
    assert table.shape[1] == 4
    before = table.detach().clone()
    order = sn.sort_units(nest, "l1", example=x)["h1@encoder.layers.1.blocks.0.attention"]
    torch.testing.assert_close(table.detach(), before[:, order])
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, ref, rtol=1e-4, atol=1e-5)


def test_depth_export_of_a_backbone_config_reloads(tmp_path):
    """Backbone configs name one stage per layer (stage_names / out_features): a depth export keeps them
    consistent, so save_pretrained -> from_pretrained works and equals the live sub-model."""
    torch.manual_seed(0)
    model = T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=48, image_size=16, patch_size=8)).eval()
    nest = sn.from_transformers(model, depth=[1, 2])
    x = {"pixel_values": torch.randn(2, 3, 16, 16)}
    for d in (1, 2):
        small = nest.export(f"depth={d}")
        assert small.config.stage_names == ["stem", *(f"stage{i}" for i in range(1, d + 1))]
        assert small.config.out_features == [f"stage{d}"]
        small.save_pretrained(tmp_path / str(d))
        back = T.Dinov2Model.from_pretrained(tmp_path / str(d)).eval()
        with torch.no_grad(), nest.use(f"depth={d}"):
            torch.testing.assert_close(back(**x).last_hidden_state, model(**x).last_hidden_state, atol=1e-5, rtol=0)


def test_the_self_check_never_refuses_for_an_input_the_full_model_cannot_run(monkeypatch):
    """When the generated input does not run the FULL model (a dtype the CPU lacks, inputs the model needs
    beyond ids), the check learns nothing about the layout and is skipped, never a false refusal."""
    import sortednet.integrations.transformers as sit

    monkeypatch.setattr(sit, "_dummy_input", lambda m: {"input_ids": torch.full((1, 3), 10**6)})  # out of vocab
    model, kw, _, _ = build("llama")
    nest = sn.from_transformers(model, **kw)
    assert nest._hf.layout.family == "llama"


def test_soft_loss_keeps_each_weight_with_its_exit_and_refuses_logit_scaling():
    model, _, _, _ = build("gpt2")
    nest = sn.from_transformers(model, depth=[1])
    ids = inputs("causal")["input_ids"]
    out = soft_loss(nest, ids, exits=[2, 1], weights=[1.0, 0.0])
    torch.testing.assert_close(out.loss, out.losses[2], atol=0, rtol=0)
    with pytest.raises(sn.SortedNetError, match="exits must be distinct"):
        soft_loss(nest, ids, exits=[2, 2], weights=[1.0, 1.0])
    torch.manual_seed(0)
    granite = T.GraniteForCausalLM(T.GraniteConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                   num_hidden_layers=2, num_attention_heads=4, logits_scaling=8.0))
    with pytest.raises(sn.SortedNetError, match="logits_scaling"):
        soft_loss(granite, ids, exits=[1, 2])


def test_sort_by_importance_refuses_a_non_finite_or_non_scalar_loss():
    model, kw, kind, _ = build("llama")
    nest = sn.from_transformers(model, ffn=kw["ffn"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = inputs(kind)
    with pytest.raises(sn.SortedNetError, match="is inf"):
        sn.sort_by_importance(nest, [good, good], loss_fn=lambda m, b: out(m, b).sum() * float("inf"))
    with pytest.raises(sn.SortedNetError, match="scalar"):
        sn.sort_by_importance(nest, [good], loss_fn=lambda m, b: out(m, b))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- exports the stock class can load, with a config that matches them everywhere ---------------------------
def test_a_heads_export_whose_config_transformers_would_not_validate_is_refused():
    """Llama validates hidden_size % heads == 0 at save_pretrained: 12 of 16 heads cannot be a stock config."""
    torch.manual_seed(0)
    m = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=16, num_key_value_heads=4, **TOK)).eval()
    nest = sn.from_transformers(m, heads=[12])
    with pytest.raises(sn.SortedNetError, match="(?s)valid LlamaConfig.*plain=True"):
        nest.export("heads=12")
    assert nest.export("heads=12", plain=True) is not None


def test_svd_rank_cost_counts_the_merged_weights_the_export_holds():
    torch.manual_seed(0)
    m = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, **TOK)).eval()
    nest = sn.from_transformers(m, depth=[1], rank=[2, 4], rank_mode="svd")
    x = torch.randint(1, V, (1, 6))
    for s in nest.submodels:
        e = nest.export(s)
        assert sum(p.numel() for p in e.parameters()) == nest.cost(s), s
        with torch.no_grad(), nest.use(s):
            torch.testing.assert_close(e(x).logits, m(x).logits, atol=1e-4, rtol=1e-4)


def test_a_backbone_is_not_nested_below_its_output_stage():
    """Dinov2Backbone returns the feature map of its last stage: a shallower sub-model would return none,
    and an export that moved the output to its own last stage would differ from it. Refused up front."""
    torch.manual_seed(0)
    cfg = T.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48,
                         image_size=16, patch_size=8)
    with pytest.raises(sn.SortedNetError, match="no feature map"):
        sn.from_transformers(T.Dinov2Backbone(cfg).eval(), depth=[2])
    m = T.Dinov2Backbone(T.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                        intermediate_size=48, image_size=16, patch_size=8, out_indices=[2])).eval()
    nest = sn.from_transformers(m, depth=[2, 3])
    x = torch.randn(1, 3, 16, 16)
    for s in nest.submodels:
        with torch.no_grad(), nest.use(s):
            live = m(pixel_values=x).feature_maps
            got = nest.export(s).eval()(pixel_values=x).feature_maps
        assert len(live) == len(got) == 1
        torch.testing.assert_close(got[0], live[0], atol=1e-5, rtol=0)


def test_an_attention_that_holds_a_copy_of_the_config_gets_the_exported_one():
    """Phi-3's attention reads its head count from its own config copy: after export it must be the model's
    config, so set_attn_implementation reaches it."""
    torch.manual_seed(0)
    m = T.Phi3ForCausalLM(T.Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, **TOK)).eval()
    nest = sn.from_transformers(m, heads=[2], depth=[1])
    e = nest.export("heads=2,depth=1").eval()
    assert e.model.layers[0].self_attn.config is e.config
    e.set_attn_implementation("eager")
    out = e(torch.randint(1, V, (1, 6)), output_attentions=True)
    assert [tuple(a.shape) for a in out.attentions] == [(1, 2, 6, 6)]


def test_a_vision_language_models_text_config_is_written_on_export(tmp_path):
    torch.manual_seed(0)
    cfg = T.Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=V,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                           spatial_merge_size=1, temporal_patch_size=1, in_channels=3))
    m = T.Qwen2VLForConditionalGeneration(cfg).eval()
    nest = sn.from_transformers(m, ffn=[0.5], depth=[1])
    x = torch.randint(1, V, (1, 6))
    e = nest.export("ffn=24,depth=1").eval()
    assert (e.config.text_config.num_hidden_layers, e.config.text_config.intermediate_size) == (1, 24)
    e.save_pretrained(tmp_path)
    back = type(e).from_pretrained(tmp_path).eval()
    with torch.no_grad(), nest.use("ffn=24,depth=1"):
        torch.testing.assert_close(back(input_ids=x).logits, m(input_ids=x).logits, atol=1e-5, rtol=0)


def test_ffn_of_experts_without_a_slicer_is_refused_clearly():
    torch.manual_seed(0)
    m = T.PhimoeForCausalLM(T.PhimoeConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, **TOK)).eval()
    with pytest.raises(sn.SortedNetError, match="PhimoeExperts, has no slicer"):
        sn.from_transformers(m, ffn=[0.5])
    nest = sn.from_transformers(m, depth=[1])
    assert nest.export("depth=1").config.num_hidden_layers == 1


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_moe_same_sizes", "olmoe"])
def test_experts_of_mixtrals_code_under_another_config_key_nest_and_export(family, tmp_path):
    """Qwen3-MoE's and OLMoE's experts run Mixtral's code (Qwen3-MoE sized by ``moe_intermediate_size``, its
    dense MLP by ``intermediate_size``): ffn= was refused for want of a slicer, and with one registered by hand
    the export wrote the layout's ``intermediate_size`` (a config of other shapes, refused). Their experts are
    sliced now, and the export writes the key that holds the experts' width: it equals the live sub-model, as
    does its reload."""
    torch.manual_seed(0)
    if family.startswith("qwen3_moe"):  # (the dense size equal to the experts' too: the experts' key written)
        dense = 16 if family.endswith("same_sizes") else 48
        m = T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(hidden_size=32, intermediate_size=dense, moe_intermediate_size=16,
                                                   num_hidden_layers=2, num_attention_heads=4, head_dim=8,
                                                   num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                                   **TOK)).eval()
        key, other = "moe_intermediate_size", None if dense == 16 else ("intermediate_size", 48)
    else:
        m = T.OlmoeForCausalLM(T.OlmoeConfig(hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                             num_experts_per_tok=2, **TOK)).eval()
        key, other = "intermediate_size", None
    nest = sn.from_transformers(m, ffn=[0.5], depth=[1])
    x = torch.randint(3, V, (2, 6))
    for sub in nest.submodels:
        e = nest.export(sub).eval()
        assert getattr(e.config, key) == sub["ffn"] and e.config.num_hidden_layers == sub["depth"]
        assert other is None or getattr(e.config, other[0]) == other[1]
        e.save_pretrained(tmp_path / str(sub))
        back = type(e).from_pretrained(tmp_path / str(sub)).eval()
        with torch.no_grad(), nest.use(sub):
            live = m(input_ids=x).logits
            torch.testing.assert_close(e(input_ids=x).logits, live, atol=1e-5, rtol=0)
            torch.testing.assert_close(back(input_ids=x).logits, live, atol=1e-5, rtol=0)


def test_soft_loss_refuses_exits_it_would_compute_wrong():
    """OPT with a projection after the final norm (word_embed_proj_dim) or without a final norm, and an MoE
    whose loss adds the router's load-balancing term: soft_loss would not match the model's own loss."""
    x = torch.randint(1, V, (2, 6))
    cases = (({"word_embed_proj_dim": 16}, "project_out"), ({"do_layer_norm_before": False}, "no final norm"))
    for kw, needle in cases:
        m = T.OPTForCausalLM(T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=32, **TOK, **kw)).eval()
        with pytest.raises(sn.SortedNetError, match=needle):
            soft_loss(sn.from_transformers(m, depth=[1]), x)
    moe = T.MixtralForCausalLM(T.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                               num_experts_per_tok=2, output_router_logits=True, **TOK)).eval()
    with pytest.raises(sn.SortedNetError, match="router"):
        soft_loss(sn.from_transformers(moe, depth=[1]), x)


def test_importance_sorting_that_would_change_the_full_model_is_undone_and_refused():
    """StableLM with qk_layernorm: one LayerNorm per head that the Llama layout does not move. The
    permuted model's outputs are compared with the original's; on a difference every permutation is
    undone (bit-exact) and SortedNetError raised. The FFN alone still sorts."""
    torch.manual_seed(0)
    model = T.StableLmForCausalLM(T.StableLmConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, qk_layernorm=True)).eval()
    with torch.no_grad():  # per-head norms that differ, as in any trained model
        for layer in model.model.layers:
            for ln in (*layer.self_attn.q_layernorm.norms, *layer.self_attn.k_layernorm.norms):
                ln.weight.uniform_(0.5, 1.5)
    x = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(1))
    nest = sn.from_transformers(model, ffn=[32], heads=[2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    def popping_loss(m, batch):  # takes the labels out of the batch, and masks tokens at random
        labels = batch.pop("labels")
        keep = torch.rand(labels.shape) < 0.8
        return m(**batch, labels=torch.where(keep, labels, -100)).loss

    for kw in ({}, {"loss_fn": lambda m, b: m(b, labels=b).loss}, {"loss_fn": popping_loss}):
        batch = {"input_ids": x, "labels": x} if kw.get("loss_fn") is popping_loss else x
        with pytest.raises(sn.SortedNetError, match="differ from the original's"):  # logits, not the loss alone
            sn.sort_by_importance(nest, [batch], **kw)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        ref = model(x).logits
    perms = sn.sort_by_importance(nest, [x], heads=False)
    with torch.no_grad():
        err = (model(x).logits - ref).abs().max() / ref.abs().max()
    assert err <= 1e-5 and any(not torch.equal(p["ffn"], torch.arange(32 * 2)) for p in perms.values())


def test_ffn_of_a_model_mixing_dense_and_expert_blocks_is_refused():
    """Qwen3-MoE with a dense first block (mlp_only_layers, first_k_dense in other families): ffn= would
    shrink that block alone, so it is refused naming the first expert block; heads / depth still nest."""
    cfg = T.Qwen3MoeConfig(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0])
    model = T.Qwen3MoeForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"block model\.layers\.1"):
        sn.from_transformers(model, ffn=[0.5], depth=[1])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("_sn" in m.__dict__ for m in model.modules())
    assert sn.from_transformers(model, depth=[1]).smallest["depth"] == 1


def test_a_config_export_cannot_rewrite_raises_a_sortedneterror_and_plain_export_still_works(monkeypatch):
    """A config whose attributes are per layer (Gemma-4's raise on a global read) cannot be rewritten for the
    smaller shapes: export says so and points to plain=True, which still exports."""
    import sortednet.integrations.transformers as tf

    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2)).eval()
    nest = sn.from_transformers(model, ffn=[32], depth=[1])
    cfg = model.config.to_dict()

    def per_layer(*a, **k):
        raise AttributeError("'intermediate_size' is a per-layer attribute")

    monkeypatch.setattr(tf, "_update_config", per_layer)
    with pytest.raises(sn.SortedNetError, match="plain=True"):
        nest.export(nest.smallest)
    assert model.config.to_dict() == cfg
    x = torch.randint(0, V, (1, 5))
    with torch.no_grad(), nest.use(nest.smallest):
        torch.testing.assert_close(nest.export(nest.smallest, plain=True)(x).logits, model(x).logits)


def test_importance_sorting_refuses_cleanly_what_it_cannot_permute_and_accepts_per_head_outputs(monkeypatch):
    """A permutation that fails midway is undone and refused; GPT-BigCode's multi-query heads (one key / value
    head, which the gpt2 layout read as one per query head: an IndexError refused) sort keeping the full model's
    output; expert blocks next to dense ones sort their heads (a nest without ffn= keeps the FFNs as they are);
    attention maps returned with output_attentions=True follow the new head order and do not refuse a correct
    sort."""
    from sortednet.integrations import importance as hf_importance

    torch.manual_seed(0)
    x = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    mqa = T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                     multi_query=True)).eval()
    moe = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=3, num_experts_per_tok=2,
        mlp_only_layers=[0], vocab_size=V)).eval()
    nest = sn.from_transformers(mqa, ffn=[64], heads=[4])
    before = {k: v.clone() for k, v in mqa.state_dict().items()}
    sort_heads, calls = hf_importance._sort_heads, []

    def fails_in_the_second_layer(*a, **kw):  # (after the first layer's FFN and heads moved)
        calls.append(1)
        if len(calls) == 2:
            raise IndexError("index out of range in self")
        return sort_heads(*a, **kw)

    monkeypatch.setattr(hf_importance, "_sort_heads", fails_in_the_second_layer)
    with pytest.raises(sn.SortedNetError, match="cannot permute this gpt2-layout model .*IndexError"):
        sn.sort_by_importance(nest, [x])
    assert len(calls) == 2 and all(torch.equal(v, before[k]) for k, v in mqa.state_dict().items())
    monkeypatch.undo()
    with torch.no_grad():
        ref = mqa(x).logits
    perms = sn.sort_by_importance(nest, [x])
    with torch.no_grad():
        assert (mqa(x).logits - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert any(not torch.equal(p["ffn"], torch.arange(128)) for p in perms.values())
    nest = sn.from_transformers(moe, heads=[2], depth=[1])  # no ffn=: its FFNs (experts beside dense) stay
    perms = sn.sort_by_importance(nest, [x])
    assert {k for layer in perms.values() for k in layer} == {"heads"}
    llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, output_attentions=True,
                                             attn_implementation="eager")).eval()
    nest = sn.from_transformers(llama, ffn=[24], heads=[2])
    with torch.no_grad():
        ref = llama(x).logits
    perms = sn.sort_by_importance(nest, [{"input_ids": x, "labels": x}])
    with torch.no_grad():
        assert (llama(x).logits - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert any(not torch.equal(p["heads"], torch.arange(4)) for p in perms.values())


def test_a_registered_family_whose_config_counts_layers_run_several_times_exports_plain_only():
    """ALBERT loops one shared layer group num_hidden_layers times: no config value describes a sub-model's
    depth, so a stock export is refused (it ran 1 layer instead of 3, silently); plain export equals live."""
    torch.manual_seed(0)
    lay = sni.register_layout(sni.Layout("albert", probe=("attention.query", "attention.dense", "ffn", "ffn_output"),
                                         ffn_out=("ffn",), ffn_inp=("ffn_output",), attn=("attention",),
                                         qkv=("query", "key", "value"), o="dense", count_attrs=()))
    try:
        model = T.AlbertModel(T.AlbertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                             num_attention_heads=4, intermediate_size=48, embedding_size=16)).eval()
        nest = sn.from_transformers(model, ffn=[24])
        x = torch.randint(3, 64, (2, 8))
        for sub in nest.submodels:
            with pytest.raises(sn.SortedNetError, match="num_hidden_layers.*plain=True"):
                nest.export(sub)
            with torch.no_grad(), nest.use(sub):
                live = model(x).last_hidden_state
            with torch.no_grad():
                got = nest.export(sub, plain=True).eval()(x).last_hidden_state
            torch.testing.assert_close(got, live, atol=1e-5, rtol=0)
    finally:
        sni.unregister_layout(lay)


def test_depth_export_of_a_config_without_the_ffn_key_keeps_its_ffn():
    """A stock Dinov2Config has no intermediate_size (its MLP width comes from mlp_ratio): depth-only exports
    need no FFN key and reload equal to the live sub-model."""
    torch.manual_seed(0)
    model = T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=16,
                                         patch_size=8)).eval()
    nest = sn.from_transformers(model, depth=[1, 2])
    x = torch.randn(2, 3, 16, 16)
    for sub in nest.submodels:
        small = nest.export(sub).eval()
        assert small.config.num_hidden_layers == sub["depth"]
        with torch.no_grad(), nest.use(sub):
            live = model(pixel_values=x).last_hidden_state
        with torch.no_grad():
            torch.testing.assert_close(small(pixel_values=x).last_hidden_state, live, atol=1e-5, rtol=0)


def test_a_vision_config_without_image_size_is_still_self_checked():
    """A one-stage Segformer has no image_size: the self-check runs on a 32x32 input anyway, and refuses the
    FFN width its Mix-FFN depthwise convolution cannot follow (it was accepted, then failed raw under use)."""
    torch.manual_seed(0)
    model = T.SegformerModel(T.SegformerConfig(num_encoder_blocks=1, depths=[2], sr_ratios=[2], hidden_sizes=[32],
                                               num_attention_heads=[4], patch_sizes=[7], strides=[4],
                                               mlp_ratios=[2])).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match="ffn=32.*fails on a small input"):
        sn.from_transformers(model, ffn=[32])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("_sn" in m.__dict__ for m in model.modules())


_GEMMA3N_VOCAB = 61


def _gemma3n():
    """A tiny Gemma3n whose last 2 of 4 layers reuse earlier layers' keys and values (no k_proj / v_proj)."""
    V = _GEMMA3N_VOCAB
    return T.Gemma3nForCausalLM(T.Gemma3nTextConfig(
        vocab_size=V, vocab_size_per_layer_input=V, hidden_size=32, hidden_size_per_layer_input=8,
        intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_kv_shared_layers=2, sliding_window=4, laurel_rank=4, altup_num_inputs=2,
        layer_types=["sliding_attention", "full_attention"] * 2, activation_sparsity_pattern=[0.0] * 4,
        pad_token_id=0)).eval()


def test_generate_with_layers_that_share_another_layers_cache():
    """Gemma3n's last ``num_kv_shared_layers`` layers reuse earlier layers' keys and values: their cache entry
    holds none (no ``get_seq_length``), and the cache check raised a raw AttributeError, so once nested with a
    depth not even the full model could generate. Each depth now generates as its plain export does."""
    if getattr(T, "Gemma3nForCausalLM", None) is None:
        pytest.skip("this transformers has no Gemma3n")
    torch.manual_seed(0)
    V, model = _GEMMA3N_VOCAB, _gemma3n()
    ids = torch.randint(1, V, (1, 4), generator=torch.Generator().manual_seed(1))
    want = model.generate(ids, max_new_tokens=5, do_sample=False)
    nest = sn.from_transformers(model, depth=[2, 3])
    with nest.use(nest.largest):
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want)
    for sub in ("depth=2", "depth=3"):
        plain = nest.export(sub, plain=True).eval()
        with nest.use(sub):
            assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False),
                               plain.generate(ids, max_new_tokens=5, do_sample=False)), sub


@pytest.mark.parametrize("build", [
    _c("GPTBigCodeForCausalLM", "GPTBigCodeConfig", n_embd=32, n_layer=2, n_head=4, n_positions=32, multi_query=True,
       **TOK),
    _c("FalconForCausalLM", "FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
       multi_query=True, new_decoder_architecture=False, **TOK),
    _c("Phi3ForCausalLM", "Phi3Config", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
       num_attention_heads=4, num_key_value_heads=1, **TOK),
], ids=["gpt_bigcode", "falcon", "phi3"])
def test_fused_multi_query_projections_refuse_fewer_heads_saying_why(build):
    """One fused q/k/v projection holding ONE key/value head that every query head reads: fewer heads were
    refused as 'grouped-query attention with 1 key/value heads needs sizes that are multiples of 4', which
    reads as a grouping rule; the refusal names the fused projection and the full count, changing nothing.
    The full count alone still nests."""
    torch.manual_seed(0)
    model = build().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with pytest.raises(sn.SizeError, match=r"fused multi-query projection .* ONE key/value head .*bad: \[2\]"):
        sn.from_transformers(model, heads=[2, 4])
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    nest = sn.from_transformers(model, heads=[4], depth=[1, 2])
    assert [s["depth"] for s in nest.submodels] == [1, 2]


def test_heads_over_layers_whose_attention_differs_say_why():
    """Gemma3n's key/value-sharing layers have no k_proj / v_proj: heads= was refused with only "has no child
    'k_proj'". The refusal says the matched attentions differ and what to do, changing nothing."""
    model = _gemma3n()  # (every transformers >= 5.0, which the extra requires, has Gemma3n)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"has no child 'k_proj'.*attentions that .* matches differ .*nest "
                                                r"without heads"):
        sn.from_transformers(model, heads=[2, 4])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("_sn" in m.__dict__ for m in model.modules())
    with pytest.raises(sn.SortedNetError, match=r"has no child 'query' \(children: \[[^]]*\]\)$"):  # (a name no
        sn.wrap(model, sn.Heads("h", [2, 4], attn="model.layers.*.self_attn", qkv=("query", "k_proj", "v_proj")))
    #                                                             attention has: not said to differ between them)


def test_a_vision_language_model_whose_towers_differ_points_at_its_language_model():
    """Gemma-3's vision tower holds a layer list of another kind: the refusal named register_layout and sn.wrap
    only; it names the sub-module to nest alone, which then nests and exports."""
    cfg = T.Gemma3Config(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = T.Gemma3ForConditionalGeneration(cfg).eval()
    with pytest.raises(sn.SortedNetError, match=r"sn.from_transformers\(model.get_submodule\('([\w.]+)'\)") as e:
        sn.from_transformers(model, ffn=[32, 64])
    lm = model.get_submodule(re.search(r"get_submodule\('([\w.]+)'\)", str(e.value)).group(1))
    nest = sn.from_transformers(lm, ffn=[32, 64])
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad(), nest.use("ffn=32"):
        torch.testing.assert_close(lm(input_ids=ids).last_hidden_state,
                                   nest.export("ffn=32")(input_ids=ids).last_hidden_state)


def test_the_suggested_part_holds_every_stack_of_its_layout():
    """A T5 (encoder and decoder stacks) beside a tower with a list of another kind: the suggestion named the
    encoder alone ('lm.encoder'), dropping the decoder; it names the module holding both."""

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.ModuleList([nn.Linear(4, 4)])

    class WithTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = Tower()
            self.lm = T.T5ForConditionalGeneration(T.T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64,
                                                              num_layers=2, num_heads=4))

    model = WithTower()
    with pytest.raises(sn.SortedNetError, match=r"from_transformers\(model.get_submodule\('lm'\)"):
        sn.from_transformers(model, ffn=[32, 64])
    nest = sn.from_transformers(model.lm, ffn=[32, 64])
    assert any(p.startswith("decoder.") for p in nest._sliced) and any(p.startswith("encoder.") for p in nest._sliced)


def test_an_export_of_a_model_that_draws_in_eval_mode_is_compared_under_one_random_stream():
    """ViTMAE draws its masking noise at every forward, eval mode too: the export check ran the live model and
    the export on two draws and refused every export, blaming a rewritten config value."""
    torch.manual_seed(0)
    m = T.ViTMAEModel(T.ViTMAEConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                     image_size=16, patch_size=4, num_channels=3, mask_ratio=0.0)).eval()
    nest = sn.from_transformers(m, ffn=[0.5])
    small = nest.export(nest.smallest).eval()
    assert small.config.intermediate_size == 32
    px, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad(), nest.use(nest.smallest):
        live = m(pixel_values=px, noise=noise).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(small(pixel_values=px, noise=noise).last_hidden_state, live)


def test_an_unknown_family_is_refused_naming_its_own_layer_list_and_linear_layers():
    m = T.DebertaV2Model(T.DebertaV2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64))
    with pytest.raises(sn.SortedNetError, match=r"(?s)does not know the layout.*layer list is 'encoder.layer'.*"
                                                r"'intermediate.dense', 'output.dense'\]"):
        sn.from_transformers(m, ffn=[0.5])



def test_the_unknown_family_hint_names_the_outermost_of_equally_long_layer_lists():
    m = T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_channels=3,
                                         image_size=16))
    with pytest.raises(sn.SortedNetError, match=r"layer list is 'encoder.stages'"):
        sn.from_transformers(m, ffn=[0.5])

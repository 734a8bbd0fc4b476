"""Hugging Face transformers integration: invariants over tiny BERT / GPT-2 / Llama-family models.

Every model is built from a small config in the test (no downloads).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import json
import os
import subprocess
import sys
import warnings

import pytest

transformers = pytest.importorskip("transformers")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainingArguments,
)
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402

import sortednet as sn  # noqa: E402
from sortednet.integrations import SortedTrainer, SubModelCallback, export_pretrained, soft_loss  # noqa: E402
from sortednet.integrations.trainer import make_sampler  # noqa: E402
from sortednet.integrations.transformers import _resolve  # noqa: E402

V = 61
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def bert():
    return BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=32))


def bert_cls():
    return BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=48, num_labels=3))


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def llama():  # grouped-query attention: 4 query heads, 2 key/value heads
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0))


def qwen2():  # Llama layout with q/k/v biases and per-layer layer_types
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=1, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0))


# (builder, from_transformers kwargs, causal LM?, stock class loads heads-sliced exports?)
FAMILIES = {
    "bert": (bert, dict(ffn=[12, 0.5], heads=[1, 2], depth=[1, 2]), False, False),
    "bert_cls": (bert_cls, dict(ffn=[0.25], heads=[2], depth=[1]), False, False),
    "gpt2": (gpt2, dict(ffn=[32, 64], heads=[2], depth=[2]), True, False),
    "llama": (llama, dict(ffn=[0.5], heads=[2], depth=[2, 3]), True, True),
    "qwen2": (qwen2, dict(ffn=[16], heads=[0.5], depth=[1]), True, True),
    "llama_lora": (llama, dict(ffn=[0.5], depth=[2], rank=[2, 4]), True, True),
    "bert_svd": (bert, dict(heads=[2], rank=[4, 32], rank_mode="svd"), False, False),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    make, kw, causal, loads = FAMILIES[name]
    model = make().eval()
    with torch.no_grad():  # non-trivial LayerNorm / RMSNorm weights, so a wrong slice cannot hide
        for n, p in model.named_parameters():
            if "norm" in n.lower() and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model, kw, causal, loads


def ids(seed=1, b=2, t=9):
    return torch.randint(1, V, (b, t), generator=torch.Generator().manual_seed(seed))


def out(model, x):
    o = model(input_ids=x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("name", FAMILIES)
def test_largest_is_original_and_every_export_matches_live(name):
    model, kw, _, _ = build(name)
    x = ids()
    with torch.no_grad():
        ref = out(model, x)
        nest = sn.from_transformers(model, **kw)
        assert torch.equal(out(model, x), ref) or "rank" in kw  # svd factors: equal up to rounding
        torch.testing.assert_close(out(model, x), ref, atol=1e-5, rtol=0)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # adapters start at zero; make every rank matter
                p.normal_(0, 0.1)
        ref = out(model, x)
        for sub in nest.submodels:
            with nest.use(sub):
                live = out(model, x)
            small = nest.export(sub, plain=True)
            assert sum(p.numel() for p in small.parameters()) == nest.cost(sub, "params")
            torch.testing.assert_close(out(small, x), live, atol=1e-5, rtol=0)
        assert torch.equal(out(model, x), ref)  # export leaves the nest untouched


@pytest.mark.parametrize("name", FAMILIES)
def test_export_pretrained_roundtrip_or_clear_refusal(name, tmp_path):
    model, kw, _, loads = build(name)
    nest = sn.from_transformers(model, **kw)
    x = ids()
    n_heads, n_layers = model.config.num_attention_heads, model.config.num_hidden_layers
    for sub in (nest.smallest, nest.resolve({"heads": n_heads} if "heads" in kw else {}), nest.largest):
        if not loads and sub.get("heads", n_heads) < n_heads:
            with pytest.raises(sn.SortedNetError, match="plain module"):
                export_pretrained(nest, sub)
            continue
        small = export_pretrained(nest, sub)
        small.save_pretrained(tmp_path / str(sub))
        back = type(model).from_pretrained(tmp_path / str(sub)).eval()
        assert back.config.num_hidden_layers == sub.get("depth", n_layers)
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(out(back, x), out(model, x), atol=1e-5, rtol=0)


def test_import_sortednet_imports_transformers_only_on_first_use():
    """(save_pretrained -> from_pretrained in a fresh process: tests/test_transformers_families.py.)"""
    code = ("import sys, sortednet as sn\nassert 'transformers' not in sys.modules\n"
            "sn.from_transformers\nassert 'transformers' in sys.modules")
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]



_FRESH_GPT2 = """
import sys, torch, transformers as T, sortednet as sn
torch.manual_seed(0)
cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=50)
model = T.GPT2LMHeadModel(cfg).eval()
assert "sortednet.integrations" not in sys.modules
if sys.argv[1] == "load":
    nest = sn.load(model, sys.argv[2])
else:
    nest = sn.wrap(model, sn.Width("ffn", [32, 128], out="re:transformer\\.h\\.\\d+\\.mlp\\.c_fc",
                                   inp="re:transformer\\.h\\.\\d+\\.mlp\\.c_proj"))
x = torch.randint(0, 50, (2, 8))
small = nest.export(nest.smallest, plain=True)
with torch.no_grad(), nest.use(nest.smallest):
    assert torch.equal(model(x).logits, small(x).logits)
print(nest.submodels)
"""


@pytest.mark.parametrize("how", ["load", "wrap"])
def test_gpt2_conv1d_wraps_and_loads_without_importing_the_integrations_first(how, tmp_path):
    """A fresh process that imports only ``sortednet``: GPT-2's ``Conv1D`` gets its slicer on first sight."""
    ckpt = tmp_path / "g.safetensors"
    sn.save(sn.from_transformers(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                                             vocab_size=50)), ffn=[32]), ckpt)
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", _FRESH_GPT2, how, str(ckpt)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ffn=32" in proc.stdout

@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_generate_live_equals_export(name):
    model, kw, _, loads = build(name)
    nest = sn.from_transformers(model, **kw)
    prompt = ids(b=1, t=4)
    for sub in (nest.smallest, nest.submodels[len(nest.submodels) // 2]):
        with torch.no_grad(), nest.use(sub):
            live = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
            uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(live, uncached)  # the KV cache of a depth/heads-sliced sub-model is right
        small = export_pretrained(nest, sub) if loads else nest.export(sub, plain=True)
        assert torch.equal(small.generate(prompt, max_new_tokens=6, do_sample=False), live)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_soft_loss_is_mean_of_separate_exit_losses(name, weights):
    model, _, _, _ = build(name)
    nest = sn.from_transformers(model, ffn=[16, 48 if name == "llama" else 128], depth=[1, 2, 4])
    x = ids(seed=3)
    for ffn in nest.dims[0].sizes:
        with nest.use({"ffn": ffn}):
            got = soft_loss(nest, x, weights=weights)
        sep = {}
        for d in (1, 2, 4):
            with nest.use({"ffn": ffn, "depth": d}):
                sep[d] = model(input_ids=x, labels=x).loss
        w = weights or [1.0, 1.0, 1.0]
        want = sum(wi * sep[d] for wi, d in zip(w, (1, 2, 4))) / sum(w)
        for d in sep:
            torch.testing.assert_close(got.losses[d], sep[d], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.loss, want, atol=1e-5, rtol=1e-5)
    got.loss.backward()  # one graph through every exit
    assert model.get_output_embeddings().weight.grad is not None


def test_soft_loss_names_the_input_ids_when_they_stand_for_the_labels():
    """One-dimensional input_ids without labels= were refused as 'labels must be token ids of shape (batch,
    length)': no labels were given; the input_ids (the labels then) are named. Weights for the default exits
    under a shallower sub-model (the exits past its depth left out) were refused naming exits never given."""
    nest = sn.from_transformers(build("llama")[0], depth=[1, 2])
    with pytest.raises(sn.SortedNetError, match=r"input_ids \(the labels when none are given\) must be token ids"):
        soft_loss(nest, torch.randint(0, V, (6,)))
    with pytest.raises(sn.SortedNetError, match=r"soft_loss: labels must be token ids"):
        soft_loss(nest, ids(), labels=torch.randint(0, V, (6,)))
    with nest.use("depth=1"), pytest.raises(sn.SortedNetError, match=r"default exits, the Depth's sizes, stop at the "
                                                                      r"active depth 1: \[2, 4\] are past it"):
        soft_loss(nest, ids(), weights=[1.0, 2.0])  # (weights for every exit, under a shallower sub-model)


def test_soft_loss_stopped_by_a_ctrl_c_anywhere_leaves_no_exit_hook():
    """A Ctrl-C as soft_loss registers its exit hooks (before a handle was kept) left a hook that stopped every
    later forward of the model with a bare internal exception."""
    from models import interrupted_between_bytecodes
    from sortednet.integrations.soft import soft_loss as soft

    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, ffn=[16, 48], depth=[1, 2, 4])
    x = ids(seed=3)
    hooks = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    before = hooks()
    with torch.no_grad():
        want = model(input_ids=x).logits
    n, fired = 0, True
    while fired:
        n += 1
        fired = interrupted_between_bytecodes(n, lambda: soft(nest, x), soft)
        assert hooks() == before, f"point {n}: {hooks() - before} exit hooks left"
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=x).logits, want, msg=f"point {n}")
    assert n > 10


class _ScaledLogits(transformers.LlamaForCausalLM):
    """Does more after its head than final norm -> LM head (Inkling divides by a width multiplier and cuts its
    padded vocabulary; no list of config names foresees every such model)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.config.how == "scale":
            out.logits = out.logits / 24.0
        elif self.config.how == "cut":
            out.logits = out.logits[..., :-4]
        elif self.config.how == "mask":  # (Chameleon masks its image tokens in place after the head)
            out.logits[..., -4:] = torch.finfo(out.logits.dtype).min
        return out


@pytest.mark.parametrize("how", ["scale", "cut", "mask", "none"])
def test_soft_loss_refuses_a_model_whose_logits_are_not_norm_then_head(how):
    """soft_loss accepted Inkling (logits / 24, vocabulary cut to its unpadded size): every exit's loss was
    another objective than the model's own (4.706 against 4.646), at full depth too, in silence; so did Chameleon,
    which masks its image tokens in the head's output in place (the check compared that tensor with itself)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2)
    cfg.how = how
    model = _ScaledLogits(cfg)
    nest = sn.from_transformers(model, depth=[2, 4])
    x = ids(seed=3) % 60
    modes = [m.training for m in model.modules()]
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    if how == "none":
        got = soft_loss(nest, x)
        for d in (2, 4):
            with nest.use({"depth": d}):
                torch.testing.assert_close(got.losses[d], model(input_ids=x, labels=x).loss)
    else:
        with pytest.raises(sn.SortedNetError, match="cuts or pads its vocabulary" if how == "cut" else
                           r"writes its LM head's output in place" if how == "mask" else
                           r"does more between its LM head and its logits"):
            soft_loss(nest, x)
        cfg.how = "none"                               # a config value changed: verified again, then accepted
        soft_loss(nest, x)
    assert [m.training for m in model.modules()] == modes
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks


def test_soft_loss_checks_a_model_first_met_under_inference_mode():
    """The check that the head's output is not written in place read tensors' version counters, which inference
    tensors do not keep: a first soft_loss call under torch.inference_mode() (an evaluation loop) was refused."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    nest = sn.from_transformers(model, depth=[2, 4])
    x = ids(seed=3) % 60
    with torch.inference_mode():
        got = soft_loss(nest, x)
    with torch.no_grad(), nest.use({"depth": 2}):
        torch.testing.assert_close(got.losses[2], model(input_ids=x, labels=x).loss)


class _DictLogits(transformers.LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        return {"logits": super().forward(*args, **kwargs).logits}


def test_soft_loss_check_of_the_logits_holds_under_mixed_precision_training_mode_and_dict_outputs():
    """The check of the models' logits (regression): accelerate's mixed precision wraps ``forward`` in autocast,
    so the model's logits were bf16 and a reading recomputed outside it fp32 (0.002 off, refused at the first
    step of SortedTrainer(bf16=True)); a forward returning a dict was refused. The tensors compared now come
    from the model's own forward; its training mode, random streams and hooks stay as they were."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3)
    for make in (transformers.LlamaForCausalLM, _DictLogits):
        model = make(cfg).train()
        if make is transformers.LlamaForCausalLM:
            model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
        nest = sn.from_transformers(model, depth=[2, 4])
        x = ids(seed=3) % 60
        rng = torch.get_rng_state()
        first = soft_loss(nest, x)                       # checks the model's logits first
        torch.set_rng_state(rng)
        again = soft_loss(nest, x)                       # (checked already) the same dropout masks: the check's
        torch.testing.assert_close(first.loss, again.loss, rtol=0, atol=0)   # forward drew from its own stream
        assert first.loss.item() != soft_loss(nest, x).loss.item()            # (the dropout is drawn)
        first.loss.backward()
        assert all(m.training for m in model.modules())


def test_soft_loss_rejects_bad_exits():
    model, _, _, _ = build("gpt2")
    for exits in ([0], [5], [], [2.5], 2, "12"):  # (a lone number: a raw TypeError)
        with pytest.raises(sn.SortedNetError, match="exits"):
            soft_loss(model, ids(), exits=exits)
    with pytest.raises(sn.SortedNetError, match="weights must be a list"):
        soft_loss(model, ids(), exits=[1, 2], weights=1.0)
    with pytest.raises(sn.SortedNetError, match="weight"):
        soft_loss(model, ids(), exits=[1, 2], weights=[1.0])
    for weights in ([float("nan"), 1.0], [float("inf"), 1.0], ["1", "2"], [True, 1]):  # (a NaN loss, a raw
        with pytest.raises(sn.SortedNetError, match="weights"):                    # TypeError, accepted)
            soft_loss(model, ids(), exits=[1, 2], weights=weights)
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))
    with pytest.raises(sn.SortedNetError, match="softcapping"):
        soft_loss(gemma, ids())


def test_soft_loss_divides_by_num_items_in_batch_and_takes_exits_of_any_integer_kind(tmp_path):
    """``num_items_in_batch`` went to the base model, which takes any keyword and dropped it: the exits' loss was
    the mean (4.23) where the model's own loss is the sum over it (1.18). Exits as a tensor (refused with a range
    error), depths as numpy ints in SortedTrainer (refused as "depths >= 1"), and an encoder-decoder told it has
    no final norm nor LM head."""
    import numpy as np

    model, _, _, _ = build("llama")
    model.eval()
    x = ids(b=2)
    labels = x.clone()
    labels[:, :3] = -100
    n = torch.tensor(50)
    with torch.no_grad():
        want = model(input_ids=x, labels=labels, num_items_in_batch=n).loss
        got = soft_loss(model, x, labels=labels, exits=torch.tensor([2, 4]), num_items_in_batch=n)
        plain = soft_loss(model, x, labels=labels, exits=[4])
    torch.testing.assert_close(got.losses[4], want)
    torch.testing.assert_close(got.losses[4] * n, plain.loss * int((labels[:, 1:] != -100).sum()))
    for bad in (0, -3, 2.5, torch.tensor([1, 2]), "50"):
        with pytest.raises(sn.SortedNetError, match="num_items_in_batch is the count of tokens"):
            soft_loss(model, x, num_items_in_batch=bad)
    nest = sn.from_transformers(model, depth=[2, 4])
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = SortedTrainer(model=model, args=args, train_dataset=[{"input_ids": x[0], "labels": x[0]}], nest=nest,
                            soft_exits=list(np.array([2, 4])))
    assert trainer.soft_exits == [2, 4] and all(type(e) is int for e in trainer.soft_exits)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0))
    with pytest.raises(sn.SortedNetError, match=r"causal \(decoder-only\) LM.*is none"):
        soft_loss(t5, ids())


@pytest.mark.parametrize("arch", ["Mistral", "Qwen3", "Gemma2"])
def test_other_llama_layout_models_roundtrip(arch, tmp_path):
    """Models sharing the Llama layout (with sliding windows, q/k norms, layer_types) nest and reload."""
    torch.manual_seed(0)
    cls = getattr(transformers, f"{arch}ForCausalLM")
    cfg = getattr(transformers, f"{arch}Config")(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=8, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = cls(cfg).eval()
    x = ids()
    with torch.no_grad():
        ref = out(model, x)
        nest = sn.from_transformers(model, ffn=[0.5], heads=[2], depth=[2])
        assert torch.equal(out(model, x), ref)
        with nest.use(nest.smallest):
            live, gen = out(model, x), model.generate(x[:1, :4], max_new_tokens=4, do_sample=False)
        export_pretrained(nest, nest.smallest).save_pretrained(tmp_path)
        back = cls.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(out(back, x), live, atol=1e-5, rtol=0)
        assert torch.equal(back.generate(x[:1, :4], max_new_tokens=4, do_sample=False), gen)


@pytest.mark.parametrize("name", ["bert_cls", "gpt2", "llama", "qwen2"])
def test_importance_sorting_preserves_function_and_reorders(name):
    model, kw, causal, _ = build(name)
    nest = sn.from_transformers(model, **kw)
    torch.manual_seed(5)
    with torch.no_grad():  # break the symmetry of a fresh init so importance differs by unit
        for p in model.parameters():
            p.mul_(1 + torch.rand_like(p))
    x = ids(seed=4, b=4)
    batches = [x] if causal else [{"input_ids": x, "labels": torch.tensor([0, 1, 2, 1])}]
    with torch.no_grad():
        ref = out(model, x)
        with nest.use(nest.smallest):
            small_before = out(model, x)
    perms = sn.sort_by_importance(nest, batches)
    with torch.no_grad():
        torch.testing.assert_close(out(model, x), ref, atol=1e-5, rtol=1e-5)
        with nest.use(nest.smallest):
            assert not torch.allclose(out(model, x), small_before)
    ident = [torch.equal(p, torch.arange(len(p))) for layer in perms.values() for p in layer.values()]
    assert not all(ident)
    assert all(p.grad is None for p in model.parameters())  # grads restored as they were


@pytest.mark.parametrize("shared", ["a layer reused", "key/value projections shared", "gpt2 attention shared"])
def test_sort_by_importance_refuses_modules_two_layers_hold(shared):
    """A layer held at two places of the layer list (MobileLLM / ALBERT-style reuse), or projections shared across
    layers: each layer was sorted on its own, so a shared module got one order applied on top of another (the
    returned order was not the one applied: a heads=2 sub-model kept the least important head) in silence, or the
    sort was refused as "per-head weights this layout does not move". Refused by name before anything changes;
    sort_units sorts such a model with one order for the shared modules."""
    from sortednet.importance import sort_units

    model, _, _, _ = build("gpt2" if shared.startswith("gpt2") else "llama")
    if shared == "a layer reused":
        model.model.layers[1] = model.model.layers[0]
    elif shared == "key/value projections shared":
        a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
        a1.k_proj, a1.v_proj = a0.k_proj, a0.v_proj
    else:
        model.transformer.h[1].attn = model.transformer.h[0].attn
    nest = sn.from_transformers(model, heads=[2], **({} if shared.startswith("key") else {"ffn": [16]}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"orders each layer on its own, but '.*\.1' and '.*\.0' hold the "
                                                r"same .*Nothing was changed"):
        sn.sort_by_importance(nest, [ids(seed=7, b=4)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = ids(seed=3)
    with torch.no_grad():
        ref = out(model, x)
    sort_units(nest, "l1", example=x)
    with torch.no_grad():
        torch.testing.assert_close(out(model, x), ref, atol=1e-5, rtol=1e-5)


def test_sort_by_importance_inside_inference_mode_is_refused_by_name():
    model, kw, _, _ = build("gpt2")
    nest = sn.from_transformers(model, **kw)
    with torch.inference_mode(), pytest.raises(sn.SortedNetError, match=r"inside torch.inference_mode\(\)"):
        sn.sort_by_importance(nest, [ids(seed=7, b=4)])


def test_importance_sorting_puts_important_heads_first():
    """A head whose output projection is scaled up is the most important one after sorting."""
    model, kw, _, _ = build("gpt2")
    nest = sn.from_transformers(model, heads=[1, 2])
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight[24:32] *= 50  # head 3 of layer 0
    perms = sn.sort_by_importance(nest, [ids(seed=7, b=4)])
    assert perms["transformer.h.0"]["heads"][0].item() == 3


def test_sort_by_importance_sorts_only_the_units_the_nest_nests():
    """A nest without ffn= had its FFN neurons permuted too (the user's checkpoint reordered for nothing), and a
    mixed MoE family whose layout has no FFN projections was refused unless ffn=False was passed."""
    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, heads=[2])
    with torch.no_grad():  # break the symmetry of a fresh init so importance differs by unit
        for p in model.parameters():
            p.mul_(1 + torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ffn_before = {k: v.clone() for k, v in model.state_dict().items() if ".mlp." in k}
    perms = sn.sort_by_importance(nest, [ids(seed=7, b=4)])
    assert {k for layer in perms.values() for k in layer} == {"heads"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ffn_before.items())
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=V, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                         shared_expert_intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
    cfg._experts_implementation = "eager"
    moe = Qwen2MoeForCausalLM(cfg).eval()
    nest = sn.from_transformers(moe, heads=[3], depth=[2])
    x = ids(seed=3, b=2)
    with torch.no_grad():
        ref = moe(x).logits
    perms = sn.sort_by_importance(nest, [x])
    assert {k for layer in perms.values() for k in layer} == {"heads"}
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, ref, atol=1e-5, rtol=1e-5)
    # a width over the residual stream reads / writes the FFN projections on their other sides: not the FFN's
    bert = BertModel(BertConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4), add_pooling_layer=False).eval()
    L = "encoder.layer.*."
    nest = sn.wrap(bert, sn.Heads("h", [2, 4], attn=L + "attention", qkv=("self.query", "self.key", "self.value"),
                                  o="output.dense"),
                   sn.Width("d", [16, 32], out=["embeddings.*_embeddings", L + "attention.output.dense",
                                                L + "output.dense"],
                            inp=[L + "attention.self.query", L + "attention.self.key", L + "attention.self.value",
                                 L + "intermediate.dense"],
                            norm=["embeddings.LayerNorm", L + "attention.output.LayerNorm", L + "output.LayerNorm"]))
    before = bert.encoder.layer[0].intermediate.dense._parameters["weight"].clone()
    perms = sn.sort_by_importance(nest, [x], loss_fn=lambda m, b: m(input_ids=b).last_hidden_state.pow(2).mean())
    assert {k for layer in perms.values() for k in layer} == {"heads"}
    assert torch.equal(before, bert.encoder.layer[0].intermediate.dense._parameters["weight"])
    # a hand-built width over the FFN neurons, by any name, is the FFN's nesting
    model, _, _, _ = build("gpt2")
    nest = sn.wrap(model, sn.Width("mlp", [64, 128], out="transformer.h.*.mlp.c_fc", inp="transformer.h.*.mlp.c_proj"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    before = model.transformer.h[0].mlp.c_fc._parameters["weight"].clone()
    perms = sn.sort_by_importance(nest, [ids(seed=7, b=4)])
    assert {k for layer in perms.values() for k in layer} == {"ffn"}
    assert not torch.equal(before, model.transformer.h[0].mlp.c_fc._parameters["weight"])


def test_sort_by_importance_checks_the_model_itself_when_the_loss_cannot_be_compared(monkeypatch):
    """A ``loss_fn`` that calls the user's model in training mode and samples gives another loss at every call:
    the before / after comparison was skipped, and a permutation that missed the output projection's columns
    (injected here) changed the full model's logits with no word. The model's own output on the batch is now
    compared too; a batch that is not the model's input, with such a loss, gets a warning."""
    import sortednet.integrations.importance as imp

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3))
    nest = sn.from_transformers(model, ffn=[16], heads=[2])
    x = ids(seed=3, b=2)

    g = torch.Generator().manual_seed(0)  # a stream of its own: torch's seeded one does not reach it

    def noisy(view, batch):
        b = batch["ids"] if isinstance(batch, dict) else batch
        model.train()
        try:
            return model(input_ids=b, labels=b).loss * (1 + 0.1 * torch.rand((), generator=g))
        finally:
            model.eval()

    real = imp._permute

    def misses_o_proj(m, role, idx, *args, **kwargs):
        if role == "inp" and m in [blk.self_attn.o_proj for blk in model.model.layers]:
            return set()
        return real(m, role, idx, *args, **kwargs)

    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with monkeypatch.context() as mp:
        mp.setattr(imp, "_permute", misses_o_proj)
        with pytest.raises(sn.SortedNetError, match="outputs differ from the original's"):
            sn.sort_by_importance(nest, [x], loss_fn=noisy, ffn=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="the sort is not verified"):
        sn.sort_by_importance(nest, [{"ids": x}], loss_fn=noisy, ffn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sn.sort_by_importance(nest, [x], loss_fn=noisy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match="loss of batch 0 carries no gradient"):  # (was a raw RuntimeError)
        sn.sort_by_importance(nest, [x], loss_fn=lambda view, b: view(input_ids=b, labels=b).loss.detach())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("soft", [False, True])
def test_trainer_same_submodels_for_all_micro_batches(soft, tmp_path):
    model, _, _, _ = build("llama")
    model.train()
    nest = sn.from_transformers(model, ffn=[16, 32], heads=[2], depth=[2])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(16)]
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             logging_strategy="no", seed=0)
    before = model.lm_head.weight.detach().clone()
    subs = [s for s in nest.submodels if s["depth"] == 4] if soft else nest.submodels  # (SoFT: at the deepest exit)
    sampler = sn.Sampler(subs, k=1, strategy="uniform", seed=3)
    trainer = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, sampler=sampler,
                            soft_exits=[2, 4] if soft else None)
    trainer.train()
    steps = [s for s, _ in trainer.history]
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3]
    by_step = {}
    for s, subs in trainer.history:
        assert by_step.setdefault(s, subs) == subs
        assert list(subs) == sampler.draw(s)
    assert len(set(by_step.values())) > 1  # different steps train different sub-models
    assert not torch.equal(model.lm_head.weight, before)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("nonfinite", ["raise", "ignore"])
def test_trainer_stops_before_a_non_finite_loss_spreads_into_the_shared_weights(nonfinite, soft, tmp_path):
    """One sub-model's NaN loss was backpropagated into every shared weight, and transformers' default
    logging_nan_inf_filter logged those steps as 0.0: the whole nest ended NaN with nothing said. Refused now
    before the optimizer step, naming the sub-model; nonfinite='ignore' as Trainer. A NaN loss with finite
    gradients (a classification batch without a labelled item: 0 / 0, gradient 0) trains on."""
    model, _, _, _ = build("llama")
    model.train()
    nest = sn.from_transformers(model, ffn=[16], depth=[2])
    poison = nest.smallest if not soft else nest.smallest.replace(depth=4)
    model.model.layers[0].mlp.register_forward_hook(
        lambda mod, a, out: out * float("nan") if nest.active == poison else out)
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(4)]
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no",
                             seed=0, optim="sgd")
    subs = [s for s in nest.submodels if s["depth"] == 4] if soft else nest.submodels
    trainer = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, nonfinite=nonfinite,
                            sampler=sn.Sampler(subs, k=len(subs), seed=0), soft_exits=[2, 4] if soft else None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if nonfinite == "raise":
        with pytest.raises(sn.SortedNetError, match=f"step 0 .*left non-finite gradients; on this rank the loss of "
                                                    f"{poison} was nan"):
            trainer.train()
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    else:
        trainer.train()
        assert not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with pytest.raises(sn.SortedNetError, match="nonfinite=.*'raise' or 'ignore'"):
        SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, nonfinite="skip")
    if nonfinite == "raise":  # fp16's gradient scaler skips an overflowing step itself: no check there
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
        trainer._check_gradients()
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=48, num_labels=3))
    bert_nest = sn.from_transformers(bert, ffn=[24])
    unlabelled = [{"input_ids": ids(seed=i, b=1)[0], "labels": torch.tensor(-100)} for i in range(2)]
    SortedTrainer(model=bert.train(), args=args, train_dataset=unlabelled, nest=bert_nest,
                  nonfinite=nonfinite).train()
    assert all(bool(torch.isfinite(p).all()) for p in bert.parameters())


@pytest.mark.parametrize("change", ["seed", "k", "soft_exits"])
def test_trainer_resumed_with_another_sampler_is_refused_before_anything_loads(change, tmp_path):
    """A checkpoint recorded no sampler settings: resuming with another seed, k or SoFT exits trained other
    sub-models than the run that wrote it, silently. The configuration is saved next to the weights and
    compared; the same one resumes."""
    model, _, _, _ = build("llama")
    model.train()
    nest = sn.from_transformers(model, ffn=[16, 32], depth=[2])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(8)]

    def trainer(steps, seed=3, k=1, soft=None):
        args = TrainingArguments(str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                                 report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, disable_tqdm=True,
                                 logging_strategy="no", seed=0)
        subs = nest.submodels if soft is None else [s for s in nest.submodels if s["depth"] == max(soft)]
        return SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, soft_exits=soft,
                             sampler=sn.Sampler(subs, k=k, strategy="uniform", seed=seed))

    trainer(2).train()
    folder = str(tmp_path / "checkpoint-2")
    assert json.load(open(tmp_path / "checkpoint-2" / "sortednet_training.json"))["sampler"]["seed"] == 3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # (so that a load would show)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {"seed": dict(seed=4), "k": dict(k=2), "soft_exits": dict(soft=[2, 4])}[change]
    with pytest.raises(sn.SortedNetError, match=rf"another training configuration .*{change}[^:]*: checkpoint"):
        trainer(3, **bad).train(resume_from_checkpoint=folder)
    assert all(torch.equal(v, moved[k]) for k, v in model.state_dict().items())  # nothing loaded
    resumed = trainer(3)
    resumed.train(resume_from_checkpoint=folder)
    assert [s for s, _ in resumed.history] == [2] and before.keys() == model.state_dict().keys()


def test_trainer_resumes_with_the_same_submodels_written_in_another_key_order(tmp_path):
    """A sampler of the same sub-models built with their dimensions in another order (``SubModel(depth=...,
    ffn=...)``) draws the same, yet the resume was refused ("other sub-models would train"), and the advised
    load_state_dict could not help. Other loss weights are said to weight the drawn sub-models otherwise."""
    model, _, _, _ = build("llama")
    model.train()
    nest = sn.from_transformers(model, ffn=[16, 32], depth=[2])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(8)]

    def trainer(steps, subs, **kw):
        args = TrainingArguments(str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                                 report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, disable_tqdm=True,
                                 logging_strategy="no", seed=0)
        return SortedTrainer(model=model, args=args, train_dataset=data, nest=nest,
                             sampler=sn.Sampler(subs, k=2, strategy="sandwich", seed=3, **kw))

    trainer(2, nest.submodels).train()
    folder = str(tmp_path / "checkpoint-2")
    flipped = [sn.SubModel(depth=s["depth"], ffn=s["ffn"]) for s in nest.submodels]
    assert [str(s) for s in flipped] != [str(s) for s in nest.submodels]
    with pytest.raises(sn.SortedNetError, match=r"loss_weights: .*the drawn sub-models' losses would be weighted"):
        trainer(3, flipped, loss_weights="small").train(resume_from_checkpoint=folder)
    resumed = trainer(3, flipped)
    resumed.train(resume_from_checkpoint=folder)
    assert [s for s, _ in resumed.history] == [2]


def test_trainer_resumes_a_checkpoint_whose_sampler_had_an_option_that_changed_nothing(tmp_path):
    """Earlier versions accepted ``weights=`` on a sandwich of k=2 (it changed no draw) and saved it with each
    checkpoint; this version refuses that option, so the run could not be resumed: neither with the sampler as
    built now (the configurations differed) nor by loading the saved state (refused). The option is dropped from
    a saved state, which then resumes."""
    model, _, _, _ = build("llama")
    model.train()
    nest = sn.from_transformers(model, ffn=[16, 32], depth=[2])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(8)]
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, disable_tqdm=True,
                             logging_strategy="no", seed=0)

    def trainer():
        return SortedTrainer(model=model, args=args, train_dataset=data, nest=nest,
                             sampler=sn.Sampler(nest.submodels, k=2, strategy="sandwich", seed=3))

    trainer().train()
    path = tmp_path / "checkpoint-2" / "sortednet_training.json"
    saved = json.load(open(path))
    saved["sampler"]["weights"], saved["sampler"]["small_first"] = "small", 100  # (as an earlier version wrote)
    path.write_text(json.dumps(saved))
    s = sn.Sampler(nest.submodels, k=2, strategy="sandwich", seed=0)
    s.load_state_dict(saved["sampler"])
    plain = sn.Sampler(nest.submodels, k=2, strategy="sandwich", seed=3)
    assert all(s.draw(t) == plain.draw(t) for t in range(20))
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert [step for step, _ in resumed.history] == [2]
    # a weighted sampler of every sub-model (k = n) loads as strategy 'all', whose seed changes no draw
    saved["sampler"].update(strategy="weighted", k=len(nest.submodels), weights="small", small_first=0)
    path.write_text(json.dumps(saved))
    every = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest,
                          sampler=sn.Sampler(nest.submodels, strategy="all"))
    every.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert [step for step, _ in every.history] == [2]


def test_trainer_resumes_with_an_equivalent_configuration(tmp_path):
    """SoFT exits in another order, weights spelled out as their default or scaled, the sampler's sub-models as a
    list or a tuple: the same training, resumed (soft_loss sorts the exits and normalises the weights)."""
    model, _, _, _ = build("llama")
    model.train()
    nest = sn.from_transformers(model, ffn=[16, 32], depth=[2])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(8)]

    def trainer(steps, source, soft, weights):
        args = TrainingArguments(str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                                 report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, disable_tqdm=True,
                                 logging_strategy="no", seed=0)
        return SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, soft_exits=soft,
                             soft_weights=weights, sampler=sn.Sampler(source, k=1, strategy="uniform", seed=3))

    deep = [s for s in nest.submodels if s["depth"] == 4]  # (SoFT runs each drawn sub-model at the deepest exit)
    trainer(2, deep, [2, 4], None).train()
    for source, soft, weights in [(tuple(deep), [4, 2], None), (deep, [2, 4], [1, 1]),
                                  (deep, [4, 2], np.array([2.0, 2.0], dtype=np.float32))]:
        t = trainer(3, source, soft, weights)
        t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
        assert [s for s, _ in t.history] == [2]


@pytest.mark.parametrize("soft", [False, True])
def test_trainer_gradient_equals_mean_loss_over_accumulated_batch(soft, tmp_path):
    """One SGD step with 2 micro-batches moves the weights by -lr x the gradient of the mean loss of
    the whole accumulated batch (the Trainer's gradient-accumulation scaling is right in both modes)."""
    model, _, _, _ = build("llama")
    model.train()
    nest = sn.from_transformers(model, ffn=[16], depth=[2])
    x = ids(seed=9, b=4)
    data = [{"input_ids": row, "labels": row} for row in x]
    sub = nest.resolve("ffn=16,depth=4")
    with nest.use(sub):
        loss = soft_loss(nest, x, exits=[2, 4]).loss if soft else model(input_ids=x, labels=x).loss
    want = torch.autograd.grad(loss, model.lm_head.weight)[0]
    before = model.lm_head.weight.detach().clone()
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             optim="sgd", learning_rate=1.0, max_grad_norm=0.0, weight_decay=0.0, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no")
    trainer = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest,
                            sampler=sn.Sampler([sub], k=1, seed=0), soft_exits=[2, 4] if soft else None)
    trainer.train()
    torch.testing.assert_close(before - model.lm_head.weight.detach(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_trainer_gradient_accumulation_of_a_classifier_is_the_mean_over_the_batch(family, tmp_path):
    """A sequence classifier's loss is a per-micro-batch mean that ignores ``num_items_in_batch``, which the
    Trainer passes to any forward taking ``**kwargs`` (and then skips dividing by the accumulation steps):
    each micro-batch counted in full, twice the step with 2 micro-batches. SortedTrainer measures it and
    divides: one SGD step == -lr x the gradient of the mean of the micro-batches' losses."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=64,
                                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    else:
        model = LlamaForSequenceClassification(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2, pad_token_id=0))
    model.train()
    nest = sn.from_transformers(model, ffn=[32], depth=[1])
    x = torch.randint(1, 40, (4, 9), generator=torch.Generator().manual_seed(9))
    y = torch.tensor([0, 1, 1, 0])
    data = [{"input_ids": row, "labels": lab} for row, lab in zip(x, y)]
    sub = nest.resolve("ffn=32,depth=1")
    head = model.classifier if family == "bert" else model.score
    with nest.use(sub):
        loss = (model(input_ids=x[:2], labels=y[:2]).loss + model(input_ids=x[2:], labels=y[2:]).loss) / 2
    want = torch.autograd.grad(loss, head.weight)[0]
    before = head.weight.detach().clone()
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             optim="sgd", learning_rate=1.0, max_grad_norm=0.0, weight_decay=0.0, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no")
    trainer = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest,
                            sampler=sn.Sampler([sub], k=1, seed=0))
    trainer.train()
    torch.testing.assert_close(before - head.weight.detach(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("divides", [False, True])
def test_trainer_gradient_accumulation_with_a_compute_loss_func(divides, tmp_path):
    """The Trainer never divides a compute_loss_func's loss by the accumulation steps: one returning each
    micro-batch's mean (ignoring num_items_in_batch) stepped 2x the mean with 2 micro-batches, with no word.
    SortedTrainer measures it as it measures a model's loss: both kinds step -lr x the gradient of the mean."""
    import torch.nn.functional as F

    model, _, _, _ = build("llama")
    model.train()
    nest = sn.from_transformers(model, ffn=[16], depth=[2])
    x = ids(seed=9, b=4)
    data = [{"input_ids": row, "labels": row} for row in x]

    def token_losses(logits, labels):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")

    def loss_func(outputs, labels, num_items_in_batch=None):
        per = token_losses(outputs.logits, labels)
        return per.sum() / num_items_in_batch if divides else per.mean()

    sub = nest.resolve("ffn=16,depth=4")
    with nest.use(sub):
        loss = token_losses(model(input_ids=x).logits, x).mean()
    want = torch.autograd.grad(loss, model.lm_head.weight)[0]
    before = model.lm_head.weight.detach().clone()
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             optim="sgd", learning_rate=1.0, max_grad_norm=0.0, weight_decay=0.0, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no")
    SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, sampler=sn.Sampler([sub], k=1, seed=0),
                  compute_loss_func=loss_func).train()
    torch.testing.assert_close(before - model.lm_head.weight.detach(), want, atol=1e-5, rtol=1e-4)


def test_trainer_measures_the_loss_weighting_only_on_a_micro_batch_with_labels(tmp_path):
    """A first micro-batch without a labelled token (a masked prompt) gives 0 whatever the count: undecided,
    not "ignores num_items_in_batch" (which would drop token weighting for the whole run)."""
    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, depth=[2])
    x = ids(seed=9, b=4)
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no")
    trainer = SortedTrainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in x],
                            nest=nest)
    masked = {"input_ids": x[:2], "labels": torch.full_like(x[:2], -100)}
    assert trainer._check_loss_kwargs(model, masked, torch.tensor(9)) is None and trainer.model_accepts_loss_kwargs
    assert trainer._check_loss_kwargs(model, {"input_ids": x[:2], "labels": x[:2]}, torch.tensor(9)) is True
    assert trainer.model_accepts_loss_kwargs


def test_trainer_drops_calibration_of_the_weights_it_trains(tmp_path):
    """Per-sub-model BatchNorm statistics of nest.calibrate describe the weights before training: Trainer.train
    drops them (a warning names the module) instead of evaluating and exporting stale ones afterwards."""
    import torch.nn as nn
    import torch.nn.functional as F

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

        def forward(self, x, labels=None):
            out = self.b(torch.relu(self.bn(self.a(x))))
            return {"loss": None if labels is None else F.cross_entropy(out, labels), "logits": out}

    torch.manual_seed(0)
    model = Classifier()
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="a", norm="bn", inp="b"))
    x = torch.randn(16, 4)
    nest.calibrate([x], batches=1)
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no")
    data = [{"x": a, "labels": b} for a, b in zip(x, (x[:, 0] > 0).long())]
    trainer = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest)
    assert model.bn._sn.norm is not None
    with pytest.warns(UserWarning, match=r"SortedTrainer.train trains .* \('bn'\): dropped them"):
        trainer.train()
    assert model.bn._sn.norm is None
    # a run refused before it loads or trains anything keeps them (they were dropped first, then refused)
    nest.calibrate([x], batches=1)
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no")

    class Twice:  # (the same sub-model, spelled two ways)
        def draw(self, step):
            return [nest.smallest, str(nest.smallest), nest.largest]

    for sampler, resume, error in ((None, str(tmp_path / "missing"), ValueError),
                                   (Twice(), None, sn.SortedNetError)):
        trainer = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, sampler=sampler)
        with pytest.raises(error):
            trainer.train(resume_from_checkpoint=resume)
        assert model.bn._sn.norm is not None

    class Spelled:  # (dicts and strings, as nest.use takes them)
        def draw(self, step):
            return [{"h": 4}, "h=8"]

    trainer = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, sampler=Spelled())
    with pytest.warns(UserWarning, match="dropped them"):
        trainer.train()
    assert [subs for _, subs in trainer.history] == [({"h": 4}, "h=8")] * 2  # (as the sampler spelled them)

    class Reused:  # (one dict changed in place at each step: history keeps what each step drew)
        box: dict = {}

        def draw(self, step):
            self.box["h"] = (4, 8)[step % 2]
            return [self.box]

    trainer = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, sampler=Reused())
    trainer.train()
    assert [subs for _, subs in trainer.history] == [({"h": 4},), ({"h": 8},)]


class _OwnLoss(SortedTrainer):
    """A subclass computing its loss itself, without ``super().compute_loss``."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_ids=inputs["input_ids"])
        logits = out.logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 inputs["labels"][:, 1:].reshape(-1))
        return (loss, out) if return_outputs else loss


class _AddsToSuper(SortedTrainer):
    """A subclass adding a term to ``super().compute_loss``'s loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss + 0.1 * model.lm_head.weight.square().sum()


@pytest.mark.parametrize("trainer", [SortedTrainer, _OwnLoss, _AddsToSuper])
def test_trainer_applies_the_samplers_loss_weights(trainer, tmp_path):
    """SortedTrainer weighs each drawn sub-model's loss as sn.accumulate(weights=loss_weights_for(subs)), also
    the loss of a subclass's own compute_loss (the Trainer's customisation point): one that did not call
    super() trained on the sum of the sub-models' losses, unweighted (a step 2x too large at k=2), and a term
    added to super()'s loss counted k times."""
    model, _, _, _ = build("llama")
    model.train()
    nest = sn.from_transformers(model, ffn=[16, 32], heads=[2], depth=[2])
    x = ids(seed=9, b=4)
    data = [{"input_ids": row, "labels": row} for row in x]
    sampler = sn.Sampler(nest, k=3, strategy="sandwich", seed=0, loss_weights="small")
    subs = sampler.draw(0)
    weights = sampler.loss_weights_for(subs)
    assert len(set(weights)) > 1
    with torch.no_grad():
        w = model.lm_head.weight.detach().clone()
    extra = (lambda: 0.1 * model.lm_head.weight.square().sum()) if trainer is _AddsToSuper else (lambda: 0.0)
    sn.accumulate(nest, subs, lambda: model(input_ids=x, labels=x).loss + extra(), weights=weights)
    want = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=4, optim="sgd", learning_rate=1.0,
                             max_grad_norm=0.0, weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, logging_strategy="no")
    trainer(model=model, args=args, train_dataset=data, nest=nest, sampler=sampler).train()
    torch.testing.assert_close(w - model.lm_head.weight.detach(), want, atol=1e-5, rtol=1e-4)


class _GradPenalty(SortedTrainer):
    """A subclass whose loss differentiates (a gradient penalty through torch.autograd.grad), computing its own
    mean: measured with gradients on, as in a step."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        emb = model.get_input_embeddings()(inputs["input_ids"])
        logits = model(inputs_embeds=emb).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 inputs["labels"][:, 1:].reshape(-1))
        g, = torch.autograd.grad(loss, emb, retain_graph=True)  # (under no_grad: "does not require grad")
        return loss + 0.0 * g.square().sum()


@pytest.mark.parametrize("trainer", [_OwnLoss, _GradPenalty, _AddsToSuper])
def test_gradient_accumulation_of_a_subclass_loss_is_measured_on_what_it_returns(trainer, tmp_path):
    """The Trainer passes num_items_in_batch to a Llama (its own loss divides by it) and then skips dividing by
    the accumulation steps; a subclass's compute_loss computing its own mean was measured through the model's
    forward (which halves) and took a step 2x too large. Now the loss compute_loss returns is measured (with
    gradients, as in a step: an override may call autograd.grad): an inline mean gives one SGD step over 2
    micro-batches == -lr x the gradient of the mean of their losses. A term added to super()'s token-weighted
    loss keeps the token weighting and counts once per micro-batch, as in the stock Trainer, with a warning."""
    from sortednet.integrations.trainer import PartlyScaledLossWarning

    model, _, _, _ = build("llama")
    model.train()
    nest = sn.from_transformers(model, ffn=[16, 32], depth=[2])
    sub = nest.resolve("ffn=16,depth=2")
    x = ids(seed=9, b=4)
    mixed = trainer is _AddsToSuper
    extra = (lambda: 0.1 * model.lm_head.weight.square().sum()) if mixed else (lambda: 0.0)
    with nest.use(sub):
        loss = sum(model(input_ids=x[i:i + 2], labels=x[i:i + 2]).loss + (2 if mixed else 1) * extra()
                   for i in (0, 2)) / 2
    want = torch.autograd.grad(loss, model.lm_head.weight)[0]
    before = model.lm_head.weight.detach().clone()
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             optim="sgd", learning_rate=1.0, max_grad_norm=0.0, weight_decay=0.0, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no")
    t = trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in x], nest=nest,
                sampler=sn.Sampler([sub], k=1, seed=0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        t.train()
    assert any(issubclass(w.category, PartlyScaledLossWarning) for w in seen) == mixed
    torch.testing.assert_close(before - model.lm_head.weight.detach(), want, atol=1e-5, rtol=1e-4)
    assert t._loss_uses_items is mixed


def test_a_compute_loss_that_skips_the_soft_exits_is_refused_before_a_backward(tmp_path):
    model, _, _, _ = build("llama")
    model.train()
    nest = sn.from_transformers(model, depth=[1, 2])
    x = ids(seed=9, b=4)
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no")
    t = _OwnLoss(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in x], nest=nest,
                 soft_exits=[1, 2])
    with pytest.raises(sn.SortedNetError, match=r"without calling super\(\)\.compute_loss, which computes the loss"):
        t.train()
    assert all(p.grad is None for p in model.parameters())


def test_callback_refuses_a_sampler_that_draws_several(tmp_path):
    model, _, _, _ = build("gpt2")
    nest = sn.from_transformers(model, ffn=[16, 32])
    with pytest.raises(sn.SortedNetError, match="draws 2"):
        SubModelCallback(nest, sn.Sampler(nest.submodels, k=2, strategy="sandwich", seed=0))


class _DrawsLater:
    """A sampler of one's own: one sub-model at step 0, then ``later`` (several, or none)."""

    def __init__(self, subs, later):
        self.subs, self.later = subs, later

    def draw(self, step):
        return [self.subs[0]] if step == 0 else [self.subs[i] for i in self.later]


@pytest.mark.parametrize("later", [(1, 2), ()], ids=["several", "none"])
def test_callback_refuses_a_later_draw_of_other_than_one_sub_model(later, tmp_path):
    """Checked at step 0 only: a later draw of two trained the first alone (the other dropped, in silence) and an
    empty one raised a raw IndexError."""
    model, _, _, _ = build("gpt2")
    nest = sn.from_transformers(model, ffn=[16, 32, 64])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(8)]
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no")
    cb = SubModelCallback(nest, _DrawsLater(list(nest.submodels), later))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    with pytest.raises(sn.SortedNetError, match=rf"the sampler drew {len(later)} at step 1"):
        trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("save", ["steps", "no"])
def test_callback_refuses_a_rank_nest_before_training_when_the_trainer_saves_checkpoints(save, tmp_path):
    """A stock Trainer saving checkpoints with a Rank nest trained up to its first checkpoint, then its
    save_pretrained was refused (factors / adapters) and left an empty checkpoint folder. Refused at the start of
    training now, nothing trained or written; without checkpoints it trains."""
    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, ffn=[0.5], rank=[2, 4])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(8)]
    args = TrainingArguments(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy=save, save_steps=3, disable_tqdm=True, logging_strategy="no")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[
        SubModelCallback(nest, sn.Sampler(nest.submodels, k=1, strategy="uniform", seed=1))])
    if save == "no":
        trainer.train()
        assert trainer.state.global_step == 4
        return
    with pytest.raises(sn.SortedNetError, match=r"Rank dimension.s. \['rank'\].*save_strategy='steps'.*SortedTrainer"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.name.startswith("checkpoint") for p in (tmp_path / "out").glob("*"))


def test_callback_activates_one_submodel_per_optimizer_step(tmp_path):
    model, _, _, _ = build("gpt2")
    model.train()
    nest = sn.from_transformers(model, ffn=[16, 32, 64], depth=[1, 2])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(24)]
    args = TrainingArguments(str(tmp_path), max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no")
    cb = SubModelCallback(nest, sn.Sampler(nest.submodels, k=1, strategy="uniform", seed=1))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append((trainer.state.global_step, nest.active)))
    trainer.train()
    assert [s for s, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [sub for _, sub in seen] == [cb.sampler.draw(s)[0] for s, _ in seen]
    assert len({sub for _, sub in seen}) > 1
    assert nest.active == nest.largest  # restored at train end
    steps = []
    cb2 = SubModelCallback(nest, sn.Sampler(nest.submodels, k=1, strategy="uniform", seed=1))
    evaluating = transformers.Trainer(model=model, args=TrainingArguments(
        str(tmp_path), max_steps=3, per_device_train_batch_size=2, eval_strategy="steps", eval_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no"), train_dataset=data,
        eval_dataset=data[:2], callbacks=[cb2])
    h = model.register_forward_pre_hook(lambda m, a: steps.append((model.training, nest.active)))
    evaluating.train()
    h.remove()
    assert {sub for training, sub in steps if not training} == {nest.largest}  # evaluation: never a drawn one


@pytest.mark.parametrize("outer", ["smallest", "largest"])
def test_callback_refuses_a_training_loop_inside_a_use_block(outer, tmp_path):
    """The callback sets the nest-wide default, which a ``use`` block around ``trainer.train()`` overrode: every
    step trained that block's sub-model while ``cb.history`` listed the draws (0.150 off the drawn sub-models'
    training). Refused before any step trains; SortedTrainer (a use block per drawn sub-model) trains there."""
    model, _, _, _ = build("gpt2")
    model.train()
    nest = sn.from_transformers(model, ffn=[16, 32, 64], depth=[1, 2])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(8)]
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no")
    cb = SubModelCallback(nest, sn.Sampler(nest.submodels, k=1, strategy="uniform", seed=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with nest.use(getattr(nest, outer)), pytest.raises(sn.SortedNetError, match=r"runs inside `with nest.use\("):
        transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not cb.history
    trainer = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest)
    with nest.use(getattr(nest, outer)):
        trainer.train()
    assert len(trainer.history) == 2


def test_callback_gives_back_the_submodel_when_train_raises_inside_a_step(tmp_path):
    """No callback runs when an exception leaves ``trainer.train()`` inside a step: the drawn sub-model stayed the
    nest-wide default, and every later evaluation or generation silently ran it. The next forward outside the
    dead training loop now restores the sub-model active before training."""
    model, _, _, _ = build("llama")
    model.train()
    nest = sn.from_transformers(model, ffn=[16, 48], depth=[1, 4])
    x = ids(seed=3, b=8)
    data = [{"input_ids": r, "labels": r} for r in x]
    data[5] = {"input_ids": torch.full((9,), 10 * V), "labels": x[5]}  # out of the vocabulary: step 2 raises
    cb = SubModelCallback(nest, sn.Sampler(nest.submodels, k=1, strategy="uniform", seed=1))
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    assert cb.sampler.draw(2)[0] != nest.largest  # (the failing step runs a smaller sub-model)
    with pytest.raises(IndexError):
        trainer.train()
    assert nest.active == cb.history[-1][1] != nest.largest
    # (the hook still on the model held the callback and its nest: every copy was refused, export too)
    assert type(copy.deepcopy(model)) is type(model)
    assert sum(p.numel() for p in nest.export(nest.smallest).parameters()) == nest.cost(nest.smallest, "params")
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(nest.active))
    model.eval()
    with torch.no_grad():
        model(input_ids=x[:1])
    handle.remove()
    assert seen == [nest.largest] and nest.active == nest.largest
    # again, then the trainer and the callback dropped (a notebook re-running its cell): a copy of the model, made
    # after the crash, heals the nest at its first forward as the model does
    other = SubModelCallback(nest, sn.Sampler(nest.submodels, k=1, strategy="uniform", seed=1))
    crashed = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[other])
    model.train()
    with pytest.raises(IndexError):
        crashed.train()
    assert nest.active != nest.largest
    del crashed, other
    gc.collect()
    ema = copy.deepcopy(model).eval()
    with torch.no_grad():
        ema(input_ids=x[:1])
    assert nest.active == nest.largest
    model.train()
    data[5] = {"input_ids": x[5], "labels": x[5]}  # a second run trains and ends as usual; exports inside it
    exported = []

    class ExportEachStep(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            small = nest.export(nest.smallest)  # (a model of its own: no hook of the callback's kept)
            assert not any(type(h).__name__ == "_Healer" for m in small.modules()
                           for h in m._forward_pre_hooks.values())
            exported.append(sum(p.numel() for p in small.parameters()))

    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, ExportEachStep()]).train()
    assert nest.active == nest.largest and exported == [nest.cost(nest.smallest, "params")] * 4
    assert not any(type(h).__name__ == "_Healer" for h in model._forward_pre_hooks.values())  # hook removed


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_soft_loss_passes_the_models_other_inputs_to_its_forward(name, tmp_path):
    """SoFT dropped every input but input_ids / attention_mask: packed ``position_ids``, GPT-2's
    ``token_type_ids`` and ``inputs_embeds`` data trained another function than the model's, silently."""
    model, _, _, _ = build(name)
    x = ids(seed=4)
    n = len(model.get_submodule("model.layers" if name == "llama" else "transformer.h"))
    if name == "llama":
        pos = torch.arange(x.shape[1]).repeat(2, 1)
        pos[:, 5:] -= 5  # two packed sequences per row
        extra = {"position_ids": pos}
    else:
        extra = {"token_type_ids": (torch.arange(x.shape[1]) >= 5).long().repeat(2, 1)}
    want = model(input_ids=x, labels=x, **extra).loss
    assert not torch.equal(model(input_ids=x, labels=x).loss, want)  # (the input changes the loss)
    torch.testing.assert_close(soft_loss(model, x, exits=[n], **extra).loss, want)
    emb = model.get_input_embeddings()(x)
    torch.testing.assert_close(soft_loss(model, exits=[n], labels=x, inputs_embeds=emb, **extra).loss, want)
    with pytest.raises(sn.SortedNetError, match="needs labels"):
        soft_loss(model, exits=[n], inputs_embeds=emb)
    with pytest.raises(sn.SortedNetError, match="past_key_values"):
        soft_loss(model, x, exits=[n], past_key_values=None)
    torch.testing.assert_close(soft_loss(model, x, exits=[n], use_cache=False, **extra).loss,
                               model(input_ids=x, labels=x, use_cache=False, **extra).loss)
    nest = sn.from_transformers(model, ffn=[16])
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    for bad in ([1.0], [1.0, -1.0], [float("nan"), 1.0], [0.0, 0.0]):
        with pytest.raises(sn.SortedNetError, match="soft_weights"):
            SortedTrainer(model=model, args=args, train_dataset=[], nest=nest, soft_exits=[1, n], soft_weights=bad)
    with pytest.raises(sn.SortedNetError, match="needs soft_exits"):
        SortedTrainer(model=model, args=args, train_dataset=[], nest=nest, soft_weights=[1.0, 2.0])
    with pytest.raises(sn.SortedNetError, match="soft_exits must be a list"):
        SortedTrainer(model=model, args=args, train_dataset=[], nest=nest, soft_exits=n)
    with pytest.raises(sn.SortedNetError, match="soft_weights must be a list"):
        SortedTrainer(model=model, args=args, train_dataset=[], nest=nest, soft_exits=[1, n], soft_weights=1.0)


def test_trainer_rejects_foreign_model(tmp_path):
    model, _, _, _ = build("gpt2")
    nest = sn.from_transformers(model, ffn=[32])
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(sn.SortedNetError, match="nest's model"):
        SortedTrainer(model=gpt2(), args=args, train_dataset=[], nest=nest)
    assert len(make_sampler(nest, k=5).draw(0)) == 2
    with pytest.raises(sn.SortedNetError, match="depths"):
        SortedTrainer(model=model, args=args, train_dataset=[], nest=nest, soft_exits=[])
    smooth = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                               label_smoothing_factor=0.1)
    with pytest.raises(sn.SortedNetError, match="label_smoothing_factor"):  # the SoFT loss would ignore it
        SortedTrainer(model=model, args=smooth, train_dataset=[], nest=nest, soft_exits=[2])



def test_trainer_and_callback_refuse_misconfigurations_before_any_step(tmp_path):
    model, _, _, _ = build("gpt2")
    nest = sn.from_transformers(model, ffn=[32])
    other = sn.from_transformers(gpt2(), ffn=[16])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(4)]
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no")
    for bad, needle in (([nest.largest], "draw"), (sn.Sampler(other.submodels, k=1), "does not have")):
        with pytest.raises(sn.SortedNetError, match=needle):
            SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, sampler=bad)
        with pytest.raises(sn.SortedNetError, match=needle):
            SubModelCallback(nest, bad)
    with pytest.raises(sn.SortedNetError, match="drop the callback"):  # its draws would never train
        SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, callbacks=[SubModelCallback(nest)])
    stranger = gpt2()  # a stock Trainer of another model: the callback would record draws of a nest never trained
    with pytest.raises(sn.SortedNetError, match="not the nest's model"):
        transformers.Trainer(model=stranger, args=args, train_dataset=data, callbacks=[SubModelCallback(nest)]).train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

def test_a_trainer_of_a_model_holding_the_nested_tower_says_how_to_train_it(tmp_path):
    """One tower of an encoder-decoder model nested (BART's decoder, as from_transformers asks): SortedTrainer
    said model= must be the nest's model, whose tower returns no loss (a raw ValueError followed), and
    SubModelCallback said the steps would train the full model, untrue: under nest.use the whole model runs the
    tower's sub-model. Both say now that the integration does not train it, and how to (sn.accumulate)."""
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)).eval()
    nest = sn.from_transformers(model.model.decoder, ffn=[24], depth=[1])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(4)]
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no")
    with pytest.raises(sn.SortedNetError, match=r"this BartForConditionalGeneration holds it.*sn\.accumulate"):
        SortedTrainer(model=model, args=args, train_dataset=data, nest=nest)
    with pytest.raises(sn.SortedNetError, match=r"this BartForConditionalGeneration holds it.*sn\.accumulate"):
        transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[SubModelCallback(nest)]).train()
    x = ids(seed=0, b=2)  # the advice works: the whole model's loss, under the tower's sub-models
    info = sn.accumulate(nest, [nest.smallest, nest.largest], lambda: model(input_ids=x, labels=x).loss)
    assert len(info) == 2 and not info.skipped and all(p.grad is not None for p in nest.model.layers[0].parameters())


def test_unsupported_architecture_and_bad_sizes_leave_model_unchanged():
    model, _, _, _ = build("gpt2")
    with pytest.raises(sn.SortedNetError, match="known families.*register_layout.*sn.Width"):
        sn.from_transformers(torch.nn.Sequential(torch.nn.Linear(2, 2)), ffn=[1])
    with pytest.raises(sn.SortedNetError, match="nn.Linear"):
        sn.from_transformers(model, rank=[2, 4])  # GPT-2 projections are Conv1D
    lora, _, _, _ = build("llama")
    with pytest.raises(sn.SortedNetError, match="rank"):
        sn.sort_by_importance(sn.from_transformers(lora, rank=[2, 4]), [ids()])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = (dict(ffn=[1.5]), dict(ffn=[0.5, 64]), dict(heads=[5]), dict(depth=[0]), dict(depth=[2, 9]),
           dict(ffn=[]), dict(rank=[0.5]), {})
    for kw in bad:
        with pytest.raises(sn.SortedNetError):
            sn.from_transformers(model, **kw)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    sn.from_transformers(model, ffn=[0.5])  # still wrappable: nothing was left half-installed


@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=4), st.sampled_from([1, 2, 4]))
def test_fractions_resolve_to_ascending_multiples(fracs, group):
    full = 16
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (a fraction that rounds to the full size, beside others)
            sizes = _resolve("heads", fracs, full, group)
    except sn.SortedNetError as e:
        assert "duplicates" in str(e) or "add no smaller sub-model" in str(e)
        assert "duplicates" in str(e) or all(round(f * full / group) * group >= full for f in fracs)
        return
    assert sizes == sorted(set(sizes)) and sizes[-1] == full
    assert all(s % group == 0 and 0 < s <= full for s in sizes)


@pytest.mark.parametrize("fracs, full, group", [([0.5], 4, 4), ([0.75], 4, 2), ([0.97], 16, 1)])
def test_a_fraction_that_rounds_to_the_full_size_is_refused(fracs, full, group):
    """heads=[0.5] on a multi-query Falcon (4 query heads, one key/value group of 4) rounded to the full 4 heads:
    the nest held the full model alone, in silence, where a smaller one was asked for."""
    with pytest.raises(sn.SortedNetError, match=rf"fractions \[{fracs[0]}\] of the full size {full} round to "
                                                rf"{full} itself .*add no smaller sub-model"):
        _resolve("heads", fracs, full, group)
    assert _resolve("heads", [1.0], full, group) == [full]
    smaller = 0.5 if group < full else 1  # (beside a fraction that does nest, one that rounds up merges, as before,
    if smaller < 1:                        # and says so)
        with pytest.warns(UserWarning, match=rf"fraction\(s\) \[{fracs[0]}\] of the full size {full} round to "
                                             rf"{full} itself .*add no sub-model"):
            assert _resolve("heads", [smaller, fracs[0]], full, group)[-1] == full
        with pytest.warns(UserWarning, match=r"add no sub-model"):  # (with the full size given too: merged, as the
            got = _resolve("heads", [smaller, fracs[0], 1.0], full, group)  # warning says; was a duplicates error)
        assert got == _resolve("heads", [smaller], full, group) == [round(smaller * full / group) * group, full]


@pytest.mark.parametrize("sizes", [[0.25, 0.5, 1], [1, 0.5]])
def test_the_integer_one_beside_fractions_is_refused(sizes):
    """``[0.25, 0.5, 1]`` means the full size; read as ints, ``1`` is one unit: refused, naming ``1.0``."""
    with pytest.raises(sn.SortedNetError, match=r"write 1.0 for the full size"):
        _resolve("ffn", sizes, 64)
    assert _resolve("ffn", [0.25, 0.5, 1.0], 64) == [16, 32, 64] and _resolve("ffn", [1, 32], 64) == [1, 32, 64]



def test_hf_gradient_checkpointing_recomputes_the_forward_submodel():
    """HF activation checkpointing with ``context_fn=nest.checkpoint_context``: backward run outside
    ``use()`` recomputes the forward's sub-model (same gradients as without checkpointing); so does a
    reentrant one without it, and a non-reentrant one without it (torch's own recompute check refused it:
    the weights read inside the checkpoint now pin its recomputation)."""
    torch.manual_seed(0)
    model = llama()
    nest = sn.from_transformers(model, ffn=[16, 48], depth=[2, 4])
    model.train()
    x = torch.randint(0, V, (2, 6))
    small = nest.smallest

    def grads():
        with nest.use(small):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()                                   # outside use(): the default (largest) is active
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    want = grads()
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": nest.checkpoint_context})
    got = grads()
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    # every checkpointed layer now holds the context_fn: the model still deep-copies (an EMA copy that follows
    # the nest) and exports (was refused: the context dragged the nest into the copy)
    twin = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad(), nest.use(small):
        live = model(input_ids=x).logits
        torch.testing.assert_close(twin(input_ids=x).logits, live)
        torch.testing.assert_close(nest.export(small)(input_ids=x).logits, live, rtol=1e-5, atol=1e-6)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    got = grads()                                         # reentrant: the nest pins its recomputation itself
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=f"reentrant {n}")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = grads()
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=f"non-reentrant {n}")


@pytest.mark.parametrize("where", ["outside_use", "thread"])
def test_hf_reentrant_checkpointing_of_the_base_model_called_directly_recomputes_its_submodel(where):
    """``model.model(ids)`` (the base model, a child of the wrapped head model) under a sub-model, reentrant HF
    checkpointing on, backward outside the use block or in another thread (as on an accelerator): the layers
    recomputed the default sub-model (relative gradient errors 0.5-1.4 on q/k_proj, no error). Now the same
    gradients as without checkpointing."""
    import threading

    torch.manual_seed(0)
    model = llama()
    nest = sn.from_transformers(model, ffn=[16, 48], heads=[2, 4], depth=[2, 4])
    model.train()
    x = torch.randint(0, V, (2, 6))
    small = nest.smallest

    def grads():
        with nest.use(small):
            loss = model.model(input_ids=x).last_hidden_state.square().mean()
        if where == "thread":
            t = threading.Thread(target=loss.backward)
            t.start()
            t.join(60)
        else:
            loss.backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    want = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    got = grads()
    assert want.keys() == got.keys() and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("mode", ["svd", "lora"])
def test_trainer_checkpoints_of_a_rank_nest_load_as_what_they_trained(mode, tmp_path):
    """A Rank nest's own parameters are factors / adapters: SortedTrainer's Hugging Face files hold the
    largest sub-model merged into stock weights (from_pretrained gives it), resuming loads the nest's own
    file; LoRA trains the adapters alone."""
    from transformers import AutoModelForCausalLM

    from sortednet.integrations.trainer import NEST_FILE

    def built():
        torch.manual_seed(0)
        model = llama()
        return model, sn.from_transformers(model, ffn=[24, 48], rank=[2, 4], rank_mode=mode)

    model, nest = built()
    base = {n: p.detach().clone() for n, p in model.named_parameters()
            if id(p) not in {id(q) for q in nest.trainable_parameters()}}
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(8)]
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="steps", save_steps=1, disable_tqdm=True,
                             logging_strategy="no", seed=0)
    SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, sampler=sn.Sampler(nest, k=2, seed=0)).train()
    x = ids(seed=5, b=2)
    model.eval()
    with torch.no_grad():
        live = model(x).logits
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2").eval()(x).logits
    torch.testing.assert_close(back, live, atol=1e-5, rtol=1e-4)
    if mode == "lora":  # nothing but the adapters moved (embeddings, norms and the LM head included)
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    model2, nest2 = built()
    trainer2 = SortedTrainer(model=model2, args=args, train_dataset=data, nest=nest2,
                             sampler=sn.Sampler(nest2, k=2, seed=0))  # (resuming: the sampler it trained with)
    trainer2._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
    assert all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(), model.state_dict().values()))
    (tmp_path / "checkpoint-1" / NEST_FILE).unlink()
    with pytest.raises(sn.SortedNetError, match=NEST_FILE):
        trainer2._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    # the model's own save_pretrained would write the factors / adapters, which from_pretrained re-initialises or
    # drops: refused before anything is written (it wrote config.json first: a folder holding another checkpoint
    # was left with a config that no longer described its weights), also on a deep copy; an export saves stock
    # weights; after unwrap(merge=True) the model's own save writes the merged model
    other = tmp_path / "direct"
    AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2").save_pretrained(other)
    files = {f.name: f.read_bytes() for f in other.iterdir()}
    for who in (model, copy.deepcopy(model)):
        with pytest.raises(sn.SortedNetError, match=rf"save_pretrained of this LlamaForCausalLM: .*mode='{mode}'.*"
                                                    r"nothing was written"):
            who.save_pretrained(other)
        assert {f.name: f.read_bytes() for f in other.iterdir()} == files
    from sortednet.integrations import export_pretrained
    export_pretrained(nest, nest.largest).save_pretrained(tmp_path / "largest")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "largest").eval()(x).logits
    torch.testing.assert_close(back, live, atol=1e-5, rtol=1e-4)
    nest.unwrap(merge=True)
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "merged")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(x).logits
    torch.testing.assert_close(back, live, atol=1e-5, rtol=1e-4)


# -- a key/value cache continued by another sub-model ----------------------------------------------------
# the cache keyword: `cache` in transformers 5 (`past_key_values` is deprecated there), else the old name
KV = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
KV_STEPS = {  # (prefill sub-model, next-token sub-model) -> refused?
    ("depth=4", "depth=4"): False, ("depth=4", "depth=2"): False, ("depth=2", "depth=4"): True,
    ("depth=2", "depth=2"): False, ("ffn=24", "ffn=48"): True, ("heads=4", "heads=2"): True,
    ("ffn=24,depth=2", "ffn=24,depth=4"): True, ("ffn=24,depth=4", "ffn=24,depth=2"): False,
}


def _cache_case():
    """A Llama nested over ffn, heads and depth, a 6-token prompt, one next token and an empty cache."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = llama().eval()
    nest = sn.from_transformers(model, ffn=[24], heads=[2], depth=[2])
    return model, nest, ids(b=1, t=6), ids(seed=2, b=1, t=1), DynamicCache(config=model.config)


@pytest.mark.parametrize("first, then", sorted(KV_STEPS))
def test_a_kv_cache_continued_by_another_submodel_is_exact_or_refused(first, then):
    """A cache filled by one sub-model and continued by another gives that sub-model's own logits (a
    shallower depth of the same widths) or is refused before anything runs, naming what is missing."""
    model, nest, x, nxt, cache = _cache_case()
    with torch.no_grad():
        with nest.use(first):
            model(input_ids=x, **{KV: cache}, use_cache=True)
        with nest.use(then):
            ref = model(input_ids=torch.cat([x, nxt], 1)).logits[0, -1]
            if KV_STEPS[first, then]:
                with pytest.raises(sn.SortedNetError, match="key/value cache"):
                    model(input_ids=nxt, **{KV: cache}, use_cache=True)
                assert cache.get_seq_length() == 6  # nothing ran
            else:
                got = model(input_ids=nxt, **{KV: cache}, use_cache=True).logits[0, -1]
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["sort_by_importance", "sort_units"])
def test_a_kv_cache_filled_before_the_units_were_sorted_is_refused(how):
    """Sorting permutes heads and neurons inside the weights: a cache filled before holds keys and values in
    the old order (continued, the logits were 0.18 off a fresh run, with the same sub-model on both sides)."""
    from transformers import DynamicCache

    from sortednet.importance import sort_units

    model, nest, x, nxt, cache = _cache_case()
    with torch.no_grad():
        model(input_ids=x, **{KV: cache}, use_cache=True)
    if how == "sort_units":
        sort_units(nest, "l1", example=x)
    else:
        sn.sort_by_importance(nest, [ids(seed=5, b=2, t=8)])
    with torch.no_grad():
        with pytest.raises(sn.SortedNetError, match="re-ordered"):
            model(input_ids=nxt, **{KV: cache}, use_cache=True)
        assert cache.get_seq_length() == 6
        fresh = DynamicCache(config=model.config)
        model(input_ids=x, **{KV: fresh}, use_cache=True)
        got = model(input_ids=nxt, **{KV: fresh}, use_cache=True).logits[0, -1]
        torch.testing.assert_close(got, model(input_ids=torch.cat([x, nxt], 1)).logits[0, -1], atol=1e-5, rtol=0)


def test_a_kv_cache_cropped_back_is_right_again_and_generate_is_guarded():
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = llama().eval()
    nest = sn.from_transformers(model, depth=[2])
    x, a, b = ids(b=1, t=6), ids(seed=2, b=1, t=1), ids(seed=3, b=1, t=1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=x, **{KV: cache}, use_cache=True)            # the full model: 6 positions
        with nest.use("depth=2"):
            model(input_ids=a, **{KV: cache}, use_cache=True)        # layers 2, 3 miss position 6
        with pytest.raises(sn.SortedNetError, match="back to 6 positions"):
            model(input_ids=b, **{KV: cache}, use_cache=True)
        for layer in cache.layers:  # (transformers 5: a layer's crop takes the count to remove)
            if layer.get_seq_length() > 6:
                layer.crop(6 - layer.get_seq_length())
        got = model(input_ids=b, **{KV: cache}, use_cache=True).logits[0, -1]
        torch.testing.assert_close(got, model(input_ids=torch.cat([x, b], 1)).logits[0, -1], atol=1e-5, rtol=0)
        cache = DynamicCache(config=model.config)
        with nest.use("depth=2"):
            first = model.generate(x, max_new_tokens=2, do_sample=False, **{KV: cache}, pad_token_id=0)
        with pytest.raises(sn.SortedNetError, match="key/value cache"):
            model.generate(first, max_new_tokens=2, do_sample=False, **{KV: cache}, pad_token_id=0)


@pytest.mark.parametrize("sub", [None, "depth=3", "ffn=24,heads=2,depth=3"])
def test_transformers_assistant_early_exit_runs_on_a_wrapped_model(sub):
    """transformers' early-exit drafting lowers ``config.num_hidden_layers`` while its draft runs its own cache
    through the first layers: the cache guard counts the layers the forward really runs (it refused the
    draft's cache, and transformers then left the config lowered: every later forward ran one layer)."""
    torch.manual_seed(0)
    model = llama().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)  # distinct top logits: greedy decoding has no ties to break
    nest = sn.from_transformers(model, ffn=[24], heads=[2], depth=[3])
    x = ids(b=1, t=6)
    with torch.no_grad(), (nest.use(sub) if sub else contextlib.nullcontext()):
        want = model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        got = model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                             assistant_early_exit=1)
    assert torch.equal(got, want)
    assert model.config.num_hidden_layers == 4


def test_a_kv_cache_reaching_the_model_by_other_routes_is_guarded_too():
    """A deep copy of a prompt cache (Hugging Face's way to reuse one) keeps its record: continued by the
    same sub-model it is exact, by another refused; a cache passed positionally or to the inner model is
    checked alike; a non-empty cache the nest never saw filled (before wrap, by an export) is refused."""
    import copy

    from transformers import DynamicCache

    torch.manual_seed(0)
    model = llama().eval()
    x, nxt = ids(b=1, t=6), ids(seed=2, b=1, t=1)
    before = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=x, **{KV: before}, use_cache=True)   # filled before wrap
    nest = sn.from_transformers(model, ffn=[24], depth=[2])
    small = nest.export("ffn=24")
    with torch.no_grad():
        prompt = DynamicCache(config=model.config)
        with nest.use("ffn=24"):
            model(input_ids=x, **{KV: prompt}, use_cache=True)
            want = model(input_ids=torch.cat([x, nxt], 1)).logits[0, -1]
            got = model(input_ids=nxt, **{KV: copy.deepcopy(prompt)}, use_cache=True).logits[0, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for run in (lambda c: model(nxt, None, None, c, use_cache=True),           # positional
                    lambda c: model.model(input_ids=nxt, **{KV: c}, use_cache=True),  # the inner model
                    lambda c: model(input_ids=nxt, **{KV: c}, use_cache=True)):
            with pytest.raises(sn.SortedNetError, match=r"computed by sub-model ffn=24 \(at any depth\); .*"
                                                        r"\(ffn 24 -> 48; any dimension but depth"):  # (the change)
                run(copy.deepcopy(prompt))
        exported = DynamicCache(config=model.config)
        small(input_ids=x, **{KV: exported}, use_cache=True)
        for c in (before, exported):
            with pytest.raises(sn.SortedNetError, match="did not see computed"):
                model(input_ids=nxt, **{KV: c}, use_cache=True)


def test_an_encoder_decoder_cache_is_continued_by_its_own_submodel_only():
    """T5 under one Depth: the cross-attention keys come from the encoder, so even a shallower depth
    would read another encoder's output."""
    from transformers import DynamicCache, EncoderDecoderCache, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                             pad_token_id=0, eos_token_id=1)).eval()
    nest = sn.from_transformers(t5, depth=[1])
    x, dec, nxt = torch.tensor([[3, 1, 4, 1, 5]]), torch.tensor([[0, 7, 8]]), torch.tensor([[9]])

    def cache():
        return EncoderDecoderCache(DynamicCache(config=t5.config), DynamicCache(config=t5.config))

    with torch.no_grad():
        for first, then in (("depth=2", "depth=1"), ("depth=1", "depth=2")):
            c = cache()
            with nest.use(first):
                t5(input_ids=x, decoder_input_ids=dec, **{KV: c}, use_cache=True)
            with nest.use(then), pytest.raises(sn.SortedNetError, match="encoder-decoder"):
                t5(input_ids=x, decoder_input_ids=nxt, **{KV: c}, use_cache=True)
        with nest.use("depth=1"):  # its own cache: as without sortednet
            c = cache()
            t5(input_ids=x, decoder_input_ids=dec, **{KV: c}, use_cache=True)
            got = t5(input_ids=x, decoder_input_ids=nxt, **{KV: c}, use_cache=True).logits[0, -1]
            want = t5(input_ids=x, decoder_input_ids=torch.cat([dec, nxt], 1)).logits[0, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_an_encoder_output_goes_to_its_own_submodels_decoder_only():
    """``encoder_outputs`` computed under one sub-model and given to the decoder under another ran silently (the
    cache check sees caches only): the decoder's cross-attention read another model's encoding (logits 4.4 to
    7.5 from either sub-model's own). Now refused; the same sub-model, and generate, run as before."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                             pad_token_id=0, eos_token_id=1)).eval()
    nest = sn.from_transformers(t5, ffn=[32], heads=[2], depth=[1])
    x, dec = torch.tensor([[3, 1, 4, 1, 5]]), torch.tensor([[0, 7, 8]])
    with torch.no_grad():
        for a, b in (("ffn=64,heads=4,depth=2", "depth=1"), ("depth=1", "ffn=64,heads=4,depth=2"),
                     ("ffn=64,heads=4,depth=2", "heads=2")):
            with nest.use(a):
                enc = t5.get_encoder()(input_ids=x)
            with nest.use(b), pytest.raises(sn.SortedNetError, match="encoder output"):
                t5(encoder_outputs=enc, decoder_input_ids=dec)
            with nest.use(a):
                got = t5(encoder_outputs=enc, decoder_input_ids=dec).logits
                torch.testing.assert_close(got, t5(input_ids=x, decoder_input_ids=dec).logits, atol=1e-5, rtol=0)
        with nest.use("depth=1"):
            assert t5.generate(x, max_new_tokens=3, num_beams=2).shape[0] == 1


@pytest.mark.parametrize("how", ["beams", "sequences", "copy", "in_place"])
def test_an_encoder_output_expanded_or_copied_keeps_its_submodel(how):
    """generate expands encoder_outputs for beams / several sequences (each row repeated, a new tensor): the note
    was lost and the decoder of another sub-model read that encoding in silence (beam search under one sub-model
    with the other's encoder). The copy is now found by its values; the same sub-model runs as before."""
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutput

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                             pad_token_id=0, eos_token_id=1)).eval()
    nest = sn.from_transformers(t5, ffn=[32], heads=[2], depth=[1])
    x = torch.tensor([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]])
    kw = {"beams": dict(num_beams=2), "sequences": dict(num_beams=2, num_return_sequences=2), "copy": {},
          "in_place": dict(num_beams=2)}[how]
    a, b = "ffn=64,heads=4,depth=2", "ffn=32,heads=4,depth=2"
    with torch.no_grad():
        with nest.use(a):  # (in_place: no other encoding of the same values may stay alive)
            enc = None if how == "in_place" else t5.get_encoder()(input_ids=x).last_hidden_state
        given = enc.clone() if how == "copy" else enc  # (copy: the original stays alive, as a cache of them does)

        def run():
            if how == "in_place":  # the encoder's own output object, which generate expands in place: the
                with nest.use(a):  # noted tensor is no longer referenced anywhere
                    out = t5.get_encoder()(input_ids=x)
                return t5.generate(encoder_outputs=out, max_new_tokens=4, do_sample=False, **kw)
            return t5.generate(encoder_outputs=BaseModelOutput(last_hidden_state=given), max_new_tokens=4,
                               do_sample=False, **kw)

        with nest.use(b), pytest.raises(sn.SortedNetError, match="encoder output"):
            run()
        with nest.use(a):
            assert torch.equal(run(), t5.generate(x, max_new_tokens=4, do_sample=False, **kw))


def test_equal_encodings_of_two_submodels_serve_the_one_in_force():
    """LoRA ranks start with zero adapters: every rank encodes alike. An encoding kept from rank=4 matched the
    expanded one of rank=2 by its values and refused it; the note of the sub-model in force wins."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    nest = sn.from_transformers(t5, rank=[2, 4])
    x = torch.randint(2, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with nest.use("rank=4"):
            kept = t5.get_encoder()(input_ids=x)
        with nest.use("rank=2"):
            mine = t5.get_encoder()(input_ids=x)
            assert torch.equal(kept.last_hidden_state, mine.last_hidden_state)
            got = t5.generate(encoder_outputs=mine, max_new_tokens=3, num_beams=2)
            assert torch.equal(got, t5.generate(x, max_new_tokens=3, num_beams=2))


def test_an_encoder_output_serves_every_decoder_only_submodel_and_pickles_plainly(tmp_path):
    """Dimensions that do not reach the encoder may differ (its output is the same); the note is kept beside the
    tensor, so ``torch.load`` (weights_only) reads a saved encoder output as without sortednet."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                             pad_token_id=0, eos_token_id=1)).eval()
    nest = sn.wrap(t5, sn.Width("ffn", [16, 64], out="decoder.block.*.layer.2.DenseReluDense.wi",
                                inp="decoder.block.*.layer.2.DenseReluDense.wo"),
                   sn.Depth("ddepth", [1, 2], layers="decoder.block"))
    x, dec = torch.tensor([[3, 1, 4, 1, 5]]), torch.tensor([[0, 7, 8]])
    with torch.no_grad():
        enc = t5.get_encoder()(input_ids=x)
        for sub in nest.submodels:
            with nest.use(sub):
                torch.testing.assert_close(t5(encoder_outputs=enc, decoder_input_ids=dec).logits,
                                           t5(input_ids=x, decoder_input_ids=dec).logits, atol=1e-5, rtol=0)
    torch.save({"encoded": enc.last_hidden_state}, tmp_path / "enc.pt")
    assert torch.equal(torch.load(tmp_path / "enc.pt")["encoded"], enc.last_hidden_state)


def test_a_static_cache_reset_and_reused_under_another_head_count_is_refused():
    """reset() empties a StaticCache but keeps tensors shaped for the head count that filled it: reused under
    another one, PyTorch raised inside index_copy_. A depth change after reset still runs."""
    from transformers import StaticCache

    model = llama().eval()
    nest = sn.from_transformers(model, heads=[2], depth=[2])
    x = ids()[:1]
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        with nest.use("heads=2,depth=4"):
            model.generate(x, max_new_tokens=2, do_sample=False, **{KV: cache})
        cache.reset()
        with nest.use("heads=4,depth=4"), pytest.raises(sn.SortedNetError, match="reset"):
            model.generate(x, max_new_tokens=2, do_sample=False, **{KV: cache})
        cache.reset()
        with nest.use("heads=2,depth=2"):
            model.generate(x, max_new_tokens=2, do_sample=False, **{KV: cache})


def test_a_static_cache_preallocated_for_the_full_model_is_refused_under_fewer_heads():
    """generate(cache_implementation="static", prefill_chunk_size=...) allocates the StaticCache from the config
    (the full model's key/value heads) before the first write: a sub-model with fewer heads failed with a bare
    RuntimeError inside index_copy_. Refused by name before the forward; the full model and a cache that sizes
    itself on its first write run."""
    model = llama().eval()
    nest = sn.from_transformers(model, heads=[2])
    assert model.config.num_key_value_heads > 1
    x = ids()[:1]
    kw = dict(max_new_tokens=3, do_sample=False, cache_implementation="static", prefill_chunk_size=2)
    with torch.no_grad():
        with nest.use("heads=2"), pytest.raises(sn.SortedNetError, match=r"allocated for the full model's \d+ "
                                                                          r"key/value heads"):
            model.generate(x, **kw)
        with nest.use("heads=2"):
            want = model.generate(x, max_new_tokens=3, do_sample=False)
        torch.testing.assert_close(nest.export("heads=2").generate(x, **kw), want)
        model.generate(x, **kw)


def test_a_preallocated_cache_is_judged_by_the_heads_that_reach_its_model():
    """A Heads dimension of another part of the model (an attention pooler over the LM's hidden states) does not
    shrink the LM's keys: its full-size static cache was refused under the pooler's smaller head count. An
    encoder-decoder cache allocated for the full decoder under fewer heads failed inside index_copy_ (its
    self-attention cache was not looked into); refused by name now."""
    from transformers import EncoderDecoderCache, StaticCache, T5Config, T5ForConditionalGeneration

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = llama().eval()
            self.pool = torch.nn.MultiheadAttention(self.lm.config.hidden_size, 4, batch_first=True)

        def forward(self, x):
            h = self.lm(x, output_hidden_states=True).hidden_states[-1]
            return self.pool(h, h, h, need_weights=False)[0]

    w = Pooled().eval()
    nest = sn.wrap(w, sn.Heads("ph", [2, 4], attn="pool"))
    x = ids()[:1]
    kw = dict(max_new_tokens=3, do_sample=False, cache_implementation="static", prefill_chunk_size=2)
    with torch.no_grad():
        with nest.use("ph=4"):
            want = w.lm.generate(x, **kw)
        with nest.use("ph=2"):
            torch.testing.assert_close(w.lm.generate(x, **kw), want)
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=30, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    nest = sn.from_transformers(t5, heads=[2])
    cfg = t5.config.get_text_config(decoder=True)
    caches = [StaticCache(config=cfg, max_cache_len=n) for n in (8, 5)]
    for c in caches:
        c.early_initialization(batch_size=1, num_heads=4, head_dim=8, dtype=torch.float32, device="cpu")
    with torch.no_grad(), nest.use("heads=2"), pytest.raises(sn.SortedNetError, match=r"allocated for the full "
                                                                                       r"model's 4 key/value heads"):
        t5.generate(torch.tensor([[5, 6, 7, 8, 9]]), max_new_tokens=3, do_sample=False, eos_token_id=None,
                    **{KV: EncoderDecoderCache(*caches)})


def test_a_dynamic_cache_cropped_to_nothing_keeps_its_head_count():
    """A DynamicCache cropped to no position keeps (batch, kv heads, 0, head_dim) tensors, which the next update
    concatenates to: another head count failed inside torch.cat; now refused by name. The same heads, or another
    depth, continue it as a new cache, equal to a fresh one."""
    from transformers import DynamicCache

    model = llama().eval()
    nest = sn.from_transformers(model, heads=[2], depth=[2])
    x = ids()[:1]
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        with nest.use("heads=2,depth=4"):
            model(input_ids=x, use_cache=True, **{KV: cache})
        cache.crop(-x.shape[1])
        assert cache.get_seq_length() == 0
        with nest.use("heads=4,depth=4"), pytest.raises(sn.SortedNetError, match="cropped to no position"):
            model(input_ids=x, use_cache=True, **{KV: cache})
        with nest.use("heads=2,depth=4"):
            got = model(input_ids=x, use_cache=True, **{KV: cache}).logits
            torch.testing.assert_close(got, model(input_ids=x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sub", [None, "ffn=24,depth=2"])
def test_the_manual_decode_loop_continues_the_cache_the_forward_made(sub):
    """``out = model(ids, use_cache=True)`` then ``model(next, cache=out.cache)``: the cache the forward made
    itself is known to the nest (exact, as the export), and a crop that leaves the layers of a shallower
    step shorter than the others is refused, whatever the bookkeeping says."""
    torch.manual_seed(0)
    model = llama().eval()
    nest = sn.from_transformers(model, ffn=[24], depth=[2])
    x = ids(b=1, t=6)
    small = nest.export(sub) if sub else nest.export(nest.largest)
    with torch.no_grad(), (nest.use(sub) if sub else contextlib.nullcontext()):
        out, ref = model(input_ids=x, use_cache=True), small(input_ids=x, use_cache=True)
        cache, rcache = (getattr(o, KV, None) or o.past_key_values for o in (out, ref))
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            out, ref = model(input_ids=nxt, **{KV: cache}, use_cache=True), small(input_ids=nxt, **{KV: rcache},
                                                                                   use_cache=True)
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
            nxt = out.logits[:, -1:].argmax(-1)
    with torch.no_grad():
        full = model(input_ids=x, use_cache=True)
        c = getattr(full, KV, None) or full.past_key_values
        with nest.use("depth=2"):
            model(input_ids=nxt, **{KV: c}, use_cache=True)     # layers 2, 3 stay at 6 positions
        for layer in c.layers:                                  # the same count off every layer: [6, 6, 5, 5]
            layer.crop(-1)
        with pytest.raises(sn.SortedNetError, match="layer 2 holds 5 positions and layer 0 holds 6"):
            model(input_ids=nxt, **{KV: c}, use_cache=True)


@pytest.mark.parametrize("build", [gpt2, llama])
def test_attention_flops_are_counted_whatever_the_attention_kernel(build):
    """The score matmuls count the same under eager attention and under SDPA (whose CPU kernel PyTorch's
    FLOP table does not know), and fewer heads cost fewer of them."""
    x = torch.randint(0, V, (2, 24))
    counts = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = build()
        model.config._attn_implementation = impl
        nest = sn.from_transformers(model, heads=[0.5, 1.0])
        counts[impl] = [nest.cost(s, "flops", example=x) for s in (nest.smallest, nest.largest)]
    assert counts["eager"] == counts["sdpa"]
    assert counts["sdpa"][0] < counts["sdpa"][1]


@pytest.mark.parametrize("family", ["Mixtral", "Qwen2Moe"])
def test_expert_flops_are_counted_whatever_the_experts_kernel(family):
    """Mixture-of-experts layers run their experts as grouped matmuls (transformers' default), batched
    matmuls or a loop of Linears: the FLOPs of every ffn width count the same under each (PyTorch's FLOP
    table has no formula for the grouped one, which once counted every width as zero expert work and made
    ``pick(flops=)`` return the largest sub-model for the smallest's budget)."""
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=16, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        num_local_experts=4, num_experts=4, num_experts_per_tok=2)
    x = torch.randint(0, V, (2, 8))
    counts = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        torch.manual_seed(0)
        model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
        model.set_experts_implementation(impl)
        assert model.config._experts_implementation == impl
        nest = sn.from_transformers(model, ffn=[4, 8])
        counts[impl] = [nest.cost(s, "flops", example=x) for s in nest.submodels]
        assert nest.pick(flops=counts[impl][0]) == nest.smallest
    assert counts["grouped_mm"] == counts["batched_mm"] == counts["eager"]
    assert counts["eager"][0] < counts["eager"][1] < counts["eager"][2]


def test_the_cache_guard_never_reads_the_deprecated_cache_alias(monkeypatch):
    """transformers 5 outputs carry ``cache``; reading their ``past_key_values`` alias logs a deprecation
    warning at every forward of a wrapped model that makes no cache (training, ``use_cache=False``)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

    if "cache" not in getattr(CausalLMOutputWithPast, "__dataclass_fields__", ()):
        pytest.skip("this transformers' outputs have no `cache` field")

    def alias(self):
        raise AssertionError("read the deprecated past_key_values alias")

    for cls in (CausalLMOutputWithPast, BaseModelOutputWithPast):
        monkeypatch.setattr(cls, "past_key_values", property(alias))
    model = llama()
    nest = sn.from_transformers(model, ffn=[0.5])
    x = torch.randint(0, V, (2, 6))
    with nest.use(nest.smallest), torch.no_grad():
        model(x, use_cache=False)
        assert model(x, use_cache=True).cache is not None


@pytest.mark.parametrize("enc, dec", [(4, 2), (2, 4)])
def test_layer_lists_of_different_lengths_are_named_in_order(enc, dec):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=enc,
                                             num_decoder_layers=dec, num_heads=4))
    with pytest.raises(sn.SortedNetError, match=rf"\['encoder.block', 'decoder.block'\] have different lengths "
                                                rf"\[{enc}, {dec}\]"):
        sn.from_transformers(t5, depth=[1])


def test_a_heads_dimension_of_layers_the_depth_drops_does_not_shape_the_config(tmp_path):
    """Heads sliced only in layers 2-3, depth 1: the export is layer 0 at full size, which a stock config
    describes (it was refused, the config taking the head count of a dimension whose layers were all dropped);
    with those layers kept, unequal head counts per layer are still refused."""
    torch.manual_seed(0)
    model = llama().eval()
    layers = [f"model.layers.{i}.self_attn" for i in (2, 3)]
    nest = sn.wrap(model, sn.Heads("h", [2, 4], attn=layers, qkv=["q_proj", "k_proj", "v_proj"], o="o_proj"),
                   sn.Depth("depth", [1, 4], layers="model.layers"))
    x = ids()
    for sub in ("h=2,depth=1", "h=4,depth=1"):
        small = nest.export(sub)
        assert small.config.num_attention_heads == 4 and small.config.num_hidden_layers == 1
        with torch.no_grad(), nest.use(sub):
            live = out(model, x)
        small.save_pretrained(tmp_path / sub)
        again = LlamaForCausalLM.from_pretrained(tmp_path / sub).eval()
        with torch.no_grad():
            torch.testing.assert_close(out(small, x), live, atol=1e-5, rtol=0)
            torch.testing.assert_close(out(again, x), live, atol=1e-5, rtol=0)
    with pytest.raises(sn.SortedNetError, match="cannot be described by LlamaConfig"):
        nest.export("h=2,depth=4")


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_multi_query_models_nest_their_query_heads(family, tmp_path):
    """num_key_value_heads=1 (Gemma-2B, PaLM-style): heads=[1, 2] was refused ('multiples of 4'); now each
    sub-model keeps the one key/value head, exports with a stock config that reloads, and generates as live."""
    from transformers import GemmaConfig, GemmaForCausalLM

    cls, cfg_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "gemma": (GemmaForCausalLM, GemmaConfig)}[family]
    torch.manual_seed(0)
    model = cls(cfg_cls(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=8, bos_token_id=0,
                        eos_token_id=None, pad_token_id=0)).eval()
    nest = sn.from_transformers(model, heads=[0.25, 0.5], ffn=[24])  # (fractions: 1 and 2 heads)
    assert [d.sizes for d in nest.dims if d.kind == "heads"] == [(1, 2, 4)]
    x = ids(b=2, t=7)
    with torch.no_grad():
        before = out(model, x)
    sn.sort_by_importance(nest, [ids(seed=5, b=2, t=8)])
    with torch.no_grad():
        torch.testing.assert_close(out(model, x), before, atol=1e-5, rtol=0)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            live = out(model, x)
            gen = model.generate(x[:1], max_new_tokens=4, do_sample=False)
        small = nest.export(sub)
        assert small.config.num_key_value_heads == 1 and small.config.num_attention_heads == sub["heads"]
        small.save_pretrained(tmp_path / str(sub))
        again = cls.from_pretrained(tmp_path / str(sub)).eval()
        with torch.no_grad():
            torch.testing.assert_close(out(small, x), live, atol=1e-5, rtol=0)
            torch.testing.assert_close(out(again, x), live, atol=1e-5, rtol=0)
            assert torch.equal(small.generate(x[:1], max_new_tokens=4, do_sample=False), gen)


def test_verify_on_a_model_its_input_does_not_fit_says_it_did_not_run():
    """BertForMultipleChoice takes (batch, choices, length) ids: the check's made-up input does not run, and
    verify=True returned in silence."""
    from transformers import BertConfig, BertForMultipleChoice

    model = BertForMultipleChoice(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=48)).eval()
    with pytest.warns(UserWarning, match="BertForMultipleChoice does not run on the input this check makes up"):
        sn.from_transformers(model, heads=[2], ffn=[0.5])


def test_verify_on_a_model_without_weights_says_it_did_not_run():
    """from_transformers(verify=True) on the meta device returned a nest as if verified: now a warning says the
    layout was not checked (verify=False asks for nothing and gets no warning)."""
    import warnings

    with torch.device("meta"):
        model = llama()
    with pytest.warns(UserWarning, match=r"verify=True\): the LlamaForCausalLM is on the meta device"):
        nest = sn.from_transformers(model, ffn=[24])
    nest.unwrap()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sn.from_transformers(model, ffn=[24], verify=False)


def test_a_whole_model_compiled_decode_loop_continues_its_cache(fresh_dynamo):
    """torch.compile(model) traces the cache check's hooks: the check's first steps broke the graph and ran
    it eagerly, refusing every compiled decode step (a cache its compiled prefill could not record)."""
    torch.manual_seed(0)
    model = llama().eval()
    nest = sn.from_transformers(model, ffn=[24], heads=[2], depth=[2])
    compiled = torch.compile(model, backend="eager")
    x, nxt = ids(b=1, t=6), ids(seed=2, b=1, t=1)
    for sub in (nest.smallest, nest.largest):
        with torch.no_grad(), nest.use(sub):
            want = model(input_ids=torch.cat([x, nxt], 1)).logits[0, -1]
            out = compiled(input_ids=x, use_cache=True)
            got = compiled(input_ids=nxt, **{KV: out.cache if hasattr(out, "cache") else out.past_key_values},
                           use_cache=True).logits[0, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            with pytest.raises(sn.SortedNetError, match="did not see computed"):  # eager: no record to trust
                model(input_ids=nxt, **{KV: out.cache if hasattr(out, "cache") else out.past_key_values})


def test_nest_compile_checks_the_cache_as_eager_does(fresh_dynamo):
    """``nest.compile()`` continued a cache another sub-model filled (the root's cache check returns at once
    inside the graph): a silent mix of two models. Its wrapper now runs the check eagerly around the compiled
    call: refused as in eager, and its own decode loop (prefill, then one token) continues and is exact."""
    torch.manual_seed(0)
    model = llama().eval()
    nest = sn.from_transformers(model, ffn=[24], heads=[2], depth=[2])
    step = nest.compile(backend="eager")
    x, nxt = ids(b=1, t=6), ids(seed=2, b=1, t=1)
    other = nest.resolve({"ffn": 24, "heads": 4, "depth": 4}) if nest.largest["ffn"] != 24 else nest.smallest
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            with nest.use(nest.largest):
                out = model(input_ids=x, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            with nest.use(other), pytest.raises(sn.SortedNetError, match="computed by sub-model"):
                step(input_ids=nxt, **{KV: cache}, use_cache=True)
            with nest.use(nest.largest):
                want = model(input_ids=torch.cat([x, nxt], 1)).logits[0, -1]
                out = step(input_ids=x, use_cache=True)
                got = step(input_ids=nxt, **{KV: out.cache if hasattr(out, "cache") else out.past_key_values},
                           use_cache=True).logits[0, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_from_transformers_checks_its_options_before_wrapping():
    """A type fuzzer: ``verify=tensor`` raised a raw RuntimeError AFTER wrapping (the model was left wrapped, a
    retry refused as 'already wrapped'); ``rank_targets="self_attn.q_proj"`` and ``ffn="0.5"`` were split into
    characters; ``ffn=[np.int64(24)]`` was refused while ``np.float64`` was taken; ``rank_mode=`` /
    ``rank_targets=`` without ``rank=`` were ignored in silence (no Rank dimension)."""
    import re

    import numpy as np

    model = llama()
    classes = [type(m) for m in model.modules()]
    for kw, needle in [(dict(ffn=[0.5], verify=torch.tensor([1, 0])), "verify=..."),
                       (dict(ffn=[0.5], verify="no"), "verify=..."),
                       (dict(rank=[4], rank_targets="self_attn.q_proj"), "rank_targets="),
                       (dict(rank=[4], rank_targets=[None]), "rank_targets="),
                       (dict(ffn="0.5"), "got str '0.5'"),
                       (dict(ffn=[0.5], rank_mode="svd"), "rank_mode= / rank_targets= describe a Rank"),  # (no
                       (dict(depth=[2], rank_targets=["self_attn.q_proj"]), "only rank= (its sizes")]:  # rank=)
        with pytest.raises(sn.SortedNetError, match=re.escape(needle)):
            sn.from_transformers(model, **kw)
        assert [type(m) for m in model.modules()] == classes, kw
    with pytest.raises(sn.SortedNetError, match=re.escape("rank_targets= names SiLU")):  # (not "the layout has")
        sn.from_transformers(model, rank=[4], rank_targets=["mlp.act_fn"])
    assert [type(m) for m in model.modules()] == classes
    gen = sn.from_transformers(model, rank=(r for r in [2, 4]))  # (a generator: "needs at least one size")
    assert gen.dims[0].sizes == (2, 4)
    gen.unwrap()
    nest = sn.from_transformers(model, ffn=[np.int64(24)], heads=[np.float32(0.5)])
    assert nest.smallest == sn.SubModel(ffn=24, heads=2)
    # sort_by_importance: raw TypeError / IndexError / KeyError before, the model unchanged throughout
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = ids()
    for kw, needle in [(dict(batches=None), "batches="), (dict(batches=x), "pass [batch]"),
                       (dict(batches={"input_ids": x}), "pass [batch]"), (dict(batches=[x], loss_fn=5), "loss_fn="),
                       (dict(batches=[x, x + V]), "outside the model's vocabulary"),
                       (dict(batches=[{"input_ids": x + V, "labels": x}]), "outside the model's vocabulary"),
                       (dict(batches=[x], ffn="yes"), "ffn=..."),
                       (dict(batches=[x], loss_fn=lambda m, b: m(input_ids=b, labels=b[:, ::2]).loss),
                        "the loss of batch 0 raised ValueError")]:
        with pytest.raises(sn.SortedNetError, match=re.escape(needle)):
            sn.sort_by_importance(nest, **kw)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), kw
    nest.unwrap()
    with pytest.raises(sn.SortedNetError, match="unwrapped"):
        sn.sort_by_importance(nest, [x])


def test_several_layer_lists_are_refused_with_advice_that_fits_them():
    """The refusal advised ``sn.from_transformers(model.vision_model, ...)`` for every model with several layer
    lists: BART has no vision_model (its towers are model.encoder / model.decoder) and Swin's lists are stages."""
    from transformers import BartConfig, BartForConditionalGeneration, SwinConfig, SwinModel

    bart = BartForConditionalGeneration(BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
                                                   encoder_attention_heads=4, decoder_attention_heads=4,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32))
    with pytest.raises(sn.SortedNetError, match=r"model\.get_submodule\('model\.encoder'\)"):
        sn.from_transformers(bart, ffn=[32])
    nest = sn.from_transformers(bart.get_submodule("model.encoder"), ffn=[32])
    assert nest.smallest == sn.SubModel(ffn=32)
    swin = SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                window_size=4))
    with pytest.raises(sn.SortedNetError, match="stages of one network"):
        sn.from_transformers(swin, ffn=[0.5])


def test_a_decoder_tower_is_described_by_its_own_config_keys():
    """BART's decoder tower nested alone, or BartForCausalLM: the layout's num_attention_heads / num_hidden_layers
    are the encoder's keys there (BartConfig maps them to encoder_*). Heads were refused and a shallower export
    refused pointing to plain=True (and BartForCausalLM's ffn= export failed: "BartConfig has no 'ffn_dim'"); the
    decoder's own keys (decoder_attention_heads, decoder_layers, decoder_ffn_dim) describe them now: the head count
    is the decoder's (8 encoder heads, 4 decoder heads), shallower and narrower exports load with the stock class and
    equal the live sub-model, the encoder's keys stay as they were."""
    from transformers import BartConfig, BartForCausalLM, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=V, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=8,
                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=64, max_position_embeddings=32)
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(cfg).eval()
    decoder = bart.get_submodule("model.decoder")
    nest = sn.from_transformers(decoder, heads=[2], depth=[1], ffn=[32])
    assert nest.dims[1].full == 4  # the decoder's head count
    ids, enc = torch.randint(0, V, (1, 5)), torch.randn(1, 4, 32)
    for sub in nest.submodels:
        with nest.use(sub), torch.no_grad():
            want = decoder(input_ids=ids, encoder_hidden_states=enc).last_hidden_state
        small = nest.export(sub, plain=sub["heads"] < 4).eval()
        if sub["heads"] == 4:
            assert (small.config.decoder_layers, small.config.decoder_ffn_dim) == (sub["depth"], sub["ffn"])
            assert (small.config.encoder_layers, small.config.encoder_ffn_dim) == (3, 48)
        with torch.no_grad():
            torch.testing.assert_close(small(input_ids=ids, encoder_hidden_states=enc).last_hidden_state, want)
    assert bart.config.encoder_layers == 3 and bart.config.decoder_layers == 2
    from transformers import WhisperConfig, WhisperForCausalLM  # (no is_decoder flag on its config: found by its
    whisper = WhisperConfig(vocab_size=V, d_model=32, encoder_layers=3, decoder_layers=2,  # decoder tower)
                            encoder_attention_heads=8, decoder_attention_heads=4, encoder_ffn_dim=48,
                            decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
                            pad_token_id=1, decoder_start_token_id=2, bos_token_id=0, eos_token_id=2)
    for causal in (BartForCausalLM(cfg).eval(), WhisperForCausalLM(whisper).eval()):
        nest = sn.from_transformers(causal, depth=[1], ffn=[32], heads=[2])
        assert nest.dims[1].full == 4
        for sub in nest.submodels:
            with nest.use(sub), torch.no_grad():
                want = causal(input_ids=ids, use_cache=False).logits
            small = nest.export(sub, plain=sub["heads"] < 4).eval()
            if sub["heads"] == 4:
                assert (small.config.decoder_layers, small.config.decoder_ffn_dim) == (sub["depth"], sub["ffn"])
                assert (small.config.encoder_layers, small.config.encoder_ffn_dim) == (3, 48)
            with torch.no_grad():
                torch.testing.assert_close(small(input_ids=ids, use_cache=False).logits, want)


def test_a_vision_classifier_of_a_two_tower_config_reads_its_towers_keys():
    """SigLIP's and CLIP's image classifiers keep only the vision tower of a config that also describes a text tower:
    the keys were read from (and written to) the text config, so heads= took the text tower's head count (refused
    at wrap: 2 heads against the attention's 4) and a shallower export was refused (the vision config kept its
    layers). The vision config is read and written now."""
    from transformers import CLIPConfig, CLIPForImageClassification, SiglipConfig, SiglipForImageClassification

    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
              patch_size=4)
    tc = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
    px = torch.randn(2, 3, 16, 16)
    for cls, cfg_cls, kw in ((SiglipForImageClassification, SiglipConfig, dict(depth=[1, 2])),
                             (CLIPForImageClassification, CLIPConfig, dict(depth=[1, 2], ffn=[32]))):
        torch.manual_seed(0)
        m = cls(cfg_cls(text_config=tc, vision_config=vc)).eval()
        nest = sn.from_transformers(m, heads=[2], **kw)
        assert next(d for d in nest.dims if d.name == "heads").full == 4
        for sub in nest.submodels:
            with nest.use(sub), torch.no_grad():
                want = m(pixel_values=px).logits
            small = nest.export(sub, plain=sub["heads"] < 4).eval()
            if sub["heads"] == 4:
                assert small.config.vision_config.num_hidden_layers == sub["depth"]
                assert small.config.text_config.num_hidden_layers == 2
                if "ffn" in sub:
                    assert small.config.vision_config.intermediate_size == sub["ffn"]
            with torch.no_grad():
                torch.testing.assert_close(small(pixel_values=px).logits, want)


def test_a_t5_decoder_tower_has_a_config_of_its_own_and_exports_shallower():
    """T5 builds its decoder from a copy of the config whose num_layers is the decoder's: its depth exports are
    right (a refusal meant for BART's shared config must not reach it)."""
    from transformers import T5Config, T5ForConditionalGeneration

    m = T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                            num_decoder_layers=3, num_heads=4)).eval()
    nest = sn.from_transformers(m.decoder, heads=[2], depth=[1])
    ids, enc = torch.randint(0, V, (1, 5)), torch.randn(1, 4, 32)
    for sub in nest.submodels:
        small = nest.export(sub).eval()
        assert small.config.num_layers == sub["depth"] == len(small.block)
        with nest.use(sub), torch.no_grad():
            want = m.decoder(input_ids=ids, encoder_hidden_states=enc).last_hidden_state
        with torch.no_grad():
            torch.testing.assert_close(small(input_ids=ids, encoder_hidden_states=enc).last_hidden_state, want)


def test_alibi_models_refuse_heads_naming_alibi_and_nest_the_rest():
    """Bloom (and Falcon with alibi=True) build ALiBi slopes for every head of the config: the heads refusal came
    from the self-check as a tensor-shape error that did not say why."""
    from transformers import BloomConfig, BloomForCausalLM

    m = BloomForCausalLM(BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4))
    classes = [type(x) for x in m.modules()]
    with pytest.raises(sn.SortedNetError, match="ALiBi"):
        sn.from_transformers(m, heads=[2], ffn=[0.5])
    assert [type(x) for x in m.modules()] == classes
    assert sn.from_transformers(m, ffn=[0.5], depth=[1]).smallest == sn.SubModel(ffn=64, depth=1)


def test_a_copy_made_before_sort_by_importance_is_permuted_with_the_model():
    """A teacher / EMA deep copy made before sort_by_importance keeps following the nest's sub-models: its heads
    and FFN neurons are permuted with the model's (they ran other units under every smaller sub-model)."""
    torch.manual_seed(0)
    model = llama().eval()
    nest = sn.from_transformers(model, ffn=[16], heads=[2])
    twin = copy.deepcopy(model)
    ids = torch.randint(0, V, (2, 6))
    perms = sn.sort_by_importance(nest, [ids])
    assert any(not torch.equal(o, torch.arange(o.shape[-1])) for p in perms.values() for o in p.values())
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_optimizer_of_a_copy_is_named_or_moved_by_sort_by_importance():
    """A copy's own optimizer: named in an OptimizerStateWarning when left out (was: silent), and when passed its
    moments move with the copy's units (was: passing it changed nothing). Marked: each moment set equal to its
    parameter, so a moment that follows its units still equals it after the sort."""
    from sortednet.importance import OptimizerStateWarning

    torch.manual_seed(0)
    model = llama().eval()
    nest = sn.from_transformers(model, ffn=[16], heads=[2])
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    ids = torch.randint(0, V, (2, 6))
    twin(input_ids=ids).logits.square().mean().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        for p in twin.parameters():
            for v in opt.state[p].values():
                if v.dim():
                    v.copy_(p)
    with pytest.warns(OptimizerStateWarning, match="sort_by_importance: Adam"):
        sn.sort_by_importance(nest, [ids], heads=False)
    with torch.no_grad():
        for p in twin.parameters():
            for v in opt.state[p].values():
                if v.dim():
                    v.copy_(p)
    perms = sn.sort_by_importance(nest, [ids], optimizer=opt)
    assert any(not torch.equal(o, torch.arange(o.shape[-1])) for p in perms.values() for o in p.values())
    for name, p in twin.named_parameters():
        for k, v in opt.state[p].items():
            if v.dim():
                assert torch.equal(v, p.detach()), (name, k)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_sort_by_importance_stopped_between_two_writes_is_undone_exactly(exc):
    """A Ctrl-C (or an error) between two tensors of one module (its weight written, its bias, gradient or
    Adam moments not yet): the undo inverts exactly the writes made, so the model, gradients and optimizer
    state are all as before (and "nothing was changed" is true), or all as a never-stopped sort left them."""
    from models import InterruptAt, interrupted

    def build():
        torch.manual_seed(0)
        model = BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)).eval()
        nest = sn.from_transformers(model, ffn=[32], heads=[2])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(x).last_hidden_state.pow(2).mean().backward()
        opt.step()  # Adam's moments, and a pending gradient
        return model, nest, opt

    def state(model, opt):
        return [t.clone() for t in (*model.state_dict().values(), *(p.grad for p in model.parameters()
                                                                    if p.grad is not None),
                                    *(v for p in model.parameters() for v in opt.state[p].values()))]

    x = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))

    def loss(m, b):
        return m(b).last_hidden_state.pow(2).mean()

    model, nest, opt = build()
    with InterruptAt(10**9, "copy_") as count:
        sn.sort_by_importance(nest, [x], loss_fn=loss, optimizer=opt)
    done = state(model, opt)
    hit = 0
    for n in range(1, count.calls + 1, 3):  # (points between every module's writes: weight, bias, gradient,
        model, nest, opt = build()             # moments)
        before = state(model, opt)
        if not interrupted(n, lambda: sn.sort_by_importance(nest, [x], loss_fn=loss, optimizer=opt),  # noqa: B023
                           "copy_", exc):
            continue
        hit += 1
        now = state(model, opt)
        assert all(map(torch.equal, now, before)) or all(map(torch.equal, now, done)), f"a mix after call {n}"
    assert hit >= 10 and not all(map(torch.equal, before, done))


def test_heads_declared_by_hand_on_a_transformers_attention_are_verified_or_said_unverified():
    """``from_transformers`` verifies the layouts it declares; a ``Heads`` written by hand on a transformers
    attention class is the user's and was neither run nor warned about: a wrong layout (GPT-NeoX's fused
    projection is interleaved per head, declared stacked) ran and exported a wrong sub-model in silence."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from sortednet.check import UnverifiedHeadsWarning

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model, x = GPTNeoXForCausalLM(cfg).eval(), ids()
    wrong = sn.Heads("h", [2, 4], attn="gpt_neox.layers.*.attention", qkv="query_key_value", layout="stacked")
    with pytest.warns(UnverifiedHeadsWarning, match="gpt_neox.layers.0.attention"):
        nest = sn.wrap(model, wrong)
    with pytest.raises(sn.SortedNetError, match="not the first 2 whole heads"):
        nest.check(x)
    nest.unwrap()
    with pytest.raises(sn.SortedNetError, match="not the first 2 whole heads"):
        sn.wrap(model, wrong, example=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedHeadsWarning)
        nest = sn.from_transformers(model, heads=[2, 4])  # its own layout, verified by it: no warning
    with torch.no_grad(), nest.use("heads=2"):
        live = model(x).logits
    torch.testing.assert_close(nest.export("heads=2", plain=True)(x).logits, live, atol=1e-5, rtol=0)


def test_check_accepts_a_half_precision_rank_nest_whose_mixed_exports_round_apart():
    """check exports mixed sub-models too: a bfloat16 Llama nested with an svd Rank (the live weight is computed
    as U @ V, the export holds it merged) rounds ~1e-2 apart at its deeper, wider sub-models: plain bf16 rounding
    (float32: 9e-7), which a tenth of the half-precision tolerance refused."""
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=4)).eval().to(torch.bfloat16)
    nest = sn.from_transformers(m, ffn=[128, 256], heads=[4], depth=[2, 4], rank=[16, 64], rank_mode="svd")
    nest.check(torch.randint(0, V, (2, 12)))


class _ScaledMLP(LlamaMLP):
    def forward(self, x):
        return super().forward(x) * self.depth_scale


class _DepthScaledLlama(LlamaForCausalLM):
    """MLP branches scaled by sqrt(layers / 36), fixed when the model is built (as ESMC and MiniCPM do)."""

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = _ScaledMLP(config)
            layer.mlp.depth_scale = (config.num_hidden_layers / 36) ** 0.5
        self.post_init()


def test_an_export_whose_class_derives_a_constant_from_the_layer_count_is_refused(tmp_path):
    """The export keeps the full model's scale, a model built from its config (2 layers) computes another:
    from_pretrained of the export silently differed from the live sub-model (0.0028 here); now refused by name, the
    plain export works."""
    torch.manual_seed(0)
    model = _DepthScaledLlama(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2)).eval()
    nest = sn.from_transformers(model, ffn=[32], depth=[2])
    x = torch.randint(0, 50, (1, 7))
    ex = nest.export("ffn=32,depth=4")  # every layer kept: the same constant
    ex.save_pretrained(tmp_path)
    with nest.use("ffn=32,depth=4"), torch.no_grad():
        torch.testing.assert_close(_DepthScaledLlama.from_pretrained(tmp_path).eval()(x).logits, model(x).logits,
                                   rtol=0, atol=1e-6)
    with pytest.raises(sn.SortedNetError, match=r"model\.layers\.0\.mlp\.depth_scale is 0.333333 .* 0.235702"):
        nest.export("ffn=64,depth=2")
    plain = nest.export("ffn=64,depth=2", plain=True)
    with nest.use("ffn=64,depth=2"), torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, rtol=0, atol=1e-6)


def test_heads_refused_for_per_head_tensors_names_them():
    """Cohere with use_qk_norm normalises each head with its own weights, (heads, head_dim), which no slicer cuts:
    the refusal named only torch's size mismatch; it now names those tensors."""
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, use_qk_norm=True)).eval()
    with pytest.raises(sn.SortedNetError, match=r"per-head tensors that no slicer cuts: "
                                                r"model\.layers\.0\.self_attn\.q_norm\.weight \(4, 8\).*"
                                                r"sn\.Heads\(\.\.\., per_head=\[child\]\)"):
        sn.from_transformers(model, heads=[2])
    assert sn.from_transformers(model, ffn=[32]).cost("ffn=32") < sum(p.numel() for p in model.parameters())


def test_soft_trainer_draws_at_the_deepest_exit_and_refuses_other_depths(tmp_path):
    """With soft_exits every drawn sub-model runs at the deepest exit: a sampler drawing other depths turned those
    draws into copies (a step trained one sub-model twice, history listed depths that never ran). The default
    sampler now draws at the deepest exit; another one is refused, as are repeated exits."""
    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, ffn=[16, 32], depth=[2])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(4)]
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no")
    t = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, soft_exits=[2, 4])
    assert {s["depth"] for s in t.sampler.submodels} == {4}
    t.train()
    assert all(s["depth"] == 4 for _, subs in t.history for s in subs)
    with pytest.raises(sn.SortedNetError, match=r"the sampler also draws depth=\[2\]"):
        SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, soft_exits=[2, 4],
                      sampler=sn.Sampler(nest.submodels, k=2, seed=0))
    with pytest.raises(sn.SortedNetError, match="distinct exits"):
        SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, soft_exits=[2, 2, 4])
    with pytest.raises(sn.SortedNetError, match="exits must be distinct"):
        soft_loss(nest, ids(), exits=[2, 2, 4])
    bert_model, _, _, _ = build("bert")  # (no LM head: refused when built, not at the first step of train)
    bert_nest = sn.from_transformers(bert_model, depth=[1])  # (depths 1, 3)
    with pytest.raises(sn.SortedNetError, match=r"SoFT trains the exits of a causal \(decoder-only\) LM"):
        SortedTrainer(model=bert_model, args=args, train_dataset=data, nest=bert_nest, soft_exits=[1, 3])


def test_training_only_rates_spaced_over_the_layers_do_not_refuse_an_export(tmp_path):
    """BEiT spaces its drop-path rates over the layer count and a user may set layerdrop on a stack: both run
    only in training, so an export that keeps the live rates is no other model in eval (the derived-constant
    check refused them)."""
    from transformers import BeitConfig, BeitModel

    torch.manual_seed(0)
    beit = BeitModel(BeitConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                image_size=16, patch_size=8, drop_path_rate=0.1)).eval()
    nest = sn.from_transformers(beit, depth=[2])
    x = torch.randn(1, 3, 16, 16)
    ex = nest.export("depth=2").eval()
    with torch.no_grad(), nest.use("depth=2"):
        torch.testing.assert_close(ex(pixel_values=x).last_hidden_state, beit(pixel_values=x).last_hidden_state,
                                   rtol=0, atol=1e-5)
    model = llama().eval()
    model.model.layerdrop = 0.2
    nest = sn.from_transformers(model, depth=[2])
    nest.export("depth=2")


def test_a_slice_of_an_encoder_output_or_a_positional_one_keeps_its_submodel():
    """Encode a batch once, decode a row: h[i:i + 1] (a view) under another sub-model ran in silence, as did the
    decoder stack given the encoding by position."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                             pad_token_id=0, eos_token_id=1)).eval()
    nest = sn.from_transformers(t5, ffn=[32])
    x, dec = torch.tensor([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]]), torch.tensor([[0, 7, 8]])
    with torch.no_grad():
        with nest.use("ffn=64"):
            h = t5.get_encoder()(input_ids=x).last_hidden_state
        with nest.use("ffn=32"):
            for given in (h[:1], h[1:], h[:, :3]):
                with pytest.raises(sn.SortedNetError, match="encoder output"):
                    t5(encoder_outputs=(given,), decoder_input_ids=dec.expand(given.shape[0], -1))
            with pytest.raises(sn.SortedNetError, match="encoder output"):
                t5.decoder(dec.expand(2, -1), None, h)
        with nest.use("ffn=64"):
            t5(encoder_outputs=(h[:1],), decoder_input_ids=dec)
            t5.decoder(dec.expand(2, -1), None, h)


def test_copies_assembled_from_encoder_outputs_and_a_rewritten_buffer_keep_their_submodels():
    """Rows picked, reordered or concatenated from encoder outputs (a serving batch of requests encoded one at a
    time), or a prefix of positions copied, ran under another sub-model's decoder in silence (0.67-1.06 off); a
    buffer refilled in place kept the note of its first contents (a false refusal, then a mix let through)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                             pad_token_id=0, eos_token_id=1)).double().eval()
    nest = sn.from_transformers(t5, ffn=[32])
    x, dec = torch.tensor([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]]), torch.tensor([[0, 7, 8]])
    enc = t5.get_encoder()
    with torch.no_grad():
        with nest.use("ffn=64"):
            h = enc(input_ids=x).last_hidden_state
            one, two = enc(input_ids=x[:1]).last_hidden_state, enc(input_ids=x[1:]).last_hidden_state
        copies = (h[[1]], h[[1, 0]], h.index_select(0, torch.tensor([1])), h[:, :3].contiguous(),
                  torch.cat([one, two]))
        for given in copies:
            with nest.use("ffn=32"), pytest.raises(sn.SortedNetError, match="encoder output"):
                t5(encoder_outputs=(given,), decoder_input_ids=dec.expand(given.shape[0], -1))
            with nest.use("ffn=64"):
                t5(encoder_outputs=(given,), decoder_input_ids=dec.expand(given.shape[0], -1))
        buf = torch.empty_like(h)
        for sub in ("ffn=64", "ffn=32", "ffn=32"):  # each step: encode into the buffer, decode from it (the
            with nest.use(sub):                       # output still alive, as the guard needs to know a copy)
                last = enc(input_ids=x).last_hidden_state
                buf.copy_(last)
                t5(encoder_outputs=(buf,), decoder_input_ids=dec.expand(2, -1))
        with nest.use("ffn=64"), pytest.raises(sn.SortedNetError, match="encoder output"):
            t5(encoder_outputs=(buf,), decoder_input_ids=dec.expand(2, -1))
        with nest.use("ffn=64"):  # an output written in place (padding zeroed) is still that sub-model's
            h = enc(input_ids=x).last_hidden_state
            h[:, 3:] = 0.0
        with nest.use("ffn=32"), pytest.raises(sn.SortedNetError, match="encoder output"):
            t5(encoder_outputs=(h,), decoder_input_ids=dec.expand(2, -1))


def test_a_hybrid_with_linear_attention_layers_generates_at_every_depth():
    """MiniMax keeps its lightning-attention layers' state beside the key/value cache, whose entry for those
    layers stays empty: the cache guard read it as a layer a shallower sub-model skipped and refused generate()
    of the unchanged full model."""
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.MiniMaxConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, block_size=4,
        layer_types=["full_attention", "linear_attention", "full_attention"], max_position_embeddings=64,
        pad_token_id=0, eos_token_id=None)
    model = transformers.MiniMaxForCausalLM(cfg).eval()
    ids = torch.tensor([[5, 9, 3, 7, 11, 2]])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        before = model.generate(ids, **kw)
        nest = sn.from_transformers(model, depth=[1, 2])
        assert torch.equal(model.generate(ids, **kw).sequences, before.sequences)
        for sub in nest.submodels:
            with nest.use(sub):
                live = model.generate(ids, **kw)
            exported = nest.export(sub).eval().generate(ids, **kw)
            assert torch.equal(live.sequences, exported.sequences), sub
            torch.testing.assert_close(torch.stack(live.scores), torch.stack(exported.scores), atol=1e-5, rtol=0)
        with nest.use("depth=1"):
            cache = model(ids, use_cache=True).past_key_values
        with pytest.raises(sn.SortedNetError, match="a sub-model of depth=1 ran on this cache"), nest.use("depth=3"):
            model(torch.tensor([[4]]), past_key_values=cache)


_LOAD_WITHOUT_SORTEDNET = """
import sys
class NoSortedNet:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "sortednet":
            raise ImportError("sortednet is not installed here")
sys.meta_path.insert(0, NoSortedNet())
import torch
model = torch.load(sys.argv[1], weights_only=False)
seen = []
for m in model.modules():  # a hook of the user's after the reload is called as registered
    m.register_forward_pre_hook(lambda mod, args: seen.append(1))
    m.register_forward_hook(lambda mod, args, out: seen.append(2))
x, want = torch.load(sys.argv[2])
torch.testing.assert_close(model(x).logits, want)
assert seen
print(type(model).__name__)
"""


@pytest.mark.parametrize("plain", [True, False])
def test_an_export_loads_where_sortednet_is_not_installed(plain, tmp_path):
    """Every export kept the with-kwargs flags of the nest's cache-guard hooks (a user's hook registered under that
    id after a reload was called with kwargs: TypeError). A plain=True export's save_pretrained refusal is a
    function of sortednet's: deleted (as transformers.md says) before torch.save, the file loads without it."""
    import copy

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=16, vocab_size=50)).eval()
    nest = sn.from_transformers(model, ffn=[32], depth=[2])
    small = nest.export("ffn=32,depth=2", plain=plain)
    assert all(not d for m in small.modules() for d in (m._forward_pre_hooks_with_kwargs, m._forward_hooks_with_kwargs))
    if plain:
        for m in (small, copy.deepcopy(small), copy.copy(small), small.transformer):
            with pytest.raises(sn.SortedNetError, match="plain=True"):
                m.save_pretrained(str(tmp_path / "hf"))
        for m in small.modules():  # (as transformers.md says)
            m.__dict__.pop("save_pretrained", None)
    x = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        torch.save((x, small(x).logits), tmp_path / "want.pt")
    torch.save(small, tmp_path / "small.pt")
    proc = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_SORTEDNET, str(tmp_path / "small.pt"),
                           str(tmp_path / "want.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GPT2LMHeadModel" in proc.stdout


class _HoldsALlama(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lm = llama()
        self.head = torch.nn.Linear(V, 2)

    def forward(self, ids):
        return self.head(self.lm(ids).logits)


def test_a_transformers_model_inside_an_export_refuses_save_pretrained_where_its_config_is_the_full_models(
        tmp_path):
    """save_pretrained was refused on a plain=True export itself, not on the transformers model inside it
    (small.model of a LlamaForCausalLM), nor on a transformers model inside a module of the user's nested by hand
    (its export keeps that model's config: 4 layers over 2): each wrote a checkpoint that from_pretrained loaded
    with the dropped layers initialised at random. Now each refuses, writing nothing; the full sub-model, and the
    exports whose config an export hook cut, still save and load with the live sub-model's outputs."""
    torch.manual_seed(0)
    x = torch.randint(0, V, (1, 6))
    nest = sn.from_transformers(llama(), depth=[2, 4])
    plain = nest.export("depth=2", plain=True)
    for m in (plain, plain.model):
        with pytest.raises(sn.SortedNetError, match="plain=True"):
            m.save_pretrained(str(tmp_path / "plain"))
    assert not (tmp_path / "plain").exists()
    stock = nest.export("depth=2")
    stock.model.save_pretrained(str(tmp_path / "inner"))
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "inner")).num_hidden_layers == 2
    mine = _HoldsALlama().eval()
    nest = sn.wrap(mine, sn.Depth("depth", [2, 4], layers="lm.model.layers"), example=x)
    small = nest.export("depth=2")
    with pytest.raises(sn.SortedNetError, match=r"'lm' of nest.export\('depth=2'\).*sn.from_transformers\(model.lm"):
        small.lm.save_pretrained(str(tmp_path / "lm"))
    assert not (tmp_path / "lm").exists()
    full = nest.export("depth=4")
    full.lm.save_pretrained(str(tmp_path / "full"))
    again = LlamaForCausalLM.from_pretrained(str(tmp_path / "full")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, mine.lm(x).logits, atol=1e-5, rtol=0)


def test_a_plain_export_with_a_factored_rank_layer_refuses_save_pretrained(tmp_path):
    """A hand-declared svd Rank exports a small rank as two Linear layers (q_proj.0 / q_proj.1, no bias to go
    missing): save_pretrained wrote them beside the full model's config, and from_pretrained gave every q_proj
    fresh random weights (only a load report said so). The export's keys are compared with the model's own."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    nest = sn.wrap(model, sn.Rank("r", [4, 32], targets="model.layers.*.self_attn.q_proj"))
    small = nest.export("r=4", plain=True)
    assert "model.layers.0.self_attn.q_proj.0.weight" in small.state_dict()
    with pytest.raises(sn.SortedNetError, match="plain=True"):
        small.save_pretrained(str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    merged = nest.export("r=32", plain=True)           # full rank: merged into the stock q_proj.weight
    merged.save_pretrained(str(tmp_path / "full"))
    again = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "full")).eval()
    x = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, merged(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tower", ["encoder", "decoder"])
def test_an_encoder_decoder_tower_nested_alone_exports_a_smaller_ffn_under_its_own_key(tower, tmp_path):
    """A BART tower nested alone (the OPT-style layout, whose key is ffn_dim) accepted ffn= and then refused every
    export with a smaller FFN: BartConfig has encoder_ffn_dim / decoder_ffn_dim. The tower's own key is written."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)
    part = getattr(transformers.BartForConditionalGeneration(cfg).eval().model, tower)
    nest = sn.from_transformers(part, ffn=[32])
    small = nest.export("ffn=32")
    assert getattr(small.config, f"{tower}_ffn_dim") == 32
    assert getattr(small.config, f"{'decoder' if tower == 'encoder' else 'encoder'}_ffn_dim") == 64
    ids = torch.randint(0, 64, (1, 6))
    kw = {} if tower == "encoder" else {"encoder_hidden_states": torch.randn(1, 5, 32)}
    with torch.no_grad(), nest.use("ffn=32"):
        live = part(input_ids=ids, **kw).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids, **kw).last_hidden_state, live, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(heads=[2]), dict(depth=[1]), dict(ffn=[24], depth=[1])])
def test_a_tower_without_a_config_is_refused_heads_and_depth_by_name(kw):
    """FSMT holds its encoder and decoder as plain modules: heads= / depth= raised a raw AttributeError ('config')."""
    cfg = transformers.FSMTConfig(langs=["en", "de"], src_vocab_size=40, tgt_vocab_size=40, d_model=32,
                                  encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48)
    torch.manual_seed(0)
    encoder = transformers.FSMTForConditionalGeneration(cfg).eval().model.encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match="FSMTEncoder: it has no config"):
        sn.from_transformers(encoder, **kw)
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert not any("_sn" in m.__dict__ for m in encoder.modules())
    sn.from_transformers(encoder, ffn=[24])


def test_sort_by_importance_of_a_frozen_layer_says_it_is_frozen():
    """A frozen layer got "SortedLinear got no gradient: does the loss depend on every layer?": the class, not
    the module, and a cause that was not the one. Now the path and the frozen weight."""
    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, ffn=[16, 32])
    model.model.layers[0].mlp.requires_grad_(False)
    x = ids(seed=9, b=2)
    with pytest.raises(sn.SortedNetError,
                       match=r"'model\.layers\.0\.mlp\.\w+_proj' \(\w+\) got no gradient: its weight is frozen"):
        sn.sort_by_importance(nest, [{"input_ids": x, "labels": x}])


def test_soft_loss_labels_must_align_with_the_inputs():
    """Labels of another (batch, length) than the inputs reached the flattened cross-entropy: a raw ValueError
    where the counts differed (pre-shifted labels), a loss on misaligned targets where they agreed."""
    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, depth=[1])
    x = ids(seed=3, b=2, t=9)
    for labels, match in [(x[:, 1:], r"labels of shape \(2, 8\) for inputs of \(batch, length\) \(2, 9\)"),
                          (ids(seed=4, b=3, t=6), r"labels of shape \(3, 6\)"),
                          (x.float(), "token ids of shape"), (x[0], "token ids of shape")]:
        with pytest.raises(sn.SortedNetError, match=match):
            soft_loss(nest, x, labels=labels)
    torch.testing.assert_close(soft_loss(nest, x, labels=x).loss, soft_loss(nest, x).loss)
    torch.testing.assert_close(soft_loss(nest, x, labels=x.int()).loss, soft_loss(nest, x).loss)  # (int32: a raw
    with pytest.raises(sn.SortedNetError, match="needs at least 2"):                         # dtype error before)
        soft_loss(nest, x[:, :1])


@pytest.mark.parametrize("drawn", [None, "ffn=16", {"ffn": 16}])
def test_a_sampler_of_the_users_that_draws_no_list_is_named(drawn, tmp_path):
    """SortedTrainer with a sampler whose draw() returned None (a raw TypeError) or one sub-model instead of a
    list (a string was read character by character: "cannot parse sub-model 'f'")."""
    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, ffn=[16])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(2)]

    class Drawer:
        def draw(self, step):
            return drawn

    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"sampler.draw\(0\) must return a list of sub-models"):
        SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, sampler=Drawer()).train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["soft_shallow", "soft_text", "weights_short", "weights_nan", "weights_negative",
                                  "weights_zero"])
def test_a_sampler_of_the_users_is_checked_as_sn_samplers_are(case, tmp_path):
    """A sampler of the user's own (draw(step), no .submodels for the constructor to read): under soft_exits= a
    draw at a shallower depth became a copy of the deepest (trained twice, history listing a depth that never ran)
    and a draw spelled as a string raised a raw TypeError; loss weights too few, NaN, negative or all zero
    dropped or untrained a sub-model in silence, where sn.accumulate(weights=) refuses them."""
    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, ffn=[16], depth=[1])
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": ids(seed=i, b=1)[0]} for i in range(2)]
    deep = [s for s in nest.submodels if s["depth"] == nest.largest["depth"]]
    small, large = nest.submodels[0], nest.largest
    draws, weights = {"soft_shallow": ([small, large], None), "soft_text": ([str(deep[0]), str(large)], None),
                      "weights_short": ([small, large], [1.0]), "weights_nan": ([small, large], [0.5, float("nan")]),
                      "weights_negative": ([small, large], [1.5, -0.5]),
                      "weights_zero": ([small, large], [0.0, 0.0])}[case]

    class Drawer:
        def draw(self, step):
            return list(draws)

        def loss_weights_for(self, subs):
            return weights

    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no")
    soft = {"soft_exits": [1, nest.largest["depth"]]} if case.startswith("soft") else {}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, sampler=Drawer(), **soft)
    if case == "soft_text":  # (spelled as text: trained, at the deepest exit)
        trainer.train()
        assert [subs for _, subs in trainer.history] == [(str(deep[0]), str(large))]
        return
    match = (r"drew .*depth=1 at step 0, but every drawn sub-model runs at the deepest exit" if case == "soft_shallow"
             else r"sampler.loss_weights_for\(.*\) (must be 2 finite non-negative numbers|\[0.0, 0.0\] are all 0)")
    with pytest.raises(sn.SortedNetError, match=match):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_batch_encoding_is_the_one_input_of_a_model_that_takes_the_batch():
    """A model taking the tokenizer's output whole (``forward(self, batch)``, reading ``batch.input_ids``) was
    called with its keywords (a TypeError) since BatchEncodings became keyword inputs, and with a plain dict in
    its place where one was passed: it gets the BatchEncoding itself, moved to fit's device as one."""
    from transformers import BatchEncoding

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.a, self.b = torch.nn.Embedding(V, 8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)

        def forward(self, batch):
            return self.b(torch.relu(self.a(self.emb(batch.input_ids).mean(1))))

    m = Classifier()
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="a", inp="b"))
    x = torch.randint(1, V, (2, 6))
    be = BatchEncoding({"input_ids": x, "attention_mask": torch.ones_like(x)})
    nest.check(be)
    flops = [nest.cost(s, "flops", example=be) for s in nest.submodels]
    assert flops[0] < flops[1]
    nest.profile(be, metrics=("params", "flops", "memory", "latency"), repeat=1, progress=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    hist = sn.fit(nest, [(be, torch.tensor([0, 2]))], opt, sn.Sampler(nest.submodels, k=2, seed=0),
                  progress=False, device="cpu")
    assert len(hist.train) == 1 and isinstance(be, BatchEncoding) and be.input_ids is x


def test_a_tokenizers_batch_encoding_is_an_example_like_its_dict():
    """A tokenizer's output (a BatchEncoding: a mapping, not a dict) as the example of cost / profile / check was
    called as one positional argument (a raw TypeError from the embedding, wrapped); it is called as keyword
    arguments like its dict, with the same FLOPs and input signature."""
    from transformers import BatchEncoding

    from sortednet.cost import example_signature

    model = llama().eval()
    nest = sn.from_transformers(model, ffn=[0.5], depth=[1])
    x = torch.randint(1, V, (1, 6))
    be = BatchEncoding({"input_ids": x, "attention_mask": torch.ones_like(x)})
    assert example_signature(be) == example_signature(dict(be))
    assert [nest.cost(s, "flops", example=be) for s in nest.submodels] == \
        [nest.cost(s, "flops", example=dict(be)) for s in nest.submodels]
    nest.check(be)
    prof = nest.profile(be, metrics=("params", "flops", "memory"), progress=False)
    assert list(prof.costs["flops"]) == [float(nest.cost(s, "flops", example=dict(be))) for s in nest.submodels]
    mine = nest.profile(dict(be), metrics=("params", "memory"), progress=False)
    assert list(prof.costs["memory"]) == list(mine.costs["memory"]) and prof.device == mine.device
    from sortednet.cost import measure_memory

    class Viewer(torch.nn.Module):  # (a view of its input: counted when the input is unseen)
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x.view(-1, 16))))

    from transformers import BatchFeature  # (an image / audio processor's output: keyword inputs too)

    bf = BatchFeature({"input_ids": x, "attention_mask": torch.ones_like(x)})
    assert nest.cost(nest.largest, "flops", example=bf) == nest.cost(nest.largest, "flops", example=dict(be))
    y = torch.randint(0, V, (1, 6))
    from sortednet.train import evaluate

    def hits(out, t):
        return float((out.logits.argmax(-1) == t).sum())

    assert evaluate(nest, (be, y), metric=hits) == evaluate(nest, (dict(be), y), metric=hits)
    vn = sn.wrap(Viewer().eval(), sn.Width("h", [4, 8], out="a", inp="b"))
    x = torch.randn(64, 4, 16)
    assert [measure_memory(vn, s, BatchEncoding({"x": x})) for s in vn.submodels] == \
        [measure_memory(vn, s, {"x": x}) for s in vn.submodels]


def test_from_transformers_passes_inplace_grad_to_wrap():
    """The docs ask for wrap(..., inplace_grad=False) (threads running backward at once, DDP's own reducer), which
    a from_transformers user could only reach through private state (a TypeError for the keyword)."""
    grads = []
    for inplace in (True, False):
        model, _, _, _ = build("llama")
        nest = sn.from_transformers(model, ffn=[16], heads=[2], inplace_grad=inplace)
        assert {m._sn.inplace_grad for m in nest._sliced.values()} == {inplace}
        x = ids(seed=1, b=2)
        sn.accumulate(nest, [nest.smallest, nest.largest], lambda: model(input_ids=x, labels=x).loss)  # noqa: B023
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)
    with pytest.raises(sn.SortedNetError, match="inplace_grad"):
        sn.from_transformers(build("llama")[0], ffn=[16], inplace_grad="no")


@pytest.mark.parametrize("per_layer", ["default", "none"])
def test_an_export_whose_config_would_not_load_back_as_written_is_refused(per_layer, tmp_path):
    """Gemma 4's config class rewrites what a depth export writes: its default per-layer overrides name a layer
    the export no longer has (from_pretrained raised), and without them it forces the last kept layer to full
    attention (the reloaded model's logits 0.24 off the live sub-model, one log line as the only sign). The
    export reads its config back as from_pretrained will and refuses it; the full model still exports exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {} if per_layer == "default" else {"per_layer_config": {}}
    cfg = AutoConfig.for_model("gemma4_unified_text", vocab_size=64, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               sliding_window=4, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    nest = sn.from_transformers(model, depth=[2])
    match = r"rewrites \['layer_types'\] when the export is loaded"  # (the overrides are cut with the layers)
    with pytest.raises(sn.SortedNetError, match=f"sub-model depth=2: .*{match}.*plain=True"):
        nest.export("depth=2")
    x = torch.randint(3, 64, (1, 14))
    nest.export(nest.largest).save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits)
    plain = nest.export("depth=2", plain=True)
    with torch.no_grad(), nest.use("depth=2"):
        torch.testing.assert_close(plain(x).logits, model(x).logits)


@pytest.mark.parametrize("depth", [2, 4])
def test_per_layer_overrides_are_cut_with_the_layers(depth, tmp_path):
    """Gemma 4's config holds overrides by layer index (the full-attention layers' head size): a depth export kept
    them all, and its config did not load back (index 5 of 4 layers): refused. They are cut with the layers
    now, and the export reloads with stock classes to the live sub-model's logits; a depth whose last layer
    is no full-attention layer stays refused (the config class would rewrite it)."""
    from transformers import AutoModelForCausalLM, Gemma4TextConfig

    cfg = Gemma4TextConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
                           sliding_window=4, hidden_size_per_layer_input=0,
                           layer_types=["sliding_attention", "full_attention"] * 3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    nest = sn.from_transformers(model, depth=[2, 3, 4])
    x = torch.randint(1, 60, (2, 12))
    small = nest.export(f"depth={depth}")
    small.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.num_hidden_layers == depth and len(back.config.layer_types) == depth
    with torch.no_grad(), nest.use(f"depth={depth}"):
        torch.testing.assert_close(back(x).logits, model(x).logits)
    with pytest.raises(sn.SortedNetError, match=r"rewrites \['layer_types'\]"):
        nest.export("depth=3")


def test_a_layout_whose_head_count_attribute_the_model_lacks_is_named_as_the_layouts():
    """OpenAI-GPT is read as the gpt2 layout, whose head count attribute its attention lacks: the refusal spoke
    of count_attrs, an option the user never passed. It names the layout the model was read as now."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match="OpenAIGPTLMHeadModel was read as the gpt2 layout.*ffn= / depth= "
                                                "only.*register_layout"):
        sn.from_transformers(model, heads=[2])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("_sn" in m.__dict__ for m in model.modules())
    assert sn.from_transformers(model, ffn=[0.5], depth=[1]).submodels


def test_a_profile_survives_gradient_checkpointing_and_another_load_path(tmp_path):
    """The profile's module record counted transformers' gradient_checkpointing flag and the model's name_or_path:
    a model trained with checkpointing (or loaded from another folder) dropped its FLOPs and latency at every
    sn.load into a fresh model, with a false warning. Neither changes the forward's work."""
    import warnings

    model, _, _, _ = build("llama")
    model.gradient_checkpointing_enable()
    model.name_or_path = "base_a"
    nest = sn.from_transformers(model, ffn=[0.5])
    nest.profile({"input_ids": ids()}, metrics=("params", "flops"), progress=False)
    sn.save(nest, tmp_path / "n.sn")
    fresh, _, _, _ = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = sn.load(fresh, tmp_path / "n.sn")
    assert back.cost(back.smallest, "flops") == nest.cost(nest.smallest, "flops")


def _towers(kind: str):
    T = transformers
    bert = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    gpt2 = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_inner=64, add_cross_attention=True,
                        is_decoder=True, bos_token_id=0, eos_token_id=0)
    if kind == "bert_to_gpt2":
        return T.EncoderDecoderModel(config=T.EncoderDecoderConfig.from_encoder_decoder_configs(
            T.BertConfig(**bert), gpt2))
    if kind == "vit_to_gpt2":
        vit = T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64)
        return T.VisionEncoderDecoderModel(config=T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, gpt2))
    return T.ChineseCLIPModel(T.ChineseCLIPConfig(text_config=bert, vision_config=dict(
        image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)))


@pytest.mark.parametrize("kind", ["bert_to_gpt2", "vit_to_gpt2", "chinese_clip"])
def test_a_second_tower_of_another_layout_is_refused(kind):
    """Only lists of the same name counted as a second tower: a BERT encoder beside a GPT-2 decoder, a ViT beside
    GPT-2, ChineseCLIP's vision tower beside its BERT text tower were accepted with one tower nested and the other
    left whole, without a word (the smallest export kept the encoder's 3 layers at full width). Refused, naming
    the other list, before anything changes; the tower alone nests."""
    model = _towers(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match="would nest only part of the model"):
        sn.from_transformers(model, ffn=[0.5], depth=[1])
    assert not any(hasattr(m, "_sn") for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    tower = model.decoder if kind != "chinese_clip" else model.text_model
    nest = sn.from_transformers(tower, ffn=[0.5])
    assert nest.cost(nest.smallest) < nest.cost(nest.largest)


def test_heads_or_depth_alone_export_a_t5_layout_whose_ffn_has_no_slicer():
    """Switch Transformers (T5 layout, mixture-of-experts FFNs): a heads= nest exported no sub-model, not even
    the full one ("a t5 block has none of the FFN projections"), for an FFN it never nested. Every sub-model
    exports now, equal to the live model."""
    torch.manual_seed(0)
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, expert_capacity=8, num_layers=2, num_sparse_encoder_layers=1,
        num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=4, num_experts=2, decoder_start_token_id=0)
    model = transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
    x, y = torch.randint(5, 90, (2, 10)), torch.randint(5, 90, (2, 7))
    nest = sn.from_transformers(model, heads=[2], depth=[1])
    for sub in nest.submodels:
        small = nest.export(sub).eval()
        with torch.no_grad(), nest.use(sub):
            want = model(input_ids=x, decoder_input_ids=y).logits
        with torch.no_grad():
            got = small(input_ids=x, decoder_input_ids=y).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=str(sub))


def test_depth_of_a_head_that_weighs_every_layer_is_refused_at_wrap():
    """use_weighted_layer_sum (Whisper / Wav2Vec2 audio classification) weighs every layer's output: a depth= nest
    was accepted and each shallower forward raised a raw RuntimeError (2 outputs for 3 weights)."""
    model = transformers.WhisperForAudioClassification(transformers.WhisperConfig(
        d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=16, use_weighted_layer_sum=True, num_labels=3)).eval()
    with pytest.raises(sn.SortedNetError, match="use_weighted_layer_sum"):
        sn.from_transformers(model, depth=[1])
    assert not any(hasattr(m, "_sn") for m in model.modules())
    sn.from_transformers(model, ffn=[32], verify=False)


def test_a_lora_sorted_trainer_trains_the_head_of_a_task_model_without_a_base_model(tmp_path):
    """WhisperForAudioClassification is its own base_model (its encoder, projector and classifier are its
    children): its new projector and classifier were frozen as the rest. They train now; the encoder, which holds
    the nested layers, stays frozen."""
    from transformers import WhisperConfig, WhisperForAudioClassification

    torch.manual_seed(0)
    model = WhisperForAudioClassification(WhisperConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, num_labels=3, pad_token_id=1, decoder_start_token_id=2))
    nest = sn.from_transformers(model, rank=[2, 4])
    data = [{"input_features": torch.randn(8, 32), "labels": torch.tensor(i % 3)} for i in range(4)]
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no", learning_rate=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    SortedTrainer(model=model, args=args, train_dataset=data, nest=nest).train()
    after = model.state_dict()
    for k in before:
        trained = k.startswith(("projector.", "classifier.")) or "lora_" in k
        assert torch.equal(after[k], before[k]) != trained or "lora_A" in k, k  # (lora_A: 0 gradient at B = 0)
    with pytest.raises(sn.SortedNetError, match=r"'encoder.layers.0.fc1' is a target of the LoRA Rank"):
        SortedTrainer(model=model, args=args, train_dataset=data, nest=nest,
                      modules_to_save=["encoder.layers.0.fc1"])
    from transformers import T5Config, T5ForQuestionAnswering  # (its own base model too, nested in two towers)

    torch.manual_seed(0)
    qa = T5ForQuestionAnswering(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                         decoder_start_token_id=0, pad_token_id=0))
    nest = sn.from_transformers(qa, rank=[2, 4])
    SortedTrainer(model=qa, args=args, train_dataset=[], nest=nest)
    assert {n for n, p in qa.named_parameters() if p.requires_grad and "lora_" not in n} == \
        {"qa_outputs.weight", "qa_outputs.bias"}


@pytest.mark.parametrize("family, head", [("bert", "classifier"), ("llama", "score")])
def test_a_lora_sorted_trainer_trains_the_task_head(tmp_path, family, head):
    """SortedTrainer with LoRA adapters froze every other parameter, a new classification head too (even one the
    user had set to require grad): the adapters trained in front of a classifier that stayed random, with no word.
    The task head (LoRA's modules_to_save) trains now, the encoder stays frozen; ``modules_to_save=[]`` keeps the
    adapters alone; a wrong path is refused before anything changes."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4, num_labels=3))
    else:
        model = LlamaForSequenceClassification(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2, num_labels=3, pad_token_id=0))
    data = [{"input_ids": ids(seed=i, b=1)[0], "labels": torch.tensor(i % 3)} for i in range(8)]
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no", learning_rate=0.1)
    nest = sn.from_transformers(model, ffn=[32], rank=[2, 4])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(sn.SortedNetError, match=r"'classifer' is not a module"):
        SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, modules_to_save=["classifer"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    SortedTrainer(model=model, args=args, train_dataset=data, nest=nest, modules_to_save=[])
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    model.requires_grad_(True)
    nest.unwrap()
    nest = sn.from_transformers(model, ffn=[32], rank=[2, 4])
    t = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n in trains if "lora_" in n} | {f"{head}.{k}" for k, _ in
                                                          model.get_submodule(head).named_parameters()}
    t.train()
    after = model.state_dict()
    assert not torch.equal(after[f"{head}.weight"], before[f"{head}.weight"])  # the head trained
    frozen = [k for k in before if not k.startswith(head) and "lora_" not in k]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)


def test_a_second_lora_sorted_trainer_trains_the_head_an_earlier_one_froze(tmp_path):
    """SortedTrainer only ever froze: after one built with modules_to_save=[] (or a head the user froze), a later
    trainer on the same model, by default or naming the head, left it frozen and trained the adapters in front of
    a random classifier, with no word. The modules to save are set to require grad now."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4, num_labels=3))
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no", learning_rate=0.1)
    nest = sn.from_transformers(model, ffn=[32], rank=[2, 4])
    head = {"classifier.weight", "classifier.bias"}
    for saved in (None, ["classifier"]):
        SortedTrainer(model=model, args=args, train_dataset=[], nest=nest, modules_to_save=[])
        assert not {n for n, p in model.named_parameters() if p.requires_grad} & head
        SortedTrainer(model=model, args=args, train_dataset=[], nest=nest, modules_to_save=saved)
        assert {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} == head, saved


def test_modules_to_save_that_would_train_frozen_weights_are_refused(tmp_path):
    """Naming a LoRA target was refused, but naming a module above one (its attention, the whole body, the root
    '') set the targets' frozen base weights to train, and a tied lm_head trained the frozen input embeddings:
    each is refused now, before anything changes; naming both tied modules trains them."""
    model, _, _, _ = build("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    nest = sn.from_transformers(model, ffn=[32], rank=[2, 4])
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for bad, match in [(["model.layers.0.self_attn"], r"holds 'model.layers.0.self_attn.q_proj', a target"),
                       (["model"], "a target of the LoRA Rank"), ([""], "the whole model"),
                       (["lm_head"], r"'lm_head.weight' is also 'model.embed_tokens.weight' \(a tied weight\)")]:
        with pytest.raises(sn.SortedNetError, match=match):
            SortedTrainer(model=model, args=args, train_dataset=[], nest=nest, modules_to_save=bad)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    SortedTrainer(model=model, args=args, train_dataset=[], nest=nest,
                  modules_to_save=["lm_head", "model.embed_tokens"])
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} == \
        {"model.embed_tokens.weight"}


def test_the_default_modules_to_save_of_a_model_without_input_embeddings(tmp_path):
    """CLIPForImageClassification is its own base model and its get_input_embeddings() raises transformers'
    NotImplementedError: SortedTrainer with LoRA adapters failed with that raw error. Its classifier trains now."""
    from transformers import CLIPConfig, CLIPForImageClassification

    torch.manual_seed(0)
    model = CLIPForImageClassification(CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=V),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=16, patch_size=8), num_labels=3))
    nest = sn.from_transformers(model, heads=[2], rank=[2, 4])
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    SortedTrainer(model=model, args=args, train_dataset=[], nest=nest)
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} == \
        {"classifier.weight", "classifier.bias"}


def test_modules_to_save_needs_a_lora_nest(tmp_path):
    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, ffn=[0.5])
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(sn.SortedNetError, match="no Rank.mode='lora'"):
        SortedTrainer(model=model, args=args, train_dataset=[], nest=nest, modules_to_save=["lm_head"])


def test_a_model_built_without_its_pooler_names_that_when_its_export_is_refused():
    """A BERT tower built with add_pooling_layer=False (ChineseCLIP's text model): from_pretrained of its class
    would add a pooler, so even the full export is refused; the message blamed the layout's config keys. It
    names the tensors the class adds and the constructor argument now; plain=True exports."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4), add_pooling_layer=False).eval()
    nest = sn.from_transformers(model, depth=[1])
    with pytest.raises(sn.SortedNetError, match=r"does not have, outside its layers \(e.g. 'pooler\.dense\.bias'\)"
                                                r".*add_pooling_layer=False"):
        nest.export("depth=2")
    x = ids()
    with nest.use("depth=1"), torch.no_grad():
        want = model(input_ids=x).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(nest.export("depth=1", plain=True)(input_ids=x).last_hidden_state, want)


def test_a_hand_depth_on_one_tower_of_two_names_why_no_layout_describes_the_export():
    """A Depth declared by hand on BART's decoder: the export's refusal blamed 'a constructor argument its config
    does not record' for keys inside the layers (no layout was found, so every differing key counted as outside
    them). It says why no layout describes the model (two layer lists: nest one tower) and changes nothing."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)).eval()
    nest = sn.wrap(model, sn.Depth("depth", [1, 3], layers="model.decoder.layers"))
    with pytest.raises(sn.SortedNetError, match=r"no layout describes this BartForConditionalGeneration.*2 layer lists"
                                                r".*nest one tower at a time") as e:
        nest.export("depth=1")
    assert "constructor argument" not in str(e.value)
    assert model.config.decoder_layers == 3 and str(nest.active) == "depth=3"


@pytest.mark.parametrize("how", ["named_otherwise", "discover"])
def test_an_ffn_width_of_any_name_exports_as_the_stock_class(how):
    """The config's FFN width was written only for a dimension named 'ffn': a Width of one's own named otherwise,
    or discover's one per layer, was refused as though the family derived the size from another key."""
    torch.manual_seed(0)
    model = llama().eval()
    ids = torch.randint(0, V, (2, 7))
    if how == "discover":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dims = sn.discover(model, ids, ratios=[0.5, 1.0])
            nest = sn.wrap(model, *dims, submodels=sn.by_ratio(dims, [0.5, 1.0]), example=ids)
        sub = nest.smallest
    else:
        nest = sn.wrap(model, sn.Width("mlp", [24, 48], out=["model.layers.*.mlp.gate_proj",
                                                               "model.layers.*.mlp.up_proj"],
                                       inp="model.layers.*.mlp.down_proj"))
        sub = "mlp=24"
    small = nest.export(sub)
    assert type(small) is LlamaForCausalLM and small.config.intermediate_size == 24
    with torch.no_grad(), nest.use(sub):
        torch.testing.assert_close(small(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_an_export_of_layers_cut_unevenly_says_so():
    """A width over some layers' FFN only was refused as though the family derived a size from another key."""
    model = llama().eval()
    nest = sn.wrap(model, sn.Width("w", [24, 48], out=["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"],
                                   inp="model.layers.1.mlp.down_proj"))
    with pytest.raises(sn.SortedNetError, match=r"its layers are cut unevenly: mlp.(gate|up|down)_proj.weight is "
                                                r"\(\d+, \d+\) in model.layers.0 but \(\d+, \d+\) in model.layers.1"):
        nest.export("w=24")


def test_an_export_of_a_bert_layer_cut_unevenly_says_so():
    """BERT's layers hold several modules named dense (intermediate.dense, output.dense, attention.output.dense):
    keyed by the last two names, the full model already showed two shapes for dense.bias, and per-layer FFN
    widths were refused as though the family derived a size from another key."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                                     num_attention_heads=4, intermediate_size=64,
                                                     max_position_embeddings=64, num_labels=3)).eval()
    layer = "bert.encoder.layer.{}."
    nest = sn.wrap(model, *(sn.Width(f"f{i}", [16, 64], out=layer.format(i) + "intermediate.dense",
                                     inp=layer.format(i) + "output.dense") for i in range(3)))
    with pytest.raises(sn.SortedNetError, match=r"its layers are cut unevenly: intermediate.dense.weight is "
                                                r"\(16, 32\) in bert.encoder.layer.0 but \(64, 32\) in "
                                                r"bert.encoder.layer.1"):
        nest.export("f0=16,f1=64,f2=64")
    assert nest.export("f0=16,f1=16,f2=16").config.intermediate_size == 16


def test_an_export_after_accelerate_mixed_precision_prepare_is_the_plain_model():
    """accelerate's prepare(mixed_precision="bf16") (every Trainer run with bf16=True) sets an autocast wrapper as
    the model's forward: the export kept it in its copy and the comparison ran the live model under it, so the
    export was refused (and SortedTrainer could save no Rank checkpoint). The export is the plain model now,
    compared as the class computes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # (process-wide: a Trainer built by an earlier test in this process set it)
    GradientState._reset_state()
    torch.manual_seed(0)
    model = llama()
    nest = sn.from_transformers(model, ffn=[0.5], depth=[2], rank=[4, 8])
    try:
        assert Accelerator(mixed_precision="bf16", cpu=True).prepare(model) is model
    finally:  # (cleared for the tests after it, whatever they build)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert "forward" in model.__dict__  # (accelerate's wrapper)
    ids = torch.randint(0, V, (2, 7))
    for sub in (nest.smallest, nest.largest):
        small = nest.export(sub)
        assert "forward" not in small.__dict__ and "_original_forward" not in small.__dict__
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(small(ids).logits, model._original_forward(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{"ffn": [1.0]}, {"heads": [4]}, {"depth": [2]}, {"ffn": 48}])
def test_sizes_of_the_full_size_only_are_said_to_nest_nothing(kw):
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    (name,) = kw
    with pytest.warns(UserWarning, match=rf"{name}: sizes .* are the full size \d+ only.*nests nothing"):
        nest = sn.from_transformers(m, **kw)
    assert len(nest.submodels) == 1


@pytest.mark.parametrize("how", ["soft_loss_weights", "trainer_weights", "trainer_exits", "trainer_set_exits"])
def test_soft_exits_and_weights_given_as_a_dict_or_a_set_are_refused(how, tmp_path):
    """A dict iterated gives its keys: soft_loss(weights={4: 3.0, 2: 1.0}) weighted the exits by their depths, and
    SortedTrainer took soft_exits={2: 1.0, 4: 3.0} (weights dropped) or a set with weights (paired in the set's
    order, not the user's), training another objective than asked, in silence."""
    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, ffn=[16, 32], depth=[2])
    if how == "soft_loss_weights":
        with pytest.raises(sn.SortedNetError, match=r"soft_loss: weights is a mapping"):
            soft_loss(nest, ids(), exits=[2, 4], weights={4: 3.0, 2: 1.0})
        return
    kw = {"trainer_weights": dict(soft_exits=[2, 4], soft_weights={4: 3.0, 2: 1.0}),
          "trainer_exits": dict(soft_exits={2: 1.0, 4: 3.0}),
          "trainer_set_exits": dict(soft_exits={4, 2}, soft_weights=[3.0, 1.0])}[how]
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(sn.SortedNetError, match=r"is a mapping|have no order to pair soft_weights"):
        SortedTrainer(model=model, args=args, train_dataset=[], nest=nest, **kw)


def test_soft_exits_past_the_layer_count_are_refused_when_the_trainer_is_built(tmp_path):
    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, ffn=[16, 32])
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(sn.SortedNetError, match=r"SortedTrainer\(soft_exits=\[2, 6\]\): an exit is a block count in "
                                                r"1\.\.4"):
        SortedTrainer(model=model, args=args, train_dataset=[], nest=nest, soft_exits=[2, 6])


def test_soft_weights_given_as_a_set_are_refused_and_as_a_tensor_taken():
    """A set of weights iterates in its own order ({3.0, 1.0} gives [1.0, 3.0]): the exits were weighted the other
    way round, in silence. Refused; a tensor of weights, which exits= takes, is taken (it was refused as not
    finite numbers)."""
    model, _, _, _ = build("llama")
    nest = sn.from_transformers(model, ffn=[16, 32], depth=[2])
    x = ids()
    with pytest.raises(sn.SortedNetError, match=r"weights given as a set have no order to pair them with the exits"):
        soft_loss(nest, x, exits=[2, 4], weights={3.0, 1.0})
    for one in (torch.tensor(2.0), np.array(2.0)):  # (a 0-d tensor or array: one number, not a list)
        with pytest.raises(sn.SortedNetError, match=r"weights must be a list of one weight per exit"):
            soft_loss(nest, x, exits=[2, 4], weights=one)
    got = soft_loss(nest, x, exits=[2, 4], weights=torch.tensor([3.0, 1.0]))
    want = soft_loss(nest, x, exits=[2, 4], weights=[3.0, 1.0])
    assert torch.equal(got.loss, want.loss)

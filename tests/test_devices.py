"""The model's device, not torch's default device, decides where the library computes.

A user who calls ``torch.set_default_device("cuda")`` (or runs inside ``with torch.device(...)``) and a model
that lives elsewhere must both work: every tensor the library makes for itself is made on the model's device, or
on the CPU where a CPU generator draws it (seeded self-checks, importance scores, adapter initialisation,
sampling). Here the default device is ``meta``, where nothing can be computed: a tensor made without a device
shows at once, on any machine (with ``SORTEDNET_TEST_DEVICE=cuda`` the models live on the GPU and the default
device is still ``meta``)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import sortednet as sn
from models import DEVICE, FAMILIES, run, same_kernels
from sortednet.importance import sort_units


def elsewhere():
    return torch.device("meta")


def mse(model, batch):
    return model(batch).float().pow(2).mean()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_wrap_train_export_cost_save_load_check_under_another_default_device(family, tmp_path):
    case, fresh = FAMILIES[family](seed=1), FAMILIES[family](seed=2)
    ref = same_kernels(copy.deepcopy(case.model))
    path = os.path.join(tmp_path, "ck.safetensors")
    with elsewhere():
        nest = sn.wrap(case.model, *case.dims)
        assert torch.equal(run(case.model, case.example), run(ref, case.example))
        for sub in {nest.smallest, nest.largest, *nest.submodels[:3]}:
            with nest.use(sub):
                y = case.model(case.example)
                y.float().square().mean().backward()
            small = nest.export(sub)
            assert all(t.device == case.example.device for t in small.state_dict().values())
            torch.testing.assert_close(run(small, case.example), y.detach(), atol=1e-5, rtol=0)
            assert nest.cost(sub, "flops", example=case.example) > 0
        nest.check(case.example)
        nest.pick(params=nest.cost(nest.largest))
        sn.save(nest, path)
        sn.load(fresh.model, path)
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, case.model.state_dict()[k]), k


@pytest.mark.parametrize("family", ["mlp", "cnn_bn_residual", "lm_width_heads_depth", "torch_encoder"])
@pytest.mark.parametrize("method", ["l1", "taylor"])
def test_sort_units_and_discover_under_another_default_device(family, method):
    case, plain = FAMILIES[family](seed=3), FAMILIES[family](seed=3)
    ref = copy.deepcopy(case.model).eval()
    with elsewhere():
        nest = sn.wrap(case.model, *case.dims)
        kw = {"data": [case.example], "loss_fn": mse} if method == "taylor" else {}
        sort_units(nest, method, example=case.example, **kw)
        case.model.eval()
        torch.testing.assert_close(run(case.model, case.example), run(ref, case.example), atol=1e-5, rtol=1e-5)
        found = sn.discover(plain.model, plain.example)
        assert found
        sn.wrap(plain.model, *found)


def test_calibrate_under_another_default_device():
    case = FAMILIES["cnn_bn_residual"](seed=4)
    with elsewhere():
        nest = sn.wrap(case.model, *case.dims)
        nest.calibrate([case.example], batches=1)
        with nest.use(nest.smallest):
            assert torch.isfinite(run(case.model, case.example)).all()


def test_rank_adapters_under_another_default_device():
    case = FAMILIES["mlp"](seed=5)
    with elsewhere():
        nest = sn.wrap(case.model, sn.Rank("r", [2, 4, 8], targets=["fc1", "fc2"]))
        assert all(p.device == case.example.device for p in case.model.parameters())
        with nest.use(nest.smallest):
            case.model(case.example).square().mean().backward()
        torch.testing.assert_close(run(nest.export(nest.smallest), case.example), _live(nest, case), atol=1e-5,
                                   rtol=0)


class _Scaled(torch.nn.Module):
    """A buffer registered as a broadcast view (one element shared by eight), built where the models live (a model
    moved with ``.to`` gets a dense copy; one built on its device keeps the view)."""

    def __init__(self, value: float):
        super().__init__()
        self.a = torch.nn.Linear(8, 8, device=DEVICE)
        self.register_buffer("scale", torch.full((1,), value, device=DEVICE).expand(8))

    def forward(self, x):
        return self.a(x) * self.scale


@pytest.mark.parametrize("value", [1.0, 2.0])
def test_a_broadcast_buffer_is_compared_with_the_file_where_it_lives(tmp_path, value):
    """``sn.load`` reads the file on the CPU; the value of a buffer that cannot be written (a broadcast view) is
    compared with the file's on the buffer's device: equal is skipped, different refused, on any device."""
    path = os.path.join(tmp_path, "ck.safetensors")
    torch.manual_seed(0)
    sn.save(sn.wrap(_Scaled(1.0), sn.Rank("r", [2, 8], targets="a")), path)
    fresh = _Scaled(value)
    with elsewhere():
        if value == 1.0:
            sn.load(fresh, path)
        else:
            with pytest.raises(sn.SortedNetError, match="'scale'.*broadcast view"):
                sn.load(fresh, path)
    assert torch.equal(fresh.scale, torch.full((8,), value, device=DEVICE))


def _live(nest, case):
    with nest.use(nest.smallest):
        return run(case.model, case.example)


def test_transformers_wrap_importance_soft_loss_and_speculative_under_another_default_device():
    transformers = pytest.importorskip("transformers")
    from sortednet.integrations import export_pretrained, soft_loss

    dev = FAMILIES["mlp"]().example.device  # (where the test models live: the CPU, or SORTEDNET_TEST_DEVICE)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=None)).to(dev).eval()
    ids = torch.randint(1, 50, (1, 6), generator=torch.Generator().manual_seed(0)).to(dev)
    with elsewhere():
        nest = sn.from_transformers(model, ffn=[32], heads=[2], depth=[2])
        want = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        got = sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=8, eos_token_id=[])
        assert torch.equal(got.sequences, want)
        for gen in (torch.Generator().manual_seed(0), torch.Generator(dev).manual_seed(0)):
            a = sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=8, do_sample=True,
                                        generator=gen.manual_seed(0), eos_token_id=[])
            b = sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=8, do_sample=True,
                                        generator=gen.manual_seed(0), eos_token_id=[])
            assert torch.equal(a.sequences, b.sequences)  # one generator's draws, wherever it lives
        sn.sort_by_importance(nest, [ids])
        soft_loss(nest, ids, exits=[2, 4]).loss.backward()
        small = export_pretrained(nest, "depth=2")
        assert all(p.device == dev for p in small.parameters())

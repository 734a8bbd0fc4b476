"""BatchNorm calibration: per-sub-model statistics equal an independent
recalibration of the exported sub-model, differ between sub-models, are what
use() (eval) and export() read, leave the shared ones untouched, and survive
save/load bit-exactly."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sortednet as sn
from models import FAMILIES, InterruptAt, interrupted
from sortednet.calibrate import StaleCalibrationWarning, stale_statistics
from sortednet.slicers.norm import _fingerprint, _same


class BNNet(nn.Module):
    """Two coupled widths through three BatchNorms (1d and 2d) and a depth-free head."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.fc, self.b3 = nn.Linear(12, 6), nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x))).mean((2, 3))
        return self.head(F.relu(self.b3(self.fc(x))))


def bnnet(seed=0):
    torch.manual_seed(seed)
    m = BNNet().eval()
    dims = [sn.Width("a", [2, 4, 8], out="c1", inp="c2", norm="b1"),
            sn.Width("b", [3, 12], out="c2", inp="fc", norm="b2")]
    return m, dims


def cnn():
    c = FAMILIES["cnn_bn_residual"]()
    return c.model, c.dims


BUILDERS = {"bnnet": bnnet, "cnn_bn_residual": cnn}


def data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 6, 6, generator=g) * 2 + 1, torch.zeros(16)) for _ in range(n)]


def stats(module):
    return module.running_mean.clone(), module.running_var.clone()


def bns(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def recalibrated_copy(plain: nn.Module, batches, names) -> nn.Module:
    """Independent reference: classic recalibration of the BatchNorms ``names`` of a plain (exported) model."""
    plain.eval()
    for m in (bns(plain)[n] for n in names):
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for x, _ in batches:
            plain(x)
    return plain.eval()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_stats_equal_independent_recalibration_and_are_used(name):
    model, dims = BUILDERS[name]()
    nest = sn.wrap(model, *dims)
    batches = data()
    shared = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = {n: m.momentum for n, m in bns(model).items()}
    done = nest.calibrate(batches, batches=len(batches))
    assert done == list(nest.submodels)
    # shared weights, statistics, counters, momentum and modes untouched
    assert all(torch.equal(shared[k], v) for k, v in model.state_dict().items())
    assert {n: m.momentum for n, m in bns(model).items()} == momenta and not model.training
    x = batches[0][0][:5]
    sliced = [n for n, m in bns(model).items() if "_sn" in m.__dict__]
    seen = {}
    for sub in nest.submodels:
        ref = recalibrated_copy(nest.export(sub), batches, sliced)
        with nest.use(sub):
            live = {n: stats(bns(model)[n]) for n in sliced}
            y = model(x)
        exp = nest.export(sub).eval()
        for n, (mean, var) in live.items():
            r = bns(ref)[n]
            torch.testing.assert_close(mean, r.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(var, r.running_var, rtol=1e-5, atol=1e-6)
            assert torch.equal(bns(exp)[n].running_mean, mean) and torch.equal(bns(exp)[n].running_var, var)
            # the batches averaged, not the shared training counter: momentum=None training of the export
            # weighs its next batch 1 / (count + 1), as after the plain recalibration
            assert torch.equal(bns(exp)[n].num_batches_tracked, r.num_batches_tracked)
            assert int(r.num_batches_tracked) == len(batches) != int(bns(model)[n].num_batches_tracked)
        torch.testing.assert_close(exp(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref(x), y, rtol=1e-4, atol=1e-4)
        seen[sub] = live
    # on the channels they share, the first BatchNorm (unsliced input) agrees across sub-models;
    # the next one (its input width changed) does not
    small, big = seen[nest.smallest], seen[nest.largest]
    first, second = sliced[:2]
    k1, k2 = small[first][0].numel(), small[second][0].numel()
    torch.testing.assert_close(small[first][0], big[first][0][:k1])
    assert not torch.allclose(small[second][0], big[second][0][:k2], atol=1e-3)


def test_training_mode_reads_and_updates_shared_statistics():
    model, dims = bnnet()
    nest = sn.wrap(model, *dims)
    nest.calibrate(data(), batches=2)
    full = model.__dict__["_modules"]["b1"]._buffers["running_mean"]
    with nest.use(nest.smallest):
        model.train()
        assert model.b1.running_mean.data_ptr() == full.data_ptr()      # shared prefix view
        model.eval()
        assert model.b1.running_mean.data_ptr() != full.data_ptr()      # own statistics
    with nest.use("a=4,b=12"):   # not calibrated -> falls back to the shared prefix
        nest._sliced["b1"]._sn.norm.stats.pop((4, 12))
        assert model.b1.running_mean.data_ptr() == full.data_ptr()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_calibration_saved_and_loaded_exactly(name, tmp_path):
    model, dims = BUILDERS[name]()
    nest = sn.wrap(model, *dims)
    nest.calibrate(data(), subs=[nest.smallest, nest.largest], batches=3)
    path = tmp_path / "c.safetensors"
    sn.save(nest, path)
    fresh, _ = BUILDERS[name]()
    loaded = sn.load(fresh, path)
    assert fresh.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    x = data(1, seed=5)[0][0]
    for sub in nest.submodels:
        with nest.use(sub):
            want = {n: stats(m) for n, m in bns(model).items()}
            y = model(x)
        with loaded.use(sub):
            got = {n: stats(m) for n, m in bns(fresh).items()}
            assert torch.equal(fresh(x), y)
        assert all(torch.equal(a, b) for n in want for a, b in zip(want[n], got[n]))
        counts = [{n: m.num_batches_tracked for n, m in bns(n_.export(sub)).items()} for n_ in (nest, loaded)]
        assert counts[0].keys() == counts[1].keys() and all(torch.equal(counts[0][k], counts[1][k]) for k in counts[0])
    # loading a checkpoint without calibration clears it
    plain, plain_dims = BUILDERS[name]()
    sn.save(sn.wrap(plain, *plain_dims), tmp_path / "p.safetensors")
    sn.load(loaded, tmp_path / "p.safetensors")
    assert all(m._sn.norm is None for m in loaded._sliced.values())


def test_bad_input_raises_before_anything_changes():
    model, dims = bnnet()
    nest = sn.wrap(model, *dims)
    with pytest.raises(sn.SortedNetError, match="batches"):
        nest.calibrate(data(), batches=0)
    with pytest.raises(sn.SortedNetError, match="no batch"):
        nest.calibrate([], batches=2)
    with pytest.raises(sn.SortedNetError, match="has no size 5"):
        nest.calibrate(data(), subs=["a=5"])
    assert all(not m._sn.extra for m in nest._sliced.values())
    mlp = FAMILIES["mlp"]()
    with pytest.raises(sn.SortedNetError, match="no BatchNorm"):
        sn.wrap(mlp.model, *mlp.dims).calibrate([mlp.example])


def test_a_batch_the_model_cannot_run_is_named_and_keeps_the_statistics():
    model, dims = bnnet()
    nest = sn.wrap(model, *dims)
    nest.calibrate(data(), batches=2)
    before = {n: m._sn.norm for n, m in nest._sliced.items()}
    kept = {(n, key, k): v.clone() for n, s in before.items() if s is not None
            for key, d in s.stats.items() for k, v in d.items()}
    assert kept
    bad = [data()[0], (torch.randn(16, 3, 6, 6), torch.zeros(16))]  # the second batch: 3 channels, not 1
    with pytest.raises(sn.SortedNetError, match=r"calibrate: sub-model a=2,b=3 failed on the example"):
        nest.calibrate(bad, batches=2)
    assert {n: m._sn.norm for n, m in nest._sliced.items()} == before
    for (n, key, k), v in kept.items():
        assert torch.equal(nest._sliced[n]._sn.norm.stats[key][k], v), (n, key, k)


def test_calibrated_statistics_follow_model_to(tmp_path):
    """After calibrating, ``model.to(float64)`` moves the BatchNorm buffers; the calibrated per-sub-model
    statistics follow: a calibrated sub-model runs in float64, equals its float64 export, and the nest's
    checkpoint loads back into a float64 model."""
    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 3))

    data = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    model = cnn()
    nest = sn.wrap(model, sn.Width("c", [4, 8], out="0", norm="1", inp="5"))
    nest.calibrate(data, batches=2)
    with nest.use("c=4"):
        want = nest.export("c=4").eval()(data[0]).double()
    model.to(torch.float64).eval()
    x = data[0].double()
    with torch.no_grad(), nest.use("c=4"):
        live = model(x)
        assert model[1].running_mean.dtype == torch.float64
        small = nest.export("c=4").eval()
    torch.testing.assert_close(live, small(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(live, want, atol=1e-5, rtol=0)
    sn.save(nest, tmp_path / "c64.safetensors")
    back = cnn().double().eval()
    nest2 = sn.load(back, tmp_path / "c64.safetensors")
    with torch.no_grad(), nest2.use("c=4"):
        torch.testing.assert_close(back(x), live, atol=1e-12, rtol=0)


def test_calibrate_warns_that_tracked_instance_norm_statistics_stay_shared():
    """Only BatchNorm statistics are recalibrated: a tracked InstanceNorm beside them is named in a warning
    and its buffers are left exactly as they were."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                      nn.InstanceNorm2d(8, track_running_stats=True), nn.ReLU(), nn.Conv2d(8, 2, 1))
    nest = sn.wrap(m, sn.Width("a", [4, 8], out="0", norm="1", inp="3"),
                   sn.Width("b", [4, 8], out="3", norm="4", inp="6"))
    before = {k: v.clone() for k, v in m[4].state_dict().items()}
    with pytest.warns(UserWarning, match=r"\['4'\].*InstanceNorm"):
        nest.calibrate([torch.randn(4, 3, 8, 8) for _ in range(2)], batches=2)
    assert all(torch.equal(v, before[k]) for k, v in m[4].state_dict().items())
    assert m[1]._sn.norm is not None and m[4]._sn.norm is None


@pytest.mark.parametrize("n", [1, 3])
def test_a_loader_shorter_than_the_batches_asked_for_warns_and_calibrates_on_what_it_had(n):
    """An explicit batches= that the loader does not reach warns with both counts; the statistics are those of
    the batches it had (as batches=n would give). The default (up to 10) takes a short loader silently."""
    model, dims = bnnet()
    nest = sn.wrap(model, *dims)
    with pytest.warns(UserWarning, match=rf"batches=5 asked, but the loader yielded only {n}"):
        nest.calibrate(data(n), batches=5)
    got = _all_stats(nest)
    import warnings as w

    with w.catch_warnings(record=True) as seen:
        w.simplefilter("always")
        nest.calibrate(data(n))  # the default (up to 10): no warning of the loader's length
        nest.calibrate(data(n), batches=n)
    assert not [x for x in seen if "the loader yielded only" in str(x.message)]
    want = _all_stats(nest)
    assert got.keys() == want.keys() and got
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def _all_stats(nest):
    """Every calibrated statistic of ``nest``: {(module path, sub-model key, statistic): tensor}."""
    return {(p, key, k): t.clone() for p, m in nest._sliced.items() if m._sn.norm is not None
            for key, d in m._sn.norm.stats.items() for k, t in d.items()}


# -- what reaches the statistics after calibrating -------------------------------------------------------

def _calibrated_pair(name):
    """A calibrated nest of ``name`` and an unwrapped twin with the same weights (what PyTorch would do)."""
    model, dims = BUILDERS[name]()
    twin, _ = BUILDERS[name]()
    nest = sn.wrap(model, *dims)
    nest.calibrate(data(3), batches=3)
    return model, nest, twin


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_update_bn_after_calibrate_recomputes_what_plain_pytorch_does(name):
    """``torch.optim.swa_utils.update_bn`` resets each BatchNorm (in eval mode, where a calibrated one read its
    sub-model's own statistics: the reset zeroed those and never reached the buffers), then recomputes."""
    model, nest, twin = _calibrated_pair(name)
    loader = [x for x, _ in data(2, seed=5)]
    for m in (model, twin):
        torch.optim.swa_utils.update_bn(loader, m)
        m.eval()
    x = data(1, seed=9)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=1e-6)
        for sub in nest.submodels:   # calibration gone: every sub-model reads the recomputed shared prefixes
            with nest.use(sub):
                torch.testing.assert_close(model(x), nest.export(sub).eval()(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("write", ["zero_", "copy_", "fill_"])
def test_an_in_place_write_into_calibrated_statistics_is_named(write, tmp_path):
    model, nest, twin = _calibrated_pair("bnnet")
    sub = nest.smallest
    x = data(1, seed=9)[0][0]
    with nest.use(sub):
        mean = model.b1.running_mean    # eval mode: the sub-model's own calibrated statistic
        {"zero_": lambda: mean.zero_(), "copy_": lambda: mean.copy_(mean + 1),
         "fill_": lambda: model.b1.running_var.fill_(1.0)}[write]()
        for what in (lambda: model(x), lambda: nest.export(sub), lambda: sn.save(nest, tmp_path / "c.safetensors")):
            with pytest.raises(sn.SortedNetError, match=r"b1.running_(mean|var): the calibrated statistics .* "
                                                        r"changed in place"):
                what()
    nest.drop_calibration()
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=1e-6)   # the shared buffers, never written
    nest.calibrate(data(3), batches=3)
    with torch.no_grad(), nest.use(sub):
        torch.testing.assert_close(model(x), nest.export(sub).eval()(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("what", ["weights_only", "one_batchnorm", "submodule", "deep_copy"])
def test_loading_other_weights_drops_every_stale_calibration(what):
    """Calibrated statistics describe the weights they were computed with: a load that changes any tensor of the
    model drops all of them (eval reads the loaded buffers, as in plain PyTorch), even when the BatchNorm
    buffers themselves come back unchanged (fresh models; a checkpoint fine-tuned with BatchNorm frozen)."""
    model, nest, _ = _calibrated_pair("bnnet")
    other, _ = bnnet(seed=3)
    sd = other.state_dict()
    for k in [k for k in sd if ".running_" in k or "num_batches" in k]:
        sd[k] = model.state_dict()[k].clone()         # the same BatchNorm statistics as the model's
    if what == "one_batchnorm":
        sd["b1.running_mean"] = sd["b1.running_mean"] + 0.1
    if what == "deep_copy":   # the copy has its own calibration (and hooks): loading into it leaves the model's
        copy = __import__("copy").deepcopy(model)
        copy.load_state_dict(sd)
        assert model.b1._sn.norm is not None and model.b2._sn.norm is not None
        assert copy.b1._sn.norm is None and copy.b2._sn.norm is None
        model = copy
        other.load_state_dict(sd)
    elif what == "submodule":
        model.c2.load_state_dict({k[3:]: v for k, v in sd.items() if k.startswith("c2.")})
        other = bnnet(seed=0)[0]
        other.c2.load_state_dict(model.c2.state_dict())
    else:
        model.load_state_dict(sd)
        other.load_state_dict(sd)
    x = data(1, seed=9)[0][0]
    assert model.b1._sn.norm is None and model.b2._sn.norm is None   # b1 also when c2 alone was loaded
    with torch.no_grad():
        torch.testing.assert_close(model(x), other.eval()(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("how", ["deepcopy", "averaged_model"])
def test_a_copy_of_a_calibrated_model_runs_with_its_own_calibration(how):
    """Deep copies (an EMA, ``AveragedModel``, a best-model snapshot) carry the calibration; copying a tensor moves
    its version counter, which is no in-place write."""
    model, nest, _ = _calibrated_pair("bnnet")
    copy_ = __import__("copy").deepcopy(model) if how == "deepcopy" else torch.optim.swa_utils.AveragedModel(model)
    x = data(1, seed=9)[0][0]
    with torch.no_grad(), nest.use(nest.smallest):
        torch.testing.assert_close(copy_.eval()(x), model(x), rtol=0, atol=1e-6)
        copy_.module.b1.running_mean.zero_() if how == "averaged_model" else copy_.b1.running_mean.zero_()
        with pytest.raises(sn.SortedNetError, match="changed in place"):
            copy_(x)
        model(x)   # the model's own statistics are separate tensors


@pytest.mark.parametrize("how", ["inference_mode", "double"])
def test_in_place_writes_are_seen_after_inference_mode_or_a_dtype_change(how):
    model, dims = bnnet()
    nest = sn.wrap(model, *dims)
    with torch.inference_mode() if how == "inference_mode" else torch.no_grad():
        nest.calibrate(data(3), batches=3)
    x = data(1, seed=9)[0][0]
    if how == "double":
        model.double()
        x = x.double()
    with torch.inference_mode(), nest.use(nest.smallest):
        model(x)
        model.b1.running_mean.zero_()
        with pytest.raises(sn.SortedNetError, match="changed in place"):
            model(x)


class _DepthThenBN(nn.Module):
    """A stem BatchNorm ahead of every sliced layer, residual blocks under a Depth, then a BatchNorm after the
    stack whose channel count no dimension changes (it cannot be under any norm=)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn_in = nn.Linear(6, 8), nn.BatchNorm1d(6)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))
                                    for _ in range(3))
        self.bn_out, self.head = nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(self.bn_in(x))
        for b in self.blocks:
            x = x + b(x)
        return self.head(self.bn_out(x))


def test_calibrate_names_an_unsliced_batchnorm_whose_inputs_differ_between_sub_models():
    """A BatchNorm after a Depth stack sees other inputs at every depth but keeps the full model's statistics:
    calibrate left it uncalibrated without a word (logits 0.8 off a recalibrated export). It is named in a
    warning; a BatchNorm whose inputs no sub-model changes (the stem's) is not."""
    import warnings

    torch.manual_seed(0)
    m = _DepthThenBN().eval()
    nest = sn.wrap(m, sn.Width("w", [8, 16], out="blocks.*.0", norm="blocks.*.1", inp="blocks.*.3"),
                   sn.Depth("d", [1, 3], layers="blocks"))
    batches = [torch.randn(32, 6) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"\['bn_out'\] are in no dimension's norm=") as got:
        nest.calibrate(batches, batches=2)
    assert not any("bn_in" in str(w.message) for w in got)
    nest.unwrap()
    nest = sn.wrap(m, sn.Width("w", [8, 16], out="blocks.*.0", norm="blocks.*.1", inp="blocks.*.3"))
    with pytest.warns(UserWarning, match=r"\['bn_out'\]"):  # widths inside the blocks: bn_out's inputs change too
        nest.calibrate(batches, batches=2)
    with pytest.warns(UserWarning, match=r"\['bn_out'\]"):  # one sub-model alone: compared with the full model (it
        nest.calibrate(batches, subs=["w=8"], batches=2)   # said nothing: nothing to compare with)
    stem = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)).eval()
    nest = sn.wrap(stem, sn.Width("h", [8, 16], out="1", norm="2", inp="4"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stem BatchNorm's inputs are the same for every sub-model: no warning
        nest.calibrate(batches, batches=2)
        nest.calibrate(batches, subs=["h=8"], batches=2)


@pytest.mark.parametrize("value", ["other", "same", "read"])
def test_assigning_a_running_statistic_after_calibrating_drops_that_modules_calibration(value):
    """``bn.running_mean = tensor`` after calibrating changed the state_dict but eval and export still read the
    calibrated statistics; assigning other values now drops the module's calibration (as load_state_dict does),
    the buffer's own values, or what eval reads (``m.x = m.x``), keep it."""
    m, dims = bnnet()
    nest = sn.wrap(m, *dims)
    nest.calibrate(data(), batches=4)
    before = m.b1._buffers["running_mean"].clone()  # (the shared buffer: m.b1.running_mean reads the calibration)
    new = {"other": torch.full_like(before, 5.0), "same": before.clone(), "read": m.b1.running_mean}[value]
    m.b1.running_mean = new
    assert (m.b1._sn.norm is None) == (value == "other") and m.b2._sn.norm is not None
    with nest.use("a=4,b=12"), torch.no_grad():
        live = m.b1.running_mean.clone()
    exported = nest.export("a=4,b=12").b1.running_mean
    if value == "other":
        assert torch.equal(live, new[:4]) and torch.equal(exported, new[:4])
    else:
        assert torch.equal(live, exported)


@pytest.mark.parametrize("then", ["calibrate_another", "double", "deepcopy"])
def test_a_write_into_one_sub_models_statistics_stays_refused_after_the_statistics_are_rebuilt(then):
    """Calibrating another sub-model, ``model.double()`` (converted on the next read) and a deep copy rebuild
    the calibrated statistics as new objects, counted from then: a write made before into sub-model A's went
    through silently (A ran with the written values, and ``sn.save`` stored them)."""
    import copy

    model, nest, _ = _calibrated_pair("bnnet")
    a, b = nest.smallest, nest.largest
    x = data(1, seed=9)[0][0]
    with nest.use(a):
        model.b1.running_mean.zero_()
    if then == "calibrate_another":
        nest.calibrate(data(2, seed=4), subs=[b], batches=2)
    elif then == "double":
        model.double()
        x = x.double()
        with torch.no_grad(), nest.use(b):
            model(x)  # (converts every sub-model's statistics)
    else:
        model = copy.deepcopy(model)
    with pytest.raises(sn.SortedNetError, match=r"b1.running_mean: the calibrated statistics .* changed in place"):
        with torch.no_grad(), nest.use(a):  # (a deep copy follows its nest's use)
            model(x)


def test_writing_a_calibrated_statistic_back_does_not_tie_it_to_the_shared_buffer():
    """``bn.running_mean = bn.running_mean`` in eval mode (the full sub-model's calibrated statistic written
    back, which keeps the calibration): the shared buffer became that very tensor, and a training-mode forward
    then updated the calibrated statistic in place, unseen (the live eval output moved by 0.1 from the export)."""
    model, nest, _ = _calibrated_pair("bnnet")
    full = nest.largest
    x = data(1, seed=9)[0][0]
    calibrated = stats(nest.export(full).b1)
    model.b1.running_mean = model.b1.running_mean
    assert nest._calibrated()  # (kept: the same values)
    model.train()
    with torch.no_grad():
        model(x * 3 + 5)  # training mode: the shared buffer is updated, the calibrated statistic is not
    model.eval()
    assert not torch.equal(model.b1._buffers["running_mean"], calibrated[0])  # (the shared one moved)
    for got, want in zip(stats(nest.export(full).b1), calibrated):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_interrupted_calibrate_calibrates_every_layer_or_none():
    """A Ctrl-C at any point of calibrate's last steps (the statistics are being stored): every BatchNorm
    of the nest gets its per-sub-model statistics, or none does; never some layers calibrated and others
    reading the shared statistics."""
    m, dims = bnnet()
    nest = sn.wrap(m, *dims)
    batches = data(2)
    with InterruptAt(10**9) as count:
        nest.calibrate(batches)
    every = nest._calibrated()
    assert len(every) == 2
    x = batches[0][0]
    with torch.no_grad():
        calibrated = {str(s): run_sub(nest, m, s, x) for s in nest.submodels}
    hit = 0
    for n in range(max(1, count.calls - 60), count.calls + 1):
        m, dims = bnnet()
        nest = sn.wrap(m, *dims)
        with torch.no_grad():
            shared = {str(s): run_sub(nest, m, s, x) for s in nest.submodels}
        if not interrupted(n, lambda: nest.calibrate(batches)):  # noqa: B023
            continue
        hit += 1
        now = nest._calibrated()
        assert now in ([], every), (n, now)
        want = calibrated if now else shared
        with torch.no_grad():
            for s in nest.submodels:
                torch.testing.assert_close(run_sub(nest, m, s, x), want[str(s)], msg=f"{s} after call {n}")
    assert hit >= 50


def run_sub(nest, model, sub, x):
    with nest.use(sub):
        return model(x)


def _train_steps(model, steps=2):
    """A loop of the user's own: training-mode forwards and SGD steps (no sortednet call)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for x, _ in data(steps, seed=5):
        opt.zero_grad()
        model(x * 3 - 1).square().mean().backward()
        opt.step()
    model.eval()


def _stale(record):
    return [w for w in record if issubclass(w.category, StaleCalibrationWarning)]


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("read", ["eval_forward", "export", "save"])
def test_calibrated_statistics_read_after_training_on_warn_once(name, read, tmp_path):
    """Calibrate, then train on in a loop of one's own: the per-sub-model statistics describe the weights of before
    (PyTorch does not count running-statistics updates, but num_batches_tracked moves); eval, export and save name
    it once, and still read them (documented)."""
    model, nest, _ = _calibrated_pair(name)
    x = data(1, seed=9)[0][0]
    _train_steps(model)
    with pytest.warns(StaleCalibrationWarning, match="predate training of the model") as record:
        with torch.no_grad(), nest.use(nest.smallest):
            if read == "eval_forward":
                model(x)
                model(x)
            elif read == "export":
                nest.export(nest.smallest)
            else:
                sn.save(nest, tmp_path / "c.safetensors")
    assert len(_stale(record)) == 1
    nest.calibrate(data(3), batches=3)   # calibrated again: current, no warning
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error", StaleCalibrationWarning)
        with torch.no_grad(), nest.use(nest.smallest):
            model(x)
        nest.export(nest.smallest)


def test_what_does_not_train_does_not_make_calibrated_statistics_stale(tmp_path):
    """Eval forwards, check, export, save / load, a deep copy, a dtype move, calibrating other sub-models: none is a
    training-mode forward of the model; no warning."""
    import copy
    import warnings

    model, nest, _ = _calibrated_pair("cnn_bn_residual")
    x = data(1, seed=9)[0][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCalibrationWarning)
        nest.check(x)
        for sub in nest.submodels:
            with torch.no_grad(), nest.use(sub):
                model(x)
            nest.export(sub)
        sn.save(nest, tmp_path / "c.safetensors")
        other, dims = cnn()
        loaded = sn.load(sn.wrap(other, *dims), tmp_path / "c.safetensors")
        copied = copy.deepcopy(model)
        model.double()
        nest.calibrate([(b.double(), y) for b, y in data(3)], subs=[nest.smallest], batches=3)
        for m, xx in ((other, x), (copied, x), (model, x.double())):
            with torch.no_grad(), loaded.use(loaded.smallest), nest.use(nest.largest):
                m.eval()(xx)


def test_recalibrating_some_sub_models_after_training_keeps_the_others_stale():
    model, nest, _ = _calibrated_pair("bnnet")
    x = data(1, seed=9)[0][0]
    _train_steps(model)
    nest.calibrate(data(3), subs=[nest.smallest], batches=3)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCalibrationWarning)
        with torch.no_grad(), nest.use(nest.smallest):
            model(x)                                   # calibrated after the training: current
    with pytest.warns(StaleCalibrationWarning), torch.no_grad(), nest.use(nest.largest):
        model(x)                                       # carried over from before the training


@pytest.mark.parametrize("when", ["trained_then_copied", "copy_trains"])
def test_a_deep_copy_carries_what_its_calibration_predates(when):
    """A deep copy (an EMA, a teacher) of a calibrated model counts training-mode forwards from the same baseline:
    one made after the model trained, or one that trains before its first eval read, used to read its stale
    statistics in silence. One warning for all its BatchNorm layers."""
    import copy

    model, nest, _ = _calibrated_pair("cnn_bn_residual")
    x = data(1, seed=9)[0][0]
    if when == "trained_then_copied":
        _train_steps(model)
        other = copy.deepcopy(model)
    else:
        other = copy.deepcopy(model)
        _train_steps(other)
    twin = sn.Nest.of(other)
    with pytest.warns(StaleCalibrationWarning) as record, torch.no_grad(), twin.use(twin.smallest):
        other.eval()(x)
        other(x)
    assert len(_stale(record)) == 1
    if when == "copy_trains":  # the original did not train
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error", StaleCalibrationWarning)
            with torch.no_grad(), nest.use(nest.smallest):
                model(x)


def test_a_load_that_leaves_some_weights_drops_every_calibration(tmp_path, monkeypatch):
    """Per-sub-model statistics describe the weights they were computed with. sn.load(strict=False) of a file
    lacking a weight installed the file's statistics on the mix in silence (0.34 off a recalibration), and a
    load stopped part-way kept the nest's old ones (0.53 off)."""
    import json
    import warnings

    import sortednet.checkpoint as ck

    model, nest, _ = _calibrated_pair("bnnet")
    path = tmp_path / "full.safetensors"
    sn.save(nest, path)
    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(str(path)).items() if k != "c1.weight"}  # a well-formed file without it
    meta = dict(sn.io.read_metadata(path))
    meta["crc32"] = {k: ck._crc(ck._raw(v)) for k, v in tensors.items()}
    lacking = tmp_path / "lacking.safetensors"
    ck.write(str(lacking), tensors, lambda crcs: {"sortednet": json.dumps(meta)})
    target, _ = bnnet(seed=3)
    with pytest.warns(StaleCalibrationWarning, match="left as they were"):
        loaded = sn.load(target, lacking, strict=False)
    assert all(m._sn.norm is None for m in loaded.model.modules() if "_sn" in m.__dict__ and hasattr(m._sn, "norm"))
    # a complete load installs the file's statistics, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = sn.load(bnnet(seed=3)[0], path)
    assert any(getattr(m._sn, "norm", None) is not None for m in again.model.modules() if "_sn" in m.__dict__)
    # stopped after two tensors: the nest's own statistics no longer describe its weights
    other, other_dims = bnnet(seed=4)
    onest = sn.wrap(other, *other_dims)
    onest.calibrate(data(3), batches=3)
    real, calls = ck.Container.copy_into, []

    def flaky(self, name, targets):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("simulated")
        return real(self, name, targets)

    monkeypatch.setattr(ck.Container, "copy_into", flaky)
    with pytest.raises(sn.SortedNetError, match="stopped after 2 of .* statistics were dropped"):
        sn.load(onest, path)
    assert all(getattr(m._sn, "norm", None) is None for m in other.modules() if "_sn" in m.__dict__)


def test_sorting_is_refused_while_a_copy_holds_calibrated_statistics():
    """A deep copy made after calibrate keeps its own per-sub-model statistics; a sort would permute its weights
    and shared buffers but could not re-describe those (each holds the first channels of the old order): the
    copy's full model would change. Refused, nothing changed; a copy without calibration follows the sort."""
    from sortednet.importance import sort_units

    model, nest, _ = _calibrated_pair("bnnet")
    ema = __import__("copy").deepcopy(model).eval()
    nest.drop_calibration()
    x = data(1, seed=9)[0][0]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match="deep copy of the model .* holds calibrated"):
        sort_units(nest, "l1", example=x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    del ema
    __import__("gc").collect()
    plain = __import__("copy").deepcopy(model).eval()
    sort_units(nest, "l1", example=x)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("into", ["fresh", "same"])
def test_statistics_saved_stale_load_stale(name, into, tmp_path):
    """Calibrate, train on (the statistics describe the weights of before), save: save warns, and the nest that
    loads the file warns at its first eval read too, instead of reading them as fresh. Saved fresh, loaded fresh."""
    import warnings

    model, nest, _ = _calibrated_pair(name)
    x = data(1, seed=9)[0][0]
    fresh_path = tmp_path / "fresh.safetensors"
    sn.save(nest, fresh_path)
    _train_steps(model)
    path = tmp_path / "stale.safetensors"
    with pytest.warns(StaleCalibrationWarning):
        sn.save(nest, path)

    def read(target, file):
        loaded = sn.load(target, file)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with torch.no_grad(), loaded.use(loaded.smallest):
                loaded.model.eval()(x)
        return len(_stale(record))

    assert read(BUILDERS[name]()[0] if into == "fresh" else nest, path) == 1
    assert read(BUILDERS[name]()[0] if into == "fresh" else nest, fresh_path) == 0


class _SharedNorm(nn.Module):
    """One BatchNorm called twice per forward (two branches normalised by it), momentum=None."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn, self.out = nn.Linear(4, 8), nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=None), \
            nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.a(x))) + torch.relu(self.bn(self.b(x))))


def test_a_batchnorm_run_twice_per_forward_counts_its_calls_as_a_plain_recalibration_does():
    """The export's num_batches_tracked was the number of batches (3), a plain recalibration counts the BatchNorm's
    calls (6): a momentum=None export training on weighed its next batch twice as much (running mean 0.228 off)."""
    torch.manual_seed(0)
    m = _SharedNorm().eval()
    nest = sn.wrap(m, sn.Width("h", [3, 8], out=["a", "b"], norm="bn", inp="out"))
    data = [torch.randn(5, 4) for _ in range(3)]
    ref = nest.export("h=3")
    ref.bn.reset_running_stats()
    ref.bn.train()
    with torch.no_grad():
        for x in data:
            ref(x)
    nest.calibrate(data, batches=3)
    ex = nest.export("h=3")
    assert int(ex.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 6
    ref.train()
    ex.train()
    with torch.no_grad():
        x = torch.randn(5, 4) * 3 + 2
        ref(x)
        ex(x)
    torch.testing.assert_close(ex.bn.running_mean, ref.bn.running_mean, rtol=1e-5, atol=1e-6)


def test_calibrate_refuses_a_loader_it_cannot_iterate_by_name():
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).eval()
    nest = sn.wrap(m, sn.Width("h", [2, 8], out="0", norm="1", inp="2"))
    with pytest.raises(sn.SortedNetError, match="needs a loader of batches .* got int 5"):
        nest.calibrate(5, batches=1)


def test_a_non_reentrant_checkpoint_over_a_calibrated_batchnorm_recomputes_its_sub_models_statistics():
    """The model's own ``checkpoint(f, h, use_reentrant=False)`` over an eval-mode BatchNorm after calibrate, with
    backward after the ``use`` block: the recomputation read the full model's calibrated statistics (the same
    shape, so PyTorch's recomputation check passed) and c2's gradient was up to 5.6 off, in silence."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)
            self.bn, self.fc = nn.BatchNorm2d(8), nn.Linear(8, 2)

        def forward(self, x, ckpt=False):
            h = self.c2(torch.relu(self.c1(x)))
            f = lambda t: torch.relu(self.bn(t))  # noqa: E731
            h = checkpoint(f, h, use_reentrant=False) if ckpt else f(h)
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    net = Net()
    nest = sn.wrap(net, sn.Width("a", [2, 8], out="c1", inp="c2"), sn.Width("b", [4, 8], out="c2", norm="bn", inp="fc"))
    batches = [(torch.randn(16, 1, 8, 8) * 2 + 1,) for _ in range(3)]
    nest.calibrate(batches, batches=3)
    net.eval()  # (frozen BatchNorm, fine-tuned with gradients)
    x = torch.randn(4, 1, 8, 8)

    def grad(sub, ckpt):
        net.zero_grad()
        with nest.use(sub):
            y = net(x, ckpt)
        y.sum().backward()  # (after the block: the recomputation runs under the default, the full model)
        return net.c2._parameters["weight"].grad.clone()

    for sub in ("a=2,b=8", "a=8,b=4", "a=2,b=4"):
        want = grad(sub, False)
        assert not torch.allclose(want, grad(nest.largest, False))  # (calibrated statistics differ per sub-model)
        torch.testing.assert_close(grad(sub, True), want, rtol=1e-5, atol=1e-6)


def _two_bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8), nn.BatchNorm1d(8),
                         nn.ReLU(), nn.Linear(8, 2)).eval()


def test_a_restricted_nest_calibrates_and_reloads_its_full_model(tmp_path):
    """``submodels=`` leaving the full model out: ``use`` / ``activate`` take it (it is what runs outside ``use``),
    but ``calibrate(subs=[full])`` was refused. Its statistics are calibrated now (those a plain recalibration of
    the model gives), and survive ``sn.save`` / ``sn.load`` (whose reading of their names took the list only)."""
    data = [torch.randn(6, 4) * 3 + 1 for _ in range(3)]
    plain = _two_bn_mlp().train()
    for bn in (plain[1], plain[4]):
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for x in data:
            plain(x)
    plain.eval()
    model = _two_bn_mlp()
    dims = (sn.Width("a", [4, 8, 16], out="0", norm="1", inp="3"), sn.Width("b", [2, 4, 8], out="3", norm="4", inp="6"))
    nest = sn.wrap(model, *dims, submodels=["a=4,b=2", "a=8,b=4"])
    x = torch.randn(5, 4)
    assert [str(s) for s in nest.calibrate(data, subs=["a=16,b=8", "a=4,b=2"])] == ["a=16,b=8", "a=4,b=2"]
    with torch.no_grad():
        want = plain(x)
        torch.testing.assert_close(model(x), want)
        with nest.use("a=16,b=8"):
            torch.testing.assert_close(model(x), want)
    sn.save(nest, tmp_path / "n.safetensors")
    again = sn.load(_two_bn_mlp(), tmp_path / "n.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), want)
        with nest.use("a=4,b=2"), again.use("a=4,b=2"):
            torch.testing.assert_close(again.model(x), model(x))


def test_a_batchnorm_after_a_depth_stack_is_named_with_the_width_that_calibrates_it():
    """A nest of a Depth alone: calibrate refused it (no sliced BatchNorm), and the BatchNorm after the stack kept
    the full model's statistics at every depth; the refusal names it and the one-size Width that gives it
    statistics of each depth's own, which then are those of a plain recalibration of the shallower model. (One
    declared after the stack is named first: a stem BatchNorm's inputs keep at every depth.)"""
    class Net(nn.Module):
        def __init__(self, n=3):
            super().__init__()
            torch.manual_seed(0)
            self.fc, self.bn_stem = nn.Linear(4, 8), nn.BatchNorm1d(8)  # (before the stack: named by no one)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(n))
            self.bn_after, self.head = nn.BatchNorm1d(8), nn.Linear(8, 2)

        def forward(self, x):
            x = self.bn_stem(self.fc(x))
            for b in self.blocks:
                x = x + 3 * b(x)
            return self.head(self.bn_after(x))

    data = [torch.randn(6, 4) for _ in range(2)]
    model = Net().eval()
    nest = sn.wrap(model, sn.Depth("d", [1, 2, 3], layers="blocks"))
    with pytest.raises(sn.SortedNetError, match=r"one that runs after the stack.*sn.Width\('bn', \[channels\], "
                                                r"norm=\[path\]\) \(BatchNorms outside the blocks, those declared "
                                                r"after the stack first: \['bn_after', 'bn_stem'\]; one before the "
                                                r"stack sees the same inputs"):
        nest.calibrate(data)
    nest.unwrap()
    nest = sn.wrap(model, sn.Width("bn", [8], norm=["bn_after"]), sn.Depth("d", [1, 2, 3], layers="blocks"))
    nest.calibrate(data)
    shallow = Net()
    shallow.load_state_dict(model.state_dict())
    shallow.blocks = shallow.blocks[:1]
    shallow.bn_after.reset_running_stats()
    shallow.bn_after.momentum = None
    shallow.eval().bn_after.train()  # (the stem's statistics are the nest's: not recalibrated)
    with torch.no_grad():
        for x in data:
            shallow(x)
    x = torch.randn(5, 4)
    with torch.no_grad(), nest.use("d=1"):
        torch.testing.assert_close(model(x), shallow.eval()(x))
        torch.testing.assert_close(nest.export("d=1")(x), shallow(x))


class _StemWidthDepthThenBN(nn.Module):
    """A Width on the stem's channels, a Depth, a BatchNorm after the stack in no norm=, then a head whose hidden
    units a Width cuts (with their own BatchNorm, listed)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.bn, self.proj = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))
        self.post = nn.BatchNorm1d(8)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        x = self.proj(torch.relu(self.bn(self.fc(x))))
        for b in self.blocks:
            x = x + 3 * b(x)
        return self.head(self.post(x))


def test_a_restricted_nest_compares_unlisted_batchnorms_between_its_own_sub_models():
    """``post`` keeps one set of statistics for every sub-model. A restricted nest's calibration compared the
    sub-models calibrated with the largest listed one only: calibrating that one alone said nothing, though the
    other listed one (depth 1) feeds ``post`` other inputs. Its smallest and largest listed ones are compared now:
    where every listed sub-model feeds ``post`` alike (they differ after it), nothing is said, whatever the full
    model (which the nest never trains) would feed it."""
    data = [torch.randn(8, 4) * 2 + 1 for _ in range(2)]
    dims = lambda: (sn.Width("c", [4, 8], out="fc", norm="bn", inp="proj"),  # noqa: E731
                    sn.Width("h", [8, 16], out="head.0", norm="head.1", inp="head.3"),
                    sn.Depth("d", [1, 2, 3], layers="blocks"))
    nest = sn.wrap(_StemWidthDepthThenBN().eval(), *dims(), submodels=["c=4,h=8,d=1", "c=8,h=16,d=2"])
    with pytest.warns(UserWarning, match=r"BatchNorm layers \['post'\] are in no dimension's norm=.*differ between "
                                         r"the sub-models calibrated and the nest's smallest / largest"):
        nest.calibrate(data, subs=["c=8,h=16,d=2"])
    nest = sn.wrap(_StemWidthDepthThenBN().eval(), *dims(), submodels=["c=8,h=8,d=2", "c=8,h=16,d=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nest.calibrate(data)
        nest.calibrate(data, subs=["c=8,h=16,d=2"])


def test_batches_takes_integer_scalars_of_numpy_and_torch():
    """``calibrate(batches=np.int64(2))`` was refused ("must be an int"), while profile(repeat=), sizes and budgets
    take numpy and torch integers: accepted now, with the same statistics as ``batches=2``; floats and bools
    stay refused."""
    import numpy as np

    torch.manual_seed(0)
    data = [torch.randn(16, 3) for _ in range(3)]
    stats = []
    for batches in (2, np.int64(2), torch.tensor(2)):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", norm="1", inp="2"))
        nest.calibrate(data, batches=batches)
        with nest.use("h=4"):
            stats.append(m[1].running_mean.clone())
    for s in stats[1:]:
        torch.testing.assert_close(s, stats[0])
    for bad in (2.0, True, torch.tensor(2.0)):
        with pytest.raises(sn.SortedNetError, match="batches must be an int >= 1"):
            nest.calibrate(data, batches=bad)


def _bn_net(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    return model, sn.wrap(model, sn.Width("c", [4, 8], out="0", norm="1", inp="3"))


@pytest.mark.parametrize("on", ["copy", "model"])
def test_shared_statistics_written_in_place_after_calibrate_are_said_stale(on):
    """An EMA copy synced in place (``copy_`` over its state_dict) while eval mode reads its calibrated
    statistics computes with the old ones: said, as after a training-mode forward; a write that puts the
    same values back is no news."""
    import copy

    model, nest = _bn_net()
    data = [torch.randn(6, 3, 10, 10) for _ in range(2)]
    nest.calibrate(data)
    target = copy.deepcopy(model) if on == "copy" else model
    target.eval()
    x = torch.randn(2, 3, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCalibrationWarning)
        for t in target.state_dict().values():  # (the same values written back: nothing moved)
            t.copy_(t.clone())
        with nest.use("c=4"), torch.no_grad():
            target(x)
    source = _bn_net(seed=1)[0]
    with torch.no_grad():
        source(torch.randn(6, 3, 10, 10))  # (statistics of its own)
        for (k, t), v in zip(target.state_dict().items(), source.state_dict().values()):
            if not k.endswith("num_batches_tracked"):  # (no training-mode forward of its own: its count stays)
                t.copy_(v)
    with pytest.warns(StaleCalibrationWarning, match="writes into its shared running statistics"), \
            nest.use("c=4"), torch.no_grad():
        target(x)


class _PlainFirstBlock(nn.Module):
    """Residual blocks under a Depth; only the later blocks' BatchNorm layers are listed under norm= (the first
    block's is absent or not calibrated): training at depth 1 runs none of the calibrated ones."""

    def __init__(self, norm_first: bool):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16) if norm_first or i else nn.Identity(), nn.Linear(16, 8))
            for i in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("read", ["eval_forward", "export", "save"])
def test_training_a_shallow_sub_model_makes_the_deeper_calibrations_stale(norm_first, read, tmp_path):
    """Staleness was judged per BatchNorm, by its own batch counter: training at depth 1 runs none of the deeper
    blocks' BatchNorm layers, yet what reaches them changed (block 0 trained), so their calibrated statistics were
    read, exported and saved in silence (or only block 0's named as stale). Any training-mode forward of the model
    after calibrating makes every calibrated statistic stale."""
    norms = ["blocks.1.1", "blocks.2.1"]
    dims = lambda: (sn.Depth("d", [1, 3], layers="blocks"),  # noqa: E731
                    sn.Width("h", [8, 16], out=["blocks.1.0", "blocks.2.0"], norm=norms,
                             inp=["blocks.1.2", "blocks.2.2"]))
    model = _PlainFirstBlock(norm_first)
    nest = sn.wrap(model, *dims())
    data = [torch.randn(32, 8) * 3 + 1 for _ in range(3)]
    nest.calibrate(data, batches=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    with nest.use("d=1,h=16"):
        for x in data:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    model.eval()
    assert sorted(stale_statistics(nest)) == norms
    with pytest.warns(StaleCalibrationWarning, match="predate training of the model") as record:
        with torch.no_grad(), nest.use("d=3,h=16"):
            if read == "eval_forward":
                model(data[0])
                model(data[0])
            elif read == "export":
                nest.export("d=3,h=16")
            else:
                sn.save(nest, tmp_path / "c.safetensors")
    assert len(_stale(record)) == 1
    if read == "save":
        other = _PlainFirstBlock(norm_first)
        back = sn.load(sn.wrap(other, *dims()), tmp_path / "c.safetensors")
        assert sorted(stale_statistics(back)) == norms
    nest.calibrate(data, subs=["d=1,h=8"], batches=3)   # the others stay stale
    assert sorted(stale_statistics(nest)) == norms
    nest.calibrate(data, batches=3)
    assert stale_statistics(nest) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCalibrationWarning)
        with torch.no_grad(), nest.use("d=3,h=16"):
            model(data[0])
        nest.check(data[0])               # (checks, FLOPs counts and profiles leave no trace: not training)
        nest.profile(data[0], repeat=1)
        nest.cost("d=3,h=16", "flops", example=data[0])
        with torch.no_grad(), nest.use("d=3,h=16"):
            model(data[0])
        nest.export("d=3,h=16")


@pytest.mark.parametrize("bad", ["inf_pixel", "nan_batch"])
def test_a_batch_that_gives_non_finite_statistics_is_refused_and_the_calibration_kept(bad):
    """One inf pixel in a calibration batch made a sub-model's running_var NaN: calibrate stored it without a word,
    and every eval output and export of that sub-model was NaN. Refused, naming the BatchNorm and the sub-model;
    the earlier calibration stays."""
    model, nest = _bn_net()
    good = [torch.randn(6, 3, 10, 10) for _ in range(2)]
    nest.calibrate(good)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad(), nest.use("c=4"):
        before = model.eval()(x)
    b = torch.randn(6, 3, 10, 10)
    if bad == "inf_pixel":
        b[0, 0, 0, 0] = float("inf")
    else:
        b.fill_(float("nan"))
    with pytest.raises(sn.SortedNetError, match=r"statistics of BatchNorm '1' for sub-model c=\d are not finite"):
        nest.calibrate([good[0], b])
    with torch.no_grad(), nest.use("c=4"):
        assert torch.equal(model(x), before)
    assert torch.isfinite(nest.export("c=4")[1].running_var).all()


def test_calibrate_names_sliced_batchnorms_that_keep_no_statistics():
    """BatchNorm layers built with track_running_stats=False, listed under norm=, were refused with 'list
    BatchNorm layers under norm=', which they are: the message says they keep no statistics to calibrate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(),
                          nn.Conv2d(8, 4, 3))
    nest = sn.wrap(model, sn.Width("c", [4, 8], out="0", norm="1", inp="3"))
    with pytest.raises(sn.SortedNetError, match=r"\['1'\] are built with track_running_stats=False"):
        nest.calibrate([torch.randn(4, 3, 8, 8)])


class _HeadOnly(nn.Module):
    """A backbone no dimension slices (its own BatchNorm) and a head whose width is nested, with a calibrated
    BatchNorm: training the backbone on its own runs no calibrated module, nor the model's forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12))
        self.head = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(self.backbone(x))


def _train_part(model, nest, how):
    x = torch.randn(16, 6) * 2 + 1
    if how == "backbone_alone":  # a part trained on its own: no forward of the model
        opt = torch.optim.SGD(model.backbone.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            (model.backbone(x) - 3).square().mean().backward()
            opt.step()
    elif how == "frozen_norms":  # a fine-tune in eval mode (statistics frozen): no training-mode forward
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.eval()
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    elif how == "fused_adam":  # a fused step leaves the parameters' version counters as they were
        opt = torch.optim.Adam(model.backbone.parameters(), lr=0.05, fused=True)
        opt.zero_grad()
        (model.backbone(x) - 3).square().mean().backward()
        opt.step()
    elif how == "in_place":  # weights written in place (an EMA's swap-in)
        with torch.no_grad():
            model.backbone[0].weight.mul_(0.5)
    elif how == "reordered":  # the same values in another order (a sort by hand): sum and norm alike
        with torch.no_grad():
            w = model.backbone[0].weight
            w.copy_(w.flip(0))
    elif how == "replaced":  # a module swapped in (an adapter around it, a new layer): its weights were not there
        model.backbone[2] = nn.Linear(12, 12)
    elif how == "pruned":  # torch.nn.utils.prune: the weight slot becomes weight_orig, a mask multiplies it
        torch.nn.utils.prune.l1_unstructured(model.backbone[0], "weight", amount=0.5)
    elif how == "pruned_again":  # pruned before the calibration too: only the mask buffer changes
        torch.nn.utils.prune.l1_unstructured(model.backbone[0], "weight", amount=0.6)
    elif how == "data_write":  # vector_to_parameters writes through .data: no version counter moves
        vec = torch.nn.utils.parameters_to_vector(model.backbone.parameters())
        torch.nn.utils.vector_to_parameters(vec * 1.3, model.backbone.parameters())
    elif how == "slot_write":  # a tensor put straight into the slot (accelerate's set_module_tensor_to_device)
        w = model.backbone[0].weight
        model.backbone[0]._parameters["weight"] = nn.Parameter(w.detach() * 1.3)
    elif how == "module_slot":  # a module put straight into its parent's dict: no registration hook runs
        model.backbone._modules["1"] = nn.Tanh()
    elif how == "functional_call":  # a forward with other weights: it reads the statistics of the model's own
        model.eval()
        other = {n: p.detach() * 1.3 for n, p in model.backbone.named_parameters(prefix="backbone")}
        with torch.no_grad(), nest.use("h=4"):
            torch.func.functional_call(model, other, (x,))
    elif how == "compiled":  # a compiled training forward skips the nest's hooks; the head's width 8 runs its BN
        step = torch.compile(model.backbone, backend="eager")  # (compiled on its own: none of it calibrated)
        opt = torch.optim.SGD(model.backbone.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            (step(x) - 3).square().mean().backward()
            opt.step()
    model.eval()


@pytest.mark.parametrize("how", ["backbone_alone", "frozen_norms", "fused_adam", "in_place", "reordered",
                                 "compiled", "replaced", "pruned", "pruned_again", "data_write", "slot_write",
                                 "module_slot", "functional_call"])
@pytest.mark.parametrize("read", ["eval_forward", "export", "save"])
def test_weights_trained_anywhere_make_the_calibrations_stale(how, read, tmp_path):
    """Staleness was judged by training-mode forwards of the model (and each calibrated BatchNorm's counter):
    a part trained on its own, a fine-tune with the statistics frozen (eval mode), a fused optimizer's step,
    weights written in place, a compiled forward, all left calibrations of other weights read, exported and saved
    as fresh (eval output 0.25 off a recalibration). The calibration now watches the model's weights too; and
    (later) its modules, its persistent buffers and the data pointers of its tensors: a module replaced after the
    calibration (0.09 off), a prune (a mask buffer), ``vector_to_parameters`` (a write through ``.data``: 0.75
    off) were read as fresh; and (later) a tensor or module put straight into a module's dicts (accelerate's
    loading, ``torch.func.functional_call``: no registration hook runs) was seen only after a registration
    anywhere else."""
    def build():
        model = _HeadOnly()
        if how == "pruned_again":
            torch.nn.utils.prune.l1_unstructured(model.backbone[0], "weight", amount=0.2)
        return model

    model = build()
    dims = lambda: (sn.Width("h", [4, 8], out="head.0", norm="head.1", inp="head.3"),)  # noqa: E731
    nest = sn.wrap(model, *dims())
    data = [torch.randn(32, 6) * 2 + 1 for _ in range(3)]
    nest.calibrate(data, batches=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _train_part(model, nest, how)  # (a fine-tune in eval mode reads them itself after its first step: told)
        assert sorted(stale_statistics(nest)) == ["head.1"]
        refused = how == "pruned" and read != "eval_forward"  # (a model changed after wrap: other slots)
        with torch.no_grad(), nest.use("h=4"), (pytest.raises(sn.SortedNetError, match="changed after wrap")
                                                if refused else contextlib.nullcontext()):
            if read == "eval_forward":
                model(data[0])
                model(data[0])
            elif read == "export":
                nest.export("h=4")
            else:
                sn.save(nest, tmp_path / "c.safetensors")
    stale = _stale(record)
    assert all("predate training of the model" in str(w.message) for w in stale)
    if how == "pruned":
        return
    assert len(stale) == 1 + (how in ("frozen_norms", "functional_call") and read == "save")  # (once per
    # calibration; saving, each time)
    if read == "save":
        back = sn.load(sn.wrap(build(), *dims()), tmp_path / "c.safetensors")
        assert sorted(stale_statistics(back)) == ["head.1"]
    nest.calibrate(data, batches=3)
    assert stale_statistics(nest) == {}


def test_what_changes_no_weight_leaves_the_calibrations_fresh():
    """Monte-Carlo dropout (training mode, the BatchNorm layers frozen, no gradients) made every calibration
    stale, though nothing changed; so would a load or a DDP-style broadcast of the same weights (version counters
    move, values do not)."""
    model = _HeadOnly()
    model.backbone.insert(1, nn.Dropout(0.5))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="head.0", norm="head.1", inp="head.3"))
    data = [torch.randn(32, 6) * 2 + 1 for _ in range(3)]
    nest.calibrate(data, batches=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCalibrationWarning)
        model.train()
        model.head[1].eval()
        with torch.no_grad(), nest.use("h=4"):
            samples = torch.stack([model(data[0]) for _ in range(4)])
        assert samples.std(0).amax() > 0  # (dropout ran)
        model.eval()
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.clone())
        with torch.no_grad(), nest.use("h=4"):
            model(data[0])
            same = {n: p.detach().clone() for n, p in model.named_parameters()}
            torch.func.functional_call(model, same, (data[0],))  # (the same weights, other tensors)
        w = model.backbone[0].weight
        model.backbone[0]._parameters["weight"] = nn.Parameter(w.detach().clone())
        model.extra = nn.Identity()  # (a module of no tensors added: a forward's first call builds one)
        with torch.no_grad(), nest.use("h=4"):
            model(data[0])
        nest.export("h=4")
    assert stale_statistics(nest) == {}


def test_a_forward_on_the_meta_device_keeps_the_calibrated_statistics():
    """A shape pass on the meta device converted the calibrated statistics to meta tensors for good (they follow
    the buffers' device): after to_empty() and the weights loaded back, eval and export raised PyTorch's 'Cannot
    copy out of meta tensor'. They stay where they are; the weights back, the outputs are the calibrated ones;
    other weights loaded instead are said stale."""
    model = _HeadOnly()
    nest, data = _calibrated_head(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), nest.use("h=4"):
        want = model(data[0])
    for weights in ("same", "other"):
        model.to("meta")
        with torch.no_grad(), nest.use("h=4"):
            assert model(data[0].to("meta")).shape == (32, 2)
        model.to_empty(device="cpu")
        with torch.no_grad():  # (copied back in place: load_state_dict over to_empty's garbage would drop them)
            for k, v in model.state_dict().items():
                v.copy_(state[k] if weights == "same" or not v.is_floating_point() else state[k] * 1.5)
        if weights == "same":
            with warnings.catch_warnings():
                warnings.simplefilter("error", StaleCalibrationWarning)
                with torch.no_grad(), nest.use("h=4"):
                    torch.testing.assert_close(model(data[0]), want, rtol=0, atol=0)
                nest.export("h=4")
            assert stale_statistics(nest) == {}
        else:
            assert sorted(stale_statistics(nest)) == ["head.1"]


class _GrowsItsParts(nn.Module):
    """A backbone with an empty slot (a bias, a buffer) and a forward that builds its parts as it goes: a stem
    list created empty at its first call, an activation and a block list made anew at every call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 12, bias=False), nn.ReLU(), nn.Linear(12, 12))
        self.register_buffer("shift", None)
        self.head = nn.ModuleList([nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)])

    def forward(self, x):
        if "stem" not in self._modules:
            self.stem = nn.Sequential()  # (no tensor: the calibration's forwards built theirs on a private view)
        self.act = nn.ReLU()
        self.head = nn.ModuleList(list(self.head))
        h = self.backbone(self.stem(x))
        h = h if self.shift is None else h + self.shift
        return self.head[2](self.act(self.head[1](self.head[0](h))))


@pytest.mark.parametrize("then", ["nothing", "bias_filled", "buffer_filled", "stem_grown"])
def test_modules_a_forward_rebuilds_are_no_news_and_a_slot_filled_later_is(then):
    """A forward re-creating its activation or its list of the same blocks at each call made the calibration
    stale at once (a child of the module replaced); a parameter or buffer slot holding None at the calibration
    and filled later (a bias added), or a module without tensors added by the first forward and grown later
    (a layer appended to it), was never seen: eval kept reading statistics of other weights, in silence."""
    model = _GrowsItsParts()
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="head.0", norm="head.1", inp="head.2"))
    data = [torch.randn(32, 6) * 2 + 1 for _ in range(3)]
    nest.calibrate(data, batches=3)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCalibrationWarning)
        for _ in range(3):
            with torch.no_grad(), nest.use("h=4"):
                model(data[0])
    if then == "bias_filled":
        model.backbone[0].bias = nn.Parameter(torch.full((12,), 3.0))
    elif then == "buffer_filled":
        model.shift = torch.full((12,), 3.0)
    elif then == "stem_grown":
        model.stem.append(nn.Linear(6, 6))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad(), nest.use("h=4"):
            model(data[0])
    assert bool(_stale(record)) == (then != "nothing")
    assert sorted(stale_statistics(nest)) == ([] if then == "nothing" else ["head.1"])


class _Scale(nn.Module):
    def __init__(self, s, fn=torch.relu):
        super().__init__()
        self._s, self.fn = s, fn

    def forward(self, x):
        return self.fn(x) * self._s


@pytest.mark.parametrize("swap", ["private_setting", "function", "appended_to_a_sequential"])
def test_a_tensor_free_module_that_computes_otherwise_is_news(swap):
    """A module without tensors swapped for one of its class counts as the same only where every attribute is (a
    scale kept as self._s, a function), and a module without tensors appended to a Sequential runs: each changes
    what reaches the calibrated BatchNorm (0.61 / 0.42 off a recalibration), and was read as no news."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Sequential(_Scale(1.0)), nn.Linear(12, 8), nn.BatchNorm1d(8),
                          nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="2", norm="3", inp="4"))
    data = [torch.randn(32, 6) * 2 + 1 for _ in range(3)]
    nest.calibrate(data, batches=3)
    model.eval()
    if swap == "private_setting":
        model[1][0] = _Scale(3.0)
    elif swap == "function":
        model[1][0] = _Scale(1.0, torch.sigmoid)
    else:
        model[1].append(nn.Tanh())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad(), nest.use("h=4"):
            model(data[0])
    assert _stale(record) and sorted(stale_statistics(nest)) == ["3"]
    nest.calibrate(data, batches=3)
    model[1][0] = _Scale(model[1][0]._s, model[1][0].fn)  # (the same settings: no news)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCalibrationWarning)
        with torch.no_grad(), nest.use("h=4"):
            model(data[0])


def _calibrated_head(model):
    """``model`` (a :class:`_HeadOnly`) wrapped over its head's width, calibrated, in eval mode: (nest, data)."""
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="head.0", norm="head.1", inp="head.3"))
    data = [torch.randn(32, 6) * 2 + 1 for _ in range(3)]
    nest.calibrate(data, batches=3)
    model.eval()
    return nest, data


@pytest.mark.parametrize("then", ["read", "round_trip"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_model_converted_to_another_dtype_keeps_its_calibrations_fresh(dtype, then):
    """The fingerprints of the weights were compared in the dtype they were taken in: after ``model.double()``
    (or ``.half()``) a step that changed nothing (zero gradients) said every calibration predated training, and
    so did a round trip ``.half().float()``. The same weights in another dtype (or rounded to one) are the same
    weights; a real change after a conversion is still seen, however small against the tensor's size."""
    model = _HeadOnly()
    model.backbone[2] = nn.Linear(12, 12 * 64)  # (a larger weight: a tolerance growing with it would pass more)
    model.head[0] = nn.Linear(12 * 64, 8)
    nest, data = _calibrated_head(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCalibrationWarning)
        if then == "round_trip":
            model.to(dtype).float()
        else:
            model.to(dtype)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()  # (every version counter moves; no value does)
            with torch.no_grad(), nest.use("h=4"):
                model(data[0].to(dtype))
            model.float()
        with torch.no_grad(), nest.use("h=4"):
            model(data[0])
    assert stale_statistics(nest) == {}
    model.to(dtype)
    with torch.no_grad():
        w = model.backbone[2].weight
        w.copy_(w * (1 + 0.1 * torch.randn_like(w)))  # (10% of each value: an EMA swapped in)
    assert sorted(stale_statistics(nest)) == ["head.1"]


def test_a_counter_buffer_a_forward_moves_does_not_make_calibrations_stale():
    """Persistent buffers are watched as weights: a call counter that every eval forward moves made every
    calibration stale after one forward ('predate training'). Counters (integer buffers) are not weights."""
    model = _HeadOnly()
    model.backbone.register_buffer("calls", torch.zeros((), dtype=torch.long))
    model.backbone.register_forward_pre_hook(lambda m, args: m.calls.add_(1) and None)
    nest, data = _calibrated_head(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCalibrationWarning)
        for _ in range(3):
            with torch.no_grad(), nest.use("h=4"):
                model(data[0])
    assert stale_statistics(nest) == {} and int(model.backbone.calls) > 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 64, 3, 3), (1024, 1024), (300, 7)])
def test_the_weight_fingerprint_sees_units_reordered_in_any_dtype(dtype, shape):
    """The position-weighted sum ``u @ W @ v`` was computed in the weight's own dtype: in bfloat16 a swap of two
    rows of a (1024, 1024) weight (units reordered in place: same sum, same norm) left it unchanged and the
    calibrations of the old order were read as fresh. It is summed in float64 now."""
    torch.manual_seed(0)
    w = torch.randn(shape).to(dtype)
    held = _fingerprint(w, rounded=True)
    for axis in (0, 1):
        other = w.clone()
        i, j = 3, other.shape[axis] - 2
        index = torch.arange(other.shape[axis])
        index[i], index[j] = j, i
        other = other.index_select(axis, index)
        assert not _same(_fingerprint(other), held)
    assert _same(_fingerprint(w.clone()), held)


def test_a_deep_copy_watches_its_own_weights():
    """A deep copy of a calibrated model (an EMA) kept the calibration but watched no weight: updated through its
    parameters only (BatchNorm buffers not copied over), it read statistics of other weights as fresh (0.028
    off a recalibration). The copy's watch compares its weights with the ones the statistics were computed
    after; a copy whose weights did not move stays fresh."""
    model = _HeadOnly()
    nest, data = _calibrated_head(model)
    still, ema = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.9)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad(), nest.use("h=4"):
            still(data[0])
        assert not _stale(record)
        with torch.no_grad(), nest.use("h=4"):
            ema(data[0])
        assert len(_stale(record)) == 1
        with torch.no_grad(), nest.use("h=4"):
            model(data[0])
        assert len(_stale(record)) == 1  # (the model itself did not move)
    assert stale_statistics(nest) == {}


class _TwoNorms(nn.Module):
    """A BatchNorm with a momentum in width 'a', then a norm layer ``late`` in width 'b'."""

    def __init__(self, late):
        super().__init__()
        self.c0, self.n0, self.c1, self.n1 = nn.Conv1d(8, 16, 1), nn.BatchNorm1d(16), nn.Conv1d(16, 16, 1), late
        self.c2 = nn.Conv1d(16, 3, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.n1(self.c1(torch.relu(self.n0(self.c0(x)))))))


@pytest.mark.parametrize("norm", ["batch", "set_after_wrap", "copy_set_after", "compiled_set_after"])
def test_a_cumulative_average_norm_trained_under_a_narrower_sub_model_is_refused(norm):
    """BatchNorm(momentum=None) averages every batch with weight 1 / num_batches_tracked, one counter for all its
    channels: a narrower sub-model's training forward counted a batch its last channels never saw, so their
    running statistics drifted toward their initial values (12% off the true average after a sandwich run, eval
    logits 0.36 off), silently. Refused as the forward reaches the layer, before it runs (compiled too), also where
    momentum=None is set after wrap or on a deep copy; the full width, eval mode, check and calibration run."""
    import copy

    torch.manual_seed(0)
    m, x = _TwoNorms(nn.BatchNorm1d(16, momentum=None if norm == "batch" else 0.1)), torch.randn(8, 8, 5)
    nest = sn.wrap(m, sn.Width("a", [8, 16], out="c0", norm="n0", inp="c1"),
                   sn.Width("b", [4, 8, 16], out="c1", norm="n1", inp="c2"), example=x)
    if norm == "copy_set_after":
        m = copy.deepcopy(m)  # (an EMA / teacher copy, set so after it was made)
    if norm != "batch":
        m.n1.momentum = None
    run = torch.compile(m, backend="eager") if norm == "compiled_set_after" else m
    m.train()
    with nest.use(nest.largest):
        run(x)                                           # the full width: every channel counted
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"'n1': (BatchNorm1d|InstanceNorm1d) with momentum=None .* runs "
                                                r"in training mode with 4 of them \(b=4\).*module.momentum = 0.1"):
        with nest.use("a=16,b=4"):
            run(x)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items() if k.startswith("n1."))  # (before it)
    m.eval()
    with nest.use("a=16,b=4"), torch.no_grad():
        run(x)
    nest.check(x)
    m.train()
    m.n1.eval()  # (frozen statistics in a loop of one's own: runs, and calibrate computes them after)
    with nest.use("a=16,b=4"):
        run(x)
    if norm != "copy_set_after":
        nest.calibrate([x, x + 1], batches=2)
    m.n1.momentum = 0.1
    m.n1.train()
    with nest.use("a=16,b=4"):
        run(x)
    inst = _TwoNorms(nn.InstanceNorm1d(16, momentum=None, track_running_stats=True, affine=True))
    sn.wrap(inst, sn.Width("b", [4, 8, 16], out="c1", norm="n1", inp="c2"))
    with sn.Nest.of(inst).use("b=4"):  # (InstanceNorm takes momentum=None as 0: its statistics never move)
        inst.train()(x)


def test_a_cumulative_average_norm_the_sub_model_does_not_run_is_no_matter():
    """The refusal of a momentum=None norm under a narrower width came at the model's root for every such layer,
    also one in a block a Depth skips, which no sub-model that trains there reaches (its statistics untouched):
    a nest whose every sub-model trains right could not train. It comes at the layer, where it runs."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Conv1d(16, 16, 1), nn.BatchNorm1d(16, momentum=None if i == 2 else 0.1),
                                         nn.ReLU(), nn.Conv1d(16, 16, 1)) for i in range(3))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.blocks, self.head = nn.Conv1d(4, 16, 1), blocks, nn.Conv1d(16, 2, 1)

        def forward(self, x):
            x = self.stem(x)
            for b in self.blocks:
                x = x + b(x)
            return self.head(x)

    m, x = Net(), torch.randn(4, 4, 5)
    nest = sn.wrap(m, sn.Width("c", [8, 16], out=[f"blocks.{i}.0" for i in range(3)],
                               norm=[f"blocks.{i}.1" for i in range(3)], inp=[f"blocks.{i}.3" for i in range(3)]),
                   sn.Depth("d", [2, 3], layers="blocks"))
    m.train()
    before = m.blocks[2][1].running_mean.clone()
    with nest.use("c=8,d=2"):
        m(x).sum().backward()
    assert torch.equal(m.blocks[2][1].running_mean, before) and int(m.blocks[2][1].num_batches_tracked) == 0
    with nest.use("c=16,d=3"):
        m(x).sum().backward()
    with pytest.raises(sn.SortedNetError, match=r"'blocks.2.1': BatchNorm1d with momentum=None"):
        with nest.use("c=8,d=3"):
            m(x)


def test_the_cumulative_average_guards_leave_with_unwrap_and_unwrap_copy():
    """unwrap_copy left the guards (a sortednet object) on the plain modules it returned; unwrap and exports
    carry none."""
    import copy

    from sortednet.wrap import CumulativeAverageGuard

    torch.manual_seed(0)
    m, x = _TwoNorms(nn.BatchNorm1d(16, momentum=None)), torch.randn(8, 8, 5)
    nest = sn.wrap(m, sn.Width("b", [4, 8, 16], out="c1", norm="n1", inp="c2"))
    guards = lambda mod: [h for sub in mod.modules() for h in sub._forward_pre_hooks.values()  # noqa: E731
                          if isinstance(h, CumulativeAverageGuard)]
    assert guards(m) and not guards(nest.export("b=4"))
    plain = nest.unwrap_copy(copy.deepcopy(m))
    assert not guards(plain)
    nest.unwrap()
    assert not guards(m)
    m.train()(x)


def test_a_calibrated_depth_nest_passes_check_and_a_mode_watching_reads_sees_no_weight_of_ours(tmp_path):
    """The calibration's weight watch read every parameter's version counter inside the forward: check's test
    that a Depth's skipped blocks run no weight counted those reads as the forward's, and refused every
    calibrated (or loaded calibrated) Depth nest. The watch looks with torch functions off, and not in dry runs."""
    from torch.overrides import TorchFunctionMode

    torch.manual_seed(0)
    model, x = _PlainFirstBlock(norm_first=True), torch.randn(16, 8)
    dims = lambda: (sn.Depth("d", [1, 3], layers="blocks"),  # noqa: E731
                    sn.Width("h", [8, 16], out=[f"blocks.{i}.0" for i in range(3)],
                             norm=[f"blocks.{i}.1" for i in range(3)], inp=[f"blocks.{i}.2" for i in range(3)]))
    nest = sn.wrap(model, *dims())
    nest.check(x)
    nest.calibrate([x, x + 1], batches=2)
    nest.check(x)
    sn.save(nest, tmp_path / "c.safetensors")
    back = sn.load(sn.wrap(_PlainFirstBlock(norm_first=True), *dims()), tmp_path / "c.safetensors")
    back.check(x)

    seen = []

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.extend(id(t) for t in args if isinstance(t, torch.Tensor))
            return func(*args, **(kwargs or {}))

    model.eval()
    with torch.no_grad(), nest.use("d=1,h=16"), Reads():
        model(x)
    skipped = {id(p) for b in model.blocks[1:] for p in b.parameters()}
    assert not skipped & set(seen)

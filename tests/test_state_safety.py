"""The user's model and state stay whole: one nest per model tree, unwrap that changes nothing until it
cannot fail, copies that never get stuck on a sub-model, sorting that carries gradients and optimizer
state along, checkpoints and generator states that are checked before anything changes."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import os
import pickle
import queue
import random
import threading
import types
import warnings
import weakref
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils import weight_norm as _WEIGHT_NORM  # (bound at import, as user code does)

import sortednet as sn
from models import InterruptAt, assert_unchanged, interrupted, snapshot
from sortednet.importance import sort_units
from sortednet.plan import UseLeftElsewhereWarning
from sortednet.rng import rng_state, set_rng_state


def _two_blocks():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)),
                         nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))


def test_a_nest_inside_another_nests_model_is_refused_and_unwrap_restores_only_its_own_modules():
    m = _two_blocks()
    outer = sn.wrap(m, sn.Width("a", [4, 16], out="0.0", inp="0.2"))
    before = snapshot(m[1])
    with pytest.raises(sn.SortedNetError, match="'1' of a model another nest wraps"):
        sn.wrap(m[1], sn.Width("b", [4, 16], out="0", inp="2"))
    assert_unchanged(m[1], before)
    outer.unwrap()
    inner = sn.wrap(m[1], sn.Width("b", [4, 16], out="0", inp="2"))  # once the outer nest is gone: fine
    other = sn.wrap(m[0], sn.Width("a", [4, 16], out="0", inp="2"))  # a sibling tree: its own nest
    other.unwrap()
    assert type(m[1][0]) is not nn.Linear and type(m[0][0]) is nn.Linear  # the sibling's unwrap left it alone
    with inner.use("b=4"):
        assert m[1][0].weight.shape == (4, 8)
    inner.unwrap()


class _Shares(nn.Module):
    def __init__(self, blocks, out):
        super().__init__()
        self.blocks, self.head = blocks, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def test_a_module_another_nests_model_holds_is_refused_in_either_order():
    """Two models sharing one block list, each wrapped: the second nest's Depth over the shared list was taken
    (when the first nest sliced only its own head), and that nest's full model then silently ran one block of
    three (0.074 off), its export kept the second nest's list class and its cost counted the shallower model.
    Refused now, as the other order already was (the list then already wrapped)."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(3))
    a, b = _Shares(blocks, 4), _Shares(blocks, 2)
    x = torch.randn(3, 8)
    want = a(x).detach()
    na = sn.wrap(a, sn.Width("hw", [4, 16], out="head.0", inp="head.2"))
    before = snapshot(b)
    with pytest.raises(sn.SortedNetError, match="'blocks' of this _Shares is also 'blocks' of the model another nest"):
        sn.wrap(b, sn.Depth("d", [1, 3], layers="blocks"))
    assert_unchanged(b, before)
    assert type(blocks) is nn.ModuleList
    torch.testing.assert_close(a(x), want, atol=1e-6, rtol=1e-6)
    na.unwrap()
    nb = sn.wrap(b, sn.Depth("d", [1, 3], layers="blocks"))
    with pytest.raises(sn.SortedNetError, match="already wrapped"):
        sn.wrap(a, sn.Depth("d", [1, 3], layers="blocks"))
    nb.unwrap()


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rank_svd_unwrap_follows_the_models_dtype(dtype, merge):
    """The weight a Rank(svd) target set aside comes back in the model's current dtype (model.to after wrap)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    w = m[0].weight
    nest = sn.wrap(m, sn.Rank("r", [2, 8], targets="0", mode="svd"))
    m.to(dtype)
    with torch.no_grad():
        merged = m[0].U @ m[0].V
    nest.unwrap(merge=merge)
    assert m[0].weight is w and {p.dtype for p in m.parameters()} == {dtype}
    if merge:
        torch.testing.assert_close(m[0].weight.detach(), merged)
    m(torch.randn(2, 8, dtype=dtype))  # runs: no mixed dtypes left


def test_unwrap_computes_everything_before_it_changes_anything():
    """On the meta device merging cannot copy into the float weights set aside: nothing is half-restored."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    nest = sn.wrap(m, sn.Rank("r", [2, 8], targets=["2", "4"], mode="svd"))
    m.to("meta")
    nest.unwrap(merge=True)
    assert [type(x) for x in m] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert all(p.is_meta for p in m.parameters()) and list(m.state_dict()) == [
        f"{i}.{n}" for i in (0, 2, 4) for n in ("weight", "bias")]


@pytest.mark.parametrize("mode", ["svd", "lora"])
def test_an_interrupted_unwrap_leaves_the_model_wrapped_or_unwrapped_never_half(mode):
    """A Ctrl-C anywhere in ``unwrap(merge=True)``: before the commit nothing changed and the nest still
    works (a retry merges as if never interrupted); once the commit began it finishes (every module plain, the
    merged weights in place, the nest closed) and the interrupt is raised after. Never some modules plain and
    others sliced, adapters deleted before their delta was merged, or a retry refused with a raw KeyError."""
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"),
                       sn.Rank("r", [2, 4], targets=["2", "4"], mode=mode))
        with torch.no_grad():  # trained adapters / factors: the merge changes the weights
            for p in nest.trainable_parameters():
                p.add_(0.1 * torch.randn_like(p))
        return m, nest

    x = torch.randn(5, 8)
    ref_m, ref_nest = build()
    with torch.no_grad():
        want = ref_m(x)
    ref_nest.unwrap(merge=True)
    states = {"wrapped": 0, "unwrapped": 0}
    n = 0
    while True:
        n += 1
        m, nest = build()
        if not interrupted(n, lambda: nest.unwrap(merge=True)):  # noqa: B023
            break
        sliced = [i for i, x_ in enumerate(m) if "_sn" in x_.__dict__]
        if sliced:  # interrupted before the commit: all still sliced, and a retry merges
            assert sliced == [0, 2, 4], (n, sliced)
            states["wrapped"] += 1
            nest.unwrap(merge=True)
        else:
            states["unwrapped"] += 1
            with pytest.raises(sn.SortedNetError, match="unwrapped"):
                nest.unwrap(merge=True)
        assert [type(x_) for x_ in m] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear], n
        assert m.state_dict().keys() == ref_m.state_dict().keys(), n
        for k, v in ref_m.state_dict().items():
            torch.testing.assert_close(m.state_dict()[k], v, msg=f"{k} after an interrupt at call {n}")
        with torch.no_grad():
            torch.testing.assert_close(m(x), want)
    assert states["wrapped"] >= 1 and states["unwrapped"] >= 1, (n, states)  # (both phases were hit)


def test_a_custom_slicer_whose_restore_raises_does_not_stop_the_other_modules():
    """The commit runs every step: one module's failing restore leaves the others restored and the nest
    closed, then raises."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"), sn.Width("g", [4, 16], out="2", inp="4"))
    slicer = m[2].__dict__["_sn"].slicer
    orig, calls = slicer.restore, []

    def restore(mod, merge, pending=None):
        calls.append(mod)
        if mod is m[2]:
            raise RuntimeError("a fault in a slicer's restore")
        return orig(mod, merge, pending)

    with mock.patch.object(slicer, "restore", restore):
        with pytest.raises(RuntimeError, match="a fault in a slicer"):
            nest.unwrap()
    assert any(c is m[2] for c in calls)
    assert type(m[0]) is nn.Linear and type(m[4]) is nn.Linear  # restored after the fault, in either order
    assert "_sn" not in m[0].__dict__ and "_sn" not in m[4].__dict__
    with pytest.raises(sn.SortedNetError, match="unwrapped"):
        nest.use(nest.smallest).__enter__()


def test_a_deep_copy_runs_the_full_model_after_unwrap_and_unwrap_copy_restores_it():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ref = copy.deepcopy(m)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    ema = copy.deepcopy(m)
    nest.activate("h=4")
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert ema(x).shape == (3, 4) and ema[0].weight.shape == (4, 8)  # follows the nest
        nest.unwrap()
        torch.testing.assert_close(ema(x), ref(x))  # not stuck on h=4
    with pytest.raises(sn.SortedNetError, match="nest.unwrap"):
        nest.unwrap_copy(m)
    before = snapshot(ema)  # (wrapping the left-over copy said "call nest.unwrap() first", which Nest.of refused)
    with pytest.raises(sn.SortedNetError, match=r"of a nest that was unwrapped.*unwrap_copy\(copy\)"):
        sn.wrap(ema, sn.Width("g", [8, 16], out="0", inp="2"))
    assert_unchanged(ema, before)
    with pytest.raises(sn.SortedNetError, match=r"unwrap_copy\(copy\) gives it its original classes"):
        sn.Nest.of(ema)
    assert nest.unwrap_copy(ema) is ema and [type(x) for x in ema] == [nn.Linear, nn.ReLU, nn.Linear]
    pickle.dumps(ema)
    with pytest.raises(sn.SortedNetError, match="not a copy of this nest's model"):
        nest.unwrap_copy(nn.Linear(2, 2))


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _hook_counts(model):
    return [(path, name, len(m.__dict__.get(name, {}))) for path, m in model.named_modules() for name in _HOOK_DICTS]


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_unwrap_copy_leaves_no_hook_of_ours_on_the_copy(kind):
    """unwrap_copy left the load-time shape check on every module of the copy (a size mismatch then blamed a
    nest the model no longer has) and, on a Hugging Face model, the key/value cache guards (the copy refused
    pickling, pointing at unwrap_copy, and still policed caches). The copy's hooks are the model's before wrap."""
    torch.manual_seed(0)
    if kind == "mlp":
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        before = _hook_counts(m)
        nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    else:
        transformers = pytest.importorskip("transformers")
        cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
        m = transformers.LlamaForCausalLM(cfg).eval()
        before = _hook_counts(m)
        nest = sn.from_transformers(m, ffn=[0.5], heads=[2], depth=[1])
        with torch.no_grad():
            m(torch.randint(0, 32, (1, 5)))
    ema = copy.deepcopy(m)
    nest.unwrap()
    nest.unwrap_copy(ema)
    assert _hook_counts(ema) == before == _hook_counts(m)
    pickle.dumps(ema)


def test_unwrap_copy_leaves_the_hooks_of_modules_the_copy_shares_with_the_live_model():
    """A teacher copy sharing an unsliced head with the model: unwrap_copy(teacher) took the live model's
    load-time checks off that head: its calibration watch (a load into it no longer dropped the calibrated
    statistics) and its shape check (a refused load then half-loaded it)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4), nn.Linear(4, 3))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", norm="1", inp="2"))
    nest.calibrate([torch.randn(8, 8)])
    teacher = copy.deepcopy(m)
    teacher[3] = m[3]
    before = _hook_counts(m)
    nest.unwrap_copy(teacher)
    assert _hook_counts(m) == before
    snap = snapshot(m)
    with pytest.raises(Exception, match="size mismatch"):
        m[3].load_state_dict({"weight": torch.zeros(3, 4), "bias": torch.zeros(4)})
    assert_unchanged(m, snap)


def test_unwrap_inside_a_use_block_is_refused():
    """unwrap() inside nest.use(sub) was accepted (from this thread, or another while this one is inside it): until
    the block ended, a deep copy (an EMA or teacher) ran that sub-model's widths at full depth, the output of no
    sub-model, in silence. Refused now, unchanged."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="1.0"), sn.Depth("d", [1, 2], layers="1"))
    ema = copy.deepcopy(m)
    with nest.use("h=4,d=1"):
        with pytest.raises(sn.SortedNetError, match=r"unwrap\(\) while a nest.use\(h=4,d=1\) block is open:"):
            nest.unwrap()
        errors = []  # (another thread: its context has no block; the block is open all the same)
        t = threading.Thread(target=lambda: errors.append(pytest.raises(sn.SortedNetError, nest.unwrap)))
        t.start()
        t.join()
        assert len(errors) == 1 and "in another thread or task" in str(errors[0].value)
        assert nest._alive and ema(torch.randn(2, 8)).shape == (2, 4)

    def stream():  # (a block held across a yield, entered in a thread that has ended, left in this one)
        with nest.use("h=4,d=1"):
            yield 1
            yield 2

    g = stream()
    t = threading.Thread(target=next, args=(g,))
    t.start()
    t.join()
    with pytest.warns(UseLeftElsewhereWarning):
        list(g)
    nest.unwrap()  # (the block has ended: it held unwrap back for ever)
    assert type(m[0]) is nn.Linear


def test_a_use_object_left_in_a_third_thread_keeps_unwrap_back_while_another_is_inside():
    """One use object entered in threads A and B and left in C: C's exit dropped the block, and unwrap went
    through while B was inside (a copy ran B's widths after it). Entered in A, left in C, then a whole block in
    B: A's kept token held unwrap back for ever."""
    import queue

    def worker():
        jobs = queue.Queue()

        def loop():
            while (job := jobs.get()) is not None:
                job()

        t = threading.Thread(target=loop)
        t.start()

        def do(fn):
            done = threading.Event()
            jobs.put(lambda: (fn(), done.set()))
            done.wait()
        return do, lambda: (jobs.put(None), t.join())

    (a, stop_a), (b, stop_b), (c, stop_c) = worker(), worker(), worker()
    try:
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
        u = nest.use("h=4")
        a(u.__enter__)
        b(u.__enter__)
        with pytest.warns(UseLeftElsewhereWarning):
            c(lambda: u.__exit__(None, None, None))
        with pytest.raises(sn.SortedNetError, match="in another thread or task"):
            nest.unwrap()
        b(lambda: u.__exit__(None, None, None))
        a(lambda: u.__exit__(None, None, None))
        nest.unwrap()
        nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
        u = nest.use("h=4")
        a(u.__enter__)
        with pytest.warns(UseLeftElsewhereWarning):
            c(lambda: u.__exit__(None, None, None))
        b(lambda: (u.__enter__(), u.__exit__(None, None, None)))
        nest.unwrap()
    finally:
        stop_a(), stop_b(), stop_c()


def _trained(sort: bool, optimizer_kw: bool, optimizer: type = torch.optim.Adam):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    opt = optimizer(m.parameters(), lr=1e-2)
    for _ in range(5):
        sn.accumulate(nest, [nest.smallest, nest.largest], lambda: F.cross_entropy(m(x), y))
        opt.step()
        opt.zero_grad()
    F.cross_entropy(m(x), y).backward()  # a pending gradient, as mid-accumulation
    if sort:
        sort_units(nest, "l1", example=x, **({"optimizer": opt} if optimizer_kw else {}))
    opt.step()
    with torch.no_grad():
        return m(x)


def test_a_sort_stopped_anywhere_never_leaves_a_copy_silently_in_the_old_order():
    """A Ctrl-C anywhere in sort_units, also after the weights were permuted (while the deep copies are
    being permuted alike, or the profile's scores dropped): an EMA copy made before either runs the nest's
    sub-models exactly as the model does, or is refused at its forward; the profile's scores stay only if
    the weights did not move."""
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        nest = sn.wrap(m, sn.Width("h", [4, 8, 16], out="0", inp="2"), sn.Width("g", [4, 16], out="2", inp="4"))
        nest.profile(x, metrics=("params",), score=lambda sub: float(m(x).detach().std()), progress=False)
        return m, nest, copy.deepcopy(m)

    x = torch.randn(6, 8)
    m, nest, _ = build()
    with InterruptAt(10**9) as count, pytest.warns(UserWarning, match="no longer apply"):
        sort_units(nest, "l1", example=x)
    states = {"refused": 0, "follows": 0}
    for n in range(max(1, count.calls - 300), count.calls + 1, 5):  # (the commit and everything after it)
        m, nest, ema = build()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not interrupted(n, lambda: sort_units(nest, "l1", example=x)):  # noqa: B023
                continue
        moved = any(not torch.equal(v, m.state_dict()[k]) for k, v in before.items())
        assert (nest._profile.scores is None) == moved, n
        for sub in nest.submodels:
            with torch.no_grad(), nest.use(sub):
                want = m(x)
                try:
                    got = ema(x)
                except sn.SortedNetError as e:
                    assert moved and "re-ordered" in str(e), (n, str(e))
                    states["refused"] += 1
                    break
                torch.testing.assert_close(got, want, msg=f"{sub} of the copy after an interrupt at call {n}")
        else:
            states["follows"] += 1
    assert states["refused"] >= 1 and states["follows"] >= 1, states


def test_sort_units_carries_gradients_and_optimizer_state_with_the_units():
    """Sorting between steps is function-preserving for the whole run, not only the weights: the pending
    .grad and Adam's moments follow the permutation (passed as optimizer=)."""
    unsorted = _trained(False, False)
    torch.testing.assert_close(_trained(True, True), unsorted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_trained(True, False), unsorted, atol=1e-4)  # moments left behind: another step


def test_sort_units_undoes_the_permutation_when_anything_fails(monkeypatch):
    import sortednet.importance as imp

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    x = torch.randn(4, 8)
    before = snapshot(m)
    real, calls = imp.call_model, [0]

    def flaky(model, example):
        calls[0] += 1
        if calls[0] == 3:  # the verification forward after permuting
            raise KeyboardInterrupt
        return real(model, example)

    monkeypatch.setattr(imp, "call_model", flaky)
    with pytest.raises(KeyboardInterrupt):
        sort_units(nest, "l1", example=x)
    assert_unchanged(m, before)


def test_checkpoints_refuse_what_could_never_load(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    path = tmp_path / "n.safetensors"
    state = dict(m.state_dict())
    for bad, needle in [({**state, "0.weight": torch.zeros(3)}, "'0.weight' is \\[3\\]"),
                        ({k: v for k, v in state.items() if k != "2.bias"}, "missing keys \\['2.bias'\\]"),
                        ({**state, "x": 1}, "not tensors"), ([1, 2], "a state_dict")]:
        with pytest.raises(sn.SortedNetError, match=needle):
            sn.save(nest, path, state=bad)
        assert not os.path.exists(path)
    for bad in (None, b"n.safetensors", 3):
        with pytest.raises(sn.SortedNetError, match="path"):
            sn.save(nest, bad)
    m.to("meta")
    with pytest.raises(sn.SortedNetError, match="meta device"):
        sn.save(nest, path)


def test_a_nest_is_never_copied_or_pickled_but_its_dimensions_are():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    dim = sn.Width("h", [4, 16], out="0", inp="2")
    nest = sn.wrap(m, dim)
    for action in (lambda: copy.deepcopy(nest), lambda: pickle.dumps(nest)):
        with pytest.raises(sn.SortedNetError, match="Nest cannot be"):
            action()
    back = pickle.loads(pickle.dumps(dim))
    assert back.spec() == dim.spec() and back is not dim
    sn.wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), back)  # a fresh, unbound dimension


def test_stored_profile_numbers_beyond_any_cost_are_refused():
    from sortednet.meta import _numbers

    with pytest.raises(sn.SortedNetError, match="digits"):
        _numbers([10**400], 1, "'params' costs", "f")


def test_set_rng_state_changes_no_generator_when_a_part_is_bad():
    state = rng_state()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    now = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    for broken in ({**state, "numpy": {**state["numpy"], "keys": torch.zeros(3, dtype=torch.int64)}},
                   {**state, "python": {**state["python"], "internal": [1, 2]}}):
        with pytest.raises(sn.SortedNetError):
            set_rng_state(broken)
        assert torch.equal(torch.get_rng_state(), now[0]) and (np.random.get_state()[1] == now[1]).all()
        assert random.getstate() == now[2]


def test_lora_adapters_are_seeded_by_the_global_generator_without_advancing_it():
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        g = torch.get_rng_state()
        sn.wrap(m, sn.Rank("r", [2, 4], targets=["0", "2"], mode="lora"))
        assert torch.equal(torch.get_rng_state(), g)
        return m

    a, b = build(), build()
    assert torch.equal(a[0].lora_A, b[0].lora_A)                 # reproducible from torch.manual_seed
    assert not torch.equal(a[0].lora_A, a[2].lora_A)             # each layer its own draw
    fresh = nn.Linear(8, 2)                                      # the global stream is not replayed
    assert not torch.equal(fresh.weight, a[0].lora_A[:2])
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    sn.wrap(m, sn.Rank("r1", [2, 4], targets="0", mode="lora"), sn.Rank("r2", [2, 4], targets="2", mode="lora"))
    assert not torch.equal(m[0].lora_A, m[2].lora_A)             # another dimension, other values


def test_lora_on_the_meta_device_is_refused():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(sn.SortedNetError, match="meta device"):
        sn.wrap(m, sn.Rank("r", [2, 4], targets="0", mode="lora"))


def test_unwrap_copy_refuses_the_nests_own_modules():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    for wrong in (m[0], nn.Sequential(m)):
        with pytest.raises(sn.SortedNetError, match="nest's own model"):
            nest.unwrap_copy(wrong)
    with nest.use("h=4"):
        assert m[0].weight.shape == (4, 8)  # still sliced


def test_sort_units_carries_a_factored_optimizers_statistics():
    """Adafactor keeps row / column statistics (size 1 along the reduced axis): they follow the units."""
    factored = torch.optim.Adafactor
    torch.testing.assert_close(_trained(True, True, factored), _trained(False, False, factored), atol=1e-5, rtol=1e-5)


def test_models_with_lazy_modules_or_extra_state_are_refused_clearly(tmp_path):
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.LazyLinear(2))
    with pytest.raises(sn.SortedNetError, match="lazy"):
        sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    assert not any("_sn" in x.__dict__ for x in m.modules())

    class Stateful(nn.Linear):
        def get_extra_state(self):
            return {"calls": 3}

        def set_extra_state(self, state):
            pass

    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Stateful(16, 4))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    with pytest.raises(sn.SortedNetError, match="get_extra_state"):
        sn.save(nest, tmp_path / "n.safetensors")
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sn.save(sn.wrap(plain, sn.Width("h", [4, 16], out="0", inp="2")), tmp_path / "plain.safetensors")
    target = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Stateful(16, 4))
    before = [(type(x), [t.clone() for t in x.parameters(recurse=False)]) for x in target.modules()]
    with pytest.raises(sn.SortedNetError, match=r"sn.load: state_dict entries \['2._extra_state'\]"):
        sn.load(target, tmp_path / "plain.safetensors")  # (an AttributeError of the dict it returns before)
    after = [(type(x), list(x.parameters(recurse=False))) for x in target.modules()]
    assert [t for t, _ in after] == [t for t, _ in before]
    assert all(torch.equal(a, b) for (_, xs), (_, ys) in zip(before, after) for a, b in zip(xs, ys))


class _TensorState(nn.Module):
    """State a module keeps behind its own state_dict code: a tensor from get_extra_state, or a parameter stored
    in another form by _save_to_state_dict. sn.load copied into the temporary and lost it, in silence."""

    def __init__(self, how):
        super().__init__()
        self.how, self.scale, self.g = how, torch.tensor(1.0), nn.Parameter(torch.ones(2))

    def get_extra_state(self):
        return self.scale.clone() if self.how == "extra" else None

    def set_extra_state(self, state):
        if state is not None:
            self.scale = state.clone()

    def _save_to_state_dict(self, dest, prefix, keep_vars):
        if self.how == "log":
            dest[prefix + "log_g"] = self.g.detach().log()
        else:
            super()._save_to_state_dict(dest, prefix, keep_vars)

    def forward(self, x):
        return x * self.scale * self.g[0]


@pytest.mark.parametrize("how", ["extra", "log"])
def test_state_a_module_computes_for_its_state_dict_is_refused_by_save_and_load(tmp_path, how):
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), _TensorState(how))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    with pytest.raises(sn.SortedNetError, match="not parameters or buffers of their modules"):
        sn.save(nest, tmp_path / "n.safetensors")


# -- the model changed after wrap ----------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _mlp_nest(m):
    return sn.wrap(m, sn.Width("h1", [8, 16], out="0", inp="2"), sn.Width("h2", [4, 16], out="2", inp="4"))


def _swap(m):
    m[2], m[4] = m[4], m[2]


def _replace_with_copy(m):
    m[4] = copy.deepcopy(m[2])


def _append(m):
    m.append(nn.Linear(3, 50))


def _rekeyed(m):  # children re-keyed directly (insert is refused before it lands): sliced modules at other paths
    m._modules = collections.OrderedDict((str(i), c) for i, c in enumerate([nn.Identity(), *m._modules.values()]))


def _new_head(m):
    m[4] = nn.Linear(16, 3)


def _bypassing_hooks(m):  # a private write no registration hook sees: the nest's own checks catch it
    m._modules["4"] = nn.Linear(16, 3)


def _shadowing(m):  # an instance attribute of a child's name: the forward would read it instead of the child
    object.__setattr__(m, "4", nn.Linear(16, 3))


@pytest.mark.parametrize("change", [_append, _rekeyed, _bypassing_hooks, _shadowing])
def test_cost_pick_export_save_and_load_refuse_a_model_changed_after_wrap(change, tmp_path):
    m = _mlp()
    nest = _mlp_nest(m)
    sn.save(nest, tmp_path / "before.safetensors")
    change(m)
    x = torch.randn(2, 4)
    for what, call in [("cost", lambda: nest.cost("h1=8,h2=4")), ("pick", lambda: nest.pick(params=200)),
                       ("export", lambda: nest.export("h1=8,h2=4")),
                       ("save", lambda: sn.save(nest, tmp_path / "after.safetensors")),
                       ("load", lambda: sn.load(nest, tmp_path / "before.safetensors")),
                       ("check", lambda: nest.check(x)),
                       ("flops", lambda: nest.cost(nest.smallest, "flops", example=x))]:
        with pytest.raises(sn.SortedNetError, match="changed after wrap"):
            call()
            pytest.fail(f"{what} accepted a changed model")
    assert not (tmp_path / "after.safetensors").exists()
    nest.unwrap()
    if change in (_append, _bypassing_hooks):
        _mlp_nest(m).export("h1=8,h2=4")   # wrapped again: the new model is served


class _Blocks(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def _blocks_nest(m):
    return sn.wrap(m, sn.Width("ffn", [4, 16], out="blocks.*.0", inp="blocks.*.2"),
                   sn.Depth("depth", [1, 2, 3], layers="blocks"))


def _swap_blocks(blocks):
    blocks[0], blocks[1] = blocks[1], blocks[0]


_TREE_CHANGES = {  # what a user may do to the module tree after wrap; each would run another model silently
    "replace a sliced module": lambda m: m.blocks[0].__setitem__(0, nn.Linear(8, 16)),
    "replace a block": lambda m: m.blocks.__setitem__(1, copy.deepcopy(m.blocks[1])),
    "swap two blocks": lambda m: _swap_blocks(m.blocks),
    "replace the layer list": lambda m: setattr(m, "blocks", nn.ModuleList(list(m.blocks))),
    "set a sliced module to None": lambda m: setattr(m.blocks[1], "2", None),
    "append a block": lambda m: m.blocks.append(nn.Sequential(nn.Linear(8, 8))),
    "extend the blocks": lambda m: m.blocks.extend([nn.Identity()]),
    "insert a block": lambda m: m.blocks.insert(0, nn.Identity()),
    "delete the last block": lambda m: m.blocks.__delitem__(-1),
    "pop a block": lambda m: m.blocks.pop(0),
    "add_module into the blocks": lambda m: m.blocks.add_module("extra", nn.Identity()),
    "delattr a block": lambda m: delattr(m.blocks, "1"),
    "delete a sliced module": lambda m: delattr(m.blocks[1], "2"),  # (del fires no registration hook: it landed,
    "delete the layer list": lambda m: delattr(m, "blocks"),         # and only cost / export refused later)
}


@pytest.mark.parametrize("inside", ["outside", "use", "activate"])
@pytest.mark.parametrize("change", _TREE_CHANGES)
def test_changing_the_wrapped_module_tree_is_refused_before_it_lands(change, inside):
    """A module replaced on the path to a sliced module would run unsliced under every sub-model; a block added
    to a Depth layer list would be skipped (outside use) or, under a shallower depth, overwrite a trained block
    (``append`` names it ``str(len(self))``). Refused at the assignment, the model unchanged, in or out of use."""
    m = _Blocks()
    nest = _blocks_nest(m)
    x = torch.randn(5, 8)
    before = snapshot(m)
    tree = [(n, mod) for n, mod in m.named_modules()]
    with contextlib.ExitStack() as stack:
        if inside == "use":
            stack.enter_context(nest.use("ffn=4,depth=2"))   # append would name its block '2': the third
        elif inside == "activate":
            nest.activate("ffn=4,depth=2")
        with pytest.raises(sn.SortedNetError, match="(?s)refused while the model is wrapped.*nest.unwrap()"):
            _TREE_CHANGES[change](m)
    nest.activate(nest.largest)
    assert [(n, mod) for n, mod in m.named_modules()] == tree
    assert_unchanged(m, before)
    for sub in ("ffn=4,depth=1", "ffn=16,depth=2", "ffn=4,depth=3"):
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(m(x), nest.export(sub)(x))
    nest.unwrap()
    _TREE_CHANGES[change](m)   # unwrapped: the model is the user's again
    assert [(n, mod) for n, mod in m.named_modules()] != tree


_SHIFTS = {  # torch's insert / pop / del write the container's _modules directly: no registration hook sees them
    "insert a block": lambda m: m.blocks.insert(0, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))),
    "pop a block": lambda m: m.blocks.pop(0),
    "delete a block": lambda m: m.blocks.__delitem__(1),
    "pop the last layer of a block": lambda m: m.blocks[1].pop(2),
    "insert into a block": lambda m: m.blocks[0].insert(0, nn.Identity()),
    "delete the activation of a block": lambda m: m.blocks[0].__delitem__(1),   # renumbers the sliced '2'
    "insert before the last layer": lambda m: m.blocks[0].insert(-1, nn.Identity()),
}


@pytest.mark.parametrize("change", _SHIFTS)
def test_modules_inserted_or_removed_on_the_path_are_refused_before_they_land(change):
    """Without Depth, ``blocks`` is a plain ModuleList on the path to the sliced layers: an inserted block would
    sit at a wrapped path and run unsliced (silently, under every sub-model), a module removed before a sliced
    one renumbers it. torch's insert / pop / del re-key the container's children directly (no registration hook):
    sortednet's guard of them refuses before anything changes."""
    m = _Blocks()
    sn.wrap(m, sn.Width("ffn", [4, 16], out="blocks.*.0", inp="blocks.*.2"))
    before, tree = snapshot(m), list(m.named_modules())
    with pytest.raises(sn.SortedNetError, match="(?s)(deleting 'blocks[.0-9]*'|(deleting '[0-9]+'|inserting a module "
                                                "at position [0-9]+) of 'blocks.*re-keys 'blocks.*) is refused while "
                                                "the model is wrapped"):
        _SHIFTS[change](m)
    assert list(m.named_modules()) == tree
    assert_unchanged(m, before)
    m(torch.randn(5, 8))


def _flat(named=False, cls=nn.Sequential):
    mods = [nn.Tanh(), nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8), nn.Tanh()]
    keys = ["pre", "fc1", "act", "fc2", "post"] if named else [str(i) for i in range(5)]
    m = nn.Sequential(collections.OrderedDict(zip(keys, mods))) if cls is nn.Sequential else cls(mods)
    sn.wrap(m, sn.Width("h", [8, 32], out=keys[1], inp=keys[3]))
    return m


_REKEYING = {  # (model, change): deletes and inserts that re-key a sliced child through other spellings
    "delete at a numpy index": (lambda: _flat(), lambda m: m.__delitem__(np.int64(0))),
    "delete at a tensor index": (lambda: _flat(), lambda m: m.__delitem__(torch.tensor(0))),
    "insert at a numpy index": (lambda: _flat(), lambda m: m.insert(np.int64(0), nn.ReLU())),
    "delete a slice of negative step": (lambda: _flat(), lambda m: m.__delitem__(slice(None, None, -4))),
    "delete after the sliced children of a named Sequential": (lambda: _flat(named=True),
                                                               lambda m: m.__delitem__(-1)),
    "insert at -1 into a ModuleList": (lambda: _flat(cls=nn.ModuleList), lambda m: m.insert(-1, nn.ReLU())),
}


@pytest.mark.parametrize("change", _REKEYING)
def test_every_spelling_of_a_rekeying_delete_or_insert_is_refused_before_it_lands(change):
    """numpy / tensor indices, slices of negative step (checked from the first key deleted, not the lowest), a
    delete from a Sequential of named children (torch re-keys every child 0..n-1, so the sliced 'fc1' becomes
    '1'), and ModuleList.insert(-1) (torch shifts every child, then fails on key '-1') all re-keyed sliced
    children before the refusal at the next forward; refused before anything changes now."""
    make, act = _REKEYING[change]
    m = make()
    before, keys = snapshot(m), list(m._modules)
    with pytest.raises(sn.SortedNetError, match="re-keys .* another path.*refused while the model is wrapped"):
        act(m)
    assert list(m._modules) == keys
    assert_unchanged(m, before)


def test_a_slice_deleted_from_a_deep_copy_is_refused_before_its_first_child_goes():
    """torch deletes a slice child by child: in a deep copy (EMA / teacher) of a wrapped model, whose lists the
    nest does not guard by identity, every key must still be asked first (for a moment only guarded lists were:
    the copy lost its first child, then refused)."""
    m = nn.Module()
    m.blocks = nn.ModuleList([nn.Identity()] + [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
                                                for _ in range(2)])
    m.forward = lambda x: x
    sn.wrap(m, sn.Width("ffn", [4, 16], out="blocks.*.0", inp="blocks.*.2"))
    ema = copy.deepcopy(m)
    with pytest.raises(sn.SortedNetError, match="of a copy of a wrapped model"):
        del ema.blocks[0:2]
    assert list(ema.blocks._modules) == ["0", "1", "2"]


def test_a_child_dropped_without_any_hook_is_refused_by_name():
    """setattr of a Parameter under a child's name drops the child from ``_modules`` (no hook sees it): the next
    forward refuses with a SortedNetError (a moment's regression raised a raw AttributeError)."""
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 4))
    sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2.0"))
    setattr(m, "2", nn.Parameter(torch.zeros(1)))
    with pytest.raises(sn.SortedNetError, match="holds 3 modules, 4 when wrapped"):
        m(torch.randn(2, 8))


def test_deletes_and_inserts_after_the_sliced_children_of_a_numbered_list_are_accepted():
    m = _flat()
    del m[np.int64(4)]
    m.insert(4, nn.Identity())
    m.insert(-1, nn.Identity())   # (Sequential counts from the end: position 4, after 'fc2' at 3)
    assert list(m._modules) == ["0", "1", "2", "3", "4", "5"]
    m(torch.randn(2, 8))


def test_children_rekeyed_behind_the_guards_are_refused_at_the_next_forward():
    """A container's ``_modules`` rewritten directly (no hook, no guarded method): the sliced modules moved to other
    paths and an inserted block would run unsliced. The next forward refuses."""
    m = _Blocks()
    nest = sn.wrap(m, sn.Width("ffn", [4, 16], out="blocks.*.0", inp="blocks.*.2"))
    x = torch.randn(5, 8)
    blocks = list(m.blocks._modules.values())
    m.blocks._modules = collections.OrderedDict((str(i), b) for i, b in enumerate([nn.Identity(), *blocks]))
    for ctx in (nest.use("ffn=4"), contextlib.nullcontext()):
        with ctx, pytest.raises(sn.SortedNetError, match="when wrapped: a module was inserted or removed"):
            m(x)
    with pytest.raises(sn.SortedNetError, match="changed after wrap"):
        nest.export("ffn=4")
    nest.unwrap()
    assert not any("_sn" in mod.__dict__ for mod in m.modules())   # the user's (changed) model again


class _Head(nn.Module):
    """A body and a ModuleDict of heads applied in order, both on the paths to sliced modules."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.post = nn.ModuleDict({"cls": nn.Linear(4, 3)})

    def forward(self, x):
        y = self.body(x)
        for mod in self.post.values():
            y = mod(y)
        return y


@pytest.mark.parametrize("change", ["append to a block", "append a block", "new key", "delete a new key"])
def test_modules_added_at_the_end_or_under_new_keys_move_nothing_and_are_accepted(change):
    """A module appended to a list on the path to sliced modules, or put in a ModuleDict under a new key (or such
    a key deleted again), moves no sliced module: accepted, and the forwards run it (as anywhere else in the
    model); the cost tables count the new forward (FLOPs of the export, which holds it too)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(5, 8)
    if change.startswith("append"):
        m = _Blocks()
        nest = sn.wrap(m, sn.Width("ffn", [4, 16], out="blocks.*.0", inp="blocks.*.2"))
        if change == "append to a block":
            m.blocks[0].append(nn.Tanh())
        else:
            m.blocks.append(nn.Sequential(nn.Tanh()))
    else:
        m = _Head()
        nest = sn.wrap(m, sn.Width("h", [4, 16], out="body.0", inp="body.2"),
                       sn.Width("o", [2, 4], out="body.2", inp="post.cls"))
        m.post["act"] = nn.Tanh()
        if change == "delete a new key":
            del m.post["act"]
    for sub in (nest.smallest, nest.largest):
        with nest.use(sub), torch.no_grad():
            live = m(x)
        exported = nest.export(sub)
        with FlopCounterMode(display=False) as counter:
            want = exported(x)
        torch.testing.assert_close(live, want)
        assert nest.cost(sub, "flops", example=x) == counter.get_total_flops()
    names = [n for n, _ in exported.named_modules()]
    assert ("blocks.3" in names or "blocks.0.3" in names) if change.startswith("append") else \
        ("post.act" in names) == (change == "new key")


def test_a_deep_copy_follows_the_nest_and_refuses_block_changes_alike():
    m = _Blocks()
    nest = _blocks_nest(m)
    ema = copy.deepcopy(m)   # an EMA / teacher copy: it runs the nest's sub-models too
    for change in ("append a block", "replace a block", "insert a block", "pop a block"):
        with pytest.raises(sn.SortedNetError, match=r"(?s)Depth layer list 'blocks'.*nest.unwrap_copy\(copy\)"):
            _TREE_CHANGES[change](ema)
    # the copy's links to its sliced modules: accepted, a replaced module ran unsliced under every sub-model
    before, tree = snapshot(ema), list(ema.named_modules())
    for change in ("replace a sliced module", "set a sliced module to None", "replace the layer list"):
        with pytest.raises(sn.SortedNetError, match=r"(?s)of a copy of a wrapped model.*nest.unwrap_copy\(copy\)"):
            _TREE_CHANGES[change](ema)
    assert list(ema.named_modules()) == tree
    assert_unchanged(ema, before)
    ema.blocks[0][0] = ema.blocks[0][0]  # (the same module again, and a re-made block around the same ones)
    ema.blocks[0].extra = nn.Identity()
    holder = nn.Module()  # modules that hold a whole model or copy, or a part, may change what they hold
    holder.student, holder.ema, holder.part = m, copy.deepcopy(m), copy.deepcopy(m.blocks[0][0])
    holder.ema = copy.deepcopy(holder.student)
    holder.student, holder.ema, holder.part = nn.Identity(), None, nn.Identity()
    student = nn.ModuleList([copy.deepcopy(m.blocks[0])])  # assembled from copied parts, at the same names
    student[0] = nn.Identity()
    half = nn.Sequential(copy.deepcopy(m.blocks[0][0]))
    half[0] = nn.Identity()
    outer = nn.Sequential(m, nn.Linear(8, 2))
    outer[1], outer[0] = nn.Linear(8, 3), nn.Identity()
    x = torch.randn(3, 8)
    with torch.no_grad(), nest.use("ffn=4,depth=2"):
        torch.testing.assert_close(ema(x), m(x))
    assert len(ema.blocks._modules) == 3
    nest.unwrap_copy(ema)
    ema.blocks.append(nn.Identity())
    teacher = copy.deepcopy(m)          # a copy still wrapped after the nest is unwrapped: the user's model is
    nest.unwrap()                       # free again, and the copy does not check it
    m.blocks.insert(0, nn.Identity())
    teacher(torch.randn(2, 8))


def test_nest_of_finds_the_nest_of_a_model_and_of_its_copies():
    """A model whose nest variable was dropped kept running the nest's sub-model, and wrapping it again said
    'call nest.unwrap() first' with no way to get the nest back."""
    m = _Blocks()
    nest = _blocks_nest(m)
    ema = copy.deepcopy(m)
    assert sn.Nest.of(m) is nest and sn.Nest.of(ema) is nest and sn.Nest.of(m.blocks[0]) is nest
    with pytest.raises(sn.SortedNetError, match=r"sn.Nest.of\(model\) gives the nest"):
        sn.wrap(ema, sn.Width("ffn", [4, 16], out="blocks.*.0", inp="blocks.*.2"))
    with pytest.raises(sn.SortedNetError, match="no nest slices this Linear"):
        sn.Nest.of(nn.Linear(2, 2))
    with pytest.raises(sn.SortedNetError, match="2 nests slice modules of this ModuleList"):
        sn.Nest.of(nn.ModuleList([m, _blocks_nest(_Blocks()).model]))
    other = _Blocks()
    other_nest = _blocks_nest(other)
    other.teacher = copy.deepcopy(m)  # a model holding a copy of another nest's model: its own nest
    assert sn.Nest.of(other) is other_nest
    kept = copy.deepcopy(m)
    sn.Nest.of(m).unwrap_copy(ema)
    sn.Nest.of(m).unwrap()
    kept.blocks[0][0] = nn.Linear(8, 16)  # a copy of an unwrapped nest runs the full model: free to change
    width = sn.Width("ffn", [8, 16], out="blocks.*.0", inp="blocks.*.2")
    n2 = sn.wrap(m, width)
    stale = copy.deepcopy(m)
    n2.unwrap()
    sn.wrap(m, width)  # the same dimension object in a new nest: the old copy still runs the full model
    stale.blocks[0][0] = nn.Linear(8, 16)
    with pytest.raises(sn.SortedNetError, match="Nest.of"):
        sn.Nest.of("m")


def test_putting_back_the_same_module_and_changing_parts_outside_the_nest_are_fine():
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3), nn.Softmax(-1))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
    m[0] = m[0]                    # the same module again: nothing changes
    m[3] = nn.LogSoftmax(-1)       # not on a path to a sliced module: the sub-models stay what they were
    m[1].extra = nn.Identity()     # a child added below an unsliced module
    x = torch.randn(2, 4)
    with nest.use("h=8"):
        live = m(x)
    torch.testing.assert_close(live, nest.export("h=8")(x))
    assert live.exp().sum(-1).sub(1).abs().max() < 1e-5


def test_weights_tied_after_wrap_are_refused_where_the_counts_would_be_wrong():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)

        def forward(self, i):
            return self.head(self.emb(i))

    lm = LM()
    nest = sn.wrap(lm, sn.Width("d", [4, 8], out="emb", inp="head"))
    assert nest.cost("d=4") == 80
    lm.head.weight = lm.emb.weight   # tied after wrap: export would hold 40
    with pytest.raises(sn.SortedNetError, match="tied or untied"):
        nest.cost("d=4")


def test_replacing_a_parameter_by_one_of_the_same_shape_is_fine():
    m = _mlp()
    nest = _mlp_nest(m)
    m[2].weight = nn.Parameter(torch.ones(16, 16))      # as load_state_dict(assign=True) does
    m.load_state_dict(_mlp().state_dict(), assign=True)
    small = nest.export("h1=8,h2=4")
    assert sum(p.numel() for p in small.parameters()) == nest.cost("h1=8,h2=4")
    x = torch.randn(3, 4)
    with nest.use("h1=8,h2=4"):
        torch.testing.assert_close(m(x), small(x))


class _Symmetric(nn.Module):
    """A parametrization whose ``right_inverse`` PyTorch writes into the weight before deleting it."""

    def forward(self, x):
        return x.triu() + x.triu(1).transpose(-1, -2)

    def right_inverse(self, a):
        return a.triu()


@pytest.mark.parametrize("inside", [None, "h1=8,h2=4"], ids=["full", "inside_use"])
@pytest.mark.parametrize("how", ["parametrize", "right_inverse", "right_inverse_imported", "orthogonal",
                                 "weight_norm", "spectral_norm", "prune", "bias", "set_none", "bias_none"])
def test_reparametrizing_a_sliced_weight_is_refused_before_anything_changes(how, inside):
    from torch.nn.utils.parametrize import register_parametrization  # bound after sortednet's import

    m = _mlp()
    nest = _mlp_nest(m)
    x = torch.randn(3, 4)
    with torch.no_grad():
        ref = m(x)
    before = snapshot(m)
    reg = torch.nn.utils.parametrize.register_parametrization
    apply = {"parametrize": lambda: reg(m[2], "weight", nn.Identity()),
             "right_inverse": lambda: reg(m[2], "weight", _Symmetric()),
             "right_inverse_imported": lambda: register_parametrization(m[2], "weight", _Symmetric()),
             "orthogonal": lambda: torch.nn.utils.parametrizations.orthogonal(m[2]),  # writes Q of the weight
             "weight_norm": lambda: torch.nn.utils.parametrizations.weight_norm(m[2]),
             "spectral_norm": lambda: torch.nn.utils.parametrizations.spectral_norm(m[2]),
             "prune": lambda: prune.l1_unstructured(m[2], "weight", amount=0.5),
             "set_none": lambda: setattr(m[2], "weight", None),
             "bias_none": lambda: setattr(m[2], "bias", None),
             "bias": lambda: reg(m[2], "bias", nn.Identity())}[how]
    name = "bias" if how in ("bias", "bias_none") else "weight"
    with pytest.raises(sn.SortedNetError, match=f"2.{name} is (sliced by sortednet|read through sortednet)"):
        with nest.use(inside) if inside else contextlib.nullcontext():
            apply()
    assert_unchanged(m, before)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)
    nest.unwrap()
    apply()   # the plain model: as PyTorch does


def test_global_pruning_that_reaches_a_sliced_weight_prunes_nothing():
    """``prune.global_unstructured`` prunes its tensors one after another: the refusal at the sliced weight came
    after the unsliced layer listed before it was pruned (a model left half-pruned, its outputs changed)."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
    x = torch.randn(3, 4)
    with torch.no_grad():
        ref = m(x)
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"0\.weight is sliced by sortednet"):
        prune.global_unstructured([(m[4], "weight"), (m[0], "weight")], pruning_method=prune.L1Unstructured,
                                  amount=0.5)
    assert_unchanged(m, before)
    assert not m[4]._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)
    nest.unwrap()
    prune.global_unstructured(iter([(m[4], "weight"), (m[0], "weight")]), pruning_method=prune.L1Unstructured,
                              amount=0.5)  # the plain model, an iterator: as PyTorch does
    assert hasattr(m[0], "weight_mask") and hasattr(m[4], "weight_mask")


def test_a_sliced_parameter_replaced_by_another_shape_is_refused_before_anything_changes():
    m = _mlp()
    nest = _mlp_nest(m)
    before = snapshot(m)
    w = m[2]._parameters["weight"]
    with pytest.raises(sn.SortedNetError, match=r"2.weight is sliced by sortednet: it cannot be replaced"):
        m[2].weight = nn.Parameter(torch.randn(w.shape[0], w.shape[1] + 1))
    assert_unchanged(m, before)
    m[2].weight = nn.Parameter(torch.zeros_like(w))  # the same shape: as load_state_dict(assign=True) does
    with nest.use(nest.smallest):
        assert not m[2].weight.any()
    nest.unwrap()
    m[2].weight = nn.Parameter(torch.randn(w.shape[0], w.shape[1] + 1))  # the plain model: as PyTorch does


_WRITES = {
    "tensor": lambda m: setattr(m, "weight", torch.zeros(32, 16)),
    "parameter": lambda m: setattr(m, "weight", nn.Parameter(torch.zeros(32, 16))),
    "buffer": lambda m: m.register_buffer("weight", torch.zeros(32, 16)),
    "del_weight": lambda m: delattr(m, "weight"),
    "in_features": lambda m: setattr(m, "in_features", 3),
    "del_in_features": lambda m: delattr(m, "in_features"),
}


@pytest.mark.parametrize("mode", ["svd", "lora"])
@pytest.mark.parametrize("write", sorted(_WRITES))
def test_writes_to_a_sliced_attribute_are_refused_and_leave_nothing_behind(write, mode):
    """An svd ``Rank`` layer's ``weight`` is computed (``U @ V``), not a parameter: ``layer.weight = tensor`` went
    into the instance ``__dict__``, had no effect while wrapped and, after ``unwrap``, shadowed the restored
    parameter (the model computed with zeros while its state_dict showed the weight); a Parameter raised a bare
    KeyError. Writes to sliced plain attributes (``in_features``) were ignored while wrapped and came back at
    unwrap. All are refused, naming the attribute; the model computes as before, also after unwrap."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(3, 16)
    nest = sn.wrap(m, sn.Rank("r", [2, 8], targets="0", mode=mode))
    def run(sub):
        with torch.no_grad(), nest.use(sub):
            return m(x)

    outs = {s: run(s) for s in nest.submodels}
    before = snapshot(m)
    if mode == "lora" and write in ("tensor", "parameter"):  # a real (frozen) parameter there: PyTorch's own
        if write == "tensor":                                  # refusal, and a same-shape replacement is allowed
            with pytest.raises(TypeError, match="cannot assign"):
                _WRITES[write](m[0])
            assert_unchanged(m, before)
        return
    with pytest.raises(sn.SortedNetError, match=r"0\.(weight|in_features) is sliced by sortednet"):
        _WRITES[write](m[0])
    assert_unchanged(m, before)
    assert "weight" not in m[0].__dict__ and m[0].__dict__["in_features"] == 16
    for s, o in outs.items():  # (same process: a 1e-6 tolerance, not bit-exact)
        torch.testing.assert_close(run(s), o, atol=1e-6, rtol=0)
    m[0].in_features = 16  # writing the value it has changes nothing (transformers' tie_weights does it)
    m[0].in_features = np.int64(16)  # (by value)
    with nest.use(nest.smallest):
        m[0].in_features = m[0].in_features  # the value it reads under the active sub-model
    assert type(m[0].__dict__["in_features"]) is int
    full = run(nest.largest)
    nest.unwrap(merge=True)  # the largest sub-model baked in
    torch.testing.assert_close(m(x), full, atol=1e-5, rtol=1e-5)
    assert type(m[0].weight) is nn.Parameter


@pytest.mark.parametrize("name, value", [("max_norm", 1.0), ("sparse", True)])
def test_an_embedding_setting_that_wrap_refuses_cannot_be_set_after_wrap(name, value):
    """``wrap`` refuses a sliced Embedding with ``max_norm`` (its lookups renormalise rows of the shared weight in
    place) or ``sparse``; set after wrap, ``max_norm`` went through: one lookup under a narrower sub-model
    rescaled its columns of the shared rows for every other sub-model (a row norm 6.55 -> 5.17). Refused, naming
    the attribute; the weight is unchanged, and after unwrap the setting is the module's own again."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2))
    with torch.no_grad():
        m[0].weight.mul_(3)
    nest = sn.wrap(m, sn.Width("c", [4, 8], out="0", inp="1"))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=rf"0\.{name} is sliced by sortednet"):
        setattr(m[0], name, value)
    m[0].max_norm, m[0].sparse = None, False  # the values it has: nothing changes
    assert_unchanged(m, before)
    with nest.use("c=4"):
        m(torch.tensor([1, 2])).sum().backward()
    assert m[0].weight.grad.layout is torch.strided
    assert_unchanged(m, before)  # (no row renormalised)
    nest.unwrap()
    setattr(m[0], name, value)
    assert getattr(m[0], name) == value


@pytest.mark.parametrize("name", ["num_heads", "head_dim", "embed_dim"])
def test_an_attention_size_cannot_be_set_after_wrap(name):
    """``head_dim`` of a wrapped MultiheadAttention was writable (``num_heads`` / ``embed_dim`` refused): the full
    model ran on (PyTorch's forward derives it), every smaller sub-model and even the full export then failed with
    a raw reshape error. Refused as the others, the module unchanged; after unwrap the module's own again."""
    torch.manual_seed(0)
    m = nn.MultiheadAttention(16, 4, batch_first=True)
    nest = sn.wrap(m, sn.Heads("h", [2, 4], attn=""))
    x = torch.randn(2, 5, 16)
    old = getattr(m, name)
    with pytest.raises(sn.SortedNetError, match=rf"{name} is sliced by sortednet"):
        setattr(m, name, 2 * old)
    setattr(m, name, old)  # the value it has: nothing changes
    with torch.no_grad(), nest.use("h=2"):
        torch.testing.assert_close(m(x, x, x)[0], nest.export("h=2")(x, x, x)[0], atol=1e-6, rtol=1e-6)
    assert m.head_dim == 4 and nest.export("h=4").head_dim == 4
    nest.unwrap()
    setattr(m, name, 2 * old)
    assert getattr(m, name) == 2 * old


def test_data_parallel_replication_is_refused_by_name():
    """``torch.nn.DataParallel`` over several devices copies each module (``_replicate_for_data_parallel``) and
    sets the broadcast parameters on the copies as plain attributes; its replicas then run in worker threads,
    which do not see the caller's active sub-model. The replication step (reproduced here: ``replicate`` itself
    needs several GPUs) is refused naming DataParallel, not as an unexplained write; the model is unchanged."""
    torch.manual_seed(0)
    m = _mlp()
    _mlp_nest(m)
    before = snapshot(m)
    replica = m[2]._replicate_for_data_parallel()
    with pytest.raises(sn.SortedNetError, match=r"2\.weight: torch\.nn\.DataParallel is not supported"):
        replica.weight = m[2]._parameters["weight"].detach() * 1
    assert_unchanged(m, before)
    with pytest.raises(sn.SortedNetError, match=r"2\.in_features is sliced by sortednet"):  # (not a replica)
        m[2].in_features = 3
    assert_unchanged(m, before)


@pytest.mark.parametrize("how", ["setattr", "register_buffer", "parametrize"])
def test_a_sliced_buffer_replaced_by_another_shape_is_refused_before_anything_changes(how):
    """BatchNorm running statistics are sliced like its weight: another shape would make every forward fail
    with a raw error and ``sn.save`` write a checkpoint ``sn.load`` refuses."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    nest = sn.wrap(m, sn.Width("c", [8, 16], out="0", norm="1", inp="3"))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = m(x)
    before = snapshot(m)
    apply = {"setattr": lambda: setattr(m[1], "running_mean", torch.zeros(4)),
             "register_buffer": lambda: m[1].register_buffer("running_var", torch.ones(4)),
             "parametrize": lambda: torch.nn.utils.parametrize.register_parametrization(
                 m[1], "running_mean", nn.Identity())}[how]
    with pytest.raises(sn.SortedNetError, match=r"1.running_(mean|var) is (sliced by sortednet|sliced)"):
        apply()
    assert_unchanged(m, before)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)
    m[1].running_mean = torch.full((16,), 0.5)   # the same shape (load_state_dict(assign=True)): fine
    with torch.no_grad(), nest.use("c=8"):
        torch.testing.assert_close(m(x), nest.export("c=8")(x), rtol=0, atol=1e-6)
    m[1]._buffers["running_var"] = torch.ones(4)   # behind every guard: export / save / cost name it
    for what in (lambda: nest.export("c=8"), lambda: nest.cost("c=8"), lambda: sn.save(nest, os.devnull)):
        with pytest.raises(sn.SortedNetError, match=r"sliced buffers re-shaped: \['1.running_var \(16,\) -> \(4,\)"):
            what()
    m[1]._buffers["running_var"] = torch.ones(16)
    assert nest.cost("c=8") == sum(p.numel() for p in nest.export("c=8").parameters())
    nest.unwrap()
    apply()   # the plain model: as PyTorch does


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_a_weight_removed_behind_the_guard_is_named_at_the_next_read():
    m = _mlp()
    nest = _mlp_nest(m)
    w = m[2]._parameters.pop("weight")  # a private write no hook sees
    with pytest.raises(sn.SortedNetError, match="2.weight: the tensor sortednet slices is no longer"):
        m(torch.randn(2, 4))
    m[2]._parameters["weight"] = w
    nest.unwrap()
    assert m(torch.randn(2, 4)).shape == (2, 3)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("how", ["function", "class", "bound_before"])
def test_the_deprecated_weight_norm_is_refused_before_anything_changes(how):
    """``torch.nn.utils.weight_norm`` deletes ``_parameters["weight"]`` directly, registers ``weight_g`` /
    ``weight_v`` and then sets ``weight``: refused before its first step (``WeightNorm.apply``, however the
    function was imported), the module left whole; after unwrap it applies as in plain PyTorch."""
    from torch.nn.utils.weight_norm import WeightNorm

    m = _mlp()
    nest = _mlp_nest(m)
    before = snapshot(m)
    apply = {"function": lambda: torch.nn.utils.weight_norm(m[2]), "class": lambda: WeightNorm.apply(m[2], "weight", 0),
             "bound_before": lambda: _WEIGHT_NORM(m[2])}[how]
    with pytest.raises(sn.SortedNetError, match=r"2\.weight is sliced by sortednet and cannot be removed"):
        apply()
    assert_unchanged(m, before)
    assert not m[2]._forward_pre_hooks and set(m[2]._parameters) == {"weight", "bias"}
    nest.unwrap()
    torch.nn.utils.weight_norm(m[2])
    assert m(torch.randn(2, 4)).shape == (2, 3)


def test_load_state_dict_drops_the_calibrated_statistics_it_makes_stale():
    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 2))

    m, other = cnn(), cnn()
    with torch.no_grad():
        other[1].running_mean.normal_()
        other[1].running_var.uniform_(0.5, 2)
    nest = sn.wrap(m, sn.Width("c", [4, 8], out="0", norm="1", inp="5"))
    x = torch.randn(4, 3, 8, 8)
    nest.calibrate([x] * 2)
    m.eval()
    other.eval()
    m.load_state_dict(other.state_dict())
    torch.testing.assert_close(m(x), other(x))                 # the loaded buffers, not the calibration
    torch.testing.assert_close(nest.export(nest.largest)(x), other(x))
    nest.calibrate([x] * 2)                                     # calibrating again works as before
    assert m[1]._sn.norm is not None


@pytest.mark.parametrize("strict", [True, False])
def test_a_refused_load_state_dict_keeps_the_calibration(strict):
    """``load_state_dict`` of statistics of another shape (an exported sub-model's state) raises in PyTorch
    and copies no statistics: the calibration stays, and every sub-model's eval output with it (it was
    dropped before the shape check, moving the small sub-model's output by 0.29)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)).eval()
    nest = sn.wrap(m, sn.Width("h", [4, 8, 16], out="0", norm="1", inp="3"))
    nest.calibrate([torch.randn(32, 8) * 3 + 1 for _ in range(2)])
    x = torch.randn(5, 8)
    before = {}
    for sub in ("h=4", "h=8", "h=16"):
        with nest.use(sub), torch.no_grad():
            before[sub] = m(x)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    small = nest.export("h=4").state_dict()
    with nest.use("h=4"), pytest.raises(RuntimeError, match="size mismatch"):
        m.load_state_dict(small, strict=strict)
    now = m.state_dict()  # (refused before any tensor is copied: PyTorch copied the counter first)
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert m[1]._sn.norm is not None
    for sub, want in before.items():
        with nest.use(sub), torch.no_grad():
            torch.testing.assert_close(m(x), want, rtol=0, atol=1e-6, msg=sub)


def test_a_load_refused_for_another_key_keeps_the_calibration_and_a_changed_one_drops_it():
    """A load refused for another module's key (refused before any tensor is copied; PyTorch copied what matched,
    then raised) keeps the calibration, also where the state_dict holds other statistics; a load that changes
    them drops it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)).eval()
    nest = sn.wrap(m, sn.Width("h", [4, 8, 16], out="0", norm="1", inp="3"))
    nest.calibrate([torch.randn(32, 8) * 3 + 1 for _ in range(2)])
    x = torch.randn(5, 8)
    with nest.use("h=4"), torch.no_grad():
        before = m(x)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    bad = {**state, "3.weight": torch.zeros(5, 16)}          # refused for another module's key
    with pytest.raises(RuntimeError, match="size mismatch"):
        m.load_state_dict(bad)
    assert m[1]._sn.norm is not None
    with nest.use("h=4"), torch.no_grad():
        torch.testing.assert_close(m(x), before, rtol=0, atol=1e-6)
    changed = {**bad, "1.running_mean": state["1.running_mean"] + 1}
    with pytest.raises(RuntimeError, match="size mismatch"):
        m.load_state_dict(changed)                           # (nothing copied: the calibration stays)
    assert m[1]._sn.norm is not None and torch.equal(m.state_dict()["1.running_mean"], state["1.running_mean"])
    m.load_state_dict({**state, "1.running_mean": state["1.running_mean"] + 1})
    assert m[1]._sn.norm is None and torch.equal(m[1].running_mean, state["1.running_mean"] + 1)


# -- depth: skipped blocks never run -------------------------------------------------------------------


class _AsideList(nn.Module):
    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.how = how
        if how == "list":
            self.run = list(self.blocks)
        elif how == "stages":
            self.stages = {"all": [tuple(self.blocks[:2]), tuple(self.blocks[2:])]}   # nested holders

    def forward(self, x):
        if self.how == "list":
            blocks = self.run
        elif self.how == "stages":
            blocks = [b for stage in self.stages["all"] for b in stage]
        elif self.how == "children":
            blocks = list(self.blocks.children())
        else:
            blocks = self.blocks
        for b in blocks:
            x = torch.tanh(b(x))
        return x


@pytest.mark.parametrize("how", ["list", "stages", "children"])
def test_a_block_the_sub_model_skips_never_runs_silently(how):
    m = _AsideList(how)
    nest = sn.wrap(m, sn.Depth("depth", [2, 4], layers="blocks"))
    x = torch.randn(2, 8)
    m(x)                                                        # full depth: every block runs
    with nest.use("depth=2"), pytest.raises(sn.SortedNetError, match="'blocks.2' ran under depth=2"):
        m(x)
    if how != "children":
        with pytest.raises(sn.SortedNetError, match="holds blocks the sub-model skips"):
            nest.export("depth=2")
        assert nest.pick(params=1e9) == nest.largest  # (pick returned depth=2 as well, whose export is refused)
        with pytest.raises(sn.errors.BudgetError, match=r"1 sub-model\(s\) passed over, as export refuses them"):
            nest.pick(params=nest.cost("depth=2"))


def test_what_a_skipped_block_holds_is_checked_where_kept_code_reaches_it():
    """A skipped block's own attributes leave with it (an accelerate hook's forward wrapper holds its block), but
    a module of it that kept code also reaches (``self.tail = blocks[3].fc``) is still looked at: its plain
    attribute holding a sliced tensor or a skipped block would share the live one with the export."""
    m = _AsideList("attr")
    m.tail = m.blocks[3]
    nest = sn.wrap(m, sn.Depth("depth", [2, 4], layers="blocks"))
    m.blocks[3].owner = [m.blocks[2]]
    with pytest.raises(sn.SortedNetError, match="blocks.3.owner holds blocks the sub-model skips"):
        nest.export("depth=2")
    del m.blocks[3].owner
    m.blocks[2].owner = [m.blocks[2]]  # (a skipped block no kept code reaches: leaves with its attribute)
    x = torch.randn(2, 8)
    with torch.no_grad(), nest.use("depth=2"):
        torch.testing.assert_close(nest.export("depth=2")(x), m(x))


def test_checkpoint_sequential_over_a_depth_sliced_sequential_is_refused():
    torch.manual_seed(0)
    seq = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)))
    nest = sn.wrap(seq, sn.Depth("depth", [2, 4], layers=""))
    x = torch.randn(2, 8, requires_grad=True)
    with nest.use("depth=2"), pytest.raises(sn.SortedNetError, match="ran under depth=2"):
        torch.utils.checkpoint.checkpoint_sequential(seq, 2, x, use_reentrant=False)


def test_a_checkpoint_recomputing_a_block_under_a_shallower_sub_model_recomputes_the_forwards_depth():
    """A per-block non-reentrant checkpoint whose backward runs under a sub-model that skips the block: the
    message blamed the forward ("reaches the blocks other than by iterating") though it iterated the list; then
    the block's guard refused the recomputation. The guard's read of the sub-model inside the checkpoint pins
    it: the backward recomputes the forward's depth and gives its gradients."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
            self.ckpt = True

        def forward(self, x):
            for b in self.blocks:
                x = x + (torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False) if self.ckpt else b(x))
            return x

    torch.manual_seed(0)
    m = Net()
    nest = sn.wrap(m, sn.Depth("depth", [1, 2, 4], layers="blocks"))
    x = torch.randn(3, 8)
    m.ckpt = False
    with nest.use("depth=2"):
        m(x).square().sum().backward()
    want = [p.grad for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    m.ckpt = True
    with nest.use("depth=2"):
        big = m(x).square().sum()
    with nest.use("depth=1"):
        big.backward()
    for got, w in zip([p.grad for p in m.parameters()], want):
        assert (got is None) == (w is None) and (w is None or torch.allclose(got, w, atol=1e-6))
    assert m.blocks[1].weight.grad is not None and m.blocks[2].weight.grad is None


def test_a_block_also_held_outside_the_list_runs_and_exports_as_live():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
            self.final = self.blocks[3]                         # always run, also held by the list

        def forward(self, x):
            for b in self.blocks:
                x = torch.tanh(b(x))
            return self.final(x)

    m = M()
    nest = sn.wrap(m, sn.Depth("depth", [2, 4], layers="blocks"))
    x = torch.randn(2, 8)
    with nest.use("depth=2"):
        live = m(x)
    small = nest.export("depth=2")
    torch.testing.assert_close(small(x), live)
    assert sum(p.numel() for p in small.parameters()) == nest.cost("depth=2")
    assert not any(isinstance(h, object) and type(h).__name__ == "DepthGuard"
                   for mod in small.modules() for h in mod._forward_pre_hooks.values())


class _FinalAlias(nn.Module):
    """A block also held outside its layer list (``self.final = self.blocks[-1]``), run after the loop."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(2))
        self.final = self.blocks[-1]
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h + self.final(h))


class _SharedBlocks(nn.Module):
    """ALBERT-style: one block object at every position of the list."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, 8)
        blk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.blocks = nn.ModuleList([blk, blk, blk])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


class _LayerAlias(_FinalAlias):
    """A sliced layer of the last block also held (and run) outside it, by the head."""

    def __init__(self):
        super().__init__()
        del self.final
        self.extra = self.blocks[1][0]
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(torch.relu(self.extra(h)))


class _LastAsFinal(nn.Module):
    """``self.final = self.blocks[-1]`` read after a loop over ``blocks[:-1]``: at depth 1 the list holds block 0,
    the loop runs nothing and ``final`` runs block 3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.final, self.head = self.blocks[-1], nn.Linear(8, 2)

    def forward(self, x):
        for b in self.blocks[:-1]:
            x = torch.relu(b(x))
        return self.head(self.final(x))


class _SharedLayer(nn.Module):
    """Every block holds the model's one embedding (a rotary table, a shared projection): no block's own."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(8, 8), "emb": self.emb}) for _ in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.relu(b["fc"](b["emb"](x)))
        return x


@pytest.mark.parametrize("arch", ["last_as_final", "final_alias", "layer_alias", "shared_blocks", "nested",
                                  "shared_layer", "first_alias", "adapter_of_late_blocks"])
def test_a_block_also_held_outside_its_layer_list_is_said_at_wrap(arch):
    """A block (or a layer of one) the model also holds outside the Depth list runs at every depth: with
    ``self.final = self.blocks[-1]``, depth 1 ran block 3 instead of block 0, while cost and export kept block 0,
    with no word (documented only). ``wrap`` names it; a block listed at several positions (ALBERT-style), a
    nested list, a layer every block shares with the model, and a block every depth keeps (``blocks[0]``) are
    not."""
    from sortednet.check import BlockHeldOutsideWarning

    if arch == "nested":
        m = nn.Sequential(nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(2)]))
        dims = (sn.Depth("outer", [1, 2], layers="0"), sn.Depth("inner", [1, 2], layers="0.*"))
    elif arch in ("shared_layer", "first_alias", "adapter_of_late_blocks"):
        m = _SharedLayer()
        if arch == "first_alias":
            m.first = m.blocks[0]
        if arch == "adapter_of_late_blocks":  # (shared by blocks 2 and 3 only, which depth 1 skips)
            m.adapter = nn.Linear(8, 8)
            m.blocks[2]["ad"] = m.blocks[3]["ad"] = m.adapter
        dims = (sn.Depth("depth", [1, 4], layers="blocks"),)
    else:
        m = {"last_as_final": _LastAsFinal, "final_alias": _FinalAlias, "layer_alias": _LayerAlias,
             "shared_blocks": _SharedBlocks}[arch]()
        dims = (sn.Depth("depth", [1, len(m.blocks)], layers="blocks"),)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sn.wrap(m, *dims)
    said = [str(w.message) for w in seen if issubclass(w.category, BlockHeldOutsideWarning)]
    want = {"last_as_final": "blocks.3 as 'final'", "final_alias": "blocks.1 as 'final'",
            "layer_alias": "blocks.1.0 as 'extra'", "adapter_of_late_blocks": "blocks.2.ad as 'adapter'"}.get(arch)
    assert (len(said) == 1 and want in said[0]) if want else not said
    assert all(w.filename == __file__ for w in seen if issubclass(w.category, BlockHeldOutsideWarning))


@pytest.mark.parametrize("arch", ["final_alias", "shared_blocks", "layer_alias"])
def test_blocks_held_twice_under_a_width_and_a_depth_export_and_count_as_they_run(arch):
    """A Width inside blocks that a Depth skips while the model still runs them (held outside the list, or at a
    kept position): export kept the aliased block at full size in a sliced class (6 of 18 sub-models 0.09-0.13
    off, or a raw AttributeError), and cost counted a shared block at full size (363 for 159 exported)."""
    x = torch.randn(4, 6)
    if arch in ("final_alias", "layer_alias"):
        m = _FinalAlias() if arch == "final_alias" else _LayerAlias()
        head = ["head"] if arch == "layer_alias" else []
        dims = [*(sn.Width(f"w{i}", [4, 8, 16], out=f"blocks.{i}.0", inp=[f"blocks.{i}.2", *head[:i]])
                  for i in range(2)), sn.Depth("d", [1, 2], layers="blocks")]
    else:
        m = _SharedBlocks()
        dims = [sn.Width("ffn", [4, 16], out="blocks.0.0", inp="blocks.0.2"), sn.Depth("d", [1, 3], layers="blocks")]
    nest = sn.wrap(m, *dims, example=x)
    fresh = nest.export(nest.smallest)  # (before any live forward: it raised inside the copy's forward)
    assert fresh(x).shape == (4, 3)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            live = m(x)
        small = nest.export(sub)
        assert all(not hasattr(mod, "_sn") for mod in small.modules())
        assert not [type(mod) for mod in small.modules() if type(mod).__module__.startswith("sortednet")]
        with torch.no_grad():
            torch.testing.assert_close(small(x), live, atol=1e-6, rtol=1e-5, msg=str(sub))
        assert sum(p.numel() for p in small.parameters()) == nest.cost(sub), sub


# -- reads without gradients follow the parameter as it is now ------------------------------------------


def test_reads_without_gradients_follow_every_change_of_the_parameter():
    """Each read is a fresh view: strides, storage and dtype changes are seen at once; nothing holds the
    parameter, so swap-mode loading (which needs the only reference) works; tracing works under no_grad."""
    m = _mlp()
    nest = _mlp_nest(m)
    x = torch.randn(2, 4)
    p = dict(m.named_parameters())["2.weight"]
    with nest.use("h1=8,h2=4"), torch.no_grad():
        m(x)
        p.data = p.data.t()                                   # same address and shape, other strides
        torch.testing.assert_close(m[2].weight, p[:4, :8])
        w = m[0].weight
        w.data = w.data.t().contiguous().t()                  # re-points that view object only
        torch.testing.assert_close(m[0].weight, dict(m.named_parameters())["0.weight"][:8])
        torch.testing.assert_close(m(x), nest.export("h1=8,h2=4")(x))
        del w                                                 # (a view we hold keeps its base, as in PyTorch)
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.load_state_dict(_mlp().state_dict())                # swap_tensors: refused if anything held p
        m.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    with nest.use("h1=8,h2=4"), torch.no_grad():
        traced = torch.jit.trace(m, x.double())
        torch.testing.assert_close(traced(x.double()), nest.export("h1=8,h2=4")(x.double()))


@pytest.mark.parametrize("surgery", ["replace_list", "append", "pop", "regrow"])
def test_training_refuses_a_model_whose_layer_list_was_replaced_after_wrap(surgery):
    m = _AsideList("plain")
    nest = sn.wrap(m, sn.Depth("depth", [2, 4], layers="blocks"))
    # (assignments are refused where they happen, see test_changing_the_wrapped_module_tree_is_refused_...;
    # writes no hook sees are caught here)
    if surgery == "replace_list":
        m._modules["blocks"] = nn.ModuleList(list(m.blocks))   # the new list is not sliced: every block would train
    elif surgery == "append":
        m.blocks._modules["4"] = nn.Linear(8, 8)        # the sliced list's length stays 4: it would never run
    elif surgery == "pop":
        del m.blocks._modules["3"]                      # the "largest" depth would run 3 blocks
    else:
        m.blocks[0].weight = nn.Parameter(torch.randn(16, 8))   # re-shaped: not the model the nest sized
    x = torch.randn(2, 8)
    with pytest.raises(sn.SortedNetError, match="changed after wrap"):
        sn.accumulate(nest, ["depth=2"], lambda: m(x).sum())
    assert all(p.grad is None for p in m.parameters())


def test_a_container_remade_around_the_same_sliced_modules_is_accepted():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0.0", inp="0.2"))
    m[0] = nn.Sequential(*list(m[0]))                   # the same sliced modules at the same paths
    x = torch.randn(2, 4)
    sn.accumulate(nest, ["h=8"], lambda: m(x).sum())
    assert nest.cost("h=8") == sum(p.numel() for p in nest.export("h=8").parameters())
    with pytest.raises(sn.SortedNetError, match="setting '0.2' to a new Linear is refused"):
        m[0][2] = nn.Linear(16, 3)                      # the new container is guarded as the old one was
    m[0] = nn.Sequential(*list(m[0]))                   # and re-made again, before any check refreshed the nest
    with pytest.raises(sn.SortedNetError, match="setting '0.0' to a new Linear is refused"):
        m[0][0] = nn.Linear(4, 16)
    nest.unwrap()
    m[0][0] = nn.Linear(4, 16)                          # unwrapped: no guard is left


def test_checkpoints_load_into_any_nest_bound_to_the_same_modules(tmp_path):
    def arch():
        torch.manual_seed(0)
        return nn.Sequential(*(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(2)))

    glob = sn.wrap(arch(), sn.Width("h", [4, 8, 16], out="*.0", inp="*.2"))
    sn.save(glob, tmp_path / "a.safetensors")
    loaded = sn.load(arch(), tmp_path / "a.safetensors")           # exact paths recorded by this nest
    sn.save(loaded, tmp_path / "b.safetensors")
    for pats in (("*.0", "*.2"), (r"re:\d\.0", r"re:\d\.2"), (["1.0", "0.0"], ["1.2", "0.2"])):
        nest = sn.wrap(arch(), sn.Width("h", [4, 8, 16], out=pats[0], inp=pats[1]))
        for f in ("a", "b"):
            sn.load(nest, tmp_path / f"{f}.safetensors")
    sn.load(loaded, tmp_path / "a.safetensors")
    other = sn.wrap(arch(), sn.Width("h", [4, 8, 16], out="0.0", inp="0.2"))   # other modules: refused
    with pytest.raises(sn.SortedNetError, match="differ from the nest"):
        sn.load(other, tmp_path / "a.safetensors")


def test_a_checkpoint_of_the_same_dimensions_in_another_order_is_refused_saying_so(tmp_path):
    """The file's sub-model rows are in its dimension order: a nest of the same dimensions listed in another
    order is refused with that reason (not a generic mismatch), before any change."""
    def arch():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 2))

    def dims():
        return sn.Width("g", [4, 16], out="0", inp="2"), sn.Width("h", [6, 12], out="2", inp="4")

    sn.save(sn.wrap(arch(), *dims()), tmp_path / "a.safetensors")
    g, h = dims()
    nest = sn.wrap(arch(), h, g)
    before = snapshot(nest.model)
    with pytest.raises(sn.SortedNetError, match=r"in another order: saved \['g', 'h'\], the nest \['h', 'g'\]"):
        sn.load(nest, tmp_path / "a.safetensors")
    assert_unchanged(nest.model, before)
    sn.load(sn.wrap(arch(), *dims()), tmp_path / "a.safetensors")        # the checkpoint's order loads


def test_load_refuses_a_model_of_inference_tensors_before_wrapping_it(tmp_path):
    nest = _mlp_nest(_mlp())
    sn.save(nest, tmp_path / "m.safetensors")
    with torch.inference_mode():
        m = _mlp()
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match="inference tensors"):
        sn.load(m, tmp_path / "m.safetensors")
    assert_unchanged(m, before)
    assert all("_sn" not in mod.__dict__ for mod in m.modules())



class _Holder:
    """A user's object holding a weight (a class instance: a deep copy copies it by its attributes)."""

    def __init__(self, w):
        self.w = w


class _SlotHolder:
    __slots__ = ("w",)

    def __init__(self, w):
        self.w = w


class _SlotBase:
    __slots__ = ("w",)


class _SlotChild(_SlotBase):
    """Its slot ``w`` declared by its parent class."""

    __slots__ = ("extra",)

    def __init__(self, w):
        self.w, self.extra = w, 1


class _DictWithAttrs(dict):
    """A dict subclass: a deep copy copies its instance attributes too."""


class _Getter:
    def __init__(self, w):
        self.w = w

    def get(self):
        return self.w


class _HeldAside(nn.Module):
    """A sliced weight also held in a plain Python attribute, read from there in forward."""

    def __init__(self, how: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)
        self.how = how
        w = self.fc1.weight
        if how == "dict_subclass":
            self.aside = _DictWithAttrs(k=1)
            self.aside.w = w
        else:
            self.aside = {"list": [w], "dict": {"w": w}, "tuple": (w, 1),
                          "partial": functools.partial(F.linear, weight=w), "modules": [self.fc1],
                          "object": {"k": _Holder(w)}, "slots": [_SlotHolder(w)], "inherited_slots": _SlotChild(w),
                          "bound_method": _Getter(w).get}.get(how)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        a = self.aside
        w = {"modules": lambda: a[0].weight, "partial": lambda: a.keywords["weight"], "dict": lambda: a["w"],
             "object": lambda: a["k"].w, "slots": lambda: a[0].w, "inherited_slots": lambda: a.w,
             "dict_subclass": lambda: a.w, "bound_method": lambda: a()}.get(self.how, lambda: a[0])()
        return self.fc2(h) * w.norm()


@pytest.mark.parametrize("how", ["list", "dict", "tuple", "partial", "modules", "object", "slots", "inherited_slots",
                                 "dict_subclass", "bound_method"])
def test_a_sliced_tensor_held_in_a_plain_attribute_is_refused_by_export_and_check(how):
    """Read from a plain attribute, the weight is the full-size tensor under every sub-model (the live output
    is not the sub-model's), and an export would share it with the live model (training the copy wrote into the
    live gradient). Holding the module instead follows the sub-model. In an object of the user's (a class
    instance, ``__slots__`` too) the export shared it silently. Pick returned sub-models export refused behind a
    slot a parent class declares, a dict subclass's own attribute or a bound method's object."""
    torch.manual_seed(0)
    m = _HeldAside(how)
    x = torch.randn(5, 8)
    if how == "modules":
        nest = sn.wrap(m, sn.Width("h", [8, 32], out="fc1", inp="fc2"), example=x)
        small = nest.export("h=8")
        assert small.aside[0] is small.fc1 and small.fc1.weight.shape == (8, 8)
        with torch.no_grad(), nest.use("h=8"):
            torch.testing.assert_close(small(x), m(x), rtol=0, atol=1e-6)
        return
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"aside holds a tensor that sortednet slices"):
        sn.wrap(m, sn.Width("h", [8, 32], out="fc1", inp="fc2"), example=x)
    assert_unchanged(m, before)
    nest = sn.wrap(m, sn.Width("h", [8, 32], out="fc1", inp="fc2"))
    with pytest.raises(sn.SortedNetError, match=r"export\(h=8\): aside holds a tensor"):
        nest.export("h=8")
    # pick returns only what export ships: it returned h=8, whose export is refused
    with pytest.raises(sn.SortedNetError, match=r"no sub-model of this nest can be exported: \['aside'\] hold"):
        nest.pick(params=1e9)


@pytest.mark.parametrize("hooks", ["none", "closure", "one_object_twice"])
def test_a_sliced_tensor_the_attribute_walk_misses_is_refused_by_the_copy_count(hooks):
    """Past what the walk of plain attributes opens (10,000 objects: here the weight's holder comes after 20,000
    others), the deep copy's own reads of the live tensors are counted against the parameter and buffer slots
    holding them: one more read is a reference the export would keep to the live, full-size tensor, refused with
    the attribute holding it. The references hooks hold count as expected only as the copy reads them: a
    function's closure (never copied) and a hook object on two modules (copied once) had let one through."""
    m = _HeldAside("object")
    m.aside = [_Holder(None) for _ in range(20_000)] + [_Holder(m.fc1.weight)]
    w = m.fc1.weight
    if hooks == "closure":
        m.fc2.register_forward_hook(lambda mod, i, o: o if w is not None else o)
    elif hooks == "one_object_twice":
        h = _HookHolding(w)
        m.fc1.register_forward_hook(h)
        m.fc2.register_forward_hook(h)
    nest = sn.wrap(m, sn.Width("h", [8, 32], out="fc1", inp="fc2"))
    for sub in nest.submodels:
        with pytest.raises(sn.SortedNetError, match=rf"export\({sub}\): aside holds a tensor .* inside an object"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", sn.export.LiveHookWarning)
            nest.export(sub)
    if hooks != "none":
        return
    m.aside = [m.fc1]  # (the module itself: exported, and the export's own)
    small = nest.export("h=8")
    assert small.aside[0] is small.fc1 and small.fc1.weight.shape == (8, 8)


class _Trainer:
    """A training loop's object the model keeps (as some frameworks attach theirs): an optimizer and a schedule."""

    def __init__(self, model):
        self.optimizers = [torch.optim.AdamW(model.parameters())]
        self.schedule = torch.optim.lr_scheduler.StepLR(self.optimizers[0], 1)


class _HookHolding:
    """A forward hook object holding a weight (read nowhere)."""

    def __init__(self, w):
        self.w = w

    def __call__(self, mod, inp, out):
        return out


def test_an_optimizer_on_the_model_is_not_refused_and_a_hook_object_holding_a_weight_is_named():
    """The walk of objects refused a model holding its optimizer, a schedule or a trainer holding them (export,
    pick and check: parameters to update, not to compute with); a hook object holding a sliced weight passed pick
    and was then refused by export's count. Both export (the hook holding the live weight named by
    LiveHookWarning, as a hook's closure is) and pick agrees with it."""
    from sortednet.export import LiveHookWarning
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
    m.optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    m._trainer = _Trainer(m)
    small = nest.export("h=8")
    assert small[0].weight.shape == (8, 8) and small.optimizer is m.optimizer  # (the same objects: not copied)
    assert small._trainer.optimizers[0] is m._trainer.optimizers[0]
    assert nest.pick(params=10 ** 9) == nest.largest
    nest.check(torch.randn(2, 8))
    m[0].register_forward_hook(_HookHolding(m[0].weight))
    assert nest.pick(params=10 ** 9) == nest.largest
    with pytest.warns(LiveHookWarning, match=r"a hook on '0' \(_forward_hooks\) holds a Parameter of the live"):
        nest.export(nest.largest)


class _TaggedCapture(nn.Module):
    """A weight kept as a Python attribute of a plain tensor (``self.tag.src``: a deep copy copies a tensor's
    attributes) or in a lambda's closure, with a feature-capture hook bound to the model itself."""

    def __init__(self, how):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)
        if how == "tensor_attr":
            self.tag = torch.zeros(1)
            self.tag.src = self.a.weight
        elif how == "buffer_attr":
            self.register_buffer("tag", torch.zeros(1))
            self.tag.src = self.a.weight
        elif how == "getstate":
            self.tag = _Registered(self.a.weight)
        elif how == "kwdefault":
            def fn(x, *, w=self.a.weight):
                return x @ w.t()
            self.fn = fn
        else:
            w = self.a.weight
            self.fn = lambda x: x @ w.t()
        self.b.register_forward_hook(self._save)

    def _save(self, mod, inp, out):
        self.seen = out.shape

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


_REGISTRY: dict = {}


class _Registered:
    """Keeps its weight outside its ``__dict__``; a deep copy gets it from ``__getstate__``."""

    def __init__(self, w):
        self.key = id(self)
        _REGISTRY[self.key] = w

    def __getstate__(self):
        return {"w": _REGISTRY[self.key]}

    def __setstate__(self, state):
        self.__dict__.update(state)


@pytest.mark.parametrize("how", ["tensor_attr", "buffer_attr", "lambda", "kwdefault"])
def test_a_weight_held_in_a_tensors_attribute_or_a_closure_is_refused_by_pick_and_export(how):
    """A hook bound to the model (``register_forward_hook(self._save)``) had its copy made before the count: the
    whole model was copied uncounted and a weight kept as a tensor's attribute reached the export live, full-size;
    pick returned sub-models export refused (the walk opened neither tensors' attributes, a buffer's included, nor
    closures). An object handing the weight to a copy only through its own ``__getstate__`` is refused by export's
    count of the copy's references (the walk does not call user code)."""
    torch.manual_seed(0)
    m = _TaggedCapture(how)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="a", inp="b"))
    name = {"tensor_attr": "tag", "buffer_attr": r"tag\.src"}.get(how, "fn")
    with pytest.raises(sn.SortedNetError, match=rf"export\(h=4\): {name} holds a tensor that sortednet slices"):
        nest.export("h=4")
    with pytest.raises(sn.SortedNetError, match=rf"no sub-model of this nest can be exported: \['{name}'\]"):
        nest.pick(params=10 ** 9)
    if how == "tensor_attr":
        m.tag = _Registered(m.a.weight)
        with pytest.raises(sn.SortedNetError, match=r"export\(h=4\): an object on the model holds a tensor .* "
                                                    r"inside an object"):
            nest.export("h=4")


class _BnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn1(self.conv1(x))))


def test_a_depth_skipping_a_block_with_a_sliced_batchnorm_exports():
    """sortednet's own load hook holds every sliced BatchNorm, a skipped block's too: the export's count of the
    live tensors' references read them there and refused every sub-model at that depth (and wrap(example=) the
    model); pick returned them. sortednet's hooks are not copied (the export drops them)."""
    torch.manual_seed(0)
    m = nn.Sequential(_BnBlock(), _BnBlock()).eval()
    x = torch.randn(2, 4, 5, 5)
    nest = sn.wrap(m, sn.Width("w", [4, 8], out="*.conv1", inp="*.conv2", norm="*.bn1"),
                   sn.Depth("d", [1, 2], layers=""), example=x)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(nest.export(sub)(x), m(x))
    assert nest.pick(params=nest.cost("w=8,d=1")) == nest.resolve("w=8,d=1")


class _GroupsAside(nn.Module):
    """Blocks whose weights are also kept in plain containers for optimizer groups (never read in forward)."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(n))
        self.head = nn.Linear(8, 3)
        self.decay = [p for b in self.blocks for p in b.parameters() if p.dim() == 2]
        self.groups = ({"decay": self.decay, "other": [self.head.bias]}, "tag")

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2 ** 16))
def test_parameters_kept_for_optimizer_groups_under_a_depth_and_a_width(seed):
    """A list of the blocks' parameters kept on the model for optimizer groups: under a Depth alone every export
    runs and equals the live sub-model (the list keeps copies of the skipped blocks' tensors, as a forward reading
    it live reads them); with a Width on those blocks, export refuses it (the list would share the live full-size
    tensors) and pick, which returns only what export ships, says so."""
    torch.manual_seed(seed)
    m = _GroupsAside()
    x = torch.randn(3, 8)
    nest = sn.wrap(m, sn.Depth("d", [1, 2, 4], layers="blocks"), example=x)
    for sub in nest.submodels:
        small = nest.export(sub)
        assert len(small.decay) == 8 and small.groups[0]["decay"] is small.decay
        live = {p.data_ptr() for p in m.parameters()}
        assert not any(p.data_ptr() in live for p in small.decay)
        with torch.no_grad(), nest.use(sub):
            torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-6)
    nest.unwrap()
    nest = sn.wrap(m, sn.Depth("d", [1, 2, 4], layers="blocks"),
                   sn.Width("ffn", [4, 16], out="blocks.*.0", inp="blocks.*.2"))
    with pytest.raises(sn.SortedNetError, match=r"decay holds a tensor that sortednet slices.*named_parameters"):
        nest.export(nest.largest)
    with pytest.raises(sn.SortedNetError, match=r"\['decay', 'groups'\] hold tensors that sortednet slices"):
        nest.pick(params=1e9)


def _hooks(model: nn.Module) -> int:
    return sum(len(d) for m in model.modules() for d in (m._forward_pre_hooks, m._forward_hooks,
                                                          m._load_state_dict_pre_hooks, m._state_dict_hooks))


def test_wrap_stopped_by_a_ctrl_c_at_any_point_leaves_the_model_plain_or_wrapped_never_stuck():
    """A Ctrl-C anywhere in wrap's own code (the install, the hooks, the nest's set-up): the model is as it was
    (classes, keys, no hook; it loads its own state_dict and can be wrapped again), or fully wrapped and its nest
    found by Nest.of (which unwraps it). Was: wrapped with no nest to undo it, or a load hook left behind that
    refused the model's own state_dict."""
    from models import interrupted_between_bytecodes
    from sortednet.nest import Nest
    from sortednet.wrap import _guard_state_keys, install

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))

    dims = lambda: (sn.Width("h", [4, 8], out="0", norm="1", inp="3"), sn.Rank("r", [1, 3], targets="4", mode="svd"))
    x = torch.randn(5, 6)
    ref = build().eval()
    want, keys = ref(x), list(ref.state_dict())
    n, fired = 0, True
    while fired:
        n += 1
        m = build().eval()
        m[3].register_forward_hook(lambda *a: None)  # the user's own hooks stay
        m._register_load_state_dict_pre_hook(lambda *a, **k: None)
        fired = interrupted_between_bytecodes(n, lambda m=m: sn.wrap(m, *dims()), install, _guard_state_keys,
                                              Nest.__init__)
        if any("_sn" in mod.__dict__ for mod in m.modules()):  # wrapped: its nest is found and unwraps it
            Nest.of(m).unwrap()
        assert [type(mod) for mod in m.modules()] == [type(mod) for mod in ref.modules()], f"point {n}"
        assert list(m.state_dict()) == keys and _hooks(m) == 2, f"point {n}"
        m.load_state_dict(ref.state_dict())
        torch.testing.assert_close(m(x), want, msg=f"point {n}")
        sn.wrap(m, *dims()).unwrap()
    assert n > 20, f"only {n - 1} points reached"


def test_a_failed_wrap_removes_its_own_hooks_only(monkeypatch):
    """Hooks someone else registers while wrap runs (a slicer's prepare, another thread) survive its undo."""
    from sortednet.nest import Nest

    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    real = Nest._attach

    def attach(self, *a, **k):
        real(self, *a, **k)
        m.register_forward_pre_hook(lambda *a: None)
        m[2].register_forward_hook(lambda *a: None, always_call=True)
        raise RuntimeError("a fault after the hooks (injected)")

    monkeypatch.setattr(Nest, "_attach", attach)
    with pytest.raises(RuntimeError, match="injected"):
        sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2"))
    assert len(m._forward_pre_hooks) == 1 and len(m[2]._forward_hooks) == 1
    assert len(m[2]._forward_hooks_always_called) == 1 and _hooks(m) == 2
    monkeypatch.undo()
    sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2")).unwrap()
    assert _hooks(m) == 2


def _fused_cases():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    yield "mha", mha, sn.wrap(mha, sn.Heads("h", [1, 2, 4], attn="")), "h=2", mha, "in_proj_weight"
    mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(16, 8))
    yield "chunks", mlp, sn.wrap(mlp, sn.Width("f", [4, 16], out="0", inp="2", chunks={"0": 2})), "f=4", mlp[0], \
        "weight"


_FUSED_WRITES = {"init": lambda w: nn.init.zeros_(w), "clamp": lambda w: w.clamp_(-0.01, 0.01),
                 "copy": lambda w: w.copy_(torch.zeros_like(w)), "setitem": lambda w: w.__setitem__(0, 1.0),
                 "data": lambda w: w.data.zero_(), "detach": lambda w: w.detach().mul_(2),
                 "index": lambda w: w[1:3].fill_(5.0), "out": lambda w: torch.add(w, 1, out=w),
                 "iadd": lambda w: w.__iadd__(1), "split": lambda w: w.split(2)[0].mul_(2),
                 "unbind": lambda w: w.unbind(0)[1].zero_(), "chunk": lambda w: w.detach().chunk(2)[0].fill_(3.0),
                 "foreach": lambda w: torch._foreach_add_([w], 1.0), "aten": lambda w: torch.ops.aten.zero_.default(w),
                 "copy.copy": lambda w: copy.copy(w).zero_(), "data_assign": lambda w: setattr(w, "data", w * 0),
                 "set_": lambda w: w.set_(torch.zeros_like(w))}


@pytest.mark.parametrize("write", list(_FUSED_WRITES))
def test_a_write_into_a_fused_weight_under_a_submodel_is_refused_not_lost(write):
    """A weight of fused blocks under a sub-model is a concatenation (a copy): a write into it could not reach
    the parameter. It raises, naming the attribute, with or without gradients, and changes nothing; every other
    use of it runs as before (plain tensors out)."""
    for case, _, nest, sub, mod, name in _fused_cases():
        full = mod._parameters[name].detach().clone()
        for grad in (True, False):
            with nest.use(sub), torch.set_grad_enabled(grad):
                w = getattr(mod, name)
                with torch.no_grad(), pytest.raises(sn.SortedNetError, match=f"{name}: written in place"):
                    _FUSED_WRITES[write](w)
                assert type(w * 2) is torch.Tensor and type(w.sum()) is torch.Tensor
            assert torch.equal(mod._parameters[name], full), f"{case} {write}"
        with nest.use(sub), torch.no_grad():  # the export, built from those reads, trains as a plain model
            small = nest.export(sub)
        for p in small.parameters():
            assert type(p) is nn.Parameter
            p.data.mul_(1.0)


@pytest.mark.parametrize("write", ["normal_", "uniform_", "kaiming_uniform_", "constant_", "relu", "dropout",
                                   "leaky_relu", "normalize_out"])
def test_functions_that_write_a_fused_weight_by_keyword_are_refused_too(write):
    """nn.init.* and F.*(inplace=True) hand their tensor to __torch_function__ by keyword."""
    fn = {"normal_": lambda w: nn.init.normal_(w), "uniform_": lambda w: nn.init.uniform_(w),
          "kaiming_uniform_": lambda w: nn.init.kaiming_uniform_(w), "constant_": lambda w: nn.init.constant_(w, 0.),
          "relu": lambda w: F.relu(w, inplace=True), "dropout": lambda w: F.dropout(w, 0.5, True, True),
          "leaky_relu": lambda w: F.leaky_relu(w, 0.1, True),
          "normalize_out": lambda w: F.normalize(w.detach().clone(), dim=1, out=w)}[write]
    for case, _, nest, sub, mod, name in _fused_cases():
        full = mod._parameters[name].detach().clone()
        with nest.use(sub), torch.no_grad():
            with pytest.raises(sn.SortedNetError, match="written in place"):
                fn(getattr(mod, name))
        assert torch.equal(mod._parameters[name], full), f"{case} {write}"


def plain_values(w):
    return w.detach().clone().numpy()


def test_what_belongs_to_a_read_fused_weight_as_an_object_stays_as_for_a_plain_tensor():
    """Formatting, copies, pickling and a new Parameter made from a read work as on a plain tensor (a copy is
    plain and writable); flag changes are not writes."""
    import pickle

    for case, _, nest, sub, mod, name in _fused_cases():
        with nest.use(sub), torch.no_grad():
            w = getattr(mod, name)
            assert f"{w[0, 0]:.3f}" == f"{float(w[0, 0]):.3f}" and repr(w).startswith("tensor(")
            for copied in (copy.deepcopy(w), pickle.loads(pickle.dumps(w)), w.clone()):
                assert type(copied) is torch.Tensor
                copied.zero_()
            p = nn.Parameter(w.detach())
            w.detach().requires_grad_(False)
            t = w.detach()
            t.t_()  # (shape and strides only: no value is lost)
            t.unsqueeze_(0)
            assert t.shape == (1, *w.shape[::-1])
            arr = w.detach().numpy()  # read-only: a write through numpy could not reach the parameter
            assert np.array_equal(arr, plain_values(w)) and not arr.flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                arr[0, 0] = 7.0
            mine = torch.zeros(w.shape)  # after set_ it holds the caller's tensor: writes are real, not refused
            t = w.detach()
            t.set_(mine)
            t.fill_(1.0)
            assert float(mine.sum()) == mine.numel()
        assert type(p) is nn.Parameter, case
        opt = torch.optim.SGD([p], lr=0.1)
        p.sum().backward()
        opt.step()


class _ClampingLinear(nn.Module):
    """A user's layer whose own forward writes its weight in place (a max-norm constraint)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        with torch.no_grad():
            self.weight.clamp_(-0.1, 0.1)
        return F.linear(x, self.weight, self.bias)


@sn.slicer(_ClampingLinear)
class _ClampingSlicer(sn.Slicer):
    roles = ("out", "inp")
    attrs = ("weight", "bias")

    def full(self, m, role):
        return m._parameters["weight"].shape[0 if role == "out" else 1]

    def value(self, m, name):
        return self.take(m, name, [(0, "out"), (1, "inp")] if name == "weight" else [(0, "out")])


def test_a_users_own_forward_writing_its_fused_weight_is_refused_while_library_layers_run_unchecked():
    """A library layer's forward (nn.Linear's) only reads its weight; a user's forward may write it, and on a
    fused weight under a sub-model that write would be lost: it raises, and the parameter is unchanged."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    for cls in (nn.Linear, _ClampingLinear):
        m = nn.Sequential(cls(8, 32), nn.ReLU(), nn.Linear(32, 8))
        nest = sn.wrap(m, sn.Width("f", [4, 16], out="0", chunks={"0": 2}))
        w, b = m[0]._parameters["weight"].detach().clone(), m[0]._parameters["bias"].detach().clone()
        with nest.use("f=4"):
            if cls is nn.Linear:  # the fused rows of both chunks: 0..3 and 16..19
                want = F.linear(x, torch.cat([w[:4], w[16:20]]), torch.cat([b[:4], b[16:20]]))
                torch.testing.assert_close(m[0](x), want)
            else:
                with pytest.raises(sn.SortedNetError, match=r"0\.weight: written in place \(clamp_\)"):
                    m[0](x)
        assert torch.equal(m[0]._parameters["weight"], w), cls.__name__


def test_a_fused_weight_read_under_a_submodel_can_be_handed_to_a_compiled_function():
    """Its operations run eagerly there (the write check is never traced): values as eager, writes refused;
    fullgraph=True refuses it loudly, naming the reason."""
    for case, _, nest, sub, mod, name in _fused_cases():
        torch._dynamo.reset()
        full = mod._parameters[name].detach().clone()
        f = torch.compile(lambda w: (w * w).sum() + w[0].abs().sum(), backend="eager")
        with nest.use(sub), torch.no_grad():
            w = getattr(mod, name)
            want = (plain_values(w) ** 2).sum() + np.abs(plain_values(w)[0]).sum()
            assert abs(float(f(w)) - float(want)) <= 1e-4 * abs(float(want)), case
            with pytest.raises(sn.SortedNetError, match="written in place"):
                torch.compile(lambda w: w.mul_(2).sum(), backend="eager")(w)
            with pytest.raises(Exception, match="fused weight read under a sortednet sub-model"):
                torch.compile(lambda w: w.sum(), backend="eager", fullgraph=True)(w)
        assert torch.equal(mod._parameters[name], full), case
    torch._dynamo.reset()


def test_a_state_dict_whose_hooks_rename_keys_saves_and_loads(tmp_path):
    """checkpoint_wrapper's state_dict hook strips its prefix from the keys: the tensors are still the modules'
    own parameters, so save and load go on (a check by key refused them as computed state)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    def build(seed):
        torch.manual_seed(seed)
        return nn.Sequential(checkpoint_wrapper(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))),
                             nn.Linear(4, 2))

    def dims():
        return [sn.Width("h", [4, 16], out="0._checkpoint_wrapped_module.0", inp="0._checkpoint_wrapped_module.2")]

    m = build(0)
    assert "0.0.weight" in m.state_dict()  # (renamed by the hook)
    nest = sn.wrap(m, *dims())
    sn.save(nest, tmp_path / "n.safetensors")
    loaded = sn.load(build(1), tmp_path / "n.safetensors")
    x = torch.randn(3, 4)
    with torch.no_grad():
        for sub in nest.submodels:
            with nest.use(sub), loaded.use(sub):
                assert torch.equal(loaded(x), nest(x))


class _SharedOut(nn.Module):
    """Every block's nn.MultiheadAttention shares one output projection."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.MultiheadAttention(16, 4, batch_first=True) for _ in range(3))
        for b in self.blocks[1:]:
            b.out_proj = self.blocks[0].out_proj

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x, x, x, need_weights=False)[0]
        return x


def test_heads_over_attentions_sharing_one_output_projection():
    """The shared projection is held under a second name by every later block: wrap raised a raw KeyError."""
    m, x = _SharedOut(), torch.randn(2, 5, 16)
    nest = sn.wrap(m, sn.Heads("heads", [1, 2, 4], attn="blocks.*"), sn.Depth("d", [1, 3], layers="blocks"), example=x)
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            live = m(x)
        small = nest.export(sub)
        with torch.no_grad():
            torch.testing.assert_close(small(x), live, atol=1e-5, rtol=1e-5, msg=str(sub))
        assert sum(p.numel() for p in small.parameters()) == nest.cost(sub)


def test_a_wiring_hint_names_a_module_held_twice_by_its_first_name():
    """check advised out='blocks.1.out_proj' (a second name of blocks.0.out_proj), which the patterns refuse."""
    class M(_SharedOut):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(6, 16)

        def forward(self, x):
            return super().forward(self.emb(x))

    with pytest.raises(sn.SortedNetError, match=r"does not slice; add out='blocks.0.out_proj'$"):
        sn.wrap(M(), sn.Width("e", [8, 16], inp="blocks.*", out="emb"), sn.Depth("d", [1, 3], layers="blocks"),
                example=torch.randn(2, 5, 6))


def test_a_module_tree_with_a_cycle_is_refused_by_name():
    """``c.d = c``: wrap recursed until a RecursionError (PyTorch's own state_dict cannot walk it either)."""
    m = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU()), nn.Linear(8, 2))
    m[1].back = m[1]
    with pytest.raises(sn.SortedNetError, match=r"'1.back' is a module that contains itself"):
        sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2"))
    m[1].back = nn.Identity()  # shared, not cyclic: fine
    m.alias = m[1]
    sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2"))


def test_unwrap_of_a_module_parametrized_after_wrap_is_refused_before_any_change():
    """register_parametrization of an unsliced tensor of a sliced module (an extra gain) is PyTorch's to do: it
    swaps the class for one built on the sliced class. unwrap restored the original class over it: the
    parametrization and its tensor were gone (the forward and remove_parametrizations raised AttributeError),
    with no way back. Refused by name now, nothing changed; removing the parametrization first unwraps."""
    from torch.nn.utils import parametrize

    class Exp(nn.Module):
        def forward(self, x):
            return x.exp()

        def right_inverse(self, x):
            return x.log()

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    m[2].register_parameter("gain", nn.Parameter(torch.tensor(0.7)))
    m[2].register_forward_hook(lambda mod, i, o: o * mod.gain)
    x = torch.randn(5, 8)
    nest = sn.wrap(m, sn.Width("a", [4, 16], out="0", inp="2"))
    parametrize.register_parametrization(m[2], "gain", Exp())
    with torch.no_grad():
        before = m(x)
    classes = [type(c) for c in m.modules()]
    with pytest.raises(sn.SortedNetError, match=r"'2' was parametrized after wrap .*\['gain'\].*Nothing was changed"):
        nest.unwrap()
    assert [type(c) for c in m.modules()] == classes
    with torch.no_grad(), nest.use("a=4"):
        m(x)  # the nest still works
    with torch.no_grad():
        torch.testing.assert_close(m(x), before)
    parametrize.remove_parametrizations(m[2], "gain")
    nest.unwrap()
    assert type(m[2]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(m(x), before)


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_pick_asks_export_of_each_sub_model_what_plain_attributes_hold():
    """A sliced weight kept in a plain attribute of the last block only: the depths that skip that block export,
    the full depth does not. pick refused every sub-model (or, before, returned the full depth, whose export is
    refused); it now returns exactly the sub-models whose export runs."""
    m = _Stack()
    m.blocks[3].cache = [m.blocks[3][0].weight]
    nest = sn.wrap(m, sn.Depth("d", [2, 4], layers="blocks"),
                   sn.Width("w", [4, 16], out="blocks.*.0", inp="blocks.*.2"))
    ok = set()
    for sub in nest.submodels:
        try:
            nest.export(sub)
            ok.add(str(sub))
        except sn.SortedNetError:
            pass
    assert ok == {"d=2,w=4", "d=2,w=16"}
    for s in nest.submodels:
        picked = nest.pick(params=nest.cost(s))
        assert str(picked) in ok and nest.cost(picked) <= nest.cost(s)
    with pytest.raises(sn.errors.BudgetError, match=r"2 sub-model\(s\) passed over, as export refuses them: "
                                                    r"\['blocks.3.cache'\] hold tensors"):
        nest.pick(params=nest.cost("d=2,w=4") - 1)


def test_modules_of_skipped_blocks_held_in_plain_attributes_are_refused_where_skipped():
    """A list of every Linear of the model (or a dict keyed by the blocks: per-block learning rates): under a depth
    the export's list kept copies of the skipped blocks' layers (still sortednet's classes, sharing the live
    weights: an init through the export's list wrote the live model) and the dict collapsed them into one None
    key. Refused, naming the attribute, where the depth skips them; pick passes over those depths."""
    for attr in ("linears", "lr"):
        m = _Stack()
        if attr == "linears":
            m.linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
        else:
            m.lr = {b: 0.1 * (i + 1) for i, b in enumerate(m.blocks)}
        nest = sn.wrap(m, sn.Depth("d", [2, 4], layers="blocks"),
                       sn.Width("w", [4, 16], out="blocks.*.0", inp="blocks.*.2"))
        with pytest.raises(sn.SortedNetError, match=rf"{attr} holds blocks the sub-model skips \(or modules of"):
            nest.export("d=2,w=4")
        small = nest.export("d=4,w=4")
        assert all(type(x) is nn.Linear for x in small.linears) if attr == "linears" else \
            list(small.lr) == list(small.blocks)
        assert nest.pick(params=nest.cost("d=4,w=4"))["d"] == 4


def test_export_reads_past_objects_a_hook_holds_that_refuse_their_dict():
    """A hook holding a slotted object whose __getattr__ raises KeyError (an attribute-dict config): export failed
    with a raw KeyError while looking for live modules the hook holds."""
    class Cfg:
        __slots__ = ("_d",)

        def __init__(self):
            self._d = {"scale": 2.0}

        def __getattr__(self, k):
            return self._d[k]

    cfg = Cfg()
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
    m[0].register_forward_hook(lambda mod, i, o: o * cfg.scale)
    x = torch.randn(2, 8)
    with torch.no_grad(), nest.use("h=8"):
        torch.testing.assert_close(nest.export("h=8")(x), m(x))


def test_records_holding_skipped_blocks_are_refused_not_cut():
    """(layer, gain) pairs, tuples of blocks read by position: any cut of them changes what a forward reading them
    computes ((layer, gain) -> (gain,), self.ends[1] another block). Refused where the depth skips an entry, as a
    list of blocks is; pick passes over those depths."""
    class Paired(_Stack):
        def __init__(self):
            super().__init__()
            self.pairs = [(b[0], 1.0 + i) for i, b in enumerate(self.blocks)]

        def forward(self, x):
            for (fc, g), b in zip(self.pairs, self.blocks):
                x = x + b[2](torch.relu(fc(x))) * g
            return x

    m = Paired()
    x = torch.randn(3, 8)
    nest = sn.wrap(m, sn.Depth("d", [2, 4], layers="blocks"))
    with pytest.raises(sn.SortedNetError, match=r"pairs holds blocks the sub-model skips"):
        nest.export("d=2")
    with torch.no_grad():
        torch.testing.assert_close(nest.export("d=4")(x), m(x))
    assert nest.pick(params=1e9) == nest.largest
    with pytest.raises(sn.errors.BudgetError, match="passed over"):
        nest.pick(params=nest.cost("d=2"))
    del m.pairs
    m.ends = (m.blocks[3], m.blocks[0])
    with pytest.raises(sn.SortedNetError, match=r"ends holds blocks the sub-model skips"):
        nest.export("d=2")


def test_picks_table_follows_the_plain_attributes_it_passed_sub_models_over_for():
    """pick's table, built while a plain attribute held skipped blocks, kept passing over those depths after the
    attribute was removed or emptied (the fix export's error asks for): a budget fitting d=2 got a smaller
    sub-model. An attribute added after the table was built is read again once export names it: pick passes over
    those depths from then on. A block held deeper than six levels of lists is refused as any other."""
    m = _Stack()
    m.firsts = [b[0] for b in m.blocks]
    nest = sn.wrap(m, sn.Depth("d", [2, 4], layers="blocks"), sn.Width("w", [4, 16], out="blocks.*.0",
                                                                       inp="blocks.*.2"))
    budget = nest.cost("d=2,w=16")
    assert nest.pick(params=budget) == nest.resolve("d=4,w=4")  # (d=2 passed over)
    del m.firsts
    assert nest.pick(params=budget) == nest.resolve("d=2,w=16")
    m.firsts = [b[0] for b in m.blocks]  # (back, after the table was built: seen once export names it)
    with pytest.raises(sn.SortedNetError, match="firsts holds blocks the sub-model skips"):
        nest.export(nest.pick(params=budget))
    assert nest.pick(params=budget) == nest.resolve("d=4,w=4")
    m.firsts.pop()  # (emptied in place of the skipped block's layer: d=2 exports again)
    m.firsts.pop()
    assert nest.pick(params=budget) == nest.resolve("d=2,w=16")
    del m.firsts
    assert nest.pick(params=budget) == nest.resolve("d=2,w=16")
    m.ends = [[[[[[[[m.blocks[3]]]]]]]]]  # (added after the table was built; eight levels deep)
    got = nest.pick(params=budget)
    assert got == nest.resolve("d=2,w=16")
    with pytest.raises(sn.SortedNetError, match="ends holds blocks the sub-model skips"):
        nest.export(got)
    assert nest.pick(params=budget) == nest.resolve("d=4,w=4")


@pytest.mark.parametrize("box", ["namespace", "deque"])
def test_picks_table_sees_a_namespace_or_deque_it_passed_sub_models_over_for_change(box):
    """The holders export finds in a SimpleNamespace or a deque (blocks the depth skips) are watched by pick's
    table like those in lists: filled after the table was built, or emptied, pick follows."""
    import collections

    m = _Stack()
    make = {"namespace": lambda *xs: types.SimpleNamespace(**{f"b{i}": x for i, x in enumerate(xs)}),
            "deque": lambda *xs: collections.deque(xs)}[box]
    m.box = make(m.blocks[0])
    nest = sn.wrap(m, sn.Depth("d", [2, 4], layers="blocks"))
    budget = nest.cost("d=2")
    assert nest.pick(params=budget) == nest.resolve("d=2")  # (block 0 runs at d=2: nothing passed over)
    m.box = make(m.blocks[0], m.blocks[3])
    with pytest.raises(sn.SortedNetError, match="box holds blocks the sub-model skips"):
        nest.export("d=2")
    with pytest.raises(sn.errors.BudgetError, match="passed over"):
        nest.pick(params=budget)
    if box == "deque":
        m.box.pop()
    else:
        del m.box.b1
    assert nest.pick(params=budget) == nest.resolve("d=2")
    nest.export("d=2")


def test_a_list_of_block_layers_built_when_read_follows_the_depth():
    """What export's refusal of a kept list of block layers advises: a property building the list from the layer
    list when read. Live and exported, it holds the blocks that run, and export equals the live model."""
    class Norms(_Stack):
        def __init__(self):
            super().__init__()
            self.norm = nn.ModuleList(nn.LayerNorm(8) for _ in self.blocks)

        @property
        def pairs(self):
            return list(zip(self.blocks, self.norm))

        def forward(self, x):
            for b, n in self.pairs:
                x = n(x + b(x))
            return x

    m = Norms()
    nest = sn.wrap(m, sn.Depth("d", [2, 4], layers=["blocks", "norm"]))
    x = torch.randn(3, 8)
    small = nest.export("d=2")
    with torch.no_grad(), nest.use("d=2"):
        assert len(m.pairs) == len(small.pairs) == 2
        torch.testing.assert_close(small(x), m(x))
    assert nest.pick(params=nest.cost("d=2")) == nest.resolve("d=2")


def test_a_mapping_that_is_not_a_dict_is_one_input():
    """Only a dict (and a tokenizer's BatchEncoding) is keyword arguments: a custom Mapping the model takes as its
    one input was, for a while, splatted into keyword arguments."""
    import collections

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, batch):
            return self.b(torch.relu(self.a(batch["x"])))

    m = Model()
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="a", inp="b"))
    for ex in (collections.UserDict({"x": torch.randn(3, 4)}), types.MappingProxyType({"x": torch.randn(3, 4)})):
        nest.check(ex)
        assert nest.cost("h=4", "flops", example=ex) == 2 * 3 * (4 * 4 + 4 * 2)


class _OneBatch(nn.Module):
    """A training-framework style model: one argument, the batch dict."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, batch):
        return self.b(torch.relu(self.a(batch["x"])))


def test_a_dict_is_the_one_input_of_a_forward_that_takes_none_of_its_keys():
    """A dict example (or batch) was always passed as keyword arguments: a model whose forward takes one batch dict
    (``forward(self, batch)``) got a TypeError (wrapped) from check, cost, profile and fit. Where the forward takes
    none of the keys as a keyword and no ``**kwargs``, the dict is its one input; a forward taking any of the keys
    still gets them as keywords (an unexpected key is then the model's own TypeError, named)."""
    m = _OneBatch()
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="a", inp="b"))
    ex = {"x": torch.randn(5, 4)}
    nest.check(ex)
    assert nest.cost("h=4", "flops", example=ex) == 2 * 5 * (4 * 4 + 4 * 3)
    prof = nest.profile(ex, metrics=("params", "flops", "memory"), progress=False)
    assert list(prof.costs["flops"]) == [float(nest.cost(s, "flops", example=ex)) for s in nest.submodels]
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    hist = sn.fit(nest, [(ex, torch.tensor([0, 1, 2, 0, 1]))] * 2, opt, sn.Sampler(nest.submodels, k=2, seed=0),
                  progress=False)
    assert len(hist.train) == 2
    with torch.no_grad(), nest.use("h=4"):
        torch.testing.assert_close(nest.export("h=4")(ex), m(ex))

    class Named(_OneBatch):
        def forward(self, x, mask=None):
            return self.b(torch.relu(self.a(x)))

    named = sn.wrap(Named(), sn.Width("h", [4, 8], out="a", inp="b"))
    assert named.cost("h=4", "flops", example={"x": torch.randn(5, 4)}) == 2 * 5 * (4 * 4 + 4 * 3)
    with pytest.raises(sn.SortedNetError, match="extra"):
        named.cost("h=4", "flops", example={"x": torch.randn(5, 4), "extra": 1})


def test_which_forwards_take_a_dict_as_keywords():
    """The rule of call_model, on the forwards users write: a decorator's own ``**kwargs`` wins over the signature
    it copies (functools.wraps) of the function it wraps; a per-instance forward is read as it is, and the cache
    of signatures read does not keep its model alive."""
    import gc
    import weakref

    from sortednet.cost import takes_keywords

    def packing(f):  # (gathers the keywords into one dict for the wrapped forward)
        @functools.wraps(f)
        def wrapper(self, **kw):
            return f(self, kw)
        return wrapper

    class Packed(_OneBatch):
        @packing
        def forward(self, batch):
            return super().forward(batch)

    class NoGrad(_OneBatch):  # (a pass-through decorator: the forward it passes on to decides)
        @torch.no_grad()
        def forward(self, batch):
            return super().forward(batch)

    ex = {"x": torch.randn(5, 4)}
    nest = sn.wrap(Packed(), sn.Width("h", [4, 8], out="a", inp="b"))
    assert takes_keywords(nest.model, ex) and not takes_keywords(NoGrad(), ex)
    assert sn.wrap(NoGrad(), sn.Width("h", [4, 8], out="a", inp="b"), example=ex).cost("h=4", "flops", example=ex) \
        == 2 * 5 * (4 * 4 + 4 * 3)
    assert nest.cost("h=4", "flops", example=ex) == 2 * 5 * (4 * 4 + 4 * 3)
    cases = {"batch": (lambda batch: 0, False), "x": (lambda x: 0, True), "kw": (lambda **kw: 0, True),
             "mixed": (lambda batch, **kw: 0, True), "none": (lambda: 0, True), "scale": (lambda b, s=1.0: 0, False)}
    for name, (fn, want) in cases.items():
        assert takes_keywords(fn, ex) is want, name
    m = _OneBatch()
    m.forward = lambda batch, m=m: _OneBatch.forward(m, batch)  # (a per-instance forward holding its model)
    alive = weakref.ref(m)
    assert not takes_keywords(m, ex)
    del m
    gc.collect()
    assert alive() is None


def test_plain_attributes_nested_thousands_deep_or_large_do_not_break_pick():
    """pick reads the model's plain attributes: one nested 3000 lists deep raised a RecursionError; one holding a
    block beside a 50 000-entry vocabulary was walked whole at every pick (what pick keeps to see it change is
    bounded)."""
    from sortednet.export import aside_holders, holders_state

    m = _Stack()
    deep: list = []
    for _ in range(3000):
        deep = [deep]
    m.deep = deep
    m.meta = {"vocab": {f"w{i}": i for i in range(50_000)}, "last": m.blocks[3]}
    nest = sn.wrap(m, sn.Depth("d", [2, 4], layers="blocks"))
    assert nest.pick(params=1e9) == nest.largest
    with pytest.raises(sn.errors.BudgetError, match="passed over"):
        nest.pick(params=nest.cost("d=2"))
    holders = aside_holders(nest)
    assert [a for _, a in holders] == ["meta"] and len(holders_state(holders)) < 10_000
    del m.meta["last"]
    assert nest.pick(params=nest.cost("d=2")) == nest.resolve("d=2")


def test_sliced_parameters_as_dict_keys_are_named_by_pick():
    m = _Stack()
    m.names = {p: n for n, p in m.named_parameters()}  # (parameter -> name: the keys are the live tensors)
    nest = sn.wrap(m, sn.Width("w", [4, 16], out="blocks.*.0", inp="blocks.*.2"))
    with pytest.raises(sn.SortedNetError, match=r"names holds a tensor that sortednet slices"):
        nest.export("w=4")
    with pytest.raises(sn.SortedNetError, match=r"no sub-model .*\['names'\] hold tensors that sortednet slices"):
        nest.pick(params=1e9)


class _TwiceInATuple:
    """A hook object holding a weight in one tuple it references twice (a deep copy reads an unchanged tuple anew
    at each reference: it does not memoise it)."""

    def __init__(self, w):
        self.a = (w,)
        self.b = self.a

    def __call__(self, mod, inp, out):
        return out


def test_a_hook_object_referencing_one_tuple_twice_and_a_closure_over_a_module_are_named_not_refused():
    """The count of the copy's references expected one read of a tuple referenced twice (a deep copy reads it at
    each reference): the export was refused, naming nothing. A function kept in an attribute that closes over a
    live module runs the live module (its sizes) from the export: named by LiveHookWarning."""
    from sortednet.export import LiveHookWarning
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
    m[2].register_forward_hook(_TwiceInATuple(m[0].weight))
    with pytest.warns(LiveHookWarning, match=r"a hook on '2' \(_forward_hooks\) holds a Parameter of the live"):
        small = nest.export("h=8")
    assert small[0].weight.shape == (8, 8)
    first = m[0]
    m.extra = lambda h: first(h)
    with pytest.warns(LiveHookWarning, match=r"extra holds a function whose closure, defaults or globals hold a "
                                             r"Linear of the live model"):
        nest.export("h=8")


class _ClassHeld(nn.Module):
    """Reads a weight its class holds (``type(self).W = w``): every instance, a copy's too, reads the live one."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        type(self).W = self.fc1.weight

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x))) * type(self).W.norm()


def test_a_sliced_tensor_a_class_attribute_holds_is_refused_by_export_and_passed_over_by_pick():
    m = _ClassHeld()
    try:
        nest = sn.wrap(m, sn.Width("h", [8, 16], out="fc1", inp="fc2"))
        with pytest.raises(sn.SortedNetError, match=r"export\(h=8\): _ClassHeld.W \(a class attribute\) holds a "
                                                    r"tensor that sortednet slices"):
            nest.export("h=8")
        with pytest.raises(sn.SortedNetError, match=r"no sub-model .*\['_ClassHeld.W'\] hold tensors"):
            nest.pick(params=1e9)
    finally:
        del _ClassHeld.W


@dataclasses.dataclass
class _Refs:
    last: object


class _StackRefs(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.refs = _Refs(self.blocks[-1])

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return x + self.refs.last.bias if self.refs.last is not None else x


def test_a_skipped_block_an_object_holds_is_refused_and_passed_over_by_pick():
    """A dataclass holding the last block: the export of a depth skipping it got None there (the deep copy's memo
    maps a skipped block to None), and its output differed from the live sub-model's; pick returned it."""
    torch.manual_seed(0)
    m = _StackRefs()
    nest = sn.wrap(m, sn.Depth("d", [2, 3], layers="blocks"))
    with pytest.raises(sn.SortedNetError, match=r"export\(d=2\): refs holds blocks the sub-model skips"):
        nest.export("d=2")
    assert nest.pick(params=1e9) == nest.resolve("d=3")
    with pytest.raises(sn.errors.BudgetError, match="passed over"):
        nest.pick(params=nest.cost("d=2"))
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(nest.export("d=3")(x), m(x))


class _UsersHooks(nn.Module):
    """A user's own dict named like torch's hook tables, holding a bound method of an object holding a weight."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.extra_hooks = {"scale": _Getter(self.fc1.weight).get}

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x))) * self.extra_hooks["scale"]().norm()


def test_a_users_dict_named_like_hooks_is_walked_as_any_attribute():
    """An attribute named ``*_hooks`` counted its references as a hook's (expected): the export kept the live
    weight and passed silently; pick returned it."""
    nest = sn.wrap(_UsersHooks(), sn.Width("h", [8, 16], out="fc1", inp="fc2"))
    with pytest.raises(sn.SortedNetError, match=r"export\(h=8\): extra_hooks holds a tensor that sortednet slices"):
        nest.export("h=8")
    with pytest.raises(sn.SortedNetError, match=r"no sub-model .*\['extra_hooks'\] hold tensors"):
        nest.pick(params=1e9)


def _scale_hook(mod, inp, out, w):
    return out * w.norm()


def test_a_partial_hook_holding_a_weight_is_named_by_live_hook_warning():
    from sortednet.export import LiveHookWarning
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
    m[2].register_forward_hook(functools.partial(_scale_hook, w=m[0].weight))
    with pytest.warns(LiveHookWarning, match=r"a hook on '2' \(_forward_hooks\) holds a Parameter of the live"):
        nest.export("h=8")


class _KeyErrorConfig:
    """A config whose ``__getattr__`` raises KeyError for what it lacks (and copies itself)."""

    def __init__(self, **kw):
        self._d = dict(kw)

    def __getattr__(self, k):
        return self.__dict__["_d"][k]

    def __deepcopy__(self, memo):
        return _KeyErrorConfig(**self._d)

    def __call__(self, mod, inp, out):
        return out


def test_objects_whose_getattr_raises_key_error_export():
    """Reading ``__wrapped__`` (or a hook's ``hook``) of such an object raised a raw KeyError from export; check
    turned it into a refusal of a correct model."""
    x = torch.randn(2, 8)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    m.config = _KeyErrorConfig(width=16)
    m[2].register_forward_hook(_KeyErrorConfig())
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"), example=x)
    small = nest.export("h=8")
    with torch.no_grad(), nest.use("h=8"):
        torch.testing.assert_close(small(x), m(x))
    assert small.config.width == 16


def test_the_nest_kept_on_the_model_is_refused_by_export_and_pick_naming_it(fresh_dynamo):
    """A Nest cannot be copied: pick returned sub-models whose export then failed in the deep copy."""
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
    m.nest = nest
    with pytest.raises(sn.SortedNetError, match=r"export\(h=8\): nest holds the nest \(what sn.wrap returned\)"):
        nest.export("h=8")
    with pytest.raises(sn.SortedNetError, match=r"no sub-model .* holds the nest itself"):
        nest.pick(params=1e9)
    del m.nest
    assert nest.export("h=8")[0].weight.shape == (8, 8)
    m.step = nest.compile(backend="eager")  # (sortednet's own object holding it: named too, not a deepcopy error)
    with pytest.raises(sn.SortedNetError, match=r"export\(h=8\): step holds the nest"):
        nest.export("h=8")
    del m.step


class _Serving(nn.Module):
    """Serialises its forward with a lock, and keeps a queue (a mutex and conditions) of requests."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.lock, self.rlock, self.requests = threading.Lock(), threading.RLock(), queue.Queue()

    def forward(self, x):
        with self.lock, self.rlock:
            return self.net(x)


def test_a_model_holding_locks_is_checked_exported_and_picked_with_fresh_locks():
    """No deep copy takes a lock: ``wrap(example=)``'s check, ``export`` and every eval view refused a model
    holding one (a serving model's lock), while ``pick`` returned its sub-models. The copy gets new, released
    locks of the same kinds (a held one too: the copy's is held by no one), the queue its own mutex."""
    m, x = _Serving(), torch.randn(2, 8)
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="net.0", inp="net.2"), example=x)
    assert nest.pick(params=nest.cost("h=8")) == nest.smallest
    with m.lock:
        small = nest.export("h=8")
    assert type(small.lock) is type(m.lock) and small.lock is not m.lock and not small.lock.locked()
    assert type(small.rlock) is type(m.rlock) and small.rlock is not m.rlock
    assert small.requests.mutex is not m.requests.mutex and small.requests.not_empty._lock is small.requests.mutex
    assert small.requests.not_empty.acquire.__self__ is small.requests.mutex  # (a Condition keeps its lock's methods)
    small.requests.put(1)
    assert small.requests.get(timeout=5) == 1 and m.requests.empty() and not m.requests.mutex.locked()
    with torch.no_grad(), nest.use("h=8"):
        torch.testing.assert_close(small(x), m(x))
    assert small.net[0].weight.shape == (8, 8)
    m.feed = (i for i in range(3))  # (next to the locks, what no copy can take is still named)
    with pytest.raises(sn.SortedNetError, match=r"'generator' object \(module '_Serving', attribute 'feed'"):
        nest.export("h=8")


class _Tokenizer:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_the_walk_of_held_objects_returns_what_can_hold_a_tensor_not_a_vocabulary():
    """Strings, numbers and None hold nothing: a tokenizer's 300k-word vocabulary held on the model was walked
    (and its words returned) by every check of an export, for seconds per export."""
    from sortednet.modes import held_leaves
    w = torch.zeros(2)
    vocab = {f"t{i}": i for i in range(50_000)}
    tok = _Tokenizer(vocab=vocab, words=list(vocab), special=[None, 1.5, b"x", True], w=w)
    assert held_leaves(tok) == [tok, w]
    assert held_leaves([vocab, "a", 3]) == []


class _Registry:
    """A process-wide registry: a deep copy is the registry itself."""

    def __init__(self, **refs):
        self.refs = refs

    def __deepcopy__(self, memo):
        return self


class _WeakHead(nn.Module):
    """Reads its head through weak references, in every place a model keeps one."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self._head = weakref.ref(self.fc2)
        self.by_name = {"head": weakref.ref(self.fc2)}
        self.table = weakref.WeakValueDictionary({"head": self.fc2})
        self.helper = types.SimpleNamespace(refs=[weakref.ref(self.fc2)])
        self.ema_refs = [weakref.ref(p) for p in self.parameters()]  # (bookkeeping, never read)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self._head()(h) + self.by_name["head"]()(h) + self.table["head"](h) + self.helper.refs[0]()(h)


def test_the_export_points_weak_references_at_its_own_modules_and_names_those_it_cannot():
    """A copy keeps a weak reference pointing at the live object: the export's ``self._head()`` ran the live,
    full-size head (a raw shape error at h=8, or a wrong output where the shapes happen to fit), with only a
    warning. The export points them at its own modules and parameters, in an attribute, a dict, a list, an
    object's attributes or a WeakValueDictionary; one it cannot rebind (in a tuple) is still named by
    LiveHookWarning. The live model's references are left as they are."""
    from sortednet.export import LiveHookWarning
    m = _WeakHead()
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="fc1", inp="fc2"))
    x = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = nest.export("h=8")
    with nest.use("h=8"):
        torch.testing.assert_close(small(x), m(x))
    assert small._head() is small.by_name["head"]() is small.table["head"] is small.helper.refs[0]() is small.fc2
    assert [r() for r in small.ema_refs] == list(small.parameters()) and small.fc2.weight.shape == (4, 8)
    assert m._head() is m.table["head"] is m.helper.refs[0]() is m.fc2 and m.ema_refs[0]() is m.fc1.weight
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.refs = [weakref.ref(p) for p in m.parameters()]
    m.opt = opt  # (an optimizer on the model: the export shares it, the live one's references stay)
    gone = []
    cases = {"held": (weakref.ref(m.fc2),),  # (a tuple: cannot be written)
             "on_gone": weakref.ref(m.fc2, lambda r: gone.append(r)),  # (its callback: the live model's code)
             "scales": weakref.WeakKeyDictionary({m.fc2: 2.0}),  # (keyed by the live module: not the export's)
             "registry": _Registry(head=weakref.ref(m.fc2))}  # (shared by the export: the live model's own)
    for name, value in cases.items():
        setattr(m, name, value)
        with pytest.warns(LiveHookWarning, match=rf"{name} holds a weak reference to a Linear of the live model"):
            small = nest.export("h=8")
        assert small.opt is opt and [r() for r in opt.refs] == list(m.parameters())
        delattr(m, name)
    assert small.registry is cases["registry"] and cases["registry"].refs["head"]() is m.fc2
    assert getattr(small, "on_gone", None) is None and not gone
    assert nest.pick(params=1e9) == nest.largest


@pytest.mark.parametrize("case", ["lora", "svd", "width"])
@pytest.mark.parametrize("strict", [True, False])
def test_a_state_dict_of_other_shapes_is_refused_before_any_tensor_is_copied(case, strict):
    """A state_dict of a nest with another largest rank (or width): PyTorch's raw RuntimeError ("size mismatch")
    came after every other tensor was copied, leaving a half-loaded model. Refused first (a SortedNetError that
    is a RuntimeError too), nothing copied; the nest's own state_dict still loads."""
    torch.manual_seed(0)

    def build(big: int):
        m = nn.Sequential(nn.Linear(8, 8 if case != "width" else big), nn.ReLU(),
                          nn.Linear(8 if case != "width" else big, 6))
        dims = (sn.Rank("r", [2, big], targets=["0"], mode=case),) if case != "width" else (
            sn.Width("h", [2, big], out="0", inp="2"),)
        return m, sn.wrap(m, *dims)

    src, _ = build(4)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    dst, _ = build(8)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"size mismatch .*another shape .*nothing was copied") as err:
        dst.load_state_dict(src.state_dict(), strict=strict)
    assert isinstance(err.value, RuntimeError)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    dst.load_state_dict({k: v + 1 for k, v in before.items()}, strict=strict)
    assert all(torch.equal(v, before[k] + 1) for k, v in dst.state_dict().items())


@pytest.mark.parametrize("holder", ["compiled", "container", "none"])
def test_a_load_through_a_holder_of_the_model_refuses_other_shapes_and_non_tensors_before_any_copy(
        holder, fresh_dynamo):
    """A load called on what holds the wrapped model (``torch.compile``'s module, a container) was checked by no
    module of the nest (each checks only a load called on itself): PyTorch copied every other tensor before its
    raw size mismatch. And a value that is no tensor (a list) was not checked: the same half-loaded model. The
    wrapped model's root checks a load from above it, under its prefix; a non-tensor is refused with the shapes.
    So is a meta tensor (a state_dict of a model built with empty weights), which PyTorch copied the others before
    refusing; ``assign=True`` takes it as PyTorch does."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    m = build()
    sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    outer, prefix = {"compiled": lambda: (torch.compile(m), "_orig_mod."),
                     "container": lambda: (nn.Sequential(m), "0."), "none": lambda: (m, "")}[holder]()
    good = {k: v + 1 for k, v in build().state_dict().items()}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for key, value, what in [("0.weight", torch.zeros(4, 8), r"\(4, 8\) for \(16, 8\)"),
                             ("2.bias", [0.0] * 4, r"a list, not a tensor"),
                             ("0.weight", torch.empty(16, 8, device="meta"), "a meta tensor, which holds no values")]:
        with pytest.raises(sn.SortedNetError, match=rf"(size mismatch|no tensor).*{prefix}{key}: {what}.*nothing "
                                                    rf"(under '{prefix[:-1]}' )?was copied"):
            outer.load_state_dict({prefix + k: value if k == key else v for k, v in good.items()})
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    outer.load_state_dict({prefix + k: v for k, v in good.items()})
    assert all(torch.equal(v, good[k]) for k, v in m.state_dict().items())
    mixed = {**good, "0.weight": torch.zeros(4, 8), "2.weight": torch.empty(4, 16, device="meta")}
    with pytest.raises(sn.SortedNetError, match=r"size mismatch for 1 tensor\(s\), of another shape than the "
                                                r"model's; 1 value\(s\) that hold no tensor data"):
        outer.load_state_dict({prefix + k: v for k, v in mixed.items()})
    assert all(torch.equal(v, good[k]) for k, v in m.state_dict().items())
    outer.load_state_dict({prefix + k: v.to("meta") if k == "2.bias" else v for k, v in good.items()}, assign=True)
    assert m[2].bias.is_meta and torch.equal(m[0].weight, good["0.weight"])


def test_the_callers_strict_is_read_through_a_wrapped_load_state_dict(monkeypatch):
    """A library that wraps ``Module.load_state_dict`` (instrumentation: ``def patched(self, sd, *a, **kw)``) made
    the running call's ``strict`` unreadable (the wrapper's frame was taken for torch's, ``strict`` in its
    kwargs): a base model's checkpoint loaded into a lora nest with ``strict=False`` was refused as a strict
    load. The call is torch's own frame, found by name and file."""
    orig = nn.Module.load_state_dict

    @functools.wraps(orig)
    def patched(self, state_dict, *args, **kwargs):
        return orig(self, state_dict, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "load_state_dict", patched)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    base = {k: v + 1 for k, v in m.state_dict().items()}
    sn.wrap(m, sn.Rank("r", [2, 4], targets=["2"], mode="lora"))
    adapters = {k: v.clone() for k, v in m.state_dict().items() if "lora" in k}
    res = m.load_state_dict(base, strict=False)
    assert sorted(res.missing_keys) == ["2.lora_A", "2.lora_B"] and not res.unexpected_keys
    assert all(torch.equal(m.state_dict()[k], v) for k, v in base.items())
    assert all(torch.equal(m.state_dict()[k], v) for k, v in adapters.items())
    with pytest.raises(sn.SortedNetError, match=r"lacks \['2.lora_A', '2.lora_B'\]"):
        m.load_state_dict(base)
    bad = {**m.state_dict(), "0.weight": torch.zeros(4, 8)}
    with pytest.raises(sn.SortedNetError, match=r"size mismatch .*0\.weight: \(4, 8\)"):
        m.load_state_dict(bad, strict=False)


def test_a_part_of_the_model_loaded_alone_refuses_other_shapes_before_any_copy_and_a_converting_hook_loads():
    """``model.block.load_state_dict(sd)`` of a block of a nest of another rank: only the whole model's load was
    checked, so the block's other tensors were copied before PyTorch's size mismatch. A load pre-hook of the
    user's own that converts an old layout (a flat weight viewed back) was refused by the whole model's check,
    which ran before it: such a module (and what is below it) is left to its hook."""
    def build(ranks):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8)), nn.Linear(8, 3))
        sn.wrap(m, sn.Rank("r", ranks, targets=["0.0", "0.1"], mode="lora"))
        return m

    m, other = build([2, 4]), build([2, 3])
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    part = {k[2:]: v for k, v in other.state_dict().items() if k.startswith("0.")}
    with pytest.raises(sn.SortedNetError, match=r"size mismatch .*0\.lora_A: \(3, 4\) for \(4, 4\)"):
        m[0].load_state_dict(part)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())

    def upgrade(sd, prefix, *args):
        if sd.get(prefix + "weight") is not None and sd[prefix + "weight"].dim() == 1:
            sd[prefix + "weight"] = sd[prefix + "weight"].view(3, 8)

    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    m[2]._register_load_state_dict_pre_hook(upgrade)
    old = {k: v + 1 for k, v in m.state_dict().items()}
    old["2.weight"] = old["2.weight"].flatten()
    sn.wrap(m, sn.Width("w", [4, 8], out="0", inp="2"))
    m.load_state_dict(old)
    assert torch.equal(m.state_dict()["2.weight"], old["2.weight"].view(3, 8))


def test_get_parameter_under_a_smaller_sub_model_returns_the_parameter():
    """``model.get_parameter("0.weight")`` inside ``use`` read the attribute, the active slice, and PyTorch raised
    a raw "`weight` is not an nn.Parameter"; it returns the parameter itself, as ``named_parameters()`` does
    there. A name that is no parameter still raises PyTorch's AttributeError."""
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    nest = sn.wrap(m, sn.Width("h", [4, 32], out="0", inp="2"))
    with nest.use("h=4"):
        assert m[0].weight.shape == (4, 8)
        assert m.get_parameter("0.weight") is m[0]._parameters["weight"] is dict(m.named_parameters())["0.weight"]
        assert m[2].get_parameter("weight") is m[2]._parameters["weight"]
        for bad in ("0.nope", "5.weight", "0.in_features"):
            with pytest.raises(AttributeError):
                m.get_parameter(bad)
    assert m.get_parameter("0.weight") is m[0].weight


class _InDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.d = nn.ModuleDict({"up": nn.Linear(8, 32), "act": nn.ReLU(), "down": nn.Linear(32, 8)})

    def forward(self, x):
        for layer in self.d.values():
            x = layer(x)
        return x


@pytest.mark.parametrize("how", ["del", "pop", "clear"])
def test_removing_a_sliced_module_from_a_module_dict_is_refused_before_it_lands(how):
    """ModuleDict's __delitem__ / pop / clear write _modules directly: a sliced module removed there landed, and
    a module added under a new key made the count whole again (a raw shape error at the next forward)."""
    m = _InDict()
    sn.wrap(m, sn.Width("h", [8, 32], out="d.up", inp="d.down"))
    before, tree = snapshot(m), list(m.named_modules())
    with pytest.raises(sn.SortedNetError, match="deleting 'd.(up|down)' is refused while the model is wrapped"):
        {"del": lambda: m.d.__delitem__("down"), "pop": lambda: m.d.pop("down"), "clear": m.d.clear}[how]()
    assert list(m.named_modules()) == tree
    assert_unchanged(m, before)
    del m.d["act"]  # (a module off the guarded paths: the user's to change)


@pytest.mark.parametrize("container", ["sequential", "module_list"])
def test_a_slice_deleted_from_a_container_is_refused_before_any_child_goes(container):
    """``del seq[1:]`` deletes child by child: the children before the guarded one were gone when the guard
    refused it (the model left with blocks 0 and 3, refused at every call from then on). Every index of the
    slice is checked first now."""
    blocks = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(4)]
    m = nn.Sequential(*blocks) if container == "sequential" else _Blocks()
    if container == "module_list":
        m.blocks = nn.ModuleList(blocks)
        m.forward = lambda x: [x := b(x) for b in m.blocks][-1]
    holder = m if container == "sequential" else m.blocks
    prefix = "" if container == "sequential" else "blocks."
    sn.wrap(m, sn.Width("h", [2, 8], out=f"{prefix}3.0", inp=f"{prefix}3.2"))
    before, tree = snapshot(m), list(m.named_modules())
    with pytest.raises(sn.SortedNetError, match=f"deleting '{prefix}3' is refused while the model is wrapped"):
        del holder[1:]
    assert list(m.named_modules()) == tree
    assert_unchanged(m, before)
    m(torch.randn(2, 4))
    del holder[0:0]  # (an empty slice: nothing to refuse)
    assert list(m.named_modules()) == tree


def test_a_module_dict_update_is_refused_before_any_key_is_set():
    """``ModuleDict.update({"b": ..., "a": ...})`` replaced ``b`` and then refused ``a`` (sliced): half applied.
    Every key is checked first; an update of unguarded keys (a mapping, pairs, an iterator) still lands."""
    m = _InDict()
    sn.wrap(m, sn.Width("h", [8, 32], out="d.up", inp="d.down"))
    act = m.d["act"]
    before, tree = snapshot(m), list(m.named_modules())
    with pytest.raises(sn.SortedNetError, match="setting 'd.up' to a new Linear is refused"):
        m.d.update({"act": nn.GELU(), "up": nn.Linear(8, 32)})
    assert m.d["act"] is act and list(m.named_modules()) == tree
    assert_unchanged(m, before)
    m.d.update([("act", nn.GELU())])
    assert isinstance(m.d["act"], nn.GELU)
    m.d.update(iter([("act", nn.Tanh())]))
    assert isinstance(m.d["act"], nn.Tanh) and list(m.d) == ["up", "act", "down"]

"""accumulate / Distill / fit invariants over the test model families."""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import copy
import functools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sortednet as sn
from models import FAMILIES, interrupted_between_bytecodes
from sortednet import slicers
from sortednet.train import evaluate


@contextlib.contextmanager
def _nonfinite_warns(match: str | None = None):
    """``pytest.warns(NonFiniteLossWarning)``, by the class's name: run with its doctests in an order pytest
    collects ``src/sortednet/train.py`` after this file, ``sn.train`` can be a second copy of that module whose
    class is not the one ``sn.fit`` / ``sn.accumulate`` warn with."""
    with pytest.warns(RuntimeWarning, match=match) as rec:
        yield rec
    assert any(w.category.__name__ == "NonFiniteLossWarning" for w in rec), [w.category for w in rec]


def task_loss(out: torch.Tensor) -> torch.Tensor:
    """A loss that depends on every output entry (fixed pseudo-random target)."""
    target = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    return F.mse_loss(out.float(), target)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for n, p in model.named_parameters()}


def hand_sum(nest, subs, x, weights, distill):
    """Reference: one graph summing every scaled loss (plain autograd)."""
    teacher = max(subs, key=nest.submodels.index)
    with nest.use(teacher):
        t_out = nest.model(x)
    target = t_out.detach()
    total, losses = 0.0, {}
    for s, w in zip(subs, weights):
        if s == teacher:
            out = t_out
        else:
            with nest.use(s):
                out = nest.model(x)
        loss = task_loss(out)
        losses[s] = float(loss.detach())
        if distill is not None and s != teacher:
            loss = (1 - distill.alpha) * loss + distill.alpha * distill.soft_loss(out, target)
        total = total + w * loss
    total.backward()
    return [losses[s] for s in subs]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace_grad", "autograd"])
@pytest.mark.parametrize("distill,custom_weights", [(None, False), (sn.Distill(temperature=2.0, alpha=0.3), True)],
                         ids=["plain", "distill"])
def test_accumulate_equals_hand_summed_losses(family, inplace, distill, custom_weights, monkeypatch):
    if inplace:  # the test models are tiny: send every slice through the in-place gradient path
        monkeypatch.setattr(slicers, "INPLACE_MIN_NUMEL", 0)
    case, ref_case = FAMILIES[family](seed=1), FAMILIES[family](seed=1)
    nest = sn.wrap(case.model, *case.dims, inplace_grad=inplace)
    ref = sn.wrap(ref_case.model, *ref_case.dims, inplace_grad=False)
    subs = sn.Sampler(nest.submodels, k=min(3, len(nest.submodels)), strategy="sandwich", seed=4).draw(2)
    subs = subs[::-1] if custom_weights else subs  # any order: the teacher is found, not assumed first
    weights = [0.5, 0.2, 0.3][: len(subs)] if custom_weights else [1 / len(subs)] * len(subs)

    def closure():
        out = case.model(case.example)
        return task_loss(out), out

    losses = sn.accumulate(nest, subs, closure, distill=distill, weights=weights if custom_weights else None)
    expect = hand_sum(ref, subs, ref_case.example, weights, distill)
    assert losses == pytest.approx(expect, rel=1e-5, abs=1e-6)
    got, want = grads(case.model), grads(ref_case.model)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


@pytest.mark.parametrize("family", ["lm_width_heads_depth", "attn_block", "mlp"])
@pytest.mark.parametrize("distill", [None, sn.Distill()], ids=["plain", "distill"])
@pytest.mark.parametrize("min_numel", [0, 10**9], ids=["inplace_grad", "autograd"])
def test_graph_of_each_submodel_is_freed_before_the_next(family, distill, min_numel, monkeypatch):
    monkeypatch.setattr(slicers, "INPLACE_MIN_NUMEL", min_numel)
    case = FAMILIES[family](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    first = next(iter(case.model.children()))
    alive: list[weakref.ref] = []
    seen_alive = []
    hook = first.register_forward_hook(lambda m, i, o: alive.append(weakref.ref(o)))

    def closure():
        seen_alive.append(sum(r() is not None for r in alive))  # earlier outputs and activations are gone
        out = case.model(case.example)
        alive.append(weakref.ref(out))
        return task_loss(out), out

    sn.accumulate(nest, nest.submodels, closure, distill=distill)
    hook.remove()
    assert len(seen_alive) == len(nest.submodels) and seen_alive == [0] * len(seen_alive)


def test_custom_backward_is_used_once_per_submodel():
    case, ref_case = FAMILIES["mlp"](seed=2), FAMILIES["mlp"](seed=2)
    nest, ref = sn.wrap(case.model, *case.dims), sn.wrap(ref_case.model, *ref_case.dims)
    calls = []

    def backward(loss):
        calls.append(float(loss.detach()))
        (loss * 2).backward()  # e.g. a loss scaler

    sn.accumulate(nest, nest.submodels, lambda: task_loss(case.model(case.example)), backward=backward)
    sn.accumulate(ref, ref.submodels, lambda: task_loss(ref_case.model(ref_case.example)))
    assert len(calls) == len(nest.submodels)
    for (name, p), q in zip(case.model.named_parameters(), ref_case.model.parameters()):
        torch.testing.assert_close(p.grad, 2 * q.grad, msg=name)


@pytest.fixture
def accelerate_state():
    """Accelerate keeps its state in process-wide singletons: cleared after the test."""
    state = pytest.importorskip("accelerate.state")
    yield
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()


def test_accumulate_without_accelerate_backward_inside_its_accumulation_is_refused(accelerate_state):
    """``with accelerator.accumulate(model):`` around ``sn.accumulate`` without ``backward=accelerator.backward``
    skipped Accelerate's 1/steps: every optimizer step's gradient ``steps`` times too large, silently. Refused
    on the first micro-step, before any forward; with ``backward=`` the step equals one over the whole batch."""
    from accelerate import Accelerator

    case, ref_case = FAMILIES["mlp"](seed=3), FAMILIES["mlp"](seed=3)
    nest, ref = sn.wrap(case.model, *case.dims), sn.wrap(ref_case.model, *ref_case.dims)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = acc.prepare(case.model)
    x = case.example.repeat(2, *[1] * (case.example.dim() - 1))
    halves = x.chunk(2)
    calls = []
    with acc.accumulate(model):
        with pytest.raises(sn.SortedNetError, match="backward=accelerator.backward"):
            sn.accumulate(nest, nest.submodels, lambda: calls.append(1) or task_loss(model(halves[0])))
    assert calls == [] and all(p.grad is None for p in case.model.parameters())
    acc.step = 0  # (the refused call's micro-step again)
    for half in halves:
        with acc.accumulate(model):
            sn.accumulate(nest, nest.submodels, lambda h=half: task_loss(model(h)), backward=acc.backward)
    with acc.accumulate(model):  # a loop that ends off a synchronising micro-step leaves Accelerate's state so:
        pass                      # a model it did not prepare is not refused afterwards
    assert not acc.sync_gradients
    for half in halves:
        sn.accumulate(ref, ref.submodels, lambda h=half: task_loss(ref_case.model(h)) / 2)
    for (name, p), q in zip(case.model.named_parameters(), ref_case.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


class _Holder(torch.nn.Module):
    """What Accelerate returns on several processes: a wrapper (DDP) holding the model, marked as prepared, and
    named the running DDP module during its forward (as DistributedDataParallel does)."""

    require_backward_grad_sync, find_unused_parameters = True, False

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, x):
        from torch.nn.parallel import DistributedDataParallel as DDP

        DDP._active_ddp_module = self
        try:
            return self.module(x)
        finally:
            DDP._active_ddp_module = None


def test_accumulate_without_backward_through_a_prepared_wrapper_on_several_processes_is_refused(
        accelerate_state, monkeypatch):
    """On several processes Accelerate marks the DDP wrapper it returns as prepared, not the model inside: the
    refusal read the model's mark only, so a closure calling the wrapper without backward= trained with a
    gradient ``steps`` times too large on 2 processes (and was refused on 1). Refused on several processes now."""
    import torch.distributed as dist
    from accelerate import Accelerator

    case = FAMILIES["mlp"](seed=3)
    nest = sn.wrap(case.model, *case.dims)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    wrapper = acc.prepare(_Holder(case.model))
    assert getattr(wrapper, "_is_accelerate_prepared", False) and \
        not getattr(case.model, "_is_accelerate_prepared", False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with acc.accumulate(wrapper):
        for call in (wrapper, case.model):  # (the model inside the wrapper: DDP's average skipped as well)
            with pytest.raises(sn.SortedNetError, match="backward=accelerator.backward"):
                sn.accumulate(nest, nest.submodels, lambda c=call: task_loss(c(case.example)))
    assert all(p.grad is None for p in case.model.parameters())


def test_a_model_accelerate_did_not_prepare_is_not_refused_on_several_processes(accelerate_state, monkeypatch):
    """On several processes any sn.accumulate without backward= was refused while Accelerate's state said a
    micro-step did not synchronise, though its model was never prepared (a reference, a teacher, a second nest:
    the message said it was). Refused now only for a forward through the wrapper Accelerate prepared."""
    import torch.distributed as dist
    from accelerate import Accelerator

    case, other = FAMILIES["mlp"](seed=3), FAMILIES["mlp"](seed=4)
    nest = sn.wrap(case.model, *case.dims)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    wrapper = acc.prepare(_Holder(other.model))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with acc.accumulate(wrapper):
        acc.backward(task_loss(wrapper(other.example)))
    assert not acc.sync_gradients
    losses = sn.accumulate(nest, nest.submodels, lambda: task_loss(case.model(case.example)))
    assert len(losses) == len(nest.submodels) and all(p.grad is not None for p in case.model.parameters())


def test_a_closure_that_runs_another_model_is_refused_and_one_running_the_model_in_any_way_is_not():
    """A closure calling a copy of the model taken before sn.wrap trained that copy once per sub-model and
    nothing nested, in silence (every loss the same); so did one running the model in a worker thread, where
    nest.use is not in force. Refused in the first call; a compiled forward (no hook runs), a worker given the
    context, a frozen model feeding a trained head pass."""
    case = FAMILIES["mlp"](seed=2)
    other = copy.deepcopy(case.model)
    nest = sn.wrap(case.model, *case.dims)
    with pytest.raises(sn.SortedNetError, match="ran no forward of the nest's model"):
        sn.accumulate(nest, nest.submodels, lambda: task_loss(other(case.example)))
    assert all(p.grad is None for p in [*case.model.parameters(), *other.parameters()])
    compiled = torch.compile(case.model, backend="eager")

    def serve():  # (a serving thread's forward without gradients, under another sub-model, meanwhile)
        with torch.no_grad(), nest.use(nest.largest):
            case.model(case.example)

    def closure():
        server = threading.Thread(target=serve)
        server.start()
        server.join()
        return task_loss(compiled(case.example))

    losses = sn.accumulate(nest, nest.submodels, closure)
    assert len(set(losses)) == len(losses) and all(p.grad is not None for p in case.model.parameters())

    fresh = sn.wrap(FAMILIES["mlp"](seed=4).model, *FAMILIES["mlp"](seed=4).dims)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # (a worker thread: nest.use is not in force there)
        with pytest.raises(sn.SortedNetError, match="ran the model in another thread"):
            sn.accumulate(fresh, fresh.submodels, lambda: task_loss(pool.submit(fresh.model, case.example).result()))
        assert all(p.grad is None for p in fresh.model.parameters())
        sn.accumulate(fresh, fresh.submodels, lambda: task_loss(
            pool.submit(contextvars.copy_context().run, fresh.model, case.example).result()))

    frozen = FAMILIES["mlp"](seed=3)
    nest2 = sn.wrap(frozen.model.requires_grad_(False), *frozen.dims)
    head = torch.nn.Linear(frozen.model(frozen.example).shape[-1], 3)
    sn.accumulate(nest2, nest2.submodels, lambda: head(frozen.model(frozen.example)).square().mean())
    assert head.weight.grad is not None


class _OwnCrossEntropy(torch.autograd.Function):
    """A loss of one's own as an autograd Function (its node reads only its inputs)."""

    @staticmethod
    def forward(ctx, logits, y):
        ctx.save_for_backward(logits, y)
        return F.cross_entropy(logits, y)

    @staticmethod
    def backward(ctx, g):
        logits, y = ctx.saved_tensors
        return g * (logits.softmax(-1) - F.one_hot(y, logits.shape[-1])) / len(y), None


@pytest.mark.parametrize("how", ["pre_wrap_copy_beside_a_forward_without_gradients", "deep_copy_after_wrap",
                                 "own_loss_function"])
def test_a_closure_whose_loss_reaches_no_parameter_of_the_nest_is_warned_about_once(how):
    """A forward of the model without gradients (logging) beside a loss of a copy taken before sn.wrap passed the
    first-call check (a forward of the model ran) and trained the copy k times, the same loss each time; a deep
    copy of the wrapped model trained instead of it, in silence. Warned once per first call, nothing refused (a
    probe on features taken without gradients does the same on purpose)."""
    from sortednet.train import LossOutsideModelWarning

    case = FAMILIES["mlp"](seed=2)
    pre = copy.deepcopy(case.model)
    nest = sn.wrap(case.model, *case.dims)
    other = copy.deepcopy(case.model) if how == "deep_copy_after_wrap" else pre

    def closure():
        if how.startswith("pre") or how == "own_loss_function":
            with torch.no_grad():
                case.model(case.example)
        if how == "own_loss_function":  # (a custom Function's node: walked through, not taken for the model's)
            out = other(case.example)
            return _OwnCrossEntropy.apply(out, torch.zeros(len(out), dtype=torch.long))
        return task_loss(other(case.example))

    with pytest.warns(LossOutsideModelWarning, match="depends on none of the nest's model's trainable") as seen:
        sn.accumulate(nest, nest.submodels, closure)
    said = [w for w in seen if issubclass(w.category, LossOutsideModelWarning)]
    assert len(said) == 1 and ("only without gradients" in str(said[0].message)) == (how != "deep_copy_after_wrap")
    assert all(p.grad is None for p in case.model.parameters())
    with warnings.catch_warnings():  # (checked in a nest's first call only)
        warnings.simplefilter("error", LossOutsideModelWarning)
        sn.accumulate(nest, nest.submodels, closure)


class _Checkpointed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(4, 8)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                                              torch.nn.Linear(16, 8)) for _ in range(2))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:  # (reentrant: the graph shows the block's inputs, not its parameters)
            h = h + torch.utils.checkpoint.checkpoint(b, h, use_reentrant=True)
        return self.head(h)


def test_reentrant_checkpointing_with_every_trainable_parameter_inside_is_no_loss_outside_the_model():
    """Only the blocks trainable (a frozen base outside them, as a LoRA fine-tune), each run through a reentrant
    checkpoint: the loss's graph shows no parameter of the nest, which the first call's check took for a loss of
    another model. A reentrant checkpoint's node counts as reading the model. A depth
    whose layers are all frozen is refused saying so."""
    from sortednet.train import LossOutsideModelWarning

    torch.manual_seed(0)
    model = _Checkpointed()
    for m in (model.stem, model.head):
        m.requires_grad_(False)
    nest = sn.wrap(model, sn.Width("ffn", [8, 16], out="blocks.*.0", inp="blocks.*.2"))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossOutsideModelWarning)
        sn.accumulate(nest, nest.submodels, lambda: F.cross_entropy(model(x.detach().requires_grad_()), y))
    assert all(b[0].weight.grad is not None for b in model.blocks)
    deep = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    deep[0].requires_grad_(False)
    nest = sn.wrap(deep, sn.Depth("depth", [1, 3], layers=""))
    with pytest.raises(sn.SortedNetError, match=r"loss of depth=1 does not require grad.*run none of the model's "
                                                r"trainable parameters"):
        sn.accumulate(nest, nest.submodels, lambda: F.cross_entropy(deep(x), y))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes (add_note) are Python 3.11+")
def test_an_error_in_the_closure_outside_the_forward_names_the_sub_model_in_force():
    """A head of the user's on the output of a module of the model called on its own (model[0](x), sliced to the
    sub-model's width under nest.use) raised a bare shape error that named nothing; it gets a note."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="2"))
    aux, x = torch.nn.Linear(8, 3), torch.randn(5, 4)
    with pytest.raises(RuntimeError) as info:
        sn.accumulate(nest, [nest.smallest], lambda: model(x).sum() + aux(model[0](x)).sum())
    assert any("raised in the closure of h=4" in n and "model[0](x)" in n for n in info.value.__notes__)
    assert all(p.grad is None for p in [*model.parameters(), *aux.parameters()])


def test_a_sub_model_listed_twice_is_refused_before_any_backward():
    case = FAMILIES["mlp"](seed=2)
    nest = sn.wrap(case.model, *case.dims)
    small = nest.smallest
    for subs in ([small, small], [nest.largest, small, str(small)]):
        with pytest.raises(sn.SortedNetError, match=f"{small} is listed twice.*weights="):
            sn.accumulate(nest, subs, lambda: task_loss(case.model(case.example)))
        assert all(p.grad is None for p in case.model.parameters())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes (add_note) are Python 3.11+")
@pytest.mark.parametrize("fault", ["raises", "not_scalar", "detached", "backward_hook"])
def test_an_error_after_a_backward_says_which_gradients_were_added(fault):
    """accumulate streams one backward per sub-model: a fault at the second leaves the first's gradients in
    ``.grad``, and the error says so (``fit`` zeroes them itself); a fault inside the second's backward (a
    hook) may leave part of its own gradients too, and the note says that as well."""
    case = FAMILIES["mlp"](seed=2)
    nest = sn.wrap(case.model, *case.dims)
    first, second = nest.largest, nest.smallest

    def closure():
        out = case.model(case.example)
        loss = task_loss(out)
        if nest.active != second:
            return loss
        if fault == "backward_hook":
            out.register_hook(lambda g: (_ for _ in ()).throw(ValueError("a fault in a backward hook")))
            return loss
        if fault == "raises":
            raise ValueError("a fault in the user's closure")
        return loss.detach() if fault == "detached" else loss * torch.ones(2)

    with pytest.raises((ValueError, sn.SortedNetError)) as info:
        sn.accumulate(nest, [first, second], closure)
    notes = getattr(info.value, "__notes__", [])
    assert any(f"{first} had already added their gradients" in n for n in notes)
    in_backward = fault == "backward_hook"  # (a detached or non-scalar loss is refused before its backward)
    assert any(f"the backward of {second} raised part-way" in n for n in notes) == in_backward, notes
    assert any(p.grad is not None for p in case.model.parameters())


def test_holding_a_graph_is_detected():
    """Control for the test above: a closure that keeps its output keeps the weak reference alive."""
    case = FAMILIES["mlp"](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    kept, refs = [], []

    def closure():
        out = case.model(case.example)
        kept.append(out)
        refs.append(weakref.ref(out))
        return task_loss(out)

    sn.accumulate(nest, nest.submodels[:2], closure)
    assert refs[0]() is not None


def toy_batch(step: int, vocab: bool = False):
    g = torch.Generator().manual_seed(1000 + step)
    if vocab:
        return torch.randint(0, 20, (4, 7), generator=g), torch.randint(0, 20, (4, 7), generator=g)
    x = torch.randn(32, 12, generator=g)
    return x, (x[:, :5] * torch.arange(1, 6)).argmax(1)


def lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


@pytest.mark.parametrize("cfg", [
    {"strategy": "uniform", "k": 2}, {"strategy": "sandwich", "k": 3}, {"strategy": "all"},
    {"strategy": "uniform", "k": 3, "distill": True}, {"strategy": "weighted", "k": 2, "weights": "large"},
], ids=str)
def test_short_training_improves_every_submodel(cfg):
    cfg = dict(cfg)
    distill = sn.Distill(temperature=2.0, alpha=0.5) if cfg.pop("distill", False) else None
    case = FAMILIES["mlp"](seed=3)
    nest = sn.wrap(case.model, *case.dims)
    sampler = sn.Sampler(nest.submodels, seed=0, **cfg)
    x, y = toy_batch(0)

    def losses():
        with torch.no_grad():
            return {s: float(F.cross_entropy(_run(nest, s, x), y)) for s in nest.submodels}

    before = losses()
    opt = torch.optim.Adam(nest.trainable_parameters(), lr=1e-2)
    for step in range(120):
        xb, yb = toy_batch(step % 8)
        sn.accumulate(nest, sampler.draw(step), lambda xb=xb, yb=yb: (F.cross_entropy(out := case.model(xb), yb), out),
                      distill=distill)
        opt.step()
        opt.zero_grad()
    after = losses()
    assert all(after[s] < 0.8 * before[s] for s in nest.submodels), (before, after)


def _run(nest, sub, x):
    with nest.use(sub):
        return nest.model(x)


def _train(nest, opt, sampler, steps, vocab, distill):
    loss_fn = lm_loss if vocab else F.cross_entropy
    for step in steps:
        x, y = toy_batch(step, vocab)
        sn.accumulate(nest, sampler.draw(step), lambda x=x, y=y: (loss_fn(out := nest.model(x), y), out),
                      distill=distill)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("family,vocab", [("mlp", False), ("lm_width_heads_depth", True)])
@pytest.mark.parametrize("distill", [None, sn.Distill(alpha=0.5)], ids=["plain", "distill"])
def test_resume_from_checkpoint_is_exact(tmp_path, family, vocab, distill):
    total, cut = 12, 5
    case = FAMILIES[family](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    make_opt = lambda n: torch.optim.AdamW(n.trainable_parameters(), lr=3e-3)
    sampler = sn.Sampler(nest.submodels, k=2, strategy="sandwich", seed=11)
    opt = make_opt(nest)
    _train(nest, opt, sampler, range(cut), vocab, distill)
    sn.save(nest, tmp_path / "nest.safetensors")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    (tmp_path / "sampler.json").write_text(json.dumps(sampler.state_dict()))
    _train(nest, opt, sampler, range(cut, total), vocab, distill)       # the uninterrupted run

    fresh = FAMILIES[family](seed=123)                                  # different initial weights
    nest2 = sn.load(fresh.model, tmp_path / "nest.safetensors")
    opt2 = make_opt(nest2)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    sampler2 = sn.Sampler(nest2.submodels, k=1, seed=0)
    sampler2.load_state_dict(json.loads((tmp_path / "sampler.json").read_text()))
    _train(nest2, opt2, sampler2, range(cut, total), vocab, distill)
    a, b = case.model.state_dict(), fresh.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fit_resume_with_start_step_is_exact(tmp_path):
    """Also with the step a numpy integer or a 0-d tensor (read back from an array, a loaded record or a tensor):
    both were refused."""
    batches = [toy_batch(i) for i in range(10)]
    runs = []
    for split in (None, 4, np.int64(4), torch.tensor(4)):
        case = FAMILIES["mlp"](seed=0)
        nest = sn.wrap(case.model, *case.dims)
        opt = torch.optim.SGD(nest.trainable_parameters(), lr=0.1, momentum=0.9)
        sampler = sn.Sampler(nest.submodels, k=2, seed=5)
        if split is None:
            sn.fit(nest, batches, opt, sampler, progress=False)
        else:
            sn.fit(nest, batches[:split], opt, sampler, progress=False)
            sn.save(nest, tmp_path / "n.safetensors")
            state = opt.state_dict()
            fresh = FAMILIES["mlp"](seed=9)
            nest = sn.load(fresh.model, tmp_path / "n.safetensors")
            opt = torch.optim.SGD(nest.trainable_parameters(), lr=0.1, momentum=0.9)
            opt.load_state_dict(state)
            sn.fit(nest, batches[split:], opt, sampler, start_step=split, progress=False)
        runs.append(nest.model.state_dict())
    assert all(torch.equal(runs[0][k], r[k]) for r in runs[1:] for k in runs[0])


@pytest.mark.parametrize("eval_kind", ["pair", "loader"])
def test_fit_split_in_two_calls_with_dropout_and_evaluations_is_exact(eval_kind):
    """A resumed run calls fit twice (and evaluates once more up front): with dropout drawing from torch's
    generator, evaluations (iterating a DataLoader draws a seed) must leave the random state alone."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(12)]
    ex, ey = batches[0]
    ev = (ex, ey) if eval_kind == "pair" else torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ex, ey), batch_size=8)
    runs = []
    for split in (None, 5):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(32, 3))
        nest = sn.wrap(m, sn.Width("h", [8, 16, 32], out="0", inp="3"))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        sampler = sn.Sampler(nest, k=2, strategy="sandwich", seed=0)
        kw = dict(eval_data=ev, eval_every=4, progress=False)
        if split is None:
            sn.fit(nest, batches, opt, sampler, **kw)
        else:
            sn.fit(nest, batches[:split], opt, sampler, **kw)
            sn.fit(nest, batches[split:], opt, sampler, start_step=split, **kw)
        runs.append({k: v.clone() for k, v in m.state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_fit_that_raises_on_a_nonfinite_loss_leaves_no_gradient():
    """nonfinite="raise" after earlier sub-models of the step ran backward: no partial gradient is left for
    the next fit (which then trains exactly as if the bad batch had never come)."""
    x, y = toy_batch(0)
    runs = []
    for bad_first in (False, True):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        nest = sn.wrap(m, sn.Width("h", [8, 16, 32], out="0", inp="2"))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        sampler = sn.Sampler(nest, k=2, strategy="sandwich", seed=0)
        if bad_first:
            def loss(o, t, nest=nest):
                return F.cross_entropy(o, t) * (float("nan") if nest.active == nest.largest else 1.0)
            with pytest.raises(sn.SortedNetError, match="nan"):
                sn.fit(nest, [(x, y)], opt, sampler, loss_fn=loss, nonfinite="raise", progress=False)
            assert all(p.grad is None for p in m.parameters())
            m[0].weight.grad = torch.ones_like(m[0].weight)  # a stale gradient from before fit is not applied
        sn.fit(nest, [(x, y)], opt, sampler, progress=False)
        runs.append(m[0].weight.detach().clone())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes (add_note) are Python 3.11+")
@pytest.mark.parametrize("where", ["loss", "loader", "optimizer"])
def test_fit_stopped_by_an_error_says_how_many_steps_it_made(where):
    """An error (or a Ctrl-C) that stops fit says how many optimizer steps are in the weights and whether
    gradients are left (a run resumes from a checkpoint by that step); accumulate's advice to zero the
    gradients is dropped (fit did)."""
    x, y = toy_batch(0)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    nest = sn.wrap(m, sn.Width("h", [8, 16, 32], out="0", inp="2"))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    calls = [0]

    def loss(o, t):
        calls[0] += 1
        if where == "loss" and calls[0] == 6:  # the second sub-model of the third step (k=2)
            raise ValueError("a fault in the loss")
        return F.cross_entropy(o, t)

    def loader():
        for i in range(5):
            if where == "loader" and i == 3:
                raise OSError("a fault in the loader")
            yield x, y

    if where == "optimizer":
        real = opt.step
        opt.step = lambda *a, **k: real(*a, **k) if calls[0] < 6 else (_ for _ in ()).throw(ValueError("a fault"))
    with pytest.raises((ValueError, OSError)) as info:
        sn.fit(nest, loader(), opt, sn.Sampler(nest, k=2, seed=0), loss_fn=loss, progress=False)
    notes = getattr(info.value, "__notes__", [])
    steps = {"loss": 2, "loader": 3, "optimizer": 2}[where]
    if where == "optimizer":  # (an optimizer that raised may have updated some parameters before)
        assert any(f"stopped in optimizer step {steps} (after {steps} step(s) of this call), while or just after "
                   f"optimizer.step() ran: the weights are those after step {steps} or after step {steps - 1}" in n
                   for n in notes), notes
    else:
        assert any(f"stopped after {steps} optimizer step(s) of this call: the weights are those after step "
                   f"{steps - 1}" in n for n in notes), notes
    left = where == "optimizer"
    assert any(("gradients are left in .grad" if left else "no gradient is left") in n for n in notes), notes
    assert (any(p.grad is not None for p in m.parameters())) == left
    assert not any(n.startswith("sortednet.accumulate:") for n in notes), notes


@pytest.mark.parametrize("loader", ["empty", "drop_last"])
def test_fit_refuses_a_loader_that_yields_no_batch(loader):
    """An empty loader (or drop_last with fewer samples than a batch) returned an empty History: nothing
    trained, and nothing said so."""
    x, y = toy_batch(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    nest = sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"))
    data = [] if loader == "empty" else torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=len(x) + 1, drop_last=True)
    opt, sampler = torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=1)
    with pytest.raises(sn.SortedNetError, match="yielded no batch"):
        sn.fit(nest, data, opt, sampler, progress=False)
    # a run resumed at its last step has no batch left: its final evaluation, nothing trained
    hist = sn.fit(nest, data, opt, sampler, progress=False, start_step=4, eval_data=(x, y))
    assert hist.train == [] and [e["step"] for e in hist.evals] == [4]


def test_fit_refuses_float_targets_for_its_default_loss_before_any_forward():
    """A regression's float targets met the default F.cross_entropy, which reads them as class probabilities:
    fit trained on a meaningless loss (negative values) in silence. Refused before the first forward (the
    BatchNorm statistics stay); a loss of the user's, or F.cross_entropy passed explicitly (soft labels), runs."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", norm="1", inp="3"))
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt, sampler = torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=2, seed=0)
    with pytest.raises(sn.SortedNetError, match=r"torch.float32, shape \(32, 3\).*loss_fn=.*F.mse_loss"):
        sn.fit(nest, [(x, y)] * 3, opt, sampler, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    hist = sn.fit(nest, [(x, y)] * 3, opt, sampler, loss_fn=F.mse_loss, progress=False)
    assert len(hist.train) == 3 and all(v >= 0 for rec in hist.train for v in rec["losses"].values())
    soft = torch.softmax(torch.randn(32, 3), -1)
    assert len(sn.fit(nest, [(x, soft)], opt, sampler, loss_fn=F.cross_entropy, progress=False).train) == 1


def test_fit_over_a_loader_that_cannot_restart_warns_and_keeps_what_trained():
    x, y = toy_batch(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    nest = sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"))
    used = iter([(x, y), (x, y)])

    class Once:  # re-iterable in name only: __iter__ hands out the same iterator
        def __iter__(self):
            return used

    with pytest.warns(RuntimeWarning, match="no batch in epoch 2 after 2 steps"):
        hist = sn.fit(nest, Once(), torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=1), epochs=2,
                      progress=False)
    assert len(hist.train) == 2


def test_sandwich_over_one_submodel_says_what_it_needs():
    nest = sn.wrap(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)),
                   sn.Width("h", [8], out="0", inp="1"))
    with pytest.raises(sn.SortedNetError, match="needs at least 2 sub-models, this sampler has 1"):
        sn.Sampler(nest, k=1, strategy="sandwich")
    with pytest.raises(sn.SortedNetError, match="needs at least 2 sub-models"):
        sn.Sampler(nest, strategy="sandwich")


def test_fit_resumed_evaluates_at_the_same_steps():
    """eval_every counts the run's steps (continued from start_step): a resumed run evaluates where the
    uninterrupted one did."""
    batches = [toy_batch(i) for i in range(12)]
    steps = []
    for split in (None, 5):
        case = FAMILIES["mlp"](seed=0)
        nest = sn.wrap(case.model, *case.dims)
        opt = torch.optim.SGD(nest.trainable_parameters(), lr=0.1)
        sampler = sn.Sampler(nest.submodels, k=2, seed=5)
        kw = dict(eval_data=toy_batch(99), eval_every=4, progress=False)
        if split is None:
            steps.append([e["step"] for e in sn.fit(nest, batches, opt, sampler, **kw).evals])
        else:
            first = sn.fit(nest, batches[:split], opt, sampler, **kw).evals
            rest = sn.fit(nest, batches[split:], opt, sampler, start_step=split, **kw).evals
            steps.append([e["step"] for e in first if e["step"] % 4 == 0] + [e["step"] for e in rest])
    assert steps[0] == steps[1] == [4, 8, 12]


def test_fit_history_and_periodic_evaluation():
    case = FAMILIES["mlp"](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    opt = torch.optim.Adam(nest.trainable_parameters(), lr=1e-2)
    sampler = sn.Sampler(nest.submodels, k=2, strategy="sandwich", seed=0)
    batches = [toy_batch(i) for i in range(5)]
    hist = sn.fit(nest, batches, opt, sampler, epochs=2, eval_data=toy_batch(99), eval_every=4,
                  distill=sn.Distill(), progress=False)
    assert [r["step"] for r in hist.train] == list(range(10))
    assert all(set(r["losses"]) == {str(s) for s in sampler.draw(r["step"])} for r in hist.train)
    assert [e["step"] for e in hist.evals] == [4, 8, 10]
    assert set(hist.last_scores) == {str(s) for s in nest.submodels}
    assert set(hist.mean_loss()) <= {str(s) for s in nest.submodels}
    assert case.model.training                      # (it was in train mode before fit)


def test_fit_trains_in_train_mode_and_gives_every_module_its_mode_back():
    case = FAMILIES["mlp"](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    opt = torch.optim.Adam(nest.trainable_parameters(), lr=1e-2)
    sampler = sn.Sampler(nest.submodels, k=2, strategy="sandwich", seed=0)
    case.model.eval()
    first = next(case.model.children())
    first.train()                                   # a mixed state, as a user may leave it
    seen = []
    hook = case.model.register_forward_pre_hook(  # (the training forwards: not the default loss's first check of
        lambda mod, args: seen.append(mod.training) if torch.is_grad_enabled() else None)  # the output, no_grad)
    sn.fit(nest, [toy_batch(i) for i in range(2)], opt, sampler, progress=False)
    hook.remove()
    assert seen and all(seen)
    assert not case.model.training and first.training
    assert all(not m.training for m in case.model.modules() if m is not case.model and m is not first
               and first not in m.modules() and m not in first.modules())


def test_evaluate_scores_every_submodel_and_restores_mode():
    case = FAMILIES["mlp"](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    x, y = toy_batch(0)
    case.model.train()
    batched = evaluate(nest, [(x[:10], y[:10]), (x[10:], y[10:])])
    whole = evaluate(nest, (x, y))
    assert case.model.training and set(whole) == set(nest.submodels)
    for s in nest.submodels:
        expect = float((_run(nest, s, x).argmax(1) == y).float().mean())
        assert whole[s] == pytest.approx(expect) == batched[s]


def test_soft_loss_properties():
    d = sn.Distill(temperature=3.0)
    t = torch.randn(2, 5, 11)                      # LM-shaped logits
    assert float(d.soft_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(d.soft_loss(torch.randn(2, 5, 11), t)) > 0
    assert float(d.soft_loss(t + 4.0, t)) == pytest.approx(0.0, abs=1e-5)  # shift-invariant like softmax


@pytest.mark.parametrize("dtype,want", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                        (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_soft_loss_keeps_double_precision_and_lifts_half_precision(dtype, want):
    """float64 logits were computed in float32 (a 1e-9 gradient error for double-precision models)."""
    d = sn.Distill(temperature=2.0)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    got = d.soft_loss(s.to(dtype), t.to(dtype))
    assert got.dtype == want
    ref = F.kl_div(F.log_softmax(s.to(dtype).to(want) / 2, -1), F.log_softmax(t.to(dtype).to(want) / 2, -1),
                   reduction="batchmean", log_target=True) * 4
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12 if want == torch.float64 else 1e-6)


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"temperature": float("nan")}, {"alpha": 1.5},
                                    {"alpha": -0.1}, {"temperature": "2"}, {"alpha": True},
                                    {"temperature": torch.tensor([1.0, 2.0])}, {"axis": 1.0}, {"axis": True},
                                    {"axis": "1"}])
def test_bad_distill_raises(kwargs):
    with pytest.raises(sn.SortedNetError):
        sn.Distill(**kwargs)


def test_distill_takes_any_real_number():
    """NumPy scalars and one-element tensors are numbers too (they were refused), stored as floats."""
    import numpy as np

    for t, a in ((np.int64(2), np.float32(0.5)), (torch.tensor(2.0), torch.tensor(0.5)), (2, 0.5)):
        d = sn.Distill(temperature=t, alpha=a)
        assert (d.temperature, d.alpha) == (2.0, 0.5) and type(d.temperature) is float and type(d.alpha) is float


def test_soft_targets_only_ignore_a_nonfinite_task_loss():
    """``alpha=1``: a student's loss is the soft targets alone, so an infinite task loss of that student does
    not make it skipped (``0 * inf`` was NaN)."""
    case, nest = _small()
    x = case.example
    subs = [nest.smallest, nest.largest]

    def closure():
        out = case.model(x)
        task = out.float().square().mean()
        return (task * float("inf") if nest.active == nest.smallest else task), out

    info = sn.accumulate(nest, subs, closure, distill=sn.Distill(2.0, 1.0))
    assert not info.skipped
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in case.model.parameters())


def _small():
    case = FAMILIES["mlp"](seed=0)
    return case, sn.wrap(case.model, *case.dims)


@pytest.mark.parametrize("call,match", [
    (lambda n, c: sn.accumulate(n, [], c), "non-empty"),
    (lambda n, c: sn.accumulate(n, "h1=4", c), "non-empty"),
    (lambda n, c: sn.accumulate(n, ["h1=3"], c), "no size 3"),
    (lambda n, c: sn.accumulate(n, n.submodels[:2], c, weights=[1.0]), "weights"),
    (lambda n, c: sn.accumulate(n, n.submodels[:2], c, weights=[1.0, -1.0]), "weights"),
    (lambda n, c: sn.accumulate(n, n.submodels[:2], c, weights=["a", 1]), "weights"),
    (lambda n, c: sn.accumulate(n, n.submodels[:2], c, distill=0.5), "Distill"),
    (lambda n, c: sn.accumulate(n, n.submodels[:2], lambda: c()[1]), "scalar"),
    (lambda n, c: sn.accumulate(n, n.submodels[:2], lambda: c()[0], distill=sn.Distill()), "logits"),
    (lambda n, c: sn.accumulate(n, n.submodels[:2], lambda: (c()[0], c()[1], None, 1)), "4 values"),
    (lambda n, c: sn.accumulate(n, n.submodels[:2], lambda: c()[0].detach()), "require grad"),
    (lambda n, c: sn.accumulate(n, n.submodels[:2], lambda batch: c()[0]), "no arguments"),
    (lambda n, c: sn.accumulate(n, n.submodels[:2], lambda: c()[0], backward=lambda: None), "backward="),
])
def test_accumulate_bad_arguments_raise_before_any_gradient(call, match):
    case, nest = _small()

    def closure():
        out = case.model(case.example)
        return task_loss(out), out

    with pytest.raises(sn.SortedNetError, match=match):
        call(nest, closure)
    assert all(p.grad is None for p in case.model.parameters())


@pytest.mark.parametrize("kwargs,match", [({"epochs": 0}, "epochs"), ({"eval_every": 0}, "eval_every")])
def test_fit_bad_arguments(kwargs, match):
    case, nest = _small()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    with pytest.raises(sn.SortedNetError, match=match):
        sn.fit(nest, [toy_batch(0)], opt, sn.Sampler(nest.submodels, k=1), progress=False, **kwargs)
    other = FAMILIES["mlp"](seed=0, h1=8)
    other_nest = sn.wrap(other.model, *other.dims)
    with pytest.raises(sn.SortedNetError, match="sampler"):
        sn.fit(nest, [toy_batch(0)], opt, sn.Sampler(other_nest.submodels, k=1), progress=False)
    with pytest.raises(sn.SortedNetError, match="Sampler"):
        sn.fit(nest, [toy_batch(0)], opt, nest.submodels, progress=False)
    with pytest.raises(sn.SortedNetError, match="iterate again"):  # a one-shot iterator has one epoch only
        sn.fit(nest, iter([toy_batch(0)]), opt, sn.Sampler(nest.submodels, k=1), epochs=2, progress=False)


def test_demo_runs_and_reports_every_submodel(tmp_path, capsys):
    """examples/train_digits.py (``make demo``) end to end, one epoch."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "train_digits.py")
    spec = importlib.util.spec_from_file_location("train_digits_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    scores = demo.main(["--epochs", "1", "--quiet", "--table", str(tmp_path / "table.md")])
    out = capsys.readouterr().out
    assert len(scores) >= 160 and all(0 <= v <= 1 for v in scores.values())
    assert (tmp_path / "table.md").read_text().count("\n") == len(scores) + 2
    assert out.count("nest.pick") == 1 and out.count("params <=") == 3
    (tmp_path / "afile").write_text("")
    (tmp_path / "link.md").symlink_to(tmp_path / "target.md")  # (dangling: the check leaves the link as it is)
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0", "--quiet", "--table", str(tmp_path / "link.md")])  # (refused after the check)
    assert (tmp_path / "link.md").is_symlink() and not (tmp_path / "target.md").exists()
    for name in ("t.md", "x" * 300):  # (the check passes, then --epochs 0 is refused; or the check fails)
        with pytest.raises(SystemExit):
            demo.main(["--epochs", "0", "--quiet", "--table", str(tmp_path / "new" / "sub" / name)])
        assert not (tmp_path / "new").exists()
    capsys.readouterr()
    for table in (str(tmp_path), str(tmp_path / "afile" / "t.md"), "", str(tmp_path / "afile" / "sub" / "t.md"),
                  str(tmp_path / "new") + os.sep):  # (said before training, not after it)
        with pytest.raises(SystemExit):
            demo.main(["--epochs", "1", "--quiet", "--table", table])
        assert "no path a file can be written to" in capsys.readouterr().err


# -- non-finite losses: one NaN sub-model must not poison the shared gradients -------------------------
def _poisoned(nest, bad, x, *, value=float("nan"), logits=False):
    """Closure whose loss is ``value`` (NaN / inf) for the sub-model ``bad``, finite otherwise."""
    def closure():
        out = nest.model(x)
        loss = task_loss(out)
        if nest.active == bad:
            loss = loss * value
        return (loss, out) if logits else loss
    return closure


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("family", ["mlp", "tied_lm"])
def test_nonfinite_loss_is_refused_by_default(family, value):
    case = FAMILIES[family](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    subs = [nest.smallest, nest.submodels[len(nest.submodels) // 2], nest.largest]
    with pytest.raises(sn.SortedNetError, match=f"loss of {subs[1]} is {value}"):
        sn.accumulate(nest, subs, _poisoned(nest, subs[1], case.example, value=value))
    assert all(torch.isfinite(g).all() for g in grads(case.model).values())


@pytest.mark.parametrize("distill", [None, sn.Distill(alpha=0.5)], ids=["plain", "distill"])
@pytest.mark.parametrize("family", ["mlp", "tied_lm"])
def test_nonfinite_loss_skip_equals_training_without_it(family, distill):
    case, ref_case = FAMILIES[family](seed=0), FAMILIES[family](seed=0)
    nest, ref = sn.wrap(case.model, *case.dims), sn.wrap(ref_case.model, *ref_case.dims)
    subs = [nest.smallest, nest.submodels[len(nest.submodels) // 2], nest.largest]
    bad = subs[0]
    with _nonfinite_warns(match=str(bad)):
        losses = sn.accumulate(nest, subs, _poisoned(nest, bad, case.example, logits=distill is not None),
                               distill=distill, nonfinite="skip")
    assert losses.skipped == (bad,) and math.isnan(losses[0]) and all(math.isfinite(v) for v in losses[1:])
    good = subs[1:]
    want = sn.accumulate(ref, good, _poisoned(ref, None, ref_case.example, logits=distill is not None),
                         distill=distill, weights=[1 / len(subs)] * len(good))
    assert want == losses[1:]
    for (n, g), (_, h) in zip(grads(case.model).items(), grads(ref_case.model).items()):
        assert torch.isfinite(g).all() and torch.equal(g, h), n


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_nonfinite_teacher_is_skipped_and_gives_no_soft_target(alpha):
    """The students' soft term is absent that step, not replaced: ``(1 - alpha) * task_loss`` alone (``alpha=1``,
    soft targets only: no gradient at all; it used to switch them to the full task loss in silence)."""
    case, ref_case = FAMILIES["mlp"](seed=0), FAMILIES["mlp"](seed=0)
    nest, ref = sn.wrap(case.model, *case.dims), sn.wrap(ref_case.model, *ref_case.dims)
    subs = [nest.smallest, nest.submodels[1], nest.largest]
    with _nonfinite_warns(match="no soft target this step"):
        losses = sn.accumulate(nest, subs, _poisoned(nest, nest.largest, case.example, logits=True),
                               distill=sn.Distill(alpha=alpha), nonfinite="skip")
    assert losses.skipped == (nest.largest,) and all(math.isfinite(v) for v in losses[:2])
    got = grads(case.model)
    if alpha == 1:
        assert all(not g.any() for g in got.values())
        return
    sn.accumulate(ref, subs[:2], lambda: task_loss(ref_case.model(ref_case.example)),
                  weights=[(1 - alpha) / 3] * 2)
    for (n, g), h in zip(got.items(), grads(ref_case.model).values()):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7, msg=n)


def test_nonfinite_ignore_backpropagates_like_plain_pytorch():
    case = FAMILIES["mlp"](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    losses = sn.accumulate(nest, [nest.smallest], _poisoned(nest, nest.smallest, case.example), nonfinite="ignore")
    assert losses.skipped == () and math.isnan(losses[0])
    assert not torch.isfinite(case.model.fc1.weight.grad).all()
    with pytest.raises(sn.SortedNetError, match="nonfinite="):
        sn.accumulate(nest, [nest.smallest], lambda: task_loss(case.model(case.example)), nonfinite="drop")


def test_fit_skips_nonfinite_losses_by_default():
    case = FAMILIES["mlp"](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    opt = torch.optim.Adam(nest.trainable_parameters(), lr=1e-2)
    sampler = sn.Sampler(nest.submodels, k=2, strategy="sandwich", seed=0)
    bad_step = 3

    def loss_fn(out, y, calls=[0]):  # noqa: B006  (counts calls: 2 sub-models per step)
        calls[0] += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if (calls[0] - 1) // 2 == bad_step and nest.active == nest.smallest else loss

    with _nonfinite_warns():
        hist = sn.fit(nest, [toy_batch(i) for i in range(6)], opt, sampler, loss_fn=loss_fn, progress=False)
    assert [r.get("skipped") for r in hist.train] == [None] * bad_step + [[str(nest.smallest)]] + [None] * 2
    assert all(torch.isfinite(p).all() for p in case.model.parameters())
    assert all(math.isfinite(v) for v in hist.mean_loss().values())
    with pytest.raises(sn.SortedNetError, match="non-finite|poison"):
        sn.fit(nest, [toy_batch(0)], opt, sn.Sampler(nest.submodels, k=2, strategy="sandwich", seed=0),
               loss_fn=lambda o, y: F.cross_entropy(o, y) * float("nan"), progress=False, nonfinite="raise")


# -- exact resume after SIGKILL: dropout + Adam + LR schedule, RNG state in the checkpoint --------------
RESUME_SCRIPT = r'''
import os, sys
import torch
torch.set_num_threads(1)                      # one intra-op thread: bit-exact across processes
import torch.nn as nn
import sortednet as sn
from sortednet.rng import rng_state, set_rng_state

mode, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]
TOTAL, EVERY = 24, 4


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 32), nn.ReLU(),
                          nn.Dropout(0.3), nn.Linear(32, 5))
    dims = [sn.Width("h1", [8, 16, 32], out="0", inp="3"), sn.Width("h2", [8, 32], out="3", inp="6")]
    return model, dims


def batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(16, 12, generator=g)
    return x, (x[:, :5] * torch.arange(1, 6)).argmax(1)


def training(nest):
    opt = torch.optim.Adam(nest.trainable_parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL)
    return opt, sched, sn.Sampler(nest.submodels, k=2, strategy="sandwich", seed=3)


calls = 0


def stalling_loss(out, y):                    # stops in the middle of step 11 (2 sub-models a step) until killed
    global calls
    calls += 1
    if calls == 2 * 10 + 1:
        print("mid-run", flush=True)
        sys.stdin.readline()                  # the test kills the process here: no timing involved
    return torch.nn.functional.cross_entropy(out, y)


batches = [batch(i) for i in range(TOTAL)]


def resume(with_rng):                         # from the newest whole checkpoint
    model, _ = build()
    last = max((d for d in os.listdir(ckpt) if d.startswith("step-")), key=lambda d: int(d[5:]))
    nest = sn.load(model, os.path.join(ckpt, last, "nest.safetensors"))
    opt, sched, sampler = training(nest)
    state = torch.load(os.path.join(ckpt, last, "train.pt"))
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    sampler.load_state_dict(state["sampler"])
    if with_rng:
        set_rng_state(state["rng"])
    step = state["step"]
    sn.fit(nest, batches[step:], opt, sampler, scheduler=sched, start_step=step, progress=False)
    return model.state_dict(), step


if mode == "killed":                          # checkpoints every EVERY steps until it is killed
    model, dims = build()
    nest = sn.wrap(model, *dims)
    opt, sched, sampler = training(nest)
    torch.manual_seed(1234)
    for start in range(0, TOTAL, EVERY):
        sn.fit(nest, batches[start:start + EVERY], opt, sampler, scheduler=sched, start_step=start,
               loss_fn=stalling_loss, progress=False)
        tmp = os.path.join(ckpt, f".tmp-{start + EVERY}")
        os.makedirs(tmp)
        sn.save(nest, os.path.join(tmp, "nest.safetensors"))
        torch.save({"step": start + EVERY, "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "sampler": sampler.state_dict(), "rng": rng_state()}, os.path.join(tmp, "train.pt"))
        os.replace(tmp, os.path.join(ckpt, f"step-{start + EVERY}"))   # a checkpoint is whole or absent
        print("ckpt", start + EVERY, flush=True)
    torch.save(model.state_dict(), out)
else:                                         # the uninterrupted run, then both resumptions
    model, dims = build()
    nest = sn.wrap(model, *dims)
    opt, sched, sampler = training(nest)
    torch.manual_seed(1234)
    sn.fit(nest, batches, opt, sampler, scheduler=sched, progress=False)
    with_rng, step = resume(True)
    without_rng, _ = resume(False)
    torch.save({"full": model.state_dict(), "resume": with_rng, "resume_without_rng": without_rng}, out)
    print("resumed from", step, flush=True)
'''


def test_fit_resumed_after_sigkill_is_bit_exact(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    proc = subprocess.Popen([sys.executable, str(script), "killed", str(ckpt), str(tmp_path / "killed.pt")],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed = []
    try:
        for line in proc.stdout:
            printed.append(line.strip())
            if line.strip() == "mid-run":         # stopped inside step 11's fit, after the checkpoint of step 8
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert printed == ["ckpt 4", "ckpt 8", "mid-run"]
    assert not (tmp_path / "killed.pt").exists()
    r = subprocess.run([sys.executable, str(script), "after", str(ckpt), str(tmp_path / "after.pt")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) == 8
    got = torch.load(tmp_path / "after.pt")
    want = got["full"]
    assert all(torch.equal(want[k], got["resume"][k]) for k in want)
    # the control: without the generators' state the dropout masks differ, and so do the weights
    assert not all(torch.equal(want[k], got["resume_without_rng"][k]) for k in want)


class _OneArgument:
    def __call__(self, out):
        return out.sum()


class _OneTensor(torch.nn.Module):
    def forward(self, a):
        return a.sum()


class _PairLoss(torch.nn.Module):
    """A loss whose forward takes one pair; a forward pre-hook packs ``(output, target)`` into it."""

    def __init__(self):
        super().__init__()
        self.register_forward_pre_hook(lambda mod, args: ((args[0], args[1]),))

    def forward(self, pair):
        return F.cross_entropy(*pair)


@pytest.mark.parametrize("how", ["partial", "compiled", "partial_of_compiled"])
def test_a_module_loss_of_the_wrong_arity_behind_partial_or_compile_is_refused_before_the_forward(how, fresh_dynamo):
    """partial(module) and torch.compile(module) read as (*args, **kwargs): the loss ran after a training forward
    had moved BatchNorm's statistics and the RNG, then a raw TypeError."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                            torch.nn.Linear(8, 3))
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="3", norm="1"))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    wrong = {"partial": functools.partial(_OneTensor()), "compiled": torch.compile(_OneTensor()),
             "partial_of_compiled": functools.partial(torch.compile(_OneTensor()))}[how]
    before, rng = {k: v.clone() for k, v in m.state_dict().items()}, torch.get_rng_state()
    with pytest.raises(sn.SortedNetError, match=r"loss_fn\(output, target\)"):
        sn.fit(nest, [(x, y)], torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=1), loss_fn=wrong,
               progress=False)
    with pytest.raises(sn.SortedNetError, match="function of the scaled loss"):
        sn.accumulate(nest, nest.submodels, lambda: F.cross_entropy(m(x), y),
                      backward={"partial": functools.partial(_OneTensor(), 1),
                                "compiled": torch.compile(lambda: None),
                                "partial_of_compiled": functools.partial(torch.compile(_OneTensor()), 1)}[how])
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_a_module_loss_whose_forward_pre_hook_adapts_the_arguments_is_taken():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2"))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    hist = sn.fit(nest, [(x, y)], torch.optim.SGD(m.parameters(), lr=0.0), sn.Sampler(nest, k=1, seed=0),
                  loss_fn=_PairLoss(), progress=False)
    sub = next(iter(hist.train[0]["losses"]))
    with torch.no_grad(), nest.use(sub):
        assert hist.train[0]["losses"][sub] == pytest.approx(float(F.cross_entropy(m(x), y)))


class _EpochScheduler:
    """A timm-style scheduler: ``step(epoch, metric=None)``, which fit's ``scheduler.step()`` cannot call."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self, epoch, metric=None):
        pass


def test_fit_and_evaluate_refuse_bad_arguments_before_anything_changes():
    import torch.nn as nn

    from sortednet.train import evaluate

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2"))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    opt, sampler = torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=1)
    before = [p.detach().clone() for p in m.parameters()]
    for kw, needle in [({"start_step": -1}, "start_step"), ({"nonfinite": "bogus"}, "nonfinite"),
                       ({"eval_every": True}, "eval_every"), ({"device": "bogus"}, "device"),
                       ({"eval_data": iter([(x, y)]), "eval_every": 1}, "eval_data"),
                       ({"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt)},
                        r"scheduler=ReduceLROnPlateau\) needs a metric at each step"),
                       ({"scheduler": _EpochScheduler(opt)}, r"_EpochScheduler.step needs one"),
                       ({"loss_fn": lambda out: out.sum()}, r"loss_fn\(output, target\)"),
                       ({"loss_fn": _OneArgument()}, r"loss_fn\(output, target\)"),
                       ({"eval_data": (x, y), "metric": lambda out: 1.0}, r"metric\(output, target\)")]:
        with pytest.raises(sn.SortedNetError, match=needle):
            sn.fit(nest, [(x, y)], opt, sampler, progress=False, **kw)
        assert not m.training and all(torch.equal(a, b) for a, b in zip(m.parameters(), before))
    for data in ([(x, y, y)], [(x, torch.tensor(1))], {"x": x}):
        with pytest.raises(sn.SortedNetError, match="inputs, target"):
            evaluate(nest, data)
    with pytest.raises(sn.SortedNetError, match="fails on the data"):
        evaluate(nest, (torch.randn(6, 5), y))
    with pytest.raises(sn.SortedNetError, match=r"metric\(output, target\)"):
        evaluate(nest, (x, y), metric=lambda out: 1.0)
    seq = torch.randint(0, 3, (6, 5))  # a target per token: the default accuracy counts tokens, at most 1
    model2 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    nest2 = sn.wrap(model2, sn.Width("h", [4, 8], out="0", inp="2"))
    assert all(0 <= v <= 1 for v in evaluate(nest2, (torch.randn(6, 5, 4), seq)).values())


def test_evaluate_takes_one_pair_with_structured_inputs_and_custom_metrics_of_any_target():
    import torch.nn as nn

    from sortednet.train import evaluate

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x, z):
            return self.b(torch.relu(self.a(x + z)))

    torch.manual_seed(0)
    m = Two()
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="a", inp="b"))
    x, z, y = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 3, (6,))
    want = evaluate(nest, [((x, z), y)])
    assert evaluate(nest, ((x, z), y)) == want == evaluate(nest, ({"x": x, "z": z}, y))
    labels = [str(int(v)) for v in y]
    def metric(out, t):
        return sum(str(int(p)) == q for p, q in zip(out.argmax(-1), t))

    assert evaluate(nest, [((x, z), labels)], metric=metric) == want  # targets of any kind, in a list of batches


@pytest.mark.parametrize("target", ["tuple", "dict", "pair", "per_example", "scalars", "batch_encoding"])
def test_a_custom_metric_is_divided_by_the_examples_of_a_structured_target_not_its_length(target):
    from sortednet.train import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="2"))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    want = evaluate(nest, (x, y))
    if target in ("dict", "batch_encoding"):
        from transformers import BatchEncoding

        labels = {"labels": y, "w": torch.ones(16)}
        got = evaluate(nest, [(x, labels if target == "dict" else BatchEncoding(labels))],
                       metric=lambda o, t: (o.argmax(-1) == t["labels"]).sum())
    elif target in ("per_example", "scalars"):  # a list of one tensor per example (2 labels each; 0-d)
        per = [torch.stack([v, v]) if target == "per_example" else v for v in y]
        got = evaluate(nest, [(x, per)],
                       metric=lambda o, t: (o.argmax(-1) == torch.stack(t).reshape(16, -1)[:, 0]).sum())
    else:  # one (inputs, (labels, weights)) pair, alone or in a list of batches
        data = (x, (y, torch.ones(16)))
        got = evaluate(nest, data if target == "pair" else [data], metric=lambda o, t: (o.argmax(-1) == t[0]).sum())
    assert got == want  # (it was divided by 2, the tuple's / dict's length: 3.5 for an accuracy of 0.4375)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    hist = sn.fit(nest, [(x, y)], opt, sn.Sampler(nest.submodels, k=1, seed=0), eval_data=[(x, (y, y))],
                  metric=lambda o, t: (o.argmax(-1) == t[1]).sum(), progress=False)
    assert hist.last_scores == {str(s): v for s, v in want.items()}


@pytest.mark.parametrize("target", [(torch.zeros(16), torch.zeros(15)), ([1, 2], [3, 4]), ({"a": 1},)])
def test_a_target_whose_examples_cannot_be_counted_is_refused_for_a_custom_metric(target):
    from sortednet.train import evaluate

    nest = sn.wrap(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)),
                   sn.Width("h", [4, 8], out="0", inp="1"))
    with pytest.raises(sn.SortedNetError, match="cannot tell how many examples the target of batch 0 holds"):
        evaluate(nest, [(torch.randn(16, 4), target)], metric=lambda o, t: 1.0)


@pytest.mark.parametrize("bad", ["list_targets", "wrong_width", "empty_targets"])
def test_fit_refuses_a_malformed_eval_set_before_the_first_step(bad):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="0", inp="2"))
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    eval_data = {"list_targets": (x, y.tolist()), "wrong_width": (x[:, :3], y), "empty_targets": (x, y[:0])}[bad]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match="evaluate"):
        sn.fit(nest, [(x, y)] * 10, opt, sn.Sampler(nest.submodels, k=2, seed=0), eval_data=eval_data,
               eval_every=5, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not opt.state


def test_a_skipped_nonfinite_batch_names_the_batchnorms_its_forward_poisoned():
    """A NaN in the input: the loss is skipped (no backward), but the forward already wrote NaN into the
    BatchNorm running statistics, after which every evaluation is NaN. The warning now says so."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="3", norm="1"))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    x[3, 0] = float("nan")
    with _nonfinite_warns(match=r"non-finite BatchNorm running statistics in \['1'\]"):
        losses = sn.accumulate(nest, [nest.largest], lambda: F.cross_entropy(model(x), y), nonfinite="skip")
    assert losses.skipped == (nest.largest,) and model[0].weight.grad is None
    model[1].reset_running_stats()
    with _nonfinite_warns() as rec:  # a finite batch whose loss is NaN: none named
        sn.accumulate(nest, [nest.largest], lambda: F.cross_entropy(model(x.nan_to_num()), y) * float("nan"),
                      nonfinite="skip")
    assert "BatchNorm" not in str(rec[0].message)


def test_mean_loss_leaves_out_every_skipped_sub_model():
    """A student skipped for a non-finite distillation term keeps a finite task loss in the record: it was never
    backpropagated, so the mean leaves it out (as the progress bar does)."""
    from sortednet.train import History

    h = History(train=[{"step": 0, "losses": {"h=4": 1.0, "h=8": 0.5}},
                       {"step": 1, "losses": {"h=4": 9.0, "h=8": 0.3}, "skipped": ["h=4"]},
                       {"step": 2, "losses": {"h=4": float("nan"), "h=8": 0.1}, "skipped": ["h=4"]}])
    assert h.mean_loss() == {"h=4": 1.0, "h=8": pytest.approx(0.3)}


def _tiny_classifier(out: int = 2, seed: int = 0):
    import torch.nn as nn

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out))
    return m, sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2"))


@pytest.mark.parametrize("case", ["column", "float", "one_logit"])
def test_default_accuracy_refuses_targets_it_cannot_score(case):
    """Argmax accuracy against a (B, 1) column broadcast to (B, B) (scores above 1); against float targets or
    one logit it scored 0 whatever the model did: each is refused, naming the shapes / dtype and metric=."""
    m, nest = _tiny_classifier(out=1 if case == "one_logit" else 2)
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    target = {"column": y[:, None], "float": y.float(), "one_logit": y}[case]
    needle = {"column": r"shape \(10,\) with targets of shape \(10, 1\)", "float": "torch.float32",
              "one_logit": r"shape \(10, 1\)"}[case]
    with pytest.raises(sn.SortedNetError, match=needle):
        evaluate(nest, (x, target))
    with pytest.raises(sn.SortedNetError, match="metric="):
        evaluate(nest, (x, target))


def test_default_accuracy_scores_bool_and_narrow_integer_targets_as_classes():
    m, nest = _tiny_classifier(out=3)
    x, y = torch.randn(12, 4), torch.randint(0, 2, (12,))
    want = evaluate(nest, (x, y))
    assert evaluate(nest, (x, y.bool())) == want == evaluate(nest, (x, y.to(torch.uint8)))
    _, wide = _tiny_classifier(out=200)  # uint8 class 156 is -100 wrapped: a class, not the ignore index
    y = torch.full((12,), 156)
    y[:6] = 3
    assert evaluate(wide, (x, y.to(torch.uint8))) == evaluate(wide, (x, y))


def test_default_accuracy_leaves_out_the_ignore_index():
    """Tokens labelled -100 (F.cross_entropy's ignore index: padding, prompt) are neither right nor wrong."""
    m, nest = _tiny_classifier(out=3)
    x, y = torch.randn(4, 5, 4), torch.randint(0, 3, (4, 5))
    y[:, :2] = -100
    y[0] = -100
    got = evaluate(nest, (x, y))
    for s in nest.submodels:
        with torch.no_grad(), nest.use(s):
            pred = m(x).argmax(-1)
        keep = y != -100
        assert got[s] == pytest.approx(float((pred[keep] == y[keep]).float().mean()))
    with pytest.raises(sn.SortedNetError, match="ignore index"):
        evaluate(nest, (x, torch.full((4, 5), -100)))


def test_fit_scores_eval_data_with_its_metric_and_refuses_regression_targets_without_one():
    """fit(eval_data=) of a regression scored 'accuracy 0.0' at every evaluation: refused before training now;
    metric= scores it (the same number evaluate gives with that metric)."""
    m, nest = _tiny_classifier(out=1)
    x = torch.randn(32, 4)
    y = x.sum(1, keepdim=True)
    opt, sampler = torch.optim.SGD(m.parameters(), lr=0.05), sn.Sampler(nest, strategy="all")
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(sn.SortedNetError, match="metric="):
        sn.fit(nest, [(x, y)] * 3, opt, sampler, loss_fn=F.mse_loss, eval_data=(x, y), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), before))

    def neg_sse(out, t):
        return -F.mse_loss(out, t, reduction="sum")

    hist = sn.fit(nest, [(x, y)] * 3, opt, sampler, loss_fn=F.mse_loss, eval_data=(x, y), eval_every=2,
                  metric=neg_sse, progress=False)
    assert [e["step"] for e in hist.evals] == [2, 3]
    want = evaluate(nest, (x, y), metric=neg_sse)
    assert hist.last_scores == {str(s): pytest.approx(v) for s, v in want.items()}
    assert all(v < 0 for v in hist.last_scores.values())
    for kw, needle in [({"metric": "mse"}, "callable"), ({"metric": neg_sse, "eval_data": None}, "no eval_data")]:
        with pytest.raises(sn.SortedNetError, match=needle):
            sn.fit(nest, [(x, y)], opt, sampler, loss_fn=F.mse_loss, progress=False, **kw)


def test_history_mean_loss_window():
    from sortednet.train import History

    h = History(train=[{"step": i, "losses": {"a": float(i)}} for i in range(10)])
    assert h.mean_loss(2) == {"a": 8.5} and h.mean_loss(None) == {"a": 4.5} == h.mean_loss(100)
    assert h.mean_loss(np.int64(2)) == {"a": 8.5}
    for bad in (0, -2, 1.5, True):
        with pytest.raises(sn.SortedNetError, match="mean_loss"):
            h.mean_loss(bad)


def test_fit_drops_calibration_of_the_weights_it_trains():
    """Calibrated per-sub-model BatchNorm statistics describe the weights before fit: evaluations inside fit read
    them (stale) after training; fit drops them with a warning, and its scores are those of the shared
    statistics."""
    import torch.nn as nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", norm="1", inp="3"))
    x = torch.randn(32, 4)
    y = (x[:, 0] > 0).long()
    nest.calibrate([x * 5 + 3], batches=1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for loader, kw in (([], {}), ([(x * float("nan"), y)], {"nonfinite": "raise"})):  # refused: nothing trained
        with pytest.raises(sn.SortedNetError):
            sn.fit(nest, loader, opt, sn.Sampler(nest, strategy="all"), progress=False, **kw)
        assert m[1]._sn.norm is not None
    with pytest.warns(UserWarning, match=r"describe \('1'\): dropped them"):
        hist = sn.fit(nest, [(x, y)] * 3, opt, sn.Sampler(nest, strategy="all"), eval_data=(x, y), progress=False)
    assert m[1]._sn.norm is None
    want = {str(s): v for s, v in evaluate(nest, (x, y)).items()}  # (NaN: the refused NaN batch's statistics)
    assert hist.last_scores.keys() == want.keys()
    assert all(v == want[k] or (math.isnan(v) and math.isnan(want[k])) for k, v in hist.last_scores.items())


def test_accumulate_refuses_a_weight_beyond_float32():
    """``weights=[1e39, 1e39]``: finite numbers, infinite once they scale a float32 loss; the losses were finite, so
    nothing was refused under nonfinite='raise', and every gradient was NaN."""
    m, nest = _tiny_classifier()
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    sn.accumulate(nest, list(nest.submodels), lambda: F.cross_entropy(m(x), y), weights=[1e30, 1e30])  # (finite)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    m.zero_grad(set_to_none=True)
    with pytest.raises(sn.SortedNetError, match=r"weights: 1e\+39 is beyond float32"):
        sn.accumulate(nest, list(nest.submodels), lambda: F.cross_entropy(m(x), y), weights=[1e39, 1e39])
    assert all(p.grad is None for p in m.parameters())


def test_sampler_weights_whose_ratio_underflows_are_refused_by_name():
    m, nest = _tiny_classifier()
    for kw in ({"strategy": "weighted", "weights": [1e-300, 1e308], "k": 1},
               {"strategy": "all", "loss_weights": [1e-300, 1e308]}):
        with pytest.raises(sn.SortedNetError, match=r"1e-300 for h=4 is positive but too small"):
            sn.Sampler(nest, **kw)


def test_fit_stopped_by_a_ctrl_c_at_any_point_says_truly_where_it_stopped():
    """At every point where Python could raise a Ctrl-C inside fit's own code: the note's step count matches
    the weights (a step whose update may or may not be in them is said to be so), a scheduler left one step
    behind the optimizer is named, and every module's training flag is back (the model was in eval mode)."""
    from sortednet.train import _fit_loop, fit

    x, y = toy_batch(0)

    def setup():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)).eval()
        nest = sn.wrap(m, sn.Width("h", [8, 16, 32], out="0", inp="2"))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return m, nest, opt, sched

    def fit_run(m, nest, opt, sched, steps=3):
        sn.fit(nest, [(x, y)] * steps, opt, sn.Sampler(nest, k=2, seed=0), scheduler=sched, progress=False)

    after = []
    for k in range(4):  # the weights after k steps
        m, *rest = setup()
        if k:
            fit_run(m, *rest, steps=k)
        after.append([p.detach().clone() for p in m.parameters()])

    def holds(m, k):
        return all(torch.equal(p, q) for p, q in zip(m.parameters(), after[k]))

    n, fired = 0, True
    while fired:
        n += 1
        notes: list[str] = []
        m, nest, opt, sched = setup()

        def call(args=(m, nest, opt, sched), notes=notes):
            try:
                fit_run(*args)
            except KeyboardInterrupt as e:
                notes.extend(getattr(e, "__notes__", []))
                raise

        fired = interrupted_between_bytecodes(n, call, fit, _fit_loop)
        assert not any(mod.training for mod in m.modules()), f"point {n}: modules left in training mode"
        if not fired:
            assert holds(m, 3)
            break
        note = next((t for t in notes if t.startswith("sortednet.fit:")), None)
        if note is None:  # (stopped before fit's try, or after it: nothing trained, or all of it)
            assert holds(m, 0) or holds(m, 3), f"point {n}: no note, weights of a step in between"
            continue
        exact = re.search(r"stopped after (\d+) optimizer step\(s\)", note)
        maybe = re.search(r"the weights are those after step (\d+) or (after step (\d+)|as they were)", note)
        if exact:
            steps = int(exact[1])
            assert holds(m, steps), f"point {n}: {note}"
            if "one behind the optimizer" not in note:
                assert sched.last_epoch == steps, f"point {n}: scheduler at {sched.last_epoch}: {note}"
        elif maybe:
            assert holds(m, int(maybe[1]) + 1) or holds(m, int(maybe[1])), f"point {n}: {note}"
        else:
            assert "before its first optimizer step" in note and holds(m, 0), f"point {n}: {note}"
            assert sched.last_epoch == 0
    assert n > 30, f"only {n - 1} points reached"


def _token_model(seed=0, vocab=11, hidden=16):
    """Per-position logits (no mixing across positions): a padded position's token reaches only its own logits."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                                torch.nn.Linear(hidden, vocab))
    return model, sn.wrap(model, sn.Width("h", [4, 8, 16], out="1", inp="3"))


def _padded_batches(garbage_seed, steps=3, vocab=11):
    """(tokens, targets): the last positions of some rows are padding (target -100), filled with tokens drawn by
    ``garbage_seed``; the rest is the same for every seed."""
    g, junk = torch.Generator().manual_seed(0), torch.Generator().manual_seed(garbage_seed)
    out = []
    for _ in range(steps):
        x = torch.randint(0, vocab, (4, 6), generator=g)
        y = torch.randint(0, vocab, (4, 6), generator=g)
        pad = torch.arange(6) >= torch.tensor([6, 3, 4, 2])[:, None]
        x = torch.where(pad, torch.randint(0, vocab, (4, 6), generator=junk), x)
        out.append((x, y.masked_fill(pad, -100)))
    return out


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_padding_does_not_reach_the_distillation_term(alpha):
    """fit with sn.Distill on targets holding -100 (padding): the soft term counts only the positions the task loss
    counts, so what the padded positions hold changes nothing (it used to average the KL over them too)."""
    def loss_fn(out, y):
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100)

    params = []
    for garbage in (1, 2):
        model, nest = _token_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        sn.fit(nest, _padded_batches(garbage), opt, sn.Sampler(nest.submodels, k=3, strategy="all", seed=0),
               loss_fn=loss_fn, distill=sn.Distill(temperature=2.0, alpha=alpha), progress=False)
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_distillation_mask_from_the_closure_equals_a_hand_written_masked_kl():
    model, nest = _token_model()
    twin, ref = _token_model()
    x, y = _padded_batches(1, steps=1)[0]
    keep = y != -100
    d = sn.Distill(temperature=3.0, alpha=0.7)
    sn.accumulate(nest, [nest.smallest, nest.largest], lambda: (
        F.cross_entropy((o := model(x)).flatten(0, 1), y.flatten()), o, keep), distill=d, weights=[1.0, 1.0])
    with ref.use(ref.largest):
        t = twin(x)
        F.cross_entropy(t.flatten(0, 1), y.flatten()).backward()
    with ref.use(ref.smallest):
        s = twin(x)
        kl = (F.softmax(t.detach() / 3, -1) * (F.log_softmax(t.detach() / 3, -1) - F.log_softmax(s / 3, -1))).sum(-1)
        (0.3 * F.cross_entropy(s.flatten(0, 1), y.flatten()) + 0.7 * 9 * kl[keep].mean()).backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    for bad in (keep.float(), keep[:, :3], "mask"):
        with pytest.raises(sn.SortedNetError, match="mask of the positions distill= counts"):
            sn.accumulate(nest, [nest.smallest, nest.largest], lambda b=bad: (
                F.cross_entropy((o := model(x)).flatten(0, 1), y.flatten()), o, b), distill=d)


def test_a_third_closure_item_that_is_no_mask_is_refused_with_or_without_distill():
    """Without distill= a third item was dropped unread: an auxiliary loss returned there never trained. It must
    be a bool mask of the logits' shape (or None) either way, and the refusal names an auxiliary loss."""
    model, nest = _token_model()
    x, y = _padded_batches(1, steps=1)[0]
    keep = y != -100
    aux_w = torch.zeros((), requires_grad=True)
    for distill in (None, sn.Distill(temperature=2.0)):
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(sn.SortedNetError, match=r"mask of the positions distill= counts, a bool tensor.*\(4, 6\).*"
                                                    r"add an auxiliary loss to the loss itself"):
            sn.accumulate(nest, [nest.smallest, nest.largest], lambda: (
                F.cross_entropy((o := model(x)).flatten(0, 1), y.flatten()), o, aux_w * 2), distill=distill)
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
        with pytest.raises(sn.SortedNetError, match=r"mask of the positions .* \(the second item, the logits, is "
                                                    r"NoneType: a mask needs them\)"):
            sn.accumulate(nest, [nest.smallest], lambda: (
                F.cross_entropy(model(x).flatten(0, 1), y.flatten()), None, keep), distill=None)
        sn.accumulate(nest, [nest.smallest], lambda: (  # a closure serving both: None or a right mask passes
            F.cross_entropy((o := model(x)).flatten(0, 1), y.flatten()), o, keep), distill=distill)
        sn.accumulate(nest, [nest.smallest], lambda: (
            F.cross_entropy((o := model(x)).flatten(0, 1), y.flatten()), o, None), distill=distill)
        model.zero_grad(set_to_none=True)
    for s, t in [(torch.randn(5), torch.randn(5)), (torch.randint(0, 3, (2, 3)), torch.randint(0, 3, (2, 3)))]:
        with pytest.raises(sn.SortedNetError, match=r"floating-point logits of shape \(\.\.\., classes\)"):
            sn.Distill().soft_loss(s, t)


def test_ints_as_a_third_closure_item_are_no_mask():
    """0 / 1 ints of the logits' shape may be labels (binary classes) as well as an attention_mask: read as a mask,
    every label-0 position would leave the soft term in silence. Refused with or without distill=, saying
    mask.bool() for an attention_mask."""
    model, nest = _token_model()
    x, y = _padded_batches(1, steps=1)[0]
    keep = y != -100
    for distill in (None, sn.Distill(temperature=2.0, alpha=0.5)):
        for bad in (keep.long(), (y > 3).to(torch.int32)):
            with pytest.raises(sn.SortedNetError, match=r"a bool tensor .*got Tensor torch.int.* return mask.bool\(\)"):
                sn.accumulate(nest, [nest.smallest], lambda b=bad: (
                    F.cross_entropy((o := model(x)).flatten(0, 1), y.flatten()), o, b), distill=distill)
            assert all(p.grad is None for p in model.parameters())


def test_non_finite_logits_at_masked_positions_stay_out_of_the_soft_term():
    """A padded row's logits may be -inf or NaN (a fully masked attention row): 0 * nan made every student's loss
    NaN, skipped each step; masked positions now contribute nothing."""
    d = sn.Distill(temperature=2.0, alpha=1.0)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    s0 = student.clone().requires_grad_()
    want = d.soft_loss(s0[keep], teacher[keep])
    want.backward()
    for bad in (float("nan"), float("-inf"), float("inf")):
        for where in ("both", "teacher", "student"):  # (NaN in the teacher only made every gradient NaN)
            s, t = student.clone(), teacher.clone()
            if where != "student":
                t[~keep] = bad
            if where != "teacher":
                s[~keep] = bad
            s.requires_grad_()
            got = d.soft_loss(s, t, keep)
            got.backward()
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(s.grad, s0.grad, msg=lambda m, b=bad, w=where: f"{b} in {w}: {m}")
    for bad in (keep.long(), keep.t(), keep.reshape(-1)):  # (a transposed mask has the size, not the rows)
        with pytest.raises(sn.SortedNetError, match="bool tensor of the logits' shape"):
            d.soft_loss(student, teacher, bad)


def test_a_closure_returning_logits_and_mask_serves_without_distill_too():
    """An ablation without ``distill=`` keeps the closure that returns (loss, logits, mask): the loss trains, the
    rest goes unused (it was refused for returning 3 values, where (loss, logits) was accepted). The third item must
    still be such a mask (another value there, an auxiliary loss, would be dropped: refused, see below)."""
    grads = []
    for extra in (False, True):
        model, nest = _token_model()
        x, y = _padded_batches(1, steps=1)[0]

        def closure(model=model, x=x, y=y, extra=extra):
            loss = F.cross_entropy((o := model(x)).flatten(0, 1), y.flatten())
            return (loss, o, y != -100) if extra else loss

        sn.accumulate(nest, [nest.smallest, nest.largest], closure)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fit_with_an_optimizer_of_another_model_is_refused():
    """An optimizer built for another model (or before a reload replaced the parameters) made fit run every
    batch and train nothing."""
    x, y = toy_batch(0)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    nest = sn.wrap(m, sn.Width("h", [8, 16, 32], out="0", inp="2"))
    other = torch.nn.Linear(3, 3)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(sn.SortedNetError, match="optimizer holds none of the nest's model's parameters"):
        sn.fit(nest, [(x, y)], torch.optim.SGD(other.parameters(), lr=0.1), sn.Sampler(nest, k=1), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), before))


def test_fit_evaluations_leave_numpy_and_python_random_state_alone():
    """An evaluation loader that draws from NumPy's or Python's generator (augmentation, a sampler) advanced
    them inside fit's evaluations, which a resumed run repeats up front: the resumed run then drew other noise
    than the uninterrupted one (1.2e-2 apart). Evaluations now leave every global generator as they found it."""
    import random

    def batches(lo, hi, seed=0):
        g = torch.Generator().manual_seed(seed)
        xs, ys = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        for i in range(lo, hi):  # (the training noise draws from NumPy's global generator)
            yield xs[8 * i:8 * i + 8] + torch.from_numpy(np.random.randn(8, 8)).float() * 0.05, ys[8 * i:8 * i + 8]

    class NoisyEval:  # re-iterable, each pass drawing from NumPy's and Python's generators
        def __iter__(self):
            for x, y in batches(0, 2, seed=1):
                yield x + random.random() * 0.01, y

    def build():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        n = sn.wrap(m, sn.Width("h", [4, 8, 16], out="0", inp="2"))
        return n, torch.optim.SGD(n.trainable_parameters(), lr=0.1), sn.Sampler(n.submodels, k=2, seed=0)

    kw = dict(eval_data=NoisyEval(), eval_every=4, progress=False)
    np.random.seed(0)
    random.seed(0)
    nest, opt, sampler = build()
    sn.fit(nest, batches(0, 8), opt, sampler, **kw)
    whole = nest.model[0].weight.detach().clone()
    np.random.seed(0)
    random.seed(0)
    nest, opt, sampler = build()
    sn.fit(nest, batches(0, 4), opt, sampler, **kw)
    sn.fit(nest, batches(4, 8), opt, sampler, start_step=4, **kw)  # (evaluates step 4's scores again up front)
    assert torch.equal(nest.model[0].weight, whole)


class _Outputs(torch.nn.Module):
    """An MLP with BatchNorm returning its logits as a tensor, a dict or a tuple (``kind``)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.bn, self.b = torch.nn.Linear(12, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 5)

    def forward(self, x):
        out = self.b(torch.relu(self.bn(self.a(x))))
        return {"logits": out} if self.kind == "dict" else (out, x) if self.kind == "tuple" else out


def _fit_case(kind="tensor"):
    torch.manual_seed(0)
    m = _Outputs(kind)
    return m, sn.wrap(m, sn.Width("h", [8, 16, 32], out="a", norm="bn", inp="b"))


@pytest.mark.parametrize("bad", ["dict output", "tuple output", "dict output, distill", "scheduler of another "
                                 "optimizer", "LBFGS"])
def test_fit_refuses_what_its_loop_cannot_train_right_before_anything_changes(bad):
    """Each of these ran: a model returning a dict / tuple reached F.cross_entropy after a training forward (a raw
    TypeError, BatchNorm statistics moved); a scheduler of another optimizer never set the rate fit's optimizer
    steps with (silently); LBFGS failed at its first step (a raw TypeError, gradients left)."""
    x, y = toy_batch(0)
    m, nest = _fit_case(bad.split()[0] if "output" in bad else "tensor")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    kw = {"distill": sn.Distill()} if "distill" in bad else {}
    if bad.startswith("scheduler"):
        kw["scheduler"] = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(m.parameters(), lr=0.1), 1, gamma=0.0)
    if bad == "LBFGS":
        opt = torch.optim.LBFGS(m.parameters())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    match = {"dict output": r"returns a dict \(keys \['logits'\]\): pass loss_fn=", "tuple output": "returns a tuple",
             "dict output, distill": r"fit\(distill=...\) distills the model's output, which must be a tensor",
             "scheduler of another optimizer": "another optimizer than the one fit steps",
             "LBFGS": r"LBFGS.step needs a closure"}[bad]
    with pytest.raises(sn.SortedNetError, match=match):
        sn.fit(nest, [(x, y)] * 2, opt, sn.Sampler(nest, k=2, seed=0), progress=False, **kw)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # (BatchNorm statistics too)
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_fit_default_loss_takes_class_indices_of_any_integer_type(dtype):
    """The default F.cross_entropy takes int64 (and uint8) targets: bool / int16 / int32 labels, which the default
    accuracy scores, failed at the first step with a raw RuntimeError."""
    x, _ = toy_batch(0)
    y = x[:, 0] > 0
    results = []
    for labels in (y.long(), y.to(dtype)):
        m, nest = _fit_case()
        h = sn.fit(nest, [(x, labels)] * 2, torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=2, seed=0),
                   eval_data=(x, labels), progress=False)
        results.append((h.train, h.last_scores, [p.detach().clone() for p in m.parameters()]))
    (t0, s0, p0), (t1, s1, p1) = results
    assert t0 == t1 and s0 == s1 and all(torch.equal(a, b) for a, b in zip(p0, p1))


class _NumpyIn(torch.nn.Module):
    """Converts its inputs itself: takes numpy arrays as well as tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(12, 16), torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.b(F.relu(self.a(torch.as_tensor(x, dtype=torch.float32))))


def test_fit_takes_numpy_where_the_model_and_loss_take_it_and_names_it_where_the_model_does_not():
    """fit refused numpy inputs and targets outright, also where the model converts its inputs and a loss_fn its
    targets (which trained before). Now such a run equals the run on tensors; numpy reaches the default loss or a
    model that cannot take it as a named refusal, not a raw TypeError."""
    x, y = toy_batch(0)
    params = []
    for data in ((x, y), (x.numpy(), y.numpy())):
        torch.manual_seed(0)
        m = _NumpyIn()
        nest = sn.wrap(m, sn.Width("h", [8, 16], out="a", inp="b"))
        sn.fit(nest, [data] * 2, torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=2, seed=0),
               loss_fn=lambda out, t: F.cross_entropy(out, torch.as_tensor(t)), progress=False)
        params.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b)
    m, nest = _fit_case()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(sn.SortedNetError, match=r"model raised \w+Error on the inputs of step 0, a numpy array"):
        sn.fit(nest, [(x.numpy(), y)], torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=2, seed=0),
               loss_fn=F.cross_entropy, progress=False)
    class _Dims(torch.nn.Module):  # (reads x.dim(): an AttributeError on an array)
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(12, 16), torch.nn.Linear(16, 5)

        def forward(self, x):
            return self.b(self.a(x if x.dim() == 2 else x[None]))

    d = _Dims()
    dn = sn.wrap(d, sn.Width("h", [8, 16], out="a", inp="b"))
    with pytest.raises(sn.SortedNetError, match=r"model raised \w+Error on the inputs of step 0, a numpy array"):
        sn.fit(dn, [(x.numpy(), y)], torch.optim.SGD(d.parameters(), lr=0.1), sn.Sampler(dn, k=2, seed=0),
               loss_fn=F.cross_entropy, progress=False)
    with pytest.raises(sn.SortedNetError, match=r"targets of step 0 are a numpy array.*F.cross_entropy"):
        sn.fit(nest, [(x, y.numpy())], torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=2, seed=0),
               progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(p.grad is None for p in m.parameters())


def test_fit_default_loss_takes_an_unbatched_sample():
    """F.cross_entropy takes one sample, logits (classes,) and a 0-d class index; the default loss's shape check
    refused it. It trains as loss_fn=F.cross_entropy does; a (classes,) output with a (1,) target is named."""
    x, y = toy_batch(0)
    data = [(x[i], y[i]) for i in range(4)]
    params = []
    for loss_fn in (None, F.cross_entropy):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
        nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
        sn.fit(nest, data, torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=2, seed=0), loss_fn=loss_fn,
               progress=False)
        params.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b)
    with pytest.raises(sn.SortedNetError, match=r"here \(\); step 0 gave output \(5,\) and targets \(1,\)"):
        sn.fit(nest, [(x[0], y[:1])], torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=2, seed=0),
               progress=False)
    with pytest.raises(sn.SortedNetError, match=r"not a class index in 0..4"):
        sn.fit(nest, [(x[0], torch.tensor(9))], torch.optim.SGD(m.parameters(), lr=0.1),
               sn.Sampler(nest, k=2, seed=0), progress=False)


def test_a_closure_returning_a_second_loss_is_refused_not_dropped():
    """``(loss, aux_loss)`` from a closure: the second item is read as logits (for distill=), so the auxiliary loss
    trained nothing, in silence."""
    x, y = toy_batch(0)
    m, nest = _fit_case()
    with pytest.raises(sn.SortedNetError, match="returned \\(loss, a scalar that requires grad\\)"):
        sn.accumulate(nest, nest.submodels, lambda: (F.cross_entropy(m(x), y), m.b.weight.square().sum()))
    assert all(p.grad is None for p in m.parameters())
    # a detached number (a metric) passes, as logits that are not used
    sn.accumulate(nest, nest.submodels, lambda: (F.cross_entropy(m(x), y), m.b.weight.detach().square().sum()))


class _OwnLossModel(torch.nn.Module):
    """Computes its loss itself (``loss_fn=lambda out, y: out``): a 0-d output that requires grad."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))

    def forward(self, x, y):
        return F.cross_entropy(self.net(x), y)


class _EvalTupleWithLock(torch.nn.Sequential):
    """Logits in training mode, ``(logits, probabilities)`` in eval mode, and a lock no deep copy can take."""

    def __init__(self):
        import threading

        super().__init__(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        self.lock = threading.Lock()

    def forward(self, x):
        with self.lock:
            out = super().forward(x)
        return out if self.training else (out, out.softmax(-1))


class _Squeezed(torch.nn.Sequential):
    def forward(self, x):
        return super().forward(x).squeeze()  # (a batch of one: a 0-d prediction)


class _SharedGroups:
    """A wrapper sharing an optimizer's parameter groups (as Accelerate's AcceleratedOptimizer does)."""

    def __init__(self, opt):
        self.optimizer, self.param_groups, self.state = opt, opt.param_groups, opt.state

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize("case", ["own loss", "a batch of one squeezed", "scheduler of a wrapped optimizer",
                                  "tuple only in eval, a lock"])
def test_what_fits_refusals_must_not_catch_still_trains(case):
    """The regression probe of this round's refusals: fit's own closure handed the model's output on as logits
    (a 0-d output, the model's own loss or a batch of one squeezed, read as an auxiliary loss); a scheduler built
    before its optimizer was wrapped read as another optimizer's; the output check in eval mode on a deep copy
    refused a model returning a tuple only in eval mode and one holding a lock."""
    x, y = toy_batch(0)
    torch.manual_seed(0)
    kw, batches = {}, [(x, y)] * 2
    if case == "own loss":
        m = _OwnLossModel()
        nest = sn.wrap(m, sn.Width("h", [8, 32], out="net.0", inp="net.2"))
        kw["loss_fn"], batches = (lambda out, target: out), [((x, y), y)] * 2
    elif case.startswith("a batch of one"):
        m = _Squeezed(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        nest = sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"))
        kw["loss_fn"], batches = F.mse_loss, [(x[:1], y[:1].float()), (x, y.float())]
    elif case.startswith("tuple"):
        m = _EvalTupleWithLock()
        nest = sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"))
    else:
        m = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        nest = sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    if case.startswith("scheduler"):
        kw["scheduler"] = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
        opt = _SharedGroups(opt)
    before = [p.detach().clone() for p in m.parameters()]
    hist = sn.fit(nest, batches, opt, sn.Sampler(nest, k=2, seed=0), progress=False, **kw)
    assert len(hist.train) == 2 and not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    if case.startswith("scheduler"):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("masked", [False, True], ids=["all", "mask"])
@pytest.mark.parametrize("seed", range(4))
def test_distillation_over_a_masked_vocabulary_is_the_kl_over_the_classes_the_teacher_allows(seed, masked):
    """Logits with -inf in classes neither model may predict (a padded or masked vocabulary): the task loss is
    finite, and so is the KL (those classes have no probability: 0 log 0 = 0), but F.kl_div gave 0 * inf = NaN,
    so every student was skipped (nonfinite="skip") or refused. Equal to the KL over the allowed classes alone,
    gradients included; with finite logits equal to F.kl_div."""
    g = torch.Generator().manual_seed(seed)
    d = sn.Distill(temperature=1.0 + seed, alpha=0.5)
    s, t = torch.randn(3, 4, 7, generator=g, requires_grad=True), torch.randn(3, 4, 7, generator=g)
    mask = torch.rand(3, 4, generator=g) > 0.3 if masked else None
    want = F.kl_div(F.log_softmax(s / d.temperature, -1), F.log_softmax(t / d.temperature, -1), reduction="none",
                    log_target=True).sum(-1) * d.temperature ** 2
    want = want[mask].sum() / mask.sum() if masked else want.mean()
    torch.testing.assert_close(d.soft_loss(s, t, mask), want)
    cols = [2, 5]  # no probability in the teacher nor the student
    neg = torch.zeros(7).index_fill(0, torch.tensor(cols), float("-inf"))
    got = d.soft_loss(s + neg, t + neg, mask)
    keep = [c for c in range(7) if c not in cols]
    ref = d.soft_loss(s[..., keep], t[..., keep], mask)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, ref)
    g1, = torch.autograd.grad(got, s)
    g2, = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g1, g2)
    assert torch.all(g1[..., cols] == 0)
    # a class the teacher gives probability and the student none: the KL is infinite (the NaN guard's case)
    assert d.soft_loss(s + neg, t, mask) == float("inf")


@pytest.mark.parametrize("fault", ["float_targets", "empty_loader", "eval_every_alone"])
def test_a_refused_fit_keeps_the_callers_gradients(fault):
    """fit cleared .grad (optimizer.zero_grad) before its first batch's checks: a refused run still wiped the
    gradients the caller had accumulated. Refused before any change now; eval_every= without eval_data= (which
    returned no evaluation, in silence) is refused too."""
    x, y = toy_batch(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    nest = sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"))
    m(x).square().mean().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    data = {"float_targets": [(x, y.float())], "empty_loader": []}.get(fault, [(x, y)])
    kw = {"eval_every": 2} if fault == "eval_every_alone" else {}
    with pytest.raises(sn.SortedNetError, match="float32|yielded no batch|eval_every=2.*no eval_data"):
        sn.fit(nest, data, torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=1), progress=False, **kw)
    assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads))


def test_a_diverged_model_scores_nan_and_its_mean_loss_says_so():
    """Logits that are NaN scored the share of class 0 (argmax of a NaN row is 0) in evaluate and fit's
    evaluations, and History.mean_loss left out every non-finite loss, also those trained on
    (nonfinite="ignore"): a diverged run read as a healthy one. NaN now, where the model gave NaN; a loss a
    step skipped (nonfinite="skip") is still left out."""
    x, y = toy_batch(0)
    m = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    nest = sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"))
    with torch.no_grad():
        m[2].bias[1] = float("nan")
    scores = evaluate(nest, [(x, y)])
    assert all(math.isnan(v) for v in scores.values()), scores
    hist = sn.fit(nest, [(x, y)] * 2, torch.optim.SGD(m.parameters(), lr=0.1), sn.Sampler(nest, k=2),
                  nonfinite="ignore", progress=False, eval_data=(x, y))
    assert all(math.isnan(v) for v in hist.mean_loss().values()) and len(hist.mean_loss()) == 2
    assert all(math.isnan(v) for v in hist.last_scores.values())
    h = sn.train.History(train=[{"step": 0, "losses": {"h=8": float("nan"), "h=32": 1.0}, "skipped": ["h=8"]},
                                {"step": 1, "losses": {"h=8": 2.0, "h=32": 3.0}}])
    assert h.mean_loss() == {"h=8": 2.0, "h=32": 2.0}
    # a non-finite logit where the target is ignored (-100: padding) does not count, as the target does not
    out, t = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    out[0, 0], t[0, 0] = float("nan"), -100
    want = float(((out.argmax(-1) == t) & (t != -100)).sum())
    assert sn.train._accuracy(out, t) == want
    # -inf in some classes (masked ones) leaves argmax well defined: scored as usual; a row of -inf only is NaN
    out = torch.randn(4, 6)
    out[:, 4:] = float("-inf")
    t = torch.randint(0, 4, (4,))
    assert sn.train._accuracy(out, t) == float((out.argmax(-1) == t).sum())
    out[1] = float("-inf")
    assert math.isnan(sn.train._accuracy(out, t))


def test_fit_warns_when_the_optimizer_lacks_parameters_the_nest_trains():
    """An optimizer built before sn.wrap (or before sn.load, which wraps) never saw the LoRA adapters wrap adds: fit
    stepped the rest of the model and trained nothing of the targets, in silence."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    nest = sn.wrap(model, sn.Rank("r", [2, 4], targets="0", mode="lora"))
    data = [(torch.randn(4, 8), torch.randint(0, 2, (4,)))] * 2
    sampler = sn.Sampler(nest.submodels, k=1, seed=0)
    with pytest.warns(UserWarning, match=r"the optimizer does not hold 2 of the parameters the nest trains "
                                         r"\(\['0.lora_A', '0.lora_B'\]\)"):
        sn.fit(nest, data, early, sampler, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sn.fit(nest, data, torch.optim.SGD(nest.trainable_parameters(), lr=0.1), sampler, progress=False)


@pytest.mark.parametrize("how", ["default_loss", "loss_fn", "loss_fn_axis"])
def test_fit_distills_a_dense_prediction_over_the_default_losss_class_axis(how):
    """A (batch, classes, length) output: the default loss reads the classes on axis 1, the distillation term
    read them on the last axis (the length), so a tagger trained on a meaningless soft target (0.0104 off the
    oracle), in silence. fit hands Distill the logits with the classes last; with a loss of the user's own
    (``F.cross_entropy`` with options) too, read from the targets' shape (it was not), or named by
    ``Distill(axis=1)``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv1d(16, 5, 1))
    nest = sn.wrap(model, sn.Width("ch", [4, 8, 16], out="0", inp="2"))
    x, y = torch.randn(8, 3, 7), torch.randint(0, 5, (8, 7))
    y[0, :3] = -100  # (ignored positions: left out of the soft term too)
    sampler = sn.Sampler(nest.submodels, k=2, strategy="sandwich", seed=0)
    subs = sampler.draw(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    got = {}
    step = opt.step
    opt.step = lambda *a, **k: (got.update({n: p.grad.clone() for n, p in model.named_parameters()}), step())[1]
    loss_fn = None if how == "default_loss" else functools.partial(F.cross_entropy, ignore_index=-100)
    d = sn.Distill(temperature=2.0, alpha=0.5, axis=1 if how == "loss_fn_axis" else None)
    sn.fit(nest, [(x, y)], opt, sampler, loss_fn=loss_fn, distill=d, progress=False)
    model.zero_grad(set_to_none=True)
    keep = y != -100
    with nest.use(subs[-1]):
        t = model(x)
        (F.cross_entropy(t, y) * 0.5).backward()
    with nest.use(subs[0]):
        o = model(x)
        s, p = F.log_softmax(o / 2, 1), F.log_softmax(t.detach() / 2, 1)
        kl = (p.exp() * (p - s)).sum(1)[keep].mean() * 4
        ((0.5 * F.cross_entropy(o, y) + 0.5 * kl) * 0.5).backward()
    for n, q in model.named_parameters():
        torch.testing.assert_close(got[n], q.grad, atol=1e-6, rtol=1e-5, msg=n)


class _Seg(torch.nn.Module):
    """(B, 3, H, W) images -> (B, C, H / k, W / k) class logits, with a BatchNorm (a training forward moves it)."""

    def __init__(self, classes: int, k: int = 1):
        super().__init__()
        self.a, self.bn, self.b = torch.nn.Conv2d(3, 16, 1), torch.nn.BatchNorm2d(16), torch.nn.Conv2d(16, classes, 1)
        self.k = k

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(F.avg_pool2d(x, self.k) if self.k > 1 else x))))


@pytest.mark.parametrize("target", ["square_indices", "soft_labels", "column_of_indices", "full_resolution",
                                    "column_of_a_sequence", "dict_of_indices", "tuple_of_indices"])
def test_fit_refuses_distilling_a_dense_prediction_whose_class_axis_it_cannot_tell(target):
    """A loss of the user's own on outputs whose class axis the targets do not tell: integer targets (batch, n)
    of a (batch, n, n) output fit classes on axis 1 and on the last axis alike, soft labels of the output's shape
    say nothing, nor do a (B, 1, H, W) column of indices or targets at another resolution than the logits (a
    loss that upsamples): the soft term's softmax ran over the image width, in silence. Nor do targets in a dict
    or a tuple (a (B, C, L) tagger's softmax ran over the positions). Refused before any training forward (the
    BatchNorm statistics as they were), naming ``Distill(axis=)``; with it, fit trains."""
    torch.manual_seed(0)
    if target in ("square_indices", "soft_labels", "column_of_a_sequence", "dict_of_indices", "tuple_of_indices"):
        model = torch.nn.Sequential(torch.nn.Conv1d(5, 8, 1), torch.nn.BatchNorm1d(8), torch.nn.Conv1d(8, 5, 1))
        nest = sn.wrap(model, sn.Width("ch", [4, 8], out="0", norm="1", inp="2"))
        x = torch.randn(4, 5, 5 if target in ("square_indices", "soft_labels") else 6)
        y = {"square_indices": lambda: torch.randint(0, 5, (4, 5)),
             "soft_labels": lambda: torch.randn(4, 5, 5).softmax(1),
             "column_of_a_sequence": lambda: torch.randint(0, 5, (4, 1, 6)),
             "dict_of_indices": lambda: {"labels": torch.randint(0, 5, (4, 6))},
             "tuple_of_indices": lambda: (torch.randint(0, 5, (4, 6)),)}[target]()
        loss_fn = {"column_of_a_sequence": lambda o, t: F.cross_entropy(o, t[:, 0]),
                   "dict_of_indices": lambda o, t: F.cross_entropy(o, t["labels"]),
                   "tuple_of_indices": lambda o, t: F.cross_entropy(o, t[0])}.get(target, F.cross_entropy)
    else:
        model = _Seg(5, 4 if target == "full_resolution" else 1)
        nest = sn.wrap(model, sn.Width("ch", [8, 16], out="a", norm="bn", inp="b"))
        x = torch.randn(2, 3, 8, 12)
        y, loss_fn = {
            "column_of_indices": (torch.randint(0, 5, (2, 1, 8, 12)), lambda o, t: F.cross_entropy(o, t[:, 0])),
            "full_resolution": (torch.randint(0, 5, (2, 8, 12)), lambda o, t: F.cross_entropy(
                F.interpolate(o, size=t.shape[-2:], mode="bilinear"), t)),
        }[target]
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = sn.Sampler(nest.submodels, k=2, seed=0)
    with pytest.raises(sn.SortedNetError, match=r"Distill\(axis="):
        sn.fit(nest, [(x, y)], opt, sampler, loss_fn=loss_fn, distill=sn.Distill(), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    sn.fit(nest, [(x, y)], opt, sampler, loss_fn=loss_fn, distill=sn.Distill(axis=1), progress=False)
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("case", ["shifted_labels", "bool_mask"])
def test_fit_distills_over_the_classes_the_targets_tell(case):
    """(B, L, V) logits with labels (B, L + 1) that the loss shifts: neither rule's shape, a language model's
    layout, distilled over the last axis as before (not refused); a bool mask (B, H, W) of a two-class (B, 2, H, W)
    prediction: over axis 1 (it was read as no class indices: the image width)."""
    torch.manual_seed(0)
    seen = []
    if case == "bool_mask":
        model, classes = _Seg(2), 2
        nest = sn.wrap(model, sn.Width("ch", [8, 16], out="a", norm="bn", inp="b"))
        data = [(torch.randn(2, 3, 8, 12), torch.rand(2, 8, 12) > 0.5)]
        loss_fn = lambda o, t: F.cross_entropy(o, t.long())  # noqa: E731
    else:
        model, classes = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                             torch.nn.Linear(16, 11)), 11
        nest = sn.wrap(model, sn.Width("h", [8, 16], out="1", inp="3"))
        ids = torch.randint(0, 11, (2, 7))
        data = [(ids[:, :-1], ids)]
        loss_fn = lambda o, t: F.cross_entropy(o.transpose(1, 2), t[:, 1:])  # noqa: E731
    soft = sn.Distill.soft_loss

    class Spy(sn.Distill):
        def soft_loss(self, s, t, mask=None):
            seen.append(self.class_axis(s) == s.dim() - 1 and s.shape[-1] == classes)
            return soft(self, s, t, mask)

    sn.fit(nest, data, torch.optim.SGD(model.parameters(), lr=0.1), sn.Sampler(nest.submodels, k=2, seed=0),
           loss_fn=loss_fn, distill=Spy(), progress=False)
    assert seen and all(seen)


@pytest.mark.parametrize("shifted", [False, True])
def test_fit_keeps_the_class_axis_its_first_batch_told(shifted):
    """The class axis was read from every batch's targets: a language model's batches of varying length, one of
    which has as many positions as the vocabulary, either stopped the run there (after steps were taken) or,
    with labels the loss shifts, took that step's soft term over the positions, in silence. fit reads the axis
    once, from the first batch, and keeps it."""
    torch.manual_seed(0)
    V, seen = 8, []
    model = torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, V))
    nest = sn.wrap(model, sn.Width("h", [8, 16], out="1", inp="3"))
    if shifted:  # (labels (B, L - 1): the loss drops the last position's logits)
        data = [(ids, ids[:, 1:]) for ids in (torch.randint(0, V, (4, n)) for n in (6, 9, 5))]
        loss_fn = lambda o, t: F.cross_entropy(o[:, :-1].flatten(0, 1), t.flatten())  # noqa: E731
    else:
        data = [(ids, ids) for ids in (torch.randint(0, V, (4, n)) for n in (5, 6, V, 7))]
        loss_fn = lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten())  # noqa: E731
    soft = sn.Distill.soft_loss

    class Spy(sn.Distill):
        def soft_loss(self, s, t, mask=None):
            seen.append(s.shape[-1] == V)
            return soft(self, s, t, mask)

    hist = sn.fit(nest, data, torch.optim.SGD(model.parameters(), lr=0.1), sn.Sampler(nest.submodels, k=2, seed=0),
                  loss_fn=loss_fn, distill=Spy(), progress=False)
    assert len(hist.train) == len(data) and len(seen) == len(data) and all(seen)


@pytest.mark.parametrize("out", [1, 0])
def test_fit_refuses_distilling_an_output_without_classes(out):
    """A regression's (B, 1) output (or (B,)) with ``F.mse_loss``: the soft term's softmax over a single value is
    1, its KL always 0, so ``Distill`` only scaled the task loss by ``1 - alpha`` (or took a softmax over the
    batch), in silence. Refused before any training forward, and with ``Distill(axis=)`` naming that axis too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    if not out:
        model.append(torch.nn.Flatten(0))
    nest = sn.wrap(model, sn.Width("h", [8, 16], out="0", inp="2"))
    x = torch.randn(8, 4)
    y = x.sum(1, keepdim=bool(out))
    before = copy.deepcopy(model.state_dict())
    for d in (sn.Distill(), sn.Distill(axis=-1)):
        with pytest.raises(sn.SortedNetError, match=r"holds one value on its class axis|\(\.\.\., classes\)"):
            sn.fit(nest, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1),
                   sn.Sampler(nest.submodels, k=2, seed=0), loss_fn=F.mse_loss, distill=d, progress=False)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("axis", [1, -2])
def test_distill_axis_takes_the_kl_over_that_axis(axis):
    """``Distill(axis=)`` names the class axis of the logits (and the mask is their shape without it)."""
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    mask = torch.rand(3, 6) > 0.3
    got = sn.Distill(temperature=2.0, axis=axis).soft_loss(s, t, mask)
    want = sn.Distill(temperature=2.0).soft_loss(s.movedim(1, -1), t.movedim(1, -1), mask)
    torch.testing.assert_close(got, want)
    with pytest.raises(sn.SortedNetError, match="axis 3"):
        sn.Distill(axis=3).soft_loss(s, t)


def test_distillation_refuses_detached_logits_before_any_gradient():
    """A closure returning ``(loss, logits.detach())`` ("they are only targets"): the students' soft term trained
    nothing, in silence (alpha=1: PyTorch's raw error after the teacher's backward had written gradients)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    nest = sn.wrap(model, sn.Width("h", [4, 16], out="0", inp="2"))
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))

    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out.detach()

    for alpha in (0.5, 1.0):
        with pytest.raises(sn.SortedNetError, match=r"logits of h=16 do not require grad"):
            sn.accumulate(nest, nest.submodels, closure, distill=sn.Distill(alpha=alpha))
        assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_fit_takes_no_optimizer_step_over_non_finite_gradients_of_finite_losses(nonfinite):
    """A finite loss whose gradient is NaN (sqrt at 0): fit stepped, the weights became NaN, and "raise" blamed
    the next step (its note saying the weights were those after the poisoned one); "skip" returned NaN weights.
    The gradients are checked before each optimizer step: refused, or the step skipped, weights as before."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="0", inp="2"))
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(o, t):
        return F.cross_entropy(o, t) + 1e-3 * (o - o.detach()).pow(2).sum().sqrt()

    run = functools.partial(sn.fit, nest, [(x, y)] * 3, opt, sn.Sampler(nest.submodels, k=2, seed=0),
                            loss_fn=loss_fn, progress=False, nonfinite=nonfinite)
    if nonfinite == "raise":
        with pytest.raises(sn.SortedNetError, match=r"step 0 .* left non-finite gradients in \['0\.weight'"):
            run()
    else:
        with pytest.warns(sn.train.NonFiniteLossWarning, match=r"skipped its optimizer step"):
            hist = run()
        assert [sorted(r["skipped"]) == sorted(r["losses"]) for r in hist.train] == [True] * 3
        assert all(math.isfinite(v) for r in hist.train for v in r["losses"].values())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and p.grad is None, n


def test_fit_checks_sparse_and_float16_gradients_without_refusing_finite_ones():
    """The gradient check before each optimizer step read a sparse embedding's gradient with torch.isfinite,
    which sparse tensors lack (NotImplementedError at the first step); a float16 gradient whose norm overflows
    while its values are finite is no NaN either."""
    from sortednet.train import _nonfinite_grads

    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8, sparse=True)
            self.fc, self.out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)

        def forward(self, i):
            return self.out(torch.relu(self.fc(self.emb(i).mean(1))))

    torch.manual_seed(0)
    model = Bag()
    nest = sn.wrap(model, sn.Width("h", [4, 16], out="fc", inp="out"))
    i, y = torch.randint(0, 20, (8, 5)), torch.randint(0, 3, (8,))
    before = model.emb.weight.detach().clone()
    hist = sn.fit(nest, [(i, y)] * 2, torch.optim.SGD(model.parameters(), lr=0.1), sn.Sampler(nest.submodels, k=2,
                                                                                            seed=0), progress=False)
    assert all("skipped" not in r for r in hist.train) and not torch.equal(model.emb.weight, before)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.emb.weight.grad = torch.sparse_coo_tensor([[1, 2]], torch.tensor([[0.0] * 8, [float("nan")] * 8]), (20, 8))
    assert _nonfinite_grads(opt, model) == ["emb.weight"]
    half = torch.nn.Linear(4, 4).half()
    half.weight.grad = torch.full((4, 4), 60000.0, dtype=torch.half)  # (a 2-norm of 240000: over float16's range)
    half.bias.grad = torch.tensor([0.0, float("inf"), 0.0, 0.0], dtype=torch.half)
    assert _nonfinite_grads(torch.optim.SGD(half.parameters(), lr=0.1), half) == ["bias"]


class _PoisonedStem(torch.nn.Module):
    """Residual blocks with BatchNorm; a batch whose first feature is 999 backpropagates NaN from a finite loss
    (a sqrt branch ``torch.where`` never selects)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(8, 32)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64),
                                                              torch.nn.ReLU(), torch.nn.Linear(64, 32))
                                          for _ in range(2))
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x):
        h = self.stem(x)
        if (x[:, 0] == 999).any():
            h = torch.where(h > -1e9, h, (h - 1e12).sqrt())
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


@pytest.mark.parametrize("poisoned", [0, 2])
def test_fit_drops_calibrated_statistics_at_its_first_optimizer_step_even_after_a_skipped_one(poisoned):
    """A first step skipped for non-finite gradients left the per-sub-model statistics of ``calibrate`` in place
    (they were dropped at step ``first`` only), describing weights the later steps changed."""
    torch.manual_seed(0)
    m = _PoisonedStem()
    nest = sn.wrap(m, sn.Width("ffn", [16, 64], out="blocks.*.0", inp="blocks.*.3", norm="blocks.*.1"))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(4)]
    data[poisoned][0][3, 0] = 999.0
    nest.calibrate([x for x, _ in data[1:3]])
    assert nest._calibrated()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hist = sn.fit(nest, data, torch.optim.SGD(m.parameters(), lr=0.5), sn.Sampler(nest, k=2, seed=5),
                      progress=False)
    assert [("skipped" in r) for r in hist.train] == [i == poisoned for i in range(4)]
    assert not nest._calibrated()
    assert any("BatchNorm statistics of nest.calibrate" in str(w.message) for w in seen)


@pytest.mark.parametrize("skipped", ["loss", "gradients", "teacher"])
def test_fit_keeps_calibrated_statistics_while_no_step_changes_a_weight(skipped):
    """Every sub-model of the only step skipped for a non-finite loss (or its distillation teacher, with soft
    targets only): no weight changed, yet fit dropped the statistics of ``calibrate`` (warning that it trains the
    weights); as a step skipped for its gradients does."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", norm="1", inp="3"))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    nest.calibrate([x] * 2)
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    distill = None
    if skipped == "loss":
        loss_fn = lambda o, t: F.cross_entropy(o, t) * float("nan")  # noqa: E731
    elif skipped == "teacher":
        loss_fn = lambda o, t: F.cross_entropy(o, t) * (float("nan") if m[0].weight.shape[0] == 16 else 1)  # noqa
        distill = sn.Distill(alpha=1.0)
    else:
        loss_fn = lambda o, t: F.cross_entropy(o, t) + (m[0].weight.sum() * 0).sqrt() * 0  # noqa: E731
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hist = sn.fit(nest, [(x, y)], torch.optim.SGD(m.parameters(), lr=0.1),
                      sn.Sampler(nest.submodels, k=2, strategy="all"), loss_fn=loss_fn, distill=distill,
                      progress=False)
    assert hist.train[0]["skipped"] == (["h=16"] if distill else ["h=8", "h=16"])
    assert all(torch.equal(before[k], p) for k, p in m.named_parameters())
    assert nest._calibrated() == ["1"]
    assert not any("BatchNorm statistics of nest.calibrate" in str(w.message) for w in seen)


class _OwnSGD:
    """An optimizer of one's own: ``step`` only, no ``param_groups`` (the tests add a ``zero_grad``)."""

    def __init__(self, params):
        self.params = list(params)

    def step(self):
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p -= 0.1 * p.grad


def test_fit_takes_an_optimizer_of_ones_own_without_param_groups():
    """fit needs ``step`` and ``zero_grad`` only: an optimizer of one's own without ``param_groups`` raised a raw
    AttributeError after its first backward (its gradient check and its calibration check read them)."""

    class Plain(_OwnSGD):
        def zero_grad(self, set_to_none=True):
            for p in self.params:
                p.grad = None

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
    for nonfinite in ("ignore", "skip"):
        before = [p.detach().clone() for p in m.parameters()]
        sn.fit(nest, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))], Plain(m.parameters()),
               sn.Sampler(nest.submodels, k=2, seed=0), nonfinite=nonfinite, progress=False)
        assert all(not torch.equal(b, p) for b, p in zip(before, m.parameters()))


def test_fit_takes_an_optimizer_whose_zero_grad_takes_no_argument():
    """An optimizer of one's own written as ``def zero_grad(self)`` (zeroing in place, as older code does) met fit's
    ``zero_grad(set_to_none=True)`` with a raw TypeError; fit now calls it bare and then drops the gradients of the
    parameters it steps, so the run is the one an optimizer taking ``set_to_none`` gives (and one taking it
    positionally only gets it so)."""
    Plain = _OwnSGD

    class Bare(Plain):
        def zero_grad(self):
            for p in self.params:
                if p.grad is not None:
                    p.grad.zero_()

    class Kw(Plain):
        def zero_grad(self, set_to_none=True):
            for p in self.params:
                p.grad = None

    class PosOnly(Plain):
        def zero_grad(self, set_to_none=True, /):
            for p in self.params:
                p.grad = None if set_to_none else p.grad

    data = [(torch.randn(8, 4, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
            for i in range(3)]
    runs = []
    for cls in (Bare, Kw, PosOnly):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
        before = [p.detach().clone() for p in m.parameters()]
        sn.fit(nest, data, cls(m.parameters()), sn.Sampler(nest.submodels, k=2, seed=0), progress=False)
        assert all(p.grad is None for p in m.parameters())
        assert all(not torch.equal(b, p) for b, p in zip(before, m.parameters()))
        runs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for run in runs[1:] for a, b in zip(runs[0], run))


def test_a_stop_after_a_skipped_update_says_how_many_steps_updated_the_weights():
    """A step whose gradients were not finite is skipped (no optimizer update) but counts as a step; a later
    stop said "stopped after 5 optimizer step(s)" where 4 updates were in the weights. The note says how many
    of the steps skipped their update; start_step= is still the step count."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    nest = sn.wrap(m, sn.Width("h", [4, 8, 16], out="0", inp="2"))
    x = torch.randn(48, 6)
    data = [(x[i * 8:(i + 1) * 8], x[i * 8:(i + 1) * 8, :3].argmax(1)) for i in range(6)]
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    updates = [0]
    opt.register_step_post_hook(lambda *a: updates.__setitem__(0, updates[0] + 1))
    calls = [0]

    def loss_fn(out, y):
        calls[0] += 1
        step = (calls[0] - 1) // 2  # (k=2 sub-models a step)
        if step == 2:
            return F.cross_entropy(out, y) + torch.sqrt(out.sum() * 0)  # a finite loss, a NaN gradient
        if step == 5:
            raise RuntimeError("a fault in the loss")
        return F.cross_entropy(out, y)

    with _nonfinite_warns(), pytest.raises(RuntimeError, match="a fault") as err:
        sn.fit(nest, data, opt, sn.Sampler(nest.submodels, k=2, seed=0), loss_fn=loss_fn, progress=False)
    note = next(n for n in err.value.__notes__ if n.startswith("sortednet.fit:"))
    assert updates[0] == 4
    assert "stopped after 5 step(s) of this call (1 of them skipped: non-finite losses or gradients" in note
    assert "the weights are those after step 4" in note


def _scaled(scale):
    def deco(f):
        @functools.wraps(f)  # (the signature it copies is f's: three arguments; the wrapper takes two)
        def wrapper(out, target):
            return f(out, target, scale)
        return wrapper
    return deco


@_scaled(0.5)
def _half_ce(out, target, scale):
    return scale * F.cross_entropy(out, target)


class _StaticCall:
    __call__ = staticmethod(lambda out, target: F.cross_entropy(out, target))  # (signature() drops `out`)


class _Counted:
    def __call__(self, out, target):
        return (out.argmax(-1) == target).sum()


class _CalledOtherwise(torch.nn.Module):
    """A module whose own ``__call__`` takes (output, target); its forward, one tensor."""

    def forward(self, a):
        return a

    def __call__(self, out, target):
        return F.cross_entropy(out, target)


@pytest.mark.parametrize("fn", [_half_ce, _StaticCall(), _Counted(), torch.nn.CrossEntropyLoss(), F.cross_entropy,
                                functools.partial(lambda w, out, target: w * F.cross_entropy(out, target), 1.0),
                                lambda *args: F.cross_entropy(*args), _CalledOtherwise()],
                         ids=["wraps", "static_call", "call", "module", "builtin", "partial", "varargs",
                              "module_call"])
def test_every_kind_of_two_argument_callable_is_taken_as_loss_and_metric(fn):
    """The arity check of loss_fn / metric / the closure read a decorator's copied signature (functools.wraps:
    the wrapped function's three arguments for a wrapper of two) and Python 3.11's signature of a static
    ``__call__`` (its first argument dropped): both correct callables were refused. Only the signature of a
    function, method, partial or module's forward is read, without following ``__wrapped__``."""

    from sortednet.train import evaluate

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2"))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    if not isinstance(fn, _Counted):
        sn.fit(nest, [(x, y)], opt, sn.Sampler(nest, k=1), loss_fn=fn, progress=False)
    assert len(evaluate(nest, (x, y), metric=fn)) == len(nest.submodels)

    @functools.wraps(_half_ce)
    def closure():
        return F.cross_entropy(m(x), y)

    sn.accumulate(nest, nest.submodels, closure)


class _History(list):
    """A metric that keeps each batch's value: an empty list is falsy."""

    def __call__(self, out, target):
        v = F.cross_entropy(out, target, reduction="sum")
        self.append(float(v))
        return v


class _SumCE(torch.nn.Module):
    def forward(self, out, target):
        return F.cross_entropy(out, target, reduction="sum")


def test_a_metric_that_is_falsy_or_has_no_length_is_the_metric_used(fresh_dynamo):
    """``metric or _accuracy`` took a metric object that tests false (a list subclass keeping its history,
    empty at first) for no metric: accuracy was reported in its place, the metric never called. And a metric
    without a length whose truth Python asks for by ``len()`` (``torch.compile`` of a module: its wrapper's
    ``__len__`` raises) failed with a raw TypeError. A metric is used whenever one is given."""
    from sortednet.train import evaluate

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2"))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    want = {}
    with torch.no_grad():
        for sub in nest.submodels:
            with nest.use(sub):
                want[sub] = float(F.cross_entropy(m(x), y, reduction="sum")) / len(y)
    history = _History()
    got = evaluate(nest, (x, y), metric=history)
    assert len(history) == len(nest.submodels)
    assert got == pytest.approx(want)
    assert evaluate(nest, (x, y), metric=torch.compile(_SumCE(), backend="eager")) == pytest.approx(want)


def test_the_default_accuracy_reads_the_classes_where_the_loss_does_and_refuses_a_square_output():
    """A ``(batch, classes, length)`` output with as many classes as positions was scored over the last axis
    (``argmax(-1)``: the positions) while fit's default loss trained axis 1, silently (0.15 reported, 0.29 right);
    with other sizes the accuracy refused an output fit trains. Now fit(eval_data=) with the default loss scores
    axis 1, evaluate alone refuses the square case and reads axis 1 where only it fits."""
    def conv(classes):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv1d(2, 16, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv1d(16, classes, 1))

    g = torch.Generator().manual_seed(0)
    for classes, length in ((6, 6), (5, 7)):
        x, y = torch.randn(32, 2, length, generator=g), torch.randint(0, classes, (32, length), generator=g)
        nest = sn.wrap(conv(classes), sn.Width("ch", [8, 16], out="0", inp="2"))
        opt = torch.optim.SGD(nest.model.parameters(), lr=0.1)
        hist = sn.fit(nest, [(x, y)] * 2, opt, sn.Sampler(nest, strategy="all"), eval_data=(x, y), progress=False)
        with torch.no_grad():
            for sub in nest.submodels:
                with nest.use(sub):
                    right = float((nest.model.eval()(x).argmax(1) == y).float().mean())
                assert hist.last_scores[str(sub)] == pytest.approx(right)
        if classes == length:
            with pytest.raises(sn.SortedNetError, match=r"cannot tell the classes' axis of an output \(32, 6, 6\)"):
                evaluate(nest, (x, y))
        else:
            assert evaluate(nest, (x, y)) == pytest.approx(hist.last_scores and {
                s: hist.last_scores[str(s)] for s in nest.submodels})
    # batches of several lengths, one as long as the classes are many: the others tell the axis (it was refused)
    nest = sn.wrap(conv(5), sn.Width("ch", [8, 16], out="0", inp="2"))
    data = [(torch.randn(4, 2, n, generator=g), torch.randint(0, 5, (4, n), generator=g)) for n in (7, 5, 9)]
    with torch.no_grad():
        want = {}
        for sub in nest.submodels:
            with nest.use(sub):
                hits = sum(int((nest.model.eval()(x).argmax(1) == y).sum()) for x, y in data)
            want[sub] = hits / sum(y.numel() for _, y in data)
    assert evaluate(nest, data) == pytest.approx(want)
    with pytest.raises(sn.SortedNetError, match=r"no batch of another shape tells"):
        evaluate(nest, data[1])
    one = sn.wrap(torch.nn.Sequential(torch.nn.Conv2d(2, 8, 1), torch.nn.Conv2d(8, 1, 1)),
                  sn.Width("ch", [4, 8], out="0", inp="1"))  # (one logit per position, on axis 1)
    said = re.escape("axis 1 of the output, which has shape (4, 1, 5, 6) (one logit per example or position")
    with pytest.raises(sn.SortedNetError, match=said + r".*out\.squeeze\(1\).*mean\(1\)"):
        evaluate(one, (torch.randn(4, 2, 5, 6), torch.randint(0, 2, (4, 5, 6))))
    lm = sn.wrap(torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11)),
                 sn.Width("d", [4, 8], out="0", inp="1"))  # (batch, length, vocab): the last axis
    ids = torch.randint(0, 11, (4, 5), generator=g)
    with torch.no_grad():
        want = {s: float((lm.export(s)(ids).argmax(-1) == ids).float().mean()) for s in lm.submodels}
    assert evaluate(lm, (ids, ids)) == pytest.approx(want)


def test_one_pair_of_tuple_inputs_and_a_structured_target_is_one_batch_or_refused_where_it_reads_two_ways():
    """``((xa, xb), {"y": y})`` and ``((xa, xb, xc), (y, w))`` are one (inputs, target) pair: they were iterated
    as batches (the model ran on ``xa`` alone, scored against ``xb``); ``((xa, xb), (y, w))`` reads as one pair or
    two batches and is refused, naming both; a list of two batches stays two batches."""
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, xa, xb=None, xc=None):
            h = self.a(xa if xb is None else xa + xb)
            return self.b(torch.relu(h if xc is None else h + xc.sum()))

    g = torch.Generator().manual_seed(1)
    xa, xb, xc, y = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.zeros(6), \
        torch.randint(0, 3, (6,), generator=g)
    w = torch.rand(6, generator=g)
    nest = sn.wrap(Two(), sn.Width("h", [4, 8], out="a", inp="b"))
    with torch.no_grad():
        want = {s: float(((nest.export(s)(xa, xb).argmax(-1) == y).float() * w).mean()) for s in nest.submodels}
    metric_d = lambda out, t: ((out.argmax(-1) == t["y"]).float() * t["w"]).sum()  # noqa: E731
    metric_t = lambda out, t: ((out.argmax(-1) == t[0]).float() * t[1]).sum()  # noqa: E731
    assert evaluate(nest, ((xa, xb), {"y": y, "w": w}), metric=metric_d) == pytest.approx(want)
    assert evaluate(nest, ((xa, xb, xc), (y, w)), metric=metric_t) == pytest.approx(want)
    assert evaluate(nest, ((xa, xb, xc), (y, w, w)), metric=metric_t) == pytest.approx(want)  # (a tuple: one pair)
    assert evaluate(nest, [((xa, xb), (y, w))], metric=metric_t) == pytest.approx(want)
    with pytest.raises(sn.SortedNetError, match=r"reads two ways: one \(inputs, target\) pair .* or two"):
        evaluate(nest, ((xa, xb), (y, w)), metric=metric_t)
    for batches in ([(xa, y, w), (xb, y, w)], [(xa, y, w)] * 3):  # (batches of three: refused as they are)
        with pytest.raises(sn.SortedNetError, match=r"needs \(inputs, target\) pairs .* got tuple of 3 items"):
            evaluate(nest, batches, metric=metric_t)
    one = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    plain = sn.wrap(one, sn.Width("h", [4, 8], out="0", inp="1"))
    with torch.no_grad():
        two = {s: float((plain.export(s)(torch.cat([xa, xb])).argmax(-1) == torch.cat([y, y])).float().mean())
               for s in plain.submodels}
    assert evaluate(plain, [(xa, y), (xb, y)]) == pytest.approx(two)


def test_fit_names_loss_fn_when_it_returns_no_scalar():
    nest = sn.wrap(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)),
                   sn.Width("h", [4, 8], out="0", inp="1"))
    data = [(torch.randn(10, 4), torch.randint(0, 3, (10,)))]
    before = copy.deepcopy(nest.model.state_dict())
    with pytest.raises(sn.SortedNetError, match=r"loss_fn\(output, target\) must return a scalar .* shape \(10,\) "
                                                r"\(a loss with reduction='none'\?\)"):
        sn.fit(nest, data, torch.optim.SGD(nest.model.parameters(), lr=0.1), sn.Sampler(nest, strategy="all"),
               loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in nest.model.state_dict().items())


def _bn_classifier(classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, classes))
    return model, sn.wrap(model, sn.Width("h", [4, 16], out="0", norm="1", inp="3"))


class _StoredStream(torch.utils.data.IterableDataset):
    """A stream that cannot restart: ``__iter__`` returns one stored generator."""

    def __init__(self, batches):
        self.it = iter(batches)

    def __iter__(self):
        return self.it


class _FreshStream(torch.utils.data.IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield from self.batches


class _Resetting(torch.utils.data.IterableDataset):
    """Restarts on iter(): resets and returns itself."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __iter__(self):
        self.i = 0
        return self

    def __next__(self):
        if self.i == len(self.batches):
            raise StopIteration
        self.i += 1
        return self.batches[self.i - 1]


@pytest.mark.parametrize("loader", [False, True])
def test_an_eval_stream_that_cannot_restart_is_said_before_training_and_nothing_is_drawn(loader):
    model, nest = _bn_classifier()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(10, 8, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(3)]
    wrap = (lambda d: torch.utils.data.DataLoader(d, batch_size=None)) if loader else (lambda d: d)
    with pytest.warns(UserWarning, match="read twice gave another first batch"):
        sn.fit(nest, data[:1], torch.optim.SGD(model.parameters(), lr=0.0), sn.Sampler(nest, k=1),
               eval_data=wrap(_StoredStream(data)), progress=False)
    # streams that restart (a generator function, one that resets and returns itself) are scored on all of
    # their examples, as the same batches in a list, with no warning and no draw from torch's random stream
    for stream in (_FreshStream(data), *([_Resetting(data)] if loader else [])):  # (an iterator itself: refused,
        # as fit cannot tell whether it restarts; in a DataLoader, each pass calls iter() on it)
        torch.manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hist = sn.fit(nest, data[:1], torch.optim.SGD(model.parameters(), lr=0.0), sn.Sampler(nest, k=1),
                          eval_data=wrap(stream), progress=False)
        after = torch.rand(1)
        assert hist.last_scores == {str(s): v for s, v in evaluate(nest, data).items()}
        torch.manual_seed(5)
        sn.fit(nest, data[:1], torch.optim.SGD(model.parameters(), lr=0.0), sn.Sampler(nest, k=1), progress=False)
        assert torch.equal(after, torch.rand(1))


def test_a_list_of_two_dict_batches_of_the_same_keys_is_not_read_as_inputs_and_target():
    model, nest = _bn_classifier()
    g = torch.Generator().manual_seed(2)
    b1, b2 = ({"input": torch.randn(10, 8, generator=g), "labels": torch.randint(0, 3, (10,), generator=g)}
              for _ in range(2))
    metric = lambda o, y: (o.argmax(-1) == y["labels"]).sum()  # noqa: E731
    for data in ([b1, b2], [b1], [b1, b2, b1]):
        with pytest.raises(sn.SortedNetError, match=r"got dict \(keys \['input', 'labels'\]\): a batch of keyword"):
            evaluate(nest, data, metric=metric)
    # inputs and a target of other keys stay one pair
    wrapped = _KeywordModel(_bn_classifier()[0])
    sn.Nest.of(wrapped.m).unwrap()
    nest2 = sn.wrap(wrapped, sn.Width("h", [4, 16], out="m.0", norm="m.1", inp="m.3"))
    got = evaluate(nest2, [{"input": b1["input"]}, {"labels": b1["labels"]}], metric=metric)
    with torch.no_grad(), nest2.use("h=16"):
        want = (wrapped.eval()(input=b1["input"]).argmax(-1) == b1["labels"]).float().mean().item()
    assert got[nest2.resolve("h=16")] == pytest.approx(want)
    # a tuple of two dicts of the same keys is one (inputs, target) pair: a denoiser's (noisy, clean)
    noisy, clean = {"input": b1["input"] + 0.1}, {"input": b1["input"]}
    score = lambda o, y: -(o.sum(-1) - y["input"].sum(-1)).abs().sum()  # noqa: E731
    got = evaluate(nest2, (noisy, clean), metric=score)
    with torch.no_grad(), nest2.use("h=4"):
        want = score(wrapped.eval()(**noisy), clean).item() / 10
    assert got[nest2.resolve("h=4")] == pytest.approx(want)


class _KeywordModel(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input):
        return self.m(input)


@pytest.mark.parametrize("shape", [(12, 1), (12, 1, 5)])
def test_a_one_logit_output_on_the_default_loss_is_refused_before_training(shape):
    from models import assert_unchanged, snapshot

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1))
    nest = sn.wrap(model, sn.Width("h", [4, 16], out="0", norm="1", inp="3"))
    x = torch.randn(12, 8)
    if len(shape) == 3:  # (a (batch, 1, length) output: one class on axis 1)
        model.append(torch.nn.Unflatten(1, (1, 1)))
        model.append(_Repeat(shape[2]))
    y = torch.zeros(shape[:1] + shape[2:], dtype=torch.long)
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=r"one logit per example.*binary_cross_entropy_with_logits"):
        sn.fit(nest, [(x, y)] * 3, torch.optim.SGD(model.parameters(), lr=0.1), sn.Sampler(nest, k=1),
               progress=False)
    assert_unchanged(model, before)


class _Repeat(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x.expand(*x.shape[:-1], self.n)


@pytest.mark.parametrize("bad", [3, -2])
def test_a_target_out_of_the_class_range_at_the_first_step_changes_no_batchnorm_statistic(bad):
    from models import assert_unchanged, snapshot

    model, nest = _bn_classifier()
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    y[4] = bad
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=r"not a class index in 0\.\.2"):
        sn.fit(nest, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1), sn.Sampler(nest, k=1), progress=False)
    assert_unchanged(model, before)


def test_evaluate_names_the_target_or_the_dict_at_fault():
    _, nest = _bn_classifier()
    x = torch.randn(4, 8)
    for y, name in ((np.zeros(4, dtype=np.int64), "ndarray"), ([0, 1, 2, 0], "list"), (1, "int")):
        with pytest.raises(sn.SortedNetError, match=f"batch 0's target is a {name}"):
            evaluate(nest, (x, y))
    with pytest.raises(sn.SortedNetError, match=r"batch 0's target is a tensor of shape \(\)"):
        evaluate(nest, (x, torch.tensor(1)))
    with pytest.raises(sn.SortedNetError, match=r"one dict \(keys \['input', 'labels'\]\)"):
        evaluate(nest, {"input": x, "labels": torch.zeros(4, dtype=torch.long)})


class _ShuffledStream(torch.utils.data.IterableDataset):
    """Restarts on iter(), in an order drawn from torch's, NumPy's or Python's random stream."""

    def __init__(self, x, y, draw):
        self.x, self.y, self.draw = x, y, draw

    def __iter__(self):
        n = len(self.x)
        order = (torch.randperm(n).tolist() if self.draw == "torch" else
                 np.random.permutation(n).tolist() if self.draw == "numpy" else random.sample(range(n), n))
        for i in order:
            yield self.x[i], self.y[i]


def _Encoding(data):  # noqa: N802
    """A tokenizer's BatchEncoding: a mapping that is no dict (collated as itself)."""
    from transformers import BatchEncoding

    return BatchEncoding(data)


class _EncodedStream(torch.utils.data.IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        for i in range(len(self.x)):
            yield _Encoding({"input": self.x[i]}), self.y[i]


@pytest.mark.parametrize("stream", ["torch", "numpy", "python", "encoding"])
def test_an_eval_stream_that_restarts_is_no_warning_whether_it_shuffles_or_holds_mappings(stream):
    model, nest = _bn_classifier()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    if stream == "encoding":
        wrapped = _KeywordModel(_bn_classifier()[0])
        sn.Nest.of(wrapped.m).unwrap()
        nest = sn.wrap(wrapped, sn.Width("h", [4, 16], out="m.0", norm="m.1", inp="m.3"))
        model, data = wrapped, _EncodedStream(x, y)
        collate = lambda b: (_Encoding({"input": torch.stack([e["input"] for e, _ in b])}),  # noqa: E731
                             torch.stack([t for _, t in b]))
        loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=collate)
    else:
        loader = torch.utils.data.DataLoader(_ShuffledStream(x, y, stream), batch_size=8)
    train = [(x[:8], y[:8])] if stream != "encoding" else [({"input": x[:8]}, y[:8])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sn.fit(nest, train, torch.optim.SGD(model.parameters(), lr=0.0), sn.Sampler(nest, k=1), eval_data=loader,
               progress=False)


@pytest.mark.parametrize("shift", [1, -1])
def test_the_default_accuracy_refuses_targets_out_of_the_class_range(shift):
    """Labels shifted by one (1..C for C logits) scored a plausible, meaningless accuracy; fit refused the same
    labels as training targets. Refused in evaluate and in fit's eval_data, before training."""
    from models import assert_unchanged, snapshot

    model, nest = _bn_classifier()
    x, y = torch.randn(12, 8), torch.arange(12) % 3
    bad = y + shift
    with pytest.raises(sn.SortedNetError, match=r"(?s)not a class index in 0\.\.2 \(nor the ignored -100\): \[" +
                       ("3" if shift == 1 else "-1") + r".*map it to -100"):
        evaluate(nest, (x, bad))
    before = snapshot(model)
    with pytest.raises(sn.SortedNetError, match=r"not a class index in 0\.\.2"):
        sn.fit(nest, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1), sn.Sampler(nest, k=1),
               eval_data=(x, bad), progress=False)
    assert_unchanged(model, before)
    ignored = y.clone()
    ignored[0] = -100  # (the ignore index is no class and no error)
    assert set(evaluate(nest, (x, ignored)).values()) <= {v / 11 for v in range(12)}


def test_the_advice_for_an_ignore_index_of_ones_own_works_on_uint8_masks():
    """Segmentation masks load as uint8; the advice ``y.masked_fill(y == 255, -100)`` wrapped -100 to the class 156
    there, scored as a class. The advice casts first, and following it leaves those pixels out."""
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 182, 1))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="2"))
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        y = model.eval()(x).argmax(1).to(torch.uint8)  # (every pixel right for the full model)
    y[:, :2] = 255
    with pytest.raises(sn.SortedNetError, match=r"y\.long\(\)\.masked_fill\(y == 255, -100\)") as info:
        evaluate(nest, (x, y))
    fixed = eval(re.search(r"(y\.long\(\)\.masked_fill\(y == 255, -100\))", str(info.value)).group(1))
    assert evaluate(nest, (x, fixed))[nest.largest] == 1.0


class _Wide(torch.nn.Module):
    """(batch, classes, length) logits; the class count equals the first batch's length."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv1d(2, 8, 1), torch.nn.Conv1d(8, 3, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_fit_checks_its_eval_data_as_evaluate_reads_it_where_one_batch_leaves_the_classes_axis_open():
    """fit's check of its eval set ran evaluate on the first batch alone: (B, 3, 3) logits leave the classes'
    axis open there, which the second batch (length 5) settles, so fit refused an eval set evaluate scores."""
    torch.manual_seed(0)
    model = _Wide()
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="a", inp="b"))
    ev = [(torch.randn(4, 2, 3), torch.randint(0, 3, (4, 3))), (torch.randn(4, 2, 5), torch.randint(0, 3, (4, 5)))]
    want = {str(s): v for s, v in evaluate(nest, ev).items()}
    hist = sn.fit(nest, ev[1:], torch.optim.SGD(model.parameters(), lr=0.0), sn.Sampler(nest, k=1),
                  loss_fn=F.cross_entropy, eval_data=ev, progress=False)
    assert hist.last_scores == want
    with pytest.raises(sn.SortedNetError, match="cannot tell the classes' axis"):  # (no batch tells: refused)
        sn.fit(nest, ev[1:], torch.optim.SGD(model.parameters(), lr=0.0), sn.Sampler(nest, k=1),
               loss_fn=F.cross_entropy, eval_data=ev[:1], progress=False)


class _Box:
    """A batch object of the user's own, without a value comparison (== is identity)."""

    def __init__(self, x):
        self.x = x


class _ReadsBox(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

    def forward(self, batch):
        return self.b(torch.relu(self.a(batch.x)))


class _BoxStream(torch.utils.data.IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):  # (fresh objects at every pass)
        return iter([(_Box(self.x[i:i + 8]), self.y[i:i + 8]) for i in (0, 8)])


@pytest.mark.parametrize("loader", [False, True])
def test_an_eval_stream_of_batch_objects_of_ones_own_that_restarts_is_no_warning(loader):
    """Two reads of a stream that restarts give equal batch objects, not the same ones: compared by identity, they
    were 'another first batch', and fit warned of a stream that cannot restart."""
    torch.manual_seed(0)
    model = _ReadsBox()
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="a", inp="b"))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    stream = _BoxStream(x, y)
    data = torch.utils.data.DataLoader(stream, batch_size=None) if loader else stream
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sn.fit(nest, [(_Box(x), y)], torch.optim.SGD(model.parameters(), lr=0.0), sn.Sampler(nest, k=1),
               eval_data=data, progress=False)
    other = _BoxStream(x.flip(0), y)  # (another first batch: said)
    with pytest.warns(UserWarning, match="another first batch"):
        sn.fit(nest, [(_Box(x), y)], torch.optim.SGD(model.parameters(), lr=0.0), sn.Sampler(nest, k=1),
               eval_data=_Alternating(stream, other), progress=False)


class _Alternating:
    def __init__(self, *streams):
        self.streams, self.i = streams, 0

    def __iter__(self):
        self.i += 1
        return iter(self.streams[self.i % 2])


@pytest.mark.parametrize("inputs", ["dataclass", "mapping", "numpy"])
def test_one_pair_whose_inputs_are_of_any_type_with_a_tensor_target_is_one_pair(inputs):
    """``evaluate(nest, (inputs, y))`` read a pair of a dataclass / a mapping of one's own / an array with a
    tensor target as two batches and refused it ("got DC"); in a list, the same pair was scored."""
    import collections.abc
    import dataclasses

    @dataclasses.dataclass
    class DC:
        x: torch.Tensor

    class MyMap(collections.abc.Mapping):
        def __init__(self, d):
            self.d = d

        def __getitem__(self, k):
            return self.d[k]

        def __iter__(self):
            return iter(self.d)

        def __len__(self):
            return len(self.d)

    class Reads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, batch=None, x=None):
            x = (batch.x if isinstance(batch, DC) else batch["x"] if isinstance(batch, MyMap)
                 else torch.as_tensor(batch) if batch is not None else x)
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = Reads()
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="a", inp="b"))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    given = DC(x) if inputs == "dataclass" else MyMap({"x": x}) if inputs == "mapping" else x.numpy()
    want = evaluate(nest, [(x, y)])
    assert evaluate(nest, (given, y)) == want == evaluate(nest, [(given, y)])


@pytest.mark.parametrize("out", ["vector", "column"])
def test_one_logit_per_example_is_named_as_such_and_the_loss_fit_needs_with_it(out):
    """(B,) logits against (B,) targets were refused as a shape mismatch of argmax ("e.g. y.squeeze(-1)"); a
    (B, 1) column sent the user to metric=, and fit's default loss then refused it again: one message names one
    logit per example and both metric= and loss_fn=."""
    import torch.nn as nn

    class Single(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

        def forward(self, x):
            z = self.b(torch.relu(self.a(x)))
            return z.squeeze(-1) if out == "vector" else z

    torch.manual_seed(0)
    model = Single()
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="a", inp="b"))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    for run in (lambda: evaluate(nest, (x, y)),
                lambda: sn.fit(nest, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1), sn.Sampler(nest, k=1),
                               loss_fn=lambda o, t: F.binary_cross_entropy_with_logits(o.reshape(-1), t.float()),
                               eval_data=[(x, y)], progress=False)):
        with pytest.raises(sn.SortedNetError, match=r"(?s)one logit per example.*pass metric=.*loss_fn="):
            run()


def test_a_metric_returning_per_example_values_is_named_as_the_fault():
    model, nest = _tiny_classifier(out=3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with pytest.raises(sn.SortedNetError, match=r"the metric returned t\(10,\) on a batch; it returns the SUM"):
        evaluate(nest, (x, y), metric=lambda o, t: (o.argmax(-1) == t).float())
    assert evaluate(nest, (x, y), metric=lambda o, t: (o.argmax(-1) == t).sum()) == evaluate(nest, (x, y))


def test_fit_keeps_the_eval_loaders_own_generator_as_it_found_it():
    """A train and an eval DataLoader sharing generator=g: fit's up-front check of the eval set drew from g, so
    the training order differed from the same run with its eval set given as a list."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    dataset = torch.utils.data.TensorDataset(x, y)
    finals = []
    for eval_as_loader in (False, True):
        model, nest = _tiny_classifier(out=3)
        g = torch.Generator().manual_seed(7)
        train = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, generator=g)
        ev = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, generator=g) if eval_as_loader \
            else [(x, y)]
        sn.fit(nest, train, torch.optim.SGD(model.parameters(), lr=0.1), sn.Sampler(nest, k=1, seed=0),
               eval_data=ev, eval_every=2, progress=False)
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        assert torch.equal(a, b)


class _UsedUp:
    """A stream whose __iter__ returns one stored iterator: its first batches repeat, so fit's check cannot tell."""

    def __init__(self, batches):
        self.it = iter(batches)

    def __iter__(self):
        return self.it


def test_an_eval_stream_used_up_mid_training_is_named_as_such():
    model, nest = _tiny_classifier(out=3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(sn.SortedNetError, match=r"the evaluation at step \d+ got no batches: a _UsedUp that gave "
                                                r"batches before gives none now"):
        sn.fit(nest, [(x, y)] * 6, torch.optim.SGD(model.parameters(), lr=0.1), sn.Sampler(nest, k=1),
               eval_data=_UsedUp([(x, y)] * 3), eval_every=1, progress=False)


def test_a_custom_metric_takes_a_list_of_references_per_example():
    model, nest = _tiny_classifier(out=3)
    x = torch.randn(3, 4)
    refs = [["a", "b"], ["c"], ["d", "e"]]
    got = evaluate(nest, [(x, refs)], metric=lambda o, t: float(sum(len(r) for r in t)))
    assert got[nest.largest] == 5 / 3


def test_fit_refuses_what_would_train_silently_otherwise_and_names_the_fix():
    """Three inputs fit took without effect or with a misleading message: distill= with a sampler of k=1 (each
    step's one sub-model is its own teacher: weights bit-identical to a run without it, no word); loader=(x, y),
    one pair (eval_data takes one; the loader message said only "got a Tensor"); an integer loss (said "computed
    under torch.no_grad()?")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="2"))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"fit\(distill=...\) with Sampler\(2 sub-models, k=1.* its own "
                                                r"teacher.*k >= 2"):
        sn.fit(nest, [(x, y)], opt, sn.Sampler(nest, k=1, seed=0), distill=sn.Distill(), progress=False)
    with pytest.raises(sn.SortedNetError, match=r"must yield \(inputs, target\) pairs; got a Tensor; the loader given "
                                                r"is one \(inputs, target\) pair itself: .*\[\(x, y\)\]"):
        sn.fit(nest, (x, y), opt, sn.Sampler(nest, k=2, seed=0), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(sn.SortedNetError, match=r"loss of h=4 is an integer tensor \(torch.int64\)"):
        sn.accumulate(nest, ["h=4"], lambda: torch.tensor(1))
    with pytest.raises(sn.SortedNetError, match=r"must yield \(inputs, target\) pairs; got a Tensor; the loader given "
                                                r"is one \(inputs, target\) pair itself"):
        sn.fit(nest, [x, y], opt, sn.Sampler(nest, k=2, seed=0), progress=False)
    sn.fit(nest, [(x, y)], opt, sn.Sampler(nest, k=2, seed=0), distill=sn.Distill(), progress=False)

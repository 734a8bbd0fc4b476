"""torch.compile of a live nest: any sub-model runs correctly, one compile per
distinct sub-model (switching back reuses it), gradients match eager, and
exported sub-models compile as usual. Backend aot_eager (CPU, seconds)."""

from __future__ import annotations

import random

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import sortednet as sn
from models import FAMILIES

FAMS = ["mlp", "cnn_bn_residual", "lm_width_heads_depth"]


def three(nest):
    subs = nest.submodels
    return [subs[0], subs[len(subs) // 2], subs[-1]]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMS)
def test_compiled_equals_eager_and_compiles_once_per_submodel(family):
    case = FAMILIES[family]()
    nest = sn.wrap(case.model, *case.dims)
    if family == "cnn_bn_residual":   # per-sub-model BatchNorm statistics are read under compile too
        nest.calibrate([torch.randn(8, *case.example.shape[1:]) for _ in range(2)], batches=2)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(nest.model, backend=counter)
    subs = three(nest)
    with torch.no_grad():
        for rnd in range(2):
            for sub in subs:
                with nest.use(sub):
                    want = nest.model(case.example)
                    got = compiled(case.example)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert counter.frame_count == len(subs), f"round {rnd}: {counter.frame_count} compiles"
        nest.activate(subs[0])          # the nest-wide default is a separate entry (one compile) ...
        try:
            torch.testing.assert_close(compiled(case.example), nest.model(case.example), rtol=1e-5, atol=1e-5)
            for sub in subs:            # ... and does not invalidate the graphs entered through use()
                with nest.use(sub):
                    torch.testing.assert_close(compiled(case.example), nest.model(case.example),
                                               rtol=1e-5, atol=1e-5)
            assert counter.frame_count == len(subs) + 1
        finally:
            nest.activate(nest.largest)


@pytest.mark.slow
def test_compiled_training_step_gradients_equal_eager():
    case = FAMILIES["sequential"]()   # Depth + Width: sliced views and skipped blocks under autograd
    nest = sn.wrap(case.model, *case.dims)
    compiled = torch.compile(nest.model, backend="aot_eager")
    for sub in three(nest)[:2]:
        grads = []
        for fn in (nest.model, compiled):
            nest.model.zero_grad(set_to_none=True)
            with nest.use(sub):
                fn(case.example).float().pow(2).mean().backward()
            grads.append({n: p.grad.clone() for n, p in nest.model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys()
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
def test_exported_submodel_compiles_as_usual():
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    small = nest.export(nest.smallest)
    with nest.use(nest.smallest), torch.no_grad():
        torch.testing.assert_close(torch.compile(small, backend="aot_eager")(case.example), nest.model(case.example))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_random_switching_with_use_and_activate_stays_correct(seed):
    """Guards must follow every way a sub-model becomes active: a random mix of
    use(sub), activate(sub) and plain calls, compiled vs eager after each step.
    Compiles: at most one per distinct (sub-model, use or default) pair."""
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(nest.model, backend=counter)
    rng = random.Random(seed)
    subs = list(nest.submodels)
    seen = set()
    try:
        with torch.no_grad():
            for _ in range(14):
                op, sub = rng.choice(["use", "activate", "call"]), rng.choice(subs)
                if op == "activate":
                    nest.activate(sub)
                    continue
                if op == "use":
                    with nest.use(sub):
                        got, want = compiled(case.example), nest.model(case.example)
                else:
                    got, want = compiled(case.example), nest.model(case.example)
                seen.add((op, sub if op == "use" else nest.active))
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{op} {sub}")
        assert counter.frame_count <= len(seen)
    finally:
        nest.activate(nest.largest)

"""The compiled path of a live nest (issue 12): ``torch.compile`` of the wrapped model under
``use(sub)`` traces ONE graph per sub-model and mode, without graph breaks (``fullgraph=True``),
and switching back to a sub-model already seen never recompiles, for inference and training.
Backend ``eager`` for speed; one inductor test where a C++ compiler exists."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import sortednet as sn
from models import FAMILIES

FAMS = ["mlp", "attn_block", "cnn_bn_residual", "lm_width_heads_depth", "sequential"]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def three(nest: sn.Nest) -> list[sn.SubModel]:
    subs = list(nest.submodels)
    return list(dict.fromkeys([subs[0], subs[len(subs) // 2], subs[-1]]))


def step(fn, model, example, train: bool):
    """Output of ``fn(example)`` and, when training, the gradients it leaves on ``model``."""
    if train:
        model.zero_grad(set_to_none=True)
        out = fn(example)
        out.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads
    with torch.no_grad():
        return fn(example), {}


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("family", FAMS)
def test_one_graph_per_submodel_no_recompile_no_graph_break(family, train):
    case = FAMILIES[family]()
    nest = sn.wrap(case.model, *case.dims)
    case.model.train(train)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(case.model, backend=counter, fullgraph=True)  # a graph break raises
    subs = three(nest)
    order = [*subs, *subs[::-1], *subs]   # switch forward, back, forward again
    for i, sub in enumerate(order):
        with nest.use(sub):
            want, want_g = step(case.model, case.model, case.example, train)
            got, got_g = step(compiled, case.model, case.example, train)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{sub}")
        assert got_g.keys() == want_g.keys()
        for n in want_g:
            torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6, msg=f"{sub} {n}")
        seen = len(set(order[: i + 1]))
        assert counter.frame_count == seen, f"after {i + 1} calls ({sub}): {counter.frame_count} graphs for {seen}"
    assert counter.op_count > 0


def test_threads_compiled_each_see_their_own_submodel():
    """Two threads serving different sub-models through one compiled model get their own graphs. After a
    ``torch.fx.symbolic_trace`` in this thread (torch 2.14 keeps its tracing flag per thread), a graph that read
    the flag guarded on this thread's value and recompiled in every new serving thread."""
    import threading

    torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(case.model, backend=counter, fullgraph=True)
    subs = three(nest)
    with torch.no_grad():
        want = {}
        for s in subs:
            with nest.use(s):
                want[s] = case.model(case.example)
                compiled(case.example)
        frames = counter.frame_count
        errors: list[BaseException] = []

        def serve(s):
            try:
                for _ in range(5):
                    with torch.no_grad(), nest.use(s):  # grad mode is per thread
                        torch.testing.assert_close(compiled(case.example), want[s])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=serve, args=(s,)) for s in subs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert counter.frame_count == frames


def _cxx() -> str | None:
    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


@pytest.mark.slow
@pytest.mark.skipif(_cxx() is None, reason="inductor on CPU needs a C++ compiler (g++, c++ or clang++ on PATH)")
def test_inductor_one_graph_per_submodel_and_mode():
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(case.model, backend=counter, fullgraph=True)
    subs = [nest.smallest, nest.largest]
    graphs = 0
    for train in (False, True):
        case.model.train(train)
        for sub in [*subs, *subs[::-1]]:
            with nest.use(sub):
                want, want_g = step(case.model, case.model, case.example, train)
                got, got_g = step(compiled, case.model, case.example, train)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            for n in want_g:
                torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-5, msg=n)
        graphs += len(subs)
        assert counter.frame_count == graphs, f"train={train}: {counter.frame_count} graphs, want {graphs}"

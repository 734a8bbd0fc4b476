"""torch.compile of a live nest: any sub-model runs correctly, one compile per
distinct sub-model (switching back reuses it), gradients match eager, and
exported sub-models compile as usual. Backend aot_eager (CPU, seconds)."""

from __future__ import annotations

import contextlib
import random
import threading

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import sortednet as sn
from models import FAMILIES

FAMS = ["mlp", "cnn_bn_residual", "lm_width_heads_depth"]


def three(nest):
    subs = nest.submodels
    return [subs[0], subs[len(subs) // 2], subs[-1]]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


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


@pytest.mark.parametrize("family", ["mlp", "lm_width_heads_depth"])
def test_context_lookup_breaks_no_graph_and_switching_back_reuses_graphs(family):
    """The active sub-model lives in a ContextVar, which Dynamo cannot call inside a graph:
    it is read through a C-level property that Dynamo guards on. No graph break, one
    graph per distinct sub-model (entered by ``use`` or as the default), none on return."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    case = FAMILIES[family]()
    nest = sn.wrap(case.model, *case.dims)
    counters.clear()
    cnt = CompileCounter()
    compiled = torch.compile(nest.model, backend=cnt)
    subs = three(nest)
    try:
        with torch.no_grad():
            for _ in range(2):
                for sub in subs:
                    with nest.use(sub):
                        torch.testing.assert_close(compiled(case.example), nest.model(case.example))
                assert cnt.frame_count == len(subs)
            nest.activate(subs[0])                       # the default: one more graph ...
            torch.testing.assert_close(compiled(case.example), nest.model(case.example))
            nest.activate(subs[1])                       # ... per distinct default
            torch.testing.assert_close(compiled(case.example), nest.model(case.example))
            for sub in subs:                             # use() graphs are still valid
                with nest.use(sub):
                    torch.testing.assert_close(compiled(case.example), nest.model(case.example))
        assert cnt.frame_count == len(subs) + 2
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        nest.activate(nest.largest)


def test_compiled_inference_does_not_guard_on_training_forwards_elsewhere():
    """A forward with gradients in another thread counts itself in the nest's state (reentrant checkpoint
    pinning reads the count when gradients are off): compiled graphs must not guard on that count, or every
    distinct count recompiled them (up to the recompile limit)."""
    from torch._dynamo.testing import CompileCounter

    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    started, release = threading.Event(), threading.Event()
    trainer: list = []

    def wait(module, args):  # holds the training thread's forward open (registered before compiling)
        if threading.current_thread() in trainer:
            started.set()
            release.wait(60)

    case.model.register_forward_pre_hook(wait)
    cnt = CompileCounter()
    compiled = torch.compile(nest.model, backend=cnt)
    sub = three(nest)[0]
    with torch.no_grad():
        for scope in (nest.use(sub), contextlib.nullcontext()):  # a use block, and the default
            started.clear()
            release.clear()
            with scope:
                compiled(case.example)
                frames = cnt.frame_count
                t = threading.Thread(target=lambda: case.model(case.example))
                trainer[:] = [t]
                t.start()
                try:
                    assert started.wait(60)
                    assert nest._state.training == 1
                    torch.testing.assert_close(compiled(case.example), nest.model(case.example))
                finally:
                    release.set()
                    t.join(60)
                compiled(case.example)
            assert nest._state.training == 0
            assert cnt.frame_count == frames


def test_compiled_model_follows_each_threads_context():
    """Guards are evaluated in the caller's context: threads (and a thread started in a copied
    context) each run their own sub-model through one compiled model."""
    import contextvars
    import threading

    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    compiled = torch.compile(nest.model, backend="eager")
    subs = three(nest)
    want = {}
    with torch.no_grad():
        for sub in subs:
            with nest.use(sub):
                want[sub] = nest.model(case.example)
                compiled(case.example)
        got, errors = {}, []

        def work(i, sub):
            try:
                for _ in range(5):
                    if sub is None:
                        got[i] = (nest.active, compiled(case.example))
                    else:
                        with nest.use(sub):
                            got[i] = (sub, compiled(case.example))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        ts = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(subs)]
        with nest.use(subs[0]):
            ctx = contextvars.copy_context()
        ts.append(threading.Thread(target=ctx.run, args=(work, len(subs), None)))
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    assert not errors, errors
    assert got[len(subs)][0] == subs[0]                  # the copied context carried use(subs[0])
    for sub, y in got.values():
        torch.testing.assert_close(y, want[sub])


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mlp", "sequential", "lm_width_heads_depth", "tied_lm", "torch_encoder",
                                    "cnn_bn_residual"])
def test_nest_compile_training_gradients_equal_eager(family):
    """nest.compile(): sliced parameters enter the graph as inputs; the gradients (full-size .grad,
    zero outside the slice), the loss, the buffers a training forward updates (BatchNorm running
    statistics, sliced) and the graph count are those of eager training."""
    case = FAMILIES[family]()
    nest = sn.wrap(case.model, *case.dims)
    nest.model.train()
    counter = CompileCounterWithBackend("aot_eager")
    step = nest.compile(backend=counter)
    assert step.names, "no sliced parameter handed over"
    subs = three(nest)
    for rnd in range(2):
        for sub in subs:
            got = []
            for fn in (nest.model, step):
                nest.model.zero_grad(set_to_none=True)
                before = {n: b.clone() for n, b in nest.model.named_buffers()}
                with nest.use(sub):
                    loss = fn(case.example).float().pow(2).mean()
                loss.backward()                   # outside use(): the gradient path needs no context
                got.append((loss.detach(), _grads(nest.model), {n: b.clone() for n, b in nest.model.named_buffers()}))
                with torch.no_grad():             # both runs start from the same statistics
                    for n, b in nest.model.named_buffers():
                        b.copy_(before[n])
            (l_eager, g_eager, b_eager), (l_comp, g_comp, b_comp) = got
            for n in b_eager:
                torch.testing.assert_close(b_comp[n], b_eager[n], rtol=1e-5, atol=1e-6, msg=f"{sub} buffer {n}")
            torch.testing.assert_close(l_comp, l_eager, rtol=1e-5, atol=1e-6)
            assert g_comp.keys() == g_eager.keys(), sub
            for n in g_eager:
                assert g_comp[n].shape == dict(nest.model.named_parameters())[n].shape
                torch.testing.assert_close(g_comp[n], g_eager[n], rtol=1e-4, atol=1e-5, msg=f"{sub} {n}")
        assert counter.frame_count == len(subs), f"round {rnd}: {counter.frame_count} graphs"


@pytest.mark.slow
def test_nest_compile_under_no_grad_and_accumulating_over_submodels():
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    step = nest.compile(backend="aot_eager")
    subs = three(nest)
    with torch.no_grad():
        for sub in subs:
            with nest.use(sub):
                torch.testing.assert_close(step(case.example), nest.model(case.example), rtol=1e-5, atol=1e-6)
    for fn in (nest.model, step):  # sorted training: several sub-models accumulate into one .grad
        nest.model.zero_grad(set_to_none=True)
        sn.accumulate(nest, subs, lambda fn=fn: fn(case.example).float().pow(2).mean())
        if fn is nest.model:
            want = _grads(nest.model)
    got = _grads(nest.model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=n)


def test_nest_compile_hands_over_plain_prefix_views_only():
    """Fused blocks (a cat of per-block slices) and custom computed attributes stay in the graph."""
    nn = torch.nn
    net = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(6, 3))
    nest = sn.wrap(net, sn.Width("h", [3, 6], out="0", inp="2", chunks={"0": 2}))
    from sortednet.compiled import handed_over

    names = handed_over(nest)
    assert [k for k, _, _ in names] == ["2.weight", "2.bias"], names


class _Shapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Shapes of every tensor the ops of a region return (forward and backward kernels alike)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.slow
def test_nest_compile_backward_never_builds_a_full_size_weight_gradient():
    """The point of nest.compile(): a small sub-model's backward makes gradients of its own size only,
    while plain torch.compile(model) (slicing inside the graph) makes the full weight's."""
    nn = torch.nn
    net = nn.Sequential(nn.Linear(24, 96), nn.ReLU(), nn.Linear(96, 24))
    nest = sn.wrap(net, sn.Width("h", [16, 96], out="0", inp="2"), inplace_min_numel=1)
    x = torch.randn(5, 24)
    full = {tuple(net[0].weight.shape), tuple(net[2].weight.shape)}
    seen = {}
    for name, fn in (("nest.compile", nest.compile(backend="aot_eager")),
                     ("torch.compile", torch.compile(net, backend="aot_eager"))):
        for p in net.parameters():  # .grad exists: its first creation is full-size either way
            p.grad = torch.zeros_like(p)
        with nest.use("h=16"):
            loss = fn(x).square().mean()
        with _Shapes() as rec:
            loss.backward()
        seen[name] = rec.shapes & full
    assert seen["nest.compile"] == set(), seen
    assert seen["torch.compile"], "control: in-graph slicing should build a full-size gradient"


def test_nest_compile_refuses_unknown_keywords():
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    with pytest.raises(sn.SortedNetError, match="bogus"):
        nest.compile(bogus=1)
    with pytest.raises(sn.SortedNetError, match="model"):
        nest.compile(model=case.model)
    nest.unwrap()
    with pytest.raises(sn.SortedNetError):
        nest.compile()


def test_nest_compile_pins_the_default_for_a_whole_call_across_graph_breaks():
    """A compiled call outside `use` with a graph break: an activate from another thread at the break made the
    second graph read the new default (a forward mixing two sub-models); nest.compile() pins the call."""
    ready, go, on = threading.Event(), threading.Event(), [False]

    @torch._dynamo.disable
    def pause():
        if on[0]:
            ready.set()
            go.wait(10)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc2(torch.relu(self.fc1(x)))
            pause()  # a graph break
            return self.fc4(torch.relu(self.fc3(h)))

    torch.manual_seed(0)
    net = Net().eval()
    nest = sn.wrap(net, sn.Width("h", [2, 8], out=["fc1", "fc3"], inp=["fc2", "fc4"]))
    x = torch.randn(3, 4)
    with torch.no_grad(), nest.use("h=2"):
        want = net(x)
    step = nest.compile(backend="eager")
    with torch.no_grad():
        nest.activate("h=2")
        step(x)
        nest.activate("h=8")
        step(x)
        nest.activate("h=2")
        on[0] = True
        other = threading.Thread(target=lambda: (ready.wait(10), nest.activate("h=8"), go.set()))
        other.start()
        got = step(x)
        other.join()
        on[0] = False
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


class _Break(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x):
        h = self.fc1(x).relu()
        torch._dynamo.graph_break()  # the forward runs in two graphs, functional_call's swaps eagerly
        return self.fc2(h)


def test_nest_compile_interrupted_anywhere_in_the_swaps_leaves_the_model_its_own_parameters(monkeypatch):
    """A Ctrl-C inside functional_call's swap in or swap back (each stops at the first error, and its swap in
    puts nothing back on a KeyboardInterrupt) must not leave a sliced view as a module's weight: the model's
    own Parameters come back, and the next step is the eager step."""
    import torch.nn.utils._named_member_accessor as accessor

    real = accessor.swap_tensor
    torch.manual_seed(0)
    net = _Break()
    nest = sn.wrap(net, sn.Width("h", [4, 12], out="fc1", inp="fc2"))
    own = dict(net.named_parameters())
    x = torch.randn(3, 8)
    with nest.use("h=4"):
        want = nest.model(x).detach()
    step = nest.compile(backend="eager")
    k, fired = 0, True
    while fired:
        k += 1
        calls = iter(range(1, 10**6))

        def swap(*a, k=k, calls=calls, **kw):
            if next(calls) == k:
                raise KeyboardInterrupt("injected")
            return real(*a, **kw)

        monkeypatch.setattr(accessor, "swap_tensor", swap)
        try:
            with nest.use("h=4"):
                step(x).sum().backward()
            fired = False
        except KeyboardInterrupt:
            fired = True
        monkeypatch.setattr(accessor, "swap_tensor", real)
        now = dict(net.named_parameters())
        assert now.keys() == own.keys() and all(now[n] is own[n] for n in own), f"interrupt at swap {k}"
        with nest.use("h=4"):
            torch.testing.assert_close(step(x), want, msg=f"interrupt at swap {k}")
    assert k > 4, f"only {k - 1} swaps seen: the test reached no swap back"


def test_use_inside_a_compiled_function_splits_it_there_and_fullgraph_says_why():
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    subs = three(nest)

    def body(x, sub):
        with nest.use(sub):
            return nest.model(x) * 2

    split = torch.compile(body, backend="eager")
    for sub in subs + subs[::-1]:
        with nest.use(sub):
            want = nest.model(case.example) * 2
        torch.testing.assert_close(split(case.example, sub), want, rtol=1e-5, atol=1e-5)
    def body2(x, sub):  # (a new code object: Dynamo's cache of body's frames is per code object)
        with nest.use(sub):
            return nest.model(x) * 2

    whole = torch.compile(body2, backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"nest\.use\(\) sets a context variable"):
        whole(case.example, subs[0])
    assert nest.active == nest.largest  # (nothing left in force)


@pytest.mark.parametrize("warm", [False, True])
def test_activate_inside_a_compiled_function_splits_it_there_and_fullgraph_says_why(warm):
    """nest.activate inside a fullgraph=True compiled function raised Dynamo's own error about copy_context for a
    sub-model never used before, and traced for one whose plan the nest had cached: it is a graph break with a
    reason now, whatever the cache holds; without fullgraph the split function is right."""
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    sub = three(nest)[0]
    if warm:
        with nest.use(sub):
            pass

    def body(x):
        nest.activate(sub)
        return nest.model(x) * 2

    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"nest\.activate\(\) changes the nest-wide default"):
        torch.compile(body, backend="eager", fullgraph=True)(case.example)
    assert nest.active == nest.largest

    def body2(x):  # (a new code object: Dynamo's cache of body's frames is per code object)
        nest.activate(sub)
        return nest.model(x) * 2

    got = torch.compile(body2, backend="eager")(case.example)
    assert nest.active == sub
    torch.testing.assert_close(got, nest.model(case.example) * 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prior_grad", [False, True])
@pytest.mark.parametrize("family", ["mlp", "cnn_bn_residual"])
def test_compiled_autograd_gives_the_gradients_of_eager_autograd(family, prior_grad):
    """Compiled autograd traces the backward into a graph: the in-place path's write into ``param.grad`` was not
    in it, so sliced weights got no gradient at all (``.grad`` None, never trained). It now steps aside there."""
    import torch._dynamo.compiled_autograd as ca

    case = FAMILIES[family]()
    nest = sn.wrap(case.model, *case.dims, inplace_min_numel=0)  # every sliced tensor on the in-place path
    model, sub = nest.model, nest.submodels[len(nest.submodels) // 2]
    ref = nest.export(sub).train()
    model.train()
    if prior_grad:
        for p, r in zip(model.parameters(), ref.parameters()):
            p.grad, r.grad = torch.ones_like(p), None
    ref(case.example).square().mean().backward()
    with nest.use(sub):
        loss = model(case.example).square().mean()
    with ca._enable(torch.compile(backend="aot_eager")):
        loss.backward()
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        inside = p.grad[tuple(slice(0, n) for n in r.shape)]
        torch.testing.assert_close(inside - (1.0 if prior_grad else 0.0), r.grad, atol=1e-5, rtol=1e-4, msg=name)


class _Teacher(nn.Module):
    """A forward that also runs another sub-model of its own nest (a teacher or student pass)."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.head = nn.Linear(6, 16), nn.Linear(16, 8), nn.Linear(8, 3)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.nest, self.inner = None, None

    def body(self, x):
        h = self.mid(torch.relu(self.inp(x)))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)

    def forward(self, x):
        y = self.body(x)
        if self.inner is None:
            return y
        if self.inner.startswith("activate "):  # (inside the caller's use block: the rest still runs its plan)
            self.nest.activate(self.inner.split()[1])
            return y, self.body(x)
        with self.nest.use(self.inner):
            return y, self.body(x)


@pytest.mark.parametrize("inner", ["h=16,d=2", "h=4,d=3", "h=2,d=2", "activate h=16,d=3"])
def test_nest_compile_refuses_a_larger_submodel_inside_its_call(inner):
    """nest.compile() swaps the call's slices into the modules: a use(larger) block inside the forward ran them as
    its full weights (the teacher 0.215 off, its gradient on 4 rows instead of 16), where eager and
    torch.compile(model) run the larger sub-model. Refused now; a sub-model larger only in a dimension that slices
    no handed-over parameter (depth), a smaller one (it cuts prefixes of the slices), and an activate (the
    call's plan is pinned) run as in eager."""
    torch.manual_seed(0)
    model = _Teacher().double()
    nest = sn.wrap(model, sn.Width("h", [2, 4, 16], out="inp", inp="mid"), sn.Depth("d", [2, 3], layers="blocks"))
    model.nest = nest
    x = torch.randn(5, 6, dtype=torch.float64)
    model.inner = None if inner.startswith("activate") else inner
    with nest.use("h=4,d=2"):
        want = model(x)
    model.inner = inner
    step = nest.compile(backend="eager")
    with nest.use("h=4,d=2"):
        if inner == "h=16,d=2":
            with pytest.raises(sn.SortedNetError, match=r"nest.use\(h=16,d=2\) inside a call of nest.compile"):
                step(x)
            assert model.inp._parameters["weight"].shape == (16, 6)  # (the model's own parameters back)
            return
        got = step(x)
    if inner.startswith("activate"):
        torch.testing.assert_close(got[1], want, atol=1e-12, rtol=0)
        assert nest.active == nest.resolve("h=16,d=3")
        return
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_two_compiled_callables_of_one_nest_do_not_swap_views_under_each_other():
    """Each nest.compile() had a lock of its own: a call with gradients of a second one, while the first was
    paused at a graph break holding its sub-model's views in the modules, ran on those views (the full model's
    call returned the h=4 sub-model's output) and then put them back as the model's "own" parameters, for good.
    One lock per nest now; calls without gradients wait for a call with gradients too. (The one-second wait
    only gives the old behaviour its chance to show; nothing asserted depends on it.)"""
    import threading

    hold, at_break = threading.Event(), threading.Event()
    role = threading.local()

    @torch._dynamo.disable
    def pause():
        if getattr(role, "first", False):
            at_break.set()
            assert hold.wait(60)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(12, 32), nn.Linear(32, 5)

        def forward(self, x):
            h = F.relu(self.fc1(x))
            pause()
            return self.fc2(h)

    torch.manual_seed(0)
    m = MLP()
    nest = sn.wrap(m, sn.Width("h", [4, 32], out="fc1", inp="fc2"))
    x = torch.randn(6, 12)
    own = dict(m.named_parameters())
    with torch.no_grad():
        full = m(x).clone()
    first, second = nest.compile(backend="eager"), nest.compile(backend="eager")
    for sub, step in (("h=4", first), ("h=32", second)):
        with nest.use(sub):
            step(x)
    out: dict = {}

    def run_first():
        role.first = True
        with nest.use("h=4"):
            first(x)

    def run_second(grad):
        with nest.use("h=32"), torch.set_grad_enabled(grad):
            out[grad] = second(x).detach()

    for grad in (True, False):
        hold.clear(), at_break.clear()
        a = threading.Thread(target=run_first)
        b = threading.Thread(target=run_second, args=(grad,))
        try:
            a.start()
            assert at_break.wait(60)
            b.start()
            b.join(1.0)
        finally:
            hold.set()
            a.join(60)
            b.join(60)
        torch.testing.assert_close(out[grad], full)
        assert all(p is own[n] for n, p in m.named_parameters())


def test_the_swap_lock_is_reentrant_in_every_order_and_refuses_a_two_thread_upgrade_rather_than_hang():
    """The nest's lock of compiled calls: a call inside a call on one thread never waits for itself (shared in
    exclusive, exclusive in shared, shared in shared while another thread waits to take it exclusively); two
    threads each holding it shared and each taking it exclusively would wait for each other forever: the second
    is refused, and the first goes on once the second's shared hold ends. (Waits are polled states, not time.)"""
    from sortednet.compiled import _SwapLock

    lock = _SwapLock()
    with lock.exclusive(), lock.shared(), lock.exclusive():
        pass
    with lock.shared(), lock.exclusive(), lock.shared():
        pass
    held, go, done = threading.Event(), threading.Event(), []

    def writer():
        with lock.exclusive():
            done.append("writer")

    with lock.shared():
        t = threading.Thread(target=writer)
        t.start()
        _until(lambda: lock._waiting == 1)
        with lock.shared():  # (a nested shared call of this thread does not queue behind the waiting writer)
            done.append("nested")
    t.join(60)
    assert done == ["nested", "writer"]

    def first():
        with lock.shared():
            held.set()
            assert go.wait(60)
            with lock.exclusive():
                done.append("first")

    errors = []
    t = threading.Thread(target=first)
    t.start()
    assert held.wait(60)
    with lock.shared():
        go.set()
        _until(lambda: lock._upgrading == 1)
        try:
            with lock.exclusive():
                pass
        except sn.SortedNetError as e:
            errors.append(str(e))
    t.join(60)
    assert not t.is_alive() and done[-1] == "first" and "wait for each other forever" in errors[0]


def _until(condition):
    import time

    for _ in range(60_000):
        if condition():
            return
        time.sleep(0.001)
    raise AssertionError("never reached")


def test_wrapping_a_compiled_model_by_its_own_names_says_to_wrap_before_compiling():
    """sn.wrap(torch.compile(model), ...) with the model's own module names listed only '_orig_mod.*' names."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(sn.SortedNetError, match=r"the model is a torch.compile wrapper .*sn.wrap the model itself, "
                                                r"before compiling it"):
        sn.wrap(torch.compile(model), sn.Width("h", [4, 8], out="0", inp="2"))
    assert not any("_sn" in m.__dict__ for m in model.modules())


class _Breaks(nn.Sequential):
    def forward(self, h):
        z = self[1](self[0](h))
        if float(z.sum()) > -1e30:  # (a value read: a graph break inside the checkpointed function)
            z = z * 1.0
        return self[2](z)


class _Checkpointed(nn.Module):
    def __init__(self, breaks: bool = False, reentrant: bool = False):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList((_Breaks if breaks else nn.Sequential)(nn.Linear(16, 32), nn.ReLU(),
                                                                           nn.Linear(32, 16)) for _ in range(3))
        self.head = nn.Linear(16, 3)
        self.nest, self.reentrant = None, reentrant

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + self.nest.checkpoint(b, h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("runner", ["torch.compile", "nest.compile"])
@pytest.mark.parametrize("case", ["traced", "reentrant", "graph_break"])
def test_nest_checkpoint_under_compile_compiles_once_per_submodel_and_recomputes_its_forward(runner, case):
    """nest.checkpoint's pinning (a closure and a pending entry per call) failed Dynamo's guards at every
    call: nothing was compiled, each call traced again until the recompile limit. Traced, the recomputation
    is in the graph with the forward's sliced weights: one graph per sub-model, the gradients eager's, also
    with the backward under another sub-model; where Dynamo runs the checkpoint eagerly (a graph break inside
    the function), the recomputation runs the forward's sub-model as eagerly."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Checkpointed(breaks=case == "graph_break", reentrant=case == "reentrant")
    nest = sn.wrap(model, sn.Width("f", [8, 16, 32], out="blocks.*.0", inp="blocks.*.2"),
                   sn.Depth("depth", [1, 2, 3], layers="blocks"))
    object.__setattr__(model, "nest", nest)
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(model, backend=counter) if runner == "torch.compile" else nest.compile(backend=counter)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    grads = {}
    for run, call in (("eager", model), ("compiled", fn)):
        model.zero_grad(set_to_none=True)
        for sub in ("f=16,depth=2", "f=8,depth=1", "f=16,depth=2", "f=16,depth=2"):
            with nest.use(sub):
                loss = F.cross_entropy(call(x), y)
            with nest.use(nest.largest):  # (the recomputation runs the forward's sub-model)
                loss.backward()
        grads[run] = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    if case != "graph_break":
        assert counter.frame_count == 2, counter.frame_count
    for a, b in zip(grads["eager"], grads["compiled"]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

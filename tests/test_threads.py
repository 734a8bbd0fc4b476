"""Concurrency: threads each run ``with nest.use(sub):`` on one wrapped model
at the same time and each gets its own sub-model's output; backward sees the
sub-model that was active at forward, whatever other threads do."""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings

import pytest
import torch
from torch import nn

import sortednet as sn
from models import FAMILIES, interrupted_between_bytecodes, run
from sortednet import slicers
from sortednet.plan import UseAcrossYieldWarning

FAMS = sorted(FAMILIES)
THREADS, REPEATS = 8, 4


def loss_of(y):
    g = torch.Generator().manual_seed(2)
    return (y * torch.randn(y.shape, generator=g).to(y.device)).sum()


def close(a, b, what):
    """Results computed on different threads: equal up to kernel rounding.

    Concurrent threads share PyTorch's intra-op / BLAS pools, so a kernel may
    split its reduction differently than it does alone (observed on AMD EPYC):
    bit equality is not guaranteed there. The tolerance is far below the gap
    between any two sub-models' outputs (checked by ``distinct``).
    """
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def distinct(outputs):
    """The tolerance of ``close`` still tells every pair of sub-models apart."""
    outs = list(outputs)
    for i, a in enumerate(outs):
        for b in outs[i + 1:]:
            if a.shape == b.shape:
                assert not torch.allclose(a, b, rtol=1e-5, atol=1e-6), "two sub-models give the same output"


def in_threads(fn, n=THREADS):
    """Run ``fn(i, barrier)`` in ``n`` threads; re-raise the first failure."""
    barrier, errors = threading.Barrier(n), []

    def body(i):
        try:
            fn(i, barrier)
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            barrier.abort()
            errors.append(e)

    ts = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("family", FAMS)
def test_threads_get_their_own_submodel(family):
    c = FAMILIES[family]()
    nest = sn.wrap(c.model, *c.dims)
    subs = [nest.submodels[i * (len(nest.submodels) - 1) // (THREADS - 2)] for i in range(THREADS - 1)] + [None]
    want = {}
    for s in subs:                                           # sequential reference, both autograd modes
        with nest.use(s or nest.largest):
            want[s, False] = run(c.model, c.example)
            want[s, True] = c.model(c.example).detach()
    got: dict = {}

    def work(i, barrier):
        s = subs[i]                                          # the last thread stays outside use()
        for r in range(REPEATS):
            barrier.wait()
            grad = bool(r % 2)
            with torch.set_grad_enabled(grad):
                if s is None:
                    got[i, r] = (nest.active, c.model(c.example).detach())
                else:
                    with nest.use(s):
                        got[i, r] = (nest.active, c.model(c.example).detach())

    distinct({s or nest.largest: want[s, True] for s in subs}.values())
    in_threads(work)
    for (i, r), (active, y) in got.items():
        s = subs[i]
        assert active == (s or nest.largest)
        close(y, want[s, bool(r % 2)], f"thread {i} ({s}) repeat {r}")
    assert len(got) == THREADS * REPEATS and nest.active == nest.largest


@pytest.mark.parametrize("family", FAMS)
def test_threads_backward_sees_their_forward_submodel(family):
    c = FAMILIES[family]()
    nest = sn.wrap(c.model, *c.dims, inplace_grad=False)    # per-thread gradients via autograd.grad
    params = [p for p in c.model.parameters() if p.requires_grad]
    subs = [nest.submodels[i % len(nest.submodels)] for i in range(0, 3 * THREADS, 3)]

    def grads(sub, other=None):
        with nest.use(sub):
            loss = loss_of(c.model(c.example))
        if other is not None:
            with nest.use(other):                            # backward outside / under another sub-model
                return torch.autograd.grad(loss, params, allow_unused=True)
        return torch.autograd.grad(loss, params, allow_unused=True)

    want = [grads(s) for s in subs]
    got: dict = {}

    def work(i, barrier):
        barrier.wait()
        for _ in range(2):
            got[i] = grads(subs[i], subs[(i + 1) % THREADS])

    in_threads(work)
    for i, gs in got.items():
        for g, w in zip(gs, want[i]):
            assert (g is None) == (w is None)
            if g is not None:
                close(g, w, f"thread {i} ({subs[i]})")


@pytest.mark.parametrize("family", FAMS)
def test_inplace_backward_ignores_other_threads_submodel(family, monkeypatch):
    """inplace_grad=True: thread A runs forward under ``a``, thread B then holds ``b``
    while A runs backward; A's ``.grad`` is that of ``a``."""
    monkeypatch.setattr(slicers, "INPLACE_MIN_NUMEL", 0)  # slice hooks on every (tiny) tensor
    c = FAMILIES[family]()
    nest = sn.wrap(c.model, *c.dims)
    a, b = nest.smallest, nest.largest
    with nest.use(a):
        loss_of(c.model(c.example)).backward()
    want = [p.grad.clone() if p.grad is not None else None for p in c.model.parameters()]
    c.model.zero_grad(set_to_none=True)
    forward_done, b_active, backward_done = threading.Event(), threading.Event(), threading.Event()
    box = {}

    def thread_a(i, barrier):
        if i == 0:
            with nest.use(a):
                box["loss"] = loss_of(c.model(c.example))
            forward_done.set()
            assert b_active.wait(30)
            box["loss"].backward()
            backward_done.set()
        else:
            assert forward_done.wait(30)
            with nest.use(b), torch.no_grad():
                b_active.set()
                assert backward_done.wait(30)
                box["b_out"] = c.model(c.example)

    in_threads(thread_a, n=2)
    for p, w in zip(c.model.parameters(), want):
        if w is None:
            assert p.grad is None or not p.grad.any()
        else:
            close(p.grad, w, "gradient of the sub-model active at forward")
    close(box["b_out"], run(c.model, c.example), "output of b")   # b is the largest = default


# -- the active sub-model belongs to the calling context (invariant 11) --------------------------
def test_asyncio_tasks_on_one_thread_each_see_their_own_submodel():
    """Two tasks interleave ``use`` blocks across awaits on one thread: each sees its own
    sub-model (and its output), and the thread is back to the default afterwards."""
    import asyncio

    c = FAMILIES["mlp"]()
    nest = sn.wrap(c.model, *c.dims)
    a, b = nest.smallest, nest.submodels[len(nest.submodels) // 2]
    want = {}
    for s in (a, b):
        with nest.use(s):
            want[s] = run(c.model, c.example)
    distinct(want.values())
    seen: list = []

    async def task(sub, other_entered, mine_entered):
        with nest.use(sub):
            mine_entered.set()
            await other_entered.wait()          # the other task is inside its own use() now
            for _ in range(3):
                await asyncio.sleep(0)
                seen.append((sub, nest.active, run(c.model, c.example)))
        seen.append((None, nest.active, None))

    async def main():
        ea, eb = asyncio.Event(), asyncio.Event()
        await asyncio.gather(task(a, eb, ea), task(b, ea, eb))

    asyncio.run(main())
    assert len(seen) == 8
    for sub, active, y in seen:
        if sub is None:
            assert active == nest.largest       # a task's exit restores what it started with
        else:
            assert active == sub
            assert torch.equal(y, want[sub])
    assert nest.active == nest.largest


def test_thread_started_inside_use_sees_it_only_with_the_context():
    import contextvars

    c = FAMILIES["mlp"]()
    nest = sn.wrap(c.model, *c.dims)
    sub = nest.smallest
    got = {}
    with nest.use(sub):
        ctx = contextvars.copy_context()
        t1 = threading.Thread(target=ctx.run, args=(lambda: got.setdefault("copied", nest.active),))
        t2 = threading.Thread(target=lambda: got.setdefault("plain", nest.active))
        for t in (t1, t2):
            t.start()
            t.join(30)
    assert got == {"copied": sub, "plain": nest.largest}
    nest.activate(sub)                           # a plain thread starts with the nest-wide default
    try:
        t = threading.Thread(target=lambda: got.__setitem__("plain", nest.active))
        t.start()
        t.join(30)
        assert got["plain"] == sub
    finally:
        nest.activate(nest.largest)


def test_activate_is_atomic():
    """One thread flips the default between two sub-models that differ in every dimension;
    readers always see one of them whole (``nest.active`` and the sliced shapes), never a mix."""
    c = FAMILIES["lm_width_heads_depth"]()
    nest = sn.wrap(c.model, *c.dims)
    a, b = nest.smallest, nest.largest
    assert all(a[k] != b[k] for k in a)
    shapes = {}
    for s in (a, b):
        nest.activate(s)
        shapes[s] = [tuple(p.shape) for _, p in _views(c.model)]
    stop, bad, reads = threading.Event(), [], [0]

    def flip():
        while not stop.is_set():
            nest.activate(a)
            nest.activate(b)

    def read():
        while not stop.is_set():
            s = nest.active
            if s not in (a, b):
                bad.append(s)
            reads[0] += 1

    ts = [threading.Thread(target=flip), threading.Thread(target=read)]
    for t in ts:
        t.start()
    try:
        for _ in range(200):                     # a whole forward's worth of reads: one plan per read
            v = [tuple(p.shape) for _, p in _views(c.model)]
            assert all(x in (y, z) for x, y, z in zip(v, shapes[a], shapes[b]))
    finally:
        stop.set()
        for t in ts:
            t.join(30)
        nest.activate(nest.largest)
    assert not bad and reads[0] > 0


def _views(model):
    """``(name, the attribute as the model's modules read it now)`` per parameter."""
    for name, _ in model.named_parameters():
        path, _, attr = name.rpartition(".")
        yield name, getattr(model.get_submodule(path), attr)


def _holds_its_default(nest, run, first, x):
    """``run(x)`` started under the smallest sub-model keeps it while another thread activates the largest
    from a hook on ``first`` (deterministically mid-forward); the next call runs the largest."""
    small, large = nest.submodels[0], nest.submodels[-1]
    with torch.no_grad():
        ref = {}
        for s in (small, large):
            with nest.use(s):
                ref[s] = run(x)
        nest.activate(small)

        def other_thread(*args):
            t = threading.Thread(target=nest.activate, args=(large,))
            t.start()
            t.join()

        h = first.register_forward_hook(other_thread)
        y = run(x)
        h.remove()
        assert torch.equal(y, ref[small])
        assert torch.equal(run(x), ref[large])  # the next forward


def test_activate_during_a_forward_takes_effect_at_the_next_one():
    """A forward that starts outside use holds the default it started with: an activate from another thread
    in the middle (started from a hook, deterministically) cannot mix two sub-models."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
    net = nn.Sequential(blocks, nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    nest = sn.wrap(net, sn.Depth("d", [1, 3], layers="0"), sn.Width("w", [4, 32], out="1", inp="3"),
                   submodels=["d=1,w=4", "d=3,w=32"])
    _holds_its_default(nest, net, blocks[0], torch.randn(5, 8))
    assert nest.export("d=1,w=4")._forward_hooks == {} and not nest.export("d=1,w=4")._forward_pre_hooks


def test_a_forward_entered_at_a_child_of_the_root_holds_its_default_too():
    """``model.body(x)`` (a Hugging Face ``model.model(...)`` for hidden states) read the default anew at each
    layer: an activate from another thread mid-forward mixed two sub-models in one output. The root's direct
    children that hold sliced modules now pin it as the root does; exports and unwrap drop those hooks."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    net = Net()
    body = net.body
    nest = sn.wrap(net, sn.Width("a", [4, 32], out="body.0", inp="body.2"),
                   sn.Width("b", [4, 32], out="body.2", inp="body.4"), submodels=["a=4,b=4", "a=32,b=32"])
    _holds_its_default(nest, body, body[0], torch.randn(5, 8))
    exported = nest.export("a=4,b=4")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in exported.modules())
    nest.unwrap()
    assert not body._forward_hooks and not body._forward_pre_hooks


def test_use_objects_refuse_what_they_cannot_do():
    import asyncio

    nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
    small = nest.use("h=2")
    with small:
        with pytest.raises(sn.SortedNetError, match="already entered"):
            small.__enter__()
    assert nest.active == nest.largest

    async def coro():
        return nest.active

    def gen():
        yield nest.active

    for fn in (coro, gen):
        with pytest.raises(sn.SortedNetError, match="coroutine or generator"):
            nest.use("h=2")(fn)
    assert asyncio.run(coro()) == nest.largest


def test_the_pin_heals_after_an_interrupt_and_honours_activate_in_the_same_thread():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    nest = sn.wrap(m, sn.Width("h", [2, 8], out="0", inp="2"))
    x = torch.randn(3, 4)

    def boom(mod, args):
        raise KeyboardInterrupt

    h = m[2].register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        m(x)  # the post hook is skipped: its pin is left behind
    h.remove()
    nest.activate("h=2")
    with torch.no_grad():
        seen = []
        h = m[0].register_forward_hook(lambda mod, a, out: seen.append(out.shape[-1]))
        m(x)
        assert seen == [2] and nest.active == nest.resolve("h=2")
        h2 = m.register_forward_pre_hook(lambda mod, a: nest.activate("h=8") and None)  # same thread, in the call
        m(x)
        assert seen == [2, 8]
        h.remove(), h2.remove()


def _small_nest():
    """A 3-width MLP nest, an input and each width's exported output."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    nest = sn.wrap(m, sn.Width("h", [2, 4, 8], out="0", inp="2"))
    x = torch.randn(3, 4)
    with torch.no_grad():
        ref = {s: nest.export(s)(x) for s in ("h=2", "h=4", "h=8")}
    return m, nest, x, ref


@pytest.mark.parametrize("plans", [("h=2", "h=4"), ("h=2", "h=2"), ("h=4", "h=2")])
@pytest.mark.parametrize("how", ["close", "collect"])
def test_a_use_block_left_out_of_order_by_a_generator_leaves_the_callers_block_alone(plans, how):
    """A generator holding ``use`` across a yield, closed (or collected) while the caller is inside its own
    ``use``: the caller's block keeps its sub-model to its end, and its exit restores the state before both."""
    import gc

    m, nest, x, ref = _small_nest()
    inner, outer = plans

    def stream():
        with nest.use(inner):
            yield 1
            yield 2

    for depth in (0, 1):  # the caller's block alone, or inside a further block of its own
        g = stream()
        next(g)
        assert nest.active == nest.resolve(inner)  # documented: in force for the caller while suspended
        with nest.use("h=4") if depth else nest.use(outer), nest.use(outer):
            if how == "close":
                g.close()
            else:
                del g
                gc.collect()
            assert nest.active == nest.resolve(outer)
            with torch.no_grad():
                assert torch.equal(m(x), ref[outer])
        assert nest.active == nest.largest
        with torch.no_grad():
            assert torch.equal(m(x), ref["h=8"])
    # blocks that end in order are untouched by this: nested, re-entered, and under another nest's block
    other = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
    with nest.use("h=2"):
        with other.use("h=2"), nest.use("h=4"):
            assert (nest.active, other.active) == (nest.resolve("h=4"), other.resolve("h=2"))
        assert (nest.active, other.active) == (nest.resolve("h=2"), other.largest)
    assert nest.active == nest.largest


def test_a_generator_block_still_open_when_the_callers_block_ends_does_not_outlive_it():
    """The other order: the generator enters its ``use`` inside the caller's block and is still suspended
    when that block ends. The caller's exit restores what was in force before it (the generator's block
    ends with it, its later exit changes nothing), also when another task closes the generator; a
    context copied inside a block keeps its own view when the parent's blocks end out of order."""
    import asyncio
    import contextvars

    nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), sn.Width("h", [2, 4, 6, 8], out="0",
                                                                                           inp="2"))

    def stream():
        with nest.use("h=2"):
            yield nest.active

    g = stream()
    with pytest.warns(UseAcrossYieldWarning, match="suspended generator entered after it"), nest.use("h=4"):
        assert next(g) == nest.resolve("h=2")  # documented: in force for the caller while suspended
    assert nest.active == nest.largest
    g.close()
    assert nest.active == nest.largest

    async def main():
        g = stream()
        with pytest.warns(UseAcrossYieldWarning), nest.use("h=4"):
            next(g)
        seen = nest.active
        await asyncio.create_task(asyncio.to_thread(g.close))  # closed in another context
        return seen, nest.active

    assert asyncio.run(main()) == (nest.largest, nest.largest)

    def child():  # runs in a copy of the context made inside the parent's h=4 block
        before = nest.active
        with nest.use("h=6"):
            inside = nest.active
        return before, inside, nest.active

    g = stream()
    with nest.use("h=4"):
        ctx = contextvars.copy_context()
        next(g)
        g.close()  # the generator's block is left out of order, inside h=4: h=4 stays
        assert nest.active == nest.resolve("h=4")
        got = ctx.run(child)
    assert got == (nest.resolve("h=4"), nest.resolve("h=6"), nest.resolve("h=4"))
    assert nest.active == nest.largest


def test_interleaved_streams_each_holding_use_across_yields_are_warned_of():
    """Two generators, each holding ``use`` across its yields, stepped in turn (streamed responses): a forward of
    one ran the other's sub-model (the innermost block), and when one ended it ended the other's block, whose later
    forwards ran the default, all in silence (documented, and the easiest way to serve wrong outputs). Both are
    warned of now. A generator that holds ``use`` around its caller's code on purpose (a contextmanager, a fixture
    stepped by next) is not."""
    import contextlib

    m, nest, x, ref = _small_nest()

    def stream(sub, n):
        with nest.use(sub):
            for _ in range(n):
                with torch.no_grad():  # (not across the yield: grad mode would leak as use does)
                    same = torch.equal(m(x), ref[sub])
                yield same

    a, b = stream("h=2", 2), stream("h=4", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UseAcrossYieldWarning)
        assert next(a) and next(b)  # (each forward in its own block, the innermost)
    with pytest.warns(UseAcrossYieldWarning, match=r"a forward runs h=4, the sub-model of a nest.use block a "
                                                   r"suspended generator holds across a yield"):
        assert not next(a)  # (a's forward, under b's block)
    with pytest.warns(UseAcrossYieldWarning, match="ended while a block a suspended generator entered after it"):
        next(a, None)  # (a ends: b's block ends with it)
    assert not next(b)  # (documented: b now runs the default; said above)
    b.close()
    assert nest.active == nest.largest

    class Session:  # (a session object whose __enter__ primes a generator holding use across its sends)
        def __init__(self, sub):
            self.g, self.out = self.run(sub), None

        def run(self, sub):
            with nest.use(sub):
                while True:
                    xx = yield
                    with torch.no_grad():
                        self.out = m(xx)

        def __enter__(self):
            next(self.g)
            return self

        def __exit__(self, *exc):
            self.g.close()

    with pytest.warns(UseAcrossYieldWarning, match="a forward runs h=4"), Session("h=2") as s2, \
            Session("h=4"):
        s2.g.send(x)  # (s2's forward, under s4's block)
        assert not torch.equal(s2.out, ref["h=2"])
    assert nest.active == nest.largest

    def held(sub):
        with nest.use(sub):
            while True:
                yield

    with warnings.catch_warnings():  # (the warning raised by a filter: said once the state was restored, so no
        warnings.simplefilter("error", UseAcrossYieldWarning)  # block stays open and no sub-model in force)
        a, b = held("h=2"), held("h=4")
        next(a), next(b)
        with pytest.raises(UseAcrossYieldWarning):
            a.close()
        b.close()
    assert nest.active == nest.largest
    with nest.use("h=4"):
        assert nest.active == nest.resolve("h=4")
    assert nest.active == nest.largest

    @contextlib.contextmanager
    def serving(sub):
        with nest.use(sub):
            yield

    def fixture(sub):
        with nest.use(sub):
            yield

    @contextlib.contextmanager
    def delegating(sub):  # (a helper delegating to a shared body: that body is stepped by this generator)
        yield from fixture(sub)

    class Serving:  # (a class of one's own stepping the generator by hand)
        def __init__(self, sub):
            self.g = fixture(sub)

        def __enter__(self):
            next(self.g)

        def __exit__(self, *exc):
            next(self.g, None)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UseAcrossYieldWarning)
        with serving("h=2"), torch.no_grad():
            assert torch.equal(m(x), ref["h=2"])
            with nest.use("h=4"):
                assert torch.equal(m(x), ref["h=4"])
        for helper in (serving, delegating, Serving):
            with nest.use("h=4"), helper("h=2"), torch.no_grad():  # (inside a block of the caller's own)
                assert torch.equal(m(x), ref["h=2"])
        f = fixture("h=4")
        next(f)
        with torch.no_grad():
            assert torch.equal(m(x), ref["h=4"])
        next(f, None)
    assert nest.active == nest.largest


def test_a_use_block_opened_and_closed_by_the_users_root_hooks_leaves_activate_working():
    """A root pre-hook that enters ``nest.use`` and a forward hook that leaves it: the nest's pin (which runs
    its post hook first) and that block unwind as one stack, so no pinned default is left behind."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    nest = sn.wrap(m, sn.Width("h", [2, 4, 8], out="0", inp="2"))
    x = torch.randn(3, 4)
    block = {}

    def enter(mod, args):
        block["use"] = nest.use("h=2")
        block["use"].__enter__()

    def leave(mod, args, out):
        block.pop("use").__exit__(None, None, None)

    hooks = [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    with torch.no_grad():
        got = m(x)
        torch.testing.assert_close(got, nest.export("h=2")(x))
    for h in hooks:
        h.remove()
    assert nest.active == nest.largest
    nest.activate("h=4")
    assert nest.active == nest.resolve("h=4") and m[0].weight.shape == (4, 4)
    nest.activate(nest.largest)


def test_a_pin_left_by_an_interrupted_forward_never_overrides_a_later_use_or_activate():
    """A forward outside use interrupted (KeyboardInterrupt skips its post hook): the next forward inside a
    use block runs that block's sub-model, and an activate in that context takes effect, also when the
    next forward ran in another context."""
    import asyncio

    m, nest, x, ref = _small_nest()

    def interrupted():
        def boom(mod, args):
            raise KeyboardInterrupt

        h = m[2].register_forward_pre_hook(boom)
        with pytest.raises(KeyboardInterrupt):
            m(x)
        h.remove()

    with torch.no_grad():
        interrupted()
        with nest.use("h=2"):
            assert torch.equal(m(x), ref["h=2"]) and torch.equal(m(x), ref["h=2"])
            assert nest.active == nest.resolve("h=2")
        assert nest.active == nest.largest
        interrupted()

        async def elsewhere():
            return m(x)

        asyncio.run(elsewhere())  # the next forward runs in a copy of this context
        nest.activate("h=4")
        assert nest.active == nest.resolve("h=4") and torch.equal(m(x), ref["h=4"])
        nest.activate(nest.largest)
        assert torch.equal(m(x), ref["h=8"])


@pytest.mark.parametrize("nested", [False, True], ids=["one", "nested"])
def test_a_ctrl_c_anywhere_in_entering_or_leaving_use_never_leaves_the_submodel_in_force(nested):
    """A Ctrl-C lands where Python handles signals: a function's start, after each call, a backward jump. At every
    such point of entering and leaving a use block, the caller is back to what was in force before (the full
    model, or the outer block's sub-model); the next forwards are those of the full model. The one point no
    Python context manager can guard is the first instruction of ``__exit__`` itself (torch.no_grad has the
    same): there the interrupt arrives before any of its code runs."""
    import contextvars

    from sortednet.plan import Use, _reset, close_block

    m, nest, x, ref = _small_nest()

    def call():
        with nest.use("h=4") if nested else contextlib.nullcontext():
            try:
                with nest.use("h=2"):
                    assert torch.equal(m(x), ref["h=2"])
            finally:
                assert not nested or torch.equal(m(x), ref["h=4"]), "the outer block's sub-model is gone"

    with torch.no_grad():
        for fns, starts in [((Use.__enter__, Use._leave, close_block, _reset), True), ((Use.__exit__,), False)]:
            n, fired = 0, True
            while fired:
                n += 1

                def trial(n=n, fns=fns, starts=starts):  # in a copy of this context: a leak stays in it
                    hit = interrupted_between_bytecodes(n, call, *fns, starts=starts)
                    return hit, nest.active, m(x)

                fired, active, out = contextvars.copy_context().run(trial)
                assert active == nest.largest and torch.equal(out, ref["h=8"]), f"{fns[0].__qualname__} point {n}"
            assert n > 3, f"{fns[0].__qualname__}: only {n - 1} points reached"
        assert nest.active == nest.largest and torch.equal(m(x), ref["h=8"])


@pytest.mark.parametrize("where", ["other_thread", "this_thread"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_ctrl_c_anywhere_in_a_forwards_hooks_never_keeps_an_old_default_in_force(grad, where):
    """A forward outside use pins the default it starts with (its pre hook opens the pin, its post hook closes
    it). A Ctrl-C at any point of those hooks: after an activate from another thread, the next forwards in this
    thread run the new default, nest.active says so, and the count of forwards with gradients is back to 0 (the
    pin left behind was once taken for the next forward's, whose frame had the same id and code)."""
    import contextvars

    from sortednet.plan import _reset, close_block, heal_pins
    from sortednet.wrap import Pin

    m, nest, x, ref = _small_nest()
    fns = (Pin.pre, Pin.post, Pin._enter, Pin._leave, Pin._stack, Pin._count, close_block, heal_pins, _reset)

    def forward():
        with torch.set_grad_enabled(grad):
            out = m(x)
        if grad:
            out.sum().backward()

    def trial(n):
        nest.activate("h=4")
        hit = interrupted_between_bytecodes(n, forward, *fns)
        if where == "this_thread":  # it undoes what the interrupted forward left, before any forward
            nest.activate("h=8")
            assert nest.active == nest.largest and nest._state.training == 0, f"point {n}"
        else:
            other = threading.Thread(target=nest.activate, args=("h=8",))
            other.start(), other.join()
        with torch.no_grad():
            outs = [m(x), m(x)]
        return hit, outs, nest.active, nest._state.training

    n, fired = 0, True
    while fired:
        n += 1
        fired, outs, active, training = contextvars.copy_context().run(trial, n)
        assert all(torch.equal(o, ref["h=8"]) for o in outs), f"point {n}: a forward ran the old default"
        assert active == nest.largest, f"point {n}: nest.active is {active}"
        assert training == 0, f"point {n}: {training} forwards with gradients counted as running"
    assert n > 10, f"only {n - 1} points reached"


def test_a_context_copied_during_a_forward_keeps_neither_its_input_nor_the_model_alive():
    import contextvars
    import gc
    import weakref

    m, nest, x, ref = _small_nest()
    copies = []
    m[0].register_forward_hook(lambda mod, a, out: copies.append(contextvars.copy_context()) and None)
    inp = torch.randn(3, 4)
    gone = weakref.ref(inp)
    m(inp)
    del inp
    gc.collect()
    assert gone() is None, "the forward's input is kept alive by a context copied during it"
    model = weakref.ref(m)
    del m, nest
    gc.collect()
    assert model() is None and len(copies) == 1


def test_a_refusal_by_a_nested_forwards_pre_hook_leaves_the_outer_forwards_pin_alone(monkeypatch):
    """The root's post hook runs also when its pre hook raised (torch's always-call hooks): a nested forward of the
    model refused there takes back its own record, not the outer forward's, whose pin keeps its default to the end
    while another thread activates another sub-model."""
    from sortednet.wrap import Guards

    m, nest, x, ref = _small_nest()
    real, refuse = Guards.check_counts, []

    def check_counts(self):
        if refuse:
            raise sn.SortedNetError("refused (injected)")
        return real(self)

    monkeypatch.setattr(Guards, "check_counts", check_counts)

    def inside(mod, args, out):
        refuse.append(True)
        with pytest.raises(sn.SortedNetError, match="injected"):
            m(x)
        refuse.clear()
        other = threading.Thread(target=nest.activate, args=("h=2",))
        other.start(), other.join()

    h = m[0].register_forward_hook(inside)
    with torch.no_grad():
        out = m(x)
    h.remove()
    assert torch.equal(out, ref["h=8"]), "the rest of the forward ran the default another thread activated"
    assert nest._state.training == 0 and not nest._pin.local.__dict__.get("stack")
    with torch.no_grad():
        assert torch.equal(m(x), ref["h=2"]) and nest.active == nest.resolve("h=2")


def test_finish_all_runs_every_step_whatever_point_a_ctrl_c_lands_on():
    """Every step runs (one a Ctrl-C stopped runs again) and the interrupt is raised after the last; the one
    point no function can guard is its own first instruction."""
    from sortednet.modes import finish_all

    n, fired = 0, True
    while fired:
        n += 1
        done: list[int] = []
        steps = [functools.partial(done.append, i) for i in range(4)]
        fired = interrupted_between_bytecodes(n, functools.partial(finish_all, steps), finish_all, starts=False)
        assert sorted(set(done)) == [0, 1, 2, 3], f"point {n}: steps {done} ran"
    assert n > 4


def test_finish_all_retries_a_step_a_keyboard_interrupt_subclass_stopped():
    """Only an exact KeyboardInterrupt was retried: a subclass of it stopping an unwrap's restore step left a
    module sliced while the nest counted itself unwrapped (neither unwrap nor wrap could then be called)."""
    from sortednet.modes import finish_all

    class Stop(KeyboardInterrupt):
        pass

    done, tries = [], []

    def flaky():
        tries.append(1)
        if len(tries) == 1:
            raise Stop
        done.append("flaky")

    with pytest.raises(Stop):
        finish_all([functools.partial(done.append, 0), flaky, functools.partial(done.append, 2)])
    assert done == [0, "flaky", 2]


def test_a_module_half_imported_by_another_thread_never_unslices_a_read(monkeypatch):
    """The first FLOP count / profile / check of a process makes PyTorch import ``torch.distributed.tensor``
    (seconds); a serving thread reading a sliced attribute meanwhile saw the module without ``DTensor``. The
    AttributeError made Python fall back to ``nn.Module.__getattr__``: the FULL running statistics under
    ``use("c=2")`` (a raw BatchNorm error here, silently wrong where a consumer takes any size)."""
    import sys
    import types

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    nest = sn.wrap(m, sn.Width("c", [2, 8], out="0", norm="1", inp="3"))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad(), nest.use("c=2"):
        want = m(x)
    module = "torch.distributed.tensor"
    monkeypatch.setitem(sys.modules, module, types.ModuleType(module))   # as seen during its import
    with torch.no_grad(), nest.use("c=2"):
        shapes = m[1].running_mean.shape, m[1].weight.shape
        got = m(x)
    monkeypatch.undo()
    assert shapes == ((2,), (2,))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_an_attribute_error_inside_a_sliced_read_is_named_not_read_at_full_size(monkeypatch):
    """A property getter raising AttributeError makes Python call ``nn.Module.__getattr__``, which returns
    the full-size tensor: every sliced read turns it into a SortedNetError instead."""
    from sortednet.views import DYNAMIC

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    nest = sn.wrap(m, sn.Width("h", [2, 8], out="0", inp="2"))
    st = m[0].__dict__["_sn"]

    def broken(module, name):
        raise AttributeError("a bug in a slicer")

    with nest.use("h=2"):
        entries = nest._state.plan().entries[st.slot]
        monkeypatch.setitem(entries, "weight", DYNAMIC)          # read through the slicer's value() ...
        monkeypatch.setattr(st.slicer, "value", broken)           # ... which fails
        with pytest.raises(sn.SortedNetError, match="reading the sliced 0.weight raised AttributeError"):
            _ = m[0].weight


def test_a_use_block_left_in_another_thread_than_it_entered_warns():
    """A generator holding ``use`` across a yield, stepped from a thread pool (run_in_executor copies no context)
    and closed in the caller's thread: the worker's context stays on the generator's sub-model and served every
    later request on that worker with it, in silence (documented, not repairable). It warns now."""
    from concurrent.futures import ThreadPoolExecutor

    from sortednet.plan import UseLeftElsewhereWarning

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    nest = sn.wrap(model, sn.Width("h", [4, 16], out="0", inp="2"))

    def stream():
        with nest.use("h=4"):
            yield str(nest.active)
            yield str(nest.active)

    with ThreadPoolExecutor(1) as pool:
        g = stream()
        assert pool.submit(next, g).result() == "h=4"
        assert pool.submit(lambda: str(nest.active)).result() == "h=4"  # (the worker's context: what it warns of)
        with pytest.warns(UseLeftElsewhereWarning, match=r"nest.use\(h=4\) block was left in another thread"):
            g.close()
    with warnings.catch_warnings():  # entered and left in one thread, across a yield: no warning
        warnings.simplefilter("error", UseLeftElsewhereWarning)
        g = stream()
        assert next(g) == "h=4"
        g.close()


_PAUSE: dict = {}  # (off the model: copies of it, views included, pause alike)


class _Paused(nn.Module):
    """An MLP with a buffer other threads write (a serving cache); a forward in the thread ``_PAUSE["in"]`` waits
    at its start until released, so another thread's write lands in the middle of it, deterministically."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 2)
        self.register_buffer("mem", torch.zeros(3))

    def forward(self, x):
        if threading.current_thread() is _PAUSE.get("in"):
            _PAUSE["started"].set()
            assert _PAUSE["resume"].wait(timeout=60)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("how", ["cost", "profile"])
def test_counting_flops_keeps_what_other_threads_write_into_the_buffers(how):
    """``cost(sub, "flops", example=)`` and ``profile`` ran under a dry run of the model that snapshotted every
    buffer and copied the snapshot back at its end: a serving thread's writes meanwhile were undone (a decoder's
    preallocated memory: 15-46 of 100 decodes wrong; a training thread's BatchNorm counter ended at 105 of 400)."""
    torch.manual_seed(0)
    net = _Paused().eval()
    nest = sn.wrap(net, sn.Width("h", [4, 16], out="fc1", inp="fc2"))
    x = torch.randn(2, 4)
    count = (lambda: nest.cost("h=4", "flops", example=x)) if how == "cost" else \
        (lambda: nest.profile(x, metrics=["params", "flops"], progress=False))
    worker = threading.Thread(target=count)
    _PAUSE.update({"in": worker, "started": threading.Event(), "resume": threading.Event()})
    try:
        worker.start()
        assert _PAUSE["started"].wait(timeout=60)
        net.mem.fill_(7.0)  # (this thread serving meanwhile: its write into the shared buffer)
    finally:
        _PAUSE["resume"].set()
        worker.join(timeout=120)
        _PAUSE.clear()
    assert not worker.is_alive()
    assert torch.equal(net.mem, torch.full((3,), 7.0))


def test_counting_flops_puts_back_what_its_own_forward_wrote_through_a_hook():
    """The count runs on a view with copies of the buffers, but a hook (or closure) holding the model's own buffer
    writes that one: what this thread wrote there is put back, as the dry run did before (a call counter grew
    by one per counted sub-model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    model.register_buffer("seen", torch.zeros(()))
    seen = model.seen
    model[0].register_forward_hook(lambda m, args, out: seen.add_(1) and None)
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="0", inp="2"))
    x = torch.randn(2, 4)
    assert [nest.cost(s, "flops", example=x) for s in nest.submodels] == [2 * 2 * (4 * h + h * 2) for h in (4, 8, 16)]
    nest.profile(x, metrics=["params", "flops"], progress=False)
    assert float(model.seen) == 0.0


def test_a_use_block_in_a_generator_stepped_from_c_code_enters():
    """A generator stepped straight from C code (``ctx.run(next, gen)`` as a raw thread's function: its frame has no
    Python frame below it) entering ``use`` while the context holds a block: the look for the frames below it asked
    for a frame that does not exist, and the block raised ValueError."""
    import _thread
    import contextvars

    m, nest, x, ref = _small_nest()
    seen: list = []
    ran = threading.Event()

    def stream():
        try:
            with nest.use("h=2"):
                seen.append(nest.active)
                ran.set()
                yield
        except BaseException as e:
            seen.append(e)
            ran.set()
            raise

    with nest.use("h=4"):
        ctx = contextvars.copy_context()  # (a context with a block open)
    g = stream()
    _thread.start_new_thread(ctx.run, (next, g))
    assert ran.wait(120)
    assert seen == [nest.resolve("h=2")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g.close()


@pytest.mark.parametrize("change", ["profile", "count"])
def test_a_pick_table_built_from_costs_replaced_meanwhile_is_not_kept(monkeypatch, change):
    """A pick in one thread builds its table from the cost tables while another thread installs new ones (a
    profile, FLOPs counted on another input): the table it built is used for that pick only, never kept."""
    import importlib

    nest_mod = importlib.import_module("sortednet.nest")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 4))
    nest = sn.wrap(model, sn.Width("a", [4, 12, 24, 40], out="0", inp="2"),
                   sn.Width("b", [4, 12, 24, 40], out="2", inp="4"))
    nest.profile(torch.randn(2, 8), metrics=["flops"], progress=False)
    building, go = threading.Event(), threading.Event()
    real = nest_mod.Selector

    class Paused(real):  # the first table built waits, between reading the costs and being kept
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            if not building.is_set():
                building.set()
                assert go.wait(60)

    monkeypatch.setattr(nest_mod, "Selector", Paused)
    nest._selector = None
    picker = threading.Thread(target=nest.pick, kwargs={"params": 3000})
    picker.start()
    assert building.wait(60)
    x = torch.randn(9, 8)
    if change == "profile":
        want = nest.profile(x, metrics=["flops"], progress=False).costs["flops"]
    else:
        nest.profile(torch.randn(2, 8), metrics=["params"], progress=False)  # (no FLOPs in the profile)
        want = [nest.cost(s, "flops", example=x) for s in nest.submodels]
    go.set()
    picker.join(60)
    assert list(nest._select().costs["flops"]) == list(want)
    budget = sorted(want)[len(want) // 2]
    got = nest.pick(flops=budget)
    assert want[list(nest.submodels).index(got)] <= budget


@contextlib.contextmanager
def _another_thread_compiling():
    """Another thread held inside torch.compile (its backend waits): Dynamo's process-wide flag stays set."""
    entered, release = threading.Event(), threading.Event()

    def waiting(gm, example):
        entered.set()
        release.wait(60)
        return gm.forward

    t = threading.Thread(target=lambda: torch.compile(lambda a: a + 1, backend=waiting)(torch.randn(2)))
    t.start()
    assert entered.wait(60)
    try:
        yield
    finally:
        release.set()
        t.join(60)


def test_another_threads_compile_leaves_this_threads_eager_checks_on(fresh_dynamo):
    """torch.compiler.is_compiling() reads one process-wide flag, set while any thread compiles: read in another
    thread's eager forward, it switched that forward's checks off (an in-place write into a sub-model's calibrated
    statistics used in silence; an activate from a third thread mid-forward took effect inside it). The checks
    ask whether this thread is traced."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2)).eval()
    nest = sn.wrap(cnn, sn.Width("c", [2, 4, 8], out="0", norm="1", inp="5"))
    nest.calibrate([torch.randn(16, 1, 8, 8) for _ in range(2)])
    with nest.use("c=2"):
        cnn[1].running_mean.add_(100.0)
    with _another_thread_compiling(), torch.no_grad(), nest.use("c=2"):
        # (torch.compiler.is_compiling() here reads another thread's compile on the torch versions whose flag is
        # process-wide for the whole compile, 2.13 / 2.14: the checks must hold either way)
        with pytest.raises(sn.SortedNetError, match="calibrated statistics of a sub-model were changed"):
            cnn(torch.randn(2, 1, 8, 8))
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    mlp = sn.wrap(net, sn.Width("h1", [16, 64], out="0", inp="2"), sn.Width("h2", [16, 64], out="2", inp="4"))
    x = torch.randn(4, 8)
    with torch.no_grad(), mlp.use("h1=16,h2=16"):
        want = net(x)

    def hook(m, a, o):  # (a third thread moves the default while this forward is between its layers)
        th = threading.Thread(target=mlp.activate, args=("h1=64,h2=64",))
        th.start()
        th.join()

    mlp.activate("h1=16,h2=16")
    handle = net[0].register_forward_hook(hook)
    try:
        with _another_thread_compiling(), torch.no_grad():
            got = net(x)
    finally:
        handle.remove()
    assert torch.equal(got, want)

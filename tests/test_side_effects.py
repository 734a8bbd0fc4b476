"""Invariant 11: no operation of a nest changes process-wide state (backend flags, matplotlib
backend) or what another thread sees (module modes, BatchNorm settings and statistics), and the
FLOPs cache stays right when threads count on different inputs at once.

Outputs computed on another thread are compared with a tolerance (intra-op scheduling may differ);
the flags and modes are compared exactly."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import sortednet as sn
from models import FAMILIES
from sortednet.cost import count_flops
from sortednet.train import evaluate


def _in_background(work, body):
    """Run ``work()`` repeatedly on another thread while ``body()`` runs here; returns what ``work`` returned."""
    stop, seen, errors = threading.Event(), [], []

    def loop():
        try:
            while not stop.is_set():
                seen.append(work())
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    t = threading.Thread(target=loop)
    t.start()
    try:
        body()
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert seen, "the background thread never ran"
    return seen


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_counting_flops_leaves_other_threads_fast_path_alone():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    served = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 6, 16)
    pad = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    with torch.no_grad():
        ref = served(x, src_key_padding_mask=pad)
    assert not ref[1, 3:].any()  # the fused fast path ran: it leaves padded positions at zero
    flag = torch.backends.mha.get_fastpath_enabled()
    case = FAMILIES["torch_encoder"]()
    nest = sn.wrap(case.model, *case.dims)

    def serve():
        with torch.no_grad():
            return torch.backends.mha.get_fastpath_enabled(), served(x, src_key_padding_mask=pad)

    def count():
        for i in range(30):
            count_flops(nest, nest.submodels[i % len(nest.submodels)], case.example)

    seen = _in_background(serve, count)
    assert torch.backends.mha.get_fastpath_enabled() == flag
    assert all(f == flag for f, _ in seen)
    for _, y in seen:
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)


def test_flops_cache_is_right_when_threads_count_different_inputs():
    case = FAMILIES["mlp"]()
    nest = sn.wrap(case.model, *case.dims)
    examples = [torch.randn(6, 12), torch.randn(2, 12)]
    want = {(i, s): count_flops(nest, s, ex) for i, ex in enumerate(examples) for s in nest.submodels}
    assert want[(0, nest.largest)] != want[(1, nest.largest)]
    wrong, barrier = [], threading.Barrier(2)

    def worker(i):
        barrier.wait()
        for _ in range(25):
            for s in nest.submodels:
                got = nest.cost(s, "flops", example=examples[i])
                if got != want[(i, s)]:
                    wrong.append((i, s, got))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, wrong[:5]
    table = dict(nest._cost_cache["flops"])          # what pick(flops=) reads: one input's counts only
    mine = [i for i in range(2) if all(table[s] == want[(i, s)] for s in table)]
    assert table and mine, table


def _visible_state(model: nn.Module) -> list:
    """Everything another thread may read: modes, BatchNorm settings, counters and statistics."""
    out = []
    for m in model.modules():
        out.append((m.training, m.__dict__.get("momentum")))
        for name, b in m._buffers.items():
            if b is not None:
                out.append((name, b.clone()))
    return out


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[1], y[1]) if isinstance(x[1], torch.Tensor) else x == y for x, y in zip(a, b))


@pytest.mark.parametrize("training", [True, False], ids=["train_mode", "eval_mode"])
@pytest.mark.parametrize("op", ["profile", "evaluate", "calibrate"])
def test_measuring_changes_nothing_another_thread_sees(op, training):
    case = FAMILIES["cnn_bn_residual"]()
    model = case.model.train(training)
    nest = sn.wrap(model, *case.dims)
    y = torch.randint(0, 4, (case.example.shape[0],))
    before = _visible_state(model)
    runs = {"profile": lambda: nest.profile(case.example, metrics=("flops", "latency", "memory"), repeat=1,
                                            warmup=0, progress=False),
            "evaluate": lambda: evaluate(nest, (case.example, y)),
            "calibrate": lambda: nest.calibrate([case.example] * 3, batches=3)}
    seen = _in_background(lambda: _same(_visible_state(model), before), runs[op])
    assert all(seen), f"{op} changed module modes / BatchNorm state for {seen.count(False)} of {len(seen)} reads"
    assert _same(_visible_state(model), before)


def _versions(model: nn.Module) -> dict[str, int]:
    """The version counter of every parameter and buffer: moved by any write, even one that puts a value back."""
    return {k: v._version for k, v in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("case", ["mlp_bn", "bn_own_forward", "cnn_bn_residual"])
def test_dry_runs_never_write_the_models_tensors(case):
    """check, wrap(example=) and discover ran their training-mode traces on the model's own BatchNorm statistics
    (and wrap's verification of a BatchNorm with a forward of its own wrote test values into its weight and
    statistics), putting them back on exit: a thread serving meanwhile read the changed values (27 of a serving
    thread's outputs off by up to 0.028 during 20 checks). They run on private copies now: no write at all
    reaches the model's tensors, which the version counters (moved by any write) show, whatever the threads do."""
    import arch

    x = torch.randn(8, 16)
    if case == "mlp_bn":
        model, dims = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4)).eval(), [
            sn.Width("h", [8, 64], out="0", norm="1", inp="3")]
    elif case == "bn_own_forward":
        model = nn.Sequential(nn.Conv2d(3, 8, 1), arch.BatchNormAct2d(8), nn.Conv2d(8, 2, 1))
        x = torch.randn(2, 3, 4, 4)
        dims = [sn.Width("c", [4, 8], out="0", norm="1", inp="2")]
    else:
        family = FAMILIES[case]()
        model, dims, x = family.model, family.dims, family.example
    before = _versions(model)
    assert sn.discover(model, x, ratios=[0.5, 1.0])
    nest = sn.wrap(model, *dims, example=x)
    nest.check(x)
    assert _versions(model) == before


class _WritesItsBuffers(nn.Module):
    """A forward that writes buffers of its own: a call counter, and a cache of its last mean output."""

    def __init__(self):
        super().__init__()
        self.c, self.bn, self.fc = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("cache", torch.zeros(2))

    def forward(self, x):
        self.calls += 1
        out = self.fc(torch.relu(self.bn(self.c(x))).mean((2, 3)))
        self.cache.copy_(out.mean(0).detach())
        return out


@pytest.mark.parametrize("op", ["profile", "evaluate", "calibrate"])
def test_measuring_writes_the_models_buffers_as_its_forward_does(op):
    """profile measures on copies of every buffer (it times the model, never its outputs): a call counter or a
    cached output its forward writes stays the model's. evaluate and calibrate compute the model's outputs, as a
    loop of your own would, on the model's own buffers (a copy of each would cost their memory again: a large
    frozen table kept as a buffer): what their forwards write is written, as documented."""
    torch.manual_seed(0)
    model = _WritesItsBuffers().train()
    nest = sn.wrap(model, sn.Width("c", [2, 4, 8], out="c", norm="bn", inp="fc"))
    data = [torch.randn(4, 1, 6, 6) for _ in range(2)]
    before, state = _versions(model), _visible_state(model)
    {"profile": lambda: nest.profile(data[0], metrics=("flops", "latency"), repeat=1, warmup=0, progress=False),
     "evaluate": lambda: evaluate(nest, [(data[0], torch.tensor([0, 1, 0, 1]))]),
     "calibrate": lambda: nest.calibrate(data, batches=2)}[op]()
    if op == "profile":
        assert _versions(model) == before and _same(_visible_state(model), state)
        assert int(model.calls) == 0 and not model.cache.any()
    else:
        assert int(model.calls) == {"evaluate": 3, "calibrate": 6}[op] and model.cache.any()
        assert all(torch.equal(getattr(model.bn, k), v) for k, v in [("running_mean", torch.zeros(8)),
                                                                      ("running_var", torch.ones(8))])


class _ReadsThroughAView(nn.Module):
    """A buffer registered as a view of another: the forward writes the cache and reads it through the view."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1 = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("cache", torch.zeros(2), persistent=False)
        self.register_buffer("head", self.cache[:1], persistent=False)

    def forward(self, x):
        self.cache.fill_(1.0)
        return self.l1(torch.relu(self.l0(x))) * self.head


def test_private_buffer_copies_keep_which_buffers_share_memory():
    """The private view's buffer copies cloned each buffer alone: a buffer registered as a view of another no
    longer saw the writes into it, so a forward of the view computed other numbers than the model (0.0 for
    0.27 in each output, with evaluate on such copies). Copies of buffers that share memory share one copy of it
    now, each with its own offset and strides; the model's buffers are not written."""
    from sortednet.modes import eval_view

    torch.manual_seed(0)
    model, x = _ReadsThroughAView(), torch.randn(5, 4)
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="l0", inp="l1"))
    view, copies = eval_view(model, keep=nest.dims, own_buffers=True)
    assert view.head.untyped_storage().data_ptr() == view.cache.untyped_storage().data_ptr()
    assert view.cache.untyped_storage().data_ptr() != model.cache.untyped_storage().data_ptr()
    with torch.no_grad():
        got = {}
        for sub in nest.submodels:
            with nest.use(sub):
                got[sub] = view(x)
        assert not model.cache.any()  # (the model's own buffers are not written)
        for sub in nest.submodels:
            with nest.use(sub):
                torch.testing.assert_close(got[sub], model(x))
                assert got[sub].abs().sum() > 0
    model.cache.zero_()
    profile = nest.profile(x, metrics=("flops",), repeat=1, warmup=0, progress=False)
    assert len(profile.submodels) == len(nest.submodels) and not model.cache.any()


def test_evaluate_and_calibrate_results_do_not_depend_on_the_models_mode():
    results = []
    for training in (True, False):
        case = FAMILIES["cnn_bn_residual"]()
        nest = sn.wrap(case.model.train(training), *case.dims)
        y = torch.randint(0, 4, (case.example.shape[0],), generator=torch.Generator().manual_seed(0))
        nest.calibrate([case.example] * 2, batches=2)
        results.append(evaluate(nest, (case.example, y)))
    assert results[0] == results[1]


def test_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        subs = tuple(sn.SubModel(h=h) for h in (2, 4, 8))
        prof = sn.Profile(subs, {"params": (10.0, 20.0, 40.0)}, scores=(0.5, 0.8, 0.9))
        prof.plot(str(tmp_path / "p.png"))
        assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_discover_and_sort_units_never_flip_the_users_training_flags():
    """Both trace the model in eval mode on a private view: the user's modules never see train()/eval()."""
    from sortednet.importance import sort_units

    calls: list = []
    originals: set = set()

    class Spy(torch.nn.Linear):
        def train(self, mode=True):
            if id(self) in originals:
                calls.append(mode)
            return super().train(mode)

    model = torch.nn.Sequential(Spy(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), Spy(16, 4)).train()
    originals.update(id(m) for m in model.modules())
    x = torch.randn(5, 8)
    dims = sn.discover(model, x, ratios=[0.5, 1.0])
    nest = sn.wrap(model, *dims)
    sort_units(nest, "l2", example=x)
    assert calls == [] and all(m.training for m in model.modules())


def test_self_checks_seed_no_generator_of_another_device(monkeypatch):
    """The seeded runs of wrap's self-checks, ``check``, ``discover`` and ``sort_units`` used
    ``torch.manual_seed``, which also seeds every CUDA generator (or queues the seed for CUDA's first use) and
    restored only the CPU's: on a GPU, wrapping a model reset the user's dropout stream to seed 0. Seen here
    without a GPU: no CUDA / MPS / XPU seeding function is called, and the CPU stream is left as it was."""
    from sortednet.importance import sort_units

    case, plain = FAMILIES["lm_width_heads_depth"](), FAMILIES["mlp"]()  # (the builders seed: before the spies)
    seeded: list = []
    gpu = torch.cuda.is_available() and torch.cuda.is_initialized()  # (SORTEDNET_TEST_DEVICE=cuda: seeded, kept)
    gpu_state = torch.cuda.get_rng_state_all() if gpu else None
    for mod, fn in ((torch.cuda, "manual_seed_all"), (torch.cuda, "manual_seed"), (torch.mps, "manual_seed"),
                    (getattr(torch, "xpu", None), "manual_seed_all")):
        if mod is not None and hasattr(mod, fn) and not (gpu and mod is torch.cuda):
            monkeypatch.setattr(mod, fn, lambda *a, _n=f"{mod.__name__}.{fn}": seeded.append(_n))
    torch.random.default_generator.manual_seed(123)
    want = torch.random.get_rng_state()
    nest = sn.wrap(case.model, *case.dims)
    nest.check(case.example)
    sort_units(nest, "l1", example=case.example)
    sn.discover(plain.model, plain.example)
    assert seeded == []
    assert torch.equal(torch.random.get_rng_state(), want)
    if gpu:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), gpu_state))


def _leak_model(kind: str):
    """A fresh model class per call when ``kind == "own_class"`` (a factory), else stock modules."""
    lin = type("FactoryLinear", (nn.Linear,), {}) if kind == "own_class" else nn.Linear
    return nn.Sequential(lin(8, 32), nn.ReLU(), nn.ModuleList([lin(32, 32) for _ in range(3)]), lin(32, 4))


@pytest.mark.parametrize("kind", ["stock", "own_class"])
@pytest.mark.parametrize("how", ["dropped", "unwrapped"])
def test_a_wrapped_model_is_freed_with_its_last_reference(how, kind):
    """A trainer or server that builds and drops wrapped models (trials, reloads) must not keep them: the
    global guard table, the thread's context variables and the class cache hold nothing that leads back to a
    model (before: every model dropped without unwrap() lived for ever, with its weights; every nest left
    two context variables, holding its state, in the thread that used it)."""
    import contextvars
    import gc
    import importlib
    import weakref

    wrap_mod = importlib.import_module("sortednet.wrap")
    from sortednet.slicers import base

    gc.collect()
    guarded, classes, context = len(wrap_mod._GUARDED), len(base._SUBCLASSES), len(contextvars.copy_context())
    refs = []
    for _ in range(5):
        m = _leak_model(kind)
        nest = sn.wrap(m, sn.Width("h", [8, 32], out=["0", "2.*"], inp=["2.*", "3"]))
        with nest.use("h=8"):
            m[0](torch.randn(2, 8))
        m[0](torch.randn(2, 8))
        nest.export("h=8")
        refs.append((weakref.ref(m), weakref.ref(nest)))
        if how == "unwrapped":
            nest.unwrap()
        del m, nest
    gc.collect()
    assert [(a() is None, b() is None) for a, b in refs] == [(True, True)] * 5
    # nothing added (entries of earlier tests' models may go meanwhile, as their last references do: at most)
    assert len(wrap_mod._GUARDED) <= guarded and len(base._SUBCLASSES) <= classes
    assert len(contextvars.copy_context()) <= context


def test_a_deep_copy_kept_after_unwrap_does_not_keep_the_original_alive():
    """An EMA / teacher copy shares the nest's run-time pin (it follows the same sub-model); the pin held the
    nest's module guards and its error-note method strongly, so after ``nest.unwrap()`` a kept copy still held the
    original model and all its weights. Both are weak now: after unwrap (or unwrap_copy) only the copy remains."""
    import copy
    import gc
    import weakref

    for how in ("unwrap", "unwrap_copy"):
        m = _leak_model("stock")
        nest = sn.wrap(m, sn.Width("h", [8, 32], out=["0", "2.*"], inp=["2.*", "3"]))
        ema = copy.deepcopy(m)
        with nest.use("h=8"):
            small = ema[0](torch.randn(2, 8))
        getattr(nest, how)(*(() if how == "unwrap" else (ema,)))
        if how == "unwrap_copy":
            nest.unwrap()
        weight = weakref.ref(m[0]._parameters["weight"])
        del m, nest
        gc.collect()
        assert weight() is None, how
        assert small.shape == (2, 8) and ema[0](torch.randn(2, 8)).shape == (2, 32)




@pytest.mark.parametrize("op", ["evaluate", "calibrate", "profile_score"])
def test_measuring_never_rewinds_the_random_stream_other_code_draws_from(op):
    """Nest operations that run the model's forwards leave the process's generator to the code drawing from it:
    putting it back after the call (a fork of the generator) replayed the draws a serving thread made meanwhile,
    and the batches a data pipeline drew inside evaluate or calibrate came again as the next training batches."""
    case = FAMILIES["cnn_bn_residual"]()
    nest = sn.wrap(case.model, *case.dims)
    seen: list[torch.Tensor] = []

    def data(n):
        for _ in range(n):
            x = torch.randn(4, *case.example.shape[1:])
            seen.append(x)
            yield x, torch.randint(0, 4, (4,))

    def score(sub):
        return float(evaluate(nest, data(1), subs=[sub])[sub])

    {"evaluate": lambda: evaluate(nest, data(2)),
     "calibrate": lambda: nest.calibrate((x for x, _ in data(2)), batches=2),
     "profile_score": lambda: nest.profile(case.example, metrics=("params",), score=score, progress=False)}[op]()
    inside = list(seen)
    after = [x for x, _ in data(2)]
    assert inside and not any(torch.equal(a, b) for a in after for b in inside), f"{op} rewound the generator"


def test_private_copies_of_views_of_one_large_tensor_copy_the_bytes_they_hold():
    """Two buffers viewing a large tensor (held nowhere else in the model) shared one copy of its whole storage:
    two 10-element views copied 200 MB. The copy holds the bytes between the first and the last element they
    view, every view rebuilt on it, writes seen through both, the model's own untouched."""
    from sortednet.modes import eval_view

    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            table = torch.arange(100_000, dtype=torch.float32)
            self.register_buffer("a", table[500:510], persistent=False)
            self.register_buffer("b", table[505:520].view(5, 3).t(), persistent=False)
            self.register_buffer("c", table[600:604].view(torch.int32), persistent=False)
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x)

    model = Views()
    view, _ = eval_view(model, own_buffers=True)
    for name in ("a", "b", "c"):
        mine, theirs = getattr(view, name), getattr(model, name)
        assert torch.equal(mine, theirs) and mine.stride() == theirs.stride() and mine.dtype == theirs.dtype
        assert mine.untyped_storage().data_ptr() == view.a.untyped_storage().data_ptr()
    assert view.a.untyped_storage().nbytes() < 1024 < model.a.untyped_storage().nbytes()
    view.a[5] = -1.0
    assert view.b[0, 0] == -1.0 and model.b[0, 0] == 505.0

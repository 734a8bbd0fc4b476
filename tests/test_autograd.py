"""Invariant 12: gradients of a live sub-model behave exactly as plain autograd does,
whatever fast path computes them (``wrap(..., inplace_grad=True)``, the default).

Every test builds the same model twice: ``fast`` (in-place gradient path on every
sliced tensor, or at the default threshold with real-size weights) and ``ref``
(``inplace_grad=False``: plain autograd slicing), then compares ``.backward``,
``autograd.grad``, hooks, ``create_graph``, ``torch.func`` and concurrent backward.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

import sortednet as sn
from models import FAMILIES
from sortednet import views
from sortednet.views import SliceInto

#: name -> (builder, inplace_min_numel): None keeps the default threshold (4096) with real-size weights
CASES = {
    "mlp": (lambda: FAMILIES["mlp"](), 0),
    "cnn_bn_residual": (lambda: FAMILIES["cnn_bn_residual"](), 0),
    "lm_width_heads_depth": (lambda: FAMILIES["lm_width_heads_depth"](), 0),
    "sequential": (lambda: FAMILIES["sequential"](), 0),
    "mlp_real_size": (lambda: FAMILIES["mlp"](h1=128, h2=64), None),  # fc2.weight: 8192 elements
    "mlp_wide": (lambda: FAMILIES["mlp"](h1=768, h2=768), None),      # long in-place adds: races show
    "tied_lm": (lambda: FAMILIES["tied_lm"](vocab=300), None),       # one 300x16 weight, two modules
    "mlp_long_rows": (lambda: FAMILIES["mlp"](h1=2048, h2=12), None),  # fc2.weight[:, :h]: 2048-wide rows
}
# SDPA has no double backward on CPU
NO_SDPA = ["mlp", "cnn_bn_residual", "sequential", "mlp_real_size", "mlp_long_rows"]


def tol(a, b, msg):
    """Equal up to float32 rounding of two summation orders (the in-place path and plain autograd run other
    kernels): relative 1e-5 elementwise, and an absolute slack of 1e-5 of the tensor's largest magnitude, as
    entries that nearly cancel keep the rounding of the large terms they summed (second-order penalties here
    reach 7e4, and one CPU's kernels differed by 1.2e-4 on such an entry)."""
    scale = b.detach().abs().max().item() if b.numel() and b.is_floating_point() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 + 1e-5 * scale, msg=lambda m: f"{msg}: {m}")


def loss_of(y: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (y * torch.randn(y.shape, generator=g).to(y.device)).sum()


def pair(name: str):
    """(case, nest) built twice from the same seed: the fast path and plain autograd."""
    build, min_numel = CASES[name]
    out = []
    for inplace in (True, False):
        case = build()
        out.append((case, sn.wrap(case.model, *case.dims, inplace_grad=inplace, inplace_min_numel=min_numel)))
    return out


def subs_of(nest):
    """Sub-models below the largest (where slices, hence the fast path, exist)."""
    s = nest.submodels
    return [s[0], s[len(s) // 2]]


def params_of(case):
    return [p for p in case.model.parameters() if p.requires_grad]


def same_grads(got, want, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or not g.any(), f"{what}[{i}]: gradient where plain autograd has none"
        else:
            assert g is not None, f"{what}[{i}]: None where plain autograd has a gradient"
            tol(g, w, f"{what}[{i}]")


def uses_fast_path(case, nest, sub) -> bool:
    with nest.use(sub):
        return any(isinstance(getattr(m, n, None), torch.Tensor) and getattr(m, n).grad_fn is not None
                   and type(getattr(m, n).grad_fn).__name__ == "SliceIntoBackward"
                   for m in case.model.modules() if "_sn" in m.__dict__ for n in ("weight", "in_proj_weight"))


def graph_nodes(y: torch.Tensor) -> set[str]:
    """Names of the autograd nodes that produced ``y``."""
    seen, todo, names = set(), [y.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        todo.extend(g for g, _ in f.next_functions)
    return names


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_fast_path_runs(name):
    (case, fast), (ref_case, ref) = pair(name)
    assert uses_fast_path(case, fast, fast.smallest), "no weight took the in-place gradient path"
    assert not uses_fast_path(ref_case, ref, ref.smallest)
    linears = any(type(m).forward is not torch.nn.Linear.forward and isinstance(m, torch.nn.Linear)
                  for m in case.model.modules() if "_sn" in m.__dict__)
    convs = any(type(m).__mro__[1] in _PLAIN_CONV and type(m).forward is not type(m).__mro__[1].forward
                and not m.weight.is_contiguous() for m in _sliced_under(case, fast))
    for c, nest, want, want_conv in ((case, fast, linears, convs), (ref_case, ref, False, False)):
        with nest.use(nest.smallest):
            y = c.model(c.example)
        assert ("LinearIntoBackward" in graph_nodes(y)) == want, "the fused nn.Linear path"
        assert ("SliceCopyBackward" in graph_nodes(y)) == want_conv, "the contiguous convolution weight"


_PLAIN_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _sliced_under(case, nest):
    """The sliced modules, read under the smallest sub-model (their weights as the sub-model has them)."""
    with nest.use(nest.smallest):
        yield from (m for m in case.model.modules() if "_sn" in m.__dict__)


def test_fused_linear_steps_aside_where_it_would_change_semantics():
    """Under autocast, and for an instance whose forward was patched, sliced layers run as plain PyTorch would."""
    def build(patch):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8))
        if patch:
            m[0].forward = lambda x, f=m[0].forward: f(x) + 1
        return m

    x = torch.randn(4, 8)
    for patch in (False, True):
        for autocast in (False, True):
            grads = []
            for inplace in (True, False):
                m = build(patch)
                nest = sn.wrap(m, sn.Width("h", [32, 96], out="0", inp="2"), inplace_grad=inplace,
                               inplace_min_numel=0)
                with nest.use("h=32"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    y = m(x)
                    nodes = graph_nodes(y)
                y.float().square().sum().backward()
                grads.append([p.grad for p in m.parameters()])
                assert ("LinearIntoBackward" in nodes) == (inplace and not autocast)  # m[2]: not patched
            same_grads(grads[0], grads[1], f"patch={patch} autocast={autocast}")


@pytest.mark.parametrize("min_numel", [1, 4096])
def test_complex_linear_layers_get_plain_autograds_gradients(min_numel):
    """The fused nn.Linear gradient path multiplied without the complex conjugates autograd takes: a complex
    Linear's weight gradient and the gradient it passed upstream were wrong (relative error 1.3), silently."""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 128, dtype=torch.complex128),
                                   torch.nn.Linear(128, 4, dtype=torch.complex128))

    x = torch.randn(5, 64, dtype=torch.complex128)
    ref = build()
    w1, b1, w2, b2 = ref.parameters()
    ((x @ w1[:64].T + b1[:64]) @ w2[:, :64].T + b2).abs().square().sum().backward()  # the sub-model h=64 by hand
    m = build()
    nest = sn.wrap(m, sn.Width("h", [64, 128], out="0", inp="1"), inplace_min_numel=min_numel)
    with nest.use("h=64"):
        m(x).abs().square().sum().backward()
    for p, r in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-10, atol=1e-12)


class _Doubling(torch.Tensor):
    """A ``__torch_function__`` subclass whose ``F.linear`` doubles its output (what an override may change)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out * 2 if func is torch.nn.functional.linear else out


@pytest.mark.parametrize("subclass, layer", [("torch_function", "linear"), ("torch_dispatch", "linear"),
                                             ("torch_dispatch", "conv")])  # (an F.linear override: no conv's)
def test_tensor_subclass_inputs_get_plain_autograds_gradients(subclass, layer):
    """The fused Linear path computed its weight gradient with GEMMs of its own, leaving out what an input's
    ``__torch_function__`` did to ``F.linear`` (gradient 0.25 of plain autograd's, the forward right); and the
    in-place write into ``.grad`` turned a ``__torch_dispatch__`` subclass's gradient (torch's ``TwoTensor``,
    a pair) into the sum of its parts, on every sliced Linear and Conv2d. Both step aside for subclasses: the
    gradients are those of the exported sub-model run by plain autograd."""
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(0)
    if layer == "linear":
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        a, b = torch.randn(5, 8), torch.randn(5, 8)
    else:
        m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1))
        a, b = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    x = (lambda: a.as_subclass(_Doubling)) if subclass == "torch_function" else (lambda: TwoTensor(a, b))
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"), inplace_min_numel=0)
    small = nest.export("h=4")
    with nest.use("h=4"):
        m(x()).sum().backward()
    small(x()).sum().backward()
    for (name, p), q in zip(m.named_parameters(), small.parameters()):
        want = q.grad
        assert type(p.grad) is type(want), name
        got = p.grad[tuple(slice(0, n) for n in want.shape)]
        if isinstance(want, TwoTensor):
            torch.testing.assert_close(got.a, want.a, msg=name)
            torch.testing.assert_close(got.b, want.b, msg=name)
        else:
            torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_accumulates_like_plain_autograd(name):
    res = []
    for case, nest in pair(name):
        for sub in subs_of(nest):                    # two sub-models accumulate into the same .grad
            with nest.use(sub):
                loss_of(case.model(case.example)).backward()
        res.append([p.grad for p in params_of(case)])
    same_grads(res[0], res[1], ".grad")


@pytest.mark.parametrize("name", sorted(CASES))
def test_autograd_grad_returns_gradients_and_leaves_dot_grad_alone(name):
    res = []
    for case, nest in pair(name):
        params = params_of(case)
        with nest.use(subs_of(nest)[1]):
            loss = loss_of(case.model(case.example))
        res.append(torch.autograd.grad(loss, params, allow_unused=True))
        assert all(p.grad is None for p in params), "autograd.grad wrote .grad"
    same_grads(res[0], res[1], "autograd.grad")


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="Tensor.grad_dtype is new in PyTorch 2.10")
@pytest.mark.parametrize("name", ["mlp", "mlp_real_size", "tied_lm", "lm_width_heads_depth"])
def test_grad_dtype_of_half_precision_weights_is_kept(name):
    """bf16 weights with ``p.grad_dtype = float32`` (fp32 gradients, as AccumulateGrad converts them) train in
    place as with plain autograd: the first backward creates an fp32 ``.grad``, the second adds into it."""
    res = []
    for case, nest in pair(name):
        case.model.to(torch.bfloat16)
        for p in params_of(case):
            p.grad_dtype = torch.float32
        x = case.example.to(torch.bfloat16) if case.example.is_floating_point() else case.example
        for sub in subs_of(nest):
            with nest.use(sub):
                loss_of(case.model(x).float()).backward()
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in params_of(case))
        res.append([p.grad for p in params_of(case)])
    same_grads(res[0], res[1], ".grad (grad_dtype float32)")


@pytest.mark.parametrize("name", ["mlp", "mlp_real_size", "lm_width_heads_depth"])
def test_backward_inputs_accumulates_only_the_inputs(name):
    res = []
    for case, nest in pair(name):
        params = params_of(case)
        chosen = params[::2]
        with nest.use(nest.smallest):
            loss_of(case.model(case.example)).backward(inputs=chosen)
        assert all(p.grad is None for p in params[1::2]), "a parameter outside inputs= got a gradient"
        res.append([p.grad for p in chosen])
    same_grads(res[0], res[1], "backward(inputs=)")


@pytest.mark.parametrize("name", sorted(CASES))
def test_parameter_hooks_see_plain_gradients(name):
    res = []
    for case, nest in pair(name):
        params = params_of(case)
        seen: dict = {}
        for i, p in enumerate(params):
            p.register_hook(lambda g, i=i, seen=seen: seen.setdefault(("hook", i), []).append(g.clone()))
            p.register_post_accumulate_grad_hook(lambda q, i=i, seen=seen: seen.setdefault(("post", i), []).append(
                q.grad.clone()))
        for sub in subs_of(nest):
            with nest.use(sub):
                loss_of(case.model(case.example)).backward()
        res.append(seen)
    fast, ref = res
    assert fast.keys() == ref.keys() and ref, "hooks did not fire as in plain autograd"
    for k in ref:
        assert len(fast[k]) == len(ref[k]), k
        for a, b in zip(fast[k], ref[k]):
            tol(a, b, str(k))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name", NO_SDPA)
def test_second_order_gradients_match(name):
    res = []
    for case, nest in pair(name):
        params = params_of(case)
        sub = subs_of(nest)[0]
        with nest.use(sub):                       # a gradient-norm penalty through autograd.grad
            loss = loss_of(case.model(case.example))
        gs = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pen = sum((g ** 2).sum() for g in gs if g is not None)
        first = torch.autograd.grad(pen, params, allow_unused=True)
        with nest.use(sub):                       # and through backward(create_graph=True)
            loss_of(case.model(case.example)).backward(create_graph=True)
        pen = sum((p.grad ** 2).sum() for p in params if p.grad is not None)
        second = torch.autograd.grad(pen, params, allow_unused=True)
        for p in params:
            p.grad = None                         # break the grad <-> graph cycle
        res.append((first, second))
    same_grads(res[0][0], res[1][0], "autograd.grad(create_graph=True) penalty")
    same_grads(res[0][1], res[1][1], "backward(create_graph=True) penalty")


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_func_grad_and_vmap(name):
    res = []
    for case, nest in pair(name):
        ps = {k: v.detach() for k, v in case.model.named_parameters()}

        def f(ps, x, model=case.model):
            return loss_of(functional_call(model, ps, (x,)))

        def per_sample(ps, x, model=case.model):
            return functional_call(model, ps, (x[None],)).square().sum()

        with nest.use(nest.smallest):
            g = grad(f)(ps, case.example)
            v = vmap(grad(per_sample), in_dims=(None, 0))(ps, case.example)
        assert all(p.grad is None for p in params_of(case))
        res.append((g, v))
    for k in res[1][0]:
        tol(res[0][0][k], res[1][0][k], f"func.grad {k}")
        tol(res[0][1][k], res[1][1][k], f"vmap(grad) {k}")


@pytest.mark.parametrize("name", ["mlp_wide", "lm_width_heads_depth", "tied_lm"])
def test_concurrent_backward_adds_up(name, trials=50, threads=4):
    """Threads run backward at once on shared parameters (sub-models below the largest in every
    sliced dimension: each sliced parameter is sliced in every thread, the in-place path); the sums equal
    the sequential ones up to rounding. Mixing a whole use and a sliced use of one parameter in
    concurrent backwards is the documented case that needs inplace_grad=False (docs/mechanism.md):
    AccumulateGrad's lock and the module's lock are not the same."""
    (case, nest), _ = pair(name)
    below = [s for s in nest.submodels  # Depth skips blocks, it slices no tensor
             if all(s[d.name] < d.full for d in nest.dims if not isinstance(d, sn.Depth))]
    assert len(below) >= 2, below
    subs = [below[i % len(below)] for i in range(threads)]
    params = params_of(case)
    for s in subs:
        with nest.use(s):
            loss_of(case.model(case.example)).backward()
    want = [None if p.grad is None else p.grad.clone() for p in params]
    for trial in range(trials):
        case.model.zero_grad(set_to_none=True)
        barrier = threading.Barrier(threads)
        losses = []
        for s in subs:
            with nest.use(s):
                losses.append(loss_of(case.model(case.example)))
        errors: list = []

        def body(i, barrier=barrier, losses=losses, errors=errors):
            try:
                barrier.wait()
                losses[i].backward()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        ts = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not errors, errors
        same_grads([p.grad for p in params], want, f"trial {trial}")


def test_inplace_min_numel_is_a_per_nest_setting():
    big = FAMILIES["mlp"](h1=128, h2=64)
    low = FAMILIES["mlp"](h1=128, h2=64)
    a = sn.wrap(big.model, *big.dims)                          # default: only fc2.weight (8192)
    b = sn.wrap(low.model, *low.dims, inplace_min_numel=0)     # every sliced tensor
    with a.use(a.smallest), b.use(b.smallest):
        kinds = [(type(x.fc1.weight.grad_fn).__name__ == "SliceIntoBackward",
                  type(x.fc2.weight.grad_fn).__name__ == "SliceIntoBackward") for x in (big.model, low.model)]
    assert kinds == [(False, True), (True, True)]
    assert SliceInto is sn.slicers._SliceInto
    for bad in (-1, 1.5, True, "4096"):
        case = FAMILIES["mlp"]()
        with pytest.raises(sn.SortedNetError, match="inplace_min_numel"):
            sn.wrap(case.model, *case.dims, inplace_min_numel=bad)
        assert "_sn" not in case.model.fc1.__dict__


def backward_at(where: str, loss: torch.Tensor, nest, sub=None) -> None:
    """``loss.backward()`` outside the forward's use block, in another thread, under another sub-model, or
    inside a use block of the forward's ``sub``."""
    if where == "other_thread":
        t = threading.Thread(target=loss.backward)
        t.start()
        t.join(60)
    elif where == "other_submodel":
        with nest.use(nest.largest):
            loss.backward()
    elif where == "inside_use":
        with nest.use(sub):
            loss.backward()
    else:
        loss.backward()


def test_checkpoint_context_copies_to_itself_and_pickles_to_one_that_pins_nothing():
    """A model that stores the context (Hugging Face checkpointing) deep-copies with it (the copy follows the
    same run-time state) and pickles, again and again, to a context that pins nothing."""
    import pickle

    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Width("h", [2, 8], out="0", inp="1"))
    ctx = nest.checkpoint_context
    assert copy.deepcopy(ctx) is ctx
    with nest.use("h=2"):
        _, pin = ctx()
    assert hasattr(pin, "__enter__")
    again = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(ctx))))
    assert all(isinstance(c, contextlib.nullcontext) for c in again())


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("where", ["outside_use", "other_thread", "other_submodel"])
@pytest.mark.parametrize("name", ["mlp_real_size", "sequential"])
def test_checkpoint_recomputes_the_forward_submodel(name, where, reentrant):
    (case, nest), (ref_case, ref) = pair(name)
    sub = subs_of(nest)[0]
    x = case.example.clone().requires_grad_()   # reentrant checkpoint needs an input requiring grad
    with ref.use(sub):
        loss_of(ref_case.model(x)).backward()
    want = [p.grad for p in params_of(ref_case)]
    how = [lambda: nest.checkpoint(case.model, x, use_reentrant=reentrant)]
    if not reentrant:  # the context_fn form for a plain torch.utils.checkpoint call
        how.append(lambda: torch.utils.checkpoint.checkpoint(case.model, x, use_reentrant=False,
                                                             context_fn=nest.checkpoint_context))
    else:  # a bare reentrant checkpoint of the model: the nest sees it from the forward and pins its recompute
        how.append(lambda: torch.utils.checkpoint.checkpoint(case.model, x, use_reentrant=True))
    for run in how:
        case.model.zero_grad(set_to_none=True)
        with nest.use(sub):
            loss = loss_of(run())
        backward_at(where, loss, nest)
        same_grads([p.grad for p in params_of(case)], want, f"checkpoint ({where})")


class _LastBlock(torch.nn.Module):
    """A forward that checkpoints a part reading its layer list by position / length (``blocks[-1]``,
    ``len(blocks)``): under depth 2 of 4 that is block 1, and every block has the same shape."""

    def __init__(self, n: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(n))
        self.head = torch.nn.Linear(8, 3)

    def part(self, x):
        return torch.tanh(self.blocks[-1](x)) * len(self.blocks)

    def forward(self, x):
        x = torch.tanh(self.blocks[0](x))
        return self.head(torch.utils.checkpoint.checkpoint(self.part, x, use_reentrant=False))


def test_the_installed_torch_has_the_checkpoint_internals_the_pins_read():
    """The pins find PyTorch's checkpoints by their code on the call stack: the reentrant function's forward and
    the function holding the non-reentrant generator as ``gen`` (``checkpoint`` up to torch 2.13,
    ``_checkpoint_impl`` since 2.14, where the pin found nothing and a backward outside ``use`` recomputed another
    depth: silently wrong gradients). A torch that moves them again fails here, by name."""
    from sortednet import plan

    assert plan._CKPT_CODE is not None, "torch.utils.checkpoint.CheckpointFunction.forward not found"
    assert plan._NR_CODE is not None and "gen" in plan._NR_CODE.co_varnames, (
        "no function of torch.utils.checkpoint holds the non-reentrant generator as 'gen'")
    # a read inside a non-reentrant checkpoint skips the stack walk while the innermost saved-tensor pack hook
    # is the one it pinned under: each checkpoint call must make its own (one shared by all would pin only the first)
    # (and its module is torch.utils.checkpoint's: only such hooks are cached). Reads under hooks of the user's own
    # walk while a non-reentrant checkpoint's forward runs: counted by its hook class, 1 inside, 0 in recomputation
    packs, counts = [], []

    def part(x):
        packs.append(torch._C._autograd._top_saved_tensors_default_hooks(False)[0])
        counts.append(sn.dims.NONREENTRANT[0])
        return x.sin()

    x = torch.randn(3, requires_grad=True)
    torch.utils.checkpoint.checkpoint(part, x, use_reentrant=False)
    torch.utils.checkpoint.checkpoint(part, x, use_reentrant=False).sum().backward()
    assert len(packs) == 3 and packs[0] is not packs[1], "one saved-tensor pack hook shared by two checkpoints"
    assert packs[0].__module__ == plan._CKPT_MODULE, packs[0].__module__
    assert counts == [1, 1, 0], f"non-reentrant checkpoint forwards counted {counts} (torch.utils.checkpoint." \
                                "_checkpoint_hook not found?)"


@pytest.mark.parametrize("where", ["outside_use", "other_thread", "other_submodel", "inside_use"])
def test_a_plain_non_reentrant_checkpoint_recomputes_the_forward_depth(where):
    """Another depth changes no saved shape, so PyTorch's recomputation check cannot see a backward that
    recomputes under it; the layer list read inside the checkpoint pins the recomputation to the forward's
    depth (the gradients were the full depth's, silently: 0.057 off an oracle of 2 blocks)."""
    m, small = _LastBlock(), _LastBlock(n=2)
    small.load_state_dict({k: v for k, v in m.state_dict().items() if k in small.state_dict()})
    nest = sn.wrap(m, sn.Depth("depth", [2, 4], layers="blocks"))
    x = torch.randn(6, 8)
    loss_of(small(x)).backward()
    with nest.use("depth=2"):
        loss = loss_of(m(x))
    backward_at(where, loss, nest, "depth=2")
    live = dict(m.named_parameters())
    for name, q in small.named_parameters():
        torch.testing.assert_close(live[name].grad, q.grad, rtol=0, atol=1e-6, msg=name)
    assert all(live[f"blocks.{i}.{n}"].grad is None for i in (2, 3) for n in ("weight", "bias"))


class _NonReentrantParts(torch.nn.Module):
    """Checkpoints (``use_reentrant=False``: PyTorch's and Hugging Face's default) a pair of Linears and a pair of
    bias-free convolutions, each cut by a width: the weights read by the fused Linear path, the dense conv read
    and the plain attribute read."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.conv1 = torch.nn.Conv2d(4, 16, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(16, 4, 1, bias=False)
        self.ckpt = True

    def fc(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def conv(self, x):
        return self.conv2(torch.relu(self.conv1(x)))

    def forward(self, x, img):
        run = (lambda f, t: torch.utils.checkpoint.checkpoint(f, t, use_reentrant=False)) if self.ckpt else (
            lambda f, t: f(t))
        return run(self.fc, x).square().mean() + run(self.conv, img).square().mean()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("where", ["outside_use", "other_thread", "other_submodel", "inside_use"])
def test_a_non_reentrant_checkpoint_recomputes_the_forward_widths(where, fused):
    """``loss.backward()`` outside the ``use`` block of a forward with non-reentrant checkpoints (the natural
    loop: ``with nest.use(sub): loss = model(x)`` then ``loss.backward()``, with Hugging Face gradient
    checkpointing on) recomputed under the full widths: PyTorch's raw CheckpointError ("different metadata"),
    or, with the fused Linear path, no weight read to pin at all. Each checkpoint now recomputes the sub-model
    of its forward, wherever backward runs."""
    m = _NonReentrantParts()
    nest = sn.wrap(m, sn.Width("f", [8, 32], out="fc1", inp="fc2"), sn.Width("c", [4, 16], out="conv1", inp="conv2"),
                   inplace_min_numel=0 if fused else 1 << 30)
    x, img = torch.randn(6, 16), torch.randn(2, 4, 6, 6)
    m.ckpt = False
    with nest.use("f=8,c=4"):
        m(x, img).backward()
    want = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    m.ckpt = True
    with nest.use("f=8,c=4"):
        loss = m(x, img)
    backward_at(where, loss, nest, "f=8,c=4")
    same_grads([p.grad for p in m.parameters()], want, f"non-reentrant checkpoints ({where})")
    assert not nest._state.uses.get()


class _ScaledByWeight(torch.nn.Module):
    """A part scaling its input by a statistic of a sliced weight read without gradients (``no_grad``) or
    detached: a saved value of the same shape under every width."""

    def __init__(self, detach: bool):
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.fc, self.out = torch.nn.Linear(16, 16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.detach = detach

    def scaled(self, h):
        if self.detach:
            return h * self.fc.weight.detach().square().sum()
        with torch.no_grad():
            k = self.fc.weight.square().sum()
        return h * k

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


@contextlib.contextmanager
def _paused_elsewhere(what: str, m: nn.Module):
    """Another thread held inside ``what``: a training forward of ``m`` (the nest counts it), or a reentrant
    checkpoint's forward of an unwrapped model (counted process-wide); nothing when ``what`` is ``"alone"``."""
    if what == "alone":
        yield
        return
    inside, release = threading.Event(), threading.Event()

    def wait(*_):
        if threading.current_thread().name == "elsewhere":
            inside.set()
            release.wait(60)

    def other_model():
        lin = nn.Linear(4, 4)
        lin.register_forward_hook(wait)
        torch.utils.checkpoint.checkpoint(lin, torch.randn(2, 4, requires_grad=True), use_reentrant=True)

    if what == "training_thread":
        hook = m.fc.register_forward_hook(wait)
        target = lambda: m(torch.randn(2, 16)).sum()  # noqa: E731
    else:
        hook, target = None, other_model
    t = threading.Thread(target=target, name="elsewhere")
    t.start()
    try:
        assert inside.wait(60), "the other thread never got there"
        yield
    finally:
        release.set()
        t.join()
        if hook is not None:
            hook.remove()


@pytest.mark.parametrize("elsewhere", ["alone", "training_thread", "reentrant_thread"])
@pytest.mark.parametrize("detach", [False, True], ids=["no_grad", "detached"])
def test_a_non_reentrant_checkpoint_of_a_part_reading_a_weight_without_gradients_recomputes_its_width(detach,
                                                                                                        elsewhere):
    """A non-reentrant checkpoint on a part of the model (no root forward around it) whose sliced read runs
    without gradients or is detached: the recomputation outside the ``use`` block read the full width, and the
    saved scale has one shape under every width, so PyTorch's check could not tell: the gradients were off by
    0.14, in silence. The read pins the checkpoint to its forward's sub-model, with or without gradients, also
    while another thread runs a training forward of the nest or a reentrant checkpoint of any model (the read
    took the reentrant checkpoints' path then, which found none to pin here, and skipped this one's)."""
    m = _ScaledByWeight(detach)
    nest = sn.wrap(m, sn.Width("w", [8, 32], out="fc", inp="out"))
    x = torch.randn(6, 16)

    def step(ckpt):
        h = m.pre(x)
        h = torch.utils.checkpoint.checkpoint(m.scaled, h, use_reentrant=False) if ckpt else m.scaled(h)
        return m(h).square().mean()

    with nest.use("w=8"):
        step(False).backward()
    want = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    with _paused_elsewhere(elsewhere, m):
        with nest.use("w=8"):
            loss = step(True)
    loss.backward()
    same_grads([p.grad for p in m.parameters()], want, f"a part read without gradients ({elsewhere})")


class _TargetFromLastBlock(torch.nn.Module):
    """Blocks of one shape, and a part (checkpointed on its own) that reads the last block kept without gradients
    only, as a fixed target (a stop-gradient self-distillation term)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))
        self.proj = torch.nn.Linear(16, 16)

    def part(self, h):
        with torch.no_grad():
            target = torch.tanh(self.blocks[-1](h))
        return (self.proj(h) - target).square().mean()

    def forward(self, h):
        for b in self.blocks:
            h = h + torch.tanh(b(h))
        return h


def test_a_non_reentrant_checkpoint_reading_the_layer_list_without_gradients_recomputes_its_depth():
    """The part's only read of the Depth layer list runs without gradients: its recomputation after the ``use``
    block took the full depth's last block (same shape, so PyTorch's check could not tell): gradients 0.21 off,
    in silence. Such a read pins the checkpoint, with or without gradients."""
    m = _TargetFromLastBlock()
    nest = sn.wrap(m, sn.Depth("d", [2, 4], layers="blocks"))
    x = torch.randn(5, 16)

    def step(ckpt):
        h = m(x)
        aux = torch.utils.checkpoint.checkpoint(m.part, h, use_reentrant=False) if ckpt else m.part(h)
        return h.square().mean() + aux

    with nest.use("d=2"):
        step(False).backward()
    want = [p.grad for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    with nest.use("d=2"):
        loss = step(True)
    loss.backward()
    same_grads([p.grad for p in m.parameters()], want, "a layer list read without gradients")


def test_a_non_reentrant_checkpoint_reading_a_dimensions_active_size_recomputes_it():
    """A checkpointed part whose only read of the nest's state is ``dim.active`` (a size-dependent scale): its
    recomputation after the ``use`` block read the full size, and the gradients were 1.06 off, in silence.
    ``Active.plan()`` pins the checkpoint as a sliced attribute read does."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Width("h", [8, 16], out="0", inp="2"))
    dim, x, scale = nest.dims[0], torch.randn(5, 8), torch.randn(4, requires_grad=True)

    def part(y):
        return y * torch.sin(scale * dim.active)

    def step(ckpt):
        y = m(x)
        return (torch.utils.checkpoint.checkpoint(part, y, use_reentrant=False) if ckpt else part(y)).square().sum()

    with nest.use("h=8"):
        step(False).backward()
    want = [scale.grad, *(p.grad for p in m.parameters())]
    scale.grad = None
    m.zero_grad(set_to_none=True)
    with nest.use("h=8"):
        loss = step(True)
    loss.backward()
    same_grads([scale.grad, *(p.grad for p in m.parameters())], want, "a checkpoint reading dim.active")


_SAVER = torch.autograd.graph.save_on_cpu()


def _keep(t):
    return t


@pytest.mark.parametrize("hooks", ["functions", "save_on_cpu"])
def test_checkpoints_under_one_pair_of_the_users_saved_tensor_hooks_each_recompute_their_width(hooks):
    """Checkpointed parts that each read a sliced weight under the user's own saved-tensor hooks, one pair reused
    by every part (module-level functions, one ``save_on_cpu``): the pin's cache took those hooks for the first
    checkpoint's and skipped the others' walk, which then recomputed the full width (gradients up to 7.6 off, in
    silence). Only a checkpoint's own hooks (made per call) are cached."""
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
    nest = sn.wrap(layers, sn.Width("h", [8, 16], out=["0", "1", "2"]))

    def part(lin, x):
        with _SAVER if hooks == "save_on_cpu" else torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            h = torch.nn.functional.linear(x, lin.weight, lin.bias)
        return torch.sin(h.sum(-1, keepdim=True)) * x  # (sin saves a [4, 1] sum: one shape under every width)

    def run(x, ckpt):
        for lin in layers:
            x = x + (torch.utils.checkpoint.checkpoint(part, lin, x, use_reentrant=False) if ckpt else part(lin, x))
        return x.square().mean()

    x = torch.randn(4, 16)
    with nest.use("h=8"):
        run(x, False).backward()
    want = [p.grad.clone() for p in layers.parameters()]
    layers.zero_grad(set_to_none=True)
    with nest.use("h=8"):
        loss = run(x, True)
    loss.backward()
    same_grads([p.grad for p in layers.parameters()], want, f"checkpoints under the user's hooks ({hooks})")


class _CheckpointedBlocks(torch.nn.Module):
    """A model whose own forward checkpoints its blocks with ``use_reentrant=True`` (older Hugging Face,
    timm and torchvision code): the nest cannot wrap those calls."""

    def __init__(self, d: int = 6, h: int = 16, n: int = 2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, d)) for _ in range(n))
        self.ckpt = True

    def forward(self, x):
        for b in self.blocks:
            x = x + (torch.utils.checkpoint.checkpoint(b, x, use_reentrant=True) if self.ckpt else b(x))
        return x


@pytest.mark.parametrize("where", ["outside_use", "other_thread", "other_submodel", "inside_use"])
@settings(max_examples=12, deadline=None)
@given(h=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_reentrant_checkpoints_inside_the_model_recompute_the_forward_submodel(where, h, seed):
    """A backward that runs under another sub-model than its forward (outside the use block, another thread,
    another use block) used to recompute a reentrant checkpoint with THAT sub-model: silently its gradients
    (a Width nest keeps the block's output shape). The root forward's outputs now pin the recomputation."""
    torch.manual_seed(seed)
    model = _CheckpointedBlocks()
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="blocks.*.0", inp="blocks.*.2"))
    x = torch.randn(5, 6, requires_grad=True)
    model.ckpt = False
    with nest.use(f"h={h}"):
        model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad(set_to_none=True)
    x.grad = None
    model.ckpt = True
    with nest.use(f"h={h}"):
        loss = model(x).square().sum()
    backward_at(where, loss, nest, f"h={h}")
    same_grads([p.grad for p in model.parameters()] + [x.grad], want, f"reentrant checkpoint ({where})")


class _Holder(torch.nn.Module):
    """The checkpointing model as a child: ``holder.body(x)`` (a Hugging Face ``model.model(ids)``) or
    ``holder.forward(x)`` (PEFT's tuners call the model's forward, not the model) skip the root's call."""

    def __init__(self):
        super().__init__()
        self.body = _CheckpointedBlocks()

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("call", ["child", "forward"])
@pytest.mark.parametrize("where", ["outside_use", "other_thread", "other_submodel", "inside_use"])
def test_reentrant_checkpoints_of_a_forward_entered_below_the_root_recompute_its_submodel(call, where):
    """Only a call of the root counted a forward as training, so a reentrant checkpoint inside ``model.body(x)``
    or ``model.forward(x)`` was never pinned: backward outside the use block or in another thread (an
    accelerator's autograd thread) recomputed the default sub-model, silently (relative gradient errors of
    0.5-1.4 on a Llama). The root's direct children that hold sliced modules now pin a forward entered there."""
    torch.manual_seed(0)
    model = _Holder()
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="body.blocks.*.0", inp="body.blocks.*.2"))
    x = torch.randn(5, 6, requires_grad=True)
    run = model.body if call == "child" else model.forward
    model.body.ckpt = False
    with nest.use("h=4"):
        run(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad(set_to_none=True)
    x.grad = None
    model.body.ckpt = True
    with nest.use("h=4"):
        loss = run(x).square().sum()
    backward_at(where, loss, nest, "h=4")
    same_grads([p.grad for p in model.parameters()] + [x.grad], want, f"{call} entry, backward {where}")
    with nest.use("h=8"):  # the same entries, inference and training again: nothing left pinned or counted
        model.body(x)
    assert nest._state.training == 0 and not nest._state.uses.get()
    assert nest.active == nest.largest


@pytest.mark.parametrize("where", ["outside_use", "other_thread"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_a_checkpointed_function_that_activates_sub_models_recomputes_them_in_order(reentrant, where):
    """A checkpointed function that runs the model under two sub-models by ``activate``: the checkpoint is
    pinned to the first one (the plan read when it started), and the recomputation ignored the second
    ``activate`` (reentrant: silently the first sub-model's gradients twice; non-reentrant around the root:
    PyTorch's recomputation check refused). An ``activate`` during a pinned recomputation now re-pins it,
    as in a pinned forward."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = _Holder()
    model.body.ckpt = False
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="body.blocks.*.0", inp="body.blocks.*.2"))
    x = torch.randn(5, 6, requires_grad=True)

    def fn(t):
        nest.activate("h=4")
        a = model(t)
        nest.activate("h=8")
        return a + model(t)

    def run(ckpt):
        loss = (checkpoint(fn, x, use_reentrant=reentrant) if ckpt else fn(x)).square().sum()
        nest.activate(nest.largest)
        backward_at(where, loss, nest)
        out = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
        model.zero_grad(set_to_none=True)
        x.grad = None
        return out

    want = run(False)
    same_grads(run(True), want, f"activate twice in a checkpointed function (reentrant={reentrant}, {where})")
    assert nest._state.training == 0 and not nest._state.uses.get()  # (the recomputation activated h=8 again)


@pytest.mark.parametrize("inner", ["reentrant", "none"])
def test_a_non_reentrant_checkpoint_around_the_root_recomputes_its_forward_submodel(inner):
    """``checkpoint(model, x, use_reentrant=False)`` with reentrant checkpoints inside the model, backward outside
    the use block: PyTorch's recomputation check saw only the inner checkpoints' inputs, whose shapes do not
    change with the width, and the default sub-model was recomputed silently. The root forward now pins the
    non-reentrant checkpoint around it (as it pins a reentrant one)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = _Holder()
    model.body.ckpt = inner == "reentrant"
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="body.blocks.*.0", inp="body.blocks.*.2"))
    x = torch.randn(5, 6, requires_grad=True)
    with nest.use("h=4"):
        model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad(set_to_none=True)
    x.grad = None
    with nest.use("h=4"):
        loss = checkpoint(model, x, use_reentrant=False).square().sum()
    loss.backward()
    same_grads([p.grad for p in model.parameters()] + [x.grad], want, f"non-reentrant around the root ({inner})")


class _CheckpointedUse(_CheckpointedBlocks):
    """Its forward runs its first block under ``nest.use("h=4")`` (a sub-model chosen inside the forward)."""

    def forward(self, x):
        with self.nest.use("h=4"):
            x = x + torch.utils.checkpoint.checkpoint(self.blocks[0], x, use_reentrant=True)
        return x + torch.utils.checkpoint.checkpoint(self.blocks[1], x, use_reentrant=True)


class _CheckpointedInner(_CheckpointedBlocks):
    """Its checkpointed function enters ``use("h=4")`` for the first block only (``use_inside_checkpoint``),
    or checkpoints its blocks again (``nested``)."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def inner(self, x):
        if self.how == "nested":
            for b in self.blocks:
                x = x + torch.utils.checkpoint.checkpoint(b, x, use_reentrant=True)
            return x
        with self.nest.use("h=4"):
            a = self.blocks[0](x)
        return a + self.blocks[1](x)

    def forward(self, x):
        if not self.ckpt:
            if self.how == "nested":
                for b in self.blocks:
                    x = x + b(x)
                return x
            with self.nest.use("h=4"):
                a = self.blocks[0](x)
            return a + self.blocks[1](x)
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=True)


@pytest.mark.parametrize("case", ["use_inside_checkpoint", "nested"])
@pytest.mark.parametrize("outer", [None, "h=8"])
def test_a_reentrant_checkpoint_recomputes_the_submodel_in_force_when_it_started(case, outer):
    """A use block entered inside the checkpointed function does not pin the whole checkpoint to its
    sub-model (it did: the second block recomputed at h=4); nested reentrant checkpoints pin the outer one
    too (it recomputed the default)."""
    torch.manual_seed(0)
    model = _CheckpointedInner(case)
    nest = model.nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="blocks.*.0", inp="blocks.*.2"))
    x = torch.randn(5, 6, requires_grad=True)
    got = []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        x.grad = None
        model.ckpt = ckpt
        with nest.use(outer) if outer else contextlib.nullcontext():
            loss = model(x).square().sum()
        loss.backward()                                # outside the use block
        got.append([p.grad.clone() for p in model.parameters()] + [x.grad.clone()])
    same_grads(got[1], got[0], f"{case} under {outer}")


@pytest.mark.parametrize("depth", [1, 5])
def test_a_root_forward_deep_under_a_reentrant_checkpoint_is_pinned(depth):
    """``checkpoint(wrapper, x, use_reentrant=True)`` where the wrapped model sits ``depth`` containers
    down (it was pinned only within ten frames: three containers)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))
    nest = sn.wrap(model, sn.Width("h", [4, 16], out="0", inp="2"))
    outer = model
    for _ in range(depth):
        outer = torch.nn.Sequential(outer)
    x = torch.randn(5, 6, requires_grad=True)
    got = []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        with nest.use("h=4"):
            y = torch.utils.checkpoint.checkpoint(outer, x, use_reentrant=True) if ckpt else outer(x)
        y.square().sum().backward()
        got.append([p.grad.clone() for p in model.parameters()])
    same_grads(got[1], got[0], f"depth {depth}")


@pytest.mark.parametrize("case", ["applied_twice", "loss_from_nested_output", "use_inside_forward"])
def test_reentrant_checkpoints_recompute_the_submodel_of_their_own_forward(case):
    """Each reentrant checkpoint recomputes the sub-model in force when ITS forward ran (not one sub-model
    per root forward): the model applied twice under two sub-models, a loss that reaches the graph only
    through a nested output (hidden states), a forward that enters a use block itself."""
    torch.manual_seed(0)
    model = _CheckpointedUse() if case == "use_inside_forward" else _CheckpointedBlocks()
    nest = model.nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="blocks.*.0", inp="blocks.*.2"))
    x = torch.randn(5, 6, requires_grad=True)

    def loss():
        if case == "applied_twice":
            with nest.use("h=4"):
                y = model(x)
            with nest.use("h=8"):
                y = model(y)
            return y.square().sum()
        if case == "loss_from_nested_output":
            with nest.use("h=4"):
                out = {"last": model(x).sum(), "hidden": (model(x * 2),)}
            return out["hidden"][0].square().sum()
        return model(x).square().sum()

    def grads(ckpt):
        model.zero_grad(set_to_none=True)
        x.grad = None
        model.ckpt = ckpt
        if isinstance(model, _CheckpointedUse) and not ckpt:
            return None
        loss().backward()                              # outside every use block
        return [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]

    want = grads(False)
    if want is None:  # the reference: the same forward with every block under its sub-model, no checkpoint
        model.zero_grad(set_to_none=True)
        with nest.use("h=4"):
            y = x + model.blocks[0](x)
        (y + model.blocks[1](y)).square().sum().backward()
        want = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    same_grads(grads(True), want, case)


def test_one_reentrant_checkpoint_over_two_nests_recomputes_each_forward_submodel():
    """``checkpoint(outer, x, use_reentrant=True)`` where ``outer`` runs two separately wrapped models: each
    nest pins the recomputation to its own sub-model of the forward."""
    torch.manual_seed(0)
    parts = [torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6)) for _ in range(2)]
    nests = [sn.wrap(p, sn.Width("h", [4, 16], out="0", inp="2")) for p in parts]
    outer = torch.nn.Sequential(*parts)
    x = torch.randn(5, 6, requires_grad=True)

    def run(ckpt):
        outer.zero_grad(set_to_none=True)
        with nests[0].use("h=4"), nests[1].use("h=4"):
            y = torch.utils.checkpoint.checkpoint(outer, x, use_reentrant=True) if ckpt else outer(x)
        y.square().sum().backward()                    # outside both use blocks
        return [p.grad.clone() for p in outer.parameters()]

    same_grads(run(True), run(False), "two nests under one reentrant checkpoint")


def _wide_mlp(inplace: bool):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 96))
    return m, sn.wrap(m, sn.Width("h", [64, 256], out="0", inp="2"), inplace_grad=inplace)


@pytest.mark.parametrize("inplace", [True, False])
def test_a_sliced_weight_is_a_view_of_the_parameter_in_training(inplace):
    """Under use(sub) with gradients on, module.weight is a view of the parameter (input-sliced weights
    included): an in-place write reaches the parameter, and a parameter changed between forward and
    backward trips autograd's version check, as plain slicing does."""
    m, nest = _wide_mlp(inplace)
    x = torch.randn(8, 32)
    with nest.use("h=64"):
        w = m[2].weight
        assert w.untyped_storage().data_ptr() == m[2]._parameters["weight"].untyped_storage().data_ptr()
        w.data.clamp_(-0.01, 0.01)
        assert m[2]._parameters["weight"][:, :64].abs().max() <= 0.01
        loss = m(x).square().sum()
        loss.backward(retain_graph=True)
        with torch.no_grad():
            m[2]._parameters["weight"].mul_(2)
        with pytest.raises(RuntimeError, match="modified"):  # never the old weights silently
            loss.backward()


def _conv_pair(inplace: bool):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 32, 3, padding=1))
    return m, sn.wrap(m, sn.Width("h", [16, 32, 64], out="0", inp="2"), inplace_grad=inplace)


@pytest.mark.parametrize("change", ["none", "data_swap", "mutation_allowed", "mutation"])
def test_a_convolution_reads_one_contiguous_copy_with_plain_autograds_semantics(change):
    """Training an input-sliced ``nn.Conv2d``, its weight goes to the convolution as one contiguous copy
    (``SliceCopy``: the forward and the backward share it, where a strided view is copied by each). Gradients,
    second-order gradients and the version check stay plain autograd's: a ``p.data = ...`` swap or a change
    under ``allow_mutation_on_saved_tensors`` between forward and backward is fine, a plain in-place change
    raises, in both."""
    from torch.autograd.graph import allow_mutation_on_saved_tensors

    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = []
    for inplace in (True, False):
        m, nest = _conv_pair(inplace)
        x = x0.clone().requires_grad_()
        ctx = allow_mutation_on_saved_tensors() if change == "mutation_allowed" else contextlib.nullcontext()
        with ctx:
            with nest.use("h=32"):
                out = m(x)
                # (under allow_mutation_on_saved_tensors, saved-tensor hooks: the plain path, as in a checkpoint)
                assert ("SliceCopyBackward" in graph_nodes(out)) == (inplace and change != "mutation_allowed")
                w = m[2].weight
                assert w.untyped_storage().data_ptr() == m[2]._parameters["weight"].untyped_storage().data_ptr()
            for p in m.parameters():
                if change == "data_swap":
                    p.data = p.data * 0.5
                elif change != "none":
                    with torch.no_grad():
                        p.mul_(0.5)
            if change == "mutation":
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    torch.autograd.grad(out.sum(), x)
                got.append(None)
                continue
            gx, = torch.autograd.grad(out.sum(), x, create_graph=True)
            penalty = gx.square().sum()
            grads = torch.autograd.grad(penalty, list(m.parameters()), allow_unused=True)
        got.append((gx.detach(), grads))
    if change != "mutation":
        tol(got[0][0], got[1][0], "input gradient")
        same_grads(got[0][1], got[1][1], "penalty gradients")


def test_a_convolution_whose_class_overrides_conv_forward_reads_the_view():
    """A subclass's own ``_conv_forward`` gets the view of the parameter, as its forward would (it may write
    its weight argument in place: into a copy, that write would never reach the parameter)."""
    seen = []

    class Scaled(nn.Conv2d):
        def _conv_forward(self, x, w, b):
            seen.append(w.untyped_storage().data_ptr() == self._parameters["weight"].untyped_storage().data_ptr())
            return super()._conv_forward(x, w * 2, b)

    grads = []
    for inplace in (True, False):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), Scaled(64, 32, 3, padding=1))
        nest = sn.wrap(m, sn.Width("h", [16, 32, 64], out="0", inp="2"), inplace_grad=inplace)
        with nest.use("h=16"):
            y = m(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
        assert "SliceCopyBackward" not in graph_nodes(y)
        y.square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    assert seen == [True, True]
    same_grads(grads[0], grads[1], "a subclass's _conv_forward")


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_convolution_copy_accumulates_into_the_slice_of_grad(channels_last):
    """``.backward()`` twice through the copy adds both gradients into the sliced part of ``.grad`` and leaves
    the rest zero, as plain slicing does; a channels-last model's copy stays channels-last (the convolution's
    output and gradients have plain slicing's memory format)."""
    x = torch.randn(2, 3, 8, 8)
    grads, strides = [], []
    for inplace in (True, False):
        m, nest = _conv_pair(inplace)
        if channels_last:
            m.to(memory_format=torch.channels_last)
        for sub in ("h=16", "h=32"):
            with nest.use(sub):
                y = m(x)
                assert ("SliceCopyBackward" in graph_nodes(y)) == inplace
            y.square().sum().backward()
            strides.append(y.stride())
        grads.append([p.grad for p in m.parameters()])
        strides.append(m[2].weight.grad.stride())
    same_grads(grads[0], grads[1], "accumulated")
    assert not grads[0][2][:, 32:].any()
    assert strides[:3] == strides[3:]


@pytest.mark.parametrize("inplace", [True, False])
def test_a_parameter_frozen_after_the_forward_gets_no_gradient(inplace):
    m, nest = _wide_mlp(inplace)
    with nest.use("h=64"):
        loss = m(torch.randn(8, 32)).square().sum()
    for p in m.parameters():
        p.requires_grad_(False)
    loss.backward()
    assert all(p.grad is None for p in m.parameters())


def test_forward_mode_ad_through_a_sliced_linear_matches_plain_autograd():
    import torch.autograd.forward_ad as fwad

    x, t = torch.randn(4, 64), torch.randn(4, 64)
    tangents = []
    for inplace in (True, False):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
        nest = sn.wrap(m, sn.Width("h", [32, 128], out="0", inp="2"), inplace_grad=inplace)
        with nest.use("h=32"), fwad.dual_level():
            tangents.append(fwad.unpack_dual(m(fwad.make_dual(x, t))).tangent)
    tol(tangents[0], tangents[1], "jvp")


@pytest.mark.parametrize("change", ["data_swap", "mutation_allowed"])
def test_a_create_graph_backward_uses_the_weight_saved_at_forward(change):
    """The fused linear's create_graph backward recomputed the weight slice from the live parameter: after a
    ``p.data = ...`` swap (EMA / SWA) or an update under ``allow_mutation_on_saved_tensors`` between forward and
    backward, a gradient penalty's input gradient was 0.28 off plain autograd (which uses the saved weight)."""
    from torch.autograd.graph import allow_mutation_on_saved_tensors

    x0 = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    got = []
    for inplace in (True, False):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
        nest = sn.wrap(m, sn.Width("h", [32, 64, 128], out="0", inp="2"), inplace_grad=inplace)
        x = x0.clone().requires_grad_()
        ctx = allow_mutation_on_saved_tensors() if change == "mutation_allowed" else contextlib.nullcontext()
        with ctx:
            with nest.use("h=64"):
                out = m(x)
                # (under allow_mutation_on_saved_tensors, saved-tensor hooks: the plain path, as in a checkpoint)
                assert ("LinearIntoBackward" in graph_nodes(out)) == (inplace and change != "mutation_allowed")
            for p in m.parameters():
                if change == "data_swap":
                    p.data = p.data * 0.5
                else:
                    with torch.no_grad():
                        p.mul_(0.5)
            gx, = torch.autograd.grad(out.sum(), x, create_graph=True)
            penalty = gx.square().sum()
            grads = torch.autograd.grad(penalty, list(m.parameters()), allow_unused=True)
        got.append((gx.detach(), grads))
    tol(got[0][0], got[1][0], "input gradient")
    same_grads(got[0][1], got[1][1], "penalty gradients")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("scope", ["forward_and_backward", "backward_alone"])
def test_anomaly_mode_sees_a_nan_weight_gradient_as_in_plain_autograd(scope, fused):
    """With ``detect_anomaly`` on, the in-place paths wrote a NaN gradient into ``.grad`` and returned nothing
    for autograd to check: no error, where plain PyTorch names the node that returned NaN. Also where only the
    backward runs under it (the forward took the in-place paths)."""
    x = torch.randn(5, 64)
    x[0, 3] = float("nan")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    nest = sn.wrap(m, sn.Width("h", [32, 64, 128], out="0", inp="2"))
    whole = torch.autograd.detect_anomaly() if scope == "forward_and_backward" else contextlib.nullcontext()
    with mock.patch.object(views, "FUSED_LINEAR", fused), whole:
        with nest.use("h=64"):
            loss = m(x).sum()
        with pytest.raises(RuntimeError, match="returned nan values"), torch.autograd.detect_anomaly():
            loss.backward()


def test_forward_mode_ad_with_dual_parameters_matches_plain_autograd():
    """Leaf dual parameters that require grad (forward-over-reverse by hand) met the in-place slice, which has
    no jvp: a raw NotImplementedError naming no sortednet part."""
    import torch.autograd.forward_ad as fwad

    x = torch.randn(5, 64)
    tangents = []
    for inplace in (True, False):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
        nest = sn.wrap(m, sn.Width("h", [32, 64, 128], out="0", inp="2"), inplace_grad=inplace)
        g = torch.Generator().manual_seed(2)
        with fwad.dual_level():
            duals = {k: fwad.make_dual(v.detach().clone(), torch.randn(v.shape, generator=g)).requires_grad_()
                     for k, v in m.named_parameters()}
            with nest.use("h=64"):
                out = functional_call(m, duals, (x,))
            tangents.append(fwad.unpack_dual(out).tangent)
    tol(tangents[0], tangents[1], "jvp")


def test_a_create_graph_backward_keeps_an_infinite_weight_infinite():
    """Regression: reading the saved weight as ``saved + (live - live.detach())`` made inf - inf = NaN."""
    grads = []
    for inplace in (True, False):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
        with torch.no_grad():
            m[2].weight[0, 5] = float("inf")
        nest = sn.wrap(m, sn.Width("h", [32, 64, 128], out="0", inp="2"), inplace_grad=inplace)
        h = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        with nest.use("h=64"):
            out = m[2](h)
        grads.append(torch.autograd.grad(out.sum(), h, create_graph=True)[0])
    assert torch.isinf(grads[0][:, 5]).all() and not grads[0].isnan().any()
    torch.testing.assert_close(grads[0], grads[1])


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _entered_below_the_root(form: str):
    """(model, dims, sub, run(x) as the checkpointed forward, run(x) plain) for each way of entering a reentrant
    checkpoint without the root's ``__call__``."""
    from torch.utils.checkpoint import checkpoint, checkpoint_sequential

    torch.manual_seed(0)
    if form == "root_forward":
        m = _TwoLayer()
        return m, [sn.Width("h", [32, 64, 128], out="fc1", inp="fc2")], "h=32", \
            lambda x: checkpoint(m.forward, x, use_reentrant=True), m.forward
    if form == "lambda_over_layers":
        m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
        f = lambda z: m[2](m[1](m[0](z)))  # noqa: E731
        return m, [sn.Width("h", [32, 64, 128], out="0", inp="2")], "h=32", \
            lambda x: checkpoint(f, x, use_reentrant=True), f
    if form == "checkpoint_sequential":
        m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
        return m, [sn.Width("h", [32, 64, 128], out="0", inp="2")], "h=32", \
            lambda x: checkpoint_sequential(m, 1, x, use_reentrant=True), m
    stack = nn.Sequential(*(nn.Linear(64, 64) for _ in range(4)))
    m = nn.ModuleDict({"stack": stack})
    return m, [sn.Depth("d", [2, 4], layers="stack")], "d=2", \
        lambda x: checkpoint(stack, x, use_reentrant=True), stack


@pytest.mark.parametrize("where", ["outside_use", "other_thread"])
@pytest.mark.parametrize("form", ["root_forward", "lambda_over_layers", "checkpoint_sequential", "depth_in_a_dict"])
def test_a_reentrant_checkpoint_entered_below_the_root_recomputes_its_forward_submodel(form, where):
    """No root forward counted itself, so no read looked for the checkpoint: backward outside the use block
    recomputed the full model (87 rows of fc1's gradient beyond h=32, all four blocks at d=2), in silence.
    Reentrant checkpoints' forwards are counted now, and their recomputation pinned as inside the root."""
    grads = []
    for ckpt in (False, True):
        m, dims, sub, checkpointed, plain = _entered_below_the_root(form)
        nest = sn.wrap(m, *dims)
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with nest.use(sub):
            loss = (checkpointed if ckpt else plain)(x).square().sum()
        backward_at(where, loss, nest)
        grads.append([p.grad for p in m.parameters()] + [x.grad])
        assert nest._state.training == 0 and nest.active == nest.largest
    same_grads(grads[1], grads[0], f"{form}, backward {where}")
    assert sn.dims.REENTRANT == [0]


def test_reads_under_the_users_own_saved_tensor_hooks_walk_no_stack_outside_checkpoints():
    """Activation offloading without checkpoints (``save_on_cpu``): every sliced read walked its whole stack for
    a checkpoint to pin (+20-45% on a small Llama's step). Only while a non-reentrant checkpoint's forward runs
    is there one to find: the walks are then one per read under such hooks, none outside."""
    from sortednet import plan

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    nest = sn.wrap(m, sn.Width("h", [8, 32], out="0", inp="2"))
    x = torch.randn(4, 16)
    walks = []
    real = plan.pin_checkpoints
    with mock.patch.object(plan, "pin_checkpoints", lambda *a, **k: (walks.append(1), real(*a, **k))[1]):
        with nest.use("h=8"), torch.autograd.graph.save_on_cpu():
            m(x).sum().backward()
            assert not walks
            torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False).sum().backward()
    assert walks, "a read inside the checkpoint walked for it"


def test_a_reentrant_checkpoint_in_another_thread_costs_this_threads_inference_no_stack_walk():
    """Regression (the count of reentrant forwards is process-wide): while one thread sat inside a reentrant
    checkpoint's forward, every sliced read of another thread's inference walked its whole stack (1.5-3.5x
    slower forwards); only reads in a thread running such a forward look for it now."""
    import importlib

    from torch.utils.checkpoint import checkpoint

    wrap_module = importlib.import_module("sortednet.wrap")   # (sn.wrap is the function)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    nest = sn.wrap(m, sn.Width("h", [32, 64, 128], out="0", inp="2"))
    inside, release = threading.Event(), threading.Event()

    def parked(z):
        inside.set()
        release.wait(60)
        return z * 2

    t = threading.Thread(target=lambda: checkpoint(parked, torch.randn(3, requires_grad=True), use_reentrant=True))
    t.start()
    try:
        assert inside.wait(60) and sn.dims.REENTRANT[0] == 1
        walks = []
        real = wrap_module.pin_checkpoints
        with mock.patch.object(wrap_module, "pin_checkpoints", lambda *a, **k: walks.append(a) or real(*a, **k)):
            with torch.no_grad(), nest.use("h=32"):
                y = m(torch.randn(2, 64))
        assert len(walks) == 1 and y.shape == (2, 32)   # the root forward's one look (as ever), none per read
    finally:
        release.set()
        t.join(60)
    assert sn.dims.REENTRANT[0] == 0 and not sn.dims.REENTRANT_THREADS


class _FusedQKV(nn.Module):
    def __init__(self, E: int = 16, H: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = H, E // H
        self.qkv, self.o = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        return self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.a(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("kind", ["fused_qkv", "mha"])
def test_functional_call_with_tensors_of_another_size_is_refused_not_misread(kind):
    """functional_call with a sub-model's own (exported) tensors: fused q/k/v blocks were cut at the full tensor's
    offsets, so a larger sub-model's tensors under a smaller one ran and returned another model's output (a
    difference of 0.4), and its own failed with a raw IndexError. Refused, naming the tensor; full-size tensors
    still give the live sub-model's output."""
    torch.manual_seed(0)
    m = _FusedQKV() if kind == "fused_qkv" else _MHA()
    nest = sn.wrap(m, sn.Heads("h", [1, 2, 4], attn="" if kind == "fused_qkv" else "a"))
    x = torch.randn(2, 3, 16)
    name = "qkv.weight" if kind == "fused_qkv" else "a.in_proj_weight"
    for sub, given_by in (("h=1", "h=2"), ("h=2", "h=2")):
        params = dict(nest.export(given_by).named_parameters())
        with torch.no_grad(), nest.use(sub), pytest.raises(sn.SortedNetError, match=rf"{name}: a tensor of shape "
                                                                                      r".* fused blocks spanning 48"):
            functional_call(m, params, (x,))
    full = {k: v.detach().clone() for k, v in m.named_parameters()}
    with torch.no_grad(), nest.use("h=2"):
        torch.testing.assert_close(functional_call(m, full, (x,)), m(x))


def test_functional_call_with_a_tensor_shorter_than_the_cut_names_it():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    nest = sn.wrap(m, sn.Width("h", [4, 8, 16], out="0", inp="2"))
    small = dict(nest.export("h=4").named_parameters())
    with torch.no_grad(), nest.use("h=8"), pytest.raises(sn.SortedNetError, match=r"0.weight: a tensor of shape "
                                                                                  r"\(4, 8\), 4 along axis 0, where"):
        functional_call(m, small, (torch.randn(2, 8),))


def test_a_jagged_nested_batch_trains_with_the_in_place_gradient_path():
    """A ragged batch as a jagged nested tensor through a sliced nn.Linear failed in backward with the default
    inplace_grad=True (the fused GEMM path reshaped its gradient to 2-d: a raw RuntimeError); plain autograd
    trains it. Its gradients now equal the sum of per-sequence gradients."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))  # (>= 4096 elements: the fused path)
    nest = sn.wrap(m, sn.Width("h", [32, 128], out="0", inp="2"))
    seqs = [torch.randn(3, 64), torch.randn(5, 64)]
    nt = torch.nested.nested_tensor(seqs, layout=torch.jagged)
    with nest.use("h=32"):
        sum(t.square().sum() for t in m(nt).unbind()).backward()
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    with nest.use("h=32"):
        for s in seqs:
            m(s).square().sum().backward()
    for a, b in zip(got, m.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-5, atol=1e-5)


class _ComposableTrunk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) for _ in range(4))

    def forward(self, x):
        x = torch.tanh(self.blocks[-1](x))
        for b in self.blocks:
            x = x + b(x)
        return x


class _ComposableBlocks(torch.nn.Module):
    """Residual blocks (a width inside each) under a depth, with a head reading the layer list by position
    (``blocks[-1]``: another block of the same shape under another depth); the composable activation checkpoint
    (``torch.distributed._composable.checkpoint``, the one FSDP2 pairs with) is applied to each block, to the
    trunk or to the root: its forward pre-hook holds the non-reentrant generator in the module's state, not in a
    frame of ``torch.utils.checkpoint.checkpoint``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = _ComposableTrunk()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.trunk(x))


@pytest.mark.parametrize("on", ["blocks", "trunk", "root"])
@pytest.mark.parametrize("where", ["outside_use", "other_thread", "other_submodel"])
def test_a_composable_checkpoint_recomputes_the_forward_submodel(on, where):
    """``torch.distributed._composable.checkpoint(module)`` recomputed under the sub-model in force during
    backward: another depth silently (0.14 off the oracle's first block), another width with PyTorch's raw
    CheckpointError. Its checkpoints are now pinned to their forward's sub-model as ``checkpoint``'s are."""
    from torch.distributed._composable import checkpoint as composable

    sub = "depth=2,h=4"
    def dims():
        return (sn.Depth("depth", [2, 4], layers="trunk.blocks"),
                sn.Width("h", [4, 16], out="trunk.blocks.*.0", inp="trunk.blocks.*.2"))

    plain = _ComposableBlocks()
    nest = sn.wrap(plain, *dims())
    x = torch.randn(5, 8)
    with nest.use(sub):
        loss_of(plain(x)).backward()
    want = [p.grad for p in plain.parameters()]
    m = _ComposableBlocks()
    for part in {"blocks": list(m.trunk.blocks), "trunk": [m.trunk], "root": [m]}[on]:
        composable(part)
    nest = sn.wrap(m, *dims())
    with nest.use(sub):
        loss = loss_of(m(x))
    backward_at(where, loss, nest, sub)
    same_grads([p.grad for p in m.parameters()], want, f"composable checkpoint on {on} ({where})")
    assert sn.dims.NONREENTRANT[0] == 0 and not nest._state.uses.get()


class _CheckpointedStack(nn.Module):
    def __init__(self, reentrant=None):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)) for _ in range(4))
        self.reentrant = reentrant

    def run(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x

    def forward(self, x):
        if self.reentrant is None:
            return self.run(x)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.run, x, use_reentrant=self.reentrant)


_DEPTH_OR_WIDTH = {"depth=2": lambda: sn.Depth("depth", [1, 2, 4], layers="blocks"),
                   "f=8": lambda: sn.Width("f", [8, 32], out="blocks.*.0", inp="blocks.*.2")}


@pytest.mark.parametrize("sub", list(_DEPTH_OR_WIDTH))
@pytest.mark.parametrize("how", [True, False, "nest.checkpoint"])
def test_unwrap_before_the_backward_of_a_checkpointed_sub_model_is_refused(how, sub):
    """A checkpointed forward under a sub-model, then unwrap, then backward: the recomputation ran the unwrapped
    full model (reentrant: gradients 8-11 off, in silence; non-reentrant, Width: PyTorch's CheckpointError).
    unwrap refuses while such a recomputation is to come; after the backward (the loss still held) it unwraps.
    A checkpoint of the full model recomputes it alike either way and does not hold unwrap back."""
    x0 = torch.randn(3, 8)

    def grads(model, nest, run):
        x = x0.clone().requires_grad_()
        with nest.use(sub):
            loss = run(model, x).pow(2).sum()
        return loss, x

    ref_model = _CheckpointedStack()
    ref_nest = sn.wrap(ref_model, _DEPTH_OR_WIDTH[sub]())
    loss, x = grads(ref_model, ref_nest, lambda m, x: m(x))
    loss.backward()
    want = [x.grad, *[p.grad for p in ref_model.parameters()]]
    model = _CheckpointedStack(None if how == "nest.checkpoint" else how)
    nest = sn.wrap(model, _DEPTH_OR_WIDTH[sub]())
    run = (lambda m, x: nest.checkpoint(m, x, use_reentrant=True)) if how == "nest.checkpoint" else (
        lambda m, x: m(x))
    loss, x = grads(model, nest, run)
    with pytest.raises(sn.SortedNetError, match=r"unwrap\(\): an activation checkpoint ran its forward under "
                                                r"a sub-model .*and has not run its backward yet"):
        nest.unwrap()
    sliced, plain = (model.blocks, nn.ModuleList) if sub == "depth=2" else (model.blocks[0][0], nn.Linear)
    assert type(sliced) is not plain  # (still wrapped)
    loss.backward()
    for a, b in zip([x.grad, *[p.grad for p in model.parameters()]], want):
        torch.testing.assert_close(a, b)
    nest.unwrap()
    assert type(sliced) is plain
    nest = sn.wrap(model, _DEPTH_OR_WIDTH[sub]())
    loss = run(model, x0.clone().requires_grad_()).sum()  # (the full model, outside use)
    nest.unwrap()
    loss.backward()


def test_unwrap_inside_a_forward_of_the_model_is_refused():
    """unwrap from a hook during a forward under a sub-model: the first block ran the sub-model and the others
    the full model, an output of neither model, in silence."""
    model = _CheckpointedStack()
    nest = sn.wrap(model, _DEPTH_OR_WIDTH["f=8"]())
    h = model.blocks[0].register_forward_hook(lambda m, i, o: nest.unwrap())
    with nest.use("f=8"), pytest.raises(sn.SortedNetError, match=r"unwrap\(\) inside a forward of the model"):
        model(torch.randn(2, 8))
    h.remove()
    assert type(model.blocks[0][0]) is not nn.Linear
    nest.unwrap()


def test_unwrap_copy_before_the_backward_of_its_checkpointed_sub_model_is_refused():
    """A deep copy (a teacher) ran a checkpointed forward under a sub-model; unwrap_copy(teacher) before its
    backward made the recomputation run the plain full model: the teacher's gradients were another network's."""
    model = _CheckpointedStack(True)
    nest = sn.wrap(model, _DEPTH_OR_WIDTH["f=8"]())
    teacher, ref = copy.deepcopy(model), copy.deepcopy(model)
    ref.reentrant = None
    x = torch.randn(3, 8, requires_grad=True)  # (a reentrant checkpoint needs an input that requires grad)
    with nest.use("f=8"):
        loss = teacher(x).pow(2).sum()
        ref(x).pow(2).sum().backward()
    with pytest.raises(sn.SortedNetError, match=r"unwrap_copy\(\): an activation checkpoint"):
        nest.unwrap_copy(teacher)
    loss.backward()
    nest.unwrap_copy(teacher)
    assert type(teacher.blocks[0][0]) is nn.Linear
    for a, b in zip(teacher.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_unwrap_with_a_rank_before_the_backward_of_a_checkpointed_full_model_is_refused():
    """With a Rank dimension the unwrapped model is not the full sub-model (LoRA adapters dropped): a checkpoint
    of the full model, unwrapped before its backward, recomputed without the adapters (no gradient reached them,
    the input's was another network's), in silence."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    nest = sn.wrap(model, sn.Rank("r", [2, 8], targets=["0", "1"], mode="lora"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p)
    from torch.utils.checkpoint import checkpoint

    loss = checkpoint(model, torch.randn(3, 8, requires_grad=True), use_reentrant=True).pow(2).sum()
    with pytest.raises(sn.SortedNetError, match=r"unwrap\(\): an activation checkpoint"):
        nest.unwrap()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora" in n)
    nest.unwrap()


class _CkBlock(nn.Module):
    def __init__(self, conv: bool):
        super().__init__()
        if conv:
            self.fc1, self.fc2 = nn.Conv1d(64, 256, 3, padding=1), nn.Conv1d(256, 64, 3, padding=1)
        else:
            self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class _CkNet(nn.Module):
    def __init__(self, conv: bool):
        super().__init__()
        self.conv = conv
        self.inp, self.blk, self.out = nn.Linear(32, 64), _CkBlock(conv), nn.Linear(64, 3)
        self.ck = None

    def forward(self, x):
        h = self.inp(x)
        h = h.unsqueeze(-1).expand(-1, -1, 5).contiguous() if self.conv else h
        h = self.ck(self.blk, h) if self.ck is not None else self.blk(h)
        return self.out(h.mean(-1) if self.conv else h)


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("how", ["compiled_nest_checkpoint", "anomaly_around_backward"])
@pytest.mark.parametrize("size", [64, 128])
def test_a_checkpointed_block_recomputed_on_another_path_gives_the_same_gradients(layer, how, size, fresh_dynamo):
    """A non-reentrant checkpoint pairs what its recomputation saves with what the forward saved by position,
    checking shapes only. The fused linear / convolution weight paths step aside under conditions that can differ
    between the two (a nest.compile() forward on plain views, recomputed eagerly on the parameters; anomaly mode
    around the backward alone): other tensors were paired, gradients up to 35% off in silence where the shapes
    agreed (width 64 = the model width), a raw CheckpointError where not. Under saved-tensor hooks both take the
    plain path now: the gradients equal the unchecked model's."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    net = _CkNet(layer == "conv")
    nest = sn.wrap(net, sn.Width("f", [64, 128, 256], out="blk.fc1", inp="blk.fc2"))
    x = torch.randn(4, 32)

    def grads(run, ck):
        net.ck = ck
        net.zero_grad(set_to_none=True)
        with nest.use(f"f={size}"):
            loss = run(x).pow(2).mean()
            with torch.autograd.detect_anomaly() if how == "anomaly_around_backward" else contextlib.nullcontext():
                loss.backward()
        net.ck = None
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    want = grads(net, None)
    if how == "compiled_nest_checkpoint":
        got = grads(nest.compile(backend="eager"), nest.checkpoint)
    else:
        got = grads(net, lambda f, h: checkpoint(f, h, use_reentrant=False))
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


class _ScaledLinear(nn.Module):  # (a class of its own: the slicer registry is keyed by class)
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.scale = nn.Parameter(torch.ones(n_out))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * self.scale


class _IndexingSlicer(sn.Slicer):
    """A slicer of one's own cutting with ``p[:k]``, as docs/custom_slicers.md allows."""

    roles = ("out", "inp")
    attrs = ("weight", "scale")

    def full(self, m, role):
        return m._parameters["weight"].shape[0 if role == "out" else 1]

    def value(self, m, name):
        o, i = self.features(m, "out", m._parameters["weight"].shape[0]), self.features(m, "inp", 8)
        return m._parameters["weight"][:o, :i] if name == "weight" else m._parameters["scale"][:o]


def test_a_custom_slicers_whole_view_is_served_as_the_parameter(fresh_dynamo):
    """``value()`` cutting with ``p[:k]`` served a non-leaf view at the full size too (outside ``use``): clipping over
    ``layer.weight`` skipped the layer in silence (its gradient norm stayed 363 while the others were clipped to
    1), ``.grad`` through the attribute was None and ``requires_grad_`` raised. The whole view is the parameter
    now; a smaller sub-model still gets a view."""
    sn.slicer(_ScaledLinear)(_IndexingSlicer)  # (a class of this module's own: registering it touches no other)
    torch.manual_seed(0)
    model = nn.Sequential(_ScaledLinear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    nest = sn.wrap(model, sn.Width("h", [8, 32], out="0", inp="2"))
    layer = model[0]
    assert layer.weight is layer._parameters["weight"] and layer.scale is layer._parameters["scale"]
    (model(torch.randn(4, 8)) * 100).sum().backward()
    assert layer.weight.grad is not None
    torch.nn.utils.clip_grad_norm_([layer.weight, layer.scale, model[2].weight, model[2].bias], 1.0)
    total = torch.stack([p.grad.norm() for p in (layer.weight, layer.scale, model[2].weight, model[2].bias)])
    assert total.norm() <= 1.0 + 1e-4
    layer.weight.requires_grad_(False)
    layer.weight.requires_grad_(True)
    with nest.use("h=8"):
        assert layer.weight.shape == (8, 8) and layer.weight._base is layer._parameters["weight"]
    x = torch.randn(4, 8)
    for compiled in (torch.compile(model, backend="eager", fullgraph=True),   # (storage_offset is not traced:
                     nest.compile(backend="eager", fullgraph=True)):           # compiled reads keep the view)
        for sub in ("h=8", "h=32"):
            with nest.use(sub), torch.no_grad():
                torch.testing.assert_close(compiled(x), model(x))

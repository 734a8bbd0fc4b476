"""Tiny model families for invariant tests. Each builder returns a
``Case(model, dims, example)`` built fresh (dimensions belong to one nest)."""

from __future__ import annotations

import dis
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import sortednet as sn


@dataclass
class Case:
    model: nn.Module
    dims: list
    example: torch.Tensor


class MLP(nn.Module):
    def __init__(self, d_in=12, h1=16, h2=12, d_out=5):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, h1), nn.Linear(h1, h2), nn.Linear(h2, d_out)
        self.ln = nn.LayerNorm(h2)

    def forward(self, x):
        return self.fc3(self.ln(F.relu(self.fc2(F.relu(self.fc1(x))))))


def mlp(seed=0, h1=16, h2=12) -> Case:
    torch.manual_seed(seed)
    m = MLP(h1=h1, h2=h2)
    dims = [sn.Width("h1", sorted({max(1, h1 // 4), h1 // 2, h1}), out="fc1", inp="fc2"),
            sn.Width("h2", sorted({max(1, h2 // 3), h2}), out="fc2", inp="fc3", norm="ln")]
    return Case(m, dims, torch.randn(6, 12))


class ResCNN(nn.Module):
    def __init__(self, c=8, n_cls=4):
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.gn = nn.GroupNorm(c // 2, c)
        self.head = nn.Linear(c, n_cls)

    def forward(self, x):
        x = F.relu(self.bn1(self.stem(x)))
        x = x + F.relu(self.bn2(self.conv(x)))          # residual: coupled by one dimension
        x = F.relu(self.gn(self.dw(x)))
        return self.head(x.mean((2, 3)))


def cnn(seed=0, c=8) -> Case:
    torch.manual_seed(seed)
    m = ResCNN(c)
    with torch.no_grad():  # non-trivial running statistics
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    m.eval()
    dims = [sn.Width("ch", [c // 4, c // 2, c], out=["stem", "conv", "dw"], inp=["conv", "dw", "head"],
                     norm=["bn1", "bn2", "gn"])]
    return Case(m, dims, torch.randn(3, 1, 6, 6))


class Attention(nn.Module):
    """Hand-written attention with separate q/k/v/o and optional grouped k/v."""

    def __init__(self, d=16, heads=4, kv_heads=None):
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        kv = (kv_heads or heads) * self.head_dim
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, d=16, heads=4, ffn=32, kv_heads=None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, kv_heads)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def block(seed=0, heads=4, ffn=32) -> Case:
    torch.manual_seed(seed)
    m = Block(16, heads, ffn)
    dims = [sn.Heads("heads", sorted({1, heads // 2, heads}), attn="attn"),
            sn.Width("ffn", [ffn // 4, ffn // 2, ffn], out="fc1", inp="fc2")]
    return Case(m, dims, torch.randn(2, 5, 16))


class Encoder(nn.Module):
    def __init__(self, d_in=6, d=16, heads=4, ffn=24, layers=3):
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.enc(self.proj(x)))


def encoder(seed=0, layers=3, ffn=24) -> Case:
    torch.manual_seed(seed)
    m = Encoder(ffn=ffn, layers=layers).eval()
    dims = [sn.Width("ffn", [ffn // 4, ffn // 2, ffn], out="enc.layers.*.linear1", inp="enc.layers.*.linear2"),
            sn.Heads("heads", [2, 4], attn="enc.layers.*.self_attn"),
            sn.Width("hidden", [8, 16], out=["proj", "enc.layers.*.self_attn.out_proj", "enc.layers.*.linear2"],
                     inp=["enc.layers.*.self_attn", "enc.layers.*.linear1", "head"],
                     norm=["enc.layers.*.norm1", "enc.layers.*.norm2"]),
            sn.Depth("depth", sorted({1, layers}), layers="enc.layers")]
    return Case(m, dims, torch.randn(2, 5, 6))


class TinyLM(nn.Module):
    """Width (hidden, ffn) + Heads (grouped-query) + Depth in one model."""

    def __init__(self, vocab=20, d=16, heads=4, kv_heads=2, ffn=32, layers=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn, kv_heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def lm(seed=0, layers=3, ffn=32) -> Case:
    torch.manual_seed(seed)
    m = TinyLM(ffn=ffn, layers=layers)
    dims = [sn.Width("hidden", [8, 16], out=["emb", "blocks.*.attn.o", "blocks.*.fc2"],
                     inp=["blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.fc1", "head"],
                     norm=["blocks.*.ln1", "blocks.*.ln2", "norm"]),
            sn.Width("ffn", [ffn // 4, ffn // 2, ffn], out="blocks.*.fc1", inp="blocks.*.fc2"),
            sn.Heads("heads", [2, 4], attn="blocks.*.attn"),
            sn.Depth("depth", list(range(1, layers + 1)), layers="blocks")]
    return Case(m, dims, torch.randint(0, 20, (2, 7)))


class TiedLM(nn.Module):
    """Input embedding and output layer share ONE weight (``head.weight is emb.weight``), as GPT-2 does."""

    def __init__(self, vocab=20, d=16, ffn=32, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, 4, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def tied_lm(seed=0, vocab=20, layers=2, ffn=32) -> Case:
    torch.manual_seed(seed)
    m = TiedLM(vocab, 16, ffn, layers)
    dims = [sn.Width("hidden", [8, 16], out=["emb", "blocks.*.attn.o", "blocks.*.fc2"],
                     inp=["blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.fc1", "head"],
                     norm=["blocks.*.ln1", "blocks.*.ln2", "norm"]),
            sn.Width("ffn", [ffn // 2, ffn], out="blocks.*.fc1", inp="blocks.*.fc2"),
            sn.Depth("depth", sorted({1, layers}), layers="blocks")]
    return Case(m, dims, torch.randint(0, vocab, (2, 7)))


def sequential(seed=0, depth=4) -> Case:
    torch.manual_seed(seed)
    layers = [nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.GELU()) for _ in range(depth)]
    m = nn.Sequential(nn.Conv1d(3, 8, 1), nn.Sequential(*layers), nn.Conv1d(8, 4, 1), nn.Flatten(),
                      nn.Linear(4 * 10, 4))
    dims = [sn.Depth("depth", sorted({1, depth // 2, depth}), layers="1"),
            sn.Width("ch", [2, 8], out=["0", "1.*.0"], inp=["1.*.0", "2"])]
    return Case(m, dims, torch.randn(2, 3, 10))


#: where the families' models and examples live: ``SORTEDNET_TEST_DEVICE=cuda`` runs the tests that build them on
#: a GPU (built on the CPU with the same seeds, then moved with ``Module.to`` before any test wraps them, as a
#: user moves a model; the default device stays the CPU, so a tensor the library makes without a device shows)
DEVICE = torch.device(os.environ.get("SORTEDNET_TEST_DEVICE", "cpu"))


def _placed(build: Callable[..., Case]) -> Callable[..., Case]:
    if DEVICE.type == "cpu":
        return build

    def placed(*args, **kw) -> Case:
        case = build(*args, **kw)
        return Case(case.model.to(DEVICE), case.dims, case.example.to(DEVICE))
    placed.__name__ = build.__name__
    return placed


FAMILIES: dict[str, Callable[..., Case]] = {name: _placed(build) for name, build in {
    "mlp": mlp, "cnn_bn_residual": cnn, "attn_block": block, "torch_encoder": encoder,
    "lm_width_heads_depth": lm, "sequential": sequential, "tied_lm": tied_lm,
}.items()}


# -- size choices for hypothesis (every combination builds a valid nest) -----
SIZES: dict[str, dict[str, list[int]]] = {
    "mlp": {"h1": [4, 8, 16, 20], "h2": [6, 9, 12]},  # h2 // 3 >= 2: LayerNorm over 1 feature is constant
    "cnn_bn_residual": {"c": [8, 16, 24]},          # GroupNorm: 2 channels per group
    "attn_block": {"heads": [2, 4, 8], "ffn": [8, 16, 32]},
    "torch_encoder": {"layers": [1, 2, 3], "ffn": [8, 24]},
    "lm_width_heads_depth": {"layers": [1, 2, 3], "ffn": [4, 32]},
    "sequential": {"depth": [2, 3, 4]},
    "tied_lm": {"vocab": [20, 300], "layers": [1, 2], "ffn": [8, 32]},  # 300 x 16: the in-place gradient path
}


def case_params(family: str):
    """Hypothesis strategy of builder keyword arguments (seed + sizes) for ``family``."""
    from hypothesis import strategies as st

    return st.fixed_dictionaries({"seed": st.integers(0, 2**16),
                                  **{k: st.sampled_from(v) for k, v in SIZES[family].items()}})


# -- helpers shared by the invariant tests ---------------------------------
def same_kernels(ref: nn.Module) -> nn.Module:
    """``ref`` (an unwrapped copy) with PyTorch's fused Transformer fast path off, as wrap turns it off for the
    layers it slices: a bit-exact comparison needs the same kernels (the fused and the plain path agree only to
    rounding, and on a GPU not even that closely). A no-op forward pre-hook is what makes the fast path step
    aside."""
    for m in ref.modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            m.register_forward_pre_hook(lambda module, args: None)
    return ref


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward without autograd."""
    with torch.no_grad():
        return model(x)


def snapshot(model: nn.Module) -> dict:
    """Classes, parameter objects and bit-exact copies of every tensor of ``model``."""
    return {"classes": [(n, type(m)) for n, m in model.named_modules()],
            "params": [(n, p) for n, p in model.named_parameters()],
            "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            "dicts": _dicts(model)}


def _dicts(model: nn.Module) -> list:
    return [(n, sorted(m.__dict__), len(m._forward_pre_hooks), len(m._forward_hooks))
            for n, m in model.named_modules()]


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    """``model`` has the same classes, the same Parameter objects and bit-identical tensors."""
    assert [(n, type(m)) for n, m in model.named_modules()] == snap["classes"]
    now = list(model.named_parameters())
    assert [n for n, _ in now] == [n for n, _ in snap["params"]]
    assert all(p is q for (_, p), (_, q) in zip(now, snap["params"]))
    state = model.state_dict(keep_vars=True)
    assert list(state) == list(snap["state"])
    for k, v in snap["state"].items():
        assert state[k].shape == v.shape and torch.equal(state[k].detach(), v), k
    assert _dicts(model) == snap["dicts"]


def chunks_of(name: str) -> int:
    """Packed q/k/v tensors are sliced in 3 chunks along dim 0."""
    return 3 if name.rpartition(".")[2] in ("in_proj_weight", "in_proj_bias") else 1


def leading(t: torch.Tensor, shape: torch.Size, chunks: int = 1) -> torch.Tensor:
    """The first ``shape`` entries of ``t`` along every axis (per chunk along axis 0)."""
    if chunks == 1:
        return t[tuple(slice(0, s) for s in shape)]
    per, n = t.shape[0] // chunks, shape[0] // chunks
    rest = tuple(slice(0, s) for s in shape[1:])
    return torch.cat([t[(slice(c * per, c * per + n), *rest)] for c in range(chunks)])


def place(small: torch.Tensor, full_shape: torch.Size, chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``small`` written at the leading corner of a zero tensor of ``full_shape``; also the mask."""
    big = torch.zeros(full_shape, dtype=small.dtype, device=small.device)
    mask = torch.zeros(full_shape, dtype=torch.bool, device=small.device)
    per, n = full_shape[0] // chunks, small.shape[0] // chunks
    for c in range(chunks):
        idx = (slice(c * per, c * per + n), *(slice(0, s) for s in small.shape[1:]))
        big[idx] = small[c * n:(c + 1) * n]
        mask[idx] = True
    return big, mask


class InterruptAt(TorchFunctionMode):
    """Raises KeyboardInterrupt (a Ctrl-C) at the n-th torch function call (only calls whose name contains
    ``only``, if given). Grad mode is set back on exit: an interrupt inside torch.no_grad's own ``__exit__``
    would leave it off for the tests after."""

    def __init__(self, n: int, only: str | None = None, exc: type[BaseException] = KeyboardInterrupt) -> None:
        super().__init__()
        self.n, self.only, self.exc, self.calls, self.fired = n, only, exc, 0, False

    def __enter__(self):
        self.grad = torch.is_grad_enabled()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        torch.set_grad_enabled(self.grad)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.only is None or self.only in getattr(func, "__name__", str(func)):
            self.calls += 1
            if self.calls == self.n:
                self.fired = True
                raise self.exc("injected")
        return func(*args, **(kwargs or {}))


def interrupted(n: int, call: Callable[[], object], only: str | None = None,
                exc: type[BaseException] = KeyboardInterrupt) -> bool:
    """Run ``call`` with a Ctrl-C (or ``exc``) at its n-th torch function call (see :class:`InterruptAt`): whether
    it was interrupted (False: the call has fewer than n such calls and completed). An ``exc`` that the call turns
    into a ``SortedNetError`` counts as interrupted too."""
    with InterruptAt(n, only, exc) as mode:
        try:
            call()
        except (exc, sn.SortedNetError):
            if not mode.fired:
                raise
            return True
    assert not mode.fired
    return False


def interrupted_between_bytecodes(n: int, call: Callable[[], object], *functions: Callable,
                                  starts: bool = True) -> bool:
    """Run ``call`` with a KeyboardInterrupt raised at the n-th point inside ``functions`` (their own frames, not
    what they call) where CPython handles a pending signal, as a real Ctrl-C does: a function's first
    instruction (unless ``starts`` is False), the instruction after each call returns, a backward jump. Whether
    it was interrupted (False: fewer than n such points were reached)."""
    points = {}
    for f in functions:
        code = getattr(f, "__func__", f).__code__
        ins = list(dis.get_instructions(code))
        points[code] = {b.offset for a, b in zip(ins, ins[1:]) if a.opname.startswith("CALL")} \
            | {i.offset for i in ins if i.opname.startswith("JUMP_BACKWARD")}
    seen, fired = 0, False

    def point() -> None:
        nonlocal seen, fired
        seen += 1
        if seen == n:
            fired = True
            raise KeyboardInterrupt("injected")  # (a raising trace function is unset: one interrupt)

    def step(frame, event, arg):
        if event == "opcode" and frame.f_lasti in points[frame.f_code]:
            point()
        return step

    def enter(frame, event, arg):  # the call event: the function's first instruction
        if frame.f_code in points:
            if starts:
                point()
            frame.f_trace_opcodes = True
            return step
        return None

    old = sys.gettrace()
    sys.settrace(enter)
    try:
        call()
    except KeyboardInterrupt:
        if not fired:
            raise
        return True
    finally:
        sys.settrace(old)
    return False


class WorkBudgetExceeded(BaseException):
    """Raised inside ``call_budget`` (a BaseException: no ``except Exception`` in the code under test turns it into
    a refusal that a test would accept)."""


class call_budget:  # noqa: N801 (used as a context manager, like contextlib's)
    """Count the Python and C function calls made in the block (``sys.setprofile``) and fail once there are more
    than ``limit``: a bound on work that holds on any machine under any load, where a wall-clock bound would not
    (and a runaway loop fails at the bound instead of running on). ``calls`` holds the count afterwards."""

    def __init__(self, limit: int):
        self.limit, self.calls, self._old = limit, 0, None

    def _count(self, frame, event, arg) -> None:
        if event in ("call", "c_call"):
            self.calls += 1
            if self.calls > self.limit:
                sys.setprofile(self._old)
                raise WorkBudgetExceeded(f"more than {self.limit:,} function calls")

    def __enter__(self) -> call_budget:
        self._old = sys.getprofile()
        sys.setprofile(self._count)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(self._old)

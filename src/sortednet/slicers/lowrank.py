"""nn.Linear as a nested low-rank layer, for :class:`sortednet.Rank`.

Two slicers, chosen by the Rank binding (``Binding.slicer``) instead of the
registry, so plain ``nn.Linear`` keeps :class:`LinearSlicer`:

- ``svd``: ``weight`` is replaced by factors ``U`` (out x R) and ``V`` (R x in)
  from its truncated SVD, singular values split as ``sqrt`` between them, so
  every prefix rank r is the best rank-r approximation at the start. Forward
  is ``x @ V[:r].T @ U[:, :r].T + bias``.
- ``lora``: ``weight`` and ``bias`` are frozen; adapters ``lora_A`` (R x in,
  Kaiming-uniform) and ``lora_B`` (out x R, zeros) are added. Forward is
  ``x W0.T + b + (alpha / r) * x A[:r].T B[:, :r].T``.

Width/Heads slicing of the output takes the first rows of ``U`` (or of
``W0``, ``bias``, ``lora_B``), of the input the first columns of ``V`` (or
``W0``, ``lora_A``). ``.weight`` reads the effective weight of the active
sub-model (so parents that read it, like ``nn.MultiheadAttention``, see the
factorised layer); forward computes the same thing in factorised form.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import threading
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from ..errors import PatternError, SizeError
from ..views import rank_weight
from .base import Slicer


class _Counting(threading.local):
    #: while ``count_flops`` counts on this thread: a context manager that pauses its count. A rank
    #: target then runs as its export computes (one merged Linear, unless exported factored), the
    #: merged weight built uncounted, so ``cost(sub, "flops")`` budgets the deployed model as params do
    pause: AbstractContextManager | None = None


COUNTING = _Counting()


def _uncounted() -> AbstractContextManager:
    """While ``count_flops`` counts: its pause (a weight the export holds merged is built uncounted)."""
    return COUNTING.pause if COUNTING.pause is not None else contextlib.nullcontext()


def _note_matrix_read(m: nn.Module) -> None:
    """Record that a forward of the nest's model read svd target ``m``'s ``weight`` as a matrix (a factored
    export, two Linears, could not serve that read: ``export`` refuses it). Reads outside a forward (the
    user's own code) or inside the layer's own call (a hook of its) are not recorded."""
    st = m.__dict__["_sn"]
    if st.extra.get("matrix_read"):
        return
    pin = getattr(st.active.on_no_grad_read, "__self__", None)
    if pin is None or not pin.in_forward():
        return
    f, call = sys._getframe(2), nn.Module._call_impl.__code__
    while f is not None:  # inside the layer's own call (its hooks): the export's Linears run that call instead
        if f.f_code is call and f.f_locals.get("self") is m:
            return
        f = f.f_back
    st.extra["matrix_read"] = True
    nest = getattr(st.bind["rank"].dim, "_nest", None)
    if nest is not None:  # pick's table passes over the sub-models whose export this read now refuses
        with nest._cost_lock:
            nest._selector, nest._read_marks = None, nest._read_marks + 1


__all__ = ["LowRankSlicer", "SVDSlicer", "LoRASlicer", "SVD", "LORA"]

_MADE = ("U", "V", "lora_A", "lora_B")  # (the tensors a Rank target holds in place of, or beside, its weight)


def _merge_rank(full: int, merge: bool | int) -> int:
    """The rank ``unwrap(merge=...)`` bakes in: ``True`` the whole factor, an int the nest's largest rank."""
    return full if merge is True else min(int(merge), full)


class LowRankSlicer(Slicer):
    """Shared part of the two rank slicers: roles, checks, active sizes, forward hook."""

    types = (nn.Linear,)
    roles = ("rank", "out", "inp")
    overrides_forward = True
    factors: tuple[str, str] = ("", "")

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["out_features" if role == "out" else "in_features"]

    def validate(self, m: nn.Module, bind: dict, path: str) -> None:
        super().validate(m, {r: b for r, b in bind.items() if r != "rank"}, path)
        dim = bind["rank"].dim
        at = repr(path) if path else "the model's root"
        where = f"Rank {dim.name!r} (sizes {list(dim.sizes)}) at {at}"
        if type(m).forward is not nn.Linear.forward:
            raise PatternError(f"{where}: {type(m).__name__} has its own forward; only nn.Linear "
                               "(and subclasses keeping its forward) can be factorised")
        o, i = m.__dict__["out_features"], m.__dict__["in_features"]
        if dim.full > min(o, i):
            raise SizeError(f"{where}: largest rank {dim.full} exceeds min(out, in) = {min(o, i)} "
                            f"of Linear({i} -> {o})")
        if isinstance(self, SVDSlicer) and dim.export == "factored" and m._modules:
            raise PatternError(f"{where}: {type(m).__name__} holds the modules {list(m._modules)[:4]}, which a "
                               "factored export (two Linears in an nn.Sequential, which runs every child it holds) "
                               "cannot carry; declare sn.Rank(..., export='merged') or 'auto' for it (the layer's "
                               "own class, holding U_r V_r)")
        taken = [n for n in self.factors if n in m._parameters or n in m._buffers or n in m._modules
                 or n in m.__dict__]
        if taken:
            raise PatternError(f"{where}: the module already has attribute(s) {taken}")
        pruned = [n for n in ("weight", "bias") if f"{n}_orig" in m._parameters and f"{n}_mask" in m._buffers]
        if pruned:  # (its forward computes them from <name>_orig and <name>_mask: the factors would not see it)
            raise PatternError(f"{where}: the layer is pruned (torch.nn.utils.prune: {pruned} computed in every "
                               f"forward from {[n + '_orig' for n in pruned]} and {[n + '_mask' for n in pruned]}): "
                               f"make the pruning permanent first (torch.nn.utils.prune.remove(module, "
                               f"{pruned[0]!r})) or leave the layer out of the Rank targets")
        w = m._parameters.get("weight")
        if w is None and any(n.startswith("weight_") for n in m._parameters):  # legacy weight_norm / spectral_norm
            raise PatternError(f"{where}: its weight is computed in every forward from "
                               f"{sorted(n for n in m._parameters if n.startswith('weight_'))} (a weight_norm / "
                               "spectral_norm hook): remove that hook or leave the layer out of the Rank targets")
        if not isinstance(w, nn.Parameter) or not w.is_floating_point():
            raise PatternError(f"{where}: weight must be a floating-point nn.Parameter, got {type(w).__name__}"
                               + (f" of {w.dtype}" if isinstance(w, torch.Tensor) else ""))
        if w.is_meta:
            raise PatternError(f"{where}: the weight is on the meta device, which has no values: "
                               + ("the ordered factors are an SVD of its values" if isinstance(self, SVDSlicer) else
                                  "the adapters would be left uninitialised by to_empty()")
                               + "; materialise the model first (model.to_empty(device=...), load its weights), "
                               "then wrap")
        if not bool(torch.isfinite(w.detach()).all()):
            raise SizeError(f"{where}: weight has non-finite values")

    # -- active sizes ----------------------------------------------------
    def sizes(self, m: nn.Module) -> tuple[int, int, int]:
        """Active ``(out, in, rank)`` of ``m``."""
        return (self.features(m, "out", m.__dict__["out_features"]),
                self.features(m, "inp", m.__dict__["in_features"]),
                m.__dict__["_sn"].bind["rank"].features())

    def base_value(self, m: nn.Module, name: str) -> Any:
        if name in ("in_features", "out_features"):
            return self.features(m, "out" if name == "out_features" else "inp", m.__dict__[name])
        if name == "bias":
            return self.take(m, "bias", [(0, "out")])
        return None

    def namespace(self, m: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
        ns = super().namespace(m, names)

        def forward(self_: nn.Module, input: Tensor) -> Tensor:
            return self_.__dict__["_sn"].slicer.forward(self_, input)

        ns["forward"] = forward
        return ns

    def forward(self, m: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _param(t: Tensor, requires_grad: bool) -> nn.Parameter:
        return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format), requires_grad)

    def _linear(self, like: nn.Module, weight: Tensor, bias: Tensor | None, requires_grad: bool,
                bias_grad: bool = False) -> nn.Linear:
        """A new plain ``nn.Linear`` holding clones (the global RNG is not touched)."""
        out = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                        device=weight.device, dtype=weight.dtype)
        return self._fill(out.train(like.training), weight, bias, requires_grad, bias_grad)

    def _fill(self, copy_: nn.Module, weight: Tensor, bias: Tensor | None, requires_grad: bool,
              bias_grad: bool) -> nn.Module:
        """``copy_`` (a Linear, its hooks kept) holding clones of ``weight`` / ``bias`` in place of the factors or
        adapters, each with the ``requires_grad`` of the tensor it stands for (a frozen bias stays frozen); a
        parameter of a Linear subclass's own (a gain) stays."""
        for name in ("weight", "bias", *_MADE):
            copy_._parameters.pop(name, None)
        copy_._parameters["weight"] = self._param(weight, requires_grad)
        copy_._parameters["bias"] = None if bias is None else self._param(bias, bias_grad)
        copy_.out_features, copy_.in_features = weight.shape
        return copy_


def _split_svd(w: Tensor, R: int) -> tuple[Tensor, Tensor]:
    """``U`` (out x R) and ``V`` (R x in) with ``U @ V`` the rank-``R`` truncation of ``w``, in ``w``'s dtype.

    Each component ``u_j s_j vh_j`` is split ``sqrt(s_j)`` / ``sqrt(s_j)``, except a (near-)zero one: its
    ``U`` column is the unit vector ``u_j`` scaled to ``sqrt(floor)`` and its ``V`` row carries the rest
    (``s_j / sqrt(floor)``, zero for a zero component). Split evenly, a zero component has both factors zero:
    each factor's gradient is the other one times the output's, so it would never train (a zero-initialised
    layer stayed zero; the ranks past a zero-padded weight's own rank stayed dead). ``floor`` is 1e-3 of the
    largest singular value (1 for an all-zero weight); the product is the same either way.
    """
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    s, u, vh = s[:R], u[:, :R], vh[:R]
    top = float(s.max()) if s.numel() else 0.0
    floor = top * 1e-3 if top > 0 else 1.0
    small = s < floor
    left = torch.where(small, torch.full_like(s, floor).sqrt(), s.sqrt())
    right = torch.where(small, s / left, s.sqrt())
    return (u * left).to(w.dtype).contiguous(), (right[:, None] * vh).to(w.dtype).contiguous()


class SVDSlicer(LowRankSlicer):
    """Nested factorisation ``W ~ U[:, :r] V[:r]`` (Maestro-style ordered low rank).

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> layer = nn.Linear(6, 4)
    >>> nest = sn.wrap(layer, sn.Rank("r", [1, 4], targets=""))
    >>> layer.U.shape, layer.V.shape
    (torch.Size([4, 4]), torch.Size([4, 6]))
    >>> with nest.use("r=1"):
    ...     layer.U.shape, layer.weight.shape      # weight reads U[:, :1] @ V[:1]
    (torch.Size([4, 1]), torch.Size([4, 6]))
    """

    attrs = ("U", "V", "bias", "weight", "in_features", "out_features")
    views = {"U": ((0, "out"), (1, "rank")), "V": ((0, "rank"), (1, "inp")), "bias": ((0, "out"),)}
    static = ("in_features", "out_features")
    factors = ("U", "V")

    def planned_state(self, m: nn.Module, bind: dict) -> dict[str, tuple | None]:
        R, w = bind["rank"].dim.full, m._parameters["weight"]
        return {"weight": None, "U": ((w.shape[0], R), w.dtype), "V": ((R, w.shape[1]), w.dtype)}

    def prepare(self, m: nn.Module) -> None:
        st = m.__dict__["_sn"]
        R = st.bind["rank"].dim.full
        w = m._parameters["weight"]
        with torch.no_grad():
            U, V = _split_svd(w.detach(), R)
        st.extra.update(weight=w, order=list(m._parameters))
        params = {}
        for name, p in m._parameters.items():
            if name == "weight":
                params["U"] = nn.Parameter(U, requires_grad=w.requires_grad)
                params["V"] = nn.Parameter(V, requires_grad=w.requires_grad)
            else:
                params[name] = p
        m._parameters.clear()
        m._parameters.update(params)

    def pre_restore(self, m: nn.Module, merge: bool) -> Tensor | None:
        """The original weight's new value, or None to keep it as it is: converted to the factors' dtype and
        device (``model.to(...)`` after wrap moved them, not the weight held aside), merged if asked."""
        w, U = m.__dict__["_sn"].extra["weight"], m._parameters["U"]
        with torch.no_grad():
            if merge:
                r = _merge_rank(U.shape[1], merge)
                return (U[:, :r] @ m._parameters["V"][:r]).detach().clone(memory_format=torch.contiguous_format)
            if w.dtype != U.dtype or w.device != U.device:
                return w.detach().to(device=U.device, dtype=U.dtype)
        return None

    def restore(self, m: nn.Module, merge: bool, pending: Tensor | None = None) -> None:
        st = m.__dict__["_sn"]
        w = st.extra["weight"]
        if pending is not None:  # (idempotent, as unwrap may run it twice after a Ctrl-C)
            if torch._has_compatible_shallow_copy_type(w, pending):
                w.data = pending  # the same Parameter object, as model.to() keeps it
            else:  # e.g. moved to the meta device: a new Parameter, as Module._apply makes one
                w = st.extra["weight"] = nn.Parameter(pending, requires_grad=w.requires_grad)
        params = st.extra.get("restored") or {n: w if n == "weight" else m._parameters[n] for n in st.extra["order"]}
        st.extra["restored"] = params
        m._parameters.clear()
        m._parameters.update(params)

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "U":
            return self.take(m, "U", [(0, "out"), (1, "rank")])
        if name == "V":
            return self.take(m, "V", [(0, "rank"), (1, "inp")])
        if name == "weight":  # (read by the parent's forward, as MultiheadAttention reads its out_proj's)
            if m.__dict__["_sn"].bind["rank"].dim.export != "merged":
                _note_matrix_read(m)
            with _uncounted():  # (the product is built once in an export that can serve this read: merged)
                return rank_weight(m.U @ m.V, m, m.__dict__["_sn"])
        return self.base_value(m, name)

    def forward(self, m: nn.Module, x: Tensor) -> Tensor:
        if COUNTING.pause is not None and not self.factored(m):
            with COUNTING.pause:
                weight = m.U @ m.V
            return F.linear(x, weight, m.bias)
        return F.linear(F.linear(x, m.V), m.U, m.bias)

    def factored(self, m: nn.Module) -> bool:
        """Whether ``export`` writes two Linears (else one merged): Rank's ``export``
        option; ``"auto"`` factors when ``r (out + in) < out * in``."""
        how = m.__dict__["_sn"].bind["rank"].dim.export
        if how != "auto":
            return how == "factored"
        if m._modules:  # (a Linear subclass holding modules: an nn.Sequential of two Linears cannot carry them)
            return False
        o, i, r = self.sizes(m)
        return r * (o + i) < o * i

    def numel(self, m: nn.Module, name: str) -> int:
        o, i, r = self.sizes(m)
        fact = self.factored(m)
        if name == "U":
            return o * r if fact else o * i
        if name == "V":
            return r * i if fact else 0
        return super().numel(m, name)

    def moved(self, m: nn.Module) -> dict[str, str]:
        return {"bias": "1.bias"} if self.factored(m) else {}

    def export(self, live: nn.Module, copy_: nn.Module) -> nn.Module:
        U, V, bias = live.U, live.V, live.bias
        fu, fv = live._parameters["U"].requires_grad, live._parameters["V"].requires_grad  # (now, as Width's
        b = live._parameters.get("bias")                                                    # exports follow)
        bgrad = b is not None and b.requires_grad
        if self.factored(live):
            st = live.__dict__["_sn"]
            if st.extra.get("matrix_read"):
                where = st.path or "the model"
                raise SizeError(f"{where}: a forward of the model reads this Rank target's weight matrix "
                                f"({where}.weight, as F.linear(x, layer.weight) or nn.MultiheadAttention's out_proj "
                                f"do) instead of calling the layer; its export at rank {self.sizes(live)[2]} would "
                                f"be two Linears (Rank export={st.bind['rank'].dim.export!r}), which have no weight "
                                "to read, so the exported model would fail when run. Declare "
                                "sn.Rank(..., export='merged') for it (one Linear holding U_r V_r, counted so by "
                                "cost), or call the layer in the forward")
            if copy_._modules:  # (an nn.Sequential runs every child it holds: they cannot come along)
                where = st.path or "the model"
                raise SizeError(f"{where}: this Rank target ({st.cls.__name__}, a Linear subclass) "
                                f"holds the modules {list(copy_._modules)[:4]}, which its factored export (two "
                                "Linears in an nn.Sequential, which runs every child it holds) cannot carry; "
                                "declare sn.Rank(..., export='merged') for it (the layer's own class, holding U_r V_r)")
            seq = nn.Sequential(self._linear(live, V, None, fv), self._linear(live, U, bias, fu, bgrad))
            seq.out_features, seq.in_features = U.shape[0], V.shape[1]  # (a forward reading them still can)
            for name, p in copy_._parameters.items():  # (a Linear subclass's own tensors, a gain: kept, as the
                if name not in ("weight", "bias", *_MADE):  # merged export keeps them)
                    seq.register_parameter(name, p)
            for name, b in copy_._buffers.items():
                seq.register_buffer(name, b, persistent=name not in copy_._non_persistent_buffers_set)
            for name, v in vars(copy_).items():  # (and its plain attributes: a clip value its parent reads)
                if not name.startswith("_") and name not in vars(seq) and not isinstance(v, nn.Module):
                    seq.__dict__[name] = v.detach().clone() if isinstance(v, torch.Tensor) else v
            return seq.train(live.training)
        return self._fill(copy_, U @ V, bias, fu or fv, bgrad)


class LoRASlicer(LowRankSlicer):
    """Frozen base + nested-rank adapters, scaled ``alpha / r`` (DyLoRA).

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> layer = nn.Linear(6, 4)
    >>> nest = sn.wrap(layer, sn.Rank("r", [1, 4], targets="", mode="lora", alpha=2))
    >>> [n for n, p in layer.named_parameters() if p.requires_grad]
    ['lora_A', 'lora_B']
    >>> with nest.use("r=1"):
    ...     layer.lora_A.shape, layer.lora_B.shape, nest.dims[0].scale()
    (torch.Size([1, 6]), torch.Size([4, 1]), 2.0)
    """

    attrs = ("weight", "bias", "lora_A", "lora_B", "in_features", "out_features")
    views = {"lora_A": ((0, "rank"), (1, "inp")), "lora_B": ((0, "out"), (1, "rank")), "bias": ((0, "out"),)}
    static = ("in_features", "out_features")
    factors = ("lora_A", "lora_B")
    frozen = ("weight", "bias")

    def planned_state(self, m: nn.Module, bind: dict) -> dict[str, tuple | None]:
        R, w = bind["rank"].dim.full, m._parameters["weight"]
        return {"lora_A": ((R, w.shape[1]), w.dtype), "lora_B": ((w.shape[0], R), w.dtype)}

    def prepare(self, m: nn.Module) -> None:
        st = m.__dict__["_sn"]
        R = st.bind["rank"].dim.full
        w = m._parameters["weight"]
        st.extra["requires_grad"] = {n: p.requires_grad for n, p in m._parameters.items() if p is not None}
        A = torch.empty(R, w.shape[1], dtype=w.dtype, device="cpu")  # drawn on the CPU, then moved: one
        # generator for any device (whatever torch's default device is)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=self._generator(st.bind["rank"].dim))
        A = A.to(w.device)
        B = torch.zeros(w.shape[0], R, dtype=w.dtype, device=w.device)
        for p in m._parameters.values():
            if p is not None:
                p.requires_grad_(False)
        m._parameters["lora_A"] = nn.Parameter(A)
        m._parameters["lora_B"] = nn.Parameter(B)

    def pre_restore(self, m: nn.Module, merge: bool) -> Tensor | None:
        """The merged weight ``W0 + alpha / r * B[:, :r] @ A[:r]`` as a new tensor (None without ``merge``):
        all arithmetic happens here, so that :meth:`restore` only swaps references."""
        if not merge:
            return None
        A, B, w = m._parameters["lora_A"], m._parameters["lora_B"], m._parameters["weight"]
        r = _merge_rank(A.shape[0], merge)
        with torch.no_grad():
            delta = (B[:, :r] @ A[:r]).mul_(m.__dict__["_sn"].bind["rank"].dim.scale(r))
            return torch.add(w.detach(), delta.to(w)).contiguous()

    @staticmethod
    def _generator(dim: Any) -> torch.Generator:
        """One CPU generator per Rank dimension, seeded by a hash of the global generator's state and the
        dimension's name: the adapters follow ``torch.manual_seed`` as usual, each layer and each dimension
        draws its own values, and the global generator is neither advanced nor replayed (a module built
        after wrapping does not repeat an adapter's values)."""
        gen = dim.__dict__.get("_init_generators")
        if gen is None:
            digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes() + b"sortednet.lora:" +
                                    dim.name.encode()).digest()
            gen = dim.__dict__["_init_generators"] = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return gen

    def restore(self, m: nn.Module, merge: bool, pending: Tensor | None = None) -> None:
        st = m.__dict__["_sn"]
        if pending is not None:  # (idempotent, as unwrap may run it twice after a Ctrl-C)
            w = m._parameters["weight"]
            if torch._has_compatible_shallow_copy_type(w, pending):
                w.data = pending  # the same Parameter object (a tied partner sees the merge too)
            else:
                m._parameters["weight"] = nn.Parameter(pending, requires_grad=False)
        m._parameters.pop("lora_A", None)
        m._parameters.pop("lora_B", None)
        for n, flag in st.extra["requires_grad"].items():
            m._parameters[n].requires_grad_(flag)

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "lora_A":
            return self.take(m, "lora_A", [(0, "rank"), (1, "inp")])
        if name == "lora_B":
            return self.take(m, "lora_B", [(0, "out"), (1, "rank")])
        if name == "weight":
            with _uncounted():  # (the export holds the merged weight)
                return rank_weight(self.base(m) + self.scale(m) * (m.lora_B @ m.lora_A), m, m.__dict__["_sn"])
        return self.base_value(m, name)

    def base(self, m: nn.Module) -> Tensor:
        """The frozen base weight, sliced to the active width."""
        return self.take(m, "weight", [(0, "out"), (1, "inp")])

    def scale(self, m: nn.Module) -> float:
        """``alpha / r`` at the active rank ``r``."""
        b = m.__dict__["_sn"].bind["rank"]
        return b.dim.scale(b.features())

    def forward(self, m: nn.Module, x: Tensor) -> Tensor:
        if COUNTING.pause is not None:
            with COUNTING.pause:
                weight = m.weight
            return F.linear(x, weight, m.bias)
        base = F.linear(x, self.base(m), m.bias)
        return base + self.scale(m) * F.linear(F.linear(x, m.lora_A), m.lora_B)

    def numel(self, m: nn.Module, name: str) -> int:
        if name in self.factors:
            return 0  # merged into the weight by export
        o, i, _ = self.sizes(m)
        return o * i if name == "weight" else super().numel(m, name)

    def adapters(self, m: nn.Module) -> list[Tensor]:
        return [m._parameters[n] for n in self.factors]

    def export(self, live: nn.Module, copy_: nn.Module) -> nn.Module:
        flags = live.__dict__["_sn"].extra["requires_grad"]
        return self._fill(copy_, live.weight, live.bias, flags["weight"], flags.get("bias", False))


SVD = SVDSlicer()
LORA = LoRASlicer()

"""Coupling analysis: which module roles must shrink together.

One real forward on an example runs under a ``TorchFunctionMode`` that records
every torch function with its real tensors, plus forward hooks that record each
sliceable module (``nn.Linear``, convolutions, norms, ``nn.Embedding``,
``nn.MultiheadAttention``) as one opaque call. Every axis of every tensor gets a
variable; ops link variables (broadcasting, reshapes, permutes, residual adds,
depthwise convolutions, norms) in a union-find. A module's output features are
a new variable bound to ``(path, "out")``; its input features bind
``(path, "inp")`` on the input's variable; norms bind ``(path, "norm")``.

Conservative by construction: network inputs and outputs, raw parameters
(class tokens, layer scales), concatenated axes, reshapes that merge or split a
feature axis, and every op this module does not understand *fix* the variables
they touch. Only variables that stay free, are produced by a sliced module and
hold at least two features are offered as groups. Control flow follows the
example's path (a data-dependent branch may couple differently on other inputs).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .cost import call_model
from .coupling_ops import OUTPUT, Attention, _tensors, attention_block, handle, leaf_types, module, sliceable
from .errors import SortedNetError
from .heads import COUNT_ATTRS, Heads, separate_qkv
from .modes import dry_run, eval_view, seeded
from .slicers.base import slicer_for

__all__ = ["Group", "Coupling", "analyse"]

@dataclass
class Group:
    """One coupled set of module roles (a candidate ``Width``)."""

    size: int
    bindings: list[tuple[str, str]]           # (module path, role) in first-seen order
    fixed: str | None = None                  # why it must not shrink (None: free)
    multiple: int = 1                         # sizes must be multiples (GroupNorm channels per group)
    divides: int = 0                          # sizes must divide it (a roll by it keeps units in place); 0: none
    writer: str | None = None                 # a module holding parameters whose forward, not understood, writes it

    def roles(self, role: str) -> list[str]:
        return [p for p, r in self.bindings if r == role]


@dataclass
class Coupling:
    """Result of :func:`analyse`: coupled groups (free and fixed) and attention modules."""

    groups: list[Group]
    attention: list[Attention]
    role_group: dict[tuple[str, str], int] = field(default_factory=dict)   # (path, role) -> index in groups

    def free(self) -> list[Group]:
        return [g for g in self.groups if g.fixed is None and g.size >= 2 and g.roles("out")]


#: why the wiring trace fixes an axis, when the op moves features between positions: a prefix of the axis is not
#: a prefix of what the op makes of it (a slice or an index, chunk / split / unbind, concatenation, roll / flip,
#: a reshape that splits or merges the axis, a repeat, padding with other values than zeros): a sub-model computes
#: on other units than the full model, with shapes that fit (``check`` refuses such a group)
MOVED = re.compile(r"indexed by|an integer index|split by|unbound by|concatenated by|reordered by|regrouped by|"
                   r"merges or splits this axis|repeats this axis|pads this axis with other values|"
                   r"crops this axis")


def _moves(reason: str | None) -> bool:
    return reason is not None and MOVED.search(reason) is not None


def _reaches_origins(reason: str | None) -> bool:
    return _moves(reason) and not reason.endswith(OUTPUT)  # type: ignore[union-attr]


class _UF:
    """Union-find over axis variables with size, bindings, a fixed reason and a size multiple. A reason that moves
    units (:data:`MOVED`) replaces one that does not (a zero padding of the axis first, a repeat of it later: the
    repeat is what ``check`` must see), and reaches the axis a padding was made from (``origin``: a padded axis is
    a new variable of another size, and an op moving its units moves the source's)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[str | None] = []
        self.binds: list[list[tuple[str, str]]] = []
        self.mult: list[int] = []
        self.div: list[int] = []  # a roll's shift the sizes must divide (gcd of every such shift; 0: none)
        self.roles: dict[tuple[str, str], int] = {}
        self.origin: dict[int, int] = {}  # padded axis -> the axis it was padded from
        self.writer: dict[int, str] = {}  # root -> a module holding parameters whose op not understood wrote it

    def new(self, size: int, fixed: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.fixed.append(fixed if size > 1 else None)
        self.binds.append([])
        self.mult.append(1)
        self.div.append(0)
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if a > b:
            a, b = b, a
        self.parent[b] = a
        if self.size[a] != self.size[b]:
            self.fixed[a] = self.fixed[a] or f"sizes {self.size[a]} and {self.size[b]} meet"
        moved = self.fixed[b] if _moves(self.fixed[b]) and not _moves(self.fixed[a]) else None
        self.fixed[a] = moved or self.fixed[a] or self.fixed[b]
        self.binds[a] += [x for x in self.binds[b] if x not in self.binds[a]]
        if b in self.writer:
            self.writer.setdefault(a, self.writer.pop(b))
        self.mult[a] = math.lcm(self.mult[a], self.mult[b])
        self.div[a] = math.gcd(self.div[a], self.div[b])
        if (moved or self.origin) and _reaches_origins(self.fixed[a]):
            self._to_origins(a, self.fixed[a])
        return a

    def rolled(self, v: int, shift: int) -> None:
        """Axis ``v`` was rolled by ``shift``, a multiple of its size here: the identity only at sizes dividing it."""
        r = self.find(v)
        self.div[r] = math.gcd(self.div[r], shift)

    def fix(self, v: int, reason: str) -> None:
        r = self.find(v)
        if self.size[r] > 1 and (self.fixed[r] is None or (_moves(reason) and not _moves(self.fixed[r]))):
            self.fixed[r] = reason
        if _reaches_origins(reason) and self.origin:
            self._to_origins(r, reason)

    def _to_origins(self, r: int, reason: str, seen: set[int] | None = None) -> None:
        """A reason that moves units, given to group ``r``, reaches the axes its padded axes were made from."""
        seen = set() if seen is None else seen
        for u, src in list(self.origin.items()):
            if src not in seen and self.find(u) == r:
                seen.add(src)
                s = self.find(src)
                if self.size[s] > 1 and not _moves(self.fixed[s]):
                    self.fixed[s] = reason
                self._to_origins(s, reason, seen)

    def bind(self, v: int, path: str, role: str) -> None:
        r = self.find(v)
        if (path, role) not in self.binds[r]:
            self.binds[r].append((path, role))
        prev = self.roles.get((path, role))
        self.roles[(path, role)] = r if prev is None else self.union(prev, r)


def _base(m: nn.Module) -> type:
    st = m.__dict__.get("_sn")
    return st.cls if st is not None else type(m)


def _is_leaf(m: nn.Module) -> bool:
    """A module type whose slicing rule is known and whose forward is the stock one."""
    cls = _base(m)
    kinds = leaf_types()
    base = next((b for b in cls.__mro__ if b in kinds), None)
    return base is not None and cls.forward is base.forward


def _attention_info(path: str, m: nn.Module, modules: dict[str, nn.Module]) -> tuple[Attention, list[str], str] | None:
    """(attention, q/k/v (or fused) paths, o path) when ``m`` looks like attention over plain Linear projections."""
    if _is_leaf(m) or not any(True for _ in m.children()):
        return None
    counts = _head_count(m)
    if not counts:
        return None
    try:
        targets = Heads("probe", [counts[0]], attn=path)._plan_one(path, m, path)
    except SortedNetError:
        return None
    first = {id(x): n for n, x in modules.items()}  # (a projection held under a second name: its first name)
    named = {f"{path}.{n}" if path else n: first.get(id(c)) for n, c in m.named_modules() if n}
    proj = [named.get(t.path) or t.path for t in targets if t.role == "out"]
    o = next((named.get(t.path) or t.path for t in targets if t.role == "inp"), None)
    qkv = separate_qkv({n for n, _ in m.named_children()})
    if qkv is not None:  # multi-query: the one key/value head's projections read the input whole (no target)
        for n in qkv:
            p = f"{path}.{n}" if path else n
            p = named.get(p) or p
            if p not in proj and p != o:
                proj.append(p)
    if o is None or not proj or any(_base(modules[p]) is not nn.Linear for p in (*proj, o)):
        return None
    own = {id(p) for q in (*proj, o) for p in modules[q].parameters()}
    if any(id(p) not in own for p in m.parameters()) or any(True for _ in m.buffers()):
        return None
    group = max((t.binding.div for t in targets), default=1)
    return Attention(path, counts[0], group), proj, o


def _head_count(m: nn.Module) -> list[int]:
    """The head count a module states (``num_heads``, ...), or, for one that states only ``head_dim``
    (transformers' Llama-family attention), its query projection's width over it."""
    counts = [v for a, v in vars(m).items() if a in COUNT_ATTRS and type(v) is int and v > 1]
    d = vars(m).get("head_dim")
    if counts or type(d) is not int or d < 1:
        return counts
    names = {n for n, _ in m.named_children()}
    qkv = separate_qkv(names)
    q = m.get_submodule(qkv[0]) if qkv else None
    width = q.out_features if q is not None and _base(q) is nn.Linear else 0
    return [width // d] if width % d == 0 and width // d > 1 else []


def _producer_info(path: str, m: nn.Module, modules: dict[str, nn.Module]) -> tuple[Attention, list[str], str] | None:
    """(attention, q/k/v paths, o path) when ``m`` holds the q/k/v Linears and the head count but its
    output projection is the one Linear of a sibling module reading as many features as v writes
    (BERT-style: ``attention.self.{query,key,value}`` and ``attention.output.dense``). The Attention is
    declared at the parent, with the paths spelled out; the recorded block is ``m``."""
    if "." not in path or _is_leaf(m):
        return None
    counts = _head_count(m)
    names = {n for n, _ in m.named_children()}
    qkv = separate_qkv(names)
    if not counts or qkv is None or any(_base(m.get_submodule(n)) is not nn.Linear for n in qkv):
        return None
    own = {id(p) for n in qkv for p in m.get_submodule(n).parameters()}
    if any(id(p) not in own for p in m.parameters()) or any(True for _ in m.buffers()):
        return None
    parent, _, me = path.rpartition(".")
    width = m.get_submodule(qkv[2]).out_features
    o = [p for p, c in modules.items() if p.startswith(parent + ".") and not p.startswith(path + ".") and p != path
         and _base(c) is nn.Linear and c.in_features == width]
    if len(o) != 1:
        return None
    rel = tuple(f"{me}.{n}" for n in qkv)
    o_rel = o[0][len(parent) + 1:]
    try:
        targets = Heads("probe", [counts[0]], attn=parent, qkv=rel, o=o_rel)._plan_one(parent, modules[parent], parent)
    except SortedNetError:
        return None
    group = max((t.binding.div for t in targets), default=1)
    return Attention(parent, counts[0], group, rel, o_rel), [f"{path}.{n}" for n in qkv], o[0]


@dataclass
class _Event:
    kind: str                      # "op" | "mod" | "attn"
    name: str                      # op name or module path
    func: Any
    args: tuple
    kwargs: dict
    out: Any
    where: str                     # innermost module path (for messages)
    inner: list = field(default_factory=list)


class _Recorder(TorchFunctionMode):
    """Records torch functions (outside opaque modules) into the current event sink."""

    def __init__(self) -> None:
        super().__init__()
        self.sinks: list[list[_Event]] = [[]]
        self.opaque = 0
        self.paths: list[str] = [""]
        self.keep: list[Any] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.opaque == 0:
            name = getattr(func, "__name__", str(func))
            if name == "__get__":
                name = getattr(getattr(func, "__self__", None), "__name__", "__get__")
            args, kwargs = _snapshot(args), _snapshot(kwargs)
            self.keep.append((args, kwargs, out))
            self.sinks[-1].append(_Event("op", name, func, args, kwargs, out, self.paths[-1]))
        return out


def _snapshot(x: Any) -> Any:
    """``x`` with its lists and dicts copied (tensors and other leaves kept): an op's arguments as they were at the
    call, which a forward that appends to the same list afterwards (DenseNet's ``feats.append(...)`` after
    ``torch.cat(feats, 1)``) would otherwise change in the record."""
    if type(x) is list:
        return [_snapshot(v) for v in x]
    if type(x) is tuple:
        return tuple(_snapshot(v) for v in x)
    if type(x) is dict:
        return {k: _snapshot(v) for k, v in x.items()}
    return x


def _hooks(model: nn.Module, rec: _Recorder, attn: dict[str, tuple]) -> list:
    handles = []
    script = [p for p, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if script:  # (PyTorch refuses hooks on them, and their ops run in TorchScript, out of the recording's sight)
        raise SortedNetError(f"{script[0] or '<root>'!r} is a TorchScript module (torch.jit.script / trace): tracing "
                             "the model's wiring (discover, sort_units) follows its Python modules and cannot see "
                             "inside a scripted part. Use the eager module there and script afterwards "
                             "(nest.export(sub) is a plain model that torch.jit.script accepts)")
    for path, m in model.named_modules():
        leaf, cand = _is_leaf(m), path in attn

        def pre(mod, args, kwargs, path=path, leaf=leaf, cand=cand):
            rec.paths.append(path)
            if leaf:
                rec.opaque += 1
            elif cand and rec.opaque == 0:
                rec.sinks.append([])

        def post(mod, args, kwargs, out, path=path, leaf=leaf, cand=cand):
            rec.paths.pop()
            if leaf:
                rec.opaque -= 1
                if rec.opaque == 0:
                    args, kwargs = _snapshot(args), _snapshot(kwargs)
                    rec.keep.append((args, kwargs, out))
                    rec.sinks[-1].append(_Event("mod", path, mod, args, kwargs, out, path))
            elif cand and rec.opaque == 0:
                inner = rec.sinks.pop()
                args, kwargs = _snapshot(args), _snapshot(kwargs)
                rec.keep.append((args, kwargs, out))
                rec.sinks[-1].append(_Event("attn", path, mod, args, kwargs, out, path, inner))

        # the user's own hooks run outside the recorded call: pre-hooks before ours, forward hooks after
        # ours (prepended), so what they do to its inputs and output is traced like any other op
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True, prepend=True))
    return handles


def record(model: nn.Module, example: Any) -> tuple[list[_Event], Any, dict[str, tuple]]:
    """Run ``model`` on ``example`` once, recording events; returns (events, output, attention candidates)."""
    modules = dict(model.named_modules())
    attn = {p: info for p, m in modules.items() if (info := _attention_info(p, m, modules)) is not None}
    attn.update({p: info for p, m in modules.items() if p not in attn and p.rpartition(".")[0] not in attn
                 and (info := _producer_info(p, m, modules)) is not None})
    rec = _Recorder()
    handles = _hooks(model, rec, attn)
    try:
        with torch.enable_grad(), rec:  # grad on: PyTorch's fused Transformer fast paths step aside
            out = call_model(model, example)
    except Exception as e:
        raise SortedNetError(f"the model failed on the example ({type(e).__name__}: {e})") from e
    finally:
        for h in handles:
            h.remove()
    return rec.sinks[0], out, attn


def _axis_roles(m: nn.Module, attr: str, t: Tensor) -> tuple[tuple[int, str], ...] | None:
    """The ``(axis, role)`` pairs of tensor ``attr`` of module ``m``: its slicer's view rules, or for a
    one-role slicer (a norm's running statistics) the one axis of that role's size. ``()`` where the tensor is
    read whole live (a module sortednet does not slice, a tensor its slicer does not serve sliced: the
    tensor's axes are fixed, the module's roles untouched); ``None`` where the axes are not known (every
    role of the module is fixed)."""
    sl = slicer_for(m)
    if sl is None or attr not in sl.attrs:
        return ()
    try:
        axes = sl.rules(m).get(attr)
    except Exception:  # a user's slicer that needs the wrapped state
        axes = None
    if isinstance(axes, tuple) and all(isinstance(a, tuple) and len(a) == 2 for a in axes):
        return axes
    if len(sl.roles) == 1:
        try:
            full = sl.full(m, sl.roles[0])
        except Exception:
            return None
        hits = [i for i, s in enumerate(t.shape) if s == full]
        if len(hits) == 1:
            return ((hits[0], sl.roles[0]),)
    return None


class _Analysis:
    """Turns recorded events into variables linked in a union-find."""

    def __init__(self, model: nn.Module, example: Any, attn_info: dict[str, tuple], own: dict[int, str]) -> None:
        self.uf = _UF()
        self.attn_info = attn_info
        self.vars: dict[int, list[int]] = {}
        self.params = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
        self.kinds = {id(t): "buffer" for _, t in model.named_buffers()}  # (named so in the reasons: not parameter)
        for k, n in own.items():  # tensors the modules held as plain attributes before any traced forward
            self.params.setdefault(k, n)  # (a positional table not registered as a buffer): the model's own
        self.modules = dict(model.named_modules())
        self.owners: dict[int, list[tuple[str, nn.Module, str]]] = {}  # a tensor -> (path, module, attribute)
        for path, m in model.named_modules(remove_duplicate=False):  # every holder of a tied tensor
            for attr, t in (*m._parameters.items(), *m._buffers.items()):
                if t is not None:
                    self.owners.setdefault(id(t), []).append((path, m, attr))
        self.raw: list[tuple[int, str, str, str, str]] = []  # (variable, module path, role, tensor name, why)
        self.attention: list[Attention] = []
        for t in _tensors(example):
            self.vars[id(t)] = [self.uf.new(s, "the network input") for s in t.shape]

    # -- variables ---------------------------------------------------------
    def of(self, t: Tensor) -> list[int]:
        v = self.vars.get(id(t))
        if v is None:
            name = self.params.get(id(t))
            why = f"{self.kinds.get(id(t), 'parameter')} {name!r}" if name else "a tensor from outside the traced ops"
            v = self.vars[id(t)] = self._raw(t, name) if name else [self.uf.new(s, why) for s in t.shape]
        return v

    def _raw(self, t: Tensor, name: str) -> list[int]:
        """Variables of a parameter / buffer that an op reads directly (``self.fc.bias[-1]``, a penalty over
        ``fc.weight``, a functional call on it). Read as an attribute of a wrapped module it is the active
        slice, so each axis that holds a role's features is linked to that role (at the end of the analysis,
        when every module call is bound) and what the op does to it decides, as for any feature axis. An axis
        of no role (a kernel's) and a tensor read whole live (a class token, a buffer of the user's on a
        Linear, a tensor tied to one) are fixed; a tensor whose axes are not known fixes every role of its
        module."""
        why = f"{self.kinds.get(id(t), 'parameter')} {name!r}"
        links: list[list[tuple[str, str]]] = [[] for _ in t.shape]
        whole = False
        for path, m, attr in self.owners.get(id(t), ()):
            axes = _axis_roles(m, attr, t)
            if axes is None:
                if t.dim():  # (a 0-d count holds no unit)
                    self.raw.append((-1, path, "", name, why))
                continue
            whole = whole or not axes
            for axis, role in axes:
                if 0 <= axis < t.dim():
                    links[axis].append((path, role))
        if whole:  # one holder serves it whole: which holder this read went through is not known
            links = [[] for _ in t.shape]
        vs = [self.uf.new(s, None if links[i] else why) for i, s in enumerate(t.shape)]
        self.raw += [(vs[i], path, role, name, why) for i, ls in enumerate(links) for path, role in ls]
        return vs

    def link_raw(self) -> None:
        """Join each directly read tensor axis to its role (see :meth:`_raw`). A module that never ran as one
        (its tensors read by a functional call, or by a forward of the user's own that the trace recorded op by
        op) has its role bound by these reads: they are its features, and what the ops do to them decides, as
        for a module call's (a flip between two such layers is seen as one between two module calls). A
        subclass of a stock layer with a forward of its own, which wrap refuses, is not: its axes stay fixed."""
        for v, path, role, _, why in self.raw:  # (check's diagnosis reads the module path from why)
            if v < 0:  # the rules of its slicer are not known: every role of the module
                for (p, _), r in list(self.uf.roles.items()):
                    if p == path:
                        self.uf.fix(r, why)
            elif (path, role) in self.uf.roles or sliceable(self.modules.get(path)):
                self.uf.bind(v, path, role)
            else:
                self.uf.fix(v, why)

    def assign(self, t: Tensor, srcs: list[list[int]], why: str) -> list[int]:
        """Give ``t`` (an op's output) per-axis variables linked to ``srcs`` (per axis; empty = fresh, fixed)."""
        old = self.vars.get(id(t))
        out = []
        for i, s in enumerate(t.shape):
            links = srcs[i] if i < len(srcs) else []
            v = old[i] if old is not None else (links[0] if links else self.uf.new(s, why))
            for u in links:
                v = self.uf.union(v, u)
            out.append(v)
        self.vars[id(t)] = out
        return out

    def fix_all(self, ts: list[Tensor], why: str) -> None:
        for t in ts:
            for v in self.of(t):
                self.uf.fix(v, why)

    def unknown(self, ev: _Event, why: str | None = None) -> None:
        why = why or f"{ev.name!r} (in {ev.where or '<root>'!r}), an op discovery does not understand"
        ins, outs = _tensors((ev.args, ev.kwargs)), _tensors(ev.out)
        self.fix_all(ins, why)
        holder = self.modules.get(ev.where) if ev.where is not None else None
        weights = holder is not None and bool(holder._parameters or holder._buffers or any(
            isinstance(c, (nn.ParameterDict, nn.ParameterList)) for c in holder.children()))
        for t in outs:
            for v in self.assign(t, [], why):  # (written inside a layer of one's own holding its weights: a
                if weights:                    # convolution computing its weight, an int8 one; named as such)
                    self.uf.writer.setdefault(self.uf.find(v), ev.where or "<root>")
        self.fix_all(outs, why)

    # -- events ----------------------------------------------------------------
    def run(self, events: list[_Event]) -> None:
        for ev in events:
            if ev.kind == "mod":
                module(self, ev)
            elif ev.kind == "attn":
                if not attention_block(self, ev):  # not the pattern after all: its inside, op by op
                    self.run(ev.inner)
            elif _tensors(ev.out) or ev.name == "__setitem__":
                try:
                    ok = handle(self, ev)
                except Exception:  # an unexpected signature: not understood
                    ok = False
                if not ok:
                    self.unknown(ev)



def analyse(model: nn.Module, example: Any) -> Coupling:
    """Coupled groups of ``model`` found by one recorded forward on ``example`` (the model is not changed).

    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> [(g.size, g.bindings) for g in analyse(m, torch.randn(3, 4)).free()]
    [(8, [('0', 'out'), ('2', 'inp')])]
    """
    view, _ = eval_view(model, own_buffers=True)  # a private eval-mode copy sharing the parameters, with copies of
    # the buffers (the training-mode trace updates running statistics, power iterations, counters on the copies, not
    # what another thread serving the model reads)
    own = _plain_tensors(view)  # (before the traced forwards: what they store on a module is their own result)
    found = _analyse(view, model, example, own)
    view.train(True)  # training mode too: branches that run only there (auxiliary heads) read features as well
    for m in view.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    try:
        with seeded(0):
            more = _analyse(view, model, example, own)
    except Exception:  # e.g. BatchNorm on a batch of one: the example does not run in training mode
        return found
    return _merge(found, more)


def _merge(a: Coupling, b: Coupling) -> Coupling:
    """One coupling from two traces of the same model: groups sharing a binding are one group (the first
    trace's groups keep their order)."""
    uf = _UF()
    for g in (*a.groups, *b.groups):
        v = uf.new(g.size, g.fixed)
        uf.mult[v], uf.div[v] = g.multiple, g.divides
        if g.writer is not None:
            uf.writer[v] = g.writer
        for path, role in g.bindings:
            uf.bind(v, path, role)
    return _coupling(uf, list({x.path: x for x in (*a.attention, *b.attention)}.values()))


def _coupling(uf: _UF, attention: list[Attention]) -> Coupling:
    """The groups of a finished union-find, in first-seen order."""
    roots: dict[int, int] = {}
    groups: list[Group] = []
    for v in range(len(uf.parent)):
        r = uf.find(v)
        if r in roots or not uf.binds[r]:
            continue
        roots[r] = len(groups)
        groups.append(Group(uf.size[r], list(uf.binds[r]), uf.fixed[r], uf.mult[r], uf.div[r], uf.writer.get(r)))
    return Coupling(groups, attention, {k: roots[uf.find(r)] for k, r in uf.roles.items()})


def _plain_tensors(model: nn.Module) -> dict[int, str]:
    """Tensors the modules of ``model`` hold as plain attributes (not parameters or buffers), by id: their names."""
    return {id(t): f"{path}.{attr}" if path else attr for path, m in model.named_modules()
            for attr, t in vars(m).items() if isinstance(t, Tensor)}


def _analyse(view: nn.Module, model: nn.Module, example: Any, own: dict[int, str]) -> Coupling:
    with dry_run(model):
        events, out, attn = record(view, example)
    a = _Analysis(view, example, attn, own)
    a.run(events)
    a.link_raw()
    a.fix_all(_tensors(out), "the network output")
    return _coupling(a.uf, a.attention)


"""Heads: nested attention heads, sliced in whole heads."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from .dims import Binding, Dimension, Target, _as_patterns, match
from .errors import PatternError, SizeError
from .slicers import slicer_for

__all__ = ["Heads"]

COUNT_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "nhead", "heads")
SIZE_ATTRS = ("all_head_size", "inner_dim", "attn_dim", "inner_size")
#: attributes that hold the module's own head size (compared with the one the declared sizes give)
HEAD_SIZE_ATTRS = ("head_dim", "head_size", "attention_head_size", "dim_head", "d_head")
QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"),
             ("wq", "wk", "wv"), ("to_q", "to_k", "to_v"), ("q_lin", "k_lin", "v_lin"))
FUSED_NAMES = ("qkv", "qkv_proj", "to_qkv", "Wqkv", "c_attn", "query_key_value")
#: fused projections whose layout is a convention of the name: q, k, v blocks stacked ([q; k; v])
STACKED_NAMES = ("qkv", "to_qkv", "Wqkv", "c_attn")
LAYOUTS = ("stacked", "interleaved")
KV_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")
#: query heads per key/value head: constant under grouped-query slicing, the head count under multi-query
GROUP_ATTRS = ("num_key_value_groups", "n_rep", "num_queries_per_kv")
BIAS_NAMES = ("relative_attention_bias",)  # per-head relative position biases (T5): an Embedding of width heads
O_NAMES = ("o_proj", "out_proj", "o", "wo", "out", "proj", "to_out", "c_proj", "dense", "out_lin")


def _out_features(m: nn.Module) -> int | None:
    """Output features of a projection: its slicer's full ``out`` size, else ``out_features``."""
    sl = slicer_for(m)
    if sl is not None and "out" in sl.roles:
        return sl.full(m, "out")
    return getattr(m, "out_features", None)


def _own_qkv(m: nn.Module) -> bool:
    """Whether ``m``'s own children are q/k/v projections (separate or fused) beside an output projection."""
    names = {n for n, _ in m.named_children()}
    return (separate_qkv(names) or fused_qkv(names)) is not None and any(n in names for n in O_NAMES)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def _in_features(m: nn.Module) -> int | None:
    sl = slicer_for(m)
    if sl is not None and "inp" in sl.roles:
        return sl.full(m, "inp")
    return getattr(m, "in_features", None)


def _dotted(attrs: dict[str, Any], name: str) -> Any:
    """``attrs[a]`` for ``a``, ``getattr(attrs[a], b)`` for ``a.b`` (one level)."""
    first, _, rest = name.partition(".")
    v = attrs.get(first)
    return getattr(v, rest, None) if rest else v


def _in_child(m: nn.Module, name: str) -> tuple[str, str, Any]:
    """``(child path, attribute, value)`` of ``name``: an attribute of ``m``, of a child module of it
    (``"attention.n_heads"``, any depth) or a field of an attribute object (``"config.n_head"``, one level)."""
    parts, sub = name.split("."), m
    i = 0
    while i < len(parts) - 1 and isinstance(sub._modules.get(parts[i]), nn.Module):
        sub, i = sub._modules[parts[i]], i + 1
    rest = ".".join(parts[i:])
    return ".".join(parts[:i]), rest, _dotted(vars(sub), rest)


def _child(m: nn.Module, name: str) -> nn.Module | None:
    try:
        return m.get_submodule(name)
    except AttributeError:
        return None



def _relative_paths(name: str, option: str, value: Any, what: str, example: str) -> tuple[str, ...] | None:
    """``per_head=`` / ``whole=`` as a tuple of relative paths (a string is one), each once; None as given."""
    if value is None:
        return None
    if not isinstance(value, (str, tuple, list)):
        raise PatternError(f"Heads {name!r}: {option}= takes the relative paths of {what} of each attention (e.g. "
                           f"{example!r}): a string or a list of strings, got {value!r}")
    value = (value,) if isinstance(value, str) else tuple(value)
    bad = [n for n in value if not isinstance(n, str) or not n or n.startswith(".") or n.endswith(".")]
    if bad or not value or len(set(value)) != len(value):
        raise PatternError(f"Heads {name!r}: {option}= takes the relative paths of {what} of each attention (e.g. "
                           f"{example!r}), each once, got {list(value)}")
    return value


def _holds(m: nn.Module, name: str) -> bool:
    """Whether ``name`` is a descendant module of ``m`` or a parameter / buffer of it or of a descendant
    (``"self.logit_scale"``)."""
    owner, _, leaf = name.rpartition(".")
    c = _child(m, owner) if owner else m
    return _child(m, name) not in (None, m) or (c is not None and (leaf in c._parameters or leaf in c._buffers))


def _bottleneck_pairs(m: nn.Module, width: int) -> set[str]:
    """Relative paths of the ``nn.Linear`` descendants of ``m`` that meet a sibling in a hidden width of ``width``:
    one with ``out_features == width`` and, under the same parent and declared after it (an adapter's down
    projection, then its up one; a Sequential in its order), one with ``in_features == width``. The other order is
    no bottleneck where it runs so: Swin-v2's position-bias MLP ``Linear(2, 512)``, ReLU, ``Linear(512, heads)``
    with 2 heads takes the 2 coordinates first and gives one value per head last. Which order a module of one's own
    runs them in is not known from its declaration: such a pair is refused, naming both (``whole=``)."""
    makes: dict[str, list[tuple[int, str]]] = {}
    takes: dict[str, list[tuple[int, str]]] = {}
    for i, (n, c) in enumerate(m.named_modules(remove_duplicate=False)):
        if n and isinstance(c, nn.Linear):
            parent = n.rpartition(".")[0]
            if c.out_features == width != c.in_features:  # (a Linear(heads, heads) mixes heads: talking-heads)
                makes.setdefault(parent, []).append((i, n))
            if c.in_features == width != c.out_features:
                takes.setdefault(parent, []).append((i, n))
    pairs = set()
    for parent in makes.keys() & takes.keys():
        pairs |= {n for i, n in makes[parent] if any(j > i for j, _ in takes[parent])}
        pairs |= {n for j, n in takes[parent] if any(i < j for i, _ in makes[parent])}
    return pairs


def _reversed_pairs(m: nn.Module, width: int) -> dict[str, list[str]]:
    """The sibling Linears of ``m`` that meet in a width of ``width`` in the other order (the one taking it declared
    before the one giving it), by each one's relative path: the pair's paths, to name both in a message."""
    out: dict[str, list[str]] = {}
    kids: dict[str, list[str]] = {}
    for n, c in m.named_modules(remove_duplicate=False):
        if n and isinstance(c, nn.Linear) and width in (c.in_features, c.out_features) and \
                c.in_features != c.out_features:
            kids.setdefault(n.rpartition(".")[0], []).append(n)
    done = _bottleneck_pairs(m, width)
    for names in kids.values():
        left = [n for n in names if n not in done]
        if len(left) > 1:
            out.update({n: left for n in left})
    return out


def separate_qkv(children: set[str]) -> tuple[str, ...] | None:
    """The names of separate q, k and v projections among a module's ``children`` (by convention), or None."""
    return next((t for t in QKV_NAMES if set(t) <= children), None)


def fused_qkv(children: set[str]) -> str | None:
    """The name of a fused q/k/v projection among a module's ``children`` (by convention), or None."""
    return next((f for f in FUSED_NAMES if f in children), None)


def _at(path: str) -> str:
    """Where a module sits, for messages: its path, or the model's root."""
    return repr(path) if path else "the model's root"

class Heads(Dimension):
    """Nested attention heads of the matched attention modules.

    ``attn`` matches attention modules. For ``nn.MultiheadAttention`` the packed
    projection is sliced. For any other module, the q/k/v projections (or one
    fused ``qkv``) and the output projection ``o`` are found among common child
    names or given explicitly; their outputs / inputs are sliced in whole
    heads. Integer attributes the module's ``forward`` reads (``num_heads``,
    ``n_head``, ``all_head_size``, ... or ``count_attrs``, which may name a
    field of an attribute object, e.g. ``"config.num_attention_heads"``: reads of ``m.config`` under a
    smaller sub-model are then copies holding the active count, so a write through them is lost: write the
    object itself; or an attribute of a child module, ``"attention.n_heads"``) report the active count, as do
    those of children without weights (an attention core that keeps its own head count). Key/value
    projections with fewer heads (grouped-query attention) keep their ratio: every size must be a multiple of
    the group.

    A fused ``qkv`` projection needs its row layout: ``layout="stacked"``
    (``[q; k; v]`` blocks, k and v with fewer heads under grouped-query
    attention) or ``"interleaved"`` (per key/value head ``[q.., k, v]``, e.g.
    GPT-NeoX ``query_key_value``). Names whose convention is stacked (``qkv``,
    ``c_attn``, ``to_qkv``, ``Wqkv``) need none; any other fused name without
    ``layout`` is refused. The head size is read from ``o``'s input width.
    A child ``relative_attention_bias`` embedding (T5) is sliced per head. ``per_head`` names other
    descendants of each attention module (relative paths, e.g. ``"relative_position_bias"``) that hold one
    unit per head: their slicer's ``out`` role is cut with the heads, one unit per head (a per-head
    relative position bias table, a head-wise gate; docs/heads.md shows a slicer for one). Any other tensor of
    the attention or its descendants with an axis as long as the head count is refused at wrap, as it would stay
    full-size under fewer heads, unless ``whole`` names it (relative paths of descendants or own tensors that are
    not per-head: a memory-token table or an adapter whose length happens to equal the head count; or one tensor of
    a descendant, ``"child.param"``). Not read:
    the projections and pairs of sibling Linears that meet in such a width (a low-rank adapter).

    >>> import sortednet as sn
    >>> sn.Heads("heads", [2, 4], attn="blocks.*.attn")
    Heads('heads', [2, 4], attn=['blocks.*.attn'])
    """

    kind = "heads"

    def __init__(self, name: str, sizes: Sequence[int], *, attn: str | Iterable[str],
                 qkv: str | Sequence[str] | None = None, o: str | None = None,
                 count_attrs: str | Sequence[str] | None = None, layout: str | None = None,
                 per_head: str | Sequence[str] | None = None, whole: str | Sequence[str] | None = None) -> None:
        super().__init__(name, sizes)
        if layout is not None and layout not in LAYOUTS:
            raise PatternError(f"Heads {name!r}: layout={layout!r} is not one of {list(LAYOUTS)}")
        self.attn = _as_patterns(attn, f"Heads {name!r} attn")
        if not self.attn:
            raise PatternError(f"Heads {name!r}: attn= must name attention modules")
        if qkv is not None and not isinstance(qkv, str):
            if not isinstance(qkv, (tuple, list)) or not all(isinstance(n, str) and n for n in qkv):
                raise PatternError(f"Heads {name!r}: qkv= takes 3 child names (q, k, v) or one fused name, got "
                                   f"{qkv!r}")
            qkv = tuple(qkv)
            if len(qkv) != 3:
                raise PatternError(f"Heads {name!r}: qkv= needs 3 names (q, k, v) or one fused name, got {list(qkv)}")
            if len(set(qkv)) != 3:
                raise PatternError(
                    f"Heads {name!r}: qkv={list(qkv)} names one projection for two of q, k, v: a fused key/value "
                    "(to_kv, kv_proj) or query/key projection is not a layout Heads can slice; split it into two "
                    "Linears (copy its weight rows), or give the attention a slicer of yours "
                    "(docs/custom_slicers.md)")
        if qkv is not None and not qkv:
            raise PatternError(f"Heads {name!r}: qkv= takes 3 child names (q, k, v) or one fused name, got ''")
        if o is not None and (not isinstance(o, str) or not o):
            raise PatternError(f"Heads {name!r}: o= takes the output projection's child name, got {o!r}")
        if isinstance(count_attrs, str):  # (one attribute's name)
            count_attrs = (count_attrs,)
        if count_attrs is not None and (not isinstance(count_attrs, (tuple, list)) or not all(
                isinstance(n, str) and n for n in count_attrs)):
            raise PatternError(f"Heads {name!r}: count_attrs= takes the names of the attention's int attributes that "
                               f"count heads (a string or a list of strings), got {count_attrs!r}")
        self.qkv = qkv
        self.o = o
        self.count_attrs = tuple(count_attrs) if count_attrs is not None else None
        self.layout = layout
        per_head = _relative_paths(name, "per_head", per_head, "child modules", "relative_position_bias")
        whole = _relative_paths(name, "whole", whole, "child modules or tensors", "adapter")
        both = sorted({w for w in whole or () for p in per_head or () if w == p or w.startswith(p + ".")
                       or p.startswith(w + ".")})
        if both:
            raise PatternError(f"Heads {name!r}: {both} named (or held) in both per_head= (cut with the heads) "
                               "and whole= (left whole)")
        self.per_head, self.whole = per_head, whole

    def spec(self) -> dict[str, Any]:
        qkv = list(self.qkv) if isinstance(self.qkv, tuple) else self.qkv
        return {**super().spec(), "attn": list(self.attn), "qkv": qkv, "o": self.o,
                "count_attrs": list(self.count_attrs) if self.count_attrs is not None else None,
                "layout": self.layout, **({"per_head": list(self.per_head)} if self.per_head is not None else {}),
                **({"whole": list(self.whole)} if self.whole is not None else {})}

    def plan(self, modules: dict[str, nn.Module]) -> list[Target]:
        out: list[Target] = []
        held = Counter(id(c) for mod in modules.values() for c in mod._modules.values() if c is not None)
        shared = frozenset(i for i, n in held.items() if n > 1)  # (children with more than one parent)
        for pat in self.attn:
            paths = match(pat, modules, f"Heads {self.name!r} attn")
            for path in paths:  # (the others matched: a refusal says whether they differ)
                out += self._plan_one(path, modules[path], pat, [modules[p] for p in paths if p != path], shared)
        return out

    def _err(self, path: str, msg: str) -> PatternError:
        return PatternError(f"Heads {self.name!r} (sizes {list(self.sizes)}) at {_at(path)}: {msg}")

    def _plan_one(self, path: str, m: nn.Module, pat: str, others: Sequence[nn.Module] = (),
                  shared: frozenset[int] = frozenset()) -> list[Target]:
        H = self.full
        if isinstance(m, nn.MultiheadAttention):
            given = [k for k, v in (("qkv", self.qkv), ("o", self.o), ("count_attrs", self.count_attrs),
                                    ("layout", self.layout), ("per_head", self.per_head), ("whole", self.whole))
                     if v is not None]
            if given:  # (its packed in_proj_weight, out_proj and num_heads are known: the options would be ignored)
                raise self._err(path, f"an nn.MultiheadAttention takes no {given}: its packed projection, "
                                      "out_proj and num_heads are sliced as they are; leave them out")
            if m.num_heads != H:
                raise SizeError(f"Heads {self.name!r}: largest size {H} != {path}.num_heads={m.num_heads}")
            d = m.head_dim
            return [Target(path, "heads", Binding(self, unit=d, chunks=3), pat),
                    Target(_join(path, "out_proj"), "inp", Binding(self, unit=d), pat)]
        names = {n for n, _ in m.named_children()}
        qkv = self.qkv
        if qkv is None:
            qkv = separate_qkv(names) or fused_qkv(names)
            if qkv is None:
                inner = [n for n, c in m.named_modules() if n and (isinstance(c, nn.MultiheadAttention) or
                                                                     _own_qkv(c))]
                if inner:  # (a layer or block named instead of the attention in it)
                    raise self._err(path, f"{type(m).__name__} is not an attention itself: it holds one at "
                                          f"{[_join(path, n) for n in inner[:3]]}; name that module, "
                                          f"attn={_join(pat, inner[0])!r}")
                raise self._err(path, f"no q/k/v projections found among children {sorted(names)}; "
                                      "pass qkv=('q', 'k', 'v') or qkv='fused_name', layout='stacked' (or "
                                      "'interleaved')")
        o = self.o or next((n for n in O_NAMES if n in names and (isinstance(qkv, str) or n not in qkv)), None)
        if o is None:
            raise self._err(path, f"no output projection found among children {sorted(names)}; pass o='name'")
        projections = [qkv] if isinstance(qkv, str) else list(qkv)
        for n in (*projections, o):
            if _child(m, n) is None:
                differ = any(_child(other, n) is not None for other in others)
                raise self._err(path, f"has no child {n!r} (children: {sorted(names)})" + (
                    f": the attentions that {pat!r} matches differ (others have {n!r}: a layer of another kind, "
                    "keys and values shared with an earlier layer, a linear attention), and a Heads dimension needs "
                    "the same q/k/v/o projections in each; match only those that have them, or nest without heads"
                    if differ else ""))
        if o in projections:
            raise self._err(path, f"o={o!r} names the {'fused q/k/v' if isinstance(qkv, str) else 'q/k/v'} "
                                  f"projection {o!r} (qkv={qkv!r}): o= is the projection that reads the heads' "
                                  f"outputs (children: {sorted(names)})")
        box = _child(m, o)
        if _in_features(box) is None and isinstance(box, nn.Sequential) and len(box) \
                and _in_features(box[0]) is not None:  # (vit-pytorch: to_out = Sequential(Linear, Dropout))
            if self.o is not None:
                raise self._err(path, f"the output projection {o!r} is an nn.Sequential; name the layer in it "
                                      f"that reads the heads, o={o + '.0'!r}")
            o = f"{o}.0"
        elif _in_features(box) is None and isinstance(box, nn.Sequential):  # (Sequential(Rearrange(...), Linear))
            inner = next((i for i, c in enumerate(box) if _in_features(c) is not None), None)
            held = [type(c).__name__ for c in list(box)[:inner or 0] if any(True for _ in c.parameters())]
            if inner is not None and held:
                raise self._err(path, f"the output projection {o!r} is an nn.Sequential whose layers before its "
                                      f"{type(box[inner]).__name__} ({held}) hold parameters over the heads' "
                                      "outputs, which Heads cannot cut: leave this attention out of the Heads "
                                      "dimension, or give it a slicer of yours (docs/custom_slicers.md)")
            if inner is not None:
                raise self._err(path, f"the output projection {o!r} is an nn.Sequential whose layer {inner} "
                                      f"({type(box[inner]).__name__}) reads the heads after "
                                      f"{[type(c).__name__ for c in box][:inner]}: name that layer, "
                                      f"o={f'{o}.{inner}'!r}")
        q = _child(m, projections[0])
        q_out = _out_features(q)
        if not isinstance(q_out, int):
            raise self._err(path, f"projection {projections[0]!r} ({type(q).__name__}) has no out_features")
        if isinstance(qkv, str):
            d, group, b = self._fused(path, qkv, q_out, _in_features(_child(m, o)))
            targets = [Target(_join(path, qkv), "out", b, pat)]
        else:
            if q_out % H:
                raise SizeError(f"Heads {self.name!r} at {_at(path)}: {projections[0]}.out_features={q_out} "
                                f"is not divisible into {H} heads")
            d, group = q_out // H, 1
            targets = [Target(_join(path, projections[0]), "out", Binding(self, unit=d), pat)]
        mqa = False
        if len(projections) == 3:
            k_out, v_out = (_out_features(_child(m, n)) for n in projections[1:])
            if k_out != v_out:  # (grouped-query attention narrows k and v alike: this is another head width)
                raise SizeError(f"Heads {self.name!r} at {_at(path)}: {projections[1]}.out_features={k_out} but "
                                f"{projections[2]}.out_features={v_out}: the value heads are another width than "
                                "the key heads, a layout Heads does not slice (its heads have one width); nest "
                                "other dimensions of this attention, or give it a slicer of yours "
                                "(docs/custom_slicers.md)")
        for n in projections[1:]:
            kv_out = _out_features(_child(m, n))
            if kv_out == q_out:
                targets.append(Target(_join(path, n), "out", Binding(self, unit=d), pat))
                continue
            if kv_out == d and H > 1:  # multi-query: one key/value head that every query head reads, whatever
                group, mqa = H, True  # their number: k and v stay whole
                continue
            if kv_out % d or H % (kv_out // d):
                raise SizeError(f"Heads {self.name!r} at {_at(path)}: {n}.out_features={kv_out} is not a whole "
                                f"number of {d}-wide heads dividing {H}")
            group = H // (kv_out // d)
            self._check_group(path, group, f" (the largest size {H} makes heads {d} wide: "
                                           f"{projections[0]}.out_features={q_out} / {H}; sizes count query heads)")
            targets.append(Target(_join(path, n), "out", Binding(self, unit=d, div=group), pat))
        targets.append(Target(_join(path, o), "inp", Binding(self, unit=d), pat))
        self._check_whole(path, m, (*projections, o), others)
        self._refuse_per_head_tensors(path, m, d)
        targets += self._bias_targets(path, m, pat)
        targets += self._per_head_targets(path, m, pat, (*projections, o), others)
        self._refuse_per_head_children(path, m, d, targets, (*projections, o))
        targets += self._attr_targets(path, m, d, group, pat, mqa, (*projections, o.split(".")[0]), shared)
        return targets

    def _check_group(self, path: str, group: int, why: str = "") -> None:
        bad = [s for s in self.sizes if s % group]
        if bad:
            raise SizeError(f"Heads {self.name!r} at {_at(path)}: grouped-query attention with {self.full // group} "
                            f"key/value heads needs sizes that are multiples of {group}; bad: {bad}{why}")

    def _fused(self, path: str, name: str, rows: int, o_in: int | None) -> tuple[int, int, Binding]:
        """(head size, query heads per key/value head, binding) of a fused q/k/v projection."""
        H = self.full
        layout = self.layout or ("stacked" if name in STACKED_NAMES else None)
        if layout is None:
            raise self._err(path, f"cannot infer the row layout of the fused projection {name!r}: state it, "
                                  f"e.g. sn.Heads(..., qkv={name!r}, layout='interleaved') for per-head [q_h, k_h, v_h]"
                                  " rows (GPT-NeoX / Falcon query_key_value) or layout='stacked' for [q; k; v] blocks")
        if not isinstance(o_in, int):
            raise self._err(path, f"the output projection has no input width (in_features) to derive the head "
                                  f"size of the fused projection {name!r} from: name the Linear that reads the heads "
                                  "with o=")
        if o_in % H:
            raise self._err(path, f"the output projection's input width {o_in} is not a whole number of {H} heads")
        d = o_in // H
        kv2 = rows // d - H if rows % d == 0 else -1
        if kv2 <= 0 or kv2 % 2 or H % (kv2 // 2):
            raise SizeError(f"Heads {self.name!r} at {_at(path)}: {name}.out_features={rows} is not q ({H}x{d}) plus "
                            f"k and v of a whole number of {d}-wide heads dividing {H}")
        group = H // (kv2 // 2)
        if group == H > 1 and self.sizes[0] < H:
            raise SizeError(f"Heads {self.name!r} at {_at(path)}: {name} is a fused multi-query projection (the {H} "
                            f"query heads and ONE key/value head that all of them read): sizes below the full {H} "
                            f"are not supported there (bad: {[s for s in self.sizes if s < H]}); keep {H} heads "
                            "and nest other dimensions")
        self._check_group(path, group)
        if layout == "interleaved":  # one block per key/value head: [q x group, k, v]
            return d, group, Binding(self, unit=(group + 2) * d, div=group)
        if group == 1:  # thirds [q; k; v]
            return d, group, Binding(self, unit=d, chunks=3)
        return d, group, Binding(self, unit=d, parts=(1, group, group))

    def _refuse_per_head_tensors(self, path: str, m: nn.Module, d: int) -> None:
        """A parameter or buffer of the attention module itself whose first non-singleton axis is as long as the
        head count (a per-head temperature / logit scale, ALiBi slopes, a head-wise gate), or a parameter whose
        last axis is (Swin's relative position bias table of shape (positions, heads)), would have to be sliced
        with the heads, which Heads does not know how to do: refused, named, rather than left full-size (the first
        smaller forward would fail, and export / cost would keep it whole). Buffers and 1-D parameters are not
        decided when the head count equals the head size or half of it (rotary ``inv_freq`` and cos / sin caches,
        per-dimension scales have those lengths): ``check`` measures such a module."""
        H = self.full
        exempt = H in (d, d // 2)
        for kind, store in (("parameter", m._parameters), ("buffer", m._buffers)):
            for n, t in store.items():
                if t is None or t.dim() == 0 or (exempt and (kind == "buffer" or t.dim() == 1)) or n in (
                        self.whole or ()):
                    continue  # (rotary caches, masks: buffers of those lengths)
                lead = next((s for s in t.shape if s != 1), None)
                last = kind == "parameter" and t.dim() >= 2 and t.shape[-1] == H and not exempt
                if lead == H or last:  # (a trained table with the heads last: Swin's (positions, heads))
                    raise self._err(path, f"its {kind} {n!r} of shape {tuple(t.shape)} looks per-head (an axis of "
                                          f"{H}, the head count); Heads cannot slice it with the heads. Keep it in a "
                                          "child module with a slicer of its own and name that child in "
                                          "per_head= (docs/heads.md), or slice this attention as a Width of its "
                                          f"head size; if it is not per-head, name it in whole={n!r}")

    def _bias_targets(self, path: str, m: nn.Module, pat: str) -> list[Target]:
        """Per-head relative position bias tables (T5) are sliced with the heads; other per-head tables refused."""
        out = []
        for n, c in m.named_children():
            if isinstance(c, nn.Embedding) and c.embedding_dim == self.full and n not in (self.per_head or ()) \
                    and n not in (self.whole or ()):
                if n not in BIAS_NAMES:
                    raise self._err(path, f"child {n!r} is an embedding of width {self.full} (one column per head?) "
                                          f"that Heads slices only under the names {list(BIAS_NAMES)} or when named "
                                          f"in per_head= (per_head={n!r}: its columns are cut with the heads)")
                out.append(Target(_join(path, n), "out", Binding(self), pat))
        return out

    def _per_head_targets(self, path: str, m: nn.Module, pat: str, projections: Sequence[str],
                          others: Sequence[nn.Module] = ()) -> list[Target]:
        """The ``per_head`` descendants: their ``out`` role, one unit per head. One that other matched attentions
        hold and this one does not (T5's bias, held by the first layer only) is skipped here."""
        out = []
        for n in self.per_head or ():
            c = _child(m, n)
            if c is m:
                c = None
            if c is None and any(_child(o, n) not in (None, o) for o in others):
                continue
            if c is None:
                raise self._err(path, f"per_head={n!r} names no child module of it, nor of the other attentions "
                                      f"matched (children: {sorted(k for k, _ in m.named_children())})")
            hit = [p for p in projections if n == p or n.startswith(p + ".") or p.startswith(n + ".")]
            if hit:
                raise self._err(path, f"per_head={n!r} is (or holds, or lies in) the projection {hit[0]!r}, which "
                                      "Heads slices by itself: per_head= names the other modules with one unit per "
                                      "head")
            out.append(Target(_join(path, n), "out", Binding(self), pat))
        return out

    def _check_whole(self, path: str, m: nn.Module, projections: Sequence[str], others: Sequence[nn.Module]) -> None:
        """Each ``whole`` name is a descendant module or an own parameter / buffer of this attention (or of another
        matched one), and not a projection, which Heads slices."""
        for n in self.whole or ():
            hit = [p for p in projections if n == p or n.startswith(p + ".") or p.startswith(n + ".")]
            if hit:
                raise self._err(path, f"whole={n!r} is (or holds, or lies in) the projection {hit[0]!r}, which Heads "
                                      "slices: whole= names the other modules and tensors of the attention that "
                                      "are not per-head")
            c = _child(m, n)
            if n in BIAS_NAMES and isinstance(c, nn.Embedding) and c.embedding_dim == self.full:
                raise self._err(path, f"whole={n!r} names the per-head relative position bias table, which Heads "
                                      "slices with the heads (one column per head): it cannot stay whole")
            if not any(_holds(a, n) for a in (m, *others)):
                raise self._err(path, f"whole={n!r} names no child module or own parameter / buffer of it, nor of "
                                      f"the other attentions matched (children: "
                                      f"{sorted(k for k, _ in m.named_children())})")

    def _refuse_per_head_children(self, path: str, m: nn.Module, d: int, targets: Sequence[Target],
                                  projections: Sequence[str] = ()) -> None:
        """A weight matrix or table (2-D) of a descendant that Heads leaves whole but that has an axis as
        long as the head count, first (a ``Linear(hidden, heads)`` gate, Swin-v2's position-bias MLP) or last
        (HF Swin's ``relative_position_bias_table`` of shape (positions, heads), held by a child), would stay
        full-size under fewer heads: refused, naming the module and the tensor, ``per_head=`` and ``whole=``.
        Not read: the projections and what they hold (a multi-query k / v left whole, a LoRA inside one), the
        modules named in ``whole``, and a pair of sibling Linears meeting in a width of the head count (a
        low-rank adapter ``Linear(E, r)`` then ``Linear(r, E)`` with ``r`` equal to it: a width inside the pair,
        not one unit per head)."""
        H = self.full
        if H in (d, d // 2) or H < 2:
            return  # (a head count equal to the head size or half of it decides nothing: a (d, d) matrix, learned
        # rotary frequencies (1, d / 2): check measures such a module)
        bound = {t.path for t in targets if not t.role.startswith("attr:")}
        skip = [_join(path, p) for p in (*projections, *(self.whole or ()))]
        pair = _bottleneck_pairs(m, H)
        for n, c in m.named_modules(remove_duplicate=False):
            full = _join(path, n)
            if not n or n in pair or any(full == b or full.startswith(b + ".") for b in (*bound, *skip)):
                continue
            for pn, t in c._parameters.items():
                if t is None or t.dim() == 0 or _join(n, pn) in (self.whole or ()):
                    continue
                lead = next((s for s in t.shape if s != 1), None)
                if t.dim() != 2 and not (t.dim() > 1 and t.numel() == H):
                    continue  # (matrices and tables, and a vector of one value per head in any layout, (heads, 1,
                    # 1) a logit scale: a convolution's kernel axes may be as long as the head count, and a 1-D
                    # weight (a norm's) of that length is a width)
                if lead == H or t.shape[-1] == H:
                    both = _reversed_pairs(m, H).get(n)
                    if both:
                        raise self._err(path, f"its children {both} (Linears) meet in a width of {H}, the head "
                                              "count, the one taking it declared first: Swin-v2's position-bias MLP "
                                              "(one value per head, last), or a low-rank adapter declared up before "
                                              "down. If they are an adapter, not per-head, pass "
                                              f"whole={both} to leave them whole; else give the per-head one a "
                                              "slicer and name it in per_head= (docs/heads.md)")
                    raise self._err(path, f"its child {n!r} ({type(c).__name__}) holds the parameter {pn!r} of "
                                          f"shape {tuple(t.shape)}, which looks per-head (an axis of {H}, the head "
                                          "count) and Heads would leave whole. If it is, give "
                                          f"{type(c).__name__} a slicer whose 'out' role cuts that axis and pass "
                                          f"per_head={n!r} to an sn.Heads of yours (sn.wrap; from_transformers "
                                          "takes no per_head=, docs/heads.md); if it is not per-head, pass "
                                          f"whole={n if not c._modules else _join(n, pn)!r} to leave it whole")

    def _attr_targets(self, path: str, m: nn.Module, d: int, group: int, pat: str, mqa: bool = False,
                      projections: Sequence[str] = (), shared: frozenset[int] = frozenset()) -> list[Target]:
        """Integer attributes that follow the head count (``num_heads``, ``all_head_size``, key/value heads);
        multi-query (``mqa``): the key/value head count stays 1 and the query heads per key/value head
        (``num_key_value_groups``) follow the head count."""
        H = self.full
        attrs = vars(m)
        if self.count_attrs is not None:
            got = {a: _in_child(m, a) for a in self.count_attrs}
            missing = [a for a, (_, _, v) in got.items() if type(v) is not int]
            if missing:
                raise self._err(path, f"count_attrs {missing} are not int attributes of the module, of a child "
                                      "module of it (as 'attention.n_heads') or int fields of an attribute "
                                      "object (as 'config.num_attention_heads')")
            sliced = [a for a, (sub, _, _) in got.items() if sub and sub.split(".")[0] in projections]
            if sliced:
                raise self._err(path, f"count_attrs {sliced} name attributes of the projections {projections}, "
                                      "whose sizes follow the heads already; name the attention's own counts")
            return [self._attr_target(_join(path, sub), a, v, H, d, group, pat) for sub, a, v in got.values()]
        else:
            holding = {p.rsplit(".", i)[0] for p in projections for i in range(1, p.count(".") + 1)}
            for sub, c in [("", m), *((h, _child(m, h)) for h in sorted(holding))]:
                if c is None or (sub and id(c) in shared):
                    continue
                wrong = {a: v for a, v in vars(c).items() if a in COUNT_ATTRS and type(v) is int and v != H}
                if wrong:  # the module's own head count (or that of the child holding its projections, which
                    a, v = next(iter(wrong.items()))  # runs them) disagrees: slicing would cut across its heads
                    at = f"{path!r} ({type(m).__name__})" if not sub else \
                        f"{path!r}: its child {sub!r} ({type(c).__name__}), which holds the projections,"
                    raise SizeError(f"Heads {self.name!r} at {at} has its own head count {a}={v}, not the largest "
                                    f"size {H} (head size {d} from the projections); slices would cut across its "
                                    f"heads. Use sizes up to {v}, or name the attributes with count_attrs=")
            own = {a: v for a, v in attrs.items() if a in HEAD_SIZE_ATTRS and type(v) is int and v != d
                   and 0 < v < H * d and H * d % v == 0}  # (one of the whole width: a total, as Lxmert's)
            if own:  # a module that keeps only its head size, as Llama's: other declared heads would split its own
                a, v = next(iter(own.items()))
                raise SizeError(f"Heads {self.name!r} at {_at(path)} ({type(m).__name__}): the module's own head size "
                                f"{a}={v} differs from the head size {d} that the largest size {H} gives its "
                                f"{H * d} query features, so a sub-model would count other heads than the module "
                                f"runs. The largest size must be the module's own head count (its query projection "
                                f"holding queries alone); if {a} is not the size of one head as Heads cuts them (a "
                                "part of a head: differential attention's half heads), name the module's "
                                "head-count attributes with count_attrs=[...] (() for none): the head-size names "
                                "are then not read")
        def counts(attrs: dict[str, Any]) -> dict[str, int]:
            return {a: v for a, v in attrs.items() if type(v) is int and (
                (a in COUNT_ATTRS and v == H) or (a in SIZE_ATTRS and v == H * d)
                or (a in KV_ATTRS and v == H // group and not mqa) or (mqa and a in GROUP_ATTRS and v == H))}
        out = [self._attr_target(path, a, v, H, d, group, pat) for a, v in counts(attrs).items()]
        holders = {p.rsplit(".", i)[0] for p in projections for i in range(1, p.count(".") + 1)}
        for sub, c in m.named_modules(prefix=""):  # a child holding the projections (MobileViT's / BERT's
            if sub in holders and id(c) not in shared:  # self-attention under their attention block) runs them
                out += [self._attr_target(_join(path, sub), a, v, H, d, group, pat)  # by its own counts too
                        for a, v in counts(vars(c)).items()]
                continue
            # an attention core without weights of its own
            if not sub or sub.split(".")[0] in projections or any(True for _ in c.parameters()) or id(c) in shared:
                continue  # (guided diffusion's QKVAttention(n_heads)) reads the head count the attention gives it:
            # it follows it too; not one shared with other modules (their head counts may be another dimension's)
            # (another count there may be the child's own business: check names it if the heads come out wrong)
            out += [self._attr_target(_join(path, sub), a, v, H, d, group, pat) for a, v in counts(vars(c)).items()]
        return out

    def _attr_target(self, path: str, a: str, v: int, H: int, d: int, group: int, pat: str) -> Target:
        if v == H:
            b = Binding(self)
        elif v == H * d:
            b = Binding(self, unit=d)
        elif v == H // group:
            b = Binding(self, div=group)
        else:
            raise self._err(path, f"attribute {a}={v} is neither the head count {H} nor {H}x{d}")
        return Target(path, f"attr:{a}", b, pat)

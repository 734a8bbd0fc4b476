"""Heads: nested attention heads, sliced in whole heads."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from .dims import Binding, Dimension, Target, _as_patterns, match
from .errors import PatternError, SizeError

__all__ = ["Heads"]

COUNT_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "nhead", "heads")
SIZE_ATTRS = ("all_head_size", "inner_dim", "attn_dim", "inner_size")
QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"),
             ("wq", "wk", "wv"), ("to_q", "to_k", "to_v"), ("q_lin", "k_lin", "v_lin"))
FUSED_NAMES = ("qkv", "qkv_proj", "to_qkv", "Wqkv", "c_attn")
O_NAMES = ("o_proj", "out_proj", "o", "wo", "out", "proj", "to_out", "c_proj", "dense", "out_lin")


def _out_features(m: nn.Module) -> int | None:
    """Output features of a projection: its slicer's full ``out`` size, else ``out_features``."""
    from .slicers import slicer_for  # local import: slicers import dims, which re-exports Heads

    sl = slicer_for(m)
    if sl is not None and "out" in sl.roles:
        return sl.full(m, "out")
    return getattr(m, "out_features", None)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _child(m: nn.Module, name: str) -> nn.Module | None:
    try:
        return m.get_submodule(name)
    except AttributeError:
        return None


class Heads(Dimension):
    """Nested attention heads of the matched attention modules.

    ``attn`` matches attention modules. For ``nn.MultiheadAttention`` the packed
    projection is sliced. For any other module, the q/k/v projections (or one
    fused ``qkv``) and the output projection ``o`` are found among common child
    names or given explicitly; their outputs / inputs are sliced in whole
    heads. Integer attributes the module's ``forward`` reads (``num_heads``,
    ``n_head``, ``all_head_size``, ... or ``count_attrs``) report the active
    count. Key/value projections with fewer heads (grouped-query attention)
    keep their ratio: every size must be a multiple of the group.

    >>> import sortednet as sn
    >>> sn.Heads("heads", [2, 4], attn="blocks.*.attn")
    Heads('heads', [2, 4], attn=['blocks.*.attn'])
    """

    kind = "heads"

    def __init__(self, name: str, sizes: Sequence[int], *, attn: str | Iterable[str],
                 qkv: str | Sequence[str] | None = None, o: str | None = None,
                 count_attrs: Sequence[str] | None = None) -> None:
        super().__init__(name, sizes)
        self.attn = _as_patterns(attn, f"Heads {name!r} attn")
        if not self.attn:
            raise PatternError(f"Heads {name!r}: attn= must name attention modules")
        if qkv is not None and not isinstance(qkv, str):
            qkv = tuple(qkv)
            if len(qkv) != 3:
                raise PatternError(f"Heads {name!r}: qkv= needs 3 names (q, k, v) or one fused name, got {list(qkv)}")
        self.qkv = qkv
        self.o = o
        self.count_attrs = tuple(count_attrs) if count_attrs is not None else None

    def spec(self) -> dict[str, Any]:
        qkv = list(self.qkv) if isinstance(self.qkv, tuple) else self.qkv
        return {**super().spec(), "attn": list(self.attn), "qkv": qkv, "o": self.o,
                "count_attrs": list(self.count_attrs) if self.count_attrs is not None else None}

    def plan(self, modules: dict[str, nn.Module]) -> list[Target]:
        out: list[Target] = []
        for pat in self.attn:
            for path in match(pat, modules, f"Heads {self.name!r} attn"):
                out += self._plan_one(path, modules[path], pat)
        return out

    def _err(self, path: str, msg: str) -> PatternError:
        return PatternError(f"Heads {self.name!r} (sizes {list(self.sizes)}) at {path!r}: {msg}")

    def _plan_one(self, path: str, m: nn.Module, pat: str) -> list[Target]:
        H = self.full
        if isinstance(m, nn.MultiheadAttention):
            if m.num_heads != H:
                raise SizeError(f"Heads {self.name!r}: largest size {H} != {path}.num_heads={m.num_heads}")
            d = m.head_dim
            return [Target(path, "heads", Binding(self, unit=d, chunks=3), pat),
                    Target(_join(path, "out_proj"), "inp", Binding(self, unit=d), pat)]
        names = {n for n, _ in m.named_children()}
        qkv = self.qkv
        if qkv is None:
            qkv = next((t for t in QKV_NAMES if set(t) <= names), None) \
                or next((f for f in FUSED_NAMES if f in names), None)
            if qkv is None:
                raise self._err(path, f"no q/k/v projections found among children {sorted(names)}; "
                                      "pass qkv=('q', 'k', 'v') or qkv='fused_name'")
        o = self.o or next((n for n in O_NAMES if n in names and (isinstance(qkv, str) or n not in qkv)), None)
        if o is None:
            raise self._err(path, f"no output projection found among children {sorted(names)}; pass o='name'")
        projections = [qkv] if isinstance(qkv, str) else list(qkv)
        for n in (*projections, o):
            if _child(m, n) is None:
                raise self._err(path, f"has no child {n!r} (children: {sorted(names)})")
        q = _child(m, projections[0])
        q_out = _out_features(q)
        if not isinstance(q_out, int):
            raise self._err(path, f"projection {projections[0]!r} ({type(q).__name__}) has no out_features")
        chunks = 3 if isinstance(qkv, str) else 1
        if q_out % (H * chunks):
            raise SizeError(f"Heads {self.name!r} at {path!r}: {projections[0]}.out_features={q_out} "
                            f"is not divisible into {chunks}x{H} heads")
        d = q_out // (H * chunks)
        targets = [Target(_join(path, projections[0]), "out", Binding(self, unit=d, chunks=chunks), pat)]
        group = 1
        for n in projections[1:]:
            kv_out = _out_features(_child(m, n))
            if kv_out == q_out:
                targets.append(Target(_join(path, n), "out", Binding(self, unit=d), pat))
                continue
            if kv_out % d or H % (kv_out // d):
                raise SizeError(f"Heads {self.name!r} at {path!r}: {n}.out_features={kv_out} is not a whole "
                                f"number of {d}-wide heads dividing {H}")
            group = H // (kv_out // d)
            bad = [s for s in self.sizes if s % group]
            if bad:
                raise SizeError(f"Heads {self.name!r} at {path!r}: grouped-query attention with {H // group} "
                                f"key/value heads needs sizes that are multiples of {group}; bad: {bad}")
            targets.append(Target(_join(path, n), "out", Binding(self, unit=d, div=group), pat))
        targets.append(Target(_join(path, o), "inp", Binding(self, unit=d), pat))
        targets += self._attr_targets(path, m, d, group, pat)
        return targets

    def _attr_targets(self, path: str, m: nn.Module, d: int, group: int, pat: str) -> list[Target]:
        H = self.full
        attrs = vars(m)
        if self.count_attrs is not None:
            missing = [a for a in self.count_attrs if not isinstance(attrs.get(a), int)]
            if missing:
                raise self._err(path, f"count_attrs {missing} are not int attributes of the module")
            chosen = {a: attrs[a] for a in self.count_attrs}
        else:
            chosen = {a: v for a, v in attrs.items() if type(v) is int and (
                (a in COUNT_ATTRS and v == H) or (a in SIZE_ATTRS and v == H * d)
                or (group > 1 and a in ("num_key_value_heads", "n_kv_heads", "num_kv_heads") and v == H // group))}
        out = []
        for a, v in chosen.items():
            if v == H:
                b = Binding(self)
            elif v == H * d:
                b = Binding(self, unit=d)
            elif group > 1 and v == H // group:
                b = Binding(self, div=group)
            else:
                raise self._err(path, f"attribute {a}={v} is neither the head count {H} nor {H}x{d}")
            out.append(Target(path, f"attr:{a}", b, pat))
        return out

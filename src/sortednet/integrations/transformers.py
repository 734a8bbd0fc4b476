"""Hugging Face transformers presets: one call nests BERT, GPT-2 and Llama-family models.

:func:`from_transformers` finds the layer list of a model, recognises the
layout of its blocks and declares the coupled dimensions (FFN width, whole
attention heads keeping the grouped-query ratio, depth) itself.
:func:`export_pretrained` turns a sub-model into a standard ``PreTrainedModel``
whose config matches its smaller shapes, so ``save_pretrained`` ->
``from_pretrained`` reproduces it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..dims import Depth, Width
from ..errors import SizeError, SortedNetError
from ..heads import Heads
from ..nest import Nest
from ..rank import Rank
from ..submodel import SubModelLike
from ..wrap import wrap

__all__ = ["Layout", "LAYOUTS", "detect", "from_transformers", "export_pretrained"]

Sizes = Sequence[int | float] | None


@dataclass(frozen=True)
class Layout:
    """Where one architecture family keeps its nestable parts (paths relative to a block)."""

    family: str
    probe: tuple[str, ...]              # child paths every block of this family has
    ffn_out: tuple[str, ...]
    ffn_inp: tuple[str, ...]
    attn: str
    qkv: str | tuple[str, str, str]
    o: str
    count_attrs: tuple[str, ...] | None
    ffn_key: str                        # config attribute holding the FFN width
    norm: str                           # final norm, relative to the module that holds the layer list
    head_dim_in_config: bool            # config carries head_dim (heads-sliced exports load)


LAYOUTS: tuple[Layout, ...] = (
    Layout("llama", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
           ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",), "self_attn",
           ("q_proj", "k_proj", "v_proj"), "o_proj", None, "intermediate_size", "norm", True),
    Layout("gpt2", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
           ("mlp.c_fc",), ("mlp.c_proj",), "attn", "c_attn", "c_proj", ("num_heads", "split_size"),
           "n_inner", "ln_f", False),
    Layout("bert", ("attention.self.query", "attention.self.key", "attention.self.value",
                    "attention.output.dense", "intermediate.dense", "output.dense"),
           ("intermediate.dense",), ("output.dense",), "attention",
           ("self.query", "self.key", "self.value"), "output.dense", (), "intermediate_size", "", False),
)
SUPPORTED = ("BERT (BertModel, BertFor*), GPT-2 (GPT2Model, GPT2LMHeadModel, ...), "
             "Llama-family (Llama, Mistral, Qwen2, ...)")


@dataclass(frozen=True)
class Found:
    """A detected model: its layout and the path of its layer list."""

    layout: Layout
    layers: str

    def block(self, model: nn.Module, i: int = 0) -> nn.Module:
        return model.get_submodule(self.layers)[i]

    @property
    def parent(self) -> str:
        return self.layers.rpartition(".")[0]


def _has(m: nn.Module, path: str) -> bool:
    try:
        m.get_submodule(path)
        return True
    except AttributeError:
        return False


def detect(model: nn.Module) -> Found:
    """The layout and layer-list path of a transformers model.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> detect(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50))).layers
    'transformer.h'
    """
    for path, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        for lay in LAYOUTS:
            if all(_has(m[0], p) for p in lay.probe):
                return Found(lay, path)
    raise SortedNetError(
        f"from_transformers does not know the layout of {type(model).__name__}; supported: {SUPPORTED}. "
        "Declare the dimensions by hand instead, e.g. sn.wrap(model, sn.Width('ffn', [...], out=['model.layers.*"
        ".mlp.up_proj'], inp=['model.layers.*.mlp.down_proj']), sn.Heads('heads', [...], attn='model.layers.*"
        ".self_attn'), sn.Depth('depth', [...], layers='model.layers')) (import sortednet.integrations first "
        "for GPT-2 Conv1D layers)")


def _resolve(what: str, sizes: Sizes, full: int, multiple: int = 1) -> list[int] | None:
    """Integers stay; fractions in (0, 1] become ``round(f * full)`` rounded to ``multiple``."""
    if sizes is None:
        return None
    if isinstance(sizes, (int, float)):
        sizes = [sizes]
    out = []
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise SizeError(f"{what}: size {s!r} must be an int or a fraction in (0, 1]")
        if isinstance(s, float):
            if not 0 < s <= 1:
                raise SizeError(f"{what}: fraction {s} must be in (0, 1] (full size {full})")
            s = max(multiple, round(s * full / multiple) * multiple)
        if not 0 < s <= full:
            raise SizeError(f"{what}: size {s} must be in 1..{full} (the full size)")
        out.append(s)
    if not out:
        raise SizeError(f"{what}: give at least one size (full size {full})")
    if full not in out:
        out.append(full)  # the full model is always a sub-model (invariant 1)
    out = sorted(out)
    if len(set(out)) != len(out):
        raise SizeError(f"{what}: sizes {list(sizes)} give duplicates {out} for full size {full}")
    return out


def from_transformers(model: nn.Module, *, ffn: Sizes = None, heads: Sizes = None, depth: Sizes = None,
                      rank: Sequence[int] | None = None, rank_mode: str = "lora") -> Nest:
    """Nest a Hugging Face transformers model along FFN width, attention heads and depth.

    Sizes are integers or fractions of the full size (the full size is always
    added). ``heads`` counts query heads; with grouped-query attention every
    size must keep whole key/value groups (fractions are rounded to them).
    ``rank`` (integers) nests the rank of every attention and FFN projection
    with ``sn.Rank(mode=rank_mode)``: DyLoRA adapters by default (``"lora"``),
    or ordered SVD factors (``"svd"``); ``nn.Linear`` projections only (BERT,
    Llama-family).

    >>> import torch, sortednet as sn
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> nest = sn.from_transformers(LlamaForCausalLM(cfg), ffn=[0.5], heads=[2], depth=[2])
    >>> [d.name for d in nest.dims], nest.smallest
    (['ffn', 'heads', 'depth'], SubModel(ffn=32,heads=2,depth=2))
    """
    from . import _register_slicers

    _register_slicers()
    if not isinstance(model, nn.Module):
        raise SortedNetError(f"from_transformers needs a transformers model, got {type(model).__name__}")
    found = detect(model)
    lay, P = found.layout, found.layers
    blk = found.block(model)
    n_layers = len(model.get_submodule(P))
    dims = []
    if ffn is not None:
        full = _full_out(blk.get_submodule(lay.ffn_out[0]))
        dims.append(Width("ffn", _resolve("ffn", ffn, full),
                          out=[f"{P}.*.{p}" for p in lay.ffn_out], inp=[f"{P}.*.{p}" for p in lay.ffn_inp]))
    if heads is not None:
        n_heads, group = _head_counts(model, found)
        dims.append(Heads("heads", _resolve("heads", heads, n_heads, group), attn=f"{P}.*.{lay.attn}",
                          qkv=lay.qkv, o=lay.o, count_attrs=lay.count_attrs))
    if depth is not None:
        dims.append(Depth("depth", _resolve("depth", depth, n_layers), layers=P))
    if rank is not None:
        dims.append(_rank_dim(blk, found, rank, rank_mode))
    if not dims:
        raise SortedNetError("from_transformers needs at least one of ffn=, heads=, depth=, rank=")
    nest = wrap(model, *dims)
    nest._hf = found
    return nest


def _rank_dim(blk: nn.Module, found: Found, rank: Sequence[int], mode: str) -> Rank:
    lay = found.layout
    qkv = [lay.qkv] if isinstance(lay.qkv, str) else list(lay.qkv)
    rel = [f"{lay.attn}.{p}" for p in (*qkv, lay.o)] + list(lay.ffn_out + lay.ffn_inp)
    bad = [p for p in rel if not isinstance(blk.get_submodule(p), nn.Linear)]
    if bad:
        raise SortedNetError(f"from_transformers(rank=...): rank targets must be nn.Linear, but the "
                             f"{lay.family} layout has {type(blk.get_submodule(bad[0])).__name__} at {bad}; "
                             "use ffn=/heads=/depth= for this model")
    if isinstance(rank, int) or any(isinstance(r, float) for r in rank):
        raise SizeError(f"rank: sizes must be a list of integer ranks, got {rank!r}")
    return Rank("rank", list(rank), targets=[f"{found.layers}.*.{p}" for p in rel], mode=mode)


def _full_out(m: nn.Module) -> int:
    return m.weight.shape[1] if isinstance(m, Conv1D) else m.weight.shape[0]


def _head_counts(model: nn.Module, found: Found) -> tuple[int, int]:
    """(query heads, query heads per key/value head) from the config."""
    cfg = model.config
    n = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or n
    return n, n // kv


def _layout_of(nest: Nest) -> Found:
    found = getattr(nest, "_hf", None)
    return found if found is not None else detect(nest.model)


def export_pretrained(nest: Nest, sub: SubModelLike | None = None) -> nn.Module:
    """Export ``sub`` as a standard ``PreTrainedModel`` with an updated config.

    ``save_pretrained`` of the result loads with ``from_pretrained`` of the
    same class. Heads-sliced sub-models of BERT / GPT-2 cannot be described by
    their configs (they derive the head size from hidden size / heads): they
    raise here; export those with ``nest.export(sub)`` as plain modules.

    >>> import torch, sortednet as sn
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> nest = sn.from_transformers(LlamaForCausalLM(cfg), ffn=[32], heads=[2], depth=[2])
    >>> small = export_pretrained(nest, nest.smallest)
    >>> c = small.config
    >>> c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers, c.head_dim
    (32, 2, 1, 2, 8)
    """
    found = _layout_of(nest)
    lay = found.layout
    sub = nest.resolve(sub)
    model = nest.model
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise SortedNetError(f"export_pretrained needs a transformers PreTrainedModel, got {type(model).__name__}")
    n_heads, group = _head_counts(model, found)
    heads_dims = [d for d in nest.dims if isinstance(d, Heads)]
    if not lay.head_dim_in_config and any(sub[d.name] != n_heads for d in heads_dims):
        raise SortedNetError(
            f"{type(model).__name__}: a sub-model with fewer attention heads ({sub}) cannot be loaded by the stock "
            f"class, whose config derives the head size from hidden_size / num_attention_heads; export it as a "
            f"plain module with nest.export(sub) (torch.save / sn.save), or keep heads={n_heads}")
    small = nest.export(sub)
    cfg = copy.deepcopy(model.config)
    blocks = small.get_submodule(found.layers)
    b0 = blocks[0]
    setattr(cfg, lay.ffn_key, _full_out(b0.get_submodule(lay.ffn_out[0])))
    L0 = cfg.num_hidden_layers
    cfg.num_hidden_layers = len(blocks)
    for key in ("layer_types", "mlp_layer_types"):
        v = getattr(cfg, key, None)
        if isinstance(v, list) and len(v) == L0:
            setattr(cfg, key, v[: len(blocks)])
    if lay.head_dim_in_config:
        a0 = b0.get_submodule(lay.attn)
        d = getattr(a0, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        q = _full_out(a0.get_submodule(lay.qkv[0]))
        cfg.head_dim = d
        cfg.num_attention_heads = q // d
        if hasattr(cfg, "num_key_value_heads"):
            cfg.num_key_value_heads = _full_out(a0.get_submodule(lay.qkv[1])) // d
    _check_loadable(small, cfg, sub)
    _set_config(small, cfg)
    return small


def _set_config(model: nn.Module, cfg) -> None:
    """Point the exported model and every sub-module that held the old config at the new one."""
    old = model.config
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if v is old:
                m.__dict__[k] = cfg
    model.config = cfg


def _check_loadable(small: nn.Module, cfg, sub) -> None:
    """The class built from ``cfg`` must have exactly the exported shapes (uniform sub-models only)."""
    with torch.device("meta"):
        fresh = type(small)(cfg)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    bad = [(k, have.get(k), want.get(k)) for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if bad:
        k, h, w = bad[0]
        raise SortedNetError(
            f"sub-model {sub} cannot be described by {type(cfg).__name__} (non-uniform layers?): {len(bad)} tensors "
            f"differ, e.g. {k!r} is {h} but the config gives {w}; export it as a plain module with nest.export(sub)")

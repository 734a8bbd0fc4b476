"""Where each transformers family keeps its nestable parts: :class:`Layout`, the built-in table, detection.

A layout names, relative to one block of the model's layer list, the FFN
projections, the attention module(s), their q/k/v / output projections and
fused row layouts, and the config keys an export must rewrite. Paths may use
``*`` for one path component (T5's ``layer.*.SelfAttention``); entries of
``ffn_out`` / ``ffn_inp`` / ``attn`` that a block lacks are skipped. A user
with an unlisted family registers one with :func:`register_layout` and gets
``from_transformers``, ``export_pretrained``, ``soft_loss`` and
``sort_by_importance`` without editing sortednet.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import SortedNetError

__all__ = ["Layout", "LAYOUTS", "register_layout", "detect", "Found"]


@dataclass(frozen=True)
class Layout:
    """The nestable parts of one architecture family (paths relative to a block of its layer list).

    ``qkv``: three names, one fused name, or ``None`` (``sn.Heads`` finds them);
    ``qkv_layout``: row layout of a fused ``qkv`` (``"stacked"`` ``[q; k; v]`` or
    ``"interleaved"`` per key/value head), or a function of the config giving it;
    ``ffn_chunks``: projections stacked in each ``ffn_out`` module (2 for a
    fused ``[gate; up]``); ``*_key``: config attributes an export rewrites
    (``head_dim_key=None``: the config derives the head size from hidden / heads,
    so a heads-sliced export cannot be described); ``depth_keys``: one per layer
    list (T5: encoder, decoder); ``norm``: final norm relative to the module
    holding the layer list (causal LMs: SoFT exits); ``no_heads``: why heads
    cannot be nested in this family (refused), if so; ``heads_key=None``: a
    family without attention heads.

    >>> from sortednet.integrations import Layout
    >>> Layout("mine", probe=("attn.q", "mlp.fc1"), ffn_out=("mlp.fc1",), ffn_inp=("mlp.fc2",), attn=("attn",)).family
    'mine'
    """

    family: str
    probe: tuple[str, ...]
    ffn_out: tuple[str, ...] = ()
    ffn_inp: tuple[str, ...] = ()
    attn: tuple[str, ...] = ()
    qkv: str | tuple[str, str, str] | None = None
    o: str | None = None
    qkv_layout: str | Callable[[Any], str] | None = None
    count_attrs: tuple[str, ...] | None = None
    ffn_chunks: int = 1
    ffn_key: str = "intermediate_size"
    heads_key: str | None = "num_attention_heads"
    kv_key: str | None = None
    head_dim_key: str | None = None
    depth_keys: tuple[str, ...] = ("num_hidden_layers",)
    norm: str = ""
    causal: bool = False
    no_heads: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("probe", "ffn_out", "ffn_inp", "attn", "count_attrs", "depth_keys"):
            v = getattr(self, name)
            if v is None and name == "count_attrs":
                continue
            if isinstance(v, str):  # (a tuple of one written without its comma: each letter taken as a path)
                raise SortedNetError(f"Layout {self.family!r}: {name}= takes a tuple of names, got the string {v!r}; "
                                     f"write {name}=({v!r},)")
            if not isinstance(v, (tuple, list)) or not all(isinstance(x, str) for x in v):
                raise SortedNetError(f"Layout {self.family!r}: {name}= takes a tuple of names (strings), got {v!r}")
            object.__setattr__(self, name, tuple(v))
        three = isinstance(self.qkv, (tuple, list)) and len(self.qkv) == 3 and all(isinstance(x, str) for x in self.qkv)
        if self.qkv is not None and not isinstance(self.qkv, str) and not three:
            raise SortedNetError(f"Layout {self.family!r}: qkv= is one fused projection's name or three names "
                                 f"(q, k, v), got {self.qkv!r}")
        if isinstance(self.qkv, list):
            object.__setattr__(self, "qkv", tuple(self.qkv))

    def layout_of_qkv(self, config: Any) -> str | None:
        return self.qkv_layout(config) if callable(self.qkv_layout) else self.qkv_layout


def _falcon_qkv(cfg: Any) -> str:
    return "stacked" if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False) \
        else "interleaved"


def _gpt2_qkv(cfg: Any) -> str:
    # GPTBigCode (detected as gpt2) packs q/k/v per head, ``view(B, T, heads, 3 * head_dim)``, unless multi-query
    return "interleaved" if getattr(cfg, "model_type", "") == "gpt_bigcode" and not getattr(cfg, "multi_query", True) \
        else "stacked"


_LLAMA_ATTN = dict(attn=("self_attn",), qkv=("q_proj", "k_proj", "v_proj"), o="o_proj", kv_key="num_key_value_heads",
                   head_dim_key="head_dim", norm="norm", causal=True)
_BUILTIN: tuple[Layout, ...] = (
    Layout("llama", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
           ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",), **_LLAMA_ATTN),
    Layout("qwen2_moe", ("self_attn.q_proj", "self_attn.o_proj", "mlp.experts", "mlp.shared_expert"),
           ("mlp.experts",), ("mlp.experts",), ffn_chunks=2, ffn_key="moe_intermediate_size", **_LLAMA_ATTN),
    Layout("mixtral", ("self_attn.q_proj", "self_attn.o_proj", "mlp.experts"),
           ("mlp.experts",), ("mlp.experts",), ffn_chunks=2, **_LLAMA_ATTN),
    Layout("phi3", ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
           ("mlp.gate_up_proj",), ("mlp.down_proj",), ("self_attn",), "qkv_proj", "o_proj", "stacked",
           ("config.num_attention_heads", "num_key_value_heads"),  # its forward reads the config's head count
           ffn_chunks=2, kv_key="num_key_value_heads", head_dim_key="head_dim", norm="norm", causal=True),
    Layout("phi", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1",
                   "mlp.fc2"), ("mlp.fc1",), ("mlp.fc2",), ("self_attn",), ("q_proj", "k_proj", "v_proj"), "dense",
           kv_key="num_key_value_heads", head_dim_key="head_dim", norm="final_layernorm", causal=True),
    Layout("starcoder2", ("self_attn.q_proj", "self_attn.o_proj", "mlp.c_fc", "mlp.c_proj"), ("mlp.c_fc",),
           ("mlp.c_proj",), **_LLAMA_ATTN),
    Layout("gptj", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out"),
           ("mlp.fc_in",), ("mlp.fc_out",), ("attn",), ("q_proj", "k_proj", "v_proj"), "out_proj",
           ffn_key="n_inner", heads_key="n_head", depth_keys=("n_layer",), norm="ln_f", causal=True),
    Layout("gpt2", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), ("mlp.c_fc",), ("mlp.c_proj",),
           ("attn",), "c_attn", "c_proj", _gpt2_qkv, ("num_heads", "split_size"), ffn_key="n_inner",
           norm="ln_f", causal=True),
    Layout("gpt_neox", ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
           ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",), ("attention",), "query_key_value", "dense",
           "interleaved", norm="final_layer_norm", causal=True),
    Layout("falcon", ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h"),
           ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",), ("self_attention",), "query_key_value", "dense",
           _falcon_qkv, ffn_key="ffn_hidden_size", kv_key="num_kv_heads", norm="ln_f", causal=True),
    Layout("opt", ("self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"), ("fc1",), ("fc2",), ("self_attn",),
           ("q_proj", "k_proj", "v_proj"), "out_proj", ffn_key="ffn_dim", norm="final_layer_norm", causal=True),
    Layout("bert", ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                    "intermediate.dense", "output.dense"), ("intermediate.dense",), ("output.dense",),
           ("attention",), ("self.query", "self.key", "self.value"), "output.dense", count_attrs=()),
    Layout("distilbert", ("attention.q_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2"), ("ffn.lin1",),
           ("ffn.lin2",), ("attention",), ("q_lin", "k_lin", "v_lin"), "out_lin", ffn_key="hidden_dim",
           heads_key="n_heads", depth_keys=("n_layers",)),
    Layout("vit", ("attention.q_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"), ("mlp.fc1",), ("mlp.fc2",),
           ("attention",), ("q_proj", "k_proj", "v_proj"), "o_proj"),
    Layout("clip", ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"), ("mlp.fc1",), ("mlp.fc2",),
           ("self_attn",), ("q_proj", "k_proj", "v_proj"), "out_proj"),
    Layout("t5", ("layer.0.SelfAttention.q", "layer.0.SelfAttention.o"),
           ("layer.*.DenseReluDense.wi", "layer.*.DenseReluDense.wi_0", "layer.*.DenseReluDense.wi_1"),
           ("layer.*.DenseReluDense.wo",), ("layer.*.SelfAttention", "layer.*.EncDecAttention"), ("q", "k", "v"), "o",
           ffn_key="d_ff", heads_key="num_heads", head_dim_key="d_kv", depth_keys=("num_layers", "num_decoder_layers"),
           extra={"stacks": 2}),
)
_USER: list[Layout] = []


def register_layout(layout: Layout) -> Layout:
    """Teach :func:`sortednet.from_transformers` (and export / SoFT / importance sorting) a family.

    Registered layouts are tried before the built-in ones. Returns ``layout``.

    >>> import sortednet.integrations as sni
    >>> lay = sni.register_layout(sni.Layout("demo", probe=("nowhere.q",)))
    >>> sni.LAYOUTS[0].family; sni.unregister_layout(lay)
    'demo'
    """
    if not isinstance(layout, Layout):
        raise SortedNetError(f"register_layout needs a sortednet.integrations.Layout, got {type(layout).__name__}")
    if not layout.probe:
        raise SortedNetError(f"Layout {layout.family!r}: probe= must name at least one path every block has")
    _USER[:] = [layout, *(x for x in _USER if x is not layout)]  # (registered again: moved first, not twice)
    _refresh()
    return layout


def unregister_layout(layout: Layout) -> None:
    """Undo :func:`register_layout`."""
    _USER[:] = [x for x in _USER if x is not layout]
    _refresh()


LAYOUTS: list[Layout] = []


def _refresh() -> None:
    LAYOUTS[:] = [*_USER, *_BUILTIN]


_refresh()


@dataclass(frozen=True)
class Found:
    """A detected model: its layout and the path(s) of its layer list(s)."""

    layout: Layout
    stacks: tuple[str, ...]

    @property
    def layers(self) -> str:
        return self.stacks[-1]

    def block(self, model: nn.Module, i: int = 0, stack: int = -1) -> nn.Module:
        return model.get_submodule(self.stacks[stack])[i]

    @property
    def parent(self) -> str:
        return self.layers.rpartition(".")[0]


def glob_children(block: nn.Module, rel: str) -> list[str]:
    """Paths under ``block`` matching ``rel`` (``*`` = one path component)."""
    if "*" not in rel:
        try:
            block.get_submodule(rel)
            return [rel]
        except AttributeError:
            return []
    depth = rel.count(".")
    return [n for n, _ in block.named_modules() if n.count(".") == depth and fnmatch.fnmatchcase(n, rel)
            and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n.split("."), rel.split(".")))]


SUPPORTED = ", ".join(x.family for x in _BUILTIN)


def detect(model: nn.Module) -> Found:
    """The layout and layer-list path(s) of a transformers model.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> detect(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50))).layers
    'transformer.h'
    """
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList)
             and isinstance(next(iter(m._modules.values()), None), nn.Module)]  # (its first block, read as stored)
    for lay in LAYOUTS:
        hits = tuple(p for p, m in lists if all(glob_children(next(iter(m._modules.values())), q) for q in lay.probe))
        if not hits:
            continue
        if len(hits) > lay.extra.get("stacks", 1):
            head = f"{type(model).__name__} holds {len(hits)} layer lists {list(hits)} (whose blocks match the " \
                   f"{lay.family} layout's)"
            if any(part.isdigit() for p in hits for part in p.split(".")):  # lists inside a list: stages
                raise SortedNetError(f"{head}: stages of one network (each with its own width and head count), "
                                     "which from_transformers cannot nest as one; declare the dimensions by hand "
                                     "with sn.wrap (one Width / Heads per stage, sn.discover proposes them)")
            # (each tower as the outermost module holding its list and no other: CLIP's text_model, the part with
            # its own embeddings and final norm, not text_model.encoder, which holds the layers alone)
            towers = [next((".".join(p.split(".")[:i]) for i in range(1, p.count(".") + 1)
                            if not any(q != p and q.startswith(".".join(p.split(".")[:i]) + ".") for q in hits)),
                           p.rpartition(".")[0]) for p in hits]
            raise SortedNetError(f"{head}; nest one tower at a time: pass the sub-module that holds one of them, "
                                 f"e.g. sn.from_transformers(model.get_submodule({towers[0]!r}), ...) (towers: "
                                 f"{towers})")
        tails = {p.rpartition(".")[2] for p in hits}
        apart = [(p, m) for p, m in lists if p not in hits and not any(p.startswith(h + ".") or h.startswith(p + ".")
                                                                       for h in hits)]
        # another list of the same name, or one whose blocks another layout knows (a BERT encoder beside a GPT-2
        # decoder, a ViT or CLIP vision tower beside a language model): the model holds another tower
        missed = [p for p, m in apart if p.rpartition(".")[2] in tails
                  or any(all(glob_children(m[0], q) for q in other.probe) for other in LAYOUTS if other is not lay)]
        if missed:
            parts = [p.split(".")[:-1] for p in hits]  # the module holding every matched list (all stacks)
            common = next((i for i, xs in enumerate(zip(*parts)) if len(set(xs)) > 1), min(map(len, parts)))
            holder = ".".join(parts[0][:common])
            one = "" if not holder or any(p.startswith(holder + ".") for p in missed) else (
                f"; to nest the part they belong to alone (a vision-language model's language model): "
                f"sn.from_transformers(model.get_submodule({holder!r}), ...)")
            raise SortedNetError(f"{type(model).__name__}: the layer list(s) {missed} do not match the {lay.family} "
                                 f"layout that {list(hits)} match (their blocks differ, e.g. another attention or "
                                 "another tower); from_transformers would nest only part of the model: not supported"
                                 f"{one}. Else declare the dimensions by hand with sn.wrap, or describe the layout "
                                 "with register_layout")
        return Found(lay, hits)
    lists = [(len(m._modules), p) for p, m in model.named_modules() if isinstance(m, nn.ModuleList)
             and len(m._modules) > 1 and p]
    most = max((n for n, _ in lists), default=0)  # (the model's own layer list, for the hint: the longest, the
    stack = next((p for n, p in lists if n == most), None)  # first in module order of those: the outermost)
    block = None if stack is None else next(iter(model.get_submodule(stack)._modules.values()), None)
    linears = [n for n, c in block.named_modules() if isinstance(c, nn.Linear)] if isinstance(block, nn.Module) \
        else []
    own = (f" This model's layer list is {stack!r}; its blocks' Linear layers are {linears[:8]}"
           f"{' ...' if len(linears) > 8 else ''}: bind the FFN's first layers out= and its last inp= "
           f"('{stack}.*.<name>'), its attention modules attn=, and layers='{stack}'." if stack else "")
    raise SortedNetError(
        f"from_transformers does not know the layout of {type(model).__name__}; known families: {SUPPORTED}. "
        "Describe it once with sortednet.integrations.register_layout(Layout(family, probe=..., ffn_out=..., "
        "ffn_inp=..., attn=..., ...)) (see docs/transformers.md), or declare the dimensions by hand, as for a "
        "Llama: sn.wrap(model, sn.Width('ffn', [...], out=['model.layers.*.mlp.gate_proj', "
        "'model.layers.*.mlp.up_proj'], inp=['model.layers.*.mlp.down_proj']), sn.Heads('heads', [...], "
        "attn='model.layers.*.self_attn'), sn.Depth('depth', [...], layers='model.layers')) (import "
        f"sortednet.integrations first for GPT-2 Conv1D layers).{own}")

"""Hugging Face transformers presets: one call nests every family in :data:`LAYOUTS`.

:func:`from_transformers` finds the layer list(s) of a model, recognises the
layout of its blocks and declares the coupled dimensions (FFN width, whole
attention heads keeping the grouped-query ratio, depth) itself.
:func:`export_pretrained` (also what ``nest.export(sub)`` does for a
``PreTrainedModel``) turns a sub-model into a standard ``PreTrainedModel``
whose config matches its smaller shapes, so ``save_pretrained`` ->
``from_pretrained`` reproduces it, or refuses when no stock config can.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..check import FROM_TRANSFORMERS
from ..dims import Depth, Width
from ..errors import PatternError, SizeError, SortedNetError
from ..errors import flag as _flag
from ..heads import Heads
from ..nest import EXPORT_HOOKS, Nest, wrap
from ..rank import Rank
from ..slicers import register_transformers_types, slicer_for
from ..submodel import SubModel, SubModelLike
from .layouts import LAYOUTS, Found, Layout, detect, glob_children

__all__ = ["Layout", "LAYOUTS", "detect", "from_transformers", "export_pretrained"]

Sizes = Sequence[int | float] | None


def register_known_slicers() -> None:
    """Slicers for transformers layer types whose modules are loaded (idempotent)."""
    register_transformers_types()


def _number(what: str, s: object) -> int | float:
    """A size as a Python int (any integral type: numpy, torch scalars) or float (a fraction), never a bool."""
    if isinstance(s, torch.Tensor) and s.is_meta:
        raise SizeError(f"{what}: a size on the meta device holds no value; give an int or a fraction")
    if isinstance(s, (numpy.ndarray, torch.Tensor)) and s.ndim == 0 and s.dtype not in (torch.bool, numpy.bool_):
        s = s.item()  # (a 0-d tensor or array: its number)
    if isinstance(s, (bool, numpy.bool_)) or not isinstance(s, numbers.Real):
        raise SizeError(f"{what}: size {s!r} must be an int or a fraction in (0, 1]")
    return int(s) if isinstance(s, numbers.Integral) else float(s)


def _resolve(what: str, sizes: Sizes, full: int, multiple: int = 1) -> list[int] | None:
    """Integers stay; fractions in (0, 1] become ``round(f * full)`` rounded to ``multiple``."""
    if sizes is None:
        return None
    if isinstance(sizes, torch.Tensor) and sizes.is_meta:
        raise SizeError(f"{what}: sizes on the meta device hold no values; give a list of ints or fractions")
    if isinstance(sizes, (numpy.ndarray, torch.Tensor)) and sizes.ndim <= 1:  # (as sn.Width takes them)
        sizes = [sizes.item()] if sizes.ndim == 0 else list(sizes.tolist())
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (numbers.Real, Sequence, set, frozenset, range)):
        raise SizeError(f"{what}: sizes must be a list of ints or fractions in (0, 1], got "
                        f"{type(sizes).__name__} {sizes!r}")
    if isinstance(sizes, numbers.Real):
        sizes = [sizes]
    sizes = [_number(what, s) for s in sizes]
    if any(isinstance(s, float) for s in sizes) and any(type(s) is int and s == 1 for s in sizes):
        raise SizeError(f"{what}: sizes {sizes} mix fractions with the integer 1, which is the size 1 (one unit), "
                        "not the full size: write 1.0 for the full size (or give every size as an integer)")
    out = []
    for s in sizes:
        if isinstance(s, float):
            if not 0 < s <= 1:
                raise SizeError(f"{what}: fraction {s} must be in (0, 1] (full size {full})")
            s = max(multiple, round(s * full / multiple) * multiple)
        if not 0 < s <= full:
            raise SizeError(f"{what}: size {s} must be in 1..{full} (the full size)")
        out.append(s)
    if not out:
        raise SizeError(f"{what}: give at least one size (full size {full})")
    if all(s == full for s in out) and any(isinstance(f, float) and f < 1 for f in sizes):
        raise SizeError(f"{what}: fractions {sizes} of the full size {full} round to {full} itself (sizes are "
                        f"multiples of {multiple}" + (": whole key/value groups" if multiple > 1 else "")
                        + "), so they add no smaller sub-model; give a smaller fraction or integer sizes")
    if all(s == full for s in out):  # (the dimension is declared, its modules sliced, but nests nothing: said)
        import warnings

        warnings.warn(f"{what}: sizes {sizes} are the full size {full} only, so they add no smaller sub-model (the "
                      "dimension nests nothing); give smaller sizes, or leave it out", UserWarning, stacklevel=3)
    merged = [f for f, s in zip(sizes, out) if isinstance(f, float) and f < 1 and s == full]
    if merged:  # (beside fractions that do nest: kept, as the full size, but said)
        import warnings

        warnings.warn(f"{what}: fraction(s) {merged} of the full size {full} round to {full} itself (sizes are "
                      f"multiples of {multiple}" + (": whole key/value groups" if multiple > 1 else "") + "): they "
                      f"add no sub-model; the sizes are {sorted(set(out) | {full})}", UserWarning, stacklevel=3)
        out = [s for f, s in zip(sizes, out) if not (isinstance(f, float) and f < 1 and s == full)]  # (merged: the
        #                                                                     full size is added below, once)
    if full not in out:
        out.append(full)  # the full model is always a sub-model (invariant 1)
    out = sorted(out)
    if len(set(out)) != len(out):
        raise SizeError(f"{what}: sizes {list(sizes)} give duplicates {out} for full size {full}")
    return out


def _rel(model: nn.Module, found: Found, rels: Sequence[str]) -> list[str]:
    """Patterns ``<stack>.*.<rel>`` for every ``rel`` present in that stack's first block."""
    return [f"{P}.*.{r}" for i, P in enumerate(found.stacks) for r in rels
            if glob_children(found.block(model, 0, i), r)]


def from_transformers(model: nn.Module, *, ffn: Sizes = None, heads: Sizes = None, depth: Sizes = None,
                      rank: Sequence[int] | None = None, rank_mode: str = "lora",
                      rank_targets: Sequence[str] | None = None, verify: bool = True,
                      inplace_grad: bool = True) -> Nest:
    """Nest a Hugging Face transformers model along FFN width, attention heads and depth.

    Sizes are integers or fractions of the full size (the full size is always
    added). ``heads`` counts query heads; with grouped-query attention every
    size must keep whole key/value groups (fractions are rounded to them; fractions below 1 that all round to
    the full size are refused).
    ``depth`` nests every layer list (T5: encoder and decoder alike).
    ``rank`` (integers) nests the rank of projections with
    ``sn.Rank(mode=rank_mode)``: DyLoRA adapters (``"lora"``) or ordered SVD
    factors (``"svd"``); ``rank_targets`` picks them (paths relative to a block,
    e.g. ``["self_attn.q_proj", "self_attn.v_proj"]``; default: every attention
    and FFN projection), ``nn.Linear`` only.

    ``verify`` (default on) checks the layout on the model itself before
    returning, on a small generated input (token ids or random pixels): the
    smallest sub-model and each of ``ffn`` / ``heads`` alone at its smallest
    must run, and the latter two must equal the full model with the dropped
    heads' / neurons' outputs masked (the definition of "the first n whole
    heads / neurons"). An architecture that breaks that (attention that mixes
    heads, per-head interleaved projections described as stacked, position
    biases built for every head) is unwrapped and refused with a
    :class:`SortedNetError` instead of giving wrong sub-models. It costs a few
    forwards of a 2 x 8 input; ``verify=False`` skips it (models on the meta
    device or sharded are never run: a warning says the check did not run).
    ``inplace_grad`` is passed to :func:`sortednet.wrap` (``False``: plain autograd slicing, for threads running
    backward at once and DDP's own reducer, docs/mechanism.md and docs/scaling.md).

    >>> import torch, sortednet as sn
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> nest = sn.from_transformers(LlamaForCausalLM(cfg), ffn=[0.5], heads=[2], depth=[2])
    >>> [d.name for d in nest.dims], nest.smallest
    (['ffn', 'heads', 'depth'], SubModel(ffn=32,heads=2,depth=2))
    """
    if not isinstance(model, nn.Module):
        raise SortedNetError(f"from_transformers needs a transformers model, got {type(model).__name__}")
    _flag("from_transformers", "verify", verify)
    if rank_targets is not None and (isinstance(rank_targets, (str, bytes)) or not isinstance(rank_targets, Sequence)
                                     or not all(isinstance(t, str) for t in rank_targets)):
        raise SortedNetError(f"from_transformers(rank_targets=...) takes a list of module paths relative to a block "
                             f"(e.g. ['self_attn.q_proj']), got {rank_targets!r}")
    if rank is None and (rank_targets is not None or rank_mode != "lora"):
        raise SortedNetError("from_transformers: rank_mode= / rank_targets= describe a Rank dimension, which only "
                             "rank= (its sizes, e.g. rank=[4, 8, 16]) declares; without it they would do nothing. "
                             "Pass rank=, or leave them out. Nothing was changed")
    register_known_slicers()
    found = detect(model)
    lay = found.layout
    if heads is not None and not lay.heads_key:
        raise SortedNetError(f"from_transformers(heads=...) on {type(model).__name__}: the {lay.family!r} layout "
                             "names no heads_key (a family without attention heads); nest ffn= / depth= only")
    if heads is not None and (why := _other_towers_key(model, (lay.heads_key,))) is not None and \
            _tower_key(model, model.config, lay.heads_key) == lay.heads_key:  # (no key of the tower's own either)
        raise SortedNetError(f"from_transformers(heads=...): {why}: the head count and head size would be the other "
                             "tower's. Declare this tower's heads by hand: sn.wrap(model, sn.Heads(...)) "
                             "(docs/heads.md)")
    if getattr(model, "config", None) is None and (heads is not None or depth is not None):
        given = [k for k, v in (("heads", heads), ("depth", depth)) if v is not None]
        raise SortedNetError(f"from_transformers({'=..., '.join(given)}=...) on {type(model).__name__}: it has no "
                             "config (a tower held as a plain module, as FSMT's encoder and decoder), from which "
                             "the head counts and the layer count of an export are read; nest ffn= only, or "
                             "declare the dimensions by hand: sn.wrap(model, sn.Heads(...), sn.Depth(...))")
    blk = found.block(model, 0, 0)
    dims = []
    if ffn is not None:
        for P in found.stacks:  # every block: a model may mix dense and expert FFNs (first_k_dense, mlp_only_layers)
            for i, b in enumerate(model.get_submodule(P)):
                try:
                    m = b.get_submodule(_ffn_out_path(b, lay, type(model).__name__))
                except SortedNetError as e:
                    if b is blk or not glob_children(blk, _ffn_out_path(blk, lay, type(model).__name__)):
                        raise SortedNetError(f"from_transformers(ffn=...): block {P}.{i}: {e}") from None
                    raise SortedNetError(
                        f"from_transformers(ffn=...) on {type(model).__name__}: its blocks hold different FFNs: "
                        f"{found.stacks[-1]}.0 has {list(lay.ffn_out)} ({lay.family} layout), block {P}.{i} has "
                        "none of them (a model that mixes dense and mixture-of-experts layers, e.g. "
                        "mlp_only_layers / decoder_sparse_step / first_k_dense_replace); one ffn= width cannot "
                        "span both kinds: nest heads= / depth= only, or build the model with one FFN kind in "
                        "every layer") from None
                if slicer_for(m) is None:
                    raise SortedNetError(
                        f"from_transformers(ffn=...) on {type(model).__name__}: the FFN module of block {P}.{i}, "
                        f"{type(m).__name__}, has no slicer (an experts layout sortednet does not know), so ffn= "
                        "would shrink the other blocks alone; nest heads= / depth= only, or register a slicer for "
                        "it (docs/custom_slicers.md)")
        first = blk.get_submodule(_ffn_out_path(blk, lay, type(model).__name__))
        full = slicer_for(first).full(first, "out") // lay.ffn_chunks
        out = _rel(model, found, lay.ffn_out)
        dims.append(Width("ffn", _resolve("ffn", ffn, full), out=out, inp=_rel(model, found, lay.ffn_inp),
                          chunks={p: lay.ffn_chunks for p in out} if lay.ffn_chunks > 1 else None))
    if heads is not None:
        if lay.no_heads:
            raise SortedNetError(f"from_transformers(heads=...) on {type(model).__name__}: {lay.no_heads}; "
                                 "nest ffn= / depth= only")
        cfg = getattr(model, "config", None)
        if getattr(cfg, "alibi", False) or getattr(cfg, "model_type", None) == "bloom":
            raise SortedNetError(f"from_transformers(heads=...) on {type(model).__name__}: its ALiBi position "
                                 "biases are built for every head from the config's head count at each forward, "
                                 "not sliced with the heads; nest ffn= / depth= only")
        tower = _tower_name(model, found.stacks[0])
        n_heads, group = _head_counts(model.config, lay, tower, model)
        if group == n_heads and not isinstance(lay.qkv, str):
            group = 1  # multi-query with separate k / v projections: any count of query heads (docs/heads.md)
        dims.append(Heads("heads", _resolve("heads", heads, n_heads, group), attn=_rel(model, found, lay.attn),
                          qkv=lay.qkv, o=lay.o, count_attrs=lay.count_attrs,
                          layout=lay.layout_of_qkv(_holder(model.config, lay.heads_key, tower))
                          if isinstance(lay.qkv, str) else None))
    if depth is not None:
        lengths = [len(model.get_submodule(P)) for P in found.stacks]
        if len(set(lengths)) > 1:
            raise SortedNetError(f"from_transformers(depth=...): the layer lists {list(found.stacks)} have different "
                                 f"lengths {lengths}; declare one sn.Depth per list by hand")
        sizes = _resolve("depth", depth, lengths[0])
        weighted = [n for n, p in model.named_parameters() if n.rpartition(".")[2] == "layer_weights"]
        if getattr(model.config, "use_weighted_layer_sum", False) and weighted and sizes[0] < lengths[0]:
            raise SortedNetError(f"from_transformers(depth={sizes}) on {type(model).__name__}: its head takes a "
                                 f"weighted sum of every layer's output (use_weighted_layer_sum, {weighted[0]!r} "
                                 f"holds one weight per layer), which a shallower sub-model does not give; build it "
                                 "with use_weighted_layer_sum=False, or nest ffn= / heads= only")
        names, idx = getattr(model.config, "stage_names", None), getattr(model.config, "out_indices", None)
        if _is_backbone(model) and isinstance(names, (list, tuple)) and idx:
            deepest = max(i % len(names) for i in idx)
            if sizes[0] < deepest:
                raise SortedNetError(f"from_transformers(depth={sizes}): this backbone outputs stages "
                                     f"{getattr(model.config, 'out_features', idx)}, the deepest after layer "
                                     f"{deepest}; "
                                     f"a sub-model of depth {sizes[0]} would give no feature map for it. Keep depths "
                                     f">= {deepest}, or build the backbone with out_indices within the smallest depth")
        dims.append(Depth("depth", sizes, layers=list(found.stacks)))
    if rank is not None:
        dims.append(_rank_dim(model, found, rank, rank_mode, rank_targets))
    if not dims:
        raise SortedNetError("from_transformers needs at least one of ffn=, heads=, depth=, rank=")
    token = FROM_TRANSFORMERS.set(True)
    try:
        nest = wrap(model, *dims, inplace_grad=inplace_grad)
    except PatternError as e:  # (a Heads refusal offers per_head= / whole=, which Heads takes and this does not)
        said = str(e)
        if "count_attrs" in said and "are not int attributes" in said:  # (the layout's, not the user's)
            raise type(e)(f"from_transformers(heads=...): {type(model).__name__} was read as the "
                          f"{found.layout.family} layout, whose attention keeps its head count elsewhere than this "
                          f"model's ({said}); nest it with ffn= / depth= only, or describe it with "
                          "sortednet.integrations.register_layout") from None
        if "per_head=" not in said and "whole=" not in said:
            raise
        raise type(e)(f"from_transformers(heads=...): {said}. from_transformers takes neither per_head= nor "
                      "whole=: nest this family's heads by hand, sn.wrap(model, sn.Heads('heads', sizes, "
                      "attn=..., per_head=[...] or whole=[...]), ...) (docs/heads.md), or leave heads= out") from None
    finally:
        FROM_TRANSFORMERS.reset(token)
    nest._hf = found
    if verify:
        try:
            _self_check(nest)
        except BaseException:
            nest.unwrap()
            raise
    return nest


def _dummy_input(model: nn.Module) -> dict | None:
    """A small deterministic input of ``model``'s main kind (token ids, pixels), or None."""
    cfg = getattr(model, "config", None)
    name = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(0)  # (on the CPU: the values are moved to the model's device after)
    if name == "input_ids":
        try:
            vocab = int(model.get_input_embeddings().num_embeddings)
        except Exception:  # no plain embedding table: nothing to generate ids for, the check is skipped
            return None
        limit = getattr(cfg, "max_position_embeddings", None)  # (XLNet's -1: no limit)
        n = min(8, limit) if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 8
        ids = torch.randint(vocab, (2, n), generator=g, device="cpu")
        out = {"input_ids": ids}
        if getattr(cfg, "is_encoder_decoder", False):
            out["decoder_input_ids"] = ids[:, : max(1, n // 2)]
        return out
    if name == "pixel_values":
        if getattr(cfg, "image_size", None) is None and getattr(cfg, "vision_config", None) is not None:
            cfg = cfg.vision_config  # (a composite config: CLIPForImageClassification's image size is its tower's)
        size, ch = getattr(cfg, "image_size", None) or 32, getattr(cfg, "num_channels", 3)  # (no image_size:
        if isinstance(size, int):                                       # a model for any size, e.g. Segformer)
            size = (size, size)
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and isinstance(ch, int)):
            return None
        return {"pixel_values": torch.randn(2, ch, *size, generator=g, device="cpu")}
    return None


def _not_verified(model: nn.Module, why: str) -> None:
    import warnings

    warnings.warn(f"from_transformers(verify=True): the {type(model).__name__} {why}, so its layout was not "
                  "verified on the model itself; run nest.check(example) on an input of yours (once the model "
                  "holds its weights)", stacklevel=4)


def _self_check(nest: Nest) -> None:
    """``from_transformers(verify=True)``: see its docstring."""
    from ..check import first_float, whole_units_error
    from ..modes import dry_run, eval_mode
    from ..views import is_sharded

    model = nest.model
    tensors = [*model.parameters(), *model.buffers()]
    if not tensors:
        return
    why = ("is on the meta device" if any(t.is_meta for t in tensors) else
           "is sharded" if any(is_sharded(t) for t in tensors) else None)
    example = None if why else _dummy_input(model)
    if example is None:
        _not_verified(model, why or "takes inputs this check cannot make up")
        return
    dev, fdtype = tensors[0].device, next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    example = {k: (v.to(dev, fdtype) if v.is_floating_point() else v.to(dev)) for k, v in example.items()}
    cls = type(model).__name__
    full = {d.name: d.full for d in nest.dims}
    tol = 1e-3 if fdtype in (torch.float32, torch.float64) else 5e-2
    why = ("; nest it without {name}=, or describe it with register_layout (from_transformers(..., verify=False) "
           "skips this check)")
    with dry_run(model), eval_mode(nest) as (view, copies), torch.no_grad():
        try:
            with nest.use(nest.largest):
                view(**example)
        except Exception as e:  # the full model itself does not run on this input here (e.g. float16 on a
            _not_verified(model, f"does not run on the input this check makes up ({type(e).__name__})")  # CPU)
            return
        for sub, what in [*((nest.resolve({**full, d.name: d.sizes[0]}), d) for d in nest.dims
                            if d.name in ("ffn", "heads") and d.sizes[0] < d.full), (nest.smallest, None)]:
            name = what.name if what is not None else "the smallest sub-model"
            with nest.use(sub):
                try:
                    first_float(view(**example))
                except Exception as e:
                    raise SortedNetError(f"from_transformers: {sub} ({name} at its smallest) of {cls} fails on a "
                                         f"small input: {type(e).__name__}: {e}. This family's layout is not "
                                         "supported for that" + _per_head_hint(nest, what)
                                         + why.format(name=name)) from e
            if what is None:
                continue
            err = whole_units_error(nest, what, what.sizes[0], example, view, copies)
            if err is not None and not err <= tol:
                unit = "heads" if what.name == "heads" else "FFN neurons"
                raise SortedNetError(
                    f"from_transformers: {what.name}={what.sizes[0]} of {cls} is not the first {what.sizes[0]} whole "
                    f"{unit} of the full model (relative difference {err:.3g} from the full model with the others "
                    "masked): this architecture "
                    + ("mixes heads (norms over all heads, position biases built for every head) or packs its "
                       "projections in another order than the layout says" if what.name == "heads" else
                       "does not use its FFN neurons independently") + why.format(name=what.name))


def _rank_dim(model: nn.Module, found: Found, rank: Sequence[int], mode: str,
              targets: Sequence[str] | None) -> Rank:
    lay = found.layout
    given = targets is not None
    if targets is None:
        qkv = [] if lay.qkv is None else [lay.qkv] if isinstance(lay.qkv, str) else list(lay.qkv)
        targets = [f"{a}.{p}" for a in lay.attn for p in (*qkv, lay.o) if p] + list(lay.ffn_out + lay.ffn_inp)
    targets = list(dict.fromkeys(targets))
    # every block of every stack: blocks of one model may differ (dense and mixture-of-experts layers)
    blocks = [(i, b) for i, P in enumerate(found.stacks) for b in model.get_submodule(P)]
    hits = {t: [(i, b, r) for i, b in blocks for r in glob_children(b, t)] for t in targets}
    missing = [t for t in targets if not hits[t]]
    if missing and (given or len(missing) == len(targets)):
        blk = found.block(model)
        linears = [n for n, m in blk.named_modules() if isinstance(m, nn.Linear)]
        raise SortedNetError(f"from_transformers(rank_targets={targets}): {missing} match no module of any "
                             f"{lay.family} block (paths are relative to a block; its Linear layers: {linears})")
    bad = sorted({r for t in targets for _, b, r in hits[t] if not isinstance(b.get_submodule(r), nn.Linear)})
    if bad:
        kind = next(type(b.get_submodule(r)).__name__ for t in targets for _, b, r in hits[t] if r == bad[0])
        raise SortedNetError("from_transformers(rank=...): rank targets must be nn.Linear, but "
                             + (f"rank_targets= names {kind} at {bad}; pick nn.Linear ones" if given else
                                f"the {lay.family} layout has {kind} at {bad}; use ffn=/heads=/depth= for this "
                                "model (or rank_targets= to pick nn.Linear ones)"))
    if not isinstance(rank, (int, str, bytes)) and isinstance(rank, Iterable):
        rank = list(rank)  # (once: a generator read by the test below would be empty after it)
    if isinstance(rank, (int, str, bytes)) or any(isinstance(r, float) for r in rank):
        raise SizeError(f"rank: sizes must be a list of integer ranks, got {rank!r}")
    patterns = [f"{P}.*.{t}" for i, P in enumerate(found.stacks) for t in sorted(targets)
                if any(h[0] == i for h in hits[t])]
    # the stock class stores full weights: svd factors are multiplied back on export, and cost counts that
    return Rank("rank", list(rank), targets=patterns, mode=mode, **({"export": "merged"} if mode == "svd" else {}))


def _ffn_out_path(block: nn.Module, lay: Layout, cls: str) -> str:
    """The first FFN output projection of ``block`` (a layout may list alternatives, e.g. T5's wi / wi_0)."""
    for pat in lay.ffn_out:
        hits = glob_children(block, pat)
        if hits:
            return hits[0]
    raise SortedNetError(f"from_transformers: a {lay.family} block of {cls} has none of the FFN projections "
                         f"{list(lay.ffn_out)} ({type(block).__name__}); its FFN is not supported: nest heads= / "
                         "depth= only, or describe it with register_layout")


def _head_counts(cfg, lay: Layout, tower: str | None = None, model: nn.Module | None = None) -> tuple[int, int]:
    """(query heads, query heads per key/value head) from the config (its ``tower``'s, or its text config; the
    decoder's count for a decoder ``model`` of an encoder-decoder config)."""
    key = lay.heads_key if model is None else _tower_key(model, cfg, lay.heads_key, tower)
    cfg = _holder(cfg, key, tower)
    n = getattr(cfg, key)
    kv = (getattr(cfg, lay.kv_key, None) if lay.kv_key else None) or n
    if not (isinstance(n, int) and isinstance(kv, int)):
        raise SortedNetError(f"from_transformers(heads=...): {type(cfg).__name__}.{lay.heads_key} is {n!r}, not one "
                             "head count (stages with different head counts are not supported): nest ffn= / depth= "
                             "only")
    if lay.family == "falcon" and getattr(cfg, "multi_query", False) and not cfg.new_decoder_architecture:
        kv = 1
    if lay.family == "gpt2" and getattr(cfg, "model_type", "") == "gpt_bigcode" and getattr(cfg, "multi_query", True):
        kv = 1  # (GPTBigCode, detected as gpt2: one key / value head, GPTBigCodeConfig's default)
    return n, n // kv


def _class_name(m: nn.Module) -> str:
    """The name of ``m``'s own class (a wrapped module's, not the sliced subclass's)."""
    cls = type(m).__bases__[0] if getattr(type(m), "_sn_sliced", False) else type(m)
    return cls.__name__


def _layout_of(nest: Nest) -> Found:
    """The layout of a nest's model; for a nest declared by hand, an error that does not ask for it again."""
    found = getattr(nest, "_hf", None)
    if found is not None:
        return found
    try:
        return detect(nest.model)
    except SortedNetError as e:
        if "does not know the layout" not in str(e):
            raise
        raise SortedNetError(
            f"this nest's dimensions were declared by hand on a {_class_name(nest.model)}, whose layout (layer "
            "list, FFN and attention paths, config keys) sortednet does not know; describe it once with "
            "sortednet.integrations.register_layout(Layout(...)) (see docs/transformers.md)") from None


def export_pretrained(nest: Nest, sub: SubModelLike | None = None) -> nn.Module:
    """Export ``sub`` as a standard ``PreTrainedModel`` whose config matches its shapes.

    ``save_pretrained`` of the result loads with ``from_pretrained`` of the
    same class. ``nest.export(sub)`` does the same for any ``PreTrainedModel``.
    Sub-models no stock config can describe (fewer heads where the config
    derives the head size from hidden size / heads, layers of different sizes)
    raise; ``nest.export(sub, plain=True)`` gives them as plain modules.
    Ordered SVD factors (``rank_mode="svd"``) are multiplied back into full
    weights, as the stock class stores them.

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
    if not isinstance(nest.model, PreTrainedModel):
        raise SortedNetError(f"export_pretrained needs a transformers PreTrainedModel, got {type(nest.model).__name__}")
    return nest.export(sub)


def _export_hook(nest: Nest, sub: SubModel, small: nn.Module) -> nn.Module:
    """``nest.export`` of a ``PreTrainedModel``: merge SVD factors, then a config that matches the shapes."""
    if not isinstance(nest.model, PreTrainedModel):
        return small
    _merge_factors(nest, small)
    unknown = None
    try:
        found = _layout_of(nest)
    except SortedNetError as e:
        found, unknown = None, str(e)
    cfg = copy.deepcopy(nest.model.config)
    try:
        if found is not None:
            _update_config(nest, found, sub, small, cfg)
        fresh = _check_loadable(small, cfg, sub, found, nest.model.config, unknown)
    except SortedNetError:
        raise
    except Exception as e:  # a config this code cannot rewrite (per-layer attributes, ...)
        raise SortedNetError(f"export({sub}) of {type(nest.model).__name__}: its config cannot be rewritten for the "
                             f"smaller shapes ({type(e).__name__}: {e}); export it as a plain module with "
                             "nest.export(sub, plain=True) (save it with torch.save)") from e
    _set_config(small, cfg, [(p, r[5:].split(".")[0]) for p, m in nest._sliced.items() for r in m._sn.bind
                             if r.startswith("attr:") and "." in r])
    _export_computes_live(nest, sub, small, fresh)
    return small


def _export_computes_live(nest: Nest, sub: SubModel, small: nn.Module, fresh: nn.Module) -> None:
    """The export, and the class built from its config as ``from_pretrained`` builds it (``fresh``, on the meta
    device: given the export's tensors, no copy), must compute the live sub-model on the small input
    ``from_transformers`` verifies with: a class that reads a changed config value in its forward (a softmax
    scale from ``config.hidden_size / config.num_attention_heads`` with an explicit head size) or keeps a number
    derived from it (a block's layer count for a MiniCPM-style residual scale) computes another network than the
    live sub-model, which kept the full model's values, and no shape tells. Skipped where that input cannot be
    made or the live model does not run on it (a meta-device or sharded model)."""
    from ..check import _TINY, _rel_diff, first_float
    from ..modes import dry_run, eval_mode, seeded
    from ..views import is_sharded

    model = nest.model
    tensors = [*model.parameters(), *model.buffers()]
    if not tensors or any(t.is_meta or is_sharded(t) for t in tensors):
        return
    example = _dummy_input(model)
    if example is None:
        return
    dev, fdtype = tensors[0].device, next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    example = {k: (v.to(dev, fdtype) if v.is_floating_point() else v.to(dev)) for k, v in example.items()}
    with dry_run(model), eval_mode(nest) as (view, _), torch.no_grad():
        if "_original_forward" in model.__dict__ and "forward" in view.__dict__ and view.__dict__ is not \
                model.__dict__:  # (accelerate's mixed-precision wrapper, an autocast around the class's forward
            del view.__dict__["forward"]  # bound to the model itself: the export runs without it, compared so)
        try:  # (under one random stream, as each export below: a forward that draws in eval mode, ViTMAE's
            with nest.use(sub), seeded(0):  # masking noise, draws the same)
                live = first_float(view(**example, use_cache=False) if _takes_cache(view) else view(**example))
        except Exception:  # (the live model does not run on this input: nothing to compare)
            return
    if live is None:
        return
    rebuilt = _given_tensors(fresh, small)
    tol = 1e-3 if fdtype in (torch.float32, torch.float64) else 5e-2
    for what, m in (("the exported model", small), ("a model built from its config (from_pretrained)", rebuilt)):
        if m is None:
            continue
        modes = [(x, x.training) for x in m.modules()]
        try:
            m.eval()
            with torch.no_grad(), seeded(0):
                try:
                    out = first_float(m(**example, use_cache=False) if _takes_cache(m) else m(**example))
                except Exception as e:
                    raise SortedNetError(f"export({sub}) of {type(model).__name__}: {what} fails on a small input "
                                         f"the live sub-model runs ({type(e).__name__}: {str(e)[:200]}); export it as "
                                         "a plain module with nest.export(sub, plain=True)") from e
        finally:
            for x, flag in modes:
                x.training = flag
        diff = (_rel_diff(out.double(), live.double(), _TINY) if out is not None and out.shape == live.shape
                else math.inf)
        if not diff <= tol:
            same = _config_dict(getattr(small, "config", None)) == _config_dict(getattr(model, "config", None))
            why = ("its config is the full model's, so the model differs from what its class builds from that "
                   "config (a module replaced or changed after the model was built)" if same else
                   "the class reads a rewritten config value in its forward (a scale from config.hidden_size / "
                   "config.num_attention_heads) or keeps a number derived from it (a layer count for a residual "
                   "scale), where the live sub-model keeps the full model's")
            merged = any(d.kind == "rank" for d in nest.dims) and fdtype not in (torch.float32, torch.float64)
            raise SortedNetError(
                f"export({sub}) of {type(model).__name__}: {what} computes other outputs than the live sub-model "
                f"(by {diff:.3g} relative to their scale, more than {tol:g}): {why}"
                + ("; or the Rank factors merged into 16-bit weights round that far (export from a float32 copy)"
                   if merged else "") + "; export it as a plain module with nest.export(sub, plain=True)")


def _config_dict(cfg: Any) -> Any:
    try:
        return cfg.to_dict() if cfg is not None else None
    except Exception:
        return id(cfg)


def _given_tensors(fresh: nn.Module, small: nn.Module) -> nn.Module | None:
    """``fresh`` (built on the meta device) holding ``small``'s tensors themselves (no copy), or None where it
    cannot (a tensor of its own that ``small`` does not hold)."""
    flags = [(p, p.requires_grad) for p in small.parameters()]
    try:
        fresh.load_state_dict(small.state_dict(keep_vars=True), strict=True, assign=True)
    except Exception:
        return None
    finally:  # (assign=True gives the export's own parameters the meta model's requires_grad: put back)
        for p, flag in flags:
            p.requires_grad_(flag)
    own = dict(small.named_buffers(remove_duplicate=False))
    for name, b in list(fresh.named_buffers(remove_duplicate=False)):
        if b.is_meta:  # (a buffer left out of the state dict: a rotary table)
            if name not in own:
                return None
            path, _, key = name.rpartition(".")
            fresh.get_submodule(path)._buffers[key] = own[name]
    if any(t.is_meta for t in (*fresh.parameters(), *fresh.buffers())):
        return None
    return fresh


def _takes_cache(model: nn.Module) -> bool:
    import inspect

    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _merge_factors(nest: Nest, small: nn.Module) -> None:
    """Replace each exported ``Sequential(V, U)`` of a Rank target by one ``nn.Linear`` holding ``U @ V``."""
    paths = [p for p, m in nest._sliced.items() if "rank" in m._sn.bind and isinstance(m, nn.Linear)]
    for p in paths:
        try:
            f = small.get_submodule(p)
        except AttributeError:
            continue
        if isinstance(f, nn.Sequential):  # factored: cost counted the factors, the stock class cannot hold them
            dim = nest._sliced[p]._sn.bind["rank"].dim
            raise SortedNetError(f"export of {type(nest.model).__name__}: Rank {dim.name!r} (export={dim.export!r}) "
                                 f"writes {p!r} as two factors, which the stock class cannot hold, and merging them "
                                 "would hold more parameters than cost() counted; declare it with export='merged' "
                                 "(from_transformers does), or export with plain=True")
    for p in paths:
        try:
            f = small.get_submodule(p)
        except AttributeError:
            continue  # in a block that depth dropped
        if isinstance(f, nn.Sequential) and len(f) == 2:
            v, u = f
            lin = nn.Linear(v.in_features, u.out_features, bias=u.bias is not None, device=u.weight.device,
                            dtype=u.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(u.weight @ v.weight)
                if u.bias is not None:
                    lin.bias.copy_(u.bias)
            lin.weight.requires_grad_(u.weight.requires_grad)
            parent, _, name = p.rpartition(".")
            setattr(small.get_submodule(parent) if parent else small, name, lin)


# per-layer config lists that follow the kept layers
_PER_LAYER = ("layer_types", "mlp_layer_types", "attention_window", "no_rope_layers", "activation_sparsity_pattern")


def _has_key(cfg, key: str, tower: str | None = None) -> bool:
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
    return hasattr(cfg, key) or (text is not None and hasattr(text, key)) or \
        (tower is not None and hasattr(getattr(cfg, tower, None), key))


def _other_towers_key(model: nn.Module, keys: Sequence[str]) -> str | None:
    """For the decoder tower of an encoder-decoder model nested alone, the first of the layout's config ``keys``
    that is the encoder's there (BartConfig maps ``num_hidden_layers`` to ``encoder_layers``, T5's ``num_layers``
    sits beside ``num_decoder_layers``), described; None elsewhere."""
    cfg = getattr(model, "config", None)
    if cfg is None or not getattr(cfg, "is_encoder_decoder", False):
        return None
    if not (getattr(model, "is_decoder", False) is True or "Decoder" in type(model).__name__):
        return None
    if getattr(cfg, "is_decoder", False) is True:  # the tower's own config copy (T5's decoder: num_layers is its own)
        return None
    amap = getattr(type(cfg), "attribute_map", None) or {}
    for key in keys:
        real = amap.get(key, key)
        theirs = next((c for c in (real.replace("encoder_", "decoder_"), real.replace("num_", "num_decoder_", 1))
                       if c != real and hasattr(cfg, c)), None)
        if theirs is not None and "decoder" not in real:
            return (f"{type(model).__name__} is the decoder tower of an encoder-decoder model, and "
                    f"{type(cfg).__name__}.{key} is the encoder's there ({real}; this tower's is {theirs})")
    return None


def _tower_key(model: nn.Module, cfg, key: str, tower: str | None = None) -> str:
    """``key`` as the config of an encoder-decoder model names it for the tower nested alone, where it has no
    shared one (BartConfig: ``encoder_ffn_dim`` / ``decoder_ffn_dim`` for the OPT-style layout's ``ffn_dim``; a
    decoder built alone from such a config, BartForCausalLM, reads the decoder's)."""
    if cfg is None:
        return key
    decoder = getattr(model, "is_decoder", False) is True or "Decoder" in type(model).__name__ or \
        getattr(cfg, "is_decoder", False) is True and not getattr(cfg, "is_encoder_decoder", False) or \
        not getattr(cfg, "is_encoder_decoder", False) and _decoder_alone(model)
    real = (getattr(type(cfg), "attribute_map", None) or {}).get(key, key)
    if decoder and real.startswith("encoder_") and hasattr(cfg, f"decoder_{real[8:]}"):
        return f"decoder_{real[8:]}"  # (BartConfig maps num_hidden_layers to the encoder's encoder_layers)
    if _has_key(cfg, key, tower) or not (decoder or getattr(cfg, "is_encoder_decoder", False)):
        return key
    own = f"{'decoder' if decoder else 'encoder'}_{key}"
    return own if hasattr(cfg, own) else key


def _decoder_alone(model: nn.Module) -> bool:
    """Whether ``model`` holds a decoder tower and no encoder (WhisperForCausalLM's ``model.decoder``, built from
    an encoder-decoder config without marking it a decoder)."""
    names = {n for path, _ in model.named_modules() for n in path.split(".")}
    return "decoder" in names and "encoder" not in names


def _tower_name(model: nn.Module, stack: str) -> str | None:
    """The name of the sub-config (``vision_config``) that describes the tower holding the layer list ``stack``,
    where the model's config is a composite one (SigLIP's and CLIP's image classifiers keep the vision tower of a
    config that also has a text tower): the config of the nearest module above the list that has one of its own
    class, matched by class to exactly one of the composite config's sub-configs; None elsewhere."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    subs = {n: v for n, v in vars(cfg).items() if n.endswith("_config") and type(v) is not type(cfg)
            and hasattr(v, "to_dict") and hasattr(v, "model_type")}
    parts = stack.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            c = getattr(model.get_submodule(".".join(parts[:i])), "config", None)
        except AttributeError:
            continue
        if c is None or c is cfg or type(c) is type(cfg) or not hasattr(c, "to_dict"):
            continue
        names = [n for n, v in subs.items() if type(v) is type(c)]
        return names[0] if len(names) == 1 else None
    return None


def _holder(cfg, key: str, tower: str | None = None):
    """The config object holding ``key``: the sub-config ``tower`` names (:func:`_tower_name`), ``cfg`` itself, or
    its text config (a vision-language model)."""
    own = getattr(cfg, tower, None) if tower else None
    if own is not None and hasattr(own, key):
        return own
    if hasattr(cfg, key):
        return cfg
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
    if text is not None and text is not cfg and hasattr(text, key):
        return text
    raise SortedNetError(f"{type(cfg).__name__} has no {key!r} (nor has its text config), the config key the "
                         "layout names: where the config holds this size under another name, describe this family's "
                         "keys with register_layout (docs/transformers.md); where it derives the size (BLOOM's FFN "
                         "of 4x the hidden size, DINOv2's mlp_ratio) no config describes the sub-model: export it "
                         "as a plain module, nest.export(sub, plain=True)")


def _ffn_size(block: nn.Module, lay: Layout, cls: str) -> int | None:
    """The FFN width of an exported block (None when its FFN has no slicer: not nested, unchanged)."""
    m = block.get_submodule(_ffn_out_path(block, lay, cls))
    sl = slicer_for(m)
    return None if sl is None else sl.full(m, "out") // lay.ffn_chunks


#: config keys a family may hold its FFN width under beside the layout's own (a mixture of experts sized apart
#: from the dense MLP: Qwen3-MoE's experts read ``moe_intermediate_size``, its dense layers ``intermediate_size``)
_FFN_KEYS = ("moe_intermediate_size", "intermediate_size")


def _ffn_keys_holding(cfg, key: str, tower: str | None, full: int) -> tuple[str, ...]:
    """The config keys an export writes the FFN width to: ``key`` (the layout's) and each other of
    :data:`_FFN_KEYS` whose value is the full model's FFN width ``full``, first the layout's where it holds it
    (the experts are built from one of them, whichever the family reads: Qwen3-MoE's from
    ``moe_intermediate_size`` beside an ``intermediate_size`` of the same value, which only dense layers, none
    here, would read; the export comparison verifies the result either way)."""
    def value(k: str) -> Any:
        try:
            return getattr(_holder(cfg, k, tower), k)
        except SortedNetError:
            return None

    if isinstance(value(key), (list, tuple)):
        return (key,)
    same = tuple(k for k in _FFN_KEYS if k != key and value(k) == full)
    return (key, *same) if value(key) == full else same or (key,)


def _ffn_nested(nest: Nest, found: Found, cls: str) -> bool:
    """Whether a width cuts the FFN (the outputs of the first block's FFN projection), whatever its name: an
    ``ffn=`` of from_transformers, a Width of one's own, or discover's one per layer."""
    lay = found.layout
    stack = nest.model.get_submodule(found.stacks[0])
    if not lay.ffn_out or not stack._modules:
        return False
    block = next(iter(stack._modules.values()))
    try:
        m = block.get_submodule(_ffn_out_path(block, lay, cls))
    except SortedNetError:
        return False
    state = getattr(m, "_sn", None)
    return state is not None and any(isinstance(b.dim, Width) for r, b in state.bind.items() if r == "out")


def _update_config(nest: Nest, found: Found, sub: SubModel, small: nn.Module, cfg) -> None:
    lay = found.layout
    cls = type(nest.model).__name__
    other = _other_towers_key(nest.model, lay.depth_keys)
    nested_ffn = _ffn_nested(nest, found, cls)  # (heads= / depth= alone: the FFN is as it was, whatever it is)
    b0 = found.block(small, 0, 0) if nested_ffn and len(small.get_submodule(found.stacks[0])) else None
    full0 = found.block(nest.model, 0, 0) if b0 is not None and lay.ffn_out else None
    keep_ffn = full0 is not None and _ffn_size(b0, lay, cls) == _ffn_size(full0, lay, cls)
    tower = _tower_name(nest.model, found.stacks[0])
    ffn_key = _tower_key(nest.model, cfg, lay.ffn_key, tower)
    also: tuple[str, ...] = ()
    if full0 is not None and (full := _ffn_size(full0, lay, cls)) is not None:  # the keys holding the experts'
        ffn_key, *rest = _ffn_keys_holding(cfg, ffn_key, tower, full)  # width, where the layout's holds another
        also = tuple(rest)                                                # (Qwen3-MoE), or beside it
    if b0 is not None and lay.ffn_out and not (keep_ffn and not _has_key(cfg, ffn_key, tower)):
        h = _holder(cfg, ffn_key, tower)  # (a config without the key is fine while the FFN width is unchanged)
        if isinstance(getattr(h, ffn_key), (list, tuple)):  # one value per layer (Gemma3n)
            sizes = [_ffn_size(b, lay, cls) for b in small.get_submodule(found.stacks[0])]
            if None not in sizes:
                setattr(h, ffn_key, type(getattr(h, ffn_key))(sizes))
        elif (n := _ffn_size(b0, lay, cls)) is not None:
            setattr(h, ffn_key, n)
            for k in also:
                setattr(_holder(cfg, k, tower), k, n)
    for P, key in zip(found.stacks, lay.depth_keys):
        own = _tower_key(nest.model, cfg, key, tower)
        h = _holder(cfg, own, tower)
        L0, L = getattr(h, own), len(small.get_submodule(P))
        n_all = len(nest.model.get_submodule(P)._modules)  # (its len() is the active depth under use)
        if other is not None and own == key:  # the key counts the encoder's layers: left as it is, at full depth only
            if L == n_all:
                continue
            raise SortedNetError(f"{other}: no config value describes the shallower sub-model; export it as a "
                                 "plain module, nest.export(sub, plain=True)")
        if L0 != n_all:  # the list is run more than once (ALBERT's shared group)
            raise SortedNetError(f"{cls}: its config's {own!r} is {L0} but {P!r} holds "
                                 f"{n_all} layers (the model runs them several times, or "
                                 "the key counts something else), so no config value describes the sub-model; "
                                 "export it as a plain module, nest.export(sub, plain=True)")
        setattr(h, own, L)
        for k in (*_PER_LAYER, *((ffn_key,) if lay.ffn_out else ())):
            v = getattr(h, k, None)
            if isinstance(v, (list, tuple)) and len(v) == L0:
                setattr(h, k, type(v)(v[:L]))
        if L < L0 and "_heterogeneity_spec" in h.__dict__:  # overrides by layer index (transformers' heterogeneous
            per = h.to_dict().get("per_layer_config")        # configs: Gemma 4's full-attention layers)
            index = {k: int(k) if isinstance(k, int) or (isinstance(k, str) and k.isdigit()) else None
                     for k in per} if isinstance(per, dict) else None
            if index is None or any(i is None or i >= L0 for i in index.values()):
                raise SortedNetError(f"{cls}: its config's per-layer overrides ({str(per)[:120]}) are not by index of "
                                     f"its {L0} layers, so no config describes the first {L}; export it as a plain "
                                     "module, nest.export(sub, plain=True)")
            h.per_layer_config = {k: v for k, v in per.items() if index[k] < L}  # (validated against the new count)
        _fit_backbone_stages(h, L0, L, sub, _is_backbone(nest.model))
    kept = {n for n, _ in small.named_modules()}  # a Heads of layers the sub-model's depth drops describes nothing
    heads = [d for d in nest.dims if isinstance(d, Heads)
             and any(path in kept and any(b.dim.name == d.name for b in m._sn.bind.values())
                     for path, m in nest._sliced.items())]
    if not heads or all(sub[d.name] == d.full for d in heads):
        return  # (a family without heads, or none sliced: no head count read)
    n_heads, group = _head_counts(nest.model.config, lay, tower, nest.model)
    if lay.head_dim_key is None:
        raise SortedNetError(
            f"{type(nest.model).__name__}: a sub-model with fewer attention heads ({sub}) cannot be loaded by the "
            f"stock class, whose config derives the head size from hidden size / {lay.heads_key}; export it as a "
            "plain module with nest.export(sub, plain=True) (save it with torch.save), or keep all heads")
    n = sub[heads[0].name]
    hkey = _tower_key(nest.model, cfg, lay.heads_key, tower)
    h = _holder(cfg, hkey, tower)
    d = getattr(h, lay.head_dim_key, None) or h.hidden_size // n_heads
    setattr(h, lay.head_dim_key, d)
    setattr(h, hkey, n)
    if lay.kv_key and getattr(h, lay.kv_key, None):
        setattr(h, lay.kv_key, 1 if group == n_heads else n // group)  # (multi-query: one key/value head)


def _per_head_hint(nest: Nest, what: object) -> str:
    """`` (the attention holds per-head tensors that no slicer cuts: ...)`` for a Heads dimension ``what`` whose
    attentions hold a tensor with an axis of the full head count outside every sliced module (GPT-OSS's attention
    sinks, Cohere's per-head query / key norms), else ``""``."""
    if not isinstance(what, Heads):
        return ""
    n = what.full
    parents = {p.rsplit(".", 1)[0] if "." in p else "" for p, m in nest._sliced.items()
               if any(b.dim is what for b in m._sn.bind.values())}
    found: list[str] = []
    for parent in sorted(parents):
        for sub, m in nest.model.get_submodule(parent).named_modules():
            path = f"{parent}.{sub}" if sub and parent else sub or parent
            if path in nest._sliced:
                continue
            for k, t in [*m._parameters.items(), *m._buffers.items()]:
                if isinstance(t, torch.Tensor) and n in t.shape and len(found) < 3:
                    found.append(f"{path + '.' if path else ''}{k} {tuple(t.shape)}")
    return (f" (the attention holds per-head tensors that no slicer cuts: {', '.join(found)}; a child module holding "
            "one per query head nests by hand: sn.wrap(model, sn.Heads(..., per_head=[child])) with a slicer for "
            "it, docs/heads.md)" if found else "")


def _is_backbone(model: nn.Module) -> bool:
    """A transformers backbone (``...Backbone``, which returns the feature maps its config's out_indices name)."""
    return any(c.__name__ == "BackboneMixin" for c in type(model).__mro__)


def _fit_backbone_stages(cfg, L0: int, L: int, sub: SubModel, backbone: bool) -> None:
    """A backbone config names one stage per layer (``stage_names``, ``out_features`` / ``out_indices``): keep
    the first ``L`` stages. A backbone's outputs past them cannot be exported (the live sub-model gives no
    feature map for them; from_transformers refuses such depths); other models of a backbone config do not
    use them, so the default output (the last stage) stays the last one."""
    names = getattr(cfg, "stage_names", None)
    if L == L0 or not (isinstance(names, list) and len(names) == L0 + 1
                       and hasattr(cfg, "set_output_features_output_indices")):
        return
    old = [i % len(names) for i in (getattr(cfg, "out_indices", None) or [L0])]
    new = [L] if old == [L0] and not backbone else old
    if any(i > L for i in new):
        raise SortedNetError(f"sub-model {sub}: the config's backbone outputs {getattr(cfg, 'out_features', None)} "
                             f"name stages beyond the {L} layers kept; export it with nest.export(sub, plain=True) "
                             "or choose out_indices within the kept layers")
    cfg.stage_names = names[:L + 1]
    cfg.set_output_features_output_indices(out_features=None, out_indices=new)


def _set_config(model: nn.Module, cfg, sliced: Sequence[tuple[str, str]] = ()) -> None:
    """Point the exported model and every sub-module that held the old config (or one of its sub-configs) at
    the new one; also ``(path, attribute)`` in ``sliced``: attention modules whose head count lives in their
    config, which the export gave a copy of the config read under ``use(sub)``."""
    old = model.config
    new = {id(old): cfg}
    for k, v in vars(old).items():  # sub-configs (a vision-language model's text_config, ...)
        if isinstance(v, PretrainedConfig) and isinstance(getattr(cfg, k, None), PretrainedConfig):
            new[id(v)] = getattr(cfg, k)
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if id(v) in new:
                m.__dict__[k] = new[id(v)]
    for path, attr in sliced or ():  # a config attribute the sliced module read as a copy (fewer heads)
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue  # in a block depth dropped
        if type(m.__dict__.get(attr)) is type(old):
            m.__dict__[attr] = cfg
    model.config = cfg


def _round_trip(cfg) -> tuple[Any, list[str]]:
    """``cfg`` as ``from_pretrained`` reads it back (``to_dict`` then ``from_dict``, whose ``__post_init__`` may
    rewrite values), and the keys whose values differ from ``cfg``'s."""
    back = type(cfg).from_dict(cfg.to_dict())
    a, b = cfg.to_dict(), back.to_dict()
    return back, sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _check_loadable(small: nn.Module, cfg, sub, found: Found | None, full_cfg: Any = None,
                    unknown: str | None = None) -> nn.Module:
    """The class built from ``cfg`` must have exactly the exported shapes (uniform sub-models only), and ``cfg``
    must read back as written (a config class that rewrites a value on load, Gemma 4 making the last layer full
    attention, or refuses it, would load another model, or none). Returns the class built from ``cfg`` on the
    meta device (what ``from_pretrained`` builds, before its weights)."""
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as e:  # e.g. hidden size not a multiple of the head count: save_pretrained would refuse
            raise SortedNetError(f"sub-model {sub} cannot be described by a valid {type(cfg).__name__}: {e}; export "
                                 "it as a plain module with nest.export(sub, plain=True)") from None
    if hasattr(cfg, "to_dict") and hasattr(type(cfg), "from_dict"):
        try:
            _, changed = _round_trip(cfg)
        except Exception as e:
            raise SortedNetError(f"sub-model {sub}: the {type(cfg).__name__} written for it does not load back "
                                 f"({type(e).__name__}: {str(e)[:200]}), so from_pretrained of the export would fail; "
                                 "export it as a plain module with nest.export(sub, plain=True)") from None
        if full_cfg is not None and changed:  # (what the full model's own config does on a round trip is no news)
            try:
                changed = [k for k in changed if k not in _round_trip(full_cfg)[1]]
            except Exception:
                pass
        if changed:
            a, b = cfg.to_dict(), type(cfg).from_dict(cfg.to_dict()).to_dict()
            k = changed[0]
            raise SortedNetError(f"sub-model {sub}: {type(cfg).__name__} rewrites {changed[:3]} when the export is "
                                 f"loaded ({k}: {str(a.get(k))[:120]} -> {str(b.get(k))[:120]}), so from_pretrained "
                                 "would build a model computing something else; export it as a plain module with "
                                 "nest.export(sub, plain=True)")
    with torch.device("meta"):
        fresh = type(small)(cfg)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    bad = [(k, have.get(k), want.get(k)) for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if bad:
        k, h, w = bad[0]
        stacks = tuple(f"{P}." for P in found.stacks) if found is not None else ()
        lacking = found is not None and all(h_ is None and not k_.startswith(stacks) for k_, h_, _ in bad)
        uneven = _uneven_layers(have, found, small, full_cfg) if found is not None and not lacking else None
        why = uneven or (
               f"the class builds {len(bad)} tensors this model does not have, outside its layers (e.g. {k!r}): "
               "the model was built with a constructor argument its config does not record (a tower made "
               "without its pooler, add_pooling_layer=False), so from_pretrained would build another model"
               if lacking else
               f"after setting the {found.layout.family} layout's config keys, the class still builds other "
               "shapes: the family derives a size from another key (e.g. a fixed FFN ratio, a head size from "
               "hidden / heads) or sizes some other part from the layer count"
               if found is not None else (
            f"no layout describes this {type(small).__name__}, so only its unchanged config was tried: "
            + (unknown[:400] if unknown else "describe it with sortednet.integrations.register_layout")))
        raise SortedNetError(
            f"sub-model {sub} cannot be described by {type(cfg).__name__} ({why}): {len(bad)} tensors differ, "
            f"e.g. {k!r} is {h} but the config gives {w}; export it as a plain module with "
            "nest.export(sub, plain=True)")
    drift = _derived_constants(small, fresh)
    if drift:
        path, k, h, w = drift[0]
        raise SortedNetError(
            f"sub-model {sub} cannot be described by {type(cfg).__name__}: the class derives a constant from the "
            f"changed config (e.g. from the layer count): {path or 'the model'}.{k} is {h:g} in the sub-model but "
            f"{w:g} in a model built from the exported config ({len(drift)} such values), so from_pretrained of the "
            "export would compute something else; export it as a plain module with nest.export(sub, plain=True)")
    return fresh


def _uneven_layers(have: dict[str, tuple], found: Found, small: nn.Module, full_cfg: Any) -> str | None:
    """Why no config describes a sub-model whose layers are cut unevenly (a width over some layers only, per-layer
    widths or head counts at other ratios, one tower's FFN), where that is so: the same tensor of the layers
    (by its module and name) has several shapes in the sub-model but one in the full model."""
    def by_tail(shapes: dict[str, tuple], whole: bool) -> dict[str, dict[tuple, list[str]]]:
        """Shapes by the tensor's path inside its layer (``whole``: BERT's intermediate.dense.bias and
        output.dense.bias apart), or by its last two names (a T5 decoder's FFN sits one sublayer later than the
        encoder's: the towers' FFNs compared)."""
        out: dict[str, dict[tuple, list[str]]] = {}
        for k, shape in shapes.items():
            for P in found.stacks:
                if k.startswith(f"{P}."):
                    i, _, rest = k[len(P) + 1:].partition(".")
                    tail = rest if whole else ".".join(rest.split(".")[-2:])
                    out.setdefault(tail, {}).setdefault(shape, []).append(f"{P}.{i}")
        return out

    ref: dict[str, tuple] = {}
    if full_cfg is not None:
        try:
            with torch.device("meta"):
                ref = {k: tuple(v.shape) for k, v in type(small)(full_cfg).state_dict().items()}
        except Exception:
            return None
    for whole in (True, False):
        full = by_tail(ref, whole)
        for tail, shapes in by_tail(have, whole).items():
            if len(shapes) > 1 and len(full.get(tail, {})) <= 1:
                (s1, at1), (s2, at2) = list(shapes.items())[:2]
                return (f"its layers are cut unevenly: {tail} is {s1} in {at1[0]} but {s2} in {at2[0]}, and one "
                        "config value sizes every layer (a width over some layers only, per-layer widths or head "
                        "counts at other ratios, one tower's FFN)")
    return None


def _derived_constants(small: nn.Module, fresh: nn.Module) -> list[tuple[str, str, float, float]]:
    """Float attributes of ``small``'s modules (a residual scale, a softmax scale) that a model built from the
    exported config sets otherwise: ``(path, name, exported, rebuilt)``. Rates of what runs only in training are
    left out (dropout, drop path, layer drop: users change them, and a family may space them over the layer
    count, as BEiT's drop path does)."""
    built = dict(fresh.named_modules())
    out = []
    for path, m in small.named_modules():
        other = built.get(path)
        if other is None or isinstance(m, nn.modules.dropout._DropoutNd) or "drop" in type(m).__name__.lower():
            continue
        for k, v in vars(m).items():
            w = other.__dict__.get(k)
            if (type(v) is float and type(w) is float and not k.startswith("_") and "drop" not in k.lower()
                    and not math.isclose(v, w, rel_tol=1e-9, abs_tol=0.0)):
                out.append((path, k, v, w))
    return out


EXPORT_HOOKS["transformers"] = _export_hook

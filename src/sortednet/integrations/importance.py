"""Importance sorting: put the most important FFN neurons and heads first.

Before sorted fine-tuning of a pretrained model, the units each layer keeps
in small sub-models should be its most important ones. Importance is the
first-order (DynaBERT / Taylor) score ``|dL/dmask|`` of a unit, accumulated
over batches: for a neuron or head feeding the down / output projection it
equals ``|sum(w * grad)|`` over that unit's input columns. Units are then
permuted within each layer, consistently in every projection that reads or
writes them, so the full model computes exactly the same function.
With grouped-query attention, whole key/value groups move together (ordered
by their summed score) and query heads are ordered within their group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..errors import SortedNetError
from ..nest import Nest
from ..slicers import Slicer
from .transformers import Found, _layout_of

__all__ = ["sort_by_importance"]


def _axes(m: nn.Module) -> tuple[int, int]:
    """(out axis, in axis) of a projection's weight (Conv1D stores it transposed)."""
    return (1, 0) if isinstance(m, Conv1D) else (0, 1)


def _score(m: nn.Module, unit: int) -> Tensor:
    """|sum(w * grad)| per group of ``unit`` input features of ``m``."""
    w = Slicer.tensor(m, "weight")
    if w.grad is None:
        raise SortedNetError(f"{type(m).__name__} got no gradient: does the loss depend on every layer?")
    _, ax = _axes(m)
    per = (w * w.grad).detach().sum(dim=1 - ax)
    return per.reshape(-1, unit).sum(1).abs()


def _permute(m: nn.Module, role: str, idx: Tensor) -> None:
    out_ax, in_ax = _axes(m)
    w = Slicer.tensor(m, "weight")
    ax = out_ax if role == "out" else in_ax
    w.data.copy_(w.data.index_select(ax, idx.to(w.device)))
    b = Slicer.tensor(m, "bias")
    if role == "out" and b is not None:
        b.data.copy_(b.data.index_select(0, idx.to(b.device)))


def _expand(order: Tensor, unit: int) -> Tensor:
    return (order[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return model(input_ids=batch, labels=batch).loss
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise SortedNetError("sort_by_importance: the model returned no loss; put labels in the batches "
                             "or pass loss_fn=lambda model, batch: ...")
    return out.loss


def sort_by_importance(nest: Nest, batches: Iterable[Any], *, loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                       ffn: bool = True, heads: bool = True) -> dict[str, dict[str, Tensor]]:
    """Permute FFN neurons and attention heads of every layer, most important first.

    The full model's outputs are unchanged. ``batches`` are dicts of model
    inputs with labels (or token tensors, used as their own labels), or
    anything ``loss_fn(model, batch)`` turns into a loss. Call before creating
    the optimizer. Returns the permutation applied per layer.

    >>> import torch, sortednet as sn
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50))
    >>> nest = sn.from_transformers(model, ffn=[64], heads=[2])
    >>> perms = sn.sort_by_importance(nest, [torch.randint(0, 50, (2, 8))])
    >>> sorted(perms["transformer.h.0"]), perms["transformer.h.0"]["heads"].shape
    (['ffn', 'heads'], torch.Size([4]))
    """
    if not isinstance(nest, Nest):
        raise SortedNetError(f"sort_by_importance needs a Nest (sn.from_transformers(...)), got {type(nest).__name__}")
    if any(d.kind == "rank" for d in nest.dims):
        raise SortedNetError("sort_by_importance permutes full weight matrices; run it on a nest without a rank "
                             "dimension (sort first, then nest.unwrap() and from_transformers(..., rank=...))")
    found: Found = _layout_of(nest)
    lay, model = found.layout, nest.model
    blocks = list(model.get_submodule(found.layers)._modules.values())
    n_heads = model.config.num_attention_heads
    kv = getattr(model.config, "num_key_value_heads", None) or n_heads
    group = n_heads // kv
    saved = {p: p.grad for p in model.parameters()}
    was_training = model.training
    ffn_s = [0.0] * len(blocks)
    head_s = [0.0] * len(blocks)
    n = 0
    try:
        model.eval()
        with nest.use(nest.largest), torch.enable_grad():
            for batch in batches:
                for p in model.parameters():
                    p.grad = None
                (loss_fn or _default_loss)(model, batch).backward()
                for i, blk in enumerate(blocks):
                    attn = blk.get_submodule(lay.attn)
                    d = getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None) \
                        or model.config.hidden_size // n_heads
                    ffn_s[i] = ffn_s[i] + _score(blk.get_submodule(lay.ffn_inp[0]), 1)
                    head_s[i] = head_s[i] + _score(attn.get_submodule(lay.o), d)
                n += 1
    finally:
        for p, g in saved.items():
            p.grad = g
        model.train(was_training)
    if n == 0:
        raise SortedNetError("sort_by_importance: batches is empty; give at least one batch")
    perms: dict[str, dict[str, Tensor]] = {}
    with torch.no_grad():
        for i, blk in enumerate(blocks):
            perms[f"{found.layers}.{i}"] = p = {}
            if ffn:
                p["ffn"] = order = torch.argsort(ffn_s[i], descending=True, stable=True)
                for path in lay.ffn_out:
                    _permute(blk.get_submodule(path), "out", order)
                for path in lay.ffn_inp:
                    _permute(blk.get_submodule(path), "inp", order)
            if heads:
                p["heads"] = _sort_heads(blk.get_submodule(lay.attn), lay, head_s[i], group)
    return perms


def _sort_heads(attn: nn.Module, lay, score: Tensor, group: int) -> Tensor:
    """Permute whole heads (whole key/value groups with GQA); returns the query-head order."""
    H = score.numel()
    by_group = score.reshape(H // group, group)
    g_order = torch.argsort(by_group.sum(1), descending=True, stable=True)
    within = torch.argsort(by_group[g_order], dim=1, descending=True, stable=True)
    q_order = (g_order[:, None] * group + within).reshape(-1)
    o = attn.get_submodule(lay.o)
    d = Slicer.tensor(o, "weight").shape[_axes(o)[1]] // H
    q_idx = _expand(q_order, d)
    if isinstance(lay.qkv, str):  # fused q|k|v along the output axis
        E = H * d
        _permute(attn.get_submodule(lay.qkv), "out", torch.cat([q_idx, q_idx + E, q_idx + 2 * E]))
    else:
        _permute(attn.get_submodule(lay.qkv[0]), "out", q_idx)
        kv_idx = _expand(g_order, d) if group > 1 else q_idx
        for name in lay.qkv[1:]:
            _permute(attn.get_submodule(name), "out", kv_idx)
    _permute(o, "inp", q_idx)
    return q_order

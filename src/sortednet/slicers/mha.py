"""nn.MultiheadAttention: whole heads of the packed q/k/v projection (``heads``)
and its input features (``inp``, the model's hidden width).

The packed ``in_proj_weight`` leaves no attribute that the stock forward
could read at a reduced head count (it derives head_dim from embed_dim), so
this is one of the two slicers that override ``forward``; at full size the
stock forward runs unchanged. The output projection is a child ``nn.Linear``
sliced by its own slicer. PyTorch's fused fast paths read full weights, so
wrap disables them for containing Transformer layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PatternError, SortedNetError
from ..views import plain
from .base import Slicer, slicer


def attention(mha: nn.Module, query: Tensor, key: Tensor, value: Tensor, heads: int,
              key_padding_mask: Tensor | None = None, need_weights: bool = True,
              attn_mask: Tensor | None = None, average_attn_weights: bool = True,
              is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention with ``heads`` heads of ``mha.head_dim``, reading
    ``mha.in_proj_weight`` / ``in_proj_bias`` / ``out_proj`` as they are now."""
    if query.is_nested or key.is_nested or value.is_nested:
        return _nested(mha, query, key, value, heads, key_padding_mask, need_weights, attn_mask,
                       average_attn_weights, is_causal)
    _check_inputs(mha, query, key, value, heads)
    batched = query.dim() == 3
    batch_first = mha.batch_first and batched  # an unbatched (L, E) input is one sequence either way
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    L, B, _ = query.shape
    S = key.shape[0]
    _check_masks(mha, attn_mask, key_padding_mask, B, L, S, heads)
    d = mha.head_dim
    w, b = plain(mha.in_proj_weight), plain(mha.in_proj_bias)
    n = heads * d
    bq, bk, bv = (None, None, None) if b is None else b.split(n)
    q = F.linear(query, w[:n], bq).view(L, B, heads, d).permute(1, 2, 0, 3)
    k = F.linear(key, w[n:2 * n], bk).view(S, B, heads, d).permute(1, 2, 0, 3)
    v = F.linear(value, w[2 * n:], bv).view(S, B, heads, d).permute(1, 2, 0, 3)
    mask = None
    if attn_mask is not None:
        mask = attn_mask
        if mask.dim() == 3:  # (B * H_full, L, S): keep the active heads
            mask = mask.view(B, -1, L, S)[:, :heads]
        mask = _additive(mask, "attn_mask", q.dtype)
    if key_padding_mask is not None:
        kpm = _additive(key_padding_mask.view(B, 1, 1, S), "key_padding_mask", q.dtype)
        mask = kpm if mask is None else mask + kpm  # (promoted as PyTorch adds them: then checked as one)
    if mask is not None:
        mask = _in_query_dtype(mask, q.dtype, need_weights, "attn_mask" if key_padding_mask is None else
                               "key_padding_mask" if attn_mask is None else "attn_mask + key_padding_mask")
    if is_causal and attn_mask is None:
        raise CausalHintError(
            f"Need attn_mask if specifying the is_causal hint (a {heads}-head sub-model of nn.MultiheadAttention): "
            f"pass attn_mask=nn.Transformer.generate_square_subsequent_mask({L}) beside "
            "is_causal=True. PyTorch refuses the hint alone as well, except on its inference fast path (eval, no "
            "grad, an even head count), which ignores it and lets every query attend to every key: the full model "
            "can run there while a sub-model cannot, and would not be causal")
    p = mha.dropout if mha.training else 0.0
    if need_weights:
        scores = (q * d ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        attn = F.dropout(scores.softmax(-1), p)  # the weights returned are those applied, after dropout
        out = attn @ v
        weights = attn.mean(1) if average_attn_weights else attn
    else:
        out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p), None
    out = out.permute(2, 0, 1, 3).reshape(L, B, n)
    out = mha.out_proj(out)
    if batch_first:
        out = out.transpose(0, 1)
    if not batched:
        out = out.squeeze(1)
        weights = None if weights is None else weights.squeeze(0)
    return out, weights


class InputShapeError(SortedNetError, AssertionError):
    """Query, key and value that ``nn.MultiheadAttention`` refuses (an AssertionError there), refused by every
    sub-model too, before a reshape could read them another way."""


def _check_inputs(mha: nn.Module, query: Tensor, key: Tensor, value: Tensor, heads: int) -> None:
    """The checks of ``F.multi_head_attention_forward`` on the inputs' shapes, for a sub-model of ``heads``."""
    where = f"a {heads}-head sub-model of nn.MultiheadAttention"
    shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
    if query.dim() not in (2, 3):
        raise InputShapeError(f"{where}: the query must be unbatched 2-D (L, E) or batched 3-D, got {shapes}")
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise InputShapeError(f"{where}: {'a batched 3' if query.dim() == 3 else 'an unbatched 2'}-D query needs "
                              f"key and value of as many dimensions, got {shapes}")
    width = plain(mha.in_proj_weight).shape[1]
    if query.shape[-1] != width or key.shape[-1] != width or value.shape[-1] != width:
        raise InputShapeError(f"{where}: was expecting embedding dimension of {width} for query, key and value, "
                              f"got {shapes}")
    if key.shape[:-1] != value.shape[:-1]:
        raise InputShapeError(f"{where}: key and value must hold as many positions (and sequences), got {shapes}")
    batch = 0 if mha.batch_first else 1
    if query.dim() == 3 and query.shape[batch] != key.shape[batch]:
        raise InputShapeError(f"{where}: query and key must hold as many sequences (batch_first="
                              f"{mha.batch_first}), got {shapes}")


def _check_masks(mha: nn.Module, attn_mask: Tensor | None, kpm: Tensor | None, B: int, L: int, S: int,
                 heads: int) -> None:
    """The mask shapes ``nn.MultiheadAttention`` accepts, refused otherwise (a per-head 3-D mask is read as
    ``(B, heads, L, S)``: one of another batch size would hand a sequence another's masks). A 3-D mask may
    hold the full model's heads (the active ones are kept) or exactly the active heads."""
    full = mha.__dict__.get("num_heads", heads)  # a sliced module's own attribute: the full count
    if attn_mask is not None:
        per_head = {B * full, B * heads}
        ok = attn_mask.shape == (L, S) if attn_mask.dim() == 2 else \
            attn_mask.dim() == 3 and attn_mask.shape[1:] == (L, S) and attn_mask.shape[0] in per_head
        if not ok:
            want = f"({L}, {S}), or ({B * full}, {L}, {S}) per head (batch x heads)" + (
                f", or ({B * heads}, {L}, {S}) for the {heads} heads of this sub-model" if heads != full else "")
            raise SortedNetError(f"attn_mask of shape {tuple(attn_mask.shape)} for a batch of {B}, {L} queries "
                                 f"and {S} keys: it must be {want}")
    if kpm is not None and kpm.shape != (B, S):
        raise SortedNetError(f"key_padding_mask of shape {tuple(kpm.shape)}: it must be (batch, keys) = ({B}, {S})")


class CausalHintError(SortedNetError, RuntimeError):
    """``is_causal=True`` without an ``attn_mask``: ``F.multi_head_attention_forward`` refuses it with a
    RuntimeError, and so does every sub-model (``nn.MultiheadAttention``'s inference fast path ignores the hint)."""


class MaskTypeError(SortedNetError, AssertionError):
    """A mask neither boolean nor of the query's floating-point dtype: ``nn.MultiheadAttention`` refuses it
    (an AssertionError for integer masks, a RuntimeError for another float dtype), and so does every sub-model
    (read as additive scores, a uint8 mask's 1s would add +1, not block)."""


def _additive(mask: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """A boolean (True: blocked, as scores of ``dtype``) or floating-point (added as it is) mask, as PyTorch
    reads them."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise MaskTypeError(f"only bool and floating types of {name} are supported (got {mask.dtype}), as in "
                            "nn.MultiheadAttention: pass mask.bool() for a mask whose nonzero entries block")
    return mask


def _in_query_dtype(mask: Tensor, dtype: torch.dtype, need_weights: bool, name: str) -> Tensor:
    """The masks' sum in the query's dtype where PyTorch takes it: of that dtype; under autocast, whose attention
    casts any floating input but float64; without weights (scaled_dot_product_attention), a float32 one. Else
    refused, as PyTorch refuses it."""
    if mask.dtype == dtype:
        return mask
    device = mask.device.type
    if (torch.is_autocast_enabled(device) and dtype == torch.get_autocast_dtype(device)
            and mask.dtype != torch.float64) or not need_weights and mask.dtype == torch.float32:
        return mask.to(dtype)
    raise MaskTypeError(f"a floating-point {name} of {mask.dtype} beside a query of {dtype}"
                        f"{' with need_weights=True' if need_weights else ''}: nn.MultiheadAttention refuses it "
                        "too; pass the mask in the query's dtype or as a bool mask")


def _nested(mha: nn.Module, query: Tensor, key: Tensor, value: Tensor, heads: int, key_padding_mask: Tensor | None,
            need_weights: bool, attn_mask: Tensor | None, average_attn_weights: bool,
            is_causal: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`attention` of nested (ragged, batch-major) tensors, as ``nn.TransformerEncoder`` hands its
    layers under ``no_grad`` with a padding mask: padded, the padding masked out of the keys, and the
    valid rows of the result nested again."""
    if key_padding_mask is not None or not (query.is_nested and key.is_nested and value.is_nested):
        raise RuntimeError("MultiheadAttention of nested tensors takes nested query, key and value and no "
                           "key_padding_mask")
    q_len = [t.shape[0] for t in query.unbind()]
    k_len = torch.tensor([t.shape[0] for t in key.unbind()], device=query.device)
    q, k, v = (t.to_padded_tensor(0.0) for t in (query, key, value))
    kpm = torch.arange(k.shape[1], device=k.device)[None, :] >= k_len[:, None]
    if not mha.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    out, w = attention(mha, q, k, v, heads, kpm, need_weights, attn_mask, average_attn_weights, is_causal)
    if not mha.batch_first:
        out = out.transpose(0, 1)
    return torch.nested.as_nested_tensor([o[:n] for o, n in zip(out, q_len)]), w


@slicer(nn.MultiheadAttention)
class MHASlicer(Slicer):
    roles = ("heads", "inp")
    #: head_dim never changes (heads are whole), but PyTorch's forward derives it and the export reads it:
    #: served too, so that a write to it while wrapped is refused as one to num_heads is
    attrs = ("in_proj_weight", "in_proj_bias", "num_heads", "embed_dim", "head_dim")
    views = {"in_proj_weight": ((0, "heads"), (1, "inp")), "in_proj_bias": ((0, "heads"),)}
    static = ("num_heads", "embed_dim", "head_dim")
    overrides_forward = True

    def full(self, m: nn.Module, role: str) -> int:
        return m.__dict__["embed_dim"] * (3 if role == "heads" else 1)

    def check(self, m: nn.Module, bind: dict, path: str) -> None:
        if type(m).forward is not nn.MultiheadAttention.forward:  # (sub-models run sortednet's own attention)
            raise PatternError(
                f"{path!r}: {type(m).__module__}.{type(m).__qualname__} subclasses nn.MultiheadAttention with a "
                "forward of its own, which sortednet's attention would skip under every smaller sub-model (and "
                "export would drop); register a slicer for it (docs/custom_slicers.md) or leave it out of the "
                "dimension")
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            what = ", ".join(w for w, on in [(f"kdim={m.kdim}, vdim={m.vdim} != embed_dim={m.embed_dim} (separate "
                                              "q/k/v weights)", not m._qkv_same_embed_dim),
                                             ("add_bias_kv", m.bias_k is not None),
                                             ("add_zero_attn", m.add_zero_attn)] if on)
            raise PatternError(f"{path!r}: nn.MultiheadAttention with {what} cannot be sliced (sortednet's "
                               "attention for smaller sub-models reads the packed in_proj_weight only); leave it out "
                               "of the dimension (it then runs whole in every sub-model), or write the attention "
                               "with separate q/k/v nn.Linear layers, which Heads slices with qkv=(...), o=... "
                               "(docs/heads.md)")

    def value(self, m: nn.Module, name: str) -> Any:
        if name == "in_proj_weight":
            return self.take(m, name, [(0, "heads"), (1, "inp")])
        if name == "in_proj_bias":
            return self.take(m, name, [(0, "heads")])
        if name == "num_heads":
            b = m._sn.bind.get("heads")
            return m.__dict__["num_heads"] if b is None else b.dim.active
        if name == "head_dim":
            return m.__dict__["head_dim"]
        return self.features(m, "inp", m.__dict__["embed_dim"])

    def namespace(self, m: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
        ns = super().namespace(m, names)
        base_forward = type(m).forward

        def forward(self_, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            if all(b.dim.active == b.dim.full for b in self_._sn.bind.values()):
                return base_forward(self_, query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
            return attention(self_, query, key, value, self_.num_heads, key_padding_mask, need_weights,
                             attn_mask, average_attn_weights, is_causal)

        ns["forward"] = forward
        return ns

    def export(self, live: nn.Module, copy_: nn.Module) -> nn.Module:
        copy_ = super().export(live, copy_)
        h, e = live.num_heads, live.embed_dim
        if h * live.head_dim == e:
            copy_.kdim = copy_.vdim = e
            return copy_
        return PrunedMultiheadAttention(copy_)


class PrunedMultiheadAttention(nn.Module):
    """Export target of a MultiheadAttention whose heads x head_dim no longer
    equals its embedding width, which ``nn.MultiheadAttention`` cannot express.
    Plain parameters, same state_dict keys, call signature and public attributes (``embed_dim``,
    ``num_heads``, ``head_dim``, ``kdim``, ``vdim``, ``bias_k``, ``bias_v``, ``add_zero_attn``, ``dropout``,
    ``batch_first``); not an ``nn.MultiheadAttention`` instance."""

    def __init__(self, src: nn.MultiheadAttention) -> None:
        super().__init__()
        self.in_proj_weight = src.in_proj_weight
        self.in_proj_bias = src.in_proj_bias
        self.out_proj = src.out_proj
        self.num_heads, self.head_dim, self.dropout = src.num_heads, src.head_dim, src.dropout
        self.batch_first = src.batch_first
        self.embed_dim = src.in_proj_weight.shape[1]
        self.kdim = self.vdim = self.embed_dim  # (wrap refuses kdim / vdim / bias_kv / zero_attn variants)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._qkv_same_embed_dim = False  # keeps PyTorch's fused fast paths away
        self.training = src.training      # (a new module starts in training mode: dropout would run in eval)

    def __prepare_scriptable__(self) -> None:
        raise SortedNetError("torch.jit.script: PrunedMultiheadAttention (the export of an nn.MultiheadAttention "
                             "whose heads x head_dim no longer equals its embedding width, or of an odd head count "
                             "in a TransformerEncoder that takes the nested-tensor path) is not scriptable; use "
                             "torch.jit.trace or torch.export.export of the exported model (for the second: set the "
                             "encoder's use_nested_tensor = False before export, which the live model then follows "
                             "too, for a stock nn.MultiheadAttention)")

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        return attention(self, query, key, value, self.num_heads, key_padding_mask, need_weights, attn_mask,
                         average_attn_weights, is_causal)

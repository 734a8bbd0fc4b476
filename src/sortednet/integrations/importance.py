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

import copy
import functools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..errors import SortedNetError, flag
from ..importance import (
    _at_full,
    _companions,
    check_states,
    in_copies,
    one_process,
    optimizers,
    refuse_held_outside,
    rel_err,
    stray_optimizers,
    warn_stray_optimizers,
)
from ..modes import casts_stale, eval_mode, finish_all
from ..nest import Nest
from ..slicers import Slicer
from ..views import storage_key
from ..wrap import count_load
from .layouts import Found, glob_children
from .transformers import _head_counts, _layout_of, _tower_name

__all__ = ["sort_by_importance"]


def _axes(m: nn.Module) -> tuple[int, int]:
    """(out axis, in axis) of a projection's weight (Conv1D stores it transposed)."""
    return (1, 0) if isinstance(m, Conv1D) else (0, 1)


def _experts(m: nn.Module) -> bool:
    """A mixture-of-experts module with 3-D ``gate_up_proj`` (E, 2 * ffn, hidden) / ``down_proj`` (E, hidden, ffn)."""
    t = Slicer.tensor(m, "down_proj")
    return isinstance(t, Tensor) and t.dim() == 3


def _score(m: nn.Module, unit: int) -> Tensor:
    """|sum(w * grad)| per group of ``unit`` input features of ``m`` (experts: one row of scores per expert)."""
    if _experts(m):
        w = Slicer.tensor(m, "down_proj")
        if w.grad is None:
            raise SortedNetError(f"{type(m).__name__} got no gradient: did the batches route tokens to it?")
        return (w * w.grad).detach().sum(1).abs()
    w = Slicer.tensor(m, "weight")
    if w.grad is None:
        path = getattr(m.__dict__.get("_sn"), "path", None)
        where = f"{path!r} ({type(m).__name__})" if path else type(m).__name__
        if not w.requires_grad:
            raise SortedNetError(f"{where} got no gradient: its weight is frozen (requires_grad=False), and units are "
                                 "scored by weight x gradient; unfreeze it for the sort (model.requires_grad_(True)), "
                                 "then freeze it again")
        raise SortedNetError(f"{where} got no gradient: does the loss depend on every layer?")
    _, ax = _axes(m)
    per = (w * w.grad).detach().sum(dim=1 - ax)
    return per.reshape(-1, unit).sum(1).abs()


def _unheld(tensors: list[Tensor], held: set | None) -> list[Tensor]:
    """``tensors`` but those whose memory ``held`` holds (a deep copy's tensor shared with the model, or with a
    copy permuted before: see :func:`_follow_log`); all of them without ``held``."""
    return tensors if held is None else [c for c in tensors if (k := storage_key(c)) is None or k not in held]


def _written(tensors: list[Tensor]) -> set:
    return {k for c in tensors if (k := storage_key(c)) is not None}


def _permute(m: nn.Module, role: str, idx: Tensor, log: list | None, opt: Any = (),
             held: set | None = None, own: frozenset[int] = frozenset()) -> set:
    """Permute ``m``'s units of ``role`` by ``idx``: the weight (and bias), their ``.grad`` and ``opt``'s
    per-element state (Adam's moments, momentum) alike, except memory in ``held``; returns the memory written."""
    out_ax, in_ax = _axes(m)
    w = Slicer.tensor(m, "weight")
    ax = out_ax if role == "out" else in_ax
    b = Slicer.tensor(m, "bias") if role == "out" else None
    moves = [(c, a) for t, a in ((w, ax), (b, 0)) if t is not None
             for c in _unheld(_companions(t, opt, own), held) if c.shape[a] == t.shape[a]]  # (reduced: stays)
    new = [c.data.index_select(a, idx.to(c.device)) for c, a in moves]  # all computed before any is written
    for (c, a), v in zip(moves, new):
        _write(c.data, v, a, idx, log)
    if log is not None:  # (for deep copies: the module's permutation, once every tensor of it was written)
        log.append(("rows", m, role, idx))
    return _written([c for c, _ in moves])


def _write(d: Tensor, v: Tensor, axis: int, idx: Tensor, log: list | None) -> None:
    """``d.copy_(v)`` (``v``: ``d`` permuted by ``idx`` along ``axis``), logged for :func:`_undo` with the version
    the write gives ``d``: an undo inverts exactly the writes that happened, also after an error (or a Ctrl-C)
    between two tensors of one module."""
    if log is not None:
        log.append(("tensor", d, axis, idx, _version(d) + 1))
    d.copy_(v)


def _version(d: Tensor) -> int:
    try:
        return d._version
    except RuntimeError:  # an inference tensor (no version counter): an undo writes it back regardless
        return -1


def _undo(entry: tuple) -> None:
    """Invert one logged write (see :func:`_write`), if it happened and was not inverted yet: idempotent."""
    _, d, axis, idx, after = entry
    if _version(d) == after:
        d.copy_(d.index_select(axis, torch.argsort(idx).to(d.device)))


def _expand(order: Tensor, unit: int) -> Tensor:
    return (order[:, None] * unit + torch.arange(unit, device=order.device)[None, :]).reshape(-1)


def _in_vocab(model: nn.Module, ids: Tensor) -> None:
    """Token ids outside the embedding table raised a bare IndexError deep in the forward."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if isinstance(vocab, int) and ids.numel() and not ids.is_floating_point() and not (
            0 <= int(ids.min()) and int(ids.max()) < vocab):
        raise SortedNetError(f"sort_by_importance: a batch holds token ids {int(ids.min())}..{int(ids.max())}, "
                             f"outside the model's vocabulary of {vocab}")


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    hint = ("pass loss_fn=lambda model, batch: <scalar loss>, e.g. for an encoder a mean-pooled embedding "
            "objective: loss_fn=lambda m, b: m(**b).last_hidden_state.mean(1).pow(2).sum()")
    if isinstance(batch, Tensor):
        if batch.dtype not in (torch.long, torch.int, torch.int32) or batch.dim() != 2:
            raise SortedNetError(f"sort_by_importance: a tensor batch must be token ids of shape (batch, seq), got "
                                 f"{batch.dtype} {tuple(batch.shape)}; {hint}")
        _in_vocab(model, batch)
        out = model(input_ids=batch, labels=batch)
    elif isinstance(batch, Mapping):
        if isinstance(batch.get("input_ids"), Tensor):
            _in_vocab(model, batch["input_ids"])
        out = model(**batch)
    else:
        raise SortedNetError(f"sort_by_importance cannot use a batch of type {type(batch).__name__} (give dicts of "
                             f"model inputs with labels, or token-id tensors for a causal LM); {hint}")
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise SortedNetError(f"sort_by_importance: {type(model).__name__} returned no scalar loss for this batch "
                             f"(does it have a head and labels?); {hint}")
    return loss


def sort_by_importance(nest: Nest, batches: Iterable[Any], *, loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                       ffn: bool = True, heads: bool = True,
                       optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None
                       ) -> dict[str, dict[str, Tensor]]:
    """Permute FFN neurons and attention heads of every layer, most important first.

    The full model's outputs are unchanged. ``batches`` are dicts of model
    inputs with labels (or token tensors, used as their own labels), or
    anything ``loss_fn(model, batch)`` turns into a loss. A parameter's
    ``.grad`` (accumulated gradients) is permuted with it; an optimizer that
    already holds state (momentum, Adam's moments) must be passed as
    ``optimizer=`` (a list for several) so that its state follows the units
    (or sort before building it; any other live optimizer holding such state
    gets an ``OptimizerStateWarning``). Returns the permutation applied per layer.

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
    nest._check_alive()
    one_process(nest, "sort_by_importance", data_based=True)
    flag("sort_by_importance", "ffn", ffn)
    flag("sort_by_importance", "heads", heads)
    if loss_fn is not None and not callable(loss_fn):
        raise SortedNetError(f"sort_by_importance: loss_fn= takes a function (model, batch) -> scalar loss, got "
                             f"{type(loss_fn).__name__}")
    if isinstance(batches, (Tensor, Mapping)):
        raise SortedNetError(f"sort_by_importance: batches= is a sequence of batches; got one {type(batches).__name__}"
                             " (iterating it would give its rows or keys): pass [batch]")
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise SortedNetError(f"sort_by_importance: batches= takes a list (or loader) of batches, got "
                             f"{type(batches).__name__}")
    if any(d.kind == "rank" for d in nest.dims):
        raise SortedNetError("sort_by_importance permutes full weight matrices; run it on a nest without a rank "
                             "dimension (sort first, then nest.unwrap() and from_transformers(..., rank=...))")
    optimizer = optimizers("sort_by_importance", optimizer)
    found: Found = _layout_of(nest)
    lay, model = found.layout, nest.model
    heads = heads and any(d.kind == "heads" for d in nest.dims)  # nothing to order for a nest without heads,
    named = [(f"{P}.{k}", b) for P in found.stacks for k, b in model.get_submodule(P)._modules.items()]
    if ffn and lay.ffn_out:  # or without a width over the FFN neurons (its FFNs stay as they are): the outputs
        ffn = any(b is not None and b.dim.kind == "width"  # of the up projections, the inputs of the down ones
                  for name, blk in named for rels, role in ((lay.ffn_out, "out"), (lay.ffn_inp, "inp"))
                  for q in _paths(blk, rels) if (m := nest._sliced.get(f"{name}.{q}")) is not None
                  for b in (m._sn.bind.get(role),))
    _check_layout(lay, found, model, ffn, heads)
    blocks = [b for _, b in named]
    if torch.is_inference_mode_enabled():  # (its scores are gradients: a raw RuntimeError at backward)
        raise SortedNetError("sort_by_importance scores units by their gradients, and it is called inside "
                             "torch.inference_mode(), where no gradient can be taken: call it outside inference "
                             "mode. Nothing was changed")
    owner: dict[int, str] = {}  # a module two layers hold (a layer reused, key / value projections shared across
    for (name, blk) in named:   # layers): each layer's order would be applied to it again, in silence
        moved = ([blk.get_submodule(q) for q in _paths(blk, lay.ffn_out + lay.ffn_inp)] if ffn else []) + (
            list(blk.get_submodule(lay.attn[0]).modules()) if heads else [])
        for m in dict.fromkeys(moved):
            if "_sn" not in m.__dict__ and not any(True for _ in m.parameters(recurse=False)):
                continue
            other = owner.setdefault(id(m), name)
            if other != name:
                raise SortedNetError(f"sort_by_importance orders each layer on its own, but {name!r} and {other!r} "
                                     f"hold the same {type(m).__name__} (a layer or projection shared between "
                                     "layers): one layer's order would be applied to it again. Nothing was changed; "
                                     "sortednet.importance.sort_units sorts shared modules with one order")
    moved = in_copies(nest, [  # what the sort moves: the FFNs, the attentions
        p for blk in blocks for m in ([blk.get_submodule(q) for q in _paths(blk, lay.ffn_out + lay.ffn_inp)] if ffn
                                      else []) + ([blk.get_submodule(lay.attn[0])] if heads else [])
        for p in m.parameters()])
    check_states("sort_by_importance", optimizer, moved, model)
    refuse_held_outside(nest, moved, "sort_by_importance", [  # (each block's FFN, its attention: one order each)
        [f"{P}.{q}" for q in _paths(blk, lay.ffn_out + lay.ffn_inp)] for P, blk in named if ffn] + [
        [f"{P}.{lay.attn[0]}"] for P, _ in named if heads])
    stray = stray_optimizers(moved, optimizer)
    n_heads, group = _head_counts(model.config, lay, _tower_name(model, found.stacks[0]))
    saved = {p: p.grad for p in model.parameters()}
    ffn_s = [0.0] * len(blocks)
    head_s = [0.0] * len(blocks)
    n = 0
    try:
        # a private eval-mode view sharing every weight: other threads never see model.training flip
        with _at_full(nest), eval_mode(nest) as (view, _), torch.enable_grad():
            for batch in batches:
                for p in model.parameters():
                    p.grad = None
                if n == 0:  # kept for the before / after comparison (a shallow copy: loss_fn may pop keys)
                    first = copy.copy(batch) if isinstance(batch, Mapping) else batch
                try:
                    loss = (_default_loss if loss_fn is None else loss_fn)(view, batch)
                except SortedNetError:
                    raise
                except Exception as e:
                    raise SortedNetError(f"sort_by_importance: the loss of batch {n} raised {type(e).__name__}: "
                                         f"{str(e)[:300]}; nothing was changed") from e
                if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
                    raise SortedNetError(f"sort_by_importance: loss_fn must return a scalar floating-point tensor, "
                                         f"got {type(loss).__name__}"
                                         + (f" {loss.dtype} of shape {tuple(loss.shape)}" if isinstance(loss, Tensor)
                                            else ""))
                if not bool(torch.isfinite(loss.detach())):
                    raise SortedNetError(f"sort_by_importance: the loss of batch {n} is {float(loss.detach())}; "
                                         "its gradient scores would be NaN and every order meaningless. Nothing "
                                         "was changed: drop that batch (or fix the loss)")
                if not loss.requires_grad:
                    raise SortedNetError(f"sort_by_importance: the loss of batch {n} carries no gradient (computed "
                                         "under torch.no_grad() or inference_mode, or detached), and the scores "
                                         "are gradients; nothing was changed: return the loss as computed")
                loss.reshape(()).backward()
                for i, blk in enumerate(blocks):
                    if ffn:
                        ffn_s[i] = ffn_s[i] + _score(blk.get_submodule(_paths(blk, lay.ffn_inp)[0]), 1)
                    if heads:
                        o = blk.get_submodule(lay.attn[0]).get_submodule(lay.o)
                        d = Slicer.tensor(o, "weight").shape[_axes(o)[1]] // n_heads
                        head_s[i] = head_s[i] + _score(o, d)
                n += 1
    finally:
        for p, g in saved.items():
            p.grad = g
    if n == 0:
        raise SortedNetError("sort_by_importance: batches is empty; give at least one batch")
    ref = _outputs(nest, first, loss_fn)
    if rel_err(_outputs(nest, first, loss_fn), ref) > 0:  # outputs that vary run to run (sampling in loss_fn
        ref = None                                        # beyond torch's seeded stream) cannot be compared
    direct = _direct(nest, first)  # the model's own output on the batch, whatever loss_fn does
    if ref is None and direct is None:
        warnings.warn("sort_by_importance: the full model's output could not be compared before and after the "
                      "permutation (loss_fn gives another value at every call and the batch is not the model's own "
                      "input: a dict of its keyword inputs or a tensor of token ids), so the sort is not verified; "
                      "pass such a batch first to have it checked", stacklevel=2)
    perms: dict[str, dict[str, Tensor]] = {}
    log: list[tuple] = []  # every permutation applied, to undo them if the full model changed
    token = None
    try:
        count_load(nest.model)  # (the units move: replicas under DDP are compared again at the next step)
        token = nest._permuting()  # (copies in the old order: refused until followed, if this stops)
        with torch.no_grad():
            for i, blk in enumerate(blocks):
                perms[named[i][0]] = p = {}
                if ffn:
                    p["ffn"] = order = torch.argsort(ffn_s[i], descending=True, stable=True)
                    if order.dim() == 2:  # experts: each expert's neurons ordered on their own
                        _permute_experts(blk.get_submodule(_paths(blk, lay.ffn_out)[0]), order, log, optimizer)
                    else:
                        rows = torch.cat([order + c * order.numel() for c in range(lay.ffn_chunks)])  # [gate; up]
                        for path in _paths(blk, lay.ffn_out):
                            _permute(blk.get_submodule(path), "out", rows, log, optimizer)
                        for path in _paths(blk, lay.ffn_inp):
                            _permute(blk.get_submodule(path), "inp", order, log, optimizer)
                if heads:
                    p["heads"] = _sort_heads(blk.get_submodule(lay.attn[0]), lay, head_s[i], group,
                                             lay.layout_of_qkv(model.config), log, optimizer)
        casts_stale()  # (under autocast: the check forwards, and the user's after them, see the new order)
        half = any(q.is_floating_point() and q.dtype not in (torch.float32, torch.float64) for q in model.parameters())
        err = 0.0 if ref is None else rel_err(_outputs(nest, first, loss_fn), ref)
        if direct is not None:
            err = max(err, rel_err(_direct(nest, first), direct))
        if not err <= (5e-2 if half else 1e-4):  # half precision: a deep stack's rounding (bf16 ulp ~ 8e-3)
            raise SortedNetError(
                f"sort_by_importance: the permuted {lay.family}-layout model's outputs differ from the original's by "
                f"{err:.3g} relative to their scale, so its layers hold per-neuron or per-head weights this layout "
                "does not move (e.g. per-head q/k norms); nothing was changed. Use ffn=False or heads=False for the "
                "part that moves them, or sortednet.importance.sort_units")
    except BaseException as e:
        with torch.no_grad():  # every write that happened, inverted (each once, even after a Ctrl-C)
            finish_all([*(functools.partial(_undo, w) for w in reversed(log) if w[0] == "tensor"),
                        *([functools.partial(nest._unpermuted, token)] if token else []), casts_stale])
        if isinstance(e, Exception) and not isinstance(e, SortedNetError):
            raise SortedNetError(f"sort_by_importance cannot permute this {lay.family}-layout model "
                                 f"({type(e).__name__}: {e}); nothing was changed. Use ffn=False or heads=False for "
                                 "the part that fails, or sortednet.importance.sort_units") from e
        raise
    nest._drop_scores("sort_by_importance", [o for p in perms.values() for o in p.values()],
                      follow=_follow_log(nest.model, log, optimizer), token=token)
    warn_stray_optimizers("sort_by_importance", stray)  # (once the sort is done: a refused one moved nothing)
    return perms


def _direct(nest: Nest, batch: Any) -> list[Tensor] | None:
    """The full model's own floating-point outputs on ``batch`` (a dict of its keyword inputs, or a tensor of
    token ids), called directly on an eval-mode view: the check a sort keeps when ``loss_fn`` cannot be compared
    (it calls the model in training mode, samples...). None when the batch is not such an input, or the
    output varies from call to call."""
    from ..coupling_ops import leaves
    from ..modes import seeded

    if not (isinstance(batch, Mapping) or (isinstance(batch, Tensor) and not batch.is_floating_point())):
        return None

    def run() -> list[Tensor]:
        with _at_full(nest), eval_mode(nest) as (view, _), torch.no_grad(), seeded(0):
            out = view(**dict(batch)) if isinstance(batch, Mapping) else view(batch)
        loss = getattr(out, "loss", None)
        outs = leaves(out.to_tuple() if hasattr(out, "to_tuple") else out)
        # the main output alone (and the loss): later ones may be per head (attention maps, a key / value
        # cache) and legitimately follow the new order
        main = next((t for t in outs if isinstance(t, Tensor) and t.is_floating_point() and t.dim() > 0), None)
        return [t.detach() for t in (main, loss) if isinstance(t, Tensor) and t.is_floating_point()]

    try:
        first = run()
        if not first or rel_err(run(), first) > 0:
            return None
    except Exception:  # (not the model's own input: loss_fn knows how to use it)
        return None
    return first


def _outputs(nest: Nest, batch: Any, loss_fn: Callable | None) -> list[Tensor]:
    """What the full model returns on ``batch``: its main output (logits or last hidden state; with a custom
    ``loss_fn`` that of the model call it makes, captured by a forward hook) and the loss, under a fixed random
    stream (a loss that masks tokens at random draws alike every time)."""
    from ..coupling_ops import leaves
    from ..modes import seeded

    seen: list[Any] = []
    with _at_full(nest), eval_mode(nest) as (view, _), torch.no_grad(), seeded(0):
        hook = view.register_forward_hook(lambda m, a, out: seen.append(out) if not seen else None)
        try:
            loss = (_default_loss if loss_fn is None else loss_fn)(
                view, copy.copy(batch) if isinstance(batch, Mapping) else batch)
        finally:
            hook.remove()
    outs = [t for t in leaves(seen[0].to_tuple() if hasattr(seen[0], "to_tuple") else seen[0])] if seen else []
    # the main output (logits, last hidden state: the first non-scalar one) and the loss; later outputs may be
    # per head or per neuron (attention maps with output_attentions=True) and legitimately follow the new order
    main = next((t for t in outs if isinstance(t, Tensor) and t.is_floating_point() and t.dim() > 0), None)
    return [t.detach() for t in (main, loss) if isinstance(t, Tensor) and t.is_floating_point()]


def _paths(blk: nn.Module, rels: tuple[str, ...]) -> list[str]:
    """The paths under ``blk`` that ``rels`` (``*`` = one component) name; absent ones are skipped."""
    return [p for r in rels for p in glob_children(blk, r)]


def _follow_log(model: nn.Module, log: list[tuple], opt: Any = ()) -> Any:
    """What makes the permutations in ``log`` again, in order, in a deep copy of ``model`` (an EMA / teacher
    copy: its tensors, their ``.grad`` and ``opt``'s state for them: the copy's own optimizer, when passed),
    every module found and checked before the first is written."""
    paths = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), path)

    own = frozenset(id(t) for t in [*model.parameters(), *model.buffers()])  # (their state moved with the model)

    def follow(root: nn.Module, held: set) -> None:
        steps = []
        for kind, m, *rest in log:
            if kind == "tensor":  # (the model's own writes, for an undo)
                continue
            c = root.get_submodule(paths[id(m)])
            for name in ("gate_up_proj", "down_proj") if kind == "experts" else ("weight",):
                mine, theirs = Slicer.tensor(m, name), Slicer.tensor(c, name)
                if theirs is None or mine is None or theirs.shape != mine.shape:
                    raise SortedNetError(f"the copy's {paths[id(m)]}.{name} does not match the model's")
                _companions(theirs, opt, own)  # (its optimizer state refused here if it cannot follow: before
                if kind != "experts":  # any write)
                    b = Slicer.tensor(c, "bias")
                    if b is not None:
                        _companions(b, opt, own)
            steps.append((kind, c, rest))
        written: set = set()
        with torch.no_grad():
            for kind, c, rest in steps:  # memory the model (or a copy permuted before) holds is left alone
                written |= (_permute_experts(c, rest[0], None, opt, held, own) if kind == "experts"
                            else _permute(c, rest[0], rest[1], None, opt, held, own))
        held.update(written)  # (another copy sharing this one's memory leaves it alone)
    return follow


def _permute_experts(m: nn.Module, order: Tensor, log: list | None, opt: Any = (),
                     held: set | None = None, own: frozenset[int] = frozenset()) -> set:
    """Each expert's neurons by its row of ``order`` (as :func:`_permute`); returns the memory written."""
    gu, down = Slicer.tensor(m, "gate_up_proj"), Slicer.tensor(m, "down_proj")
    if order.shape[0] != gu.shape[0] or 2 * order.shape[1] != gu.shape[1] or order.shape[1] != down.shape[2]:
        raise SortedNetError(f"sort_by_importance: cannot sort the FFN neurons of the experts of {type(m).__name__}: "
                             f"its gate_up_proj {tuple(gu.shape)} / down_proj {tuple(down.shape)} are not in the "
                             f"layout it permutes, (experts, 2 x ffn, hidden) with the gate rows before the up rows "
                             f"and (experts, hidden, ffn) (Mixtral, Qwen-MoE); an expert order {tuple(order.shape)} "
                             "does not fit them (e.g. a transposed or interleaved layout). Pass ffn=False to sort "
                             "the other dimensions; nothing was changed")
    gus = [c for c in _unheld(_companions(gu, opt, own), held) if c.shape[1] == gu.shape[1]]  # (+ .grad, state)
    downs = [c for c in _unheld(_companions(down, opt, own), held) if c.shape[2] == down.shape[2]]
    for e, o in enumerate(order):
        rows = torch.cat([o, o + o.numel()]).to(gu.device)  # [gate; up]: the same order in both halves
        for c in gus:
            d = c.data[e]
            _write(d, d.index_select(0, rows), 0, rows, log)
        for c in downs:
            d = c.data[e]
            _write(d, d.index_select(1, o.to(c.device)), 1, o, log)
    if log is not None:
        log.append(("experts", m, order))
    return _written(gus + downs)


def _check_layout(lay, found: Found, model: nn.Module, ffn: bool, heads: bool) -> None:
    """Refuse the layouts whose units this function cannot permute (before anything changes)."""
    why, blk = "", found.block(model)
    if heads and (len(found.stacks) > 1 or len(lay.attn) != 1 or lay.o is None or lay.qkv is None):
        why = "several attention modules per block (T5: a relative position bias shared by a stack's layers)"
    elif ffn and not all(isinstance(m, (nn.Linear, Conv1D)) or (_experts(m) and lay.ffn_chunks == 2)
                         for m in (blk.get_submodule(p) for p in _paths(blk, lay.ffn_out + lay.ffn_inp))):
        why = "FFN weights that are neither linear layers nor [gate; up] expert tensors"
    elif ffn and any(not _paths(b, lay.ffn_out) or not _paths(b, lay.ffn_inp)
                     for P in found.stacks for b in model.get_submodule(P)):
        why = "blocks without the FFN projections (expert blocks next to dense ones)"
    elif heads and lay.no_heads:
        why = lay.no_heads
    if why:
        raise SortedNetError(f"sort_by_importance does not support the {lay.family} layout ({why}); use ffn=False "
                             "or heads=False where that avoids it, or permute the units yourself")


def _sort_heads(attn: nn.Module, lay, score: Tensor, group: int, layout: str | None, log: list,
                opt: Any = ()) -> Tensor:
    """Permute whole heads (whole key/value groups with GQA); returns the query-head order."""
    H = score.numel()
    by_group = score.reshape(H // group, group)
    g_order = torch.argsort(by_group.sum(1), descending=True, stable=True)
    within = torch.argsort(by_group[g_order], dim=1, descending=True, stable=True)
    q_order = (g_order[:, None] * group + within).reshape(-1)
    o = attn.get_submodule(lay.o)
    d = Slicer.tensor(o, "weight").shape[_axes(o)[1]] // H
    q_idx = _expand(q_order, d)
    if isinstance(lay.qkv, str) and layout == "interleaved":  # per key/value head [q x group; k; v]: each block
        unit = (group + 2) * d                                  # moves whole, its query heads reordered in it
        starts = torch.cat([g_order[:, None] * unit + within * d, (g_order * unit + group * d)[:, None],
                            (g_order * unit + (group + 1) * d)[:, None]], 1)
        idx = (starts[..., None] + torch.arange(d, device=starts.device)).reshape(-1)
        _permute(attn.get_submodule(lay.qkv), "out", idx, log, opt)
    elif isinstance(lay.qkv, str):  # fused [q; k; v] along the output axis (k, v with H / group heads)
        E, kv_idx = H * d, _expand(g_order, d) if group > 1 else q_idx
        _permute(attn.get_submodule(lay.qkv), "out", torch.cat([q_idx, kv_idx + E, kv_idx + E + E // group]), log,
                 opt)
    else:
        _permute(attn.get_submodule(lay.qkv[0]), "out", q_idx, log, opt)
        kv_idx = _expand(g_order, d) if group > 1 else q_idx
        for name in lay.qkv[1:]:
            _permute(attn.get_submodule(name), "out", kv_idx, log, opt)
    _permute(o, "inp", q_idx, log, opt)
    return q_order

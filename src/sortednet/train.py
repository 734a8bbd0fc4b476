"""Training many sub-models in one loop: ``accumulate`` (gradient accumulation
over the drawn sub-models, optional in-place distillation) and ``fit``, an
optional helper for the common ``(inputs, target)`` classification loop.

A loop of your own needs only :class:`~sortednet.Sampler` and :func:`accumulate`::

    for step, (x, y) in enumerate(loader):
        sn.accumulate(nest, sampler.draw(step), lambda: F.cross_entropy(model(x), y))
        opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import random
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cost import as_inputs, call_model, keyword_inputs
from .errors import SortedNetError, caller_outside
from .errors import flag as _flag
from .modes import casts_stale, dry_run, eval_mode, restore_modes, train_view
from .sampler import Sampler, number_list
from .submodel import SubModel, SubModelLike, as_int
from .views import WRAPPINGS, _compiling, _distributed, count_registrations, is_fsdp, world_size

if TYPE_CHECKING:
    from .nest import Nest

__all__ = ["Distill", "accumulate", "evaluate", "fit", "History", "Losses", "LossOutsideModelWarning",
           "NonFiniteLossWarning", "NONFINITE"]

#: what :func:`accumulate` does with a non-finite (NaN / inf) loss
NONFINITE = ("raise", "skip", "ignore")


class NonFiniteLossWarning(RuntimeWarning):
    """A sub-model's loss was NaN or infinite and its backward was skipped (``nonfinite="skip"``)."""


class Losses(list):
    """What :func:`accumulate` returns: the unscaled loss of each sub-model (floats, in the order of
    ``subs``) plus ``skipped``, the sub-models whose non-finite loss was not backpropagated.

    >>> from sortednet.train import Losses
    >>> Losses([0.5, float("nan")], skipped=("h=2",)).skipped
    ('h=2',)
    """

    def __init__(self, values: Iterable[float] = (), *, skipped: Sequence[Any] = ()) -> None:
        super().__init__(values)
        self.skipped = tuple(skipped)


def _real(x: Any) -> float | None:
    """``x`` as a float when it is a real number (Python, NumPy or a one-element tensor; not a bool)."""
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 and not x.is_complex() and x.dtype is not torch.bool else None
    if isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)):
        try:
            return float(x)
        except OverflowError:  # an int beyond float's range: the callers' finiteness checks refuse it
            return math.inf if x > 0 else -math.inf
    return None


@dataclass(frozen=True)
class Distill:
    """In-place distillation (US-Nets): the largest drawn sub-model's detached
    logits are a soft target for the others.

    A student's loss becomes ``(1 - alpha) * task_loss + alpha * T² · KL(teacher_T ‖ student_T)``
    where ``_T`` is a softmax at temperature ``T`` over the class axis: ``axis``, by
    default the last (class logits ``(B, C)`` or LM logits ``(B, L, V)``; ``axis=1``
    for a dense prediction ``(B, C, H, W)``, where ``sn.fit`` reads it from its targets
    when it can); the KL is averaged over every other position, or over those a
    ``mask`` keeps: a closure returning ``(loss, logits, mask)``, as ``fit`` does where
    targets equal -100, leaves padding out. ``alpha=1`` is US-Nets' rule (soft
    targets only).

    >>> import torch, sortednet as sn
    >>> d = sn.Distill(temperature=2.0, alpha=0.5)
    >>> t = torch.tensor([[2.0, 0.0, -1.0]])
    >>> float(d.soft_loss(t, t))
    0.0
    """

    temperature: float = 1.0
    alpha: float = 0.5
    axis: int | None = None

    def __post_init__(self) -> None:
        t, a = _real(self.temperature), _real(self.alpha)
        if t is None or not (math.isfinite(t) and t > 0):
            raise SortedNetError(f"Distill temperature must be a positive finite number, got {self.temperature!r}")
        if a is None or not 0 <= a <= 1:
            raise SortedNetError(f"Distill alpha must be in [0, 1], got {self.alpha!r}")
        ax = self.axis
        if ax is not None and (isinstance(ax, (bool, np.bool_)) or not isinstance(ax, numbers.Integral)):
            raise SortedNetError(f"Distill axis (the logits' class axis) must be an int or None (the last), "
                                 f"got {ax!r}")
        object.__setattr__(self, "temperature", t)  # (frozen) one float from any real number
        object.__setattr__(self, "alpha", a)
        object.__setattr__(self, "axis", None if ax is None else int(ax))

    def class_axis(self, logits: Tensor) -> int:
        """The class axis of ``logits`` (``axis``, counted from 0), checked against their dimensions."""
        n = logits.dim()
        if self.axis is None:
            return n - 1
        if not -n <= self.axis < n:
            raise SortedNetError(f"Distill(axis={self.axis}): logits of shape {tuple(logits.shape)} have no axis "
                                 f"{self.axis}")
        return self.axis % n

    def soft_loss(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the class axis, mean over the other axes, or
        over the positions where boolean ``mask`` (the logits' shape without the class axis) is True (none: 0).

        >>> d = Distill(temperature=1.0)
        >>> s, t = torch.zeros(2, 3), torch.tensor([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
        >>> float(d.soft_loss(s, t, mask=torch.tensor([True, False])))
        0.0
        """
        if student.shape != teacher.shape:
            raise SortedNetError(f"distillation needs student and teacher logits of one shape, got "
                                 f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        if student.dim() < 2 or not student.is_floating_point() or not teacher.is_floating_point():
            raise SortedNetError(f"distillation needs floating-point logits of shape (..., classes), e.g. (batch, "
                                 f"classes) or (batch, length, vocab); got {student.dtype} {tuple(student.shape)} "
                                 f"and {teacher.dtype} {tuple(teacher.shape)}")
        ax = self.class_axis(student)
        if ax != student.dim() - 1:
            student, teacher = student.movedim(ax, -1), teacher.movedim(ax, -1)
        t = self.temperature
        dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)  # bf16 /
        s, p = student.to(dtype).flatten(0, -2), teacher.to(dtype).flatten(0, -2)  # fp16 in float32, float64 kept
        if mask is not None:
            if (not isinstance(mask, Tensor) or mask.dtype != torch.bool
                    or tuple(mask.shape) != tuple(student.shape[:-1])):  # (a transposed (L, B) mask: other rows)
                raise SortedNetError(f"the distillation mask must be a bool tensor of the logits' shape without the "
                                     f"class axis, {tuple(student.shape[:-1])}; got {type(mask).__name__}"
                                     + (f" {mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else ""))
            keep = mask.reshape(-1).to(device=s.device)
            # a left-out row's values (-inf / NaN logits at padding) never enter the arithmetic: the gradient
            # of a product with them would be NaN even where the forward selects them away
            s, p = s.masked_fill(~keep[:, None], 0.0), p.masked_fill(~keep[:, None], 0.0)
        s = F.log_softmax(s / t, dim=-1)
        p = F.log_softmax(p / t, dim=-1)
        # exp(p) (p - s) per class, as F.kl_div(log_target=True), but a class the teacher gives no probability
        # (p = -inf: a masked or padded vocabulary column) adds 0 (0 log 0 = 0), where kl_div gives 0 * inf = NaN
        none = p == float("-inf")
        per = torch.where(none, 0.0, p.exp() * (p.masked_fill(none, 0.0) - s.masked_fill(none, 0.0))).sum(-1)
        if mask is None:
            return per.sum() / max(per.shape[0], 1) * (t * t)  # (batchmean: over the positions)
        per = torch.where(keep, per, per.new_zeros(()))
        return per.sum() / keep.sum().clamp_min(1) * (t * t)


def _default_loss(out: Tensor, y: Tensor, step: int) -> Tensor:
    """``F.cross_entropy(out, y)``, fit's default loss, with its shape and class-range errors named."""
    want = (*out.shape[:1], *out.shape[2:]) if out.dim() != 1 else ()  # (an unbatched sample: (classes,), ())
    if out.dim() < 1 or tuple(y.shape) != tuple(want):
        raise SortedNetError(f"fit(): the default loss, F.cross_entropy, takes an output (batch, classes, ...) and "
                             f"class indices (batch, ...), here {tuple(want)}; step {step} gave output "
                             f"{tuple(out.shape)} and targets {tuple(y.shape)} (a (batch, 1) column: y.squeeze(1); "
                             "language-model logits (batch, length, vocab): pass loss_fn=)")
    try:
        return F.cross_entropy(out, y)
    except (IndexError, RuntimeError) as e:
        if "out of bounds" not in str(e) and "Target" not in str(e):
            raise
        classes = out.shape[min(1, out.dim() - 1)]
        raise SortedNetError(f"fit(): a target of step {step} is not a class index in 0..{classes - 1} (nor "
                             f"the ignored {IGNORE_INDEX}): {e}") from e


def _need_nest(nest: Any, what: str) -> None:
    """Refuse anything but a Nest (the model itself, None), naming what was passed."""
    from .nest import Nest

    if not isinstance(nest, Nest):
        hint = " (the model itself: pass the Nest that sn.wrap(model, ...) returned, or sn.Nest.of(model))" \
            if isinstance(nest, nn.Module) else ""
        raise SortedNetError(f"{what}() needs the Nest (sn.wrap(model, ...)), got {type(nest).__name__}{hint}")


def _split(out: Any, want_logits: bool, sub: SubModel, distill: Distill | None = None
           ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    logits = mask = None
    if isinstance(out, (tuple, list)):
        if len(out) == 3:  # (without distill= the logits and the mask go unused: a closure serves both)
            out, logits, mask = out
        elif len(out) != 2:
            raise SortedNetError(f"closure for {sub} returned {len(out)} values; return loss, (loss, logits) or "
                                 "(loss, logits, mask)")
        else:
            out, logits = out
    if want_logits and not isinstance(logits, Tensor):
        got = f"{type(out).__name__} without logits" if logits is None else \
            f"(loss, {type(logits).__name__}) (the second item is not a tensor of logits)"
        raise SortedNetError(f"with distill=, the closure must return (loss, logits); for {sub} it returned {got}")
    if not want_logits and isinstance(logits, Tensor) and logits.dim() == 0 and logits.requires_grad \
            and logits is not out:
        raise SortedNetError(f"closure for {sub} returned (loss, a scalar that requires grad): the second item is "
                             "read as logits (used only by distill=), so it would not train; add it to the loss "
                             "(e.g. (task_loss + aux_loss)) or return it detached")
    if want_logits and (logits.dim() < 2 or not logits.is_floating_point()):  # (checked before its backward)
        raise SortedNetError(f"with distill=, the logits of {sub} must be floating point of shape (..., classes), "
                             f"e.g. (batch, classes) or (batch, length, vocab); got {logits.dtype} "
                             f"{tuple(logits.shape)}")
    if mask is not None and isinstance(logits, Tensor) and distill is not None:
        positions = tuple(logits.movedim(distill.class_axis(logits), -1).shape[:-1])
    else:
        positions = tuple(logits.shape[:-1]) if isinstance(logits, Tensor) else ()
    if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool
                             or not isinstance(logits, Tensor) or tuple(mask.shape) != positions):
        # (checked without distill= too: a third item that is no such mask, an auxiliary loss, would be dropped)
        where = f", {positions}" if isinstance(logits, Tensor) else \
            f" (the second item, the logits, is {type(logits).__name__}: a mask needs them)"
        aux = (" (a third item that requires grad is not trained: add an auxiliary loss to the loss itself)"
               if isinstance(mask, Tensor) and mask.requires_grad else "")
        ints = (" (an attention_mask of 0 / 1 ints: return mask.bool(); ints are not read as a mask, as they may "
                "be labels)" if isinstance(mask, Tensor) and not mask.is_floating_point() and not mask.is_complex()
                and mask.dtype != torch.bool else "")
        raise SortedNetError(f"closure for {sub} returned (loss, logits, mask): a third item is the mask of the "
                             f"positions distill= counts, a bool tensor of the logits' shape without the class "
                             f"axis{where} (True: the position counts), read with or without distill=; got "
                             f"{type(mask).__name__}"
                             + (f" {mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else "") + aux + ints)
    if not want_logits:
        mask = None
    if not isinstance(out, Tensor) or out.numel() != 1:
        raise SortedNetError(f"closure for {sub} must return a scalar loss tensor (or (loss, logits)), got "
                             f"{type(out).__name__}{tuple(out.shape) if isinstance(out, Tensor) else ''}")
    if out.is_complex():
        raise SortedNetError(f"loss of {sub} is complex ({out.dtype}); return a real scalar (e.g. its .abs())")
    if not out.requires_grad:
        if not (out.is_floating_point() or out.is_complex()):
            raise SortedNetError(f"loss of {sub} is {'a bool' if out.dtype == torch.bool else 'an integer'} tensor "
                                 f"({out.dtype}), which carries no gradient: return the floating-point loss the "
                                 "model's output gives (a constant trains nothing)")
        raise SortedNetError(f"loss of {sub} does not require grad: was it computed under torch.no_grad(), or "
                             "returned .detach()ed (or as a number, .item(), made into a new tensor)? Return the "
                             "loss tensor as computed. Or does this sub-model run none of the model's trainable "
                             "parameters (every layer it runs frozen, a shallow depth below the layers fine-tuned)? "
                             "Train the sub-models that reach them")
    if want_logits and not logits.requires_grad:  # (checked at the teacher, the first closure: before any backward)
        raise SortedNetError(f"with distill=, the logits of {sub} do not require grad (returned .detach()ed, or "
                             "computed without gradients): the students' soft term would not train them, in "
                             "silence. Return the logits as the model gave them; accumulate detaches the teacher's "
                             "itself")
    return out.reshape(()), logits, mask


def accumulate(nest: Nest, subs: Sequence[SubModelLike], closure: Callable[[], Any], *,
               distill: Distill | None = None, weights: Sequence[float] | None = None,
               backward: Callable[[Tensor], Any] | None = None, nonfinite: str = "raise",
               _agree: Callable[[bool, bool], tuple[bool, bool]] | None = None,
               _prechecked: tuple[list[SubModel], list[float]] | None = None) -> Losses:
    """Backward the loss of each sub-model in ``subs``, one after another, into ``.grad``.

    For every sub-model: activate it (``nest.use``), call ``closure()`` (it runs
    the model and returns the loss, or ``(loss, logits)``), scale the loss by
    its weight (default ``1 / len(subs)``), ``backward()``, and drop every
    reference before the next one: peak memory is that of one step of the
    largest sub-model, not ``len(subs)`` steps. Returns the unscaled task
    losses in the order of ``subs``. Call ``optimizer.step()`` afterwards.

    With ``distill=sn.Distill(...)`` the closure must return ``(loss, logits)``;
    the largest drawn sub-model runs first and its detached logits become the
    soft target of the others (see :class:`Distill`). ``backward(scaled_loss)``
    replaces ``scaled_loss.backward()``, e.g. ``accelerator.backward`` or
    ``lambda l: scaler.scale(l).backward()`` for mixed precision.

    A NaN / inf loss of one sub-model would poison every shared gradient.
    ``nonfinite`` says what happens then, BEFORE its backward: ``"raise"``
    (default; a :class:`~sortednet.SortedNetError` naming the sub-model; the
    sub-models before it already added their gradients: zero them), ``"skip"``
    (no backward for it, a :class:`NonFiniteLossWarning`, listed in the
    result's ``skipped``; a skipped distillation teacher gives no soft target: the
    others' loss that step is ``(1 - alpha) * task_loss`` alone, none at ``alpha=1``)
    or ``"ignore"`` (backward anyway, as plain PyTorch would).
    (:func:`sortednet.distributed.accumulate` makes this decision once for all ranks.)
    Any other error raised after a backward (the closure raising, a loss that is
    not a scalar) leaves the earlier sub-models' gradients in ``.grad`` too, and
    an error inside a backward (a backward hook) part of that sub-model's; on
    Python 3.11+ the exception carries a note naming them. A sub-model listed
    twice is refused (weight it with ``weights=``).

    >>> import torch, torch.nn as nn, torch.nn.functional as F, sortednet as sn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> nest = sn.wrap(model, sn.Width("h", [2, 4, 8], out="0", inp="2"))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> losses = sn.accumulate(nest, nest.submodels, lambda: F.cross_entropy(model(x), y))
    >>> len(losses), model[0].weight.grad.shape
    (3, torch.Size([8, 4]))
    """
    _need_nest(nest, "accumulate")
    resolved, weights = _prechecked or _checked(nest, subs, closure, distill, weights, backward, nonfinite)
    order = list(range(len(resolved)))
    teacher = None
    if distill is not None and len(resolved) > 1:
        rank = nest.submodels.position  # O(log N); None for an unlisted sub-model
        teacher = max(order, key=lambda i: (-1 if (r := rank(resolved[i])) is None else r,
                                            nest.cost(resolved[i], "params")))
        order.remove(teacher)
        order.insert(0, teacher)
    losses = [0.0] * len(resolved)
    skipped: list[SubModel] = []
    done: list[Any] = []
    hook = None
    if _prechecked is None and _distributed():  # (sortednet.distributed.accumulate has its own hooks)
        fsdp = world_size() >= 2 and is_fsdp(nest.model)  # (once per call: a walk of the parameters)
        hook = nest.model.register_forward_pre_hook(lambda mod, args: _ddp_forward_check(nest, fsdp, backward))
    try:
        _run(nest, resolved, order, closure, distill, teacher, weights, nonfinite, backward, _agree, losses, skipped,
             done)
        nest._closure_seen = True  # (each closure of a first call checked: see _refuse_other_model)
    except BaseException as e:
        if done and hasattr(e, "add_note") and not getattr(e, "_sn_partial", False):
            whole = [str(s) for s in done if not isinstance(s, tuple)]
            part = done[-1][0] if isinstance(done[-1], tuple) else None
            e.add_note("sortednet.accumulate: " + (f"{', '.join(whole)} had already added their gradients to .grad "
                       "in this call" if whole else "") + (" and " if whole and part else "") + (
                       f"the backward of {part} raised part-way (some of its gradients may be in .grad)" if part
                       else "") + "; zero them (optimizer.zero_grad()) before trying again")
        raise
    finally:
        if hook is not None:
            hook.remove()
    return Losses(losses, skipped=skipped)


def _active_ddp() -> Any:
    """The DistributedDataParallel wrapper whose forward is running (None outside one, or if DDP was never
    imported)."""
    ddp = getattr(sys.modules.get("torch.nn.parallel.distributed"), "DistributedDataParallel", None)
    return getattr(ddp, "_active_ddp_module", None)


def _ddp_forward_check(nest: Nest, fsdp: bool = False, backward: Any = True) -> None:
    """Forward pre-hook of :func:`accumulate` under torch.distributed: :func:`_ddp_reducer_check`, and in a
    forward through a DDP wrapper the ranks must run the same sub-model (one ``all_reduce`` of a digest; DDP
    runs every rank's forwards in step): a Sampler seeded per rank, or a ``nest.use`` opened on some ranks
    only, would otherwise have DDP average two sub-models' gradients as one, in silence. So must every forward of
    a model sharded with FSDP2 (``fsdp``), whose reduce-scatter averages as DDP does."""
    ddp = _active_ddp()
    if backward is None and ddp is not None and getattr(ddp, "_is_accelerate_prepared", False) and \
            torch.is_grad_enabled() and (steps := _accelerate_micro_step()):
        _refuse_micro_step(steps)  # (Accelerate's state is every rank's: all refuse, before any backward)
    if ddp is not None:
        _agree_ddp_forward(nest, ddp)  # (first: a rank refusing alone would leave the others in the collective)
    _ddp_reducer_check(nest)
    if ddp is None and fsdp and torch.is_grad_enabled() and not _compiling():
        from .agreement import _FORWARD, _agree_on

        # (FSDP2 reduce-scatters each backward's gradients over the ranks as one: two sub-models' would be
        # averaged as one, or a depth one rank skips leaves the others' collectives waiting until the timeout)
        _agree_on([str(nest.active)], None, "the sub-model of an FSDP2 forward inside sn.accumulate",
                  "give every rank's Sampler the same seed and step, and open nest.use alike on every rank "
                  "(sortednet.distributed.accumulate(nest, subs, closure, module=fsdp_model) checks each step's "
                  "sub-models before the first forward)", phase=_FORWARD)
        return


def _agree_ddp_forward(nest: Nest, ddp: Any) -> None:
    """In a forward through the DDP wrapper ``ddp``: every rank runs the same sub-model (see
    :func:`_ddp_forward_check`)."""
    if not torch.is_grad_enabled() or _compiling() or world_size() < 2 or \
            torch.distributed.get_world_size(ddp.process_group) < 2:
        return
    if getattr(getattr(ddp, "_join_config", None), "enable", False):  # under Join (uneven inputs), the joined
        return  # ranks shadow DDP's own collectives only: one of ours would be left waiting
    from .agreement import _FORWARD, _agree_on

    _agree_on([str(nest.active)], ddp.process_group, "the sub-model of a DistributedDataParallel forward inside "
              "sn.accumulate", "give every rank's Sampler the same seed and step, and open nest.use alike on every "
              "rank (sortednet.distributed.accumulate(nest, subs, closure, module=ddp_model) checks each step's "
              "sub-models before the first forward)", phase=_FORWARD)


def _ddp_reducer_check(nest: Nest, who: str = "sn.accumulate", advice: str | None = None) -> None:
    """Forward pre-hook of :func:`accumulate` under torch.distributed: a forward through a DDP wrapper whose
    reducer expects a gradient for every parameter (no unused-parameter search, sync on) under a depth below
    full leaves the skipped blocks' buckets un-averaged this step (the optimizer steps on local gradients) and
    raises DDP's own error only at the next forward."""
    ddp = _active_ddp()
    if ddp is None or not ddp.require_backward_grad_sync or ddp.find_unused_parameters or not torch.is_grad_enabled():
        return
    sub = nest.active
    shallow = [d.name for d in nest.dims if d.kind == "depth" and sub[d.name] != d.full]
    if not shallow:
        return
    ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())  # (DDP waits for none of those; it read
    ignored = {id(p) for n, p in ddp.module.named_parameters() if n in ignored} if ignored else set()  # the model's
    # _ddp_params_and_buffers_to_ignore into parameters_to_ignore when built)
    trained = any(p.requires_grad and id(p) not in ignored for m in nest._sliced.values()
                  for name in m._sn.slicer.skipped(m)
                  for p in m._modules[name].parameters())  # (frozen skipped blocks: nothing waits)
    if trained:
        raise SortedNetError(f"{who}: a DistributedDataParallel forward of {sub} (depth {shallow} below full) "
                             "with gradient sync on and find_unused_parameters=False: the blocks it skips give no "
                             "gradient, so DDP would average only part of this step and raise at the next one. " + (
                                 advice or "Use sortednet.distributed.accumulate(nest, subs, closure, "
                                 "module=ddp_model) (with Accelerate: module=the prepared model, "
                                 "backward=accelerator.backward)"))


def refuse_unscaled(nest: Nest, backward: Any, module: nn.Module | None = None) -> None:
    """Refuse ``accumulate`` without ``backward=`` on a model Accelerate prepared (``nest.model`` or the
    ``module`` the closure calls) while Accelerate accumulates gradients over several micro-steps and this one
    does not synchronise (``with accelerator.accumulate(model):``): ``loss.backward()`` skips the
    ``1 / steps`` that ``accelerator.backward`` divides by."""
    if backward is not None:
        return
    prepared = any(getattr(m, "_is_accelerate_prepared", False) for m in (nest.model, module) if m is not None)
    if not prepared and "accelerate" not in sys.modules:
        return
    steps = _accelerate_micro_step()
    # (on several processes Accelerate marks the DDP wrapper it returns, not the model inside: a forward through
    # that wrapper is refused by _ddp_forward_check; a closure calling the model inside it skips DDP's average too)
    if steps and (prepared or (world_size() > 1 and _held_by_prepared(nest))):
        _refuse_micro_step(steps)


def _held_by_prepared(nest: Nest) -> bool:
    """Whether a module Accelerate prepared (its DDP wrapper) holds the nest's model: one walk of the objects the
    garbage collector tracks (by type first: no attribute of other objects is read), kept until a module is
    registered into a data-parallel wrapper anywhere (a new wrapper: ``views.WRAPPINGS``)."""
    count_registrations()
    held = nest.__dict__.get("_held_by_prepared")
    if held is not None and held[0] == WRAPPINGS[0]:
        return held[1]
    import gc

    found = False
    for o in gc.get_objects():
        if issubclass(type(o), nn.Module) and o.__dict__.get("_is_accelerate_prepared", False) and \
                any(m is nest.model for m in o.modules()):
            found = True
            break
    nest.__dict__["_held_by_prepared"] = (WRAPPINGS[0], found)
    return found


def _refuse_micro_step(steps: int) -> None:
    raise SortedNetError(f"accumulate without backward= on a model Accelerate prepared, on a micro-step of its "
                         f"gradient accumulation over {steps} micro-steps that does not synchronise: "
                         "loss.backward() skips the 1/steps Accelerate divides by, so each optimizer step's "
                         f"gradient would be {steps}x too large. Pass backward=accelerator.backward (or "
                         "backward=lambda l: l.backward() if the closure already divides its loss)")


def _accelerate_micro_step() -> int:
    """Accelerate's number of accumulation micro-steps while its shared gradient state says the current one
    does not synchronise (inside ``accelerator.accumulate(model)`` before the last micro-step of an optimizer
    step; the state stays so after a loop that ends there), else 0. Read only when Accelerate is imported."""
    state = getattr(sys.modules.get("accelerate.state"), "GradientState", None)
    if state is None or not getattr(state, "_shared_state", None):
        return 0
    try:
        gradient = state()  # (its shared state, unchanged: no plugin given)
        steps, sync = int(gradient.num_steps), gradient.sync_gradients
    except Exception:  # (another Accelerate version's layout: nothing to say)
        return 0
    return steps if steps > 1 and sync is False else 0


def checked_weights(raw: Any, n: int, who: str = "weights") -> list[float]:
    """Loss weights of ``n`` sub-models: ``n`` finite non-negative numbers, not all 0 (one too few would drop a
    sub-model, a NaN or a negative one train it nothing, in silence); a :class:`SortedNetError` naming ``who``.
    Numbers, not learned: a tensor that requires grad is refused (read as a number, it would get no gradient)."""
    if isinstance(raw, Iterator):
        raw = list(raw)  # (read once, here)
    items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if any(isinstance(w, torch.Tensor) and w.requires_grad for w in items):
        raise SortedNetError(f"{who}: loss weights are numbers, not learned: got tensors that require grad, which "
                             "would get no gradient here; pass w.item() values, or add a learned weighting to the "
                             "loss inside the closure / compute_loss")
    try:
        weights = number_list(raw, "weights")
    except SortedNetError:
        weights = []
    if len(weights) != n or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise SortedNetError(f"{who} must be {n} finite non-negative numbers in the order of the sub-models, "
                             f"got {raw!r}")
    if not any(weights):
        raise SortedNetError(f"{who} {raw!r} are all 0: no sub-model would be trained")
    big = [w for w in weights if w > torch.finfo(torch.float32).max]
    if big:  # (finite here, infinite in a float32 loss: every gradient NaN, the loss itself finite)
        raise SortedNetError(f"{who}: {big[0]!r} is beyond float32 (a loss times it is infinite, every gradient "
                             "NaN); scale the weights down (only their ratios and the learning rate matter)")
    return weights


def _takes(fn: Any, n: int) -> bool:
    """Whether ``fn`` is callable with ``n`` positional arguments: False only where the signature of a Python
    function, method, module's forward or object's ``__call__`` (a plain method), reached through
    ``functools.partial`` (with the arguments it binds) and ``torch.compile`` (what it compiled), says it is not;
    any other callable (a builtin of C, a static ``__call__``, a module whose forward pre-hooks may adapt the
    arguments) is taken at its word. The signature read is the function's own, not the one ``functools.wraps``
    copies from what it wraps (a decorator may change the arguments).

    >>> _takes(lambda: 0, 0), _takes(lambda batch: 0, 0), _takes(lambda *a: 0, 2), _takes(print, 2)
    (True, False, True, True)
    """
    if not callable(fn):
        return False
    args: tuple = ()
    kwargs: dict = {}
    inner = fn
    for _ in range(8):  # (partials of compiled modules of ...: a few layers, never a cycle)
        if isinstance(inner, functools.partial):
            args, kwargs, inner = (*inner.args, *args), {**inner.keywords, **kwargs}, inner.func
        elif isinstance(inner, nn.Module) and type(inner).__name__ == "OptimizedModule" \
                and isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            inner = inner._orig_mod  # (torch.compile of a module: its forward takes the call)
        elif callable(getattr(inner, "_torchdynamo_orig_callable", None)):
            inner = inner._torchdynamo_orig_callable  # (torch.compile of a function)
        else:
            break
    if isinstance(inner, nn.Module) and type(inner).__call__ is nn.Module.__call__:  # (its forward takes the call,
        from torch.nn.modules import module as _m  # unless a forward pre-hook rewrites the arguments first)

        if inner._forward_pre_hooks or _m._global_forward_pre_hooks:
            return True
        target = inner.forward
    else:
        call = inspect.getattr_static(type(inner), "__call__", None)  # (an object's own __call__, read bound; a
        own = not isinstance(inner, type) and inspect.isfunction(call)  # static one's signature 3.11 misreads)
        if not (inspect.isfunction(inner) or inspect.ismethod(inner) or own):
            return True
        target = inner
    try:
        sig = inspect.signature(target, follow_wrapped=False)
    except (TypeError, ValueError):  # (no signature Python can read: taken at its word)
        return True
    try:
        sig.bind(*args, *([None] * n), **kwargs)
    except TypeError:
        return False
    return True


def _checked(nest: Nest, subs: Sequence[SubModelLike], closure: Any, distill: Any, weights: Any, backward: Any,
             nonfinite: Any) -> tuple[list[SubModel], list[float]]:
    """:func:`accumulate`'s arguments checked (a :class:`SortedNetError` for the first fault, before anything
    runs): the resolved sub-models and their weights."""
    if not _takes(closure, 0):
        raise SortedNetError(f"accumulate(nest, subs, closure): the closure must be a function of no arguments "
                             f"returning the loss (it runs the model on the batch it closes over), got {closure!r}")
    if backward is not None and not _takes(backward, 1):
        raise SortedNetError(f"accumulate(backward=...) takes a function of the scaled loss, got {backward!r}")
    refuse_unscaled(nest, backward)
    nest._check_structure("accumulate")  # (a layer list replaced or grown since wrap would train the wrong model)
    ok = isinstance(subs, Sequence) and not isinstance(subs, (str, bytes))
    resolved = [nest.resolve(s) for s in subs] if ok else None
    if not resolved:
        raise SortedNetError(f"accumulate needs a non-empty sequence of sub-models, got {subs!r}")
    if len(set(resolved)) < len(resolved):
        twice = next(s for s in resolved if resolved.count(s) > 1)
        raise SortedNetError(f"accumulate: {twice} is listed twice (each entry is one forward and backward, weighted "
                             "1 / len(subs)); to weight a sub-model more, pass weights=[...]")
    if distill is not None and not isinstance(distill, Distill):
        raise SortedNetError(f"distill= takes sn.Distill(temperature=..., alpha=...), got {distill!r}")
    weights = [1.0 / len(resolved)] * len(resolved) if weights is None else checked_weights(weights, len(resolved))
    if nonfinite not in NONFINITE:
        raise SortedNetError(f"nonfinite= must be one of {list(NONFINITE)}, got {nonfinite!r}")
    return resolved, weights


def _nonfinite_stats(nest: Nest) -> list[str]:
    """BatchNorm modules whose running mean / variance hold a non-finite value (a skipped non-finite batch's
    forward has already written into them: skipping its backward cannot undo that)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [p for p, m in nest.model.named_modules() if isinstance(m, _BatchNorm) and any(
        t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all())
        for t in (m._buffers.get("running_mean"), m._buffers.get("running_var")))]


def _refuse_other_model(nest: Nest, serial: int, last: Any, loss: Tensor, sub: SubModel, warn: bool = True) -> None:
    """Each closure of a nest's first :func:`accumulate` runs its model under ``sub``: a forward of it entered in
    this thread (its serial moved), or else (a compiled forward runs no hook) a loss whose graph reaches one of
    its trainable parameters, not through a forward of another thread under another sub-model (``last``: the
    pin's record before the closure). A closure calling another model (a copy taken before ``sn.wrap``), or the
    model in a thread where this ``nest.use`` is not in force, trained one model ``len(subs)`` times over, and
    nothing nested, in silence."""
    pin = nest._pin
    if pin.local.__dict__.get("serial", 0) == serial:
        now = pin.last
        if now is not None and now is not last and now[0] != threading.get_ident() and \
                getattr(now[1], "sub", sub) != sub:
            raise SortedNetError(f"accumulate: the closure of {sub} ran the model in another thread, where "
                                 f"{getattr(now[1], 'sub', '?')} was in force: nest.use applies to the calling "
                                 "thread (and asyncio task) only. Run the forward in this thread, or give the "
                                 "worker this context: executor.submit(contextvars.copy_context().run, fn, ...)")
        mine = {id(p) for p in nest.model.parameters() if p.requires_grad}
        if mine and not _reaches(loss, mine):
            raise SortedNetError(f"accumulate: the closure of {sub} ran no forward of the nest's model (none "
                                 f"entered {type(nest.model).__name__}, the model sn.wrap wrapped) and its loss "
                                 "depends on none of that model's trainable parameters: it trains another model (a "
                                 "copy taken before sn.wrap?), the same in every sub-model. Call the wrapped model "
                                 "(or a wrapper around it) in the closure")
        return
    if not warn:  # (said once per call)
        return
    mine = {id(p) for p in nest.model.parameters() if p.requires_grad}  # (FSDP2's graph reaches the unsharded
    if not mine or is_fsdp(nest.model) or _reaches(loss, mine, opaque=True):  # parameters, which these are not)
        return
    now = pin.last
    graded = now is not None and now is not last and now[0] == threading.get_ident()
    warnings.warn(f"accumulate: the closure of {sub} ran the model "
                  + ("" if graded else "only without gradients (torch.no_grad, inference_mode) ")
                  + "but its loss depends on none of the nest's model's trainable parameters, so nothing of the "
                  "nest trains: where the loss comes from another model (a copy taken before sn.wrap, a deep copy "
                  "of the wrapped model), accumulate trains that one (the pre-wrap copy the same in every "
                  "sub-model). Compute the loss from the wrapped model's output; a head of your own trained on its "
                  "features without gradients (a probe) is what this does: silence the warning then",
                  LossOutsideModelWarning, stacklevel=caller_outside())


class LossOutsideModelWarning(UserWarning):
    """``accumulate``: in a nest's first call, a closure ran the model but its loss reaches none of the model's
    trainable parameters (a loss from another model: nothing nested trains)."""


def _note_outside(e: BaseException, nest: Nest, sub: SubModel) -> None:
    """Note on an error the closure raised outside the model's forward (the forward's own are noted there): every
    module of the model runs ``sub``'s slices under ``nest.use``, also when called on its own."""
    notes = getattr(e, "__notes__", ())
    if isinstance(e, (SortedNetError, IndexError)) or not isinstance(e, (RuntimeError, ValueError)) or \
            not hasattr(e, "add_note") or any("sortednet" in str(n) for n in notes) or \
            all(sub[d.name] == d.full for d in nest.dims):  # (the full model in force: its slices are whole)
        return
    e.add_note(f"sortednet.accumulate: raised in the closure of {sub} (its nest.use in force); a module of the "
               "nest's model called on its own in the closure (model.encoder(x), model[0](x)) runs that sub-model's "
               "slices too, so a layer of yours reading its output must take the sub-model's width, not the full "
               "model's")


def _reaches(loss: Tensor, params: set[int], opaque: bool = False) -> bool:
    """Whether the autograd graph of ``loss`` has a leaf in ``params`` (ids). ``opaque``: a reentrant activation
    checkpoint's node (a ``CheckpointFunction``: ``torch.utils.checkpoint``'s, DeepSpeed's) counts as reaching
    them (its block's forward reads parameters that are not among its inputs: its graph shows only the
    inputs)."""
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if id(getattr(f, "variable", None)) in params:
            return True
        if opaque and getattr(getattr(f, "_forward_cls", None), "__name__", "") == "CheckpointFunction":
            return True
        stack.extend(g for g, _ in f.next_functions)
    return False


def _run(nest: Nest, resolved: list[SubModel], order: list[int], closure: Callable[[], Any], distill: Any,
         teacher: int | None, weights: list[float], nonfinite: str, backward: Callable[[Tensor], Any] | None,
         _agree: Any, losses: list[float], skipped: list[SubModel], done: list[Any]) -> None:
    """:func:`accumulate`'s loop over the sub-models, in ``order`` (the teacher first); ``done`` collects those
    backpropagated (the one whose backward is running as a 1-tuple: an error there may leave part of its gradients)."""
    target: Tensor | None = None
    orphaned = False  # the teacher was skipped: the students' soft term is absent this step
    for i in order:
        with nest.use(resolved[i]):
            failed: Exception | None = None
            try:
                serial = None if nest._closure_seen else (nest._pin.local.__dict__.get("serial", 0), nest._pin.last)
                try:
                    out = closure()
                except Exception as e:
                    _note_outside(e, nest, resolved[i])
                    raise
                loss, logits, mask = _split(out, distill is not None, resolved[i], distill)
                del out
                if serial is not None:
                    _refuse_other_model(nest, *serial, loss, resolved[i], warn=i == order[0])
                total = loss
                if i == teacher:
                    target = logits.detach()
                elif target is not None and distill.alpha == 1:  # soft targets only: the task loss plays no part
                    total = distill.soft_loss(logits, target, mask)
                elif target is not None and distill.alpha > 0:
                    total = (1 - distill.alpha) * loss + distill.alpha * distill.soft_loss(logits, target, mask)
                elif orphaned and distill.alpha > 0:  # no soft target this step: the task term alone, at its weight
                    total = (1 - distill.alpha) * loss  # (alpha=1: nothing to learn from; no backward below)
                losses[i] = float(loss.detach())
                mine = nonfinite != "ignore" and not math.isfinite(losses[i] if total is loss else
                                                                   float(total.detach()))
            except Exception as e:  # several ranks: the others must hear of it, or they wait in a collective
                if _agree is None or getattr(e, "_sn_ranks_told", False):  # (raised on every rank at once)
                    raise
                failed, mine = e, False
            bad = mine
            if _agree is not None:  # all ranks decide alike (one all_reduce): a non-finite loss or a failure
                try:
                    bad, elsewhere = _agree(mine, failed is not None)
                except Exception as e:
                    if failed is not None:  # this rank's own error (the others were told: they raise too; or the
                        # check failed: another rank waits in another collective, FSDP2's next all-gather after an
                        # error part-way through its forward, until the timeout: this rank's error all the same)
                        raise failed from (None if isinstance(e, SortedNetError) else e)
                    raise
                if failed is not None:
                    raise failed
                if elsewhere:
                    raise SortedNetError(f"accumulate: the closure of {resolved[i]} failed on another rank (its error "
                                         "is raised there); stopping here too, so that no rank is left waiting "
                                         "in a collective")
            if bad:
                what = f"loss of {resolved[i]} is {losses[i]}" + ("" if total is loss else " (with distillation: "
                                                                   f"{float(total.detach())})")
                if not mine:
                    what = f"loss of {resolved[i]} is non-finite on another rank (here {losses[i]})"
                if nonfinite == "raise":
                    err = SortedNetError(f"accumulate: the {what}; its backward would poison the shared "
                                         "gradients. Nothing was backpropagated for it (the sub-models before it "
                                         "in this call were). Pass nonfinite='skip' to skip such sub-models")
                    err._sn_partial = True  # (says it itself)
                    raise err
                skipped.append(resolved[i])
                if i == teacher:
                    target, orphaned = None, True
                    what += ("; the others get no soft target this step: their task loss alone, weighted 1 - alpha = "
                             f"{1 - distill.alpha:g}" + (" (no backward)" if distill.alpha == 1 else ""))
                stats = _nonfinite_stats(nest)
                warnings.warn(f"sortednet.accumulate: skipped the backward of {resolved[i]}: the {what}"
                              + (f"; its forward already left non-finite BatchNorm running statistics in "
                                 f"{stats[:3]}{' ...' if len(stats) > 3 else ''}: every evaluation gives NaN until "
                                 "they are re-estimated (nest.calibrate, or reset_running_stats and a pass over "
                                 "the data) or reloaded" if stats else ""),
                              NonFiniteLossWarning, stacklevel=3)
            elif orphaned and distill.alpha == 1:
                pass  # (a soft-target-only student without its teacher: no term to learn from this step)
            else:
                scaled = total * weights[i]
                done.append((resolved[i],))  # (backward started: an error in it may leave part of its gradients)
                scaled.backward() if backward is None else backward(scaled)
                done[-1] = resolved[i]
                del scaled
        del loss, logits, mask, total  # free this sub-model's graph before the next forward


IGNORE_INDEX = -100  # targets equal to it are not counted by the default accuracy (F.cross_entropy's default)


def _class_axis(out: Any, y: Any, default_loss: bool, step: int) -> int:
    """The class axis of a ``fit`` output to distill over (``Distill(axis=None)``): the last of ``(B, C)`` and of
    the default loss's own (axis 1 of ``(B, C, ...)``, moved last); with a loss of the user's own, read from
    integer targets' shape (``(B, ...)``: axis 1, as ``F.cross_entropy`` reads it; ``(B, L)`` of ``(B, L, V)``:
    the last); refused where neither can tell (targets that fit both, soft labels of the output's shape)."""
    if not isinstance(out, Tensor) or out.dim() <= 2:
        return 0
    if default_loss:
        return 1
    what = f"targets {y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else f"targets of type {type(y).__name__}"
    if not isinstance(y, Tensor):  # (a dict, a tuple: no shape to read the axis from)
        raise SortedNetError(
            f"fit(distill=...): the output of step {step}, {tuple(out.shape)}, could hold its classes on axis 1 "
            f"(a (batch, classes, ...) output, as F.cross_entropy reads it) or on the last axis (a (batch, "
            f"length, vocab) output), and the {what} do not tell: name it, sn.Distill(axis=1) or "
            f"sn.Distill(axis=-1), for the soft term's softmax")
    first = last = False
    if isinstance(y, Tensor) and not (y.is_floating_point() or y.is_complex()):  # (class indices, a bool mask)
        first = tuple(y.shape) == (out.shape[0], *out.shape[2:])
        last = tuple(y.shape) == tuple(out.shape[:-1])
    if first != last:
        return 1 if first else 0
    # (neither or both: a (batch, length, vocab) output with labels of another length, shifted by the loss, reads
    # its vocabulary last; a dense prediction (batch, classes, H, W) with targets (batch, 1, H, W), at another
    # resolution or as soft labels, holds its classes on axis 1; square shapes fit both)
    if first or out.dim() >= 4 or (isinstance(y, Tensor) and y.dim() == out.dim()):  # (labels of as many axes
        # as the logits are no language model's (B, L): a (B, 1, L) column, soft labels of the output's shape)
        raise SortedNetError(
            f"fit(distill=...): the output of step {step}, {tuple(out.shape)}, with {what}, could hold its "
            f"classes on axis 1 (a (batch, classes, ...) output, as F.cross_entropy reads it) or on the last axis "
            f"(a (batch, length, vocab) output), and the targets do not tell: name it, sn.Distill(axis=1) or "
            f"sn.Distill(axis=-1), for the soft term's softmax")
    return 0


def _ignored(out: Any, y: Any) -> tuple[Tensor, ...]:
    """``(mask,)`` of the positions that count in distillation when integer targets ``y`` of the logits' shape
    without the last axis hold ``IGNORE_INDEX`` (padding, a prompt left out of the loss), else ``()``."""
    if (isinstance(out, Tensor) and isinstance(y, Tensor) and not y.is_floating_point() and not y.is_complex()
            and y.dtype != torch.bool and tuple(y.shape) == tuple(out.shape[:-1]) and bool((y == IGNORE_INDEX).any())):
        return (y != IGNORE_INDEX,)
    return ()


def _accuracy(out: Tensor, y: Tensor, axis: int | None = None) -> float:
    """Correct argmax predictions, counted over the target entries that are not ``IGNORE_INDEX``.

    The classes are on the output's last axis (``(batch, classes)``, a language model's ``(batch, length,
    vocab)``) or on axis 1 (``(batch, classes, length)``, ``(batch, classes, H, W)``: as ``F.cross_entropy``
    reads them), whichever leaves the targets' shape; ``axis`` where it is known (fit's default loss reads axis
    1). Refuses what argmax accuracy cannot score right, instead of a number that means nothing: float targets (a
    regression), one logit per example (argmax is always 0), targets whose shape is no prediction's (a ``(B, 1)``
    column against ``(B,)`` predictions would broadcast to ``(B, B)``), and an output both readings fit (as many
    classes as positions: ``(B, 6, 6)`` with targets ``(B, 6)``). A NaN logit (or a row of -inf only) at a counted
    position scores NaN (its argmax would be 0: a diverged model would get the share of class 0); -inf in some
    classes (masked ones) is scored as usual."""
    if not isinstance(out, Tensor):
        raise SortedNetError(f"the default accuracy needs the model's output to be a tensor of logits, got "
                             f"{type(out).__name__}; pass metric=")
    if y.is_floating_point() or y.is_complex():
        raise SortedNetError(f"the default accuracy compares argmax predictions with integer class targets; the "
                             f"targets are {y.dtype} (a regression task, or soft labels?): pass metric=, a "
                             "callable metric(output, target) returning the sum over the batch")
    if out.dim() >= 3:
        if axis is None and _accuracy_axis(out, y) is None:
            raise SortedNetError(
                f"the default accuracy cannot tell the classes' axis of an output {tuple(out.shape)} with targets "
                f"{tuple(y.shape)}: axis 1 (a (batch, classes, ...) output, as F.cross_entropy reads it) and the "
                "last axis (a (batch, length, vocab) output) both leave the targets' shape (and no batch of "
                "another shape tells); pass metric=, e.g. lambda out, y: (out.argmax(1) == y).sum()")
        axis = _accuracy_axis(out, y) if axis is None else axis
    else:
        axis = -1
    if out.dim() == 0 or out.shape[axis] < 2:
        where = "the last axis" if axis == -1 else f"axis {axis}"
        raise SortedNetError(f"the default accuracy takes the argmax over the classes, {where} of the output, "
                             f"which has shape {tuple(out.shape)} (one logit per example or position: argmax is "
                             "always 0); pass metric=, e.g. lambda out, y: "
                             + (f"((out.squeeze({axis}) > 0).long() == y).sum()" if out.dim() <= 2 else
                                f"((out.squeeze({axis}) > 0).long() == y).flatten(1).float().mean(1).sum() (a "
                                "custom metric's sum is divided by the examples, not the positions)") + _ONE_LOGIT_LOSS)
    pred = out.argmax(axis)
    if out.dim() == 1 and tuple(out.shape) == tuple(y.shape):
        raise SortedNetError(f"the default accuracy takes the argmax over the classes, the last axis of the output, "
                             f"which has shape {tuple(out.shape)}, the targets' shape: one logit per example (argmax "
                             "would pick an example, not a class); pass metric=, e.g. lambda out, y: ((out > 0).long() "
                             "== y).sum()" + _ONE_LOGIT_LOSS)
    if tuple(pred.shape) != tuple(y.shape):
        raise SortedNetError(f"the default accuracy compares output.argmax({axis}) of shape {tuple(pred.shape)} "
                             f"with targets of shape {tuple(y.shape)}: they must be equal (give class indices "
                             "shaped like the predictions, e.g. y.squeeze(-1) for a column), or pass metric=")
    counted = _counted(y)
    classes = out.shape[axis]
    kept = y[counted] if isinstance(counted, Tensor) else y
    if y.dtype != torch.bool and kept.numel() and bool(((kept < 0) | (kept >= classes)).any()):
        wrong = kept[(kept < 0) | (kept >= classes)]
        raise SortedNetError(f"the default accuracy: a target is not a class index in 0..{classes - 1} (nor the "
                             f"ignored {IGNORE_INDEX}): {wrong[:4].tolist()} for an output of {classes} classes (on "
                             f"{'the last axis' if axis == -1 else f'axis {axis}'}); labels shifted or of another "
                             "class count would score a meaningless accuracy (an ignore index of your own, 255 in "
                             "segmentation: map it to -100, y.long().masked_fill(y == 255, -100) (in a signed type: "
                             "uint8 wraps -100 to the class 156), which the default accuracy leaves out)")
    bad = out.isnan().any(axis) | (out == -math.inf).all(axis)  # (-inf in some classes: masked ones, argmax is fine)
    if bool((bad & torch.as_tensor(counted, device=out.device)).any()):
        return math.nan  # (argmax over a NaN row is 0: a diverged model scored as the share of class 0)
    return float(((pred == y) & counted).sum())


_ONE_LOGIT_LOSS = ("; to train it with fit, pass loss_fn= too (e.g. lambda out, y: F.binary_cross_entropy_with_logits("
                   "out.squeeze(-1), y.float())): fit's default loss, cross-entropy over the classes, needs two "
                   "classes as well")


def _accuracy_axis(out: Tensor, y: Tensor) -> int | None:
    """The classes' axis of an output of 3 or more axes for targets ``y``: 1 (``(batch, classes, ...)``) or -1
    (``(batch, length, vocab)``) where only that one leaves the targets' shape; -1 where neither does (refused
    by the shape check); None where both do (as many classes as positions)."""
    last = tuple(out.shape[:-1]) == tuple(y.shape)
    second = (out.shape[0], *out.shape[2:]) == tuple(y.shape)
    return None if last and second else 1 if second else -1


class _Accuracy:
    """The default accuracy with its classes' axis known: fit's default loss, F.cross_entropy, trains axis 1."""

    def __init__(self, axis: int) -> None:
        self.axis = axis

    def __call__(self, out: Tensor, y: Tensor) -> float:
        return _accuracy(out, y, self.axis)


def _counted(y: Tensor) -> Tensor | bool:
    """The target entries the default accuracy counts: all but ``IGNORE_INDEX`` (only a signed integer type can
    hold it: in uint8, -100 would wrap to the class 156)."""
    return (y != IGNORE_INDEX) if y.is_signed() else True


def _count(y: Tensor) -> int:
    """How many target entries of ``y`` the default accuracy divides by."""
    kept = _counted(y)
    return y.numel() if kept is True else int(kept.sum())


def _batches(data: Any) -> Iterable[tuple[Any, Any]]:
    """One ``(inputs, target)`` pair (inputs a tensor, a tuple or a dict; target a tensor, a dict, or any target
    where the inputs are a tensor or a dict: no batch is one; a tuple of a tuple of inputs and a tuple / list
    target that cannot be two batches, their lengths other than 2 and 2), or batches of them (a list of pairs).
    A tuple of two pairs reads both ways and is refused; so is a dict (a batch of keyword inputs and labels,
    whose target is not told)."""
    if isinstance(data, Mapping):
        raise SortedNetError(
            f"the data is one dict (keys {list(data)[:6]}), iterated it gives its keys: pass (inputs, target) "
            "pairs, e.g. ({k: v for k, v in batch.items() if k != 'labels'}, batch['labels']), or a list of them")
    if isinstance(data, (tuple, list)) and len(data) == 2 and (
            isinstance(data[1], (Tensor, Mapping)) and isinstance(data[0], (tuple, list))  # (no batch is a dict)
            or isinstance(data[0], Tensor) or keyword_inputs(data[0])
            or isinstance(data[1], (Tensor, np.ndarray)) and not isinstance(data[0], (tuple, list))  # (nor a tensor:
            ) and not (  # inputs of any type, a dataclass or a mapping of one's own, with a tensor target)
            isinstance(data, list) and isinstance(data[0], Mapping) and isinstance(data[1], Mapping)
            and set(data[0]) == set(data[1])):
        # (a list of two dicts of the same keys is two batches of keyword inputs and labels; a tuple of them an
        # (inputs, target) pair, a denoiser's)
        return [tuple(data)]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], (tuple, list)) \
            and isinstance(data[1], (tuple, list)):  # (positional inputs, and a target of several parts? A list
        if len(data[0]) != len(data[1]) or len(data[0]) != 2:  # is batches; a tuple of batches have one form,
            return [tuple(data)]                                 # and are pairs: else one pair)
        if len(data[0]) == 2:
            raise SortedNetError(
                f"the data {_sketch(data)} reads two ways: one (inputs, target) pair whose inputs are a tuple of "
                "positional arguments and whose target is a tuple, or two (inputs, target) batches; pass "
                "[(inputs, target)] for one pair, or a list of batches [(x1, y1), (x2, y2)]")
    return data


def _sketch(data: Any) -> str:
    """``data``'s structure, tensors as their shapes: ((t(4, 3), t(4, 2)), (t(4,), t(4,)))."""
    if isinstance(data, Tensor):
        return f"t{tuple(data.shape)}"
    if isinstance(data, (tuple, list)):
        inner = ", ".join(_sketch(d) for d in data)
        return f"({inner},)" if isinstance(data, tuple) and len(data) == 1 else \
            f"({inner})" if isinstance(data, tuple) else f"[{inner}]"
    return type(data).__name__


def _examples(y: Any, x: Any = None) -> int | None:
    """How many examples the target ``y`` of a custom metric holds, for inputs ``x``: a tensor's first size; for
    a tuple / list / dict (a tokenizer's BatchEncoding too) of tensors, the first size they share
    (``(labels, weights)``: not the 2 of the tuple), or the number of entries of a list / tuple of one per
    example (per-example tensors, ints) where that is the inputs' batch and the shared size is not; None where
    it cannot be told."""
    from torch.utils._pytree import tree_leaves

    if isinstance(y, Tensor):
        return len(y) if y.dim() else None
    try:
        leaves = tree_leaves(dict(y) if isinstance(y, Mapping) else y)
    except Exception:  # (a structure pytree cannot walk)
        return None
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    sizes = {len(t) for t in tensors if t.dim()}
    shared = next(iter(sizes)) if len(sizes) == 1 else None
    entries = len(y) if isinstance(y, (tuple, list)) else None  # (one entry per example: a list of references)
    flat = entries if entries is not None and not any(isinstance(v, (tuple, list, Mapping)) for v in y) else None
    batch = next((len(t) for t in tree_leaves(as_inputs(x)) if isinstance(t, Tensor) and t.dim()), None) \
        if x is not None else None
    if batch is not None and entries == batch != shared:
        return entries  # (one tensor per example, of the same size: a multi-label target per example)
    if shared is not None or len(sizes) > 1:
        return shared
    return flat  # (plain values, or 0-d tensors, one per example)


def _one_shot(data: Any) -> bool:
    """An iterator (a generator: exhausted after one pass; its ``__iter__`` returns itself), not a re-iterable
    loader or list. Told without calling ``iter`` (a loader's iterator draws from torch's random stream and may
    start worker processes)."""
    return isinstance(data, Iterator)


def _reread(data: Any) -> bool:
    """Data that reads the same at every pass by construction: a list, a tuple, a tensor, a DataLoader over a
    map-style dataset (its sampler indexes it afresh)."""
    from torch.utils.data import DataLoader, IterableDataset

    return isinstance(data, (Tensor, tuple, list, Mapping, np.ndarray)) or isinstance(data, DataLoader) and \
        not isinstance(data.dataset, IterableDataset)


def _same_batch(a: Any, b: Any, depth: int = 0) -> bool:
    """Whether two batches hold the same structure (any mapping as a dict: a tokenizer's BatchEncoding; a
    dataclass by its fields; an object of a class without a value comparison by its attributes), tensors and
    arrays (by value, NaN equal to NaN) and plain values. What cannot be told apart counts as the same."""
    import dataclasses

    if depth > 8:  # (an object graph this deep, or one that holds itself: not told apart)
        return True
    same = functools.partial(_same_batch, depth=depth + 1)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype and \
            a.device == b.device and (torch.equal(a, b) or a.is_floating_point()
                                      and bool((a.eq(b) | a.isnan() & b.isnan()).all()))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and \
            a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return isinstance(a, Mapping) and isinstance(b, Mapping) and list(a) == list(b) and \
            all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    if type(a).__eq__ is object.__eq__:  # (a class of the user's without a value comparison: == is identity)
        if type(a) is not type(b):
            return False
        va, vb = getattr(a, "__dict__", None), getattr(b, "__dict__", None)
        return True if va is None or vb is None else same(dict(va), dict(vb))
    try:
        return bool(a == b)
    except Exception:  # (a comparison that does not give one truth value: not told apart)
        return True


def _to(x: Any, device: torch.device | None) -> Any:
    """``x`` (a tensor, or tuples / lists / dicts of them; a BatchEncoding as one, a new one) on ``device``."""
    if device is None:
        return x
    import collections
    import copy

    from torch.utils._pytree import tree_map

    moved = tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, as_inputs(x))
    if isinstance(x, collections.UserDict) and keyword_inputs(x):  # (a model may read batch.input_ids)
        out = copy.copy(x)
        out.data = moved
        return out
    return moved


class _NoBatches(SortedNetError):
    """``evaluate`` got no batches (``fit`` says which evaluation)."""


def evaluate(nest: Nest, data: Any, *, subs: Iterable[SubModelLike] | None = None,
             metric: Callable[[Tensor, Tensor], float] | None = None) -> dict[SubModel, float]:
    """Score every sub-model (default: all of ``nest.submodels``) on ``data``:
    one ``(inputs, target)`` pair or an iterable of such batches (``inputs`` as in
    :func:`fit`).

    ``metric(output, target)`` returns the SUM over the batch (default: number
    of correct argmax predictions); the result is divided by the number of
    examples (a target's first size: for a tuple / dict of tensors the one they share), so the default is
    accuracy. The default needs integer class targets shaped like the output without its classes' axis: the
    last (``(batch, classes)``, ``(batch, length, vocab)``) or axis 1 (``(batch, classes, length)``, as
    ``F.cross_entropy`` reads it), whichever fits (both: refused unless another batch tells) (a sequence's
    tokens each count; targets equal to -100, the ignore index of ``F.cross_entropy``, are left out; bool labels
    count as classes 0 / 1) and refuses float targets, one
    logit per example, targets out of the class range and other shapes with a :class:`SortedNetError`: pass
    ``metric=`` for regression, single-logit, shifted language-model labels and other tasks. Runs without
    grad in eval mode on a private view of the model that shares its weights: the model's own mode, seen
    by every thread (one may be training it), never changes.

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> from sortednet.train import evaluate
    >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)), sn.Width("h", [4, 8], out="0", inp="1"))
    >>> scores = evaluate(nest, (torch.randn(10, 4), torch.randint(0, 3, (10,))))
    >>> sorted(str(s) for s in scores), all(0 <= v <= 1 for v in scores.values())
    (['h=4', 'h=8'], True)
    """
    return _evaluate(nest, data, subs=subs, metric=metric)


def _evaluate(nest: Nest, data: Any, *, subs: Iterable[SubModelLike] | None = None,
              metric: Callable[[Tensor, Tensor], float] | None = None, sample: bool = False) -> dict[SubModel, float]:
    """:func:`evaluate`; ``sample``: ``data`` is a sample of the evaluation set (fit's check of its first batch),
    on which the default accuracy may leave the classes' axis untold (another batch may tell it)."""
    _need_nest(nest, "evaluate")
    default = metric is None or isinstance(metric, _Accuracy)
    if not default and not _takes(metric, 2):
        raise SortedNetError(f"evaluate(metric=...) takes a callable metric(output, target) returning the sum over "
                             f"the batch, got {metric!r}")
    metric = _accuracy if metric is None else metric
    subs = list(nest.submodels) if subs is None else [nest.resolve(s) for s in subs]
    if not subs:
        raise SortedNetError("evaluate(subs=[]) has no sub-model to score")
    model = nest.model
    device = next((p.device for p in model.parameters()), None)
    batches = []
    for item in _batches(data):
        ok = isinstance(item, (tuple, list)) and len(item) == 2
        y = item[1] if ok else None
        if ok and (default or isinstance(y, Tensor)):  # the default metric needs tensor targets
            ok = isinstance(y, Tensor) and y.dim() >= 1 and len(y) > 0
        if not ok:
            pair = isinstance(item, (tuple, list)) and len(item) == 2
            got = (f"batch {len(batches)}'s target is " + (f"a {type(y).__name__}" if not isinstance(y, Tensor)
                                                            else f"a tensor of shape {tuple(y.shape)}")
                   if pair else f"got {type(item).__name__}"
                   + (f" of {len(item)} items" if isinstance(item, (tuple, list)) else "")
                   + (f" (keys {list(item)[:6]}): a batch of keyword inputs and labels is split into a pair, e.g. "
                      "({k: v for k, v in batch.items() if k != 'labels'}, batch['labels']) (a list of two dicts "
                      "of the same keys is two batches; a tuple of them, one (inputs, target) pair)"
                      if isinstance(item, Mapping) else ""))
            raise SortedNetError("evaluate needs (inputs, target) pairs with targets of at least one example (a "
                                 f"tensor for the default accuracy); {got}")
        if not default and not (_examples(y, item[0]) or 0) > 0:
            from torch.utils._pytree import tree_leaves

            try:
                sizes = [tuple(t.shape) for t in tree_leaves(y) if isinstance(t, Tensor)]
            except Exception:
                sizes = []
            raise SortedNetError(
                f"evaluate: cannot tell how many examples the target of batch {len(batches)} holds (a custom metric's "
                f"sum is divided by them): got {type(y).__name__}"
                + (f" holding tensors of shapes {sizes[:4]}" if sizes else "") + "; give a tensor, or a tuple / "
                "dict of tensors whose first size is the batch's")
        batches.append((_to(item[0], device), _to(item[1], device)))
    if not batches:
        raise _NoBatches("evaluate got no batches")
    # the default (accuracy) counts every target entry but the ignore index (a sequence's tokens too); a custom
    # metric sums per example
    count = sum((_count(y) if default else _examples(y, x)) for x, y in batches)
    if default and count == 0:
        raise SortedNetError(f"evaluate: every target is the ignore index {IGNORE_INDEX}; nothing to score")
    out: dict[SubModel, float] = {}
    axis = metric.axis if isinstance(metric, _Accuracy) else None  # (the default's classes' axis, once told)

    def score(o: Any, y: Any) -> float:
        if default:
            return float(_accuracy(o, y, axis))
        got = metric(o, y)
        if isinstance(got, Tensor) and got.numel() != 1 or isinstance(got, (tuple, list, Mapping, np.ndarray)):
            raise SortedNetError(f"evaluate(metric=...): the metric returned {_sketch(got)} on a batch; it returns "
                                 "the SUM over the batch, one number (e.g. (out.argmax(-1) == y).sum(), not the "
                                 "per-example values)")
        return float(got)

    with eval_mode(nest) as (view, _), torch.no_grad():
        for s in subs:
            with nest.use(s):
                try:
                    total, later = 0.0, []
                    for i, (x, y) in enumerate(batches):
                        o = call_model(view, x)
                        if default and axis is None and isinstance(o, Tensor) and o.dim() >= 3 \
                                and isinstance(y, Tensor):
                            told = _accuracy_axis(o, y)
                            if told is None:  # (as many classes as positions: another batch may tell)
                                later.append(i)
                                continue
                            axis = told
                        total += score(o, y)
                    if not (sample and axis is None):  # (a sample of the set: its other batches may tell the axis)
                        total += sum(score(call_model(view, batches[i][0]), batches[i][1]) for i in later)
                except SortedNetError:
                    raise
                except Exception as e:
                    raise SortedNetError(f"evaluate: sub-model {s} fails on the data: {type(e).__name__}: {e}") from e
            out[s] = total / count
    return out


@dataclass
class History:
    """What :func:`fit` recorded: per-step losses and periodic evaluations.

    ``train``: ``{"step", "losses": {sub: loss}}`` per optimizer step;
    ``evals``: ``{"step", "scores": {sub: score}}`` (sub-models as strings).

    >>> from sortednet.train import History
    >>> h = History(train=[{"step": 0, "losses": {"h=4": 1.0}}, {"step": 1, "losses": {"h=4": 0.5}}])
    >>> h.mean_loss(), h.last_scores
    ({'h=4': 0.75}, {})
    """

    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_scores(self) -> dict[str, float]:
        """Scores of the latest evaluation (empty when none ran)."""
        return dict(self.evals[-1]["scores"]) if self.evals else {}

    def mean_loss(self, last: int | None = 50) -> dict[str, float]:
        """Mean training loss per sub-model over the last ``last`` steps (``None``: all of them). Losses a step
        skipped (``nonfinite="skip"``: listed under ``"skipped"``) are left out; any other non-finite loss was
        trained on (``nonfinite="ignore"``) and makes its sub-model's mean non-finite, as the run it reports."""
        if last is not None and (isinstance(last, bool) or not isinstance(last, numbers.Integral) or last < 1):
            raise SortedNetError(f"History.mean_loss(last=...) takes a number of steps >= 1 or None (all), "
                                 f"got {last!r}")
        sums: dict[str, list[float]] = {}
        for rec in self.train if last is None else self.train[-int(last):]:
            skipped = set(rec.get("skipped", ()))  # (a finite task loss whose distillation term was not finite)
            for s, v in rec["losses"].items():
                if s not in skipped:
                    sums.setdefault(s, []).append(v)
        return {s: sum(v) / len(v) for s, v in sums.items()}


def _groups(n: int) -> list[str]:
    names = ["S", "M", "L"] if n >= 3 else ["S", "L"][-n:]
    return [names[min(len(names) - 1, i * len(names) // n)] for i in range(n)]


def fit(nest: Nest, loader: Iterable[tuple[Any, Any]], optimizer: torch.optim.Optimizer, sampler: Sampler, *,
        epochs: int = 1, loss_fn: Callable[[Any, Any], Tensor] | None = None, distill: Distill | None = None,
        eval_data: Any = None, eval_every: int | None = None, metric: Callable[[Any, Any], Any] | None = None,
        start_step: int = 0, scheduler: Any = None, progress: bool = True, device: torch.device | str | None = None,
        nonfinite: str = "skip") -> History:
    """Train with ``sampler`` + :func:`accumulate` over ``epochs`` passes of ``loader``.

    ``loader`` yields ``(inputs, target)``: ``inputs`` a tensor, a tuple of positional
    arguments or a dict (or a tokenizer's BatchEncoding) of keyword arguments of the model, or its one input where
    its forward takes none of the keys (``forward(self, batch)``) (as everywhere: ``profile``, ``calibrate``,
    ``check``); each batch is one optimizer step
    numbered from ``start_step`` (to resume, pass the step reached and the
    remaining batches; the sampler then draws what the uninterrupted run would).
    ``loss_fn(output, target)``: by default ``F.cross_entropy`` on class-index targets; float targets are
    refused with the default before any forward (``F.cross_entropy`` would read them as class probabilities,
    so a regression trained in silence on a meaningless loss): pass ``loss_fn=F.mse_loss`` (or your loss) for a
    regression, ``loss_fn=F.cross_entropy`` itself for soft labels. The default takes class indices of any
    integer type (bool as 0 / 1) and reads the model's output as a tensor of logits: checked on the first
    batch before any training forward (one training-mode forward of the smallest sub-model on a private view,
    dropout off, no gradients, nothing it writes kept; so is the output ``distill=`` reads), a model returning a
    dict or a tuple is refused (pass ``loss_fn=``). So are a ``scheduler`` built on another optimizer (its
    schedule would never apply; a wrapper sharing the optimizer's parameter groups, as Accelerate's, is the same
    optimizer) and an optimizer whose ``step`` needs a closure (``torch.optim.LBFGS``: write the loop with
    :func:`accumulate` inside that closure).
    A tqdm bar shows the running loss of small / medium / large sub-models.
    With ``eval_data``, every sub-model is scored (:func:`evaluate`) whenever
    the step count (continued from ``start_step``) reaches a multiple of
    ``eval_every``, and at the end, with ``metric`` (default: accuracy; see :func:`evaluate`, which refuses
    targets accuracy cannot score, such as a regression's float targets); before the first step, every batch
    of a list (the first of a loader) is checked to be an ``(inputs, target)`` pair and the first is
    evaluated, so a malformed eval set is refused before training. Returns a :class:`History`.
    A sampler built with ``loss_weights=`` weights each drawn sub-model's loss by them. With ``distill=`` and the
    default loss, the soft targets are read over the loss's class axis (axis 1 of a ``(batch, classes, ...)``
    output); with ``loss_fn=``, over the last axis (:class:`Distill`).
    ``nonfinite`` goes to :func:`accumulate`: by default a sub-model whose loss is
    NaN / inf is skipped for that step (a warning; the step's record lists it
    under ``"skipped"``; a step whose every sub-model was skipped moves no weight, no gradient being left, yet
    counts as a step: the scheduler steps too, so the schedule stays aligned with the step numbers a resumed
    run uses); ``"raise"`` stops the run instead, with no gradient left behind (the optimizer did
    not step; ``fit`` also clears gradients before its first step). Unless ``"ignore"``, the gradients are
    checked too before each optimizer step (finite losses may backpropagate NaN: ``sqrt`` at 0, a float16
    overflow): a step that left a non-finite one skips its optimizer step (a warning; every drawn sub-model
    listed under ``"skipped"``), or stops the run with ``"raise"``. Evaluations leave torch's random state
    alone, so a resumed run draws what the uninterrupted one did. The model trains in train mode;
    every module's train / eval mode is back as it was when ``fit`` returns (or raises); an error or a
    Ctrl-C that stops the run carries a note saying how many optimizer steps it made. Per-sub-model
    BatchNorm statistics of :meth:`Nest.calibrate` describe the weights ``fit`` is about to change: ``fit``
    drops them at its first optimizer step (a warning says so; a run refused before it keeps them) and the
    evaluations read the shared statistics; calibrate again after it.

    >>> import torch, torch.nn as nn, sortednet as sn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="0", inp="2"))
    >>> x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
    >>> opt = torch.optim.Adam(model.parameters(), lr=0.05)
    >>> hist = sn.fit(nest, [(x, y)] * 30, opt, sn.Sampler(nest.submodels, k=2, seed=0),
    ...               eval_data=(x, y), progress=False)
    >>> min(hist.last_scores.values()) > 0.8
    True
    """
    _need_nest(nest, "fit")
    if not all(callable(getattr(optimizer, f, None)) for f in ("step", "zero_grad")):
        raise SortedNetError(f"fit() needs an optimizer (torch.optim.Optimizer: step, zero_grad), got "
                             f"{type(optimizer).__name__}")
    if not isinstance(sampler, Sampler):
        raise SortedNetError(f"fit() needs an sn.Sampler, got {type(sampler).__name__}")
    if distill is not None and (sampler.k == 1 or len(sampler.submodels) == 1):
        raise SortedNetError(f"fit(distill=...) with {sampler!r}: each step draws one sub-model, which is its own "
                             "teacher (the largest drawn), so distillation would change nothing. Draw several per "
                             "step (k >= 2; strategy='sandwich' always holds the largest), or leave distill= out")
    if loss_fn is not None and not _takes(loss_fn, 2):
        raise SortedNetError(f"fit(loss_fn=...) takes a callable loss_fn(output, target), got {loss_fn!r}")
    if loader is None or isinstance(loader, (str, bytes)) or not isinstance(loader, Iterable):
        raise SortedNetError(f"fit() needs a loader of (inputs, target) batches, got {type(loader).__name__}")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise SortedNetError(f"fit(scheduler=...) takes an LR scheduler (with .step()), got {scheduler!r}")
    if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and \
            not _takes(scheduler.step, 0):  # (that one needs a metric: refused below, saying so)
        raise SortedNetError(f"fit(scheduler=...): fit calls scheduler.step() with no argument after each optimizer "
                             f"step, but {type(scheduler).__name__}.step needs one (an epoch or a metric: a timm-style "
                             "scheduler's step(epoch), step_update(num_updates)): wrap it, e.g. a small object whose "
                             "step() calls it with the step count, or use one whose step() takes none (most of "
                             "torch.optim.lr_scheduler's)")
    if scheduler is not None and not _same_groups(getattr(scheduler, "optimizer", optimizer), optimizer):
        raise SortedNetError(f"fit(scheduler=...): the scheduler ({type(scheduler).__name__}) sets the learning rate "
                             "of another optimizer than the one fit steps, so its schedule would never apply; build "
                             "it on fit's optimizer")
    closure = _required_closure(optimizer)
    if closure:
        raise SortedNetError(f"fit(): {type(optimizer).__name__}.step needs a closure ({closure!r}) that re-evaluates "
                             "the loss (a line-search optimizer); fit steps once per batch after sn.accumulate: "
                             "write the loop yourself, calling sn.accumulate inside that closure")
    if world_size() > 1:
        raise SortedNetError(f"fit() trains in one process, but a process group of {world_size()} ranks is "
                             "initialised: each rank would train its own copy. Write the loop with "
                             "sortednet.distributed.accumulate (DDP / FSDP2 / Accelerate; docs/scaling.md), which "
                             "synchronises the gradients")
    if sampler.submodels != nest.submodels and any(s not in nest.submodels for s in sampler.submodels):
        raise SortedNetError("the sampler lists sub-models this nest does not have; build it from nest.submodels")
    held = {id(p) for g in getattr(optimizer, "param_groups", ()) for p in g.get("params", ())}
    if held and not held & {id(p) for p in nest.model.parameters()}:
        raise SortedNetError("fit(): the optimizer holds none of the nest's model's parameters (built for another "
                             "model, or before a reload replaced them), so its steps would train nothing; build it "
                             "from nest.trainable_parameters() after wrap")
    if held:
        names = {id(p): n for n, p in nest.model.named_parameters()}
        missing = [names.get(id(p), "?") for p in nest.trainable_parameters() if id(p) not in held]
        if missing:  # (Rank adapters an optimizer built before sn.wrap / sn.load never saw: trained nothing)
            warnings.warn(f"fit(): the optimizer does not hold {len(missing)} of the parameters the nest trains "
                          f"({missing[:3]}{' ...' if len(missing) > 3 else ''}): they get gradients, but fit never "
                          "steps them. Build the optimizer from nest.trainable_parameters() after sn.wrap / sn.load "
                          "(which add Rank adapters and factors), or freeze what you mean to keep "
                          "(requires_grad_(False))", UserWarning, stacklevel=2)
    thawed = [(f"{path}.{n}" if path else n) for path, m in nest._sliced.items()
              if type(m._sn.slicer).__name__ == "LoRASlicer" for n in ("weight",)  # (a bias trained beside the
              #                                                       adapters, as PEFT's bias="lora_only", is a choice)
              if (p := m._parameters.get(n)) is not None and p.requires_grad and (not held or id(p) in held)]
    if thawed:
        warnings.warn(f"fit(): the frozen base of a lora Rank target requires grad again ({thawed[:3]}"
                      f"{' ...' if len(thawed) > 3 else ''}; model.requires_grad_(True) thaws it), and the optimizer "
                      "holds it: the base trains beside the adapters and changes every sub-model, the largest "
                      "included. Freeze it again (requires_grad_(False) on those tensors), or build the optimizer "
                      "from nest.trainable_parameters()", UserWarning, stacklevel=2)
    def whole(v: Any) -> bool:  # (an int, also numpy's or a 0-d torch one: a step read back from an array, a
        return as_int(v) is not None  # loaded record or a tensor)

    epochs, start_step = (as_int(v) if as_int(v) is not None else v for v in (epochs, start_step))
    eval_every = as_int(eval_every) if eval_every is not None and as_int(eval_every) is not None else eval_every

    if not whole(epochs) or epochs < 1:
        raise SortedNetError(f"epochs must be a positive int, got {epochs!r}")
    if eval_every is not None and (not whole(eval_every) or eval_every < 1):
        raise SortedNetError(f"eval_every must be a positive int or None, got {eval_every!r}")
    if not whole(start_step) or start_step < 0:
        raise SortedNetError(f"start_step must be an int >= 0, got {start_step!r}")
    epochs, start_step = int(epochs), int(start_step)
    eval_every = None if eval_every is None else int(eval_every)
    if nonfinite not in NONFINITE:
        raise SortedNetError(f"nonfinite= must be one of {list(NONFINITE)}, got {nonfinite!r}")
    if metric is not None and not _takes(metric, 2):
        raise SortedNetError(f"fit(metric=...) takes a callable metric(output, target) returning the sum over the "
                             f"batch, got {metric!r}")
    if metric is not None and eval_data is None:
        raise SortedNetError("fit(metric=...) scores eval_data, but no eval_data was given")
    if eval_every is not None and eval_data is None:
        raise SortedNetError(f"fit(eval_every={eval_every}) evaluates eval_data, but no eval_data was given")
    if metric is None and loss_fn is None:  # (the accuracy of what the default loss trains: classes on axis 1)
        metric = _Accuracy(1)
    if eval_data is not None and _one_shot(eval_data):
        raise SortedNetError(f"fit(eval_data=...) is evaluated more than once: give data it can iterate again (a "
                             f"list, a DataLoader, an (inputs, target) pair), not a {type(eval_data).__name__}, an "
                             "iterator (read once: a generator; an iterator that restarts on iter(): give fit an "
                             "object whose __iter__ returns a new one)")
    if scheduler is not None and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise SortedNetError("fit(scheduler=ReduceLROnPlateau) needs a metric at each step; fit calls "
                             "scheduler.step() without one: step it yourself from the History, or use another "
                             "scheduler")
    _flag("fit", "progress", progress)
    if device is not None:
        asked = device
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise SortedNetError(f"fit(device=...): {e}") from None
        if device.type == "meta":
            raise SortedNetError("fit(device='meta'): nothing can be trained on the meta device")
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:  # (a CPU build raises AssertionError for "cuda")
            raise SortedNetError(f"fit(device={asked!r}): that device is not available here: {e}") from None
    if epochs > 1 and _one_shot(loader):
        raise SortedNetError(f"fit(epochs={epochs}) needs a loader it can iterate again (a list, a DataLoader); "
                             f"a {type(loader).__name__} is an iterator, read once (a generator is exhausted after "
                             "the first epoch; an iterator that restarts on iter(): give fit an object whose "
                             "__iter__ returns a new one)")
    model = nest.model
    if device is None:
        device = next((p.device for p in model.parameters()), None)
    group = dict(zip(nest.submodels, _groups(len(nest.submodels))))
    ema: dict[str, float] = {}
    hist = History()
    step = start_step
    try:
        total = epochs * len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if eval_data is not None:  # a malformed eval set is refused now, not after the first eval_every steps:
        with _rng_kept(device, eval_data):  # (iterating a DataLoader draws from torch's generator, or the loader's
            first = next(iter(_batches(eval_data)), None)  # own: resumed runs stay exact)
            _evaluate(nest, [first] if first is not None else [], subs=[nest.smallest, nest.largest],
                      metric=metric, sample=True)
        if first is not None and not _reread(eval_data):  # (a stream: read again from the same random state, as
            with _rng_kept(device, eval_data):              # the first read, it must start over)
                again = next(iter(_batches(eval_data)), None)
                if again is None or not _same_batch(first, again):
                    warnings.warn(
                        f"fit(eval_data=...): a {type(eval_data).__name__} read twice gave "
                        + ("nothing" if again is None else "another first batch") + " the second time: a stream "
                        "that cannot restart (its __iter__ returns one stored iterator) would be scored at each "
                        "evaluation on what earlier reads left; give a list or a re-iterable loader (one that "
                        "shuffles its examples scores the same ones: then nothing is wrong)", stacklevel=2)
        if isinstance(eval_data, (tuple, list)):  # the first batch runs; every other batch of a list is a pair
            bad = next((b for b in _batches(eval_data) if not (isinstance(b, (tuple, list)) and len(b) == 2)), None)
            if bad is not None:
                raise SortedNetError("fit(eval_data=...): evaluate needs (inputs, target) pairs; got a "
                                     f"{type(bad).__name__}" + (f" of {len(bad)} items" if
                                                                isinstance(bad, (tuple, list)) else ""))
    modes = [(m, m.training) for m in model.modules()]
    # steps whose update is in the weights, and where a step stands ("optimizer": its optimizer.step() was
    # called and may or may not have returned; "scheduler": done, its scheduler.step() maybe not): _fit_loop
    reached: list[Any] = [start_step, None, 0]
    try:
        model.train()
        _fit_loop(nest, loader, sampler, optimizer, scheduler, loss_fn, distill, nonfinite, epochs, total,
                  progress, device, group, ema, hist, step, eval_data, eval_every, metric, reached)
    except BaseException as e:  # where the run stopped: what a resumed run needs to know
        if hasattr(e, "add_note"):
            stepped = reached[0] - start_step
            bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                     for m in model.modules())
            e.add_note((f"sortednet.fit: stopped in optimizer step {reached[0]} (after {stepped} step(s) of this "
                        f"call), while or just after optimizer.step() ran: the weights are those after step "
                        f"{reached[0]} or " + (f"after step {reached[0] - 1}" if stepped else "as they were")
                        + " (an optimizer stopped part-way may have updated some parameters only)"
                        if reached[1] == "optimizer" else
                        (f"sortednet.fit: stopped after {stepped} optimizer step(s) of this call" if not reached[2]
                         else f"sortednet.fit: stopped after {stepped} step(s) of this call ({reached[2]} of them "
                         "skipped: non-finite losses or gradients, no update)")
                        + f": the weights are those after step {reached[0] - 1}" if stepped else "sortednet.fit: "
                        "stopped before its "
                        "first optimizer step: the weights are as they were") + (
                       f"; the scheduler may not have stepped for step {reached[0] - 1} (one behind the optimizer)"
                       if reached[1] == "scheduler" and scheduler is not None else "") + (
                       "; gradients are left in .grad" if any(p.grad is not None for p in model.parameters()) else
                       " and no gradient is left in .grad") + (
                       " (BatchNorm running statistics may also have seen forwards of the step that was stopped)"
                       if bn else "") + ("" if isinstance(e, SortedNetError) else ". To resume, reload the last "
                                         "checkpoint and pass start_step= its step (docs/training.md, Resuming)"))
        raise
    finally:  # the caller's modes come back (a model put in eval mode before fit is in eval mode after it)
        restore_modes(modes)
    return hist


def drop_stale_calibration(nest: Nest, who: str, stacklevel: int = 2) -> None:
    """Training is about to change the weights that per-sub-model BatchNorm statistics of
    :meth:`Nest.calibrate` describe: drop them, with a warning naming the modules (evaluations during training
    then read the shared statistics, as an uncalibrated nest does)."""
    calibrated = nest._calibrated()
    if calibrated:
        warnings.warn(f"{who} trains the weights that the per-sub-model BatchNorm statistics of nest.calibrate "
                      f"describe ({', '.join(repr(p) for p in calibrated[:3])}"
                      f"{', ...' if len(calibrated) > 3 else ''}): dropped them (nest.drop_calibration()); "
                      "evaluations read the shared statistics. Calibrate again after training", UserWarning,
                      stacklevel=stacklevel)
        nest.drop_calibration()


def _fit_loop(nest: Nest, loader: Any, sampler: Any, optimizer: Any, scheduler: Any, loss_fn: Any, distill: Any,
              nonfinite: str, epochs: int, total: int | None, progress: bool, device: Any, group: dict,
              ema: dict[str, float], hist: History, step: int, eval_data: Any, eval_every: int | None,
              metric: Any, reached: list[int]) -> None:
    from tqdm.auto import tqdm

    model = nest.model
    zero_grad = _zeroer(optimizer, model)
    axes: dict[int, int] = {}  # (the class axis distillation reads, by the output's dimensions)
    first = step
    stepped = False  # (an optimizer step taken: calibrated statistics dropped at the first, which a skip may delay)
    with tqdm(total=total, disable=not progress, desc="sortednet", leave=True, dynamic_ncols=True) as bar:
        for epoch in range(epochs):
            before = step
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    pair = isinstance(loader, (tuple, list)) and len(loader) == 2 and all(
                        isinstance(t, (Tensor, np.ndarray)) for t in loader)
                    raise SortedNetError("fit(): the loader must yield (inputs, target) pairs; got a "
                                         f"{type(batch).__name__}" + (f" of {len(batch)} items" if
                                                                      isinstance(batch, (tuple, list)) else "")
                                         + ("; the loader given is one (inputs, target) pair itself: a list of "
                                            "batches holds it, [(x, y)]" if pair else ""))
                x, y = _to(batch[0], device), _to(batch[1], device)
                if loss_fn is None and isinstance(y, np.ndarray):  # (a loss_fn, or the model, may take numpy)
                    raise SortedNetError(f"fit(): the targets of step {step} are a numpy array; the default loss, "
                                         "F.cross_entropy, takes a tensor of class indices: the loader must yield "
                                         "tensors (torch.as_tensor(a), or a torch.utils.data.TensorDataset of them)")
                if loss_fn is None and not isinstance(y, Tensor):
                    raise SortedNetError(f"fit(): the default loss, F.cross_entropy, takes the targets as a tensor "
                                         f"of class indices; the targets of step {step} are a {type(y).__name__} "
                                         "(torch.as_tensor(...) them, or pass loss_fn=)")
                if loss_fn is None and isinstance(y, Tensor) and (y.is_floating_point() or y.is_complex()):
                    raise SortedNetError(
                        f"fit(): the targets of step {step} are {y.dtype}, shape {tuple(y.shape)}, and the default "
                        "loss is F.cross_entropy on class indices (it would read float targets as class "
                        "probabilities: a regression would train on a meaningless loss); pass loss_fn=, e.g. "
                        "F.mse_loss for a regression, or F.cross_entropy itself for soft labels")
                if loss_fn is None and isinstance(y, Tensor) and y.dtype != torch.int64:
                    y = y.long()  # (class indices of any integer type, bool as 0 / 1: F.cross_entropy takes int64)
                if step == first and (loss_fn is None or distill is not None):
                    _check_output(nest, x, distill, y, loss_fn is None, step)

                def closure(x: Any = x, y: Any = y, step: int = step
                            ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
                    try:
                        out = call_model(model, x)  # a tensor, a tuple of arguments or a dict of keyword arguments
                    except (TypeError, AttributeError) as e:  # (x.dim(), F.linear(x, ...) on an array)
                        if not isinstance(x, np.ndarray):
                            raise
                        raise SortedNetError(f"fit(): the model raised {type(e).__name__} on the inputs of step "
                                             f"{step}, a numpy array ({e}): if it does not take the inputs as "
                                             "arrays, the loader must yield tensors (torch.as_tensor(a), or a "
                                             "torch.utils.data.TensorDataset of them)") from e
                    if loss_fn is None and not isinstance(out, Tensor):  # (the check above could not run)
                        raise SortedNetError(f"fit(): the default loss, F.cross_entropy, reads the model's output "
                                             f"as a tensor of logits; in training mode the model returns a "
                                             f"{type(out).__name__}: pass loss_fn=")
                    if loss_fn is None:
                        if step == first:  # (the check above could not run: before the backward, at least)
                            one_logit(out, step)
                        loss = _default_loss(out, y, step)
                    else:
                        loss = loss_fn(out, y)
                        if not isinstance(loss, Tensor) or loss.numel() != 1:
                            raise SortedNetError(
                                f"fit(loss_fn=...): loss_fn(output, target) must return a scalar loss tensor (the "
                                f"batch's reduced loss: a mean or a sum), got {type(loss).__name__}"
                                + (f" of shape {tuple(loss.shape)} (a loss with reduction='none'?)"
                                   if isinstance(loss, Tensor) else "") + f" at step {step}")
                    if distill is None:
                        return loss
                    if not isinstance(out, Tensor) or out.dim() < 2:  # (accumulate refuses these: logits of
                        return loss, out  # shape (..., classes))
                    if distill.axis is not None:  # (named: Distill moves it last itself)
                        return loss, out, *_ignored(out.movedim(_distill_axis(distill, out, y, False, step), -1), y)
                    if out.dim() not in axes:  # (read from the first batch's targets and kept: a later batch of
                        axes[out.dim()] = _distill_axis(distill, out, y, loss_fn is None, step)  # as many positions
                    if axes[out.dim()] % out.dim() != out.dim() - 1:  # as classes must not turn it; the default
                        out = out.movedim(axes[out.dim()], -1)  # loss's classes are on axis 1 of (B, C, L), (B, C,
                    return loss, out, *_ignored(out, y)  # H, W): distillation reads the last)

                subs = sampler.draw(step)
                if step == first:  # every step starts from no gradient, the first one too (resumed), once its
                    zero_grad()  # batch passed the checks (a refusal keeps the caller's)
                try:
                    losses = accumulate(nest, subs, closure, distill=distill, nonfinite=nonfinite,
                                        weights=sampler.loss_weights_for(subs))
                except BaseException as e:  # (nonfinite="raise", an error in the loss): the step leaves no gradient
                    zero_grad()
                    if getattr(e, "__notes__", None):  # (accumulate's advice to zero the gradients: done here)
                        e.__notes__[:] = [n for n in e.__notes__ if not n.startswith("sortednet.accumulate:")]
                    raise
                poisoned = [] if nonfinite == "ignore" else _nonfinite_grads(optimizer, model)
                if poisoned:
                    zero_grad()
                    what = (f"fit(): step {step} (sub-models {[str(nest.resolve(s)) for s in subs]}) left non-finite "
                            f"gradients in {poisoned[:3]}{' ...' if len(poisoned) > 3 else ''} while its losses were "
                            "finite (a NaN in a loss term's backward: sqrt or log at 0, an overflow under float16 "
                            "autocast)")
                    if nonfinite == "raise":
                        raise SortedNetError(what + ": the optimizer step would spread them into every shared "
                                             "weight. Stopped before it (no gradient left)")
                    warnings.warn(what + ": skipped its optimizer step (the weights are as before it, the "
                                  "BatchNorm running statistics its forwards updated are not; the step counts, as a "
                                  "step whose every sub-model was skipped)", NonFiniteLossWarning, stacklevel=4)
                if not stepped and not poisoned and any(p.grad is not None for p in _stepped(optimizer, model)):
                    drop_stale_calibration(nest, "fit", stacklevel=4)  # the weights change now: calibrated
                    stepped = True  # statistics would describe old ones (no gradient, every loss skipped: none do)
                reached[1] = "optimizer"
                if not poisoned:
                    optimizer.step()
                casts_stale()  # (inside a torch.autocast region: its casts of the old weights are dropped)
                reached[0], reached[1], reached[2] = step + 1, "scheduler", reached[2] + bool(poisoned or len(
                    losses.skipped) == len(subs))  # (no signal is handled here; [2]: steps that updated nothing)
                zero_grad()
                if scheduler is not None:
                    scheduler.step()
                reached[1] = None
                rec: dict[str, Any] = {"step": step, "losses": {str(nest.resolve(s)): v for s, v in zip(subs, losses)}}
                if losses.skipped or poisoned:
                    rec["skipped"] = [str(nest.resolve(s)) for s in (subs if poisoned else losses.skipped)]
                hist.train.append(rec)
                for s, v in zip(subs, losses):
                    if s in losses.skipped:
                        continue
                    g = group[s]
                    ema[g] = v if g not in ema else 0.9 * ema[g] + 0.1 * v
                bar.set_postfix({f"loss[{g}]": f"{ema[g]:.3f}" for g in ("S", "M", "L") if g in ema}, refresh=False)
                bar.update(1)
                step += 1
                if eval_data is not None and eval_every and step % eval_every == 0:  # resumed runs: same steps
                    _record(hist, nest, eval_data, step, bar if progress else None, metric)
            if step == before and epoch == 0 and first == 0:  # (a resumed run may have no batch left)
                raise SortedNetError("fit(): the loader yielded no batch (an empty dataset, or a DataLoader with "
                                     "drop_last=True and fewer samples than one batch): nothing would train")
            if step == before and epoch > 0:
                warnings.warn(f"fit(epochs={epochs}): the loader yielded no batch in epoch {epoch + 1} after "
                              f"{step - first} steps: it cannot be iterated again (an IterableDataset whose "
                              "__iter__ returns a used iterator); trained those steps only", RuntimeWarning,
                              stacklevel=3)
                break
    if eval_data is not None and (not hist.evals or hist.evals[-1]["step"] != step):
        _record(hist, nest, eval_data, step, None, metric)


def _zeroer(optimizer: Any, model: nn.Module) -> Callable[[], None]:
    """``optimizer.zero_grad(set_to_none=True)``; for an optimizer of one's own whose ``zero_grad`` takes no such
    argument (``def zero_grad(self)``, zeroing in place), a bare call and then no gradient on the parameters it
    steps: fit's checks read a step's gradients as the ones its backward left."""
    try:
        params = list(inspect.signature(optimizer.zero_grad).parameters.values())
    except (TypeError, ValueError):  # (a builtin without a signature: called as torch's)
        params = None
    P = inspect.Parameter
    if params is None or any(p.kind is P.VAR_KEYWORD or p.name == "set_to_none" and p.kind is not P.POSITIONAL_ONLY
                             for p in params):
        return lambda: optimizer.zero_grad(set_to_none=True)
    if params and params[0].name == "set_to_none":  # (def zero_grad(self, set_to_none=True, /))
        return lambda: optimizer.zero_grad(True)

    def bare() -> None:
        optimizer.zero_grad()
        for p in _stepped(optimizer, model):
            p.grad = None
    return bare


def _stepped(optimizer: Any, model: nn.Module) -> Iterator[Tensor]:
    """The parameters ``optimizer`` steps (its ``param_groups``; an optimizer of one's own without them: the
    model's)."""
    groups = getattr(optimizer, "param_groups", None)
    return (p for g in groups for p in g["params"]) if groups is not None else iter(model.parameters())


def _nonfinite_grads(optimizer: Any, model: nn.Module) -> list[str]:
    """Names (in ``model``) of the parameters ``optimizer`` steps whose gradient holds a NaN / inf (a sparse
    gradient's stored values): the 2-norm of each (``_foreach_norm``, one sync per device; a tenth of the time of
    ``isfinite`` per tensor on CPU), and where one is not finite, which may be an overflow of the norm alone
    (float16), an exact check of that gradient."""
    params = [p for p in _stepped(optimizer, model) if getattr(p, "grad", None) is not None]
    by_device: dict[Any, list[int]] = {}
    values = []
    for i, p in enumerate(params):
        g = p.grad
        v = g._values() if g.layout == torch.sparse_coo else g.values() if g.layout != torch.strided else g
        values.append(v)
        if v.numel():  # (an empty one holds no NaN; order inf has no value for it)
            by_device.setdefault(v.device, []).append(i)
    bad: list[int] = []
    for idx in by_device.values():
        norms = torch.stack([n.float() for n in torch._foreach_norm([values[i] for i in idx])])
        if not bool(torch.isfinite(norms).all()):
            bad += [i for i, ok in zip(idx, torch.isfinite(norms).tolist())
                    if not ok and not bool(torch.isfinite(values[i]).all())]
    if not bad:
        return []
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(params[i]), f"<parameter {tuple(params[i].shape)}>") for i in sorted(bad)]


def _same_groups(a: Any, b: Any) -> bool:
    """Whether optimizers ``a`` and ``b`` set the same learning rates: one object, or a wrapper sharing the
    other's parameter groups (Accelerate's ``AcceleratedOptimizer``, Lookahead-style wrappers)."""
    if a is b:
        return True
    ga, gb = getattr(a, "param_groups", None), getattr(b, "param_groups", None)
    if ga is None or gb is None:
        return False
    return ga is gb or (len(ga) == len(gb) > 0 and all(x is y for x, y in zip(ga, gb)))


def _required_closure(optimizer: Any) -> str:
    """The name of a closure argument ``optimizer.step`` requires (``torch.optim.LBFGS``), else ``""``."""
    import inspect

    try:
        params = inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        return ""
    return next((n for n, p in params.items() if n == "closure" and p.default is p.empty), "")


def _check_output(nest: Nest, x: Any, distill: Distill | None, y: Any = None, default_loss: bool = True,
                  step: int = 0) -> None:
    """``fit``'s default loss (and distillation) read the model's output as a tensor of logits: checked on the
    first batch before any training forward, by a training-mode forward of the smallest sub-model without
    gradients on a private view (dropout off, its own BatchNorm statistics, every other buffer put back, no
    random number drawn), so a model returning a dict or a tuple is refused before anything changes, and so is
    a distillation whose class axis the targets ``y`` do not tell (:func:`_class_axis`). A model
    that cannot run so (a forward that takes gradients itself, a module that cannot be copied) is not checked
    here: the training forward's output is checked before its backward."""
    model = nest.model
    try:
        view, _ = train_view(nest)
        with _rng_kept(next((p.device for p in model.parameters()), None)), dry_run(model), torch.no_grad(), \
                nest.use(nest.smallest):
            out = call_model(view, x)
    except Exception:
        return
    if not isinstance(out, Tensor):
        got = f"a {type(out).__name__}" + (f" (keys {list(out)[:4]})" if isinstance(out, dict) else "")
        if distill:
            raise SortedNetError(f"fit(distill=...) distills the model's output, which must be a tensor of logits, "
                                 f"but the model returns {got}: write the loop with sn.accumulate, whose closure "
                                 "returns (loss, logits) (docs/training.md)")
        raise SortedNetError(f"fit(): the default loss, F.cross_entropy, reads the model's output as a tensor of "
                             f"logits, but the model returns {got}: pass loss_fn=, e.g. lambda out, y: "
                             "F.cross_entropy(out['logits'], y)")
    if default_loss and isinstance(y, Tensor):  # (its shapes and class range, before a training forward moves a
        one_logit(out, step)                      # BatchNorm's statistics)
        _default_loss(out.float(), y.to(out.device), step)
    if distill is not None:  # (an axis the logits do not have, or cannot tell: refused before any training forward)
        _distill_axis(distill, out, y, default_loss, step)


def one_logit(out: Tensor, step: int) -> None:
    """Refuse a one-logit output (batch, 1, ...) on fit's default loss: a softmax over one class is 1, the loss 0
    whatever the weights, and nothing would train."""
    if out.dim() >= 2 and out.shape[1] == 1:
        raise SortedNetError(
            f"fit(): the output of step {step}, {tuple(out.shape)}, holds one logit per example, and the default "
            "loss, F.cross_entropy, over one class is 0 whatever the weights (nothing would train): for a binary "
            "task pass loss_fn=lambda out, y: F.binary_cross_entropy_with_logits(out.squeeze(1), y.float()) and "
            "metric=, or give the model two outputs")


def _distill_axis(distill: Distill, out: Any, y: Any, default_loss: bool, step: int) -> int:
    """The axis of ``fit``'s output ``out`` that ``distill`` takes its softmax over: ``Distill(axis=)``'s, else
    :func:`_class_axis`'s; refused where it holds a single value (a regression's (B, 1): a softmax of one value
    is 1, the KL always 0, and distillation would only scale the task loss by ``1 - alpha``)."""
    if not isinstance(out, Tensor) or out.dim() < 2:
        return -1  # (accumulate refuses these: logits of shape (..., classes))
    ax = distill.class_axis(out) if distill.axis is not None else (_class_axis(out, y, default_loss, step)
                                                                   or out.dim() - 1)
    if out.shape[ax] == 1:
        raise SortedNetError(f"fit(distill=...): the output of step {step}, {tuple(out.shape)}, holds one value on "
                             f"its class axis ({ax}): a softmax over one value is 1 and the soft term's KL always 0, "
                             f"so Distill would only scale the task loss by 1 - alpha. Distillation reads logits of "
                             f"classes: leave distill= out for a regression")
    return ax


@contextlib.contextmanager
def _rng_kept(device: Any, data: Any = None) -> Any:
    """Evaluation inside ``fit`` leaves the random state as it found it: torch's (CPU, and the model's CUDA
    device), NumPy's and Python's global generators (an evaluation loader that draws from them, as augmentation
    or a sampler may), and the generators of ``data`` when it is a DataLoader (``generator=``, its sampler's:
    one the training loader may share): a resumed run, which evaluates once more up front, draws what the
    uninterrupted one did."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    kept = np.random.get_state(), random.getstate()
    gens = [(g, g.get_state()) for g in _loader_generators(data)]
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        np.random.set_state(kept[0])
        random.setstate(kept[1])
        for g, state in gens:
            g.set_state(state)


def _loader_generators(data: Any) -> list[torch.Generator]:
    """The torch generators a DataLoader ``data`` draws from besides the global one (its own, its samplers')."""
    from torch.utils.data import DataLoader

    if not isinstance(data, DataLoader):
        return []
    found: dict[int, torch.Generator] = {}
    for obj in (data, data.sampler, data.batch_sampler, getattr(data.batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator):
            found.setdefault(id(g), g)
    return list(found.values())


def _record(hist: History, nest: Nest, data: Any, step: int, bar: Any, metric: Any = None) -> None:
    with _rng_kept(next((p.device for p in nest.model.parameters()), None), data):
        try:
            scores = evaluate(nest, data, metric=metric)
        except _NoBatches:
            raise SortedNetError(
                f"fit(eval_data=...): the evaluation at step {step} got no batches: a {type(data).__name__} that "
                "gave batches before gives none now, a stream that cannot restart (its __iter__ returns one stored "
                "iterator, used up by earlier reads); give a list or a re-iterable loader") from None
    hist.evals.append({"step": step, "scores": {str(s): v for s, v in scores.items()}})
    if bar is not None:
        vals = list(scores.values())
        bar.write(f"step {step}: score min {min(vals):.4f}  mean {sum(vals) / len(vals):.4f}  max {max(vals):.4f} "
                  f"over {len(vals)} sub-models")


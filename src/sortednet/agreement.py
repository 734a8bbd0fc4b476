"""Agreement of the ranks of a process group, for :func:`sortednet.distributed.accumulate` and for
:func:`sortednet.accumulate` through a DDP wrapper: every collective of a step is one ``all_reduce`` of a
phase, a digest and flags, so ranks at different points of a step raise instead of pairing unrelated
collectives (a hang)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .errors import SortedNetError

__all__: list[str] = []


#: where a rank is inside :func:`accumulate` when it meets the others (:func:`_sync`)
_START, _FORWARD, _LOSS, _SAVE, _GRADS = 1, 2, 3, 4, 5
_PHASES = {_START: "the start of a step", _FORWARD: "a forward", _LOSS: "the loss check after a closure",
           _SAVE: "sortednet.distributed.save", _GRADS: "the gradient averaging"}
_FLAGS = 2


def _sync(phase: int, digest: int, flags: Sequence[bool], group: Any) -> tuple[bool, list[bool]]:
    """Every collective of :func:`accumulate` is this one ``all_reduce`` (MAX) of ``[phase, -phase, digest,
    -digest, *flags]``: whether ``digest`` is the same on every rank, and each flag set on any rank. Ranks
    at different points (a closure that raised before its forward on one rank, or ran the model twice) would
    otherwise pair unrelated collectives and hang: the phase tells, and every rank raises."""
    bits = [int(f) for f in flags] + [0] * (_FLAGS - len(flags))  # one length always: gloo aborts the
    t = torch.tensor([phase, -phase, digest, -digest, *bits], dtype=torch.int64,  # process on a size mismatch
                     device=_collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    v = t.tolist()
    if v[0] != -v[1]:
        other = _PHASES.get(-v[1] if v[0] == phase else v[0])
        raise _told(f"sortednet.distributed.accumulate: the ranks reached different points of the step (this "
                    f"rank: {_PHASES[phase]}; another: {other}): a closure raised on some rank (its error is raised "
                    "there) or ran the model a different number of times"
                    + (", or the ranks ran different numbers of steps (uneven data: give every rank the same number "
                       "of batches, e.g. DistributedSampler(..., drop_last=True))" if _SAVE in (phase, -v[1], v[0])
                       else "") + "; stopping on every rank so that no collective is left waiting")
    return v[2] == -v[3], [bool(x) for x in v[4:4 + len(flags)]]


def _told(msg: str) -> SortedNetError:
    """An error every rank raises at the same collective: nothing more to tell the others (``accumulate``'s
    check after a closure lets it through without another collective)."""
    err = SortedNetError(msg)
    err._sn_ranks_told = True  # type: ignore[attr-defined]
    return err


def _loss_agreement(bad: bool, failed: bool, group: Any) -> tuple[bool, bool]:
    """After a sub-model's closure: (a non-finite loss on any rank, a failed closure on any rank). A non-finite
    loss of one rank makes every rank skip (or raise for) that sub-model, so the collectives stay matched."""
    _, (any_bad, any_failed) = _sync(_LOSS, 0, (bad, failed), group)
    return any_bad, any_failed


def _collective_device(group: Any) -> torch.device:
    """Where a small tensor for a collective of ``group`` must live (NCCL: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree_on(names: list[str], group: Any, what: str, hint: str, phase: int = _START,
              flags: Sequence[bool] = ()) -> list[bool]:
    """Raise :class:`SortedNetError` on every rank unless ``names`` is the same on every rank (one ``all_reduce``
    of a digest; the names are gathered only to say which rank differs). Returns each of ``flags`` set on any
    rank (carried by the same collective)."""
    digest = int.from_bytes(hashlib.sha1("\n".join(names).encode()).digest()[:7], "big")  # exact in int64
    same, anywhere = _sync(phase, digest, flags, group)
    if not same:  # every rank sees it and raises (collectives stay matched)
        every: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, names, group=group)
        refused = next(((r, n[-1]) for r, n in enumerate(every) if n and n[-1].startswith("refused: ")), None)
        if refused is not None:
            raise _told(f"rank {refused[0]} {refused[1]} (the other ranks stop too, so that no "
                        "collective is left waiting)")
        bad = next(r for r, other in enumerate(every) if other != every[0])
        raise _told(f"ranks disagree on {what}: rank 0 has {every[0]}, rank {bad} has {every[bad]}; {hint}")
    return anywhere

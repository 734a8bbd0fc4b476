"""Depth over nn.ModuleList / nn.Sequential: the first ``d`` blocks run.

Iteration, ``len``, slicing and integer indexing see the active blocks, as in
the exported model (``blocks[-1]`` is the last active block: a forward that
reads it behaves as the export does); ``parameters()`` / ``state_dict()``
still list all of them. Sequential's own forward iterates, so it needs
nothing more.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

from torch import nn

from ..dims import REENTRANT
from ..errors import SortedNetError
from ..views import _compiling, _grad_enabled, fx_flag, fx_refused, fx_tracing
from .base import Slicer, _pin_recomputation, _saved_tensors_hooks, slicer


def _pin_checkpoints(m: nn.Module) -> None:
    """A layer list read inside a non-reentrant activation checkpoint's forward (its saved-tensor hooks are on; with
    or without gradients), or a reentrant one's (``REENTRANT``): the recomputation during backward runs the depth
    of now, wherever backward runs (outside the forward's ``use`` block it would recompute another depth:
    ``blocks[-1]`` another block of the same shape, which PyTorch's recomputation check cannot see)."""
    if fx_flag() and fx_tracing():  # (torch.export's make_fx runs real tensors: fine)
        raise fx_refused(f"the Depth layer list {m._sn.path or '<root>'!r}, unrolled at the trace's depth,")
    if _compiling():
        return
    hooks = _saved_tensors_hooks(False)
    reentrant = REENTRANT[0] and not _grad_enabled()  # (a reentrant checkpoint's forward runs without gradients)
    if hooks is None and not reentrant:
        return
    a = m.__dict__["_sn"].active
    if a is not None:
        from ..plan import pin_checkpoints, unpinned_reentrant

        p = a._scoped  # (Active.plan() without its own pinning, done here)
        p = a.default if p is a else p
        if hooks is not None:
            _pin_recomputation(a, p, hooks)
        if reentrant and unpinned_reentrant(a):
            pin_checkpoints(a, p, sys._getframe(2))


def refuse_tree_change(path: str, action: str, depth: bool, why: str | None = None) -> None:
    """Refuse ``action`` (e.g. ``"setting 'blocks.3' to a Linear"``) on the module tree of a wrapped model:
    on the path to a sliced module, or on a Depth layer list (``depth``) at ``path`` (``why``: a reason of the
    caller's own)."""
    why = why or ((f"the Depth layer list {path or '<root>'!r} is wrapped: its depths count its blocks as wrapped, "
                   "so a block added, inserted, removed or replaced would be skipped, or would push a trained block "
                   "out of the sub-models or overwrite it") if depth else (
                   "sortednet slices the module there or modules below it; a module put in its place would run "
                   "unsliced under every sub-model"))
    raise SortedNetError(f"{action} is refused while the model is wrapped: {why}. nest.unwrap() (a deep copy of "
                         "the wrapped model: nest.unwrap_copy(copy)), change the model, then wrap it again "
                         "(activation checkpointing: nest.checkpoint; compiling: nest.compile() or "
                         "torch.compile(model), not per block)")


@slicer(nn.ModuleList, nn.Sequential)
class DepthSlicer(Slicer):
    roles = ("depth",)

    def full(self, m: nn.Module, role: str) -> int:
        return len(m._modules)

    def active(self, m: nn.Module) -> list[nn.Module]:
        mods = list(m._modules.values())
        return mods[: m.__dict__["_sn"].bind["depth"].features()]

    def namespace(self, m: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
        def __iter__(self_):
            _pin_checkpoints(self_)
            return iter(self_._sn.slicer.active(self_))

        def __len__(self_):
            _pin_checkpoints(self_)
            return self_._sn.bind["depth"].features()

        def __getitem__(self_, idx):
            _pin_checkpoints(self_)
            base = self_._sn.cls
            if not isinstance(idx, slice):
                try:
                    return base.__getitem__(self_, idx)
                except IndexError as e:  # (range(self.n_layers) under a shallower depth: said, still an
                    n = len(self_)       # IndexError for code that stops on one)
                    if n == len(self_._modules):
                        raise
                    raise DepthIndexError(f"{e}: {self_._sn.path or '<root>'!r} holds {n} of its "
                                          f"{len(self_._modules)} blocks under the depth in force; a forward "
                                          "indexing it by a layer count kept aside (range(self.n_layers)) runs "
                                          "past them: loop over the list itself, or over range(len(...))") from None
            items = list(self_._modules.items())[: len(self_)][idx]
            if issubclass(base, nn.Sequential):
                return base(OrderedDict(items))
            return base([mod for _, mod in items])

        def insert(self_, index, module):
            refuse_tree_change(self_._sn.path, f"inserting a new {type(module).__name__} at {index} of "
                               f"{self_._sn.path or '<root>'!r}", True)

        def __delitem__(self_, idx):
            refuse_tree_change(self_._sn.path, f"deleting [{idx}] of {self_._sn.path or '<root>'!r}", True)

        def __delattr__(self_, name):
            if name in self_._modules:
                refuse_tree_change(self_._sn.path, f"deleting block {name!r} of {self_._sn.path or '<root>'!r}",
                                   True)
            self_._sn.cls.__delattr__(self_, name)

        return {"__iter__": __iter__, "__len__": __len__, "__getitem__": __getitem__, "insert": insert,
                "__delitem__": __delitem__, "__delattr__": __delattr__}

    def inactive(self, m: nn.Module) -> list[nn.Module]:
        """Blocks skipped by the active depth (their parameters are not in use)."""
        return list(m._modules.values())[m._sn.bind["depth"].features():]

    def export(self, live: nn.Module, copy_: nn.Module) -> nn.Module:
        keep = list(copy_._modules.items())[: live._sn.bind["depth"].features()]
        copy_._modules.clear()
        copy_._modules.update(keep)
        return copy_

    def exported_tensors(self, m: nn.Module) -> list:
        return []

    def skipped(self, m: nn.Module) -> list[str]:
        return list(m._modules)[m._sn.bind["depth"].features():]


class DepthIndexError(SortedNetError, IndexError):
    """An index past the blocks a Depth layer list holds under a shallower depth (an IndexError still)."""

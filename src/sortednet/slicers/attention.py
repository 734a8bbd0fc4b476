"""Attention containers: only integer attributes change (``num_heads``, ...).

``Heads`` slices the q/k/v/o projections themselves (they are ``nn.Linear``
or another registered type); the container's own ``forward`` keeps running
and reads the head count through these attributes. Any module type can be a
container: nothing but the named integers (or the named object holding them,
copied with the active values) is overridden.
"""

from __future__ import annotations

import copy
import copyreg
import weakref
from typing import Any

from torch import nn

from ..errors import SortedNetError
from .base import Slicer

# module -> {attribute name: the view class of copies of the object it holds} (the object is fixed for the
# module's life: writing the attribute of a wrapped module is refused)
_VIEWS: weakref.WeakKeyDictionary[nn.Module, dict[str, type]] = weakref.WeakKeyDictionary()


def _new_plain(cls: type, *args: Any) -> Any:
    """Unpickling / copying a view: an object of the original class (``copyreg.__newobj__``, which pickle
    insists gets the pickled object's own class, would make another view)."""
    return cls.__new__(cls, *args)


def _new_plain_ex(cls: type, args: tuple, kwargs: dict) -> Any:
    return cls.__new__(cls, *args, **kwargs)


def _view_class(m: nn.Module, name: str, orig: Any, fields: frozenset[str]) -> type:
    """A subclass of ``type(orig)`` for the copies ``AttrSlicer.value`` returns: a write through a copy
    (``block.attn.cfg.temperature = 0.1``) goes to ``orig``, where later reads (new copies) see it, instead of
    being lost with the copy; a write to a head-count field is refused (the nest sets those)."""
    views = _VIEWS.setdefault(m, {})
    hit = views.get(name)
    if hit is not None:
        return hit
    base = type(orig)

    def write(self: Any, name: str, value: Any, delete: bool = False) -> None:
        if name in type(self)._sn_fields:
            raise SortedNetError(f"{name!r} of this {base.__name__} is the active sub-model's head count, set by "
                                 f"the nest (count_attrs=); {'deleting' if delete else 'writing'} it through the "
                                 "module would change every sub-model: write the original object, before wrap")
        if delete:
            delattr(orig, name)
            base.__delattr__(self, name)
        else:
            setattr(orig, name, value)
            base.__setattr__(self, name, value)

    def __reduce_ex__(self: Any, protocol: Any) -> Any:  # pickles / copies as an object of the original class
        rv = base.__reduce_ex__(self, protocol)
        if not isinstance(rv, tuple) or len(rv) < 2:
            return rv
        call, args = rv[0], rv[1]
        if call is view:  # (a class whose __reduce__ calls type(self): SimpleNamespace)
            call = base
        if isinstance(args, tuple) and args and args[0] is view:
            # (pickle insists that copyreg.__newobj__ gets the object's own class: rebuilt by our function)
            call = {copyreg.__newobj__: _new_plain, copyreg.__newobj_ex__: _new_plain_ex}.get(call, call)
            args = (base, *args[1:])
        return (call, args, *rv[2:])

    view = type(base.__name__, (base,), {
        "__slots__": (), "__module__": base.__module__, "__qualname__": base.__qualname__,
        "__setattr__": lambda self, name, value: write(self, name, value),
        "__delattr__": lambda self, name: write(self, name, None, delete=True),
        "__reduce_ex__": __reduce_ex__,
    })
    view._sn_fields = fields
    views[name] = view
    return view


class AttrSlicer(Slicer):
    """Integer attributes (``attr:num_heads``), or integer fields of an attribute object
    (``attr:config.num_attention_heads``: reads of ``m.config`` return a shallow copy with the active
    values, for forwards that read the head count from a config shared by every layer)."""

    roles = ()
    attrs = ()

    def attr_names(self, m: nn.Module, bind: dict) -> tuple[str, ...]:
        return tuple(sorted({r[5:].split(".")[0] for r in bind if r.startswith("attr:")}))

    def value(self, m: nn.Module, name: str) -> Any:  # a dotted role: a copy with the active fields
        orig = m.__dict__[name]
        obj = copy.copy(orig)
        fields = {role[len(name) + 6:]: b.features() for role, b in m.__dict__["_sn"].bind.items()
                  if role.startswith(f"attr:{name}.")}
        for field, n in fields.items():
            setattr(obj, field, n)
        view = _view_class(m, name, orig, frozenset(fields))  # writes through the copy reach the original
        try:
            object.__setattr__(obj, "__class__", view)
        except TypeError:  # (a builtin class such as SimpleNamespace: a fresh instance of the view)
            if not hasattr(obj, "__dict__"):
                raise SortedNetError(f"{name!r} of {m.__dict__['_sn'].path or '<root>'!r} holds the head count "
                                     f"(count_attrs=) in a {type(orig).__name__}, which cannot be viewed per "
                                     "sub-model; keep the count in a plain object") from None
            state = obj.__dict__
            obj = view.__new__(view)
            obj.__dict__.update(state)
        return obj


ATTRS_ONLY = AttrSlicer()

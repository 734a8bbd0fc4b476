"""save / load: one safetensors file holds the weights of every sub-model
(they share them) plus the nest's description as JSON metadata."""

from __future__ import annotations

import json
import os
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from .dims import dimension_from_spec
from .errors import SortedNetError

__all__ = ["save", "load", "FORMAT", "EXTRA_PREFIX"]

FORMAT = "sortednet/1"
#: tensors stored beside the weights (e.g. calibrated BatchNorm statistics) live under this key prefix
EXTRA_PREFIX = "_sortednet/"


class _WithExtra:
    """Stands in for the model in ``save_model``: its state_dict plus the nest's extra tensors."""

    def __init__(self, model: nn.Module, extra: dict) -> None:
        self.model, self.extra = model, extra

    def state_dict(self) -> dict:
        return {**self.model.state_dict(), **self.extra}


def save(nest: "Nest", path: str | os.PathLike) -> None:  # noqa: F821
    """Write ``nest`` (weights + dimensions + sub-model list) to ``path`` (.safetensors).

    >>> import tempfile, os, torch.nn as nn, sortednet as sn
    >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [4, 8], out="0", inp="1"))
    >>> path = os.path.join(tempfile.mkdtemp(), "nest.safetensors")
    >>> sn.save(nest, path)
    >>> sn.load(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), path).submodels == nest.submodels
    True
    """
    meta: dict[str, Any] = {
        "format": FORMAT,
        "dims": [d.spec() for d in nest.dims],
        "submodels": [str(s) for s in nest.submodels],
        "extra": nest._extra_state(),
    }
    extra = nest._extra_tensors()
    target = _WithExtra(nest.model, extra) if extra else nest.model
    save_model(target, os.fspath(path), metadata={"sortednet": json.dumps(meta)})


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The nest description stored in a file written by :func:`save`."""
    try:
        with safe_open(os.fspath(path), "pt") as f:
            raw = (f.metadata() or {}).get("sortednet")
    except (OSError, Exception) as e:  # safetensors raises its own error types
        raise SortedNetError(f"cannot read sortednet checkpoint {os.fspath(path)!r}: {e}") from None
    if raw is None:
        raise SortedNetError(f"{os.fspath(path)!r} is a safetensors file without sortednet metadata")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise SortedNetError(f"{os.fspath(path)!r} has format {meta.get('format')!r}; this version reads {FORMAT!r}")
    return meta


def load(model: "nn.Module | Nest", path: str | os.PathLike, *, strict: bool = True) -> "Nest":  # noqa: F821
    """Wrap ``model`` (a fresh instance of the saved architecture) as saved and
    load the weights; or, given a Nest with the same dimensions, load into it."""
    from .nest import Nest
    from .wrap import wrap

    meta = read_metadata(path)
    if isinstance(model, Nest):
        nest = model
        saved = [d["name"] for d in meta["dims"]]
        if [d.spec() for d in nest.dims] != meta["dims"]:
            diff = [(s, d.spec()) for s, d in zip(meta["dims"], nest.dims) if s != d.spec()][:1]
            raise SortedNetError(f"checkpoint {os.fspath(path)!r} dimensions {saved} differ from the nest's "
                                 f"{[d.name for d in nest.dims]}" + (f": saved {diff[0][0]} vs {diff[0][1]}"
                                                                    if diff else ""))
    elif isinstance(model, nn.Module):
        dims = [dimension_from_spec(s) for s in meta["dims"]]
        nest = wrap(model, *dims, submodels=meta["submodels"])
    else:
        raise SortedNetError(f"load() needs an nn.Module or a Nest, got {type(model).__name__}")
    try:
        missing, unexpected = load_model(nest.model, os.fspath(path), strict=False)
        with safe_open(os.fspath(path), "pt") as f:
            extra = {k: f.get_tensor(k) for k in f.keys() if k.startswith(EXTRA_PREFIX)}
    except Exception as e:
        raise SortedNetError(f"cannot load {os.fspath(path)!r} into {type(nest.model).__name__}: {e}") from None
    unexpected = [k for k in unexpected if not k.startswith(EXTRA_PREFIX)]
    if strict and (missing or unexpected):
        raise SortedNetError(f"checkpoint {os.fspath(path)!r} does not fit the model: missing keys "
                             f"{sorted(missing)[:8]}, unexpected keys {sorted(unexpected)[:8]}")
    nest._load_extra_state(meta.get("extra") or {})
    nest._load_extra_tensors(extra)
    return nest

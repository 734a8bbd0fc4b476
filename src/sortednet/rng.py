"""Random generator state for exact resumption of training.

Dropout, data shuffling and augmentation draw from global generators: torch's
(CPU and each CUDA device), NumPy's and Python's ``random``. The sampler needs
none of them (its draws are a pure function of ``(seed, step)``), but a run
resumed without them draws other dropout masks than the uninterrupted run.
:func:`rng_state` captures all of them in a form ``torch.save`` /
``torch.load(weights_only=True)`` round-trip; :func:`set_rng_state` restores it.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .errors import SortedNetError

__all__ = ["rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """The state of every global random generator (tensors, lists and numbers only).

    >>> import random, torch
    >>> from sortednet.rng import rng_state, set_rng_state
    >>> state = rng_state()
    >>> a = (torch.rand(2), random.random())
    >>> set_rng_state(state)
    >>> b = (torch.rand(2), random.random())
    >>> torch.equal(a[0], b[0]) and a[1] == b[1]
    True
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the CUDA part only where CUDA is available).

    All or nothing: every part is checked (by setting it on a scratch generator) before a
    global generator changes."""
    try:
        t = state["torch"]
        torch.Generator().set_state(t)
        n = state["numpy"]
        np_state = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        np.random.RandomState().set_state(np_state)
        p = state["python"]
        py_state = (p["version"], tuple(p["internal"]), p["gauss_next"])
        random.Random().setstate(py_state)
        cuda = state.get("cuda") if torch.cuda.is_available() else None
        if cuda is not None and not (isinstance(cuda, (list, tuple)) and len(cuda) == torch.cuda.device_count()
                                     and all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda)):
            raise ValueError(f"the cuda part must hold one uint8 state per device ({torch.cuda.device_count()})")
    except Exception as e:  # noqa: BLE001  (any malformed part: nothing was set yet)
        raise SortedNetError(f"not a random generator state from sortednet.rng.rng_state(): {e!r}") from None
    torch.set_rng_state(t)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)

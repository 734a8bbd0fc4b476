"""sortednet: many nested sub-models in one PyTorch model (SortedNet and family).

>>> import torch, torch.nn as nn, sortednet as sn
>>> model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
>>> nest = sn.wrap(model, sn.Width("hidden", [16, 32, 64], out="0", inp="2"))
>>> len(nest.submodels), nest.pick(params=300)
(3, SubModel(hidden=16))
"""

from . import _requires  # noqa: F401  (first: refuses a torch older than the one tested, by name)
from . import nest as _nest
from .dims import Depth, Dimension, Width
from .discovery import by_ratio, discover
from .errors import BudgetError, PatternError, SizeError, SortedNetError
from .heads import Heads
from .importance import sort_units
from .io import load, save
from .nest import Nest, wrap
from .profile import Profile
from .rank import Rank
from .sampler import Sampler
from .slicers import Slicer, slicer, slicer_for
from .speculative import speculative_generate
from .submodel import SubModel
from .train import Distill, accumulate, fit

__version__ = "0.1.0"

_LAZY = {"from_transformers", "sort_by_importance"}  # need transformers: imported on first use


def _load_integrations() -> None:
    """Import ``sortednet.integrations`` (its export hook for transformers models), if transformers is there."""
    try:
        from . import integrations  # noqa: F401
    except ImportError:
        pass


_nest.EXPORT_HOOK_LOADERS.append(_load_integrations)


def __getattr__(name: str):
    if name in _LAZY:
        from . import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module 'sortednet' has no attribute {name!r}")


__all__ = [
    "wrap", "Nest", "SubModel", "Dimension", "Width", "Heads", "Depth", "Rank",
    "save", "load", "SortedNetError", "PatternError", "SizeError", "BudgetError", "Slicer", "slicer", "slicer_for",
    "Sampler", "accumulate", "fit", "Distill", "Profile",
    "from_transformers", "sort_by_importance", "sort_units", "discover", "by_ratio", "speculative_generate",
]

"""Integrations with other libraries (optional extras).

``sortednet.integrations`` needs Hugging Face ``transformers`` (``pip install
sortednet[transformers]``); importing it registers the slicer for GPT-2's
``Conv1D`` and the export hook that gives exported ``PreTrainedModel``\\ s a
matching config. ``import sortednet`` alone never imports transformers.

>>> import sortednet.integrations as sni
>>> [layout.family for layout in sni.LAYOUTS][:3]
['llama', 'qwen2_moe', 'mixtral']
"""

from __future__ import annotations


def _register_slicers() -> None:
    """Register slicers for transformers' own layer types (idempotent)."""
    from ..slicers import hf_conv1d  # noqa: F401  (registers itself on import)


_register_slicers()

from .importance import sort_by_importance  # noqa: E402
from .layouts import Layout, register_layout, unregister_layout  # noqa: E402
from .soft import SoftOutput, soft_loss  # noqa: E402
from .trainer import SortedTrainer, SubModelCallback  # noqa: E402
from .transformers import LAYOUTS, detect, export_pretrained, from_transformers  # noqa: E402

__all__ = ["from_transformers", "export_pretrained", "detect", "LAYOUTS", "Layout", "register_layout",
           "unregister_layout", "soft_loss", "SoftOutput", "sort_by_importance", "SortedTrainer", "SubModelCallback"]

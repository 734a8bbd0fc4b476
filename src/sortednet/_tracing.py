"""Whether this thread traces the code that runs: sortednet's eager-only checks step aside there.

``torch.compiler.is_compiling()`` reads one process-wide flag, which Dynamo holds True for the whole of any
thread's compile: read in another thread's eager forward meanwhile (a serving thread compiling a budget nobody
warmed up), it switched that forward's checks off (a key/value cache filled by another sub-model, an in-place
write into calibrated statistics, the forward's pin). Dynamo folds ``is_dynamo_compiling()`` to True where it
traces (and real execution gives False); AOTAutograd, which runs autograd Functions' Python while it traces their
backward, and the other tracers that set the flag do it with a tracing context of their own thread.
"""

from __future__ import annotations

import torch

_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_any_compiling = torch.compiler.is_compiling


def compiling() -> bool:
    """Whether this thread's code is being traced (by Dynamo, or by a tracer of this thread that sets the flag)."""
    if _dynamo_compiling():
        return True
    if not _any_compiling():
        return False
    from torch._guards import TracingContext

    return TracingContext.try_get() is not None

"""The torch releases sortednet runs on: imported first by the package, it refuses an older torch by name."""

import re

import torch

#: the oldest torch release the test suite passes on (CI runs it on 2.11, 2.13 and 2.14). sortednet reads torch
#: internals (activation checkpointing's frames, torch.fx's tracing flag, FSDP2's unsharded parameters) that older
#: releases lay out otherwise: on 2.10 sn.fit inside one autocast region drifted from the same steps in regions of
#: their own (and two compile cases of the suite fail); on 2.8 FSDP2 training also gave other results than one
#: process, in silence; on 2.6 it does not import. Refused here rather than half working.
MIN_TORCH = (2, 11)


def supported(version: str) -> bool:
    """Whether torch ``version`` (``torch.__version__``) is one sortednet runs on.

    >>> supported("2.13.0+cpu"), supported("2.11.0"), supported("3.0"), supported("2.10.0"), supported("2.8.0")
    (True, True, True, False, False)
    """
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and (int(found[1]), int(found[2])) >= MIN_TORCH


if not supported(torch.__version__):
    raise ImportError(f"sortednet needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}; this is torch {torch.__version__}. "
                      "It reads internals of torch.utils.checkpoint, torch.fx and FSDP2 that older releases lay out "
                      "otherwise (on torch 2.10 its autocast training path, on 2.8 its FSDP2 one too, gave wrong "
                      f"results in silence). Upgrade: pip install 'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}'")

"""Shared test setup: tests/ on the import path, one small hypothesis profile (derandomized: every machine and
every run tries the same inputs, so CI's verdict does not depend on the draw), one torch thread (the CI machine
has two cores shared by many jobs)."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# inductor's on-disk caches live, by default, in one directory per user that every torch install and CPU setting
# of the machine shares: on a machine whose cache held a graph stored under another setting, a cache hit ran a plain
# (unwrapped) MLP's compiled forward to wrong outputs (off by 0.9; with ATEN_CPU_CAPABILITY=avx2 on an AVX-512
# machine, torch 2.13). The suite keeps its own directory per torch version and CPU capability (a user's own
# TORCHINDUCTOR_CACHE_DIR wins).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"sortednet-tests-inductor-{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}"))

settings.register_profile("sortednet", max_examples=10, deadline=None, database=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# benchmarks/device_check.sh: the same draws, fewer of them (a GPU run launches many tiny kernels per example)
settings.register_profile("device", parent=settings.get_profile("sortednet"), max_examples=4)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sortednet"))
torch.set_num_threads(1)
if os.environ.get("SORTEDNET_TEST_DEVICE", "cpu").startswith("cuda"):
    # the families' models on a GPU (tests/models.py): fp32 comparisons need fp32 kernels (no TF32) and the
    # same cuDNN algorithm for the same shapes
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


@pytest.fixture
def fresh_dynamo():
    """A clean torch.compile state per test (graph counts start at zero), with room for many sub-models."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch._dynamo.reset()

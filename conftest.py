"""Test setup. TRITON_INTERPRET must be set before any @triton.jit decorates a kernel, hence before importing
rklu_fast: with no GPU the Triton kernels run in the interpreter on the CPU (the very same kernel source)."""
import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not _has_cuda, reason="needs a CUDA GPU; this machine has none "
                                   "(run benchmarks/gpu_suite.sh on a GPU machine)")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision included): a test that builds an Accelerator with
    another precision than an earlier test's would fail with "AcceleratorState has already been initialized"."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)

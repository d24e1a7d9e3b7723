"""Denormal floats flushed to zero while hypermeta trains on the CPU.

Late in a run some numbers fall below float32's normal range (about 1e-38): Adam's second moments
once the gradients are tiny, weights under a strong weight decay, forward-mode tangents. x86 CPUs
compute on such numbers many times slower, and a run slows as more of them appear: in 180 s the
MNIST-1D CNN at its defaults took 41,700 steps without hypergradients and 27,160 with them before
they were flushed, 70,800 and 67,200 after (``benchmarks/long_run.py``, docs/estimators.md).
Flushing them changes only numbers below 1e-38 (float32) or 1e-308 (float64).

The flag is per thread; :func:`flushing_denormals` sets it for the thread it runs in and puts back
what that thread had. The worker thread of a user's own loop sets it itself (``Handoff``).
PyTorch's intra-op threads (``torch.set_num_threads`` above 1) keep their own setting, so with
several threads large operations are flushed only in part; hypermeta's CLI trains on one thread
unless told otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def flushing() -> bool:
    """Whether this thread flushes denormals (a denormal float64 then reads back as 0)."""
    return torch.tensor([1e-323], dtype=torch.float64).mul(1.0).item() == 0.0


@contextlib.contextmanager
def flushing_denormals() -> Iterator[None]:
    before = flushing()
    torch.set_flush_denormal(True)  # False, and no effect, on a CPU without the instructions
    try:
        yield
    finally:
        torch.set_flush_denormal(before)

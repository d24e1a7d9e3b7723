"""Train/eval modes and buffers (BatchNorm running statistics) of the model being trained.

Training steps run in train mode: Dropout on, BatchNorm normalising by the batch and updating its
running statistics. The validation loss of a hyper-step runs in *validation mode*: Dropout off,
BatchNorm still normalising by the (large) validation batch's own statistics, which -- unlike
the running statistics -- are a differentiable function of the weights and so of the
hyperparameters; the running statistics are left as they were, so validation data never leaks
into them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return [buffer for _, buffer in sorted(_named_buffers(module).items())]


def copy_buffers(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Every tensor buffer of ``target`` set in place to the value of ``source``'s of the same name."""
    values = _named_buffers(source)
    with torch.no_grad():
        for name, buffer in _named_buffers(target).items():
            buffer.copy_(values[name])


def batch_norms(module: torch.nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def fresh_buffers(modules: list[torch.nn.Module]) -> None:
    """Give ``modules`` copies of their buffers, to be updated in place by the next forward.

    In train mode BatchNorm updates its running statistics in place, and autograd keeps them as
    inputs of the step's graph: an unroll over several steps must not modify the tensors an
    earlier step's graph holds.
    """
    for module in modules:
        for key, value in module._buffers.items():
            if value is not None:
                module._buffers[key] = value.clone()


@contextlib.contextmanager
def validation_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in validation mode (see above) inside the block, as it was afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    norms = batch_norms(module)
    saved = [dict(m._buffers) for m in norms]
    fresh_buffers(norms)
    module.eval()
    for batch_norm in norms:
        batch_norm.train()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for batch_norm, values in zip(norms, saved, strict=True):
            batch_norm._buffers.update(values)


def _named_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # higher's patched modules keep their own copies of the buffers under the same names
    return {name: buffer for name, buffer in module.named_buffers() if torch.is_tensor(buffer)}

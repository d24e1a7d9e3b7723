"""A plain ``torch.optim`` training step with the hyperparameters' current values."""

from __future__ import annotations

import torch

from hypermeta._hyperparameters import HyperParameters
from hypermeta._private.modes import buffers
from hypermeta._private.window import Window, nothing


@torch.no_grad()
def set_values(optimizer: torch.optim.Optimizer, hyper: HyperParameters, step: int) -> None:
    """Write the hyperparameters' values for ``step`` into the optimizer's groups."""
    lrs, weight_decays = hyper.group_floats(step)
    for index, (group, lr) in enumerate(zip(optimizer.param_groups, lrs, strict=True)):
        group["lr"] = lr
        if weight_decays is not None:
            group["weight_decay"] = weight_decays[index]


def plain_step(model, optimizer, hyper, loss_fn, batch, step: int) -> torch.Tensor:
    """One ordinary training step at the values for ``step``; returns the detached mini-batch loss."""
    set_values(optimizer, hyper, step)
    return train_step(model, optimizer, loss_fn, batch)


def train_step(model, optimizer, loss_fn, batch) -> torch.Tensor:
    """One ordinary training step at the values already in the optimizer's groups."""
    x, y = batch
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """A copy of the optimizer's per-parameter state (cheaper than deep-copying its state_dict)."""
    return {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in optimizer.state.items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    optimizer.state.clear()
    optimizer.state.update(state)


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Copies of the weights, buffers (BatchNorm running statistics) and optimizer state, for :func:`restore`."""
    tensors = [p.detach().clone() for p in model.parameters()] + [b.clone() for b in buffers(model)]
    return tensors, optimizer_state(optimizer)


@torch.no_grad()
def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved) -> None:
    tensors, state = saved
    for target, value in zip([*model.parameters(), *buffers(model)], tensors, strict=True):
        target.copy_(value)
    load_optimizer_state(optimizer, state)


def trained_in_place(model, optimizer, saved, train_losses, *, valid_loss=None, hypergradients=None) -> Window:
    """The window of plain steps already taken on ``model``: nothing to commit, undone from ``saved``."""
    return Window(
        train_loss=torch.stack(train_losses).mean(), valid_loss=valid_loss, hypergradients=hypergradients,
        commit=nothing, rollback=lambda: restore(model, optimizer, saved),
    )

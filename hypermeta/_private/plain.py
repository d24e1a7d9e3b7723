"""A plain ``torch.optim`` training step with the hyperparameters' current values."""

from __future__ import annotations

import torch

from hypermeta._hyperparameters import HyperParameters


@torch.no_grad()
def set_values(optimizer: torch.optim.Optimizer, hyper: HyperParameters, step: int) -> None:
    """Write the hyperparameters' values for ``step`` into the optimizer's groups."""
    weight_decays = hyper.weight_decays()
    for index, (group, lr) in enumerate(zip(optimizer.param_groups, hyper.lrs(step), strict=True)):
        group["lr"] = float(lr)
        if weight_decays is not None:
            group["weight_decay"] = float(weight_decays[index])


def plain_step(model, optimizer, hyper, loss_fn, batch, step: int) -> torch.Tensor:
    """One ordinary training step; returns the detached mini-batch loss."""
    set_values(optimizer, hyper, step)
    x, y = batch
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Copies of the weights and optimizer state, for :func:`restore`."""
    weights = [p.detach().clone() for p in model.parameters()]
    state = {
        p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for p, s in optimizer.state.items()
    }
    return weights, state


@torch.no_grad()
def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved) -> None:
    weights, state = saved
    for param, weight in zip(model.parameters(), weights, strict=True):
        param.copy_(weight)
    optimizer.state.clear()
    optimizer.state.update(state)

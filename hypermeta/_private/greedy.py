"""First-order ("greedy") hypergradients in the manner of Baydin et al. 2018.

Training runs as plain ``torch.optim`` steps. Each step adds the derivative of the update with
respect to its learning rate and weight decay -- optimizer state held fixed, so no second-order
terms -- to a running direction. At the end of a window of K steps the validation gradient is
dotted with those directions. With K = 1 this is exactly d(valid loss after the step)/d(value).
Its cost over plain training is a copy of the weights per step and one validation gradient per
window.
"""

from __future__ import annotations

import torch

from hypermeta._private.plain import plain_step, restore, snapshot
from hypermeta._private.window import Window, nothing


def greedy_window(run, start: int, n_steps: int) -> Window:
    model, optimizer, hyper = run.model, run.optimizer, run.hyper
    saved = snapshot(model, optimizer)
    lr_directions = [[None] * hyper.log_lr.shape[1] for _ in range(hyper.log_lr.shape[0])]
    wd_directions = None if hyper.log_weight_decay is None else [None] * len(hyper.log_weight_decay)
    train_losses = []
    for step in range(start, start + n_steps):
        before = [p.detach().clone() for p in model.parameters()]
        had_state = {p: bool(optimizer.state.get(p)) for p in model.parameters()}
        train_losses.append(plain_step(model, optimizer, hyper, run.loss_fn, run.train_batches.next(), step))
        segment = hyper.segment(step)
        per_group_lr = hyper.log_lr.shape[1] > 1
        per_group_wd = wd_directions is not None and len(wd_directions) > 1
        weights = dict(zip(model.parameters(), before, strict=True))
        for group_index, group in enumerate(optimizer.param_groups):
            lr_slot = group_index if per_group_lr else 0
            for p in group["params"]:
                d_lr = (p.detach() - weights[p]) / group["lr"]
                _accumulate(lr_directions[segment], lr_slot, p, d_lr)
                if wd_directions is not None:
                    d_wd = _d_update_d_weight_decay(optimizer, group, p, weights[p], had_state[p])
                    _accumulate(wd_directions, group_index if per_group_wd else 0, p, d_wd)
    valid_loss, valid_grads = _valid_gradient(run)
    grads = [_contract(lr_directions, valid_grads, hyper.log_lr)]
    if wd_directions is not None:
        grads.append(_contract([wd_directions], valid_grads, hyper.log_weight_decay[None])[0])
    return Window(
        train_loss=torch.stack(train_losses).mean(),
        valid_loss=valid_loss,
        hypergradients=grads,
        commit=nothing,
        rollback=lambda: restore(model, optimizer, saved),
    )


def _accumulate(slots: list, slot: int, param: torch.Tensor, direction: torch.Tensor) -> None:
    if slots[slot] is None:
        slots[slot] = {}
    held = slots[slot].get(param)
    slots[slot][param] = direction if held is None else held + direction


def _valid_gradient(run) -> tuple[torch.Tensor, dict[torch.Tensor, torch.Tensor]]:
    params = list(run.model.parameters())
    x, y = run.valid_batches.next()
    loss = run.loss_fn(run.model(x), y)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), dict(zip(params, grads, strict=True))


def _contract(directions: list[list], valid_grads: dict, log_values: torch.Tensor) -> torch.Tensor:
    """d(valid loss)/d(log value) = value * <valid gradient, d weights / d value>."""
    out = torch.zeros_like(log_values)
    for row, slots in enumerate(directions):
        for col, per_param in enumerate(slots):
            if per_param:
                dot = sum((valid_grads[p] * d).sum() for p, d in per_param.items())
                out[row, col] = dot
    return out * log_values.detach().exp()


def _d_update_d_weight_decay(optimizer, group, p, weight_before, had_state: bool) -> torch.Tensor:
    """d(new weight)/d(weight decay) for one step with the optimizer state before it fixed."""
    lr, wd = group["lr"], group["weight_decay"]
    state = optimizer.state[p]
    if isinstance(optimizer, torch.optim.SGD):
        momentum = group["momentum"]
        if momentum == 0:
            return -lr * weight_before
        d_buffer = weight_before if not had_state else (1 - group["dampening"]) * weight_before
        d_direction = weight_before + momentum * d_buffer if group["nesterov"] else d_buffer
        return -lr * d_direction
    beta1, beta2 = group["betas"]
    step = float(state["step"])
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    gradient = p.grad + wd * weight_before
    bias1, bias2_sqrt = 1 - beta1**step, (1 - beta2**step) ** 0.5
    root = exp_avg_sq.sqrt()
    denom = root / bias2_sqrt + group["eps"]
    d_exp_avg = (1 - beta1) * weight_before
    d_root = torch.where(root > 0, (1 - beta2) * gradient * weight_before / root.clamp_min(1e-30), 0)
    d_denom = d_root / bias2_sqrt
    return -lr / bias1 * (d_exp_avg / denom - exp_avg * d_denom / denom**2)

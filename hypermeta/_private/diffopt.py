"""Differentiable SGD and Adam for ``higher`` whose arithmetic is exactly ``torch.optim``'s.

``higher``'s own versions differ from ``torch.optim`` (Adam adds ``eps`` before the bias
correction) and its Adam yields NaN second-order gradients through ``sqrt`` at 0 (higher#125).
Ours reproduce ``torch.optim.SGD`` / ``torch.optim.Adam`` step for step, so that an unrolled run
whose values do not move is the plain run, and take the square root safely.
"""

from __future__ import annotations

import math

import higher
import torch

SUPPORTED = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam"}


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt`` whose gradient at 0 is 0 instead of ``inf`` (the NaN of higher#125)."""
    positive = x > 0
    tiny = torch.finfo(x.dtype).tiny
    return torch.where(positive, torch.where(positive, x, tiny).sqrt(), torch.zeros_like(x))


class DifferentiableSGD(higher.optim.DifferentiableOptimizer):
    def _update(self, grouped_grads, **kwargs) -> None:
        for group_index, (group, grads) in enumerate(zip(self.param_groups, grouped_grads, strict=True)):
            momentum = group["momentum"]
            for index, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
                if g is None:
                    continue
                if _is_set(group["weight_decay"]):
                    g = g + group["weight_decay"] * p
                if momentum != 0:
                    state = self.state[group_index][index]
                    buf = state.get("momentum_buffer")
                    buf = g if buf is None else torch.add(buf * momentum, g, alpha=1 - group["dampening"])
                    state["momentum_buffer"] = buf
                    g = g + momentum * buf if group["nesterov"] else buf
                group["params"][index] = p - group["lr"] * g


class DifferentiableAdam(higher.optim.DifferentiableOptimizer):
    def _update(self, grouped_grads, **kwargs) -> None:
        for group_index, (group, grads) in enumerate(zip(self.param_groups, grouped_grads, strict=True)):
            beta1, beta2 = group["betas"]
            for index, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
                if g is None:
                    continue
                state = self.state[group_index][index]
                if not state:
                    state.update(step=0.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                step = float(state["step"]) + 1
                state["step"] = step
                if _is_set(group["weight_decay"]):
                    g = g + group["weight_decay"] * p
                exp_avg = torch.lerp(state["exp_avg"], g, 1 - beta1)
                exp_avg_sq = torch.addcmul(state["exp_avg_sq"] * beta2, g, g, value=1 - beta2)
                state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
                step_size = group["lr"] / (1 - beta1**step)
                denom = safe_sqrt(exp_avg_sq) / math.sqrt(1 - beta2**step) + group["eps"]
                group["params"][index] = p - step_size * (exp_avg / denom)


_DIFFERENTIABLE = {torch.optim.SGD: DifferentiableSGD, torch.optim.Adam: DifferentiableAdam}


def _is_set(value) -> bool:
    return torch.is_tensor(value) or value != 0


def check_supported(optimizer: torch.optim.Optimizer) -> None:
    if type(optimizer) not in _DIFFERENTIABLE:
        names = ", ".join(f"torch.optim.{cls.__name__}" for cls in _DIFFERENTIABLE)
        raise ValueError(f"inner optimizer {type(optimizer).__name__} is not supported; use {names}")
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("amsgrad and maximize are not supported in the inner optimizer")


def differentiable(optimizer: torch.optim.Optimizer, fmodel, model: torch.nn.Module, override):
    """A ``higher`` differentiable optimizer carrying ``optimizer``'s state and settings."""
    cls = _DIFFERENTIABLE[type(optimizer)]
    return cls(optimizer, model.parameters(), fmodel=fmodel, override=override)


@torch.no_grad()
def write_back(diffopt, optimizer: torch.optim.Optimizer, model: torch.nn.Module, fast_params) -> None:
    """Commit an unroll: fast weights into ``model``, the optimizer state into ``optimizer``.

    The state is detached and stored the way ``torch.optim`` keeps it, so the next plain or
    unrolled step continues exactly where this one ended.
    """
    for param, fast in zip(model.parameters(), fast_params, strict=True):
        param.copy_(fast)
    for group, states in zip(optimizer.param_groups, diffopt.state, strict=True):
        for index, param in enumerate(group["params"]):
            if states.get(index):
                optimizer.state[param] = {
                    key: torch.tensor(float(value)) if key == "step" else value.detach().clone()
                    for key, value in states[index].items()
                }

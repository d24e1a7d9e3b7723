"""First-order hypergradients carried over the run (forward mode, no second derivatives).

Training runs as plain ``torch.optim`` steps, so a run whose values do not move is the plain run.
Each window forms the tangent of the weights with respect to each log value, the training loss's
Hessian dropped:

* a learning rate: the window's own displacement of the weights it trains. Each step moves a
  weight by ``-lr * update``; with the Hessian dropped the update does not depend on the rate,
  so d(weight)/d(log lr) over the window is exactly the weight's displacement;
* a weight decay: the window's steps times the derivative of its last update with respect to
  the log decay, the optimizer state before that step held fixed (the greedy derivative of
  Baydin et al. 2018, through SGD's momentum, dampening and Nesterov and Adam's moments).

The tangents are carried from window to window: before a window's tangent is added, the carried
one is multiplied by ``(start / end) ** 2``, so at step ``t`` a step taken at ``s`` weighs
``(s / t) ** 2``. A hypergradient thus looks back over a horizon that grows with the run (a
third of it on average) instead of the window alone, which a window-long look-ahead biases
towards rates that are too small (Wu et al. 2018). A learning-rate schedule segment starts its
tangent at zero. The validation gradient at a window's end, contracted with the carried
tangents, gives the hypergradients: with K = 1 and nothing carried they are exact.
"""

from __future__ import annotations

import itertools

import torch

from hypermeta._private.greedy import d_update_d_weight_decay
from hypermeta._private.modes import validation_mode
from hypermeta._private.plain import restore, set_values, snapshot
from hypermeta._private.window import Window, nothing


def first_order_window(run, start: int, n_steps: int) -> Window:
    """Train ``n_steps`` plain steps; the window's hypergradients with the run's carried tangents (``run.carried``)."""
    model, optimizer, hyper = run.model, run.optimizer, run.hyper
    saved, carried = snapshot(model, optimizer), run.carried
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def rollback() -> None:
        restore(model, optimizer, saved)
        run.carried = carried

    try:
        train_losses, displacements, decay = _train(run, params, start, n_steps)
        run.carried = _carry(carried, displacements, decay, keep=(start / (start + n_steps)) ** 2)
        valid_loss, gradient = _valid_gradient(run, params)
    except BaseException:  # a window cut short (a loop of the user's own stopped mid-window) leaves no trace
        rollback()
        raise
    rows = [run.carried.lr if segment == run.carried.segment else displacements[segment]
            for segment in sorted(displacements)]
    if decay is not None:
        rows.append(run.carried.weight_decay)
    sums = torch.stack([torch.stack(rows)[:, c] @ gradient[c] for c in _group_columns(optimizer)], dim=1)
    wd_row = len(displacements) if decay is not None else None
    return Window(
        train_loss=torch.stack(train_losses).mean(), valid_loss=valid_loss,
        hypergradients=hypergradients(hyper, sums, min(displacements), len(displacements), wd_row),
        commit=nothing, rollback=rollback,
    )


def _train(run, params, start: int, n_steps: int):
    """The window's plain steps: their losses, each segment's displacement and the weight decay's tangent."""
    model, optimizer, hyper = run.model, run.optimizer, run.hyper
    weights, displacements, train_losses, decay = _flat(params), {}, [], None
    for step in range(start, start + n_steps):
        segment = hyper.segment(step)
        if step == start or segment != hyper.segment(step - 1):
            set_values(optimizer, hyper, step)
            segment_start = weights
        x, y = run.train_batches.next()
        optimizer.zero_grad(set_to_none=True)
        loss = run.loss_fn(model(x), y)
        loss.backward()
        train_losses.append(loss.detach())
        last = step == start + n_steps - 1
        if last and hyper.log_weight_decay is not None:
            before = [p.detach().clone() for p in params]
            had_state = [bool(optimizer.state.get(p)) for p in params]
        optimizer.step()
        if last or segment != hyper.segment(step + 1):
            weights = _flat(params)
            displacements[segment] = weights - segment_start
        if last and hyper.log_weight_decay is not None:
            decay = n_steps * _decay_tangent(optimizer, before, had_state)
    return train_losses, displacements, decay


class Carried:
    """The tangents carried into the next window: of the learning rates of ``segment`` and of the weight decays."""

    def __init__(self, segment: int, lr: torch.Tensor, weight_decay: torch.Tensor | None) -> None:
        self.segment, self.lr, self.weight_decay = segment, lr, weight_decay


def _carry(carried: Carried | None, displacements: dict, decay, *, keep: float) -> Carried:
    """The window's tangents added to the carried ones, decayed by ``keep``."""
    segment = max(displacements)
    lr = displacements[segment]
    if carried is not None and carried.segment == segment:
        lr = carried.lr * keep + lr
    weight_decay = decay
    if decay is not None and carried is not None and carried.weight_decay is not None:
        weight_decay = carried.weight_decay * keep + decay
    # a window that spans segments carries the earlier one's tangent only into its own rows
    if carried is not None and carried.segment != segment and carried.segment in displacements:
        displacements[carried.segment] = carried.lr * keep + displacements[carried.segment]
    return Carried(segment, lr, weight_decay)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _decay_tangent(optimizer, before: list[torch.Tensor], had_state: list[bool]) -> torch.Tensor:
    """d(new weights)/d(log weight decay) of the step just taken, the state before it held fixed."""
    params = iter(zip(before, had_state, strict=True))
    tangents = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            weight, had = next(params)
            if p.grad is None:
                tangents.append(torch.zeros_like(weight).reshape(-1))
                continue
            d_weight = d_update_d_weight_decay(optimizer, group, p, weight, had)
            tangents.append((group["weight_decay"] * d_weight).reshape(-1))
    return torch.cat(tangents)


def _valid_gradient(run, params) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = run.valid_batches.next()
    with validation_mode(run.model):
        loss = run.loss_fn(run.model(x), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), torch.cat([
        (torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)
    ])


def _group_columns(optimizer) -> list[slice]:
    ends = itertools.accumulate(sum(p.numel() for p in group["params"]) for group in optimizer.param_groups)
    return [slice(start, end) for start, end in itertools.pairwise([0, *ends])]


def hypergradients(hyper, sums: torch.Tensor, first_segment: int, n_lr_rows: int, wd_row: int | None):
    """Row (value) by group sums into d(valid loss)/d(leaf), shaped as the leaves."""
    grads = [torch.zeros_like(hyper.log_lr)]
    lr_rows = grads[0][first_segment:first_segment + n_lr_rows]
    lr_rows.index_add_(1, _columns(hyper.log_lr.shape[1], sums), sums[:n_lr_rows])
    if wd_row is not None:
        grads.append(torch.zeros_like(hyper.log_weight_decay))
        grads[1].index_add_(0, _columns(len(hyper.log_weight_decay), sums), sums[wd_row])
    return grads


def _columns(n_values: int, sums: torch.Tensor) -> torch.Tensor:
    """For each parameter group (a column of ``sums``), the index of its value: its own, or the shared one."""
    n_groups = sums.shape[1]
    if n_values > 1:
        return torch.arange(n_groups, device=sums.device)
    return torch.zeros(n_groups, dtype=torch.long, device=sums.device)

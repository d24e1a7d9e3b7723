"""Truncated reverse-mode hypergradients: unroll K steps with ``higher``, back-propagate."""

from __future__ import annotations

import higher
import torch

from hypermeta._private import diffopt
from hypermeta._private.modes import batch_norms, copy_buffers, fresh_buffers, validation_mode
from hypermeta._private.window import Window, nothing


def unrolled_window(run, start: int, n_steps: int) -> Window:
    """Train ``n_steps`` differentiably from the committed state; nothing is written until commit.

    The patched model trains in train mode on its own copies of the buffers (BatchNorm running
    statistics), which commit writes back with the weights; the validation loss is taken in
    validation mode (see :mod:`hypermeta._private.modes`).
    """
    model, optimizer, hyper = run.model, run.optimizer, run.hyper
    fmodel = _patched(run)
    differentiable = diffopt.differentiable(optimizer, fmodel, model, override=None)
    train_losses = []
    norms = batch_norms(fmodel)
    leaves = hyper.tensors()
    overrides = {}  # the values of a segment computed once: fewer graph nodes to go back through
    for step in range(start, start + n_steps):
        x, y = run.train_batches.next()
        fresh_buffers(norms)
        loss = run.loss_fn(fmodel(x), y)
        segment = hyper.segment(step)
        if segment not in overrides:
            overrides[segment] = hyper.override(step)
        differentiable.step(loss, override=overrides[segment])
        train_losses.append(loss.detach())
    x, y = run.valid_batches.next()
    with validation_mode(fmodel):
        valid_loss = run.loss_fn(fmodel(x), y)
    grads = torch.autograd.grad(valid_loss, leaves, allow_unused=True)
    fast_params = list(fmodel.fast_params)
    return Window(
        train_loss=torch.stack(train_losses).mean(),
        valid_loss=valid_loss.detach(),
        hypergradients=[torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)],
        commit=lambda: _write_back(differentiable, optimizer, model, fmodel, fast_params),
        rollback=nothing,
    )


def _write_back(differentiable, optimizer, model, fmodel, fast_params) -> None:
    diffopt.write_back(differentiable, optimizer, model, fast_params)
    copy_buffers(fmodel, model)


def _patched(run):
    """The run's patched module, its fast weights reset to the committed weights.

    Patching costs as much as a few training steps, so it is done once per run. ``higher`` keeps
    every past set of fast weights (and so their graphs) in ``_fast_params``; it is cleared here
    so a window holds only its own.
    """
    if run.patched is None:
        run.patched = higher.monkeypatch(run.model, copy_initial_weights=True)
    run.patched._fast_params = None
    run.patched.update_params([p.detach().requires_grad_() for p in run.model.parameters()])
    copy_buffers(run.model, run.patched)
    run.patched.train()
    return run.patched

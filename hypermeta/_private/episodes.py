"""The batched inner loop of episodic meta-learning, and the learned inner rates it uses.

All tasks of a meta-batch adapt at once: every parameter gets a leading task dimension (the
initial weights expanded, so gradients reach them), the model runs under ``torch.func.vmap``, and
``higher``'s differentiable optimizer (our :class:`~hypermeta._private.diffopt.DifferentiableSGD`,
one parameter group per parameter) takes the steps. Because the tasks' losses are summed and each
depends on its own fast weights only, one gradient of the sum is every task's own gradient. A rate
broadcasts over the task dimension: a per-layer rate is a scalar, a per-parameter rate has the
parameter's shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.func import functional_call, vmap

from hypermeta._private import diffopt


class InnerRates:
    """Log-space inner learning rates (and optional weight decay) of one meta-learner.

    ``log_lr`` is ``(steps, layers)`` for the per-layer forms (``steps`` is 1 unless the rates are
    per step; ``layers`` is 1 for ``"fixed"``), or one tensor per parameter with its shape for
    ``"per_parameter"``. Inner step ``s`` beyond the trained steps uses the last step's rates.
    """

    def __init__(self, *, spec, weight_decay, layers: list[str], layer_of: list[int], params, inner_steps: int):
        self.spec, self.weight_decay_spec = spec, weight_decay
        self.layers, self.layer_of = layers, layer_of
        reference = params[0]

        def full(shape, value):
            return torch.full(shape, math.log(value), dtype=reference.dtype, device=reference.device)

        if spec.form == "per_parameter":
            self.log_lr = [full(p.shape, spec.init).requires_grad_() for p in params]
        else:
            steps = inner_steps if spec.form == "per_layer_per_step" else 1
            self.log_lr = [full((steps, 1 if spec.form == "fixed" else len(layers)), spec.init)]
            self.log_lr[0].requires_grad_(spec.form != "fixed")
        self.log_weight_decay = None
        if weight_decay is not None:
            n = len(layers) if weight_decay.scope == "per_group" else 1
            self.log_weight_decay = full((n,), weight_decay.init).requires_grad_()

    def tensors(self) -> list[torch.Tensor]:
        """The learned leaves (none for a fixed rate without weight decay)."""
        learned = [t for t in self.log_lr if t.requires_grad]
        return learned + ([self.log_weight_decay] if self.log_weight_decay is not None else [])

    def override(self, step: int, *, detach: bool = False) -> dict[str, list[torch.Tensor]]:
        """``higher``'s override for inner step ``step``: one rate per parameter group (= parameter)."""
        if self.spec.form == "per_parameter":
            lrs = [t.exp() for t in self.log_lr]
        else:
            table = self.log_lr[0]
            row = table[min(step, table.shape[0] - 1)].exp()
            lrs = [row[layer if row.numel() > 1 else 0] for layer in self.layer_of]
        override = {"lr": lrs}
        if self.log_weight_decay is not None:
            decays = self.log_weight_decay.exp()
            override["weight_decay"] = [decays[layer if decays.numel() > 1 else 0] for layer in self.layer_of]
        if detach:
            override = {key: [v.detach() for v in values] for key, values in override.items()}
        return override

    @torch.no_grad()
    def project(self) -> None:
        low, high = (math.log(b) for b in self.spec.bounds)
        for tensor in self.log_lr:
            tensor.clamp_(low, high)
        if self.log_weight_decay is not None:
            self.log_weight_decay.clamp_(*(math.log(b) for b in self.weight_decay_spec.bounds))

    def entries(self) -> list[tuple[str, str, int, float, float]]:
        """``(name, layer, inner step, value, hypergradient)`` of every reported value.

        Per-parameter rates are reported per layer: the mean rate, and the hypergradient of
        scaling all of the layer's rates together (the sum of their d loss / d log rate).
        """
        rows = []
        if self.spec.form == "per_parameter":
            for index, layer in enumerate(self.layers):
                mine = [t for t, of in zip(self.log_lr, self.layer_of, strict=True) if of == index]
                value = torch.cat([t.detach().exp().flatten() for t in mine]).mean()
                grads = [t.grad for t in mine if t.grad is not None]
                grad = sum(float(g.sum()) for g in grads) if grads else math.nan
                rows.append(("inner_lr", layer, 0, float(value), grad))
        else:
            table = self.log_lr[0]
            names = self.layers if table.shape[1] > 1 else ["all"]
            for step in range(table.shape[0]):
                for index, layer in enumerate(names):
                    grad = math.nan if table.grad is None else float(table.grad[step, index])
                    rows.append(("inner_lr", layer, step, float(table[step, index].detach().exp()), grad))
        if self.log_weight_decay is not None:
            decays = self.log_weight_decay
            names = self.layers if decays.numel() > 1 else ["all"]
            for index, layer in enumerate(names):
                grad = math.nan if decays.grad is None else float(decays.grad[index])
                rows.append(("weight_decay", layer, 0, float(decays[index].detach().exp()), grad))
        return rows

    def values(self) -> dict[str, float]:
        """Current values keyed ``inner_lr/<layer>/<step>`` and ``weight_decay/<layer>``."""
        return {
            f"{name}/{layer}" + (f"/{step}" if name == "inner_lr" else ""): value
            for name, layer, step, value, _ in self.entries()
        }


class InnerLoop:
    """Adapts the model's (initial) weights to the support sets of a batch of tasks."""

    def __init__(self, model: torch.nn.Module, rates: InnerRates, loss_fn: Callable[..., torch.Tensor]):
        self.model, self.rates, self.loss_fn = model, rates, loss_fn
        self.names = [name for name, _ in model.named_parameters()]
        params = list(model.parameters())
        sgd = torch.optim.SGD(
            [{"params": [p]} for p in params], lr=rates.spec.init,
            weight_decay=0.0 if rates.weight_decay_spec is None else rates.weight_decay_spec.init,
        )
        self.differentiable = diffopt.DifferentiableSGD(sgd, params)
        self.first_order = diffopt.DifferentiableSGD(sgd, params, track_higher_grads=False)
        self.forward = vmap(self._forward)

    def _forward(self, params, x):
        return functional_call(self.model, dict(zip(self.names, params, strict=True)), (x,))

    def task_losses(self, params, split) -> tuple[torch.Tensor, torch.Tensor]:
        """Each task's mean loss on ``split`` with its own weights, and the outputs."""
        output = self.forward(params, split.x)
        return vmap(self.loss_fn)(output, split.y), output

    def adapt(self, support, steps: int, *, differentiable: bool) -> Iterator[list[torch.Tensor]]:
        """The fast weights after each of ``steps`` inner steps on ``support``.

        ``differentiable``: the steps stay in the graph, so a loss of the final weights reaches
        the initial weights and the rates (second order); otherwise they are cut (evaluation).
        """
        optimizer = self.differentiable if differentiable else self.first_order
        n_tasks = len(support)
        with torch.enable_grad():
            fast = [p.expand(n_tasks, *p.shape) for p in self.model.parameters()]
        if not differentiable:
            fast = [p.detach().requires_grad_() for p in fast]
        for step in range(steps):
            with torch.enable_grad():
                loss = self.task_losses(fast, support)[0].sum()
                fast = optimizer.step(loss, params=fast, override=self.rates.override(step, detach=not differentiable))
            yield fast

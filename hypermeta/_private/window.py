"""What an estimator hands back for one window of inner steps."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Window:
    """``hypergradients`` are d(valid loss)/d(log value), one tensor per hyperparameter leaf (``None``:
    a window of plain steps). ``valid_loss`` is the loss of the validation batch they were taken on.

    ``commit`` makes the window's training permanent; ``rollback`` undoes it. The engine calls
    exactly one of them.
    """

    train_loss: torch.Tensor
    valid_loss: torch.Tensor | None
    hypergradients: list[torch.Tensor] | None
    commit: Callable[[], None]
    rollback: Callable[[], None]

    def problem(self, loss_limit: float) -> str | None:
        """Why this window must be rejected, or ``None`` if it is sound."""
        for what, loss in (("training loss", self.train_loss), ("validation loss", self.valid_loss)):
            value = None if loss is None else float(loss)
            if value is not None and not math.isfinite(value):
                return f"{what} is not finite"
            if value is not None and value > loss_limit:
                return f"{what} {value:.4g} exceeds the limit {loss_limit:.4g}"
        if not all(bool(torch.isfinite(g).all()) for g in self.hypergradients or []):
            return "hypergradient is not finite"
        return None


def nothing() -> None:
    """The commit or rollback of a window that has nothing to do."""

"""What an estimator hands back for one window of inner steps."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Window:
    """``hypergradients`` are d(valid loss)/d(log value), one tensor per hyperparameter leaf;
    ``settled`` the same without the effect of the window's settling steps (``None``: it has none).
    The values move by :attr:`moves`.

    ``commit`` makes the window's training permanent; ``rollback`` undoes it. The engine calls
    exactly one of them.
    """

    train_loss: torch.Tensor
    valid_loss: torch.Tensor | None
    hypergradients: list[torch.Tensor] | None
    commit: Callable[[], None]
    rollback: Callable[[], None]
    settled: list[torch.Tensor] | None = None

    @functools.cached_property
    def moves(self) -> list[torch.Tensor] | None:
        """What the meta-optimizer steps on: the hypergradient, or :func:`agreed` where the window settles."""
        if self.hypergradients is None or self.settled is None:
            return self.hypergradients
        return agreed(self.hypergradients, self.settled)

    def problem(self, loss_limit: float) -> str | None:
        """Why this window must be rejected, or ``None`` if it is sound."""
        for what, loss in (("training loss", self.train_loss), ("validation loss", self.valid_loss)):
            value = None if loss is None else float(loss)
            if value is not None and not math.isfinite(value):
                return f"{what} is not finite"
            if value is not None and value > loss_limit:
                return f"{what} {value:.4g} exceeds the limit {loss_limit:.4g}"
        if not all(bool(torch.isfinite(g).all()) for g in [*(self.hypergradients or []), *(self.settled or [])]):
            return "hypergradient is not finite"
        return None


def agreed(whole: list[torch.Tensor], settled: list[torch.Tensor]) -> list[torch.Tensor]:
    """The settled hypergradient where the whole window's has the same sign, else 0.

    ``whole`` differentiates the validation loss at a window's end with respect to the values
    on all its steps; ``settled`` leaves out its settling steps (see ``Hypergradient.settle``).
    The first mostly sees the gradient noise of the last steps, which smaller learning rates
    always reduce; the second misses what those steps cost, instability included, and so
    pushes rates up. A value moves only where both agree.
    """
    return [
        torch.where(torch.sign(w) == torch.sign(s), s, torch.zeros_like(s)) for w, s in zip(whole, settled, strict=True)
    ]


def nothing() -> None:
    """The commit or rollback of a window that has nothing to do."""

"""The meta-optimizer: sign steps in log space with a step size per value (Rprop).

Each value moves by its own step size against the sign of its hypergradient. A step size grows
by ``GROW`` while the sign holds and shrinks by ``SHRINK`` when it flips; after a flip the value
waits one hyper-step (iRprop-, Igel & Huesken 2000). A value far from good therefore travels
fast (its hypergradient keeps its sign), and one near good settles (the sign flips with the
noise) instead of drifting. Only signs are used: the size of a hypergradient -- tiny in log space
for a weight decay of 1e-6 -- does not matter, and a hypergradient of exactly 0 leaves its value
and its step size as they were.
"""

from __future__ import annotations

import torch

FIRST_STEP = 0.3  # e-folds: the first move of every value, a factor of 1.35
GROW, SHRINK = 1.2, 0.5
SMALLEST_STEP, LARGEST_STEP = 1e-3, 1.0  # e-folds per hyper-step


class Rprop:
    """Per-entry step sizes and the last signs for each tensor of log values."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.sizes = [torch.full_like(t, FIRST_STEP) for t in tensors]
        self.signs = [torch.zeros_like(t) for t in tensors]

    @torch.no_grad()
    def moves(self, hypergradients: list[torch.Tensor]) -> list[torch.Tensor]:
        """The change of each log value for these hypergradients (the state advances)."""
        moves = []
        for grad, size, last in zip(hypergradients, self.sizes, self.signs, strict=True):
            sign = torch.sign(grad)
            agreement = sign * last
            grown, shrunk = (size * GROW).clamp(max=LARGEST_STEP), (size * SHRINK).clamp(min=SMALLEST_STEP)
            size.copy_(torch.where(agreement > 0, grown, torch.where(agreement < 0, shrunk, size)))
            sign = torch.where(agreement < 0, 0.0, sign)  # after a flip, wait one hyper-step
            last.copy_(sign)
            moves.append(-size * sign)
        return moves

    def state(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [t.clone() for t in self.sizes], [t.clone() for t in self.signs]

    def load_state(self, state: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
        sizes, signs = state
        self.sizes, self.signs = [t.clone() for t in sizes], [t.clone() for t in signs]

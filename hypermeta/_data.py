"""In-memory datasets with fixed train / validation / test splits, and seeded mini-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """Inputs and targets of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y) or len(self.x) == 0:
            raise ValueError(f"a split needs as many targets as inputs (> 0): {len(self.x)} vs {len(self.y)}")

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Split:
        x = self.x.to(device=device, dtype=dtype if self.x.is_floating_point() else None)
        y = self.y.to(device=device, dtype=dtype if self.y.is_floating_point() else None)
        return Split(x, y)


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """Train, validation and test splits.

    The engine trains on ``train``, computes hypergradients on ``valid`` and never reads
    ``test``; the test split is there for whoever evaluates the finished model.

    Example:
        >>> import torch, hypermeta
        >>> split = hypermeta.Split(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
        >>> len(hypermeta.Dataset(train=split, valid=split, test=split).train)
        4
    """

    train: Split
    valid: Split
    test: Split

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Dataset:
        return Dataset(
            train=self.train.to(device, dtype),
            valid=self.valid.to(device, dtype),
            test=self.test.to(device, dtype),
        )


class Batches:
    """An endless stream of mini-batches: a new seeded permutation every epoch."""

    def __init__(self, split: Split, *, batch_size: int, generator: torch.Generator) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self._split = split
        self._batch_size = min(batch_size, len(split))
        self._generator = generator
        self._order = torch.empty(0, dtype=torch.long)
        self._position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batch_size == len(self._split):  # the whole split: order does not matter
            return self._split.x, self._split.y
        if self._position + self._batch_size > len(self._order):
            self._order = torch.randperm(len(self._split), generator=self._generator)
            self._position = 0
        index = self._order[self._position : self._position + self._batch_size]
        self._position += self._batch_size
        index = index.to(self._split.x.device)
        return self._split.x[index], self._split.y[index]

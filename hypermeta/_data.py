"""The data of a run: in-memory splits with seeded mini-batches, or the user's own loaders."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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


class _Stream:
    """Endless batches, the next of which can be looked at first."""

    _peeked = None

    def peek(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch the next :meth:`next` returns."""
        if self._peeked is None:
            self._peeked = self._take()
        return self._peeked

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._peeked is None:
            return self._take()
        batch, self._peeked = self._peeked, None
        return batch

    def _take(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class Batches(_Stream):
    """An endless stream of mini-batches: a new seeded permutation every epoch."""

    def __init__(self, split: Split, *, batch_size: int, generator: torch.Generator) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self._split = split
        self._batch_size = min(batch_size, len(split))
        self._generator = generator
        self._order = torch.empty(0, dtype=torch.long)
        self._position = 0

    def _take(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batch_size == len(self._split):  # the whole split: order does not matter
            return self._split.x, self._split.y
        if self._position + self._batch_size > len(self._order):
            self._order = torch.randperm(len(self._split), generator=self._generator)
            self._position = 0
        index = self._order[self._position : self._position + self._batch_size]
        self._position += self._batch_size
        index = index.to(self._split.x.device)
        return self._split.x[index], self._split.y[index]


@dataclass(frozen=True, kw_only=True)
class Loaders:
    """Train, validation and (optional) test data as re-iterables of ``(inputs, targets)`` batches.

    Any object that can be iterated again and again will do: a ``torch.utils.data.DataLoader``
    (shuffling, ``num_workers > 0``, transforms), a list of tensor pairs. The loader decides the
    batch size. Training rolls over epochs as needed; every batch is moved to the run's device
    (floating-point tensors also to the model's dtype). Each hypergradient takes its validation
    loss on the next consecutive batches of ``valid`` (epoch after epoch) that hold
    at least ``Hypergradient.valid_batch_size`` examples (a whole pass when it is ``None``). A
    ``DataLoader`` with ``persistent_workers=True`` shares one iterator between its passes, so each
    evaluation restarts that stream at the loader's first batches: shuffle such a ``valid`` loader.

    Example:
        >>> import torch, hypermeta
        >>> batches = [(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))] * 3
        >>> len(list(hypermeta.Loaders(train=batches, valid=batches).valid))
        3
    """

    train: Iterable
    valid: Iterable
    test: Iterable | None = None

    def __post_init__(self) -> None:
        for name in ("train", "valid", "test"):
            loader = getattr(self, name)
            if loader is None and name == "test":
                continue
            if not isinstance(loader, Iterable) or isinstance(loader, Iterator):  # iter() would draw a seed
                raise TypeError(
                    f"Loaders.{name} must be re-iterable (a DataLoader, a list of batches), "
                    f"got {type(loader).__name__}"
                )


def check_batch(batch, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` as ``(inputs, targets)``, or a ``ValueError`` saying what the loader yielded."""
    if isinstance(batch, tuple | list) and len(batch) == 2 and all(torch.is_tensor(t) for t in batch):
        return batch[0], batch[1]
    kind = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, tuple | list) else type(batch).__name__
    raise ValueError(f"the {where} loader yielded {kind}; a loader must yield (inputs, targets) pairs of tensors")


def to_run(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch tensor on the run's device; floating point in the model's dtype."""
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None, non_blocking=True)


class LoaderBatches(_Stream):
    """An endless stream of a loader's batches, epoch after epoch, on the run's device."""

    def __init__(self, loader: Iterable, *, device: torch.device, dtype: torch.dtype, where: str) -> None:
        self._loader, self._device, self._dtype, self._where = loader, device, dtype, where
        self._iterator = iter(loader)
        self._taken_in_pass = 0
        self.pass_examples: int | None = None  # the examples in one pass, known once the first has ended

    def _take(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = iter(self._loader)
            batch = next(self._iterator, None)
            if batch is None:
                raise ValueError(f"the {self._where} loader yielded no batches") from None
            self.pass_examples, self._taken_in_pass = self._taken_in_pass, 0
        x, y = check_batch(batch, self._where)
        self._taken_in_pass += len(y)
        return to_run(x, self._device, self._dtype), to_run(y, self._device, self._dtype)


class JoinedBatches:
    """Validation batches for hypergradients, joined: consecutive batches of a stream until they hold
    ``examples`` examples (one batch at least, as many examples as one pass at most), else a whole pass."""

    def __init__(self, loader: Iterable, *, examples: int | None, device: torch.device, dtype: torch.dtype) -> None:
        self._loader, self._examples, self._device, self._dtype = loader, examples, device, dtype
        self._stream = LoaderBatches(loader, device=device, dtype=dtype, where="valid")

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._examples is not None:
            batches = [self._stream.next()]
            while (joined := sum(len(y) for _, y in batches)) < self._examples:
                self._stream.peek()  # the stream learns the size of a pass as it begins the next one
                if self._stream.pass_examples is not None and joined >= self._stream.pass_examples:
                    break
                batches.append(self._stream.next())
        else:
            batches = [check_batch(batch, "valid") for batch in self._loader]
            batches = [(to_run(x, self._device, self._dtype), to_run(y, self._device, self._dtype)) for x, y in batches]
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def split_batches(data: Split | Iterable, *, batch_size: int = 4096) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of one split, each once: an in-memory ``Split`` in slices, or a loader's own."""
    if isinstance(data, Split):
        for start in range(0, len(data), batch_size):
            yield data.x[start : start + batch_size], data.y[start : start + batch_size]
    else:
        for batch in data:
            yield check_batch(batch, "evaluation")

"""Task distributions for few-shot meta-learning: batches of episodes, each a support and a query set.

A task distribution has three disjoint (or independently drawn) splits, ``"train"``,
``"valid"`` and ``"test"`` -- meta-training, meta-validation and meta-test tasks -- and
``sample(n_tasks, *, shots, query, generator, split)`` returns :class:`Episodes`: support and
query sets stacked along a leading task dimension. Nothing is downloaded at run time.

Example:
    >>> import torch
    >>> from hypermeta import tasks
    >>> episodes = tasks.Sinusoid().sample(4, shots=10, query=15, generator=torch.Generator().manual_seed(0))
    >>> tuple(episodes.support.x.shape), tuple(episodes.query.y.shape)
    ((4, 10, 1), (4, 15, 1))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from hypermeta._data import Split

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Episodes:
    """A batch of tasks: ``support`` and ``query`` are :class:`hypermeta.Split` objects whose
    tensors have a leading task dimension (``x``: ``(tasks, examples, *features)``)."""

    support: Split
    query: Split

    def __len__(self) -> int:
        return len(self.support)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Episodes:
        return Episodes(self.support.to(device, dtype), self.query.to(device, dtype))


class Sinusoid:
    """Sinusoid regression as in MAML (Finn et al. 2017): y = A sin(x - phase).

    Each task draws an amplitude ``A ~ U[0.1, 5]`` and a phase ``~ U[0, pi]``; its inputs are
    ``x ~ U[-5, 5]``. The loss is the mean squared error. All three splits are the same
    distribution: meta-validation and meta-test tasks are new draws from their own seeded
    generators (:func:`hypermeta.meta_train` and :func:`hypermeta.evaluate_tasks` keep them apart).
    ``shots`` and ``query`` are points per task. The MAML network is an MLP 1-40-40-1.

    Example:
        >>> import torch
        >>> from hypermeta import tasks
        >>> episodes = tasks.Sinusoid().sample(2, shots=5, query=5, generator=torch.Generator().manual_seed(0))
        >>> bool(episodes.support.y.abs().max() <= 5)
        True
    """

    in_features = 1
    out_features = 1
    classification = False
    loss_fn: Callable[..., torch.Tensor] = staticmethod(F.mse_loss)

    def __init__(
        self, *, amplitude: tuple[float, float] = (0.1, 5.0), phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low <= high:
                raise ValueError(f"Sinusoid {name} must be (low, high) with low <= high, got {(low, high)}")
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def sample(self, n_tasks: int, *, shots: int, query: int, generator: torch.Generator,
               split: str = "train") -> Episodes:
        _check_sizes(n_tasks, shots, query, split)
        amplitude = _uniform((n_tasks, 1, 1), self.amplitude, generator)
        phase = _uniform((n_tasks, 1, 1), self.phase, generator)
        x = _uniform((n_tasks, shots + query, 1), self.x_range, generator)
        y = amplitude * torch.sin(x - phase)
        return Episodes(Split(x[:, :shots], y[:, :shots]), Split(x[:, shots:], y[:, shots:]))


class Digits:
    """N-way K-shot classification episodes from scikit-learn's bundled 8x8 digits.

    The ten digits give two disjoint sets of five classes: meta-test tasks use digits 5-9 only,
    which meta-training never sees. Meta-training and meta-validation share digits 0-4 (ten
    classes cannot give three disjoint 5-way splits) but not examples: a fixed 70/30 split of
    each class's images (by ``seed``); meta-validation measures adaptation to unseen images and
    new label assignments. In every episode the chosen classes get labels ``0..ways-1`` in a
    random order, so the network cannot memorize a class's label. ``shots`` and ``query`` are
    examples per class; the loss is cross-entropy. Features are scaled to [0, 1].

    Example:
        >>> import torch
        >>> from hypermeta import tasks
        >>> digits = tasks.Digits()
        >>> episodes = digits.sample(3, shots=1, query=2, generator=torch.Generator().manual_seed(0), split="test")
        >>> tuple(episodes.support.x.shape), sorted(episodes.query.y[0].tolist())
        ((3, 5, 64), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
        >>> digits.classes("test")
        [5, 6, 7, 8, 9]
    """

    in_features = 64
    classification = True
    loss_fn: Callable[..., torch.Tensor] = staticmethod(F.cross_entropy)
    TRAIN_CLASSES = (0, 1, 2, 3, 4)
    TEST_CLASSES = (5, 6, 7, 8, 9)
    VALID_FRACTION = 0.3

    def __init__(self, *, ways: int = 5, seed: int = 0) -> None:
        if not isinstance(ways, int) or not 2 <= ways <= len(self.TRAIN_CLASSES):
            raise ValueError(f"Digits ways must be an integer from 2 to {len(self.TRAIN_CLASSES)}, got {ways!r}")
        self.ways = ways
        self.out_features = ways
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)
        rng = np.random.default_rng(seed)
        self._examples: dict[str, dict[int, torch.Tensor]] = {split: {} for split in SPLITS}
        for digit in self.TRAIN_CLASSES:
            images = x[rng.permutation(np.flatnonzero(y == digit))]
            n_valid = round(self.VALID_FRACTION * len(images))
            self._examples["valid"][digit], self._examples["train"][digit] = images[:n_valid], images[n_valid:]
        for digit in self.TEST_CLASSES:
            self._examples["test"][digit] = x[np.flatnonzero(y == digit)]

    def classes(self, split: str) -> list[int]:
        """The digits that tasks of ``split`` are drawn from."""
        _check_split(split)
        return sorted(self._examples[split])

    def sample(self, n_tasks: int, *, shots: int, query: int, generator: torch.Generator,
               split: str = "train") -> Episodes:
        _check_sizes(n_tasks, shots, query, split)
        examples = self._examples[split]
        smallest = min(examples, key=lambda digit: len(examples[digit]))
        if shots + query > len(examples[smallest]):
            raise ValueError(
                f"shots + query = {shots} + {query} = {shots + query} examples per class, but the"
                f" {split!r} split has only {len(examples[smallest])} images of digit {smallest} (its smallest"
                " class); ask for fewer shots or query examples"
            )
        digits = sorted(examples)
        support_x, support_y, query_x, query_y = [], [], [], []
        for _ in range(n_tasks):
            chosen = torch.randperm(len(digits), generator=generator)[: self.ways]
            xs = []
            for digit in chosen.tolist():
                images = examples[digits[digit]]
                xs.append(images[torch.randperm(len(images), generator=generator)[: shots + query]])
            xs = torch.stack(xs)  # (ways, shots + query, 64); row i gets label i
            labels = torch.arange(self.ways).unsqueeze(1)
            support_x.append(xs[:, :shots].flatten(0, 1))
            query_x.append(xs[:, shots:].flatten(0, 1))
            support_y.append(labels.expand(-1, shots).flatten())
            query_y.append(labels.expand(-1, query).flatten())
        return Episodes(
            Split(torch.stack(support_x), torch.stack(support_y)), Split(torch.stack(query_x), torch.stack(query_y))
        )


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_sizes(n_tasks: int, shots: int, query: int, split: str) -> None:
    _check_split(split)
    for name, value in (("n_tasks", n_tasks), ("shots", shots), ("query", query)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


__all__ = ["Digits", "Episodes", "Sinusoid"]

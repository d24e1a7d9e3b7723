"""Built-in datasets that ship with a package: nothing is downloaded at run time."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from hypermeta._data import Dataset, Split


def digits(*, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), split 60/20/20.

    Features are scaled to [0, 1]. The split is stratified and fixed by ``seed``.

    Example:
        >>> import hypermeta
        >>> data = hypermeta.datasets.digits()
        >>> len(data.train), len(data.valid), len(data.test)
        (1078, 359, 360)
    """
    x, y = load_digits(return_X_y=True)
    return _split(x / 16.0, y, seed=seed)


def _split(x: np.ndarray, y: np.ndarray, *, seed: int) -> Dataset:
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, random_state=seed, stratify=y
    )
    x_valid, x_test, y_valid, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest
    )

    def split(inputs: np.ndarray, targets: np.ndarray) -> Split:
        return Split(torch.tensor(inputs, dtype=torch.float32), torch.tensor(targets))

    return Dataset(
        train=split(x_train, y_train), valid=split(x_valid, y_valid), test=split(x_test, y_test)
    )

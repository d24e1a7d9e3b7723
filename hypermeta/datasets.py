"""Built-in datasets that ship with a package: nothing is downloaded at run time."""

from __future__ import annotations

import functools
import random

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


def mnist1d(*, seed: int = 0) -> Dataset:
    """MNIST-1D (Greydanus 2020): 10 classes of 1-D signals of length 40, generated offline.

    The signals are the library's default dataset (``mnist1d.data.get_dataset_args()``, generation
    seed 42): its 4,000 training and 1,000 test examples. A stratified validation split of 1,000 is
    carved out of the training examples, fixed by ``seed``; the test split is the library's.
    Nothing is downloaded or written to disk, and the global NumPy / ``random`` state is left as it
    was. Needs the ``mnist1d`` package (``pip install mnist1d``).

    Example:
        >>> import hypermeta
        >>> data = hypermeta.datasets.mnist1d()
        >>> len(data.train), len(data.valid), len(data.test)
        (3000, 1000, 1000)
        >>> tuple(data.train.x.shape), data.train.x.dtype, data.train.y.dtype
        ((3000, 40), torch.float32, torch.int64)
    """
    x, y, x_test, y_test = _mnist1d_arrays()
    x_train, x_valid, y_train, y_valid = train_test_split(x, y, test_size=1000, random_state=seed, stratify=y)

    def split(inputs: np.ndarray, targets: np.ndarray) -> Split:
        return Split(torch.tensor(inputs, dtype=torch.float32), torch.tensor(targets, dtype=torch.int64))

    return Dataset(train=split(x_train, y_train), valid=split(x_valid, y_valid), test=split(x_test, y_test))


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The library's default MNIST-1D, made in memory (``make_dataset``, not ``get_dataset``,
    which downloads and pickles into the working directory). Read-only arrays: cached."""
    try:  # an optional dependency, imported when used
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError("hypermeta.datasets.mnist1d() needs the mnist1d package: pip install mnist1d") from error

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:  # make_dataset seeds the global generators; give them back as they were
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    arrays = (data["x"], data["y"], data["x_test"], data["y_test"])
    for array in arrays:
        array.setflags(write=False)
    return arrays

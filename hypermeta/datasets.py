"""Built-in datasets that ship with a package: nothing is downloaded at run time."""

from __future__ import annotations

import functools
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from hypermeta._data import Dataset, Loaders, Split

_CHUNK = 10_000  # examples generated at a time: the data is never held in memory whole


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


def mnist1d_loaders(
    *,
    n: int = 120_000,
    batch_size: int = 128,
    valid: int = 10_000,
    test: int = 10_000,
    directory: str | os.PathLike | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> Loaders:
    """MNIST-1D at any size, stored on disk and streamed: :class:`hypermeta.Loaders` of DataLoaders.

    ``n`` examples are made offline from the library's templates (``mnist1d.data.make_dataset``
    with its default arguments, ``_CHUNK`` at a time with generation seeds ``seed``, ``seed + 1``,
    ...), written once to ``x.npy`` / ``y.npy`` in ``directory`` (default
    ``.hypermeta/data/mnist1d-<n>-seed<seed>`` under the working directory) and memory-mapped
    from then on: a batch reads only its own rows. The last ``valid + test`` examples are the
    validation and test splits (1,000 a batch, in order); the training batches of ``batch_size``
    are drawn without replacement each epoch by a DataLoader seeded with ``seed``. Making 120,000
    examples takes about 40 s on one core, once.

    Example:
        >>> import tempfile, hypermeta
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     data = hypermeta.datasets.mnist1d_loaders(n=2000, valid=500, test=500, directory=directory)
        ...     x, y = next(iter(data.train))
        >>> tuple(x.shape), x.dtype, y.dtype, len(data.valid.dataset)
        ((128, 40), torch.float32, torch.int64, 500)
    """
    if not 0 < valid + test < n:
        raise ValueError(f"valid + test must be between 0 and n = {n}, got {valid} + {test}")
    path = Path(directory) if directory is not None else Path(".hypermeta") / "data" / f"mnist1d-{n}-seed{seed}"
    if not (path / "y.npy").exists():
        _write_mnist1d(path, n, seed)
    n_train = n - valid - test
    train = _Rows(path, 0, n_train)
    return Loaders(
        train=DataLoader(
            train, batch_size=None, num_workers=num_workers,
            sampler=BatchSampler(RandomSampler(train, generator=torch.Generator().manual_seed(seed)),
                                 batch_size=batch_size, drop_last=True),
        ),
        valid=_in_order(_Rows(path, n_train, n_train + valid), num_workers),
        test=_in_order(_Rows(path, n_train + valid, n), num_workers) if test else None,
    )


class _Rows(torch.utils.data.Dataset):
    """Rows ``start:stop`` of the memory-mapped arrays; an item is a batch, for a list of indices."""

    def __init__(self, path: Path, start: int, stop: int) -> None:
        self.path, self.start, self.stop = path, start, stop
        self._arrays = None  # opened in each worker process, not pickled

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._arrays is None:
            self._arrays = tuple(np.load(self.path / name, mmap_mode="r") for name in ("x.npy", "y.npy"))
        rows = np.sort(np.asarray(indices)) + self.start
        x, y = self._arrays
        return torch.from_numpy(np.ascontiguousarray(x[rows])), torch.from_numpy(np.ascontiguousarray(y[rows]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}


def _in_order(rows: _Rows, num_workers: int) -> DataLoader:
    sampler = BatchSampler(SequentialSampler(rows), batch_size=1000, drop_last=False)
    return DataLoader(rows, batch_size=None, sampler=sampler, num_workers=num_workers)


def _write_mnist1d(path: Path, n: int, seed: int) -> None:
    """Generate ``n`` examples chunk by chunk into memory-mapped files; the directory appears complete or not at all."""
    from mnist1d.data import get_dataset_args, make_dataset  # an optional dependency

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        x = np.lib.format.open_memmap(partial / "x.npy", mode="w+", dtype=np.float32, shape=(n, 40))
        y = np.lib.format.open_memmap(partial / "y.npy", mode="w+", dtype=np.int64, shape=(n,))
        numpy_state, python_state = np.random.get_state(), random.getstate()
        try:  # make_dataset seeds the global generators; give them back as they were
            for chunk, start in enumerate(range(0, n, _CHUNK)):
                size = min(_CHUNK, n - start)
                args = get_dataset_args()
                args.num_samples, args.train_split, args.seed = -(-size // 10) * 10, 1.0, seed + chunk
                data = make_dataset(args)
                x[start : start + size] = data["x"][:size]
                y[start : start + size] = data["y"][:size]
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
        x.flush()
        y.flush()
        del x, y
        partial.chmod(0o755)  # mkdtemp made it private
        try:
            partial.rename(path)
        except OSError:  # another process finished the same files first
            if not (path / "y.npy").exists():
                raise
            shutil.rmtree(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

"""The built-in datasets (fixed, seeded splits made offline) and the study files that use them."""

import random
import socket
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

import hypermeta
from hypermeta._runner import load_study_file
from hypermeta._study import hyperparameter_keys

STUDIES = Path(__file__).resolve().parents[1] / "studies"
SIZES = {"digits": (1078, 359, 360, 64), "mnist1d": (3000, 1000, 1000, 40)}


def _splits(data: hypermeta.Dataset) -> list[hypermeta.Split]:
    return [data.train, data.valid, data.test]


@pytest.mark.parametrize("name", sorted(SIZES))
def test_split_sizes_shapes_and_dtypes(name):
    *sizes, features = SIZES[name]
    data = getattr(hypermeta.datasets, name)()
    assert [len(split) for split in _splits(data)] == sizes
    for split in _splits(data):
        assert split.x.shape == (len(split), features) and split.x.dtype == torch.float32
        assert split.y.shape == (len(split),) and split.y.dtype == torch.int64
        assert torch.isfinite(split.x).all()
        assert sorted(split.y.unique().tolist()) == list(range(10))  # every class in every split


@pytest.mark.parametrize("name", sorted(SIZES))
def test_splits_do_not_overlap(name):
    data = getattr(hypermeta.datasets, name)()
    rows = torch.cat([split.x for split in _splits(data)])
    assert len(torch.unique(rows, dim=0)) == len(rows)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_a_seed_fixes_the_split(name):
    make = getattr(hypermeta.datasets, name)
    first, again, other = make(seed=0), make(seed=0), make(seed=1)
    for a, b in zip(_splits(first), _splits(again), strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(first.valid.x, other.valid.x)
    # another seed deals the same examples out differently
    rows = [torch.unique(torch.cat([s.x for s in _splits(data)]), dim=0) for data in (first, other)]
    assert torch.equal(*rows)


def test_mnist1d_test_split_is_the_librarys_and_validation_is_stratified():
    data, other = hypermeta.datasets.mnist1d(seed=0), hypermeta.datasets.mnist1d(seed=1)
    assert torch.equal(data.test.x, other.test.x)  # the seed only moves examples between train and valid
    assert data.valid.y.bincount().tolist() == pytest.approx(data.train.y.bincount().div(3).tolist(), abs=1)


def test_mnist1d_is_made_offline_without_files_or_global_seeding(tmp_path, monkeypatch):
    from hypermeta.datasets import _mnist1d_arrays

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    np.random.seed(123)
    random.seed(123)
    expected = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    x, y, x_test, y_test = _mnist1d_arrays.__wrapped__()  # uncached: really generate it
    assert (np.random.rand(), random.random()) == expected
    assert list(tmp_path.iterdir()) == []
    assert x.shape == (4000, 40) and x_test.shape == (1000, 40) and len(y) == 4000 and len(y_test) == 1000


@pytest.mark.parametrize("file", ["mnist1d_cnn.py", "digits_highdim.py"])
def test_study_files_load(file):
    study = load_study_file(STUDIES / file)
    assert study.name == file.removesuffix(".py").replace("_", "-")


def test_digits_highdim_has_at_least_30_continuous_hyperparameters():
    study = load_study_file(STUDIES / "digits_highdim.py")
    setup = study.build(optuna.trial.FixedTrial({"batch_size": 32}))
    keys = hyperparameter_keys(setup)
    assert len(keys) >= 30 and len(set(keys)) == len(keys)
    assert len(keys) == 5 * 6 + 5  # 5 layers x 6 learning-rate segments, and one weight decay per layer


def test_mnist1d_cnn_builds_a_model_for_the_flat_inputs():
    study = load_study_file(STUDIES / "mnist1d_cnn.py")
    setup = study.build(optuna.trial.FixedTrial({"channels": 64, "batch_size": 100}))
    assert setup.model(setup.data.valid.x[:3]).shape == (3, 10)
    assert len(hyperparameter_keys(setup)) == 2 * 4  # per-layer learning rate and weight decay, 4 layers


def test_mnist1d_loaders_are_generated_once_on_disk_and_streamed(tmp_path):
    import random

    import numpy as np

    state = np.random.get_state()[1].copy(), random.getstate()
    data = hypermeta.datasets.mnist1d_loaders(n=1_205, valid=300, test=105, batch_size=50, directory=tmp_path / "m")
    assert (np.random.get_state()[1] == state[0]).all() and random.getstate() == state[1]
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["x.npy", "y.npy"] and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    stamp = (tmp_path / "m" / "x.npy").stat().st_mtime_ns
    again = hypermeta.datasets.mnist1d_loaders(n=1_205, valid=300, test=105, batch_size=50, directory=tmp_path / "m")
    assert (tmp_path / "m" / "x.npy").stat().st_mtime_ns == stamp, "the files are made once"
    train = list(data.train)
    assert len(train) == 800 // 50 and all(x.shape == (50, 40) and x.dtype == torch.float32 for x, _ in train)
    assert [len(y) for _, y in data.valid] == [300] and [len(y) for _, y in data.test] == [105]
    assert set(torch.cat([y for _, y in train]).tolist()) == set(range(10))
    rows = torch.cat([x for x, _ in train])
    assert len(torch.unique(rows, dim=0)) == 800, "an epoch draws every training row once"
    torch.testing.assert_close(torch.cat([x for x, _ in again.valid]), torch.cat([x for x, _ in data.valid]))
    assert not any(torch.equal(a, b) for (a, _), (b, _) in zip(train, list(data.train), strict=True)), "reshuffled"

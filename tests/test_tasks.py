"""Task distributions: episode shapes, labels, disjoint splits, and clear errors for impossible episodes."""

import pytest
import torch

from hypermeta import tasks


@pytest.fixture(scope="module")
def digits():
    return tasks.Digits()


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sinusoid_follows_the_maml_setup():
    episodes = tasks.Sinusoid().sample(500, shots=5, query=7, generator=generator())
    assert episodes.support.x.shape == (500, 5, 1) and episodes.query.x.shape == (500, 7, 1)
    x = torch.cat([episodes.support.x, episodes.query.x], dim=1)
    y = torch.cat([episodes.support.y, episodes.query.y], dim=1)
    assert -5 <= x.min() and x.max() <= 5
    amplitude = y.abs().amax(dim=(1, 2))
    assert amplitude.max() <= 5 and amplitude.min() < 1  # ~U[0.1, 5]: some tasks have small amplitudes
    # one sinusoid per task: support and query are points of the same curve
    same = tasks.Sinusoid().sample(500, shots=5, query=7, generator=generator())
    assert torch.equal(same.query.y, episodes.query.y)


def test_digits_episodes_are_5_way_with_shuffled_labels(digits):
    episodes = digits.sample(8, shots=3, query=4, generator=generator(), split="train")
    assert episodes.support.x.shape == (8, 15, 64) and episodes.query.x.shape == (8, 20, 64)
    for task in range(8):
        assert torch.bincount(episodes.support.y[task]).tolist() == [3] * 5
        assert torch.bincount(episodes.query.y[task]).tolist() == [4] * 5
    assert 0 <= episodes.support.x.min() and episodes.support.x.max() <= 1


def test_digits_splits_are_disjoint(digits):
    assert digits.classes("train") == digits.classes("valid") == [0, 1, 2, 3, 4]
    assert digits.classes("test") == [5, 6, 7, 8, 9]

    def images(split):
        return {tuple(row.tolist()) for rows in digits._examples[split].values() for row in rows}

    train, valid, test = images("train"), images("valid"), images("test")
    assert not train & valid and not train & test and not valid & test


def test_support_and_query_of_a_task_do_not_overlap(digits):
    episodes = digits.sample(5, shots=5, query=5, generator=generator(), split="test")
    for task in range(5):
        support = {tuple(r.tolist()) for r in episodes.support.x[task]}
        query = {tuple(r.tolist()) for r in episodes.query.x[task]}
        assert not support & query


def test_shots_larger_than_a_class_is_a_clear_error(digits):
    with pytest.raises(ValueError, match=r"shots \+ query = 200 \+ 5 .* images of digit"):
        digits.sample(1, shots=200, query=5, generator=generator(), split="test")
    with pytest.raises(ValueError, match="'valid' split has only"):
        digits.sample(1, shots=50, query=10, generator=generator(), split="valid")


@pytest.mark.parametrize("bad", [{"shots": 0}, {"query": -1}, {"shots": 2.5}, {"split": "meta-test"}])
def test_bad_sizes_and_splits_are_rejected(bad):
    arguments = {"shots": 5, "query": 5, "split": "train", **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        tasks.Sinusoid().sample(2, generator=generator(), **arguments)


def test_digits_ways_must_fit_the_classes():
    with pytest.raises(ValueError, match="ways"):
        tasks.Digits(ways=6)

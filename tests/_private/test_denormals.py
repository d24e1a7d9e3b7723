import threading

import pytest
import torch

import hypermeta
from hypermeta._engine import train_loop
from hypermeta._private.denormals import flushing, flushing_denormals
from tests.conftest import mlp

if not torch.set_flush_denormal(False):  # True only where the CPU can flush
    pytest.skip("this CPU cannot flush denormals", allow_module_level=True)


def test_the_flag_is_set_inside_and_what_the_thread_had_comes_back():
    assert not flushing()
    with flushing_denormals():
        assert flushing() and torch.tensor([1e-39]).mul(1.0).item() == 0.0
    assert not flushing() and torch.tensor([1e-39]).mul(1.0).item() > 0.0
    torch.set_flush_denormal(True)
    try:
        with flushing_denormals():
            pass
        assert flushing()  # a user who flushed already keeps it
    finally:
        torch.set_flush_denormal(False)


def test_train_flushes_while_it_trains_and_not_after(digits):
    seen = []
    hypermeta.train(
        mlp(hidden=16), data=digits, steps=20, batch_size=32, learning_rate=hypermeta.LearningRate(init=0.1),
        hypergradient=hypermeta.Hypergradient(horizon=5), on_evaluation=lambda step, metrics: seen.append(flushing()),
    )
    assert seen and all(seen)
    assert not flushing()


def test_the_users_loop_and_the_window_thread_both_flush(digits):
    x, y = digits.train.x[:32], digits.train.y[:32]
    cross_entropy = torch.nn.functional.cross_entropy
    seen = {}

    def train_loss(model):
        seen.setdefault(threading.current_thread() is threading.main_thread(), []).append(flushing())
        return cross_entropy(model(x), y)

    def loop(hyper, report):
        for _ in range(10):
            hyper.step(train_loss, lambda m: cross_entropy(m(digits.valid.x), digits.valid.y))
        report({"loss": 1.0, "flushing": float(flushing())})

    result = train_loop(
        loop, mlp(hidden=16), steps=10, learning_rate=hypermeta.LearningRate(init=0.1),
        hypergradient=hypermeta.Hypergradient(horizon=5, estimator="unrolled"),
    )
    assert result.evaluations["valid_flushing"].tolist() == [1.0]
    assert seen.get(False) and all(seen[False])  # the window's worker thread
    assert not flushing()

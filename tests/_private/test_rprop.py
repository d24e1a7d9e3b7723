"""The meta-optimizer: sign steps with a step size per value, grown while the sign holds."""

import math

import pytest
import torch

from hypermeta._private.rprop import FIRST_STEP, GROW, LARGEST_STEP, SHRINK, SMALLEST_STEP, Rprop


def _moves(rprop, *grads):
    return rprop.moves([torch.tensor(list(grads))])[0].tolist()


def test_a_value_moves_against_its_hypergradients_sign_by_its_own_step_whatever_the_size():
    rprop = Rprop([torch.zeros(3)])
    assert _moves(rprop, 1e-12, -1e6, 0.5) == pytest.approx([-FIRST_STEP, FIRST_STEP, -FIRST_STEP])


def test_the_step_grows_while_the_sign_holds_up_to_the_largest():
    rprop = Rprop([torch.zeros(1)])
    steps = [-_moves(rprop, 1.0)[0] for _ in range(20)]
    expected = [min(FIRST_STEP * GROW**n, LARGEST_STEP) for n in range(20)]
    assert steps == pytest.approx(expected)
    assert steps[-1] == pytest.approx(LARGEST_STEP)


def test_a_flip_shrinks_the_step_and_waits_one_hyper_step():
    rprop = Rprop([torch.zeros(1)])
    _moves(rprop, 1.0)
    assert _moves(rprop, -1.0) == [0.0]  # the flip: no move
    assert _moves(rprop, -1.0) == pytest.approx([FIRST_STEP * SHRINK])  # then the shrunk step, the new way
    for _ in range(40):
        _moves(rprop, 1.0)
        _moves(rprop, -1.0)
    assert rprop.sizes[0].item() == pytest.approx(SMALLEST_STEP)


def test_a_zero_hypergradient_leaves_the_value_and_its_step_size_still():
    rprop = Rprop([torch.zeros(2)])
    _moves(rprop, 1.0, 1.0)
    _moves(rprop, 1.0, 1.0)
    sizes = rprop.sizes[0].clone()
    assert _moves(rprop, 0.0, 1.0)[0] == 0.0
    assert rprop.sizes[0][0] == sizes[0] and rprop.sizes[0][1] > sizes[1]
    assert _moves(rprop, 1.0, 1.0)[0] == pytest.approx(-sizes[0].item())  # it goes on where it left off


def test_state_round_trips():
    rprop = Rprop([torch.zeros(2)])
    _moves(rprop, 1.0, -1.0)
    saved = rprop.state()
    first = _moves(rprop, 1.0, 1.0)
    rprop.load_state(saved)
    assert _moves(rprop, 1.0, 1.0) == first
    assert math.isclose(FIRST_STEP * GROW, 0.36)

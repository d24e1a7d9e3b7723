import dataclasses
import math

import pytest
import torch

import hypermeta
from hypermeta._hyperparameters import HyperParameters


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: hypermeta.LearningRate(init=0.0), "outside its bounds"),
        (lambda: hypermeta.LearningRate(init=0.1, bounds=(1.0, 0.1)), "0 < low < high"),
        (lambda: hypermeta.LearningRate(init=0.1, scope="layer"), "scope must be one of"),
        (lambda: hypermeta.LearningRate(init=0.1, segments=0), "segments must be an integer"),
        (lambda: hypermeta.WeightDecay(init=2.0), "outside its bounds"),
        (lambda: hypermeta.Hypergradient(estimator="implicit"), "estimator must be one of"),
        (lambda: hypermeta.Hypergradient(horizon=0), "horizon must be an integer >= 1"),
        (lambda: hypermeta.Hypergradient(horizon=2.5), "horizon must be an integer >= 1"),
        (lambda: hypermeta.Hypergradient(horizon=True), "horizon must be an integer >= 1"),
        (lambda: hypermeta.Hypergradient(valid_batch_size=0), "valid_batch_size must be an integer >= 1 or None"),
        (lambda: hypermeta.Hypergradient(valid_batch_size=64.0), "valid_batch_size must be an integer >= 1"),
    ],
)
def test_invalid_specs_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_hypergradient_has_three_arguments_and_the_defaults_the_benchmarks_measured():
    """docs/benchmarks.md measures ``Hypergradient()``; everything else is derived from the run."""
    fields = {field.name: field.default for field in dataclasses.fields(hypermeta.Hypergradient)}
    assert fields == {"estimator": "first_order", "horizon": 40, "valid_batch_size": 256}


def _hyper(segments=4, total_steps=100):
    return HyperParameters(
        learning_rate=hypermeta.LearningRate(
            init=0.1, scope="per_group", segments=segments, bounds=(0.01, 1.0)
        ),
        weight_decay=hypermeta.WeightDecay(init=1e-3, bounds=(1e-4, 1e-2)),
        group_names=["a", "b"], total_steps=total_steps, dtype=torch.float64, device=torch.device("cpu"),
    )


def test_segments_split_the_budget_evenly():
    hyper = _hyper()
    assert [hyper.segment(step) for step in (0, 24, 25, 74, 75, 99)] == [0, 0, 1, 2, 3, 3]


def test_projection_clamps_into_bounds_in_log_space():
    hyper = _hyper()
    with torch.no_grad():
        hyper.log_lr += 10.0
        hyper.log_weight_decay -= 10.0
    hyper.project()
    values = hyper.values()
    assert math.isclose(values["lr/a/0"], 1.0) and math.isclose(values["weight_decay/all"], 1e-4)


def test_override_gives_one_value_per_group_for_the_current_segment():
    hyper = _hyper()
    with torch.no_grad():
        hyper.log_lr[2, 1] = math.log(0.5)
    override = hyper.override(60)
    assert [v.item() for v in override["lr"]] == pytest.approx([0.1, 0.5])
    assert [v.item() for v in override["weight_decay"]] == pytest.approx([1e-3, 1e-3])


def test_load_values_starts_single_entries_elsewhere():
    hyper = _hyper()
    hyper.load_values({"lr/b/3": 0.5, "weight_decay/all": 5e-3})
    values = hyper.values()
    assert values["lr/b/3"] == pytest.approx(0.5) and values["lr/a/3"] == pytest.approx(0.1)
    assert values["weight_decay/all"] == pytest.approx(5e-3)


def test_load_values_takes_back_a_value_stored_at_a_bound_in_float32():
    stored = float(torch.tensor(0.01, dtype=torch.float32).log().exp())  # what a float32 run reports
    assert stored < 0.01
    hyper = _hyper()
    hyper.load_values({"lr/a/0": stored})
    assert hyper.values()["lr/a/0"] == pytest.approx(0.01, rel=1e-12)


def test_more_segments_than_steps_is_an_error():
    with pytest.raises(ValueError, match="4 learning-rate segments need at least as many steps, got 3"):
        _hyper(segments=4, total_steps=3)


def test_segment_start_is_the_first_step_of_each_segment():
    hyper = _hyper(segments=3, total_steps=100)
    starts = [hyper.segment_start(segment) for segment in range(3)]
    assert starts == [0, 34, 67]
    assert [hyper.segment(step) for step in starts] == [0, 1, 2]
    assert [hyper.segment(step - 1) for step in starts[1:]] == [0, 1]


def test_carry_into_shifts_a_new_segment_by_what_the_previous_one_learned():
    hyper = _hyper()
    hyper.load_values({"lr/a/1": 0.2})
    with torch.no_grad():
        hyper.log_lr[0] += torch.tensor([math.log(0.5), math.log(2.0)], dtype=torch.float64)
    hyper.carry_into(10)  # not a segment's first step: nothing moves
    assert hyper.values()["lr/a/1"] == pytest.approx(0.2)
    for _ in range(2):  # again after the divergence guard undid the segment's first window: the same result
        hyper.carry_into(25)
        values = hyper.values()
        assert values["lr/a/1"] == pytest.approx(0.1) and values["lr/b/1"] == pytest.approx(0.2)
    assert values["lr/a/2"] == pytest.approx(0.1)  # later segments wait for their own start


def test_carry_into_keeps_the_new_segment_inside_the_bounds():
    hyper = _hyper()
    with torch.no_grad():
        hyper.log_lr[0] += math.log(50.0)
    hyper.project()
    hyper.carry_into(25)
    assert hyper.values()["lr/a/1"] == pytest.approx(1.0)


def test_a_search_range_is_where_hypergradients_may_move_the_value_unless_bounds_say_otherwise(small_digits):
    assert hypermeta.WeightDecay(init=(1e-9, 1e-2)).bounds == (1e-9, 1e-2)
    assert hypermeta.LearningRate(init=0.1).bounds == (1e-6, 10.0)
    assert hypermeta.LearningRate(init=(1e-3, 1.0), bounds=(1e-4, 5.0)).bounds == (1e-4, 5.0)
    # a trial's chosen start keeps the range as its bounds: the values never leave it
    spec = dataclasses.replace(hypermeta.LearningRate(init=(0.15, 0.2)), init=0.2)
    result = hypermeta.train(
        torch.nn.Linear(64, 10), data=small_digits, steps=200, batch_size=16, learning_rate=spec,
        hypergradient=hypermeta.Hypergradient(horizon=5),
    )
    values = result.trajectory["value"]
    assert values.between(0.15 * (1 - 1e-6), 0.2 * (1 + 1e-6)).all() and values.nunique() > 1


def test_keep_other_segments_restores_every_segment_but_the_given_one():
    hyper = _hyper()
    saved = hyper.state()
    with torch.no_grad():
        hyper.log_lr += 1.0
        hyper.log_weight_decay += 1.0
    hyper.keep_other_segments(saved, 2)
    values = hyper.values()
    assert values["lr/a/2"] == pytest.approx(0.1 * math.e) and values["lr/b/0"] == pytest.approx(0.1)
    assert values["weight_decay/all"] == pytest.approx(1e-3 * math.e)


@pytest.mark.parametrize(
    ("values", "message"), [({"lr/c/0": 0.1}, "no hyperparameter 'lr/c/0'"), ({"lr/a/0": 5.0}, "outside its bounds")]
)
def test_load_values_rejects_unknown_keys_and_values_out_of_bounds(values, message):
    with pytest.raises(ValueError, match=message):
        _hyper().load_values(values)


def test_a_search_range_must_lie_inside_the_bounds_and_cannot_be_trained_directly():
    assert hypermeta.LearningRate(init=(1e-3, 1.0)).init == (1e-3, 1.0)
    with pytest.raises(ValueError, match="inside its bounds"):
        hypermeta.WeightDecay(init=(1e-9, 1e-2), bounds=(1e-8, 1.0))
    with pytest.raises(ValueError, match="search range"):
        HyperParameters(
            learning_rate=hypermeta.LearningRate(init=(1e-3, 1.0)), weight_decay=None, group_names=["a"],
            total_steps=10, dtype=torch.float32, device=torch.device("cpu"),
        )

import pytest
import torch
from sklearn.metrics import f1_score

from hypermeta._metrics import f1


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("classes", [2, 3, 10])
def test_f1_is_scikit_learns(seed, classes):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (40,), generator=generator)
    predicted = torch.randint(0, classes - (seed % 2), (40,), generator=generator)  # some seeds never guess a class
    predicted[:5] = targets[:5]
    for average in ("macro", "binary") if classes == 2 else ("macro",):
        want = f1_score(targets.numpy(), predicted.numpy(), average=average, zero_division=0)
        assert f1(targets, predicted, average=average) == pytest.approx(want, abs=1e-12)


def test_binary_f1_without_any_class_1_is_zero():
    zeros = torch.zeros(6, dtype=torch.long)
    assert f1(zeros, zeros, average="binary") == f1_score(zeros.numpy(), zeros.numpy(), zero_division=0) == 0.0

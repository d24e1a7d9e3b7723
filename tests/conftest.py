import pytest
import torch

import hypermeta

# The test models are tiny: one thread is faster, and two test processes do not fight over cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> hypermeta.Dataset:
    return hypermeta.datasets.digits()


@pytest.fixture(scope="session")
def small_digits(digits) -> hypermeta.Dataset:
    """A float64 slice of digits, small enough for finite differences."""

    def head(split, n):
        return hypermeta.Split(split.x[:n].double(), split.y[:n])

    return hypermeta.Dataset(
        train=head(digits.train, 96), valid=head(digits.valid, 64), test=head(digits.test, 64)
    )


def mlp(*, hidden: int = 16, seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))
    return model.to(dtype)

"""Metrics of a model on one split: the loss, accuracy and F1 where they apply, and the user's own."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from hypermeta._data import Split, split_batches, to_run

Metric = Callable[[torch.Tensor, torch.Tensor], float]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: Split | Iterable,
    loss_fn: Callable[..., torch.Tensor],
    metrics: dict[str, Metric] | None = None,
) -> dict[str, float]:
    """Loss on ``split`` (a :class:`Split` or a loader of batches), the model in eval mode.

    Classification adds accuracy and F1: integer targets with one output column per class give
    ``accuracy`` and ``macro_f1``; one output column (a logit) with 0/1 targets gives ``accuracy``
    and ``f1`` of class 1. ``metrics`` maps names to ``fn(outputs, targets) -> float`` computed
    on the whole split. The model's train/eval mode is restored afterwards.

    Example:
        >>> import torch, hypermeta
        >>> split = hypermeta.Split(torch.eye(2), torch.tensor([0, 1]))
        >>> hypermeta.evaluate(torch.nn.Identity(), split, torch.nn.functional.cross_entropy)["accuracy"]
        1.0
    """
    was_training = model.training
    model.eval()
    try:
        output, targets = _outputs(model, split)
        results = {"loss": float(loss_fn(output, targets))}
        results.update(classification_metrics(output, targets))
        for name, metric in (metrics or {}).items():
            results[name] = float(metric(output, targets))
    finally:
        model.train(was_training)
    return results


def _outputs(model: torch.nn.Module, split) -> tuple[torch.Tensor, torch.Tensor]:
    parameter = next(model.parameters(), None)
    outputs, targets = [], []
    for x, y in split_batches(split):
        if parameter is not None:
            x, y = to_run(x, parameter.device, parameter.dtype), to_run(y, parameter.device, parameter.dtype)
        outputs.append(model(x))
        targets.append(y)
    if not outputs:
        raise ValueError("the evaluation data yielded no batches")
    return torch.cat(outputs), torch.cat(targets)


def classification_metrics(output: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy and F1 when ``output`` and ``targets`` are a classification's; nothing otherwise."""
    if output.ndim == 2 and output.shape[1] > 1 and targets.ndim == 1 and not targets.is_floating_point():
        predicted, average, name = output.argmax(dim=-1), "macro", "macro_f1"
    elif output.shape[1:] in ((), (1,)) and output.numel() == targets.numel() and _zeros_and_ones(targets):
        predicted, average, name = (output.flatten() > 0).long(), "binary", "f1"
        targets = targets.flatten().long()
    else:
        return {}
    return {"accuracy": float((predicted == targets).double().mean()), name: f1(targets, predicted, average=average)}


def f1(targets: torch.Tensor, predicted: torch.Tensor, *, average: str) -> float:
    """F1 of class 1 (``"binary"``) or the mean F1 over the classes in ``targets`` or ``predicted``
    (``"macro"``), 0 where a class has neither; scikit-learn's ``f1_score`` with ``zero_division=0``,
    from one confusion matrix (scikit-learn's checks cost more than a small model's evaluation)."""
    targets, predicted = targets.long(), predicted.long()
    classes = int(max(targets.max(), predicted.max())) + 1
    confusion = torch.bincount(targets * classes + predicted, minlength=classes * classes).view(classes, classes)
    hits, seen, guessed = confusion.diagonal(), confusion.sum(dim=1), confusion.sum(dim=0)
    scores = 2 * hits.double() / (seen + guessed).clamp_min(1)
    if average == "binary":
        return float(scores[1]) if classes > 1 else 0.0
    return float(scores[(seen + guessed) > 0].mean())


def _zeros_and_ones(targets: torch.Tensor) -> bool:
    return bool(((targets == 0) | (targets == 1)).all())


def fit_problem(model: torch.nn.Module, batch, loss_fn: Callable[..., torch.Tensor], where: str) -> str | None:
    """Why ``model``'s output on ``batch`` and its targets do not fit ``loss_fn``, or ``None``.

    The model runs in eval mode without gradients, so nothing of it changes (BatchNorm's running
    statistics included). A loss that warns (``mse_loss`` broadcasting ``(n, 1)`` against ``(n,)``)
    counts as a misfit.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _misfit(model, batch, loss_fn, where)
    finally:
        model.train(was_training)


def _misfit(model, batch, loss_fn, where: str) -> str | None:
    x, y = batch
    try:
        output = model(x)
    except Exception as error:  # noqa: BLE001 -- any failure of the user's model is reported in one line
        return f"the model failed on a {where} batch of inputs {_shape(x)}: {_first_line(error)}"
    fit = f"the model's output {_shape(output)} and the {where} targets {_shape(y)}"
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = loss_fn(output, y)
    except Exception as error:  # noqa: BLE001
        return f"{fit} do not fit the loss {name}: {_first_line(error)}"
    if not torch.is_tensor(loss) or loss.numel() != 1:
        got = _shape(loss) if torch.is_tensor(loss) else type(loss).__name__
        return f"the loss {name} returned {got} on {fit}, not a scalar; reduce it to a mean"
    return None


def _shape(tensor) -> str:
    if not torch.is_tensor(tensor):
        return type(tensor).__name__
    dtype = str(tensor.dtype).removeprefix("torch.")
    return f"{tuple(tensor.shape)} {dtype}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__

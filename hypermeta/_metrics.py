"""Metrics of a model on one split."""

from __future__ import annotations

from collections.abc import Callable

import torch
from sklearn.metrics import f1_score

from hypermeta._data import Split


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, split: Split, loss_fn: Callable[..., torch.Tensor]
) -> dict[str, float]:
    """Loss on ``split``; for integer targets also accuracy and macro-F1.

    Example:
        >>> import torch, hypermeta
        >>> split = hypermeta.Split(torch.eye(2), torch.tensor([0, 1]))
        >>> hypermeta.evaluate(torch.nn.Identity(), split, torch.nn.functional.cross_entropy)["accuracy"]
        1.0
    """
    output = model(split.x)
    metrics = {"loss": float(loss_fn(output, split.y))}
    if not split.y.is_floating_point():
        predicted = output.argmax(dim=-1)
        metrics["accuracy"] = float((predicted == split.y).double().mean())
        metrics["macro_f1"] = float(
            f1_score(split.y.cpu().numpy(), predicted.cpu().numpy(), average="macro", zero_division=0)
        )
    return metrics

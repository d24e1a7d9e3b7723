"""The record format: what a stored trial holds, under which names.

The runner writes trials with these names and the readers (:mod:`hypermeta._results`,
:mod:`hypermeta.reports`) read them with the same names, so a reader needs no training code.
This module imports nothing from the engine, the runner or the study definition.

A trial stores two artifact files and a few user attributes:

- :data:`TRAJECTORY_FILE`: one row per hyperparameter per hyper-step, columns :data:`TRAJECTORY_COLUMNS`;
- :data:`EVALUATIONS_FILE`: one row per evaluation on the validation split, a ``step`` column and
  the metrics (:data:`VALID_METRICS`, those the run computed);
- user attributes: :data:`HYPERPARAMETERS` (final values by key), :data:`STEPS`, :data:`SECONDS`,
  :data:`REJECTED_STEPS`, :data:`LAYERS` (see :func:`describe_layers`), :data:`STOP_REASON` and
  :data:`FAIL_REASON` (why a trial did not complete), and ``test_<metric>`` (:data:`TEST_PREFIX`)
  for a completed trial.

Example:
    >>> import torch
    >>> from hypermeta import _records
    >>> _records.TRAJECTORY_FILE, _records.EVALUATIONS_FILE
    ('trajectory.csv', 'evaluations.csv')
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    >>> _records.describe_layers(model)
    {'0': 'Linear(64->128)', '2': 'Linear(128->10)'}
"""

from __future__ import annotations

TRAJECTORY_FILE = "trajectory.csv"
EVALUATIONS_FILE = "evaluations.csv"

TRAJECTORY_COLUMNS = [
    "step", "name", "group", "segment", "value", "hypergradient", "train_loss", "valid_loss",
]
EVALUATION_STEP = "step"
VALID_METRICS = ("valid_loss", "valid_accuracy", "valid_macro_f1", "valid_f1")
SHARED_GROUP = "all"  # the ``group`` of a hyperparameter shared by every layer

HYPERPARAMETERS = "hyperparameters"
STEPS = "steps"
SECONDS = "seconds"
REJECTED_STEPS = "rejected_steps"
LAYERS = "layers"
STOP_REASON = "stop_reason"
FAIL_REASON = "fail_reason"
FINISH = "finish"  # a finishing run's user attribute: {"of": the trial it finishes, "steps", "seconds", "start"}
TEST_PREFIX = "test_"

STUDY_METRIC = "metric"  # study user attribute: the objective, for reports that never read the study file
STUDY_WARM_START = "warm_start"


def trial_reason(trial) -> str | None:
    """Why a stored trial failed or stopped early (its ``fail_reason`` or ``stop_reason``)."""
    reason = trial.user_attrs.get(FAIL_REASON) or trial.user_attrs.get(STOP_REASON)
    if reason is None and trial.state.name == "FAIL":
        return "no reason stored"
    return reason


def describe_layers(model) -> dict[str, str]:
    """Each parameter group of ``model`` (a module owning trainable parameters) -> its type and shape.

    Group names are those of the trajectory (``named_modules`` names, ``"model"`` for the root).
    """
    layers = {}
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            layers[name or "model"] = _describe(module)
    return layers


def layer_label(group: str, layers: dict[str, str]) -> str:
    """``"0 Linear(64->128)"`` for a stored description, else the bare group name (older studies)."""
    description = layers.get(group)
    return f"{group} {description}" if description else group


def _describe(module) -> str:
    kind = type(module).__name__
    shape = {k: getattr(module, k) for k in ("in_features", "out_features", "in_channels", "out_channels",
                                            "kernel_size", "num_features", "normalized_shape",
                                            "num_embeddings", "embedding_dim") if hasattr(module, k)}
    if "in_features" in shape and "out_features" in shape:
        return f"{kind}({shape['in_features']}->{shape['out_features']})"
    if "in_channels" in shape and "out_channels" in shape:
        kernel = shape.get("kernel_size")
        kernel = kernel[0] if isinstance(kernel, tuple) and len(set(kernel)) == 1 else kernel
        return f"{kind}({shape['in_channels']}->{shape['out_channels']}, k={kernel})"
    if "num_embeddings" in shape and "embedding_dim" in shape:
        return f"{kind}({shape['num_embeddings']}->{shape['embedding_dim']})"
    for key in ("num_features", "normalized_shape"):
        if key in shape:
            size = shape[key]
            size = size[0] if isinstance(size, tuple) and len(size) == 1 else size
            return f"{kind}({size})"
    count = sum(p.numel() for p in module.parameters(recurse=False))
    return f"{kind}({count:,} parameters)"

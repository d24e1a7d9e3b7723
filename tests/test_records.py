"""The record format: readers import no training code; layer descriptions."""

import ast
from pathlib import Path

import torch

import hypermeta
from hypermeta import _records

PACKAGE = Path(hypermeta.__file__).parent
READERS = ["hypermeta._results", "hypermeta.reports"]
TRAINING_CODE = {
    "hypermeta._engine", "hypermeta._runner", "hypermeta._study", "hypermeta._episodic", "hypermeta._compare",
    "hypermeta._cli", "hypermeta._hyperparameters", "hypermeta._data", "hypermeta.datasets", "hypermeta.tasks",
    "hypermeta._private.diffopt", "hypermeta._private.greedy", "hypermeta._private.plain",
    "hypermeta._private.unrolled", "hypermeta._private.window", "hypermeta._private.episodes",
}


def _source(module: str) -> Path:
    path = PACKAGE.parent / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(module: str) -> set[str]:
    """The hypermeta modules ``module`` imports (``from hypermeta import x`` counts x when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(_source(module).read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _source(f"{node.module}.{a.name}").exists()}
    return {name for name in found if name.startswith("hypermeta.") and _source(name).exists()}


def _closure(modules: list[str]) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _imports(module)
    return seen


def test_the_readers_import_no_engine_runner_or_study_code():
    readers = [*READERS, *(f"hypermeta.reports.{p.stem}" for p in (PACKAGE / "reports").glob("_*.py"))]
    imported = _closure(readers)
    assert "hypermeta._records" in imported and "hypermeta._storage" in imported  # the walk does follow imports
    assert imported & TRAINING_CODE == set()


def test_the_public_columns_are_the_records():
    assert hypermeta.TRAJECTORY_COLUMNS is _records.TRAJECTORY_COLUMNS


def test_layers_are_described_by_module_path_type_and_shape():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

    model = torch.nn.Sequential(
        torch.nn.Conv1d(1, 8, kernel_size=5), torch.nn.BatchNorm1d(8), torch.nn.Flatten(),
        torch.nn.LayerNorm(16), Scale(), torch.nn.Embedding(100, 4),
    )
    model[1].requires_grad_(False)  # a frozen layer is no parameter group
    assert _records.describe_layers(model) == {
        "0": "Conv1d(1->8, k=5)", "3": "LayerNorm(16)", "4": "Scale(3 parameters)", "5": "Embedding(100->4)",
    }
    assert _records.describe_layers(torch.nn.Linear(2, 3)) == {"model": "Linear(2->3)"}
    assert _records.layer_label("0", {"0": "Conv1d(1->8, k=5)"}) == "0 Conv1d(1->8, k=5)"
    assert _records.layer_label("0", {}) == "0"

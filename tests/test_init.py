import ast
import subprocess
import sys
from pathlib import Path

import hypermeta


def _names_imported_for_type_checkers() -> set[str]:
    tree = ast.parse(Path(hypermeta.__file__).read_text())
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    return {alias.name for node in block.body for alias in node.names}


def test_every_public_name_resolves_to_what_type_checkers_are_told():
    assert _names_imported_for_type_checkers() == {*hypermeta.__all__, "reports"}
    for name in hypermeta.__all__:
        assert getattr(hypermeta, name) is not None
    from hypermeta._engine import train

    assert hypermeta.train is train


def test_importing_hypermeta_loads_no_heavy_library():
    code = "import sys, hypermeta; print(sorted({'torch', 'optuna', 'pandas'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"

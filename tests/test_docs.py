"""The docs' examples run: every block fenced ```python in README.md and docs/*.md.

Blocks fenced ```py are shown, not run. The blocks of one page run in order in one namespace (like
a notebook), in a temporary working directory where the repository's studies/, benchmarks/ and
docs/ are visible by their relative paths, so an example writes nothing into the checkout.
"""

import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL)
SHARED = ("studies", "benchmarks", "docs")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line of the block's first code line, dedented code) of every ```python block."""
    return [(text.count("\n", 0, m.start("code")) + 1, textwrap.dedent(m["code"])) for m in FENCE.finditer(text)]


def test_blocks_are_found_with_their_line_numbers():
    text = "intro\n```python\nx = 1\n```\n```py\nnot run\n```\n- item\n\n    ```python\n    y = 2\n    ```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (11, "y = 2\n")]
    assert python_blocks((ROOT / "README.md").read_text()), "the README shows a runnable example"


@pytest.mark.parametrize(
    "page", [p for p in PAGES if python_blocks(p.read_text())], ids=lambda p: str(p.relative_to(ROOT))
)
def test_the_python_examples_run(page, tmp_path, monkeypatch):
    for name in SHARED:
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for line, code in python_blocks(page.read_text()):
        # Padding puts a traceback's line numbers on the page's own lines.
        exec(compile("\n" * (line - 1) + code, str(page.relative_to(ROOT)), "exec"), namespace)

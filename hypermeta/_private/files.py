"""Writing a directory of outputs so that nothing is ever half-written."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``out``; on success it replaces ``out``.

    On an error the staging directory is removed and ``out``, if it existed, is left untouched.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = out.with_name(f"{staging.name}-old")
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)

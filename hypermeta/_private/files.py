"""Writing output directories so that nothing is half-written and nothing of the user's is lost."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from hypermeta._errors import UsageError

MARKER = ".hypermeta-report"


def directory_name(study_name: str) -> str:
    """A file-system-safe directory name for a study's report.

    Example:
        >>> from hypermeta.reports import directory_name
        >>> directory_name("digits-mlp"), directory_name("<script>alert(1)</script>"), directory_name("..")
        ('digits-mlp', 'script-alert-1-script', 'study')
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", study_name).strip("-.")
    return name[:80] or "study"


def check_target(target: Path, owner: str) -> None:
    """``target`` may be missing, empty, or an older output of ``owner``: anything else is the user's."""
    if not target.exists():
        return
    if not target.is_dir():
        raise UsageError(f"{target} is a file; give a directory with --out DIR")
    if not any(target.iterdir()):
        return
    marker = target / MARKER
    if not marker.is_file():
        raise UsageError(f"{target} exists and is not a hypermeta report; choose another --out DIR")
    try:
        found = json.loads(marker.read_text(encoding="utf-8"))["study"]
    except (ValueError, KeyError, TypeError):
        found = None
    if found != owner:
        raise UsageError(f"{target} holds the report of another study ({found!r}); choose another --out DIR")


@contextlib.contextmanager
def staged_directory(target: Path, owner: str) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on success it replaces ``target``.

    Call :func:`check_target` first. On an error the staging directory (and any parent this
    created) is removed and ``target``, if it existed, is left untouched. The marker file names
    ``owner``, so a later run may replace this output and nothing else.
    """
    with new_directories(target.parent):
        staging = target.parent / f".{target.name}.partial-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            yield staging
            (staging / MARKER).write_text(json.dumps({"study": owner}), encoding="utf-8")
            _swap_in(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _swap_in(staging: Path, target: Path) -> None:
    """Rename the finished output into place; an older one goes only once the new one is there."""
    if not target.exists():
        staging.rename(target)
        return
    old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def new_directories(directory: Path) -> Iterator[None]:
    """Create ``directory`` and missing parents; remove those created if the block fails."""
    created = []
    for path in [directory, *directory.parents]:
        if path.exists():
            break
        created.append(path)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise

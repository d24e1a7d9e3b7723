"""Where studies live: an Optuna storage URL and a file-system artifact store beside it."""

from __future__ import annotations

import random
import re
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from optuna.artifacts import FileSystemArtifactStore

from hypermeta._errors import UsageError

DEFAULT_DIRECTORY = ".hypermeta"
DEFAULT_DATABASE = "hypermeta.db"
SQLITE_TIMEOUT_S = 60
CREATE_ATTEMPTS = 20
HEARTBEAT_INTERVAL_S = 5
GRACE_PERIOD_S = 15


def _heartbeat() -> dict:
    """A worker that dies (SIGKILL, power loss) stops beating; after the grace period the next trial any
    worker starts marks its trial FAIL, and the callback queues a copy of it to be run again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    return {"heartbeat_interval": HEARTBEAT_INTERVAL_S, "grace_period": GRACE_PERIOD_S,
            "heartbeat_stale_trial_callback": retry}


def default_url() -> str:
    """``sqlite:///<project>/.hypermeta/hypermeta.db``, the project being the working directory."""
    return f"sqlite:///{Path.cwd() / DEFAULT_DIRECTORY / DEFAULT_DATABASE}"


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs, errors and reports."""
    return re.sub(r"(://[^/:@]*:)[^/]*@", r"\1***@", url)  # up to the last @: a password may hold one


def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///"))


def open_storage(url: str | None, *, create: bool, heartbeat: bool = False) -> optuna.storages.BaseStorage:
    """The storage behind ``url`` (default: the project's SQLite file).

    With ``create=False`` a missing SQLite file is an error instead of a new empty database, so
    that reading commands never write.
    """
    url = url or default_url()
    path = sqlite_path(url)
    if path is not None:
        if path.exists() and path.is_dir():
            raise UsageError(f"storage {redact(url)} is a directory; give a database file")
        if not path.exists():
            if not create:
                raise UsageError(
                    f"no study storage at {path}: run `hypermeta run STUDY_FILE` first or pass --storage URL"
                )
            if url == default_url():
                path.parent.mkdir(parents=True, exist_ok=True)
            elif not path.parent.is_dir():
                raise UsageError(f"storage {redact(url)}: directory {path.parent} does not exist; create it")
    if urlsplit(url).scheme == "" or "://" not in url:
        raise UsageError(f"storage {url!r} is not a URL; use e.g. sqlite:///path/to/file.db")
    try:
        return _rdb_storage(url, sqlite=path is not None, heartbeat=heartbeat)
    except ImportError:
        raise UsageError(
            f"storage {redact(url)}: no database driver for it is installed (e.g. pip install psycopg2-binary)"
        ) from None
    except Exception as error:  # SQLAlchemy reports bad URLs and unreachable servers many ways
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"cannot open storage {redact(url)}: {redact(first_line)}; check the URL") from None


def _rdb_storage(url: str, *, sqlite: bool, heartbeat: bool) -> optuna.storages.RDBStorage:
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite else None
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, **(_heartbeat() if heartbeat else {})
                )
        except Exception as error:
            if attempt == CREATE_ATTEMPTS - 1 or not _lost_creation_race(error):
                raise
            time.sleep(random.uniform(0.05, 0.5))
    raise AssertionError("unreachable")


def _lost_creation_race(error: Exception) -> bool:
    """Whether another worker created the same new database's tables at the same moment.

    Optuna creates its tables and version rows without a lock, so workers started together on a
    new database collide ("table ... already exists", a duplicate version row); the tables are
    complete a moment later, and opening again succeeds.
    """
    message = str(error).lower()
    return any(sign in message for sign in ("already exists", "unique constraint", "duplicate key"))


def artifact_directory(url: str | None, artifacts: str | None) -> Path:
    """``artifacts`` if given, else ``artifacts/`` beside the SQLite file, else under the project."""
    if artifacts is not None:
        directory = Path(artifacts)
    else:
        path = sqlite_path(url or default_url())
        directory = (path.parent if path else Path.cwd() / DEFAULT_DIRECTORY) / "artifacts"
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"artifact store {directory}: {existing} is a file, not a directory; pass --artifacts DIR")
    return directory


def artifact_store(url: str | None, artifacts: str | None, *, create: bool) -> FileSystemArtifactStore:
    """The file-system artifact store at :func:`artifact_directory`."""
    directory = artifact_directory(url, artifacts)
    if create:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(
                f"cannot create artifact store {directory}: {error.strerror}; pass --artifacts DIR"
            ) from None
    elif not directory.is_dir():
        raise UsageError(f"no artifact store at {directory}: pass --artifacts DIR where the trajectories are")
    return FileSystemArtifactStore(str(directory))


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    names = [s.study_name for s in storage.get_all_studies()]
    if name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise UsageError(f"no study named {name!r} in this storage (studies: {known}); check the name")
    return optuna.load_study(study_name=name, storage=storage)

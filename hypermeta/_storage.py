"""Where studies live: an Optuna storage URL and a file-system artifact store beside it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import mimetypes
import random
import re
import tempfile
import threading
import time
import uuid
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX, ArtifactMeta
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState

from hypermeta._errors import RunError, UsageError
from hypermeta._records import FAIL_REASON, STOP_REASON

DEFAULT_DIRECTORY = ".hypermeta"
DEFAULT_DATABASE = "hypermeta.db"
SQLITE_TIMEOUT_S = 60
CREATE_ATTEMPTS = 20
HEARTBEAT_INTERVAL_S = 5
GRACE_PERIOD_S = 15
OUTAGE_S = 60  # how long a worker keeps retrying a storage it cannot reach
DRIVERS = {  # module SQLAlchemy imports -> what to install for it
    "psycopg": "pip install 'hypermeta[postgres]' (psycopg 3, for postgresql:// and postgresql+psycopg://)",
    "psycopg2": "pip install psycopg2-binary (for postgresql+psycopg2://), or write postgresql:// for psycopg 3",
}


def _heartbeat() -> dict:
    """A worker that dies (SIGKILL, power loss) stops beating; after the grace period the next trial any
    worker starts marks its trial FAIL, and the callback queues a copy of it to be run again."""
    return {"heartbeat_interval": HEARTBEAT_INTERVAL_S, "grace_period": GRACE_PERIOD_S,
            "heartbeat_stale_trial_callback": _retry_stale_trial}


def _retry_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a copy of a stale trial (at most 3 times), without the reason it failed or its artifact records."""
    trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in (FAIL_REASON, STOP_REASON)}
    trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith(ARTIFACTS_ATTR_PREFIX)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)(study, trial)


def default_url() -> str:
    """``sqlite:///<project>/.hypermeta/hypermeta.db``, the project being the working directory."""
    return f"sqlite:///{Path.cwd() / DEFAULT_DIRECTORY / DEFAULT_DATABASE}"


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs, errors and reports.

    The password may hold ``/``, ``:`` or a raw ``@`` (everything up to the last ``@`` before the
    query is user and password), or come as a ``password=`` query parameter.

    Example:
        >>> redact("postgresql://me:pa/ss@w@rd@db.example:5432/studies?password=x&sslmode=require")
        'postgresql://me:***@db.example:5432/studies?password=***&sslmode=require'
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    location, question, query = rest.partition("?")
    at = location.rfind("@")
    user, colon, _ = location[: max(at, 0)].partition(":")
    if not location.startswith("/") and at >= 0 and colon:
        location = f"{user}:***{location[at:]}"
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", query)
    return f"{scheme}://{location}{question}{query}"


def redact_text(text: str, url: str) -> str:
    """``text`` (a driver's message, say) with the URL and every form of its password hidden."""
    text = text.replace(url, redact(url))
    for secret in sorted(_passwords(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _passwords(url: str) -> set[str]:
    _, _, rest = url.partition("://")
    location, _, query = rest.partition("?")
    at = location.rfind("@")
    found = {location[: max(at, 0)].partition(":")[2]} if not location.startswith("/") else set()
    found |= {value for key, value in parse_qsl(query, keep_blank_values=True) if key == "password"}
    found |= {unquote(secret) for secret in found}
    return {secret for secret in found if secret}


def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path(url.removeprefix("sqlite:///"))


def open_storage(url: str | None, *, create: bool, heartbeat: bool = False) -> optuna.storages.BaseStorage:
    """The storage behind ``url`` (default: the project's SQLite file).

    With ``create=False`` a missing SQLite file is an error instead of a new empty database, so
    that reading commands never write. Calls that find the database unreachable are retried for
    up to ``OUTAGE_S`` seconds (see :class:`_PatientRDBStorage`).
    """
    url = url or default_url()
    check_url(url, create=create)
    if create and url == default_url():
        sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
    try:
        return _rdb_storage(url, sqlite=sqlite_path(url) is not None, heartbeat=heartbeat)
    except ImportError as error:
        missing = error.__cause__ or error  # Optuna wraps the driver's ImportError
        advice = DRIVERS.get(getattr(missing, "name", None) or "", "install the database driver the URL names")
        raise UsageError(f"storage {redact(url)}: no database driver ({describe(missing)}); {advice}") from None
    except Exception as error:  # SQLAlchemy reports bad URLs and unreachable servers many ways
        problem = redact_text(describe(error), url)
        raise UsageError(f"cannot open storage {redact(url)}: {problem}; check the URL") from None


def check_url(url: str, *, create: bool) -> None:
    """The checks of :func:`open_storage` that need no connection, and write nothing."""
    path = sqlite_path(url)
    if path is not None:
        if path.exists() and path.is_dir():
            raise UsageError(f"storage {redact(url)} is a directory; give a database file")
        if not path.exists():
            if not create:
                raise UsageError(
                    f"no study storage at {path}: run `hypermeta run STUDY_FILE` first or pass --storage URL"
                )
            if url != default_url() and not path.parent.is_dir():
                raise UsageError(f"storage {redact(url)}: directory {path.parent} does not exist; create it")
    if "://" not in url or not _scheme(url):
        shown = redact(f"x://{url}")[4:]  # a password may be there even without a scheme
        raise UsageError(f"storage {shown!r} is not a URL; use e.g. sqlite:///path/to/file.db")
    location = url.partition("://")[2].partition("?")[0]
    if not location.startswith("/") and location.count("@") > 1 or "/" in location[: max(location.rfind("@"), 0)]:
        raise UsageError(
            f"storage {redact(url)}: the user name or password holds a raw '@' or '/', which the driver would"
            " misread; write them percent-encoded (@ as %40, / as %2F)"
        )


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme
    except ValueError:  # e.g. an unbalanced [ in a password
        return url.partition("://")[0]


def _rdb_storage(url: str, *, sqlite: bool, heartbeat: bool) -> optuna.storages.RDBStorage:
    # pre_ping: a connection the server dropped (a restart) is replaced instead of failing a call
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite else {"pool_pre_ping": True}
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return _PatientRDBStorage(url, engine_kwargs=engine_kwargs, **(_heartbeat() if heartbeat else {}))
        except Exception as error:
            if attempt == CREATE_ATTEMPTS - 1 or not _lost_creation_race(error):
                raise
            time.sleep(random.uniform(0.05, 0.5))
    raise AssertionError("unreachable")


class _PatientRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage that waits out a storage outage, and sees trials that never beat.

    A call that cannot reach the database (a server restart, a network cut) is retried with
    backoff until the outage has lasted ``OUTAGE_S`` seconds, then ends the run with
    :class:`~hypermeta._errors.RunError` naming the storage. Calls of all threads share the
    outage's start, so that once one has given up the others do not wait again.
    """

    def __init__(self, url: str, **kwargs) -> None:
        self._url, self._outage_since, self._lock = url, None, threading.Lock()
        super().__init__(url, **kwargs)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = self._patiently(optuna.storages.RDBStorage._get_stale_trial_ids, study_id)
        self._note(stale, f"worker stopped beating for over {GRACE_PERIOD_S} s (killed, paused or cut off)")
        lost = self._patiently(_PatientRDBStorage._trials_without_heartbeat, study_id)
        self._note(lost, "worker lost before its first heartbeat")
        return stale + lost

    def _note(self, trial_ids: list[int], reason: str) -> None:
        for trial_id in trial_ids:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another worker was quicker
                self.set_trial_user_attr(trial_id, FAIL_REASON, reason)

    def _trials_without_heartbeat(self, study_id: int) -> list[int]:
        """Running trials with no heartbeat at all, started more than the grace period ago.

        Optuna's stale check skips them; a worker killed between creating its trial and its first
        heartbeat leaves one, which would otherwise stay RUNNING for ever.
        """
        grace = timedelta(seconds=self.grace_period or 2 * self.heartbeat_interval)
        started_before = datetime.now(timezone.utc).replace(tzinfo=None) - grace  # stored as naive UTC
        with _create_scoped_session(self.scoped_session) as session:
            trials = (
                session.query(models.TrialModel.trial_id)
                .filter(models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.RUNNING)
                .filter(models.TrialModel._datetime_start_utc < started_before)
                .filter(~models.TrialModel.heartbeats.any())
                .all()
            )
        return [trial_id for (trial_id,) in trials]

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self._patiently(optuna.storages.RDBStorage.record_heartbeat, trial_id)
        except RunError:
            pass  # the heartbeat thread must not print a traceback: the next call of the run reports it

    def _patiently(self, method, *args, **kwargs):
        delay = 0.25
        while True:
            try:
                result = method(self, *args, **kwargs)
            except Exception as error:
                if not _connection_lost(error):
                    raise
                with self._lock:
                    self._outage_since = self._outage_since or time.monotonic()
                    waited = time.monotonic() - self._outage_since
                if waited >= OUTAGE_S:
                    raise RunError(
                        f"storage {redact(self._url)} unreachable for {waited:.0f} s"
                        f" ({redact_text(describe(_root(error)), self._url)}); check the server, then run again"
                    ) from None
                time.sleep(min(delay, OUTAGE_S - waited) * random.uniform(0.8, 1.2))
                delay = min(2 * delay, 4)
                continue
            self._outage_since = None
            return result


def _retrying(name: str):
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def retrying(self, *args, **kwargs):
        return self._patiently(method, *args, **kwargs)

    return retrying


# Optuna's _CachedStorage, in front of every RDBStorage a study uses, calls these private methods
# instead of the public ones: reading a study's trials mid-trial during an outage failed the trial.
_CALLED_BY_THE_CACHE = ("_get_trials", "_get_best_trial_id", "_create_new_trial", "_set_trial_param")

for _name in dir(optuna.storages.RDBStorage):  # every public method may query the database
    public = not _name.startswith("_") or _name in _CALLED_BY_THE_CACHE
    if public and callable(getattr(optuna.storages.RDBStorage, _name)):
        if _name not in _PatientRDBStorage.__dict__:
            setattr(_PatientRDBStorage, _name, _retrying(_name))


def _connection_lost(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it: Optuna wraps SQLAlchemy's errors) is a lost or refused connection."""
    error = _root(error)
    return isinstance(error, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError) or bool(
        getattr(error, "connection_invalidated", False)
    )


def _root(error: BaseException) -> BaseException:
    while isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__ is not None:
        error = error.__cause__
    return error


def describe(error: BaseException) -> str:
    """``Type: first line of the message``, the form every one-line message here uses."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


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
    """The file-system artifact store at :func:`artifact_directory`; see :func:`new_artifact_store` to create it."""
    directory = artifact_directory(url, artifacts)
    if create:
        return new_artifact_store(url, artifacts)[0]
    if not directory.is_dir():
        raise UsageError(f"no artifact store at {directory}: pass --artifacts DIR where the trajectories are")
    return FileSystemArtifactStore(str(directory))


def new_artifact_store(url: str | None, artifacts: str | None) -> tuple[FileSystemArtifactStore, list[Path]]:
    """The artifact store, its directory created if missing and checked writable; and the directories created.

    A store that cannot be written is a usage error before any trial trains: every trial would fail.
    Directories made before the failure are removed again.
    """
    directory = artifact_directory(url, artifacts)
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".hypermeta-probe-"):
            pass
    except OSError as error:
        remove_directories(created)
        raise UsageError(
            f"cannot write to artifact store {directory}: {error.strerror}; pass --artifacts DIR (a writable directory)"
        ) from None
    return FileSystemArtifactStore(str(directory)), created


def remove_directories(created: list[Path]) -> None:
    """Remove directories :func:`new_artifact_store` made (deepest first), if they are still empty."""
    for directory in created:
        with contextlib.suppress(OSError):
            directory.rmdir()


def upload(store: FileSystemArtifactStore, trial: optuna.Trial, path: Path) -> None:
    """Optuna's ``upload_artifact`` in the other order: the file first, then its record.

    So a file that cannot be written leaves no record pointing at nothing, and a record that cannot
    be written leaves no file behind.
    """
    artifact_id = str(uuid.uuid4())
    mimetype, encoding = mimetypes.guess_type(path.name)
    meta = ArtifactMeta(artifact_id=artifact_id, filename=path.name, mimetype=mimetype or "application/octet-stream",
                        encoding=encoding)
    try:
        with path.open("rb") as file:
            store.write(artifact_id, file)
        trial.storage.set_trial_system_attr(trial._trial_id, ARTIFACTS_ATTR_PREFIX + artifact_id,
                                            json.dumps(dataclasses.asdict(meta)))
    except BaseException:
        with contextlib.suppress(Exception):
            store.remove(artifact_id)
        raise


class MissingArtifactsWarning(UserWarning):
    """Stored trials whose artifact files are not in the artifact store."""


def has_artifacts(trial: optuna.trial.FrozenTrial) -> bool:
    return any(key.startswith(ARTIFACTS_ATTR_PREFIX) for key in trial.system_attrs)


def lacks_artifact_files(trial: optuna.trial.FrozenTrial, directory: Path) -> bool:
    """Whether a file ``trial`` recorded is not in the file-system artifact store at ``directory``."""
    keys = [key for key in trial.system_attrs if key.startswith(ARTIFACTS_ATTR_PREFIX)]
    return any(not (directory / key.removeprefix(ARTIFACTS_ATTR_PREFIX)).is_file() for key in keys)


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    names = [s.study_name for s in storage.get_all_studies()]
    if name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise UsageError(f"no study named {name!r} in this storage (studies: {known}); check the name")
    return optuna.load_study(study_name=name, storage=storage)

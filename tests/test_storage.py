"""Storage URLs and the artifact store, on real SQLite files in tmp_path."""

import threading
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import PostgresServer
from optuna.trial import TrialState

from hypermeta import _storage
from hypermeta._errors import RunError, UsageError


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_default_storage_and_artifacts_live_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _storage.default_url() == f"sqlite:///{tmp_path / '.hypermeta' / 'hypermeta.db'}"
    storage = _storage.open_storage(None, create=True)
    optuna.create_study(storage=storage, study_name="s")
    assert (tmp_path / ".hypermeta" / "hypermeta.db").is_file()
    store = _storage.artifact_store(None, None, create=True)
    assert Path(store._base_path) == tmp_path / ".hypermeta" / "artifacts"
    assert (tmp_path / ".hypermeta" / "artifacts").is_dir()
    assert [s.study_name for s in optuna.get_all_study_summaries(_storage.default_url())] == ["s"]


def test_artifacts_default_beside_the_sqlite_file_or_where_given(tmp_path):
    url = f"sqlite:///{tmp_path / 'db' / 'x.db'}"
    assert _storage.artifact_directory(url, None) == tmp_path / "db" / "artifacts"
    assert _storage.artifact_directory(url, str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"


@pytest.mark.parametrize("command_creates", [False, True])
def test_reading_a_missing_sqlite_file_creates_nothing(tmp_path, monkeypatch, command_creates):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'missing.db'}"
    if command_creates:
        _storage.open_storage(url, create=True)
        assert (tmp_path / "missing.db").is_file()
        return
    for target in (url, None):  # an explicit file and the default one
        with pytest.raises(UsageError, match="no study storage at .*hypermeta run"):
            _storage.open_storage(target, create=False)
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("foo://x", "cannot open storage foo://x"),
        ("not-a-url", "is not a URL"),
        ("sqlite:///{tmp}/no/such/dir/x.db", "does not exist; create it|no study storage at"),
        ("sqlite:///{tmp}", "is a directory"),
    ],
)
def test_bad_urls_are_usage_errors_and_write_nothing(tmp_path, monkeypatch, url, problem):
    monkeypatch.chdir(tmp_path)
    for create in (True, False):
        with pytest.raises(UsageError, match=problem):
            _storage.open_storage(url.format(tmp=tmp_path), create=create)
    assert _files(tmp_path) == []


def test_unreachable_server_error_hides_the_password(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as error:
        _storage.open_storage("postgresql://user:secret@127.0.0.1:1/db", create=True)
    message = str(error.value)
    assert "secret" not in message and "user:***@127.0.0.1:1/db" in message
    assert _files(tmp_path) == []


def test_a_file_that_is_not_a_database_is_left_alone(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("not sqlite\n" * 100)
    with pytest.raises(UsageError, match="cannot open storage"):
        _storage.open_storage(f"sqlite:///{path}", create=True)
    assert path.read_text() == "not sqlite\n" * 100


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://user:secret@host:5432/db", "postgresql://user:***@host:5432/db"),
        ("postgresql://user:s@cr@t@host/db", "postgresql://user:***@host/db"),
        ("mysql+pymysql://root:pw@localhost/optuna", "mysql+pymysql://root:***@localhost/optuna"),
        ("postgresql://user@host:5432/db", "postgresql://user@host:5432/db"),
        ("postgresql://host:5432/db?x=a@b", "postgresql://host:5432/db?x=a@b"),
        ("sqlite:////tmp/a:b@c.db", "sqlite:////tmp/a:b@c.db"),
        ("postgresql://user:pa/ss@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:a/b@c:d@host:5432/db", "postgresql://user:***@host:5432/db"),
        ("postgresql://user@host/db?password=SECRET", "postgresql://user@host/db?password=***"),
        ("postgresql://host/db?sslmode=require&password=SECRET&x=1", "postgresql://host/db?sslmode=require&password=***&x=1"),
        ("postgresql://user:pa%2Fss@host/db", "postgresql://user:***@host/db"),
    ],
)
def test_redact(url, expected):
    assert _storage.redact(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user:SECRET@127.0.0.1:1/db",
        "postgresql+psycopg2://user:SEC/RET@127.0.0.1:1/db",
        "postgresql://user:SE@CR@T@127.0.0.1:1/db",
        "postgresql://user@127.0.0.1:1/db?password=SECRET",
        "postgresql+psycopg2://user@127.0.0.1:1/db?password=SECRET",
        "postgresql://user:SE%2FCRET@127.0.0.1:1/db",
        "postgresql://user:SE[CRET@127.0.0.1:1/db",
        "user:SECRET@127.0.0.1/db",
        "postgresql+pg8000://user:SECRET@127.0.0.1:1/db",
    ],
)
def test_no_password_in_any_error(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    for create in (True, False):
        with pytest.raises(UsageError) as error:
            _storage.open_storage(url, create=create)
        message = str(error.value)
        assert "SECRET" not in message and "SE/CRET" not in message and "CR@T" not in message, message
        assert "SE%2FCRET" not in message and "SE[CRET" not in message, message
        assert len(message.splitlines()) == 1
    assert _files(tmp_path) == []


def test_a_missing_driver_names_what_to_install(tmp_path):
    missing = r"no database driver \(ModuleNotFoundError: No module named 'pg8000'\); install the database"
    with pytest.raises(UsageError, match=missing):
        _storage.open_storage("postgresql+pg8000://user:SECRET@127.0.0.1:1/db", create=True)


@pytest.mark.parametrize("driver", ["", "+psycopg", "+psycopg2"])
def test_every_postgresql_url_form_opens_with_the_postgres_extra(postgres_server, request, driver):
    pytest.importorskip("psycopg2" if driver == "+psycopg2" else "psycopg", reason="pip install -e '.[dev]'")
    url = postgres_server.new_database(request.node.name, driver=driver)
    storage = _storage.open_storage(url, create=True)
    optuna.create_study(storage=storage, study_name="s")
    assert [s.study_name for s in _storage.open_storage(url, create=False).get_all_studies()] == ["s"]


# --- an outage of the storage ----------------------------------------------------------------------


def test_a_call_during_a_server_restart_waits_for_the_server(postgres_server, postgres_url):
    storage = _storage.open_storage(postgres_url, create=True)
    optuna.create_study(storage=storage, study_name="s")
    postgres_server.stop()
    restart = threading.Timer(2, postgres_server.start)
    restart.start()
    try:
        assert [s.study_name for s in storage.get_all_studies()] == ["s"]  # waited, then went on
    finally:
        restart.join()


@pytest.mark.filterwarnings("ignore::UserWarning")  # ask() outside optimize, as a test does
def test_a_trial_reading_its_study_during_a_server_restart_waits_for_the_server(postgres_server, postgres_url):
    """Optuna's cache in front of the storage reads trials with private methods of the storage
    (a trial's surplus check reads the study's trials): those wait out an outage too."""
    study = optuna.create_study(storage=_storage.open_storage(postgres_url, create=True), study_name="s")
    study.ask()
    postgres_server.stop()
    restart = threading.Timer(2, postgres_server.start)
    restart.start()
    try:
        assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.RUNNING]
        assert study.ask().number == 1  # a new trial, created through the cache as well
    finally:
        restart.join()


def test_an_outage_longer_than_the_limit_is_one_line_naming_the_storage(postgres_server, postgres_url, monkeypatch):
    storage = _storage.open_storage(postgres_url, create=True)
    monkeypatch.setattr(_storage, "OUTAGE_S", 1.5)
    postgres_server.stop()
    try:
        with pytest.raises(RunError) as error:
            storage.get_all_studies()
    finally:
        postgres_server.start()
    message = str(error.value)
    assert message.startswith(f"storage {_storage.redact(postgres_url)} unreachable for ") and "***@" in message
    assert PostgresServer.PASSWORD not in message and len(message.splitlines()) == 1
    assert storage.get_all_studies() == []  # the same storage works again once the server is back


# --- trials that never beat ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'x.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


@pytest.mark.filterwarnings("ignore::UserWarning")  # ask() and fail_stale_trials outside optimize, as a test does
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_running_trials_without_heartbeat_are_stale_after_the_grace_period_only(url):
    storage = _storage.open_storage(url, create=True, heartbeat=True)
    study = optuna.create_study(storage=storage, study_name="s")
    distributions = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for seconds_ago in (_storage.GRACE_PERIOD_S + 2, 1):
        trial = optuna.trial.create_trial(state=TrialState.RUNNING, params={"x": 0.5}, distributions=distributions)
        trial.datetime_start = datetime.now() - timedelta(seconds=seconds_ago)
        study.add_trial(trial)
    beating = study.ask()
    storage.record_heartbeat(beating._trial_id)
    old, recent, _ = study.trials
    optuna.storages.fail_stale_trials(study)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING, TrialState.WAITING]
    assert trials[0].user_attrs == {"fail_reason": "worker lost before its first heartbeat"}
    assert trials[3].system_attrs["failed_trial"] == old.number and trials[3].user_attrs == {}
    assert trials[3].params == old.params


def test_artifact_store_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    for artifacts in ("afile", "afile/below"):
        with pytest.raises(UsageError, match="is a file, not a directory"):
            _storage.artifact_store(None, str(tmp_path / artifacts), create=True)
    assert _files(tmp_path) == ["afile"]


def test_reading_a_missing_artifact_store_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no artifact store at"):
        _storage.artifact_store(f"sqlite:///{tmp_path / 'x.db'}", None, create=False)
    assert not (tmp_path / "artifacts").exists()


def test_load_study_names_the_known_studies(tmp_path):
    storage = _storage.open_storage(f"sqlite:///{tmp_path / 'x.db'}", create=True)
    optuna.create_study(storage=storage, study_name="alpha")
    optuna.create_study(storage=storage, study_name="beta")
    assert _storage.load_study(storage, "beta").study_name == "beta"
    with pytest.raises(UsageError, match=r"no study named 'gamma' .*\(studies: alpha, beta\)"):
        _storage.load_study(storage, "gamma")
    assert len(storage.get_all_studies()) == 2


class _LosesTheRaceTwice:
    """hypermeta's RDBStorage that fails as a worker losing the table-creation race does, then works.

    A stand-in for the other worker, which cannot be made to collide on cue; the storage after
    the failures is the real one.
    """

    def __init__(self, error: Exception, failures: int) -> None:
        self.error, self.failures, self.calls = error, failures, 0
        self.real = _storage._PatientRDBStorage

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.real(*args, **kwargs)


def _sql_error(message: str) -> Exception:
    return sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version ...", {}, Exception(message))


def test_opening_a_new_database_retries_when_another_worker_created_its_tables_first(tmp_path, monkeypatch):
    fake = _LosesTheRaceTwice(_sql_error("UNIQUE constraint failed: alembic_version.version_num"), failures=2)
    monkeypatch.setattr(_storage, "_PatientRDBStorage", fake)
    storage = _storage.open_storage(f"sqlite:///{tmp_path / 'new.db'}", create=True)
    assert fake.calls == 3 and storage.get_all_studies() == []


def test_other_storage_errors_are_not_retried(tmp_path, monkeypatch):
    fake = _LosesTheRaceTwice(_sql_error("disk I/O error"), failures=2)
    monkeypatch.setattr(_storage, "_PatientRDBStorage", fake)
    with pytest.raises(UsageError, match="disk I/O error"):
        _storage.open_storage(f"sqlite:///{tmp_path / 'new.db'}", create=True)
    assert fake.calls == 1

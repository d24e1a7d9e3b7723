"""Storage URLs and the artifact store, on real SQLite files in tmp_path."""

from pathlib import Path

import optuna
import pytest
import sqlalchemy

from hypermeta import _storage
from hypermeta._errors import UsageError


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
    ],
)
def test_redact(url, expected):
    assert _storage.redact(url) == expected


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

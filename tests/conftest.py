import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

import hypermeta

# The test models are tiny: one thread is faster, and two test processes do not fight over cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> hypermeta.Dataset:
    return hypermeta.datasets.digits()


@pytest.fixture(scope="session")
def small_digits(digits) -> hypermeta.Dataset:
    """A float64 slice of digits, small enough for finite differences."""

    def head(split, n):
        return hypermeta.Split(split.x[:n].double(), split.y[:n])

    return hypermeta.Dataset(
        train=head(digits.train, 96), valid=head(digits.valid, 64), test=head(digits.test, 64)
    )


def pinned(spec):
    """``spec`` whose value cannot move: its bounds are the value and one part in 10^12 above it.

    Hypergradients are still computed, so a run with them must train exactly as the plain run.
    """
    return type(spec)(init=spec.init, scope=spec.scope, bounds=(spec.init, spec.init * (1 + 1e-12)),
                      **({"segments": spec.segments} if isinstance(spec, hypermeta.LearningRate) else {}))


def mlp(*, hidden: int = 16, seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))
    return model.to(dtype)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server of this machine's installation, on a free local port, for this test session.

    Skipped, with the reason printed by ``-ra``, only where PostgreSQL or its Python driver is not installed
    (``.ci/run`` installs both).
    """
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed: pip install -e '.[dev]'")
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    with PostgresServer(binaries) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A new empty database on the session's server; its URL carries a password, which trust auth ignores."""
    return postgres_server.new_database(request.node.name)


def _postgres_binaries() -> Path | None:
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).parent] if on_path else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((c for c in candidates if (c / "initdb").exists() and (c / "pg_ctl").exists()), None)


class PostgresServer:
    USER, PASSWORD = "hypermeta", "s3cret-pw"

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.directory = Path(tempfile.mkdtemp(prefix="hypermeta-postgres-"))
        self.port = _free_port()
        # The server refuses to run as root: run it as the package's own user then.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.count = 0

    def __enter__(self) -> "PostgresServer":
        if self.as_user:
            shutil.chown(self.directory, "postgres")
        self.options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c max_connections=200"
        try:
            self._run("initdb", "-D", str(self.directory / "data"), "-A", "trust", "-U", self.USER)
            self.start()
        except subprocess.CalledProcessError:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def stop(self) -> None:
        """Stop the server at once, dropping every connection (as a crash or a restart does)."""
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-m", "immediate", "stop")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-l", str(self.directory / "server.log"),
                  "-o", self.options, "-w", "start")

    def new_database(self, hint: str, *, driver: str = "+psycopg2") -> str:
        """A new empty database; its URL names ``driver`` ("" for ``postgresql://``, psycopg 3)."""
        import psycopg2

        self.count += 1
        name = f"t{self.count}_" + "".join(c for c in hint.lower() if c.isalnum())[:40]
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.USER, dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        return f"postgresql{driver}://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{name}"

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.binaries / program), *args], check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

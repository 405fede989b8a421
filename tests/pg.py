"""A throwaway PostgreSQL cluster on loopback for integration tests.

The cluster lives in a fresh directory under the system temporary directory (short
enough for PostgreSQL's unix socket path), listens on a free ``127.0.0.1`` port, checks
passwords over TCP (scram-sha-256) and is deleted when stopped. PostgreSQL refuses to
run as root, so under root its commands run as the ``postgres`` system user.

Use it from a module- or session-scoped fixture::

    @pytest.fixture(scope="module")
    def postgres() -> Iterator[PostgresCluster]:
        skip_unless_postgres()
        with running_cluster() as cluster:
            yield cluster
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from procs import free_port

__all__ = [
    "REQUIRE_VARIABLE",
    "PostgresCluster",
    "find_bindir",
    "postgres_required",
    "running_cluster",
    "skip_unless_postgres",
]

# Where Debian/Ubuntu put the server binaries; POSTGRES_BIN_DIR overrides it.
_DEFAULT_BINDIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin")
_SYSTEM_USER = "postgres"
_START_TIMEOUT = 60
#: Set to 1 to make a missing PostgreSQL fail the tests that need it (CI) instead of skipping.
REQUIRE_VARIABLE = "REQUIRE_POSTGRES"


@dataclass(frozen=True)
class PostgresCluster:
    """A running cluster: where it is and how to reach it.

    Attributes
    ----------
    directory : Path
        Temporary directory holding ``data/``, ``server.log`` and the socket.
    bindir : Path
        Directory of ``initdb``, ``pg_ctl`` and ``createdb``.
    port : int
        TCP port on ``127.0.0.1``.
    user, password : str
        Superuser of the cluster and its password (random per cluster).
    run_as : str or None
        System user the server runs as (when this process is root).
    """

    directory: Path
    bindir: Path
    port: int
    user: str
    password: str
    run_as: str | None

    @property
    def data(self) -> Path:
        """The cluster's data directory."""
        return self.directory / "data"

    @property
    def log(self) -> Path:
        """The server's log file."""
        return self.directory / "server.log"

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        """SQLAlchemy URL of ``database`` with this cluster's user and password."""
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its asyncpg URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete the cluster's directory."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop_server()
        shutil.rmtree(self.directory, ignore_errors=True)

    def start_server(self) -> None:
        """Start the server on the cluster's data, port and options; waits until it accepts."""
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} "
            f"-c unix_socket_directories={self.directory} -c fsync=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", str(_START_TIMEOUT), "start",
        )  # fmt: skip

    def stop_server(self) -> None:
        """Stop the server (fast shutdown: open connections are cut), keeping its data."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """Stop and start the server: every client connection is cut, the data stays."""
        self.stop_server()
        self.start_server()

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / program), *args]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        env = {**os.environ, "PGPASSWORD": self.password}
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=_START_TIMEOUT + 30
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise subprocess.CalledProcessError(
                result.returncode, command, result.stdout, result.stderr + log
            )
        return result


def find_bindir() -> Path | None:
    """Directory holding ``initdb`` and ``pg_ctl``, or None when PostgreSQL is absent.

    Looked for in ``POSTGRES_BIN_DIR``, then Debian/Ubuntu's ``/usr/lib/postgresql/15``
    and ``16``, then any other version there (newest first), then ``PATH``.
    """
    installed = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
        reverse=True,
    )
    candidates = [
        os.environ.get("POSTGRES_BIN_DIR", ""),
        *_DEFAULT_BINDIRS,
        *(str(path) for path in installed),
    ]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    return None


def skip_unless_postgres() -> Path:
    """The binaries' directory; skips the calling test when they or a usable user are missing.

    With ``REQUIRE_POSTGRES=1`` in the environment (``.ci/run`` sets it) the test fails
    instead: continuous integration must run the PostgreSQL tests, not skip them.
    """
    bindir = find_bindir()
    if bindir is None:
        _unavailable("PostgreSQL server binaries not found (set POSTGRES_BIN_DIR)")
    if os.geteuid() == 0 and (_system_user() is None or shutil.which("runuser") is None):
        _unavailable("running as root without a 'postgres' user and runuser to start PostgreSQL")
    return bindir


def postgres_required(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``REQUIRE_POSTGRES`` asks for a failure rather than a skip."""
    value = (os.environ if environ is None else environ).get(REQUIRE_VARIABLE, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def _unavailable(reason: str) -> NoReturn:
    if postgres_required():
        pytest.fail(f"{reason}; {REQUIRE_VARIABLE} is set, so PostgreSQL tests may not be skipped")
    pytest.skip(reason)


@contextlib.contextmanager
def running_cluster() -> Iterator[PostgresCluster]:
    """Initialise and start a cluster; stop and delete it on exit."""
    cluster = _start(skip_unless_postgres())
    try:
        yield cluster
    finally:
        cluster.stop()


def _start(bindir: Path) -> PostgresCluster:
    run_as = _system_user() if os.geteuid() == 0 else None
    directory = Path(tempfile.mkdtemp(prefix="astr-pg-"))
    password = secrets.token_urlsafe(16)
    cluster = PostgresCluster(directory, bindir, free_port(), "astr", password, run_as)
    pwfile = directory / "pwfile"
    pwfile.write_text(password + "\n")
    if run_as:
        entry = pwd.getpwnam(run_as)
        for path in (directory, pwfile):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    try:
        cluster._run(
            "initdb",
            "-D",
            str(cluster.data),
            "-U",
            cluster.user,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        cluster.start_server()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _system_user() -> str | None:
    try:
        pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        return None
    return _SYSTEM_USER

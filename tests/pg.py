"""Throwaway PostgreSQL cluster for tests.

:func:`postgres_cluster` runs ``initdb`` in a temporary folder, starts the server on
127.0.0.1 with a free port (its Unix socket in the same folder), creates a database, yields
its SQLAlchemy URL and stops and deletes everything afterwards. PostgreSQL refuses to run
as root, so when the tests run as root the server runs as the ``postgres`` system user.
:func:`postgres_server` does the same but yields a :class:`PostgresServer`, which a test can
stop and start again on the same port to simulate a database outage.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Folders searched for the PostgreSQL server binaries, newest version first.
PG_BIN_CANDIDATES = (
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
)

#: Environment variable naming another folder with initdb, pg_ctl and postgres.
PG_BIN_ENV_VAR = "LIVERNODE_PG_BIN"

SERVICE_USER = "postgres"
DATABASE_NAME = "livernode_test"
START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """Raised when no PostgreSQL server binaries or service user are found."""


def find_pg_bin() -> Path:
    """Return the folder holding ``initdb`` and ``pg_ctl``.

    Raises
    ------
    PostgresUnavailable
        When none of the candidate folders contains them. The message names the
        package to install.
    """
    candidates = [os.environ[PG_BIN_ENV_VAR]] if os.environ.get(PG_BIN_ENV_VAR) else []
    candidates += list(PG_BIN_CANDIDATES)
    for candidate in candidates:
        folder = Path(candidate)
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder

    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in "
        f"{', '.join(PG_BIN_CANDIDATES)} or on PATH: install them with "
        "'apt-get install -y postgresql' or set LIVERNODE_PG_BIN"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """A running throwaway PostgreSQL server that a test may stop and start again.

    Parameters
    ----------
    pg_bin : Path
        Folder holding ``pg_ctl``.
    data_dir : Path
        Cluster folder made by ``initdb``.
    log_file : Path
        Server log.
    options : str
        ``postgres`` options passed with ``pg_ctl -o``; they fix the port, so a restarted
        server is reached at the same URL.
    run_as : list of str
        Command prefix that runs a program as the ``postgres`` user; empty when not root.
    url : str
        SQLAlchemy URL of the test database, set once it exists.
    """

    def __init__(
        self, pg_bin: Path, data_dir: Path, log_file: Path, options: str, run_as: list[str]
    ) -> None:
        self.pg_bin = pg_bin
        self.data_dir = data_dir
        self.log_file = log_file
        self.options = options
        self.run_as = run_as
        self.url = ""
        self.running = False

    def start(self) -> None:
        """Start the server and wait until it accepts connections.

        Raises
        ------
        subprocess.CalledProcessError
            When ``pg_ctl start`` fails; its output is in the exception.
        """
        self._pg_ctl("-l", str(self.log_file), "-o", self.options, "-w", "-t", str(START_TIMEOUT_S), "start")
        self.running = True

    def stop(self) -> None:
        """Stop the server in fast mode, which ends open client connections, and wait for it."""
        self._pg_ctl("-m", "fast", "-w", "stop")
        self.running = False

    def _pg_ctl(self, *arguments: str) -> None:
        subprocess.run(
            [*self.run_as, str(self.pg_bin / "pg_ctl"), "-D", str(self.data_dir), *arguments],
            check=True,
            capture_output=True,
            text=True,
            cwd=self.data_dir.parent,
            timeout=START_TIMEOUT_S,
        )


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """Run a temporary PostgreSQL server and yield a ``postgresql+psycopg2://`` URL.

    Yields
    ------
    str
        URL of an empty database owned by the ``postgres`` superuser, trust authentication,
        listening on 127.0.0.1 only.

    Raises
    ------
    PostgresUnavailable
        When the binaries are missing, or when running as root without a ``postgres`` user.
    subprocess.CalledProcessError
        When initdb, the server start or createdb fails; the output is in the exception.
    """
    with postgres_server() as server:
        yield server.url


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Run a temporary PostgreSQL server and yield it, for tests that stop and restart it.

    Takes the steps of :func:`postgres_cluster` and raises the same exceptions. The server
    is stopped, when still running, and its folder deleted afterwards.
    """
    pg_bin = find_pg_bin()
    run_as = _service_user_prefix()
    base = Path(tempfile.mkdtemp(prefix="livernode-pg-"))
    data_dir = base / "data"
    log_file = base / "server.log"
    port = free_port()

    if run_as:
        user = pwd.getpwnam(SERVICE_USER)
        os.chown(base, user.pw_uid, user.pw_gid)

    def run(*command: str) -> None:
        subprocess.run(
            [*run_as, *command],
            check=True,
            capture_output=True,
            text=True,
            cwd=base,
            timeout=START_TIMEOUT_S,
        )

    server_options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {base} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    server = PostgresServer(pg_bin, data_dir, log_file, server_options, run_as)
    try:
        run(
            str(pg_bin / "initdb"),
            "-D", str(data_dir),
            "-U", "postgres",
            "-A", "trust",
            "-E", "UTF8",
            "--no-sync",
        )
        server.start()
        run(
            str(pg_bin / "createdb"),
            "-h", "127.0.0.1",
            "-p", str(port),
            "-U", "postgres",
            DATABASE_NAME,
        )
        server.url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{DATABASE_NAME}"
        yield server
    finally:
        if server.running:
            try:
                server.stop()
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(base, ignore_errors=True)


def _service_user_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"Running as root but the '{SERVICE_USER}' system user does not exist; PostgreSQL "
            "refuses to run as root. Install the postgresql package, which creates that user."
        ) from None
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", SERVICE_USER, "--"]
    return ["su", SERVICE_USER, "-s", "/bin/sh", "-c", '"$0" "$@"', "--"]

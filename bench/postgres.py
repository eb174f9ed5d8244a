"""A private PostgreSQL cluster for the benchmark and the tests: Debian's server binaries, initdb in a
temporary folder, listening on 127.0.0.1 only (a free port) and on a Unix socket in that folder, never
the system's cluster.

initdb refuses to run as root, so as root the cluster belongs to the `postgres` user (runuser). Logins
over TCP need the password (scram-sha-256), as a real deployment would; fsync stays on.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.procs import LOOPBACK, free_port

DEBIAN_SERVERS = Path("/usr/lib/postgresql")
SUPERUSER = "relay"
PASSWORD = "test spool password"
START_DEADLINE = 60


def server_binaries() -> Path | None:
    """Debian's newest server (/usr/lib/postgresql/N/bin), not whatever pg_ctl is first on PATH."""
    versions = [
        path
        for path in DEBIAN_SERVERS.glob("*/bin")
        if re.fullmatch(r"\d+", path.parent.name) and (path / "initdb").exists()
    ]
    if not versions:
        return None
    return max(versions, key=lambda path: int(path.parent.name))


class PrivateCluster:
    """initdb, then `pg_ctl start`; stop() and start() again keep the data and the port (fault tests)."""

    def __init__(self, binaries: Path) -> None:
        self._binaries = binaries
        self.root = Path(tempfile.mkdtemp(prefix="privacy-relay-postgres-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self._as_owner = ["runuser", "-u", "postgres", "--"]
        password_file = self.root / "initdb-password"
        password_file.write_text(PASSWORD + "\n")
        if self._as_owner:
            shutil.chown(password_file, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            f"--pwfile={password_file}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--no-sync",  # initdb's own files only: the running server fsyncs as usual
            "--encoding=UTF8",
            "--locale=C",
        )
        password_file.unlink()
        self.start()

    @property
    def url(self) -> str:
        """The postgres database, without the password (the relay reads it from spool.password_file)."""
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{name}"

    def _run(self, program: str, *arguments: str) -> str:
        done = subprocess.run(
            [*self._as_owner, str(self._binaries / program), *arguments],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=START_DEADLINE,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def start(self) -> None:
        options = f"-c listen_addresses={LOOPBACK} -p {self.port} -c unix_socket_directories={self.root}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """fast: end the sessions and shut down cleanly; immediate: like a crash (recovery at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL over the Unix socket (no password), as the superuser."""
        return self._run(
            "psql", "-h", str(self.root), "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-XAtqc", sql
        )

    @property
    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def session_id(self) -> int:
        """pg_ctl starts the server in a session of its own; its daemons stay in it."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

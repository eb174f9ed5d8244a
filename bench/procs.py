"""Child processes for the benchmark: free loopback ports, process groups that always die, /proc sampling.

Everything the benchmark starts runs in its own session, so one killpg ends it and its children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_greeting(port: int, timeout: float) -> None:
    """Wait until an SMTP server on the loopback port sends its 220 greeting."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=2) as connection:
                if connection.recv(512).startswith(b"220"):
                    connection.sendall(b"QUIT\r\n")
                    return
        except OSError as exc:
            last_error = exc
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered SMTP on {LOOPBACK}:{port} within {timeout} s ({last_error})")


def start_session(
    argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, stdout: int | None = None
) -> subprocess.Popen[bytes]:
    """A child in a session of its own (its pid is its session and group id), stderr to a log if given."""
    return subprocess.Popen(
        list(argv), env=env, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True
    )


def session_members(session_id: int) -> list[int]:
    """Every live process in the session (zombies excluded): a server and the workers or daemons it started,
    and their descendants that left it (PostgreSQL's backends and daemons each call setsid)."""
    parents: dict[int, int] = {}
    members = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read_stat(int(entry))
        if stat is None or stat[0] == "Z":
            continue
        parents[int(entry)] = int(stat[1])
        if int(stat[3]) == session_id:
            members.add(int(entry))
    grown = True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in members} - members
        members |= children
        grown = bool(children)
    return sorted(members)


def kill_session(session_id: int) -> None:
    """SIGTERM the session, then SIGKILL whatever is left after a grace period."""
    for signum, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        members = session_members(session_id)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and session_members(session_id):
            time.sleep(0.05)


@contextlib.contextmanager
def session_guard(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield process
    finally:
        kill_session(process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/pid/stat after the command name (state is [0], session [3], utime [11])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _status_kib(pid: int, key: str, source: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Usage:
    cpu_seconds: float
    peak_rss_mib: float  # the sum of the processes' VmHWM: exact for one process, an upper bound for several
    peak_pss_mib: float  # the highest sampled sum of PSS: shared pages counted once, comparable across designs
    idle_pss_mib: float
    idle_rss_mib: float


@dataclass
class SessionSampler:
    """Samples the processes of one or more sessions: CPU time used since start(), peak RSS and peak PSS.

    VmHWM is the kernel's own high-water mark per process, so a peak between two samples is not missed;
    PSS (from smaps_rollup) shares library and forked pages among processes, so Postfix's many daemons
    are not counted once each, but its peak is only as good as the sampling interval.
    A process that exits between samples loses only its last interval.
    """

    session_ids: tuple[int, ...]
    interval: float = 0.05
    _cpu_start: dict[int, int] = field(default_factory=dict)
    _cpu_last: dict[int, int] = field(default_factory=dict)
    _peak_kib: dict[int, int] = field(default_factory=dict)
    _idle_kib: int = 0
    _idle_rss_kib: int = 0
    _peak_pss_kib: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _members(self) -> list[int]:
        return [pid for session_id in self.session_ids for pid in session_members(session_id)]

    def start(self) -> None:
        for pid in self._members():
            stat = _read_stat(pid)
            if stat is not None:
                self._cpu_start[pid] = int(stat[11]) + int(stat[12])
            self._idle_kib += _status_kib(pid, "Pss:", "smaps_rollup")
            self._idle_rss_kib += _status_kib(pid, "VmRSS:")
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        pss_kib = 0
        for pid in self._members():
            stat = _read_stat(pid)
            if stat is None:
                continue
            self._cpu_start.setdefault(pid, 0)
            self._cpu_last[pid] = int(stat[11]) + int(stat[12])
            self._peak_kib[pid] = max(self._peak_kib.get(pid, 0), _status_kib(pid, "VmHWM:"))
            pss_kib += _status_kib(pid, "Pss:", "smaps_rollup")
        self._peak_pss_kib = max(self._peak_pss_kib, pss_kib)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> Usage:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        ticks = sum(self._cpu_last[pid] - self._cpu_start[pid] for pid in self._cpu_last)
        return Usage(
            ticks / TICKS_PER_SECOND,
            sum(self._peak_kib.values()) / 1024,
            self._peak_pss_kib / 1024,
            self._idle_kib / 1024,
            self._idle_rss_kib / 1024,
        )

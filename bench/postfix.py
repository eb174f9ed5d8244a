"""A private Postfix instance configured as a relay to the sink, for the same-run comparison.

Its config_directory, queue_directory and data_directory live in a temporary directory, it listens on
127.0.0.1 only (a free port), relays everything to relayhost = [127.0.0.1]:sinkport, delivers nothing
locally, and is stopped (and its processes killed) by the benchmark. The Postfix filter tests start the
same instance with privacy-relay as its content filter (extra main.cf settings and master.cf services).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from bench.procs import LOOPBACK, free_port, kill_session, session_members, wait_for_greeting

POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"
RECIPIENT_LIMIT = 50  # default_destination_recipient_limit, set explicitly: the sink count depends on it

MASTER_SERVICES = """\
{listen} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""

MAIN_SETTINGS = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.localdomain
mydomain = localdomain
mydestination =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{sink_port}
default_destination_recipient_limit = {recipient_limit}
message_size_limit = 104857600
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
maillog_file_prefixes = {root}
maillog_file = {root}/postfix.log
"""


def postfix_available() -> bool:
    return Path(POSTFIX).exists() and shutil.which("postconf") is not None


class PostfixRelay:
    """`postfix -c DIR start`; stop() runs `postfix stop` and kills whatever is left of the master's session."""

    def __init__(
        self,
        root: Path,
        sink_port: int,
        main_settings: Mapping[str, str] | None = None,
        services: str = "",
        recipient_limit: int = RECIPIENT_LIMIT,
    ) -> None:
        """main_settings are added to main.cf (or replace its lines), services to master.cf."""
        self.root = root
        root.chmod(0o755)  # the postfix user must reach the queue and data directories
        self.port = free_port()
        self.config_directory = root / "etc"
        self.config_directory.mkdir(parents=True)
        (root / "queue").mkdir()
        (root / "data").mkdir()
        shutil.chown(root / "data", "postfix")
        main_cf = MAIN_SETTINGS.format(root=root, sink_port=sink_port, recipient_limit=recipient_limit)
        # Postfix takes the last line that sets a parameter.
        main_cf += "".join(f"{name} = {value}\n" for name, value in (main_settings or {}).items())
        (self.config_directory / "main.cf").write_text(main_cf)
        master_cf = MASTER_SERVICES.format(listen=f"{LOOPBACK}:{self.port}") + services
        (self.config_directory / "master.cf").write_text(master_cf)
        self.master_pid: int | None = None
        self._postfix("start")
        try:
            self.master_pid = self._read_master_pid()
            wait_for_greeting(self.port, 20)
        except BaseException:
            self.stop()
            raise

    def _postfix(self, command: str) -> None:
        done = subprocess.run(
            [POSTFIX, "-c", str(self.config_directory), command], capture_output=True, timeout=60, check=False
        )
        if done.returncode != 0 and command != "stop":
            log = self.root / "postfix.log"
            detail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise RuntimeError(f"postfix {command} failed: {' / '.join(detail) or done.stderr.decode().strip()}")

    def _read_master_pid(self) -> int:
        pid_file = self.root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return int(pid_file.read_text().split()[0])
            time.sleep(0.05)
        raise RuntimeError(f"Postfix did not write {pid_file}; see {self.root / 'postfix.log'}")

    @property
    def log(self) -> str:
        path = self.root / "postfix.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def flush(self) -> None:
        """`postqueue -f`: try every deferred message now, destinations marked dead included."""
        subprocess.run([POSTQUEUE, "-c", str(self.config_directory), "-f"], capture_output=True, timeout=60, check=True)

    def queue_listing(self) -> str:
        """`postqueue -p`: what is still queued, with the reason each deferred recipient waits."""
        done = subprocess.run(
            [POSTQUEUE, "-c", str(self.config_directory), "-p"], capture_output=True, text=True, timeout=60, check=True
        )
        return done.stdout

    @property
    def session_id(self) -> int:
        """The master daemon makes itself a session leader; its daemons stay in that session."""
        assert self.master_pid is not None
        return self.master_pid

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,)

    @property
    def session_ids(self) -> tuple[int, ...]:
        return (self.session_id,)

    def stop(self) -> None:
        self._postfix("stop")
        if self.master_pid is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and session_members(self.master_pid):
                time.sleep(0.1)
            kill_session(self.master_pid)

"""Who holds a lease on a copy in the shared spool, and which holders on this machine are gone.

A relay process names itself host/pid/token/machine, where machine is this boot of the kernel and
this PID namespace. When a relay starts, the copies held by processes of the same machine that no
longer run (a relay killed and started again; a container restarted, pid 1 again with a new token)
go again at once, as Postfix resends what was in flight when it restarts, instead of when their
leases end. Holders on other machines, or whose machine cannot be told, keep their leases until
they end: only a lease's end proves that a relay elsewhere is gone.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
PID_NAMESPACE = Path("/proc/self/ns/pid")


def this_machine() -> str:
    """This boot and PID namespace, or '' where the system does not say (then no lease is released early)."""
    try:
        return f"{BOOT_ID.read_text().strip()}.{os.stat(PID_NAMESPACE).st_ino}"
    except OSError:
        return ""


def new_owner() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}/{this_machine()}"


def host_of(owner: str) -> str:
    return owner.split("/", 1)[0]


def is_gone(owner: str, me: str) -> bool:
    """Whether owner, a lease's holder, is a process of this machine that no longer runs."""
    parts, mine = owner.split("/"), me.split("/")
    if len(parts) != 4 or len(mine) != 4 or owner == me or not mine[3]:
        return False
    host, pid, _, machine = parts
    if (host, machine) != (mine[0], mine[3]) or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True  # an earlier run with this process's pid: a container's pid 1
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # runs, as another user
    return False  # runs (or its pid was reused: then the lease's end decides)

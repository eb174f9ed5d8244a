"""The upstream sink: Postfix's smtp-sink, or bench.pysink when it is absent. Both print "mesg=N" counters.

The benchmark's clock stops when the sink's message counter reaches the number of transactions expected.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.procs import LOOPBACK, free_port, kill_session, start_session, wait_for_greeting

SMTP_SINK = "/usr/sbin/smtp-sink"
_COUNTER = re.compile(rb"mesg=(\d+)")


def smtp_sink_available() -> bool:
    return Path(SMTP_SINK).exists() or shutil.which("smtp-sink") is not None


class Sink:
    """A running sink on a free loopback port whose message count is followed from its output."""

    def __init__(self, use_smtp_sink: bool) -> None:
        self.port = free_port()
        self.tool = "smtp-sink" if use_smtp_sink else "bench.pysink"
        if use_smtp_sink:
            # -c prints running counters; -u is required as root; 1024 is the listen backlog.
            argv = [shutil.which("smtp-sink") or SMTP_SINK, "-c", "-u", "nobody", f"{LOOPBACK}:{self.port}", "1024"]
        else:
            argv = [sys.executable, "-m", "bench.pysink", str(self.port)]
        self._process = start_session(argv, stdout=subprocess.PIPE)
        self._count = 0
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._follow, daemon=True)
        self._reader.start()
        try:
            wait_for_greeting(self.port, 10)
        except BaseException:
            self.stop()
            raise

    def _follow(self) -> None:
        assert self._process.stdout is not None
        tail = b""
        while chunk := self._process.stdout.read1(65536):
            tail = (tail + chunk)[-256:]
            counts = _COUNTER.findall(tail)
            if counts:
                with self._changed:
                    self._count = max(self._count, int(counts[-1]))
                    self._changed.notify_all()

    @property
    def session_id(self) -> int:
        return self._process.pid

    @property
    def count(self) -> int:
        with self._changed:
            return self._count

    def wait_for(self, expected: int, timeout: float) -> float | None:
        """The monotonic time at which the sink had `expected` messages, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._count < expected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(min(remaining, 0.2))
        return time.monotonic()

    def stop(self) -> None:
        kill_session(self._process.pid)
        self._process.wait(5)
        self._reader.join(5)

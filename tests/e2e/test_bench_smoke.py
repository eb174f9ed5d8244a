"""The benchmark harness stays runnable: `python -m bench --smoke` end to end, no figures judged."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| (L0|W1|W2|W3) \| (relay direct|postfix|sink) \| ([\d,.]+) \| ([\d,.]+) \|", re.MULTILINE)


def _bench_processes() -> set[tuple[str, str]]:
    """(pid, command line) of processes a harness starts, so a leftover one fails the test."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        command = b" ".join(argv).decode(errors="replace")
        if "bench.pysink" in command or "privacy-relay-bench-" in command:
            found.add((entry.name, command))
    return found


def _run_smoke(*options: str) -> str:
    # Only this run's processes count: a benchmark someone else is running on the machine is not ours.
    already_running = _bench_processes()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _bench_processes() - already_running == set()
    return done.stdout


@pytest.mark.e2e
def test_smoke_run_with_python_tools_measures_every_workload() -> None:
    table = _run_smoke("--tools", "python", "--no-postfix")
    measured = {(workload, target) for workload, target, _, _ in ROW.findall(table)}
    assert {("L0", "sink"), ("W1", "sink")} <= measured
    assert {(w, "relay direct") for w in ("L0", "W1", "W2", "W3")} <= measured
    assert "sink: bench.pysink" in table


@pytest.mark.e2e
@pytest.mark.skipif(
    shutil.which("postfix", path="/usr/sbin:/usr/bin") is None or os.geteuid() != 0,
    reason="needs Postfix installed (smtp-source, smtp-sink) and root to start a private instance",
)
def test_smoke_run_against_postfix_with_its_tools() -> None:
    table = _run_smoke("--workloads", "W1,W2")
    measured = {(workload, target) for workload, target, _, _ in ROW.findall(table)}
    assert {("W1", "relay direct"), ("W1", "postfix"), ("W2", "relay direct"), ("W2", "postfix")} <= measured
    assert "load generator: smtp-source; sink: smtp-sink" in table

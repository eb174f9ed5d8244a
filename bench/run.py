"""One measured run: a fresh sink and a fresh target, a workload driven into the target, the figures.

The clock starts when the load starts; "accepted" stops when the load generator has every DATA reply,
"delivered" stops when the sink has every transaction. While the load runs, a latency probe sends one
W1-sized message at a time (at most one per PROBE_INTERVAL) and times its DATA reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.client import send_load
from bench.procs import SessionSampler, Usage
from bench.sink import Sink
from bench.workloads import BASE_RECIPIENT, MAIL_FROM, PROBE, Workload, recipients

SMTP_SOURCE = "/usr/sbin/smtp-source"
PROBE_INTERVAL = 0.01


class Target(Protocol):
    @property
    def ports(self) -> tuple[int, ...]:
        """Where the load goes, shared out evenly (several relays behind no balancer)."""

    @property
    def session_ids(self) -> tuple[int, ...]:
        """The sessions whose processes are the system under test, for CPU and memory."""

    def stop(self) -> None: ...


@dataclass(frozen=True)
class TargetKind:
    """How to start one system under test and how many sink transactions a workload makes through it."""

    name: str
    start: Callable[[Path, Sink], Target]
    transactions: Callable[[Workload], int]


@dataclass
class Figures:
    target: str
    workload: str
    accepted_per_s: float | None = None
    delivered_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_per_1000: float | None = None
    peak_rss_mib: float | None = None
    peak_pss_mib: float | None = None
    idle_pss_mib: float | None = None
    idle_rss_mib: float | None = None
    error: str | None = None


def smtp_source_available() -> bool:
    return Path(SMTP_SOURCE).exists() or shutil.which("smtp-source") is not None


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (index < total % parts)


async def _smtp_source(
    workload: Workload, message_file: Path, port: int, seconds_allowed: float, part: tuple[int, int] = (0, 1)
) -> None:
    """part: (index, of): this process sends that share of the workload's messages and sessions."""
    messages, sessions = (
        _share(workload.messages, part[1], part[0]),
        max(1, _share(workload.sessions, part[1], part[0])),
    )
    process = await asyncio.create_subprocess_exec(
        shutil.which("smtp-source") or SMTP_SOURCE,
        "-d",  # each session reuses its connection, as the python client does
        *("-s", str(sessions), "-m", str(messages), "-r", str(workload.recipients)),
        *("-f", MAIL_FROM, "-t", BASE_RECIPIENT, "-F", str(message_file), "-M", "bench.test"),
        f"127.0.0.1:{port}",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), seconds_allowed)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {stderr.decode(errors='replace').strip()[-300:]}")


async def _probe(port: int, stop: asyncio.Event, limit: int) -> list[float]:
    latencies: list[float] = []
    content = PROBE.content()
    while not stop.is_set() and len(latencies) < limit:
        result = await send_load(port, 1, 1, MAIL_FROM, [BASE_RECIPIENT], content)
        latencies.extend(result.latencies)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PROBE_INTERVAL)
    return latencies


async def _drive(
    workload: Workload,
    ports: tuple[int, ...],
    use_smtp_source: bool,
    message_file: Path,
    seconds_allowed: float,
    probe: bool,
) -> tuple[float, list[float]]:
    """Run the load, shared out over the ports (and the probe beside it, on the first); the time the load
    finished and the probe's latencies."""
    stop = asyncio.Event()
    probe_task = asyncio.create_task(_probe(ports[0], stop, limit=10_000)) if probe else None
    parts = len(ports)
    try:
        if use_smtp_source:
            await asyncio.gather(
                *(
                    _smtp_source(workload, message_file, port, seconds_allowed, (index, parts))
                    for index, port in enumerate(ports)
                )
            )
            latencies: list[float] = []
        else:
            loads = [
                send_load(
                    port,
                    max(1, _share(workload.sessions, parts, index)),
                    _share(workload.messages, parts, index),
                    MAIL_FROM,
                    recipients(workload.recipients),
                    workload.content(),
                )
                for index, port in enumerate(ports)
            ]
            results = await asyncio.wait_for(asyncio.gather(*loads), seconds_allowed)
            latencies = [latency for result in results for latency in result.latencies]
        finished = time.monotonic()
    finally:
        stop.set()
        probed = await probe_task if probe_task is not None else []
    return finished, probed or latencies


def measure(
    kind: TargetKind,
    workload: Workload,
    root: Path,
    use_smtp_sink: bool,
    use_smtp_source: bool,
    timeout: float,
) -> Figures:
    """A fresh sink and target, one workload, and the figures; every process is gone when it returns."""
    figures = Figures(kind.name, workload.name)
    root.mkdir(parents=True, exist_ok=True)
    message_file = root / f"{workload.name}.eml"
    message_file.write_bytes(workload.content())
    sink = Sink(use_smtp_sink)
    try:
        target = kind.start(root, sink)
        try:
            sampler = SessionSampler(target.session_ids)
            sampler.start()
            started = time.monotonic()
            # The latency workload (L0) is the python client alone, one message after another.
            probing = not workload.latency_only
            finished, latencies = asyncio.run(
                _drive(workload, target.ports, use_smtp_source and probing, message_file, timeout, probing)
            )
            probe_messages = len(latencies) if probing else 0
            expected = kind.transactions(workload) + probe_messages
            delivered = sink.wait_for(expected, timeout)
        finally:
            usage: Usage = sampler.stop()
            target.stop()
    except (RuntimeError, OSError, TimeoutError) as exc:
        figures.error = str(exc)
        return figures
    finally:
        sink.stop()
    figures.accepted_per_s = workload.messages / (finished - started)
    if delivered is None:
        figures.error = f"the sink had {sink.count} of {expected} transactions after {timeout:.0f} s"
    else:
        figures.delivered_per_s = workload.copies / (delivered - started)
    if latencies:
        figures.p50_ms = statistics.median(latencies) * 1000
        figures.p99_ms = percentile(latencies, 0.99) * 1000
    figures.cpu_per_1000 = usage.cpu_seconds / (workload.copies + probe_messages) * 1000
    figures.peak_rss_mib = usage.peak_rss_mib
    figures.peak_pss_mib = usage.peak_pss_mib
    figures.idle_pss_mib = usage.idle_pss_mib
    figures.idle_rss_mib = usage.idle_rss_mib
    return figures

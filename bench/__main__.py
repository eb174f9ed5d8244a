"""python -m bench: the relay and a private Postfix against the same sink, W1/W2/W3, one table.

    python -m bench              the issue's workloads (takes a few minutes)
    python -m bench --smoke      a tiny run in seconds, to show the harness works (no targets)

Only loopback addresses are used; every process started is stopped before the script exits.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.postfix import RECIPIENT_LIMIT, PostfixRelay, postfix_available
from bench.relay import RelayProcess, SharedSpoolRelays, shared_spool_available, spool_mode, supports_workers
from bench.report import POSTFIX, RELAY_DIRECT, SHARED_SPOOL, Table, median_figures
from bench.run import Figures, Target, TargetKind, measure, smtp_source_available
from bench.sink import Sink, smtp_sink_available
from bench.workloads import FULL, MIB, SMOKE, Workload


class SinkItself:
    """The sink as the target: smtp-source straight into smtp-sink, the ceiling of the machine."""

    def __init__(self, sink: Sink) -> None:
        self.ports = (sink.port,)
        self.session_ids = (sink.session_id,)

    def stop(self) -> None:
        return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny workloads, seconds, no targets")
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure; the table shows medians")
    parser.add_argument("--workloads", default="L0,W1,W2,W3", help="comma-separated subset of L0,W1,W2,W3")
    parser.add_argument(
        "--tools",
        choices=("auto", "python"),
        default="auto",
        help="auto: smtp-source/smtp-sink when installed; python: the asyncio client and aiosmtpd sink",
    )
    parser.add_argument("--no-postfix", action="store_true", help="skip the Postfix comparison")
    parser.add_argument(
        "--no-postgres", action="store_true", help="skip two relays on a PostgreSQL spool (in W1 and W2)"
    )
    parser.add_argument(
        "--targets",
        default="sink,direct,spool,postgres,postfix",
        help="comma-separated subset of the rows: sink, direct, spool (one relay), postgres (two relays), postfix",
    )
    parser.add_argument("--workers", type=int, default=None, help="RELAY_LISTEN_WORKERS for the relay")
    parser.add_argument(
        "--relay-setting",
        action="append",
        default=[],
        metavar="RELAY_KEY=VALUE",
        help="an extra RELAY_* setting for the relay, repeatable (e.g. RELAY_UPSTREAM_MAX_CONNECTIONS=10)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per run (default 600; smoke 60)")
    return parser


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), Linux {platform.release()}, Python {platform.python_version()}"


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    workloads: list[Workload] = [w for w in (SMOKE if args.smoke else FULL) if w.name in args.workloads.split(",")]
    timeout = args.timeout or (60.0 if args.smoke else 600.0)
    use_smtp_sink = args.tools == "auto" and smtp_sink_available()
    use_smtp_source = args.tools == "auto" and smtp_source_available()
    rows = set(args.targets.split(","))
    with_postfix = not args.no_postfix and "postfix" in rows and postfix_available() and os.geteuid() == 0
    workers = args.workers if args.workers is not None and supports_workers() else None
    spool = spool_mode()
    settings = dict(item.split("=", 1) for item in args.relay_setting)

    def relay_kind(mode: str, name: str) -> TargetKind:
        return TargetKind(
            name,
            lambda root, sink: RelayProcess(root, sink.port, mode, workers, settings),
            lambda workload: workload.copies,
        )

    def start_sink_itself(root: Path, sink: Sink) -> Target:
        return SinkItself(sink)

    kinds = [TargetKind("sink", start_sink_itself, lambda workload: workload.messages)] if "sink" in rows else []
    if "direct" in rows:
        kinds.append(relay_kind("direct", RELAY_DIRECT))
    spool_name = f"relay {spool}" if spool else "relay spool"
    if spool and "spool" in rows:
        kinds.append(relay_kind(spool, spool_name))
    with_postgres = bool(spool) and "postgres" in rows and not args.no_postgres and shared_spool_available()
    if with_postgres:
        kinds.append(
            TargetKind(
                SHARED_SPOOL,
                lambda root, sink: SharedSpoolRelays(root, sink.port, str(spool), workers, settings),
                lambda workload: workload.copies,
            )
        )
    if with_postfix:
        kinds.append(
            TargetKind(
                POSTFIX,
                lambda root, sink: PostfixRelay(root, sink.port),
                lambda workload: workload.postfix_transactions(RECIPIENT_LIMIT),
            )
        )

    print(f"# privacy-relay benchmark{' (smoke)' if args.smoke else ''}")
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {_machine()}")
    print(
        f"load generator: {'smtp-source' if use_smtp_source else 'bench.client'}; "
        f"sink: {'smtp-sink' if use_smtp_sink else 'bench.pysink'}; "
        f"relay workers: {workers or 'default'}; relay settings: {args.relay_setting or 'defaults'};\n"
        f"spool mode: {spool or 'not in this relay (n/a)'}; "
        f"postfix: {'yes' if with_postfix else 'no'}; "
        f"two relays on PostgreSQL: {'yes' if with_postgres else 'no'}; repeats: {args.repeat}"
    )
    print(f"load average before: {_load()}", flush=True)
    results: dict[tuple[str, str], Figures] = {}
    with tempfile.TemporaryDirectory(prefix="privacy-relay-bench-") as scratch:
        Path(scratch).chmod(0o755)  # Postfix's unprivileged daemons must reach their queue below it
        for workload in workloads:
            for kind in kinds:
                if kind.name == "sink" and workload.name not in ("L0", "W1"):
                    continue
                if kind.name == SHARED_SPOOL and workload.name not in ("W1", "W2"):
                    continue
                runs = []
                for attempt in range(args.repeat):
                    root = Path(scratch) / f"{workload.name}-{kind.name.replace(' ', '-')}-{attempt}"
                    started = time.monotonic()
                    runs.append(measure(kind, workload, root, use_smtp_sink, use_smtp_source, timeout))
                    outcome = runs[-1].error or f"{time.monotonic() - started:.1f} s"
                    print(f"  {workload.name} {kind.name} run {attempt + 1}: {outcome}", file=sys.stderr, flush=True)
                results[(kind.name, workload.name)] = median_figures(runs)
    targets = [kind.name for kind in kinds]
    if not spool:
        for workload in workloads:
            results[(spool_name, workload.name)] = Figures(spool_name, workload.name, error="no spool mode yet")
        targets.insert(2, spool_name)
    table = Table(results, targets, [w.name for w in workloads])
    print(f"load average after: {_load()}\n")
    print(table.render())
    if not args.smoke:
        w3 = next((w for w in workloads if w.name == "W3"), None)
        print()
        for line in table.target_checks(spool_name if spool else None, (w3.size if w3 else 20 * MIB) / MIB):
            print(line)
    return 0 if all(f.error is None for f in results.values() if f.target != spool_name or spool) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's one table: every figure, its ratio to Postfix from the same run, and the targets."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import fields

from bench.run import Figures

POSTFIX = "postfix"
RELAY_DIRECT = "relay direct"
SHARED_SPOOL = "2 relays hybrid, PostgreSQL"
NUMERIC = [f.name for f in fields(Figures) if f.name not in ("target", "workload", "error")]


def median_figures(runs: Sequence[Figures]) -> Figures:
    """Each figure's median over repeated runs; the first error, if every run failed."""
    merged = Figures(runs[0].target, runs[0].workload)
    for name in NUMERIC:
        values = [getattr(run, name) for run in runs if getattr(run, name) is not None]
        setattr(merged, name, statistics.median(values) if values else None)
    errors = [run.error for run in runs if run.error]
    merged.error = errors[0] if errors else None
    return merged


def _number(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    # W3's one message takes seconds: 0.04 msg/s, not 0.
    return f"{value:,.{max(digits, 2) if 0 < value < 10 else digits}f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs == 0:
        return "n/a"
    return f"{ours / theirs:.2f}x"


class Table:
    def __init__(self, results: dict[tuple[str, str], Figures], targets: Sequence[str], workloads: Sequence[str]):
        self.results = results
        self.targets = targets
        self.workloads = workloads

    def get(self, target: str, workload: str) -> Figures | None:
        return self.results.get((target, workload))

    def _peer_delivered(self, workload: str) -> float | None:
        """Postfix does not split: for W2 the fair peer is its W1 rate (one transaction per message)."""
        peer = self.get(POSTFIX, "W1" if workload == "W2" else workload)
        return peer.delivered_per_s if peer else None

    def render(self) -> str:
        head = (
            "| workload | target | msg/s accepted | copies/s delivered | DATA p50 / p99 ms "
            "| CPU s per 1k copies | peak MiB PSS (idle) | vs Postfix: accepted, delivered, p50, CPU, memory |"
        )
        lines = [head, "|" + "---|" * 8]
        for workload in self.workloads:
            peer = self.get(POSTFIX, workload)
            for target in self.targets:
                figures = self.get(target, workload)
                if figures is None:
                    continue
                if figures.error and figures.accepted_per_s is None:
                    lines.append(f"| {workload} | {target} | n/a: {figures.error} ||||||")
                    continue
                ratios = "—"
                if target != POSTFIX and peer is not None and target != "sink":
                    ratios = ", ".join(
                        (
                            _ratio(figures.accepted_per_s, peer.accepted_per_s),
                            _ratio(figures.delivered_per_s, self._peer_delivered(workload)),
                            _ratio(figures.p50_ms, peer.p50_ms),
                            _ratio(figures.cpu_per_1000, peer.cpu_per_1000),
                            _ratio(figures.peak_pss_mib, peer.peak_pss_mib),
                        )
                    )
                error = f" ({figures.error})" if figures.error else ""
                lines.append(
                    f"| {workload} | {target} | {_number(figures.accepted_per_s)} | "
                    f"{_number(figures.delivered_per_s)}{error} | "
                    f"{_number(figures.p50_ms, 2)} / {_number(figures.p99_ms, 2)} | "
                    f"{_number(figures.cpu_per_1000, 2)} | "
                    f"{_number(figures.peak_pss_mib, 1)} ({_number(figures.idle_pss_mib, 1)}) | {ratios} |"
                )
        return "\n".join(lines)

    def target_checks(self, spool_target: str | None, w3_size_mib: float) -> list[str]:
        """The issue's targets, each with the figure it was judged on."""
        checks: list[str] = []

        def check(label: str, ok: bool | None, detail: str) -> None:
            verdict = "n/a " if ok is None else ("MET " if ok else "MISS")
            checks.append(f"{verdict} {label}: {detail}")

        peer_w1 = self._peer_delivered("W1")
        for target, w1_goal, w2_goal in ((RELAY_DIRECT, 1.5, 4.0), (spool_target, 1.0, 2.0)):
            name = target or "relay spool"
            for workload, goal in (("W1", w1_goal), ("W2", w2_goal)):
                figures = self.get(target, workload) if target else None
                ours = figures.delivered_per_s if figures else None
                if ours is None or peer_w1 is None:
                    check(f"{workload} {name} ≥ {goal}x Postfix W1 msg/s", None, "not measured")
                else:
                    check(
                        f"{workload} {name} ≥ {goal}x Postfix W1 msg/s",
                        ours >= goal * peer_w1,
                        f"{ours:,.0f} / {peer_w1:,.0f} = {ours / peer_w1:.2f}x",
                    )
            w3 = self.get(target, "W3") if target else None
            if w3 is None or w3.peak_rss_mib is None or w3.idle_rss_mib is None:
                check(f"W3 {name} peak RSS < 3x message + idle", None, "not measured")
            else:
                limit = 3 * w3_size_mib + w3.idle_rss_mib
                check(
                    f"W3 {name} peak RSS < 3x message + idle",
                    w3.peak_rss_mib < limit,
                    f"peak RSS (VmHWM) {w3.peak_rss_mib:.1f} MiB against {limit:.1f} MiB",
                )
        for workload in ("W1", "W2"):
            label = f"{workload} {SHARED_SPOOL} ≥ 1.0x {spool_target or 'relay spool'} (SQLite) copies/s"
            pair = self.get(SHARED_SPOOL, workload)
            single = self.get(spool_target, workload) if spool_target else None
            ours, theirs = (pair.delivered_per_s if pair else None), (single.delivered_per_s if single else None)
            if ours is None or theirs is None:
                check(label, None, "not measured")
            else:
                check(label, ours >= theirs, f"{ours:,.0f} / {theirs:,.0f} = {ours / theirs:.2f}x")
        ours_l0 = self.get(RELAY_DIRECT, "L0")
        sink_l0 = self.get("sink", "L0")
        if ours_l0 and sink_l0 and ours_l0.p50_ms is not None and sink_l0.p50_ms is not None:
            overhead = ours_l0.p50_ms - sink_l0.p50_ms
            check("relay direct DATA overhead at p50 < 5 ms", overhead < 5, f"{overhead:.2f} ms over the sink's own")
        else:
            check("relay direct DATA overhead at p50 < 5 ms", None, "not measured")
        return checks

"""privacy-relay as a subprocess: `privacy-relay serve` configured by RELAY_* variables only.

The delivery modes the installed relay supports are read from its config model, so the benchmark
runs the spool mode as soon as it exists and reports it as n/a before then.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import get_args

from bench.procs import LOOPBACK, free_port, kill_session, start_session, wait_for_greeting
from relay.config.models import Config, DeliveryConfig, ListenConfig


def delivery_modes() -> tuple[str, ...]:
    annotation = DeliveryConfig.model_fields["mode"].annotation
    return tuple(str(mode) for mode in get_args(annotation))


def spool_mode() -> str | None:
    """The default delivery mode when it is a spool mode (not direct), else any non-direct mode, else None."""
    default = str(DeliveryConfig().mode)
    if default != "direct":
        return default
    others = [mode for mode in delivery_modes() if mode != "direct"]
    return others[0] if others else None


def supports_workers() -> bool:
    return "workers" in ListenConfig.model_fields


def _spool_settings(root: Path) -> dict[str, str]:
    """Point every path-valued spool setting at the run's temporary directory."""
    settings: dict[str, str] = {}
    for section_name, section_field in Config.model_fields.items():
        model = section_field.annotation
        if not isinstance(model, type) or not hasattr(model, "model_fields"):
            continue
        for key, key_field in model.model_fields.items():
            names_spool = "spool" in section_name or "spool" in key
            if names_spool and Path in (key_field.annotation, *get_args(key_field.annotation)):
                settings[f"RELAY_{section_name.upper()}_{key.upper()}"] = str(root / f"{section_name}-{key}")
    return settings


def relay_command() -> list[str]:
    script = Path(sys.executable).parent / "privacy-relay"
    if script.exists():
        return [str(script), "serve"]
    found = shutil.which("privacy-relay")
    return [found, "serve"] if found else [sys.executable, "-m", "relay", "serve"]


class RelayProcess:
    def __init__(
        self, root: Path, sink_port: int, mode: str, workers: int | None, settings: dict[str, str] | None = None
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
        env.update(
            RELAY_LISTEN_HOST=LOOPBACK,
            RELAY_LISTEN_PORT=str(self.port),
            RELAY_UPSTREAM_HOST=LOOPBACK,
            RELAY_UPSTREAM_PORT=str(sink_port),
            RELAY_UPSTREAM_TLS="none",
            RELAY_DELIVERY_MODE=mode,
            RELAY_OUTBOX=str(root / "outbox"),
            RELAY_LOGGING_FORMAT="json",
        )
        if mode != "direct":
            env.update(_spool_settings(root))
        if workers is not None:
            env["RELAY_LISTEN_WORKERS"] = str(workers)
        env.update(settings or {})
        self.log_path = root / "relay.log"
        with open(self.log_path, "wb") as log:
            self._process = start_session(relay_command(), env=env, cwd=root, stdout=log.fileno())
        try:
            wait_for_greeting(self.port, 30)
        except BaseException:
            self.stop()
            raise RuntimeError(f"privacy-relay did not start; see {self.log_path}") from None

    @property
    def session_id(self) -> int:
        return self._process.pid

    def stop(self) -> None:
        kill_session(self._process.pid)
        self._process.wait(5)

"""privacy-relay as a subprocess: `privacy-relay serve` configured by RELAY_* variables only.

The delivery modes the installed relay supports are read from its config model, so the benchmark
runs the spool mode as soon as it exists and reports it as n/a before then.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import get_args

from bench.postgres import PASSWORD, PrivateCluster, server_binaries
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
            # Folders only: an optional file (spool.password_file) stays unset unless a target sets it.
            if names_spool and key_field.annotation is Path:
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
            RELAY_CONSOLE_PORT="0",
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

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,)

    @property
    def session_ids(self) -> tuple[int, ...]:
        return (self.session_id,)

    def stop(self) -> None:
        kill_session(self._process.pid)
        self._process.wait(5)


class SharedSpoolRelays:
    """Several relays on one private PostgreSQL spool (a fresh cluster per run), the load shared out over them.

    Their CPU and memory include the database server's: it is part of what carries the mail.
    """

    def __init__(
        self,
        root: Path,
        sink_port: int,
        mode: str,
        workers: int | None,
        settings: dict[str, str] | None = None,
        relays: int = 2,
    ) -> None:
        binaries = server_binaries()
        if binaries is None:
            raise RuntimeError("no PostgreSQL server in /usr/lib/postgresql")
        root.mkdir(parents=True, exist_ok=True)
        self._cluster = PrivateCluster(binaries)
        self._relays: list[RelayProcess] = []
        try:
            password_file = root / "spool-password"
            password_file.write_text(PASSWORD + "\n")
            password_file.chmod(0o600)
            shared = {"RELAY_SPOOL_URL": self._cluster.url, "RELAY_SPOOL_PASSWORD_FILE": str(password_file)}
            for number in range(relays):
                self._relays.append(
                    RelayProcess(root / f"relay-{number}", sink_port, mode, workers, {**(settings or {}), **shared})
                )
        except BaseException:
            self.stop()
            raise

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(relay.port for relay in self._relays)

    @property
    def session_ids(self) -> tuple[int, ...]:
        return (*(relay.session_id for relay in self._relays), self._cluster.session_id)

    def stop(self) -> None:
        for relay in self._relays:
            relay.stop()
        self._cluster.destroy()


def shared_spool_available() -> bool:
    return server_binaries() is not None and importlib.util.find_spec("asyncpg") is not None

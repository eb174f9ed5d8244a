"""`privacy-relay service install|uninstall`: start the personal relay when you log in.

Linux gets a systemd user unit, macOS a launchd agent; both run `privacy-relay serve` in the folder
the command was run from, so the outbox, the spool and config/relay.yaml are the ones the quick start
uses. Windows runs the relay in WSL, whose systemd (when turned on) takes the Linux unit.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from relay.config.models import DEFAULT_CONFIG_PATH
from relay.files import write_atomically

SYSTEMD_UNIT = "privacy-relay.service"
LAUNCHD_LABEL = "org.privacy-relay"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="service_command", required=True, metavar="ACTION")
    install = actions.add_parser(
        "install",
        help="start the relay at login (systemd user unit on Linux, launchd agent on macOS)",
        description="Write a systemd user unit (Linux) or a launchd agent (macOS) that runs `privacy-relay "
        "serve` in this folder when you log in, and start it now.",
    )
    install.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"the config the service uses (default: {DEFAULT_CONFIG_PATH} in this folder, if it exists)",
    )
    actions.add_parser("uninstall", help="stop the relay and remove what install wrote")


@dataclass(frozen=True)
class Service:
    """How the relay is started: the command line and the folder it runs in."""

    command: tuple[str, ...]
    working_directory: Path

    @classmethod
    def here(cls, config: Path | None) -> Service:
        working_directory = Path.cwd()
        if config is None and DEFAULT_CONFIG_PATH.exists():
            config = DEFAULT_CONFIG_PATH
        # The interpreter of this installation, so the service finds the same relay whatever PATH is at login.
        command: tuple[str, ...] = (sys.executable, "-m", "relay", "serve")
        if config is not None:
            command += ("--config", str(config.absolute()))
        return cls(command, working_directory)


def _systemd_argument(argument: str) -> str:
    """One ExecStart= word: systemd splits the line like a shell and expands % and $ itself."""
    escaped = argument.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"' if escaped != argument or any(c.isspace() for c in argument) else argument


def systemd_unit(service: Service) -> str:
    return (
        "[Unit]\n"
        "Description=privacy-relay, the local SMTP relay that hides recipients from each other\n"
        "\n"
        "[Service]\n"
        "Type=exec\n"
        # A path, not a command line: only the % specifiers need escaping.
        f"WorkingDirectory={str(service.working_directory).replace('%', '%%')}\n"
        f"ExecStart={' '.join(_systemd_argument(argument) for argument in service.command)}\n"
        # SIGTERM is the relay's own clean stop; on-failure restarts it after a crash, not after `stop`.
        "Restart=on-failure\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def launchd_plist(service: Service) -> bytes:
    return plistlib.dumps(
        {
            "Label": LAUNCHD_LABEL,
            "ProgramArguments": list(service.command),
            "WorkingDirectory": str(service.working_directory),
            "RunAtLoad": True,
            # Restarted after a crash, not after a clean exit (launchctl unload, or SIGTERM at log-out).
            "KeepAlive": {"SuccessfulExit": False},
            "StandardErrorPath": str(service.working_directory / "relay.log"),
        }
    )


def systemd_unit_path() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user" / SYSTEMD_UNIT


def launchd_plist_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"


def _run_each(commands: list[list[str]]) -> str | None:
    """Run the service manager's commands in order; None when all worked, else what went wrong."""
    if shutil.which(commands[0][0]) is None:
        return f"{commands[0][0]} is not installed"
    for command in commands:
        # The commands are fixed here; only paths this module built are in them.
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            return f"`{' '.join(command)}` said: {result.stderr.strip() or result.returncode}"
    return None


def _manager_commands(install: bool, path: Path) -> list[list[str]]:
    if sys.platform == "darwin":
        return [["launchctl", "load" if install else "unload", "-w", str(path)]]
    if install:
        return [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", SYSTEMD_UNIT]]
    return [["systemctl", "--user", "disable", "--now", SYSTEMD_UNIT]]


def _install(config: Path | None) -> int:
    service = Service.here(config)
    if sys.platform == "darwin":
        path, content = launchd_plist_path(), launchd_plist(service)
    else:
        path, content = systemd_unit_path(), systemd_unit(service).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, [content])
    print(f"Wrote {path}: it runs `privacy-relay serve` in {service.working_directory} when you log in.")
    commands = _manager_commands(True, path)
    problem = _run_each(commands)
    if problem is None:
        print("The relay is running now, and will start whenever you log in.")
        return 0
    print(f"It is not started yet ({problem}). Start it with:")
    for command in commands:
        print(f"  {' '.join(command)}")
    return 0


def _uninstall() -> int:
    path = launchd_plist_path() if sys.platform == "darwin" else systemd_unit_path()
    if not path.exists():
        print(f"Nothing to remove: {path} does not exist.")
        return 0
    problem = _run_each(_manager_commands(False, path))
    if problem is not None:
        print(f"Could not stop it first ({problem}); removing it anyway.")
    path.unlink()
    if sys.platform != "darwin":
        _run_each([["systemctl", "--user", "daemon-reload"]])
    print(f"Removed {path}: the relay no longer starts when you log in.")
    return 0


def run(args: argparse.Namespace) -> int:
    if sys.platform == "win32":
        print("On Windows, run the relay in WSL (docs/mail-clients.md), and `privacy-relay service install` there.")
        return 2
    if args.service_command == "install":
        return _install(args.config)
    return _uninstall()

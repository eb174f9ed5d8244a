"""`privacy-relay service install|uninstall` with a home folder of the test's, and what they write.

systemctl is kept off PATH, so the test never starts a service on the machine it runs on; the unit is
checked by `systemd-analyze verify` where it is installed (required with
PRIVACY_RELAY_TESTS_REQUIRE_SYSTEMD_ANALYZE=1, as in .ci/run), and the launchd agent (macOS) by content.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay.admin.service import LAUNCHD_LABEL, Service, launchd_plist, systemd_unit
from tests.e2e.conftest import CONSOLE_SCRIPT

pytestmark = pytest.mark.e2e


def service_command(home: Path, cwd: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    environ = {name: value for name, value in os.environ.items() if not name.startswith(("RELAY_", "XDG_"))}
    empty_path = home / "no-service-manager"
    empty_path.mkdir(parents=True, exist_ok=True)
    environ.update({"HOME": str(home), "PATH": str(empty_path)})
    return subprocess.run(
        [CONSOLE_SCRIPT, "service", *arguments], cwd=cwd, env=environ, capture_output=True, text=True, timeout=60
    )


def systemd_verify(unit: Path, runtime_directory: Path) -> subprocess.CompletedProcess[str]:
    runtime_directory.mkdir(mode=0o700, exist_ok=True)
    # Without a running user manager, systemd-analyze needs a runtime folder of its own.
    environ = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_directory)}
    return subprocess.run(
        ["systemd-analyze", "verify", "--user", str(unit)], env=environ, capture_output=True, text=True, timeout=60
    )


def exec_start(unit_text: str) -> list[str]:
    line = next(line for line in unit_text.splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart=").replace("%%", "%").replace("$$", "$"))


def test_install_writes_a_user_unit_that_runs_the_relay_here_and_uninstall_removes_it(tmp_path: Path) -> None:
    home, project = tmp_path / "home", tmp_path / "my mail 100%"
    (project / "config").mkdir(parents=True)
    (project / "config" / "relay.yaml").write_text("policy:\n  action: bcc\n")

    installed = service_command(home, project, "install")

    assert installed.returncode == 0, installed.stderr
    unit = home / ".config" / "systemd" / "user" / "privacy-relay.service"
    text = unit.read_text()
    assert f"WorkingDirectory={str(project).replace('%', '%%')}\n" in text
    command = exec_start(text)
    assert command == [sys.executable, "-m", "relay", "serve", "--config", str(project / "config" / "relay.yaml")]
    assert "systemctl --user enable --now privacy-relay.service" in installed.stdout  # no systemctl: how to start
    # The command the unit runs is this installation's relay.
    assert subprocess.run([*command[:4], "--help"], capture_output=True, timeout=60).returncode == 0
    if shutil.which("systemd-analyze"):
        verified = systemd_verify(unit, tmp_path / "runtime")
        assert verified.returncode == 0, verified.stderr
        assert str(unit) not in verified.stderr, verified.stderr  # warnings name the file, with status 0
    elif os.environ.get("PRIVACY_RELAY_TESTS_REQUIRE_SYSTEMD_ANALYZE") == "1":
        pytest.fail("systemd-analyze is missing (apt-get install systemd)")

    removed = service_command(home, project, "uninstall")

    assert removed.returncode == 0, removed.stderr
    assert not unit.exists()
    assert "Nothing to remove" in service_command(home, project, "uninstall").stdout


def test_the_launchd_agent_runs_the_relay_at_login_and_after_a_crash(tmp_path: Path) -> None:
    service = Service((sys.executable, "-m", "relay", "serve"), tmp_path)

    agent = plistlib.loads(launchd_plist(service))

    assert agent["Label"] == LAUNCHD_LABEL
    assert agent["ProgramArguments"] == [sys.executable, "-m", "relay", "serve"]
    assert agent["WorkingDirectory"] == str(tmp_path)
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["StandardErrorPath"] == str(tmp_path / "relay.log")


def test_unit_arguments_with_quotes_and_dollars_reach_the_relay_unchanged(tmp_path: Path) -> None:
    config = tmp_path / 'a "quoted" $HOME folder' / "relay.yaml"
    service = Service((sys.executable, "-m", "relay", "serve", "--config", str(config)), tmp_path)

    assert exec_start(systemd_unit(service))[-1] == str(config)

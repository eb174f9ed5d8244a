"""The compose example as Docker's own tooling reads it (starting it would need a Docker network)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.docker.conftest import COMMAND_DEADLINE, REPOSITORY, missing

pytestmark = pytest.mark.docker

COMPOSE_EXAMPLE = REPOSITORY / "contrib" / "docker" / "compose.yaml"


def compose_commands() -> list[list[str]]:
    """Debian's docker-compose (v1), and the `docker compose` plugin where it is installed."""
    commands = []
    docker = shutil.which("docker")
    if docker is not None:
        plugin = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=COMMAND_DEADLINE, check=False
        )
        if plugin.returncode == 0:
            commands.append([docker, "compose"])
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        missing("docker-compose is not installed (apt-get install docker-compose)")
    commands.append([docker_compose])
    return commands


def test_the_compose_example_is_valid_for_every_installed_compose() -> None:
    for command in compose_commands():
        checked = subprocess.run(
            [*command, "--file", str(COMPOSE_EXAMPLE), "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=COMMAND_DEADLINE,
            check=False,
        )

        assert checked.returncode == 0, f"{' '.join(command)} config: {checked.stderr}"

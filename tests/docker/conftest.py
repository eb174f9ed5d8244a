"""Container fixtures: the image built from this checkout, and relays run from it with --network host.

Set PRIVACY_RELAY_TESTS_REQUIRE_DOCKER=1 (as .ci/run does) to make a missing Docker or docker-compose a
failure instead of a skip. PRIVACY_RELAY_TESTS_DOCKER_BASE_IMAGE is passed as the Dockerfile's
BASE_IMAGE (.ci/run builds one from Debian's packages, since CI reaches no image registry); without it
the build uses the Dockerfile's default.

Containers share the host's network and listen on a free loopback port: the tests create no Docker
network and send nothing beyond loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from tests.conftest import LOOPBACK
from tests.support.spool import free_port, wait_until

REPOSITORY = Path(__file__).resolve().parents[2]
# The user the image runs the relay as.
RELAY_UID = 10001
# Seconds a docker command may take before the test fails instead of hanging; a cold build takes longest.
COMMAND_DEADLINE = 120
BUILD_DEADLINE = 600


def missing(reason: str) -> NoReturn:
    if os.environ.get("PRIVACY_RELAY_TESTS_REQUIRE_DOCKER") == "1":
        pytest.fail(f"{reason}, and PRIVACY_RELAY_TESTS_REQUIRE_DOCKER=1")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker() -> str:
    """The docker client, talking to a daemon that answers."""
    path = shutil.which("docker")
    if path is None:
        missing("docker is not installed (apt-get install docker.io)")
    info = subprocess.run([path, "info"], capture_output=True, text=True, timeout=COMMAND_DEADLINE, check=False)
    if info.returncode != 0:
        missing(f"the Docker daemon does not answer ({info.stderr.strip()})")
    return path


def run_docker(docker: str, *arguments: str, timeout: float = COMMAND_DEADLINE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([docker, *arguments], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def relay_image(docker: str) -> Iterator[str]:
    """The image built from this checkout, tagged for this test run only (runs may overlap on one daemon)."""
    tag = f"privacy-relay-test:{uuid.uuid4().hex[:12]}"
    build_arguments = ["build", "--network", "host", "--tag", tag]
    base_image = os.environ.get("PRIVACY_RELAY_TESTS_DOCKER_BASE_IMAGE")
    if base_image:
        build_arguments += ["--build-arg", f"BASE_IMAGE={base_image}"]
    built = run_docker(docker, *build_arguments, str(REPOSITORY), timeout=BUILD_DEADLINE)
    if built.returncode != 0:
        pytest.fail(f"docker build failed:\n{built.stdout}\n{built.stderr}")
    yield tag
    # --no-prune keeps the layers underneath: they are the cache the next build starts from.
    run_docker(docker, "image", "rm", "--no-prune", tag)


def relay_owned_directory(path: Path) -> Path:
    """A folder on the host that the relay's user in the container can write, to mount as a volume."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, RELAY_UID, RELAY_UID)
    else:
        path.chmod(0o777)
    return path


@dataclass
class RelayContainer:
    docker: str
    name: str
    port: int

    def inspect(self, template: str) -> str:
        result = run_docker(self.docker, "inspect", "--format", template, self.name)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def logs(self) -> str:
        result = run_docker(self.docker, "logs", self.name)
        return result.stdout + result.stderr

    def log_events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.logs().splitlines() if line.startswith("{")]

    def exec(self, *command: str) -> str:
        result = run_docker(self.docker, "exec", self.name, *command)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def stop(self) -> subprocess.CompletedProcess[str]:
        """`docker stop`, which sends SIGTERM and, after its own 10 seconds, SIGKILL."""
        return run_docker(self.docker, "stop", self.name)

    def start(self) -> None:
        started = run_docker(self.docker, "start", self.name)
        assert started.returncode == 0, started.stderr
        self.wait_until_serving()

    def wait_until_serving(self) -> None:
        def greets() -> bool:
            if self.inspect("{{.State.Running}}") != "true":
                pytest.fail(f"the relay's container exited:\n{self.logs()}")
            try:
                with smtplib.SMTP(LOOPBACK, self.port, timeout=5):
                    return True
            except OSError:
                return False

        if not wait_until(greets, limit=COMMAND_DEADLINE):
            pytest.fail(f"the relay in the container did not start listening:\n{self.logs()}")


@pytest.fixture
def run_relay_container(docker: str, relay_image: str) -> Iterator[Callable[..., RelayContainer]]:
    """run_relay_container(volumes={host_path: container_path}, docker_options=[...], RELAY_X="...") -> a
    running container whose relay greets on its free loopback port; removed after the test.

    RELAY_LISTEN_ALLOWED_NETWORKS is 127.0.0.1/32, as the open-relay guard requires in the image."""
    started: list[RelayContainer] = []

    def start(
        volumes: dict[Path, str] | None = None, docker_options: tuple[str, ...] = (), **settings: str
    ) -> RelayContainer:
        container = RelayContainer(docker, f"privacy-relay-test-{uuid.uuid4().hex[:12]}", free_port())
        environ = {
            "RELAY_LISTEN_PORT": str(container.port),
            "RELAY_LISTEN_ALLOWED_NETWORKS": "127.0.0.1/32",
            "RELAY_LOGGING_FORMAT": "json",
            **settings,
        }
        arguments = ["run", "--detach", "--network", "host", "--name", container.name]
        for name, value in environ.items():
            arguments += ["--env", f"{name}={value}"]
        for host_path, container_path in (volumes or {}).items():
            arguments += ["--volume", f"{host_path}:{container_path}"]
        created = run_docker(docker, *arguments, *docker_options, relay_image)
        assert created.returncode == 0, created.stderr
        started.append(container)
        container.wait_until_serving()
        return container

    yield start
    for container in started:
        run_docker(docker, "rm", "--force", "--volumes", container.name)

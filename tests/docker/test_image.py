"""The sidecar image as a user runs it: built from this checkout, started with `docker run`."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from email import message_from_bytes
from email.policy import default
from pathlib import Path

import pytest

from tests.conftest import LoopThread, RecordingHandler
from tests.docker.conftest import RELAY_UID, RelayContainer, relay_owned_directory, run_docker
from tests.support.spool import FAST_RETRIES, UpstreamOnPort, copy_keys, free_port, send_split_messages, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.docker]

OUTBOX = "/var/lib/privacy-relay/outbox"
SPOOL = "/var/spool/privacy-relay"
INVITATION = (
    b"From: Coach <coach@coaching.test>\r\n"
    b"To: Ann <ann@one.test>, bob@two.test\r\n"
    b"Cc: cy@three.test\r\n"
    b"Subject: Workshop\r\n"
    b"\r\n"
    b"See you on Saturday.\r\n"
)
EVERYONE = ["ann@one.test", "bob@two.test", "cy@three.test"]


def test_the_image_declares_its_user_volumes_and_health_check(docker: str, relay_image: str) -> None:
    inspected = run_docker(
        docker,
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}|{{range $path, $_ := .Config.Volumes}}{{$path}} {{end}}|{{len .Config.Healthcheck.Test}}",
        relay_image,
    )

    assert inspected.returncode == 0, inspected.stderr
    user, volumes, health_check_words = inspected.stdout.strip().split("|")
    assert user == f"{RELAY_UID}:{RELAY_UID}"
    assert sorted(volumes.split()) == [OUTBOX, SPOOL]
    assert int(health_check_words) > 1


def test_the_relay_runs_as_uid_10001(run_relay_container: Callable[..., RelayContainer]) -> None:
    container = run_relay_container()

    # Process 1 in the container is the relay itself, not a shell that started it.
    status = dict(line.split(":", 1) for line in container.exec("cat", "/proc/1/status").splitlines())
    assert "privacy-relay" in container.exec("cat", "/proc/1/cmdline").replace("\0", " ")
    assert status["Uid"].split() == [str(RELAY_UID)] * 4
    assert status["Gid"].split() == [str(RELAY_UID)] * 4


def test_without_allowed_networks_the_relay_refuses_to_start(docker: str, relay_image: str) -> None:
    # The image listens on 0.0.0.0: without allowed networks it would be an open relay.
    refused = run_docker(docker, "run", "--rm", "--network", "host", relay_image)

    assert refused.returncode == 2
    assert "open relay" in refused.stderr
    assert "RELAY_LISTEN_ALLOWED_NETWORKS=127.0.0.1/32," in refused.stderr


def test_a_message_sent_with_swaks_is_split_into_the_outbox_volume(
    run_relay_container: Callable[..., RelayContainer],
    swaks: Callable[..., subprocess.CompletedProcess[str]],
    tmp_path: Path,
) -> None:
    outbox = relay_owned_directory(tmp_path / "outbox")
    container = run_relay_container(volumes={outbox: OUTBOX})

    sent = swaks(container, "coach@coaching.test", EVERYONE, INVITATION)

    assert sent.returncode == 0, sent.stdout
    assert "250 2.0.0 OK: relayed as 3 copies" in sent.stdout
    copies = [message_from_bytes(path.read_bytes(), policy=default) for path in sorted(outbox.glob("*.eml"))]
    shown = sorted(address.addr_spec for copy in copies for address in copy["To"].addresses)
    assert shown == EVERYONE
    assert all(len(copy["To"].addresses) == 1 and copy["Cc"] is None for copy in copies)


def test_the_health_check_turns_healthy(run_relay_container: Callable[..., RelayContainer]) -> None:
    # The image's own check command, run every second instead of every 30 so the test is quick.
    container = run_relay_container(docker_options=("--health-interval", "1s"))

    assert wait_until(lambda: container.inspect("{{.State.Health.Status}}") == "healthy", limit=60), container.inspect(
        "{{json .State.Health}}"
    )


def test_docker_stop_ends_the_relay_cleanly_within_its_grace_period(
    run_relay_container: Callable[..., RelayContainer], record_property: Callable[[str, object], None]
) -> None:
    container = run_relay_container()

    started = time.monotonic()
    stopped = container.stop()
    record_property("docker_stop_seconds", round(time.monotonic() - started, 2))

    assert stopped.returncode == 0, stopped.stderr
    # docker stop sends SIGKILL after 10 seconds: a relay that ignored SIGTERM would exit 137.
    assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()


def test_mail_spooled_while_the_upstream_was_down_is_delivered_after_a_restart(
    run_relay_container: Callable[..., RelayContainer], loops: LoopThread, tmp_path: Path
) -> None:
    spool = relay_owned_directory(tmp_path / "spool")
    upstream = UpstreamOnPort(loops, RecordingHandler(), free_port())
    container = run_relay_container(
        volumes={spool: SPOOL},
        RELAY_UPSTREAM_HOST="127.0.0.1",
        RELAY_UPSTREAM_PORT=str(upstream.port),
        RELAY_UPSTREAM_TLS="none",
        RELAY_DELIVERY_MODE="queue",
        **FAST_RETRIES,
    )

    accepted = send_split_messages(container.port, count=2, recipients_each=2, tag="restart")
    assert wait_until(lambda: any(e["event"] == "copy.attempted" and e["retry"] for e in container.log_events())), (
        container.logs()
    )
    assert container.stop().returncode == 0
    assert (spool / "spool.db").is_file()
    upstream.start()
    try:
        container.start()

        assert wait_until(lambda: len(upstream.handler.messages) >= len(accepted)), container.logs()
        assert sorted(copy_keys(upstream.handler.messages)) == sorted(accepted)
        assert container.stop().returncode == 0
    finally:
        upstream.stop()

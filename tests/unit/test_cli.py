"""The privacy-relay command as a person runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relay import __version__
from relay.admin.cli import main
from tests.conftest import LOOPBACK, Upstream

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("privacy-relay"))
INVITATION = (
    b"From: Coach <coach@coaching.test>\r\n"
    b"To: Ann <ann@one.test>, bob@two.test, Cy <cy@three.test>\r\n"
    b"Cc: dee@four.test, Eve <eve@five.test>\r\n"
    b"Bcc: fay@six.test\r\n"
    b"Subject: Workshop\r\n"
    b"\r\n"
    b"See you there.\r\n"
)
CREDENTIALS = ("relay-user", "correct horse battery staple")


def run(*args: str, cwd: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """privacy-relay ARGS with only the given RELAY_* settings (none inherited from the caller)."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("RELAY_")}
    environ.update(settings)
    return subprocess.run(
        [CONSOLE_SCRIPT, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=30, check=False
    )


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
    return port


def test_version(tmp_path: Path) -> None:
    result = run("--version", cwd=tmp_path)

    assert result.returncode == 0
    assert result.stdout.strip() == f"privacy-relay {__version__}"


def test_python_dash_m_relay_is_the_same_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 0
    assert result.stdout.strip() == f"privacy-relay {__version__}"


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        ([], ["serve", "check", "preview"]),
        (["serve"], ["--config"]),
        (["check"], ["--config"]),
        (["preview"], ["FILE.eml", "--config", "--mail-from", "--rcpt"]),
    ],
)
def test_help_on_every_level(capsys: pytest.CaptureFixture[str], args: list[str], mentions: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--help"])

    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: privacy-relay")
    for word in mentions:
        assert word in shown


def test_preview_prints_the_decision_and_the_headers_of_every_copy(tmp_path: Path) -> None:
    (tmp_path / "invitation.eml").write_bytes(INVITATION)

    result = run("preview", "invitation.eml", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "decision: split" in result.stdout
    assert "copies:   6" in result.stdout
    blocks = result.stdout.split("\n--- copy ")[1:]
    assert len(blocks) == 6
    shown = sorted(line for block in blocks for line in block.splitlines() if line.startswith("To: "))
    assert shown == [
        "To: Ann <ann@one.test>",
        "To: Cy <cy@three.test>",
        "To: Eve <eve@five.test>",
        "To: bob@two.test",
        "To: dee@four.test",
        "To: fay@six.test",
    ]
    assert "Bcc:" not in result.stdout
    assert "Cc:" not in result.stdout


def test_preview_with_an_explicit_envelope_and_a_config_file(tmp_path: Path) -> None:
    (tmp_path / "invitation.eml").write_bytes(INVITATION)
    (tmp_path / "bcc.yaml").write_text("policy:\n  action: bcc\n")

    result = run(
        "preview",
        "invitation.eml",
        "--config",
        "bcc.yaml",
        "--mail-from",
        "coach@coaching.test",
        "--rcpt",
        "ann@one.test",
        "--rcpt",
        "bob@two.test",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert "envelope: from <coach@coaching.test> to 2 recipient(s)" in result.stdout
    assert "decision: bcc" in result.stdout
    assert "copies:   1" in result.stdout
    assert "To: undisclosed-recipients:;" in result.stdout


def test_preview_of_a_missing_file_says_so(tmp_path: Path) -> None:
    result = run("preview", "nowhere.eml", cwd=tmp_path)

    assert result.returncode == 1
    assert "cannot read nowhere.eml" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_without_upstream_points_at_the_outbox(tmp_path: Path) -> None:
    result = run("check", cwd=tmp_path)

    assert result.returncode == 0
    assert "config: OK" in result.stdout
    assert f"copies will be written to {tmp_path.resolve() / 'outbox'}" in result.stdout


def test_check_against_a_plain_upstream(tmp_path: Path, upstream: Upstream) -> None:
    result = run(
        "check",
        cwd=tmp_path,
        RELAY_UPSTREAM_HOST=upstream.host,
        RELAY_UPSTREAM_PORT=str(upstream.port),
        RELAY_UPSTREAM_TLS="none",
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "connect: OK" in result.stdout
    assert "upstream: ready" in result.stdout
    assert upstream.messages == []


def test_check_with_starttls_and_auth(tmp_path: Path, make_upstream) -> None:
    upstream = make_upstream(tls="starttls", credentials=CREDENTIALS)
    upstream.ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    settings = {
        "RELAY_UPSTREAM_HOST": upstream.host,
        "RELAY_UPSTREAM_PORT": str(upstream.port),
        "RELAY_UPSTREAM_CA_FILE": str(tmp_path / "ca.pem"),
        "RELAY_UPSTREAM_USERNAME": CREDENTIALS[0],
    }

    good = run("check", cwd=tmp_path, RELAY_UPSTREAM_PASSWORD=CREDENTIALS[1], **settings)
    bad = run("check", cwd=tmp_path, RELAY_UPSTREAM_PASSWORD="wrong", **settings)

    assert good.returncode == 0, good.stdout + good.stderr
    assert "starttls: OK" in good.stdout
    assert f"auth: OK: logged in as {CREDENTIALS[0]}" in good.stdout
    assert bad.returncode == 1
    assert "starttls: OK" in bad.stdout
    assert "auth: FAILED" in bad.stdout
    assert "upstream: NOT ready" in bad.stdout
    assert "wrong" not in bad.stdout + bad.stderr


def test_check_says_when_the_upstream_offers_no_starttls(tmp_path: Path, upstream: Upstream) -> None:
    result = run(
        "check",
        cwd=tmp_path,
        RELAY_UPSTREAM_HOST=upstream.host,
        RELAY_UPSTREAM_PORT=str(upstream.port),
        RELAY_UPSTREAM_TLS="starttls",
    )

    assert result.returncode == 1
    assert f"starttls: FAILED: {upstream.host}:{upstream.port} does not offer STARTTLS" in result.stdout


def test_check_against_a_closed_port_fails_in_plain_words(tmp_path: Path) -> None:
    result = run(
        "check",
        cwd=tmp_path,
        RELAY_UPSTREAM_HOST=LOOPBACK,
        RELAY_UPSTREAM_PORT=str(closed_port()),
        RELAY_UPSTREAM_TLS="none",
    )

    assert result.returncode == 1
    assert "connect: FAILED" in result.stdout
    assert "upstream: NOT ready" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_serve_with_a_bad_config_prints_the_error_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "relay.yaml").write_text("listen:\n  port: 1025\n  max_recipient: 10\n")

    result = run("serve", "--config", "relay.yaml", cwd=tmp_path, RELAY_POLICY_ACTION="shred")

    assert result.returncode == 2
    assert result.stderr.startswith("privacy-relay: invalid configuration:")
    assert "listen.max_recipient: unknown key" in result.stderr
    assert "policy.action" in result.stderr
    assert "RELAY_POLICY_ACTION" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_open_relay(tmp_path: Path) -> None:
    result = run("serve", cwd=tmp_path, RELAY_LISTEN_HOST="0.0.0.0", RELAY_LISTEN_PORT="0")

    assert result.returncode == 2
    assert "open relay" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_and_preview_name_the_relay_by_listen_hostname(tmp_path: Path, upstream: Upstream) -> None:
    (tmp_path / "invitation.eml").write_bytes(INVITATION)
    settings = {
        "RELAY_LISTEN_HOSTNAME": "relay.office.test",
        "RELAY_UPSTREAM_HOST": upstream.host,
        "RELAY_UPSTREAM_PORT": str(upstream.port),
        "RELAY_UPSTREAM_TLS": "none",
    }

    checked = run("check", cwd=tmp_path, **settings)
    previewed = run("preview", "invitation.eml", cwd=tmp_path, **settings)

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "listen hostname: OK: relay.office.test" in checked.stdout
    assert previewed.returncode == 0, previewed.stderr
    assert previewed.stdout.count("\tby relay.office.test (privacy-relay)") == 6

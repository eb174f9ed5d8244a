"""The office relay as deployed: `privacy-relay serve` in its own process, swaks as a desk's mail
program with STARTTLS and AUTH, and `privacy-relay user add` creating the account it logs in with."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import RelayCertificate, Upstream
from tests.e2e.conftest import CONSOLE_SCRIPT

PASSWORD = "a desk's long password"
MESSAGE = b"From: kay@office.test\r\nTo: ann@one.test, bob@two.test\r\nSubject: e2e\r\n\r\nHello.\r\n"


def swaks_office(swaks_path: str, port: int, tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE.removesuffix(b"\r\n"))
    command = [swaks_path, "--server", f"127.0.0.1:{port}", "--helo", "desk.test", "--from", "kay@office.test"]
    command += ["--to", "ann@one.test,bob@two.test", "--data", f"@{message}", "--timeout", "20", *options]
    return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_a_desk_logs_in_over_starttls_and_sends(
    serve_relay, swaks_path: str, upstream: Upstream, relay_certificate: RelayCertificate, tmp_path: Path
) -> None:
    users = tmp_path / "users.yaml"
    added = subprocess.run(
        [CONSOLE_SCRIPT, "user", "add", "kay", "--address", "kay@office.test"],
        input=PASSWORD,
        capture_output=True,
        text=True,
        env={"PATH": "", "RELAY_LISTEN_USERS_FILE": str(users)},
        cwd=tmp_path,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    relay = serve_relay(
        RELAY_UPSTREAM_HOST=upstream.host,
        RELAY_UPSTREAM_PORT=str(upstream.port),
        RELAY_UPSTREAM_TLS="none",
        RELAY_LISTEN_TLS="starttls",
        RELAY_LISTEN_CERT_FILE=str(relay_certificate.cert_file),
        RELAY_LISTEN_KEY_FILE=str(relay_certificate.key_file),
        RELAY_LISTEN_AUTH="required",
        RELAY_LISTEN_USERS_FILE=str(users),
    )
    without_login = swaks_office(swaks_path, relay.port, tmp_path, "--tls")
    assert "530 5.7.0 Authentication required" in without_login.stdout
    wrong = swaks_office(
        swaks_path, relay.port, tmp_path, "--tls", "--auth", "LOGIN", "--auth-user", "kay", "--auth-password", "nope"
    )
    assert "535 5.7.8" in wrong.stdout
    sent = swaks_office(
        swaks_path, relay.port, tmp_path, "--tls", "--auth", "PLAIN", "--auth-user", "kay", "--auth-password", PASSWORD
    )
    assert sent.returncode == 0, sent.stdout
    assert sorted(r for m in upstream.messages for r in m.rcpt_tos) == ["ann@one.test", "bob@two.test"]
    assert all(b"with ESMTPSA id" in m.data for m in upstream.messages)
    assert PASSWORD not in relay.log_path.read_text()

"""docs/office-relay.md and contrib/systemd as an administrator uses them: the guide's own commands, run."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "office-relay.md"
UNIT = ROOT / "contrib" / "systemd" / "privacy-relay.service"
RELAY_NAME = "relay.company.example"


def guide_block_with(marker: str) -> str:
    """The guide's shell block that contains `marker`, without the list indentation around it."""
    blocks = re.findall(r"^( *)```sh\n(.*?)^\1```$", GUIDE.read_text(), re.MULTILINE | re.DOTALL)
    matching = [(indent, body) for indent, body in blocks if marker in body]
    assert len(matching) == 1, f"expected one ```sh block with {marker!r} in {GUIDE}"
    indent, body = matching[0]
    return "\n".join(line.removeprefix(indent) for line in body.splitlines()) + "\n"


def strict_client_context(ca_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default
    return context


def handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext, server_name: str) -> None:
    """A TLS handshake over a socket pair: raises ssl.SSLError when the client refuses the certificate."""
    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        server_end.settimeout(10)
        client_end.settimeout(10)

        def serve() -> None:
            with contextlib.suppress(OSError), server_context.wrap_socket(server_end, server_side=True):
                pass  # the client's verdict is what counts

        server = threading.Thread(target=serve)
        server.start()
        try:
            with client_context.wrap_socket(client_end, server_hostname=server_name):
                pass
        finally:
            server.join(10)


@pytest.fixture(scope="module")
def guide_certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the guide's own CA recipe makes, run exactly as printed there."""
    folder = tmp_path_factory.mktemp("guide-ca")
    recipe = guide_block_with("openssl req -x509")
    ran = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", recipe], cwd=folder, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    assert "relay.crt: OK" in ran.stdout  # the recipe's own `openssl verify -x509_strict`
    return folder


def test_the_guides_ca_recipe_passes_a_strict_python_client(guide_certificates: Path) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(guide_certificates / "relay.crt", guide_certificates / "relay.key")

    handshake(server_context, strict_client_context(guide_certificates / "ca.crt"), RELAY_NAME)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context, strict_client_context(guide_certificates / "ca.crt"), "other.company.example")


def test_the_guides_ca_recipe_keeps_the_keys_private(guide_certificates: Path) -> None:
    for key in ("ca.key", "relay.key"):
        assert (guide_certificates / key).stat().st_mode & 0o077 == 0


def test_the_systemd_unit_runs_the_office_relay_as_the_guide_says() -> None:
    settings = [line.strip() for line in UNIT.read_text().splitlines() if line and not line.startswith("#")]
    for setting in (
        "User=privacy-relay",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "Restart=on-failure",
        "WorkingDirectory=/var/spool/privacy-relay",
        "ReadWritePaths=/var/spool/privacy-relay",
        "ExecStart=/opt/privacy-relay/bin/privacy-relay serve --config /etc/privacy-relay/relay.yaml",
        "WantedBy=multi-user.target",
    ):
        assert setting in settings
    assert "spool:\n  path: /var/spool/privacy-relay\n" in GUIDE.read_text()


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("PRIVACY_RELAY_TESTS_REQUIRE_SYSTEMD_ANALYZE") == "1":
            pytest.fail("systemd-analyze is missing (apt-get install systemd)")
        pytest.skip("systemd-analyze is missing (apt-get install systemd)")
    # verify wants ExecStart's program to exist: point it at the one installed here.
    installed = Path(sys.executable).with_name("privacy-relay")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/privacy-relay/bin/privacy-relay", str(installed)))
    # It works without systemd as PID 1 (as in a container); warnings such as unknown keys go to stderr.
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (verified.returncode, verified.stderr) == (0, "")

"""Start-up rules of the office relay: the bind rule, TLS files, the accounts file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from cryptography.hazmat.primitives import serialization

from relay.config.loading import load_config
from relay.config.models import ConfigError
from relay.server import RelayServer, warn_about_secret_files
from tests.conftest import RelayCertificate, relay_config


def test_a_lan_bind_needs_allowed_networks_or_required_auth(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(None, {"RELAY_LISTEN_HOST": "0.0.0.0"})
    assert "listen.allowed_networks" in str(refused.value)
    assert "listen.auth" in str(refused.value)
    with pytest.raises(ConfigError):
        load_config(None, {"RELAY_LISTEN_HOST": "0.0.0.0", "RELAY_LISTEN_AUTH": "optional"})
    assert load_config(None, {"RELAY_LISTEN_HOST": "0.0.0.0", "RELAY_LISTEN_ALLOWED_NETWORKS": "10.0.0.0/8"})
    required = {
        "RELAY_LISTEN_HOST": "0.0.0.0",
        "RELAY_LISTEN_AUTH": "required",
        "RELAY_LISTEN_TLS": "starttls",
        "RELAY_LISTEN_CERT_FILE": "cert.pem",
        "RELAY_LISTEN_KEY_FILE": "key.pem",
    }
    assert load_config(None, required).listen.auth == "required"


def test_required_auth_on_the_lan_needs_tls() -> None:
    with pytest.raises(ConfigError, match=r"listen\.tls: starttls"):
        load_config(None, {"RELAY_LISTEN_HOST": "0.0.0.0", "RELAY_LISTEN_AUTH": "required"})


def test_tls_needs_certificate_and_key() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(None, {"RELAY_LISTEN_TLS": "implicit", "RELAY_LISTEN_CERT_FILE": "cert.pem"})
    assert "listen: " in str(refused.value)
    assert "cert_file and key_file must both be set" in str(refused.value)


def test_unusable_certificate_files_stop_start_up(tmp_path: Path, relay_certificate: RelayCertificate) -> None:
    def start(cert: Path, key: Path) -> str:
        config = relay_config(
            tmp_path,
            {"RELAY_LISTEN_TLS": "starttls", "RELAY_LISTEN_CERT_FILE": str(cert), "RELAY_LISTEN_KEY_FILE": str(key)},
        )
        with pytest.raises(ConfigError) as refused:
            RelayServer(config)
        return str(refused.value)

    assert "cannot read" in start(tmp_path / "missing.pem", relay_certificate.key_file)
    assert "matching private key" in start(relay_certificate.cert_file, relay_certificate.cert_file)
    key = serialization.load_pem_private_key(relay_certificate.key_file.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    assert "encrypted" in start(relay_certificate.cert_file, encrypted)


def test_serve_refuses_to_start_without_the_accounts_file(tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "RELAY_LISTEN_PORT": "0",
        "RELAY_LISTEN_AUTH": "required",
        "RELAY_LISTEN_USERS_FILE": str(tmp_path / "users.yaml"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=60,
    )
    assert result.returncode == 2
    assert "listen.users_file" in result.stderr
    assert "privacy-relay user add" in result.stderr


def test_start_up_warns_when_others_can_read_the_accounts_file(tmp_path: Path, write_users) -> None:
    users = write_users(kay=[])
    config = relay_config(tmp_path, {"RELAY_LISTEN_AUTH": "required", "RELAY_LISTEN_USERS_FILE": str(users)})
    with structlog.testing.capture_logs() as logs:
        warn_about_secret_files(config)
        users.chmod(0o644)
        warn_about_secret_files(config)
    warnings = [entry for entry in logs if entry["event"] == "relay.secret_file_readable"]
    assert [(w["key"], w["fix"]) for w in warnings] == [("listen.users_file", f"chmod 600 {users}")]


def test_check_loads_the_certificate_and_the_accounts_file(tmp_path: Path, relay_certificate, write_users) -> None:
    def check(**settings: str) -> subprocess.CompletedProcess[str]:
        environment = {name: value for name, value in os.environ.items() if not name.startswith("RELAY_")}
        environment.update(settings)
        return subprocess.run(
            [sys.executable, "-m", "relay", "check"],
            capture_output=True,
            text=True,
            cwd=elsewhere,
            env=environment,
            timeout=60,
        )

    elsewhere = tmp_path / "elsewhere"  # no ./users.yaml here
    elsewhere.mkdir()
    tls = relay_certificate.listen_settings()
    users = str(write_users(kay=[], lee=[]))
    good = check(**tls, RELAY_LISTEN_AUTH="required", RELAY_LISTEN_USERS_FILE=users)
    assert good.returncode == 0, good.stdout
    assert "listen tls: OK: starttls" in good.stdout
    assert f"listen auth: OK: required, 2 user(s) in {users}" in good.stdout
    bad = check(**{**tls, "RELAY_LISTEN_KEY_FILE": str(relay_certificate.cert_file)}, RELAY_LISTEN_AUTH="optional")
    assert bad.returncode == 1
    assert "listen tls: FAILED" in bad.stdout
    assert "listen auth: FAILED: listen.users_file" in bad.stdout

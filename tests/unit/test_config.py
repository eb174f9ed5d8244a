"""The configuration contract: defaults, YAML + RELAY_* environment, and errors that name the key."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from relay.config.loading import load_config
from relay.config.models import ConfigError, PolicyConfig


@pytest.fixture(autouse=True)
def _no_config_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # load_config() reads ./config/relay.yaml when it exists: run in an empty folder.
    monkeypatch.chdir(tmp_path)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    return path


def error_of(path: Path | None = None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(path, environ or {})
    return str(error.value)


def test_defaults_match_the_documented_contract() -> None:
    config = load_config(None, {})

    assert config.listen.host == "127.0.0.1"
    assert config.listen.port == 1025
    assert config.listen.max_message_size == 52_428_800
    assert config.listen.max_recipients == 1000
    assert config.listen.allowed_networks == ()
    assert config.listen.hostname is None
    assert config.listen.max_connections_per_ip == 50
    assert config.upstream.host is None
    assert config.upstream.port == 587
    assert config.upstream.tls == "starttls"
    assert config.upstream.verify_certificate is True
    assert config.upstream.ca_file is None
    assert config.upstream.username is None
    assert config.upstream.password_file is None
    assert config.upstream.max_connections == 4
    assert config.upstream.timeout == 60
    assert config.outbox == Path("./outbox")
    assert config.delivery.mode == "hybrid"
    assert config.spool.path == Path("./spool")
    assert config.policy.action == "split"
    assert config.policy.min_recipients == 2
    assert config.policy.internal_domains == ()
    assert config.policy.always_visible == ()
    assert config.logging.level == "info"
    assert config.logging.format == "auto"
    assert config.logging.show_addresses is False
    assert config.uses_outbox
    assert config.upstream_password is None


def test_config_relay_yaml_in_the_working_directory_is_read_by_default(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "relay.yaml").write_text("policy:\n  action: bcc\n")

    assert load_config(None, {}).policy.action == "bcc"


def test_yaml_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
listen:
  port: 2525
  allowed_networks: [10.0.0.0/8]
upstream:
  host: smtp.example.com
  port: 465
  tls: implicit
outbox: /var/spool/outbox
policy:
  action: bcc
  internal_domains: [example.org]
logging:
  show_addresses: true
""",
    )
    environ = {
        "RELAY_LISTEN_PORT": "2626",
        "RELAY_POLICY_ACTION": "reject",
        "RELAY_POLICY_ALWAYS_VISIBLE": "boss@example.org, assistant@example.org",
        "RELAY_LISTEN_ALLOWED_NETWORKS": "192.168.1.0/24,10.1.0.0/16",
        "RELAY_UPSTREAM_VERIFY_CERTIFICATE": "false",
    }

    config = load_config(path, environ)

    assert config.listen.port == 2626
    assert config.listen.allowed_networks == ("192.168.1.0/24", "10.1.0.0/16")
    assert config.upstream.host == "smtp.example.com"
    assert config.upstream.port == 465
    assert config.upstream.tls == "implicit"
    assert config.upstream.verify_certificate is False
    assert config.outbox == Path("/var/spool/outbox")
    assert config.policy.action == "reject"
    assert config.policy.internal_domains == ("example.org",)
    assert config.policy.always_visible == ("boss@example.org", "assistant@example.org")
    assert config.logging.show_addresses is True
    assert not config.uses_outbox


def test_empty_environment_list_clears_the_file_list(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "policy:\n  internal_domains: [example.org]\n")

    assert load_config(path, {"RELAY_POLICY_INTERNAL_DOMAINS": ""}).policy.internal_domains == ()


def test_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "upstream:\n  hots: smtp.example.com\n")

    message = error_of(path)

    assert "upstream.hots" in message
    assert "unknown key" in message
    assert str(path) in message


def test_unknown_section_names_the_section(tmp_path: Path) -> None:
    message = error_of(write_yaml(tmp_path, "upsteam:\n  host: smtp.example.com\n"))

    assert "upsteam" in message
    assert "unknown key" in message


def test_unknown_environment_variable_is_named() -> None:
    message = error_of(environ={"RELAY_UPSTREAM_HOTS": "smtp.example.com"})

    assert "RELAY_UPSTREAM_HOTS" in message


def test_wrong_type_in_the_file_names_the_key_the_value_and_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "listen:\n  port: twenty-five\n")

    message = error_of(path)

    assert "listen.port" in message
    assert "twenty-five" in message
    assert str(path) in message


def test_wrong_type_in_the_environment_names_the_variable(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "listen:\n  port: 2525\n")

    message = error_of(path, {"RELAY_LISTEN_PORT": "many"})

    assert "listen.port" in message
    assert "RELAY_LISTEN_PORT" in message
    assert str(path) not in message


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("listen:\n  port: 70000\n", "listen.port"),
        ("listen:\n  max_recipients: 0\n", "listen.max_recipients"),
        ("listen:\n  allowed_networks: [10.0.0.0/33]\n", "allowed_networks"),
        ("upstream:\n  tls: ssl\n", "upstream.tls"),
        ("upstream:\n  max_connections: 0\n", "upstream.max_connections"),
        ("upstream:\n  timeout: -1\n", "upstream.timeout"),
        ("policy:\n  action: drop\n", "policy.action"),
        ("policy:\n  min_recipients: 1\n", "policy.min_recipients"),
        ("delivery:\n  mode: carrier-pigeon\n", "delivery.mode"),
        ("logging:\n  format: xml\n", "logging.format"),
    ],
)
def test_impossible_values_name_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    path = write_yaml(tmp_path, yaml_text)

    message = error_of(path)

    assert key in message
    assert str(path) in message


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "- listen\n- upstream\n")

    assert str(path) in error_of(path)


def test_broken_yaml_is_refused_with_the_file_name(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "listen:\n  port: [1025\n")

    message = error_of(path)

    assert str(path) in message
    assert "not valid YAML" in message


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"

    message = error_of(path)

    assert str(path) in message
    assert "cannot read" in message


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_non_loopback_bind_without_allowed_networks_is_refused_as_an_open_relay(host: str) -> None:
    message = error_of(environ={"RELAY_LISTEN_HOST": host})

    assert "listen.allowed_networks" in message
    assert "open relay" in message


def test_the_container_suggestion_followed_literally_lets_the_health_check_in() -> None:
    message = error_of(environ={"RELAY_LISTEN_HOST": "0.0.0.0"})
    suggested = re.search(r"RELAY_LISTEN_ALLOWED_NETWORKS=(\S+)", message)
    assert suggested is not None

    networks = load_config(
        None, {"RELAY_LISTEN_HOST": "0.0.0.0", "RELAY_LISTEN_ALLOWED_NETWORKS": suggested.group(1)}
    ).listen.networks()

    # The image's health check connects from inside the container.
    assert any(ipaddress.ip_address("127.0.0.1") in network for network in networks)


def test_non_loopback_bind_with_allowed_networks_is_accepted() -> None:
    config = load_config(None, {"RELAY_LISTEN_HOST": "0.0.0.0", "RELAY_LISTEN_ALLOWED_NETWORKS": "172.16.0.0/12"})

    assert config.listen.host == "0.0.0.0"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_binds_need_no_allowed_networks(host: str) -> None:
    assert load_config(None, {"RELAY_LISTEN_HOST": host}).listen.host == host


def test_password_from_password_file(tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("s3cret with spaces \n")
    path = write_yaml(
        tmp_path, f"upstream:\n  host: smtp.example.com\n  username: me\n  password_file: {password_file}\n"
    )

    config = load_config(path, {})

    assert config.upstream_password is not None
    assert config.upstream_password.get_secret_value() == "s3cret with spaces "


def test_password_from_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("from-file\n")
    environ = {
        "RELAY_UPSTREAM_HOST": "smtp.example.com",
        "RELAY_UPSTREAM_USERNAME": "me",
        "RELAY_UPSTREAM_PASSWORD_FILE": str(password_file),
        "RELAY_UPSTREAM_PASSWORD": "from-env",
    }

    config = load_config(None, environ)

    assert config.upstream_password is not None
    assert config.upstream_password.get_secret_value() == "from-env"


def test_password_never_appears_in_the_config_dump() -> None:
    config = load_config(None, {"RELAY_UPSTREAM_USERNAME": "me", "RELAY_UPSTREAM_PASSWORD": "hunter2"})

    assert "hunter2" not in repr(config)
    assert "hunter2" not in config.model_dump_json()


def test_unreadable_password_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-password"

    message = error_of(environ={"RELAY_UPSTREAM_USERNAME": "me", "RELAY_UPSTREAM_PASSWORD_FILE": str(missing)})

    assert "upstream.password_file" in message
    assert str(missing) in message


def test_username_without_any_password_is_refused() -> None:
    message = error_of(environ={"RELAY_UPSTREAM_HOST": "smtp.example.com", "RELAY_UPSTREAM_USERNAME": "me"})

    assert "upstream.username" in message
    assert "RELAY_UPSTREAM_PASSWORD" in message


def test_config_is_immutable() -> None:
    config = load_config(None, {})

    with pytest.raises(ValueError, match="frozen"):
        config.listen.port = 25  # type: ignore[misc]


def test_rate_limits_need_a_single_worker_because_each_process_counts_its_own() -> None:
    with pytest.raises(ConfigError, match=r"upstream\.rate_limit.*listen\.workers"):
        load_config(None, {"RELAY_LISTEN_WORKERS": "2", "RELAY_UPSTREAM_RATE_LIMIT_PER_DAY": "500"})
    assert load_config(None, {"RELAY_UPSTREAM_RATE_LIMIT_PER_DAY": "500"}).listen.workers == 1


def test_a_shared_spool_counts_every_workers_sends_so_rate_limits_allow_workers() -> None:
    settings = {"RELAY_LISTEN_WORKERS": "2", "RELAY_UPSTREAM_RATE_LIMIT_PER_DAY": "500"}
    config = load_config(None, {**settings, "RELAY_SPOOL_URL": "postgresql://relay@db.test/privacy_relay"})
    assert config.listen.workers == 2 and config.spool.shared


def test_the_spool_url_is_postgresql_and_holds_no_password() -> None:
    with pytest.raises(ConfigError, match="url: expected postgresql"):
        load_config(None, {"RELAY_SPOOL_URL": "mysql://relay@db.test/x"})
    with pytest.raises(ConfigError, match="password_file"):
        load_config(None, {"RELAY_SPOOL_URL": "postgresql://relay:secret@db.test/x"})


def test_policy_settings_carry_every_policy_key_to_the_core() -> None:
    policy = PolicyConfig(
        action="bcc",
        min_recipients=3,
        internal_domains=("office.test",),
        always_visible=("team@office.test",),
        calendar="pass",
        tnef="pass",
        override_tag="[visible]",
    )
    settings = policy.settings()
    assert {f.name for f in fields(settings)} == set(PolicyConfig.model_fields)
    assert asdict(settings) == policy.model_dump()


@pytest.mark.parametrize(
    "hostname", ["relay.office.example", "MAIL-1.Office.Example", "[192.0.2.25]", "[IPv6:2001:db8::25]"]
)
def test_listen_hostname_accepts_what_a_receiving_server_takes_in_ehlo(hostname: str) -> None:
    assert load_config(None, {"RELAY_LISTEN_HOSTNAME": hostname}).listen.own_hostname() == (hostname, True)


@pytest.mark.parametrize(
    ("hostname", "why"),
    [
        ("vm", "not a fully qualified domain name"),
        ("relay_1.office.example", "not a fully qualified domain name"),
        ("-relay.office.example", "not a fully qualified domain name"),
        ("relay.office.example.", "not a fully qualified domain name"),
        ("192.0.2.25", "write it as an address literal"),
        ("[IPv6:192.0.2.25]", "not an address literal"),
        ("[2001:db8::25]", "not an address literal"),
    ],
)
def test_listen_hostname_refuses_names_a_receiving_server_would_not_take(hostname: str, why: str) -> None:
    message = error_of(environ={"RELAY_LISTEN_HOSTNAME": hostname})

    assert "listen" in message and repr(hostname) in message and why in message


@pytest.mark.parametrize(
    ("fqdn", "short", "expected"),
    [
        ("desk7.office.example", "desk7", ("desk7.office.example", True)),
        ("localhost", "vm", ("vm.localdomain", False)),
        ("vm", "vm", ("vm.localdomain", False)),
        ("localhost.localdomain", "localhost", ("localhost.localdomain", False)),
        ("under_score", "under_score", ("localhost.localdomain", False)),
    ],
)
def test_the_default_hostname_is_the_machines_fqdn_or_a_localdomain_fallback(
    monkeypatch: pytest.MonkeyPatch, fqdn: str, short: str, expected: tuple[str, bool]
) -> None:
    monkeypatch.setattr("socket.getfqdn", lambda: fqdn)
    monkeypatch.setattr("socket.gethostname", lambda: short)

    assert load_config(None, {}).listen.own_hostname() == expected


def test_a_clear_text_login_to_another_machine_is_refused_naming_both_keys() -> None:
    message = error_of(
        environ={
            "RELAY_UPSTREAM_HOST": "192.0.2.25",
            "RELAY_UPSTREAM_TLS": "none",
            "RELAY_UPSTREAM_USERNAME": "relay",
            "RELAY_UPSTREAM_PASSWORD": "secret",
        }
    )

    assert "upstream.username" in message and "upstream.tls" in message and "clear text" in message


def test_a_clear_text_login_to_this_machine_is_accepted() -> None:
    environ = {
        "RELAY_UPSTREAM_HOST": "127.0.0.1",
        "RELAY_UPSTREAM_TLS": "none",
        "RELAY_UPSTREAM_USERNAME": "relay",
        "RELAY_UPSTREAM_PASSWORD": "secret",
    }
    assert load_config(None, environ).upstream.username == "relay"


def test_a_clear_text_login_to_a_named_upstream_elsewhere_is_refused(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("secret")
    path = write_yaml(
        tmp_path,
        f"upstreams:\n  isp:\n    host: 192.0.2.26\n    tls: none\n    username: relay\n"
        f"    password_file: {password}\n",
    )
    message = error_of(path)

    assert "upstreams.isp.username" in message and "upstreams.isp.tls" in message

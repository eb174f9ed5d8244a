"""Named upstreams chosen by envelope sender (routes), seen from real upstreams on loopback."""

from __future__ import annotations

import json
import smtplib
from pathlib import Path

import pytest

from relay.admin.cli import main
from relay.config.loading import load_config
from relay.config.models import ConfigError
from tests.conftest import Upstream, UpstreamFactory

CREDENTIALS = ("kay@gmail.test", "app password")


def send(relay, sender: str) -> dict:
    message = f"From: {sender}\r\nTo: ann@one.test\r\nSubject: Hi\r\n\r\nHello.\r\n".encode()
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        return client.sendmail(sender, ["ann@one.test"], message)


def upstream_entry(upstream: Upstream, **extra: object) -> dict[str, object]:
    return {"host": upstream.host, "port": upstream.port, "tls": "none", **extra}


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # the test upstream's choice
def test_two_upstreams_chosen_by_route_and_the_rest_to_the_default(
    tmp_path: Path, make_upstream: UpstreamFactory, start_relay
) -> None:
    default, office, gmail = make_upstream(), make_upstream(), make_upstream(credentials=CREDENTIALS)
    password_file = tmp_path / "gmail-password"
    password_file.write_text(CREDENTIALS[1] + "\n", encoding="utf-8")
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(
        json.dumps(
            {
                "upstreams": {
                    "office": upstream_entry(office),
                    "gmail": upstream_entry(gmail, username=CREDENTIALS[0], password_file=str(password_file)),
                },
                "routes": [
                    {"sender": "kay@gmail.test", "upstream": "gmail"},
                    {"sender": "*@coaching.test", "upstream": "office"},
                    {"sender": "*@gmail.test", "upstream": "office"},  # never reached for kay: first match wins
                ],
            }
        ),
        encoding="utf-8",
    )
    relay = start_relay(default, config_file=config_file)

    for sender in ("lee@coaching.test", "Kay@Gmail.test", "someone@elsewhere.test", "ray@gmail.test"):
        assert send(relay, sender) == {}

    assert [m.mail_from for m in office.messages] == ["lee@coaching.test", "ray@gmail.test"]
    assert [m.mail_from for m in gmail.messages] == ["Kay@Gmail.test"]
    assert [m.mail_from for m in default.messages] == ["someone@elsewhere.test"]


def test_a_route_to_an_unknown_upstream_is_refused_at_start_naming_the_key(tmp_path: Path) -> None:
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(
        json.dumps(
            {
                "upstreams": {"office": {"host": "127.0.0.1"}},
                "routes": [{"sender": "*@coaching.test", "upstream": "ofice"}],
            }
        ),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"routes\[0\]\.upstream: 'ofice' is not one of upstreams \(office\)"):
        load_config(config_file, {})


@pytest.mark.parametrize(
    ("tree", "named"),
    [
        ({"routes": [{"sender": "kay@*.test", "upstream": "x"}]}, "sender"),
        ({"upstreams": {"office": {"port": 587}}}, "upstreams.office.host"),
        ({"upstreams": {"Office": {"host": "127.0.0.1"}}}, "upstreams.Office"),
        ({"upstreams": {"office": {"host": "127.0.0.1", "username": "kay"}}}, "upstreams.office.password_file"),
    ],
)
def test_upstreams_and_routes_are_checked_at_start(tmp_path: Path, tree: dict, named: str) -> None:
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(json.dumps(tree), encoding="utf-8")
    with pytest.raises(ConfigError, match=named):
        load_config(config_file, {})


def test_upstreams_and_routes_have_no_environment_variables() -> None:
    with pytest.raises(ConfigError, match=r"unknown environment variable.*RELAY_ROUTES"):
        load_config(None, {"RELAY_ROUTES": "*@coaching.test=office"})


def test_preview_names_the_upstream_the_route_chooses(
    tmp_path: Path, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(
        json.dumps(
            {
                "upstream": upstream_entry(upstream),
                "upstreams": {"office": {"host": "smtp.coaching.test", "port": 587}},
                "routes": [{"sender": "*@coaching.test", "upstream": "office"}],
            }
        ),
        encoding="utf-8",
    )
    message = tmp_path / "m.eml"
    message.write_bytes(b"From: lee@coaching.test\r\nTo: ann@one.test\r\nSubject: Hi\r\n\r\nHello.\r\n")

    assert main(["preview", str(message), "--config", str(config_file)]) == 0
    assert "upstream: office (smtp.coaching.test:587, chosen by routes)" in capsys.readouterr().out

    args = ["preview", str(message), "--config", str(config_file), "--mail-from", "x@elsewhere.test"]
    assert main(args) == 0
    assert f"upstream: upstream ({upstream.host}:{upstream.port}, no route matched)" in capsys.readouterr().out


def test_the_route_is_kept_with_the_message_in_the_spool(
    tmp_path: Path, make_upstream: UpstreamFactory, start_relay, capsys: pytest.CaptureFixture[str]
) -> None:
    default, office = make_upstream(), make_upstream()
    office.handler.mail_reply = "451 4.3.0 Try again later"
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(
        json.dumps(
            {
                "spool": {"path": str(tmp_path / "spool")},
                "upstreams": {"office": upstream_entry(office)},
                "routes": [{"sender": "*@coaching.test", "upstream": "office"}],
            }
        ),
        encoding="utf-8",
    )
    relay = start_relay(default, config_file=config_file, RELAY_DELIVERY_MODE="queue")

    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.ehlo()
        client.mail("lee@coaching.test")
        client.rcpt("ann@one.test")
        code, reply = client.data(b"From: lee@coaching.test\r\nTo: ann@one.test\r\nSubject: Hi\r\n\r\nHello.\r\n")
    assert code == 250
    queue_id = reply.decode().split("queued as ")[1].split()[0]

    assert main(["queue", "show", queue_id, "--config", str(config_file)]) == 0
    assert "upstream:  office" in capsys.readouterr().out
    assert default.messages == []

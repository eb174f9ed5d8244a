"""OAuth2 (XOAUTH2) upstreams: sign-in flows against a loopback provider, and the relay's token refreshes
seen by an aiosmtpd upstream that checks XOAUTH2 logins."""

from __future__ import annotations

import asyncio
import json
import smtplib
import stat
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import structlog

from relay.admin.cli import main
from relay.config.loading import load_config
from relay.config.models import ConfigError, OAuth2Config
from relay.server import warn_about_secret_files
from relay.upstream.oauth import REFRESH_MARGIN, OAuth2Error, StoredToken, installed_app_login, load_token, save_token
from tests.conftest import Upstream, UpstreamFactory, relay_config
from tests.support.oauth_server import CLIENT_ID, TokenEndpoint

# The XOAUTH2 test upstream has no TLS, which aiosmtpd warns about; the relay's TLS is tested elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

MAILBOX = "kay@coaching.test"
MESSAGE = b"From: kay@coaching.test\r\nTo: ann@one.test\r\nSubject: Plans\r\n\r\nHello.\r\n"


def send(relay) -> dict:
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        return client.sendmail(MAILBOX, ["ann@one.test"], MESSAGE)


@pytest.fixture
def oauth_upstream(make_upstream: UpstreamFactory, token_endpoint: TokenEndpoint) -> Upstream:
    """An upstream that accepts exactly the access tokens the provider has issued."""
    upstream = make_upstream(xoauth2_user=MAILBOX)
    token_endpoint.state.on_issue = upstream.handler.valid_tokens.add
    return upstream


def oauth_settings(upstream: Upstream, endpoint: TokenEndpoint, token_file: Path) -> dict[str, str]:
    return {
        "RELAY_UPSTREAM_HOST": upstream.host,
        "RELAY_UPSTREAM_PORT": str(upstream.port),
        "RELAY_UPSTREAM_TLS": "none",
        "RELAY_UPSTREAM_USERNAME": MAILBOX,
        "RELAY_UPSTREAM_OAUTH2_PROVIDER": "microsoft",
        "RELAY_UPSTREAM_OAUTH2_TOKEN_FILE": str(token_file),
        **endpoint.settings(),
    }


def write_config(path: Path, settings: dict[str, str]) -> Path:
    """The same settings as a YAML file, for the command line."""
    upstream: dict[str, object] = {"oauth2": {}}
    for name, value in settings.items():
        key = name.removeprefix("RELAY_UPSTREAM_").lower()
        if key.startswith("oauth2_"):
            upstream["oauth2"][key.removeprefix("oauth2_")] = value  # type: ignore[index]
        else:
            upstream[key] = int(value) if key == "port" else value
    path.write_text(json.dumps({"upstream": upstream}), encoding="utf-8")
    return path


def test_device_code_login_stores_the_refresh_token_with_mode_0600(
    tmp_path: Path, oauth_upstream: Upstream, token_endpoint: TokenEndpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "tokens" / "m365.json"
    config = write_config(tmp_path / "relay.yaml", oauth_settings(oauth_upstream, token_endpoint, token_file))

    assert main(["auth", "login", "upstream", "--config", str(config)]) == 0

    out = capsys.readouterr().out
    assert "enter ABCD-EFGH" in out  # Microsoft's own instructions, passed on
    assert "refresh-" not in out and "access-" not in out
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert load_token(token_file, "login").refresh_token == "refresh-1"
    # It asked for the SMTP scope with offline access, as a public client (no secret), and polled past "pending".
    device_poll = token_endpoint.state.token_requests[-1]
    assert device_poll["grant_type"] == "urn:ietf:params:oauth:grant-type:device_code"
    assert "client_secret" not in device_poll
    assert token_endpoint.state.device_code_polls == 2

    # And the relay's check logs in with it.
    assert main(["check", "--config", str(config)]) == 0
    assert "logged in as kay@coaching.test with OAuth2 (XOAUTH2)" in capsys.readouterr().out


def test_google_installed_app_login_with_a_loopback_redirect(tmp_path: Path, token_endpoint: TokenEndpoint) -> None:
    config = OAuth2Config(
        provider="google",
        client_id=CLIENT_ID,
        client_secret="installed-app-secret",  # type: ignore[arg-type]
        token_file=tmp_path / "gmail.json",
        token_endpoint=f"{token_endpoint.base}/token",
        authorization_endpoint=f"{token_endpoint.base}/authorize",
    )
    browser_threads: list[threading.Thread] = []

    def browser(url: str) -> None:
        # The provider signs the user in at once and redirects to the relay's loopback address.
        thread = threading.Thread(target=lambda: urllib.request.urlopen(url, timeout=10).read())
        thread.start()
        browser_threads.append(thread)

    token = asyncio.run(installed_app_login(config, browser))
    for thread in browser_threads:
        thread.join(10)

    assert token.refresh_token == "refresh-2"  # the code was number 1
    authorize = token_endpoint.state.authorize_queries[0]
    assert authorize["redirect_uri"].startswith("http://127.0.0.1:")
    assert (authorize["access_type"], authorize["prompt"], authorize["code_challenge_method"]) == (
        "offline",
        "consent",
        "S256",
    )
    assert "mail.google.com" in authorize["scope"]
    exchange = token_endpoint.state.token_requests[-1]
    assert exchange["grant_type"] == "authorization_code"
    assert exchange["client_secret"] == "installed-app-secret"


def test_a_token_near_its_expiry_is_refreshed_before_logging_in(
    tmp_path: Path, oauth_upstream: Upstream, token_endpoint: TokenEndpoint, start_relay
) -> None:
    token_file = tmp_path / "m365.json"
    # Still accepted by the upstream, but it expires inside the refresh margin.
    oauth_upstream.handler.valid_tokens.add("access-old")
    save_token(token_file, StoredToken("refresh-0", "access-old", time.time() + REFRESH_MARGIN / 2))
    relay = start_relay(**oauth_settings(oauth_upstream, token_endpoint, token_file))

    assert send(relay) == {}

    assert oauth_upstream.handler.tried_tokens == ["access-1"]
    assert len(oauth_upstream.messages) == 1
    stored = load_token(token_file, "login")
    assert (stored.access_token, stored.refresh_token) == ("access-1", "refresh-1")
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_a_fresh_token_is_used_without_asking_the_provider(
    tmp_path: Path, oauth_upstream: Upstream, token_endpoint: TokenEndpoint, start_relay
) -> None:
    token_file = tmp_path / "m365.json"
    oauth_upstream.handler.valid_tokens.add("access-current")
    save_token(token_file, StoredToken("refresh-0", "access-current", time.time() + 3600))
    relay = start_relay(**oauth_settings(oauth_upstream, token_endpoint, token_file))

    assert send(relay) == {}

    assert oauth_upstream.handler.tried_tokens == ["access-current"]
    assert token_endpoint.state.token_requests == []


def test_a_token_the_upstream_rejects_is_refreshed_and_the_login_retried_once(
    tmp_path: Path, oauth_upstream: Upstream, token_endpoint: TokenEndpoint, start_relay
) -> None:
    token_file = tmp_path / "m365.json"
    # Not expired by the clock, but the upstream no longer takes it (revoked session, clock skew).
    save_token(token_file, StoredToken("refresh-0", "access-rejected", time.time() + 3600))
    relay = start_relay(**oauth_settings(oauth_upstream, token_endpoint, token_file))

    assert send(relay) == {}

    assert oauth_upstream.handler.tried_tokens == ["access-rejected", "access-1"]
    assert len(oauth_upstream.messages) == 1


def test_an_upstream_that_rejects_even_a_fresh_token_is_not_asked_again_and_again(
    tmp_path: Path, make_upstream: UpstreamFactory, token_endpoint: TokenEndpoint, start_relay
) -> None:
    upstream = make_upstream(xoauth2_user="someone-else@coaching.test")  # wrong mailbox: no token helps
    token_file = tmp_path / "m365.json"
    save_token(token_file, StoredToken("refresh-0", "access-0", time.time() + 3600))
    # direct: the client hears the verdict (in hybrid and queue modes the mail waits in the spool).
    relay = start_relay(**oauth_settings(upstream, token_endpoint, token_file), RELAY_DELIVERY_MODE="direct")

    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(relay)

    assert refused.value.smtp_code == 454  # temporary, as Postfix's smtp_sasl_auth_soft_bounce
    assert "even with a fresh access token (535 5.7.3" in refused.value.smtp_error.decode()
    assert upstream.handler.tried_tokens == ["access-0", "access-1"]


def test_a_revoked_refresh_token_gives_a_clear_error_and_keeps_the_mail_for_a_retry(
    tmp_path: Path,
    oauth_upstream: Upstream,
    token_endpoint: TokenEndpoint,
    start_relay,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token_file = tmp_path / "m365.json"
    save_token(token_file, StoredToken("refresh-revoked", "access-expired", time.time() - 60))
    settings = oauth_settings(oauth_upstream, token_endpoint, token_file)
    relay = start_relay(**settings, RELAY_DELIVERY_MODE="direct")

    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(relay)

    text = refused.value.smtp_error.decode()
    assert refused.value.smtp_code == 454
    assert "revoked" in text and "privacy-relay auth login upstream" in text
    assert "refresh-revoked" not in text and "access-expired" not in text
    assert oauth_upstream.handler.tried_tokens == []
    assert oauth_upstream.messages == []

    assert main(["check", "--config", str(write_config(tmp_path / "relay.yaml", settings))]) == 1
    out = capsys.readouterr().out
    assert "auth: FAILED" in out and "privacy-relay auth login upstream" in out
    assert "refresh-revoked" not in out


def test_a_missing_token_file_says_how_to_sign_in(tmp_path: Path) -> None:
    with pytest.raises(OAuth2Error, match="run `privacy-relay auth login m365` once"):
        load_token(tmp_path / "none.json", "privacy-relay auth login m365")


def test_saving_a_token_replaces_the_file_and_keeps_it_private(tmp_path: Path) -> None:
    token_file = tmp_path / "token.json"
    token_file.write_text("{}", encoding="utf-8")
    token_file.chmod(0o644)

    save_token(token_file, StoredToken("refresh-9", "access-9", 123.0))

    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert load_token(token_file, "login") == StoredToken("refresh-9", "access-9", 123.0)
    assert [p.name for p in tmp_path.iterdir()] == ["token.json"]


def test_start_up_warns_when_others_can_read_the_token_file(
    tmp_path: Path, oauth_upstream: Upstream, token_endpoint: TokenEndpoint
) -> None:
    token_file = tmp_path / "m365.json"
    save_token(token_file, StoredToken("refresh-0"))
    config = relay_config(tmp_path, oauth_settings(oauth_upstream, token_endpoint, token_file))
    with structlog.testing.capture_logs() as logs:
        warn_about_secret_files(config)
        token_file.chmod(0o644)
        warn_about_secret_files(config)
    warnings = [entry for entry in logs if entry["event"] == "relay.secret_file_readable"]
    assert [w["key"] for w in warnings] == ["upstream.oauth2.token_file"]


def test_auth_login_and_check_for_a_named_upstream(
    tmp_path: Path, oauth_upstream: Upstream, token_endpoint: TokenEndpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "m365.json"
    oauth2 = {key.removeprefix("RELAY_UPSTREAM_OAUTH2_").lower(): v for key, v in token_endpoint.settings().items()}
    m365 = {
        "host": oauth_upstream.host,
        "port": oauth_upstream.port,
        "tls": "none",
        "username": MAILBOX,
        "oauth2": {"provider": "microsoft", "token_file": str(token_file), **oauth2},
    }
    config = tmp_path / "relay.yaml"
    config.write_text(json.dumps({"upstreams": {"m365": m365}}), encoding="utf-8")

    assert main(["auth", "login", "m365", "--config", str(config)]) == 0
    assert main(["auth", "login", "m356", "--config", str(config)]) == 2
    assert "no upstream named 'm356' (there are: upstream, m365)" in capsys.readouterr().err

    assert main(["check", "--config", str(config)]) == 0
    assert "upstreams.m365: ready" in capsys.readouterr().out


def test_a_config_error_in_the_oauth2_section_never_quotes_the_client_secret() -> None:
    settings = {
        "RELAY_UPSTREAM_HOST": "smtp.gmail.example",
        "RELAY_UPSTREAM_OAUTH2_PROVIDER": "google",
        "RELAY_UPSTREAM_OAUTH2_CLIENT_SECRET": "GOCSPX-not-for-logs",
    }
    with pytest.raises(ConfigError, match="client_id and token_file must both be set") as error:
        load_config(None, settings)
    assert "GOCSPX" not in str(error.value)
    with pytest.raises(ConfigError, match="username") as error:
        load_config(
            None,
            {**settings, **{k: "x" for k in ("RELAY_UPSTREAM_OAUTH2_CLIENT_ID", "RELAY_UPSTREAM_OAUTH2_TOKEN_FILE")}},
        )
    assert "GOCSPX" not in str(error.value)


async def test_a_worker_waits_for_another_workers_refresh_and_uses_the_token_it_saved(
    tmp_path: Path, token_endpoint: TokenEndpoint
) -> None:
    from filelock import FileLock

    from relay.upstream.oauth import AccessTokens

    token_file = tmp_path / "m365.json"
    save_token(token_file, StoredToken("refresh-0", "access-old", time.time() - 60))
    config = OAuth2Config(
        provider="microsoft",
        client_id=CLIENT_ID,
        token_file=token_file,
        token_endpoint=f"{token_endpoint.base}/token",
    )
    tokens = AccessTokens(config, "privacy-relay auth login")
    other_worker = FileLock(tmp_path / ".m365.json.lock")
    with other_worker:
        waiting = asyncio.create_task(tokens.current())
        await asyncio.sleep(0.5)
        assert not waiting.done()
        # What the other worker's refresh saves before it lets go of the lock.
        save_token(token_file, StoredToken("refresh-1", "access-by-the-other-worker", time.time() + 3600))
    assert await asyncio.wait_for(waiting, 10) == "access-by-the-other-worker"
    assert token_endpoint.state.token_requests == []

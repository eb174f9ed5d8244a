"""`privacy-relay setup` as a person uses it, on a pseudo-terminal (pexpect), and as a script does, with flags.

The upstream is an aiosmtpd server on a free loopback port with STARTTLS and AUTH; its trustme CA is
given to the relay with RELAY_UPSTREAM_CA_FILE, as a user with a private CA would.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pexpect
import pytest
import yaml

from relay.config.loading import load_config
from tests.conftest import Upstream, UpstreamFactory
from tests.e2e.conftest import CONSOLE_SCRIPT
from tests.support.oauth_server import CLIENT_ID, TokenEndpoint

pytestmark = pytest.mark.e2e

ADDRESS = "me@example.org"
PASSWORD = "right horse battery staple"
# Seconds pexpect waits for a prompt before the test fails instead of hanging.
PROMPT_DEADLINE = 30


@pytest.fixture
def secured_upstream(make_upstream: UpstreamFactory) -> Upstream:
    return make_upstream(tls="starttls", credentials=(ADDRESS, PASSWORD))


def setup_environment(tmp_path: Path, upstream: Upstream | None = None, **settings: str) -> dict[str, str]:
    environ = {name: value for name, value in os.environ.items() if not name.startswith("RELAY_")}
    if upstream is not None and upstream.ca is not None:
        ca_file = tmp_path / "upstream-ca.pem"
        upstream.ca.cert_pem.write_to_path(str(ca_file))
        environ["RELAY_UPSTREAM_CA_FILE"] = str(ca_file)
    environ.update(settings)
    return environ


def spawn_setup(tmp_path: Path, environ: dict[str, str], *arguments: str) -> pexpect.spawn:
    return pexpect.spawn(
        CONSOLE_SCRIPT,
        ["setup", *arguments],
        cwd=str(tmp_path),
        env=environ,
        encoding="utf-8",
        timeout=PROMPT_DEADLINE,
        dimensions=(50, 200),
    )


def run_setup(
    tmp_path: Path, environ: dict[str, str], *arguments: str, password: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CONSOLE_SCRIPT, "setup", *arguments],
        cwd=tmp_path,
        env=environ,
        input=password,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def finished(session: pexpect.spawn) -> int:
    session.expect(pexpect.EOF)
    session.close()
    assert session.exitstatus is not None, session.before
    return session.exitstatus


def test_a_person_sets_up_their_own_server_and_types_the_password_again_after_a_refusal(
    tmp_path: Path, secured_upstream: Upstream
) -> None:
    session = spawn_setup(tmp_path, setup_environment(tmp_path, secured_upstream))

    session.expect_exact("Provider [outbox]: ")
    session.sendline("7")
    session.expect_exact("answer a number from 1 to 5")
    session.expect_exact("Provider [outbox]: ")
    session.sendline("4")
    session.expect_exact("Your email address: ")
    session.sendline("me at example.org")
    session.expect_exact("that is not an email address")
    session.expect_exact("Your email address: ")
    session.sendline(ADDRESS)
    session.expect_exact("SMTP server: ")
    session.sendline("127.0.0.1")
    session.expect_exact("Port [587]: ")
    session.sendline(str(secured_upstream.port))
    session.expect_exact("Security (starttls, implicit, none) [starttls]: ")
    session.sendline("")
    session.expect_exact(f"User name [{ADDRESS}]: ")
    session.sendline("")
    session.expect_exact(f"Your password for {ADDRESS} (not shown): ")
    session.sendline("wrong password")
    session.expect_exact("auth: FAILED")
    session.expect_exact("The server refused the user name or the password.")
    session.expect_exact("Your password again (not shown): ")
    session.sendline(PASSWORD)
    session.expect_exact(f"auth: OK: logged in as {ADDRESS}")
    session.expect_exact("Port:                 1025")
    session.expect_exact("Authentication:       None")

    assert finished(session) == 0
    assert "right horse" not in session.before  # typed, never shown
    config_path, password_path = tmp_path / "config" / "relay.yaml", tmp_path / "config" / "relay.password"
    assert stat.S_IMODE(password_path.stat().st_mode) == 0o600
    assert password_path.read_text() == PASSWORD
    config = load_config(config_path, environ={})
    assert (config.upstream.host, config.upstream.port, config.upstream.tls) == (
        "127.0.0.1",
        secured_upstream.port,
        "starttls",
    )
    assert config.upstream.username == ADDRESS
    assert [attempt[2] for attempt in secured_upstream.handler.auth_attempts] == [False, True]


def test_ctrl_c_during_the_questions_writes_nothing_and_keeps_the_old_config(tmp_path: Path) -> None:
    config_path = tmp_path / "config" / "relay.yaml"
    config_path.parent.mkdir()
    config_path.write_text("policy:\n  action: bcc\n")
    session = spawn_setup(tmp_path, setup_environment(tmp_path))

    session.expect_exact(f"{config_path} exists. Replace it? (y/n) [n]: ")
    session.sendline("y")
    session.expect_exact("Provider [outbox]: ")
    session.sendline("gmail")
    session.expect_exact("Your email address: ")
    session.sendline(ADDRESS)
    session.expect_exact(f"Your app password for {ADDRESS} (not shown): ")
    session.sendintr()
    session.expect_exact("nothing is half-written")

    assert finished(session) == 130
    assert config_path.read_text() == "policy:\n  action: bcc\n"
    assert sorted(path.name for path in config_path.parent.iterdir()) == ["relay.yaml"]


def test_with_every_flag_given_it_asks_nothing(tmp_path: Path, secured_upstream: Upstream) -> None:
    config_path = tmp_path / "elsewhere" / "mail.yaml"
    flags = [
        "--provider=other",
        f"--address={ADDRESS}",
        "--host=127.0.0.1",
        f"--port={secured_upstream.port}",
        "--tls=starttls",
        f"--username={ADDRESS}",
        "--password-stdin",
        f"--config={config_path}",
    ]

    result = run_setup(tmp_path, setup_environment(tmp_path, secured_upstream), *flags, password=PASSWORD + "\n")

    assert result.returncode == 0, result.stdout + result.stderr
    questions = ("Provider", "Your email address", "SMTP server:", "Port [", "Security (", "User name", "(not shown)")
    assert not [question for question in questions if question in result.stdout + result.stderr]
    assert f"auth: OK: logged in as {ADDRESS}" in result.stdout
    assert (config_path.with_name("mail.password")).read_text() == PASSWORD
    assert yaml.safe_load(config_path.read_text())["upstream"]["password_file"] == str(
        config_path.with_name("mail.password")
    )
    assert [attempt[2] for attempt in secured_upstream.handler.auth_attempts] == [True]


def test_a_refused_app_password_gets_gmails_advice_and_the_settings_are_kept(
    tmp_path: Path, secured_upstream: Upstream
) -> None:
    flags = ["--provider=gmail", f"--address={ADDRESS}", "--host=127.0.0.1", f"--port={secured_upstream.port}"]

    result = run_setup(
        tmp_path, setup_environment(tmp_path, secured_upstream), *flags, "--password-stdin", password="x"
    )

    assert result.returncode == 1
    assert "Gmail takes an app password, not your Google password" in result.stdout
    assert "run `privacy-relay check`" in result.stdout
    assert (tmp_path / "config" / "relay.yaml").is_file()


def test_without_a_terminal_a_missing_answer_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    result = run_setup(
        tmp_path, setup_environment(tmp_path), "--provider=other", f"--address={ADDRESS}", "--password-stdin"
    )

    assert result.returncode == 2
    assert "give --host" in result.stderr
    assert not (tmp_path / "config").exists()


def test_a_wrong_flag_is_named_with_the_reason(tmp_path: Path) -> None:
    result = run_setup(tmp_path, setup_environment(tmp_path), "--provider=gmail", "--address=not-an-address")

    assert result.returncode == 2
    assert "--address 'not-an-address': that is not an email address" in result.stderr


def test_the_outbox_needs_no_provider_account(tmp_path: Path) -> None:
    result = run_setup(tmp_path, setup_environment(tmp_path), "--provider=outbox")

    assert result.returncode == 0, result.stderr
    config = load_config(tmp_path / "config" / "relay.yaml", environ={})
    assert config.uses_outbox
    assert config.outbox == tmp_path / "outbox"
    assert "Port:                 1025" in result.stdout


# The XOAUTH2 test upstream has no TLS, which aiosmtpd warns about.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_microsoft_365_signs_in_with_oauth2_and_checks_the_login(
    tmp_path: Path, make_upstream: UpstreamFactory, token_endpoint: TokenEndpoint
) -> None:
    upstream = make_upstream(xoauth2_user=ADDRESS)
    token_endpoint.state.on_issue = upstream.handler.valid_tokens.add
    flags = [
        "--provider=microsoft365",
        f"--address={ADDRESS}",
        "--host=127.0.0.1",
        f"--port={upstream.port}",
        "--tls=none",
        "--login=oauth2",
        f"--oauth2-client-id={CLIENT_ID}",
    ]
    # The provider's endpoints, which the written config leaves at Microsoft's, are the test's.
    environ = setup_environment(tmp_path, **token_endpoint.settings())

    result = run_setup(tmp_path, environ, *flags)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "enter ABCD-EFGH" in result.stdout
    assert f"logged in as {ADDRESS} with OAuth2 (XOAUTH2)" in result.stdout
    written = yaml.safe_load((tmp_path / "config" / "relay.yaml").read_text())["upstream"]
    assert written["oauth2"]["tenant"] == "example.org"
    assert "password_file" not in written
    assert stat.S_IMODE((tmp_path / "config" / "relay.oauth2-token.json").stat().st_mode) == 0o600

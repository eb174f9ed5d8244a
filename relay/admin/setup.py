"""`privacy-relay setup`: questions in the terminal that end in a working config and password file.

Every answer also has a flag, and with all of them given it asks nothing. The answers are all
gathered before anything is written, and each file is written whole (temporary file, rename), so
Ctrl+C leaves the old files or complete new ones, never half of one.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml

from relay.config.loading import load_config
from relay.config.models import DEFAULT_CONFIG_PATH, Config, ConfigError
from relay.core.addresses import validate_envelope_address
from relay.core.replies import RelayError
from relay.files import write_atomically
from relay.upstream.oauth import OAuth2Error, device_code_login, save_token
from relay.upstream.pool import ProbeStep, probe_upstream

Answer = TypeVar("Answer")
TLS_MODES = ("starttls", "implicit", "none")


@dataclass(frozen=True)
class Provider:
    name: str
    title: str
    # None: the person names the server (another SMTP server), or there is none (the outbox).
    host: str | None
    port: int = 587
    tls: str = "starttls"
    # The questions this provider needs answered; the others take its defaults (or a flag).
    asked: frozenset[str] = frozenset()
    # Most providers log in with the whole address; SES has user names of its own.
    username_is_address: bool = True
    asks_for: str = "password"
    # What to do when the provider refuses the login, in plain words.
    login_advice: str = ""


PROVIDERS = {
    provider.name: provider
    for provider in (
        Provider(
            "gmail",
            "Gmail or Google Workspace",
            "smtp.gmail.com",
            asks_for="app password",
            login_advice="Gmail takes an app password, not your Google password: turn on 2-Step Verification, "
            "then create one at https://myaccount.google.com/apppasswords and type its 16 letters. "
            "The user name is your whole Gmail address.",
        ),
        Provider(
            "microsoft365",
            "Microsoft 365 (work or school account)",
            "smtp.office365.com",
            login_advice="Microsoft 365 accepts a password only when Authenticated SMTP is on for the mailbox "
            "(Microsoft 365 admin center > Users > the user > Mail > Manage email apps), and turns password "
            "logins off by default at the end of December 2026: choose the OAuth2 login instead.",
        ),
        Provider(
            "ses",
            "Amazon SES",
            "email-smtp.eu-west-1.amazonaws.com",
            asked=frozenset({"host", "username"}),
            username_is_address=False,
            asks_for="SMTP password",
            login_advice="Amazon SES takes SMTP credentials (SES console > SMTP settings > Create SMTP "
            "credentials), not your AWS access keys, and only in the region they were made for: the "
            "host must be that region's email-smtp.REGION.amazonaws.com.",
        ),
        Provider(
            "other",
            "another SMTP server",
            None,
            asked=frozenset({"host", "port", "tls", "username"}),
            login_advice="The server refused the user name or the password. Check both with your provider; "
            "the user name is often your whole email address.",
        ),
        Provider("outbox", "none yet: write each copy to a folder as an .eml file", None),
    )
}


class SetupError(Exception):
    """An answer that a flag gave wrong, or that nobody can give (no terminal to ask on)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", choices=list(PROVIDERS), help="who sends your mail")
    parser.add_argument("--address", metavar="ADDR", help="your email address, the From of your mail")
    parser.add_argument("--host", help="the provider's SMTP server (default: the provider's)")
    parser.add_argument("--port", type=int, help="its port (default: 587)")
    parser.add_argument("--tls", choices=TLS_MODES, help="how the connection is secured (default: starttls)")
    parser.add_argument("--username", help="the user name to log in with (default: the address)")
    parser.add_argument(
        "--login", choices=("password", "oauth2"), help="Microsoft 365: OAuth2 sign-in (default) or a password"
    )
    parser.add_argument("--oauth2-client-id", metavar="ID", help="Microsoft 365: the app registration's client ID")
    parser.add_argument(
        "--oauth2-tenant", metavar="TENANT", help="Microsoft 365: the tenant ID or domain (default: the address's)"
    )
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input instead of asking"
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=DEFAULT_CONFIG_PATH,
        help=f"the config file to write (default: {DEFAULT_CONFIG_PATH})",
    )


class Questions:
    """Asks on the terminal, showing the default that Enter accepts, and asks again after a wrong answer."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive

    def ask(
        self,
        question: str,
        parse: Callable[[str], Answer],
        given: str | None,
        flag: str,
        default: str | None = None,
        asked: bool = True,
    ) -> Answer:
        """The flag's value when given; else the default, without asking when the question is not asked
        for this provider or there is no terminal; else the typed answer (Enter: the default)."""
        if given is not None:
            try:
                return parse(given)
            except ValueError as exc:
                raise SetupError(f"{flag} {given!r}: {exc}") from None
        if not (self.interactive and asked):
            if default is not None:
                return parse(default)
            raise SetupError(f"give {flag}: there is no terminal to ask on")
        shown = f" [{default}]" if default else ""
        while True:
            typed = input(f"{question}{shown}: ").strip()
            try:
                return parse(typed or default or "")
            except ValueError as exc:
                print(f"  {exc}")

    def password(self, question: str) -> str:
        while True:
            typed = getpass.getpass(f"{question} (not shown): ")
            if typed:
                return typed
            print("  the password is empty; type it, or press Ctrl+C to stop")

    def confirm(self, question: str) -> bool:
        return self.ask(f"{question} (y/n)", _yes_or_no, None, "", "n")


def _yes_or_no(text: str) -> bool:
    if text.lower() in ("y", "yes"):
        return True
    if text.lower() in ("n", "no"):
        return False
    raise ValueError("answer y or n")


def _provider(text: str) -> Provider:
    names = list(PROVIDERS)
    if text.isdigit() and 1 <= int(text) <= len(names):
        return PROVIDERS[names[int(text) - 1]]
    if text.lower() in PROVIDERS:
        return PROVIDERS[text.lower()]
    raise ValueError(f"answer a number from 1 to {len(names)}, or one of {', '.join(names)}")


def _address(text: str) -> str:
    try:
        return validate_envelope_address(text, smtputf8=True)
    except RelayError:
        raise ValueError("that is not an email address (name@example.org)") from None


def _host(text: str) -> str:
    if not text or any(character.isspace() or character in "/:@" for character in text):
        raise ValueError("type the server's host name only, for example smtp.example.org")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError("a port is a number from 1 to 65535")
    return int(text)


def _tls(text: str) -> str:
    if text.lower() not in TLS_MODES:
        raise ValueError(f"answer one of {', '.join(TLS_MODES)}")
    return text.lower()


def _not_empty(text: str) -> str:
    if not text:
        raise ValueError("this cannot be empty")
    return text


def _login(text: str) -> str:
    if text.lower() not in ("password", "oauth2"):
        raise ValueError("answer oauth2 or password")
    return text.lower()


@dataclass(frozen=True)
class Answers:
    provider: Provider
    config_path: Path
    upstream: dict[str, Any]
    password: str | None

    @property
    def password_path(self) -> Path:
        return self.config_path.with_name(f"{self.config_path.stem}.password")


def token_path(config_path: Path) -> Path:
    """Where the OAuth2 refresh token goes: beside the config, like the password file."""
    return config_path.with_name(f"{config_path.stem}.oauth2-token.json")


def _gather(args: argparse.Namespace, questions: Questions, read_stdin: Callable[[], str]) -> Answers:
    config_path: Path = args.config.absolute()
    if config_path.exists() and not (questions.interactive and questions.confirm(f"{config_path} exists. Replace it?")):
        raise SetupError(f"{config_path} exists; nothing was changed (move it away, or choose --config)")
    if args.provider is None and questions.interactive:
        print("Who sends your mail?")
        for number, provider in enumerate(PROVIDERS.values(), 1):
            print(f"  {number}) {provider.name:<13} {provider.title}")
    if args.provider is None and not questions.interactive:
        raise SetupError("give --provider: there is no terminal to ask on")
    provider = questions.ask("Provider", _provider, args.provider, "--provider", "outbox")
    if provider.name == "outbox":
        return Answers(provider, config_path, {}, None)

    address = questions.ask("Your email address", _address, args.address, "--address")
    asked = provider.asked
    host = questions.ask("SMTP server", _host, args.host, "--host", provider.host, asked="host" in asked)
    given_port = None if args.port is None else str(args.port)
    port = questions.ask("Port", _port, given_port, "--port", str(provider.port), asked="port" in asked)
    tls_default = "implicit" if port == 465 else provider.tls
    tls = questions.ask(
        "Security (starttls, implicit, none)", _tls, args.tls, "--tls", tls_default, asked="tls" in asked
    )
    username_default = address if provider.username_is_address else None
    username = questions.ask(
        "User name", _not_empty, args.username, "--username", username_default, asked="username" in asked
    )
    upstream: dict[str, Any] = {"host": host, "port": port, "tls": tls, "username": username}

    if provider.name == "microsoft365":
        login = questions.ask("Log in with oauth2 or password", _login, args.login, "--login", "oauth2")
        if login == "oauth2":
            if questions.interactive and args.oauth2_client_id is None:
                print(
                    "OAuth2 needs an app registration in your tenant, made once by an administrator: "
                    "docs/office-relay.md, section Microsoft 365, has the four steps."
                )
            client_id = questions.ask(
                "Client ID of your app registration", _not_empty, args.oauth2_client_id, "--oauth2-client-id"
            )
            tenant = questions.ask(
                "Tenant", _not_empty, args.oauth2_tenant, "--oauth2-tenant", address.rpartition("@")[2]
            )
            upstream["oauth2"] = {
                "provider": "microsoft",
                "tenant": tenant,
                "client_id": client_id,
                "token_file": str(token_path(config_path)),
            }
            return Answers(provider, config_path, upstream, None)
    if args.password_stdin:
        password = read_stdin().strip("\r\n")
        if not password:
            raise SetupError("--password-stdin: standard input held no password")
    elif questions.interactive:
        password = questions.password(f"Your {provider.asks_for} for {username}")
    else:
        raise SetupError("give --password-stdin: there is no terminal to ask for the password on")
    return Answers(provider, config_path, upstream, password)


def _config_text(answers: Answers) -> bytes:
    settings: dict[str, Any]
    if answers.provider.name == "outbox":
        settings = {"outbox": str(Path("outbox").absolute())}
    else:
        upstream = dict(answers.upstream)
        if answers.password is not None:
            upstream["password_file"] = str(answers.password_path)
        settings = {"upstream": upstream}
    written = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"# Written by `privacy-relay setup --provider {answers.provider.name}` on {written}.\n"
        "# Every key, its default and its environment variable: docs/configuration.md\n"
    )
    return (header + yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)).encode()


def _write_password(answers: Answers, password: str) -> None:
    # mkstemp creates the temporary file with mode 0600 before the password is in it.
    write_atomically(answers.password_path, [password.encode()])


def _probe(config: Config) -> list[ProbeStep]:
    from relay.server import access_tokens

    password = config.upstream_password.get_secret_value() if config.upstream_password else None
    steps = asyncio.run(probe_upstream(config.upstream, password, socket.gethostname(), access_tokens(config.upstream)))
    for step in steps:
        print(f"  {step.step}: {'OK' if step.ok else 'FAILED'}: {step.detail}")
    return steps


def _advice(failed: ProbeStep, provider: Provider, config: Config) -> str:
    where = f"{config.upstream.host}:{config.upstream.port}"
    if failed.step == "connect":
        return (
            f"Could not talk to {where}. Check the server's name and port, that this computer is online, "
            "and that a firewall lets it out."
        )
    if failed.step == "starttls":
        return (
            f"{where} did not start TLS as asked. If the port is 465, the security is implicit; "
            "if the certificate was refused, the server's name must be the one on its certificate."
        )
    return provider.login_advice


def _check_login(answers: Answers, questions: Questions) -> bool:
    """The steps of `privacy-relay check`, with plain advice; a refused password is asked for again."""
    while True:
        config = load_config(answers.config_path)
        print(f"Checking the login at {config.upstream.host}:{config.upstream.port} (no mail is sent):")
        steps = _probe(config)
        failed = next((step for step in steps if not step.ok), None)
        if failed is None:
            return True
        print(f"\n{_advice(failed, answers.provider, config)}")
        if failed.step != "auth" or answers.password is None or not questions.interactive:
            return False
        _write_password(answers, questions.password(f"Your {answers.provider.asks_for} again"))


def _sign_in(answers: Answers) -> bool:
    config = load_config(answers.config_path)
    print("Sign in to Microsoft 365 as the mailbox:")
    try:
        token = asyncio.run(device_code_login(config.upstream.oauth2, lambda text: print(text, flush=True)))
    except OAuth2Error as exc:
        print(f"The sign-in did not work: {exc}. Try again with `privacy-relay auth login upstream`.")
        return False
    assert config.upstream.oauth2.token_file is not None
    save_token(config.upstream.oauth2.token_file, token)
    return True


def _print_mail_program_settings(config: Config) -> None:
    print(
        "\nNow give your mail program (Outlook, Thunderbird, Apple Mail) this outgoing (SMTP) server:\n"
        f"  Server:               {config.listen.host}\n"
        f"  Port:                 {config.listen.port}\n"
        "  Connection security:  None\n"
        "  Authentication:       None (no user name, no password)\n"
        "Then start the relay with `privacy-relay serve`, or let it start when you log in with "
        "`privacy-relay service install`."
    )


def run(args: argparse.Namespace) -> int:
    questions = Questions(interactive=sys.stdin.isatty() and not args.password_stdin)
    try:
        answers = _gather(args, questions, sys.stdin.read)
        answers.config_path.parent.mkdir(parents=True, exist_ok=True)
        if answers.password is not None:
            _write_password(answers, answers.password)
        write_atomically(answers.config_path, [_config_text(answers)])
        print(
            f"\nWrote {answers.config_path}" + (f" and {answers.password_path} (mode 0600)" if answers.password else "")
        )
        config = load_config(answers.config_path)
        ready = True
        if not config.uses_outbox:
            if config.upstream.uses_oauth2:
                ready = _sign_in(answers)
            ready = ready and _check_login(answers, questions)
    except (SetupError, ConfigError) as exc:
        print(f"privacy-relay setup: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"privacy-relay setup: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("\nSet-up stopped. Files already written are complete; nothing is half-written.", file=sys.stderr)
        return 130
    if not ready:
        print(f"The settings are saved in {answers.config_path}; fix what is said above and run `privacy-relay check`.")
        return 1
    if config.uses_outbox:
        print(f"No provider yet: each copy will be written to {config.outbox} as an .eml file.")
    _print_mail_program_settings(config)
    return 0

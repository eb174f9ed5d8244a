"""The privacy-relay command: argument parsing and output only; the work is done elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import webbrowser
from collections.abc import Sequence
from email.utils import formatdate
from pathlib import Path

from relay import __version__
from relay.admin import service, setup
from relay.config.loading import load_config
from relay.config.models import DEFAULT_CONFIG_PATH, Config, ConfigError, UpstreamConfig
from relay.core.preview import preview_message
from relay.core.routing import route_for
from relay.core.senders import Account
from relay.logs import configure_logging
from relay.smtp.accounts import (
    UsersFileError,
    changing_accounts,
    check_address,
    check_name,
    check_new_password,
    hash_password,
    load_accounts,
    load_accounts_or_empty,
    save_accounts,
)
from relay.upstream.oauth import AccessTokens, OAuth2Error, device_code_login, installed_app_login, save_token
from relay.upstream.pool import probe_upstream


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="privacy-relay",
        description="A local SMTP relay that stops mail from exposing recipients to each other.",
    )
    parser.add_argument("--version", action="version", version=f"privacy-relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_option(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--config",
            type=Path,
            metavar="FILE",
            help="YAML config file (default: ./config/relay.yaml if it exists, else built-in defaults)",
        )

    setup_command = commands.add_parser(
        "setup",
        help="answer a few questions to set up your provider; writes the config",
        description="Asks for your provider, address and password (each also a flag; with all given it asks "
        "nothing), writes the config and a password file (mode 0600), tests the login as `check` does, and "
        "shows the settings for your mail program.",
    )
    setup.add_arguments(setup_command)
    service_command = commands.add_parser(
        "service",
        help="start the relay when you log in (install), or no longer (uninstall)",
        description="Install or remove a systemd user unit (Linux, WSL) or a launchd agent (macOS) that runs "
        "`privacy-relay serve` in this folder when you log in.",
    )
    service.add_arguments(service_command)
    serve = commands.add_parser("serve", help="run the relay", description="Run the relay.")
    config_option(serve)
    check = commands.add_parser(
        "check",
        help="validate the config and test the upstream login",
        description="Validate the config and, if an upstream is set, connect to it (TLS, EHLO, AUTH, "
        "QUIT) without sending mail.",
    )
    config_option(check)
    preview = commands.add_parser(
        "preview",
        help="show what the relay would do with a message",
        description="Print the policy decision and the headers of every copy that would be sent. Touches no network.",
    )
    preview.add_argument("file", type=Path, metavar="FILE.eml", help="the message to look at")
    config_option(preview)
    preview.add_argument("--mail-from", metavar="ADDR", help="envelope sender (default: From)")
    preview.add_argument(
        "--rcpt",
        metavar="ADDR",
        action="append",
        help="envelope recipient, repeatable (default: the addresses in To, Cc and Bcc)",
    )
    user = commands.add_parser(
        "user",
        help="manage the accounts clients log in with (listen.users_file)",
        description="Add, remove and list the accounts for client AUTH, kept in listen.users_file.",
    )
    user_commands = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = user_commands.add_parser(
        "add",
        help="add a user, or replace their password and addresses",
        description="Add a user, or replace an existing user's password and addresses. The password is read "
        "from standard input when it is not a terminal (echo ... | privacy-relay user add NAME), else asked "
        "for twice. Only an argon2id hash is stored.",
    )
    add.add_argument("name", metavar="NAME", help="the user name mail programs log in with")
    add.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="ADDR",
        help="an address this user may send as, repeatable; without any, the user may send as any address",
    )
    config_option(add)
    remove = user_commands.add_parser("remove", help="remove a user", description="Remove a user.")
    remove.add_argument("name", metavar="NAME")
    config_option(remove)
    listing = user_commands.add_parser(
        "list", help="list users and their addresses", description="List users and the addresses they may use."
    )
    config_option(listing)
    queue = commands.add_parser(
        "queue",
        help="look at and change the spool (safe while the relay runs)",
        description="List, show, retry or delete the messages waiting in the spool.",
    )
    queue_commands = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    config_option(queue_commands.add_parser("list", help="one line per waiting message"))
    show = queue_commands.add_parser("show", help="a message's copies, attempts and last replies")
    show.add_argument("id", metavar="ID")
    retry = queue_commands.add_parser("retry", help="make waiting copies due now (all, or one message's)")
    retry.add_argument("id", metavar="ID", nargs="?")
    delete = queue_commands.add_parser("delete", help="remove a message from the spool without a bounce")
    delete.add_argument("id", metavar="ID")
    for action in (show, retry, delete):
        config_option(action)
    held = commands.add_parser(
        "held",
        help="messages held for review (policy.action: hold): list, show, release or discard them",
        description="Held messages wait in the spool until a person decides. Safe while the relay runs.",
    )
    held_commands = held.add_subparsers(dest="held_command", required=True, metavar="ACTION")
    config_option(held_commands.add_parser("list", help="one line per held message"))
    held_show = held_commands.add_parser("show", help="a held message's sender, subject, recipients and reason")
    held_show.add_argument("id", metavar="ID")
    release = held_commands.add_parser(
        "release",
        help="send a held message",
        description="Send a held message: as split (each recipient their own copy), as bcc, or as written "
        "(everyone sees everyone: asks you to confirm).",
    )
    release.add_argument("id", metavar="ID")
    release.add_argument("--as", dest="release_as", choices=("split", "bcc", "written"), default="split")
    release.add_argument("--yes", action="store_true", help="confirm --as written without asking")
    discard = held_commands.add_parser("discard", help="never send a held message")
    discard.add_argument("id", metavar="ID")
    for action in (held_show, release, discard):
        config_option(action)
    auth = commands.add_parser(
        "auth",
        help="sign the relay in to an upstream with OAuth2 (Microsoft 365, Google)",
        description="Sign in to an upstream that has oauth2 set, and store its refresh token in oauth2.token_file.",
    )
    auth_commands = auth.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    login = auth_commands.add_parser(
        "login",
        help="sign in interactively and store the refresh token",
        description="Microsoft: shows a code to enter at Microsoft's sign-in page on any device. Google: opens "
        "the browser, which comes back to a port on 127.0.0.1. The refresh token is written to "
        "oauth2.token_file with mode 0600.",
    )
    login.add_argument(
        "upstream", metavar="UPSTREAM", help="`upstream` for the default upstream, else a name from `upstreams`"
    )
    config_option(login)
    return parser


def _serve(config: Config, path: Path | None) -> int:
    from relay.server import run

    configure_logging(config.logging)
    try:
        return run(config, lambda: load_config(path))
    except ConfigError as exc:
        print(f"privacy-relay: {exc}", file=sys.stderr)
        return 2


def _read_new_password() -> str:
    """From standard input when it is not a terminal (like `docker login --password-stdin`), else asked twice."""
    if not sys.stdin.isatty():
        return sys.stdin.read().removesuffix("\n").removesuffix("\r")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != password:
        raise UsersFileError("the two passwords differ; nothing was changed")
    return password


def _describe_senders(account: Account) -> str:
    if account.may_send_as_anyone:
        return "may send as any address (no --address given)"
    return "may send as " + ", ".join(account.addresses)


def _user(config: Config, args: argparse.Namespace, source: str) -> int:
    # Absolute, so that an administrator who ran this in another folder sees which file changed.
    path = config.listen.users_file.resolve()
    if args.user_command != "list" and "users_file" not in config.listen.model_fields_set:
        print(
            f"privacy-relay: listen.users_file is not set in {source}, so this is the default file in the "
            f"current folder: {path}. Pass --config with the relay's own config file to change the "
            "accounts the relay reads.",
            file=sys.stderr,
        )
    try:
        if args.user_command == "list":
            if not path.exists():
                print(f"no users yet ({path} does not exist)")
                return 0
            accounts = load_accounts(path)
            for account in sorted(accounts.by_name.values(), key=lambda a: a.name):
                print(f"{account.name}: {_describe_senders(account)}")
            if not accounts.by_name:
                print(f"no users in {path}")
            return 0
        name = check_name(args.name)
        if args.user_command == "remove":
            with changing_accounts(path):
                accounts = load_accounts(path)
                if name not in accounts.by_name:
                    print(f"privacy-relay: there is no user {name!r} in {path}", file=sys.stderr)
                    return 1
                save_accounts(path, accounts.without(name))
            print(f"removed user {name} from {path}")
            return 0
        addresses = tuple(check_address(address) for address in args.address)
        load_accounts_or_empty(path)  # a broken file is named before the password is asked for
        password = check_new_password(_read_new_password())
        account = Account(name, hash_password(password), addresses)
        # Read again under the lock: another `user add` may have changed the file meanwhile.
        with changing_accounts(path):
            accounts = load_accounts_or_empty(path)
            replaced = name in accounts.by_name
            save_accounts(path, accounts.with_account(account))
    except UsersFileError as exc:
        print(f"privacy-relay: {exc}", file=sys.stderr)
        return 1
    print(f"{'updated' if replaced else 'added'} user {name} in {path}: {_describe_senders(account)}")
    if config.listen.auth == "none":
        print("note: listen.auth is none, so the relay does not let clients log in yet", file=sys.stderr)
    return 0


def _open_in_browser(url: str) -> None:
    print(f"Sign in with your browser; if it does not open, visit:\n{url}", flush=True)
    webbrowser.open(url)


def _auth_login(config: Config, name: str) -> int:
    upstream = config.upstream if name == "upstream" else config.upstreams.get(name)
    if upstream is None:
        known = ", ".join(["upstream", *sorted(config.upstreams)])
        print(f"privacy-relay: there is no upstream named {name!r} (there are: {known})", file=sys.stderr)
        return 2
    oauth2 = upstream.oauth2
    key = "upstream" if name == "upstream" else f"upstreams.{name}"
    if oauth2.provider is None or oauth2.token_file is None:
        print(f"privacy-relay: {key}.oauth2.provider is not set, so there is nothing to sign in to", file=sys.stderr)
        return 2
    try:
        if oauth2.provider == "microsoft":
            token = asyncio.run(device_code_login(oauth2, lambda text: print(text, flush=True)))
        else:
            token = asyncio.run(installed_app_login(oauth2, _open_in_browser))
        save_token(oauth2.token_file, token)
    except OAuth2Error as exc:
        print(f"privacy-relay: sign-in failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"privacy-relay: cannot write {oauth2.token_file}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"signed in; the refresh token is in {oauth2.token_file} (mode 0600). Try `privacy-relay check`.")
    return 0


def _check_listen(config: Config) -> bool:
    """What `serve` would load for clients: the TLS certificate and the accounts file, when configured."""
    from relay.server import build_authenticator, client_tls_context

    listen = config.listen
    ok = True
    hostname, qualified = listen.own_hostname()
    if qualified:
        print(f"listen hostname: OK: {hostname}")
    else:
        print(f"listen hostname: WARNING: the machine has no fully qualified name, so {hostname}; set listen.hostname")
    if listen.tls != "none":
        try:
            client_tls_context(listen)
            print(f"listen tls: OK: {listen.tls} with {listen.cert_file}")
        except ConfigError as exc:
            print(f"listen tls: FAILED: {exc}")
            ok = False
    if listen.auth != "none":
        try:
            authenticator = build_authenticator(listen)
            assert authenticator is not None
            users = len(authenticator.current_accounts().by_name)
            print(f"listen auth: OK: {listen.auth}, {users} user(s) in {listen.users_file}")
        except ConfigError as exc:
            print(f"listen auth: FAILED: {exc}")
            ok = False
    if config.uses_passthrough:
        print("listen auth: clients log in with their own accounts at the upstreams whose auth is passthrough")
    return ok


def _check(config: Config, source: str) -> int:
    print(f"config: OK ({source})")
    if not _check_listen(config):
        return 1
    from relay.server import access_tokens

    ok = True
    if config.uses_outbox:
        print(f"upstream: none set; copies will be written to {config.outbox.resolve()}")
    else:
        password = config.upstream_password.get_secret_value() if config.upstream_password else None
        ok = _probe("upstream", config, config.upstream, password, access_tokens(config.upstream))
    for name, upstream in config.upstreams.items():
        secret = config.named_upstream_passwords.get(name)
        password = secret.get_secret_value() if secret else None
        print(f"\nupstreams.{name} ({upstream.host}:{upstream.port}):")
        ok = _probe(f"upstreams.{name}", config, upstream, password, access_tokens(upstream, name)) and ok
    return 0 if ok else 1


def _probe(
    key: str, config: Config, upstream: UpstreamConfig, password: str | None, tokens: AccessTokens | None
) -> bool:
    hostname, _ = config.listen.own_hostname()
    steps = asyncio.run(probe_upstream(upstream, password, hostname, tokens))
    for step in steps:
        print(f"{step.step}: {'OK' if step.ok else 'FAILED'}: {step.detail}")
    ok = all(step.ok for step in steps)
    print(f"{key}: ready" if ok else f"{key}: NOT ready, see above")
    return ok


def _describe_route(config: Config, mail_from: str) -> str:
    name = route_for(mail_from, config.routes)
    if name is not None:
        upstream = config.upstreams[name]
        return f"{name} ({upstream.host}:{upstream.port}, chosen by routes{_passthrough_note(upstream)})"
    if config.uses_outbox:
        return f"none; the outbox folder {config.outbox}"
    upstream = config.upstream
    return f"upstream ({upstream.host}:{upstream.port}, no route matched{_passthrough_note(upstream)})"


def _passthrough_note(upstream: UpstreamConfig) -> str:
    return "; sent while the client waits, logged in as the client" if upstream.is_passthrough else ""


def _preview(config: Config, path: Path, mail_from: str | None, rcpts: list[str] | None) -> int:
    try:
        data = path.read_bytes()
    except OSError as exc:
        print(f"cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 1
    hostname, _ = config.listen.own_hostname()
    result = preview_message(
        config.policy.settings(), data, hostname, formatdate(localtime=True), mail_from, rcpts or ()
    )
    if result.mail_from is None:
        print(f"decision: refused\nreply:    {result.reply}")
        return 0
    print(f"envelope: from <{result.mail_from}> to {len(result.recipients)} recipient(s)")
    print(f"upstream: {_describe_route(config, result.mail_from)}")
    if result.reply is not None:
        check = f" by the privacy check (header {result.leaked_header})" if result.leaked_header else ""
        print(f"decision: refused{check}\nreply:    {result.reply}")
        return 0
    print(f"decision: {result.decision}\nreason:   {result.reason}")
    print(f"copies:   {len(result.copies)}")
    for number, copy in enumerate(result.copies, 1):
        print(f"\n--- copy {number} of {len(result.copies)} ({copy.kind}) to: {', '.join(copy.recipients)}")
        sys.stdout.write(copy.headers)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "setup":
        # It writes the config, so it does not read one that may not exist yet (or is being replaced).
        return setup.run(args)
    if args.command == "service":
        return service.run(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"privacy-relay: {exc}", file=sys.stderr)
        return 2
    if args.config:
        source = str(args.config)
    else:
        source = str(DEFAULT_CONFIG_PATH) if DEFAULT_CONFIG_PATH.exists() else "built-in defaults"
    if args.command == "serve":
        return _serve(config, args.config)
    if args.command == "check":
        return _check(config, source)
    if args.command == "user":
        return _user(config, args, source)
    if args.command == "queue":
        from relay.admin.queue import run_queue_command

        return run_queue_command(config, args.queue_command, getattr(args, "id", None))
    if args.command == "held":
        from relay.admin.held import run_held_command

        return run_held_command(config, args)
    if args.command == "auth":
        return _auth_login(config, args.upstream)
    return _preview(config, args.file, args.mail_from, args.rcpt)

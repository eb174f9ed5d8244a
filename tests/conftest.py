"""Shared fixtures: real SMTP servers on free loopback ports, each on its own event loop thread.

- `upstream`: an aiosmtpd server that records every transaction and answers as a test tells it to.
- `start_relay(**settings)`: a privacy-relay RelayServer with the given config, delivering to the
  upstream or to an outbox folder.
- `swaks(relay, sender, recipients, message)`: swaks as the mail client. Set
  PRIVACY_RELAY_TESTS_REQUIRE_SWAKS=1 (as .ci/run does) to make a missing swaks a failure, not a skip.
Tests then talk to them with smtplib, as a real client would.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from bench.postgres import PASSWORD, PrivateCluster, server_binaries
from relay.config.loading import load_config
from relay.config.models import Config
from relay.server import RelayServer
from relay.spool.postgres import PostgresSpool
from tests.support.oauth_server import TokenEndpoint

LOOPBACK = "127.0.0.1"


class LoopThread:
    """An asyncio event loop running in a daemon thread, for servers that tests reach over TCP."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    # The name the client logged in with, when it did.
    login: str | None = None


@dataclass
class RecordingHandler:
    """An upstream that records what it accepted. Tests set the replies it gives."""

    messages: list[Received] = field(default_factory=list)
    # RCPT address (lower case) -> reply, e.g. {"bad@x.test": "550 5.1.1 No such user"}
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    data_reply: str | None = None
    # SMTP connections the upstream has accepted, to check that the relay reuses them.
    connections: int = 0
    # Every password login a client tried: (name, password, accepted).
    auth_attempts: list[tuple[str, str, bool]] = field(default_factory=list)
    # QUIT commands received: a client that logs out politely.
    quits: int = 0
    # Seconds before each DATA reply: a slow upstream.
    data_delay: float = 0.0
    # The name each client gave in EHLO.
    ehlo_names: list[str] = field(default_factory=list)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        self.ehlo_names.append(hostname)
        session.host_name = hostname
        return responses

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.quits += 1
        return "221 Bye"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        await asyncio.sleep(self.data_delay)
        self.messages.append(
            Received(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                bytes(envelope.original_content or b""),
                list(envelope.mail_options),
                str(session.auth_data) if session.authenticated else None,
            )
        )
        return "250 2.0.0 Queued"


@dataclass
class XOAuth2Handler(RecordingHandler):
    """An upstream that takes XOAUTH2 logins whose bearer token is in valid_tokens, as Microsoft 365 does."""

    username: str = ""
    valid_tokens: set[str] = field(default_factory=set)
    # Every bearer token a client tried, in order.
    tried_tokens: list[str] = field(default_factory=list)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        fields = base64.b64decode(args[1]).decode().split("\x01")
        user = fields[0].removeprefix("user=")
        token = fields[1].removeprefix("auth=Bearer ")
        self.tried_tokens.append(token)
        if user == self.username and token in self.valid_tokens:
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False, message="535 5.7.3 Authentication unsuccessful")


@dataclass
class Upstream:
    host: str
    port: int
    handler: RecordingHandler
    ca: trustme.CA | None = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages


class UpstreamFactory:
    """Starts recording upstreams, optionally with STARTTLS or implicit TLS and AUTH."""

    def __init__(self, loops: LoopThread, tmp_path: Path) -> None:
        self._loops = loops
        self._tmp_path = tmp_path
        self._servers: list[asyncio.Server] = []

    def __call__(
        self,
        tls: str = "none",
        credentials: tuple[str, str] | dict[str, str] | None = None,
        xoauth2_user: str | None = None,
    ) -> Upstream:
        """credentials: require AUTH PLAIN/LOGIN as this (name, password), or as any of {name: password}.
        xoauth2_user: require XOAUTH2 as that user, with a token the test puts in handler.valid_tokens."""
        handler = RecordingHandler() if xoauth2_user is None else XOAuth2Handler(username=xoauth2_user)
        accounts = dict([credentials]) if isinstance(credentials, tuple) else credentials
        ca: trustme.CA | None = None
        server_context: ssl.SSLContext | None = None
        if tls != "none":
            ca = trustme.CA()
            server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("localhost", LOOPBACK).configure_cert(server_context)

        def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
            if not accounts or not isinstance(data, LoginPassword):
                return AuthResult(success=False, handled=False)
            name, password = data.login.decode(), data.password.decode()
            accepted = accounts.get(name) == password
            handler.auth_attempts.append((name, password, accepted))
            return AuthResult(success=True, auth_data=name) if accepted else AuthResult(success=False, handled=False)

        def protocol() -> SMTP:
            handler.connections += 1
            return SMTP(
                handler,
                enable_SMTPUTF8=True,
                hostname="upstream.test",
                tls_context=server_context if tls == "starttls" else None,
                require_starttls=tls == "starttls",
                authenticator=authenticator if accounts else None,
                auth_required=bool(accounts or xoauth2_user),
                auth_require_tls=tls != "none",
            )

        async def start() -> asyncio.Server:
            return await asyncio.get_running_loop().create_server(
                protocol, LOOPBACK, 0, ssl=server_context if tls == "implicit" else None
            )

        server: asyncio.Server = self._loops.run(start())
        self._servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return Upstream(LOOPBACK, port, handler, ca)

    def close(self) -> None:
        async def stop(server: asyncio.Server) -> None:
            server.close()

        for server in self._servers:
            self._loops.run(stop(server))


@pytest.fixture
def loops() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def make_upstream(loops: LoopThread, tmp_path: Path) -> Iterator[UpstreamFactory]:
    factory = UpstreamFactory(loops, tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def upstream(make_upstream: UpstreamFactory) -> Upstream:
    return make_upstream()


def relay_config(tmp_path: Path, environ: dict[str, str] | None = None, config_file: Path | None = None) -> Config:
    """A Config from RELAY_* settings (and a YAML file if given): a free port, outbox and spool under tmp_path."""
    settings = {
        "RELAY_LISTEN_PORT": "0",
        "RELAY_OUTBOX": str(tmp_path / "outbox"),
        "RELAY_SPOOL_PATH": str(tmp_path / "spool"),
    }
    settings.update(environ or {})
    return load_config(config_file, settings)


class ReachableRelay(Protocol):
    """A relay listening on a loopback port: in this process, a subprocess or a container."""

    port: int


@dataclass
class RunningRelay:
    server: RelayServer
    host: str
    port: int
    outbox: Path


@pytest.fixture
def start_relay(loops: LoopThread, tmp_path: Path) -> Iterator[Callable[..., RunningRelay]]:
    """start_relay(RELAY_POLICY_ACTION="bcc", ..., config_file=yaml_path) -> a RunningRelay; stopped after the test."""
    started: list[RelayServer] = []

    def start(upstream: Upstream | None = None, config_file: Path | None = None, **environ: str) -> RunningRelay:
        if upstream is not None:
            environ.setdefault("RELAY_UPSTREAM_HOST", upstream.host)
            environ.setdefault("RELAY_UPSTREAM_PORT", str(upstream.port))
            environ.setdefault("RELAY_UPSTREAM_TLS", "none")
        config = relay_config(tmp_path, environ, config_file)

        async def boot() -> RelayServer:
            server = RelayServer(config)
            await server.start()
            return server

        server: RelayServer = loops.run(boot())
        started.append(server)
        return RunningRelay(server, LOOPBACK, server.port, config.outbox)

    yield start
    for server in started:
        loops.run(server.stop())


@pytest.fixture
def start_console(loops: LoopThread, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """start_console(upstream, RELAY_...=...) -> a RunningConsole: a relay and its console on free ports."""
    from relay.console import ConsoleThread
    from relay.server import check_upstreams
    from relay.workers import with_port
    from tests.support.console import ConsoleClient, RunningConsole

    started: list[tuple[RelayServer, ConsoleThread]] = []

    def start(upstream: Upstream | None = None, **environ: str) -> RunningConsole:
        if upstream is not None:
            environ.setdefault("RELAY_UPSTREAM_HOST", upstream.host)
            environ.setdefault("RELAY_UPSTREAM_PORT", str(upstream.port))
            environ.setdefault("RELAY_UPSTREAM_TLS", "none")
        environ.setdefault("RELAY_CONSOLE_PORT", "0")
        config = relay_config(tmp_path, environ)
        console = ConsoleThread(lambda: server.accepting, check_upstreams)

        async def boot() -> RelayServer:
            relay = RelayServer(config, count_connection=console.count_connection)
            await relay.start()
            return relay

        server: RelayServer = loops.run(boot())
        assert console.start(with_port(config, server.port)), "the console did not start"
        started.append((server, console))
        assert console.port is not None
        token = config.console_token_file.read_text().strip()
        client = ConsoleClient(console.port, token)
        return RunningConsole(server, server.port, console, client, config.console_token_file)

    yield start
    for server, console in started:
        console.stop()
        loops.run(server.stop())


@dataclass
class RelayCertificate:
    """A trustme certificate for the relay's own listener, as files, and a client context that trusts it."""

    cert_file: Path
    key_file: Path
    ca: trustme.CA

    def listen_settings(self, tls: str = "starttls") -> dict[str, str]:
        """The RELAY_LISTEN_* settings that offer clients TLS with this certificate."""
        return {
            "RELAY_LISTEN_TLS": tls,
            "RELAY_LISTEN_CERT_FILE": str(self.cert_file),
            "RELAY_LISTEN_KEY_FILE": str(self.key_file),
        }

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture
def relay_certificate(tmp_path: Path) -> RelayCertificate:
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", LOOPBACK)
    cert_file, key_file = tmp_path / "relay-cert.pem", tmp_path / "relay-key.pem"
    cert_file.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)
    return RelayCertificate(cert_file, key_file, ca)


USER_PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="session")
def user_password_hash() -> str:
    """USER_PASSWORD hashed once per test run: argon2id is slow on purpose."""
    from relay.smtp.accounts import hash_password

    return hash_password(USER_PASSWORD)


@pytest.fixture
def write_users(tmp_path: Path, user_password_hash: str) -> Callable[..., Path]:
    """write_users(kay=["kay@office.test"], crm=[]) -> an accounts file; every password is USER_PASSWORD."""
    from relay.core.senders import Account, Accounts
    from relay.smtp.accounts import save_accounts

    def write(**users: list[str]) -> Path:
        path = tmp_path / "users.yaml"
        accounts = Accounts({name: Account(name, user_password_hash, tuple(a)) for name, a in users.items()})
        save_accounts(path, accounts)
        return path

    return write


@pytest.fixture(scope="session")
def swaks_path() -> str:
    path = shutil.which("swaks")
    if path is None:
        if os.environ.get("PRIVACY_RELAY_TESTS_REQUIRE_SWAKS") == "1":
            pytest.fail("swaks is not installed (apt-get install swaks), and PRIVACY_RELAY_TESTS_REQUIRE_SWAKS=1")
        pytest.skip("swaks is not installed (apt-get install swaks)")
    return path


@pytest.fixture
def swaks(swaks_path: str, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """swaks(relay, sender, recipients, message_bytes) -> the finished swaks run (output in .stdout)."""

    def send(
        relay: ReachableRelay, sender: str, recipients: list[str], message: bytes
    ) -> subprocess.CompletedProcess[str]:
        message_path = tmp_path / "message.eml"
        # swaks ends DATA with CRLF . CRLF itself: the file's own last line break would become body.
        message_path.write_bytes(message.removesuffix(b"\r\n"))
        return subprocess.run(
            [
                swaks_path,
                "--server",
                f"127.0.0.1:{relay.port}",
                "--helo",
                "client.test",
                "--from",
                sender,
                "--to",
                ",".join(recipients),
                "--data",
                f"@{message_path}",
                "--timeout",
                "20",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return send


@pytest.fixture
def token_endpoint() -> Iterator[TokenEndpoint]:
    """An OAuth2 provider on a free loopback port: token, device-authorization and authorization endpoints."""
    endpoint = TokenEndpoint()
    yield endpoint
    endpoint.close()


def _postgres_binaries() -> Path:
    binaries = server_binaries()
    if binaries is None:
        reason = "needs Debian's PostgreSQL server (apt-get install postgresql)"
        if os.environ.get("PRIVACY_RELAY_TESTS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}, and PRIVACY_RELAY_TESTS_REQUIRE_POSTGRES=1")
        pytest.skip(reason)
    return binaries


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PrivateCluster]:
    """One private PostgreSQL cluster for the whole run; each test gets a database of its own in it."""
    cluster = PrivateCluster(_postgres_binaries())
    yield cluster
    cluster.destroy()


@pytest.fixture
def make_postgres_cluster() -> Iterator[Callable[[], PrivateCluster]]:
    """A cluster of the test's own, for tests that stop and start the database server."""
    clusters: list[PrivateCluster] = []

    def make() -> PrivateCluster:
        clusters.append(PrivateCluster(_postgres_binaries()))
        return clusters[-1]

    yield make
    for cluster in clusters:
        cluster.destroy()


_database_numbers = itertools.count()


@pytest.fixture
def postgres_database(postgres_cluster: PrivateCluster) -> Iterator[str]:
    """spool.url of a new, empty database; dropped after the test."""
    name = f"spool_{os.getpid()}_{next(_database_numbers)}"
    postgres_cluster.psql(f"CREATE DATABASE {name}")
    yield postgres_cluster.database_url(name)
    postgres_cluster.psql(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def spool_password_file(tmp_path: Path) -> Path:
    """spool.password_file for the test clusters."""
    path = tmp_path / "spool-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
async def two_relays(postgres_database: str) -> AsyncIterator[tuple[PostgresSpool, PostgresSpool]]:
    """Two spools on one database, as two relays would hold them."""
    first, second = PostgresSpool(postgres_database, PASSWORD), PostgresSpool(postgres_database, PASSWORD)
    await first.open()
    await second.open()
    yield first, second
    await first.close()
    await second.close()


@pytest.fixture(params=["sqlite", "postgres"])
def spool_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Nothing for the SQLite spool in tmp_path; spool.url and its password file for PostgreSQL."""
    if request.param == "sqlite":
        return {}
    return {
        "RELAY_SPOOL_URL": request.getfixturevalue("postgres_database"),
        "RELAY_SPOOL_PASSWORD_FILE": str(request.getfixturevalue("spool_password_file")),
    }

"""Sending copies to the upstream with aiosmtplib: TLS, AUTH and a small pool of reused connections.

How to send, not when: retries and scheduling belong to relay/delivery/.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

import aiosmtplib

from relay.config.models import UpstreamConfig
from relay.core.replies import Reply
from relay.core.rewrite import OutgoingCopy
from relay.upstream.errors import login_failure
from relay.upstream.oauth import AccessTokens, OAuth2Error
from relay.upstream.transaction import UpstreamConnection, WireBodies, wire_form


@dataclass(slots=True)
class SendOutcome:
    """What the upstream said about each recipient of one copy."""

    accepted: list[str] = field(default_factory=list)
    refused: dict[str, Reply] = field(default_factory=dict)
    accepted_reply: Reply | None = None  # what the upstream said when it took the copy
    # False when the attempt got no answer from the upstream (connection, TLS or login failed): /metrics' upstream_up.
    reached_upstream: bool = True


def build_tls_context(config: UpstreamConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    if not config.verify_certificate:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def needs_smtputf8(mail_from: str, copy: OutgoingCopy, client_used_smtputf8: bool) -> bool:
    """True when the copy can only go out with SMTPUTF8: the client used it and something is not ASCII.

    8-bit headers from a client that did not ask for SMTPUTF8 are legacy mail (Latin-1 subjects) and go
    out as they came, as Postfix passes them.
    """
    if not client_used_smtputf8:
        return False
    return not (mail_from.isascii() and all(r.isascii() for r in copy.recipients) and copy.headers.isascii())


async def log_in(
    client: aiosmtplib.SMTP, config: UpstreamConfig, password: str | bytes | None, tokens: AccessTokens | None
) -> None:
    """AUTH as config says: XOAUTH2 with an access token, a password, or nothing."""
    if tokens is not None:
        assert config.username is not None
        token = await tokens.current()
        try:
            await client.auth_xoauth2(config.username, token)
        except aiosmtplib.SMTPAuthenticationError:
            # Expired early or revoked: one more try with a token fresh from the provider.
            fresh = await tokens.refreshed(token)
            try:
                await client.auth_xoauth2(config.username, fresh)
            except aiosmtplib.SMTPAuthenticationError as exc:
                # A temporary failure, as Postfix's smtp_sasl_auth_soft_bounce: mail waits for the fix.
                raise OAuth2Error(
                    f"the upstream refused XOAUTH2 for {config.username} even with a fresh access token "
                    f"({exc.code} {' '.join(exc.message.split())}); check that the mailbox allows authenticated "
                    "SMTP and that the app may send mail (SMTP.Send, or https://mail.google.com/)"
                ) from None
    elif config.username:
        # One mechanism, not aiosmtplib's login(), which tries the next one the server offers after a
        # refusal: one wrong password would count as two or three failed logins at the provider.
        offered = client.supported_auth_methods
        if "plain" in offered:
            await client.auth_plain(config.username, password or "")
        elif "login" in offered:
            await client.auth_login(config.username, password or "")
        else:
            await client.login(config.username, password or "")  # CRAM-MD5, or aiosmtplib's own error


class UpstreamPool:
    """At most max_connections open connections to one upstream, reused across messages and copies.

    aiosmtplib opens and logs in each connection; relay.upstream.transaction then sends every copy on it, its
    commands pipelined and its body in a wire form shared by all copies of the message.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        password: str | bytes | None,
        local_hostname: str,
        tokens: AccessTokens | None = None,
    ) -> None:
        assert config.host is not None
        self._config = config
        self._host = config.host
        self._password = password
        self._tokens = tokens
        self._local_hostname = local_hostname
        self._slots = asyncio.Semaphore(config.max_connections)
        self._idle: list[UpstreamConnection] = []
        self._bodies = WireBodies()
        self._tls_context = build_tls_context(config) if config.tls != "none" else None

    @property
    def label(self) -> str:
        return f"{self._host}:{self._config.port}"

    async def open_connection(self) -> UpstreamConnection:
        """A new, logged-in connection (EHLO, TLS and AUTH done)."""
        config = self._config
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=config.port,
            use_tls=config.tls == "implicit",
            start_tls=config.tls == "starttls",
            tls_context=self._tls_context,
            local_hostname=self._local_hostname,
            timeout=config.timeout,
        )
        await client.connect()
        try:
            if client.is_ehlo_or_helo_needed:
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
            await log_in(client, config, self._password, self._tokens)
            return UpstreamConnection.take_over(client, config.timeout)
        except BaseException:
            client.close()
            raise

    async def connect_ahead(self) -> None:
        """Open and log in a connection now, kept for the next send; a failure is raised as login_failure() names it."""
        try:
            connection = await self.open_connection()
        except Exception as exc:
            raise login_failure(exc, self.label) from None
        self._keep_or_close(connection)

    async def send(self, mail_from: str, copy: OutgoingCopy, smtputf8: bool) -> SendOutcome:
        wire_body = self._bodies.acquire(copy.body)
        try:
            async with self._slots:
                return await self._send_on_a_connection(
                    mail_from, copy, wire_form(copy.headers), wire_body, needs_smtputf8(mail_from, copy, smtputf8)
                )
        finally:
            self._bodies.release(copy.body)

    async def _send_on_a_connection(
        self, mail_from: str, copy: OutgoingCopy, wire_headers: bytes, wire_body: bytes, smtputf8: bool
    ) -> SendOutcome:
        connection = self._ready_idle_connection()
        reused = connection is not None
        if connection is None:
            connection = await self.open_connection()
        if smtputf8 and not connection.supports("smtputf8"):
            self._keep_or_close(connection)
            # RFC 6531: without SMTPUTF8 at the server, return or reject; downgrading would alter the message.
            reply = Reply(
                550,
                "5.6.7",
                f"this message has non-ASCII addresses or headers (SMTPUTF8) and {self.label} does not "
                "accept SMTPUTF8; not sent rather than altered. Use ASCII addresses or another upstream",
            )
            return SendOutcome(refused=dict.fromkeys(copy.recipients, reply))
        try:
            result = await connection.transaction(mail_from, copy.recipients, wire_headers, wire_body, smtputf8)
        except aiosmtplib.SMTPServerDisconnected:
            connection.close()
            if not reused:
                raise
            # The upstream closed an idle connection; one fresh attempt is safe.
            connection = await self.open_connection()
            try:
                result = await connection.transaction(mail_from, copy.recipients, wire_headers, wire_body, smtputf8)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            connection.close()
            raise
        self._keep_or_close(connection)
        return SendOutcome(
            accepted=result.accepted,
            refused=result.refused,
            accepted_reply=result.accepted_reply,
        )

    def _ready_idle_connection(self) -> UpstreamConnection | None:
        """An idle connection still fit for a transaction; ones the upstream closed or spoke on are dropped."""
        while self._idle:
            connection = self._idle.pop()
            if connection.ready:
                return connection
            connection.close()
        return None

    def _keep_or_close(self, connection: UpstreamConnection) -> None:
        if connection.usable:
            self._idle.append(connection)
        else:
            connection.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(connection.quit() for connection in idle))


@dataclass(frozen=True, slots=True)
class ProbeStep:
    step: str
    ok: bool
    detail: str


async def probe_upstream(
    config: UpstreamConfig, password: str | None, local_hostname: str, tokens: AccessTokens | None = None
) -> list[ProbeStep]:
    """Connect, EHLO, TLS and AUTH one step at a time, sending no mail; what worked and what did not."""
    assert config.host is not None
    tls_context = build_tls_context(config) if config.tls != "none" else None
    client = aiosmtplib.SMTP(
        hostname=config.host,
        port=config.port,
        use_tls=config.tls == "implicit",
        start_tls=False,
        tls_context=tls_context,
        local_hostname=local_hostname,
        timeout=config.timeout,
    )
    where = f"{config.host}:{config.port}"
    steps: list[ProbeStep] = []
    current = "connect"
    try:
        greeting = await client.connect()
        detail = "with TLS, certificate accepted" if config.tls == "implicit" else "plain TCP"
        steps.append(ProbeStep(current, True, f"{where} answered ({detail}): {greeting.code}"))
        if config.tls == "starttls":
            current = "starttls"
            # connect() without start_tls sends no EHLO, and only EHLO's reply lists STARTTLS.
            await client.ehlo()
            if not client.supports_extension("starttls"):
                steps.append(ProbeStep(current, False, f"{where} does not offer STARTTLS"))
                client.close()
                return steps
            await client.starttls()
            # The extensions (AUTH among them) are offered anew after TLS: without this EHLO, log_in
            # would see none and fall back to trying every mechanism.
            await client.ehlo()
            steps.append(ProbeStep(current, True, "TLS started, certificate accepted"))
        if config.username:
            current = "auth"
            await log_in(client, config, password, tokens)
            how = " with OAuth2 (XOAUTH2)" if tokens is not None else ""
            steps.append(ProbeStep(current, True, f"logged in as {config.username}{how}"))
        await client.quit()
    except (TimeoutError, aiosmtplib.SMTPException, OSError, OAuth2Error) as exc:
        steps.append(ProbeStep(current, False, " ".join(str(exc).split()) or type(exc).__name__))
        client.close()
    return steps

"""Sending copies to the upstream with aiosmtplib: TLS, AUTH and a small pool of reused connections.

How to send, not when: retries and scheduling belong to delivery.py.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass, field

import aiosmtplib

from relay.config import UpstreamConfig
from relay.rewrite import OutgoingCopy

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    code: int
    enhanced: str
    text: str

    @classmethod
    def parse(cls, code: int, message: str) -> UpstreamReply:
        text = " ".join(message.split())
        match = _ENHANCED.match(text)
        if match:
            return cls(code, match.group(1), text[match.end() :])
        enhanced = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")
        return cls(code, enhanced, text)

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500


@dataclass(slots=True)
class SendOutcome:
    """What the upstream said about each recipient of one copy."""

    accepted: list[str] = field(default_factory=list)
    refused: dict[str, UpstreamReply] = field(default_factory=dict)


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


class UpstreamPool:
    """At most max_connections open connections to one upstream, reused across messages."""

    def __init__(self, config: UpstreamConfig, password: str | None, local_hostname: str) -> None:
        assert config.host is not None
        self._config = config
        self._host = config.host
        self._password = password
        self._local_hostname = local_hostname
        self._slots = asyncio.Semaphore(config.max_connections)
        self._idle: list[aiosmtplib.SMTP] = []
        self._tls_context = build_tls_context(config) if config.tls != "none" else None

    @property
    def label(self) -> str:
        return f"{self._host}:{self._config.port}"

    async def open_connection(self) -> aiosmtplib.SMTP:
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
        if config.username:
            await client.login(config.username, self._password or "")
        return client

    async def send(self, mail_from: str, copy: OutgoingCopy, smtputf8: bool) -> SendOutcome:
        async with self._slots:
            reused = bool(self._idle)
            client = self._idle.pop() if reused else await self.open_connection()
            try:
                outcome = await self._transaction(client, mail_from, copy, smtputf8)
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                client.close()
                if not reused:
                    raise
                # The upstream closed an idle connection; one fresh attempt is safe.
                client = await self.open_connection()
                outcome = await self._transaction(client, mail_from, copy, smtputf8)
            except BaseException:
                client.close()
                raise
            if client.is_connected:
                self._idle.append(client)
            return outcome

    async def _transaction(
        self, client: aiosmtplib.SMTP, mail_from: str, copy: OutgoingCopy, smtputf8: bool
    ) -> SendOutcome:
        if client.is_ehlo_or_helo_needed:
            await client.ehlo()  # the extension checks below need the EHLO reply
        outcome = SendOutcome()
        needs_utf8 = needs_smtputf8(mail_from, copy, smtputf8)
        if needs_utf8 and not client.supports_extension("smtputf8"):
            # RFC 6531: without SMTPUTF8 at the server, return or reject; downgrading would alter the message.
            reply = UpstreamReply(
                550,
                "5.6.7",
                f"this message has non-ASCII addresses or headers (SMTPUTF8) and {self.label} does not "
                "accept SMTPUTF8; not sent rather than altered. Use ASCII addresses or another upstream",
            )
            outcome.refused = dict.fromkeys(copy.recipients, reply)
            return outcome
        options = ["SMTPUTF8"] if needs_utf8 else []
        if client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        try:
            errors, _ = await client.sendmail(
                mail_from, list(copy.recipients), copy.headers + copy.body, mail_options=options
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            for refusal in exc.recipients:
                outcome.refused[refusal.recipient] = UpstreamReply.parse(refusal.code, refusal.message)
            return outcome
        except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPDataError) as exc:
            reply = UpstreamReply.parse(exc.code, exc.message)
            outcome.refused = dict.fromkeys(copy.recipients, reply)
            return outcome
        for recipient, response in errors.items():
            outcome.refused[recipient] = UpstreamReply.parse(response.code, response.message)
        outcome.accepted = [r for r in copy.recipients if r not in outcome.refused]
        return outcome

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


@dataclass(frozen=True, slots=True)
class ProbeStep:
    step: str
    ok: bool
    detail: str


async def probe_upstream(config: UpstreamConfig, password: str | None, local_hostname: str) -> list[ProbeStep]:
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
            steps.append(ProbeStep(current, True, "TLS started, certificate accepted"))
        if config.username:
            current = "auth"
            await client.login(config.username, password or "")
            steps.append(ProbeStep(current, True, f"logged in as {config.username}"))
        await client.quit()
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        steps.append(ProbeStep(current, False, " ".join(str(exc).split()) or type(exc).__name__))
        client.close()
    return steps

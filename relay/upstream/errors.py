"""The one place that turns aiosmtplib's errors (and TLS, OAuth2 and socket errors) into replies."""

from __future__ import annotations

import asyncio
import ssl

import aiosmtplib

from relay.core.replies import RelayError, Reply
from relay.upstream.oauth import OAuth2Error


class UpstreamFailure(RelayError):
    """Talking to the upstream failed; the reply says what that means for the mail."""

    def __init__(self, reply: Reply, login_refused: bool = False, answered: bool = False) -> None:
        super().__init__(reply.code, reply.enhanced, reply.text)
        # The upstream refused the relay's own login: the relay's problem, not the mail's.
        self.login_refused = login_refused
        # The upstream answered (it refused the mail): it is up, unlike after a failed connection, TLS or login.
        self.answered = answered


class UpstreamLoginRefused(RelayError):
    """The upstream answered the client's own AUTH (passthrough) with a 5xx: for the client, a wrong password."""


class UpstreamLoginUnavailable(RelayError):
    """The client's own login (passthrough) could not be checked now: the upstream is down or answered 4xx."""

    def __init__(self, detail: str) -> None:
        super().__init__(454, "4.7.0", f"Temporary authentication failure, try again later: {detail}")
        self.detail = detail


def upstream_failure(exc: BaseException, where: str) -> UpstreamFailure:
    """What a failure to talk to the destination means for the mail; an exception of no known kind is re-raised."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        reply = Reply(
            exc.code,
            "5.7.8" if exc.code >= 500 else "4.7.0",
            f"{where} refused the relay's login ({' '.join(exc.message.split())}); "
            "check upstream.username and the password",
        )
        return UpstreamFailure(reply, login_refused=True)
    if isinstance(exc, OAuth2Error):
        # Temporary: mail waits (the client retries) while someone signs in again.
        return UpstreamFailure(Reply(454, "4.7.0", f"OAuth2 login to {where} failed: {exc}"))
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 400:
        return UpstreamFailure(Reply.parse(exc.code, f"{where}: {exc.message}"), answered=True)
    if isinstance(exc, ssl.SSLError) or "CERTIFICATE" in str(exc).upper():
        return UpstreamFailure(Reply(451, "4.7.5", f"TLS with {where} failed: {exc}; try again later"))
    if isinstance(exc, aiosmtplib.SMTPException | OSError | asyncio.TimeoutError):
        detail = str(exc) or type(exc).__name__
        return UpstreamFailure(Reply(451, "4.4.1", f"cannot reach {where} ({detail}); try again later"))
    raise exc


def login_failure(exc: BaseException, where: str) -> RelayError:
    """A client's own login at the upstream (passthrough) that failed; an exception of no known kind is re-raised."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        if exc.code >= 500:
            return UpstreamLoginRefused(exc.code, "5.7.8", "the upstream refused the login")
        return UpstreamLoginUnavailable(" ".join(f"{where} answered AUTH with {exc.code} {exc.message}".split()))
    if isinstance(exc, aiosmtplib.SMTPException | OSError | TimeoutError):
        return UpstreamLoginUnavailable(" ".join(f"{where}: {str(exc) or type(exc).__name__}".split()))
    raise exc

"""Delivery status notifications (RFC 3464 multipart/report) for copies that could not be delivered.

Pure: the caller passes the dates, names and failures in and stores the bytes that come out.
"""

from __future__ import annotations

import quopri
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from relay.core.replies import Reply

CRLF = "\r\n"


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    recipient: str
    reply: Reply  # the upstream's reply, or the relay's own reason
    expired: bool = False  # still temporary, but retried until delivery.max_age ran out


@dataclass(frozen=True, slots=True)
class Dsn:
    headers: bytes
    body: bytes


def _status(failure: FailedRecipient) -> str:
    if failure.expired:
        return "4.4.7"  # RFC 3463: delivery time expired
    return failure.reply.enhanced if failure.reply.enhanced[:1] in "45" else "5.0.0"


def build_dsn(
    *,
    sender: str,
    queue_id: str,
    reporting_host: str,
    remote: str,
    arrival_date: str,
    date: str,
    failures: Sequence[FailedRecipient],
    original_headers: bytes,
) -> Dsn:
    """The report for one message: a human part, the machine-readable status, the original headers."""
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{reporting_host}"
    listed = "\n".join(f"  <{f.recipient}>: {f.reply.render()}" for f in failures)
    human = (
        f"This is the mail relay on {reporting_host}.\n\n"
        f"Your message (id {queue_id}) could not be delivered to the following recipient(s).\n"
        "The other recipients, if any, received it. The reason each one failed is given below:\n\n"
        f"{listed}\n\n"
        "The headers of the message that failed are attached.\n"
    )
    human_part = quopri.encodestring(human.replace("\n", CRLF).encode("utf-8")).decode("ascii")
    per_message = f"Reporting-MTA: dns; {reporting_host}{CRLF}X-Queue-ID: {queue_id}{CRLF}Arrival-Date: {arrival_date}"
    per_recipient = [
        CRLF.join(
            (
                f"Final-Recipient: rfc822; {f.recipient}",
                "Action: failed",
                f"Status: {_status(f)}",
                f"Remote-MTA: dns; {remote}",
                f"Diagnostic-Code: smtp; {f.reply.render()}",
                f"Last-Attempt-Date: {date}",
            )
        )
        for f in failures
    ]
    status = (CRLF + CRLF).join((per_message, *per_recipient)) + CRLF
    headers_text = original_headers.rstrip(b"\r\n").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"
    body = (
        (
            f"This is a MIME-encapsulated delivery status notification.{CRLF}{CRLF}"
            f"--{boundary}{CRLF}"
            f"Content-Description: Notification{CRLF}"
            f'Content-Type: text/plain; charset="utf-8"{CRLF}'
            f"Content-Transfer-Encoding: quoted-printable{CRLF}{CRLF}"
            f"{human_part}{CRLF}"
            f"--{boundary}{CRLF}"
            f"Content-Description: Delivery report{CRLF}"
            f"Content-Type: message/delivery-status{CRLF}{CRLF}"
            f"{status}{CRLF}"
            f"--{boundary}{CRLF}"
            f"Content-Description: Undelivered message headers{CRLF}"
            f"Content-Type: text/rfc822-headers{CRLF}{CRLF}"
        ).encode()
        + headers_text
        + f"{CRLF}--{boundary}--{CRLF}".encode("ascii")
    )
    headers = CRLF.join(
        (
            # From is the sender's own address: providers (Microsoft 365, SES) refuse any other From.
            f'From: "Mail Delivery System" <{sender}>',
            f"To: <{sender}>",
            "Subject: Undelivered Mail Returned to Sender",
            f"Date: {date}",
            f"Message-ID: <{queue_id}.dsn.{secrets.token_hex(6)}@{reporting_host}>",
            # RFC 3834: no vacation replies or other automatic answers to a bounce.
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type=delivery-status;{CRLF}\tboundary="{boundary}"',
            "",
            "",
        )
    ).encode("utf-8")
    return Dsn(headers, body)

"""One SMTP mail transaction on an open upstream connection: pipelined commands, a shared wire-form body.

aiosmtplib opens the connection (EHLO, STARTTLS or implicit TLS, AUTH); UpstreamConnection then takes
over its transport. Per copy it writes MAIL, every RCPT and DATA in one go when the upstream offers
PIPELINING (RFC 2920), then the copy's own header bytes and the message body in wire form (CRLF line
endings, leading dots doubled, RFC 5321 4.5.2). The wire form of a body is made once per message and
shared by all its copies: aiosmtplib's sendmail would concatenate, normalise and dot-stuff the whole
message again for every copy.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import aiosmtplib

from relay.core.replies import Reply

_LONE_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")
# Bodies above this size are written in slices, waiting for the socket between them, so the
# transport never buffers a second copy of a large body.
WRITE_SLICE = 256 * 1024
MAX_REPLY_BYTES = 65_536


def _positive(reply: Reply) -> bool:
    return 200 <= reply.code < 400


def wire_form(data: bytes) -> bytes:
    """data as it goes between DATA and the final dot: CRLF line endings, leading dots doubled.

    Returns data itself, not a copy, when it is already in that form (the usual case). A non-empty
    part that does not end in a line ending gets CRLF, as aiosmtplib does for a whole message.
    """
    if not data:
        return data
    crlf = data.count(b"\r\n")
    needs_line_endings = data.count(b"\n") != crlf or data.count(b"\r") != crlf
    if needs_line_endings:
        data = _LONE_LINE_ENDING.sub(b"\r\n", data)
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


@dataclass
class _SharedBody:
    wire: bytes
    users: int = 0


class WireBodies:
    """The wire form of each body being sent, made once and shared while any copy of it is in flight.

    Keyed by the body object's identity (the copies of one message share one bytes object); an entry
    holds the body, so its id cannot be reused while the entry lives. It is dropped once no copy uses
    it, one loop iteration later, so a worker that goes straight on to the next copy finds it still there.
    """

    def __init__(self) -> None:
        self._bodies: dict[int, tuple[bytes, _SharedBody]] = {}

    def acquire(self, body: bytes) -> bytes:
        entry = self._bodies.get(id(body))
        if entry is None or entry[0] is not body:
            entry = (body, _SharedBody(wire_form(body)))
            self._bodies[id(body)] = entry
        entry[1].users += 1
        return entry[1].wire

    def release(self, body: bytes) -> None:
        entry = self._bodies.get(id(body))
        if entry is None or entry[0] is not body:
            return
        entry[1].users -= 1
        if entry[1].users == 0:
            asyncio.get_running_loop().call_soon(self._drop_if_unused, body)

    def _drop_if_unused(self, body: bytes) -> None:
        entry = self._bodies.get(id(body))
        if entry is not None and entry[0] is body and entry[1].users == 0:
            del self._bodies[id(body)]

    def __len__(self) -> int:
        return len(self._bodies)


@dataclass
class TransactionResult:
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, Reply] = field(default_factory=dict)
    # The upstream's reply to the end of DATA when it took the message (its queue id, for a person).
    accepted_reply: Reply | None = None


def _encode_address(address: str, smtputf8: bool) -> bytes:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
        raise ValueError("an envelope address contains a control character")
    try:
        return address.encode("utf-8" if smtputf8 else "ascii")
    except UnicodeEncodeError:
        raise aiosmtplib.SMTPNotSupported(f"{address!r} needs SMTPUTF8") from None


class UpstreamConnection(asyncio.Protocol):
    """A logged-in upstream connection: replies are read in order, however many commands are in flight."""

    def __init__(self, transport: asyncio.Transport, extensions: dict[str, str], timeout: float) -> None:
        self._transport = transport
        self.extensions = extensions
        self._timeout = timeout
        self._buffer = bytearray()
        self._replies: deque[Reply] = deque()
        self._reply_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._lost: Exception | None = None
        # False once the connection must not carry another transaction (closed, 421, a failed reset).
        self.usable = True

    @classmethod
    def take_over(cls, client: aiosmtplib.SMTP, timeout: float) -> UpstreamConnection:
        """Move an aiosmtplib connection (EHLO, TLS, AUTH done, nothing pending) onto this protocol."""
        # uvloop's transports do not subclass asyncio.Transport, so this is a cast, not a check.
        transport = cast(asyncio.Transport | None, client.transport)
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("the upstream closed the connection")
        connection = cls(transport, dict(client.esmtp_extensions), timeout)
        transport.set_protocol(connection)
        return connection

    @property
    def ready(self) -> bool:
        """Usable for a new transaction: open, and nothing arrived unasked (an idle-timeout 421, say)."""
        return self.usable and self._lost is None and not self._replies and not self._buffer

    def supports(self, extension: str) -> bool:
        return extension.lower() in self.extensions

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        while True:
            reply = self._parse_reply()
            if reply is None:
                break
            if reply.code == 421:
                self.usable = False
            self._replies.append(reply)
        if len(self._buffer) > MAX_REPLY_BYTES:
            self._fail(aiosmtplib.SMTPResponseException(-1, "the upstream's reply is too long"))
            self._transport.close()
        self._wake()

    def _parse_reply(self) -> Reply | None:
        lines: list[bytes] = []
        offset = 0
        while True:
            end = self._buffer.find(b"\n", offset)
            if end < 0:
                return None
            line = bytes(self._buffer[offset : end + 1])
            offset = end + 1
            lines.append(line)
            if line[3:4] != b"-":
                break
        try:
            code = int(lines[-1][:3])
        except ValueError:
            code = -1
        del self._buffer[:offset]
        text = b"\n".join(line[4:].strip(b" \t\r\n") for line in lines)
        return Reply.parse(code, text.decode("utf-8", "surrogateescape"))

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("the upstream closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected(f"the upstream connection was lost ({exc or 'closed'})"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.usable = False
        if self._lost is None:
            self._lost = exc
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self._reply_waiter is not None and not self._reply_waiter.done():
            self._reply_waiter.set_result(None)

    # reading and writing

    async def _reply(self) -> Reply:
        while not self._replies:
            if self._lost is not None:
                raise self._lost
            self._reply_waiter = asyncio.get_running_loop().create_future()
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for costs an extra turn of the event loop.
                async with asyncio.timeout(self._timeout):
                    await self._reply_waiter
            except TimeoutError:
                self.usable = False
                raise aiosmtplib.SMTPReadTimeoutError("timed out waiting for the upstream's reply") from None
            finally:
                self._reply_waiter = None
        return self._replies.popleft()

    def _write(self, data: bytes | memoryview) -> None:
        if self._lost is not None:
            raise self._lost
        if self._transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("the upstream connection is closed")
        self._transport.write(data)

    async def _drain(self) -> None:
        while self._paused and self._lost is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._drain_waiter
            except TimeoutError:
                self.usable = False
                raise aiosmtplib.SMTPTimeoutError("timed out sending to the upstream") from None
            finally:
                self._drain_waiter = None
        if self._lost is not None:
            raise self._lost

    async def _command(self, command: bytes) -> Reply:
        self._write(command)
        return await self._reply()

    async def _envelope(self, mail: bytes, rcpts: Sequence[bytes]) -> list[Reply]:
        """Replies to MAIL, each RCPT and DATA: all written at once if the upstream offers PIPELINING.

        Without it, commands go one at a time: no RCPT after a refused MAIL, no DATA without a recipient.
        """
        commands = [mail, *rcpts, b"DATA\r\n"]
        if self.supports("pipelining"):
            self._write(b"".join(commands))
            return [await self._reply() for _ in commands]
        replies = [await self._command(mail)]
        if not _positive(replies[0]):
            return replies
        replies.extend([await self._command(rcpt) for rcpt in rcpts])
        if any(_positive(reply) for reply in replies[1:]):
            replies.append(await self._command(b"DATA\r\n"))
        return replies

    async def _send_content(self, headers: bytes, body: bytes) -> None:
        if len(body) <= WRITE_SLICE:
            self._write(headers + body + b".\r\n")
            return
        self._write(headers)
        view = memoryview(body)
        for start in range(0, len(body), WRITE_SLICE):
            await self._drain()
            self._write(view[start : start + WRITE_SLICE])
        self._write(b".\r\n")
        await self._drain()

    async def reset(self) -> None:
        """RSET after a failed transaction; a connection that cannot reset is not used again."""
        try:
            if not _positive(await self._command(b"RSET\r\n")):
                self.usable = False
        except (aiosmtplib.SMTPException, OSError):
            self.usable = False

    async def transaction(
        self,
        mail_from: str,
        recipients: Sequence[str],
        wire_headers: bytes,
        wire_body: bytes,
        smtputf8: bool,
    ) -> TransactionResult:
        """One mail transaction; every recipient ends up accepted or refused with the reply that refused it.

        smtputf8: send MAIL with SMTPUTF8 (the caller has checked that the upstream offers it).
        """
        options = []
        if self.supports("size"):
            options.append(f"SIZE={len(wire_headers) + len(wire_body)}".encode())
        if smtputf8:
            options.append(b"SMTPUTF8")
        if self.supports("8bitmime"):
            options.append(b"BODY=8BITMIME")
        mail = b" ".join([b"MAIL FROM:<" + _encode_address(mail_from, smtputf8) + b">", *options]) + b"\r\n"
        rcpts = [b"RCPT TO:<" + _encode_address(r, smtputf8) + b">\r\n" for r in recipients]
        replies = await self._envelope(mail, rcpts)

        result = TransactionResult()
        mail_reply = replies[0]
        if not _positive(mail_reply):
            result.refused = dict.fromkeys(recipients, mail_reply)
        else:
            for recipient, reply in zip(recipients, replies[1:], strict=False):
                if _positive(reply):
                    result.accepted.append(recipient)
                else:
                    result.refused[recipient] = reply
        data_reply = replies[-1] if len(replies) == len(recipients) + 2 else None
        if data_reply is not None and data_reply.code == 354 and not result.accepted:
            # The upstream took DATA with no recipient accepted (RFC 2920 3.1 says it must not):
            # end the empty transaction rather than send the message to nobody.
            await self._command(b".\r\n")
            data_reply = None
        if data_reply is None or not result.accepted:
            await self.reset()
            return result
        if data_reply.code != 354:
            result.refused.update(dict.fromkeys(result.accepted, data_reply))
            result.accepted = []
            await self.reset()
            return result
        await self._send_content(wire_headers, wire_body)
        final = await self._reply()
        if not _positive(final):
            result.refused.update(dict.fromkeys(result.accepted, final))
            result.accepted = []
        else:
            result.accepted_reply = final
        return result

    async def quit(self) -> None:
        try:
            if self._lost is None and not self._transport.is_closing():
                await self._command(b"QUIT\r\n")
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.usable = False
        if not self._transport.is_closing():
            self._transport.close()

"""Reading a DATA section from the client in blocks, for the listener.

aiosmtpd reads DATA one line at a time and keeps every line as its own bytearray until the end: one
await per line, and about 1.7 times the message in memory before it is joined (RFC 5321 4.5.2 and
4.5.3.1.6 rules are the same here). This reads blocks of up to the stream limit into one buffer,
never consuming a byte past the terminating "<CRLF>.<CRLF>", so pipelined commands after it stay
in the stream for aiosmtpd.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

TERMINATOR = b"\r\n.\r\n"
_STUFFED_DOT = re.compile(rb"(?:\A|(?<=\r\n))\.")


@dataclass(frozen=True, slots=True)
class DataSection:
    content: bytes  # dots unstuffed, ending in the last line's CRLF; empty for an empty message
    too_big: bool = False
    line_too_long: bool = False


def _partial_terminator(buffer: bytearray) -> int:
    """Length of the longest end of buffer that is the start of TERMINATOR (0 to 4)."""
    for length in range(len(TERMINATOR) - 1, 0, -1):
        if buffer.endswith(TERMINATOR[:length]):
            return length
    return 0


def _has_long_line(content: bytes, limit: int) -> bool:
    """True if a line, with its CRLF, is longer than limit (as aiosmtpd counts it)."""
    if len(content) <= limit:
        return False
    start = 0
    while (end := content.find(b"\r\n", start)) >= 0:
        if end + 2 - start > limit:
            return True
        start = end + 2
    return len(content) - start > limit


async def read_data(reader: asyncio.StreamReader, size_limit: int | None, line_limit: int) -> DataSection:
    """The content after a 354 reply, up to and including the terminator; raises IncompleteReadError on EOF.

    A message over size_limit is read to its end and discarded (the client is told after the terminator,
    as RFC 5321 4.2.5 implies), so the buffer never holds more than size_limit bytes.
    """
    # The DATA command's own CRLF: the content starts at a line start, so ".<CRLF>" first is an empty message.
    buffer = bytearray(b"\r\n")
    received = 0
    too_big = False
    while not buffer.endswith(TERMINATOR):
        partial = _partial_terminator(buffer)
        if partial:
            # The terminator may straddle what was read and what was not: read only what would complete it.
            block = await reader.readexactly(len(TERMINATOR) - partial)
        else:
            try:
                block = await reader.readuntil(TERMINATOR)
            except asyncio.LimitOverrunError as overrun:
                block = await reader.readexactly(overrun.consumed)
        received += len(block)
        if size_limit and received > size_limit + len(TERMINATOR):
            too_big = True
            # Keep the last bytes only: enough to recognise the terminator.
            del buffer[: -len(TERMINATOR)]
        buffer += block
    # aiosmtpd's count: every line before the lone dot, as sent (dots still stuffed).
    if too_big or (size_limit and received - len(b".\r\n") > size_limit):
        return DataSection(b"", too_big=True)
    content = bytes(memoryview(buffer)[2 : len(buffer) - 3])
    del buffer
    if content.startswith(b".") or b"\r\n." in content:
        content = _STUFFED_DOT.sub(b"", content)
    if _has_long_line(content, line_limit):
        return DataSection(b"", line_too_long=True)
    return DataSection(content)

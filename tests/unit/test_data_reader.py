"""read_data: the DATA section read in blocks must equal aiosmtpd's line-by-line reading, byte for byte."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.data_reader import read_data

PIECES = st.sampled_from([b".", b"\r", b"\n", b"a", b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r"])


def line_by_line(stream: bytes) -> tuple[bytes, bytes]:
    """aiosmtpd's reading: CRLF lines until a lone dot, a leading dot removed; and what follows."""
    position, lines = 0, []
    while True:
        end = stream.index(b"\r\n", position) + 2
        line, position = stream[position:end], end
        if line == b".\r\n":
            return b"".join(lines), stream[position:]
        lines.append(line[1:] if line.startswith(b".") else line)


async def read_in_blocks(stream: bytes, cuts: list[int], limit: int, **options: int | None):
    reader = asyncio.StreamReader(limit=limit)
    task = asyncio.create_task(read_data(reader, options.get("size_limit"), options.get("line_limit") or 1 << 20))
    start = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        reader.feed_data(stream[start:cut])
        start = max(start, cut)
        await asyncio.sleep(0)
    # A reader that missed the terminator would wait for more data for ever.
    section = await asyncio.wait_for(task, 5)
    reader.feed_eof()
    return section, await reader.read()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(PIECES, max_size=40).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    st.integers(min_value=5, max_value=24),
)
def test_blocks_give_the_same_content_and_leave_what_follows(noise: bytes, cuts: list[int], limit: int) -> None:
    stream = noise + b"\r\n.\r\nQUIT\r\n"
    expected_content, expected_rest = line_by_line(b"\r\n" + stream)
    # line_by_line saw the DATA line's CRLF as an empty first line: drop it.
    expected_content = expected_content[2:]
    section, rest = asyncio.run(read_in_blocks(stream, cuts, limit))
    assert (section.content, rest) == (expected_content, expected_rest)
    assert not section.too_big and not section.line_too_long


def test_an_empty_message_is_empty() -> None:
    section, rest = asyncio.run(read_in_blocks(b".\r\nMAIL FROM:<a@b.test>\r\n", [1, 2], 16))
    assert (section.content, rest) == (b"", b"MAIL FROM:<a@b.test>\r\n")


@pytest.mark.parametrize(("spare", "too_big"), [(0, False), (-1, True)])
def test_the_size_limit_counts_the_lines_as_sent(spare: int, too_big: bool) -> None:
    lines = b"..stuffed\r\n" + b"x" * 98 + b"\r\n"
    stream = lines * 10 + b".\r\nQUIT\r\n"
    section, rest = asyncio.run(read_in_blocks(stream, [300, 700], 64, size_limit=len(lines) * 10 + spare))
    assert section.too_big is too_big
    assert section.content == (b"" if too_big else lines.replace(b"..", b".") * 10)
    assert rest == b"QUIT\r\n"


@pytest.mark.parametrize(("length", "too_long"), [(98, False), (99, True)])
def test_a_line_longer_than_the_limit_is_refused(length: int, too_long: bool) -> None:
    stream = b"short\r\n" + b"z" * length + b"\r\n" + b"w" * 50 + b"\r\n.\r\n"
    section, rest = asyncio.run(read_in_blocks(stream, [50], 32, line_limit=100))
    assert section.line_too_long is too_long
    assert rest == b""

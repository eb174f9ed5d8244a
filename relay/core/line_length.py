"""Lines over 998 octets (RFC 5321 4.5.3.1.6): made to fit once per message, or refused before 250.

Strict receivers refuse a whole message for one such line. Postfix breaks them on output
(smtp_line_length_limit), which changes the text; here the text is kept exactly: a header line is folded
at whitespace (its unfolded value is the same), a text or other leaf part written as 7bit or 8bit is
re-encoded as quoted-printable, and base64 is re-wrapped at 76 columns (their decoded content is the
same), and a DKIM signature over the old bytes is dropped. What cannot be changed without breaking it
(a signed part, binary content) is refused.

Pure: no I/O. Input has CRLF line endings only (parse_message makes them so).
"""

from __future__ import annotations

import quopri
import re
from dataclasses import replace

from relay.core.content import MAX_DEPTH, body_parts, content_type_of, first_value, part_headers
from relay.core.message import CRLF, HeaderField, ParsedMessage, parse_message, serialize
from relay.core.replies import RelayError
from relay.core.rewrite import SIGNATURE_FIELDS

MAX_LINE_OCTETS = 998  # RFC 5321 4.5.3.1.6: 1,000 with the CRLF
BASE64_LINE = 76  # RFC 2045 6.8
# A signature covers the part's bytes as they are; an encrypted part cannot be read.
UNCHANGEABLE_MULTIPARTS = frozenset({"multipart/signed", "multipart/encrypted"})
_WHITESPACE = b" \t"
_BARE_LF = re.compile(rb"(?<!\r)\n")


def longest_line(data: bytes) -> int:
    """The length of the longest line of data, without its CRLF."""
    if len(data) <= MAX_LINE_OCTETS:
        return len(data)
    return max(map(len, data.split(CRLF)))


def _too_long(where: str) -> RelayError:
    return RelayError(
        554,
        "5.6.0",
        f"Not sent: {where} has a line longer than 998 octets, which SMTP does not allow (RFC 5321 4.5.3.1.6), "
        "and this relay cannot shorten it without changing the message; shorten that line and send it again",
    )


def _earliest_fold(line: bytes) -> int:
    """Where a fold may first go: past the field name and colon, or past a continuation's first word
    (a line of only whitespace is not allowed)."""
    if line[:1] in (b" ", b"\t"):
        return len(line) - len(line.lstrip(_WHITESPACE)) + 1
    return line.find(b":") + 1


def _folded_line(line: bytes, field_name: bytes) -> list[bytes]:
    """One header line as lines of at most MAX_LINE_OCTETS, each break put before a space or tab."""
    earliest = _earliest_fold(line)
    pieces = []
    while len(line) > MAX_LINE_OCTETS:
        cut = max(line.rfind(b" ", earliest, MAX_LINE_OCTETS + 1), line.rfind(b"\t", earliest, MAX_LINE_OCTETS + 1))
        if cut < earliest or not line[:cut].strip(_WHITESPACE):
            raise _too_long(f"the header field {field_name[:40].decode('ascii', 'replace')}")
        pieces.append(line[:cut])
        line = line[cut:]
        earliest = _earliest_fold(line)
    pieces.append(line)
    return pieces


def fold_long_header_lines(headers: bytes) -> bytes:
    """A header section with every line over MAX_LINE_OCTETS folded at whitespace (headers itself if none is)."""
    if longest_line(headers) <= MAX_LINE_OCTETS:
        return headers
    lines = []
    field_name = b""
    for line in headers.split(CRLF):
        if line[:1] not in (b" ", b"\t"):
            field_name = line.partition(b":")[0]
        lines += _folded_line(line, field_name) if len(line) > MAX_LINE_OCTETS else [line]
    return CRLF.join(lines)


def _fold_fields(fields: tuple[HeaderField, ...]) -> tuple[HeaderField, ...]:
    """fields with long lines folded; the same tuple when none has one."""
    if all(longest_line(field.raw) <= MAX_LINE_OCTETS for field in fields):
        return fields
    return tuple(replace(field, raw=fold_long_header_lines(field.raw)) for field in fields)


def _with_quoted_printable(fields: tuple[HeaderField, ...], is_message: bool) -> tuple[HeaderField, ...]:
    encoding = HeaderField("Content-Transfer-Encoding", b"Content-Transfer-Encoding: quoted-printable\r\n")
    kept = tuple(f for f in fields if f.key != "content-transfer-encoding")
    # A message (not a body part) without MIME-Version has no Content-Transfer-Encoding to its readers.
    if is_message and not any(f.key == "mime-version" for f in fields):
        kept += (HeaderField("MIME-Version", b"MIME-Version: 1.0\r\n"),)
    return (*kept, encoding)


def _quoted_printable(content: bytes) -> bytes:
    encoded = quopri.encodestring(content)
    # The encoder breaks lines with LF when the text it is given has no line end of its own.
    return encoded if encoded.count(b"\n") == encoded.count(CRLF) else _BARE_LF.sub(CRLF, encoded)


def _rewrapped_base64(content: bytes) -> bytes:
    letters = b"".join(content.split())
    lines = [letters[start : start + BASE64_LINE] for start in range(0, len(letters), BASE64_LINE)]
    return CRLF.join(lines) + (CRLF if content.endswith(CRLF) else b"")


def _fitted_multipart(body: bytes, boundary: bytes, depth: int) -> bytes:
    """body with each part that has a long line replaced by its fitted form; delimiters as they were."""
    pieces = []
    position = 0
    for start, end in body_parts(body, 0, len(body), boundary):
        fields, content_start = part_headers(body, start, end)
        content = body[content_start:end]
        new_fields, new_content = _fitted(fields, content, depth + 1, is_message=False)
        if new_fields is fields and new_content is content:
            continue
        # Part headers as they came unless they changed: parse_message may not keep every byte of odd ones.
        headers = body[start:content_start] if new_fields is fields else serialize([f.raw for f in new_fields])
        pieces += [body[position:start], headers, new_content]
        position = end
    return b"".join([*pieces, body[position:]]) if pieces else body


def _fitted(
    fields: tuple[HeaderField, ...], content: bytes, depth: int, is_message: bool
) -> tuple[tuple[HeaderField, ...], bytes]:
    """An entity's fields and content with no line over MAX_LINE_OCTETS where that keeps its meaning;
    the same objects when nothing needed to change."""
    fields = _fold_fields(fields)
    if longest_line(content) <= MAX_LINE_OCTETS or depth > MAX_DEPTH:
        return fields, content
    content_type = content_type_of(fields)
    mime_type = content_type.mime_type
    encoding = first_value(fields, "content-transfer-encoding").lower() or "7bit"
    if mime_type.startswith("multipart/"):
        boundary = content_type.parameters.get("boundary")
        if mime_type in UNCHANGEABLE_MULTIPARTS or not boundary:
            return fields, content
        return fields, _fitted_multipart(content, boundary.encode("utf-8", "surrogateescape"), depth)
    if mime_type == "message/rfc822":
        # RFC 2046 5.2.1: the enclosed message cannot be encoded, but its own parts can.
        inner = parse_message(content)
        inner_fields, inner_body = _fitted(inner.fields, inner.body, depth + 1, is_message=True)
        return fields, serialize([f.raw for f in inner_fields]) + inner_body
    if mime_type.startswith("message/"):
        return fields, content
    if encoding == "base64":
        return fields, _rewrapped_base64(content)
    if encoding in ("7bit", "8bit"):
        return _with_quoted_printable(fields, is_message), _quoted_printable(content)
    return fields, content  # binary, or quoted-printable that was written with long lines: left as it is


def fit_line_length(message: ParsedMessage) -> ParsedMessage:
    """The message with no line over MAX_LINE_OCTETS, its text kept; raises RelayError (554) if that cannot be."""
    fields, body = _fold_fields(message.fields), message.body
    if longest_line(body) > MAX_LINE_OCTETS:
        fields, body = _fitted(fields, body, 0, is_message=True)
        if longest_line(body) > MAX_LINE_OCTETS:
            raise _too_long("a part of the message body (a signed, binary or otherwise unchangeable part)")
    if fields is message.fields and body is message.body:
        return message
    # A signature over the bytes changed here would fail at the receiver; the provider signs anew.
    unsigned = tuple(field for field in fields if field.key not in SIGNATURE_FIELDS)
    return replace(message, fields=unsigned, body=body)

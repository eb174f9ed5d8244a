"""Splitting a message's bytes into header fields and a body, keeping every byte as it came but line endings.

Pure: no I/O. The body is sliced out once and shared by every outgoing copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.core.replies import RelayError

MAX_HEADER_BYTES = 1_048_576
CRLF = b"\r\n"
# RFC 5322 field-name: printable US-ASCII except colon.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_BARE_CR = re.compile(rb"\r(?!\n)")
# A line ends at LF; CRs just before it belong to the ending (CR CR LF is one line end, as Postfix reads it).
_LINE_END = re.compile(rb"\r*\n")
# A field naming recipients, found below a line that ended the header section early.
_ADDRESS_FIELD_LINE = re.compile(
    rb"^(?:to|cc|bcc|resent-to|resent-cc|resent-bcc|reply-to|mail-followup-to)[ \t]*:", re.IGNORECASE | re.MULTILINE
)
_PARAGRAPH_END = re.compile(rb"\r\n\r\n")


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field exactly as received: name, colon, value and folded lines with their endings."""

    name: str
    raw: bytes

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def value(self) -> str:
        """The unfolded value, decoded as UTF-8 with undecodable bytes kept as surrogates."""
        raw_value = self.raw.split(b":", 1)[1]
        unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", raw_value).rstrip(b"\r\n")
        return unfolded.decode("utf-8", errors="surrogateescape").strip()


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    fields: tuple[HeaderField, ...]
    body: bytes
    # True when the header section ended at a line that is not a header field instead of at a
    # blank line; the blank line is put back when the message is written out.
    missing_blank_line: bool = False

    def get_all(self, name: str) -> list[HeaderField]:
        key = name.lower()
        return [f for f in self.fields if f.key == key]

    def first_value(self, name: str) -> str | None:
        found = self.get_all(name)
        return found[0].value if found else None


def _malformed(text: str) -> RelayError:
    return RelayError(550, "5.6.0", text)


def _crlf_line_ends(data: bytes) -> bytes:
    """data with every LF, and the CRs just before it, as one CRLF (data itself if it has no other ending)."""
    crlf = data.count(CRLF)
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        return data
    return _LINE_END.sub(CRLF, data)


def parse_message(data: bytes, max_header_bytes: int = MAX_HEADER_BYTES) -> ParsedMessage:
    """Split data into header fields and body, every line ending as CRLF. Refuses, as a RelayError, what
    cannot be parsed safely.

    Line endings are read as the sender meant them: LF, CRLF and CR CR LF each end one line (a header field
    never becomes body text because of a doubled CR). A CR that ends no line is refused in the header
    section, where it could hide a line end from one reader and not another; in the body it becomes CRLF:
    a bare <LF>.<LF> or <CR>.<CR> left in a copy could end DATA at a laxer upstream and smuggle a second
    message, so the relay checks and sends the same lines any upstream will see.
    """
    data = _crlf_line_ends(data)
    first_newline = data.find(b"\n")
    fields: list[HeaderField] = []
    current_name: str | None = None
    current_start = 0
    position = 0
    body_start = len(data)
    missing_blank_line = False
    # An mbox "From " separator line some scripts leave at the top carries no header.
    if data.startswith(b"From "):
        position = first_newline + 1 if first_newline >= 0 else len(data)
        current_start = position

    last_field_end = len(data)
    while position < len(data):
        newline = data.find(b"\n", position)
        line_end = len(data) if newline < 0 else newline + 1
        line = data[position:line_end]
        if line_end > max_header_bytes:
            raise RelayError(
                552,
                "5.3.4",
                f"the header section is larger than {max_header_bytes} bytes; "
                "this relay refuses it rather than risk missing an address in it",
            )
        if line == CRLF:
            last_field_end, body_start = position, line_end
            break
        if b"\x00" in line:
            raise _malformed(f"header line {len(fields) + 1} contains a NUL byte; fix the sending program")
        if _BARE_CR.search(line.removesuffix(CRLF)):
            raise _malformed(
                f"header line {len(fields) + 1} contains a bare carriage return (a CR that does not end "
                "the line), so where the line ends is unclear; fix the sending program"
            )
        if line[:1] in (b" ", b"\t"):
            if current_name is None:
                raise _malformed("the message starts with a folded line instead of a header field")
            position = line_end
            continue
        colon = line.find(b":")
        name = line[:colon].rstrip(b" \t") if colon > 0 else b""
        if not _FIELD_NAME.fullmatch(name):
            # Like Postfix: the first line that is not a header field starts the body. But recipient
            # fields below it would be read as headers by some mail programs and hidden from us.
            paragraph_end = _PARAGRAPH_END.search(data, position, max_header_bytes)
            stop = paragraph_end.start() if paragraph_end else min(len(data), max_header_bytes)
            if _ADDRESS_FIELD_LINE.search(data, position, stop):
                raise _malformed(
                    "a line in the header section is not a header field (it has no colon) and "
                    "recipient fields follow it; fix the sending program"
                )
            last_field_end = body_start = position
            missing_blank_line = True
            break
        if current_name is not None:
            fields.append(HeaderField(current_name, data[current_start:position]))
        current_name = name.decode("ascii")
        current_start = position
        position = line_end

    if current_name is not None:
        raw = data[current_start:last_field_end]
        if not raw.endswith(b"\n"):
            raw += CRLF
        fields.append(HeaderField(current_name, raw))
    body = data[body_start:]
    if b"\r" in body and body.count(b"\r") != body.count(CRLF):
        body = _BARE_CR.sub(CRLF, body)
    return ParsedMessage(
        fields=tuple(fields),
        body=body,
        missing_blank_line=missing_blank_line,
    )


def serialize(fields: list[bytes] | tuple[bytes, ...]) -> bytes:
    """The header section of an outgoing copy, ending in the blank line before the body."""
    return b"".join(fields) + CRLF

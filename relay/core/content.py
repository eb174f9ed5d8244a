"""Leaks inside the body that no header rewrite can fix: calendar invitations and Outlook's winmail.dat.

Walks the MIME structure by byte offsets into the one body object (nothing is re-encoded or copied
except the headers of each part and the text of calendar parts). Pure: no I/O.
"""

from __future__ import annotations

import binascii
import quopri
import re
from dataclasses import dataclass

from relay.core.addresses import mentioned_addresses
from relay.core.message import HeaderField, ParsedMessage, parse_message
from relay.core.replies import RelayError

# Mail programs nest two or three levels; deeper structures are not looked into.
MAX_DEPTH = 10
MAX_PARTS = 1000
# Content-Type values are short; a longer one is cut before its parameters are read.
MAX_CONTENT_TYPE = 8192
CALENDAR_TYPES = frozenset({"text/calendar", "application/ics"})
TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})
_PARAMETER = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_FOLDED = re.compile(rb"\r?\n[ \t]")
_ATTENDEE_LINE = re.compile(rb"^ATTENDEE[;:].*$", re.IGNORECASE | re.MULTILINE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True, slots=True)
class ContentFindings:
    """What the body shows: addresses in calendar ATTENDEE lines, and whether Outlook TNEF is attached."""

    calendar_attendees: frozenset[str] = frozenset()
    has_tnef: bool = False


@dataclass(frozen=True, slots=True)
class ContentType:
    mime_type: str
    parameters: dict[str, str]


def _parameters(value: str) -> dict[str, str]:
    parameters = {}
    for match in _PARAMETER.finditer(";" + value[:MAX_CONTENT_TYPE].partition(";")[2]):
        raw = match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) > 1:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        parameters[match.group(1).lower()] = raw
    return parameters


def first_value(fields: tuple[HeaderField, ...], key: str, default: str = "") -> str:
    return next((f.value for f in fields if f.key == key), default)


def content_type_of(fields: tuple[HeaderField, ...]) -> ContentType:
    value = first_value(fields, "content-type", "text/plain")
    return ContentType(value.partition(";")[0].strip().lower(), _parameters(value))


def _file_names(fields: tuple[HeaderField, ...], content_type: ContentType) -> list[str]:
    """The part's file names, from Content-Type name and Content-Disposition filename (RFC 2231 forms too)."""
    disposition = _parameters(first_value(fields, "content-disposition"))
    candidates = [*content_type.parameters.items(), *disposition.items()]
    return [value.lower() for key, value in candidates if key.rstrip("*") in ("name", "filename")]


def _decoded(data: bytes, fields: tuple[HeaderField, ...]) -> bytes:
    encoding = first_value(fields, "content-transfer-encoding").lower()
    try:
        if encoding == "base64":
            return binascii.a2b_base64(data)
        if encoding == "quoted-printable":
            return quopri.decodestring(data)
    except (binascii.Error, ValueError):
        return data
    return data


def _attendees(calendar: bytes) -> set[str]:
    """Addresses in the ATTENDEE lines of an iCalendar object (RFC 5545 3.8.4.1), lines unfolded."""
    unfolded = _FOLDED.sub(b"", calendar)
    found: set[str] = set()
    for line in _ATTENDEE_LINE.finditer(unfolded):
        found |= mentioned_addresses(line.group(0).decode("utf-8", errors="replace"))
    return found


def body_parts(body: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """(start, end) of each body part between the delimiter lines of a multipart (RFC 2046 5.1.1)."""
    delimiter = b"--" + boundary
    spans: list[tuple[int, int]] = []
    part_start: int | None = None
    position = start
    while position < end and len(spans) < MAX_PARTS:
        found = body.find(delimiter, position, end)
        if found < 0:
            break
        at_line_start = found == start or body[found - 1 : found] == b"\n"
        line_end = body.find(b"\n", found, end)
        line_end = end if line_end < 0 else line_end + 1
        if at_line_start:
            if part_start is not None:
                content_end = found - 1
                if content_end > part_start and body[content_end - 1 : content_end] == b"\r":
                    content_end -= 1
                spans.append((part_start, max(part_start, content_end)))
            if body[found + len(delimiter) : found + len(delimiter) + 2] == b"--":
                return spans
            part_start = line_end
        position = line_end
    if part_start is not None and len(spans) < MAX_PARTS:
        spans.append((part_start, end))  # no closing delimiter: the last part runs to the end
    return spans


@dataclass(slots=True)
class _Found:
    attendees: set[str]
    tnef: bool = False


def part_headers(body: bytes, start: int, end: int) -> tuple[tuple[HeaderField, ...], int]:
    """A body part's header fields and where its content starts."""
    if body.startswith((b"\r\n", b"\n"), start, end):
        return (), body.find(b"\n", start, end) + 1
    header_end = _HEADER_END.search(body, start, end)
    content_start = header_end.end() if header_end else end
    try:
        return parse_message(body[start:content_start]).fields, content_start
    except RelayError:
        return (), content_start  # unreadable part headers: treated as a plain text part


def _scan(body: bytes, start: int, end: int, fields: tuple[HeaderField, ...], depth: int, found: _Found) -> None:
    content_type = content_type_of(fields)
    names = _file_names(fields, content_type)
    if content_type.mime_type in TNEF_TYPES or any(name.endswith("winmail.dat") for name in names):
        found.tnef = True
    elif content_type.mime_type in CALENDAR_TYPES or any(name.endswith((".ics", ".vcs")) for name in names):
        found.attendees |= _attendees(_decoded(body[start:end], fields))
    elif content_type.mime_type.startswith("multipart/") and depth < MAX_DEPTH:
        boundary = content_type.parameters.get("boundary")
        if not boundary:
            return
        for part_start, part_end in body_parts(body, start, end, boundary.encode("utf-8", "surrogateescape")):
            part_fields, content_start = part_headers(body, part_start, part_end)
            _scan(body, content_start, part_end, part_fields, depth + 1, found)


def scan_content(message: ParsedMessage) -> ContentFindings:
    """Calendar attendees and TNEF attachments anywhere in the message's MIME structure."""
    found = _Found(set())
    _scan(message.body, 0, len(message.body), message.fields, 0, found)
    return ContentFindings(frozenset(found.attendees), found.tnef)

"""The last check before a copy leaves: does its final header section name a hidden address?

Deliberately independent of message.py and rewrite.py: it splits the header bytes itself, decodes
encoded words itself and looks at every spelling of an address (raw, decoded, unquoted, without
comments, percent-decoded, punycode or Unicode domain, any case). A bug in the rewrite is caught here.
Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from dataclasses import dataclass
from urllib.parse import unquote

from relay.addresses import ascii_domain_form, normalize_address

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_COMMENT = re.compile(r"\([^()]*\)")
_AROUND_AT = re.compile(r"\s*@\s*")
# Anything that could be an address: no whitespace, brackets, separators or quotes around the @.
_CANDIDATE = re.compile(r"[^\s<>()\[\],;:\"'@=?/&|]+@[^\s<>()\[\],;:\"'@=?/&|]+")
# Local parts the candidate pattern cannot capture (quoted strings with odd characters).
_PLAIN_LOCAL = re.compile(r"[^\s<>()\[\],;:\"'@=?/&|\\]+")


@dataclass(frozen=True, slots=True)
class Leak:
    field: str
    address: str  # the normalised address that leaked


def _fields(header_bytes: bytes) -> list[tuple[str, str]]:
    """(name, unfolded text) of each field; a line that is not a field is reported as its own."""
    text = header_bytes.decode("utf-8", errors="surrogateescape")
    fields: list[tuple[str, str]] = []
    for line in re.split(r"\r?\n|\r", text):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip())
        elif line:
            name, colon, value = line.partition(":")
            fields.append((name.strip() if colon else "(not a header field)", value if colon else line))
    return fields


def _decode_word(charset: str, encoding: str, payload: str) -> str:
    data: bytes
    try:
        if encoding in "bB":
            data = base64.b64decode(payload + "=" * (-len(payload) % 4))
        else:
            data = quopri.decodestring(payload.replace("_", " ").encode("ascii", "replace"), header=True)
    except (binascii.Error, ValueError):
        return payload
    charset = charset.split("*", 1)[0]
    try:
        return data.decode(charset, errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


def _decode_encoded_words(text: str) -> str:
    # Adjacent encoded words are one run of text (RFC 2047 6.2): drop whitespace between them.
    joined = re.sub(r"(\?=)\s+(=\?)", r"\1\2", text)
    return _ENCODED_WORD.sub(lambda m: _decode_word(m.group(1), m.group(2), m.group(3)), joined)


def _spellings(value: str) -> set[str]:
    """The value as written and in every decoded or simplified form an address could hide in."""
    base = {value}
    if "=?" in value:
        base.add(_decode_encoded_words(value))
    if "%" in value:
        base |= {unquote(v, errors="replace") for v in base}
    forms: set[str] = set()
    for text in base:
        text = text.lower()
        unquoted = text.replace('"', "").replace("\\", "")
        without_comments = unquoted
        while "(" in without_comments and _COMMENT.search(without_comments):
            without_comments = _COMMENT.sub(" ", without_comments)  # comments nest
        forms |= {text, unquoted, without_comments, _AROUND_AT.sub("@", without_comments)}
    return forms


def _candidates(form: str) -> set[str]:
    found = set()
    for match in _CANDIDATE.finditer(form):
        candidate = match.group(0).strip(".")
        found.add(normalize_address(candidate))
    return found


def find_leak(header_bytes: bytes, hidden: frozenset[str]) -> Leak | None:
    """The first hidden address found in the header bytes, with the field it is in, or None."""
    if not hidden:
        return None
    unusual = {
        key: {key, ascii_domain_form(key)} for key in hidden if not _PLAIN_LOCAL.fullmatch(key.rpartition("@")[0])
    }
    for name, value in _fields(header_bytes):
        for form in _spellings(value):
            leaked = _candidates(form) & hidden
            if leaked:
                return Leak(name, min(leaked))
            for key, spellings in unusual.items():
                if any(s in form for s in spellings):
                    return Leak(name, key)
    return None

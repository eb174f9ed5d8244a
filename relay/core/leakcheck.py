"""The last check before a copy leaves: does its final header section name a hidden address?

Deliberately independent of message.py, addresses' parser and rewrite.py: it splits the header bytes
itself, decodes encoded words itself and reads every field twice.

1. As address grammar would: the text on both sides of every "@" in every spelling of each value (raw,
   RFC 2047-decoded, percent-decoded, with and without comments, quotes and backslashes, any case,
   domains in Unicode or punycode).
2. As a person reads it: the whole line, field name included, in those spellings (and NFKC, so
   full-width letters count), searched for each protected address as plain text. An occurrence counts
   unless a local-part character is glued to its left (joann@x is not ann@x) or its domain visibly goes
   on (ann@x.example.org, ann@x.examples).

The start of the body is read the same way when it looks like header fields: a parser that took a
header section for body text is caught here. A bug in the rewrite is caught here. Linear in the size of
the header section. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import functools
import quopri
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import quote
from urllib.parse import unquote

from relay.core.addresses import ascii_domain_form, normalize_domain

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_ENCODED_WORDS = re.compile(r"(\?=)\s+(=\?)")
_PARENTHESIS = re.compile(r"[()\\]")
_AROUND_AT = re.compile(r"\s*@\s*")
# RFC 5322's obsolete syntax also allows space around dots: `ann . smith @ one . example`.
_AROUND_DOT = re.compile(r"\s*\.\s*")
# A domain as a mail program might read it: IDNA label separators included, or a domain literal.
_DOMAIN = re.compile(r"\[[^\]]{0,300}\]|[\w.\-\u3002\uff0e\uff61]+")
# Characters that continue a local part: a hidden local part preceded by one of these is another address.
_LOCAL_CONTINUES = frozenset(".!#$%&*+^_`{|}~-")
# The person's reading: RFC 5322 atext and the dot. Glued to the left of a match, it makes another address.
_LOCAL_PART_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~.-")
# An "@" and the characters after it that a domain can be made of; a domain is a prefix of the run.
_AT_AND_DOMAIN_RUN = re.compile(r"@([\w.\-]+)")
# Inside such a run a domain can end only before one of these (before a letter or digit it goes on).
_DOMAIN_BREAK = re.compile(r"[-_.]")
# What makes a person read a longer domain after a match: a letter or digit glued on (ann@x.examples),
# or more labels (ann@x.example.org, ann@x.example-mail.org). A dash, slash or colon ends it:
# ann@x.example--b and ann@x.example-Note: read as ann@x.example followed by something else.
_DOMAIN_GOES_ON = re.compile(r"[^\W_]|(?:-[^\W_]+)+[.][^\W_]|[.][^\W_]")
_IDEOGRAPHIC_DOTS = str.maketrans(dict.fromkeys("\u3002\uff0e\uff61", "."))
# Body lines that look like a header field, read by the person's reading when the body starts with them.
_BODY_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_BODY_LINE = re.compile(rb"[^\r\n]*(?:\r*\n|\r+|\Z)")
# The body is read only as far as a header section could reach (message.MAX_HEADER_BYTES).
_BODY_READ_LIMIT = 1_048_576


@dataclass(frozen=True, slots=True)
class Leak:
    field: str
    address: str  # the normalised address that leaked
    # True when the field is a line at the top of the body that looks like a header field.
    in_body: bool = False


def _fields(header_bytes: bytes) -> list[tuple[str, str]]:
    """(name, unfolded text) of each field; a line that is not a field is reported as its own."""
    text = header_bytes.decode("utf-8", errors="surrogateescape")
    fields: list[tuple[str, list[str]]] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1][1].append(line.strip())
        elif line:
            name, colon, value = line.partition(":")
            fields.append((name.strip() if colon else "(not a header field)", [value if colon else line]))
    return [(name, " ".join(parts)) for name, parts in fields]


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
    joined = _BETWEEN_ENCODED_WORDS.sub(r"\1\2", text)
    return _ENCODED_WORD.sub(lambda m: _decode_word(m.group(1), m.group(2), m.group(3)), joined)


def _without_comments(text: str) -> str:
    """Text with every (nested) comment replaced by a space, in one pass."""
    kept: list[str] = []
    depth = 0
    position = 0
    for stop in _PARENTHESIS.finditer(text):
        char = stop.group(0)
        if char == "\\":
            continue
        if char == "(":
            if depth == 0:
                kept.append(text[position : stop.start()])
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                kept.append(" ")
                position = stop.end()
    if depth == 0:
        kept.append(text[position:])
    return "".join(kept)


def _squashed(text: str) -> str:
    """Lower case, no quotes or backslashes, no space around @: "A\\"b" @ X becomes a"b@x minus quotes."""
    return _AROUND_AT.sub("@", text.lower().replace('"', "").replace("\\", ""))


def _spellings(value: str) -> set[str]:
    """The value as written and in every decoded or simplified form an address could hide in."""
    base = {value}
    if "=?" in value:
        base.add(_decode_encoded_words(value))
    if "%" in value:
        base |= {unquote(text, errors="replace") for text in base}
    forms: set[str] = set()
    for text in base:
        forms.add(_squashed(text))
        if "(" in text:
            forms.add(_squashed(_without_comments(text)))
    # Both with and without space around dots: "bob@one.test. Next" must still read as bob@one.test.
    return forms | {_AROUND_DOT.sub(".", form) for form in forms}


def _domain_forms(domain: str) -> set[str]:
    """A domain as written and normalised (Unicode form), so punycode and Unicode spellings meet."""
    return {domain, normalize_domain(domain)}


def _readings(line: str) -> set[str]:
    """A field's whole line as a person may read it: lower case, encoded words and percent-encoding
    decoded, backslashes dropped, full-width forms and ideographic dots made plain (quotes kept)."""
    forms = {line.lower()}
    if "=?" in line:
        forms.add(_decode_encoded_words(line).lower())
    # Each step also reads what the steps before it decoded (an encoded word may hold %40).
    if any("%" in text for text in forms):
        forms |= {unquote(text, errors="replace") for text in forms}
    if any("\\" in text for text in forms):
        forms |= {text.replace("\\", "") for text in forms}
    if not all(text.isascii() for text in forms):
        forms |= {unicodedata.normalize("NFKC", text).lower().translate(_IDEOGRAPHIC_DOTS) for text in forms}
    return forms


@functools.lru_cache(maxsize=4096)
def _written_forms(key: str) -> tuple[tuple[str, str], ...]:
    """(local part, domain) of every way the address key is written as text: bare or quoted local part
    (with and without its backslashes), domain in Unicode and punycode. Cached: the policy, the rewrite
    and the check each build a checker for the same recipients."""
    local, _, domain = key.rpartition("@")
    quoted = quote(local)
    locals_ = {local, f'"{local}"', f'"{quoted}"', f'"{quoted.replace(chr(92), "")}"'}
    domains = {domain, ascii_domain_form(key).rpartition("@")[2]}
    return tuple((written_local, written_domain) for written_domain in domains for written_local in locals_)


class _TextIndex:
    """Addresses looked up as text around each "@": domain spelling -> local length -> local spelling -> key."""

    def __init__(self, keys: frozenset[str]) -> None:
        self._by_domain: dict[str, dict[int, dict[str, str]]] = {}
        for key in keys:
            for local, domain in _written_forms(key):
                self._by_domain.setdefault(domain, {}).setdefault(len(local), {})[local] = key
        self._domain_lengths = frozenset(len(domain) for domain in self._by_domain)
        self._longest_domain = max(self._domain_lengths, default=0)

    def occurrences(self, text: str) -> Iterator[str]:
        """The key of every occurrence in text that a person reads as that address."""
        for run in _AT_AND_DOMAIN_RUN.finditer(text):
            at = run.start()
            # Linear: only the places where a protected domain could end are tried, within its length.
            last = min(run.end(), at + 2 + self._longest_domain)
            ends = [stop.start() for stop in _DOMAIN_BREAK.finditer(text, at + 1, last)]
            for end in (*ends, run.end()):
                if end - at - 1 not in self._domain_lengths:
                    continue
                by_length = self._by_domain.get(text[at + 1 : end])
                if by_length is None or _DOMAIN_GOES_ON.match(text, end):
                    continue
                for local_length, locals_ in by_length.items():
                    start = at - local_length
                    key = locals_.get(text[start:at]) if start >= 0 else None
                    if key is not None and not _glued_on_the_left(text, start):
                        yield key


def _glued_on_the_left(text: str, start: int) -> bool:
    before = text[start - 1 : start]
    return bool(before) and (before in _LOCAL_PART_CHARS or before.isalnum())


def _body_fields(body: bytes) -> list[tuple[str, str]]:
    """(name, unfolded line) of the lines at the top of the body that look like header fields, up to
    the first blank line or line that is not one; any line ending (CR, LF, CR CR LF) ends a line."""
    fields: list[tuple[str, list[str]]] = []
    position = 0
    limit = min(len(body), _BODY_READ_LIMIT)
    while position < limit:
        line = _BODY_LINE.match(body, position)
        if line is None or line.end() == position:
            break
        position = line.end()
        text = line.group(0).rstrip(b"\r\n")
        if not text.strip():
            break
        if text[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(text.strip().decode("utf-8", errors="surrogateescape"))
        elif _BODY_FIELD.match(text):
            decoded = text.decode("utf-8", errors="surrogateescape")
            fields.append((decoded.partition(":")[0].strip(), [decoded]))
        else:
            break
    return [(name, " ".join(parts)) for name, parts in fields]


class LeakChecker:
    """Built once per message from its protected addresses; checks each copy in time linear in its size."""

    def __init__(self, protected: frozenset[str]) -> None:
        self._protected = protected
        # domain -> local part length -> local parts, all in squashed spelling; keys found by suffix.
        self._locals: dict[str, dict[int, dict[str, str]]] = {}
        for key in protected:
            local, _, domain = key.rpartition("@")
            local = _squashed(local)
            ascii_domain = ascii_domain_form(key).rpartition("@")[2]
            for spelling in {domain, ascii_domain}:
                self._locals.setdefault(spelling, {}).setdefault(len(local), {})[local] = key
        self._domain_cache: dict[str, set[str]] = {}
        self._protected_text = _TextIndex(protected)
        self._keys_by_field: dict[tuple[str, str], frozenset[str]] = {}
        # Every copy shares one body object: its header-like top lines are split out once.
        self._body: tuple[bytes, list[tuple[str, str]]] | None = None

    def _keys_at(self, form: str, at: int) -> set[str]:
        """The protected keys written as local@domain around the @ at index at."""
        match = _DOMAIN.match(form, at + 1)
        if match is None:
            return set()
        written = match.group(0).rstrip(".\u3002\uff0e\uff61")
        if written not in self._domain_cache:
            self._domain_cache[written] = _domain_forms(written)
        found: set[str] = set()
        for domain in self._domain_cache[written]:
            for length, locals_ in self._locals.get(domain, {}).items():
                start = at - length
                if start < 0 or form[start:at] not in locals_:
                    continue
                before = form[start - 1] if start > 0 else " "
                if not (before.isalnum() or before in _LOCAL_CONTINUES):
                    found.add(locals_[form[start:at]])
        return found

    def _by_grammar(self, value: str) -> frozenset[str]:
        found: set[str] = set()
        for form in _spellings(value):
            at = form.find("@")
            while at >= 0:
                found |= self._keys_at(form, at)
                at = form.find("@", at + 1)
        return frozenset(found)

    def keys_in(self, name: str, value: str, may_show: frozenset[str] = frozenset()) -> frozenset[str]:
        """The protected keys other than may_show that the field name: value shows, by either reading;
        cached, as copies share most fields."""
        keys = self._keys_by_field.get((name, value))
        if keys is None:
            as_text = {key for text in _readings(f"{name}:{value}") for key in self._protected_text.occurrences(text)}
            keys = self._keys_by_field[(name, value)] = self._by_grammar(value) | as_text
        return keys - may_show

    def find(self, header_bytes: bytes, may_show: frozenset[str], body: bytes = b"") -> Leak | None:
        """The first protected address other than those in may_show found in the header bytes or in
        header-like lines at the top of the body, or None."""
        if self._protected <= may_show:
            return None
        for name, value in _fields(header_bytes):
            leaked = self.keys_in(name, value, may_show)
            if leaked:
                return Leak(name, min(leaked))
        if self._body is None or self._body[0] is not body:
            self._body = (body, _body_fields(body))
        for name, line in self._body[1]:
            leaked = self.keys_in(name, line.partition(":")[2], may_show)
            if leaked:
                return Leak(name, min(leaked), in_body=True)
        return None

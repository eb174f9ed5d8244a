"""The last check before a copy leaves: does its final header section name a hidden address?

Deliberately independent of message.py, addresses' parser and rewrite.py: it splits the header bytes
itself, decodes encoded words itself and, rather than parsing addresses, looks at the text on both
sides of every "@" in every spelling of each field (raw, RFC 2047-decoded, percent-decoded, with and
without comments, quotes and backslashes, any case, domains in Unicode or punycode). A bug in the
rewrite is caught here. Linear in the size of the header section. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Leak:
    field: str
    address: str  # the normalised address that leaked


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
        self._keys_by_value: dict[str, frozenset[str]] = {}

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

    def _keys_in(self, value: str) -> frozenset[str]:
        """Every protected key written in a field value, in any spelling; cached, as copies share fields."""
        keys = self._keys_by_value.get(value)
        if keys is None:
            found: set[str] = set()
            for form in _spellings(value):
                at = form.find("@")
                while at >= 0:
                    found |= self._keys_at(form, at)
                    at = form.find("@", at + 1)
            keys = self._keys_by_value[value] = frozenset(found)
        return keys

    def find(self, header_bytes: bytes, may_show: frozenset[str]) -> Leak | None:
        """The first protected address other than those in may_show found in the header bytes, or None."""
        if self._protected <= may_show:
            return None
        for name, value in _fields(header_bytes):
            leaked = self._keys_in(value) - may_show
            if leaked:
                return Leak(name, min(leaked))
        return None

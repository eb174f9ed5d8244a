"""Parsing, validating and normalising email addresses (groups, encoded words, IDN, case).

Pure: no I/O. Header address lists are read by a small RFC 5322 tokenizer rather than the standard
library's email.headerregistry, which is quadratic in the number of addresses, recurses once per nested
comment (RecursionError) and silently drops what follows a stray `;`. Envelope addresses are validated
strictly against RFC 5321, because a lenient parser there is how address smuggling starts.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import Header, decode_header, make_header
from email.utils import quote

from relay.core.replies import RelayError

# RFC 5321 4.1.2: Dot-string and Quoted-string local parts; RFC 6531 adds UTF-8 to both.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_UTF8_ATEXT = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_UTF8_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_UTF8_LABEL = r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f]){0,61}(?:[A-Za-z0-9]|[^\x00-\x7f]))?"
_ADDRESS_LITERAL = r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]"
_ASCII_MAILBOX = re.compile(rf"(?:{_ATEXT}+(?:\.{_ATEXT}+)*|{_QUOTED})@(?:{_LABEL}(?:\.{_LABEL})*|{_ADDRESS_LITERAL})")
_UTF8_MAILBOX = re.compile(
    rf"(?:{_UTF8_ATEXT}+(?:\.{_UTF8_ATEXT}+)*|{_UTF8_QUOTED})@"
    rf"(?:{_UTF8_LABEL}(?:\.{_UTF8_LABEL})*|{_ADDRESS_LITERAL})"
)
MAX_ADDRESS_LENGTH = 254
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
# Comment, quote and bracket marks turned into spaces, so addresses written inside them stand alone.
_UNWRAP = str.maketrans({"(": " ", ")": " ", '"': " ", "[": " ", "]": " "})
# Characters after which an address starts in a URL or a raw encoded word.
_URL_PREFIX = re.compile(r"[=?/']")


def validate_envelope_address(address: str, *, smtputf8: bool) -> str:
    """Return the address if it is exactly one well-formed RFC 5321 mailbox, else raise RelayError."""
    pattern = _UTF8_MAILBOX if smtputf8 else _ASCII_MAILBOX
    if len(address.encode("utf-8")) > MAX_ADDRESS_LENGTH or not pattern.fullmatch(address):
        if not smtputf8 and _UTF8_MAILBOX.fullmatch(address):
            raise RelayError(553, "5.6.7", f"{address!r} has non-ASCII characters: use SMTPUTF8")
        raise RelayError(553, "5.1.3", f"{address!r} is not a single valid email address")
    return address


@functools.lru_cache(maxsize=1024)
def normalize_domain(domain: str) -> str:
    """The domain in lower-case Unicode form, so punycode and Unicode spellings compare equal."""
    # Lower case first: the idna codec only recognises a lower-case "xn--" prefix.
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("idna").lower()
    except UnicodeError:
        return domain.lower()


def normalize_address(address: str) -> str:
    """The comparison key of an address: unquoted local part and domain, case-insensitive."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address.strip().lower()
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return f"{local.lower()}@{normalize_domain(domain)}"


def ascii_domain_form(address_key: str) -> str:
    """The same address with its domain in punycode (xn--) form, or the key itself if that fails."""
    local, _, domain = address_key.rpartition("@")
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return address_key


@dataclass(frozen=True, slots=True)
class Mailbox:
    display_name: str
    address: str  # the addr-spec as written (quoted local parts keep their quotes)
    group: str | None = None

    @property
    def key(self) -> str:
        return normalize_address(self.address)


# One lexical token of RFC 5322 structured header text. Quoted strings and domain literals may run to
# the end of the text when unterminated, so the pattern always matches without backtracking.
_TOKEN = re.compile(
    r"""(?P<space>[ \t\r\n]+)
      |(?P<quoted>"(?:[^"\\]|\\.)*(?:"|\\?\Z))
      |(?P<literal>\[(?:[^\]\\]|\\.)*(?:\]|\\?\Z))
      |(?P<comment>\()
      |(?P<special>[<>,;:@])
      |(?P<atom>[^\s()<>\[\]:;@\\,"]+)
      |(?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)
_COMMENT_STOP = re.compile(r"[()\\]")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # space, quoted, literal, comment, special, atom, other
    text: str

    @property
    def is_word(self) -> bool:
        return self.kind in ("atom", "quoted")

    @property
    def is_blank(self) -> bool:
        return self.kind in ("space", "comment")


def _comment_end(text: str, start: int) -> int:
    """The index just past the comment opening at start; comments nest (RFC 5322 3.2.2)."""
    depth = 0
    position = start
    while True:
        stop = _COMMENT_STOP.search(text, position)
        if stop is None:
            return len(text)
        char = stop.group(0)
        if char == "\\":
            position = stop.end() + 1
            continue
        depth += 1 if char == "(" else -1
        position = stop.end()
        if depth == 0:
            return position


def _tokens(text: str) -> list[_Token]:
    """Linear in the length of text, whatever it contains (the stdlib parser is not)."""
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        if text[position] == "(":
            end = _comment_end(text, position)
            tokens.append(_Token("comment", text[position:end]))
            position = end
            continue
        match = _TOKEN.match(text, position)
        assert match is not None and match.lastgroup is not None  # the last alternative matches anything
        tokens.append(_Token(match.lastgroup, match.group(0)))
        position = match.end()
    return tokens


def _run(tokens: list[_Token], start: int, step: int, kinds: tuple[str, ...], spaced: bool) -> list[str]:
    """The texts of the adjacent words from start on in direction step.

    With spaced, space next to a dot is crossed too: the obsolete syntax of RFC 5322 4.4 allows
    `one . example` for one.example, and some mail programs read it that way.
    """
    texts: list[str] = []
    position = start
    while 0 <= position < len(tokens):
        token = tokens[position]
        if token.kind in kinds:
            texts.append(token.text)
            position += step
            continue
        if not spaced or not token.is_blank or not texts:
            break
        beyond = position
        while 0 <= beyond < len(tokens) and tokens[beyond].is_blank:
            beyond += step
        if not (0 <= beyond < len(tokens)) or tokens[beyond].kind not in kinds:
            break
        outer, inner = (texts[-1], tokens[beyond].text) if step > 0 else (tokens[beyond].text, texts[-1])
        if not (outer.endswith(".") or inner.startswith(".")):
            break
        position = beyond
    return texts if step > 0 else texts[::-1]


def _addresses_around_at(tokens: list[_Token], spacings: tuple[bool, ...] = (True,)) -> list[str]:
    """Every local@domain in tokens: the words directly before and after each @ (CFWS around @ allowed).

    In an address list, space next to a dot joins words (RFC 5322 4.4); in free text, where
    "bob@one.test. Next" is a sentence, pass spacings=(False, True) to get both readings.
    """
    found: list[str] = []
    for index, token in enumerate(tokens):
        if token.kind != "special" or token.text != "@":
            continue
        before = index - 1
        while before >= 0 and tokens[before].is_blank:
            before -= 1
        after = index + 1
        while after < len(tokens) and tokens[after].is_blank:
            after += 1
        for spaced in spacings:
            local = "".join(_run(tokens, before, -1, ("atom", "quoted"), spaced))
            domain = "".join(_run(tokens, after, 1, ("atom", "literal"), spaced)).rstrip(".")
            address = f"{local}@{domain}"
            if local and domain and address not in found[-1:]:
                found.append(address)
    return found


def _decode_display_name(text: str) -> str:
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except (HeaderParseError, UnicodeError, LookupError, ValueError):
        return text


def _phrase(tokens: list[_Token]) -> str:
    """A display name: words unquoted, comments dropped, encoded words decoded."""
    parts: list[str] = []
    for token in tokens:
        if token.kind == "quoted":
            inner = token.text[1:-1] if len(token.text) > 1 and token.text.endswith('"') else token.text[1:]
            parts.append(_QUOTED_PAIR.sub(r"\1", inner))
        elif token.kind == "space":
            parts.append(" ")
        elif token.kind != "comment":
            parts.append(token.text)
    return _decode_display_name(" ".join("".join(parts).split()))


def _segment_mailboxes(segment: list[_Token], group: str | None) -> list[Mailbox]:
    """The mailboxes of one list element. Stray text after an address yields its addresses too,
    so nothing the stdlib parser would silently drop (a@b.c d@e.f, <a@b.c> <d@e.f>) goes unseen."""
    mailboxes: list[Mailbox] = []
    phrase_start = 0
    index = 0
    outside: list[_Token] = []
    while index < len(segment):
        if segment[index].text != "<" or segment[index].kind != "special":
            outside.append(segment[index])
            index += 1
            continue
        close = index + 1
        while close < len(segment) and not (segment[close].kind == "special" and segment[close].text == ">"):
            close += 1
        inner = segment[index + 1 : close]
        colons = [i for i, t in enumerate(inner) if t.kind == "special" and t.text == ":"]
        if colons:  # obsolete source route: <@relay.example:user@example.com>
            inner = inner[colons[-1] + 1 :]
        name = _phrase(segment[phrase_start:index])
        for position, address in enumerate(_addresses_around_at(inner)):
            mailboxes.append(Mailbox(name if position == 0 else "", address, group))
        index = phrase_start = close + 1
        outside.append(_Token("space", " "))
    # An unquoted address anywhere outside <...> (bare, after another address, or in a display name)
    # is readable by every recipient, so it counts as a mailbox of its own.
    mailboxes.extend(Mailbox("", address, group) for address in _addresses_around_at(outside))
    return mailboxes


def parse_address_list(value: str) -> list[Mailbox]:
    """Every mailbox in an address-list header value, groups flattened.

    Lenient where senders are sloppy and never silent: `;` outside a group and missing commas still
    separate addresses. Linear in the length of value.
    """
    mailboxes: list[Mailbox] = []
    group: str | None = None
    segment: list[_Token] = []
    segment_has_at = in_angle = False
    for token in _tokens(value):
        if token.kind == "special":
            if token.text in "<>":
                in_angle = token.text == "<"
            elif not in_angle and token.text in ",;":
                mailboxes.extend(_segment_mailboxes(segment, group))
                segment, segment_has_at = [], False
                if token.text == ";":
                    group = None
                continue
            elif not in_angle and token.text == ":" and group is None and not segment_has_at:
                group = _phrase(segment)
                segment = []
                continue
            segment_has_at = segment_has_at or token.text == "@"
        segment.append(token)
    mailboxes.extend(_segment_mailboxes(segment, group))
    return mailboxes


def mentioned_addresses(text: str) -> set[str]:
    """The keys of every address written anywhere in text: inside comments, quotes and brackets,
    in RFC 2047 encoded words, and after a URL's `=` or `?` (as in mailto:?to=ann@example.com)."""
    texts = {text, _decode_display_name(text)}
    texts |= {t.translate(_UNWRAP) for t in texts}
    both = (False, True)
    keys: set[str] = set()
    for variant in texts:
        for address in _addresses_around_at(_tokens(variant), both):
            key = normalize_address(address)
            keys.add(key)
            local, _, domain = key.rpartition("@")
            keys.add(f"{_URL_PREFIX.split(local)[-1]}@{domain}")
    return keys


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ascii_only(text: str) -> bool:
    return all(ord(ch) < 0x80 for ch in text)


def format_mailbox(mailbox: Mailbox) -> str:
    """A mailbox for a header value: non-ASCII display names as RFC 2047 encoded words."""
    name = mailbox.display_name.strip()
    if name and not _is_valid_unicode(name):
        # 8-bit bytes that were not UTF-8: their charset is unknown, so show the address alone.
        name = ""
    if not name:
        return mailbox.address
    if _ascii_only(name):
        if re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+", name):
            return f"{name} <{mailbox.address}>"
        return f'"{quote(name)}" <{mailbox.address}>'
    encoded = Header(name, "utf-8").encode(maxlinelen=10_000)
    return f"{encoded} <{mailbox.address}>"


def fold_field(name: str, items: list[str]) -> bytes:
    """A header field listing items, one per line when there are several, as bytes."""
    separator = ",\r\n "
    # surrogateescape: 8-bit header bytes that were not UTF-8 go back out exactly as they came.
    return f"{name}: {separator.join(items)}".encode("utf-8", "surrogateescape") + b"\r\n"

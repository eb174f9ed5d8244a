"""Parsing, validating and normalising email addresses (groups, encoded words, IDN, case).

Pure: no I/O. Header parsing is the standard library's (email.headerregistry); envelope addresses are
validated strictly against RFC 5321, because a lenient parser there is how address smuggling starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.header import Header
from email.policy import default as default_policy
from email.utils import quote

from relay.errors import SmtpReply

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


def validate_envelope_address(address: str, *, smtputf8: bool) -> str:
    """Return the address if it is exactly one well-formed RFC 5321 mailbox, else raise SmtpReply."""
    pattern = _UTF8_MAILBOX if smtputf8 else _ASCII_MAILBOX
    if len(address.encode("utf-8")) > MAX_ADDRESS_LENGTH or not pattern.fullmatch(address):
        if not smtputf8 and _UTF8_MAILBOX.fullmatch(address):
            raise SmtpReply(553, "5.6.7", f"{address!r} has non-ASCII characters: use SMTPUTF8")
        raise SmtpReply(553, "5.1.3", f"{address!r} is not a single valid email address")
    return address


def normalize_domain(domain: str) -> str:
    """The domain in lower-case Unicode form, so punycode and Unicode spellings compare equal."""
    domain = domain.strip().rstrip(".")
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
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
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
    address: str  # the addr-spec, quoted where RFC 5322 needs it
    group: str | None = None

    @property
    def key(self) -> str:
        return normalize_address(self.address)


def parse_address_list(value: str) -> list[Mailbox]:
    """Every mailbox in an address-list header value, groups flattened; unparseable parts are skipped."""
    header = default_policy.header_factory("to", value)
    mailboxes: list[Mailbox] = []
    for group in header.groups:
        for address in group.addresses:
            if not address.username or not address.domain:
                continue
            mailboxes.append(Mailbox(address.display_name, address.addr_spec, group.display_name))
    return mailboxes


def _ascii_only(text: str) -> bool:
    return all(ord(ch) < 0x80 for ch in text)


def format_mailbox(mailbox: Mailbox) -> str:
    """A mailbox for a header value: non-ASCII display names as RFC 2047 encoded words."""
    name = mailbox.display_name.strip()
    if not name:
        return mailbox.address
    if _ascii_only(name):
        if re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+", name):
            return f"{name} <{mailbox.address}>"
        return f'"{quote(name)}" <{mailbox.address}>'
    encoded = Header(name, "utf-8").encode(maxlinelen=10_000)
    return f"{encoded} <{mailbox.address}>"


def fold_field(name: str, items: list[str], line_ending: bytes) -> bytes:
    """A header field listing items, one per line when there are several, as bytes."""
    separator = "," + line_ending.decode("ascii") + " "
    return f"{name}: {separator.join(items)}".encode() + line_ending

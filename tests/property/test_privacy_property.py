"""The privacy promise as a property: for any recipient layout, no copy shows another protected recipient.

Messages are generated with recipients spread over To, Cc, Bcc, groups and Resent- fields, written with
random display names (plain, quoted with commas, RFC 2047 encoded, another recipient's address), comments,
letter case, punycode or Unicode domains and duplicates; the real pipeline (parse, policy, rewrite, leak
check) runs on them, and every copy is then read back with the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.header import Header, decode_header, make_header
from email.utils import getaddresses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.core.policy import Action
from tests.support.mailkit import SENDER, parsed, run

# Distinct three-letter names: no address is a substring of another, so a plain search is exact.
NAMES = ["ann", "bob", "cyd", "dee", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "lou"]
DOMAINS = ["one.test", "two.example", "bücher.test", "mail.three.test"]
PLACES = ["to", "cc", "bcc", "group", "resent-to", "resent-cc", "resent-bcc", "envelope-only"]
NAME_STYLES = ["none", "plain", "comma", "encoded", "other-address", "encoded-other-address", "comment"]
BODY = b"--\r\nThe body: bytes that must arrive untouched \xe2\x82\xac\r\n.\r\n"


@dataclass(frozen=True)
class Recipient:
    local: str  # as it would be written; a quoted local part keeps its quotes
    domain: str  # Unicode form

    @property
    def key(self) -> str:
        return f"{self.local.strip(chr(34))}@{self.domain}".lower()


def key_of(address: str) -> str:
    local, _, domain = address.lower().rpartition("@")
    domain = domain.encode("idna").decode("idna")
    return f"{local.strip(chr(34))}@{domain}".lower()


@st.composite
def layouts(draw: st.DrawFn) -> tuple[bytes, list[str], list[Recipient], bool]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=2, max_size=7, unique=True))
    recipients = [
        Recipient(f'"{n} x"' if draw(st.booleans()) and n in ("ann", "bob") else n, draw(st.sampled_from(DOMAINS)))
        for n in names
    ]
    fields: dict[str, list[str]] = {place: [] for place in PLACES}
    for recipient in recipients:
        for _ in range(draw(st.integers(1, 2))):  # the same person written twice, in another spelling
            fields[draw(st.sampled_from(PLACES))].append(written(draw, recipient, recipients))
    lines = [f"From: Coach <{SENDER}>", "Subject: Saturday", "Message-ID: <m1@coaching.test>"]
    if draw(st.booleans()):
        lines.append(f"Received: from a by b for <{draw(st.sampled_from(recipients)).local}@x.test>; now")
    if draw(st.booleans()):
        chosen = draw(st.lists(st.sampled_from(recipients), max_size=3))
        lines.append("Reply-To: " + ", ".join([SENDER, *(f"{r.local}@{r.domain}" for r in chosen)]))
    for place in ("to", "cc", "bcc"):
        if fields[place]:
            lines.append(f"{place.capitalize()}: " + ",\r\n ".join(fields[place]))
    if fields["group"]:
        lines.append("To: Team: " + ", ".join(fields["group"]) + ";")
    if any(fields[p] for p in ("resent-to", "resent-cc", "resent-bcc")):
        lines += ["Resent-Date: Wed, 25 Nov 2026 05:00:00 +0000", f"Resent-From: {SENDER}"]
        for place in ("resent-to", "resent-cc", "resent-bcc"):
            if fields[place]:
                lines.append(f"{place.title()}: " + ", ".join(fields[place]))
    envelope = [spelled(draw, r.local, r.domain) for r in recipients]
    if draw(st.booleans()):
        envelope.append(SENDER)
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + BODY
    return data, draw(st.permutations(envelope)), recipients, not data.isascii()


def spelled(draw: st.DrawFn, local: str, domain: str) -> str:
    if draw(st.booleans()):
        domain = domain.encode("idna").decode("ascii")
    address = f"{local}@{domain}"
    return draw(st.sampled_from([address, address.upper(), address.capitalize()]))


def written(draw: st.DrawFn, recipient: Recipient, everyone: list[Recipient]) -> str:
    address = spelled(draw, recipient.local, recipient.domain)
    other = draw(st.sampled_from(everyone))
    style = draw(st.sampled_from(NAME_STYLES))
    if style == "plain":
        return f"{recipient.local.strip(chr(34)).title()} <{address}>"
    if style == "comma":
        return f'"Smith, {recipient.local.strip(chr(34))}" <{address}>'
    if style == "encoded":
        return f"{Header('Jörg Müller', 'utf-8').encode()} <{address}>"
    if style == "other-address":
        return f'"{other.local.strip(chr(34))}@{other.domain}" <{address}>'
    if style == "encoded-other-address":
        return f"{Header(f'{other.local.strip(chr(34))}@{other.domain}', 'utf-8').encode()} <{address}>"
    if style == "comment":
        return f"{address} (at work)"
    return address


def spellings_of(key: str) -> set[str]:
    local, _, domain = key.rpartition("@")
    puny = domain.encode("idna").decode("ascii")
    forms = {f"{local}@{domain}", f"{local}@{puny}"}
    return forms | {f'"{local}"@{domain}', f'"{local}"@{puny}'}


def readable_headers(headers: bytes) -> str:
    """The header section as a reader sees it: raw and with every encoded word decoded, lower case."""
    text = headers.decode("utf-8", errors="replace")
    decoded = []
    for line in text.split("\r\n"):
        try:
            decoded.append(str(make_header(decode_header(line))))
        except (UnicodeError, LookupError, ValueError):
            decoded.append(line)
    return (text + "\n" + "\n".join(decoded)).lower()


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.sampled_from(["split", "bcc"]))
def test_no_copy_shows_another_protected_recipient(layout, action: str) -> None:
    data, envelope, recipients, smtputf8 = layout
    prepared = run(data, envelope, smtputf8=smtputf8, action=action)
    protected = {r.key for r in recipients}
    assert prepared.decision.protected == protected
    body = prepared.copies[0].body
    assert body == BODY
    delivered = []
    for copy in prepared.copies:
        assert copy.body is body  # one shared object, never copied per recipient
        delivered += [key_of(r) for r in copy.recipients]
        if copy.kind == "original" and prepared.decision.action is not Action.UNCHANGED:
            assert {key_of(r) for r in copy.recipients} == {key_of(SENDER)}
            continue
        own = {key_of(r) for r in copy.recipients} if copy.kind == "single" else set()
        text = readable_headers(copy.headers)
        for other in protected - own:
            assert not any(spelling in text for spelling in spellings_of(other)), (other, copy.headers)
        message = parsed(copy)
        shown = [key_of(a) for _, a in getaddresses([str(v) for v in message.get_all("To") or []]) if a]
        if copy.kind == "single":
            assert shown == sorted(own)
            assert message["Cc"] is None
            resent = [key_of(a) for _, a in getaddresses([str(v) for v in message.get_all("Resent-To") or []])]
            assert set(resent) <= own
        assert message["Bcc"] is None and message["Resent-Bcc"] is None
    assert sorted(delivered) == sorted({key_of(r) for r in envelope})

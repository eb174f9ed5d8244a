"""The person's reading as a property: glue random characters before and after protected addresses, in
random fields and field names, and no copy a person reads shows another protected recipient's address.

The oracle is deliberately not the relay's code: the standard library decodes encoded words, and a plain
regular expression looks for each address with nothing but the local-part characters of RFC 5322 counting
as glue on its left, and a letter or digit (or a dot before one) on its right.
"""

from __future__ import annotations

import re
from email.header import Header, decode_header, make_header
from urllib.parse import unquote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.core.policy import Action
from relay.core.replies import RelayError
from tests.support.mailkit import SENDER, run

RECIPIENTS = {"ann": "a.example", "bob": "b.example", "cara": "c.example", "dorte": "müller.example"}
# Not From or Sender: an address there is the author's, which every copy shows by design.
FIELD_NAMES = ["Subject", "X-Note", "Comments", "Keywords", "Reply-To", "X-Original-To", "Received", "References"]
# Printable ASCII without the colon and space: what a field name may hold.
NAME_GLUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"), max_size=4)
VALUE_GLUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=4)
# After an address: anything that does not make its domain longer (a letter or digit would).
RIGHT_GLUE = st.text(st.sampled_from("/\"')(>]<:;,!?#*+=&%~-_\\. "), max_size=4)
LOCAL_PART_CHARS = r"[a-z0-9!#$%&'*+/=?^_`{|}~.\-]"


def spelled(draw: st.DrawFn, name: str) -> str:
    domain = RECIPIENTS[name]
    if draw(st.booleans()):
        domain = domain.encode("idna").decode("ascii")
    address = f"{name}@{domain}"
    if draw(st.booleans()):
        address = address.upper()
    return draw(st.sampled_from([address, address.replace("@", "%40"), address.replace("@", "\\@")]))


def encoded(draw: st.DrawFn, text: str) -> str:
    style = draw(st.sampled_from(["plain", "q", "b"]))
    if style == "plain":
        return text
    return Header(text, "utf-8").encode() if style == "b" else "=?utf-8?q?" + text.encode().hex("=").upper() + "?="


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    names = draw(st.lists(st.sampled_from(sorted(RECIPIENTS)), min_size=2, max_size=4, unique=True))
    lines = [
        f"From: Coach <{SENDER}>",
        draw(
            st.sampled_from(["To: undisclosed-recipients:;", "To: " + ", ".join(f"{n}@{RECIPIENTS[n]}" for n in names)])
        ),
    ]
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(names))
        glued = draw(VALUE_GLUE) + spelled(draw, name) + draw(RIGHT_GLUE)
        if draw(st.booleans()):
            field_name = (
                draw(NAME_GLUE)
                + spelled(draw, name).replace("\\", "")
                + draw(RIGHT_GLUE.filter(lambda g: not set(g) & set(' :"(),<>;[]\\')))
            )
            lines.append(f"{field_name}-Note: {draw(VALUE_GLUE)}")
        else:
            lines.append(f"{draw(st.sampled_from(FIELD_NAMES))}: {draw(VALUE_GLUE)} {encoded(draw, glued)}")
    data = ("\r\n".join(lines) + "\r\n\r\nHello\r\n").encode()
    return data, [f"{n}@{RECIPIENTS[n]}" for n in names]


def person_reads(headers: bytes) -> str:
    """Unfolded lines, raw and with encoded words decoded by the standard library, percent-decoded and
    without backslashes, in lower case."""
    text = re.sub(r"\r?\n[ \t]", " ", headers.decode("utf-8", errors="replace"))
    readings = [text]
    for line in text.splitlines():
        try:
            readings.append(str(make_header(decode_header(line))))
        except (UnicodeError, LookupError, ValueError):
            continue
    joined = "\n".join(readings)
    return "\n".join([joined, unquote(joined), joined.replace("\\", ""), unquote(joined).replace("\\", "")]).lower()


def shows(text: str, address: str) -> bool:
    local, _, domain = address.rpartition("@")
    for spelling in {domain, domain.encode("idna").decode("ascii")}:
        pattern = rf"(?<!{LOCAL_PART_CHARS}){re.escape(local)}@{re.escape(spelling)}(?![a-z0-9]|\.[a-z0-9])"
        if re.search(pattern, text):
            return True
    return False


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(messages(), st.sampled_from(["split", "bcc"]))
def test_no_copy_shows_another_protected_address_to_a_reader(sample: tuple[bytes, list[str]], action: str) -> None:
    data, recipients = sample
    try:
        prepared = run(data, recipients, smtputf8=not data.isascii(), action=action)
    except RelayError as refusal:
        assert 500 <= refusal.code < 600
        return
    for copy in prepared.copies:
        own = set(copy.recipients) if len(copy.recipients) == 1 else set()
        text = person_reads(copy.headers)
        for other in set(recipients) - own:
            assert not shows(text, other), (other, prepared.decision.action, copy.headers)
    assert prepared.decision.action in (Action.SPLIT, Action.BCC, Action.UNCHANGED)

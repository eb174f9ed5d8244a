"""Line endings as a property: however a sender ends its lines (CRLF, LF, CR CR LF, a CR alone, or a mix),
no copy shows another recipient's address anywhere, headers or body; or the message is refused with a 5xx.

A header field read as body text would put the whole recipient list at the top of every copy's text.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.core.replies import RelayError
from tests.support.mailkit import SENDER, run

ADDRESSES = [f"{name}@{domain}" for name in ("ann", "bob", "cyd", "dee") for domain in ("one.test", "two.example")]
ENDINGS = {"crlf": b"\r\n", "lf": b"\n", "cr-cr-lf": b"\r\r\n", "lone-cr": b"\r"}


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    recipients = draw(st.lists(st.sampled_from(ADDRESSES), min_size=2, max_size=5, unique=True))
    places: dict[str, list[str]] = {"To": [], "Cc": [], "Bcc": []}
    for address in recipients:
        places[draw(st.sampled_from(list(places)))].append(address)
    lines = [f"From: Coach <{SENDER}>"]
    for name, written in places.items():
        if written:
            folded = draw(st.booleans())
            lines.append(f"{name}: " + (",\n " if folded else ", ").join(written))
    lines += ["Subject: Saturday", "", "Hello,", "see you on Saturday.", ""]
    text = "\n".join(lines).replace(",\n ", ",\0 ")  # the fold's own line ending is drawn like the others
    variant = draw(st.sampled_from([*ENDINGS, "mixed"]))
    pieces = text.encode().split(b"\n")
    data = pieces[0]
    for piece in pieces[1:]:
        ending = ENDINGS[draw(st.sampled_from(list(ENDINGS)))] if variant == "mixed" else ENDINGS[variant]
        data += ending + piece
    return data.replace(b"\0", ENDINGS[variant] if variant != "mixed" else b"\r\n"), recipients


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_no_copy_shows_another_recipient_whatever_the_line_endings(case: tuple[bytes, list[str]]) -> None:
    data, recipients = case
    try:
        prepared = run(data, recipients)
    except RelayError as refusal:
        assert 500 <= refusal.code < 600, refusal.render()
        return
    for copy in prepared.copies:
        # Valid SMTP, and one header section: every line ends in CRLF, and only the last line is empty.
        assert copy.headers.count(b"\r") == copy.headers.count(b"\n") == copy.headers.count(b"\r\n")
        assert copy.headers.index(b"\r\n\r\n") == len(copy.headers) - 4
        text = (copy.headers + copy.body).lower()
        for address in recipients:
            if address.encode() in text:
                assert copy.recipients == (address,), (address, copy)
